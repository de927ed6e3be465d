"""Serving replicas behind a real HAProxy (Debian's, installed by ``scripts/bootstrap``).

The configuration compose runs is the one this module renders and HAProxy accepts it;
a replica that refuses connections or answers 503 costs no request (it goes to another
replica); and with two real ``adloop serve`` processes following ``model-updates`` on
the shared broker, a rolling restart that makes the replicas swap to a new version at
different moments fails no request, while every response names the version and the
replica that served it.
"""

from __future__ import annotations

import http.server
import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from adloop.balancer import (
    COMPOSE,
    REPLICA_HEADER,
    Balancer,
    Replica,
    check_config,
    render_config,
)
from adloop.stack import LocalStack, free_port
from streams.kafka_io import EventProducer
from streams.settings import KafkaSettings
from tests.server.conftest import AD_IDS, publish_ads
from tests.support.snapshots import BuiltSnapshot, SnapshotSpec, build_snapshot

ROOT = Path(__file__).resolve().parents[2]
REQ = {"user_id": "u-1", "context": {"device": "ios"}, "recent_ad_ids": ["ad-0001"], "k": 5}


def _until(what: str, predicate: Callable[[], Any], limit_s: float = 60.0) -> Any:
    """Poll until ``predicate`` holds (the limit only keeps a broken run from hanging)."""
    deadline = time.monotonic() + limit_s
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.05)
    return value


def test_compose_runs_the_rendered_haproxy_config_and_haproxy_accepts_it() -> None:
    path = ROOT / "deploy" / "haproxy" / "haproxy.cfg"
    assert path.read_text() == render_config(COMPOSE), \
        "regenerate with: python -m adloop.balancer > deploy/haproxy/haproxy.cfg"
    check_config(path)


def test_a_config_without_replicas_or_with_a_name_twice_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one replica"):
        render_config(COMPOSE.__class__(replicas=()))
    with pytest.raises(ValueError, match="unique"):
        render_config(COMPOSE.__class__(replicas=(Replica("a", "h:1"), Replica("a", "h:2"))))


def test_the_stack_puts_haproxy_on_the_server_url_only_for_more_than_one_replica(
        tmp_path: Path) -> None:
    one = LocalStack(tmp_path / "one", bootstrap_servers="127.0.0.1:1")   # nothing started
    assert one.add_servers(["--x"], 1, 8123, tmp_path / "cache") == ["serve"]
    assert set(one.processes) == {"serve"} and one.balancer is None
    assert one.processes["serve"].ready_url == "http://127.0.0.1:8123/readyz"

    three = LocalStack(tmp_path / "three", bootstrap_servers="127.0.0.1:1")
    names = three.add_servers(["--x"], 3, 8124, tmp_path / "cache")
    assert names == ["serve-1", "serve-2", "serve-3"]
    assert list(three.processes) == [*names, "lb"] and three.balancer is not None
    assert three.balancer.url == "http://127.0.0.1:8124"
    ports = {str(three.processes[n].ready_url).rsplit(":", 1)[1] for n in names}
    assert len(ports) == 3 and "8124/readyz" not in ports
    config = three.balancer.config_path.read_text()
    for n in names:
        argv = three.processes[n].argv
        assert argv[argv.index("--server-id") + 1] == n
        assert argv[argv.index("--cache-dir") + 1] == str(tmp_path / "cache" / n)
        assert f"server {n} 127.0.0.1:" in config
    with pytest.raises(ValueError, match=">= 1"):
        three.add_servers([], 0, 8125, tmp_path / "cache")


# -- stub replicas: HAProxy's behaviour without model servers ---------------------------


class _Stub(http.server.ThreadingHTTPServer):
    name: str
    recommend_status: int
    delay_s: float = 0.0
    received: threading.Event   # set when a POST arrived (before its delay)


