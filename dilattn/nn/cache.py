"""``KVCache``: the keys and values of the positions seen so far, for decoding step by step."""

from __future__ import annotations

import torch
from torch import Tensor

from dilattn._checks import positive_int

__all__ = ["KVCache"]


class KVCache:
    """Preallocated keys and values ``(B, H_kv, capacity, D)`` of one attention layer, filled
    in order: positions ``[0, length)`` hold data.

    :class:`dilattn.MultiheadDilatedAttention` stores its keys after their projection, QK-norm
    and rotation (rotations use absolute positions, so cached keys stay valid), and reads
    ``length`` as the position of its first new query (``q_offset``). Make one per layer with
    :meth:`MultiheadDilatedAttention.new_kv_cache`; use it for inference (``torch.no_grad``).
    """

    def __init__(
        self,
        batch_size: int,
        num_kv_heads: int,
        capacity: int,
        head_dim: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        shape = tuple(
            positive_int(name, value)
            for name, value in (
                ("batch_size", batch_size),
                ("num_kv_heads", num_kv_heads),
                ("capacity", capacity),
                ("head_dim", head_dim),
            )
        )
        self.key = torch.zeros(shape, device=device, dtype=dtype)
        self.value = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0

    @property
    def capacity(self) -> int:
        return self.key.shape[2]

    def append(self, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
        """Store ``key``, ``value`` ``(B, H_kv, S_new, D)`` at positions
        ``[length, length + S_new)``; return every stored key and value (views up to the new
        length)."""
        expected = (*self.key.shape[:2], key.shape[2], self.key.shape[3])
        for name, x in (("key", key), ("value", value)):
            if tuple(x.shape) != expected:
                raise ValueError(
                    f"KVCache.append: {name} must have shape (B, H_kv, S_new, D) = {expected}, "
                    f"got {tuple(x.shape)}"
                )
        end = self.length + key.shape[2]
        if end > self.capacity:
            raise ValueError(
                f"KVCache is full: {self.length} positions stored, {key.shape[2]} more do not "
                f"fit in its capacity of {self.capacity}"
            )
        self.key[:, :, self.length : end] = key
        self.value[:, :, self.length : end] = value
        self.length = end
        return self.key[:, :, :end], self.value[:, :, :end]

    def truncate(self, length: int = 0) -> None:
        """Forget the positions from ``length`` on (default: all; the buffers are reused), e.g.
        to undo a step or to start a new sequence."""
        if (
            isinstance(length, bool)
            or not isinstance(length, int)
            or not 0 <= length <= self.length
        ):
            raise ValueError(f"length must be an integer in [0, {self.length}], got {length!r}")
        self.length = length

    def __repr__(self) -> str:
        B, H, capacity, D = self.key.shape
        return (
            f"KVCache(batch_size={B}, num_kv_heads={H}, length={self.length}, "
            f"capacity={capacity}, head_dim={D}, dtype={self.key.dtype})"
        )
