"""RSPO: ranking-guided softmax preference optimization (GR4AD) — a labelled reconstruction.

The paper's exact loss is not public. This is the reconstruction of
``docs/mechanisms.md`` §1.5, built on Softmax-DPO (S-DPO):

* Per request, the K served items ``y_k`` and their realized value rewards ``r_k``.
* Implicit rewards ``s_k = β·(log π_θ(y_k|x) − log π_ref(y_k|x))`` (log-probs summed
  over id levels).
* Plackett–Luce over the items sorted by reward, each stage weighted by its rank gain:

      L = − Σ_i λ_i · [ s_(i) − log( exp s_(i) + Σ_{j: r_j < r_(i)} exp s_j ) ]

  Only items with a strictly lower reward are negatives of item ``(i)``, so ties
  contribute nothing; ``λ_i = (G(r_(i)) − G(r_min)) / log2(1 + rank_i)`` (tied items
  share a rank) with
  ``G(r) = 2^{r / r_max} − 1`` (NDCG-style gain, rewards scaled per list), normalised
  over the batch. Top positions and large value gaps dominate. With all rewards equal
  every λ is 0, so the gradient vanishes; with π_θ = π_ref the loss still pushes
  higher-value items up whenever rewards differ.
* Anchoring: the caller adds ``α·L_VSL`` and refreshes π_ref to the last published
  snapshot (see ``learner.online``).

``hepo_loss`` is the optional HEPO-style per-level credit (GPR §2.3, also a
reconstruction): per request the group is its final beams (what the server logged,
``Feedback.beams``; the shown items when a list has none); at each id level a beam's
token gets the advantage of its child prefix over the sibling beams sharing its parent
prefix (:func:`sibling_advantages`: mean reward under the child minus the group's
mean, over the group's std, so each group's advantages sum to zero), in a PPO-style
clipped ratio against π_ref.

All functions are pure tensor maths: tests call them with no model and no Kafka.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class RSPOConfig:
    beta: float = 0.5
    """Scale of the implicit reward β·log(π_θ/π_ref)."""
    vsl_alpha: float = 0.2
    """Weight of the VSL anchoring term added by the learner."""
    rspo_weight: float = 1.0
    """Weight of the RSPO term (0 gives the VSL-only ablation)."""
    hepo_weight: float = 0.0
    """Weight of the per-level (HEPO-style) credit term over sibling beams; 0 disables
    it."""
    hepo_clip: float = 0.2
    """ε of HEPO's clipped ratio."""
    dc_weight: float = 0.0
    """Weight of the Distribution Consistency term (:func:`learner.losses.dc_loss`): the
    generator's distribution over each list's candidates (its logged final beams when it
    has them) towards the ranker's; 0 = off."""
    dc_tau: float = 1.0
    """Temperature of the ranker's side of the DC term."""
    organic_weight: float = 1.0
    """Weight of the organic term: RSPO plus a VSL anchor over each mixed feed's organic
    items, rewarded by their engagement (:func:`organic_engagement`); 0 = organic
    feedback is not trained on. On by default: in closed loop with mixed feeds it raised
    the organic items' expected engagement 1.17× (95 % CI 1.05–1.30) without moving the
    ads' RPM (bench/organic.py); lists without organic items are unaffected."""
    organic_dwell_s: float = 30.0
    """Dwell seconds worth one like in the organic engagement reward (capped at one)."""
    min_gap: float = 1e-9
    """Rewards closer than this count as ties."""
    reward: str = "value"
    """``value``: dense rewards from the value model's expected value, corrected towards
    the realized reward (learner.rspo_step); ``realized``: the realized reward alone."""
    realized_weight: float = 0.3
    """η in ``(1-η)·expected + η·realized`` (``reward="value"``)."""
    money_scale: bool = True
    """Gains linear in money on one scale for all lists (False: per-list 2^{r/r_max})."""
    anchor_clicks_only: bool = True
    """VSL anchor positives are clicks and conversions only (False: any reward > 0,
    which makes every CPM impression a positive)."""
    value_detach: bool = False
    """The value loss does not flow into the encoder (the value head reads it as fixed
    features)."""
    value_deep_online: bool = False
    """Online, the value loss also trains the value head's decoder output and user × item
    interaction where pretraining zeroed them to serve the linear terms alone
    (:func:`learner.value_fit.fit_linear`). Off: they stay at zero, so the served value
    model is the cell prior plus the linear terms the learner refits to convergence
    (``OnlineLinear``), which treat that prior as their whole offset; trained, the two
    parts fit the same targets without seeing each other (docs/decisions.md)."""
    generator_encoder_grad: bool = False
    """RSPO and the VSL anchor move the encoder too. Off: online, the generator's terms
    train the decoder and item table only, and the encoder, whose memory the value head
    reads, learns only from the value loss, so generator updates cannot move the scores
    that rank the slate."""


def organic_engagement(viewed: bool, liked: bool, dwell_s: float, dwell_unit_s: float
                       ) -> float:
    """The reward of one organic item of a mixed feed: a like counts 1 and dwell counts
    ``min(dwell_s / dwell_unit_s, 1)``; an item not viewed earns 0 (in [0, 2])."""
    if not viewed:
        return 0.0
    return float(liked) + min(max(dwell_s, 0.0) / dwell_unit_s, 1.0)