class _StubHandler(http.server.BaseHTTPRequestHandler):
    server: _Stub
    protocol_version = "HTTP/1.1"

    def _answer(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self._answer(200, {"ready": True})

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.server.received.set()
        time.sleep(self.server.delay_s)   # a slow replica on purpose, not a wait
        self._answer(self.server.recommend_status, {"server_id": self.server.name})

    def log_message(self, *_args: Any) -> None:
        pass


@contextmanager
def _stub(name: str, recommend_status: int = 200) -> Iterator[_Stub]:
    srv = _Stub(("127.0.0.1", 0), _StubHandler)
    srv.name, srv.recommend_status = name, recommend_status
    srv.received = threading.Event()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()


@contextmanager
def _balancer(tmp_path: Path, *stubs: _Stub) -> Iterator[Balancer]:
    lb = Balancer(tmp_path / "lb", free_port(), check_interval_ms=3000, replicas=[
        Replica(s.name, f"127.0.0.1:{s.server_address[1]}") for s in stubs])
    lb.start()
    try:
        lb.wait_replicas([s.name for s in stubs])
        yield lb
    finally:
        lb.stop()


def test_requests_to_a_replica_that_just_went_away_are_answered_by_another(
        tmp_path: Path) -> None:
    with _stub("a") as a, _stub("b") as b, _balancer(tmp_path, a, b) as lb:
        b.shutdown()
        b.server_close()           # refuses connections; HAProxy still has it in rotation
        assert lb.replica_states()["b"].startswith("UP")
        with httpx.Client(base_url=lb.url, timeout=10) as client:
            answers = [client.post("/v1/recommend", json=REQ) for _ in range(20)]
        assert [r.status_code for r in answers] == [200] * 20
        assert {r.json()["server_id"] for r in answers} == {"a"}
        assert {r.headers[REPLICA_HEADER] for r in answers} == {"a"}
        _until("b out of the rotation", lambda: lb.replica_states()["b"].startswith("DOWN"), 10)


def test_a_503_from_one_replica_is_retried_on_another(tmp_path: Path) -> None:
    with _stub("ready") as ok, _stub("not-ready", recommend_status=503) as bad, \
            _balancer(tmp_path, ok, bad) as lb, httpx.Client(base_url=lb.url, timeout=10) as c:
        answers = [c.post("/v1/recommend", json=REQ) for _ in range(20)]
    assert [r.status_code for r in answers] == [200] * 20
    assert {r.headers[REPLICA_HEADER] for r in answers} == {"ready"}


def test_stopping_the_balancer_lets_the_request_in_flight_finish_and_exits_0(
        tmp_path: Path) -> None:
    with _stub("slow") as slow:
        slow.delay_s = 1.0
        lb = Balancer(tmp_path / "lb", free_port(), [
            Replica("slow", f"127.0.0.1:{slow.server_address[1]}")]).start()
        answer: list[httpx.Response] = []
        sender = threading.Thread(target=lambda: answer.append(
            httpx.post(f"{lb.url}/v1/recommend", json=REQ, timeout=10)))
        sender.start()
        assert slow.received.wait(10), "the request never reached the replica"
        assert lb.process.stop() == 0
        sender.join(10)
    assert [r.status_code for r in answer] == [200]
    assert answer[0].json()["server_id"] == "slow"


# -- two real replicas on the shared broker ---------------------------------------------


@dataclass(frozen=True)
class Answer:
    sent: float
    received: float
    status: int | str
    version: str | None = None
    server_id: str | None = None
    replica: str | None = None


class Client:
    """Threads that send POST /v1/recommend through the balancer back to back."""

    def __init__(self, url: str, threads: int = 2) -> None:
        self.url = url
        self.answers: list[Answer] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True)
                         for _ in range(threads)]

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as client:
            while not self._stop.is_set():
                sent = time.monotonic()
                try:
                    r = client.post("/v1/recommend", json=REQ)
                except httpx.HTTPError as exc:
                    self.answers.append(Answer(sent, time.monotonic(), type(exc).__name__))
                    continue
                body = r.json() if r.status_code == 200 else {}
                self.answers.append(Answer(sent, time.monotonic(), r.status_code,
                                           body.get("model_version"), body.get("server_id"),
                                           r.headers.get(REPLICA_HEADER)))

    def count(self, version: str, replica: str, after: float = 0.0) -> int:
        return sum(1 for a in list(self.answers)
                   if a.version == version and a.replica == replica and a.sent >= after)

    def __enter__(self) -> Client:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(60)


