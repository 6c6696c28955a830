"""Shared test helpers: random inputs, hypothesis strategies and the per-dtype error budget."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

settings.register_profile(
    "default", deadline=None, max_examples=40, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("default")

# The error budget (as FlashAttention's tests): a path's error against the float64 result may
# be at most `factor` times the error of plain PyTorch (the reference) in the same dtype, plus
# this absolute floor. Factor 2 for outputs, 4 for gradients.
ATOL = {
    torch.float64: 1e-10,
    torch.float32: 2e-6,
    torch.float16: 2e-3,
    torch.bfloat16: 1.5e-2,
}
LOW_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def assert_within_budget(
    actual: torch.Tensor, baseline: torch.Tensor, truth: torch.Tensor, *, factor: float = 2.0
) -> None:
    """``|actual - truth| <= factor * |baseline - truth| + atol`` (max norms; -inf == -inf)."""
    assert actual.shape == truth.shape, (actual.shape, truth.shape)
    a, b, t = (x.double() for x in (actual, baseline, truth))
    same_inf = torch.isinf(t) & (a == t)
    assert not torch.isnan(a).any(), "NaN in result"
    assert torch.equal(torch.isinf(a), torch.isinf(t)), "infinities differ"
    err = (a - t).masked_fill(same_inf, 0).abs().max().item() if a.numel() else 0.0
    base = (b - t).masked_fill(torch.isinf(t), 0).abs().max().item() if a.numel() else 0.0
    budget = factor * base + ATOL[actual.dtype]
    assert err <= budget, f"error {err:.3g} > budget {budget:.3g} (baseline {base:.3g})"


@dataclass(frozen=True)
class Case:
    """One drawn problem: a configuration and shapes."""

    segment_lengths: tuple[int, ...]
    dilation_rates: tuple[int, ...]
    batch: int
    q_heads: int
    kv_heads: int
    q_len: int
    kv_len: int
    head_dim: int
    value_dim: int
    is_causal: bool
    head_offsets: str

    @property
    def kwargs(self) -> dict[str, object]:
        return {
            "is_causal": self.is_causal,
            "enable_gqa": self.q_heads != self.kv_heads,
            "head_offsets": self.head_offsets,
        }

    def inputs(self, dtype: torch.dtype, device: str = "cpu", requires_grad: bool = False):
        """Fresh random ``q, k, v`` in float64 and the same values in ``dtype``."""
        shapes = [
            (self.batch, self.q_heads, self.q_len, self.head_dim),
            (self.batch, self.kv_heads, self.kv_len, self.head_dim),
            (self.batch, self.kv_heads, self.kv_len, self.value_dim),
        ]
        low = [torch.randn(s, device=device).to(dtype) for s in shapes]
        exact = [x.double().requires_grad_(requires_grad) for x in low]
        return exact, [x.clone().requires_grad_(requires_grad) for x in low]


@st.composite
def cases(
    draw: st.DrawFn,
    *,
    max_len: int = 48,
    same_lengths: bool = False,
    max_segment: int = 24,
    causal: bool | None = None,
) -> Case:
    branches = draw(st.integers(1, 3))
    segments = [draw(st.integers(1, max_segment)) for _ in range(branches)]
    rates = [draw(st.integers(1, min(w, 6))) for w in segments]
    kv_heads = draw(st.sampled_from([1, 2, 3]))
    q_len = draw(st.integers(1, max_len))
    return Case(
        segment_lengths=tuple(segments),
        dilation_rates=tuple(rates),
        batch=draw(st.integers(1, 2)),
        q_heads=kv_heads * draw(st.sampled_from([1, 2])),
        kv_heads=kv_heads,
        q_len=q_len,
        kv_len=q_len
        if same_lengths
        else draw(st.sampled_from([q_len, draw(st.integers(1, max_len))])),
        head_dim=draw(st.sampled_from([4, 8])),
        value_dim=draw(st.sampled_from([4, 6])),
        is_causal=draw(st.booleans()) if causal is None else causal,
        head_offsets=draw(st.sampled_from(["cyclic", "grouped"])),
    )


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def run_ranks(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    config,
    *,
    world: int,
    is_causal: bool,
    backend: str = "math",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank of a sequence-parallel run in this process, the all-to-all done by split and
    cat: the whole ``(B, H, S, D_v)`` output and lse, differentiable like the real thing."""
    from dilattn import _sequence_parallel as sp

    S = query.shape[2]
    chunk = -(-S // world)
    pad = [torch.nn.functional.pad(x, (0, 0, 0, chunk * world - S)) for x in (query, key, value)]
    chunks = [[x[:, :, i * chunk : (i + 1) * chunk] for x in pad] for i in range(world)]
    plans = [
        sp.plan(
            config,
            num_heads=query.shape[1],
            kv_heads=key.shape[1],
            chunk=chunk,
            world=world,
            rank=i,
            seq_len=S,
            is_causal=is_causal,
            device=query.device,
        )
        for i in range(world)
    ]
    for s in range(world):  # what s sends to d is what d expects from s
        assert [p.recv_splits[s] for p in plans] == list(plans[s].send_splits)
    sent = [
        sp.take_rows(k, v, p.send).split(list(p.send_splits))
        for (_, k, v), p in zip(chunks, plans, strict=True)
    ]
    results = [
        sp.attend_chunk(
            *chunks[d],
            torch.cat([sent[s][d] for s in range(world)]),
            config,
            plans[d],
            is_causal=is_causal,
            scale=query.shape[-1] ** -0.5,
            enable_gqa=query.shape[1] != key.shape[1],
            backend=backend,  # type: ignore[arg-type]
        )
        for d in range(world)
    ]
    out = torch.cat([o for o, _ in results], 2)[:, :, :S]
    return out, torch.cat([lse for _, lse in results], 2)[:, :, :S]
