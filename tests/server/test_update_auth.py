"""``model-updates`` records are authenticated before anything is fetched: a record that is
unsigned, badly signed, signed with an unknown key, or names a snapshot outside the
server's snapshot bases is dead-lettered with its reason, counted, and never fetched (the
web server holding the snapshots sees no request for it); a signed one is served, under
either key of a rotation."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import msgspec
import pytest
from pydantic import SecretStr

from server.trust import BaseError, SnapshotBases
from streams.kafka_io import read_all
from streams.schemas import DeadLetter, Event
from streams.settings import KafkaSettings
from streams.topics import Topics
from tests.server.conftest import Builder, metric_value, publish_ads, ready, wait_for
from tests.support.snapshots import TEST_KEY_ID, TEST_KEYRING, ServerThread
from tests.support.webserver import requests_logged, serve_directory

Send = Callable[[str, Event], None]
Start = Callable[..., ServerThread]
REFUSED = "adloop_server_model_updates_refused_total"
SECOND = ("test-2", b"adloop-tests-model-updates-key-2")


# -- snapshot bases (no Kafka) ----------------------------------------------------------
def test_file_bases_compare_real_paths_so_dotdot_siblings_and_symlinks_stay_out(
        tmp_path: Path) -> None:
    store, evil = tmp_path / "store", tmp_path / "store-evil"
    (store / "v1").mkdir(parents=True)
    evil.mkdir()
    (store / "escape").symlink_to(tmp_path)
    bases = SnapshotBases.parse(str(store))
    assert bases.refusal((store / "v1").as_uri()) is None
    assert bases.refusal(str(store / "v1")) is None               # a plain path
    assert bases.refusal(f"file://localhost{store}/v1") is None
    for uri in (evil.as_uri(),                                     # a sibling, same prefix
                f"file://{store}/../store-evil",                   # a '..' escape
                f"file://{store}/%2e%2e/store-evil",               # ... percent-encoded
                (store / "escape" / "store-evil").as_uri(),        # a symlink out of it
                "file:///etc/passwd", "/etc/passwd", "file://evil.example/etc",
                f"file://{store}/v1::http://169.254.169.254/",     # an fsspec chain
                "local:///etc", "memory://x", "relative/path", "ftp://h/x"):
        assert bases.refusal(uri) is not None, uri


def test_url_bases_compare_scheme_host_port_and_whole_path_segments() -> None:
    bases = SnapshotBases.parse("https://store.example/snapshots/,s3://bucket/adloop")
    ok = ["https://store.example/snapshots/v1", "https://STORE.example:443/snapshots/v1",
          "https://store.example/snapshots//v1", "s3://bucket/adloop/v1"]
    for uri in ok:
        assert bases.refusal(uri) is None, uri
    for uri in ["http://store.example/snapshots/v1",               # another scheme
                "https://store.example:8443/snapshots/v1",         # another port
                "https://store.example.evil/snapshots/v1",         # another host
                "https://store.example/snapshots-evil/v1",         # a sibling prefix
                "https://store.example/snapshots/../admin",
                "https://store.example/snapshots/%2E%2E/admin",
                "https://store.example/snapshots/a%2Fb",
                "https://user@store.example/snapshots/v1",
                "https://store.example@169.254.169.254/snapshots/v1",
                "https://store.example/snapshots/v1?x=1",
                "http://169.254.169.254/latest", "s3://other-bucket/adloop/v1",
                "s3://bucket/adloop-evil/v1", "file:///etc/passwd"]:
        assert bases.refusal(uri) is not None, uri


def test_bad_base_settings_are_refused_at_start() -> None:
    for text in ("", "ftp://x/y", "https://u:p@h/x", "file:///a/../b", "zip://a::file:///b"):
        with pytest.raises(BaseError):
            SnapshotBases.parse(text)


# -- the server following model-updates ----------------------------------------------------
@pytest.fixture
def www(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """nginx serving ``tmp_path/www`` (the snapshot store is ``www/store``); its URL and
    its work directory (request log)."""
    with serve_directory(tmp_path / "www", tmp_path / "nginx") as url:
        yield url, tmp_path / "nginx"


def _copy(snap_dir: Path, dest: Path) -> Path:
    shutil.copytree(snap_dir, dest)
    return dest


def _dead_letters(kafka: KafkaSettings) -> dict[int, DeadLetter]:
    physical = Topics(kafka.topic_prefix).name("model-updates")
    return {r.record.offset: r.record for r in read_all(kafka, "dlq", timeout_s=10)
            if r.record.source_topic == physical}


@pytest.mark.kafka
def test_forged_and_out_of_base_updates_are_dead_lettered_unfetched_and_signed_ones_serve(
        kafka: KafkaSettings, start_server: Start, snapshots: Builder, producer: Send,
        tmp_path: Path, www: tuple[str, Path]) -> None:
    url, nginx = www
    store = tmp_path / "www" / "store"
    base = f"{url}/store"
    publish_ads(producer)
    snaps = {v: snapshots(v, data_watermark=10.0 if v == "v1" else 100.0)
             for v in ("v1", "v2", "v3", "v4", "v5", "v6", "v7")}
    for v in ("v1", "v2", "v3", "v4", "v5", "v6"):
        _copy(snaps[v].directory, store / v)
    _copy(snaps["v7"].directory, tmp_path / "www" / "private" / "v7")
    producer("model-updates", snaps["v1"].model_update(uri=f"{base}/v1"))
    srv = start_server(kafka, snapshot_bases=base)
    with httpx.Client(base_url=srv.url, timeout=30) as c:
        wait_for(lambda: ready(c, "v1"), what="the signed v1 served over http")
        assert any("GET /store/v1/manifest.json 200" in r for r in requests_logged(nginx))

        # each forged record announces a real, valid snapshot with newer data: only the
        # gate stands between it and being fetched and served
        unsigned = snaps["v2"].model_update(uri=f"{base}/v2", key=None)
        wrong_secret = snaps["v3"].model_update(uri=f"{base}/v3",
                                                key=(TEST_KEY_ID, b"x" * 32))
        tampered = msgspec.structs.replace(snaps["v4"].model_update(uri=f"{base}/v1"),
                                           uri=f"{base}/v4")   # changed after signing
        unknown = snaps["v5"].model_update(uri=f"{base}/v5", key=SECOND)
        outside = [  # correctly signed, but not under the base
            snaps["v7"].model_update(uri=f"{url}/private/v7"),
            snaps["v7"].model_update(uri=f"{base}/../private/v7"),
            snaps["v6"].model_update(uri="http://169.254.169.254/latest"),
            snaps["v6"].model_update(uri="file:///etc/passwd"),
            snaps["v6"].model_update(uri=(store / "v6").as_uri()),
        ]
        before = c.get("/metrics").text
        for record in [unsigned, wrong_secret, tampered, unknown, *outside]:
            producer("model-updates", record)
        expected = {"unsigned": 1, "bad_signature": 2, "unknown_key": 1,
                    "uri_outside_bases": len(outside)}

        def counted() -> bool:
            text = c.get("/metrics").text
            return all(metric_value(text, REFUSED, f'reason="{r}"')
                       - metric_value(before, REFUSED, f'reason="{r}"') == n
                       for r, n in expected.items())

        wait_for(counted, what="every forged record refused and counted")
        letters = wait_for(lambda: (d := _dead_letters(kafka)) and len(d) == 9 and d,
                           what="nine dead letters")
        reasons = [d.reason for _, d in sorted(letters.items())]
        assert reasons == ["unsigned", "bad_signature", "bad_signature", "unknown_key",
                           *["uri_outside_bases"] * len(outside)]
        assert all(d.detail for d in letters.values())
        assert "169.254.169.254" in next(d.detail for d in letters.values()
                                         if "169.254" in d.raw().decode())
        # nothing forged or outside the base was requested: only v1 (and the probe)
        logged = requests_logged(nginx)
        assert not [r for r in logged if any(f"/{v}/" in r for v in
                                             ("v2", "v3", "v4", "v5", "v6", "v7"))], logged
        assert c.get("/readyz").json()["model_version"] == "v1"
        versions = {v["version"] for v in c.get("/v1/models", headers={
            "Authorization": "Bearer s3cret"}).json()["versions"]}
        assert versions == {"v1"}, versions

        # a signed record changed in transit (any field) is refused; the same record as
        # signed, with the server's key and under the base, is fetched and served
        producer("model-updates", msgspec.structs.replace(
            snaps["v6"].model_update(uri=f"{base}/v6"), data_watermark=0.0))
        wait_for(lambda: metric_value(c.get("/metrics").text, REFUSED, 'reason="bad_signature"')
                 - metric_value(before, REFUSED, 'reason="bad_signature"') == 3,
                 what="a record changed after signing refused")
        producer("model-updates", snaps["v6"].model_update(uri=f"{base}/v6"))
        wait_for(lambda: ready(c, "v6"), what="the signed v6 served")
        assert any("GET /store/v6/manifest.json 200" in r for r in requests_logged(nginx))


@pytest.mark.kafka
def test_a_key_rotation_serves_records_of_either_key_then_drops_the_old_one(
        kafka: KafkaSettings, start_server: Start, snapshots: Builder, producer: Send,
        tmp_path: Path) -> None:
    publish_ads(producer)
    both = SecretStr(f"{TEST_KEYRING},{SECOND[0]}:{SECOND[1].decode()}")
    # 1. the servers get the new key beside the old one
    srv = start_server(kafka, update_keys=both)
    with httpx.Client(base_url=srv.url, timeout=30) as c:
        producer("model-updates", snapshots("v1", data_watermark=1.0).model_update())
        wait_for(lambda: ready(c, "v1"), what="v1 signed with the old key")
        # 2. the learner switches to the new key
        producer("model-updates", snapshots("v2", data_watermark=2.0).model_update(
            key=SECOND))
        wait_for(lambda: ready(c, "v2"), what="v2 signed with the new key")
    # 3. the old key is dropped: a server re-reading the topic refuses what it signed
    srv2 = start_server(kafka, update_keys=SecretStr(f"{SECOND[0]}:{SECOND[1].decode()}"),
                        cache_dir=tmp_path / "cache-2")
    with httpx.Client(base_url=srv2.url, timeout=30) as c:
        wait_for(lambda: ready(c, "v2"), what="v2 served after the old key is dropped")
        text = c.get("/metrics").text
        assert metric_value(text, REFUSED, 'reason="unknown_key"') >= 1
