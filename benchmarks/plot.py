"""Turn the suite's JSON into a PNG: time and peak memory against S, log-log, a line per
implementation (solid forward, dashed forward+backward).

    python benchmarks/plot.py docs/bench.json docs/bench.png [--study paper]

Needs matplotlib (``pip install matplotlib``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("json", type=Path)
    parser.add_argument("png", type=Path)
    parser.add_argument("--study", default="paper")
    args = parser.parse_args(argv)
    data = json.loads(args.json.read_text())
    rows = [r for r in data["rows"] if r.get("study") == args.study and r.get("ms") is not None]
    if not rows:
        parser.error(f"no timed rows for study {args.study!r} in {args.json}")
    fig, (time_ax, mem_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    impls = sorted({r["impl"] for r in rows})
    for colour, impl in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"], impls, strict=False):
        for backward, style in ((False, "-"), (True, "--")):
            line = sorted(
                (r["seq_len"], r) for r in rows if r["impl"] == impl and r["backward"] == backward
            )
            if not line:
                continue
            label = f"{impl} ({'fwd+bwd' if backward else 'fwd'})"
            xs = [s for s, _ in line]
            time_ax.plot(
                xs, [r["ms"] for _, r in line], style, color=colour, marker="o", label=label
            )
            if all(r.get("peak_gib") is not None for _, r in line):
                mem_ax.plot(
                    xs,
                    [r["peak_gib"] for _, r in line],
                    style,
                    color=colour,
                    marker="o",
                    label=label,
                )
    header = data["header"]
    for ax, ylabel in ((time_ax, "time (ms)"), (mem_ax, "peak memory (GiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length S (tokens)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    time_ax.legend(fontsize=7)
    fig.suptitle(
        f"dilattn '{args.study}' on {header['device']}, {header['dtype']}, torch {header['torch']}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(args.png, dpi=120)
    print(f"wrote {args.png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
