"""The value model's own fitting stage after pretraining: value-only epochs with
held-out early stopping, post-hoc calibration, and its held-out figures.

* :func:`finetune_value`: the encoder and generator frozen, only the value head's
  parameters train (BCE of pCTR on every shown item, of pCVR on every clicked one,
  plus the per-item biases' prior, :meth:`learner.model.ValueHead.penalty`), epoch by
  epoch over each logged slate once. The number of epochs is chosen by early stopping
  on the latest part of the training logs (time split; pretraining keeps those slates
  out of the main stage's value loss, so the head has not seen them), then the head is
  refitted on all of them for that many epochs. The criterion is the joint log-loss of
  (click, conversion) per impression (:func:`joint_logloss`), so the few clicked
  items' pCVR term weighs by its data.
* :func:`calibrate`: a Platt map per head (logit' = a·logit + b) fitted on held-out
  slates (by :func:`finetune_value` and :func:`fit_linear`: on their split, with the
  head fitted on the rest), MAP with a Gaussian prior around the identity (σ =
  ``prior_sd``), so a held-out split with few conversions leaves pCVR near as it was
  (a head with fewer than ``min_events`` held-out events is not fitted at all).
  Pretraining fits the shift b alone (a = 1): the latest logs' base rate, without
  flattening the differences between ads (docs/decisions.md). It is the value
  head's ``calibration`` buffer, so it is part of value.onnx.
* :func:`value_metrics`: log-loss and ECE (equal-mass bins, as the harness reports
  ECE) of pCTR on shown items and pCVR on clicked items.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from learner.data import ExampleSet
from learner.losses import value_loss
from learner.model import POSITIONS, GenerativeRecommender, ValueHead

Chunk = tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]
"""(memory, memory_mask, slate, slate_mask, clicked, converted, context, exposure) of a
chunk of slates."""

__all__ = ["calibrate", "ece", "finetune_value", "fit_linear", "joint_logloss",
           "shown_slates", "value_metrics", "value_split", "without_value_split"]


def shown_slates(ex: ExampleSet) -> ExampleSet:
    """One row per logged slate (the example that carries its request's slate)."""
    return ex.subset(np.flatnonzero(ex.slate_mask.sum(1) > 0))


def ece(p: np.ndarray, y: np.ndarray, bins: int = 10) -> float:
    """Expected calibration error over equal-mass bins (NaN without data)."""
    if not len(p):
        return math.nan
    order = np.argsort(p, kind="stable")
    pa, ya = p[order], y[order]
    return float(sum(len(c) / len(pa) * abs(pa[c].mean() - ya[c].mean())
                     for c in np.array_split(np.arange(len(pa)), min(bins, len(pa)))
                     if len(c)))


@torch.no_grad()
def _memories(model: GenerativeRecommender, ex: ExampleSet,
              batch_size: int) -> list[Chunk]:
    """(memory, memory_mask, slate, slate_mask, clicked, converted, context, exposure) per
    chunk of rows: the encoder runs once, the value head's epochs reuse its output."""
    out = []
    for lo in range(0, len(ex), batch_size):
        b = ex.batch(np.arange(lo, min(len(ex), lo + batch_size)))
        memory, mask = model.encoder(b.history, b.history_mask, b.context)
        out.append((memory, mask, b.slate, b.slate_mask, b.clicked, b.converted, b.context,
                    b.slate_exposure))
    return out


@torch.no_grad()
def _logits(model: GenerativeRecommender, chunks: list[Chunk]
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Flat (pCTR logit, pCVR logit, clicked, converted) of every shown item."""
    ctr, cvr, clk, cv = [], [], [], []
    for memory, mask, slate, smask, clicked, converted, context, exposure in chunks:
        a, b = model.value(memory, mask, slate, context=context, exposure=exposure)
        keep = smask > 0
        ctr.append(a[keep])
        cvr.append(b[keep])
        clk.append(clicked[keep])
        cv.append(converted[keep])
    cat = lambda xs: torch.cat(xs).double().numpy()  # noqa: E731
    return cat(ctr), cat(cvr), cat(clk), cat(cv)


def joint_logloss(ctr: np.ndarray, cvr: np.ndarray, clk: np.ndarray, cv: np.ndarray) -> float:
    """Log-loss of (click, conversion) per impression: pCTR's on every shown item plus
    pCVR's on the clicked ones, over the impressions (each head weighs by its data)."""
    z, y = torch.from_numpy(ctr), torch.from_numpy(clk)
    total = F.binary_cross_entropy_with_logits(z, y, reduction="sum")
    c = torch.from_numpy(clk > 0)
    if bool(c.any()):
        total = total + F.binary_cross_entropy_with_logits(
            torch.from_numpy(cvr)[c], torch.from_numpy(cv)[c], reduction="sum")
    return float(total) / max(1, len(ctr))


def _metrics_of(ctr: np.ndarray, cvr: np.ndarray, clk: np.ndarray,
                cv: np.ndarray) -> dict[str, float]:
    def logloss(z: np.ndarray, y: np.ndarray) -> float:
        if not len(z):
            return math.nan
        return float(F.binary_cross_entropy_with_logits(
            torch.from_numpy(z), torch.from_numpy(y)).item())

    sig = lambda z: 1.0 / (1.0 + np.exp(-z))  # noqa: E731
    c = clk > 0
    return {"value_logloss_ctr": logloss(ctr, clk), "value_logloss_cvr": logloss(cvr[c], cv[c]),
            "value_logloss_joint": joint_logloss(ctr, cvr, clk, cv),
            "value_ece_ctr": ece(sig(ctr), clk), "value_ece_cvr": ece(sig(cvr[c]), cv[c]),
            "value_impressions": float(len(clk)), "value_clicks": float(c.sum())}


def value_metrics(model: GenerativeRecommender, ex: ExampleSet,
                  batch_size: int = 256) -> dict[str, float]:
    """Held-out log-loss and ECE of pCTR (shown items) and pCVR (clicked items) on the
    slates of ``ex``, as served (calibration included)."""
    was = model.training
    model.eval()
    try:
        return _metrics_of(*_logits(model, _memories(model, shown_slates(ex), batch_size)))
    finally:
        model.train(was)


def value_split(train: ExampleSet, val_frac: float) -> int:
    """The first request of ``train``'s latest ``val_frac`` (the value model's
    early-stopping and calibration split; pretraining keeps their slates out of the
    main stage's value loss, so the split is unseen by the value head)."""
    n_req = int(train.request.max()) + 1 if len(train) else 0
    return n_req - round(n_req * val_frac)


def without_value_split(train: ExampleSet, val_frac: float) -> ExampleSet:
    """``train`` with the slates of its value split masked out (generation targets kept)."""
    cut = value_split(train, val_frac)
    mask = np.where((train.request >= cut)[:, None], 0.0, train.slate_mask)
    return dataclasses.replace(train, slate_mask=mask.astype(train.slate_mask.dtype))


def finetune_value(model: GenerativeRecommender, train: ExampleSet, val_frac: float = 0.15,
                   epochs: int = 40, patience: int = 4, lr: float = 3e-3,
                   batch_size: int = 128, weight_decay: float = 0.01, seed: int = 0,
                   calibrate_on_split: bool = True,
                   calibrate_scale: bool = False) -> dict[str, float]:
    """Value-only epochs (see the module docstring). The latest ``val_frac`` of
    ``train``'s requests (:func:`value_split`, unseen by the value head when pretraining
    masked them) are the early-stopping split: epochs on the rest until the split's
    log-loss has not improved for ``patience`` epochs give the best epoch count e* and
    that model's Platt map, fitted on the split (``calibrate_on_split``; its shift
    alone unless ``calibrate_scale``, :func:`calibrate`); then the head
    restarts from where pretraining left it, trains e* epochs on all of ``train`` (the
    latest logs matter most in a drifting world, so none is left out of the final fit)
    and takes the map. Returns the epochs tried, e* (0 = the pretrained head was best),
    the split's best log-loss and the map."""
    cut = value_split(train, val_frac)
    shown = shown_slates(train)
    fit = shown.subset(np.flatnonzero(shown.request < cut))
    val = shown.subset(np.flatnonzero(shown.request >= cut))
    if not len(fit) or not len(val):
        return {}
    was = model.training
    model.eval()        # no dropout; the encoder's output is fixed
    head = model.value
    head.calibration.copy_(head.calibration.new_tensor([[1.0, 0.0], [1.0, 0.0]]))
    params = [p for p in head.parameters() if p.requires_grad]
    own = {id(p) for p in params}
    shared = [p for p in model.parameters() if id(p) not in own]
    frozen = [p.requires_grad for p in shared]
    for p in shared:
        p.requires_grad_(False)
    start = copy.deepcopy(head.state_dict())
    val_chunks = _memories(model, val, 512)

    def run(chunks: list[Chunk], n_epochs: int,
            watch: list[Chunk] | None) -> tuple[int, int, float]:
        head.load_state_dict(start)
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        rng = np.random.default_rng(seed)
        best = joint_logloss(*_logits(model, watch)) if watch else math.nan
        best_epoch = epoch = 0
        best_state = copy.deepcopy(head.state_dict())
        for epoch in range(1, n_epochs + 1):
            for i in rng.permutation(len(chunks)):
                memory, mask, slate, smask, clicked, converted, context, exposure = chunks[i]
                pctr, pcvr = head(memory, mask, slate, context=context, exposure=exposure)
                loss = value_loss(pctr, pcvr, clicked, converted, smask) + head.penalty()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            if watch:
                cur = joint_logloss(*_logits(model, watch))
                if cur < best - 1e-5:
                    best, best_epoch = cur, epoch
                    best_state = copy.deepcopy(head.state_dict())
                elif epoch - best_epoch >= patience:
                    break
        if watch:
            head.load_state_dict(best_state)
        return epoch, best_epoch, best

    out: dict[str, float] = {}
    try:
        tried, best_epoch, best = run(_memories(model, fit, batch_size), epochs, val_chunks)
        platt = None
        if calibrate_on_split:
            out.update(calibrate(model, val, fit_scale=calibrate_scale))
            platt = head.calibration.clone()
        run(_memories(model, shown, batch_size), best_epoch, None)
        if platt is not None:
            head.calibration.copy_(platt)
    except BaseException:
        head.load_state_dict(start)
        raise
    finally:
        for p, g in zip(shared, frozen, strict=True):
            p.requires_grad_(g)
        model.train(was)
    return {"value_epochs": float(tried), "value_best_epoch": float(best_epoch),
            "value_val_logloss": best, **out}


def calibrate(model: GenerativeRecommender, held: ExampleSet, prior_sd: float = 0.5,
              min_events: int = 30, batch_size: int = 512,
              fit_scale: bool = True) -> dict[str, float]:
    """Fit the value head's per-head Platt map on ``held`` (MAP, Gaussian prior of
    standard deviation ``prior_sd`` on scale − 1 and shift; see the module docstring);
    without ``fit_scale`` the scale stays 1 and only the shift is fitted. A head whose
    held-out events (clicks for pCTR, conversions for pCVR) are fewer than
    ``min_events`` keeps the identity. Returns the fitted scale and shift of each head
    fitted."""
    head = model.value
    was = model.training
    model.eval()
    try:
        head.calibration.copy_(head.calibration.new_tensor([[1.0, 0.0], [1.0, 0.0]]))
        ctr, cvr, clk, cv = _logits(model, _memories(model, shown_slates(held), batch_size))
    finally:
        model.train(was)
    out: dict[str, float] = {}
    c = clk > 0
    for k, (z, y) in enumerate(((ctr, clk), (cvr[c], cv[c]))):
        name = ("ctr", "cvr")[k]
        if y.sum() < min_events or (len(y) - y.sum()) < min_events:
            continue
        zt, yt = torch.from_numpy(z), torch.from_numpy(y)
        ab = torch.tensor([1.0, 0.0], dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([ab], lr=0.5, max_iter=100, line_search_fn="strong_wolfe")

        def closure(zt: Tensor = zt, yt: Tensor = yt, ab: Tensor = ab,
                    opt: torch.optim.Optimizer = opt) -> Tensor:
            opt.zero_grad()
            a = ab[0] if fit_scale else 1.0     # shift alone: ab[0] stays at its prior mean 1
            nll = F.binary_cross_entropy_with_logits(a * zt + ab[1], yt, reduction="sum")
            loss = nll + ((ab[0] - 1.0) ** 2 + ab[1] ** 2) / (2 * prior_sd ** 2)
            loss.backward()
            return loss

        opt.step(closure)
        a, b = (float(v) for v in ab.detach())
        head.calibration[k] = head.calibration.new_tensor([a, b])
        out[f"calibration_{name}_scale"], out[f"calibration_{name}_shift"] = a, b
    return out


LINEAR_L2: dict[str, tuple[float, float]] = {
    "item_bias": (2.0, 20.0), "wide_item": (0.5, 2.0), "wide_context": (5.0, 30.0),
    "wide_topic": (2.0, 5.0), "wide_match": (0.1, 0.1), "wide_exposure": (1.0, 1.0),
    "position": (1.0, 0.0), "intercept": (0.0, 0.0)}
"""Base L2 weight of each linear table per head (pCTR, pCVR), on the summed log-loss,
times the scale :func:`fit_linear` picks: the logistic baseline's penalties
(``adloop.baselines.LogisticPolicy.L2``) for the matching tables, fixed by hand."""


Tables = dict[str, Tensor]


@dataclasses.dataclass
class Impressions:
    """Shown items, one row each: what the linear fit reads."""

    deep: Tensor          # [N, 2] float64: the head's logits without the linear terms
    prior: Tensor         # [N, 2] float64: the (industry, goal) prior logits alone
    ids: Tensor           # [N, T]
    context: Tensor       # [N, C + O]
    position: Tensor      # [N]
    clicked: Tensor       # [N] float64
    converted: Tensor     # [N] float64
    time: Tensor          # [N] float64: impression time
    exposure: Tensor      # [N] float64: the user's earlier impressions of the item

    def __len__(self) -> int:
        return int(self.clicked.shape[0])

    def subset(self, keep: Tensor) -> Impressions:
        return Impressions(**{f.name: getattr(self, f.name)[keep]
                              for f in dataclasses.fields(self)})

    @staticmethod
    def cat(parts: list[Impressions]) -> Impressions:
        return Impressions(**{f.name: torch.cat([getattr(x, f.name) for x in parts])
                              for f in dataclasses.fields(Impressions)})

    @staticmethod
    @torch.no_grad()
    def of_slates(head: ValueHead, memory: Tensor, memory_mask: Tensor, slate: Tensor,
                  slate_mask: Tensor, context: Tensor, clicked: Tensor, converted: Tensor,
                  time: Tensor, exposure: Tensor | None = None) -> Impressions:
        """The shown items of B slates [B, K, T] (``time`` [B], one per slate;
        ``exposure`` [B, K], zeros when None)."""
        keep = slate_mask > 0
        pos = torch.arange(slate.shape[1]).clamp_max(POSITIONS - 1).expand_as(keep)
        return Impressions(
            deep=head.deep_logits(memory, memory_mask, slate)[keep].double(),
            prior=head.prior_logits(slate)[keep].double(), ids=slate[keep],
            context=context[:, None, :].expand(-1, slate.shape[1], -1)[keep],
            position=pos[keep], clicked=clicked[keep].double(),
            converted=converted[keep].double(),
            time=time.double()[:, None].expand_as(keep)[keep],
            exposure=(exposure.double()[keep] if exposure is not None
                      else torch.zeros(int(keep.sum()), dtype=torch.float64)))


@torch.no_grad()
def _impressions(model: GenerativeRecommender, ex: ExampleSet) -> Impressions:
    shown = shown_slates(ex)
    parts = []
    for lo in range(0, len(shown), 512):
        rows = np.arange(lo, min(len(shown), lo + 512))
        b = shown.batch(rows)
        memory, mask = model.encoder(b.history, b.history_mask, b.context)
        parts.append(Impressions.of_slates(model.value, memory, mask, b.slate, b.slate_mask,
                                           b.context, b.clicked, b.converted,
                                           torch.from_numpy(shown.time[rows]),
                                           b.slate_exposure))
    return Impressions.cat(parts)


class Design:
    """The linear terms of some impressions as a sparse design matrix: logits [N, 2] =
    offset + X · θ, θ every linear table's rows stacked (:data:`ORDER`), so a fit's
    log-loss and its curvature are one sparse product each. X holds, per row, the
    per-item bias's row, the industry's and level-0 code's own rows, a (context value,
    cell) row per present context value, a (topic, cell) row per distinct topic of the
    user's organic history with its share as coefficient, log(1 + n) on the exposure
    term's row (n the user's earlier impressions of the item) and the position's row (the
    same terms :meth:`ValueHead.linear_logits` computes, plus the position offset)."""

    ORDER = (*ValueHead.LINEAR, "position", "intercept")

    def __init__(self, head: ValueHead, r: Impressions, shapes: dict[str, torch.Size]) -> None:
        assert head.biz is not None
        self.ORDER = tuple(k for k in Design.ORDER if k in shapes)
        self.shapes = shapes
        self.offsets: dict[str, int] = {}
        total = 0
        for k in self.ORDER:
            self.offsets[k] = total
            total += shapes[k][0]
        width = sum(head.wide_cells)
        N = len(r)
        cells = head.cells_of(r.ids)                                           # [N, W]
        W = cells.shape[1]
        row = torch.arange(N)
        parts: list[tuple[Tensor, Tensor, Tensor]] = []

        def add(rows: Tensor, cols: Tensor, vals: Tensor) -> None:
            keep = vals != 0
            parts.append((rows[keep], cols[keep], vals[keep]))

        off = self.offsets
        add(row, off["item_bias"] + head.bucket(r.ids[:, None, :])[:, 0],
            torch.ones(N, dtype=torch.float64))
        add(row[:, None].expand(N, W), off["wide_item"] + cells,
            torch.ones(N, W, dtype=torch.float64))
        C, n_topic = head.n_ctx_ids, head.n_topic_ids
        ctx = r.context[:, :C]
        add(row[:, None, None].expand(N, C, W),
            off["wide_context"] + ctx[:, :, None] * width + cells[:, None, :],
            (ctx > 0).double()[:, :, None].expand(N, C, W))
        if n_topic:
            topics = r.context[:, C:C + n_topic]
            present = (topics > 0).double()
            share = present / (present.sum(1, keepdim=True) + 2.0)
            add(row[:, None, None].expand(N, n_topic, W),
                off["wide_topic"] + topics[:, :, None] * width + cells[:, None, :],
                share[:, :, None].expand(N, n_topic, W))
        if "wide_match" in off:
            with torch.no_grad():
                m = head.match_features(r.context, r.ids[:, None, :])[:, 0].double()
            for f in range(m.shape[1]):
                add(row, off["wide_match"] + f + torch.zeros_like(row), m[:, f])
        if "wide_exposure" in off:
            add(row, off["wide_exposure"] + torch.zeros_like(row),
                torch.log1p(r.exposure.clamp_min(0.0)))
        add(row, off["position"] + (r.position - 1).clamp_min(0),
            (r.position > 0).double())
        if "intercept" in off:
            add(row, off["intercept"] + torch.zeros_like(row), torch.ones(N, dtype=torch.float64))
        rows = torch.cat([a.reshape(-1) for a, _, _ in parts])
        cols = torch.cat([b.reshape(-1) for _, b, _ in parts])
        vals = torch.cat([c.reshape(-1) for _, _, c in parts])
        x = torch.sparse_coo_tensor(torch.stack([rows, cols]), vals, (N, total),
                                    check_invariants=False).coalesce()
        self.x = x
        self.x2 = torch.sparse_coo_tensor(x.indices(), x.values() ** 2, x.shape,
                                          check_invariants=False).coalesce()
        self.mask = {k: torch.ones(2, dtype=torch.float64) for k in self.ORDER}
        self.mask["item_bias"] = head.factor_heads.double()
        self.mask["position"] = torch.tensor([1.0, 0.0], dtype=torch.float64)
        if "wide_exposure" in self.mask:
            self.mask["wide_exposure"] = torch.tensor([1.0, 0.0], dtype=torch.float64)
        """Heads each table acts on (the per-item bias: ``factor_heads``; the position
        offset and the exposure term: pCTR only)."""
        self.mask_flat = self.flat({k: self.mask[k].expand(shapes[k]) for k in self.ORDER})
        self.interest = self.flat({k: torch.full(shapes[k], float(k in ValueHead.INTEREST),
                                                 dtype=torch.float64)
                                   for k in self.ORDER})[:, :1] if head.share else None
        """[P, 1]: 1 on the pCTR interest terms pCVR shares (``value_share_interest``)."""

    def shared(self, x: Tensor, flat: Tensor, interest: Tensor | None,
               gamma: Tensor | float) -> Tensor:
        """What pCVR takes from pCTR's interest terms, [N, 2] = [0, γ · X_interest ·
        θ_ctr]: ``x`` the design's columns whose rows of θ are ``flat``, ``interest``
        (:attr:`interest`, the same rows) None without sharing."""
        if interest is None:
            return torch.zeros(x.shape[0], 2, dtype=torch.float64)
        return F.pad(gamma * torch.sparse.mm(x, flat[:, :1] * interest), (1, 0))

    def flat(self, p: Tables) -> Tensor:
        """Every table's rows stacked [P, 2] (:data:`ORDER`)."""
        return torch.cat([p[k].reshape(-1, 2) for k in self.ORDER])

    def logits(self, p: Tables, gamma: float = 0.0) -> Tensor:
        """X · θ [N, 2] plus pCVR's share of the interest terms (γ ``gamma``; the offset
        not included; masked heads left out)."""
        flat = self.flat(p) * self.mask_flat
        return torch.sparse.mm(self.x, flat) + self.shared(self.x, flat, self.interest, gamma)

    def split(self, flat: Tensor) -> Tables:
        """A [P, 2] vector back into tables."""
        return {k: flat[self.offsets[k]:self.offsets[k] + self.shapes[k][0]].reshape(
                    self.shapes[k]) for k in self.ORDER}


def _offset(r: Impressions, deep: bool) -> Tensor:
    return r.deep if deep else r.prior


def _recency(r: Impressions, now: float, half_life_s: float) -> Tensor:
    if half_life_s <= 0:
        return torch.ones_like(r.time)
    return torch.pow(0.5, (now - r.time).clamp_min(0.0) / half_life_s)


def _l2(scale: float) -> Tables:
    return {k: torch.tensor(v, dtype=torch.float64) * scale for k, v in LINEAR_L2.items()}


@dataclasses.dataclass
class Prior:
    """The penalty of a linear fit, per parameter θ: L2·θ² + decay·(−2·L2·a·(θ − a) +
    ½·H·(θ − a)²): a ridge (no anchor) or, online, the logs' log-loss expanded to second
    order at their fit ``a`` (curvature ``H``, weight ``decay``; :class:`OnlineLinear`)."""

    l2: Tables
    anchor: Tables | None = None
    curvature: Tables | None = None
    decay: float = 0.0


SHARE_L2 = 1.0
"""L2 weight of γ, pCVR's share of pCTR's interest terms (``value_share_interest``)."""


def _fit(head: ValueHead, r: Impressions, start: Tables, deep: bool, w: Tensor, prior: Prior,
         iters: int, fixed: Tables | None = None, gamma: float = 0.0,
         learn_gamma: bool = False) -> tuple[Tables, float]:
    """Full-batch L-BFGS of the weighted joint log-loss of ``r`` + the ``prior`` over the
    tables ``start`` (``fixed`` ones take part but do not move). Only the parameters some
    row touches are optimised; each of the others has its penalty's minimiser in closed
    form, a·decay·(2·L2 + H) / (2·L2 + decay·H) (0 under a ridge). With a head that
    shares pCTR's interest terms with pCVR, γ is ``gamma``, fitted too (under
    :data:`SHARE_L2`) with ``learn_gamma``. Returns the tables and γ."""
    tables = {**start, **(fixed or {})}
    design = Design(head, r, {k: v.shape for k, v in tables.items()})
    flat = design.flat({k: v.detach().double() for k, v in tables.items()})
    l2 = design.flat({k: prior.l2[k].expand(v.shape) for k, v in tables.items()})
    zero = {k: torch.zeros(v.shape, dtype=torch.float64) for k, v in tables.items()}
    anchor = design.flat({**zero, **(prior.anchor or {})})
    curv = design.flat({**zero, **(prior.curvature or {})})
    d = prior.decay
    moving = design.flat({k: torch.full(v.shape, float(k not in (fixed or {})),
                                        dtype=torch.float64) for k, v in tables.items()}) > 0
    touched = torch.zeros(flat.shape[0], dtype=torch.bool)
    touched[design.x.indices()[1].unique()] = True
    free = (touched[:, None] & moving).any(1)            # rows of θ the fit moves
    cols = torch.nonzero(free).squeeze(1)
    # the rest: fixed, or their penalty's minimiser
    denom = 2.0 * l2 + d * curv
    alone = torch.where(denom > 0, anchor * d * (2.0 * l2 + curv) / denom.clamp_min(1e-300),
                        anchor)
    base = torch.where(moving & ~free[:, None], alone, flat)
    base[cols] = 0.0
    x = design.x.index_select(1, cols).coalesce()
    base_m = base * design.mask_flat
    const = _offset(r, deep) + torch.sparse.mm(design.x, base_m)
    interest = design.interest
    interest_c = None if interest is None else interest[cols]
    # what pCVR takes from the interest terms that do not move: γ × this, [N, 1]
    shared_base = (torch.zeros(len(r), 1, dtype=torch.float64) if interest is None
                   else torch.sparse.mm(design.x, base_m[:, :1] * interest))
    theta = flat[cols].clone().requires_grad_(True)
    learn_gamma = learn_gamma and interest is not None
    g = torch.tensor(gamma, dtype=torch.float64, requires_grad=learn_gamma)
    l2_c, a_c, h_c = l2[cols], anchor[cols], curv[cols]
    mask_c = design.mask_flat[cols]
    clicked = r.clicked > 0
    opt = torch.optim.LBFGS([theta, g] if learn_gamma else [theta], lr=1.0, max_iter=iters,
                            line_search_fn="strong_wolfe", tolerance_grad=1e-6,
                            history_size=10)

    def closure() -> Tensor:
        opt.zero_grad()
        th = theta * mask_c
        z = (const + torch.sparse.mm(x, th) + F.pad(g * shared_base, (1, 0))
             + design.shared(x, th, interest_c, g))
        loss = F.binary_cross_entropy_with_logits(z[:, 0], r.clicked, weight=w,
                                                  reduction="sum")
        if bool(clicked.any()):
            loss = loss + F.binary_cross_entropy_with_logits(
                z[clicked, 1], r.converted[clicked], weight=w[clicked], reduction="sum")
        loss = loss + (l2_c * theta.pow(2)).sum()
        if d > 0:
            diff = theta - a_c
            loss = loss + d * ((-2.0 * l2_c * a_c * diff).sum() + 0.5 * (h_c * diff.pow(2)).sum())
        if learn_gamma:
            loss = loss + SHARE_L2 * g.pow(2)
        loss.backward()
        return loss

    if len(cols):
        opt.step(closure)
    out = base.clone()
    out[cols] = theta.detach()
    fitted = design.split(out)
    return {k: fitted[k] for k in start}, float(g.detach())


def _curvature(head: ValueHead, p: Tables, r: Impressions, deep: bool, w: Tensor,
               gamma: float = 0.0) -> Tables:
    """The diagonal of the weighted log-loss's Hessian in each table at ``p``:
    Σ w·p̂(1-p̂)·coefficient² per parameter (pCVR over the clicked rows only; a shared
    interest term's pCTR parameter gets γ² × its pCVR curvature too)."""
    design = Design(head, r, {k: v.shape for k, v in p.items()})
    with torch.no_grad():
        q = torch.sigmoid(_offset(r, deep) + design.logits(p, gamma))
        a = w[:, None] * q * (1.0 - q)
        a[:, 1] = a[:, 1] * (r.clicked > 0)
        h = torch.sparse.mm(design.x2.t(), a) * design.mask_flat
        if design.interest is not None:     # pCVR's loss bends the shared pCTR terms too
            h[:, :1] += gamma ** 2 * torch.sparse.mm(design.x2.t(), a[:, 1:]) * design.interest
        return design.split(h)


def _linear_logits(head: ValueHead, p: Tables, r: Impressions, deep: bool,
                   gamma: float = 0.0) -> Tensor:
    """Logits [N, 2] of the impressions ``r`` under the linear tables ``p`` (γ ``gamma``)."""
    design = Design(head, r, {k: v.shape for k, v in p.items()})
    return _offset(r, deep) + design.logits(p, gamma)


def fit_linear(model: GenerativeRecommender, train: ExampleSet, val_frac: float = 0.15,
               scales: tuple[float, ...] = (0.3, 1.0, 3.0, 10.0),
               half_life_s: float = 12 * 3600.0, iters: int = 100,
               calibrate_on_split: bool = True, try_deep: bool = False,
               calibrate_scale: bool = False) -> dict[str, float]:
    """Fit the value head's linear terms to convergence, as a logistic model is fitted.

    The per-item biases and the wide tables (:data:`learner.model.ValueHead.LINEAR`)
    are the parameters of a logistic regression whose offset is the prior, plus a pCTR
    offset per slate position (position bias in the logs; not served). Full-batch
    L-BFGS on the joint log-loss (pCTR on every shown item, pCVR on the clicked ones),
    the rows weighted by ``0.5 ** (age / half_life_s)``, each table under the L2 of
    :data:`LINEAR_L2` times a scale. The scale is chosen by the joint log-loss on the
    value split (:func:`value_split`: the latest ``val_frac`` of the requests) of a fit
    on the rest, then that fit's Platt map is fitted on the split
    (``calibrate_on_split``) and the terms are refitted on everything (warm-started).

    The rest of the head (the decoder's logits and the user × item interaction:
    :meth:`ValueHead.deep_logits`) is zeroed. With ``try_deep``, keeping it as the
    offset is a candidate too, chosen on the same split (a variant: in the closed loop
    a head that kept it earned about half the revenue; docs/decisions.md).

    The head keeps what :class:`OnlineLinear` needs to go on online (``linear_fit``: the
    scale, the deep flag, the logs' latest time and the half-life; the position
    offsets; each table's curvature at the fit). A no-op for a head without wide terms."""
    head: ValueHead = model.value
    if not head.wide:
        return {}
    cut = value_split(train, val_frac)
    was = model.training
    model.eval()
    try:
        rows = _impressions(model, train)
        shown = shown_slates(train)
        early = torch.from_numpy(np.repeat(shown.request, (shown.slate_mask > 0).sum(1)) < cut)
        fit, val = rows.subset(early), rows.subset(~early)
        if not len(fit) or not len(val):
            return {}
        start = {k: torch.zeros_like(v) for k, v in head.linear_tables().items()}
        start["position"] = torch.zeros(POSITIONS - 1, 2)
        start["intercept"] = torch.zeros(1, 2)
        prior0 = head.prior_logit.detach().clone()
        w_fit = _recency(fit, float(fit.time.max()), half_life_s)
        best: tuple[float, float, bool, Tables, float] | None = None
        for deep in (True, False) if try_deep else (False,):
            for scale in scales:
                p, gamma = _fit(head, fit, start, deep, w_fit, Prior(_l2(scale)), iters,
                                learn_gamma=True)
                with torch.no_grad():
                    z = _linear_logits(head, p, val, deep, gamma)
                loss = joint_logloss(z[:, 0].numpy(), z[:, 1].numpy(), val.clicked.numpy(),
                                     val.converted.numpy())
                if best is None or loss < best[0]:
                    best = (loss, scale, deep, p, gamma)
        assert best is not None
        loss, scale, deep, p, gamma = best
        with torch.no_grad():
            if not deep:
                for param in head.deep_output_parameters():
                    param.zero_()
                rows.deep.copy_(rows.prior)
        _store(head, p, gamma)
        _set_intercept(head, prior0, p)
        out: dict[str, float] = {"value_linear_l2_scale": scale,
                                 "value_linear_deep": float(deep),
                                 "value_linear_val_logloss": loss}
        if calibrate_on_split:
            out.update(calibrate(model, train.subset(np.flatnonzero(train.request >= cut)),
                                 fit_scale=calibrate_scale))
        now = float(rows.time.max())
        w = _recency(rows, now, half_life_s)
        p, gamma = _fit(head, rows, p, deep, w, Prior(_l2(scale)), iters, gamma=gamma,
                        learn_gamma=True)
        _store(head, p, gamma)
        if head.share:
            out["value_interest_share"] = gamma
        curvature = _curvature(head, p, rows, deep, w, gamma)
        _set_intercept(head, prior0, p)
        out["value_intercept_ctr"], out["value_intercept_cvr"] = (
            float(v) for v in p["intercept"][0])
        with torch.no_grad():
            for k, c in curvature.items():
                if k not in ("position", "intercept"):
                    getattr(head, f"{k}_curvature").copy_(c.to(torch.float32))
            head.linear_position.copy_(p["position"].to(torch.float32))
            head.linear_fit.copy_(torch.tensor([scale, float(deep), now, half_life_s]))
        return out
    finally:
        model.train(was)


def _set_intercept(head: ValueHead, prior0: Tensor, p: Tables) -> None:
    """Fold the fit's unpenalised per-head intercept into the head's prior logits (served
    with them; the online refits keep it fixed, as the position offsets)."""
    with torch.no_grad():
        head.prior_logit.copy_(prior0 + p["intercept"][0].to(prior0.dtype)[:, None, None])


def _store(head: ValueHead, p: Tables, gamma: float | None = None) -> None:
    with torch.no_grad():
        for k, t in head.linear_tables().items():
            t.copy_(p[k].to(t.dtype))
        if gamma is not None and head.share:
            head.interest_share.fill_(gamma)


def _gamma(head: ValueHead) -> float:
    """The head's γ (0 without sharing)."""
    return float(head.interest_share) if head.share else 0.0


class OnlineLinear:
    """The value head's linear terms refitted online, to convergence, on every update.

    Pretraining's :func:`fit_linear` leaves a fit θ̂ of the logs, its scale and each
    table's curvature H (the diagonal of the logs' log-loss Hessian at θ̂). Online, the
    logs are not kept: their log-loss is replaced by its second-order expansion at θ̂
    (a diagonal Laplace approximation, as in online Bayesian logistic regression), whose
    weight decays with the logs' age at the same half-life as the rows' (``d = 0.5 **
    ((now - t_logs) / half_life)``): the objective of a refit is the weighted joint
    log-loss of every shown item since pretraining (rows older than 8 half-lives, or
    beyond ``max_rows``, are dropped) + Σ_tables L2·θ² + d·(−2·L2·θ̂·(θ − θ̂) +
    ½·H·(θ − θ̂)²), the same objective as refitting on the logs and the new rows
    together up to third-order terms. Full-batch L-BFGS, ``iters`` iterations warm-started
    from the current tables (the logistic baseline refits 15 per update too); the
    position offsets and the deep/prior choice stay as pretraining left them; each
    row's offset is the head's deep logits when it arrived."""

    def __init__(self, model: GenerativeRecommender, iters: int = 15,
                 max_rows: int = 100_000) -> None:
        head: ValueHead = model.value
        self.head = head
        scale, deep, t_end, half_life = (float(x) for x in head.linear_fit)
        self.deep, self.t_end, self.half_life = bool(deep), t_end, half_life
        self.l2 = _l2(scale)
        self.anchor = {k: v.detach().double().clone()
                       for k, v in head.linear_tables().items()}
        self.curvature = {k: getattr(head, f"{k}_curvature").detach().double().clone()
                          for k in self.anchor}
        self.position = head.linear_position.detach().double().clone()
        self.iters, self.max_rows = iters, max_rows
        self.rows: Impressions | None = None
        self.refits = 0

    @staticmethod
    def fitted(model: GenerativeRecommender) -> bool:
        """Whether ``model``'s head has wide terms that :func:`fit_linear` fitted."""
        head = model.value
        return bool(head.wide) and float(head.linear_fit[3]) > 0

    def add(self, rows: Impressions) -> None:
        if not self.deep:
            rows = dataclasses.replace(rows, deep=rows.prior)
        self.rows = rows if self.rows is None else Impressions.cat([self.rows, rows])
        now = float(self.rows.time.max())
        keep = self.rows.time >= now - 8 * self.half_life
        if int(keep.sum()) > self.max_rows:
            keep &= torch.arange(len(self.rows)) >= len(self.rows) - self.max_rows
        if not bool(keep.all()):
            self.rows = self.rows.subset(keep)

    def refit_with(self, rows: Impressions) -> dict[str, float]:
        """:meth:`add` then :meth:`refit`."""
        self.add(rows)
        return self.refit()

    @torch.no_grad()
    def load(self, tables: Tables) -> None:
        """Take tables another process refitted (the rows stay where they were fitted)."""
        _store(self.head, tables)

    def refit(self) -> dict[str, float]:
        """Refit the tables on the rows so far (no-op without rows)."""
        if self.rows is None or not len(self.rows):
            return {}
        now = max(float(self.rows.time.max()), self.t_end)
        decay = 0.5 ** ((now - self.t_end) / self.half_life)
        start = {k: v.detach() for k, v in self.head.linear_tables().items()}
        p, _ = _fit(self.head, self.rows, start, self.deep,
                    _recency(self.rows, now, self.half_life),
                    Prior(self.l2, self.anchor, self.curvature, decay), self.iters,
                    fixed={"position": self.position}, gamma=_gamma(self.head))
        _store(self.head, p)
        self.refits += 1
        return {"linear_refits": float(self.refits), "linear_rows": float(len(self.rows)),
                "linear_logs_weight": decay}
