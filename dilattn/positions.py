"""Position information: score mods (ALiBi, T5 buckets) and rotations of q and k (RoPE, xPos).

Score mods have FlexAttention's signature ``score_mod(score, b, h, q_idx, kv_idx) -> score``
and work with every path of dilattn, which calls them with the ABSOLUTE positions of query
and key (never a compact index), so a branch, a decoding step with ``q_offset`` and the dense
reference all see the same bias. Rotations take the absolute positions explicitly, so a
decoding step rotates its new query and key as the full sequence would.

Shapes: ``x`` ``(B, H, S, D)``, ``positions`` ``(S,)`` or ``(B, S)``, ``D`` even.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn.attention.flex_attention import _score_mod_signature

from dilattn._checks import positive_int

__all__ = ["T5RelativeBias", "alibi_score_mod", "alibi_slopes", "rotary", "xpos", "xpos_limit"]


def alibi_slopes(num_heads: int) -> list[float]:
    """ALiBi's head slopes (Press et al., 2022): ``2^(-8 i / H)`` for ``i = 1..H`` when ``H``
    is a power of two; otherwise those of the power of two below, then every other slope of
    the power of two above (the paper's reference code)."""
    below = 2 ** math.floor(math.log2(positive_int("num_heads", num_heads)))
    slopes = [2 ** (-8 * i / below) for i in range(1, below + 1)]
    if below == num_heads:
        return slopes
    return slopes + alibi_slopes(2 * below)[0::2][: num_heads - below]


def alibi_score_mod(num_heads: int) -> _score_mod_signature:
    """ALiBi as a score mod: ``score - slope[h] * |q_idx - kv_idx|`` (``h`` the query head,
    slopes of :func:`alibi_slopes`).

    Causal attention sees only ``kv_idx <= q_idx``, where this is ALiBi's
    ``-slope * (q_idx - kv_idx)``; bidirectional attention gets the symmetric distance. The
    slope is computed from ``h`` (``2^(-8/P * e)`` with ``P`` the power of two at or below
    ``num_heads``, ``e = h + 1`` for ``h < P`` and ``h - P + 1/2`` after), so the mod captures
    no tensor and runs on any device.
    """
    below = 2 ** math.floor(math.log2(positive_int("num_heads", num_heads)))
    step = 8 / below

    def alibi(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        slope = torch.exp2(-step * torch.where(h < below, h + 1.0, h - below + 0.5))
        return score - (slope * (q_idx - kv_idx).abs()).to(score.dtype)

    alibi.__name__ = f"alibi_{num_heads}h"
    return alibi


class T5RelativeBias(nn.Module):
    """T5's learned relative position bias: one scalar per (distance bucket, head).

    The relative position ``kv_idx - q_idx`` falls in a bucket as in T5 (Raffel et al., 2020;
    ``_relative_position_bucket`` of Hugging Face's T5): half the buckets count distances
    exactly, the other half grow logarithmically up to ``max_distance``, beyond which all
    share the last bucket. ``bidirectional`` splits the buckets between keys before and after
    the query; otherwise keys after the query share bucket 0 (use it with causal attention).

    ``bias``: ``(num_buckets, num_heads)`` parameter. ``score_mod`` gives a FlexAttention score
    mod adding ``bias[bucket(kv_idx - q_idx), h]`` (differentiable in ``bias``)::

        t5 = T5RelativeBias(num_heads=8, bidirectional=False)
        out = dilattn.dilated_attention(q, k, v, w, r, is_causal=True, score_mod=t5.score_mod)
    """

    def __init__(
        self,
        num_heads: int,
        *,
        num_buckets: int = 32,
        max_distance: int = 128,
        bidirectional: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        positive_int("num_heads", num_heads)
        positive_int("num_buckets", num_buckets)
        exact = (num_buckets // 2 if bidirectional else num_buckets) // 2
        if exact < 1 or max_distance <= exact:
            raise ValueError(
                f"need at least one exact bucket and max_distance above them: num_buckets="
                f"{num_buckets} (bidirectional={bidirectional}) gives {exact} exact buckets, "
                f"max_distance={max_distance}"
            )
        self.num_heads, self.num_buckets = num_heads, num_buckets
        self.max_distance, self.bidirectional = max_distance, bidirectional
        self.bias = nn.Parameter(torch.empty(num_buckets, num_heads, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.bias, std=0.02)

    def bucket(self, relative: Tensor) -> Tensor:
        """The bucket (int64, same shape) of relative positions ``kv_idx - q_idx``."""
        buckets = self.num_buckets
        if self.bidirectional:
            buckets //= 2
            offset = (relative > 0).to(torch.int64) * buckets
            distance = relative.abs()
        else:
            offset = torch.zeros_like(relative, dtype=torch.int64)
            distance = (-relative).clamp(min=0)
        exact = buckets // 2
        scaled = torch.log(distance.clamp(min=1).float() / exact) / math.log(
            self.max_distance / exact
        )
        large = (exact + (scaled * (buckets - exact)).to(torch.int64)).clamp(max=buckets - 1)
        return offset + torch.where(distance < exact, distance.to(torch.int64), large)

    @property
    def score_mod(self) -> _score_mod_signature:
        """The score mod ``score + bias[bucket(kv_idx - q_idx), h]``."""
        bias = self.bias

        def t5_bias(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            return score + bias[self.bucket(kv_idx - q_idx), h].to(score.dtype)

        direction = "bidirectional" if self.bidirectional else "causal"
        t5_bias.__name__ = f"t5_bias_{self.num_buckets}b_{self.max_distance}d_{direction}"
        return t5_bias

    def extra_repr(self) -> str:
        return (
            f"num_heads={self.num_heads}, num_buckets={self.num_buckets}, "
            f"max_distance={self.max_distance}, bidirectional={self.bidirectional}"
        )


def _angles(x: Tensor, positions: Tensor, base: float) -> Tensor:
    """Rotation angles ``(S, D/2)`` or ``(B, 1, S, D/2)``, float64 (exact at 1M positions)."""
    B, _, S, D = x.shape
    if D % 2:
        raise ValueError(f"rotations need an even head dim, got {D}")
    if tuple(positions.shape) not in ((S,), (B, S)):
        raise ValueError(
            f"positions must have shape ({S},) or ({B}, {S}) for x of shape {tuple(x.shape)}, "
            f"got {tuple(positions.shape)}"
        )
    inv_freq = base ** (-torch.arange(0, D, 2, device=x.device, dtype=torch.float64) / D)
    angles = positions.to(torch.float64)[..., None] * inv_freq
    return angles if positions.dim() == 1 else angles[:, None]


def _rotate(x: Tensor, angles: Tensor, factor: Tensor | None) -> Tensor:
    """``x`` rotated by ``angles`` in the rotate-half layout, times ``factor`` (per pair)."""
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    cos, sin = torch.cos(angles), torch.sin(angles)
    if factor is not None:
        cos, sin = cos * factor, sin * factor
    cos, sin = (torch.cat([c, c], dim=-1).to(work) for c in (cos, sin))  # (..., S, D)
    x1, x2 = x.to(work).chunk(2, dim=-1)
    return (x.to(work) * cos + torch.cat([-x2, x1], dim=-1) * sin).to(x.dtype)


def rotary(x: Tensor, positions: Tensor, *, base: float = 10000.0) -> Tensor:
    """Rotary position embedding (RoPE, Su et al.) of ``x`` ``(B, H, S, D)`` at ``positions``.

    Pair ``(x[i], x[i + D/2])`` (the GPT-NeoX / Llama "rotate half" layout) turns by
    ``positions * base^(-2i / D)``. Apply it to queries and keys at their absolute positions;
    the score then depends only on the distance. Angles are computed in float64, the rotation
    in float32 (float64 for float64 input); returns ``x``'s dtype.
    """
    return _rotate(x, _angles(x, positions, base), None)


def xpos(
    x: Tensor,
    positions: Tensor,
    *,
    key: bool,
    base: float = 10000.0,
    scale_base: float = 512.0,
) -> Tensor:
    """xPos (Sun et al., 2022): :func:`rotary` times ``zeta_i^(+-position / scale_base)``,
    ``zeta_i = (2i / D + 0.4) / 1.4``, ``+`` for queries and ``-`` for keys (``key=True``), so
    the score of query ``p`` and key ``p'`` decays like ``zeta^((p - p') / scale_base)``.

    The scale is not centred (it counts from position 0), so a cached key stays valid while
    decoding. The factors grow like ``3.5^(position / scale_base)``: keep positions below
    :func:`xpos_limit` for the dtype (about 18k tokens in float32/bfloat16 with
    ``scale_base=512``, 2.2k in float16), or use :func:`rotary` for long sequences.
    """
    D = x.shape[-1]
    zeta = (torch.arange(0, D, 2, device=x.device, dtype=torch.float64) / D + 0.4) / 1.4
    power = positions.to(torch.float64)[..., None] / scale_base * (-1 if key else 1)
    factor = zeta**power  # (S, D/2) or (B, S, D/2)
    return _rotate(x, _angles(x, positions, base), factor if power.dim() == 2 else factor[:, None])


def xpos_limit(dtype: torch.dtype, *, scale_base: float = 512.0) -> int:
    """The largest position :func:`xpos` supports in ``dtype``: its largest factor
    ``(1.4 / 0.4)^(position / scale_base)`` stays within the square root of the dtype's range,
    leaving the other half for the values it multiplies."""
    return int(scale_base * math.log(torch.finfo(dtype).max) / 2 / math.log(1.4 / 0.4))
