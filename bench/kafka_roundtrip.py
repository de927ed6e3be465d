"""Produce and consume throughput of adloop's Kafka helpers vs raw kafka-python.

Both run in one process against the same embedded broker, on their own topics, with
the same record bytes, so the ratios compare like with like. The helpers add typed
encoding, keys, ``acks=all`` + idempotence (producer) and schema decoding with
dead-letter routing (consumer); raw kafka-python sends pre-encoded bytes with the
same acks/idempotence settings and consumes without decoding.

    python bench/kafka_roundtrip.py [--quick] [--bootstrap-servers HOST:PORT]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kafka import KafkaConsumer, KafkaProducer

from bench.common import device, markdown_table, update_doc_section, write_results
from streams.broker import BrokerSettings, EmbeddedBroker
from streams.kafka_io import EventConsumer, EventProducer, Received, producer_config
from streams.schemas import Click, encode
from streams.settings import KafkaSettings
from streams.topics import Topics, create_topics

DEPENDS = ("streams/__init__.py", "streams/broker.py", "streams/kafka_io.py", "streams/logs.py",
           "streams/metrics.py", "streams/schemas.py", "streams/settings.py", "streams/topics.py",
           "deploy/kafka/", "bench/kafka_roundtrip.py")


def _clicks(n: int) -> list[Click]:
    return [Click(event_id=f"e{i}", request_id=f"r{i}", user_id=f"u{i % 997}", ad_id=f"a{i % 50}",
                  event_time=1_790_000_000.0 + i) for i in range(n)]


def bench_helpers(kafka: KafkaSettings, records: list[Click]) -> tuple[float, float]:
    producer = EventProducer(kafka)
    t0 = time.perf_counter()
    for rec in records:
        producer.send("clicks", rec)
    producer.flush()
    produce_s = time.perf_counter() - t0
    producer.close()

    consumer = EventConsumer(kafka, ["clicks"], group_id="bench-helpers")
    got = 0
    stop = threading.Event()

    def handle(batch: list[Received[Any]]) -> None:
        nonlocal got
        got += len(batch)
        if got >= len(records):
            stop.set()

    # Warm-up poll so group join is not timed.
    consumer.consumer.poll(timeout_ms=0)
    t0 = time.perf_counter()
    consumer.run(handle, stop, poll_timeout_ms=200)
    consume_s = time.perf_counter() - t0
    consumer.close()
    return len(records) / produce_s, len(records) / consume_s


def bench_raw(kafka: KafkaSettings, records: list[Click]) -> tuple[float, float]:
    topic = Topics(kafka.topic_prefix).clicks
    payloads = [(rec.user_id.encode(), encode(rec)) for rec in records]
    cfg = producer_config(kafka)
    producer = KafkaProducer(**cfg)
    t0 = time.perf_counter()
    for key, value in payloads:
        producer.send(topic, key=key, value=value)
    producer.flush()
    produce_s = time.perf_counter() - t0
    producer.close()

    consumer = KafkaConsumer(topic, bootstrap_servers=kafka.bootstrap_servers,
                             group_id="bench-raw", enable_auto_commit=False,
                             auto_offset_reset="earliest", max_poll_records=1000,
                             fetch_max_wait_ms=100)
    consumer.poll(timeout_ms=0)
    got = 0
    t0 = time.perf_counter()
    while got < len(records):
        for msgs in consumer.poll(timeout_ms=200).values():
            got += len(msgs)
        consumer.commit()
    consume_s = time.perf_counter() - t0
    consumer.close()
    return len(records) / produce_s, len(records) / consume_s


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer records (a minute on 2 cores)")
    ap.add_argument("--records", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--bootstrap-servers", default=None)
    args = ap.parse_args()
    n = args.records or (30_000 if args.quick else 200_000)
    rounds = args.rounds or (2 if args.quick else 3)

    with tempfile.TemporaryDirectory(prefix="adloop-bench-") as tmp:
        broker = None
        if args.bootstrap_servers:
            bootstrap = args.bootstrap_servers
        else:
            broker = EmbeddedBroker(BrokerSettings(port=0, data_dir=Path(tmp), heap="1g"))
            broker.start()
            bootstrap = broker.bootstrap_servers
        try:
            records = _clicks(n)
            best: dict[str, float] = {}
            for r in range(rounds):  # interleave so drift hits both sides alike
                for name, fn in (("helpers", bench_helpers), ("raw", bench_raw)):
                    kafka = KafkaSettings(bootstrap_servers=bootstrap,
                                          topic_prefix=f"bench-{name}-{r}-{time.time_ns()}.")
                    create_topics(bootstrap, kafka.topic_prefix)
                    p, c = fn(kafka, records)
                    print(f"round {r} {name:8s} produce {p:10,.0f} msg/s  consume {c:10,.0f} msg/s")
                    best[f"{name}_produce"] = max(best.get(f"{name}_produce", 0), p)
                    best[f"{name}_consume"] = max(best.get(f"{name}_consume", 0), c)
            version = broker.version if broker else "external"
        finally:
            if broker:
                broker.stop()

    results = {
        "device": device(),
        "quick": args.quick,
        "records": n,
        "rounds": rounds,
        "kafka_version": version,
        "produce_msgs_per_s": round(best["helpers_produce"]),
        "consume_msgs_per_s": round(best["helpers_consume"]),
        "raw_produce_msgs_per_s": round(best["raw_produce"]),
        "raw_consume_msgs_per_s": round(best["raw_consume"]),
        "produce_ratio": round(best["helpers_produce"] / best["raw_produce"], 3),
        "consume_ratio": round(best["helpers_consume"] / best["raw_consume"], 3),
    }
    path = write_results("kafka_roundtrip", results, DEPENDS)
    table = markdown_table(
        ["path", "produce msg/s", "consume msg/s"],
        [["adloop helpers (typed, acks=all, idempotent; decode + DLQ)",
          results["produce_msgs_per_s"], results["consume_msgs_per_s"]],
         ["raw kafka-python (same acks, pre-encoded bytes, no decode)",
          results["raw_produce_msgs_per_s"], results["raw_consume_msgs_per_s"]],
         ["helpers / raw", results["produce_ratio"], results["consume_ratio"]]])
    update_doc_section("kafka_roundtrip", (
        f"`bench/kafka_roundtrip.py{' --quick' if args.quick else ''}`: {n:,} click records, "
        f"best of {rounds} interleaved rounds, Apache Kafka {version} embedded on loopback, "
        f"{results['device']}.\n\n{table}"))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
