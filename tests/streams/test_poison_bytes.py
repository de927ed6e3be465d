"""Poison bytes on the joiner's inputs and on any topic read by ``adloop consume``: the
consumer keeps running, each bad record lands in ``dlq`` with its reason (or, for the
read-only tool, on stderr), and the good records after it are processed."""

from __future__ import annotations

import gc
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path
from typing import Any

from streams.joiner import Joiner
from streams.joiner_core import INPUT_TOPICS, JoinSettings
from streams.kafka_io import DeadLetterOnce, EventProducer, read_all
from streams.schemas import DeadLetter, Feedback, encode
from streams.settings import KafkaSettings
from streams.topics import Topics
from tests.streams.test_joiner_helpers import (
    REPO,
    JoinerProcess,
    click,
    conv,
    engage,
    imp,
    wait_for,
)

WINDOWS = {"observation_window_s": 10, "attribution_window_s": 100, "out_of_orderness_s": 0,
           "orphan_grace_s": 50, "dedup_retention_s": 50, "emit_every_s": 1}
DEEP = b"[" * 100_000
POISON: list[tuple[bytes, bytes | None, str]] = [
    (b"u1", b'"\x80"', "not_json"),                 # the 3 bytes that used to kill the joiner
    (b"u1", b'{"\x80":1}', "not_json"),             # non-UTF-8 object key
    (b"u1", None, "invalid"),                       # tombstone
    (b"\xff\xfe\x80", b"{not json", "not_json"),   # garbage non-UTF-8 key
    (b"u1", DEEP, "not_json"),                      # 100000 nested arrays
    (b"u1", b"\xef\xbb\xbf{}", "not_json"),         # byte-order mark
]


def test_poison_on_every_joiner_input_is_dead_lettered_and_the_join_goes_on(
        kafka: KafkaSettings, tmp_path: Path) -> None:
    p = EventProducer(kafka)
    for topic in INPUT_TOPICS:
        for key, value, _ in POISON:
            p.send_bytes(topic, value, key)  # type: ignore[arg-type]
    # good records after the poison; r2 has a garbage non-UTF-8 key: keys only route
    # records to partitions, the joiner never decodes them
    p.send("impressions", imp("r1", 0, organic=True))
    p.send("clicks", click("c1", "r1", 3))
    p.send("conversions", conv("v1", "r1", 4, 2.5))
    p.send("organic-engagements", engage("o1", "r1", 5, "like"))
    p.send("impressions", imp("tick", 200))
    for rec in (imp("r2", 0), imp("tick2", 200)):
        p.send_bytes("impressions", encode(rec), b"\x80\xff")
    p.flush()
    joiner = JoinerProcess(kafka, tmp_path / "join.log", **WINDOWS).start()
    try:
        fbs = wait_for(kafka, "feedback",
                       lambda fbs: {"r1", "r2"} <= {f.request_id for f in fbs
                                                    if f.kind == "final"}, proc=joiner)
        want = Counter({(t, why): n for t in INPUT_TOPICS
                        for why, n in Counter(why for _, _, why in POISON).items()})
        names = Topics(kafka.topic_prefix)

        def by_reason(letters: list[DeadLetter]) -> Counter[tuple[str, str]]:
            return Counter((names.logical(d.source_topic), d.reason) for d in letters)

        letters = wait_for(kafka, "dlq", lambda ls: by_reason(ls) == want, proc=joiner)
        assert all(d.reason != "late" for d in letters)
        assert joiner.alive()
    finally:
        assert joiner.stop() == 0
    final = next(f for f in fbs if isinstance(f, Feedback) and f.request_id == "r1"
                 and f.kind == "final")
    assert [i.clicked for i in final.items] == [True, False, False]
    assert final.items[1].converted and final.items[1].conversion_value == 2.5
    assert [(o.item_id, o.liked) for o in final.organic] == [("cooking#0", True),
                                                             ("travel#3", False)]
    raws = {d.raw() for d in letters}
    assert {v or b"" for _, v, _ in POISON} <= raws  # the exact bytes are kept
    assert any(d.key_b64 == "//6A" for d in letters)  # b"\xff\xfe\x80", base64


