"""CUDA-graph replay of a host-bound sequence of kernels, for eager and compiled callers.

A short call of the strided engine is a dozen attention kernels and their merges, each
costing more host time to launch than GPU time to run: eager code (and ``torch.compile`` in
its default mode, where the engine is one opaque op) waits on the CPU. :func:`replay`
captures such a sequence at the second call with an input layout, on copies of its inputs,
then replays it: the inputs are copied in, one graph launch runs every kernel, and the
outputs are copied out (replays reuse the graph's buffers). It costs one copy of the inputs
and outputs per layout in GPU memory, and three to six memory-bound copies per call.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["CACHED", "clear", "replay"]

CACHED = 4
"""Captured graphs kept (least recently used dropped first); each holds its own buffers."""


class _Graph(NamedTuple):
    launch: Callable[[], None]  # replays the graph on its device's current stream
    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]


_GRAPHS: OrderedDict[Hashable, _Graph] = OrderedDict()
_SEEN: OrderedDict[Hashable, bool] = OrderedDict()  # key -> evicted once (never recaptured)
SEEN = 256
"""Keys remembered (a key is captured at its second call, so a stream of new lengths, each
seen once, never pays for a capture)."""


def clear() -> None:
    """Drop every captured graph and its buffers (their memory returns to the allocator)."""
    _GRAPHS.clear()
    _SEEN.clear()


@torch.inference_mode(False)  # buffers that later calls, in any mode, may write into
def _capture(fn: Callable[..., tuple[Tensor, ...]], tensors: tuple[Tensor, ...]) -> _Graph:
    device = tensors[0].device
    with torch.cuda.device(device):  # streams and the capture on the tensors' device
        inputs = tuple(torch.empty_like(x).copy_(x) for x in tensors)  # dense, same dim order
        side = torch.cuda.Stream()  # type: ignore[no-untyped-call]
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn(*inputs)  # warm-up outside the capture: cuDNN plans, Triton compiles, allocations
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            outputs = fn(*inputs)

    def launch() -> None:
        with torch.cuda.device(device):
            graph.replay()

    return _Graph(launch, inputs, outputs)


def replay(
    key: Hashable, fn: Callable[..., tuple[Tensor, ...]], tensors: tuple[Tensor, ...]
) -> tuple[Tensor, ...]:
    """``fn(*tensors)`` (CUDA tensors in, a tuple of new tensors out), run by replaying a
    graph captured at the second call with this ``key`` (the first runs in line, and so does
    every call of a key whose graph was evicted: cycling through more layouts than
    :data:`CACHED` never captures again and again). ``key`` must determine every host
    decision ``fn`` takes; the tensors' shapes, strides, dtypes and device are added to it.
    Run it on one stream: replays share their buffers."""
    layout = tuple((x.shape, x.stride(), x.dtype) for x in tensors)
    full_key = (key, layout, tensors[0].device)
    entry = _GRAPHS.get(full_key)
    if entry is None:
        evicted = _SEEN.get(full_key)
        _SEEN[full_key] = bool(evicted)
        _SEEN.move_to_end(full_key)
        while len(_SEEN) > SEEN:
            _SEEN.popitem(last=False)
        if evicted is None or evicted:  # first call, or a graph that lost its place: in line
            return fn(*tensors)
        entry = _capture(fn, tensors)
        _GRAPHS[full_key] = entry
        while len(_GRAPHS) > CACHED:
            _SEEN[_GRAPHS.popitem(last=False)[0]] = True
    else:
        _GRAPHS.move_to_end(full_key)
        for static, x in zip(entry.inputs, tensors, strict=True):
            static.copy_(x)
    entry.launch()
    return tuple(x.clone() for x in entry.outputs)
