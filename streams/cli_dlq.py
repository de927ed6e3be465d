"""``adloop dlq list|show|redrive``: the operator's tools for dead letters.

``list`` groups the letters in ``dlq`` by source topic and reason (count, first and
last failure time, dlq offsets); ``--records`` prints one line per letter.
``show OFFSET`` prints one letter decoded: where it came from, why it failed, its key
and raw bytes (hex dump and text), and whether those bytes decode now with the source
topic's schema (after a fix they may).

``redrive`` sends selected letters' original bytes and key back to their source topic.
Each re-driven record carries its origin in the Kafka header ``adloop-origin``
(``<source topic>/<partition>/<offset>``). Before producing, the source topic is
scanned, from the time of the earliest selected failure on, for records with that
header: an origin already there is skipped, so re-driving twice produces a record once,
and two dead letters of one record (a consumer re-delivered after a crash dead-letters
again) produce it once. By default only letters whose bytes decode with the source
topic's schema are re-driven (the rest would only fail again); ``--force`` sends them
anyway.

Concurrent runs are safe: each source topic is re-driven in one Kafka transaction by a
producer whose ``transactional.id`` is fixed per source topic
(:func:`transactional_id`). The scan starts only after ``init_transactions``, which
fences every other producer with that id (its open transaction is aborted, its later
sends and commit fail) and waits for a commit already under way to finish. So the scan
(``read_committed``) sees every re-drive that can ever commit, except its own, and a
run whose scan is stale cannot commit: it is fenced, and retries from the start.
"""

from __future__ import annotations

import argparse
import base64
import json
import random
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import InvalidProducerEpochError, KafkaError, ProducerFencedError

from streams.kafka_io import producer_config, read_all
from streams.logs import get_logger
from streams.schemas import DeadLetter, DecodeFailure, decode
from streams.settings import KafkaSettings, add_settings_arguments, settings_from_args
from streams.topics import TOPICS, Topics

log = get_logger(__name__)

ORIGIN_HEADER = "adloop-origin"
"""Header on a re-driven record: ``<source topic>/<partition>/<offset>`` of the original."""
REDRIVE_ATTEMPTS = 8
"""Tries per source topic when a concurrent ``redrive`` of the same topic fences this one."""


class RedriveFencedError(RuntimeError):
    """Another ``redrive`` of the same source topic kept fencing this one."""


def transactional_id(physical_topic: str) -> str:
    """The one ``transactional.id`` every ``redrive`` uses for ``physical_topic``: two runs
    re-driving the same topic fence each other (the topic name carries the prefix)."""
    return f"adloop-dlq-redrive:{physical_topic}"


@dataclass(frozen=True)
class Letter:
    """One dead letter and where it sits in ``dlq``."""

    partition: int
    offset: int
    letter: DeadLetter

    @property
    def origin(self) -> str:
        return origin_of(self.letter)


def origin_of(letter: DeadLetter) -> str:
    """The origin header value of a dead letter's record."""
    return f"{letter.source_topic}/{letter.partition}/{letter.offset}"


def read_letters(kafka: KafkaSettings, timeout_s: float = 30.0) -> list[Letter]:
    """Every dead letter in ``dlq``, oldest first."""
    return [Letter(r.partition, r.offset, r.record)
            for r in read_all(kafka, "dlq", timeout_s=timeout_s)]


def logical_source(kafka: KafkaSettings, letter: DeadLetter) -> str:
    return Topics(kafka.topic_prefix).logical(letter.source_topic)


def decodes_now(kafka: KafkaSettings, letter: DeadLetter) -> DecodeFailure | None:
    """``None`` if the letter's bytes decode with its source topic's schema now."""
    logical = logical_source(kafka, letter)
    spec = TOPICS.get(logical)
    if spec is None:
        return DecodeFailure("invalid", f"unknown source topic {letter.source_topic!r}")
    result = decode(letter.raw(), spec.record)
    return result if isinstance(result, DecodeFailure) else None


# -- list ------------------------------------------------------------------------------
@dataclass
class Group:
    """The letters of one (source topic, reason)."""

    source_topic: str
    reason: str
    offsets: list[int] = field(default_factory=list)
    first_failed: float = float("inf")
    last_failed: float = float("-inf")

    @property
    def count(self) -> int:
        return len(self.offsets)


