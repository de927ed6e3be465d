"""The demo's counterfactual: the live loop (online learner) vs a frozen copy in shadow.

Runs ``adloop demo`` (default settings unless given) and writes
``bench/results/demo.json``: online and frozen RPM (first and last quarter) and
``online_over_frozen_last_quarter``. The frozen copy of the pretrained model answers
every request in shadow (never served); the world scores its slate against the state
the request saw.

    python bench/demo.py [--report-dir=docs/demo] [-- extra adloop demo arguments]

``--report-dir=DIR`` also copies the run's report (report.md, summary.json, plots) there
(docs/demo holds the report of one default run).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import STACK_DEPENDS, device, write_results  # noqa: E402

DEPENDS = (*STACK_DEPENDS, "bench/demo.py")

KEYS = ("requests", "sim_hours", "rpm_first_quarter", "rpm_last_quarter",
        "frozen_rpm_first_quarter", "frozen_rpm_last_quarter",
        "online_over_frozen_last_quarter", "model_versions_served", "lists_trained",
        "organic_items_shown", "organic_view_rate", "organic_like_rate",
        "organic_engagement_first_quarter", "organic_engagement_last_quarter")


def main() -> int:
    report_dir = next((Path(a.split("=", 1)[1]) for a in sys.argv[1:]
                       if a.startswith("--report-dir=")), None)
    extra = [a for a in sys.argv[1:] if a != "--" and not a.startswith("--report-dir=")]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="adloop-demo-") as tmp:
        out = Path(tmp) / "demo"
        res = subprocess.run([sys.executable, "-m", "adloop", "demo", "--out", str(out),
                              "--metrics-port", "0", *extra], cwd=ROOT,
                             env=dict(os.environ, HF_HUB_OFFLINE="1"))
        if res.returncode != 0:
            return res.returncode
        summary = json.loads((out / "summary.json").read_text())
        if report_dir is not None:
            report_dir.mkdir(parents=True, exist_ok=True)
            for name in ("report.md", "summary.json", "rpm.png", "latency.png"):
                if (out / name).exists():
                    shutil.copyfile(out / name, report_dir / name)
    results = {"device": device(), "arguments": extra or "defaults",
               "elapsed_s": round(time.perf_counter() - t0, 1),
               **{k: summary.get(k) for k in KEYS}}
    results["model_versions_served"] = len(summary.get("model_versions_served") or [])
    write_results("demo", results, DEPENDS)
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
