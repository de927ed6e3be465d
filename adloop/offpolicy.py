"""Off-policy evaluation of a snapshot on a recorded log (``adloop evaluate --offline``).

The log must carry the logging policy's propensity of each slate item
(``SlateItem.propensity``: the probability that the logging policy served that ad at
that position). The snapshot is the target policy: the slate the server's engine serves
in each logged context, as many positions as the logged slate (a deterministic target,
``π_ij`` 1 or 0). The estimators — IPS, SNIPS, doubly robust with its reward model,
the logging policy's on-policy value and percentile bootstrap intervals over
impressions — are :mod:`learner.ope`, which the learner's promotion guard also uses
(``adloop learn --guard-estimate``); its docstring has the formulas.

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
from streams.logs import get_logger
from streams.schemas import Feedback, ModelUpdate
from streams.settings import add_settings_arguments, settings_from_args

log = get_logger(__name__)

__all__ = ["ESTIMATORS", "LoggedItems", "OffPolicySettings", "beyond_of_slates", "bootstrap",
           "configure", "doubly_robust", "estimate", "evaluate_offline", "ips", "logged_items",
           "on_policy", "reward_model", "run", "served_lines", "snapshot_slates", "snips",
           "write_served"]


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
    ope_seed: int = Field(0, description="seed of the bootstrap")
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
    summary["beyond_accuracy"] = beyond_of_slates(finals, slates, joined.ads, snapshot_dir,
                                                  s.ope_seed)
    if matched < 30:
        log.warning("ope.few_matches", matched_items=matched,
                    note="the snapshot rarely serves what the log shows: intervals are wide")
    if out is not None:
        write_served(out, summary, finals, slates)
    return summary


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
                            "(IPS, SNIPS, DR, with bootstrap intervals); --out FILE also "
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
