"""Position score mods and rotations against their papers' formulas."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.nn.attention.flex_attention import flex_attention

from dilattn import T5RelativeBias, alibi_score_mod, alibi_slopes, rotary, xpos, xpos_limit


def test_alibi_slopes_are_the_papers() -> None:
    assert alibi_slopes(8) == [2.0**-i for i in range(1, 9)]
    # not a power of two: the 4-head slopes, then every other 8-head slope
    assert alibi_slopes(6) == [0.25, 0.0625, 0.015625, 0.00390625, 0.5, 0.125]
    assert len(alibi_slopes(12)) == 12


def _scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    return q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])


def test_alibi_score_mod_in_flex_adds_minus_slope_times_distance() -> None:
    q, k, v = (torch.randn(2, 4, 20, 8) for _ in range(3))
    out = flex_attention(q, k, v, score_mod=alibi_score_mod(4))
    i = torch.arange(20)
    slopes = torch.tensor(alibi_slopes(4)).view(-1, 1, 1)
    bias = -slopes * (i.view(-1, 1) - i).abs()  # (H, S, S)
    torch.testing.assert_close(out, torch.softmax(_scores(q, k) + bias, -1) @ v)
    assert alibi_score_mod(4).__name__ == "alibi_4h"


@pytest.mark.parametrize("num_heads", [1, 3, 6, 8, 12, 16, 20])
def test_alibi_score_mod_computes_the_papers_slopes(num_heads: int) -> None:
    h = torch.arange(num_heads)
    bias = alibi_score_mod(num_heads)(torch.zeros(num_heads), 0, h, torch.tensor(1), 0)
    torch.testing.assert_close(-bias, torch.tensor(alibi_slopes(num_heads)))


def _hf_t5_bucket(relative, bidirectional, num_buckets, max_distance):
    """Hugging Face's ``T5Attention._relative_position_bucket``, verbatim in substance."""
    buckets = 0
    if bidirectional:
        num_buckets //= 2
        buckets += (relative > 0).to(torch.long) * num_buckets
        relative = torch.abs(relative)
    else:
        relative = -torch.min(relative, torch.zeros_like(relative))
    max_exact = num_buckets // 2
    is_small = relative < max_exact
    large = max_exact + (
        torch.log(relative.float() / max_exact)
        / math.log(max_distance / max_exact)
        * (num_buckets - max_exact)
    ).to(torch.long)
    large = torch.min(large, torch.full_like(large, num_buckets - 1))
    return buckets + torch.where(is_small, relative, large)


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize(("num_buckets", "max_distance"), [(32, 128), (8, 20), (10, 11)])
def test_t5_buckets_are_t5s(bidirectional: bool, num_buckets: int, max_distance: int) -> None:
    t5 = T5RelativeBias(
        2, num_buckets=num_buckets, max_distance=max_distance, bidirectional=bidirectional
    )
    relative = torch.arange(-300, 301)
    expected = _hf_t5_bucket(relative, bidirectional, num_buckets, max_distance)
    assert torch.equal(t5.bucket(relative), expected)
    assert t5.bucket(relative).max() == num_buckets - 1


def test_t5_known_buckets() -> None:
    t5 = T5RelativeBias(1)
    assert t5.bucket(torch.tensor([0, -1, 1, -200, 200])).tolist() == [0, 1, 17, 15, 31]


