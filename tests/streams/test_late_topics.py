"""A consumer started before its topic exists finds the topic within seconds once it is
created, and a group member whose metadata missed partitions at its join picks them up
within seconds (``KafkaSettings.metadata_max_age_ms``), instead of Kafka's default five
minutes.

Both ways adloop reads topics: a group member that subscribes (the joiner, the learner's
feedback, stats, the CLI) and a follower that assigns partitions itself (the server's
``ads`` / ``model-updates`` / ``organic-items`` followers).
"""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

from kafka import KafkaProducer
from kafka.admin import KafkaAdminClient, NewPartitions

from server.follow import TopicFollower
from streams.kafka_io import EventConsumer, EventProducer
from streams.samples import sample_records
from streams.schemas import Ad, Click, encode
from streams.settings import KafkaSettings
from streams.topics import create_topics

FOUND_WITHIN_S = 30.0
"""Generous next to the 3 s metadata refresh; Kafka's default would wait 300 s."""


def _fresh(kafka_broker: str, name: str) -> KafkaSettings:
    """Settings under a prefix whose topics do not exist yet."""
    return KafkaSettings(bootstrap_servers=kafka_broker,
                         topic_prefix=f"late-{name}-{uuid.uuid4().hex[:6]}.",
                         client_id=f"test-late-{name}")


def test_metadata_refresh_default_is_seconds_not_minutes() -> None:
    cfg = KafkaSettings().client_config()
    assert cfg["metadata_max_age_ms"] <= 5000


def test_group_consumer_started_before_its_topic_consumes_once_it_is_created(
        kafka_broker: str) -> None:
    kafka = _fresh(kafka_broker, "group")
    consumer = EventConsumer(kafka, ["clicks"], group_id=kafka.topic_prefix + "g")
    try:
        assert consumer.poll(timeout_ms=500) == []     # joined with nothing to read
        create_topics(kafka.bootstrap_servers, kafka.topic_prefix)
        created_at = time.monotonic()
        producer = EventProducer(kafka)
        producer.send("clicks", Click(event_id="c1", request_id="r1", user_id="u1",
                                      ad_id="a1", event_time=1.0))
        producer.flush()
        producer.close()
        got: list[str] = []
        while not got and time.monotonic() - created_at < FOUND_WITHIN_S:
            got = [r.record.event_id for r in consumer.poll(timeout_ms=200)]
        assert got == ["c1"], f"nothing consumed {FOUND_WITHIN_S:.0f}s after creation"
    finally:
        consumer.close()


def test_follower_started_before_its_topic_follows_it_once_it_is_created(
        kafka_broker: str) -> None:
    kafka = _fresh(kafka_broker, "follow")
    seen: list[str] = []
    arrived = threading.Event()

    def handle(batch: list[tuple[bytes | None, Any]]) -> None:
        seen.extend(rec.ad_id for _key, rec in batch if rec is not None)
        if seen:
            arrived.set()

    follower = TopicFollower(kafka, "ads", handle).start()
    try:
        create_topics(kafka.bootstrap_servers, kafka.topic_prefix)
        producer = EventProducer(kafka)
        ad = sample_records(1)["ads"][0]
        assert isinstance(ad, Ad)
        producer.send("ads", ad)
        producer.flush()
        producer.close()
        assert arrived.wait(FOUND_WITHIN_S), f"follower error: {follower.error}"
        assert seen == [ad.ad_id]
    finally:
        follower.stop()


def test_group_member_picks_up_partitions_its_metadata_missed_at_the_join(
        kafka: KafkaSettings) -> None:
    """The race behind a consumer that waited minutes: the member joined while its
    metadata lacked partitions, no error marks them missing, and only the next periodic
    refresh shows them (then the group rebalances). Adding a partition after the join
    makes the same situation on purpose."""
    consumer = EventConsumer(kafka, ["ads"], group_id=kafka.topic_prefix + "g")
    physical = kafka.topic_prefix + "ads"
    try:
        joined_by = time.monotonic() + FOUND_WITHIN_S
        while not consumer.consumer.assignment() and time.monotonic() < joined_by:
            consumer.poll(timeout_ms=200)
        assert {tp.partition for tp in consumer.consumer.assignment()} == {0}
        admin = KafkaAdminClient(**kafka.client_config())
        try:
            admin.create_partitions({physical: NewPartitions(total_count=2)})
        finally:
            admin.close()
        ad = sample_records(1)["ads"][0]
        assert isinstance(ad, Ad)
        producer = KafkaProducer(**kafka.client_config())
        producer.send(physical, encode(ad), key=b"k", partition=1).get(timeout=30)
        producer.close()
        added_at = time.monotonic()
        got: list[tuple[int, str]] = []
        while not got and time.monotonic() - added_at < FOUND_WITHIN_S:
            got = [(r.partition, r.record.ad_id) for r in consumer.poll(timeout_ms=200)]
        assert got == [(1, ad.ad_id)], f"nothing consumed {FOUND_WITHIN_S:.0f}s after"
    finally:
        consumer.close()