def test_adloop_consume_reports_undecodable_records_and_prints_the_rest(
        kafka: KafkaSettings) -> None:
    p = EventProducer(kafka)
    p.send("clicks", click("c0", "r0", 1))
    for key, value, _ in POISON:
        p.send_bytes("clicks", value, key)  # type: ignore[arg-type]
    p.send("clicks", click("c1", "r0", 2))
    p.flush()
    p.close()
    out = subprocess.run(
        [sys.executable, "-m", "adloop", "consume", "clicks", "--timeout-s", "10",
         "--bootstrap-servers", kafka.bootstrap_servers, "--topic-prefix", kafka.topic_prefix],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    printed = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    assert ['"c0"' in printed[0], '"c1"' in printed[1], len(printed)] == [True, True, 2]
    reported = [ln for ln in out.stderr.splitlines() if ln.startswith("clicks[")]
    assert sorted(ln.split(": ")[1] for ln in reported) == sorted(w for _, _, w in POISON)
    assert f"{len(POISON)} undecodable records skipped" in out.stderr


def test_a_record_that_decodes_but_breaks_the_join_is_dead_lettered_as_handler_error(
        kafka: KafkaSettings) -> None:
    joiner = Joiner(JoinSettings(**WINDOWS, session_timeout_s=6.0, commit_interval_s=0.5),
                    kafka)
    apply_action = joiner.core._on_action

    def breaks_on_boom(part: Any, ev: Any, *args: Any) -> str:  # a fault in the join logic
        if ev.ad_id == "boom":
            raise KeyError("slate position of ad boom")
        return apply_action(part, ev, *args)

    joiner.core._on_action = breaks_on_boom  # type: ignore[method-assign]
    p = EventProducer(kafka)
    for topic, rec in (("impressions", imp("r1", 0)), ("clicks", click("c0", "r1", 1, "boom")),
                       ("clicks", click("c1", "r1", 2)), ("impressions", imp("tick", 200))):
        p.send(topic, rec)
    p.flush()
    p.close()
    thresholds = gc.get_threshold()
    runner = threading.Thread(target=joiner.run, name="joiner")
    runner.start()
    try:
        fbs = wait_for(kafka, "feedback", lambda fbs: any(
            f.request_id == "r1" and f.kind == "final" for f in fbs))
        letters = wait_for(kafka, "dlq", lambda ls: len(ls) >= 1)
        assert runner.is_alive()
    finally:
        joiner.stop_event.set()
        runner.join(60)
        gc.unfreeze()
        gc.set_threshold(*thresholds)
    final = next(f for f in fbs if f.request_id == "r1" and f.kind == "final")
    assert [i.clicked for i in final.items] == [True, False, False]  # c1 after the poison
    assert [(d.reason, "slate position of ad boom" in d.detail) for d in letters] == [
        ("handler_error", True)]
    assert letters[0].raw() == encode(click("c0", "r1", 1, "boom"))


def test_dead_letter_once_sends_each_offset_once_across_readers(kafka: KafkaSettings) -> None:
    a, b = DeadLetterOnce(kafka, "test-once"), DeadLetterOnce(kafka, "test-once")
    try:
        assert a.offer("ads", 0, 3, "not_json", "x", b'"\x80"', b"\xff")
        assert not b.offer("ads", 0, 3, "not_json", "x", b'"\x80"', b"\xff")  # a restart
        assert not b.offer("ads", 0, 1, "not_json", "x", b"{", None)  # below the mark
        assert b.offer("ads", 0, 5, "invalid", "y", b"", b"k")
        assert not a.offer("ads", 0, 5, "invalid", "y", b"", b"k")  # the other reader
    finally:
        a.close()
        b.close()
    letters = [r.record for r in read_all(kafka, "dlq", expect=2)]
    assert [(d.offset, d.reason) for d in letters] == [(3, "not_json"), (5, "invalid")]
