"""Sequence parallelism on torch.distributed: dilated attention over a sequence split across
the ranks of a process group.

Each of the ``W`` ranks of ``group`` holds one equal contiguous chunk of ``C`` positions of
q, k and v, rank ``i`` positions ``[i*C, (i+1)*C)``: ``(B, H, C, D)`` tensors. Launch with
``torchrun``; any backend with all-to-all works (NCCL on GPUs, gloo on CPUs).

* A branch whose segments fit inside the chunks (``C % w == 0``) runs on each rank alone, by
  :func:`dilattn.dilated_attention` on the local chunk: no communication.
* A branch whose segments span ranks: each rank receives the dilated key/value rows of the
  other ranks in its segments (only rows some head of it attends to, each once), in one
  all-to-all per call for all such branches, and attends its compact queries to them.
  Causal: only rows of earlier ranks. Per rank, about ``2 * B * H_kv' * (w - C) / r * D``
  elements per branch (``H_kv'`` key heads with distinct offsets), independent of ``W``;
  see ``docs/distributed.md``.
* The backward pass sends the gradients of those rows back to their owners (the all-to-all's
  own gradient), so ``k.grad`` and ``v.grad`` on every rank are complete.

A length ``S`` that is not a multiple of ``W``: pad the end of the sequence
(:func:`shard_sequence` does) and pass ``seq_len=S``; positions ``>= S`` are then neither keys
nor queries (their output rows are 0). Every rank must pass the same shapes and arguments.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.distributed.nn.functional as dist_fn
from torch import Tensor, nn

from dilattn._checks import Shapes, check_attention_inputs, default_scale
from dilattn.config import DilatedConfig, HeadOffsets
from dilattn.distributed import sequence_parallel as sp
from dilattn.engines.blocks import cdiv
from dilattn.functional import resolve_backend

__all__ = [
    "ExchangedBytes",
    "ParallelDilatedAttention",
    "dilated_attention_parallel",
    "exchanged_bytes",
    "gather_sequence",
    "shard_sequence",
]

ProcessGroup = dist.ProcessGroup


def _check_group(group: object) -> None:
    if group is dist.GroupMember.NON_GROUP_MEMBER:  # what new_group gives non-members
        raise ValueError("this process is not a member of group")
    if group is not None and not isinstance(group, ProcessGroup):
        raise TypeError(f"group must be a torch.distributed ProcessGroup or None, got {group!r}")


def _resolve(group: ProcessGroup | None) -> ProcessGroup:
    """``group``, or the whole world for ``None``."""
    world = dist.group.WORLD
    assert world is not None  # initialised: checked by _position
    return world if group is None else group


def _position(group: ProcessGroup | None) -> tuple[int, int]:
    """``(world size, rank)`` of this process in ``group`` (default: the whole world)."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "torch.distributed is not initialized: call torch.distributed.init_process_group "
            "first (torchrun sets up its environment)"
        )
    _check_group(group)
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("this process is not a member of group")
    return dist.get_world_size(group), rank


def _plan(
    config: DilatedConfig,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    *,
    group: ProcessGroup | None,
    seq_len: int | None,
    is_causal: bool,
    enable_gqa: bool,
) -> tuple[Shapes, sp.RankPlan]:
    shapes = check_attention_inputs(query, key, value, enable_gqa=enable_gqa)
    if shapes.q_len != shapes.kv_len:
        raise ValueError(
            "query, key and value must hold the same positions: got local lengths "
            f"{shapes.q_len} (query) and {shapes.kv_len} (key/value)"
        )
    world, rank = _position(group)
    total = world * shapes.q_len
    if seq_len is None:
        seq_len = total
    if isinstance(seq_len, bool) or not isinstance(seq_len, int):
        raise TypeError(f"seq_len must be an int or None, got {seq_len!r}")
    if not 0 < seq_len <= total:
        raise ValueError(
            f"seq_len must be in [1, {total}] ({world} ranks x {shapes.q_len} positions), "
            f"got {seq_len}"
        )
    plan = sp.plan(
        config,
        num_heads=shapes.q_heads,
        kv_heads=shapes.kv_heads,
        chunk=shapes.q_len,
        world=world,
        rank=rank,
        seq_len=seq_len,
        is_causal=is_causal,
        device=query.device,
    )
    return shapes, plan


