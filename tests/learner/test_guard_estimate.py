"""The promotion guard on an off-policy estimate (``--guard-estimate snips``, the
default): a snapshot worse on a log with propensities is refused, an unchanged one is
published, and held-out lists without propensities, or too few of them for a model
compared, fall back to holdout_value, counted."""

from __future__ import annotations

import copy
import math
import time
from collections import deque
from pathlib import Path

import msgspec
import numpy as np
import pytest
import structlog
import torch
from structlog.testing import capture_logs

from learner import synthetic
from learner.export import verify_snapshot
from learner.guard import FALLBACK, MIN_MATCHED_ITEMS, GuardEstimate
from learner.model import GenerativeRecommender
from learner.online import REFUSED_IN_A_ROW, LearnerService, LearnerSettings
from learner.pretrain import PretrainResult
from learner.publish import REFUSED, Publisher, SnapshotStore
from learner.rspo_step import OnlineLearner
from learner.tokenizer import UASIDTokenizer
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
    """The same model whose value head ranks upside down (every learned logit term
    negated: the decoder's output layer, the interaction, the per-item biases and the
    wide tables the linear fit left)."""
    bad = copy.deepcopy(model)
    head = bad.value
    with torch.no_grad():
        for p in (head.out.weight, head.out.bias, *head.linear_tables().values(), *(
                (head.fm_user.weight, head.fm_user.bias) if head.factors else ())):
            p.neg_()
    return bad


def _service(tmp_path: Path, candidate: GenerativeRecommender, baseline: GenerativeRecommender,
             tok: UASIDTokenizer, ads: dict[str, Ad], held_out: list[Feedback],
             estimate: str, min_lists: int = 1) -> LearnerService:
    """The learner's publish path without Kafka: the service state ``publish`` reads, a
    serving version (the candidate's parent, π_ref) and no checkpoint or announcement."""
    svc = LearnerService.__new__(LearnerService)
    svc.s = LearnerSettings(state_dir=tmp_path / "state", guard_estimate=estimate,
                            guard_beam_width=16, guard_min_lists=min_lists)
    svc.publisher = Publisher(SnapshotStore(str(tmp_path / "store")), tmp_path / "staging",
                              max_regression=0.05)
    svc.model, svc.tok, svc.learner = candidate, tok, OnlineLearner(candidate)
    svc.baseline, svc.best = OnlineLearner.frozen_copy(baseline), None
    svc.guard = GuardEstimate(svc.s.guard_estimate, svc.s.guard_beam_width)
    svc.holdout = deque((fb, 1.0) for fb in held_out)
    svc.ads, svc.ads_generation, svc._trie = ads, 1, None
    svc.next_version, svc.last_published, svc.watermark = 2, "v000001", 0.0
    svc.pending_update, svc.updates_since_publish, svc.last_publish = None, 0, 0.0
    svc.finish_publish = lambda: None  # type: ignore[method-assign]
    svc._init_abtest()
    return svc


def test_off_policy_estimates_see_a_scrambled_ranker_that_holdout_value_cannot(
        trained_lazy: PretrainResult, synth_log: synthetic.SyntheticLog) -> None:
    ads = _catalogue(synth_log)
    held_out = _uniform_log(synth_log, ads, 240)
    model, tok = trained_lazy.model, trained_lazy.tokenizer
    learner = OnlineLearner(copy.deepcopy(model))
    bad = _scrambled(model)
    for estimate in ("snips", "dr"):
        rnd = GuardEstimate(estimate, beam_width=16).round(learner, held_out, tok, ads)
        assert rnd is not None and rnd.name == estimate
        assert rnd.value(bad) < 0.8 * rnd.value(model), estimate
    # holdout_value scores the logged items, not the served slate: it sees no difference
    plain = GuardEstimate("holdout_value").round(learner, held_out, tok, ads)
    assert plain is not None and plain.value(bad) == pytest.approx(plain.value(model))


def test_snips_guard_refuses_a_snapshot_worse_on_the_logs_and_publishes_an_unchanged_one(
        trained_lazy: PretrainResult, synth_log: synthetic.SyntheticLog,
        tmp_path: Path) -> None:
    ads = _catalogue(synth_log)
    held_out = _uniform_log(synth_log, ads, 240)
    model, tok = trained_lazy.model, trained_lazy.tokenizer
    refused = REFUSED.labels("regression")._value.get()

    worse = _service(tmp_path / "worse", _scrambled(model), model, tok, ads, held_out, "snips")
    assert worse.publish() is False
    assert REFUSED.labels("regression")._value.get() == refused + 1
    assert worse.publisher.store.versions() == [] and worse.next_version == 3

    same = _service(tmp_path / "same", copy.deepcopy(model), model, tok, ads, held_out,
                    "snips")
    assert same.publish() is True
    metrics = verify_snapshot(tmp_path / "same" / "store" / "v000002")["metrics"]
    assert metrics["holdout_snips"] == pytest.approx(metrics["baseline_holdout_snips"])
    assert metrics["serving_holdout_snips"] == pytest.approx(metrics["holdout_snips"])
    assert metrics["holdout_snips"] > 0 and "holdout_value" not in metrics

    # holdout_value (the fallback) lets the scrambled ranker through
    plain = _service(tmp_path / "plain", _scrambled(model), model, tok, ads, held_out,
                     "holdout_value")
    assert plain.publish() is True
    assert "holdout_value" in verify_snapshot(tmp_path / "plain" / "store" / "v000002")[
        "metrics"]


