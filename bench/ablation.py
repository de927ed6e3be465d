"""Closed-loop ablations: variants of the ``rspo`` policy on the same seeds and traffic.

One module for the ablation benchmarks (``bench/ablations_ranking.py``,
``bench/ablations_gpr.py``): each names its variants (EvalConfig overrides: ``pretrain``
for :class:`learner.pretrain.PretrainSettings`, ``rspo`` for
:class:`learner.rspo.RSPOConfig`, ``eval`` for :class:`adloop.evaluation.EvalConfig`
itself) and the columns it reports; this module runs them with
:func:`adloop.evaluation.compare`, merges a partial run (``--variants``) into the
results already there, and writes ``bench/results/NAME.json``, ``docs/NAME.png`` and the
``NAME`` section of docs/benchmarks.md.

Every variant runs on the same seeds with the same world, logging phase, traffic and
response randomness; ``rpm_ratio`` is its mean last-quarter RPM over ``base``'s, with the
paired 95 % interval over seeds and the minimum detectable effect at 80 % power
(:func:`adloop.evaluation.paired_ratio`); ``rpm_whole_run_ratio`` the same over the whole
run (four times the requests of the last quarter, so a narrower interval; it also
counts the start, before learning has had time to matter).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from adloop.evaluation import EvalConfig, compare, paired_ratio
from bench.common import (
    ROOT,
    add_closed_loop_arguments,
    closed_loop_config,
    device,
    markdown_table,
    update_doc_section,
    write_results,
)

SUMMARY_KEYS = ("latency_ms_per_request", "offline_recall_at_10", "offline_vndcg_at_10",
                "slate_diversity", "sid_diversity", "catalogue_coverage", "personalization",
                "ctr", "cvr", "organic_engagement_last_quarter",
                "organic_oracle_ratio_last_quarter", "organic_view_rate", "organic_like_rate")
"""Per-variant means kept from the harness summary (raw, before the report columns)."""

Columns = list[tuple[str, str, Callable[[dict[str, Any]], Any]]]
"""Report columns: (key in each variant's row, table header, value from the raw entry)."""


def mean_of(entry: dict[str, Any], key: str) -> float | None:
    v = entry.get(key)
    return float(v["mean"]) if isinstance(v, dict) and "mean" in v else None


def run_variant(cfg: EvalConfig, name: str, over: dict[str, Any], tmp: Path,
                jobs: int) -> dict[str, Any]:
    vcfg = dataclasses.replace(cfg, policies=("rspo",), pretrain=over.get("pretrain", {}),
                               rspo={**cfg.rspo, **over.get("rspo", {})},
                               **over.get("eval", {}))

    def progress(m: str) -> None:
        print(f"[{name}] {m}", flush=True)

    t0 = time.perf_counter()
    entry = compare(vcfg, tmp / name.strip("+"), progress=progress, jobs=jobs)["policies"]["rspo"]
    return {"per_seed_rpm": entry["per_seed_rpm_last_quarter"],
            "per_seed_rpm_whole_run": entry["per_seed_rpm_whole_run"],
            **({"per_seed_organic_engagement": entry["per_seed_organic_engagement_last_quarter"]}
               if "per_seed_organic_engagement_last_quarter" in entry else {}),
            **{k: mean_of(entry, k) for k in SUMMARY_KEYS},
            "settings": over, "elapsed_s": round(time.perf_counter() - t0, 1)}


def ratio_to_base(raw: dict[str, dict[str, Any]], name: str, key: str
                  ) -> tuple[float, float, float, float | None] | None:
    """Variant ``name``'s mean per-seed ``key`` over ``base``'s (same seeds, paired), its
    95 % interval and MDE (None when either lacks per-seed values)."""
    a, b = raw[name].get(key), raw["base"].get(key)
    if not a or not b or len(a) != len(b):
        return None
    pr = paired_ratio(a, b)
    if pr is None:
        return None
    lo = pr.ci_low if pr.ci_low is not None else pr.ratio
    hi = pr.ci_high if pr.ci_high is not None else pr.ratio
    return pr.ratio, lo, hi, pr.mde


def rows_of(raw: dict[str, dict[str, Any]], order: list[str], columns: Columns
            ) -> list[dict[str, Any]]:
    base = raw["base"]
    out = []
    for name in [n for n in order if n in raw]:
        r = dict(raw[name])
        paired = ratio_to_base(raw, name, "per_seed_organic_engagement")
        if paired is not None:
            r["organic_engagement_ratio"] = [round(x, 4) for x in paired[:3]]
        rpm = ratio_to_base(raw, name, "per_seed_rpm")
        m, lo, hi, mde = rpm if rpm is not None else (math.nan, math.nan, math.nan, None)
        whole = ratio_to_base(raw, name, "per_seed_rpm_whole_run")
        wm, wlo, whi, wmde = (whole if whole is not None
                              else (math.nan, math.nan, math.nan, None))
        lat, base_lat = r.get("latency_ms_per_request"), base.get("latency_ms_per_request")
        out.append({
            "name": name, "rpm_ratio": round(m, 4), "rpm_ratio_ci_low": round(lo, 4),
            "rpm_ratio_ci_high": round(hi, 4),
            "rpm_ratio_mde": round(mde, 4) if mde is not None else None,
            "rpm_whole_run_ratio": round(wm, 4), "rpm_whole_run_ratio_ci_low": round(wlo, 4),
            "rpm_whole_run_ratio_ci_high": round(whi, 4),
            "rpm_whole_run_ratio_mde": round(wmde, 4) if wmde is not None else None,
            "rpm_mean": round(statistics.mean(r["per_seed_rpm"]), 3),
            "per_seed_rpm": [round(x, 3) for x in r["per_seed_rpm"]],
            **{key: value(r) for key, _, value in columns},
            "decode_latency_ratio": round(lat / base_lat, 4) if lat and base_lat else None,
            "settings": r["settings"]})
    return out


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 0.45 * len(rows) + 1.4))
    ys = list(range(len(rows)))[::-1]
    for y, r in zip(ys, rows, strict=True):
        ax.errorbar(r["rpm_ratio"], y, xerr=[[r["rpm_ratio"] - r["rpm_ratio_ci_low"]],
                                             [r["rpm_ratio_ci_high"] - r["rpm_ratio"]]],
                    fmt="o", color="tab:blue", capsize=3)
    ax.axvline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_yticks(ys, [r["name"] for r in rows])
    ax.set_xlabel("last-quarter RPM / base (per-seed mean, 95% CI)")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fmt(v: Any, spec: str = ".3f") -> str:
    """A table cell: a number, or a [mean, low, high] triple as ``mean (low–high)``."""
    if v is None:
        return "–"
    if isinstance(v, list | tuple) and len(v) == 3:
        return f"{format(v[0], spec)} ({format(v[1], spec)}–{format(v[2], spec)})"
    return format(v, spec)


