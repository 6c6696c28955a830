"""Sequence parallelism, the algorithm: which rows each rank sends, and attention over them.

The sequence of ``S`` positions lies in ``W`` equal chunks of ``C`` positions, rank ``i``
holding positions ``[i*C, (i+1)*C)`` of q, k and v (positions ``>= S`` are padding). This
module is plain tensor code; the one collective, an all-to-all of rows, is done by the caller
(:mod:`dilattn.distributed` with torch.distributed), so tests can also run every rank in one
process.

Branch ``(w, r)`` is *local* when no segment crosses a chunk boundary (``C % w == 0``, ``w``
clipped to ``S``): each rank runs the single-device path on its own chunk. Otherwise it is
*spanning*: a rank attends its own compact queries (its positions of each segment it touches,
per head offset) to the compact keys of those whole segments. It holds some of those keys;
the others come from their owners, all spanning branches in one all-to-all, each
``(key/value head, position)`` row once even when several heads or branches need it, key and
value side by side. Causal: only keys up to the rank's last position, so only from earlier
ranks.

Shape legend: ``B`` batch, ``H`` query heads, ``H_kv`` key/value heads, ``Hc`` compact key
heads, ``C`` positions per rank, ``N`` segments a rank touches, ``M`` compact rows per segment,
``M_q`` compact query rows of this rank, ``R`` rows exchanged, ``P`` rows of the pool (local
rows then received rows), ``E = D + D_v``: a key row and its value row.
"""

from __future__ import annotations

import functools
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from dilattn.config import DilatedConfig
from dilattn.engines.blocks import cdiv
from dilattn.engines.gather import Backend, _gather, attend_compact, layout, merge_compact
from dilattn.functional import dilated_attention
from dilattn.merge import merge_by_lse


class RankRows(NamedTuple):
    """RankRows of a rank's ``(B, H, C, D)`` tensor: ``x[:, heads[i], positions[i]]``, ``(R,)``
    each."""

    heads: Tensor
    positions: Tensor


class SpanningBranch(NamedTuple):
    """One spanning branch as one rank computes it."""

    q_index: Tensor  # (N, H, M_q) local positions of the compact queries, clamped into [0, C)
    q_target: Tensor  # (N, H, M_q) their rows in RankPlan.targets; padding rows: len(targets)
    q_start: Tensor  # (N, H) compact row (in its segment) of the first query of this rank
    kv_index: Tensor  # (N, Hc, M) rows of the pool holding the compact keys/values
    kv_count: Tensor  # (N, H) int32: compact keys [0, kv_count) are real


class RankPlan(NamedTuple):
    """What one rank computes and exchanges, for one configuration and one set of shapes."""

    local: tuple[int, ...]  # indices of the local branches
    spanning: tuple[SpanningBranch, ...]  # the spanning branches this rank has queries in
    exchange: bool  # some branch spans ranks: every rank takes part in the all-to-all
    send: RankRows  # rows to send, grouped by destination rank
    send_splits: tuple[int, ...]  # (W,) rows sent to each rank
    recv_splits: tuple[int, ...]  # (W,) rows received from each rank
    pool_local: RankRows  # this rank's rows at the head of the pool
    targets: RankRows  # the (head, position) query rows some spanning branch writes, sorted
    valid: int  # positions of this rank before the sequence end (C less padding)


class _View(NamedTuple):
    """A spanning branch seen from one rank: its queries there and the key rows it needs."""

    q_index: Tensor  # as SpanningBranch
    q_target: Tensor  # (N, H, M_q) local positions of the queries; padding rows: C
    q_start: Tensor
    kv_count: Tensor
    row_id: Tensor  # (N, Hc, M) key rows as owner * H_kv * C + kv_head * C + local position
    needed: Tensor  # (N, Hc, M) bool: rows some local query can see


def is_local(w: int, chunk: int, seq_len: int) -> bool:
    """Whether no segment of length ``w`` crosses a chunk boundary before ``seq_len``."""
    return seq_len <= chunk or chunk % min(w, seq_len) == 0


