"""Event contracts: one typed record per Kafka topic, JSON-encoded with a ``schema`` version.

Every record is a :class:`msgspec.Struct`; :func:`decode` turns raw bytes into the
record or a :class:`DecodeFailure` whose ``reason`` is one of :data:`DLQ_REASONS`,
so that any consumer can dead-letter it without guessing. Times are event times in
seconds since the Unix epoch (the replay runs simulated time, so never compare them
with the wall clock).
"""

from __future__ import annotations

import base64
import math
import time
from typing import Any, ClassVar, Literal, TypeVar

import msgspec

SCHEMA_VERSION = 1
"""The schema version of every record type this build writes, except where a type says
otherwise (:data:`MODEL_UPDATE_SCHEMA`)."""

MODEL_UPDATE_SCHEMA = 2
"""``model-updates`` records carry a signature from schema 2 on (``streams/signing.py``).
Schema 1 records (written before signatures) still decode, so that a reader refuses them
as ``unsigned`` instead of failing on them."""

DEFAULT_MAX_RECORD_BYTES = 256 * 1024
"""Records larger than this are dead-lettered with reason ``oversized``."""

BidType = Literal["cpc", "cpa", "cpm"]
AdStatus = Literal["active", "paused", "exhausted"]
FeedbackKind = Literal["provisional", "correction", "final"]
OrganicKind = Literal["video", "article"]
OrganicStatus = Literal["active", "removed"]
OrganicAction = Literal["view", "like", "dwell"]

DLQ_REASONS = (
    "not_json",        # the bytes do not parse as JSON (or not UTF-8)
    "invalid",         # JSON, but a field is missing or has the wrong type/value
    "schema_version",  # a schema version this build does not read
    "oversized",       # larger than the consumer's record limit
    "late",            # event time beyond the attribution window (joiner)
    "orphan",          # click/conversion/organic engagement whose impression never
                       # arrived, or that names an ad/item it did not show (joiner)
    "handler_error",   # a well-formed record the handler could not process
    "unsigned",        # a model-updates record without a signature (schema 1, or empty)
    "bad_signature",   # a model-updates record whose signature does not verify
    "unknown_key",     # a model-updates record signed with a key id the reader lacks
    "uri_outside_bases",  # a signed model-updates record naming a snapshot outside the
                          # reader's snapshot bases
)
DlqReason = Literal[
    "not_json", "invalid", "schema_version", "oversized", "late", "orphan", "handler_error",
    "unsigned", "bad_signature", "unknown_key", "uri_outside_bases",
]


class Event(msgspec.Struct, kw_only=True, omit_defaults=False):
    """Base of every record. ``schema`` is checked on decode against ``SCHEMAS_READ``."""

    schema: int = SCHEMA_VERSION
    SCHEMAS_READ: ClassVar[tuple[int, ...]] = (SCHEMA_VERSION,)
    """The schema versions this build decodes for the type (the newest is written)."""


class Ad(Event, kw_only=True):
    """Full state of one ad (topic ``ads``, compacted, key = ad id)."""

    ad_id: str
    advertiser_id: str
    industry: str
    bid_type: BidType
    conversion_goal: str
    bid: float
    budget: float
    title: str
    description: str
    status: AdStatus = "active"
    created_time: float
    event_time: float

    def __post_init__(self) -> None:
        if not self.ad_id:
            raise ValueError("ad_id must not be empty")
        if self.bid < 0 or self.budget < 0:
            raise ValueError("bid and budget must be >= 0")


class OrganicItem(Event, kw_only=True):
    """Full state of one organic item, a video or an article (topic ``organic-items``,
    compacted, key = item id). Organic items share the ads' semantic-ID space: the
    tokenizer embeds ``title`` and ``description`` like an ad's text."""

    item_id: str
    """``<topic>#<n>``; the part before ``#`` is the topic
    (:func:`streams.features.organic_topic`)."""
    kind: OrganicKind
    topic: str
    title: str
    description: str = ""
    status: OrganicStatus = "active"
    created_time: float
    event_time: float

    def __post_init__(self) -> None:
        if not self.item_id:
            raise ValueError("item_id must not be empty")
        if not self.topic:
            raise ValueError("topic must not be empty")


class OrganicSlot(msgspec.Struct, kw_only=True):
    """One organic item the server placed in a mixed feed (``Impression.organic``)."""

    item_id: str
    semantic_id: list[int]
    position: int
    """Rank among the feed's organic items, 0 first. The feed shows organic item 0, then
    ad 0, organic item 1, ad 1, ... (docs/traffic.md, Mixed feed)."""
    score: float
    """The generator's log-probability of the item's semantic id."""


