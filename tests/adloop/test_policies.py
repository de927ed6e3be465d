"""The generative policy's serving rules: beams that reach the catalogue, calibration,
the final beams in the feedback it learns from."""

from __future__ import annotations

from pathlib import Path

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


def test_the_in_process_generative_policy_hands_the_learner_its_final_beams(
        tmp_path: Path) -> None:
    """The harness's feedback carries the final beams the server's engine ranked each
    slate from (as ``adloop serve`` logs them), and HEPO trains on them."""
    from adloop.evaluation import (
        EvalConfig,
        feedback_of,
        logging_phase,
        make_policy,
        pretrain_on,
        world_config,
    )
    from adloop.policies import GenerativePolicy
    from server.engine import RecRequest
    from traffic.world import World

    cfg = EvalConfig(seeds=(0,), log_requests=300, n_users=60, n_ads=40, pretrain_steps=20,
                     encoder="hashing", beam_width=32, policies=("rspo",), hepo_weight=0.5,
                     threads=1)
    world = World(world_config(cfg, 0))
    logs = logging_phase(world, cfg, 0)
    pretrained = pretrain_on(logs, world, cfg, 0, tmp_path / "pretrain")
    policy = make_policy("rspo", world, 0, cfg, pretrained, logs, tmp_path / "serve")
    assert isinstance(policy, GenerativePolicy) and policy.learner is not None
    assert policy.learner.cfg.hepo_weight == 0.5
    reqs = world.step_requests(16)
    world.advance_to(reqs[-1].event_time)
    slates = policy.recommend_batch(reqs)
    lists = [feedback_of(r, s, world.respond(r, s.ad_ids()), world)
             for r, s in zip(reqs, slates, strict=True)]
    for fb, slate in zip(lists, slates, strict=True):
        assert len(fb.items) < len(fb.beams) <= 32 and fb.beams == slate.beams
        ev = [b.expected_value for b in fb.beams]
        assert ev == sorted(ev, reverse=True)
        by_id = {b.ad_id: b for b in fb.beams}
        for ad in slate.ads:
            beam = by_id.get(ad.ad_id)
            if beam is not None:                    # ranked (an explored ad is not a beam)
                assert (beam.logprob, beam.semantic_id) == (ad.score, ad.semantic_id)
        assert sum(ad.ad_id in by_id for ad in slate.ads) >= len(slate.ads) - 1
    # a small catalogue is scored whole (the server's default score_catalogue_max)
    assert policy.coverage[-16:] == [1.0] * 16
    # every 8th request the beams also run alone: how much of the value model's top 10
    # they retrieve, and their best 10 by log-probability kept for the clicks to come
    sampled = [reqs[7], reqs[15]]
    assert len(policy.value_recall) == 2 and sorted(policy._retrieved) == sorted(
        r.request_id for r in sampled)
    widths = policy.widths()
    again = policy.server.retrieve(
        [RecRequest(r.user_id, dict(r.context), list(reversed(r.recent_ad_ids)), r.k,
                    list(r.recent_organic)) for r in sampled], lambda levels, k: widths)
    for r, recall, ads in zip(sampled, policy.value_recall, again, strict=True):
        top = [b.ad_id for b in slates[reqs.index(r)].beams[:10]]
        assert len(top) == 10 and recall == len(set(top) & set(ads)) / 10
        assert policy._retrieved[r.request_id] == ads[:10]
    clicks = sum(1 for r in sampled for it in lists[reqs.index(r)].items
                 if it.clicked or it.converted)
    metrics = policy.learn(lists)
    assert policy._retrieved == {} and policy.generator_positives == clicks
    assert 0 <= policy.generator_hits <= clicks
    recalls = policy.calibration()
    assert 0.0 <= recalls["value_recall_at_10"] <= 1.0
    assert metrics["hepo_beams_per_list"] > max(len(fb.items) for fb in lists)
    assert metrics["hepo_tokens"] > 0 and metrics["hepo"] == metrics["hepo"]
    # the value model's held-out log-loss (pretraining's split) and on what it served
    held = policy.heldout_metrics()
    assert 0 < held["value_logloss_ctr"] < 1 and "value_logloss_cvr" in held
    assert held["value_logloss_ctr"] == pretrained[2]["value_logloss_ctr"]
    assert 0 < held["value_logloss_ctr_online"] < 2
    policy.server.close()


