"""Account for every event of a run: the ledger checker of the fault runs.

The traffic driver's :class:`~traffic.driver.Ledger` says what the world did (every
request answered, click and conversion produced); the fault injector adds the
malformed records it wrote. After the run this module reads what the loop made of
it (``impressions``, ``feedback``, ``dlq`` and the learner's training ledger) and
reconciles, per phase of the run:

* every answered request has its impression and **exactly one** final feedback list
  (none: *lost*; more: *doubled*), at most one provisional list, and the final's
  per-item clicks, conversions and values are what the ledger says happened inside
  the attribution window (else *wrong*);
* every click and conversion is in its request's final list, or in ``dlq`` with a
  reason (``late`` outside the window, ``orphan`` without an impression);
* every organic engagement (view, like, dwell of a mixed feed's organic item) is in the
  organic part of its request's final list (``Feedback.organic``: the item's slot is
  viewed / liked, its dwell the sum of its dwell events), or in ``dlq`` with a reason; a
  slot with more dwell than the ledger's events is *doubled* (an engagement counted
  twice), any other disagreement *wrong*;
* every malformed record is in ``dlq`` with a reason;
* the learner's ledger holds each feedback offset at most once (*trained twice*
  counts as doubled) and, up to its checkpoint, every offset (a gap: *untrained*).

Dead letters are matched by their source coordinates, so a dead letter written
twice (the at-least-once edge of a crash between the write and the offset commit)
counts once.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from streams.kafka_io import Received
from streams.schemas import DeadLetter, Feedback, Impression
from streams.topics import Topics


@dataclass(frozen=True)
class Malformed:
    phase: str
    topic: str
    raw: bytes


@dataclass
class Row:
    """One line of the fault table."""

    fault: str
    events_in: int = 0
    accounted: int = 0
    lost: int = 0
    doubled: int = 0
    dead_lettered: int = 0
    wrong: int = 0
    """Final lists whose rewards or organic engagements disagree with the ledger."""
    untrained: int = 0
    """Feedback offsets below the learner's checkpoint missing from its ledger."""
    organic_engagements: int = 0
    """Organic engagements among ``events_in`` (each accounted like a click)."""
    late_inside_window: int = 0
    """Events dead-lettered as ``late`` although their event time was inside the window
    (accounted for, but the join was wrong: e.g. a watermark pushed ahead by clock skew)."""
    recovery_s: float | None = None
    detail: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Observed:
    """What the loop wrote, read back from Kafka and the learner's state directory."""

    impressions: Counter[str] = field(default_factory=Counter)
    finals: dict[str, list[Feedback]] = field(default_factory=lambda: defaultdict(list))
    provisionals: Counter[str] = field(default_factory=Counter)
    feedback_offsets: dict[tuple[int, int], str] = field(default_factory=dict)
    """(partition, offset) of every feedback record -> its request id."""
    dead: dict[tuple[str, int, int], DeadLetter] = field(default_factory=dict)
    trained: Counter[tuple[int, int]] = field(default_factory=Counter)
    learner_positions: dict[int, int] = field(default_factory=dict)

    def add_impression(self, imp: Impression) -> None:
        self.impressions[imp.request_id] += 1

    def add_feedback(self, partition: int, offset: int, fb: Feedback) -> None:
        self.feedback_offsets[(partition, offset)] = fb.request_id
        if fb.kind == "final":
            self.finals[fb.request_id].append(fb)
        elif fb.kind == "provisional":
            self.provisionals[fb.request_id] += 1

    def add_dead_letter(self, d: DeadLetter, prefix: str = "") -> None:
        """``d.source_topic`` is the physical name; it is kept by its logical name."""
        if prefix:
            d = msgspec.structs.replace(d, source_topic=Topics(prefix).logical(d.source_topic))
        self.dead[(d.source_topic, d.partition, d.offset)] = d

    def dead_by(self, field_name: str, topics: tuple[str, ...] | None = None
                ) -> dict[str, str]:
        """``field_name`` of each dead-lettered JSON record (from ``topics``) -> its reason."""
        out: dict[str, str] = {}
        for d in self.dead.values():
            if topics is not None and d.source_topic not in topics:
                continue
            try:
                obj = json.loads(d.raw())
            except (ValueError, RecursionError):  # not JSON, not UTF-8, bad base64, too deep
                continue
            if isinstance(obj, dict) and isinstance(obj.get(field_name), str):
                out[obj[field_name]] = d.reason
        return out

    def dead_raw(self) -> dict[tuple[str, bytes], str]:
        out: dict[tuple[str, bytes], str] = {}
        for d in self.dead.values():
            try:
                out[(d.source_topic, d.raw())] = d.reason
            except ValueError:  # a dead letter whose raw_b64 is not base64: not ours
                continue
        return out


