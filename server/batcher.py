"""Asyncio batcher in front of the model-execution thread(s).

Requests wait in one queue; a collector takes up to ``max_batch`` of them, waiting
at most ``max_wait_s`` after the oldest arrived, asks the controller for the beam
widths, and runs the batch on a worker thread. ``workers`` batches may run at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from server import metrics as M
from server.controller import BeamController


class OverloadedError(Exception):
    """Refused: even the narrowest beams cannot hold the SLO (HTTP 429)."""


@dataclass
class _Item:
    payload: Any
    enqueued: float
    future: asyncio.Future[Any] = field(repr=False)


RunBatch = Callable[[list[Any], Callable[[int, int], list[int]]], list[Any]]


class Batcher:
    def __init__(self, run_batch: RunBatch, controller: BeamController, max_batch: int = 16,
                 max_wait_s: float = 0.002, workers: int = 1) -> None:
        self.run_batch = run_batch
        self.controller = controller
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.workers = workers
        self._queue: deque[_Item] = deque()
        self._wake: asyncio.Event | None = None
        self._slots: asyncio.Semaphore | None = None
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix="model")
        self._task: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[None]] = set()

    @property
    def depth(self) -> int:
        return len(self._queue)

    def start(self) -> None:
        self._wake = asyncio.Event()
        self._slots = asyncio.Semaphore(self.workers)
        self._task = asyncio.get_running_loop().create_task(self._collect())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for t in list(self._running):
            await asyncio.gather(t, return_exceptions=True)
        while self._queue:
            item = self._queue.popleft()
            if not item.future.done():
                item.future.set_exception(OverloadedError("server shutting down"))
        self._executor.shutdown(wait=True, cancel_futures=True)

    async def submit(self, payload: Any) -> tuple[Any, float, list[int]]:
        """-> (result, queue wait seconds, beam widths); raises :class:`OverloadedError`."""
        if not self.controller.admit(len(self._queue)):
            raise OverloadedError("beams are at their narrowest and the queue would exceed the "
                             "latency SLO; retry later")
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.append(_Item(payload, time.perf_counter(), fut))
        M.QUEUE_DEPTH.set(len(self._queue))
        assert self._wake is not None
        self._wake.set()
        result: tuple[Any, float, list[int]] = await fut
        return result

    async def _collect(self) -> None:
        assert self._wake is not None and self._slots is not None
        while True:
            if not self._queue:
                self._wake.clear()
                await self._wake.wait()
                continue
            await self._slots.acquire()
            oldest = self._queue[0].enqueued
            delay = oldest + self.max_wait_s - time.perf_counter()
            while len(self._queue) < self.max_batch and delay > 0:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), delay)
                except TimeoutError:
                    break
                delay = oldest + self.max_wait_s - time.perf_counter()
            items = [self._queue.popleft() for _ in range(min(self.max_batch, len(self._queue)))]
            M.QUEUE_DEPTH.set(len(self._queue))
            if not items:
                self._slots.release()
                continue
            task = asyncio.get_running_loop().create_task(self._run(items))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _run(self, items: list[_Item]) -> None:
        assert self._slots is not None
        start = time.perf_counter()
        swap_mark = self.controller.swap_mark()
        used: list[list[int]] = []

        def widths_for(levels: int, k: int) -> list[int]:
            w = self.controller.widths(levels, k)
            used.append(w)
            return w

        try:
            loop = asyncio.get_running_loop()
            results = await loop.run_in_executor(
                self._executor, self.run_batch, [i.payload for i in items], widths_for)
        except Exception as exc:
            for i in items:
                if not i.future.done():
                    i.future.set_exception(exc)
            return
        finally:
            self._slots.release()
        elapsed = time.perf_counter() - start
        M.BATCH_SIZE.observe(len(items))
        M.BATCH_SECONDS.observe(elapsed)
        widths = used[0] if used else []
        for i, r in zip(items, results, strict=True):
            wait = start - i.enqueued
            M.QUEUE_SECONDS.observe(wait)
            if not i.future.done():
                i.future.set_result((r, wait, widths))
        self.controller.observe(len(items), elapsed, start - items[0].enqueued,
                                len(self._queue), swap_mark)
