"""The metrics base: adloop_ names, /metrics /healthz /readyz, promtool-clean exposition."""

from __future__ import annotations

import shutil
import subprocess
import urllib.error
import urllib.request

import pytest
from prometheus_client import CollectorRegistry

from streams import kafka_io  # noqa: F401  (registers the Kafka helper metrics)
from streams.metrics import counter, histogram, start_metrics_server


def test_metric_names_follow_prometheus_rules() -> None:
    reg = CollectorRegistry()
    with pytest.raises(ValueError, match="_total"):
        counter("adloop_requests", "no suffix", registry=reg)
    with pytest.raises(ValueError, match="must match"):
        counter("requests_total", "no prefix", registry=reg)
    with pytest.raises(ValueError, match="unit"):
        histogram("adloop_request_latency", "no unit", registry=reg)
    counter("adloop_requests_total", "ok", registry=reg)


def test_metrics_health_and_readiness_endpoints() -> None:
    ready = {"ok": False}
    server = start_metrics_server(0, ready_check=lambda: (ready["ok"], {"waiting_for": "model"}))
    try:
        body = urllib.request.urlopen(server.url + "/metrics").read().decode()
        assert "adloop_dead_letters_total" in body or "adloop_produced_records" in body
        assert urllib.request.urlopen(server.url + "/healthz").status == 200
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(server.url + "/readyz")
        assert err.value.code == 503 and b"model" in err.value.read()
        ready["ok"] = True
        assert urllib.request.urlopen(server.url + "/readyz").status == 200
        if shutil.which("promtool"):
            res = subprocess.run(["promtool", "check", "metrics"], input=body.encode(),
                                 capture_output=True)
            assert res.returncode == 0, res.stdout + res.stderr
    finally:
        server.stop()
