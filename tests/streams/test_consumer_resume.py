"""A consumer stopped mid-stream resumes from its committed offsets: no gaps, no duplicates."""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any

from streams.kafka_io import EventConsumer, EventProducer, Received
from streams.schemas import Click
from streams.settings import KafkaSettings


def _produce_clicks(kafka: KafkaSettings, start: int, n: int) -> None:
    producer = EventProducer(kafka)
    for i in range(start, start + n):
        producer.send("clicks", Click(event_id=f"e{i}", request_id=f"r{i}", user_id=f"u{i % 17}",
                                      ad_id="a", event_time=float(i)))
    producer.flush()
    producer.close()


def _consume(kafka: KafkaSettings, seen: Counter[str], until: int, max_records: int) -> None:
    consumer = EventConsumer(kafka, ["clicks"], group_id="resume-group", max_poll_records=50)
    stop = threading.Event()

    def handle(batch: list[Received[Any]]) -> None:
        for rec in batch:
            seen[rec.record.event_id] += 1
        if sum(seen.values()) >= until:
            stop.set()

    try:
        consumer.run(handle, stop, poll_timeout_ms=200, max_records=max_records)
    finally:
        consumer.close()


def test_consumer_group_resumes_without_gaps_or_duplicates(kafka: KafkaSettings) -> None:
    _produce_clicks(kafka, 0, 600)
    seen: Counter[str] = Counter()
    # First run stops part-way (after ~200 records, on a batch boundary) ...
    _consume(kafka, seen, until=200, max_records=50)
    first = sum(seen.values())
    assert 200 <= first < 600
    # ... more traffic arrives while it is down ...
    _produce_clicks(kafka, 600, 400)
    # ... and the restarted consumer in the same group reads exactly the rest.
    _consume(kafka, seen, until=1000, max_records=50)
    assert set(seen) == {f"e{i}" for i in range(1000)}
    assert max(seen.values()) == 1, [k for k, v in seen.items() if v > 1][:5]
