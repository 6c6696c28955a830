"""MixedHeadAttention: each head group equals its kind's reference, with the same weights."""

from __future__ import annotations

import pytest
import torch
from einops import rearrange

from dilattn import rotary
from dilattn.mixed import MixedHeadAttention
from dilattn.reference import dilated_attention_reference, linear_attention_reference


def _mixed_reference(
    m: MixedHeadAttention, x: torch.Tensor, linear_heads: int, **kwargs: object
) -> torch.Tensor:
    """The projections by hand; heads ``[0, H - linear_heads)`` through the dilated reference,
    the rest through the linear one; query head ``h`` reads key/value head ``h // G``, or
    head 0 with one key/value head."""
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
    split = H - linear_heads
    heads = []
    if split:
        heads.append(
            dilated_attention_reference(
                q[:, :split],
                k[:, :split],
                v[:, :split],
                m.config.segment_lengths,
                m.config.dilation_rates,
                **kwargs,
            )
        )
    if linear_heads:
        heads.append(linear_attention_reference(q[:, split:], k[:, split:], v[:, split:], **kwargs))
    out = rearrange(torch.cat(heads, 1), "b h s d -> b s (h d)")
    return out @ m.out_proj.weight.T + m.out_proj.bias


@pytest.mark.parametrize("num_kv_heads", [4, 2, 1])
@pytest.mark.parametrize("linear_heads", [0, 2, 4])
@pytest.mark.parametrize("is_causal", [False, True])
def test_each_head_group_equals_its_reference(
    num_kv_heads: int, linear_heads: int, is_causal: bool
) -> None:
    m = MixedHeadAttention(
        32, 4, [4, 8], [1, 2], num_kv_heads=num_kv_heads, linear_heads=linear_heads,
        linear_chunk_size=5, position="rotary", is_causal=is_causal, dtype=torch.float64,
    )  # fmt: skip
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 19, 32, dtype=torch.float64)
    padding = torch.rand(2, 19) < 0.3
    out, _ = m(x, x, x, key_padding_mask=padding)
    expected = _mixed_reference(m, x, linear_heads, is_causal=is_causal, key_padding_mask=padding)
    torch.testing.assert_close(out, expected)
    assert m.head_counts == (4 - linear_heads, linear_heads)


def test_decoding_step_by_step_equals_the_full_forward() -> None:
    m = MixedHeadAttention(
        32, 4, [4, 8], [1, 2], num_kv_heads=2, linear_heads=2, position="rotary",
        is_causal=True, dtype=torch.float64,
    )  # fmt: skip
    x = torch.randn(2, 15, 32, dtype=torch.float64)
    full, _ = m(x, x, x)
    cache = m.new_kv_cache(2, 15)
    steps = [m(x[:, :6], x[:, :6], x[:, :6], kv_cache=cache)[0]]
    steps += [
        m(x[:, i : i + 1], x[:, i : i + 1], x[:, i : i + 1], kv_cache=cache)[0]
        for i in range(6, 15)
    ]
    torch.testing.assert_close(torch.cat(steps, 1), full)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"linear_heads": 5}, r"linear_heads must be in \[0, 4\], got 5"),
        ({"linear_heads": 1.0}, "linear_heads must be an integer"),
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
