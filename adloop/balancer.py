"""HAProxy in front of several ``adloop serve`` replicas.

:func:`render_config` writes the configuration for N replicas: every replica is
health-checked with ``GET /readyz`` (a replica that has no snapshot yet, or that is
stopping, leaves the rotation within about a second), requests go to the replica with
the fewest in flight, and a request that could not be answered by one replica is sent
again to another one: when the connection is refused or reset before any answer
(a replica that is restarting or shutting down), or when the replica answers 503
(not ready). A request is retried only before the replica answered anything, so a
recommendation that was served (and logged as an impression) is never served twice.
Every response carries ``X-Adloop-Replica`` (the replica's name in the balancer) next
to the ``server_id`` and ``model_version`` of its body.

:class:`Balancer` runs the distribution's ``haproxy`` as a child process of the
embedded stack (``adloop demo --server-replicas N``) on a generated configuration and
reads the replicas' state from its stats socket. ``compose.yaml`` runs the official
``haproxy`` image on ``deploy/haproxy/haproxy.cfg``, rendered by this module too::

    python -m adloop.balancer > deploy/haproxy/haproxy.cfg
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from adloop.stack import ManagedProcess, ProcessFailedError
from streams.logs import get_logger

log = get_logger(__name__)

BACKEND = "replicas"
"""The backend (HAProxy's proxy name) holding the serving replicas."""
REPLICA_HEADER = "X-Adloop-Replica"


@dataclass(frozen=True)
class Replica:
    """One serving replica: its name in the balancer and its ``host:port``."""

    name: str
    address: str


@dataclass(frozen=True)
class BalancerSettings:
    """What the generated HAProxy configuration is told."""

    bind: str = "127.0.0.1:8080"
    replicas: tuple[Replica, ...] = ()
    check_interval_ms: int = 500
    """``GET /readyz`` every this often per replica."""
    fall: int = 2
    """Failed checks in a row that take a replica out of the rotation."""
    rise: int = 1
    """Passed checks in a row that put it back."""
    connect_timeout_ms: int = 1000
    server_timeout_s: float = 30.0
    client_timeout_s: float = 30.0
    queue_timeout_s: float = 5.0
    retries: int = 3
    """Further attempts of a request, each on another replica when there is one."""
    maxconn: int = 4096
    stats_socket: Path | None = None
    """A UNIX socket for ``show stat`` (replica states); none when None."""
    dns_resolver: str | None = None
    """``host:port`` of a DNS server that re-resolves replica host names (compose's
    127.0.0.11:53, so a recreated container is found again); None: resolved at start."""
    comment: str = ""
    extra_global: tuple[str, ...] = field(default_factory=tuple)


def render_config(s: BalancerSettings) -> str:
    """The ``haproxy.cfg`` text for ``s`` (HAProxy 2.6 or later)."""
    if not s.replicas:
        raise ValueError("a balancer needs at least one replica")
    names = [r.name for r in s.replicas]
    if len(set(names)) != len(names):
        raise ValueError(f"replica names must be unique: {names}")
    lines: list[str] = []
    if s.comment:
        lines += [f"# {line}".rstrip() for line in s.comment.splitlines()]
    lines += ["global",
              f"    maxconn {s.maxconn}",
              "    hard-stop-after 10s",   # a soft stop (SIGUSR1) waits this long at most
              "    log stderr format raw local0 notice"]
    if s.stats_socket is not None:
        lines.append(f"    stats socket {s.stats_socket} mode 600 level admin")
    lines += [f"    {x}" for x in s.extra_global]
    lines += ["",
              "defaults",
              "    mode http",
              "    log global",
              "    option dontlognull",
              f"    timeout connect {s.connect_timeout_ms}ms",
              f"    timeout client {s.client_timeout_s:g}s",
              f"    timeout server {s.server_timeout_s:g}s",
              f"    timeout queue {s.queue_timeout_s:g}s",
              "    timeout http-request 10s",
              "    timeout http-keep-alive 5s",
              f"    timeout check {max(s.check_interval_ms, 1000)}ms",
              # a request that got no answer at all (refused, reset, closed) or a 503
              # (not ready) goes again, to another replica each time
              f"    retries {s.retries}",
              "    retry-on conn-failure empty-response 503",
              "    option http-buffer-request",   # the whole body at hand for a retry
              "    option redispatch 1",
              ""]
    if s.dns_resolver is not None:
        lines += ["resolvers dns",
                  f"    nameserver dns1 {s.dns_resolver}",
                  "    hold valid 5s",
                  "    hold obsolete 5s",
                  ""]
    lines += ["frontend serve",
              f"    bind {s.bind}",
              "    option forwardfor",
              "    monitor-uri /haproxy-health",
              f"    default_backend {BACKEND}",
              "",
              f"backend {BACKEND}",
              "    balance leastconn",
              "    option httpchk",
              "    http-check send meth GET uri /readyz ver HTTP/1.1 hdr Host adloop",
              "    http-check expect status 200",
              f"    http-response set-header {REPLICA_HEADER} %s",
              f"    default-server check inter {s.check_interval_ms}ms "
              f"fastinter {max(100, s.check_interval_ms // 2)}ms fall {s.fall} rise {s.rise}"
              + (" resolvers dns init-addr last,libc,none" if s.dns_resolver else "")]
    lines += [f"    server {r.name} {r.address}" for r in s.replicas]
    return "\n".join(lines) + "\n"


COMPOSE = BalancerSettings(
    bind=":8080", replicas=(Replica("serve-1", "serve-1:8000"), Replica("serve-2", "serve-2:8000")),
    dns_resolver="127.0.0.11:53",
    comment="Generated by `python -m adloop.balancer` (adloop/balancer.py); do not edit.\n"
            "The official haproxy image in front of compose.yaml's serving replicas.")
"""``deploy/haproxy/haproxy.cfg``: compose.yaml's ``lb`` in front of serve-1 and serve-2."""


def haproxy_binary() -> str:
    """The ``haproxy`` executable (Debian's package, installed by ``scripts/bootstrap``)."""
    exe = shutil.which("haproxy") or next(
        (p for p in ("/usr/sbin/haproxy", "/sbin/haproxy") if Path(p).exists()), None)
    if exe is None:
        raise FileNotFoundError("haproxy is not installed (Debian: apt-get install haproxy; "
                                "scripts/bootstrap installs it)")
    return exe


def check_config(path: Path) -> None:
    """``haproxy -c``: raises ``ValueError`` with HAProxy's words if the file is invalid."""
    res = subprocess.run([haproxy_binary(), "-c", "-q", "-f", str(path)], capture_output=True,
                         text=True, timeout=30)
    if res.returncode != 0:
        raise ValueError(f"haproxy rejects {path}: {(res.stderr or res.stdout).strip()}")


class Balancer:
    """``haproxy`` as a child process in front of ``replicas`` on ``host:port``.

    The configuration and the stats socket live in ``work_dir``; :attr:`process` is a
    :class:`adloop.stack.ManagedProcess` (a supervisor restarts it like any other), ready
    when ``ready_path`` answers 200: HAProxy's own ``/haproxy-health`` (listening), or
    ``/readyz`` (passed on to a replica: at least one replica is in the rotation)."""

    def __init__(self, work_dir: Path, port: int, replicas: Sequence[Replica],
                 host: str = "127.0.0.1", check_interval_ms: int = 500,
                 log_dir: Path | None = None, ready_path: str = "/haproxy-health") -> None:
        self.work_dir = Path(work_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.host, self.port = host, port
        socket_path = self.work_dir / "haproxy.sock"
        if len(str(socket_path)) > 100:   # sun_path holds 108 bytes
            raise ValueError(f"the stats socket path is too long: {socket_path}")
        self.settings = BalancerSettings(bind=f"{host}:{port}", replicas=tuple(replicas),
                                         check_interval_ms=check_interval_ms,
                                         stats_socket=socket_path)
        self.config_path = self.work_dir / "haproxy.cfg"
        self.config_path.write_text(render_config(self.settings))
        check_config(self.config_path)
        self.process = ManagedProcess(
            "lb", [], log_dir or self.work_dir, ready_url=f"{self.url}{ready_path}",
            command=[haproxy_binary(), "-db", "-f", str(self.config_path)])
        # soft stop: stop listening, let the requests in flight finish, exit 0
        self.process.stop_signal = signal.SIGUSR1

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout_s: float = 30.0) -> Balancer:
        self.process.start().wait_ready(timeout_s)
        log.info("balancer.started", url=self.url, replicas=[r.name for r in
                                                             self.settings.replicas])
        return self

    def stop(self) -> None:
        self.process.stop()

    def replica_states(self) -> dict[str, str]:
        """``{replica: HAProxy's status}`` (``UP``, ``DOWN``, ``UP 1/2``, ``MAINT`` ...)."""
        assert self.settings.stats_socket is not None
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5)
            sock.connect(str(self.settings.stats_socket))
            sock.sendall(b"show stat\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        text = b"".join(chunks).decode()
        header, *rows = [line for line in text.splitlines() if line]
        cols = header.lstrip("# ").split(",")
        states = {}
        for row in rows:
            rec = dict(zip(cols, row.split(","), strict=False))
            if rec.get("pxname") == BACKEND and rec.get("svname") not in ("BACKEND",
                                                                          "FRONTEND"):
                states[rec["svname"]] = rec.get("status", "")
        return states

    def wait_replicas(self, up: Sequence[str], timeout_s: float = 60.0) -> dict[str, str]:
        """Wait until HAProxy has each of ``up`` in the rotation; returns all states."""
        deadline = time.monotonic() + timeout_s
        states: dict[str, str] = {}
        while time.monotonic() < deadline:
            if not self.process.alive():
                raise ProcessFailedError(f"haproxy exited:\n{self.process.log_tail()}")
            states = self.replica_states()
            if all(states.get(name, "").startswith("UP") for name in up):
                return states
            time.sleep(0.1)
        raise ProcessFailedError(f"replicas {list(up)} not up in haproxy after {timeout_s}s: "
                                 f"{states}")


def main(argv: Sequence[str] | None = None) -> int:
    """Print compose's ``deploy/haproxy/haproxy.cfg``."""
    del argv
    sys.stdout.write(render_config(COMPOSE))
    return 0


if __name__ == "__main__":
    sys.exit(main())
