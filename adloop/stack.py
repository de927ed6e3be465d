"""Run adloop processes as real OS processes: start, wait until ready, kill, restart, stop.

Used by ``adloop demo``, the closed-loop test and the fault-injection runner. Each
process is ``python -m adloop <command> ...`` with its own log file; readiness is
its ``/readyz`` answering 200. Stopping sends SIGTERM (clean shutdown) and falls back
to SIGKILL; :meth:`ManagedProcess.kill` is the ``kill -9`` of fault tests.

:class:`Supervisor` (``LocalStack.supervise``) restarts a process that exits on its
own, as compose's ``restart: unless-stopped`` does: a process stopped through
:meth:`ManagedProcess.stop` stays stopped, any other exit is restarted after an
exponential backoff. A process that exits ``crash_loop_exits`` times within
``crash_loop_window_s`` is in a crash loop: it is left down and the supervisor's
owner is told (the demo stops with a non-zero exit and that process's log tail).

:class:`LocalStack` writes a ``model-updates`` keyring into its run directory at
start-up (a random key, mode 0600; one already there is kept) and hands it to every
process it runs
(``ADLOOP_UPDATE_KEYS_FILE``): the learner signs with it, the servers verify with it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from streams.broker import BrokerSettings, EmbeddedBroker
from streams.logs import get_logger
from streams.settings import KafkaSettings
from streams.signing import Keyring, generate_keyring_file
from streams.topics import create_topics

if TYPE_CHECKING:
    from adloop.balancer import Balancer

log = get_logger(__name__)


class ProcessFailedError(RuntimeError):
    """A managed process exited or never became ready."""


class CrashLoopError(ProcessFailedError):
    """A supervised process kept exiting; the message ends with its log tail."""

    def __init__(self, name: str, exits: int, window_s: float, last_code: int | None,
                 log_tail: str) -> None:
        super().__init__(f"{name} exited {exits} times within {window_s:g}s (last exit code "
                         f"{last_code}): crash loop, not restarted again. End of its log:\n"
                         f"{log_tail}")
        self.name = name
        self.exits = exits
        self.log_tail = log_tail


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def http_ok(url: str, timeout_s: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            return 200 <= resp.status < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


STACK_DUMP_WAIT_S = 2.0
"""How long a process that dumps its stacks on SIGUSR1 gets to write them."""


class ManagedProcess:
    """One adloop subcommand in its own process, with a log file and a readiness URL."""

    def __init__(self, name: str, argv: Sequence[str], log_dir: Path,
                 ready_url: str | None = None, env: dict[str, str] | None = None,
                 command: Sequence[str] | None = None) -> None:
        self.name = name
        self.argv = list(command) if command is not None else [
            sys.executable, "-m", "adloop", *argv]
        self.ready_url = ready_url
        self.env = {**os.environ, "ADLOOP_LOG_JSON": "1", "PYTHONUNBUFFERED": "1",
                    **(env or {})}
        self.log_path = Path(log_dir) / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.restarts = 0
        """Starts by the supervisor after an exit of the process's own."""
        self.stopped = False
        """Stopped on purpose (:meth:`stop`): the supervisor leaves it down."""
        self.stop_signal: signal.Signals = signal.SIGTERM
        """What :meth:`stop` sends first (the process's clean shutdown)."""
        self.dumps_stacks = False
        """It dumps its threads' stacks to its log on SIGUSR1 (``faulthandler``): when it
        runs but is not ready in time, :meth:`wait_ready` asks for them and reports them."""

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> ManagedProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as out:
            out.write(f"--- start #{self.starts + 1}: {' '.join(self.argv)}\n".encode())
            out.flush()
            self.proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT,
                                         env=self.env, start_new_session=True)
        self.starts += 1
        self.stopped = False
        log.info("process.started", name=self.name, pid=self.proc.pid)
        return self

    def wait_ready(self, timeout_s: float = 120.0) -> ManagedProcess:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise ProcessFailedError(f"{self.name} exited with {self.proc.returncode}:\n"
                                    f"{self.log_tail()}")
            if self.ready_url is None or http_ok(self.ready_url):
                return self
            time.sleep(0.25)
        if self.dumps_stacks and self.alive() and self.pid is not None:
            os.kill(self.pid, signal.SIGUSR1)
            time.sleep(STACK_DUMP_WAIT_S)
            raise ProcessFailedError(f"{self.name} not ready after {timeout_s}s; its log, "
                                     "which ends with its threads' stacks:\n"
                                     f"{self.log_tail(200)}")
        raise ProcessFailedError(f"{self.name} not ready after {timeout_s}s:\n{self.log_tail()}")

    def kill(self) -> None:
        """``kill -9``: no clean-up runs in the process."""
        if self.alive():
            assert self.proc is not None
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)
            log.info("process.killed", name=self.name)

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """:attr:`stop_signal` (SIGTERM), wait, then SIGKILL. Returns the exit code."""
        self.stopped = True
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            os.kill(self.proc.pid, self.stop_signal)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("process.sigkill_after_timeout", name=self.name)
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(30)
        return self.proc.returncode

    def restart(self, ready_timeout_s: float = 120.0) -> ManagedProcess:
        self.stop()
        return self.start().wait_ready(ready_timeout_s)

    def log_tail(self, n: int = 40) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])