def dilated_attention_parallel(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    *,
    group: ProcessGroup | None = None,
    seq_len: int | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    return_lse: bool = False,
    head_offsets: HeadOffsets = "cyclic",
    backend: Literal["auto", "strided", "flex", "math"] = "auto",
) -> Tensor | tuple[Tensor, Tensor]:
    """Dilated attention over a sequence split in equal chunks across the ranks of ``group``.

    The result on rank ``i`` is rows ``[i*C, (i+1)*C)`` of :func:`dilattn.dilated_attention`
    of the whole sequence (same arguments), and gradients reach the ranks that own the keys
    and values. Every rank of ``group`` must call it, with the same shapes and arguments.

    Args:
        query: this rank's chunk ``(B, H, C, D)``.
        key, value: ``(B, H_kv, C, D)`` and ``(B, H_kv, C, D_v)``, the same positions.
        segment_lengths, dilation_rates, is_causal, scale, enable_gqa, head_offsets, backend:
            as :func:`dilattn.dilated_attention` (``backend`` also runs the local branches).
        group: the process group the sequence is split over (default: the whole world).
        seq_len: the sequence length ``S`` when the chunks end in padding (``W * C`` by
            default): positions ``>= S`` are masked as keys and give 0 as queries.
        return_lse: also return the merged log-sum-exp, float32 ``(B, H, C)``.

    Returns:
        ``(B, H, C, D_v)`` in the input dtype (and the lse).

    Equivalent PyTorch code: ``dilattn.reference.dilated_attention_reference`` of the
    gathered sequence, cut to this rank's rows.
    """
    config = DilatedConfig.of(segment_lengths, dilation_rates, head_offsets)
    shapes, plan = _plan(
        config,
        query,
        key,
        value,
        group=group,
        seq_len=seq_len,
        is_causal=is_causal,
        enable_gqa=enable_gqa,
    )
    if config.head_offsets == "split":
        raise ValueError("head_offsets='split' is not supported by sequence parallelism")
    chosen = resolve_backend(backend, query, key, value)
    received = query.new_zeros((0, shapes.batch, shapes.head_dim + shapes.value_dim))
    if plan.exchange:
        sent = sp.take_rows(key, value, plan.send)  # (R_send, B, D + D_v)
        received = funcol.wait_tensor(  # type: ignore[no-untyped-call]
            funcol.all_to_all_single_autograd(
                sent, list(plan.recv_splits), list(plan.send_splits), _resolve(group)
            )
        )
    out, lse = sp.attend_chunk(
        query,
        key,
        value,
        received,
        config,
        plan,
        is_causal=is_causal,
        scale=default_scale(scale, shapes.head_dim),
        enable_gqa=enable_gqa,
        backend=chosen,
    )
    return (out, lse) if return_lse else out


class ExchangedBytes(NamedTuple):
    """Bytes this rank sends and receives in one forward (the backward moves as many back)."""

    sent: int
    received: int


def exchanged_bytes(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    *,
    group: ProcessGroup | None = None,
    seq_len: int | None = None,
    is_causal: bool = False,
    enable_gqa: bool = False,
    head_offsets: HeadOffsets = "cyclic",
) -> ExchangedBytes:
    """What :func:`dilated_attention_parallel` with these arguments sends and receives on this
    rank: the sizes of the tensors of its all-to-all (no communication happens here)."""
    config = DilatedConfig.of(segment_lengths, dilation_rates, head_offsets)
    shapes, plan = _plan(
        config,
        query,
        key,
        value,
        group=group,
        seq_len=seq_len,
        is_causal=is_causal,
        enable_gqa=enable_gqa,
    )
    row = shapes.batch * (shapes.head_dim + shapes.value_dim) * query.element_size()
    return ExchangedBytes(sum(plan.send_splits) * row, sum(plan.recv_splits) * row)


