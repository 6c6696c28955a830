"""Train a small byte-level LongNetLM on English text that is already on the machine.

The text: the documentation that ships with Python itself, so nothing is downloaded. Every
docstring of at least 80 characters (and mostly letters and spaces) in the ``.py`` files of
the standard library (``sysconfig.get_paths()["stdlib"]``, without its tests, ``idlelib``,
``lib2to3``, ``turtledemo`` and ``site-packages``), plus the language reference that
``help()`` shows (``pydoc_data.topics``): about 2.2 MB of English prose on Python 3.11.
``--corpus installed`` adds the docstrings of every installed package (torch's alone add
about 5.7 MB); ``--text FILE`` trains on any file. Every 20th document is held out for
validation.

    python examples/train_lm.py                      # CPU, a few minutes
    python examples/train_lm.py --device cuda --bf16 --compile --seq-len 65536 ...

Prints the unigram (byte-frequency) entropy as the baseline to beat, loss and bits per byte
during training, tokens/s; saves a checkpoint, the loss history (``--json``) and its plot
(``--plot``, with matplotlib), and prints a sample generated with the KV cache.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import math
import re
import sys
import sysconfig
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from dilattn import LongNetConfig, LongNetLM

_DOCSTRING = re.compile(r'"""(.+?)"""', re.S)
_SKIP = {"site-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo", "__pycache__"}


def python_documents(corpus: str = "stdlib") -> list[str]:
    """English documents from this Python: docstrings of the standard library (and, for
    ``corpus="installed"``, of every installed package) and ``pydoc_data.topics``."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    roots = [(stdlib, _SKIP)]
    if corpus == "installed":
        packages = {Path(sysconfig.get_paths()[key]) for key in ("purelib", "platlib")}
        roots += [(root, {"tests", "test", "__pycache__"}) for root in sorted(packages)]
    documents = []
    for root, skip in roots:
        for path in sorted(root.rglob("*.py")):
            if skip.intersection(path.relative_to(root).parts[:-1]):
                continue
            for text in _DOCSTRING.findall(path.read_text(encoding="utf-8", errors="replace")):
                text = inspect.cleandoc(text)
                prose = sum(c.isalpha() or c == " " for c in text)
                if len(text) >= 80 and prose > 0.8 * len(text):
                    documents.append(text)
    from pydoc_data.topics import topics

    return documents + [topics[name] for name in sorted(topics)]


