"""Local windows: the rule, its analytic block mask, and attention over it (flex or math).

A window decides from positions alone which keys a query sees (query at ``p``, key at
``p'``; query row ``i`` stands at ``p = q_offset + i``, key ``j`` at ``p' = j``):

* sliding (``exact``): ``p - backward * size <= p' <= p + forward * size``;
* bucketed: positions fall in buckets ``p // size``; a query of bucket ``b`` sees the keys of
  buckets ``b - backward .. b + forward`` (``local-attention``'s look-around);
* causal: besides, ``p' <= p``.

Both bounds of the visible keys are nondecreasing in ``p`` (and those of the queries that see
a key in ``p'``), so per block of rows, the touched and the fully visible blocks of the other
axis are single intervals, read off the bounds at the block's first and last row: the
``BlockMask`` costs O(S / block) and lists only the blocks in the window.

Shape legend: ``B`` batch, ``H`` query heads, ``K`` key/value heads, ``G = H / K``, ``n`` query
chunks of ``C`` rows, ``L`` keys per chunk, ``D`` head dim.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor
from torch.nn.attention.flex_attention import (
    BlockMask,
)

from dilattn._softmax import softmax_with_lse
from dilattn.config import Window
from dilattn.engines.blocks import Spans, and_mask_mod, block_mask_from_spans, cdiv
from dilattn.engines.gather import BLOCK_SIZE, NO_MODS, Backend, PositionMods, _run_flex


def _axis_spans(
    bounds: Any,
    this_len: int,
    other_len: int,
    this_start: int,
    other_start: int,
    bs: int,
    device: torch.device | str,
) -> Spans:
    """Spans of the blocks of one axis (``this_len`` rows, row ``t`` at ``this_start + t``)
    over the other (row ``u`` at ``other_start + u``), where ``bounds(p)`` gives the visible
    positions ``[lo, hi]`` of the other axis, nondecreasing in ``p``: block ``[a, z]`` touches
    ``[lo(a), hi(z)]`` and sees all of ``[lo(z), hi(a)]``."""
    n_other = cdiv(other_len, bs)
    a = torch.arange(cdiv(this_len, bs), device=device) * bs
    z = torch.clamp(a + bs, max=this_len) - 1
    (lo_a, hi_a), (lo_z, hi_z) = bounds(a + this_start), bounds(z + this_start)
    t_lo = torch.clamp(lo_a - other_start, min=0)
    t_hi = torch.clamp(hi_z - other_start, max=other_len - 1)
    f_lo = torch.clamp(lo_z - other_start, min=0)
    f_hi = torch.clamp(hi_a - other_start, max=other_len - 1)
    touched, seen = t_lo <= t_hi, f_lo <= f_hi
    lo = torch.where(touched, t_lo // bs, 0)
    hi = torch.where(touched, t_hi // bs + 1, 0)
    full_lo = torch.where(seen, (f_lo + bs - 1) // bs, 0)
    full_hi = torch.where(f_hi == other_len - 1, n_other, (f_hi + 1) // bs)
    full_hi = torch.where(seen, torch.maximum(full_hi, full_lo), full_lo)
    return Spans(*(x.view(1, 1, -1) for x in (lo, hi, full_lo, full_hi)))


def window_spans(
    window: Window,
    *,
    q_len: int,
    kv_len: int,
    q_offset: int,
    block_size: int,
    device: torch.device | str = "cpu",
) -> tuple[Spans, Spans]:
    """Row spans (per query block) and column spans (per key block) of ``window``, ``(1, 1, n)``
    each."""
    rows = _axis_spans(window.keys, q_len, kv_len, q_offset, 0, block_size, device)
    cols = _axis_spans(window.queries, kv_len, q_len, 0, q_offset, block_size, device)
    return rows, cols


def window_width(window: Window, block_size: int) -> int:
    """How many blocks of the other axis one block can touch (both axes)."""
    return window.span(block_size) // block_size + 2


def window_block_mask(
    window: Window,
    *,
    q_len: int,
    kv_len: int,
    q_offset: int = 0,
    block_size: int = BLOCK_SIZE,
    device: torch.device | str = "cpu",
    partial: bool = False,
) -> BlockMask:
    """The ``BlockMask`` of ``window`` (``B = H = 1``), built from block intervals; with
    ``partial``, no block is full (for a ``mask_mod`` to be and-ed in)."""
    rows, cols = window_spans(
        window,
        q_len=q_len,
        kv_len=kv_len,
        q_offset=q_offset,
        block_size=block_size,
        device=device,
    )
    if partial:
        rows, cols = rows.without_full(), cols.without_full()
    width = window_width(window, block_size)
    return block_mask_from_spans(
        rows,
        cols,
        seq_lengths=(q_len, kv_len),
        block_size=block_size,
        mask_mod=window.mask_mod(q_offset),
        widths=(width, width),
    )


@functools.lru_cache(maxsize=64)
def _cached_block_mask(
    window: Window, q_len: int, kv_len: int, q_offset: int, device: torch.device, partial: bool
) -> BlockMask:
    with torch.inference_mode(False):
        return window_block_mask(
            window, q_len=q_len, kv_len=kv_len, q_offset=q_offset, device=device, partial=partial
        )


def _on_rows(mods: PositionMods, q_offset: int) -> PositionMods:
    """``mods`` (over positions) called with row indices: query row ``q_idx`` at
    ``q_offset + q_idx``, key row ``kv_idx`` at ``kv_idx``."""
    if q_offset == 0:
        return mods
    mask_mod, score_mod = mods
    shifted = PositionMods()
    if mask_mod is not None:

        def row_mask(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            return mask_mod(b, h, q_idx + q_offset, kv_idx)

        shifted = shifted._replace(mask_mod=row_mask)
    if score_mod is not None:

        def row_score(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            return score_mod(score, b, h, q_idx + q_offset, kv_idx)

        shifted = shifted._replace(score_mod=row_score)
    return shifted


def _flex_window(
    q: Tensor, k: Tensor, v: Tensor, window: Window, scale: float, q_offset: int, mods: PositionMods
) -> tuple[Tensor, Tensor]:
    """One flex call over the whole sequence, with the window's analytic block mask."""
    rows = _on_rows(mods, q_offset)
    lengths = (q.shape[2], k.shape[2])
    partial = rows.mask_mod is not None
    if torch.compiler.is_compiling():
        q_len, kv_len = lengths
        block_mask = window_block_mask(
            window, q_len=q_len, kv_len=kv_len, q_offset=q_offset, device=q.device, partial=partial
        )
    else:
        block_mask = _cached_block_mask(window, *lengths, q_offset, q.device, partial)
    if rows.mask_mod is not None:
        block_mask = and_mask_mod(block_mask, rows.mask_mod)
    return _run_flex(q, k, v, block_mask, scale, rows.score_mod)


