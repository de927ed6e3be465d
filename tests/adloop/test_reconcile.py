"""The ledger checker finds every kind of loss and duplication it is meant to find."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from adloop.reconcile import Malformed, Observed, observe, reconcile
from streams.kafka_io import EventProducer, read_all
from streams.schemas import (
    DeadLetter,
    Event,
    Feedback,
    FeedbackItem,
    OrganicAction,
    OrganicFeedbackItem,
)
from streams.settings import KafkaSettings
from tests.streams.test_joiner_helpers import JoinerProcess, click, engage, imp, wait_for

W = 600.0


def _req(rid: str, t: float = 0.0) -> dict[str, Any]:
    return {"kind": "request", "request_id": rid, "outcome": "ok", "t": t, "ads": ["a", "b"]}


def _click(rid: str, ad: str, t: float) -> dict[str, Any]:
    return {"kind": "click", "event_id": f"{rid}:click:{ad}", "request_id": rid, "ad_id": ad,
            "t": t}


def _engage(rid: str, item: str, action: str, t: float, dwell_s: float = 0.0,
            n: int = 0) -> dict[str, Any]:
    return {"kind": "organic_engagement", "event_id": f"{rid}:{action}:{item}:{n}",
            "request_id": rid, "item_id": item, "action": action, "dwell_s": dwell_s, "t": t}


Slot = tuple[str, bool, bool, float]   # (item id, viewed, liked, dwell seconds)


def _final(rid: str, clicked: frozenset[str] = frozenset(), revision: int = 1,
           organic: Sequence[Slot] = ()) -> Feedback:
    items = [FeedbackItem(ad_id=a, semantic_id=[i], position=i, score=0.0, bid=1.0,
                          bid_type="cpc", clicked=a in clicked, reward=float(a in clicked))
             for i, a in enumerate(("a", "b"))]
    slots = [OrganicFeedbackItem(item_id=o, semantic_id=[7, i], position=i, score=-1.0,
                                 viewed=v, liked=lk, dwell_s=d)
             for i, (o, v, lk, d) in enumerate(organic)]
    return Feedback(request_id=rid, user_id="u", kind="final", revision=revision,
                    impression_time=0.0, event_time=W, elapsed_s=W, window_closed=True,
                    items=items, organic=slots)


def _dead(topic: str, raw: bytes, offset: int, reason: str = "invalid") -> DeadLetter:
    return DeadLetter.of(source_topic=topic, partition=0, offset=offset, reason=reason,  # type: ignore[arg-type]
                         detail="", raw=raw)


def _observed(finals: list[Feedback], dead: Sequence[DeadLetter] = ()) -> Observed:
    obs = Observed()
    for i, fb in enumerate(finals):
        obs.add_feedback(0, i, fb)
    for d in dead:
        obs.add_dead_letter(d)
    return obs


def test_a_clean_run_accounts_for_every_event() -> None:
    ledger = [_req("r1"), _click("r1", "a", 5.0), _req("r2")]
    obs = _observed([_final("r1", frozenset({"a"})), _final("r2")])
    row = reconcile(ledger, obs, {"r1": "p", "r2": "p"}, ["p"], W)["p"]
    assert (row.events_in, row.accounted, row.lost, row.doubled, row.wrong) == (3, 3, 0, 0, 0)


def test_a_missing_final_is_lost_with_its_clicks_and_a_second_final_is_doubled() -> None:
    ledger = [_req("r1"), _click("r1", "a", 5.0), _req("r2")]
    obs = _observed([_final("r2"), _final("r2", revision=2)])
    row = reconcile(ledger, obs, {"r1": "p", "r2": "p"}, ["p"], W)["p"]
    assert row.lost == 2 and row.doubled == 1 and row.accounted == 1
    assert row.detail["lost_requests"] == ["r1"]


def test_a_final_that_misses_a_click_is_wrong() -> None:
    ledger = [_req("r1"), _click("r1", "b", 5.0)]
    row = reconcile(ledger, _observed([_final("r1")]), {"r1": "p"}, ["p"], W)["p"]
    assert row.wrong == 1


def test_a_late_click_must_be_dead_lettered_to_count() -> None:
    late = _click("r1", "a", W + 50)
    ledger = [_req("r1"), late]
    row = reconcile(ledger, _observed([_final("r1")]), {"r1": "p"}, ["p"], W)["p"]
    assert row.lost == 1 and row.detail["lost_events"] == [late["event_id"]]
    raw = b'{"event_id":"' + late["event_id"].encode() + b'"}'
    row = reconcile(ledger, _observed([_final("r1")], [_dead("clicks", raw, 7, "late")]),
                    {"r1": "p"}, ["p"], W)["p"]
    assert (row.lost, row.dead_lettered, row.accounted) == (0, 1, 2)
    assert row.late_inside_window == 0


def test_an_event_dead_lettered_late_inside_its_window_is_flagged() -> None:
    click = _click("r1", "a", 30.0)
    raw = b'{"event_id":"' + click["event_id"].encode() + b'"}'
    row = reconcile([_req("r1"), click], _observed([_final("r1")], [_dead("clicks", raw, 1,
                                                                          "late")]),
                    {"r1": "p"}, ["p"], W)["p"]
    assert row.lost == 0 and row.late_inside_window == 1


def test_dead_letters_name_their_source_physically_and_are_matched_logically() -> None:
    obs = Observed()
    obs.add_dead_letter(_dead("run7.clicks", b"not json 1", 3), prefix="run7.")
    row = reconcile([], obs, {}, ["p"], W, [Malformed("p", "clicks", b"not json 1")])["p"]
    assert (row.dead_lettered, row.lost) == (1, 0)


def test_malformed_records_count_only_when_they_are_in_the_dlq() -> None:
    bad = [Malformed("p", "clicks", b"not json 1"), Malformed("p", "ads", b"not json 2")]
    obs = _observed([], [_dead("clicks", b"not json 1", 3), _dead("clicks", b"not json 1", 3)])
    row = reconcile([], obs, {}, ["p"], W, bad)["p"]
    assert (row.events_in, row.dead_lettered, row.lost) == (2, 1, 1)
    assert row.detail["malformed_not_dead_lettered"] == ["ads"]


def test_a_feedback_offset_trained_twice_is_doubled_and_a_gap_is_untrained() -> None:
    obs = _observed([_final("r1"), _final("r2")])
    obs.trained[(0, 0)] = 2              # r1's final trained twice
    obs.learner_positions = {0: 2}       # r2's final (offset 1) below the checkpoint, untrained
    rows = reconcile([_req("r1"), _req("r2")], obs, {"r1": "a", "r2": "b"}, ["a", "b"], W)
    assert rows["a"].doubled == 1 and rows["a"].untrained == 0
    assert rows["b"].untrained == 1 and rows["b"].doubled == 0


def test_requests_outside_the_phases_are_not_accounted() -> None:
    row = reconcile([_req("warmup")], _observed([]), {}, ["p"], W)["p"]
    assert row.events_in == 0 and row.lost == 0


def test_dead_letters_of_any_bytes_never_break_the_ledger_lookups() -> None:
    obs = Observed()
    raws = [b'"\x80"', b"[" * 100_000, b'{"event_id":"e1"}', b"\xff"]
    for i, raw in enumerate(raws):
        obs.add_dead_letter(DeadLetter.of(source_topic="clicks", partition=0, offset=i,
                                          reason="not_json", detail="x", raw=raw))
    obs.add_dead_letter(DeadLetter(source_topic="clicks", partition=0, offset=9,
                                   reason="not_json", detail="x", raw_b64="!!not base64",
                                   failed_time=0.0))
    assert obs.dead_by("event_id") == {"e1": "not_json"}
    assert len(obs.dead_raw()) == len(raws)


MIXED = [_req("r1"), _engage("r1", "cooking#0", "view", 3.0),
         _engage("r1", "cooking#0", "dwell", 9.0, dwell_s=1.5),
         _engage("r1", "cooking#0", "dwell", 20.0, dwell_s=2.25, n=1),
         _engage("r1", "travel#3", "like", 30.0)]
"""A mixed feed: two dwells and a view on one item, a like on the other."""
RIGHT: list[Slot] = [("cooking#0", True, False, 3.75), ("travel#3", False, True, 0.0)]


def test_every_organic_engagement_of_a_mixed_feed_is_accounted_in_its_final() -> None:
    row = reconcile(MIXED, _observed([_final("r1", organic=RIGHT)]), {"r1": "p"}, ["p"],
                    W)["p"]
    assert (row.events_in, row.accounted, row.lost, row.doubled, row.wrong) == (5, 5, 0, 0, 0)
    assert row.organic_engagements == 4


def test_an_organic_engagement_counted_twice_is_doubled_and_one_missing_is_wrong() -> None:
    twice: list[Slot] = [("cooking#0", True, False, 5.25), RIGHT[1]]   # a dwell again
    row = reconcile(MIXED, _observed([_final("r1", organic=twice)]), {"r1": "p"}, ["p"],
                    W)["p"]
    assert row.doubled == 1 and row.wrong == 0
    assert row.detail["organic_doubled"] == [["r1", "cooking#0"]]
    for missing in ([("cooking#0", False, False, 3.75), RIGHT[1]],      # the view
                    [RIGHT[0], ("travel#3", False, False, 0.0)],        # the like
                    [("cooking#0", True, False, 1.5), RIGHT[1]]):       # one dwell
        row = reconcile(MIXED, _observed([_final("r1", organic=missing)]), {"r1": "p"},
                        ["p"], W)["p"]
        assert row.wrong == 1 and row.doubled == 0, missing
        assert row.detail["wrong_organic"] == ["r1"]


def test_organic_engagements_of_a_lost_or_doubled_final_are_lost_or_doubled() -> None:
    row = reconcile(MIXED, _observed([]), {"r1": "p"}, ["p"], W)["p"]
    assert row.lost == 5 and row.accounted == 0
    two = [_final("r1", organic=RIGHT), _final("r1", revision=2, organic=RIGHT)]
    row = reconcile(MIXED, _observed(two), {"r1": "p"}, ["p"], W)["p"]
    assert row.doubled == 1 and row.lost == 0


def test_an_organic_engagement_outside_the_feed_or_window_must_be_dead_lettered() -> None:
    stray = _engage("r1", "news#9", "view", 5.0)                # an item the feed lacked
    late = _engage("r1", "travel#3", "view", W + 50)
    ledger = [*MIXED, stray, late]
    obs = _observed([_final("r1", organic=RIGHT)])
    row = reconcile(ledger, obs, {"r1": "p"}, ["p"], W)["p"]
    assert row.lost == 2 and row.detail["lost_events"] == [stray["event_id"],
                                                           late["event_id"]]
    dead = [_dead("organic-engagements", b'{"event_id":"' + e["event_id"].encode() + b'"}',
                  i, reason) for i, (e, reason) in enumerate(((stray, "orphan"),
                                                              (late, "late")))]
    row = reconcile(ledger, _observed([_final("r1", organic=RIGHT)], dead), {"r1": "p"},
                    ["p"], W)["p"]
    assert (row.lost, row.dead_lettered, row.accounted, row.wrong) == (0, 2, 7, 0)


def _mixed_traffic(n: int, users: int) -> tuple[list[tuple[float, str, Event]],
                                                list[dict[str, Any]]]:
    """Event-time ordered records to produce (a duplicate of some engagements among them)
    and the ledger of what happened (each event once)."""
    evs: list[tuple[float, str, Event]] = []
    ledger: list[dict[str, Any]] = []

    def happen(t: float, topic: str, rec: Any, entry: dict[str, Any]) -> None:
        evs.append((t, topic, rec))
        ledger.append(entry)

    for i in range(n):
        t, rid, u = float(i), f"r{i}", f"u{i % users}"
        mixed = i % 2 == 0
        evs.append((t, "impressions", imp(rid, t, u, organic=mixed)))
        ledger.append({"kind": "request", "request_id": rid, "outcome": "ok", "t": t})
        if i % 3 == 0:
            happen(t + 1, "clicks", click(f"c{i}", rid, t + 1, user=u),
                   {"kind": "click", "event_id": f"c{i}", "request_id": rid, "ad_id": "a0",
                    "t": t + 1})
        if not mixed:
            continue
        actions: list[tuple[str, int, OrganicAction, str, float]] = [
            (f"o{i}v", 1, "view", "cooking#0", 0.0),
            (f"o{i}d", 3, "dwell", "cooking#0", 1.5),
            (f"o{i}e", 9, "dwell", "cooking#0", 2.25),
            (f"o{i}l", 8, "like", "travel#3", 0.0),
            (f"o{i}x", 4, "view", "news#9", 0.0)]
        for eid, dt, action, item, dwell in actions:
            if (action == "like" and i % 6) or (item == "news#9" and i % 10):
                continue        # a like now and then; a stray item (orphan) now and then
            rec = engage(eid, rid, t + dt, action, item=item, dwell_s=dwell, user=u)
            happen(t + dt, "organic-engagements", rec,
                   {"kind": "organic_engagement", "event_id": eid, "request_id": rid,
                    "item_id": item, "action": action, "dwell_s": dwell, "t": t + dt})
            if i % 8 == 0 and action != "like":   # delivered twice (same event id)
                evs.append((t + dt + 1, "organic-engagements", rec))
    evs.sort(key=lambda e: e[0])
    # time moves on for every user: closes every window
    evs += [(1e6, "impressions", imp(f"end{u}", 1e6, f"u{u}")) for u in range(users)]
    return evs, ledger


def test_an_event_in_its_final_and_dead_lettered_again_is_accounted_once() -> None:
    """After a kill -9 the joiner re-reads events that a final emitted after its last
    commit already counted and dead-letters them on top (``late`` flagged as
    ``late_inside_window``): each is accounted once; a final counting more than the
    events is still doubled."""
    ledger = [*MIXED, _click("r1", "a", 5.0)]
    again = [_dead("organic-engagements", b'{"event_id":"' + ledger[i]["event_id"].encode()
                   + b'"}', i, "late") for i in (1, 2)]             # the view, a dwell
    again.append(_dead("organic-engagements", b'{"event_id":"' + ledger[4]["event_id"].encode()
                       + b'"}', 4, "orphan"))                           # the like
    again.append(_dead("clicks", b'{"event_id":"r1:click:a"}', 9, "late"))
    final = _final("r1", frozenset({"a"}), organic=RIGHT)
    row = reconcile(ledger, _observed([final], again), {"r1": "p"}, ["p"], W)["p"]
    assert (row.events_in, row.accounted, row.lost, row.doubled, row.wrong) == (6, 6, 0, 0, 0)
    assert row.dead_lettered == 4 and row.late_inside_window == 3
    without = _final("r1", organic=[("cooking#0", False, False, 2.25),   # none of the four
                                    ("travel#3", False, False, 0.0)])    # counted: also fine
    row = reconcile(ledger, _observed([without], again), {"r1": "p"}, ["p"], W)["p"]
    assert (row.lost, row.doubled, row.wrong) == (0, 0, 0)
    twice = _final("r1", frozenset({"a"}), organic=[("cooking#0", True, False, 5.25),
                                                   RIGHT[1]])
    row = reconcile(ledger, _observed([twice], again), {"r1": "p"}, ["p"], W)["p"]
    assert row.doubled == 1


def _more_than(k: int) -> Callable[[list[Any]], bool]:
    return lambda recs: len(recs) > k


def test_organic_engagements_are_accounted_exactly_once_across_joiner_kill9(
        kafka: KafkaSettings, tmp_path: Path) -> None:
    """The real joiner, killed with ``kill -9`` twice while it joins mixed feeds (a
    duplicate delivery of some engagements, orphans among them): the checker finds every
    engagement in exactly one final's organic part or in ``dlq``, none lost or doubled."""
    n = 600
    evs, ledger = _mixed_traffic(n, users=20)
    settings = {"observation_window_s": 5, "attribution_window_s": 20, "out_of_orderness_s": 200,
                "orphan_grace_s": 30, "dedup_retention_s": 30, "emit_every_s": 1}
    log = tmp_path / "join.log"
    producer = EventProducer(kafka)
    joiner = JoinerProcess(kafka, log, **settings).start()
    chunks = 6
    size = len(evs) // chunks + 1
    try:
        for c in range(chunks):
            # counted before the chunk goes out: the joiner may write every list the chunk
            # closes before a count taken afterwards would finish reading
            before = len(read_all(kafka, "feedback")) if c in (2, 4) else 0
            for _t, topic, rec in evs[c * size:(c + 1) * size]:
                producer.send(topic, rec)
            producer.flush()
            if c in (2, 4):   # once it has written lists of this chunk, kill it mid-way
                wait_for(kafka, "feedback", _more_than(before), timeout_s=60, proc=joiner)
                joiner.kill9()
                joiner = JoinerProcess(kafka, log, **settings).start()
        wait_for(kafka, "feedback", lambda fbs: sum(f.kind == "final" for f in fbs) >= n,
                 timeout_s=120, proc=joiner)
        orphans = sum(e.get("item_id") == "news#9" for e in ledger)
        wait_for(kafka, "dlq", lambda ds: len({(d.partition, d.offset) for d in ds})
                 >= orphans, timeout_s=60, proc=joiner)
        assert joiner.stop() == 0   # drained: whatever it would double is written now
    finally:
        joiner.stop()
        producer.close()
    obs = observe(read_all(kafka, "impressions"), read_all(kafka, "feedback"),
                  read_all(kafka, "dlq"), kafka.topic_prefix)
    row = reconcile(ledger, obs, {f"r{i}": "kill_joiner" for i in range(n)},
                    ["kill_joiner"], 20.0)["kill_joiner"]
    engagements = sum(e["kind"] == "organic_engagement" for e in ledger)
    assert row.events_in == len(ledger) and row.organic_engagements == engagements
    assert engagements >= 3 * (n // 2)
    assert (row.lost, row.doubled, row.wrong) == (0, 0, 0), row
    assert row.accounted == row.events_in
    assert row.dead_lettered >= orphans > 0
    assert {d.reason for d in obs.dead.values()} <= {"orphan", "late"}
    assert log.read_text().count("join.partition_loaded") >= 8   # three runs did work
