"""The live comparison of the online and control buckets, in the learner process.

:class:`BucketMonitor` reads the ``feedback`` records the learner consumes. Only the
``final`` revision of a request counts (its revenue no longer changes): revenue is the
sum of its items' rewards, CTR clicks per item shown, CVR conversions per click. Every
final record is counted per bucket (``Feedback.bucket``: ``online``, ``control``, or
``none`` for records served without a control bucket) in the ``adloop_learner_abtest_*``
counters; the online and control records of the current *test epoch* also feed
:class:`learner.abtest.RevenueTest` and the epoch gauges (RPM, CTR, CVR, the always-valid
interval of online minus control RPM).

A test epoch starts when the learner starts, after each decision, and after each
rollback. After a rollback the epoch counts only the online requests served by the
versions announced since (``accept``), and the control requests from the first of
those on (impression time), so the restored version is compared with control over the
same period.

Per online version the monitor also keeps a test against the control requests that
arrived while that version was the newest online one (``versions``): a rollback goes to
the version with the best estimate among those with ``min_requests`` in both buckets
that the test did not find worse, or to the control version (estimate 0 by definition)
when none beats it (:meth:`BucketMonitor.rollback_candidates`).
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from learner.abtest import Decision, RevenueTest, TestResult
from streams.metrics import counter, gauge
from streams.schemas import Feedback

BUCKET_LABELS = ("online", "control", "none")

REQUESTS = counter("adloop_learner_abtest_requests_total",
                   "Final feedback records (requests) seen, by A/B bucket.", ("bucket",))
REVENUE = counter("adloop_learner_abtest_revenue_total",
                  "Realized revenue of the final feedback records, by A/B bucket.",
                  ("bucket",))
ITEMS = counter("adloop_learner_abtest_items_total",
                "Ads shown in the final feedback records, by A/B bucket.", ("bucket",))
CLICKS = counter("adloop_learner_abtest_clicks_total",
                 "Clicks in the final feedback records, by A/B bucket.", ("bucket",))
CONVERSIONS = counter("adloop_learner_abtest_conversions_total",
                      "Conversions in the final feedback records, by A/B bucket.",
                      ("bucket",))
EPOCH_REQUESTS = gauge("adloop_learner_abtest_epoch_requests",
                       "Requests in the current test epoch, by bucket (online, control).",
                       ("bucket",))
EPOCH_RPM = gauge("adloop_learner_abtest_rpm",
                  "Realized revenue per 1000 requests in the current test epoch, by bucket.",
                  ("bucket",))
EPOCH_CTR = gauge("adloop_learner_abtest_ctr",
                  "Clicks per ad shown in the current test epoch, by bucket.", ("bucket",))
EPOCH_CVR = gauge("adloop_learner_abtest_cvr",
                  "Conversions per click in the current test epoch, by bucket.", ("bucket",))
RPM_DIFF = gauge("adloop_learner_abtest_rpm_difference",
                 "Online minus control revenue per 1000 requests in the current test epoch: "
                 "the estimate and the always-valid interval's bounds (stat).", ("stat",))
DECISIONS = counter("adloop_learner_abtest_decisions_total",
                    "Conclusive results of the sequential test (online_worse, online_better).",
                    ("decision",))
ROLLBACKS = counter("adloop_learner_abtest_rollbacks_total",
                    "Rollbacks after an online_worse decision, by result: published (an "
                    "earlier version re-announced), no_candidate (no stored version to go "
                    "back to), failed (the store could not be read or written), disabled "
                    "(rollback turned off: logged only).", ("result",))
PROMOTION_HELD = gauge("adloop_learner_abtest_promotion_held",
                       "1 while the learner publishes no new versions after an online_worse "
                       "decision (until the restored version has held its own).")
EPOCH_START = gauge("adloop_learner_abtest_epoch_start_timestamp_seconds",
                    "Wall time the current test epoch started.")


@dataclass
class Totals:
    """Sums over the final records of one bucket."""

    requests: int = 0
    revenue: float = 0.0
    items: int = 0
    clicks: int = 0
    conversions: int = 0

    def add(self, revenue: float, items: int, clicks: int, conversions: int) -> None:
        self.requests += 1
        self.revenue += revenue
        self.items += items
        self.clicks += clicks
        self.conversions += conversions

    @property
    def rpm(self) -> float:
        return 1000.0 * self.revenue / self.requests if self.requests else math.nan

    @property
    def ctr(self) -> float:
        return self.clicks / self.items if self.items else math.nan

    @property
    def cvr(self) -> float:
        return self.conversions / self.clicks if self.clicks else math.nan

    def describe(self) -> dict[str, Any]:
        def r(x: float) -> float | None:
            return round(x, 6) if math.isfinite(x) else None
        return {"requests": self.requests, "rpm": r(self.rpm), "ctr": r(self.ctr),
                "cvr": r(self.cvr)}

    def to_json(self) -> list[float]:
        return [self.requests, self.revenue, self.items, self.clicks, self.conversions]

    @classmethod
    def from_json(cls, v: list[float]) -> Totals:
        return cls(int(v[0]), float(v[1]), int(v[2]), int(v[3]), int(v[4]))


@dataclass(frozen=True)
class Candidate:
    """A version the servers could go back to, with its own test against control."""

    version: str
    diff: float
    """Online minus control revenue per request (0 for the control version)."""
    lower: float
    upper: float
    n_online: int
    n_control: int

    def describe(self) -> dict[str, Any]:
        def r(x: float) -> float | None:
            return round(1000.0 * x, 6) if math.isfinite(x) else None
        return {"version": self.version, "rpm_diff": r(self.diff),
                "rpm_diff_lower": r(self.lower), "rpm_diff_upper": r(self.upper),
                "n_online": self.n_online, "n_control": self.n_control}


def request_figures(fb: Feedback) -> tuple[float, int, int, int]:
    """(revenue, items shown, clicks, conversions) of one feedback record."""
    return (sum(it.reward for it in fb.items), len(fb.items),
            sum(1 for it in fb.items if it.clicked), sum(1 for it in fb.items if it.converted))


class BucketMonitor:
    """Per-bucket figures and the sequential test (see the module docstring)."""

    def __init__(self, alpha: float = 0.05, min_requests: int = 1000,
                 target_requests: int = 20_000, max_versions: int = 64) -> None:
        self.alpha, self.min_requests = alpha, min_requests
        self.target_requests, self.max_versions = target_requests, max_versions
        self.epoch = 0
        self.test = self._new_test()
        self.totals = {"online": Totals(), "control": Totals()}
        self.accept: set[str] | None = None
        """Online versions the epoch counts (None: every online request)."""
        self.start_time: float | None = None
        """Impression time of the epoch's first online request (set with ``accept``)."""
        self.started = time.time()
        self.epoch_versions: list[str] = []
        """Online versions seen in this epoch, in order of first appearance."""
        self.versions: OrderedDict[str, RevenueTest] = OrderedDict()
        self.current_online: str | None = None
        self.newest_online_time = -math.inf
        self.control_version: str | None = None
        self.reported = False
        """This epoch's decision was handed out by :meth:`new_decision`."""
        EPOCH_START.set(self.started)

    def _new_test(self) -> RevenueTest:
        return RevenueTest(self.alpha, self.min_requests, self.target_requests)

    # -- input -------------------------------------------------------------------------
    def observe(self, fb: Feedback) -> None:
        """Count one feedback record (only ``final`` ones count)."""
        if fb.kind != "final":
            return
        revenue, items, clicks, conversions = request_figures(fb)
        if not math.isfinite(revenue):
            return
        bucket = fb.bucket if fb.bucket in ("online", "control") else "none"
        REQUESTS.labels(bucket).inc()
        REVENUE.labels(bucket).inc(max(revenue, 0.0))
        ITEMS.labels(bucket).inc(items)
        CLICKS.labels(bucket).inc(clicks)
        CONVERSIONS.labels(bucket).inc(conversions)
        if bucket == "online":
            if self.accept is not None and fb.model_version not in self.accept:
                return                     # served before the epoch's versions took over
            if self.start_time is None:
                self.start_time = fb.impression_time
            if fb.impression_time >= self.newest_online_time:
                self.newest_online_time = fb.impression_time
                self.current_online = fb.model_version
            if fb.model_version not in self.epoch_versions:
                self.epoch_versions.append(fb.model_version)
            self._version_test(fb.model_version).add("online", revenue)
        elif bucket == "control":
            self.control_version = fb.model_version or self.control_version
            if self.accept is not None and (self.start_time is None
                                            or fb.impression_time < self.start_time):
                return                     # before the epoch's first online request
            if self.current_online is not None:
                self._version_test(self.current_online).add("control", revenue)
        else:
            return
        self.test.add(bucket, revenue)
        self.totals[bucket].add(revenue, items, clicks, conversions)

    def _version_test(self, version: str) -> RevenueTest:
        t = self.versions.get(version)
        if t is None:
            t = self.versions[version] = self._new_test()
            while len(self.versions) > self.max_versions:
                self.versions.popitem(last=False)
        return t

    # -- output ------------------------------------------------------------------------
    def result(self) -> TestResult:
        """The epoch's test now; also sets the epoch gauges."""
        res = self.test.result()
        for bucket, t in self.totals.items():
            EPOCH_REQUESTS.labels(bucket).set(t.requests)
            for g, v in ((EPOCH_RPM, t.rpm), (EPOCH_CTR, t.ctr), (EPOCH_CVR, t.cvr)):
                if math.isfinite(v):
                    g.labels(bucket).set(v)
        for stat, v in (("estimate", res.diff), ("lower", res.lower), ("upper", res.upper)):
            if math.isfinite(v):
                RPM_DIFF.labels(stat).set(1000.0 * v)
        return res

    def new_decision(self) -> TestResult | None:
        """The epoch's decision the first time it is asked for after the test reached
        one (counted in ``adloop_learner_abtest_decisions_total``), else None."""
        self.result()
        decided = self.test.decided
        if decided is None or self.reported:
            return None
        self.reported = True
        DECISIONS.labels(decided.decision).inc()
        return decided

    def evidence(self, res: TestResult) -> dict[str, Any]:
        """A decision's evidence for the log: the test, the buckets, the versions."""
        return {**res.evidence(), "epoch": self.epoch,
                "epoch_started": round(self.started, 3),
                "online": self.totals["online"].describe(),
                "control": self.totals["control"].describe(),
                "online_versions": self.epoch_versions[-20:],
                "current_online_version": self.current_online,
                "control_version": self.control_version}

    def verdict(self, version: str) -> Decision | None:
        t = self.versions.get(version)
        return t.result().decision if t is not None else None

    def rollback_candidates(self, exclude: set[str]) -> list[Candidate]:
        """Versions to go back to, best first: every version not in ``exclude`` with
        ``min_requests`` in both buckets that its own test did not find worse, by
        estimate, and the control version (estimate 0) where it ranks."""
        out: list[Candidate] = []
        for version, t in self.versions.items():
            if version in exclude or version == self.control_version:
                continue
            r = t.result()
            if min(r.n_online, r.n_control) < self.min_requests or r.decision == "online_worse":
                continue
            out.append(Candidate(version, r.diff, r.lower, r.upper, r.n_online, r.n_control))
        if self.control_version is not None:
            out.append(Candidate(self.control_version, 0.0, 0.0, 0.0, 0,
                                 self.totals["control"].requests))
        return sorted(out, key=lambda c: -c.diff)

    def protected(self, keep: int = 3) -> set[str]:
        """Versions the snapshot store must keep: the control version and the ``keep``
        best rollback candidates."""
        cands = [c.version for c in self.rollback_candidates(set())][:keep + 1]
        return {*cands, *([self.control_version] if self.control_version else [])}

    # -- epochs ------------------------------------------------------------------------
    def restart(self, accept: set[str] | None) -> None:
        """Start a new test epoch; ``accept``: the online versions it counts (None:
        all). Per-version tests carry over."""
        self.epoch += 1
        self.test = self._new_test()
        self.totals = {"online": Totals(), "control": Totals()}
        self.accept = set(accept) if accept is not None else None
        self.start_time = None
        self.started = time.time()
        self.epoch_versions = []
        self.reported = False
        EPOCH_START.set(self.started)
        for g in (EPOCH_RPM, EPOCH_CTR, EPOCH_CVR):
            g.clear()
        RPM_DIFF.clear()
        for bucket in self.totals:
            EPOCH_REQUESTS.labels(bucket).set(0)

    def announced(self, version: str) -> None:
        """A version the learner announced: the epoch counts it when it counts a set."""
        if self.accept is not None:
            self.accept.add(version)

    # -- checkpoint --------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "test": self.test.state(), "reported": self.reported,
                "totals": {b: t.to_json() for b, t in self.totals.items()},
                "accept": sorted(self.accept) if self.accept is not None else None,
                "start_time": self.start_time, "started": self.started,
                "epoch_versions": self.epoch_versions,
                "versions": [[v, t.state()] for v, t in self.versions.items()],
                "current_online": self.current_online,
                "newest_online_time": self.newest_online_time
                if math.isfinite(self.newest_online_time) else None,
                "control_version": self.control_version}

    def load(self, st: dict[str, Any]) -> None:
        self.epoch = int(st["epoch"])
        self.test = self._new_test()
        self.test.load(st["test"])
        self.test.result()
        self.reported = bool(st["reported"])
        self.totals = {b: Totals.from_json(v) for b, v in st["totals"].items()}
        self.accept = set(st["accept"]) if st["accept"] is not None else None
        self.start_time = st["start_time"]
        self.started = float(st["started"])
        self.epoch_versions = list(st["epoch_versions"])
        self.versions = OrderedDict()
        for v, ts in st["versions"]:
            self._version_test(v).load(ts)
        self.current_online = st["current_online"]
        nt = st["newest_online_time"]
        self.newest_online_time = float(nt) if nt is not None else -math.inf
        self.control_version = st["control_version"]
        EPOCH_START.set(self.started)
        self.result()
