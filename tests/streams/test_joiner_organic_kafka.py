"""Organic engagements through the joiner on the real broker: a mixed feed's feedback
carries its organic items with what the user did, bad engagements are dead-lettered,
the joined ones are counted by action, and a restart neither loses nor doubles one."""

from __future__ import annotations

import re
import time
import urllib.request
from collections import Counter
from pathlib import Path

import pytest

from streams.joiner import Joiner
from streams.joiner_core import JoinSettings
from streams.kafka_io import EventProducer, read_all
from streams.schemas import DeadLetter, Feedback, encode
from streams.settings import KafkaSettings
from tests.streams.test_joiner_helpers import (
    ORGANIC,
    JoinerProcess,
    engage,
    imp,
    organic,
    topic_of,
    wait_for,
)

WINDOWS = {"observation_window_s": 10, "attribution_window_s": 100, "out_of_orderness_s": 0,
           "orphan_grace_s": 50, "dedup_retention_s": 50, "emit_every_s": 1}


def _metric(proc: JoinerProcess, name: str) -> dict[str, float]:
    """``{labels: value}`` of one metric on the joiner's /metrics."""
    urls = [ln.split()[1] for ln in proc.log_path.read_text().splitlines()
            if ln.startswith("metrics http")]
    with urllib.request.urlopen(urls[-1] + "/metrics", timeout=5) as r:
        body = r.read().decode()
    return {m.group(1): float(m.group(2))
            for m in re.finditer(rf"^{name}\{{(.*)\}} (\S+)$", body, re.MULTILINE)}


def test_joiner_fills_the_organic_items_of_a_mixed_feed(kafka: KafkaSettings,
                                                        tmp_path: Path) -> None:
    p = EventProducer(kafka)
    # phase A (event time 0..15): a mixed feed, a view of its first organic item
    for rec in (imp("r1", 0, organic=True), engage("e1", "r1", 2, "view"), imp("tick", 15)):
        p.send(topic_of(rec), rec)
    p.flush()
    joiner = JoinerProcess(kafka, tmp_path / "join.log", **WINDOWS).start()
    try:
        wait_for(kafka, "feedback", lambda fbs: any(f.request_id == "r1" for f in fbs),
                 proc=joiner)
        # phase B (20..30): a like and a dwell after the provisional list (corrections), a
        # duplicate, an item the feed did not show, bytes that are not an engagement
        for rec in (engage("e2", "r1", 20, "like", item="travel#3"),
                    engage("e3", "r1", 21, "dwell", dwell_s=3.5),
                    engage("e3", "r1", 21, "dwell", dwell_s=3.5),
                    engage("e4", "r1", 22, "view", item="news#1"), imp("tick2", 30)):
            p.send(topic_of(rec), rec)
        p.send_bytes("organic-engagements", b"{not json", b"u1")
        p.flush()
        # phase C: time moves on past every window
        p.send("impressions", imp("end", 1000))
        p.flush()
        fbs: list[Feedback] = wait_for(
            kafka, "feedback", lambda fbs: ("r1", "final") in {(f.request_id, f.kind)
                                                               for f in fbs}, proc=joiner)
        letters: list[DeadLetter] = wait_for(kafka, "dlq", lambda ls: len(ls) >= 2, proc=joiner)
        deadline = time.monotonic() + 30
        while min((counted := _metric(joiner, "adloop_join_organic_engagements_total"))
                  .values(), default=0) < 1 and time.monotonic() < deadline:
            time.sleep(0.5)   # counters are added once per poll: until each action is
        assert joiner.alive()
    finally:
        assert joiner.stop() == 0

    mine = sorted((f for f in fbs if f.request_id == "r1"), key=lambda f: f.revision)
    viewed, liked = ("cooking#0", True, False, 0.0), ("travel#3", False, True, 0.0)
    assert [(f.kind, f.revision, organic(f)) for f in mine] == [
        ("provisional", 0, [viewed, ("travel#3", False, False, 0.0)]),
        ("correction", 1, [viewed, liked]),
        ("correction", 2, [("cooking#0", True, False, 3.5), liked]),
        ("final", 3, [("cooking#0", True, False, 3.5), liked]),
    ]
    for f in mine:
        assert [(o.semantic_id, o.position, o.score) for o in f.organic] == [
            (s.semantic_id, s.position, s.score) for s in ORGANIC]
    assert all(f.organic == [] for f in fbs if f.request_id != "r1")   # ads-only feeds
    got = sorted((d.source_topic[len(kafka.topic_prefix):], d.reason, d.detail) for d in letters)
    assert [g[:2] for g in got] == [("organic-engagements", "not_json"),
                                    ("organic-engagements", "orphan")]
    assert "news#1" in got[1][2] and "r1" in got[1][2]
    assert counted == {'action="view"': 1.0, 'action="like"': 1.0, 'action="dwell"': 1.0}


