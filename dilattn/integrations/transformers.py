"""Hugging Face ``transformers``: dilated attention as ``attn_implementation="dilated"``.

::

    from dilattn.integrations import transformers as dilattn_hf

    dilattn_hf.register(segment_lengths=[2048, 4096], dilation_rates=[1, 2])
    model = LlamaForCausalLM._from_config(config, attn_implementation="dilated")

:func:`register` adds two things under one name: an attention function to transformers'
``AttentionInterface`` and a mask builder to its ``AttentionMaskInterface`` (without one,
transformers drops the padding mask of a custom implementation). Every attention layer of
the model then runs :func:`dilattn.dilated_attention` on its ``(B, H, S, D)`` query, key and
value (GQA included) and returns ``(B, S, H, D)`` and no weights.

The branches come from the model config when it has the attribute ``dilated_attention``
(a dict ``{"segment_lengths": [...], "dilation_rates": [...]}``, optionally
``"head_offsets"``; it is saved with the config), otherwise from :func:`register`'s
arguments. One of the two is required.

Masks. Dilated attention honours causal or full attention plus key padding, nothing else:

* the mask builder reads transformers' arguments (the 2-D padding mask, the query offset of
  the cache) and returns a small ``DilatedMask`` instead of a ``(B, 1, S_q, S_kv)`` tensor;
  a mask pattern other than plain causal or bidirectional (packed sequences, overlays,
  sliding windows) is built densely once and accepted only if it equals causal or full
  attention with key padding;
* a 4-D mask passed to the model yourself (bool, ``True`` = attend, or additive, 0 and
  ``-inf``/the dtype's minimum) must be causal (per the layer's ``is_causal``) or full
  attention with key padding; the query offset is read from the mask;
* ``None``: no padding, queries at the last ``S_q`` key positions (as with a KV cache).

Caches. Dynamic and static caches (``cache_implementation="static"`` or a ``StaticCache``)
give the same tokens. With a static cache, ``generate`` builds each step's mask before the
forward and passes it in as ``attention_mask``: a ``DilatedMask`` says it is 4-D (``ndim``),
so transformers hands it back to the mask builder, which checks its query offset against the
cache's and returns it; the cache's empty slots are padding keys.

Refused with a ``ValueError``: other masks, keys that do not start at position 0
(sliding-window caches), and the layer options ``sliding_window``, ``softcap``, attention
sinks (``s_aux``), ``position_bias`` and packed ``cu_seq_lens_*``, ``output_attentions``.

Positions are token indices: segments are anchored at index 0 of the padded sequence, so
left padding shifts the dilation pattern of a row (right-pad for training; batched
generation with left padding differs from unbatched generation unless ``r = 1`` throughout).

Equivalent PyTorch code: ``dilattn.reference.dilated_attention_reference`` on each layer's
query, key and value with ``key_padding_mask`` and ``q_offset`` as above.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dilattn import DilatedConfig, HeadOffsets, dilated_attention

try:
    import transformers
    from transformers import AttentionInterface
    from transformers.masking_utils import (
        AttentionMaskInterface,
        bidirectional_mask_function,
        causal_mask_function,
        sdpa_mask,
    )
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError(
        "dilattn.integrations.transformers needs Hugging Face transformers>=5.17: "
        "pip install 'dilattn[hf]'"
    ) from error

__all__ = ["CONFIG_ATTRIBUTE", "DilatedMask", "register"]

if tuple(int(part) for part in transformers.__version__.split(".")[:2]) < (5, 17):
    raise ImportError(
        "dilattn.integrations.transformers needs transformers>=5.17 (its mask interface takes "
        f"q_length and q_offset), found {transformers.__version__}: pip install 'dilattn[hf]'"
    )

CONFIG_ATTRIBUTE = "dilated_attention"
"""The model config attribute that holds the branches:
``{"segment_lengths": [...], "dilation_rates": [...], "head_offsets": "cyclic"}``."""

_BUILTIN_NAMES = frozenset(ALL_ATTENTION_FUNCTIONS) | {"eager"}
_UNSUPPORTED = {
    "sliding_window": "sliding-window attention (set the config's sliding_window to None)",
    "softcap": "logit soft-capping",
    "s_aux": "attention sinks",
    "position_bias": "an additive position bias (use dilattn.T5RelativeBias as a score_mod)",
    "cu_seq_lens_q": "packed sequences",
    "cu_seq_lens_k": "packed sequences",
}
_Backend = Literal["auto", "flex", "math"]


@dataclass(frozen=True, eq=False)
class DilatedMask:
    """What the ``"dilated"`` mask builder hands to every layer instead of a 4-D tensor.

    Query row ``i`` sits at position ``q_offset + i``, key ``j`` at ``j``; ``is_causal`` masks
    keys after the query; ``key_padding_mask`` ``(B, S_kv)`` bool, ``True`` = padding key.
    """

    is_causal: bool
    q_offset: int
    key_padding_mask: Tensor | None = None

    ndim: ClassVar[int] = 4
    """It stands for a 4-D mask. ``generate`` with a compileable cache (``StaticCache``,
    ``cache_implementation="static"``) builds the masks before the forward and passes them
    in as ``attention_mask``; transformers then reads ``attention_mask.ndim`` and hands a mask
    that is not 2-D back to the mask builder, which returns it unchanged."""

    def visible(self, q_len: int, kv_len: int, device: torch.device) -> Tensor:
        """The same mask as a tensor: bool ``(B or 1, 1, S_q, S_kv)``, ``True`` = attend."""
        q = torch.arange(self.q_offset, self.q_offset + q_len, device=device)
        k = torch.arange(kv_len, device=device)
        if self.is_causal:
            seen = k <= q[:, None]
        else:
            seen = torch.ones(q_len, kv_len, dtype=torch.bool, device=device)
        seen = seen[None, None]  # (1, 1, S_q, S_kv)
        if self.key_padding_mask is None:
            return seen
        return seen & ~self.key_padding_mask[:, None, None, :]


def _queries_last(q_len: int, kv_len: int) -> int:
    """The query offset when the queries are the last ``S_q`` of the keys' positions."""
    if kv_len < q_len:
        raise ValueError(
            f"without a mask that says where they are, {q_len} queries must be the last of "
            f"the {kv_len} key positions (S_q <= S_kv)"
        )
    return kv_len - q_len


