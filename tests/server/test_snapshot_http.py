"""Snapshots over the network: a store directory served by a stock web server (nginx)
on loopback, fetched over http and verified by sha256 as from a local directory."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from server.catalog import AdCatalog
from server.engine import Engine, RecRequest
from server.models import ModelManager
from server.runtime import resolve_provider
from streams.schemas import Event
from streams.settings import KafkaSettings
from tests.server.conftest import AD_IDS, Builder, metric_value, publish_ads, ready, wait_for
from tests.support.snapshots import ServerThread, make_ads
from tests.support.webserver import serve_directory

Send = Callable[[str, Event], None]
Start = Callable[..., ServerThread]
REQ = {"user_id": "u-1", "context": {"device": "ios"}, "recent_ad_ids": ["ad-0001"], "k": 5}


@pytest.fixture
def store_url(tmp_path: Path) -> Iterator[str]:
    """The ``snapshots`` fixture's store directory, served over http by nginx."""
    with serve_directory(tmp_path / "store", tmp_path / "nginx") as base:
        yield base


def _manager(tmp_path: Path) -> tuple[ModelManager, Engine]:
    catalog = AdCatalog()
    catalog.apply((a.ad_id, a) for a in make_ads(AD_IDS))
    mgr = ModelManager(catalog, resolve_provider("cpu"), tmp_path / "cache", 3, 1)
    return mgr, Engine(mgr, catalog)


def _corrupt(path: Path) -> None:
    """Flip bytes in the middle of a stored file (its manifest checksum stays)."""
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 8] = bytes(b ^ 0xFF for b in data[mid:mid + 8])
    path.write_bytes(bytes(data))


def _detail(mgr: ModelManager, version: str) -> str:
    return str({v["version"]: v["detail"] for v in mgr.describe()["versions"]}[version])


def test_a_snapshot_served_over_http_is_fetched_verified_and_served(
        tmp_path: Path, snapshots: Builder, store_url: str) -> None:
    mgr, engine = _manager(tmp_path)
    snap = snapshots("v0001")
    assert mgr.apply_update(snap.model_update(uri=f"{store_url}/v0001")) == "ok"
    (res,) = engine.run([RecRequest("u1", {"device": "ios"}, ["ad-0001"], 5)],
                        lambda levels, k: [8] * levels)
    assert res.model_version == "v0001" and len(res.ads) == 5
    cached = tmp_path / "cache" / "v0001"
    for name in snap.manifest["files"]:
        assert (cached / name).read_bytes() == (snap.directory / name).read_bytes()


def test_a_file_corrupted_on_the_web_server_is_refused_by_checksum(
        tmp_path: Path, snapshots: Builder, store_url: str) -> None:
    mgr, _ = _manager(tmp_path)
    assert mgr.apply_update(snapshots("v0001").model_update(uri=f"{store_url}/v0001")) == "ok"
    bad = snapshots("v0002")
    _corrupt(bad.directory / "decoder_step.onnx")
    assert httpx.get(f"{store_url}/v0002/decoder_step.onnx").status_code == 200
    assert mgr.apply_update(bad.model_update(uri=f"{store_url}/v0002")) == "checksum"
    assert mgr.version == "v0001"
    assert "decoder_step.onnx sha256" in _detail(mgr, "v0002")
    assert not (tmp_path / "cache" / "v0002").exists()


def test_a_manifest_checksum_mismatch_or_a_missing_version_over_http_is_refused(
        tmp_path: Path, snapshots: Builder, store_url: str) -> None:
    mgr, _ = _manager(tmp_path)
    snap = snapshots("v0001")
    assert mgr.apply_update(snap.model_update(uri=f"{store_url}/v0001",
                                              sha256="0" * 64)) == "checksum"
    assert mgr.apply_update(snap.model_update(uri=f"{store_url}/v9999")) == "fetch"
    assert mgr.state is None


@pytest.mark.skipif(importlib.util.find_spec("s3fs") is not None,
                    reason="s3fs is installed: the s3:// driver exists")
def test_an_s3_uri_without_the_s3fs_driver_is_a_refused_snapshot_naming_the_package(
        tmp_path: Path, snapshots: Builder) -> None:
    mgr, _ = _manager(tmp_path)
    update = snapshots("v0001").model_update(uri="s3://adloop-snapshots/v0001")
    assert mgr.apply_update(update) == "fetch"
    assert mgr.state is None
    detail = _detail(mgr, "v0001")
    assert "s3fs" in detail and "requirements.lock" in detail


@pytest.mark.kafka
def test_a_server_following_model_updates_fetches_over_http_and_refuses_a_corrupted_one(
        kafka: KafkaSettings, start_server: Start, snapshots: Builder, producer: Send,
        store_url: str) -> None:
    publish_ads(producer)
    producer("model-updates", snapshots("v0001").model_update(uri=f"{store_url}/v0001"))
    srv = start_server(kafka, snapshot_bases=store_url)
    with httpx.Client(base_url=srv.url, timeout=30) as c:
        wait_for(lambda: ready(c, "v0001"), what="v0001 served from http")
        before = c.get("/metrics").text
        bad = snapshots("v0002")
        _corrupt(bad.directory / "value.onnx")
        producer("model-updates", bad.model_update(uri=f"{store_url}/v0002"))
        wait_for(lambda: metric_value(c.get("/metrics").text, "adloop_server_swaps_total",
                                      'result="checksum"')
                 > metric_value(before, "adloop_server_swaps_total", 'result="checksum"'),
                 what="the corrupted v0002 refused")
        r = c.post("/v1/recommend", json=REQ)
        assert r.status_code == 200 and r.json()["model_version"] == "v0001"
        producer("model-updates", snapshots("v0003").model_update(uri=f"{store_url}/v0003"))
        wait_for(lambda: ready(c, "v0003"), what="v0003 served from http")
