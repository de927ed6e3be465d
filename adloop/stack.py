"""Run adloop processes as real OS processes: start, wait until ready, kill, restart, stop.

Used by ``adloop demo``, the closed-loop test and the fault-injection runner. Each
process is ``python -m adloop <command> ...`` with its own log file; readiness is
its ``/readyz`` answering 200. Stopping sends SIGTERM (clean shutdown) and falls back
to SIGKILL; :meth:`ManagedProcess.kill` is the ``kill -9`` of fault tests.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from streams.broker import BrokerSettings, EmbeddedBroker
from streams.logs import get_logger
from streams.settings import KafkaSettings
from streams.topics import create_topics

log = get_logger(__name__)


class ProcessFailedError(RuntimeError):
    """A managed process exited or never became ready."""


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


class ManagedProcess:
    """One adloop subcommand in its own process, with a log file and a readiness URL."""

    def __init__(self, name: str, argv: Sequence[str], log_dir: Path,
                 ready_url: str | None = None, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.argv = [sys.executable, "-m", "adloop", *argv]
        self.ready_url = ready_url
        self.env = {**os.environ, "ADLOOP_LOG_JSON": "1", "PYTHONUNBUFFERED": "1",
                    **(env or {})}
        self.log_path = Path(log_dir) / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

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
        raise ProcessFailedError(f"{self.name} not ready after {timeout_s}s:\n{self.log_tail()}")

    def kill(self) -> None:
        """``kill -9``: no clean-up runs in the process."""
        if self.alive():
            assert self.proc is not None
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)
            log.info("process.killed", name=self.name)

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM, wait, then SIGKILL. Returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
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
            env: dict[str, str] | None = None) -> ManagedProcess:
        proc = ManagedProcess(name, argv, self.run_dir / "logs", ready_url, env)
        self.processes[name] = proc
        return proc

    def stop(self) -> dict[str, int | None]:
        """Stop processes in reverse start order, then the broker."""
        codes = {name: p.stop() for name, p in reversed(list(self.processes.items()))}
        if self.broker is not None:
            self.broker.stop()
        return codes

    def __enter__(self) -> LocalStack:
        self.start_broker()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
