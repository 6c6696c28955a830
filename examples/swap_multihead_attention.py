"""Swap ``nn.MultiheadAttention`` for ``dilattn.MultiheadDilatedAttention`` in a model.

A small pre-norm encoder built on ``nn.MultiheadAttention(batch_first=True)`` gets every
attention replaced by ``MultiheadDilatedAttention.from_torch``, which copies its weights.
With ``segment_lengths=[S], dilation_rates=[1]`` the swapped model computes the same
function; a real dilated configuration then trains as usual.

    python examples/swap_multihead_attention.py
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import Tensor, nn

import dilattn


class Block(nn.Module):
    """Pre-norm encoder block on ``(B, S, E)``, like ``nn.TransformerEncoderLayer``."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: Tensor, padding: Tensor | None = None) -> Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, key_padding_mask=padding, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class Encoder(nn.Module):
    def __init__(self, dim: int = 64, heads: int = 4, depth: int = 2) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))

    def forward(self, x: Tensor, padding: Tensor | None = None) -> Tensor:
        for block in self.blocks:
            x = block(x, padding)
        return x


def swap_attention(
    model: nn.Module, segment_lengths: Sequence[int], dilation_rates: Sequence[int]
) -> nn.Module:
    """Replace every ``nn.MultiheadAttention`` inside ``model`` (in place) and return it."""
    for name, child in model.named_children():
        if isinstance(child, nn.MultiheadAttention):
            dilated = dilattn.MultiheadDilatedAttention.from_torch(
                child, segment_lengths, dilation_rates
            )
            setattr(model, name, dilated)
        else:
            swap_attention(child, segment_lengths, dilation_rates)
    return model


def main(batch: int = 2, seq_len: int = 96, dim: int = 64) -> None:
    torch.manual_seed(0)
    model = Encoder(dim).eval()
    x = torch.randn(batch, seq_len, dim)
    padding = torch.zeros(batch, seq_len, dtype=torch.bool)
    padding[1, seq_len - 20 :] = True  # the last 20 tokens of row 1 are padding

    dense = swap_attention(copy.deepcopy(model), [seq_len], [1])
    torch.testing.assert_close(dense(x, padding), model(x, padding))
    print(f"segment_lengths=[{seq_len}], dilation_rates=[1]: same outputs as nn.MultiheadAttention")

    segments, rates = [16, 32, 96], [1, 2, 4]
    dilated = swap_attention(copy.deepcopy(model), segments, rates).train()
    out = dilated(x, padding)  # (B, S, E)
    out[~padding].square().mean().backward()
    config = dilattn.DilatedConfig(tuple(segments), tuple(rates))
    share = config.flops(seq_len) / dilattn.DilatedConfig((seq_len,), (1,)).flops(seq_len)
    print(f"segments {segments}, rates {rates}: output {tuple(out.shape)}, gradients flow")
    print(f"attention FLOPs: {share:.0%} of dense at S={seq_len} (the share falls as S grows)")


if __name__ == "__main__":
    main()
