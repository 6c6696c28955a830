"""A hand-written pre-norm block with dilated attention on ``(B, H, S, D)`` and rotary.

``dilattn.dilated_attention`` takes the place of ``F.scaled_dot_product_attention``: same
layout, ``is_causal``, ``scale``, ``enable_gqa``. A tiny causal LM of two such blocks learns
to continue a repeating pattern for a few steps on the CPU; then one call is checked against
the dense reference, and ``segment_lengths=[S], dilation_rates=[1]`` against SDPA.

    python examples/custom_block.py
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

import dilattn
from dilattn.reference import dilated_attention_reference


class DilatedBlock(nn.Module):
    """Pre-norm block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``; GQA and rotary."""

    def __init__(
        self,
        dim: int,
        heads: int,
        kv_heads: int,
        segment_lengths: Sequence[int],
        dilation_rates: Sequence[int],
    ) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.segment_lengths, self.dilation_rates = segment_lengths, dilation_rates
        self.qkv = nn.Linear(dim, (heads + 2 * kv_heads) * self.head_dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)
        self.norm1, self.norm2 = nn.RMSNorm(dim), nn.RMSNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def heads_of(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(B, S, E)`` -> rotated q ``(B, H, S, D)``, k and v ``(B, H_kv, S, D)``."""
        sizes = [n * self.head_dim for n in (self.heads, self.kv_heads, self.kv_heads)]
        q, k, v = self.qkv(x).split(sizes, dim=-1)
        q = rearrange(q, "b s (h d) -> b h s d", h=self.heads)
        k, v = (rearrange(t, "b s (h d) -> b h s d", h=self.kv_heads) for t in (k, v))
        positions = torch.arange(x.shape[1], device=x.device)
        return dilattn.rotary(q, positions), dilattn.rotary(k, positions), v

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self.heads_of(self.norm1(x))
        out = dilattn.dilated_attention(
            q, k, v, self.segment_lengths, self.dilation_rates, is_causal=True, enable_gqa=True
        )  # (B, H, S, D)
        x = x + self.out(rearrange(out, "b h s d -> b s (h d)"))
        return x + self.mlp(self.norm2(x))


class TinyLM(nn.Module):
    def __init__(self, vocab: int, dim: int, blocks: list[DilatedBlock]) -> None:
        super().__init__()
        self.embed, self.blocks = nn.Embedding(vocab, dim), nn.ModuleList(blocks)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, ids: Tensor) -> Tensor:
        x = self.embed(ids)  # (B, S, E)
        for block in self.blocks:
            x = block(x)
        return self.head(x)  # (B, S, vocab)


def main(seq_len: int = 64, steps: int = 20, vocab: int = 16, dim: int = 64) -> None:
    torch.manual_seed(0)
    segments, rates = [8, 16, 64], [1, 2, 4]
    blocks = [DilatedBlock(dim, 4, 2, segments, rates) for _ in range(2)]
    model = TinyLM(vocab, dim, blocks)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    period = torch.randint(0, vocab, (4, 12))  # each row repeats its own 12 tokens
    data = period.repeat(1, seq_len // 12 + 2)[:, : seq_len + 1]
    for step in range(steps):
        logits = model(data[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), data[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step in (0, steps - 1):
            print(f"step {step:3d}  loss {loss.item():.3f}")

    with torch.no_grad():
        q, k, v = blocks[0].heads_of(model.embed(data[:1, :-1]))
        out = dilattn.dilated_attention(q, k, v, segments, rates, is_causal=True, enable_gqa=True)
        args = (q.double(), k.double(), v.double(), segments, rates)
        ref = dilated_attention_reference(*args, is_causal=True, enable_gqa=True)
        torch.testing.assert_close(out, ref.float())
        dense = dilattn.dilated_attention(q, k, v, [seq_len], [1], is_causal=True, enable_gqa=True)
        sdpa = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        torch.testing.assert_close(dense, sdpa)
    print(f"attention {tuple(out.shape)}: equals the reference; one dense branch equals SDPA")


if __name__ == "__main__":
    main()
