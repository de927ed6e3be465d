"""Closed-loop policy comparison on the simulated ad world (see adloop/evaluation.py).

    python bench/closed_loop.py [--quick] [--seeds 0,...,7] [--requests N] [--jobs 2]

Writes bench/results/closed_loop.json (per policy: mean and 95 % interval of RPM over
the last and first quarter of the run, its RPM curve, regret against the oracle and the
observable oracle, cold-start revenue share, the beyond-accuracy metrics: catalogue
coverage, slate and SID diversity, novelty unseen and in bits, personalization; plus
every ratio of adloop.evaluation.RATIO_PAIRS that ran, over the last quarter and the
whole run (``<a>_over_<b>``, ``..._whole_run``), each with its paired 95 % interval
(``_ci_low``, ``_ci_high``) and minimum detectable effect at 80 % power
(``mde_<a>_over_<b>``), and the drift evidence
frozen_over_observable_oracle_first/last_quarter), the `## closed_loop` table of
docs/benchmarks.md, docs/closed_loop.png (RPM curves) and docs/closed_loop_ratios.png
(the ratios with their intervals).
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from adloop.console import Console
from adloop.evaluation import (
    RATIO_PAIRS,
    EvalConfig,
    compare,
    headline_table,
    plot_ratios,
    plot_rpm_curves,
)
from bench.common import (
    ROOT,
    add_closed_loop_arguments,
    closed_loop_config,
    device,
    in_process_depends,
    update_doc_section,
    write_results,
)
from learner.beyond import BEYOND_KEYS

DEPENDS = in_process_depends("bench/closed_loop.py")

SERVING_KEYS = ("ece_ctr", "ece_cvr", "mean_coverage", "explored_share",
                "observable_oracle_reach", "value_recall_at_10", "generator_recall_at_10",
                "generator_recall_at_10_over_chance", "model_versions", "value_logloss_ctr",
                "value_logloss_cvr", "value_mse_reward", *BEYOND_KEYS)
"""What the generative policies report about their serving, the baselines' held-out
value-model errors on the logs' time split (``heldout_metrics``), and every policy's
beyond-accuracy metrics (mean over seeds; see learner/beyond.py)."""


BASELINES_NOTE = (
    "Yardsticks (each fed the same logged phase, feedback lists and request features "
    "as the generative policies; hyper-parameters picked on a time split of the logged "
    "phase, never on the evaluation traffic): **logistic**, a factorised logistic "
    "pCTR·pCVR model (per-ad bias shrunk to its industry, organic-topic shares × ad "
    "category and industry, the exact match of those topics on the ad's own topic and "
    "industry, context × industry and category, recent-ad fatigue) refit "
    "on every feedback block, every servable ad ranked by expected value with the bid; "
    "**dlrm**, the DLRM-style network with held-out early stopping and a learning-rate "
    "grid, trained online on every list; **vw_cb**, a Vowpal Wabbit contextual bandit "
    "(`--cb_explore_adf`, `mtr`): one prediction scores every servable ad, the slate is "
    "filled slot by slot from the ads not yet chosen, with probability ε (the harness's "
    "exploration share) one drawn uniformly, else the lowest estimated cost; each shown "
    "slot is learnt as one example (cost = -realized revenue) with its propensity "
    "(1 - ε)·[greedy] + ε / remaining; **frozen_explore**, the frozen generative model "
    "with rspo's exploration, so rspo / frozen_explore isolates learning. "
    "`best_baseline` is the best of logistic, dlrm and vw_cb by last-quarter RPM; "
    "`value_logloss_ctr` / `value_logloss_cvr` (`value_mse_reward` for vw_cb) are the "
    "value models' errors on the logs' held-out split.")
"""The paragraph of docs/benchmarks.md's closed_loop section that defines the yardsticks."""


def _num(x: float) -> float | None:
    return round(x, 4) if math.isfinite(x) else None


