"""The value model as a ranker of the whole catalogue, scored against the world's truth.

    python bench/value_ranking.py [--quick] [--seeds 1000-1003] [--requests 200]

``bench/closed_loop.py`` says how much each policy earns; this says where the generative
policy's value model loses it. With the whole servable catalogue scored (the default for
a catalogue this size), the slate is the value model's top ``k`` by expected value, so
its ranking is the policy. Per seed, as the closed loop does: the world, its logging
phase, pretraining on it (quick settings) and the logistic baseline fitted on the same
logs; then ``--requests`` requests drawn from the world as time moves on (nothing is
served, the world does not change but for time), and for each one every servable ad
scored by:

* ``value_head``: the generative model's value head as served (ONNX, calibrated);
* the same head with terms taken out after training (weights zeroed, exported again):
  ``without_decoder`` (the cross-attention decoder's logits), ``without_interaction``
  (the user × item interaction), ``without_wide`` (the wide terms: the industry's and
  code's own, context × industry and code, topic shares × industry and code),
  ``without_match`` (the topic match: the user's recent organic topics against the
  ad's text), ``linear_and_prior`` (decoder and interaction out: the per-item bias, the
  wide terms, the topic match and the (industry, goal) prior), ``bias_and_prior`` (the
  wide terms out too), ``match_and_prior`` (the per-item bias out too) and
  ``prior_only`` (the topic match out too: one constant per (industry, goal) cell);
* ``logistic``: the factorised logistic baseline (``adloop/baselines.py``), and the same
  fit with its tables taken out the same way (which of its terms carries the ranking):
  ``logistic_without_ad`` (the per-ad biases), ``logistic_without_crosses`` (topic shares
  × category and industry, context × industry and category), ``logistic_without_exposure``
  (the user's recent-ad fatigue term), ``logistic_without_match`` (the exact topic
  match: the share of the user's recent organic items on the ad's own topic and in its
  industry, in pCTR and pCVR), ``logistic_without_own_topic_match`` and
  ``logistic_without_industry_match`` (one of the two), ``logistic_without_category``
  (every table keyed on the ad's category);
* ``observable_oracle``: the true expected values with the user's hidden interest
  replaced by what a model can see (its top ``k`` only);
* hybrids that say which estimate loses the ranking: ``head_pctr_true_pcvr`` and
  ``true_pctr_head_pcvr`` (the value head's pCTR with the true pCVR, and the other way
  round), ``head_pctr_logistic_pcvr`` and ``logistic_pctr_head_pcvr`` (one estimate
  each from the head and the logistic fit).

Per scorer, mean over requests: ``top_k_share``, the true expected value of its top
``k`` (position 0) over that of the true top ``k``; the rank correlations (Spearman)
of its pCTR, pCVR and expected value with the truth's across the catalogue; and
``ctr_mean_ratio`` / ``cvr_mean_ratio``, mean predicted over mean true (calibration in
the large). ``value_head_over_logistic`` is the paired ratio of ``top_k_share`` over
seeds with its 95 % interval. The default seeds are tuning seeds (≥ 1000): the model's
choices are made on them, never on the evaluation seeds of the closed loop.

Writes ``bench/results/value_ranking.json`` and the ``value_ranking`` section of
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch

from adloop.evaluation import (
    EvalConfig,
    logging_phase,
    mean_ci,
    paired_ratio,
    pretrain_on,
    ratio_entries,
    world_config,
)
from bench.common import (
    closed_loop_config,
    device,
    in_process_depends,
    markdown_table,
    parse_seeds,
    update_doc_section,
    write_results,
)
from learner.model import GenerativeRecommender
from traffic.world import Request, SimAd, World

DEPENDS = in_process_depends("bench/value_ranking.py")

TERMS: dict[str, tuple[str, ...]] = {
    "value_head": (),
    "without_decoder": ("decoder",),
    "without_interaction": ("interaction",),
    "without_wide": ("wide",),
    "without_match": ("match",),
    "linear_and_prior": ("decoder", "interaction"),
    "bias_and_prior": ("decoder", "interaction", "wide"),
    "match_and_prior": ("decoder", "interaction", "wide", "item_bias"),
    "prior_only": ("decoder", "interaction", "wide", "item_bias", "match"),
}
"""Value-head variants: the logit terms zeroed after training."""

LOGISTIC_TERMS: dict[str, tuple[str, ...]] = {
    "logistic": (),
    "logistic_without_ad": ("ad", "ad_v"),
    "logistic_without_crosses": ("tw", "tv", "xi", "xc", "tw_v", "xc_v"),
    "logistic_without_exposure": ("exposure",),
    "logistic_without_match": ("m", "mi"),
    "logistic_without_own_topic_match": ("m",),
    "logistic_without_industry_match": ("mi",),
    "logistic_without_category": ("cat", "cat_v", "tw", "tw_v", "xc", "xc_v"),
}
"""Logistic-baseline variants: the parameter tables zeroed after the fit."""

HYBRIDS: dict[str, tuple[str, str]] = {
    "head_pctr_true_pcvr": ("value_head", "truth"),
    "true_pctr_head_pcvr": ("truth", "value_head"),
    "head_pctr_logistic_pcvr": ("value_head", "logistic"),
    "logistic_pctr_head_pcvr": ("logistic", "value_head"),
}
"""Scorers that take pCTR from one source and pCVR from another (the truth included)."""

SCORERS = (*TERMS, *LOGISTIC_TERMS, "observable_oracle", *HYBRIDS)
OVER_LOGISTIC = (*TERMS, *list(LOGISTIC_TERMS)[1:], *HYBRIDS)
"""The scorers whose top-k share is reported as a paired ratio to the logistic fit's."""
METRICS = ("top_k_share", "ev_rank_corr", "ctr_rank_corr", "cvr_rank_corr",
           "ctr_mean_ratio", "cvr_mean_ratio")