# -- the non-generative yardsticks ------------------------------------------------------


def _small_world(seed: int, log_requests: int = 1200, n_users: int = 100, n_ads: int = 40):
    from adloop.evaluation import EvalConfig, logging_phase, world_config
    from traffic.world import World

    cfg = EvalConfig(seeds=(seed,), log_requests=log_requests, n_users=n_users, n_ads=n_ads,
                     encoder="hashing", threads=1)
    world = World(world_config(cfg, seed))
    return cfg, world, logging_phase(world, cfg, seed)


def _planted_lists(world, good: str, n: int, good_reward: float, seed: int = 0):
    """``n`` feedback lists of the world's next requests: ``good`` first and four other
    servable ads; ``good`` is clicked (and earns ``good_reward``) half the time, the
    others never."""
    import numpy as np

    from adloop.evaluation import feedback_of
    from traffic.driver import ServedAd, ServedSlate
    from traffic.world import ItemOutcome, Response

    rng = np.random.default_rng(seed)
    others = sorted(a.ad_id for a in world.servable_ads() if a.ad_id != good)
    lists = []
    for req in world.step_requests(n):
        ids = [good, *rng.choice(others, size=4, replace=False).tolist()]
        hit = bool(rng.random() < 0.5)
        items = [ItemOutcome(a, i, 0.0, 0.0, 0.0, clicked=(a == good and hit),
                             reward=good_reward if a == good and hit else 0.0)
                 for i, a in enumerate(ids)]
        slate = ServedSlate(req.request_id, "planted", [ServedAd(a, i) for i, a in enumerate(ids)])
        lists.append(feedback_of(req, slate, Response(req.request_id, req.event_time, items,
                                                      [], [], [], []), world))
    return lists


def test_logistic_and_dlrm_beat_a_constant_predictor_on_held_out_logs() -> None:
    """Fitted on the first 80 % of the logged phase (by time), both value models predict
    the last 20 % better than the training base rate does (pCTR log-loss)."""
    import numpy as np

    from adloop.baselines import LogisticPolicy, constant_log_loss, time_split
    from adloop.policies import DLRMPolicy

    _, world, logs = _small_world(1000)
    train, valid = time_split(logs)
    shown = [it for fb in train for it in fb.items]
    rate = sum(it.clicked or it.converted for it in shown) / len(shown)
    y = np.array([float(it.clicked or it.converted) for fb in valid for it in fb.items])
    constant = constant_log_loss(y, rate)
    logistic = LogisticPolicy(world, seed=0, l2_grid=(1.0,))
    metrics = logistic.pretrain(logs)
    assert metrics["value_logloss_ctr"] < metrics["value_logloss_ctr_constant"]
    assert abs(metrics["value_logloss_ctr_constant"] - constant) < 1e-9
    dlrm = DLRMPolicy(world, seed=0)
    fit = dlrm.pretrain(logs, max_epochs=8, lr_grid=(3e-3,))
    assert 1 <= fit["epochs"] <= 8
    assert dlrm.heldout_metrics()["value_logloss_ctr"] < constant
    assert set(dlrm.heldout_metrics()) == {"value_logloss_ctr", "value_logloss_cvr"}


def test_logistic_ranks_a_clearly_better_ad_first() -> None:
    """The highest-bid cpc ad, clicked on half its impressions (the others never), tops
    every slate (without those clicks its expected value is bid × ~3 % CTR)."""
    from adloop.baselines import LogisticPolicy

    _, world, logs = _small_world(1001, log_requests=300)
    cpc = sorted((a for a in world.servable_ads() if a.record.bid_type == "cpc"),
                 key=lambda a: a.record.bid)
    good = cpc[-1].ad_id
    policy = LogisticPolicy(world, seed=0, l2_grid=(1.0,))
    policy.pretrain(logs)
    policy.learn(_planted_lists(world, good, 300, good_reward=cpc[-1].record.bid))
    reqs = world.step_requests(20)
    assert all(s.ads[0].ad_id == good for s in policy.recommend_batch(reqs))


