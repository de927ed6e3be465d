"""The promotion guard's estimate of a model on the held-out lists (``--guard-estimate``).

* ``snips`` (the default) / ``dr``: the off-policy estimate of :mod:`learner.ope` on
  the held-out final lists whose items all carry the logging propensity (the server
  writes them): what each model would serve, judged against what was served. Each
  model is a deterministic target policy: its slate for a held-out request is the
  learner's torch beam search (:func:`learner.beam.beam_search`, ``guard_beam_width``
  at every level, as ``adloop evaluate --offline`` searches, over the servable ads the
  tokenizer knows), ranked by the value head's expected value with the ads' bids (ties:
  higher log-probability), as the server ranks, as many positions as the logged slate.
  DR's reward model is the held-out lists' mean reward per ad.
* ``holdout_value``: :meth:`learner.rspo_step.OnlineLearner.holdout_value`, the
  value-weighted estimate over the items each held-out list showed (the fallback).

Every model one publish compares (candidate, baseline, best, serving) is scored on the
same lists by the same estimate (:class:`GuardRound`, :meth:`GuardEstimate.settle`).
An off-policy estimate is trusted only where the log supports the model: at least
:data:`MIN_MATCHED_ITEMS` held-out items are ones the model would serve at the same
position, and the weights' effective sample size (Kish) is at least
:data:`MIN_EFFECTIVE_SAMPLE`. When no held-out list carries propensities, no servable ad
is known, or one of the models compared lacks that support, the round falls back to
``holdout_value`` for every model: counted in
``adloop_learner_guard_fallback_total{reason}`` and logged (``guard.fallback``) once per
reason. Why SNIPS: docs/ope.md ("The guard").
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, get_args

import numpy as np
import torch
from torch import Tensor

from learner.beam import IdTrie, TorchBackend, beam_search, beam_widths_for
from learner.losses import BID_TYPES, expected_value
from learner.model import GenerativeRecommender
from learner.ope import ESTIMATORS, has_propensities, logged_items, reward_model
from learner.publish import all_finite
from learner.rspo_step import ListBatch, OnlineLearner, lists_to_batch
from learner.tokenizer import UASIDTokenizer
from streams.logs import get_logger
from streams.metrics import counter
from streams.schemas import Ad, Feedback

log = get_logger(__name__)

GuardEstimateName = Literal["holdout_value", "snips", "dr"]
GUARD_ESTIMATES: tuple[str, ...] = get_args(GuardEstimateName)

MIN_MATCHED_ITEMS = 30
"""Held-out items a model must serve at the same position for its off-policy estimate
to count (the offline command warns below the same number)."""
MIN_EFFECTIVE_SAMPLE = 30.0
"""Kish's effective sample size of a model's item weights below which one or a few
explored items decide its estimate."""

FALLBACK = counter(
    "adloop_learner_guard_fallback_total",
    "Publishes whose --guard-estimate snips/dr fell back to holdout_value, by reason: "
    "no_propensities (no held-out list carries logging propensities), no_servable_ads "
    "(no servable ad known to the tokenizer), unsupported (a model compared serves too "
    "few of the logged items, or a few weights dominate).", ("reason",))


def is_servable(ad: Ad) -> bool:
    """What the server serves: an active ad with budget left."""
    return ad.status == "active" and ad.budget > 0


@dataclass(frozen=True)
class Catalogue:
    """The servable ads the tokenizer knows: their trie, ids by trie row and bids."""

    trie: IdTrie
    ads: list[str]
    bid: Tensor
    """[n] float32 bid of each trie row."""
    bid_type: Tensor
    """[n] int64 bid type code (:data:`learner.losses.BID_TYPES`) of each trie row."""

    @classmethod
    def of(cls, ads: Mapping[str, Ad], tok: UASIDTokenizer) -> Catalogue | None:
        known = sorted(a for a, ad in ads.items() if is_servable(ad) and a in tok)
        if not known:
            return None
        ids = np.array([tok.ids_of(a) for a in known], dtype=np.int64)
        code = {b: i for i, b in enumerate(BID_TYPES)}
        return cls(IdTrie(ids.reshape(len(known), tok.config.id_len), tok.config.token_sizes),
                   known, torch.tensor([ads[a].bid for a in known], dtype=torch.float32),
                   torch.tensor([code[ads[a].bid_type] for a in known], dtype=torch.int64))


@torch.no_grad()
def model_slates(model: GenerativeRecommender, batch: ListBatch, ks: Sequence[int],
                 cat: Catalogue, beam_width: int, chunk: int = 64) -> list[list[str]]:
    """The slate (ad ids by position, ``ks[i]`` of them) ``model`` serves for each request
    of ``batch``: beam search, then the value head's expected value (ties: higher
    log-probability)."""
    backend = TorchBackend(model)
    widths = beam_widths_for(beam_width, cat.trie.id_len)
    out: list[list[str]] = []
    for s in range(0, len(ks), chunk):
        hist, mask = batch.history[s:s + chunk], batch.history_mask[s:s + chunk]
        ctx = batch.context[s:s + chunk]
        res = beam_search(backend, hist, mask, ctx, cat.trie, widths)
        memory, mmask, _, kv = backend.encode(hist, mask, ctx)
        pctr, pcvr = backend.value(memory, mmask, res.ids.clamp_min(0), kv, ctx)
        rows = res.rows.clamp_min(0)
        ev = expected_value(pctr, pcvr, cat.bid[rows], cat.bid_type[rows])
        ev = torch.where(torch.isfinite(ev) & (res.rows >= 0), ev,
                         torch.full_like(ev, -math.inf))
        by_score = torch.argsort(res.scores, dim=1, descending=True, stable=True)
        by_value = torch.argsort(ev.gather(1, by_score), dim=1, descending=True, stable=True)
        order = by_score.gather(1, by_value)
        ranked_rows = res.rows.gather(1, order).tolist()
        for j, row_list in enumerate(ranked_rows):
            out.append([cat.ads[r] for r in row_list if r >= 0][:ks[s + j]])
    return out


@dataclass(frozen=True)
class Support:
    """How much of a held-out log speaks for one model's served slates."""

    matched_items: int
    """Logged items the model serves at the same position."""
    effective_sample: float
    """Kish's effective sample size of the item weights."""

    @property
    def enough(self) -> bool:
        return (self.matched_items >= MIN_MATCHED_ITEMS
                and self.effective_sample >= MIN_EFFECTIVE_SAMPLE)


