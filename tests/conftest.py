"""Fixtures that start real services, shared by the whole suite.

One embedded Apache Kafka broker per test session (``kafka_broker``); each test
gets its own topic prefix (``kafka``), so tests never see each other's records.
Set ``ADLOOP_TEST_BOOTSTRAP`` to run against an already running broker instead.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from streams.broker import BrokerSettings, EmbeddedBroker
from streams.settings import KafkaSettings
from streams.topics import create_topics

# Property tests: deterministic everywhere by default (the same examples on every run, so
# a test run never depends on luck); ``./dev fuzz`` selects ``fuzz`` (random seeds, many
# examples, the @reproduce_failure blob printed) with ``--hypothesis-profile=fuzz``.
settings.register_profile("deterministic", derandomize=True, database=None,
                          print_blob=True)
settings.register_profile("ci", parent=settings.get_profile("deterministic"))
settings.register_profile(
    "fuzz", derandomize=False, database=None, print_blob=True, deadline=None,
    max_examples=int(os.environ.get("ADLOOP_FUZZ_EXAMPLES", "2000")),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile("ci" if os.environ.get("CI") else "deterministic")


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Bootstrap address of the session's broker."""
    external = os.environ.get("ADLOOP_TEST_BOOTSTRAP")
    if external:
        yield external
        return
    data_dir = Path(tmp_path_factory.mktemp("kafka"))
    broker = EmbeddedBroker(BrokerSettings(port=0, data_dir=data_dir, heap="768m"))
    broker.start()
    try:
        yield broker.bootstrap_servers
    finally:
        broker.stop()


@pytest.fixture
def kafka(kafka_broker: str, request: pytest.FixtureRequest) -> KafkaSettings:
    """Kafka settings with a topic prefix unique to this test; topics already created."""
    slug = re.sub(r"[^a-zA-Z0-9]+", "-", request.node.name)[:40].strip("-")
    prefix = f"t-{slug}-{uuid.uuid4().hex[:6]}."
    create_topics(kafka_broker, prefix)
    return KafkaSettings(bootstrap_servers=kafka_broker, topic_prefix=prefix,
                         client_id=f"test-{slug}")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests that use the broker get the ``kafka`` marker (select with -m kafka)."""
    for item in items:
        if "kafka_broker" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.kafka)