def group_letters(kafka: KafkaSettings, letters: Iterable[Letter]) -> list[Group]:
    """Letters grouped by logical source topic and reason, largest group first."""
    groups: dict[tuple[str, str], Group] = {}
    for item in letters:
        src = logical_source(kafka, item.letter)
        g = groups.setdefault((src, item.letter.reason), Group(src, item.letter.reason))
        g.offsets.append(item.offset)
        g.first_failed = min(g.first_failed, item.letter.failed_time)
        g.last_failed = max(g.last_failed, item.letter.failed_time)
    return sorted(groups.values(), key=lambda g: (-g.count, g.source_topic, g.reason))


def _utc(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t))


def _offsets_text(offsets: Sequence[int], limit: int = 8) -> str:
    shown = ",".join(str(o) for o in offsets[:limit])
    return shown + (f",... (+{len(offsets) - limit})" if len(offsets) > limit else "")


def select(kafka: KafkaSettings, letters: Iterable[Letter], *,
           topic: str | None = None, reason: str | None = None,
           offsets: Sequence[int] | None = None) -> list[Letter]:
    """The letters matching every given filter (logical source topic, reason, dlq offsets)."""
    wanted = set(offsets) if offsets else None
    return [item for item in letters
            if (topic is None or logical_source(kafka, item.letter) == topic)
            and (reason is None or item.letter.reason == reason)
            and (wanted is None or item.offset in wanted)]


# -- redrive ---------------------------------------------------------------------------
@dataclass
class RedriveResult:
    sent: list[Letter] = field(default_factory=list)
    already: list[Letter] = field(default_factory=list)
    """Skipped: a record with this origin is already in the source topic (or earlier in
    this selection)."""
    undecodable: list[tuple[Letter, DecodeFailure]] = field(default_factory=list)
    """Skipped: the bytes still do not decode (``force`` sends them)."""


def redriven_origins(kafka: KafkaSettings, physical_topic: str, since_s: float,
                     timeout_s: float = 60.0) -> set[str]:
    """Origin headers of the records in ``physical_topic`` written at or after ``since_s``."""
    consumer = KafkaConsumer(**kafka.client_config(), client_id=f"{kafka.client_id}-dlq",
                             enable_auto_commit=False, isolation_level="read_committed")
    try:
        parts = consumer.partitions_for_topic(physical_topic) or set()
        tps = [TopicPartition(physical_topic, p) for p in sorted(parts)]
        if not tps:
            return set()
        consumer.assign(tps)
        ends = consumer.end_offsets(tps)
        starts = consumer.offsets_for_times({tp: int(since_s * 1000) for tp in tps})
        pending = []
        for tp in tps:
            found = starts.get(tp)
            if found is None:  # nothing written since then
                continue
            consumer.seek(tp, found.offset)
            pending.append(tp)
        origins: set[str] = set()
        deadline = time.monotonic() + timeout_s
        while pending:
            if time.monotonic() > deadline:
                raise TimeoutError(f"scanning {physical_topic} for redriven records")
            for _tp, msgs in consumer.poll(timeout_ms=200).items():
                for m in msgs:
                    for name, value in m.headers or ():
                        if name == ORIGIN_HEADER and value is not None:
                            origins.add(value.decode("utf-8", "replace"))
            pending = [tp for tp in pending if consumer.position(tp) < ends[tp]]
        return origins
    finally:
        consumer.close(autocommit=False)


def redrive(kafka: KafkaSettings, letters: Sequence[Letter], *, force: bool = False,
            dry_run: bool = False) -> RedriveResult:
    """Send ``letters`` back to their source topics, each origin at most once, even with
    other ``redrive`` runs at the same time (see the module docstring)."""
    result = RedriveResult()
    by_topic: dict[str, list[Letter]] = {}
    for item in letters:
        failure = decodes_now(kafka, item.letter)
        if failure is not None and not force:
            result.undecodable.append((item, failure))
        else:
            by_topic.setdefault(item.letter.source_topic, []).append(item)
    for physical, items in by_topic.items():
        if dry_run:
            sent, already = _split(items, _scan(kafka, physical, items))
        else:
            sent, already = _redrive_topic(kafka, physical, items)
        result.sent += sent
        result.already += already
    log.info("dlq.redrive", sent=len(result.sent), already=len(result.already),
             undecodable=len(result.undecodable), dry_run=dry_run)
    return result


