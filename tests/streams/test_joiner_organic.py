"""Organic engagements in the join state machine (no Kafka): joined into every list of
their impression like clicks, deduplicated by event id, a change after the provisional
list is a correction; bad, orphan, late and misdirected engagements are dead-lettered;
state written before organic engagements were joined still restores."""

from __future__ import annotations

import msgspec

from streams.joiner_core import (
    INPUT_TOPICS,
    JoinCore,
    JoinSettings,
    RequestState,
    feedback_signature,
    items_signature,
    rewards_and_signature,
)
from streams.schemas import Event, Feedback, encode
from tests.streams.test_joiner_helpers import (
    ORGANIC,
    click,
    engage,
    imp,
    organic,
    rewards,
    topic_of,
)

S = JoinSettings(observation_window_s=10, attribution_window_s=100, out_of_orderness_s=0,
                 orphan_grace_s=50, dedup_retention_s=50, emit_every_s=1)
CAUGHT_UP = dict.fromkeys(INPUT_TOPICS, True)
NONE = [("cooking#0", False, False, 0.0), ("travel#3", False, False, 0.0)]


class Run:
    def __init__(self, store: dict[bytes, bytes] | None = None) -> None:
        self.store: dict[bytes, bytes] = {} if store is None else store
        self.core = JoinCore(S, self.store)
        self.core.load_partition(0)
        self.out: list[Feedback] = []
        self.dlq: list[tuple[str, str, str]] = []
        self.outcomes: list[str] = []
        self.actions: list[str] = []
        self.offset = 0

    def feed(self, rec: Event) -> None:
        self.feed_bytes(topic_of(rec), encode(rec))

    def feed_bytes(self, topic: str, raw: bytes | None) -> None:
        self.offset += 1
        step = self.core.on_record(topic, 0, self.offset, b"u1", raw, CAUGHT_UP)
        self.dlq += [(r.topic, r.reason, r.detail) for r in step.rejected]
        self.outcomes.append(step.outcome)
        self.actions += step.organic
        self.core.mark_emitted(0, step.emissions)
        self.out += step.emissions

    def lists(self, rid: str) -> list[tuple[str, int, list[tuple[str, bool, bool, float]]]]:
        return [(f.kind, f.revision, organic(f)) for f in self.out if f.request_id == rid]

    def reasons(self) -> list[tuple[str, str]]:
        return [(t, r) for t, r, _d in self.dlq]


def test_engagements_join_into_every_list_and_a_change_is_a_correction() -> None:
    r = Run()
    r.feed(imp("r1", 0, organic=True))
    r.feed(engage("e1", "r1", 1, "view"))
    r.feed(engage("e1", "r1", 1, "view"))                          # duplicate
    r.feed(engage("e2", "r1", 3, "dwell", dwell_s=4.5))
    r.feed(imp("tick", 15))                                        # provisional of r1
    r.feed(engage("e3", "r1", 20, "like", item="travel#3"))        # correction
    r.feed(engage("e4", "r1", 30, "dwell", dwell_s=2.25))          # correction: 4.5 + 2.25
    r.feed(engage("e4", "r1", 30, "dwell", dwell_s=2.25))          # duplicate: nothing
    r.feed(engage("e5", "r1", 31, "view"))                         # viewed already: nothing
    r.feed(imp("end", 500))                                        # final
    seen = ("cooking#0", True, False, 4.5)
    assert r.lists("r1") == [
        ("provisional", 0, [seen, ("travel#3", False, False, 0.0)]),
        ("correction", 1, [seen, ("travel#3", False, True, 0.0)]),
        ("correction", 2, [("cooking#0", True, False, 6.75), ("travel#3", False, True, 0.0)]),
        ("final", 3, [("cooking#0", True, False, 6.75), ("travel#3", False, True, 0.0)]),
    ]
    assert r.outcomes.count("duplicate") == 2 and r.dlq == []
    assert r.actions == ["view", "dwell", "like", "dwell", "view"]   # joined, by action
    for fb in (f for f in r.out if f.request_id == "r1"):
        assert [(o.semantic_id, o.position, o.score) for o in fb.organic] == [
            (s.semantic_id, s.position, s.score) for s in ORGANIC]
        assert rewards(fb) == [0.0, 0.0, 1.0]                        # the ads are untouched
    assert all(f.organic == [] for f in r.out if f.request_id == "tick")  # ads-only feed


