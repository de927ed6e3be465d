"""Off-policy estimates against the simulator's ground truth.

For every seed a simulated world (:mod:`traffic.world`) first serves a warm-up of
uniformly random slates; the target policies learn from it (the generative model is
pretrained on it, the logistic baseline fits it, bid-only takes its base rates). Then
the world serves one long log per **logger**, from the same state after the warm-up:

* ``uniform``: slates drawn uniformly without replacement from the servable ads
  (propensity 1/m per slot, m servable ads);
* ``explore``: the server's own policy, the pretrained generative snapshot served by the
  server's code in-process with exploration (the last slot goes to a low-exposure ad
  with probability ``--explore``), with the propensities the server logs.

In every logged context, before the user answers, each **target** policy says what it
would serve (nothing is served) and the simulator scores that slate: its true expected
revenue in that context at that moment's world state, positions included (late
conversions included: the world's expected value, not the joiner's attribution
window). Targets: ``frozen`` (the pretrained generative snapshot, no exploration),
``bid_only``, ``logistic`` (the factorised logistic baseline), ``observable_oracle``
(the best slate given what models see), ``anti_oracle`` (the slate of lowest true
value: far from any logger).

Each log is cut into consecutive chunks of every ``--sizes`` (at most ``--chunks`` per
size), and every estimator of :mod:`learner.slate_ope` (with a ridge reward model
cross-fitted on the chunk) estimates each target's value per impression on each chunk.
Per estimator, logger and size the results give, over seeds × chunks × targets, the
relative bias, the median relative error, the relative RMSE and the share of 95 %
intervals holding the truth. The default estimator is picked on the ``--select-seeds``
(≥ 1000), never on the evaluation seeds: the lowest median relative error among those
whose intervals cover ≥ 0.90 on the uniform log at the largest size.

``--quick``: 4 seeds, sizes 2 000 and 10 000, 2 000 impressions of the exploring
logger. The full run: 20 seeds, sizes 10 000 and 100 000. Both pick the default on 4
selection seeds (two could not separate ips from snips).

Intervals: :func:`learner.slate_ope.interval` (for the per-item weighting estimators the
hull of a score interval, whose width follows the hypothesised value through the
rewards' pay units, and the normal one); every row keeps the normal interval too
(``coverage_95_normal``). ``matched_paid`` counts the logged items that the target
serves at their slot and that paid: the information a weighting estimator has.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    ROOT,
    in_process_depends,
    parse_seeds,
    update_doc_section,
    write_results,
)
from learner.slate_ope import (
    SLATE_ESTIMATORS,
    ItemCodes,
    RidgeRewardModel,
    SlateLog,
    bootstrap_interval,
    cross_fit,
    effective_sample_size,
    influence,
    interval,
    match_share,
    normal_interval,
    pay_unit,
    second_moment_scale,
)

DEPENDS = in_process_depends("bench/ope.py")
CONTEXT_KEYS = ("device", "placement", "hour", "region", "age", "interest")
BID_TYPES = ("cpc", "cpa", "cpm")
TARGETS = ("frozen", "bid_only", "logistic", "observable_oracle", "anti_oracle")
LOGGERS = ("uniform", "explore")
COVERAGE_TARGET = 0.90


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    sizes: tuple[int, ...] = (10_000, 100_000)
    explore_size: int = 20_000
    """Impressions of the exploring logger's log (its chunks use ``sizes`` that fit)."""
    chunks: int = 10
    warmup: int = 2500
    explore: float = 0.05
    pretrain_steps: int = 250
    encoder: str = "minilm"
    beam_width: int = 32
    batch: int = 64
    l2: float = 10.0
    bootstrap: int = 200
    request_rate: float = 1.0
    """Requests per simulated second: 100 000 requests span ~28 simulated hours, over
    which new ads (10 an hour) about replace the budgets the traffic spends."""


# -- the world, the policies -------------------------------------------------------------


