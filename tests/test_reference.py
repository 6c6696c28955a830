"""The reference against the definition itself: brute force and the special cases."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import Case, cases, extras
from hypothesis import given
from hypothesis import strategies as st

from dilattn.config import DilatedConfig
from dilattn.reference import (
    branch_mask,
    dilated_attention_dense,
    dilated_attention_reference,
    linear_attention_reference,
    local_attention_reference,
    local_mask,
    multiplicity,
)


def _brute_force(
    q, k, v, config: DilatedConfig, is_causal: bool, extras: dict | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The definition in scalar loops: per branch, per head, per query, the visible keys.
    Returns the output and the log of the total denominator."""
    extras = extras or {}
    B, H, S, _ = q.shape
    offset = extras.get("q_offset", 0)
    padding = extras.get("key_padding_mask")
    documents = extras.get("document_ids")
    if "cu_seqlens" in extras:
        cuts = extras["cu_seqlens"].tolist()
        documents = torch.tensor(
            [[sum(c <= p for c in cuts[1:]) for p in range(cuts[-1])]] * B
        )  # document i holds [cuts[i], cuts[i + 1])
    score_mod = extras.get("score_mod") or (lambda score, b, h, q_idx, kv_idx: score)
    out = torch.zeros(B, H, S, v.shape[-1], dtype=q.dtype)
    lse = torch.full((B, H, S), -torch.inf, dtype=q.dtype)
    scale = q.shape[-1] ** -0.5
    for b, h, i in itertools.product(range(B), range(H), range(S)):
        p = offset + i
        denominators, outputs = [], []
        for (w, r), offsets in zip(config.branches, config.offsets(H), strict=True):
            start = p // w * w
            if (p - start) % r != offsets[h]:
                continue
            keys = [
                t
                for t in range(start, min(start + w, k.shape[2]))
                if (t - start) % r == offsets[h]
                and (t <= p or not is_causal)
                and (padding is None or not padding[b, t])
                and (documents is None or documents[b, p] == documents[b, t])
            ]
            if not keys:
                continue
            index = [torch.tensor(x) for x in (b, h, p)]
            e = torch.stack(
                [
                    torch.exp(score_mod(q[b, h, i] @ k[b, h, t] * scale, *index, torch.tensor(t)))
                    for t in keys
                ]
            )
            denominators.append(e.sum())
            outputs.append((e[:, None] * v[b, h, keys]).sum(0) / e.sum())
        if denominators:
            total = sum(denominators)
            out[b, h, i] = sum(s / total * o for s, o in zip(denominators, outputs, strict=True))
            lse[b, h, i] = torch.log(total)
    return out, lse


@given(case=cases(max_len=14, same_lengths=True, max_segment=10))
def test_reference_equals_brute_force_definition(case: Case) -> None:
    (q, k, v), _ = case.inputs(torch.float64)
    k, v = (x.repeat_interleave(case.q_heads // case.kv_heads, 1) for x in (k, v))
    config = DilatedConfig(case.segment_lengths, case.dilation_rates, case.head_offsets)  # type: ignore[arg-type]
    kwargs = {"is_causal": case.is_causal, "head_offsets": case.head_offsets}
    expected, _ = _brute_force(q, k, v, config, case.is_causal)
    torch.testing.assert_close(
        dilated_attention_reference(
            q, k, v, config.segment_lengths, config.dilation_rates, **kwargs
        ),
        expected,
    )
    torch.testing.assert_close(
        dilated_attention_dense(q, k, v, config.segment_lengths, config.dilation_rates, **kwargs),
        expected,
    )


@given(data=st.data(), case=cases(max_len=12, max_segment=10))
def test_reference_extras_equal_brute_force_definition(data: st.DataObject, case: Case) -> None:
    """Padding, documents, score mods and q_offset, in both references, by the definition."""
    drawn = data.draw(extras(case))
    (q, k, v), _ = case.inputs(torch.float64)
    kw = drawn.kwargs(case)
    config = DilatedConfig(case.segment_lengths, case.dilation_rates, case.head_offsets)  # type: ignore[arg-type]
    group = case.q_heads // case.kv_heads
    expected, expected_lse = _brute_force(
        q, *(x.repeat_interleave(group, 1) for x in (k, v)), config, case.is_causal, kw
    )
    for reference in (dilated_attention_reference, dilated_attention_dense):
        out, lse = reference(
            q, k, v, case.segment_lengths, case.dilation_rates, **case.kwargs, **kw, return_lse=True
        )
        torch.testing.assert_close(out, expected)
        torch.testing.assert_close(lse, expected_lse)


def _qkv(S: int = 24, H: int = 2, D: int = 8):
    return [torch.randn(2, H, S, D, dtype=torch.float64) for _ in range(3)]


@pytest.mark.parametrize("is_causal", [False, True])
def test_full_segment_rate_one_is_dense_attention(is_causal: bool) -> None:
    q, k, v = _qkv()
    out = dilated_attention_reference(q, k, v, [24], [1], is_causal=is_causal)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=is_causal))


