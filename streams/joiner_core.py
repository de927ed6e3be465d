"""The joiner's state machine: impressions ⋈ clicks ⋈ conversions ⋈ organic engagements →
feedback lists.

Pure logic, no Kafka: :class:`JoinCore` holds the live state as decoded objects, returns
what to emit and what to dead-letter, and hands the changed keys, encoded once each, to the
commit protocol (:meth:`JoinCore.take_changes`); :meth:`JoinCore.restore` applies changelog
records. :mod:`streams.joiner` owns the Kafka I/O and the commit protocol.

Event time drives everything. Per source partition:

* ``watermark = min over input topics that still have unread records of the max event
  time seen on that topic - out_of_orderness_s`` (a topic read to its end does not hold
  the watermark back; when every topic is caught up the max over all is used). It never
  decreases. "Seen" counts every impression but only the actions (clicks, conversions,
  organic engagements) applied to their impression: one rejected as outside its
  attribution window (a clock far ahead) or held for an impression not seen yet does not
  move the watermark.
* Emission checks run when the watermark crosses a multiple of ``emit_every_s`` and right
  after an action changed a request whose provisional list is out; at a check, every
  request whose provisional time (impression + observation window) or final time
  (impression + attribution window) has passed is emitted, and so is a correction for
  every request whose rewards or organic engagement changed since its last emitted list.

Organic engagements (``view``, ``like``, ``dwell`` of an organic item of a mixed feed) are
joined exactly like clicks: by request id, deduplicated by event id, held for their
impression (then ``orphan``), ``late`` outside the attribution window, and ``orphan``
when they name an item the impression did not place (as a click on an ad not in the
slate). Every list carries ``Feedback.organic``: one item per organic slot with whether it
was viewed or liked and its total dwell seconds.

State per request id (the table key) is a :class:`RequestState`; it lives until
``impression + attribution window + dedup_retention_s`` (then a tombstone), so its size is
bounded by the attribution window.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Iterator, MutableMapping
from dataclasses import dataclass, field
from typing import Literal, TypeVar

import msgspec
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from streams.schemas import (
    Click,
    Conversion,
    DecodeFailure,
    DlqReason,
    Feedback,
    FeedbackItem,
    FeedbackKind,
    Impression,
    OrganicAction,
    OrganicEngagement,
    OrganicFeedbackItem,
    decode,
)

INPUT_TOPICS = ("impressions", "clicks", "conversions", "organic-engagements")
"""Logical input topics, co-partitioned by user id and read by one agent."""

Action = Click | Conversion | OrganicEngagement
"""What happens to a served impression: joined by request id, deduplicated by event id."""

END_OF_STREAM_REQUEST_ID = "adloop:end-of-stream"
"""The request id of an end-of-stream marker: an :class:`Impression` with an empty slate
whose ``event_time`` is the last event time of a finite log (``adloop replay`` produces
one to every partition of ``impressions`` at the end of a file). The joiner keeps no
state for it; it counts the impressions topic as seen up to ``event_time +
attribution_window_s + out_of_orderness_s``, so once the other topics are read to their
end the watermark passes the attribution window of every request of the log and every
provisional and final list goes out. Events later than the marker still join as usual."""


def end_of_stream_marker(event_time: float) -> Impression:
    """The marker that closes every window of a log whose last event is at ``event_time``."""
    return Impression(request_id=END_OF_STREAM_REQUEST_ID, event_time=event_time,
                      user_id="", slate=[], model_version="", server_id="end-of-stream")

_INF = float("inf")
_NEG_INF = float("-inf")

META_PREFIX = b"\x00meta/"
"""Table keys of per-partition metadata (request ids never start with NUL)."""


class JoinSettings(BaseSettings):
    """Settings of ``adloop join`` (env ``ADLOOP_JOIN_<NAME>``). Windows are event-time seconds."""

    model_config = SettingsConfigDict(env_prefix="ADLOOP_JOIN_", extra="ignore")

    observation_window_s: float = Field(
        300.0, description="event seconds after an impression until the provisional list")
    attribution_window_s: float = Field(
        3600.0, description="event seconds after an impression in which clicks, "
        "conversions and organic engagements count; the final list is emitted when it "
        "closes")
    out_of_orderness_s: float = Field(
        30.0, description="allowed event-time disorder: watermark = max event time - this")
    orphan_grace_s: float = Field(
        600.0, description="event seconds a click/conversion/organic engagement waits for "
        "its impression before it is dead-lettered as orphan")
    dedup_retention_s: float = Field(
        600.0, description="event seconds a finished request's ids are kept after the "
        "final list, so that re-delivered events are recognised as duplicates")
    emit_every_s: float = Field(
        1.0, description="emission checks run when the watermark crosses a multiple of this")
    app_id: str = Field("adloop-joiner", description="consumer group and changelog name "
                        "(the topic prefix is prepended)")
    metrics_port: int = Field(9464, description="port of /metrics /healthz /readyz (0 = any)")
    metrics_host: str = Field("127.0.0.1", description="address of the metrics endpoint")
    commit_interval_s: float = Field(1.0, description="commit protocol interval (wall s)")
    commit_every_records: int = Field(20_000, description="also commit after this many records")
    session_timeout_s: float = Field(10.0, description="consumer group session timeout")
    max_record_bytes: int = Field(256 * 1024, description="larger records are dead-lettered")

    def model_post_init(self, _ctx: object) -> None:
        if not 0 < self.observation_window_s <= self.attribution_window_s:
            raise ValueError("need 0 < observation_window_s <= attribution_window_s")
        if self.out_of_orderness_s < 0 or self.emit_every_s <= 0 or self.orphan_grace_s < 0:
            raise ValueError("out_of_orderness_s, orphan_grace_s >= 0 and emit_every_s > 0")


# --- state records -----------------------------------------------------------------------
# ``gc=False``: these never form reference cycles, and the cyclic GC need not scan them.

class HeldEvent(msgspec.Struct, kw_only=True, gc=False):
    """A click/conversion/organic engagement waiting for its impression (orphan
    candidate)."""

    topic: str
    partition: int
    offset: int
    raw: bytes
    key: bytes | None = None


class RequestState(msgspec.Struct, kw_only=True, gc=False):
    """Everything the joiner knows about one request id."""

    request_id: str
    user_id: str
    partition: int
    impression: Impression | None = None
    clicks: dict[str, str] = {}
    """Applied click event id -> ad id."""
    conversions: dict[str, tuple[str, float]] = {}
    """Applied conversion event id -> (ad id, value)."""
    organic: dict[str, tuple[str, OrganicAction, float]] = {}
    """Applied organic engagement event id -> (item id, action, dwell seconds). The slots
    themselves are the impression's (``impression.organic``); per slot, viewed / liked /
    total dwell are read from here (:func:`organic_feedback`). Absent in state written
    before organic engagements were joined (restores empty)."""
    held: list[HeldEvent] = []
    held_since: float = 0.0
    """Earliest event time among ``held`` (orphan grace runs from here)."""
    revision: int = -1
    """Last emitted revision (-1: nothing emitted yet)."""
    provisional_sent: bool = False
    final_sent: bool = False
    emitted_sig: str = ""
    """Signature of the rewards and organic engagement in the last emitted list (a
    correction is due if it differs; :func:`rewards_and_signature`)."""


class PartitionMeta(msgspec.Struct, kw_only=True, gc=False):
    """Per source partition: watermark and the feedback offset known to be marked."""

    watermark: float = float("-inf")
    next_check: float = float("-inf")
    feedback_offset: int = -1
    """Every feedback record at or below this offset has its mark in the table (lists after
    it are read back from ``feedback`` on restart: :meth:`JoinCore.reconcile`)."""


class _MetaRecord(msgspec.Struct, kw_only=True):
    """:class:`PartitionMeta` as JSON has it: -inf (and NaN) are written as ``null``."""

    watermark: float | None = None
    next_check: float | None = None
    feedback_offset: int = -1

    def meta(self) -> PartitionMeta:
        return PartitionMeta(
            watermark=_NEG_INF if self.watermark is None else self.watermark,
            next_check=_NEG_INF if self.next_check is None else self.next_check,
            feedback_offset=self.feedback_offset)


_S = TypeVar("_S", RequestState, _MetaRecord)
_state_dec = msgspec.json.Decoder(RequestState)
_meta_dec = msgspec.json.Decoder(_MetaRecord)
_enc = msgspec.json.Encoder()


def meta_key(partition: int) -> bytes:
    return META_PREFIX + str(partition).encode()


# --- rewards -------------------------------------------------------------------------------

def feedback_items(state: RequestState) -> list[FeedbackItem]:
    """Per slate item: clicked / converted / value and the reward by bid type.

    * cpc: ``bid`` if the item was clicked, else 0;
    * cpa: ``bid`` if the item converted (a conversion attributed to this request and ad);
    * cpm: ``bid / 1000`` for the impression, whatever the user did.

    ``conversion_value`` is the sum of the advertiser values of the item's conversions.
    """
    return _ad_items(state)[0]


_FLAGS = (":00:", ":10:", ":01:", ":11:")
"""The ``clicked``/``converted`` part of a signature, by ``clicked + 2 * converted``."""


def rewards_and_signature(state: RequestState) -> tuple[list[FeedbackItem], str]:
    """:func:`feedback_items` and the signature of the list (:func:`feedback_signature`:
    the items' :func:`items_signature`, then the organic slots' part, present only when
    the impression placed organic items), built in one pass.

    A request without clicks and conversions (most of them) takes a short path: no
    attribution sets, no rounding, the default ``clicked``/``converted``/``value`` fields.
    """
    items, _, sig = list_and_signature(state)
    return items, sig


def list_and_signature(state: RequestState
                       ) -> tuple[list[FeedbackItem], list[OrganicFeedbackItem], str]:
    """The slate's items, the organic slots' items (:func:`organic_feedback`) and the
    list's signature (:func:`rewards_and_signature`)."""
    items, sig = _ad_items(state)
    organic, organic_sig = organic_feedback(state)
    return items, organic, sig + organic_sig