def _view(
    w: int,
    r: int,
    offsets: tuple[int, ...],
    *,
    kv_heads: int,
    chunk: int,
    rank: int,
    seq_len: int,
    is_causal: bool,
    device: torch.device,
) -> _View | None:
    """Branch ``(w, r)`` from rank ``rank``; ``None`` where the rank has no query in it."""
    first, end = rank * chunk, min((rank + 1) * chunk, seq_len)  # this rank's positions
    if first >= end:
        return None
    w = min(w, seq_len)
    start, stop = first // w * w, min(cdiv(end, w) * w, seq_len)  # whole segments touched
    group = len(offsets) // kv_heads
    lay = layout(w, r, offsets, group, stop - start, stop - start, 0, device)
    # queries: compact rows are in position order, so this rank's are one run per (segment, head)
    q_pos = start + lay.q_index  # (N, H, M)
    q_real = lay.q_target < stop - start
    q_start = (q_real & (q_pos < first)).sum(-1)  # (N, H)
    count = (q_real & (q_pos >= first) & (q_pos < end)).sum(-1)  # (N, H)
    rows = int(count.max())
    if rows == 0:
        return None
    t = torch.arange(rows, device=device)
    q_local = q_pos.gather(-1, (q_start.unsqueeze(-1) + t).clamp(max=lay.rows - 1)) - first
    q_target = torch.where(t < count.unsqueeze(-1), q_local, chunk)  # (N, H, M_q)
    # keys: real rows of segments where a head of this compact key head has a query here
    kv_pos = start + lay.kv_index  # (N, Hc, M)
    per_key_head = len(offsets) // lay.kv_index.shape[1]  # query heads per compact key head
    real = torch.arange(lay.rows, device=device) < lay.kv_count[:, ::per_key_head, None]
    asked = rearrange(count, "n (c g) -> n c g", g=per_key_head).sum(-1) > 0  # (N, Hc)
    needed = real & asked.unsqueeze(-1)
    if is_causal:
        needed = needed & (kv_pos < end)
    owner = kv_pos // chunk
    local_row = lay.kv_heads.view(1, -1, 1) * chunk + kv_pos - owner * chunk
    row_id = owner * kv_heads * chunk + local_row
    return _View(
        q_index=q_local.clamp(0, chunk - 1),
        q_target=q_target,
        q_start=q_start.to(torch.int32),
        kv_count=lay.kv_count,
        row_id=row_id,
        needed=needed,
    )


