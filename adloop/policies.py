"""Learned policies for the closed-loop comparison, all behind one in-process contract.

Each policy has ``recommend_batch(requests) -> list[ServedSlate]`` and
``learn(lists)`` (a no-op for the fixed ones). The harness in
:mod:`adloop.evaluation` feeds every policy the same simulated traffic.

* :class:`GenerativePolicy`: the generative recommender served by the server's own
  code in-process (:class:`adloop.inprocess.InProcessServer`: exported ONNX snapshot,
  trie-constrained beam search over servable ads, value-head ranking by expected
  value), optionally updated online by :class:`learner.rspo_step.OnlineLearner` —
  ``rspo`` (RSPO + VSL anchor + value heads), ``vsl_only`` (the same without the RSPO
  term) or ``frozen`` (no updates). Every ``publish_every`` updates (1: every update,
  the default) the model is exported and served and the reference policy refreshed to
  it, as the live learner does at each published snapshot. Serving each update matters
  as much as the update: the value head's linear terms, refitted on every update, only
  earn once served (docs/decisions.md). Its slates carry the engine's final beams
  (``ServedSlate.beams``), which the harness puts into the feedback as the live server
  logs them and the joiner copies them, so HEPO (``RSPOConfig.hepo_weight``) trains on
  the same sibling groups as ``adloop learn``.
* :class:`DLRMPolicy`: the DLRM-style baseline: embeddings of user, ad, advertiser,
  industry, category, bid type, context and the recent organic topics, pairwise dot
  interactions, an MLP to pCTR and pCVR logits, pretrained on the logging phase
  (held-out early stopping and a learning-rate grid on a time split of the logs) and
  trained online with BCE on every list; ranks *all* servable ads by expected value with the bid
  (cpc bid·pCTR, cpa bid·pCTR·pCVR, cpm bid/1000). ``priors=True`` adds the same
  empirical-Bayes priors per (industry, bid type) as the generative value head's
  (off by default: it scored lower on both seeds measured, see docs/rspo.md).
* :class:`BidOnlyPolicy`: every servable ad ranked by bid × the logged base rates.
* :class:`PopularityPolicy`: every servable ad ranked by its smoothed realized
  revenue per impression so far (the same slate for everyone), seeded with the logs.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from adloop.inprocess import InProcessServer
from learner.beam import IdTrie
from learner.guard import Catalogue
from learner.model import GenerativeRecommender, shrunk_rate_logits
from learner.rspo import RSPOConfig
from learner.rspo_step import OnlineLearner, lists_to_batch
from learner.tokenizer import TokenizerError, UASIDTokenizer
from learner.topic_match import ad_category, fill_topic_match
from server.beam import BID_TYPES
from server.engine import RecRequest
from server.exposure import ExposureCounter
from streams.features import organic_topic
from streams.schemas import Feedback
from traffic.driver import ServedAd, ServedOrganic, ServedSlate
from traffic.world import Request, World

RECALL_K = 10
"""Depth of the retrieval recalls (``value_recall_at_10``, ``generator_recall_at_10``)."""


class GenerativePolicy:
    """The generative recommender, served as ``adloop serve`` serves it (see module doc)."""

    def __init__(self, name: str, world: World, model: GenerativeRecommender,
                 tok: UASIDTokenizer, update: str = "none", beam_width: int = 32,
                 lr: float = 5e-4, publish_every: int = 1, seed: int = 0,
                 explore: float = 0.0, explore_max_shown: int = 50,
                 rspo: RSPOConfig | None = None, catalogue_beams: bool = True,
                 work_dir: Path | None = None, threads: int = 0,
                 reach_every: int = 8, trie_logprobs: bool = True,
                 heldout: dict[str, float] | None = None,
                 score_catalogue_max: int | None = None) -> None:
        if update not in ("none", "rspo", "vsl_only"):
            raise ValueError(f"update must be none, rspo or vsl_only, got {update!r}")
        self.name = name
        self.world = world
        self.model = copy.deepcopy(model)
        self.tok = copy.deepcopy(tok)
        self.update = update
        self.beam_width = beam_width
        self.catalogue_beams = catalogue_beams
        self.publish_every = publish_every
        cfg = rspo or RSPOConfig()
        if update == "vsl_only":
            cfg = dataclasses.replace(cfg, rspo_weight=0.0)
        self.learner = (OnlineLearner(self.model, cfg, lr=lr) if update != "none" else None)
        self.coverage: list[float] = []
        """Per request: share of servable ads among the final beam candidates."""
        self.trie_logprobs = trie_logprobs
        self._trie_key: tuple[str, ...] = ()
        self._trie: IdTrie | None = None
        self.reach_every = reach_every
        self.oracle_reach: list[float] = []
        """Every ``reach_every``-th request: share of the observable oracle's slate among
        the final beam candidates (what the value ranking could have picked)."""
        self.value_recall: list[float] = []
        """Every ``reach_every``-th request: share of the value model's top
        :data:`RECALL_K` (the whole servable catalogue scored) that the generative beams
        alone retrieve at the served widths."""
        self._retrieved: dict[str, list[str]] = {}
        """The beams' ads of those requests, best log-probability first, until their
        feedback arrives."""
        self.generator_hits = 0
        self.generator_positives = 0
        self.generator_servable: list[int] = []
        """Clicked ads of those requests among the beams' top :data:`RECALL_K` by
        log-probability; their clicked ads; the servable ads when each was served."""
        self.explored = 0
        self._predicted: dict[str, dict[str, tuple[float, float]]] = {}
        self.calibration_pairs: list[tuple[float, float, float, float]] = []
        """(p̂CTR, clicked, p̂CVR, converted) of every shown item once its feedback is in."""
        self._heldout = {k: v for k, v in (heldout or {}).items() if k.startswith("value_")}
        torch.manual_seed(seed)
        self.server = InProcessServer(work_dir, threads=threads, explore=explore,
                                      explore_max_shown=explore_max_shown, seed=seed,
                                      score_catalogue_max=score_catalogue_max)
        self.server.sync_catalog(self.world.ad_records())
        self._place_new_ads()
        self.server.publish(self.model, self.tok)

    @property
    def version(self) -> int:
        """Snapshots published (the pretrained one is 1)."""
        return self.server.published

    # -- serving ---------------------------------------------------------------------------
    def sync_world(self) -> None:
        """Bring the server up to the world's ads: the catalogue, an id for every ad the
        world has created (the learner's online placement) and the servable ids."""
        self.server.sync_catalog(self.world.ad_records())
        self._place_new_ads()
        self.server.update_ids(self.tok)

    def _place_new_ads(self) -> None:
        """Give every ad the world has created an id (the learner's online placement)."""
        new = [a.record for a in self.world.ads.values() if a.ad_id not in self.tok]
        if not new:
            return
        try:
            self.tok.add_ads(new)
        except TokenizerError:
            for ad in new:
                try:
                    self.tok.add_ads([ad])
                except TokenizerError:
                    continue

    def widths(self) -> list[int]:
        state = self.server.manager.state
        id_len = state.model.manifest.id_len if state is not None else 1
        if self.catalogue_beams:
            return level_widths(self.beam_width, self.server.level0_codes(), id_len)
        return [min(self.beam_width, 16 * 2**t) for t in range(id_len)]

    @staticmethod
    def _rec_request(r: Request) -> RecRequest:
        """The server's request for a harness request (history most recent first)."""
        return RecRequest(r.user_id, dict(r.context), list(reversed(r.recent_ad_ids)), r.k,
                          list(r.recent_organic), organic_k=r.organic_k)

    def recommend_batch(self, requests: Sequence[Request]) -> list[ServedSlate]:
        self.sync_world()
        widths = self.widths()
        results = self.server.rank(
            [self._rec_request(r) for r in requests],
            lambda levels, k: widths)
        servable = max(1, self.server.servable())
        out = []
        sampled: list[tuple[Request, list[str]]] = []
        for r, res in zip(requests, results, strict=True):
            self.coverage.append(res.candidates / servable)
            if self.reach_every and len(self.coverage) % self.reach_every == 0:
                best = self.world.observable_oracle_slate(r)
                cands = set(res.candidate_ids)
                self.oracle_reach.append(sum(a in cands for a in best) / max(1, len(best)))
                sampled.append((r, [b.ad_id for b in res.beams[:RECALL_K]]))
            self._predicted[r.request_id] = {a.ad_id: (a.pctr, a.pcvr) for a in res.ads}
            slate = [ServedAd(a.ad_id, a.position, score=a.score,
                              expected_value=a.expected_value, semantic_id=a.semantic_id,
                              exposure=a.exposure)
                     for a in res.ads]
            self.explored += any(a.explored for a in res.ads)
            organic = [ServedOrganic(o.item_id, o.position, o.score, o.semantic_id)
                       for o in res.organic]
            out.append(ServedSlate(r.request_id, f"{self.name}-{res.model_version}", slate,
                                   beam_widths=widths, beams=res.beams, organic=organic))
        if sampled:
            self._measure_retrieval(sampled, widths, servable)
        return out

    def _measure_retrieval(self, sampled: Sequence[tuple[Request, list[str]]],
                           widths: list[int], servable: int) -> None:
        """Run the beams alone for the sampled requests: how much of the value model's
        top :data:`RECALL_K` they hold (``value_recall``), and keep their best
        :data:`RECALL_K` by log-probability for :meth:`_score_retrieval`."""
        retrieved = self.server.retrieve(
            [self._rec_request(r) for r, _ in sampled], lambda levels, k: widths)
        for (r, top), ads in zip(sampled, retrieved, strict=True):
            if top:
                got = set(ads)
                self.value_recall.append(sum(a in got for a in top) / len(top))
            self._retrieved[r.request_id] = ads[:RECALL_K]
            self.generator_servable.append(servable)

    def _score_retrieval(self, lists: Sequence[Feedback]) -> None:
        """Clicked ads of the sampled requests among the beams' best :data:`RECALL_K`."""
        for fb in lists:
            top = self._retrieved.pop(fb.request_id, None)
            if top is None:
                continue
            clicked = {it.ad_id for it in fb.items if it.clicked or it.converted}
            self.generator_positives += len(clicked)
            self.generator_hits += len(clicked & set(top))

    def calibration(self) -> dict[str, float]:
        """ECE of the value model's pCTR (shown items) and pCVR (clicked items), mean
        candidate coverage, share of requests with an exploration slot, how much of
        the observable oracle's slate the final beams held, and on the sampled requests
        (every ``reach_every``-th) the beams' retrieval alone: ``value_recall_at_10``
        (share of the value model's top 10 they hold), ``generator_recall_at_10`` (share
        of clicked ads among their best 10 by log-probability) and that over chance
        (10 / servable ads)."""
        pairs = self.calibration_pairs
        ctr, _ = expected_calibration_error([a for a, _, _, _ in pairs],
                                            [b for _, b, _, _ in pairs])
        clicked = [(c, d) for _, b, c, d in pairs if b > 0]
        cvr, _ = expected_calibration_error([c for c, _ in clicked], [d for _, d in clicked])
        return {"ece_ctr": ctr, "ece_cvr": cvr, "mean_coverage": float(np.mean(self.coverage))
                if self.coverage else math.nan, "explored_share": self.explored
                / max(1, len(self.coverage)),
                "observable_oracle_reach": float(np.mean(self.oracle_reach))
                if self.oracle_reach else math.nan, **self._recalls()}

    def _recalls(self) -> dict[str, float]:
        value = float(np.mean(self.value_recall)) if self.value_recall else math.nan
        gen = (self.generator_hits / self.generator_positives if self.generator_positives
               else math.nan)
        chance = (RECALL_K / float(np.mean(self.generator_servable))
                  if self.generator_servable else math.nan)
        return {"value_recall_at_10": value, "generator_recall_at_10": gen,
                "generator_recall_at_10_over_chance": gen / min(1.0, chance)
                if not math.isnan(chance) and chance > 0 else math.nan}

    def heldout_metrics(self) -> dict[str, float]:
        """The value model's log-loss of pCTR (shown items) and pCVR (clicked items) on
        the held-out (latest) logged requests, as pretraining measured it
        (``value_logloss_ctr``, ``value_logloss_cvr``, with its ECEs), and the same
        log-losses of the served predictions against what followed (``_online``: each
        item predicted before its feedback was known)."""
        out = dict(self._heldout)
        pairs = self.calibration_pairs
        if pairs:
            arr = np.clip(np.asarray(pairs, dtype=float), 1e-6, 1 - 1e-6)
            clk = np.asarray([b for _, b, _, _ in pairs]) > 0
            out["value_logloss_ctr_online"] = _logloss(arr[:, 0], arr[:, 1])
            out["value_logloss_cvr_online"] = (_logloss(arr[clk, 2], arr[clk, 3])
                                               if clk.any() else math.nan)
        return out

    # -- learning --------------------------------------------------------------------------
    def _learner_trie(self) -> IdTrie | None:
        """The servable ids as the learner's trie (None with ``trie_logprobs`` off): the
        items' log-probs are taken under the constraint the server scored them with."""
        if not self.trie_logprobs:
            return None
        key = tuple(sorted(a.ad_id for a in self.world.servable_ads() if a.ad_id in self.tok))
        if key != self._trie_key:
            cat = Catalogue.of({a.ad_id: a.record for a in self.world.ads.values()}, self.tok)
            self._trie, self._trie_key = (cat.trie if cat is not None else None), key
        return self._trie

    def learn(self, lists: Sequence[Feedback]) -> dict[str, float]:
        self._score_retrieval(lists)
        for fb in lists:
            predicted = self._predicted.pop(fb.request_id, {})
            for it in fb.items:
                if it.ad_id in predicted:
                    p_ctr, p_cvr = predicted[it.ad_id]
                    self.calibration_pairs.append((p_ctr, float(it.clicked or it.converted),
                                                   p_cvr, float(it.converted)))
        if self.learner is None or not lists:
            return {}
        fill_topic_match(self.model, self.tok, lists,
                         (a.record for a in self.world.ads.values()))
        metrics = self.learner.update(lists_to_batch(
            [(fb, 1.0) for fb in lists], self.tok, self.model, self._learner_trie(),
            beams=self.learner.reads_beams, organic_dwell_s=self.learner.organic_dwell_s))
        if self.learner.steps % self.publish_every == 0:
            self.learner.refresh_reference()
            self.server.publish(self.model, self.tok)
        return metrics


def expected_calibration_error(p: Sequence[float], y: Sequence[float],
                               bins: int = 10) -> tuple[float, list[tuple[float, float, int]]]:
    """ECE of probabilities ``p`` against outcomes ``y`` over equal-mass bins, and the
    reliability curve as (mean predicted, observed rate, count) per bin."""
    if not p:
        return math.nan, []
    order = np.argsort(np.asarray(p, dtype=float), kind="stable")
    pa, ya = np.asarray(p, dtype=float)[order], np.asarray(y, dtype=float)[order]
    curve = []
    ece = 0.0
    for chunk in np.array_split(np.arange(len(pa)), min(bins, len(pa))):
        if not len(chunk):
            continue
        mp, my = float(pa[chunk].mean()), float(ya[chunk].mean())
        curve.append((mp, my, len(chunk)))
        ece += len(chunk) / len(pa) * abs(mp - my)
    return ece, curve


def _logloss(p: np.ndarray, y: np.ndarray) -> float:
    """Mean binary log-loss of probabilities ``p`` (clipped away from 0 and 1)."""
    y = np.round(y)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def level_widths(beam_width: int, level0_codes: int, id_len: int) -> list[int]:
    """Beam width per id level: ``beam_width`` at every level, except that level 0 keeps
    all ``level0_codes`` (the distinct level-0 codes of the servable ads) when there are
    at most twice ``beam_width`` of them (a small catalogue is then reachable whole; the
    width never caps level 0 alone)."""
    w0 = level0_codes if level0_codes <= 2 * beam_width else beam_width
    return [max(1, w0)] + [beam_width] * (id_len - 1)


def _bucket(text: str, n: int) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") % n


def _logit(p: float) -> float:
    p = min(max(p, 1e-4), 1.0 - 1e-4)
    return math.log(p / (1.0 - p))


def organic_topics(items: Sequence[str], n: int) -> list[str]:
    """Topic tokens of the ``n`` most recent organic items (ids ``<topic>#<n>``)."""
    return [organic_topic(i) for i in list(items)[-n:]][::-1]


class _DLRM(nn.Module):
    """Sparse features (+ a bag of organic topics) -> embeddings -> pairwise dot
    interactions + MLP -> 2 logits."""

    def __init__(self, n_fields: int, buckets: int, d: int = 16) -> None:
        super().__init__()
        self.emb = nn.Embedding((n_fields + 1) * buckets, d)
        nn.init.normal_(self.emb.weight, std=0.05)
        self.buckets = buckets
        self.n_fields = n_fields
        f = n_fields + 1                                             # + the organic bag
        n_pairs = f * (f - 1) // 2
        self.mlp = nn.Sequential(nn.Linear(f * d + n_pairs, 64), nn.ReLU(),
                                 nn.Linear(64, 2))
        iu = torch.triu_indices(f, f, 1)
        self.iu0: Tensor = iu[0]
        self.iu1: Tensor = iu[1]

    def forward(self, feats: Tensor, bag: Tensor, bag_mask: Tensor) -> Tensor:
        offs = torch.arange(feats.shape[1]) * self.buckets           # feats [N, F]
        e = self.emb(feats + offs)                                   # [N, F, d]
        eb = self.emb(bag + self.n_fields * self.buckets)            # [N, L, d]
        w = bag_mask / bag_mask.sum(1, keepdim=True).clamp_min(1.0)
        e = torch.cat([e, (eb * w.unsqueeze(-1)).sum(1, keepdim=True)], 1)
        inter = torch.einsum("nfd,ngd->nfg", e, e)[:, self.iu0, self.iu1]
        return self.mlp(torch.cat([e.flatten(1), inter], 1))         # [N, 2]


class DLRMPolicy:
    """pCTR/pCVR model × bid over all servable ads (see module docstring).

    Features: user, ad, advertiser, industry, ad category, bid type, every context key
    (device, placement, hour, region, age band, declared interest), the user's earlier
    impressions n of the ad as a bucket (⌊log2(1 + n)⌋, at most 5; counted as the server
    counts them, :class:`server.exposure.ExposureCounter`) and a mean-pooled bag of the
    user's recent organic topics. :meth:`pretrain` fits it on the logging
    phase (output biases at the logged base rates, or the prior table of
    :meth:`fit_priors`; then minibatch epochs until the log-loss on the logs' last 20 %
    by time stops improving, for each Adam rate of a small grid: the rate and epoch
    with the lowest held-out log-loss win; nothing is tuned on the evaluation
    traffic), then :meth:`learn` trains on every feedback list the harness hands it,
    at a gentler rate.
    """

    FIELDS = ("user", "ad", "advertiser", "industry", "category", "bid_type", "device",
              "placement", "hour", "region", "age", "interest", "exposure")
    CONTEXT = FIELDS[6:-1]
    ORGANIC = 20

    def __init__(self, world: World, buckets: int = 4096, lr: float = 3e-3,
                 seed: int = 0, online_lr_factor: float = 0.3, online_batch: int = 16,
                 priors: bool = False) -> None:
        torch.manual_seed(seed)
        self.name = "dlrm"
        self.world = world
        self.buckets = buckets
        self.net = _DLRM(len(self.FIELDS), buckets)
        self.opt = torch.optim.Adam(self.net.parameters(), lr=lr)
        self.seed = seed
        self.lr = lr
        self.online_lr_factor = online_lr_factor
        """Online Adam rate = this × the rate :meth:`pretrain` chose (steps at the full
        rate on its own served slates drove its pCTR/pCVR far below the truth: 90 vs
        155 RPM on one seed)."""
        self.online_batch = online_batch
        """Feedback lists per online step: every list is learnt once, in arrival order."""
        self.heldout: dict[str, float] = {}
        self._ad_cache: dict[str, list[int]] = {}
        self.prior = torch.zeros(2, 1, len(BID_TYPES))
        """Empirical-Bayes logits of CTR and CVR per (industry, bid type), from the logs
        (the same shrinkage as the generative value head's priors): [2, industries, 3]."""
        self.industries: dict[str, int] = {}
        """Industry -> row of :attr:`prior` (0: an industry the logs never showed)."""
        self.priors = priors
        """Fit :attr:`prior` at pretraining (else it stays 0 and the output biases start
        at the logged base rates)."""
        self.exposure = ExposureCounter()
        """What it served each user (the logs first): the fatigue feature."""

    AD_FIELDS = ("ad", "advertiser", "industry", "category", "bid_type")

    def _ad_buckets(self, ad_ids: Sequence[str]) -> np.ndarray:
        """Hashed ad-side features [A, 5] (fixed per ad, so computed once per ad)."""
        out = np.empty((len(ad_ids), len(self.AD_FIELDS)), np.int64)
        for i, a in enumerate(ad_ids):
            row = self._ad_cache.get(a)
            if row is None:
                rec = self.world.ads[a].record
                vals = (a, rec.advertiser_id, rec.industry, ad_category(rec.description),
                        rec.bid_type)
                row = [_bucket(f"{f}={v}", self.buckets)
                       for f, v in zip(self.AD_FIELDS, vals, strict=True)]
                self._ad_cache[a] = row
            out[i] = row
        return out

    def _prior_of(self, ad_ids: Sequence[str]) -> Tensor:
        """Prior logits [A, 2] (CTR, CVR) of ``ad_ids``."""
        recs = [self.world.ads[a].record for a in ad_ids]
        ind = torch.tensor([self.industries.get(r.industry, 0) for r in recs], dtype=torch.long)
        bt = torch.tensor([BID_TYPES.index(r.bid_type) for r in recs], dtype=torch.long)
        return self.prior[:, ind, bt].T

    def fit_priors(self, lists: Sequence[Feedback]) -> dict[str, float]:
        """The prior table from the logs' shown items."""
        rows, groups, clicked, converted = [], [], [], []
        for fb in lists:
            for it in fb.items:
                ad = self.world.ads.get(it.ad_id)
                if ad is None:
                    continue
                ind = self.industries.setdefault(ad.record.industry, len(self.industries) + 1)
                rows.append(ind)
                groups.append(BID_TYPES.index(ad.record.bid_type))
                clicked.append(float(it.clicked or it.converted))
                converted.append(float(it.converted))
        n_rows = len(self.industries) + 1
        row_t, group_t = torch.tensor(rows, dtype=torch.long), torch.tensor(groups,
                                                                            dtype=torch.long)
        clk, cv = torch.tensor(clicked), torch.tensor(converted)
        ctr_logit, ctr = shrunk_rate_logits(clk, torch.ones_like(clk), row_t, group_t, n_rows,
                                            len(BID_TYPES), 200.0)
        cvr_logit, cvr = shrunk_rate_logits(cv * clk, clk, row_t, group_t, n_rows,
                                            len(BID_TYPES), 20.0)
        self.prior = torch.stack([ctr_logit, cvr_logit])
        return {"ctr": ctr, "cvr": cvr}

    def _feats(self, user: str, context: dict[str, str], organic: Sequence[str],
               ad_ids: Sequence[str], exposure: Sequence[float] | np.ndarray,
               ad_rows: np.ndarray | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Feature buckets [A, F] (in :attr:`FIELDS` order), the organic bag and its mask
        [A, ORGANIC] for one request and ``ad_ids`` (``exposure``: the user's earlier
        impressions of each)."""
        ctx = [_bucket(f"{f}={context.get(f, '')}", self.buckets) for f in self.CONTEXT]
        n = len(ad_ids)
        rows = np.empty((n, len(self.FIELDS)), np.int64)
        rows[:, 0] = _bucket(f"user={user}", self.buckets)
        rows[:, 1:1 + len(self.AD_FIELDS)] = (self._ad_buckets(ad_ids) if ad_rows is None
                                              else ad_rows)
        rows[:, 1 + len(self.AD_FIELDS):-1] = ctx
        levels = np.minimum(np.log2(1.0 + np.asarray(exposure, dtype=float)), 5).astype(int)
        exp_rows = [_bucket(f"exposure={v}", self.buckets) for v in range(6)]
        rows[:, -1] = np.asarray(exp_rows, np.int64)[levels] if n else 0
        topics = organic_topics(organic, self.ORGANIC)
        bag = np.zeros(self.ORGANIC, np.int64)
        mask = np.zeros(self.ORGANIC, np.float32)
        for i, t in enumerate(topics):
            bag[i], mask[i] = _bucket(f"organic={t}", self.buckets), 1.0
        return (torch.from_numpy(rows), torch.from_numpy(bag).expand(n, -1),
                torch.from_numpy(mask).expand(n, -1))

    @torch.no_grad()
    def recommend_batch(self, requests: Sequence[Request]) -> list[ServedSlate]:
        servable = sorted(a.ad_id for a in self.world.servable_ads())
        if not servable:
            return [ServedSlate(r.request_id, "dlrm", []) for r in requests]
        ad_rows = self._ad_buckets(servable)
        seen = [self.exposure.counts(r.user_id, servable) for r in requests]
        parts = [self._feats(r.user_id, r.context, r.recent_organic, servable, n, ad_rows)
                 for r, n in zip(requests, seen, strict=True)]
        A = len(servable)
        prior = self._prior_of(servable).repeat(len(requests), 1)
        p = torch.sigmoid(self.net(*(torch.cat(x) for x in zip(*parts, strict=True))) + prior)
        sims = [self.world.ads[a] for a in servable]
        out = []
        for b, r in enumerate(requests):
            evs = World.expected_values(sims, p[b * A:(b + 1) * A, 0].tolist(),
                                        p[b * A:(b + 1) * A, 1].tolist()).tolist()
            order = sorted(range(A), key=lambda i: (-evs[i], servable[i]))[: r.k]
            out.append(ServedSlate(r.request_id, "dlrm", [
                ServedAd(servable[i], pos, score=evs[i], expected_value=evs[i],
                         exposure=float(seen[b][i]))
                for pos, i in enumerate(order)]))
            self.exposure.record(r.user_id, [servable[i] for i in order])
        return out

    def _tensors(self, lists: Sequence[Feedback]) -> tuple[Tensor, ...] | None:
        feats, bags, masks, priors, clicked, converted = [], [], [], [], [], []
        for fb in lists:
            shown = [it for it in fb.items if it.ad_id in self.world.ads]
            ids = [it.ad_id for it in shown]
            if not ids:
                continue
            f, b, m = self._feats(fb.user_id, fb.context, fb.recent_organic, ids,
                                  [it.exposure for it in shown])
            feats.append(f)
            bags.append(b)
            masks.append(m)
            priors.append(self._prior_of(ids))
            by_id = {it.ad_id: it for it in fb.items}
            clicked += [float(by_id[a].clicked or by_id[a].converted) for a in ids]
            converted += [float(by_id[a].converted) for a in ids]
        if not feats:
            return None
        return (torch.cat(feats), torch.cat(bags), torch.cat(masks), torch.cat(priors),
                torch.tensor(clicked), torch.tensor(converted))

    def _step(self, t: tuple[Tensor, ...]) -> float:
        x, bag, mask, prior, y_click, y_conv = t
        logits = self.net(x, bag, mask) + prior
        bce = nn.functional.binary_cross_entropy_with_logits
        loss = bce(logits[:, 0], y_click)
        if bool((y_click > 0).any()):    # pCVR is P(conversion | click)
            loss = loss + bce(logits[y_click > 0, 1], y_conv[y_click > 0])
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        return float(loss.detach())

    def _heldout_loss(self, blocks: Sequence[tuple[Tensor, ...]]) -> tuple[float, float]:
        """Mean log-loss of pCTR (every shown item) and pCVR (clicked items) on ``blocks``."""
        bce = nn.functional.binary_cross_entropy_with_logits
        ctr_sum = cvr_sum = 0.0
        n_ctr = n_cvr = 0
        with torch.no_grad():
            for x, bag, mask, prior, y_click, y_conv in blocks:
                logits = self.net(x, bag, mask) + prior
                ctr_sum += float(bce(logits[:, 0], y_click, reduction="sum"))
                n_ctr += len(y_click)
                m = y_click > 0
                cvr_sum += float(bce(logits[m, 1], y_conv[m], reduction="sum"))
                n_cvr += int(m.sum())
        return (ctr_sum / n_ctr if n_ctr else math.nan, cvr_sum / n_cvr if n_cvr else math.nan)

    def _init_bias(self, lists: Sequence[Feedback]) -> dict[str, float]:
        """Output biases at the base rates of ``lists`` (or the prior table's)."""
        if self.priors:
            rates = self.fit_priors(lists)
            bias = (0.0, 0.0)               # the priors carry the base rates
        else:
            clicks = sum(float(it.clicked or it.converted) for fb in lists for it in fb.items)
            conversions = sum(float(it.converted) for fb in lists for it in fb.items)
            rates = {"ctr": clicks / max(1, sum(len(fb.items) for fb in lists)),
                     "cvr": conversions / clicks if clicks else 0.05}
            bias = (_logit(rates["ctr"]), _logit(rates["cvr"]))
        with torch.no_grad():
            last = self.net.mlp[-1]
            assert isinstance(last, nn.Linear)
            last.bias.copy_(torch.tensor(bias))
        return rates

    def pretrain(self, lists: Sequence[Feedback], max_epochs: int = 30, patience: int = 3,
                 batch_lists: int = 32, lr_grid: Sequence[float] = (1e-3, 3e-3, 1e-2),
                 held_out: float = 0.2) -> dict[str, float]:
        """Fit on the logging phase with held-out early stopping and a learning-rate grid.

        The logs are split by time (the earliest ``1 - held_out`` train, the rest is the
        validation set). For every rate of ``lr_grid`` a fresh network (same seed) trains
        epoch by epoch until the validation log-loss (pCTR + pCVR, summed over items) has
        not improved for ``patience`` epochs; the rate and epoch with the lowest one win,
        and their weights are kept (:meth:`heldout_metrics` reports that log-loss).
        Online learning then runs at ``online_lr_factor`` × the chosen rate.
        """
        if not any(fb.items for fb in lists):
            return {}
        ordered = sorted(lists, key=lambda fb: fb.impression_time)
        cut = max(1, min(len(ordered) - 1, round(len(ordered) * (1.0 - held_out))))
        train, valid = ordered[:cut], ordered[cut:]
        blocks = [c for i in range(0, len(train), batch_lists)
                  if (c := self._tensors(train[i:i + batch_lists])) is not None]
        vblocks = [c for i in range(0, len(valid), 256)
                   if (c := self._tensors(valid[i:i + 256])) is not None]
        n_valid_ctr = sum(len(b[4]) for b in vblocks)
        n_valid_cvr = sum(int((b[4] > 0).sum()) for b in vblocks)
        best: tuple[float, float, int, tuple[float, float], dict[str, Tensor],
                    dict[str, float]] | None = None
        for lr in lr_grid:
            torch.manual_seed(self.seed)
            self.net = _DLRM(len(self.FIELDS), self.buckets)
            self.opt = torch.optim.Adam(self.net.parameters(), lr=lr)
            rates = self._init_bias(train)
            rng = np.random.default_rng(self.seed)
            stale = 0
            lr_best = math.inf
            for epoch in range(1, max_epochs + 1):
                for j in rng.permutation(len(blocks)):
                    self._step(blocks[int(j)])
                ctr, cvr = self._heldout_loss(vblocks)
                total = ctr * n_valid_ctr + (cvr * n_valid_cvr if n_valid_cvr else 0.0)
                if total < lr_best - 1e-6:
                    lr_best, stale = total, 0
                    if best is None or total < best[0]:
                        best = (total, lr, epoch, (ctr, cvr),
                                copy.deepcopy(self.net.state_dict()), rates)
                else:
                    stale += 1
                    if stale >= patience:
                        break
        assert best is not None
        _, lr, epoch, (ctr, cvr), state, rates = best
        torch.manual_seed(self.seed)
        self.net = _DLRM(len(self.FIELDS), self.buckets)
        self.net.load_state_dict(state)
        self.lr = lr
        self.opt = torch.optim.Adam(self.net.parameters(), lr=lr * self.online_lr_factor)
        self.heldout = {"value_logloss_ctr": ctr, "value_logloss_cvr": cvr}
        self.exposure.record_feedback(lists)
        return {"lr": lr, "epochs": float(epoch), **self.heldout, **rates}

    def heldout_metrics(self) -> dict[str, float]:
        """Log-loss of pCTR and pCVR on the logs' held-out time split (chosen rate and
        epoch), for the harness's per-policy summary."""
        return dict(self.heldout)

    def learn(self, lists: Sequence[Feedback]) -> dict[str, float]:
        """One Adam step per ``online_batch`` lists, over every list of the call, in order."""
        loss = math.nan
        for i in range(0, len(lists), self.online_batch):
            t = self._tensors(lists[i:i + self.online_batch])
            if t is not None:
                loss = self._step(t)
        return {"loss": loss} if math.isfinite(loss) else {}


class BidOnlyPolicy:
    """Servable ads by bid × the logged base rates (cpc bid·CTR, cpa bid·CTR·CVR per
    bid type, cpm bid/1000): what an auction without any user model would show."""

    def __init__(self, world: World) -> None:
        self.name = "bid_only"
        self.world = world
        self.ctr = 0.02
        self.cvr = 0.1

    def fit(self, lists: Sequence[Feedback]) -> None:
        """Base rates of the logs: overall CTR, CVR per click."""
        imp = clk = cv = 0
        for fb in lists:
            for it in fb.items:
                imp += 1
                clk += int(it.clicked or it.converted)
                cv += int(it.converted)
        if imp:
            self.ctr = max(clk / imp, 1e-4)
        if clk:
            self.cvr = max(cv / clk, 1e-4)

    def recommend_batch(self, requests: Sequence[Request]) -> list[ServedSlate]:
        servable = sorted(self.world.servable_ads(), key=lambda a: a.ad_id)
        ev = World.expected_values(servable, [self.ctr] * len(servable),
                                   [self.cvr] * len(servable))
        order = sorted(range(len(servable)), key=lambda i: (-ev[i], servable[i].ad_id))
        return [ServedSlate(r.request_id, "bid_only", [
            ServedAd(servable[i].ad_id, pos, score=float(ev[i]), expected_value=float(ev[i]))
            for pos, i in enumerate(order[: r.k])]) for r in requests]

    def learn(self, lists: Sequence[Feedback]) -> dict[str, float]:
        return {}


class PopularityPolicy:
    """Servable ads by smoothed realized revenue per impression (same slate for all)."""

    def __init__(self, world: World, prior_impressions: float = 20.0) -> None:
        self.name = "popularity"
        self.world = world
        self.prior = prior_impressions
        self.revenue: dict[str, float] = {}
        self.shown: dict[str, float] = {}

    def _score(self, ad_id: str) -> float:
        ad = self.world.ads[ad_id]
        prior_rate = float(World.expected_values([ad], [0.01], [0.05])[0])  # a flat prior
        return (self.revenue.get(ad_id, 0.0) + self.prior * prior_rate) / (
            self.shown.get(ad_id, 0.0) + self.prior)

    def recommend_batch(self, requests: Sequence[Request]) -> list[ServedSlate]:
        servable = sorted(a.ad_id for a in self.world.servable_ads())
        ranked = sorted(servable, key=lambda a: (-self._score(a), a))
        return [ServedSlate(r.request_id, "popularity", [
            ServedAd(a, i, score=self._score(a)) for i, a in enumerate(ranked[: r.k])])
            for r in requests]

    def learn(self, lists: Sequence[Feedback]) -> dict[str, float]:
        for fb in lists:
            for it in fb.items:
                self.revenue[it.ad_id] = self.revenue.get(it.ad_id, 0.0) + it.reward
                self.shown[it.ad_id] = self.shown.get(it.ad_id, 0.0) + 1.0
        return {}


def finite_or_nan(x: float) -> float:
    return x if math.isfinite(x) else math.nan
