"""The checked call: its checks, and that every entry point builds it the same way."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch

import dilattn
from dilattn import reference
from dilattn._call import AttentionCall, Extras
from dilattn.config import DilatedConfig, make_window

# query (1, 4, 6, 8), key and value (1, 2, 10, 8): GQA, S_q < S_kv
Q, K, V = (torch.randn(1, h, s, 8) for h, s in ((4, 6), (2, 10), (2, 10)))


def _of(extras: Extras, **changes: Any) -> AttentionCall[DilatedConfig]:
    args: dict[str, Any] = {"is_causal": False, "scale": None, "enable_gqa": True, **changes}
    return AttentionCall.of(Q, K, V, DilatedConfig((4,), (1,)), extras=extras, **args)


@pytest.mark.parametrize(
    ("changes", "extras", "error", "match"),
    [
        ({"is_causal": "False"}, Extras(), TypeError, "is_causal must be a bool, got 'False'"),
        ({"scale": "0.5"}, Extras(), TypeError, "scale must be a float or None, got '0.5'"),
        ({"enable_gqa": False}, Extras(), ValueError, "pass enable_gqa=True"),
        ({}, Extras(q_offset=-1), ValueError, "q_offset must be a non-negative integer"),
        ({}, Extras(dropout_p=1.5), ValueError, r"dropout_p must be in \[0.0, 1.0\], got 1.5"),
        ({}, Extras(document_ids=torch.zeros(1, 6).long()), ValueError, r"shape \(1, 10\)"),
    ],
)
def test_a_bad_argument_raises_naming_it(changes, extras, error, match) -> None:
    with pytest.raises(error, match=match):
        _of(extras, **changes)


def test_the_checked_values() -> None:
    call = _of(Extras(cu_seqlens=torch.tensor([0, 3, 10]), q_offset=4), is_causal=True)
    assert call.shapes == (1, 4, 2, 6, 10, 8, 8)
    assert (call.is_causal, call.scale, call.q_offset, call.dropout_p) == (True, 8**-0.5, 4, 0.0)
    assert call.document_ids is not None  # from cu_seqlens: (1, L), shared by the batch
    assert call.document_ids.tolist() == [[0] * 3 + [1] * 7]
    assert call.key_padding_mask is None and call.visibility is not None
    with pytest.raises(dataclasses.FrozenInstanceError):
        call.q_offset = 0  # type: ignore[misc]


@pytest.fixture
def built(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, object]]:
    """The fields of every call built during the test (tensors as lists, to compare)."""
    calls: list[dict[str, object]] = []
    of = AttentionCall.of

    def record(*args: Any, **kwargs: Any) -> AttentionCall[Any]:
        call = of(*args, **kwargs)
        fields = {f.name: getattr(call, f.name) for f in dataclasses.fields(call)}
        calls.append({n: x.tolist() if torch.is_tensor(x) else x for n, x in fields.items()})
        return call

    monkeypatch.setattr(AttentionCall, "of", record)
    return calls


EXTRAS = {
    "key_padding_mask": torch.tensor([[False] * 9 + [True]]),
    "cu_seqlens": torch.tensor([0, 3, 10]),
    "score_mod": lambda score, b, h, q_idx, kv_idx: score + (q_idx - kv_idx) / 8,
    "q_offset": 4,
}
OPTIONS: dict[str, Any] = {"is_causal": True, "scale": 0.3, "enable_gqa": True}


def test_every_dilated_entry_point_builds_the_same_call(built: list[dict[str, object]]) -> None:
    options = {"head_offsets": "grouped", "local_window": 3, **OPTIONS}
    dilattn.dilated_attention(Q, K, V, [4, 8], [1, 2], **options, **EXTRAS)
    reference.dilated_attention_reference(Q, K, V, [4, 8], [1, 2], **options, **EXTRAS)
    reference.dilated_attention_dense(Q, K, V, [4, 8], [1, 2], **options, **EXTRAS)
    dilattn.DilatedAttention([4, 8], [1, 2], **options)(Q, K, V, **EXTRAS)
    assert len(built) == 4
    assert built[0]["pattern"] == DilatedConfig((4, 8), (1, 2), "grouped", 3)
    assert (built[0]["scale"], built[0]["q_offset"], built[0]["is_causal"]) == (0.3, 4, True)
    assert built[0]["document_ids"] == [[0] * 3 + [1] * 7]
    assert all(call == built[0] for call in built[1:])


def test_every_local_entry_point_builds_the_same_call(built: list[dict[str, object]]) -> None:
    window = {"look_backward": 2, "exact_windowsize": True}
    dilattn.local_attention(Q, K, V, 3, **window, **OPTIONS, **EXTRAS)
    reference.local_attention_reference(Q, K, V, 3, **window, **OPTIONS, **EXTRAS)
    assert built[0]["pattern"] == make_window(3, is_causal=True, **window)
    assert built == [built[0]] * 2
