"""The command line, run in-process on CPU."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from dilattn.cli import main


def test_info(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for item in ("dilattn", "torch", "python", "device", "triton", "math (any device"):
        assert item in out


def test_mask_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["mask", "--segment-lengths", "4", "8", "--dilation-rates", "1", "2", "--seq-len", "16"]
    assert main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    grid = [line for line in lines if len(line) == 32 and set(line) <= {"\u2588", "\u00b7"}]
    assert len(grid) == 16  # one line per query, two characters per key
    assert grid[0] == "\u2588" * 10 + "\u00b7" * 2 + "\u2588" * 2 + "\u00b7" * 18
    assert any("segment lengths [4, 8]" in line for line in lines)


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
        "--repeats",
        "1",
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
        (["frobnicate"], "frobnicate"),
    ],
)
def test_bad_arguments(args: list[str], mentions: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and mentions in err
    assert err.count("\n") == 1  # one line
