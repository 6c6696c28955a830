"""Analytic ``BlockMask`` construction from per-block index intervals.

A ``BlockMask`` lists, for each query block, the key blocks to visit (partial: the
``mask_mod`` runs; full: it is skipped), and the transpose for the backward pass. Every mask
in dilattn has, for each block of one axis, ONE contiguous interval of touched blocks on the
other axis with ONE contiguous interval of full blocks inside it, so the whole mask follows
from four integers per block, computed with a few vectorised ops instead of evaluating the
mask on every block pair (which ``create_block_mask`` does, O(S^2)).

Each side must be sound: touched covers every block pair with a visible entry, full holds
only pairs whose entries are all visible. Tests check both against ``create_block_mask``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, _mask_mod_signature, and_masks, noop_mask

# Masks with at most this many block pairs keep index rows as wide as the other axis, the
# layout torch's own BlockMask helpers (``to_dense``, ``print``) expect; larger ones keep only
# as many columns as the longest row needs, so a 1M-token mask costs megabytes, not gigabytes.
_DENSE_LAYOUT_PAIRS = 1 << 20


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class Spans(NamedTuple):
    """Per block of one axis ``(B, H, n)``: touched blocks ``[lo, hi)`` of the other axis, and
    the full ones ``[full_lo, full_hi)`` within them (empty when ``full_lo >= full_hi``)."""

    lo: Tensor
    hi: Tensor
    full_lo: Tensor
    full_hi: Tensor

    def without_full(self) -> Spans:
        """The same touched blocks, none of them full (so the ``mask_mod`` runs on all)."""
        return self._replace(full_hi=self.full_lo)

    def union(self, other: Spans) -> Spans:
        """The spans of the union of two masks; sound when, per block, the two touched (and
        the two full) intervals overlap or meet wherever both are non-empty."""

        def join(lo: Tensor, hi: Tensor, lo2: Tensor, hi2: Tensor) -> tuple[Tensor, Tensor]:
            one, two = lo < hi, lo2 < hi2
            both = one & two
            new_lo = torch.where(both, torch.minimum(lo, lo2), torch.where(one, lo, lo2))
            new_hi = torch.where(both, torch.maximum(hi, hi2), torch.where(one, hi, hi2))
            return new_lo, new_hi

        return Spans(
            *join(self.lo, self.hi, other.lo, other.hi),
            *join(self.full_lo, self.full_hi, other.full_lo, other.full_hi),
        )


def _ordered(spans: Spans, n_other: int, width: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(num_blocks, indices, full_num_blocks, full_indices)`` as ``BlockMask`` stores them,
    index rows ``width`` wide (outside compilation: as wide as the longest row needs)."""
    lo, hi, full_lo, full_hi = torch.broadcast_tensors(*spans)  # type: ignore[no-untyped-call]
    hi = torch.maximum(hi, lo)
    has_full = full_lo < full_hi
    full_lo = torch.where(has_full, full_lo, lo)
    full_hi = torch.where(has_full, full_hi, lo)
    before = full_lo - lo  # partial blocks left of the full run
    num, full_num = before + (hi - full_hi), full_hi - full_lo
    widths = (width, width)
    if not torch.compiler.is_compiling():
        widths = (max(int(num.max()), 1), max(int(full_num.max()), 1))

    def listed(start: Tensor, jump_at: Tensor, jump_to: Tensor, width: int) -> Tensor:
        i = torch.arange(width, device=lo.device)
        at = start.unsqueeze(-1) + i
        after = jump_to.unsqueeze(-1) + i - jump_at.unsqueeze(-1)
        index = torch.where(i < jump_at.unsqueeze(-1), at, after)
        return index.clamp(0, n_other - 1).to(torch.int32).contiguous()

    return (
        num.to(torch.int32).contiguous(),
        listed(lo, before, full_hi, widths[0]),
        full_num.to(torch.int32).contiguous(),
        listed(full_lo, full_num, full_lo + full_num, widths[1]),
    )


