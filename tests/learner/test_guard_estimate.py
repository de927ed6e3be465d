"""The promotion guard on an off-policy estimate (``--guard-estimate snips``): a
candidate worse on a log with propensities is refused, an unchanged one passes, and
held-out lists without propensities fall back to holdout_value, counted."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import msgspec
import numpy as np
import pytest
import structlog
import torch
from structlog.testing import capture_logs

from learner import synthetic
from learner.guard import FALLBACK, GuardEstimate
from learner.model import GenerativeRecommender
from learner.online import LearnerSettings
from learner.pretrain import PretrainResult
from learner.publish import Publisher, SnapshotRefusedError, SnapshotStore
from learner.rspo_step import OnlineLearner
from streams.schemas import Ad, Feedback, FeedbackItem
from streams.settings import add_settings_arguments, settings_from_args

SLATE = 3


def _catalogue(log: synthetic.SyntheticLog) -> dict[str, Ad]:
    """Two ads of every category, all CPC at bid 1 (so serving ranks by pCTR alone)."""
    picked: dict[int, list[Ad]] = {}
    for ad in log.ads:
        c = log.ad_category[ad.ad_id]
        if len(picked.setdefault(c, [])) < 2:
            picked[c].append(msgspec.structs.replace(ad, bid_type="cpc", bid=1.0))
    return {ad.ad_id: ad for ads in picked.values() for ad in ads}


def _uniform_log(log: synthetic.SyntheticLog, ads: dict[str, Ad], n: int,
                 propensities: bool = True, seed: int = 5) -> list[Feedback]:
    """Final lists in the users' contexts whose slates a uniform-random logging policy
    drew from ``ads`` (propensity 1/len(ads) at every position); a click pays 1 and is
    likely only on an ad of the user's interests."""
    rng = np.random.default_rng(seed)
    ids = sorted(ads)
    out = []
    for fb in log.feedback[-n:]:
        items = []
        for pos, i in enumerate(rng.choice(len(ids), size=SLATE, replace=False)):
            ad_id = ids[int(i)]
            liked = log.ad_category[ad_id] in log.user_interests[fb.user_id]
            clicked = bool(rng.random() < (0.7 if liked else 0.05))
            items.append(FeedbackItem(
                ad_id=ad_id, semantic_id=[], position=pos, score=0.0, bid=1.0,
                bid_type="cpc", clicked=clicked, reward=float(clicked),
                propensity=1.0 / len(ids) if propensities else None))
        out.append(msgspec.structs.replace(fb, items=items))
    return out


def _scrambled(model: GenerativeRecommender) -> GenerativeRecommender:
    """The same model whose value head ranks upside down (negated output layer)."""
    bad = copy.deepcopy(model)
    out = bad.value.out
    with torch.no_grad():
        out.weight.neg_()
        out.bias.neg_()
    return bad


def test_snips_guard_refuses_a_candidate_worse_on_the_logs_and_passes_an_unchanged_one(
        trained_lazy: PretrainResult, synth_log: synthetic.SyntheticLog,
        tmp_path: Path) -> None:
    ads = _catalogue(synth_log)
    held_out = _uniform_log(synth_log, ads, 240)
    model, tok = trained_lazy.model, trained_lazy.tokenizer
    learner = OnlineLearner(copy.deepcopy(model))
    rnd = GuardEstimate("snips", beam_width=16).round(learner, held_out, tok, ads)
    assert rnd is not None and rnd.name == "snips"
    baseline = rnd.value(model)
    bad = _scrambled(model)
    assert rnd.value(bad) < 0.8 * baseline       # the logs say the scrambled ranker is worse
    dr = GuardEstimate("dr", beam_width=16).round(learner, held_out, tok, ads)
    assert dr is not None and dr.value(bad) < 0.8 * dr.value(model)
    # the default estimate does not look at the served slate: it cannot see the difference
    plain = GuardEstimate().round(learner, held_out, tok, ads)
    assert plain is not None and plain.value(bad) == pytest.approx(plain.value(model))

    pub = Publisher(SnapshotStore(str(tmp_path / "store")), tmp_path / "staging",
                    max_regression=0.05)
    with pytest.raises(SnapshotRefusedError) as refused:
        pub.publish(bad, tok, "v000002", "v000001", 0.0, holdout=rnd.value,
                    references={"baseline": baseline}, estimate=rnd.name)
    assert refused.value.reason == "regression" and "holdout snips" in str(refused.value)

    ok = pub.publish(model, tok, "v000003", "v000001", 0.0, holdout=rnd.value,
                     references={"baseline": baseline}, estimate=rnd.name)
    assert ok.manifest["metrics"]["holdout_snips"] == pytest.approx(baseline)
    assert ok.manifest["metrics"]["baseline_holdout_snips"] == pytest.approx(baseline)
    assert "holdout_value" not in ok.manifest["metrics"]


def test_without_propensities_the_guard_falls_back_to_holdout_value_counted_and_warned_once(
        trained_lazy: PretrainResult, synth_log: synthetic.SyntheticLog) -> None:
    ads = _catalogue(synth_log)
    held_out = _uniform_log(synth_log, ads, 40, propensities=False)
    learner = OnlineLearner(copy.deepcopy(trained_lazy.model))
    guard = GuardEstimate("snips")
    before = FALLBACK.labels("no_propensities")._value.get()
    try:
        with capture_logs() as logs:
            rounds = [guard.round(learner, held_out, trained_lazy.tokenizer, ads)
                      for _ in range(2)]
    finally:
        structlog.reset_defaults()
    assert FALLBACK.labels("no_propensities")._value.get() == before + 2
    assert [e["reason"] for e in logs if e["event"] == "guard.fallback"] == ["no_propensities"]
    for rnd in rounds:
        assert rnd is not None and rnd.name == "holdout_value"
        value = rnd.value(trained_lazy.model)
        assert math.isfinite(value)
        assert value == pytest.approx(learner.holdout_value(trained_lazy.model, rnd.batch))


def test_guard_estimate_is_a_learner_setting_defaulting_to_holdout_value(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse

    parser = argparse.ArgumentParser()
    add_settings_arguments(parser, LearnerSettings)
    assert settings_from_args(LearnerSettings, parser.parse_args([])).guard_estimate \
        == "holdout_value"
    assert settings_from_args(LearnerSettings, parser.parse_args(
        ["--guard-estimate", "snips"])).guard_estimate == "snips"
    monkeypatch.setenv("ADLOOP_LEARN_GUARD_ESTIMATE", "dr")
    assert settings_from_args(LearnerSettings, parser.parse_args([])).guard_estimate == "dr"
    with pytest.raises(ValueError):
        settings_from_args(LearnerSettings, parser.parse_args(["--guard-estimate", "ndcg"]))
