"""Plot loss histories written by ``train_lm.py --json`` (needs matplotlib).

python examples/plot_loss.py run.json [more.json ...] -o docs/loss.png
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path


def plot(histories: Sequence[dict], path: str | Path, labels: Sequence[str] | None = None) -> None:
    """Training and validation bits per byte against tokens seen, one line pair per history,
    with each run's unigram (byte-frequency) baseline dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for i, history in enumerate(histories):
        label = labels[i] if labels else history.get("label", f"run {i}")
        color = f"C{i}"
        tokens = history["tokens_per_step"]
        steps, losses = zip(*history["train"], strict=True)
        bpb = [loss / math.log(2) for loss in losses]
        ax.plot(
            [s * tokens for s in steps], bpb, color=color, alpha=0.5, lw=1, label=f"{label}: train"
        )
        if history["val"]:
            steps, losses = zip(*history["val"], strict=True)
            ax.plot(
                [s * tokens for s in steps],
                [loss / math.log(2) for loss in losses],
                color=color, marker="o", lw=2, label=f"{label}: validation",
            )  # fmt: skip
        ax.axhline(history["unigram_bits"], color=color, ls="--", lw=1, label=f"{label}: unigram")
    ax.set_xlabel("tokens (bytes) seen")
    ax.set_ylabel("bits per byte")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("LongNetLM (dilattn), byte-level")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("histories", nargs="+", help="JSON files written by train_lm.py --json")
    parser.add_argument("-o", "--output", required=True, help="PNG to write")
    parser.add_argument("--labels", help="comma-separated labels, one per history")
    args = parser.parse_args(argv)
    histories = [json.loads(Path(p).read_text()) for p in args.histories]
    plot(histories, args.output, args.labels.split(",") if args.labels else None)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
