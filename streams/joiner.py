"""``adloop join``: impressions ⋈ clicks ⋈ conversions ⋈ organic engagements → ``feedback``,
exactly-once in effect.

The join semantics (windows, watermark, rewards, dedup) are in :mod:`streams.joiner_core`.
This module is the Kafka side, on kafka-python: one consumer in group
``<prefix><app_id>`` subscribed to the four co-partitioned input topics
(:data:`streams.joiner_core.INPUT_TOPICS`: impressions, clicks, conversions,
organic-engagements) with the range
assignor (so partition ``p`` of every input goes to the same instance), one idempotent
:class:`streams.kafka_io.BatchProducer` (aiokafka's C record-batch builder on a background
thread, ``acks=all``) for ``feedback``, ``dlq`` and the state changelog
``<prefix><app_id>-requests-changelog`` (compacted, partition ``p`` holds the state of
input partition ``p``; key = request id, tombstones when a request expires).

Why not faust: the first version ran on faust-streaming 0.15.3 (one agent over the three
topics, a table with changelog, at-least-once, concurrency 1). Its kill -9 test lost
impressions (no state, no output, no dead letter, offsets committed) in about half the
runs: its commit awaits ``ProducerBuffer.flush()``, which returns after 0.1 s without
progress even with table changelog writes still queued. See ``streams/README.md``
("Why not faust") for the upstream issues.

Commit protocol (:meth:`Joiner.commit`), one block per step, every ``commit_interval_s``
or ``commit_every_records`` and before partitions are given up:

1. flush the producer: every feedback list and dead letter handed over so far is
   acknowledged (``FeedbackNotAckedError`` otherwise: nothing below happens);
2. per partition, record the newest acknowledged feedback offset in the state;
3. produce the changed state keys (and tombstones), each encoded once however often it
   changed since the last commit, to the changelog and flush (``ChangelogNotAckedError``);
4. commit the consumer positions (``OffsetCommitFailedError``);
5. invariant: committed offsets only increase.

A crash anywhere re-delivers the records after the last commit onto the state of the
last commit. Lists emitted after that commit were acknowledged (step 1) but their marks
may be missing: on restart the joiner reads ``feedback`` after the recorded offset and
marks them (``JoinCore.reconcile``), so no (request id, revision) is emitted twice, and
re-delivered clicks, conversions and organic engagements are recognised by event id.
A list whose request has no state yet waits for the re-delivered impression, and the
recorded feedback offset stays below it until then (a second crash finds it again).

Restore (:meth:`Joiner.load`): the partitions of one assignment are restored together,
before any of their records is processed, with one restore consumer for the batch:

1. read every changelog partition of the batch to its end offset in one pass (records of
   different partitions interleave; each goes to ``JoinCore.restore``);
2. rebuild each partition's deadline index (``JoinCore.load_partitions``);
3. read every feedback partition of the batch in one pass, each after the feedback offset
   its restored metadata records, and reconcile each partition with what it found;
4. each input partition resumes at its committed offset (or its beginning).

A pass that does not reach its end offsets within 300 s raises ``TimeoutError``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import signal
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

from kafka import KafkaConsumer, TopicPartition
from kafka.admin import KafkaAdminClient, NewTopic
from kafka.consumer.subscription_state import ConsumerRebalanceListener
from kafka.coordinator.assignors.range import RangePartitionAssignor
from kafka.errors import TopicAlreadyExistsError
from kafka.structs import OffsetAndMetadata

from streams.joiner_core import INPUT_TOPICS, JoinCore, JoinSettings, Rejected, Step
from streams.kafka_io import DEAD_LETTERS, BatchProducer, wait_for_partitions
from streams.logs import get_logger
from streams.metrics import counter, gauge, histogram, start_metrics_server
from streams.schemas import DeadLetter, DecodeFailure, Feedback, decode, encode
from streams.settings import KafkaSettings, add_settings_arguments, settings_from_args
from streams.topics import EVENT_PARTITIONS, Topics, wait_for_topics

log = get_logger(__name__)

__all__ = ["JoinSettings", "Joiner", "configure", "run"]

FEEDBACK = counter("adloop_join_feedback_total", "Feedback lists emitted, by kind.", ("kind",))
CORRECTIONS = counter("adloop_join_corrections_total", "Correction lists emitted.")
EVENTS = counter("adloop_join_events_total", "Input records processed, by topic and outcome "
                 "(applied, held, duplicate, late, orphan, invalid, handler_error, "
                 "end_of_stream); a held click/conversion/organic engagement is counted "
                 "again with the outcome it gets when its impression arrives.",
                 ("topic", "outcome"))
LATE = counter("adloop_join_late_total", "Records dead-lettered as late, by topic.", ("topic",))
ORPHANS = counter("adloop_join_orphan_total", "Records dead-lettered as orphan, by topic.",
                  ("topic",))
ORGANIC = counter("adloop_join_organic_engagements_total",
                  "Organic engagements joined into their impression's feedback, by action.",
                  ("action",))
RECONCILED = counter("adloop_join_reconciled_total",
                     "Feedback lists found on the output whose state mark was lost (restart).")
COMMITS = counter("adloop_join_commits_total", "Completed commit protocols.")
TABLE_REQUESTS = gauge("adloop_join_table_requests", "Request ids held in the join state.")
TABLE_BYTES = gauge("adloop_join_table_bytes", "Encoded size of the join state.")
RSS = gauge("adloop_join_process_resident_memory_bytes", "Resident memory of the joiner.")
REJOINS = counter("adloop_join_rejoins_total",
                  "Fresh group members after a long stretch with nothing assigned.")
LAG = gauge("adloop_join_lag_records", "Unread records per input topic and partition.",
            ("topic", "partition"))
WATERMARK = gauge("adloop_join_watermark_seconds", "Event-time watermark per partition.",
                  ("partition",))
ELAPSED = histogram("adloop_join_elapsed_seconds",
                    "Event time from impression to emission, by kind.", ("kind",),
                    buckets=(1, 10, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 21600, 86400))


FEEDBACK_BY_KIND = {k: FEEDBACK.labels(k) for k in ("provisional", "correction", "final")}
ORGANIC_BY_ACTION = {a: ORGANIC.labels(a) for a in ("view", "like", "dwell")}
ELAPSED_BY_KIND = {k: ELAPSED.labels(k) for k in ("provisional", "correction", "final")}


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


class Joiner:
    """The consumer loop and commit protocol around a :class:`JoinCore`."""

    def __init__(self, settings: JoinSettings, kafka: KafkaSettings) -> None:
        self.s = settings
        self.kafka = kafka
        self.topics = Topics(kafka.topic_prefix)
        self.group = kafka.topic_prefix + settings.app_id
        self.changelog = f"{self.group}-requests-changelog"
        self.core = JoinCore(settings, None)
        self.producer = BatchProducer(kafka, client_id=f"{self.group}-out",
                                      linger_ms=5, max_batch_bytes=512 * 1024)
        self.consumer = self._new_consumer()
        self.rejoins = 0
        self.tps: dict[tuple[str, int], TopicPartition] = {}
        self.outcomes: dict[tuple[str, str], int] = {}
        """Input records per (topic, outcome) not yet added to ``EVENTS``."""
        self.kinds: dict[str, int] = dict.fromkeys(FEEDBACK_BY_KIND, 0)
        """Feedback lists per kind not yet added to ``FEEDBACK``."""
        self.organic: dict[str, int] = dict.fromkeys(ORGANIC_BY_ACTION, 0)
        """Joined organic engagements per action not yet added to ``ORGANIC``."""
        self.positions: dict[tuple[str, int], int] = {}
        self.committed: dict[TopicPartition, int] = {}
        self.fb_offsets: dict[int, int] = {}
        self.since_commit = 0
        self.processed = 0
        self.ready = False
        self.stop_event = threading.Event()
        self.to_load: set[int] = set()

    # -- setup -----------------------------------------------------------------------------
    def ensure_changelog(self) -> None:
        """Create the changelog if it is missing; return once its partitions have leaders
        (a restore that reads it right after creation finds them)."""
        admin = KafkaAdminClient(**self.kafka.client_config(), client_id=f"{self.group}-admin")
        try:
            if self.changelog not in set(admin.list_topics()):
                with contextlib.suppress(TopicAlreadyExistsError):  # a peer created it
                    admin.create_topics([NewTopic(
                        self.changelog, EVENT_PARTITIONS, 1,
                        topic_configs={"cleanup.policy": "compact",
                                       "max.message.bytes": str(4 * 1024 * 1024)})])
        finally:
            admin.close()
        wait_for_topics(self.kafka.bootstrap_servers, [self.changelog],
                        timeout_s=self.kafka.topic_wait_s,
                        security=self.kafka.security_config())

    def _new_consumer(self) -> KafkaConsumer:
        return KafkaConsumer(
            **self.kafka.client_config(), client_id=f"{self.group}-in",
            group_id=self.group, enable_auto_commit=False, auto_offset_reset="earliest",
            isolation_level="read_committed", max_poll_records=5000, fetch_max_wait_ms=100,
            max_partition_fetch_bytes=4 * 1024 * 1024,
            partition_assignment_strategy=[RangePartitionAssignor],
            session_timeout_ms=int(self.s.session_timeout_s * 1000),
            heartbeat_interval_ms=int(self.s.session_timeout_s * 1000 / 3),
            max_poll_interval_ms=300_000)

    def rejoin(self) -> None:
        """A fresh group member: kafka-python 3.0 can leave a member sitting in its group
        with nothing assigned after an early rebalance (seen on freshly created topics);
        a new consumer joins cleanly. Only called while nothing is assigned, so there is
        no state to hand over."""
        self.rejoins += 1
        REJOINS.inc()
        log.warning("join.rejoin", attempt=self.rejoins, group=self.group)
        with contextlib.suppress(Exception):
            self.consumer.close(autocommit=False)
        self.to_load.clear()
        self.consumer = self._new_consumer()
        inputs = [self.topics.name(t) for t in INPUT_TOPICS]
        self.consumer.subscribe(inputs, listener=self._listener())
        self.wait_for_metadata(inputs)

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
            for t in INPUT_TOPICS:
                self.positions.pop((t, p), None)
        log.info("join.revoked", partitions=sorted(partitions))

    def on_assigned(self, partitions: set[int]) -> None:
        """Remember the partitions; the loop loads them before it processes their records."""
        self.to_load |= {p for p in partitions if not self.core.loaded(p)}

    def load(self, partitions: Iterable[int]) -> None:
        """Restore the partitions of one assignment together (see "Restore" in the module
        docstring): changelog → state, deadline index, reconcile with ``feedback``, and
        where each input partition resumes.

        One restore consumer for the batch reads all its changelog partitions in one pass,
        then all its feedback partitions (each after its recorded offset) in another.
        """
        ps = sorted(set(partitions))
        if not ps:
            return
        t0 = time.monotonic()
        restored = dict.fromkeys(ps, 0)
        found: dict[int, list[tuple[int, Feedback]]] = {p: [] for p in ps}
        # a short fetch wait: the fetch in flight when the changelog pass ends waits this
        # long (no new changelog records) before the feedback pass can fetch
        c = KafkaConsumer(**self.kafka.client_config(),
                          client_id=f"{self.group}-restore", enable_auto_commit=False,
                          isolation_level="read_committed", fetch_max_wait_ms=20)
        try:
            changelog = [TopicPartition(self.changelog, p) for p in ps]
            feedback = [TopicPartition(self.topics.feedback, p) for p in ps]
            # both topics' log start offsets in one lookup: it also fetches both topics'
            # metadata at once (each separate first lookup of a topic costs ~0.1 s)
            begins = c.beginning_offsets(changelog + feedback)
            for msg in _read_partitions(c, {tp: begins[tp] for tp in changelog}):
                self.core.restore(msg.key, msg.value)
                restored[msg.partition] += 1
            metas = self.core.load_partitions(ps)
            after_mark = {tp: max(metas[p].feedback_offset + 1, begins[tp])
                          for p, tp in zip(ps, feedback, strict=True)}
            for msg in _read_partitions(c, after_mark):
                fb = decode(msg.value, Feedback, 1 << 30)
                if not isinstance(fb, DecodeFailure):
                    found[msg.partition].append((msg.offset, fb))
        finally:
            c.close(autocommit=False)
        reconciled: dict[int, int] = {}
        for p in ps:
            reconciled[p] = n = self.core.reconcile(p, found[p])
            RECONCILED.inc(n)
            if found[p]:
                self.fb_offsets[p] = max(self.fb_offsets.get(p, -1), found[p][-1][0])
        # where processing resumes (the consumer's position may already be past records
        # returned by the poll that brought this assignment)
        tps = {(t, p): TopicPartition(self.topics.name(t), p) for p in ps for t in INPUT_TOPICS}
        input_begins = self.consumer.beginning_offsets(list(tps.values()))
        for key, tp in tps.items():
            committed = self.consumer.committed(tp)
            self.positions[key] = committed if committed is not None else input_begins[tp]
        seconds = round(time.monotonic() - t0, 3)
        for p in ps:
            log.info("join.partition_loaded", partition=p, changelog_records=restored[p],
                     watermark=metas[p].watermark, feedback_offset=metas[p].feedback_offset,
                     feedback_after_mark=len(found[p]), reconciled=reconciled[p],
                     batch=ps, seconds=seconds)

    # -- processing ------------------------------------------------------------------------
    def _tp(self, logical: str, p: int) -> TopicPartition:
        tp = self.tps.get((logical, p))
        if tp is None:
            tp = self.tps[(logical, p)] = TopicPartition(self.topics.name(logical), p)
        return tp

    def process_chunk(self, logical: str, p: int, msgs: list[Any]) -> None:
        """Consecutive records of one input partition: apply each, dead-letter what it
        rejected, emit what is due.

        A topic counts as caught up (not holding the watermark back) when its position
        has reached the high watermark of the last fetch; the high watermarks are read
        once per chunk.
        """
        caught: dict[str, bool] = {}
        for t in INPUT_TOPICS:
            if t != logical:
                hw = self.consumer.highwater(self._tp(t, p))
                pos = self.positions.get((t, p))
                caught[t] = hw is not None and pos is not None and pos >= hw
        hw_self = self.consumer.highwater(self._tp(logical, p))
        if hw_self is None:
            hw_self = 1 << 62
        on_record = self.core.on_record
        outcomes = self.outcomes
        for m in msgs:
            offset = m.offset
            caught[logical] = offset + 1 >= hw_self
            try:
                step = on_record(logical, p, offset, m.key, m.value, caught)
            except Exception as exc:  # a record that decodes but breaks the join
                step = self._handler_error(logical, p, m, exc)
            k = (logical, step.outcome)
            outcomes[k] = outcomes.get(k, 0) + 1
            for k in step.released:  # held actions applied by this impression
                outcomes[k] = outcomes.get(k, 0) + 1
            for action in step.organic:
                self.organic[action] += 1
            if step.rejected:
                for r in step.rejected:
                    self._dead_letter(r)
            if step.emissions:
                self._emit(p, step.emissions)
        if msgs:
            self.positions[(logical, p)] = msgs[-1].offset + 1
        self.processed += len(msgs)
        self.since_commit += len(msgs)

    def _handler_error(self, logical: str, p: int, m: Any, exc: Exception) -> Step:
        """Dead-letter a record whose join step raised (``handler_error``) and go on: a
        poison record must not stop the joiner, nor stop it again after a restart."""
        log.error("join.handler_error", topic=logical, partition=p, offset=m.offset,
                  error=repr(exc)[:500])
        step = Step()
        step.outcome = "handler_error"
        step.rejected.append(Rejected(logical, p, m.offset, "handler_error",
                                      f"join step failed: {exc!r}", m.value or b"", m.key))
        return step

    def process(self, logical: str, p: int, offset: int, key: bytes | None,
                value: bytes | None) -> None:
        """One input record (see :meth:`process_chunk`)."""
        self.process_chunk(logical, p, [_Msg(offset, key, value)])

    def count_outcomes(self) -> None:
        """Add the per-record counts to ``adloop_join_events_total`` and the feedback
        counters (once per poll, not per record)."""
        for (t, outcome), n in self.outcomes.items():
            EVENTS.labels(t, outcome).inc(n)
        self.outcomes.clear()
        for kind, n in self.kinds.items():
            if n:
                FEEDBACK_BY_KIND[kind].inc(n)
                if kind == "correction":
                    CORRECTIONS.inc(n)
                self.kinds[kind] = 0
        for action, n in self.organic.items():
            if n:
                ORGANIC_BY_ACTION[action].inc(n)
                self.organic[action] = 0

    def _emit(self, p: int, emissions: list[Feedback]) -> None:
        topic = self.topics.feedback
        send = self.producer.send
        kinds = self.kinds
        for fb in emissions:
            send(topic, fb.user_id.encode(), encode(fb), p)
            kind = fb.kind
            kinds[kind] += 1
            ELAPSED_BY_KIND[kind].observe(fb.elapsed_s)
        self.core.mark_emitted(p, emissions)

    def _dead_letter(self, r: Rejected) -> None:
        letter = DeadLetter.of(source_topic=self.topics.name(r.topic), partition=r.partition,
                               offset=r.offset, reason=r.reason, detail=r.detail, raw=r.raw,
                               key=r.key)
        self.producer.send(self.topics.dlq, letter.source_topic.encode(), encode(letter))
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
            acked = self.producer.flush(timeout_s=60)
        except Exception as exc:
            raise FeedbackNotAckedError(repr(exc)) from exc
        feedback = self.topics.feedback
        for (topic, p), off in acked.items():
            if topic == feedback:
                self.fb_offsets[p] = max(self.fb_offsets.get(p, -1), off)
        # 2. the newest acknowledged feedback offset goes into each partition's state
        for p, off in self.fb_offsets.items():
            if self.core.loaded(p):
                self.core.set_feedback_offset(p, off)
        # 3. changed state to the changelog (each key once), acknowledged
        try:
            for p, key, value in self.core.take_changes():
                self.producer.send(self.changelog, key, value, p)
            self.producer.flush(timeout_s=60)
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
        # The state is many long-lived objects and every record allocates; with the default
        # thresholds the cyclic GC rescans the state so often that it costs about a quarter
        # of the CPU (the state structs are gc=False; this covers the lists and dicts).
        gc.set_threshold(50_000, 20, 20)
        gc.freeze()  # modules and start-up objects: never scanned again
        self.ensure_changelog()
        inputs = [self.topics.name(t) for t in INPUT_TOPICS]
        self.consumer.subscribe(inputs, listener=self._listener())
        self.wait_for_metadata(inputs)
        last_commit = last_metrics = time.monotonic()
        unassigned_since: float | None = time.monotonic()
        rejoin_after = max(10.0, 2 * self.s.session_timeout_s)
        try:
            while not self.stop_event.is_set():
                batches = self.consumer.poll(timeout_ms=200)
                if self.core.parts or self.to_load:
                    unassigned_since = None
                elif unassigned_since is None:
                    unassigned_since = time.monotonic()
                elif time.monotonic() - unassigned_since > rejoin_after * (1 + self.rejoins) \
                        and self.rejoins < 5:
                    self.rejoin()     # backs off: 1x, 2x, ... the wait; an idle extra
                    unassigned_since = time.monotonic()   # member rejoins a few times only
                    continue
                if self.to_load:  # the whole assignment in one batch
                    batch = sorted(self.to_load)
                    self.load(batch)
                    self.to_load.difference_update(batch)
                self.ready = bool(self.core.parts)
                for tp, msgs in _interleaved(batches):
                    if not self.core.loaded(tp.partition):
                        continue  # revoked inside this poll
                    self.process_chunk(self.topics.logical(tp.topic), tp.partition, msgs)
                if batches:
                    self.producer.ship()  # sent while the next poll is processed
                    self.count_outcomes()
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
            self.producer.close(timeout_s=10)

    def wait_for_metadata(self, topics: list[str], timeout_s: float | None = None) -> None:
        """Know every input topic's partitions before joining the group (called after
        ``subscribe`` and before the first ``poll``, which joins).

        A member that joins while its metadata lacks a subscribed topic can be handed an
        assignment without that topic's partitions and, with kafka-python, may then sit
        in the group with nothing assigned (seen on freshly created topics). The order
        matters too: kafka-python's coordinator snapshots the subscribed topics'
        partitions on each metadata update; fetched before ``subscribe``, the snapshot
        stays empty, the leader assigns against it, and the first metadata refresh after
        the join sees a difference and rebalances the group once more (a second restore
        of every partition, seconds after start)."""
        if timeout_s is None:
            timeout_s = self.kafka.topic_wait_s
        missing = wait_for_partitions(self.consumer, topics, timeout_s, self.stop_event)
        if missing and not self.stop_event.is_set():
            raise SystemExit(f"adloop join: no partitions for {missing} after "
                             f"{timeout_s:.0f}s (run `adloop topics create`)")

    def refresh_metrics(self) -> None:
        TABLE_REQUESTS.set(self.core.requests_held())
        TABLE_BYTES.set(self.core.nbytes)
        RSS.set(_rss_bytes())
        for p in list(self.core.parts):
            WATERMARK.labels(str(p)).set(max(self.core.watermark(p), 0.0))
        for (t, p), pos in list(self.positions.items()):
            hw = self.consumer.highwater(self._tp(t, p))
            if hw is not None:
                LAG.labels(t, str(p)).set(max(0, hw - pos))

    def ready_check(self) -> tuple[bool, dict[str, Any]]:
        return self.ready, {"processed": self.processed, "partitions": sorted(self.core.parts)}


class _Msg:
    """The fields of a consumer record that :meth:`Joiner.process_chunk` reads."""

    __slots__ = ("key", "offset", "value")

    def __init__(self, offset: int, key: bytes | None, value: bytes | None) -> None:
        self.offset, self.key, self.value = offset, key, value


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


def _read_partitions(c: KafkaConsumer, starts: dict[TopicPartition, int],
                     timeout_s: float = 300.0) -> Iterator[Any]:
    """Records of several partitions, each from its start offset (at or after its log
    start) to its end offset at the time of the call; partitions interleave, each one's
    order is kept.

    Raises ``TimeoutError`` naming the partitions not read to their end in ``timeout_s``.
    """
    if not starts:
        return
    ends = c.end_offsets(list(starts))
    todo = {tp: end for tp, end in ends.items() if starts[tp] < end}
    if not todo:
        return
    c.assign(list(todo))
    for tp in todo:
        c.seek(tp, starts[tp])
    deadline = time.monotonic() + timeout_s
    while True:
        for tp in [tp for tp, end in todo.items() if c.position(tp) >= end]:
            del todo[tp]
            c.pause(tp)  # read to its end: fetch no more of it
        if not todo:
            return
        if time.monotonic() > deadline:
            behind = ", ".join(f"{tp.topic}[{tp.partition}] at {c.position(tp)} of {end}"
                               for tp, end in sorted(todo.items()))
            raise TimeoutError(f"restore did not read to the end in {timeout_s:.0f}s: "
                               f"{behind}")
        for tp, msgs in c.poll(timeout_ms=500).items():
            end = todo.get(tp)
            if end is not None:
                for msg in msgs:
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
