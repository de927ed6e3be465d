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
  slates (by :func:`finetune_value`: on its split, with the early-stopped head), MAP
  with a Gaussian prior around the identity (σ = ``prior_sd``), so a held-out split
  with few conversions leaves pCVR near as it was (a head with fewer
  than ``min_events`` held-out events is not fitted at all). It is the value
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
from learner.model import GenerativeRecommender

Chunk = tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]
"""(memory, memory_mask, slate, slate_mask, clicked, converted) of a chunk of slates."""

__all__ = ["calibrate", "ece", "finetune_value", "joint_logloss", "shown_slates",
           "value_metrics", "value_split", "without_value_split"]


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
    """(memory, memory_mask, slate, slate_mask, clicked, converted) per chunk of rows:
    the encoder runs once, the value head's epochs reuse its output."""
    out = []
    for lo in range(0, len(ex), batch_size):
        b = ex.batch(np.arange(lo, min(len(ex), lo + batch_size)))
        memory, mask = model.encoder(b.history, b.history_mask, b.context)
        out.append((memory, mask, b.slate, b.slate_mask, b.clicked, b.converted))
    return out


@torch.no_grad()
def _logits(model: GenerativeRecommender, chunks: list[Chunk]
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Flat (pCTR logit, pCVR logit, clicked, converted) of every shown item."""
    ctr, cvr, clk, cv = [], [], [], []
    for memory, mask, slate, smask, clicked, converted in chunks:
        a, b = model.value(memory, mask, slate)
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
                   calibrate_on_split: bool = True) -> dict[str, float]:
    """Value-only epochs (see the module docstring). The latest ``val_frac`` of
    ``train``'s requests (:func:`value_split`, unseen by the value head when pretraining
    masked them) are the early-stopping split: epochs on the rest until the split's
    log-loss has not improved for ``patience`` epochs give the best epoch count e* and
    that model's Platt map, fitted on the split (``calibrate_on_split``); then the head
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
                memory, mask, slate, smask, clicked, converted = chunks[i]
                pctr, pcvr = head(memory, mask, slate)
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
            out.update(calibrate(model, val))
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
              min_events: int = 30, batch_size: int = 512) -> dict[str, float]:
    """Fit the value head's per-head Platt map on ``held`` (MAP, Gaussian prior of
    standard deviation ``prior_sd`` on scale − 1 and shift; see the module docstring).
    A head whose held-out events (clicks for pCTR, conversions for pCVR) are fewer
    than ``min_events`` keeps the identity. Returns the fitted scale and shift of each
    head fitted."""
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
            nll = F.binary_cross_entropy_with_logits(ab[0] * zt + ab[1], yt, reduction="sum")
            loss = nll + ((ab[0] - 1.0) ** 2 + ab[1] ** 2) / (2 * prior_sd ** 2)
            loss.backward()
            return loss

        opt.step(closure)
        a, b = (float(v) for v in ab.detach())
        head.calibration[k] = head.calibration.new_tensor([a, b])
        out[f"calibration_{name}_scale"], out[f"calibration_{name}_shift"] = a, b
    return out
