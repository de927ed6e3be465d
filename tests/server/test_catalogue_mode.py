"""Whole-catalogue scoring: a servable catalogue within ``score_catalogue_max`` is scored
whole by the value heads (every servable ad a candidate, the slate the top by expected
value); a larger one is searched by beams (engine level, no HTTP)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import REGISTRY

from server.beam import expected_value
from server.catalog import AdCatalog
from server.engine import Engine, RecRequest
from server.models import ModelManager
from server.runtime import resolve_provider
from server.settings import ServerSettings
from tests.server.conftest import AD_IDS
from tests.support.snapshots import BuiltSnapshot, make_ads

K = 5
REQS = [RecRequest(f"u{i}", {"device": "ios"}, [AD_IDS[i]], K) for i in range(3)]
PAUSED = set(AD_IDS[:4])


def _widths(levels: int, k: int) -> list[int]:
    return [2] * levels


def _manager(tmp_path: Path, snapshots: Callable[..., BuiltSnapshot]
             ) -> tuple[ModelManager, AdCatalog]:
    catalog = AdCatalog()
    catalog.apply((a.ad_id, a) for a in make_ads(AD_IDS))
    catalog.apply((a.ad_id, a) for a in make_ads(sorted(PAUSED), status="paused"))
    mgr = ModelManager(catalog, resolve_provider("cpu"), tmp_path / "cache", 3, 1)
    assert mgr.apply_update(snapshots("v1").model_update()) == "ok"
    return mgr, catalog


def _mode_count(mode: str) -> float:
    return REGISTRY.get_sample_value("adloop_server_ranking_mode_total", {"mode": mode}) or 0.0


def test_a_catalogue_within_the_limit_is_scored_whole_and_ranked_by_expected_value(
        tmp_path: Path, snapshots: Callable[..., BuiltSnapshot]) -> None:
    mgr, catalog = _manager(tmp_path, snapshots)
    servable = [a for a in AD_IDS if a not in PAUSED]
    before = _mode_count("catalogue")
    results = Engine(mgr, catalog, log_beams=512, score_catalogue_max=len(servable)).run(
        REQS, _widths)
    assert _mode_count("catalogue") - before == len(REQS)
    state = mgr.state
    assert state is not None
    man, rt = state.model.manifest, state.model.runtime
    hist, hmask, ctx = Engine(mgr, catalog).inputs(state, REQS)
    states = rt.encode(hist, hmask, ctx)
    rows = [man.ad_ids.index(a) for a in servable]
    pctr, pcvr = rt.value(states, np.ascontiguousarray(
        np.broadcast_to(man.ids[rows], (len(REQS), len(rows), man.id_len))))
    bid, kind, _ = catalog.bids(servable)
    for b, res in enumerate(results):
        assert res.beam_widths == []                           # no beam search ran
        assert res.candidates == len(servable)                 # every servable ad
        assert sorted(res.candidate_ids) == sorted(servable)
        ev = expected_value(bid, kind, pctr[b].astype(np.float64), pcvr[b].astype(np.float64))
        best = [servable[i] for i in np.argsort(-ev, kind="stable")[:K]]
        assert [a.ad_id for a in res.ads] == best              # the top by expected value
        assert [a.expected_value for a in res.ads] == pytest.approx(sorted(ev)[::-1][:K])
        # shown and logged ads carry their trie-scored sequence log-probability
        assert all(np.isfinite(a.score) and a.score <= 1e-9 for a in res.ads)
        assert [c.ad_id for c in res.beams][:K] == best
        assert len(res.beams) == len(servable)
        assert {c.ad_id: c.logprob for c in res.beams}[best[0]] == res.ads[0].score
    # the scores of the ads shown are the beam search's for the same ids
    wide = Engine(mgr, catalog, log_beams=512).run(REQS, lambda n, k: [64] * n)
    for whole, beams in zip(results, wide, strict=True):
        by_id = {c.ad_id: c.logprob for c in beams.beams}
        for a in whole.ads:
            assert a.score == pytest.approx(by_id[a.ad_id], abs=1e-5)


def test_a_catalogue_above_the_limit_is_searched_by_beams(
        tmp_path: Path, snapshots: Callable[..., BuiltSnapshot]) -> None:
    mgr, catalog = _manager(tmp_path, snapshots)
    n_servable = len(AD_IDS) - len(PAUSED)
    before = _mode_count("beams")
    for limit in (0, n_servable - 1):
        results = Engine(mgr, catalog, score_catalogue_max=limit).run(REQS, _widths)
        for res in results:
            assert res.beam_widths == [2, 2, 2]
            assert 0 < res.candidates <= 2 < n_servable       # the final beams only
            assert len(res.ads) == min(K, res.candidates)
    assert _mode_count("beams") - before == 2 * len(REQS)


def test_retrieve_returns_the_beams_alone_in_either_mode_and_counts_nothing(
        tmp_path: Path, snapshots: Callable[..., BuiltSnapshot]) -> None:
    mgr, catalog = _manager(tmp_path, snapshots)
    n_servable = len(AD_IDS) - len(PAUSED)
    searched = Engine(mgr, catalog, log_beams=512).run(REQS, _widths)
    before = (_mode_count("beams"), _mode_count("catalogue"))
    for limit in (0, n_servable):     # beams either way, even where the catalogue is whole
        got = Engine(mgr, catalog, score_catalogue_max=limit).retrieve(REQS, _widths)
        for ads, res in zip(got, searched, strict=True):
            assert sorted(ads) == sorted(res.candidate_ids)      # the same final beams
            by_id = {c.ad_id: c.logprob for c in res.beams}
            assert [by_id[a] for a in ads] == sorted(by_id.values(), reverse=True)
    assert (_mode_count("beams"), _mode_count("catalogue")) == before


def test_score_catalogue_max_setting_is_bounded() -> None:
    assert ServerSettings().score_catalogue_max == 500
    assert ServerSettings(score_catalogue_max=0).score_catalogue_max == 0
    with pytest.raises(ValueError):
        ServerSettings(score_catalogue_max=-1)
