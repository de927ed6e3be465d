"""The learner's pure step: feedback lists -> one RSPO (+VSL, +value, +HEPO) update.

``OnlineLearner.update(batch) -> metrics`` is what tests call with no Kafka in sight;
``learner.online`` wraps it in the stream loop. A :class:`ListBatch` is one row per
feedback list (one served slate with realized rewards):

    history [B, H, T]  history_mask [B, H]  context [B, C]
    items   [B, K, T]  item_mask [B, K]     rewards [B, K]
    clicked [B, K]     converted [B, K]     list_weight [B]
    bids    [B, K]     bid_type [B, K] (codes of learner.losses.BID_TYPES)
    horizon [B, K]     (prior heads' time horizon of each item, learner.data.horizon_of)

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
from collections.abc import Sequence
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
from learner.rspo import RSPOConfig, fake_negative_weight, hepo_loss, rspo_loss
from learner.tokenizer import UASIDTokenizer, UnknownAdError
from streams.features import request_ids
from streams.schemas import Feedback


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
                   model: GenerativeRecommender, trie: IdTrie | None = None) -> ListBatch:
    """Tensors for ``(feedback, list weight)`` pairs; unknown ads are left out. The
    history axis is as long as the longest history in the batch (at most H). With the
    ``trie`` of servable ids, the items' log-probs are taken under its constraint, as
    the server scores them (:attr:`ListBatch.allowed`)."""
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
            k += 1
    # history padding is trailing: columns no list uses are dropped (the encoder's outputs
    # at padded positions are masked everywhere, so the results are the same)
    used = max(int(hmask.sum(1).max(initial=0.0)), 1)
    t = torch.from_numpy
    allowed = (t(trie.allowed(items.reshape(B * K, T)).reshape(B, K, T, -1))
               if trie is not None else None)
    horizon = horizon_of(hist, hmask, items, cfg.short_horizon)
    return ListBatch(t(hist[:, :used]), t(hmask[:, :used]), t(ctx), t(items), t(imask),
                     t(rewards), t(clicked), t(converted), t(weight), t(bids), t(bid_type),
                     allowed, t(horizon))


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
        self.opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        self.ref = self.frozen_copy(model)
        self.steps = 0

    @staticmethod
    def frozen_copy(model: GenerativeRecommender) -> GenerativeRecommender:
        ref = copy.deepcopy(model).eval()
        for p in ref.parameters():
            p.requires_grad_(False)
        return ref

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
        routed_prior = self.model.decoder.n_leaves > 0 and b.horizon is not None
        routed_level: Tensor | None = None
        prior_class: Tensor | None = None
        leaf = torch.zeros_like(b.bid_type)
        if routed_prior:
            assert b.horizon is not None
            leaf = self.model.decoder.leaf((b.converted > 0).long(), b.horizon)  # [B, K]
            level_logp, routed_level, prior_class, memory, mem_mask = \
                self.model.prior_level_logprob(b, b.items, leaf,
                                               self.cfg.generator_encoder_grad, b.allowed)
        else:
            level_logp, memory, mem_mask = self.model.level_logprob_and_memory(
                b, b.items, encoder_grad=self.cfg.generator_encoder_grad, allowed=b.allowed)
        logp = (level_logp * b.item_mask.unsqueeze(-1)).sum(-1)                # [B, K]
        with torch.no_grad():
            ref_level, _, _ = self.ref.level_logprob_and_memory(b, b.items,
                                                                allowed=b.allowed)
        logp_ref = (ref_level * b.item_mask.unsqueeze(-1)).sum(-1)
        value_memory = memory.detach() if self.cfg.value_detach else memory
        pctr, pcvr = self.model.value(value_memory, mem_mask, b.items)
        rewards = self.dense_rewards(b, pctr, pcvr)
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
        l_val = value_loss(pctr, pcvr, b.clicked, b.converted, b.item_mask)
        loss = (self.cfg.rspo_weight * l_rspo + self.cfg.vsl_alpha * l_vsl
                + self.value_weight * l_val)
        l_dc = torch.zeros(())
        if self.cfg.dc_weight > 0:   # the ranker's money order over the same candidates
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
        if self.cfg.hepo_weight > 0:
            l_hepo = hepo_loss(level_logp, ref_level, b.items, rewards, b.item_mask,
                               self.cfg.hepo_clip)
            loss = loss + self.cfg.hepo_weight * l_hepo
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.opt.step()
        self.steps += 1
        n_items = b.item_mask.sum().clamp_min(1)
        kl = float(((logp_ref - logp.detach()) * b.item_mask).sum() / n_items)
        return {
            "loss": float(loss.detach()), "rspo": float(l_rspo.detach()),
            "vsl": float(l_vsl.detach()), "value": float(l_val.detach()),
            "hepo": float(l_hepo.detach()), "dc": float(l_dc.detach()),
            "prior": float(l_prior.detach()), "kl_ref": kl,
            "grad_norm": float(grad_norm),
            "mean_reward": float((b.rewards * b.item_mask).sum() / n_items),
            "mean_dense_reward": float((rewards * b.item_mask).sum() / n_items),
            "lists": float(len(b)), **stats,
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
