"""How the branch path calls compiled FlexAttention: recompile limits and static shapes."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask

from dilattn.engines import gather
from dilattn.engines.gather import (
    RECOMPILE_LIMIT,
    _compiled_flex,
    _kernel_options,
    _StaticShapes,
    _strict_recompile_limit,
)


def test_strict_recompile_limit_raises_the_limit_and_restores_it() -> None:
    config = torch._dynamo.config
    with config.patch(recompile_limit=3, fail_on_recompile_limit_hit=False):
        with _strict_recompile_limit():
            assert config.recompile_limit == RECOMPILE_LIMIT
            assert config.fail_on_recompile_limit_hit
        assert (config.recompile_limit, config.fail_on_recompile_limit_hit) == (3, False)


def test_first_shapes_run_static_until_their_variants_run_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Shapes past ``STATIC_SHAPES`` run dynamic, as do calls of fewer query rows than a
    block (decoding steps), which take no slot; a static recompile-limit hit sends its
    shape, and every new one, to the dynamic kernel; admitted shapes stay static."""
    calls: list[tuple[bool, int]] = []
    full = {"static": False}

    def compile_flex(static: bool) -> Any:
        def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **options: Any) -> Any:
            if static and full["static"]:
                raise torch._dynamo.exc.FailOnRecompileLimitHit("full")
            calls.append((static, q.shape[2]))
            return q, None

        return run

    monkeypatch.setattr(gather, "STATIC_SHAPES", 2)
    monkeypatch.setattr(gather, "_static_shapes", _StaticShapes())
    monkeypatch.setattr(gather, "_compile_flex", compile_flex)
    x = {n: torch.randn(1, 2, n, 8) for n in (1, 127, 128, 160, 192, 224)}
    for n in (1, 127):  # decoding steps against 128 keys
        _compiled_flex(x[n], x[128], x[128], {})
    for n in (128, 160, 192, 128, 160):
        _compiled_flex(x[n], x[n], x[n], {})
    static = [(True, 128), (True, 160)]
    assert calls == [(False, 1), (False, 127), *static, (False, 192), *static]
    calls.clear()
    full["static"] = True  # the static kernel's variants are used up
    for n in (128, 224):
        _compiled_flex(x[n], x[n], x[n], {})
    full["static"] = False
    for n in (128, 160, 224):
        _compiled_flex(x[n], x[n], x[n], {})
    assert calls == [(False, 128), (False, 224), (False, 128), (True, 160), (False, 224)]


@pytest.mark.parametrize(
    ("q_rows", "heads", "forced"),
    [
        (64, (8, 2), True),
        (100, (4, 2), True),
        (1, (16, 1), False),
        (64, (4, 2), False),
        (128, (8, 1), False),
        (127, (1, 1), False),
    ],
)
def test_short_gqa_calls_avoid_the_flex_decoding_kernel(
    q_rows: int, heads: tuple[int, int], forced: bool
) -> None:
    """Under a query block, a key head's query heads packed into more rows than a block are
    sent to flex's main kernel (inductor's decoding kernel has no config for them)."""
    q, k = torch.randn(1, heads[0], q_rows, 16), torch.randn(1, heads[1], 256, 16)
    mask = create_block_mask(lambda b, h, m, n: m >= 0, None, None, q_rows, 256, device="cpu")
    assert (_kernel_options(q, k, mask) is not None) == forced


def test_branch_block_masks_are_built_once_and_kept_clean_of_call_masks() -> None:
    """Eager flex reuses each branch's block mask across calls of one shape; a call's own
    padding is and-ed into a copy, so the next call's padding is not mixed with it."""
    from dilattn import dilated_attention
    from dilattn.reference import dilated_attention_reference

    gather._cached_block_mask.cache_clear()
    q, k, v = (torch.randn(2, 4, 300, 16, dtype=torch.float64) for _ in range(3))
    args = ((64, 128), (1, 2))
    for keep in (torch.rand(2, 300) > 0.3, torch.rand(2, 300) > 0.6, None):
        kw: dict[str, Any] = {"is_causal": True, "key_padding_mask": keep}
        out = dilated_attention(q, k, v, *args, **kw, backend="flex")
        truth = dilated_attention_reference(q, k, v, *args, **kw)
        torch.testing.assert_close(out, truth)
    info = gather._cached_block_mask.cache_info()
    assert (info.misses, info.hits) == (4, 2)  # per branch: partial once, full once