def _ad_items(state: RequestState) -> tuple[list[FeedbackItem], str]:
    """The slate's items and their :func:`items_signature`."""
    imp = state.impression
    assert imp is not None
    items: list[FeedbackItem] = []
    sig: list[str] = []
    if not state.clicks and not state.conversions:
        for it in imp.slate:
            bt = it.bid_type
            items.append(FeedbackItem(
                ad_id=it.ad_id, semantic_id=it.semantic_id, position=it.position,
                score=it.score, bid=it.bid, bid_type=bt,
                reward=0.0 if bt == "cpc" or bt == "cpa" else it.bid / 1000.0,
                propensity=it.propensity, exposure=it.exposure))
            sig.append(it.ad_id + ":00:0.0")
        return items, ";".join(sig)
    clicked = set(state.clicks.values())
    values: dict[str, float] = {}
    for ad_id, value in state.conversions.values():
        values[ad_id] = values.get(ad_id, 0.0) + value
    for it in imp.slate:
        ad_id = it.ad_id
        c = ad_id in clicked
        v = ad_id in values
        bt = it.bid_type
        if bt == "cpc":
            reward = it.bid if c else 0.0
        elif bt == "cpa":
            reward = it.bid if v else 0.0
        else:
            reward = it.bid / 1000.0
        if v:
            cv = round(values[ad_id], 9)
            sig.append(f"{ad_id}{_FLAGS[c + 2]}{cv!r}")  # converted: ":01:" or ":11:"
        else:
            cv = 0.0
            sig.append(ad_id + (":10:0.0" if c else ":00:0.0"))
        items.append(FeedbackItem(
            ad_id=ad_id, semantic_id=it.semantic_id, position=it.position, score=it.score,
            bid=it.bid, bid_type=bt, clicked=c, converted=v, conversion_value=cv,
            reward=reward, propensity=it.propensity, exposure=it.exposure))
    return items, ";".join(sig)