def _scan(kafka: KafkaSettings, physical: str, items: Sequence[Letter]) -> set[str]:
    # a re-driven record is written after its letter, so scan from the first failure
    since = min(i.letter.failed_time for i in items) - 1.0
    return redriven_origins(kafka, physical, since)


def _split(items: Sequence[Letter], present: set[str]) -> tuple[list[Letter], list[Letter]]:
    """(to send, already there): each origin not in ``present`` once, in order."""
    seen = set(present)
    sent: list[Letter] = []
    already: list[Letter] = []
    for item in items:
        if item.origin in seen:
            already.append(item)
        else:
            seen.add(item.origin)
            sent.append(item)
    return sent, already


def _redrive_topic(kafka: KafkaSettings, physical: str,
                   items: Sequence[Letter]) -> tuple[list[Letter], list[Letter]]:
    """One source topic in one transaction, in this order:

    1. ``init_transactions`` with the topic's fixed transactional id: every other
       producer with that id is fenced (its open transaction aborted) and a commit under
       way has finished;
    2. scan the topic (``read_committed``) for origins already re-driven: every
       transaction that can still commit is this one, so the scan is complete;
    3. send the missing origins and commit. ``ProducerFencedError`` here means another
       run initialised after step 1 and may have sent the same origins: nothing of this
       transaction is visible; start again at step 1 (after a short random pause, so two
       runs do not keep fencing each other), at most ``REDRIVE_ATTEMPTS`` times.
    """
    for attempt in range(1, REDRIVE_ATTEMPTS + 1):
        producer = KafkaProducer(**producer_config(
            kafka, client_id=f"{kafka.client_id}-dlq", transactional_id=transactional_id(physical),
            transaction_timeout_ms=120_000))
        try:
            producer.init_transactions()
            sent, already = _split(items, _scan(kafka, physical, items))
            if sent:
                producer.begin_transaction()
                for item in sent:
                    key = (base64.b64decode(item.letter.key_b64)
                           if item.letter.key_b64 is not None else None)
                    producer.send(physical, value=item.letter.raw(), key=key,
                                  headers=[(ORIGIN_HEADER, item.origin.encode())])
                producer.commit_transaction()
            return sent, already
        except KafkaError as exc:
            if not _fenced(exc):
                raise
            log.warning("dlq.redrive_fenced", topic=physical, attempt=attempt,
                        error=str(exc)[:200])
            time.sleep(random.uniform(0.05, 0.25) * attempt)
        finally:
            producer.close(timeout=5)
    raise RedriveFencedError(f"another redrive of {physical} fenced this one "
                             f"{REDRIVE_ATTEMPTS} times; run it again")


def _fenced(exc: BaseException) -> bool:
    """Whether ``exc`` says another producer with our transactional id took over (raised
    as is, or as the cause a later send reports)."""
    fencing = (ProducerFencedError, InvalidProducerEpochError)
    return isinstance(exc, fencing) or any(isinstance(a, fencing) for a in exc.args)


# -- show ------------------------------------------------------------------------------
def hexdump(data: bytes, width: int = 16) -> str:
    lines = []
    for i in range(0, len(data), width):
        chunk = data[i:i + width]
        text = "".join(chr(b) if 32 <= b < 127 else "." for b in chunk)
        lines.append(f"{i:08x}  {chunk.hex(' '):<{width * 3}} |{text}|")
    return "\n".join(lines)


def describe(kafka: KafkaSettings, item: Letter, max_bytes: int = 4096) -> str:
    """One letter, for a human: fields, key, raw bytes, and whether they decode now."""
    d = item.letter
    raw = d.raw()
    failure = decodes_now(kafka, d)
    record = TOPICS.get(logical_source(kafka, d))
    now = ("yes, as " + record.record.__name__ if failure is None and record is not None
           else f"no ({failure.reason}: {failure.detail})" if failure is not None else "no")
    key = base64.b64decode(d.key_b64) if d.key_b64 is not None else None
    out = [
        f"dlq offset     {item.partition}:{item.offset}",
        f"source         {d.source_topic} partition {d.partition} offset {d.offset}",
        f"reason         {d.reason}",
        f"detail         {d.detail}",
        f"failed at      {_utc(d.failed_time)} UTC",
        f"key            {key!r}",
        f"raw bytes      {len(raw)}",
        f"decodes now    {now}",
    ]
    try:
        parsed = json.loads(raw)
        out += ["json", json.dumps(parsed, indent=2, sort_keys=True)[:max_bytes]]
    except ValueError:
        pass
    out += ["hex", hexdump(raw[:max_bytes])]
    if len(raw) > max_bytes:
        out.append(f"... {len(raw) - max_bytes} more bytes")
    return "\n".join(out)


