"""Validation of attention inputs, shared by every path."""

from __future__ import annotations

import inspect
import operator
from collections.abc import Iterable
from typing import Any, NamedTuple

import torch
from torch import Tensor

MAX_INT = 2**62
"""The largest integer a size, length or position may be: indices are int64, and sums and
products of a few of them must not overflow it."""


class Shapes(NamedTuple):
    batch: int
    q_heads: int
    kv_heads: int
    q_len: int
    kv_len: int
    head_dim: int
    value_dim: int


def check_attention_inputs(
    query: Tensor, key: Tensor, value: Tensor, *, enable_gqa: bool
) -> Shapes:
    """Check ``(B, H, S, D)`` query/key/value the way SDPA reads them.

    Raises ``TypeError`` for a non-tensor or non-floating-point input or mixed dtypes, and
    ``ValueError`` for a wrong rank, mismatched shapes or devices, and for an empty batch
    (``B == 0``), no heads (``H == 0``), a head dim of 0 (``D == 0``) or a length of 0.
    """
    for name, x in (("query", query), ("key", key), ("value", value)):
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"{name} must have shape (B, H, S, D), got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if not (query.dtype == key.dtype == value.dtype):
        raise TypeError(
            "query, key and value must share a dtype, got "
            f"{query.dtype}, {key.dtype}, {value.dtype}"
        )
    if not (query.device == key.device == value.device):
        raise ValueError(
            f"query, key and value must be on one device, got {query.device}, {key.device}, "
            f"{value.device}"
        )
    B, Hq, Sq, D = query.shape
    Bk, Hk, Sk, Dk = key.shape
    Bv, Hv, Sv, Dv = value.shape
    if not (B == Bk == Bv):
        raise ValueError(f"batch sizes differ: query {B}, key {Bk}, value {Bv}")
    if B == 0:
        raise ValueError(f"batch size must be positive, got query of shape {tuple(query.shape)}")
    if Dk != D:
        raise ValueError(f"query and key head dims differ: {D} and {Dk}")
    if D == 0:
        raise ValueError(
            f"head dim must be positive, got query of shape {tuple(query.shape)} and key of "
            f"shape {tuple(key.shape)}"
        )
    if Hq == 0 or Hk == 0:
        raise ValueError(f"head counts must be positive, got query {Hq} and key/value {Hk}")
    if Hk != Hv or Sk != Sv:
        raise ValueError(
            f"key and value must agree in heads and length, got key {tuple(key.shape)} and "
            f"value {tuple(value.shape)}"
        )
    if Sq == 0 or Sk == 0:
        raise ValueError(f"sequence lengths must be positive, got query {Sq} and key {Sk}")
    if Hq != Hk:
        if not enable_gqa:
            raise ValueError(
                f"query has {Hq} heads and key/value {Hk}: pass enable_gqa=True for grouped-query "
                "attention"
            )
        if Hq % Hk != 0:
            raise ValueError(
                f"with enable_gqa, query heads ({Hq}) must be a multiple of key/value heads ({Hk})"
            )
    return Shapes(B, Hq, Hk, Sq, Sk, D, Dv)


def default_scale(scale: float | None, head_dim: int) -> float:
    """``scale`` or ``1 / sqrt(head_dim)``, as SDPA does."""
    if scale is None:
        return float(head_dim**-0.5)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {scale!r}")
    return float(scale)


def as_device(device: torch.device | str | None) -> torch.device:
    return torch.device("cpu") if device is None else torch.device(device)


def check_bool(name: str, value: object) -> bool:
    """``value``, a ``bool``, else ``TypeError`` naming ``name`` (a string such as ``'False'``
    is truthy: taking it as a flag would silently mean ``True``)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")
    return value


def _at_most_max_int(name: str, value: int) -> int:
    if value > MAX_INT:
        raise ValueError(f"{name} must be at most 2**62, got {value}")
    return value


def check_q_offset(q_offset: int) -> int:
    """``q_offset``: a non-negative integer (the absolute position of query row 0), at most
    ``2**62``."""
    if isinstance(q_offset, bool) or not isinstance(q_offset, int) or q_offset < 0:
        raise ValueError(f"q_offset must be a non-negative integer, got {q_offset!r}")
    return _at_most_max_int("q_offset", q_offset)


_SCORE_MOD = "(score, b, h, q_idx, kv_idx) -> score"


def check_score_mod(score_mod: object) -> None:
    """``score_mod``: ``None`` or a callable ``(score, b, h, q_idx, kv_idx) -> score``: it
    must accept 5 positional arguments (checked on its signature, where Python can read one;
    builtins and other callables without one are taken on trust, and so is every callable
    inside ``torch.compile``)."""
    if score_mod is None:
        return
    if not callable(score_mod):
        raise TypeError(
            f"score_mod must be None or a callable {_SCORE_MOD}, got {type(score_mod).__name__}"
        )
    if torch.compiler.is_compiling():  # dynamo cannot trace Signature.bind
        return
    try:
        signature = inspect.signature(score_mod)
    except (TypeError, ValueError):  # builtins, some C extensions: nothing to read
        return
    try:
        signature.bind(*range(5))
    except TypeError:
        name = getattr(score_mod, "__name__", None) or type(score_mod).__name__
        raise TypeError(
            f"score_mod must take 5 positional arguments {_SCORE_MOD}, got {name}{signature}"
        ) from None


def positive_int(name: str, value: object) -> int:
    """``value``, an ``int`` in ``(0, 2**62]`` (not a bool), else ``ValueError`` naming
    ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return _at_most_max_int(name, value)


def non_negative_int(name: str, value: object) -> int:
    """``value``, an ``int`` in ``[0, 2**62]`` (not a bool), else ``ValueError`` naming
    ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return _at_most_max_int(name, value)


def positive_ints(name: str, values: object) -> tuple[int, ...]:
    """``values``, a non-empty sequence (any iterable but a string) of integers in
    ``(0, 2**62]``, as a tuple; else ``ValueError`` naming ``name``."""
    items: tuple[Any, ...] | None = None
    if not isinstance(values, (str, bytes)) and isinstance(values, Iterable):
        try:
            items = tuple(values)
        except TypeError:  # e.g. a 0-d tensor
            items = None
    if items is None:
        raise ValueError(f"{name} must be a sequence of positive integers, got {values!r}")
    if len(items) == 0:
        raise ValueError(f"{name} must not be empty")
    out = []
    for value in items:
        if isinstance(value, bool):
            raise ValueError(f"{name} must hold integers, got {value!r} in {list(items)}")
        try:
            number = operator.index(value)
        except TypeError:
            raise ValueError(f"{name} must hold integers, got {value!r} in {list(items)}") from None
        if number <= 0:
            raise ValueError(f"{name} must be positive, got {number} in {list(items)}")
        if number > MAX_INT:
            raise ValueError(f"{name} must be at most 2**62, got {number} in {list(items)}")
        out.append(number)
    return tuple(out)


def number_in(
    name: str, value: object, low: float, high: float, *, open_low: bool = False
) -> float:
    """``value`` as a float in ``[low, high]`` (``(low, high]`` when ``open_low``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {value!r}")
    if not (low < value if open_low else low <= value) or not value <= high:
        raise ValueError(f"{name} must be in {'(' if open_low else '['}{low}, {high}], got {value}")
    return float(value)
