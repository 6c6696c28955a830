"""Every script in ``examples/`` runs (its ``main``, with tiny settings where its CPU defaults
take more than a few seconds), its own checks pass and it writes what it promises; one whose
extra is missing skips."""

from __future__ import annotations

import importlib.util
import json
import math
import runpy
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from dilattn import LongNetConfig, LongNetLM

EXAMPLES = Path(__file__).parent.parent / "examples"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


# train_lm.py and plot_loss.py have their own tests below; sequence_parallel.py runs under
# torchrun in tests/test_distributed.py
OWN_TESTS = ("train_lm.py", "plot_loss.py", "sequence_parallel.py")
SCRIPTS = [path for path in sorted(EXAMPLES.glob("*.py")) if path.name not in OWN_TESTS]
NEEDS = {"huggingface_llama.py": "transformers"}
TINY_MAIN = {"custom_block.py": {"steps": 3}}


def test_examples_are_found() -> None:
    assert {"swap_multihead_attention.py", "custom_block.py", "huggingface_llama.py"} <= {
        path.name for path in SCRIPTS
    }


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda path: path.stem)
def test_example_runs(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    needed = NEEDS.get(path.name)
    if needed is not None and importlib.util.find_spec(needed) is None:
        pytest.skip(f"{path.name} needs {needed}")
    example = runpy.run_path(str(path))  # a script without main() runs here
    if "main" in example:
        example["main"](**TINY_MAIN.get(path.name, {}))
    assert capsys.readouterr().out.strip()


TINY = "--seq-len 32 --batch-size 2 --d-model 32 --heads 2 --layers 1 --segments 8,16 --rates 1,2"


def test_train_lm_tiny_run_writes_checkpoint_history_and_sample(tmp_path: Path) -> None:
    train_lm = _load("train_lm")
    args = f"{TINY} --steps 3 --eval-every 2 --eval-batches 2 --sample-len 20".split()
    history = train_lm.main([*args, "--out", str(tmp_path), "--json", str(tmp_path / "h.json")])
    assert [step for step, _ in history["train"]] == [1, 2, 3]
    assert [step for step, _ in history["val"]] == [2, 3]
    assert 4.0 < history["unigram_bits"] < 5.5  # English bytes
    assert history["train"][0][1] == pytest.approx(math.log(256), abs=0.5)  # a fresh model
    assert json.loads((tmp_path / "h.json").read_text())["train"] == history["train"]
    assert history["sample"].startswith("The ")
    checkpoint = torch.load(tmp_path / "lm.pt")
    model = LongNetLM(checkpoint["vocab_size"], LongNetConfig(**checkpoint["config"]))
    model.load_state_dict(checkpoint["model"])
    assert model.config.segment_lengths == (8, 16)


def test_python_documents_are_english_prose() -> None:
    documents = _load("train_lm").python_documents()
    text = "\n\n".join(documents)
    assert len(text) > 1_000_000
    assert sum(word in text for word in (" the ", " and ", " of ", " is ")) == 4


def test_train_lm_on_a_given_text_and_plot(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    text = tmp_path / "text.txt"
    text.write_text("It was the best of times, it was the worst of times. " * 40)
    args = f"{TINY} --steps 2 --eval-every 1 --eval-batches 1 --sample-len 5 --text {text}"
    png = tmp_path / "loss.png"
    history = _load("train_lm").main([*args.split(), "--out", str(tmp_path), "--plot", str(png)])
    assert history["source"] == str(text)
    assert png.read_bytes()[:4] == b"\x89PNG"
    (tmp_path / "h.json").write_text(json.dumps(history))
    _load("plot_loss").main([str(tmp_path / "h.json"), "-o", str(tmp_path / "again.png")])
    assert (tmp_path / "again.png").exists()
