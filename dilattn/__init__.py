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
  as a module;
* :mod:`dilattn.reference`: dense, obviously correct, for checking kernels.
"""

from dilattn.config import DilatedConfig, HeadOffsets
from dilattn.functional import dilated_attention
from dilattn.masks import FlexMask, dilated_mask_mod, dilated_score_mod, flex_mask
from dilattn.merge import merge_by_lse
from dilattn.modules import DilatedAttention

__all__ = [
    "DilatedAttention",
    "DilatedConfig",
    "FlexMask",
    "HeadOffsets",
    "dilated_attention",
    "dilated_mask_mod",
    "dilated_score_mod",
    "flex_mask",
    "merge_by_lse",
]

__version__ = "0.1.0"
