"""``adloop import``: a recorded log (docs/traffic.md) to a servable snapshot, offline.

One command from a user's own logged feedback to a snapshot:

1. read the recorded file (``traffic.recorded``; a bad line is named ``line N: reason``);
2. join impressions, clicks and conversions with the joiner's own state machine
   (:class:`streams.joiner_core.JoinCore`, no Kafka), closing every window at the end of
   the file (the end-of-stream marker), so every request gets its final list;
3. build the ad catalog: each ``ad`` line, and for an ad that only appears in slates an
   ad with documented defaults (:func:`default_ad`);
4. choose the context features from the data (:func:`choose_context_features`) unless
   ``--context-features`` names them;
5. pretrain (:func:`learner.pretrain.pretrain`) and export the snapshot
   (:func:`learner.export.export_run`).

``run_dir`` receives ``ads.jsonl`` and ``feedback.jsonl`` (what was joined, reusable by
``adloop pretrain --ads --feedback``), the checkpoint and tokenizer, and ``import.json``
(the summary that is also printed).
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from streams.joiner_core import INPUT_TOPICS, JoinCore, JoinSettings, end_of_stream_marker
from streams.logs import get_logger
from streams.schemas import Ad, Feedback, Impression, encode
from streams.settings import add_settings_arguments, settings_from_args
from traffic.recorded import Recorded, read_recorded
from traffic.world import Request

log = get_logger(__name__)

DEFAULT_BUDGET = 1e12
"""Budget of an ad the log does not describe: unlimited (logged data has no budgets)."""


class ImportSettings(BaseSettings):
    """Settings of ``adloop import`` (env ``ADLOOP_IMPORT_*``); the model and training
    settings are ``adloop pretrain``'s (``--run-dir``, ``--steps``, ``--context-features``…)."""

    model_config = SettingsConfigDict(env_prefix="ADLOOP_IMPORT_", extra="ignore")

    from_file: Path | None = Field(None, description="the recorded log (JSONL/Parquet)")
    snapshot_dir: Path | None = Field(None, description="where the snapshot goes "
                                      "(default RUN_DIR/snapshot)")
    version: str = Field("imported-1", description="model version of the snapshot")
    on_error: Literal["skip", "stop"] = Field("stop", description="bad line: skip it "
                                              "(reported) or stop")
    attribution_window_s: float = Field(3600.0, description="join: clicks/conversions count "
                                        "this many event seconds after their impression")
    observation_window_s: float = Field(300.0, description="join: event seconds until the "
                                        "provisional list")
    min_coverage: float = Field(0.5, description="a context key becomes a model feature when "
                                "at least this share of impressions has it ...")
    max_context_features: int = Field(8, description="... and at most this many keys, the "
                                      "most common first")
    min_clicks_per_ad: float = Field(2.0, description="fewer clicks per ad than this on "
                                     "average: the summary warns that the snapshot cannot "
                                     "rank the ads by their own click rates")


@dataclass
class JoinedLog:
    """What the offline join made of a recorded log."""

    ads: list[Ad]
    feedback: list[Feedback]
    """Every list the joiner emitted (provisional, corrections, final), in emission order."""
    impressions: list[Impression]
    outcomes: Counter[str] = field(default_factory=Counter)
    """``topic:outcome`` counts, as ``adloop_join_events_total`` would count them."""
    rejected: list[str] = field(default_factory=list)
    """``topic offset reason: detail`` of each record the join dead-lettered."""
    defaulted_ads: int = 0

    def finals(self) -> list[Feedback]:
        return [f for f in self.feedback if f.kind == "final"]


def default_ad(ad_id: str, imp: Impression) -> Ad:
    """An ad seen only in a slate: the slate item's bid and bid type, advertiser
    ``unknown``, industry ``unknown``, goal ``unknown``, unlimited budget, the ad id as
    title and description, created at its first impression."""
    item = next(i for i in imp.slate if i.ad_id == ad_id)
    return Ad(ad_id=ad_id, advertiser_id="unknown", industry="unknown",
              bid_type=item.bid_type, conversion_goal="unknown", bid=item.bid,
              budget=DEFAULT_BUDGET, title=ad_id, description=ad_id,
              created_time=imp.event_time, event_time=imp.event_time)


