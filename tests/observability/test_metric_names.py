"""Metric naming lint over the code and the inventory (docs/metrics.md)."""

from __future__ import annotations

from deploy.observability.inventory import (
    BY_NAME,
    METRICS,
    code_metrics,
    naming_problems,
)


def test_naming_rules_catch_bad_names() -> None:
    assert naming_problems("adloop_requests", "counter", ())
    assert naming_problems("requests_total", "counter", ())
    assert naming_problems("adloop_latency_ms", "histogram", ())
    assert naming_problems("adloop_server_latency", "histogram", ())
    assert naming_problems("adloop_x_total", "counter", ("user_id",))
    assert naming_problems("adloop_x_total", "counter", ("request_id",))
    assert naming_problems("adloop_last_publish_timestamp", "gauge", ())
    assert not naming_problems("adloop_server_request_duration_seconds", "histogram", ())
    assert not naming_problems("adloop_dead_letters_total", "counter", ("topic", "reason"))


def test_inventory_follows_the_naming_rules() -> None:
    assert len(BY_NAME) == len(METRICS), "duplicate names in the inventory"
    bad = {m.name: naming_problems(m.name, m.kind, m.labels) for m in METRICS}
    bad = {k: v for k, v in bad.items() if v}
    assert not bad, bad


def test_code_metric_definitions_follow_the_naming_rules() -> None:
    found = code_metrics()
    assert any(m.name == "adloop_dead_letters_total" for m in found), "scanner found nothing"
    bad = {f"{m.name} ({m.where})": naming_problems(m.name, m.kind, m.labels)
           for m in found if naming_problems(m.name, m.kind, m.labels)}
    assert not bad, bad
    summaries = [f"{m.name} ({m.where})" for m in found if m.kind not in
                 ("counter", "gauge", "histogram")]
    assert not summaries, f"use counter/gauge/histogram (histograms, not summaries): {summaries}"
    dynamic = [f"{m.name} ({m.where})" for m in found if m.labels == ("<dynamic>",)]
    assert not dynamic, f"label names must be literal tuples so they can be checked: {dynamic}"


def test_every_code_metric_is_in_the_inventory_with_its_type_and_labels() -> None:
    problems = []
    for m in code_metrics():
        inv = BY_NAME.get(m.name)
        if inv is None:
            problems.append(f"{m.name} ({m.where}) is not in deploy/observability/inventory.py")
        elif (inv.kind, inv.labels) != (m.kind, m.labels):
            problems.append(f"{m.name} ({m.where}) is a {m.kind}{m.labels} in the code but a "
                            f"{inv.kind}{inv.labels} in the inventory")
    assert not problems, "\n".join(problems)


def test_metrics_not_marked_planned_exist_in_the_code() -> None:
    in_code = {m.name for m in code_metrics()}
    missing = [m.name for m in METRICS if not m.planned and m.name not in in_code]
    assert not missing, f"inventory lists these as live, but no code defines them: {missing}"
