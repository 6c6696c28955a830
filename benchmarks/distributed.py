"""Weak scaling of sequence-parallel dilated attention: a fixed number of tokens per GPU.

    NCCL_NVLS_ENABLE=0 torchrun --standalone --nproc-per-node 4 benchmarks/distributed.py \\
        --causal --json out/distributed.json            # 2M tokens per GPU, paper config
    ... --extend       # add branches (2w, 2r), ... up to the whole sequence: they span GPUs
    ... --search       # also the largest tokens per GPU that runs, per group size

One launch measures groups of the first 1, 2, 4, ... ranks (the others wait): per layer the
forward (under no_grad) and forward+backward time (CUDA events after warm-up, median, the
slowest rank), the bytes each rank sends and receives in the forward (the sizes of its
all-to-all tensors; the backward moves as many back), and the peak memory (the largest rank).
A rich table on rank 0, JSON with ``--json``. On CPUs it runs with gloo at toy sizes.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from rich.console import Console
from rich.table import Table

from dilattn import DilatedConfig
from dilattn.distributed import dilated_attention_parallel, exchanged_bytes
from dilattn.distributed.sequence_parallel import is_local

PAPER = ((2048, 4096, 8192, 16384, 32768), (1, 2, 4, 6, 12))
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def extend(config: DilatedConfig, seq_len: int) -> DilatedConfig:
    """``config`` with branches ``(2w, 2r), (4w, 4r), ...`` after its last ``(w, r)`` until a
    segment holds the whole sequence (the paper's rule: segment and rate grow together)."""
    w, r = config.branches[-1]
    extra = []
    while w < seq_len:
        w, r = 2 * w, 2 * r
        extra.append((w, r))
    return DilatedConfig(
        config.segment_lengths + tuple(x for x, _ in extra),
        config.dilation_rates + tuple(y for _, y in extra),
    )


def reduce_max(value: float, group: dist.ProcessGroup, device: torch.device) -> float:
    x = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(x, op=dist.ReduceOp.MAX, group=group)
    return float(x.item())


def median_ms(
    fn: Callable[[], object], args: argparse.Namespace, group: dist.ProcessGroup, cuda: bool
) -> float:
    """Median milliseconds of ``fn`` on this rank after warm-up, the group lined up first."""
    for _ in range(args.warmup):
        fn()
    times = []
    for _ in range(args.repeats):
        if cuda:
            torch.cuda.synchronize()
        dist.barrier(group=group)
        if cuda:
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
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


def measure(
    args: argparse.Namespace, tokens: int, size: int, group: dist.ProcessGroup, device: torch.device
) -> dict[str, Any]:
    """One row: ``size`` ranks with ``tokens`` tokens each (this rank is one of them)."""
    cuda = device.type == "cuda"
    seq_len = tokens * size
    config = DilatedConfig(tuple(args.segment_lengths), tuple(args.dilation_rates))
    if args.extend:
        config = extend(config, seq_len)
    B, H, Hkv, D = args.batch, args.heads, args.kv_heads or args.heads, args.head_dim
    dtype = DTYPES[args.dtype]
    q = torch.randn(B, H, tokens, D, device=device, dtype=dtype, requires_grad=True)
    k, v = (
        torch.randn(B, Hkv, tokens, D, device=device, dtype=dtype, requires_grad=True) for _ in "kv"
    )
    grad = torch.randn_like(q)
    kwargs: dict[str, Any] = {"group": group, "is_causal": args.causal, "enable_gqa": Hkv != H}
    branches = (config.segment_lengths, config.dilation_rates)

    def forward() -> torch.Tensor:
        out = dilated_attention_parallel(q, k, v, *branches, **kwargs)
        assert isinstance(out, torch.Tensor)
        return out

    def step() -> None:
        torch.autograd.grad(forward(), (q, k, v), grad)

    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        fwd_ms = median_ms(forward, args, group, cuda)
    bwd_ms = None if args.no_backward else median_ms(step, args, group, cuda)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
    moved = exchanged_bytes(q, k, v, *branches, **kwargs)
    flops = config.flops(seq_len, batch_size=B, num_heads=H, head_dim=D, is_causal=args.causal)
    fwd_ms = reduce_max(fwd_ms, group, device)
    return {
        "gpus": size,
        "tokens_per_gpu": tokens,
        "seq_len": seq_len,
        "branches": [list(b) for b in config.branches],
        "spanning_branches": [
            list(b) for b in config.branches if not is_local(b[0], tokens, seq_len)
        ],
        "fwd_ms": fwd_ms,
        "fwd_bwd_ms": None if bwd_ms is None else reduce_max(bwd_ms, group, device),
        "fwd_tflops_per_gpu": flops / size / fwd_ms / 1e9,
        "sent_mib": reduce_max(moved.sent, group, device) / 2**20,
        "received_mib": reduce_max(moved.received, group, device) / 2**20,
        "peak_gib": reduce_max(peak, group, device),
    }


def attempt(
    args: argparse.Namespace, tokens: int, size: int, group: dist.ProcessGroup, device: torch.device
) -> dict[str, Any] | None:
    """:func:`measure`, or ``None`` when some rank ran out of memory (all ranks agree; a rank
    that fails inside a collective may leave the others waiting until the group's timeout)."""
    failed = 0.0
    row = None
    try:
        row = measure(args, tokens, size, group, device)
    except torch.OutOfMemoryError:
        failed = 1.0
    torch.cuda.empty_cache()
    return None if reduce_max(failed, group, device) else row


def search(
    args: argparse.Namespace, size: int, group: dist.ProcessGroup, device: torch.device
) -> dict[str, Any] | None:
    """The largest tokens per GPU that runs: doubling from ``--tokens-per-gpu`` while the
    measured peak memory, scaled linearly, fits the device; then the predicted largest size
    (a multiple of the longest configured segment), tried once."""
    limit = 0.92 * torch.cuda.get_device_properties(device).total_memory / 2**30
    step = max(args.segment_lengths)
    tokens, best = args.tokens_per_gpu, None
    while (row := attempt(args, tokens, size, group, device)) is not None:
        best = row
        if 2 * row["peak_gib"] > limit:
            guess = int(tokens * limit / row["peak_gib"]) // step * step
            if guess > tokens and (row := attempt(args, guess, size, group, device)):
                best = row
            break
        tokens *= 2
    return best


def table(console: Console, title: str, rows: list[dict[str, Any]]) -> None:
    single = {r["tokens_per_gpu"]: r for r in rows if r["gpus"] == 1}
    t = Table(
        title=title,
        caption="time ratio: vs 1 GPU at the same tokens per GPU (floor: <= 1.3 at 4 GPUs)",
    )
    for name in (
        "GPUs",
        "tokens/GPU",
        "S",
        "fwd ms",
        "fwd+bwd ms",
        "ratio fwd",
        "ratio fwd+bwd",
        "TFLOP/s/GPU",
        "sent MiB",
        "recv MiB",
        "peak GiB",
    ):
        t.add_column(name, justify="right")
    fmt = lambda x, spec: "-" if x is None else format(x, spec)
    for r in rows:
        base = single.get(r["tokens_per_gpu"], {})
        ratio = {
            key: r[key] / base[key] if base.get(key) else None for key in ("fwd_ms", "fwd_bwd_ms")
        }
        t.add_row(
            str(r["gpus"]),
            f"{r['tokens_per_gpu']:,}",
            f"{r['seq_len']:,}",
            fmt(r["fwd_ms"], ".2f"),
            fmt(r["fwd_bwd_ms"], ".2f"),
            fmt(ratio["fwd_ms"], ".2f"),
            fmt(ratio["fwd_bwd_ms"], ".2f"),
            fmt(r["fwd_tflops_per_gpu"], ".1f"),
            fmt(r["sent_mib"], ".2f"),
            fmt(r["received_mib"], ".2f"),
            fmt(r["peak_gib"], ".2f"),
        )
    console.print(t)


def parse() -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--tokens-per-gpu", type=int, default=2**21 if cuda else 256)
    p.add_argument("--segment-lengths", type=int, nargs="+", default=PAPER[0] if cuda else (32, 64))
    p.add_argument("--dilation-rates", type=int, nargs="+", default=PAPER[1] if cuda else (1, 2))
    p.add_argument("--extend", action="store_true", help="add (2w, 2r) branches up to the sequence")
    p.add_argument("--causal", action="store_true")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=12 if cuda else 4)
    p.add_argument("--kv-heads", type=int, default=None, help="GQA: key/value heads")
    p.add_argument("--head-dim", type=int, default=64 if cuda else 16)
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16" if cuda else "fp32")
    p.add_argument(
        "--gpus", type=int, nargs="+", default=None, help="group sizes (default 1, 2, 4, ..., all)"
    )
    p.add_argument("--repeats", type=int, default=10 if cuda else 3)
    p.add_argument("--warmup", type=int, default=3 if cuda else 1)
    p.add_argument("--no-backward", action="store_true", help="time the forward only")
    p.add_argument("--search", action="store_true", help="also the largest tokens per GPU (CUDA)")
    p.add_argument("--json", type=Path, default=None)
    return p.parse_args()


def main() -> None:
    args = parse()
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast off
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=10))
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    world, rank = dist.get_world_size(), dist.get_rank()
    sizes = args.gpus or sorted(
        {*(2**i for i in range(world.bit_length()) if 2**i <= world), world}
    )
    rows, largest = [], []
    for size in sizes:
        group = dist.new_group(list(range(size)))  # every rank creates every group
        if rank < size:
            rows.append(measure(args, args.tokens_per_gpu, size, group, device))
            if args.search and cuda:
                largest.append(search(args, size, group, device))
        dist.barrier()
    console = Console()
    if rank == 0:
        shape = f"B={args.batch} H={args.heads} D={args.head_dim}"
        title = f"dilated attention, sequence parallel: {args.dtype} {shape}"
        title += " causal" if args.causal else ""
        table(console, title, rows)
        if largest:
            table(console, "largest tokens per GPU that ran", [r for r in largest if r])
        if args.json is not None:
            header = {
                "torch": torch.__version__,
                "device": torch.cuda.get_device_name() if cuda else "CPU",
                "world": world,
                "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            }
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(
                json.dumps({"header": header, "rows": rows, "largest": largest}, indent=2) + "\n"
            )
            console.print(f"wrote {args.json}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
