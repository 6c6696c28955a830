"""The flex engine: every call of the strided plan runs FlexAttention on strided views.

The strided path's plan (:func:`dilattn.engines.strided.plan`) splits each branch into
calls whose rows are strided views of q, k and v (no gather). Here each call is one
FlexAttention call on those views, with:

* a ``mask_mod`` and ``score_mod`` that map the view's indices ``(x, g, m)`` back to the batch
  row, the query head and the absolute position ``start[x, g] + m * step`` before calling the
  caller's mods (padding, documents, ALiBi, ...), so every mod sees what the dense
  reference sees (score mods that capture a tensor, such as T5's table, are the gathered
  engine's: see the dispatcher);
* a block mask built from per-block statistics of the call's rows (the causal triangle, the
  smallest and largest document id of each block, whether a key block is all or partly
  padding): blocks inside one document stay full and skip the ``mask_mod``, blocks between
  documents or wholly padding are skipped, only blocks on a boundary evaluate it.

Each call's output is merged into the result in place by log-sum-exp (the strided path's
Triton kernel). The backward runs FlexAttention's backward per call with gradients that make
the sum of the calls' gradients the gradient of the merged result: for call ``i`` with
output ``O_i``, lse ``l_i`` and merge weight ``w_i = exp(l_i - L)``, ``dO_i = w_i dO`` and
``dl_i = w_i (dO . (O_i - O) + dL)``. The per-call autograd graphs are kept from the forward
(its outputs are saved, as FlexAttention saves them), so nothing is recomputed.

Shape legend: ``B`` batch, ``H`` query heads, ``X`` view batch (segments, or batch rows times
segments), ``G`` heads of one call, ``M`` rows per segment, ``n`` blocks of ``M``, ``S``
positions, ``D`` head dim.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import (
    BlockMask,
    _mask_mod_signature,
    _score_mod_signature,
    flex_attention,
)

from dilattn.engines import strided
from dilattn.engines.blocks import block_mask_from_indices, cdiv, dense_block_indices
from dilattn.engines.gather import BLOCK_SIZE, PositionMods, _run_flex

__all__ = ["Visibility", "captures_tensors", "flex_strided_attention", "supports"]

# Rows of one flex call (its output and lse are temporaries): no limit, every call of a
# branch in one launch, as host time per launch is what short sequences pay for
CALL_ROWS = 1 << 40
# Kernels are compiled per view shape (a paper-config forward has about seven); fail loudly
# past this many rather than fall back to eager flex, which materialises every score.
RECOMPILE_LIMIT = 256


def _flex_views(q: Tensor, k: Tensor, v: Tensor, **options: Any) -> Any:
    """FlexAttention under a code object of this engine's own (dynamo counts recompiles per
    code object: a user's flex cannot use up, or turn eager, ours)."""
    return flex_attention(q, k, v, **options)


@functools.cache
def _compiled_flex() -> Any:
    """Compiled on first use, for each view shape alone (the fastest kernels)."""
    return torch.compile(_flex_views, dynamic=False)


def _compiled_views(q: Tensor, k: Tensor, v: Tensor, options: dict[str, Any]) -> Any:
    """:func:`_compiled_flex` in the calling convention of ``gather._run_flex``."""
    return _compiled_flex()(q, k, v, **options)


class Visibility(NamedTuple):
    """The raw tensors behind a visibility ``mask_mod``, read to skip or fill whole blocks:
    ``key_padding_mask`` ``(B, S)`` (``True`` = padding), ``document_ids`` ``(B or 1, S)``."""

    key_padding_mask: Tensor | None = None
    document_ids: Tensor | None = None


def supports(query: Tensor, key: Tensor, value: Tensor, q_offset: int) -> str | None:
    """Why the flex engine on strided views cannot take these inputs, or None."""
    if query.shape[2] != key.shape[2] or q_offset != 0:
        return "it needs S_q == S_kv and q_offset == 0"
    if any(x.stride(-1) != 1 for x in (query, key, value)):
        return "it needs the head dim contiguous (stride 1)"
    if query.is_cuda and query.shape[-1] < 16:
        return f"FlexAttention on CUDA needs head dims of at least 16, got {query.shape[-1]}"
    return None


class Geometry(NamedTuple):
    """Where the rows of one view come from: view row ``(x, g, m)`` is batch row
    ``batch[x, g]``, query head ``head[x, g]``, position ``start[x, g] + m * step``."""

    batch: Tensor  # (X, G) int32
    head: Tensor  # (X, G) int32
    start: Tensor  # (X, G) int32
    step: int
    rows: int