def items_signature(items: Iterable[FeedbackItem]) -> str:
    """What a correction compares: per item ``ad_id:<clicked><converted>:<value>``
    (``RequestState.emitted_sig`` holds this string, so its format is persisted)."""
    return ";".join([f"{i.ad_id}{_FLAGS[i.clicked + 2 * i.converted]}{i.conversion_value!r}"
                     for i in items])


def organic_signature(organic: Iterable[OrganicFeedbackItem]) -> str:
    """The organic part of a signature: ``|`` then per slot
    ``item_id:<viewed><liked>:<dwell_s>``; empty without organic slots, so the signature
    of an ads-only list (and every ``emitted_sig`` persisted before organic engagements
    were joined) is :func:`items_signature` alone."""
    parts = [f"{o.item_id}{_FLAGS[o.viewed + 2 * o.liked]}{o.dwell_s!r}" for o in organic]
    return "|" + ";".join(parts) if parts else ""


def feedback_signature(fb: Feedback) -> str:
    """The signature of an emitted list (as :func:`rewards_and_signature` builds it)."""
    return items_signature(fb.items) + organic_signature(fb.organic)


def organic_feedback(state: RequestState) -> tuple[list[OrganicFeedbackItem], str]:
    """Per organic slot of the impression, in its order: ``viewed`` (a ``view`` event),
    ``liked`` (a ``like`` event) and ``dwell_s`` (the sum of its ``dwell`` events, rounded
    to 9 digits like a conversion value); and their :func:`organic_signature`."""
    imp = state.impression
    assert imp is not None
    slots = imp.organic
    if not slots:
        return [], ""
    viewed: set[str] = set()
    liked: set[str] = set()
    dwell: dict[str, float] = {}
    for item_id, action, dwell_s in state.organic.values():
        if action == "view":
            viewed.add(item_id)
        elif action == "like":
            liked.add(item_id)
        else:
            dwell[item_id] = dwell.get(item_id, 0.0) + dwell_s
    out = [OrganicFeedbackItem(
        item_id=o.item_id, semantic_id=o.semantic_id, position=o.position, score=o.score,
        viewed=o.item_id in viewed, liked=o.item_id in liked,
        dwell_s=round(dwell.get(o.item_id, 0.0), 9)) for o in slots]
    return out, organic_signature(out)


