"""The whole speed and memory comparison, in one process on one GPU.

    python benchmarks/suite.py --json docs/bench.json          # the full suite (H100: ~6 min)
    python benchmarks/plot.py docs/bench.json docs/bench.png   # time and memory against S

Studies (``--studies``): ``paper`` (the paper's configuration against dense SDPA, the
gathered flex path and the one-line mask, forward and forward+backward, up to the longest
length that fits), ``peer`` (head-for-head against dilated-attention-pytorch 0.2.0),
``long`` (forward to 8M tokens, forward+backward to 4M), ``d128`` (H=8, D=128), ``pow2``
(r = 1, 2, 4, 8, 16), ``lengths`` (20 different lengths
through a compiled module: compile count, no eager flex) and ``local`` (causal local
attention, window 512, one bucket back, H=8 D=64: dilattn's sliding and bucketed windows
against the ``local-attention`` package and flex with a ``create_block_mask`` sliding window,
whose mask build time is noted), ``mixed_lm`` (training steps of a whole LM with local
and global heads against ``linear-attention-transformer``: tokens/s and peak memory) and
``features`` (every option a training run uses, at 128K and 1M: documents, padding, ALiBi,
T5, ``q_offset``, GQA, a local window; the ratio to the plain call, useful TFLOP/s and the
engine ``dilattn.explain`` names; not in the default list). Inputs rotate between several
sets where memory allows, so the L2 cache holds no stale copy; times are CUDA-event medians
after warm-up; TFLOP/s count useful FLOPs (docs/maths.md) and are set against the bf16 matmul
peak measured in the same run. ``--quick`` runs tiny sizes (CPU too) to prove it works.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import importlib.util
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torch import Tensor
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

import dilattn
from dilattn.config import DilatedConfig

PAPER = ((2048, 4096, 8192, 16384, 32768), (1, 2, 4, 6, 12))
POW2 = ((2048, 4096, 8192, 16384, 32768), (1, 2, 4, 8, 16))
ROTATE_BYTES = 8 << 30  # rotate input sets while they take at most this much memory
STANDIN = Path(__file__).parent / "xformers_standin"


@dataclass
class Setup:
    """One study's shapes and what to time."""

    seq_lens: Sequence[int]
    heads: int = 12
    head_dim: int = 64
    config: DilatedConfig = field(default_factory=lambda: DilatedConfig(*PAPER))
    backward: Sequence[bool] = (False, True)


@dataclass
class Bench:
    device: torch.device
    dtype: torch.dtype
    repeats: int
    quick: bool
    rows: list[dict[str, Any]] = field(default_factory=list)
    on_row: Callable[[], object] | None = None  # e.g. save the JSON: a cut-off run keeps rows
    impls: Sequence[str] = ()  # measure only these rows (all when empty)

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        if self.on_row is not None:
            self.on_row()

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def time_ms(self, fn: Callable[[int], object], sets: int) -> float:
        """Median ms of ``fn(i)`` (``i`` picks the input set, rotating) after warm-up."""
        for i in range(3 if self.cuda else 1):
            fn(i % sets)
        times = []
        for i in range(self.repeats):
            if self.cuda:
                start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
                start.record()
                fn(i % sets)
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            else:
                begin = time.perf_counter()
                fn(i % sets)
                times.append((time.perf_counter() - begin) * 1e3)
        return statistics.median(times)

    def peak_ratio(
        self, fn: Callable[[int], object], io_bytes: int, input_bytes: int
    ) -> float | None:
        """Peak memory of one call, inputs included, over the bytes of q, k, v and output;
        None off CUDA (no allocator statistics there)."""
        if not self.cuda:
            return None
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn(0)
        torch.cuda.synchronize()
        return (input_bytes + torch.cuda.max_memory_allocated() - before) / io_bytes


def _qkv(bench: Bench, B: int, H: int, S: int, D: int, layout: str, grad: bool) -> list[Tensor]:
    """Fresh q, k, v as ``(B, H, S, D)`` tensors (views of ``(B, S, H, D)`` for "bshd")."""
    shape = (B, S, H, D) if layout == "bshd" else (B, H, S, D)
    out = []
    for _ in range(3):
        x = torch.randn(shape, device=bench.device, dtype=bench.dtype)
        x = x.transpose(1, 2) if layout == "bshd" else x
        out.append(x.requires_grad_(grad))
    return out


