"""Bad input never stops a consumer: it lands in dlq with a reason naming the problem."""

from __future__ import annotations

import threading
from typing import Any

import msgspec
from prometheus_client import REGISTRY

from streams.kafka_io import EventConsumer, EventProducer, Received, read_all
from streams.schemas import Click, DeadLetter, encode
from streams.settings import KafkaSettings


def _dead_letter_count(topic: str, reason: str) -> float:
    value = REGISTRY.get_sample_value("adloop_dead_letters_total",
                                      {"topic": topic, "reason": reason})
    return value or 0.0


def test_malformed_records_go_to_dlq_with_reason_and_the_next_good_record_is_processed(
        kafka: KafkaSettings) -> None:
    good = [Click(event_id=f"ok{i}", request_id="r", user_id="u", ad_id="a", event_time=1.0)
            for i in range(3)]
    missing_field = msgspec.json.encode({"schema": 1, "event_id": "x", "request_id": "r",
                                         "user_id": "u", "event_time": 1.0})  # no ad_id
    wrong_version = msgspec.json.encode({**msgspec.to_builtins(good[0]), "schema": 99})
    oversized = encode(Click(event_id="big", request_id="r" * 300_000, user_id="u",
                             ad_id="a", event_time=1.0))
    bad = {
        "not_json": b"\x00\xffnot json at all",
        "invalid": missing_field,
        "schema_version": wrong_version,
        "oversized": oversized,
    }
    before = {reason: _dead_letter_count("clicks", reason) for reason in bad}

    producer = EventProducer(kafka)
    # Same key, so order within the partition is: good, bad..., good, good.
    producer.send("clicks", good[0])
    for raw in bad.values():
        producer.send_bytes("clicks", raw, b"u")
    producer.send("clicks", good[1])
    producer.send("clicks", good[2])
    producer.flush()
    producer.close()

    consumer = EventConsumer(kafka, ["clicks"], group_id="dlq-test")
    got: list[str] = []
    stop = threading.Event()

    def handle(batch: list[Received[Any]]) -> None:
        got.extend(r.record.event_id for r in batch)
        if len(got) >= 3:
            stop.set()

    consumer.run(handle, stop, poll_timeout_ms=200)
    consumer.close()
    assert got == ["ok0", "ok1", "ok2"]

    letters = [r.record for r in read_all(kafka, "dlq", expect=len(bad))]
    assert len(letters) == len(bad)
    by_reason: dict[str, DeadLetter] = {d.reason: d for d in letters}
    assert set(by_reason) == set(bad)
    for reason, raw in bad.items():
        letter = by_reason[reason]
        assert letter.raw() == raw, reason  # nothing lost: the exact bytes are kept
        assert letter.source_topic == kafka.topic_prefix + "clicks"
        assert letter.partition >= 0 and letter.offset >= 1
        assert _dead_letter_count("clicks", reason) == before[reason] + 1
    assert "ad_id" in by_reason["invalid"].detail
    assert "99" in by_reason["schema_version"].detail
    assert "limit" in by_reason["oversized"].detail


def test_handler_errors_are_dead_lettered_and_the_loop_goes_on(kafka: KafkaSettings) -> None:
    producer = EventProducer(kafka)
    for i in range(4):
        producer.send("clicks", Click(event_id=f"e{i}", request_id="r", user_id="u",
                                      ad_id="boom" if i == 1 else "a", event_time=1.0))
    producer.flush()
    producer.close()
    consumer = EventConsumer(kafka, ["clicks"], group_id="handler-error")
    handled: list[str] = []
    stop = threading.Event()

    def handle(rec: Received[Any]) -> None:
        if rec.record.ad_id == "boom":
            raise ValueError("cannot attribute ad boom")
        handled.append(rec.record.event_id)
        if len(handled) == 3:
            stop.set()

    consumer.run_per_record(handle, stop, poll_timeout_ms=200)
    consumer.close()
    assert handled == ["e0", "e2", "e3"]
    letters = [r.record for r in read_all(kafka, "dlq", expect=1)]
    assert [(d.reason, "cannot attribute" in d.detail) for d in letters] == [
        ("handler_error", True)]
