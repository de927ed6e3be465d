"""Organic content of the simulated world: the finite catalogue, the users' consumption of
it, and the engagement model of a mixed feed (ads plus organic items)."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest

from streams.features import organic_topic
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
