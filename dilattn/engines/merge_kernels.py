"""Triton kernels of the strided path: merge one call's rows into the result in place by
log-sum-exp, and add one call's gradient rows into a gradient.

Rows are addressed through ``(X, Y, M)`` strides (views of the result; the last dim is
contiguous), computed in float32 in registers and written back in the tensor's dtype: one
pass over the rows a call covers, with no float32 copy of the output. Imported only on
CUDA (Triton is not a dependency of the CPU wheel).
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _merge_kernel(
    acc,
    acc_lse,
    out,
    out_lse,
    acc_sx, acc_sy, acc_sm,
    al_sx, al_sy, al_sm,
    o_sx, o_sy, o_sm,
    ol_sx, ol_sy, ol_sm,
    rows,
    dim,
    WRITE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    row_blocks = tl.cdiv(rows, BLOCK_M)
    # 64-bit offsets: a million-token tensor has more than 2**31 elements
    x = tl.program_id(1).to(tl.int64)
    y = (pid // row_blocks).to(tl.int64)
    m = ((pid % row_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    row_ok = m < rows
    ok = row_ok[:, None] & (d[None, :] < dim)

    new_lse = tl.load(out_lse + x * ol_sx + y * ol_sy + m * ol_sm, mask=row_ok)
    o_ptrs = out + x * o_sx + y * o_sy + m[:, None] * o_sm + d[None, :]
    new = tl.load(o_ptrs, mask=ok, other=0.0).to(tl.float32)
    acc_ptrs = acc + x * acc_sx + y * acc_sy + m[:, None] * acc_sm + d[None, :]
    lse_ptrs = acc_lse + x * al_sx + y * al_sy + m * al_sm
    if not WRITE:
        old_lse = tl.load(lse_ptrs, mask=row_ok, other=-float("inf"))
        old = tl.load(acc_ptrs, mask=ok, other=0.0).to(tl.float32)
        top = tl.maximum(old_lse, new_lse)
        top = tl.where(top == -float("inf"), 0.0, top)  # both empty: weights 0, no NaN
        w_old = tl.exp(old_lse - top)
        w_new = tl.exp(new_lse - top)
        total = w_old + w_new
        safe = tl.where(total == 0.0, 1.0, total)
        new = (old * (w_old / safe)[:, None]) + (new * (w_new / safe)[:, None])
        new_lse = tl.where(total == 0.0, -float("inf"), top + tl.log(safe))
    # threads holding copies of one row (the lse vector is replicated across the tile's
    # threads) must all have read it before any writes it back: an in-place race otherwise
    tl.debug_barrier()
    tl.store(acc_ptrs, new.to(acc.dtype.element_ty), mask=ok)
    tl.store(lse_ptrs, new_lse, mask=row_ok)


def merge_into_(acc: Tensor, acc_lse: Tensor, out: Tensor, lse: Tensor, write: bool) -> None:
    """``acc`` ``(X, Y, M, D)``, ``acc_lse`` ``(X, Y, M)`` absorb ``out``/``lse`` (same shapes,
    any strides, last dim contiguous) in place; ``write`` overwrites them."""
    X, Y, M, D = acc.shape
    block_m = 64
    grid = (triton.cdiv(M, block_m) * Y, X)
    _merge_kernel[grid](
        acc,
        acc_lse,
        out,
        lse,
        *acc.stride()[:3],
        *acc_lse.stride(),
        *out.stride()[:3],
        *lse.stride(),
        M,
        D,
        WRITE=write,
        BLOCK_M=block_m,
        BLOCK_D=triton.next_power_of_2(D),
    )


@triton.jit
def _add_kernel(
    target,
    piece,
    t_sx, t_sy, t_sm,
    p_sx, p_sy, p_sm,
    rows,
    dim,
    WRITE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    row_blocks = tl.cdiv(rows, BLOCK_M)
    x = tl.program_id(1).to(tl.int64)
    y = (pid // row_blocks).to(tl.int64)
    m = ((pid % row_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    ok = (m < rows)[:, None] & (d[None, :] < dim)
    new = tl.load(piece + x * p_sx + y * p_sy + m[:, None] * p_sm + d[None, :], mask=ok)
    t_ptrs = target + x * t_sx + y * t_sy + m[:, None] * t_sm + d[None, :]
    if not WRITE:
        new = new.to(tl.float32) + tl.load(t_ptrs, mask=ok).to(tl.float32)
    tl.debug_barrier()  # every copy of an element read before any is written (in place)
    tl.store(t_ptrs, new.to(target.dtype.element_ty), mask=ok)


def add_rows_(target: Tensor, piece: Tensor, write: bool) -> None:
    """``target`` ``(X, Y, M, D)`` ``+= piece`` (``write``: ``=``), any strides, last dim
    contiguous; the sum is rounded once."""
    X, Y, M, D = target.shape
    block_m = 64
    grid = (triton.cdiv(M, block_m) * Y, X)
    _add_kernel[grid](
        target,
        piece,
        *target.stride()[:3],
        *piece.stride()[:3],
        M,
        D,
        WRITE=write,
        BLOCK_M=block_m,
        BLOCK_D=triton.next_power_of_2(D),
    )
