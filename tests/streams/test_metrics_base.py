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


def test_every_process_exports_its_start_time_for_the_restart_alert() -> None:
    """``process_start_time_seconds`` (prometheus-client's process collector, on the
    registry every adloop endpoint serves) is the start of *that* process: a restart
    changes it, which is what ``AdloopProcessRestarted`` watches."""
    import sys
    import time

    from prometheus_client.parser import text_string_to_metric_families

    script = ("import sys\n"
              "from streams.metrics import start_metrics_server\n"
              "s = start_metrics_server(0)\n"
              "print(s.url, flush=True)\n"
              "sys.stdin.read()\n")
    before = time.time()
    proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        after = time.time()
        body = urllib.request.urlopen(url + "/metrics").read().decode()
    finally:
        proc.communicate("", timeout=30)
    starts = [s.value for fam in text_string_to_metric_families(body) for s in fam.samples
              if s.name == "process_start_time_seconds"]
    assert len(starts) == 1
    # /proc gives the boot time in whole seconds and the start in clock ticks
    assert before - 1.0 <= starts[0] <= after + 1.0
