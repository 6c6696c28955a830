"""The strided path (views of q/k/v, in-place merge, ring-style backward) against the reference.

On CPU it runs with matmul kernels; the same plan, views, folds and merge order run on CUDA
with cuDNN and the Triton merge (tests/test_gpu.py).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import LOW_DTYPES, Case, assert_within_budget, cases
from hypothesis import given
from hypothesis import strategies as st

from dilattn import dilated_attention
from dilattn.config import DilatedConfig
from dilattn.engines import strided
from dilattn.reference import dilated_attention_reference


@st.composite
def strided_cases(draw: st.DrawFn) -> tuple[Case, bool]:
    """A case with S_q == S_kv, any head-offset rule, and whether to lay q/k/v out as
    ``(B, S, H, D)`` (transposed views, as a model's projections give)."""
    case = draw(cases(same_lengths=True))
    case = dataclasses.replace(
        case, head_offsets=draw(st.sampled_from(["cyclic", "grouped", "split"]))
    )
    return case, draw(st.booleans())


def _inputs(case: Case, dtype: torch.dtype, transposed: bool) -> tuple[list, list]:
    exact, low = case.inputs(dtype, requires_grad=True)
    if transposed:  # same values, (B, S, H, D) memory
        low = [x.detach().transpose(1, 2).contiguous().transpose(1, 2) for x in low]
        low = [x.requires_grad_() for x in low]
    return exact, low


def _run(case: Case, q, k, v, **extra):
    args = (q, k, v, case.segment_lengths, case.dilation_rates)
    return dilated_attention(*args, **case.kwargs, backend="strided", **extra)


def _reference(case: Case, q, k, v):
    args = (q, k, v, case.segment_lengths, case.dilation_rates)
    return dilated_attention_reference(*args, **case.kwargs)


@given(drawn=strided_cases(), dtype=st.sampled_from([torch.float64, *LOW_DTYPES]))
def test_forward_and_gradients_match_reference(
    drawn: tuple[Case, bool], dtype: torch.dtype
) -> None:
    case, transposed = drawn
    (q64, k64, v64), (q, k, v) = _inputs(case, dtype, transposed)
    out = _run(case, q, k, v)
    truth = _reference(case, q64, k64, v64)
    qb, kb, vb = (x.detach().clone().requires_grad_() for x in (q, k, v))
    baseline = _reference(case, qb, kb, vb)
    assert out.dtype == dtype and out.shape == truth.shape
    assert_within_budget(out, baseline, truth)

    grad_out = torch.randn_like(truth)
    grads = torch.autograd.grad(out, (q, k, v), grad_out.to(dtype))
    base_grads = torch.autograd.grad(baseline, (qb, kb, vb), grad_out.to(dtype))
    truth_grads = torch.autograd.grad(truth, (q64, k64, v64), grad_out)
    for grad, base, truth_grad in zip(grads, base_grads, truth_grads, strict=True):
        assert grad.dtype == dtype
        assert_within_budget(grad, base, truth_grad, factor=4)


@given(case=cases(same_lengths=True, max_len=40))
def test_lse_matches_reference(case: Case) -> None:
    (q64, k64, v64), _ = case.inputs(torch.float64)
    _, lse = _run(case, q64, k64, v64, return_lse=True)
    _, truth = dilated_attention_reference(
        q64, k64, v64, case.segment_lengths, case.dilation_rates, **case.kwargs, return_lse=True
    )
    torch.testing.assert_close(lse, truth)


@given(case=cases(same_lengths=True, max_len=40), idle=st.booleans())
def test_lse_gradient_matches_reference(case: Case, idle: bool) -> None:
    """Gradients through both outputs (the distributed merge needs them); with ``idle`` the
    output gradient is zero in some rows while their lse gradient is not."""
    (q, k, v), _ = case.inputs(torch.float64, requires_grad=True)
    out, lse = _run(case, q, k, v, return_lse=True)
    truth, truth_lse = dilated_attention_reference(
        q, k, v, case.segment_lengths, case.dilation_rates, **case.kwargs, return_lse=True
    )
    grad_out, grad_lse = torch.randn_like(out), torch.randn_like(lse)
    if idle:
        grad_out[..., ::2, :] = 0
    covered = truth_lse.isfinite()  # the lse is -inf in rows no branch covers
    loss = lambda o, l: (o * grad_out).sum() + (l.where(covered, 0) * grad_lse).sum()
    grads = torch.autograd.grad(loss(out, lse), (q, k, v))
    truth_grads = torch.autograd.grad(loss(truth, truth_lse), (q, k, v))
    for grad, truth_grad in zip(grads, truth_grads, strict=True):
        torch.testing.assert_close(grad, truth_grad)


@pytest.mark.parametrize("call_rows", [1, 7])
def test_small_calls_give_the_same_result(call_rows: int, monkeypatch) -> None:
    """Calls split into chunks of segments (CALL_ROWS) cover the same rows once."""
    monkeypatch.setattr(strided, "CALL_ROWS", call_rows)
    strided.plan.cache_clear()
    try:
        q, k, v = (torch.randn(2, 6, 61, 8, dtype=torch.float64) for _ in range(3))
        for offsets in ("cyclic", "split"):
            args = (q, k, v, [4, 12, 20], [1, 3, 6])
            out = dilated_attention(*args, is_causal=True, head_offsets=offsets, backend="strided")
            truth = dilated_attention_reference(*args, is_causal=True, head_offsets=offsets)
            torch.testing.assert_close(out, truth)
    finally:
        strided.plan.cache_clear()


def test_plan_covers_every_row_of_every_branch_once() -> None:
    """Each (branch, head, position) a head computes lies in exactly one call."""
    config = DilatedConfig((8, 12, 30), (1, 5, 6))
    H, S = 12, 70
    calls = strided.plan(config.branches, config.offsets(H), 1, S, 2).calls
    assert len(calls) < sum(len(set(o)) for o in config.offsets(H)) * 2  # slots merge offsets
    seen: dict[tuple[int, int], int] = {}
    for call in calls:
        for i in range(call.q_heads.size):
            h = call.q_heads.start + i * call.q_heads.step
            for n in range(call.rows.segments):
                for m in range(call.rows.rows):
                    p = call.rows.start + i * call.q_heads.shift + n * call.rows.segment_step
                    p += m * call.rows.step
                    seen[(h, p)] = seen.get((h, p), 0) + 1
    expected = {
        (h, p): sum(
            ((p % min(w, S)) % r) == offsets[h]
            for (w, r), offsets in zip(config.branches, config.offsets(H), strict=True)
        )
        for h in range(H)
        for p in range(S)
    }
    assert seen == {key: n for key, n in expected.items() if n}


def test_refuses_what_it_cannot_run() -> None:
    q = torch.randn(1, 2, 8, 4)
    k = torch.randn(1, 2, 6, 4)
    with pytest.raises(ValueError, match="S_q == S_kv"):
        dilated_attention(q, k, k, [4], [1], backend="strided")
    with pytest.raises(ValueError, match="strided backend only"):
        dilated_attention(q, q, q, [4], [1], head_offsets="split", backend="math")
