"""``adloop join``: impressions ⋈ clicks ⋈ conversions → ``feedback``, exactly-once in effect.

The join semantics (windows, watermark, rewards, dedup) are in :mod:`streams.joiner_core`.
This module is the Kafka side, on kafka-python: one consumer in group
``<prefix><app_id>`` subscribed to the three co-partitioned input topics with the range
assignor (so partition ``p`` of every input goes to the same instance), one idempotent
producer for ``feedback``, ``dlq`` and the state changelog
``<prefix><app_id>-requests-changelog`` (compacted, partition ``p`` holds the state of
input partition ``p``; key = request id, tombstones when a request expires).

Why not faust: the first version ran on faust-streaming 0.15.3 (one agent over the three
topics, a table with changelog). Its kill -9 test lost impressions (no state, no output,
no dead letter, offsets committed) in about half the runs, and its producer-buffer flush
returns before the buffer is drained. See ``streams/README.md`` ("joiner").

Commit protocol (:meth:`Joiner.commit`), one block per step, every ``commit_interval_s``
or ``commit_every_records`` and before partitions are given up:

1. flush the producer: every feedback list and dead letter handed over so far is
   acknowledged (``FeedbackNotAckedError`` otherwise: nothing below happens);
2. per partition, record the newest acknowledged feedback offset in the state;
3. produce the changed state keys (and tombstones) to the changelog and flush
   (``ChangelogNotAckedError``);
4. commit the consumer positions (``OffsetCommitFailedError``);
5. invariant: committed offsets only increase.

A crash anywhere re-delivers the records after the last commit onto the state of the
last commit. Lists emitted after that commit were acknowledged (step 1) but their marks
may be missing: on restart the joiner reads ``feedback`` after the recorded offset and
marks them (``JoinCore.reconcile``), so no (request id, revision) is emitted twice, and
re-delivered clicks/conversions are recognised by event id.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator, MutableMapping
from typing import Any

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import KafkaAdminClient, NewTopic
from kafka.consumer.subscription_state import ConsumerRebalanceListener
from kafka.coordinator.assignors.range import RangePartitionAssignor
from kafka.errors import TopicAlreadyExistsError
from kafka.structs import OffsetAndMetadata

from streams.joiner_core import INPUT_TOPICS, JoinCore, JoinSettings, Rejected
from streams.kafka_io import DEAD_LETTERS, producer_config
from streams.logs import get_logger
from streams.metrics import counter, gauge, histogram, start_metrics_server
from streams.schemas import DeadLetter, DecodeFailure, Feedback, decode, encode
from streams.settings import KafkaSettings, add_settings_arguments, settings_from_args
from streams.topics import EVENT_PARTITIONS, Topics

log = get_logger(__name__)

__all__ = ["JoinSettings", "Joiner", "configure", "run"]

FEEDBACK = counter("adloop_join_feedback_total", "Feedback lists emitted, by kind.", ("kind",))
CORRECTIONS = counter("adloop_join_corrections_total", "Correction lists emitted.")
EVENTS = counter("adloop_join_events_total", "Input records processed, by topic and outcome "
                 "(applied, held, duplicate, late, orphan, invalid).", ("topic", "outcome"))
LATE = counter("adloop_join_late_total", "Records dead-lettered as late, by topic.", ("topic",))
ORPHANS = counter("adloop_join_orphan_total", "Records dead-lettered as orphan, by topic.",
                  ("topic",))
RECONCILED = counter("adloop_join_reconciled_total",
                     "Feedback lists found on the output whose state mark was lost (restart).")
COMMITS = counter("adloop_join_commits_total", "Completed commit protocols.")
TABLE_REQUESTS = gauge("adloop_join_table_requests", "Request ids held in the join state.")
TABLE_BYTES = gauge("adloop_join_table_bytes", "Encoded size of the join state.")
RSS = gauge("adloop_join_process_resident_memory_bytes", "Resident memory of the joiner.")
LAG = gauge("adloop_join_lag_records", "Unread records per input topic and partition.",
            ("topic", "partition"))
WATERMARK = gauge("adloop_join_watermark_seconds", "Event-time watermark per partition.",
                  ("partition",))
ELAPSED = histogram("adloop_join_elapsed_seconds",
                    "Event time from impression to emission, by kind.", ("kind",),
                    buckets=(1, 10, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 21600, 86400))


class FeedbackNotAckedError(RuntimeError):
    """Step 1 failed: a feedback list or dead letter was not acknowledged."""


class ChangelogNotAckedError(RuntimeError):
    """Step 3 failed: the state changelog was not acknowledged."""


class OffsetCommitFailedError(RuntimeError):
    """Step 4 failed: the consumer offsets were not committed."""


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


class ChangelogStore(MutableMapping[bytes, bytes]):
    """The join state: a dict that remembers which keys changed, per partition.

    Writes belong to ``current`` (the partition being processed); :meth:`take_dirty`
    hands the changes to the commit protocol.
    """

    def __init__(self) -> None:
        self.data: dict[bytes, bytes] = {}
        self.owner: dict[bytes, int] = {}
        self.dirty: dict[bytes, tuple[int, bytes | None]] = {}
        self.current = -1
        self.nbytes = 0

    def __getitem__(self, key: bytes) -> bytes:
        return self.data[key]

    def __setitem__(self, key: bytes, value: bytes) -> None:
        old = self.data.get(key)
        self.nbytes += len(value) - (len(old) if old is not None else 0)
        self.data[key] = value
        self.owner[key] = self.current
        self.dirty[key] = (self.current, value)

    def __delitem__(self, key: bytes) -> None:
        self.nbytes -= len(self.data.pop(key))
        self.dirty[key] = (self.owner.pop(key), None)

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.data)

    def __len__(self) -> int:
        return len(self.data)

    def restore(self, partition: int, key: bytes, value: bytes | None) -> None:
        """Apply one changelog record (no dirty tracking)."""
        old = self.data.pop(key, None)
        if old is not None:
            self.nbytes -= len(old)
            self.owner.pop(key, None)
        if value is not None:
            self.data[key] = value
            self.owner[key] = partition
            self.nbytes += len(value)

    def evict(self, partition: int) -> None:
        for k in [k for k, p in self.owner.items() if p == partition]:
            self.nbytes -= len(self.data.pop(k))
            del self.owner[k]
        self.dirty = {k: v for k, v in self.dirty.items() if v[0] != partition}

    def take_dirty(self) -> dict[bytes, tuple[int, bytes | None]]:
        out, self.dirty = self.dirty, {}
        return out


class Joiner:
    """The consumer loop and commit protocol around a :class:`JoinCore`."""

    def __init__(self, settings: JoinSettings, kafka: KafkaSettings) -> None:
        self.s = settings
        self.kafka = kafka
        self.topics = Topics(kafka.topic_prefix)
        self.group = kafka.topic_prefix + settings.app_id
        self.changelog = f"{self.group}-requests-changelog"
        self.store = ChangelogStore()
        self.core = JoinCore(settings, self.store)
        self.producer = KafkaProducer(**producer_config(kafka, client_id=f"{self.group}-out"))
        self.consumer = KafkaConsumer(
            bootstrap_servers=kafka.bootstrap_servers, client_id=f"{self.group}-in",
            group_id=self.group, enable_auto_commit=False, auto_offset_reset="earliest",
            isolation_level="read_committed", max_poll_records=2000, fetch_max_wait_ms=100,
            partition_assignment_strategy=[RangePartitionAssignor],
            session_timeout_ms=int(settings.session_timeout_s * 1000),
            heartbeat_interval_ms=int(settings.session_timeout_s * 1000 / 3),
            max_poll_interval_ms=300_000)
        self.positions: dict[tuple[str, int], int] = {}
        self.committed: dict[TopicPartition, int] = {}
        self.fb_offsets: dict[int, int] = {}
        self.pending: list[tuple[int, Any]] = []
        self.since_commit = 0
        self.processed = 0
        self.ready = False
        self.stop_event = threading.Event()
        self.to_load: set[int] = set()

    # -- setup -----------------------------------------------------------------------------
    def ensure_changelog(self) -> None:
        admin = KafkaAdminClient(bootstrap_servers=self.kafka.bootstrap_servers,
                                 client_id=f"{self.group}-admin")
        try:
            if self.changelog not in set(admin.list_topics()):
                with contextlib.suppress(TopicAlreadyExistsError):  # a peer created it
                    admin.create_topics([NewTopic(
                        self.changelog, EVENT_PARTITIONS, 1,
                        topic_configs={"cleanup.policy": "compact",
                                       "max.message.bytes": str(4 * 1024 * 1024)})])
        finally:
            admin.close()

    def _listener(self) -> ConsumerRebalanceListener:
        joiner = self

        class Listener(ConsumerRebalanceListener):
            def on_partitions_revoked(self, revoked: Any) -> None:
                joiner.on_revoked({tp.partition for tp in revoked})

            def on_partitions_assigned(self, assigned: Any) -> None:
                joiner.on_assigned({tp.partition for tp in assigned})

        return Listener()

    def on_revoked(self, partitions: set[int]) -> None:
        """Commit what was done, then forget the partitions' state.

        Runs on kafka-python's IO thread, which must not block on this consumer: steps 1-3
        use the producer; the offsets go out with ``commit_async``. Should that commit be
        lost, the next owner re-reads records whose effects are already in the changelog,
        which the event-id and request-state dedup absorb.
        """
        self.to_load -= partitions
        if not partitions:
            return
        self.commit(in_callback=True)
        for p in partitions:
            self.core.forget_partition(p)
            self.store.evict(p)
            for t in INPUT_TOPICS:
                self.positions.pop((t, p), None)
        log.info("join.revoked", partitions=sorted(partitions))

    def on_assigned(self, partitions: set[int]) -> None:
        """Remember the partitions; the loop loads them before it processes their records."""
        self.to_load |= {p for p in partitions if not self.core.loaded(p)}

    def load(self, p: int) -> None:
        """Restore partition ``p``: changelog → state, index, then reconcile with feedback."""
        t0 = time.monotonic()
        c = KafkaConsumer(bootstrap_servers=self.kafka.bootstrap_servers,
                          client_id=f"{self.group}-restore", enable_auto_commit=False,
                          isolation_level="read_committed")
        try:
            restored = 0
            for msg in _read_partition(c, TopicPartition(self.changelog, p), 0):
                self.store.restore(p, msg.key, msg.value)
                restored += 1
            meta = self.core.load_partition(p)
            ftp = TopicPartition(self.topics.feedback, p)
            found: list[tuple[int, Feedback]] = []
            for msg in _read_partition(c, ftp, meta.feedback_offset + 1):
                fb = decode(msg.value, Feedback, 1 << 30)
                if not isinstance(fb, DecodeFailure):
                    found.append((msg.offset, fb))
        finally:
            c.close(autocommit=False)
        self.store.current = p
        n = self.core.reconcile(p, found)
        RECONCILED.inc(n)
        if found:
            self.fb_offsets[p] = max(self.fb_offsets.get(p, -1), found[-1][0])
        # where processing resumes (the consumer's position may already be past records
        # returned by the poll that brought this assignment)
        tps = [TopicPartition(self.topics.name(t), p) for t in INPUT_TOPICS]
        begins = self.consumer.beginning_offsets(tps)
        for t, tp in zip(INPUT_TOPICS, tps, strict=True):
            committed = self.consumer.committed(tp)
            self.positions[(t, p)] = committed if committed is not None else begins[tp]
        log.info("join.partition_loaded", partition=p, changelog_records=restored,
                 watermark=meta.watermark, feedback_offset=meta.feedback_offset,
                 feedback_after_mark=len(found), reconciled=n,
                 seconds=round(time.monotonic() - t0, 3))

    # -- processing ------------------------------------------------------------------------
    def process(self, logical: str, p: int, offset: int, key: bytes | None,
                value: bytes | None) -> None:
        """One input record: apply, dead-letter what it rejected, emit what is due."""
        self.store.current = p
        self.positions[(logical, p)] = offset + 1
        caught = {t: self._caught_up(t, p) for t in INPUT_TOPICS}
        step = self.core.on_record(logical, p, offset, key, value, caught)
        EVENTS.labels(logical, step.outcome).inc()
        for r in step.rejected:
            self._dead_letter(r)
        if step.emissions:
            self._emit(p, step.emissions)
        self.processed += 1
        self.since_commit += 1

    def _caught_up(self, logical: str, p: int) -> bool:
        hw = self.consumer.highwater(TopicPartition(self.topics.name(logical), p))
        pos = self.positions.get((logical, p))
        return hw is not None and pos is not None and pos >= hw

    def _emit(self, p: int, emissions: list[Feedback]) -> None:
        for fb in emissions:
            fut = self.producer.send(self.topics.feedback, key=fb.user_id.encode(),
                                     value=encode(fb), partition=p)
            self.pending.append((p, fut))
            FEEDBACK.labels(fb.kind).inc()
            ELAPSED.labels(fb.kind).observe(fb.elapsed_s)
            if fb.kind == "correction":
                CORRECTIONS.inc()
        self.core.mark_emitted(p, emissions)

    def _dead_letter(self, r: Rejected) -> None:
        letter = DeadLetter.of(source_topic=self.topics.name(r.topic), partition=r.partition,
                               offset=r.offset, reason=r.reason, detail=r.detail, raw=r.raw,
                               key=r.key)
        self.producer.send(self.topics.dlq, key=letter.source_topic.encode(),
                           value=encode(letter))
        DEAD_LETTERS.labels(r.topic, r.reason).inc()
        if r.reason == "late":
            LATE.labels(r.topic).inc()
        elif r.reason == "orphan":
            ORPHANS.labels(r.topic).inc()
        log.info("join.dead_letter", topic=r.topic, partition=r.partition, offset=r.offset,
                 reason=r.reason, detail=r.detail[:200])

    # -- the commit protocol --------------------------------------------------------------
    def commit(self, in_callback: bool = False) -> None:
        """Flush outputs, persist state, commit offsets (steps in the module docstring)."""
        # 1. outputs (feedback, dead letters) acknowledged
        try:
            self.producer.flush(timeout=60)
            for p, fut in self.pending:
                md = fut.get(timeout=0)
                self.fb_offsets[p] = max(self.fb_offsets.get(p, -1), md.offset)
        except Exception as exc:
            raise FeedbackNotAckedError(repr(exc)) from exc
        self.pending.clear()
        # 2. the newest acknowledged feedback offset goes into each partition's state
        for p, off in self.fb_offsets.items():
            if self.core.loaded(p):
                self.store.current = p
                self.core.set_feedback_offset(p, off)
        # 3. changed state to the changelog, acknowledged
        dirty = self.store.take_dirty()
        try:
            for key, (p, value) in dirty.items():
                self.producer.send(self.changelog, key=key, value=value, partition=p)
            self.producer.flush(timeout=60)
        except Exception as exc:
            raise ChangelogNotAckedError(repr(exc)) from exc
        # 4. consumer positions
        offsets: dict[TopicPartition, int] = {}
        for (t, p), pos in self.positions.items():
            if self.core.loaded(p):
                offsets[TopicPartition(self.topics.name(t), p)] = pos
        # 5. invariant: offsets only increase
        for tp, off in offsets.items():
            if off < self.committed.get(tp, -1):
                raise OffsetCommitFailedError(f"{tp} would go back from {self.committed[tp]} "
                                         f"to {off}")
        offsets = {tp: o for tp, o in offsets.items() if o != self.committed.get(tp)}
        if offsets:
            meta = {tp: OffsetAndMetadata(o, "", -1) for tp, o in offsets.items()}
            try:
                if in_callback:
                    self.consumer.commit_async(meta)
                else:
                    self.consumer.commit(meta)
            except Exception as exc:
                raise OffsetCommitFailedError(repr(exc)) from exc
            self.committed.update(offsets)
        self.since_commit = 0
        COMMITS.inc()

    # -- the loop ----------------------------------------------------------------------------
    def run(self) -> None:
        self.ensure_changelog()
        self.consumer.subscribe([self.topics.name(t) for t in INPUT_TOPICS],
                                listener=self._listener())
        last_commit = last_metrics = time.monotonic()
        try:
            while not self.stop_event.is_set():
                batches = self.consumer.poll(timeout_ms=200)
                for p in sorted(self.to_load):
                    self.load(p)
                self.to_load.clear()
                self.ready = bool(self.core.parts)
                for tp, msgs in _interleaved(batches):
                    logical = self.topics.logical(tp.topic)
                    if not self.core.loaded(tp.partition):
                        continue  # revoked inside this poll
                    for m in msgs:
                        self.process(logical, tp.partition, m.offset, m.key, m.value)
                now = time.monotonic()
                if (self.since_commit >= self.s.commit_every_records
                        or now - last_commit >= self.s.commit_interval_s):
                    self.commit()
                    last_commit = now
                if now - last_metrics >= 2.0:
                    self.refresh_metrics()
                    last_metrics = now
            self.commit()
        finally:
            self.consumer.close(autocommit=False)
            self.producer.close(timeout=10)

    def refresh_metrics(self) -> None:
        TABLE_REQUESTS.set(self.core.requests_held())
        TABLE_BYTES.set(self.store.nbytes)
        RSS.set(_rss_bytes())
        for p in list(self.core.parts):
            WATERMARK.labels(str(p)).set(max(self.core.watermark(p), 0.0))
        for (t, p), pos in list(self.positions.items()):
            hw = self.consumer.highwater(TopicPartition(self.topics.name(t), p))
            if hw is not None:
                LAG.labels(t, str(p)).set(max(0, hw - pos))

    def ready_check(self) -> tuple[bool, dict[str, Any]]:
        return self.ready, {"processed": self.processed, "partitions": sorted(self.core.parts)}


def _interleaved(batches: dict[Any, list[Any]], chunk: int = 50) -> Iterator[tuple[Any, list]]:
    """Records of one poll, partitions taken in turns of ``chunk`` records (so one topic
    does not run far ahead of the others in event time); per-partition order is kept."""
    queues = {tp: list(msgs) for tp, msgs in batches.items()}
    while queues:
        for tp in list(queues):
            msgs = queues[tp]
            yield tp, msgs[:chunk]
            if len(msgs) <= chunk:
                del queues[tp]
            else:
                queues[tp] = msgs[chunk:]


def _read_partition(c: KafkaConsumer, tp: TopicPartition, start: int) -> Iterator[Any]:
    """Records of one partition from ``start`` to its current end."""
    c.assign([tp])
    end = c.end_offsets([tp])[tp]
    begin = c.beginning_offsets([tp])[tp]
    start = max(start, begin)
    if start >= end:
        return
    c.seek(tp, start)
    deadline = time.monotonic() + 300
    while c.position(tp) < end:
        if time.monotonic() > deadline:
            raise TimeoutError(f"reading {tp} did not reach offset {end}")
        for msg in c.poll(timeout_ms=500).get(tp, []):
            if msg.offset < end:
                yield msg


# --- CLI ------------------------------------------------------------------------------------

def configure(parser: argparse.ArgumentParser) -> None:
    add_settings_arguments(parser, KafkaSettings)
    add_settings_arguments(parser, JoinSettings)


def run(args: argparse.Namespace) -> int:
    """Run the joiner until SIGTERM/SIGINT; serves /metrics /healthz /readyz."""
    kafka = settings_from_args(KafkaSettings, args)
    settings = settings_from_args(JoinSettings, args)
    joiner = Joiner(settings, kafka)
    server = start_metrics_server(settings.metrics_port, settings.metrics_host,
                                  ready_check=joiner.ready_check)

    def on_signal(signum: int, _frame: object) -> None:
        log.info("join.signal", signal=signal.Signals(signum).name)
        joiner.stop_event.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log.info("join.start", group=joiner.group, metrics=server.url,
             observation_window_s=settings.observation_window_s,
             attribution_window_s=settings.attribution_window_s)
    print(f"metrics {server.url}", flush=True)
    try:
        joiner.run()
    finally:
        server.stop()
    log.info("join.stopped", processed=joiner.processed)
    return 0
