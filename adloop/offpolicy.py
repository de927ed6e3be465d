"""Off-policy evaluation of a snapshot on a recorded log (``adloop evaluate --offline``).

The log must carry the logging policy's propensity of each slate item
(``SlateItem.propensity``: the probability that the logging policy served that ad at
that position). The value of a policy is the sum of its slate items' rewards per
impression (the joiner's rewards: cpc bid per click, cpa bid per conversion, cpm
bid/1000). With, per logged item *j* of impression *i*, the logging propensity
``p_ij``, the target policy's probability ``π_ij`` of serving the same ad at the same
position, the weight ``w_ij = π_ij / p_ij`` and the reward ``r_ij``:

* **IPS** (item-position inverse propensity scoring):
  ``V = 1/n Σ_i Σ_j w_ij r_ij`` — unbiased when every ad the target serves at a position
  has a positive logging propensity there;
* **SNIPS** (self-normalised): ``V = (Σ w r / Σ w) · (Σ_i |slate_i|) / n`` — the weights
  rescaled to mean 1, biased but with far less variance;
* **DR** (doubly robust): ``V = 1/n Σ_i [Σ_j r̂(x_i, π_i(j)) + Σ_j w_ij (r_ij − r̂_ij)]``
  where ``r̂`` is a reward model (here the log's mean reward per ad, shrunk to the
  overall mean: :func:`reward_model`) and ``π_i(j)`` the target's ad at position j;
* the **logging policy's on-policy value** ``1/n Σ_i Σ_j r_ij``.

Intervals are percentile bootstrap intervals over impressions (:func:`bootstrap`). A
deterministic target (the snapshot's beam search) has ``π_ij`` 1 or 0, for the slate
it serves in impression *i*'s context with as many positions as the logged slate.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from streams.logs import get_logger
from streams.schemas import Feedback, ModelUpdate
from streams.settings import add_settings_arguments, settings_from_args

log = get_logger(__name__)


# -- the estimators (per-impression aggregates; numpy only) ------------------------------


@dataclass(frozen=True)
class LoggedItems:
    """Flat arrays over the logged slate items of ``n`` impressions."""

    impression: np.ndarray
    """[N] int: the impression (0..n-1) each item belongs to."""
    propensity: np.ndarray
    """[N] logging propensity p_ij in (0, 1]."""
    target: np.ndarray
    """[N] target probability π_ij of the same ad at the same position."""
    reward: np.ndarray
    """[N] realized reward r_ij."""
    predicted: np.ndarray
    """[N] reward model r̂ of the logged item (DR)."""
    direct: np.ndarray
    """[n] Σ_j r̂ of the target's slate of each impression (DR's direct term)."""

    @property
    def n(self) -> int:
        return len(self.direct)

    def per_impression(self) -> dict[str, np.ndarray]:
        """Sums per impression that every estimator is a function of."""
        w = self.target / self.propensity
        n = self.n

        def total(x: np.ndarray) -> np.ndarray:
            return np.bincount(self.impression, weights=x, minlength=n).astype(np.float64)

        return {"wr": total(w * self.reward), "w": total(w),
                "k": total(np.ones_like(w)), "r": total(self.reward),
                "dr": self.direct + total(w * (self.reward - self.predicted))}


def ips(agg: dict[str, np.ndarray]) -> float:
    return float(agg["wr"].mean())


def snips(agg: dict[str, np.ndarray]) -> float:
    w = agg["w"].sum()
    if w <= 0:
        return 0.0
    return float(agg["wr"].sum() / w * agg["k"].sum() / len(agg["wr"]))


def doubly_robust(agg: dict[str, np.ndarray]) -> float:
    return float(agg["dr"].mean())


def on_policy(agg: dict[str, np.ndarray]) -> float:
    return float(agg["r"].mean())


ESTIMATORS: dict[str, Callable[[dict[str, np.ndarray]], float]] = {
    "ips": ips, "snips": snips, "dr": doubly_robust, "logging_on_policy": on_policy}


def bootstrap(agg: dict[str, np.ndarray], estimator: Callable[[dict[str, np.ndarray]], float],
              samples: int = 200, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile interval of ``estimator`` over impressions resampled with replacement."""
    n = len(agg["wr"])
    if n == 0 or samples <= 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    values = np.empty(samples)
    for b in range(samples):
        idx = rng.integers(0, n, n)
        values[b] = estimator({k: v[idx] for k, v in agg.items()})
    lo, hi = np.quantile(values, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def estimate(items: LoggedItems, samples: int = 200, level: float = 0.95,
             seed: int = 0) -> dict[str, dict[str, float]]:
    """Every estimator with its bootstrap interval: ``{name: {value, low, high}}``."""
    agg = items.per_impression()
    out: dict[str, dict[str, float]] = {}
    for name, f in ESTIMATORS.items():
        lo, hi = bootstrap(agg, f, samples, level, seed)
        out[name] = {"value": f(agg), "low": lo, "high": hi}
    return out


def reward_model(finals: Sequence[Feedback], prior_weight: float = 5.0) -> dict[str, float]:
    """The log's mean reward per ad, shrunk toward the overall mean item reward with
    ``prior_weight`` pseudo-observations (DR's r̂; ads never logged get the mean)."""
    total: dict[str, float] = {}
    count: dict[str, int] = {}
    for f in finals:
        for it in f.items:
            total[it.ad_id] = total.get(it.ad_id, 0.0) + it.reward
            count[it.ad_id] = count.get(it.ad_id, 0) + 1
    n = sum(count.values())
    mean = sum(total.values()) / n if n else 0.0
    model = {a: (total[a] + prior_weight * mean) / (count[a] + prior_weight) for a in total}
    model[""] = mean
    return model


def logged_items(finals: Sequence[Feedback], target_slates: Sequence[Sequence[str]],
                 rhat: dict[str, float]) -> LoggedItems:
    """The arrays for final lists whose items all carry a propensity and the target's
    slate for each (ad ids by position)."""
    imp, p, pi, r, pred = [], [], [], [], []
    direct = np.zeros(len(finals))
    mean = rhat.get("", 0.0)
    for i, (f, slate) in enumerate(zip(finals, target_slates, strict=True)):
        for it in f.items:
            if it.propensity is None:
                raise ValueError(f"request {f.request_id}: item {it.ad_id} has no logging "
                                 "propensity (slate[].propensity in the recorded log)")
            imp.append(i)
            p.append(it.propensity)
            pos = it.position
            pi.append(1.0 if pos < len(slate) and slate[pos] == it.ad_id else 0.0)
            r.append(it.reward)
            pred.append(rhat.get(it.ad_id, mean))
        direct[i] = sum(rhat.get(a, mean) for a in slate[:len(f.items)])
    return LoggedItems(np.asarray(imp, np.int64), np.asarray(p), np.asarray(pi),
                       np.asarray(r), np.asarray(pred), direct)


# -- the snapshot as a target policy ---------------------------------------------------


def snapshot_slates(snapshot_dir: Path, finals: Sequence[Feedback], ads: Sequence[Any],
                    beam_width: int = 32, batch: int = 64) -> list[list[str]]:
    """The slate the snapshot serves (the server's engine, ONNX Runtime on CPU) in each
    final list's context, as long as the logged slate."""
    from server.catalog import AdCatalog
    from server.models import ModelManager
    from server.runtime import resolve_provider

    raw = (snapshot_dir / "manifest.json").read_bytes()
    catalog = AdCatalog()
    catalog.apply((a.ad_id, a) for a in ads)
    with tempfile.TemporaryDirectory(prefix="adloop-ope-") as cache:
        return _serve_all(ModelManager(catalog, resolve_provider("cpu"), Path(cache), 1, 1),
                          catalog, raw, snapshot_dir, finals, beam_width, batch)


def _serve_all(mgr: Any, catalog: Any, raw: bytes, snapshot_dir: Path,
               finals: Sequence[Feedback], beam_width: int, batch: int) -> list[list[str]]:
    from server.engine import Engine, RecRequest
    from snapshot_format import parse_manifest, sha256_hex

    man = parse_manifest(raw)
    update = ModelUpdate(model_name=man.model_name, version=man.version, parent=man.parent,
                         sha256=sha256_hex(raw), uri=snapshot_dir.resolve().as_uri(),
                         id_space_version=man.id_space_version,
                         data_watermark=float(man.raw.get("data_watermark", 0.0)),
                         created_time=time.time())
    result = mgr.apply_update(update)
    if result != "ok":
        raise SystemExit(f"adloop evaluate --offline: snapshot {snapshot_dir} did not load "
                         f"(failed step: {result})")
    engine = Engine(mgr, catalog)
    out: list[list[str]] = []
    for start in range(0, len(finals), batch):
        chunk = finals[start:start + batch]
        reqs = [RecRequest(f.user_id, dict(f.context), list(f.recent_ad_ids),
                           max(1, len(f.items)), list(f.recent_organic)) for f in chunk]
        for res in engine.run(reqs, lambda levels, k: [beam_width] * levels):
            out.append([a.ad_id for a in res.ads])
    return out


# -- the command -------------------------------------------------------------------------


class OffPolicySettings(BaseSettings):
    """``adloop evaluate --offline`` settings (env ``ADLOOP_OPE_*``)."""

    model_config = SettingsConfigDict(env_prefix="ADLOOP_OPE_", extra="ignore")

    from_file: Path | None = Field(None, description="recorded log with propensities "
                                   "(--offline)")
    bootstrap_samples: int = Field(200, description="bootstrap resamples of the intervals")
    interval: float = Field(0.95, description="coverage of the bootstrap intervals")
    ope_seed: int = Field(0, description="seed of the bootstrap")
    attribution_window_s: float = Field(3600.0, description="join: attribution window")


def evaluate_offline(log_file: Path, snapshot_dir: Path, s: OffPolicySettings,
                     beam_width: int = 32) -> dict[str, Any]:
    from adloop.importer import join_recorded
    from streams.joiner_core import JoinSettings
    from traffic.recorded import read_recorded

    joined = join_recorded(read_recorded(log_file, "stop"),
                           JoinSettings(attribution_window_s=s.attribution_window_s,
                                        metrics_port=0))
    finals = [f for f in joined.finals() if f.items]
    if not finals:
        raise SystemExit(f"adloop evaluate --offline: {log_file} has no joined impression")
    slates = snapshot_slates(snapshot_dir, finals, joined.ads, beam_width)
    items = logged_items(finals, slates, reward_model(finals))
    result = estimate(items, s.bootstrap_samples, s.interval, s.ope_seed)
    matched = int((items.target > 0).sum())
    summary = {"from": str(log_file), "snapshot": str(snapshot_dir),
               "impressions": items.n, "logged_items": len(items.reward),
               "matched_items": matched, "value_per_impression": result,
               "interval": s.interval, "bootstrap_samples": s.bootstrap_samples}
    if matched < 30:
        log.warning("ope.few_matches", matched_items=matched,
                    note="the snapshot rarely serves what the log shows: intervals are wide")
    return summary


def configure(parser: argparse.ArgumentParser) -> None:
    from learner.evaluate import configure as configure_online

    configure_online(parser)
    group = parser.add_argument_group("off-policy evaluation on a recorded log")
    group.add_argument("--offline", action="store_true",
                       help="estimate --snapshot's value per impression on --from FILE "
                            "(IPS, SNIPS, DR, with bootstrap intervals)")
    group.add_argument("--from", dest="from_file", type=Path, default=None,
                       help="same as --from-file")
    add_settings_arguments(parser, OffPolicySettings)


def run(args: argparse.Namespace) -> int:
    if not getattr(args, "offline", False):
        from learner.evaluate import run as run_online

        return run_online(args)
    s = settings_from_args(OffPolicySettings, args)
    snapshot = getattr(args, "snapshot", None)
    if s.from_file is None or snapshot is None:
        raise SystemExit("adloop evaluate --offline needs --from FILE and --snapshot DIR")
    summary = evaluate_offline(s.from_file, Path(snapshot), s,
                               getattr(args, "beam_width", None) or 32)
    print(json.dumps(summary, default=str))
    return 0