@pytest.mark.parametrize("is_causal", [False, True])
def test_rate_two_is_strided_subset_attention(is_causal: bool) -> None:
    q, k, v = _qkv(S=23)
    out = dilated_attention_reference(q, k, v, [23], [2], is_causal=is_causal)
    expected = torch.zeros_like(out)
    for h in range(2):  # head h takes positions h, h + 2, ...
        rows = slice(h, None, 2)
        expected[:, h, rows] = F.scaled_dot_product_attention(
            q[:, h, rows], k[:, h, rows], v[:, h, rows], is_causal=is_causal
        )
    torch.testing.assert_close(out, expected)


def test_half_segments_are_block_diagonal_attention() -> None:
    q, k, v = _qkv(S=24)
    out = dilated_attention_reference(q, k, v, [12], [1])
    halves = [
        F.scaled_dot_product_attention(*(x[:, :, i : i + 12] for x in (q, k, v))) for i in (0, 12)
    ]
    torch.testing.assert_close(out, torch.cat(halves, dim=2))


def test_two_branches_mix_by_softmax_denominators() -> None:
    q, k, v = _qkv(S=16, H=1)
    branches = [([8], [1]), ([16], [2])]
    results = [dilated_attention_reference(q, k, v, w, r, return_lse=True) for w, r in branches]
    (o1, l1), (o2, l2) = results
    s1, s2 = torch.exp(l1), torch.where(torch.isinf(l2), 0, torch.exp(l2))  # denominators
    expected = (s1[..., None] * o1 + s2[..., None] * o2) / (s1 + s2)[..., None]
    torch.testing.assert_close(dilated_attention_reference(q, k, v, [8, 16], [1, 2]), expected)


def test_multi_head_is_per_head_results_stacked() -> None:
    q, k, v = _qkv(S=20, H=4)
    out = dilated_attention_reference(q, k, v, [10, 20], [1, 4])
    changed = q.clone()
    changed[:, 1:] = torch.randn_like(changed[:, 1:])  # other heads' inputs must not matter
    torch.testing.assert_close(
        dilated_attention_reference(changed, k, v, [10, 20], [1, 4])[:, 0], out[:, 0]
    )
    config = DilatedConfig((10, 20), (1, 4))
    torch.testing.assert_close(out, _brute_force(q, k, v, config, is_causal=False)[0])


def test_overlapping_branches_count_a_shared_key_once_per_branch() -> None:
    q, k, v = _qkv(S=8, H=1)
    out = dilated_attention_reference(q, k, v, [4, 8], [1, 1])
    same_quarter = (torch.arange(8)[:, None] // 4) == (torch.arange(8) // 4)
    bias = torch.log(1.0 + same_quarter.double())  # seen by both branches: weight 2
    expected = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8) + bias, dim=-1) @ v
    torch.testing.assert_close(out, expected)