def test_a_refused_candidate_says_which_version_keeps_serving_and_training_restarts_from_the_best(
        trained_lazy: PretrainResult, synth_log: synthetic.SyntheticLog,
        tmp_path: Path) -> None:
    ads = _catalogue(synth_log)
    held_out = _uniform_log(synth_log, ads, 240)
    model, tok = trained_lazy.model, trained_lazy.tokenizer
    svc = _service(tmp_path, _scrambled(model), model, tok, ads, held_out, "snips")
    svc.best, svc.best_version = OnlineLearner.frozen_copy(model), "v000001"
    svc.serving_since = time.time() - 60.0
    try:
        with capture_logs() as logs:
            assert svc.publish() is False
            assert svc.publish() is True
    finally:
        structlog.reset_defaults()
    kept = [e for e in logs if e["event"] == "learner.version_kept"]
    assert kept[0]["serving"] == "v000001" and kept[0]["refused"] == "v000002"
    assert kept[0]["reason"] == "regression" and kept[0]["refused_in_a_row"] == 1
    assert kept[0]["trains_from"] == "v000001 (best published)"
    assert kept[0]["serving_for_s"] >= 60.0
    # the model trains on from the best version: its weights are v000001's again, so
    # the next candidate (no training in between) is as good as the best and promoted
    for name, p in svc.model.state_dict().items():
        assert torch.equal(p, model.state_dict()[name]), name
    assert len(kept) == 1 and svc.last_published == "v000003"
    assert REFUSED_IN_A_ROW._value.get() == 0


def test_the_guard_does_not_refuse_on_fewer_held_out_lists_with_reward_than_its_minimum(
        trained_lazy: PretrainResult, synth_log: synthetic.SyntheticLog,
        tmp_path: Path) -> None:
    ads = _catalogue(synth_log)
    held_out = _uniform_log(synth_log, ads, 240)
    valued = sum(1 for fb in held_out if any(it.reward > 0 for it in fb.items))
    model, tok = trained_lazy.model, trained_lazy.tokenizer
    few = _service(tmp_path / "few", _scrambled(model), model, tok, ads, held_out, "snips",
                   min_lists=valued + 1)
    assert few.publish() is True          # too little evidence: recorded, not enforced
    metrics = verify_snapshot(tmp_path / "few" / "store" / "v000002")["metrics"]
    assert "holdout_snips" in metrics and "baseline_holdout_snips" not in metrics
    enough = _service(tmp_path / "enough", _scrambled(model), model, tok, ads, held_out,
                      "snips", min_lists=valued)
    assert enough.publish() is False


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


def test_a_model_the_log_does_not_support_sends_the_whole_round_to_holdout_value(
        trained_lazy: PretrainResult, synth_log: synthetic.SyntheticLog) -> None:
    ads = _catalogue(synth_log)
    model = trained_lazy.model
    learner = OnlineLearner(copy.deepcopy(model))
    guard = GuardEstimate("snips", beam_width=16)
    supported = guard.round(learner, _uniform_log(synth_log, ads, 240), trained_lazy.tokenizer,
                            ads)
    assert supported is not None
    assert guard.settle(supported, [model, None, _scrambled(model)]) == "snips"
    _, sup = supported.off_policy_support(model)
    assert sup.matched_items >= MIN_MATCHED_ITEMS and sup.enough
    before = FALLBACK.labels("unsupported")._value.get()
    try:
        with capture_logs() as logs:
            few = guard.round(learner, _uniform_log(synth_log, ads, 40),
                              trained_lazy.tokenizer, ads)
            assert few is not None and few.name == "snips"
            assert guard.settle(few, [model, _scrambled(model)]) == "holdout_value"
    finally:
        structlog.reset_defaults()
    assert FALLBACK.labels("unsupported")._value.get() == before + 1
    warned = [e for e in logs if e["event"] == "guard.fallback"]
    assert warned[0]["reason"] == "unsupported"
    assert warned[0]["matched_items"] < MIN_MATCHED_ITEMS
    assert few.value(model) == pytest.approx(learner.holdout_value(model, few.batch))


def test_guard_estimate_is_a_learner_setting_defaulting_to_snips(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse

    parser = argparse.ArgumentParser()
    add_settings_arguments(parser, LearnerSettings)
    assert settings_from_args(LearnerSettings, parser.parse_args([])).guard_estimate \
        == "snips"
    assert settings_from_args(LearnerSettings, parser.parse_args(
        ["--guard-estimate", "holdout_value"])).guard_estimate == "holdout_value"
    monkeypatch.setenv("ADLOOP_LEARN_GUARD_ESTIMATE", "dr")
    assert settings_from_args(LearnerSettings, parser.parse_args([])).guard_estimate == "dr"
    with pytest.raises(ValueError):
        settings_from_args(LearnerSettings, parser.parse_args(["--guard-estimate", "ndcg"]))
