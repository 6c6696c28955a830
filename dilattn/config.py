"""The configuration of dilated attention: branches, their validation and per-head offsets."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import _mask_mod_signature

from dilattn._checks import check_bool, non_negative_int, positive_int, positive_ints

__all__ = ["DilatedConfig", "HeadOffsets", "Window", "make_window", "sliding_window"]

HeadOffsets = Literal["cyclic", "grouped", "split"]
"""How head ``h`` of ``H`` picks its offset in a branch of rate ``r``.

* ``"cyclic"``: ``h % r``, the paper's ``s_h = h mod r`` (default).
* ``"grouped"``: ``h // ceil(H / r)``, contiguous head groups, as Microsoft's torchscale
  LongNet does; use it to load its checkpoints.
* ``"split"``: each head computes ONE branch, with offset ``h % r``: the heads are split
  into as many contiguous groups as there are branches (the first ``H % n`` groups one
  head larger), as ``dilated-attention-pytorch`` does. A row a head's branch skips gets 0.
  Runs on the strided backend.
"""


@dataclass(frozen=True)
class DilatedConfig:
    """An immutable list of branches ``(segment_length w, dilation_rate r)``.

    Branch ``(w, r)`` splits positions into segments ``[j*w, (j+1)*w)``; inside a segment,
    position ``p`` takes part for head ``h`` iff ``(p - j*w) % r == offset(h, r)``.
    ``local_window=n`` adds a local branch for every head: the sliding window
    ``|p - p'| <= n`` (``p' <= p`` too when causal). Validation raises ``ValueError`` naming
    the argument: ``segment_lengths`` and ``dilation_rates`` must be non-empty sequences of
    integers in ``(0, 2**62]`` (any iterable but a string; stored as tuples), ``local_window``
    an integer in ``(0, 2**62]``.

    Example::

        >>> DilatedConfig((2048, 4096), (1, 2)).branches
        ((2048, 1), (4096, 2))
    """

    segment_lengths: tuple[int, ...]
    dilation_rates: tuple[int, ...]
    head_offsets: HeadOffsets = "cyclic"
    local_window: int | None = None

    def __post_init__(self) -> None:
        segments = positive_ints("segment_lengths", self.segment_lengths)
        rates = positive_ints("dilation_rates", self.dilation_rates)
        if len(segments) != len(rates):
            raise ValueError(
                "segment_lengths and dilation_rates must have the same length, got "
                f"{len(segments)} segment lengths {list(segments)} and {len(rates)} "
                f"dilation rates {list(rates)}"
            )
        for w, r in zip(segments, rates, strict=True):
            if r > w:
                raise ValueError(
                    f"each dilation rate must be at most its segment length, got rate {r} "
                    f"for segment length {w}"
                )
        if self.head_offsets not in ("cyclic", "grouped", "split"):
            raise ValueError(
                f"head_offsets must be 'cyclic', 'grouped' or 'split', got {self.head_offsets!r}"
            )
        if self.local_window is not None:
            if self.head_offsets == "split":
                raise ValueError("local_window does not combine with head_offsets='split'")
            positive_int("local_window", self.local_window)
        object.__setattr__(self, "segment_lengths", segments)
        object.__setattr__(self, "dilation_rates", rates)

    @classmethod
    def of(
        cls,
        segment_lengths: object,
        dilation_rates: object,
        head_offsets: HeadOffsets = "cyclic",
        local_window: int | None = None,
    ) -> DilatedConfig:
        """The configuration from any sequences of integers (lists, ranges, tensors); a bad
        one raises ``ValueError`` naming its argument."""
        return cls(
            positive_ints("segment_lengths", segment_lengths),
            positive_ints("dilation_rates", dilation_rates),
            head_offsets,
            local_window,
        )

    @property
    def branches(self) -> tuple[tuple[int, int], ...]:
        """The branches as ``(segment_length, dilation_rate)`` pairs."""
        return tuple(zip(self.segment_lengths, self.dilation_rates, strict=True))

    def offsets(self, num_heads: int) -> tuple[tuple[int, ...], ...]:
        """Per branch, the offset of each of ``num_heads`` query heads (``len == num_heads``);
        -1 where a head does not compute the branch (``"split"``)."""
        if num_heads <= 0:
            raise ValueError(f"num_heads must be positive, got {num_heads}")
        if self.head_offsets == "split":  # -1: the head does not compute the branch
            n = len(self.branches)
            sizes = [num_heads // n + (i < num_heads % n) for i in range(n)]
            owner = [i for i, size in enumerate(sizes) for _ in range(size)]
            return tuple(
                tuple(h % r if owner[h] == i else -1 for h in range(num_heads))
                for i, r in enumerate(self.dilation_rates)
            )
        if self.head_offsets == "cyclic":
            return tuple(tuple(h % r for h in range(num_heads)) for r in self.dilation_rates)
        return tuple(
            tuple(h // math.ceil(num_heads / r) for h in range(num_heads))
            for r in self.dilation_rates
        )

    def flops(
        self,
        seq_len: int,
        *,
        batch_size: int = 1,
        num_heads: int = 1,
        head_dim: int = 64,
        is_causal: bool = False,
    ) -> float:
        """Useful FLOPs of one forward: ``sum_i 4 * B * H_i * S * min(w_i, S) * D / r_i**2``
        (``H_i`` the heads that compute branch ``i``), plus ``4 * B * H * S * min(2n + 1, S) * D``
        for a local window ``n``, halved when causal (docs/maths.md)."""
        heads = [sum(o >= 0 for o in offsets) for offsets in self.offsets(num_heads)]
        total = sum(
            4 * batch_size * h * seq_len * min(w, seq_len) * head_dim / r**2
            for (w, r), h in zip(self.branches, heads, strict=True)
        )
        if self.local_window is not None:
            keys = min(2 * self.local_window + 1, seq_len)
            total += 4 * batch_size * num_heads * seq_len * keys * head_dim
        return total / 2 if is_causal else total


class Window(NamedTuple):
    """Which keys a query sees, by position (see the module docstring)."""

    size: int
    backward: int
    forward: int
    exact: bool
    is_causal: bool

    def keys(self, p: Tensor) -> tuple[Tensor, Tensor]:
        """The visible key positions ``[lo, hi]`` of queries at positions ``p`` (ints >= 0)."""
        if self.exact:
            lo, hi = p - self.backward * self.size, p + self.forward * self.size
        else:
            bucket = torch.div(p, self.size, rounding_mode="floor")
            lo = (bucket - self.backward) * self.size
            hi = (bucket + self.forward + 1) * self.size - 1
        return lo, torch.minimum(hi, p) if self.is_causal else hi

    def queries(self, p: Tensor) -> tuple[Tensor, Tensor]:
        """The positions ``[lo, hi]`` of the queries that see keys at positions ``p``."""
        if self.exact:
            lo, hi = p - self.forward * self.size, p + self.backward * self.size
        else:
            bucket = torch.div(p, self.size, rounding_mode="floor")
            lo = (bucket - self.forward) * self.size
            hi = (bucket + self.backward + 1) * self.size - 1
        return torch.maximum(lo, p) if self.is_causal else lo, hi

    def visible(self, q_pos: Tensor, kv_pos: Tensor) -> Tensor:
        """Whether the query at ``q_pos`` sees the key at ``kv_pos`` (broadcast)."""
        lo, hi = self.keys(q_pos)
        return (kv_pos >= lo) & (kv_pos <= hi)

    def span(self, rows: int, *, aligned: bool = False) -> int:
        """At most how many consecutive key positions ``rows`` consecutive queries see (when
        ``aligned``, queries starting at a position that is a multiple of ``rows``)."""
        if self.exact:
            return rows + (self.backward + self.forward) * self.size
        if aligned and self.size % rows == 0:  # the queries lie in one bucket
            return (1 + self.backward + self.forward) * self.size
        buckets = (rows - 1) // self.size + 2 + self.backward + self.forward
        return buckets * self.size

    @property
    def name(self) -> str:
        kind = "sliding" if self.exact else "bucketed"
        causal = "_causal" if self.is_causal else ""
        return f"local_{kind}{causal}_w{self.size}_b{self.backward}_f{self.forward}"

    def mask_mod(self, q_offset: int = 0) -> _mask_mod_signature:
        """The window as a flex ``mask_mod`` on rows (query row ``q_idx`` at position
        ``q_offset + q_idx``)."""

        def local(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            return self.visible(q_idx + q_offset, kv_idx)

        local.__name__ = self.name
        return local


def sliding_window(n: int, is_causal: bool) -> Window:
    """The local branch of a :class:`~dilattn.DilatedConfig`: ``|p - p'| <= n``."""
    return Window(n, 1, 0 if is_causal else 1, True, is_causal)


def make_window(
    window_size: int,
    *,
    look_backward: int = 1,
    look_forward: int | None = None,
    exact_windowsize: bool = False,
    is_causal: bool = False,
) -> Window:
    """The validated window; ``look_forward`` defaults to 0 when causal, else 1."""
    check_bool("is_causal", is_causal)
    look_forward = (0 if is_causal else 1) if look_forward is None else look_forward
    window = Window(
        positive_int("window_size", window_size),
        non_negative_int("look_backward", look_backward),
        non_negative_int("look_forward", look_forward),
        bool(exact_windowsize),
        is_causal,
    )
    if is_causal and look_forward > 0:
        raise ValueError(f"causal attention cannot look forward: got look_forward={look_forward}")
    return window