class SlateItem(msgspec.Struct, kw_only=True):
    """One ad in a served slate."""

    ad_id: str
    semantic_id: list[int]
    position: int
    score: float
    bid: float
    bid_type: BidType
    propensity: float | None = None
    """Probability that the logging policy served this ad at this position, when the log
    knows it (a logged dataset's propensity, in (0, 1]); ``None`` otherwise. Used by
    off-policy evaluation; absent in older records."""
    exposure: float = 0.0
    """Impressions of this ad to this user the server had counted before this one
    (:mod:`server.exposure`; the fatigue feature the value model read). 0 in older
    records."""


class BeamCandidate(msgspec.Struct, kw_only=True):
    """One final beam of the request's trie-constrained beam search: an ad the value
    ranking chose the slate from (shown or not)."""

    ad_id: str
    semantic_id: list[int]
    logprob: float
    """The generator's sequence log-probability of the id under the served trie
    constraint (the beam's score in the search)."""
    expected_value: float
    """The ranker's value the slate was ranked by (expected revenue per impression)."""
    bid: float
    bid_type: BidType


class Impression(Event, kw_only=True):
    """A served slate (topic ``impressions``, key = user id)."""

    request_id: str
    event_time: float
    user_id: str
    context: dict[str, str] = {}
    recent_ad_ids: list[str] = []
    recent_organic: list[str] = []
    """The user's recent organic items (``<topic>#<n>``), oldest first; empty in old
    records."""
    slate: list[SlateItem]
    model_version: str
    beam_widths: list[int] = []
    server_id: str = ""
    beams: list[BeamCandidate] = []
    """The final beams the slate was ranked from, best expected value first (at most the
    server's ``log_beams``); empty in old records and with beam logging off."""
    organic: list[OrganicSlot] = []
    """The organic items of a mixed feed (``organic_k`` > 0 in the request); empty in old
    records and in ads-only answers."""
    bucket: str = ""
    """The live A/B bucket that served it (``online`` or ``control``); empty without a
    control bucket and in old records."""

    def __post_init__(self) -> None:
        n = len(self.slate)
        for i, item in enumerate(self.slate):
            if not 0 <= item.position < n:
                raise ValueError(f"slate[{i}].position {item.position} is outside the slate "
                                 f"of {n} item(s) (0..{n - 1})")
            p = item.propensity
            if p is not None and not 0.0 < p <= 1.0:
                raise ValueError(f"slate[{i}].propensity {p} is not in (0, 1]")
            if not 0.0 <= item.exposure < math.inf:
                raise ValueError(f"slate[{i}].exposure {item.exposure} is not a finite "
                                 "count >= 0")
        m = len(self.organic)
        seen: set[str] = set()
        for i, slot in enumerate(self.organic):
            if not 0 <= slot.position < m:
                raise ValueError(f"organic[{i}].position {slot.position} is outside the "
                                 f"{m} organic item(s) (0..{m - 1})")
            if slot.item_id in seen:
                raise ValueError(f"organic[{i}].item_id {slot.item_id!r} appears twice")
            seen.add(slot.item_id)


class Click(Event, kw_only=True):
    """A click on one ad of a slate (topic ``clicks``, key = user id)."""

    event_id: str
    request_id: str
    user_id: str
    ad_id: str
    event_time: float


class Conversion(Event, kw_only=True):
    """A conversion attributed to one ad of a slate (topic ``conversions``, key = user id)."""

    event_id: str
    request_id: str
    user_id: str
    ad_id: str
    event_time: float
    value: float

    def __post_init__(self) -> None:
        if self.value < 0:
            raise ValueError("value must be >= 0")


class OrganicEngagement(Event, kw_only=True):
    """What a user did with one organic item of a mixed feed (topic
    ``organic-engagements``, key = user id): ``view`` (opened it), ``like``, or ``dwell``
    (left it after ``dwell_s`` seconds; one per view)."""

    event_id: str
    request_id: str
    user_id: str
    item_id: str
    action: OrganicAction
    dwell_s: float = 0.0
    """Seconds spent on the item (``dwell`` only; 0 for the other actions)."""
    event_time: float

    def __post_init__(self) -> None:
        if not self.dwell_s >= 0.0 or self.dwell_s == float("inf"):
            raise ValueError(f"dwell_s must be a finite number >= 0, got {self.dwell_s}")
        if self.action != "dwell" and self.dwell_s:
            raise ValueError(f"dwell_s is only for action 'dwell', got {self.action!r}")


class OrganicFeedbackItem(msgspec.Struct, kw_only=True):
    """One organic item of a joined mixed feed with what the user did with it."""

    item_id: str
    semantic_id: list[int]
    position: int
    score: float
    viewed: bool = False
    liked: bool = False
    dwell_s: float = 0.0
    """Total seconds of its ``dwell`` events."""


