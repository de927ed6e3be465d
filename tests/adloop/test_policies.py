"""The generative policy's serving rules: beams that reach the catalogue, calibration."""

from __future__ import annotations

from adloop.policies import expected_calibration_error, level_widths


def test_level_zero_keeps_every_code_of_a_small_catalogue_and_width_applies_below() -> None:
    assert level_widths(32, 40, 3) == [40, 32, 32]        # 40 <= 2 * 32: all of level 0
    assert level_widths(128, 61, 7) == [61] + [128] * 6   # the width is never capped at 16
    assert level_widths(8, 40, 3) == [8, 8, 8]            # a large catalogue for this width


def test_calibration_error_is_zero_when_predictions_match_rates() -> None:
    p = [0.1] * 100 + [0.5] * 100
    y = [1.0] * 10 + [0.0] * 90 + [1.0] * 50 + [0.0] * 50
    ece, curve = expected_calibration_error(p, y, bins=2)
    assert ece < 1e-12
    assert [round(c[0], 3) for c in curve] == [0.1, 0.5]
    over, _ = expected_calibration_error([0.9] * 100, [0.0] * 100)
    assert abs(over - 0.9) < 1e-12
