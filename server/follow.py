"""Following a compacted topic from its beginning without a consumer group.

The server's view of ``ads`` and ``model-updates`` is rebuilt from offset 0 at every
start (assign + seek_to_beginning, nothing committed), then followed. A broker that
is down delays the follower (it retries with backoff up to 5 s, counted in
``adloop_follow_retries_total{topic}``); it never stops the server.

A record that cannot be used never blocks the records after it: one that does not
decode (reason from :func:`streams.schemas.decode`), that the follower's ``check``
refuses (``model-updates``: unsigned, badly signed, unknown key or a snapshot URI outside
the snapshot bases, :mod:`server.trust`), or whose handler raises (``handler_error``)
is counted in ``adloop_server_bad_records_total{topic,reason}``,
skipped, and dead-lettered once per offset: :class:`streams.kafka_io.DeadLetterOnce`
keeps a mark per partition as the committed offset of one consumer group shared by
every replica and the learner, so neither a restart (which re-reads the topic from 0)
nor a second reader dead-letters the same offset again.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from typing import Any

from kafka import KafkaConsumer, TopicPartition

from server.metrics import BAD_RECORDS, FOLLOW_RETRIES
from streams.kafka_io import DeadLetterOnce
from streams.logs import get_logger
from streams.schemas import DecodeFailure, DlqReason, decode
from streams.settings import KafkaSettings
from streams.topics import TOPICS, Topics

log = get_logger(__name__)

BatchHandler = Callable[[list[tuple[bytes | None, Any]]], None]
"""Gets ``(key, record)`` pairs in topic order; ``record`` is None for a tombstone."""
RecordCheck = Callable[[Any], tuple[DlqReason, str] | None]
"""Runs on each decoded record before any handler: None lets it through, (reason,
detail) skips and dead-letters it."""


class TopicFollower:
    """A daemon thread: read ``topic`` from the beginning, then follow it.

    ``handle`` gets each polled batch; ``on_caught_up`` runs once, after the records
    that existed at start were handled (with those records already handled). When
    ``handle`` raises for a batch, its records are handed over one at a time and those
    that still fail are skipped as ``handler_error``. ``dead_letters`` (optional)
    dead-letters what is skipped, once per offset. ``tombstones``: a null value is handed
    to ``handle`` as ``(key, None)`` (a deletion); if False it is skipped as ``invalid``.
    ``check`` (optional) vets each decoded record first: a record it refuses is skipped
    with its reason and never reaches ``handle`` (``model-updates``: the signature and
    snapshot-base check of :class:`server.trust.UpdateGate`).
    """

    def __init__(self, kafka: KafkaSettings, topic: str, handle: BatchHandler,
                 on_caught_up: Callable[[], None] | None = None,
                 poll_timeout_ms: int = 200, name: str | None = None,
                 dead_letters: DeadLetterOnce | None = None,
                 tombstones: bool = True, check: RecordCheck | None = None) -> None:
        self.kafka = kafka
        self.topic = topic
        self.physical = Topics(kafka.topic_prefix).name(topic)
        self.record_type = TOPICS[topic].record
        self.handle = handle
        self.on_caught_up = on_caught_up
        self.poll_timeout_ms = poll_timeout_ms
        self.caught_up = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name or f"follow-{topic}",
                                        daemon=True)
        self.error: str | None = None
        self.dead_letters = dead_letters
        self.tombstones = tombstones
        self.check = check
        self.skipped = 0
        """Records skipped (undecodable or handler_error) since start."""

    def start(self) -> TopicFollower:
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout_s)
        if self.dead_letters is not None:
            self.dead_letters.close()

    def _run(self) -> None:
        backoff = 0.5
        while not self._stop.is_set():
            consumer: KafkaConsumer | None = None
            try:
                consumer = self._open()
                backoff = 0.5
                self._follow(consumer)
            except Exception as exc:  # broker down, topic missing, ...
                self.error = repr(exc)
                FOLLOW_RETRIES.labels(self.topic).inc()
                log.warning("follow.retry", topic=self.topic, error=repr(exc)[:300],
                            retry_in_s=backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)   # a topic created later is found soon
            finally:
                if consumer is not None:
                    with contextlib.suppress(Exception):
                        consumer.close(autocommit=False)

    def _open(self) -> KafkaConsumer:
        consumer = KafkaConsumer(**self.kafka.client_config(),
                                 client_id=f"{self.kafka.client_id}-server-{self.topic}",
                                 group_id=None, enable_auto_commit=False,
                                 isolation_level="read_committed", fetch_max_wait_ms=100,
                                 request_timeout_ms=15_000)
        deadline = time.monotonic() + 10
        parts: set[int] | None = None
        while not parts and time.monotonic() < deadline and not self._stop.is_set():
            parts = consumer.partitions_for_topic(self.physical)
            if not parts:
                time.sleep(0.2)
        if not parts:
            consumer.close(autocommit=False)
            raise RuntimeError(f"topic {self.physical} has no partitions (not created?)")
        tps = [TopicPartition(self.physical, p) for p in sorted(parts)]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        return consumer

    def _skip(self, msg: Any, reason: DlqReason, detail: str) -> None:
        self.skipped += 1
        BAD_RECORDS.labels(self.topic, reason).inc()
        log.warning("follow.bad_record", topic=self.topic, partition=msg.partition,
                    offset=msg.offset, reason=reason, detail=detail[:200])
        if self.dead_letters is not None:
            self.dead_letters.offer(self.topic, msg.partition, msg.offset, reason, detail,
                                    msg.value or b"", msg.key)

    def _refused(self, rec: Any) -> tuple[DlqReason, str] | None:
        if self.check is None:
            return None
        try:
            return self.check(rec)
        except Exception as exc:   # a check that breaks refuses: never let a record by
            return "handler_error", f"{self.topic} record check failed: {exc!r}"

    def _handle(self, batch: list[tuple[bytes | None, Any]], msgs: list[Any]) -> None:
        """Hand ``batch`` over; if that raises, one record at a time, skipping failures."""
        try:
            self.handle(batch)
            return
        except Exception as exc:
            log.warning("follow.batch_failed", topic=self.topic, records=len(batch),
                        error=repr(exc)[:300])
        for item, msg in zip(batch, msgs, strict=True):
            try:
                self.handle([item])
            except Exception as exc:
                self._skip(msg, "handler_error", f"{self.topic} handler failed: {exc!r}")

    def _follow(self, consumer: KafkaConsumer) -> None:
        tps = list(consumer.assignment())
        ends = consumer.end_offsets(tps) if not self.caught_up.is_set() else {}
        while not self._stop.is_set():
            polled = consumer.poll(timeout_ms=self.poll_timeout_ms)
            batch: list[tuple[bytes | None, Any]] = []
            msgs: list[Any] = []
            for _tp, polled_msgs in sorted(polled.items(), key=lambda kv: kv[0].partition):
                for msg in polled_msgs:
                    if msg.value is None and self.tombstones:  # a deletion
                        batch.append((msg.key, None))
                        msgs.append(msg)
                        continue
                    rec = decode(msg.value, self.record_type)
                    if isinstance(rec, DecodeFailure):
                        self._skip(msg, rec.reason, rec.detail)
                        continue
                    refused = self._refused(rec)
                    if refused is not None:
                        self._skip(msg, *refused)
                        continue
                    batch.append((msg.key, rec))
                    msgs.append(msg)
            if batch:
                self._handle(batch, msgs)
            if not self.caught_up.is_set() and all(
                    consumer.position(tp) >= ends.get(tp, 0) for tp in tps):
                if self.on_caught_up is not None:
                    try:
                        self.on_caught_up()
                    except Exception as exc:  # never re-read the topic over it
                        BAD_RECORDS.labels(self.topic, "handler_error").inc()
                        log.error("follow.caught_up_failed", topic=self.topic,
                                  error=repr(exc)[:300])
                self.caught_up.set()
