"""The simulated ad world and the in-process driver: determinism, ground truth, lifecycle."""

from __future__ import annotations

import math

import numpy as np

from streams.features import DEFAULT_CONTEXT_FEATURES, organic_topic
from streams.schemas import Ad, Click, Conversion, Impression
from traffic.driver import (
    Emitter,
    OraclePolicy,
    RandomPolicy,
    SimClock,
    TrafficDriver,
)
from traffic.world import (
    AGE_BANDS,
    CATEGORIES,
    INDUSTRY_NAMES,
    ORGANIC_TOPICS,
    DelayModel,
    World,
    WorldConfig,
    keyed_uniforms,
    slate_ids,
)

SMALL = {"n_users": 200, "n_ads": 50}


def _run(seed: int, n: int = 600, policy: str = "oracle", **cfg: object):
    world = World(WorldConfig(seed=seed, **{**SMALL, **cfg}))  # type: ignore[arg-type]
    emitter = Emitter(keep=True)
    driver = TrafficDriver(world, emitter)
    pol = OraclePolicy(world) if policy == "oracle" else RandomPolicy(world, seed)
    stats = driver.run_inprocess(pol, n)
    return world, emitter, stats


def test_same_seed_same_world_and_requests() -> None:
    a, b = World(WorldConfig(seed=7, **SMALL)), World(WorldConfig(seed=7, **SMALL))
    assert a.initial_ads() == b.initial_ads()
    assert a.step_requests(50) == b.step_requests(50)
    c = World(WorldConfig(seed=8, **SMALL))
    assert c.initial_ads() != a.initial_ads()


def test_event_stream_hash_is_deterministic_per_seed() -> None:
    _, e1, s1 = _run(3)
    _, e2, s2 = _run(3)
    _, _, s3 = _run(4)
    assert s1.events_sha256 == s2.events_sha256 == e1.sha256
    assert s1.requests_sha256 == s2.requests_sha256
    assert e1.events == e2.events
    assert s3.events_sha256 != s1.events_sha256
    assert s1.clicks > 0 and s1.conversions > 0 and s1.pending_left == 0
    assert s1.produced["clicks"] == s1.clicks


def test_pacing_does_not_change_the_stream() -> None:
    _, _, plain = _run(5, n=200)
    world = World(WorldConfig(seed=5, request_rate=2000.0, **SMALL))
    ref_world = World(WorldConfig(seed=5, request_rate=2000.0, **SMALL))
    ref = TrafficDriver(ref_world, Emitter()).run_inprocess(OraclePolicy(ref_world), 200)
    paced = TrafficDriver(world, Emitter()).run_inprocess(
        OraclePolicy(world), 200, clock=SimClock(world.now, speed=2000.0))
    assert paced.events_sha256 == ref.events_sha256
    assert plain.events_sha256 != ref.events_sha256  # the arrival rate is part of the world


def test_events_come_out_in_causal_order() -> None:
    _, emitter, _ = _run(11, n=800)
    shown: dict[str, float] = {}
    clicked: set[tuple[str, str]] = set()
    for _topic, rec in emitter.events:
        if isinstance(rec, Impression):
            shown[rec.request_id] = rec.event_time
        elif isinstance(rec, Click):
            assert rec.request_id in shown and rec.event_time >= shown[rec.request_id]
            clicked.add((rec.request_id, rec.ad_id))
        elif isinstance(rec, Conversion):
            assert (rec.request_id, rec.ad_id) in clicked
    times = [r.event_time for t, r in emitter.events if t in ("clicks", "conversions")]
    assert times == sorted(times)


