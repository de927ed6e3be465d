"""Logged events -> training examples.

Input is the joiner's ``feedback`` records (:class:`streams.schemas.Feedback`) and the
ad catalog (:class:`streams.schemas.Ad`), from JSONL files or from Kafka topics.

Per request, only the newest revision is used (``final`` and ``correction`` records
supersede ``provisional`` ones of the same request id). Each clicked or converted
slate item becomes one example:

* ``history`` [H, T]: ids of ``recent_ad_ids`` in the order given, the first H of them,
  padding (all-zero rows, mask 0) after them;
* ``context`` [C + O]: :func:`streams.features.request_ids` of the request context and
  its recent organic items (O = the model's ``organic_len``);
* ``target`` [T]: the item's id; ``value``: its realized reward, floored at
  ``min_value`` so that a click on a CPA ad that has not converted (yet) still counts;
* ``prior``: the interaction type (0 click, 1 conversion) for the prior heads;
* ``horizon``: the time horizon for the prior heads (:func:`horizon_of`): 0 short-term
  (the target's level-0 semantic code is among those of the ``short_horizon`` most
  recent history ads), 1 long-term;
* ``mtp`` [n_mtp, T]: the user's next positives in later requests (MTP targets);
* ``slate`` [I, T] with ``clicked`` / ``converted``: the whole slate, attached to the
  request's first example only, for the value heads.

A request without any positive still yields one example (value 0: no generation
loss) so that its slate trains the value heads as negatives.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torch import Tensor

from learner.tokenizer import UASIDTokenizer, UnknownAdError
from streams.features import (
    DEFAULT_CONTEXT_BUCKETS,
    DEFAULT_CONTEXT_FEATURES,
    DEFAULT_ORGANIC_LEN,
    request_ids,
)
from streams.logs import get_logger
from streams.schemas import Ad, DecodeFailure, Event, Feedback, OrganicItem, decode

BID_TYPES = ("cpc", "cpa", "cpm")
"""Bid type codes (index = code) of :func:`learner.losses.expected_value`."""
BID_CODES = {b: i for i, b in enumerate(BID_TYPES)}

log = get_logger(__name__)
R = TypeVar("R", bound=Event)


class DataError(ValueError):
    """A record that cannot be read; the message names the file/topic and position."""


# --------------------------------------------------------------------------------------
# reading


def read_jsonl(path: str | Path, record_type: type[R]) -> list[R]:
    """Every line of ``path`` decoded as ``record_type`` (blank lines skipped)."""
    out: list[R] = []
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            rec = decode(line.rstrip(b"\n"), record_type)
            if isinstance(rec, DecodeFailure):
                raise DataError(f"{path}:{lineno}: not a {record_type.__name__} "
                                f"({rec.reason}): {rec.detail}")
            out.append(rec)
    return out


def read_kafka(bootstrap_servers: str, topic: str, record_type: type[R],
               client_id: str = "adloop-pretrain", poll_timeout_s: float = 1.0,
               max_idle_s: float = 30.0) -> list[R]:
    """Every record of ``topic`` from the beginning to the end offsets at call time.

    Partitions are assigned manually (no consumer group, nothing committed).
    Malformed records are skipped and counted in the log; they belong in the DLQ,
    which the joiner handles, not the learner.
    """
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap_servers, client_id=client_id,
                             group_id=None, enable_auto_commit=False,
                             auto_offset_reset="earliest")
    try:
        parts = consumer.partitions_for_topic(topic)
        if not parts:
            raise DataError(f"topic {topic!r} does not exist on {bootstrap_servers}")
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        end = consumer.end_offsets(tps)
        out: list[R] = []
        bad = 0
        idle_since = time.monotonic()
        while any(consumer.position(tp) < end[tp] for tp in tps):
            polled = consumer.poll(timeout_ms=int(poll_timeout_s * 1000))
            if not polled:
                if time.monotonic() - idle_since > max_idle_s:
                    raise DataError(f"topic {topic!r}: no progress for {max_idle_s}s before "
                                    "reaching the end offsets")
                continue
            idle_since = time.monotonic()
            for tp, msgs in polled.items():
                for m in msgs:
                    if m.offset >= end[tp]:
                        continue
                    rec = decode(m.value, record_type)
                    if isinstance(rec, DecodeFailure):
                        bad += 1
                        continue
                    out.append(rec)
        if bad:
            log.warning("skipped malformed records", topic=topic, count=bad)
        return out
    finally:
        consumer.close()


def latest_ads(ads: Iterable[Ad]) -> list[Ad]:
    """The newest state per ad id (the ``ads`` topic is a changelog)."""
    return _latest(ads, lambda a: a.ad_id)


def latest_organic(items: Iterable[OrganicItem]) -> list[OrganicItem]:
    """The newest state per organic item id (``organic-items`` is a changelog)."""
    return _latest(items, lambda o: o.item_id)


_S = TypeVar("_S", Ad, OrganicItem)


def _latest(records: Iterable[_S], key: Callable[[_S], str]) -> list[_S]:
    latest: dict[str, _S] = {}
    for rec in records:
        old = latest.get(key(rec))
        if old is None or rec.event_time >= old.event_time:
            latest[key(rec)] = rec
    return list(latest.values())


def latest_feedback(records: Iterable[Feedback]) -> list[Feedback]:
    """One record per request id: the highest revision (ties: the later in the input)."""
    latest: dict[str, Feedback] = {}
    for rec in records:
        old = latest.get(rec.request_id)
        if old is None or rec.revision >= old.revision:
            latest[rec.request_id] = rec
    return sorted(latest.values(), key=lambda r: (r.impression_time, r.request_id))


# --------------------------------------------------------------------------------------
# examples


@dataclass
class Batch:
    """A batch of examples as tensors (shapes per batch row B)."""

    history: Tensor        # [B, H, T] int64
    history_mask: Tensor   # [B, H] float32
    context: Tensor        # [B, C] int64
    target: Tensor         # [B, T] int64
    value: Tensor          # [B] float32 (0 = no generation target)
    prior: Tensor          # [B] int64
    horizon: Tensor        # [B] int64
    mtp: Tensor            # [B, n_mtp, T] int64
    mtp_mask: Tensor       # [B, n_mtp] float32
    slate: Tensor          # [B, I, T] int64
    slate_mask: Tensor     # [B, I] float32
    clicked: Tensor        # [B, I] float32
    converted: Tensor      # [B, I] float32
    slate_bid: Tensor      # [B, I] float32
    slate_bid_type: Tensor  # [B, I] int64 (codes of learner.losses.BID_TYPES)
    slate_exposure: Tensor  # [B, I] float32: the user's earlier impressions of each item


@dataclass
class ExampleSet:
    """Stacked numpy arrays, one row per example (see the module docstring)."""

    history: np.ndarray
    history_mask: np.ndarray
    context: np.ndarray
    target: np.ndarray
    value: np.ndarray
    prior: np.ndarray
    horizon: np.ndarray
    mtp: np.ndarray
    mtp_mask: np.ndarray
    slate: np.ndarray
    slate_mask: np.ndarray
    clicked: np.ndarray
    converted: np.ndarray
    slate_bid: np.ndarray
    slate_bid_type: np.ndarray
    slate_exposure: np.ndarray
    request: np.ndarray    # [n] int64: index of the request (groups examples)
    time: np.ndarray       # [n] float64: impression time
    organic: np.ndarray    # [n] bool: the target is an organic item a user engaged with

    def __len__(self) -> int:
        return int(self.target.shape[0])

    def subset(self, idx: np.ndarray | Sequence[int]) -> ExampleSet:
        idx = np.asarray(idx, dtype=np.int64)
        return ExampleSet(**{k: v[idx] for k, v in self.__dict__.items()})

    def batch(self, idx: np.ndarray | Sequence[int] | None = None) -> Batch:
        sub = self if idx is None else self.subset(idx)
        t = torch.from_numpy
        return Batch(
            history=t(sub.history), history_mask=t(sub.history_mask), context=t(sub.context),
            target=t(sub.target), value=t(sub.value), prior=t(sub.prior),
            horizon=t(sub.horizon), mtp=t(sub.mtp),
            mtp_mask=t(sub.mtp_mask), slate=t(sub.slate), slate_mask=t(sub.slate_mask),
            clicked=t(sub.clicked), converted=t(sub.converted), slate_bid=t(sub.slate_bid),
            slate_bid_type=t(sub.slate_bid_type), slate_exposure=t(sub.slate_exposure))

    @property
    def positives(self) -> np.ndarray:
        """Indices of examples with an ad as generation target (what the held-out
        evaluation and the ad metrics count)."""
        return np.flatnonzero((self.value > 0) & ~self.organic)

    @property
    def organic_positives(self) -> np.ndarray:
        """Indices of examples with an engaged organic item as generation target."""
        return np.flatnonzero((self.value > 0) & self.organic)


def _organic_rows(rec: Feedback, tok: UASIDTokenizer, base: dict[str, Any],
                  dwell_unit_s: float) -> list[dict[str, Any]]:
    """One example per engaged organic item of ``rec``'s mixed feed (see
    :func:`build_examples`)."""
    from learner.rspo import organic_engagement

    rows = []
    for it in rec.organic:
        value = organic_engagement(it.viewed, it.liked, it.dwell_s, dwell_unit_s)
        if value <= 0:
            continue
        try:
            sid = tok.organic_ids_of(it.item_id)
        except UnknownAdError:
            continue
        rows.append({**base, "target": sid, "value": value, "prior": 0, "horizon": 1,
                     "organic": True})
    return rows


def horizon_of(history: np.ndarray, history_mask: np.ndarray, targets: np.ndarray,
               short_horizon: int) -> np.ndarray:
    """Time-horizon routing labels of the prior heads [reconstruction]: history [B, H, T]
    (most recent first), history_mask [B, H], targets [B, K, T] -> [B, K] int64, 0
    (short-term) where the target's level-0 semantic code is among the level-0 codes of
    the first ``short_horizon`` real history rows, else 1 (long-term; also with no
    history)."""
    recent = history[:, :short_horizon, 0]                              # [B, h]
    real = history_mask[:, :short_horizon] > 0
    hit = ((targets[:, :, None, 0] == recent[:, None, :]) & real[:, None, :]).any(-1)
    return np.where(hit, 0, 1).astype(np.int64)


def _ids(tok: UASIDTokenizer, ad_id: str, where: str, on_unknown: str) -> tuple[int, ...] | None:
    try:
        return tok.ids_of(ad_id)
    except UnknownAdError as exc:
        if on_unknown == "skip":
            return None
        raise UnknownAdError(f"{exc} (referenced by {where})") from None


def build_examples(feedback: Iterable[Feedback], tok: UASIDTokenizer, history_len: int = 20,
                   context_features: Sequence[str] = DEFAULT_CONTEXT_FEATURES,
                   context_buckets: int = DEFAULT_CONTEXT_BUCKETS, mtp_heads: int = 2,
                   min_value: float = 0.05, on_unknown: str = "error",
                   organic_len: int = DEFAULT_ORGANIC_LEN,
                   short_horizon: int = 3,
                   organic_dwell_s: float | None = None) -> ExampleSet:
    """Examples from feedback records (newest revision per request, time order).

    ``on_unknown``: ``"error"`` raises :class:`UnknownAdError` naming the ad and the
    request; ``"skip"`` drops unknown history items and slate items. ``organic_len``:
    organic topic ids appended to each context row (the model's ``organic_len``).
    ``short_horizon``: history ads that count as short-term (:func:`horizon_of`).
    ``organic_dwell_s``: with a value, every organic item of a mixed feed the user
    engaged with (``Feedback.organic``) is one more example of its request, its target
    the item's id and its value the engagement reward
    (:func:`learner.rspo.organic_engagement`, dwell unit ``organic_dwell_s``); items
    without an id are skipped. Those rows carry no slate and no MTP targets, and
    :attr:`ExampleSet.positives` leaves them out (``organic_positives`` has them).
    """
    if on_unknown not in ("error", "skip"):
        raise ValueError(f"on_unknown must be 'error' or 'skip', got {on_unknown!r}")
    records = latest_feedback(feedback)
    T, H, M = tok.config.id_len, history_len, mtp_heads
    rows: list[dict[str, Any]] = []
    max_slate = 1
    per_user: dict[str, list[tuple[int, tuple[int, ...]]]] = {}
    for r_idx, rec in enumerate(records):
        hist = np.zeros((H, T), dtype=np.int64)
        hmask = np.zeros(H, dtype=np.float32)
        h = 0
        for ad_id in rec.recent_ad_ids:
            if h == H:
                break
            sid = _ids(tok, ad_id, f"history of request {rec.request_id!r}", on_unknown)
            if sid is not None:
                hist[h], hmask[h] = sid, 1.0
                h += 1
        ctx = np.array(request_ids(rec.context, rec.recent_organic, context_features,
                                   context_buckets, organic_len), dtype=np.int64)
        slate, clicked, converted, bids, bid_types, exposure = [], [], [], [], [], []
        positives: list[tuple[tuple[int, ...], float, int]] = []
        for it in rec.items:
            sid = _ids(tok, it.ad_id, f"slate of request {rec.request_id!r}", on_unknown)
            if sid is None:
                continue
            slate.append(sid)
            clicked.append(float(it.clicked or it.converted))
            converted.append(float(it.converted))
            bids.append(float(it.bid))
            bid_types.append(BID_CODES.get(it.bid_type, 0))
            exposure.append(float(it.exposure))
            if it.clicked or it.converted:
                positives.append((sid, max(float(it.reward), min_value), int(it.converted)))
        max_slate = max(max_slate, len(slate))
        base = {"history": hist, "history_mask": hmask, "context": ctx, "request": r_idx,
                "time": rec.impression_time, "user": rec.user_id}
        if not positives:
            rows.append({**base, "target": (0,) * T, "value": 0.0, "prior": 0, "horizon": 1})
        horizons = horizon_of(hist[None], hmask[None], np.array(
            [p[0] for p in positives], dtype=np.int64).reshape(1, -1, T), short_horizon)[0]
        for (sid, value, prior), hz in zip(positives, horizons.tolist(), strict=True):
            rows.append({**base, "target": sid, "value": value, "prior": prior,
                         "horizon": hz})
            per_user.setdefault(rec.user_id, []).append((r_idx, sid))
        rows[-len(positives) or -1]["slate"] = (slate, clicked, converted, bids, bid_types,
                                                exposure)
        if organic_dwell_s is not None:
            rows.extend(_organic_rows(rec, tok, base, organic_dwell_s))

    # MTP targets: the user's next positives from later requests
    mtp_of: dict[tuple[int, tuple[int, ...]], list[tuple[int, ...]]] = {}
    for seq in per_user.values():
        for j, (req, sid) in enumerate(seq):
            mtp_of.setdefault((req, sid), [s for (r2, s) in seq[j + 1:] if r2 > req][:M])

    n = len(rows)
    ex = ExampleSet(
        history=np.stack([r["history"] for r in rows]) if n else np.zeros((0, H, T), np.int64),
        history_mask=np.stack([r["history_mask"] for r in rows]) if n
        else np.zeros((0, H), np.float32),
        context=np.stack([r["context"] for r in rows]) if n
        else np.zeros((0, len(context_features) + organic_len), np.int64),
        target=np.array([r["target"] for r in rows], dtype=np.int64).reshape(n, T),
        value=np.array([r["value"] for r in rows], dtype=np.float32),
        prior=np.array([r["prior"] for r in rows], dtype=np.int64),
        horizon=np.array([r["horizon"] for r in rows], dtype=np.int64),
        mtp=np.zeros((n, M, T), np.int64), mtp_mask=np.zeros((n, M), np.float32),
        slate=np.zeros((n, max_slate, T), np.int64),
        slate_mask=np.zeros((n, max_slate), np.float32),
        clicked=np.zeros((n, max_slate), np.float32),
        converted=np.zeros((n, max_slate), np.float32),
        slate_bid=np.zeros((n, max_slate), np.float32),
        slate_bid_type=np.zeros((n, max_slate), np.int64),
        slate_exposure=np.zeros((n, max_slate), np.float32),
        request=np.array([r["request"] for r in rows], dtype=np.int64),
        time=np.array([r["time"] for r in rows], dtype=np.float64),
        organic=np.array([bool(r.get("organic")) for r in rows], dtype=bool))
    for i, r in enumerate(rows):
        if r["value"] > 0:
            fut = mtp_of.get((r["request"], tuple(r["target"])), [])
            for k, sid in enumerate(fut):
                ex.mtp[i, k], ex.mtp_mask[i, k] = sid, 1.0
        if "slate" in r:
            slate, clicked, converted, bids, bid_types, exposure = r["slate"]
            k = len(slate)
            if k:
                ex.slate[i, :k] = slate
                ex.slate_mask[i, :k] = 1.0
                ex.clicked[i, :k] = clicked
                ex.converted[i, :k] = converted
                ex.slate_bid[i, :k] = bids
                ex.slate_bid_type[i, :k] = bid_types
                ex.slate_exposure[i, :k] = exposure
    return ex


def split_by_time(ex: ExampleSet, held_out_frac: float) -> tuple[ExampleSet, ExampleSet]:
    """The last ``held_out_frac`` of requests (by impression time) are held out."""
    n_req = int(ex.request.max()) + 1 if len(ex) else 0
    cut = n_req - round(n_req * held_out_frac)
    train = np.flatnonzero(ex.request < cut)
    test = np.flatnonzero(ex.request >= cut)
    return ex.subset(train), ex.subset(test)