def _not_expressible(what: str) -> ValueError:
    return ValueError(
        f"{what} is not causal or full attention with key padding, which is all dilated "
        "attention can honour (not sliding windows, chunks, packed sequences, prefixes, "
        "per-head masks or biases); use another attn_implementation for this model"
    )


def _visible_from_tensor(mask: Tensor, q_len: int, kv_len: int) -> Tensor:
    """A 4-D bool or additive mask as bool ``(B or 1, 1, S_q, S_kv)``, ``True`` = attend."""
    if mask.dim() != 4 or mask.shape[1] != 1 or tuple(mask.shape[2:]) != (q_len, kv_len):
        raise ValueError(
            f"attention_mask must have shape (B, 1, {q_len}, {kv_len}) (one mask for all "
            f"heads), got {tuple(mask.shape)}"
        )
    if mask.dtype == torch.bool:
        return mask
    if not mask.is_floating_point():
        raise TypeError(f"attention_mask must be bool or floating point, got {mask.dtype}")
    blocked = mask <= torch.finfo(mask.dtype).min  # also -inf
    if not bool((blocked | (mask == 0)).all()):
        raise _not_expressible("an additive attention_mask with values other than 0 and -inf")
    return ~blocked


def _from_tensor(mask: Tensor, q_len: int, kv_len: int, *, is_causal: bool) -> DilatedMask:
    """Read ``mask`` as causal (or full) attention with key padding, and check it is."""
    visible = _visible_from_tensor(mask, q_len, kv_len)
    q_offset = _queries_last(q_len, kv_len)
    if is_causal:  # q_offset: max over rows of (last key seen - row), exact once a query
        # sees its own position (every real token does; a static cache's empty slots do not)
        keys = torch.arange(kv_len, device=mask.device)
        last = torch.where(visible, keys, -1).amax(-1)  # (B, 1, S_q)
        reach = last - torch.arange(q_len, device=mask.device)
        if bool((last >= 0).any()):
            q_offset = int(reach[last >= 0].max())
    seen_by = visible[:, 0, -1 if is_causal else 0]  # (B, S_kv): a key this row misses is padding
    candidate = DilatedMask(is_causal, q_offset, ~seen_by)
    if not 0 <= q_offset <= kv_len - q_len or not torch.equal(
        visible, candidate.visible(q_len, kv_len, mask.device).expand_as(visible)
    ):
        raise _not_expressible(f"the {'causal ' if is_causal else ''}attention_mask")
    return candidate


