"""The ledger checker finds every kind of loss and duplication it is meant to find."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from adloop.reconcile import Malformed, Observed, reconcile
from streams.schemas import DeadLetter, Feedback, FeedbackItem, OrganicFeedbackItem

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
