"""The branch path: each branch's rows gathered into a compact layout, attended, merged back.

Shape legend: ``B`` batch, ``H`` query heads, ``Hc`` heads of the compact keys (``H_kv`` when
every head of a key/value group shares its offset, else ``H``), ``N`` segments, ``M`` compact
rows per segment (``ceil(w / r)``), ``S`` positions, ``D`` head dim.

Branch ``(w, r)``: segment ``j``, head ``h`` with offset ``o`` holds positions
``j*w + o + k*r`` for ``k < M``. Those are gathered into a batch of ``B*N`` short sequences
of ``M`` rows, where plain (causal) attention over a prefix of valid keys is exactly the
branch: rows past the segment or the sequence end are padding, masked as keys and dropped as
queries. Query row ``i`` sits at position ``q_offset + i``; only the segments holding a query
are gathered (decoding one token reads one segment per branch). Two backends compute that
attention: ``flex`` (FlexAttention with an analytic block mask; compiled on CUDA, eager and
forward-only on CPU) and ``math`` (matmul and softmax, any device, differentiable).

Padding, documents and a user's ``score_mod`` are mods over positions (:class:`PositionMods`);
each branch wraps them so that compact indices ``(b*N + n, h, m)`` are mapped back to the
batch row and the positions of query and key before they are called.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor
from torch.nn.attention.flex_attention import (
    AuxRequest,
    BlockMask,
    _mask_mod_signature,
    _score_mod_signature,
    flex_attention,
)

from dilattn._softmax import softmax_with_lse
from dilattn.engines.blocks import and_mask_mod, block_mask_from_spans, cdiv, prefix_spans
from dilattn.merge import merge_by_lse

Backend = Literal["flex", "math"]

BLOCK_SIZE = 128
# Each compiled flex compiles once per variant (dtype, head counts, head dims, mods, and for
# the static one, shapes). Allow that many, and fail loudly past them rather than fall back
# to eager flex.
RECOMPILE_LIMIT = 64
# Shapes (of q and k) that get flex kernels compiled for them alone: on the H100 these run
# local attention at 256K 1.35x faster, forward and backward, than the kernel compiled for
# dynamic shapes that every later shape shares. A training run sees one or a few shapes;
# past these, one dynamic kernel rather than a compile per shape. Calls of fewer query rows
# than a block (decoding steps, each with a new key length) always take the dynamic kernel.
STATIC_SHAPES = 8


def _flex(q: Tensor, k: Tensor, v: Tensor, **options: Any) -> Any:
    """FlexAttention under a code object of our own: dynamo counts recompiles per code object,
    and once a code object passes its limit, runs it eagerly for good. A user's own
    ``torch.compile(flex_attention)`` must not use up, or turn eager, our variants."""
    return flex_attention(q, k, v, **options)


def _flex_static(q: Tensor, k: Tensor, v: Tensor, **options: Any) -> Any:
    """:func:`_flex` under another code object, compiled per shape."""
    return flex_attention(q, k, v, **options)


@functools.cache
def _compile_flex(static: bool) -> Any:
    """A compiled flex, compiled on first use: ``torch.compile`` imports dynamo, which would
    add seconds to ``import dilattn``."""
    return torch.compile(_flex_static, dynamic=False) if static else torch.compile(_flex)


class _StaticShapes:
    """The first :data:`STATIC_SHAPES` shapes flex meets, kept until their compiled variants
    run out (then every shape is dynamic)."""

    def __init__(self) -> None:
        self.shapes: set[tuple[torch.Size, torch.Size]] = set()
        self.open = True

    def admit(self, shapes: tuple[torch.Size, torch.Size]) -> bool:
        if self.open and shapes not in self.shapes and len(self.shapes) < STATIC_SHAPES:
            self.shapes.add(shapes)
        return shapes in self.shapes

    def close(self, shapes: tuple[torch.Size, torch.Size]) -> None:
        self.shapes.discard(shapes)
        self.open = False


_static_shapes = _StaticShapes()


@contextlib.contextmanager
def _strict_recompile_limit(limit: int = RECOMPILE_LIMIT) -> Iterator[None]:
    """At least ``limit`` variants, then an error. Sets the two dynamo options directly:
    ``torch._dynamo.config.patch`` costs about a millisecond of host time a call."""
    config = torch._dynamo.config
    saved = config.recompile_limit, config.fail_on_recompile_limit_hit
    config.recompile_limit = max(saved[0], limit)
    config.fail_on_recompile_limit_hit = True
    try:
        yield
    finally:
        config.recompile_limit, config.fail_on_recompile_limit_hit = saved


class PositionMods(NamedTuple):
    """Mods over ORIGINAL indices: batch row, query head, and the positions of query and key.
    ``mask_mod`` adds a condition to the branch masks; ``score_mod`` changes the scaled score
    before them."""

    mask_mod: _mask_mod_signature | None = None
    score_mod: _score_mod_signature | None = None


NO_MODS = PositionMods()


class CompactRows(NamedTuple):
    """Where one branch's compact rows come from, for given lengths."""

    q_index: Tensor  # (N, H, M) query rows of compact queries, clamped into [0, S_q)
    q_target: Tensor  # (N, H, M) the same, with padding rows sent to the spare row S_q
    kv_heads: Tensor  # (Hc,) source key/value head of each compact key head
    kv_index: Tensor  # (N, Hc, M) positions of compact keys, clamped into [0, S_kv)
    kv_count: Tensor  # (N, H) int32: compact keys [0, kv_count) are real for each query head
    rows: int  # M