@dataclass(frozen=True)
class RestartPolicy:
    """How :class:`Supervisor` restarts: backoff ``initial * 2**(n-1)`` up to ``max``
    for the n-th exit in a row (reset once a process ran ``stable_after_s``), and the
    crash loop: ``crash_loop_exits`` exits within ``crash_loop_window_s``."""

    backoff_initial_s: float = 1.0
    backoff_max_s: float = 30.0
    stable_after_s: float = 30.0
    crash_loop_exits: int = 5
    crash_loop_window_s: float = 120.0

    def backoff_s(self, exits_in_a_row: int) -> float:
        return float(min(self.backoff_max_s,
                         self.backoff_initial_s * 2 ** max(0, exits_in_a_row - 1)))


@dataclass
class ProcessExit:
    """One exit the supervisor saw (and what it did about it)."""

    process: str
    exit_code: int | None
    at: float
    """``time.monotonic()`` when it was seen."""
    ran_s: float
    backoff_s: float | None
    """Seconds until the restart; None when it was not restarted (crash loop)."""


@dataclass
class _Watch:
    started_at: float = field(default_factory=time.monotonic)
    in_a_row: int = 0
    exits: list[float] = field(default_factory=list)
    restart_at: float | None = None
    current: subprocess.Popen[bytes] | None = None
    """The OS process last seen running."""
    handled: subprocess.Popen[bytes] | None = None
    """The OS process whose exit was already handled."""


