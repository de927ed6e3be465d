"""Producer and consumer helpers on kafka-python.

Producing: :class:`EventProducer` encodes typed records as JSON, keys them (user id
for event topics), and uses ``acks=all`` with the idempotent producer and batching.

Consuming: :class:`EventConsumer` decodes every record with its topic's schema.
Anything undecodable or invalid goes to the ``dlq`` topic with the source
topic/partition/offset and a reason, is counted in
``adloop_dead_letters_total{topic,reason}``, and the loop goes on with the next
record. Offsets are committed only after the batch's effect is done:

1. poll a batch and decode it (bad records become dead letters, not exceptions),
2. hand the good records to the handler; its effect must be done when it returns,
3. flush the producer, so dead letters (and anything the handler produced) are
   acknowledged by the broker,
4. commit the consumed positions.

A crash anywhere before step 4 re-delivers the batch; sinks must therefore be
idempotent (the joiner dedups by event id, the learner keeps offsets in its
checkpoint and seeks to them, so Kafka's committed offsets are only a mirror).

High-volume producing: :class:`BatchProducer` takes already-encoded records for explicit
partitions, builds Kafka record batches with aiokafka's C batch builder on a background
asyncio thread (same durability: ``acks=all``, idempotent, ordered per partition) and
reports the newest acknowledged offset per partition at :meth:`BatchProducer.flush`.
kafka-python's ``KafkaProducer.send`` costs tens of microseconds per record in Python,
which made it the joiner's bottleneck.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.producer.future import FutureRecordMetadata
from kafka.structs import OffsetAndMetadata

from streams.logs import get_logger
from streams.metrics import counter, gauge
from streams.schemas import (
    DEFAULT_MAX_RECORD_BYTES,
    Ad,
    AdStats,
    DeadLetter,
    DecodeFailure,
    DlqReason,
    Event,
    ModelUpdate,
    OrganicItem,
    decode,
    encode,
)
from streams.settings import KafkaSettings
from streams.topics import TOPICS, Topics

log = get_logger(__name__)

PRODUCED = counter("adloop_produced_records_total", "Records produced, by logical topic.",
                   ("topic",))
PRODUCE_ERRORS = counter("adloop_produce_errors_total",
                         "Records the broker did not acknowledge, by logical topic.", ("topic",))
CONSUMED = counter("adloop_consumed_records_total",
                   "Records consumed and decoded (good or dead-lettered), by logical topic.",
                   ("topic",))
DEAD_LETTERS = counter("adloop_dead_letters_total",
                       "Records sent to the dead-letter topic, by source topic and reason.",
                       ("topic", "reason"))
CONSUMER_LAG = gauge("adloop_consumer_lag_records",
                     "High watermark minus position, per consumer group, topic and partition.",
                     ("group", "topic", "partition"))

E = TypeVar("E", bound=Event)


def key_of(record: Event) -> str:
    """The partitioning key of a record: user id for events, ad id, organic item id,
    model name, topic."""
    if isinstance(record, Ad):
        return record.ad_id
    if isinstance(record, OrganicItem):
        return record.item_id
    if isinstance(record, ModelUpdate):
        return record.model_name
    if isinstance(record, DeadLetter):
        return record.source_topic
    if isinstance(record, AdStats):
        return record.key()
    user_id = getattr(record, "user_id", None)
    if isinstance(user_id, str):
        return user_id
    raise TypeError(f"no key rule for {type(record).__name__}")


def producer_config(kafka: KafkaSettings, **overrides: Any) -> dict[str, Any]:
    """kafka-python producer settings for durable, batched, ordered writes."""
    cfg: dict[str, Any] = {
        **kafka.client_config(),
        "client_id": kafka.client_id,
        "acks": "all",
        "enable_idempotence": True,
        "max_in_flight_requests_per_connection": 5,
        "linger_ms": 5,
        "batch_size": 128 * 1024,
        "retries": 2**31 - 1,
        "delivery_timeout_ms": 120_000,
        "max_request_size": 4 * 1024 * 1024,
    }
    cfg.update(overrides)
    return cfg


class EventProducer:
    """Typed, keyed, JSON-encoded producing to adloop's topics."""

    def __init__(self, kafka: KafkaSettings | None = None, **overrides: Any) -> None:
        self.kafka = kafka or KafkaSettings()
        self.topics = Topics(self.kafka.topic_prefix)
        self._producer = KafkaProducer(**producer_config(self.kafka, **overrides))

    @property
    def raw(self) -> KafkaProducer:
        return self._producer

    def send(self, topic: str, record: Event, key: str | None = None) -> FutureRecordMetadata:
        """Produce ``record`` to logical ``topic`` keyed by ``key`` (default: :func:`key_of`)."""
        expected = TOPICS[topic].record
        if not isinstance(record, expected):
            raise TypeError(f"topic {topic!r} carries {expected.__name__}, "
                            f"not {type(record).__name__}")
        return self.send_bytes(topic, encode(record), (key or key_of(record)).encode())

    def send_bytes(self, topic: str, value: bytes, key: bytes | None) -> FutureRecordMetadata:
        """Produce raw bytes to logical ``topic`` (used for dead letters and fault tests)."""
        future = self._producer.send(self.topics.name(topic), value=value, key=key)
        future.add_callback(lambda _md: PRODUCED.labels(topic).inc())
        future.add_errback(lambda exc: self._on_error(topic, exc))
        return future

    def _on_error(self, topic: str, exc: BaseException) -> None:
        PRODUCE_ERRORS.labels(topic).inc()
        log.error("produce.failed", topic=topic, error=repr(exc))

    def dead_letter(self, letter: DeadLetter) -> FutureRecordMetadata:
        DEAD_LETTERS.labels(Topics(self.kafka.topic_prefix).logical(letter.source_topic),
                            letter.reason).inc()
        return self.send("dlq", letter)

    def flush(self, timeout_s: float | None = None) -> None:
        self._producer.flush(timeout=timeout_s)

    def close(self, timeout_s: float = 10.0) -> None:
        self._producer.close(timeout=timeout_s)