def test_t5_score_mod_in_flex_adds_the_table_and_is_named() -> None:
    t5 = T5RelativeBias(3, num_buckets=8, max_distance=16, bidirectional=False)
    with torch.no_grad():
        t5.bias.normal_()
    q, k, v = (torch.randn(1, 3, 24, 8) for _ in range(3))
    out = flex_attention(q, k, v, score_mod=t5.score_mod)
    i = torch.arange(24)
    bias = t5.bias[t5.bucket(i - i.view(-1, 1))].permute(2, 0, 1)  # (H, S_q, S_kv)
    torch.testing.assert_close(out, torch.softmax(_scores(q, k) + bias, -1) @ v)
    assert t5.score_mod.__name__ == "t5_bias_8b_16d_causal"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_heads": 0}, "num_heads must be a positive"),
        ({"num_buckets": 2}, "at least one exact bucket"),
        ({"max_distance": 8}, "max_distance above them"),
    ],
)
def test_t5_bad_arguments_raise(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        T5RelativeBias(**{"num_heads": 2, **kwargs})


def _complex_rotation(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    """RoPE as complex multiplication: pair ``(x_i, x_{i + D/2})`` times ``e^(i p theta_i)``."""
    D = x.shape[-1]
    theta = base ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    pairs = torch.complex(*x.double().chunk(2, -1))
    turned = pairs * torch.polar(
        torch.ones((), dtype=torch.float64), positions.double()[..., None] * theta
    )
    return torch.cat([turned.real, turned.imag], -1)


@pytest.mark.parametrize("batched_positions", [False, True])
def test_rotary_is_complex_rotation(batched_positions: bool) -> None:
    x = torch.randn(2, 3, 10, 16, dtype=torch.float64)
    positions = torch.randint(0, 10**6, (2, 10) if batched_positions else (10,))
    expected = _complex_rotation(x, positions[:, None] if batched_positions else positions, 500.0)
    torch.testing.assert_close(rotary(x, positions, base=500.0), expected)


@given(shift=st.integers(0, 10**6), data=st.data())
def test_scores_depend_only_on_distance(shift: int, data: st.DataObject) -> None:
    q, k = (torch.randn(1, 2, 9, 8, dtype=torch.float64) for _ in range(2))
    p = torch.arange(9)
    xpos_shift = data.draw(st.integers(0, xpos_limit(torch.float64, scale_base=64.0) - 9))
    for rotate_q, rotate_k, by in (
        (rotary, rotary, shift),
        (
            lambda x, pos: xpos(x, pos, key=False, scale_base=64.0),
            lambda x, pos: xpos(x, pos, key=True, scale_base=64.0),
            xpos_shift,
        ),
    ):
        base = _scores(rotate_q(q, p), rotate_k(k, p))
        torch.testing.assert_close(_scores(rotate_q(q, p + by), rotate_k(k, p + by)), base)


def test_xpos_is_rotary_with_a_decay_per_pair() -> None:
    q, k = (torch.randn(1, 1, 12, 8, dtype=torch.float64) for _ in range(2))
    p = torch.arange(12)
    zeta = (torch.arange(0, 8, 2, dtype=torch.float64) / 8 + 0.4) / 1.4
    decay = zeta ** ((p.view(-1, 1, 1) - p.view(1, -1, 1)) / 32.0)  # (S_q, S_kv, D/2)
    rq, rk = rotary(q, p)[0, 0], rotary(k, p)[0, 0]
    pair_products = (rq[:, None] * rk[None]).view(12, 12, 2, 4).sum(2)  # pairs (i, i + D/2)
    expected = (pair_products * decay).sum(-1)
    actual = (
        xpos(q, p, key=False, scale_base=32.0)[0, 0] @ xpos(k, p, key=True, scale_base=32.0)[0, 0].T
    )
    torch.testing.assert_close(actual, expected)


def test_rotations_keep_dtype_and_check_shapes() -> None:
    x = torch.randn(1, 2, 6, 8, dtype=torch.bfloat16)
    assert rotary(x, torch.arange(6)).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="even head dim"):
        rotary(torch.randn(1, 1, 4, 5), torch.arange(4))
    with pytest.raises(ValueError, match=r"positions must have shape \(6,\) or \(1, 6\)"):
        xpos(x, torch.arange(5), key=True)


def test_xpos_limit_keeps_factors_finite() -> None:
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        limit = xpos_limit(dtype)
        x = torch.ones(1, 1, 1, 64, dtype=dtype)
        for key in (False, True):
            assert torch.isfinite(xpos(x, torch.tensor([limit]), key=key)).all()
    assert 16_000 < xpos_limit(torch.float32) < 20_000
