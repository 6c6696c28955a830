"""Variable lengths: key padding and packed documents, checked once and seen as one mask_mod.

* ``key_padding_mask`` ``(B, S_kv)`` bool, torch's meaning: ``True`` marks a padding key,
  which no query sees.
* ``document_ids`` ``(B, L)`` integers, ``L = max(q_offset + S_q, S_kv)``: the document of
  every position. The query at position ``p`` sees the key at ``p'`` only if
  ``document_ids[b, p] == document_ids[b, p']``.
* ``cu_seqlens`` ``(n + 1,)`` integers: cumulative document lengths (FlashAttention's varlen
  convention, ``0 = c_0 <= c_1 <= ... <= c_n = L``), shared by the batch; position ``p``
  belongs to document ``i`` when ``c_i <= p < c_{i+1}``. Converted to ``document_ids``.

Dilation does NOT restart per document: segments stay anchored at position 0 of the whole
sequence, and documents only remove (query, key) pairs from them.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import _mask_mod_signature, and_masks


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def _check_tensor(name: str, x: object, shape: tuple[int, int], device: torch.device) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if tuple(x.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(x.shape)}")
    if not _same_device(x.device, device):
        raise ValueError(f"{name} must be on the device of the query ({device}), got {x.device}")
    return x


def _is_integer(x: Tensor) -> bool:
    return not x.is_floating_point() and not x.is_complex() and x.dtype != torch.bool


def _from_cu_seqlens(cu_seqlens: object, length: int, device: torch.device) -> Tensor:
    """Document ids ``(1, L)`` (shared by the batch) from cumulative lengths."""
    if not isinstance(cu_seqlens, Tensor) or cu_seqlens.dim() != 1 or len(cu_seqlens) < 2:
        shown = tuple(cu_seqlens.shape) if isinstance(cu_seqlens, Tensor) else cu_seqlens
        raise ValueError(f"cu_seqlens must be a 1-D tensor of n + 1 >= 2 offsets, got {shown}")
    if not _is_integer(cu_seqlens) or not _same_device(cu_seqlens.device, device):
        raise TypeError(
            f"cu_seqlens must be an integer tensor on {device}, got {cu_seqlens.dtype} on "
            f"{cu_seqlens.device}"
        )
    if not torch.compiler.is_compiling() and (
        cu_seqlens[0] != 0 or cu_seqlens[-1] != length or (cu_seqlens.diff() < 0).any()
    ):
        raise ValueError(
            f"cu_seqlens must rise from 0 to the sequence length {length}, got "
            f"{cu_seqlens.tolist()}"
        )
    positions = torch.arange(length, device=device)
    return torch.searchsorted(cu_seqlens, positions, right=True).view(1, -1) - 1  # (1, L)


def check_variable_lengths(
    key_padding_mask: Tensor | None,
    document_ids: Tensor | None,
    cu_seqlens: Tensor | None,
    *,
    batch: int,
    q_len: int,
    kv_len: int,
    q_offset: int,
    device: torch.device,
) -> tuple[Tensor | None, Tensor | None]:
    """Validated ``(key_padding_mask, document_ids)``; from ``cu_seqlens``, the document ids
    are ``(1, L)``, shared by the batch."""
    if key_padding_mask is not None:
        _check_tensor("key_padding_mask", key_padding_mask, (batch, kv_len), device)
        if key_padding_mask.dtype != torch.bool:
            raise TypeError(
                "key_padding_mask must be a bool tensor (True = padding key, ignored), got "
                f"{key_padding_mask.dtype}"
            )
    length = max(q_offset + q_len, kv_len)
    if document_ids is not None and cu_seqlens is not None:
        raise ValueError("pass document_ids or cu_seqlens, not both")
    if cu_seqlens is not None:
        document_ids = _from_cu_seqlens(cu_seqlens, length, device)
    elif document_ids is not None:
        _check_tensor("document_ids", document_ids, (batch, length), device)
        if not _is_integer(document_ids):
            raise TypeError(f"document_ids must be an integer tensor, got {document_ids.dtype}")
    return key_padding_mask, document_ids


def visibility_mask_mod(
    key_padding_mask: Tensor | None, document_ids: Tensor | None
) -> _mask_mod_signature | None:
    """A ``mask_mod`` over positions: the key is no padding and lies in the query's document
    (``None`` when there is neither condition). Document ids ``(1, L)`` serve every batch row."""
    conditions = []
    if key_padding_mask is not None:

        def not_padding(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            return ~key_padding_mask[b, kv_idx]

        conditions.append(not_padding)
    if document_ids is not None and document_ids.shape[0] == 1:
        shared = document_ids[0]

        def same_document(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            return shared[q_idx] == shared[kv_idx]

        conditions.append(same_document)
    elif document_ids is not None:

        def same_batch_document(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            return document_ids[b, q_idx] == document_ids[b, kv_idx]

        conditions.append(same_batch_document)
    if not conditions:
        return None
    visible = and_masks(*conditions)
    visible.__name__ = "_and_".join(mod.__name__ for mod in conditions)
    return visible
