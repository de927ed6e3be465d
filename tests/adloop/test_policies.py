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
    metrics = policy.learn(lists)
    assert metrics["hepo_beams_per_list"] > max(len(fb.items) for fb in lists)
    assert metrics["hepo_tokens"] > 0 and metrics["hepo"] == metrics["hepo"]
    # the value model's held-out log-loss (pretraining's split) and on what it served
    held = policy.heldout_metrics()
    assert 0 < held["value_logloss_ctr"] < 1 and "value_logloss_cvr" in held
    assert held["value_logloss_ctr"] == pretrained[2]["value_logloss_ctr"]
    assert 0 < held["value_logloss_ctr_online"] < 2
    policy.server.close()
