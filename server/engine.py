"""One model call for a batch of requests: encoder once per request, constrained beam
search over all beams of the batch at once, value heads on the final beams, slates;
then exploration (:mod:`server.explore`) may give a slate's last slot to a low-exposure
ad and sets every item's propensity.

Whole-catalogue mode: when the servable ads are at most ``score_catalogue_max``, the
beam search is skipped and the value heads score every servable ad for every request
(one ``value.onnx`` call with all of them as candidates); the slate is the top by
expected value, as from beams. Only the ads shown or logged get a sequence
log-probability (scored through the trie as a beam reaching them would be). Everything
after the candidates (exploration, the logged beams, organic items) is the same.

The final beams themselves, best expected value first and at most ``log_beams`` of them,
travel with each result (:attr:`RecResult.beams`) into the impression log, so the
learner sees the candidates the slate was chosen from (HEPO's sibling groups).

Mixed feed: requests with ``organic_k`` > 0 also get organic items (videos, articles)
ranked by the same model. Their encoder states are reused for a generator-only beam
search constrained to the snapshot's organic trie of servable items (no value heads:
organic items have no bid), each request with width ``max(organic_beam, organic_k)``,
``organic_beam`` scaled by the load controller's α like the ads' beams; the best
``organic_k`` by log-probability are kept, the request's ``recent_organic`` left out
while the search found enough others (then the best recent ones fill the rest). The
ads' search never sees it, so a request's ads are the same with and without
``organic_k``.

Runs on a worker thread (onnxruntime releases the GIL). The serving state is read
once per batch, so every request of a batch is answered by one model version.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from server import metrics as M
from server.beam import (
    BID_TYPES,
    Beams,
    beam_search,
    expected_value,
    pad_candidates,
    rank_slates,
    sequence_logprob,
)
from server.catalog import AdCatalog, is_servable
from server.explore import Explorer
from server.exposure import ExposureCounter
from server.models import ModelManager, ServingState
from server.runtime import UserStates
from streams.features import request_ids
from streams.logs import get_logger
from streams.schemas import BeamCandidate

log = get_logger(__name__)


class NotReadyError(Exception):
    """No snapshot is being served yet."""


@dataclass(frozen=True)
class RecRequest:
    user_id: str
    context: dict[str, str]
    recent_ad_ids: list[str]
    k: int
    recent_organic: list[str] = field(default_factory=list)
    """Recent organic item ids, oldest first (``<topic>#<n>``)."""
    organic_k: int = 0
    """Organic items wanted besides the ads (a mixed feed); 0 = ads only."""


@dataclass
class RankedAd:
    ad_id: str
    semantic_id: list[int]
    position: int
    score: float              # sequence log-probability of the id under the model
    expected_value: float
    pctr: float
    pcvr: float
    bid: float
    bid_type: str
    propensity: float = 1.0
    """Probability that the policy puts this ad at this position given the request
    (:mod:`server.explore`); 1.0 without exploration."""
    explored: bool = False
    """Drawn by exploration rather than ranked."""
    exposure: float = 0.0
    """The user's earlier impressions of this ad (:mod:`server.exposure`; what the value
    heads read); 0 without a counter."""


@dataclass
class RankedOrganic:
    item_id: str
    semantic_id: list[int]
    position: int             # rank among the request's organic items, 0 first
    score: float              # the generator's log-probability of the item's id


@dataclass
class RecResult:
    model_version: str
    beam_widths: list[int]
    ads: list[RankedAd] = field(default_factory=list)
    candidates: int = 0
    """Final beams the slate was ranked from (distinct servable ads)."""
    candidate_ids: list[str] = field(default_factory=list)
    """Their ad ids (not part of the HTTP response)."""
    beams: list[BeamCandidate] = field(default_factory=list)
    """The servable final beams, best expected value first (ties: higher log-prob), at
    most the engine's ``log_beams``: what the impression logs (not part of the HTTP
    response)."""
    organic: list[RankedOrganic] = field(default_factory=list)
    """The mixed feed's organic items, best log-probability first (empty when
    ``organic_k`` is 0 or the snapshot has no organic items)."""


class Engine:
    def __init__(self, models: ModelManager, catalog: AdCatalog,
                 explorer: Explorer | None = None, log_beams: int = 32,
                 organic_beam: int = 8,
                 organic_width: Callable[[int], int] | None = None,
                 score_catalogue_max: int = 0,
                 exposure: ExposureCounter | None = None) -> None:
        if log_beams < 0:
            raise ValueError(f"log_beams must be >= 0, got {log_beams}")
        if score_catalogue_max < 0:
            raise ValueError(f"score_catalogue_max must be >= 0, got {score_catalogue_max}")
        self.score_catalogue_max = score_catalogue_max
        """A servable catalogue of at most this many ads is scored whole by the value
        heads instead of searched by beams (0 = always beams)."""
        if organic_beam < 1:
            raise ValueError(f"organic_beam must be >= 1, got {organic_beam}")
        self.models = models
        self.catalog = catalog
        self.explorer = explorer
        self.log_beams = log_beams
        """Final beams per request kept in :attr:`RecResult.beams` (0 = none)."""
        self.organic_beam = organic_beam
        """Base beam width per level of the organic search (see :meth:`organic`)."""
        self.organic_width = organic_width or (lambda base: base)
        """``organic_beam`` -> the width in use: the load controller scales it by the
        ads' α (:meth:`server.controller.BeamController.organic_width`)."""
        self._warned_context: set[str] = set()
        self.exposure = exposure
        """Per (user, ad) impression counts: read for the value heads' exposure input,
        and every served slate added (None: every count is 0, nothing recorded)."""

    def inputs(self, state: ServingState,
               requests: list[RecRequest]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """history [B, H, T], history_mask [B, H], context [B, C + O] (as the learner
        builds them: recent ads in the order given, first H known ones, zero padding;
        context ids then the O most recent organic topic ids)."""
        man, row_of = state.model.manifest, state.model.row_of
        B, H, T = len(requests), man.history_len, man.id_len
        history = np.zeros((B, H, T), np.int64)
        hmask = np.zeros((B, H), np.float32)
        context = np.zeros((B, len(man.context_features) + man.organic_len), np.int64)
        for b, r in enumerate(requests):
            rows = [row_of[a] for a in r.recent_ad_ids if a in row_of][:H]
            if rows:
                history[b, : len(rows)] = man.ids[rows]
                hmask[b, : len(rows)] = 1.0
            context[b] = request_ids(r.context, r.recent_organic, man.context_features,
                                     man.context_buckets, man.organic_len)
            if man.context_features and not any(f in r.context for f in man.context_features):
                self._context_unmatched(man.version, man.context_features, r.context)
        return history, hmask, context

    def _context_unmatched(self, version: str, features: tuple[str, ...],
                           context: dict[str, str]) -> None:
        """Count a request whose context the model cannot read; warn once per model."""
        M.CONTEXT_UNMATCHED.inc()
        if version not in self._warned_context:
            self._warned_context.add(version)
            log.warning("serve.context_unmatched", model_version=version,
                        model_reads=list(features), request_keys=sorted(context)[:20])

    def _encode(self, requests: list[RecRequest], widths_for: Any) -> tuple[Any, list[int], Any]:
        """The loaded snapshot's state, the batch's beam widths and its encoder states."""
        state = self.models.state
        if state is None:
            raise NotReadyError("no model snapshot loaded yet")
        widths: list[int] = widths_for(state.model.manifest.id_len, max(r.k for r in requests))
        return state, widths, state.model.runtime.encode(*self.inputs(state, requests))

    def retrieve(self, requests: list[RecRequest], widths_for: Any) -> list[list[str]]:
        """The ads the generative beams alone retrieve for each request, best
        log-probability first, whatever the ranking mode (what a catalogue too large to
        score whole would leave the value heads; no value call, no exploration, nothing
        counted). ``widths_for`` as in :meth:`run`."""
        state, widths, states = self._encode(requests, widths_for)
        man, rt, trie = state.model.manifest, state.model.runtime, state.trie
        beams = beam_search(lambda req, prefix: rt.step(states, req, prefix), trie,
                            len(requests), widths)
        out: list[list[str]] = [[] for _ in requests]
        for b, row, _lp in sorted(zip(beams.request.tolist(), beams.rows.tolist(),
                                     beams.logprob.tolist(), strict=True),
                                 key=lambda x: (x[0], -x[2])):
            out[b].append(man.ad_ids[row])
        return out

    def run(self, requests: list[RecRequest], widths_for: Any) -> list[RecResult]:
        """``widths_for(levels, k) -> widths``; one list for the whole batch."""
        state, widths, states = self._encode(requests, widths_for)
        man, rt, trie = state.model.manifest, state.model.runtime, state.trie
        B = len(requests)

        def step(req: np.ndarray, prefix: np.ndarray) -> np.ndarray:
            return rt.step(states, req, prefix)

        whole = 0 < trie.n_ads <= self.score_catalogue_max
        M.RANKING_MODE.labels("catalogue" if whole else "beams").inc(B)
        results = [RecResult(state.model.version, [] if whole else list(widths))
                   for _ in requests]
        if any(r.organic_k > 0 for r in requests):
            for res, items in zip(results, self.organic(state, states, requests), strict=True):
                res.organic = items
        if whole:       # every servable ad is a candidate of every request
            n = trie.n_ads
            req = np.repeat(np.arange(B, dtype=np.int64), n)
            beams = Beams(req, np.tile(man.ids[trie.rows], (B, 1)), np.tile(trie.rows, B),
                          np.zeros(B * n))
            candidates = np.ascontiguousarray(
                np.broadcast_to(man.ids[trie.rows], (B, n, man.id_len)))
            col = np.tile(np.arange(n, dtype=np.int64), B)
        else:
            beams = beam_search(step, trie, B, widths)
            if beams.request.shape[0] == 0:
                return results
            candidates, col = pad_candidates(beams, B)
        ad_ids = [man.ad_ids[r] for r in beams.rows]
        start = 0
        for b, n in enumerate(np.bincount(beams.request, minlength=B).tolist()):
            results[b].candidates = n
            results[b].candidate_ids = ad_ids[start:start + n]   # beams are request-major
            start += n
        seen = self._counts(requests, beams.request, ad_ids)
        exposure = np.zeros(candidates.shape[:2], np.float32)
        exposure[beams.request, col] = seen
        pctr_all, pcvr_all = rt.value(states, candidates, exposure=exposure)
        pctr = pctr_all[beams.request, col].astype(np.float64)
        pcvr = pcvr_all[beams.request, col].astype(np.float64)
        bid, kind, recs = self.catalog.bids(ad_ids)
        ev = expected_value(bid, kind, pctr, pcvr)
        allowed = np.fromiter((is_servable(a) for a in recs), bool, count=len(recs))
        slates = rank_slates(beams, ev, [r.k for r in requests], allowed)
        kept = rank_slates(beams, ev, [self.log_beams] * B, allowed & np.isfinite(ev)) \
            if self.log_beams else []
        if whole:   # log-probs of the ads that are shown or logged only (trie-scored)
            need = np.unique(np.concatenate([*slates, *kept, np.zeros(0, np.int64)]))
            if need.size:
                beams.logprob[need] = sequence_logprob(step, trie, beams.request[need],
                                                       beams.ids[need])
        if self.log_beams:
            self._keep_beams(beams, kept, ev, ad_ids, bid, kind, results)
        for b, idx in enumerate(slates):
            for pos, i in enumerate(idx):
                rec = recs[i]
                assert rec is not None
                results[b].ads.append(RankedAd(
                    ad_id=ad_ids[i], semantic_id=[int(x) for x in beams.ids[i]], position=pos,
                    score=float(beams.logprob[i]), expected_value=float(ev[i]),
                    pctr=float(pctr[i]), pcvr=float(pcvr[i]), bid=float(rec.bid),
                    bid_type=rec.bid_type, exposure=float(seen[i])))
        if self.explorer is not None and self.explorer.enabled:
            self._explore(state, states, [beams.rows[idx].tolist() for idx in slates], results,
                          requests)
        if self.exposure is not None:
            for r, res in zip(requests, results, strict=True):
                self.exposure.record(r.user_id, [a.ad_id for a in res.ads])
        return results

    def _counts(self, requests: list[RecRequest], request_of: np.ndarray,
                ad_ids: list[str]) -> np.ndarray:
        """The user's earlier impressions of each ad [N] (``request_of`` [N] the index of
        each ad's request, request-major); zeros without a counter."""
        out = np.zeros(len(ad_ids), np.float32)
        if self.exposure is None or not ad_ids:
            return out
        bounds = np.searchsorted(request_of, np.arange(len(requests) + 1))
        for b, r in enumerate(requests):
            lo, hi = int(bounds[b]), int(bounds[b + 1])
            if hi > lo:
                out[lo:hi] = self.exposure.counts(r.user_id, ad_ids[lo:hi])
        return out

    def organic(self, state: ServingState, states: UserStates,
                requests: list[RecRequest]) -> list[list[RankedOrganic]]:
        """The organic items of each request (empty for ``organic_k`` = 0): a beam search
        over the snapshot's organic trie for the mixed-feed requests only, on their rows
        of ``states``. Request ``b`` searches with width ``max(organic_beam, organic_k)``
        at every level (``organic_beam`` as :attr:`organic_width` scales it under load),
        whatever else is in the batch, and keeps the best ``organic_k``
        by log-probability among the final beams that are not among its recent organic
        items; when fewer than ``organic_k`` are left, its best recent ones fill the
        rest, so the answer has ``organic_k`` items whenever the search found them (a
        width that grew with the recent items cost the ads' beams their width under
        load). Without organic items in the snapshot: empty lists, counted."""
        out: list[list[RankedOrganic]] = [[] for _ in requests]
        want = [b for b, r in enumerate(requests) if r.organic_k > 0]
        if not want:
            return out
        model = state.model
        trie = state.organic_trie
        if trie is None:
            M.ORGANIC_UNAVAILABLE.inc(len(want))
            return out
        started = time.perf_counter()
        man, rt, row_of = model.manifest, model.runtime, model.organic_row_of
        sub = np.array(want, np.int64)
        seen = [{row_of[i] for i in requests[b].recent_organic if i in row_of} for b in want]
        base = self.organic_width(self.organic_beam)
        caps = np.array([max(base, requests[b].organic_k) for b in want], np.int64)

        def step(req: np.ndarray, prefix: np.ndarray) -> np.ndarray:
            return rt.step(states, sub[req], prefix)

        beams = beam_search(step, trie, len(want), [int(caps.max())] * man.id_len,
                            caps=caps)
        order = np.lexsort((-beams.logprob, beams.request))
        req_sorted = beams.request[order]
        served = 0
        for j, b in enumerate(want):
            lo, hi = np.searchsorted(req_sorted, [j, j + 1])
            found = [i for i in order[lo:hi].tolist() if np.isfinite(beams.logprob[i])]
            fresh = [i for i in found if int(beams.rows[i]) not in seen[j]]
            again = [i for i in found if int(beams.rows[i]) in seen[j]]
            picked = (fresh + again)[:requests[b].organic_k]
            items = [RankedOrganic(
                item_id=man.organic_ids[int(beams.rows[i])],
                semantic_id=[int(x) for x in beams.ids[i]], position=n,
                score=float(beams.logprob[i])) for n, i in enumerate(picked)]
            out[b] = items
            served += len(items)
        M.ORGANIC_SERVED.inc(served)
        M.ORGANIC_SECONDS.observe(time.perf_counter() - started)
        return out

    def _keep_beams(self, beams: Beams, ranked: list[np.ndarray], ev: np.ndarray,
                    ad_ids: list[str], bid: np.ndarray, kind: np.ndarray,
                    results: list[RecResult]) -> None:
        """Each request's servable final beams in ranking order (``ranked``: at most
        ``log_beams`` with a finite value each; one with a non-finite log-prob is left
        out: a log record holds finite numbers only)."""
        for b, idx in enumerate(ranked):
            idx = idx[np.isfinite(beams.logprob[idx])]
            results[b].beams = [BeamCandidate(
                ad_id=ad_ids[i], semantic_id=[int(x) for x in beams.ids[i]],
                logprob=float(beams.logprob[i]), expected_value=float(ev[i]),
                bid=float(bid[i]), bid_type=BID_TYPES[int(kind[i])])  # type: ignore[arg-type]
                for i in idx.tolist()]

    def _explore(self, state: ServingState, states: UserStates, slates: list[list[int]],
                 results: list[RecResult], requests: list[RecRequest]) -> None:
        """Apply the exploration rule to the ranked slates: propensities on every item,
        and the drawn ads (scored and valued by the model like ranked ones) in the last
        slots they take."""
        assert self.explorer is not None
        man, rt, trie = state.model.manifest, state.model.runtime, state.trie
        plans = self.explorer.plan(state, slates)
        for res, plan in zip(results, plans, strict=True):
            for ad, p in zip(res.ads, plan.propensities, strict=True):
                ad.propensity = p
        drawn = [(b, plan.drawn) for b, plan in enumerate(plans) if plan.drawn is not None]
        if not drawn:
            return
        req = np.array([b for b, _ in drawn], np.int64)
        rows = np.array([r for _, r in drawn], np.int64)
        ids = man.ids[rows]

        def step(beam_req: np.ndarray, prefix: np.ndarray) -> np.ndarray:
            return rt.step(states, beam_req, prefix)

        logprob = sequence_logprob(step, trie, req, ids)
        drawn_ids = [man.ad_ids[r] for r in rows.tolist()]
        seen = self._counts(requests, req, drawn_ids)
        pctr_d, pcvr_d = rt.value(states, ids[:, None, :], rows=req, exposure=seen[:, None])
        bid, kind, recs = self.catalog.bids(drawn_ids)
        ev = expected_value(bid, kind, pctr_d[:, 0].astype(np.float64),
                            pcvr_d[:, 0].astype(np.float64))
        for j, (b, _row) in enumerate(drawn):
            rec, last = recs[j], results[b].ads[-1]
            if rec is None:     # deleted since the draw: as if no ad had been eligible
                last.propensity = 1.0
                continue
            M.EXPLORED.inc()
            M.EXPLORE_VALUE.labels("ranked").inc(max(0.0, last.expected_value))
            M.EXPLORE_VALUE.labels("explored").inc(max(0.0, float(ev[j])))
            results[b].ads[-1] = RankedAd(
                ad_id=drawn_ids[j], semantic_id=[int(x) for x in ids[j]],
                position=last.position, score=float(logprob[j]),
                expected_value=float(ev[j]), pctr=float(pctr_d[j, 0]),
                pcvr=float(pcvr_d[j, 0]), bid=float(rec.bid), bid_type=rec.bid_type,
                propensity=last.propensity, explored=True, exposure=float(seen[j]))
            log.debug("serve.explored", ad_id=drawn_ids[j], position=last.position,
                      eligible=plans[b].eligible, propensity=last.propensity)
