"""The joiner's persistence path: changed keys written once per commit, tombstones only for
keys that reached the changelog, restore round trip, unreadable state fails loudly, the
batched restore of an assignment on the broker; and the batch producer it writes with
(order, acknowledged offsets, dead-letter partitioning)."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import pytest
from kafka import KafkaConsumer, TopicPartition

from streams import joiner as joiner_module
from streams.joiner import Joiner
from streams.joiner_core import (
    INPUT_TOPICS,
    JoinCore,
    JoinSettings,
    StateFormatError,
    meta_key,
)
from streams.kafka_io import BatchProducer, read_all
from streams.schemas import Event, Feedback, encode
from streams.settings import KafkaSettings
from streams.topics import Topics
from tests.streams.test_joiner_helpers import click, imp

S = JoinSettings(observation_window_s=10, attribution_window_s=100, out_of_orderness_s=0,
                 orphan_grace_s=50, dedup_retention_s=50, emit_every_s=1)
CAUGHT_UP = dict.fromkeys(INPUT_TOPICS, True)


class Run:
    def __init__(self, store: dict[bytes, bytes]) -> None:
        self.core = JoinCore(S, store)
        self.core.load_partition(0)
        self.offset = 0
        self.out: list[Feedback] = []

    def feed(self, rec: Event, topic: str) -> None:
        self.offset += 1
        step = self.core.on_record(topic, 0, self.offset, b"u1", encode(rec), CAUGHT_UP)
        self.core.mark_emitted(0, step.emissions)
        self.out += step.emissions


def test_changes_are_written_once_and_short_lived_keys_need_no_tombstone() -> None:
    store: dict[bytes, bytes] = {}
    r = Run(store)
    r.feed(imp("r1", 0), "impressions")
    r.feed(click("c1", "r1", 1), "clicks")
    r.feed(imp("tick", 20), "impressions")          # provisional of r1
    changes = r.core.take_changes()
    keys = [k for _p, k, _v in changes]
    assert sorted(keys) == sorted([b"r1", b"tick", meta_key(0)])  # each key once
    assert all(p == 0 for p, _k, _v in changes)
    r.feed(imp("r2", 25), "impressions")             # created and expired between commits
    r.feed(imp("end", 1000), "impressions")          # finals of r1, r2, tick ...
    r.feed(imp("end2", 1001), "impressions")         # ... expired at the next check
    changes = r.core.take_changes()
    by_key = {k: v for _p, k, v in changes}
    assert by_key[b"r1"] is None and by_key[b"tick"] is None   # were persisted: tombstones
    assert b"r2" not in by_key                                   # never persisted: nothing
    assert b"r1" not in store and b"end" in store and b"r2" not in store
    assert [(f.request_id, f.kind) for f in r.out if f.request_id == "r2"] == [
        ("r2", "final")]


def test_restore_round_trip_continues_where_it_stopped() -> None:
    store: dict[bytes, bytes] = {}
    r = Run(store)
    r.feed(imp("r1", 0), "impressions")
    r.feed(imp("tick", 20), "impressions")           # provisional of r1 (revision 0)
    r.core.take_changes()
    again = Run(dict(store))                         # a restart from the changelog
    assert again.core.get("r1") == r.core.get("r1")
    assert again.core.watermark(0) == r.core.watermark(0)
    again.feed(click("c1", "r1", 30), "clicks")      # correction, revision 1
    again.feed(click("c1", "r1", 30), "clicks")      # duplicate
    again.feed(imp("end", 1000), "impressions")
    assert [(f.kind, f.revision) for f in again.out if f.request_id == "r1"] == [
        ("correction", 1), ("final", 2)]


def test_metadata_before_the_first_watermark_restores() -> None:
    store: dict[bytes, bytes] = {}
    r = Run(store)
    r.core.save_meta(0)                              # watermark still -inf: JSON null
    r.core.take_changes()
    assert b'"watermark":null' in store[meta_key(0)]
    again = Run(dict(store))
    assert again.core.watermark(0) == float("-inf")


def test_unreadable_state_fails_clearly() -> None:
    with pytest.raises(StateFormatError, match="not a state record"):
        JoinCore(S, {b"r1": b"\x92\x01\x02"})        # e.g. msgpack from another build
    with pytest.raises(StateFormatError):
        JoinCore(S, {meta_key(0): b'{"watermark": "x"}'})


def test_batch_producer_keeps_order_and_reports_acked_offsets(kafka: KafkaSettings) -> None:
    names = Topics(kafka.topic_prefix)
    p = BatchProducer(kafka, max_batch_bytes=16 * 1024, ship_every=700)
    try:
        for i in range(3000):
            p.send(names.feedback, b"k", str(i).encode(), i % 2)
        p.send(names.dlq, b"some-topic", b"x")      # default partitioner
        acked = p.flush()
        assert acked[(names.feedback, 0)] == 1499 and acked[(names.feedback, 1)] == 1499
        assert acked[(names.dlq, 0)] == 0
        p.send(names.feedback, b"k", b"more", 1)
        assert p.flush() == {(names.feedback, 1): 1500}
        assert p.flush() == {}
    finally:
        p.close()
    c = KafkaConsumer(bootstrap_servers=kafka.bootstrap_servers, enable_auto_commit=False)
    try:
        tp = TopicPartition(names.feedback, 1)
        c.assign([tp])
        c.seek_to_beginning(tp)
        values: list[bytes] = []
        deadline = time.monotonic() + 60
        while len(values) < 1501:
            assert time.monotonic() < deadline, f"read {len(values)} of 1501"
            for msgs in c.poll(timeout_ms=1000).values():
                values += [m.value for m in msgs]
        assert values[:-1] == [str(i).encode() for i in range(1, 3000, 2)]
        assert values[-1] == b"more"
    finally:
        c.close()


def _caught_up(j: Joiner, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every input counts as read to its end (records are fed with ``process``)."""
    monkeypatch.setattr(j.consumer, "highwater", lambda _tp: 0)


