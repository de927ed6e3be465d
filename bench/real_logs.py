"""A public logged-bandit dataset through `adloop import` and `adloop evaluate --offline`.

    python bench/real_logs.py [--quick] [--csv all.csv] [--train-frac 0.7]

The data: the small sample of the Open Bandit Dataset (ZOZOTOWN fashion
recommendations, CC BY 4.0) that the `obp` package ships, campaign ``all``, logged by
the uniform-random policy: 10,000 rows, 80 items, three positions, each row one item
shown at one position with its click and its logging propensity, four hashed user
features. Without ``--csv`` the script fetches the `obp` 0.4.1 wheel from PyPI (no
dependencies installed) into ``runs/bench/obd/`` and reads the sample from it.

Each row becomes a request with a one-item slate (the dataset logs each position as its
own row) whose context is the four user features; a click one second after the
impression; every item a CPC ad bidding 1 (the data has no prices), so a slate's value
is its clicks. The first ``--train-frac`` of the rows in time order go through
``adloop import`` with its documented defaults (``--steps`` 1000; ``--quick`` 300), the
rest through ``adloop evaluate --offline`` against the imported snapshot.

The question is whether a model trained on few clicks (about 30 in the training part)
falls back to something sensible or serves one item to everyone. Reported: the items
the snapshot serves over the held-out contexts (distinct items, the most served item's
share, catalogue coverage, personalization), the off-policy estimates of its value per
impression next to the logging policy's, and the estimate's diagnostics. Writes
bench/results/real_logs.json and the `## real_logs` section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import subprocess
import sys
import time
import zipfile
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    ROOT,
    device,
    in_process_depends,
    markdown_table,
    update_doc_section,
    write_results,
)

DEPENDS = in_process_depends("bench/real_logs.py")

OBP_VERSION = "0.4.1"
SAMPLE = "obp/dataset/obd/random/all/all.csv"
"""The uniform-random logging policy's sample, campaign ``all``, inside the obp wheel."""
BID = 1.0


def fetch_sample(cache: Path) -> Path:
    """The sample's CSV, extracted from the obp wheel (downloaded once into ``cache``)."""
    out = cache / "all.csv"
    if out.exists():
        return out
    cache.mkdir(parents=True, exist_ok=True)
    wheels = sorted(cache.glob(f"obp-{OBP_VERSION}-*.whl"))
    if not wheels:
        subprocess.run([sys.executable, "-m", "pip", "download", f"obp=={OBP_VERSION}",
                        "--no-deps", "--only-binary", ":all:", "-d", str(cache), "-q"],
                       check=True)
        wheels = sorted(cache.glob(f"obp-{OBP_VERSION}-*.whl"))
    with zipfile.ZipFile(wheels[0]) as wheel:
        out.write_bytes(wheel.read(SAMPLE))
    return out


def recorded_lines(rows: list[dict[str, str]], first: int) -> list[str]:
    """Recorded-log lines (docs/traffic.md) of ``rows``: one impression (a one-item slate
    with its propensity) per row, a click one second later when the row was clicked."""
    lines = []
    for i, r in enumerate(rows, start=first):
        t = datetime.fromisoformat(r["timestamp"]).timestamp()
        request_id, user_id = f"obd-{i}", f"obd-u{i}"
        ad_id = f"obd-item-{r['item_id']}"
        context = {f"user_feature_{j}": r[f"user_feature_{j}"] for j in range(4)}
        item = {"ad_id": ad_id, "semantic_id": [], "position": 0, "score": 0.0,
                "bid": BID, "bid_type": "cpc", "propensity": float(r["propensity_score"])}
        lines.append(json.dumps({"type": "impression", "t": t, "request_id": request_id,
                                 "user_id": user_id, "context": context, "slate": [item],
                                 "model_version": "uniform-random"}))
        if r["click"] == "1":
            lines.append(json.dumps({"type": "click", "t": t + 1.0,
                                     "event_id": f"{request_id}:click",
                                     "request_id": request_id, "user_id": user_id,
                                     "ad_id": ad_id}))
    return lines