def test_multiplicity_counts_branches() -> None:
    m = multiplicity([4, 8], [1, 2], num_heads=2, q_len=8)
    assert m.shape == (2, 8, 8)
    assert m[0, 0, 0] == 2 and m[0, 0, 1] == 1 and m[0, 0, 4] == 1 and m[0, 0, 5] == 0
    assert m[1, 1, 3] == 2 and m[1, 1, 5] == 1 and m[1, 0, 0] == 1


def test_cu_seqlens_are_document_ids() -> None:
    q, k, v = _qkv(S=20)
    by_ids = torch.tensor([0] * 7 + [1] * 9 + [2] * 4).expand(2, 20)
    kwargs = {"is_causal": True, "return_lse": True}
    expected = dilated_attention_reference(q, k, v, [8, 20], [1, 2], document_ids=by_ids, **kwargs)
    cu = torch.tensor([0, 7, 16, 20])
    actual = dilated_attention_reference(q, k, v, [8, 20], [1, 2], cu_seqlens=cu, **kwargs)
    torch.testing.assert_close(actual, expected)


def test_documents_do_not_restart_segments() -> None:
    """A document starting mid-segment keeps the segment grid of the whole sequence."""
    q, k, v = _qkv(S=12, H=1)
    docs = torch.tensor([0] * 5 + [1] * 7).expand(2, 12)
    out = dilated_attention_reference(q, k, v, [4], [1], document_ids=docs)
    # position 5 (document 1) lies in segment [4, 8): it sees keys 5, 6, 7 only
    expected = F.scaled_dot_product_attention(q[:, :, 5:6], k[:, :, 5:8], v[:, :, 5:8])
    torch.testing.assert_close(out[:, :, 5:6], expected)


def test_q_offset_rows_are_rows_of_the_full_sequence() -> None:
    q, k, v = _qkv(S=23)
    kwargs = {"is_causal": True, "return_lse": True}
    full = dilated_attention_reference(q, k, v, [6, 12], [1, 3], **kwargs)
    last = dilated_attention_reference(q[:, :, 17:], k, v, [6, 12], [1, 3], q_offset=17, **kwargs)
    for a, b in zip(last, full, strict=True):
        torch.testing.assert_close(a, b[:, :, 17:])


def test_score_mod_sees_absolute_positions_before_the_masks() -> None:
    q, k, v = _qkv(S=10, H=1)
    seen = []

    def record(score, b, h, q_idx, kv_idx):
        seen.append((q_idx.flatten().tolist(), kv_idx.flatten().tolist()))
        return score

    dilated_attention_reference(q[:, :, 6:], k, v, [4], [2], score_mod=record, q_offset=6)
    assert seen == [([6, 7, 8, 9], list(range(10)))]


@pytest.mark.parametrize("reference", [dilated_attention_reference, dilated_attention_dense])
def test_rows_that_see_nothing_give_zero_and_finite_gradients(reference) -> None:
    q, k, v = (x.requires_grad_() for x in _qkv(S=9))
    padding = torch.zeros(2, 9, dtype=torch.bool)
    padding[1] = True  # batch row 1 sees nothing
    padding[0, :4] = True  # causal rows 0..3 of batch row 0 see nothing
    out, lse = reference(
        q, k, v, [9], [1], is_causal=True, key_padding_mask=padding, return_lse=True
    )
    assert (out[1] == 0).all() and (out[0, :, :4] == 0).all()
    assert torch.isinf(lse[1]).all() and torch.isinf(lse[0, :, :4]).all()
    out.sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in (q, k, v))