def _read_mask(attention_mask: object, q_len: int, kv_len: int, *, is_causal: bool) -> DilatedMask:
    if isinstance(attention_mask, DilatedMask):
        return attention_mask
    if attention_mask is None:
        return DilatedMask(is_causal, _queries_last(q_len, kv_len))
    if not isinstance(attention_mask, Tensor):
        raise TypeError(
            "attention_mask must be a DilatedMask, a 4-D tensor or None, got "
            f"{type(attention_mask).__name__} (was the model built for another implementation?)"
        )
    return _from_tensor(attention_mask, q_len, kv_len, is_causal=is_causal)


def _mask_builder(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int | Tensor = 0,
    kv_offset: int = 0,
    mask_function: Callable[..., Any] = causal_mask_function,
    attention_mask: Tensor | DilatedMask | None = None,
    **kwargs: Any,
) -> DilatedMask:
    """transformers' mask interface: the mask of every layer of a forward, as a DilatedMask.

    ``attention_mask`` is the 2-D padding mask ``(B, >= S_kv)`` (``True`` = token), or the
    DilatedMask this builder made for the same forward (``generate`` with a static cache
    builds it ahead), returned as it is once its query offset is checked.
    """
    if kv_offset != 0:
        raise ValueError(
            f"keys must start at position 0, got kv_offset={kv_offset} (a sliding-window "
            "cache): dilated attention replaces sliding windows; use a cache whose keys "
            "start at position 0 (cache_implementation='dynamic' or 'static', without "
            "sliding-window layers)"
        )
    if isinstance(attention_mask, DilatedMask):
        if attention_mask.q_offset != int(q_offset):
            raise ValueError(
                f"the DilatedMask passed as attention_mask has q_offset={attention_mask.q_offset}"
                f", but the cache puts the queries at {int(q_offset)}"
            )
        return attention_mask
    padding = None
    if attention_mask is not None:  # a static cache's mask is shorter than its keys
        short = max(kv_length - attention_mask.shape[-1], 0)
        padding = ~F.pad(attention_mask, (0, short))[:, :kv_length]
        if not torch.compiler.is_compiling() and not bool(padding.any()):
            padding = None
    offset = int(q_offset)
    if mask_function is causal_mask_function or mask_function is bidirectional_mask_function:
        return DilatedMask(mask_function is causal_mask_function, offset, padding)
    dense = sdpa_mask(
        batch_size=batch_size,
        q_length=q_length,
        kv_length=kv_length,
        q_offset=offset,
        kv_offset=kv_offset,
        mask_function=mask_function,
        attention_mask=attention_mask,
        allow_is_causal_skip=False,
        use_vmap=kwargs.get("use_vmap", False),
        device=kwargs.get("device", "cpu"),
    )
    assert dense is not None  # (B, 1, S_q, S_kv) bool: no skips allowed
    for is_causal in (True, False):
        candidate = DilatedMask(is_causal, offset, padding)
        seen = candidate.visible(q_length, kv_length, dense.device)
        if torch.equal(dense, seen.expand_as(dense)):
            return candidate
    raise _not_expressible("the model's mask")


def _branches(
    module: nn.Module, default: DilatedConfig | None, head_offsets: HeadOffsets
) -> DilatedConfig:
    """The layer's configuration: its model config's attribute, else ``register``'s."""
    options = getattr(getattr(module, "config", None), CONFIG_ATTRIBUTE, None)
    if options is None:
        if default is None:
            raise ValueError(
                "no dilated attention configuration: pass segment_lengths and dilation_rates "
                f"to register(), or set config.{CONFIG_ATTRIBUTE} = "
                "{'segment_lengths': [...], 'dilation_rates': [...]}"
            )
        return default
    keys = {"segment_lengths", "dilation_rates", "head_offsets"}
    if (
        not isinstance(options, Mapping)
        or not {"segment_lengths", "dilation_rates"} <= options.keys() <= keys
    ):
        raise ValueError(
            f"config.{CONFIG_ATTRIBUTE} must be a dict with segment_lengths, dilation_rates "
            f"and optionally head_offsets, got {options!r}"
        )
    return DilatedConfig(
        options["segment_lengths"],
        options["dilation_rates"],
        options.get("head_offsets", head_offsets),
    )