def _positions(
    offsets: Tensor, w: int, r: int, first: int, segments: int, rows: int
) -> tuple[Tensor, Tensor]:
    """``(positions, inside)``, each ``(N, len(offsets), M)``: ``j*w + o + k*r`` for segments
    ``j`` from ``first`` on, and whether it lies inside its segment."""
    j = torch.arange(first, first + segments, device=offsets.device).view(-1, 1, 1)
    k = torch.arange(rows, device=offsets.device).view(1, 1, -1)
    relative = offsets.view(1, -1, 1) + k * r
    return j * w + relative, (relative < w).expand(segments, -1, -1)


def layout(
    w: int,
    r: int,
    offsets: tuple[int, ...],
    group: int,
    q_len: int,
    kv_len: int,
    q_offset: int,
    device: torch.device,
) -> CompactRows:
    """The compact layout of branch ``(w, r)`` over the segments holding a query (query row
    ``i`` at position ``q_offset + i``); ``group`` query heads share a key/value head."""
    w = min(w, max(q_offset + q_len, kv_len))  # a longer segment holds the same positions
    first = q_offset // w
    segments, rows = (q_offset + q_len - 1) // w - first + 1, cdiv(w, r)
    q_offsets = torch.tensor(offsets, device=device)
    q_pos, q_inside = _positions(q_offsets, w, r, first, segments, rows)
    q_row = q_pos - q_offset
    q_real = q_inside & (q_row >= 0) & (q_row < q_len)
    shared = all(offsets[h] == offsets[h - h % group] for h in range(len(offsets)))
    kv_heads = torch.arange(len(offsets) // group if shared else len(offsets), device=device)
    kv_offsets = q_offsets[::group] if shared else q_offsets
    kv_pos, _ = _positions(kv_offsets, w, r, first, segments, rows)
    return CompactRows(
        q_index=q_row.clamp(0, q_len - 1),
        q_target=torch.where(q_real, q_row, q_len),
        kv_heads=kv_heads if shared else kv_heads // group,
        kv_index=kv_pos.clamp(max=kv_len - 1),
        kv_count=(q_inside & (q_pos < kv_len)).sum(-1, dtype=torch.int32),  # per query head
        rows=rows,
    )


@functools.lru_cache(maxsize=256)
def _cached_layout(*args: Any) -> CompactRows:
    with torch.inference_mode(False):  # usable later with autograd too
        return layout(*args)


@functools.lru_cache(maxsize=256)
def _cached_block_mask(
    layout_args: tuple[Any, ...], batch: int, is_causal: bool, partial: bool
) -> BlockMask:
    """:func:`compact_block_mask` of the branch ``layout(*layout_args)`` for ``batch`` rows,
    built once: building it takes ~180 small kernels, most of an eager call's host time."""
    lay = _cached_layout(*layout_args)
    with torch.inference_mode(False):
        return compact_block_mask(
            lay.kv_count.repeat(batch, 1),
            q_len=lay.q_index.shape[2],
            kv_len=lay.kv_index.shape[2],
            is_causal=is_causal,
            partial=partial,
        )


def _gather(x: Tensor, heads: Tensor, index: Tensor) -> Tensor:
    """Rows ``index`` ``(N, Hc, M)`` of heads ``heads`` of ``x`` ``(B, Hx, S, D)``
    -> ``(B*N, Hc, M, D)``."""
    rows = x[:, heads.view(1, -1, 1), index]  # (B, N, Hc, M, D)
    return rearrange(rows, "b n h m d -> (b n) h m d")


def _compact_mods(
    mods: PositionMods, lay: CompactRows, q_offset: int, num_heads: int
) -> PositionMods:
    """``mods`` called on compact indices ``(b*N + n, h, m, m')``: each index is mapped back to
    the batch row ``b`` and to the positions of the query and the key (clamped into the
    sequences, so padding rows index safely; they are masked anyway)."""
    segments = lay.q_index.shape[0]
    q_pos = q_offset + lay.q_index  # (N, H, M)
    kv_pos = lay.kv_index.repeat_interleave(num_heads // lay.kv_index.shape[1], dim=1)  # (N, H, M)

    def original(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> tuple[Tensor, ...]:
        n = b % segments
        return b // segments, h, q_pos[n, h, q_idx], kv_pos[n, h, kv_idx]

    compact = PositionMods()
    if mods.mask_mod is not None:
        mask_mod = mods.mask_mod

        def compact_mask(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            return mask_mod(*original(b, h, q_idx, kv_idx))

        compact = compact._replace(mask_mod=compact_mask)
    if mods.score_mod is not None:
        score_mod = mods.score_mod

        def compact_score(
            score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor
        ) -> Tensor:
            return score_mod(score, *original(b, h, q_idx, kv_idx))

        compact = compact._replace(score_mod=compact_score)
    return compact


def _math_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kv_count: Tensor,
    is_causal: bool,
    scale: float,
    mods: PositionMods,
    dropout_p: float,
    q_start: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """As :func:`attend_compact`, by matmul and softmax, with ``mods`` on compact indices and
    dropout on the probabilities."""
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    groups = q.shape[1] // k.shape[1]
    q_g = rearrange(q.to(work), "b (k g) m d -> b k g m d", g=groups)
    scores = torch.einsum("bkgmd,bksd->bkgms", q_g, k.to(work)) * scale
    keys = torch.arange(k.shape[2], device=q.device)
    visible = keys < rearrange(kv_count, "b (k g) -> b k g 1 1", g=groups)  # (B', Hk, G, 1, M)
    if is_causal:
        queries = torch.arange(q.shape[2], device=q.device).view(-1, 1)  # (M_q, 1)
        if q_start is not None:
            queries = queries + rearrange(q_start, "b (k g) -> b k g 1 1", g=groups)
        visible = visible & (keys <= queries)  # query row t stands at key row q_start + t
    if mods.mask_mod is not None or mods.score_mod is not None:
        b, h, q_idx, kv_idx = (
            torch.arange(n, device=q.device).view(shape)
            for n, shape in (
                (q.shape[0], (-1, 1, 1, 1)),
                (q.shape[1], (1, -1, 1, 1)),
                (q.shape[2], (1, 1, -1, 1)),
                (k.shape[2], (1, 1, 1, -1)),
            )
        )
        by_head = "b (k g) m s -> b k g m s"
        if mods.score_mod is not None:
            flat = rearrange(scores, "b k g m s -> b (k g) m s")  # (B', H, M, M)
            scores = rearrange(mods.score_mod(flat, b, h, q_idx, kv_idx), by_head, g=groups)
        if mods.mask_mod is not None:
            visible = visible & rearrange(mods.mask_mod(b, h, q_idx, kv_idx), by_head, g=groups)
    probs, lse = softmax_with_lse(scores.masked_fill(~visible, -torch.inf), dim=-1)
    if dropout_p > 0:
        probs = F.dropout(probs, dropout_p)
    out = torch.einsum("bkgms,bksd->bkgmd", probs, v.to(work))
    return (
        rearrange(out, "b k g m d -> b (k g) m d").to(q.dtype),
        rearrange(lse, "b k g m -> b (k g) m"),
    )


def compact_block_mask(
    kv_count: Tensor,
    *,
    q_len: int,
    kv_len: int,
    is_causal: bool,
    q_start: Tensor | None = None,
    partial: bool = False,
) -> BlockMask:
    """The block mask of :func:`attend_compact` (``q_len`` compact queries, ``kv_len`` compact
    keys), its ``mask_mod`` on compact indices; with ``partial``, no block is full (for a
    ``mask_mod`` to be and-ed in)."""
    rows, cols = prefix_spans(
        kv_count.amin(1),
        kv_count.amax(1),
        length=kv_len,
        block_size=BLOCK_SIZE,
        is_causal=is_causal,
        q_length=q_len,
        q_start=None if q_start is None else (q_start.amin(1), q_start.amax(1)),
    )

    def valid(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return kv_idx < kv_count[b, h]

    def causal_valid(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return (kv_idx < kv_count[b, h]) & (kv_idx <= q_idx)

    def shifted_causal_valid(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        assert q_start is not None
        return (kv_idx < kv_count[b, h]) & (kv_idx <= q_idx + q_start[b, h])

    mask_mod: _mask_mod_signature = valid
    if is_causal:
        mask_mod = causal_valid if q_start is None else shifted_causal_valid
    if partial:
        rows, cols = rows.without_full(), cols.without_full()
    return block_mask_from_spans(
        rows,
        cols,
        seq_lengths=(q_len, kv_len),
        block_size=BLOCK_SIZE,
        mask_mod=mask_mod,
        widths=(cdiv(kv_len, BLOCK_SIZE), cdiv(q_len, BLOCK_SIZE)),
    )


def _flex_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kv_count: Tensor,
    is_causal: bool,
    scale: float,
    mods: PositionMods,
    q_start: Tensor | None,
    block_mask: BlockMask | None,
) -> tuple[Tensor, Tensor]:
    """As :func:`attend_compact` (without dropout), by FlexAttention with an analytic block
    mask (``block_mask``, when given, is :func:`compact_block_mask` of these arguments). A
    ``mask_mod`` in ``mods`` makes every touched block partial, so it runs on all."""
    if block_mask is None:
        block_mask = compact_block_mask(
            kv_count,
            q_len=q.shape[2],
            kv_len=k.shape[2],
            is_causal=is_causal,
            q_start=q_start,
            partial=mods.mask_mod is not None,
        )
    if mods.mask_mod is not None:
        block_mask = and_mask_mod(block_mask, mods.mask_mod)
    return _run_flex(q, k, v, block_mask, scale, mods.score_mod)


def _kernel_options(q: Tensor, k: Tensor, block_mask: BlockMask) -> dict[str, Any] | None:
    """Kernel options that keep a short GQA call off inductor's flex decoding kernel where it
    has no valid config. Under a query block of rows, inductor picks that kernel, which packs
    a key head's group of query heads into one tile of the next power of two of rows; past the
    mask's query block size every config is refused (``NoValidChoicesError``, torch 2.11 to
    2.13; pytorch/pytorch#185349). The main kernel takes those calls."""
    rows, group = q.shape[-2], q.shape[1] // k.shape[1]
    if rows < block_mask.BLOCK_SIZE[0] < rows * group:
        return {"FORCE_USE_FLEX_ATTENTION": True}
    return None


def _run_flex(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    block_mask: BlockMask,
    scale: float,
    score_mod: _score_mod_signature | None,
    *,
    compiled: Callable[[Tensor, Tensor, Tensor, dict[str, Any]], Any] | None = None,
    limit: tuple[int, str] | None = None,
) -> tuple[Tensor, Tensor]:
    """Flex with lse: compiled on CUDA, never its silent eager fallback (it materialises every
    score); eager (forward only) on CPU; inside the caller's graph when it is being compiled
    (``torch.compile(model)``), where no config patch can be traced. ``compiled`` (default
    :func:`_compiled_flex`) runs it with ``(q, k, v, options)`` under ``limit``: at most
    that many variants, and the name of the setting that raises it (default
    :data:`RECOMPILE_LIMIT`, read at each call)."""
    options: dict[str, Any] = {
        "score_mod": score_mod,
        "block_mask": block_mask,
        "scale": scale,
        "enable_gqa": True,
        "return_aux": AuxRequest(lse=True),
        "kernel_options": _kernel_options(q, k, block_mask),
    }
    if torch.compiler.is_compiling() or not q.is_cuda:
        out, aux = flex_attention(q, k, v, **options)
        return out, aux.lse
    if limit is None:
        limit = (RECOMPILE_LIMIT, "dilattn.engines.gather.RECOMPILE_LIMIT")
    try:
        with _strict_recompile_limit(limit[0]):
            out, aux = (compiled or _compiled_flex)(q, k, v, options)
    except torch._dynamo.exc.FailOnRecompileLimitHit as error:
        raise RuntimeError(
            f"dilattn: compiled FlexAttention met more than {limit[0]} variants (dtype, shapes, "
            "head counts, head dims, mods); refusing to fall back to eager flex, which "
            f"materialises every score. Raise {limit[1]} if you need more."
        ) from error
    return out, aux.lse


def _compiled_flex(q: Tensor, k: Tensor, v: Tensor, options: dict[str, Any]) -> Any:
    """Compiled flex: a kernel for these shapes alone while :data:`_static_shapes` admits
    them, else (and for calls shorter than a query block) the one for dynamic shapes."""
    shapes = (q.shape, k.shape)
    if q.shape[-2] >= BLOCK_SIZE and _static_shapes.admit(shapes):
        try:
            return _compile_flex(True)(q, k, v, **options)
        except torch._dynamo.exc.FailOnRecompileLimitHit:
            _static_shapes.close(shapes)  # its static variants ran out
    return _compile_flex(False)(q, k, v, **options)


def attend_compact(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kv_count: Tensor,
    *,
    is_causal: bool,
    scale: float,
    backend: Backend,
    q_start: Tensor | None = None,
    mods: PositionMods = NO_MODS,
    dropout_p: float = 0.0,
    block_mask: BlockMask | None = None,
) -> tuple[Tensor, Tensor]:
    """Attention of compact queries ``q`` ``(B', H, M_q, D)`` over the first ``kv_count``
    ``(B', H)`` compact keys of ``k``/``v`` ``(B', Hc, M, D)``. Query row ``t`` stands at key
    row ``q_start + t`` (``q_start`` ``(B', H)``, default 0: ``M_q = M``, aligned) and, when
    causal, sees the keys up to that row; ``mods`` act on compact indices, ``dropout_p`` on
    the probabilities (math only); ``block_mask`` (flex only) is :func:`compact_block_mask`
    of these arguments, built earlier. Returns ``(B', H, M_q, D_v)`` and lse ``(B', H, M_q)``.
    """
    if backend == "flex":
        return _flex_attention(q, k, v, kv_count, is_causal, scale, mods, q_start, block_mask)
    return _math_attention(q, k, v, kv_count, is_causal, scale, mods, dropout_p, q_start)


def merge_compact(
    out: Tensor, lse: Tensor, q_target: Tensor, o_rows: Tensor, lse_rows: Tensor
) -> None:
    """Merge compact results ``(B*N, H, M, D_v)`` and lse ``(B*N, H, M)`` in place into the rows
    ``q_target`` ``(N, H, M)`` of ``out`` ``(B, H_out, S + 1, D_v)`` and ``lse``
    ``(B, H_out, S + 1)`` (``H_out`` is ``H``, or 1 to merge all heads into one row list; the
    spare last row takes the padding rows)."""
    heads = torch.arange(out.shape[1], device=out.device).view(1, -1, 1)
    target = (slice(None), heads, q_target)  # (B, N, H, M) rows of out/lse
    new_out, new_lse = merge_by_lse(
        [out[target], rearrange(o_rows, "(b n) h m d -> b n h m d", b=out.shape[0])],
        [lse[target], rearrange(lse_rows, "(b n) h m -> b n h m", b=out.shape[0])],
        out_dtype=out.dtype,
    )
    out[target] = new_out
    lse[target] = new_lse


def branch_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    branches: tuple[tuple[int, int], ...],
    offsets: tuple[tuple[int, ...], ...],
    *,
    is_causal: bool,
    scale: float,
    backend: Backend,
    q_offset: int = 0,
    mods: PositionMods = NO_MODS,
    dropout_p: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """Dilated attention by the branch path: ``(B, H, S_q, Dv)`` and lse ``(B, H, S_q)``;
    query row ``i`` at position ``q_offset + i``, ``mods`` over positions, ``dropout_p`` on
    each branch's probabilities (math backend only)."""
    B, H, q_len, _ = query.shape
    kv_len, group = key.shape[2], H // key.shape[1]
    work = torch.float64 if query.dtype == torch.float64 else torch.float32
    out = query.new_zeros((B, H, q_len + 1, value.shape[-1]), dtype=work)  # + a spare row
    lse = query.new_full((B, H, q_len + 1), -torch.inf, dtype=work)
    heads = torch.arange(H, device=query.device)
    cached = not torch.compiler.is_compiling()
    has_mods = mods.mask_mod is not None or mods.score_mod is not None
    for (w, r), head_offsets in zip(branches, offsets, strict=True):
        args = (w, r, head_offsets, group, q_len, kv_len, q_offset, query.device)
        lay = _cached_layout(*args) if cached else layout(*args)
        block_mask = None
        if backend == "flex" and cached:
            block_mask = _cached_block_mask(args, B, is_causal, mods.mask_mod is not None)
        q_rows = _gather(query, heads, lay.q_index)
        k_rows = _gather(key, lay.kv_heads, lay.kv_index)
        v_rows = _gather(value, lay.kv_heads, lay.kv_index)
        kv_count = lay.kv_count.repeat(B, 1)  # (B*N, H)
        compact = _compact_mods(mods, lay, q_offset, H) if has_mods else mods
        o_rows, lse_rows = attend_compact(
            q_rows,
            k_rows,
            v_rows,
            kv_count,
            is_causal=is_causal,
            scale=scale,
            backend=backend,
            mods=compact,
            dropout_p=dropout_p,
            block_mask=block_mask,
        )
        merge_compact(out, lse, lay.q_target, o_rows, lse_rows)
    return out[:, :, :q_len].to(query.dtype), lse[:, :, :q_len]
