"""Impression logging that never blocks a request and survives a crash of the server.

Handlers ``offer`` each served slate (with the organic items of a mixed feed). With a
spool directory (the default), the record is first appended to the current spool
segment (one JSON line, written to the operating system before the response goes out,
no fsync), then put on a bounded queue; a daemon thread produces queued records to
``impressions`` with an :class:`EventProducer` whose ``max_block_ms`` is short. A
segment is deleted once it is closed and every record in it is acknowledged by Kafka
(or finally refused).

At start, segments left by an earlier process (``kill -9``, power loss of the
process, a shutdown while Kafka was down) are produced again before new records:
nothing served is lost to a server crash. Records of a segment that were already
acknowledged before the crash are produced twice; the joiner drops the second copy
by request id (``duplicate``), so the effect is exactly once. What a machine crash
can lose is what the kernel had not written to disk yet.

When Kafka is unreachable the thread keeps the record it holds and retries with
backoff while the queue fills; what does not fit is dropped and counted
(``adloop_server_impressions_dropped_total{reason="overflow"}``, never spooled), as is
anything the broker finally refuses (``reason="produce_error"``).
"""

from __future__ import annotations

import fcntl
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from server import metrics as M
from streams.kafka_io import EventProducer
from streams.logs import get_logger
from streams.schemas import DecodeFailure, Impression, decode, encode
from streams.settings import KafkaSettings

log = get_logger(__name__)

SEGMENT_RECORDS = 1000
"""Records per spool segment (at most this many are produced twice after a crash)."""
SEGMENT_AGE_S = 2.0
"""A segment is closed after this long even when it is not full."""


@dataclass
class _Segment:
    seq: int
    path: Path
    written: int = 0
    resolved: int = 0
    closed: bool = False


class SpoolInUseError(RuntimeError):
    """Another live server holds the spool directory."""


