"""Where the flex engine's time goes: GPU kernels and host time of one forward per option.

    python benchmarks/profile_flex.py [S]     # on a CUDA machine; JSON to $OUT or /tmp

Paper configuration, bf16, causal, B=1, H=12, D=64: for the plain call (strided and flex
engines), 8 documents and ALiBi, the CUDA-event median of the forward, the host time of one
call (no synchronisation), and the GPU kernels of one forward (torch.profiler).
"""

import json
import os
import sys
import time

import torch
import triton
from torch.profiler import ProfilerActivity, profile

import dilattn

OUT = os.environ.get("OUT", "/tmp")
PAPER = ((2048, 4096, 8192, 16384, 32768), (1, 2, 4, 6, 12))
S = int(sys.argv[1]) if len(sys.argv) > 1 else 1 << 17


def timeit(fn) -> float:
    """CUDA-event median in ms, after warm-up (triton's ``do_bench``)."""
    return triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")


q, k, v = (torch.randn(1, 12, S, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
docs = (torch.arange(S, device="cuda") // (S // 8)).view(1, S)
cases = {
    "plain strided": {},
    "plain flex": {"backend": "flex"},
    "documents 8": {"document_ids": docs},
    "alibi": {"score_mod": dilattn.alibi_score_mod(12)},
}
res = {}
with torch.no_grad():
    for name, kw in cases.items():
        call = lambda kw=kw: dilattn.dilated_attention(q, k, v, *PAPER, is_causal=True, **kw)
        ms = timeit(call)
        torch.cuda.synchronize()
        t = time.perf_counter()
        call()
        host = (time.perf_counter() - t) * 1e3
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            call()
            torch.cuda.synchronize()
        kernels = {}
        for e in prof.key_averages():
            if e.device_time_total > 0:
                kernels[e.key[:80]] = (round(e.device_time_total / 1e3, 3), e.count)
        top = sorted(kernels.items(), key=lambda x: -x[1][0])[:8]
        res[name] = {"ms": ms, "host_ms": host, "kernels": top}
        print(f"{name}: {ms:.2f} ms, host {host:.2f} ms")
        for key, (t_ms, count) in top:
            print(f"    {t_ms:8.3f} ms  x{count:<4} {key}")
with open(os.path.join(OUT, "profile_flex.json"), "w") as f:
    json.dump(res, f, indent=1)
