"""The functional fast path against the dense reference."""

from __future__ import annotations

import functools
import re

import pytest
import torch
from conftest import LOW_DTYPES, Case, assert_within_budget, cases, examples, extras
from hypothesis import given
from hypothesis import strategies as st

import dilattn
import dilattn.engines.gather
from dilattn import dilated_attention
from dilattn._checks import check_score_mod
from dilattn._varlen import visibility_mask_mod
from dilattn.engines.gather import PositionMods, branch_attention, layout
from dilattn.reference import dilated_attention_reference


def _both(case: Case, q, k, v, **extra):
    args = (q, k, v, case.segment_lengths, case.dilation_rates)
    return dilated_attention_reference(*args, **case.kwargs, **extra)


@given(data=st.data(), case=cases(max_len=40), dtype=st.sampled_from([torch.float64, *LOW_DTYPES]))
def test_math_backend_with_extras_matches_reference(data, case: Case, dtype: torch.dtype) -> None:
    kw = data.draw(extras(case)).kwargs(case)
    (q64, k64, v64), (q, k, v) = case.inputs(dtype)
    truth, truth_lse = _both(case, q64, k64, v64, return_lse=True, **kw)
    baseline, baseline_lse = _both(case, q, k, v, return_lse=True, **kw)
    out, lse = dilated_attention(
        q,
        k,
        v,
        case.segment_lengths,
        case.dilation_rates,
        **case.kwargs,
        **kw,
        return_lse=True,
        backend="math",
    )
    assert_within_budget(out, baseline, truth)
    assert_within_budget(lse.to(dtype), baseline_lse, truth_lse)


@examples(8)
@given(
    data=st.data(), case=cases(max_len=40), dtype=st.sampled_from([torch.float64, torch.float32])
)
def test_flex_backend_with_extras_matches_reference(data, case: Case, dtype: torch.dtype) -> None:
    kw = data.draw(extras(case)).kwargs(case)
    (q64, k64, v64), (q, k, v) = case.inputs(dtype)
    truth = _both(case, q64, k64, v64, **kw)
    out = dilated_attention(
        q, k, v, case.segment_lengths, case.dilation_rates, **case.kwargs, **kw, backend="flex"
    )
    assert_within_budget(out, _both(case, q, k, v, **kw), truth)


@examples(25)
@given(data=st.data(), case=cases(max_len=32))
def test_math_backend_gradients_with_extras_match_reference(data, case: Case) -> None:
    (q, k, v), _ = case.inputs(torch.float64, requires_grad=True)
    params = [q, k, v]
    kw = data.draw(extras(case)).kwargs(case, learnable=params)  # + the T5 table, if drawn
    args = (q, k, v, case.segment_lengths, case.dilation_rates)
    out = dilated_attention(*args, **case.kwargs, **kw, backend="math")
    ref = dilated_attention_reference(*args, **case.kwargs, **kw)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, params, grad_out, allow_unused=True)
    ref_grads = torch.autograd.grad(ref, params, grad_out, allow_unused=True)
    for g, r in zip(grads, ref_grads, strict=True):
        assert g is not None and torch.isfinite(g).all()
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-9)


@given(case=cases(max_len=40, same_lengths=True), split=st.integers(1, 40))
def test_decoding_rows_with_q_offset_equal_the_full_forward(case: Case, split) -> None:
    """The last rows, given with ``q_offset`` over every key, are rows of the full causal call."""
    (q, k, v), _ = case.inputs(torch.float64)
    split = min(split, case.kv_len)
    args = (case.segment_lengths, case.dilation_rates)
    kwargs = {**case.kwargs, "is_causal": True, "backend": "math", "return_lse": True}
    full = dilated_attention(q[:, :, : case.kv_len], k, v, *args, **kwargs)
    offset = case.kv_len - split
    part = dilated_attention(q[:, :, offset : case.kv_len], k, v, *args, q_offset=offset, **kwargs)
    for a, b in zip(part, full, strict=True):
        torch.testing.assert_close(a, b[:, :, offset:])