class Codes:
    """Integer codes of ads (with their industry, category and bid type) and of context
    values (one vocabulary per context key)."""

    def __init__(self) -> None:
        self.ad: dict[str, int] = {}
        self.attrs: list[tuple[int, int, int]] = []
        self.industry: dict[str, int] = {}
        self.category: dict[str, int] = {}
        self.ctx: list[dict[str, int]] = [{} for _ in CONTEXT_KEYS]

    def of_ad(self, world: Any, ad_id: str) -> int:
        code = self.ad.get(ad_id)
        if code is None:
            ad = world.ads[ad_id]
            rec = ad.record
            code = self.ad[ad_id] = len(self.attrs)
            self.attrs.append((self.industry.setdefault(rec.industry, len(self.industry)),
                               self.category.setdefault(ad.category, len(self.category)),
                               BID_TYPES.index(rec.bid_type)))
        return code

    def of_context(self, context: dict[str, str]) -> list[int]:
        return [v.setdefault(context.get(k, ""), len(v))
                for k, v in zip(CONTEXT_KEYS, self.ctx, strict=True)]

    def attr_array(self) -> np.ndarray:
        return np.asarray(self.attrs, np.int64).reshape(-1, 3)

    def sizes(self) -> tuple[list[int], list[int]]:
        return ([max(1, len(v)) for v in self.ctx],
                [max(1, len(self.industry)), max(1, len(self.category)), len(BID_TYPES)])


@dataclasses.dataclass
class LoggedRun:
    """One logger's log on one seed, with every target's slate and true value."""

    logger: str
    ctx: list[list[int]] = dataclasses.field(default_factory=list)
    ads: list[list[int]] = dataclasses.field(default_factory=list)
    reward: list[list[float]] = dataclasses.field(default_factory=list)
    propensity: list[list[float]] = dataclasses.field(default_factory=list)
    candidates: list[int] = dataclasses.field(default_factory=list)
    converted: list[list[bool]] = dataclasses.field(default_factory=list)
    """Per logged item: converted at all (in the attribution window or after)."""
    unit: list[list[float]] = dataclasses.field(default_factory=list)
    """Per logged item: what it pays when it pays (cpc and cpa bid, cpm bid / 1000)."""
    logged_truth: list[float] = dataclasses.field(default_factory=list)
    """True expected value of the logged slate (the on-policy check of late rewards)."""
    target_ads: dict[str, list[list[int]]] = dataclasses.field(default_factory=dict)
    truth: dict[str, list[float]] = dataclasses.field(default_factory=dict)


class TrueValues:
    """The world's expected value of any slate in one request's context, as the world
    stands: one pass over the servable ads at the top slot, each slot's position bias
    added on the click logit."""

    def __init__(self, world: Any, req: Any) -> None:
        ads, pctr, pcvr = world.probabilities(req.user_id, req.context, req.event_time)
        self.world, self.ads = world, ads
        self.index = {a.ad_id: i for i, a in enumerate(ads)}
        p = np.clip(np.asarray(pctr, float), 1e-12, 1 - 1e-12)
        self.logit = np.log(p / (1 - p))
        self.pcvr = np.asarray(pcvr, float)
        self.ev0 = world.expected_values(ads, pctr, pcvr) if ads else np.zeros(0)

    def slate(self, ids: Sequence[str]) -> float:
        idx = [(j, self.index[a]) for j, a in enumerate(ids) if a in self.index]
        if not idx:
            return 0.0
        pos = np.array([j for j, _ in idx], float)
        rows = np.array([i for _, i in idx])
        pctr = 1.0 / (1.0 + np.exp(-(self.logit[rows]
                                     + self.world.config.position_bias * pos)))
        return float(self.world.expected_values([self.ads[i] for i in rows], pctr,
                                                self.pcvr[rows]).sum())

    def anti_oracle(self, k: int) -> list[str]:
        order = np.lexsort((np.arange(len(self.ads)), self.ev0))[:k]
        return [self.ads[int(i)].ad_id for i in order]


def make_targets(world: Any, logs: Sequence[Any], cfg: BenchConfig, seed: int,
                 work: Path) -> tuple[dict[str, Any], Any]:
    """The fitted target policies (and the pretrained generative model for the
    exploring logger)."""
    from adloop import baselines, policies
    from adloop.evaluation import EvalConfig, pretrain_on

    ecfg = EvalConfig(seeds=(seed,), pretrain_steps=cfg.pretrain_steps, encoder=cfg.encoder,
                      threads=1)
    pretrained = pretrain_on(list(logs), world, ecfg, seed, work / "pretrain")
    bid = policies.BidOnlyPolicy(world)
    bid.fit(logs)
    logistic = baselines.LogisticPolicy(world, seed=seed)
    logistic.pretrain(logs)
    frozen = generative(world, pretrained, cfg, seed, work / "frozen", explore=0.0)
    return {"frozen": frozen, "bid_only": bid, "logistic": logistic}, pretrained