_CAUSAL_CALLS = {
    "dilated_attention_reference": lambda q, c: dilated_attention_reference(
        q, q, q, [4], [1], is_causal=c
    ),
    "dilated_attention_dense": lambda q, c: dilated_attention_dense(q, q, q, [4], [1], is_causal=c),
    "local_attention_reference": lambda q, c: local_attention_reference(q, q, q, 4, is_causal=c),
    "linear_attention_reference": lambda q, c: linear_attention_reference(q, q, q, is_causal=c),
    "branch_mask": lambda q, c: branch_mask(4, 1, [0], q_len=8, kv_len=8, is_causal=c),
    "local_mask": lambda q, c: local_mask(4, q_len=8, kv_len=8, is_causal=c),
    "multiplicity": lambda q, c: multiplicity([4], [1], num_heads=2, q_len=8, is_causal=c),
}


@pytest.mark.parametrize("function", list(_CAUSAL_CALLS))
@pytest.mark.parametrize("is_causal", ["False", 1, None])
def test_non_bool_is_causal_raises(function: str, is_causal: object) -> None:
    """``is_causal='False'`` is truthy: it must not silently mean causal."""
    q = _qkv(S=8)[0]
    with pytest.raises(TypeError, match=f"^is_causal must be a bool, got {is_causal!r}$"):
        _CAUSAL_CALLS[function](q, is_causal)


@pytest.mark.parametrize(
    ("segments", "rates", "match"),
    [
        (None, [1], "segment_lengths must be a sequence of positive integers, got None"),
        (8, [1], "segment_lengths must be a sequence of positive integers, got 8"),
        ([4], 1, "dilation_rates must be a sequence of positive integers, got 1"),
        ([2**70], [1], r"segment_lengths must be at most 2\*\*62"),
    ],
)
@pytest.mark.parametrize("function", ["reference", "dense", "multiplicity"])
def test_bad_branches_raise_naming_the_argument(segments, rates, match, function: str) -> None:
    q = _qkv(S=8)[0]
    calls = {
        "reference": lambda: dilated_attention_reference(q, q, q, segments, rates),
        "dense": lambda: dilated_attention_dense(q, q, q, segments, rates),
        "multiplicity": lambda: multiplicity(segments, rates, num_heads=2, q_len=8),
    }
    with pytest.raises(ValueError, match=match):
        calls[function]()


@pytest.mark.parametrize(
    ("shape", "match"),
    [
        ((0, 2, 8, 4), r"batch size must be positive, got query of shape \(0, 2, 8, 4\)"),
        ((1, 2, 8, 0), r"head dim must be positive, got query of shape \(1, 2, 8, 0\)"),
        ((1, 0, 8, 4), "head counts must be positive, got query 0 and key/value 0"),
    ],
)
def test_empty_batch_heads_or_head_dim_raise(shape: tuple[int, ...], match: str) -> None:
    q = torch.randn(shape, dtype=torch.float64)
    for reference in (dilated_attention_reference, dilated_attention_dense):
        with pytest.raises(ValueError, match=match):
            reference(q, q, q, [4], [1])


def _imports(module: str) -> set[str]:
    """The dilattn modules ``module`` imports, directly or through other dilattn modules
    (package ``__init__`` files aside: importing any submodule runs ``dilattn/__init__``)."""
    import ast
    import importlib.util
    from pathlib import Path

    seen: set[str] = set()
    todo = [module]
    while todo:
        spec = importlib.util.find_spec(todo.pop())
        assert spec is not None and spec.origin is not None
        for node in ast.walk(ast.parse(Path(spec.origin).read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for name in names:
                if name.startswith("dilattn.") and name not in seen and _is_module(name):
                    seen.add(name)
                    todo.append(name)
    return seen


def _is_module(name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # an attribute of a module, not a submodule
        return False


FAST_PATHS = (
    "dilattn.engines",
    "dilattn.functional",
    "dilattn.local",
    "dilattn.masks",
    "dilattn.nn",
)


def test_the_reference_imports_nothing_from_the_fast_paths() -> None:
    assert {m for m in _imports("dilattn.reference") if m.startswith(FAST_PATHS)} == set()
