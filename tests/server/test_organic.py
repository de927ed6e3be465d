"""The mixed feed: organic items (videos, articles) ranked by the serving model beside the
ads, from the snapshot's ``organic_ids`` (a learner export whose tokenizer placed
organic items in the ads' id space), at the engine level and over real HTTP."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import pytest
from prometheus_client import REGISTRY

from server.beam import beam_search, sequence_logprob
from server.catalog import AdCatalog, OrganicCatalog
from server.controller import BeamController
from server.engine import Engine, RecRequest, RecResult
from server.models import ModelManager, ServingState
from server.runtime import resolve_provider
from streams.kafka_io import EventProducer, read_all
from streams.schemas import Event, Impression, OrganicItem
from streams.settings import KafkaSettings
from tests.server.conftest import AD_IDS, Builder, metric_value, publish_ads, ready, wait_for
from tests.support.snapshots import ServerThread, make_ads

TOPICS = ("gaming/consoles", "travel/beaches", "food/baking")
ORGANIC_IDS = [f"{t}#{n}" for t in TOPICS for n in range(8)]
WIDTHS = lambda levels, k: [16] * levels  # noqa: E731


@pytest.fixture(scope="module")
def organic_snapshot(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A learner export (untrained model) whose tokenizer was fitted on the test ads and
    24 organic items: its manifest has an ``organic_ids`` table."""
    torch = pytest.importorskip("torch")
    from learner.export import export_snapshot
    from learner.model import GenerativeRecommender
    from learner.tokenizer import OrganicItem, UASIDTokenizer
    from tests.learner.conftest import SMALL_TOKENIZER, small_cfg

    organic = [OrganicItem(i, f"{i.split('#')[0]} story number {i.split('#')[1]}")
               for i in ORGANIC_IDS]
    tok = UASIDTokenizer.fit(make_ads(AD_IDS), SMALL_TOKENIZER, organic=organic)
    torch.manual_seed(0)
    model = GenerativeRecommender(small_cfg(tok)).eval()
    out = tmp_path_factory.mktemp("organic-store") / "v1"
    manifest = export_snapshot(model, tok, out, "v1")
    assert sorted(manifest["organic_ids"]) == sorted(ORGANIC_IDS)
    return out


def _serving(tmp_path: Path, directory: Path, organic_beam: int = 16
             ) -> tuple[ModelManager, Engine, ServingState]:
    catalog = AdCatalog()
    catalog.apply((a.ad_id, a) for a in make_ads(AD_IDS))
    mgr = ModelManager(catalog, resolve_provider("cpu"), tmp_path / "cache", 2, 1,
                       warmup_widths=[16])
    assert mgr.load_directory(directory) == "ok", mgr.describe()
    assert mgr.state is not None
    return mgr, Engine(mgr, catalog, organic_beam=organic_beam), mgr.state


def _items(item_ids: list[str], status: str = "active") -> list[OrganicItem]:
    """``organic-items`` records of ``item_ids``."""
    return [OrganicItem(item_id=i, kind="video", topic=i.split("#")[0], title=f"story {i}",
                        status=status, created_time=0.0, event_time=1.0)  # type: ignore[arg-type]
            for i in item_ids]


def _following(tmp_path: Path, directory: Path, organic: OrganicCatalog
               ) -> tuple[ModelManager, Engine]:
    """A manager that follows an organic catalogue, as the server's does."""
    catalog = AdCatalog()
    catalog.apply((a.ad_id, a) for a in make_ads(AD_IDS))
    mgr = ModelManager(catalog, resolve_provider("cpu"), tmp_path / "cache", 3, 1,
                       warmup_widths=[16], organic=organic)
    assert mgr.load_directory(directory) == "ok", mgr.describe()
    return mgr, Engine(mgr, catalog, organic_beam=32)


def _req(user: str, organic_k: int = 0, recent_organic: list[str] | None = None,
         k: int = 5) -> RecRequest:
    return RecRequest(user, {"device": "ios", "placement": "feed"},
                      AD_IDS[int(user[-1]):int(user[-1]) + 3], k,
                      recent_organic or [], organic_k)


def _ads(res: RecResult) -> list[tuple[str, float, float]]:
    return [(a.ad_id, a.score, a.expected_value) for a in res.ads]


