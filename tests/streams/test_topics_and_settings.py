"""Topic creation is idempotent and carries the configured layout; settings precedence."""

from __future__ import annotations

import argparse

import pytest
from kafka.admin import ConfigResource, ConfigResourceType, KafkaAdminClient

from streams.settings import KafkaSettings, add_settings_arguments, settings_from_args
from streams.topics import EVENT_PARTITIONS, TOPICS, Topics, create_topics


def test_create_topics_is_idempotent_and_applies_partitions_and_configs(
        kafka_broker: str) -> None:
    prefix = "idem-topics."
    first = create_topics(kafka_broker, prefix)
    assert set(first.values()) == {"created"}
    again = create_topics(kafka_broker, prefix)
    assert set(again.values()) == {"exists"}
    admin = KafkaAdminClient(bootstrap_servers=kafka_broker)
    try:
        # create_topics returned once every partition had a leader in the metadata
        described = {t["name"]: t for t in admin.describe_topics([prefix + t for t in TOPICS])}
        for logical, spec in TOPICS.items():
            assert len(described[prefix + logical]["partitions"]) == spec.partitions
        for logical in ("impressions", "clicks", "conversions", "organic-engagements",
                        "feedback"):
            assert TOPICS[logical].partitions == EVENT_PARTITIONS  # co-partitioned
        res = admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, prefix + "ads")])
        entries = res["topic"][prefix + "ads"]
        assert entries["cleanup.policy"]["value"] == "compact"
    finally:
        admin.close()


def test_unknown_topic_name_is_a_clear_error() -> None:
    with pytest.raises(KeyError, match="unknown topic 'impression'"):
        Topics().name("impression")


def test_settings_come_from_defaults_then_env_then_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    parser = argparse.ArgumentParser()
    add_settings_arguments(parser, KafkaSettings)
    assert settings_from_args(KafkaSettings, parser.parse_args([])).bootstrap_servers == (
        "127.0.0.1:9092")
    monkeypatch.setenv("ADLOOP_BOOTSTRAP_SERVERS", "10.0.0.1:9092")
    monkeypatch.setenv("ADLOOP_TOPIC_PREFIX", "env.")
    s = settings_from_args(KafkaSettings, parser.parse_args(["--topic-prefix", "flag."]))
    assert s.bootstrap_servers == "10.0.0.1:9092"
    assert s.topic_prefix == "flag."
