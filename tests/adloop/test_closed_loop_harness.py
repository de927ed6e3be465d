"""The closed-loop harness: every policy on the same traffic, seeds in worker processes."""

from __future__ import annotations

import math
from pathlib import Path

from adloop.evaluation import EvalConfig, compare, headline_table
from learner.beyond import BEYOND_KEYS

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
    table = headline_table(one)
    assert "| SID diversity | novelty (unseen) | novelty (bits) | personalization |" in table
    assert all(row.count("|") == table.splitlines()[0].count("|")
               for row in table.splitlines())
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
    # rspo published (10 updates of 32 lists) and served its own snapshot
    assert res["policies"]["rspo"]["model_versions"]["mean"] == 2
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
