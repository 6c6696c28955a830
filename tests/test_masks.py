"""The one-line flex mask and the analytic block masks."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import Case, assert_within_budget, cases, check_block_mask, examples, extras
from hypothesis import example, given
from hypothesis import strategies as st
from torch.nn.attention.flex_attention import flex_attention

import dilattn
from dilattn import alibi_score_mod, dilated_mask_mod, flex_mask
from dilattn.engines.blocks import block_mask_from_spans, prefix_spans
from dilattn.reference import dilated_attention_reference, multiplicity

HEAD_OFFSETS = ["cyclic", "grouped", "split"]


def any_offsets(**kwargs: object) -> st.SearchStrategy[Case]:
    """``cases(**kwargs)`` with every kind of head offsets, "split" included."""
    return st.builds(
        dataclasses.replace, cases(**kwargs), head_offsets=st.sampled_from(HEAD_OFFSETS)
    )


def one_line_mask(case: Case, **kwargs: object) -> dilattn.FlexMask:
    """``flex_mask`` for ``case`` (its branches, shapes, causality and head offsets)."""
    return flex_mask(
        case.segment_lengths,
        case.dilation_rates,
        q_len=case.q_len,
        kv_len=case.kv_len,
        num_heads=case.q_heads,
        is_causal=case.is_causal,
        head_offsets=case.head_offsets,  # type: ignore[arg-type]
        **kwargs,  # type: ignore[arg-type]
    )


@given(case=any_offsets(), block_size=st.sampled_from([4, 8, 128]))
def test_one_line_mask_matches_reference(case: Case, block_size: int) -> None:
    (q64, k64, v64), (q, k, v) = case.inputs(torch.float32)
    m = one_line_mask(case, block_size=block_size)
    out = flex_attention(q, k, v, **m, enable_gqa=case.q_heads != case.kv_heads)
    args = (case.segment_lengths, case.dilation_rates)
    truth = dilated_attention_reference(q64, k64, v64, *args, **case.kwargs)
    assert_within_budget(out, dilated_attention_reference(q, k, v, *args, **case.kwargs), truth)


@examples(8)
@given(data=st.data(), case=any_offsets(), block_size=st.sampled_from([4, 16, 128]))
def test_one_line_mask_with_extras_matches_reference(data, case: Case, block_size: int) -> None:
    kw = data.draw(extras(case, q_offset=False)).kwargs(case)
    kw.pop("q_offset")
    (q64, k64, v64), (q, k, v) = case.inputs(torch.float32)
    m = one_line_mask(case, block_size=block_size, **kw)
    out = flex_attention(q, k, v, **m, enable_gqa=case.q_heads != case.kv_heads)
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


# the reproducer: head 0 sees all of block (0, 0) in branch (128, 1), head 1 only a
# quarter of it in branch (256, 2); the block was marked full
SPLIT_REPRODUCER = Case((128, 256), (1, 2), 1, 2, 2, 256, 256, 4, 4, False, "split")


@pytest.mark.parametrize("head_offsets", HEAD_OFFSETS)
@given(case=cases(max_len=80, max_segment=40), block_size=st.sampled_from([2, 4, 8, 16]))
@example(case=SPLIT_REPRODUCER, block_size=128)
def test_union_block_mask_is_sound(case: Case, block_size: int, head_offsets: str) -> None:
    """Per head (``visible`` is ``(1, H, S_q, S_kv)``): every block with an entry some head
    sees is listed, every full block is fully visible for EVERY head, the sides transpose."""
    case = dataclasses.replace(case, head_offsets=head_offsets)
    args = (case.segment_lengths, case.dilation_rates)
    m = one_line_mask(case, block_size=block_size)
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
    # with "split" a block is full iff it is full in every branch, each branch exactly
    one_branch_per_head = len(case.dilation_rates) == 1 or head_offsets == "split"
    check_block_mask(
        m.block_mask,
        visible[None],
        block_size,
        tight_touched=only_rate_one,
        tight_full=only_rate_one and one_branch_per_head and not case.is_causal,
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


def test_flex_mask_is_one_mapping_to_pass_whole() -> None:
    m = flex_mask([16, 32], [1, 2], q_len=64, num_heads=2, block_size=16)
    assert list(m) == ["block_mask", "score_mod"]
    assert dict(m) == {"block_mask": m.block_mask, "score_mod": m.score_mod}
    assert m["block_mask"] is m.block_mask and m["score_mod"] is m.score_mod
    with pytest.raises(KeyError):
        m["mask_mod"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.block_mask = m.block_mask  # type: ignore[misc]
    block_mask, score_mod = m  # not a tuple: no way to take the block mask alone by position
    assert (block_mask, score_mod) == ("block_mask", "score_mod")


def test_flex_mask_unpacks_in_compiled_code() -> None:
    m = flex_mask([16, 32], [1, 2], q_len=64, num_heads=2, block_size=16)
    q, k, v = (torch.randn(1, 2, 64, 8) for _ in range(3))
    call = torch.compile(
        lambda q, k, v, m: flex_attention(q, k, v, **m), backend="eager", fullgraph=True
    )
    truth = dilated_attention_reference(q, k, v, [16, 32], [1, 2])
    torch.testing.assert_close(call(q, k, v, m), truth)


no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a CPU-only torch")


@pytest.mark.parametrize(
    "device",
    [
        pytest.param("cuda", marks=no_cuda),
        pytest.param(torch.device("cuda", 0), marks=no_cuda),
        f"cuda:{torch.cuda.device_count()}",  # one past the last device, if any
    ],
    ids=str,
)
def test_flex_mask_on_an_unusable_cuda_device_raises_value_error(device: object) -> None:
    with pytest.raises(ValueError, match=r"^device=.*cuda"):
        flex_mask([8], [1], q_len=16, num_heads=1, device=device)  # type: ignore[arg-type]
