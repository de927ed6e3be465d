"""Exploration: new and low-exposure ads get the last slot of some slates on purpose.

The rule (``ADLOOP_SERVER_EXPLORE``, ``ADLOOP_SERVER_EXPLORE_MAX_SHOWN``): after
ranking, with probability ``explore`` per request (drawn independently for every
request with a non-empty slate), the *last* slot of the slate goes to an ad drawn
uniformly from the **eligible** ads:

* servable (a path of the serving trie, and active with budget in the catalog),
* not already in the slate (the ranked ad in the last slot included),
* shown by this server process fewer than ``explore_max_shown`` times.

When no ad is eligible the slate stays as ranked. Every ad of every served slate
(explored or not) counts as shown once; counts live in memory, one per ad the
catalog still holds, and start from zero when the process starts.

Propensity: the probability that this policy puts this ad at this position, given
the request and the server's state when it answered (serving model, catalog,
exposure counts):

* ranked slots before the last: ``1.0``;
* the last slot, ranked ad: ``1 - explore`` when at least one ad is eligible (the
  exploration draw never picks an ad already in the slate, so nothing else adds to
  it), ``1.0`` when none is;
* the last slot, drawn ad: ``explore / |eligible|``.

With ``explore = 0`` the policy is deterministic and every propensity is ``1.0``.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from server import metrics as M
from server.catalog import AdCatalog, is_servable
from server.models import LoadedModel, ServingState
from streams.logs import get_logger

log = get_logger(__name__)


@dataclass(frozen=True)
class SlatePlan:
    """What exploration made of one ranked slate."""

    rows: list[int]
    """The final slate as rows of the snapshot's id table (last one replaced if drawn)."""
    propensities: list[float]
    """Per slot of the final slate, see the module docstring."""
    drawn: int | None = None
    """Row of the ad drawn for the last slot; None when the slate stayed as ranked."""
    eligible: int = 0
    """Eligible ads for this request's exploration draw."""


@dataclass
class _Exposure:
    """Exposure counts aligned to one model's id table and low-exposure mask of one trie."""

    model: LoadedModel
    counts: np.ndarray                      # [n_rows] int64 times shown
    state: ServingState | None = None
    low: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))  # [n_rows]
    n_low: int = 0                          # servable rows shown < max_shown


class Explorer:
    """Applies the exploration rule to ranked slates and counts what is shown.

    Thread-safe: model-execution workers call :meth:`plan` concurrently; one lock
    covers the draw and the counting, so each request sees the counts of the slates
    served before it."""

    def __init__(self, rate: float, max_shown: int, catalog: AdCatalog,
                 seed: int | None = None) -> None:
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"explore rate {rate} must be in [0, 1]")
        if max_shown < 1:
            raise ValueError(f"explore_max_shown {max_shown} must be >= 1")
        self.rate = float(rate)
        self.max_shown = int(max_shown)
        self.catalog = catalog
        self.rng = np.random.default_rng(seed)
        self.shown: dict[str, int] = {}
        self._lock = threading.Lock()
        self._exp: _Exposure | None = None
        M.EXPLORE_RATE.set(self.rate)
        if self.enabled:
            log.info("explore.enabled", rate=self.rate, max_shown=self.max_shown,
                     seeded=seed is not None)

    @property
    def enabled(self) -> bool:
        return self.rate > 0.0

    def times_shown(self, ad_id: str) -> int:
        return self.shown.get(ad_id, 0)

    # -- the rule ------------------------------------------------------------------------
    def plan(self, state: ServingState, slates: Sequence[Sequence[int]]) -> list[SlatePlan]:
        """Final slates and propensities for ranked ``slates`` (rows, best first) of one
        batch, in request order; counts every ad of the final slates as shown."""
        if not self.enabled:
            return [SlatePlan(list(rows), [1.0] * len(rows)) for rows in slates]
        out: list[SlatePlan] = []
        with self._lock:
            exp = self._exposure(state)
            for rows in slates:
                plan = self._plan_one(exp, list(rows))
                self._count(exp, plan.rows)
                out.append(plan)
            M.EXPLORE_ELIGIBLE.set(exp.n_low)
        return out

    def _plan_one(self, exp: _Exposure, rows: list[int]) -> SlatePlan:
        if not rows:
            return SlatePlan(rows, [])
        in_slate = np.asarray(rows, np.int64)
        eligible = exp.n_low - int(exp.low[in_slate].sum())
        head = [1.0] * (len(rows) - 1)
        if self.rng.random() < self.rate and eligible > 0:
            pool = np.flatnonzero(exp.low)
            pool = pool[~np.isin(pool, in_slate)]
            ad_ids = exp.model.manifest.ad_ids
            while pool.size:
                i = int(self.rng.integers(pool.size))
                pick = int(pool[i])
                if is_servable(self.catalog.get(ad_ids[pick])):
                    return SlatePlan([*rows[:-1], pick], [*head, self.rate / pool.size],
                                     drawn=pick, eligible=int(pool.size))
                # paused after the trie was built (its rebuild is on the way): not eligible
                exp.low[pick] = False
                exp.n_low -= 1
                pool = np.delete(pool, i)
            eligible = 0
        return SlatePlan(rows, [*head, 1.0 - self.rate if eligible > 0 else 1.0],
                         eligible=eligible)

    # -- exposure bookkeeping ------------------------------------------------------------
    def _exposure(self, state: ServingState) -> _Exposure:
        """Counts for ``state``'s model and the low-exposure mask for its trie, rebuilt
        when the model (counts: one pass over the id table) or the trie changes."""
        exp = self._exp
        if exp is None or exp.model is not state.model:
            self._prune()
            ad_ids = state.model.manifest.ad_ids
            counts = np.fromiter((self.shown.get(a, 0) for a in ad_ids), np.int64,
                                 count=len(ad_ids))
            exp = self._exp = _Exposure(state.model, counts)
        if exp.state is not state:
            servable = np.zeros(exp.counts.shape[0], bool)
            servable[state.trie.rows] = True
            exp.low = servable & (exp.counts < self.max_shown)
            exp.n_low = int(exp.low.sum())
            exp.state = state
        return exp

    def _count(self, exp: _Exposure, rows: list[int]) -> None:
        ad_ids = exp.model.manifest.ad_ids
        for r in rows:
            a = ad_ids[r]
            self.shown[a] = self.shown.get(a, 0) + 1
            exp.counts[r] += 1
            if exp.low[r] and exp.counts[r] >= self.max_shown:
                exp.low[r] = False
                exp.n_low -= 1
        if len(self.shown) > 2 * len(self.catalog) + 1024:
            self._prune()

    def _prune(self) -> None:
        """Keep counts only for ads the catalog still holds (bounded by the catalog)."""
        before = len(self.shown)
        self.shown = {a: n for a, n in self.shown.items() if self.catalog.get(a) is not None}
        if len(self.shown) != before:
            log.info("explore.counts_pruned", dropped=before - len(self.shown),
                     kept=len(self.shown))
