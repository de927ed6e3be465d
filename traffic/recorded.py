"""The recorded-traffic log: JSONL (or Parquet) of ads, requests, impressions, clicks,
conversions and organic items and engagements, in event-time order.

One JSON object per line::

    {"type": "ad"|"request"|"impression"|"click"|"conversion"|"organic_item"
             |"organic_engagement", "t": <event time>, ...}

The other keys are the fields of the record: :class:`streams.schemas.Ad`,
``Impression``, ``Click``, ``Conversion``, ``OrganicItem``, ``OrganicEngagement``
(``schema`` and ``event_time`` may be left out: ``event_time`` defaults to ``t``, an
ad's or organic item's ``created_time`` too), or for a request the body of
``POST /v1/recommend`` (``request_id``, ``user_id``, ``context``, ``recent_ad_ids``,
``recent_organic``, ``k``, and ``organic_k`` for a mixed feed; logs written before
mixed feeds have neither organic kind nor ``organic_k`` and still load). Empty lines
and lines starting with ``#`` are ignored.

Parquet files hold the same records as rows with columns ``type`` (string), ``t``
(double) and ``fields`` (the remaining keys as a JSON object string).

:func:`convert_criteo_attribution` turns the Criteo Attribution Modeling for Bidding
dataset (TSV) into this format.
"""

from __future__ import annotations

import csv
import gzip
import heapq
import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

import msgspec

from streams.schemas import (
    Ad,
    Click,
    Conversion,
    Event,
    Impression,
    OrganicEngagement,
    OrganicItem,
    SlateItem,
    encode,
)
from traffic.world import Request

RecordKind = Literal["ad", "request", "impression", "click", "conversion", "organic_item",
                     "organic_engagement"]
RECORD_TYPES: dict[str, type[Event]] = {
    "ad": Ad, "impression": Impression, "click": Click, "conversion": Conversion,
    "organic_item": OrganicItem, "organic_engagement": OrganicEngagement,
}
TOPIC_OF: dict[str, str] = {
    "ad": "ads", "impression": "impressions", "click": "clicks", "conversion": "conversions",
    "organic_item": "organic-items", "organic_engagement": "organic-engagements",
}
KIND_OF_TOPIC: dict[str, str] = {v: k for k, v in TOPIC_OF.items()}


class RecordError(Exception):
    """A line that cannot be read; ``str()`` is ``line N: reason``."""

    def __init__(self, line: int, reason: str) -> None:
        super().__init__(f"line {line}: {reason}")
        self.line = line
        self.reason = reason


@dataclass(frozen=True)
class Recorded:
    """One entry of a recorded log."""

    line: int
    kind: str
    t: float
    record: Event | Request

    @property
    def topic(self) -> str | None:
        return TOPIC_OF.get(self.kind)


def _open_text(path: Path, mode: str) -> IO[str]:
    if path.suffix == ".gz":
        return gzip.open(path, mode + "t", encoding="utf-8")  # type: ignore[return-value]
    return path.open(mode, encoding="utf-8")