def load_text(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Train and validation bytes (uint8 tensors) and a description of the source."""
    if args.text:
        data = Path(args.text).read_bytes()
        cut = int(len(data) * 0.95)
        return _bytes(data[:cut]), _bytes(data[cut:]), args.text
    documents = python_documents(args.corpus)
    join = lambda docs: "\n\n".join(docs).encode("utf-8")
    train = join(doc for i, doc in enumerate(documents) if i % 20)
    val = join(documents[::20])
    return _bytes(train), _bytes(val), f"Python {sys.version.split()[0]} docs ({args.corpus})"


def _bytes(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def unigram_bits(data: torch.Tensor) -> float:
    """Entropy of the byte frequencies, bits per byte: what a model without context gets."""
    p = torch.bincount(data.long(), minlength=256).double() / data.numel()
    return float(-(p[p > 0] * p[p > 0].log2()).sum())


def batch(
    data: torch.Tensor, args: argparse.Namespace, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows: inputs and next-byte targets, each ``(B, S)`` int64 on the device."""
    starts = torch.randint(0, data.numel() - args.seq_len - 1, (args.batch_size,), generator=gen)
    rows = torch.stack([data[s : s + args.seq_len + 1] for s in starts.tolist()]).long()
    rows = rows.to(args.device, non_blocking=True)
    return rows[:, :-1], rows[:, 1:]


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(","))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    data = p.add_argument_group("data")
    data.add_argument("--corpus", choices=["stdlib", "installed"], default="stdlib")
    data.add_argument("--text", help="train on this file instead (UTF-8 or any bytes)")
    model = p.add_argument_group("model")
    model.add_argument("--d-model", type=int, default=128)
    model.add_argument("--heads", type=int, default=4)
    model.add_argument("--layers", type=int, default=4)
    model.add_argument("--ffn-dim", type=int, help="default 4 * d-model")
    model.add_argument("--activation", choices=["gelu", "relu", "swiglu"], default="gelu")
    model.add_argument(
        "--segments", type=_ints, default=(64, 128, 256), help="w_i, e.g. 64,128,256"
    )
    model.add_argument("--rates", type=_ints, default=(1, 2, 4), help="r_i, e.g. 1,2,4")
    model.add_argument("--dropout", type=float, default=0.0)
    model.add_argument("--checkpointing", action="store_true", help="activation checkpointing")
    train = p.add_argument_group("training")
    train.add_argument("--seq-len", type=int, default=256)
    train.add_argument("--batch-size", type=int, default=8)
    train.add_argument("--steps", type=int, default=400)
    train.add_argument("--lr", type=float, default=3e-3)
    train.add_argument("--warmup", type=int, default=50, help="steps of linear warm-up")
    train.add_argument("--weight-decay", type=float, default=0.05)
    train.add_argument("--device", default="cpu")
    train.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    train.add_argument("--compile", action="store_true", help="torch.compile the model")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument(
        "--threads", type=int, help="CPU threads (torch.set_num_threads); 1 on a busy machine"
    )
    out = p.add_argument_group("evaluation and output")
    out.add_argument("--eval-every", type=int, default=100)
    out.add_argument("--eval-batches", type=int, default=8)
    out.add_argument("--out", default="out/train_lm", help="directory of the checkpoint")
    out.add_argument("--json", help="write the loss history here")
    out.add_argument("--plot", help="plot the loss curve into this PNG (needs matplotlib)")
    out.add_argument("--prompt", default="The ")
    out.add_argument("--sample-len", type=int, default=300)
    args = p.parse_args(argv)
    args.device = torch.device(args.device)
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    console = Console()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    train_data, val_data, source = load_text(args)
    baseline = unigram_bits(train_data)
    console.print(
        f"text: {source}: {train_data.numel():,} train / {val_data.numel():,} validation bytes; "
        f"unigram baseline [bold]{baseline:.3f} bits/byte[/]"
    )
    config = LongNetConfig(
        d_model=args.d_model,
        num_heads=args.heads,
        num_layers=args.layers,
        ffn_dim=args.ffn_dim or 4 * args.d_model,
        segment_lengths=args.segments,
        dilation_rates=args.rates,
        activation=args.activation,
        dropout=args.dropout,
        activation_checkpointing=args.checkpointing,
    )
    model = LongNetLM(256, config, device=args.device)
    console.print(
        f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {config}"
    )
    forward = torch.compile(model) if args.compile else model
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": args.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=args.lr,
        betas=(0.9, 0.95),
    )
    schedule = lambda step: (
        min(1.0, (step + 1) / args.warmup) * (0.55 + 0.45 * math.cos(math.pi * step / args.steps))
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    autocast = lambda: torch.autocast(args.device.type, dtype=torch.bfloat16, enabled=args.bf16)

    def loss_of(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        with autocast():
            logits = forward(inputs)
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())

    val_gen = torch.Generator().manual_seed(args.seed + 1)
    val_batches = [batch(val_data, args, val_gen) for _ in range(args.eval_batches)]

    @torch.no_grad()
    def evaluate() -> float:
        model.eval()
        loss = sum(loss_of(*b).item() for b in val_batches) / len(val_batches)
        model.train()
        return loss

    tokens_per_step = args.batch_size * args.seq_len
    history: dict = {
        "label": f"S={args.seq_len}, {args.device.type}",
        "args": {k: (str(v) if isinstance(v, torch.device) else v) for k, v in vars(args).items()},
        "source": source,
        "unigram_bits": baseline,
        "tokens_per_step": tokens_per_step,
        "train": [],
        "val": [],
    }
    columns = (
        TextColumn("[bold]train"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeRemainingColumn(),
    )
    train_time = 0.0
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("train", total=args.steps, status="")
        for step in range(1, args.steps + 1):
            started = time.perf_counter()
            loss = loss_of(*batch(train_data, args, gen))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            value = loss.item()  # synchronises
            train_time += time.perf_counter() - started
            history["train"].append([step, value])
            speed = tokens_per_step * step / train_time
            status = f"loss {value:.3f}  {value / math.log(2):.3f} bits/byte  {speed:,.0f} tok/s"
            progress.update(task, advance=1, status=status)
            if step % args.eval_every == 0 or step == args.steps:
                val = evaluate()
                history["val"].append([step, val])
                progress.console.print(
                    f"step {step:>5}: train {value / math.log(2):.3f}, validation "
                    f"{val / math.log(2):.3f} bits/byte (unigram {baseline:.3f})"
                )
    history["tokens_per_s"] = tokens_per_step * args.steps / train_time
    history["train_seconds"] = train_time
    final = history["val"][-1][1] / math.log(2)
    console.print(
        f"done: {args.steps} steps in {train_time:.0f} s, {history['tokens_per_s']:,.0f} tokens/s; "
        f"validation [bold]{final:.3f} bits/byte[/] vs unigram {baseline:.3f}"
    )

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = {
        "vocab_size": 256,
        "config": dataclasses.asdict(config),
        "model": model.state_dict(),
    }
    torch.save(checkpoint, out / "lm.pt")
    console.print(f"checkpoint: {out / 'lm.pt'}")
    if args.json:
        Path(args.json).write_text(json.dumps(history, indent=1))
        console.print(f"loss history: {args.json}")
    if args.plot:
        sys.path.insert(0, str(Path(__file__).parent))
        from plot_loss import plot

        plot([history], args.plot)
        console.print(f"loss curve: {args.plot}")

    model.eval()
    prompt = torch.tensor([list(args.prompt.encode())], device=args.device)
    sampler = torch.Generator(args.device).manual_seed(args.seed)
    sample = model.generate(prompt, args.sample_len, temperature=0.8, top_k=40, generator=sampler)
    text = bytes(sample[0].tolist()).decode("utf-8", errors="replace")
    console.rule("sample (temperature 0.8, top-k 40)")
    console.print(text, markup=False, highlight=False)
    history["sample"] = text
    return history


if __name__ == "__main__":
    main()
