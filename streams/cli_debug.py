"""``adloop produce`` / ``adloop consume``: debugging helpers on the typed topics.

``adloop produce TOPIC`` reads one JSON record per line from stdin, validates it
against the topic's schema and produces it (invalid lines are reported with their
line number and skipped; ``--raw`` sends them unvalidated, to exercise the DLQ).
``adloop consume TOPIC`` prints decoded records as JSON lines from the beginning; a
record that does not decode is reported on stderr (partition, offset, reason, detail) and
reading goes on. It dead-letters nothing: it is a read-only tool (the topic's own
consumer dead-letters the record, once), and running it twice must not change ``dlq``.
"""

from __future__ import annotations

import argparse
import sys

from streams.kafka_io import EventProducer, read_all
from streams.schemas import DecodeFailure, decode, encode
from streams.settings import KafkaSettings, add_settings_arguments, settings_from_args
from streams.topics import TOPICS


def configure_produce(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("topic", choices=sorted(TOPICS))
    parser.add_argument("--raw", action="store_true", help="send lines without validating")
    parser.add_argument("--key", default=None, help="key for --raw lines")
    add_settings_arguments(parser, KafkaSettings)


def run_produce(args: argparse.Namespace) -> int:
    kafka = settings_from_args(KafkaSettings, args)
    producer = EventProducer(kafka)
    sent = bad = 0
    try:
        for lineno, line in enumerate(sys.stdin.buffer, start=1):
            line = line.rstrip(b"\n")
            if not line:
                continue
            if args.raw:
                producer.send_bytes(args.topic, line, args.key.encode() if args.key else None)
                sent += 1
                continue
            rec = decode(line, TOPICS[args.topic].record)
            if isinstance(rec, DecodeFailure):
                bad += 1
                print(f"line {lineno}: {rec.reason}: {rec.detail}", file=sys.stderr)
                continue
            producer.send(args.topic, rec)
            sent += 1
        producer.flush()
    finally:
        producer.close()
    print(f"produced {sent} records to {args.topic}; {bad} invalid lines skipped")
    return 1 if bad and not sent else 0


def configure_consume(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("topic", choices=sorted(TOPICS))
    parser.add_argument("--timeout-s", type=float, default=10.0)
    add_settings_arguments(parser, KafkaSettings)


def run_consume(args: argparse.Namespace) -> int:
    kafka = settings_from_args(KafkaSettings, args)
    bad = 0

    def report(partition: int, offset: int, failure: DecodeFailure) -> None:
        nonlocal bad
        bad += 1
        print(f"{args.topic}[{partition}]@{offset}: {failure.reason}: {failure.detail[:300]}",
              file=sys.stderr)

    for rec in read_all(kafka, args.topic, timeout_s=args.timeout_s, on_failure=report):
        sys.stdout.write(encode(rec.record).decode() + "\n")
    if bad:
        print(f"{bad} undecodable records skipped", file=sys.stderr)
    return 0
