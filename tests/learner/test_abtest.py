"""The always-valid revenue test (learner/abtest.py): error rates under continuous
monitoring on ads-like revenue, power, coverage, and the streaming form agreeing with
the vectorized one. Fixed seeds; Monte Carlo slack is three standard errors."""

from __future__ import annotations

import math

import numpy as np
import pytest

from learner.abtest import (
    Moments,
    RevenueTest,
    ads_like_revenue,
    first_decisions,
    half_width,
    mixture_rho,
)

ALPHA = 0.05
MEAN = 0.1   # ads_like_revenue's mean per request at scale 1


def _experiments(seed: int, n_exp: int, n_req: int, drop: float, control_share: float
                 ) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    control = rng.random((n_exp, n_req)) < control_share
    revenue = ads_like_revenue(rng, (n_exp, n_req), scale=np.where(control, 1.0, 1.0 - drop))
    return revenue, control


def _decisions(seed: int, n_exp: int, n_req: int, drop: float, control_share: float,
               every: int, chunk: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """First decision and when, per experiment, simulated ``chunk`` experiments at a time."""
    out = [first_decisions(*_experiments(seed + i, min(chunk, n_exp - i), n_req, drop,
                                         control_share), ALPHA, min_requests=1000,
                           every=every)[:2]
           for i in range(0, n_exp, chunk)]
    return np.concatenate([d for d, _ in out]), np.concatenate([a for _, a in out])


def _slack(p: float, n: int) -> float:
    return 3.0 * math.sqrt(p * (1.0 - p) / n)


def test_ads_like_revenue_is_zero_inflated_and_heavy_tailed() -> None:
    x = ads_like_revenue(np.random.default_rng(1000), (400_000,))
    assert (x == 0).mean() > 0.94
    assert x.mean() == pytest.approx(MEAN, rel=0.05)
    assert x.std() / x.mean() > 10          # coefficient of variation of ad revenue
    assert x.max() > 100 * x.mean()


@pytest.mark.parametrize("control_share", [0.5, 0.1])
def test_type_one_error_under_continuous_monitoring_stays_below_alpha(
        control_share: float) -> None:
    """No difference; the test looks after every request of 30 000, from its minimum
    sample on: the share of experiments it ever decides in stays <= alpha."""
    n_exp, decided = 300, 0
    for chunk in range(3):
        revenue, control = _experiments(1000 + chunk, n_exp // 3, 30_000, 0.0, control_share)
        decision, _, _ = first_decisions(revenue, control, ALPHA, min_requests=1000)
        decided += int((decision != 0).sum())
    assert decided / n_exp <= ALPHA + _slack(ALPHA, n_exp), decided


def test_a_twenty_percent_drop_is_found_with_high_power_and_the_right_sign() -> None:
    """Online earns 20 % less (fewer clicks); even split; looks every 100 requests."""
    decision, at = _decisions(1100, 40, 250_000, 0.20, 0.5, every=100)
    assert (decision == 1).sum() == 0           # never the wrong way
    assert (decision == -1).mean() >= 0.9, decision
    assert np.median(at[decision == -1]) < 150_000


def test_a_ten_percent_drop_is_found_more_often_with_more_data() -> None:
    decision, at = _decisions(1200, 30, 600_000, 0.10, 0.5, every=200)
    assert (decision == 1).sum() == 0
    found = decision == -1
    early = found & (at < 200_000)
    assert found.mean() > early.mean()
    assert found.mean() >= 0.5, decision


def test_intervals_cover_the_true_difference_at_every_look() -> None:
    drop = 0.15
    revenue, control = _experiments(1030, 150, 40_000, drop, 0.3)
    _, _, bounds = first_decisions(revenue, control, ALPHA, min_requests=1000, every=10)
    truth = -drop * MEAN
    covered = (bounds[:, 0] <= truth) & (truth <= bounds[:, 1])
    assert covered.mean() >= 1 - ALPHA - _slack(ALPHA, 150), covered.mean()


def test_streaming_test_agrees_with_the_vectorized_one() -> None:
    revenue, control = _experiments(1040, 1, 60_000, 0.25, 0.5)
    decision, at, _ = first_decisions(revenue, control, ALPHA, min_requests=1000)
    assert decision[0] == -1
    test = RevenueTest(ALPHA, min_requests=1000)
    first = None
    for i, (x, c) in enumerate(zip(revenue[0], control[0], strict=True)):
        test.add("control" if c else "online", float(x))
        if i >= 1000 and test.result().decision != "continue":
            first = i
            break
    assert first == at[0]
    assert test.decided is not None and test.decided.decision == "online_worse"
    res = test.decided
    assert res.lower < res.diff < res.upper < 0
    assert res.n_online + res.n_control == first + 1
    assert res.evidence()["rpm_diff"] == pytest.approx(1000 * res.diff, abs=1e-6)


def test_no_decision_before_the_minimum_sample_even_on_a_huge_gap() -> None:
    test = RevenueTest(ALPHA, min_requests=500)
    for i in range(499):
        test.add("online", 0.0)
        test.add("control", 5.0 + (i % 3))
    assert test.result().decision == "continue"
    assert test.result().upper < 0               # the interval already excludes 0
    test.add("online", 0.0)
    test.add("control", 5.0)
    assert test.result().decision == "online_worse"


def test_the_boundary_narrows_with_data_and_is_tightest_near_the_target() -> None:
    rho = mixture_rho(ALPHA, 20_000)
    sigma2 = 1.0
    widths = {n: half_width(2 * sigma2 / n, rho ** 2 * sigma2, ALPHA)
              for n in (1_000, 20_000, 400_000)}
    assert widths[1_000] > widths[20_000] > widths[400_000]
    # against the boundary tuned for 1000 requests, the one tuned for 20 000 is
    # narrower at 20 000
    other = mixture_rho(ALPHA, 1_000)
    assert widths[20_000] < half_width(2 * sigma2 / 20_000, other ** 2 * sigma2, ALPHA)
    assert half_width(0.0, 1.0, ALPHA) == math.inf


def test_moments_match_numpy_and_bad_input_is_refused() -> None:
    x = np.random.default_rng(1050).lognormal(size=1000)
    m = Moments()
    for v in x:
        m.add(float(v))
    assert m.mean == pytest.approx(x.mean()) and m.var == pytest.approx(x.var(ddof=1))
    assert Moments.from_json(m.to_json()) == m
    test = RevenueTest()
    with pytest.raises(ValueError, match="bucket"):
        test.add("none", 1.0)
    with pytest.raises(ValueError, match="finite"):
        test.add("online", math.nan)
    with pytest.raises(ValueError, match="alpha"):
        RevenueTest(alpha=1.5)