@dataclass(frozen=True)
class Received(Generic[E]):
    """A decoded record and where it came from."""

    topic: str
    """Logical topic name."""
    partition: int
    offset: int
    key: bytes | None
    timestamp_ms: int
    record: E


def wait_for_partitions(consumer: KafkaConsumer, topics: Sequence[str], timeout_s: float,
                        stop: threading.Event | None = None) -> list[str]:
    """Until ``consumer``'s metadata lists partitions of every topic of ``topics``
    (physical names), ``timeout_s`` passes or ``stop`` is set; returns the topics still
    without partitions (empty: all known). Call it after subscribing and before the first
    poll, which joins the group."""
    deadline = time.monotonic() + timeout_s
    missing = list(topics)
    while True:
        missing = [t for t in missing if not consumer.partitions_for_topic(t)]
        if not missing or (stop is not None and stop.is_set()) or time.monotonic() > deadline:
            return missing
        time.sleep(0.2)


class EventConsumer:
    """Decoding consumer with dead-lettering and commit-after-effect.

    ``topics`` are logical names; each is decoded with its own record type.
    """

    def __init__(self, kafka: KafkaSettings | None, topics: Sequence[str], group_id: str | None,
                 *, dlq: EventProducer | None = None,
                 max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
                 auto_offset_reset: str = "earliest", subscribe: bool = True,
                 **overrides: Any) -> None:
        self.kafka = kafka or KafkaSettings()
        self.names = Topics(self.kafka.topic_prefix)
        self.logical_topics = list(topics)
        self.group_id = group_id
        self.max_record_bytes = max_record_bytes
        self._own_dlq = dlq is None
        self.dlq = dlq or EventProducer(self.kafka)
        cfg: dict[str, Any] = {
            **self.kafka.client_config(),
            "client_id": self.kafka.client_id,
            "group_id": group_id,
            "enable_auto_commit": False,
            "auto_offset_reset": auto_offset_reset,
            "isolation_level": "read_committed",
            "max_poll_records": 1000,
            "fetch_max_wait_ms": 100,
        }
        cfg.update(overrides)
        self.consumer = KafkaConsumer(**cfg)
        if subscribe:
            self.consumer.subscribe([self.names.name(t) for t in self.logical_topics])
        self.dead_lettered = 0

    # -- decoding --------------------------------------------------------------------
    def _decode_one(self, msg: Any) -> Received[Any] | None:
        logical = self.names.logical(msg.topic)
        CONSUMED.labels(logical).inc()
        result = decode(msg.value, TOPICS[logical].record, self.max_record_bytes)
        if isinstance(result, DecodeFailure):
            self.send_dead_letter(logical, msg.partition, msg.offset, result.reason,
                                  result.detail, msg.value or b"", msg.key)
            return None
        return Received(logical, msg.partition, msg.offset, msg.key, msg.timestamp, result)

    def send_dead_letter(self, logical_topic: str, partition: int, offset: int,
                         reason: DlqReason, detail: str, raw: bytes,
                         key: bytes | None = None) -> None:
        """Route one record to ``dlq`` (durable at the next :meth:`commit`)."""
        self.dead_lettered += 1
        log.warning("dead_letter", topic=logical_topic, partition=partition, offset=offset,
                    reason=reason, detail=detail[:200])
        self.dlq.dead_letter(DeadLetter.of(
            source_topic=self.names.name(logical_topic), partition=partition, offset=offset,
            reason=reason, detail=detail, raw=raw, key=key))

    def poll(self, timeout_ms: int = 500, max_records: int | None = None) -> list[Received[Any]]:
        """One poll: the good records, in partition order; bad ones are dead-lettered."""
        batches = self.consumer.poll(timeout_ms=timeout_ms, max_records=max_records)
        out: list[Received[Any]] = []
        for _tp, msgs in batches.items():
            for msg in msgs:
                rec = self._decode_one(msg)
                if rec is not None:
                    out.append(rec)
        self._update_lag()
        return out

    def _update_lag(self) -> None:
        for tp in self.consumer.assignment():
            high = self.consumer.highwater(tp)
            if high is None:
                continue
            try:
                pos = self.consumer.position(tp, timeout_ms=1000)
            except Exception:  # position unknown during a rebalance
                continue
            CONSUMER_LAG.labels(self.group_id or "", self.names.logical(tp.topic),
                                str(tp.partition)).set(max(0, high - (pos or 0)))

    # -- committing ------------------------------------------------------------------
    def commit(self, offsets: dict[TopicPartition, int] | None = None) -> None:
        """Flush dead letters (and the handler's produced records), then commit.

        ``offsets`` (next offset to read, per partition) defaults to the positions
        after everything polled so far.
        """
        self.dlq.flush()
        if self.group_id is None:
            return
        if offsets is None:
            self.consumer.commit()
        else:
            self.consumer.commit({tp: OffsetAndMetadata(off, "", -1)
                                  for tp, off in offsets.items()})

    # -- loops -----------------------------------------------------------------------
    def run(self, handle_batch: Callable[[list[Received[Any]]], None],
            stop: threading.Event, poll_timeout_ms: int = 500,
            max_records: int | None = None) -> None:
        """Poll, handle, flush, commit until ``stop`` is set.

        ``handle_batch`` must have finished its effect when it returns; an exception
        from it stops the loop without committing (the batch is re-delivered on restart).
        """
        while not stop.is_set():
            batch = self.poll(poll_timeout_ms, max_records)
            if batch:
                handle_batch(batch)
            self.commit()

    def run_per_record(self, handle: Callable[[Received[Any]], None],
                       stop: threading.Event, poll_timeout_ms: int = 500) -> None:
        """Like :meth:`run`, one record at a time; a record whose handler raises is
        dead-lettered with reason ``handler_error`` and the loop goes on."""

        def each(batch: list[Received[Any]]) -> None:
            for rec in batch:
                try:
                    handle(rec)
                except Exception as exc:
                    self.send_dead_letter(rec.topic, rec.partition, rec.offset,
                                          "handler_error", repr(exc), encode(rec.record),
                                          rec.key)

        self.run(each, stop, poll_timeout_ms)

    def end_offsets(self) -> dict[TopicPartition, int]:
        parts = [TopicPartition(self.names.name(t), p)
                 for t in self.logical_topics
                 for p in sorted(self.consumer.partitions_for_topic(self.names.name(t)) or ())]
        result: dict[TopicPartition, int] = self.consumer.end_offsets(parts)
        return result

    def close(self) -> None:
        try:
            self.consumer.close(autocommit=False)
        finally:
            if self._own_dlq:
                self.dlq.close()


