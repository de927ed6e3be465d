"""Grafana dashboards as code: committed JSON is the generated JSON, and compose provisions it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from deploy.observability import dashboards as dash
from deploy.observability.inventory import BY_NAME, CLIENT_DEFAULT_METRICS

ROOT = Path(__file__).resolve().parents[2]
GRAFANA = ROOT / "deploy" / "grafana"


def test_committed_files_equal_the_generated_ones() -> None:
    stale = [str(p.relative_to(ROOT)) for p, content in dash.generated_files().items()
             if not p.exists() or p.read_text() != content]
    assert not stale, ("out of date; run `python -m deploy.observability.dashboards`: "
                       f"{stale}")


def test_regeneration_is_one_command_and_check_mode_agrees() -> None:
    res = subprocess.run([sys.executable, "-m", "deploy.observability.dashboards", "--check"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 0, res.stderr


def test_dashboards_cover_the_loop() -> None:
    uids = {d.uid for d in dash.DASHBOARDS}
    assert uids == {"adloop-overview", "adloop-serving", "adloop-streams", "adloop-learner",
                    "adloop-ad-stats"}
    committed = {p.stem for p in (GRAFANA / "dashboards").glob("*.json")}
    assert committed == uids, "the dashboards dir holds exactly the generated dashboards"
    exprs = [pq.expr for pq in dash.panel_queries() if pq.dashboard == "adloop-overview"]
    shown = set().union(*(dash.metrics_in(e) for e in exprs))
    text = " ".join(exprs)
    # traffic, latency, beam widths, lag, freshness, revenue, reward, loss, versions, swaps,
    # dead letters
    for metric in ("adloop_server_requests_total", "adloop_server_request_duration_seconds",
                   "adloop_server_beam_width", "adloop_consumer_lag_records",
                   "adloop_learner_freshness_seconds", "adloop_traffic_revenue_total",
                   "adloop_learner_mean_reward", "adloop_learner_loss",
                   "adloop_server_model_version_info", "adloop_server_swaps_total",
                   "adloop_dead_letters_total"):
        assert metric in shown, f"overview does not show {metric}"
    for rule in (dash.P99_LATENCY, dash.FRESHNESS_P95, dash.RPM, dash.LAG):
        assert rule in text, f"overview does not use the headline rule {rule}"


@pytest.mark.parametrize("uid", [d.uid for d in dash.DASHBOARDS])
def test_dashboard_json_is_well_formed(uid: str) -> None:
    model = json.loads((GRAFANA / "dashboards" / f"{uid}.json").read_text())
    assert model["uid"] == uid and model["title"].startswith("adloop / ")
    ids = [p["id"] for p in model["panels"]]
    assert len(ids) == len(set(ids)) and 0 not in ids
    titles = [p["title"] for p in model["panels"] if p["type"] != "row"]
    assert len(titles) == len(set(titles)), "panel titles are unique within a dashboard"
    for p in model["panels"]:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "prometheus"}
        assert p["targets"], p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)) and all(refs)
        for t in p["targets"]:
            assert t["expr"].strip()
            assert "$__" not in t["expr"], "the live test evaluates exprs as written"


def test_every_metric_a_panel_or_rule_reads_is_in_the_inventory() -> None:
    exprs = [pq.expr for pq in dash.panel_queries()]
    exprs += [r.expr for r in dash.RECORDING_RULES] + [a.expr for a in dash.ALERTS]
    unknown = set()
    for expr in exprs:
        for name in dash.metrics_in(expr):
            if name not in BY_NAME and name not in CLIENT_DEFAULT_METRICS:
                unknown.add(name)
    assert not unknown, f"not in deploy/observability/inventory.py: {sorted(unknown)}"


def test_grafana_provisioning_matches_compose() -> None:
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    grafana = compose["services"]["grafana"]
    mounts = dict(v.rsplit(":", 1)[0].split(":", 1) for v in grafana["volumes"])
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    dash_mount = mounts["./deploy/grafana/dashboards"]

    ds = yaml.safe_load((GRAFANA / "provisioning/datasources/prometheus.yml").read_text())
    (source,) = ds["datasources"]
    assert source["type"] == "prometheus" and source["uid"] == dash.DATASOURCE.uid
    assert source["url"] == "http://prometheus:9090" and "prometheus" in compose["services"]

    prov = yaml.safe_load((GRAFANA / "provisioning/dashboards/adloop.yml").read_text())
    (provider,) = prov["providers"]
    assert provider["type"] == "file" and provider["options"]["path"] == dash_mount
    for d in dash.DASHBOARDS:
        assert (GRAFANA / "dashboards" / f"{d.uid}.json").exists()


def test_compose_brings_up_grafana_with_the_dashboards() -> None:
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.fail("docker-compose is installed by scripts/bootstrap; it is missing")
    res = subprocess.run([exe, "-f", str(ROOT / "compose.yaml"), "config"], cwd=ROOT,
                         env={**os.environ, "COMPOSE_PROFILES": "single"},
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    cfg = yaml.safe_load(res.stdout)
    grafana = cfg["services"]["grafana"]
    sources = {Path(v["source"] if isinstance(v, dict) else v.split(":")[0]).resolve()
               for v in grafana["volumes"]}
    assert (GRAFANA / "provisioning").resolve() in sources
    assert (GRAFANA / "dashboards").resolve() in sources
    assert "prometheus" in grafana.get("depends_on", {})