def _refuse_unsupported(kwargs: Mapping[str, Any]) -> None:
    for name, what in _UNSUPPORTED.items():
        if kwargs.get(name) is not None:
            raise ValueError(f"{name}={kwargs[name]!r}: dilated attention does not support {what}")
    if kwargs.get("output_attentions"):
        raise ValueError(
            "output_attentions=True: dilated attention never builds the attention weights; "
            "use attn_implementation='eager' to inspect them"
        )


def register(
    segment_lengths: Sequence[int] | None = None,
    dilation_rates: Sequence[int] | None = None,
    *,
    name: str = "dilated",
    head_offsets: HeadOffsets = "cyclic",
    backend: _Backend = "auto",
) -> None:
    """Make ``attn_implementation=name`` run dilated attention in transformers' models.

    Args:
        segment_lengths, dilation_rates: the branches ``(w_i, r_i)`` for models whose config
            has no ``dilated_attention`` attribute (that attribute wins); both or neither.
        name: the implementation's name; not one of transformers' own (``"sdpa"``, ...).
            Registering a name again replaces it.
        head_offsets: ``"cyclic"`` (the paper) or ``"grouped"`` (torchscale's), unless the
            config attribute says otherwise.
        backend: as in :func:`dilattn.dilated_attention` (``"auto"``: flex on CUDA, math
            elsewhere); attention dropout in training needs ``"math"``.

    Each layer calls :func:`dilattn.dilated_attention` with the layer's ``scaling``, dropout
    and key/value heads; the mask rules are in this module's docstring.
    """
    if not isinstance(name, str) or not name or name in _BUILTIN_NAMES:
        raise ValueError(f"name must be a new implementation name, got {name!r}")
    if (segment_lengths is None) != (dilation_rates is None):
        raise ValueError(
            "pass segment_lengths and dilation_rates together, or neither (then every model "
            f"config must have the attribute {CONFIG_ATTRIBUTE!r})"
        )
    if head_offsets not in ("cyclic", "grouped"):
        raise ValueError(f"head_offsets must be 'cyclic' or 'grouped', got {head_offsets!r}")
    if backend not in ("auto", "flex", "math"):
        raise ValueError(f"backend must be 'auto', 'flex' or 'math', got {backend!r}")
    default = None
    if segment_lengths is not None and dilation_rates is not None:
        default = DilatedConfig.of(segment_lengths, dilation_rates, head_offsets)

    def attention(
        module: nn.Module,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: DilatedMask | Tensor | None,
        scaling: float | None = None,
        dropout: float = 0.0,
        **kwargs: Any,
    ) -> tuple[Tensor, None]:
        """``(B, H, S_q, D)`` query, ``(B, H_kv, S_kv, D)`` key/value -> ``(B, S_q, H, D)``."""
        _refuse_unsupported(kwargs)
        config = _branches(module, default, head_offsets)
        is_causal = kwargs.get("is_causal")
        is_causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
        mask = _read_mask(attention_mask, query.shape[2], key.shape[2], is_causal=bool(is_causal))
        padding = mask.key_padding_mask
        if padding is not None and padding.shape[0] != query.shape[0]:
            padding = padding.expand(query.shape[0], -1)
        out = dilated_attention(
            query,
            key,
            value,
            config.segment_lengths,
            config.dilation_rates,
            is_causal=mask.is_causal,
            scale=scaling,
            enable_gqa=query.shape[1] != key.shape[1],
            head_offsets=config.head_offsets,
            backend=backend,
            key_padding_mask=padding,
            q_offset=mask.q_offset,
            dropout_p=dropout,
        )
        assert isinstance(out, Tensor)
        return out.transpose(1, 2).contiguous(), None

    attention.__name__ = f"dilattn_{name}"
    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, _mask_builder)
