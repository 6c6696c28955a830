"""GPU-only checks: compiled FlexAttention, backward through flex, half precision, long inputs.

Run on a CUDA machine with ``pytest -m gpu``; skipped elsewhere.
"""

from __future__ import annotations

import pytest
import torch
from conftest import Case, assert_within_budget, requires_cuda, run_ranks
from torch.nn.attention.flex_attention import flex_attention

from dilattn import DilatedConfig, dilated_attention, flex_mask
from dilattn.reference import dilated_attention_reference

pytestmark = [pytest.mark.gpu, requires_cuda]

CASES = [
    Case((256, 512, 1024), (1, 2, 4), 1, 4, 4, 1000, 1000, 64, 64, True, "cyclic"),
    Case((300, 700), (1, 6), 2, 4, 2, 777, 777, 32, 32, False, "cyclic"),
    Case((128, 512), (2, 12), 1, 6, 6, 513, 513, 64, 64, True, "grouped"),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_compiled_flex_forward_and_backward(case: Case, dtype: torch.dtype) -> None:
    (q64, k64, v64), (q, k, v) = case.inputs(dtype, device="cuda", requires_grad=True)
    args = (case.segment_lengths, case.dilation_rates)
    (qb, kb, vb) = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out = dilated_attention(q, k, v, *args, **case.kwargs, backend="flex")
    truth = dilated_attention_reference(q64, k64, v64, *args, **case.kwargs)
    baseline = dilated_attention_reference(qb, kb, vb, *args, **case.kwargs)
    assert_within_budget(out, baseline, truth)
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad)
    truths = torch.autograd.grad(truth, (q64, k64, v64), grad.double())
    baselines = torch.autograd.grad(baseline, (qb, kb, vb), grad)
    for g, b, t in zip(grads, baselines, truths, strict=True):
        assert_within_budget(g, b, t, factor=4.0)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_one_line_mask_compiled(case: Case) -> None:
    (q64, k64, v64), (q, k, v) = case.inputs(torch.bfloat16, device="cuda")
    m = flex_mask(
        case.segment_lengths,
        case.dilation_rates,
        q_len=case.q_len,
        num_heads=case.q_heads,
        is_causal=case.is_causal,
        head_offsets=case.head_offsets,
        device="cuda",  # type: ignore[arg-type]
    )
    out = torch.compile(flex_attention)(
        q,
        k,
        v,
        block_mask=m.block_mask,
        score_mod=m.score_mod,
        enable_gqa=case.q_heads != case.kv_heads,
    )
    args = (case.segment_lengths, case.dilation_rates)
    truth = dilated_attention_reference(q64, k64, v64, *args, **case.kwargs)
    assert_within_budget(out, dilated_attention_reference(q, k, v, *args, **case.kwargs), truth)


def test_bf16_at_64k_matches_math_backend_forward_and_backward() -> None:
    segments, rates = (2048, 4096, 8192), (1, 2, 4)
    q, k, v = (torch.randn(1, 4, 65536 + 77, 64, device="cuda") for _ in range(3))
    exact = [x.double().requires_grad_() for x in (q, k, v)]
    low = [x.bfloat16().requires_grad_() for x in (q, k, v)]
    truth = dilated_attention(*exact, segments, rates, is_causal=True, backend="math")
    out = dilated_attention(*low, segments, rates, is_causal=True, backend="flex")
    grad = torch.randn_like(truth)
    rel = lambda a, b: ((a.double() - b).norm() / b.norm()).item()
    assert rel(out, truth) < 1e-2
    for g, t in zip(
        torch.autograd.grad(out, low, grad.bfloat16()),
        torch.autograd.grad(truth, exact, grad),
        strict=True,
    ):
        assert rel(g, t) < 2e-2


def test_changing_lengths_do_not_fall_back_to_eager() -> None:
    for S in (4096, 5000, 6151, 8192, 9999, 12345):
        q, k, v = (torch.randn(1, 4, S, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        out = dilated_attention(q, k, v, (1024, 2048, 4096), (1, 2, 4), is_causal=True)
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("is_causal", [False, True])
def test_sequence_parallel_ranks_compiled_flex_bf16(is_causal: bool) -> None:
    # 4 ranks in this process (the all-to-all by split and cat): 256 is local to the 768-row
    # chunks, 1024 and 4096 span ranks (compact queries offset into their segments)
    config = DilatedConfig((256, 1024, 4096), (1, 4, 6))
    S = 4 * 768 - 2
    (q64, k64, v64), (q, k, v) = Case(
        config.segment_lengths, config.dilation_rates, 1, 4, 2, S, S, 64, 64, is_causal, "cyclic"
    ).inputs(torch.bfloat16, device="cuda", requires_grad=True)
    qb, kb, vb = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out, _ = run_ranks(q, k, v, config, world=4, is_causal=is_causal, backend="flex")
    args = (config.segment_lengths, config.dilation_rates)
    kwargs = {"is_causal": is_causal, "enable_gqa": True}
    truth = dilated_attention_reference(q64, k64, v64, *args, **kwargs)
    baseline = dilated_attention_reference(qb, kb, vb, *args, **kwargs)
    assert_within_budget(out, baseline, truth)
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad)
    truths = torch.autograd.grad(truth, (q64, k64, v64), grad.double())
    baselines = torch.autograd.grad(baseline, (qb, kb, vb), grad)
    for g, b, t in zip(grads, baselines, truths, strict=True):
        assert_within_budget(g, b, t, factor=4.0)
