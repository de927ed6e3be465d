"""The joiner's persistence path: changed keys written once per commit, tombstones only for
keys that reached the changelog, restore round trip, unreadable state fails loudly; and the
batch producer it writes with (order, acknowledged offsets, dead-letter partitioning)."""

from __future__ import annotations

import pytest
from kafka import KafkaConsumer, TopicPartition

from streams.joiner_core import JoinCore, JoinSettings, StateFormatError, meta_key
from streams.kafka_io import BatchProducer
from streams.schemas import Event, Feedback, encode
from streams.settings import KafkaSettings
from streams.topics import Topics
from tests.streams.test_joiner_helpers import click, imp

S = JoinSettings(observation_window_s=10, attribution_window_s=100, out_of_orderness_s=0,
                 orphan_grace_s=50, dedup_retention_s=50, emit_every_s=1)
CAUGHT_UP = {"impressions": True, "clicks": True, "conversions": True}


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
        while len(values) < 1501:
            for msgs in c.poll(timeout_ms=1000).values():
                values += [m.value for m in msgs]
        assert values[:-1] == [str(i).encode() for i in range(1, 3000, 2)]
        assert values[-1] == b"more"
    finally:
        c.close()
