"""The serving worker over real HTTP with a real Kafka broker."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from streams.kafka_io import read_all
from streams.schemas import Event, Impression
from streams.settings import KafkaSettings
from tests.server.conftest import (
    AD_IDS,
    Builder,
    metric_value,
    publish_ads,
    ready,
    wait_for,
)
from tests.support.snapshots import ServerThread, make_ads

pytestmark = pytest.mark.kafka
Send = Callable[[str, Event], None]
Start = Callable[..., ServerThread]
REQ = {"user_id": "u-1", "context": {"device": "ios", "placement": "feed"},
       "recent_ad_ids": ["ad-0001", "ad-0002"], "k": 10}


def test_not_ready_until_a_snapshot_then_serves_and_logs_impressions(
        kafka: KafkaSettings, start_server: Start, snapshots: Builder, producer: Send) -> None:
    srv = start_server(kafka)
    with httpx.Client(base_url=srv.url, timeout=30) as c:
        assert c.get("/healthz").status_code == 200
        r = c.get("/readyz")
        assert r.status_code == 503 and "a model snapshot" in r.json()["waiting_for"]
        r = c.post("/v1/recommend", json=REQ)
        assert r.status_code == 503 and "no model snapshot" in r.json()["detail"]
        publish_ads(producer)
        producer("model-updates", snapshots("v1", data_watermark=1234.5).model_update())
        wait_for(lambda: ready(c, "v1"), what="v1 ready")
        wait_for(lambda: c.get("/readyz").json()["servable_ads"] == len(AD_IDS),
                 what="every ad read from the ads topic")
        r = c.post("/v1/recommend", json={**REQ, "request_id": "req-1", "event_time": 99.0,
                                          "recent_organic": ["gaming/consoles#3"]})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["request_id"] == "req-1" and body["model_version"] == "v1"
        assert len(body["ads"]) == 10 and body["beam_widths"] == [10, 10, 10]
        assert [a["position"] for a in body["ads"]] == list(range(10))
        evs = [a["expected_value"] for a in body["ads"]]
        assert evs == sorted(evs, reverse=True)
        ready_body = c.get("/readyz").json()
        assert ready_body["provider"] == "cpu" and ready_body["servable_ads"] == len(AD_IDS)
        text = c.get("/metrics").text
        assert 'adloop_server_provider_info{provider="CPUExecutionProvider"} 1.0' in text
        assert 'adloop_server_model_version_info{version="v1"} 1.0' in text
        assert metric_value(text, "adloop_server_snapshot_data_watermark_timestamp_seconds") \
            == 1234.5
        assert metric_value(text, "adloop_server_beam_width", 'level="0"') == 10
        assert "/v1/recommend" in c.get("/openapi.json").json()["paths"]
    imps = [r.record for r in read_all(kafka, "impressions", timeout_s=30, expect=1)]
    imp = next(i for i in imps if i.request_id == "req-1")
    assert isinstance(imp, Impression)
    assert imp.event_time == 99.0 and imp.model_version == "v1" and imp.server_id == "test-server"
    assert [s.ad_id for s in imp.slate] == [a["ad_id"] for a in body["ads"]]
    assert imp.beam_widths == body["beam_widths"] and imp.context == REQ["context"]
    assert imp.recent_organic == ["gaming/consoles#3"]     # what the model read is logged
    assert {s.bid_type for s in imp.slate} <= {"cpc", "cpa", "cpm"}
    # exploration off (the default): a deterministic policy, propensity 1.0 everywhere
    assert [s.propensity for s in imp.slate] == [a["propensity"] for a in body["ads"]] \
        == [1.0] * 10
    # the final beams the slate was ranked from (all of them here: the last level's width
    # is under log_beams = 32): the slate is their top, with the same log-probs and values
    assert len(imp.beams) == body["beam_widths"][-1] == 10
    assert [b.ad_id for b in imp.beams[:10]] == [a["ad_id"] for a in body["ads"]]
    assert [b.logprob for b in imp.beams[:10]] == [a["score"] for a in body["ads"]]
    assert [b.expected_value for b in imp.beams[:10]] == evs


def test_with_exploration_the_response_and_the_impression_carry_each_items_propensity(
        kafka: KafkaSettings, start_server: Start, snapshots: Builder, producer: Send) -> None:
    publish_ads(producer)
    srv = start_server(kafka, snapshot=snapshots("v1").directory, explore=1.0, explore_seed=3)
    k = 5
    with httpx.Client(base_url=srv.url, timeout=30) as c:
        wait_for(lambda: ready(c, "v1") and c.get("/readyz").json()["servable_ads"]
                 == len(AD_IDS), what="every ad servable")
        r = c.post("/v1/recommend", json={**REQ, "request_id": "explore-1", "k": k})
        assert r.status_code == 200, r.text
        body = r.json()
        ads = [a["ad_id"] for a in body["ads"]]
        props = [a["propensity"] for a in body["ads"]]
        assert len(ads) == len(set(ads)) == k
        # first request: every servable ad not in the slate is eligible
        assert props == [1.0] * (k - 1) + [pytest.approx(1.0 / (len(AD_IDS) - k))]
        text = c.get("/metrics").text
        assert metric_value(text, "adloop_server_explored_total") >= 1
        assert metric_value(text, "adloop_server_explore_ratio") == 1.0
    imps = [r.record for r in read_all(kafka, "impressions", timeout_s=30, expect=1)]
    imp = next(i for i in imps if i.request_id == "explore-1")
    assert isinstance(imp, Impression)
    assert [(s.ad_id, s.position, s.propensity) for s in imp.slate] == \
        list(zip(ads, range(k), props, strict=True))


def test_only_servable_ads_are_recommended_and_a_paused_ad_disappears(
        kafka: KafkaSettings, start_server: Start, snapshots: Builder, producer: Send) -> None:
    ads = make_ads(AD_IDS)
    servable = set()
    for i, ad in enumerate(ads):
        if i % 4 == 1:
            ad.status = "paused"
        elif i % 4 == 2:
            ad.budget = 0.0
        else:
            servable.add(ad.ad_id)
        producer("ads", ad)
    for extra in make_ads(["not-in-id-table"]):        # active but unknown to the model
        producer("ads", extra)
    producer("model-updates", snapshots("v1").model_update())
    srv = start_server(kafka)
    with httpx.Client(base_url=srv.url, timeout=30) as c:
        wait_for(lambda: ready(c, "v1"), what="ready")
        seen: set[str] = set()
        for i in range(30):
            r = c.post("/v1/recommend", json={**REQ, "user_id": f"u{i}", "k": 50,
                                              "context": {"device": f"d{i}"}})
            assert r.status_code == 200
            seen |= {a["ad_id"] for a in r.json()["ads"]}
        assert seen and seen <= servable
        top = c.post("/v1/recommend", json=REQ).json()["ads"][0]["ad_id"]
        paused = next(a for a in ads if a.ad_id == top)
        paused.status = "paused"
        producer("ads", paused)

        def gone() -> bool:
            r = c.post("/v1/recommend", json={**REQ, "k": 50})
            return top not in {a["ad_id"] for a in r.json()["ads"]}

        wait_for(gone, timeout_s=15, what="paused ad to disappear")
        for i in range(10):
            r = c.post("/v1/recommend", json={**REQ, "user_id": f"w{i}", "k": 50})
            assert top not in {a["ad_id"] for a in r.json()["ads"]}


@pytest.mark.parametrize("payload,field", [
    ({"context": {}}, "user_id"),
    ({**REQ, "user_id": ""}, "user_id"),
    ({**REQ, "user_id": "x" * 129}, "user_id"),
    ({**REQ, "k": 0}, "k"),
    ({**REQ, "k": 51}, "k"),
    ({**REQ, "k": "many"}, "k"),
    ({**REQ, "context": {f"f{i}": "v" for i in range(33)}}, "context"),
    ({**REQ, "context": {"device": 7}}, "context"),
    ({**REQ, "recent_ad_ids": ["a"] * 201}, "recent_ad_ids"),
    ({**REQ, "recent_ad_ids": "ad-1"}, "recent_ad_ids"),
    ({**REQ, "recent_organic": ["t#1"] * 201}, "recent_organic"),
    ({**REQ, "event_time": -1}, "event_time"),
    ({**REQ, "organic_k": -1}, "organic_k"),
    ({**REQ, "organic_k": 51}, "organic_k"),
    ({**REQ, "organic_k": "x"}, "organic_k"),
    ({**REQ, "organic_k": True}, "organic_k"),
    ({**REQ, "organic_k": 2.5}, "organic_k"),
    ({**REQ, "surprise": 1}, "surprise"),
])
def test_bad_requests_get_422_naming_the_field(
        kafka: KafkaSettings, start_server: Start, snapshots: Builder,
        payload: dict[str, object], field: str) -> None:
    srv = start_server(kafka, snapshot=snapshots("v1").directory, follow_model_updates=False)
    with httpx.Client(base_url=srv.url, timeout=30) as c:
        r = c.post("/v1/recommend", json=payload)
        assert r.status_code == 422, r.text
        assert any(field in [str(p) for p in e["loc"]] for e in r.json()["detail"]), r.text


def test_malformed_and_oversized_bodies_get_4xx(kafka: KafkaSettings, start_server: Start,
                                                snapshots: Builder) -> None:
    srv = start_server(kafka, snapshot=snapshots("v1").directory, follow_model_updates=False,
                       max_body_bytes=4096)
    with httpx.Client(base_url=srv.url, timeout=30) as c:
        r = c.post("/v1/recommend", content=b'{"user_id": "u",',
                   headers={"content-type": "application/json"})
        assert r.status_code == 422 and r.json()["detail"][0]["type"] == "json_invalid"
        r = c.post("/v1/recommend", content=b"[1, 2]",
                   headers={"content-type": "application/json"})
        assert r.status_code == 422
        big = {**REQ, "user_id": "u", "context": {"k": "v" * 5000}}
        r = c.post("/v1/recommend", json=big)
        assert r.status_code == 413 and "limit" in r.json()["detail"]

        def chunks():
            yield b'{"user_id": "'
            for _ in range(10):
                yield b"x" * 1000
            yield b'"}'

        r = c.post("/v1/recommend", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413
        text = c.get("/metrics").text
        assert metric_value(text, "adloop_server_requests_total", 'code="413"') >= 2
        assert metric_value(text, "adloop_server_requests_total", 'code="500"') == 0


def test_admin_endpoints_refuse_without_the_token(kafka: KafkaSettings, start_server: Start,
                                                  snapshots: Builder) -> None:
    snap = snapshots("v1").directory
    srv = start_server(kafka, snapshot=snap, follow_model_updates=False)
    closed = start_server(kafka, snapshot=snap, follow_model_updates=False, admin_token=None,
                          cache_dir=snap.parent.parent / "cache2")
    with httpx.Client(base_url=srv.url, timeout=30) as c:
        for method, path in (("GET", "/v1/models"), ("POST", "/v1/models/rollback")):
            assert c.request(method, path).status_code == 401
            r = c.request(method, path, headers={"Authorization": "Bearer wrong"})
            assert r.status_code == 401
            r = c.request(method, path, headers={"Authorization": "Basic czNjcmV0"})
            assert r.status_code == 401
        r = c.get("/v1/models", headers={"Authorization": "Bearer s3cret"})
        assert r.status_code == 200 and r.json()["serving"] == "v1"
    with httpx.Client(base_url=closed.url, timeout=30) as c:
        r = c.get("/v1/models", headers={"Authorization": "Bearer s3cret"})
        assert r.status_code == 403 and "disabled" in r.json()["detail"]


def test_bad_snapshots_over_kafka_are_refused_and_rollback_works(
        kafka: KafkaSettings, start_server: Start, snapshots: Builder, producer: Send) -> None:
    publish_ads(producer)
    producer("model-updates", snapshots("v1").model_update())
    producer("model-updates", snapshots("v2").model_update())
    srv = start_server(kafka)
    auth = {"Authorization": "Bearer s3cret"}
    with httpx.Client(base_url=srv.url, timeout=30) as c:
        wait_for(lambda: ready(c, "v2"), what="v2 (newest) ready")
        before = c.get("/metrics").text
        faults = {"v3": {"corrupt": "encoder.onnx"}, "v4": {"bad_checksum": "decoder_step.onnx"},
                  "v5": {"nan": True}, "v6": {"parity_fail": True}}
        for v, fault in faults.items():
            producer("model-updates", snapshots(v, **fault).model_update())

        def refused() -> bool:
            text = c.get("/metrics").text
            return all(metric_value(text, "adloop_server_swaps_total", f'result="{s}"')
                       > metric_value(before, "adloop_server_swaps_total", f'result="{s}"')
                       for s in ("load", "checksum", "nan", "parity"))

        wait_for(refused, what="four refusals")
        r = c.post("/v1/recommend", json=REQ)
        assert r.status_code == 200 and r.json()["model_version"] == "v2"
        status = {v["version"]: v["status"] for v in c.get("/v1/models", headers=auth)
                  .json()["versions"]}
        assert all(status[v] == "failed" for v in faults)
        r = c.post("/v1/models/rollback", headers=auth)
        assert r.status_code == 200 and r.json()["serving"] == "v1", r.text
        assert c.post("/v1/recommend", json=REQ).json()["model_version"] == "v1"
        r = c.post("/v1/models/rollback", headers=auth, json={"version": "v5"})
        assert r.status_code == 409
        r = c.post("/v1/models/rollback", headers=auth, json={"version": "v2"})
        assert r.status_code == 200 and r.json()["serving"] == "v2"


def test_a_replayed_older_announcement_is_refused_as_stale(
        kafka: KafkaSettings, start_server: Start, snapshots: Builder, producer: Send) -> None:
    publish_ads(producer)
    v1 = snapshots("v1", data_watermark=100.0)
    producer("model-updates", v1.model_update())
    producer("model-updates", snapshots("v2", data_watermark=200.0).model_update())
    srv = start_server(kafka)
    with httpx.Client(base_url=srv.url, timeout=30) as c:
        wait_for(lambda: ready(c, "v2"), what="v2 ready")
        producer("model-updates", v1.model_update())          # the old announcement again
        wait_for(lambda: metric_value(c.get("/metrics").text, "adloop_server_swaps_total",
                                      'result="stale"') >= 1, what="a stale refusal")
        assert c.post("/v1/recommend", json=REQ).json()["model_version"] == "v2"


def test_continuous_requests_during_20_swaps_never_fail(
        kafka: KafkaSettings, start_server: Start, snapshots: Builder, producer: Send) -> None:
    publish_ads(producer)
    producer("model-updates", snapshots("s00").model_update())
    versions = [f"s{i:02d}" for i in range(1, 21)]
    built = [snapshots(v) for v in versions]
    srv = start_server(kafka)
    stop = threading.Event()
    results: list[tuple[int, str]] = []

    def hammer(worker: int) -> None:
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            i = 0
            while not stop.is_set():
                r = c.post("/v1/recommend", json={**REQ, "user_id": f"h{worker}-{i}"})
                results.append((r.status_code, r.json().get("model_version", "")))
                i += 1

    with httpx.Client(base_url=srv.url, timeout=30) as c:
        wait_for(lambda: ready(c, "s00"), what="ready")
        threads = [threading.Thread(target=hammer, args=(w,)) for w in range(3)]
        for t in threads:
            t.start()
        for snap in built:
            producer("model-updates", snap.model_update())
            wait_for(lambda v=snap.version: c.get("/readyz").json()["model_version"] == v,
                     what=f"swap to {snap.version}")
        # requests go on after the last swap until one was answered by it
        wait_for(lambda: any(v == versions[-1] for _, v in list(results)),
                 what=f"a request answered by {versions[-1]}")
        stop.set()
        for t in threads:
            t.join(30)
    codes = [code for code, _ in results]
    assert len(results) > 50
    assert set(codes) == {200}, f"failed requests: {[c for c in codes if c != 200][:5]}"
    assert {v for _, v in results} <= {"s00", *versions}
    assert len({v for _, v in results}) > 5


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_kafka_down_the_server_keeps_answering_and_counts_dropped_impressions(
        tmp_path: Path, start_server: Start, snapshots: Builder) -> None:
    down = KafkaSettings(bootstrap_servers=f"127.0.0.1:{_closed_port()}", topic_prefix="x.",
                         bootstrap_timeout_ms=2000)
    srv = start_server(down, snapshot=snapshots("v1").directory, impression_buffer=5)
    with httpx.Client(base_url=srv.url, timeout=30) as c:
        before = metric_value(c.get("/metrics").text, "adloop_server_impressions_dropped_total")
        started = time.perf_counter()
        for i in range(30):
            r = c.post("/v1/recommend", json={**REQ, "user_id": f"u{i}"})
            assert r.status_code == 200 and r.json()["model_version"] == "v1"
        assert time.perf_counter() - started < 10
        after = metric_value(c.get("/metrics").text, "adloop_server_impressions_dropped_total")
        assert after - before >= 30 - 5 - 1
        assert c.get("/readyz").json()["catalog_caught_up"] is False
