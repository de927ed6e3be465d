"""Every event type crosses the real broker intact, for kafka-python and for aiokafka."""

from __future__ import annotations

import asyncio

from aiokafka import AIOKafkaConsumer

from streams.broker import kafka_libs_dir, kafka_version
from streams.kafka_io import EventProducer, read_all
from streams.samples import sample_records
from streams.schemas import decode, encode
from streams.settings import KafkaSettings
from streams.topics import TOPICS, Topics


def test_embedded_broker_is_apache_kafka_4() -> None:
    version = kafka_version(kafka_libs_dir())
    assert int(version.split(".")[0]) >= 4, version


def test_every_event_type_round_trips_through_kafka_python_and_aiokafka(
        kafka: KafkaSettings) -> None:
    records = sample_records(5)
    producer = EventProducer(kafka)
    for topic, recs in records.items():
        for rec in recs:
            producer.send(topic, rec)
    producer.flush()
    producer.close()

    for topic, recs in records.items():
        back = read_all(kafka, topic, expect=len(recs))
        assert sorted(encode(r.record) for r in back) == sorted(encode(r) for r in recs), topic

    # A second client, faust-streaming's aiokafka, reads the same bytes.
    async def read_with_aiokafka(physical: str, n: int) -> list[bytes]:
        consumer = AIOKafkaConsumer(physical, bootstrap_servers=kafka.bootstrap_servers,
                                    auto_offset_reset="earliest", enable_auto_commit=False)
        await consumer.start()
        try:
            out: list[bytes] = []
            async with asyncio.timeout(30):
                while len(out) < n:
                    batch = await consumer.getmany(timeout_ms=500)
                    out.extend(m.value for msgs in batch.values() for m in msgs)
            return out
        finally:
            await consumer.stop()

    names = Topics(kafka.topic_prefix)
    for topic, recs in records.items():
        raw = asyncio.run(read_with_aiokafka(names.name(topic), len(recs)))
        decoded = [decode(v, TOPICS[topic].record) for v in raw]
        assert sorted(encode(d) for d in decoded) == sorted(encode(r) for r in recs)  # type: ignore[arg-type]


def test_events_are_keyed_by_user_so_one_users_events_share_a_partition(
        kafka: KafkaSettings) -> None:
    producer = EventProducer(kafka)
    for user in ("alice", "bob", "carol"):
        recs = sample_records(4, user=user)
        for topic in ("impressions", "clicks", "conversions", "feedback"):
            for rec in recs[topic]:
                producer.send(topic, rec)
    producer.flush()
    producer.close()
    partition_of: dict[str, set[int]] = {}
    for topic in ("impressions", "clicks", "conversions", "feedback"):
        for r in read_all(kafka, topic, expect=12):
            partition_of.setdefault(r.record.user_id, set()).add(r.partition)
    assert set(partition_of) == {"alice", "bob", "carol"}
    for user, parts in partition_of.items():
        assert len(parts) == 1, (user, parts)
