"""The compiled flex paths' probe (behind the flex-path numbers of docs/benchmarks.md).

    python benchmarks/flex_paths.py       # on a CUDA machine; JSON to $OUT or /tmp

1. Kernels for one shape against the kernel for dynamic shapes: causal sliding-window
   ``local_attention`` (W = 512, B = 1, H = 8, D = 64, bf16) at 64K and 256K, forward and
   forward+backward, 20 queued calls between CUDA events (median of 5), first with the
   library's policy (the first ``STATIC_SHAPES`` shapes get kernels of their own), then with
   every shape dynamic (``STATIC_SHAPES = 0``, the dynamic kernel compiled on another shape
   first, as torch's automatic dynamic shapes would).
2. The gathered flex engine (``flex_gather``, called directly: ``backend="flex"`` takes
   ``flex_strided`` for these calls; paper configuration, causal, H = 12, D = 64, bf16) at
   8K, 32K and 128K: one call between CUDA events (median of 10), and the
   peak memory over its inputs.
"""

import json
import os
import statistics
from collections.abc import Callable

import torch
from torch import Tensor

import dilattn
from dilattn.engines import gather

OUT = os.environ.get("OUT", "/tmp")
PAPER = ((2048, 4096, 8192, 16384, 32768), (1, 2, 4, 6, 12))
rows: list[dict[str, object]] = []


def qkv(S: int, H: int, grad: bool) -> list[Tensor]:
    return [
        torch.randn(1, H, S, 64, device="cuda", dtype=torch.bfloat16, requires_grad=grad)
        for _ in range(3)
    ]


def step(call: Callable[..., Tensor], inputs: list[Tensor], backward: bool) -> Callable[[], None]:
    def run() -> None:
        out = call(*inputs)
        if backward:
            torch.autograd.grad(out, inputs, torch.ones_like(out))

    return run


def median_ms(run: Callable[[], None], calls: int, repeats: int) -> float:
    for _ in range(3):
        run()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            run()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return statistics.median(times)


def add(row: dict[str, object]) -> None:
    rows.append(row)
    print(row, flush=True)
    with open(f"{OUT}/flex_paths.json", "w") as f:
        json.dump(rows, f, indent=1)


def local(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    out: Tensor = dilattn.local_attention(q, k, v, 512, is_causal=True, exact_windowsize=True)
    return out


def static_against_dynamic() -> None:
    for policy in ("static", "dynamic"):
        if policy == "dynamic":
            gather.STATIC_SHAPES = 0
            gather._static_shapes = gather._StaticShapes()
            step(local, qkv(3 * 4096, 8, True), True)()  # the dynamic kernel's first shape
        for backward in (False, True):
            for S in (1 << 16, 1 << 18):
                ms = median_ms(step(local, qkv(S, 8, backward), backward), 20, 5)
                add({"probe": "local", "policy": policy, "S": S, "backward": backward, "ms": ms})


def branch_path() -> None:
    config = dilattn.DilatedConfig(*PAPER)

    def call(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        branches, offsets = config.branches, config.offsets(q.shape[1])
        scale = q.shape[-1] ** -0.5
        out, _ = gather.branch_attention(
            q, k, v, branches, offsets, is_causal=True, scale=scale, backend="flex"
        )
        return out

    for backward in (False, True):
        for S in (1 << 13, 1 << 15, 1 << 17):
            inputs = qkv(S, 12, backward)
            run = step(call, inputs, backward)
            with torch.set_grad_enabled(backward):
                ms = median_ms(run, 1, 10)
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                run()
                torch.cuda.synchronize()
            peak = (torch.cuda.max_memory_allocated() - base) / 2**20
            add({"probe": "branch", "S": S, "backward": backward, "ms": ms, "peak_mib": peak})


if __name__ == "__main__":
    torch._dynamo.config.recompile_limit = 256
    static_against_dynamic()
    branch_path()