def parse_entry(obj: Any, line: int, seq: int = 0) -> Recorded:
    """Validate one decoded entry; raises :class:`RecordError`."""
    if not isinstance(obj, dict):
        raise RecordError(line, "not a JSON object")
    kind = obj.get("type")
    if kind != "request" and kind not in RECORD_TYPES:
        raise RecordError(line, f"unknown or missing type {kind!r}")
    t = obj.get("t")
    if isinstance(t, bool) or not isinstance(t, int | float):
        raise RecordError(line, "missing or non-numeric 't'")
    t = float(t)
    if not math.isfinite(t):
        raise RecordError(line, f"non-finite 't' ({t})")
    fields = {k: v for k, v in obj.items() if k not in ("type", "t")}
    if kind == "request":
        try:
            rid, uid = fields["request_id"], fields["user_id"]
            ctx = fields.get("context") or {}
            recent = fields.get("recent_ad_ids") or []
            organic = fields.get("recent_organic") or []
            k = fields.get("k", 5)
            organic_k = fields.get("organic_k", 0)
            if not (isinstance(rid, str) and rid and isinstance(uid, str)):
                raise TypeError("request_id and user_id must be strings")
            if not (isinstance(ctx, dict) and all(isinstance(v, str) for v in ctx.values())):
                raise TypeError("context must map strings to strings")
            if not (isinstance(recent, list) and all(isinstance(a, str) for a in recent)):
                raise TypeError("recent_ad_ids must be a list of strings")
            if not (isinstance(organic, list) and all(isinstance(a, str) for a in organic)):
                raise TypeError("recent_organic must be a list of strings")
            if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
                raise TypeError("k must be a positive integer")
            if isinstance(organic_k, bool) or not isinstance(organic_k, int) or organic_k < 0:
                raise TypeError("organic_k must be an integer >= 0")
        except KeyError as exc:
            raise RecordError(line, f"request: missing field {exc.args[0]!r}") from None
        except TypeError as exc:
            raise RecordError(line, f"request: {exc}") from None
        return Recorded(line, kind, t, Request(seq=seq, request_id=rid, user_id=uid,
                                               context=dict(ctx), recent_ad_ids=list(recent),
                                               k=k, event_time=t,
                                               recent_organic=list(organic),
                                               organic_k=organic_k))
    fields.setdefault("event_time", t)
    if kind in ("ad", "organic_item"):
        fields.setdefault("created_time", t)
    try:
        record = msgspec.convert(fields, RECORD_TYPES[kind])
    except msgspec.ValidationError as exc:
        raise RecordError(line, f"{kind}: {exc}") from None
    except (ValueError, TypeError) as exc:
        raise RecordError(line, f"{kind}: {exc}") from None
    return Recorded(line, kind, t, record)


def parse_line(raw: bytes | str, line: int, seq: int = 0) -> Recorded | None:
    """One JSONL line; ``None`` for blank and comment lines."""
    text = raw.strip()
    if not text or (text[:1] in ("#", b"#")):
        return None
    try:
        if isinstance(text, bytes) and not text.isascii():
            text.decode("utf-8")  # msgspec skips the UTF-8 check of some strings
        obj = msgspec.json.decode(text)
    except UnicodeDecodeError as exc:
        raise RecordError(line, f"not UTF-8 ({exc.reason} at byte {exc.start})") from None
    except RecursionError:
        raise RecordError(line, "not JSON (nested too deep)") from None
    except msgspec.DecodeError as exc:
        raise RecordError(line, f"not JSON ({exc})") from None
    return parse_entry(obj, line, seq)


def read_recorded(path: Path | str, on_error: str = "skip",
                  errors: list[RecordError] | None = None) -> Iterator[Recorded]:
    """Entries of a recorded log in file order.

    A bad line raises :class:`RecordError` with ``on_error="stop"``; with ``"skip"``
    it is appended to ``errors`` (when given) and reading goes on.
    """
    path = Path(path)
    if on_error not in ("skip", "stop"):
        raise ValueError("on_error must be 'skip' or 'stop'")
    seq = 0
    for lineno, entry in _iter_raw(path):
        try:
            rec = _parse(entry, lineno, seq)
        except RecordError as err:
            if on_error == "stop":
                raise
            if errors is not None:
                errors.append(err)
            continue
        if rec is None:
            continue
        if rec.kind == "request":
            seq += 1
        yield rec


def _parse(entry: Any, lineno: int, seq: int) -> Recorded | None:
    """:func:`parse_line` / :func:`parse_entry`; anything unexpected is a RecordError too
    (e.g. an integer too large for a float), so that one bad line never stops a replay."""
    try:
        return (parse_line(entry, lineno, seq) if isinstance(entry, str | bytes)
                else parse_entry(entry, lineno, seq))
    except RecordError:
        raise
    except Exception as exc:
        raise RecordError(lineno, f"unreadable: {exc!r}"[:500]) from None


