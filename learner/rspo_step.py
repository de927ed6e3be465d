"""The learner's pure step: feedback lists -> one RSPO (+VSL, +value, +HEPO) update.

``OnlineLearner.update(batch) -> metrics`` is what tests call with no Kafka in sight;
``learner.online`` wraps it in the stream loop. A :class:`ListBatch` is one row per
feedback list (one served slate with realized rewards):

    history [B, H, T]  history_mask [B, H]  context [B, C]
    items   [B, K, T]  item_mask [B, K]     rewards [B, K]
    clicked [B, K]     converted [B, K]     list_weight [B]
    bids    [B, K]     bid_type [B, K] (codes of learner.losses.BID_TYPES)
    horizon [B, K]     (prior heads' time horizon of each item, learner.data.horizon_of)

and, when some list of the batch carries the server's final beams (``Feedback.beams``),
HEPO's candidates per request (a list without beams contributes its shown items):

    beam_items [B, J, T]  beam_mask [B, J]  beam_logprob [B, J] (served log-prob)
    beam_bids [B, J]  beam_bid_type [B, J]  beam_shown [B, J]  beam_rewards [B, J]
    (realized reward of a shown beam, 0 otherwise)

The rewards RSPO ranks by are dense and on one money scale (docs/rspo.md): each shown
item's expected value under the value model (calibrated eCPM per impression), corrected
towards what was realized by ``realized_weight``; CPM impressions count at their price,
not as wins, and only clicks and conversions are positives of the VSL anchor.

With prior heads (``ModelConfig.prior_heads``) the mixture is what RSPO and the anchor
train; each positive is also routed to its leaf head (conversion or click, short- or
long-term against the list's history) for a routed VSL anchor, and the prior classifier
(``predicted`` mixing) learns the positives' routing labels by CE, both weighted by
``prior_weight``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from learner.beam import IdTrie
from learner.data import BID_CODES, horizon_of
from learner.losses import (
    dc_loss,
    expected_value,
    log_money,
    prior_class_loss,
    value_loss,
    value_weights,
)
from learner.model import GenerativeRecommender
from learner.rspo import (
    RSPOConfig,
    fake_negative_weight,
    hepo_loss,
    organic_engagement,
    rspo_loss,
)
from learner.tokenizer import UASIDTokenizer, UnknownAdError
from learner.value_fit import Impressions, OnlineLinear
from streams.features import request_ids
from streams.schemas import BeamCandidate, Feedback


@dataclass
class ListBatch:
    history: Tensor
    history_mask: Tensor
    context: Tensor
    items: Tensor
    item_mask: Tensor
    rewards: Tensor
    clicked: Tensor
    converted: Tensor
    list_weight: Tensor
    bids: Tensor
    bid_type: Tensor
    allowed: Tensor | None = None
    """[B, K, T, V] bool: per item and level the codes the served beam search chose among
    (``IdTrie.allowed``); None: log-probs over each level's whole vocabulary."""
    horizon: Tensor | None = None
    """[B, K] int64: each item's time horizon for the prior heads (0 short-term, 1 long-
    term, :func:`learner.data.horizon_of` against the list's history)."""
    beam_items: Tensor | None = None
    """[B, J, T] each request's logged final beams, best expected value first (unknown
    ads left out; the shown items of a list without beams); None when no list of the
    batch has beams."""
    beam_mask: Tensor | None = None
    """[B, J] 1 for a real beam."""
    beam_logprob: Tensor | None = None
    """[B, J] the served sequence log-prob of each beam (under the served trie)."""
    beam_bids: Tensor | None = None
    beam_bid_type: Tensor | None = None
    beam_shown: Tensor | None = None
    """[B, J] 1 for a beam that was shown (its realized reward is known)."""
    beam_rewards: Tensor | None = None
    """[B, J] the realized reward of a shown beam, 0 otherwise."""
    beam_allowed: Tensor | None = None
    """[B, J, T, V] bool, as :attr:`allowed` for the beams (None without a trie)."""
    organic_items: Tensor | None = None
    """[B, M, T] the ids of each mixed feed's organic items (items without an id left
    out); None when no list of the batch has organic items."""
    organic_mask: Tensor | None = None
    """[B, M] 1 for a real organic item."""
    organic_rewards: Tensor | None = None
    """[B, M] each organic item's engagement reward (:func:`organic_engagement`)."""
    time: Tensor | None = None
    """[B] float64: each list's impression time."""
    exposure: Tensor | None = None
    """[B, K] float32: the user's earlier impressions of each item (``FeedbackItem.
    exposure``, the value heads' exposure input)."""

    def __len__(self) -> int:
        return int(self.items.shape[0])


