"""One attention call, checked once: every entry point (the references, the functional paths,
the modules) builds an :class:`AttentionCall` from its arguments and hands it down whole.

Query ``(B, H, S_q, D)``, key ``(B, H_kv, S_kv, D)``, value ``(B, H_kv, S_kv, D_v)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, NamedTuple, TypeVar

from torch import Tensor
from torch.nn.attention.flex_attention import _mask_mod_signature, _score_mod_signature

from dilattn._checks import (
    Shapes,
    check_attention_inputs,
    check_bool,
    check_q_offset,
    check_score_mod,
    default_scale,
    number_in,
)
from dilattn._varlen import check_variable_lengths, visibility_mask_mod
from dilattn.config import DilatedConfig, Window

Pattern = TypeVar("Pattern", DilatedConfig, Window, None)
"""Who sees whom: the dilated branches, a local window, or every key (linear attention)."""


class Extras(NamedTuple):
    """The extras of a call as the user passed them, unchecked (see :mod:`dilattn._varlen`)."""

    key_padding_mask: Tensor | None = None
    document_ids: Tensor | None = None
    cu_seqlens: Tensor | None = None
    score_mod: _score_mod_signature | None = None
    q_offset: int = 0
    dropout_p: float = 0.0


@dataclass(frozen=True)
class AttentionCall(Generic[Pattern]):
    """An attention call, checked: its tensors, their shapes, its pattern and its extras.

    ``document_ids`` is ``(1, L)`` (shared by the batch) when it comes from ``cu_seqlens``;
    ``scale`` is the given one or ``1 / sqrt(D)``.
    """

    query: Tensor  # (B, H, S_q, D)
    key: Tensor  # (B, H_kv, S_kv, D)
    value: Tensor  # (B, H_kv, S_kv, D_v)
    pattern: Pattern
    shapes: Shapes
    is_causal: bool
    scale: float
    q_offset: int
    key_padding_mask: Tensor | None  # (B, S_kv) bool, True = padding
    document_ids: Tensor | None  # (B, L) or (1, L) integers
    score_mod: _score_mod_signature | None
    dropout_p: float

    @classmethod
    def of(
        cls,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        pattern: Pattern,
        is_causal: bool,
        scale: float | None,
        enable_gqa: bool,
        extras: Extras,
    ) -> AttentionCall[Pattern]:
        """The checked call; a bad argument raises ``TypeError`` or ``ValueError`` naming it."""
        padding, documents, cu_seqlens, score_mod, q_offset, dropout_p = extras
        check_bool("is_causal", is_causal)
        shapes = check_attention_inputs(query, key, value, enable_gqa=enable_gqa)
        check_score_mod(score_mod)
        q_offset = check_q_offset(q_offset)
        padding, documents = check_variable_lengths(
            padding,
            documents,
            cu_seqlens,
            batch=shapes.batch,
            q_len=shapes.q_len,
            kv_len=shapes.kv_len,
            q_offset=q_offset,
            device=query.device,
        )
        return cls(
            query,
            key,
            value,
            pattern,
            shapes,
            is_causal,
            default_scale(scale, shapes.head_dim),
            q_offset,
            padding,
            documents,
            score_mod,
            number_in("dropout_p", dropout_p, 0.0, 1.0),
        )

    @property
    def visibility(self) -> _mask_mod_signature | None:
        """Padding and documents as one ``mask_mod`` over positions (``None``: neither)."""
        return visibility_mask_mod(self.key_padding_mask, self.document_ids)
