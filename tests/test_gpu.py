"""GPU-only checks: compiled FlexAttention, backward through flex, half precision, long inputs.

Run on a CUDA machine with ``pytest -m gpu``; skipped elsewhere.
"""

from __future__ import annotations

import pytest
import torch
from conftest import Case, assert_within_budget, requires_cuda
from torch.nn.attention.flex_attention import flex_attention

from dilattn import dilated_attention, flex_mask
from dilattn.reference import dilated_attention_reference

pytestmark = [pytest.mark.gpu, requires_cuda]

CASES = [
    Case((256, 512, 1024), (1, 2, 4), 1, 4, 4, 1000, 1000, 64, 64, True, "cyclic"),
    Case((300, 700), (1, 6), 2, 4, 2, 777, 777, 32, 32, False, "cyclic"),
    Case((128, 512), (2, 12), 1, 6, 6, 513, 513, 64, 64, True, "grouped"),
]


SPLIT = Case((256, 512, 1024, 600), (1, 2, 4, 6), 2, 6, 6, 1500, 1500, 64, 64, True, "split")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    ("case", "backend"),
    [(c, "flex") for c in CASES] + [(c, "strided") for c in (*CASES, SPLIT)],
    ids=str,
)
def test_forward_and_backward(case: Case, backend: str, dtype: torch.dtype) -> None:
    """Compiled flex (gathered rows) and the strided path (cuDNN on views, Triton merge)."""
    (q64, k64, v64), (q, k, v) = case.inputs(dtype, device="cuda", requires_grad=True)
    args = (case.segment_lengths, case.dilation_rates)
    (qb, kb, vb) = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out = dilated_attention(q, k, v, *args, **case.kwargs, backend=backend)  # type: ignore[arg-type]
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


@pytest.mark.parametrize("backend", ["flex", "strided"])
def test_bf16_at_64k_matches_math_backend_forward_and_backward(backend: str) -> None:
    segments, rates = (2048, 4096, 8192), (1, 2, 6)
    q, k, v = (torch.randn(1, 4, 65536 + 77, 64, device="cuda") for _ in range(3))
    exact = [x.double().requires_grad_() for x in (q, k, v)]
    # (B, S, H, D) memory for the strided path: views of a model's projections
    low = [x.bfloat16().transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v)]
    low = [x.requires_grad_() for x in low]
    truth = dilated_attention(*exact, segments, rates, is_causal=True, backend="math")
    out = dilated_attention(*low, segments, rates, is_causal=True, backend=backend)  # type: ignore[arg-type]
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


def test_strided_path_compiles_fullgraph_forward_and_backward() -> None:
    """The strided path is a custom op: torch.compile keeps it whole, with its backward."""
    q, k, v = (
        torch.randn(2, 4, 3000, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        for _ in range(3)
    )
    args = ((512, 1024), (1, 3))
    compiled = torch.compile(
        lambda a, b, c: dilated_attention(a, b, c, *args, is_causal=True), fullgraph=True
    )
    out = compiled(q, k, v)
    eager = dilated_attention(q, k, v, *args, is_causal=True)
    torch.testing.assert_close(out, eager)
    grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
    eager_grads = torch.autograd.grad(eager.float().square().sum(), (q, k, v))
    for g, e in zip(grads, eager_grads, strict=True):
        torch.testing.assert_close(g, e)


@pytest.mark.parametrize("shape", [(1, 12, 3000, 64), (2, 4, 2500, 128)])
def test_small_calls_replay_cuda_graphs(shape: tuple[int, int, int, int], monkeypatch) -> None:
    """Graphed calls (small problems) are as exact as ungraphed ones, forward and backward,
    and a replay with new inputs gives their result (no stale copies)."""
    from dilattn import _graphs

    args = ((512, 1024, 2048), (1, 2, 6))
    for _ in range(2):  # the second round replays the cached graphs
        q64, k64, v64 = (torch.randn(shape, device="cuda", dtype=torch.float64) for _ in range(3))
        q, k, v = (x.bfloat16().requires_grad_() for x in (q64, k64, v64))
        truth = dilated_attention_reference(q64, k64, v64, *args, is_causal=True)
        baseline = dilated_attention_reference(
            q.detach(), k.detach(), v.detach(), *args, is_causal=True
        )
        grad = torch.randn_like(q)
        out = dilated_attention(q, k, v, *args, is_causal=True)
        grads = torch.autograd.grad(out, (q, k, v), grad)
        with monkeypatch.context() as patch:
            patch.setattr(_graphs, "MAX_ROWS", 0)
            plain = dilated_attention(q, k, v, *args, is_causal=True)
            plain_grads = torch.autograd.grad(plain, (q, k, v), grad)
        assert_within_budget(out, baseline, truth)
        assert_within_budget(plain, baseline, truth)
        torch.testing.assert_close(out, plain, atol=2e-2, rtol=1e-2)
        for g, p in zip(grads, plain_grads, strict=True):
            torch.testing.assert_close(g, p, atol=2e-2, rtol=1e-2)
    assert _graphs._cache  # the calls were graphed
