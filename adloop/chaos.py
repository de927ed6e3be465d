"""Faults, load and bad input across the whole loop, with a ledger that proves nothing
is lost (``bench/chaos.py``; a CI-sized subset runs in ``tests/adloop/test_chaos.py``).

One embedded stack (broker, joiner, learner, server as real processes, the demo's
set-up) takes live open-loop traffic in *phases*. Each phase injects one fault while
traffic runs, waits until the loop has recovered, and goes on. After the last phase,
tail traffic pushes the event-time watermark past every attribution window, the
processes stop cleanly, and :mod:`adloop.reconcile` accounts for every event each
phase caused: lost and doubled must be 0.

Faults (``--faults`` takes a comma-separated subset; ``all`` is the default):

==========================  ============================================================
``kill_joiner``             ``kill -9`` the joiner, restart it
``kill_learner``            ``kill -9`` the learner, restart it
``kill_server``             ``kill -9`` the server, restart it (its impression spool)
``kill_joiner_learner``     two at once
``broker_restart``          stop the broker (controlled shutdown), start it again
``malformed_burst``         bad records on every input topic (impressions, clicks,
                            conversions, organic-engagements, feedback, ads,
                            organic-items): not JSON, missing fields, a wrong schema
                            version, oversized
``poison_bytes``            bytes no decoder should choke on, on every topic a process
                            reads (compacted ``ads``, ``organic-items`` and
                            ``model-updates`` included): invalid UTF-8, tombstones (null
                            values), non-UTF-8 keys, wrong field types; each must reach
                            ``dlq`` with a reason (a tombstone on ``ads`` or
                            ``organic-items`` is a deletion there), no process may exit,
                            and the server must go on following new ads, read past the
                            poison on ``organic-items`` and serve a snapshot published
                            after the poison
``corrupt_snapshot``        a model-update whose files fail their checksums
``poisoned_snapshot``       NaN weights with valid checksums
``stale_snapshot``          a replayed announcement of an older snapshot (regressing)
``store_unreadable``        the snapshot store unreachable for a while
``skew_within``             click/conversion clocks off by up to ± half the tolerance
``skew_beyond``             clicks from a clock far ahead (beyond the attribution window)
==========================  ============================================================

Traffic asks for mixed feeds (``--organic-slots``, 3 by default), so the organic path
(``organic-items``, ``organic-engagements``, the joined ``Feedback.organic``) runs under
every fault and the ledger accounts for each organic engagement too.

Load phases (``--load``): the server's capacity is measured first (closed loop), then
open-loop traffic at 1×, 2× and 3× of it: beams narrow first, then 429s; the table
gets admitted p99 latency, shed share and mean beam width per level 0, and how long
the joiner's lag takes to recover after the burst.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import json
import os
import random
import shutil
import statistics
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import msgspec
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from adloop.demo import Demo, DemoSettings, histogram_quantile, metric_sum, scrape
from adloop.reconcile import Malformed, Row, observe, read_learner_ledger, reconcile
from adloop.stack import CrashLoopError, ProcessExit, RestartPolicy, Supervisor
from streams.kafka_io import EventProducer, read_all
from streams.logs import get_logger
from streams.schemas import Click, Conversion, DeadLetter, Event, ModelUpdate
from streams.settings import add_settings_arguments, settings_from_args
from streams.signing import sign_update
from streams.topics import Topics
from traffic.driver import Emitter, HttpOptions, Ledger, TrafficDriver
from traffic.world import World

log = get_logger(__name__)

FAULTS = ("kill_joiner", "kill_learner", "kill_server", "kill_joiner_learner",
          "broker_restart", "malformed_burst", "poison_bytes", "corrupt_snapshot",
          "poisoned_snapshot",
          "stale_snapshot", "store_unreadable", "skew_within", "skew_beyond")
INPUT_TOPICS = ("impressions", "clicks", "conversions", "organic-engagements", "feedback",
                "ads", "organic-items")
POISON_TOPICS = (*INPUT_TOPICS, "model-updates")
DELETING_TOPICS = ("ads", "organic-items")
"""Compacted catalogue topics whose tombstone is a deletion (the server drops that id),
not a bad record."""


class ChaosSettings(BaseSettings):
    """``bench/chaos.py`` settings (env ``ADLOOP_CHAOS_<NAME>``, flags ``--name``)."""

    model_config = SettingsConfigDict(env_prefix="ADLOOP_CHAOS_", extra="ignore")

    quick: bool = Field(False, description="shorter phases and a smaller pretraining")
    out: Path = Field(Path("runs/chaos"), description="run directory (logs, ledger, table)")
    faults: str = Field("all", description="comma-separated faults to inject, or all")
    load: bool = Field(True, description="also run the 1x/2x/3x capacity load phases")
    seed: int = Field(0, description="seed of the simulated world")
    rate: float = Field(8.0, description="requests per wall second during fault phases")
    speed: float = Field(120.0, description="simulated seconds per wall second")
    phase_s: float = Field(10.0, description="wall seconds of traffic per phase at least")
    fault_after_s: float = Field(2.0, description="wall seconds into a phase the fault hits")
    outage_s: float = Field(6.0, description="how long the snapshot store stays unreachable")
    load_phase_s: float = Field(8.0, description="wall seconds per load phase")
    malformed_per_topic: int = Field(8, description="bad records per input topic")
    n_users: int = Field(300, description="simulated users")
    n_ads: int = Field(100, description="ads at the start")
    organic_slots: int = Field(3, ge=0, le=50, description="organic items per request "
                               "(mixed feeds; 0 = ads only)")
    log_requests: int = Field(1500, description="random-policy requests for pretraining")
    pretrain_steps: int = Field(60, description="pretraining steps")
    encoder: str = Field("hashing", description="ad content encoder (hashing or minilm)")
    observation_window_s: float = Field(60.0, description="joiner observation window (sim s)")
    attribution_window_s: float = Field(600.0, description="joiner attribution window (sim s)")
    bootstrap_servers: str = Field("", description="an existing Kafka instead of the embedded "
                                   "broker (broker_restart needs the embedded one)")
    topic_prefix: str = Field("", description="prepended to every topic name")

    def fault_list(self) -> list[str]:
        if self.faults.strip() in ("", "all"):
            return list(FAULTS)
        names = [f.strip() for f in self.faults.split(",") if f.strip()]
        unknown = [f for f in names if f not in FAULTS]
        if unknown:
            raise ValueError(f"unknown fault(s) {unknown}; known: {', '.join(FAULTS)}")
        return names


class SkewingEmitter(Emitter):
    """An :class:`Emitter` whose clicks and conversions can get a clock error.

    The ledger records the skewed event (what the loop was actually sent)."""

    skew: Callable[[Click | Conversion], float] | None = None

    def emit(self, topic: str, record: Event) -> None:
        if self.skew is not None and isinstance(record, Click | Conversion):
            record = msgspec.structs.replace(record,
                                             event_time=record.event_time + self.skew(record))
        super().emit(topic, record)


@dataclass
class PhaseResult:
    name: str
    request_ids: list[str] = field(default_factory=list)
    recovery_s: float | None = None
    detail: dict[str, Any] = field(default_factory=dict)
    snapshot_events: int = 0
    """Snapshots injected (each must be refused)."""
    snapshot_refused: int = 0


class ChaosRun:
    def __init__(self, s: ChaosSettings) -> None:
        self.s = s
        self.out = Path(s.out)
        shutil.rmtree(self.out, ignore_errors=True)
        self.out.mkdir(parents=True)
        self.store_data = self.out / "snapshots.data"
        self.store_data.mkdir()
        self.store_link = self.out / "snapshots"
        self.store_link.symlink_to(self.store_data.name)
        self.demo = Demo(DemoSettings(
            out=self.out, seed=s.seed, n_users=s.n_users, n_ads=s.n_ads,
            organic_slots=s.organic_slots,
            log_requests=s.log_requests, pretrain_steps=s.pretrain_steps, encoder=s.encoder,
            speed=s.speed, rate=s.rate, snapshot_every_s=3.0, metrics_port=0,
            # no A/B control bucket: a phase checks that a version announced after a fault
            # reaches every user, and the control would keep half of them on the first
            control_share=0.0,
            bootstrap_servers=s.bootstrap_servers, topic_prefix=s.topic_prefix,
            observation_window_s=s.observation_window_s,
            attribution_window_s=s.attribution_window_s))
        self.rng = random.Random(s.seed)
        self.malformed: list[Malformed] = []
        self.results: list[PhaseResult] = []
        self.load_rows: list[dict[str, Any]] = []
        self.stop = threading.Event()
        self.current = "setup"
        self.exits: list[dict[str, Any]] = []
        """Processes that exited on their own and were restarted by the supervisor."""
        self.supervisor: Supervisor | None = None

    # -- set-up ------------------------------------------------------------------------
    def setup(self) -> None:
        world, pre_dir = self.demo.prepare()
        self.world: World = world
        self.urls = self.demo.start_processes(pre_dir)
        self.stack = self.demo.stack
        self.producer = EventProducer(self.stack.kafka)
        self.ledger = Ledger(self.out / "ledger.jsonl", keep=True)
        self.emitter = SkewingEmitter(producer=self.producer, ledger=self.ledger)
        self.driver = TrafficDriver(world, self.emitter)
        self.driver.start()
        for ad in world.ad_records():
            self.emitter.emit("ads", ad)

    def say(self, msg: str) -> None:
        self.demo.say(msg)

    def supervise(self) -> Supervisor:
        """The stack's supervisor (:class:`adloop.stack.Supervisor`) restarts a process
        that exits on its own, as compose's ``restart: unless-stopped`` would; each exit
        is recorded and counted in the row of the phase it happened in."""
        def on_exit(e: ProcessExit) -> None:
            self.exits.append({"process": e.process, "exit_code": e.exit_code,
                               "phase": self.current,
                               "t": round(e.at - self.demo.t0, 1)})

        def on_crash_loop(err: CrashLoopError) -> None:
            self.say(f"  {err.name} is in a crash loop: stopping the run")
            self.stop.set()

        self.supervisor = self.stack.supervise(
            RestartPolicy(backoff_initial_s=0.5, backoff_max_s=10.0, stable_after_s=30.0,
                          crash_loop_exits=5, crash_loop_window_s=120.0),
            on_exit=on_exit, on_crash_loop=on_crash_loop)
        return self.supervisor

    def check_crash_loop(self) -> None:
        if self.supervisor is not None and self.supervisor.crash_loop is not None:
            raise self.supervisor.crash_loop

    # -- traffic -----------------------------------------------------------------------
    def traffic(self, rate: float, seconds: float | None, stop: threading.Event | None = None
                ) -> list[str]:
        """Open-loop traffic; returns the request ids it sent (answered or not)."""
        before = len(self.ledger.entries)
        opts = HttpOptions(server_url=self.urls["serve"], rate=rate, speed=self.s.speed,
                           duration_s=seconds or 0.0, timeout_s=2.0,
                           n_requests=int(rate * seconds) if seconds else 0)
        asyncio.run(self.driver.run_http(opts, stop or threading.Event(), drain=False))
        return [e["request_id"] for e in self.ledger.entries[before:] if e["kind"] == "request"]

    def phase(self, name: str, inject: Callable[[PhaseResult], None]) -> PhaseResult:
        """Traffic for at least ``phase_s``, the fault ``fault_after_s`` in, and until the
        fault's recovery is complete."""
        res = PhaseResult(name)
        done = threading.Event()
        errors: list[BaseException] = []

        def fault() -> None:
            try:
                if not self.stop.wait(self.s.fault_after_s):
                    inject(res)
            except BaseException as exc:   # reported in the table, the run goes on
                errors.append(exc)
                log.exception("chaos.fault_failed", fault=name)
            finally:
                done.set()

        self.say(f"  fault: {name}")
        self.current = name
        t0 = time.monotonic()
        thread = threading.Thread(target=fault, name=f"fault-{name}", daemon=True)
        thread.start()
        stop = threading.Event()

        def stopper() -> None:
            done.wait()
            rest = self.s.phase_s - (time.monotonic() - t0)
            if rest > 0:
                self.stop.wait(rest)
            stop.set()

        threading.Thread(target=stopper, daemon=True).start()
        res.request_ids = self.traffic(self.s.rate, None, stop)
        thread.join()
        if errors:
            res.detail["error"] = repr(errors[0])[:300]
        self.results.append(res)
        rec = "n/a" if res.recovery_s is None else f"{res.recovery_s:.1f}s"
        self.say(f"    {len(res.request_ids)} requests, recovery {rec}")
        return res

    # -- waiting -----------------------------------------------------------------------
    def metric(self, proc: str, name: str, **labels: str) -> float:
        return metric_sum(scrape(self.urls[proc] + "/metrics"), name, **labels)

    def wait_until(self, what: str, predicate: Callable[[], bool], timeout_s: float = 120.0
                   ) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.2)
        raise TimeoutError(f"chaos: {what} not within {timeout_s}s")

    def wait_increase(self, proc: str, name: str, timeout_s: float = 120.0,
                      **labels: str) -> None:
        base = self.metric(proc, name, **labels)
        self.wait_until(f"{proc} {name} to increase",
                        lambda: self.metric(proc, name, **labels) > base, timeout_s)

    def serving_version(self) -> str | None:
        try:
            body = httpx.get(self.urls["serve"] + "/readyz", timeout=3).json()
        except (httpx.HTTPError, ValueError):
            return None
        v = body.get("model_version")
        return v if isinstance(v, str) else None

    # -- faults ------------------------------------------------------------------------
    def kill(self, res: PhaseResult, names: tuple[str, ...]) -> None:
        procs = [self.stack.processes[n] for n in names]
        t0 = time.monotonic()
        hold = self.supervisor.hold(names) if self.supervisor else contextlib.nullcontext()
        with hold:   # the fault kills and restarts these itself
            for p in procs:
                p.kill()
            time.sleep(1.0)
            for p in procs:
                p.start()
            for p in procs:
                p.wait_ready(300)
        progress = {"join": "adloop_join_events_total", "learn": "adloop_learner_lists_total",
                    "serve": "adloop_server_impressions_produced_total"}
        for n in names:
            self.wait_increase(n, progress[n])
        res.recovery_s = time.monotonic() - t0
        if "serve" in names:
            res.detail["impressions_replayed_from_spool"] = self.metric(
                "serve", "adloop_server_impressions_replayed_total")

    def broker_restart(self, res: PhaseResult) -> None:
        broker = self.stack.broker
        if broker is None:
            raise RuntimeError("broker_restart needs the embedded broker (no --bootstrap-servers)")
        t0 = time.monotonic()
        broker.stop()
        time.sleep(2.0)
        broker.start()
        self.wait_increase("join", "adloop_join_events_total")
        self.wait_increase("serve", "adloop_server_impressions_produced_total")
        self.wait_increase("learn", "adloop_learner_lists_total")
        res.recovery_s = time.monotonic() - t0

    def malformed_burst(self, res: PhaseResult) -> None:
        topics = Topics(self.stack.kafka.topic_prefix)
        prod = KafkaProducer(bootstrap_servers=self.stack.kafka.bootstrap_servers, acks="all",
                             max_request_size=2 * 1024 * 1024)
        sent: list[Malformed] = []
        t0 = time.monotonic()
        for topic in INPUT_TOPICS:
            for i in range(self.s.malformed_per_topic):
                tag = uuid.uuid4().hex[:12]
                kind = i % 4
                if kind == 0:
                    raw = f"not json {tag} {{".encode()
                elif kind == 1:
                    raw = json.dumps({"schema": 1, "chaos": tag}).encode()   # fields missing
                elif kind == 2:
                    raw = json.dumps({"schema": 99, "chaos": tag}).encode()  # unknown version
                else:
                    raw = json.dumps({"schema": 1, "chaos": tag,
                                      "pad": "x" * 300_000}).encode()        # oversized
                prod.send(topics.name(topic), raw, key=b"chaos")
                sent.append(Malformed(res.name, topic, raw))
        prod.flush(30)
        prod.close()
        self.malformed.extend(sent)
        want = {(m.topic, m.raw) for m in sent}

        def all_dead_lettered() -> bool:
            got = {(topics.logical(r.record.source_topic), r.record.raw())
                   for r in read_all(self.stack.kafka, "dlq", timeout_s=10)}
            return want <= got

        self.wait_until("every malformed record in dlq", all_dead_lettered, 120)
        res.recovery_s = time.monotonic() - t0
        res.detail["malformed"] = len(sent)

    def poison_bytes(self, res: PhaseResult) -> None:
        topics = Topics(self.stack.kafka.topic_prefix)
        announced_before = {r.record.version for r in read_all(
            self.stack.kafka, "model-updates", timeout_s=3) if isinstance(r.record, ModelUpdate)}
        catalog_before = self.metric("serve", "adloop_server_catalog_ads")
        skipped = "adloop_server_bad_records_total"
        skipped_before = self.metric("serve", skipped, topic="organic-items")
        prod = KafkaProducer(bootstrap_servers=self.stack.kafka.bootstrap_servers, acks="all")
        sent: list[tuple[str, bytes, bytes]] = []   # (topic, key, value; b"" for null)
        deletions: list[tuple[str, bytes]] = []
        t0 = time.monotonic()
        for topic in POISON_TOPICS:
            tag = uuid.uuid4().hex[:12]
            garbage_key = b"\xff\xfe\xc0" + tag.encode() + b"\x80"  # not UTF-8
            # compacted topics: unique keys, so compaction deletes nothing real
            for key, value in (
                    (f"chaos-{tag}".encode(), b'"\x80"'),            # invalid UTF-8 string
                    (f"chaos-{tag}-t".encode(), None),                # tombstone
                    (garbage_key, b'{"schema":1,"chaos":"' + tag.encode() + b'"}'),
                    (garbage_key + b"-t", None),                      # tombstone, bad key
                    (f"chaos-{tag}-b".encode(), b"\xc3\x28" + tag.encode()),  # bad byte
                    (f"chaos-{tag}-w".encode(),                       # wrong field types
                     b'{"schema":1,"event_id":7,"request_id":[],"ad_id":{},"item_id":0,'
                     b'"event_time":"now","chaos":"' + tag.encode() + b'"}')):
                prod.send(topics.name(topic), value, key=key)
                if topic in DELETING_TOPICS and value is None:
                    # on ``ads`` / ``organic-items`` (compacted, key = id) a tombstone is a
                    # deletion: the server drops that id (none of these names a real ad or
                    # item), not a bad record
                    deletions.append((topic, key))
                else:
                    sent.append((topic, key, value or b""))
        prod.flush(30)
        prod.close()
        self.malformed.extend(Malformed(res.name, t, v) for t, _k, v in sent)
        want = {(t, base64.b64encode(k).decode(), v) for t, k, v in sent}

        def missing() -> set[tuple[str, str, bytes]]:
            got = {(topics.logical(r.record.source_topic), r.record.key_b64, r.record.raw())
                   for r in read_all(self.stack.kafka, "dlq", timeout_s=10)
                   if isinstance(r.record, DeadLetter)}
            return want - got

        try:
            self.wait_until("every poison record in dlq", lambda: not missing(), 120)
        except TimeoutError:
            res.detail["not_dead_lettered"] = sorted(
                f"{t}: {'tombstone' if not v else repr(v[:6])}" for t, _k, v in missing())
            raise
        res.recovery_s = time.monotonic() - t0
        res.detail["poison_records"] = len(sent)
        res.detail["tombstones_as_deletions"] = {
            t: sum(d == t for d, _k in deletions) for t in DELETING_TOPICS}
        # the server's organic-items follower read past every poison record there (each
        # skipped and counted, whoever dead-lettered it)
        organic_poison = sum(t == "organic-items" for t, _k, _v in sent)
        self.wait_until("the server to read past the poison on organic-items",
                        lambda: self.metric("serve", skipped, topic="organic-items")
                        - skipped_before >= organic_poison, 120)
        res.detail["server_skipped_organic_items"] = self.metric(
            "serve", skipped, topic="organic-items") - skipped_before
        # the server still follows both compacted topics past the poison
        self.wait_until("the server's catalog to take a new ad after the poison",
                        lambda: self.metric("serve", "adloop_server_catalog_ads")
                        > catalog_before, 120)

        def served_new() -> bool:
            v = self.serving_version()
            return v is not None and v not in announced_before

        self.wait_until("a snapshot announced after the poison to be served", served_new, 180)
        res.detail["served_after"] = self.serving_version()
        res.detail["catalog_ads"] = [catalog_before,
                                     self.metric("serve", "adloop_server_catalog_ads")]
        body = self._bodies(1, f"poison-{uuid.uuid4().hex[:6]}")[0]
        resp = httpx.post(self.urls["serve"] + "/v1/recommend", json=body, timeout=10)
        answered = resp.json().get("model_version") if resp.status_code == 200 else None
        res.detail["response_model_version"] = answered or f"HTTP {resp.status_code}"
        res.detail["response_model_is_new"] = answered is not None \
            and answered not in announced_before

    def _copy_serving_snapshot(self, suffix: str) -> tuple[Path, dict[str, Any], str]:
        serving = self.serving_version()
        if serving is None or not (self.store_data / serving).exists():
            raise RuntimeError(f"no serving snapshot in the store (serving {serving})")
        name = f"{serving}-{suffix}"
        dest = self.store_data / name
        shutil.copytree(self.store_data / serving, dest)
        manifest = json.loads((dest / "manifest.json").read_text())
        return dest, manifest, serving

    def _announce(self, directory: Path, manifest: dict[str, Any], version: str,
                  parent: str | None, watermark: float) -> None:
        manifest["version"] = version
        (directory / "manifest.json").write_text(json.dumps(manifest, separators=(",", ":")))
        digest = hashlib.sha256((directory / "manifest.json").read_bytes()).hexdigest()
        event = ModelUpdate(model_name="adloop", version=version, parent=parent, sha256=digest,
                            uri=directory.resolve().as_uri(),
                            id_space_version=str(manifest.get("id_space_version", "")),
                            data_watermark=watermark, created_time=time.time())
        # signed with the stack's key, as the learner signs: the fault is in the files
        event = sign_update(event, *self.stack.keyring.signing_key())
        self.producer.send("model-updates", event)
        self.producer.flush(30)

    def _expect_refusal(self, res: PhaseResult, serving: str | None, injected: str,
                        announce: Callable[[], None]) -> None:
        def refusals() -> float:   # snapshot loads that ended in any step but ok
            swaps = "adloop_server_swaps_total"
            return self.metric("serve", swaps) - self.metric("serve", swaps, result="ok")

        before = refusals()
        t0 = time.monotonic()
        announce()
        res.snapshot_events += 1
        self.wait_until("the server to refuse the snapshot", lambda: refusals() > before, 60)
        res.recovery_s = time.monotonic() - t0
        after = self.serving_version()
        res.detail["serving_before"], res.detail["serving_after"] = serving, after
        if after is not None and after != injected:
            res.snapshot_refused += 1

    def _watermark(self) -> float:
        return self.metric("serve", "adloop_server_snapshot_data_watermark_timestamp_seconds")

    def corrupt_snapshot(self, res: PhaseResult) -> None:
        dest, manifest, serving = self._copy_serving_snapshot("corrupt")
        onnx_file = sorted(dest.glob("*.onnx"))[0]
        data = bytearray(onnx_file.read_bytes())
        data[len(data) // 2] ^= 0xFF
        onnx_file.write_bytes(bytes(data))
        res.detail["file"] = onnx_file.name
        self._expect_refusal(res, serving, dest.name, lambda: self._announce(
            dest, manifest, dest.name, serving, self._watermark() + 1))

    def poisoned_snapshot(self, res: PhaseResult) -> None:
        import numpy as np
        import onnx
        from onnx import numpy_helper

        dest, manifest, serving = self._copy_serving_snapshot("poisoned")
        for f in sorted(dest.glob("*.onnx")):
            model = onnx.load(str(f))
            for init in model.graph.initializer:
                arr = numpy_helper.to_array(init)
                if arr.dtype == np.float32 and arr.size > 1:
                    init.CopyFrom(numpy_helper.from_array(np.full_like(arr, np.nan), init.name))
            onnx.save(model, str(f))
            entry = manifest["files"][f.name]
            entry["sha256"] = hashlib.sha256(f.read_bytes()).hexdigest()
            entry["bytes"] = f.stat().st_size
        self._expect_refusal(res, serving, dest.name, lambda: self._announce(
            dest, manifest, dest.name, serving, self._watermark() + 1))

    def stale_snapshot(self, res: PhaseResult) -> None:
        serving = self.serving_version()
        updates = [r.record for r in read_all(self.stack.kafka, "model-updates", timeout_s=3)
                   if isinstance(r.record, ModelUpdate)]
        older = [u for u in updates if u.version != serving
                 and (self.store_data / u.version).exists()]
        if not older or serving is None:
            raise RuntimeError("no older snapshot left in the store to replay")
        old = older[0]
        res.detail["replayed"] = old.version

        def replay() -> None:
            self.producer.send("model-updates", old)
            self.producer.flush(30)

        self._expect_refusal(res, serving, old.version, replay)

    def store_unreadable(self, res: PhaseResult) -> None:
        refused = "adloop_learner_snapshots_refused_total"
        before = self.metric("learn", refused, reason="store_unavailable")
        served_before = self.serving_version()
        self.store_link.unlink()
        self.store_link.write_text("the snapshot store is unreachable\n")  # reads/writes fail
        try:
            self.wait_until("a publish to fail", lambda: self.metric(
                "learn", refused, reason="store_unavailable") > before, 60)
            time.sleep(self.s.outage_s)
        finally:
            self.store_link.unlink()
            self.store_link.symlink_to(self.store_data.name)
        t0 = time.monotonic()
        self.wait_until("a snapshot published and served after the outage",
                        lambda: self.serving_version() not in (None, served_before), 120)
        res.recovery_s = time.monotonic() - t0
        res.detail["publishes_failed"] = self.metric("learn", refused,
                                                     reason="store_unavailable") - before

    def skew(self, res: PhaseResult, within: bool) -> None:
        tol = 30.0   # the joiner's default out-of-orderness (simulated seconds)
        w = self.s.attribution_window_s
        rng = random.Random(self.s.seed + 7)
        t0 = time.monotonic()
        if within:
            self.emitter.skew = lambda _r: rng.uniform(-tol / 2, tol / 2)
        else:
            self.emitter.skew = (lambda r: 2.5 * w if isinstance(r, Click)
                                 and rng.random() < 0.5 else 0.0)
        try:
            time.sleep(max(2.0, self.s.phase_s - self.s.fault_after_s - 1.0))
        finally:
            self.emitter.skew = None
        self.wait_increase("join", "adloop_join_events_total")
        res.recovery_s = time.monotonic() - t0

    def injector(self, name: str) -> Callable[[PhaseResult], None]:
        table: dict[str, Callable[[PhaseResult], None]] = {
            "kill_joiner": lambda r: self.kill(r, ("join",)),
            "kill_learner": lambda r: self.kill(r, ("learn",)),
            "kill_server": lambda r: self.kill(r, ("serve",)),
            "kill_joiner_learner": lambda r: self.kill(r, ("join", "learn")),
            "broker_restart": self.broker_restart,
            "malformed_burst": self.malformed_burst,
            "poison_bytes": self.poison_bytes,
            "corrupt_snapshot": self.corrupt_snapshot,
            "poisoned_snapshot": self.poisoned_snapshot,
            "stale_snapshot": self.stale_snapshot,
            "store_unreadable": self.store_unreadable,
            "skew_within": lambda r: self.skew(r, True),
            "skew_beyond": lambda r: self.skew(r, False),
        }
        return table[name]

    # -- load ----------------------------------------------------------------------------
    def _bodies(self, n: int, tag: str) -> list[dict[str, Any]]:
        """Request bodies of world users (distinct request ids, the current sim time)."""
        users = list(self.world.users)
        rng = random.Random(self.s.seed + len(tag))
        out = []
        for i in range(n):
            u = users[rng.randrange(len(users))]
            out.append({"user_id": u.user_id, "request_id": f"{tag}-{i}",
                        "context": {"device": u.device, "region": u.region},
                        "recent_ad_ids": list(u.recent)[:20], "event_time": self.world.now})
        return out

    def capacity(self, seconds: float = 5.0, concurrency: int = 16) -> float:
        """Closed-loop requests/s the server answers with 200 (the same light client)."""
        bodies = self._bodies(4096, "capacity")

        async def run() -> int:
            ok, n = 0, 0
            end = time.monotonic() + seconds
            async with httpx.AsyncClient(base_url=self.urls["serve"], timeout=5) as c:
                async def worker() -> None:
                    nonlocal ok, n
                    while time.monotonic() < end:
                        body = bodies[n % len(bodies)]
                        n += 1
                        r = await c.post("/v1/recommend", json=body)
                        ok += r.status_code == 200
                await asyncio.gather(*(worker() for _ in range(concurrency)))
            return ok

        return asyncio.run(run()) / seconds

    def open_loop(self, rate: float, seconds: float, tag: str
                  ) -> tuple[list[tuple[int, float, list[int]]], float]:
        """Requests at ``rate``/s for ``seconds`` from a light client (no simulation in the
        loop, so the client keeps its schedule); returns (status, latency s, level
        widths) per request and the wall seconds it took to send them all."""
        n = max(1, int(rate * seconds))
        bodies = self._bodies(n, tag)
        out: list[tuple[int, float, list[int]]] = []

        async def one(c: httpx.AsyncClient, body: dict[str, Any]) -> None:
            t0 = time.monotonic()
            try:
                r = await c.post("/v1/recommend", json=body)
            except httpx.HTTPError:
                out.append((0, time.monotonic() - t0, []))
                return
            widths = r.json().get("beam_widths", []) if r.status_code == 200 else []
            out.append((r.status_code, time.monotonic() - t0, widths))

        async def run() -> float:
            limits = httpx.Limits(max_connections=512, max_keepalive_connections=128)
            async with httpx.AsyncClient(base_url=self.urls["serve"], timeout=10,
                                         limits=limits) as c:
                t0 = time.monotonic()
                tasks = []
                for i, body in enumerate(bodies):
                    delay = t0 + i / rate - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    tasks.append(asyncio.create_task(one(c, body)))
                sent = time.monotonic() - t0
                await asyncio.gather(*tasks)
                return sent

        return out, asyncio.run(run())

    def load_phase(self, factor: float, capacity: float) -> dict[str, Any]:
        before = scrape(self.urls["serve"] + "/metrics")
        alphas: list[float] = []
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(0.25):
                alphas.append(self.metric("serve", "adloop_server_beam_scale_ratio"))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        results, sent_s = self.open_loop(capacity * factor, self.s.load_phase_s,
                                         f"load-{factor:g}x")
        stop.set()
        sampler.join()
        after = scrape(self.urls["serve"] + "/metrics")
        server_s = "adloop_server_request_duration_seconds"
        in_phase = {k: after[k] - before.get(k, 0.0) for k in after
                    if k.startswith(server_s + "_bucket")}
        server_p99 = histogram_quantile(in_phase, server_s, 0.99)
        ok_lat = sorted(lat for code, lat, _ in results if code == 200)
        level0 = [w[0] for code, _, w in results if code == 200 and w]
        t0 = time.monotonic()
        lag_recovered: float | None = None
        with contextlib.suppress(TimeoutError):
            self.wait_until("joiner lag to recover", lambda: self.metric(
                "join", "adloop_join_lag_records") < 50, 120)
            lag_recovered = time.monotonic() - t0
        row = {
            "load": f"{factor:g}x", "offered_per_s": round(capacity * factor, 1),
            "sent_per_s": round(len(results) / max(sent_s, 1e-9), 1),
            "requests": len(results), "ok": sum(c == 200 for c, _, _ in results),
            "shed_429": sum(c == 429 for c, _, _ in results),
            "other": sum(c not in (200, 429) for c, _, _ in results),
            "server_p99_ms": None if server_p99 is None else round(1000 * server_p99, 1),
            "client_p50_ms": round(1000 * statistics.median(ok_lat), 1) if ok_lat else None,
            "client_p99_ms": round(1000 * ok_lat[int(0.99 * (len(ok_lat) - 1))], 1)
            if ok_lat else None,
            "mean_beam_level0": round(statistics.fmean(level0), 2) if level0 else None,
            "min_beam_scale": round(min(alphas), 3) if alphas else None,
            "lag_recovery_s": None if lag_recovered is None else round(lag_recovered, 1),
        }
        self.say(f"  load {factor:g}x: {row}")
        return row

    # -- the run -------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        s = self.s
        try:
            self.setup()
            self.supervise()
            self.say("warm-up traffic")
            self.traffic(s.rate, s.phase_s)
            for name in s.fault_list():
                self.phase(name, self.injector(name))
                self.check_crash_loop()
            if s.load:
                cap = self.capacity()
                self.say(f"  server capacity ≈ {cap:.1f} requests/s (closed loop)")
                self.load_rows = [self.load_phase(f, cap) for f in (1.0, 2.0, 3.0)]
                self.load_capacity = cap
            tail = s.attribution_window_s / s.speed * 2 + 5
            self.say(f"tail traffic {tail:.0f}s: every attribution window closes")
            self.traffic(s.rate, tail)
            self.driver.finish(drain=True)
            self.producer.flush(60)
            self.settle()
            self.check_crash_loop()
            self.stop.set()
            self.stack.stop_supervisor()   # it must not restart what we stop now
            codes = {name: p.stop() for name, p in reversed(self.stack.processes.items())}
            return self.account(codes)
        finally:
            self.producer_close()
            self.demo.stack.stop()

    def producer_close(self) -> None:
        if hasattr(self, "producer"):
            with contextlib.suppress(Exception):
                self.producer.close()
        if hasattr(self, "ledger"):
            self.ledger.close()

    def settle(self) -> None:
        """Wait until the joiner and the learner have read everything produced."""
        def caught_up() -> bool:
            return self.metric("join", "adloop_join_lag_records") == 0
        with contextlib.suppress(TimeoutError):
            self.wait_until("the joiner to catch up", caught_up, 120)
        time.sleep(3.0)   # the last feedback reaches the learner; it checkpoints on stop

    def account(self, codes: dict[str, int | None]) -> dict[str, Any]:
        kafka = self.stack.kafka
        obs = observe(read_all(kafka, "impressions", timeout_s=20),
                      read_all(kafka, "feedback", timeout_s=20),
                      read_all(kafka, "dlq", timeout_s=20), kafka.topic_prefix)
        read_learner_ledger(self.out / "learner", obs, self.learner_positions())
        phase_of = {rid: r.name for r in self.results for rid in r.request_ids}
        rows = reconcile(self.ledger.entries, obs, phase_of, [r.name for r in self.results],
                         self.s.attribution_window_s, self.malformed)
        out: list[Row] = []
        for e in self.exits:
            if e["phase"] in rows:
                rows[e["phase"]].detail.setdefault("exited_and_restarted", []).append(
                    f"{e['process']} (exit {e['exit_code']})")
        for r in self.results:
            row = rows[r.name]
            row.events_in += r.snapshot_events
            row.accounted += r.snapshot_refused
            row.lost += r.snapshot_events - r.snapshot_refused
            row.recovery_s = None if r.recovery_s is None else round(r.recovery_s, 2)
            row.detail.update(r.detail)
            out.append(row)
        dicts = []
        for row in out:   # exits of the processes' own (not the fault's kill -9) per phase
            d = row.as_dict()
            d["process_exits"] = sum(e["phase"] == d["fault"] for e in self.exits)
            dicts.append(d)
        return {"rows": dicts, "load": self.load_rows, "exits": self.exits,
                "capacity_per_s": round(getattr(self, "load_capacity", 0.0), 1),
                "exit_codes": codes}

    def learner_positions(self) -> dict[int, int]:
        """The learner's checkpointed feedback positions (mirrored to its group)."""
        feedback = Topics(self.stack.kafka.topic_prefix).name("feedback")
        c = KafkaConsumer(bootstrap_servers=self.stack.kafka.bootstrap_servers,
                          group_id="adloop-learner", enable_auto_commit=False)
        try:
            out = {}
            for p in sorted(c.partitions_for_topic(feedback) or ()):
                off = c.committed(TopicPartition(feedback, p))
                if off is not None:
                    out[p] = int(off)
            return out
        finally:
            c.close()


def configure(parser: argparse.ArgumentParser) -> None:
    add_settings_arguments(parser, ChaosSettings)


def settings_of(args: argparse.Namespace) -> ChaosSettings:
    s = settings_from_args(ChaosSettings, args)
    if s.quick:
        s = s.model_copy(update={"phase_s": min(s.phase_s, 8.0),
                                 "load_phase_s": min(s.load_phase_s, 6.0),
                                 "pretrain_steps": min(s.pretrain_steps, 30),
                                 "log_requests": min(s.log_requests, 800)})
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return s
