"""The strided path: every branch attends on strided views of q, k and v, with no gather.

Branch ``(w, r)``, the heads with offset ``o``: the rows ``j*w + o + m*r`` of segment ``j``
are a strided view of q (segment stride ``w``, row stride ``r`` positions), and so are the
keys and values. SDPA's cuDNN kernel reads all four strides, so each (branch, offset) is
one call on views of the inputs, exact when ``w % r != 0`` (a call holds only the rows of
one offset, so every row lies inside its segment); where it saves calls, one call instead
holds one head of each offset (head ``i`` starts ``i`` rows later). Each call's rows are
then merged into the output in place by log-sum-exp (a Triton kernel, fp32 in registers;
a call whose heads no earlier branch computed writes instead of merging).

The backward runs cuDNN's backward per call with the merged output and lse, as ring
attention does: with the global ``out`` and ``lse`` the per-call gradients are exactly the
gradient of the merged attention, and they add up into ``dq``, ``dk``, ``dv``.

Shape legend: ``B`` batch, ``H`` query heads, ``G`` heads of one call, ``N`` segments of one
call, ``M`` rows per segment, ``S`` positions, ``D`` head dim.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch
from torch import Tensor

from dilattn._softmax import softmax_with_lse
from dilattn.engines.replay import replay
from dilattn.merge import merge_by_lse

__all__ = ["Call", "new_grads", "new_result", "plan", "strided_attention", "supports", "views"]

aten = torch.ops.aten
CUDNN_MIN_ROWS = 16  # calls with fewer rows per segment run as matmuls
CALL_ROWS = 1 << 21  # rows of one call (its output and lse are temporaries of that size)
GRAPH_ROWS = 1 << 19
"""Calls of at most this many query rows (``B * H * S``) on a CUDA device's default stream
replay a CUDA graph of their kernels (:mod:`dilattn.engines.replay`): below it they are
bound by launch time, not the GPU. 0 turns replay off."""


class Heads(NamedTuple):
    """Heads ``start + i*step`` for ``i < size``; head ``i``'s rows start ``i*shift``
    positions later (``shift`` 1: one head per offset, all offsets in one call)."""

    start: int
    step: int
    size: int
    shift: int = 0


class Rows(NamedTuple):
    """Positions ``start + n*segment_step + m*step`` for ``n < segments``, ``m < rows``."""

    start: int
    segment_step: int
    segments: int
    step: int
    rows: int


class Call(NamedTuple):
    """One attention call: dense (causal) attention inside each segment of ``rows``."""

    q_heads: Heads
    kv_heads: Heads
    rows: Rows
    writes: bool  # its heads' rows are new: write out/lse/dq instead of merging or adding
    writes_kv: bool  # likewise for dk/dv (the first branch, r = 1, every head in one call)


class Plan(NamedTuple):
    calls: tuple[Call, ...]
    zero_fill: bool  # some (head, row) is no writing call's: out, lse and dq start empty


def _progression(values: list[int], shift: int = 0) -> Heads | None:
    step = values[1] - values[0] if len(values) > 1 else 1
    if step <= 0 or any(b - a != step for a, b in itertools.pairwise(values)):
        return None
    return Heads(values[0], step, len(values), shift)


def _head_runs(heads: list[int], group: int) -> list[tuple[Heads, Heads]]:
    """Split query heads into runs whose key/value heads (``h // group``) are a progression
    that SDPA's grouped-query layout maps correctly (query ``i`` -> key ``i // rep``)."""
    q_run = _progression(heads)
    kv = sorted({h // group for h in heads})
    kv_run = _progression(kv)
    if q_run is not None and kv_run is not None and len(heads) % len(kv) == 0:
        rep = len(heads) // len(kv)
        if all(h // group == kv[i // rep] for i, h in enumerate(heads)):
            return [(q_run, kv_run)]
    return [(Heads(h, 1, 1), Heads(h // group, 1, 1)) for h in heads]


Part = tuple[int, int, int]  # first position, segments, segment length


def _rows(length: int, o: int, r: int) -> int:
    """Rows of offset ``o`` in a segment of ``length`` positions."""
    return math.ceil((length - o) / r) if length > o else 0


def _by_offset(
    head_offsets: tuple[int, ...], r: int, group: int, parts: list[Part]
) -> list[tuple[Heads, Heads, int, Part, int]]:
    """Calls as (q heads, kv heads, offset, part, rows): one per offset (and head run)."""
    calls = []
    for o in sorted(set(head_offsets) - {-1}):
        heads = [h for h, offset in enumerate(head_offsets) if offset == o]
        for part in parts:
            if (rows := _rows(part[2], o, r)) > 0:
                calls += [(qh, kvh, o, part, rows) for qh, kvh in _head_runs(heads, group)]
    return calls


def _by_slot(
    head_offsets: tuple[int, ...], r: int, group: int, parts: list[Part]
) -> list[tuple[Heads, Heads, int, Part, int]] | None:
    """Calls that hold one head of each offset (``shift`` 1), offsets with equal rows
    together; None unless every offset has as many heads, in one progression per slot."""
    offsets = sorted(set(head_offsets) - {-1})
    heads = [[h for h, offset in enumerate(head_offsets) if offset == o] for o in offsets]
    if group != 1 or offsets != list(range(len(offsets))) or len({len(x) for x in heads}) != 1:
        return None
    calls = []
    for slot in zip(*heads, strict=True):
        if (run := _progression(list(slot), shift=1)) is None:
            return None
        for part in parts:
            counts = [_rows(part[2], o, r) for o in offsets]
            for rows, same in itertools.groupby(zip(offsets, counts, strict=True), lambda x: x[1]):
                o, *rest = (offset for offset, _ in same)
                if rows > 0:
                    heads_of = run._replace(start=run.start + o * run.step, size=1 + len(rest))
                    calls.append((heads_of, heads_of, o, part, rows))
    return calls


@functools.lru_cache(maxsize=256)
def plan(
    branches: tuple[tuple[int, int], ...],
    offsets: tuple[tuple[int, ...], ...],
    group: int,
    seq_len: int,
    batch: int = 1,
    call_rows: int = CALL_ROWS,
) -> Plan:
    """The calls that compute every branch over ``seq_len`` positions; ``group`` query heads
    share a key/value head; offset -1: the head skips the branch. Per branch, the fewer of:
    one call per offset, or one call per slot (a head of each offset). A call whose heads no
    earlier branch computed writes its rows; later ones merge into them."""
    calls: list[Call] = []
    touched: set[int] = set()
    zero_fill = False
    order = sorted(range(len(branches)), key=lambda i: branches[i][1] != 1)  # r = 1 first
    for index, ((w, r), head_offsets) in enumerate((branches[i], offsets[i]) for i in order):
        w = min(w, seq_len)
        full, tail = divmod(seq_len, w)
        parts = [(0, full, w), (full * w, 1, tail)] if tail else [(0, full, w)]
        by_offset = _by_offset(head_offsets, r, group, parts)
        by_slot = _by_slot(head_offsets, r, group, parts)
        chosen = by_offset if by_slot is None or len(by_slot) >= len(by_offset) else by_slot
        computed = {h for h, o in enumerate(head_offsets) if o >= 0}
        zero_fill |= r > 1 and bool(computed - touched)  # rows this branch skips stay unset
        # keys: the first branch, r = 1, every head in one run per call, covers each row once
        writes_kv = index == 0 and r == 1 and all(c[0].size == len(head_offsets) for c in chosen)
        for q_heads, kv_heads, o, (start, segments, _), rows in chosen:
            heads = {q_heads.start + i * q_heads.step for i in range(q_heads.size)}
            writes = not heads & touched
            # at most call_rows rows a call: its output is a temporary
            chunk = max(1, call_rows // (batch * q_heads.size * rows))
            for first in range(0, segments, chunk):
                rows_of = Rows(start + first * w + o, w, min(chunk, segments - first), r, rows)
                calls.append(Call(q_heads, kv_heads, rows_of, writes, writes_kv))
        touched |= computed
    zero_fill |= len(touched) < len(offsets[0])  # heads no branch computes give 0
    return Plan(tuple(calls), zero_fill)


Spec = tuple[tuple[int, ...], tuple[int, ...], int]  # as_strided's size, stride, offset
Dim = tuple[int, int]  # (size, stride)
TensorLayout = tuple[tuple[int, ...], tuple[int, ...], bool]  # shape, strides, indexed by kv heads


def _join(outer: Dim, inner: Dim) -> Dim | None:
    """Two adjacent dims as one, when that is a view (no copy); else None."""
    (a, sa), (b, sb) = outer, inner
    if a == 1 or b == 1 or sa == b * sb:
        return (a * b, sb if b > 1 else sa)
    return None


def _spec(dims: list[Dim], offset: int) -> Spec:
    return tuple(d[0] for d in dims), tuple(d[1] for d in dims), offset


def _fold(dims: list[Dim], offset: int, mode: int | None) -> list[Spec] | None:
    """The view ``(B, G, N, M, *)`` as 4-D ``(batch, heads, M, *)`` views for SDPA: mode 0
    ``(N, B*G)``, mode 1 ``(B*N, G)``, None one ``(N, G)`` per batch; None where the mode
    would need a copy."""
    b, g, n, m, *rest = dims
    if mode is None:
        return [_spec([n, g, m, *rest], offset + i * b[1]) for i in range(b[0])]
    joined = _join(b, g) if mode == 0 else _join(b, n)
    if joined is None:
        return None
    return [_spec([n, joined, m, *rest] if mode == 0 else [joined, g, m, *rest], offset)]


@functools.lru_cache(maxsize=4096)
def _specs(call: Call, layouts: tuple[TensorLayout, ...]) -> tuple[tuple[Spec, ...], ...]:
    """For one call, per batch piece, the view of each tensor (given as ``(B, H, S, *)``
    layouts); every tensor folds the same way so that their dims line up."""
    views = []
    for shape, stride, by_kv in layouts:
        heads, rows = call.kv_heads if by_kv else call.q_heads, call.rows
        sB, sH, sS, *rest = stride
        dims = [
            (shape[0], sB),
            (heads.size, heads.step * sH + heads.shift * sS),
            (rows.segments, rows.segment_step * sS),
            (rows.rows, rows.step * sS),
            *zip(shape[3:], rest, strict=True),
        ]
        views.append((dims, heads.start * sH + rows.start * sS))
    for mode in (0, 1, None):
        folded = [_fold(dims, offset, mode) for dims, offset in views]
        if all(f is not None for f in folded):
            return tuple(zip(*folded, strict=True))  # type: ignore[arg-type]
    raise AssertionError("unreachable: the per-batch fold is always a view")


def _layout(x: Tensor, by_kv: bool) -> TensorLayout:
    return (tuple(x.shape), tuple(x.stride()), by_kv)


def _at(x: Tensor, spec: Spec) -> Tensor:
    size, stride, offset = spec
    return x.as_strided(size, stride, x.storage_offset() + offset)


def supports(query: Tensor, key: Tensor, value: Tensor) -> str | None:
    """Why the strided path cannot take these inputs, or None when it can."""
    if query.shape[2] != key.shape[2]:
        return "it needs S_q == S_kv"
    if not query.is_cuda:
        return None  # matmul kernels: any float dtype and head dim
    if query.dtype not in (torch.float16, torch.bfloat16):
        return f"on CUDA it needs float16 or bfloat16, got {query.dtype}"
    if any(x.stride(-1) != 1 for x in (query, key, value)):
        return "on CUDA it needs the head dim contiguous (stride 1)"
    if max(query.shape[-1], value.shape[-1]) > 128 or query.shape[-1] % 8 or value.shape[-1] % 8:
        return "on CUDA it needs head dims that are multiples of 8, at most 128"
    return None


def _new_out(query: Tensor, value: Tensor) -> Tensor:
    """The output ``(B, H, S, Dv)``, laid out like the query (no transpose needed after)."""
    if query.shape[-1] == value.shape[-1]:
        return torch.empty_like(query)
    return query.new_empty((*query.shape[:3], value.shape[-1]))


def _sdpa(q: Tensor, k: Tensor, v: Tensor, is_causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    """Attention with lse on ``(X, G, M, D)`` views: ``(X, G, M, Dv)`` and ``(X, G, M)``
    float32 (cuDNN on CUDA; matmul and softmax elsewhere and for tiny calls)."""
    if _cudnn(q):
        out, lse, *_ = aten._scaled_dot_product_cudnn_attention(
            q, k, v, None, True, 0.0, is_causal, False, scale=scale
        )
        return out, lse.view(out.shape[:3])
    probs, lse = softmax_with_lse(_scores(q, k, is_causal, scale), dim=-1)
    return (probs @ _expand(v, q).to(probs.dtype)).to(q.dtype), lse


def _sdpa_backward(
    grad: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    is_causal: bool,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of one call given the MERGED ``out`` and ``lse`` of its rows (``lse``
    ``(X, G, M)`` float32): ``P = exp(s - lse)``, ``dS = P * (grad @ v^T - rowsum(grad * out))``."""
    if _cudnn(q):
        dq, dk, dv = aten._scaled_dot_product_cudnn_attention_backward(
            grad,
            q,
            k,
            v,
            out,
            lse.unsqueeze(-1),
            None,
            None,
            None,
            None,
            None,
            q.shape[2],
            k.shape[2],
            0.0,
            is_causal,
            scale=scale,
        )
        return dq, dk, dv
    work = _work_dtype(q)
    probs = torch.exp(_scores(q, k, is_causal, scale) - lse.to(work).unsqueeze(-1))
    grad_w, out_w = grad.to(work), out.to(work)
    d_probs = grad_w @ _expand(v, q).to(work).transpose(-1, -2)
    d_scores = probs * (d_probs - (grad_w * out_w).sum(-1, keepdim=True)) * scale
    dq = d_scores @ _expand(k, q).to(work)
    dk = _reduce(d_scores.transpose(-1, -2) @ q.to(work), k)
    dv = _reduce(probs.transpose(-1, -2) @ grad_w, k)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _cudnn(q: Tensor) -> bool:
    """cuDNN takes CUDA calls of more than one row (it refuses ``s_q = s_kv = 1``); a
    segment's last few rows are cheaper as matmuls anyway."""
    return q.is_cuda and q.shape[2] >= CUDNN_MIN_ROWS


def _work_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _expand(kv: Tensor, q: Tensor) -> Tensor:
    """Key/value heads repeated to the query heads (SDPA's grouped-query layout)."""
    return kv.repeat_interleave(q.shape[1] // kv.shape[1], dim=1)


def _reduce(grad: Tensor, kv: Tensor) -> Tensor:
    """Sum a gradient over the query heads that share each key/value head."""
    return grad.reshape(grad.shape[0], kv.shape[1], -1, *grad.shape[2:]).sum(2)


def _scores(q: Tensor, k: Tensor, is_causal: bool, scale: float) -> Tensor:
    work = _work_dtype(q)
    scores = q.to(work) @ _expand(k, q).to(work).transpose(-1, -2) * scale
    if is_causal:
        rows = torch.arange(q.shape[2], device=q.device)
        scores = scores.masked_fill(rows.view(-1, 1) < rows, -torch.inf)
    return scores


def _add_rows(target: Tensor, piece: Tensor, write: bool) -> None:
    """``target += piece`` (``write``: ``=``) on a ``(X, G, M, D)`` view of a gradient."""
    if target.is_cuda:
        from dilattn.engines.merge_kernels import add_rows_

        add_rows_(target, piece, write)
    elif write:
        target.copy_(piece)
    else:
        target.add_(piece)


def _merge_into(acc: Tensor, acc_lse: Tensor, out: Tensor, lse: Tensor, write: bool) -> None:
    """``acc`` ``(X, G, M, D)`` and ``acc_lse`` ``(X, G, M)`` (views of the result) absorb
    one call's ``out``/``lse`` by log-sum-exp, in place (``write``: overwrite)."""
    if acc.is_cuda:
        from dilattn.engines.merge_kernels import merge_into_

        merge_into_(acc, acc_lse, out, lse, write)
    elif write:
        acc.copy_(out)
        acc_lse.copy_(lse)
    else:  # off CUDA: the one torch-op merge
        merged, merged_lse = merge_by_lse([acc, out], [acc_lse, lse], out_dtype=acc.dtype)
        acc.copy_(merged)
        acc_lse.copy_(merged_lse)


def new_result(query: Tensor, value: Tensor, plan: Plan) -> tuple[Tensor, Tensor]:
    """The output ``(B, H, S, Dv)`` and lse ``(B, H, S)`` the calls of ``plan`` write or
    merge into; rows no branch covers start at 0 with lse ``-inf``."""
    out = _new_out(query, value)
    lse = query.new_empty(query.shape[:3], dtype=_work_dtype(query))
    if plan.zero_fill:
        out.zero_()
        lse.fill_(-torch.inf)
    return out, lse


def new_grads(query: Tensor, key: Tensor, value: Tensor, plan: Plan) -> tuple[Tensor, ...]:
    """``dq``, ``dk``, ``dv`` the calls of ``plan`` write or add into: zeros only where no
    call writes first."""
    writes_kv = bool(plan.calls) and plan.calls[0].writes_kv
    dq = (torch.zeros_like if plan.zero_fill else torch.empty_like)(query)
    dk, dv = ((torch.empty_like if writes_kv else torch.zeros_like)(x) for x in (key, value))
    return dq, dk, dv


def views(
    plan: Plan,
    tensors: tuple[Tensor, ...],
    by_kv: tuple[int, ...],
    extra: tuple[TensorLayout, ...] = (),
) -> Iterator[tuple[Call, tuple[Spec, ...]]]:
    """Each call of ``plan``, once per batch piece, with the view spec of each of
    ``tensors`` (``(B, H, S, *)``; those at ``by_kv`` indexed by key/value heads) and of
    each ``extra`` layout, folded alike."""
    layouts = tuple(_layout(x, by_kv=i in by_kv) for i, x in enumerate(tensors)) + extra
    for call in plan.calls:
        for specs in _specs(call, layouts):
            yield call, specs


def _forward(
    query: Tensor, key: Tensor, value: Tensor, plan: Plan, is_causal: bool, scale: float
) -> tuple[Tensor, Tensor]:
    out, lse = new_result(query, value, plan)
    tensors = (query, key, value, out, lse)
    for call, specs in views(plan, tensors, by_kv=(1, 2)):
        q, k, v, o, l = (_at(x, spec) for x, spec in zip(tensors, specs, strict=True))
        _merge_into(o, l, *_sdpa(q, k, v, is_causal, scale), call.writes)
    return out, lse


def _backward(
    grad_out: Tensor,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    out: Tensor,
    lse: Tensor,
    plan: Plan,
    is_causal: bool,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    dq, dk, dv = new_grads(query, key, value, plan)
    tensors = (grad_out, query, key, value, out, lse, dq, dk, dv)
    for call, specs in views(plan, tensors, by_kv=(2, 3, 7, 8)):
        g, q, k, v, o, l, *targets = (_at(x, spec) for x, spec in zip(tensors, specs, strict=True))
        pieces = _sdpa_backward(g, q, k, v, o, l.contiguous(), is_causal, scale)
        writes = (call.writes, call.writes_kv, call.writes_kv)
        for target, piece, write in zip(targets, pieces, writes, strict=True):
            _add_rows(target, piece, write)
    return dq, dk, dv


def _launch(
    fn: Callable[..., tuple[Tensor, ...]],
    tensors: tuple[Tensor, ...],
    plan: Plan,
    is_causal: bool,
    scale: float,
) -> tuple[Tensor, ...]:
    """``fn(*tensors, plan, is_causal, scale)`` (``tensors[0]`` ``(B, H, S, *)``), replaying a
    CUDA graph of its kernels when on CUDA with at most ``GRAPH_ROWS`` rows, on the device's
    default stream (captures, such as ``torch.compile``'s ``reduce-overhead`` graphs, and their
    warm-ups run on other streams, and graph the call themselves)."""
    run = functools.partial(fn, plan=plan, is_causal=is_causal, scale=scale)
    x = tensors[0]
    if (
        not x.is_cuda
        or x.shape[0] * x.shape[1] * x.shape[2] > GRAPH_ROWS
        or torch.cuda.current_stream(x.device) != torch.cuda.default_stream(x.device)
    ):
        return run(*tensors)
    return replay((fn.__name__, plan, is_causal, scale), run, tensors)


def _unpack(branches: list[int], offsets: list[int], query: Tensor, key: Tensor) -> Plan:
    """The plan, from the custom ops' flat arguments."""
    batch, heads, seq_len = query.shape[:3]
    pairs = tuple(zip(branches[::2], branches[1::2], strict=True))
    table = tuple(tuple(offsets[i * heads : (i + 1) * heads]) for i in range(len(pairs)))
    return plan(pairs, table, heads // key.shape[1], seq_len, batch)


@torch.library.custom_op("dilattn::strided_attention", mutates_args=())
def _strided_op(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    branches: list[int],
    offsets: list[int],
    is_causal: bool,
    scale: float,
) -> tuple[Tensor, Tensor]:
    plan = _unpack(branches, offsets, query, key)
    out, lse = _launch(_forward, (query, key, value), plan, is_causal, scale)
    return out, lse


@_strided_op.register_fake
def _(query: Tensor, key: Tensor, value: Tensor, *args: Any) -> tuple[Tensor, Tensor]:
    return _new_out(query, value), query.new_empty(query.shape[:3], dtype=_work_dtype(query))


def _fold_lse_grad(grad_out: Tensor, out: Tensor, grad_lse: Tensor) -> list[tuple[Tensor, Tensor]]:
    """``(grad, out)`` pairs whose backward calls sum to the gradient of both outputs.

    A call's backward uses ``out`` only in ``rowsum(grad * out)``, and a gradient on the lse
    adds ``P * grad_lse`` to ``dS``: the same as lowering that rowsum by ``grad_lse``. So
    ``out' = out + c * grad`` with ``c = -grad_lse / |grad|^2`` per row carries it. Rows with
    no output gradient get ``grad + 1`` here and ``-1`` (with ``out = 0``) in a second call."""
    work = _work_dtype(out)
    g = grad_out.to(work)
    target = (g * out.to(work)).sum(-1) - grad_lse.to(work)  # the rowsum wanted
    norm = (g * g).sum(-1)
    pairs = []
    idle = (norm == 0) & (target != 0)
    if idle.any():
        lift = idle.unsqueeze(-1).to(work).expand_as(g)
        g = g + lift
        norm = (g * g).sum(-1)
        pairs.append(((-lift).to(grad_out.dtype).contiguous(), torch.zeros_like(out)))
    shift = torch.where(norm > 0, (target - (g * out.to(work)).sum(-1)) / norm, 0.0)
    folded = (out.to(work) + shift.unsqueeze(-1) * g).to(out.dtype)
    return [(g.to(grad_out.dtype), folded), *pairs]


@torch.library.custom_op("dilattn::strided_attention_backward", mutates_args=())
def _strided_backward_op(
    grad_out: Tensor,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    out: Tensor,
    lse: Tensor,
    grad_lse: Tensor | None,
    branches: list[int],
    offsets: list[int],
    is_causal: bool,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    plan = _unpack(branches, offsets, query, key)
    pairs = [(grad_out, out)]
    if grad_lse is not None:
        grad_lse = grad_lse.nan_to_num(0.0)
        if bool(grad_lse.any()):  # compiled code passes zeros when the lse has no gradient
            pairs = _fold_lse_grad(grad_out, out, grad_lse)
    tensors = [(g, query, key, value, o, lse) for g, o in pairs]
    grads = [_launch(_backward, x, plan, is_causal, scale) for x in tensors]
    dq, dk, dv = (sum(parts[1:], parts[0]) for parts in zip(*grads, strict=True))
    return dq, dk, dv


@_strided_backward_op.register_fake
def _(
    grad_out: Tensor, query: Tensor, key: Tensor, value: Tensor, *args: Any
) -> tuple[Tensor, Tensor, Tensor]:
    return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor]) -> None:
    query, key, value, branches, offsets, is_causal, scale = inputs
    ctx.save_for_backward(query, key, value, *output)
    ctx.set_materialize_grads(False)  # no lse gradient: None, not zeros
    ctx.args = (branches, offsets, is_causal, scale)


def _backward_rule(ctx: Any, grad_out: Tensor | None, grad_lse: Tensor | None) -> tuple[Any, ...]:
    query, key, value, out, lse = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    grad_out = grad_out.contiguous() if grad_out.stride(-1) != 1 else grad_out
    grads = _strided_backward_op(grad_out, query, key, value, out, lse, grad_lse, *ctx.args)
    return (*grads, None, None, None, None)


_strided_op.register_autograd(_backward_rule, setup_context=_setup_context)


def strided_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    branches: tuple[tuple[int, int], ...],
    offsets: tuple[tuple[int, ...], ...],
    *,
    is_causal: bool,
    scale: float,
) -> tuple[Tensor, Tensor]:
    """Dilated attention by the strided path: ``(B, H, S, Dv)`` and lse ``(B, H, S)``."""
    out, lse = _strided_op(
        query,
        key,
        value,
        [x for pair in branches for x in pair],
        [o for row in offsets for o in row],
        is_causal,
        scale,
    )
    return out, lse