def generative(world: Any, pretrained: Any, cfg: BenchConfig, seed: int, work: Path,
               explore: float) -> Any:
    from adloop.policies import GenerativePolicy

    model, tok, heldout = pretrained
    return GenerativePolicy("frozen", world, model, tok, update="none",
                            beam_width=cfg.beam_width, seed=seed, explore=explore,
                            work_dir=work, threads=1, reach_every=0, heldout=heldout)


def rebind(policy: Any, world: Any) -> Any:
    """The policy reading ``world`` (each logger runs on its own copy)."""
    policy.world = world
    return policy


def explore_rank(gp: Any, reqs: Sequence[Any]) -> list[Any]:
    """The exploring server's results (slates with the propensities it logs)."""
    from server.engine import RecRequest

    gp.sync_world()
    widths = gp.widths()
    return list(gp.server.rank(
        [RecRequest(r.user_id, dict(r.context), list(reversed(r.recent_ad_ids)), r.k,
                    list(r.recent_organic)) for r in reqs], lambda levels, k: widths))


def collect(world: Any, logger: str, n: int, targets: dict[str, Any], codes: Codes,
            cfg: BenchConfig, seed: int, explorer: Any = None) -> LoggedRun:
    """Serve ``n`` requests with ``logger``; record the log and every target's slate and
    true value in each logged context."""
    from traffic.driver import RandomPolicy

    run = LoggedRun(logger)
    names = [*targets, "observable_oracle", "anti_oracle"]
    for t in names:
        run.target_ads[t], run.truth[t] = [], []
    rnd = RandomPolicy(world, seed + 2000)
    served = 0
    while served < n:
        reqs = world.step_requests(min(cfg.batch, n - served))
        world.advance_to(reqs[-1].event_time)
        slates = {t: [s.ad_ids() for s in p.recommend_batch(reqs)]
                  for t, p in targets.items()}
        if logger == "explore":
            results = explore_rank(explorer, reqs)
            logged = [[a.ad_id for a in res.ads] for res in results]
            props = [[a.propensity for a in res.ads] for res in results]
        for b, req in enumerate(reqs):
            tv = TrueValues(world, req)
            per_target = {t: slates[t][b] for t in targets}
            per_target["observable_oracle"] = world.observable_oracle_slate(req)
            per_target["anti_oracle"] = tv.anti_oracle(req.k)
            for t, ids in per_target.items():
                run.target_ads[t].append([codes.of_ad(world, a) for a in ids])
                run.truth[t].append(tv.slate(ids))
            if logger == "uniform":
                ids = rnd.recommend(req).ad_ids()
                m = len(tv.ads)
                p = [1.0 / m] * len(ids)
            else:
                ids, p, m = logged[b], props[b], 0
            resp = world.respond(req, ids)
            by_id = {o.ad_id: o for o in resp.items}
            kept = [(a, q) for a, q in zip(ids, p, strict=True) if a in by_id]
            run.ads.append([codes.of_ad(world, a) for a, _ in kept])
            run.propensity.append([q for _, q in kept])
            run.reward.append([by_id[a].reward for a, _ in kept])
            run.converted.append([by_id[a].converted for a, _ in kept])
            run.unit.append([pay_unit(world.ads[a].record.bid_type, world.ads[a].record.bid)
                             for a, _ in kept])
            run.logged_truth.append(resp.expected_value)
            run.candidates.append(m)
            run.ctx.append(codes.of_context(req.context))
        served += len(reqs)
    return run


