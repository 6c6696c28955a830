"""The flex engine on strided views (CPU: eager FlexAttention, forward), its block masks and
the dispatcher that picks it."""

from __future__ import annotations

import pytest
import torch
from conftest import Case, _dense, assert_within_budget, cases, examples, extras
from hypothesis import given
from hypothesis import strategies as st

import dilattn
from dilattn._softmax import softmax_with_lse
from dilattn._varlen import visibility_mask_mod
from dilattn.engines import Dispatch, flex_strided, strided
from dilattn.engines.gather import PositionMods
from dilattn.reference import dilated_attention_reference


def _inputs(case: Case, dtype: torch.dtype, bshd: bool) -> list[torch.Tensor]:
    """Fresh q, k, v in ``dtype``; with ``bshd``, views of ``(B, S, H, D)`` memory."""
    _, low = case.inputs(dtype)
    return [x.transpose(1, 2).contiguous().transpose(1, 2) if bshd else x for x in low]


@examples(20)
@given(
    data=st.data(),
    case=cases(max_len=300, same_lengths=True, max_segment=300),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    bshd=st.booleans(),
)
def test_forward_matches_reference(data, case: Case, dtype: torch.dtype, bshd: bool) -> None:
    """Odd lengths past one 128-row block, ``w % r != 0``, GQA, batch rows, padding,
    documents, score mods that read every index (so a wrong batch row, head or position
    shows), queries laid out as SDPA's or as ``(B, S, H, D)`` memory."""
    kw = data.draw(extras(case, q_offset=False)).kwargs(case)
    q, k, v = _inputs(case, dtype, bshd)
    args = (case.segment_lengths, case.dilation_rates)
    kwargs = {**case.kwargs, **kw, "backend": "flex", "return_lse": True}
    engine = dilattn.explain(q, k, v, *args, **kwargs).engine
    assert engine == ("flex_gather" if kw.get("score_mod") and "t5" in str(kw) else "flex_strided")
    out, lse = dilattn.dilated_attention(q, k, v, *args, **kwargs)
    reference = {**case.kwargs, **kw, "return_lse": True}
    q64, k64, v64 = (x.double() for x in (q, k, v))
    truth, truth_lse = dilated_attention_reference(q64, k64, v64, *args, **reference)
    base, base_lse = dilated_attention_reference(q, k, v, *args, **reference)
    assert_within_budget(out, base, truth)
    assert_within_budget(lse.to(torch.float32), base_lse.float(), truth_lse)


