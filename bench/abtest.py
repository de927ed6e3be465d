"""Error rates of the live A/B test (learner/abtest.py) by simulation.

    python bench/abtest.py [--quick] [--seed 1000]

Revenue per request is :func:`learner.abtest.ads_like_revenue` (95 % of requests earn
nothing, CPC and CPA prices log-normal, mean 0.1, coefficient of variation about 12.6);
each request falls in the control bucket with probability ``control_share``. The test
runs at alpha 0.05 with the learner's defaults (minimum 1000 requests per bucket,
mixture tuned for 20 000 per bucket).

* **type-I error under continuous monitoring**: no difference; the test looks after
  every request; the share of experiments in which it ever decides (either way);
* **power**: online earns ``drop`` less (fewer clicks); the share of experiments in
  which it decides online_worse within the horizon (looking every 100 requests, which
  only lowers power against looking after every one), with the median request count
  at the decision, and the share that decide the wrong way;
* **coverage**: the share of experiments in which every interval looked at (every 10
  requests, from the minimum sample on) contains the true difference.

Writes bench/results/abtest.json and the ``## abtest`` section of docs/benchmarks.md;
docs/abtest.md quotes the figures.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from bench.common import (
    device,
    in_process_depends,
    markdown_table,
    update_doc_section,
    write_results,
)
from learner.abtest import ads_like_revenue, first_decisions

DEPENDS = in_process_depends("bench/abtest.py")
ALPHA, MIN_REQUESTS, TARGET = 0.05, 1000, 20_000
MEAN = 0.1


def simulate(seed: int, n_exp: int, n_req: int, drop: float, share: float, every: int,
             chunk: int = 20) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    decisions, ats, bounds = [], [], []
    rng = np.random.default_rng(seed)
    for i in range(0, n_exp, chunk):
        e = min(chunk, n_exp - i)
        control = rng.random((e, n_req)) < share
        revenue = ads_like_revenue(rng, (e, n_req), scale=np.where(control, 1.0, 1.0 - drop))
        d, a, b = first_decisions(revenue, control, ALPHA, MIN_REQUESTS, TARGET, every)
        decisions.append(d)
        ats.append(a)
        bounds.append(b)
    return np.concatenate(decisions), np.concatenate(ats), np.concatenate(bounds)


def se(p: float, n: int) -> float:
    return float(np.sqrt(max(p * (1 - p), 1e-12) / n))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seed", type=int, default=1000)
    args = ap.parse_args(argv)
    q = args.quick
    t0 = time.perf_counter()
    shares = (0.5, 0.1)
    null_exp, null_req = (200, 30_000) if q else (1000, 100_000)
    pow_exp, pow_req = (40, 200_000) if q else (200, 600_000)
    cov_exp, cov_req = (100, 40_000) if q else (500, 100_000)
    results: dict[str, Any] = {"quick": q, "seed": args.seed, "alpha": ALPHA,
                               "min_requests": MIN_REQUESTS, "target_requests": TARGET,
                               "type1": [], "power": [], "coverage": []}
    seed = args.seed
    for share in shares:
        d, _, _ = simulate(seed, null_exp, null_req, 0.0, share, every=1)
        seed += 1
        p = float((d != 0).mean())
        results["type1"].append({"control_share": share, "experiments": null_exp,
                                 "requests": null_req, "rate": p, "se": se(p, null_exp),
                                 "online_worse": float((d < 0).mean())})
        print(f"type-I share {share}: {p:.4f}", flush=True)
    for share in shares:
        for drop in (0.10, 0.15, 0.20):
            d, at, _ = simulate(seed, pow_exp, pow_req, drop, share, every=100)
            seed += 1
            found = d < 0
            med = float(np.median(at[found])) if found.any() else None
            results["power"].append({
                "control_share": share, "drop": drop, "experiments": pow_exp,
                "horizon_requests": pow_req, "power": float(found.mean()),
                "se": se(float(found.mean()), pow_exp), "median_requests_at_decision": med,
                "wrong_sign": float((d > 0).mean())})
            print(f"power share {share} drop {drop}: {found.mean():.3f} (median at {med})",
                  flush=True)
    for share in shares:
        drop = 0.15
        _, _, b = simulate(seed, cov_exp, cov_req, drop, share, every=10)
        seed += 1
        truth = -drop * MEAN
        cov = float(((b[:, 0] <= truth) & (truth <= b[:, 1])).mean())
        results["coverage"].append({"control_share": share, "drop": drop,
                                    "experiments": cov_exp, "requests": cov_req,
                                    "coverage": cov, "se": se(cov, cov_exp)})
        print(f"coverage share {share}: {cov:.4f}", flush=True)
    results["seconds"] = round(time.perf_counter() - t0, 1)
    results["device"] = device()
    if q:
        write_results("abtest_quick", results, DEPENDS)
        return 0
    write_results("abtest", results, DEPENDS)
    rows = [[f"{r['control_share']:.0%}", "none", f"{r['experiments']} × {r['requests']:,}",
             f"type-I {r['rate']:.3f} ± {r['se']:.3f}"] for r in results["type1"]]
    rows += [[f"{r['control_share']:.0%}", f"−{r['drop']:.0%}",
              f"{r['experiments']} × {r['horizon_requests']:,}",
              f"power {r['power']:.2f} ± {r['se']:.2f}, median decision at "
              f"{r['median_requests_at_decision'] or 0:,.0f} requests, wrong sign "
              f"{r['wrong_sign']:.3f}"] for r in results["power"]]
    rows += [[f"{r['control_share']:.0%}", f"−{r['drop']:.0%}",
              f"{r['experiments']} × {r['requests']:,}",
              f"coverage {r['coverage']:.3f} ± {r['se']:.3f}"] for r in results["coverage"]]
    update_doc_section("abtest", (
        "`python bench/abtest.py` — error rates of the live A/B test (learner/abtest.py, "
        "docs/abtest.md) on simulated ads revenue (95 % zero, CV ≈ 12.6), alpha "
        f"{ALPHA}, minimum {MIN_REQUESTS} requests per bucket, mixture tuned for "
        f"{TARGET:,} per bucket; type-I error looked at after every request, power every "
        "100 requests, coverage every 10 (± one standard error of the simulation). "
        f"{results['seconds']:.0f} s on {results['device']}.\n\n"
        + markdown_table(["control share", "online vs control", "experiments × requests",
                          "result"], rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