@given(case=cases(), dtype=st.sampled_from([torch.float64, *LOW_DTYPES]))
def test_math_backend_matches_reference(case: Case, dtype: torch.dtype) -> None:
    (q64, k64, v64), (q, k, v) = case.inputs(dtype)
    truth, truth_lse = _both(case, q64, k64, v64, return_lse=True)
    baseline, baseline_lse = _both(case, q, k, v, return_lse=True)
    out, lse = dilated_attention(
        q,
        k,
        v,
        case.segment_lengths,
        case.dilation_rates,
        **case.kwargs,
        return_lse=True,
        backend="math",
    )
    assert out.dtype == dtype and lse.dtype in (torch.float32, torch.float64)
    assert_within_budget(out, baseline, truth)
    assert_within_budget(lse.to(dtype), baseline_lse, truth_lse)


@given(case=cases(), dtype=st.sampled_from([torch.float64, torch.float32]))
def test_flex_backend_forward_matches_reference(case: Case, dtype: torch.dtype) -> None:
    (q64, k64, v64), (q, k, v) = case.inputs(dtype)
    truth = _both(case, q64, k64, v64)
    out = dilated_attention(
        q, k, v, case.segment_lengths, case.dilation_rates, **case.kwargs, backend="flex"
    )
    assert_within_budget(out, _both(case, q, k, v), truth)


@given(case=cases(max_len=32))
def test_math_backend_gradients_match_reference(case: Case) -> None:
    (q, k, v), _ = case.inputs(torch.float64, requires_grad=True)
    args = (q, k, v, case.segment_lengths, case.dilation_rates)
    out, lse = dilated_attention(*args, **case.kwargs, return_lse=True, backend="math")
    ref, ref_lse = dilated_attention_reference(*args, **case.kwargs, return_lse=True)
    grad_out, grad_lse = torch.randn_like(out), torch.randn_like(lse)
    covered = torch.isfinite(ref_lse)  # the lse of an uncovered row is -inf, no gradient
    loss = (out * grad_out).sum() + (lse.where(covered, 0) * grad_lse).sum()
    ref_loss = (ref * grad_out).sum() + (ref_lse.where(covered, 0) * grad_lse).sum()
    grads = torch.autograd.grad(loss, (q, k, v))
    ref_grads = torch.autograd.grad(ref_loss, (q, k, v))
    for g, r in zip(grads, ref_grads, strict=True):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("backend", ["math", "flex"])
def test_rows_that_see_nothing_give_zero_and_finite_gradients(backend: str) -> None:
    q, k, v = (torch.randn(3, 4, 21, 8, requires_grad=backend == "math") for _ in range(3))
    padding = torch.rand(3, 21) < 0.5
    padding[1] = True  # batch row 1 sees nothing
    documents = torch.tensor([0] * 6 + [1] * 15).expand(3, 21)
    padding[2, 6:] = True  # document 1 of batch row 2 is all padding
    out, lse = dilated_attention(
        q,
        k,
        v,
        [7, 21],
        [1, 3],
        is_causal=True,
        key_padding_mask=padding,
        document_ids=documents,
        return_lse=True,
        backend=backend,
    )
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert (out[1] == 0).all() and (out[2, :, 6:] == 0).all()
    assert torch.isinf(lse[1]).all() and torch.isinf(lse[2, :, 6:]).all()
    if backend == "math":
        out.sum().backward()
        assert all(torch.isfinite(x.grad).all() for x in (q, k, v))


@pytest.mark.parametrize("backend", ["math", "flex"])
@pytest.mark.parametrize("extra", ["key_padding_mask", "document_ids"])
def test_extras_apply_inside_blocks_that_are_otherwise_full(backend: str, extra: str) -> None:
    # non-causal, one dense branch: without the extra, every block of keys is fully visible
    q, k, v = (torch.randn(2, 2, 150, 8, dtype=torch.float64) for _ in range(3))
    value = torch.rand(2, 150) < 0.3 if extra == "key_padding_mask" else torch.arange(150) // 50
    kwargs = {extra: value.expand(2, 150)}
    out = dilated_attention(q, k, v, [150], [1], backend=backend, **kwargs)
    torch.testing.assert_close(out, dilated_attention_reference(q, k, v, [150], [1], **kwargs))