def served_items(served: Path) -> Counter[str]:
    """How often the snapshot served each item over the held-out impressions."""
    counts: Counter[str] = Counter()
    with served.open() as f:
        for line in f:
            d = json.loads(line)
            if d.get("type") == "impression":
                counts.update(d["target_slate"])
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="300 pretraining steps (not 1000)")
    ap.add_argument("--csv", type=Path, default=None,
                    help="the sample's all.csv (default: fetched from the obp wheel)")
    ap.add_argument("--train-frac", type=float, default=0.7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work-dir", type=Path, default=ROOT / "runs" / "bench" / "real_logs")
    args = ap.parse_args()

    from adloop.importer import ImportSettings, import_log
    from adloop.offpolicy import OffPolicySettings, evaluate_offline
    from learner.pretrain import PretrainSettings

    t0 = time.perf_counter()
    source = args.csv or fetch_sample(ROOT / "runs" / "bench" / "obd")
    with source.open(newline="") as f:
        rows = sorted(csv.DictReader(f), key=lambda r: r["timestamp"])
    cut = int(len(rows) * args.train_frac)
    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    train, held = work / "train.jsonl", work / "held_out.jsonl"
    train.write_text("\n".join(recorded_lines(rows[:cut], 0)) + "\n")
    held.write_text("\n".join(recorded_lines(rows[cut:], cut)) + "\n")
    steps = 300 if args.quick else 1000
    print(f"{len(rows)} rows: {cut} to import, {len(rows) - cut} held out; "
          f"{steps} pretraining steps", flush=True)
    run_dir = work / "run"
    shutil.rmtree(run_dir, ignore_errors=True)     # a fresh id space and model each run
    summary = import_log(ImportSettings(from_file=train),
                         PretrainSettings(run_dir=run_dir, resume=False, steps=steps,
                                          threads=args.threads, progress=False))
    print(f"imported in {time.perf_counter() - t0:.0f}s", flush=True)
    served = work / "served.jsonl"
    ope = evaluate_offline(held, Path(summary["snapshot"]), OffPolicySettings(), out=served)
    counts = served_items(served)
    n_items = len({r["item_id"] for r in rows})
    n_served = sum(counts.values())
    values = ope["value_per_impression"]
    estimate = ope["estimate"]
    results: dict[str, Any] = {
        "quick": args.quick, "device": device(), "dataset": "Open Bandit Dataset sample "
        f"(obp {OBP_VERSION}), random logging, campaign all",
        "rows": len(rows), "items": n_items, "train_impressions": cut,
        "train_clicks": int(summary["clicks"]),
        "held_out_impressions": len(rows) - cut,
        "held_out_clicks": sum(r["click"] == "1" for r in rows[cut:]),
        "pretrain_steps": steps, "context_features": summary["context_features"],
        "clicks_per_ad": summary["clicks_per_ad"], "import_warnings": summary["warnings"],
        "distinct_items_served": len(counts),
        "top_item_share": round(counts.most_common(1)[0][1] / n_served, 4) if n_served else None,
        "catalogue_coverage": ope["beyond_accuracy"]["catalogue_coverage"],
        "personalization": ope["beyond_accuracy"]["personalization"],
        "logging_value": values["logging_on_policy"]["value"],
        "estimator": estimate["estimator"], "estimate": estimate["value"],
        "estimate_low": estimate["low"], "estimate_high": estimate["high"],
        "snips": ope["slate_estimates"]["snips"]["value"],
        "dr": ope["slate_estimates"]["dr"]["value"],
        "matched_items": ope["diagnostics"]["matched_items"],
        "effective_sample_size": ope["diagnostics"]["effective_sample_size"],
        "trusted": ope["diagnostics"]["trusted"],
        "value_model": {k: v for k, v in summary["metrics"].items()
                        if k.startswith("value_")},
        "elapsed_s": round(time.perf_counter() - t0, 1),
    }
    path = write_results("real_logs", results, DEPENDS)
    print(json.dumps({k: v for k, v in results.items() if k != "value_model"}))
    print(f"wrote {path}")

    row = [results["distinct_items_served"], results["top_item_share"],
           results["catalogue_coverage"], results["personalization"],
           f"{results['logging_value']:.4f}",
           f"{results['estimate']:.4f} ({results['estimate_low']:.4f}–"
           f"{results['estimate_high']:.4f})", f"{results['snips']:.4f}",
           results["matched_items"], "yes" if results["trusted"] else "no"]
    table = markdown_table(
        ["distinct items served", "most served item's share", "catalogue coverage",
         "personalization", "logging policy (clicks / impression)",
         f"snapshot, {results['estimator']} (95% CI)", "snapshot, snips", "matched items",
         "trusted"], [row])
    update_doc_section("real_logs", (
        f"`bench/real_logs.py{' --quick' if args.quick else ''}`: {results['dataset']}, "
        f"{n_items} items, {len(rows):,} one-item impressions split by time: "
        f"{cut:,} imported ({results['train_clicks']} clicks) with `adloop import`'s "
        f"defaults ({steps} steps), {len(rows) - cut:,} held out "
        f"({results['held_out_clicks']} clicks) for `adloop evaluate --offline`; "
        f"{device()}, {results['elapsed_s']:.0f} s. Every item is a CPC ad bidding 1, "
        "so a value is clicks per impression. Context features chosen by the import: "
        f"{', '.join(results['context_features'])}. Import warnings: "
        f"{'; '.join(results['import_warnings']) or 'none'}.\n\n{table}\n"))


if __name__ == "__main__":
    main()
