"""The ``dilattn`` command line: ``info``, ``mask``, ``check``, ``bench`` and ``explain``."""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import struct
import warnings
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NoReturn

import torch
import torch.nn.functional as F
import torch.utils.benchmark as benchmark
from rich.console import Console
from rich.progress import Progress
from rich.table import Table
from rich.text import Text
from torch import Tensor
from torch.nn.attention.flex_attention import flex_attention

import dilattn
from dilattn.config import DilatedConfig
from dilattn.engines import _ALLOWED, ENGINES, Dispatch
from dilattn.engines.gather import RECOMPILE_LIMIT
from dilattn.reference import dilated_attention_reference, multiplicity

__all__ = ["main"]

Attend = Callable[[Tensor, Tensor, Tensor, "_Case"], Tensor]

_ZERO_RGB = (36, 36, 36)
_PALETTE = ((66, 135, 245), (76, 201, 122), (250, 204, 60), (245, 118, 56), (222, 62, 150))
_TERMINAL_MAX, _PNG_MAX = 256, 4096
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_DTYPES |= {str(dtype).removeprefix("torch."): dtype for dtype in _DTYPES.values()}
_ANY_DTYPES = _DTYPES | {"fp64": torch.float64, "float64": torch.float64}  # explain
_FLOORS = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are reported like dilattn's own ``ValueError``s."""

    def error(self, message: str) -> NoReturn:
        raise ValueError(f"{self.prog}: {message} (see --help)")


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default after its help, lists as ``1 2``; none for flags and for
    defaults of ``None`` (their help says what happens)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            "%(default)" in text
            or not action.option_strings
            or default is None
            or default is False
            or default is argparse.SUPPRESS
        ):
            return text
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else default
        return f"{text} (default: {str(shown).replace('%', '%%')})"