def test_clicks_and_engagements_of_one_request_are_kept_apart() -> None:
    """A click and an engagement with the same event id are different events; a click
    after the provisional list changes the rewards but not the organic items."""
    r = Run()
    r.feed(imp("r1", 0, organic=True))
    r.feed(engage("x1", "r1", 1, "like"))
    r.feed(click("x1", "r1", 2))
    r.feed(imp("tick", 15))
    r.feed(click("c2", "r1", 20, ad="a0"))                         # clicked already: no change
    r.feed(imp("end", 500))
    fbs = [f for f in r.out if f.request_id == "r1"]
    assert [(f.kind, rewards(f), organic(f)) for f in fbs] == [
        ("provisional", [2.0, 0.0, 1.0], [("cooking#0", False, True, 0.0), NONE[1]]),
        ("final", [2.0, 0.0, 1.0], [("cooking#0", False, True, 0.0), NONE[1]]),
    ]


def test_an_engagement_with_an_item_not_in_the_feed_is_dead_lettered() -> None:
    """Like a click on an ad not in the slate: reason ``orphan``, the detail names the
    item and the request; the lists are not touched."""
    r = Run()
    r.feed(imp("r1", 0, organic=True))
    r.feed(imp("r2", 1))                                           # ads only
    r.feed(engage("e1", "r1", 2, "like", item="news#404"))
    r.feed(engage("e2", "r2", 2, "view"))
    r.feed(imp("end", 500))
    assert r.reasons() == [("organic-engagements", "orphan")] * 2
    assert "news#404" in r.dlq[0][2] and "r1" in r.dlq[0][2]
    assert "cooking#0" in r.dlq[1][2] and "r2" in r.dlq[1][2]
    assert [x[2] for x in r.lists("r1")] == [NONE]                  # the final only
    assert r.actions == []


def test_orphan_late_and_malformed_engagements_are_dead_lettered() -> None:
    r = Run()
    r.feed(engage("e9", "nope", 5, "view"))                        # held ...
    assert r.outcomes == ["held"]
    r.feed(imp("r1", 10, organic=True))
    r.feed(engage("e1", "r1", 150, "like"))                        # outside [10, 110]: late
    r.feed(imp("t", 200))                                          # ... nope's grace passed
    r.feed(engage("e2", "r1", 105, "view"))                        # after r1's final: late
    r.feed_bytes("organic-engagements", b"{not json")
    r.feed_bytes("organic-engagements", encode(engage("e3", "r1", 20, "like"))
                 .replace(b'"dwell_s":0.0', b'"dwell_s":3.0'))     # dwell_s on a like
    r.feed_bytes("organic-engagements", None)                      # tombstone
    assert r.reasons() == [
        ("organic-engagements", "late"), ("organic-engagements", "orphan"),
        ("organic-engagements", "late"), ("organic-engagements", "not_json"),
        ("organic-engagements", "invalid"), ("organic-engagements", "invalid")]
    assert "dwell_s is only for action 'dwell'" in r.dlq[4][2]
    assert "final already emitted" in r.dlq[2][2]
    assert [x[:2] for x in r.lists("r1")] == [("final", 0)]
    assert r.lists("r1")[0][2] == NONE
    assert r.actions == []


def test_a_held_engagement_is_applied_when_its_impression_arrives() -> None:
    r = Run()
    r.feed(engage("e1", "r1", 3, "dwell", item="travel#3", dwell_s=12.0))
    assert r.core.watermark(0) == float("-inf")                    # held: not seen
    step = r.core.on_record("impressions", 0, 50, b"u1", encode(imp("r1", 2, organic=True)),
                            CAUGHT_UP)
    assert step.outcome == "applied"
    assert step.released == [("organic-engagements", "applied")]
    assert step.organic == ["dwell"]
    r.core.mark_emitted(0, step.emissions)
    r.feed(imp("end", 500))
    assert r.lists("r1") == [("final", 0, [NONE[0], ("travel#3", False, False, 12.0)])]


def test_restore_round_trip_keeps_engagements_and_their_dedup() -> None:
    store: dict[bytes, bytes] = {}
    r = Run(store)
    r.feed(imp("r1", 0, organic=True))
    r.feed(engage("e1", "r1", 1, "view"))
    r.feed(imp("tick", 15))                                        # provisional of r1
    r.feed(engage("e2", "r1", 16, "dwell", dwell_s=1.5))           # correction
    r.core.take_changes()
    again = Run(dict(store))                                       # restart from the changelog
    assert again.core.get("r1") == r.core.get("r1")
    assert again.core.parts[0].dirty == set()                      # no correction was due
    again.feed(engage("e2", "r1", 16, "dwell", dwell_s=1.5))       # re-delivered: duplicate
    again.feed(engage("e1", "r1", 1, "view"))                      # re-delivered: duplicate
    again.feed(imp("end", 500))
    assert again.outcomes[:2] == ["duplicate", "duplicate"]
    assert again.lists("r1") == [
        ("final", 2, [("cooking#0", True, False, 1.5), NONE[1]])]


