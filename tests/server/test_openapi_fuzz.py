"""Schemathesis against the server's own OpenAPI document: generated requests, valid and
invalid, never get a 5xx, every 4xx names the problem, and responses match the schema."""

from __future__ import annotations

import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import schemathesis
from schemathesis import Case, CheckContext, GenerationMode, Response

from streams.kafka_io import EventProducer
from streams.settings import KafkaSettings
from streams.topics import create_topics
from tests.server.conftest import AD_IDS, server_settings, wait_for
from tests.support.snapshots import ServerThread, SnapshotSpec, build_snapshot, make_ads


@pytest.fixture(scope="module")
def live_server(kafka_broker: str, tmp_path_factory: pytest.TempPathFactory
                ) -> Iterator[ServerThread]:
    """A ready server: a snapshot, its ads on the broker, topics of its own."""
    tmp = Path(tmp_path_factory.mktemp("openapi"))
    prefix = f"t-openapi-{uuid.uuid4().hex[:6]}."
    create_topics(kafka_broker, prefix)
    kafka = KafkaSettings(bootstrap_servers=kafka_broker, topic_prefix=prefix)
    prod = EventProducer(kafka)
    for ad in make_ads(AD_IDS):
        prod.send("ads", ad)
    prod.flush()
    prod.close()
    snap = build_snapshot(tmp / "v1", SnapshotSpec(version="v1", ad_ids=AD_IDS))
    with ServerThread(server_settings(tmp, snapshot=snap.directory), kafka) as srv:
        wait_for(lambda: httpx.get(srv.url + "/readyz").status_code == 200, 60,
                 "the server ready")
        yield srv


def _openapi() -> dict[str, object]:
    """The server's OpenAPI document, from an app that is built but never started."""
    from server.app import create_app
    from server.settings import ServerSettings

    with tempfile.TemporaryDirectory() as tmp:
        app = create_app(ServerSettings(cache_dir=Path(tmp), log_impressions=False,
                                        follow_model_updates=False), KafkaSettings())
        return app.openapi()


pytestmark = pytest.mark.kafka

schema = schemathesis.openapi.from_dict(_openapi())
# valid and invalid requests; deterministic, so a failure reproduces
schema.config.generation.update(modes=list(GenerationMode), max_examples=40, deterministic=True)


@schemathesis.check
def four_xx_names_the_problem(ctx: CheckContext, response: Response, case: Case) -> bool:
    """A 4xx body is JSON with a non-empty ``detail`` (FastAPI's 422 lists each field)."""
    if 400 <= response.status_code < 500:
        body = response.json()
        assert isinstance(body, dict) and body.get("detail"), (
            f"{response.status_code} without a detail: {response.text[:200]}")
    return True


@schema.parametrize()
def test_generated_requests_never_get_a_5xx_and_4xx_name_the_problem(
        case: Case, live_server: ServerThread) -> None:
    case.call_and_validate(base_url=live_server.url)


def test_the_document_covers_the_routes() -> None:
    paths = set(schema.raw_schema["paths"])
    assert {"/v1/recommend", "/healthz", "/readyz", "/v1/models"} <= paths
