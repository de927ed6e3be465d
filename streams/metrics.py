"""The metrics base every adloop process uses.

One HTTP endpoint per process serves ``/metrics`` (Prometheus text format),
``/healthz`` (the process is alive) and ``/readyz`` (it can do its job; the body
names what it is waiting for). Metric names start with ``adloop_`` and follow
Prometheus naming rules: base units in the name, ``_total`` for counters,
histograms for latencies, bounded label values only.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

PREFIX = "adloop_"
_NAME_RE = re.compile(r"^adloop_[a-z][a-z0-9_]*$")

# Latency buckets in seconds, 0.5 ms .. 10 s.
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)
# Freshness / lag buckets in seconds, 0.1 s .. 1 h.
FRESHNESS_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600)


def _checked(name: str) -> str:
    if not _NAME_RE.match(name):
        raise ValueError(f"metric name {name!r} must match {_NAME_RE.pattern}")
    return name


def counter(name: str, doc: str, labels: tuple[str, ...] = (),
            registry: CollectorRegistry = REGISTRY) -> Counter:
    """A counter; ``name`` ends in ``_total`` (the client adds the suffix on exposition)."""
    if not name.endswith("_total"):
        raise ValueError(f"counter {name!r} must end in _total")
    return Counter(_checked(name), doc, labels, registry=registry)


def gauge(name: str, doc: str, labels: tuple[str, ...] = (),
          registry: CollectorRegistry = REGISTRY) -> Gauge:
    return Gauge(_checked(name), doc, labels, registry=registry)


def histogram(name: str, doc: str, labels: tuple[str, ...] = (),
              buckets: tuple[float, ...] = LATENCY_BUCKETS,
              registry: CollectorRegistry = REGISTRY) -> Histogram:
    if not (name.endswith("_seconds") or name.endswith("_bytes") or name.endswith("_size")
            or name.endswith("_ratio") or name.endswith("_width")):
        raise ValueError(f"histogram {name!r} must name its unit")
    return Histogram(_checked(name), doc, labels, buckets=buckets, registry=registry)


ReadyCheck = Callable[[], tuple[bool, dict[str, Any]]]


class _Handler(BaseHTTPRequestHandler):
    server: _MetricsHTTPServer

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            body = generate_latest(self.server.registry)
            self._send(200, body, CONTENT_TYPE_LATEST)
        elif path == "/healthz":
            self._send(200, b'{"status":"ok"}', "application/json")
        elif path == "/readyz":
            ok, detail = self.server.ready_check()
            payload = json.dumps({"ready": ok, **detail}).encode()
            self._send(200 if ok else 503, payload, "application/json")
        else:
            self._send(404, b'{"error":"not found"}', "application/json")

    def _send(self, code: int, body: bytes, ctype: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        return


class _MetricsHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    registry: CollectorRegistry
    ready_check: ReadyCheck


class MetricsServer:
    """``/metrics``, ``/healthz`` and ``/readyz`` on a background thread."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0,
                 ready_check: ReadyCheck | None = None,
                 registry: CollectorRegistry = REGISTRY) -> None:
        self._httpd = _MetricsHTTPServer((host, port), _Handler)
        self._httpd.registry = registry
        self._httpd.ready_check = ready_check or (lambda: (True, {}))
        self._thread = threading.Thread(target=self._httpd.serve_forever,
                                        name="metrics-http", daemon=True)

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        host = self._httpd.server_address[0]
        return f"http://{host!s}:{self.port}"

    def start(self) -> MetricsServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


def start_metrics_server(port: int, host: str = "127.0.0.1",
                         ready_check: ReadyCheck | None = None) -> MetricsServer:
    """Start the process's one metrics endpoint; ``port=0`` picks a free port."""
    return MetricsServer(host, port, ready_check).start()


BUILD_INFO = gauge("adloop_build_info", "Always 1; labels carry the version.",
                   ("version", "process"))