# -- command line ------------------------------------------------------------------------
def _add_filters(p: argparse.ArgumentParser) -> None:
    p.add_argument("--topic", default=None, help="logical source topic (e.g. clicks)")
    p.add_argument("--reason", default=None, help="dead-letter reason (e.g. orphan)")


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION")
    sub.required = True
    p_list = sub.add_parser("list", help="dead letters grouped by source topic and reason")
    _add_filters(p_list)
    p_list.add_argument("--records", action="store_true", help="one line per dead letter")
    p_show = sub.add_parser("show", help="one dead letter, decoded, with its raw bytes")
    p_show.add_argument("offset", type=int, help="its offset in dlq (from `list --records`)")
    p_show.add_argument("--max-bytes", type=int, default=4096)
    p_re = sub.add_parser("redrive", help="send selected dead letters back to their source "
                                          "topic (idempotent, safe to run concurrently)")
    _add_filters(p_re)
    p_re.add_argument("--offsets", default=None,
                      help="comma-separated dlq offsets (from `list --records`)")
    p_re.add_argument("--all", action="store_true", help="every letter matching the filters")
    p_re.add_argument("--force", action="store_true",
                      help="also send letters whose bytes still do not decode")
    p_re.add_argument("--dry-run", action="store_true", help="say what would be sent")
    for p in (p_list, p_show, p_re):
        p.add_argument("--timeout-s", type=float, default=30.0)
        add_settings_arguments(p, KafkaSettings)


def run(args: argparse.Namespace) -> int:
    kafka = settings_from_args(KafkaSettings, args)
    letters = read_letters(kafka, args.timeout_s)
    if args.action == "list":
        chosen = select(kafka, letters, topic=args.topic, reason=args.reason)
        if args.records:
            for item in chosen:
                d = item.letter
                print(f"{item.offset:>8} {logical_source(kafka, d):14s} {d.reason:15s} "
                      f"{d.partition}:{d.offset:<10} {_utc(d.failed_time)}  {d.detail[:80]}")
            return 0
        print(f"{'source topic':14s} {'reason':15s} {'count':>7}  {'first failed (UTC)':19s}  "
              f"{'last failed (UTC)':19s}  dlq offsets")
        for g in group_letters(kafka, chosen):
            print(f"{g.source_topic:14s} {g.reason:15s} {g.count:>7}  {_utc(g.first_failed)}  "
                  f"{_utc(g.last_failed)}  {_offsets_text(g.offsets)}")
        print(f"{len(chosen)} dead letters")
        return 0
    if args.action == "show":
        found = [item for item in letters if item.offset == args.offset]
        if not found:
            print(f"no dead letter at dlq offset {args.offset}", file=sys.stderr)
            return 1
        for item in found:
            print(describe(kafka, item, args.max_bytes))
        return 0
    offsets = [int(o) for o in args.offsets.split(",") if o.strip()] if args.offsets else None
    if offsets is None and not args.all and args.topic is None and args.reason is None:
        print("choose letters: --offsets, --topic, --reason or --all", file=sys.stderr)
        return 2
    chosen = select(kafka, letters, topic=args.topic, reason=args.reason, offsets=offsets)
    try:
        result = redrive(kafka, chosen, force=args.force, dry_run=args.dry_run)
    except RedriveFencedError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    verb = "would re-drive" if args.dry_run else "re-drove"
    print(f"{verb} {len(result.sent)}; already re-driven {len(result.already)}; "
          f"still undecodable {len(result.undecodable)} (--force sends them)")
    for item in result.sent:
        print(f"  {'->' if not args.dry_run else '..'} {item.origin} (dlq offset {item.offset})")
    for item, failure in result.undecodable:
        print(f"  !! {item.origin} (dlq offset {item.offset}): {failure.reason}: "
              f"{failure.detail[:120]}")
    return 0
