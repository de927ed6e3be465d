"""Beyond-accuracy metrics of served slates: diversity, coverage, novelty, personalization.

Every function takes the slates a policy showed, in request (time) order, each a
sequence of ad ids in position order, and where needed the user of each request. They
are pure (no I/O) and shared by the closed-loop harness (``adloop.evaluation``), the
demo report (``adloop.demo``) and ``adloop evaluate`` (its holdout mode,
:mod:`learner.evaluate`, and its ``--offline`` mode, ``adloop.offpolicy``).
Definitions, for slates ``S_1 … S_n`` shown to users ``u_1 … u_n``:

* **category diversity** (``slate_diversity``): mean over non-empty slates of
  ``|{category(a) : a ∈ S_i}| / |S_i|``;
* **intra-list diversity** (``sid_diversity`` with the semantic-ID level-0 code as key):
  mean over slates with at least two ads of the share of their ``|S_i|(|S_i|-1)/2``
  distinct position pairs whose keys differ (1: every pair from a different coarse
  cluster; 0: the whole slate in one);
* **catalogue coverage**: ``|∪ S_i| / |servable|``, the share of the servable ads shown
  at least once;
* **novelty (unseen)**: the share of shown ads (over all slates, with multiplicity) that
  are not in the user's history up to that request: what the user saw before the
  evaluated stream (``prior``) plus what they were shown at their earlier requests of it;
* **novelty (bits)**: mean over shown ads of ``-log2`` of the ad's add-one smoothed share
  of a reference log's clicks (higher: less of what was already popular);
* **personalization**: ``1 - mean Jaccard(S_i, S_j)`` over pairs of non-empty slates of
  different users (as ad-id sets): every such pair when there are at most ``max_pairs``, else
  ``max_pairs`` pairs drawn uniformly with a seeded generator (0: everyone gets the same
  slate; 1: no two users share an ad).

An undefined value (no slate, no pair) is ``nan``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Collection, Hashable, Iterable, Mapping, Sequence

from streams.schemas import Feedback

__all__ = ["BEYOND_KEYS", "beyond_accuracy", "catalog_coverage", "category_diversity",
           "click_bits", "intra_list_diversity", "novelty_bits", "novelty_unseen",
           "personalization"]

BEYOND_KEYS = ("catalogue_coverage", "slate_diversity", "sid_diversity", "novelty_unseen",
               "novelty_bits", "personalization")
"""The keys :func:`beyond_accuracy` reports (those it can compute)."""


def category_diversity(slates: Iterable[Sequence[str]],
                       category_of: Callable[[str], Hashable]) -> float:
    """Mean over non-empty slates of distinct categories / slate length."""
    shares = [len({category_of(a) for a in s}) / len(s) for s in slates if s]
    return sum(shares) / len(shares) if shares else math.nan


def intra_list_diversity(slates: Iterable[Sequence[str]],
                         key_of: Callable[[str], Hashable]) -> float:
    """Mean over slates of two or more ads of the share of their position pairs whose
    ``key_of`` differs (the key: an ad's semantic-ID level-0 code, or its category)."""
    shares = []
    for s in slates:
        n = len(s)
        if n < 2:
            continue
        keys = [key_of(a) for a in s]
        differ = sum(keys[i] != keys[j] for i in range(n) for j in range(i + 1, n))
        shares.append(differ / (n * (n - 1) / 2))
    return sum(shares) / len(shares) if shares else math.nan


def catalog_coverage(slates: Iterable[Sequence[str]], servable: int | Collection[str]) -> float:
    """Distinct ads shown / servable ads (``servable``: their number, or the ads; given
    the ads, only shown ads among them count)."""
    shown = {a for s in slates for a in s}
    if isinstance(servable, int):
        return len(shown) / servable if servable else math.nan
    pool = set(servable)
    return len(shown & pool) / len(pool) if pool else math.nan


def novelty_unseen(users: Sequence[str], slates: Sequence[Sequence[str]],
                   seen: Sequence[Iterable[str]] | None = None,
                   prior: Mapping[str, Iterable[str]] | None = None) -> float:
    """Share of the shown ads not in the user's history up to that request.

    The history of request ``i``'s user is ``prior[user]`` (what they saw before the
    evaluated stream) plus ``seen[j]`` for their earlier requests ``j < i``: by default
    the slates themselves (what the evaluated policy showed); an off-line evaluation
    passes what the log showed them."""
    if len(users) != len(slates) or (seen is not None and len(seen) != len(slates)):
        raise ValueError("users, slates and seen need one entry per request")
    history: dict[str, set[str]] = {u: set(v) for u, v in (prior or {}).items()}
    new = total = 0
    for i, (user, slate) in enumerate(zip(users, slates, strict=True)):
        h = history.setdefault(user, set())
        new += sum(a not in h for a in slate)
        total += len(slate)
        h.update(slate if seen is None else seen[i])
    return new / total if total else math.nan


def click_bits(logs: Sequence[Feedback]) -> Callable[[str], float]:
    """Novelty of an ad: -log2 of its share of the logs' clicks (add-one smoothed over
    the ads the logs showed, plus one for an ad they never showed)."""
    clicks: dict[str, int] = {}
    for fb in logs:
        for it in fb.items:
            if it.clicked or it.converted:
                clicks[it.ad_id] = clicks.get(it.ad_id, 0) + 1
    total = sum(clicks.values())
    ads = {it.ad_id for fb in logs for it in fb.items}

    def bits(ad_id: str) -> float:
        return -math.log2((clicks.get(ad_id, 0) + 1) / (total + len(ads) + 1))

    return bits


def novelty_bits(slates: Iterable[Sequence[str]], bits: Callable[[str], float]) -> float:
    """Mean of ``bits(ad)`` over every shown ad (see :func:`click_bits`)."""
    values = [bits(a) for s in slates for a in s]
    return sum(values) / len(values) if values else math.nan


def _jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    union = len(a | b)
    return len(a & b) / union if union else 1.0


def personalization(users: Sequence[str], slates: Sequence[Sequence[str]],
                    max_pairs: int = 2000, seed: int = 0) -> float:
    """1 − mean Jaccard overlap of the slates of two different users: over every such
    pair of requests when there are at most ``max_pairs``, else over ``max_pairs`` pairs
    drawn uniformly (with replacement, ``random.Random(seed)``). A request that showed
    nothing has no slate to compare and is left out."""
    if len(users) != len(slates):
        raise ValueError("users and slates need one entry per request")
    kept = [(u, frozenset(s)) for u, s in zip(users, slates, strict=True) if s]
    users = [u for u, _ in kept]
    sets = [s for _, s in kept]
    n = len(sets)
    per_user: dict[str, int] = {}
    for u in users:
        per_user[u] = per_user.get(u, 0) + 1
    cross = (n * n - sum(c * c for c in per_user.values())) // 2
    if cross == 0:
        return math.nan
    if cross <= max_pairs:
        overlaps = [_jaccard(sets[i], sets[j]) for i in range(n) for j in range(i + 1, n)
                    if users[i] != users[j]]
    else:
        rng = random.Random(seed)
        overlaps = []
        while len(overlaps) < max_pairs:
            i, j = rng.randrange(n), rng.randrange(n)
            if users[i] != users[j]:
                overlaps.append(_jaccard(sets[i], sets[j]))
    return 1.0 - sum(overlaps) / len(overlaps)


def beyond_accuracy(users: Sequence[str], slates: Sequence[Sequence[str]], *,
                    servable: int | Collection[str],
                    category_of: Callable[[str], Hashable] | None = None,
                    prefix_of: Callable[[str], Hashable] | None = None,
                    bits: Callable[[str], float] | None = None,
                    seen: Sequence[Iterable[str]] | None = None,
                    prior: Mapping[str, Iterable[str]] | None = None,
                    max_pairs: int = 2000, seed: int = 0) -> dict[str, float]:
    """Every metric of this module that the arguments allow, by its report key
    (:data:`BEYOND_KEYS`): ``slate_diversity`` needs ``category_of``, ``sid_diversity``
    ``prefix_of`` (an ad's semantic-ID level-0 code), ``novelty_bits`` ``bits``."""
    out = {"catalogue_coverage": catalog_coverage(slates, servable)}
    if category_of is not None:
        out["slate_diversity"] = category_diversity(slates, category_of)
    if prefix_of is not None:
        out["sid_diversity"] = intra_list_diversity(slates, prefix_of)
    out["novelty_unseen"] = novelty_unseen(users, slates, seen, prior)
    if bits is not None:
        out["novelty_bits"] = novelty_bits(slates, bits)
    out["personalization"] = personalization(users, slates, max_pairs, seed)
    return {k: out[k] for k in BEYOND_KEYS if k in out}
