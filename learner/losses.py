"""Pretraining losses: VSL (value-weighted id cross-entropy), MTP, value-head BCE.

VSL and its weight function are the [reconstruction] of mechanisms.md §1.4 (GR4AD's
value-aware supervised learning; GPR's VAFT has the same form):

    L_VSL = Σ_n w_n Σ_t CE(logits_{n,t}, c_{n,t}) / #{n : w_n > 0}
    w_n   = clip(log(1 + v_n) / mean_{m: v_m > 0} log(1 + v_m), w_min, w_max)

with v_n the example's realized value (reward). Examples with v_n = 0 carry no
generation loss. MTP is Σ_h γ_h CE_h over the future targets that exist (§2.3).
Each function is swappable: pretraining only calls :func:`pretrain_loss`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from learner.data import Batch
from learner.model import GenerativeRecommender

BID_TYPES = ("cpc", "cpa", "cpm")
"""Bid type codes of :func:`expected_value` (index = code)."""


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
             gammas: Sequence[float] | None = None) -> Tensor:
    """Σ_h γ_h · mean CE of head h over rows that have an h-th future target.
    mtp_logits [B, n_mtp, T, V], mtp_target [B, n_mtp, T], mtp_mask [B, n_mtp]."""
    n_mtp = mtp_logits.shape[1]
    gam = torch.tensor(gammas if gammas is not None else [0.5 ** h for h in range(n_mtp)],
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


def pretrain_loss(model: GenerativeRecommender, batch: Batch, mtp_weight: float = 0.3,
                  value_weight: float = 0.5, prior_weight: float = 0.5, w_min: float = 0.2,
                  w_max: float = 5.0) -> tuple[Tensor, dict[str, float]]:
    """VSL + mtp_weight·MTP + value_weight·value BCE (+ prior_weight·routed prior CE)."""
    out = model(batch.history, batch.history_mask, batch.context, batch.target, batch.prior)
    w = value_weights(batch.value, w_min, w_max)
    l_vsl = vsl_loss(out["logits"], batch.target, w)
    l_mtp = mtp_loss(out["mtp"], batch.mtp, batch.mtp_mask)
    pctr, pcvr = model.value(out["memory"], out["memory_mask"], batch.slate)
    l_val = value_loss(pctr, pcvr, batch.clicked, batch.converted, batch.slate_mask)
    loss = l_vsl + mtp_weight * l_mtp + value_weight * l_val
    parts = {"vsl": l_vsl.item(), "mtp": l_mtp.item(), "value": l_val.item()}
    if "prior_logits" in out:
        l_prior = vsl_loss(out["prior_logits"], batch.target, w)
        loss = loss + prior_weight * l_prior
        parts["prior"] = l_prior.item()
    parts["loss"] = loss.item()
    return loss, parts
