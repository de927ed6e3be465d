"""Per (user, ad) impression counts: the counter, and the engine reading and writing it
(the value heads' exposure input; ``SlateItem.exposure`` on every impression)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from server.catalog import AdCatalog
from server.engine import Engine, RecRequest
from server.exposure import ExposureCounter
from server.models import ModelManager
from server.runtime import resolve_provider
from streams.schemas import Feedback, FeedbackItem, Impression, SlateItem
from tests.server.conftest import AD_IDS
from tests.support.snapshots import BuiltSnapshot, make_ads


def test_the_counter_counts_each_users_impressions_of_each_ad() -> None:
    c = ExposureCounter()
    assert c.counts("u1", ["a", "b"]).tolist() == [0.0, 0.0]
    c.record("u1", ["a", "b"])
    c.record("u1", ["a"])
    c.record("u2", ["b"])
    assert c.counts("u1", ["a", "b", "c"]).tolist() == [2.0, 1.0, 0.0]
    assert c.counts("u2", ["a", "b"]).tolist() == [0.0, 1.0]
    assert len(c) == 2


def test_the_least_recently_served_user_and_ad_are_forgotten_first() -> None:
    c = ExposureCounter(max_users=2, max_ads_per_user=2)
    c.record("u1", ["a"])
    c.record("u2", ["a"])
    c.record("u1", ["a"])           # u1 served again: u2 is now the oldest
    c.record("u3", ["a"])
    assert len(c) == 2
    assert c.counts("u2", ["a"]).tolist() == [0.0]      # forgotten
    assert c.counts("u1", ["a"]).tolist() == [2.0]
    c.record("u1", ["b"])
    c.record("u1", ["a"])           # a shown again: b is the oldest ad of u1
    c.record("u1", ["c"])
    assert c.counts("u1", ["a", "b", "c"]).tolist() == [3.0, 0.0, 1.0]


def test_a_copy_of_the_counter_keeps_the_counts_and_counts_on_its_own() -> None:
    import copy
    import pickle

    c = ExposureCounter()
    c.record("u1", ["a"])
    for dup in (copy.deepcopy(c), pickle.loads(pickle.dumps(c))):
        assert dup.counts("u1", ["a"]).tolist() == [1.0]
        dup.record("u1", ["a"])
        assert dup.counts("u1", ["a"]).tolist() == [2.0]
    assert c.counts("u1", ["a"]).tolist() == [1.0]


def test_the_counter_refuses_sizes_below_one() -> None:
    with pytest.raises(ValueError, match="max_users"):
        ExposureCounter(max_users=0)
    with pytest.raises(ValueError, match="max_ads_per_user"):
        ExposureCounter(max_ads_per_user=0)


def test_a_log_seeds_the_counts_with_its_shown_items() -> None:
    def fb(rid: str, user: str, t: float, ads: list[str]) -> Feedback:
        return Feedback(request_id=rid, user_id=user, kind="final", revision=0,
                        impression_time=t, event_time=t, elapsed_s=0.0, window_closed=True,
                        items=[FeedbackItem(ad_id=a, semantic_id=[], position=i, score=0.0,
                                            bid=1.0, bid_type="cpc")
                               for i, a in enumerate(ads)])

    c = ExposureCounter()
    c.record_feedback([fb("r2", "u1", 2.0, ["a"]), fb("r1", "u1", 1.0, ["a", "b"])])
    assert c.counts("u1", ["a", "b"]).tolist() == [2.0, 1.0]


def test_an_impression_refuses_a_negative_or_infinite_exposure() -> None:
    def imp(exposure: float) -> Impression:
        return Impression(request_id="r", event_time=1.0, user_id="u", model_version="v1",
                          slate=[SlateItem(ad_id="a", semantic_id=[1], position=0, score=0.0,
                                           bid=1.0, bid_type="cpc", exposure=exposure)])

    assert imp(3.0).slate[0].exposure == 3.0
    for bad in (-1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="exposure"):
            imp(bad)


def test_the_engine_writes_each_items_earlier_count_and_counts_what_it_served(
        tmp_path: Path, snapshots: Callable[..., BuiltSnapshot]) -> None:
    catalog = AdCatalog()
    catalog.apply((a.ad_id, a) for a in make_ads(AD_IDS))
    mgr = ModelManager(catalog, resolve_provider("cpu"), tmp_path / "cache", 3, 1)
    assert mgr.apply_update(snapshots("v1").model_update()) == "ok"
    counter = ExposureCounter()
    engine = Engine(mgr, catalog, exposure=counter, score_catalogue_max=len(AD_IDS))
    req = RecRequest("u1", {"device": "ios"}, [], 3)
    first = engine.run([req], lambda levels, k: [4] * levels)[0]
    shown = [a.ad_id for a in first.ads]
    assert shown and all(a.exposure == 0.0 for a in first.ads)
    assert counter.counts("u1", shown).tolist() == [1.0] * len(shown)
    again = engine.run([req, RecRequest("u2", {"device": "ios"}, [], 3)],
                       lambda levels, k: [4] * levels)
    seen = {a.ad_id: a.exposure for a in again[0].ads}
    assert all(seen[a] == 1.0 for a in shown if a in seen)      # u1 had seen them once
    assert all(a.exposure == 0.0 for a in again[1].ads)         # u2 had seen nothing
    # without a counter nothing is counted and every count is 0
    plain = Engine(mgr, catalog).run([req], lambda levels, k: [4] * levels)[0]
    assert all(a.exposure == 0.0 for a in plain.ads)
    # each of u1's second slate counted once more than it had been
    second = [a.ad_id for a in again[0].ads]
    assert np.array_equal(counter.counts("u1", second),
                          np.array([seen[a] + 1.0 for a in second], np.float32))
