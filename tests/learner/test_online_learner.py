"""The learner's pure RSPO step and its promotion guard (no Kafka)."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import torch

from learner import synthetic
from learner.export import verify_snapshot
from learner.online import load_optimizer_state
from learner.pretrain import PretrainResult
from learner.publish import Publisher, SnapshotRefusedError, SnapshotStore
from learner.rspo import RSPOConfig
from learner.rspo_step import OnlineLearner, lists_to_batch, provisional_weight
from streams.schemas import Feedback, FeedbackItem


def _lists(log: synthetic.SyntheticLog, n: int) -> list[tuple[Feedback, float]]:
    with_value = [fb for fb in log.feedback if any(it.reward > 0 for it in fb.items)]
    return [(fb, 1.0) for fb in with_value[:n]]


def test_rspo_updates_rank_higher_value_items_higher(trained_lazy: PretrainResult,
                                                     synth_log: synthetic.SyntheticLog) -> None:
    torch.manual_seed(0)
    model = copy.deepcopy(trained_lazy.model)
    learner = OnlineLearner(model, RSPOConfig(beta=1.0, vsl_alpha=0.0, reward="realized"), lr=3e-3,
                            value_weight=0.0)
    batch = lists_to_batch(_lists(synth_log, 64), trained_lazy.tokenizer, model)
    before = learner.holdout_ndcg(model, batch)
    metrics = {}
    for _ in range(25):
        metrics = learner.update(batch)
    after = learner.holdout_ndcg(model, batch)
    assert after > before + 0.02, (before, after)
    assert metrics["kl_ref"] > 0      # moved away from the reference policy
    assert metrics["lists_with_preference"] > 0
    learner.refresh_reference()       # π_ref ← π_θ: the implicit rewards restart at 0
    for p, q in zip(learner.ref.parameters(), model.parameters(), strict=True):
        assert torch.equal(p, q)


def test_update_reports_every_loss_term_and_hepo_option(trained_lazy: PretrainResult,
                                                        synth_log: synthetic.SyntheticLog) -> None:
    model = copy.deepcopy(trained_lazy.model)
    learner = OnlineLearner(model, RSPOConfig(hepo_weight=0.5))
    m = learner.update(lists_to_batch(_lists(synth_log, 16), trained_lazy.tokenizer, model))
    for key in ("loss", "rspo", "vsl", "value", "hepo", "kl_ref", "mean_reward"):
        assert key in m and m[key] == m[key], key   # present and not NaN
    # no logged beams in these lists: HEPO credits the shown items' sibling groups (its
    # value is ~0 at ratio 1, its advantages summing to zero; the count is what says so)
    assert m["hepo_tokens"] > 0


def test_provisional_lists_with_pending_cpa_items_weigh_less() -> None:
    item = FeedbackItem(ad_id="a", semantic_id=[0], position=0, score=0.0, bid=10.0,
                        bid_type="cpa", clicked=True)
    early = Feedback(request_id="r", user_id="u", kind="provisional", revision=0,
                     impression_time=0.0, event_time=60.0, elapsed_s=60.0,
                     window_closed=False, items=[item])
    late = Feedback(request_id="r", user_id="u", kind="provisional", revision=0,
                    impression_time=0.0, event_time=7200.0, elapsed_s=7200.0,
                    window_closed=False, items=[item])
    cpc = Feedback(request_id="r", user_id="u", kind="provisional", revision=0,
                   impression_time=0.0, event_time=60.0, elapsed_s=60.0, window_closed=False,
                   items=[FeedbackItem(ad_id="a", semantic_id=[0], position=0, score=0.0,
                                       bid=1.0, bid_type="cpc", clicked=True, reward=1.0)])
    assert 0 < provisional_weight(early) < provisional_weight(late) < 1
    assert provisional_weight(cpc) == 1.0


def test_promotion_guard_refuses_nan_and_regression_and_stores_nothing(
        trained_lazy: PretrainResult, tmp_path: Path) -> None:
    store = SnapshotStore(str(tmp_path / "store"))
    pub = Publisher(store, tmp_path / "staging", max_regression=0.05)
    poisoned = copy.deepcopy(trained_lazy.model)
    with torch.no_grad():
        next(poisoned.parameters()).view(-1)[0] = float("nan")
    with pytest.raises(SnapshotRefusedError) as nan:
        pub.publish(poisoned, trained_lazy.tokenizer, "v000002", "v000001", 0.0)
    assert nan.value.reason == "nan"
    with pytest.raises(SnapshotRefusedError) as reg:
        pub.publish(trained_lazy.model, trained_lazy.tokenizer, "v000003", "v000001", 0.0,
                    holdout=lambda _m: 0.50, references={"serving": 0.80})
    assert reg.value.reason == "regression" and "0.50000" in str(reg.value)
    assert store.versions() == []

    ok = pub.publish(trained_lazy.model, trained_lazy.tokenizer, "v000004", "v000001", 12.5,
                     holdout=lambda _m: 0.79, references={"serving": 0.80, "baseline": 0.7})
    assert store.versions() == ["v000004"]
    manifest = verify_snapshot(tmp_path / "store" / "v000004", parity=True)
    assert manifest["metrics"]["holdout_value"] == 0.79
    assert manifest["metrics"]["baseline_holdout_value"] == 0.7
    assert manifest["data_watermark"] == 12.5
    event = pub.update_event(ok, 12.5)
    assert event.uri.startswith("file://") and event.version == "v000004"
    import hashlib

    raw = (tmp_path / "store" / "v000004" / "manifest.json").read_bytes()
    assert event.sha256 == hashlib.sha256(raw).hexdigest()


def test_guard_compares_with_the_best_reference_so_small_steps_cannot_ratchet_down(
        trained_lazy: PretrainResult, tmp_path: Path) -> None:
    """Each step is within 5 % of the last version, yet the decline is refused once it is
    more than 5 % below the best reference (the pretrained baseline or the best so far)."""
    pub = Publisher(SnapshotStore(str(tmp_path / "store")), tmp_path / "staging",
                    max_regression=0.05)
    values = [1.00, 0.97, 0.94]
    last = None
    outcomes = []
    for i, v in enumerate(values):
        refs = {"baseline": 1.00, **({"serving": last} if last is not None else {})}
        try:
            pub.publish(trained_lazy.model, trained_lazy.tokenizer, f"v{i:06d}", None, 0.0,
                        holdout=lambda _m, v=v: v, references=refs)
            outcomes.append("published")
            last = v
        except SnapshotRefusedError as exc:
            outcomes.append(exc.reason)
    assert outcomes == ["published", "published", "regression"]
    assert 0.94 >= 0.97 * 0.95     # the old rule (last version only) would have let it pass


def test_holdout_value_tracks_revenue_not_rank_agreement(
        trained_lazy: PretrainResult, synth_log: synthetic.SyntheticLog) -> None:
    """A model trained to prefer the lowest-value shown items scores a lower value estimate
    on the same lists than the model it started from."""
    torch.manual_seed(0)
    model = copy.deepcopy(trained_lazy.model)
    learner = OnlineLearner(model, RSPOConfig(beta=1.0, vsl_alpha=0.0, reward="realized"),
                            lr=3e-3, value_weight=0.0)
    batch = lists_to_batch(_lists(synth_log, 64), trained_lazy.tokenizer, model)
    before = learner.holdout_value(model, batch)
    inverted = dataclasses.replace(batch, rewards=-batch.rewards)
    for _ in range(25):
        learner.update(inverted)
    after = learner.holdout_value(model, batch)
    assert after < before * 0.95, (before, after)


def test_dense_rewards_rank_by_expected_value_and_anchor_only_clicks(
        trained_lazy: PretrainResult, synth_log: synthetic.SyntheticLog) -> None:
    model = copy.deepcopy(trained_lazy.model)
    learner = OnlineLearner(model, RSPOConfig(realized_weight=0.25))
    b = lists_to_batch(_lists(synth_log, 8), trained_lazy.tokenizer, model)
    zeros = torch.zeros_like(b.rewards)
    pctr = torch.full_like(b.rewards, 2.0)                      # logits
    pcvr = torch.full_like(b.rewards, -1.0)
    dense = learner.dense_rewards(dataclasses.replace(b, rewards=zeros), pctr, pcvr)
    p, q = torch.sigmoid(pctr), torch.sigmoid(pcvr)
    expect = torch.where(b.bid_type == 0, b.bids * p,
                         torch.where(b.bid_type == 1, b.bids * p * q, b.bids / 1000.0))
    assert torch.allclose(dense, 0.75 * expect * b.item_mask, atol=1e-6)
    realized = learner.dense_rewards(b, pctr, pcvr)
    assert torch.allclose(realized, (0.75 * expect + 0.25 * b.rewards) * b.item_mask,
                          atol=1e-6)


def test_an_optimizer_state_of_another_layout_is_dropped_and_a_matching_one_loads(
        tmp_path: Path) -> None:
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    old = torch.optim.AdamW([{"params": [a]}, {"params": [b]}], lr=1e-2)
    (a.sum() + b.sum()).backward()
    old.step()
    same = torch.optim.AdamW([{"params": [a]}, {"params": [b]}], lr=1e-2)
    assert load_optimizer_state(same, old.state_dict(), tmp_path / "state.pt")
    assert torch.equal(same.state[a]["exp_avg"], old.state[a]["exp_avg"])
    fewer = torch.optim.AdamW([a], lr=1e-2)
    assert not load_optimizer_state(fewer, old.state_dict(), tmp_path / "state.pt")
    assert not fewer.state        # afresh: no moments, and it still steps
    a.grad = torch.ones(3)
    fewer.step()
