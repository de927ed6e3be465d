"""Pretraining losses: VSL (value-weighted id cross-entropy), MTP, value-head BCE.

VSL and its weight function are the [reconstruction] of mechanisms.md §1.4 (GR4AD's
value-aware supervised learning; GPR's VAFT has the same form):

    L_VSL = Σ_n w_n Σ_t CE(logits_{n,t}, c_{n,t}) / #{n : w_n > 0}
    w_n   = clip(log(1 + v_n) / mean_{m: v_m > 0} log(1 + v_m), w_min, w_max)

with v_n the example's realized value (reward). Examples with v_n = 0 carry no
generation loss. MTP is Σ_h γ_h CE_h over the future targets that exist (§2.3), with
γ_h = mtp_gamma^(h-1) for horizons h = 1..n and CE_h the mean, over the examples that
have an h-th future positive, of the id CE summed over levels. DC (:func:`dc_loss`)
aligns the generator's distribution over a candidate set with the ranker's (§3).
Each function is swappable: pretraining only calls :func:`pretrain_loss`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from learner.data import BID_TYPES, Batch
from learner.model import GenerativeRecommender

__all__ = ["BID_TYPES", "dc_loss", "expected_value", "pretrain_loss", "value_loss",
           "vsl_loss"]


def expected_value(pctr: Tensor, pcvr: Tensor, bid: Tensor, bid_type: Tensor) -> Tensor:
    """Expected revenue per impression, the serving formula on one money scale:
    cpc ``bid·pCTR``, cpa ``bid·pCTR·pCVR``, cpm ``bid/1000`` (bid_type codes of
    :data:`BID_TYPES`). Probabilities, not logits."""
    return torch.where(bid_type == 0, bid * pctr,
                       torch.where(bid_type == 1, bid * pctr * pcvr, bid / 1000.0))


def value_weights(value: Tensor, w_min: float = 0.2, w_max: float = 5.0) -> Tensor:
    """[B] realized values -> [B] weights, 0 where value is 0 (see module docstring)."""
    pos = value > 0
    g = torch.log1p(value.clamp_min(0.0))
    mean = g[pos].mean() if bool(pos.any()) else g.new_tensor(1.0)
    w = (g / mean.clamp_min(1e-8)).clamp(w_min, w_max)
    return torch.where(pos, w, torch.zeros_like(w))


def level_ce(logits: Tensor, target: Tensor) -> Tensor:
    """logits [..., T, V], target [..., T] -> CE per example summed over levels [...]."""
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                         reduction="none")
    return ce.reshape(target.shape).sum(-1)


def vsl_loss(logits: Tensor, target: Tensor, weight: Tensor) -> Tensor:
    """Value-weighted sequence CE. logits [B, T, V], target [B, T], weight [B]."""
    n = (weight > 0).sum().clamp_min(1)
    return (weight * level_ce(logits, target)).sum() / n


def mtp_loss(mtp_logits: Tensor, mtp_target: Tensor, mtp_mask: Tensor,
             gammas: Sequence[float] | None = None, gamma: float = 0.5) -> Tensor:
    """Σ_h γ_h · mean CE of horizon h over rows that have an h-th future target, γ_h =
    ``gammas[h-1]`` or ``gamma^(h-1)``. mtp_logits [B, n_mtp, T, V], mtp_target
    [B, n_mtp, T], mtp_mask [B, n_mtp]."""
    n_mtp = mtp_logits.shape[1]
    gam = torch.tensor(gammas if gammas is not None else [gamma ** h for h in range(n_mtp)],
                       dtype=mtp_logits.dtype)
    ce = level_ce(mtp_logits, mtp_target)                                # [B, n_mtp]
    per_head = (ce * mtp_mask).sum(0) / mtp_mask.sum(0).clamp_min(1.0)  # [n_mtp]
    return (gam * per_head).sum()


def value_loss(pctr_logit: Tensor, pcvr_logit: Tensor, clicked: Tensor, converted: Tensor,
               mask: Tensor) -> Tensor:
    """BCE of pCTR on shown items and of pCVR = P(conversion | click) on clicked items."""
    ctr = F.binary_cross_entropy_with_logits(pctr_logit, clicked, reduction="none")
    cvr = F.binary_cross_entropy_with_logits(pcvr_logit, converted, reduction="none")
    cvr_mask = mask * clicked
    return (ctr * mask).sum() / mask.sum().clamp_min(1.0) + \
        (cvr * cvr_mask).sum() / cvr_mask.sum().clamp_min(1.0)


def dc_loss(gen_logp: Tensor, rank_score: Tensor, mask: Tensor, tau: float = 1.0) -> Tensor:
    """Distribution Consistency [reconstruction of OneRanker, mechanisms.md §3]:
    KL(softmax(rank_score/τ) ‖ softmax(gen_logp)) over each row's candidates, mean over
    rows with at least two. gen_logp, rank_score, mask: [B, K].

    The stop-gradient is on the ranker's side: it is the teacher. The ranker is trained
    on what users did (the value loss); the DC term moves the generator's distribution
    over the same candidates towards the ranker's value order, and never moves the
    ranker towards the generator, so generator updates cannot corrupt the scores that
    rank the slate (the failure the value model is built to avoid)."""
    valid = mask > 0
    rows = valid.sum(1) >= 2
    if not bool(rows.any()):
        return gen_logp.sum() * 0.0
    p = torch.softmax((rank_score.detach() / tau).masked_fill(~valid, -torch.inf), 1)
    log_q = torch.log_softmax(gen_logp.masked_fill(~valid, -torch.inf), 1)
    terms = torch.where(valid & (p > 0), p * (p.clamp_min(1e-30).log() - log_q),
                        torch.zeros_like(p))
    return terms.sum(1)[rows].mean()


def log_money(ev: Tensor) -> Tensor:
    """The ranker's score of :func:`dc_loss`: log of the expected value per impression
    (so τ = 1 asks the generator for probabilities proportional to money)."""
    return torch.log(ev.clamp_min(1e-6))


@dataclass
class _Users:
    history: Tensor
    history_mask: Tensor
    context: Tensor


def prior_class_loss(class_logits: Tensor, leaf: Tensor, weight: Tensor) -> Tensor:
    """Weighted CE of the prior classifier against the routing labels: class_logits
    [B, L], leaf [B], weight [B] (0 = not a positive)."""
    ce = F.cross_entropy(class_logits, leaf, reduction="none")
    return (weight * ce).sum() / (weight > 0).sum().clamp_min(1)


def pretrain_loss(model: GenerativeRecommender, batch: Batch, mtp_weight: float = 0.3,
                  value_weight: float = 0.5, prior_weight: float = 0.5, w_min: float = 0.2,
                  w_max: float = 5.0, dc_weight: float = 0.0, dc_tau: float = 1.0,
                  mtp_gamma: float = 0.5) -> tuple[Tensor, dict[str, float]]:
    """VSL + mtp_weight·MTP + value_weight·value BCE (+ prior_weight·(routed prior CE +
    the prior classifier's CE on the positives' routing labels)) (+ dc_weight·DC over
    each shown slate: in the logs the shown slate is the candidate set the generator and
    ranker both scored)."""
    leaf = model.decoder.leaf(batch.prior, batch.horizon)
    out = model(batch.history, batch.history_mask, batch.context, batch.target, leaf,
                batch.mtp, batch.mtp_mask)
    w = value_weights(batch.value, w_min, w_max)
    l_vsl = vsl_loss(out["logits"], batch.target, w)
    l_mtp = mtp_loss(out["mtp"], batch.mtp, batch.mtp_mask, gamma=mtp_gamma)
    pctr, pcvr = model.value(out["memory"], out["memory_mask"], batch.slate,
                             context=batch.context, exposure=batch.slate_exposure)
    l_val = value_loss(pctr, pcvr, batch.clicked, batch.converted, batch.slate_mask)
    loss = l_vsl + mtp_weight * l_mtp + value_weight * (l_val + model.value.penalty())
    parts = {"vsl": l_vsl.item(), "mtp": l_mtp.item(), "value": l_val.item()}
    if dc_weight > 0:
        rows = torch.nonzero(batch.slate_mask.sum(1) >= 2)[:, 0]
        if rows.numel():
            users = _Users(batch.history[rows], batch.history_mask[rows], batch.context[rows])
            gen = model.sequence_logprob(users, batch.slate[rows])              # [R, I]
            ev = expected_value(torch.sigmoid(pctr[rows]), torch.sigmoid(pcvr[rows]),
                                batch.slate_bid[rows], batch.slate_bid_type[rows])
            l_dc = dc_loss(gen, log_money(ev), batch.slate_mask[rows], dc_tau)
            loss = loss + dc_weight * l_dc
            parts["dc"] = l_dc.item()
    if "prior_logits" in out:
        l_prior = vsl_loss(out["prior_logits"], batch.target, w)
        if "prior_class" in out:
            l_class = prior_class_loss(out["prior_class"], leaf, (w > 0).to(w.dtype))
            l_prior = l_prior + l_class
            parts["prior_class"] = l_class.item()
        loss = loss + prior_weight * l_prior
        parts["prior"] = l_prior.item()
    parts["loss"] = loss.item()
    return loss, parts
