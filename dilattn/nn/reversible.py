"""Reversible residual layers (RevNet, Gomez et al. 2017; Reformer's transformer form).

The residual stream is doubled, ``(x1, x2)``, and each layer couples two branches::

    y1 = x1 + f(x2)        x2 = y2 - g(y1)
    y2 = x2 + g(y1)        x1 = y1 - f(x2)

The right column recovers a layer's inputs from its outputs, so backward recomputes every
layer's activations from the last outputs alone: training memory does not grow with depth
(one layer's activations at a time). The random state of each branch (dropout) is recorded
in forward and replayed in backward, and so is autocast.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

Branch = Callable[[Tensor], Tensor]


class Coupling(NamedTuple):
    """One reversible layer: its branches ``f`` and ``g`` and the parameters they use."""

    f: Branch
    g: Branch
    params: Sequence[nn.Parameter]


def couple(x1: Tensor, x2: Tensor, layers: Sequence[Coupling]) -> tuple[Tensor, Tensor]:
    """The layers as ordinary code (autograd stores every activation): ``(y1, y2)``."""
    for f, g, _ in layers:
        x1 = x1 + f(x2)
        x2 = x2 + g(x1)
    return x1, x2


def couple_reversibly(x1: Tensor, x2: Tensor, layers: Sequence[Coupling]) -> tuple[Tensor, Tensor]:
    """:func:`couple`, with the activations recomputed in backward from the outputs."""
    params = [p for layer in layers for p in layer.params]
    y1, y2 = _Reversible.apply(x1, x2, layers, *params)  # type: ignore[no-untyped-call]
    return y1, y2


class _RandomState:
    """The CPU random state, and the device's, at construction; :meth:`replay` restores them
    inside a fork (the global state is left as it was)."""

    def __init__(self, device: torch.device) -> None:
        self.cpu = torch.get_rng_state()
        self.device = device if device.type == "cuda" else None
        self.cuda = torch.cuda.get_rng_state(device) if self.device is not None else None

    @contextlib.contextmanager
    def replay(self) -> Iterator[None]:
        devices = [] if self.device is None else [self.device]
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self.cpu)
            if self.device is not None and self.cuda is not None:
                torch.cuda.set_rng_state(self.cuda, self.device)
            yield


def _sum_grads(a: tuple[Tensor | None, ...], b: tuple[Tensor | None, ...]) -> list[Tensor | None]:
    return [y if x is None else x if y is None else x + y for x, y in zip(a, b, strict=True)]


class _Reversible(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x1: Tensor, x2: Tensor, layers: Sequence[Coupling], *params: nn.Parameter
    ) -> tuple[Tensor, Tensor]:
        device = x1.device.type
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        ctx.layers, ctx.states = layers, []
        for f, g, _ in layers:  # autograd records nothing in here
            f_state = _RandomState(x1.device)
            x1 = x1 + f(x2)
            g_state = _RandomState(x1.device)
            x2 = x2 + g(x1)
            ctx.states.append((f_state, g_state))
        ctx.save_for_backward(x1, x2)
        return x1, x2

    @staticmethod
    def backward(ctx: Any, dy1: Tensor, dy2: Tensor) -> tuple[Tensor | None, ...]:
        y1, y2 = (y.detach() for y in ctx.saved_tensors)  # cut from this node's graph
        device, enabled, dtype = ctx.autocast
        grads: list[list[Tensor | None]] = []
        for (f, g, params), (f_state, g_state) in zip(
            reversed(ctx.layers), reversed(ctx.states), strict=True
        ):
            with torch.enable_grad(), torch.autocast(device, dtype, enabled=enabled):
                y1 = y1.requires_grad_()
                with g_state.replay():
                    gy1 = g(y1)
                dy1_g, *g_grads = torch.autograd.grad(gy1, [y1, *params], dy2, allow_unused=True)
                x2 = (y2 - gy1.detach()).requires_grad_()  # the layer's input
                dx1 = dy1 + dy1_g  # everything y1 feeds: the output and g
                with f_state.replay():
                    fx2 = f(x2)
                dx2_f, *f_grads = torch.autograd.grad(fx2, [x2, *params], dx1, allow_unused=True)
            grads.append(_sum_grads(tuple(f_grads), tuple(g_grads)))
            y1, y2 = (y1 - fx2).detach(), x2.detach()
            dy1, dy2 = dx1, dy2 + dx2_f
        param_grads = [g for layer_grads in reversed(grads) for g in layer_grads]
        return (dy1, dy2, None, *param_grads)