def provisional_weight(fb: Feedback) -> float:
    """Weight of a provisional list: the chance its unconverted CPA items are true negatives.

    Lists without a CPA item that could still convert are not uncertain (weight 1).
    """
    uncertain = any(it.bid_type == "cpa" and not it.converted for it in fb.items)
    if not uncertain:
        return 1.0
    return float(fake_negative_weight(torch.tensor([fb.elapsed_s]))[0])


def lists_to_batch(lists: Sequence[tuple[Feedback, float]], tok: UASIDTokenizer,
                   model: GenerativeRecommender, trie: IdTrie | None = None,
                   beams: bool = True, organic_dwell_s: float | None = None) -> ListBatch:
    """Tensors for ``(feedback, list weight)`` pairs; unknown ads are left out. The
    history axis is as long as the longest history in the batch (at most H). With the
    ``trie`` of servable ids, the items' log-probs are taken under its constraint, as
    the server scores them (:attr:`ListBatch.allowed`). With ``beams`` (the default)
    and a list of the batch carrying logged beams, the ``beam_*`` fields are filled
    (HEPO's candidates; ``beams=False`` skips them when nothing reads them). With
    ``organic_dwell_s`` and a list of the batch carrying organic items, the
    ``organic_*`` fields are filled (None skips them)."""
    cfg = model.cfg
    T, H = cfg.id_len, cfg.history_len
    B = len(lists)
    K = max((len(fb.items) for fb, _ in lists), default=1) or 1
    hist = np.zeros((B, H, T), np.int64)
    hmask = np.zeros((B, H), np.float32)
    ctx = np.zeros((B, len(cfg.context_features) + cfg.organic_len), np.int64)
    items = np.zeros((B, K, T), np.int64)
    imask = np.zeros((B, K), np.float32)
    rewards = np.zeros((B, K), np.float32)
    clicked = np.zeros((B, K), np.float32)
    converted = np.zeros((B, K), np.float32)
    weight = np.zeros(B, np.float32)
    bids = np.zeros((B, K), np.float32)
    bid_type = np.zeros((B, K), np.int64)
    exposure = np.zeros((B, K), np.float32)
    for b, (fb, w) in enumerate(lists):
        weight[b] = w
        h = 0
        for ad_id in fb.recent_ad_ids:
            if h == H:
                break
            try:
                hist[b, h] = tok.ids_of(ad_id)
            except UnknownAdError:
                continue
            hmask[b, h] = 1.0
            h += 1
        ctx[b] = request_ids(fb.context, fb.recent_organic, cfg.context_features,
                             cfg.context_buckets, cfg.organic_len)
        k = 0
        for it in fb.items:
            try:
                items[b, k] = tok.ids_of(it.ad_id)
            except UnknownAdError:
                continue
            imask[b, k] = 1.0
            rewards[b, k] = it.reward
            clicked[b, k] = float(it.clicked or it.converted)
            converted[b, k] = float(it.converted)
            bids[b, k] = it.bid
            bid_type[b, k] = BID_CODES.get(it.bid_type, 0)
            exposure[b, k] = it.exposure
            k += 1
    # history padding is trailing: columns no list uses are dropped (the encoder's outputs
    # at padded positions are masked everywhere, so the results are the same)
    used = max(int(hmask.sum(1).max(initial=0.0)), 1)
    t = torch.from_numpy
    allowed = (t(trie.allowed(items.reshape(B * K, T)).reshape(B, K, T, -1))
               if trie is not None else None)
    horizon = horizon_of(hist, hmask, items, cfg.short_horizon)
    batch = ListBatch(t(hist[:, :used]), t(hmask[:, :used]), t(ctx), t(items), t(imask),
                      t(rewards), t(clicked), t(converted), t(weight), t(bids), t(bid_type),
                      allowed, t(horizon),
                      time=torch.tensor([fb.impression_time for fb, _ in lists],
                                        dtype=torch.float64), exposure=t(exposure))
    if beams and any(fb.beams for fb, _ in lists):
        _add_beams(batch, [fb for fb, _ in lists], tok, T, trie)
    if organic_dwell_s is not None and any(fb.organic for fb, _ in lists):
        _add_organic(batch, [fb for fb, _ in lists], tok, T, organic_dwell_s)
    return batch