@pytest.mark.parametrize("extra", [None, "key_padding_mask", "document_ids"])
def test_flex_block_masks_have_no_full_blocks_with_extras(monkeypatch, extra) -> None:
    """Eager flex (CPU) runs the mask_mod everywhere; compiled flex skips it on full blocks,
    so with padding or documents the gathered branch path must mark none full (its mask is
    built once per shape, without them)."""
    seen = []
    run = dilattn.engines.gather._run_flex
    monkeypatch.setattr(
        dilattn.engines.gather, "_run_flex", lambda *args: seen.append(args[3]) or run(*args)
    )
    q, k, v = (torch.randn(1, 2, 150, 8) for _ in range(3))
    kwargs = (
        {}
        if extra is None
        else {
            extra: torch.zeros(
                1, 150, dtype=torch.bool if extra == "key_padding_mask" else torch.long
            )
        }
    )
    mods = PositionMods(
        visibility_mask_mod(kwargs.get("key_padding_mask"), kwargs.get("document_ids"))
    )
    branch_attention(
        q, k, v, ((150, 1),), ((0, 0),), is_causal=False, scale=1.0, backend="flex", mods=mods
    )
    (block_mask,) = seen
    assert (block_mask.full_kv_num_blocks.sum() == 0) == (extra is not None)
    assert (block_mask.full_q_num_blocks.sum() == 0) == (extra is not None)


def test_decoding_gathers_only_the_segments_holding_a_query() -> None:
    lay = layout(
        64, 4, (0, 1, 2, 3), 1, q_len=1, kv_len=1000, q_offset=999, device=torch.device("cpu")
    )
    assert lay.q_index.shape == (1, 4, 16)  # one segment of 64 / 4 rows, not 16 segments
    assert (lay.kv_index[0, 3] == torch.arange(960 + 3, 1024, 4).clamp(max=999)).all()


def test_dropout_drops_each_branch_probabilities_without_bias() -> None:
    torch.manual_seed(0)
    q, k, v = (
        torch.randn(1, 2, 12, 8, dtype=torch.float64).expand(4000, -1, -1, -1) for _ in range(3)
    )
    args = (q, k, v, [4, 12], [1, 2])
    exact = dilated_attention(*args[:3], [4, 12], [1, 2], backend="math")
    torch.manual_seed(1)
    first = dilated_attention(*args, backend="math", dropout_p=0.3)
    torch.manual_seed(1)
    assert torch.equal(first, dilated_attention(*args, backend="math", dropout_p=0.3))
    assert not torch.allclose(first[0], exact[0])
    assert not torch.allclose(first[0], first[1])  # each batch row draws its own mask
    torch.testing.assert_close(first.mean(0), exact[0], atol=0.06, rtol=0)  # E[out] = out
    assert (dilated_attention(*args, backend="math", dropout_p=1.0) == 0).all()


@pytest.mark.parametrize("backend", ["math", "flex"])
@pytest.mark.parametrize("is_causal", [False, True])
def test_rows_no_branch_covers_give_zero(backend: str, is_causal: bool) -> None:
    # one branch with r = 3 and no r = 1: two positions in three are left out for each head
    q, k, v = (torch.randn(1, 2, 19, 8, requires_grad=backend == "math") for _ in range(3))
    out, lse = dilated_attention(
        q, k, v, [9], [3], is_causal=is_causal, return_lse=True, backend=backend
    )
    positions = torch.arange(19)
    covered = ((positions % 9) % 3).view(1, 1, -1) == torch.arange(2).view(1, -1, 1)
    assert torch.equal(torch.isinf(lse), ~covered)
    assert (out[~covered.expand(1, 2, 19)] == 0).all()
    if backend == "math":
        out.sum().backward()
        assert all(torch.isfinite(x.grad).all() for x in (q, k, v))


def test_sequence_shorter_than_every_segment() -> None:
    q, k, v = (torch.randn(1, 2, 5, 8, dtype=torch.float64) for _ in range(3))
    out = dilated_attention(q, k, v, [64, 128], [1, 2], backend="math")
    torch.testing.assert_close(out, dilated_attention_reference(q, k, v, [64, 128], [1, 2]))


