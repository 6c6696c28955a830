"""Linear attention: the chunked and factored paths against the dense S x S reference."""

from __future__ import annotations

import pytest
import torch
from conftest import ATOL, assert_within_budget, examples
from hypothesis import given
from hypothesis import strategies as st

from dilattn.linear import linear_attention
from dilattn.reference import linear_attention_reference


@st.composite
def problems(draw: st.DrawFn) -> dict:
    """Shapes (odd lengths, GQA, key length != query length), chunk size, causality,
    padding and query offset."""
    kv_heads = draw(st.sampled_from([1, 2]))
    q_len = draw(st.integers(1, 40))
    return {
        "shape": (draw(st.integers(1, 2)), kv_heads * draw(st.sampled_from([1, 3])), q_len),
        "kv_heads": kv_heads,
        "kv_len": draw(st.sampled_from([q_len, draw(st.integers(1, 48))])),
        "dims": (draw(st.sampled_from([4, 8])), draw(st.sampled_from([3, 8]))),
        "chunk_size": draw(st.integers(1, 48)),
        "is_causal": draw(st.booleans()),
        "padding": draw(st.booleans()),
        "q_offset": draw(st.sampled_from([0, draw(st.integers(0, 50))])),
    }


def _inputs(p: dict, dtype: torch.dtype = torch.float64, requires_grad: bool = False):
    (B, H, S), (D, D_v) = p["shape"], p["dims"]
    H_kv, S_kv = p["kv_heads"], p["kv_len"]
    shapes = [(B, H, S, D), (B, H_kv, S_kv, D), (B, H_kv, S_kv, D_v)]
    qkv = [torch.randn(s, dtype=dtype).requires_grad_(requires_grad) for s in shapes]
    kwargs: dict = {"is_causal": p["is_causal"], "q_offset": p["q_offset"]}
    kwargs["enable_gqa"] = H_kv != H
    if p["padding"]:
        kwargs["key_padding_mask"] = torch.rand(B, S_kv) < 0.3
    return qkv, kwargs


@examples(60)
@given(problems())
def test_linear_attention_equals_the_dense_reference(p: dict) -> None:
    """Any chunk size, odd lengths, GQA, padding, offsets; outputs and float64 gradients."""
    qkv, kwargs = _inputs(p, requires_grad=True)
    out = linear_attention(*qkv, chunk_size=p["chunk_size"], **kwargs)
    truth = linear_attention_reference(*qkv, **kwargs)
    torch.testing.assert_close(out, truth, atol=1e-12, rtol=1e-10)
    grad = torch.randn_like(out)
    for g, t in zip(
        torch.autograd.grad(out, qkv, grad),
        torch.autograd.grad(truth, qkv, grad),
        strict=True,
    ):
        torch.testing.assert_close(g, t, atol=1e-11, rtol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("is_causal", [False, True])
def test_low_precision_within_the_error_budget(dtype: torch.dtype, is_causal: bool) -> None:
    p = {"shape": (2, 4, 300), "kv_heads": 2, "kv_len": 300, "dims": (16, 16)}
    p |= {"is_causal": is_causal, "padding": True, "q_offset": 0}
    qkv, kwargs = _inputs(p, dtype)
    out = linear_attention(*qkv, chunk_size=32, **kwargs)
    assert out.dtype == dtype
    truth = linear_attention_reference(*(x.double() for x in qkv), **kwargs)
    baseline = linear_attention_reference(*qkv, **kwargs)
    assert_within_budget(out, baseline, truth)


def test_causal_rows_see_only_the_past_and_padding_contributes_nothing() -> None:
    q, k, v = (torch.randn(1, 2, 20, 8, dtype=torch.float64) for _ in range(3))
    out = linear_attention(q, k, v, is_causal=True, chunk_size=6)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 12:], v2[:, :, 12:] = torch.randn(2, 1, 2, 8, 8, dtype=torch.float64)
    changed = linear_attention(q, k2, v2, is_causal=True, chunk_size=6)
    torch.testing.assert_close(changed[:, :, :12], out[:, :, :12], atol=ATOL[q.dtype], rtol=0)
    assert not torch.allclose(changed[:, :, 12:], out[:, :, 12:])
    padding = torch.zeros(1, 20, dtype=torch.bool)
    padding[:, 5:] = True
    v2[:, :, 5:] *= 1e3
    padded = linear_attention(q, k2, v2, key_padding_mask=padding)
    expected = linear_attention(q, k[:, :, :5], v[:, :, :5])
    torch.testing.assert_close(padded, expected)
    everything = linear_attention(q, k, v, key_padding_mask=torch.ones(1, 20, dtype=torch.bool))
    assert torch.equal(everything, torch.zeros_like(everything))


def test_decoding_with_a_prefix_equals_the_full_causal_rows() -> None:
    q, k, v = (torch.randn(2, 2, 30, 8, dtype=torch.float64) for _ in range(3))
    full = linear_attention(q, k, v, is_causal=True, chunk_size=7)
    step = linear_attention(q[:, :, 21:24], k[:, :, :24], v[:, :, :24], is_causal=True, q_offset=21)
    torch.testing.assert_close(step, full[:, :, 21:24])


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"chunk_size": 0}, ValueError, "chunk_size must be a positive integer, got 0"),
        ({"q_offset": -1}, ValueError, "q_offset must be a non-negative integer"),
        ({"key_padding_mask": torch.ones(2, 3)}, ValueError, r"key_padding_mask must have shape"),
        ({"enable_gqa": False}, ValueError, "pass enable_gqa=True"),
    ],
)
def test_bad_arguments_raise(kwargs: dict, error: type, match: str) -> None:
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    with pytest.raises(error, match=match):
        linear_attention(q, k, v, **{"enable_gqa": True, **kwargs})
