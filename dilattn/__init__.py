"""dilattn: exact LongNet dilated attention (arXiv 2307.02486) on FlexAttention.

Shape legend, used everywhere in the package:

* attention tensors ``(B, H, S, D)``: batch, heads, sequence, head dim (SDPA's layout);
  keys/values may have ``H_kv`` heads (GQA) and values ``D_v``;
* log-sum-exp ``(B, H, S)``, natural log, float32;
* masks from :mod:`dilattn.reference` ``(H, S_q, S_kv)``.

Three ways in:

* :func:`flex_mask`: a ``(block_mask, score_mod)`` pair that makes your own
  ``flex_attention`` call exactly dilated attention;
* :func:`dilated_attention` / :class:`DilatedAttention`: the fast branch path, functional or
  as a module; :class:`MultiheadDilatedAttention`, a drop-in for
  ``nn.MultiheadAttention(batch_first=True)`` with GQA, QK-norm, MAGNETO's sub-LayerNorm,
  positions (:mod:`dilattn.positions`) and a :class:`KVCache` for decoding;
* :mod:`dilattn.reference`: dense, obviously correct, for checking kernels.

Local windowed attention: :func:`local_attention` / :class:`LocalAttention` (a drop-in for
the ``local-attention`` package's module), or a ``local_window`` branch merged into dilated
attention. Global linear attention (Katharopoulos et al., 2020): :func:`linear_attention`.
:class:`MixedHeadAttention` mixes local, dilated and linear heads in one layer
(:class:`HeadCounts`), as ``linear-attention-transformer`` mixes local and linear ones.

Hugging Face models: :mod:`dilattn.integrations.transformers` (extra ``hf``) adds
``attn_implementation="dilated"``.

Models (:mod:`dilattn.nn.models`): :class:`LongNet` (encoder-decoder) and :class:`LongNetLM`
(decoder-only, with ``generate`` over a KV cache), configured by :class:`LongNetConfig`
(per-layer head plans, reversible layers, chunked feed-forward).

Every path takes ``key_padding_mask`` (``(B, S_kv)``, ``True`` = padding), packed documents
(``document_ids`` or ``cu_seqlens``) and a FlexAttention ``score_mod`` evaluated at absolute
positions; the functional path and the reference also take ``q_offset`` (decoding).

Sequence parallelism across the ranks of a torch.distributed process group:
:mod:`dilattn.distributed` (its names are also here, imported on first use).
"""

import warnings
from typing import TYPE_CHECKING

# torch warns on import when numpy is missing; dilattn never needs numpy
warnings.filterwarnings("ignore", message="Failed to initialize NumPy", category=UserWarning)

from dilattn.config import DilatedConfig, HeadOffsets
from dilattn.functional import dilated_attention, explain
from dilattn.linear import linear_attention
from dilattn.local import LocalAttention, local_attention
from dilattn.masks import FlexMask, dilated_mask_mod, dilated_score_mod, flex_mask
from dilattn.merge import merge_by_lse
from dilattn.nn.cache import KVCache
from dilattn.nn.mixed import HeadCounts, MixedHeadAttention
from dilattn.nn.models import Activation, Block, FeedForward, LongNet, LongNetConfig, LongNetLM
from dilattn.nn.modules import DilatedAttention, MultiheadDilatedAttention, Position
from dilattn.positions import (
    T5RelativeBias,
    alibi_score_mod,
    alibi_slopes,
    rotary,
    xpos,
    xpos_limit,
)

if TYPE_CHECKING:
    from dilattn.distributed import (
        ParallelDilatedAttention,
        dilated_attention_parallel,
        gather_sequence,
        shard_sequence,
    )

__all__ = [
    "Activation",
    "Block",
    "DilatedAttention",
    "DilatedConfig",
    "FeedForward",
    "FlexMask",
    "HeadCounts",
    "HeadOffsets",
    "KVCache",
    "LocalAttention",
    "LongNet",
    "LongNetConfig",
    "LongNetLM",
    "MixedHeadAttention",
    "MultiheadDilatedAttention",
    "ParallelDilatedAttention",
    "Position",
    "T5RelativeBias",
    "alibi_score_mod",
    "alibi_slopes",
    "dilated_attention",
    "dilated_attention_parallel",
    "dilated_mask_mod",
    "dilated_score_mod",
    "explain",
    "flex_mask",
    "gather_sequence",
    "linear_attention",
    "local_attention",
    "merge_by_lse",
    "rotary",
    "shard_sequence",
    "xpos",
    "xpos_limit",
]

_DISTRIBUTED = {
    "ParallelDilatedAttention",
    "dilated_attention_parallel",
    "gather_sequence",
    "shard_sequence",
}


def __getattr__(name: str) -> object:
    """The names of :mod:`dilattn.distributed`, imported on first use: ``import dilattn``
    does not import torch.distributed's collectives (nor fail where they are missing)."""
    if name in _DISTRIBUTED:
        from dilattn import distributed

        return getattr(distributed, name)
    raise AttributeError(f"module 'dilattn' has no attribute {name!r}")


__version__ = "0.1.0"
