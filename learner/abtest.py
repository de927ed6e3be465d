"""An always-valid test of online vs control on mean realized revenue per request.

The live A/B split serves a stable share of users (the control bucket) with a pinned
control model and everyone else (the online bucket) with the learner's latest version.
Each final feedback record is one request with its realized revenue (the sum of its
items' rewards). This module compares the two buckets' mean revenue per request while
the data arrive, so the comparison can be looked at after every record and acted on
the moment it is conclusive, without inflating the error rate.

The method: the mixture sequential probability ratio test (mSPRT) with a normal mixing
distribution over the effect, as in

* R. Johari, P. Koomen, L. Pekelis, D. Walsh, "Peeking at A/B tests: why it matters,
  and what to do about it", KDD 2017, and R. Johari, L. Pekelis, D. Walsh, "Always
  valid inference: continuous monitoring of A/B tests", Operations Research 70(3),
  2022 (the test A/B platforms run on two-sample means);

with the variance estimated from the data and the mixing scale chosen as in

* I. Waudby-Smith, D. Arnold, J. Wu, A. Ramdas, "Time-uniform central limit theory and
  asymptotic confidence sequences", Annals of Statistics 2024 (arXiv:2103.06476): the
  same normal-mixture boundary with a plug-in variance is an *asymptotic confidence
  sequence* (their Theorem 2.2), and ``rho`` tuned to be tightest at a target sample
  size (their Section 3.3).

With ``D`` the difference of the two buckets' mean revenue per request (online minus
control), ``V = s_on^2 / n_on + s_ctl^2 / n_ctl`` its estimated variance and
``tau^2 = rho^2 * s^2`` the mixture variance (``s^2`` the pooled per-request variance),
the mixture likelihood ratio against "no difference" is
``sqrt(V / (V + tau^2)) * exp(tau^2 D^2 / (2 V (V + tau^2)))``, and the set of
differences it does not reject at level ``alpha`` is the always-valid interval

    D +- sqrt( V (V + tau^2) / tau^2 * log((V + tau^2) / (V alpha^2)) ).

All intervals hold simultaneously over time with probability about ``1 - alpha``
(asymptotically: the per-request revenue needs a finite variance and the variance
estimate must have settled, which is what the minimum sample per bucket is for). The
test decides ``online_worse`` when the whole interval is below 0 and ``online_better``
when it is above 0, only once both buckets hold ``min_requests``; stopping at the first
such moment keeps the type-I error at most ``alpha`` however often it is looked at.

:func:`first_decisions` runs the same boundary over whole simulated experiments at
once (numpy), and :func:`ads_like_revenue` draws the zero-inflated, heavy-tailed
revenue of ad requests that the error rates in docs/abtest.md were measured on
(``bench/abtest.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

Decision = Literal["continue", "online_worse", "online_better"]
DECISIONS: tuple[Decision, ...] = ("continue", "online_worse", "online_better")


def mixture_rho(alpha: float, target_requests: float) -> float:
    """The mixing scale (in standard deviations of one request's revenue) that makes the
    boundary tightest when each bucket holds ``target_requests`` requests
    (Waudby-Smith et al. 2024, Section 3.3, with the effective sample size of a
    two-sample difference with equal buckets, ``n / 2``)."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if target_requests <= 0:
        raise ValueError(f"target_requests must be > 0, got {target_requests}")
    t_star = target_requests / 2.0
    la = -2.0 * math.log(alpha)
    return math.sqrt((la + math.log(la + 1.0)) / t_star)


def half_width(var_diff: Any, tau2: Any, alpha: float) -> Any:
    """Half-width of the always-valid interval for a difference with estimated
    variance ``var_diff`` and mixture variance ``tau2`` (floats or numpy arrays;
    ``inf`` where ``var_diff`` or ``tau2`` is not positive)."""
    v = np.asarray(var_diff, dtype=float)
    t = np.asarray(tau2, dtype=float)
    ok = (v > 0) & (t > 0)
    vs = np.where(ok, v, 1.0)
    ts = np.where(ok, t, 1.0)
    w = np.sqrt(vs * (vs + ts) / ts * np.log((vs + ts) / (vs * alpha * alpha)))
    out = np.where(ok, w, np.inf)
    return float(out) if out.ndim == 0 else out


@dataclass
class Moments:
    """Count, mean and sum of squared deviations of a stream (Welford's update)."""

    n: int = 0
    mean: float = 0.0
    m2: float = 0.0

    def add(self, x: float) -> None:
        self.n += 1
        d = x - self.mean
        self.mean += d / self.n
        self.m2 += d * (x - self.mean)

    @property
    def var(self) -> float:
        """Sample variance (n - 1 in the denominator; 0 below two values)."""
        return self.m2 / (self.n - 1) if self.n > 1 else 0.0

    def to_json(self) -> list[float]:
        return [self.n, self.mean, self.m2]

    @classmethod
    def from_json(cls, v: list[float]) -> Moments:
        return cls(int(v[0]), float(v[1]), float(v[2]))


@dataclass(frozen=True)
class TestResult:
    """Where a :class:`RevenueTest` stands. Money is per request (``diff``, bounds);
    ``rpm_*`` are the same per mille requests."""

    n_online: int
    n_control: int
    mean_online: float
    mean_control: float
    diff: float
    lower: float
    upper: float
    decision: Decision
    alpha: float

    @property
    def relative(self) -> float:
        """``diff`` as a share of the control mean (nan without control revenue)."""
        return self.diff / self.mean_control if self.mean_control > 0 else math.nan

    def evidence(self) -> dict[str, Any]:
        """What a decision log line carries (RPM: revenue per 1000 requests)."""
        def r(x: float) -> float | None:
            return round(1000.0 * x, 6) if math.isfinite(x) else None
        return {"decision": self.decision, "alpha": self.alpha,
                "n_online": self.n_online, "n_control": self.n_control,
                "rpm_online": r(self.mean_online), "rpm_control": r(self.mean_control),
                "rpm_diff": r(self.diff), "rpm_diff_lower": r(self.lower),
                "rpm_diff_upper": r(self.upper),
                "relative_diff": round(self.relative, 6) if math.isfinite(self.relative)
                else None}


@dataclass
class RevenueTest:
    """The streaming test: :meth:`add` one request's revenue to its bucket, read
    :meth:`result`. The first conclusive result is kept (:attr:`decided`): a decision
    at a stopping time is what the always-valid guarantee covers."""

    alpha: float = 0.05
    min_requests: int = 1000
    """Requests each bucket needs before any decision (the plug-in variance of
    zero-inflated revenue is unreliable before; see docs/abtest.md)."""
    target_requests: int = 20_000
    """Requests per bucket at which the interval is tightest (:func:`mixture_rho`)."""
    online: Moments = field(default_factory=Moments)
    control: Moments = field(default_factory=Moments)
    decided: TestResult | None = None

    def __post_init__(self) -> None:
        self.rho = mixture_rho(self.alpha, self.target_requests)
        if self.min_requests < 2:
            raise ValueError("min_requests must be >= 2")

    def add(self, bucket: str, revenue: float) -> None:
        if not math.isfinite(revenue):
            raise ValueError(f"revenue must be finite, got {revenue}")
        if bucket == "online":
            self.online.add(revenue)
        elif bucket == "control":
            self.control.add(revenue)
        else:
            raise ValueError(f"bucket must be 'online' or 'control', got {bucket!r}")

    def result(self) -> TestResult:
        on, ctl = self.online, self.control
        diff = on.mean - ctl.mean if on.n and ctl.n else math.nan
        lower = upper = math.nan
        decision: Decision = "continue"
        if on.n >= 2 and ctl.n >= 2:
            pooled = (on.m2 + ctl.m2) / (on.n + ctl.n - 2)
            var_diff = max(on.var / on.n + ctl.var / ctl.n,
                           pooled * (1.0 / on.n + 1.0 / ctl.n))
            w = half_width(var_diff, self.rho ** 2 * pooled, self.alpha)
            lower, upper = diff - w, diff + w
            if on.n >= self.min_requests and ctl.n >= self.min_requests:
                if upper < 0:
                    decision = "online_worse"
                elif lower > 0:
                    decision = "online_better"
        res = TestResult(on.n, ctl.n, on.mean, ctl.mean, diff, lower, upper, decision,
                         self.alpha)
        if self.decided is None and decision != "continue":
            self.decided = res
        return res

    def state(self) -> dict[str, Any]:
        return {"online": self.online.to_json(), "control": self.control.to_json()}

    def load(self, st: dict[str, Any]) -> None:
        self.online = Moments.from_json(st["online"])
        self.control = Moments.from_json(st["control"])


# -- the same boundary over whole simulated experiments ----------------------------------
def first_decisions(revenue: np.ndarray, control: np.ndarray, alpha: float = 0.05,
                    min_requests: int = 1000, target_requests: int = 20_000,
                    every: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Run :class:`RevenueTest` over ``E`` experiments of ``N`` requests at once, looking
    after every ``every``-th request. ``revenue`` [E, N] is each request's revenue,
    ``control`` [E, N] True where it fell in the control bucket.

    Returns ``(decision, at, bounds)``: per experiment the first decision (+1 online
    better, -1 online worse, 0 none), the request index it came at (-1: none), and
    [E, 2] the highest lower and the lowest upper bound over the looks once both buckets
    held ``min_requests`` (every interval looked at covers a true difference ``d``
    exactly when ``bounds[:, 0] <= d <= bounds[:, 1]``)."""
    revenue = np.asarray(revenue, dtype=float)
    control = np.asarray(control, dtype=bool)
    rho2 = mixture_rho(alpha, target_requests) ** 2
    on = ~control

    def cum(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        x = np.where(mask, revenue, 0.0)
        return (np.cumsum(mask, axis=1)[:, every - 1::every].astype(float),
                np.cumsum(x, axis=1)[:, every - 1::every],
                np.cumsum(x * x, axis=1)[:, every - 1::every])

    n1, s1, q1 = cum(on)
    n0, s0, q0 = cum(control)
    with np.errstate(divide="ignore", invalid="ignore"):
        m1, m0 = s1 / n1, s0 / n0
        ss1 = np.maximum(q1 - n1 * m1 * m1, 0.0)   # sums of squared deviations
        ss0 = np.maximum(q0 - n0 * m0 * m0, 0.0)
        pooled = (ss1 + ss0) / (n1 + n0 - 2)
        var_diff = np.maximum(ss1 / (n1 - 1) / n1 + ss0 / (n0 - 1) / n0,
                              pooled * (1.0 / n1 + 1.0 / n0))
    enough = (n1 >= 2) & (n0 >= 2)
    w = half_width(np.where(enough, var_diff, 0.0), np.where(enough, rho2 * pooled, 0.0),
                   alpha)
    diff = np.where(enough, m1 - m0, 0.0)
    lower, upper = diff - w, diff + w
    ready = (n1 >= min_requests) & (n0 >= min_requests)
    worse, better = ready & (upper < 0), ready & (lower > 0)
    hit = worse | better
    any_hit = hit.any(axis=1)
    first = np.where(any_hit, hit.argmax(axis=1), -1)
    rows = np.arange(revenue.shape[0])
    decision = np.where(any_hit, np.where(worse[rows, np.maximum(first, 0)], -1, 1), 0)
    at = np.where(any_hit, first * every + every - 1, -1)
    looked = np.where(ready, upper, np.inf).min(axis=1)
    looked_lo = np.where(ready, lower, -np.inf).max(axis=1)
    return decision, at, np.stack([looked_lo, looked], axis=1)


def ads_like_revenue(rng: np.random.Generator, shape: tuple[int, ...],
                     scale: float | np.ndarray = 1.0, click_rate: float = 0.05,
                     conversion_rate: float = 0.1, cpa_price: float = 10.0) -> np.ndarray:
    """Revenue per request shaped like ads traffic: most requests earn nothing; a click
    (``click_rate`` per request, times ``scale``) pays a log-normal CPC price (mean 1,
    CV 1.3); a click converts with ``conversion_rate`` and then also pays a log-normal
    CPA price (mean ``cpa_price``, CV 1.3). With the defaults 95 % of requests earn 0,
    the mean is 0.1 per request and the coefficient of variation about 12.6.

    ``scale < 1`` models a worse model: fewer clicks, so proportionally less revenue
    (``scale=0.85`` is a 15 % drop in revenue per mille); an array of ``shape`` scales
    each request."""
    clicks = rng.random(shape) < click_rate * scale
    cpc = rng.lognormal(-0.5, 1.0, shape)                     # mean 1
    converted = clicks & (rng.random(shape) < conversion_rate)
    cpa = cpa_price * rng.lognormal(-0.5, 1.0, shape)         # mean cpa_price
    return np.where(clicks, cpc, 0.0) + np.where(converted, cpa, 0.0)