def join_recorded(entries: Iterable[Recorded], join: JoinSettings) -> JoinedLog:
    """Join a recorded log in file order with :class:`JoinCore` (no Kafka), then close
    every window with the end-of-stream marker. Request lines are ignored (they carry no
    outcome)."""
    core = JoinCore(join, None)
    core.load_partition(0)
    caught = dict.fromkeys(INPUT_TOPICS, True)
    ads: dict[str, Ad] = {}
    impressions: list[Impression] = []
    out = JoinedLog(ads=[], feedback=[], impressions=impressions)
    offsets: Counter[str] = Counter()
    t_end: float | None = None

    def feed(topic: str, raw: bytes, key: bytes) -> str:
        offset = offsets[topic]
        offsets[topic] += 1
        step = core.on_record(topic, 0, offset, key, raw, caught)
        out.outcomes[f"{topic}:{step.outcome}"] += 1
        for t, outcome in step.released:
            out.outcomes[f"{t}:{outcome}"] += 1
        for r in step.rejected:
            out.rejected.append(f"{r.topic} {r.offset} {r.reason}: {r.detail}")
        core.mark_emitted(0, step.emissions)
        out.feedback.extend(step.emissions)
        return step.outcome

    for e in entries:
        t_end = e.t if t_end is None else max(t_end, e.t)
        if e.kind == "ad":
            assert isinstance(e.record, Ad)
            old = ads.get(e.record.ad_id)
            if old is None or e.record.event_time >= old.event_time:
                ads[e.record.ad_id] = e.record
        elif e.topic in INPUT_TOPICS:
            rec = e.record
            assert not isinstance(rec, Request)
            user = getattr(rec, "user_id", "")
            if feed(e.topic, encode(rec), str(user).encode()) == "applied" \
                    and isinstance(rec, Impression):
                impressions.append(rec)
    if t_end is not None:
        feed("impressions", encode(end_of_stream_marker(t_end)), b"")
    for imp in impressions:
        for item in imp.slate:
            if item.ad_id not in ads:
                ads[item.ad_id] = default_ad(item.ad_id, imp)
                out.defaulted_ads += 1
    out.ads = list(ads.values())
    return out


def choose_context_features(impressions: Iterable[Impression], min_coverage: float = 0.5,
                            limit: int = 8) -> tuple[str, ...]:
    """Context keys present in at least ``min_coverage`` of the impressions and taking at
    least two values, the most common first (ties by name), at most ``limit``."""
    have: Counter[str] = Counter()
    values: dict[str, set[str]] = {}
    n = 0
    for imp in impressions:
        n += 1
        for k, v in imp.context.items():
            have[k] += 1
            seen = values.setdefault(k, set())
            if len(seen) < 2:
                seen.add(v)
    keys = [k for k, c in have.items() if n and c / n >= min_coverage and len(values[k]) >= 2]
    keys.sort(key=lambda k: (-have[k], k))
    return tuple(keys[:limit])


def feedback_warnings(finals: list[Feedback], n_ads: int,
                      min_clicks_per_ad: float) -> tuple[dict[str, float], list[str]]:
    """The log's clicks and clicks per ad, and a warning when they are too few for the
    value model's per-ad terms to tell the ads apart: with well under one click per ad
    their fitted rates are mostly the shrinkage target and noise, so the snapshot serves
    the few ads that happened to be clicked to most contexts. Serve it with exploration
    (``adloop serve --explore``, off by default) and let ``adloop learn`` go on from live
    feedback, or import a longer log."""
    clicks = sum(int(i.clicked) for f in finals for i in f.items)
    per_ad = clicks / max(1, n_ads)
    stats = {"clicks": float(clicks), "clicks_per_ad": round(per_ad, 3)}
    if per_ad >= min_clicks_per_ad:
        return stats, []
    return stats, [f"{clicks} clicks on {n_ads} ads ({per_ad:.2f} per ad, fewer than "
                   f"{min_clicks_per_ad:g}): too few to rank the ads by their own click "
                   "rates; the snapshot will favour the few ads clicked by chance. Serve "
                   "it with exploration (adloop serve --explore) and keep learning "
                   "online, or import more logs"]