def block_mask_from_spans(
    rows: Spans,
    cols: Spans,
    *,
    seq_lengths: tuple[int, int],
    block_size: int,
    mask_mod: _mask_mod_signature,
    widths: tuple[int, int],
) -> BlockMask:
    """Build a ``BlockMask`` from the spans of each query block (``rows``) and of each key
    block (``cols``, the transpose). Under compilation, ``widths`` bound how many blocks one
    query (key) block touches on the other axis."""
    n_q, n_kv = cdiv(seq_lengths[0], block_size), cdiv(seq_lengths[1], block_size)
    dense = n_q * n_kv <= _DENSE_LAYOUT_PAIRS
    kv = _ordered(rows, n_kv, n_kv if dense else min(widths[0], n_kv))
    q = _ordered(cols, n_q, n_q if dense else min(widths[1], n_q))
    if dense:  # torch's layout: every index row lists all blocks
        kv, q = _widen(kv, n_kv), _widen(q, n_q)
    return BlockMask(
        seq_lengths=seq_lengths,
        kv_num_blocks=kv[0],
        kv_indices=kv[1],
        full_kv_num_blocks=kv[2],
        full_kv_indices=kv[3],
        q_num_blocks=q[0],
        q_indices=q[1],
        full_q_num_blocks=q[2],
        full_q_indices=q[3],
        BLOCK_SIZE=(block_size, block_size),
        mask_mod=mask_mod,
    )


def and_mask_mod(block_mask: BlockMask, mask_mod: _mask_mod_signature) -> BlockMask:
    """``block_mask``'s blocks with ``mask_mod`` and-ed into its own (a call's padding or
    documents into a mask built once); build ``block_mask`` with no full blocks, so the new
    condition runs on every touched block. ``block_mask`` itself is left as it was. A new
    ``BlockMask`` over the same tensors (not ``copy.copy``, which dynamo cannot trace)."""
    return BlockMask(
        seq_lengths=block_mask.seq_lengths,
        kv_num_blocks=block_mask.kv_num_blocks,
        kv_indices=block_mask.kv_indices,
        full_kv_num_blocks=block_mask.full_kv_num_blocks,
        full_kv_indices=block_mask.full_kv_indices,
        q_num_blocks=block_mask.q_num_blocks,
        q_indices=block_mask.q_indices,
        full_q_num_blocks=block_mask.full_q_num_blocks,
        full_q_indices=block_mask.full_q_indices,
        BLOCK_SIZE=block_mask.BLOCK_SIZE,
        mask_mod=and_masks(block_mask.mask_mod, mask_mod),
    )


def dense_block_indices(touched: Tensor, full: Tensor) -> tuple[Tensor, ...]:
    """``BlockMask``'s eight index tensors (kv side, then q side; partial, then full) from
    bool block matrices ``(B, H, n_q, n_kv)`` (broadcast together): ``touched`` block pairs
    hold a visible entry, ``full`` ones (a subset) only visible entries."""
    touched, full = torch.broadcast_tensors(touched, full)  # type: ignore[no-untyped-call]
    partial = touched & ~full

    def ordered(blocks: Tensor) -> tuple[Tensor, Tensor]:
        num = blocks.sum(-1, dtype=torch.int32)
        index = torch.argsort(blocks.to(torch.uint8), dim=-1, descending=True, stable=True)
        return num.contiguous(), index.to(torch.int32).contiguous()

    sides = (partial, full, partial.transpose(-1, -2), full.transpose(-1, -2))
    return tuple(x for blocks in sides for x in ordered(blocks))


def block_mask_from_indices(
    indices: Sequence[Tensor],
    *,
    seq_lengths: tuple[int, int],
    block_size: int,
    mask_mod: _mask_mod_signature | None,
) -> BlockMask:
    """A ``BlockMask`` from the eight tensors of :func:`dense_block_indices`."""
    kv, kv_idx, full_kv, full_kv_idx, q, q_idx, full_q, full_q_idx = indices
    return BlockMask(
        seq_lengths=seq_lengths,
        kv_num_blocks=kv,
        kv_indices=kv_idx,
        full_kv_num_blocks=full_kv,
        full_kv_indices=full_kv_idx,
        q_num_blocks=q,
        q_indices=q_idx,
        full_q_num_blocks=full_q,
        full_q_indices=full_q_idx,
        BLOCK_SIZE=(block_size, block_size),
        mask_mod=noop_mask if mask_mod is None else mask_mod,
    )


