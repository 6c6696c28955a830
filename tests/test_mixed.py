"""MixedHeadAttention: each head group equals its kind's reference, with the same weights."""

from __future__ import annotations

import pytest
import torch
from einops import rearrange

from dilattn import rotary
from dilattn.nn.mixed import MixedHeadAttention
from dilattn.reference import (
    dilated_attention_reference,
    linear_attention_reference,
    local_attention_reference,
)


def _mixed_reference(
    m: MixedHeadAttention, x: torch.Tensor, heads: tuple[int, int, int], **kwargs: object
) -> torch.Tensor:
    """The projections by hand; the first ``heads[0]`` heads through the local reference
    (window 3), the next ``heads[1]`` through the dilated one, the rest through the linear
    one; query head ``h`` reads key/value head ``h // G``, or head 0 with one."""
    H, H_kv = m.num_heads, m.num_kv_heads
    q = rearrange(x @ m.q_proj.weight.T + m.q_proj.bias, "b s (h d) -> b h s d", h=H)
    k, v = (
        rearrange(x @ p.weight.T + p.bias, "b s (h d) -> b h s d", h=H_kv)
        for p in (m.k_proj, m.v_proj)
    )
    if m.position == "rotary":
        positions = torch.arange(x.shape[1])
        q, k = rotary(q, positions), rotary(k, positions)
    reads = [h // (H // H_kv) for h in range(H)]
    k, v = k[:, reads], v[:, reads]  # (B, H, S, D): every query head with its own key head
    c = m.config
    references = [
        lambda *qkv: local_attention_reference(*qkv, 3, **kwargs),
        lambda *qkv: dilated_attention_reference(
            *qkv, c.segment_lengths, c.dilation_rates, **kwargs
        ),
        lambda *qkv: linear_attention_reference(*qkv, **kwargs),
    ]
    outputs, start = [], 0
    for count, reference in zip(heads, references, strict=True):
        group = slice(start, start + count)
        if count:
            outputs.append(reference(q[:, group], k[:, group], v[:, group]))
        start += count
    out = rearrange(torch.cat(outputs, 1), "b h s d -> b s (h d)")
    return out @ m.out_proj.weight.T + m.out_proj.bias


@pytest.mark.parametrize("num_kv_heads", [4, 2, 1])
@pytest.mark.parametrize(
    "heads", [(0, 4, 0), (2, 2, 0), (0, 2, 2), (2, 0, 2), (4, 0, 0), (0, 0, 4)]
)
@pytest.mark.parametrize("is_causal", [False, True])
def test_each_head_group_equals_its_reference(
    num_kv_heads: int, heads: tuple[int, int, int], is_causal: bool
) -> None:
    m = MixedHeadAttention(
        32, 4, [4, 8], [1, 2], num_kv_heads=num_kv_heads, local_heads=heads[0],
        linear_heads=heads[2], local_window_size=3, linear_chunk_size=5, position="rotary",
        is_causal=is_causal, dtype=torch.float64,
    )  # fmt: skip
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 19, 32, dtype=torch.float64)
    padding = torch.rand(2, 19) < 0.3
    out, _ = m(x, x, x, key_padding_mask=padding)
    expected = _mixed_reference(m, x, heads, is_causal=is_causal, key_padding_mask=padding)
    torch.testing.assert_close(out, expected)
    assert m.head_counts == heads


@pytest.mark.parametrize("num_kv_heads", [3, 1])
def test_decoding_step_by_step_equals_the_full_forward(num_kv_heads: int) -> None:
    m = MixedHeadAttention(
        48, 6, [4, 8], [1, 2], num_kv_heads=num_kv_heads, local_heads=2, linear_heads=2,
        local_window_size=4, position="rotary", is_causal=True, dtype=torch.float64,
    )  # fmt: skip
    x = torch.randn(2, 15, 48, dtype=torch.float64)
    full, _ = m(x, x, x)
    cache = m.new_kv_cache(2, 15)
    steps = [m(x[:, :6], x[:, :6], x[:, :6], kv_cache=cache)[0]]
    for i in range(6, 15):
        steps.append(m(x[:, i : i + 1], x[:, i : i + 1], x[:, i : i + 1], kv_cache=cache)[0])
    torch.testing.assert_close(torch.cat(steps, 1), full)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"linear_heads": 3, "local_heads": 2}, r"at most num_heads \(4\), got 2 \+ 3"),
        ({"linear_heads": 1.0}, "linear_heads must be a non-negative integer, got 1.0"),
        ({"local_heads": -1}, "local_heads must be a non-negative integer, got -1"),
        ({"local_window_size": 0}, "local_window_size must be a positive integer"),
        ({"linear_heads": 1, "num_kv_heads": 2}, "a multiple of 2 heads, got 3 dilated heads"),
        ({"linear_heads": 2, "position": "alibi"}, "act on dilated heads only"),
        ({"linear_heads": 2, "dropout": 0.1}, "act on dilated heads only"),
        ({"linear_chunk_size": 0}, "linear_chunk_size must be a positive integer"),
    ],
)
def test_bad_arguments_raise(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        MixedHeadAttention(32, 4, [8], [1], **kwargs)


def test_linear_heads_refuse_documents() -> None:
    m = MixedHeadAttention(32, 4, [8], [1], linear_heads=2)
    x = torch.randn(1, 8, 32)
    with pytest.raises(ValueError, match="linear heads do not take document_ids"):
        m(x, x, x, document_ids=torch.zeros(1, 8, dtype=torch.long))