def test_vw_slate_propensities_are_the_slot_by_slot_epsilon_greedy_probabilities() -> None:
    """Each slot: the best remaining ad with 1 - ε + ε/n, any other with ε/n; no ad twice;
    the greedy pick of slot 0 lands at its propensity's rate."""
    import numpy as np

    from adloop.baselines import VWPolicy

    _, world, _ = _small_world(1002, log_requests=50)
    policy = VWPolicy(world, seed=0, epsilon=0.3)
    ids = [f"ad-{i:03d}" for i in range(10)]
    costs = np.arange(10, dtype=float)                      # ad-000 is the best
    greedy_first = 0
    for _ in range(2000):
        slots = policy.fill_slate(costs, ids, 5)
        chosen = [i for i, _ in slots]
        assert len(set(chosen)) == 5
        for j, (i, p) in enumerate(slots):
            n = 10 - j
            best_left = min(c for c in range(10) if c not in chosen[:j])
            want = 0.3 / n + (0.7 if i == best_left else 0.0)
            assert abs(p - want) < 1e-12 and 0.0 < p <= 1.0
        greedy_first += chosen[0] == 0
    assert abs(greedy_first / 2000 - (0.7 + 0.03)) < 0.04


def test_vw_learns_to_prefer_a_rewarding_ad() -> None:
    """After lists where one ad earns on half its impressions and the rest never do, the
    contextual bandit's greedy slate starts with it."""
    from adloop.baselines import VWPolicy

    _, world, logs = _small_world(1003, log_requests=300)
    good = sorted(a.ad_id for a in world.servable_ads())[3]
    policy = VWPolicy(world, seed=0, epsilon=0.0)
    policy.pretrain(logs)
    policy.learn(_planted_lists(world, good, 300, good_reward=2.0))
    slates = policy.recommend_batch(world.step_requests(20))
    assert all(s.ads[0].ad_id == good for s in slates)


def test_frozen_explore_serves_frozens_slate_except_an_exploration_slot(
        tmp_path: Path) -> None:
    """frozen_explore is the frozen model with the learning policies' exploration: its
    slates equal frozen's except the last slot of about ``explore`` of the requests."""
    from adloop.evaluation import EvalConfig, logging_phase, make_policy, pretrain_on, world_config
    from adloop.policies import GenerativePolicy
    from traffic.world import World

    cfg = EvalConfig(seeds=(0,), log_requests=300, n_users=60, n_ads=40, pretrain_steps=20,
                     encoder="hashing", beam_width=32, explore=0.3, threads=1)
    world = World(world_config(cfg, 0))
    logs = logging_phase(world, cfg, 0)
    pretrained = pretrain_on(logs, world, cfg, 0, tmp_path / "pretrain")
    slates = {}
    for name in ("frozen", "frozen_explore"):
        w = World(world_config(cfg, 0))
        w_logs = logging_phase(w, cfg, 0)
        policy = make_policy(name, w, 0, cfg, pretrained, w_logs, tmp_path / name)
        assert isinstance(policy, GenerativePolicy) and policy.learner is None
        reqs = w.step_requests(100)
        w.advance_to(reqs[-1].event_time)
        slates[name] = [s.ad_ids() for s in policy.recommend_batch(reqs)]
        if name == "frozen_explore":
            assert policy.explored == sum(a != b for a, b in zip(
                slates["frozen"], slates["frozen_explore"], strict=True))
        policy.server.close()
    explored = 0
    for plain, explore in zip(slates["frozen"], slates["frozen_explore"], strict=True):
        assert explore[:-1] == plain[:-1]
        explored += explore[-1] != plain[-1]
    assert 15 <= explored <= 45                     # Binomial(100, 0.3): mean 30, sd 4.6


def test_the_logistic_exact_topic_match_counts_the_ads_own_topic_and_its_industry() -> None:
    from types import SimpleNamespace

    from adloop.baselines import topic_match_shares

    ad = SimpleNamespace(record=SimpleNamespace(
        industry="retail", description="Retail · Running shoes: light trail runners"))
    topics = ["retail/running-shoes", "retail/handbags", "travel/hotels",
              "retail/running-shoes"]
    own, industry = topic_match_shares(ad, topics)   # type: ignore[arg-type]
    assert (own, industry) == (2 / 6, 3 / 6)
    assert topic_match_shares(ad, []) == (0.0, 0.0)  # type: ignore[arg-type]
