"""The join state machine without Kafka: rewards, windows, dedup, orphans, reconcile."""

from __future__ import annotations

from streams.joiner_core import (
    INPUT_TOPICS,
    JoinCore,
    JoinSettings,
    feedback_items,
    items_signature,
    rewards_and_signature,
)
from streams.schemas import Event, Feedback, encode
from tests.streams.test_joiner_helpers import click, conv, imp, rewards

S = JoinSettings(observation_window_s=10, attribution_window_s=100, out_of_orderness_s=0,
                 orphan_grace_s=50, dedup_retention_s=50, emit_every_s=1)
ALL_CAUGHT_UP = dict.fromkeys(INPUT_TOPICS, True)


class Run:
    def __init__(self, store: dict[bytes, bytes] | None = None) -> None:
        self.store: dict[bytes, bytes] = {} if store is None else store
        self.core = JoinCore(S, self.store)
        self.core.load_partition(0)
        self.out: list[Feedback] = []
        self.dlq: list[tuple[str, str]] = []
        self.offset = 0

    def feed(self, rec: Event, topic: str | None = None) -> None:
        topic = topic or rec.__class__.__name__.lower() + "s"
        self.offset += 1
        step = self.core.on_record(topic, 0, self.offset, b"u1", encode(rec), ALL_CAUGHT_UP)
        self.dlq += [(r.topic, r.reason) for r in step.rejected]
        self.core.mark_emitted(0, step.emissions)
        self.out += step.emissions

    def lists(self) -> list[tuple[str, str, int, list[float]]]:
        return [(f.request_id, f.kind, f.revision, rewards(f)) for f in self.out]


def test_rewards_follow_bid_type_and_windows() -> None:
    r = Run()
    r.feed(imp("r1", 0))
    r.feed(click("c1", "r1", 2))
    r.feed(click("c1", "r1", 2))                  # duplicate: no effect
    r.feed(imp("tick", 15))                        # provisional of r1 (due 10)
    r.feed(conv("v1", "r1", 40, 9.0))              # correction
    r.feed(conv("v1", "r1", 40, 9.0))              # duplicate
    r.feed(conv("v2", "r1", 150, 1.0))             # outside [0, 100]: late
    r.feed(imp("end", 500))                        # closes every window
    assert [x for x in r.lists() if x[0] == "r1"] == [
        ("r1", "provisional", 0, [2.0, 0.0, 1.0]),
        ("r1", "correction", 1, [2.0, 5.0, 1.0]),
        ("r1", "final", 2, [2.0, 5.0, 1.0]),
    ]
    final = next(f for f in r.out if f.request_id == "r1" and f.kind == "final")
    assert final.items[1].conversion_value == 9.0 and final.window_closed
    assert ("conversions", "late") in r.dlq


def test_late_impression_and_orphan_are_dead_lettered() -> None:
    r = Run()
    r.feed(conv("v9", "nope", 5, 1.0))   # held ...
    r.feed(imp("t", 200))                # ... until the grace period (50) passes
    r.feed(imp("old", 10))               # 10 + 100 <= 200: late
    assert sorted(r.dlq) == [("conversions", "orphan"), ("impressions", "late")]


def test_restart_reconciles_lists_whose_marks_were_lost() -> None:
    r = Run()
    r.feed(imp("r1", 0))
    r.feed(imp("tick", 15))
    assert [x[:3] for x in r.lists()] == [("r1", "provisional", 0)]
    emitted = list(r.out)
    # crash: the state (and its mark) never reached the changelog; restart on empty state
    again = Run(store={})
    again.core.reconcile(0, [(0, f) for f in emitted])
    again.feed(imp("r1", 0))             # re-delivered
    again.feed(imp("tick", 15))
    again.feed(imp("end", 500))
    assert [x[:3] for x in again.lists() if x[0] == "r1"] == [("r1", "final", 1)]