# --- results ---------------------------------------------------------------------------------

@dataclass
class Rejected:
    """A record to dead-letter."""

    topic: str
    partition: int
    offset: int
    reason: DlqReason
    detail: str
    raw: bytes
    key: bytes | None


class Step:
    """What one input record caused (a plain class: one is made per record)."""

    __slots__ = ("emissions", "organic", "outcome", "rejected", "released")

    def __init__(self) -> None:
        self.emissions: list[Feedback] = []
        self.rejected: list[Rejected] = []
        self.organic: list[str] = []
        """The action of each organic engagement this record applied (itself, or held
        ones its impression released): ``adloop_join_organic_engagements_total``."""
        self.outcome = "applied"
        """applied | held | duplicate | late | orphan | invalid | handler_error |
        end_of_stream (metrics)."""
        self.released: list[tuple[str, str]] = []
        """(topic, outcome) of each held click/conversion/organic engagement this record's
        impression applied (or rejected): counted once more, since it was counted as
        ``held`` on arrival."""


Due = Literal["provisional", "final", "orphan", "expire"]


@dataclass
class _Partition:
    meta: PartitionMeta
    heap: list[tuple[float, str, str]] = field(default_factory=list)
    dirty: set[str] = field(default_factory=set)
    max_seen: dict[str, float] = field(default_factory=dict)
    emitted_before: dict[str, tuple[int, Feedback]] = field(default_factory=dict)
    """Lists found on ``feedback`` (reconcile) for requests the table does not hold yet:
    request id -> (offset of its first such list, its newest list), applied when the
    re-delivered impression recreates the state. Until then the persisted feedback offset
    stays below them, so a restart before that finds them again."""

    def feedback_mark(self, offset: int) -> int:
        """``offset``, held below the first list not yet applied to a state."""
        if self.emitted_before:
            return min(offset, min(o for o, _ in self.emitted_before.values()) - 1)
        return offset


