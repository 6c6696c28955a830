"""Local windowed attention: against the dense reference, its block mask, the local branch of
dilated attention, and parity with the ``local-attention`` package."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from conftest import (
    LOW_DTYPES,
    Case,
    assert_within_budget,
    cases,
    check_block_mask,
    examples,
    extras,
)
from hypothesis import given
from hypothesis import strategies as st
from torch.nn.attention.flex_attention import flex_attention

import dilattn
from dilattn import LocalAttention, dilated_attention, flex_mask, local_attention
from dilattn.config import Window
from dilattn.engines import window
from dilattn.engines.window import window_block_mask
from dilattn.reference import (
    dilated_attention_dense,
    dilated_attention_reference,
    local_attention_reference,
    local_mask,
    multiplicity,
)


@dataclass(frozen=True)
class Win:
    window_size: int
    look_backward: int
    look_forward: int
    exact_windowsize: bool
    is_causal: bool

    @property
    def kwargs(self) -> dict[str, object]:
        return self.__dict__.copy()


@st.composite
def windows(draw: st.DrawFn, causal: bool | None = None) -> Win:
    is_causal = draw(st.booleans()) if causal is None else causal
    return Win(
        window_size=draw(st.integers(1, 12)),
        look_backward=draw(st.integers(0, 2)),
        look_forward=0 if is_causal else draw(st.integers(0, 2)),
        exact_windowsize=draw(st.booleans()),
        is_causal=is_causal,
    )


def _local(fn, case: Case, win: Win, q, k, v, **kw):
    return fn(q, k, v, **win.kwargs, enable_gqa=case.q_heads != case.kv_heads, **kw)


def _reference(case: Case, win: Win, q, k, v, **kw):
    return _local(local_attention_reference, case, win, q, k, v, **kw)


@given(
    data=st.data(),
    case=cases(max_len=40),
    win=windows(),
    dtype=st.sampled_from([torch.float64, *LOW_DTYPES]),
)
def test_math_backend_with_extras_matches_reference(data, case: Case, win: Win, dtype) -> None:
    case = Case(**{**case.__dict__, "is_causal": win.is_causal})
    kw = data.draw(extras(case)).kwargs(case)
    (q64, k64, v64), (q, k, v) = case.inputs(dtype)
    truth, truth_lse = _reference(case, win, q64, k64, v64, return_lse=True, **kw)
    baseline, baseline_lse = _reference(case, win, q, k, v, return_lse=True, **kw)
    out, lse = _local(local_attention, case, win, q, k, v, return_lse=True, backend="math", **kw)
    assert out.dtype == dtype
    assert_within_budget(out, baseline, truth)
    assert_within_budget(lse.to(dtype), baseline_lse, truth_lse)


@examples(10)
@given(
    data=st.data(),
    case=cases(max_len=40),
    win=windows(),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
)
def test_flex_backend_with_extras_matches_reference(data, case: Case, win: Win, dtype) -> None:
    case = Case(**{**case.__dict__, "is_causal": win.is_causal})
    kw = data.draw(extras(case)).kwargs(case)
    (q64, k64, v64), (q, k, v) = case.inputs(dtype)
    truth = _reference(case, win, q64, k64, v64, **kw)
    out = _local(local_attention, case, win, q, k, v, backend="flex", **kw)
    assert_within_budget(out, _reference(case, win, q, k, v, **kw), truth)


@examples(15)
@given(case=cases(max_len=32), win=windows())
def test_math_backend_gradients_match_reference(case: Case, win: Win) -> None:
    (q, k, v), _ = case.inputs(torch.float64, requires_grad=True)
    out = _local(local_attention, case, win, q, k, v, backend="math")
    ref = _reference(case, win, q, k, v)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    for g, r in zip(grads, torch.autograd.grad(ref, (q, k, v), grad_out), strict=True):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-9)


@given(
    win=windows(),
    q_len=st.integers(1, 70),
    kv_len=st.integers(1, 70),
    q_offset=st.integers(0, 30),
    block_size=st.sampled_from([1, 2, 4, 8, 16]),
)
def test_window_block_mask_is_sound_and_tight(win, q_len, kv_len, q_offset, block_size) -> None:
    window = Window(
        win.window_size, win.look_backward, win.look_forward, win.exact_windowsize, win.is_causal
    )
    bm = window_block_mask(
        window, q_len=q_len, kv_len=kv_len, q_offset=q_offset, block_size=block_size
    )
    visible = local_mask(**win.kwargs, q_len=q_len, kv_len=kv_len, q_offset=q_offset)
    check_block_mask(bm, visible[None, None], block_size, tight_full=True, tight_touched=True)


def test_window_block_mask_lists_only_the_window_at_a_million_tokens() -> None:
    S, bs = 1 << 20, 128
    bm = window_block_mask(Window(512, 1, 0, True, True), q_len=S, kv_len=S)
    touched = bm.kv_num_blocks + bm.full_kv_num_blocks  # (1, 1, S / bs)
    assert touched.max() == 5 and bm.kv_indices.shape[-1] <= 6  # 512 + 128 keys: 5 blocks
    assert int(touched.sum()) < 5 * S // bs


# the local branch of dilated attention


@examples(15)
@given(
    data=st.data(),
    case=cases(max_len=40),
    local_window=st.integers(1, 20),
    dtype=st.sampled_from([torch.float64, *LOW_DTYPES]),
)
def test_dilated_with_local_branch_matches_reference(data, case, local_window, dtype) -> None:
    kw = {**data.draw(extras(case)).kwargs(case), "local_window": local_window}
    (q64, k64, v64), (q, k, v) = case.inputs(dtype)
    args = (case.segment_lengths, case.dilation_rates)
    truth = dilated_attention_reference(q64, k64, v64, *args, **case.kwargs, **kw)
    baseline = dilated_attention_reference(q, k, v, *args, **case.kwargs, **kw)
    backends = ["math", "flex"] if dtype == torch.float32 else ["math"]
    for backend in backends:
        out = dilated_attention(q, k, v, *args, **case.kwargs, **kw, backend=backend)
        assert_within_budget(out, baseline, truth)


@examples(10)
@given(case=cases(max_len=40), local_window=st.integers(1, 20))
def test_dense_reference_and_one_line_mask_count_the_local_branch(case, local_window) -> None:
    (q, k, v), (q32, k32, v32) = case.inputs(torch.float32)
    args = (case.segment_lengths, case.dilation_rates)
    kw = {**case.kwargs, "local_window": local_window}
    truth = dilated_attention_reference(q, k, v, *args, **kw)
    torch.testing.assert_close(dilated_attention_dense(q, k, v, *args, **kw), truth)
    m = flex_mask(
        *args,
        q_len=case.q_len,
        kv_len=case.kv_len,
        num_heads=case.q_heads,
        is_causal=case.is_causal,
        head_offsets=case.head_offsets,  # type: ignore[arg-type]
        block_size=4,
        local_window=local_window,
    )
    gqa = case.q_heads != case.kv_heads
    out = flex_attention(
        q32, k32, v32, block_mask=m.block_mask, score_mod=m.score_mod, enable_gqa=gqa
    )
    assert_within_budget(out, dilated_attention_reference(q32, k32, v32, *args, **kw), truth)


@given(
    case=cases(max_len=80, max_segment=40),
    local_window=st.integers(1, 40),
    block_size=st.sampled_from([1, 2, 4, 8, 16]),
)
def test_union_block_mask_with_local_branch_is_sound(case, local_window, block_size) -> None:
    args = (case.segment_lengths, case.dilation_rates)
    shape = {"q_len": case.q_len, "kv_len": case.kv_len, "num_heads": case.q_heads}
    kw = {
        "is_causal": case.is_causal,
        "head_offsets": case.head_offsets,
        "local_window": local_window,
    }
    m = flex_mask(*args, **shape, **kw, block_size=block_size)  # type: ignore[arg-type]
    visible = multiplicity(*args, **shape, **kw) > 0  # type: ignore[arg-type]
    check_block_mask(m.block_mask, visible[None], block_size, tight_full=False, tight_touched=False)


def test_modules_take_the_local_window() -> None:
    q, k, v = (torch.randn(2, 4, 50, 8) for _ in range(3))
    ref = dilated_attention_reference(q, k, v, [16], [2], is_causal=True, local_window=5)
    attn = dilattn.DilatedAttention([16], [2], is_causal=True, local_window=5)
    torch.testing.assert_close(attn(q, k, v), ref)
    assert "local_window=5" in repr(attn)
    mha = dilattn.MultiheadDilatedAttention(32, 4, [16], [2], local_window=5, is_causal=True)
    x = torch.randn(2, 50, 32)
    out, _ = mha(x, x, x)
    windowless = dilattn.MultiheadDilatedAttention(32, 4, [16], [2], is_causal=True)
    windowless.load_state_dict(mha.state_dict())
    assert not torch.allclose(out, windowless(x, x, x)[0])
    assert dilattn.DilatedConfig((16,), (2,), local_window=5).flops(50) > dilattn.DilatedConfig(
        (16,), (2,)
    ).flops(50)


@pytest.mark.parametrize("kind", ["LocalAttention", "DilatedAttention"])
def test_modules_compile_fullgraph_without_graph_breaks(kind: str) -> None:
    """On CPU (math: compiled flex is refused there); the GPU tests compile flex."""
    if kind == "LocalAttention":
        attn: torch.nn.Module = LocalAttention(8, causal=True, autopad=True, dim=8)
    else:
        attn = dilattn.DilatedAttention([8], [2], is_causal=True, local_window=5)
    q, k, v = (torch.randn(1, 2, 29, 8, requires_grad=True) for _ in range(3))
    out = torch.compile(attn, fullgraph=True, backend="eager")(q, k, v)  # dynamo only: fast
    torch.testing.assert_close(out, attn(q, k, v))
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


# errors


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"window_size": 0}, ValueError, "window_size"),
        ({"window_size": 4, "look_backward": -1}, ValueError, "look_backward"),
        ({"window_size": 4, "is_causal": True, "look_forward": 1}, ValueError, "look forward"),
        ({"window_size": 4, "backend": "strided"}, ValueError, "no strided backend"),
        ({"window_size": 4, "backend": "sdpa"}, ValueError, "backend"),
        ({"window_size": 4, "backend": "flex", "dropout_p": 0.1}, ValueError, "dropout"),
        (
            {"window_size": 4, "key_padding_mask": torch.ones(2, 5).bool()},
            ValueError,
            "key_padding",
        ),
    ],
)
def test_bad_arguments_raise(kwargs, error, match) -> None:
    q = torch.randn(2, 2, 16, 8)
    with pytest.raises(error, match=match):
        local_attention(q, q, q, **kwargs)


def test_bad_module_inputs_raise() -> None:
    q = torch.randn(2, 2, 10, 8)
    with pytest.raises(ValueError, match="autopad=True"):
        LocalAttention(4)(q, q, q)
    with pytest.raises(TypeError, match="True = keep"):
        LocalAttention(5)(q, q, q, mask=torch.ones(2, 10))
    with pytest.raises(ValueError, match="at most one"):
        LocalAttention(5)(
            q,
            q,
            q,
            mask=torch.ones(2, 10, dtype=torch.bool),
            key_padding_mask=torch.zeros(2, 10, dtype=torch.bool),
        )
    with pytest.raises(ValueError, match="dim=16"):
        LocalAttention(5, dim=16)(q, q, q)
    with pytest.raises(ValueError, match="local_window"):
        dilated_attention(q, q, q, [4], [1], local_window=0)
    with pytest.raises(ValueError, match="local_window"):
        dilattn.DilatedConfig((4,), (1,), "split", local_window=2)
    with pytest.raises(ValueError, match="local_window"):
        dilated_attention(q, q, q, [4], [1], local_window=3, backend="strided")


# parity with local-attention


def _theirs(**kwargs):
    la = pytest.importorskip("local_attention")
    return la.LocalAttention(**kwargs)


@examples(30)
@given(
    win=windows(),
    buckets=st.integers(1, 5),
    extra=st.integers(0, 11),
    batch=st.integers(1, 2),
    heads=st.integers(1, 3),
    shared_qk=st.booleans(),
    masked=st.booleans(),
    rotary=st.booleans(),
)
def test_parity_with_local_attention(
    win, buckets, extra, batch, heads, shared_qk, masked, rotary
) -> None:
    """Same q, k, v and options, same outputs. ``autopad`` for lengths that are not multiples
    of the window; then without causality a mask is passed, since theirs lets queries see its
    zero padding keys otherwise. Rotary only with ``look_forward = 0`` (theirs shifts the
    queries by ``look_forward`` buckets otherwise; tested below)."""
    W = win.window_size
    S = buckets * W + extra % W
    options = {
        "window_size": W,
        "causal": win.is_causal,
        "look_backward": win.look_backward,
        "look_forward": win.look_forward,
        "exact_windowsize": win.exact_windowsize,
        "shared_qk": shared_qk,
        "autopad": S % W != 0,
        "dim": 8 if rotary and win.look_forward == 0 else None,
    }
    theirs, ours = _theirs(**options), LocalAttention(**options)
    q, k, v = (torch.randn(batch, heads, S, 8) for _ in range(3))
    if shared_qk:
        k = q
    mask = torch.rand(batch, S) > 0.3
    mask[:, -1] = True  # the last key of a bucket keeps some row of each bucket alive
    use_mask = masked or (options["autopad"] and not win.is_causal)
    kw = {"mask": mask} if use_mask else {}
    expected, out = theirs(q, k, v, **kw), ours(q, k, v, **kw)
    if use_mask:  # theirs averages garbage where a row sees no key; ours gives 0
        lost = ~(local_mask(**win.kwargs, q_len=S, kv_len=S) & mask[:, None, None, :]).any(-1)
        assert (out[lost.expand_as(out[..., 0])] == 0).all()
        expected = expected.masked_fill(lost[..., None], 0)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_parity_takes_their_layouts() -> None:
    """``(B, S, D)`` and merged heads ``(B*H, S, D)`` with a ``(B, S)`` mask, as theirs."""
    theirs, ours = _theirs(window_size=4, causal=True), LocalAttention(4, causal=True)
    q, k, v = (torch.randn(6, 16, 8) for _ in range(3))
    mask = torch.rand(2, 16) > 0.2
    mask[:, 0] = True
    torch.testing.assert_close(ours(q, k, v), theirs(q, k, v))
    torch.testing.assert_close(ours(q, k, v, mask=mask), theirs(q, k, v, mask=mask))
    padding = ~mask
    torch.testing.assert_close(ours(q, k, v, key_padding_mask=padding), theirs(q, k, v, mask=mask))


@pytest.mark.parametrize("causal", [False, True])
def test_parity_with_xpos(causal: bool) -> None:
    """xPos (scale base ``window_size // 2``) with ``look_forward = 0``: the same scores."""
    options = {"window_size": 8, "causal": causal, "look_forward": 0, "dim": 8, "use_xpos": True}
    q, k, v = (torch.randn(2, 2, 40, 8) for _ in range(3))
    expected = _theirs(**options)(q, k, v)
    torch.testing.assert_close(LocalAttention(**options)(q, k, v), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("use_xpos", [False, True])
def test_their_rotary_shifts_queries_by_look_forward_buckets(use_xpos: bool) -> None:
    """Theirs rotates a look-around's queries as if they sat in its last bucket: with
    ``look_forward = f`` it equals ours with query positions shifted by ``f * window_size``."""
    W, f, S, D = 4, 1, 16, 8
    kwargs = {"window_size": W, "look_forward": f, "dim": D, "use_xpos": use_xpos}
    theirs = _theirs(**kwargs)
    q, k, v = (torch.randn(2, 2, S, D) for _ in range(3))
    positions = torch.arange(S)
    if use_xpos:
        sb = W // 2
        q_rot = dilattn.xpos(q, positions + f * W, key=False, scale_base=sb)
        k_rot = dilattn.xpos(k, positions, key=True, scale_base=sb)
    else:
        q_rot, k_rot = dilattn.rotary(q, positions + f * W), dilattn.rotary(k, positions)
    ours = local_attention(q_rot, k_rot, v, W, look_forward=f)
    torch.testing.assert_close(ours, theirs(q, k, v), rtol=1e-4, atol=1e-5)
    if not use_xpos:  # and so differs from the module, which rotates at the true positions
        assert not torch.allclose(LocalAttention(**kwargs)(q, k, v), theirs(q, k, v), atol=1e-3)


def test_module_dropout_and_grad_on_cpu() -> None:
    attn = LocalAttention(4, causal=True, dropout=0.5)
    q, k, v = (torch.randn(1, 2, 12, 8, requires_grad=True) for _ in range(3))
    out = attn(q, k, v)
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()
    attn.eval()
    torch.testing.assert_close(attn(q, k, v), local_attention(q, k, v, 4, is_causal=True))
    assert "window_size=4" in repr(attn)


def test_flex_window_mask_is_built_once_and_kept_clean_of_call_masks() -> None:
    """Eager flex reuses the window's block mask across calls of one shape, padded or not; a
    call's own padding is and-ed into a copy, so the next call's is not mixed with it."""
    window._cached_block_mask.cache_clear()
    q, k, v = (torch.randn(2, 4, 300, 16, dtype=torch.float64) for _ in range(3))
    for keep in (torch.rand(2, 300) > 0.3, torch.rand(2, 300) > 0.6, None):
        kw = {"is_causal": True, "exact_windowsize": True, "key_padding_mask": keep}
        out = local_attention(q, k, v, 40, **kw, backend="flex")  # type: ignore[arg-type]
        truth = local_attention_reference(q, k, v, 40, **kw)  # type: ignore[arg-type]
        torch.testing.assert_close(out, truth)
    info = window._cached_block_mask.cache_info()
    assert (info.misses, info.hits) == (2, 1)  # partial once, full once