class Supervisor:
    """Restarts the stack's processes that exit on their own (a background thread).

    ``on_exit`` is called for every exit seen, ``on_crash_loop`` once when a process
    trips the crash loop (:attr:`crash_loop` keeps the error). :meth:`hold` keeps
    named processes out of its hands while a fault test kills and restarts them."""

    def __init__(self, processes: dict[str, ManagedProcess], policy: RestartPolicy,
                 on_exit: Callable[[ProcessExit], None] | None = None,
                 on_crash_loop: Callable[[CrashLoopError], None] | None = None,
                 poll_s: float = 0.2) -> None:
        self.processes = processes
        self.policy = policy
        self.on_exit = on_exit
        self.on_crash_loop = on_crash_loop
        self.poll_s = poll_s
        self.exits: list[ProcessExit] = []
        self.crash_loop: CrashLoopError | None = None
        self.passes = 0
        """Completed looks at every process (one each ``poll_s``): it is still watching."""
        self._held: set[str] = set()
        self._watch: dict[str, _Watch] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="supervisor", daemon=True)

    def start(self) -> Supervisor:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(10)

    def restarts(self) -> dict[str, int]:
        return {name: p.restarts for name, p in self.processes.items()}

    @contextmanager
    def hold(self, names: Sequence[str]) -> Iterator[None]:
        """Leave these processes alone (a fault kills and restarts them itself)."""
        with self._lock:
            self._held.update(names)
        try:
            yield
        finally:
            with self._lock:
                self._held.difference_update(names)

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            with self._lock:
                for name, proc in list(self.processes.items()):
                    if self._stop.is_set():
                        return
                    try:
                        self._check(name, proc, time.monotonic())
                    except Exception:   # one process's trouble must not end supervision
                        log.exception("supervisor.check_failed", name=name)
                self.passes += 1

    def _check(self, name: str, proc: ManagedProcess, now: float) -> None:
        w = self._watch.setdefault(name, _Watch())
        if name in self._held or proc.stopped or proc.proc is None:
            return
        if proc.alive():
            if w.current is not proc.proc:   # started since the last look
                w.current, w.started_at, w.restart_at = proc.proc, now, None
            if w.in_a_row and now - w.started_at >= self.policy.stable_after_s:
                w.in_a_row = 0
            return
        if w.handled is not proc.proc:
            self._exited(name, proc, w, now)
        elif w.restart_at is not None and now >= w.restart_at:
            w.restart_at = None
            proc.start()
            proc.restarts += 1
            w.current, w.started_at = proc.proc, now
            log.warning("supervisor.restarted", name=name, restarts=proc.restarts,
                        pid=proc.pid)

    def _exited(self, name: str, proc: ManagedProcess, w: _Watch, now: float) -> None:
        assert proc.proc is not None
        code = proc.proc.returncode
        if w.current is not proc.proc:      # it exited before it was ever seen running
            w.current, w.started_at = proc.proc, now
        w.handled = proc.proc
        w.in_a_row = 0 if now - w.started_at >= self.policy.stable_after_s else w.in_a_row
        w.in_a_row += 1
        w.exits = [t for t in w.exits if now - t < self.policy.crash_loop_window_s] + [now]
        looping = len(w.exits) >= self.policy.crash_loop_exits
        backoff = None if looping else self.policy.backoff_s(w.in_a_row)
        w.restart_at = None if backoff is None else now + backoff
        ev = ProcessExit(name, code, now, round(now - w.started_at, 3), backoff)
        self.exits.append(ev)
        log.warning("supervisor.process_exited", name=name, exit_code=code,
                    ran_s=ev.ran_s, restart_in_s=backoff)
        if self.on_exit is not None:
            self.on_exit(ev)
        if looping and self.crash_loop is None:
            err = CrashLoopError(name, len(w.exits), self.policy.crash_loop_window_s, code,
                                 proc.log_tail())
            self.crash_loop = err
            log.error("supervisor.crash_loop", name=name, exits=len(w.exits))
            if self.on_crash_loop is not None:
                self.on_crash_loop(err)


