"""Observability check against a real Prometheus: dashboards, rules, alerts, /metrics.

Starts the live processes (``deploy.observability.promlive.LIVE_PROCESSES``) on an
embedded broker, runs Debian's ``prometheus`` scraping them every second with
adloop's rules, lets the stack run, then

- evaluates every dashboard panel query and every recording rule (``/api/v1/query``),
- reads every rule's health (``/api/v1/rules``),
- runs ``promtool check metrics`` on each process's ``/metrics``,
- runs the promtool alert unit tests and counts alerts covered firing and not firing,
- plots the overview dashboard's time series from ``/api/v1/query_range``
  (deploy/grafana/rendered/adloop-overview.png, used by docs/observability.md).

Writes bench/results/observability.json and the ``## observability`` section of
docs/benchmarks.md.  ``--quick``: 60 s of traffic instead of 180 s.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from adloop.stack import LocalStack  # noqa: E402
from bench.common import (  # noqa: E402
    STACK_DEPENDS,
    device,
    markdown_table,
    update_doc_section,
    write_results,
)
from deploy.observability import dashboards as dash  # noqa: E402
from deploy.observability import promlive  # noqa: E402

PLOT = ROOT / "deploy" / "grafana" / "rendered" / "adloop-overview.png"
DEPENDS = (*STACK_DEPENDS, "deploy/__init__.py", "deploy/observability/", "deploy/prometheus/",
           "bench/observability.py")


def _legend(fmt: str, labels: dict[str, str]) -> str:
    if not fmt:
        return ",".join(f"{k}={v}" for k, v in sorted(labels.items()) if k != "__name__") or "value"
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt)


def plot_overview(prom: promlive.PrometheusServer, start: float, end: float,
                  provides: set[str], path: Path) -> int:
    """The overview dashboard's time-series panels as a PNG; returns panels with data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [p for p in dash.OVERVIEW.panels if p.kind == "timeseries"]
    cols = 3
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(15, 3.2 * rows), squeeze=False)
    step = max(1.0, (end - start) / 240)
    with_data = 0
    for ax, panel in zip(axes.flat, panels, strict=False):
        drawn = 0
        for query in panel.queries:
            try:
                series = prom.query_range(query.expr, start, end, step)
            except promlive.PromQueryError:
                series = []
            for s in series[:8]:
                ts = [float(v[0]) - start for v in s["values"]]
                vals = [float(v[1]) for v in s["values"]]
                ax.plot(ts, vals, label=_legend(query.legend, s["metric"]), linewidth=1.2)
                drawn += 1
        ax.set_title(panel.title, fontsize=10)
        ax.tick_params(labelsize=7)
        ax.set_xlabel(f"seconds (unit: {panel.unit})", fontsize=7)
        if drawn:
            with_data += 1
            ax.legend(fontsize=6, loc="upper left")
        else:
            missing = sorted(set().union(*(dash.processes_needed(q.expr)
                                           for q in panel.queries)) - provides)
            why = f"needs {', '.join(missing)}" if missing else "no samples"
            ax.text(0.5, 0.5, f"no data yet\n({why}; pending adloop demo)",
                    ha="center", va="center", fontsize=9, color="gray", transform=ax.transAxes)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle("adloop / Overview — panels evaluated by a real Prometheus "
                 f"({', '.join(promlive.LIVE_PROCESSES)})", fontsize=12)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return with_data