class FeedbackItem(msgspec.Struct, kw_only=True):
    """One slate item with what the user did and the realized reward."""

    ad_id: str
    semantic_id: list[int]
    position: int
    score: float
    bid: float
    bid_type: BidType
    clicked: bool = False
    converted: bool = False
    conversion_value: float = 0.0
    reward: float = 0.0
    propensity: float | None = None
    """The impression's logging propensity of this item (``SlateItem.propensity``)."""
    exposure: float = 0.0
    """Earlier impressions of this ad to this user (``SlateItem.exposure``); 0 in older
    records."""


class Feedback(Event, kw_only=True):
    """A joined impression (topic ``feedback``, key = user id).

    ``kind`` is ``provisional`` after the observation window, ``correction`` when a
    conversion lands later inside the attribution window, ``final`` when the window
    closes. ``revision`` increases per request id, so (request_id, revision) is unique.
    """

    request_id: str
    user_id: str
    kind: FeedbackKind
    revision: int
    impression_time: float
    event_time: float
    """Event time at which this record was emitted (the joiner's watermark)."""
    elapsed_s: float
    window_closed: bool
    context: dict[str, str] = {}
    recent_ad_ids: list[str] = []
    recent_organic: list[str] = []
    """The impression's recent organic items, oldest first; empty in old records."""
    model_version: str = ""
    items: list[FeedbackItem]
    beams: list[BeamCandidate] = []
    """The impression's final beams (``Impression.beams``), copied onto every revision;
    empty in old records."""
    organic: list[OrganicFeedbackItem] = []
    """The impression's organic items (``Impression.organic``) with their engagement so
    far; empty in old records and for ads-only impressions."""
    bucket: str = ""
    """The impression's A/B bucket (``Impression.bucket``), copied onto every revision."""


class ModelUpdate(Event, kw_only=True):
    """A published snapshot (topic ``model-updates``, compacted, key = model name).

    Signed by the learner (:func:`streams.signing.sign_update`): ``signature`` is the
    HMAC-SHA256 of every other field under the key ``key_id``; a reader verifies it
    before it fetches anything (docs/security.md). Schema 1 records have neither field
    and are refused as ``unsigned``."""

    schema: int = MODEL_UPDATE_SCHEMA
    SCHEMAS_READ: ClassVar[tuple[int, ...]] = (1, MODEL_UPDATE_SCHEMA)
    model_name: str
    version: str
    parent: str | None
    sha256: str
    """sha256 of the snapshot's manifest file; the manifest holds each file's sha256."""
    uri: str
    id_space_version: str
    data_watermark: float
    """Newest event time the snapshot was trained on."""
    created_time: float
    metrics: dict[str, float] = {}
    key_id: str = ""
    """Id of the signing key in the readers' keyrings (empty: unsigned)."""
    signature: str = ""
    """Lower-case hex HMAC-SHA256 (``streams.signing``); empty: unsigned."""


StatsDimension = Literal["ad", "advertiser", "industry"]
StatsWindow = Literal["tumbling", "hopping"]


class AdStats(Event, kw_only=True):
    """Aggregates of final feedback lists over one event-time window (topic ``ad-stats``,
    compacted, key = ``<dimension>:<id>:<window>:<window_start>``), written by
    ``adloop stats``. At-least-once: after a crash a window may briefly count a few
    records twice (``streams/stats.py``)."""

    dimension: StatsDimension
    id: str
    window: StatsWindow
    window_start: float
    window_end: float
    impressions: int
    clicks: int
    conversions: int
    revenue: float
    """Sum of the items' rewards (the platform's realized revenue)."""
    conversion_value: float
    ctr: float
    """clicks / impressions (0 without impressions)."""
    cvr: float
    """conversions / clicks (0 without clicks)."""
    ecpm: float
    """1000 × revenue / impressions."""
    updated_time: float
    """Wall-clock time of this update."""

    def key(self) -> str:
        """Its compaction key: one record per dimension, id, window kind and start."""
        return f"{self.dimension}:{self.id}:{self.window}:{self.window_start:.0f}"


class DeadLetter(Event, kw_only=True):
    """A rejected record with where it came from and why (topic ``dlq``)."""

    source_topic: str
    partition: int
    offset: int
    reason: DlqReason
    detail: str
    raw_b64: str
    key_b64: str | None = None
    failed_time: float

    @classmethod
    def of(cls, *, source_topic: str, partition: int, offset: int, reason: DlqReason,
           detail: str, raw: bytes, key: bytes | None = None) -> DeadLetter:
        return cls(
            source_topic=source_topic, partition=partition, offset=offset, reason=reason,
            detail=detail[:2000], raw_b64=base64.b64encode(raw).decode("ascii"),
            key_b64=base64.b64encode(key).decode("ascii") if key is not None else None,
            failed_time=time.time(),
        )

    def raw(self) -> bytes:
        return base64.b64decode(self.raw_b64)