@dataclass
class GuardRound:
    """One publish's estimate: every model it compares is scored on the same lists."""

    name: str
    """The estimate in effect: the setting, or ``holdout_value`` after a fallback."""
    learner: OnlineLearner
    batch: ListBatch
    """Every held-out list (``holdout_value`` and the value-NDCG)."""
    beam_width: int = 32
    logged: Sequence[Feedback] = ()
    """The held-out lists with propensities (the off-policy estimate)."""
    logged_batch: ListBatch | None = None
    catalogue: Catalogue | None = None
    rhat: dict[str, float] = field(default_factory=dict)
    """DR's reward model (:func:`learner.ope.reward_model` of ``logged``)."""
    scored: dict[int, tuple[float, Support]] = field(default_factory=dict)
    """Off-policy estimate and support of each model scored so far (by ``id``)."""

    def value(self, model: GenerativeRecommender) -> float:
        """The guard's estimate of ``model``."""
        if self.name == "holdout_value":
            return self.learner.holdout_value(model, self.batch)
        return self.off_policy(model)

    def metrics(self, model: GenerativeRecommender) -> tuple[float, float]:
        """``(estimate, holdout value-NDCG)`` of ``model``."""
        value, ndcg = self.learner.holdout_metrics(model, self.batch)
        if self.name == "holdout_value":
            return value, ndcg
        return self.off_policy(model), ndcg

    def off_policy(self, model: GenerativeRecommender) -> float:
        return self.off_policy_support(model)[0]

    def off_policy_support(self, model: GenerativeRecommender) -> tuple[float, Support]:
        """The estimate of ``model``'s served slates and how well the log supports it."""
        hit = self.scored.get(id(model))
        if hit is not None:
            return hit
        assert self.logged_batch is not None and self.catalogue is not None
        slates = model_slates(model, self.logged_batch, [len(f.items) for f in self.logged],
                              self.catalogue, self.beam_width)
        items = logged_items(self.logged, slates, self.rhat)
        w = items.target / items.propensity
        sq = float((w ** 2).sum())
        support = Support(int((items.target > 0).sum()),
                          float(w.sum()) ** 2 / sq if sq > 0 else 0.0)
        out = (ESTIMATORS[self.name](items.per_impression()), support)
        self.scored[id(model)] = out
        return out


