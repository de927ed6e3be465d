"""The final beams a slate was ranked from travel with each result (``RecResult.beams``)
into the impression log: servable candidates, best expected value first, capped by
``log_beams`` (engine level, no HTTP)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from server.catalog import AdCatalog
from server.engine import Engine, RecRequest
from server.models import ModelManager
from server.runtime import resolve_provider
from server.settings import ServerSettings
from tests.server.conftest import AD_IDS
from tests.support.snapshots import BuiltSnapshot, make_ads

K = 5
REQS = [RecRequest(f"u{i}", {"device": "ios"}, [AD_IDS[i]], K) for i in range(3)]


def _widths(levels: int, k: int) -> list[int]:
    return [8] * levels


def _manager(tmp_path: Path, snapshots: Callable[..., BuiltSnapshot]
             ) -> tuple[ModelManager, AdCatalog]:
    catalog = AdCatalog()
    catalog.apply((a.ad_id, a) for a in make_ads(AD_IDS))
    mgr = ModelManager(catalog, resolve_provider("cpu"), tmp_path / "cache", 3, 1)
    assert mgr.apply_update(snapshots("v1").model_update()) == "ok"
    return mgr, catalog


def test_results_carry_the_final_beams_in_ranking_order_with_their_scores(
        tmp_path: Path, snapshots: Callable[..., BuiltSnapshot]) -> None:
    mgr, catalog = _manager(tmp_path, snapshots)
    everything = Engine(mgr, catalog, log_beams=512).run(REQS, _widths)
    capped = Engine(mgr, catalog, log_beams=6).run(REQS, _widths)
    for full, res in zip(everything, capped, strict=True):
        assert len(full.beams) == full.candidates > 6      # every servable final beam
        assert {b.ad_id for b in full.beams} == set(full.candidate_ids)
        ev = [b.expected_value for b in full.beams]
        assert ev == sorted(ev, reverse=True)               # best expected value first
        assert len({b.ad_id for b in full.beams}) == len(full.beams)
        assert res.beams == full.beams[:6]                  # the cap keeps the best
        # without exploration the slate is the top of the beams, with the same numbers
        shown = full.beams[:K]
        assert [a.ad_id for a in res.ads] == [b.ad_id for b in shown]
        for a, b in zip(res.ads, shown, strict=True):
            assert a.semantic_id == b.semantic_id and a.score == b.logprob
            assert a.expected_value == b.expected_value and a.bid == b.bid
            assert a.bid_type == b.bid_type
            assert b.logprob <= 1e-9
    off = Engine(mgr, catalog, log_beams=0).run(REQS, _widths)
    assert all(r.beams == [] for r in off)
    assert [a.ad_id for a in off[0].ads] == [a.ad_id for a in capped[0].ads]


def test_log_beams_setting_is_bounded() -> None:
    assert ServerSettings(log_beams=0).log_beams == 0
    assert ServerSettings().log_beams == 32
    with pytest.raises(ValueError):
        ServerSettings(log_beams=-1)
    with pytest.raises(ValueError):
        ServerSettings(log_beams=513)
