"""What decoding costs on first use: compile time and graphs, then the time of a step.

    python benchmarks/decode_compile.py       # on a CUDA machine; JSON to $OUT or /tmp

A fresh process, a ``LongNetLM`` of 2 layers (d_model 256, 4 query and 2 key/value heads,
segments 64/128/256, dilations 1/2/4, float32, B = 2), under ``torch.no_grad``:

1. one forward of 600 tokens (compiled flex on strided views);
2. a prefill of 300 tokens into a key/value cache;
3. 300 decoding steps of one token (the gathered flex engine, a longer cache each step).

For each phase: its wall time (synchronised) and the graphs dynamo compiled by then; then
the median time of one decoding step after the first ten.
"""

import argparse
import json
import os
import statistics
import time

import torch
from torch._dynamo.utils import counters

from dilattn.nn.models import LongNetConfig, LongNetLM

OUT = os.environ.get("OUT", "/tmp")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", help="torch device (default: %(default)s)")
    device = torch.device(parser.parse_args().device)
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    torch.manual_seed(0)
    config = LongNetConfig(
        d_model=256, num_heads=4, num_layers=2, ffn_dim=512, num_kv_heads=2,
        segment_lengths=(64, 128, 256), dilation_rates=(1, 2, 4),
    )  # fmt: skip
    model = LongNetLM(256, config, device=device).eval()
    tokens = torch.randint(0, 256, (2, 600), device=device)
    rows: list[dict[str, object]] = []
    steps: list[float] = []
    start = time.perf_counter()

    def phase(name: str) -> None:
        sync()
        graphs = counters["stats"]["unique_graphs"]
        rows.append({"phase": name, "seconds": time.perf_counter() - start, "graphs": graphs})
        print(f"{name:<24} {rows[-1]['seconds']:8.2f} s   {graphs:3d} graphs", flush=True)

    with torch.no_grad():
        model(tokens)
        phase("forward, 600 tokens")
        caches = model.new_kv_caches(2, 600)
        model(tokens[:, :300], kv_caches=caches)
        phase("prefill, 300 tokens")
        for t in range(300, 600):
            before = time.perf_counter()
            model(tokens[:, t : t + 1], kv_caches=caches)
            sync()
            steps.append(time.perf_counter() - before)
            if t == 309:
                phase("10 decoding steps")
        phase("300 decoding steps")
    step = statistics.median(steps[10:])
    print(f"one decoding step after the first ten: {1e3 * step:.1f} ms (median)")
    path = os.path.join(OUT, "decode_compile.json")
    with open(path, "w") as file:
        json.dump({"device": str(device), "phases": rows, "step_ms": 1e3 * step}, file, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
