"""``dilated_attention``: the functional fast path."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import _score_mod_signature

from dilattn._call import AttentionCall, Extras
from dilattn.config import DilatedConfig, HeadOffsets, sliding_window
from dilattn.engines import BackendName, Dispatch, dispatch, strided
from dilattn.engines.flex_strided import Visibility, captures_tensors, flex_strided_attention
from dilattn.engines.gather import Backend, PositionMods, branch_attention
from dilattn.engines.window import window_attention
from dilattn.merge import merge_by_lse

__all__ = ["BackendName", "dilated_attention", "explain", "resolve_backend"]


def resolve_backend(
    backend: BackendName,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    *,
    head_offsets: HeadOffsets = "cyclic",
    extras: str | None = None,
    dropout_p: float = 0.0,
) -> Backend | Literal["strided"]:
    """The kind of engine :func:`dilattn._dispatch.dispatch` picks (``"strided"``, ``"flex"``
    or ``"math"``), for callers that run gathered rows (local windows, sequence parallelism)."""
    engine = dispatch(
        backend,
        query,
        key,
        value,
        head_offsets=head_offsets,
        extras=() if extras is None else (extras,),
        dropout_p=dropout_p,
        q_offset=1,  # gathered rows: never the strided views
    ).engine
    return "flex" if engine.startswith("flex") else engine  # type: ignore[return-value]


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
    key_padding_mask: Tensor | None = None,
    document_ids: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
    score_mod: _score_mod_signature | None = None,
    q_offset: int = 0,
    dropout_p: float = 0.0,
    local_window: int | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """LongNet dilated attention (arXiv 2307.02486), exactly, on SDPA's layout.

    Branch ``(w, r)`` splits positions into segments ``[j*w, (j+1)*w)``; for head ``h``, the
    positions ``p`` with ``(p - j*w) % r == offset(h, r)`` attend to each other inside their
    segment. The branch outputs ``O_i`` merge by their softmax denominators:
    ``O = sum_i exp(lse_i - L) O_i``, ``L = logsumexp_i lse_i``. A row that sees no key
    (no branch covers it, or padding and documents hide every key) gives 0, never NaN.

    Positions: key ``j`` is at position ``j``, query row ``i`` at ``q_offset + i``. Segments,
    dilation, causality, documents and ``score_mod`` all use these positions, so decoding with
    a KV cache (``S_q`` new tokens after ``S_kv - S_q`` cached ones) passes
    ``q_offset = S_kv - S_q`` and gets exactly the rows of the full computation.

    Args:
        query: ``(B, H, S_q, D)``, float16/bfloat16/float32/float64.
        key: ``(B, H_kv, S_kv, D)``; ``H_kv`` divides ``H`` when ``enable_gqa``.
        value: ``(B, H_kv, S_kv, D_v)``.
        segment_lengths: ``w_i``, one per branch; any ``S`` works (the last segment may be
            short, a segment longer than the sequence is the whole sequence).
        dilation_rates: ``r_i <= w_i``; ``w_i % r_i`` need not be 0.
        is_causal: mask keys after the query's position (key position <= query position).
        scale: score scale, default ``1 / sqrt(D)``.
        enable_gqa: allow ``H_kv < H`` (grouped-query attention).
        return_lse: also return the merged log-sum-exp ``(B, H, S_q)``, float32 (float64 for
            float64 inputs).
        head_offsets: ``"cyclic"`` (``h % r``, the paper), ``"grouped"`` (torchscale's
            ``h // ceil(H / r)``) or ``"split"`` (each head computes one branch, as
            dilated-attention-pytorch; strided backend).
        backend: ``"strided"`` (each branch on strided views of q/k/v, no gather: cuDNN
            attention and an in-place Triton merge on CUDA, matmul on CPU; fp16/bf16 on CUDA,
            ``S_q == S_kv``, none of the arguments below), ``"flex"`` (FlexAttention per
            branch on gathered rows; compiled on CUDA, forward-only eager on CPU), ``"math"``
            (matmul and softmax per gathered segment; any device, differentiable), or
            ``"auto"``: strided where it applies, else flex on CUDA and math elsewhere.
        key_padding_mask: ``(B, S_kv)`` bool, torch's meaning: ``True`` = padding key, ignored.
        document_ids: ``(B, max(q_offset + S_q, S_kv))`` integers, the document of each
            position (packed sequences): a query sees only keys of its own document. Dilation
            does NOT restart per document: segments stay anchored at position 0.
        cu_seqlens: ``(n + 1,)`` integer cumulative document lengths from 0 to
            ``max(q_offset + S_q, S_kv)``, shared by the batch; instead of ``document_ids``.
        score_mod: FlexAttention's ``score_mod(score, b, h, q_idx, kv_idx) -> score``, with
            ``b`` the batch row, ``h`` the query head and ``q_idx``, ``kv_idx`` the absolute
            positions; applied to the scaled score before the masks (e.g.
            :func:`dilattn.alibi_score_mod`).
        q_offset: the position of query row 0 (default 0: both aligned at 0, as in SDPA).
        dropout_p: dropout on each branch's attention probabilities (the merge weights are
            not dropped); ``backend="math"`` only, applied whenever ``dropout_p > 0``.
        local_window: ``n``: one more branch for every head, the sliding window
            ``|p - p'| <= n`` (causal: ``p - n <= p' <= p``), merged by its softmax
            denominator like the others (:func:`dilattn.local_attention` computes it alone).

    Returns:
        ``(B, H, S_q, D_v)`` in the input dtype, and the lse when ``return_lse``.

    Raises:
        TypeError, ValueError: an argument of the wrong type or value (the message names it),
            e.g. a non-bool ``is_causal``, an empty batch or a head dim of 0; ``ValueError``
            also when ``backend`` cannot run the call (with every engine's reason).

    Equivalent PyTorch code: ``dilattn.reference.dilated_attention_reference``.
    """
    extras = Extras(key_padding_mask, document_ids, cu_seqlens, score_mod, q_offset, dropout_p)
    config = DilatedConfig.of(segment_lengths, dilation_rates, head_offsets, local_window)
    call = AttentionCall.of(query, key, value, config, is_causal, scale, enable_gqa, extras)
    out, lse = attend_call(call, backend)
    return (out, lse) if return_lse else out


def attend_call(call: AttentionCall[DilatedConfig], backend: BackendName) -> tuple[Tensor, Tensor]:
    """:func:`dilated_attention` of a checked call, on the engine that ``backend`` picks: the
    output ``(B, H, S_q, D_v)`` and the lse ``(B, H, S_q)``."""
    query, key, value, config = call.query, call.key, call.value, call.pattern
    engine = _dispatch(call, backend).engine
    offsets = config.offsets(call.shapes.q_heads)
    if engine == "strided":
        return strided.strided_attention(
            query, key, value, config.branches, offsets, is_causal=call.is_causal, scale=call.scale
        )
    mods = PositionMods(call.visibility, call.score_mod)
    if engine == "flex_strided":
        out, lse = flex_strided_attention(
            query,
            key,
            value,
            config.branches,
            offsets,
            is_causal=call.is_causal,
            scale=call.scale,
            mods=mods,
            visibility=Visibility(call.key_padding_mask, call.document_ids),
        )
    else:
        out, lse = branch_attention(
            query,
            key,
            value,
            config.branches,
            offsets,
            is_causal=call.is_causal,
            scale=call.scale,
            backend="math" if engine == "math" else "flex",
            q_offset=call.q_offset,
            mods=mods,
            dropout_p=call.dropout_p,
        )
    if config.local_window is not None:
        window = sliding_window(config.local_window, call.is_causal)
        local_out, local_lse = window_attention(
            query,
            key,
            value,
            window,
            scale=call.scale,
            backend="math" if engine == "math" else "flex",
            q_offset=call.q_offset,
            mods=mods,
            dropout_p=call.dropout_p,
        )
        out, lse = merge_by_lse([out, local_out], [lse, local_lse])
    return out, lse


def _dispatch(call: AttentionCall[DilatedConfig], backend: BackendName) -> Dispatch:
    """The engine that runs ``call``, and why every faster one was refused."""
    used = {
        "key_padding_mask": call.key_padding_mask is not None,
        "document_ids/cu_seqlens": call.document_ids is not None,
        "score_mod": call.score_mod is not None,
        "q_offset": call.q_offset != 0,
        "dropout_p": call.dropout_p > 0,
        "local_window": call.pattern.local_window is not None,
    }
    return dispatch(
        backend,
        call.query,
        call.key,
        call.value,
        head_offsets=call.pattern.head_offsets,
        extras=tuple(name for name, on in used.items() if on),
        dropout_p=call.dropout_p,
        q_offset=call.q_offset,
        table_mod=not torch.compiler.is_compiling() and captures_tensors(call.score_mod),
    )


def explain(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    **options: Any,
) -> Dispatch:
    """Which engine :func:`dilated_attention` runs for this call, and why every faster one
    was refused. ``options``: :func:`dilated_attention`'s keyword arguments (those that do not
    change the choice, such as ``scale``, are ignored)::

        >>> print(dilattn.explain(q, k, v, [2048, 4096], [1, 2], document_ids=docs))
        engine: flex_strided
          not strided: it does not take document_ids/cu_seqlens
    """
    unknown = set(options) - set(_keyword_defaults())
    if unknown:
        raise TypeError(f"explain() got unexpected keyword arguments {sorted(unknown)}")
    given = {**_keyword_defaults(), **options}
    extras = Extras(**{name: given[name] for name in Extras._fields})
    config = DilatedConfig.of(
        segment_lengths, dilation_rates, given["head_offsets"], given["local_window"]
    )
    # is_causal, scale and return_lse do not change the engine: left out (and unchecked)
    call = AttentionCall.of(query, key, value, config, False, None, given["enable_gqa"], extras)
    return _dispatch(call, given["backend"])


@functools.cache
def _keyword_defaults() -> dict[str, Any]:
    """:func:`dilated_attention`'s keyword arguments and their defaults."""
    parameters = inspect.signature(dilated_attention).parameters.values()
    return {p.name: p.default for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY}
