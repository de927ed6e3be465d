"""The demo report's beyond-accuracy figures, from the impressions a driver served and
the frozen shadow's slates (no broker, no processes: the report's own computation)."""

from __future__ import annotations

from pathlib import Path

import pytest

from adloop.demo import Demo, DemoSettings, beyond_summary
from adloop.evaluation import EvalConfig, logging_phase, sid_tokenizer
from traffic.driver import ServedAd, ServedSlate, TrafficDriver
from traffic.world import World, WorldConfig


def _served(tmp_path: Path) -> tuple[Demo, TrafficDriver, dict[str, dict[str, str]]]:
    world = World(WorldConfig(seed=0, n_users=6, n_ads=12, slate_size=2))
    demo = Demo(DemoSettings(out=tmp_path, bootstrap_servers="127.0.0.1:1"))
    demo.logs = logging_phase(world, EvalConfig(log_requests=20), 0)
    demo.pretrained = (None, sid_tokenizer(world, EvalConfig(encoder="hashing"), 0))
    driver = TrafficDriver(world)
    driver.keep_responses = True
    entries: dict[str, dict[str, str]] = {}
    ads = sorted(a.ad_id for a in world.servable_ads())
    for req in world.step_requests(8, k=2):
        world.advance_to(req.event_time)
        entries[req.request_id] = {"user_id": req.user_id}
        driver.serve(req, ServedSlate(req.request_id, "v1", [
            ServedAd(a, i) for i, a in enumerate(ads[:2])]))
        demo.shadow_slates[req.request_id] = ads[2:4]
    return demo, driver, entries


def test_report_has_the_beyond_accuracy_metrics_of_served_and_shadow_slates(
        tmp_path: Path) -> None:
    demo, driver, entries = _served(tmp_path)
    out = demo.beyond(driver, entries)
    n_ads = len(driver.world.ads)
    shown = [r for r in driver.responses if r.items]
    users = [entries[r.request_id]["user_id"] for r in driver.responses]
    for prefix in ("", "frozen_"):
        assert {f"{prefix}{k}" for k in ("catalogue_coverage", "slate_diversity",
                                          "sid_diversity", "novelty_unseen", "novelty_bits",
                                          "personalization")} <= set(out)
    # the shadow answered every request with the same two ads: 2 of the catalogue, and
    # two different users never differ
    assert out["frozen_catalogue_coverage"] == round(2 / n_ads, 4)
    assert out["frozen_personalization"] == 0.0
    assert out["catalogue_coverage"] == round(
        len({o.ad_id for r in shown for o in r.items}) / n_ads, 4)
    # the history starts with the logging phase: a user's first request shows it new
    # only what the logs did not show them
    prior: dict[str, set[str]] = {}
    for fb in demo.logs:
        prior.setdefault(fb.user_id, set()).update(it.ad_id for it in fb.items)
    new = total = 0
    for u, ids in zip(users, (demo.shadow_slates[r.request_id] for r in driver.responses),
                      strict=True):
        h = prior.setdefault(u, set())
        new += sum(a not in h for a in ids)
        total += len(ids)
        h.update(ids)
    assert out["frozen_novelty_unseen"] == round(new / total, 4)


def test_undefined_figures_are_none_and_keys_carry_the_prefix() -> None:
    world = World(WorldConfig(seed=0, n_users=4, n_ads=6))
    a, b = sorted(world.ads)[:2]
    out = beyond_summary(["u1", "u1"], [[a], [b]], world, prefix_key="frozen_")
    assert out["frozen_catalogue_coverage"] == pytest.approx(round(2 / len(world.ads), 4))
    assert out["frozen_novelty_unseen"] == 1.0
    assert out["frozen_personalization"] is None      # one user: no pair to compare
    assert "frozen_sid_diversity" not in out         # no semantic ids given