def rank_gain_weights(rewards: Tensor, mask: Tensor,
                      money_scale: float | None = None) -> tuple[Tensor, Tensor]:
    """Order by reward and the rank-gain weight of each stage.

    rewards, mask: [B, K] (mask 1 = real item).
    Returns ``order`` [B, K] (indices, highest reward first, padding last) and
    ``lam`` [B, K] (weight of the stage whose positive is ``order[:, i]``; unnormalised).

    With ``money_scale`` the gain is linear in money, ``(r - r_min) / money_scale``, one
    scale for every list, so a list whose best item is worth 60 weighs ~10^4 times one
    whose best item is a CPM impression worth 0.004. Without it (the original form) each
    list's gains are scaled by its own top reward (``2^{r/r_max} - 1``), which erases
    magnitude across lists.
    """
    neg_inf = torch.finfo(rewards.dtype).min
    keyed = torch.where(mask > 0, rewards, torch.full_like(rewards, neg_inf))
    order = torch.argsort(keyed, dim=1, descending=True, stable=True)
    r_sorted = torch.gather(rewards, 1, order)
    m_sorted = torch.gather(mask, 1, order)
    big = torch.finfo(rewards.dtype).max
    r_min = torch.where(m_sorted > 0, r_sorted, torch.full_like(r_sorted, big)).min(dim=1).values
    r_max = torch.where(m_sorted > 0, r_sorted, torch.full_like(r_sorted, -big)).max(dim=1).values
    if money_scale is not None:
        gain = (r_sorted - r_min.unsqueeze(1)) / max(money_scale, 1e-12)
    else:
        scale = torch.clamp(r_max.abs(), min=1e-6).unsqueeze(1)
        gain = torch.pow(2.0, r_sorted / scale) - torch.pow(2.0, r_min.unsqueeze(1) / scale)
    # competition rank: 1 + number of real items with a strictly higher reward, so
    # tied items share a rank (and a weight)
    higher = (r_sorted.unsqueeze(1) > r_sorted.unsqueeze(2)) & (m_sorted.unsqueeze(1) > 0)
    rank = 1.0 + higher.sum(dim=2).to(rewards.dtype)                     # [B, K]
    discount = 1.0 / torch.log2(1.0 + rank)
    lam = torch.clamp(gain, min=0.0) * discount * m_sorted
    return order, lam


def rspo_loss(logp: Tensor, logp_ref: Tensor, rewards: Tensor, mask: Tensor,
              beta: float, list_weight: Tensor | None = None,
              min_gap: float = 1e-9,
              money_scale: float | None = None) -> tuple[Tensor, dict[str, float]]:
    """The RSPO loss of a batch of lists.

    logp, logp_ref: [B, K] sequence log-probs under π_θ and π_ref (π_ref detached).
    rewards: [B, K] value rewards; mask: [B, K] 1 for real items.
    list_weight: [B] per-list weight (fake-negative / correction weighting), default 1.
    money_scale: see :func:`rank_gain_weights` (gains linear in money on one scale for
    every list instead of each list's own). Either way the weights are normalised by
    their batch total, so the step size does not grow with the batch's money.
    Returns (scalar loss, stats).
    """
    B, K = logp.shape
    s = beta * (logp - logp_ref.detach())                                   # [B, K]
    order, lam = rank_gain_weights(rewards, mask, money_scale)
    s_sorted = torch.gather(s, 1, order)                                    # [B, K]
    r_sorted = torch.gather(rewards, 1, order)
    m_sorted = torch.gather(mask, 1, order)
    # negatives of stage i: items j with r_j < r_(i) - min_gap (strictly lower value)
    lower = (r_sorted.unsqueeze(1) < r_sorted.unsqueeze(2) - min_gap)       # [B, K(i), K(j)]
    lower = lower & (m_sorted.unsqueeze(1) > 0) & (m_sorted.unsqueeze(2) > 0)
    neg_inf = torch.finfo(s.dtype).min
    neg_scores = torch.where(lower, s_sorted.unsqueeze(1).expand(B, K, K),
                             torch.full((B, K, K), neg_inf, dtype=s.dtype, device=s.device))
    # log(exp s_i + Σ_lower exp s_j)
    denom = torch.logsumexp(torch.cat([s_sorted.unsqueeze(2), neg_scores], dim=2), dim=2)
    has_neg = lower.any(dim=2)
    stage = torch.where(has_neg, s_sorted - denom, torch.zeros_like(s_sorted))  # [B, K]
    lam = lam * has_neg
    if list_weight is not None:
        lam = lam * list_weight.unsqueeze(1)
    total = lam.sum()
    loss = -(lam * stage).sum() / torch.clamp(total, min=1e-12)
    with torch.no_grad():
        active = has_neg.any(dim=1)
        top_is_best = (s_sorted[:, 0] >= s_sorted.max(dim=1).values - 1e-12) & active
        stats = {
            "rspo_loss": float(loss.detach()),
            "implicit_reward_margin": float(
                ((s_sorted[:, 0] - (s_sorted * m_sorted).sum(1) / m_sorted.sum(1).clamp(min=1))
                 [active]).mean()) if bool(active.any()) else 0.0,
            "lists_with_preference": float(active.sum()),
            "top_item_preferred": float(top_is_best.sum() / active.sum().clamp(min=1)),
        }
    return loss, stats