def test_papers_configuration_with_w_not_multiple_of_r() -> None:
    # the paper's own rates 6 and 12 do not divide its segments; scaled down to CPU size
    segments, rates = [16, 32, 64, 128, 256], [1, 2, 4, 6, 12]
    q, k, v = (torch.randn(1, 12, 300, 8, dtype=torch.float64) for _ in range(3))
    for is_causal in (False, True):
        out = dilated_attention(q, k, v, segments, rates, is_causal=is_causal)
        ref = dilated_attention_reference(q, k, v, segments, rates, is_causal=is_causal)
        torch.testing.assert_close(out, ref)


def _qkv(**shapes: tuple[int, ...]) -> list[torch.Tensor]:
    return [torch.randn(shapes.get(n, (1, 2, 8, 4))) for n in ("q", "k", "v")]


@pytest.mark.parametrize(
    ("tensors", "kwargs", "error", "match"),
    [
        (_qkv(q=(2, 8, 4)), {}, ValueError, "query must have shape"),
        (_qkv(k=(1, 1, 8, 4), v=(1, 1, 8, 4)), {}, ValueError, "enable_gqa=True"),
        (
            _qkv(q=(1, 3, 8, 4), k=(1, 2, 8, 4), v=(1, 2, 8, 4)),
            {"enable_gqa": True},
            ValueError,
            "multiple of key/value heads",
        ),
        (_qkv(k=(2, 2, 8, 4)), {}, ValueError, "batch sizes differ"),
        (_qkv(k=(1, 2, 8, 5)), {}, ValueError, "head dims differ"),
        (_qkv(v=(1, 2, 7, 4)), {}, ValueError, "key and value must agree"),
        (_qkv(q=(1, 2, 0, 4)), {}, ValueError, "sequence lengths must be positive"),
        (_qkv(), {"backend": "triton"}, ValueError, "backend must be"),
        (_qkv(), {"scale": "0.5"}, TypeError, "scale must be a float"),
        (_qkv(), {"key_padding_mask": torch.ones(1, 8)}, TypeError, "must be a bool tensor"),
        (_qkv(), {"key_padding_mask": torch.ones(1, 7).bool()}, ValueError, r"shape \(1, 8\)"),
        (_qkv(), {"key_padding_mask": [[True] * 8]}, TypeError, "must be a torch.Tensor"),
        (_qkv(), {"document_ids": torch.zeros(1, 9).long()}, ValueError, r"shape \(1, 8\)"),
        (_qkv(), {"document_ids": torch.zeros(1, 8)}, TypeError, "integer tensor"),
        (
            _qkv(),
            {"q_offset": 2, "document_ids": torch.zeros(1, 8).long()},
            ValueError,
            r"shape \(1, 10\)",
        ),
        (
            _qkv(),
            {"document_ids": torch.zeros(1, 8).long(), "cu_seqlens": torch.tensor([0, 8])},
            ValueError,
            "not both",
        ),
        (_qkv(), {"cu_seqlens": torch.tensor([0, 3, 7])}, ValueError, "rise from 0"),
        (_qkv(), {"cu_seqlens": torch.tensor([0, 5, 3, 8])}, ValueError, "rise from 0"),
        (_qkv(), {"cu_seqlens": torch.tensor([8])}, ValueError, "n \\+ 1 >= 2"),
        (_qkv(), {"cu_seqlens": torch.tensor([0.0, 8.0])}, TypeError, "integer tensor"),
        (_qkv(), {"q_offset": -1}, ValueError, "q_offset must be a non-negative"),
        (_qkv(), {"q_offset": 1.0}, ValueError, "q_offset must be a non-negative"),
        (_qkv(), {"score_mod": "alibi"}, TypeError, "score_mod must be None or a callable"),
        (_qkv(), {"dropout_p": 1.5}, ValueError, "dropout_p must be in"),
        (_qkv(), {"dropout_p": "0.1"}, TypeError, "dropout_p must be a number"),
        (_qkv(), {"dropout_p": 0.1, "backend": "flex"}, ValueError, "no attention dropout"),
        (_qkv(), {"is_causal": "False"}, TypeError, "is_causal must be a bool, got 'False'"),
        (_qkv(), {"is_causal": 1}, TypeError, "is_causal must be a bool, got 1"),
        (
            _qkv(q=(0, 2, 8, 4), k=(0, 2, 8, 4), v=(0, 2, 8, 4)),
            {},
            ValueError,
            r"batch size must be positive, got query of shape \(0, 2, 8, 4\)",
        ),
        (
            _qkv(q=(1, 2, 8, 0), k=(1, 2, 8, 0)),
            {},
            ValueError,
            r"head dim must be positive, got query of shape \(1, 2, 8, 0\)",
        ),
        (
            _qkv(q=(1, 0, 8, 4), k=(1, 0, 8, 4), v=(1, 0, 8, 4)),
            {},
            ValueError,
            "head counts must be positive, got query 0 and key/value 0",
        ),
        (
            _qkv(),
            {"local_window": 2**70},
            ValueError,
            rf"local_window must be at most 2\*\*62, got {2**70}",
        ),
        (
            _qkv(),
            {"q_offset": 2**70},
            ValueError,
            rf"q_offset must be at most 2\*\*62, got {2**70}",
        ),
        (
            _qkv(),
            {"score_mod": lambda score, b: score},
            TypeError,
            r"score_mod must take 5 positional arguments \(score, b, h, q_idx, kv_idx\) -> "
            r"score, got <lambda>\(score, b\)",
        ),
        (
            _qkv(),
            {"score_mod": lambda score, b, h, q_idx, kv_idx, *, scale: score},
            TypeError,
            r"score_mod must take 5 positional arguments .* got <lambda>\(.*\*, scale\)",
        ),
    ],
)
def test_bad_inputs_raise(tensors, kwargs, error, match) -> None:
    with pytest.raises(error, match=match):
        dilated_attention(*tensors, [4], [1], **kwargs)


