"""FlexAttention mask and score mods for dilated attention, and the one-line ``flex_mask``.

The merged result of all branches equals ONE softmax over all keys with the additive bias
``log m(h, p, p')``, where ``m`` counts the branches in which query ``p`` sees key ``p'``
(docs/maths.md). So the union of the branch masks as ``mask_mod`` and ``+ log m`` as
``score_mod`` make a single ``flex_attention`` call exactly dilated attention.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import (
    BlockMask,
    _mask_mod_signature,
    _score_mod_signature,
    and_masks,
)

from dilattn._checks import as_device, check_bool, check_score_mod
from dilattn._varlen import check_variable_lengths, visibility_mask_mod
from dilattn.config import DilatedConfig, HeadOffsets, sliding_window
from dilattn.engines.blocks import block_mask_from_spans, union_spans, union_width
from dilattn.engines.window import window_spans, window_width

__all__ = ["FlexMask", "dilated_mask_mod", "dilated_score_mod", "flex_mask"]


def _name(config: DilatedConfig, is_causal: bool) -> str:
    w = "-".join(map(str, config.segment_lengths))
    r = "-".join(map(str, config.dilation_rates))
    kind = "" if config.head_offsets == "cyclic" else f"_{config.head_offsets}"
    local = "" if config.local_window is None else f"_local{config.local_window}"
    return f"dilated{'_causal' if is_causal else ''}_w{w}_r{r}{kind}{local}"


def _owned(offsets: tuple[int, ...]) -> tuple[int, int]:
    """The heads ``[lo, hi)`` that compute a branch: contiguous, all of them unless "split"."""
    owned = [h for h, o in enumerate(offsets) if o >= 0]
    return (owned[0], owned[-1] + 1) if owned else (0, 0)


def _multiplicity_fn(
    config: DilatedConfig, num_heads: int
) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """``m(h, q, kv)`` on index tensors: the number of branches in which ``q`` sees ``kv``."""
    grouped = config.head_offsets == "grouped"
    branches = [(w, r, math.ceil(num_heads / r)) for w, r in config.branches]
    owners = [_owned(offsets) for offsets in config.offsets(num_heads)]
    local = None if config.local_window is None else sliding_window(config.local_window, False)

    def count(h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        total = None
        for (w, r, group), (lo, hi) in zip(branches, owners, strict=True):
            offset = h // group if grouped else h % r
            hit = (
                (q_idx // w == kv_idx // w)
                & ((q_idx % w) % r == offset)
                & ((kv_idx % w) % r == offset)
            )
            if (lo, hi) != (0, num_heads):
                hit = hit & (h >= lo) & (h < hi)
            total = hit.to(torch.int32) if total is None else total + hit.to(torch.int32)
        assert total is not None  # a config has at least one branch
        return total if local is None else total + local.visible(q_idx, kv_idx).to(torch.int32)

    return count


def dilated_mask_mod(
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    *,
    num_heads: int,
    is_causal: bool = False,
    head_offsets: HeadOffsets = "cyclic",
    local_window: int | None = None,
) -> _mask_mod_signature:
    """A flex ``mask_mod``: query ``q_idx`` sees ``kv_idx`` for head ``h`` iff some branch
    ``(w, r)`` holds both in one segment (``q_idx // w == kv_idx // w``) with both taking part
    (``(idx % w) % r == offset(h, r)``) or ``|q_idx - kv_idx| <= local_window``, and, when
    causal, ``kv_idx <= q_idx``. ``h`` is the query head; ``num_heads`` the number of query
    heads."""
    check_bool("is_causal", is_causal)
    config = DilatedConfig.of(segment_lengths, dilation_rates, head_offsets, local_window)
    count = _multiplicity_fn(config, num_heads)

    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        seen = count(h, q_idx, kv_idx) > 0
        return seen & (kv_idx <= q_idx) if is_causal else seen

    mask_mod.__name__ = _name(config, is_causal)
    return mask_mod


def dilated_score_mod(
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    *,
    num_heads: int,
    head_offsets: HeadOffsets = "cyclic",
    local_window: int | None = None,
) -> _score_mod_signature:
    """A flex ``score_mod`` adding ``log m(h, q_idx, kv_idx)``: the log of the number of branches
    (the local window included) in which the query sees the key (``-inf`` where none does)."""
    config = DilatedConfig.of(segment_lengths, dilation_rates, head_offsets, local_window)
    count = _multiplicity_fn(config, num_heads)

    def score_mod(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return score + torch.log(count(h, q_idx, kv_idx).to(score.dtype))

    score_mod.__name__ = "log_multiplicity_" + _name(config, False).removeprefix("dilated_")
    return score_mod


_FLEX_KEYS = ("block_mask", "score_mod")


@dataclass(frozen=True, eq=False)
class FlexMask(Mapping[str, "BlockMask | _score_mod_signature"]):
    """What ``flex_attention`` needs to compute dilated attention in one call, as ONE object.

    Pass it whole, as keyword arguments::

        out = flex_attention(q, k, v, **m)  # block_mask=m.block_mask, score_mod=m.score_mod

    The ``score_mod`` (``+ log m``) is part of the definition: the block mask alone computes
    something else, silently. So a ``FlexMask`` is a read-only mapping with exactly the keys
    ``"block_mask"`` and ``"score_mod"`` (``**m`` passes both); the attributes
    ``m.block_mask`` and ``m.score_mod`` read the same values. It is not a tuple: unpacking
    ``a, b = m`` gives the two key names.
    """

    block_mask: BlockMask
    score_mod: _score_mod_signature

    def __getitem__(self, key: str) -> BlockMask | _score_mod_signature:
        if key not in _FLEX_KEYS:
            raise KeyError(key)
        value: BlockMask | _score_mod_signature = getattr(self, key)
        return value

    def __iter__(self) -> Iterator[str]:
        return iter(_FLEX_KEYS)

    def __len__(self) -> int:
        return len(_FLEX_KEYS)


def flex_mask(
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    *,
    q_len: int,
    kv_len: int | None = None,
    num_heads: int,
    is_causal: bool = False,
    head_offsets: HeadOffsets = "cyclic",
    block_size: int = 128,
    device: torch.device | str | None = None,
    key_padding_mask: Tensor | None = None,
    document_ids: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
    score_mod: _score_mod_signature | None = None,
    local_window: int | None = None,
) -> FlexMask:
    """Dilated attention as one ``flex_attention`` call: the one-line mask.

    Example::

        m = dilattn.flex_mask([2048, 4096], [1, 2], q_len=S, num_heads=H, device="cuda")
        out = flex_attention(q, k, v, **m)  # pass m whole: its block_mask AND its score_mod
        # out: (B, H, S, D), exactly dilattn.dilated_attention(q, k, v, [2048, 4096], [1, 2])

    Args:
        segment_lengths, dilation_rates: the branches ``(w_i, r_i)``.
        q_len, kv_len: sequence lengths of query and key (``kv_len`` defaults to ``q_len``);
            positions are aligned at 0 for both, as in SDPA and flex.
        num_heads: query heads (with GQA, pass ``enable_gqa=True`` to ``flex_attention``);
            see "Head count" below.
        is_causal: mask keys after the query.
        head_offsets: ``"cyclic"`` (``h % r``, the paper), ``"grouped"`` (torchscale) or
            ``"split"`` (each head computes one branch).
        block_size: flex's sparse block size (both axes); compiled flex on CUDA needs one
            that divides 128.
        device: where the block mask lives (the device of q, k, v; default: that of the
            tensors below, else the CPU). A CUDA device this torch cannot use raises
            ``ValueError``.
        key_padding_mask: ``(B, S_kv)`` bool, ``True`` = padding key (ignored).
        document_ids: ``(B, max(q_len, kv_len))`` integers: a query sees only keys of its own
            document (segments are NOT restarted per document).
        cu_seqlens: ``(n + 1,)`` cumulative document lengths, instead of ``document_ids``.
        score_mod: your ``score_mod(score, b, h, q_idx, kv_idx)``, applied to the scaled
            score before ``+ log m`` (e.g. :func:`dilattn.alibi_score_mod`).
        local_window: ``n``: a local branch ``|q_idx - kv_idx| <= n`` counted in ``m`` like
            a dilated one (its blocks are in the block mask).

    Returns:
        ``FlexMask(block_mask, score_mod)``, a mapping to call ``flex_attention(q, k, v, **m)``
        with. The block mask is built analytically from block intervals, is shared by all
        heads and batch rows (``B = H = 1``), and stays small at 1M tokens. Every block it
        marks full is fully visible for every head (with ``"split"``, a block is full only
        where it is full in every branch). Padding and documents are conditions of its
        ``mask_mod``: every touched block is then partial (they do not prune blocks).

    Head count:
        The mask is made for ``num_heads`` query heads, and ``flex_attention`` checks no head
        count against a block mask (one of head dim 1, as this one, broadcasts; compiled
        kernels read block-mask head ``h % H``). Pass the number of heads of ``q``: with
        ``"grouped"`` or ``"split"`` offsets another count computes another function.

    Equivalent PyTorch code: ``dilattn.reference.dilated_attention_dense``.
    """
    check_bool("is_causal", is_causal)
    config = DilatedConfig.of(segment_lengths, dilation_rates, head_offsets, local_window)
    kv_len = q_len if kv_len is None else kv_len
    for name, value in (
        ("q_len", q_len),
        ("kv_len", kv_len),
        ("num_heads", num_heads),
        ("block_size", block_size),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    check_score_mod(score_mod)
    given = [x for x in (key_padding_mask, document_ids, cu_seqlens) if isinstance(x, Tensor)]
    dev = as_device(device if device is not None or not given else given[0].device)
    _check_cuda(dev, device)
    batched = [x for x in (key_padding_mask, document_ids) if isinstance(x, Tensor)]
    padding, documents = check_variable_lengths(
        key_padding_mask,
        document_ids,
        cu_seqlens,
        batch=batched[0].shape[0] if batched else 1,
        q_len=q_len,
        kv_len=kv_len,
        q_offset=0,
        device=dev,
    )
    # the branches some head computes (with "split" and fewer heads than branches, not all)
    computed = [
        branch
        for branch, offsets in zip(config.branches, config.offsets(num_heads), strict=True)
        if max(offsets) >= 0
    ]
    rows, cols = (
        union_spans(
            computed,
            this_len=this,
            other_len=other,
            block_size=block_size,
            causal_sign=sign * int(is_causal),
            device=dev,
            one_per_head=head_offsets == "split",
        )
        for this, other, sign in ((q_len, kv_len, 1), (kv_len, q_len, -1))
    )
    width = union_width(computed, block_size)
    if local_window is not None:
        window = sliding_window(local_window, is_causal)
        local_rows, local_cols = window_spans(
            window, q_len=q_len, kv_len=kv_len, q_offset=0, block_size=block_size, device=dev
        )
        rows, cols = rows.union(local_rows), cols.union(local_cols)
        width = max(width, window_width(window, block_size))
    mask_mod = dilated_mask_mod(
        config.segment_lengths,
        config.dilation_rates,
        num_heads=num_heads,
        is_causal=is_causal,
        head_offsets=head_offsets,
        local_window=local_window,
    )
    visible = visibility_mask_mod(padding, documents)
    if visible is not None:
        name = f"{mask_mod.__name__}_and_{visible.__name__}"
        mask_mod = and_masks(mask_mod, visible)
        mask_mod.__name__ = name
        rows, cols = rows.without_full(), cols.without_full()
    block_mask = block_mask_from_spans(
        rows,
        cols,
        seq_lengths=(q_len, kv_len),
        block_size=block_size,
        mask_mod=mask_mod,
        widths=(width, width),
    )
    log_m = dilated_score_mod(
        config.segment_lengths,
        config.dilation_rates,
        num_heads=num_heads,
        head_offsets=head_offsets,
        local_window=local_window,
    )
    full_mod = log_m if score_mod is None else _then(score_mod, log_m)
    return FlexMask(block_mask, full_mod)


def _check_cuda(dev: torch.device, device: object) -> None:
    """A CUDA ``dev`` must be usable: ``ValueError`` naming ``device`` (torch would raise an
    ``AssertionError`` "Torch not compiled with CUDA enabled" deep inside)."""
    if dev.type != "cuda":
        return
    if not torch.cuda.is_available():
        raise ValueError(
            f"device={device!r}: this torch cannot use CUDA (torch.cuda.is_available() is "
            "False); pass device='cpu' or the device of q, k, v"
        )
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(
            f"device={device!r}: there are only {torch.cuda.device_count()} CUDA devices"
        )


def _then(first: _score_mod_signature, second: _score_mod_signature) -> _score_mod_signature:
    """The score mod applying ``first``, then ``second``."""

    def composed(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return second(first(score, b, h, q_idx, kv_idx), b, h, q_idx, kv_idx)

    composed.__name__ = f"{getattr(first, '__name__', 'score_mod')}_then_{second.__name__}"
    return composed
