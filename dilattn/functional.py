"""``dilated_attention``: the functional fast path."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from dilattn import _strided
from dilattn._branch import Backend, branch_attention
from dilattn._checks import check_attention_inputs, default_scale
from dilattn.config import DilatedConfig, HeadOffsets

__all__ = ["dilated_attention", "resolve_backend"]


BackendName = Literal["auto", "strided", "flex", "math"]


def resolve_backend(
    backend: BackendName,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    *,
    return_lse: bool = False,
    head_offsets: HeadOffsets = "cyclic",
) -> Backend | Literal["strided"]:
    """The backend that runs on these inputs: ``"auto"`` is ``"math"`` off CUDA; on CUDA it
    is ``"strided"`` where that applies (fp16/bf16, ``S_q == S_kv``, head dims multiples of 8
    up to 128, no gradient through the lse), else ``"flex"``."""
    tensors, head_dim = (query, key, value), query.shape[-1]
    if backend not in ("auto", "strided", "flex", "math"):
        raise ValueError(f"backend must be 'auto', 'strided', 'flex' or 'math', got {backend!r}")
    needs_grad = torch.is_grad_enabled() and any(x.requires_grad for x in tensors)
    why_not = _strided.supports(query, key, value)
    if why_not is None and return_lse and needs_grad:
        why_not = "it does not differentiate through the returned lse"
    if backend == "strided" and why_not is not None:
        raise ValueError(f"backend='strided' cannot run here: {why_not}")
    if head_offsets == "split":
        if backend not in ("auto", "strided") or why_not is not None:
            raise ValueError(
                "head_offsets='split' runs on the strided backend only"
                + (f", which cannot run here: {why_not}" if why_not else f", got {backend!r}")
            )
        return "strided"
    if backend == "auto":
        backend = "math" if not query.is_cuda else "strided" if why_not is None else "flex"
    if backend == "strided":
        return backend
    if backend == "flex" and query.is_cuda and head_dim < 16:
        raise ValueError(f"the flex backend on CUDA needs head dims of at least 16, got {head_dim}")
    if backend == "flex" and not query.is_cuda and needs_grad:
        raise ValueError(
            "backend='flex' is forward-only off CUDA (FlexAttention has no CPU backward); "
            "use backend='math' (the default there) to train"
        )
    return backend


def dilated_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    *,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    return_lse: bool = False,
    head_offsets: HeadOffsets = "cyclic",
    backend: BackendName = "auto",
) -> Tensor | tuple[Tensor, Tensor]:
    """LongNet dilated attention (arXiv 2307.02486), exactly, on SDPA's layout.

    Branch ``(w, r)`` splits positions into segments ``[j*w, (j+1)*w)``; for head ``h``, the
    positions ``p`` with ``(p - j*w) % r == offset(h, r)`` attend to each other inside their
    segment. The branch outputs ``O_i`` merge by their softmax denominators:
    ``O = sum_i exp(lse_i - L) O_i``, ``L = logsumexp_i lse_i``. A row no branch covers gives 0.

    Args:
        query: ``(B, H, S_q, D)``, float16/bfloat16/float32/float64.
        key: ``(B, H_kv, S_kv, D)``; ``H_kv`` divides ``H`` when ``enable_gqa``.
        value: ``(B, H_kv, S_kv, D_v)``.
        segment_lengths: ``w_i``, one per branch; any ``S`` works (the last segment may be
            short, a segment longer than the sequence is the whole sequence).
        dilation_rates: ``r_i <= w_i``; ``w_i % r_i`` need not be 0.
        is_causal: mask keys after the query (positions aligned at 0 for both, as in SDPA).
        scale: score scale, default ``1 / sqrt(D)``.
        enable_gqa: allow ``H_kv < H`` (grouped-query attention).
        return_lse: also return the merged log-sum-exp, float32 ``(B, H, S_q)``.
        head_offsets: ``"cyclic"`` (``h % r``, the paper) or ``"grouped"`` (torchscale's
            ``h // ceil(H / r)``).
        backend: ``"strided"`` (each branch on strided views of q/k/v, no gather: cuDNN
            attention and an in-place Triton merge on CUDA, matmul on CPU; fp16/bf16 on CUDA,
            ``S_q == S_kv``, no gradient through the returned lse), ``"flex"``
            (FlexAttention per branch on gathered rows; compiled on CUDA, forward-only eager
            on CPU), ``"math"`` (matmul and softmax per gathered segment; any device,
            differentiable), or ``"auto"``: strided where it applies, else flex on CUDA and
            math elsewhere.

    Returns:
        ``(B, H, S_q, D_v)`` in the input dtype, and the lse when ``return_lse``.

    Equivalent PyTorch code: ``dilattn.reference.dilated_attention_reference``.
    """
    config = DilatedConfig(tuple(segment_lengths), tuple(dilation_rates), head_offsets)
    shapes = check_attention_inputs(query, key, value, enable_gqa=enable_gqa)
    chosen = resolve_backend(
        backend, query, key, value, return_lse=return_lse, head_offsets=config.head_offsets
    )
    if chosen == "strided":
        out, lse = _strided.strided_attention(
            query,
            key,
            value,
            config.branches,
            config.offsets(shapes.q_heads),
            is_causal=is_causal,
            scale=default_scale(scale, shapes.head_dim),
        )
        return (out, lse) if return_lse else out
    out, lse = branch_attention(
        query,
        key,
        value,
        config.branches,
        config.offsets(shapes.q_heads),
        is_causal=is_causal,
        scale=default_scale(scale, shapes.head_dim),
        backend=chosen,
    )
    return (out, lse) if return_lse else out
