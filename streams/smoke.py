"""``adloop smoke``: start the embedded broker, create topics, round-trip every event type.

Also sends one malformed record per input topic and shows it arriving in ``dlq``.
Prints what happened and exits 0 when every record came back as sent.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from streams.broker import BrokerSettings, EmbeddedBroker
from streams.kafka_io import EventConsumer, EventProducer, Received, read_all
from streams.samples import sample_records
from streams.schemas import encode
from streams.settings import KafkaSettings
from streams.topics import create_topics


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--records", type=int, default=100, help="records per topic")
    parser.add_argument("--bootstrap-servers", default=None,
                        help="use this broker instead of starting an embedded one")


def run(args: argparse.Namespace) -> int:
    if args.bootstrap_servers:
        return _round_trip(KafkaSettings(bootstrap_servers=args.bootstrap_servers,
                                         topic_prefix=f"smoke-{int(time.time())}."), args.records)
    with tempfile.TemporaryDirectory(prefix="adloop-smoke-") as tmp:
        broker = EmbeddedBroker(BrokerSettings(port=0, data_dir=Path(tmp)))
        with broker:
            print(f"Apache Kafka {broker.version} up on {broker.bootstrap_servers}")
            return _round_trip(KafkaSettings(bootstrap_servers=broker.bootstrap_servers),
                               args.records)


def _round_trip(kafka: KafkaSettings, n: int) -> int:
    t0 = time.monotonic()
    created = create_topics(kafka.bootstrap_servers, kafka.topic_prefix)
    print(f"topics: {', '.join(f'{k} ({v})' for k, v in created.items())}")
    records = sample_records(n)
    producer = EventProducer(kafka)
    for topic, recs in records.items():
        for rec in recs:
            producer.send(topic, rec)
    bad_inputs = ["impressions", "clicks", "conversions", "ads"]
    for topic in bad_inputs:
        producer.send_bytes(topic, b"this is not json", b"smoke")
    producer.flush()
    print(f"produced {sum(len(r) for r in records.values())} records "
          f"+ {len(bad_inputs)} malformed in {time.monotonic() - t0:.2f}s")

    # Consume the input topics through the decoding consumer: bad records go to dlq.
    consumer = EventConsumer(kafka, bad_inputs, group_id="adloop-smoke")
    got: dict[str, int] = {t: 0 for t in bad_inputs}
    stop = threading.Event()
    deadline = time.monotonic() + 60

    def handle(batch: list[Received[Any]]) -> None:
        for rec in batch:
            got[rec.topic] += 1
        if all(got[t] >= n for t in bad_inputs) and consumer.dead_lettered >= len(bad_inputs):
            stop.set()
        if time.monotonic() > deadline:
            stop.set()

    consumer.run(handle, stop, poll_timeout_ms=200)
    consumer.close()

    ok = True
    print(f"{'topic':16s} {'sent':>6s} {'read back':>10s}  identical")
    for topic, recs in records.items():
        back = read_all(kafka, topic, expect=len(recs))
        same = sorted(encode(r.record) for r in back) == sorted(encode(r) for r in recs)
        extra = ""
        if topic == "dlq":
            same = len(back) == len(recs) + len(bad_inputs)
            extra = f" (+{len(bad_inputs)} dead letters from malformed input)"
        ok &= same
        print(f"{topic:16s} {len(recs):6d} {len(back):10d}  {'yes' if same else 'NO'}{extra}")
    print(f"decoding consumer read {sum(got.values())} good records, "
          f"dead-lettered {consumer.dead_lettered}; total {time.monotonic() - t0:.2f}s")
    print("smoke: OK" if ok else "smoke: FAILED")
    return 0 if ok else 1
