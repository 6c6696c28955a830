"""``MixedHeadAttention``: one attention layer whose heads are of different kinds.

As ``linear-attention-transformer`` mixes local softmax heads with global linear heads, the
heads here come in contiguous groups, in this order: local heads
(:func:`dilattn.local_attention`), dilated heads (LongNet), global linear heads
(:func:`dilattn.linear_attention`). All heads share the q/k/v/out projections;
each group runs its kind on its slice of heads and the outputs are concatenated (in head
order) before the output projection.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from dilattn._call import Extras
from dilattn._checks import positive_int
from dilattn.linear import linear_attention
from dilattn.local import local_attention
from dilattn.nn.modules import MultiheadDilatedAttention

__all__ = ["HeadCounts", "MixedHeadAttention", "check_head_counts"]


class HeadCounts(NamedTuple):
    """Heads of each kind in one layer, in head order: ``HeadCounts(local=2, dilated=4,
    linear=2)``; a plain tuple ``(2, 4, 2)`` works too."""

    local: int = 0
    dilated: int = 0
    linear: int = 0


def check_head_counts(name: str, counts: object, num_heads: int, num_kv_heads: int) -> HeadCounts:
    """``counts`` as :class:`HeadCounts`: non-negative integers summing to ``num_heads``, each
    a multiple of ``num_heads / num_kv_heads`` (unless one key/value head serves them all)."""
    fields = HeadCounts._fields
    if (
        isinstance(counts, (str, bytes))
        or not isinstance(counts, Sequence)
        or len(counts) != len(fields)
        or any(isinstance(n, bool) or not isinstance(n, int) or n < 0 for n in counts)
    ):
        raise ValueError(
            f"{name} must be {len(fields)} non-negative integers {fields}, got {counts!r}"
        )
    heads = HeadCounts(*counts)
    if sum(heads) != num_heads:
        raise ValueError(f"{name} must add up to num_heads ({num_heads}), got {heads}")
    group = num_heads // num_kv_heads  # query heads per key/value head
    for kind, count in heads._asdict().items():
        if num_kv_heads > 1 and count % group:
            raise ValueError(
                f"{name}: with num_kv_heads={num_kv_heads}, each kind must have a multiple of "
                f"{group} heads, got {count} {kind} heads"
            )
    return heads


class _Group(NamedTuple):
    kind: str  # a field of HeadCounts
    heads: slice  # its query heads
    kv_heads: slice  # the key/value heads they read


class MixedHeadAttention(MultiheadDilatedAttention):
    """Multi-head attention with groups of local, dilated and global linear heads.

    ``(B, S, E)`` in, ``(B, S, E)`` out::

        attn = MixedHeadAttention(
            512, 8, [256, 512], [1, 2], local_heads=2, linear_heads=2, is_causal=True
        )
        out, _ = attn(x, x, x)  # heads 0-1 local, 2-5 dilated, 6-7 linear; out (B, S, 512)

    Args:
        local_heads: the first ``local_heads`` heads run local attention
            (:func:`dilattn.local_attention`) in windows of ``local_window_size``:
            ``local-attention``'s buckets, one bucket back and (non-causal) one forward, as
            ``linear-attention-transformer``'s local heads.
        linear_heads: the last ``linear_heads`` heads run causal or non-causal linear
            attention (:func:`dilattn.linear_attention`, ``elu + 1`` features).
            The heads between are dilated, exactly as a :class:`MultiheadDilatedAttention`
            with that many heads (their head offsets count from the group's first head).
        local_window_size: window (bucket) size of the local heads.
        linear_chunk_size: ``chunk_size`` of the causal linear heads.
        others: as :class:`MultiheadDilatedAttention`. With ``num_kv_heads > 1`` every group
            must hold a multiple of ``num_heads / num_kv_heads`` heads (each group reads its
            own key/value heads); with one key/value head all groups share it.
            Score-mod positions (``"alibi"``, ``"t5"``) and attention ``dropout`` apply to
            dilated heads only, so they are refused with other kinds; rotary and xPos rotate
            every head. Local heads run on ``backend`` (``"auto"`` where it is
            ``"strided"``, which has no local path); linear heads on plain PyTorch.

    Decoding with a :class:`dilattn.KVCache` works for every kind (the cache holds every
    key/value head): local heads read their window of it, linear heads rebuild their prefix
    state from it (``O(S)`` per step, exact).

    Equivalent PyTorch code: the projections around ``local_attention_reference``,
    ``dilated_attention_reference`` and ``linear_attention_reference``, one per head group.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        segment_lengths: Sequence[int],
        dilation_rates: Sequence[int],
        *,
        local_heads: int = 0,
        linear_heads: int = 0,
        local_window_size: int = 256,
        linear_chunk_size: int = 64,
        **kwargs: Any,
    ) -> None:
        super().__init__(embed_dim, num_heads, segment_lengths, dilation_rates, **kwargs)
        for name, value in (("local_heads", local_heads), ("linear_heads", linear_heads)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        if local_heads + linear_heads > num_heads:
            raise ValueError(
                f"local_heads + linear_heads must be at most num_heads ({num_heads}), got "
                f"{local_heads} + {linear_heads}"
            )
        self.local_window_size = positive_int("local_window_size", local_window_size)
        self.linear_chunk_size = positive_int("linear_chunk_size", linear_chunk_size)
        others = local_heads + linear_heads
        if others and (self.position in ("alibi", "t5") or self.dropout > 0):
            raise ValueError(
                "position='alibi'/'t5' and dropout act on dilated heads only: use "
                "position=None/'rotary'/'xpos' and dropout=0 with local or linear heads, got "
                f"position={self.position!r}, dropout={self.dropout}"
            )
        self.head_counts = check_head_counts(
            "heads",
            (local_heads, num_heads - others, linear_heads),
            num_heads,
            self.num_kv_heads,
        )
        group = num_heads // self.num_kv_heads  # query heads per key/value head
        groups, start = [], 0
        for kind, count in self.head_counts._asdict().items():
            end = start + count
            kv = slice(0, 1) if self.num_kv_heads == 1 else slice(start // group, end // group)
            if count:
                groups.append(_Group(kind, slice(start, end), kv))
            start = end
        self.groups = tuple(groups)

    def _attend(
        self, q: Tensor, k: Tensor, v: Tensor, *, is_causal: bool, extras: Extras
    ) -> Tensor:
        """Each group of heads ``(B, H_g, S_q, D)`` by its kind, concatenated along heads."""
        outputs = []
        for group in self.groups:
            args = q[:, group.heads], k[:, group.kv_heads], v[:, group.kv_heads]
            if group.kind == "dilated":
                outputs.append(super()._attend(*args, is_causal=is_causal, extras=extras))
                continue
            enable_gqa = args[0].shape[1] != args[1].shape[1]
            if group.kind == "local":
                out = local_attention(
                    *args,
                    self.local_window_size,
                    is_causal=is_causal,
                    enable_gqa=enable_gqa,
                    backend="auto" if self.backend == "strided" else self.backend,
                    **extras._asdict(),
                )
                assert isinstance(out, Tensor)
                outputs.append(out)
                continue
            if extras.document_ids is not None or extras.cu_seqlens is not None:
                raise ValueError(
                    "linear heads do not take document_ids/cu_seqlens (packed documents)"
                )
            outputs.append(
                linear_attention(
                    *args,
                    is_causal=is_causal,
                    enable_gqa=enable_gqa,
                    chunk_size=self.linear_chunk_size,
                    key_padding_mask=extras.key_padding_mask,
                    q_offset=extras.q_offset,
                )
            )
        return torch.cat(outputs, 1)  # (B, H, S_q, D)

    def extra_repr(self) -> str:
        local, _, linear = self.head_counts
        options = [super().extra_repr(), f"heads={self.head_counts}"]
        options += [f"local_window_size={self.local_window_size}"] if local else []
        options += [f"linear_chunk_size={self.linear_chunk_size}"] if linear else []
        return ", ".join(options)