def _at_least(low: int) -> Callable[[str], int]:
    """An argparse ``type``: an integer ``>= low``."""

    def integer(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {value}")
        return value

    return integer


_positive = _at_least(1)


def _fraction(text: str) -> float:
    """An argparse ``type``: a number in ``[0, 1)``."""
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be a fraction in [0, 1), got {text}")
    return value


def _seconds(text: str) -> float:
    """An argparse ``type``: a positive number of seconds."""
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return value


def _output(text: str) -> Path:
    """An argparse ``type``: a file that can be written, checked before anything runs (its
    directory exists and is writable; it is no directory, nor a read-only file)."""
    path = Path(text)
    parent = path.parent
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a directory, not a file")
    if not parent.exists():
        raise argparse.ArgumentTypeError(f"the directory {parent} does not exist")
    if not parent.is_dir():
        raise argparse.ArgumentTypeError(f"{parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"the directory {parent} is not writable")
    if path.exists() and not os.access(path, os.W_OK):
        raise argparse.ArgumentTypeError(f"{text} exists and is not writable")
    return path


def _tensor(x: object) -> Tensor:
    assert isinstance(x, Tensor)  # the attention calls here return no lse
    return x


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _device(name: str) -> torch.device:
    """``--device``: ``auto`` is CUDA when there is one, else CPU."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: CUDA is not available on this machine")
    cuda = name == "cuda" or (name == "auto" and torch.cuda.is_available())
    return torch.device("cuda" if cuda else "cpu")


def _yes(flag: bool) -> Text:
    return Text("yes", style="green") if flag else Text("no", style="red")


# info


def _engines_here(cuda: bool, triton: bool) -> list[tuple[str, bool, str]]:
    """``(engine, runs on this machine, how)`` for each engine of the dispatcher."""
    cudnn = cuda and torch.backends.cudnn.is_available()  # type: ignore[no-untyped-call]
    if cuda:
        return [
            ("strided", cudnn and triton, "cuDNN attention and a Triton merge; fp16/bf16"),
            ("flex_strided", triton, "compiled FlexAttention (Triton), forward+backward"),
            ("flex_gather", triton, "compiled FlexAttention (Triton), forward+backward"),
            ("math", True, "matmul and softmax: any dtype, dropout, forward+backward"),
        ]
    return [
        ("strided", True, "matmul on CPU, with backend='strided' (auto takes math)"),
        ("flex_strided", True, "eager FlexAttention, forward only, with backend='flex'"),
        ("flex_gather", True, "eager FlexAttention, forward only, with backend='flex'"),
        ("math", True, "matmul and softmax, forward+backward: auto's engine on CPU"),
    ]


def _info(args: argparse.Namespace, console: Console) -> int:
    """Versions, the device, and which engines run on this machine."""
    try:
        import triton

        triton_version: str | None = triton.__version__
    except ImportError:
        triton_version = None
    cuda = torch.cuda.is_available()
    table = Table(title="dilattn info", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("dilattn", dilattn.__version__)
    table.add_row("torch", torch.__version__)
    table.add_row("python", platform.python_version())
    table.add_row("device", torch.cuda.get_device_name() if cuda else "CPU")
    table.add_row("triton", triton_version or Text("not installed", style="red"))
    console.print(table)
    engines = Table(title="engines (fastest first; see `dilattn explain`)")
    for column in ("engine", "runs here", "how"):
        engines.add_column(column)
    for name, runs, how in _engines_here(cuda, triton_version is not None):
        engines.add_row(name, _yes(runs), how)
    console.print(engines)
    return 0


# mask


def _rgb(count: int) -> tuple[int, int, int]:
    return _ZERO_RGB if count == 0 else _PALETTE[(count - 1) % len(_PALETTE)]


def _style(count: int) -> str:
    return "dim" if count == 0 else "#{:02x}{:02x}{:02x}".format(*_rgb(count))


def _cell(count: int) -> str:
    return "\u00b7\u00b7" if count == 0 else "\u2588\u2588"


def _grid(counts: Tensor) -> Text:
    """One line per query, two characters per key, coloured by multiplicity."""
    lines = []
    for row in counts.tolist():
        line = Text()
        for count, run in itertools.groupby(row):
            line.append(_cell(count) * len(list(run)), style=_style(count))
        lines.append(line)
    return Text("\n").join(lines)


def _write_png(path: Path, rgb_rows: Sequence[bytes]) -> None:
    """Write 8-bit RGB rows (``3 * width`` bytes each) as a PNG, with the standard library."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    header = struct.pack(">IIBBBBB", len(rgb_rows[0]) // 3, len(rgb_rows), 8, 2, 0, 0, 0)
    pixels = zlib.compress(b"".join(b"\x00" + row for row in rgb_rows))
    png = chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + png)


def _png_rows(counts: Tensor) -> list[bytes]:
    """The multiplicity image, each cell ``max(1, 512 // S)`` pixels square."""
    scale = max(1, 512 // counts.shape[0])
    colours = torch.tensor([_rgb(c) for c in range(int(counts.max()) + 1)], dtype=torch.uint8)
    image = colours[counts].repeat_interleave(scale, 0).repeat_interleave(scale, 1)
    return [bytes(row.flatten().tolist()) for row in image]


def _mask(args: argparse.Namespace, console: Console) -> int:
    """Draw ``m(h, query, key)``: in how many branches each query sees each key."""
    seg, rates, S = tuple(args.segment_lengths), tuple(args.dilation_rates), args.seq_len
    config = DilatedConfig(seg, rates, args.head_offsets)
    if args.png is None and S > _TERMINAL_MAX:
        raise ValueError(
            f"--seq-len {S} is too long to draw in the terminal (at most {_TERMINAL_MAX}); "
            f"write an image with --png PATH (up to {_PNG_MAX})"
        )
    if S > _PNG_MAX:
        raise ValueError(f"--seq-len must be at most {_PNG_MAX} for --png, got {S}")
    if args.head >= args.heads:
        raise ValueError(f"--head must be below --heads {args.heads}, got {args.head}")
    counts = multiplicity(
        seg,
        rates,
        num_heads=args.heads,
        q_len=S,
        is_causal=args.causal,
        head_offsets=args.head_offsets,
    )[args.head]
    causal = ", causal" if args.causal else ""
    title = (
        f"dilated attention mask: segment lengths {list(seg)}, dilation rates {list(rates)}, "
        f"S={S}, head {args.head} of {args.heads}, {args.head_offsets} offsets{causal}"
    )
    branches = config.branches
    if args.head_offsets == "split":  # the head computes one branch (-1: not its branch)
        offsets = config.offsets(args.heads)
        branches = tuple(
            branch
            for branch, offset in zip(config.branches, offsets, strict=True)
            if offset[args.head] >= 0
        )
        title += "; it computes only " + ", ".join(f"w={w} r={r}" for w, r in branches)
    console.print(Text(title, style="bold"))
    console.print(Text("rows: queries, columns: keys", style="dim"))
    if args.png is None:
        console.print(_grid(counts), soft_wrap=True)
    else:
        _write_png(args.png, _png_rows(counts))
        console.print(f"wrote {args.png}", soft_wrap=True)
    legend = Text("branches seeing the key: ")
    for count in range(len(branches) + 1):
        legend.append(_cell(count), style=_style(count))
        legend.append(f" {count} ({int((counts == count).sum())} cells)  ")
    console.print(legend)
    return 0


# check


@dataclass(frozen=True)
class _Case:
    """One fixed configuration that ``check`` runs every path on."""

    name: str
    segments: tuple[int, ...]
    rates: tuple[int, ...]
    seq_len: int
    causal: bool
    heads: int = 2
    kv_heads: int = 2
    local_window: int | None = None

    def attend(self, fn: Callable[..., object], *qkv: Tensor, **kwargs: Any) -> Tensor:
        """``fn(q, k, v, segments, rates, ...)`` for this case."""
        out = fn(
            *qkv,
            self.segments,
            self.rates,
            is_causal=self.causal,
            enable_gqa=True,
            local_window=self.local_window,
            **kwargs,
        )
        return _tensor(out)


@dataclass(frozen=True)
class _Path:
    """One way to compute dilated attention, in one dtype, forward or forward+backward."""

    name: str
    dtype: torch.dtype
    attend: Attend
    backward: bool = False

    @property
    def label(self) -> str:
        return f"{self.name} {'bwd' if self.backward else 'fwd'}"


_CASES = (
    _Case("odd length", (4, 8), (1, 2), 37, causal=False),
    _Case("w % r != 0", (8, 12), (1, 5), 50, causal=True, heads=3, kv_heads=3),
    _Case("GQA 4q/2kv", (8, 16), (1, 2), 40, causal=True, heads=4, kv_heads=2),
    _Case("no r=1 branch", (8, 16), (2, 4), 33, causal=False, heads=4, kv_heads=4),
    _Case("S < segments", (64, 128), (1, 2), 23, causal=True),
    _Case("local window 5", (8, 16), (2, 4), 41, causal=True, local_window=5),
)


def _reference(q: Tensor, k: Tensor, v: Tensor, case: _Case) -> Tensor:
    return case.attend(dilated_attention_reference, q, k, v)


def _branch_path(backend: Literal["flex", "math"]) -> Attend:
    return lambda q, k, v, case: case.attend(dilattn.dilated_attention, q, k, v, backend=backend)


def _one_line_path(flex: Callable[..., object], block_size: int) -> Attend:
    """The one-line mask; compiled flex on CUDA needs blocks of 128, eager takes any size."""

    def attend(q: Tensor, k: Tensor, v: Tensor, case: _Case) -> Tensor:
        m = dilattn.flex_mask(
            case.segments,
            case.rates,
            q_len=case.seq_len,
            num_heads=case.heads,
            is_causal=case.causal,
            block_size=block_size,
            device=q.device,
            local_window=case.local_window,
        )
        return _tensor(
            flex(q, k, v, block_mask=m.block_mask, score_mod=m.score_mod, enable_gqa=True)
        )

    return attend


def _paths(device: torch.device) -> list[_Path]:
    """math in float64 (forward, backward), flex and the one-line mask in float32, and on
    CUDA compiled flex in bfloat16/float16 and the compiled one-line mask in bfloat16."""
    cuda = device.type == "cuda"
    math, flex = _branch_path("math"), _branch_path("flex")
    paths = [
        _Path("math", torch.float64, math),
        _Path("math", torch.float64, math, backward=True),
        _Path("flex compiled" if cuda else "flex eager", torch.float32, flex),
        _Path("mask eager", torch.float32, _one_line_path(flex_attention, block_size=16)),
    ]
    if cuda:
        compiled = _one_line_path(torch.compile(flex_attention), block_size=128)
        for backward in (False, True):
            paths.append(_Path("flex compiled", torch.bfloat16, flex, backward))
            paths.append(_Path("flex compiled", torch.float16, flex, backward))
            paths.append(_Path("mask compiled", torch.bfloat16, compiled, backward))
    return paths


def _max_error(got: list[Tensor], want: list[Tensor]) -> float:
    """The largest absolute difference; NaN if any value is NaN."""
    errors = [(g.double() - w).abs().max() for g, w in zip(got, want, strict=True)]
    return float(torch.stack(errors).max())


def _check_one(case: _Case, path: _Path, inputs: Sequence[Tensor]) -> tuple[float, float, str]:
    """``(error, budget, failure)`` of ``path`` against the float64 reference.

    ``inputs`` are q, k, v and the output gradient. The budget is 2x (4x for gradients) the
    error of the reference run in the path's dtype plus a floor per dtype; all three see the
    same inputs, rounded to that dtype."""
    *qkv, grad = (x.to(path.dtype).double() for x in inputs)

    def run(attend: Attend, dtype: torch.dtype) -> list[Tensor]:
        q, k, v = (x.to(dtype).requires_grad_(path.backward) for x in qkv)
        out = attend(q, k, v, case)
        return list(torch.autograd.grad(out, (q, k, v), grad.to(dtype))) if path.backward else [out]

    truth = run(_reference, torch.float64)
    budget = (4 if path.backward else 2) * _max_error(run(_reference, path.dtype), truth)
    budget += _FLOORS[path.dtype]
    try:
        return _max_error(run(path.attend, path.dtype), truth), budget, ""
    except Exception as error:  # a broken path is reported, and the others still run
        return float("nan"), budget, f"{type(error).__name__}: {error}".splitlines()[0][:80]


def _check(args: argparse.Namespace, console: Console) -> int:
    """Every path against the float64 reference on random inputs; 0 when all pass."""
    device = _device(args.device)
    paths = _paths(device)
    table = Table(title=f"dilattn check on {device.type}")
    numeric = ("max abs error", "budget")
    for column in ("case", "path", "dtype", *numeric, "result"):
        table.add_column(column, justify="right" if column in numeric else "left")
    failures = 0
    recompiles = torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT)  # many variants
    with recompiles, Progress(console=console, transient=True) as bar:
        task = bar.add_task("checking", total=len(_CASES) * len(paths))
        for index, case in enumerate(_CASES):
            generator = torch.Generator(device).manual_seed(args.seed + index)
            heads = (case.heads, case.kv_heads, case.kv_heads, case.heads)  # q, k, v, grad
            inputs = [
                torch.randn(2, h, case.seq_len, 16, generator=generator, device=device)
                for h in heads
            ]
            for path in paths:
                dtype = _dtype_name(path.dtype)
                bar.update(task, description=f"{case.name}: {path.label} {dtype}")
                error, budget, failure = _check_one(case, path, inputs)
                passed = error <= budget
                failures += not passed
                result = Text("pass", "green") if passed else Text(failure or "FAIL", "red")
                table.add_row(case.name, path.label, dtype, f"{error:.2e}", f"{budget:.2e}", result)
                bar.advance(task)
    console.print(table)
    total = len(_CASES) * len(paths)
    console.print(
        Text(f"{total - failures}/{total} passed", "bold " + ("red" if failures else "green"))
    )
    return 1 if failures else 0


# bench


_MAX_RUN_TIMES = 20  # adaptive timing stops at this many times --min-run-time


def _time_ms(fn: Callable[[], object], min_run_time: float) -> float:
    """Median milliseconds per call of ``fn``, by ``torch.utils.benchmark.Timer``'s
    ``adaptive_autorange``: after one warm-up call (compilation, lazy initialisation) it sizes
    blocks of calls, then times blocks (synchronising the accelerator around each) for at
    least ``min_run_time`` seconds and until their spread is within 10% of the median (at most
    ``20 * min_run_time`` seconds), and keeps the median block; on all of torch's CPU threads."""
    fn()
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    measurement = timer.adaptive_autorange(
        min_run_time=min_run_time, max_run_time=_MAX_RUN_TIMES * min_run_time
    )
    return float(measurement.median) * 1e3


def _matmul_tflops(min_run_time: float) -> float:
    """Measured bf16 TFLOP/s of one 8192^3 matmul, timed as the attention calls are."""
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    return 2 * 8192**3 / _time_ms(lambda: a @ b, min_run_time) / 1e9


def _impls(
    inputs: Sequence[Tensor], config: DilatedConfig, causal: bool, flex: Callable[..., object]
) -> dict[str, Callable[[], Tensor]]:
    """The timed calls: the fast path, the one-line mask and dense SDPA."""
    q, k, v = inputs
    (_, H, S, _), seg, rates = q.shape, config.segment_lengths, config.dilation_rates
    m = dilattn.flex_mask(seg, rates, q_len=S, num_heads=H, is_causal=causal, device=q.device)
    return {
        "dilated": lambda: _tensor(
            dilattn.dilated_attention(q, k, v, seg, rates, is_causal=causal)
        ),
        "flex_mask": lambda: _tensor(flex(q, k, v, block_mask=m.block_mask, score_mod=m.score_mod)),
        "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal),
    }


def _row(
    name: str,
    S: int,
    note: str = "",
    ms: float | None = None,
    flops: float = 0.0,
    peak: float | None = None,
) -> dict[str, Any]:
    """One result: TFLOP/s from ``flops`` and ``ms``; ``peak`` in GiB (CUDA only)."""
    tflops = None if ms is None else flops / ms / 1e9
    return {"impl": name, "seq_len": S, "ms": ms, "tflops": tflops, "peak_gib": peak, "note": note}


def _bench_row(
    name: str,
    S: int,
    fn: Callable[[], Tensor],
    inputs: Sequence[Tensor],
    grad: Tensor | None,
    flops: float,
    min_run_time: float,
) -> dict[str, Any]:
    """Time ``fn`` (with the backward to ``inputs`` when ``grad`` is given) into one row."""
    cuda = inputs[0].is_cuda
    step = fn if grad is None else lambda: torch.autograd.grad(fn(), inputs, grad)
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    try:
        ms = _time_ms(step, min_run_time)
    except torch.OutOfMemoryError:
        return _row(name, S, "out of memory")
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    return _row(name, S, ms=ms, flops=flops, peak=peak)


def _skip(name: str, scores_bytes: int, backward: bool) -> str:
    """Why eager flex or SDPA cannot run on CPU here, or ``""``."""
    if name == "flex_mask" and backward:
        return "skipped: flex has no CPU backward"
    if name != "dilated" and scores_bytes > 2**31:
        return "skipped: dense scores need > 2 GiB"
    return ""


def _bench(args: argparse.Namespace, console: Console) -> int:
    """Time the fast path, the one-line mask and dense SDPA at a few lengths."""
    device = _device(args.device)
    cuda = device.type == "cuda"
    seg = args.segment_lengths or ((2048, 4096, 8192, 16384, 32768) if cuda else (256, 512))
    rates = args.dilation_rates or ((1, 2, 4, 6, 12) if cuda else (1, 2))
    config = DilatedConfig(tuple(seg), tuple(rates))
    seq_lens = args.seq_lens or ([8192, 32768, 131072] if cuda else [1024, 2048])
    B, H, D = args.batch, args.heads or (12 if cuda else 4), args.head_dim
    if cuda and D < 16:
        raise ValueError(f"--head-dim must be at least 16 on CUDA (FlexAttention), got {D}")
    dtype = _DTYPES["bf16" if cuda else "fp32"] if args.dtype == "auto" else _DTYPES[args.dtype]
    min_run_time = args.min_run_time or (1.0 if cuda else 0.2)
    flex = torch.compile(flex_attention, dynamic=False) if cuda else flex_attention
    matmul = _matmul_tflops(min_run_time) if cuda else None
    work = 3.5 if args.backward else 1.0  # a backward counts as 2.5 forwards
    rows = []
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("benchmarking", total=3 * len(seq_lens))
        for S in seq_lens:
            inputs = [
                torch.randn(B, H, S, D, device=device, dtype=dtype, requires_grad=args.backward)
                for _ in "qkv"
            ]
            grad = torch.randn_like(inputs[0]) if args.backward else None
            dense = 4 * B * H * S * S * D / (2 if args.causal else 1)
            dilated = config.flops(S, batch_size=B, num_heads=H, head_dim=D, is_causal=args.causal)
            for name, fn in _impls(inputs, config, args.causal, flex).items():
                bar.update(task, description=f"{name} S={S}")
                skip = "" if cuda else _skip(name, B * H * S * S * 4, args.backward)
                flops = work * (dense if name == "sdpa" else dilated)
                if skip:
                    rows.append(_row(name, S, skip))
                else:
                    rows.append(_bench_row(name, S, fn, inputs, grad, flops, min_run_time))
                bar.advance(task)
    _bench_table(console, rows, cuda, matmul)
    if args.json is not None:
        header = {
            "torch": torch.__version__,
            "device": torch.cuda.get_device_name() if cuda else "CPU",
            "dtype": _dtype_name(dtype),
            "matmul_bf16_tflops": matmul,
            "config": {
                "segment_lengths": list(config.segment_lengths),
                "dilation_rates": list(config.dilation_rates),
                "seq_lens": list(seq_lens),
                "batch": B,
                "heads": H,
                "head_dim": D,
                "causal": args.causal,
                "backward": args.backward,
                "min_run_time": min_run_time,
                "timer": "torch.utils.benchmark.Timer.adaptive_autorange, median",
            },
        }
        args.json.write_text(json.dumps({"header": header, "rows": rows}, indent=2) + "\n")
        console.print(f"wrote {args.json}", soft_wrap=True)
    return 0


def _bench_table(
    console: Console, rows: list[dict[str, Any]], cuda: bool, matmul: float | None
) -> None:
    caption = "TFLOP/s from useful FLOPs, halved when causal"
    if matmul is not None:
        caption += f"; bf16 matmul peak (8192^3): {matmul:.0f} TFLOP/s"
    table = Table(title="dilattn bench", caption=caption)
    columns = ["impl", "S", "ms", "TFLOP/s", *(["peak GiB"] if cuda else []), "note"]
    for column in columns:
        table.add_column(column, justify="left" if column in ("impl", "note") else "right")
    for row in rows:
        numbers = [(row["ms"], ".2f"), (row["tflops"], ".3g")]
        numbers += [(row["peak_gib"], ".2f")] if cuda else []
        cells = ["-" if x is None else format(x, spec) for x, spec in numbers]
        table.add_row(row["impl"], str(row["seq_len"]), *cells, row["note"])
    console.print(table)


# explain


def _explain_call(
    args: argparse.Namespace, device: torch.device
) -> tuple[tuple[Tensor, Tensor, Tensor], dict[str, Any], str]:
    """Uninitialised q, k, v of the call's shapes (``torch.empty``: the dispatcher reads
    shapes, dtypes and devices, never values), its keyword arguments, and a summary line."""
    S, H, D, B = args.seq_len, args.heads, args.head_dim, args.batch
    H_kv = args.kv_heads or H
    if H % H_kv:
        raise ValueError(f"--kv-heads must divide --heads {H}, got {H_kv}")
    if args.q_offset >= S:
        raise ValueError(
            f"--q-offset must be below --seq-len {S} (the queries are the last "
            f"S - q_offset positions), got {args.q_offset}"
        )
    if args.dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        dtype = _ANY_DTYPES[args.dtype]
    S_q = S - args.q_offset
    q, k, v = (
        torch.empty(B, h, n, D, device=device, dtype=dtype, requires_grad=args.grad)
        for h, n in ((H, S_q), (H_kv, S), (H_kv, S))
    )
    options: dict[str, Any] = {
        "is_causal": args.causal,
        "enable_gqa": H_kv != H,
        "head_offsets": args.head_offsets,
        "backend": args.backend,
        "q_offset": args.q_offset,
        "dropout_p": args.dropout,
        "local_window": args.local_window,
    }
    positions = torch.arange(S, device=device)
    if args.documents is not None:
        options["document_ids"] = (positions * args.documents // S).expand(B, S)
    if args.padding > 0:
        padded = round(args.padding * S)
        options["key_padding_mask"] = (positions >= S - padded).expand(B, S)
    if args.score_mod == "alibi":
        options["score_mod"] = dilattn.alibi_score_mod(H)
    elif args.score_mod == "t5":
        t5 = dilattn.T5RelativeBias(H, bidirectional=not args.causal, device=device)
        options["score_mod"] = t5.score_mod
    summary = (
        f"B={B}, H={H}, H_kv={H_kv}, S_q={S_q}, S_kv={S}, D={D}, {_dtype_name(dtype)} on "
        f"{device.type}{', requires grad' if args.grad else ''}; backend={args.backend!r}"
    )
    return (q, k, v), options, summary


def _explain_table(chosen: Dispatch, backend: str, summary: str) -> Table:
    """The chosen engine, each refused engine with its reason, then those not tried."""
    table = Table(title="dilattn explain", caption=summary)
    for column in ("engine", "verdict", "why"):
        table.add_column(column)
    allowed = _ALLOWED[backend]
    table.add_row(
        Text(chosen.engine, style="bold"),
        Text("runs", style="green"),
        f"the first engine{'' if backend == 'auto' else f' of --backend {backend}'} "
        "that takes the call",
    )
    for name, why in chosen.refused:
        table.add_row(name, Text("refused", style="red"), why)
    tried = {chosen.engine, *(name for name, _ in chosen.refused)}
    for name in ENGINES:
        if name in tried:
            continue
        why = (
            f"slower than {chosen.engine}"
            if name in allowed
            else f"--backend {backend} allows only {', '.join(allowed)}"
        )
        table.add_row(Text(name, style="dim"), Text("not tried", style="dim"), why)
    return table


def _explain(args: argparse.Namespace, console: Console) -> int:
    """Which engine ``dilated_attention`` takes for this call, and why it refuses the others
    (``dilattn.explain``); an impossible call is an error."""
    device = _device(args.device)
    (q, k, v), options, summary = _explain_call(args, device)
    chosen = dilattn.explain(q, k, v, args.segment_lengths, args.dilation_rates, **options)
    console.print(_explain_table(chosen, args.backend, summary))
    return 0


# the command line


def _parser() -> _Parser:
    parser = _Parser(
        prog="dilattn",
        description="Exact LongNet dilated attention: tools.",
        formatter_class=_Formatter,
    )
    commands = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", help="what to do (each has --help)"
    )

    def command(name: str, summary: str) -> argparse.ArgumentParser:
        return commands.add_parser(
            name, help=summary, description=summary, formatter_class=_Formatter
        )

    def branches(
        sub: argparse.ArgumentParser,
        segments: list[int] | None = None,
        rates: list[int] | None = None,
        *,
        required: bool = False,
        note: str = "",
    ) -> None:
        sub.add_argument(
            "--segment-lengths",
            nargs="+",
            type=_positive,
            metavar="W",
            required=required,
            default=segments,
            help=f"segment length w of each branch{note}",
        )
        sub.add_argument(
            "--dilation-rates",
            nargs="+",
            type=_positive,
            metavar="R",
            required=required,
            default=rates,
            help=f"dilation rate r (at most w) of each branch{note}",
        )

    def device(sub: argparse.ArgumentParser) -> None:
        sub.add_argument(
            "--device",
            choices=("auto", "cpu", "cuda"),
            default="auto",
            help="where to run; auto is CUDA when there is a GPU, else CPU",
        )

    def causal(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--causal", action="store_true", help="causal: no query sees a later key")

    def inputs(sub: argparse.ArgumentParser, dtypes: tuple[str, ...]) -> None:
        """The head dim, batch size, causality and dtype of the timed or explained call."""
        sub.add_argument("--head-dim", type=_positive, metavar="D", default=64, help="head dim")
        sub.add_argument("--batch", type=_positive, metavar="B", default=1, help="batch size")
        causal(sub)
        sub.add_argument(
            "--dtype",
            choices=("auto", *dtypes),
            default="auto",
            help="input dtype; auto is bf16 on CUDA, fp32 on CPU",
        )

    info = command("info", "versions, device and the engines that run on this machine")
    info.set_defaults(run=_info)

    mask = command("mask", "draw which keys each query sees")
    branches(mask, required=True)
    mask.add_argument(
        "--seq-len",
        type=_positive,
        metavar="S",
        required=True,
        help=f"sequence length (at most {_TERMINAL_MAX} in the terminal, {_PNG_MAX} with --png)",
    )
    mask.add_argument("--heads", type=_positive, metavar="H", default=1, help="number of heads")
    mask.add_argument("--head", type=_at_least(0), metavar="H", default=0, help="the head to draw")
    causal(mask)
    mask.add_argument(
        "--head-offsets",
        choices=("cyclic", "grouped", "split"),
        default="cyclic",
        help="offset of head h in a branch of rate r: cyclic h %% r (the paper), grouped "
        "h // ceil(H / r) (torchscale), split: each head computes one branch "
        "(dilated-attention-pytorch)",
    )
    mask.add_argument(
        "--png",
        type=_output,
        metavar="PATH",
        help="write a PNG image instead of drawing in the terminal",
    )
    mask.set_defaults(run=_mask)

    check = command("check", "compare every path with the float64 reference")
    device(check)
    check.add_argument(
        "--seed", type=int, default=0, help="seed of the random inputs (case i uses seed + i)"
    )
    check.set_defaults(run=_check)

    bench = command("bench", "time dilated attention against the one-line mask and dense SDPA")
    branches(bench, note=" (default: the paper's 5 branches on CUDA, 2 on CPU)")
    device(bench)
    bench.add_argument(
        "--seq-lens",
        nargs="+",
        type=_positive,
        metavar="S",
        help="sequence lengths to time (default: 8192 32768 131072 on CUDA, 1024 2048 on CPU)",
    )
    bench.add_argument(
        "--heads",
        type=_positive,
        metavar="H",
        help="number of heads (default: 12 on CUDA, 4 on CPU)",
    )
    inputs(bench, tuple(_DTYPES))
    bench.add_argument("--backward", action="store_true", help="time forward+backward")
    bench.add_argument(
        "--min-run-time",
        type=_seconds,
        metavar="SECONDS",
        help="least time spent timing each call: torch.utils.benchmark's adaptive_autorange "
        f"keeps timing until the spread is within 10%% of the median, up to {_MAX_RUN_TIMES}x "
        "this; the median is reported (default: 1.0 on CUDA, 0.2 on CPU)",
    )
    bench.add_argument(
        "--json",
        type=_output,
        metavar="PATH",
        help="also write the results (and the configuration) as JSON",
    )
    bench.set_defaults(run=_bench)

    explain = command(
        "explain",
        "which engine a call takes and why the others were refused (dilattn.explain)",
    )
    branches(explain, [2048, 4096], [1, 2])
    explain.add_argument(
        "--seq-len", type=_positive, metavar="S", default=8192, help="key length and positions"
    )
    explain.add_argument("--heads", type=_positive, metavar="H", default=8, help="query heads")
    explain.add_argument(
        "--kv-heads",
        type=_positive,
        metavar="H_KV",
        help="key/value heads, a divisor of --heads (grouped-query attention; default: --heads)",
    )
    inputs(explain, tuple(_ANY_DTYPES))
    device(explain)
    explain.add_argument(
        "--backend",
        choices=("auto", "strided", "flex", "math"),
        default="auto",
        help="the engines allowed: auto all of them, flex flex_strided and flex_gather, "
        "strided and math their own",
    )
    explain.add_argument(
        "--head-offsets",
        choices=("cyclic", "grouped", "split"),
        default="cyclic",
        help="offset of head h in a branch of rate r: cyclic, grouped or split "
        "(one branch per head)",
    )
    explain.add_argument(
        "--documents",
        type=_positive,
        metavar="N",
        help="pack N documents of equal length (document_ids; default: one sequence)",
    )
    explain.add_argument(
        "--padding",
        type=_fraction,
        metavar="FRACTION",
        default=0.0,
        help="share of the keys padded at the end (key_padding_mask; 0: no mask)",
    )
    explain.add_argument(
        "--score-mod",
        choices=("none", "alibi", "t5"),
        default="none",
        help="a score_mod: ALiBi, or T5's relative bias (it captures a tensor)",
    )
    explain.add_argument(
        "--q-offset",
        type=_at_least(0),
        metavar="N",
        default=0,
        help="position of query row 0: the queries are the last S - N positions "
        "(decoding after N cached tokens)",
    )
    explain.add_argument(
        "--local-window",
        type=_positive,
        metavar="N",
        help="add a sliding-window branch |p - p'| <= N (default: none)",
    )
    explain.add_argument(
        "--dropout",
        type=_fraction,
        metavar="P",
        default=0.0,
        help="attention dropout probability (dropout_p)",
    )
    explain.add_argument("--grad", action="store_true", help="the inputs require grad (training)")
    explain.set_defaults(run=_explain)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (2 for bad arguments, 0 after --help)."""
    try:
        args = _parser().parse_args(argv)
        with warnings.catch_warnings():  # eager flex on CPU is intended here
            warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
            code: int = args.run(args, Console(highlight=False))
    except SystemExit as done:  # --help: argparse printed it
        return done.code if isinstance(done.code, int) else 0
    except (ValueError, TypeError) as error:
        Console(stderr=True).print(Text(f"error: {error}", style="red"), soft_wrap=True)
        return 2
    return code