class ParallelDilatedAttention(nn.Module):
    """Sequence-parallel dilated attention on ``(B, H, C, D)`` chunks, configured once.

    Example (under ``torchrun``)::

        attn = ParallelDilatedAttention([2048, 4096, 8192], [1, 2, 4], is_causal=True)
        out = attn(q, k, v)  # this rank's (B, H, C, D_v)

    Args: as :func:`dilated_attention_parallel` (which ``forward`` calls); ``group`` is the
    process group the sequence is split over (default: the whole world).
    """

    def __init__(
        self,
        segment_lengths: Sequence[int],
        dilation_rates: Sequence[int],
        *,
        group: ProcessGroup | None = None,
        is_causal: bool = False,
        scale: float | None = None,
        enable_gqa: bool = False,
        head_offsets: HeadOffsets = "cyclic",
        backend: Literal["auto", "strided", "flex", "math"] = "auto",
    ) -> None:
        super().__init__()
        _check_group(group)
        self.config = DilatedConfig.of(segment_lengths, dilation_rates, head_offsets)
        self.group = group
        self.is_causal = is_causal
        self.scale = scale
        self.enable_gqa = enable_gqa
        self.backend: Literal["auto", "strided", "flex", "math"] = backend

    def forward(
        self, query: Tensor, key: Tensor, value: Tensor, seq_len: int | None = None
    ) -> Tensor:
        """q ``(B, H, C, D)``, k ``(B, H_kv, C, D)``, v ``(B, H_kv, C, D_v)`` -> this rank's
        ``(B, H, C, D_v)``; ``seq_len`` as in :func:`dilated_attention_parallel`."""
        out = dilated_attention_parallel(
            query,
            key,
            value,
            self.config.segment_lengths,
            self.config.dilation_rates,
            group=self.group,
            seq_len=seq_len,
            is_causal=self.is_causal,
            scale=self.scale,
            enable_gqa=self.enable_gqa,
            head_offsets=self.config.head_offsets,
            backend=self.backend,
        )
        assert isinstance(out, Tensor)
        return out

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"segment_lengths={list(c.segment_lengths)}, dilation_rates={list(c.dilation_rates)}, "
            f"is_causal={self.is_causal}, head_offsets={c.head_offsets!r}, backend={self.backend!r}"
        )


def shard_sequence(x: Tensor, *, group: ProcessGroup | None = None, dim: int = -2) -> Tensor:
    """This rank's chunk of a whole sequence ``x`` (the same on every rank): ``x`` zero-padded
    at the end of ``dim`` to a multiple of the world size ``W``, then chunk ``rank`` of ``W``.

    ``dim=-2`` fits ``(B, H, S, D)`` and ``(B, S, E)``; use ``dim=-1`` for token ids ``(B, S)``.
    Pass ``seq_len=x.shape[dim]`` to the attention when ``W`` does not divide it.
    Differentiable: the chunk's gradient lands in its slice of ``x``.
    """
    world, rank = _position(group)
    length = x.shape[dim]
    chunk = cdiv(length, world)
    if chunk * world != length:
        pad_shape = list(x.shape)
        pad_shape[dim] = chunk * world - length
        x = torch.cat([x, x.new_zeros(pad_shape)], dim)
    return x.narrow(dim, rank * chunk, chunk).contiguous()


def gather_sequence(
    x: Tensor, *, seq_len: int | None = None, group: ProcessGroup | None = None, dim: int = -2
) -> Tensor:
    """The whole sequence from every rank's chunk ``x`` (all-gathered along ``dim``), cut to
    ``seq_len`` (default: all ``W * C`` positions).

    Differentiable: each rank's chunk receives the sum over ranks of the gradients of its rows
    (the gradient of an all-gather), as when every rank computes its own loss.
    """
    world, _ = _position(group)
    total = world * x.shape[dim]
    if seq_len is None:
        seq_len = total
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or not 0 < seq_len <= total:
        raise ValueError(f"seq_len must be an int in [1, {total}], got {seq_len!r}")
    chunks = dist_fn.all_gather(x.contiguous(), group=_resolve(group))  # type: ignore[no-untyped-call]
    return torch.cat(chunks, dim).narrow(dim, 0, seq_len)