def _rows(ids: Tensor, chunk: int) -> RankRows:
    """Local row ids ``kv_head * C + position`` as :class:`RankRows`."""
    return RankRows(heads=ids // chunk, positions=ids % chunk)


@functools.lru_cache(maxsize=64)
def plan(
    config: DilatedConfig,
    *,
    num_heads: int,
    kv_heads: int,
    chunk: int,
    world: int,
    rank: int,
    seq_len: int,
    is_causal: bool,
    device: torch.device,
) -> RankPlan:
    """The :class:`RankPlan` of rank ``rank`` of ``world`` (cached). Every rank derives every
    rank's needs from the same arguments, so what a rank sends is what its peers expect."""
    offsets = config.offsets(num_heads)
    local = tuple(b for b, w in enumerate(config.segment_lengths) if is_local(w, chunk, seq_len))
    spanning = [b for b in range(len(offsets)) if b not in local]
    per_rank = kv_heads * chunk  # row ids of rank d: [d * per_rank, (d + 1) * per_rank)
    needs: list[Tensor] = []  # per rank: the row ids it needs, sorted
    mine: list[_View] = []
    with torch.inference_mode(False):  # usable later with autograd too
        empty = torch.zeros(0, dtype=torch.long, device=device)
        for d in range(world):
            views = [
                _view(
                    *config.branches[b],
                    offsets[b],
                    kv_heads=kv_heads,
                    chunk=chunk,
                    rank=d,
                    seq_len=seq_len,
                    is_causal=is_causal,
                    device=device,
                )
                for b in spanning
            ]
            seen = [v for v in views if v is not None]
            needs.append(torch.unique(torch.cat([empty] + [v.row_id[v.needed] for v in seen])))
            mine = seen if d == rank else mine
        owned = [x // per_rank == rank for x in needs]  # rows of this rank in each rank's needs
        sends = [
            needs[d][owned[d]] - rank * per_rank if d != rank else needs[d][:0]
            for d in range(world)
        ]
        remote = needs[rank][~owned[rank]]  # received in this order: by owner, then row
        local_rows = needs[rank][owned[rank]] - rank * per_rank
        heads = torch.arange(num_heads, device=device).view(1, -1, 1)
        q_ids = [(heads * chunk + v.q_target, v.q_target < chunk) for v in mine]  # head * C + p
        targets = torch.unique(torch.cat([empty] + [ids[real] for ids, real in q_ids]))
        branches = []
        for v, (ids, real) in zip(mine, q_ids, strict=True):
            pool_row = torch.where(
                v.row_id // per_rank == rank,
                torch.searchsorted(local_rows, v.row_id - rank * per_rank),
                len(local_rows) + torch.searchsorted(remote, v.row_id),
            )
            branches.append(
                SpanningBranch(
                    q_index=v.q_index,
                    q_target=torch.where(real, torch.searchsorted(targets, ids), len(targets)),
                    q_start=v.q_start,
                    kv_index=torch.where(v.needed, pool_row, 0),
                    kv_count=v.kv_count,
                )
            )
        remote_owner = remote // per_rank
        return RankPlan(
            local=local,
            spanning=tuple(branches),
            exchange=bool(spanning),
            send=_rows(torch.cat(sends), chunk),
            send_splits=tuple(len(x) for x in sends),
            recv_splits=tuple(int((remote_owner == s).sum()) for s in range(world)),
            pool_local=_rows(local_rows, chunk),
            targets=_rows(targets, chunk),
            valid=max(0, min(chunk, seq_len - rank * chunk)),
        )


def take_rows(key: Tensor, value: Tensor, rows: RankRows) -> Tensor:
    """``key`` ``(B, H_kv, C, D)`` and ``value`` ``(B, H_kv, C, D_v)`` rows side by side:
    ``(R, B, D + D_v)``, the layout the all-to-all splits."""
    picked = [x.permute(1, 2, 0, 3)[rows.heads, rows.positions] for x in (key, value)]
    return torch.cat(picked, -1)


def attend_chunk(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    received: Tensor,
    config: DilatedConfig,
    plan: RankPlan,
    *,
    is_causal: bool,
    scale: float,
    enable_gqa: bool,
    backend: Backend | Literal["strided"],
) -> tuple[Tensor, Tensor]:
    """This rank's dilated attention, ``(B, H, C, D_v)`` and lse ``(B, H, C)``, given the rows
    ``received`` ``(R, B, D + D_v)`` from its peers (as :attr:`RankPlan.recv_splits` says)."""
    B, H, C, D = query.shape
    work = torch.float64 if query.dtype == torch.float64 else torch.float32
    if plan.local and plan.valid:
        out, lse = dilated_attention(
            query[:, :, : plan.valid],
            key[:, :, : plan.valid],
            value[:, :, : plan.valid],
            [config.segment_lengths[b] for b in plan.local],
            [config.dilation_rates[b] for b in plan.local],
            is_causal=is_causal,
            scale=scale,
            enable_gqa=enable_gqa,
            return_lse=True,
            head_offsets=config.head_offsets,
            backend=backend,
        )
        if plan.valid < C:  # padding rows: 0, lse -inf
            out = F.pad(out, (0, 0, 0, C - plan.valid))
            lse = F.pad(lse, (0, C - plan.valid), value=-torch.inf)
    else:
        out = query.new_zeros((B, H, C, value.shape[-1]))
        lse = query.new_full((B, H, C), -torch.inf, dtype=work)
    if not plan.spanning:
        # peers run the all-to-all's backward: this rank must join it, so depend on `received`
        return (out + received[:0].sum(), lse) if plan.exchange else (out, lse)
    # spanning branches merge into a compact list of the rows they write (+ a spare row)...
    span_out = query.new_zeros((B, 1, len(plan.targets.heads) + 1, value.shape[-1]), dtype=work)
    span_lse = query.new_full((B, 1, len(plan.targets.heads) + 1), -torch.inf, dtype=work)
    pool = rearrange(
        torch.cat([take_rows(key, value, plan.pool_local), received]), "p b e -> b p e"
    )  # (B, P, D + D_v)
    heads = torch.arange(H, device=query.device)
    gathered: Backend = backend if backend != "strided" else "flex" if query.is_cuda else "math"
    for branch in plan.spanning:
        kv = rearrange(pool[:, branch.kv_index], "b n h m e -> (b n) h m e")
        o_rows, lse_rows = attend_compact(
            _gather(query, heads, branch.q_index),
            kv[..., :D],
            kv[..., D:],
            branch.kv_count.repeat(B, 1),
            is_causal=is_causal,
            scale=scale,
            backend=gathered,  # gathered rows: no strided views
            q_start=branch.q_start.repeat(B, 1),
        )
        merge_compact(span_out, span_lse, branch.q_target, o_rows, lse_rows)
    # ... which then merges into those rows of the local result
    rows = (slice(None), plan.targets.heads, plan.targets.positions)
    merged_out, merged_lse = merge_by_lse(
        [out[rows], span_out[:, 0, :-1]], [lse[rows], span_lse[:, 0, :-1]], out_dtype=out.dtype
    )
    out, lse = out.clone(), lse.clone()
    out[rows] = merged_out
    lse[rows] = merged_lse
    return out, lse
