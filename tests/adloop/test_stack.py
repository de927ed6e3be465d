"""The process supervisor behind ``adloop demo`` and the chaos runner, on real processes.

A process that exits on its own is restarted after a backoff and counted; one that
exits every time it starts trips the crash loop, which carries the end of its log; a
process stopped on purpose stays stopped (compose's ``restart: unless-stopped``).
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from adloop.stack import CrashLoopError, LocalStack, ProcessExit, RestartPolicy

FAST = RestartPolicy(backoff_initial_s=0.05, backoff_max_s=0.2, stable_after_s=60.0,
                     crash_loop_exits=4, crash_loop_window_s=60.0)


def _until(what: str, predicate: Callable[[], bool], limit_s: float = 60.0) -> None:
    """Poll until ``predicate`` holds (the limit only keeps a broken run from hanging)."""
    deadline = time.monotonic() + limit_s
    while not predicate():
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.05)


def _stack(tmp_path: Path) -> LocalStack:
    return LocalStack(tmp_path / "stack", bootstrap_servers="127.0.0.1:1")  # no broker used


def test_a_process_that_exits_is_restarted_with_backoff_and_counted(tmp_path: Path) -> None:
    marker = tmp_path / "crashed-once"
    # exits with 3 on its first start, then runs until stopped
    script = (f"import pathlib, sys, time\n"
              f"m = pathlib.Path({str(marker)!r})\n"
              f"if not m.exists():\n"
              f"    m.write_text('x'); print('first start: failing', flush=True); sys.exit(3)\n"
              f"print('second start: running', flush=True)\n"
              f"time.sleep(600)\n")
    stack = _stack(tmp_path)
    proc = stack.add("worker", [], command=[sys.executable, "-c", script])
    seen: list[ProcessExit] = []
    proc.start()
    sup = stack.supervise(FAST, on_exit=seen.append)
    try:
        _until("the worker restarted and running", lambda: proc.restarts == 1 and proc.alive()
               and "second start" in proc.log_tail())
        assert proc.starts == 2
        assert sup.restarts() == {"worker": 1}
        assert [(e.process, e.exit_code, e.backoff_s) for e in seen] == [("worker", 3, 0.05)]
        assert sup.crash_loop is None
        assert "first start: failing" in proc.log_tail()
    finally:
        codes = stack.stop()
    assert codes["worker"] is not None and not proc.alive()


def test_a_process_that_dies_at_every_start_trips_the_crash_loop_with_its_log_tail(
        tmp_path: Path) -> None:
    stack = _stack(tmp_path)
    proc = stack.add("broken", [], command=[
        sys.executable, "-c", "import sys; print('config missing: ADLOOP_X', flush=True); "
        "sys.exit(2)"])
    tripped: list[CrashLoopError] = []
    done = threading.Event()

    def on_crash_loop(err: CrashLoopError) -> None:
        tripped.append(err)
        done.set()

    proc.start()
    sup = stack.supervise(FAST, on_crash_loop=on_crash_loop)
    try:
        assert done.wait(60), "the crash loop never tripped"
        after = sup.passes                    # a few more supervisor passes: no restart
        _until("3 more supervisor passes", lambda: sup.passes >= after + 3)
        err = tripped[0]
        assert sup.crash_loop is err and len(tripped) == 1
        assert err.name == "broken" and err.exits == FAST.crash_loop_exits
        assert "config missing: ADLOOP_X" in err.log_tail and "config missing" in str(err)
        # 4 exits: the first 3 restarted with doubling backoff (capped), the 4th not
        assert [e.exit_code for e in sup.exits] == [2, 2, 2, 2]
        assert [e.backoff_s for e in sup.exits] == [0.05, 0.1, 0.2, None]
        assert proc.starts == FAST.crash_loop_exits and proc.restarts == 3
        assert not proc.alive()
    finally:
        stack.stop()


def test_a_process_stopped_on_purpose_stays_stopped(tmp_path: Path) -> None:
    stack = _stack(tmp_path)
    proc = stack.add("sleeper", [], command=[sys.executable, "-c",
                                             "import time; time.sleep(600)"])
    proc.start()
    sup = stack.supervise(FAST)
    try:
        _until("the supervisor saw it running", lambda: proc.alive())
        proc.stop()
        after = sup.passes                    # many supervisor passes
        _until("5 more supervisor passes", lambda: sup.passes >= after + 5)
        assert not proc.alive() and proc.restarts == 0 and sup.exits == []
    finally:
        stack.stop()


def test_restart_backoff_doubles_up_to_its_cap() -> None:
    p = RestartPolicy(backoff_initial_s=1.0, backoff_max_s=30.0)
    assert [p.backoff_s(n) for n in range(1, 8)] == [1, 2, 4, 8, 16, 30, 30]


def test_the_demo_stops_on_a_crash_loop_and_keeps_the_log_tail(tmp_path: Path) -> None:
    from adloop.demo import Demo, DemoSettings

    demo = Demo(DemoSettings(out=tmp_path / "demo", bootstrap_servers="127.0.0.1:1",
                             restart_backoff_s=0.05, restart_backoff_max_s=0.1,
                             crash_loop_exits=3, crash_loop_window_s=60.0))
    proc = demo.stack.add("serve", [], command=[
        sys.executable, "-c", "import sys; print('cannot bind port', flush=True); sys.exit(1)"])
    proc.start()
    demo.supervise()
    try:
        assert demo.stop.wait(60), "the demo was not told to stop"
        assert demo.crash_loop is not None and demo.crash_loop.name == "serve"
        assert "cannot bind port" in str(demo.crash_loop)
        assert demo.restarts() == {"serve": 2}
        assert demo.restarts_text() == "restarts 2 (serve=2)"
    finally:
        demo.stack.stop()
