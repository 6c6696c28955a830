"""The sequence-parallel algorithm with every rank in one process (the all-to-all by split and
cat), against the single-device path; the exchange plan's properties."""

from __future__ import annotations

import pytest
import torch
from conftest import Case, cases, examples, run_ranks
from hypothesis import given
from hypothesis import strategies as st

from dilattn import DilatedConfig, dilated_attention
from dilattn.distributed import sequence_parallel as sp


def _config(case: Case) -> DilatedConfig:
    return DilatedConfig(case.segment_lengths, case.dilation_rates, case.head_offsets)  # type: ignore[arg-type]


def _single_device(case: Case, q, k, v, backend: str = "math"):
    args = (q, k, v, case.segment_lengths, case.dilation_rates)
    return dilated_attention(*args, **case.kwargs, return_lse=True, backend=backend)


worlds = st.integers(1, 4)


@given(
    case=cases(same_lengths=True),
    world=worlds,
    dtype=st.sampled_from([torch.float64, torch.float32]),
)
def test_ranks_together_equal_single_device(case: Case, world: int, dtype: torch.dtype) -> None:
    _, (q, k, v) = case.inputs(dtype)
    out, lse = run_ranks(q, k, v, _config(case), world=world, is_causal=case.is_causal)
    ref, ref_lse = _single_device(case, q, k, v)
    assert out.dtype == dtype
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(lse, ref_lse)


@given(case=cases(max_len=32, same_lengths=True), world=worlds)
def test_gradients_reach_the_owners(case: Case, world: int) -> None:
    (q, k, v), _ = case.inputs(torch.float64, requires_grad=True)
    out, _ = run_ranks(q, k, v, _config(case), world=world, is_causal=case.is_causal)
    ref, _ = _single_device(case, q, k, v)
    grad = torch.randn_like(ref)
    grads = torch.autograd.grad(out, (q, k, v), grad)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-9)


@examples(5)  # eager flex on CPU is slow
@given(case=cases(max_len=32, same_lengths=True), world=st.integers(2, 4))
def test_flex_backend_forward(case: Case, world: int) -> None:
    _, (q, k, v) = case.inputs(torch.float32)
    out, _ = run_ranks(
        q, k, v, _config(case), world=world, is_causal=case.is_causal, backend="flex"
    )
    torch.testing.assert_close(out, _single_device(case, q, k, v)[0])


def _plans(
    config: DilatedConfig, *, world: int, chunk: int, heads: int = 2, **kw
) -> list[sp.RankPlan]:
    return [
        sp.plan(
            config,
            num_heads=heads,
            kv_heads=heads,
            chunk=chunk,
            world=world,
            rank=i,
            seq_len=kw.get("seq_len", world * chunk),
            is_causal=kw.get("is_causal", False),
            device=torch.device("cpu"),
        )
        for i in range(world)
    ]


@given(case=cases(same_lengths=True), world=st.integers(2, 4))
def test_causal_runs_receive_only_from_earlier_ranks(case: Case, world: int) -> None:
    chunk = -(-case.q_len // world)
    plans = _plans(_config(case), world=world, chunk=chunk, seq_len=case.q_len, is_causal=True)
    for rank, p in enumerate(plans):
        assert not any(p.recv_splits[rank:]), (rank, p.recv_splits)


@pytest.mark.parametrize("is_causal", [False, True])
def test_received_rows_stay_constant_as_ranks_grow(is_causal: bool) -> None:
    # weak scaling: fixed chunk, segments up to 8 chunks; a rank receives the dilated rows of
    # its segments, whatever the number of ranks
    C, config = 24, DilatedConfig((12, 48, 96, 192), (1, 2, 4, 8))
    most = {
        world: max(
            sum(p.recv_splits) for p in _plans(config, world=world, chunk=C, is_causal=is_causal)
        )
        for world in (2, 4, 8, 16)
    }
    bound = 2 * sum((w - C) // r + 1 for w, r in config.branches if w > C)  # 2 heads
    assert all(rows <= bound for rows in most.values()), (most, bound)
    assert most[8] == most[16]


def test_local_branches_exchange_nothing() -> None:
    plans = _plans(DilatedConfig((4, 8, 16), (1, 2, 4)), world=3, chunk=16)
    assert not any(p.exchange or p.spanning or any(p.send_splits) for p in plans)
    assert all(p.local == (0, 1, 2) for p in plans)


def test_rows_several_branches_need_are_sent_once() -> None:
    one = _plans(DilatedConfig((32,), (2,)), world=4, chunk=8)
    twice = _plans(DilatedConfig((32, 32, 16), (2, 2, 2)), world=4, chunk=8)  # 16: a subset
    for a, b in zip(one, twice, strict=True):
        assert a.send_splits == b.send_splits and torch.equal(a.send.positions, b.send.positions)
    assert sum(sum(p.send_splits) for p in one) == 4 * 2 * (32 - 8) // 2  # heads x rows


@pytest.mark.parametrize(
    ("seq_len", "chunk", "w", "expected"),
    [
        (64, 16, 8, True),
        (64, 16, 16, True),
        (64, 16, 12, False),
        (64, 16, 32, False),
        (10, 16, 32, True),
        (40, 16, 64, False),
        (48, 16, 48, False),
    ],
)
def test_which_branches_are_local(seq_len: int, chunk: int, w: int, expected: bool) -> None:
    assert sp.is_local(w, chunk, seq_len) is expected