@pytest.mark.parametrize(
    ("segments", "rates", "match"),
    [
        (None, [1], "segment_lengths must be a sequence of positive integers, got None"),
        (8, [1], "segment_lengths must be a sequence of positive integers, got 8"),
        ([4], None, "dilation_rates must be a sequence of positive integers, got None"),
        ([4], 1, "dilation_rates must be a sequence of positive integers, got 1"),
        ([2**70], [1], rf"segment_lengths must be at most 2\*\*62, got {2**70} in \[{2**70}\]"),
        ([4], [2**63], r"dilation_rates must be at most 2\*\*62"),
    ],
)
def test_bad_branches_raise_naming_the_argument(segments, rates, match) -> None:
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=match):
        dilated_attention(q, k, v, segments, rates)
    with pytest.raises(ValueError, match=match):
        dilattn.explain(q, k, v, segments, rates)


def test_branches_may_be_any_iterable_of_integers() -> None:
    q, k, v = _qkv()
    expected = dilated_attention(q, k, v, [4, 8], [1, 2])
    for segments in (torch.tensor([4, 8]), range(4, 12, 4), (w for w in (4, 8))):
        torch.testing.assert_close(dilated_attention(q, k, v, segments, (1, 2)), expected)


@pytest.mark.parametrize(
    ("name", "call"),
    [
        ("is_causal", lambda q, causal: dilated_attention(q, q, q, [4], [1], is_causal=causal)),
        ("is_causal", lambda q, causal: dilattn.local_attention(q, q, q, 4, is_causal=causal)),
        ("causal", lambda q, causal: dilattn.LocalAttention(4, causal=causal)),
    ],
    ids=["dilated_attention", "local_attention", "LocalAttention"],
)
@pytest.mark.parametrize("causal", ["False", "True", 0, None, torch.tensor(False)])
def test_non_bool_is_causal_raises(name, call, causal) -> None:
    """A string such as ``'False'`` is truthy: taken as a flag it would mean causal."""
    with pytest.raises(TypeError, match=rf"^{name} must be a bool, got {re.escape(repr(causal))}"):
        call(_qkv()[0], causal)


