"""Off-policy evaluation of a snapshot on a recorded log (``adloop evaluate --offline``).

The log must carry the logging policy's propensity of each slate item
(``SlateItem.propensity``: the probability that the logging policy served that ad at
that position). The snapshot is the target policy: the slate the server's engine serves
in each logged context, as many positions as the logged slate (a deterministic target,
``π_ij`` 1 or 0). The estimators — IPS, SNIPS, doubly robust with its reward model,
the logging policy's on-policy value and percentile bootstrap intervals over
impressions — are :mod:`learner.ope`, which the learner's promotion guard also uses
(``adloop learn --guard-estimate``); its docstring has the formulas.

Beside them, ``slate_estimates`` holds the slate-aware estimators of
:mod:`learner.slate_ope` (item-position IPS, per-slot SNIPS, pseudo-inverse and its
self-normalised form, the direct method, item-level and self-normalised DR and slate-level
DR, with a ridge reward model on context × ad attributes cross-fitted on the log) with
influence-function intervals; ``estimate`` is the one ``--estimator`` names
(:data:`DEFAULT_ESTIMATOR` unless set; docs/ope.md has why). ``diagnostics`` says how
much the log can tell about the snapshot: the effective sample size of the weights
(impressions' worth of on-policy data per slot), the share of logged items (and of
impressions) where the snapshot serves the logged ad at the logged slot, the largest
weight's share of the total, and ``warnings`` (also logged as ``ope.untrustworthy``)
when the estimate cannot be trusted: too few matched items, an effective sample size
too small, or one item carrying too much of the weight.

Beside the value, ``beyond_accuracy`` describes the snapshot's slates on the log
(:mod:`learner.beyond`): catalogue coverage (of the log's ads), SID diversity (share of
a slate's ad pairs with different semantic-ID level-0 codes in the snapshot's id
table), novelty unseen (share of the slate's ads the log had not shown the user before
that request), novelty in bits (against the log's clicks) and personalization (1 - mean
Jaccard overlap of two users' slates); a figure without a value is null.

``--out FILE`` writes what the figures were computed from, as JSON lines, so that other
estimators can be run on the same data (:func:`write_served`): first the summary (the
same object as printed, ``"type": "summary"``), then one ``"type": "impression"`` line
per logged impression in time order with its request and user id, impression time, the
logged slate (ad ids by position), the logged propensities (null where the log has
none), the logged rewards, and the target's slate (the snapshot's ad ids in that context).
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from learner.beyond import beyond_accuracy, click_bits
from learner.ope import (
    ESTIMATORS,
    LoggedItems,
    bootstrap,
    doubly_robust,
    estimate,
    ips,
    logged_items,
    on_policy,
    reward_model,
    snips,
)
from learner.slate_ope import (
    SLATE_ESTIMATORS,
    ItemCodes,
    RidgeRewardModel,
    SlateLog,
    cross_fit,
    effective_sample_size,
    match_share,
    max_weight_share,
    pay_unit,
)
from learner.slate_ope import estimate as slate_estimate
from streams.logs import get_logger
from streams.schemas import Ad, Feedback, ModelUpdate
from streams.settings import add_settings_arguments, settings_from_args

log = get_logger(__name__)

DEFAULT_ESTIMATOR = "ips"
"""The estimate ``adloop evaluate --offline`` reports first: the winner of bench/ope.py
against the simulator's ground truth (``default_estimator`` in
bench/results/ope.json; docs/ope.md): the lowest median relative error among the
estimators whose intervals hold the truth at least 90 % of the time on the selection
seeds. Its interval is the hull of a score interval and the normal one
(:func:`learner.slate_ope.interval`). The promotion guard's estimate is chosen on
another case, a candidate near the exploring logger (``learner.guard``: snips)."""
MIN_MATCHED_ITEMS = 30
"""Fewer logged items where the snapshot serves the logged ad at its slot: untrusted."""
MIN_EFFECTIVE_SAMPLE = 100.0
"""Smaller effective sample size per slot: untrusted."""
MAX_WEIGHT_SHARE = 0.05
"""One item carrying more of the total weight: untrusted (the weights are too heavy)."""

__all__ = ["DEFAULT_ESTIMATOR", "ESTIMATORS", "LoggedItems", "OffPolicySettings",
           "beyond_of_slates", "bootstrap",
           "configure", "doubly_robust", "estimate", "evaluate_offline", "ips", "logged_items",
           "on_policy", "reward_model", "run", "served_lines", "slate_log_of", "slate_report",
           "snapshot_slates", "snips", "write_served"]


# -- the snapshot as a target policy ---------------------------------------------------


def snapshot_slates(snapshot_dir: Path, finals: Sequence[Feedback], ads: Sequence[Any],
                    beam_width: int = 32, batch: int = 64) -> list[list[str]]:
    """The slate the snapshot serves (the server's engine, ONNX Runtime on CPU) in each
    final list's context, as long as the logged slate."""
    from server.catalog import AdCatalog
    from server.models import ModelManager
    from server.runtime import resolve_provider

    raw = (snapshot_dir / "manifest.json").read_bytes()
    catalog = AdCatalog()
    catalog.apply((a.ad_id, a) for a in ads)
    with tempfile.TemporaryDirectory(prefix="adloop-ope-") as cache:
        return _serve_all(ModelManager(catalog, resolve_provider("cpu"), Path(cache), 1, 1),
                          catalog, raw, snapshot_dir, finals, beam_width, batch)


def _serve_all(mgr: Any, catalog: Any, raw: bytes, snapshot_dir: Path,
               finals: Sequence[Feedback], beam_width: int, batch: int) -> list[list[str]]:
    from server.engine import Engine, RecRequest
    from snapshot_format import parse_manifest, sha256_hex

    man = parse_manifest(raw)
    update = ModelUpdate(model_name=man.model_name, version=man.version, parent=man.parent,
                         sha256=sha256_hex(raw), uri=snapshot_dir.resolve().as_uri(),
                         id_space_version=man.id_space_version,
                         data_watermark=float(man.raw.get("data_watermark", 0.0)),
                         created_time=time.time())
    result = mgr.apply_update(update)
    if result != "ok":
        raise SystemExit(f"adloop evaluate --offline: snapshot {snapshot_dir} did not load "
                         f"(failed step: {result})")
    engine = Engine(mgr, catalog)
    out: list[list[str]] = []
    for start in range(0, len(finals), batch):
        chunk = finals[start:start + batch]
        reqs = [RecRequest(f.user_id, dict(f.context), list(f.recent_ad_ids),
                           max(1, len(f.items)), list(f.recent_organic)) for f in chunk]
        for res in engine.run(reqs, lambda levels, k: [beam_width] * levels):
            out.append([a.ad_id for a in res.ads])
    return out


# -- the command -------------------------------------------------------------------------


class OffPolicySettings(BaseSettings):
    """``adloop evaluate --offline`` settings (env ``ADLOOP_OPE_*``)."""

    model_config = SettingsConfigDict(env_prefix="ADLOOP_OPE_", extra="ignore")

    from_file: Path | None = Field(None, description="recorded log with propensities "
                                   "(--offline)")
    bootstrap_samples: int = Field(200, description="bootstrap resamples of the intervals")
    interval: float = Field(0.95, description="coverage of the bootstrap intervals")
    ope_seed: int = Field(0, description="seed of the bootstrap and of the reward "
                          "model's cross-fitting folds")
    estimator: str = Field(DEFAULT_ESTIMATOR, description="the slate estimator reported "
                           f"as 'estimate' (one of {', '.join(SLATE_ESTIMATORS)})")
    attribution_window_s: float = Field(3600.0, description="join: attribution window")


def evaluate_offline(log_file: Path, snapshot_dir: Path, s: OffPolicySettings,
                     beam_width: int = 32, out: Path | None = None) -> dict[str, Any]:
    """The summary (printed by ``adloop evaluate --offline``); with ``out``, also the
    summary and each impression's logged and target slates there (:func:`write_served`)."""
    from adloop.importer import join_recorded
    from streams.joiner_core import JoinSettings
    from traffic.recorded import read_recorded

    joined = join_recorded(read_recorded(log_file, "stop"),
                           JoinSettings(attribution_window_s=s.attribution_window_s,
                                        metrics_port=0))
    finals = [f for f in joined.finals() if f.items]
    if not finals:
        raise SystemExit(f"adloop evaluate --offline: {log_file} has no joined impression")
    slates = snapshot_slates(snapshot_dir, finals, joined.ads, beam_width)
    items = logged_items(finals, slates, reward_model(finals))
    result = estimate(items, s.bootstrap_samples, s.interval, s.ope_seed)
    matched = int((items.target > 0).sum())
    summary = {"from": str(log_file), "snapshot": str(snapshot_dir),
               "impressions": items.n, "logged_items": len(items.reward),
               "matched_items": matched, "value_per_impression": result,
               "interval": s.interval, "bootstrap_samples": s.bootstrap_samples}
    summary.update(slate_report(finals, slates, joined.ads, s.estimator, s.interval,
                                s.ope_seed))
    summary["beyond_accuracy"] = beyond_of_slates(finals, slates, joined.ads, snapshot_dir,
                                                  s.ope_seed)
    if out is not None:
        write_served(out, summary, finals, slates)
    return summary


# -- slate-aware estimates ----------------------------------------------------------------


def slate_log_of(finals: Sequence[Feedback], slates: Sequence[Sequence[str]],
                 ads: Sequence[Ad], seed: int = 0, folds: int = 2) -> SlateLog:
    """The :class:`learner.slate_ope.SlateLog` of ``finals`` (every item with its logging
    propensity) against the target ``slates`` (``slates[i]`` for ``finals[i]``), with a
    ridge reward model on (context value × ad industry, bid type, advertiser) and a
    per-ad term, cross-fitted over ``folds`` folds of impressions; each item's pay unit
    (:func:`learner.slate_ope.pay_unit`) from its ad's record, what it paid for an ad
    the records lack."""
    if len(finals) != len(slates):
        raise ValueError(f"{len(finals)} impressions but {len(slates)} target slates")
    n = len(finals)
    k = max((1 + max(it.position for it in f.items) for f in finals if f.items), default=1)
    keys = sorted({key for f in finals for key in f.context})
    vocab: list[dict[str, int]] = [{} for _ in keys]
    ctx = np.array([[v.setdefault(f.context.get(key, ""), len(v))
                     for key, v in zip(keys, vocab, strict=True)] for f in finals],
                   np.int64).reshape(n, len(keys))
    records = {a.ad_id: a for a in ads}
    units = {a.ad_id: pay_unit(a.bid_type, a.bid) for a in ads}
    attr_vocab: list[dict[str, int]] = [{}, {}, {}]
    ad_code: dict[str, int] = {}
    attrs: list[list[int]] = []

    def code(ad_id: str) -> int:
        c = ad_code.get(ad_id)
        if c is None:
            rec = records.get(ad_id)
            vals = ((rec.industry, rec.bid_type, rec.advertiser_id) if rec is not None
                    else ("?", "?", "?"))
            c = ad_code[ad_id] = len(attrs)
            attrs.append([v.setdefault(x, len(v)) for v, x in zip(attr_vocab, vals,
                                                                   strict=True)])
        return c

    reward, prop, target = np.zeros((n, k)), np.ones((n, k)), np.zeros((n, k))
    unit = np.zeros((n, k))
    mask = np.zeros((n, k), bool)
    li, la, lp, ti, ta, tp = [], [], [], [], [], []
    for i, (f, slate) in enumerate(zip(finals, slates, strict=True)):
        for it in f.items:
            if it.propensity is None:
                raise ValueError(f"request {f.request_id}: item {it.ad_id} has no logging "
                                 "propensity (slate[].propensity in the recorded log)")
            j = it.position
            reward[i, j], prop[i, j], mask[i, j] = it.reward, it.propensity, True
            unit[i, j] = units.get(it.ad_id, it.reward)
            target[i, j] = 1.0 if j < len(slate) and slate[j] == it.ad_id else 0.0
            li.append(i)
            la.append(code(it.ad_id))
            lp.append(j)
        for j, a in enumerate(slate[:len(f.items)]):
            ti.append(i)
            ta.append(code(a))
            tp.append(j)
    logged = ItemCodes(np.asarray(li, np.int64), np.asarray(la, np.int64),
                       np.asarray(lp, np.int64))
    served = ItemCodes(np.asarray(ti, np.int64), np.asarray(ta, np.int64),
                       np.asarray(tp, np.int64))
    attr_arr = np.asarray(attrs, np.int64).reshape(-1, 3)
    sizes = [max(1, len(v)) for v in vocab], [max(1, len(v)) for v in attr_vocab]
    pred, direct = cross_fit(ctx, attr_arr, logged, reward[logged.impression, logged.position],
                             [served], n, folds=folds if n >= 2 * folds else 1, seed=seed,
                             make=lambda: RidgeRewardModel(*sizes, len(attrs)))
    predicted = np.zeros((n, k))
    predicted[logged.impression, logged.position] = pred
    return SlateLog(reward, prop, target, mask, predicted,
                    np.bincount(served.impression, weights=direct, minlength=n), unit=unit)


def trust_warnings(matched_items: int, ess: float, heaviest: float) -> list[str]:
    """Why an estimate on this log cannot be trusted (empty: no reason found)."""
    out = []
    if matched_items < MIN_MATCHED_ITEMS:
        out.append(f"only {matched_items} logged items are what the snapshot serves at "
                   f"that slot (< {MIN_MATCHED_ITEMS}): the log says little about it")
    if ess < MIN_EFFECTIVE_SAMPLE:
        out.append(f"effective sample size {ess:.1f} per slot (< {MIN_EFFECTIVE_SAMPLE:g}): "
                   "intervals are unreliable")
    if heaviest > MAX_WEIGHT_SHARE:
        out.append(f"one item carries {heaviest:.0%} of the total weight "
                   f"(> {MAX_WEIGHT_SHARE:.0%}): the weights are too heavy")
    return out


def slate_report(finals: Sequence[Feedback], slates: Sequence[Sequence[str]],
                 ads: Sequence[Ad], estimator: str = DEFAULT_ESTIMATOR,
                 level: float = 0.95, seed: int = 0) -> dict[str, Any]:
    """``slate_estimates`` (every slate estimator), ``estimate`` (``estimator``'s) and
    ``diagnostics`` (effective sample size, match shares, heaviest weight, warnings)."""
    if estimator not in SLATE_ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; known: {SLATE_ESTIMATORS}")
    sl = slate_log_of(finals, slates, ads, seed)
    est = slate_estimate(sl, SLATE_ESTIMATORS, level)
    ess = effective_sample_size(sl)
    item_share, imp_share = match_share(sl)
    matched = int(((sl.target > 0) & sl.mask).sum())
    heaviest = max_weight_share(sl)
    warnings = trust_warnings(matched, ess, heaviest)
    for w in warnings:
        log.warning("ope.untrustworthy", reason=w)
    return {"estimate": {"estimator": estimator, **est[estimator]},
            "slate_estimates": est,
            "diagnostics": {"effective_sample_size": round(ess, 2),
                            "matched_items": matched,
                            "matched_item_share": round(item_share, 4),
                            "matched_impression_share": round(imp_share, 4),
                            "max_weight_share": round(heaviest, 4),
                            "trusted": not warnings, "warnings": warnings}}


def served_lines(summary: dict[str, Any], finals: Sequence[Feedback],
                 slates: Sequence[Sequence[str]]) -> Iterator[dict[str, Any]]:
    """The ``--out`` lines: the summary, then one line per logged impression (``finals``,
    with the target's slate ``slates[i]`` for ``finals[i]``) in time order."""
    if len(finals) != len(slates):
        raise ValueError(f"{len(finals)} impressions but {len(slates)} target slates")
    yield {"type": "summary", **summary}
    for i in sorted(range(len(finals)), key=lambda i: (finals[i].impression_time,
                                                        finals[i].request_id)):
        f = finals[i]
        logged = sorted(f.items, key=lambda it: it.position)
        yield {"type": "impression", "request_id": f.request_id, "user_id": f.user_id,
               "impression_time": f.impression_time,
               "logged_slate": [it.ad_id for it in logged],
               "logged_propensities": [it.propensity for it in logged],
               "logged_rewards": [it.reward for it in logged],
               "target_slate": list(slates[i])}


def write_served(path: Path, summary: dict[str, Any], finals: Sequence[Feedback],
                 slates: Sequence[Sequence[str]]) -> int:
    """Write :func:`served_lines` to ``path`` as JSON lines (through a temporary file, so a
    failed run leaves no half-written file); returns the number of impressions."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for line in served_lines(summary, finals, slates):
            fh.write(json.dumps(line, default=str) + "\n")
    tmp.replace(path)
    log.info("ope.written", path=str(path), impressions=len(finals))
    return len(finals)


def beyond_of_slates(finals: Sequence[Feedback], slates: Sequence[Sequence[str]],
                     ads: Sequence[Any], snapshot_dir: Path | None = None,
                     seed: int = 0) -> dict[str, float | None]:
    """Beyond-accuracy metrics of the target ``slates`` (one per final list) in time
    order: the history of a user is what the log showed them before, servable ads the
    log's ``ads``, level-0 codes from ``snapshot_dir``'s id table (none: no SID
    diversity); rounded to 4 places, None where undefined."""
    order = sorted(range(len(finals)), key=lambda i: (finals[i].impression_time,
                                                      finals[i].request_id))
    prefix: dict[str, int] | None = None
    if snapshot_dir is not None:
        from snapshot_format import parse_manifest

        man = parse_manifest((snapshot_dir / "manifest.json").read_bytes())
        prefix = {a: int(row[0]) for a, row in zip(man.ad_ids, man.ids.tolist(), strict=True)}
    out = beyond_accuracy(
        [finals[i].user_id for i in order], [list(slates[i]) for i in order],
        servable={a.ad_id for a in ads},
        prefix_of=(lambda a: prefix.get(a, a)) if prefix is not None else None,
        bits=click_bits(finals), seen=[[it.ad_id for it in finals[i].items] for i in order],
        seed=seed)
    return {k: round(v, 4) if math.isfinite(v) else None for k, v in out.items()}


def configure(parser: argparse.ArgumentParser) -> None:
    from learner.evaluate import configure as configure_online

    configure_online(parser)
    group = parser.add_argument_group("off-policy evaluation on a recorded log")
    group.add_argument("--offline", action="store_true",
                       help="estimate --snapshot's value per impression on --from FILE "
                            "(IPS, SNIPS, DR with bootstrap intervals; the slate estimators "
                            "of docs/ope.md with their intervals, the effective sample "
                            "size and the matched share, with warnings); --out FILE also "
                            "writes the summary and each impression's logged and target "
                            "slates as JSON lines")
    group.add_argument("--from", dest="from_file", type=Path, default=None,
                       help="same as --from-file")
    add_settings_arguments(parser, OffPolicySettings)


def run(args: argparse.Namespace) -> int:
    if not getattr(args, "offline", False):
        from learner.evaluate import run as run_online

        return run_online(args)
    s = settings_from_args(OffPolicySettings, args)
    snapshot = getattr(args, "snapshot", None)
    if s.from_file is None or snapshot is None:
        raise SystemExit("adloop evaluate --offline needs --from FILE and --snapshot DIR")
    from learner.evaluate import EvaluateSettings

    out = settings_from_args(EvaluateSettings, args).out
    summary = evaluate_offline(s.from_file, Path(snapshot), s,
                               getattr(args, "beam_width", None) or 32, out)
    print(json.dumps(summary, default=str))
    return 0
