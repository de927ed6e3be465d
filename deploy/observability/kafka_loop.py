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

Logs its progress until it consumes (the group's joins and assignments, what it has
produced), then its first batch. ``kill -USR1`` writes every thread's stack to its log.
Stops cleanly on SIGTERM / SIGINT.
"""

from __future__ import annotations

import argparse
import faulthandler
import importlib.metadata
import logging
import signal
import threading
import time
from typing import Any

from streams.kafka_io import EventConsumer, EventProducer, Received, wait_for_partitions
from streams.logs import configure_logging, get_logger
from streams.metrics import BUILD_INFO, start_metrics_server
from streams.samples import sample_records
from streams.settings import KafkaSettings
from streams.topics import create_topics

TOPICS = ("impressions", "clicks", "conversions")
GROUP = "adloop-kafka-loop"
PROGRESS_EVERY_S = 10.0
TOPIC_WAIT_S = 60.0

log = get_logger(__name__)


def _version() -> str:
    try:
        return importlib.metadata.version("adloop")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def produce_loop(producer: EventProducer, stop: threading.Event, rate: float,
                 bad_every: int, counts: dict[str, int]) -> None:
    """Produce about ``rate`` records a second (in ticks of 0.1 s) until ``stop``;
    ``counts["flushed"]`` is the records acknowledged so far."""
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
        counts["flushed"] = sent
        tick += 1
        stop.wait(0.1)


def report_until_consuming(consumer: EventConsumer, counts: dict[str, int],
                           stop: threading.Event) -> None:
    """Log what the loop has done every ``PROGRESS_EVERY_S`` until it has consumed."""
    started = time.monotonic()
    while not stop.wait(PROGRESS_EVERY_S) and counts["consumed"] == 0:
        log.info("kafka_loop.waiting", seconds=round(time.monotonic() - started),
                 produced=counts["flushed"], assigned=len(consumer.consumer.assignment()))


def run(args: argparse.Namespace) -> int:
    configure_logging()
    logging.getLogger("kafka.coordinator").setLevel(logging.INFO)   # joins and assignments
    faulthandler.register(signal.SIGUSR1, all_threads=True)         # kill -USR1: the stacks
    stop = threading.Event()
    counts = {"flushed": 0, "consumed": 0}
    server = start_metrics_server(
        args.metrics_port, args.metrics_host,
        ready_check=lambda: (counts["consumed"] > 0, {"consumed": counts["consumed"]}))
    BUILD_INFO.labels(_version(), "kafka-loop").set(1)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    kafka = KafkaSettings(bootstrap_servers=args.bootstrap_servers,
                          topic_prefix=args.topic_prefix, client_id="adloop-kafka-loop")
    create_topics(kafka.bootstrap_servers, kafka.topic_prefix)
    producer = EventProducer(kafka)
    # join only once the consumer's own metadata has the new topics: a group leader
    # that assigns before then leaves every member without partitions until a rejoin.
    # Subscribed first, as the joiner does (streams.joiner.Joiner.wait_for_metadata):
    # metadata fetched before subscribing leaves the coordinator's snapshot empty
    consumer = EventConsumer(kafka, TOPICS, group_id=GROUP)
    missing = wait_for_partitions(consumer.consumer, [consumer.names.name(t) for t in TOPICS],
                                  TOPIC_WAIT_S)
    if missing:
        raise SystemExit(f"kafka-loop: no partitions of {missing} in the metadata "
                         f"after {TOPIC_WAIT_S:.0f}s")
    log.info("kafka_loop.started", topic_prefix=kafka.topic_prefix, group=GROUP)
    thread = threading.Thread(target=produce_loop, name="produce", daemon=True,
                              args=(producer, stop, args.rate, args.bad_every, counts))
    thread.start()
    threading.Thread(target=report_until_consuming, name="progress", daemon=True,
                     args=(consumer, counts, stop)).start()

    def handle(batch: list[Received[Any]]) -> None:
        if counts["consumed"] == 0:
            log.info("kafka_loop.consuming", records=len(batch), produced=counts["flushed"])
        counts["consumed"] += len(batch)
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
