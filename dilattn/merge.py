"""Merging attention results over disjoint or overlapping key sets by their log-sum-exp."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from dilattn._softmax import softmax_with_lse

__all__ = ["merge_by_lse"]


def merge_by_lse(
    outputs: Sequence[Tensor], lses: Sequence[Tensor], *, out_dtype: torch.dtype | None = None
) -> tuple[Tensor, Tensor]:
    """Merge attention outputs computed over different key sets into one.

    Each ``outputs[i]`` ``(..., S, D_v)`` is softmax attention over some keys, with
    ``lses[i]`` ``(..., S)`` the natural log of its softmax denominator (``-inf`` where a row saw
    no key). The merge is attention over all those keys together (a key in two sets counts
    twice)::

        L = logsumexp_i lses[i]
        O = sum_i exp(lses[i] - L) * outputs[i]

    It is invariant to the order of the inputs, and merging the halves of a key set gives
    the result over the whole set. Rows with ``L = -inf`` give 0, never NaN, also in the
    gradient. Arithmetic runs in float32 (float64 for float64 inputs).

    Returns:
        ``(O, L)``: ``O`` in ``out_dtype`` (default: the dtype of ``outputs[0]``), ``L`` in the
        float32/float64 working dtype.

    Equivalent PyTorch code: ``dilattn.reference`` merges branches exactly this way.
    """
    if len(outputs) == 0 or len(outputs) != len(lses):
        raise ValueError(
            f"need as many outputs as lses, at least one, got {len(outputs)} and {len(lses)}"
        )
    for i, (out, lse) in enumerate(zip(outputs, lses, strict=True)):
        if out.shape[:-1] != lse.shape:
            raise ValueError(
                f"outputs[{i}] has shape {tuple(out.shape)} but lses[{i}] has "
                f"{tuple(lse.shape)}; expected lse shape {tuple(out.shape[:-1])}"
            )
    work = (
        torch.float64 if any(x.dtype == torch.float64 for x in (*outputs, *lses)) else torch.float32
    )
    weights, lse = softmax_with_lse(torch.stack([x.to(work) for x in lses]), dim=0)  # (N, ..., S)
    merged = (weights.unsqueeze(-1) * torch.stack([x.to(work) for x in outputs])).sum(0)
    return merged.to(out_dtype or outputs[0].dtype), lse