def _round(v: object) -> object:
    """A result value rounded to 4 places (lists elementwise; None and non-finite: None)."""
    if isinstance(v, list):
        return [_round(x) for x in v]
    if isinstance(v, float | int):
        return _num(float(v))
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_closed_loop_arguments(ap)
    ap.add_argument("--policies", default=",".join(EvalConfig.policies),
                    help="comma-separated subset of the policies to run")
    ap.add_argument("--beam-width", type=int, default=EvalConfig.beam_width,
                    help="final beam of the generative policies (wider = more candidates "
                         "for value rescoring: inference-time scaling)")
    ap.add_argument("--verbose", action="store_true",
                    help="log lines on the console (default: into --log)")
    ap.add_argument("--log", type=Path, default=Path("runs/bench/closed_loop.log"),
                    help="where the log lines go unless --verbose")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = closed_loop_config(args, beam_width=args.beam_width,
                             policies=tuple(p for p in args.policies.split(",") if p))
    t0 = time.perf_counter()
    with Console(args.log, args.verbose) as console, \
            tempfile.TemporaryDirectory(prefix="adloop-closed-loop-") as tmp:
        if console.quiet:
            console.say(f"logs: {args.log} (--verbose shows them here)")
        results = compare(cfg, Path(tmp), progress=console.say, jobs=args.jobs)
    elapsed = time.perf_counter() - t0
    pol = results["policies"]
    out: dict[str, object] = {
        "device": device(), "quick": args.quick, "seeds": list(cfg.seeds),
        "requests_per_policy": cfg.requests, "elapsed_s": round(elapsed, 1),
        "metric": "expected revenue per mille impressions, last quarter of the run",
        "policies": list(pol),
    }

    def ci(e: dict[str, object], key: str, nd: int = 4) -> list[float]:
        v = e[key]
        assert isinstance(v, dict)
        return [round(x, nd) for x in v["ci95"]]

    for name, e in pol.items():
        out[name] = {"rpm_mean": round(e["rpm_last_quarter"]["mean"], 4),
                     "rpm_ci95": ci(e, "rpm_last_quarter"),
                     "rpm_whole_run_mean": round(e["rpm_all"]["mean"], 4),
                     "rpm_whole_run_ci95": ci(e, "rpm_all"),
                     "rpm_first_quarter_mean": round(e["rpm_first_quarter"]["mean"], 4),
                     "rpm_first_quarter_ci95": ci(e, "rpm_first_quarter"),
                     "realized_rpm_mean": round(e["rpm_realized_last_quarter"]["mean"], 4),
                     "ctr": round(e["ctr"]["mean"], 5), "cvr": round(e["cvr"]["mean"], 4),
                     "regret": round(e["regret"]["mean"], 2),
                     "regret_ci95": ci(e, "regret", 2),
                     "regret_vs_observable_oracle": round(
                         e["regret_vs_observable_oracle"]["mean"], 2),
                     "regret_vs_observable_oracle_ci95": ci(e, "regret_vs_observable_oracle", 2),
                     "cold_start_revenue_share": round(
                         e["cold_start_revenue_share"]["mean"], 4),
                     "cold_start_revenue_share_ci95": ci(e, "cold_start_revenue_share"),
                     "latency_ms_per_request": round(e["latency_ms_per_request"]["mean"], 3),
                     "per_seed_rpm": [round(x, 4) for x in e["per_seed_rpm_last_quarter"]],
                     "per_seed_rpm_whole_run": [round(x, 4)
                                                for x in e["per_seed_rpm_whole_run"]],
                     **{k: _num(e[k]["mean"]) for k in SERVING_KEYS if k in e},
                     "rpm_curve": [round(x, 4) for x in e["rpm_curve"]]}
    out["best_baseline"] = results.get("best_baseline")
    out["best_baseline_policy"] = results.get("best_baseline_policy")
    for a, b in RATIO_PAIRS:     # ratio, paired 95 % interval, MDE; last quarter, whole run
        for name in (f"{a}_over_{b}", f"{a}_over_{b}_whole_run"):
            for key in (name, f"{name}_ci_low", f"{name}_ci_high", f"mde_{name}",
                        f"{name}_se_log"):
                if key in results:
                    out[key] = _round(results[key])
            for key in (f"{name}_ci95", f"{name}_per_seed", f"{name}_per_seed_ci95"):
                if key in results:
                    out[key] = _round(results[key])
    rspo = out.get("rspo")
    if isinstance(rspo, dict):     # the model issue's retrieval targets, on rspo's runs
        out["rspo_value_recall_at_10"] = rspo.get("value_recall_at_10")
        out["generator_recall_at_10_over_chance"] = rspo.get(
            "generator_recall_at_10_over_chance")
    for key in ("frozen_over_observable_oracle_first_quarter",
                "frozen_over_observable_oracle_last_quarter"):
        out[key] = _round(results.get(key))
    write_results("closed_loop", out, DEPENDS)
    plot = plot_rpm_curves(results, ROOT / "docs" / "closed_loop.png",
                           f"closed loop, {len(cfg.seeds)} seeds, {cfg.requests} requests")
    ratios_plot = plot_ratios(results, ROOT / "docs" / "closed_loop_ratios.png",
                              f"paired ratios, {len(cfg.seeds)} seeds, {cfg.requests} requests")
    goals = (f"rspo / oracle = {out['rspo_over_oracle']} (goal ≥ 0.90), "
             f"rspo / frozen = {out['rspo_over_frozen']} (goal ≥ 1.10; paired 95 % interval "
             f"{out['rspo_over_frozen_ci95']}, goal: low end > 1.0; MDE "
             f"{out['mde_rspo_over_frozen']}), "
             f"rspo / dlrm = {out['rspo_over_dlrm']} (goal ≥ 1.042), "
             f"rspo / best baseline ({out['best_baseline']}) = "
             f"{out.get('rspo_over_best_baseline')} (paired 95 % interval "
             f"{out.get('rspo_over_best_baseline_ci95')}, MDE "
             f"{out.get('mde_rspo_over_best_baseline')}), "
             f"rspo / frozen_explore = {out.get('rspo_over_frozen_explore')} (low end "
             f"{out.get('rspo_over_frozen_explore_ci_low')}: learning alone), "
             f"rspo / observable oracle = {out['rspo_over_observable_oracle']}, "
             f"rspo / vsl_only = {out['rspo_over_vsl_only']}; drift: frozen / observable "
             f"oracle {out['frozen_over_observable_oracle_first_quarter']} (first quarter) → "
             f"{out['frozen_over_observable_oracle_last_quarter']} (last quarter), "
             f"observable oracle / oracle = {out['observable_oracle_over_oracle']}")
    update_doc_section("closed_loop", (
        f"`bench/closed_loop.py{' --quick' if args.quick else ''}`: seeds {list(cfg.seeds)}, "
        f"{cfg.requests} requests per policy (generative final beam {cfg.beam_width}) "
        f"after a {cfg.log_requests}-request random "
        f"logging phase (the pretraining data), {out['device']}, {elapsed:.0f} s. "
        "RPM = expected revenue per 1000 impressions (ground-truth expected value of every "
        "shown ad), over the last quarter of the run; 95 % Student-t intervals over seeds. "
        "Ratios are ratios of the means over seeds with a paired 95 % interval (every "
        "policy of a seed sees the same world, traffic and response randomness) and the "
        "minimum detectable effect at 80 % power (MDE; docs/benchmarks.md, Paired "
        "design).\n\n"
        f"{headline_table(results)}\n\n{goals}.\n\n{BASELINES_NOTE}\n\n"
        f"![RPM over time]({plot.relative_to(ROOT / 'docs')})"
        + (f"\n\n![paired ratios]({ratios_plot.relative_to(ROOT / 'docs')})"
           if ratios_plot is not None else "")))
    print(headline_table(results))
    print(goals)
    return 0


if __name__ == "__main__":
    sys.exit(main())