def _math_flex(q, k, v, block_mask, scale, score_mod, **_) -> tuple[torch.Tensor, torch.Tensor]:
    """FlexAttention's result in differentiable torch ops (CPU flex has no backward): the
    score mod on every score, the listed blocks and the mask mod inside them."""
    X, G, M, _ = q.shape
    N = k.shape[2]
    k, v = (x.repeat_interleave(G // x.shape[1], dim=1).float() for x in (k, v))
    x, g, m, n = _indices(X, G, M, N)
    scores = q.float() @ k.transpose(-1, -2) * scale
    if score_mod is not None:
        scores = score_mod(scores, x, g, m, n)
    rows, cols = block_mask.BLOCK_SIZE
    listed = block_mask.to_dense().repeat_interleave(rows, -2).repeat_interleave(cols, -1)
    visible = listed[..., :M, :N].bool() & block_mask.mask_mod(x, g, m, n)
    probs, lse = softmax_with_lse(scores.masked_fill(~visible, -torch.inf), dim=-1)
    return (probs @ v).to(q.dtype), lse


@examples(15)
@given(data=st.data(), case=cases(max_len=300, same_lengths=True, max_segment=300))
def test_backward_matches_reference(data, case: Case) -> None:
    """The engine's backward (each call's flex backward with the merged result's weights)
    against the reference's gradients, through the output and the lse, with padding,
    documents and score mods, keys and values that are views with wider rows (their
    gradients are dense): FlexAttention replaced by the same maths in torch ops."""
    kw = data.draw(extras(case, q_offset=False)).kwargs(case)
    (q64, k64, v64), (q, k, v) = case.inputs(torch.float32)
    # views that are not dense, as of a fused projection (wider rows than D)
    k, v = (torch.nn.functional.pad(x, (0, 3))[..., : x.shape[-1]] for x in (k, v))
    inputs = [x.requires_grad_() for x in (q, k, v, q64, k64, v64)]
    args = (case.segment_lengths, case.dilation_rates)
    kwargs = {**case.kwargs, **kw, "return_lse": True}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(flex_strided, "_run_flex", _math_flex)
        chosen = Dispatch("flex_strided", ())
        patch.setattr(dilattn.functional, "_dispatch", lambda *_: chosen)
        out, lse = dilattn.dilated_attention(q, k, v, *args, **kwargs, backend="flex")
        truth, truth_lse = dilated_attention_reference(q64, k64, v64, *args, **kwargs)
        grads = (torch.randn_like(truth), torch.randn_like(truth_lse))
        finite = [
            torch.where(x.isinf(), 0.0, g) for x, g in zip((truth, truth_lse), grads, strict=True)
        ]
        ours = torch.autograd.grad((out, lse), inputs[:3], [g.float() for g in finite])
    want = torch.autograd.grad((truth, truth_lse), inputs[3:], finite)
    for got, expected in zip(ours, want, strict=True):
        torch.testing.assert_close(got.double(), expected, atol=1e-4, rtol=1e-4)


def _view_mask(mask_mod, shape: tuple[int, int, int]) -> torch.Tensor:
    """``mask_mod`` on every index of a ``(X, G, M)`` view: ``(X, G, M, M)``."""
    X, G, M = shape
    return mask_mod(*_indices(X, G, M, M)).expand(X, G, M, M)


def _indices(*sizes: int) -> list[torch.Tensor]:
    """``arange(size)`` for each dim, shaped to broadcast against the others."""
    return [
        torch.arange(size).view([-1 if d == dim else 1 for d in range(len(sizes))])
        for dim, size in enumerate(sizes)
    ]


def _check_sound(bm, visible: torch.Tensor) -> None:
    """Per view row and head: listed blocks cover every visible entry, full blocks hold no
    masked one, and the query-side lists are the transpose."""
    X, G, M, _ = visible.shape
    n = -(-M // 128)
    padded = torch.zeros(X, G, n * 128, n * 128, dtype=torch.bool)
    real = padded.clone()
    padded[..., :M, :M], real[..., :M, :M] = visible, True
    blocks = padded.view(X, G, n, 128, n, 128)
    any_visible = blocks.any(5).any(3)
    all_visible = (blocks | ~real.view(X, G, n, 128, n, 128)).all(5).all(3)
    partial = _dense(bm.kv_num_blocks, bm.kv_indices, n).expand(X, G, n, n)
    full = _dense(bm.full_kv_num_blocks, bm.full_kv_indices, n).expand(X, G, n, n)
    assert not (partial & full).any()
    assert not (any_visible & ~(partial | full)).any(), "a visible entry lies in a skipped block"
    assert not (full & ~all_visible).any(), "a block marked full has masked entries"
    q_partial = _dense(bm.q_num_blocks, bm.q_indices, n).expand(X, G, n, n)
    q_full = _dense(bm.full_q_num_blocks, bm.full_q_indices, n).expand(X, G, n, n)
    assert torch.equal(q_partial, partial.transpose(-1, -2))
    assert torch.equal(q_full, full.transpose(-1, -2))


@examples(25)
@given(
    data=st.data(),
    segments=st.lists(st.integers(100, 700), min_size=1, max_size=3),
    rates=st.lists(st.integers(1, 4), min_size=3, max_size=3),
    seq_len=st.integers(200, 900),
    batch=st.integers(1, 2),
    is_causal=st.booleans(),
)
def test_block_masks_are_sound_and_fill_whole_documents(
    data, segments, rates, seq_len, batch, is_causal
) -> None:
    """Each call's block mask lists every block with a visible entry, marks full only
    blocks with none masked, and, where no padding or document boundary falls, is exactly
    the (causal) triangle: full blocks stay full."""
    H = 4
    branches = tuple(zip(segments, rates, strict=False))
    offsets = tuple(tuple(h % r for h in range(H)) for _, r in branches)
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    pad_share, boundary = (
        data.draw(st.sampled_from([0.0, 0.01, 0.5])),
        data.draw(st.sampled_from([0.0, 0.003, 0.05])),
    )
    padding = torch.rand(batch, seq_len, generator=gen) < pad_share
    documents = (torch.rand(batch, seq_len, generator=gen) < boundary).cumsum(-1)
    vis = flex_strided.Visibility(padding, documents)
    mods = PositionMods(visibility_mask_mod(padding, documents))
    q = torch.empty(batch, H, seq_len, 8)
    plan = strided.plan(branches, offsets, 1, seq_len, batch, flex_strided.CALL_ROWS)
    out, lse = torch.empty_like(q), q.new_empty(q.shape[:3])
    for _, specs, geo in flex_strided._calls(q, q, q, out, lse, plan):
        mask_mod, _ = flex_strided._view_mods(geo, mods, is_causal)
        bm = flex_strided._call_block_mask(geo, vis, is_causal, mask_mod)
        visible = _view_mask(mask_mod, specs[0][0][:3])
        _check_sound(bm, visible)
        if not (padding.any() or documents.any()):  # nothing to cut: the plain triangle
            plain = flex_strided._segment_block_mask(geo.rows, is_causal, torch.device("cpu"))
            for ours, theirs in (
                (bm.full_kv_num_blocks, plain.full_kv_num_blocks),
                (bm.kv_num_blocks, plain.kv_num_blocks),
            ):
                assert torch.equal(ours, theirs.expand_as(ours))


def test_explain_names_the_engine_and_every_refusal() -> None:
    q, k, v = (torch.randn(1, 2, 64, 8) for _ in range(3))
    docs = torch.zeros(1, 64, dtype=torch.long)
    auto = dilattn.explain(q, k, v, [16], [1], document_ids=docs)
    assert auto.engine == "math"  # off CUDA
    assert [name for name, _ in auto.refused] == ["strided", "flex_strided", "flex_gather"]
    assert all("off CUDA" in why for _, why in auto.refused)
    flex = dilattn.explain(q, k, v, [16], [1], document_ids=docs, backend="flex")
    assert flex.engine == "flex_strided" and flex.refused == ()
    decoding = dilattn.explain(q[:, :, :1], k, v, [16], [1], q_offset=63, backend="flex")
    assert decoding.engine == "flex_gather"
    assert "S_q == S_kv and q_offset == 0" in dict(decoding.refused)["flex_strided"]
    t5 = dilattn.T5RelativeBias(2)
    table = dilattn.explain(q, k, v, [16], [1], score_mod=t5.score_mod, backend="flex")
    assert table.engine == "flex_gather" and "table" in str(table)
    with pytest.raises(ValueError, match="strided: it does not take document_ids"):
        dilattn.dilated_attention(q, k, v, [16], [1], document_ids=docs, backend="strided")
    with pytest.raises(TypeError, match="unexpected keyword"):
        dilattn.explain(q, k, v, [16], [1], documents=docs)


def test_captures_tensors_finds_tables_inside_closures() -> None:
    t5 = dilattn.T5RelativeBias(4)
    assert flex_strided.captures_tensors(t5.score_mod)
    assert not flex_strided.captures_tensors(dilattn.alibi_score_mod(4))
    assert not flex_strided.captures_tensors(None)
