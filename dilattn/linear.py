"""Global linear attention (Katharopoulos et al., 2020, "Transformers are RNNs").

The softmax kernel ``exp(q . k)`` is replaced by ``phi(q) . phi(k)`` with the feature map
``phi(x) = elu(x) + 1 > 0``, so a query's output is

    out_i = sum_j phi(q_i) . phi(k_j) v_j / sum_j phi(q_i) . phi(k_j)

over the keys ``j`` it sees. Without a causal mask the sums factor through a ``(D, D_v)``
state, ``phi(Q) (phi(K)^T V)``: O(S D D_v) time and memory instead of O(S^2).

Shapes: ``(B, H, S, D)`` as everywhere in dilattn; ``G = H / H_kv`` query heads per key head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from dilattn._call import AttentionCall, Extras
from dilattn._checks import positive_int

__all__ = ["feature_map", "linear_attention"]


def feature_map(x: Tensor) -> Tensor:
    """``elu(x) + 1``: positive, so every normaliser is a sum of positive terms."""
    return F.elu(x) + 1


def _normalise(numerator: Tensor, denominator: Tensor) -> Tensor:
    """``numerator / denominator[..., None]``; 0 where no key is visible (denominator 0)."""
    empty = denominator == 0
    return numerator / denominator.masked_fill(empty, 1).unsqueeze(-1)


def linear_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    *,
    is_causal: bool = False,
    enable_gqa: bool = False,
    chunk_size: int = 64,
    key_padding_mask: Tensor | None = None,
    q_offset: int = 0,
) -> Tensor:
    """Linear attention with the ``elu(x) + 1`` feature map, on SDPA's layout.

    Non-causal: every query sees every (unpadded) key, through one ``(D, D_v)`` state per
    head. Causal: query row ``i`` sits at position ``q_offset + i`` and sees the keys at
    positions ``<= q_offset + i``. It runs chunk by chunk: inside a chunk of ``chunk_size``
    queries the masked quadratic form, across chunks an exclusive prefix sum of the chunks'
    ``(D, D_v)`` states, so memory is ``O(S * chunk_size + S / chunk_size * D * D_v)``:
    linear in ``S``. Keys before ``q_offset`` (a decoding prefix) form the initial state.

    Args:
        query: ``(B, H, S_q, D)``, any float dtype (half precision accumulates in float32).
        key: ``(B, H_kv, S_kv, D)``; ``H_kv`` divides ``H`` when ``enable_gqa``.
        value: ``(B, H_kv, S_kv, D_v)``.
        is_causal: mask keys after the query's position.
        enable_gqa: allow ``H_kv < H`` (query head ``h`` reads key head ``h // G``).
        chunk_size: queries per chunk of the causal form (any positive size; the result
            does not depend on it, only memory and speed do).
        key_padding_mask: ``(B, S_kv)`` bool, ``True`` = padding key: it contributes nothing.
        q_offset: the position of query row 0 (keys start at 0).

    Returns:
        ``(B, H, S_q, D_v)`` in the input dtype; a row that sees no key gives 0.

    Equivalent PyTorch code: ``dilattn.reference.linear_attention_reference``.
    """
    chunk_size = positive_int("chunk_size", chunk_size)
    extras = Extras(key_padding_mask, q_offset=q_offset)
    call = AttentionCall.of(query, key, value, None, is_causal, None, enable_gqa, extras)
    acc = torch.promote_types(query.dtype, torch.float32)
    G = call.shapes.q_heads // call.shapes.kv_heads
    phi_q = rearrange(feature_map(query.to(acc)), "b (h g) s d -> b h g s d", g=G)
    phi_k, v = feature_map(key.to(acc)), value.to(acc)  # (B, H_kv, S_kv, D), (.., D_v)
    if call.key_padding_mask is not None:
        phi_k = phi_k.masked_fill(call.key_padding_mask[:, None, :, None], 0)
    if is_causal:
        out = _causal(phi_q, phi_k, v, chunk_size, call.q_offset)
    else:
        state = torch.einsum("bhsd,bhse->bhde", phi_k, v)[:, :, None]  # (B, H_kv, 1, D, D_v)
        numerator = torch.einsum("bhgsd,bhgde->bhgse", phi_q, state)
        out = _normalise(numerator, torch.einsum("bhgsd,bhd->bhgs", phi_q, phi_k.sum(2)))
    return rearrange(out, "b h g s e -> b (h g) s e").to(query.dtype)


def _causal(phi_q: Tensor, phi_k: Tensor, v: Tensor, chunk_size: int, q_offset: int) -> Tensor:
    """Chunked causal linear attention. ``phi_q`` ``(B, H_kv, G, S_q, D)``, ``phi_k``
    ``(B, H_kv, S_kv, D)`` (0 at padding), ``v`` ``(B, H_kv, S_kv, D_v)`` ->
    ``(B, H_kv, G, S_q, D_v)``."""
    q_len, kv_len = phi_q.shape[3], phi_k.shape[2]
    prefix = min(q_offset, kv_len)  # keys every query sees: the initial state
    state0 = torch.einsum("bhsd,bhse->bhde", phi_k[:, :, :prefix], v[:, :, :prefix])
    norm0 = phi_k[:, :, :prefix].sum(2)  # (B, H_kv, D)
    # the keys at the queries' own positions, zero-padded (phi = 0: no contribution) to
    # whole chunks; keys past the last query are never seen
    n = -(-q_len // chunk_size)
    pad = n * chunk_size
    phi_k, v = (x[:, :, q_offset : q_offset + q_len] for x in (phi_k, v))
    phi_k, v = (F.pad(x, (0, 0, 0, pad - x.shape[2])) for x in (phi_k, v))
    phi_q = F.pad(phi_q, (0, 0, 0, pad - q_len))
    phi_q = rearrange(phi_q, "b h g (n c) d -> b h g n c d", c=chunk_size)
    phi_k, v = (rearrange(x, "b h (n c) d -> b h n c d", c=chunk_size) for x in (phi_k, v))
    # across chunks: the state of every earlier chunk (exclusive prefix sum)
    states = torch.einsum("bhncd,bhnce->bhnde", phi_k, v)  # (B, H_kv, n, D, D_v)
    states = torch.cat([state0[:, :, None], states[:, :, :-1]], 2).cumsum(2)
    norms = torch.cat([norm0[:, :, None], phi_k[:, :, :-1].sum(3)], 2).cumsum(2)  # (.., n, D)
    # inside a chunk: the masked quadratic form
    causal = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=phi_q.device).tril()
    scores = torch.einsum("bhgncd,bhnkd->bhgnck", phi_q, phi_k).masked_fill(~causal, 0)
    numerator = scores @ v[:, :, None] + torch.einsum("bhgncd,bhnde->bhgnce", phi_q, states)
    denominator = scores.sum(-1) + torch.einsum("bhgncd,bhnd->bhgnc", phi_q, norms)
    out = _normalise(numerator, denominator)
    return rearrange(out, "b h g n c e -> b h g (n c) e")[:, :, :, :q_len]
