"""Fixtures for the serving worker: snapshots built with tests.support.snapshots, a real
server on real HTTP, and helpers to publish ``ads`` / ``model-updates`` records."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from server.settings import ServerSettings
from streams.kafka_io import EventProducer
from streams.schemas import Ad, Event
from streams.settings import KafkaSettings
from tests.support.snapshots import (
    TEST_KEYRING,
    BuiltSnapshot,
    ServerThread,
    SnapshotSpec,
    build_snapshot,
    make_ads,
)

AD_IDS = [f"ad-{i:04d}" for i in range(40)]


@pytest.fixture
def snapshots(tmp_path: Path) -> Callable[..., BuiltSnapshot]:
    """``snapshots(version, **spec_overrides)`` -> a built snapshot in the store dir."""
    store = tmp_path / "store"

    def build(version: str = "v000001", **overrides: Any) -> BuiltSnapshot:
        spec = SnapshotSpec(version=version, ad_ids=AD_IDS, seed=hash(version) % 1000)
        return build_snapshot(store / version, spec, **overrides)

    return build


@pytest.fixture
def producer(kafka: KafkaSettings) -> Iterator[Callable[[str, Event], None]]:
    prod = EventProducer(kafka)

    def send(topic: str, record: Event) -> None:
        prod.send(topic, record).get(timeout=30)

    yield send
    prod.close()


def server_settings(tmp_path: Path, **overrides: Any) -> ServerSettings:
    """Settings of a test server: the ``snapshots`` fixture's store is its snapshot base
    and it verifies ``model-updates`` with the tests' keyring."""
    base: dict[str, Any] = {
        "port": 0, "cache_dir": tmp_path / "cache", "beam_schedule": "8,8,8",
        "max_batch_size": 8, "max_wait_ms": 2.0, "slo_ms": 2000.0, "intra_op_threads": 1,
        "admin_token": "s3cret", "keep_versions": 3, "server_id": "test-server",
        "snapshot_bases": (tmp_path / "store").as_uri(), "update_keys": SecretStr(TEST_KEYRING),
        # the beam-search path (whole-catalogue scoring: test_catalogue_mode.py)
        "score_catalogue_max": 0,
    }
    base.update(overrides)
    return ServerSettings(**base)


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Callable[..., ServerThread]]:
    started: list[ServerThread] = []

    def start(kafka: KafkaSettings, **overrides: Any) -> ServerThread:
        srv = ServerThread(server_settings(tmp_path, **overrides), kafka).__enter__()
        started.append(srv)
        return srv

    yield start
    for srv in reversed(started):
        srv.__exit__(None, None, None)


def wait_for(predicate: Callable[[], Any], timeout_s: float = 30.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what or predicate}")


def ready(client: httpx.Client, version: str | None = None) -> bool:
    r = client.get("/readyz")
    if r.status_code != 200:
        return False
    return version is None or r.json()["model_version"] == version


def publish_ads(send: Callable[[str, Event], None], ad_ids: list[str] | None = None,
                **kw: Any) -> list[Ad]:
    ads = make_ads(ad_ids or AD_IDS, **kw)
    for ad in ads:
        send("ads", ad)
    return ads


def metric_value(text: str, name: str, labels: str = "") -> float:
    """Sum of a sample (``name{labels}``) in Prometheus text; 0 if absent."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        if key == name + (f"{{{labels}}}" if labels else "") or (
                not labels and key.startswith(name + "{")):
            total += float(value)
    return total


Builder = Callable[..., BuiltSnapshot]
