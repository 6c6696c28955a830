"""A softmax that also returns its log-normaliser, NaN-free on slices that are all ``-inf``."""

from __future__ import annotations

import torch
from torch import Tensor


def softmax_with_lse(scores: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """``(softmax(scores), logsumexp(scores))`` along ``dim``.

    A slice that is all ``-inf`` gives probabilities 0 and log-normaliser ``-inf``, and
    gradients that are 0 rather than NaN (torch's own softmax and logsumexp give NaN there).
    """
    peak = scores.detach().amax(dim=dim, keepdim=True)
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    exp = torch.exp(scores - peak)
    total = exp.sum(dim=dim, keepdim=True)
    empty = total == 0
    total = torch.where(empty, torch.ones_like(total), total)
    lse = torch.where(empty, torch.full_like(total, -torch.inf), peak + torch.log(total))
    return exp / total, lse.squeeze(dim)
