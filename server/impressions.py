"""Impression logging that never blocks a request.

Handlers ``offer`` each served slate to a bounded queue (``put_nowait``); a daemon
thread produces them to ``impressions`` with an :class:`EventProducer` whose
``max_block_ms`` is short. When Kafka is unreachable the thread keeps the record it
holds and retries with backoff while the queue fills; what does not fit is dropped
and counted (``adloop_server_impressions_dropped_total{reason="overflow"}``), as is
anything the broker finally refuses (``reason="produce_error"``).
"""

from __future__ import annotations

import queue
import threading

from server import metrics as M
from streams.kafka_io import EventProducer
from streams.logs import get_logger
from streams.schemas import Impression
from streams.settings import KafkaSettings

log = get_logger(__name__)


class ImpressionLogger:
    def __init__(self, kafka: KafkaSettings, capacity: int = 10_000,
                 max_block_ms: int = 200) -> None:
        self.kafka = kafka
        self.max_block_ms = max_block_ms
        self._queue: queue.Queue[Impression] = queue.Queue(maxsize=capacity)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="impressions", daemon=True)
        self.produced = 0
        self.dropped = 0

    def start(self) -> ImpressionLogger:
        self._thread.start()
        return self

    def offer(self, impression: Impression) -> bool:
        """Queue one impression; False (and counted) if the buffer is full."""
        try:
            self._queue.put_nowait(impression)
        except queue.Full:
            self.dropped += 1
            M.IMPRESSIONS_DROPPED.labels("overflow").inc()
            return False
        M.IMPRESSION_BUFFER.set(self._queue.qsize())
        return True

    @property
    def buffered(self) -> int:
        return self._queue.qsize()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout_s)

    def _producer(self) -> EventProducer:
        return EventProducer(self.kafka, max_block_ms=self.max_block_ms, linger_ms=5,
                             delivery_timeout_ms=30_000, request_timeout_ms=10_000)

    def _on_error(self, exc: BaseException) -> None:
        self.dropped += 1
        M.IMPRESSIONS_DROPPED.labels("produce_error").inc()

    def _on_sent(self, _md: object) -> None:
        self.produced += 1
        M.IMPRESSIONS.inc()

    def _run(self) -> None:
        producer: EventProducer | None = None
        pending: Impression | None = None
        backoff = 0.2
        while True:
            if pending is None:
                try:
                    pending = self._queue.get(timeout=0.1)
                except queue.Empty:
                    if self._stop.is_set():
                        break
                    continue
                M.IMPRESSION_BUFFER.set(self._queue.qsize())
            try:
                if producer is None:
                    producer = self._producer()
                fut = producer.send("impressions", pending)
                fut.add_callback(self._on_sent)
                fut.add_errback(self._on_error)
                pending = None
                backoff = 0.2
            except Exception as exc:   # broker unreachable: keep the record, retry
                log.warning("impressions.retry", error=repr(exc)[:200],
                            buffered=self._queue.qsize())
                if self._stop.wait(backoff):
                    break
                backoff = min(backoff * 2, 5.0)
        if producer is not None:
            try:
                producer.flush(timeout_s=3.0)
                producer.close(timeout_s=2.0)
            except Exception as exc:
                log.warning("impressions.close_failed", error=repr(exc)[:200])
        lost = self._queue.qsize() + (pending is not None)
        if lost:
            self.dropped += lost
            M.IMPRESSIONS_DROPPED.labels("shutdown").inc(lost)
