"""Local windowed attention: ``local_attention`` and ``LocalAttention``, a drop-in for the
``local-attention`` package's module, on the same FlexAttention machinery as dilated attention.

Query at position ``p`` (row ``i`` at ``q_offset + i``), key at ``p'`` (row ``j`` at ``j``),
``W = window_size``:

* bucketed (``exact_windowsize=False``, the default, as ``local-attention``): positions fall in
  buckets ``p // W``; a query of bucket ``b`` sees every key of buckets
  ``b - look_backward .. b + look_forward``, so how far it sees depends on where it sits in
  its bucket (``W=4``, one bucket back, none forward, causal; rows queries, columns keys)::

      query 4: ■ ■ ■ ■ ■ . . .      query 7: ■ ■ ■ ■ ■ ■ ■ ■

* sliding (``exact_windowsize=True``): ``p - look_backward * W <= p' <= p + look_forward * W``,
  the same for every query (``local-attention``'s ``exact_windowsize`` restricts its buckets
  to exactly this; the buckets then no longer matter)::

      query 4: ■ ■ ■ ■ ■ . . .      query 7: . . . ■ ■ ■ ■ ■

* causal (``is_causal`` / ``causal``): besides, ``p' <= p``; ``look_forward`` must be 0.

A row that sees no key gives 0 (lse ``-inf``), never NaN.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention.flex_attention import _score_mod_signature

from dilattn._call import AttentionCall, Extras
from dilattn._checks import check_bool, number_in, positive_int
from dilattn.config import make_window
from dilattn.engines.gather import PositionMods
from dilattn.engines.window import window_attention
from dilattn.functional import BackendName, resolve_backend
from dilattn.positions import rotary, xpos, xpos_limit

__all__ = ["SELF_SCORE", "LocalAttention", "local_attention"]

SELF_SCORE = -5e4
"""The score ``shared_qk`` gives a query's own key (``local-attention``'s
``TOKEN_SELF_ATTN_VALUE``): the token sees itself only when it sees nothing else."""


def local_attention(
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
    backend: BackendName = "auto",
    key_padding_mask: Tensor | None = None,
    document_ids: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
    score_mod: _score_mod_signature | None = None,
    q_offset: int = 0,
    dropout_p: float = 0.0,
) -> Tensor | tuple[Tensor, Tensor]:
    """Local windowed attention (module docstring: the window rules), on SDPA's layout.

    Args:
        query: ``(B, H, S_q, D)``, float16/bfloat16/float32/float64.
        key: ``(B, H_kv, S_kv, D)``; value: ``(B, H_kv, S_kv, D_v)``; any lengths.
        window_size: ``W``, the bucket size (bucketed) or the unit of the reach (sliding).
        look_backward: buckets (or ``W``-steps) seen before the query's, default 1.
        look_forward: after it; default 0 when causal, else 1; must be 0 when causal.
        exact_windowsize: ``False``: bucketed (``local-attention``'s windows); ``True``: the
            true sliding window.
        is_causal: mask keys after the query's position.
        scale: score scale, default ``1 / sqrt(D)``.
        enable_gqa: allow ``H_kv < H`` (grouped-query attention).
        return_lse: also return the log-sum-exp, float32 ``(B, H, S_q)``, natural log: merge
            it with other attention results by :func:`dilattn.merge_by_lse`.
        backend: ``"flex"`` (one FlexAttention call over the sequence with an analytic block
            mask that lists only the blocks in the window; compiled on CUDA, forward-only
            eager on CPU), ``"math"`` (matmul and softmax per chunk of ``W`` queries over the
            keys it can see; any device, differentiable) or ``"auto"`` (flex on CUDA, math
            elsewhere). There is no ``"strided"`` local attention.
        key_padding_mask: ``(B, S_kv)`` bool, torch's meaning: ``True`` = padding key, ignored.
        document_ids, cu_seqlens, score_mod, q_offset, dropout_p: as in
            :func:`dilattn.dilated_attention` (documents, a flex score mod at absolute
            positions, the position of query row 0, dropout on the probabilities: math only).

    Returns:
        ``(B, H, S_q, D_v)`` in the input dtype, and the lse when ``return_lse``.

    Equivalent PyTorch code: ``dilattn.reference.local_attention_reference``.
    """
    window = make_window(
        window_size,
        look_backward=look_backward,
        look_forward=look_forward,
        exact_windowsize=exact_windowsize,
        is_causal=is_causal,
    )
    if backend == "strided":
        raise ValueError("local attention has no strided backend: use 'auto', 'flex' or 'math'")
    extras = Extras(key_padding_mask, document_ids, cu_seqlens, score_mod, q_offset, dropout_p)
    call = AttentionCall.of(query, key, value, window, is_causal, scale, enable_gqa, extras)
    chosen = resolve_backend(
        backend, query, key, value, extras="a local window", dropout_p=call.dropout_p
    )
    assert chosen != "strided"
    out, lse = window_attention(
        query,
        key,
        value,
        window,
        scale=call.scale,
        backend=chosen,
        q_offset=call.q_offset,
        mods=PositionMods(call.visibility, call.score_mod),
        dropout_p=call.dropout_p,
    )
    return (out, lse) if return_lse else out


def not_self(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
    """The score mod of ``shared_qk``: a query's own key scores :data:`SELF_SCORE`."""
    return torch.where(q_idx == kv_idx, torch.full_like(score, SELF_SCORE), score)


def _as_heads(x: Tensor, name: str, batch: int | None) -> Tensor:
    """``(..., S, D)`` as ``(B, H, S, D)``: 4-D as is; else the leading dims flattened and split
    into ``batch`` (the mask's) rows of heads, as ``local-attention`` repeats its mask."""
    if not isinstance(x, Tensor) or x.dim() < 2:
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name} must have shape (..., S, D), e.g. (B, H, S, D), got {got}")
    if x.dim() == 4:
        return x
    flat = x.reshape(-1, *x.shape[-2:])
    if batch is None or flat.shape[0] % batch:
        if batch is not None:
            raise ValueError(
                f"{name} has {flat.shape[0]} sequences, not a multiple of the mask's batch {batch}"
            )
        return flat.unsqueeze(1)
    return flat.view(batch, -1, *x.shape[-2:])