def read_learner_ledger(state_dir: Path, obs: Observed,
                        positions: dict[int, int] | None = None) -> None:
    """The learner's training ledger segments (``<state-dir>/ledger/*.jsonl``) and the
    feedback positions of its last checkpoint (mirrored to its consumer group)."""
    for seg in sorted((state_dir / "ledger").glob("*.jsonl")):
        for line in seg.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                obs.trained[(int(r["p"]), int(r["o"]))] += 1
    obs.learner_positions = dict(positions or {})


def observe(impressions: Iterable[Received[Any]], feedback: Iterable[Received[Any]],
            dlq: Iterable[Received[Any]], prefix: str = "") -> Observed:
    """Build :class:`Observed` from the decoded records of ``impressions``, ``feedback``
    and ``dlq`` (e.g. :func:`streams.kafka_io.read_all`); ``prefix`` is the topic prefix
    of the run (dead letters name their source topic physically)."""
    obs = Observed()
    for r in impressions:
        obs.add_impression(r.record)
    for r in feedback:
        obs.add_feedback(r.partition, r.offset, r.record)
    for r in dlq:
        obs.add_dead_letter(r.record, prefix)
    return obs


def _may(maybe: Sequence[dict[str, Any]], kind: str, key: str, value: str,
          action: str | None = None) -> bool:
    """Is one of ``maybe`` (ledger events a final may count) of ``kind`` for ``value``?"""
    return any(m["kind"] == kind and m[key] == value
               and (action is None or m["action"] == action) for m in maybe)


def _extra(maybe: Sequence[dict[str, Any]], kind: str, key: str, value: str,
           amount: str) -> float:
    """The sum of ``amount`` over those of ``maybe`` of ``kind`` for ``value``."""
    return sum(float(m[amount]) for m in maybe if m["kind"] == kind and m[key] == value)


