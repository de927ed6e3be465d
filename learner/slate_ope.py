"""Slate-aware off-policy estimators, their intervals and a cross-fitted reward model.

Pure math over arrays (numpy, scipy's sparse matrices). :mod:`learner.ope` holds the
per-item estimators the promotion guard uses; this module adds the slate-level ones,
self-normalised variants, a doubly robust estimator with a reward model learned from the
log, diagnostics (effective sample size, match share) and intervals from the estimators'
influence functions. ``adloop evaluate --offline`` and ``bench/ope.py`` (which measures
every estimator against the simulator's ground truth) use it; docs/ope.md names the
assumption behind each estimator.

A log of ``n`` impressions is a :class:`SlateLog`: per impression *i* and slot *j* (at
most ``K`` slots, ``mask``) the logged ad's reward ``r_ij``, its logging propensity
``p_ij`` (the probability that the logging policy put that ad at that slot), the target
policy's probability ``π_ij`` of the same ad at the same slot, a reward model's
prediction ``r̂_ij`` for it, and per impression the model's value of the target's slate
``D_i = Σ_j r̂(x_i, π_i(j), j)``. With ``w_ij = π_ij / p_ij`` and ``R_i = Σ_j r_ij``:

* ``ips`` (item-position IPS): ``1/n Σ_i Σ_j w_ij r_ij``. Needs: the reward of a slot
  depends on its ad and position only (not on the other slots), and every (ad, slot) the
  target serves has ``p_ij > 0``.
* ``snips``: per slot self-normalised, ``Σ_j (Σ_i w_ij r_ij / Σ_i w_ij)``: consistent
  under the same assumptions, biased at small n, far less variance.
* ``pi`` (pseudo-inverse, Swaminathan et al. 2017): ``1/n Σ_i g_i R_i`` with the slate
  weight ``g_i = q_π(x_i)ᵀ Γ(x_i)^† 1_{s_i}``. Needs only the slate reward ``R_i``
  and that its expectation is additive over (slot, ad) pairs. For a logger that draws
  ``K`` of ``m`` ads uniformly without replacement and a deterministic target, ``g =
  a·M + b·X − c`` with ``M`` the slots where the logged ad is the target's, ``X`` the
  target's ads logged at another slot, ``a = (m−1)(m−K+1)/(m−K)``, ``b = (m−1)/(m−K)``,
  ``c = (K−1)m/(m−K)`` (:func:`pi_weights_uniform`); for a logger whose slots are drawn
  independently (the server's exploring policy: ranked head, a random last slot)
  ``g = Σ_j w_ij − (K − 1)``.
* ``snpi``: ``Σ g R / Σ g``.
* ``dm`` (direct method): ``1/n Σ_i D_i``: as good as the reward model.
* ``dr`` (doubly robust, item level): ``1/n Σ_i [D_i + Σ_j w_ij (r_ij − r̂_ij)]``:
  unbiased when ``ips`` is, whatever the model; a good model lowers the variance.
* ``sndr``: ``1/n Σ_i D_i + Σ_j (Σ_i w_ij (r_ij − r̂_ij) / Σ_i w_ij)``.
* ``dr_pi`` (slate-level DR): ``1/n Σ_i [D_i + g_i (R_i − Σ_j r̂_ij)]``: ``pi``'s
  assumptions, with the model as control variate.

Every estimator is a smooth function of per-impression means, so its standard error comes
from its influence function ``ψ_i`` (:func:`estimate`: ``value ± z·sd(ψ)/√n``, the delta
method for the self-normalised ratios); :func:`bootstrap_interval` resamples impressions.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

SLATE_ESTIMATORS: tuple[str, ...] = ("ips", "snips", "pi", "snpi", "dm", "dr", "sndr",
                                     "dr_pi")
"""Every estimator of :func:`estimate`, in report order."""


@dataclass(frozen=True)
class SlateLog:
    """Padded arrays over ``n`` logged impressions of at most ``K`` slots."""

    reward: np.ndarray
    """[n, K] realized reward of the logged ad of each slot (0 where ``mask`` is off)."""
    propensity: np.ndarray
    """[n, K] logging propensity p_ij in (0, 1] (1 where ``mask`` is off)."""
    target: np.ndarray
    """[n, K] π_ij: the target's probability of the logged ad at that slot."""
    mask: np.ndarray
    """[n, K] bool: the slot was served."""
    predicted: np.ndarray
    """[n, K] reward model r̂ of the logged ad at its slot."""
    direct: np.ndarray
    """[n] Σ_j r̂ of the target's slate (the reward model's value of the target)."""
    candidates: np.ndarray | None = None
    """[n] m_i: the logger drew its slate uniformly without replacement from m_i ads
    (exact pseudo-inverse weights); None: slots drawn independently (factored form)."""
    cross: np.ndarray | None = None
    """[n] X_i: the target's ads logged at another slot (uniform logger only)."""
    unit: np.ndarray | None = None
    """[n, K] what each logged item pays when it pays (the bid per click or conversion,
    a cpm ad's bid / 1000 on every impression): its reward is 0 or this. None: unknown
    (intervals from the sample variance only)."""

    @property
    def n(self) -> int:
        return int(self.reward.shape[0])

    @property
    def weight(self) -> np.ndarray:
        """[n, K] w_ij = π_ij / p_ij (0 where ``mask`` is off)."""
        return np.where(self.mask, self.target / np.where(self.mask, self.propensity, 1.0),
                        0.0)

    def subset(self, idx: np.ndarray) -> SlateLog:
        """The impressions ``idx`` (a bootstrap resample or a subsample)."""
        opt = (None if self.candidates is None else self.candidates[idx])
        return SlateLog(self.reward[idx], self.propensity[idx], self.target[idx],
                        self.mask[idx], self.predicted[idx], self.direct[idx], opt,
                        None if self.cross is None else self.cross[idx],
                        None if self.unit is None else self.unit[idx])


