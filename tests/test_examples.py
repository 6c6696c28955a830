"""Every script in ``examples/`` runs (its ``main``, with tiny settings where its CPU defaults
take more than a few seconds) and its own checks pass; one whose extra is missing skips."""

from __future__ import annotations

import importlib.util
import runpy
from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).parents[1] / "examples").glob("*.py"))
NEEDS = {"huggingface_llama.py": "transformers"}
TINY = {"custom_block.py": {"steps": 3}}


def test_examples_are_found() -> None:
    assert {"swap_multihead_attention.py", "custom_block.py", "huggingface_llama.py"} <= {
        path.name for path in EXAMPLES
    }


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda path: path.stem)
def test_example_runs(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    needed = NEEDS.get(path.name)
    if needed is not None and importlib.util.find_spec(needed) is None:
        pytest.skip(f"{path.name} needs {needed}")
    example = runpy.run_path(str(path))  # a script without main() runs here
    if "main" in example:
        example["main"](**TINY.get(path.name, {}))
    assert capsys.readouterr().out.strip()