def _index_layout(query: Tensor) -> strided.TensorLayout:
    """A dense ``(B, H, S, 1)`` layout with the dim order of ``query``: folded like the real
    tensors, its element addresses decode back to ``(b, h, s)``."""
    B, H, S = query.shape[:3]
    strides_of = query.stride()
    order = sorted(range(3), key=lambda d: -strides_of[d])
    strides = [0, 0, 0]
    size = 1
    for d in reversed(order):
        strides[d] = size
        size *= (B, H, S)[d]
    return ((B, H, S, 1), (*strides, 1), False)


@functools.lru_cache(maxsize=1024)
def _geometry(spec: strided.Spec, index: strided.TensorLayout, device: torch.device) -> Geometry:
    """Decode the view ``spec`` of the index layout into batch rows, heads and positions
    (cached: a plan's views repeat every call)."""
    (X, G, M, _), (sx, sg, sm, _), offset = spec
    shape, strides = index[0][:3], index[1][:3]
    with torch.inference_mode(False):
        x, g = (torch.arange(n, device=device) for n in (X, G))
        address = offset + x.view(-1, 1) * sx + g.view(1, -1) * sg
        batch, head, start = (
            (address // s % n).to(torch.int32) for n, s in zip(shape, strides, strict=True)
        )  # int32: the kernels' index arithmetic stays 32-bit
    return Geometry(batch, head, start, sm // strides[2], M)


def captures_tensors(fn: object, seen: set[int] | None = None) -> bool:
    """Whether ``fn``'s closure (or that of a function it closes over) holds a tensor, such
    as the table of :class:`dilattn.T5RelativeBias`."""
    seen = set() if seen is None else seen
    if id(fn) in seen:
        return False
    seen.add(id(fn))
    for cell in getattr(fn, "__closure__", None) or ():
        try:
            value = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        if isinstance(value, Tensor) or (callable(value) and captures_tensors(value, seen)):
            return True
    return False


def _causal(x: Tensor, g: Tensor, m_q: Tensor, m_kv: Tensor) -> Tensor:
    return m_kv <= m_q


def _view_mods(
    geo: Geometry, mods: PositionMods, is_causal: bool
) -> tuple[_mask_mod_signature | None, _score_mod_signature | None]:
    """The call's ``mask_mod`` (causal on view rows, and ``mods.mask_mod``) and ``score_mod``
    on view indices, calling ``mods`` with batch rows, heads and absolute positions."""
    batch, head, start, step = geo.batch, geo.head, geo.start, geo.step

    def where(x: Tensor, g: Tensor, m_q: Tensor, m_kv: Tensor) -> tuple[Tensor, ...]:
        first = start[x, g]
        return batch[x, g], head[x, g], first + m_q * step, first + m_kv * step

    mask_mod: _mask_mod_signature | None = _causal if is_causal else None
    if mods.mask_mod is not None:
        visible = mods.mask_mod

        def view_mask(x: Tensor, g: Tensor, m_q: Tensor, m_kv: Tensor) -> Tensor:
            keep = visible(*where(x, g, m_q, m_kv))
            return keep & _causal(x, g, m_q, m_kv) if is_causal else keep

        mask_mod = view_mask
    score_mod: _score_mod_signature | None = None
    if mods.score_mod is not None:
        user_score = mods.score_mod

        def view_score(score: Tensor, x: Tensor, g: Tensor, m_q: Tensor, m_kv: Tensor) -> Tensor:
            return user_score(score, *where(x, g, m_q, m_kv))

        score_mod = view_score
    return mask_mod, score_mod


@functools.lru_cache(maxsize=64)
def _triangle(blocks: int, is_causal: bool, device: torch.device) -> tuple[Tensor, Tensor]:
    """Touched and full block pairs ``(1, 1, n, n)`` of (causal) attention inside a segment."""
    with torch.inference_mode(False):
        if not is_causal:
            every = torch.ones(1, 1, blocks, blocks, dtype=torch.bool, device=device)
            return every, every
        col = torch.arange(blocks, device=device)
        row = col.view(-1, 1)
        return (row >= col).expand(1, 1, -1, -1), (row > col).expand(1, 1, -1, -1)


@functools.lru_cache(maxsize=64)
def _segment_block_mask(rows: int, is_causal: bool, device: torch.device) -> BlockMask:
    """The block mask of (causal) attention inside a segment of ``rows`` rows."""
    touched, full = _triangle(cdiv(rows, BLOCK_SIZE), is_causal, device)
    with torch.inference_mode(False):
        return block_mask_from_indices(
            dense_block_indices(touched, full),
            seq_lengths=(rows, rows),
            block_size=BLOCK_SIZE,
            mask_mod=_causal if is_causal else None,
        )


def _visible_blocks(
    start: Tensor,
    batch: Tensor,
    touched: Tensor,
    full: Tensor,
    step: int,
    rows: int,
    padding: Tensor | None,
    documents: Tensor | None,
) -> tuple[Tensor, ...]:
    """The index tensors of one call's block mask: ``touched``/``full`` (the causal
    triangle) less the key blocks that are all padding and the block pairs that share no
    document; full only where no key is padding and both blocks lie in one document.
    ``start``, ``batch``: ``(X, G)``, as :class:`Geometry`; ``rows`` per segment (the last
    block's missing rows repeat the last row)."""
    row = torch.arange(touched.shape[-1] * BLOCK_SIZE, device=start.device).clamp(max=rows - 1)
    positions = start.unsqueeze(-1) + step * row  # (X, G, n * BLOCK_SIZE)
    batch = batch.unsqueeze(-1)
    if padding is not None:
        padded = padding[batch, positions].view(*positions.shape[:2], -1, BLOCK_SIZE)
        some, every = padded.any(-1).unsqueeze(-2), padded.all(-1).unsqueeze(-2)
        touched, full = touched & ~every, full & ~some
    if documents is not None:
        rows_of = batch if documents.shape[0] > 1 else torch.zeros_like(batch)
        doc = documents[rows_of, positions].view(*positions.shape[:2], -1, BLOCK_SIZE)
        lo, hi = doc.amin(-1), doc.amax(-1)
        q_lo, q_hi, k_lo, k_hi = (
            lo[..., :, None],
            hi[..., :, None],
            lo[..., None, :],
            hi[..., None, :],
        )
        touched = touched & (q_lo <= k_hi) & (k_lo <= q_hi)
        full = full & (q_lo == q_hi) & (k_lo == k_hi) & (q_lo == k_lo)
    return dense_block_indices(touched, full)


@functools.cache
def _compiled_blocks() -> Any:
    """:func:`_visible_blocks` compiled once for all shapes: some 40 small ops in a few
    kernels, so a call's block mask costs one launch's host time, not forty."""
    return torch.compile(_visible_blocks, dynamic=True)


def _call_block_mask(
    geo: Geometry, vis: Visibility, is_causal: bool, mask_mod: _mask_mod_signature | None
) -> BlockMask:
    """The block mask of one call (:func:`_visible_blocks`; cached without visibility)."""
    if vis.key_padding_mask is None and vis.document_ids is None:
        return _segment_block_mask(geo.rows, is_causal, geo.start.device)
    touched, full = _triangle(cdiv(geo.rows, BLOCK_SIZE), is_causal, geo.start.device)
    build = _compiled_blocks() if geo.start.is_cuda else _visible_blocks
    indices = build(geo.start, geo.batch, touched, full, geo.step, geo.rows, *vis)
    return block_mask_from_indices(
        indices, seq_lengths=(geo.rows, geo.rows), block_size=BLOCK_SIZE, mask_mod=mask_mod
    )


class _Call(NamedTuple):
    """One flex call of the forward, kept for its backward."""

    call: strided.Call  # its plan entry (which gradients it writes first)
    specs: tuple[strided.Spec, ...]  # views of q, k, v, out, lse
    inputs: tuple[Tensor, Tensor, Tensor]  # the views flex read (leaves of its graph)
    outputs: tuple[Tensor, Tensor]  # its out and lse


def _calls(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    out: Tensor,
    lse: Tensor,
    plan: strided.Plan,
) -> Iterator[tuple[strided.Call, tuple[strided.Spec, ...], Geometry]]:
    index = _index_layout(query)
    # the gradients the backward allocates (empty_like: a view that is not dense, such as q
    # of a fused projection, gets dense strides), folded with the inputs
    grads = tuple(
        strided._layout(torch.empty_like(x, device="meta"), by_kv=i > 0)
        for i, x in enumerate((query, key, value))
    )
    tensors = (query, key, value, out, lse)
    for call, specs in strided.views(plan, tensors, (1, 2), (index, *grads)):
        yield call, specs[:5] + specs[6:], _geometry(specs[5], index, query.device)


def _forward(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    plan: strided.Plan,
    is_causal: bool,
    scale: float,
    mods: PositionMods,
    vis: Visibility,
    keep: bool,
) -> tuple[Tensor, Tensor, list[_Call]]:
    """Every call, merged into ``(out, lse)``; with ``keep``, the calls' graphs for the
    backward."""
    out, lse = strided.new_result(query, value, plan)
    kept = []
    source = tuple(x.detach() for x in (query, key, value))
    for call, specs, geo in _calls(query, key, value, out, lse, plan):
        mask_mod, score_mod = _view_mods(geo, mods, is_causal)
        block_mask = _call_block_mask(geo, vis, is_causal, mask_mod)
        q, k, v = (strided._at(x, spec) for x, spec in zip(source, specs, strict=False))
        with torch.enable_grad() if keep else torch.no_grad():
            if keep:
                q, k, v = (x.requires_grad_() for x in (q, k, v))
            limit = (RECOMPILE_LIMIT, "dilattn.engines.flex_strided.RECOMPILE_LIMIT")
            o, l = _run_flex(
                q, k, v, block_mask, scale, score_mod, compiled=_compiled_views, limit=limit
            )
        acc, acc_lse = (strided._at(x, s) for x, s in zip((out, lse), specs[3:5], strict=True))
        strided._merge_into(acc, acc_lse, o.detach(), l.detach(), call.writes)
        if keep:
            kept.append(_Call(call, specs, (q, k, v), (o, l)))
    return out, lse, kept


def _backward(
    calls: list[_Call],
    grad_out: Tensor,
    grad_lse: Tensor | None,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    out: Tensor,
    lse: Tensor,
    plan: strided.Plan,
) -> tuple[Tensor, ...]:
    """Each call's flex backward with the gradients that sum to the merged result's."""
    dq, dk, dv = strided.new_grads(query, key, value, plan)
    for kept in calls:
        o, l = kept.outputs
        spec_o, spec_l = kept.specs[3], kept.specs[4]
        merged_out, merged_lse = strided._at(out, spec_o), strided._at(lse, spec_l)
        g = strided._at(grad_out, spec_o).float()
        weight = torch.where(l.isneginf(), 0.0, torch.exp(l - merged_lse))  # (X, G, M)
        d_lse = (g * (o.float() - merged_out.float())).sum(-1)
        if grad_lse is not None:
            d_lse = d_lse + strided._at(grad_lse, spec_l)
        grads = torch.autograd.grad(
            (o, l), kept.inputs, ((g * weight.unsqueeze(-1)).to(o.dtype), weight * d_lse)
        )
        writes = (kept.call.writes, kept.call.writes_kv, kept.call.writes_kv)
        for target, spec, piece, write in zip(
            (dq, dk, dv), kept.specs[5:], grads, writes, strict=True
        ):
            strided._add_rows(strided._at(target, spec), piece, write)
    return dq, dk, dv


def _like(x: Tensor, grad: Tensor | None) -> Tensor:
    """``grad`` with the strides of ``x`` (zeros for None)."""
    if grad is None:
        return torch.zeros_like(x)
    return grad if grad.stride() == x.stride() else torch.empty_like(x).copy_(grad)


class _FlexStrided(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        options: tuple[Any, ...],
    ) -> tuple[Tensor, Tensor]:
        plan, is_causal, scale, mods, vis = options
        # off CUDA flex has no backward: the dispatcher refuses q, k, v that need one
        keep = any(ctx.needs_input_grad[:3])
        out, lse, calls = _forward(query, key, value, plan, is_causal, scale, mods, vis, keep)
        ctx.calls, ctx.plan = calls, plan
        ctx.save_for_backward(query, key, value, out, lse)
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor | None, grad_lse: Tensor | None) -> Any:  # type: ignore[override]
        query, key, value, out, lse = ctx.saved_tensors
        # the calls' views are specs of the output's layout: give the gradients that layout
        grad_out = _like(out, grad_out)
        grad_lse = None if grad_lse is None else _like(lse, grad_lse)
        grads = _backward(ctx.calls, grad_out, grad_lse, query, key, value, out, lse, ctx.plan)
        ctx.calls = []
        return (*grads, None)


def flex_strided_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    branches: tuple[tuple[int, int], ...],
    offsets: tuple[tuple[int, ...], ...],
    *,
    is_causal: bool,
    scale: float,
    mods: PositionMods,
    visibility: Visibility,
) -> tuple[Tensor, Tensor]:
    """Dilated attention by flex on strided views: ``(B, H, S, Dv)`` and lse ``(B, H, S)``
    (float32); ``mods`` over positions, ``visibility`` the tensors behind ``mods.mask_mod``."""
    B, H, S = query.shape[:3]
    plan = strided.plan(branches, offsets, H // key.shape[1], S, B, CALL_ROWS)
    options = (plan, is_causal, scale, mods, visibility)
    out, lse = _FlexStrided.apply(query, key, value, options)  # type: ignore[no-untyped-call]
    return out, lse
