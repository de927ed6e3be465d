"""``adloop evaluate --offline``'s slate estimates and trust diagnostics on synthetic
joined logs (no snapshot needed: the target's slates are given): effective sample size,
the share of the log the target matches, and the warnings when it cannot be trusted."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import structlog

from adloop.offpolicy import (
    DEFAULT_ESTIMATOR,
    MIN_MATCHED_ITEMS,
    slate_log_of,
    slate_report,
    trust_warnings,
)
from learner.slate_ope import SLATE_ESTIMATORS
from streams.schemas import Ad, Feedback, FeedbackItem

N_ADS, K = 8, 2


@pytest.fixture(autouse=True)
def _reset_logging() -> Iterator[None]:
    yield
    structlog.reset_defaults()


def _ads() -> list[Ad]:
    return [Ad(ad_id=f"a{i}", advertiser_id=f"adv{i % 3}", industry=("retail", "travel")[i % 2],
               bid_type="cpc", conversion_goal="purchase", bid=1.0, budget=100.0,
               title="t", description="d", status="active", created_time=0.0,
               event_time=0.0) for i in range(N_ADS)]


def _log(n: int, seed: int, ctr: np.ndarray) -> tuple[list[Feedback], list[list[str]]]:
    """``n`` impressions of a uniform logger (K of N_ADS without replacement, propensity
    1/N_ADS per slot), reward 1 per click with probability ``ctr[slot, ad]``; the target
    always serves [a0, a1]."""
    rng = np.random.default_rng(seed)
    finals, slates = [], []
    for i in range(n):
        picks = rng.permutation(N_ADS)[:K]
        items = [FeedbackItem(ad_id=f"a{a}", semantic_id=[int(a)], position=j, score=0.0,
                              bid=1.0, bid_type="cpc",
                              reward=float(rng.random() < ctr[j, a]),
                              propensity=1.0 / N_ADS)
                 for j, a in enumerate(picks)]
        finals.append(Feedback(request_id=f"r{i}", user_id=f"u{i % 50}", kind="final",
                               revision=0, impression_time=float(i), event_time=float(i),
                               elapsed_s=0.0, window_closed=True,
                               context={"device": ("mobile", "desktop")[i % 2]},
                               items=items))
        slates.append(["a0", "a1"])
    return finals, slates


def _ctr() -> np.ndarray:
    return np.array([[0.3 if a < 4 else 0.1 for a in range(N_ADS)],
                     [0.2 if a < 4 else 0.05 for a in range(N_ADS)]])


def test_slate_report_estimates_the_target_and_trusts_a_log_with_enough_matches() -> None:
    finals, slates = _log(6000, 1, _ctr())
    out = slate_report(finals, slates, _ads())
    truth = 0.3 + 0.2                                  # a0 at slot 0, a1 at slot 1
    assert list(out["slate_estimates"]) == list(SLATE_ESTIMATORS)
    assert out["estimate"]["estimator"] == DEFAULT_ESTIMATOR
    for name in ("ips", "snips", "dr", "sndr", "pi"):
        e = out["slate_estimates"][name]
        assert e["low"] <= truth <= e["high"], (name, e)
    d = out["diagnostics"]
    assert d["matched_item_share"] == pytest.approx(1 / N_ADS, abs=0.01)
    assert d["matched_impression_share"] == pytest.approx(1 - (1 - 1 / N_ADS) ** 2, abs=0.02)
    # matched items per slot ~ n / N_ADS, each of weight N_ADS: the ESS is about that count
    assert d["effective_sample_size"] == pytest.approx(6000 / N_ADS, rel=0.1)
    assert d["trusted"] and d["warnings"] == []


def test_slate_report_warns_when_the_target_rarely_matches_the_log() -> None:
    finals, slates = _log(120, 2, _ctr())
    out = slate_report(finals, slates, _ads())
    d = out["diagnostics"]
    assert d["matched_items"] < MIN_MATCHED_ITEMS
    assert not d["trusted"]
    assert any("logged items are what the snapshot serves" in w for w in d["warnings"])
    assert any("effective sample size" in w for w in d["warnings"])


def test_heavy_weights_are_flagged() -> None:
    warnings = trust_warnings(matched_items=500, ess=400.0, heaviest=0.2)
    assert len(warnings) == 1 and "too heavy" in warnings[0]
    assert trust_warnings(matched_items=500, ess=400.0, heaviest=0.01) == []


def test_slate_log_of_puts_each_item_at_its_slot_and_needs_propensities() -> None:
    finals, slates = _log(40, 3, _ctr())
    sl = slate_log_of(finals, slates, _ads())
    assert sl.reward.shape == (40, K) and sl.mask.all()
    for i, f in enumerate(finals):
        for it in f.items:
            assert sl.target[i, it.position] == float(slates[i][it.position] == it.ad_id)
            assert sl.reward[i, it.position] == it.reward
    finals[0].items[0].propensity = None
    with pytest.raises(ValueError, match="no logging propensity"):
        slate_log_of(finals, slates, _ads())
    with pytest.raises(ValueError, match="unknown estimator"):
        slate_report(finals[1:], slates[1:], _ads(), estimator="nope")


def test_the_default_estimator_is_the_ground_truth_benchmarks_winner() -> None:
    results = json.loads((Path(__file__).resolve().parents[2] / "bench" / "results"
                          / "ope.json").read_text())
    assert results["default_estimator"] == DEFAULT_ESTIMATOR
