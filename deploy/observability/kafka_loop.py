"""A small real Kafka workload that serves the shared Kafka metrics on ``/metrics``.

It produces sample impressions, clicks and conversions (plus one malformed click
every ``--bad-every`` records, which the consumer dead-letters) and consumes them
with :class:`streams.kafka_io.EventConsumer` in its own group, so every metric of
``streams.kafka_io`` (produced, consumed, dead letters, consumer lag) and
``adloop_build_info`` has live series. It exists to check the Prometheus wiring
(scrape config, rules, dashboard queries) against a real process before, or
without, the full loop::

    python -m deploy.observability.kafka_loop --bootstrap-servers 127.0.0.1:9092 \\
        --metrics-port 9310

Stops cleanly on SIGTERM / SIGINT.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import signal
import threading
import time
from typing import Any

from streams.kafka_io import EventConsumer, EventProducer, Received
from streams.metrics import BUILD_INFO, start_metrics_server
from streams.samples import sample_records
from streams.settings import KafkaSettings
from streams.topics import create_topics

TOPICS = ("impressions", "clicks", "conversions")
GROUP = "adloop-kafka-loop"


def _version() -> str:
    try:
        return importlib.metadata.version("adloop")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def produce_loop(producer: EventProducer, stop: threading.Event, rate: float,
                 bad_every: int) -> None:
    """Produce about ``rate`` records a second (in ticks of 0.1 s) until ``stop``."""
    tick = 0
    sent = 0
    per_tick = max(1, round(rate / 10 / len(TOPICS)))
    while not stop.is_set():
        records = sample_records(per_tick, user=f"u{tick % 64}")
        for topic in TOPICS:
            for rec in records[topic]:
                producer.send(topic, rec)
                sent += 1
                if bad_every and sent % bad_every == 0:
                    producer.send_bytes("clicks", b"this is not json", b"kafka-loop")
        producer.flush(10)
        tick += 1
        stop.wait(0.1)


def run(args: argparse.Namespace) -> int:
    stop = threading.Event()
    consumed = {"n": 0}
    server = start_metrics_server(
        args.metrics_port, args.metrics_host,
        ready_check=lambda: (consumed["n"] > 0, {"consumed": consumed["n"]}))
    BUILD_INFO.labels(_version(), "kafka-loop").set(1)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    kafka = KafkaSettings(bootstrap_servers=args.bootstrap_servers,
                          topic_prefix=args.topic_prefix, client_id="adloop-kafka-loop")
    create_topics(kafka.bootstrap_servers, kafka.topic_prefix)
    producer = EventProducer(kafka)
    consumer = EventConsumer(kafka, TOPICS, group_id=GROUP)
    thread = threading.Thread(target=produce_loop, name="produce",
                              args=(producer, stop, args.rate, args.bad_every), daemon=True)
    thread.start()

    def handle(batch: list[Received[Any]]) -> None:
        consumed["n"] += len(batch)
        if args.consume_delay_s:
            time.sleep(args.consume_delay_s)

    try:
        consumer.run(handle, stop, poll_timeout_ms=200, max_records=args.max_records)
    finally:
        stop.set()
        thread.join(15)
        consumer.close()
        producer.close()
        server.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bootstrap-servers", required=True)
    parser.add_argument("--topic-prefix", default="")
    parser.add_argument("--metrics-port", type=int, default=9310)
    parser.add_argument("--metrics-host", default="127.0.0.1")
    parser.add_argument("--rate", type=float, default=300.0, help="records produced per second")
    parser.add_argument("--bad-every", type=int, default=50,
                        help="one malformed click after every N good records (0: none)")
    parser.add_argument("--max-records", type=int, default=200,
                        help="records per poll (small, so that some lag shows)")
    parser.add_argument("--consume-delay-s", type=float, default=0.0,
                        help="sleep per consumed batch, to build consumer lag")
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
