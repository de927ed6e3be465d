"""Dynamic beam width: a load controller that narrows beams before refusing requests.

Widths per level are ``b_l(α) = max(b_min, floor(α·b_l), k)`` for the base schedule
``b`` (mechanisms.md §1.6); the organic search of mixed feeds narrows with them
(``max(b_min, floor(α·organic_beam))``, each request at least its ``organic_k``).
α moves on a ladder of rungs from 1 down to ``alpha_min``
(each rung ≈ 0.7× the previous). After every batch the controller compares the
*pressure* with the SLO:

* ``latency`` = queue wait of the batch's oldest request + the batch's model time
  (the slowest request of that batch, inside the server),
* ``backlog`` = requests still queued / max batch size × recent batch time + one
  batch time (what the newest queued request should expect at the current α).

pressure = max(latency, backlog) / SLO. Above 0.6 α drops straight to the rung where
the pressure, scaled by the width ratio (model time is about linear in the widths),
is back at 0.4. It widens one rung at a time, only after ``calm_batches`` batches in
a row whose pressure *predicted one rung wider* stays below 0.35, and at most once
per ``hold_s`` (hysteresis: narrow fast, widen slowly). A request is
refused (429) only when α is already at its floor, requests are already queued and
the backlog estimate for the new one exceeds the SLO, or when the queue is full.
With ``dynamic=False`` α stays 1 and only the queue bound refuses (the fixed-beam
baseline of the benchmark).

**Snapshot swaps.** A swap (fetch, session load, warm-up beam search, parity, trie) runs
on a follower thread of the same process and competes with the batches for the cores and
the GIL: batches that overlap it run slower, and the event loop runs late. That slowdown
says nothing about the request rate, so it must not narrow the beams nor refuse
requests: the model manager brackets every swap with :meth:`BeamController.swapping`;
a batch that overlapped a swap (one was in progress when it started, or one started or
ended while it ran: :meth:`swap_mark` / :meth:`overlapped_swap`) is not observed (α and
the service-time estimate stay as they were; counted in
``adloop_server_batches_during_swap_total``), and while a swap runs :meth:`admit`
refuses only at the queue bound (the HTTP front's loop-lag shed also waits). Requests
that arrive during a swap wait a little longer instead of being refused; the queue
bound still caps how long.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

from server import metrics as M


def scale_widths(schedule: list[int], alpha: float, levels: int, min_width: int = 1,
                 k: int = 1) -> list[int]:
    """Base schedule trimmed/extended (last value repeats) to ``levels``, scaled by α.

    No level goes below ``k``: ids are sparse at the deeper levels (about one ad per
    full prefix), so fewer than k beams at any level could cut the slate short of k
    ads. Under load the slate keeps its size; recall narrows."""
    base = (schedule + [schedule[-1]] * levels)[:levels]
    return [max(min_width, int(alpha * b), k) for b in base]


class BeamController:
    def __init__(self, schedule: list[int], slo_s: float, alpha_min: float = 0.125,
                 min_width: int = 1, dynamic: bool = True, max_batch: int = 16,
                 max_queue: int = 2048, step_down: float = 0.6, step_up: float = 0.35,
                 calm_batches: int = 8, target: float = 0.4, hold_s: float = 0.5) -> None:
        self.schedule = list(schedule)
        self.slo_s = slo_s
        self.min_width = min_width
        self.dynamic = dynamic
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.step_down, self.step_up, self.calm_batches = step_down, step_up, calm_batches
        self.target, self.hold_s = target, hold_s
        rungs = [1.0]
        while rungs[-1] * 0.7 > alpha_min:
            rungs.append(rungs[-1] * 0.7)
        rungs.append(alpha_min)
        self.rungs = rungs if dynamic else [1.0]
        self.rung = 0
        self._calm = 0
        self._batch_s = 0.0                    # EWMA of model time per batch
        self._lock = threading.Lock()
        self._last_change = time.monotonic()
        self._swapping = 0                     # swaps in progress
        self._swap_seq = 0                     # +1 at every swap start and end
        M.BEAM_SCALE.set(1.0)

    @property
    def alpha(self) -> float:
        return self.rungs[self.rung]

    @property
    def at_floor(self) -> bool:
        return self.rung == len(self.rungs) - 1

    # -- snapshot swaps --------------------------------------------------------------
    @contextlib.contextmanager
    def swapping(self) -> Iterator[None]:
        """Bracket one snapshot swap (see the module docstring)."""
        with self._lock:
            self._swapping += 1
            self._swap_seq += 1
        try:
            yield
        finally:
            with self._lock:
                self._swapping -= 1
                self._swap_seq += 1

    @property
    def swap_in_progress(self) -> bool:
        return self._swapping > 0

    def swap_mark(self) -> int:
        """Taken when a batch (or a loop-lag sample) starts: -1 if a swap is in progress,
        else the swap sequence number; :meth:`overlapped_swap` tells at its end."""
        with self._lock:
            return -1 if self._swapping else self._swap_seq

    def overlapped_swap(self, mark: int) -> bool:
        """Whether a swap ran at any time since ``mark`` was taken."""
        with self._lock:
            return mark < 0 or self._swapping > 0 or mark != self._swap_seq

    def widths(self, levels: int, k: int = 1) -> list[int]:
        widths = scale_widths(self.schedule, self.alpha, levels, self.min_width, k)
        for level, w in enumerate(widths):
            M.BEAM_WIDTH.labels(str(level)).set(w)
        return widths

    def organic_width(self, base: int) -> int:
        """The organic search's width per level for a base of ``base``: scaled by the
        same α as the ads' beams (``max(min_width, ⌊α·base⌋)``), so a mixed feed's
        extra search narrows with them under load; each request still searches at
        least its ``organic_k`` (the engine's rule)."""
        width = scale_widths([base], self.alpha, 1, self.min_width)[0]
        M.ORGANIC_BEAM_WIDTH.set(width)
        return width

    def backlog_s(self, queued: int) -> float:
        batches = queued / max(1, self.max_batch)
        return (batches + 1.0) * self._batch_s

    def admit(self, queued: int) -> bool:
        """May one more request join a queue of ``queued``?"""
        if queued >= self.max_queue:
            return False
        if not self.dynamic or queued == 0 or self._swapping:
            # an empty queue always admits: refusing then would also stop the batches
            # that keep the service-time estimate current; a swap's slowdown is not load
            return True
        return not (self.at_floor and self.backlog_s(queued + 1) > self.slo_s)

    def observe(self, batch_size: int, batch_s: float, oldest_wait_s: float,
                queued_after: int, swap_mark: int | None = None) -> None:
        """Learn from one finished batch; with the ``swap_mark`` taken when it started, a
        batch that overlapped a swap is counted and otherwise ignored."""
        if swap_mark is not None and self.overlapped_swap(swap_mark):
            M.BATCHES_DURING_SWAP.inc()
            return
        with self._lock:
            a = 0.3
            self._batch_s = batch_s if self._batch_s == 0 else (1 - a) * self._batch_s + a * batch_s
            if not self.dynamic:
                return
            pressure = max(oldest_wait_s + batch_s, self.backlog_s(queued_after)) / self.slo_s
            now = time.monotonic()
            if pressure > self.step_down:
                # model time scales about linearly with the widths: jump straight to the
                # rung whose predicted pressure is back at the target
                self._calm = 0
                new = self.rung
                while new < len(self.rungs) - 1 and \
                        pressure * self.rungs[new] / self.alpha > self.target:
                    new += 1
                if new != self.rung:
                    self.rung, self._last_change = new, now
            elif self.rung > 0 and pressure * self.rungs[self.rung - 1] / self.alpha \
                    < self.step_up and now - self._last_change > self.hold_s:
                self._calm += 1             # predicted pressure one rung wider is still low
                if self._calm >= self.calm_batches:
                    self.rung -= 1
                    self._calm = 0
                    self._last_change = now
            else:
                self._calm = 0
            M.BEAM_SCALE.set(self.alpha)