def _serving(url: str) -> str | None:
    try:
        r = httpx.get(f"{url}/readyz", timeout=5)
    except httpx.HTTPError:
        return None
    return r.json().get("model_version") if r.status_code == 200 else None


@pytest.mark.kafka
def test_a_rolling_restart_swaps_replicas_at_different_moments_without_a_failed_request(
        tmp_path: Path, kafka: KafkaSettings) -> None:
    store = tmp_path / "store"

    def snapshot(version: str) -> BuiltSnapshot:
        spec = SnapshotSpec(version=version, ad_ids=AD_IDS, seed=len(version) + ord(version[-1]))
        return build_snapshot(store / version, spec)

    v1, v2 = snapshot("v1"), snapshot("v2")
    producer = EventProducer(kafka)
    stack = LocalStack(tmp_path / "stack", kafka.bootstrap_servers, kafka.topic_prefix)

    def announce(snap: BuiltSnapshot) -> None:   # signed with the stack's key
        update = snap.model_update(key=stack.keyring.signing_key())
        producer.send("model-updates", update).get(timeout=30)

    publish_ads(lambda topic, rec: producer.send(topic, rec).get(timeout=30))
    announce(v1)
    port = free_port()
    names = stack.add_servers(
        [*stack.kafka_args(), "--intra-op-threads", "1", "--beam-schedule", "8,8,8",
         "--max-batch-size", "8", "--slo-ms", "2000", "--no-dynamic-beams",
         "--snapshot-bases", str(store)],
        2, port, tmp_path / "server-cache")
    assert names == ["serve-1", "serve-2"] and stack.balancer is not None
    lb, b = stack.balancer, stack.processes["serve-2"]
    url = {name: str(stack.processes[name].ready_url).removesuffix("/readyz") for name in names}
    try:
        for proc in stack.processes.values():
            proc.start()
        for proc in stack.processes.values():
            proc.wait_ready(180)
        lb.wait_replicas(names)
        assert lb.url == f"http://127.0.0.1:{port}" and _serving(lb.url) == "v1"
        with Client(lb.url) as client:
            _until("both replicas serve v1", lambda: min(
                client.count("v1", "serve-1"), client.count("v1", "serve-2")) >= 10)
            # rolling restart: serve-2 goes down, v2 is announced, serve-1 swaps under the
            # whole load; serve-2 comes back later and starts on v2
            b.stop()
            announce(v2)
            _until("serve-1 on v2", lambda: _serving(url["serve-1"]) == "v2")
            a_swapped = time.monotonic()
            _until("serve-1 answers v2", lambda: client.count("v2", "serve-1") >= 10)
            assert client.count("v1", "serve-2", after=a_swapped) == 0
            b.start().wait_ready(180)
            assert _serving(url["serve-2"]) == "v2"
            lb.wait_replicas(names)
            both_swapped = time.monotonic()
            _until("serve-2 answers v2 after its restart",
                   lambda: client.count("v2", "serve-2", after=both_swapped) >= 10)
            _until("serve-1 answers v2 after both swapped",
                   lambda: client.count("v2", "serve-1", after=both_swapped) >= 10)
        answers = client.answers
    finally:
        stack.stop()
        producer.close()

    failed = [x for x in answers if x.status != 200]
    assert not failed, f"{len(failed)} of {len(answers)} requests failed: {failed[:5]}"
    assert {x.version for x in answers} == {"v1", "v2"}
    # the balancer's replica and the body's server id agree on every response
    assert all(x.replica == x.server_id and x.replica in names for x in answers)
    # serve-1 swapped first: its first v2 answer came before serve-2 answered anything v2
    first_v2 = {n: min(x.received for x in answers if x.version == "v2" and x.replica == n)
                for n in names}
    assert first_v2["serve-1"] < first_v2["serve-2"]
    # each response names the version of the replica that served it: once a replica
    # answered v2, no request sent to it afterwards was answered by v1
    for n in names:
        late_v1 = [x for x in answers if x.replica == n and x.version == "v1"
                   and x.sent > first_v2[n]]
        assert not late_v1, f"{n} answered v1 after it had answered v2: {late_v1[:3]}"
    after = [x for x in answers if x.sent >= both_swapped]
    assert after and {x.version for x in after} == {"v2"}
    assert {x.replica for x in after} == set(names)