def pi_weights_uniform(m: np.ndarray, k: np.ndarray, matches: np.ndarray,
                       cross: np.ndarray) -> np.ndarray:
    """Pseudo-inverse slate weights for a logger drawing ``k`` of ``m`` ads uniformly
    without replacement and a deterministic target: ``a·M + b·X − c`` (module doc);
    ``m == k`` (every ad shown, only the order random) is treated as ``m = k + 1``."""
    m = np.maximum(np.asarray(m, float), np.asarray(k, float) + 1.0)
    k = np.asarray(k, float)
    a = (m - 1.0) * (m - k + 1.0) / (m - k)
    b = (m - 1.0) / (m - k)
    c = (k - 1.0) * m / (m - k)
    return np.asarray(a * matches + b * cross - c)


def slate_weights(log: SlateLog) -> np.ndarray:
    """[n] the pseudo-inverse weight g_i of each impression (see the module doc)."""
    w = log.weight
    k = log.mask.sum(axis=1).astype(float)
    if log.candidates is not None and log.cross is not None:
        matches = (w > 0).sum(axis=1).astype(float)
        return pi_weights_uniform(log.candidates, k, matches, log.cross)
    return np.asarray(w.sum(axis=1) - (k - 1.0))


def _ratio(num: np.ndarray, den: np.ndarray) -> tuple[float, np.ndarray]:
    """Σ num / Σ den and its influence function (delta method); 0 when Σ den is 0."""
    d = float(den.mean())
    if d <= 0:
        return 0.0, np.zeros_like(num)
    v = float(num.mean()) / d
    return v, (num - v * den) / d


def _per_slot_ratio(num: np.ndarray, den: np.ndarray) -> tuple[float, np.ndarray]:
    """Σ_j (Σ_i num_ij / Σ_i den_ij) and its influence function."""
    total, psi = 0.0, np.zeros(num.shape[0])
    for j in range(num.shape[1]):
        v, p = _ratio(num[:, j], den[:, j])
        total += v
        psi = psi + p
    return total, psi