def sibling_advantages(ids: Tensor, rewards: Tensor, mask: Tensor,
                       min_std: float = 1e-6) -> Tensor:
    """HEPO's per-level advantages over sibling beams [B, J, T] (reconstruction).

    ids: [B, J, T] full ids of a request's candidates (its final beams; distinct ids);
    rewards, mask: [B, J] (mask 1 = real candidate). At level ``l`` the group of
    candidate ``k`` is every candidate sharing its parent prefix ``ids[k, :l]``; its
    advantage is

        A[k, l] = (mean r over {j : ids[j, :l+1] == ids[k, :l+1]}
                   − mean r over the group) / std of r over the group

    so the advantages of a group sum to zero over its members, a level where the whole
    group takes the same code (a group of one, a forced level) has zero advantage, and
    so does a group whose rewards are all equal (std below ``min_std``). Computed in
    float64; padding gets 0.
    """
    B, J, T = ids.shape
    m = mask > 0
    both = m[:, :, None] & m[:, None, :]                                   # [B, J, J]
    r = rewards.detach().to(torch.float64)[:, None, :].expand(B, J, J)
    adv = torch.zeros(B, J, T, dtype=torch.float64, device=ids.device)
    same_parent = both
    for level in range(T):
        same_node = same_parent & (ids[:, :, None, level] == ids[:, None, :, level])
        node_mean = (r * same_node).sum(-1) / same_node.sum(-1).clamp(min=1)
        n = same_parent.sum(-1).clamp(min=1)
        parent_mean = (r * same_parent).sum(-1) / n
        std = torch.sqrt(((r - parent_mean[..., None]) ** 2 * same_parent).sum(-1) / n)
        a = (node_mean - parent_mean) / std.clamp(min=min_std)
        adv[:, :, level] = torch.where(std >= min_std, a, torch.zeros_like(a))
        same_parent = same_node
    return adv * m[..., None]


def hepo_loss(level_logp: Tensor, level_logp_ref: Tensor, ids: Tensor, rewards: Tensor,
              mask: Tensor, clip: float = 0.2, list_weight: Tensor | None = None,
              min_std: float = 1e-6) -> tuple[Tensor, dict[str, float]]:
    """HEPO-style per-level credit over sibling beams (GPR §2.3; reconstruction).

    level_logp, level_logp_ref: [B, J, T] per-level token log-probs of each request's
    candidates under π_θ and the reference policy π_ref (the old policy of the ratio;
    detached). ids, rewards, mask: as :func:`sibling_advantages`; list_weight [B].

        L = − Σ_{b,k,l} w_b · min(ρ A, clip(ρ, 1 ± ε) A) / #{(b, k, l) : A ≠ 0}
        ρ[k, l] = exp(log π_θ − log π_ref) of candidate k's level-l token

    Tokens of a level with no choice to credit (A = 0) neither pull nor count, so forced
    levels do not dilute the term. Returns (loss, stats).
    """
    adv = sibling_advantages(ids, rewards, mask, min_std).to(level_logp.dtype)
    if list_weight is not None:
        adv = adv * list_weight[:, None, None]
    ratio = torch.exp(level_logp - level_logp_ref.detach())
    surrogate = torch.minimum(ratio * adv, torch.clamp(ratio, 1 - clip, 1 + clip) * adv)
    active = adv != 0
    n = active.sum().clamp(min=1)
    loss = -surrogate.sum() / n
    with torch.no_grad():
        stats = {"hepo_tokens": float(active.sum()),
                 "hepo_lists": float(active.flatten(1).any(1).sum()),
                 "hepo_clipped": float(((ratio - 1).abs() > clip)[active].float().mean())
                 if bool(active.any()) else 0.0}
    return loss, stats


def fake_negative_weight(elapsed_s: Tensor, delay_median_s: float = 600.0,
                         delay_sigma: float = 1.5, early_share: float = 0.35,
                         early_mean_s: float = 180.0) -> Tensor:
    """Probability that a conversion, if one is coming, has already arrived after ``elapsed_s``.

    A provisional list's unconverted items may be fake negatives; the learner weights
    such lists by this CDF (ES-DFM / DEFER style) so early, uncertain negatives count
    less, and corrections later supply the missing mass. The delay model is a mixture of
    an exponential (early conversions) and a log-normal tail; parameters match the
    simulator's defaults and are configurable.
    """
    e = torch.clamp(elapsed_s, min=0.0)
    early = 1.0 - torch.exp(-e / early_mean_s)
    log_e = torch.log(torch.clamp(e, min=1e-6))
    z = (log_e - math.log(delay_median_s)) / (delay_sigma * math.sqrt(2))
    late = 0.5 * (1.0 + torch.erf(z))
    return early_share * early + (1.0 - early_share) * late
