"""Where the strided path's time goes (the probe behind docs/benchmarks.md's breakdowns).

    python benchmarks/profile_kernels.py       # on a CUDA machine; JSON to $OUT or /tmp

Paper configuration, bf16, causal, H=12, D=64: eager time (CUDA events, median) of the
forward at 16K and 32K with cuDNN and with the flash kernel per call, against dense SDPA,
and the GPU kernels of one forward (torch.profiler, mean of 5); then the same for the
one-branch-per-head layout (``head_offsets="split"``) at 1M, inputs ``(B, S, H, D)``.
"""

import json
import os
import statistics

import torch
from torch.profiler import ProfilerActivity, profile

import dilattn
from dilattn.engines import strided

aten = torch.ops.aten
OUT = os.environ.get("OUT", "/tmp")
PAPER = ((2048, 4096, 8192, 16384, 32768), (1, 2, 4, 6, 12))
res: dict[str, object] = {}
cudnn_sdpa = strided._sdpa


def timeit(fn, n=20, warm=5):
    for _ in range(warm):
        fn()
    ts = []
    for _ in range(n):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        ts.append(s.elapsed_time(e))
    return statistics.median(ts)


def breakdown(name, fn):
    """GPU kernels of one call of ``fn``: (name, launches, ms), the busiest first."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as p:
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
    rows = []
    for ev in p.key_averages():
        t = getattr(ev, "device_time_total", 0) or getattr(ev, "cuda_time_total", 0)
        if t > 0 and ev.device_type == torch.autograd.DeviceType.CUDA:
            rows.append((ev.key[:90], ev.count // 5, t / 5 / 1000))
    rows.sort(key=lambda r: -r[2])
    res[name + "/kernels"] = rows[:15]
    res[name + "/gpu_ms"] = sum(r[2] for r in rows)
    print(name, "gpu busy ms", round(res[name + "/gpu_ms"], 3))
    for r in rows[:10]:
        print("   ", r)


def use_flash(on):
    """Run each call with the flash kernel instead of cuDNN (or back)."""

    def sdpa(q, k, v, is_causal, scale):
        if strided._cudnn(q):
            out, lse, *_ = aten._scaled_dot_product_flash_attention(
                q, k, v, 0.0, is_causal, False, scale=scale
            )
            return out, lse
        return cudnn_sdpa(q, k, v, is_causal, scale)

    strided._sdpa = sdpa if on else cudnn_sdpa


def qkv(S, H=12, D=64, layout="bhsd"):
    shape = (1, S, H, D) if layout == "bshd" else (1, H, S, D)
    xs = [torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
    return [x.transpose(1, 2) for x in xs] if layout == "bshd" else xs


with torch.no_grad():
    for S in (16384, 32768):
        q, k, v = qkv(S)
        f = lambda: dilattn.dilated_attention(q, k, v, *PAPER, is_causal=True)  # noqa: B023
        sd = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: B023
        for flash in (False, True):
            use_flash(flash)
            res[f"paper{S}/flash={flash}/ms"] = timeit(f)
        use_flash(False)
        res[f"paper{S}/sdpa/ms"] = timeit(sd)
        breakdown(f"paper{S}", f)
    S = 1 << 20
    q, k, v = qkv(S, layout="bshd")
    f = lambda: dilattn.dilated_attention(q, k, v, *PAPER, is_causal=True, head_offsets="split")
    for flash in (False, True):
        use_flash(flash)
        res[f"split1M/flash={flash}/ms"] = timeit(f, n=10)
    use_flash(False)
    breakdown("split1M", f)
print({k: v for k, v in res.items() if not k.endswith("kernels")})
with open(f"{OUT}/profile_kernels.json", "w") as fh:
    json.dump(res, fh, indent=1)
