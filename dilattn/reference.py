"""Dense, obviously correct dilated attention, written straight from the definition.

This is what the fast paths are tested against, and what you can check your own kernel
against. It materialises ``(H, S_q, S_kv)`` masks and scores: use it up to a few thousand
tokens, in ``float64`` for a ground truth.

* :func:`dilated_attention_reference` runs each branch as masked softmax attention and merges
  the branch outputs weighted by their softmax denominators (the paper's merge).
* :func:`dilated_attention_dense` runs ONE softmax over all keys with the additive bias
  ``log m``, where ``m`` counts the branches in which a query sees a key. The two agree:
  that identity is what makes :func:`dilattn.flex_mask` exact.
* :func:`local_attention_reference` is masked softmax attention over :func:`local_mask`; a
  ``local_window`` of the dilated functions is one more branch, merged like the others.

Both also define the extras every path honours:

* positions: key ``j`` is at position ``j``, query row ``i`` at ``q_offset + i`` (default 0;
  decoding with a KV cache passes ``q_offset = S_kv - S_q``, bottom-right alignment). The
  branch segments, the dilation pattern and causality (key position <= query position) all
  use these absolute positions;
* ``key_padding_mask`` ``(B, S_kv)`` bool, ``True`` = padding key, seen by no query;
* ``document_ids`` ``(B, L)``, ``L = max(q_offset + S_q, S_kv)`` (or ``cu_seqlens``): a query
  sees only keys of its own document. Dilation does NOT restart per document: segments stay
  anchored at position 0 and documents only remove pairs;
* ``score_mod(score, b, h, q_idx, kv_idx) -> score`` (FlexAttention's signature) with
  ``q_idx``, ``kv_idx`` the absolute positions, applied to the scaled score before the masks
  and before the ``log m`` term.

A row with no visible key outputs 0 with lse ``-inf``, never NaN.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.flex_attention import _score_mod_signature

from dilattn._call import AttentionCall, Extras
from dilattn._checks import check_bool
from dilattn._softmax import softmax_with_lse
from dilattn.config import DilatedConfig, HeadOffsets, Window, make_window, sliding_window

__all__ = [
    "branch_mask",
    "dilated_attention_dense",
    "dilated_attention_reference",
    "linear_attention_reference",
    "local_attention_reference",
    "local_mask",
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
    q_offset: int = 0,
    device: torch.device | str | None = None,
) -> Tensor:
    """Which key each query sees in one branch: bool ``(H, S_q, S_kv)``, ``H = len(offsets)``.

    Query row ``i`` is at position ``p = q_offset + i``, key ``j`` at ``p' = j``. The query
    sees the key for head ``h`` iff both lie in one segment (``p // w == p' // w``), both take
    part (``(p % w) % r == offsets[h]``, i.e. counted from the segment start), and, when
    causal, ``p' <= p``.
    """
    check_bool("is_causal", is_causal)
    w, r = segment_length, dilation_rate
    o = torch.as_tensor(offsets, device=device).view(-1, 1, 1)
    q = torch.arange(q_offset, q_offset + q_len, device=device).view(1, -1, 1)
    k = torch.arange(kv_len, device=device).view(1, 1, -1)
    same_segment = (q // w) == (k // w)
    q_takes_part = (q % w) % r == o
    k_takes_part = (k % w) % r == o
    mask = same_segment & q_takes_part & k_takes_part
    return mask & (k <= q) if is_causal else mask


def local_mask(
    window_size: int,
    *,
    look_backward: int = 1,
    look_forward: int | None = None,
    exact_windowsize: bool = False,
    q_len: int,
    kv_len: int,
    is_causal: bool = False,
    q_offset: int = 0,
    device: torch.device | str | None = None,
) -> Tensor:
    """Which key each query sees in a local window: bool ``(S_q, S_kv)``.

    Query row ``i`` at ``p = q_offset + i``, key ``j`` at ``p' = j``, ``W = window_size``.
    Sliding (``exact_windowsize``): ``p - look_backward * W <= p' <= p + look_forward * W``.
    Bucketed: ``p // W - look_backward <= p' // W <= p // W + look_forward``. Causal: and
    ``p' <= p``. ``look_forward`` defaults to 0 when causal, else 1.
    """
    window = make_window(
        window_size,
        look_backward=look_backward,
        look_forward=look_forward,
        exact_windowsize=exact_windowsize,
        is_causal=is_causal,
    )
    return _window_mask(window, q_len, kv_len, q_offset, device)


def _window_mask(
    window: Window, q_len: int, kv_len: int, q_offset: int, device: torch.device | str | None
) -> Tensor:
    """:func:`local_mask` of a validated window: bool ``(S_q, S_kv)``."""
    W, back, ahead = window.size, window.backward, window.forward
    q = torch.arange(q_offset, q_offset + q_len, device=device).view(-1, 1)
    k = torch.arange(kv_len, device=device).view(1, -1)
    if window.exact:
        mask = (k >= q - back * W) & (k <= q + ahead * W)
    else:
        mask = (k // W >= q // W - back) & (k // W <= q // W + ahead)
    return mask & (k <= q) if window.is_causal else mask


def multiplicity(
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    *,
    num_heads: int,
    q_len: int,
    kv_len: int | None = None,
    is_causal: bool = False,
    head_offsets: HeadOffsets = "cyclic",
    q_offset: int = 0,
    device: torch.device | str | None = None,
    local_window: int | None = None,
) -> Tensor:
    """``m(h, p, p')``: in how many branches (the local one included) query ``p`` sees key
    ``p'``; int64 ``(H, S_q, S_kv)`` (query row ``i`` at position ``q_offset + i``)."""
    check_bool("is_causal", is_causal)
    config = DilatedConfig.of(segment_lengths, dilation_rates, head_offsets, local_window)
    kv_len = q_len if kv_len is None else kv_len
    return _count(_branch_masks(config, num_heads, q_len, kv_len, is_causal, q_offset, device))


def _branch_masks(
    config: DilatedConfig,
    num_heads: int,
    q_len: int,
    kv_len: int,
    is_causal: bool,
    q_offset: int,
    device: torch.device | str | None,
) -> list[Tensor]:
    """Which key each query sees in each branch: bool ``(H, S_q, S_kv)``, the local window's
    ``(1, S_q, S_kv)`` last."""
    masks = [
        branch_mask(
            w,
            r,
            offsets,
            q_len=q_len,
            kv_len=kv_len,
            is_causal=is_causal,
            q_offset=q_offset,
            device=device,
        )
        for (w, r), offsets in zip(config.branches, config.offsets(num_heads), strict=True)
    ]
    if config.local_window is not None:
        window = sliding_window(config.local_window, is_causal)
        masks.append(_window_mask(window, q_len, kv_len, q_offset, device)[None])
    return masks


def _count(masks: list[Tensor]) -> Tensor:
    """In how many of ``masks`` (the first ``(H, S_q, S_kv)``) a query sees a key: int64."""
    return torch.stack([m.expand_as(masks[0]) for m in masks]).sum(0)


def _masks(call: AttentionCall[DilatedConfig] | AttentionCall[Window]) -> list[Tensor]:
    """Which key each query sees in each branch of the call's pattern: bool ``(H or 1, S_q,
    S_kv)``."""
    s, pattern, device = call.shapes, call.pattern, call.query.device
    if isinstance(pattern, Window):
        return [_window_mask(pattern, s.q_len, s.kv_len, call.q_offset, device)[None]]
    return _branch_masks(
        pattern, s.q_heads, s.q_len, s.kv_len, call.is_causal, call.q_offset, device
    )


def _repeated(call: AttentionCall[Any]) -> tuple[Tensor, Tensor]:
    """Keys and values with the query's heads: ``(B, H, S_kv, D)``, ``(B, H, S_kv, D_v)``."""
    group = call.shapes.q_heads // call.shapes.kv_heads
    return call.key.repeat_interleave(group, dim=1), call.value.repeat_interleave(group, dim=1)


def _visible(call: AttentionCall[Any]) -> Tensor | None:
    """The keys padding and documents leave each query: bool ``(B, 1, S_q, S_kv)`` (``None``:
    every key)."""
    visible = None
    if call.key_padding_mask is not None:
        visible = ~call.key_padding_mask[:, None, None, :]  # (B, 1, 1, S_kv)
    if call.document_ids is not None:
        documents, s = call.document_ids, call.shapes
        q_docs = documents[:, call.q_offset : call.q_offset + s.q_len]
        same = q_docs[:, None, :, None] == documents[:, None, None, : s.kv_len]
        visible = same if visible is None else visible & same  # (B, 1, S_q, S_kv)
    return visible


def _scores(call: AttentionCall[Any], key: Tensor) -> Tensor:
    """Scaled scores ``(B, H, S_q, S_kv)`` against ``key`` ``(B, H, S_kv, D)``, through the
    score mod at absolute positions."""
    scores = call.query @ key.transpose(-2, -1) * call.scale
    if call.score_mod is None:
        return scores
    B, H, q_len, kv_len = scores.shape
    device = call.query.device
    index = (
        torch.arange(n, device=device).view(shape)
        for n, shape in ((B, (-1, 1, 1, 1)), (H, (1, -1, 1, 1)), (kv_len, (1, 1, 1, -1)))
    )
    b, h, kv_idx = index
    q_idx = torch.arange(call.q_offset, call.q_offset + q_len, device=device)
    return call.score_mod(scores, b, h, q_idx.view(1, 1, -1, 1), kv_idx).to(scores.dtype)


def _softmax(call: AttentionCall[Any], scores: Tensor) -> tuple[Tensor, Tensor]:
    """Softmax and lse of ``scores`` ``(B, H, S_q, S_kv)`` (``-inf`` = masked) over the keys
    that padding and documents leave."""
    visible = _visible(call)
    if visible is not None:
        scores = scores.masked_fill(~visible, -torch.inf)
    return softmax_with_lse(scores, dim=-1)


def _merged(call: AttentionCall[DilatedConfig] | AttentionCall[Window]) -> tuple[Tensor, Tensor]:
    """Masked softmax attention in each branch, merged by the softmax denominators: the output
    ``(B, H, S_q, D_v)`` and the lse ``(B, H, S_q)``."""
    key, value = _repeated(call)
    scores = _scores(call, key)
    outputs, lses = [], []
    for mask in _masks(call):
        probs, lse = _softmax(call, scores.masked_fill(~mask, -torch.inf))
        outputs.append(probs @ value)
        lses.append(lse)
    weights, merged_lse = softmax_with_lse(torch.stack(lses), dim=0)  # (N, B, H, S_q)
    return (weights.unsqueeze(-1) * torch.stack(outputs)).sum(0), merged_lse


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
    key_padding_mask: Tensor | None = None,
    document_ids: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
    score_mod: _score_mod_signature | None = None,
    q_offset: int = 0,
    local_window: int | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Dilated attention by the definition: branch by branch, merged by softmax denominators.

    Args:
        query: ``(B, H, S_q, D)``.
        key, value: ``(B, H_kv, S_kv, D)`` and ``(B, H_kv, S_kv, D_v)``; ``H_kv`` divides ``H``
            when ``enable_gqa``.
        segment_lengths, dilation_rates: the branches ``(w_i, r_i)``.
        is_causal: keys after the query's position are masked.
        scale: score scale, default ``1 / sqrt(D)``.
        head_offsets: ``"cyclic"`` (``h % r``) or ``"grouped"`` (torchscale's groups).
        return_lse: also return the merged log-sum-exp ``(B, H, S_q)``, float of the input.
        key_padding_mask: ``(B, S_kv)`` bool, ``True`` = padding key (ignored).
        document_ids: ``(B, max(q_offset + S_q, S_kv))`` integers: a query sees only keys of
            its own document (segments are NOT restarted per document).
        cu_seqlens: ``(n + 1,)`` cumulative document lengths, instead of ``document_ids``.
        score_mod: ``score_mod(score, b, h, q_idx, kv_idx) -> score`` at absolute positions,
            on the scaled score, before the masks.
        q_offset: the position of query row 0 (keys start at 0).
        local_window: ``n``: one more branch, the sliding window ``|p - p'| <= n`` (every
            head; causal: ``p - n <= p' <= p``), merged like the dilated ones.

    Returns:
        ``(B, H, S_q, D_v)``: ``O = sum_i exp(lse_i - L) O_i`` with ``L = logsumexp_i lse_i``;
        rows that see no key give 0 (and ``L = -inf``).
    """
    extras = Extras(key_padding_mask, document_ids, cu_seqlens, score_mod, q_offset)
    config = DilatedConfig.of(segment_lengths, dilation_rates, head_offsets, local_window)
    call = AttentionCall.of(query, key, value, config, is_causal, scale, enable_gqa, extras)
    out, lse = _merged(call)
    return (out, lse) if return_lse else out


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
    key_padding_mask: Tensor | None = None,
    document_ids: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
    score_mod: _score_mod_signature | None = None,
    q_offset: int = 0,
    local_window: int | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """The same function as :func:`dilated_attention_reference`, as ONE softmax over all keys
    with bias ``log m(h, p, p')`` (``-inf`` where ``m = 0``). Arguments and result likewise."""
    extras = Extras(key_padding_mask, document_ids, cu_seqlens, score_mod, q_offset)
    config = DilatedConfig.of(segment_lengths, dilation_rates, head_offsets, local_window)
    call = AttentionCall.of(query, key, value, config, is_causal, scale, enable_gqa, extras)
    key, value = _repeated(call)
    m = _count(_masks(call))  # (H, S_q, S_kv)
    probs, lse = _softmax(call, _scores(call, key) + torch.log(m.to(query.dtype)))  # log 0 = -inf
    out = probs @ value
    return (out, lse) if return_lse else out


def local_attention_reference(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    window_size: int,
    *,
    look_backward: int = 1,
    look_forward: int | None = None,
    exact_windowsize: bool = False,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    return_lse: bool = False,
    key_padding_mask: Tensor | None = None,
    document_ids: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
    score_mod: _score_mod_signature | None = None,
    q_offset: int = 0,
) -> Tensor | tuple[Tensor, Tensor]:
    """Local attention by the definition: softmax over the keys of :func:`local_mask`.
    Arguments and result as :func:`dilattn.local_attention`."""
    window = make_window(
        window_size,
        look_backward=look_backward,
        look_forward=look_forward,
        exact_windowsize=exact_windowsize,
        is_causal=is_causal,
    )
    extras = Extras(key_padding_mask, document_ids, cu_seqlens, score_mod, q_offset)
    call = AttentionCall.of(query, key, value, window, is_causal, scale, enable_gqa, extras)
    out, lse = _merged(call)
    return (out, lse) if return_lse else out


def linear_attention_reference(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    *,
    is_causal: bool = False,
    enable_gqa: bool = False,
    key_padding_mask: Tensor | None = None,
    q_offset: int = 0,
) -> Tensor:
    """Linear attention by the definition: the explicit ``(S_q, S_kv)`` matrix
    ``A = phi(Q) phi(K)^T`` (``phi = elu + 1``), masked (causal: key position
    ``<= q_offset + i``; padding), each row divided by its sum (0 for an empty row), times
    ``V``. Arguments and result as :func:`dilattn.linear_attention`."""
    extras = Extras(key_padding_mask, q_offset=q_offset)
    call = AttentionCall.of(query, key, value, None, is_causal, None, enable_gqa, extras)
    key, value = _repeated(call)
    phi_q, phi_k = F.elu(query) + 1, F.elu(key) + 1
    weights = phi_q @ phi_k.transpose(-2, -1)  # (B, H, S_q, S_kv)
    q_len, kv_len = query.shape[-2], key.shape[-2]
    if is_causal:
        q = torch.arange(call.q_offset, call.q_offset + q_len, device=query.device)
        weights = weights.masked_fill(torch.arange(kv_len, device=query.device) > q[:, None], 0)
    visible = _visible(call)
    if visible is not None:
        weights = weights.masked_fill(~visible, 0)
    total = weights.sum(-1, keepdim=True)
    return weights / total.masked_fill(total == 0, 1) @ value
