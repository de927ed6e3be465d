"""The demo as a live A/B test, over seeds: the online learner's bucket against the
control bucket served by the pinned pretrained model.

Runs ``adloop demo --seed S`` (default settings otherwise: a 50/50 control bucket, the
harness's exploration and learner cadence) for each seed and writes
``bench/results/demo.json``: per seed, both buckets' expected revenue per mille
impressions (first and last quarter, whole run; the world scores every served slate),
the demo's always-valid test and the learner's live test, rollbacks, wall time; over
seeds, ``online_over_control`` (last quarter; ratio of the mean RPMs, paired by seed)
with its 95 % interval (``online_over_control_ci_low``/``_ci_high``), the whole-run
ratio, and ``runs_below_control_without_rollback``.

    python bench/demo.py [--quick] [--seeds 0-4] [--report-dir=docs/demo]
                         [-- extra adloop demo arguments]

``--quick``: two seeds, one minute of traffic each. ``--report-dir`` copies the first
seed's report (report.md, summary.json, plots) there.

A full run (not ``--quick``; ``--no-busy-check`` skips it) then repeats the first seed
with another process keeping one core busy (a spinning Python process, started a minute
before the demo, as a job already running would be) and writes
``elapsed_s_one_core_busy`` and ``busy_over_idle`` (that run's wall time over the same
seed's idle one; the demo sizes its threads from the cores free, so the goal is ≤ 1.5)
with that run's ``online_over_control_one_core_busy``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import device, parse_seeds, write_results  # noqa: E402
from bench.depends import stack_depends  # noqa: E402

DEPENDS = stack_depends("bench/demo.py", "demo", "join", "stats", "learn", "serve")

PER_SEED = ("requests", "sim_hours", "control_version", "requests_online",
            "requests_control", "requests_outside_test", "online_rpm_first_quarter",
            "control_rpm_first_quarter", "online_rpm_last_quarter", "control_rpm_last_quarter",
            "online_rpm_whole_run", "control_rpm_whole_run", "online_over_control",
            "online_over_control_first_quarter", "online_over_control_whole_run",
            "ab_rpm_diff", "ab_rpm_diff_interval", "ab_decision", "live_test_rpm_diff",
            "live_test_rpm_diff_interval", "live_test_decisions", "rollbacks",
            "lists_trained", "rspo_updates", "snapshots_published", "snapshots_refused")


SPIN = "while True:\n    pass\n"
"""What keeps one core busy during the busy check."""


def run_seed(seed: int, extra: list[str], report_dir: Path | None) -> dict[str, Any]:
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="adloop-demo-") as tmp:
        out = Path(tmp) / "demo"
        res = subprocess.run([sys.executable, "-m", "adloop", "demo", "--out", str(out),
                              "--metrics-port", "0", "--seed", str(seed), *extra], cwd=ROOT,
                             env=dict(os.environ, HF_HUB_OFFLINE="1"))
        if res.returncode != 0:
            raise SystemExit(f"adloop demo --seed {seed} exited {res.returncode}")
        summary = json.loads((out / "summary.json").read_text())
        if report_dir is not None:
            report_dir.mkdir(parents=True, exist_ok=True)
            for name in ("report.md", "summary.json", "rpm.png", "latency.png"):
                if (out / name).exists():
                    shutil.copyfile(out / name, report_dir / name)
    row = {"seed": seed, "elapsed_s": round(time.perf_counter() - t0, 1),
           **{k: summary.get(k) for k in PER_SEED}}
    row["model_versions_served"] = len(summary.get("model_versions_served") or [])
    return row


def busy_check(seed: int, extra: list[str], idle_s: float) -> dict[str, Any]:
    """``seed`` again with a spinning process beside it: its wall time against ``idle_s``."""
    spinner = subprocess.Popen([sys.executable, "-c", SPIN])
    try:
        time.sleep(60.0)   # a process already busy: the one-minute load average shows it
        row = run_seed(seed, extra, None)
    finally:
        spinner.kill()
        spinner.wait()
    return {"busy_check_seed": seed, "elapsed_s_one_core_busy": row["elapsed_s"],
            "busy_over_idle": round(row["elapsed_s"] / idle_s, 3),
            "online_over_control_one_core_busy": row.get("online_over_control")}


def aggregate(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Over seeds: the paired ratio of online over control RPM (last quarter, whole run)."""
    from adloop.evaluation import paired_ratio

    out: dict[str, Any] = {}
    for key, part in (("online_over_control", "last_quarter"),
                      ("online_over_control_whole_run", "whole_run")):
        pairs = [(r[f"online_rpm_{part}"], r[f"control_rpm_{part}"]) for r in rows
                 if r.get(f"online_rpm_{part}") is not None
                 and r.get(f"control_rpm_{part}") is not None]
        pr = paired_ratio([a for a, _ in pairs], [b for _, b in pairs]) if pairs else None
        out[key] = round(pr.ratio, 4) if pr else None
        out[f"{key}_ci_low"] = round(pr.ci_low, 4) if pr and pr.ci_low is not None else None
        out[f"{key}_ci_high"] = round(pr.ci_high, 4) if pr and pr.ci_high is not None \
            else None
        out[f"mde_{key}"] = round(pr.mde, 4) if pr and pr.mde is not None else None
    out["rollbacks"] = sum(int(r.get("rollbacks") or 0) for r in rows)
    out["runs_below_control_without_rollback"] = sum(
        1 for r in rows if (r.get("online_over_control") or 0) < 1.0
        and not r.get("rollbacks"))
    out["elapsed_s_per_run"] = round(sum(r["elapsed_s"] for r in rows) / len(rows), 1)
    return out


def main() -> int:
    argv = sys.argv[1:]
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--quick", action="store_true",
                    help="two seeds, one minute of traffic each")
    ap.add_argument("--seeds", default=None, help="seeds and ranges (default 0-4; quick 0-1)")
    ap.add_argument("--report-dir", type=Path, default=None)
    ap.add_argument("--no-busy-check", action="store_true",
                    help="skip the first seed's rerun beside a busy core (full runs)")
    args = ap.parse_args(argv)
    seeds = parse_seeds(args.seeds or ("0-1" if args.quick else "0-4"))
    if args.quick and "--minutes" not in extra:
        extra = ["--minutes", "1", *extra]
    rows = []
    for i, seed in enumerate(seeds):
        print(f"demo seed {seed} ({i + 1}/{len(seeds)})", flush=True)
        rows.append(run_seed(seed, extra, args.report_dir if i == 0 else None))
    busy: dict[str, Any] = {}
    if not args.quick and not args.no_busy_check:
        print(f"demo seed {seeds[0]} again, one core busy", flush=True)
        busy = busy_check(seeds[0], extra, rows[0]["elapsed_s"])
    results = {"device": device(), "quick": args.quick, "seeds": list(seeds),
               "arguments": extra or "defaults", **aggregate(rows), **busy, "runs": rows}
    write_results("demo", results, DEPENDS)
    print(json.dumps({k: v for k, v in results.items() if k != "runs"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
