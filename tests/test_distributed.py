"""dilattn.distributed on real process groups: one spawn of 4 gloo processes on the CPU runs
every case, on the first 2, 3 or 4 ranks; each case is then checked here on its own.

Each rank computes the single-process result on the whole sequence itself; its rows and its
gradients of q, k and v are checked against it. The math backend, and the strided one (its CPU
version) for the local branches of some cases, which then get gradients through their lse;
the flex backend runs the same exchange (tests/test_sequence_parallel.py checks it with every
rank in one process).
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import ATOL, assert_within_budget, requires_cuda

from dilattn import dilated_attention
from dilattn.distributed import (
    ParallelDilatedAttention,
    dilated_attention_parallel,
    exchanged_bytes,
    gather_sequence,
    shard_sequence,
)
from dilattn.reference import dilated_attention_reference

WORLD = 4


@dataclass(frozen=True)
class DistCase:
    world: int
    seq_len: int
    segment_lengths: tuple[int, ...]
    dilation_rates: tuple[int, ...]
    q_heads: int = 2
    kv_heads: int = 2
    is_causal: bool = False
    head_offsets: str = "cyclic"
    dtype: torch.dtype = torch.float64
    batch: int = 2
    backend: str = "auto"  # the local branches' (math on CPU; strided: gradients through its lse)

    @property
    def kwargs(self) -> dict[str, object]:
        return {
            "is_causal": self.is_causal,
            "enable_gqa": self.q_heads != self.kv_heads,
            "head_offsets": self.head_offsets,
        }


def _cases() -> list[DistCase]:
    """Fixed cases for each k (chunk C = ceil(S / k)): segments smaller than, equal to, larger
    than a chunk and not dividing it, w % r != 0, padding, GQA; then seeded random ones."""
    fixed = []
    for k in (2, 3, 4):
        C = 12
        fixed += [
            DistCase(k, k * C, (C // 2, C, 2 * C), (1, 2, 4)),  # smaller, equal, larger
            DistCase(k, k * C, (5, 3 * C, k * C), (1, 3, 5), is_causal=True),  # 5 crosses chunks
            DistCase(k, k * C - 1, (7, 30), (2, 6), q_heads=4, kv_heads=2),  # padding, GQA
            DistCase(k, k * C - k + 1, (C, 40), (1, 12), q_heads=6, kv_heads=2, is_causal=True),
            DistCase(k, 2 * k + 1, (3, 64), (1, 2), is_causal=True, head_offsets="grouped"),
        ]
    rng = random.Random(5)
    drawn = []
    for i in range(18):
        k = (2, 3, 4)[i % 3]
        S = rng.randint(k, 48)
        C = -(-S // k)
        segments = tuple(
            rng.choice([max(1, C // 2), C, C + 1, 2 * C, S, rng.randint(1, S)])
            for _ in range(rng.randint(1, 3))
        )
        kv = rng.choice([1, 2])
        drawn.append(
            DistCase(
                k,
                S,
                segments,
                tuple(rng.randint(1, min(w, 6)) for w in segments),
                q_heads=kv * rng.choice([1, 2]),
                kv_heads=kv,
                is_causal=rng.random() < 0.5,
                head_offsets=rng.choice(["cyclic", "grouped"]),
            )
        )
    cases = fixed + drawn
    cases += [replace(c, dtype=torch.float32) for c in cases[::2]]
    cases += [replace(c, backend="strided") for c in fixed[:10]]
    return cases


CASES = _cases()


def _run_case(case: DistCase, seed: int, group: dist.ProcessGroup) -> dict[str, object]:
    """This rank's output and q/k/v gradients, each with its rows of the single-process
    result in the same dtype (the baseline) and in float64 (the truth)."""
    gen = torch.Generator().manual_seed(seed)
    B, S = case.batch, case.seq_len
    shapes = [(B, case.q_heads, S, 8), (B, case.kv_heads, S, 8), (B, case.kv_heads, S, 6)]
    full = [torch.randn(s, generator=gen, dtype=torch.float64).to(case.dtype) for s in shapes]
    grad_full = torch.randn(B, case.q_heads, S, 6, generator=gen, dtype=torch.float64)
    exact = [x.double().requires_grad_() for x in full]
    baseline = [x.clone().requires_grad_() for x in full]
    local = [shard_sequence(x, group=group).requires_grad_() for x in full]
    args = (case.segment_lengths, case.dilation_rates)
    out = dilated_attention_parallel(
        *local, *args, **case.kwargs, group=group, seq_len=S, backend=case.backend
    )
    results: dict[str, object] = {}

    def record(name: str, mine, base, truth) -> None:
        results[name] = (
            mine.detach(),
            shard_sequence(base.detach(), group=group),
            shard_sequence(truth.detach(), group=group),
        )

    truth = dilated_attention(*exact, *args, **case.kwargs, backend="math")
    base = dilated_attention(*baseline, *args, **case.kwargs, backend="math")
    record("out", out, base, truth)
    grad_local = shard_sequence(grad_full.to(case.dtype), group=group)
    # a rank holding only padding has outputs that do not depend on its query
    grads = torch.autograd.grad(out, local, grad_local, allow_unused=True)
    grads = [torch.zeros_like(x) if g is None else g for x, g in zip(local, grads, strict=True)]
    truths = torch.autograd.grad(truth, exact, grad_full)
    bases = torch.autograd.grad(base, baseline, grad_full.to(case.dtype))
    for name, g, b, t in zip(("dq", "dk", "dv"), grads, bases, truths, strict=True):
        record(name, g, b, t)
    return results


def _checks(group: dist.ProcessGroup, rank: int) -> dict[str, object]:
    """Helpers, module and errors, on the first 3 ranks."""
    found: dict[str, object] = {}
    x = torch.randn(2, 3, 10, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    chunk = shard_sequence(x, group=group).requires_grad_()
    assert chunk.shape == (2, 3, 4, 4)  # 10 positions padded to 12, 4 per rank
    whole = gather_sequence(chunk, seq_len=10, group=group)
    found["gather"] = torch.equal(whole, x)
    whole.sum().backward()  # a loss on each rank: each row's gradient is 3, padding's 0
    expected = shard_sequence(torch.full_like(x, 3.0), group=group)
    found["gather_grad"] = torch.equal(chunk.grad, expected)
    q, k, v = (shard_sequence(y, group=group) for y in (x, x.flip(2), x * 2))
    attn = ParallelDilatedAttention([3, 8], [1, 2], group=group, is_causal=True)
    found["module"] = torch.equal(
        attn(q, k, v, seq_len=10),
        dilated_attention_parallel(
            q, k, v, [3, 8], [1, 2], group=group, seq_len=10, is_causal=True
        ),
    )
    found["repr"] = "segment_lengths=[3, 8]" in repr(attn)
    found["bytes"] = tuple(
        exchanged_bytes(q, k, v, [3, 8], [1, 2], group=group, seq_len=10, is_causal=True)
    )
    for name, call in {
        "seq_len_zero": lambda: dilated_attention_parallel(
            q, k, v, [4], [1], group=group, seq_len=0
        ),
        "seq_len_long": lambda: dilated_attention_parallel(
            q, k, v, [4], [1], group=group, seq_len=13
        ),
        "seq_len_type": lambda: dilated_attention_parallel(
            q, k, v, [4], [1], group=group, seq_len=4.0
        ),
        "lengths": lambda: dilated_attention_parallel(
            q, k[:, :, :3], v[:, :, :3], [4], [1], group=group
        ),
        "group_type": lambda: dilated_attention_parallel(q, k, v, [4], [1], group="world"),
        "module_group": lambda: ParallelDilatedAttention([4], [1], group=3),
    }.items():
        try:
            call()
            found[name] = "no error"
        except (TypeError, ValueError) as error:
            found[name] = f"{type(error).__name__}: {error}"
    return found


def _worker(rank: int, store: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    groups = {k: dist.new_group(list(range(k))) for k in (2, 3)}
    groups[WORLD] = dist.group.WORLD
    results: dict[object, object] = {}
    for i, case in enumerate(CASES):
        if rank < case.world:
            results[i] = _run_case(case, seed=i, group=groups[case.world])
    if rank < 3:
        results["checks"] = _checks(groups[3], rank)
    else:  # not a member of the 3-rank group
        q = torch.randn(1, 1, 4, 4)
        try:
            dilated_attention_parallel(q, q, q, [4], [1], group=groups[3])
            results["outsider"] = "no error"
        except ValueError as error:
            results["outsider"] = str(error)
    torch.save(results, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[object, object]]:
    out_dir = tmp_path_factory.mktemp("distributed")
    mp.start_processes(
        _worker, args=(str(out_dir / "store"), str(out_dir)), nprocs=WORLD, start_method="spawn"
    )
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _case_id(case: DistCase) -> str:
    dtype = str(case.dtype).removeprefix("torch.")
    return (
        f"k{case.world}-S{case.seq_len}-w{'_'.join(map(str, case.segment_lengths))}"
        f"-r{'_'.join(map(str, case.dilation_rates))}-H{case.q_heads}_{case.kv_heads}"
        f"{'-causal' if case.is_causal else ''}-{case.head_offsets}-{dtype}-{case.backend}"
    )


@pytest.mark.parametrize("index", range(len(CASES)), ids=[_case_id(c) for c in CASES])
def test_ranks_match_single_process(ranks, index: int) -> None:
    case = CASES[index]
    for rank in range(case.world):
        for name, (mine, base, truth) in ranks[rank][index].items():
            factor = 2.0 if name == "out" else 4.0
            if case.dtype == torch.float64:
                torch.testing.assert_close(mine, truth, rtol=0, atol=ATOL[torch.float64] * 10)
            else:
                assert_within_budget(mine, base, truth, factor=factor)


def test_helpers_module_and_errors(ranks) -> None:
    for rank in range(3):
        found = ranks[rank]["checks"]
        assert found["gather"] and found["gather_grad"] and found["module"] and found["repr"]
        assert "ValueError: seq_len must be in [1, 12]" in found["seq_len_zero"]
        assert "ValueError: seq_len must be in [1, 12]" in found["seq_len_long"]
        assert "TypeError: seq_len must be an int" in found["seq_len_type"]
        assert "ValueError: query, key and value must hold the same positions" in found["lengths"]
        assert "TypeError: group must be a torch.distributed ProcessGroup" in found["group_type"]
        assert "TypeError: group must be" in found["module_group"]
    assert "not a member of group" in ranks[3]["outsider"]
    sent = [ranks[r]["checks"]["bytes"][0] for r in range(3)]
    received = [ranks[r]["checks"]["bytes"][1] for r in range(3)]
    assert sum(sent) == sum(received) > 0 and received[0] == 0  # causal: rank 0 receives nothing


def test_needs_an_initialised_process_group() -> None:
    q = torch.randn(1, 1, 4, 4)
    with pytest.raises(RuntimeError, match="not initialized"):
        dilated_attention_parallel(q, q, q, [4], [1])


def test_example_runs_under_torchrun() -> None:
    example = Path(__file__).parents[1] / "examples" / "sequence_parallel.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    done = subprocess.run(
        [*cmd, str(example)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        cwd=example.parents[1],
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "matches the single-process result" in done.stdout


@pytest.mark.gpu
@requires_cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_nccl_bf16_flex_forward_and_backward(tmp_path: Path) -> None:
    world = min(4, torch.cuda.device_count())
    mp.start_processes(_gpu_worker, args=(world, str(tmp_path)), nprocs=world, start_method="spawn")


def _gpu_worker(rank: int, world: int, out_dir: str) -> None:
    os.environ["NCCL_NVLS_ENABLE"] = "0"
    torch.cuda.set_device(rank)
    store = f"file://{out_dir}/store"
    dist.init_process_group("nccl", init_method=store, rank=rank, world_size=world)
    segments, rates = (256, 1024, 4096), (1, 4, 6)  # 1024 and 4096 span the 1536-row chunks
    S = 1536 * world - 5
    gen = torch.Generator().manual_seed(0)
    full = [torch.randn(1, 4, S, 64, generator=gen) for _ in range(3)]
    grad = torch.randn(1, 4, S, 64, generator=gen).cuda()
    for is_causal in (False, True):
        kwargs = {"is_causal": is_causal}
        exact = [x.double().cuda().requires_grad_() for x in full]
        low = [x.bfloat16().cuda().requires_grad_() for x in full]
        local = [shard_sequence(x.detach()).requires_grad_() for x in low]
        out = dilated_attention_parallel(*local, segments, rates, seq_len=S, **kwargs)
        truth = dilated_attention_reference(*exact, segments, rates, **kwargs)
        base = dilated_attention_reference(*low, segments, rates, **kwargs)
        assert_within_budget(out, shard_sequence(base), shard_sequence(truth))
        grads = torch.autograd.grad(out, local, shard_sequence(grad.bfloat16()))
        truths = torch.autograd.grad(truth, exact, grad.double())
        bases = torch.autograd.grad(base, low, grad.bfloat16())
        for mine, b, t in zip(grads, bases, truths, strict=True):
            assert_within_budget(mine, shard_sequence(b), shard_sequence(t), factor=4.0)
    dist.destroy_process_group()