DEAD_LETTER_GROUP = "adloop-dead-letters"
"""Consumer group whose committed offsets mark what :class:`DeadLetterOnce` has sent."""


class DeadLetterOnce:
    """Dead letters of readers without a consumer group (the server's followers of the
    compacted topics, the learner's ``ads`` reader), once per offset across restarts,
    replicas and processes.

    Offsets below the mark committed under ``group`` for a partition were dead-lettered
    already (nothing else is ever committed under it). Two readers that meet the same
    new bad record at the same instant may both send it; a mark that cannot be read or
    written (group coordinator unreachable) means the record is only counted by the
    caller. Its Kafka clients are made at the first bad record (most runs have none).
    """

    def __init__(self, kafka: KafkaSettings, group: str = DEAD_LETTER_GROUP) -> None:
        self.kafka = kafka
        self.group = group
        self.names = Topics(kafka.topic_prefix)
        self._consumer: KafkaConsumer | None = None
        self._producer: EventProducer | None = None
        self._marks: dict[TopicPartition, int] = {}

    def offer(self, logical: str, partition: int, offset: int, reason: DlqReason,
              detail: str, raw: bytes, key: bytes | None) -> bool:
        """Dead-letter the record unless an earlier reader did; True if sent now.
        Never raises (a failure is logged and the record only counted)."""
        tp = TopicPartition(self.names.name(logical), partition)
        try:
            if self._consumer is None:
                self._consumer = KafkaConsumer(
                    **self.kafka.client_config(), group_id=self.group,
                    client_id=f"{self.kafka.client_id}-{self.group}",
                    enable_auto_commit=False, request_timeout_ms=15_000)
            if self._producer is None:
                self._producer = EventProducer(self.kafka)
            # read fresh each time (bad records are rare): another reader may have moved it
            mark = max(self._marks.get(tp, 0), self._consumer.committed(tp) or 0)
            if offset < mark:
                return False
            self._producer.dead_letter(DeadLetter.of(
                source_topic=tp.topic, partition=partition, offset=offset, reason=reason,
                detail=detail, raw=raw, key=key))
            self._producer.flush(30)
            self._consumer.commit({tp: OffsetAndMetadata(offset + 1, "", -1)})
            self._marks[tp] = offset + 1
            return True
        except Exception as exc:
            log.warning("dead_letter.failed", topic=logical, partition=partition,
                        offset=offset, reason=reason, error=repr(exc)[:300])
            return False

    def close(self) -> None:
        if self._producer is not None:
            with contextlib.suppress(Exception):
                self._producer.close(5)
        if self._consumer is not None:
            with contextlib.suppress(Exception):
                self._consumer.close(autocommit=False)