def influence(log: SlateLog, name: str) -> tuple[float, np.ndarray]:
    """``(value, ψ)`` of estimator ``name``: ψ_i the influence of impression i (its mean
    is 0 up to rounding for ratios; value + mean(ψ) for linear ones)."""
    w, r, rhat = log.weight, np.where(log.mask, log.reward, 0.0), np.where(
        log.mask, log.predicted, 0.0)
    if name == "ips":
        a = (w * r).sum(axis=1)
        return float(a.mean()), a
    if name == "snips":
        return _per_slot_ratio(w * r, w)
    if name == "dm":
        return float(log.direct.mean()), log.direct
    if name == "dr":
        a = log.direct + (w * (r - rhat)).sum(axis=1)
        return float(a.mean()), a
    if name == "sndr":
        v, psi = _per_slot_ratio(w * (r - rhat), w)
        return float(log.direct.mean()) + v, log.direct + psi
    g = slate_weights(log)
    big_r = r.sum(axis=1)
    if name == "pi":
        a = g * big_r
        return float(a.mean()), a
    if name == "snpi":
        return _ratio(g * big_r, g)
    if name == "dr_pi":
        a = log.direct + g * (big_r - rhat.sum(axis=1))
        return float(a.mean()), a
    raise ValueError(f"unknown estimator {name!r}; known: {SLATE_ESTIMATORS}")


def value(log: SlateLog, name: str) -> float:
    return influence(log, name)[0]


def two_sided_z(level: float) -> float:
    """The normal quantile of a two-sided interval at ``level`` (1.96 at 0.95)."""
    return NormalDist().inv_cdf(0.5 + level / 2.0)