class ImpressionSpool:
    """Append-only segments ``<seq>.jsonl`` of impressions not yet acknowledged."""

    def __init__(self, directory: Path) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lockfile = (self.dir / "LOCK").open("a")
        try:   # one server per spool: another one's live segments are not leftovers
            fcntl.flock(self._lockfile, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            self._lockfile.close()
            raise SpoolInUseError(
                f"impression spool {self.dir} is in use by another server process; give "
                "each server its own --impression-spool-dir (or --cache-dir)") from exc
        self._lock = threading.Lock()
        self._segments: dict[int, _Segment] = {}
        self._current: _Segment | None = None
        self._fh: IO[bytes] | None = None
        self._opened_at = 0.0
        existing = sorted(int(p.stem) for p in self.dir.glob("*.jsonl") if p.stem.isdigit())
        self._next_seq = (existing[-1] + 1) if existing else 0

    def leftovers(self) -> list[tuple[int, Impression]]:
        """Records of segments an earlier process left behind, oldest first; their
        segments are taken over (deleted once every record is resolved)."""
        out: list[tuple[int, Impression]] = []
        for path in sorted(self.dir.glob("*.jsonl"), key=lambda p: int(p.stem)
                           if p.stem.isdigit() else -1):
            if not path.stem.isdigit() or int(path.stem) >= self._next_seq:
                continue
            seg = _Segment(int(path.stem), path, closed=True)
            for line in path.read_bytes().splitlines():
                rec = decode(line, Impression)
                if isinstance(rec, DecodeFailure):   # a torn last line: never acknowledged
                    log.warning("impressions.spool_bad_line", segment=path.name,
                                reason=rec.reason)
                    continue
                out.append((seg.seq, rec))
                seg.written += 1
            self._segments[seg.seq] = seg
            if seg.written == 0:
                self._delete(seg)
        return out

    def append(self, impression: Impression) -> int:
        """Write one record to the current segment; returns the segment's number."""
        line = encode(impression) + b"\n"
        with self._lock:
            now = time.monotonic()
            seg = self._current
            if seg is None or seg.written >= SEGMENT_RECORDS \
                    or now - self._opened_at > SEGMENT_AGE_S:
                seg = self._rotate(now)
            assert self._fh is not None
            self._fh.write(line)
            self._fh.flush()            # in the kernel now: survives kill -9 of this process
            seg.written += 1
            return seg.seq

    def resolved(self, seq: int) -> None:
        """One record of segment ``seq`` was acknowledged or finally refused."""
        with self._lock:
            seg = self._segments.get(seq)
            if seg is None:
                return
            seg.resolved += 1
            if seg.closed and seg.resolved >= seg.written:
                self._delete(seg)

    def close(self) -> None:
        with self._lock:
            self._close_current()
        self._lockfile.close()   # releases the flock

    @property
    def segments(self) -> int:
        return len(self._segments)

    def _rotate(self, now: float) -> _Segment:
        self._close_current()
        seg = _Segment(self._next_seq, self.dir / f"{self._next_seq:012d}.jsonl")
        self._next_seq += 1
        self._fh = seg.path.open("ab")
        self._opened_at = now
        self._segments[seg.seq] = seg
        self._current = seg
        return seg

    def _close_current(self) -> None:
        seg, self._current = self._current, None
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if seg is not None:
            seg.closed = True
            if seg.resolved >= seg.written:
                self._delete(seg)

    def _delete(self, seg: _Segment) -> None:
        self._segments.pop(seg.seq, None)
        seg.path.unlink(missing_ok=True)


class ImpressionLogger:
    def __init__(self, kafka: KafkaSettings, capacity: int = 10_000,
                 max_block_ms: int = 200, spool_dir: Path | None = None) -> None:
        self.kafka = kafka
        self.max_block_ms = max_block_ms
        self._queue: queue.Queue[tuple[int, Impression]] = queue.Queue(maxsize=capacity)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="impressions", daemon=True)
        self.spool = ImpressionSpool(spool_dir) if spool_dir is not None else None
        self._replay: deque[tuple[int, Impression]] = deque()
        self.produced = 0
        self.dropped = 0

    def start(self) -> ImpressionLogger:
        if self.spool is not None:
            self._replay = deque(self.spool.leftovers())
            if self._replay:
                log.info("impressions.spool_replay", records=len(self._replay))
                M.IMPRESSIONS_REPLAYED.inc(len(self._replay))
        self._thread.start()
        return self

    def offer(self, impression: Impression) -> bool:
        """Spool and queue one impression; False (and counted) if the buffer is full."""
        if self._queue.full():
            self.dropped += 1
            M.IMPRESSIONS_DROPPED.labels("overflow").inc()
            return False
        seq = self.spool.append(impression) if self.spool is not None else -1
        try:
            self._queue.put_nowait((seq, impression))
        except queue.Full:   # filled up since the check: the spool keeps it for a restart
            self.dropped += 1
            M.IMPRESSIONS_DROPPED.labels("overflow").inc()
            return False
        M.IMPRESSION_BUFFER.set(self._queue.qsize())
        return True

    @property
    def buffered(self) -> int:
        return self._queue.qsize() + len(self._replay)

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout_s)

    def _producer(self) -> EventProducer:
        return EventProducer(self.kafka, max_block_ms=self.max_block_ms, linger_ms=5,
                             delivery_timeout_ms=30_000, request_timeout_ms=10_000)

    def _callbacks(self, seq: int) -> tuple[Callable[[object], None],
                                            Callable[[BaseException], None]]:
        def sent(_md: object) -> None:
            self.produced += 1
            M.IMPRESSIONS.inc()
            if self.spool is not None:
                self.spool.resolved(seq)

        def failed(exc: BaseException) -> None:
            self.dropped += 1
            M.IMPRESSIONS_DROPPED.labels("produce_error").inc()
            log.warning("impressions.produce_failed", error=repr(exc)[:200])
            if self.spool is not None:
                self.spool.resolved(seq)

        return sent, failed

    def _next(self) -> tuple[int, Impression] | None:
        if self._replay:
            return self._replay.popleft()
        try:
            item = self._queue.get(timeout=0.1)
        except queue.Empty:
            return None
        M.IMPRESSION_BUFFER.set(self._queue.qsize())
        return item

    def _run(self) -> None:
        producer: EventProducer | None = None
        pending: tuple[int, Impression] | None = None
        backoff = 0.2
        while True:
            if pending is None:
                pending = self._next()
                if pending is None:
                    if self._stop.is_set():
                        break
                    continue
            try:
                if producer is None:
                    producer = self._producer()
                seq, record = pending
                fut = producer.send("impressions", record)
                on_sent, on_failed = self._callbacks(seq)
                fut.add_callback(on_sent)
                fut.add_errback(on_failed)
                pending = None
                backoff = 0.2
            except Exception as exc:   # broker unreachable: keep the record, retry
                log.warning("impressions.retry", error=repr(exc)[:200],
                            buffered=self.buffered)
                if self._stop.wait(backoff):
                    break
                backoff = min(backoff * 2, 5.0)
        if producer is not None:
            try:
                producer.flush(timeout_s=3.0)
                producer.close(timeout_s=2.0)
            except Exception as exc:
                log.warning("impressions.close_failed", error=repr(exc)[:200])
        unsent = self._queue.qsize() + len(self._replay) + (pending is not None)
        if self.spool is not None:
            self.spool.close()
            if unsent:   # still in the spool: produced by the next start
                log.info("impressions.spooled_for_restart", records=unsent)
        elif unsent:
            self.dropped += unsent
            M.IMPRESSIONS_DROPPED.labels("shutdown").inc(unsent)
