"""Off-policy estimators of a target policy's value on a log with propensities.

Pure math over arrays (numpy only): ``adloop evaluate --offline`` scores a snapshot
with them on a recorded log, and the learner's promotion guard
(``--guard-estimate``, :mod:`learner.guard`) scores each model it compares on the
held-out lists that carry logging propensities.

The log must carry the logging policy's propensity of each slate item
(``FeedbackItem.propensity``: the probability that the logging policy served that ad
at that position). The value of a policy is the sum of its slate items' rewards per
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

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from streams.schemas import Feedback


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


def has_propensities(fb: Feedback) -> bool:
    """``fb`` has items and every one carries its logging propensity."""
    return bool(fb.items) and all(it.propensity is not None for it in fb.items)
