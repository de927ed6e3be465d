"""Which benchmark results no longer describe the code: ``python3 bench/stale.py``.

Every ``bench/results/*.json`` records the code it was measured on (``commit``, ``dirty``,
``code_hash`` over its ``code_paths``; see bench/codehash.py). This recomputes each hash on
the tree and prints one line per result:

- ``fresh``: its dependency files are as they were when it was measured;
- ``stale``: some changed (listed from ``git diff --name-only COMMIT -- PATHS`` where git
  has the commit), files changed while it ran, or it keeps figures of an earlier run on
  other code;
- ``unknown``: it records no code hash (measured before results recorded one).

Exit status 1 when a headline result (``closed_loop``, ``demo``, the ablations:
``ablations_*``, ``rspo_ablations``, ``organic``) is stale or unknown, else 0.
Standard library only: runs without the project's environment.

    python3 bench/stale.py [--json] [--results-dir DIR] [--root DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.codehash import changed_since, code_hash  # noqa: E402

HEADLINE = ("closed_loop", "demo", "rspo_ablations", "organic")
HEADLINE_PREFIXES = ("ablations_",)
SHOWN_CHANGES = 4


def is_headline(name: str) -> bool:
    """Results whose staleness fails the check (the rest only show in the table)."""
    return name in HEADLINE or name.startswith(HEADLINE_PREFIXES)


@dataclass
class Verdict:
    result: str
    state: str
    headline: bool
    commit: str | None = None
    dirty: bool | None = None
    measured_at: str | None = None
    reason: str = ""
    changed: list[str] | None = field(default=None)


def check(path: Path, root: Path) -> Verdict:
    """The state of one results file against the tree at ``root``."""
    name = path.stem
    v = Verdict(result=name, state="unknown", headline=is_headline(name))
    try:
        data: Any = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        v.reason = f"unreadable: {e}"
        return v
    if not isinstance(data, dict):
        v.reason = "not a JSON object"
        return v
    v.commit, v.dirty, v.measured_at = data.get("commit"), data.get("dirty"), \
        data.get("measured_at")
    recorded, paths = data.get("code_hash"), data.get("code_paths")
    if not isinstance(recorded, str) or not isinstance(paths, list) or not paths:
        v.reason = data.get("stamp_error") or "no code hash recorded"
        return v
    specs = [str(p) for p in paths]
    reasons: list[str] = []
    if code_hash(root, specs) != recorded:
        reasons.append("code changed since")
        if isinstance(v.commit, str) and v.commit:
            v.changed = changed_since(root, v.commit, specs)
            if v.changed is None:
                reasons[-1] += f" (commit {v.commit[:10]} unknown here)"
    during = data.get("changed_during_run")
    if during:
        reasons.append(f"changed while it ran: {', '.join(during)}")
    mixed = data.get("mixed_with")
    if mixed:
        commits = ", ".join(str(m.get("commit") or "?")[:10] for m in mixed)
        reasons.append(f"keeps figures from runs on other code ({commits})")
    v.state = "stale" if reasons else "fresh"
    v.reason = "; ".join(reasons)
    return v


def check_all(results_dir: Path, root: Path) -> list[Verdict]:
    return [check(p, root) for p in sorted(results_dir.glob("*.json"))]


def failing(verdicts: list[Verdict]) -> list[Verdict]:
    return [v for v in verdicts if v.headline and v.state != "fresh"]


def table(verdicts: list[Verdict]) -> str:
    def detail(v: Verdict) -> str:
        if v.changed:
            shown = ", ".join(v.changed[:SHOWN_CHANGES])
            more = len(v.changed) - SHOWN_CHANGES
            files = shown + (f" (+{more} more)" if more > 0 else "")
            return f"{v.reason}: {files}"
        return v.reason

    rows = [["result", "measured", "commit", "state", "detail"]]
    for v in verdicts:
        commit = (v.commit or "–")[:10] + (" (dirty)" if v.dirty else "")
        state = v.state + (" *" if v.headline and v.state != "fresh" else "")
        rows.append([v.result, (v.measured_at or "–")[:10], commit, state, detail(v)])
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:4], widths, strict=True)) + "  " + r[4]
             for r in rows]
    return "\n".join(line.rstrip() for line in lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--results-dir", type=Path, default=None,
                    help="the results to check (default: ROOT/bench/results)")
    ap.add_argument("--root", type=Path, default=ROOT,
                    help="the source tree the code paths are read from (default: this "
                         "checkout)")
    ap.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = ap.parse_args(argv)
    root = args.root.resolve()
    results_dir = args.results_dir or root / "bench" / "results"
    verdicts = check_all(results_dir, root)
    bad = failing(verdicts)
    if args.json:
        print(json.dumps({"results": [asdict(v) for v in verdicts],
                          "failing": [v.result for v in bad]}, indent=2))
    else:
        print(table(verdicts))
        if bad:
            print(f"\n* {len(bad)} headline result(s) stale or unknown: "
                  f"{', '.join(v.result for v in bad)}. Rerun them (see docs/benchmarks.md).")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
