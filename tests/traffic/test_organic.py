"""Organic content: the world's finite catalogue, the users' consumption of it, the
engagement model of a mixed feed (ads plus organic items), and how the driver, the
server's answers and recorded logs carry it."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from prometheus_client import REGISTRY
from pydantic import ValidationError

from streams.features import organic_topic
from streams.kafka_io import EventProducer, read_all
from streams.schemas import Event, Impression, OrganicEngagement, OrganicItem
from streams.settings import KafkaSettings
from traffic.driver import (
    Emitter,
    HttpOptions,
    HttpRecommender,
    OraclePolicy,
    RandomPolicy,
    ServedOrganic,
    ServedSlate,
    TrafficDriver,
    impression_of,
)
from traffic.recorded import RecordError, RecordWriter, read_recorded
from traffic.replay import ReplaySettings, replay_recorded, world_config
from traffic.world import (
    CATEGORIES,
    ORGANIC_TOPICS,
    Request,
    SimUser,
    World,
    WorldConfig,
    organic_content,
    organic_text,
    parse_organic_id,
)


def _config(seed: int, **kw: Any) -> WorldConfig:
    return WorldConfig(seed=seed, n_users=200, n_ads=40, **kw)


class PreCatalogueWorld(World):
    """The world's organic consumption as it was before the catalogue: the same random
    calls, a global sequence number as the item number."""

    def _consume_organic(self, user: SimUser, rng: np.random.Generator) -> None:
        cfg = self.config
        n = int(rng.poisson(cfg.organic_per_request))
        if n == 0:
            return
        logits = cfg.organic_sharpness * (self._cat_vectors @ user.state)
        p = np.exp(logits - logits.max())
        p /= p.sum()
        for _ in range(n):
            if rng.random() < cfg.organic_noise:
                c = int(rng.integers(len(CATEGORIES)))
            else:
                c = int(rng.choice(len(CATEGORIES), p=p))
            self._organic_seq += 1
            user.organic.append(f"{ORGANIC_TOPICS[c]}#{self._organic_seq}")


# -- the catalogue ---------------------------------------------------------------------


def test_catalogue_is_finite_deterministic_and_its_texts_tell_items_apart() -> None:
    a = World(_config(3))
    b = World(_config(3))
    items = a.organic_items()
    assert items == b.organic_items()
    assert len(items) == len(ORGANIC_TOPICS) * 8
    assert [i.item_id for i in items] == [f"{t}#{n}" for t in ORGANIC_TOPICS for n in range(8)]
    for item in items:
        assert item.topic == organic_topic(item.item_id)
        assert item.status == "active" and item.created_time == a.config.start_time
        assert a.organic_item(item.item_id) == item
        industry, category = CATEGORIES[ORGANIC_TOPICS.index(item.topic)]
        assert category in item.title and industry in item.title
        assert (item.kind, item.title, item.description) == organic_content(item.item_id)
    assert len({i.title for i in items}) == len(items)
    assert len({organic_text(i.item_id) for i in items}) == len(items)
    assert organic_text(items[0].item_id) == f"{items[0].title}. {items[0].description}"
    assert {i.kind for i in items} == {"video", "article"}
    assert a.organic_item("retail/running-shoes#8") is None
    assert a.organic_item("nowhere#0") is None
    # the catalogue is not drawn from the world's random stream: another seed, same items
    assert World(_config(4)).organic_items() == items


def test_a_larger_catalogue_keeps_titles_distinct() -> None:
    world = World(WorldConfig(seed=0, n_users=20, n_ads=10, organic_per_topic=40))
    titles = [i.title for i in world.organic_items()]
    assert len(titles) == len(ORGANIC_TOPICS) * 40 == len(set(titles))


@pytest.mark.parametrize("bad", ["retail/running-shoes", "retail/running-shoes#x",
                                 "retail/running-shoes#-1", "mars/rocks#1", ""])
def test_organic_ids_of_another_shape_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="not an organic item id"):
        parse_organic_id(bad)
    with pytest.raises(ValueError):
        organic_text(bad)


def test_invalid_organic_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="organic_per_topic"):
        WorldConfig(organic_per_topic=0)
    with pytest.raises(ValueError, match="organic_slots"):
        WorldConfig(organic_slots=-1)
    with pytest.raises(ValueError, match="organic_position_decay"):
        WorldConfig(organic_position_decay=0.0)


# -- consumption -------------------------------------------------------------------------


def test_consumption_draws_the_same_topics_as_before_the_catalogue() -> None:
    new = World(_config(5))
    old = PreCatalogueWorld(_config(5))
    n_items = 0
    for _ in range(400):
        r_new, r_old = new.next_request(), old.next_request()
        assert (r_new.user_id, r_new.event_time, r_new.context) == \
            (r_old.user_id, r_old.event_time, r_old.context)
        assert [organic_topic(o) for o in r_new.recent_organic] == \
            [organic_topic(o) for o in r_old.recent_organic]
        for o in r_new.recent_organic:
            assert new.organic_item(o) is not None
        n_items += len(r_new.recent_organic)
    assert n_items > 1000
    # the item within a topic comes from the user and the sequence number: it varies
    seen = {o for u in new.users for o in u.organic}
    assert len({parse_organic_id(o)[1] for o in seen}) == 8


def test_requests_ask_for_organic_items_only_in_a_mixed_feed() -> None:
    plain = World(_config(2)).next_request()
    mixed = World(_config(2, organic_slots=3)).next_request()
    assert plain.organic_k == 0 and "organic_k" not in plain.body()
    assert mixed.organic_k == 3 and mixed.body()["organic_k"] == 3
    assert {k: v for k, v in mixed.body().items() if k != "organic_k"} == plain.body()


# -- engagement ------------------------------------------------------------------------


def _affinities(world: World, request: Request) -> dict[str, float]:
    ids = [i.item_id for i in world.organic_items()]
    aff = world.organic_probabilities(request.user_id, ids)[0]
    return dict(zip(ids, aff.tolist(), strict=True))


def test_engagement_grows_with_affinity() -> None:
    world = World(_config(11, organic_quality_sigma=0.0))
    ids = [i.item_id for i in world.organic_items()]
    pick = np.random.default_rng(0)
    rows: list[tuple[float, bool, bool, float]] = []
    for _ in range(1000):
        req = world.next_request()
        # items across the whole affinity range: one of the user's best topics, random ones
        best = world.organic_oracle(req, 8)[int(pick.integers(8))]
        shown = [best] + [ids[int(j)] for j in pick.choice(len(ids), size=3, replace=False)
                          if ids[int(j)] != best]
        for out in world.respond_organic(req, pick.permutation(shown).tolist()).items:
            rows.append((out.affinity, out.viewed, out.liked, out.dwell_s))
    rows.sort()
    thirds = np.array_split(np.arange(len(rows)), 3)
    view_rate = [np.mean([rows[i][1] for i in t]) for t in thirds]
    like_rate = [np.mean([rows[i][2] for i in t if rows[i][1]]) for t in thirds]
    dwell = [np.median([rows[i][3] for i in t if rows[i][1]]) for t in thirds]
    assert view_rate[0] + 0.05 < view_rate[1] < view_rate[2] - 0.05, view_rate
    assert like_rate[0] < like_rate[1] < like_rate[2], like_rate
    assert dwell[0] < dwell[1] < dwell[2], dwell


def test_view_rate_matches_the_model_and_falls_with_rank() -> None:
    world = World(_config(12))
    req = world.next_request()
    item = max(_affinities(world, req).items(), key=lambda kv: kv[1])[0]
    _, p_view, p_like, _ = world.organic_probabilities(req.user_id, [item] * 4,
                                                       np.arange(4))
    decay = world.config.organic_position_decay
    assert np.allclose(p_view[1:] / p_view[:-1], decay)
    assert np.allclose(p_like, p_like[0])
    views = sum(world.respond_organic(dataclasses.replace(req, seq=s), [item]).views
                for s in range(2000))
    assert abs(views / 2000 - p_view[0]) < 0.03


def test_engagement_events_follow_the_view() -> None:
    world = World(_config(13, organic_slots=5))
    req = world.next_request()
    best = world.organic_oracle(req)
    resp = world.respond_organic(req, [*best, "nowhere#0", best[0]])
    assert resp.unknown_item_ids == ["nowhere#0", best[0]]
    assert [o.item_id for o in resp.items] == best
    assert [o.position for o in resp.items] == list(range(5))
    times = [e.event_time for e in resp.events]
    assert times == sorted(times)
    by_item: dict[str, dict[str, float]] = {}
    for e in resp.events:
        assert e.request_id == req.request_id and e.user_id == req.user_id
        assert e.event_id == f"{req.request_id}:{e.action}:{e.item_id}"
        by_item.setdefault(e.item_id, {})[e.action] = e.event_time
        if e.action == "dwell":
            assert e.dwell_s > 0
    for out in resp.items:
        acts = by_item.get(out.item_id, {})
        assert out.viewed == ("view" in acts) == ("dwell" in acts)
        assert out.liked == ("like" in acts)
        if out.viewed:
            assert out.view_time is not None and 0 < out.view_time - req.event_time < 60
            assert acts["dwell"] == pytest.approx(acts["view"] + out.dwell_s)
            if out.liked:
                assert acts["view"] <= acts["like"] <= acts["dwell"]
    assert resp.views > 0
    # viewed items join the user's organic history, which the next request carries
    viewed = [o.item_id for o in resp.items if o.viewed]
    assert list(world.user(req.user_id).organic)[-len(viewed):] == viewed


def test_same_request_same_engagement() -> None:
    a = World(_config(14, organic_slots=3))
    b = World(_config(14, organic_slots=3))
    ra, rb = a.step_requests(30), b.step_requests(30)
    # answered in another order, each request still gets the same engagement
    got_a = {r.request_id: a.respond_organic(r, a.organic_oracle(r)).events for r in ra}
    got_b = {r.request_id: b.respond_organic(r, b.organic_oracle(r)).events
             for r in reversed(rb)}
    assert got_a == got_b
    assert sum(len(v) for v in got_a.values()) > 30


def test_oracle_ranks_by_expected_engagement() -> None:
    world = World(_config(15, organic_slots=4))
    ids = [i.item_id for i in world.organic_items()]
    pick = np.random.default_rng(1)
    oracle_views = random_views = 0
    for _ in range(300):
        req = world.next_request()
        best = world.organic_oracle(req)
        assert len(best) == 4 == len(set(best))
        _, p_view, p_like, _ = world.organic_probabilities(req.user_id, ids)
        value = p_view * (1.0 + p_like)
        assert sorted(value, reverse=True)[:4] == pytest.approx(
            [value[ids.index(o)] for o in best])
        shown = world.organic_expected_engagement(req, best)
        assert list(shown) == sorted(shown, reverse=True)
        other = [ids[int(j)] for j in pick.choice(len(ids), size=4, replace=False)]
        assert shown.sum() >= world.organic_expected_engagement(req, other).sum()
        oracle_views += world.respond_organic(req, best).views
        random_views += world.respond_organic(dataclasses.replace(req, seq=req.seq + 10**6),
                                              other).views
    assert oracle_views > 1.5 * random_views
    assert world.organic_oracle(req, 0) == []


# -- the driver ------------------------------------------------------------------------


def _sample(name: str, labels: dict[str, str] | None = None) -> float:
    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


def _events(emitter: Emitter, *topics: str) -> list[tuple[str, Event]]:
    return [(t, r) for t, r in emitter.events if t in topics]


@pytest.mark.parametrize("policy", ["oracle", "random"])
def test_in_process_mixed_feed_produces_organic_slots_and_engagement(policy: str) -> None:
    world = World(_config(21, organic_slots=3))
    emitter = Emitter(keep=True)
    driver = TrafficDriver(world, emitter)
    pol = OraclePolicy(world) if policy == "oracle" else RandomPolicy(world, 21)
    before = {a: _sample("adloop_traffic_organic_engagements_total", {"action": a})
              for a in ("view", "like", "dwell")}
    imps_before = _sample("adloop_traffic_organic_impressions_total")
    dwell_before = _sample("adloop_traffic_organic_dwell_seconds_total")
    stats = driver.run_inprocess(pol, 200)
    # the catalogue goes out at the start, right after the initial ads
    head = emitter.events[:40 + 256]
    assert [t for t, _ in head] == ["ads"] * 40 + ["organic-items"] * 256
    assert [r for _, r in head[40:]] == world.organic_items()
    shown: dict[str, list[str]] = {}
    for topic, rec in emitter.events:
        if topic == "impressions":
            assert isinstance(rec, Impression)
            assert [s.position for s in rec.organic] == [0, 1, 2]
            assert all(world.organic_item(s.item_id) for s in rec.organic)
            shown[rec.request_id] = [s.item_id for s in rec.organic]
        elif topic == "organic-engagements":
            assert isinstance(rec, OrganicEngagement)
            assert rec.item_id in shown[rec.request_id]        # after its impression
    assert len(shown) == 200 and stats.organic_impressions == 600
    engagements = [r for _, r in _events(emitter, "organic-engagements")]
    assert isinstance(engagements[0], OrganicEngagement)
    actions = Counter(r.action for r in engagements)  # type: ignore[attr-defined]
    assert stats.organic_views == actions["view"] == actions["dwell"] > 0
    assert stats.organic_likes == actions["like"] > 0
    assert stats.produced["organic-engagements"] == len(engagements)
    dwell = sum(r.dwell_s for r in engagements)  # type: ignore[attr-defined]
    assert stats.organic_dwell_s == pytest.approx(dwell)
    assert stats.organic_expected_engagement > 0
    for a in ("view", "like", "dwell"):
        assert _sample("adloop_traffic_organic_engagements_total",
                       {"action": a}) - before[a] == actions[a]
    assert _sample("adloop_traffic_organic_impressions_total") - imps_before == 600
    assert _sample("adloop_traffic_organic_dwell_seconds_total") - dwell_before == \
        pytest.approx(dwell)
    assert stats.pending_left == 0


def test_the_oracle_earns_more_organic_engagement_than_random() -> None:
    runs = {}
    for name in ("oracle", "random"):
        world = World(_config(22, organic_slots=3))
        pol = OraclePolicy(world) if name == "oracle" else RandomPolicy(world, 22)
        runs[name] = TrafficDriver(world, Emitter()).run_inprocess(pol, 300)
    assert runs["oracle"].organic_views > 1.5 * runs["random"].organic_views
    assert runs["oracle"].organic_expected_engagement > \
        1.5 * runs["random"].organic_expected_engagement


@pytest.mark.parametrize("policy", ["oracle", "random"])
def test_ad_responses_do_not_depend_on_organic_slots(policy: str) -> None:
    out = {}
    for slots in (0, 3):
        world = World(_config(23, organic_slots=slots))
        emitter = Emitter(keep=True)
        pol = OraclePolicy(world) if policy == "oracle" else RandomPolicy(world, 23)
        out[slots] = (emitter, TrafficDriver(world, emitter).run_inprocess(pol, 300))
    (plain, s0), (mixed, s3) = out[0], out[3]
    assert _events(plain, "clicks", "conversions", "ads") == \
        _events(mixed, "clicks", "conversions", "ads")
    assert s0.clicks == s3.clicks > 0 and s0.revenue == s3.revenue
    slates = [[[i.ad_id for i in r.slate] for _, r in _events(e, "impressions")]  # type: ignore[attr-defined]
              for e in (plain, mixed)]
    assert slates[0] == slates[1]
    assert s0.organic_impressions == 0 and plain.counts["organic-engagements"] == 0
    assert all(not r.organic for _, r in _events(plain, "impressions"))  # type: ignore[attr-defined]
    assert mixed.counts["organic-engagements"] > 0


def test_unknown_organic_items_get_no_engagement() -> None:
    world = World(_config(24, organic_slots=2))
    emitter = Emitter(keep=True)
    driver = TrafficDriver(world, emitter)
    driver.keep_responses = True
    req = world.next_request()
    best = world.organic_oracle(req, 1)[0]
    slate = ServedSlate(req.request_id, "v1", [], organic=[
        ServedOrganic("nowhere/else#3", 0), ServedOrganic(best, 1)])
    driver.serve(req, slate)
    driver.drain()
    (resp,) = driver.organic_responses
    assert resp.unknown_item_ids == ["nowhere/else#3"]
    assert [o.item_id for o in resp.items] == [best] and resp.items[0].position == 1
    assert {r.item_id for _, r in _events(emitter, "organic-engagements")} <= {best}  # type: ignore[attr-defined]
    assert driver.stats.organic_impressions == 1


# -- answers ---------------------------------------------------------------------------


def _answer(organic: Any) -> dict[str, Any]:
    return {"request_id": "r1", "model_version": "v1",
            "ads": [{"ad_id": "ad-000001", "position": 0}], "organic": organic}


def test_an_answer_with_organic_items_is_parsed_in_rank_order() -> None:
    slate = ServedSlate.from_json(_answer([
        {"item_id": "retail/headphones#2", "semantic_id": [4, 1, 7], "position": 1,
         "score": -2.5},
        {"item_id": "travel/flights#0", "semantic_id": [3, 0, 2], "position": 0,
         "score": -1.0}]), "r1")
    assert slate.organic_ids() == ["travel/flights#0", "retail/headphones#2"]
    assert slate.organic[0] == ServedOrganic("retail/headphones#2", 1, -2.5, [4, 1, 7])
    world = World(_config(25))
    req = dataclasses.replace(world.next_request(), request_id="r1", organic_k=2)
    imp = impression_of(req, slate, world)
    assert [(s.item_id, s.position, s.score, s.semantic_id) for s in imp.organic] == [
        ("travel/flights#0", 0, -1.0, [3, 0, 2]), ("retail/headphones#2", 1, -2.5, [4, 1, 7])]
    absent: list[Any] | None
    for absent in (None, []):
        assert ServedSlate.from_json(_answer(absent), "r1").organic == []
    no_key = _answer(None)
    del no_key["organic"]
    assert ServedSlate.from_json(no_key, "r1").organic == []


@pytest.mark.parametrize(("organic", "error"), [
    ("retail/headphones#2", "not a list"),
    ([{"semantic_id": [1]}], r"organic\[0\] has no item_id"),
    (["retail/headphones#2"], r"organic\[0\] has no item_id"),
    ([{"item_id": ""}], r"organic\[0\] has no item_id"),
    ([{"item_id": "a#1", "position": "0"}], r"organic\[0\].position"),
    ([{"item_id": "a#1", "position": 1}], r"organic\[0\].position"),
    ([{"item_id": "a#1", "position": True}], r"organic\[0\].position"),
    ([{"item_id": "a#1", "score": "high"}], r"organic\[0\].score"),
    ([{"item_id": "a#1", "semantic_id": [1, "x"]}], r"organic\[0\].semantic_id"),
    ([{"item_id": "a#1"}, {"item_id": "a#1"}], "appears twice"),
    ([{"item_id": "a#1", "position": 0}, {"item_id": "a#2", "position": 0}], "repeat"),
])
def test_a_malformed_organic_answer_is_a_value_error(organic: Any, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        ServedSlate.from_json(_answer(organic), "r1")


def test_http_mixed_feed_sends_organic_k_and_samples_the_answers_engagement() -> None:
    world = World(_config(26, organic_slots=2))
    ad_id = world.initial_ads()[0].ad_id
    item = world.organic_items()[0].item_id
    bodies: list[dict[str, Any]] = []

    def answer(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        bodies.append(body)
        organic: Any = [{"item_id": item, "position": 0, "semantic_id": [1, 2, 3]}]
        if len(bodies) % 5 == 0:
            organic = [{"item_id": item, "position": 7}]         # malformed
        return httpx.Response(200, json={
            "request_id": body["request_id"], "model_version": "m1",
            "ads": [{"ad_id": ad_id, "position": 0}], "organic": organic})

    emitter = Emitter(keep=True)
    driver = TrafficDriver(world, emitter)
    rec = HttpRecommender("http://recommender.invalid", transport=httpx.MockTransport(answer))
    stats = asyncio.run(driver.run_http(HttpOptions(rate=200.0, n_requests=20), recommender=rec))
    assert all(b["organic_k"] == 2 for b in bodies) and len(bodies) == 20
    assert stats.outcomes == {"ok": 16, "bad_response": 4}
    assert stats.organic_impressions == 16
    assert {r.item_id for _, r in _events(emitter, "organic-engagements")} == {item}  # type: ignore[attr-defined]


# -- Kafka -----------------------------------------------------------------------------


def test_catalogue_and_engagement_reach_their_topics(kafka: KafkaSettings) -> None:
    world = World(_config(27, organic_slots=2))
    producer = EventProducer(kafka)
    stats = TrafficDriver(world, Emitter(producer)).run_inprocess(OraclePolicy(world), 60)
    producer.flush(30)
    producer.close()
    items = read_all(kafka, "organic-items", timeout_s=30, expect=256)
    assert {r.key for r in items} == {i.item_id.encode() for i in world.organic_items()}
    n = stats.produced["organic-engagements"]
    got = read_all(kafka, "organic-engagements", timeout_s=30, expect=n)
    assert len(got) == n == stats.organic_views * 2 + stats.organic_likes
    assert all(r.key == r.record.user_id.encode() for r in got)
    imps = read_all(kafka, "impressions", timeout_s=30, expect=60)
    assert all(len(r.record.organic) == 2 for r in imps)


# -- recorded logs ---------------------------------------------------------------------


def test_a_recorded_mixed_feed_run_replays_with_its_organic_engagement(
        tmp_path: Path) -> None:
    path = tmp_path / "mixed.jsonl"
    world = World(_config(28, organic_slots=2))
    writer = RecordWriter(path)
    stats = TrafficDriver(world, Emitter(recorder=writer)).run_inprocess(
        OraclePolicy(world), 150)
    writer.close()
    entries = list(read_recorded(path, "stop"))
    kinds = Counter(e.kind for e in entries)
    assert kinds["organic_item"] == 256 and kinds["request"] == 150
    assert kinds["organic_engagement"] == stats.produced["organic-engagements"] > 0
    requests = [e.record for e in entries if e.kind == "request"]
    assert all(isinstance(r, Request) and r.organic_k == 2 for r in requests)
    assert all(len(e.record.organic) == 2 for e in entries  # type: ignore[union-attr]
               if e.kind == "impression")
    emitter = Emitter(keep=True)
    replayed = asyncio.run(replay_recorded(path, emitter, speed=0))
    assert emitter.sha256 == stats.events_sha256
    assert replayed.produced["organic_engagement"] == kinds["organic_engagement"]
    assert replayed.produced["organic_item"] == 256 and replayed.missing() == {}
    assert {t for t, _ in emitter.events} >= {"organic-items", "organic-engagements"}


OLD_AND_BAD = """\
{"type": "request", "t": 10.0, "request_id": "r1", "user_id": "u1", "k": 2}
{"type": "organic_item", "t": 10.0, "item_id": "travel/flights#0", "kind": "video", \
"topic": "travel/flights", "title": "Vlog: Cheap flights to Barcelona"}
{"type": "request", "t": 11.0, "request_id": "r2", "user_id": "u1", "k": 2, "organic_k": 3}
{"type": "organic_engagement", "t": 12.0, "event_id": "e1", "request_id": "r2", \
"user_id": "u1", "item_id": "travel/flights#0", "action": "view"}
{"type": "request", "t": 13.0, "request_id": "r3", "user_id": "u1", "organic_k": -1}
{"type": "request", "t": 13.0, "request_id": "r4", "user_id": "u1", "organic_k": "3"}
{"type": "organic_engagement", "t": 14.0, "event_id": "e2", "request_id": "r2", \
"user_id": "u1", "item_id": "travel/flights#0", "action": "like", "dwell_s": 4.0}
{"type": "organic_engagement", "t": 14.0, "event_id": "e3", "request_id": "r2", \
"user_id": "u1", "item_id": "travel/flights#0", "action": "share"}
{"type": "organic_item", "t": 15.0, "item_id": "travel/flights#1", "kind": "video"}
"""


def test_old_logs_load_and_bad_organic_lines_are_named(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    path.write_text(OLD_AND_BAD)
    errors: list[RecordError] = []
    entries = list(read_recorded(path, "skip", errors))
    assert [(e.line, e.kind) for e in entries] == [
        (1, "request"), (2, "organic_item"), (3, "request"), (4, "organic_engagement")]
    old, mixed = entries[0].record, entries[2].record
    assert isinstance(old, Request) and old.organic_k == 0 and "organic_k" not in old.body()
    assert isinstance(mixed, Request) and mixed.organic_k == 3
    item = entries[1].record
    assert isinstance(item, OrganicItem) and item.created_time == item.event_time == 10.0
    assert [e.line for e in errors] == [5, 6, 7, 8, 9]
    assert "organic_k" in errors[0].reason and "organic_k" in errors[1].reason
    assert "dwell_s" in errors[2].reason and "action" in errors[3].reason
    assert "topic" in errors[4].reason
    emitter = Emitter(keep=True)
    stats = asyncio.run(replay_recorded(path, emitter, speed=0))
    assert emitter.counts["organic-items"] == 1 and emitter.counts["organic-engagements"] == 1
    assert len(stats.bad_lines) == 5 and stats.missing() == {}


def test_replay_settings_ask_for_mixed_feeds(monkeypatch: pytest.MonkeyPatch) -> None:
    assert world_config(ReplaySettings()).organic_slots == 0
    monkeypatch.setenv("ADLOOP_REPLAY_ORGANIC_SLOTS", "4")
    cfg = world_config(ReplaySettings())
    assert cfg.organic_slots == 4 and World(cfg).next_request().body()["organic_k"] == 4
    with pytest.raises(ValidationError, match="organic_slots"):
        ReplaySettings(organic_slots=-1)
