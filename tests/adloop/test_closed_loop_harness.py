"""The closed-loop harness: every policy on the same traffic, seeds in worker processes."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from adloop.evaluation import (
    EvalConfig,
    compare,
    headline_table,
    logging_phase,
    make_policy,
    run_policy,
    run_seed,
    world_config,
)
from learner.beyond import BEYOND_KEYS
from streams.schemas import Feedback
from traffic.driver import ServedSlate
from traffic.world import Request, World

FAST = ("bid_only", "random", "popularity", "observable_oracle", "oracle")


def _small(**kw: object) -> EvalConfig:
    base: dict[str, object] = dict(seeds=(0, 1), requests=192, log_requests=300, n_users=60,
                                   n_ads=40, update_every=32, buckets=4, pretrain_steps=20,
                                   encoder="hashing", beam_width=32, policies=FAST)
    base.update(kw)
    return EvalConfig(**base)  # type: ignore[arg-type]


def test_seeds_in_worker_processes_give_the_same_results_as_one_process(
        tmp_path: Path) -> None:
    one = compare(_small(), tmp_path / "one")
    two = compare(_small(), tmp_path / "two", jobs=2)
    for name in FAST:
        assert one["policies"][name]["per_seed_rpm_last_quarter"] == \
            two["policies"][name]["per_seed_rpm_last_quarter"]
    # a random slate covers more of the catalogue, and more diversely, than one slate
    # for everyone; it shows less of what the logs' clicks made popular
    rnd, pop = one["policies"]["random"], one["policies"]["popularity"]
    assert rnd["catalogue_coverage"]["mean"] > pop["catalogue_coverage"]["mean"]
    assert rnd["novelty_bits"]["mean"] > pop["novelty_bits"]["mean"]
    assert 0.0 < pop["slate_diversity"]["mean"] <= rnd["slate_diversity"]["mean"] <= 1.0
    # every policy carries the beyond-accuracy metrics, per seed into the summary
    for name in FAST:
        e = one["policies"][name]
        for key in BEYOND_KEYS:
            assert 0.0 <= e[key]["mean"] <= (math.inf if key == "novelty_bits" else 1.0), key
            assert len(e[key]["ci95"]) == 2
    # one popular slate for everyone: users share most of it; random slates share little
    # and show more ads the user had not been shown (64 level-0 codes for 40 ads: nearly
    # every pair of ads is in two clusters, whatever the policy)
    assert rnd["personalization"]["mean"] > pop["personalization"]["mean"]
    assert rnd["personalization"]["mean"] > 0.8
    assert rnd["sid_diversity"]["mean"] > 0.9
    assert rnd["novelty_unseen"]["mean"] > pop["novelty_unseen"]["mean"]
    table, ratios = headline_table(one).split("\n\n")
    assert "| SID diversity | novelty (unseen) | novelty (bits) | personalization |" in table
    assert all(row.count("|") == table.splitlines()[0].count("|")
               for row in table.splitlines())
    # then every ratio that ran: its paired interval and minimum detectable effect
    assert ratios.splitlines()[0].startswith("| ratio | last quarter (95% CI) | MDE |")
    assert "| observable_oracle / oracle |" in ratios
    assert one["mde_observable_oracle_over_oracle"] > 0.0
    # the oracle knows the hidden state, the observable one only what the models see
    assert one["observable_oracle_over_oracle"] is not None
    assert 0.0 < one["observable_oracle_over_oracle"] <= 1.0


def test_generative_policies_are_served_from_exported_snapshots_and_learn(
        tmp_path: Path) -> None:
    cfg = _small(seeds=(0,), requests=320, update_every=32, policies=("frozen", "rspo"))
    res = compare(cfg, tmp_path)
    for name in ("frozen", "rspo"):
        e = res["policies"][name]
        assert len(e["rpm_curve"]) == cfg.buckets
        assert math.isfinite(e["rpm_last_quarter"]["mean"]) and e["rpm_all"]["mean"] > 0
        assert 0.0 < e["mean_coverage"]["mean"] <= 1.0
        assert 0.0 <= e["observable_oracle_reach"]["mean"] <= 1.0
        assert set(BEYOND_KEYS) <= set(e)
        assert 0.0 <= e["sid_diversity"]["mean"] <= 1.0
        # the value model's held-out log-loss, as the other learned policies report it
        assert 0.0 < e["value_logloss_ctr"]["mean"] < 1.0 and "value_logloss_cvr" in e
    # the server's exploration slot serves the learning policy only (EvalConfig.explore)
    assert res["policies"]["rspo"]["explored_share"]["mean"] > 0.0
    assert res["policies"]["frozen"]["explored_share"]["mean"] == 0.0
    assert res["rspo_over_frozen"] is not None
    # rspo published after each of its 10 updates (of 32 lists) and served each
    # snapshot: the pretrained version and ten more
    assert res["policies"]["rspo"]["model_versions"]["mean"] == 1 + 320 // 32
    assert res["policies"]["frozen"]["model_versions"]["mean"] == 1


def test_mixed_feeds_report_organic_engagement_against_the_organic_oracle(
        tmp_path: Path) -> None:
    cfg = _small(seeds=(0,), requests=192, organic_slots=3,
                 policies=("frozen", "random", "oracle", "bid_only"))
    res = compare(cfg, tmp_path)
    pol = res["policies"]
    # the oracle serves the organic oracle's items: its ratio is exactly 1
    assert pol["oracle"]["organic_oracle_ratio_last_quarter"]["mean"] == 1.0
    for name in ("frozen", "random"):
        e = pol[name]
        assert 0.0 < e["organic_oracle_ratio_last_quarter"]["mean"] < 1.0
        assert 0.0 < e["organic_engagement_last_quarter"]["mean"] < 2.0
        assert 0.0 < e["organic_view_rate"]["mean"] <= 1.0
        assert 0.0 <= e["organic_like_rate"]["mean"] <= e["organic_view_rate"]["mean"]
        assert e["organic_dwell_s_per_item"]["mean"] > 0.0
    assert pol["oracle"]["organic_engagement_last_quarter"]["mean"] > \
        pol["random"]["organic_engagement_last_quarter"]["mean"]
    # a policy that places no organic items reports none
    assert "organic_view_rate" not in pol["bid_only"]
    # the ads are served as without organic slots
    ads_only = compare(_small(seeds=(0,), requests=192, policies=("oracle",)),
                       tmp_path / "ads-only")
    assert ads_only["policies"]["oracle"]["per_seed_rpm_last_quarter"] == \
        pol["oracle"]["per_seed_rpm_last_quarter"]


def test_aggregate_names_the_best_baseline_and_compares_rspo_with_it() -> None:
    """best_baseline is the learned yardstick with the highest last-quarter RPM; rspo's
    ratios to it and to frozen_explore come with paired intervals and their low ends,
    and a policy's held-out value-model errors reach its summary."""
    from adloop.evaluation import PolicyRun, aggregate

    rpm = {"rspo": (300.0, 330.0), "frozen_explore": (250.0, 240.0), "logistic": (280.0, 300.0),
           "dlrm": (200.0, 190.0), "vw_cb": (150.0, 170.0)}
    runs = []
    for name, per_seed in rpm.items():
        for seed, r in enumerate(per_seed):
            run = PolicyRun(name, seed, impressions=[1000] * 4, revenue=[r] * 4,
                            expected=[r] * 4, oracle_expected=[1000.0] * 4,
                            observable_expected=[900.0] * 4, clicks=[10] * 4,
                            conversions=[1] * 4)
            if name == "dlrm":
                run.serving = {"value_logloss_ctr": 0.14, "value_logloss_cvr": 0.35}
            runs.append(run)
    out = aggregate(runs, EvalConfig(seeds=(0, 1)))
    assert out["best_baseline"] == "logistic"
    assert math.isclose(out["rspo_over_best_baseline"], 315.0 / 290.0)
    lo, hi = out["rspo_over_best_baseline_ci95"]
    assert lo < 315.0 / 290.0 < hi and out["rspo_over_best_baseline_ci_low"] == lo
    assert math.isclose(out["rspo_over_frozen_explore"], 315.0 / 245.0)
    assert out["rspo_over_frozen_explore_ci_low"] == out["rspo_over_frozen_explore_ci95"][0]
    assert out["mde_rspo_over_best_baseline"] is not None
    assert out["policies"]["dlrm"]["value_logloss_ctr"]["mean"] == 0.14
    no_baselines = aggregate([r for r in runs if r.policy in ("rspo", "frozen_explore")],
                             EvalConfig(seeds=(0, 1)))
    assert no_baselines["best_baseline"] is None
    assert no_baselines["rspo_over_best_baseline"] is None