def test_score_mod_signature_is_read_where_there_is_one() -> None:
    q, k, v = _qkv()
    expected = dilated_attention(q, k, v, [4], [1])

    class Identity:
        def __call__(self, score, b, h, q_idx, kv_idx):
            return score

    def with_default(score, b, h, q_idx, kv_idx, bias=0.0):
        return score + bias

    accepted = [
        Identity(),
        with_default,
        lambda *args: args[0],
        lambda score, *rest: score,
        functools.partial(lambda bias, score, b, h, q_idx, kv_idx: score + bias, 0.0),
    ]
    for score_mod in accepted:
        torch.testing.assert_close(
            dilated_attention(q, k, v, [4], [1], score_mod=score_mod), expected
        )
    check_score_mod(max)  # a builtin without a readable signature is taken on trust

    class FourArguments:
        def __call__(self, score, b, h, q_idx):
            return score

    with pytest.raises(TypeError, match=r"got FourArguments\(score, b, h, q_idx\)$"):
        dilated_attention(q, k, v, [4], [1], score_mod=FourArguments())


def test_compiled_flex_on_cpu_raises_pointing_to_math() -> None:
    """Inductor cannot compile FlexAttention for CPU here; the dispatcher says so up front."""
    q, k, v = _qkv()

    def call(q, k, v, backend):
        return dilated_attention(q, k, v, [4], [1], backend=backend)

    compiled = torch.compile(call, backend="eager")  # dynamo only: fast
    with (
        torch.no_grad(),
        pytest.raises(
            ValueError,
            match=r"backend='flex' cannot run this call .*compiled FlexAttention on CPU is not "
            r"supported .*use backend='math' \(the default on CPU\) under torch\.compile",
        ),
    ):
        compiled(q, k, v, "flex")
    torch.testing.assert_close(compiled(q, k, v, "math"), call(q, k, v, "math"))
    with torch.no_grad():
        assert call(q, k, v, "flex").shape == q.shape  # eager flex on CPU still runs


def test_bad_dtypes_raise() -> None:
    q, k, v = _qkv()
    with pytest.raises(TypeError, match="share a dtype"):
        dilated_attention(q, k.double(), v, [4], [1])
    with pytest.raises(TypeError, match="floating-point"):
        dilated_attention(q.long(), k, v, [4], [1])


def test_flex_backend_refuses_cpu_training() -> None:
    q, k, v = (x.requires_grad_() for x in _qkv())
    with pytest.raises(ValueError, match="forward-only"):
        dilated_attention(q, k, v, [4], [1], backend="flex")


def test_auto_backend_checks_head_dim_on_cuda() -> None:
    from dilattn.functional import resolve_backend

    q = torch.randn(1, 1, 4, 8)
    assert resolve_backend("auto", q, q, q) == "math"  # CPU: math, any head dim


@pytest.mark.parametrize(
    "build",
    [
        lambda bad: dilattn.flex_mask([8], [1], q_len=8, num_heads=1, is_causal=bad),
        lambda bad: dilattn.dilated_mask_mod([8], [1], num_heads=1, is_causal=bad),
        lambda bad: dilattn.DilatedAttention([8], [1], is_causal=bad),
        lambda bad: dilattn.MultiheadDilatedAttention(8, 2, [8], [1], is_causal=bad),
        lambda bad: dilattn.linear_attention(*(torch.randn(1, 1, 4, 4),) * 3, is_causal=bad),
    ],
)
def test_every_entry_point_refuses_a_non_bool_is_causal(build) -> None:
    with pytest.raises(TypeError, match="is_causal must be a bool, got 'False'"):
        build("False")


@pytest.mark.parametrize(
    "build",
    [
        lambda bad: dilattn.flex_mask(bad, [1], q_len=8, num_heads=1),
        lambda bad: dilattn.DilatedAttention(bad, [1]),
        lambda bad: dilattn.MultiheadDilatedAttention(8, 2, bad, [1]),
    ],
)
@pytest.mark.parametrize("bad", [None, 8])
def test_every_entry_point_names_bad_segment_lengths(build, bad) -> None:
    with pytest.raises(ValueError, match="segment_lengths must be a sequence of positive integers"):
        build(bad)
