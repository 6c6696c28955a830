"""DilatedAttention, the module over the functional path."""

from __future__ import annotations

import torch

from dilattn import DilatedAttention, dilated_attention
from dilattn.reference import dilated_attention_reference


def test_module_equals_functional_and_reference() -> None:
    q, k, v = (torch.randn(2, 4, 37, 8, dtype=torch.float64) for _ in range(3))
    attn = DilatedAttention([8, 16], [1, 3], is_causal=True)
    out = attn(q, k, v)
    torch.testing.assert_close(out, dilated_attention(q, k, v, [8, 16], [1, 3], is_causal=True))
    torch.testing.assert_close(
        out, dilated_attention_reference(q, k, v, [8, 16], [1, 3], is_causal=True)
    )
    assert "segment_lengths=[8, 16]" in repr(attn)


def test_module_compiles_fullgraph_without_graph_breaks() -> None:
    attn = DilatedAttention([8, 16], [1, 2], is_causal=True, enable_gqa=True)
    q = torch.randn(1, 4, 29, 8, requires_grad=True)
    k, v = (torch.randn(1, 2, 29, 8) for _ in range(2))
    compiled = torch.compile(attn, fullgraph=True, backend="eager")  # dynamo only: fast on CPU
    out = compiled(q, k, v)
    torch.testing.assert_close(out, attn(q, k, v))
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()