class GuardEstimate:
    """The ``--guard-estimate`` setting; :meth:`round` prepares each publish's
    :class:`GuardRound` and remembers which fallbacks were already logged."""

    def __init__(self, estimate: str = "snips", beam_width: int = 32) -> None:
        if estimate not in GUARD_ESTIMATES:
            raise ValueError(f"guard estimate must be one of {GUARD_ESTIMATES}, "
                             f"got {estimate!r}")
        self.estimate = estimate
        self.beam_width = beam_width
        self._warned: set[str] = set()

    def round(self, learner: OnlineLearner, lists: Sequence[Feedback], tok: UASIDTokenizer,
              ads: Mapping[str, Ad], trie: IdTrie | None = None) -> GuardRound | None:
        """The round over held-out ``lists`` (None without any); ``ads``: the latest
        record of each ad (bids and which are servable); ``trie``: the log-probs of the
        holdout estimate under the servable trie, as the learner trains them."""
        if not lists:
            return None
        batch = lists_to_batch([(f, 1.0) for f in lists], tok, learner.model, trie,
                               beams=False)
        if self.estimate == "holdout_value":
            return GuardRound("holdout_value", learner, batch, self.beam_width)
        logged = [f for f in lists if has_propensities(f)]
        cat = Catalogue.of(ads, tok) if logged else None
        if not logged or cat is None:
            self._fall_back("no_propensities" if not logged else "no_servable_ads", len(lists))
            return GuardRound("holdout_value", learner, batch, self.beam_width)
        return GuardRound(self.estimate, learner, batch, self.beam_width, logged,
                          lists_to_batch([(f, 1.0) for f in logged], tok, learner.model,
                                         beams=False),
                          cat, reward_model(logged))

    def settle(self, rnd: GuardRound,
               models: Sequence[GenerativeRecommender | None]) -> str:
        """Score every model the publish compares (None: absent) before any comparison;
        when one lacks support (:class:`Support`), the whole round falls back to
        ``holdout_value``. Returns the estimate in effect."""
        if rnd.name == "holdout_value":
            return rnd.name
        for m in models:
            if m is None or not all_finite(m):
                continue   # a model with NaN/inf is refused before its estimate matters
            _, sup = rnd.off_policy_support(m)
            if not sup.enough:
                self._fall_back("unsupported", len(rnd.logged),
                                matched_items=sup.matched_items,
                                effective_sample=round(sup.effective_sample, 1))
                rnd.name = "holdout_value"
                break
        return rnd.name

    def _fall_back(self, reason: str, lists: int, **detail: float) -> None:
        FALLBACK.labels(reason).inc()
        if reason not in self._warned:
            self._warned.add(reason)
            log.warning("guard.fallback", estimate=self.estimate, reason=reason,
                        held_out_lists=lists, using="holdout_value", **detail)