def _sample(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


def test_organic_items_are_the_models_best_by_log_probability(
        tmp_path: Path, organic_snapshot: Path) -> None:
    """With a beam as wide as the organic table the search is exhaustive, so the answer is
    exactly the top organic_k of every organic item's sequence log-probability, recent
    ones left out."""
    _mgr, engine, state = _serving(tmp_path, organic_snapshot, organic_beam=32)
    man, rt = state.model.manifest, state.model.runtime
    table = {i: [int(x) for x in row]
             for i, row in zip(man.organic_ids, man.organic_table, strict=True)}
    served_before = _sample("adloop_server_organic_served_total")
    searches_before = _sample("adloop_server_organic_search_seconds_count")
    (first,) = engine.run([_req("u1", organic_k=6)], WIDTHS)
    recent = ["food/baking#99", first.organic[0].item_id, first.organic[2].item_id]
    (res,) = engine.run([_req("u1", organic_k=6, recent_organic=recent)], WIDTHS)

    history, hmask, context = engine.inputs(state, [_req("u1", recent_organic=recent)])
    states = rt.encode(history, hmask, context)
    assert state.model.organic_trie is not None
    exact = sequence_logprob(lambda r, p: rt.step(states, r, p), state.model.organic_trie,
                             np.zeros(len(table), np.int64), man.organic_table)
    best = [man.organic_ids[i] for i in np.argsort(-exact, kind="stable")
            if man.organic_ids[i] not in recent][:6]

    assert [o.item_id for o in res.organic] == best
    assert [o.position for o in res.organic] == list(range(6))
    scores = [o.score for o in res.organic]
    assert scores == sorted(scores, reverse=True)
    for o in res.organic:
        assert o.semantic_id == table[o.item_id]
        assert o.score == pytest.approx(float(exact[man.organic_ids.index(o.item_id)]),
                                        abs=1e-5)
    assert not {o.item_id for o in res.organic} & set(recent)
    assert first.organic[1].item_id == res.organic[0].item_id   # the rest moved up
    assert _sample("adloop_server_organic_served_total") - served_before == 12
    assert _sample("adloop_server_organic_search_seconds_count") - searches_before == 2


def test_ads_are_the_same_with_and_without_organic_items_in_a_shared_batch(
        tmp_path: Path, organic_snapshot: Path) -> None:
    _mgr, engine, _state = _serving(tmp_path, organic_snapshot)
    plain = engine.run([_req("u1"), _req("u2"), _req("u3")], WIDTHS)
    mixed = engine.run([_req("u1", organic_k=4), _req("u2"), _req("u3", organic_k=9)], WIDTHS)
    assert [_ads(r) for r in plain] == [_ads(r) for r in mixed]
    assert [[b.ad_id for b in r.beams] for r in plain] == \
        [[b.ad_id for b in r.beams] for r in mixed]
    assert all(r.organic == [] for r in plain)
    assert [len(r.organic) for r in mixed] == [4, 0, 9]
    # each request searches with its own width: its organic items do not depend on the
    # batch it shares (only float noise of the batched graphs may differ)
    (alone,) = engine.run([_req("u3", organic_k=9)], WIDTHS)
    assert [o.item_id for o in alone.organic] == [o.item_id for o in mixed[2].organic]
    assert [o.score for o in alone.organic] == pytest.approx(
        [o.score for o in mixed[2].organic], abs=1e-5)


def test_the_organic_search_yields_organic_ids_only(tmp_path: Path,
                                                    organic_snapshot: Path) -> None:
    _mgr, engine, state = _serving(tmp_path, organic_snapshot)
    man, rt, trie = state.model.manifest, state.model.runtime, state.model.organic_trie
    assert trie is not None and trie.n_ads == len(ORGANIC_IDS)
    reqs = [_req("u1"), _req("u2")]
    states = rt.encode(*engine.inputs(state, reqs))
    beams = beam_search(lambda r, p: rt.step(states, r, p), trie, 2, [64] * man.id_len)
    assert np.bincount(beams.request).tolist() == [len(ORGANIC_IDS)] * 2   # all of them
    ad_rows = {tuple(int(x) for x in row) for row in man.ids}
    for ids, row in zip(beams.ids, beams.rows, strict=True):
        assert tuple(ids.tolist()) == tuple(man.organic_table[row].tolist())
        assert tuple(ids.tolist()) not in ad_rows
    (res,) = engine.run([_req("u1", organic_k=50, k=10)], WIDTHS)
    assert sorted(o.item_id for o in res.organic) == sorted(ORGANIC_IDS)
    assert not {o.item_id for o in res.organic} & set(AD_IDS)
    assert {a.ad_id for a in res.ads} <= set(AD_IDS)


def test_a_catalog_change_keeps_the_snapshots_organic_trie(
        tmp_path: Path, organic_snapshot: Path) -> None:
    mgr, _engine, state = _serving(tmp_path, organic_snapshot)
    assert _sample("adloop_server_organic_items") == len(ORGANIC_IDS)
    mgr.catalog.apply((a.ad_id, a) for a in make_ads(AD_IDS[:10], status="paused"))
    mgr.on_catalog_change()
    assert mgr.state is not None and mgr.state is not state
    assert mgr.state.trie.n_ads == len(AD_IDS) - 10
    assert mgr.state.model.organic_trie is state.model.organic_trie


def test_without_organic_ids_a_mixed_request_gets_ads_only_and_is_counted(
        tmp_path: Path, snapshots: Builder) -> None:
    _mgr, engine, state = _serving(tmp_path, snapshots("v1").directory)
    assert state.model.organic_trie is None
    before = _sample("adloop_server_organic_unavailable_total")
    plain = engine.run([_req("u1"), _req("u2")], WIDTHS)
    mixed = engine.run([_req("u1", organic_k=5), _req("u2", organic_k=1)], WIDTHS)
    assert [_ads(r) for r in plain] == [_ads(r) for r in mixed]
    assert all(len(r.ads) == 5 and r.organic == [] for r in mixed)
    assert _sample("adloop_server_organic_unavailable_total") - before == 2


def test_a_snapshot_whose_organic_search_fails_warm_up_is_refused(
        tmp_path: Path, snapshots: Builder) -> None:
    """Only the organic search meets the broken part of the graph (the ads' search alone
    would pass); the snapshot is refused and the old one keeps serving."""
    organic = [f"news/tech#{n}" for n in range(12)]
    good = snapshots("v1", organic_ids=organic)
    assert good.manifest["organic_ids"] and not set(good.manifest["organic_ids"]) & set(AD_IDS)
    mgr, engine, state = _serving(tmp_path, good.directory)
    assert state.model.organic_trie is not None
    assert state.model.organic_trie.n_ads == len(organic)
    (res,) = engine.run([_req("u1", organic_k=3)], WIDTHS)
    assert len(res.organic) == 3 and {o.item_id for o in res.organic} <= set(organic)
    bad = snapshots("v2", organic_ids=organic, nan_organic=True)
    assert mgr.load_directory(bad.directory) == "nan"
    assert mgr.version == "v1"
    (info,) = [v for v in mgr.describe()["versions"] if v["version"] == "v2"]
    assert info["status"] == "failed" and "decoder_step" in info["detail"]
    (again,) = engine.run([_req("u1", organic_k=3)], WIDTHS)
    assert again.model_version == "v1" and len(again.organic) == 3


Send = Callable[[str, Event], None]
Start = Callable[..., ServerThread]


@pytest.mark.kafka
def test_a_mixed_feed_over_http_is_answered_and_logged(
        kafka: KafkaSettings, start_server: Start, organic_snapshot: Path,
        producer: Send) -> None:
    publish_ads(producer)
    for item in _items(ORGANIC_IDS):
        producer("organic-items", item)
    srv = start_server(kafka, snapshot=organic_snapshot, follow_model_updates=False,
                       organic_beam=8)
    body = {"user_id": "u-1", "context": {"device": "ios"}, "recent_ad_ids": AD_IDS[:2],
            "k": 4, "recent_organic": ["travel/beaches#1"]}
    with httpx.Client(base_url=srv.url, timeout=30) as c:
        wait_for(lambda: ready(c, "v1"), what="v1 ready")
        plain = c.post("/v1/recommend", json={**body, "request_id": "r-plain"})
        mixed = c.post("/v1/recommend", json={**body, "request_id": "r-mixed",
                                              "organic_k": 5})
        assert plain.status_code == mixed.status_code == 200, mixed.text
        assert plain.json()["organic"] == []
        got = mixed.json()
        assert got["ads"] == plain.json()["ads"]
        organic = got["organic"]
        assert [o["position"] for o in organic] == list(range(5))
        assert {o["item_id"] for o in organic} <= set(ORGANIC_IDS) - {"travel/beaches#1"}
        scores = [o["score"] for o in organic]
        assert scores == sorted(scores, reverse=True) and all(s <= 0 for s in scores)
        text = c.get("/metrics").text
        assert metric_value(text, "adloop_server_organic_served_total") >= 5
        assert metric_value(text, "adloop_server_organic_items") == len(ORGANIC_IDS)
    imps = {r.record.request_id: r.record
            for r in read_all(kafka, "impressions", timeout_s=30, expect=2)}
    imp = imps["r-mixed"]
    assert isinstance(imp, Impression)
    assert [(s.item_id, s.semantic_id, s.position, s.score) for s in imp.organic] == \
        [(o["item_id"], o["semantic_id"], o["position"], o["score"]) for o in organic]
    assert imp.recent_organic == ["travel/beaches#1"]
    assert [s.ad_id for s in imp.slate] == [a["ad_id"] for a in got["ads"]]
    assert imps["r-plain"].organic == []


def test_recent_organic_items_fill_the_feed_only_when_the_search_found_too_few_others(
        tmp_path: Path, organic_snapshot: Path) -> None:
    """The search width does not grow with the request's history (it would take the
    ads' time under load): recent items are left out while there are enough others
    among the final beams, and the best of them fill what is left otherwise."""
    _mgr, engine, _state = _serving(tmp_path, organic_snapshot, organic_beam=4)
    (first,) = engine.run([_req("u1", organic_k=4)], WIDTHS)
    top = [o.item_id for o in first.organic]
    assert len(top) == 4
    (some,) = engine.run([_req("u1", organic_k=2, recent_organic=top[:2])], WIDTHS)
    assert [o.item_id for o in some.organic] == top[2:]
    (all_recent,) = engine.run([_req("u1", organic_k=4, recent_organic=top)], WIDTHS)
    assert [o.item_id for o in all_recent.organic] == top          # refilled, same order
    assert [o.position for o in all_recent.organic] == [0, 1, 2, 3]
    # (the history is model input too, so the beams themselves may differ)
    (mixed,) = engine.run([_req("u1", organic_k=4, recent_organic=top[:1])], WIDTHS)
    ids = [o.item_id for o in mixed.organic]
    assert len(ids) == 4 and ids.index(top[0]) == 3 if top[0] in ids else len(ids) == 4


def test_a_removed_organic_item_leaves_the_organic_trie_at_once(
        tmp_path: Path, snapshots: Builder) -> None:
    """An item ``removed`` on ``organic-items``, or deleted (a tombstone), is not served
    from the next batch on; the ads' trie is untouched; active again, it is back."""
    organic = [f"news/tech#{n}" for n in range(12)]
    catalogue = OrganicCatalog()
    catalogue.apply((i.item_id, i) for i in _items(organic))
    mgr, engine = _following(tmp_path, snapshots("v1", organic_ids=organic).directory,
                             catalogue)
    (res,) = engine.run([_req("u1", organic_k=50)], WIDTHS)
    assert sorted(o.item_id for o in res.organic) == sorted(organic)
    state = mgr.state
    assert state is not None

    assert catalogue.apply([(organic[3], _items([organic[3]], "removed")[0]),
                            (organic[5], None)])
    mgr.on_organic_change()
    assert mgr.state is not None and mgr.state.trie is state.trie   # ads untouched
    assert mgr.state.organic_trie is not None and mgr.state.organic_trie.n_ads == 10
    assert _sample("adloop_server_organic_items") == 10
    (res,) = engine.run([_req("u1", organic_k=50)], WIDTHS)
    assert sorted(o.item_id for o in res.organic) == sorted(set(organic) - {organic[3],
                                                                            organic[5]})
    catalogue.apply((i.item_id, i) for i in _items([organic[3]]))
    mgr.on_organic_change()
    (res,) = engine.run([_req("u1", organic_k=50)], WIDTHS)
    assert organic[3] in {o.item_id for o in res.organic}
    assert organic[5] not in {o.item_id for o in res.organic}


def test_a_new_organic_item_is_served_once_a_snapshot_has_its_ids(
        tmp_path: Path, snapshots: Builder) -> None:
    """A new item active on ``organic-items`` has no semantic id in the serving snapshot:
    it waits, like a new ad, for the snapshot the learner publishes after placing it;
    an item of the snapshot whose record has not arrived is not served either."""
    organic = [f"news/tech#{n}" for n in range(12)]
    new, unannounced = "news/tech#12", "news/tech#13"
    catalogue = OrganicCatalog()
    catalogue.apply((i.item_id, i) for i in _items([*organic, new]))
    mgr, engine = _following(tmp_path, snapshots("v1", organic_ids=organic).directory,
                             catalogue)
    (res,) = engine.run([_req("u1", organic_k=50)], WIDTHS)
    assert sorted(o.item_id for o in res.organic) == sorted(organic)    # no ids for it yet

    v2 = snapshots("v2", organic_ids=[*organic, new, unannounced])
    assert mgr.load_directory(v2.directory) == "ok", mgr.describe()
    (res,) = engine.run([_req("u1", organic_k=50)], WIDTHS)
    assert res.model_version == "v2"
    assert sorted(o.item_id for o in res.organic) == sorted([*organic, new])
    catalogue.apply((i.item_id, i) for i in _items([unannounced]))
    mgr.on_organic_change()
    (res,) = engine.run([_req("u1", organic_k=50)], WIDTHS)
    assert unannounced in {o.item_id for o in res.organic}


def test_the_organic_search_narrows_with_the_ads_beams_under_load(
        tmp_path: Path, organic_snapshot: Path) -> None:
    """The load controller scales the organic search's width by the ads' α; a request
    still searches at least its organic_k."""
    ctl = BeamController([16, 16, 8], slo_s=0.05, alpha_min=0.125)
    used: list[int] = []

    def width(base: int) -> int:
        used.append(ctl.organic_width(base))
        return used[-1]

    _mgr, _plain, _state = _serving(tmp_path, organic_snapshot)
    engine = Engine(_mgr, _mgr.catalog, organic_beam=16, organic_width=width)
    (calm,) = engine.run([_req("u1", organic_k=3)], ctl.widths)
    assert used == [16] and _sample("adloop_server_organic_beam_width") == 16
    for _ in range(3):   # batches far over the SLO: α drops to its floor
        ctl.observe(16, 1.0, 1.0, 64)
    assert ctl.at_floor
    (loaded,) = engine.run([_req("u1", organic_k=3)], ctl.widths)
    ads_ratio = ctl.widths(3)[0] / 16
    assert used[-1] == int(ctl.alpha * 16) == 2 and used[-1] / 16 == ads_ratio
    assert _sample("adloop_server_organic_beam_width") == 2
    assert len(calm.organic) == len(loaded.organic) == 3     # never below organic_k


@pytest.mark.kafka
def test_the_server_follows_organic_items_removals_and_returns(
        kafka: KafkaSettings, start_server: Start, organic_snapshot: Path,
        producer: Send) -> None:
    """Over the topic: poison before the catalogue is skipped and dead-lettered; a
    removal stops being served within a bound (no new snapshot), and an item active
    again is served again."""
    publish_ads(producer)
    prod = EventProducer(kafka)
    bad = [prod.send_bytes("organic-items", value, key).get(timeout=30).offset
           for key, value in ((b"x#1", b'"\x80"'), (b"\xff\xfe", b'{"schema":1,"item_id":7}'),
                              (b"x#2", b"[" * 100_000))]
    prod.send_bytes("organic-items", None, b"\xc0gone").get(timeout=30)  # type: ignore[arg-type]
    prod.close()
    for item in _items(ORGANIC_IDS):
        producer("organic-items", item)
    srv = start_server(kafka, snapshot=organic_snapshot, follow_model_updates=False,
                       organic_beam=32)
    body = {"user_id": "u-1", "context": {"device": "ios"}, "recent_ad_ids": AD_IDS[:2],
            "k": 4, "organic_k": len(ORGANIC_IDS)}
    gone = ORGANIC_IDS[4]

    def served(c: httpx.Client) -> set[str]:
        r = c.post("/v1/recommend", json=body)
        assert r.status_code == 200, r.text
        return {o["item_id"] for o in r.json()["organic"]}

    with httpx.Client(base_url=srv.url, timeout=30) as c:
        wait_for(lambda: ready(c, "v1"), what="v1 ready")
        assert served(c) == set(ORGANIC_IDS)
        producer("organic-items", _items([gone], "removed")[0])
        wait_for(lambda: gone not in served(c), timeout_s=10, what="the removal served")
        assert served(c) == set(ORGANIC_IDS) - {gone}
        text = c.get("/metrics").text
        assert metric_value(text, "adloop_server_organic_items") == len(ORGANIC_IDS) - 1
        assert metric_value(text, "adloop_server_catalog_organic_items") == len(ORGANIC_IDS)
        assert c.get("/readyz").json()["servable_organic_items"] == len(ORGANIC_IDS) - 1
        assert metric_value(text, "adloop_server_bad_records_total",
                            'reason="not_json",topic="organic-items"') == 2
        assert metric_value(text, "adloop_server_bad_records_total",
                            'reason="invalid",topic="organic-items"') == 1
        producer("organic-items", _items([gone])[0])
        wait_for(lambda: gone in served(c), timeout_s=10, what="the item served again")
    physical = kafka.topic_prefix + "organic-items"
    wait_for(lambda: sorted(r.record.offset for r in read_all(kafka, "dlq", timeout_s=5)
                            if r.record.source_topic == physical) == bad,
             timeout_s=30, what="one dead letter per poison record (not the tombstone)")