def test_requests_carry_the_model_context_features() -> None:
    world = World(WorldConfig(seed=1, **SMALL))
    reqs = world.step_requests(100)
    assert all(set(DEFAULT_CONTEXT_FEATURES) <= set(r.context) for r in reqs)
    for r in reqs:
        assert r.context["hour"] == str(int((r.event_time % 86400) // 3600))
        assert r.k == 5 and r.request_id.startswith("sim1-")
    times = [r.event_time for r in reqs]
    assert times == sorted(times) and len(set(r.request_id for r in reqs)) == 100
    body = reqs[0].body()
    assert set(body) == {"user_id", "context", "recent_ad_ids", "k", "request_id", "event_time",
                         "recent_organic"}
    assert body["recent_organic"] == reqs[0].recent_organic


def test_ads_have_distinguishable_texts_and_realistic_bids() -> None:
    world = World(WorldConfig(seed=2, n_users=10, n_ads=400))
    ads = world.initial_ads()
    assert {a.industry for a in ads} == set(INDUSTRY_NAMES)
    assert len({a.title for a in ads}) > 150
    for a in ads:
        assert " from " in a.title and " — " in a.title
        lo, hi = {"cpc": (0.2, 3.0), "cpa": (5.0, 60.0), "cpm": (1.0, 10.0)}[a.bid_type]
        assert lo <= a.bid <= hi
        assert a.created_time <= a.event_time
    per_adv: dict[str, int] = {}
    for a in ads:
        per_adv[a.advertiser_id] = per_adv.get(a.advertiser_id, 0) + 1
    assert max(per_adv.values()) >= 3  # advertisers own several ads
    assert {a.bid_type for a in ads} == {"cpc", "cpa", "cpm"}


def test_delay_distribution_is_heavy_tailed_with_some_late() -> None:
    model = DelayModel(window_s=3600.0)
    rng = np.random.default_rng(0)
    d = np.array([model.sample_conversion(rng) for _ in range(20000)])
    assert 0.30 < (d < 300).mean() < 0.45  # a share within minutes
    late = (d > 3600).mean()
    assert 0.03 < late < 0.08
    assert abs(late - model.late_share()) < 0.01
    assert np.percentile(d, 99) > 3 * 3600 / 2  # a long tail


def test_oracle_beats_random_and_matches_serving_formula() -> None:
    world = World(WorldConfig(seed=9, **SMALL))
    req = world.next_request()
    ads, pctr, pcvr = world.probabilities(req.user_id, req.context, req.event_time)
    ev = world.expected_values(ads, pctr, pcvr)
    for a, p, c, v in zip(ads, pctr, pcvr, ev, strict=True):
        expect = {"cpc": a.record.bid * p, "cpa": a.record.bid * p * c,
                  "cpm": a.record.bid / 1000.0}[a.record.bid_type]
        assert math.isclose(v, expect)
    top = world.oracle_slate(req.user_id, req.context, k=5, t=req.event_time)
    assert top == [ads[i].ad_id for i in np.argsort(-ev, kind="stable")[:5]]
    _, _, oracle = _run(9, n=500)
    _, _, rand = _run(9, n=500, policy="random")
    assert oracle.expected_revenue > 2 * rand.expected_revenue


def test_position_bias_lowers_ctr() -> None:
    world = World(WorldConfig(seed=1, **SMALL))
    req = world.next_request()
    ads = world.servable_ads()[:1]
    _, top, _ = world.probabilities(req.user_id, req.context, req.event_time, ads, 0)
    _, low, _ = world.probabilities(req.user_id, req.context, req.event_time, ads, 4)
    assert low[0] < top[0]


def test_interests_drift_over_time() -> None:
    world = World(WorldConfig(seed=1, n_users=1, n_ads=10, request_rate=1 / 3600.0))
    before = world.users[0].state.copy()
    world.step_requests(24)  # about a simulated day
    after = world.users[0].state
    assert np.linalg.norm(after - before) > 0.05


def test_budgets_exhaust_and_ads_arrive_and_pause() -> None:
    world = World(WorldConfig(seed=1, n_users=50, n_ads=20, budget_scale=0.01,
                              new_ads_per_hour=60.0, pause_per_hour=2.0))
    changed = world.advance_to(world.now + 3600.0)
    new = [a for a in changed if a.created_time == a.event_time and a.ad_id not in
           {x.ad_id for x in world.initial_ads()}]
    assert 30 < len(new) < 100
    assert any(a.status == "paused" for a in changed)
    emitter = Emitter(keep=True)
    driver = TrafficDriver(world, emitter)
    stats = driver.run_inprocess(OraclePolicy(world), 400)
    exhausted = [r for t, r in emitter.events if isinstance(r, Ad) and r.status == "exhausted"]
    assert exhausted, stats
    for a in exhausted:
        assert world.ads[a.ad_id].spend >= a.budget
        assert a.ad_id not in {x.ad_id for x in world.servable_ads()}


def test_unknown_and_inactive_ads_get_no_response() -> None:
    world = World(WorldConfig(seed=1, **SMALL))
    req = world.next_request()
    resp = world.respond(req, ["nope", *world.oracle_slate(req.user_id, req.context, k=2)])
    assert resp.unknown_ad_ids == ["nope"] and resp.impressions == 2
    assert [i.position for i in resp.items] == [1, 2]


def test_response_depends_on_request_not_on_order() -> None:
    # without creative fatigue the world state a response sees does not depend on order
    no_fatigue = {**SMALL, "fatigue_user": 0.0, "fatigue_overall": 0.0}
    w1, w2 = World(WorldConfig(seed=1, **no_fatigue)), World(WorldConfig(seed=1, **no_fatigue))
    r1, r2 = w1.step_requests(2), w2.step_requests(2)
    s = [a.ad_id for a in w1.servable_ads()[:5]]
    a = [w1.respond(r1[0], s).items, w1.respond(r1[1], s).items]
    b = [w2.respond(r2[1], s).items, w2.respond(r2[0], s).items]
    assert [i.clicked for i in a[0]] == [i.clicked for i in b[1]]
    assert a[0] == b[1] and a[1] == b[0]


def test_slate_ids_orders_by_position() -> None:
    assert slate_ids([{"ad_id": "b", "position": 1}, {"ad_id": "a", "position": 0}]) == ["a", "b"]


def test_creative_fatigue_lowers_ctr_with_exposure() -> None:
    world = World(WorldConfig(seed=3, **SMALL))
    req = world.next_request()
    ad = world.servable_ads()[:1]
    _, fresh, _ = world.probabilities(req.user_id, req.context, req.event_time, ad)
    for _ in range(3):
        world.respond(req, [ad[0].ad_id])
    _, tired, _ = world.probabilities(req.user_id, req.context, req.event_time, ad)
    assert world.user(req.user_id).exposure[ad[0].ad_id] == 3 and ad[0].impressions == 3
    assert tired[0] < 0.8 * fresh[0]
    other = next(u for u in world.users if u.user_id != req.user_id)
    _, for_other, _ = world.probabilities(other, req.context, req.event_time, ad)
    fresh_world = World(WorldConfig(seed=3, **SMALL))
    _, other_before, _ = fresh_world.probabilities(
        other.user_id, req.context, req.event_time, [fresh_world.ads[ad[0].ad_id]])
    assert for_other[0] < other_before[0]          # overall wear-out reaches everyone


def test_category_trends_rise_and_fall_over_days() -> None:
    world = World(WorldConfig(seed=2, **SMALL))
    t0 = world.config.start_time
    trends = np.stack([world.trend_effect(t0 + h * 3600.0) for h in range(0, 96, 2)])
    assert trends.shape == (48, len(CATEGORIES))
    amp = world.config.trend_amplitude
    assert np.all(np.abs(trends) <= amp + 1e-9)
    assert np.all(trends.max(axis=0) - trends.min(axis=0) > amp)   # each one moves


def test_advertisers_revise_bids_and_budgets() -> None:
    world = World(WorldConfig(seed=4, n_users=10, n_ads=40, new_ads_per_hour=0.0,
                              pause_per_hour=0.0, bid_change_per_hour=1.0))
    before = {a.ad_id: (a.bid, a.budget) for a in world.initial_ads()}
    changed = world.advance_to(world.now + 3600.0)
    revised = [a for a in changed if a.ad_id in before]
    assert len(revised) > 10
    assert any(a.bid != before[a.ad_id][0] for a in revised)
    assert all(a.budget >= before[a.ad_id][1] for a in revised)


def test_requests_carry_stable_user_features_and_organic_history() -> None:
    world = World(WorldConfig(seed=6, **SMALL))
    reqs = world.step_requests(300)
    by_user: dict[str, set[tuple[str, str]]] = {}
    for r in reqs:
        assert r.context["age"] in AGE_BANDS and r.context["interest"] in INDUSTRY_NAMES
        by_user.setdefault(r.user_id, set()).add((r.context["age"], r.context["interest"]))
        assert all(organic_topic(o) in ORGANIC_TOPICS for o in r.recent_organic)
        assert len(r.recent_organic) <= world.config.recent_organic
    assert all(len(v) == 1 for v in by_user.values())     # stable per user
    assert sum(len(r.recent_organic) for r in reqs) > 300


def test_organic_history_reveals_the_hidden_interest() -> None:
    world = World(WorldConfig(seed=8, n_users=50, n_ads=50, organic_noise=0.0))
    reqs = world.step_requests(2000)
    hits = total = 0
    for r in reqs[-200:]:
        user = world.user(r.user_id)
        if not r.recent_organic:
            continue
        topics = [organic_topic(o) for o in r.recent_organic]
        top = max(set(topics), key=topics.count)
        cats = user.state[len(INDUSTRY_NAMES):]
        best = {ORGANIC_TOPICS[int(i)] for i in np.argsort(-cats)[:3]}
        hits += top in best
        total += 1
    assert total > 100 and hits / total > 0.6


def test_observable_oracle_sits_between_random_and_oracle() -> None:
    def expected(policy: str) -> float:
        world = World(WorldConfig(seed=5, **SMALL))
        rand = RandomPolicy(world, 5)
        ev = 0.0
        for r in world.step_requests(300):
            if policy == "oracle":
                slate = world.oracle_slate(r.user_id, r.context, k=r.k, t=r.event_time)
            elif policy == "observable":
                slate = world.observable_oracle_slate(r)
            else:
                slate = rand.recommend(r).ad_ids()
            ev += world.respond(r, slate).expected_value
        return ev

    rand, obs, oracle = expected("random"), expected("observable"), expected("oracle")
    assert rand < 0.5 * obs and obs < oracle


def test_an_ads_outcome_depends_on_the_request_and_the_ad_not_on_the_slate() -> None:
    # common random numbers: the variates of (request, ad) are keyed by both alone
    world = World(WorldConfig(seed=5, **SMALL))
    req = world.next_request()
    ads = world.servable_ads()[:6]
    both = world.response_uniforms(req.seq, ads)
    alone = world.response_uniforms(req.seq, [ads[3]])
    assert np.array_equal(both[3], alone[0])
    assert not np.array_equal(both[0], both[1])
    assert not np.array_equal(world.response_uniforms(req.seq + 1, [ads[3]]), alone)
    assert both.shape == (6, 9) and np.all((both > 0) & (both < 1))
    # uniform and independent enough: mean, variance and no correlation across variates
    many = keyed_uniforms(5, 2, 0, range(5000), 9)
    assert abs(many.mean() - 0.5) < 0.01 and abs(many.var() - 1 / 12) < 0.005
    assert abs(np.corrcoef(many[:, 0], many[:, 1])[0, 1]) < 0.05


def test_one_different_slate_changes_that_requests_outcome_only() -> None:
    # without fatigue or budgets the world state a response sees is the same whatever
    # was served, so two runs that differ on one request differ only there
    cfg = WorldConfig(seed=6, fatigue_user=0.0, fatigue_overall=0.0, budget_scale=1e6,
                      **SMALL)
    a, b = World(cfg), World(cfg)
    changed = 7
    outcomes: list[list[list[object]]] = [[], []]
    for n in range(40):
        for w, out in ((a, outcomes[0]), (b, outcomes[1])):
            req = w.next_request()
            w.advance_to(req.event_time)
            slate = [x.ad_id for x in w.servable_ads()[:5]]
            if w is b and n == changed:
                slate = [x.ad_id for x in w.servable_ads()[5:10]]
            out.append([(i.ad_id, i.clicked, i.converted, i.reward, i.click_time)
                        for i in w.respond(req, slate).items])
    differ = [n for n in range(40) if outcomes[0][n] != outcomes[1][n]]
    assert differ == [changed]
    assert sum(c for row in outcomes[0] for _, c, _, _, _ in row) > 0   # clicks happened


def test_the_lifecycle_does_not_depend_on_what_was_served() -> None:
    # one world exhausts budgets, the other serves nothing: the same ads arrive with the
    # same attributes, and the ads neither touched pause, resume and get revised alike
    cfg = WorldConfig(seed=2, n_users=50, n_ads=30, budget_scale=0.02, new_ads_per_hour=8.0,
                      request_rate=1 / 60.0,
                      pause_per_hour=1.0, resume_per_hour=2.0, bid_change_per_hour=0.5)
    busy, idle = World(cfg), World(cfg)
    spent: set[str] = set()
    for _ in range(300):
        for w in (busy, idle):
            req = w.next_request()
            w.advance_to(req.event_time)
            if w is busy:
                slate = w.oracle_slate(req.user_id, req.context, k=5)
                spent.update(slate)
                w.respond(req, slate)
    exhausted = [a for a in busy.ads.values() if a.record.status == "exhausted"]
    assert exhausted
    assert list(busy.ads) == list(idle.ads)
    assert len(busy.ads) > cfg.n_ads + 20
    untouched = [a for a in busy.ads if a not in spent]
    assert len(untouched) > 20
    for ad_id in untouched:
        assert busy.ads[ad_id].record == idle.ads[ad_id].record
    assert any(busy.ads[a].record.status == "paused" for a in untouched)
