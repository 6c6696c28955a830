"""Validation of attention inputs, shared by every path."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


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
    """Check ``(B, H, S, D)`` query/key/value the way SDPA reads them."""
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
    if Dk != D:
        raise ValueError(f"query and key head dims differ: {D} and {Dk}")
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


def check_q_offset(q_offset: int) -> int:
    """``q_offset``: a non-negative integer (the absolute position of query row 0)."""
    if isinstance(q_offset, bool) or not isinstance(q_offset, int) or q_offset < 0:
        raise ValueError(f"q_offset must be a non-negative integer, got {q_offset!r}")
    return q_offset


def check_score_mod(score_mod: object) -> None:
    """``score_mod``: ``None`` or a callable ``(score, b, h, q_idx, kv_idx) -> score``."""
    if score_mod is not None and not callable(score_mod):
        raise TypeError(
            "score_mod must be None or a callable (score, b, h, q_idx, kv_idx) -> score, got "
            f"{type(score_mod).__name__}"
        )


def positive_int(name: str, value: object) -> int:
    """``value``, an ``int > 0`` (not a bool), else ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def non_negative_int(name: str, value: object) -> int:
    """``value``, an ``int >= 0`` (not a bool), else ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return value


def number_in(
    name: str, value: object, low: float, high: float, *, open_low: bool = False
) -> float:
    """``value`` as a float in ``[low, high]`` (``(low, high]`` when ``open_low``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {value!r}")
    if not (low < value if open_low else low <= value) or not value <= high:
        raise ValueError(f"{name} must be in {'(' if open_low else '['}{low}, {high}], got {value}")
    return float(value)