def normal_interval(v: float, psi: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """``v ± z·sd(ψ)/√n`` (z the two-sided normal quantile of ``level``)."""
    n = len(psi)
    if n < 2:
        return (math.nan, math.nan)
    half = two_sided_z(level) * float(np.std(psi, ddof=1)) / math.sqrt(n)
    return v - half, v + half


SCORE_ESTIMATORS: tuple[str, ...] = ("ips", "snips", "dr", "sndr")
"""The per-item weighting estimators :func:`score_interval` covers."""


def pay_unit(bid_type: str, bid: float) -> float:
    """What an impression of an ad pays when it pays: the bid per click (cpc) or per
    conversion (cpa); a cpm ad's bid / 1000, paid on every impression."""
    return float(bid) / 1000.0 if bid_type == "cpm" else float(bid)


def second_moment_scale(log: SlateLog) -> float:
    """κ with ``E[T²] ≈ κ·V`` for the per-item IPS term ``T_i = Σ_j w_ij r_ij`` of a log
    whose rewards are 0 or the item's pay unit ``u`` (so ``r² = u·r``): ``E[T²] = Σ_j
    E[w_ij² u_ij r̄_ij]`` with ``r̄`` the expected reward, estimated as ``Σ w² u r̂ / Σ w r̂``
    over the logged items with the reward model ``r̂`` standing in for ``r̄``. The model
    only weighs the matched items against each other, so κ does not collapse when a small
    log happens to hold none of the target's rare conversions. An item that paid counts
    at what it paid (a bid revised since). NaN when the pay units are unknown or nothing
    matches."""
    if log.unit is None:
        return math.nan
    w, m = log.weight, log.mask & (log.weight > 0)
    if not m.any():
        return math.nan
    r = log.reward[m]
    u = np.where(r > 0, r, log.unit[m])
    rhat = np.clip(log.predicted[m], 0.0, None)
    wm = w[m]
    den = float((wm * rhat).sum())
    if den <= 0:                          # no usable model: weigh the items alike
        rhat, den = np.ones_like(wm), float(wm.sum())
    return float((wm * wm * u * rhat).sum()) / den


def score_interval(v: float, kappa: float, n: int,
                   level: float = 0.95) -> tuple[float, float] | None:
    """The values ``V`` with ``(v − V)² ≤ z²·(κ·V − V²)/n``: a score (Wilson-type)
    interval for a mean of per-impression terms whose variance is ``κ·V − V²`` (see
    :func:`second_moment_scale`). Its width follows the hypothesised value, not the sample
    variance, so it still holds the truth when the log is short of the rare large rewards
    (the sample variance is then small exactly when the estimate is low). None when
    undefined (κ unknown, a negative estimate)."""
    if not (math.isfinite(kappa) and kappa > 0 and n > 0 and math.isfinite(v)) or v < 0:
        return None
    c = two_sided_z(level) ** 2 / n
    b = 2.0 * v + c * kappa
    disc = b * b - 4.0 * (1.0 + c) * v * v
    if disc < 0:
        return None
    root = math.sqrt(disc)
    return (b - root) / (2.0 * (1.0 + c)), (b + root) / (2.0 * (1.0 + c))


def interval(log: SlateLog, name: str, v: float, psi: np.ndarray,
             level: float = 0.95, kappa: float | None = None) -> tuple[float, float]:
    """The interval adloop reports for estimator ``name``: for the per-item weighting
    estimators on a log with pay units, the hull of the score interval and the normal
    one; otherwise the normal (influence-function) interval. ``kappa``: the log's
    :func:`second_moment_scale`, computed here when not given."""
    lo, hi = normal_interval(v, psi, level)
    if name in SCORE_ESTIMATORS:
        k = second_moment_scale(log) if kappa is None else kappa
        score = score_interval(v, k, log.n, level)
        if score is not None:
            return min(lo, score[0]), max(hi, score[1])
    return lo, hi


def bootstrap_interval(log: SlateLog, name: str, samples: int = 200, level: float = 0.95,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile interval of ``name`` over impressions resampled with replacement."""
    n = log.n
    if n == 0 or samples <= 0:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    values = np.array([value(log.subset(rng.integers(0, n, n)), name)
                       for _ in range(samples)])
    lo, hi = np.quantile(values, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def effective_sample_size(log: SlateLog) -> float:
    """Kish's effective sample size of the item weights, averaged over slots:
    ``mean_j (Σ_i w_ij)² / Σ_i w_ij²`` (impressions' worth of on-policy data; 0 when the
    target matches nothing)."""
    w = log.weight
    out = []
    for j in range(w.shape[1]):
        s2 = float((w[:, j] ** 2).sum())
        out.append(float(w[:, j].sum()) ** 2 / s2 if s2 > 0 else 0.0)
    return float(np.mean(out)) if out else 0.0


def match_share(log: SlateLog) -> tuple[float, float]:
    """(share of logged items the target serves at the same slot, share of impressions
    with at least one such item)."""
    hit = (log.target > 0) & log.mask
    items = int(log.mask.sum())
    return (float(hit.sum()) / items if items else 0.0,
            float(hit.any(axis=1).mean()) if log.n else 0.0)


def max_weight_share(log: SlateLog) -> float:
    """The largest single item weight's share of the total weight (0 without weight):
    near 1, one item decides the estimate."""
    w = log.weight
    total = float(w.sum())
    return float(w.max()) / total if total > 0 else 0.0


def estimate(log: SlateLog, names: Sequence[str] = SLATE_ESTIMATORS,
             level: float = 0.95) -> dict[str, dict[str, float]]:
    """``{name: {value, low, high, se}}`` with the intervals of :func:`interval`."""
    out: dict[str, dict[str, float]] = {}
    kappa = (second_moment_scale(log) if any(n in SCORE_ESTIMATORS for n in names)
             else math.nan)
    for name in names:
        v, psi = influence(log, name)
        lo, hi = interval(log, name, v, psi, level, kappa)
        se = float(np.std(psi, ddof=1)) / math.sqrt(len(psi)) if len(psi) > 1 else math.nan
        out[name] = {"value": v, "low": lo, "high": hi, "se": se}
    return out


# -- the reward model ----------------------------------------------------------------------


@dataclass(frozen=True)
class ItemCodes:
    """Integer codes of items (logged or the target's) for :class:`RidgeRewardModel`."""

    impression: np.ndarray
    """[N] the impression (row of the context codes) of each item."""
    ad: np.ndarray
    """[N] ad code (row of the ad attribute codes)."""
    position: np.ndarray
    """[N] slot, 0 first."""


class RidgeRewardModel:
    """Reward ``r̂(x, a, j) = θ_j · (β_ad + Σ_{c, b} β[c = x_c, b = a_b])``: a per-ad term
    plus every (context key value × ad attribute value) pair, times a per-slot
    examination factor θ_j (the position-based click model; θ_j is the mean reward at
    slot j over slot 0's). β is fitted by ridge regression on ``r / θ_j``.

    ``ctx`` [n, C] are the impressions' context codes (each column its own vocabulary,
    code < ``ctx_sizes[c]``), ``attrs`` [A, B] the ads' attribute codes (industry,
    category, bid type, ...; code < ``attr_sizes[b]``)."""

    def __init__(self, ctx_sizes: Sequence[int], attr_sizes: Sequence[int], n_ads: int,
                 l2: float = 10.0) -> None:
        self.ctx_sizes, self.attr_sizes = list(ctx_sizes), list(attr_sizes)
        self.n_ads, self.l2 = n_ads, l2
        offsets = [n_ads]
        for cs in self.ctx_sizes:
            for bs in self.attr_sizes:
                offsets.append(offsets[-1] + cs * bs)
        self.offsets = offsets
        self.dim = offsets[-1] + 1                  # + intercept
        self.beta = np.zeros(self.dim)
        self.theta = np.ones(1)

    def _design(self, ctx: np.ndarray, attrs: np.ndarray, items: ItemCodes) -> object:
        from scipy import sparse

        n = len(items.ad)
        cols = [items.ad]
        k = 0
        for c in range(len(self.ctx_sizes)):
            xc = ctx[items.impression, c]
            for b, bs in enumerate(self.attr_sizes):
                cols.append(self.offsets[k] + xc * bs + attrs[items.ad, b])
                k += 1
        cols.append(np.full(n, self.dim - 1))
        col = np.stack(cols, axis=1).ravel()
        row = np.repeat(np.arange(n), len(cols))
        return sparse.csr_matrix((np.ones(len(col)), (row, col)), shape=(n, self.dim))

    def _theta(self, position: np.ndarray) -> np.ndarray:
        pos = np.minimum(position, len(self.theta) - 1)
        return np.asarray(self.theta[pos])

    def fit(self, ctx: np.ndarray, attrs: np.ndarray, items: ItemCodes,
            reward: np.ndarray) -> RidgeRewardModel:
        k = int(items.position.max()) + 1 if len(items.position) else 1
        means = np.array([reward[items.position == j].mean()
                          if (items.position == j).any() else 0.0 for j in range(k)])
        self.theta = (np.clip(means / means[0], 0.05, 20.0) if means[0] > 0
                      else np.ones(k))
        x = self._design(ctx, attrs, items)
        y = reward / self._theta(items.position)
        xtx = (x.T @ x).toarray()                               # type: ignore[attr-defined]
        xtx[np.diag_indices_from(xtx)] += self.l2
        xtx[-1, -1] += 1e-6 - self.l2                           # no penalty on the intercept
        self.beta = np.linalg.solve(xtx, x.T @ y)              # type: ignore[attr-defined]
        return self

    def predict(self, ctx: np.ndarray, attrs: np.ndarray, items: ItemCodes) -> np.ndarray:
        x = self._design(ctx, attrs, items)
        return np.asarray(x @ self.beta) * self._theta(items.position)  # type: ignore[operator]


def cross_fit(ctx: np.ndarray, attrs: np.ndarray, logged: ItemCodes, reward: np.ndarray,
              queries: Sequence[ItemCodes], n_impressions: int, folds: int = 2,
              seed: int = 0,
              make: Callable[[], RidgeRewardModel] | None = None) -> list[np.ndarray]:
    """Cross-fitted predictions: the impressions are split into ``folds`` at random; the
    items of each (``logged`` first, then each of ``queries``) are predicted by the model
    fitted on the other folds' logged items (with one fold: in-sample)."""
    assert make is not None, "cross_fit needs a model factory"
    fold = np.random.default_rng(seed).integers(0, folds, n_impressions)
    outs = [np.zeros(len(logged.ad))] + [np.zeros(len(q.ad)) for q in queries]
    for f in range(folds):
        train = fold[logged.impression] != f if folds > 1 else np.ones(len(logged.ad), bool)
        sub = ItemCodes(logged.impression[train], logged.ad[train], logged.position[train])
        model = make().fit(ctx, attrs, sub, reward[train])
        for out, q in zip(outs, [logged, *queries], strict=True):
            sel = fold[q.impression] == f
            if sel.any():
                out[sel] = model.predict(ctx, attrs, ItemCodes(
                    q.impression[sel], q.ad[sel], q.position[sel]))
    return outs