T = TypeVar("T", bound=Event)


class DecodeFailure(msgspec.Struct, frozen=True):
    """Why bytes could not become a record."""

    reason: DlqReason
    detail: str


_encoder = msgspec.json.Encoder()
_decoders: dict[type[Any], msgspec.json.Decoder[Any]] = {}


def encode(record: Event) -> bytes:
    """JSON bytes of a record."""
    return _encoder.encode(record)


def decode(raw: bytes | None, record_type: type[T],
           max_bytes: int = DEFAULT_MAX_RECORD_BYTES) -> T | DecodeFailure:
    """Decode ``raw`` as ``record_type`` or say why not. Total: never raises.

    Reasons: ``invalid`` for a tombstone (``None``) and for well-formed JSON of the wrong
    shape (missing field, wrong type, out-of-range number, failed check); ``not_json`` for
    bytes that are not UTF-8 (anywhere: keys, values, ignored fields), malformed JSON
    (BOM, ``NaN``/``Infinity`` literals, trailing bytes, lone surrogates) or nesting
    deeper than the interpreter's recursion limit; ``schema_version`` for another schema
    version; ``oversized`` above ``max_bytes``. A duplicate key keeps its last value
    (msgspec's rule; JSON leaves it open). Unknown fields are ignored (forward
    compatibility) but must still be valid UTF-8 JSON.

    The happy path is one typed msgspec decode plus ``bytes.isascii`` (and a UTF-8 check
    only for records with non-ASCII bytes); only failures do extra work.
    """
    if raw is None:
        return DecodeFailure("invalid", "record value is null (tombstone)")
    try:
        if len(raw) > max_bytes:
            return DecodeFailure("oversized",
                                 f"record is {len(raw)} bytes, limit is {max_bytes}")
        dec = _decoders.get(record_type)
        if dec is None:
            dec = _decoders[record_type] = msgspec.json.Decoder(record_type)
        if not raw.isascii():
            # msgspec does not validate the UTF-8 of fields it skips
            raw.decode("utf-8")
        record = dec.decode(raw)
    except UnicodeDecodeError as exc:
        return DecodeFailure("not_json", f"not UTF-8: {exc.reason} at byte {exc.start}")
    except msgspec.ValidationError as exc:
        return _explain_invalid(raw, record_type, exc)
    except msgspec.DecodeError as exc:
        return DecodeFailure("not_json", str(exc))
    except RecursionError:
        return DecodeFailure("not_json", "JSON nested too deep")
    except (ValueError, TypeError) as exc:  # raised by __post_init__ checks
        return DecodeFailure("invalid", f"{record_type.__name__}: {exc}")
    except Exception as exc:  # the last line of defence: a consumer must never stop here
        return DecodeFailure("invalid", f"{record_type.__name__}: unexpected {exc!r}"[:2000])
    if record.schema not in record_type.SCHEMAS_READ:
        return DecodeFailure(
            "schema_version",
            f"schema version {record.schema} not supported (reads {_reads(record_type)})",
        )
    return record


def _reads(record_type: type[Any]) -> str:
    return ", ".join(str(v) for v in getattr(record_type, "SCHEMAS_READ", (SCHEMA_VERSION,)))


def _explain_invalid(raw: bytes, record_type: type[Any],
                     exc: msgspec.ValidationError) -> DecodeFailure:
    """The reason for a typed decode that failed validation (the failure path only).

    msgspec stops at the first field that does not fit, without reading the rest: parse
    the whole input untyped to tell malformed or too-deep JSON (``not_json``) and another
    schema version (``schema_version``) from a wrong shape (``invalid``).
    """
    try:
        obj = msgspec.json.decode(raw)
    except RecursionError:
        return DecodeFailure("not_json", "JSON nested too deep")
    except msgspec.ValidationError:  # well-formed, but a number out of range
        return DecodeFailure("invalid", f"{record_type.__name__}: {exc}")
    except msgspec.DecodeError as inner:
        return DecodeFailure("not_json", str(inner))
    except Exception as inner:  # total by design
        return DecodeFailure("not_json", f"unreadable JSON: {inner!r}"[:2000])
    if isinstance(obj, dict):
        v = obj.get("schema")
        reads = getattr(record_type, "SCHEMAS_READ", (SCHEMA_VERSION,))
        if isinstance(v, int) and not isinstance(v, bool) and v not in reads:
            return DecodeFailure(
                "schema_version",
                f"schema version {str(v)[:40]} not supported (reads {_reads(record_type)})")
    return DecodeFailure("invalid", f"{record_type.__name__}: {exc}")


def json_schema(record_type: type[Event]) -> dict[str, Any]:
    """The JSON Schema of a record, for documentation and other-language consumers."""
    schema: dict[str, Any] = msgspec.json.schema(record_type)
    return schema