Scores = tuple[np.ndarray, np.ndarray]
"""(pCTR at position 0, pCVR) of every servable ad, in the world's order."""


@dataclass(frozen=True)
class Truth:
    """The world's truth for one request, shared by every scorer of it."""

    ctr: np.ndarray
    cvr: np.ndarray
    ev: np.ndarray
    """True expected value per impression of every servable ad."""
    best: float
    """True expected value of the true top k."""
    cpa: np.ndarray
    """Which ads bid per conversion (the pCVR rank correlation is over them)."""

    @classmethod
    def of(cls, world: World, req: Request, ads: Sequence[SimAd]) -> Truth:
        _, ctr, cvr = world.probabilities(req.user_id, req.context, req.event_time, ads,
                                          positions=np.zeros(len(ads), dtype=int))
        ctr, cvr = np.asarray(ctr, float), np.asarray(cvr, float)
        ev = world.expected_values(ads, ctr, cvr)
        return cls(ctr, cvr, ev, float(np.sort(ev)[::-1][:req.k].sum()),
                   np.array([a.record.bid_type == "cpa" for a in ads]))

    def share(self, chosen: Sequence[int] | np.ndarray) -> float:
        """True expected value of ``chosen`` over that of the true top k."""
        return float(self.ev[chosen].sum()) / self.best if self.best > 0 else np.nan


def without_terms(model: GenerativeRecommender, terms: Sequence[str]) -> GenerativeRecommender:
    """A copy of ``model`` whose value head has ``terms`` zeroed (see :data:`TERMS`)."""
    out = copy.deepcopy(model)
    head = out.value
    with torch.no_grad():
        if "decoder" in terms:
            head.out.weight.zero_()
            head.out.bias.zero_()
        if head.factors and "interaction" in terms:
            head.fm_user.weight.zero_()
            head.fm_user.bias.zero_()
            head.fm_const.zero_()
        if head.factors and "item_bias" in terms:
            head.item_bias.zero_()
        if head.wide and "wide" in terms:
            for name in head.WIDE:
                getattr(head, name).zero_()
        if head.match and "match" in terms:
            head.wide_match.zero_()
    return out


def logistic_without(policy: Any, tables: Sequence[str]) -> Any:
    """A copy of a fitted :class:`adloop.baselines.LogisticPolicy` with ``tables`` zeroed."""
    out = copy.deepcopy(policy)
    for name in tables:
        out.params[name] = torch.zeros_like(out.params[name])
    return out