def write_jsonl(path: Path, records: Iterable[Any]) -> int:
    n = 0
    with path.open("wb") as fh:
        for r in records:
            fh.write(encode(r) + b"\n")
            n += 1
    return n


def import_log(s: ImportSettings, pretrain_settings: Any) -> dict[str, Any]:
    """The whole import; returns the summary. ``pretrain_settings`` is a
    :class:`learner.pretrain.PretrainSettings` (its ``context_features`` may be empty)."""
    from learner.export import export_run
    from learner.pretrain import pretrain

    if s.from_file is None:
        raise SystemExit("adloop import: --from FILE (a recorded log) is required")
    join = JoinSettings(attribution_window_s=s.attribution_window_s,
                        observation_window_s=s.observation_window_s, metrics_port=0)
    joined = join_recorded(read_recorded(s.from_file, s.on_error), join)
    finals = joined.finals()
    if not finals:
        raise SystemExit(f"adloop import: {s.from_file} has no impression that joined "
                         f"(join outcomes {dict(joined.outcomes)})")
    features = tuple(f for f in pretrain_settings.context_features.split(",") if f.strip())
    if not features:
        features = choose_context_features(joined.impressions, s.min_coverage,
                                            s.max_context_features)
        if not features:
            raise SystemExit("adloop import: no context key is on at least "
                             f"{s.min_coverage:.0%} of the impressions with two values or "
                             "more; name them with --context-features")
    ps = pretrain_settings.model_copy(update={"context_features": ",".join(features),
                                              "source": "file"})
    run_dir = Path(ps.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(run_dir / "ads.jsonl", joined.ads)
    write_jsonl(run_dir / "feedback.jsonl", joined.feedback)
    log.info("import.joined", impressions=len(joined.impressions), finals=len(finals),
             ads=len(joined.ads), defaulted_ads=joined.defaulted_ads,
             rejected=len(joined.rejected), context_features=list(features))
    feedback, warnings = feedback_warnings(finals, len(joined.ads), s.min_clicks_per_ad)
    for w in warnings:
        log.warning("import.sparse_feedback", reason=w, **feedback)
    result = pretrain(ps, joined.ads, joined.feedback)
    snapshot_dir = s.snapshot_dir or run_dir / "snapshot"
    manifest = export_run(run_dir, snapshot_dir, s.version)
    summary = {"from": str(s.from_file), "impressions": len(joined.impressions),
               "final_lists": len(finals), "ads": len(joined.ads),
               "defaulted_ads": joined.defaulted_ads, "rejected": len(joined.rejected),
               "join_outcomes": dict(joined.outcomes), **feedback, "warnings": warnings,
               "context_features": list(features),
               "train_step": result.step, "metrics": result.metrics,
               "snapshot": str(snapshot_dir), "version": manifest.get("model_version",
                                                                      s.version)}
    (run_dir / "import.json").write_text(json.dumps(summary, indent=1, default=str))
    return summary


def configure(parser: argparse.ArgumentParser) -> None:
    from learner.pretrain import PretrainSettings

    add_settings_arguments(parser, ImportSettings)
    parser.add_argument("--from", dest="from_file", type=Path, default=None,
                        help="same as --from-file")
    add_settings_arguments(parser, PretrainSettings)


def run(args: argparse.Namespace) -> int:
    from learner.pretrain import PretrainSettings

    s = settings_from_args(ImportSettings, args)
    ps = settings_from_args(PretrainSettings, args)
    summary = import_log(s, ps)
    print(json.dumps(summary, default=str))
    return 0