class LocalStack:
    """An embedded broker plus managed adloop processes under one run directory."""

    def __init__(self, run_dir: Path, bootstrap_servers: str | None = None,
                 topic_prefix: str = "", broker_heap: str = "768m") -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.broker: EmbeddedBroker | None = None
        if bootstrap_servers is None:
            self.broker = EmbeddedBroker(BrokerSettings(
                port=0, data_dir=self.run_dir / "kafka", heap=broker_heap))
        self._bootstrap = bootstrap_servers
        self.topic_prefix = topic_prefix
        self.processes: dict[str, ManagedProcess] = {}
        self.keys_file = self.run_dir / "model-updates.keys"
        """The keyring the stack's learner signs and its servers verify with."""
        self.keyring: Keyring = generate_keyring_file(self.keys_file)
        self.supervisor: Supervisor | None = None
        self.balancer: Balancer | None = None
        """HAProxy in front of the serving replicas (:meth:`add_servers`, more than one)."""

    @property
    def kafka(self) -> KafkaSettings:
        bootstrap = self.broker.bootstrap_servers if self.broker else self._bootstrap
        assert bootstrap is not None
        return KafkaSettings(bootstrap_servers=bootstrap, topic_prefix=self.topic_prefix)

    def kafka_args(self) -> list[str]:
        k = self.kafka
        return ["--bootstrap-servers", k.bootstrap_servers, "--topic-prefix", k.topic_prefix]

    def start_broker(self) -> None:
        if self.broker is not None:
            self.broker.start()
        create_topics(self.kafka.bootstrap_servers, self.topic_prefix)

    def add(self, name: str, argv: Sequence[str], ready_url: str | None = None,
            env: dict[str, str] | None = None,
            command: Sequence[str] | None = None) -> ManagedProcess:
        env = {"ADLOOP_UPDATE_KEYS_FILE": str(self.keys_file), **(env or {})}
        proc = ManagedProcess(name, argv, self.run_dir / "logs", ready_url, env, command)
        self.processes[name] = proc
        return proc

    def add_servers(self, argv: Sequence[str], replicas: int, port: int,
                    cache_dir: Path) -> list[str]:
        """``adloop serve`` with ``argv`` (Kafka, model flags) on ``port``, the URL the rest
        of the stack uses. One replica: the process ``serve`` on that port. More: the
        processes ``serve-1`` ... ``serve-N`` on ports of their own, each with its own
        cache directory and server id and each following ``model-updates`` itself,
        behind ``lb``, HAProxy on ``port`` (:mod:`adloop.balancer`), which sends
        requests only to replicas whose ``/readyz`` answers 200. Returns the names of
        the serving processes; ``lb`` comes after them in :attr:`processes`."""
        if replicas < 1:
            raise ValueError(f"server replicas must be >= 1, not {replicas}")
        if replicas == 1:
            self.add("serve", ["serve", *argv, "--port", str(port), "--cache-dir",
                               str(cache_dir)], f"http://127.0.0.1:{port}/readyz")
            return ["serve"]
        from adloop.balancer import Balancer, Replica

        names, members = [], []
        for i in range(1, replicas + 1):
            name, own = f"serve-{i}", free_port()
            self.add(name, ["serve", *argv, "--port", str(own), "--server-id", name,
                            "--cache-dir", str(Path(cache_dir) / name)],
                     f"http://127.0.0.1:{own}/readyz")
            names.append(name)
            members.append(Replica(name, f"127.0.0.1:{own}"))
        lb = Balancer(self.run_dir / "lb", port, members, log_dir=self.run_dir / "logs",
                      ready_path="/readyz")
        self.processes["lb"] = lb.process
        self.balancer = lb
        log.info("stack.server_replicas", replicas=replicas, url=f"http://127.0.0.1:{port}",
                 config=str(lb.config_path))
        return names

    def supervise(self, policy: RestartPolicy | None = None,
                  on_exit: Callable[[ProcessExit], None] | None = None,
                  on_crash_loop: Callable[[CrashLoopError], None] | None = None) -> Supervisor:
        """Start restarting processes that exit on their own (see :class:`Supervisor`)."""
        if self.supervisor is not None:
            self.supervisor.stop()
        self.supervisor = Supervisor(self.processes, policy or RestartPolicy(), on_exit,
                                     on_crash_loop).start()
        return self.supervisor

    def stop_supervisor(self) -> None:
        if self.supervisor is not None:
            self.supervisor.stop()

    def stop(self) -> dict[str, int | None]:
        """Stop the supervisor, the processes in reverse start order, then the broker."""
        self.stop_supervisor()
        codes = {name: p.stop() for name, p in reversed(list(self.processes.items()))}
        if self.broker is not None:
            self.broker.stop()
        return codes

    def __enter__(self) -> LocalStack:
        self.start_broker()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