def _measure(
    bench: Bench,
    study: str,
    impl: str,
    S: int,
    make: Callable[[], list[Tensor]],
    call: Callable[[list[Tensor]], Tensor],
    flops: float,
    backward: bool,
) -> None:
    """Time ``call`` forward (or forward+backward) on rotating input sets; add one row."""
    if bench.impls and impl not in bench.impls:
        return
    row: dict[str, Any] = {"study": study, "impl": impl, "seq_len": S, "backward": backward}
    try:
        first = make()
        per_set = sum(x.numel() * x.element_size() for x in first)
        count = max(1, min(3, ROTATE_BYTES // max(per_set, 1))) if bench.cuda else 1
        sets = [first] + [make() for _ in range(count - 1)]
        grads = [torch.randn_like(first[0])] if backward else []

        def step(i: int) -> object:
            out = call(sets[i])
            if backward:
                return torch.autograd.grad(out, sets[i], grads[0])
            return out

        with torch.no_grad() if not backward else contextlib.nullcontext():
            ms = bench.time_ms(step, len(sets))
            del sets[1:]  # memory is measured with one set alive
            io = per_set + first[0].numel() * first[0].element_size()
            ratio = bench.peak_ratio(step, io, per_set)
        work = flops * (3.5 if backward else 1.0)  # a backward counts as 2.5 forwards
        row.update(ms=ms, tflops=work / ms / 1e9, peak_ratio=ratio, sets=count)
        row["peak_gib"] = ratio * io / 2**30 if ratio is not None else None
    except torch.OutOfMemoryError:
        row["note"] = "out of memory"
    finally:
        if bench.cuda:
            torch.cuda.empty_cache()
    bench.add(row)


def _dilated(
    config: DilatedConfig, causal: bool, **kwargs: Any
) -> Callable[[list[Tensor]], Tensor]:
    seg, rates, offsets = config.segment_lengths, config.dilation_rates, config.head_offsets
    return lambda qkv: dilattn.dilated_attention(
        *qkv, seg, rates, is_causal=causal, head_offsets=offsets, **kwargs
    )  # type: ignore[return-value]


def _one_line(
    bench: Bench, config: DilatedConfig, H: int, S: int
) -> Callable[[list[Tensor]], Tensor]:
    seg, rates = config.segment_lengths, config.dilation_rates
    mask = dilattn.flex_mask(seg, rates, q_len=S, num_heads=H, is_causal=True, device=bench.device)
    flex = torch.compile(flex_attention, dynamic=False) if bench.cuda else flex_attention
    return lambda qkv: flex(*qkv, block_mask=mask.block_mask, score_mod=mask.score_mod)


def _sdpa(qkv: list[Tensor]) -> Tensor:
    return F.scaled_dot_product_attention(*qkv, is_causal=True)


def study_paper(bench: Bench, setup: Setup, study: str = "paper") -> None:
    """dilattn (auto: the strided path; eager, and up to 64K compiled in the default mode and
    with CUDA graphs) against dense SDPA, the gathered flex branch path and the one-line mask; the
    comparisons stop where they would take too long."""
    H, D, config = setup.heads, setup.head_dim, setup.config
    for backward in setup.backward:
        for S in setup.seq_lens:
            flops = config.flops(S, num_heads=H, head_dim=D, is_causal=True)
            dense = 4 * H * S * S * D / 2
            make = lambda: _qkv(bench, 1, H, S, D, "bhsd", backward)  # noqa: B023
            impls: list[tuple[str, Callable[[list[Tensor]], Tensor], float]] = [
                ("dilattn", _dilated(config, True), flops)
            ]
            flex_limit, dense_limit = (4096, 4096) if bench.quick else (1 << 17, 1 << 18)
            graph_limit = 4096 if bench.quick else 1 << 16
            small = flex_limit >= S
            if small and bench.cuda:
                impls.append(("dilattn-flex", _dilated(config, True, backend="flex"), flops))
            if graph_limit >= S and bench.cuda:  # compiled as users do, and with CUDA graphs
                compiled = torch.compile(_dilated(config, True))
                graphed = torch.compile(_dilated(config, True), mode="reduce-overhead")
                impls += [("dilattn-compiled", compiled, flops)]
                impls += [("dilattn-graphed", graphed, flops)]
            if small and not backward and (bench.cuda or S <= 512):
                impls.append(("one-line-mask", _one_line(bench, config, H, S), flops))
            if dense_limit >= S:
                impls.append(("sdpa-dense", _sdpa, dense))
            for name, call, work in impls:
                _measure(bench, study, name, S, make, call, work, backward)


@contextlib.contextmanager
def _xformers_standin() -> Iterator[None]:
    """Serve dilated-attention-pytorch's one xformers call with SDPA (xformers has no build
    for current torch): ``memory_efficient_attention`` and ``LowerTriangularMask``."""
    sys.path.insert(0, str(STANDIN))
    try:
        yield
    finally:
        sys.path.remove(str(STANDIN))


def study_peer(bench: Bench, setup: Setup) -> None:
    """Head-for-head against dilated-attention-pytorch 0.2.0: each head computes ONE branch
    (``head_offsets="split"``), inputs ``(B, S, H, D)`` as it takes them; speed and memory
    (its normalisation differs, so the outputs are not compared)."""
    if importlib.util.find_spec("dilated_attention_pytorch") is None:
        bench.rows.append(
            {
                "study": "peer",
                "impl": "dilated-attention-pytorch",
                "note": "not installed: pip install --no-deps dilated-attention-pytorch==0.2.0",
            }
        )
        return
    with _xformers_standin():
        from dilated_attention_pytorch.dilated_attention import (  # type: ignore[import-untyped]
            DilatedAttention,
        )

    H, D = setup.heads, setup.head_dim
    config = DilatedConfig(setup.config.segment_lengths, setup.config.dilation_rates, "split")
    peer = DilatedAttention(list(config.segment_lengths), list(config.dilation_rates))
    for backward in setup.backward:
        for S in setup.seq_lens:
            flops = config.flops(S, num_heads=H, head_dim=D, is_causal=True)
            make = lambda: _qkv(bench, 1, H, S, D, "bshd", backward)  # noqa: B023
            theirs = lambda qkv: peer(*(x.transpose(1, 2) for x in qkv), is_causal=True).transpose(
                1, 2
            )
            _measure(bench, "peer", "dilated-attention-pytorch", S, make, theirs, flops, backward)
            _measure(
                bench, "peer", "dilattn-split", S, make, _dilated(config, True), flops, backward
            )


def study_lengths(bench: Bench, seq_lens: Sequence[int]) -> None:
    """A compiled module fed a new length every call: how often it compiles."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    module = dilattn.DilatedAttention(
        *PAPER if not bench.quick else ((64, 128), (1, 2)), is_causal=True
    )
    compiled = torch.compile(module)
    start = time.perf_counter()
    for S in seq_lens:
        q, k, v = _qkv(bench, 1, 12, S, 64, "bhsd", False)
        compiled(q, k, v)
    bench.rows.append(
        {
            "study": "lengths",
            "impl": "torch.compile(DilatedAttention)",
            "lengths": list(seq_lens),
            "frames_compiled": counters["stats"]["unique_graphs"],
            "seconds": time.perf_counter() - start,
        }
    )


def useful_pairs(
    config: DilatedConfig,
    num_heads: int,
    seq_len: int,
    *,
    is_causal: bool,
    document_ids: Tensor | None = None,
    key_padding_mask: Tensor | None = None,
    q_start: int = 0,
) -> float:
    """(query, key) pairs the branches compute, summed over batch rows, heads and branches:
    pairs inside one segment, one document (``document_ids`` nondecreasing), on no padding
    key, key at or before the query when causal, queries from position ``q_start`` on. The
    local window counts its pairs too. Useful FLOPs are ``4 * D`` per pair."""
    device = document_ids if document_ids is not None else key_padding_mask
    device = device.device if device is not None else torch.device("cpu")
    batch = next((x.shape[0] for x in (document_ids, key_padding_mask) if x is not None), 1)
    total = 0.0
    for (w, r), offsets in zip(config.branches, config.offsets(num_heads), strict=True):
        w = min(w, seq_len)
        for o in set(offsets) - {-1}:
            heads = offsets.count(o)
            start = torch.arange(0, seq_len, w, device=device).view(-1, 1)
            pos = (start + o + r * torch.arange(-(-(w - o) // r), device=device)).flatten()
            pos = pos[pos < seq_len]  # rows j*w + o + m*r, m < ceil((w - o) / r): in segment j
            group = (pos // w).expand(batch, -1)
            if document_ids is not None:
                group = group * (int(document_ids.max()) + 1) + document_ids[:, pos]
            valid = (
                ~key_padding_mask[:, pos]
                if key_padding_mask is not None
                else torch.ones_like(group, dtype=torch.bool)
            )
            total += heads * _pairs(group, valid, pos >= q_start, is_causal)
    if config.local_window is not None:
        n = config.local_window
        p = torch.arange(q_start, seq_len, device=device)
        keys = (
            torch.clamp(p, max=n) + 1
            if is_causal
            else p.clamp(max=n) + (seq_len - 1 - p).clamp(max=n) + 1
        )
        total += float(keys.sum()) * num_heads * batch
    return total


def _pairs(group: Tensor, valid: Tensor, queries: Tensor, is_causal: bool) -> float:
    """Visible pairs of rows ``(B, N)`` grouped by the nondecreasing ``group``: each query (a
    row where ``queries``) sees the valid keys of its group (up to itself when causal)."""
    pairs = 0.0
    for g, ok in zip(group, valid, strict=True):
        _, counts = torch.unique_consecutive(g, return_counts=True)
        seen = ok.long().cumsum(0)
        upto_end = seen[counts.cumsum(0) - 1]  # valid keys up to each group's end
        before = torch.cat([seen.new_zeros(1), upto_end[:-1]])  # ... before its start
        if is_causal:
            sees = seen - before.repeat_interleave(counts)
        else:
            sees = (upto_end - before).repeat_interleave(counts)
        pairs += float(sees[queries].sum())
    return pairs


def _features(
    bench: Bench, S: int, H: int
) -> list[tuple[str, int, dict[str, Any], Callable[[], dict[str, Any]]]]:
    """The rows of :func:`study_features`: name, batch size, call options, and the tensors
    of the options (built on demand)."""
    gen = torch.Generator().manual_seed(0)
    device = bench.device

    def docs(n: int | None) -> dict[str, Any]:
        if n is None:  # random lengths: a boundary after each position with p = 16 / S
            ids = (torch.rand(1, S, generator=gen) < 16 / S).cumsum(-1)
        else:
            ids = (torch.arange(S) // -(-S // n)).view(1, S)
        return {"document_ids": ids.to(device)}

    def padding(share: float) -> dict[str, Any]:
        mask = torch.zeros(2, S, dtype=torch.bool)
        mask[0, S - int(share * S) :] = True
        mask[1, S - int(share * S / 2) :] = True  # the second row: another length
        return {"key_padding_mask": mask.to(device)}

    t5 = dilattn.T5RelativeBias(H, bidirectional=False, device=device)
    return [
        ("plain", 1, {}, dict),
        ("plain, backend=flex", 1, {"backend": "flex"}, dict),
        ("documents: 8 equal", 1, {}, lambda: docs(8)),
        ("documents: 64 equal", 1, {}, lambda: docs(64)),
        ("documents: random", 1, {}, lambda: docs(None)),
        ("plain, B=2", 2, {}, dict),
        ("padding: 5% / 2.5%, B=2", 2, {}, lambda: padding(0.05)),
        ("padding: 50% / 25%, B=2", 2, {}, lambda: padding(0.5)),
        ("ALiBi", 1, {"score_mod": dilattn.alibi_score_mod(H)}, dict),
        ("T5 bias (learned)", 1, {"score_mod": t5.score_mod}, dict),
        ("q_offset: last half of the queries", 1, {"q_offset": S // 2}, dict),
        ("GQA, 4 kv heads", 1, {"enable_gqa": True}, dict),
        ("local_window=1024", 1, {"local_window": 1024}, dict),
    ]


def _feature_inputs(
    bench: Bench, B: int, H: int, S: int, D: int, q_offset: int, kv_heads: int, grad: bool
) -> list[Tensor]:
    """q ``(B, H, S - q_offset, D)`` and k, v ``(B, kv_heads, S, D)``."""
    q = _qkv(bench, B, H, S - q_offset, D, "bhsd", grad)[0]
    return [q, *_qkv(bench, B, kv_heads, S, D, "bhsd", grad)[:2]]


def study_features(bench: Bench, setup: Setup) -> None:
    """Every option a training run uses, at the paper configuration, forward and
    forward+backward: time, the ratio to the plain call of the same batch size, useful
    TFLOP/s (pairs that documents or padding hide are not counted) and the engine."""
    H, D, base = setup.heads, setup.head_dim, setup.config
    seg, rates = base.segment_lengths, base.dilation_rates
    for backward in setup.backward:
        for S in setup.seq_lens:
            plain_ms: dict[int, float] = {}
            for name, B, options, tensors in _features(bench, S, H):
                if backward and name.startswith("T5") and S > 1 << 17 and not bench.quick:
                    note = "not run: the table's gradient is atomics-bound (see 128K)"
                    bench.add({"study": "features", "impl": name, "seq_len": S, "note": note})
                    continue
                extra = {**options, **tensors()}
                config = DilatedConfig(seg, rates, local_window=extra.get("local_window"))
                q_offset = extra.get("q_offset", 0)
                kv_heads = 4 if extra.get("enable_gqa") else H
                make = functools.partial(
                    _feature_inputs, bench, B, H, S, D, q_offset, kv_heads, backward
                )
                pairs = useful_pairs(
                    config,
                    H,
                    S,
                    is_causal=True,
                    document_ids=extra.get("document_ids"),
                    key_padding_mask=extra.get("key_padding_mask"),
                    q_start=q_offset,
                )
                pairs *= 1 if "key_padding_mask" in extra else B
                try:
                    engine = dilattn.explain(*make(), seg, rates, **extra).engine
                except ValueError as refused:  # e.g. flex training on a CPU (--quick)
                    bench.add(
                        {"study": "features", "impl": name, "seq_len": S, "note": str(refused)[:60]}
                    )
                    continue
                call = lambda qkv, extra=extra: dilattn.dilated_attention(
                    *qkv, seg, rates, is_causal=True, **extra
                )
                _measure(bench, "features", name, S, make, call, 4 * D * pairs, backward)
                row = bench.rows[-1]
                row["engine"] = engine
                if name.startswith("plain") and "backend" not in options and "ms" in row:
                    plain_ms[B] = row["ms"]
                if "ms" in row and B in plain_ms:
                    row["vs_plain"] = row["ms"] / plain_ms[B]
                if bench.on_row is not None:
                    bench.on_row()


def _timed(build: Callable[[], Any], bench: Bench) -> tuple[Any, float]:
    """``build()`` and the seconds it took (synchronised)."""
    start = time.perf_counter()
    built = build()
    if bench.cuda:
        torch.cuda.synchronize()
    return built, time.perf_counter() - start


Impl = tuple[str, Callable[[list[Tensor]], Tensor], float, str]  # name, call, FLOPs, note


def _local_impls(bench: Bench, S: int, W: int, H: int, D: int, peer: Any, flex: Any) -> list[Impl]:
    """The implementations of the ``local`` study at length ``S``, their masks built."""
    from dilattn.config import Window
    from dilattn.engines.window import window_block_mask

    flops = {e: 4 * H * S * D * (W + (1 if e else (W + 1) / 2)) for e in (True, False)}
    impls: list[Impl] = []
    for exact, kind in ((True, "sliding"), (False, "bucketed")):
        window = Window(W, 1, 0, exact, True)
        _, seconds = _timed(
            lambda w=window: window_block_mask(w, q_len=S, kv_len=S, device=bench.device), bench
        )
        call = lambda qkv, e=exact: dilattn.local_attention(  # type: ignore[misc]
            *qkv, W, is_causal=True, exact_windowsize=e
        )
        impls.append((f"dilattn-local-{kind}", call, flops[exact], f"mask {seconds:.3f} s"))
    if peer is not None:
        impls.append(("local-attention", lambda qkv: peer(*qkv), flops[False], ""))
    if (4096 if bench.quick else 1 << 16) >= S:  # at 128K its mask build asked for 128 GiB

        def sliding(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            return (kv_idx <= q_idx) & (q_idx - kv_idx <= W)

        mask, seconds = _timed(
            lambda: create_block_mask(sliding, None, None, S, S, device=bench.device), bench
        )
        call = lambda qkv: flex(*qkv, block_mask=mask)
        impls.append(("flex-create_block_mask", call, flops[True], f"mask {seconds:.3f} s"))
    return impls


def study_local(bench: Bench, seq_lens: Sequence[int]) -> None:
    """Causal local attention, window ``W`` with one bucket back, ``B=1 H=8 D=64``: dilattn's
    sliding and bucketed windows (analytic block mask; its build time noted),
    ``local-attention`` 1.11.2 (bucketed) and flex with a ``create_block_mask`` sliding window
    (build time noted; up to 64K: at 128K ``create_block_mask`` asked for 128 GiB). Useful
    FLOPs count the visible pairs: ``W + 1`` keys per query sliding, ``W + (W + 1) / 2`` on
    average bucketed. Forward+backward on CUDA only (flex has no CPU backward)."""
    H, D, W = 8, 64, 16 if bench.quick else 512
    peer = None
    if importlib.util.find_spec("local_attention") is not None:
        from local_attention import LocalAttention as Peer  # type: ignore[import-untyped]

        peer = Peer(window_size=W, causal=True, look_backward=1)
    flex = torch.compile(flex_attention, dynamic=False) if bench.cuda else flex_attention
    for backward in (False, True) if bench.cuda else (False,):
        for S in seq_lens:
            make = lambda: _qkv(bench, 1, H, S, D, "bhsd", backward)  # noqa: B023
            for name, call, work, note in _local_impls(bench, S, W, H, D, peer, flex):
                _measure(bench, "local", name, S, make, call, work, backward)
                bench.rows[-1].setdefault("note", note)


def _mixed_models(
    quick: bool,
) -> tuple[dict[str, Callable[[int], torch.nn.Module]], dict[str, int]]:
    """The ``mixed_lm`` contestants (each built for a context ``S``) at one size: ``dim``,
    ``depth``, ``heads`` (``local`` of them local with window ``W``, the rest global), FFN
    ``4 * dim``, vocabulary 256."""
    size = {"dim": 64, "depth": 2, "heads": 4, "local": 2, "W": 16}
    if not quick:
        size = {"dim": 512, "depth": 8, "heads": 8, "local": 4, "W": 256}
    dim, heads, local = size["dim"], size["heads"], size["local"]
    branches = ((32, 64), (1, 2)) if quick else PAPER

    def ours(plan: dilattn.HeadCounts) -> Callable[[int], torch.nn.Module]:
        config = dilattn.LongNetConfig(
            d_model=dim, num_heads=heads, num_layers=size["depth"], ffn_dim=4 * dim,
            segment_lengths=branches[0], dilation_rates=branches[1], head_plan=plan,
            local_window_size=size["W"],
        )  # fmt: skip
        return lambda S: dilattn.LongNetLM(256, config)

    models = {
        "dilattn-local+linear": ours(dilattn.HeadCounts(local=local, linear=heads - local)),
        "dilattn-local+dilated": ours(dilattn.HeadCounts(local=local, dilated=heads - local)),
    }
    if importlib.util.find_spec("linear_attention_transformer") is not None:
        from linear_attention_transformer import (  # type: ignore[import-untyped]
            LinearAttentionTransformerLM,
        )

        models["linear-attention-transformer"] = lambda S: LinearAttentionTransformerLM(
            num_tokens=256, dim=dim, depth=size["depth"], max_seq_len=S, heads=heads,
            dim_head=dim // heads, causal=True, n_local_attn_heads=local,
            local_attn_window_size=size["W"],
        )  # fmt: skip
    return models, size


def study_mixed_lm(bench: Bench, seq_lens: Sequence[int]) -> None:
    """Training steps (forward, cross-entropy, backward; bf16 autocast on CUDA) of whole
    language models with local heads and global heads, one sequence of ``S`` tokens: ours
    with the peer's plan (local + global linear heads) and with dilated global heads, against
    ``linear-attention-transformer`` 0.19.1 (local + causal linear heads, its defaults:
    axial positions, no reversibility) at the same size. Noted: tokens/s and (CUDA) peak
    memory, parameters and gradients included. Eager modules (our flex calls are compiled
    inside)."""
    models, size = _mixed_models(bench.quick)
    for S in seq_lens:
        tokens = torch.randint(0, 256, (1, S + 1), device=bench.device)
        for name, build in models.items():
            row: dict[str, Any] = {"study": "mixed_lm", "impl": name, "seq_len": S}
            row |= {"backward": True, **size}
            try:
                model = build(S).to(bench.device)

                def step(i: int) -> None:
                    with torch.autocast(bench.device.type, torch.bfloat16, enabled=bench.cuda):
                        logits = model(tokens[:, :-1])  # noqa: B023
                    loss = F.cross_entropy(logits.flatten(0, 1).float(), tokens[0, 1:])  # noqa: B023
                    loss.backward()
                    model.zero_grad(set_to_none=True)  # noqa: B023

                ms = bench.time_ms(step, 1)
                row.update(ms=ms, tokens_per_s=S / ms * 1e3, peak_gib=_peak_gib(bench, step))
                peak = "" if row["peak_gib"] is None else f", peak {row['peak_gib']:.2f} GiB"
                row["note"] = f"{row['tokens_per_s']:.0f} tokens/s{peak}"
            except torch.OutOfMemoryError:
                row["note"] = "out of memory"
            finally:
                model = None
                if bench.cuda:
                    torch.cuda.empty_cache()
            bench.add(row)


def _peak_gib(bench: Bench, fn: Callable[[int], object]) -> float | None:
    """Peak memory (GiB) of one call of ``fn``, everything allocated included."""
    if not bench.cuda:
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn(0)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**30


def _matmul_tflops(bench: Bench) -> float | None:
    if not bench.cuda:
        return None
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    return 2 * 8192**3 / bench.time_ms(lambda i: a @ b, 1) / 1e9


def _fmt(row: dict[str, Any], key: str, spec: str, unit: str = "") -> str:
    """``row[key]`` formatted with ``spec`` and ``unit``; "-" when missing, None or NaN."""
    value = row.get(key)
    if value is None or (isinstance(value, float) and value != value):  # None or NaN
        return "-"
    return format(value, spec) + unit


def _table(console: Console, rows: list[dict[str, Any]], peak: float | None) -> None:
    caption = "TFLOP/s from useful FLOPs (causal: halved); peak = memory / bytes(q, k, v, out)"
    if peak:
        caption += f"; bf16 matmul peak {peak:.0f} TFLOP/s"
    table = Table(title="dilattn benchmark suite", caption=caption)
    for column in ("study", "impl", "S", "pass", "ms", "TFLOP/s", "of peak", "peak mem", "note"):
        table.add_column(column, justify="left" if column in ("study", "impl", "note") else "right")
    for row in rows:
        if row["study"] == "lengths":
            note = f"{row['frames_compiled']} graphs for {len(row['lengths'])} lengths"
            table.add_row(row["study"], row["impl"], "", "", "", "", "", "", note)
            continue
        share = "-" if not peak or row.get("tflops") is None else f"{row['tflops'] / peak:.0%}"
        note = row.get("note", "")
        if "engine" in row:
            ratio = f", {row['vs_plain']:.2f}x plain" if "vs_plain" in row else ""
            note = f"{row['engine']}{ratio} {note}".strip()
        table.add_row(
            row["study"],
            row["impl"],
            str(row.get("seq_len", "")),
            "fwd+bwd" if row.get("backward") else "fwd",
            _fmt(row, "ms", ".2f"),
            _fmt(row, "tflops", ".0f"),
            share,
            _fmt(row, "peak_ratio", ".2f", "x"),
            note,
        )
    console.print(table)


def _write_json(path: Path, bench: Bench, peak: float | None, argv: list[str] | None) -> None:
    """The header and every row as strict JSON: a missing number (NaN, infinite) is null."""

    def finite(value: Any) -> Any:
        if isinstance(value, float) and (value != value or abs(value) == float("inf")):
            return None
        if isinstance(value, dict):
            return {key: finite(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [finite(item) for item in value]
        return value

    triton = importlib.import_module("triton") if importlib.util.find_spec("triton") else None
    header = {
        "command": " ".join(["python", "benchmarks/suite.py", *(argv or sys.argv[1:])]),
        "torch": torch.__version__,
        "triton": getattr(triton, "__version__", None),
        "device": torch.cuda.get_device_name() if bench.cuda else "CPU",
        "dtype": str(bench.dtype).removeprefix("torch."),
        "matmul_bf16_tflops": peak,
    }
    data = finite({"header": header, "rows": bench.rows})
    path.write_text(json.dumps(data, indent=1, allow_nan=False) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--studies",
        nargs="+",
        default=["paper", "long", "peer", "d128", "pow2", "lengths", "local", "mixed_lm"],
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes (works on CPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--max-len", type=int, default=1 << 20, help="longest S of the studies")
    parser.add_argument("--min-len", type=int, default=0, help="shortest S of the features study")
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--impls", nargs="+", default=(), help="measure only these rows, e.g. dilattn sdpa-dense"
    )
    args = parser.parse_args(argv)
    quick, device = args.quick, torch.device(args.device)
    bench = Bench(
        device,
        torch.bfloat16 if device.type == "cuda" else torch.float32,
        args.repeats or (3 if quick else 10),
        quick,
        impls=args.impls,
    )
    console = Console()
    # Every study compiles flex afresh (one variant per length, mask and pass): allow them
    # all, and fail rather than let dynamo time its eager fallback past the limit.
    torch._dynamo.config.recompile_limit = 256
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    peak = _matmul_tflops(bench)
    if args.json:
        bench.on_row = lambda: _write_json(args.json, bench, peak, argv)
    small = DilatedConfig((64, 128, 256), (1, 2, 6))  # --quick
    lens = [256, 512] if quick else [1 << p for p in range(13, 21) if 1 << p <= args.max_len]
    long = lens[-1:]
    setups = {
        "paper": Setup(lens, config=small) if quick else Setup(lens),
        "peer": Setup([512], config=small) if quick else Setup(long),
        "d128": Setup(
            long, heads=8, head_dim=128, config=small if quick else DilatedConfig(*PAPER)
        ),
        "pow2": Setup(long, config=small if quick else DilatedConfig(*POW2)),
    }
    for study in args.studies:
        console.print(f"[bold]{study}[/bold]")
        if study == "lengths":
            count = 20
            base = 700 if quick else 20000
            study_lengths(bench, [base + 997 * i for i in range(count)])
        elif study == "peer":
            study_peer(bench, setups[study])
        elif study == "long":  # what one GPU holds: forward to 8M, forward+backward to 4M
            top = 1 << 11 if quick else 1 << 23
            study_paper(bench, Setup([top // 4, top // 2, top], backward=[False]), study)
            study_paper(bench, Setup([top // 4, top // 2], backward=[True]), study)
        elif study == "mixed_lm":
            study_mixed_lm(bench, [128, 256] if quick else [8192, 32768])
        elif study == "features":
            sizes = [x for x in (1 << 17, 1 << 20) if args.min_len <= x <= args.max_len]
            config = small if quick else DilatedConfig(*PAPER)
            study_features(bench, Setup([256, 512] if quick else sizes, config=config))
        elif study == "local":
            study_local(bench, [64, 256] if quick else lens)
        elif study in setups:
            study_paper(bench, setups[study], study)
        else:
            choices = sorted([*setups, "features", "lengths", "long", "local", "mixed_lm"])
            parser.error(f"unknown study {study!r}; choose from {choices}")
        if args.json:  # after every row and study, so a cut-off run keeps what it measured
            _write_json(args.json, bench, peak, argv)
    _table(console, bench.rows, peak)
    if args.json:
        console.print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