class JoinCore:
    """The join state machine over decoded :class:`RequestState` objects.

    ``store`` (optional): encoded changelog records to start from (key -> value, as written
    by :meth:`take_changes`); it also receives every change :meth:`take_changes` hands out.
    """

    def __init__(self, settings: JoinSettings,
                 store: MutableMapping[bytes, bytes] | None = None) -> None:
        self.s = settings
        self.store = store
        self.parts: dict[int, _Partition] = {}
        self.table: dict[str, RequestState] = {}
        """Live state of every loaded (or being restored) partition, by request id."""
        self.changed: dict[str, int] = {}
        """Request ids written or deleted since the last :meth:`take_changes` -> partition."""
        self.meta_changed: set[int] = set()
        self.persisted: set[str] = set()
        """Request ids whose newest changelog record is a value (not a tombstone): only
        these need a tombstone when they expire."""
        self.restored_meta: dict[int, PartitionMeta] = {}
        self.sizes: dict[bytes, int] = {}
        self.nbytes = 0
        """Encoded size of the state as last written to / read from the changelog."""
        self.pending_sigs: dict[str, tuple[Feedback, str]] = {}
        """Request id -> (list, its signature) for the lists of the latest check, so that
        :meth:`mark_emitted` need not rebuild the signature (used only for that very
        object; a list marked later, or read back from ``feedback``, is signed anew)."""
        if store:
            for k, v in list(store.items()):
                self.restore(k, v)

    # -- state access ------------------------------------------------------------------
    def get(self, request_id: str) -> RequestState | None:
        return self.table.get(request_id)

    def put(self, st: RequestState) -> None:
        self.table[st.request_id] = st
        self.changed[st.request_id] = st.partition

    def delete(self, request_id: str) -> None:
        st = self.table.pop(request_id, None)
        if st is not None:
            self.changed[request_id] = st.partition

    def save_meta(self, partition: int) -> None:
        self.meta_changed.add(partition)

    def states(self) -> Iterator[RequestState]:
        yield from list(self.table.values())

    # -- persistence (changelog) ---------------------------------------------------------
    def restore(self, key: bytes, value: bytes | None) -> None:
        """Apply one changelog record (before :meth:`load_partition` of its partition).

        Raises :class:`StateFormatError` for a record this build cannot read.
        """
        if not isinstance(key, bytes):
            raise StateFormatError(f"changelog record with key {key!r}: keys are never null")
        if key.startswith(META_PREFIX):
            part = int(key[len(META_PREFIX):])
            if value is None:
                self.restored_meta.pop(part, None)
            else:
                self.restored_meta[part] = _decode_state(_meta_dec, key, value).meta()
        else:
            try:
                rid = key.decode()
            except UnicodeDecodeError as exc:
                raise StateFormatError(f"changelog key {key!r} is not UTF-8 ({exc})") from exc
            if value is None:
                self.table.pop(rid, None)
                self.persisted.discard(rid)
            else:
                self.table[rid] = _decode_state(_state_dec, key, value)
                self.persisted.add(rid)
        self._size(key, value)

    def _size(self, key: bytes, value: bytes | None) -> None:
        old = self.sizes.pop(key, 0)
        self.nbytes -= old
        if value is not None:
            self.sizes[key] = len(value)
            self.nbytes += len(value)

    def take_changes(self) -> list[tuple[int, bytes, bytes | None]]:
        """``(partition, key, value or None)`` of every key changed since the last call,
        each encoded once. A request created and expired in between is left out (nothing
        of it reached the changelog, so it needs no tombstone)."""
        out: list[tuple[int, bytes, bytes | None]] = []
        for rid, p in self.changed.items():
            key = rid.encode()
            st = self.table.get(rid)
            if st is not None:
                value = _enc.encode(st)
                out.append((p, key, value))
                self.persisted.add(rid)
                self._size(key, value)
            elif rid in self.persisted:
                out.append((p, key, None))
                self.persisted.discard(rid)
                self._size(key, None)
        for p in sorted(self.meta_changed):
            part = self.parts.get(p)
            if part is not None:
                key = meta_key(p)
                value = _enc.encode(part.meta)
                out.append((p, key, value))
                self._size(key, value)
        self.changed = {}
        self.meta_changed = set()
        if self.store is not None:
            for _p, key, maybe in out:
                if maybe is None:
                    self.store.pop(key, None)
                else:
                    self.store[key] = maybe
        return out

    # -- partitions ----------------------------------------------------------------------
    def loaded(self, partition: int) -> bool:
        return partition in self.parts

    def forget_partition(self, partition: int) -> None:
        """Drop a revoked partition's state (already persisted by the commit protocol)."""
        self.parts.pop(partition, None)
        self.restored_meta.pop(partition, None)
        self.meta_changed.discard(partition)
        for rid in [r for r, st in self.table.items() if st.partition == partition]:
            del self.table[rid]
            self.persisted.discard(rid)
            self.changed.pop(rid, None)
            self._size(rid.encode(), None)
        self._size(meta_key(partition), None)

    def load_partition(self, partition: int) -> PartitionMeta:
        """Rebuild the deadline heap of ``partition`` from the restored state; return its
        metadata."""
        return self.load_partitions([partition])[partition]

    def load_partitions(self, partitions: Iterable[int]) -> dict[int, PartitionMeta]:
        """:meth:`load_partition` for several partitions in one pass over the table (after
        their changelog records were restored); returns each one's metadata."""
        parts: dict[int, _Partition] = {}
        for p in sorted(set(partitions)):
            meta = self.restored_meta.pop(p, None)
            parts[p] = self.parts[p] = _Partition(meta if meta is not None else PartitionMeta())
        for st in self.states():
            part = parts.get(st.partition)
            if part is not None:
                self._schedule(part, st)
                if (st.provisional_sent and not st.final_sent and st.impression is not None
                        and rewards_and_signature(st)[1] != st.emitted_sig):
                    part.dirty.add(st.request_id)  # a correction was due when we stopped
        return {p: part.meta for p, part in parts.items()}

    def reconcile(self, partition: int, emitted: Iterable[tuple[int, Feedback]]) -> int:
        """Mark feedback found on the output topic after ``meta.feedback_offset``.

        A crash between a feedback record's ack and its mark reaching the changelog leaves
        a record whose mark is missing; this re-applies those marks so the restarted joiner
        never emits a second list with the same revision. Returns how many were marked.
        """
        part = self.parts[partition]
        n = 0
        newest = part.meta.feedback_offset
        for offset, fb in emitted:
            st = self.get(fb.request_id)
            if st is None or st.impression is None:
                # the state never reached the changelog: remember the list until the
                # re-delivered impression recreates it
                prev = part.emitted_before.get(fb.request_id)
                if prev is None:
                    part.emitted_before[fb.request_id] = (offset, fb)
                    n += 1
                elif fb.revision > prev[1].revision:
                    part.emitted_before[fb.request_id] = (prev[0], fb)
                    n += 1
            elif fb.revision > st.revision:
                self._mark(st, fb)
                self.put(st)
                if fb.kind == "final":
                    self._schedule_expiry(part, st)
                n += 1
            newest = max(newest, offset)
        mark = part.feedback_mark(newest)
        if mark > part.meta.feedback_offset:
            part.meta.feedback_offset = mark
            self.save_meta(partition)
        return n

    def _schedule(self, part: _Partition, st: RequestState) -> None:
        imp = st.impression
        if imp is None:
            if st.held:
                heapq.heappush(part.heap, (st.held_since + self.s.orphan_grace_s,
                                           st.request_id, "orphan"))
            return
        t0 = imp.event_time
        if not st.provisional_sent:
            heapq.heappush(part.heap, (t0 + self.s.observation_window_s, st.request_id,
                                       "provisional"))
        if not st.final_sent:
            heapq.heappush(part.heap, (t0 + self.s.attribution_window_s, st.request_id,
                                       "final"))
        else:
            self._schedule_expiry(part, st)

    def _schedule_expiry(self, part: _Partition, st: RequestState) -> None:
        assert st.impression is not None
        due = st.impression.event_time + self.s.attribution_window_s + self.s.dedup_retention_s
        heapq.heappush(part.heap, (due, st.request_id, "expire"))

    # -- the per-record step -------------------------------------------------------------
    def on_record(self, topic: str, partition: int, offset: int, key: bytes | None,
                  raw: bytes | None, caught_up: dict[str, bool]) -> Step:
        """Decode and apply one input record, advance the watermark, collect emissions.

        ``caught_up[topic]`` says whether that topic's partition has no unread records
        (so it does not hold the watermark back).
        """
        part = self.parts[partition]
        step = Step()
        record = decode(raw, _RECORD_TYPES[topic], self.s.max_record_bytes)
        if isinstance(record, DecodeFailure):
            step.rejected.append(Rejected(topic, partition, offset, record.reason,
                                          record.detail, raw or b"", key))
            step.outcome = "invalid"
        else:
            wm = part.meta.watermark
            if (isinstance(record, Impression)
                    and record.request_id == END_OF_STREAM_REQUEST_ID):
                step.outcome = "end_of_stream"
                close = (record.event_time + self.s.attribution_window_s
                         + self.s.out_of_orderness_s)
                if close > part.max_seen.get(topic, _NEG_INF):
                    part.max_seen[topic] = close
                self._advance(part, partition, caught_up, step)
                return step
            if isinstance(record, Impression):
                step.outcome = self._on_impression(part, record, topic, partition, offset,
                                                   raw or b"", key, step, wm)
                seen = True
            else:
                step.outcome = self._on_action(part, record, topic, partition, offset,
                                               raw or b"", key, step, wm)
                # only an action inside its impression's window counts: one from
                # a clock far ahead (rejected) or one still waiting for its impression
                # must not move the watermark for every other request
                seen = step.outcome == "applied"
            if seen and record.event_time > part.max_seen.get(topic, _NEG_INF):
                part.max_seen[topic] = record.event_time
        self._advance(part, partition, caught_up, step)
        return step

    def _on_impression(self, part: _Partition, imp: Impression, topic: str, partition: int,
                       offset: int, raw: bytes, key: bytes | None, step: Step, wm: float) -> str:
        rid = imp.request_id
        st = self.table.get(rid)
        if st is not None and st.impression is not None:
            return "duplicate"
        before = part.emitted_before.pop(rid, None) if part.emitted_before else None
        if imp.event_time + self.s.attribution_window_s <= wm:
            step.rejected.append(Rejected(
                topic, partition, offset, "late",
                f"impression at {imp.event_time} but watermark {wm} is past its "
                f"attribution window ({self.s.attribution_window_s}s)", raw, key))
            return "late"
        held = st.held if st is not None else []
        st = RequestState(request_id=imp.request_id, user_id=imp.user_id,
                          partition=partition, impression=imp)
        for h in held:  # the orphans waiting for this impression
            rec = decode(h.raw, _RECORD_TYPES[h.topic], 1 << 30)
            if isinstance(rec, Action):
                step.released.append((h.topic, self._apply(
                    st, rec, h.topic, h.partition, h.offset, h.raw, h.key, step, wm)))
        if before is not None:  # emitted before a crash whose state was lost
            self._mark(st, before[1])
        self.put(st)
        self._schedule(part, st)
        return "applied"

    def _on_action(self, part: _Partition, ev: Action, topic: str, partition: int,
                   offset: int, raw: bytes, key: bytes | None, step: Step, wm: float) -> str:
        st = self.get(ev.request_id)
        if st is None or st.impression is None:
            if st is not None and any(h.topic == topic and h.offset == offset for h in st.held):
                return "duplicate"
            if ev.event_time + self.s.orphan_grace_s <= wm:
                step.rejected.append(Rejected(
                    topic, partition, offset, "orphan",
                    f"no impression for request {ev.request_id} and watermark {wm} is past "
                    f"the orphan grace period", raw, key))
                return "orphan"
            if st is None:
                st = RequestState(request_id=ev.request_id, user_id=ev.user_id,
                                  partition=partition, held_since=ev.event_time)
            st.held.append(HeldEvent(topic=topic, partition=partition, offset=offset, raw=raw,
                                     key=key))
            first = len(st.held) == 1
            st.held_since = ev.event_time if first else min(st.held_since, ev.event_time)
            self.put(st)
            if first:
                heapq.heappush(part.heap, (st.held_since + self.s.orphan_grace_s,
                                           st.request_id, "orphan"))
            return "held"
        outcome = self._apply(st, ev, topic, partition, offset, raw, key, step, wm)
        if outcome == "applied":
            self.put(st)
            if st.provisional_sent:
                part.dirty.add(st.request_id)
        return outcome

    def _apply(self, st: RequestState, ev: Action, topic: str, partition: int,
               offset: int, raw: bytes, key: bytes | None, step: Step, wm: float) -> str:
        """Apply one click/conversion/organic engagement to a request that has its
        impression (no store write)."""
        assert st.impression is not None
        if isinstance(ev, OrganicEngagement):
            if ev.event_id in st.organic:
                return "duplicate"
        elif ev.event_id in st.clicks or ev.event_id in st.conversions:
            return "duplicate"
        t0 = st.impression.event_time
        if st.final_sent or ev.event_time > t0 + self.s.attribution_window_s:
            step.rejected.append(Rejected(
                topic, partition, offset, "late",
                f"{topic[:-1]} at {ev.event_time} is outside the attribution window "
                f"[{t0}, {t0 + self.s.attribution_window_s}] of request {ev.request_id}"
                + (" (final already emitted)" if st.final_sent else ""), raw, key))
            return "late"
        if isinstance(ev, OrganicEngagement):
            item_id = ev.item_id
            for slot in st.impression.organic:
                if slot.item_id == item_id:
                    break
            else:  # as a click on an ad not in the slate
                step.rejected.append(Rejected(
                    topic, partition, offset, "orphan",
                    f"organic item {item_id} was not shown in request {ev.request_id}",
                    raw, key))
                return "orphan"
            st.organic[ev.event_id] = (item_id, ev.action, ev.dwell_s)
            step.organic.append(ev.action)
            return "applied"
        ad_id = ev.ad_id
        for it in st.impression.slate:
            if it.ad_id == ad_id:
                break
        else:
            step.rejected.append(Rejected(
                topic, partition, offset, "orphan",
                f"ad {ev.ad_id} was not shown in request {ev.request_id}", raw, key))
            return "orphan"
        if isinstance(ev, Click):
            st.clicks[ev.event_id] = ev.ad_id
        else:
            st.conversions[ev.event_id] = (ev.ad_id, ev.value)
        return "applied"

    # -- watermark and emission -------------------------------------------------------------
    def watermark_candidate(self, part: _Partition, caught_up: dict[str, bool]) -> float:
        max_seen = part.max_seen
        base = _INF
        for t in INPUT_TOPICS:
            if not caught_up.get(t, False):
                seen = max_seen.get(t, _NEG_INF)
                if seen < base:
                    base = seen
        if base == _INF:  # every topic caught up
            if not max_seen:
                return _NEG_INF
            base = max(max_seen.values())
        return base - self.s.out_of_orderness_s

    def _advance(self, part: _Partition, partition: int, caught_up: dict[str, bool],
                 step: Step) -> None:
        cand = self.watermark_candidate(part, caught_up)
        meta = part.meta
        if cand > meta.watermark:
            meta.watermark = cand
        if meta.watermark < meta.next_check and not part.dirty:
            return  # corrections (dirty requests) go out at once, the rest at checks
        every = self.s.emit_every_s
        meta.next_check = (meta.watermark // every + 1) * every
        self._check(part, partition, step)
        self.save_meta(partition)

    def _check(self, part: _Partition, partition: int, step: Step) -> None:
        if self.pending_sigs:  # lists of an earlier check, marked by now (or never)
            self.pending_sigs.clear()
        wm = part.meta.watermark
        heap = part.heap
        if not part.dirty and (not heap or heap[0][0] > wm):
            return  # nothing due
        table = self.table
        touched: dict[str, RequestState] = {}
        expired: list[str] = []
        while heap and heap[0][0] <= wm:
            _due, rid, kind = heapq.heappop(heap)
            st = table.get(rid)
            if st is None:
                continue
            if kind == "orphan":
                if st.impression is None and st.held:
                    for h in st.held:
                        step.rejected.append(Rejected(
                            h.topic, h.partition, h.offset, "orphan",
                            f"no impression for request {rid} within the orphan grace "
                            f"period ({self.s.orphan_grace_s}s)", h.raw, h.key))
                    expired.append(rid)
                    touched.pop(rid, None)
                continue
            if kind == "expire":
                if st.final_sent:
                    expired.append(rid)
                    touched.pop(rid, None)
                continue
            touched[rid] = st
        for rid in part.dirty:
            if rid not in touched:
                st = self.get(rid)
                if st is not None:
                    touched[rid] = st
        part.dirty.clear()
        for st in sorted(touched.values(), key=_t0):
            fb = self._due_list(st, wm)
            if fb is not None:
                step.emissions.append(fb)
        for rid in expired:
            self.delete(rid)

    def _due_list(self, st: RequestState, wm: float) -> Feedback | None:
        imp = st.impression
        if imp is None or st.final_sent:
            return None
        t0 = imp.event_time
        kind: FeedbackKind
        if wm >= t0 + self.s.attribution_window_s:
            kind = "final"
        elif wm >= t0 + self.s.observation_window_s:
            kind = "correction" if st.provisional_sent else "provisional"
        else:
            return None
        items, organic, sig = list_and_signature(st)
        if kind == "correction" and sig == st.emitted_sig:
            return None
        at = max(wm, t0)
        fb = Feedback(request_id=st.request_id, user_id=st.user_id, kind=kind,
                      revision=st.revision + 1, impression_time=t0, event_time=at,
                      elapsed_s=at - t0, window_closed=kind == "final",
                      context=imp.context, recent_ad_ids=imp.recent_ad_ids,
                      recent_organic=imp.recent_organic,
                      model_version=imp.model_version, items=items, beams=imp.beams,
                      organic=organic, bucket=imp.bucket)
        self.pending_sigs[st.request_id] = (fb, sig)
        return fb

    # -- marks (after the output is acknowledged) --------------------------------------------
    def _mark(self, st: RequestState, fb: Feedback) -> None:
        if fb.revision <= st.revision:
            raise InvariantError(f"revision of {fb.request_id} went from {st.revision} "
                                 f"to {fb.revision}")
        st.revision = fb.revision
        pending = self.pending_sigs.pop(fb.request_id, None)
        st.emitted_sig = (pending[1] if pending is not None and pending[0] is fb
                          else feedback_signature(fb))
        st.provisional_sent = True
        if fb.kind == "final":
            st.final_sent = True
            st.held = []

    def mark_emitted(self, partition: int, emitted: list[Feedback]) -> None:
        """Record in the table that these lists were handed to the producer."""
        part = self.parts[partition]
        for fb in emitted:
            st = self.table.get(fb.request_id)
            if st is None:
                raise InvariantError(f"emitted {fb.request_id} has no state")
            self._mark(st, fb)
            self.put(st)
            if fb.kind == "final":
                self._schedule_expiry(part, st)

    def set_feedback_offset(self, partition: int, offset: int) -> None:
        """Every feedback list of ``partition`` up to ``offset`` is acknowledged (the
        persisted mark stays below lists not yet applied to a state)."""
        part = self.parts[partition]
        meta = part.meta
        offset = part.feedback_mark(offset)
        if offset < meta.feedback_offset:
            raise InvariantError(f"feedback offset went back from {meta.feedback_offset} "
                                 f"to {offset}")
        if offset > meta.feedback_offset:
            meta.feedback_offset = offset
            self.save_meta(partition)

    def watermark(self, partition: int) -> float:
        return self.parts[partition].meta.watermark

    def requests_held(self) -> int:
        return len(self.table)


class InvariantError(RuntimeError):
    """A joiner invariant broke (revisions or output offsets went backwards)."""


class StateFormatError(RuntimeError):
    """A changelog record this build cannot read (written by an incompatible version)."""


def _decode_state(dec: msgspec.json.Decoder[_S], key: bytes, value: bytes) -> _S:
    try:
        return dec.decode(value)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise StateFormatError(f"changelog record {key!r} is not a state record of this "
                               f"version ({exc}); start with a new app_id or delete the "
                               f"changelog topic") from exc


def _t0(st: RequestState) -> float:
    return st.impression.event_time if st.impression is not None else 0.0


_RECORD_TYPES: dict[str, type[Impression] | type[Click] | type[Conversion]
                    | type[OrganicEngagement]] = {
    "impressions": Impression, "clicks": Click, "conversions": Conversion,
    "organic-engagements": OrganicEngagement,
}
