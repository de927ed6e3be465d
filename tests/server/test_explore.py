"""Exploration in the server: the last slot of some slates goes to a low-exposure ad, and
every served item carries the policy's propensity (engine level, no HTTP)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import REGISTRY

from server.catalog import AdCatalog
from server.engine import Engine, RecRequest, RecResult
from server.explore import Explorer
from server.models import ModelManager
from server.runtime import resolve_provider
from tests.server.conftest import AD_IDS, Builder
from tests.support.snapshots import make_ads

K = 5
REQS = [RecRequest(f"u{i}", {"device": "ios"}, [AD_IDS[i % len(AD_IDS)]], K) for i in range(4)]


def _widths(levels: int, k: int) -> list[int]:
    return [8] * levels


def _setup(tmp_path: Path, snapshots: Builder) -> tuple[ModelManager, AdCatalog]:
    catalog = AdCatalog()
    catalog.apply((a.ad_id, a) for a in make_ads(AD_IDS))
    mgr = ModelManager(catalog, resolve_provider("cpu"), tmp_path / "cache", 3, 1)
    assert mgr.apply_update(snapshots("v1").model_update()) == "ok"
    return mgr, catalog


def _serve(engine: Engine, req: RecRequest) -> RecResult:
    (res,) = engine.run([req], _widths)
    return res


def _metric(name: str, labels: dict[str, str] | None = None) -> float:
    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


def test_explore_one_puts_a_low_exposure_ad_not_in_the_slate_last_with_propensity_one_over_eligible(
        tmp_path: Path, snapshots: Builder) -> None:
    mgr, catalog = _setup(tmp_path, snapshots)
    ranked_engine = Engine(mgr, catalog)
    explorer = Explorer(1.0, 50, catalog, seed=7)
    engine = Engine(mgr, catalog, explorer)
    shown: Counter[str] = Counter()
    explored_before = _metric("adloop_server_explored_total")
    drawn = []
    for i in range(12):
        req = REQS[i % len(REQS)]
        ranked = [a.ad_id for a in _serve(ranked_engine, req).ads]
        res = _serve(engine, req)
        ads = [a.ad_id for a in res.ads]
        assert len(ranked) == len(ads) == K
        assert ads[:-1] == ranked[:-1]                      # ranked slots untouched
        last = res.ads[-1]
        assert last.explored and last.ad_id not in ranked and last.position == K - 1
        eligible = [a for a in AD_IDS if a not in ranked and shown[a] < 50]
        assert last.ad_id in eligible
        assert last.propensity == pytest.approx(1.0 / len(eligible))
        assert [a.propensity for a in res.ads[:-1]] == [1.0] * (K - 1)
        assert np.isfinite(last.score) and last.score < 0 and 0 <= last.pctr <= 1
        assert last.semantic_id == mgr.state.model.manifest.ids[   # type: ignore[union-attr]
            mgr.state.model.row_of[last.ad_id]].tolist()          # type: ignore[union-attr]
        shown.update(ads)
        drawn.append(last.ad_id)
    assert explorer.shown == dict(shown)                    # every served ad counted once
    assert len(set(drawn)) > 1                              # drawn, not a fixed pick
    assert _metric("adloop_server_explored_total") - explored_before == 12
    assert _metric("adloop_server_explore_ratio") == 1.0
    # the same seed draws the same ads
    again = Engine(mgr, catalog, Explorer(1.0, 50, catalog, seed=7))
    assert [_serve(again, REQS[i % len(REQS)]).ads[-1].ad_id for i in range(12)] == drawn


def test_explore_zero_leaves_slates_unchanged_and_every_propensity_is_one(
        tmp_path: Path, snapshots: Builder) -> None:
    mgr, catalog = _setup(tmp_path, snapshots)
    plain = Engine(mgr, catalog)
    off = Engine(mgr, catalog, Explorer(0.0, 50, catalog, seed=1))
    for req in REQS:
        a, b = _serve(plain, req), _serve(off, req)
        assert [(x.ad_id, x.position, x.score) for x in a.ads] == \
            [(x.ad_id, x.position, x.score) for x in b.ads]
        assert [x.propensity for x in b.ads] == [1.0] * K
        assert [x.propensity for x in a.ads] == [1.0] * K    # no explorer: deterministic too
        assert not any(x.explored for x in b.ads)


def test_an_ad_shown_explore_max_shown_times_is_no_longer_drawn(
        tmp_path: Path, snapshots: Builder) -> None:
    mgr, catalog = _setup(tmp_path, snapshots)
    max_shown = 2
    explorer = Explorer(1.0, max_shown, catalog, seed=3)
    engine = Engine(mgr, catalog, explorer)
    ranked = [a.ad_id for a in _serve(Engine(mgr, catalog), REQS[0]).ads]
    shown: Counter[str] = Counter()
    for _ in range(len(AD_IDS) * max_shown + 5):
        res = _serve(engine, REQS[0])
        last = res.ads[-1]
        eligible = [a for a in AD_IDS if a not in ranked and shown[a] < max_shown]
        if eligible:
            assert last.explored and last.ad_id in eligible
            assert shown[last.ad_id] < max_shown
            assert last.propensity == pytest.approx(1.0 / len(eligible))
        else:                       # pool exhausted: the slate is the ranked one
            assert [a.ad_id for a in res.ads] == ranked
            assert [a.propensity for a in res.ads] == [1.0] * K and not last.explored
        shown.update(a.ad_id for a in res.ads)
    assert all(shown[a] == max_shown for a in AD_IDS if a not in ranked)


def test_with_a_partial_rate_the_ranked_last_slot_has_propensity_one_minus_explore(
        tmp_path: Path, snapshots: Builder) -> None:
    mgr, catalog = _setup(tmp_path, snapshots)
    rate, n = 0.3, 300
    engine = Engine(mgr, catalog, Explorer(rate, 10_000, catalog, seed=11))
    ranked = [a.ad_id for a in _serve(Engine(mgr, catalog), REQS[0]).ads]
    explored = 0
    for _ in range(n):
        res = _serve(engine, REQS[0])
        last = res.ads[-1]
        if last.explored:
            explored += 1
            assert last.propensity == pytest.approx(rate / (len(AD_IDS) - K))
        else:
            assert last.ad_id == ranked[-1] and last.propensity == pytest.approx(1 - rate)
    sd = (n * rate * (1 - rate)) ** 0.5
    assert abs(explored - n * rate) < 4 * sd


def test_a_batch_counts_each_request_before_the_next_and_costs_are_reported(
        tmp_path: Path, snapshots: Builder) -> None:
    mgr, catalog = _setup(tmp_path, snapshots)
    explorer = Explorer(1.0, 1, catalog, seed=5)
    engine = Engine(mgr, catalog, explorer)
    ranked_before = _metric("adloop_server_explore_expected_value_total", {"slot": "ranked"})
    results = engine.run(REQS, _widths)
    drawn = [r.ads[-1].ad_id for r in results if r.ads[-1].explored]
    assert len(drawn) == len(set(drawn)) == len(REQS)      # max_shown=1: never drawn twice
    ranked_value = sum(r.ads[-1].expected_value for r in
                       Engine(mgr, catalog).run(REQS, _widths))
    assert _metric("adloop_server_explore_expected_value_total", {"slot": "ranked"}) \
        - ranked_before == pytest.approx(ranked_value)


def test_explore_settings_are_validated() -> None:
    catalog = AdCatalog()
    with pytest.raises(ValueError, match="explore rate"):
        Explorer(1.5, 50, catalog)
    with pytest.raises(ValueError, match="explore_max_shown"):
        Explorer(0.1, 0, catalog)
