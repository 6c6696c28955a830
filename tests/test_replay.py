"""The replay policy of dilattn.engines.replay (CPU: a stand-in graph that reruns the captured
function on its buffers; the CUDA graphs themselves are checked by the GPU tests)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch
from torch import Tensor

from dilattn.engines import replay


class _Graph:
    """Replays ``fn`` on the captured buffers, writing into the captured outputs."""

    def __init__(self, fn: Callable[..., tuple[Tensor, ...]], inputs: tuple[Tensor, ...]):
        self.fn, self.inputs = fn, inputs
        self.outputs = fn(*inputs)

    def replay(self) -> None:
        for out, new in zip(self.outputs, self.fn(*self.inputs), strict=True):
            out.copy_(new)


@pytest.fixture
def captures(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[int, ...]]]:
    """The shapes of every capture."""
    shapes: list[tuple[int, ...]] = []

    def capture(fn: Callable[..., tuple[Tensor, ...]], tensors: tuple[Tensor, ...]):
        shapes.append(tuple(tensors[0].shape))
        graph = _Graph(fn, tuple(x.clone() for x in tensors))
        return replay._Graph(graph.replay, graph.inputs, graph.outputs)

    monkeypatch.setattr(replay, "_capture", capture)
    monkeypatch.setattr(replay, "CACHED", 2)
    replay.clear()
    yield shapes
    replay.clear()


def _double(x: Tensor) -> tuple[Tensor]:
    return (x * 2,)


def test_second_call_captures_and_replays_read_new_inputs(captures) -> None:
    for step in range(4):
        x = torch.randn(3, 5)
        (out,) = replay.replay("double", _double, (x,))
        torch.testing.assert_close(out, x * 2, atol=0, rtol=0)
        assert captures == ([] if step == 0 else [(3, 5)])
        assert out.data_ptr() not in (g.outputs[0].data_ptr() for g in replay._GRAPHS.values())


def test_new_layouts_once_each_never_capture(captures) -> None:
    for n in range(1, 20):
        (out,) = replay.replay("double", _double, (torch.ones(n),))
        assert torch.equal(out, torch.full((n,), 2.0))
    assert captures == []


def test_an_evicted_layout_runs_in_line_for_good(captures) -> None:
    lengths = [1, 2, 3]  # one more than CACHED
    for _ in range(4):
        for n in lengths:
            (out,) = replay.replay("double", _double, (torch.ones(n),))
            assert torch.equal(out, torch.full((n,), 2.0))
    # each captured at its second call; 3's capture evicts 1, which runs in line from then on
    assert captures == [(1,), (2,), (3,)]
    assert [key[1][0][0] for key in replay._GRAPHS] == [(2,), (3,)]