def _widen(
    ordered: tuple[Tensor, Tensor, Tensor, Tensor], n: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Pad index rows to ``n`` columns with the blocks not listed, as ``create_block_mask``."""

    def pad(num: Tensor, index: Tensor) -> Tensor:
        listed = torch.arange(index.shape[-1], device=index.device) < num.unsqueeze(-1)
        seen = torch.zeros((*index.shape[:-1], n + 1), dtype=torch.bool, device=index.device)
        seen.scatter_(-1, torch.where(listed, index.long(), n), True)
        rest = torch.argsort(seen[..., :n].to(torch.int8), dim=-1, stable=True)  # unlisted first
        return torch.cat([index, rest], -1)[..., :n].to(torch.int32).contiguous()

    num, index, full_num, full_index = ordered
    return num, pad(num, index), full_num, pad(full_num, full_index)


def union_spans(
    branches: Sequence[tuple[int, int]],
    *,
    this_len: int,
    other_len: int,
    block_size: int,
    causal_sign: int,
    device: torch.device,
    one_per_head: bool = False,
) -> Spans:
    """Spans of the union of dilated branches, for the blocks of one axis ``(1, 1, n)``.

    Ignoring which rows take part (every block of ``block_size >= r`` rows has some), block
    ``[a, z]`` of this axis touches the rows of the other axis that share a segment of some
    branch with it; with ``causal_sign = +1`` (this axis holds queries) only keys starting at
    or before ``z``, with ``-1`` (this axis holds keys) only queries ending at or after ``a``.
    Full blocks are those that some ``r = 1`` branch holds in one segment together with this
    block; causal full blocks lie strictly off the block diagonal. Every branch's touched
    interval contains the block at this block's own position, and every full run starts at or
    before it and ends at or after it (block-aligned segments), so both unions are one interval,
    and "full" is the same pair predicate seen from either axis: the two sides are transposes.

    ``one_per_head``: each head computes only ONE of ``branches`` (``head_offsets="split"``;
    pass only the branches some head computes), and the spans are shared by all heads. A block
    is then full only when it is full for every head, i.e. full in EVERY branch (all of rate 1):
    the intersection of the full runs, still one interval per block and still a pair predicate.
    """
    bs = block_size
    n_other = cdiv(other_len, bs)
    blk = torch.arange(cdiv(this_len, bs), device=device)
    a = blk * bs
    z = torch.clamp(a + bs, max=this_len) - 1
    lo = torch.full_like(blk, n_other)
    hi = torch.zeros_like(blk)
    if one_per_head:  # everything, until a branch has no full run there
        full_lo, full_hi = torch.zeros_like(blk), torch.full_like(blk, n_other)
    else:  # empty until a branch has a full run
        full_lo, full_hi = torch.full_like(blk, n_other), torch.zeros_like(blk)
    for w, r in branches:
        first, last = a // w, z // w  # segments this block overlaps
        seg_a = first * w
        seg_z = torch.clamp((last + 1) * w, max=other_len) - 1
        b_lo, b_hi = seg_a // bs, seg_z // bs + 1
        if causal_sign > 0:
            b_hi = torch.minimum(b_hi, z // bs + 1)
        elif causal_sign < 0:
            b_lo = torch.maximum(b_lo, blk)
        touched = (seg_a <= seg_z) & (b_lo < b_hi)
        lo = torch.where(touched, torch.minimum(lo, b_lo), lo)
        hi = torch.where(touched, torch.maximum(hi, b_hi), hi)
        if r != 1:
            if one_per_head:  # rate > 1: no block counts as full in this branch, nor overall
                full_hi = full_lo
            continue
        f_z = torch.clamp((first + 1) * w, max=other_len) - 1
        f_lo = (seg_a + bs - 1) // bs
        f_hi = torch.where(f_z == other_len - 1, n_other, (f_z + 1) // bs)
        if causal_sign > 0:
            f_hi = torch.minimum(f_hi, blk)
        elif causal_sign < 0:
            f_lo = torch.maximum(f_lo, blk + 1)
        has_run = (first == last) & (f_lo < f_hi)
        if one_per_head:
            full_lo = torch.maximum(full_lo, f_lo)
            full_hi = torch.where(has_run, torch.minimum(full_hi, f_hi), full_lo)
        else:
            full_lo = torch.where(has_run, torch.minimum(full_lo, f_lo), full_lo)
            full_hi = torch.where(has_run, torch.maximum(full_hi, f_hi), full_hi)
    lo = torch.minimum(lo, hi)
    if one_per_head:  # an empty intersection as an empty union: (n_other, 0)
        empty = full_lo >= full_hi
        full_lo = torch.where(empty, n_other, full_lo)
        full_hi = torch.where(empty, 0, full_hi)
    return Spans(*(x.view(1, 1, -1) for x in (lo, hi, full_lo, full_hi)))


def union_width(branches: Sequence[tuple[int, int]], block_size: int) -> int:
    """How many blocks of the other axis one block can touch in :func:`union_spans`."""
    longest = max(w for w, _ in branches)
    return (block_size + 2 * longest) // block_size + 2


def prefix_spans(
    valid_lo: Tensor,
    valid_hi: Tensor,
    *,
    length: int,
    block_size: int,
    is_causal: bool,
    q_length: int | None = None,
    q_start: tuple[Tensor, Tensor] | None = None,
) -> tuple[Spans, Spans]:
    """Row and column spans of attention of ``q_length`` query rows (default ``length``) over
    ``length`` keys where, for batch row ``b``, the keys ``[0, valid)`` are visible with
    ``valid`` between ``valid_lo[b]`` and ``valid_hi[b]`` over the heads and, when causal, only
    keys at or before the query. Query row ``t`` stands at key row ``start + t``, ``start``
    between ``q_start = (lo[b], hi[b])`` over the heads (default 0). ``(B, 1, n)`` each."""
    bs = block_size
    q_length = length if q_length is None else q_length
    n_q, n_kv = cdiv(q_length, bs), cdiv(length, bs)
    start_lo: Tensor | int = 0
    start_hi: Tensor | int = 0
    if q_start is not None:
        start_lo, start_hi = (x.view(-1, 1, 1) for x in q_start)
    q_blk = torch.arange(n_q, device=valid_lo.device).view(1, 1, -1)
    kv_blk = torch.arange(n_kv, device=valid_lo.device).view(1, 1, -1)
    touch_hi = ((valid_hi + bs - 1) // bs).view(-1, 1, 1)  # key blocks with a visible key
    full_hi = torch.where(valid_lo == length, n_kv, valid_lo // bs).view(-1, 1, 1)  # all visible
    zero_q, zero_kv = torch.zeros_like(q_blk), torch.zeros_like(kv_blk)
    if not is_causal:
        rows = Spans(zero_q, touch_hi, zero_q, full_hi)
        cols = Spans(
            zero_kv,
            torch.where(kv_blk < touch_hi, n_q, 0),
            zero_kv,
            torch.where(kv_blk < full_hi, n_q, 0),
        )
        return rows, cols
    # query block i holds rows [i*bs, i*bs + bs); key block j is touched when its first key is
    # at or before the block's last query, full when its last key is at or before the first
    rows = Spans(
        zero_q,
        torch.minimum(touch_hi, (start_hi + q_blk * bs + bs - 1) // bs + 1),
        zero_q,
        torch.minimum(full_hi, (start_lo + q_blk * bs + 1) // bs),
    )
    first_q = torch.clamp((kv_blk * bs - start_hi) // bs, 0, n_q)
    full_q = torch.clamp((kv_blk * bs + 2 * bs - 2 - start_lo) // bs, 0, n_q)  # ceil
    cols = Spans(
        first_q,
        torch.where(kv_blk < touch_hi, n_q, first_q),
        full_q,
        torch.where(kv_blk < full_hi, n_q, full_q),
    )
    return rows, cols
