"""The closed-loop statistics: paired ratios, their intervals and minimum detectable
effects on known inputs."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from adloop.evaluation import (
    Z80,
    Z975,
    EvalConfig,
    PolicyRun,
    aggregate,
    headline_table,
    mean_ci,
    paired_ratio,
    plot_ratios,
    ratio_table,
    t95,
    units_for_mde,
)


def test_t95_matches_the_student_t_quantiles() -> None:
    # exact two-sided 95 % quantiles (tables): the expansion is within 0.001 past df 10
    for df, exact in ((1, 12.706), (7, 2.365), (11, 2.201), (15, 2.131), (20, 2.086),
                      (30, 2.042), (60, 2.000), (120, 1.980)):
        assert t95(df) == pytest.approx(exact, abs=1e-3), df
    total = Z975 + Z80
    assert total == pytest.approx(2.8016, abs=1e-4)
    m, lo, hi = mean_ci([1.0, 2.0, 3.0])
    assert (m, lo, hi) == pytest.approx((2.0, 2.0 - 4.303 / math.sqrt(3),
                                         2.0 + 4.303 / math.sqrt(3)))


def test_paired_ratio_interval_and_mde_on_known_values() -> None:
    # means 1.0 and 1.0; linearized log-ratio terms 0.1, -0.1, 0.2, -0.2:
    # sd = sqrt(0.1 / 3), se = sd / 2, interval exp(±3.182 · se), mde 2.8016 · se
    pr = paired_ratio([1.1, 0.9, 1.2, 0.8], [1.0, 1.0, 1.0, 1.0])
    assert pr is not None
    se = math.sqrt(0.1 / 3) / 2
    assert pr.ratio == pytest.approx(1.0)
    assert pr.se_log == pytest.approx(se) == pytest.approx(0.0912871)
    assert pr.ci_low == pytest.approx(math.exp(-3.182 * se)) == pytest.approx(0.74791, abs=1e-5)
    assert pr.ci_high == pytest.approx(math.exp(3.182 * se))
    assert pr.mde == pytest.approx(2.8015852 * se) == pytest.approx(0.25575, abs=1e-5)
    assert pr.per_unit == pytest.approx((1.1, 0.9, 1.2, 0.8))


def test_pairing_removes_what_both_policies_share() -> None:
    # seeds differ tenfold in level but b is a fixed 20 % below a on every seed: the
    # ratio is exact, whereas unpaired intervals of each mean would overlap widely
    a = [10.0, 100.0, 40.0, 7.0, 55.0]
    pr = paired_ratio(a, [x / 1.2 for x in a])
    assert pr is not None and pr.ratio == pytest.approx(1.2)
    assert pr.ci_low == pytest.approx(1.2) and pr.ci_high == pytest.approx(1.2)
    assert pr.mde == pytest.approx(0.0, abs=1e-12)
    _, lo, _ = mean_ci(a)
    assert lo < 0


def test_paired_ratio_edge_cases() -> None:
    one = paired_ratio([2.0], [1.0])
    assert one is not None and one.ratio == 2.0
    assert one.ci_low is None and one.mde is None
    assert paired_ratio([], []) is None
    assert paired_ratio([1.0, 2.0], [0.0, 0.0]) is None
    with pytest.raises(ValueError, match="paired"):
        paired_ratio([1.0, 2.0], [1.0])


def test_units_for_mde_scales_with_the_square_of_the_standard_error() -> None:
    # se 0.1 on 4 seeds: sd 0.2 per seed; (2.8016 · 0.2 / 0.05)² = 125.6 -> 126 seeds
    assert units_for_mde(0.1, 4) == 126
    assert units_for_mde(0.1, 4, target=0.1) == 32
    assert units_for_mde(0.001, 4) == 2


def _run(policy: str, seed: int, expected: list[float]) -> PolicyRun:
    return PolicyRun(policy, seed, impressions=[100] * len(expected),
                     revenue=list(expected), expected=list(expected),
                     oracle_expected=[2 * x for x in expected],
                     observable_expected=[1.5 * x for x in expected],
                     clicks=[1] * len(expected), conversions=[0] * len(expected),
                     latency_s=[0.001])


def test_aggregate_reports_last_quarter_and_whole_run_ratios_with_intervals() -> None:
    # four buckets; last quarter = the last bucket
    runs = [
        _run("rspo", 0, [1.0, 1.0, 1.0, 1.1]), _run("rspo", 1, [2.0, 2.0, 2.0, 0.9]),
        _run("frozen", 0, [1.0, 1.0, 1.0, 1.0]), _run("frozen", 1, [2.0, 2.0, 2.0, 1.0]),
        _run("popularity", 0, [0.5] * 4), _run("popularity", 1, [0.5] * 4),
        _run("bid_only", 0, [0.8] * 4), _run("bid_only", 1, [0.8] * 4),
    ]
    res = aggregate(runs, EvalConfig(seeds=(0, 1), requests=400, buckets=4))
    # last quarter: rspo 11, 9 RPM-units vs frozen 10, 10
    assert res["rspo_over_frozen"] == pytest.approx(1.0)
    pr = paired_ratio([11.0, 9.0], [10.0, 10.0])
    assert pr is not None
    assert res["rspo_over_frozen_ci_low"] == pytest.approx(pr.ci_low)
    assert res["mde_rspo_over_frozen"] == pytest.approx(pr.mde)
    # whole run: rspo 41, 69 vs frozen 40, 70 (per 4 buckets of 100 impressions)
    whole = paired_ratio([41 / 4 * 10, 69 / 4 * 10], [40 / 4 * 10, 70 / 4 * 10])
    assert whole is not None
    assert res["rspo_over_frozen_whole_run"] == pytest.approx(whole.ratio)
    assert res["mde_rspo_over_frozen_whole_run"] == pytest.approx(whole.mde)
    # the best baseline is one of the learned yardsticks (logistic, dlrm, vw_cb): none ran
    assert res["best_baseline"] is None
    assert res["rspo_over_best_baseline"] is None
    assert res["mde_rspo_over_best_baseline"] is None
    assert "best_baseline" not in res["policies"]
    # ratios of policies that did not run: the earlier keys stay (None), others are absent
    assert res["rspo_over_dlrm"] is None and res["mde_rspo_over_dlrm"] is None
    assert res["rspo_over_frozen_explore"] is None      # required: present even then
    assert "rspo_over_vw_cb" not in res
    assert res["ratios"] == ["rspo_over_frozen"]
    assert res["policies"]["rspo"]["per_seed_rpm_whole_run"] == [10.25, 17.25]
    table = ratio_table(res)
    assert "| rspo / frozen | 1.000 (" in table and "| rspo / best_baseline |" not in table
    assert ratio_table(res) in headline_table(res)


def test_plot_ratios_draws_the_intervals(tmp_path: Path) -> None:
    runs = [_run("rspo", s, [1.0, 1.0, 1.0, 1.0 + 0.1 * s]) for s in range(3)] + [
        _run("frozen", s, [1.0, 1.0, 1.0, 1.0]) for s in range(3)]
    res = aggregate(runs, EvalConfig(seeds=(0, 1, 2), requests=400, buckets=4))
    path = plot_ratios(res, tmp_path / "ratios.png", "ratios")
    assert path is not None and path.stat().st_size > 1000
    assert plot_ratios({"ratios": []}, tmp_path / "none.png", "none") is None