def rank_corr(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation (NaN when either side is constant)."""
    if len(a) < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    ra = np.argsort(np.argsort(a, kind="stable"), kind="stable").astype(float)
    rb = np.argsort(np.argsort(b, kind="stable"), kind="stable").astype(float)
    return float(np.corrcoef(ra, rb)[0, 1])


class ServedValueHead:
    """A value head served as the closed loop serves it (``adloop.inprocess``), every
    servable ad scored for each request."""

    def __init__(self, name: str, world: World, model: GenerativeRecommender, tok: Any,
                 work_dir: Path, threads: int) -> None:
        from adloop.policies import GenerativePolicy

        self.policy = GenerativePolicy(name, world, model, tok, beam_width=128,
                                       work_dir=work_dir, threads=threads,
                                       score_catalogue_max=1_000_000, reach_every=0)

    def scores(self, world: World, req: Request, ads: Sequence[SimAd]) -> Scores:
        from server.engine import RecRequest

        p = self.policy
        p.world = world                   # ads created since are placed as served
        p.sync_world()
        res = p.server.rank([RecRequest(req.user_id, dict(req.context),
                                        list(reversed(req.recent_ad_ids)), len(ads),
                                        list(req.recent_organic))],
                            lambda levels, k: [128] * levels)[0]
        got = {a.ad_id: (a.pctr, a.pcvr) for a in res.ads}
        ctr = np.array([got.get(a.ad_id, (np.nan, np.nan))[0] for a in ads])
        cvr = np.array([got.get(a.ad_id, (np.nan, np.nan))[1] for a in ads])
        return ctr, cvr


def measure(world: World, ads: Sequence[SimAd], truth: Truth, pred: Scores,
            k: int) -> dict[str, float]:
    """The metrics of one scorer's ``pred`` on one request."""
    ctr, cvr = pred
    ev = world.expected_values(ads, np.nan_to_num(ctr), np.nan_to_num(cvr))
    cpa = truth.cpa
    return {"top_k_share": truth.share(np.argsort(-ev, kind="stable")[:k]),
            "ev_rank_corr": rank_corr(ev, truth.ev),
            "ctr_rank_corr": rank_corr(ctr, truth.ctr),
            "cvr_rank_corr": rank_corr(cvr[cpa], truth.cvr[cpa]),
            "ctr_mean_ratio": float(np.nanmean(ctr) / truth.ctr.mean()),
            "cvr_mean_ratio": float(np.nanmean(cvr) / truth.cvr.mean())}


def run_seed(cfg: EvalConfig, seed: int, n_requests: int, work_dir: Path,
             say: Callable[[str], None]) -> dict[str, dict[str, float]]:
    """Every scorer's metrics on one seed, averaged over its requests."""
    from adloop.baselines import LogisticPolicy

    t0 = time.perf_counter()
    world = World(world_config(cfg, seed))
    logs = logging_phase(world, cfg, seed)
    after = copy.deepcopy(world)
    model, tok, _ = pretrain_on(logs, world, cfg, seed, work_dir / f"pretrain-{seed}")
    heads = {name: ServedValueHead(name, copy.deepcopy(after), without_terms(model, terms),
                                   tok, work_dir / f"serve-{seed}-{name}", cfg.threads)
             for name, terms in TERMS.items()}
    fitted = LogisticPolicy(copy.deepcopy(after), seed=seed)
    fitted.pretrain(logs)
    logistic = {name: logistic_without(fitted, tables)
                for name, tables in LOGISTIC_TERMS.items()}
    say(f"seed {seed}: logs, pretraining and fits {time.perf_counter() - t0:.0f}s")
    w = copy.deepcopy(after)
    rows: dict[str, list[dict[str, float]]] = {s: [] for s in SCORERS}
    for req in w.step_requests(n_requests):
        w.advance_to(req.event_time)
        ads = w.servable_ads()
        truth = Truth.of(w, req, ads)
        scores: dict[str, Scores] = {"truth": (truth.ctr, truth.cvr)}
        for name, head in heads.items():
            scores[name] = head.scores(w, req, ads)
        for name, lg in logistic.items():
            scores[name] = lg.scores(req, ads)
        for name, (ctr_from, cvr_from) in HYBRIDS.items():
            scores[name] = (scores[ctr_from][0], scores[cvr_from][1])
        for name in (*heads, *logistic, *HYBRIDS):
            rows[name].append(measure(w, ads, truth, scores[name], req.k))
        top = set(w.observable_oracle_slate(req, req.k))
        rows["observable_oracle"].append(
            {"top_k_share": truth.share([i for i, a in enumerate(ads) if a.ad_id in top])})
    say(f"seed {seed}: {n_requests} requests scored in {time.perf_counter() - t0:.0f}s")
    return {s: {m: float(np.nanmean([r[m] for r in rs])) for m in rs[0]}
            for s, rs in rows.items()}


def aggregate(per_seed: dict[int, dict[str, dict[str, float]]]) -> dict[str, Any]:
    seeds = sorted(per_seed)
    out: dict[str, Any] = {"scorers": {}}
    for s in SCORERS:
        entry: dict[str, Any] = {}
        for m in METRICS:
            # NaN: a metric undefined on a seed (a rank correlation of a constant
            # scorer, e.g. the prior alone when the head has no priors)
            vals = [per_seed[x][s][m] for x in seeds
                    if m in per_seed[x][s] and np.isfinite(per_seed[x][s][m])]
            if len(vals) >= 2:
                mean, lo, hi = mean_ci(vals)
                entry[m] = round(mean, 4)
                entry[f"{m}_ci95"] = [round(lo, 4), round(hi, 4)]
                entry[f"{m}_per_seed"] = [round(v, 4) for v in vals]
            elif vals:      # one seed: no interval
                entry[m] = round(vals[0], 4)
                entry[f"{m}_per_seed"] = [round(vals[0], 4)]
        out["scorers"][s] = entry
    share = {s: [per_seed[x][s]["top_k_share"] for x in seeds] for s in SCORERS}
    for s in OVER_LOGISTIC:
        out.update(ratio_entries(f"{s}_over_logistic",
                                 paired_ratio(share[s], share["logistic"])))
    out.update(ratio_entries("value_head_over_observable_oracle",
                             paired_ratio(share["value_head"], share["observable_oracle"])))
    return out


def report(results: dict[str, Any]) -> str:
    sc = results["scorers"]
    rows = []
    for s in SCORERS:
        e = sc[s]

        def cell(m: str, e: dict[str, Any] = e) -> Any:
            if m not in e:
                return "–"
            if m != "top_k_share" or f"{m}_ci95" not in e:
                return f"{e[m]:.3f}"
            lo, hi = e[f"{m}_ci95"]
            return f"{e[m]:.3f} ({lo:.3f}–{hi:.3f})"

        rows.append([s, *(cell(m) for m in METRICS)])
    table = markdown_table(["scorer", "top-k share of the true top k (95% CI)",
                            "EV rank corr", "pCTR rank corr", "pCVR rank corr (CPA ads)",
                            "mean pCTR / true", "mean pCVR / true"], rows)
    ratios = "; ".join(
        f"`{s}` / logistic {results[f'{s}_over_logistic']:.3f} "
        f"({results[f'{s}_over_logistic_ci_low']:.3f}–"
        f"{results[f'{s}_over_logistic_ci_high']:.3f})"
        for s in OVER_LOGISTIC if results.get(f"{s}_over_logistic_ci_low") is not None)
    return (f"`bench/value_ranking.py{' --quick' if results['quick'] else ''}`: seeds "
            f"{results['seeds']} (tuning seeds), {results['requests_per_seed']} requests "
            f"each, {results['device']}, {results['elapsed_s']:.0f} s. Every servable ad "
            "scored at the start of the evaluation phase; the top-k share is the true "
            "expected value of a scorer's top k over that of the true top k, rank "
            "correlations are across the catalogue per request (mean over requests). The "
            "value head's variants have terms zeroed after training, the logistic fit's "
            "tables likewise (see the script).\n\n"
            f"{table}\n\nPaired over seeds, top-k share: {ratios}.")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2 seeds, 100 requests each")
    ap.add_argument("--seeds", default="1000-1003",
                    help="comma-separated seeds and ranges (tuning seeds by default)")
    ap.add_argument("--requests", type=int, default=200, help="requests scored per seed")
    ap.add_argument("--encoder", default="minilm")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch and ONNX Runtime threads (1, as each closed-loop seed worker "
                         "has: one thread is bit-reproducible whatever else the machine "
                         "runs, and pretrains the same model as the closed loop's seed)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    seeds = parse_seeds(args.seeds)
    n_requests = args.requests
    if args.quick:
        seeds, n_requests = seeds[:2], min(n_requests, 100)
    cfg = closed_loop_config(argparse.Namespace(    # the closed loop's quick settings
        seeds=args.seeds, encoder=args.encoder, threads=args.threads, jobs=1, quick=True,
        requests=None))
    cfg.seeds = seeds
    t0 = time.perf_counter()
    per_seed: dict[int, dict[str, dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="adloop-value-ranking-") as tmp:
        for seed in seeds:
            per_seed[seed] = run_seed(cfg, seed, n_requests, Path(tmp), print)
    results: dict[str, Any] = {
        "device": device(), "quick": args.quick, "seeds": list(seeds),
        "requests_per_seed": n_requests, "elapsed_s": round(time.perf_counter() - t0, 1),
        "metric": "true expected value of the scorer's top k / of the true top k",
        **aggregate(per_seed)}
    path = write_results("value_ranking", results, DEPENDS)
    update_doc_section("value_ranking", report(results))
    sc = results["scorers"]
    print(f"wrote {path}: top-k share value head {sc['value_head']['top_k_share']:.3f}, "
          f"logistic {sc['logistic']['top_k_share']:.3f}, observable oracle "
          f"{sc['observable_oracle']['top_k_share']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
