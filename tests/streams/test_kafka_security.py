"""Kafka SASL: the client settings every process shares, against a broker that needs it."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import SecretStr

from adloop.stack import free_port
from streams.broker import BrokerSettings, EmbeddedBroker
from streams.kafka_io import EventProducer, read_all
from streams.schemas import Click
from streams.settings import KafkaSettings, add_settings_arguments
from streams.topics import create_topics

PASSWORD = "not-a-real-secret-7f3a"


def _sasl(bootstrap: str, password: str, prefix: str = "sec.") -> KafkaSettings:
    return KafkaSettings(bootstrap_servers=bootstrap, topic_prefix=prefix,
                         security_protocol="SASL_PLAINTEXT", sasl_mechanism="PLAIN",
                         sasl_username="adloop", sasl_password=SecretStr(password))


def test_sasl_settings_need_every_part_and_never_show_the_password() -> None:
    with pytest.raises(ValueError, match="ADLOOP_SASL_PASSWORD"):
        KafkaSettings(security_protocol="SASL_SSL", sasl_mechanism="PLAIN",
                      sasl_username="adloop")
    s = _sasl("h:1", PASSWORD)
    assert PASSWORD not in repr(s) and PASSWORD not in str(s.model_dump())
    assert s.security_config()["sasl_plain_password"] == PASSWORD
    assert KafkaSettings().security_config() == {}          # PLAINTEXT: nothing added
    parser = argparse.ArgumentParser()
    add_settings_arguments(parser, KafkaSettings)
    flags = {a for action in parser._actions for a in action.option_strings}
    assert "--sasl-username" in flags and "--sasl-password" not in flags   # env only


@pytest.fixture(scope="module")
def sasl_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A second embedded broker with a SASL_PLAINTEXT (PLAIN) listener."""
    sasl_port = free_port()
    broker = EmbeddedBroker(BrokerSettings(
        port=0, data_dir=Path(tmp_path_factory.mktemp("kafka-sasl")), heap="256m",
        sasl_port=sasl_port, sasl_users={"adloop": SecretStr(PASSWORD)}))
    broker.start()
    try:
        yield f"127.0.0.1:{sasl_port}"
    finally:
        broker.stop()


@pytest.mark.kafka
def test_the_right_password_round_trips_records(sasl_broker: str) -> None:
    kafka = _sasl(sasl_broker, PASSWORD)
    create_topics(kafka.bootstrap_servers, kafka.topic_prefix,
                  security=kafka.security_config())
    producer = EventProducer(kafka)
    click = Click(event_id="c1", request_id="r1", user_id="u1", ad_id="a1", event_time=1.0)
    producer.send("clicks", click).get(timeout=30)
    producer.close()
    got = [r.record for r in read_all(kafka, "clicks", timeout_s=30, expect=1)]
    assert got == [click]


@pytest.mark.kafka
def test_a_wrong_password_is_refused(sasl_broker: str) -> None:
    bad = _sasl(sasl_broker, "wrong-password", prefix="sec-bad.")
    # kafka-python reports a refused SASL handshake as an authentication error or, when it
    # keeps retrying, as a bootstrap timeout: either way nothing gets through
    with pytest.raises(Exception, match=r"(?i)auth|bootstrap|timed? ?out|NoBrokers"):
        create_topics(bad.bootstrap_servers, bad.topic_prefix,
                      security={**bad.security_config(), "bootstrap_timeout_ms": 3000})
