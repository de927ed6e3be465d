"""Prometheus configs and rules: promtool-clean, and every alert unit-tested both ways."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from deploy.observability.dashboards import ALERTS, RECORDING_RULES
from deploy.observability.promlive import (
    EMBEDDED_CONFIG,
    RULES_GLOB,
    alert_test_coverage,
    promtool_test_rules,
    render_config,
)
from tests.observability.conftest import require_tool

ROOT = Path(__file__).resolve().parents[2]
PROM = ROOT / "deploy" / "prometheus"


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([require_tool("promtool"), *args], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)


def test_embedded_config_is_valid_and_loads_the_rules() -> None:
    res = _promtool("check", "config", str(EMBEDDED_CONFIG))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "2 rule files found" in res.stdout + res.stderr


def test_compose_config_is_valid_with_the_rules_where_compose_mounts_them(tmp_path: Path) -> None:
    cfg = yaml.safe_load((PROM / "prometheus.compose.yml").read_text())
    assert cfg["rule_files"] == ["/etc/prometheus/rules/*.yml"]
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    mounts = compose["services"]["prometheus"]["volumes"]
    assert "./deploy/prometheus/rules:/etc/prometheus/rules:ro" in mounts
    assert "./deploy/prometheus/prometheus.compose.yml:/etc/prometheus/prometheus.yml:ro" in mounts
    cfg["rule_files"] = [str(RULES_GLOB)]  # where the mount points on this machine
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(cfg))
    res = _promtool("check", "config", str(path))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "2 rule files found" in res.stdout + res.stderr


def test_compose_and_embedded_configs_scrape_the_same_jobs() -> None:
    compose = yaml.safe_load((PROM / "prometheus.compose.yml").read_text())
    embedded = yaml.safe_load(EMBEDDED_CONFIG.read_text())
    jobs = {j["job_name"] for j in embedded["scrape_configs"]}
    assert jobs == {"adloop-join", "adloop-stats", "adloop-learn", "adloop-serve",
                    "adloop-replay"}
    assert jobs <= {j["job_name"] for j in compose["scrape_configs"]}


def test_rendered_live_config_is_valid(tmp_path: Path) -> None:
    cfg = render_config({"adloop-serve": ["127.0.0.1:1234"], "adloop-extra": ["127.0.0.1:5"]})
    assert [j["job_name"] for j in cfg["scrape_configs"]] == ["adloop-serve", "adloop-extra"]
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(cfg))
    res = _promtool("check", "config", str(path))
    assert res.returncode == 0, res.stdout + res.stderr


def test_rule_files_are_clean() -> None:
    files = sorted(str(p) for p in (PROM / "rules").glob("*.yml"))
    assert files, "no rule files"
    res = _promtool("check", "rules", *files)
    assert res.returncode == 0, res.stdout + res.stderr
    groups = [g for f in files for g in yaml.safe_load(Path(f).read_text())["groups"]]
    records = {r["record"] for g in groups for r in g["rules"] if "record" in r}
    alerts = {r["alert"] for g in groups for r in g["rules"] if "alert" in r}
    assert records == {r.record for r in RECORDING_RULES}
    assert alerts == {a.name for a in ALERTS}
    headline = {"adloop:server_request_duration_seconds:p99_rate1m",
                "adloop:learner_freshness_seconds:p95_rate15m",
                "adloop:traffic_revenue_per_mille:rate5m", "adloop:consumer_lag_records:sum"}
    assert headline <= records


def test_alert_unit_tests_pass() -> None:
    require_tool("promtool")
    passed, out = promtool_test_rules()
    assert passed, out


def test_every_alert_is_tested_firing_and_not_firing() -> None:
    cover = alert_test_coverage()
    missing = {name: c for name, c in cover.items() if not (c["firing"] and c["not_firing"])}
    assert not missing, f"alerts without a firing and a not-firing promtool case: {missing}"
    unknown = set(cover) - {a.name for a in ALERTS}
    assert not unknown, f"promtool tests name alerts that do not exist: {unknown}"