def _without_organic(state: RequestState) -> bytes:
    """The state as a build before organic engagements wrote it: no ``organic`` in the
    request state, in its impression or its held events."""
    obj = msgspec.to_builtins(state)
    obj.pop("organic")
    if obj["impression"] is not None:
        obj["impression"].pop("organic")
    return msgspec.json.encode(obj)


def test_state_written_before_organic_engagements_restores() -> None:
    r = Run()
    r.feed(imp("r1", 0))
    r.feed(click("c1", "r1", 2))
    r.feed(imp("tick", 15))                                        # provisional of r1
    r.core.take_changes()
    old = {k: (_without_organic(r.core.table[k.decode()]) if k.decode() in r.core.table
               else v) for k, v in r.store.items()}
    assert b'"organic"' not in old[b"r1"] and b'"emitted_sig":"a0:10:0.0;' in old[b"r1"]
    again = Run(old)
    st = again.core.get("r1")
    assert st is not None and st.organic == {} and st.impression is not None
    assert st.impression.organic == [] and st.revision == 0
    assert rewards_and_signature(st)[1] == st.emitted_sig          # old format, same value
    assert again.core.parts[0].dirty == set()                      # no spurious correction
    again.feed(click("c1", "r1", 2))                               # re-delivered: duplicate
    again.feed(imp("end", 500))
    assert [(f.kind, f.revision, rewards(f), f.organic) for f in again.out
            if f.request_id == "r1"] == [("final", 1, [2.0, 0.0, 1.0], [])]


def test_signature_has_an_organic_part_only_for_a_mixed_feed() -> None:
    r = Run()
    r.feed(imp("r1", 0, organic=True))
    r.feed(imp("r2", 0))
    r.feed(imp("r3", 0, organic=True))                             # no engagement
    r.feed(engage("e1", "r1", 1, "view"))
    r.feed(engage("e2", "r1", 2, "like", item="travel#3"))
    r.feed(engage("e3", "r1", 3, "dwell", item="travel#3", dwell_s=0.1))
    r.feed(engage("e4", "r1", 4, "dwell", item="travel#3", dwell_s=0.2))
    r.feed(imp("tick", 15))
    r1, r2, r3 = r.core.get("r1"), r.core.get("r2"), r.core.get("r3")
    assert r1 is not None and r2 is not None and r3 is not None
    assert r1.emitted_sig == ("a0:00:0.0;a1:00:0.0;a2:00:0.0"
                              "|cooking#0:10:0.0;travel#3:01:0.3")
    assert r2.emitted_sig == "a0:00:0.0;a1:00:0.0;a2:00:0.0"
    assert r3.emitted_sig == "a0:00:0.0;a1:00:0.0;a2:00:0.0|cooking#0:00:0.0;travel#3:00:0.0"
    for st in (r1, r2, r3):
        fb = next(f for f in r.out if f.request_id == st.request_id)
        assert feedback_signature(fb) == rewards_and_signature(st)[1] == st.emitted_sig
    assert items_signature(next(f for f in r.out if f.request_id == "r2").items) == \
        r2.emitted_sig


def test_restart_reconciles_lists_with_organic_engagement() -> None:
    """A correction acknowledged but its mark lost (crash): the restart marks it from
    ``feedback``, and the re-delivered engagement then changes nothing, so no list is
    emitted twice and the final counts the like once."""
    r = Run()
    r.feed(imp("r1", 0, organic=True))
    r.feed(imp("tick", 15))                                        # provisional
    r.feed(engage("e1", "r1", 20, "like"))                         # correction
    emitted = [f for f in r.out if f.request_id == "r1"]
    assert [(f.kind, f.revision) for f in emitted] == [("provisional", 0), ("correction", 1)]
    again = Run(store={})                                          # the state was lost
    again.core.reconcile(0, [(i, f) for i, f in enumerate(emitted)])
    again.feed(imp("r1", 0, organic=True))                         # re-delivered
    again.feed(engage("e1", "r1", 20, "like"))                     # same list: nothing
    again.feed(imp("tick", 15))
    again.feed(imp("end", 500))
    assert again.lists("r1") == [("final", 2, [("cooking#0", False, True, 0.0), NONE[1]])]