def _iter_raw(path: Path) -> Iterator[tuple[int, Any]]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        for row_no, row in enumerate(table.to_pylist(), start=1):
            try:
                fields = json.loads(row.get("fields") or "{}")
            except (ValueError, RecursionError) as exc:
                yield row_no, {"type": None, "_error": str(exc)}
                continue
            if isinstance(fields, dict):
                fields.update({"type": row.get("type"), "t": row.get("t")})
            yield row_no, fields
        return
    if path.suffix == ".gz":
        with gzip.open(path, "rb") as gz:
            yield from enumerate(gz, start=1)
        return
    with path.open("rb") as fh:
        yield from enumerate(fh, start=1)


def entry_of(kind: str, t: float, record: Event | Request) -> dict[str, Any]:
    """The JSON object of one entry (``type`` and ``t`` first)."""
    if isinstance(record, Request):
        fields: dict[str, Any] = {k: v for k, v in record.body().items() if k != "event_time"}
    else:
        fields = msgspec.json.decode(encode(record))
    return {"type": kind, "t": t, **fields}


class RecordWriter:
    """Writes a recorded log (``.jsonl``, ``.jsonl.gz`` or ``.parquet``)."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.count = 0
        self._parquet = self.path.suffix == ".parquet"
        self._rows: list[dict[str, Any]] = []
        self._fh: IO[str] | None = None if self._parquet else _open_text(self.path, "w")

    def write(self, kind: str, t: float, record: Event | Request) -> None:
        entry = entry_of(kind, t, record)
        self.count += 1
        if self._parquet:
            self._rows.append({"type": kind, "t": t, "fields": json.dumps(
                {k: v for k, v in entry.items() if k not in ("type", "t")},
                separators=(",", ":"))})
            return
        assert self._fh is not None
        self._fh.write(json.dumps(entry, separators=(",", ":")) + "\n")

    def write_event(self, topic: str, record: Event) -> None:
        self.write(KIND_OF_TOPIC[topic], float(getattr(record, "event_time", 0.0)), record)

    def write_request(self, request: Request) -> None:
        self.write("request", request.event_time, request)

    def close(self) -> None:
        if self._parquet:
            import pyarrow as pa
            import pyarrow.parquet as pq

            table = pa.table({"type": [r["type"] for r in self._rows],
                              "t": pa.array([r["t"] for r in self._rows], pa.float64()),
                              "fields": [r["fields"] for r in self._rows]})
            pq.write_table(table, self.path)
            self._rows = []
        elif self._fh is not None:
            self._fh.close()
            self._fh = None

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_recorded(path: Path | str, entries: Iterable[tuple[str, float, Event | Request]]
                   ) -> int:
    with RecordWriter(path) as w:
        for kind, t, rec in entries:
            w.write(kind, t, rec)
        return w.count


# -- public dataset converter -----------------------------------------------------------

CRITEO_ATTRIBUTION_COLUMNS = (
    "timestamp", "uid", "campaign", "conversion", "conversion_timestamp", "conversion_id",
    "attribution", "click", "click_pos", "click_nb", "cost", "cpo",
    "time_since_last_click", "cat1", "cat2", "cat3", "cat4", "cat5", "cat6", "cat7",
    "cat8", "cat9",
)
"""Columns of ``criteo_attribution_dataset.tsv`` as its README documents them."""


def convert_criteo_attribution(src: Path | str, dst: Path | str,
                               start_time: float = 1_704_067_200.0,
                               limit: int | None = None) -> dict[str, int]:
    """Convert the Criteo attribution dataset (TSV, optionally gzipped) to a recorded log.

    Each row is one impression (a banner) of campaign ``campaign`` to user ``uid`` at
    ``timestamp`` seconds from the start of the log. The row becomes an ``impression``
    (a one-item slate of ad ``criteo-<campaign>``, bid type cpa); a ``click`` when
    ``click`` is 1; a ``conversion`` (value ``cpo``) at ``conversion_timestamp`` when
    the row is the last click before an attributed conversion (``attribution`` 1,
    ``click`` 1, ``click_pos == click_nb - 1``; one conversion per ``conversion_id``).
    Each campaign becomes an ``ad`` at its first appearance. ``cat1..cat9`` go to the
    context; ``hour`` is derived from the timestamp. The header row is used when present.
    """
    src, dst = Path(src), Path(dst)
    counts = {"rows": 0, "ad": 0, "impression": 0, "click": 0, "conversion": 0, "bad_rows": 0}
    seen_campaigns: set[str] = set()
    seen_conversions: set[str] = set()
    later: list[tuple[float, int, str, Event]] = []
    n = 0
    with _open_text(src, "r") as fh, RecordWriter(dst) as out:
        reader = csv.reader(fh, delimiter="\t")
        header: list[str] | None = None
        for row in reader:
            if header is None:
                if row and row[0] == "timestamp":
                    header = row
                    continue
                header = list(CRITEO_ATTRIBUTION_COLUMNS)
            if limit is not None and counts["rows"] >= limit:
                break
            counts["rows"] += 1
            rec = dict(zip(header, row, strict=False))
            try:
                ts = float(rec["timestamp"])
                uid, campaign = rec["uid"], rec["campaign"]
                clicked = rec.get("click", "0") == "1"
                attributed = rec.get("attribution", "0") == "1"
                conv_ts = float(rec.get("conversion_timestamp") or -1)
                conv_id = rec.get("conversion_id", "-1")
                cpo = float(rec.get("cpo") or 0.0)
            except (KeyError, ValueError):
                counts["bad_rows"] += 1
                continue
            t = start_time + ts
            while later and later[0][0] <= t:
                lt, _, kind, ev = heapq.heappop(later)
                out.write(kind, lt, ev)
                counts[kind] += 1
            ad_id = f"criteo-{campaign}"
            if campaign not in seen_campaigns:
                seen_campaigns.add(campaign)
                out.write("ad", t, Ad(
                    ad_id=ad_id, advertiser_id=f"criteo-adv-{campaign}", industry="retail",
                    bid_type="cpa", conversion_goal="purchase", bid=max(cpo, 0.0),
                    budget=1e9, title=f"Criteo retargeting campaign {campaign}",
                    description=f"Display banner of campaign {campaign} (Criteo attribution "
                                f"dataset); categories {rec.get('cat1', '')} "
                                f"{rec.get('cat2', '')} {rec.get('cat3', '')}.",
                    created_time=t, event_time=t))
                counts["ad"] += 1
            request_id = f"criteo-{counts['rows']:09d}"
            user_id = f"criteo-u{uid}"
            context = {"hour": str(int((t % 86400) // 3600))}
            context.update({f"cat{i}": rec[f"cat{i}"] for i in range(1, 10)
                            if rec.get(f"cat{i}")})
            out.write("impression", t, Impression(
                request_id=request_id, event_time=t, user_id=user_id, context=context,
                slate=[SlateItem(ad_id=ad_id, semantic_id=[], position=0, score=0.0,
                                 bid=max(cpo, 0.0), bid_type="cpa")],
                model_version="criteo-logged", server_id="criteo"))
            counts["impression"] += 1
            if clicked:
                # the dataset has no click time; the click is placed at the impression
                out.write("click", t, Click(event_id=f"{request_id}:click:{ad_id}",
                                            request_id=request_id, user_id=user_id,
                                            ad_id=ad_id, event_time=t))
                counts["click"] += 1
                try:
                    last_click = (int(rec.get("click_pos", ""))
                                  == int(rec.get("click_nb", "")) - 1)
                except ValueError:
                    last_click = True
                if (attributed and last_click and conv_ts >= 0
                        and conv_id not in seen_conversions):
                    seen_conversions.add(conv_id)
                    ct = start_time + max(conv_ts, ts)
                    n += 1
                    heapq.heappush(later, (ct, n, "conversion", Conversion(
                        event_id=f"criteo-conv-{conv_id}", request_id=request_id,
                        user_id=user_id, ad_id=ad_id, event_time=ct, value=max(cpo, 0.0))))
        while later:
            lt, _, kind, ev = heapq.heappop(later)
            out.write(kind, lt, ev)
            counts[kind] += 1
    return counts