def test_assignment_is_restored_in_one_batch(kafka: KafkaSettings,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Four partitions restored by one ``load`` with one restore consumer: each gets its
    own state, watermark, feedback offset and reconciled lists (acknowledged after the
    last commit, marks lost), and the re-delivered records emit nothing twice."""
    settings = S.model_copy(update={"app_id": "restore-batch"})
    parts = range(4)
    first = Joiner(settings, kafka)
    try:
        first.ensure_changelog()
        _caught_up(first, monkeypatch)
        first.load(parts)
        for p in parts:  # committed: a provisional list and the state that marks it
            first.process("impressions", p, 0, b"u", encode(imp(f"a{p}", 0)))
            first.process("clicks", p, 0, b"u", encode(click(f"c{p}", f"a{p}", 1)))
            first.process("impressions", p, 1, b"u", encode(imp(f"t{p}", 20 + p)))
        first.commit()
        for p in parts:  # acknowledged lists of t and b whose marks never reach the changelog
            first.process("impressions", p, 2, b"u", encode(imp(f"b{p}", 25 + p)))
            first.process("impressions", p, 3, b"u", encode(imp(f"w{p}", 40 + p)))
        first.producer.flush()
        committed_state = {rid: first.core.get(rid) for p in parts for rid in (f"a{p}",)}
    finally:
        first.consumer.close(autocommit=False)
        first.producer.close()

    second = Joiner(settings, kafka)
    restore_consumers: list[str] = []
    real_consumer = joiner_module.KafkaConsumer

    def counting_consumer(**kw: Any) -> Any:
        restore_consumers.append(kw["client_id"])
        return real_consumer(**kw)

    monkeypatch.setattr(joiner_module, "KafkaConsumer", counting_consumer)
    try:
        _caught_up(second, monkeypatch)
        second.load(parts)
        assert restore_consumers == [f"{second.group}-restore"]
        assert sorted(second.core.parts) == list(parts)
        for p in parts:
            assert second.core.get(f"a{p}") == committed_state[f"a{p}"]
            assert second.core.watermark(p) == 20 + p     # as committed
            assert second.positions[("impressions", p)] == 2
            assert second.positions[("clicks", p)] == 1
            assert second.fb_offsets[p] == 2               # a's list, then t's and b's
            st = second.core.get(f"t{p}")
            assert st is not None and st.revision == 0     # reconciled from feedback
            assert second.core.get(f"b{p}") is None        # known from feedback only
        for p in parts:  # the records after the commit, re-delivered; then time moves on
            second.process("impressions", p, 2, b"u", encode(imp(f"b{p}", 25 + p)))
            second.process("impressions", p, 3, b"u", encode(imp(f"w{p}", 40 + p)))
            second.process("impressions", p, 4, b"u", encode(imp(f"end{p}", 1000)))
        second.commit()
    finally:
        second.consumer.close(autocommit=False)
        second.producer.close()

    fbs: list[Feedback] = [r.record for r in read_all(kafka, "feedback")]
    twice = [k for k, n in Counter((f.request_id, f.revision) for f in fbs).items() if n > 1]
    assert not twice
    for p in parts:
        assert [(f.kind, f.revision) for f in fbs if f.request_id == f"b{p}"] == [
            ("provisional", 0), ("final", 1)]
        assert [(f.kind, f.revision) for f in fbs if f.request_id == f"a{p}"] == [
            ("provisional", 0), ("final", 1)]
