"""Dilated attention in your own flex_attention call, checked against the reference."""

import torch
from torch.nn.attention.flex_attention import flex_attention

import dilattn
from dilattn.reference import dilated_attention_reference

B, H, S, D = 1, 4, 300, 16
q, k, v = (torch.randn(B, H, S, D) for _ in range(3))
m = dilattn.flex_mask([64, 128], [1, 2], q_len=S, num_heads=H, is_causal=True)
out = flex_attention(q, k, v, block_mask=m.block_mask, score_mod=m.score_mod)
ref = dilated_attention_reference(q, k, v, [64, 128], [1, 2], is_causal=True)
print(out.shape, "max error vs reference:", (out - ref).abs().max().item())
