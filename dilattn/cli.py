"""The ``dilattn`` command line: ``info``, ``mask``, ``check`` and ``bench``."""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import statistics
import struct
import time
import warnings
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NoReturn

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import Progress
from rich.table import Table
from rich.text import Text
from torch import Tensor
from torch.nn.attention.flex_attention import flex_attention

import dilattn
from dilattn.config import DilatedConfig
from dilattn.engines.gather import RECOMPILE_LIMIT
from dilattn.reference import dilated_attention_reference, multiplicity

__all__ = ["main"]

Attend = Callable[[Tensor, Tensor, Tensor, "_Case"], Tensor]

_ZERO_RGB = (36, 36, 36)
_PALETTE = ((66, 135, 245), (76, 201, 122), (250, 204, 60), (245, 118, 56), (222, 62, 150))
_TERMINAL_MAX, _PNG_MAX = 256, 4096
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_DTYPES |= {str(dtype).removeprefix("torch."): dtype for dtype in _DTYPES.values()}
_FLOORS = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are reported like dilattn's own ``ValueError``s."""

    def error(self, message: str) -> NoReturn:
        raise ValueError(f"{self.prog}: {message} (see --help)")


def _at_least(low: int) -> Callable[[str], int]:
    """An argparse ``type``: an integer ``>= low``."""

    def integer(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {value}")
        return value

    return integer


_positive = _at_least(1)


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


def _info(args: argparse.Namespace, console: Console) -> int:
    """Versions, the device, and which computation paths run on this machine."""
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
    table.add_section()
    table.add_row("math (any device, forward+backward)", _yes(True))
    table.add_row("flex eager (CPU: forward only)", _yes(True))
    table.add_row("flex compiled (CUDA: forward+backward)", _yes(cuda and bool(triton_version)))
    console.print(table)
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
    console.print(Text(title, style="bold"))
    console.print(Text("rows: queries, columns: keys", style="dim"))
    if args.png is None:
        console.print(_grid(counts), soft_wrap=True)
    else:
        _write_png(args.png, _png_rows(counts))
        console.print(f"wrote {args.png}", soft_wrap=True)
    legend = Text("branches seeing the key: ")
    for count in range(len(config.branches) + 1):
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


def _time_ms(fn: Callable[[], object], repeats: int, cuda: bool) -> float:
    """Median milliseconds of ``fn`` after warm-up: CUDA events on CUDA, else wall time."""
    for _ in range(3 if cuda else 1):
        fn()
    times: list[float] = []
    for _ in range(repeats):
        if cuda:
            start = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
            end = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            fn()
            times.append((time.perf_counter() - begin) * 1e3)
    return statistics.median(times)


def _matmul_tflops(repeats: int) -> float:
    """Measured bf16 TFLOP/s of one 8192^3 matmul, timed as the attention calls are."""
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    return 2 * 8192**3 / _time_ms(lambda: a @ b, repeats, cuda=True) / 1e9


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
    repeats: int,
) -> dict[str, Any]:
    """Time ``fn`` (with the backward to ``inputs`` when ``grad`` is given) into one row."""
    cuda = inputs[0].is_cuda
    step = fn if grad is None else lambda: torch.autograd.grad(fn(), inputs, grad)
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    try:
        ms = _time_ms(step, repeats, cuda)
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
    dtype = _DTYPES[args.dtype or ("bf16" if cuda else "fp32")]
    repeats = args.repeats or (20 if cuda else 3)
    flex = torch.compile(flex_attention, dynamic=False) if cuda else flex_attention
    matmul = _matmul_tflops(repeats) if cuda else None
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
                    rows.append(_bench_row(name, S, fn, inputs, grad, flops, repeats))
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
                "repeats": repeats,
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


# the command line


def _parser() -> _Parser:
    parser = _Parser(prog="dilattn", description="Exact LongNet dilated attention: tools.")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="versions, device and available paths").set_defaults(run=_info)

    def branches(sub: argparse.ArgumentParser, required: bool) -> None:
        sub.add_argument(
            "--segment-lengths", nargs="+", type=_positive, metavar="W", required=required
        )
        sub.add_argument(
            "--dilation-rates", nargs="+", type=_positive, metavar="R", required=required
        )

    def device(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")

    mask = commands.add_parser("mask", help="draw which keys each query sees")
    branches(mask, required=True)
    mask.add_argument("--seq-len", type=_positive, metavar="S", required=True)
    mask.add_argument("--heads", type=_positive, metavar="H", default=1)
    mask.add_argument("--head", type=_at_least(0), metavar="H", default=0, help="the head to draw")
    mask.add_argument("--causal", action="store_true")
    mask.add_argument("--head-offsets", choices=("cyclic", "grouped"), default="cyclic")
    mask.add_argument("--png", type=Path, metavar="PATH", help="write a PNG image instead")
    mask.set_defaults(run=_mask)

    check = commands.add_parser("check", help="compare every path with the reference")
    device(check)
    check.add_argument("--seed", type=int, default=0)
    check.set_defaults(run=_check)

    bench = commands.add_parser("bench", help="time dilated attention against dense SDPA")
    branches(bench, required=False)
    device(bench)
    bench.add_argument("--seq-lens", nargs="+", type=_positive, metavar="S")
    bench.add_argument("--heads", type=_positive, metavar="H")
    bench.add_argument("--head-dim", type=_positive, metavar="D", default=64)
    bench.add_argument("--batch", type=_positive, metavar="B", default=1)
    bench.add_argument("--causal", action="store_true")
    bench.add_argument("--dtype", choices=tuple(_DTYPES))
    bench.add_argument("--backward", action="store_true", help="time forward+backward")
    bench.add_argument("--repeats", type=_positive, metavar="N")
    bench.add_argument("--json", type=Path, metavar="PATH")
    bench.set_defaults(run=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (2 for bad arguments)."""
    try:
        args = _parser().parse_args(argv)
        with warnings.catch_warnings():  # eager flex on CPU is intended here
            warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
            code: int = args.run(args, Console(highlight=False))
    except (ValueError, TypeError) as error:
        Console(stderr=True).print(Text(f"error: {error}", style="red"), soft_wrap=True)
        return 2
    return code
