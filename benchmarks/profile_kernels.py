"""Where the strided engine's time goes, and what CUDA-graph replay of short calls buys.

    python benchmarks/profile_kernels.py       # on a CUDA machine; JSON to $OUT or /tmp

Paper configuration, bf16, causal, H=12, D=64, B=1, inputs with fresh values each call.
Eager time (CUDA events, median) forward and forward+backward:

* at 8K, 16K and 32K, with CUDA-graph replay of the engine's kernels (``GRAPH_ROWS``, the
  default there) and without, against dense causal SDPA;
* at 1M, paper configuration and one branch per head (``head_offsets="split"``, inputs
  ``(B, S, H, D)``);

then the GPU kernels of one forward (torch.profiler, mean of 5) at 16K and for the split
layout at 1M, and whether a warm call synchronises the host.
"""

import contextlib
import json
import os
import statistics
from collections.abc import Callable, Iterator

import torch
from torch.profiler import ProfilerActivity, profile

import dilattn
from dilattn.engines import strided

OUT = os.environ.get("OUT", "/tmp")
PAPER = ((2048, 4096, 8192, 16384, 32768), (1, 2, 4, 6, 12))
res: dict[str, object] = {}


def timeit(fn: Callable[[int], object], n: int = 20, warm: int = 5) -> float:
    for i in range(warm):
        fn(i)
    ts = []
    for i in range(n):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn(i)
        e.record()
        torch.cuda.synchronize()
        ts.append(s.elapsed_time(e))
    return statistics.median(ts)


def breakdown(name: str, fn: Callable[[int], object]) -> None:
    """GPU kernels of one call of ``fn``: (name, launches, ms), the busiest first."""
    for i in range(3):
        fn(i)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as p:
        for i in range(5):
            fn(i)
        torch.cuda.synchronize()
    rows = []
    for ev in p.key_averages():
        t = getattr(ev, "device_time_total", 0) or getattr(ev, "cuda_time_total", 0)
        if t > 0 and ev.device_type == torch.autograd.DeviceType.CUDA:
            rows.append((ev.key[:90], ev.count // 5, t / 5 / 1000))
    rows.sort(key=lambda r: -r[2])
    res[name + "/kernels"] = rows[:15]
    res[name + "/gpu_ms"] = sum(r[2] for r in rows)
    print(name, "gpu busy ms", round(res[name + "/gpu_ms"], 3), flush=True)


@contextlib.contextmanager
def graph_rows(rows: int) -> Iterator[None]:
    saved, strided.GRAPH_ROWS = strided.GRAPH_ROWS, rows
    try:
        yield
    finally:
        strided.GRAPH_ROWS = saved


def inputs(S: int, layout: str, grad: bool, sets: int = 2) -> list[list[torch.Tensor]]:
    shape = (1, S, 12, 64) if layout == "bshd" else (1, 12, S, 64)
    out = []
    for _ in range(sets):
        xs = [torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
        xs = [x.transpose(1, 2) if layout == "bshd" else x for x in xs]
        out.append([x.requires_grad_(grad) for x in xs])
    return out


def step(
    call: Callable[..., torch.Tensor], sets: list[list[torch.Tensor]], backward: bool
) -> Callable[[int], object]:
    grad = torch.randn_like(sets[0][0])

    def run(i: int) -> object:
        qkv = sets[i % len(sets)]
        out = call(*qkv)
        return torch.autograd.grad(out, qkv, grad) if backward else out

    return run


def paper(**kw: object) -> Callable[..., torch.Tensor]:
    return lambda q, k, v: dilattn.dilated_attention(q, k, v, *PAPER, is_causal=True, **kw)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)


for backward in (False, True):
    tag = "fwd+bwd" if backward else "fwd"
    for S in (8192, 16384, 32768):
        sets = inputs(S, "bhsd", backward)
        for rows in (strided.GRAPH_ROWS, 0):
            with graph_rows(rows):
                res[f"paper{S}/{tag}/replay={rows > 0}/ms"] = timeit(step(paper(), sets, backward))
        res[f"paper{S}/{tag}/sdpa/ms"] = timeit(step(sdpa, sets, backward))
        print({k: round(v, 3) for k, v in res.items() if k.startswith(f"paper{S}/{tag}")})
    split = {"head_offsets": "split"}
    for name, layout, kw in (("paper1M", "bhsd", {}), ("split1M", "bshd", split)):
        sets = inputs(1 << 20, layout, backward, sets=1)
        res[f"{name}/{tag}/ms"] = timeit(step(paper(**kw), sets, backward), n=10, warm=3)
        print({k: round(v, 3) for k, v in res.items() if k.startswith(f"{name}/{tag}")})
        del sets
        torch.cuda.empty_cache()

with torch.no_grad():
    small = inputs(16384, "bhsd", False)
    with graph_rows(0):
        breakdown("paper16K/no-replay", step(paper(), small, False))
    breakdown("paper16K", step(paper(), small, False))
    big = inputs(1 << 20, "bshd", False, sets=1)
    breakdown("split1M", step(paper(head_offsets="split"), big, False))
    torch.cuda.set_sync_debug_mode("error")
    try:
        step(paper(), small, False)(0)
        res["paper16K/host_sync"] = "none"
    except RuntimeError as error:
        res["paper16K/host_sync"] = str(error)[:200]
    torch.cuda.set_sync_debug_mode(0)
print({k: v for k, v in res.items() if not k.endswith("kernels")})
with open(f"{OUT}/profile_kernels.json", "w") as fh:
    json.dump(res, fh, indent=1)
