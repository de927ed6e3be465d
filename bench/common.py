"""Shared plumbing for benchmarks: device description, results JSON, the docs table.

Every results file records the code it was measured on (see bench/codehash.py): each
benchmark declares ``DEPENDS``, the source paths its figures depend on, and passes it to
:func:`write_results`; ``python3 bench/stale.py`` lists the results whose code changed since.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bench.codehash import TreeState, import_closure

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
DOC = ROOT / "docs" / "benchmarks.md"

PLUMBING = frozenset({"bench/__init__.py", "bench/codehash.py", "bench/common.py"})
"""Imported by every benchmark; what they import is not followed (bench/common.py imports
the harness only to build its settings, which the closed-loop benchmarks import anyway)."""

LOCKFILE = "requirements.lock"
"""The pinned third-party versions (torch, onnxruntime, ...): figures depend on them too."""


def in_process_depends(script: str, *extra: str) -> tuple[str, ...]:
    """What the results of a benchmark that runs everything in its own processes (the
    closed-loop harness and its ablations) depend on: every repository file ``script``
    can execute (bench/codehash.py's static import closure, lazy imports included),
    bench/common.py (the ``--quick`` settings), the lock file and ``extra``. Files the
    harness never imports (the HTTP service, the live learner) leave its results fresh."""
    closure = import_closure(ROOT, [script], opaque=PLUMBING)
    keep = {p for p in closure if p not in PLUMBING}
    return tuple(sorted({*keep, "bench/common.py", LOCKFILE, *extra}))


STACK_DEPENDS = ("adloop/", "streams/", "traffic/", "learner/", "server/", "snapshot_format/",
                 "deploy/kafka/")
"""What a run of the whole loop (the embedded broker; joiner, learner, server and traffic
as processes) depends on; each such benchmark adds its own script."""

PROVENANCE = ("commit", "dirty", "code_hash", "code_paths", "changed_during_run",
              "mixed_with", "stamp_error")
"""The fields :func:`write_results` owns (see bench/codehash.py and bench/stale.py)."""

TREE = TreeState.capture(ROOT)
"""The source tree when this benchmark process started: what its results are stamped with."""


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown cpu"


def device() -> str:
    return f"cpu: {cpu_name()} ({os.cpu_count()} cores)"


def provenance(depends: Sequence[str], merged_from: Mapping[str, Any] | None = None,
               tree: TreeState | None = None) -> dict[str, Any]:
    """The provenance fields of a result depending on ``depends`` (paths, directories or
    globs from the repository root): the commit, ``dirty``, ``code_hash`` and
    ``code_paths`` as this process found the tree when it started, ``changed_during_run``
    when some of those files changed since, and ``mixed_with``: the earlier runs whose
    figures ``merged_from`` (the results this run merges into) keeps, where their code was
    not this run's. Never raises: a result is worth keeping even unstamped."""
    tree = tree or TREE
    try:
        stamp = tree.stamp(depends)
    except OSError as e:
        return {"commit": tree.commit, "code_hash": None, "code_paths": list(depends),
                "stamp_error": str(e)}
    if merged_from:
        earlier = [dict(m) for m in merged_from.get("mixed_with", [])]
        if (merged_from.get("code_hash") != stamp["code_hash"]
                or merged_from.get("changed_during_run")):
            earlier.append({k: merged_from.get(k) for k in ("commit", "code_hash",
                                                            "measured_at")})
        if earlier:
            stamp["mixed_with"] = earlier
    return stamp


def write_results(name: str, results: dict[str, Any], depends: Sequence[str], *,
                  merged_from: Mapping[str, Any] | None = None,
                  path: Path | None = None) -> Path:
    """Write ``bench/results/NAME.json`` (or ``path``) with a timestamp, the device and
    the code it was measured on (:func:`provenance` of ``depends``; ``merged_from``: the
    earlier results whose figures ``results`` keeps)."""
    path = path or RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    figures = {k: v for k, v in results.items() if k not in PROVENANCE}
    results = {"benchmark": name, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                time.gmtime()), **figures}
    results.setdefault("device", device())
    results.update(provenance(depends, merged_from))
    path.write_text(json.dumps(results, indent=2, sort_keys=False) + "\n")
    return path


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:,.3g}" if abs(v) < 100 else f"{v:,.0f}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def update_doc_section(section: str, body: str) -> None:
    """Replace (or append) the ``## SECTION`` part of docs/benchmarks.md."""
    DOC.parent.mkdir(parents=True, exist_ok=True)
    text = DOC.read_text() if DOC.exists() else (
        "# Benchmarks\n\nEach section is written by its script under `bench/`; "
        "the numbers come from `bench/results/*.json`. Do not edit by hand.\n")
    block = f"## {section}\n\n{body.strip()}\n"
    pattern = re.compile(rf"^## {re.escape(section)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _m: block + "\n", text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + block
    DOC.write_text(text.rstrip("\n") + "\n")


def add_closed_loop_arguments(ap: argparse.ArgumentParser) -> None:
    """The flags every closed-loop benchmark shares (seeds, size, encoder, threads)."""
    ap.add_argument("--quick", action="store_true",
                    help="1600 requests per policy after a 2500-request logging phase")
    ap.add_argument("--seeds", default="0,1,2,3,4,5,6,7",
                    help="comma-separated seeds and ranges (0-39: forty seeds)")
    ap.add_argument("--requests", type=int, default=None)
    ap.add_argument("--encoder", default="minilm")
    ap.add_argument("--threads", type=int, default=2,
                    help="torch and ONNX Runtime threads (per seed worker with --jobs > 1: "
                         "threads // jobs, at least 1)")
    ap.add_argument("--jobs", type=int, default=2,
                    help="seeds run at once in worker processes")
    ap.add_argument("--hepo-weight", type=float, default=0.0,
                    help="weight of the learning policies' HEPO term over sibling beams "
                         "(0: off, the default)")


def parse_seeds(text: str) -> tuple[int, ...]:
    """``--seeds``: comma-separated seeds and inclusive ranges, e.g. ``0-31`` or
    ``0,1,8-15``."""
    out: list[int] = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        lo, sep, hi = part.partition("-")
        out.extend(range(int(lo), int(hi) + 1) if sep else [int(part)])
    return tuple(out)


def closed_loop_config(args: argparse.Namespace, **fields: Any) -> Any:
    """The :class:`adloop.evaluation.EvalConfig` those flags ask for (``--quick``: 1600
    requests after a 2500-request logging phase, 250 pretraining steps)."""
    from adloop.evaluation import EvalConfig

    cfg = EvalConfig(seeds=parse_seeds(args.seeds),
                     encoder=args.encoder, threads=max(1, args.threads // max(1, args.jobs)),
                     **fields)
    if getattr(args, "hepo_weight", 0.0):
        cfg.hepo_weight = args.hepo_weight
    if args.quick:
        cfg.requests, cfg.log_requests, cfg.pretrain_steps = 1600, 2500, 250
    if args.requests:
        cfg.requests = args.requests
    return cfg
