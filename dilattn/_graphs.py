"""Small strided-path calls replayed as CUDA graphs.

Below about half a million rows (``B * H * S``) the GPU work of a dilated attention call is
shorter than the host time of its 12-25 cuDNN calls and merge launches; a CUDA graph of the
whole call costs one launch. Each graph holds its own copies of the inputs (copied in before
every replay) and of the outputs (cloned out after), so graphs never alias user tensors.
A bounded LRU cache keeps a few graphs; ``MAX_ROWS = 0`` turns graphs off.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable

import torch
from torch import Tensor

MAX_ROWS = 1 << 19  # graph calls of at most this many rows (B * H * S); 0: never
MAX_BYTES = 1 << 30  # inputs and outputs held by all cached graphs together, at most

_Entry = tuple[torch.cuda.CUDAGraph, list[Tensor], tuple[Tensor, ...], int]
_cache: OrderedDict[Hashable, _Entry] = OrderedDict()


def applies(query: Tensor) -> bool:
    """Whether to graph a call on ``query`` ``(B, H, S, D)`` here and now."""
    return (
        query.is_cuda
        and query.shape[0] * query.shape[1] * query.shape[2] <= MAX_ROWS
        and not torch.cuda.is_current_stream_capturing()  # inside someone else's graph
    )


def _key(name: Hashable, inputs: tuple[Tensor, ...]) -> Hashable:
    layout = tuple((tuple(x.shape), x.stride(), x.dtype, x.device) for x in inputs)
    return (name, layout)


def run(
    name: Hashable, fn: Callable[..., tuple[Tensor, ...]], *inputs: Tensor
) -> tuple[Tensor, ...]:
    """``fn(*inputs)``, from a cached CUDA graph keyed on ``name`` and the inputs' layouts."""
    key = _key(name, inputs)
    entry = _cache.get(key)
    if entry is None:
        static = [
            torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device) for x in inputs
        ]
        for s, x in zip(static, inputs, strict=True):
            s.copy_(x)  # the graph reads its own copies
        side = torch.cuda.Stream()  # type: ignore[no-untyped-call]
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn(*static)  # warm-up: Triton compiles, cuDNN builds its plans
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = fn(*static)
        size = sum(x.numel() * x.element_size() for x in (*static, *outputs))
        entry = (graph, static, outputs, size)
        _cache[key] = entry
        while len(_cache) > 1 and sum(e[3] for e in _cache.values()) > MAX_BYTES:
            _cache.popitem(last=False)
    else:
        _cache.move_to_end(key)
        for s, x in zip(entry[1], inputs, strict=True):
            s.copy_(x)
    graph, _, outputs, _ = entry
    graph.replay()
    return tuple(x.clone() for x in outputs)
