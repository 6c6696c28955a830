"""``nn.Module`` wrappers over the functional path."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from dilattn.config import DilatedConfig, HeadOffsets
from dilattn.functional import BackendName, dilated_attention

__all__ = ["DilatedAttention"]


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
    ) -> None:
        super().__init__()
        self.config = DilatedConfig(tuple(segment_lengths), tuple(dilation_rates), head_offsets)
        self.is_causal = is_causal
        self.scale = scale
        self.enable_gqa = enable_gqa
        self.backend: BackendName = backend

    def forward(self, query: Tensor, key: Tensor, value: Tensor) -> Tensor:
        """q ``(B, H, S_q, D)``, k ``(B, H_kv, S_kv, D)``, v ``(B, H_kv, S_kv, D_v)``
        -> ``(B, H, S_q, D_v)``."""
        out = dilated_attention(
            query,
            key,
            value,
            self.config.segment_lengths,
            self.config.dilation_rates,
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
