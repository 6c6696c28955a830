"""Shared test helpers: random inputs, hypothesis strategies and the per-dtype error budget."""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from torch.nn.attention.flex_attention import BlockMask

from dilattn import MultiheadDilatedAttention, T5RelativeBias, alibi_score_mod, rotary, xpos
from dilattn.reference import dilated_attention_reference

# Profiles: "default" (CI), and "thorough" (HYPOTHESIS_PROFILE=thorough, `nox -s thorough`):
# ten times the examples and eight times the lengths, past the 128-row blocks of the block
# masks, where their edge cases live.
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "default")
SCALE = {"default": 1, "thorough": 10}[PROFILE]
LENGTH_SCALE = {"default": 1, "thorough": 8}[PROFILE]
for _name, _scale in (("default", 1), ("thorough", 10)):
    settings.register_profile(
        _name,
        deadline=None,
        max_examples=40 * _scale,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
settings.load_profile(PROFILE)


def examples(n: int) -> settings:
    """``@settings(max_examples=n)``, times the profile's scale."""
    return settings(max_examples=n * SCALE)


# The error budget (as FlashAttention's tests): a path's error against the float64 result may
# be at most `factor` times the error of plain PyTorch (the reference) in the same dtype, plus
# this absolute floor. Factor 2 for outputs, 4 for gradients.
ATOL = {
    torch.float64: 1e-10,
    torch.float32: 2e-6,
    torch.float16: 2e-3,
    torch.bfloat16: 1.5e-2,
}
LOW_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def assert_within_budget(
    actual: torch.Tensor, baseline: torch.Tensor, truth: torch.Tensor, *, factor: float = 2.0
) -> None:
    """``|actual - truth| <= factor * |baseline - truth| + atol`` (max norms; -inf == -inf)."""
    assert actual.shape == truth.shape, (actual.shape, truth.shape)
    a, b, t = (x.double() for x in (actual, baseline, truth))
    same_inf = torch.isinf(t) & (a == t)
    assert not torch.isnan(a).any(), "NaN in result"
    assert torch.equal(torch.isinf(a), torch.isinf(t)), "infinities differ"
    err = (a - t).masked_fill(same_inf, 0).abs().max().item() if a.numel() else 0.0
    base = (b - t).masked_fill(torch.isinf(t), 0).abs().max().item() if a.numel() else 0.0
    budget = factor * base + ATOL[actual.dtype]
    assert err <= budget, f"error {err:.3g} > budget {budget:.3g} (baseline {base:.3g})"


@dataclass(frozen=True)
class Case:
    """One drawn problem: a configuration and shapes."""

    segment_lengths: tuple[int, ...]
    dilation_rates: tuple[int, ...]
    batch: int
    q_heads: int
    kv_heads: int
    q_len: int
    kv_len: int
    head_dim: int
    value_dim: int
    is_causal: bool
    head_offsets: str

    @property
    def kwargs(self) -> dict[str, object]:
        return {
            "is_causal": self.is_causal,
            "enable_gqa": self.q_heads != self.kv_heads,
            "head_offsets": self.head_offsets,
        }

    def inputs(self, dtype: torch.dtype, device: str = "cpu", requires_grad: bool = False):
        """Fresh random ``q, k, v`` in float64 and the same values in ``dtype``."""
        shapes = [
            (self.batch, self.q_heads, self.q_len, self.head_dim),
            (self.batch, self.kv_heads, self.kv_len, self.head_dim),
            (self.batch, self.kv_heads, self.kv_len, self.value_dim),
        ]
        low = [torch.randn(s, device=device).to(dtype) for s in shapes]
        exact = [x.double().requires_grad_(requires_grad) for x in low]
        return exact, [x.clone().requires_grad_(requires_grad) for x in low]


@st.composite
def cases(
    draw: st.DrawFn,
    *,
    max_len: int = 48,
    same_lengths: bool = False,
    max_segment: int = 24,
    causal: bool | None = None,
) -> Case:
    max_len, max_segment = max_len * LENGTH_SCALE, max_segment * LENGTH_SCALE
    branches = draw(st.integers(1, 3))
    segments = [draw(st.integers(1, max_segment)) for _ in range(branches)]
    rates = [draw(st.integers(1, min(w, 6))) for w in segments]
    kv_heads = draw(st.sampled_from([1, 2, 3]))
    q_len = draw(st.integers(1, max_len))
    return Case(
        segment_lengths=tuple(segments),
        dilation_rates=tuple(rates),
        batch=draw(st.integers(1, 2)),
        q_heads=kv_heads * draw(st.sampled_from([1, 2])),
        kv_heads=kv_heads,
        q_len=q_len,
        kv_len=q_len
        if same_lengths
        else draw(st.sampled_from([q_len, draw(st.integers(1, max_len))])),
        head_dim=draw(st.sampled_from([4, 8])),
        value_dim=draw(st.sampled_from([4, 6])),
        is_causal=draw(st.booleans()) if causal is None else causal,
        head_offsets=draw(st.sampled_from(["cyclic", "grouped"])),
    )


def _dense(num: torch.Tensor, indices: torch.Tensor, cols: int) -> torch.Tensor:
    """Expand ``(num_blocks, indices)`` rows into a dense bool block matrix."""
    listed = torch.arange(indices.shape[-1]) < num.unsqueeze(-1)
    target = torch.where(listed, indices.long(), cols)
    dense = torch.zeros(*num.shape, cols + 1, dtype=torch.bool)
    return dense.scatter_(-1, target, True)[..., :cols]


def _blocks_of(mask: torch.Tensor, bs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(touched, full)`` per block pair of an element mask ``(B, H, Sq, Skv)``, over all heads;
    entries past the sequence ends do not exist (flex masks them itself)."""
    B, H, Sq, Skv = mask.shape
    nq, nk = -(-Sq // bs), -(-Skv // bs)
    padded = torch.zeros(B, H, nq * bs, nk * bs, dtype=torch.bool)
    real = padded.clone()
    padded[..., :Sq, :Skv] = mask
    real[..., :Sq, :Skv] = True
    blocks = padded.view(B, H, nq, bs, nk, bs)
    touched = blocks.any(5).any(3).any(1)
    full = (blocks | ~real.view(B, H, nq, bs, nk, bs)).all(5).all(3).all(1)
    return touched, full


def check_block_mask(
    bm: BlockMask, mask: torch.Tensor, bs: int, *, tight_full: bool, tight_touched: bool
) -> None:
    """``bm`` is sound for the element mask ``mask`` ``(B, H, Sq, Skv)``: every visible entry
    lies in a listed block, full blocks are fully visible (and, where ``tight_*``, the lists
    are exactly the blocks with a visible entry / fully visible), the transpose agrees."""
    nq, nk = bm.kv_num_blocks.shape[-1], bm.q_num_blocks.shape[-1]
    partial = _dense(bm.kv_num_blocks, bm.kv_indices, nk)[:, 0]
    full = _dense(bm.full_kv_num_blocks, bm.full_kv_indices, nk)[:, 0]
    true_touched, true_full = _blocks_of(mask, bs)
    assert not (partial & full).any(), "a block is both partial and full"
    assert not (true_touched & ~(partial | full)).any(), "a visible entry lies in a skipped block"
    assert not (full & ~true_full).any(), "a block marked full has masked entries"
    if tight_touched:
        assert torch.equal(partial | full, true_touched.expand_as(full))
    if tight_full:
        assert torch.equal(full, true_full.expand_as(full))
    # the backward pass reads the transpose: it must be exactly the transpose
    q_partial = _dense(bm.q_num_blocks, bm.q_indices, nq)[:, 0]
    q_full = _dense(bm.full_q_num_blocks, bm.full_q_indices, nq)[:, 0]
    assert torch.equal(q_partial, partial.transpose(-1, -2))
    assert torch.equal(q_full, full.transpose(-1, -2))


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _wave(score, b, h, q_idx, kv_idx):
    """A score mod that uses every index: it catches compact indices passed for positions."""
    return score + 0.5 * torch.sin(0.7 * q_idx - 0.3 * kv_idx + h + 2 * b)


@dataclass(frozen=True)
class Extras:
    """Drawn extras of one call: padding, documents, a score mod and the query offset."""

    padding: bool
    documents: str  # "none" | "ids" | "cu_seqlens"
    score_mod: str  # "none" | "alibi" | "t5" | "wave"
    q_offset: int
    seed: int

    def kwargs(
        self, case: Case, device: str = "cpu", learnable: list | None = None
    ) -> dict[str, object]:
        """The keyword arguments, from fresh random tensors (seeded by ``seed``): padding keys
        with probability 0.3 and sometimes a whole batch row padded; documents of random
        lengths; a T5 table of unit scale (appended to ``learnable``)."""
        gen = torch.Generator().manual_seed(self.seed)
        out: dict[str, object] = {"q_offset": self.q_offset}
        length = max(self.q_offset + case.q_len, case.kv_len)
        if self.padding:
            mask = torch.rand(case.batch, case.kv_len, generator=gen) < 0.3
            if case.batch > 1 and self.seed % 3 == 0:
                mask[-1] = True  # a batch row with nothing to see
            out["key_padding_mask"] = mask.to(device)
        starts = torch.rand(case.batch, length, generator=gen) < 0.2
        if self.documents == "ids":
            out["document_ids"] = (starts.cumsum(-1) * 3 + 1).to(device)  # any integers
        elif self.documents == "cu_seqlens":
            cuts = torch.nonzero(starts[0, 1:]).view(-1) + 1
            out["cu_seqlens"] = torch.cat(
                [torch.zeros(1, dtype=torch.long), cuts, torch.tensor([length])]
            ).to(device)
        if self.score_mod == "alibi":
            out["score_mod"] = alibi_score_mod(case.q_heads)
        elif self.score_mod == "t5":
            t5 = T5RelativeBias(
                case.q_heads, num_buckets=8, max_distance=20, bidirectional=not case.is_causal
            )
            with torch.no_grad():
                t5.bias.normal_(generator=gen)
            t5 = t5.double().to(device)
            out["score_mod"] = t5.score_mod
            if learnable is not None:
                learnable.append(t5.bias)
        elif self.score_mod == "wave":
            out["score_mod"] = _wave
        return out


@st.composite
def extras(draw: st.DrawFn, case: Case, *, q_offset: bool = True) -> Extras:
    """Extras for ``case``; ``q_offset`` is 0, ``S_kv - S_q`` (decoding) or anything."""
    decode = max(case.kv_len - case.q_len, 0)
    offsets = [0, decode, draw(st.integers(0, 2 * case.q_len))] if q_offset else [0]
    return Extras(
        padding=draw(st.booleans()),
        documents=draw(st.sampled_from(["none", "ids", "cu_seqlens"])),
        score_mod=draw(st.sampled_from(["none", "alibi", "t5", "wave"])),
        q_offset=draw(st.sampled_from(offsets)),
        seed=draw(st.integers(0, 2**16)),
    )


def module_reference(
    m: MultiheadDilatedAttention,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    is_causal: bool,
    dtype: torch.dtype = torch.float64,
    **kwargs: object,
) -> torch.Tensor:
    """What ``m`` computes, written out by hand in ``dtype`` around the dense reference (with
    ``m``'s own parameters, so gradients reach them): the float64 truth, or plain PyTorch in
    a low precision as the baseline of the error budget."""

    def linear(layer: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
        bias = None if layer.bias is None else layer.bias.to(dtype)
        return F.linear(x.to(dtype), layer.weight.to(dtype), bias)

    def norm(layer: torch.nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
        weight, bias = layer.weight.to(dtype), layer.bias.to(dtype)
        return F.layer_norm(x, x.shape[-1:], weight, bias, layer.eps)

    H, H_kv = m.num_heads, m.num_kv_heads
    q = rearrange(linear(m.q_proj, query), "b s (h d) -> b h s d", h=H)
    k = rearrange(linear(m.k_proj, key), "b s (h d) -> b h s d", h=H_kv)
    v = rearrange(linear(m.v_proj, value), "b s (h d) -> b h s d", h=H_kv)
    if m.q_norm is not None and m.k_norm is not None:
        q, k = norm(m.q_norm, q), norm(m.k_norm, k)
    q_pos, k_pos = (torch.arange(x.shape[2], device=x.device) for x in (q, k))
    if m.position == "rotary":
        q, k = rotary(q, q_pos, base=m.rotary_base), rotary(k, k_pos, base=m.rotary_base)
    elif m.position == "xpos":
        sb = m.xpos_scale_base
        q = xpos(q, q_pos, key=False, base=m.rotary_base, scale_base=sb)
        k = xpos(k, k_pos, key=True, base=m.rotary_base, scale_base=sb)
    score_mod = None
    if m.position == "alibi":
        score_mod = alibi_score_mod(H)
    elif m.relative_bias is not None:
        t5, table = m.relative_bias, m.relative_bias.bias.to(dtype)
        score_mod = lambda score, b, h, q_idx, kv_idx: score + table[t5.bucket(kv_idx - q_idx), h]
    out = dilated_attention_reference(
        q,
        k,
        v,
        m.config.segment_lengths,
        m.config.dilation_rates,
        is_causal=is_causal,
        enable_gqa=H_kv != H,
        head_offsets=m.config.head_offsets,
        score_mod=score_mod,
        **kwargs,
    )
    out = rearrange(out, "b h s d -> b s (h d)")
    if m.norm is not None:
        out = norm(m.norm, out)
    return linear(m.out_proj, out)


def run_ranks(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    config,
    *,
    world: int,
    is_causal: bool,
    backend: str = "math",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank of a sequence-parallel run in this process, the all-to-all done by split and
    cat: the whole ``(B, H, S, D_v)`` output and lse, differentiable like the real thing."""
    from dilattn.distributed import sequence_parallel as sp

    S = query.shape[2]
    chunk = -(-S // world)
    pad = [torch.nn.functional.pad(x, (0, 0, 0, chunk * world - S)) for x in (query, key, value)]
    chunks = [[x[:, :, i * chunk : (i + 1) * chunk] for x in pad] for i in range(world)]
    plans = [
        sp.plan(
            config,
            num_heads=query.shape[1],
            kv_heads=key.shape[1],
            chunk=chunk,
            world=world,
            rank=i,
            seq_len=S,
            is_causal=is_causal,
            device=query.device,
        )
        for i in range(world)
    ]
    for s in range(world):  # what s sends to d is what d expects from s
        assert [p.recv_splits[s] for p in plans] == list(plans[s].send_splits)
    sent = [
        sp.take_rows(k, v, p.send).split(list(p.send_splits))
        for (_, k, v), p in zip(chunks, plans, strict=True)
    ]
    results = [
        sp.attend_chunk(
            *chunks[d],
            torch.cat([sent[s][d] for s in range(world)]),
            config,
            plans[d],
            is_causal=is_causal,
            scale=query.shape[-1] ** -0.5,
            enable_gqa=query.shape[1] != key.shape[1],
            backend=backend,  # type: ignore[arg-type]
        )
        for d in range(world)
    ]
    out = torch.cat([o for o, _ in results], 2)[:, :, :S]
    return out, torch.cat([lse for _, lse in results], 2)[:, :, :S]