def _add_organic(batch: ListBatch, lists: Sequence[Feedback], tok: UASIDTokenizer, T: int,
                 dwell_unit_s: float) -> None:
    """Fill the ``organic_*`` fields: each list's organic items in feed order (items the
    tokenizer has no id for left out) and their engagement rewards."""
    B = len(lists)
    M = max(max(len(fb.organic) for fb in lists), 1)
    ids = np.zeros((B, M, T), np.int64)
    mask = np.zeros((B, M), np.float32)
    rewards = np.zeros((B, M), np.float32)
    for b, fb in enumerate(lists):
        m = 0
        for it in sorted(fb.organic, key=lambda o: o.position):
            try:
                ids[b, m] = tok.organic_ids_of(it.item_id)
            except UnknownAdError:
                continue
            mask[b, m] = 1.0
            rewards[b, m] = organic_engagement(it.viewed, it.liked, it.dwell_s, dwell_unit_s)
            m += 1
    t = torch.from_numpy
    batch.organic_items, batch.organic_mask, batch.organic_rewards = t(ids), t(mask), t(rewards)


def _add_beams(batch: ListBatch, lists: Sequence[Feedback], tok: UASIDTokenizer, T: int,
               trie: IdTrie | None) -> None:
    """Fill the ``beam_*`` fields of ``batch``: each list's final beams in logged order
    (unknown ads left out), or its shown items when it has none."""
    B = len(lists)
    J = max(max(len(fb.beams) or len(fb.items) for fb in lists), 1)
    ids = np.zeros((B, J, T), np.int64)
    mask = np.zeros((B, J), np.float32)
    logprob = np.zeros((B, J), np.float32)
    bids = np.zeros((B, J), np.float32)
    bid_type = np.zeros((B, J), np.int64)
    shown = np.zeros((B, J), np.float32)
    realized = np.zeros((B, J), np.float32)
    for b, fb in enumerate(lists):
        reward_of = {it.ad_id: it.reward for it in fb.items}
        cands = fb.beams or fb.items
        j = 0
        for c in cands:
            try:
                ids[b, j] = tok.ids_of(c.ad_id)
            except UnknownAdError:
                continue
            mask[b, j] = 1.0
            logprob[b, j] = c.logprob if isinstance(c, BeamCandidate) else c.score
            bids[b, j] = c.bid
            bid_type[b, j] = BID_CODES.get(c.bid_type, 0)
            if c.ad_id in reward_of:
                shown[b, j] = 1.0
                realized[b, j] = reward_of[c.ad_id]
            j += 1
    t = torch.from_numpy
    batch.beam_items, batch.beam_mask, batch.beam_logprob = t(ids), t(mask), t(logprob)
    batch.beam_bids, batch.beam_bid_type = t(bids), t(bid_type)
    batch.beam_shown, batch.beam_rewards = t(shown), t(realized)
    batch.beam_allowed = (t(trie.allowed(ids.reshape(B * J, T)).reshape(B, J, T, -1))
                          if trie is not None else None)


def ndcg_of_scores(scores: Tensor, rewards: Tensor, mask: Tensor) -> Tensor:
    """Value-weighted NDCG of ranking each list's items by ``scores``: [B] (NaN-free)."""
    neg = torch.finfo(scores.dtype).min
    s = torch.where(mask > 0, scores, torch.full_like(scores, neg))
    order = torch.argsort(s, 1, descending=True)
    gains = torch.gather(rewards * mask, 1, order)
    disc = 1.0 / torch.log2(torch.arange(2, scores.shape[1] + 2, dtype=scores.dtype))
    dcg = (gains * disc).sum(1)
    ideal = (torch.sort(rewards * mask, 1, descending=True).values * disc).sum(1)
    return torch.where(ideal > 0, dcg / ideal.clamp_min(1e-12), torch.zeros_like(dcg))


LinearSync = Callable[[OnlineLinear, Impressions | None], dict[str, float]]
"""Adds a step's shown items (``None``: none with times) to the linear terms' refit, refits
them and returns the refit's stats."""


