"""The command line, run in-process on CPU."""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import struct
import subprocess
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any, ClassVar

import pytest
import torch
import torch.utils.benchmark
from rich.console import Console

import dilattn
from dilattn.cli import _parser, main
from dilattn.engines import Dispatch

SUITE = Path(__file__).parents[1] / "benchmarks" / "suite.py"


@pytest.fixture(autouse=True)
def _wide(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rich tables as wide as they need: no cell wraps in the captured output."""
    monkeypatch.setenv("COLUMNS", "250")


def test_info(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for item in ("dilattn", "torch", "python", "device", "triton", "runs here"):
        assert item in out


def test_info_lists_the_engines(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for engine in ("strided", "flex_strided", "flex_gather", "math"):
        (row,) = [line for line in lines if line.strip("│ ").startswith(f"{engine} ")]
        assert " yes " in row or " no " in row
    (math,) = [line for line in lines if line.strip("│ ").startswith("math ")]
    assert " yes " in math  # math runs everywhere


def test_mask_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["mask", "--segment-lengths", "4", "8", "--dilation-rates", "1", "2", "--seq-len", "16"]
    assert main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    grid = [line for line in lines if len(line) == 32 and set(line) <= {"\u2588", "\u00b7"}]
    assert len(grid) == 16  # one line per query, two characters per key
    assert grid[0] == "\u2588" * 10 + "\u00b7" * 2 + "\u2588" * 2 + "\u00b7" * 18
    assert any("segment lengths [4, 8]" in line for line in lines)


def test_mask_split_head_offsets(capsys: pytest.CaptureFixture[str]) -> None:
    """split: head 1 of 2 computes only the branch (8, 2), with offset 1 % 2 = 1."""
    args = ["mask", "--segment-lengths", "4", "8", "--dilation-rates", "1", "2", "--seq-len", "16"]
    assert main([*args, "--heads", "2", "--head", "1", "--head-offsets", "split"]) == 0
    out = capsys.readouterr().out
    grid = [
        line for line in out.splitlines() if len(line) == 32 and set(line) <= {"\u2588", "\u00b7"}
    ]
    seen, dots = "\u2588" * 2, "\u00b7" * 2
    assert grid[0] == dots * 16  # position 0 is not on offset 1
    assert grid[1] == (dots + seen) * 4 + dots * 8  # keys 1, 3, 5, 7 of segment [0, 8)
    assert grid[9] == dots * 8 + (dots + seen) * 4
    assert "split offsets" in out and "w=8 r=2" in out
    assert "2 (" not in out.split("branches seeing the key:")[1]  # one branch: at most 1


def test_mask_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "mask.png"
    args = [
        "mask",
        "--segment-lengths",
        "8",
        "16",
        "--dilation-rates",
        "1",
        "4",
        "--seq-len",
        "300",
        "--heads",
        "4",
        "--head",
        "3",
        "--causal",
        "--head-offsets",
        "grouped",
        "--png",
        str(path),
    ]
    assert main(args) == 0
    assert str(path) in capsys.readouterr().out
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    length, tag, width, height, depth, colour = struct.unpack(">I4sIIBB", data[8:26])
    assert (length, tag, width, height, depth, colour) == (13, b"IHDR", 300, 300, 8, 2)
    assert data.endswith(b"IEND\xaeB`\x82")


def test_check_passes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "--device", "cpu", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert "24/24 passed" in out
    assert "FAIL" not in out


def test_bench_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bench.json"
    args = [
        "bench",
        "--seq-lens",
        "64",
        "--segment-lengths",
        "16",
        "32",
        "--dilation-rates",
        "1",
        "2",
        "--heads",
        "2",
        "--head-dim",
        "16",
        "--min-run-time",
        "0.01",
        "--json",
        str(path),
    ]
    assert main(args) == 0
    assert "dilated" in capsys.readouterr().out
    result = json.loads(path.read_text())
    assert result["header"]["config"]["segment_lengths"] == [16, 32]
    assert result["header"]["dtype"] == "float32"
    rows = result["rows"]
    assert [(row["impl"], row["seq_len"]) for row in rows] == [
        ("dilated", 64),
        ("flex_mask", 64),
        ("sdpa", 64),
    ]
    for row in rows:
        assert row["ms"] > 0 and row["tflops"] > 0 and row["peak_gib"] is None


class _FakeTimer:
    """Stands in for ``torch.utils.benchmark.Timer``: 2.5 ms a call, whatever is timed."""

    made: ClassVar[list[dict[str, Any]]] = []
    ranges: ClassVar[list[dict[str, Any]]] = []

    def __init__(self, stmt: str, globals: dict[str, Any], **kwargs: Any) -> None:
        globals["fn"]()  # the timed call runs
        self.made.append({"stmt": stmt, **kwargs})

    def _range(self, **kwargs: Any) -> SimpleNamespace:
        self.ranges.append(kwargs)
        return SimpleNamespace(median=2.5e-3)

    def blocked_autorange(self, **kwargs: Any) -> SimpleNamespace:
        return self._range(**kwargs)

    def adaptive_autorange(self, **kwargs: Any) -> SimpleNamespace:
        return self._range(**kwargs)


def test_bench_times_with_torch_benchmark_timer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(torch.utils.benchmark, "Timer", _FakeTimer)
    monkeypatch.setattr(_FakeTimer, "made", [])
    monkeypatch.setattr(_FakeTimer, "ranges", [])
    path = tmp_path / "bench.json"
    args = ["bench", "--seq-lens", "32", "--segment-lengths", "8", "16", "--dilation-rates"]
    args += ["1", "2", "--heads", "2", "--head-dim", "8", "--min-run-time", "0.05"]
    assert main([*args, "--json", str(path)]) == 0
    assert "2.50" in capsys.readouterr().out
    result = json.loads(path.read_text())
    assert [row["ms"] for row in result["rows"]] == [2.5, 2.5, 2.5]
    assert result["header"]["config"]["min_run_time"] == 0.05
    assert len(_FakeTimer.made) == 3
    assert all(made["num_threads"] == torch.get_num_threads() for made in _FakeTimer.made)
    assert all(kwargs["min_run_time"] == 0.05 for kwargs in _FakeTimer.ranges)


# explain


def _explain(*args: str) -> list[str]:
    return ["explain", "--device", "cpu", "--seq-len", "64", "--segment-lengths", "16", "32",
            "--dilation-rates", "1", "2", *args]  # fmt: skip


def _row(out: str, engine: str) -> str:
    (row,) = [line for line in out.splitlines() if line.strip("│ ").startswith(f"{engine} ")]
    return row


def test_explain_cpu_auto_takes_math(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explain", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "runs" in _row(out, "math")
    for engine in ("strided", "flex_strided", "flex_gather"):
        assert "refused" in _row(out, engine) and "off CUDA" in _row(out, engine)
    assert out.index("math ") < out.index("strided ")  # the chosen engine comes first


@pytest.mark.parametrize(
    ("args", "engine", "refused"),
    [
        (["--backend", "flex", "--q-offset", "8"], "flex_gather", "q_offset == 0"),
        (["--backend", "flex", "--score-mod", "t5"], "flex_gather", "captures a tensor"),
        (["--backend", "flex", "--dtype", "fp64"], "flex_gather", "float16, bfloat16"),
        (["--backend", "strided", "--head-offsets", "split"], "strided", ""),
        (["--backend", "flex", "--documents", "4", "--padding", "0.5"], "flex_strided", ""),
        (["--backend", "math", "--dropout", "0.1", "--grad"], "math", ""),
        (["--heads", "8", "--kv-heads", "2", "--local-window", "4"], "math", "off CUDA"),
    ],
)
def test_explain_engine_and_reasons(
    args: list[str], engine: str, refused: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(_explain(*args)) == 0
    out = capsys.readouterr().out
    assert "runs" in _row(out, engine)
    if refused:
        assert refused in out
        assert any("refused" in line and refused in line for line in out.splitlines())


def test_explain_backend_limits_the_engines(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(_explain("--backend", "math")) == 0
    out = capsys.readouterr().out
    assert "runs" in _row(out, "math")
    for engine in ("strided", "flex_strided", "flex_gather"):
        assert "not tried" in _row(out, engine) and "--backend math" in _row(out, engine)


def test_explain_builds_the_call(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every option reaches ``dilattn.explain`` as the matching argument."""
    calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def explain(*args: Any, **kwargs: Any) -> Dispatch:
        calls.append((args, kwargs))
        return Dispatch("math", (("strided", "a reason"),))

    monkeypatch.setattr(dilattn, "explain", explain)
    args = ["--batch", "2", "--heads", "4", "--kv-heads", "2", "--head-dim", "8", "--causal"]
    args += ["--documents", "4", "--padding", "0.25", "--score-mod", "alibi", "--q-offset", "16"]
    args += ["--local-window", "3", "--grad", "--dtype", "fp64", "--head-offsets", "grouped"]
    assert main(_explain(*args, "--backend", "flex")) == 0
    (((q, k, v, segments, rates), options),) = calls
    assert q.shape == (2, 4, 48, 8) and k.shape == v.shape == (2, 2, 64, 8)
    assert q.dtype == torch.float64 and q.requires_grad and q.device.type == "cpu"
    assert (segments, rates) == ([16, 32], [1, 2])
    assert options["document_ids"].tolist() == [[i // 16 for i in range(64)]] * 2
    assert options["key_padding_mask"].tolist() == [[i >= 48 for i in range(64)]] * 2
    assert options["score_mod"].__name__ == "alibi_4h"
    expected = {"is_causal": True, "enable_gqa": True, "head_offsets": "grouped"}
    expected |= {"backend": "flex", "q_offset": 16, "local_window": 3, "dropout_p": 0.0}
    assert {key: options[key] for key in expected} == expected
    out = capsys.readouterr().out
    assert "runs" in _row(out, "math") and "a reason" in _row(out, "strided")


def test_explain_default_call_has_no_extras(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict[str, Any]] = []

    def explain(*args: Any, **kwargs: Any) -> Dispatch:
        calls.append(kwargs)
        return Dispatch("math", ())

    monkeypatch.setattr(dilattn, "explain", explain)
    assert main(_explain()) == 0
    (options,) = calls
    for extra in ("document_ids", "key_padding_mask", "score_mod"):
        assert extra not in options
    assert options["enable_gqa"] is False and options["local_window"] is None


# output paths, help


@pytest.mark.parametrize("command", ["mask", "bench"])
def test_output_paths_are_checked_before_running(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    option = "--png" if command == "mask" else "--json"
    args = [command, "--segment-lengths", "4", "--dilation-rates", "1"]
    args += ["--seq-len", "16"] if command == "mask" else ["--seq-lens", "16"]
    for target, mentions in (
        (tmp_path / "missing" / "out", "does not exist"),
        (tmp_path, "is a directory"),
        (tmp_path / "file" / "out", "is not a directory"),
    ):
        (tmp_path / "file").touch()
        assert main([*args, option, str(target)]) == 2
        captured = capsys.readouterr()
        assert captured.out == ""  # nothing ran
        assert captured.err.startswith("error: ")
        assert f"argument {option}" in captured.err and mentions in captured.err
    assert not (tmp_path / "missing").exists()


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    (commands,) = [a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(commands.choices)


def test_every_option_has_help() -> None:
    subcommands = _subcommands()
    assert set(subcommands) == {"info", "mask", "check", "bench", "explain"}
    for name, sub in subcommands.items():
        for action in sub._actions:
            assert action.help, f"{name} {action.option_strings} has no help"


@pytest.mark.parametrize(
    ("command", "shown"),
    [
        ("mask", ["--head-offsets {cyclic,grouped,split}", "(default: cyclic)", "(default: 1)"]),
        ("check", ["(default: 0)", "(default: auto)"]),
        ("bench", ["(default: 64)", "(default: auto)", "0.2 on CPU"]),
        ("explain", ["(default: 2048 4096)", "(default: 1 2)", "(default: 8192)"]),
    ],
)
def test_help_shows_defaults(
    command: str, shown: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([command, "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for text in shown:
        assert " ".join(text.split()) in out
    assert "(default: None)" not in out and "(default: False)" not in out


# the first run


_NO_NUMPY = "import sys; sys.modules['numpy'] = None  # as where NumPy is not installed\n"


@pytest.mark.parametrize(
    "entry",
    [
        "import runpy; sys.argv = ['dilattn', 'info']\n"
        "runpy.run_module('dilattn', run_name='__main__', alter_sys=True)",  # python -m dilattn
        "from dilattn.cli import main; sys.exit(main(['info']))",  # the console script
    ],
)
def test_first_run_prints_no_numpy_warning(entry: str) -> None:
    done = subprocess.run(
        [sys.executable, "-c", _NO_NUMPY + entry], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert "dilattn info" in done.stdout
    assert "NumPy" not in done.stderr and "Warning" not in done.stderr


# the benchmark suite


def _suite(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    spec = importlib.util.spec_from_file_location("dilattn_bench_suite", SUITE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "dilattn_bench_suite", module)
    spec.loader.exec_module(module)
    return module


def test_suite_shows_and_writes_missing_memory_as_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On CPU there is no peak memory: the table shows "-", not "nanx", the JSON null."""
    suite = _suite(monkeypatch)
    bench = suite.Bench(torch.device("cpu"), torch.float32, 1, True)
    ratio = bench.peak_ratio(lambda i: None, 1, 1)
    row = {"study": "paper", "impl": "dilattn", "seq_len": 256, "backward": False, "ms": 1.5}
    bench.rows = [row | {"tflops": 2.0, "peak_ratio": ratio, "peak_gib": None}]
    bench.rows.append(row | {"impl": "old", "tflops": float("nan"), "peak_ratio": float("nan")})
    file = io.StringIO()
    suite._table(Console(file=file, width=200), bench.rows, None)
    table = file.getvalue()
    assert "nan" not in table.lower()
    assert [line.split("│")[8].strip() for line in table.splitlines() if "paper" in line] == [
        "-",
        "-",
    ]
    path = tmp_path / "suite.json"
    suite._write_json(path, bench, None, ["--quick"])
    text = path.read_text()
    assert "NaN" not in text

    def strict(name: str) -> None:
        raise AssertionError(f"not JSON: {name}")

    rows = json.loads(text, parse_constant=strict)["rows"]
    assert [(r["peak_ratio"], r["tflops"]) for r in rows] == [(None, 2.0), (None, None)]


@pytest.mark.parametrize(
    ("args", "mentions"),
    [
        (
            [
                "mask",
                "--segment-lengths",
                "4",
                "8",
                "--dilation-rates",
                "1",
                "16",
                "--seq-len",
                "16",
            ],
            "dilation rate",
        ),
        (
            ["mask", "--segment-lengths", "4", "--dilation-rates", "1", "2", "--seq-len", "16"],
            "same length",
        ),
        (
            ["mask", "--segment-lengths", "4", "--dilation-rates", "1", "--seq-len", "0"],
            "--seq-len",
        ),
        (
            ["mask", "--segment-lengths", "4", "--dilation-rates", "1", "--seq-len", "300"],
            "--seq-len",
        ),
        (
            [
                "mask",
                "--segment-lengths",
                "4",
                "--dilation-rates",
                "1",
                "--seq-len",
                "8",
                "--head",
                "1",
            ],
            "--head",
        ),
        (["check", "--device", "tpu"], "--device"),
        (["bench", "--seq-lens", "-5"], "--seq-lens"),
        (["bench", "--min-run-time", "0"], "--min-run-time"),
        (["explain", "--padding", "1.5"], "--padding"),
        (["explain", "--heads", "8", "--kv-heads", "3"], "--kv-heads"),
        (["explain", "--seq-len", "64", "--q-offset", "64"], "--q-offset"),
        (["explain", "--score-mod", "rope"], "--score-mod"),
        (
            ["explain", "--device", "cpu", "--backend", "strided", "--documents", "4"],
            "document_ids",
        ),
        (["explain", "--device", "cpu", "--backend", "flex", "--grad"], "forward-only"),
        (["explain", "--device", "cpu", "--head-offsets", "split"], "split"),
        (["frobnicate"], "frobnicate"),
    ],
)
def test_bad_arguments(args: list[str], mentions: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and mentions in err
    assert err.count("\n") == 1  # one line