def _caught_up(j: Joiner, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every input counts as read to its end (records are fed with ``process``)."""
    monkeypatch.setattr(j.consumer, "highwater", lambda _tp: 0)


def test_restart_neither_loses_nor_doubles_an_engagement(
        kafka: KafkaSettings, monkeypatch: pytest.MonkeyPatch) -> None:
    """A correction for a like is acknowledged after the last commit and the joiner dies
    before its mark and its offset are committed: the restart marks it from ``feedback``,
    the re-delivered like changes nothing, a re-delivered view (committed already) is a
    duplicate, and the lists go on from the next revision."""
    settings = JoinSettings(observation_window_s=10, attribution_window_s=100,
                            out_of_orderness_s=0, orphan_grace_s=50, dedup_retention_s=50,
                            emit_every_s=1, app_id="organic-restart")
    first = Joiner(settings, kafka)
    try:
        first.ensure_changelog()
        _caught_up(first, monkeypatch)
        first.load([0])
        first.process("impressions", 0, 0, b"u1", encode(imp("r1", 0, organic=True)))
        first.process("organic-engagements", 0, 0, b"u1", encode(engage("e1", "r1", 1)))
        first.process("impressions", 0, 1, b"u1", encode(imp("tick", 20)))   # provisional
        first.commit()
        first.process("organic-engagements", 0, 1, b"u1",
                      encode(engage("e2", "r1", 21, "like", item="travel#3")))  # correction
        first.producer.flush()                      # acknowledged; then kill -9
    finally:
        first.consumer.close(autocommit=False)
        first.producer.close()

    second = Joiner(settings, kafka)
    try:
        _caught_up(second, monkeypatch)
        second.load([0])
        assert second.positions[("organic-engagements", 0)] == 1
        st = second.core.get("r1")
        assert st is not None and st.revision == 1 and len(st.organic) == 1
        second.process("organic-engagements", 0, 0, b"u1", encode(engage("e1", "r1", 1)))
        second.process("organic-engagements", 0, 1, b"u1",
                       encode(engage("e2", "r1", 21, "like", item="travel#3")))
        second.process("organic-engagements", 0, 2, b"u1",
                       encode(engage("e3", "r1", 22, "dwell", dwell_s=2.0)))  # correction
        second.process("impressions", 0, 2, b"u1", encode(imp("end", 1000)))
        assert second.outcomes[("organic-engagements", "duplicate")] == 1
        second.commit()
    finally:
        second.consumer.close(autocommit=False)
        second.producer.close()

    fbs: list[Feedback] = [r.record for r in read_all(kafka, "feedback")]
    twice = [k for k, n in Counter((f.request_id, f.revision) for f in fbs).items() if n > 1]
    assert not twice
    liked = ("travel#3", False, True, 0.0)
    assert [(f.kind, f.revision, organic(f)) for f in fbs if f.request_id == "r1"] == [
        ("provisional", 0, [("cooking#0", True, False, 0.0), ("travel#3", False, False, 0.0)]),
        ("correction", 1, [("cooking#0", True, False, 0.0), liked]),
        ("correction", 2, [("cooking#0", True, False, 2.0), liked]),
        ("final", 3, [("cooking#0", True, False, 2.0), liked]),
    ]
