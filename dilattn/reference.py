"""Dense, obviously correct dilated attention, written straight from the definition.

This is what the fast paths are tested against, and what you can check your own kernel
against. It materialises ``(H, S_q, S_kv)`` masks and scores: use it up to a few thousand
tokens, in ``float64`` for a ground truth.

* :func:`dilated_attention_reference` runs each branch as masked softmax attention and merges
  the branch outputs weighted by their softmax denominators (the paper's merge).
* :func:`dilated_attention_dense` runs ONE softmax over all keys with the additive bias
  ``log m``, where ``m`` counts the branches in which a query sees a key. The two agree:
  that identity is what makes :func:`dilattn.flex_mask` exact.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from dilattn._checks import check_attention_inputs, default_scale
from dilattn._softmax import softmax_with_lse
from dilattn.config import DilatedConfig, HeadOffsets

__all__ = [
    "branch_mask",
    "dilated_attention_dense",
    "dilated_attention_reference",
    "multiplicity",
]


def branch_mask(
    segment_length: int,
    dilation_rate: int,
    offsets: Sequence[int],
    *,
    q_len: int,
    kv_len: int,
    is_causal: bool = False,
    device: torch.device | str | None = None,
) -> Tensor:
    """Which key each query sees in one branch: bool ``(H, S_q, S_kv)``, ``H = len(offsets)``.

    Query ``p`` sees key ``p'`` for head ``h`` iff both lie in one segment
    (``p // w == p' // w``), both take part (``(p % w) % r == offsets[h]``, i.e. counted from
    the segment start), and, when causal, ``p' <= p``.
    """
    w, r = segment_length, dilation_rate
    o = torch.as_tensor(offsets, device=device).view(-1, 1, 1)
    q = torch.arange(q_len, device=device).view(1, -1, 1)
    k = torch.arange(kv_len, device=device).view(1, 1, -1)
    same_segment = (q // w) == (k // w)
    q_takes_part = (q % w) % r == o
    k_takes_part = (k % w) % r == o
    mask = same_segment & q_takes_part & k_takes_part
    return mask & (k <= q) if is_causal else mask


def multiplicity(
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    *,
    num_heads: int,
    q_len: int,
    kv_len: int | None = None,
    is_causal: bool = False,
    head_offsets: HeadOffsets = "cyclic",
    device: torch.device | str | None = None,
) -> Tensor:
    """``m(h, p, p')``: in how many branches query ``p`` sees key ``p'``;
    int64 ``(H, S_q, S_kv)``."""
    config = DilatedConfig(tuple(segment_lengths), tuple(dilation_rates), head_offsets)
    kv_len = q_len if kv_len is None else kv_len
    masks = [
        branch_mask(w, r, offsets, q_len=q_len, kv_len=kv_len, is_causal=is_causal, device=device)
        for (w, r), offsets in zip(config.branches, config.offsets(num_heads), strict=True)
    ]
    return torch.stack(masks).sum(0)


def _expand_kv(
    query: Tensor, key: Tensor, value: Tensor, enable_gqa: bool
) -> tuple[Tensor, Tensor]:
    shapes = check_attention_inputs(query, key, value, enable_gqa=enable_gqa)
    group = shapes.q_heads // shapes.kv_heads
    return key.repeat_interleave(group, dim=1), value.repeat_interleave(group, dim=1)


def _masked_attention(
    query: Tensor, key: Tensor, value: Tensor, bias: Tensor, scale: float
) -> tuple[Tensor, Tensor]:
    """Softmax attention with an additive ``(H, S_q, S_kv)`` bias (``-inf`` = masked)."""
    scores = query @ key.transpose(-2, -1) * scale + bias  # (B, H, S_q, S_kv)
    probs, lse = softmax_with_lse(scores, dim=-1)
    return probs @ value, lse


def dilated_attention_reference(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    *,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    head_offsets: HeadOffsets = "cyclic",
    return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Dilated attention by the definition: branch by branch, merged by softmax denominators.

    Args:
        query: ``(B, H, S_q, D)``.
        key, value: ``(B, H_kv, S_kv, D)`` and ``(B, H_kv, S_kv, D_v)``; ``H_kv`` divides ``H``
            when ``enable_gqa``.
        segment_lengths, dilation_rates: the branches ``(w_i, r_i)``.
        is_causal: keys after the query are masked (positions aligned at 0, as SDPA does).
        scale: score scale, default ``1 / sqrt(D)``.
        head_offsets: ``"cyclic"`` (``h % r``) or ``"grouped"`` (torchscale's groups).
        return_lse: also return the merged log-sum-exp ``(B, H, S_q)``, float of the input.

    Returns:
        ``(B, H, S_q, D_v)``: ``O = sum_i exp(lse_i - L) O_i`` with ``L = logsumexp_i lse_i``;
        rows that no branch covers give 0 (and ``L = -inf``).
    """
    config = DilatedConfig(tuple(segment_lengths), tuple(dilation_rates), head_offsets)
    key, value = _expand_kv(query, key, value, enable_gqa)
    scale = default_scale(scale, query.shape[-1])
    q_len, kv_len = query.shape[-2], key.shape[-2]
    outputs, lses = [], []
    for (w, r), offsets in zip(config.branches, config.offsets(query.shape[1]), strict=True):
        mask = branch_mask(
            w, r, offsets, q_len=q_len, kv_len=kv_len, is_causal=is_causal, device=query.device
        )
        bias = torch.zeros(mask.shape, dtype=query.dtype, device=query.device)
        out, lse = _masked_attention(query, key, value, bias.masked_fill(~mask, -torch.inf), scale)
        outputs.append(out)
        lses.append(lse)
    weights, merged_lse = softmax_with_lse(torch.stack(lses), dim=0)  # (N, B, H, S_q)
    out = (weights.unsqueeze(-1) * torch.stack(outputs)).sum(0)
    return (out, merged_lse) if return_lse else out


def dilated_attention_dense(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    *,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    head_offsets: HeadOffsets = "cyclic",
    return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """The same function as :func:`dilated_attention_reference`, as ONE softmax over all keys
    with bias ``log m(h, p, p')`` (``-inf`` where ``m = 0``). Arguments and result likewise."""
    key, value = _expand_kv(query, key, value, enable_gqa)
    m = multiplicity(
        segment_lengths,
        dilation_rates,
        num_heads=query.shape[1],
        q_len=query.shape[-2],
        kv_len=key.shape[-2],
        is_causal=is_causal,
        head_offsets=head_offsets,
        device=query.device,
    )
    bias = torch.log(m.to(query.dtype))  # log 0 = -inf masks
    out, lse = _masked_attention(query, key, value, bias, default_scale(scale, query.shape[-1]))
    return (out, lse) if return_lse else out
