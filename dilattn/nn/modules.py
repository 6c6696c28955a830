"""``nn.Module``s over the functional path: ``DilatedAttention`` on ``(B, H, S, D)`` tensors and
``MultiheadDilatedAttention``, a drop-in for ``nn.MultiheadAttention(batch_first=True)``."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from einops import rearrange
from torch import Tensor, nn
from torch.nn.attention.flex_attention import _score_mod_signature

from dilattn._call import AttentionCall, Extras
from dilattn._checks import check_bool, number_in, positive_int
from dilattn.config import DilatedConfig, HeadOffsets
from dilattn.functional import BackendName, attend_call
from dilattn.nn.cache import KVCache
from dilattn.positions import T5RelativeBias, alibi_score_mod, rotary, xpos, xpos_limit

__all__ = ["DilatedAttention", "MultiheadDilatedAttention", "Position"]

Position = Literal["rotary", "xpos", "alibi", "t5"]
"""Position information of :class:`MultiheadDilatedAttention` (or ``None``): rotations of q and k
(``"rotary"``, ``"xpos"``) or score mods (``"alibi"``, ``"t5"``), see :mod:`dilattn.positions`."""


class DilatedAttention(nn.Module):
    """Dilated attention on ``(B, H, S, D)`` query/key/value, configured once.

    Works inside ``torch.compile(model, fullgraph=True)``. Example::

        attn = DilatedAttention([2048, 4096, 8192], [1, 2, 4], is_causal=True)
        out = attn(q, k, v)  # (B, H, S, D_v)

    Args: as :func:`dilattn.dilated_attention` (which ``forward`` calls).

    Equivalent PyTorch code: ``dilattn.reference.dilated_attention_reference``.
    """

    def __init__(
        self,
        segment_lengths: Sequence[int],
        dilation_rates: Sequence[int],
        *,
        is_causal: bool = False,
        scale: float | None = None,
        enable_gqa: bool = False,
        head_offsets: HeadOffsets = "cyclic",
        backend: BackendName = "auto",
        local_window: int | None = None,
    ) -> None:
        super().__init__()
        self.config = DilatedConfig.of(segment_lengths, dilation_rates, head_offsets, local_window)
        self.is_causal = check_bool("is_causal", is_causal)
        self.scale = scale
        self.enable_gqa = enable_gqa
        self.backend: BackendName = backend

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        *,
        key_padding_mask: Tensor | None = None,
        document_ids: Tensor | None = None,
        cu_seqlens: Tensor | None = None,
        score_mod: _score_mod_signature | None = None,
        q_offset: int = 0,
    ) -> Tensor:
        """q ``(B, H, S_q, D)``, k ``(B, H_kv, S_kv, D)``, v ``(B, H_kv, S_kv, D_v)``
        -> ``(B, H, S_q, D_v)``; the keyword arguments as in :func:`dilattn.dilated_attention`."""
        extras = Extras(key_padding_mask, document_ids, cu_seqlens, score_mod, q_offset)
        call = AttentionCall.of(
            query, key, value, self.config, self.is_causal, self.scale, self.enable_gqa, extras
        )
        return attend_call(call, self.backend)[0]

    def extra_repr(self) -> str:
        c = self.config
        local = "" if c.local_window is None else f", local_window={c.local_window}"
        return (
            f"segment_lengths={list(c.segment_lengths)}, dilation_rates={list(c.dilation_rates)}"
            f"{local}, is_causal={self.is_causal}, head_offsets={c.head_offsets!r}, "
            f"backend={self.backend!r}"
        )


class MultiheadDilatedAttention(nn.Module):
    """Multi-head dilated attention: a drop-in for ``nn.MultiheadAttention(batch_first=True)``.

    ``(B, S, E)`` in, ``(B, S, E)`` out::

        attn = MultiheadDilatedAttention(768, 12, [2048, 4096, 8192], [1, 2, 4], is_causal=True)
        out, _ = attn(x, x, x, key_padding_mask=padding)  # out: (B, S, 768); _ is None

    The layer: ``q, k, v`` projections (``k``, ``v`` to ``num_kv_heads`` heads: GQA, or MQA
    with 1) -> optional QK-norm (LayerNorm over each head) -> optional rotation of q and k at
    their absolute positions (``"rotary"``, ``"xpos"``) -> :func:`dilattn.dilated_attention`
    (with the ``"alibi"`` or ``"t5"`` score mod) -> optional MAGNETO sub-LayerNorm -> output
    projection.

    Args:
        embed_dim, num_heads: ``E`` and ``H``; the head dim is ``E / H``.
        segment_lengths, dilation_rates: the branches ``(w_i, r_i)``.
        num_kv_heads: key/value heads (default ``H``), dividing ``H``.
        dropout: attention dropout, in training mode only: each branch's probabilities are
            dropped (as LongNet's own implementation does inside each branch's kernel);
            FlexAttention has none, so training with dropout needs ``backend="math"``
            (otherwise ``forward`` raises).
        bias: biases of the four projections.
        kdim, vdim: feature sizes of the key and value inputs (default ``E``).
        sub_layernorm: MAGNETO's LayerNorm on the attention output before ``out_proj``.
        gamma_init: xavier-normal gain of the value and output projections (MAGNETO); query
            and key projections get gain 1, biases 0.
        qk_norm: LayerNorm over the head dim of q and k (after projection).
        position: ``None``, ``"rotary"``, ``"xpos"``, ``"alibi"`` or ``"t5"`` (a
            :class:`dilattn.T5RelativeBias` in ``relative_bias``, bidirectional unless
            ``is_causal``); see :mod:`dilattn.positions`.
        is_causal: the default of ``forward``'s ``is_causal``.
        head_offsets, backend: as in :func:`dilattn.dilated_attention`.
        layer_norm_eps: epsilon of the LayerNorms.
        rotary_base: ``base`` of rotary and xPos; xpos_scale_base: xPos's ``scale_base``.
        local_window: a local sliding-window branch ``|p - p'| <= local_window`` merged with
            the dilated ones (:func:`dilattn.dilated_attention`).
        batch_first: must be ``True`` (accepted so that ``nn.MultiheadAttention``'s
            ``batch_first=True`` call works): inputs are ``(B, S, E)`` only.
        device, dtype: of the parameters.

    From ``nn.MultiheadAttention``: :meth:`from_torch` builds one with its weights, and
    ``load_state_dict`` also takes its state dict (``in_proj_*`` split into ``q/k/v_proj``).

    Equivalent PyTorch code: the projections around
    ``dilattn.reference.dilated_attention_reference``.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        segment_lengths: Sequence[int],
        dilation_rates: Sequence[int],
        *,
        num_kv_heads: int | None = None,
        dropout: float = 0.0,
        bias: bool = True,
        kdim: int | None = None,
        vdim: int | None = None,
        sub_layernorm: bool = False,
        gamma_init: float = 1.0,
        qk_norm: bool = False,
        position: Position | None = None,
        is_causal: bool = False,
        head_offsets: HeadOffsets = "cyclic",
        backend: BackendName = "auto",
        layer_norm_eps: float = 1e-5,
        rotary_base: float = 10000.0,
        xpos_scale_base: float = 512.0,
        local_window: int | None = None,
        batch_first: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(batch_first, bool):
            raise TypeError(f"batch_first must be a bool, got {batch_first!r}")
        if not batch_first:
            raise ValueError(
                "batch_first=False is not supported: MultiheadDilatedAttention takes (B, S, E) "
                "inputs (batch first) only; transpose (S, B, E) inputs with x.transpose(0, 1)"
            )
        self.batch_first = batch_first
        self.embed_dim = positive_int("embed_dim", embed_dim)
        self.num_heads = positive_int("num_heads", num_heads)
        self.num_kv_heads = positive_int(
            "num_kv_heads", num_heads if num_kv_heads is None else num_kv_heads
        )
        self.kdim = positive_int("kdim", embed_dim if kdim is None else kdim)
        self.vdim = positive_int("vdim", embed_dim if vdim is None else vdim)
        if embed_dim % num_heads:
            raise ValueError(
                f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})"
            )
        if num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        self.head_dim = embed_dim // num_heads
        if position not in (None, "rotary", "xpos", "alibi", "t5"):
            raise ValueError(
                f"position must be None, 'rotary', 'xpos', 'alibi' or 't5', got {position!r}"
            )
        if position in ("rotary", "xpos") and self.head_dim % 2:
            raise ValueError(f"position={position!r} needs an even head dim, got {self.head_dim}")
        self.config = DilatedConfig.of(segment_lengths, dilation_rates, head_offsets, local_window)
        self.dropout = number_in("dropout", dropout, 0.0, 1.0)
        self.gamma_init = number_in("gamma_init", gamma_init, 0.0, math.inf, open_low=True)
        self.position: Position | None = position
        self.is_causal = check_bool("is_causal", is_causal)
        self.backend: BackendName = backend
        self.rotary_base, self.xpos_scale_base = rotary_base, xpos_scale_base
        kv_dim = self.num_kv_heads * self.head_dim

        def linear(n_in: int, n_out: int) -> nn.Linear:
            return nn.Linear(n_in, n_out, bias=bias, device=device, dtype=dtype)

        self.q_proj = linear(embed_dim, embed_dim)
        self.k_proj = linear(self.kdim, kv_dim)
        self.v_proj = linear(self.vdim, kv_dim)
        self.out_proj = linear(embed_dim, embed_dim)

        def norm(size: int) -> nn.LayerNorm:
            return nn.LayerNorm(size, eps=layer_norm_eps, device=device, dtype=dtype)

        self.q_norm = norm(self.head_dim) if qk_norm else None
        self.k_norm = norm(self.head_dim) if qk_norm else None
        self.norm = norm(embed_dim) if sub_layernorm else None
        self.relative_bias = (
            T5RelativeBias(num_heads, bidirectional=not is_causal, device=device, dtype=dtype)
            if position == "t5"
            else None
        )
        self.reset_parameters()

    @classmethod
    def from_torch(
        cls,
        mha: nn.MultiheadAttention,
        segment_lengths: Sequence[int],
        dilation_rates: Sequence[int],
        **kwargs: Any,
    ) -> MultiheadDilatedAttention:
        """A module with ``mha``'s weights, to swap it for dilated attention.

        Takes ``embed_dim``, ``num_heads``, ``bias``, ``kdim``, ``vdim``, ``dropout``, the device
        and the dtype from ``mha`` (passing one of them in ``kwargs`` with another value
        raises), copies ``in_proj_weight``/``in_proj_bias`` (or ``q/k/v_proj_weight``) into
        ``q_proj``, ``k_proj``, ``v_proj`` and ``out_proj`` into ``out_proj``, and its training
        mode. ``kwargs`` go to the constructor; options torch has no weights for
        (``qk_norm``, ``sub_layernorm``, ``position="t5"``) keep their own initialisation.
        With ``segment_lengths=[S]``, ``dilation_rates=[1]`` and no such options it computes
        what ``mha`` does (causal: ``is_causal=True`` here, the causal ``attn_mask`` there).

        The result takes ``(B, S, E)`` inputs whatever ``mha.batch_first`` is. Training with
        ``mha.dropout > 0`` needs ``backend="math"`` (FlexAttention has no dropout).

        Raises:
            ValueError: ``mha`` has ``add_bias_kv`` or ``add_zero_attn`` (unsupported), or
                ``kwargs`` ask for ``num_kv_heads != num_heads`` (GQA: torch has full k/v
                projections) or another value of an argument taken from ``mha``.
        """
        if not isinstance(mha, nn.MultiheadAttention):
            raise TypeError(f"mha must be an nn.MultiheadAttention, got {type(mha).__name__}")
        if mha.bias_k is not None or mha.bias_v is not None:
            raise ValueError(
                "add_bias_kv=True is not supported: MultiheadDilatedAttention has no learned "
                "key/value bias rows (bias_k, bias_v)"
            )
        if mha.add_zero_attn:
            raise ValueError(
                "add_zero_attn=True is not supported: MultiheadDilatedAttention adds no zero "
                "key/value row"
            )
        weight = mha.out_proj.weight
        taken: dict[str, object] = {
            "embed_dim": mha.embed_dim,
            "num_heads": mha.num_heads,
            "num_kv_heads": mha.num_heads,
            "bias": mha.in_proj_bias is not None,
            "kdim": mha.kdim,
            "vdim": mha.vdim,
            "dropout": mha.dropout,
            "device": weight.device,
            "dtype": weight.dtype,
        }
        for name, value in taken.items():
            given = kwargs.pop(name, None)
            if name == "device" and given is not None:
                given = torch.device(given)
            if given is not None and given != value:
                gqa = " (GQA is unsupported here)" if name == "num_kv_heads" else ""
                raise ValueError(
                    f"from_torch takes {name} from mha ({value!r}), got {name}={given!r}{gqa}; "
                    f"leave {name} out"
                )
        module = cls(
            mha.embed_dim,
            mha.num_heads,
            segment_lengths,
            dilation_rates,
            dropout=mha.dropout,
            bias=mha.in_proj_bias is not None,
            kdim=mha.kdim,
            vdim=mha.vdim,
            device=weight.device,
            dtype=weight.dtype,
            **kwargs,
        )
        missing, unexpected = module.load_state_dict(mha.state_dict(), strict=False)
        own_init = ("q_norm.", "k_norm.", "norm.", "relative_bias.")
        not_loaded = [key for key in (*missing, *unexpected) if not key.startswith(own_init)]
        if not_loaded:  # cannot happen for a module built as above
            raise RuntimeError(f"from_torch could not copy {not_loaded} from mha")
        module.train(mha.training)
        return module

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        """Also load an ``nn.MultiheadAttention`` state dict: its ``in_proj_weight``,
        ``in_proj_bias`` (``(3E, ...)``, split in three) or ``q/k/v_proj_weight`` become
        ``q_proj``, ``k_proj``, ``v_proj``; ``out_proj.*`` keys are the same in both."""
        self._rename_torch_projections(state_dict, prefix)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def _rename_torch_projections(self, state_dict: dict[str, Any], prefix: str) -> None:
        """Rewrite ``nn.MultiheadAttention``'s projection keys under ``prefix`` in place to
        ours; refuse what this module cannot hold."""
        torch_names = ["in_proj_weight", "in_proj_bias", "bias_k", "bias_v"]
        torch_names += [f"{name}_proj_weight" for name in "qkv"]
        found = [prefix + name for name in torch_names if prefix + name in state_dict]
        if not found:
            return
        if prefix + "bias_k" in state_dict or prefix + "bias_v" in state_dict:
            raise ValueError(
                "cannot load an nn.MultiheadAttention state dict with bias_k/bias_v: "
                "add_bias_kv=True is not supported"
            )
        if self.num_kv_heads != self.num_heads:
            raise ValueError(
                "an nn.MultiheadAttention state dict has one key/value head per query head: "
                f"it needs num_kv_heads == num_heads ({self.num_heads}), got "
                f"num_kv_heads={self.num_kv_heads} (GQA)"
            )
        ours = [prefix + f"{n}_proj.{p}" for n in "qkv" for p in ("weight", "bias")]
        clash = [key for key in ours if key in state_dict]
        if clash:
            raise ValueError(
                f"the state dict holds both nn.MultiheadAttention keys {found} and {clash}"
            )
        for kind in ("weight", "bias"):
            packed = state_dict.pop(prefix + f"in_proj_{kind}", None)
            if packed is not None:  # a wrong size surfaces as torch's own size mismatch
                for name, part in zip("qkv", packed.tensor_split(3), strict=True):
                    state_dict[prefix + f"{name}_proj.{kind}"] = part
        for name in "qkv":
            separate = state_dict.pop(prefix + f"{name}_proj_weight", None)
            if separate is not None:
                state_dict[prefix + f"{name}_proj.weight"] = separate

    def reset_parameters(self) -> None:
        """MAGNETO's initialisation: xavier-normal projections, gain ``gamma_init`` for value
        and output, zero biases; LayerNorms and the T5 table their own."""
        for proj, gain in (
            (self.q_proj, 1.0),
            (self.k_proj, 1.0),
            (self.v_proj, self.gamma_init),
            (self.out_proj, self.gamma_init),
        ):
            nn.init.xavier_normal_(proj.weight, gain=gain)
            if proj.bias is not None:
                nn.init.zeros_(proj.bias)
        for module in (self.q_norm, self.k_norm, self.norm, self.relative_bias):
            if module is not None:
                module.reset_parameters()

    def new_kv_cache(self, batch_size: int, capacity: int) -> KVCache:
        """An empty :class:`KVCache` for this layer, on its device and in its dtype."""
        weight = self.k_proj.weight
        return KVCache(
            batch_size,
            self.num_kv_heads,
            capacity,
            self.head_dim,
            device=weight.device,
            dtype=weight.dtype,
        )

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = False,
        attn_mask: Tensor | None = None,
        is_causal: bool | None = None,
        *,
        document_ids: Tensor | None = None,
        cu_seqlens: Tensor | None = None,
        kv_cache: KVCache | None = None,
    ) -> tuple[Tensor, None]:
        """Attend ``query`` ``(B, S_q, E)`` to ``key`` ``(B, S_kv, kdim)`` / ``value``
        ``(B, S_kv, vdim)``; returns ``(output (B, S_q, E), None)`` as ``nn.MultiheadAttention``
        does with ``need_weights=False``.

        Args:
            key_padding_mask: ``(B, S_kv)`` bool, ``True`` = padding key (ignored); rows that
                see no key give 0, not NaN as in torch. With a cache, it covers every cached
                position: ``(B, kv_cache.length + S_q)``.
            need_weights: must be ``False``: the attention weights are never built.
            attn_mask: must be ``None`` (a dense mask would undo the sparsity); use
                ``is_causal``, ``key_padding_mask`` or ``document_ids``.
            is_causal: default: the module's ``is_causal``.
            document_ids: ``(B, L)`` ints, ``L = max(S_q, S_kv)`` (with a cache
                ``kv_cache.length + S_q``): packed sequences, a query sees only keys of its
                own document. Or ``cu_seqlens`` ``(n + 1,)``, cumulative document lengths.
            kv_cache: decoding (self-attention): ``query``, ``key``, ``value`` hold the
                ``S_q`` new tokens, at positions ``kv_cache.length + [0, S_q)``; their keys and
                values are appended to the cache and the queries attend to every cached
                position, exactly as the same rows of one full causal forward would.
        """
        if need_weights:
            raise ValueError(
                "need_weights=True is not supported: dilated attention never builds the "
                "(S_q, S_kv) weight matrix; pass need_weights=False"
            )
        if attn_mask is not None:
            raise ValueError(
                "attn_mask is not supported (a dense mask would undo the sparsity): use "
                "is_causal=True, key_padding_mask, or document_ids/cu_seqlens"
            )
        self._check_inputs(query, key, value, kv_cache)
        H, H_kv = self.num_heads, self.num_kv_heads
        q = rearrange(self.q_proj(query), "b s (h d) -> b h s d", h=H)
        k = rearrange(self.k_proj(key), "b s (h d) -> b h s d", h=H_kv)
        v = rearrange(self.v_proj(value), "b s (h d) -> b h s d", h=H_kv)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q_offset = 0 if kv_cache is None else kv_cache.length
        q, k = self._rotate(q, q_offset, key=False), self._rotate(k, q_offset, key=True)
        dropout_p = self.dropout if self.training else 0.0
        mod = self._score_mod()
        extras = Extras(key_padding_mask, document_ids, cu_seqlens, mod, q_offset, dropout_p)
        causal = self.is_causal if is_causal is None else is_causal
        attend = functools.partial(self._attend, is_causal=causal, extras=extras)
        out = attend(q, k, v) if kv_cache is None else self._decode(attend, q, k, v, kv_cache)
        out = rearrange(out, "b h s d -> b s (h d)")
        if self.norm is not None:
            out = self.norm(out)
        return self.out_proj(out), None

    def _check_inputs(
        self, query: Tensor, key: Tensor, value: Tensor, kv_cache: KVCache | None
    ) -> None:
        for name, x, size in (
            ("query", query, self.embed_dim),
            ("key", key, self.kdim),
            ("value", value, self.vdim),
        ):
            if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[-1] != size:
                shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
                raise ValueError(
                    f"{name} must have shape (B, S, {size}) (batch first), got {shape}"
                )
        if not (query.shape[0] == key.shape[0] == value.shape[0]) or key.shape[1] != value.shape[1]:
            raise ValueError(
                f"query {tuple(query.shape)}, key {tuple(key.shape)} and value "
                f"{tuple(value.shape)} must share the batch size, key and value the length"
            )
        if kv_cache is not None and key.shape[1] != query.shape[1]:
            raise ValueError(
                "with a kv_cache, key and value must be the new tokens of the query (self-"
                f"attention), got query length {query.shape[1]} and key length {key.shape[1]}"
            )
        last = max(query.shape[1], key.shape[1]) + (0 if kv_cache is None else kv_cache.length)
        limit = xpos_limit(query.dtype, scale_base=self.xpos_scale_base)
        if self.position == "xpos" and last > limit:
            raise ValueError(
                f"xPos in {query.dtype} supports positions up to {limit} (its scale grows "
                f"exponentially), got {last}; use position='rotary' or a larger xpos_scale_base"
            )

    def _attend(
        self, q: Tensor, k: Tensor, v: Tensor, *, is_causal: bool, extras: Extras
    ) -> Tensor:
        """Dilated attention of the heads ``(B, H, S_q, D)``."""
        gqa = k.shape[1] != q.shape[1]
        call = AttentionCall.of(q, k, v, self.config, is_causal, None, gqa, extras)
        return attend_call(call, self.backend)[0]

    @staticmethod
    def _decode(
        attend: Callable[..., Tensor], q: Tensor, k: Tensor, v: Tensor, kv_cache: KVCache
    ) -> Tensor:
        """``attend`` the new queries to every cached key after storing the new keys and
        values; a step that fails stores nothing."""
        start = kv_cache.length
        keys, values = kv_cache.append(k, v)
        try:
            return attend(q, keys, values)
        except Exception:
            kv_cache.truncate(start)
            raise

    def _rotate(self, x: Tensor, start: int, *, key: bool) -> Tensor:
        """``x`` ``(B, H, S, D)`` at positions ``start + [0, S)``, rotated by the position
        mode (unchanged for score-mod modes)."""
        if self.position not in ("rotary", "xpos"):
            return x
        positions = torch.arange(start, start + x.shape[2], device=x.device)
        if self.position == "rotary":
            return rotary(x, positions, base=self.rotary_base)
        return xpos(x, positions, key=key, base=self.rotary_base, scale_base=self.xpos_scale_base)

    def _score_mod(self) -> _score_mod_signature | None:
        if self.position == "alibi":
            return alibi_score_mod(self.num_heads)
        if self.relative_bias is not None:
            return self.relative_bias.score_mod
        return None

    def extra_repr(self) -> str:
        c = self.config
        options = [
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}",
            f"num_kv_heads={self.num_kv_heads}" if self.num_kv_heads != self.num_heads else "",
            f"segment_lengths={list(c.segment_lengths)}, dilation_rates={list(c.dilation_rates)}",
            f"local_window={c.local_window}" if c.local_window is not None else "",
            f"position={self.position!r}" if self.position else "",
            f"dropout={self.dropout}" if self.dropout else "",
            f"is_causal={self.is_causal}, backend={self.backend!r}",
        ]
        return ", ".join(option for option in options if option)
