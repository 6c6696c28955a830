"""``memory_efficient_attention`` on ``(B, S, H, D)`` served by SDPA (benchmarks only).

xformers has no build for current torch; dilated-attention-pytorch 0.2.0 calls only this
function, with ``attn_bias=None`` or ``LowerTriangularMask()``.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor

AttentionOp = Any


class LowerTriangularMask:
    """Causal attention (top-left aligned, as xformers' mask)."""


def memory_efficient_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_bias: object = None,
    op: object = None,
    **_: object,
) -> Tensor:
    if attn_bias is not None and not isinstance(attn_bias, LowerTriangularMask):
        raise NotImplementedError(f"stand-in: unsupported attn_bias {attn_bias!r}")
    out = F.scaled_dot_product_attention(
        query.transpose(1, 2),
        key.transpose(1, 2),
        value.transpose(1, 2),
        is_causal=isinstance(attn_bias, LowerTriangularMask),
    )
    return out.transpose(1, 2)
