"""A live-stack process that never becomes ready is reported with where it waits.

``adloop.stack.ManagedProcess.wait_ready`` asks a process that dumps its stacks on
SIGUSR1 (``dumps_stacks``: the live stack's Kafka workload does) for them before it
gives up, so a hang in CI names the call it hangs in instead of only "not ready".
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from adloop.stack import ManagedProcess, ProcessFailedError, free_port

STUCK = ("import faulthandler, signal, threading\n"
         "faulthandler.register(signal.SIGUSR1, all_threads=True)\n"
         "def waiting_for_a_group_that_never_forms():\n"
         "    threading.Event().wait()\n"
         "print('started', flush=True)\n"
         "waiting_for_a_group_that_never_forms()\n")


def _stuck(tmp_path: Path, dumps_stacks: bool) -> ManagedProcess:
    """A process that answers SIGUSR1 and never serves its readiness URL, once started."""
    proc = ManagedProcess("stuck", [], tmp_path, command=[sys.executable, "-c", STUCK],
                          ready_url=f"http://127.0.0.1:{free_port()}/readyz")
    proc.dumps_stacks = dumps_stacks
    proc.start()
    deadline = time.monotonic() + 60     # only keeps a broken run from hanging
    while "started" not in proc.log_tail():
        assert proc.alive() and time.monotonic() < deadline, proc.log_tail()
        time.sleep(0.05)
    return proc


def test_a_process_never_ready_is_reported_with_its_threads_stacks(tmp_path: Path) -> None:
    proc = _stuck(tmp_path, dumps_stacks=True)
    try:
        with pytest.raises(ProcessFailedError, match="threads' stacks") as failure:
            proc.wait_ready(1.0)
        assert "waiting_for_a_group_that_never_forms" in str(failure.value)
        assert proc.alive()        # the dump leaves it running: stopping it is the owner's
    finally:
        proc.stop()


def test_a_process_that_cannot_dump_is_reported_as_before(tmp_path: Path) -> None:
    proc = _stuck(tmp_path, dumps_stacks=False)
    try:
        with pytest.raises(ProcessFailedError, match="not ready after") as failure:
            proc.wait_ready(0.5)
        assert "stacks" not in str(failure.value)
        assert proc.alive()        # no SIGUSR1 sent: it would have ended a process without
    finally:
        proc.stop()
