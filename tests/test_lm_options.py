"""LongNetLM options: per-layer head plans, reversible layers, chunked feed-forward."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable

import pytest
import torch
from conftest import requires_cuda
from torch import Tensor, nn

from dilattn import LongNet, LongNetConfig, LongNetLM
from dilattn.nn.mixed import HeadCounts, MixedHeadAttention
from dilattn.nn.models import Block
from dilattn.nn.reversible import couple, couple_reversibly

TINY = {"d_model": 32, "num_heads": 4, "num_layers": 3, "ffn_dim": 48}
BRANCHES = {"segment_lengths": (4, 8), "dilation_rates": (1, 2)}
PLAN = (HeadCounts(local=4), HeadCounts(1, 1, 2), HeadCounts(dilated=4))  # local at the bottom


def _lm(dtype: torch.dtype = torch.float64, **options: object) -> LongNetLM:
    config = LongNetConfig(**TINY, **BRANCHES, **options)  # type: ignore[arg-type]
    model = LongNetLM(37, config, dtype=dtype)
    for p in model.parameters():  # random everywhere: unit LayerNorms would hide mistakes
        nn.init.normal_(p, std=0.3)
    return model


def _output_and_grads(
    model: LongNetLM, tokens: Tensor, run: Callable[[Tensor], Tensor] | None = None
) -> tuple[Tensor, list]:
    """``run(tokens)`` (default: the model) and the gradients of all parameters."""
    torch.manual_seed(0)
    out = (model if run is None else run)(tokens)
    return out, list(torch.autograd.grad(out.square().sum(), list(model.parameters())))


def _assert_same(a: tuple[Tensor, list], b: tuple[Tensor, list], **tolerance: float) -> None:
    torch.testing.assert_close(a[0], b[0], **tolerance)
    for g, h in zip(a[1], b[1], strict=True):
        torch.testing.assert_close(g, h, **tolerance)


def test_head_plan_builds_the_layers_it_names() -> None:
    model = _lm(head_plan=PLAN, num_kv_heads=1)
    kinds = [(type(b.self_attn), getattr(b.self_attn, "head_counts", None)) for b in model.blocks]
    assert kinds == [
        (MixedHeadAttention, (4, 0, 0)),
        (MixedHeadAttention, (1, 1, 2)),
        (type(model.blocks[2].self_attn), None),
    ]
    assert not isinstance(model.blocks[2].self_attn, MixedHeadAttention)
    config = LongNetConfig(**TINY, **BRANCHES, head_plan=(2, 0, 2))  # one for every layer
    assert config.head_plan == (HeadCounts(2, 0, 2),) * 3


@pytest.mark.parametrize(
    ("plan", "match"),
    [
        ((4, 0), r"head_plan\[0\] must be 3 non-negative integers \('local', 'dilated', 'l"),
        (((0, 4, 0),) * 2, r"one HeadCounts\(local, dilated, linear\) or one per layer \(3\)"),
        (((4, 0, 0), (3, 0, 0), (4, 0, 0)), r"head_plan\[1\] must add up to num_heads \(4\)"),
        (((4, 0, 0), (0, -1, 5), (4, 0, 0)), r"head_plan\[1\] must be 3 non-negative"),
        ((1, 3, 0), r"multiple of 2 heads, got 1 local heads"),
        ("ldl", r"one HeadCounts\(local, dilated, linear\) or one per layer"),
    ],
)
def test_bad_head_plans_raise(plan: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        LongNetConfig(**TINY, **BRANCHES, num_kv_heads=2, head_plan=plan)  # type: ignore[arg-type]


def test_mixed_lm_trains_and_generates_as_the_full_forward() -> None:
    torch.manual_seed(0)
    model = _lm(
        torch.float32, head_plan=PLAN, num_kv_heads=1, ff_chunks=2, reversible=True,
        local_window_size=5,
    )  # fmt: skip
    data = torch.randint(0, 37, (4, 24))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        logits = model(data[:, :-1])
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), data[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3, losses  # it learns the batch
    model.eval()
    tokens = torch.randint(0, 37, (2, 30))
    caches = model.new_kv_caches(2, 30)
    with torch.no_grad():
        full = model(tokens)
        steps = [model(tokens[:, :9], kv_caches=caches)]
        steps += [model(tokens[:, t : t + 1], kv_caches=caches) for t in range(9, 30)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-4, rtol=1e-4)
    greedy = model.generate(tokens[:, :9], 12, temperature=0)
    with torch.no_grad():
        torch.testing.assert_close(greedy[:, 9:], model(greedy[:, :-1])[:, 8:].argmax(-1))


def _plain_reversible_lm(model: LongNetLM, tokens: Tensor) -> Tensor:
    """The reversible LM as ordinary autograd code: the doubled stream ``(x, x)``, each block
    ``y1 = x1 + f(x2)``, ``y2 = x2 + g(y1)``, then ``(y1 + y2) / 2``, the final norm and the
    tied head."""
    x = model.embedding(tokens)
    layers = []
    for block in model.blocks:
        assert isinstance(block, Block)
        layers.append(block._coupling())
    y1, y2 = couple(x, x, layers)
    return model.norm((y1 + y2) / 2) @ model.embedding.weight.T


@pytest.mark.parametrize("options", [{"dropout": 0.2}, {"head_plan": PLAN, "ff_chunks": 3}])
def test_reversible_layers_equal_the_same_coupling_run_as_ordinary_code(options: dict) -> None:
    """Outputs and the gradients of every parameter, float64, tight tolerance; with dropout
    the random state of each branch is replayed in backward."""
    model = _lm(reversible=True, **options)
    tokens = torch.randint(0, 37, (2, 19))
    reversible = _output_and_grads(model, tokens)
    plain = _output_and_grads(model, tokens, lambda t: _plain_reversible_lm(model, t))
    _assert_same(reversible, plain, atol=1e-10, rtol=1e-9)
    with torch.no_grad():
        torch.manual_seed(0)
        torch.testing.assert_close(model(tokens), reversible[0], atol=1e-12, rtol=0)


def test_reversible_layers_recompute_in_backward_and_give_input_gradients() -> None:
    """Also with frozen parameters (they get no gradient, the others theirs)."""
    model = _lm(reversible=True)
    model.blocks[1].ffn.requires_grad_(False)
    calls: list[int] = []
    for block in model.blocks:
        block.ffn.register_forward_pre_hook(lambda *_: calls.append(1))
    x = torch.randn(2, 11, 32, dtype=torch.float64, requires_grad=True)
    layers = [block._coupling() for block in model.blocks]
    inputs = [x, *(p for p in model.blocks.parameters() if p.requires_grad)]
    loss = lambda y: y[0].square().sum() + y[1].square().sum()
    y = couple_reversibly(x, x, layers)
    assert len(calls) == 3
    grads = torch.autograd.grad(loss(y), inputs)
    assert len(calls) == 6  # each feed-forward again in backward
    for g, expected in zip(
        grads, torch.autograd.grad(loss(couple(x, x, layers)), inputs), strict=True
    ):
        torch.testing.assert_close(g, expected, atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("ff_chunks", [2, 5, 40])
def test_chunked_feed_forward_gives_the_same_outputs_and_gradients(ff_chunks: int) -> None:
    """Also more chunks than positions (the sequence is cut in as many as it has)."""
    model = _lm(activation="swiglu")
    chunked = copy.deepcopy(model)
    for block in chunked.blocks:
        block.ffn.chunks = ff_chunks
    tokens = torch.randint(0, 37, (2, 19))
    _assert_same(_output_and_grads(chunked, tokens), _output_and_grads(model, tokens))
    calls: list[int] = []
    chunked.blocks[0].ffn.up.register_forward_pre_hook(lambda *_: calls.append(1))
    chunked(tokens).sum().backward()
    pieces = len(torch.arange(19).chunk(ff_chunks))
    assert len(calls) == 2 * pieces  # each chunk once forward, once recomputed in backward


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"reversible": True, "norm_first": False}, "reversible=True needs pre-norm"),
        ({"reversible": True, "activation_checkpointing": True}, "reversible=True needs"),
        ({"ff_chunks": 0}, "ff_chunks must be a positive integer"),
        ({"linear_chunk_size": -1}, "linear_chunk_size must be a positive integer"),
        ({"local_window_size": 0}, "local_window_size must be a positive integer"),
    ],
)
def test_bad_options_raise(options: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        LongNetConfig(**TINY, **BRANCHES, **options)


def test_longnet_refuses_reversible_and_takes_head_plans() -> None:
    config = LongNetConfig(**TINY, **BRANCHES, reversible=True)
    with pytest.raises(ValueError, match="reversible=True is for LongNetLM"):
        LongNet(config)
    model = LongNet(dataclasses.replace(config, reversible=False, head_plan=PLAN))
    assert isinstance(model.encoder[0].self_attn, MixedHeadAttention)
    assert not isinstance(model.decoder[0].cross_attn, MixedHeadAttention)
    out = model(torch.randn(2, 9, 32), torch.randn(2, 7, 32))
    assert out.shape == (2, 7, 32) and torch.isfinite(out).all()


@pytest.mark.gpu
@requires_cuda
def test_mixed_reversible_lm_on_cuda() -> None:
    """On CUDA (local and dilated heads on compiled flex): reversible layers give the
    gradients of the plain coupling in float32, a bf16-autocast training step is finite, and
    decoding equals the full forward."""
    torch.manual_seed(0)
    config = LongNetConfig(
        d_model=256, num_heads=8, num_layers=3, ffn_dim=512, num_kv_heads=2,
        segment_lengths=(64, 128), dilation_rates=(1, 2), local_window_size=64, ff_chunks=3,
        head_plan=(HeadCounts(local=8), HeadCounts(4, 4, 0), HeadCounts(0, 4, 4)),
        reversible=True, dropout=0.1,
    )  # fmt: skip
    model = LongNetLM(256, config, device="cuda")
    tokens = torch.randint(0, 256, (2, 500), device="cuda")
    reversible = _output_and_grads(model, tokens)
    plain = _output_and_grads(model, tokens, lambda t: _plain_reversible_lm(model, t))
    for got, want in zip((reversible[0], *reversible[1]), (plain[0], *plain[1]), strict=True):
        # float32: inverting the coupling rounds (gradients reach ~4e3; CPU float64: 1e-13)
        assert (got - want).norm() <= 2e-4 * want.norm()
    with torch.autocast("cuda", torch.bfloat16):
        logits = model(tokens[:, :-1])
    loss = nn.functional.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    model.eval()
    caches = model.new_kv_caches(2, 500)
    with torch.no_grad():
        full = model(tokens)
        steps = [model(tokens[:, :300], kv_caches=caches)]
        steps += [model(tokens[:, t : t + 1], kv_caches=caches) for t in range(300, 320)]
    torch.testing.assert_close(torch.cat(steps, 1), full[:, :320], atol=1e-3, rtol=1e-3)


def test_reversible_lm_under_torch_compile_equals_eager() -> None:
    """``torch.compile`` breaks its graph around the reversible stack (it reads the random
    state; its backward calls ``autograd.grad``) and gives the eager results."""
    model = _lm(head_plan=PLAN, reversible=True, ff_chunks=2)
    tokens = torch.randint(0, 37, (2, 19))
    compiled = torch.compile(model, backend="aot_eager")
    _assert_same(_output_and_grads(model, tokens), _output_and_grads(model, tokens, compiled))
