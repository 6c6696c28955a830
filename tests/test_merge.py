"""merge_by_lse: the LSE combiner."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from dilattn import merge_by_lse
from dilattn.reference import dilated_attention_reference


def _attention(q, k, v, mask):
    scores = (q @ k.transpose(-1, -2)).masked_fill(~mask, -torch.inf)
    lse = torch.logsumexp(scores, -1)
    return torch.softmax(scores, -1).nan_to_num() @ v, lse


@given(n=st.integers(1, 4), seed=st.integers(0, 2**31 - 1))
def test_merge_is_invariant_to_order(n: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    outs = [torch.randn(2, 3, 5, 4, generator=g, dtype=torch.float64) for _ in range(n)]
    lses = [torch.randn(2, 3, 5, generator=g, dtype=torch.float64) for _ in range(n)]
    lses[0][0, 0, 0] = -torch.inf
    order = torch.randperm(n, generator=g).tolist()
    a = merge_by_lse(outs, lses)
    b = merge_by_lse([outs[i] for i in order], [lses[i] for i in order])
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y)


@given(split=st.integers(0, 12), seed=st.integers(0, 2**31 - 1))
def test_merging_two_halves_of_the_keys_gives_the_whole(split: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, 2, 12, 4, generator=g, dtype=torch.float64) for _ in range(3))
    keys = torch.arange(12)
    whole = _attention(q, k, v, torch.ones(12, 12, dtype=torch.bool))
    left = _attention(q, k, v, (keys < split).expand(12, 12))
    right = _attention(q, k, v, (keys >= split).expand(12, 12))
    out, lse = merge_by_lse([left[0], right[0]], [left[1], right[1]])
    torch.testing.assert_close(out, whole[0])
    torch.testing.assert_close(lse, whole[1])


def test_splitting_one_branch_keys_in_two_preserves_dilated_attention() -> None:
    q, k, v = (torch.randn(1, 2, 16, 4, dtype=torch.float64) for _ in range(3))
    out, lse = dilated_attention_reference(q, k, v, [8, 16], [1, 2], return_lse=True)
    a, la = dilated_attention_reference(q, k, v, [8], [1], return_lse=True)
    b, lb = dilated_attention_reference(q, k, v, [16], [2], return_lse=True)
    merged, merged_lse = merge_by_lse([b, a], [lb, la])
    torch.testing.assert_close(merged, out)
    torch.testing.assert_close(merged_lse, lse)


def test_rows_with_no_keys_give_zero_and_finite_gradients() -> None:
    outs = [torch.randn(3, 4, requires_grad=True) for _ in range(2)]
    lses = [torch.full((3,), -torch.inf, requires_grad=True) for _ in range(2)]
    out, lse = merge_by_lse(outs, lses)
    assert (out == 0).all() and torch.isneginf(lse).all()
    (out.sum() + lse.where(torch.isfinite(lse), 0).sum()).backward()
    assert all(torch.isfinite(x.grad).all() for x in (*outs, *lses))


def test_merge_keeps_requested_dtype() -> None:
    out, lse = merge_by_lse([torch.randn(2, 3, dtype=torch.bfloat16)], [torch.randn(2)])
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32


@pytest.mark.parametrize(
    ("outs", "lses", "match"),
    [
        ([], [], "at least one"),
        ([torch.randn(2, 3)], [], "as many outputs"),
        ([torch.randn(2, 3)], [torch.randn(3)], r"expected lse shape \(2,\)"),
    ],
)
def test_bad_merge_inputs_raise(outs, lses, match) -> None:
    with pytest.raises(ValueError, match=match):
        merge_by_lse(outs, lses)