def test_second_crash_before_the_redelivered_impression_keeps_the_lost_marks() -> None:
    """Lists found for requests whose state was lost hold the persisted feedback offset
    below them until their impression is re-delivered, so a second crash in between
    finds them again instead of emitting the same revision twice."""
    r = Run()
    r.feed(imp("r1", 0))
    r.feed(imp("tick", 15))
    emitted = [(7 + i, f) for i, f in enumerate(r.out)]   # on feedback at offsets 7, ...
    # first crash: nothing reached the changelog; the restart commits before it re-reads r1
    second = Run(store={})
    second.core.reconcile(0, emitted)
    second.core.set_feedback_offset(0, 20)                # acknowledged output up to 20
    second.core.take_changes()
    assert second.core.parts[0].meta.feedback_offset == 6
    # second crash: restart from what the first restart persisted
    third = Run(store=dict(second.store))
    mark = third.core.parts[0].meta.feedback_offset
    assert mark == 6
    third.core.reconcile(0, [(o, f) for o, f in emitted if o > mark])   # read after it
    third.feed(imp("r1", 0))                             # re-delivered: the mark applies
    third.core.set_feedback_offset(0, 20)
    assert third.core.parts[0].meta.feedback_offset == 20
    third.feed(imp("tick", 15))
    third.feed(imp("end", 500))
    assert [x[:3] for x in third.lists() if x[0] == "r1"] == [("r1", "final", 1)]


def test_signature_is_built_once_in_the_persisted_format() -> None:
    """``emitted_sig`` is stored in the changelog: its format must not change, whichever
    path (no clicks/conversions, clicks, conversions) built it."""
    r = Run()
    r.feed(imp("r1", 0))
    r.feed(click("c1", "r1", 2))
    r.feed(imp("tick", 15))                        # provisional of r1
    r.feed(conv("v1", "r1", 40, 0.1))              # correction of r1, provisional of tick
    r.feed(conv("v2", "r1", 41, 0.2))              # 0.1 + 0.2, rounded to 9 digits
    r1, tick = r.core.get("r1"), r.core.get("tick")
    assert r1 is not None and tick is not None
    assert [x[1:3] for x in r.lists() if x[0] == "r1"] == [
        ("provisional", 0), ("correction", 1), ("correction", 2)]
    assert r1.emitted_sig == "a0:10:0.0;a1:01:0.3;a2:00:0.0"
    assert tick.emitted_sig == "a0:00:0.0;a1:00:0.0;a2:00:0.0"
    for st in (r1, tick):
        items, sig = rewards_and_signature(st)
        assert items == feedback_items(st) and sig == items_signature(items) == st.emitted_sig


def test_click_from_a_clock_far_ahead_does_not_move_the_watermark() -> None:
    """A click stamped far in the future (beyond its request's window) is dead-lettered
    as late, and the watermark stays where the honest events put it: the next click,
    inside its window, is applied, and no list is closed early."""
    r = Run()
    r.feed(imp("r1", 0))
    r.feed(imp("r2", 5))
    r.feed(click("c1", "r1", 0 + 250))             # 2.5 x the window ahead: rejected
    assert r.dlq == [("clicks", "late")]
    assert r.core.watermark(0) == 5.0              # the impressions' time, not 250
    r.feed(click("c2", "r2", 8))                   # inside r2's window: applied
    assert r.dlq == [("clicks", "late")]
    assert [x[1] for x in r.lists()] == []         # nothing due yet at watermark 8
    r.feed(imp("tick", 20))
    assert ("r2", "provisional", 0, [2.0, 0.0, 1.0]) in r.lists()


def test_held_click_does_not_move_the_watermark_until_applied() -> None:
    r = Run()
    r.feed(imp("r1", 0))
    r.feed(click("c9", "r9", 30))                  # r9's impression not seen yet: held
    assert r.core.watermark(0) == 0.0
    r.feed(imp("r9", 29))                          # applies the held click
    assert r.core.watermark(0) == 29.0