def main(name: str, doc: str, variants: dict[str, dict[str, Any]], columns: Columns,
         title: str, note: str, *, depends: Sequence[str]) -> int:
    """The command line of an ablation benchmark: ``variants`` (``base`` first) by name;
    ``depends``: the code its results depend on (:data:`DEPENDS` and the script)."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    add_closed_loop_arguments(ap)
    ap.add_argument("--variants", default="",
                    help="comma-separated variants to run and merge into the results "
                         "already there (default: all)")
    ap.add_argument("--fresh", action="store_true",
                    help="with --variants: start a new results file instead of merging, so "
                         "the variants not run are left out (nothing measured on other "
                         "code is kept)")
    ap.add_argument("--results-name", default="",
                    help=f"write bench/results/<this>.json, docs/<this>.png and the <this> "
                         f"section instead of {name}'s (e.g. the same variants on more "
                         "seeds, kept apart from the main table)")
    args = ap.parse_args()
    name = args.results_name or name
    torch.set_num_threads(args.threads)
    cfg: EvalConfig = closed_loop_config(args)
    wanted = [v for v in args.variants.split(",") if v] or list(variants)
    unknown = [v for v in wanted if v not in variants]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; known: {list(variants)}")
    path = ROOT / "bench" / "results" / f"{name}.json"
    raw: dict[str, dict[str, Any]] = {}
    kept: dict[str, Any] | None = None
    if args.variants and not args.fresh and path.exists():
        old = json.loads(path.read_text())
        if old.get("seeds") == list(cfg.seeds) and old.get("requests_per_policy") == \
                cfg.requests and old.get("encoder") == cfg.encoder:
            raw = old.get("raw", {})
            kept = old
    if "base" not in raw and "base" not in wanted:
        wanted.insert(0, "base")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"adloop-{name}-") as tmp:
        for v in wanted:
            raw[v] = run_variant(cfg, v, variants[v], Path(tmp), args.jobs)
    elapsed = time.perf_counter() - t0
    rows = rows_of(raw, list(variants), columns)
    command = " ".join([f"bench/{Path(sys.argv[0]).name}", *sys.argv[1:]])
    write_results(name, {
        "device": device(), "quick": args.quick, "seeds": list(cfg.seeds),
        "encoder": cfg.encoder, "command": command, "requests_per_policy": cfg.requests,
        "elapsed_s_last_run": round(elapsed, 1),
        "elapsed_s_by_variant": {k: v.get("elapsed_s") for k, v in raw.items()},
        "metric": "expected revenue per mille impressions, last quarter of the run",
        "variants": rows, "raw": raw}, depends,
        merged_from=kept if kept and set(kept.get("raw", {})) - set(wanted) else None)
    plot(rows, ROOT / "docs" / f"{name}.png", title)
    table = markdown_table(
        ["variant", "RPM ratio to base (95% CI)", "MDE", "whole-run ratio (95% CI)",
         "whole-run MDE", "RPM", *[h for _, h, _ in columns], "decode latency ratio"],
        [[r["name"], f"{r['rpm_ratio']:.3f} ({r['rpm_ratio_ci_low']:.3f}–"
          f"{r['rpm_ratio_ci_high']:.3f})", fmt(r["rpm_ratio_mde"], ".1%"),
          f"{r['rpm_whole_run_ratio']:.3f} ({r['rpm_whole_run_ratio_ci_low']:.3f}–"
          f"{r['rpm_whole_run_ratio_ci_high']:.3f})", fmt(r["rpm_whole_run_ratio_mde"], ".1%"),
          f"{r['rpm_mean']:.1f}",
          *[fmt(r[k]) for k, _, _ in columns], fmt(r["decode_latency_ratio"], ".2f")]
         for r in rows])
    update_doc_section(name, (
        f"`{command}`: seeds {list(cfg.seeds)}, {cfg.requests} requests per run, encoder "
        f"{cfg.encoder}, {device()}. Every variant is the `rspo` policy on the same seeds "
        f"and traffic; only the settings in `bench/results/{name}.json` change. "
        f"{note}\n\n" + table + f"\n\n![{title}]({name}.png)"))
    print(table)
    return 0