class _OneChanged:
    """bid_only's slates, except request number ``at`` of the run gets ``other``'s."""

    def __init__(self, base: Any, other: Any, at: int) -> None:
        self.name, self.base, self.other, self.at, self.served = "changed", base, other, at, 0

    def recommend_batch(self, requests: Sequence[Request]) -> list[ServedSlate]:
        out = self.base.recommend_batch(requests)
        for i, r in enumerate(requests):
            if self.served + i == self.at:
                out[i] = self.other.recommend_batch([r])[0]
        self.served += len(requests)
        return out

    def learn(self, lists: Sequence[Feedback]) -> dict[str, float]:
        return self.base.learn(lists)


def test_policies_share_the_requests_and_the_response_randomness(tmp_path: Path) -> None:
    # common random numbers: the same policy twice gives the same run to the last
    # click; a policy that differs on one request matches it up to that request
    cfg = _small(seeds=(3,), requests=192, buckets=6)
    runs = []
    for variant in ("same", "same", "changed", "random"):
        world = World(world_config(cfg, 3))
        logs = logging_phase(world, cfg, 3)
        policy: Any = make_policy("bid_only", world, 3, cfg, None, logs)
        if variant == "changed":
            policy = _OneChanged(policy, make_policy("random", world, 3, cfg, None, logs), 100)
        elif variant == "random":
            policy = make_policy("random", world, 3, cfg, None, logs)
        runs.append(run_policy(world, policy, cfg, 3, world.now))
    same, again, changed, rnd = runs
    assert dataclasses.asdict(same) == dataclasses.asdict(again) | {"latency_s":
                                                                    same.latency_s}
    # buckets of 32 requests: request 100 is in the fourth; the first three are identical
    for key in ("expected", "revenue", "clicks", "oracle_expected", "observable_expected"):
        assert getattr(changed, key)[:3] == getattr(same, key)[:3], key
    assert changed.expected[3] != same.expected[3]
    assert rnd.expected[0] != pytest.approx(same.expected[0])
    # run_seed starts every policy from a copy of the world after the logging phase:
    # the same state as replaying it
    (seeded,) = run_seed(dataclasses.replace(cfg, policies=("bid_only",)), 3, tmp_path)
    for key in ("expected", "revenue", "clicks", "conversions", "oracle_expected"):
        assert getattr(seeded, key) == getattr(same, key), key
