"""The open-loop traffic driver against a real HTTP server on loopback and a real broker.

The server here is a tiny FastAPI app served by uvicorn that implements the
``POST /v1/recommend`` contract with a simple ranking (the real serving worker lives
in ``server/``); it can shed (429), refuse (503) or answer slowly on demand.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from prometheus_client import REGISTRY

from streams.kafka_io import EventProducer, read_all
from streams.settings import KafkaSettings
from traffic.driver import (
    Emitter,
    HttpOptions,
    Ledger,
    OraclePolicy,
    ServedSlate,
    TrafficDriver,
)
from traffic.recorded import read_recorded
from traffic.world import Request, World, WorldConfig

ROOT = Path(__file__).resolve().parents[2]


class ToyServer:
    """A real HTTP recommend server on 127.0.0.1 (uvicorn in a thread)."""

    def __init__(self, ad_ids: list[str], *, shed_every: int = 0, slow_every: int = 0,
                 delay_s: float = 0.0, unavailable: bool = False) -> None:
        self.ad_ids = sorted(ad_ids)
        self.bodies: list[dict[str, Any]] = []
        self.shed_every, self.slow_every, self.delay_s = shed_every, slow_every, delay_s
        self.unavailable = unavailable
        app = FastAPI()
        app.post("/v1/recommend")(self.recommend)
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._sock]},
                                       daemon=True)

    async def recommend(self, body: dict[str, Any]) -> Any:
        self.bodies.append(body)
        n = len(self.bodies)
        if self.unavailable:
            return JSONResponse({"error": "no model loaded"}, status_code=503)
        if self.shed_every and n % self.shed_every == 0:
            return JSONResponse({"error": "overloaded"}, status_code=429)
        if self.delay_s and (not self.slow_every or n % self.slow_every == 0):
            await asyncio.sleep(self.delay_s)   # a slow answer on purpose, not a wait
        k = int(body["k"])

        def score(ad_id: str) -> float:  # a simple, user-dependent ranking
            h = hashlib.blake2b(f"{body['user_id']}|{ad_id}".encode(), digest_size=4).digest()
            return int.from_bytes(h, "little") / 2**32

        ranked = sorted(self.ad_ids, key=lambda a: (-score(a), a))[:k]
        return {"request_id": body.get("request_id"), "model_version": "toy-1",
                "ads": [{"ad_id": a, "score": score(a), "expected_value": 0.01 * score(a),
                         "position": i, "semantic_id": [i, 1, 2]}
                        for i, a in enumerate(ranked)],
                "beam_widths": [k]}

    def __enter__(self) -> ToyServer:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        assert self.server.started
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def _world(seed: int = 1) -> World:
    return World(WorldConfig(seed=seed, n_users=100, n_ads=40))


def _sample(name: str, labels: dict[str, str] | None = None) -> float:
    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


def test_open_loop_run_serves_slates_and_produces_feedback(kafka: KafkaSettings,
                                                           tmp_path: Path) -> None:
    world = _world()
    producer = EventProducer(kafka)
    ledger = Ledger(tmp_path / "ledger.jsonl")
    driver = TrafficDriver(world, Emitter(producer, ledger=ledger))
    ok_before = _sample("adloop_traffic_requests_total", {"outcome": "ok"})
    with ToyServer([a.ad_id for a in world.initial_ads()]) as server:
        stats = asyncio.run(driver.run_http(HttpOptions(
            server_url=server.url, rate=100.0, speed=600.0, duration_s=2.0)))
    producer.flush(30)
    producer.close()
    ledger.close()
    assert 120 < stats.requests < 290 and stats.outcomes["ok"] == stats.requests, stats
    assert _sample("adloop_traffic_requests_total", {"outcome": "ok"}) - ok_before == \
        stats.requests
    # the server got the contract's body, stamped with simulated event time
    body = server.bodies[0]
    assert set(body) == {"user_id", "context", "recent_ad_ids", "k", "request_id", "event_time",
                         "recent_organic"}
    assert world.config.start_time <= body["event_time"] <= stats.sim_end
    assert stats.clicks > 0 and stats.pending_left == 0
    # everything the ledger says was produced is in Kafka, and nothing else
    entries = [json.loads(x) for x in (tmp_path / "ledger.jsonl").read_text().splitlines()]
    # requests cover the 2 wall seconds x600 of simulated time, and none is sent after it
    # (the clock keeps running while the last answers come back, so sim_end may be later)
    sent_at = [e["t"] for e in entries if e["kind"] == "request"]
    assert max(sent_at) - stats.sim_start <= 1200 < stats.sim_end - stats.sim_start + 120
    want_clicks = {e["event_id"] for e in entries if e["kind"] == "click"}
    want_convs = {e["event_id"] for e in entries if e["kind"] == "conversion"}
    assert len(want_clicks) == stats.clicks and len(want_convs) == stats.conversions
    got_clicks = read_all(kafka, "clicks", timeout_s=30, expect=len(want_clicks))
    assert {r.record.event_id for r in got_clicks} == want_clicks
    got_convs = read_all(kafka, "conversions", timeout_s=30, expect=len(want_convs))
    assert {r.record.event_id for r in got_convs} == want_convs
    ads = read_all(kafka, "ads", timeout_s=30, expect=stats.produced["ads"])
    assert len(ads) == stats.produced["ads"] >= 40
    assert sum(1 for e in entries if e["kind"] == "request") == stats.requests


def test_shed_timeouts_and_unavailable_are_counted_separately() -> None:
    world = _world(2)
    ids = [a.ad_id for a in world.initial_ads()]
    with ToyServer(ids, shed_every=3, slow_every=5, delay_s=1.0) as server:
        stats = asyncio.run(TrafficDriver(world, Emitter()).run_http(HttpOptions(
            server_url=server.url, rate=60.0, speed=60.0, n_requests=40, timeout_s=0.3)))
    assert stats.requests == 40
    assert stats.outcomes["shed"] >= 10 and stats.outcomes["timeout"] >= 3
    assert stats.outcomes["ok"] >= 15
    assert sum(stats.outcomes.values()) == 40
    with ToyServer(ids, unavailable=True) as server:
        stats = asyncio.run(TrafficDriver(_world(2), Emitter()).run_http(HttpOptions(
            server_url=server.url, rate=200.0, n_requests=10)))
    assert stats.outcomes == {"unavailable": 10} and stats.impressions == 0


def test_unreachable_server_is_counted_not_a_crash() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"  # bound, not listening
        before = _sample("adloop_traffic_requests_total", {"outcome": "unreachable"})
        runs = [asyncio.run(TrafficDriver(_world(3), Emitter()).run_http(HttpOptions(
            server_url=dead, rate=300.0, n_requests=30))) for _ in range(2)]
    assert runs[0].outcomes == {"unreachable": 30}
    assert _sample("adloop_traffic_requests_total", {"outcome": "unreachable"}) - before == 60
    # the request stream depends only on the seed, not on the server
    assert runs[0].requests_sha256 == runs[1].requests_sha256
    assert runs[0].produced == {"ads": 40, "organic-items": 32 * 8}


def test_open_loop_keeps_sending_while_answers_are_slow() -> None:
    world = _world(4)
    with ToyServer([a.ad_id for a in world.initial_ads()], delay_s=0.6) as server:
        t0 = time.monotonic()
        stats = asyncio.run(TrafficDriver(world, Emitter()).run_http(HttpOptions(
            server_url=server.url, rate=40.0, duration_s=1.0, timeout_s=2.0)))
        wall = time.monotonic() - t0
    # a closed-loop client would manage ~2 requests in 1 s at 0.6 s each
    assert stats.requests >= 20 and stats.outcomes["ok"] == stats.requests
    assert wall < 2.5
    assert _sample("adloop_traffic_request_latency_seconds_count") >= stats.requests


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ok_requests(body: str) -> float:
    """``adloop_traffic_requests_total{outcome="ok"}`` in a Prometheus text body."""
    for line in body.splitlines():
        if line.startswith('adloop_traffic_requests_total{outcome="ok"} '):
            return float(line.split()[-1])
    return 0.0


def test_cli_run_exposes_metrics_and_stops_cleanly_on_sigterm(
        kafka: KafkaSettings, tmp_path: Path) -> None:
    world = _world(0)
    port = _free_port()
    rec, led = tmp_path / "rec.jsonl", tmp_path / "ledger.jsonl"
    with ToyServer([a.ad_id for a in world.initial_ads()]) as server:
        proc = subprocess.Popen(
            [sys.executable, "-m", "adloop", "replay", "--server-url", server.url,
             "--seed", "0", "--n-users", "100", "--n-ads", "40", "--rate", "50",
             "--speed", "120", "--metrics-port", str(port), "--record", str(rec),
             "--ledger", str(led), "--bootstrap-servers", kafka.bootstrap_servers,
             "--topic-prefix", kafka.topic_prefix],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "ADLOOP_LOG_JSON": "1"})
        try:
            body = ""
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:   # until more than 10 answers came back
                try:
                    body = urllib.request.urlopen(
                        f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
                except OSError:
                    body = ""
                if _ok_requests(body) > 10:
                    break
                time.sleep(0.3)
            assert _ok_requests(body) > 10, body[-2000:]
            assert "adloop_traffic_sim_time_seconds" in body
            assert urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz").status == 200
            proc.send_signal(signal.SIGTERM)
            out, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 0, err[-3000:]
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["mode"] == "http" and summary["outcomes"]["ok"] > 10
    assert summary["pending_left"] == 0
    kinds = {e.kind for e in read_recorded(rec, "stop")}
    assert {"ad", "request", "impression"} <= kinds
    ledger_kinds = {json.loads(x)["kind"] for x in led.read_text().splitlines()}
    assert {"request", "ad"} <= ledger_kinds
    got = read_all(kafka, "clicks", timeout_s=30, expect=summary["clicks"])
    assert len(got) == summary["clicks"]


def test_a_shadow_policy_is_scored_against_the_world_its_requests_saw() -> None:
    world = World(WorldConfig(seed=12, n_users=100, n_ads=40))
    driver = TrafficDriver(world, Emitter())
    driver.keep_responses = True
    oracle = OraclePolicy(world)
    served: dict[str, list[str]] = {}

    class Recording:
        name = "oracle"

        def recommend(self, request: Request) -> ServedSlate:
            slate = oracle.recommend(request)
            served[request.request_id] = slate.ad_ids()
            return slate

    asked: list[int] = []

    def shadow(reqs: list[Request]) -> list[list[str]]:   # answers with the served slates
        asked.append(len(reqs))
        return [served[r.request_id] for r in reqs]

    driver.shadow = shadow
    driver.shadow_batch, driver.shadow_chunk = 40, 16
    stats = driver.run_inprocess(Recording(), 100)
    driver.flush_shadow()
    assert asked == [16, 16, 8] * 2 + [16, 4]      # flushed per 40 in chunks, then the rest
    assert stats.impressions == 500                 # the shadow served nothing
    for resp in driver.responses:
        # scored after later requests changed the world (fatigue, budgets), yet worth
        # exactly what the served slate was worth when its request came in
        value, impressions = driver.shadow_values[resp.request_id]
        assert impressions == resp.impressions
        assert math.isclose(value, resp.expected_value, rel_tol=1e-6)   # float32 tables
