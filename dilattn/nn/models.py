"""LongNet models built from :class:`dilattn.MultiheadDilatedAttention`, readable top to bottom.

* :class:`LongNetConfig`: the hyperparameters, defaulting to the paper's base model;
* :class:`FeedForward` and :class:`Block`: one layer (self-attention, optional
  cross-attention, feed-forward, each a residual branch, pre- or post-norm);
* :class:`LongNet`: encoder-decoder on ``(B, S, E)`` embeddings, like ``nn.Transformer``;
* :class:`LongNetLM`: decoder-only language model (token embedding, blocks, final norm, tied
  head) with ``generate`` over a :class:`dilattn.KVCache` per layer.

Shapes: tokens ``(B, S)`` integers, activations ``(B, S, E)``, logits ``(B, S, V)``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from dilattn._checks import number_in, positive_int
from dilattn.config import DilatedConfig, HeadOffsets
from dilattn.nn.cache import KVCache
from dilattn.nn.mixed import HeadCounts, MixedHeadAttention, check_head_counts
from dilattn.nn.modules import MultiheadDilatedAttention, Position
from dilattn.nn.reversible import Coupling, couple, couple_reversibly

__all__ = ["Activation", "Block", "FeedForward", "LongNet", "LongNetConfig", "LongNetLM"]

Activation = Literal["gelu", "relu", "swiglu"]
"""The feed-forward of a :class:`Block`: ``"gelu"`` or ``"relu"`` (``down(act(up(x)))``) or
``"swiglu"`` (``down(silu(gate(x)) * up(x))``, Shazeer 2020)."""


@dataclass(frozen=True)
class LongNetConfig:
    """Hyperparameters of LongNet's blocks; the defaults are the paper's base model
    (arXiv 2307.02486, section 4: 768 wide, 12 heads, 12 + 12 layers, 3072 FFN,
    ``w = 2048..32768``, ``r = 1, 2, 4, 6, 12``). Validation raises ``ValueError``."""

    d_model: int = 768  # E: width of embeddings and residual stream
    num_heads: int = 12  # H: query heads; head dim E / H = 64
    num_kv_heads: int | None = None  # key/value heads (GQA; 1 = MQA); None: num_heads
    num_layers: int = 12  # blocks per stack: LongNet's encoder and decoder each, LongNetLM's one
    ffn_dim: int = 3072  # hidden width of the feed-forward
    segment_lengths: tuple[int, ...] = (2048, 4096, 8192, 16384, 32768)  # w_i
    dilation_rates: tuple[int, ...] = (1, 2, 4, 6, 12)  # r_i
    activation: Activation = "gelu"  # "gelu", "relu" or "swiglu"
    norm_first: bool = True  # pre-norm (x + f(norm(x))); False: post-norm (norm(x + f(x)))
    position: Position | None = "rotary"  # self-attention positions; the paper used xPos,
    # which dilattn limits to about 18k positions (dilattn.xpos_limit), so rotary by default
    dropout: float = 0.0  # on the output of each residual branch (attention and feed-forward)
    bias: bool = True  # biases of the projections and feed-forward layers
    qk_norm: bool = False  # LayerNorm over each head of q and k
    sub_layernorm: bool = False  # MAGNETO's LayerNorm before the attention's output projection
    gamma_init: float = 1.0  # MAGNETO's gain of the value and output projections
    layer_norm_eps: float = 1e-5
    head_offsets: HeadOffsets = "cyclic"  # "cyclic" (h % r, the paper) or "grouped" (torchscale)
    backend: Literal["auto", "flex", "math"] = "auto"  # flex on CUDA, math elsewhere
    activation_checkpointing: bool = False  # recompute each block in backward: memory for time
    head_plan: HeadCounts | tuple[HeadCounts, ...] | None = None  # heads of each kind
    # (local, dilated, linear), the same in every layer or one per layer; None: all dilated
    local_window_size: int = 256  # window (bucket) of local heads
    linear_chunk_size: int = 64  # chunk of the causal linear heads (memory, not the result)
    reversible: bool = False  # reversible residual layers (LongNetLM): memory flat in depth
    ff_chunks: int = 1  # feed-forward over this many sequence chunks, each recomputed in backward

    def __post_init__(self) -> None:
        branches = DilatedConfig.of(self.segment_lengths, self.dilation_rates, self.head_offsets)
        object.__setattr__(self, "segment_lengths", branches.segment_lengths)
        object.__setattr__(self, "dilation_rates", branches.dilation_rates)
        for name in ("d_model", "num_heads", "num_layers", "ffn_dim"):
            positive_int(name, getattr(self, name))
        if self.num_kv_heads is not None:
            positive_int("num_kv_heads", self.num_kv_heads)
        if self.activation not in ("gelu", "relu", "swiglu"):
            raise ValueError(
                f"activation must be 'gelu', 'relu' or 'swiglu', got {self.activation!r}"
            )
        number_in("dropout", self.dropout, 0.0, 1.0)
        for name in ("local_window_size", "linear_chunk_size", "ff_chunks"):
            positive_int(name, getattr(self, name))
        if self.reversible and (self.activation_checkpointing or not self.norm_first):
            raise ValueError(
                "reversible=True needs pre-norm residuals (norm_first=True) and already "
                "recomputes in backward (activation_checkpointing=False), got "
                f"norm_first={self.norm_first}, activation_checkpointing="
                f"{self.activation_checkpointing}"
            )
        object.__setattr__(self, "head_plan", self._check_head_plan())

    def _check_head_plan(self) -> tuple[HeadCounts, ...] | None:
        """``head_plan`` as one :class:`HeadCounts` per layer."""
        plan, kv_heads = self.head_plan, self.num_kv_heads or self.num_heads
        if plan is None:
            return None
        if self.num_heads % kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({kv_heads})"
            )
        if isinstance(plan, Sequence) and all(isinstance(n, int) for n in plan):
            plan = (plan,) * self.num_layers  # type: ignore[assignment]  # one for every layer
        if isinstance(plan, str) or not isinstance(plan, Sequence) or len(plan) != self.num_layers:
            raise ValueError(
                f"head_plan must be one HeadCounts(local, dilated, linear) or one per layer "
                f"({self.num_layers}), got {self.head_plan!r}"
            )
        return tuple(
            check_head_counts(f"head_plan[{i}]", counts, self.num_heads, kv_heads)
            for i, counts in enumerate(plan)
        )

    def heads(self, layer: int) -> HeadCounts:
        """The heads of each kind in ``layer``."""
        if self.head_plan is None:
            return HeadCounts(dilated=self.num_heads)
        plan: tuple[HeadCounts, ...] = self.head_plan  # type: ignore[assignment]
        return plan[layer]


def _layer_norm(config: LongNetConfig, **factory: Any) -> nn.LayerNorm:
    return nn.LayerNorm(config.d_model, eps=config.layer_norm_eps, **factory)


class FeedForward(nn.Module):
    """Position-wise feed-forward ``(B, S, E) -> (B, S, E)``: ``down(act(up(x)))``, or with
    SwiGLU ``down(silu(gate(x)) * up(x))``; ``up`` and ``gate`` map ``E -> ffn_dim``.

    With ``config.ff_chunks = n > 1`` the sequence goes through in ``n`` chunks, and while
    autograd records each chunk is recomputed in backward (``torch.utils.checkpoint``): the
    ``(B, S / n, ffn_dim)`` hidden activations of one chunk at a time, forward and backward.
    """

    def __init__(self, config: LongNetConfig, **factory: Any) -> None:
        super().__init__()
        E, hidden = config.d_model, config.ffn_dim
        self.activation = config.activation
        self.chunks = config.ff_chunks
        self.up = nn.Linear(E, hidden, bias=config.bias, **factory)
        swiglu = config.activation == "swiglu"
        self.gate = nn.Linear(E, hidden, bias=config.bias, **factory) if swiglu else None
        self.down = nn.Linear(hidden, E, bias=config.bias, **factory)

    def forward(self, x: Tensor) -> Tensor:
        if self.chunks == 1:
            return self._forward(x)
        recompute = torch.is_grad_enabled()
        return torch.cat(
            [
                checkpoint(self._forward, c, use_reentrant=False) if recompute else self._forward(c)
                for c in x.chunk(self.chunks, dim=1)  # (B, <= ceil(S / n), E) each
            ],
            dim=1,
        )

    def _forward(self, x: Tensor) -> Tensor:
        hidden = self.up(x)
        if self.gate is not None:
            hidden = F.silu(self.gate(x)) * hidden
        else:
            hidden = F.gelu(hidden) if self.activation == "gelu" else F.relu(hidden)
        out: Tensor = self.down(hidden)
        return out


class Block(nn.Module):
    """One layer: dilated self-attention, optional dilated cross-attention to an encoder's
    output (``memory``), then a :class:`FeedForward`; each a residual branch.

    Pre-norm (``norm_first``): ``x + dropout(f(norm(x)))``; post-norm:
    ``norm(x + dropout(f(x)))``, as ``nn.TransformerEncoderLayer`` / ``DecoderLayer`` do.
    Self-attention carries ``config.position``; cross-attention is non-causal, has no
    positions, and aligns query position ``i`` with memory position ``i`` (its segments and
    dilation count both from position 0).
    """

    def __init__(
        self,
        config: LongNetConfig,
        *,
        is_causal: bool,
        cross_attention: bool = False,
        layer: int = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        factory: dict[str, Any] = {"device": device, "dtype": dtype}

        def attention(
            position: Position | None, causal: bool, **heads: Any
        ) -> MultiheadDilatedAttention:
            kind = MixedHeadAttention if heads else MultiheadDilatedAttention
            return kind(
                config.d_model,
                config.num_heads,
                config.segment_lengths,
                config.dilation_rates,
                num_kv_heads=config.num_kv_heads,
                bias=config.bias,
                sub_layernorm=config.sub_layernorm,
                gamma_init=config.gamma_init,
                qk_norm=config.qk_norm,
                position=position,
                is_causal=causal,
                head_offsets=config.head_offsets,
                backend=config.backend,
                layer_norm_eps=config.layer_norm_eps,
                **factory,
                **heads,
            )

        heads = config.heads(layer)
        mixed = {
            "local_heads": heads.local,
            "linear_heads": heads.linear,
            "local_window_size": config.local_window_size,
            "linear_chunk_size": config.linear_chunk_size,
        }
        self.norm_first = config.norm_first
        self.self_attn = attention(
            config.position, is_causal, **(mixed if heads.dilated != config.num_heads else {})
        )
        self.attn_norm = _layer_norm(config, **factory)
        self.cross_attn = attention(None, False) if cross_attention else None
        self.cross_norm = _layer_norm(config, **factory) if cross_attention else None
        self.ffn = FeedForward(config, **factory)
        self.ffn_norm = _layer_norm(config, **factory)
        self.dropout = nn.Dropout(config.dropout)

    def _residual(self, x: Tensor, norm: nn.Module, f: Callable[[Tensor], Tensor]) -> Tensor:
        if self.norm_first:
            return x + self.branch(x, norm, f)
        out: Tensor = norm(x + self.dropout(f(x)))
        return out

    def branch(self, x: Tensor, norm: nn.Module, f: Callable[[Tensor], Tensor]) -> Tensor:
        """The pre-norm residual branch ``dropout(f(norm(x)))`` (a reversible layer's
        ``f`` or ``g``)."""
        out: Tensor = self.dropout(f(norm(x)))
        return out

    def forward(
        self,
        x: Tensor,
        *,
        memory: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        memory_key_padding_mask: Tensor | None = None,
        document_ids: Tensor | None = None,
        kv_cache: KVCache | None = None,
    ) -> Tensor:
        """``x`` ``(B, S, E)`` -> ``(B, S, E)``.

        Args:
            memory: ``(B, S_mem, E)``, the encoder's output: required with cross-attention,
                refused without.
            key_padding_mask: ``(B, S)`` bool, ``True`` = padding (self-attention keys; with
                a cache, every cached position: ``(B, kv_cache.length + S)``).
            memory_key_padding_mask: ``(B, S_mem)`` bool, padding of ``memory``.
            document_ids: ``(B, S)`` integers (packed documents) for self-attention.
            kv_cache: self-attention's :class:`dilattn.KVCache` (decoding): ``x`` holds the
                new tokens only.
        """
        if (memory is None) != (self.cross_attn is None):
            raise ValueError(
                "memory must be given exactly when the block has cross-attention "
                f"(cross_attention={self.cross_attn is not None}), got "
                f"{'None' if memory is None else tuple(memory.shape)}"
            )
        self_attention = functools.partial(
            self._self_attention,
            key_padding_mask=key_padding_mask,
            document_ids=document_ids,
            kv_cache=kv_cache,
        )
        x = self._residual(x, self.attn_norm, self_attention)
        if self.cross_attn is not None and self.cross_norm is not None and memory is not None:
            cross_attn = self.cross_attn

            def cross_attention(y: Tensor) -> Tensor:
                out: Tensor = cross_attn(
                    y, memory, memory, key_padding_mask=memory_key_padding_mask
                )[0]
                return out

            x = self._residual(x, self.cross_norm, cross_attention)
        return self._residual(x, self.ffn_norm, self.ffn)

    def _self_attention(self, y: Tensor, **kwargs: Any) -> Tensor:
        out: Tensor = self.self_attn(y, y, y, **kwargs)[0]
        return out

    def _coupling(self, **kwargs: Any) -> Coupling:
        """This block as a reversible layer: ``f`` its self-attention branch (``kwargs``
        passed on), ``g`` its feed-forward branch."""
        attend = functools.partial(self._self_attention, **kwargs)
        return Coupling(
            lambda x: self.branch(x, self.attn_norm, attend),
            lambda x: self.branch(x, self.ffn_norm, self.ffn),
            [p for p in self.parameters() if p.requires_grad],  # frozen ones get no gradient
        )


def _run_blocks(
    blocks: nn.ModuleList,
    x: Tensor,
    *,
    checkpointing: bool,
    reversible: bool = False,
    kv_caches: Sequence[KVCache] | None = None,
    **kwargs: Any,
) -> Tensor:
    """``x`` through ``blocks`` in order; with ``checkpointing`` (and autograd recording, and
    no cache, which a recomputation would append to twice) each block's activations are
    recomputed in backward instead of stored.

    ``reversible``: the blocks as reversible layers on the doubled stream ``(x, x)``
    (``y1 = x1 + f(x2)``, ``y2 = x2 + g(y1)``, ``f``/``g`` the blocks' pre-norm attention and
    feed-forward branches), returning ``(y1 + y2) / 2``; recomputed in backward under the
    same conditions."""
    if kv_caches is not None and len(kv_caches) != len(blocks):
        raise ValueError(
            f"kv_caches must hold one KVCache per block ({len(blocks)}), got {len(kv_caches)}"
        )
    if reversible:
        caches = [None] * len(blocks) if kv_caches is None else kv_caches
        layers = []
        for block, cache in zip(blocks, caches, strict=True):
            assert isinstance(block, Block)
            layers.append(block._coupling(kv_cache=cache, **kwargs))
        recompute = torch.is_grad_enabled() and kv_caches is None
        y1, y2 = (couple_reversibly if recompute else couple)(x, x, layers)
        return (y1 + y2) / 2
    for i, block in enumerate(blocks):
        if kv_caches is not None:
            x = block(x, kv_cache=kv_caches[i], **kwargs)
        elif checkpointing and torch.is_grad_enabled():
            x = checkpoint(block, x, use_reentrant=False, **kwargs)
        else:
            x = block(x, **kwargs)
    return x


class LongNet(nn.Module):
    """LongNet encoder-decoder on embeddings, shaped like ``nn.Transformer(batch_first=True)``:
    ``config.num_layers`` encoder blocks (non-causal self-attention), then as many decoder
    blocks (causal self-attention, cross-attention to the encoder's output), each stack
    closed by a LayerNorm. Bring your own embeddings and head.

    Example::

        model = LongNet(LongNetConfig())  # the paper's base model
        out = model(src, tgt)  # src (B, S, 768), tgt (B, T, 768) -> (B, T, 768)

    With ``segment_lengths=[S]``, ``dilation_rates=[1]``, ``position=None`` and
    ``activation="relu"``/``"gelu"`` it computes ``nn.Transformer`` with a causal ``tgt_mask``
    (the same weights, no dropout).
    """

    def __init__(
        self,
        config: LongNetConfig | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.config = config = LongNetConfig() if config is None else config
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        layers = range(config.num_layers)
        if config.reversible:
            raise ValueError(
                "reversible=True is for LongNetLM: LongNet's decoder blocks have a third "
                "(cross-attention) branch"
            )
        self.encoder = nn.ModuleList(
            Block(config, is_causal=False, layer=i, **factory) for i in layers
        )
        self.encoder_norm = _layer_norm(config, **factory)
        self.decoder = nn.ModuleList(
            Block(config, is_causal=True, cross_attention=True, layer=i, **factory) for i in layers
        )
        self.decoder_norm = _layer_norm(config, **factory)

    def encode(self, src: Tensor, *, src_key_padding_mask: Tensor | None = None) -> Tensor:
        """``src`` ``(B, S, E)`` -> memory ``(B, S, E)``; padding ``(B, S)`` bool."""
        x = _run_blocks(
            self.encoder,
            src,
            checkpointing=self.config.activation_checkpointing,
            key_padding_mask=src_key_padding_mask,
        )
        out: Tensor = self.encoder_norm(x)
        return out

    def decode(
        self,
        tgt: Tensor,
        memory: Tensor,
        *,
        tgt_key_padding_mask: Tensor | None = None,
        memory_key_padding_mask: Tensor | None = None,
    ) -> Tensor:
        """``tgt`` ``(B, T, E)`` attending causally to itself and to ``memory`` ``(B, S, E)``
        -> ``(B, T, E)``."""
        x = _run_blocks(
            self.decoder,
            tgt,
            checkpointing=self.config.activation_checkpointing,
            memory=memory,
            key_padding_mask=tgt_key_padding_mask,
            memory_key_padding_mask=memory_key_padding_mask,
        )
        out: Tensor = self.decoder_norm(x)
        return out

    def forward(
        self,
        src: Tensor,
        tgt: Tensor,
        *,
        src_key_padding_mask: Tensor | None = None,
        tgt_key_padding_mask: Tensor | None = None,
    ) -> Tensor:
        """``src`` ``(B, S, E)``, ``tgt`` ``(B, T, E)`` -> ``(B, T, E)``; the padding masks
        ``(B, S)`` / ``(B, T)`` bool, ``True`` = padding (``src``'s also hides padded memory
        from the cross-attention)."""
        memory = self.encode(src, src_key_padding_mask=src_key_padding_mask)
        return self.decode(
            tgt,
            memory,
            tgt_key_padding_mask=tgt_key_padding_mask,
            memory_key_padding_mask=src_key_padding_mask,
        )


class LongNetLM(nn.Module):
    """Decoder-only LongNet language model: token embedding -> ``config.num_layers`` causal
    :class:`Block` s -> LayerNorm -> head tied to the embedding (``logits = x @ W_emb.T``).

    Example::

        model = LongNetLM(256, LongNetConfig(d_model=256, num_heads=4, num_layers=4, ffn_dim=1024,
                                             segment_lengths=(256, 512), dilation_rates=(1, 2)))
        logits = model(tokens)  # tokens (B, S) -> (B, S, 256)
        text = model.eval().generate(prompt, 100, temperature=0.8, top_k=40)  # (B, S_p + 100)

    Args:
        vocab_size: ``V``, the number of token ids (256 for bytes).
        config: the blocks (default: the paper's base model).
        device, dtype: of the parameters.
    """

    def __init__(
        self,
        vocab_size: int,
        config: LongNetConfig | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.vocab_size = positive_int("vocab_size", vocab_size)
        self.config = config = LongNetConfig() if config is None else config
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.embedding = nn.Embedding(vocab_size, config.d_model, **factory)
        self.blocks = nn.ModuleList(
            Block(config, is_causal=True, layer=i, **factory) for i in range(config.num_layers)
        )
        self.norm = _layer_norm(config, **factory)
        nn.init.normal_(self.embedding.weight, std=0.02)

    def forward(
        self,
        tokens: Tensor,
        *,
        key_padding_mask: Tensor | None = None,
        document_ids: Tensor | None = None,
        kv_caches: Sequence[KVCache] | None = None,
    ) -> Tensor:
        """Next-token logits ``(B, S, V)`` for ``tokens`` ``(B, S)`` (int64 or int32, ids in
        ``[0, V)``: others raise ``ValueError``, checked outside ``torch.compile`` only).

        Args:
            key_padding_mask: ``(B, S)`` bool, ``True`` = padding (with caches: every cached
                position, ``(B, length + S)``).
            document_ids: ``(B, S)`` integers: packed documents, no attention across them.
            kv_caches: one :class:`dilattn.KVCache` per block (:meth:`new_kv_caches`):
                ``tokens`` are the new tokens at positions ``length + [0, S)``, and the logits
                equal those rows of one forward over the whole sequence.
        """
        x = self.embedding(_check_tokens("tokens", tokens, self.vocab_size))  # (B, S, E)
        x = _run_blocks(
            self.blocks,
            x,
            checkpointing=self.config.activation_checkpointing,
            reversible=self.config.reversible,
            kv_caches=kv_caches,
            key_padding_mask=key_padding_mask,
            document_ids=document_ids,
        )
        return F.linear(self.norm(x), self.embedding.weight)  # (B, S, V)

    def new_kv_caches(self, batch_size: int, capacity: int) -> list[KVCache]:
        """One empty :class:`dilattn.KVCache` per block, for ``capacity`` positions: memory
        ``num_layers * 2 * B * H_kv * capacity * D`` elements, allocated once. They hold the
        dtype the projections produce: autocast's where it is on, else the parameters'."""
        weight = self.embedding.weight
        dtype = weight.dtype
        if torch.is_autocast_enabled(weight.device.type):
            dtype = torch.get_autocast_dtype(weight.device.type)
        caches = []
        for block in self.blocks:
            attn = block.self_attn
            assert isinstance(attn, MultiheadDilatedAttention)
            shape = (batch_size, attn.num_kv_heads, capacity, attn.head_dim)
            caches.append(KVCache(*shape, device=weight.device, dtype=dtype))
        return caches

    @torch.no_grad()
    def generate(
        self,
        prompt: Tensor,
        max_new_tokens: int,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Continue ``prompt`` ``(B, S)`` by ``max_new_tokens`` sampled tokens ->
        ``(B, S + max_new_tokens)``.

        The prompt runs once through the blocks, filling a :class:`dilattn.KVCache` per
        block (capacity ``S + max_new_tokens - 1``, allocated once); then each new token runs
        alone, attending to the cache: the logits are those of a full forward over the
        sequence so far. Call ``model.eval()`` first if the model has dropout.

        Args:
            temperature: logits are divided by it before sampling; 0 picks the most likely
                token (greedy).
            top_k: sample among the ``top_k`` most likely tokens only (``1 <= top_k <= V``).
            generator: the random generator of the sampling (``torch.multinomial``), for
                reproducible samples; default torch's global one.
        """
        positive_int("max_new_tokens", max_new_tokens)
        temperature = number_in("temperature", temperature, 0.0, float("inf"))
        if top_k is not None and (positive_int("top_k", top_k) > self.vocab_size):
            raise ValueError(f"top_k must be at most vocab_size ({self.vocab_size}), got {top_k}")
        B, S = _check_tokens("prompt", prompt, self.vocab_size).shape
        caches = self.new_kv_caches(B, S + max_new_tokens - 1)
        logits = self(prompt, kv_caches=caches)[:, -1]  # (B, V)
        tokens = [prompt]
        for step in range(max_new_tokens):
            tokens.append(_sample(logits, temperature, top_k, generator))  # (B, 1)
            if step + 1 < max_new_tokens:
                logits = self(tokens[-1], kv_caches=caches)[:, -1]  # (B, V)
        return torch.cat(tokens, dim=1)


def _check_tokens(name: str, tokens: object, vocab_size: int) -> Tensor:
    """``tokens``: an int64/int32 tensor ``(B, S)``, ``S >= 1``, of ids in ``[0, vocab_size)``.

    The range check reads the smallest and largest id back to the host: on CUDA that is a
    synchronisation (there a bad id would otherwise be a device-side assert that ends the
    process's CUDA context). It is skipped inside ``torch.compile``, where it would break the
    graph."""
    if not isinstance(tokens, Tensor) or tokens.dtype not in (torch.int64, torch.int32):
        kind = tokens.dtype if isinstance(tokens, Tensor) else type(tokens).__name__
        raise TypeError(f"{name} must be an int64 or int32 tensor, got {kind}")
    if tokens.dim() != 2 or tokens.shape[1] == 0:
        raise ValueError(f"{name} must have shape (B, S) with S >= 1, got {tuple(tokens.shape)}")
    if not torch.compiler.is_compiling() and tokens.numel() > 0:
        low, high = (int(x) for x in tokens.aminmax())
        if low < 0 or high >= vocab_size:
            raise ValueError(
                f"{name} must hold token ids in [0, {vocab_size}) (vocab_size), got ids in "
                f"[{low}, {high}]"
            )
    return tokens


def _sample(
    logits: Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None
) -> Tensor:
    """A token id ``(B, 1)`` per row of ``logits`` ``(B, V)``."""
    if temperature == 0:
        return logits.argmax(-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, -torch.inf)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)
