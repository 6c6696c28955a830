"""The reference against the definition itself: brute force and the special cases."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import Case, cases
from hypothesis import given

from dilattn.config import DilatedConfig
from dilattn.reference import dilated_attention_dense, dilated_attention_reference, multiplicity


def _brute_force(q, k, v, config: DilatedConfig, is_causal: bool) -> torch.Tensor:
    """The definition in scalar loops: per branch, per head, per query, the visible keys."""
    B, H, S, _ = q.shape
    out = torch.zeros(B, H, S, v.shape[-1], dtype=q.dtype)
    scale = q.shape[-1] ** -0.5
    for b in range(B):
        for h in range(H):
            for p in range(S):
                denominators, outputs = [], []
                for (w, r), offsets in zip(config.branches, config.offsets(H), strict=True):
                    start = p // w * w
                    if (p - start) % r != offsets[h]:
                        continue
                    keys = [
                        t
                        for t in range(start, min(start + w, k.shape[2]))
                        if (t - start) % r == offsets[h] and (t <= p or not is_causal)
                    ]
                    if not keys:
                        continue
                    e = torch.stack([torch.exp(q[b, h, p] @ k[b, h, t] * scale) for t in keys])
                    denominators.append(e.sum())
                    outputs.append((e[:, None] * v[b, h, keys]).sum(0) / e.sum())
                if denominators:
                    total = sum(denominators)
                    out[b, h, p] = sum(
                        s / total * o for s, o in zip(denominators, outputs, strict=True)
                    )
    return out


@given(case=cases(max_len=14, same_lengths=True, max_segment=10))
def test_reference_equals_brute_force_definition(case: Case) -> None:
    (q, k, v), _ = case.inputs(torch.float64)
    k, v = (x.repeat_interleave(case.q_heads // case.kv_heads, 1) for x in (k, v))
    config = DilatedConfig(case.segment_lengths, case.dilation_rates, case.head_offsets)  # type: ignore[arg-type]
    kwargs = {"is_causal": case.is_causal, "head_offsets": case.head_offsets}
    expected = _brute_force(q, k, v, config, case.is_causal)
    torch.testing.assert_close(
        dilated_attention_reference(
            q, k, v, config.segment_lengths, config.dilation_rates, **kwargs
        ),
        expected,
    )
    torch.testing.assert_close(
        dilated_attention_dense(q, k, v, config.segment_lengths, config.dilation_rates, **kwargs),
        expected,
    )


def _qkv(S: int = 24, H: int = 2, D: int = 8):
    return [torch.randn(2, H, S, D, dtype=torch.float64) for _ in range(3)]


@pytest.mark.parametrize("is_causal", [False, True])
def test_full_segment_rate_one_is_dense_attention(is_causal: bool) -> None:
    q, k, v = _qkv()
    out = dilated_attention_reference(q, k, v, [24], [1], is_causal=is_causal)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=is_causal))


@pytest.mark.parametrize("is_causal", [False, True])
def test_rate_two_is_strided_subset_attention(is_causal: bool) -> None:
    q, k, v = _qkv(S=23)
    out = dilated_attention_reference(q, k, v, [23], [2], is_causal=is_causal)
    expected = torch.zeros_like(out)
    for h in range(2):  # head h takes positions h, h + 2, ...
        rows = slice(h, None, 2)
        expected[:, h, rows] = F.scaled_dot_product_attention(
            q[:, h, rows], k[:, h, rows], v[:, h, rows], is_causal=is_causal
        )
    torch.testing.assert_close(out, expected)


def test_half_segments_are_block_diagonal_attention() -> None:
    q, k, v = _qkv(S=24)
    out = dilated_attention_reference(q, k, v, [12], [1])
    halves = [
        F.scaled_dot_product_attention(*(x[:, :, i : i + 12] for x in (q, k, v))) for i in (0, 12)
    ]
    torch.testing.assert_close(out, torch.cat(halves, dim=2))


def test_two_branches_mix_by_softmax_denominators() -> None:
    q, k, v = _qkv(S=16, H=1)
    branches = [([8], [1]), ([16], [2])]
    results = [dilated_attention_reference(q, k, v, w, r, return_lse=True) for w, r in branches]
    (o1, l1), (o2, l2) = results
    s1, s2 = torch.exp(l1), torch.where(torch.isinf(l2), 0, torch.exp(l2))  # denominators
    expected = (s1[..., None] * o1 + s2[..., None] * o2) / (s1 + s2)[..., None]
    torch.testing.assert_close(dilated_attention_reference(q, k, v, [8, 16], [1, 2]), expected)


def test_multi_head_is_per_head_results_stacked() -> None:
    q, k, v = _qkv(S=20, H=4)
    out = dilated_attention_reference(q, k, v, [10, 20], [1, 4])
    changed = q.clone()
    changed[:, 1:] = torch.randn_like(changed[:, 1:])  # other heads' inputs must not matter
    torch.testing.assert_close(
        dilated_attention_reference(changed, k, v, [10, 20], [1, 4])[:, 0], out[:, 0]
    )
    config = DilatedConfig((10, 20), (1, 4))
    torch.testing.assert_close(out, _brute_force(q, k, v, config, is_causal=False))


def test_overlapping_branches_count_a_shared_key_once_per_branch() -> None:
    q, k, v = _qkv(S=8, H=1)
    out = dilated_attention_reference(q, k, v, [4, 8], [1, 1])
    same_quarter = (torch.arange(8)[:, None] // 4) == (torch.arange(8) // 4)
    bias = torch.log(1.0 + same_quarter.double())  # seen by both branches: weight 2
    expected = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8) + bias, dim=-1) @ v
    torch.testing.assert_close(out, expected)


def test_multiplicity_counts_branches() -> None:
    m = multiplicity([4, 8], [1, 2], num_heads=2, q_len=8)
    assert m.shape == (2, 8, 8)
    assert m[0, 0, 0] == 2 and m[0, 0, 1] == 1 and m[0, 0, 4] == 1 and m[0, 0, 5] == 0
    assert m[1, 1, 3] == 2 and m[1, 1, 5] == 1 and m[1, 0, 0] == 1
