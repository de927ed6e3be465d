"""Serving worker under open-loop load: fixed vs dynamic beams, and RSS across swaps.

An embedded Kafka broker carries the ``ads`` catalog and ``model-updates``; the
server runs as its own process (``adloop serve``) exactly as deployed, and the load
generator sends ``POST /v1/recommend`` at a fixed rate regardless of completions
(open loop: latency counts from the scheduled send time, so a slow server cannot
slow the load down). For each rate: throughput, p50/p99 latency, refusals (429).
A rate is *within SLO* when p99 ≤ SLO and ≥ 99% of requests were answered 200.

Then, with the dynamic server under steady load, ``--swaps`` (500) snapshot versions
are published to ``model-updates`` one at a time, after a warm-up of 10 swaps; the
server's RSS is read from /proc after every swap and every non-200 response is
counted. A leak grows linearly with the swaps, allocator warm-up levels off: the
least-squares slope over the second half of the swaps (KiB per swap) tells them
apart, next to the growth ratio after 100 swaps.

Then 1 vs 2 replicas at the same SLO in the same run: two ``adloop serve`` processes
behind HAProxy (``adloop.balancer``), one balancer in front of one of them and one in
front of both, rates interleaved (``max_rate_2_replicas_over_1``); and rolling swaps
through the 2-replica balancer under load: versions announced while both replicas
follow ``model-updates`` (each swaps at its own moment), then a rolling restart with a
version announced while each replica is down. Every answer is checked: none may fail,
each names a version that was announced, and no replica answers an older version
after it answered a newer one.

    python bench/serve.py [--quick] [--provider auto|cpu|cuda]
    python bench/serve.py --swaps-only [--swaps 500]   # only the swap-memory run; merges
                                                        # its keys into bench/results/serve.json
    python bench/serve.py --replicas-only [--quick]     # only replicas and rolling swaps;
                                                        # merges likewise
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx
import numpy as np

from bench.common import ROOT, markdown_table, update_doc_section, write_results
from snapshot_format import sha256_hex
from streams.broker import BrokerSettings, EmbeddedBroker
from streams.kafka_io import EventProducer
from streams.schemas import ModelUpdate
from streams.settings import KafkaSettings
from streams.signing import sign_update
from streams.topics import create_topics
from tests.support.snapshots import (
    TEST_KEY_ID,
    TEST_KEYRING,
    TEST_SECRET,
    BuiltSnapshot,
    SnapshotSpec,
    build_snapshot,
    make_ads,
)

DEPENDS = ("server/", "snapshot_format/", "streams/", "adloop/__init__.py", "adloop/__main__.py",
           "adloop/cli.py", "adloop/balancer.py", "adloop/stack.py", "deploy/kafka/",
           "tests/__init__.py", "tests/support/", "bench/serve.py")

MODEL = dict(level_sizes=(64, 64, 64, 16), n_ads=5000, d_model=256, mlp_hidden=1024,
             history_len=20)
SCHEDULE = "64,64,32,32"
SWAP_RATE = 10.0
ROLLING_RATE = 20.0


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def clone_version(base: BuiltSnapshot, root: Path, version: str, parent: str) -> ModelUpdate:
    """Same ONNX files, a new version: a fresh manifest (and sha256) per version."""
    d = root / version
    d.mkdir(parents=True, exist_ok=True)
    for name in base.manifest["files"]:
        os.link(base.directory / name, d / name)
    manifest = {**base.manifest, "version": version, "parent": parent,
                "created_time": time.time()}
    data = json.dumps(manifest).encode()
    (d / "manifest.json").write_bytes(data)
    return sign_update(ModelUpdate(model_name="adloop", version=version, parent=parent,
                                   sha256=sha256_hex(data), uri=d.as_uri(),
                                   id_space_version=str(manifest["id_space_version"]),
                                   data_watermark=time.time(), created_time=time.time()),
                       TEST_KEY_ID, TEST_SECRET)


class Server:
    def __init__(self, kafka: KafkaSettings, cache: Path, provider: str, dynamic: bool,
                 slo_ms: float, threads: int, name: str | None = None) -> None:
        self.port = _free_port()
        self.name = name or f"bench-{self.port}"
        self.cmd = [sys.executable, "-m", "adloop", "serve", "--port", str(self.port),
                    "--bootstrap-servers", kafka.bootstrap_servers,
                    "--topic-prefix", kafka.topic_prefix, "--cache-dir", str(cache),
                    "--provider", provider, "--beam-schedule", SCHEDULE,
                    "--slo-ms", str(slo_ms), "--intra-op-threads", str(threads),
                    "--max-batch-size", "16", "--max-wait-ms", "2", "--keep-versions", "3",
                    "--server-id", self.name, "--snapshot-bases", str(cache.parent / "store"),
                    "--dynamic-beams" if dynamic else "--no-dynamic-beams"]
        self.url = f"http://127.0.0.1:{self.port}"
        self.start()

    def start(self) -> None:
        """Start the process (again, after :meth:`stop`: same port, cache and id)."""
        env = {**os.environ, "ADLOOP_LOG_LEVEL": "WARNING",
               "ADLOOP_SERVER_UPDATE_KEYS": TEST_KEYRING}   # clone_version signs with it
        self.proc = subprocess.Popen(self.cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)

    def serving(self) -> str | None:
        """The version ``/readyz`` names; None while not ready."""
        try:
            r = httpx.get(self.url + "/readyz", timeout=5)
        except httpx.HTTPError:
            return None
        return str(r.json()["model_version"]) if r.status_code == 200 else None

    def wait_ready(self, timeout_s: float = 120) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}")
            try:
                r = httpx.get(self.url + "/readyz", timeout=2)
                if r.status_code == 200:
                    body: dict[str, Any] = r.json()
                    return body
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("server not ready")

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def metric(self, name: str) -> float:
        text = httpx.get(self.url + "/metrics", timeout=10).text
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def _payload(i: int, ad_ids: list[str], rng: np.random.Generator) -> dict[str, Any]:
    recent = [ad_ids[j] for j in rng.integers(0, len(ad_ids), 8)]
    return {"user_id": f"u{i % 5000}", "k": 10, "recent_ad_ids": recent,
            "context": {"device": ("ios", "android", "web")[i % 3], "placement": "feed",
                        "hour": str(i % 24), "region": f"r{i % 11}"}}


async def open_loop(url: str, rate: float, seconds: float, ad_ids: list[str],
                    seed: int = 0) -> dict[str, Any]:
    """Send ``rate`` req/s for ``seconds`` on schedule; latency from the scheduled time."""
    rng = np.random.default_rng(seed)
    n = int(rate * seconds)
    payloads = [_payload(i, ad_ids, rng) for i in range(n)]
    latencies: list[float] = []
    codes: dict[str, int] = {}
    widths: list[int] = []
    limits = httpx.Limits(max_connections=512, max_keepalive_connections=512)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:
        start = time.perf_counter() + 0.05

        async def one(i: int) -> None:
            due = start + i / rate
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            try:
                r = await client.post("/v1/recommend", json=payloads[i])
                code = str(r.status_code)
                if r.status_code == 200:
                    latencies.append(time.perf_counter() - due)
                    widths.append(sum(r.json()["beam_widths"]))
            except httpx.HTTPError as exc:
                code = type(exc).__name__
            codes[code] = codes.get(code, 0) + 1

        await asyncio.gather(*(one(i) for i in range(n)))
        elapsed = time.perf_counter() - start
    ok = codes.get("200", 0)
    lat = np.array(latencies) * 1000 if latencies else np.array([np.inf])
    return {"rate": rate, "sent": n, "ok": ok, "codes": codes,
            "throughput_rps": ok / elapsed, "p50_ms": float(np.percentile(lat, 50)),
            "p99_ms": float(np.percentile(lat, 99)),
            "mean_beam_width_sum": float(np.mean(widths)) if widths else 0.0}


def measure(url: str, rate: float, seconds: float, ad_ids: list[str], slo_ms: float,
            label: str) -> dict[str, Any]:
    row = asyncio.run(open_loop(url, rate, seconds, ad_ids))
    row["within_slo"] = bool(row["p99_ms"] <= slo_ms and row["ok"] >= 0.99 * row["sent"])
    print(f"  {label:7s} rate {rate:5.0f}/s  ok {row['ok']}/{row['sent']}  "
          f"p50 {row['p50_ms']:7.1f} ms  p99 {row['p99_ms']:8.1f} ms  "
          f"beams {row['mean_beam_width_sum']:.0f}  {row['codes']}", flush=True)
    time.sleep(0.5)
    return row


def max_rate(rows: list[dict[str, Any]]) -> float:
    """The highest rate within SLO with every lower rate within SLO too."""
    best = 0.0
    for row in rows:
        if not row.get("within_slo"):
            break
        best = row["rate"]
    return best


async def _open_loop(one: Callable[[int], Coroutine[Any, Any, None]], rate: float,
                     stop: asyncio.Event) -> None:
    """Start ``one(i)`` at ``rate`` per second until ``stop``, then await every one."""
    tasks: set[asyncio.Task[None]] = set()
    i = 0
    while not stop.is_set():
        t = asyncio.get_running_loop().create_task(one(i))
        tasks.add(t)
        t.add_done_callback(tasks.discard)
        i += 1
        await asyncio.sleep(1.0 / rate)
    await asyncio.gather(*tasks)


async def _steady(url: str, rate: float, stop: asyncio.Event, ad_ids: list[str],
                  out: dict[str, Any]) -> None:
    rng = np.random.default_rng(7)
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:
        async def one(i: int) -> None:
            try:
                r = await client.post("/v1/recommend", json=_payload(i, ad_ids, rng))
                key = str(r.status_code)
                if r.status_code == 200:
                    out["versions"].add(r.json()["model_version"])
            except httpx.HTTPError as exc:
                key = type(exc).__name__
            out["codes"][key] = out["codes"].get(key, 0) + 1

        await _open_loop(one, rate, stop)


def slope_per_swap(rss: list[int]) -> float:
    """Least-squares slope of RSS over swap number, bytes per swap."""
    if len(rss) < 2:
        return 0.0
    x = np.arange(len(rss), dtype=np.float64)
    return float(np.polyfit(x, np.asarray(rss, dtype=np.float64), 1)[0])


def swap_memory(rss: list[int]) -> dict[str, Any]:
    """Growth figures from RSS after each swap (``rss[0]``: after the warm-up swaps)."""
    n = len(rss) - 1
    half = rss[len(rss) // 2:]
    at100 = rss[min(100, n)]
    return {
        "swaps": n,
        "rss_growth_ratio_100_swaps": at100 / rss[0],
        "rss_growth_ratio_all_swaps": rss[-1] / rss[0],
        "rss_slope_kib_per_swap": slope_per_swap(half) / 1024,
        "rss_slope_kib_per_swap_first_half": slope_per_swap(rss[:len(rss) // 2 + 1]) / 1024,
        "rss_mib_at": {str(i): round(rss[i] / 2**20, 1)
                       for i in sorted({0, min(50, n), min(100, n), n // 2, n})},
    }


def swap_rss(server: Server, producer: EventProducer, base: BuiltSnapshot, store: Path,
             n_swaps: int, warm: int, ad_ids: list[str], rate: float) -> dict[str, Any]:
    out: dict[str, Any] = {"codes": {}, "versions": set()}
    published = [base.version]
    rss: list[int] = []

    def publish(count: int, record: bool = False) -> None:
        ok0 = server.metric('adloop_server_swaps_total{result="ok"}')
        for _ in range(count):
            v = f"v{len(published):06d}"
            producer.send("model-updates", clone_version(base, store, v, published[-1]))
            published.append(v)
            producer.flush()
            deadline = time.monotonic() + 60
            while server.metric('adloop_server_swaps_total{result="ok"}') < ok0 + 1:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"swap to {v} did not happen")
                time.sleep(0.02)
            ok0 += 1
            if record:
                rss.append(server.rss_bytes())

    async def run() -> dict[str, Any]:
        stop = asyncio.Event()
        load = asyncio.create_task(_steady(server.url, rate, stop, ad_ids, out))
        await asyncio.to_thread(publish, warm)
        await asyncio.sleep(1.0)
        rss.append(server.rss_bytes())
        t0 = time.perf_counter()
        await asyncio.to_thread(publish, n_swaps, True)
        swap_s = time.perf_counter() - t0
        await asyncio.sleep(1.0)
        rss1 = server.rss_bytes()
        stop.set()
        await load
        return {"rss_before_bytes": rss[0], "rss_after_bytes": rss1, "swap_seconds": swap_s}

    res = asyncio.run(run())
    failed = sum(v for k, v in out["codes"].items() if k != "200")
    unknown = sorted(set(out["versions"]) - set(published))
    return {**res, **swap_memory(rss), "warmup_swaps": warm,
            "rss_after_each_swap_bytes": rss,
            "requests_during_swaps": sum(out["codes"].values()),
            "failed_requests_during_swaps": failed, "codes_during_swaps": out["codes"],
            "unknown_versions_served": unknown}


# -- replicas behind HAProxy ----------------------------------------------------------


async def _steady_log(url: str, rate: float, stop: asyncio.Event, ad_ids: list[str],
                      out: list[tuple[float, float, str, str | None, str | None]]) -> None:
    """Steady load; every answer as (sent, received, status, model_version, server_id)."""
    rng = np.random.default_rng(11)
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:
        async def one(i: int) -> None:
            sent = time.monotonic()
            try:
                r = await client.post("/v1/recommend", json=_payload(i, ad_ids, rng))
            except httpx.HTTPError as exc:
                out.append((sent, time.monotonic(), type(exc).__name__, None, None))
                return
            body = r.json() if r.status_code == 200 else {}
            out.append((sent, time.monotonic(), str(r.status_code), body.get("model_version"),
                        body.get("server_id")))

        await _open_loop(one, rate, stop)


def _wait(what: str, predicate: Any, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out: {what}")
        time.sleep(0.05)


def rolling_swaps(lb: Any, replicas: list[Server], producer: EventProducer, base: BuiltSnapshot,
                  store: Path, ad_ids: list[str], rate: float, swaps: int) -> dict[str, Any]:
    """Under steady load through ``lb``: ``swaps`` versions announced one after another
    (each replica follows ``model-updates`` on its own and swaps when it is ready), then a
    rolling restart of every replica with a version announced while it is down (the
    others swap first; it starts on the new version). Every answer is checked."""
    answers: list[tuple[float, float, str, str | None, str | None]] = []
    current = replicas[0].serving()
    assert current is not None
    order = [current]

    def announce() -> str:
        v = f"rolling-{len(order):04d}"
        producer.send("model-updates", clone_version(base, store, v, order[-1]))
        producer.flush()
        order.append(v)
        return v

    gaps: list[float] = []

    def scenario() -> None:
        for _ in range(swaps):
            v = announce()
            swapped: dict[str, float] = {}     # replica -> when /readyz first named v
            deadline = time.monotonic() + 120
            while len(swapped) < len(replicas):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"timed out: every replica on {v}")
                for r in replicas:
                    if r.name not in swapped and r.serving() == v:
                        swapped[r.name] = time.monotonic()
                time.sleep(0.005)
            gaps.append(max(swapped.values()) - min(swapped.values()))
            time.sleep(0.3)
        for down in replicas:
            down.stop()
            v = announce()
            _wait(f"the others on {v}", lambda v=v, down=down: all(
                r.serving() == v for r in replicas if r is not down))
            time.sleep(0.5)
            down.start()
            down.wait_ready()
            _wait(f"{down.name} on {v}", lambda v=v, down=down: down.serving() == v)
            lb.wait_replicas([r.name for r in replicas])
            time.sleep(0.5)

    async def run() -> float:
        stop = asyncio.Event()
        load = asyncio.create_task(_steady_log(lb.url, rate, stop, ad_ids, answers))
        await asyncio.sleep(1.0)
        t0 = time.perf_counter()
        await asyncio.to_thread(scenario)
        took = time.perf_counter() - t0
        await asyncio.sleep(1.0)
        stop.set()
        await load
        return took

    took = asyncio.run(run())
    rank = {v: i for i, v in enumerate(order)}
    codes: dict[str, int] = {}
    for a in answers:
        codes[a[2]] = codes.get(a[2], 0) + 1
    ok = [a for a in answers if a[2] == "200"]
    # the first answer of each version by each replica
    first: dict[str, dict[str, float]] = {}
    for _sent, received, _c, version, sid in sorted(ok, key=lambda a: a[1]):
        first.setdefault(str(version), {}).setdefault(str(sid), received)
    # a replica that answered an older version after it had answered a newer one to an
    # earlier request: a response that names the wrong version
    stale = 0
    for r in replicas:
        mine = sorted((a for a in ok if a[4] == r.name), key=lambda a: a[0])
        newest_seen: list[tuple[float, int]] = []
        for sent, received, _c, version, _sid in mine:
            if any(t < sent and k > rank.get(str(version), -1) for t, k in newest_seen):
                stale += 1
            newest_seen.append((received, rank.get(str(version), -1)))
    # answers by a version older than one another replica had already answered with
    mixed = sum(1 for a in ok if any(t < a[0] for v, ts in first.items()
                                      if rank.get(v, -1) > rank.get(str(a[3]), -1)
                                      for t in ts.values()))
    return {
        "rate": rate, "announced": len(order) - 1, "following_swaps": swaps,
        "rolling_restarts": len(replicas), "seconds": took,
        "requests": len(answers), "failed_requests": len(answers) - len(ok), "codes": codes,
        "versions_answered": len({a[3] for a in ok}),
        "unknown_versions": sorted({str(a[3]) for a in ok} - set(order)),
        "answers_without_replica": sum(1 for a in ok if a[4] not in {r.name for r in replicas}),
        "stale_answers": stale,
        "answers_while_replicas_differed": mixed,
        "swap_gap_ms_median": float(np.median(gaps)) * 1000 if gaps else None,
        "swap_gap_ms_max": float(np.max(gaps)) * 1000 if gaps else None,
        "swap_gaps_ms": [round(g * 1000, 1) for g in gaps],
    }


def replicas_run(kafka: KafkaSettings, work: Path, args: argparse.Namespace,
                 server_slo: float, rates: list[float], seconds: float, ad_ids: list[str],
                 producer: EventProducer, base: BuiltSnapshot) -> dict[str, Any]:
    """1 vs 2 replicas behind HAProxy at the same SLO, rates interleaved, in one run (the
    2-replica balancer shares replica-1 with the 1-replica one); then the rolling swaps."""
    from adloop.balancer import Balancer, Replica, haproxy_binary

    servers = [Server(kafka, work / f"cache-replica-{i}", args.provider, True, server_slo,
                      args.threads, name=f"replica-{i}") for i in (1, 2)]
    lbs: dict[str, Any] = {}
    ready: dict[str, Any] = {}
    try:
        for srv in servers:
            ready = srv.wait_ready()
        members = [Replica(srv.name, f"127.0.0.1:{srv.port}") for srv in servers]
        lbs = {"1": Balancer(work / "lb-1", _free_port(), members[:1]),
               "2": Balancer(work / "lb-2", _free_port(), members)}
        for n, lb in lbs.items():
            lb.start()
            lb.wait_replicas([m.name for m in members[:int(n)]])
            asyncio.run(open_loop(lb.url, rates[0], 2.0, ad_ids, seed=98))   # warm-up
        print("replicas behind HAProxy: 1 and 2, interleaved per rate", flush=True)
        sweeps: dict[str, list[dict[str, Any]]] = {"1": [], "2": []}
        misses = {"1": 0, "2": 0}
        for rate in rates:
            for n, lb in lbs.items():
                if misses[n] >= 2:
                    sweeps[n].append({"rate": rate, "skipped": True, "within_slo": False,
                                      "p99_ms": None})
                    continue
                row = measure(lb.url, rate, seconds, ad_ids, args.slo_ms, f"{n} repl.")
                misses[n] = 0 if row["within_slo"] else misses[n] + 1
                sweeps[n].append(row)
            if misses["1"] >= 2 and misses["2"] >= 2:
                break
        lbs["1"].stop()
        print("rolling swaps through the 2-replica balancer", flush=True)
        rolling = rolling_swaps(lbs["2"], servers, producer, base, work / "store", ad_ids,
                                rate=ROLLING_RATE, swaps=10 if args.quick else 30)
        print(f"  {rolling['requests']} requests, {rolling['failed_requests']} failed, "
              f"{rolling['stale_answers']} stale, swap gap median "
              f"{rolling['swap_gap_ms_median']} ms", flush=True)
    finally:
        for lb in lbs.values():
            lb.stop()
        for srv in servers:
            srv.stop()
    version = subprocess.run([haproxy_binary(), "-v"], capture_output=True, text=True,
                             timeout=10).stdout.splitlines()[0]
    one, two = max_rate(sweeps["1"]), max_rate(sweeps["2"])
    return {"device": ready.get("device", "?"), "provider": ready.get("provider", "?"),
            "balancer": version, "seconds_per_rate": seconds, "rates": rates,
            "max_rate_1_replica_within_slo": one, "max_rate_2_replicas_within_slo": two,
            "max_rate_2_replicas_over_1": two / one if one else None,
            "load_average_1m_at_end": os.getloadavg()[0], "sweeps": sweeps,
            "rolling_swap": rolling}


def replica_keys(rep: dict[str, Any]) -> dict[str, Any]:
    """The replica figures at the top level of serve.json, and the run itself."""
    return {"max_rate_1_replica_within_slo": rep["max_rate_1_replica_within_slo"],
            "max_rate_2_replicas_within_slo": rep["max_rate_2_replicas_within_slo"],
            "max_rate_2_replicas_over_1": rep["max_rate_2_replicas_over_1"],
            "rolling_swap_failed_requests": rep["rolling_swap"]["failed_requests"],
            "rolling_swap_stale_answers": rep["rolling_swap"]["stale_answers"],
            "replicas": rep}


def replica_doc(rep: dict[str, Any], slo_ms: float, quick: bool, device: str) -> str:
    def cells(row: dict[str, Any]) -> list[Any]:
        if row.get("skipped"):
            return ["–", "–", "–", "–"]
        return [round(row["throughput_rps"], 1), round(row["p50_ms"], 1),
                round(row["p99_ms"], 1), row["codes"].get("429", 0)]

    one, two = rep["max_rate_1_replica_within_slo"], rep["max_rate_2_replicas_within_slo"]
    ratio = rep["max_rate_2_replicas_over_1"]
    roll = rep["rolling_swap"]
    rows = [[int(a["rate"]), *cells(a), *cells(b)]
            for a, b in zip(rep["sweeps"]["1"], rep["sweeps"]["2"], strict=True)]
    gap = roll["swap_gap_ms_median"]
    return (
        f"`bench/serve.py{' --quick' if quick else ''}`: the serve section's model and "
        f"settings (dynamic beams), {device}, with `adloop serve` replicas behind HAProxy "
        f"({rep['balancer']}; `adloop/balancer.py`: health checks on `/readyz`, leastconn, "
        f"retry on another replica). One balancer in front of one replica, one in front of "
        f"two (the first replica is shared), rates interleaved in the same run, "
        f"{rep['seconds_per_rate']:g} s per rate, SLO p99 ≤ {slo_ms:g} ms end to end with "
        "≥ 99% answered.\n\n"
        + markdown_table(["rate/s", "1 replica rps", "p50 ms", "p99 ms", "429",
                          "2 replicas rps", "p50 ms", "p99 ms", "429"], rows)
        + f"\n\nMax rate within SLO: 1 replica {one:g}/s, 2 replicas {two:g}/s"
        + (f" (`max_rate_2_replicas_over_1` = {ratio:.2f})." if ratio else ".")
        + f" 1-minute load average at the end: {rep['load_average_1m_at_end']:.1f} on "
        f"{os.cpu_count()} cores: both replicas, HAProxy and the load generator share them, "
        "so a second replica adds no cores here; the ratio measures what the balancer and "
        "a second process cost or gain on the same CPUs, not scaling across hosts.\n\n"
        f"Rolling swaps at {roll['rate']:g} req/s through the 2-replica balancer: "
        f"{roll['following_swaps']} versions announced one after another (each replica "
        "follows `model-updates` on its own and swaps when its copy is verified and warm), "
        f"then a rolling restart of each replica with a version announced while it is down: "
        f"{roll['announced']} versions, {roll['requests']} requests, "
        f"**{roll['failed_requests']} failed**, {roll['stale_answers']} answers naming an "
        f"older version than the replica had already answered with, "
        f"{len(roll['unknown_versions'])} naming a version never announced, "
        f"{roll['answers_while_replicas_differed']} answered while the replicas were on "
        "different versions (each naming its own). Median gap between the moments the two "
        "replicas' `/readyz` first named a version announced while both ran: "
        + (f"{gap:.0f} ms." if gap is not None else "–.") + "\n")


def merge_results(ready: dict[str, Any], provider: str,
                  fields: dict[str, Any]) -> tuple[str, Path]:
    """Write ``fields`` over the provider's serve results (the other figures stay);
    returns the results name and file."""
    name = "serve" if ready.get("provider") == "cpu" or provider == "auto" \
        else f"serve_{ready.get('provider')}"
    path = ROOT / "bench" / "results" / f"{name}.json"
    old: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    old.pop("benchmark", None)
    write_results(name, {**old, **fields}, DEPENDS, merged_from=old)
    return name, path


def write_replicas_only(rep: dict[str, Any], ready: dict[str, Any], provider: str,
                        slo_ms: float, quick: bool) -> int:
    """Merge the replica run into serve.json (the sweeps and swaps stay) and its section."""
    name, path = merge_results(ready, provider, {
        **replica_keys(rep),
        "replicas_measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    update_doc_section(f"{name}: replicas", replica_doc(rep, slo_ms, quick,
                                                        ready.get("device", "?")))
    print(f"wrote {path.relative_to(ROOT)}: max rate 1 replica "
          f"{rep['max_rate_1_replica_within_slo']:g}/s, 2 replicas "
          f"{rep['max_rate_2_replicas_within_slo']:g}/s")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="short steps (a few minutes)")
    ap.add_argument("--provider", default="auto", help="auto | cpu | cuda")
    ap.add_argument("--slo-ms", type=float, default=100.0, help="end-to-end p99 target")
    ap.add_argument("--rates", default="", help="comma-separated request rates")
    ap.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    ap.add_argument("--swaps", type=int, default=0,
                    help="swaps measured for memory (default 500, 300 with --quick)")
    ap.add_argument("--swaps-only", action="store_true",
                    help="only the swap-memory run; merge its figures into serve.json")
    ap.add_argument("--replicas-only", action="store_true",
                    help="only 1 vs 2 replicas behind HAProxy and the rolling swaps; merge "
                    "their figures into serve.json")
    ap.add_argument("--bootstrap-servers", default="", help="use a running broker")
    args = ap.parse_args()
    seconds = 4.0 if args.quick else 15.0
    n_swaps = args.swaps or (300 if args.quick else 500)
    rates = [float(r) for r in args.rates.split(",")] if args.rates else \
        [10, 20, 30, 40, 60, 80, 120, 160, 200]
    # the controller aims below the end-to-end target: HTTP + client time comes on top
    server_slo = args.slo_ms * 0.5

    work = Path(tempfile.mkdtemp(prefix="adloop-bench-serve-"))
    broker = None
    try:
        if args.bootstrap_servers:
            bootstrap = args.bootstrap_servers
        else:
            broker = EmbeddedBroker(BrokerSettings(port=0, data_dir=work / "kafka",
                                                   heap="512m")).start()
            bootstrap = broker.bootstrap_servers
        prefix = f"bench-serve-{int(time.time())}."
        create_topics(bootstrap, prefix)
        kafka = KafkaSettings(bootstrap_servers=bootstrap, topic_prefix=prefix,
                              client_id="bench-serve")
        spec = SnapshotSpec(version="v000000", **MODEL)  # type: ignore[arg-type]
        base = build_snapshot(work / "store" / "v000000", spec)
        ad_ids = list(base.ids)
        producer = EventProducer(kafka)
        for ad in make_ads(ad_ids):
            producer.send("ads", ad)
        producer.send("model-updates", base.model_update())
        producer.flush()

        replica_rates = [float(r) for r in rates] if args.rates else \
            [float(r) for r in (*rates, 250, 300, 400)]
        if args.replicas_only:
            rep = replicas_run(kafka, work, args, server_slo, replica_rates, seconds, ad_ids,
                               producer, base)
            producer.close()
            return write_replicas_only(rep, rep, args.provider, args.slo_ms, args.quick)
        results: dict[str, Any] = {}
        sweeps: dict[str, list[dict[str, Any]]] = {"fixed": [], "dynamic": []}
        ready: dict[str, Any] = {}
        modes = ("dynamic",) if args.swaps_only else ("fixed", "dynamic")
        servers = {mode: Server(kafka, work / f"cache-{mode}", args.provider,
                                mode == "dynamic", server_slo, args.threads)
                   for mode in modes}
        try:
            for srv in servers.values():
                ready = srv.wait_ready()
            for srv in servers.values():
                asyncio.run(open_loop(srv.url, rates[0], 2.0, ad_ids, seed=99))   # warm-up
            if args.swaps_only:
                print(f"swaps: {n_swaps} under load", flush=True)
                swaps = swap_rss(servers["dynamic"], producer, base, work / "store",
                                 n_swaps, 10, ad_ids, rate=SWAP_RATE)
                return write_swaps_only(swaps, ready, args.provider)
            print(f"beams {SCHEDULE}, server SLO {server_slo:.0f} ms; fixed and dynamic "
                  "interleaved per rate", flush=True)
            misses = {"fixed": 0, "dynamic": 0}
            for rate in rates:
                for mode, srv in servers.items():
                    if misses[mode] >= 2:        # broken twice in a row: stop raising it
                        sweeps[mode].append({"rate": rate, "skipped": True,
                                             "within_slo": False, "p99_ms": None})
                        continue
                    row = measure(srv.url, rate, seconds, ad_ids, args.slo_ms, mode)
                    misses[mode] = 0 if row["within_slo"] else misses[mode] + 1
                    sweeps[mode].append(row)
                if misses["fixed"] >= 2 and misses["dynamic"] >= 2:
                    break
            servers["fixed"].stop()
            print(f"swaps: {n_swaps} under load", flush=True)
            results["swaps"] = swap_rss(servers["dynamic"], producer, base, work / "store",
                                        n_swaps, 10, ad_ids, rate=SWAP_RATE)
        finally:
            for srv in servers.values():
                srv.stop()
        rep = replicas_run(kafka, work, args, server_slo, replica_rates, seconds, ad_ids,
                           producer, base)
        producer.close()
    finally:
        if broker is not None:
            broker.stop()
        shutil.rmtree(work, ignore_errors=True)

    fixed_max, dyn_max = max_rate(sweeps["fixed"]), max_rate(sweeps["dynamic"])
    swaps = results["swaps"]
    provider = ready.get("provider", "?")
    out = {
        "device": ready.get("device", "?"),
        "provider": provider,
        "provider_reason": ready.get("provider_reason", ""),
        "quick": args.quick,
        "slo_ms": args.slo_ms,
        "server_slo_ms": server_slo,
        "model": {**MODEL, "level_sizes": list(MODEL["level_sizes"])},  # type: ignore[call-overload]
        "beam_schedule": SCHEDULE,
        "seconds_per_rate": seconds,
        "fixed_beam_max_rate_within_slo": fixed_max,
        "dynamic_beam_max_rate_within_slo": dyn_max,
        "dynamic_over_fixed": dyn_max / fixed_max if fixed_max else None,
        "p99_ms_at_rates": {mode: {str(int(r["rate"])): (round(r["p99_ms"], 2)
                                                          if r.get("p99_ms") is not None
                                                          and np.isfinite(r["p99_ms"]) else None)
                                   for r in rows}
                            for mode, rows in sweeps.items()},
        "load_average_1m_at_end": os.getloadavg()[0],
        "sweeps": sweeps,
        **swap_keys(swaps),
        **replica_keys(rep),
    }
    name = "serve" if provider == "cpu" or args.provider == "auto" else f"serve_{provider}"
    path = write_results(name, out, DEPENDS)
    print(f"wrote {path.relative_to(ROOT)}")

    def cells(row: dict[str, Any]) -> list[Any]:
        if row.get("skipped"):
            return ["–", "–", "–", "–"]
        return [round(row["throughput_rps"], 1), round(row["p50_ms"], 1),
                round(row["p99_ms"], 1), row["codes"].get("429", 0)]

    table_rows = []
    for f_row, d_row in zip(sweeps["fixed"], sweeps["dynamic"], strict=True):
        table_rows.append([int(f_row["rate"]), *cells(f_row), *cells(d_row),
                           "–" if d_row.get("skipped") else
                           round(d_row["mean_beam_width_sum"], 1)])
    body = (
        f"`bench/serve.py{' --quick' if args.quick else ''}`: open-loop POST /v1/recommend "
        f"({seconds:g} s per rate) to `adloop serve` in its own process, {out['device']}, "
        f"provider {provider}, ONNX Runtime intra-op threads {args.threads}; model from "
        f"`tests/support/snapshots.py` (levels {list(MODEL['level_sizes'])}, "  # type: ignore[call-overload]
        f"{MODEL['n_ads']} ads, D={MODEL['d_model']}, MLP {MODEL['mlp_hidden']}), beam "
        f"schedule {SCHEDULE}, batches of ≤16. SLO: p99 ≤ {args.slo_ms:g} ms end to end "
        f"with ≥ 99% answered (the controller aims at {server_slo:g} ms inside the server).\n\n"
        + markdown_table(["rate/s", "fixed rps", "fixed p50 ms", "fixed p99 ms", "fixed 429",
                          "dynamic rps", "dynamic p50 ms", "dynamic p99 ms", "dynamic 429",
                          "dynamic Σ widths"], table_rows)
        + f"\n\nMax rate within SLO: fixed {fixed_max:g}/s, dynamic {dyn_max:g}/s"
        + (f" ({dyn_max / fixed_max:.1f}×)." if fixed_max else ".")
        + f" Rates are interleaved (fixed, then dynamic, per rate) so both see the same "
        f"background load; a mode stops after two rates out of SLO (–). 1-minute load "
        f"average at the end: {out['load_average_1m_at_end']:.1f} on {os.cpu_count()} cores."
        + "\n\n" + swap_doc(swaps))
    update_doc_section("serve" if name == "serve" else name, body)
    update_doc_section(f"{name}: replicas", replica_doc(rep, args.slo_ms, args.quick,
                                                        out["device"]))
    return 0


def swap_keys(swaps: dict[str, Any]) -> dict[str, Any]:
    """The swap-memory figures at the top level of serve.json, and the run itself."""
    return {"rss_growth_ratio_100_swaps": swaps["rss_growth_ratio_100_swaps"],
            "rss_slope_kib_per_swap": swaps["rss_slope_kib_per_swap"],
            "swap_memory_swaps": swaps["swaps"],
            "failed_requests_during_swaps": swaps["failed_requests_during_swaps"],
            "swaps": swaps}


def swap_doc(swaps: dict[str, Any]) -> str:
    at = swaps["rss_mib_at"]
    return (
        f"Hot swap: {swaps['swaps']} swaps under {SWAP_RATE:g} req/s (after "
        f"{swaps['warmup_swaps']} warm-up swaps; RSS read after every swap), "
        f"{swaps['failed_requests_during_swaps']} failed of {swaps['requests_during_swaps']} "
        f"requests, {swaps['swap_seconds'] / swaps['swaps'] * 1000:.0f} ms per swap. A leak "
        "grows by the same amount every swap; allocator warm-up levels off, so the slope "
        "over the second half tells them apart. The server hands the heap a swapped-out "
        "model freed back to the OS after each swap (glibc `malloc_trim`, "
        "`server/models.py`).\n\n"
        + markdown_table(["swaps", "RSS after 0 (MiB)", *[f"after {k}" for k in at if k != "0"],
                          "ratio at 100", "ratio at end", "slope 1st half KiB/swap",
                          "slope 2nd half KiB/swap"],
                         [[swaps["swaps"], *(f"{v:.1f}" for v in at.values()),
                           f"{swaps['rss_growth_ratio_100_swaps']:.3f}",
                           f"{swaps['rss_growth_ratio_all_swaps']:.3f}",
                           f"{swaps['rss_slope_kib_per_swap_first_half']:.1f}",
                           f"{swaps['rss_slope_kib_per_swap']:.1f}"]]) + "\n")


def write_swaps_only(swaps: dict[str, Any], ready: dict[str, Any], provider: str) -> int:
    """Merge the swap-memory run into serve.json (the sweeps stay) and its doc section."""
    name, path = merge_results(ready, provider, {
        **swap_keys(swaps),
        "swap_memory_measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "swap_memory_load_average_1m": os.getloadavg()[0]})
    update_doc_section(f"{name}: swap memory", f"`bench/serve.py --swaps-only`, "
                       f"{ready.get('device', '?')}, provider {ready.get('provider', '?')}, "
                       "the model of the serve section. " + swap_doc(swaps))
    print(f"wrote {path.relative_to(ROOT)}: ratio at 100 "
          f"{swaps['rss_growth_ratio_100_swaps']:.3f}, slope (2nd half) "
          f"{swaps['rss_slope_kib_per_swap']:.1f} KiB/swap over {swaps['swaps']} swaps")
    return 0


if __name__ == "__main__":
    sys.exit(main())