def aiokafka_security(kafka: KafkaSettings) -> dict[str, Any]:
    """:meth:`KafkaSettings.security_config` as aiokafka takes it (TLS as an SSL context)."""
    cfg = kafka.security_config()
    files = {k: cfg.pop(k) for k in ("ssl_cafile", "ssl_certfile", "ssl_keyfile") if k in cfg}
    if kafka.security_protocol.endswith("SSL"):
        from aiokafka.helpers import create_ssl_context

        cfg["ssl_context"] = create_ssl_context(
            cafile=files.get("ssl_cafile"), certfile=files.get("ssl_certfile"),
            keyfile=files.get("ssl_keyfile"))
    return cfg


class ProduceFailedError(RuntimeError):
    """A :class:`BatchProducer` record was not acknowledged (or the producer failed)."""


class BatchProducer:
    """Durable, batched producing of encoded records, for hot loops (the joiner).

    :meth:`send` only appends ``(key, value)`` to an in-memory list per (topic,
    partition) and is cheap; :meth:`ship` (also every ``ship_every`` records) hands the
    lists to the background thread, which packs them into record batches (aiokafka's C
    builder) and sends them in order, one batch per partition in flight as aiokafka does
    (so per-partition order is kept);
    :meth:`flush` ships and waits until everything sent so far is acknowledged
    (``acks=all``, idempotent producer), raising :class:`ProduceFailedError` if any record
    was not, and returns the newest acknowledged offset per (topic, partition) since the
    previous flush. ``partition=None`` uses the key's default partition (per record, for
    low-volume topics such as ``dlq``).
    """

    def __init__(self, kafka: KafkaSettings, *, client_id: str | None = None,
                 linger_ms: int = 5, max_batch_bytes: int = 512 * 1024,
                 max_request_bytes: int = 4 * 1024 * 1024, ship_every: int = 2000,
                 start_timeout_s: float = 60.0) -> None:
        from aiokafka import AIOKafkaProducer

        self.kafka = kafka
        self._buf: dict[tuple[str, int | None], list[tuple[bytes | None, bytes | None]]] = {}
        self._lock = threading.Lock()
        self._queued = 0
        self.ship_every = ship_every
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever,
                                        name="batch-producer", daemon=True)
        self._thread.start()

        async def start() -> Any:
            producer = AIOKafkaProducer(
                bootstrap_servers=kafka.bootstrap_servers,
                client_id=client_id or kafka.client_id, acks="all", enable_idempotence=True,
                linger_ms=linger_ms, max_batch_size=max_batch_bytes,
                max_request_size=max_request_bytes, **aiokafka_security(kafka))
            await producer.start()
            return producer

        try:
            self._producer = asyncio.run_coroutine_threadsafe(start(), self._loop).result(
                start_timeout_s)
        except BaseException:
            self._loop.call_soon_threadsafe(self._loop.stop)
            raise
        # state below is touched only on the loop thread
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._inflight: list[tuple[asyncio.Future[Any], str, int | None, int]] = []
        self._errors: list[BaseException] = []
        self._worker = asyncio.run_coroutine_threadsafe(self._work(), self._loop)

    # -- caller thread ----------------------------------------------------------------
    def send(self, topic: str, key: bytes | None, value: bytes | None,
             partition: int | None = None) -> None:
        """Queue one record (physical topic name); durable after :meth:`flush`."""
        with self._lock:
            buf = self._buf.get((topic, partition))
            if buf is None:
                buf = self._buf[(topic, partition)] = []
            buf.append((key, value))
            self._queued += 1
            if self._queued >= self.ship_every:
                self._ship()

    def ship(self) -> None:
        """Start sending what :meth:`send` queued (does not wait)."""
        with self._lock:
            self._ship()

    def _ship(self) -> None:
        if self._buf:
            item, self._buf, self._queued = self._buf, {}, 0
            # under the lock, so items reach the loop in the order they were shipped
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)

    def flush(self, timeout_s: float = 60.0) -> dict[tuple[str, int], int]:
        """Ship and wait for every acknowledgement; newest acked offset per partition."""
        self.ship()
        fut = asyncio.run_coroutine_threadsafe(self._drain(), self._loop)
        try:
            acked: dict[tuple[str, int], int] = fut.result(timeout_s)
        except ProduceFailedError:
            raise
        except Exception as exc:
            fut.cancel()
            raise ProduceFailedError(repr(exc)) from exc
        return acked

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop the producer (what was not flushed may be lost) and its thread."""
        if not self._thread.is_alive():
            return

        async def stop() -> None:
            self._queue.put_nowait(None)
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.wrap_future(self._worker), timeout_s)
            await self._producer.stop()

        try:
            asyncio.run_coroutine_threadsafe(stop(), self._loop).result(timeout_s + 5)
        except Exception as exc:
            log.warning("batch_producer.close_failed", error=repr(exc))
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout_s)

    # -- loop thread ------------------------------------------------------------------
    async def _work(self) -> None:
        while True:
            item = await self._queue.get()
            try:
                if item is None:
                    return
                for (topic, partition), records in item.items():
                    if partition is None:
                        for key, value in records:
                            fut = await self._producer.send(topic, value, key=key)
                            self._inflight.append((fut, topic, None, 1))
                    else:
                        await self._send_batches(topic, partition, records)
            except Exception as exc:  # reported by flush
                self._errors.append(exc)
            finally:
                self._queue.task_done()

    async def _send_batches(self, topic: str, partition: int,
                            records: list[tuple[bytes | None, bytes | None]]) -> None:
        producer = self._producer
        batch = producer.create_batch()
        for key, value in records:
            if batch.append(key=key, value=value, timestamp=None) is None:
                if batch.record_count() == 0:
                    raise ProduceFailedError(f"record for {topic}[{partition}] too large")
                batch.close()  # full: no linger
                fut = await producer.send_batch(batch, topic, partition=partition)
                self._inflight.append((fut, topic, partition, batch.record_count()))
                batch = producer.create_batch()
                if batch.append(key=key, value=value, timestamp=None) is None:
                    raise ProduceFailedError(f"record for {topic}[{partition}] too large")
        if batch.record_count():
            batch.close()
            fut = await producer.send_batch(batch, topic, partition=partition)
            self._inflight.append((fut, topic, partition, batch.record_count()))

    async def _drain(self) -> dict[tuple[str, int], int]:
        await self._queue.join()
        inflight, self._inflight = self._inflight, []
        errors, self._errors = self._errors, []
        acked: dict[tuple[str, int], int] = {}
        results = await asyncio.gather(*(f for f, *_ in inflight), return_exceptions=True)
        for (_f, topic, partition, count), md in zip(inflight, results, strict=True):
            if isinstance(md, BaseException):
                errors.append(md)
                continue
            if partition is None:
                partition = md.partition
            last = md.offset + count - 1
            if last > acked.get((topic, partition), -1):
                acked[(topic, partition)] = last
        if errors:
            raise ProduceFailedError(f"{len(errors)} produce errors, first: {errors[0]!r}")
        return acked


def read_all(kafka: KafkaSettings, topic: str, timeout_s: float = 30.0,
             expect: int | None = None,
             on_failure: Callable[[int, int, DecodeFailure], None] | None = None,
             ) -> list[Received[Any]]:
    """Every decodable record of a logical topic from the start to its current end.

    A reading helper for tools and tests (no group, nothing committed, nothing
    dead-lettered): ``on_failure(partition, offset, failure)`` hears of each record that
    does not decode. Waits until ``expect`` records are read if given.
    """
    names = Topics(kafka.topic_prefix)
    consumer = KafkaConsumer(**kafka.client_config(), enable_auto_commit=False,
                             isolation_level="read_committed")
    try:
        physical = names.name(topic)
        deadline = time.monotonic() + timeout_s
        parts: Iterable[int] = ()
        while time.monotonic() < deadline:
            parts = consumer.partitions_for_topic(physical) or ()
            if parts:
                break
            time.sleep(0.2)
        tps = [TopicPartition(physical, p) for p in sorted(parts)]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        out: list[Received[Any]] = []
        record_type = TOPICS[topic].record
        while time.monotonic() < deadline:
            ends = consumer.end_offsets(tps)
            for tp_, msgs in consumer.poll(timeout_ms=200).items():
                for m in msgs:
                    rec = decode(m.value, record_type, 1 << 30)
                    if not isinstance(rec, DecodeFailure):
                        out.append(Received(topic, tp_.partition, m.offset, m.key,
                                            m.timestamp, rec))
                    elif on_failure is not None:
                        on_failure(tp_.partition, m.offset, rec)
            at_end = all(consumer.position(tp) >= ends[tp] for tp in tps)
            if at_end and (expect is None or len(out) >= expect):
                break
        return out
    finally:
        consumer.close(autocommit=False)
