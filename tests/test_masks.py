"""The one-line flex mask and the analytic block masks."""

from __future__ import annotations

import torch
from conftest import Case, assert_within_budget, cases, check_block_mask, extras
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn.attention.flex_attention import flex_attention

from dilattn import alibi_score_mod, dilated_mask_mod, flex_mask
from dilattn.engines.blocks import block_mask_from_spans, prefix_spans
from dilattn.reference import dilated_attention_reference, multiplicity


@given(case=cases(), block_size=st.sampled_from([4, 8, 128]))
def test_one_line_mask_matches_reference(case: Case, block_size: int) -> None:
    (q64, k64, v64), (q, k, v) = case.inputs(torch.float32)
    m = flex_mask(
        case.segment_lengths,
        case.dilation_rates,
        q_len=case.q_len,
        kv_len=case.kv_len,
        num_heads=case.q_heads,
        is_causal=case.is_causal,
        head_offsets=case.head_offsets,  # type: ignore[arg-type]
        block_size=block_size,
    )
    gqa = case.q_heads != case.kv_heads
    out = flex_attention(q, k, v, block_mask=m.block_mask, score_mod=m.score_mod, enable_gqa=gqa)
    args = (case.segment_lengths, case.dilation_rates)
    truth = dilated_attention_reference(q64, k64, v64, *args, **case.kwargs)
    assert_within_budget(out, dilated_attention_reference(q, k, v, *args, **case.kwargs), truth)


@settings(max_examples=8)
@given(data=st.data(), case=cases(), block_size=st.sampled_from([4, 16, 128]))
def test_one_line_mask_with_extras_matches_reference(data, case: Case, block_size: int) -> None:
    kw = data.draw(extras(case, q_offset=False)).kwargs(case)
    kw.pop("q_offset")
    (q64, k64, v64), (q, k, v) = case.inputs(torch.float32)
    m = flex_mask(
        case.segment_lengths,
        case.dilation_rates,
        q_len=case.q_len,
        kv_len=case.kv_len,
        num_heads=case.q_heads,
        is_causal=case.is_causal,
        head_offsets=case.head_offsets,  # type: ignore[arg-type]
        block_size=block_size,
        **kw,
    )
    gqa = case.q_heads != case.kv_heads
    out = flex_attention(q, k, v, block_mask=m.block_mask, score_mod=m.score_mod, enable_gqa=gqa)
    args = (case.segment_lengths, case.dilation_rates)
    truth = dilated_attention_reference(q64, k64, v64, *args, **case.kwargs, **kw)
    baseline = dilated_attention_reference(q, k, v, *args, **case.kwargs, **kw)
    assert_within_budget(out, baseline, truth)


def test_one_line_mask_with_extras_has_no_full_blocks_and_named_mods() -> None:
    padding = torch.zeros(2, 64, dtype=torch.bool)
    m = flex_mask(
        [32],
        [1],
        q_len=64,
        num_heads=2,
        block_size=16,
        key_padding_mask=padding,
        cu_seqlens=torch.tensor([0, 40, 64]),
        score_mod=alibi_score_mod(2),
    )
    assert (m.block_mask.full_kv_num_blocks == 0).all()
    assert (m.block_mask.kv_num_blocks > 0).all()
    assert m.block_mask.mask_mod.__name__ == "dilated_w32_r1_and_not_padding_and_same_document"
    assert m.score_mod.__name__ == "alibi_2h_then_log_multiplicity_w32_r1"


@given(case=cases(max_len=80, max_segment=40), block_size=st.sampled_from([2, 4, 8, 16]))
def test_union_block_mask_is_sound(case: Case, block_size: int) -> None:
    args = (case.segment_lengths, case.dilation_rates)
    m = flex_mask(
        *args,
        q_len=case.q_len,
        kv_len=case.kv_len,
        num_heads=case.q_heads,
        is_causal=case.is_causal,
        head_offsets=case.head_offsets,
        block_size=block_size,  # type: ignore[arg-type]
    )
    visible = (
        multiplicity(
            *args,
            num_heads=case.q_heads,
            q_len=case.q_len,
            kv_len=case.kv_len,
            is_causal=case.is_causal,
            head_offsets=case.head_offsets,  # type: ignore[arg-type]
        )
        > 0
    )
    only_rate_one = set(case.dilation_rates) == {1}
    check_block_mask(
        m.block_mask,
        visible[None],
        block_size,
        tight_touched=only_rate_one,
        tight_full=only_rate_one and len(case.dilation_rates) == 1 and not case.is_causal,
    )


@given(
    counts=st.lists(st.lists(st.integers(0, 40), min_size=3, max_size=3), min_size=1, max_size=3),
    length=st.integers(1, 40),
    block_size=st.sampled_from([2, 4, 8]),
    is_causal=st.booleans(),
    offset=st.one_of(st.none(), st.tuples(st.integers(1, 40), st.integers(0, 30))),
)
def test_prefix_block_mask_is_sound_and_tight(
    counts, length, block_size, is_causal, offset
) -> None:
    count = torch.tensor(counts).clamp(max=length)  # (B, H): keys [0, count) are visible
    # queries: rows [0, length), or q_length rows standing at key rows start + t (start per head)
    q_length, shift = offset if offset is not None else (length, 0)
    start = (torch.arange(count.numel()).view(count.shape) * 7 + shift) % (shift + 1)
    rows, cols = prefix_spans(
        count.amin(1),
        count.amax(1),
        length=length,
        block_size=block_size,
        is_causal=is_causal,
        q_length=q_length,
        q_start=(start.amin(1), start.amax(1)) if offset is not None else None,
    )
    bm = block_mask_from_spans(
        rows,
        cols,
        seq_lengths=(q_length, length),
        block_size=block_size,
        mask_mod=lambda b, h, q, kv: kv < count[b, h],
        widths=(length, q_length),
    )
    keys, queries = torch.arange(length), torch.arange(q_length).view(-1, 1)
    visible = (keys < count[..., None, None]).expand(*count.shape, q_length, length)
    if is_causal:
        visible = visible & (keys <= queries + start[..., None, None])
    check_block_mask(
        bm, visible, block_size, tight_touched=offset is None, tight_full=not is_causal
    )


def test_one_line_mask_stays_small_at_a_million_tokens() -> None:
    S = 1 << 20
    m = flex_mask(
        [2048, 4096, 8192, 16384, 32768], [1, 2, 4, 6, 12], q_len=S, num_heads=12, is_causal=True
    )
    bm = m.block_mask
    assert bm.shape == (1, 1, S, S)
    index_bytes = sum(
        x.numel() * x.element_size()
        for x in (bm.kv_indices, bm.full_kv_indices, bm.q_indices, bm.full_q_indices)
    )
    assert index_bytes < 24 * 2**20  # a dense block layout would take 4 x 256 MiB
    # a query block deep in the sequence touches its whole 32768-token segment, causally
    row = 3 * 32768 // 128 + 200
    touched = bm.kv_num_blocks[0, 0, row] + bm.full_kv_num_blocks[0, 0, row]
    assert touched == 201


def test_mods_are_named() -> None:
    mod = dilated_mask_mod([8, 16], [1, 2], num_heads=2, is_causal=True)
    assert mod.__name__ == "dilated_causal_w8-16_r1-2"
    assert flex_mask([8], [2], q_len=16, num_heads=1).score_mod.__name__ == "log_multiplicity_w8_r2"
