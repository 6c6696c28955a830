"""How the branch path calls compiled FlexAttention: recompile limits and static shapes."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from dilattn import _branch
from dilattn._branch import RECOMPILE_LIMIT, _compiled_flex, _StaticShapes, _strict_recompile_limit


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
    """Shapes past ``STATIC_SHAPES`` run dynamic; a static recompile-limit hit sends its
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

    monkeypatch.setattr(_branch, "STATIC_SHAPES", 2)
    monkeypatch.setattr(_branch, "_static_shapes", _StaticShapes())
    monkeypatch.setattr(_branch, "_compile_flex", compile_flex)
    x = {n: torch.randn(1, 2, n, 8) for n in (64, 96, 128, 160)}
    for n in (64, 96, 128, 64, 96):
        _compiled_flex(x[n], x[n], x[n], {})
    assert calls == [(True, 64), (True, 96), (False, 128), (True, 64), (True, 96)]
    calls.clear()
    full["static"] = True  # the static kernel's variants are used up
    for n in (64, 160):
        _compiled_flex(x[n], x[n], x[n], {})
    full["static"] = False
    for n in (64, 96, 160):
        _compiled_flex(x[n], x[n], x[n], {})
    assert calls == [(False, 64), (False, 160), (False, 64), (True, 96), (False, 160)]
