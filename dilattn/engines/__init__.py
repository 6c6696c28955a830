"""The one dispatcher: which engine runs a call, and why each other engine was refused.

Engines, fastest first (``auto`` takes the first that accepts the call):

* ``strided``: cuDNN attention on strided views of q/k/v and an in-place Triton merge
  (:mod:`dilattn.engines.strided`); fp16/bf16 on CUDA, ``S_q == S_kv``, no padding, documents,
  score mods, ``q_offset``, dropout or local window;
* ``flex_strided``: FlexAttention on the same strided views, with block masks that skip or
  fill whole blocks of documents and padding, mods on absolute positions
  (:mod:`dilattn.engines.flex_strided`); ``S_q == S_kv`` and ``q_offset == 0``, not inside
  ``torch.compile``;
* ``flex_gather``: FlexAttention on each branch's gathered rows (:mod:`dilattn.engines.gather`);
  any lengths and ``q_offset``, and traceable by ``torch.compile``;
* ``math``: matmul and softmax per gathered segment; any device, dropout, float64.

``backend="flex"`` allows the two flex engines, ``"strided"`` and ``"math"`` their own.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from torch import Tensor

from dilattn.config import HeadOffsets
from dilattn.engines import flex_strided, strided

__all__ = ["BackendName", "Dispatch", "Engine", "dispatch"]

BackendName = Literal["auto", "strided", "flex", "math"]
Engine = Literal["strided", "flex_strided", "flex_gather", "math"]
ENGINES: tuple[Engine, ...] = ("strided", "flex_strided", "flex_gather", "math")
_ALLOWED: dict[str, tuple[Engine, ...]] = {
    "auto": ENGINES,
    "strided": ("strided",),
    "flex": ("flex_strided", "flex_gather"),
    "math": ("math",),
}


class Dispatch(NamedTuple):
    """The engine chosen for a call, and each refused engine with its reason."""

    engine: Engine
    refused: tuple[tuple[Engine, str], ...]

    def __str__(self) -> str:
        lines = [f"engine: {self.engine}"]
        lines += [f"  not {name}: {why}" for name, why in self.refused]
        return "\n".join(lines)


def _why_not(
    engine: Engine,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    *,
    head_offsets: HeadOffsets,
    extras: tuple[str, ...],
    dropout_p: float,
    q_offset: int,
    table_mod: bool,
    auto: bool,
) -> str | None:
    """Why ``engine`` cannot run this call, or None."""
    if engine == "math":
        return None
    if auto and not query.is_cuda:
        return "off CUDA, auto takes math (eager FlexAttention materialises every score)"
    if engine == "strided":
        why = strided.supports(query, key, value)
        if why is None and extras:
            why = f"it does not take {', '.join(extras)}"
        return why
    if head_offsets == "split":
        return "head_offsets='split' runs on the strided backend only"
    if not query.is_cuda and torch.compiler.is_compiling():
        return (
            f"compiled FlexAttention on CPU is not supported (query on {query.device}); use "
            "backend='math' (the default on CPU) under torch.compile"
        )
    if dropout_p > 0:
        return "FlexAttention has no attention dropout"
    grad = torch.is_grad_enabled() and any(x.requires_grad for x in (query, key, value))
    if not query.is_cuda and grad:
        return (
            "FlexAttention is forward-only off CUDA (no CPU backward); use backend='math' "
            "(the default there) to train"
        )
    if query.is_cuda and query.shape[-1] < 16:
        return f"FlexAttention on CUDA needs head dims of at least 16, got {query.shape[-1]}"
    if engine == "flex_gather":
        return None
    if torch.compiler.is_compiling():
        return "inside torch.compile (it keeps per-call autograd graphs, which dynamo cannot trace)"
    if query.dtype == torch.float64:
        return "it takes float16, bfloat16 and float32"
    if table_mod:
        return (
            "the score_mod captures a tensor (a table, such as T5's): torch 2.11's kernel "
            "for it on strided views needs more shared memory than a Hopper SM has"
        )
    return flex_strided.supports(query, key, value, q_offset)


def dispatch(
    backend: BackendName,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    *,
    head_offsets: HeadOffsets = "cyclic",
    extras: tuple[str, ...] = (),
    dropout_p: float = 0.0,
    q_offset: int = 0,
    table_mod: bool = False,
) -> Dispatch:
    """The first engine allowed by ``backend`` that can run the call; ``extras`` names the
    options in use that only some engines take (padding, documents, score_mod, ...);
    ``table_mod``: the score_mod captures a tensor.
    Raises ``ValueError`` with every engine's reason when none can."""
    if backend not in _ALLOWED:
        raise ValueError(f"backend must be 'auto', 'strided', 'flex' or 'math', got {backend!r}")
    refused: list[tuple[Engine, str]] = []
    for engine in ENGINES:
        if engine not in _ALLOWED[backend]:
            continue
        why = _why_not(
            engine,
            query,
            key,
            value,
            head_offsets=head_offsets,
            extras=extras,
            dropout_p=dropout_p,
            q_offset=q_offset,
            table_mod=table_mod,
            auto=backend == "auto",
        )
        if why is None and engine == "math" and head_offsets == "split":
            why = "head_offsets='split' runs on the strided backend only"
        if why is None:
            return Dispatch(engine, tuple(refused))
        refused.append((engine, why))
    reasons = "; ".join(f"{name}: {why}" for name, why in refused)
    raise ValueError(f"backend={backend!r} cannot run this call ({reasons})")
