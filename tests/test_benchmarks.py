"""The benchmark suite runs end to end on tiny sizes (the numbers come from a GPU run)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_quick_suite_writes_rows_for_every_impl(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    suite = _load("suite")
    assert suite.main(["--quick", "--studies", "paper", "--repeats", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    timed = {(r["impl"], r["seq_len"], r["backward"]) for r in rows if r.get("ms")}
    for S in (256, 512):
        assert {("dilattn", S, False), ("dilattn", S, True), ("sdpa-dense", S, False)} <= timed
    assert all(r["ms"] > 0 and r["tflops"] > 0 for r in rows if r.get("ms"))


def test_quick_local_study_times_every_impl(tmp_path: Path) -> None:
    out = tmp_path / "local.json"
    suite = _load("suite")
    assert suite.main(["--quick", "--studies", "local", "--repeats", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    impls = {"dilattn-local-sliding", "dilattn-local-bucketed", "flex-create_block_mask"}
    if importlib.util.find_spec("local_attention") is not None:
        impls.add("local-attention")
    for S in (64, 256):
        assert impls == {r["impl"] for r in rows if r["seq_len"] == S and r["ms"] > 0}
    assert all(r["note"].startswith("mask ") for r in rows if r["impl"] != "local-attention")


def test_quick_mixed_lm_study_times_every_model(tmp_path: Path) -> None:
    out = tmp_path / "mixed.json"
    suite = _load("suite")
    argv = ["--quick", "--studies", "mixed_lm", "--repeats", "1", "--json", str(out)]
    assert suite.main(argv) == 0
    rows = json.loads(out.read_text())["rows"]
    impls = {"dilattn-local+linear", "dilattn-local+dilated"}
    if importlib.util.find_spec("linear_attention_transformer") is not None:
        impls.add("linear-attention-transformer")
    for S in (128, 256):
        timed = [r for r in rows if r["seq_len"] == S and r["tokens_per_s"] > 0]
        assert impls == {r["impl"] for r in timed}
        assert all(r["dim"] == 64 and r["heads"] == 4 and r["local"] == 2 for r in timed)


def test_plot_draws_the_json(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    data = {
        "header": {"device": "CPU", "dtype": "float32", "torch": "x"},
        "rows": [
            {
                "study": "paper",
                "impl": "dilattn",
                "seq_len": s,
                "backward": b,
                "ms": s / 100,
                "peak_gib": 1.0,
            }
            for s in (256, 512)
            for b in (False, True)
        ],
    }
    path = tmp_path / "b.json"
    path.write_text(json.dumps(data))
    assert _load("plot").main([str(path), str(tmp_path / "b.png")]) == 0
    assert (tmp_path / "b.png").read_bytes()[:4] == b"\x89PNG"