class LocalAttention(nn.Module):
    """Local windowed attention, a drop-in for ``local_attention.LocalAttention`` (1.11.2).

    ::

        attn = LocalAttention(window_size=512, causal=True, look_backward=1, dim=64)
        out = attn(q, k, v, mask=keep)  # q, k, v (B, H, S, 64) -> (B, H, S, 64)

    Same options, same windows (module docstring), same function where theirs is defined;
    ``forward`` runs :func:`local_attention`. Differences, on purpose:

    * any length: ``autopad=True`` pads nothing (no padded key is ever seen; theirs lets
      the last bucket's queries see its zero padding keys unless a ``mask`` is passed);
      ``autopad=False`` raises on lengths that are not multiples of ``window_size``, as
      theirs does;
    * a row that sees no key gives 0 (theirs: an average over its look-around, padding
      included);
    * rotary/xPos at absolute positions (:mod:`dilattn.positions`): theirs rotates keys and
      queries inside each look-around as if the queries sat in its LAST bucket, so with
      ``look_forward > 0`` its query-key distances are off by ``look_forward * window_size``;
      with ``look_forward = 0`` both compute the same. xPos here is limited to
      :func:`dilattn.xpos_limit` positions (theirs centres it in each look-around).

    Args:
        window_size, look_backward, look_forward, exact_windowsize: the window (module
            docstring); ``look_forward`` defaults to 0 when causal, else 1.
        causal: mask keys after the query (``is_causal`` elsewhere in dilattn).
        dropout: on the attention probabilities in training mode; FlexAttention has none,
            so on CUDA training with dropout needs ``backend="math"``.
        shared_qk: Reformer's shared query-key attention: keys are l2-normalised and a query
            sees its own position only when it sees nothing else (score :data:`SELF_SCORE`).
        dim: the head dim; with ``use_rotary_pos_emb`` (default on, as theirs) q and k get
            rotary positions, only when ``dim`` is given (as theirs).
        autopad: accept any length (see above).
        scale: score scale, default ``1 / sqrt(D)``.
        use_xpos, xpos_scale_base: xPos instead of plain rotary; scale base default
            ``window_size // 2`` (theirs).
        backend: as :func:`local_attention`.

    Equivalent PyTorch code: ``dilattn.reference.local_attention_reference`` after the
    rotation.
    """

    def __init__(
        self,
        window_size: int,
        causal: bool = False,
        look_backward: int = 1,
        look_forward: int | None = None,
        dropout: float = 0.0,
        shared_qk: bool = False,
        *,
        dim: int | None = None,
        autopad: bool = False,
        exact_windowsize: bool = False,
        scale: float | None = None,
        use_rotary_pos_emb: bool = True,
        use_xpos: bool = False,
        xpos_scale_base: float | None = None,
        backend: BackendName = "auto",
    ) -> None:
        super().__init__()
        check_bool("causal", causal)
        self.window = make_window(
            window_size,
            look_backward=look_backward,
            look_forward=look_forward,
            exact_windowsize=exact_windowsize,
            is_causal=causal,
        )
        self.dropout = number_in("dropout", dropout, 0.0, 1.0)
        self.shared_qk, self.autopad, self.scale = shared_qk, autopad, scale
        self.dim = None if dim is None else positive_int("dim", dim)
        self.position: Literal["rotary", "xpos"] | None = None
        if use_rotary_pos_emb and dim is not None:
            self.position = "xpos" if use_xpos else "rotary"
        self.xpos_scale_base = window_size // 2 if xpos_scale_base is None else xpos_scale_base
        self.backend: BackendName = backend

    def forward(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        mask: Tensor | None = None,
        *,
        input_mask: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
    ) -> Tensor:
        """q, k ``(..., S, D)``, v ``(..., S, D_v)`` -> ``(..., S, D_v)``.

        ``(B, H, S, D)`` is attention's layout (``H_kv < H`` is GQA); any other leading dims
        are flattened into sequences, and with a mask ``(B, S)`` split into ``B`` rows of heads
        (``(b h)``, as theirs).

        Args:
            mask: ``(B, S_kv)`` bool, ``local-attention``'s meaning: ``True`` = KEEP the key
                (``input_mask`` is its other name).
            key_padding_mask: ``(B, S_kv)`` bool, dilattn's and torch's meaning: ``True`` =
                padding (ignored key). Pass one of the three at most.
        """
        given = [x for x in (mask, input_mask, key_padding_mask) if x is not None]
        if len(given) > 1:
            raise ValueError("pass at most one of mask, input_mask and key_padding_mask")
        padding = key_padding_mask
        keep = mask if mask is not None else input_mask
        if keep is not None:
            if not isinstance(keep, Tensor) or keep.dtype != torch.bool:
                got = keep.dtype if isinstance(keep, Tensor) else type(keep).__name__
                raise TypeError(f"mask must be a bool tensor (True = keep), got {got}")
            padding = ~keep
        batch = None if padding is None or padding.dim() != 2 else padding.shape[0]
        shape = q.shape if isinstance(q, Tensor) else None
        q, k, v = (_as_heads(x, n, batch) for x, n in ((q, "q"), (k, "k"), (v, "v")))
        self._check_lengths(q, k)
        if self.shared_qk:
            k = F.normalize(k, dim=-1)
        q, k = self._rotate(q, key=False), self._rotate(k, key=True)
        w = self.window
        out = local_attention(
            q,
            k,
            v,
            w.size,
            look_backward=w.backward,
            look_forward=w.forward,
            exact_windowsize=w.exact,
            is_causal=w.is_causal,
            scale=self.scale,
            enable_gqa=q.shape[1] != k.shape[1],
            backend=self.backend,
            key_padding_mask=padding,
            score_mod=not_self if self.shared_qk else None,
            dropout_p=self.dropout if self.training else 0.0,
        )
        assert isinstance(out, Tensor) and shape is not None
        return out.reshape(*shape[:-1], out.shape[-1])

    def _check_lengths(self, q: Tensor, k: Tensor) -> None:
        W = self.window.size
        for name, length in (("q", q.shape[2]), ("k", k.shape[2])):
            if not self.autopad and length % W:
                raise ValueError(
                    f"{name} has length {length}, not a multiple of window_size {W}: pass "
                    "autopad=True for any length"
                )
        if self.position is not None and self.dim != q.shape[-1]:
            raise ValueError(f"dim={self.dim} must be the head dim of q and k, got {q.shape[-1]}")
        limit = xpos_limit(q.dtype, scale_base=self.xpos_scale_base)
        if self.position == "xpos" and max(q.shape[2], k.shape[2]) > limit:
            raise ValueError(
                f"xPos in {q.dtype} with xpos_scale_base={self.xpos_scale_base} supports "
                f"positions up to {limit}, got {max(q.shape[2], k.shape[2])}"
            )

    def _rotate(self, x: Tensor, *, key: bool) -> Tensor:
        if self.position is None:
            return x
        positions = torch.arange(x.shape[2], device=x.device)
        if self.position == "rotary":
            return rotary(x, positions)
        return xpos(x, positions, key=key, scale_base=self.xpos_scale_base)

    def extra_repr(self) -> str:
        w = self.window
        return (
            f"window_size={w.size}, causal={w.is_causal}, look_backward={w.backward}, "
            f"look_forward={w.forward}, exact_windowsize={w.exact}, shared_qk={self.shared_qk}, "
            f"position={self.position!r}, backend={self.backend!r}"
        )