def run(run_s: float) -> dict[str, Any]:
    coverage = promlive.alert_test_coverage()
    alerts_tested = sum(1 for c in coverage.values() if c["firing"] and c["not_firing"])
    unit_ok, unit_out = promlive.promtool_test_rules()
    if not unit_ok:
        print(unit_out, file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="adloop-obs-") as tmp:
        t0 = time.monotonic()
        with LocalStack(Path(tmp) / "stack", topic_prefix="obs.") as stack:
            live = promlive.start_stack_processes(stack)
            t_stack = time.monotonic() - t0
            cfg = promlive.render_config(live.targets(), scrape_interval="1s")
            with promlive.PrometheusServer(cfg, Path(tmp) / "prometheus") as prom:
                prom.wait_targets_up(live.targets())
                prom.wait_for("adloop:produced_records:rate1m > 0")
                t_samples = time.monotonic() - t0
                start = time.time()
                time.sleep(run_s)
                results = promlive.evaluate(prom, live.provides())
                health = promlive.rule_health(prom)
                end = time.time()
                plotted = plot_overview(prom, start - 5, end, live.provides(), PLOT)
                clean = {}
                for name, url in live.metrics_urls().items():
                    clean[name] = promlive.promtool_check_metrics(httpx.get(url).text)[0]
    panel_results = [r for r in results if r.kind == "panel"]
    rule_results = [r for r in results if r.kind == "recording_rule"]

    def count(rs: list[promlive.QueryResult], *status: str) -> int:
        return sum(1 for r in rs if r.status in status)

    return {
        "processes": list(promlive.LIVE_PROCESSES),
        "prometheus": "Debian prometheus 2.x on loopback, 1 s scrape",
        "run_s": run_s,
        "stack_ready_s": round(t_stack, 1),
        "first_samples_s": round(t_samples, 1),
        "dashboards": len(dash.DASHBOARDS),
        "panels": sum(len(d.panels) for d in dash.DASHBOARDS),
        "panel_queries": len(panel_results),
        "panel_queries_ok": count(panel_results, "ok"),
        "panel_queries_empty_allowed": count(panel_results, "empty_allowed"),
        "panel_queries_skipped": count(panel_results, "skipped"),
        "panel_queries_failed": count(panel_results, "error", "empty"),
        "recording_rules": len(rule_results),
        "recording_rules_ok": count(rule_results, "ok"),
        "recording_rules_skipped": count(rule_results, "skipped", "empty_allowed"),
        "recording_rules_failed": count(rule_results, "error", "empty"),
        "rules_loaded": len(health),
        "rules_healthy": sum(1 for h in health if h[1] == "ok"),
        "alerts": len(dash.ALERTS),
        "alerts_tested": alerts_tested,
        "alert_unit_tests_pass": unit_ok,
        "promtool_check_metrics_clean": clean,
        "overview_panels_plotted_with_data": plotted,
        "skipped_because": sorted({r.reason for r in results if r.status == "skipped"}),
        "failures": [f"{r.id}: {r.status}: {r.reason}" for r in results if r.failed],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="60 s of traffic instead of 180 s")
    args = parser.parse_args(argv)
    res = run(60.0 if args.quick else 180.0)
    path = write_results("observability", res, DEPENDS)
    rows = [
        ["dashboards / panels / panel queries", f"{res['dashboards']} / {res['panels']} / "
                                                f"{res['panel_queries']}"],
        ["panel queries with data", res["panel_queries_ok"]],
        ["panel queries allowed empty (no errors yet)", res["panel_queries_empty_allowed"]],
        ["panel queries skipped (process not started)", res["panel_queries_skipped"]],
        ["panel queries failed", res["panel_queries_failed"]],
        ["recording rules with data / total", f"{res['recording_rules_ok']} / "
                                              f"{res['recording_rules']}"],
        ["rules loaded, healthy", f"{res['rules_loaded']}, {res['rules_healthy']}"],
        ["alerts unit-tested firing and not firing", f"{res['alerts_tested']} / "
                                                     f"{res['alerts']}"],
        ["promtool check metrics clean", ", ".join(
            f"{k}: {'yes' if v else 'NO'}"
            for k, v in res["promtool_check_metrics_clean"].items())],
        ["stack ready / first samples (s)", f"{res['stack_ready_s']} / {res['first_samples_s']}"],
    ]
    skipped = "; ".join(res["skipped_because"]) or "none"
    update_doc_section("observability", (
        f"`bench/observability.py{' --quick' if args.quick else ''}`: the processes "
        f"{', '.join(f'`{p}`' for p in res['processes'])} on the embedded broker, scraped by "
        f"a real Prometheus every second for {res['run_s']:.0f} s, {device()}. "
        "Every dashboard panel query and recording rule is evaluated through the HTTP API.\n\n"
        + markdown_table(["check", "result"], rows)
        + f"\n\nSkipped: {skipped}.\n"))
    print(f"wrote {path.relative_to(ROOT)}")
    for key in ("panels", "panel_queries_ok", "panel_queries_skipped", "panel_queries_failed",
                "recording_rules_ok", "alerts_tested"):
        print(f"{key}: {res[key]}")
    ok = not res["failures"] and res["alert_unit_tests_pass"] and all(
        res["promtool_check_metrics_clean"].values())
    for line in res["failures"]:
        print("FAILED", line, file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