def reconcile(ledger: Sequence[dict[str, Any]], obs: Observed, phase_of: dict[str, str],
              phases: Sequence[str], attribution_window_s: float,
              malformed: Sequence[Malformed] = ()) -> dict[str, Row]:
    """One :class:`Row` per phase (see the module docstring for the rules).

    ``phase_of`` maps the request ids to account for to their phase (requests of other
    stretches of the run, e.g. a warm-up, are left out)."""
    rows = {p: Row(p) for p in phases}
    requests: dict[str, tuple[str, float]] = {}   # id -> (phase, event time)
    for e in ledger:
        if e["kind"] == "request" and e["outcome"] == "ok" and e["request_id"] in phase_of:
            requests[e["request_id"]] = (phase_of[e["request_id"]], float(e["t"]))
    actions: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for e in ledger:
        if e["kind"] in ("click", "conversion", "organic_engagement") \
                and e["request_id"] in requests:
            actions[e["request_id"]].append(e)
    dead_ids = obs.dead_by("event_id", ("clicks", "conversions", "organic-engagements"))
    dead_requests = obs.dead_by("request_id", ("impressions",))

    for rid, (ph, t0) in requests.items():
        row = rows[ph]
        acts = actions.get(rid, [])
        row.events_in += 1 + len(acts)
        row.organic_engagements += sum(a["kind"] == "organic_engagement" for a in acts)
        finals = obs.finals.get(rid, [])
        if len(finals) > 1:
            row.doubled += len(finals) - 1
        if obs.provisionals.get(rid, 0) > 1:
            row.doubled += obs.provisionals[rid] - 1
        if not finals and rid in dead_requests:    # the impression itself was rejected
            row.dead_lettered += 1 + len(acts)
            row.accounted += 1 + len(acts)
            row.late_inside_window += dead_requests[rid] == "late"
            continue
        if not finals:
            row.lost += 1
            lost_ids = [a["event_id"] for a in acts if a["event_id"] not in dead_ids]
            row.lost += len(lost_ids)
            row.dead_lettered += len(acts) - len(lost_ids)
            row.accounted += len(acts) - len(lost_ids)
            row.detail.setdefault("lost_requests", []).append(rid)
            continue
        row.accounted += 1
        final = finals[0]
        by_ad = {it.ad_id: it for it in final.items}
        clicked: set[str] = set()
        values: dict[str, float] = defaultdict(float)
        slots = {o.item_id for o in final.organic}
        viewed: set[str] = set()
        liked: set[str] = set()
        dwell: dict[str, float] = defaultdict(float)
        maybe: list[dict[str, Any]] = []
        """Dead-lettered inside the window: the final may count them too. After a
        ``kill -9`` the joiner re-reads the records after its last offset commit; one that
        a final emitted since already counted is dead-lettered on top when its request's
        state no longer knows its id (``late``: the final is marked from ``feedback``;
        ``orphan``/``late``: the request expired in a changelog written after that
        commit). Counted once either way."""
        for a in acts:
            inside = a["t"] <= t0 + attribution_window_s
            if a["event_id"] in dead_ids:
                row.dead_lettered += 1
                row.accounted += 1
                if inside:
                    maybe.append(a)
                    row.late_inside_window += dead_ids[a["event_id"]] == "late"
                continue
            organic = a["kind"] == "organic_engagement"
            if not inside or (organic and a["item_id"] not in slots):
                # outside the window (or an item the feed did not place) yet not
                # dead-lettered
                row.lost += 1
                row.detail.setdefault("lost_events", []).append(a["event_id"])
                continue
            if a["kind"] == "click":
                clicked.add(a["ad_id"])
            elif a["kind"] == "conversion":
                values[a["ad_id"]] += float(a["value"])
            elif a["action"] == "view":
                viewed.add(a["item_id"])
            elif a["action"] == "like":
                liked.add(a["item_id"])
            else:
                dwell[a["item_id"]] += float(a["dwell_s"])
            row.accounted += 1
        for ad_id, it in by_ad.items():
            value = round(values.get(ad_id, 0.0), 9)
            ok = (it.clicked == (ad_id in clicked)
                  or (it.clicked and _may(maybe, "click", "ad_id", ad_id))) \
                and (it.converted == (ad_id in values)
                     or (it.converted and _may(maybe, "conversion", "ad_id", ad_id))) \
                and value - 1e-6 < it.conversion_value \
                < value + _extra(maybe, "conversion", "ad_id", ad_id, "value") + 1e-6
            if not ok:
                row.wrong += 1
                row.detail.setdefault("wrong_requests", []).append(rid)
                break
        organic_ok = True
        for slot in final.organic:
            item, org = slot.item_id, "organic_engagement"
            want = round(dwell.get(item, 0.0), 9)
            if slot.dwell_s > want + _extra(maybe, org, "item_id", item, "dwell_s") + 1e-6:
                # more dwell than happened: an engagement counted twice
                row.doubled += 1
                row.detail.setdefault("organic_doubled", []).append([rid, item])
                continue
            view_ok = slot.viewed == (item in viewed) \
                or (slot.viewed and _may(maybe, org, "item_id", item, "view"))
            like_ok = slot.liked == (item in liked) \
                or (slot.liked and _may(maybe, org, "item_id", item, "like"))
            organic_ok &= view_ok and like_ok and slot.dwell_s > want - 1e-6
        if not organic_ok:
            row.wrong += 1
            row.detail.setdefault("wrong_organic", []).append(rid)

    dead_raw = obs.dead_raw()
    for m in malformed:
        row = rows[m.phase]
        row.events_in += 1
        if (m.topic, m.raw) in dead_raw:
            row.accounted += 1
            row.dead_lettered += 1
        else:
            row.lost += 1
            row.detail.setdefault("malformed_not_dead_lettered", []).append(m.topic)

    # training: each feedback offset at most once; none missing below the checkpoint
    for (p, o), n in obs.trained.items():
        fb_rid = obs.feedback_offsets.get((p, o))
        fb_ph = requests[fb_rid][0] if fb_rid is not None and fb_rid in requests else None
        if n > 1 and fb_ph is not None:
            rows[fb_ph].doubled += n - 1
            rows[fb_ph].detail.setdefault("trained_twice", []).append([p, o])
    for (p, o), rid in obs.feedback_offsets.items():
        if o < obs.learner_positions.get(p, 0) and (p, o) not in obs.trained \
                and rid in requests:
            rows[requests[rid][0]].untrained += 1
    for row in rows.values():   # keep the detail readable
        for k, v in row.detail.items():
            if isinstance(v, list) and len(v) > 10:
                row.detail[k] = [*v[:10], f"... {len(v) - 10} more"]
    return rows
