"""The joiner on the real broker with a hand-built event sequence: every case gives exactly
the expected feedback lists and dead letters, and malformed input does not stop it."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from streams.kafka_io import EventProducer
from streams.schemas import DeadLetter, Feedback
from streams.settings import KafkaSettings
from tests.streams.test_joiner_helpers import (
    JoinerProcess,
    click,
    conv,
    imp,
    rewards,
    wait_for,
)

WINDOWS = {"observation_window_s": 10, "attribution_window_s": 100, "out_of_orderness_s": 0,
           "orphan_grace_s": 50, "dedup_retention_s": 50, "emit_every_s": 1}


def _lists(fbs: list[Feedback]) -> dict[str, list[tuple[str, int, list[float]]]]:
    by: dict[str, list[tuple[str, int, list[float]]]] = defaultdict(list)
    for fb in sorted(fbs, key=lambda f: (f.request_id, f.revision)):
        by[fb.request_id].append((fb.kind, fb.revision, rewards(fb)))
    return dict(by)


def test_joiner_emits_exactly_the_expected_lists(kafka: KafkaSettings, tmp_path: Path) -> None:
    p = EventProducer(kafka)
    # phase A (event time 0..35): impressions, an on-time click, malformed records
    for rec in (imp("r1", 0), click("c1", "r1", 3), imp("r2", 10), imp("r3", 20),
                imp("r4", 30), imp("tick", 35)):
        p.send(rec.__class__.__name__.lower() + "s", rec)
    p.send_bytes("impressions", b"{not json", b"u1")
    p.send_bytes("clicks", b'{"schema": 1, "event_id": "x"}', b"u1")
    p.send_bytes("conversions", b'{"schema": 99, "event_id": "y"}', b"u1")
    p.flush()
    joiner = JoinerProcess(kafka, tmp_path / "join.log", **WINDOWS).start()
    try:
        # provisional lists of r1..r3 are out once the watermark passed 30
        wait_for(kafka, "feedback", lambda fbs: {f.request_id for f in fbs} >= {"r1", "r2", "r3"},
                 proc=joiner)
        # phase B (35..55): a late click (after r2's provisional), a conversion inside the
        # window, duplicates, a click that arrives before its impression, an orphan
        for rec in (click("c2", "r2", 40), conv("v3", "r3", 45, 7.0), imp("r5", 40),
                    click("c5", "r5", 42), click("c5", "r5", 42), conv("v5", "r5", 43, 3.0),
                    conv("v5", "r5", 43, 3.0), click("c6", "r6", 52), imp("r6", 50),
                    conv("v404", "r404", 55, 1.0)):
            p.send(rec.__class__.__name__.lower() + "s", rec)
        p.flush()
        wait_for(kafka, "feedback",
                 lambda fbs: {(f.request_id, f.kind) for f in fbs}
                 >= {("r2", "correction"), ("r3", "correction"), ("r5", "provisional")},
                 proc=joiner)
        # phase C: a conversion outside r4's window [30, 130], then time moves on to 1000
        p.send("conversions", conv("v4", "r4", 200, 9.0))
        p.send("impressions", imp("end", 1000))
        p.flush()
        fbs = wait_for(kafka, "feedback",
                       lambda fbs: sum(f.kind == "final" for f in fbs) >= 7, proc=joiner)
        dlq = wait_for(kafka, "dlq", lambda ls: len(ls) >= 5, proc=joiner)
        assert joiner.alive()
    finally:
        assert joiner.stop() == 0

    z = [0.0, 0.0, 1.0]
    assert _lists(fbs) == {
        "r1": [("provisional", 0, [2.0, 0.0, 1.0]), ("final", 1, [2.0, 0.0, 1.0])],
        "r2": [("provisional", 0, z), ("correction", 1, [2.0, 0.0, 1.0]),
               ("final", 2, [2.0, 0.0, 1.0])],
        "r3": [("provisional", 0, z), ("correction", 1, [0.0, 5.0, 1.0]),
               ("final", 2, [0.0, 5.0, 1.0])],
        "r4": [("provisional", 0, z), ("final", 1, z)],
        "tick": [("provisional", 0, z), ("final", 1, z)],
        "r5": [("provisional", 0, [2.0, 5.0, 1.0]), ("final", 1, [2.0, 5.0, 1.0])],
        # r6's provisional time (60) was never reached before the watermark jumped past
        # its attribution window: the final is the only (and authoritative) list
        "r6": [("final", 0, [2.0, 0.0, 1.0])],
    }
    by = {(f.request_id, f.kind): f for f in fbs}
    assert by[("r3", "final")].items[1].conversion_value == 7.0
    assert by[("r5", "final")].items[1].conversion_value == 3.0  # duplicate not added twice
    for f in fbs:  # elapsed = watermark at emission - impression time
        assert f.elapsed_s == f.event_time - f.impression_time
    assert by[("r3", "correction")].elapsed_s >= 10  # after the observation window
    assert by[("r1", "provisional")].elapsed_s >= 10 and not by[("r1", "provisional")].window_closed
    assert by[("r1", "final")].window_closed and by[("r1", "final")].elapsed_s >= 100
    letters: list[DeadLetter] = dlq
    reasons = sorted((kafka_logical(d.source_topic, kafka), d.reason) for d in letters)
    assert reasons == [("clicks", "invalid"), ("conversions", "late"),
                       ("conversions", "orphan"), ("conversions", "schema_version"),
                       ("impressions", "not_json")]


def kafka_logical(physical: str, kafka: KafkaSettings) -> str:
    return physical[len(kafka.topic_prefix):]