def _math_window(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    window: Window,
    scale: float,
    q_offset: int,
    mods: PositionMods,
    dropout_p: float,
) -> tuple[Tensor, Tensor]:
    """Matmul and softmax per chunk of ``C`` query rows over the ``L`` keys the chunk can see
    (``O(S * L)`` memory, not ``O(S^2)``), in float32 (float64 for float64 inputs). Chunks
    start at positions that are multiples of ``C``, so a bucketed chunk lies in one bucket."""
    B, H, q_len, _ = q.shape
    kv_len, groups = k.shape[2], H // k.shape[1]
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    C = min(window.size, q_len)
    shift = q_offset % C  # chunks start at positions that are multiples of C
    n, L = cdiv(shift + q_len, C), min(window.span(C, aligned=True), kv_len)
    rows = (torch.arange(n * C, device=q.device) - shift).clamp(0, q_len - 1).view(n, C)
    q_pos = q_offset + rows
    start = window.keys(q_pos[:, 0])[0].clamp(0, kv_len - L)  # (n,)
    kv_pos = start[:, None] + torch.arange(L, device=q.device)  # (n, L): all inside [0, S_kv)
    q_g = rearrange(q[:, :, rows].to(work), "b (k g) n c d -> b k g n c d", g=groups)
    scores = torch.einsum("bkgncd,bknld->bkgncl", q_g, k[:, :, kv_pos].to(work)) * scale
    visible = window.visible(q_pos[:, :, None], kv_pos[:, None, :])  # (n, C, L)
    if mods.mask_mod is not None or mods.score_mod is not None:
        b = torch.arange(B, device=q.device).view(-1, 1, 1, 1, 1)
        h = torch.arange(H, device=q.device).view(1, -1, 1, 1, 1)
        q_idx, kv_idx = q_pos[None, None, :, :, None], kv_pos[None, None, :, None, :]
        by_head = "b (k g) n c l -> b k g n c l"
        if mods.score_mod is not None:
            flat = rearrange(scores, "b k g n c l -> b (k g) n c l")
            scores = rearrange(mods.score_mod(flat, b, h, q_idx, kv_idx), by_head, g=groups)
        if mods.mask_mod is not None:
            mask = mods.mask_mod(b, h, q_idx, kv_idx).expand(-1, H, -1, -1, -1)
            visible = visible & rearrange(mask, by_head, g=groups)
    probs, lse = softmax_with_lse(scores.masked_fill(~visible, -torch.inf), dim=-1)
    if dropout_p > 0:
        probs = F.dropout(probs, dropout_p)
    out = torch.einsum("bkgncl,bknld->bkgncd", probs, v[:, :, kv_pos].to(work))
    out = rearrange(out, "b k g n c d -> b (k g) (n c) d")[:, :, shift : shift + q_len]
    lse = rearrange(lse, "b k g n c -> b (k g) (n c)")[:, :, shift : shift + q_len]
    return out.to(q.dtype), lse


def window_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    window: Window,
    *,
    scale: float,
    backend: Backend,
    q_offset: int = 0,
    mods: PositionMods = NO_MODS,
    dropout_p: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """Attention of q ``(B, H, S_q, D)`` over the keys of ``window`` in k/v ``(B, K, S_kv, D)``;
    ``mods`` over positions. Returns ``(B, H, S_q, D_v)`` and lse ``(B, H, S_q)`` (float32,
    float64 for float64 inputs; ``-inf`` where a row sees no key, whose output is 0)."""
    if backend == "flex":
        return _flex_window(q, k, v, window, scale, q_offset, mods)
    return _math_window(q, k, v, window, scale, q_offset, mods, dropout_p)