def refit_here(linear: OnlineLinear, rows: Impressions | None) -> dict[str, float]:
    """One process's :data:`LinearSync`: a step without timed rows leaves the tables."""
    return {} if rows is None else linear.refit_with(rows)


class OnlineLearner:
    """Model + frozen reference policy + optimizer; ``update`` is one RSPO step."""

    def __init__(self, model: GenerativeRecommender, cfg: RSPOConfig | None = None,
                 lr: float = 5e-4, value_weight: float = 0.5, grad_clip: float = 1.0,
                 weight_decay: float = 0.0, prior_weight: float = 0.5) -> None:
        self.model = model
        self.cfg = cfg or RSPOConfig()
        self.money_scale = 0.0
        """Running mean of the per-list reward spread (one scale for every list)."""
        self.value_weight = value_weight
        self.prior_weight = prior_weight
        """Weight of the routed prior-head anchor and the prior classifier's CE."""
        self.grad_clip = grad_clip
        self.linear = OnlineLinear(model) if OnlineLinear.fitted(model) else None
        """The value head's linear terms, refitted to convergence after every step (a
        head whose :func:`learner.value_fit.fit_linear` ran); the optimizer leaves them."""
        self.linear_sync: LinearSync = refit_here
        """How a step's shown items reach the refit: here, in this process; a data-parallel
        learner gathers every rank's on one rank, refits there and broadcasts the tables
        (:func:`learner.distributed.make_data_parallel`)."""
        # the refitted tables, and the parts of the head pretraining zeroed (RSPOConfig.
        # value_deep_online), are not the optimizer's
        left_out = ({id(p) for p in model.value.linear_tables().values()}
                    if self.linear is not None else set())
        if self.linear is not None and not self.linear.deep and not self.cfg.value_deep_online:
            for p in model.value.deep_output_parameters():
                p.requires_grad_(False)
                left_out.add(id(p))
        self.opt = torch.optim.AdamW([p for p in model.parameters() if id(p) not in left_out],
                                     lr=lr, weight_decay=weight_decay)
        self.ref = self.frozen_copy(model)
        self.steps = 0

    @staticmethod
    def frozen_copy(model: GenerativeRecommender) -> GenerativeRecommender:
        ref = copy.deepcopy(model).eval()
        for p in ref.parameters():
            p.requires_grad_(False)
        return ref

    @property
    def reads_beams(self) -> bool:
        """Whether an update reads the lists' logged final beams (HEPO or DC is on)."""
        return self.cfg.hepo_weight > 0 or self.cfg.dc_weight > 0

    @property
    def organic_dwell_s(self) -> float | None:
        """The organic term's dwell unit when it is on (None: organic items are not read,
        :func:`lists_to_batch` skips them)."""
        return self.cfg.organic_dwell_s if self.cfg.organic_weight > 0 else None

    def refresh_reference(self) -> None:
        """π_ref ← π_θ (called when a snapshot of π_θ is published)."""
        self.ref.load_state_dict(self.model.state_dict())

    def dense_rewards(self, b: ListBatch, pctr_logit: Tensor, pcvr_logit: Tensor) -> Tensor:
        """The rewards RSPO ranks by: the value model's expected value of each shown item,
        moved towards the realized reward by ``realized_weight`` (``reward="realized"``:
        the realized reward alone, the original form)."""
        if self.cfg.reward == "realized":
            return b.rewards
        ev = expected_value(torch.sigmoid(pctr_logit.detach()),
                            torch.sigmoid(pcvr_logit.detach()), b.bids, b.bid_type)
        eta = self.cfg.realized_weight
        return ((1.0 - eta) * ev + eta * b.rewards) * b.item_mask

    @torch.no_grad()
    @torch.no_grad()
    def beam_value(self, b: ListBatch, memory: Tensor, mem_mask: Tensor) -> Tensor:
        """The value model's expected value of each logged beam [B, J] (no gradient: HEPO
        and DC read it as a fixed score)."""
        assert b.beam_items is not None
        assert b.beam_bids is not None and b.beam_bid_type is not None
        pctr, pcvr = self.model.value(memory, mem_mask, b.beam_items, context=b.context)
        return expected_value(torch.sigmoid(pctr), torch.sigmoid(pcvr), b.beam_bids,
                              b.beam_bid_type)

    def beam_rewards(self, b: ListBatch, ev: Tensor) -> Tensor:
        """HEPO's reward of each logged beam [B, J]: its expected value ``ev``
        (:meth:`beam_value`), moved towards the realized reward by ``realized_weight`` for
        the beams that were shown, as :meth:`dense_rewards` does for the items
        (``reward="realized"``: the realized reward of a shown beam, the expected value of
        the others)."""
        assert b.beam_mask is not None
        assert b.beam_shown is not None and b.beam_rewards is not None
        eta = 1.0 if self.cfg.reward == "realized" else self.cfg.realized_weight
        shown = b.beam_shown > 0
        r = torch.where(shown, (1.0 - eta) * ev + eta * b.beam_rewards, ev)
        return r * b.beam_mask

    @staticmethod
    def _served_gap(b: ListBatch, ref_level: Tensor) -> dict[str, float]:
        """Mean (reference policy's − served) sequence log-prob of the logged beams: ~0
        when π_ref is the served snapshot and the learner's trie is the server's."""
        assert b.beam_mask is not None and b.beam_logprob is not None
        n = b.beam_mask.sum()
        gap = ((ref_level.sum(-1) - b.beam_logprob) * b.beam_mask).sum() / n.clamp_min(1)
        return {"hepo_beams_per_list": float(n / max(1, len(b))),
                "hepo_ref_minus_served_logprob": float(gap)}

    def _scale(self, rewards: Tensor, mask: Tensor) -> float | None:
        """Update and return the one money scale of the gains (None: per-list form)."""
        if not self.cfg.money_scale:
            return None
        big = torch.finfo(rewards.dtype).max
        hi = torch.where(mask > 0, rewards, torch.full_like(rewards, -big)).max(1).values
        lo = torch.where(mask > 0, rewards, torch.full_like(rewards, big)).min(1).values
        spread = (hi - lo)[mask.sum(1) > 1]
        if spread.numel():
            m = float(spread.mean())
            self.money_scale = m if self.money_scale == 0 else 0.95 * self.money_scale + 0.05 * m
        return self.money_scale or 1.0

    def update(self, b: ListBatch) -> dict[str, float]:
        """One optimizer step on a batch of lists; returns the loss terms and diagnostics."""
        self.model.train()
        K = b.items.shape[1]
        # with HEPO or DC over the logged beams, the shown items and the beams go through
        # the decoder in one pass (one encoder call); columns K: are the beams
        with_beams = self.reads_beams and b.beam_items is not None
        ids, allowed = b.items, b.allowed
        if with_beams:
            assert b.beam_items is not None
            ids = torch.cat([b.items, b.beam_items], 1)
            allowed = (torch.cat([b.allowed, b.beam_allowed], 1)
                       if b.allowed is not None and b.beam_allowed is not None else None)
        n_main = ids.shape[1]        # shown items and beams; organic items after them
        organic = self.cfg.organic_weight > 0 and b.organic_items is not None
        if organic:
            assert b.organic_items is not None
            ids = torch.cat([ids, b.organic_items], 1)
            if allowed is not None:   # organic items: each level's whole vocabulary
                B_, M = b.organic_items.shape[:2]
                allowed = torch.cat([allowed, allowed.new_ones(
                    (B_, M, *allowed.shape[2:]))], 1)
        routed_level: Tensor | None = None
        prior_class: Tensor | None = None
        leaf = torch.zeros_like(b.bid_type)
        if self.model.decoder.n_leaves > 0 and b.horizon is not None:
            leaf = self.model.decoder.leaf((b.converted > 0).long(), b.horizon)  # [B, K]
            leaf_all = torch.cat([leaf, torch.zeros_like(ids[:, K:, 0])], 1)   # beams: unused
            level_all, routed_all, prior_class, memory, mem_mask = \
                self.model.prior_level_logprob(b, ids, leaf_all,
                                               self.cfg.generator_encoder_grad, allowed)
            routed_level = routed_all[:, :K]
        else:
            level_all, memory, mem_mask = self.model.level_logprob_and_memory(
                b, ids, encoder_grad=self.cfg.generator_encoder_grad, allowed=allowed)
        level_logp = level_all[:, :K]
        logp = (level_logp * b.item_mask.unsqueeze(-1)).sum(-1)                # [B, K]
        with torch.no_grad():
            ref_all, _, _ = self.ref.level_logprob_and_memory(b, ids, allowed=allowed)
        ref_level = ref_all[:, :K]
        logp_ref = (ref_level * b.item_mask.unsqueeze(-1)).sum(-1)
        value_memory = memory.detach() if self.cfg.value_detach else memory
        pctr, pcvr = self.model.value(value_memory, mem_mask, b.items, context=b.context,
                                      exposure=b.exposure)
        rewards = self.dense_rewards(b, pctr, pcvr)
        # the beams' expected value, once for DC and HEPO alike
        beam_ev = self.beam_value(b, memory, mem_mask) if with_beams else None
        l_rspo, stats = rspo_loss(logp, logp_ref, rewards, b.item_mask, self.cfg.beta,
                                  b.list_weight, self.cfg.min_gap,
                                  self._scale(rewards, b.item_mask))
        # VSL anchor on the positives (value-weighted sequence CE), list-weighted; a
        # positive is a click or a conversion (a CPM impression is paid, not chosen)
        positive = torch.clamp(b.clicked + b.converted, max=1.0) if self.cfg.anchor_clicks_only \
            else torch.ones_like(b.rewards)
        pos_w = value_weights((b.rewards * positive).flatten()).reshape(b.rewards.shape)
        pos_w = pos_w * b.item_mask * b.list_weight.unsqueeze(1)
        l_vsl = -(pos_w * logp).sum() / (pos_w > 0).sum().clamp_min(1)
        l_val = value_loss(pctr, pcvr, b.clicked, b.converted, b.item_mask) \
            + self.model.value.penalty()
        loss = (self.cfg.rspo_weight * l_rspo + self.cfg.vsl_alpha * l_vsl
                + self.value_weight * l_val)
        l_dc = torch.zeros(())
        if self.cfg.dc_weight > 0:   # the ranker's money order over the same candidates
            if beam_ev is not None:  # the final beams the server ranked
                assert b.beam_mask is not None
                gen = (level_all[:, K:n_main] * b.beam_mask.unsqueeze(-1)).sum(-1)
                l_dc = dc_loss(gen, log_money(beam_ev), b.beam_mask, self.cfg.dc_tau)
            else:                    # no logged beams: the shown items
                ev = expected_value(torch.sigmoid(pctr.detach()), torch.sigmoid(pcvr.detach()),
                                    b.bids, b.bid_type)
                l_dc = dc_loss(logp, log_money(ev), b.item_mask, self.cfg.dc_tau)
            loss = loss + self.cfg.dc_weight * l_dc
        l_prior = torch.zeros(())
        if routed_level is not None:
            # routed anchor: each click/conversion trains its own leaf head (value-weighted,
            # rewards floored as pretraining's min_value so an unconverted click counts)
            clicks = torch.clamp(b.clicked + b.converted, max=1.0) * b.item_mask
            rw = value_weights((b.rewards.clamp_min(0.05) * clicks).flatten()).reshape(
                clicks.shape) * b.list_weight.unsqueeze(1)
            routed = (routed_level * b.item_mask.unsqueeze(-1)).sum(-1)        # [B, K]
            l_prior = -(rw * routed).sum() / (rw > 0).sum().clamp_min(1)
            if prior_class is not None:   # the classifier learns every positive's leaf
                K = leaf.shape[1]
                l_prior = l_prior + prior_class_loss(
                    prior_class.repeat_interleave(K, 0), leaf.flatten(), rw.flatten())
            loss = loss + self.prior_weight * l_prior
        l_hepo = torch.zeros(())
        hepo_stats: dict[str, float] = {}
        if self.cfg.hepo_weight > 0:
            if with_beams:
                assert beam_ev is not None
                beam_rewards = self.beam_rewards(b, beam_ev)
                assert b.beam_items is not None and b.beam_mask is not None
                l_hepo, hepo_stats = hepo_loss(level_all[:, K:n_main], ref_all[:, K:n_main],
                                               b.beam_items,
                                               beam_rewards, b.beam_mask, self.cfg.hepo_clip,
                                               b.list_weight)
                hepo_stats.update(self._served_gap(b, ref_all[:, K:n_main]))
            else:   # no logged beams: the shown items are the sibling groups
                l_hepo, hepo_stats = hepo_loss(level_logp, ref_level, b.items, rewards,
                                               b.item_mask, self.cfg.hepo_clip, b.list_weight)
            loss = loss + self.cfg.hepo_weight * l_hepo
        l_org = torch.zeros(())
        org_stats: dict[str, float] = {}
        if organic:
            assert b.organic_mask is not None and b.organic_rewards is not None
            om = b.organic_mask
            org_logp = (level_all[:, n_main:] * om.unsqueeze(-1)).sum(-1)       # [B, M]
            org_ref = (ref_all[:, n_main:] * om.unsqueeze(-1)).sum(-1)
            l_org_rspo, _ = rspo_loss(org_logp, org_ref, b.organic_rewards, om,
                                      self.cfg.beta, b.list_weight, self.cfg.min_gap)
            ow = b.organic_rewards * om * b.list_weight.unsqueeze(1)
            l_org_vsl = -(ow * org_logp).sum() / (ow > 0).sum().clamp_min(1)
            l_org = l_org_rspo + self.cfg.vsl_alpha * l_org_vsl
            loss = loss + self.cfg.organic_weight * l_org
            n_org = om.sum().clamp_min(1)
            org_stats = {"organic_items": float(om.sum()),
                         "organic_mean_reward": float((b.organic_rewards * om).sum() / n_org)}
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.opt.step()
        self.steps += 1
        linear: dict[str, float] = {}
        if self.linear is not None:
            rows = (Impressions.of_slates(
                self.model.value, memory.detach(), mem_mask, b.items, b.item_mask, b.context,
                b.clicked, b.converted, b.time, b.exposure) if b.time is not None else None)
            linear = self.linear_sync(self.linear, rows)
        n_items = b.item_mask.sum().clamp_min(1)
        kl = float(((logp_ref - logp.detach()) * b.item_mask).sum() / n_items)
        return {
            "loss": float(loss.detach()), "rspo": float(l_rspo.detach()),
            "vsl": float(l_vsl.detach()), "value": float(l_val.detach()),
            "hepo": float(l_hepo.detach()), "dc": float(l_dc.detach()),
            "prior": float(l_prior.detach()), "organic": float(l_org.detach()), "kl_ref": kl,
            "grad_norm": float(grad_norm),
            "mean_reward": float((b.rewards * b.item_mask).sum() / n_items),
            "mean_dense_reward": float((rewards * b.item_mask).sum() / n_items),
            "lists": float(len(b)), **stats, **hepo_stats, **org_stats, **linear,
        }

    @torch.no_grad()
    def holdout_metrics(self, model: GenerativeRecommender, b: ListBatch) -> tuple[float, float]:
        """``(value, ndcg)`` of ``model`` on held-out lists from one forward pass.

        value: the value-weighted off-policy estimate: per list, the expected realized
        reward of one item drawn from the model's distribution over the items that were
        shown (softmax of sequence log-probs over the slate), averaged over lists. In
        money per impression, so it tracks revenue; lists of one item or with equal
        rewards add the same to every model.
        ndcg: mean value-NDCG of ranking the held-out slates by sequence log-prob."""
        model.eval()
        level_logp, _, _ = model.level_logprob_and_memory(b, b.items, allowed=b.allowed)
        scores = (level_logp * b.item_mask.unsqueeze(-1)).sum(-1)
        has_items = b.item_mask.sum(1) > 0
        has_value = (b.rewards * b.item_mask).sum(1) > 0
        value = ndcg = math.nan
        if bool(has_items.any()):
            p = torch.softmax(scores.masked_fill(b.item_mask <= 0, -torch.inf), dim=1)
            value = float((p.nan_to_num(0.0) * b.rewards * b.item_mask).sum(1)[has_items]
                          .mean())
        if bool(has_value.any()):
            ndcg = float(ndcg_of_scores(scores, b.rewards, b.item_mask)[has_value].mean())
        return value, ndcg

    def holdout_value(self, model: GenerativeRecommender, b: ListBatch) -> float:
        """The value estimate of :meth:`holdout_metrics`."""
        return self.holdout_metrics(model, b)[0]

    def holdout_ndcg(self, model: GenerativeRecommender, b: ListBatch) -> float:
        """The value-NDCG of :meth:`holdout_metrics`."""
        return self.holdout_metrics(model, b)[1]