def run_seed(seed: int, cfg: BenchConfig, sizes_by_logger: dict[str, tuple[int, ...]],
             default: str | None = None) -> list[dict[str, Any]]:
    """Every (logger, size, chunk, target, estimator) of one seed, as rows."""
    import torch

    from adloop.evaluation import EvalConfig, logging_phase
    from learner.embeddings import clear_embedding_cache
    from traffic.world import World, WorldConfig

    torch.set_num_threads(1)
    clear_embedding_cache()
    t0 = time.perf_counter()
    world = World(WorldConfig(seed=seed, n_users=400, n_ads=150, slate_size=5,
                              request_rate=cfg.request_rate, new_ads_per_hour=10.0))
    logs = logging_phase(world, EvalConfig(log_requests=cfg.warmup), seed)
    after = copy.deepcopy(world)
    codes = Codes()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="adloop-bench-ope-") as tmp:
        work = Path(tmp)
        targets, pretrained = make_targets(world, logs, cfg, seed, work)
        fitted = time.perf_counter() - t0
        for logger in LOGGERS:
            sizes = sizes_by_logger[logger]
            if not sizes:
                continue
            w = copy.deepcopy(after)
            tg = {t: rebind(p, w) for t, p in targets.items()}   # frozen: never learn
            explorer = (generative(w, pretrained, cfg, seed, work / "explore", cfg.explore)
                        if logger == "explore" else None)
            t1 = time.perf_counter()
            run = collect(w, logger, max(sizes), tg, codes, cfg, seed, explorer)
            t2 = time.perf_counter()
            rows += estimate_run(run, codes, cfg, sizes, seed, default)
            print(f"seed {seed} {logger}: pretrain+fit {fitted:.0f}s, log {t2 - t1:.0f}s, "
                  f"estimates {time.perf_counter() - t2:.0f}s, servable "
                  f"{len(w.servable_ads())}", flush=True)
    return rows


def slate_log(run: LoggedRun, lo: int, hi: int, target: str, reward: np.ndarray,
              predicted: np.ndarray, direct: np.ndarray, unit: np.ndarray) -> SlateLog:
    """The chunk ``lo:hi`` against ``target`` (``reward``, ``predicted``, ``unit``:
    [n, K])."""
    k = reward.shape[1]
    n = hi - lo
    prop, pi = np.ones((n, k)), np.zeros((n, k))
    mask = np.zeros((n, k), bool)
    cross = np.zeros(n)
    for i in range(n):
        ads, tgt = run.ads[lo + i], run.target_ads[target][lo + i]
        c = len(ads)
        prop[i, :c], mask[i, :c] = run.propensity[lo + i], True
        for j, a in enumerate(ads):
            pi[i, j] = 1.0 if j < len(tgt) and tgt[j] == a else 0.0
        tset = set(tgt)
        cross[i] = sum(1 for j, a in enumerate(ads) if a in tset
                       and not (j < len(tgt) and tgt[j] == a))
    uniform = run.logger == "uniform"
    return SlateLog(reward, prop, pi, mask, predicted, direct,
                    np.asarray(run.candidates[lo:hi], float) if uniform else None,
                    cross if uniform else None, unit)