def test_end_of_stream_marker_closes_every_window_of_a_finite_log() -> None:
    """Without the marker the last requests never get a final list; the marker (no
    state of its own) moves the watermark past their attribution window, and a later
    log still joins."""
    from streams.joiner_core import END_OF_STREAM_REQUEST_ID, end_of_stream_marker

    r = Run()
    r.feed(imp("r1", 0))
    r.feed(click("c1", "r1", 2))
    r.feed(imp("r2", 40))
    assert [x[:2] for x in r.lists()] == [("r1", "provisional")]
    step = r.core.on_record("impressions", 0, 99, b"", encode(end_of_stream_marker(40.0)),
                            ALL_CAUGHT_UP)
    assert step.outcome == "end_of_stream" and not step.rejected
    r.core.mark_emitted(0, step.emissions)
    r.out += step.emissions
    assert r.core.watermark(0) == 140.0            # 40 + attribution window 100
    assert sorted((f.request_id, f.kind) for f in step.emissions) == [
        ("r1", "final"), ("r2", "final")]
    assert r.core.get(END_OF_STREAM_REQUEST_ID) is None
    r.feed(imp("r3", 150))                         # a later log joins as usual
    assert r.dlq == []


def test_held_click_is_counted_again_when_its_impression_applies_it() -> None:
    r = Run()
    r.feed(click("c9", "r9", 3))                   # held
    step = r.core.on_record("impressions", 0, 50, b"u1", encode(imp("r9", 2)), ALL_CAUGHT_UP)
    assert step.outcome == "applied"
    assert step.released == [("clicks", "applied")]


def test_joiner_carries_each_items_logging_propensity_into_feedback() -> None:
    import msgspec

    r = Run()
    logged = imp("r1", 0)
    logged.slate = [msgspec.structs.replace(it, propensity=0.1 * (i + 1))
                    for i, it in enumerate(logged.slate)]
    r.feed(logged)
    r.feed(click("c1", "r1", 2))
    r.feed(imp("end", 500))
    final = next(f for f in r.out if f.request_id == "r1" and f.kind == "final")
    assert [round(i.propensity or 0, 3) for i in final.items] == [0.1, 0.2, 0.3]
    assert final.items[0].clicked
    r.feed(imp("later", 600))
    assert [i.propensity for i in feedback_items(r.core.get("later"))] == [None] * 3  # type: ignore[arg-type]


def test_joiner_carries_each_items_exposure_into_every_revision() -> None:
    import msgspec

    r = Run()
    logged = imp("r1", 0)
    logged.slate = [msgspec.structs.replace(it, exposure=float(i))
                    for i, it in enumerate(logged.slate)]
    r.feed(logged)
    seen = imp("r2", 1)
    seen.slate = [msgspec.structs.replace(it, exposure=5.0) for it in seen.slate]
    r.feed(seen)
    r.feed(click("c1", "r2", 2))
    r.feed(imp("end", 500))
    final = next(f for f in r.out if f.request_id == "r1" and f.kind == "final")
    assert [i.exposure for i in final.items] == [0.0, 1.0, 2.0]     # no click: all copied
    clicked = next(f for f in r.out if f.request_id == "r2" and f.kind == "final")
    assert [i.exposure for i in clicked.items] == [5.0] * 3 and clicked.items[0].clicked


def test_joiner_copies_the_impressions_final_beams_onto_every_revision() -> None:
    from streams.schemas import BeamCandidate

    beams = [BeamCandidate(ad_id=f"b{j}", semantic_id=[j, 0], logprob=-0.1 * j,
                           expected_value=1.0 / (j + 1), bid=1.0, bid_type="cpc")
             for j in range(6)]
    r = Run()
    logged = imp("r1", 0)
    logged.beams = beams
    r.feed(logged)
    r.feed(imp("tick", 15))                        # provisional of r1
    r.feed(conv("v1", "r1", 40, 9.0))              # correction
    r.feed(imp("end", 500))                        # final
    mine = [f for f in r.out if f.request_id == "r1"]
    assert [f.kind for f in mine] == ["provisional", "correction", "final"]
    assert all(f.beams == beams for f in mine)
    assert all(f.beams == [] for f in r.out if f.request_id == "tick")  # none logged
