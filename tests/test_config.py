"""DilatedConfig: validation and head offsets."""

from __future__ import annotations

import pytest

from dilattn import DilatedConfig


@pytest.mark.parametrize(
    ("segments", "rates", "match"),
    [
        ((8, 16), (1,), "same length"),
        ((), (), "must not be empty"),
        ((8, 0), (1, 1), "positive"),
        ((8,), (-1,), "positive"),
        ((4,), (8,), "at most its segment length"),
        ((8.5,), (1,), "integers"),
        ((8,), ("2",), "integers"),
        ((True,), (1,), "integers"),
        ("8", (1,), "sequence of positive integers"),
        (None, (1,), "segment_lengths must be a sequence of positive integers, got None"),
        (8, (1,), "segment_lengths must be a sequence of positive integers, got 8"),
        ((8,), 1, "dilation_rates must be a sequence of positive integers, got 1"),
        ((2**70,), (1,), rf"segment_lengths must be at most 2\*\*62, got {2**70} in \[{2**70}\]"),
        ((2**62 + 1,), (2**63,), r"segment_lengths must be at most 2\*\*62"),
    ],
)
def test_invalid_configurations_raise_naming_the_argument(segments, rates, match) -> None:
    with pytest.raises(ValueError, match=match) as error:
        DilatedConfig(segments, rates)
    text = str(error.value)
    assert "segment_lengths" in text or "dilation_rates" in text or "dilation rate" in text


def test_largest_integers_are_2_to_the_62() -> None:
    config = DilatedConfig((2**62,), (2**62,), local_window=2**62)
    assert config.branches == ((2**62, 2**62),)
    with pytest.raises(ValueError, match=rf"^local_window must be at most 2\*\*62, got {2**70}$"):
        DilatedConfig((8,), (1,), local_window=2**70)


def test_bad_head_offsets_raise() -> None:
    with pytest.raises(ValueError, match="head_offsets"):
        DilatedConfig((8,), (2,), "random")  # type: ignore[arg-type]


def test_offsets_cyclic_and_grouped() -> None:
    config = DilatedConfig((8, 12), (1, 4))
    assert config.offsets(6) == ((0,) * 6, (0, 1, 2, 3, 0, 1))
    grouped = DilatedConfig((8, 12), (1, 4), "grouped")
    assert grouped.offsets(6) == ((0,) * 6, (0, 0, 1, 1, 2, 2))  # h // ceil(6 / 4)
    assert grouped.offsets(2) == ((0, 0), (0, 1))
    with pytest.raises(ValueError, match="num_heads"):
        config.offsets(0)


def test_configuration_is_immutable_and_normalised() -> None:
    config = DilatedConfig([8, 12], [1, 4])  # type: ignore[arg-type]
    assert config.branches == ((8, 1), (12, 4))
    with pytest.raises(AttributeError):
        config.segment_lengths = (1,)  # type: ignore[misc]


def test_flops_follow_the_cost_formula() -> None:
    config = DilatedConfig((2048, 4096), (1, 2))
    S, H, D = 8192, 12, 64
    expected = 4 * H * S * 2048 * D + 4 * H * S * 4096 * D / 4
    assert config.flops(S, num_heads=H, head_dim=D) == expected
    assert config.flops(S, num_heads=H, head_dim=D, is_causal=True) == expected / 2
    assert config.flops(1000, num_heads=1, head_dim=1) == 4 * 1000 * 1000 + 4 * 1000 * 1000 / 4
