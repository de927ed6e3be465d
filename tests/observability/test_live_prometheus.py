"""Dashboards and rules against a real Prometheus scraping real adloop processes.

The processes are ``deploy.observability.promlive.LIVE_PROCESSES`` (the whole loop:
joiner, learner, server and traffic, plus a Kafka workload through the shared helpers).
Queries reading metrics of processes that are not started are skipped
(listed in the test output), never failed; every other query must succeed and
return series unless it is marked as allowed to be empty.
"""

from __future__ import annotations

import time

import httpx
import pytest

from deploy.observability import promlive
from deploy.observability.dashboards import panel_queries
from deploy.observability.promlive import LiveStack, PrometheusServer
from tests.observability.conftest import PrometheusFactory

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def prom(live_stack: LiveStack, prometheus_server: PrometheusFactory) -> PrometheusServer:
    server = prometheus_server(live_stack.targets())
    # Rates need two scrapes; recording rules one more evaluation.
    server.wait_for("adloop:produced_records:rate1m > 0", timeout_s=60)
    server.wait_for("adloop:consumed_records:rate1m > 0", timeout_s=60)
    if "learn" in live_stack.processes:   # the loop closed: feedback trained, served
        server.wait_for('sum(adloop_learner_lists_total{outcome="trained"}) > 0',
                        timeout_s=180)
        server.wait_for("sum(adloop_learner_snapshots_published_total) > 1", timeout_s=120)
        server.wait_for("sum(rate(adloop_server_requests_total[1m])) > 0", timeout_s=60)
    # every rule evaluated at least once (a rule not evaluated yet has health "unknown")
    deadline = time.monotonic() + 60
    while (pending := [name for name, health, _ in promlive.rule_health(server)
                       if health == "unknown"]):
        assert time.monotonic() < deadline, f"rules never evaluated: {pending}"
        time.sleep(0.5)
    return server


def test_every_target_is_up(live_stack: LiveStack, prom: PrometheusServer) -> None:
    health = {(t["labels"]["job"], t["health"]) for t in prom.targets()}
    assert health == {(job, "up") for job in live_stack.targets()}


def test_every_rule_loads_and_evaluates_without_error(prom: PrometheusServer) -> None:
    health = promlive.rule_health(prom)
    assert len(health) >= 20
    bad = [h for h in health if h[1] != "ok"]
    assert not bad, bad


def test_every_panel_query_and_recording_rule_evaluates(live_stack: LiveStack,
                                                        prom: PrometheusServer) -> None:
    results = promlive.evaluate(prom, live_stack.provides())
    failed = [f"{r.id}: {r.status}: {r.reason} [{r.expr}]" for r in results if r.failed]
    assert not failed, "\n".join(failed)
    assert len([r for r in results if r.kind == "panel"]) == len(panel_queries())
    ok = [r for r in results if r.status == "ok"]
    skipped = sorted({r.reason for r in results if r.status == "skipped"})
    print(f"\n{len(ok)} ok, {len(results) - len(ok)} not checked: {skipped}")
    # What the running processes must have produced, whatever else is skipped.
    ok_ids = {r.id for r in ok}
    for rule in ("adloop:produced_records:rate1m", "adloop:consumed_records:rate1m",
                 "adloop:consumer_lag_records:sum", "adloop:dead_letters:rate5m"):
        assert rule in ok_ids, rule
    assert "adloop-streams/Consumer lag by partition/A" in ok_ids


def test_dead_letter_alert_goes_pending_on_malformed_traffic(prom: PrometheusServer) -> None:
    # The kafka loop sends one malformed click per 50 records: > 1% of clicks.
    if "kafka-loop" not in promlive.LIVE_PROCESSES:
        pytest.skip("only the kafka loop injects malformed records")
    deadline = time.monotonic() + 30
    states: dict[str, str] = {}
    while time.monotonic() < deadline:
        states = {a["labels"]["alertname"]: a["state"] for a in prom.alerts()}
        if states.get("AdloopDeadLetterRate") in ("pending", "firing"):
            break
        time.sleep(1)
    assert states.get("AdloopDeadLetterRate") in ("pending", "firing"), states
    assert "AdloopTargetDown" not in states


def test_promtool_check_metrics_on_every_process(live_stack: LiveStack) -> None:
    for name, url in live_stack.metrics_urls().items():
        body = httpx.get(url, timeout=10).text
        assert "adloop_build_info" in body, name
        clean, out = promlive.promtool_check_metrics(body)
        assert clean, f"{name}: {out}"