def estimate_run(run: LoggedRun, codes: Codes, cfg: BenchConfig, sizes: Sequence[int],
                 seed: int, default: str | None) -> list[dict[str, Any]]:
    ctx_all = np.asarray(run.ctx, np.int64)
    attrs = codes.attr_array()
    ctx_sizes, attr_sizes = codes.sizes()
    rows: list[dict[str, Any]] = []
    names = list(run.target_ads)
    for size in sizes:
        for chunk in range(min(cfg.chunks, len(run.ads) // size)):
            lo, hi = chunk * size, (chunk + 1) * size
            ctx = ctx_all[lo:hi]
            logged = _items(run.ads[lo:hi])
            raw = np.concatenate([np.asarray(r, float) for r in run.reward[lo:hi]])
            cpa = attrs[logged.ad, 2] == BID_TYPES.index("cpa")
            converted = np.concatenate([np.asarray(c, bool) for c in run.converted[lo:hi]])
            late = late_share(converted[cpa], raw[cpa] > 0)
            reward = np.where(cpa, raw / (1.0 - late), raw)
            unit_raw = np.concatenate([np.asarray(u, float) for u in run.unit[lo:hi]])
            unit = np.where(cpa, unit_raw / (1.0 - late), unit_raw)
            queries = [_items(run.target_ads[t][lo:hi]) for t in names]
            preds = cross_fit(ctx, attrs, logged, reward, queries, hi - lo, folds=2,
                              seed=seed, make=lambda: RidgeRewardModel(
                                  ctx_sizes, attr_sizes, len(codes.attrs), cfg.l2))
            k = max(len(s) for s in run.ads[lo:hi])
            predicted = _pad(preds[0], logged, hi - lo, k)
            reward_nk = _pad(reward, logged, hi - lo, k)
            unit_nk = _pad(unit, logged, hi - lo, k)
            for t, q, pq in zip(names, queries, preds[1:], strict=True):
                direct = np.bincount(q.impression, weights=pq, minlength=hi - lo)
                log = slate_log(run, lo, hi, t, reward_nk, predicted, direct, unit_nk)
                truth = float(np.mean(run.truth[t][lo:hi]))
                ess = effective_sample_size(log)
                items_share, imp_share = match_share(log)
                row: dict[str, Any] = {
                    "seed": seed, "logger": run.logger, "size": size, "chunk": chunk,
                    "target": t, "truth": truth, "ess": ess, "match_share": items_share,
                    "matched_paid": int(((log.target > 0) & log.mask
                                         & (log.reward > 0)).sum()),
                    "impressions_matched": imp_share,
                    "logger_truth": float(np.mean(run.logged_truth[lo:hi])),
                    "logger_on_policy": float(raw.sum() / (hi - lo)),
                    "logger_on_policy_corrected": float(reward.sum() / (hi - lo)),
                    "late_share": late, "estimates": {}, "normal": {}}
                kappa = second_moment_scale(log)
                for name in SLATE_ESTIMATORS:
                    v, psi = influence(log, name)
                    row["estimates"][name] = [v, *interval(log, name, v, psi, kappa=kappa)]
                    row["normal"][name] = list(normal_interval(v, psi))
                if default is not None and chunk == 0 and size == max(sizes) and cfg.bootstrap:
                    row["bootstrap"] = list(bootstrap_interval(log, default, cfg.bootstrap,
                                                               0.95, seed))
                rows.append(row)
    return rows


def late_share(converted: np.ndarray, in_window: np.ndarray) -> float:
    """Share of the cpa items' conversions that landed after the attribution window
    (the log's conversions topic has them; the joiner's rewards do not)."""
    total = int(converted.sum())
    return 1.0 - float(in_window.sum()) / total if total else 0.0


def _items(slates: Sequence[Sequence[int]]) -> ItemCodes:
    imp = np.concatenate([np.full(len(s), i) for i, s in enumerate(slates)]).astype(np.int64)
    ad = np.concatenate([np.asarray(s, np.int64) for s in slates])
    pos = np.concatenate([np.arange(len(s)) for s in slates]).astype(np.int64)
    return ItemCodes(imp, ad, pos)


def _pad(values: np.ndarray, items: ItemCodes, n: int, k: int) -> np.ndarray:
    out = np.zeros((n, k))
    out[items.impression, items.position] = values
    return out


# -- aggregation ---------------------------------------------------------------------------


def summarize(rows: Sequence[dict[str, Any]], logger: str, size: int,
              name: str) -> dict[str, Any]:
    sel = [r for r in rows if r["logger"] == logger and r["size"] == size and r["truth"] > 0]
    if not sel:
        return {}
    rel = np.array([(r["estimates"][name][0] - r["truth"]) / r["truth"] for r in sel])
    cover = np.array([r["estimates"][name][1] <= r["truth"] <= r["estimates"][name][2]
                      for r in sel])
    cover_normal = np.array([r["normal"][name][0] <= r["truth"] <= r["normal"][name][1]
                             for r in sel])
    absd = np.array([r["estimates"][name][0] - r["truth"] for r in sel])
    by_target = {}
    for t in sorted({r["target"] for r in sel}):
        m = np.array([r["target"] == t for r in sel])
        by_target[t] = {"median_relative_error": float(np.median(np.abs(rel[m]))),
                        "bias": float(rel[m].mean()), "coverage_95": float(cover[m].mean())}
    return {"coverage_95": float(cover.mean()),
            "coverage_95_normal": float(cover_normal.mean()),
            "median_relative_error": float(np.median(np.abs(rel))),
            "bias": float(rel.mean()), "rmse": float(math.sqrt(float((rel ** 2).mean()))),
            "bias_per_impression": float(absd.mean()),
            "rmse_per_impression": float(math.sqrt(float((absd ** 2).mean()))),
            "n": len(sel), "by_target": by_target,
            "coverage_short": bool(cover.mean() < COVERAGE_TARGET)}


def pick_default(rows: Sequence[dict[str, Any]], size: int) -> tuple[str, dict[str, Any]]:
    """Among estimators whose intervals cover ≥ 0.90 on the uniform log at ``size``, the
    lowest median relative error; when none covers, the lowest median relative error of
    all (an estimator whose intervals are wide enough to cover but whose estimates are
    far off is no default)."""
    stats = {n: summarize(rows, "uniform", size, n) for n in SLATE_ESTIMATORS}
    ok = [n for n in SLATE_ESTIMATORS if stats[n] and stats[n]["coverage_95"] >= COVERAGE_TARGET]
    if ok:
        best = min(ok, key=lambda n: stats[n]["median_relative_error"])
    else:
        best = min((n for n in SLATE_ESTIMATORS if stats[n]),
                   key=lambda n: stats[n]["median_relative_error"])
    return best, {n: {k: v for k, v in s.items() if k != "by_target"} for n, s in stats.items()}


def run_seeds(seeds: Sequence[int], cfg: BenchConfig, sizes: dict[str, tuple[int, ...]],
              jobs: int, default: str | None = None) -> list[dict[str, Any]]:
    if jobs <= 1 or len(seeds) <= 1:
        return [r for s in seeds for r in run_seed(s, cfg, sizes, default)]
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn")) as pool:
        futures = [pool.submit(run_seed, s, cfg, sizes, default) for s in seeds]
        return [r for f in futures for r in f.result()]


def table(results: dict[str, Any]) -> str:
    lines = ["| logger | impressions | estimator | coverage 95% | (normal interval) "
             "| median rel. error | rel. bias | rel. RMSE | |",
             "|---|---|---|---|---|---|---|---|---|"]
    for logger in LOGGERS:
        for e in results["estimators"]:
            for size, s in e.get(logger, {}).items():
                if not s:
                    continue
                flag = "coverage short of 0.90" if s["coverage_95"] < COVERAGE_TARGET else ""
                star = " (default)" if e["name"] == results["default_estimator"] else ""
                lines.append(f"| {logger} | {int(size):,} | {e['name']}{star} "
                             f"| {s['coverage_95']:.2f} | {s['coverage_95_normal']:.2f} "
                             f"| {s['median_relative_error']:.3f} "
                             f"| {s['bias']:+.3f} | {s['rmse']:.3f} | {flag} |")
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    sizes = results["log_sizes"]
    for e in results["estimators"]:
        u = e.get("uniform", {})
        xs = [s for s in sizes if u.get(str(s))]
        if not xs:
            continue
        lw = 2.5 if e["name"] == results["default_estimator"] else 1.2
        axes[0].plot(xs, [u[str(s)]["median_relative_error"] for s in xs], "o-", lw=lw,
                     label=e["name"])
        axes[1].plot(xs, [u[str(s)]["coverage_95"] for s in xs], "o-", lw=lw,
                     label=e["name"])
    for ax, title in ((axes[0], "median relative error (uniform logger)"),
                      (axes[1], "coverage of 95% intervals (uniform logger)")):
        ax.set_xscale("log")
        ax.set_xlabel("logged impressions")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    axes[1].axhline(0.95, color="grey", ls="--", lw=0.8)
    axes[1].axhline(COVERAGE_TARGET, color="red", ls=":", lw=0.8)
    axes[1].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="4 seeds, sizes 2000 and 10000")
    ap.add_argument("--seeds", default=None, help="evaluation seeds (default 0-19, quick 0-3)")
    ap.add_argument("--select-seeds", default=None,
                    help="seeds (>= 1000) that pick the default estimator (default "
                         "1000-1003, quick runs too)")
    ap.add_argument("--sizes", default=None, help="log sizes, comma-separated")
    ap.add_argument("--explore-size", type=int, default=None)
    ap.add_argument("--encoder", default="minilm")
    ap.add_argument("--jobs", type=int, default=2)
    args = ap.parse_args(argv)
    cfg = BenchConfig(encoder=args.encoder)
    if args.quick:
        cfg = dataclasses.replace(cfg, sizes=(2000, 10_000), explore_size=2000, chunks=5,
                                  pretrain_steps=150, bootstrap=100)
    if args.sizes:
        cfg = dataclasses.replace(cfg, sizes=tuple(int(s) for s in args.sizes.split(",")))
    if args.explore_size is not None:
        cfg = dataclasses.replace(cfg, explore_size=args.explore_size)
    seeds = parse_seeds(args.seeds or ("0-3" if args.quick else "0-19"))
    select = parse_seeds(args.select_seeds or "1000-1003")
    if any(s < 1000 for s in select):
        raise SystemExit("--select-seeds must be >= 1000 (never the evaluation seeds)")
    sizes = {"uniform": cfg.sizes,
             "explore": tuple(s for s in cfg.sizes if s <= cfg.explore_size)
             or (cfg.explore_size,)}
    t0 = time.perf_counter()
    sel_rows = run_seeds(select, cfg, {"uniform": cfg.sizes, "explore": ()}, args.jobs)
    default, sel_stats = pick_default(sel_rows, max(cfg.sizes))
    print(f"default estimator (selection seeds {list(select)}): {default}", flush=True)
    rows = run_seeds(seeds, cfg, sizes, args.jobs, default)
    estimators = []
    for name in SLATE_ESTIMATORS:
        e: dict[str, Any] = {"name": name}
        for logger in LOGGERS:
            e[logger] = {str(s): summarize(rows, logger, s, name) for s in sizes[logger]}
        for s in cfg.sizes:     # the top-level figures: the uniform logger
            e[str(s)] = {k: v for k, v in e["uniform"][str(s)].items() if k != "by_target"}
        estimators.append(e)
    boot = [r for r in rows if "bootstrap" in r and r["truth"] > 0]
    first = [r for r in rows if r["target"] == TARGETS[0] and r["logger_truth"] > 0]
    on_policy = [r["logger_on_policy"] / r["logger_truth"] for r in first]
    corrected = [r["logger_on_policy_corrected"] / r["logger_truth"] for r in first]
    diag = {}
    for logger in LOGGERS:
        for s in sizes[logger]:
            sel = [r for r in rows if r["logger"] == logger and r["size"] == s]
            if sel:
                diag[f"{logger}/{s}"] = {
                    t: {"ess": statistics.fmean(r["ess"] for r in sel if r["target"] == t),
                        "match_share": statistics.fmean(r["match_share"] for r in sel
                                                        if r["target"] == t),
                        "matched_paid": statistics.fmean(r["matched_paid"] for r in sel
                                                         if r["target"] == t)}
                    for t in TARGETS}
    results: dict[str, Any] = {
        "quick": bool(args.quick), "seeds": list(seeds), "selection_seeds": list(select),
        "log_sizes": list(cfg.sizes), "explore_log_sizes": list(sizes["explore"]),
        "targets": list(TARGETS), "loggers": list(LOGGERS), "config": dataclasses.asdict(cfg),
        "default_estimator": default, "selection": sel_stats, "estimators": estimators,
        "default_bootstrap_coverage_95": (float(np.mean(
            [r["bootstrap"][0] <= r["truth"] <= r["bootstrap"][1] for r in boot]))
            if boot else None),
        "default_bootstrap_n": len(boot),
        "logger_realized_over_expected": (statistics.fmean(on_policy) if on_policy else None),
        "logger_corrected_over_expected": (statistics.fmean(corrected) if corrected
                                           else None),
        "late_share": statistics.fmean(r["late_share"] for r in first) if first else None,
        "diagnostics": diag, "elapsed_s": round(time.perf_counter() - t0, 1),
        "rows": len(rows)}
    write_results("ope", results, DEPENDS)
    plot(results, ROOT / "docs" / "ope.png")
    scope = ("quick run: " if args.quick else "") + (
        f"{len(seeds)} seeds × {len(TARGETS)} targets, up to {cfg.chunks} chunks per size")
    body = (f"`bench/ope.py{' --quick' if args.quick else ''}` ({scope}; "
            f"the default estimator picked on seeds {list(select)}: **{default}**). "
            "Errors are relative to each target's true value per impression (the "
            "simulator's expected revenue of the target's slate in each logged context); "
            "coverage is the share of 95 % intervals holding it. docs/ope.md explains "
            "the estimators and what each assumes.\n\n" + table(results)
            + f"\n\nBootstrap (percentile, {cfg.bootstrap} resamples) coverage of the default "
            f"at the largest size: {results['default_bootstrap_coverage_95']}. "
            "The logger's realized revenue over its true expected revenue: "
            f"{results['logger_realized_over_expected']:.3f} (conversions after the "
            "attribution window never reach the joined log; a share "
            f"{results['late_share']:.3f} of the cpa conversions), "
            f"{results['logger_corrected_over_expected']:.3f} once cpa rewards are divided "
            "by one minus the late share the log's own conversions show, as every "
            "estimator here does.\n\n![ope](ope.png)")
    update_doc_section("Off-policy estimates vs ground truth", body)
    print(table(results))
    for e in results["estimators"]:
        for logger in LOGGERS:
            for size, s in e.get(logger, {}).items():
                if s and s["coverage_95"] < COVERAGE_TARGET:
                    print(f"warning: {e['name']} on the {logger} log at {size}: interval "
                          f"coverage {s['coverage_95']:.2f} < {COVERAGE_TARGET}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
