"""``adloop demo``: the whole loop on the embedded stack, ending with a report.

1. start the embedded Apache Kafka broker and create the topics;
2. build the simulated ad world and log a random-policy phase (the pretraining data);
3. pretrain a small generative model on it (VSL + MTP, in this process);
4. start the joiner, the learner and the server as real processes, each with
   ``/metrics`` ``/healthz`` ``/readyz``; the learner publishes the pretrained model as
   the first snapshot and the server loads it; from then on a process that exits on
   its own is restarted with exponential backoff (``adloop.stack.Supervisor``, like
   compose's ``restart: unless-stopped``), and one in a crash loop stops the demo with
   exit status 1 and the end of its log;
5. drive open-loop traffic at the server for ``--minutes`` (simulated time runs
   ``--speed`` times faster): impressions from the server, clicks and delayed
   conversions from the simulated users, feedback from the joiner, RSPO updates and new
   snapshots from the learner, hot swaps in the server;
6. print the headline table and write ``summary.json``, ``report.md`` and PNG plots to
   the run directory; beside RPM, the beyond-accuracy metrics of the impressions served
   (:mod:`learner.beyond`: catalogue coverage, slate and SID diversity, novelty unseen and
   in bits, personalization) and of the frozen shadow's slates (``frozen_*``);
7. stop everything cleanly (also on Ctrl-C). ``--keep-running`` keeps traffic and
   endpoints up for dashboards until Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import shutil
import signal
import statistics
import threading
import time
import urllib.request
from collections import defaultdict
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from adloop.console import Console
from adloop.cores import free_cores, usable_cores
from adloop.evaluation import EvalConfig
from adloop.stack import CrashLoopError, LocalStack, RestartPolicy, free_port
from streams.kafka_io import EventProducer
from streams.logs import get_logger
from streams.metrics import start_metrics_server
from streams.settings import add_settings_arguments, settings_from_args
from traffic.driver import Emitter, HttpOptions, Ledger, RunStats, TrafficDriver
from traffic.world import DelayModel, World, WorldConfig

log = get_logger(__name__)


class DemoSettings(BaseSettings):
    """``adloop demo`` settings (env ADLOOP_DEMO_<NAME>, flags --name)."""

    model_config = SettingsConfigDict(env_prefix="ADLOOP_DEMO_", extra="ignore")

    minutes: float = Field(3.0, description="wall minutes of live traffic")
    rate: float = Field(15.0, description="requests per wall second (open loop)")
    speed: float = Field(120.0, description="simulated seconds per wall second")
    seed: int = Field(0, description="seed of the simulated world")
    n_users: int = Field(600, description="simulated users")
    n_ads: int = Field(150, description="ads at the start")
    new_ads_per_hour: float = Field(30.0, description="new ads per simulated hour")
    organic_slots: int = Field(0, ge=0, le=50, description="organic items (videos, "
                               "articles) per request next to the ads, placed by the same "
                               "model (0: ads-only answers, the default: with 3 slots the "
                               "live loop's online/frozen RPM fell to 0.41, not yet "
                               "explained; see learner/README.md)")
    log_requests: int = Field(4000, description="random-policy requests logged for pretraining")
    pretrain_steps: int = Field(300, description="pretraining steps")
    encoder: str = Field("minilm", description="ad content encoder (minilm or hashing)")
    out: Path = Field(Path("runs/demo"), description="run directory (logs, snapshots, report)")
    keep_running: bool = Field(False, description="keep traffic and endpoints up until Ctrl-C")
    metrics_port: int = Field(9304, description="the demo's own /metrics (traffic metrics)")
    server_port: int = Field(0, description="the server's HTTP port (0 = a free one)")
    server_replicas: int = Field(1, ge=1, description="serving replicas; more than 1: each "
                                 "on a port of its own, following model-updates itself, "
                                 "behind HAProxy on --server-port (health-checked on /readyz)")
    threads: int = Field(1, description="torch threads of the learner")
    bootstrap_servers: str = Field("", description="use this Kafka instead of starting the "
                                   "embedded broker")
    topic_prefix: str = Field("", description="prepended to every topic name")
    snapshot_every_s: float = Field(15.0, description="the learner publishes at least this "
                                    "often (wall seconds) while it trains")
    observation_window_s: float = Field(300.0, description="joiner observation window "
                                        "(simulated seconds until the provisional list)")
    attribution_window_s: float = Field(3600.0, description="joiner attribution window "
                                        "(simulated seconds; also the world's conversion "
                                        "delay scale)")
    restart_backoff_s: float = Field(1.0, description="first restart delay of a process "
                                     "that exited on its own (doubles per exit in a row)")
    restart_backoff_max_s: float = Field(30.0, description="longest restart delay")
    crash_loop_exits: int = Field(5, description="this many exits of one process within "
                                  "--crash-loop-window-s stop the demo (crash loop)")
    crash_loop_window_s: float = Field(120.0, description="crash-loop window (wall seconds)")
    control_share: float = Field(0.5, ge=0, lt=1, description="share of the users in the "
                                 "live A/B test's control bucket, served by the pretrained "
                                 "model (pinned); the rest get the online model (0 = no test)")
    shadow_frozen: bool = Field(False, description="also a frozen copy of the pretrained "
                                "model answering every request in shadow (never served, so "
                                "its ads never spend budget or wear out: not an A/B control; "
                                "the world scores its slates for the frozen_* figures)")
    verbose: bool = Field(False, description="show every log line on the console (default: "
                          "steps, a progress line and the summary; logs go to files under "
                          "the run directory)")


HARNESS = EvalConfig()
"""The closed-loop harness's defaults: the live loop explores and trains at its cadence."""


# -- small helpers ---------------------------------------------------------------------


def organic_summary(stats: RunStats, driver: TrafficDriver) -> dict[str, Any]:
    """The mixed feeds' figures of a run (empty when no organic item was shown)."""
    n = stats.organic_impressions
    if not n:
        return {}
    rows = driver.organic_responses
    q = max(1, len(rows) // 4)

    def per_item(part: list[Any]) -> float | None:
        shown = sum(r.impressions for r in part)
        return round(sum(r.expected_engagement for r in part) / shown, 4) if shown else None

    return {"organic_items_shown": n,
            "organic_view_rate": round(stats.organic_views / n, 4),
            "organic_like_rate": round(stats.organic_likes / n, 4),
            "organic_dwell_s_per_item": round(stats.organic_dwell_s / n, 2),
            "organic_engagement_first_quarter": per_item(rows[:q]),
            "organic_engagement_last_quarter": per_item(rows[-q:])}


def scrape(url: str) -> dict[str, float]:
    """A process's /metrics as {'name{label="v",...}': value} (samples only)."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(url, timeout=3) as resp:
            text = resp.read().decode()
    except OSError:
        return {}
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def metric_sum(samples: Mapping[str, float], name: str, **labels: str) -> float:
    total = 0.0
    for key, v in samples.items():
        base = key.split("{", 1)[0]
        if base != name:
            continue
        if all(f'{k}="{val}"' in key for k, val in labels.items()):
            total += v
    return total


def histogram_quantile(samples: dict[str, float], name: str, q: float) -> float | None:
    """Quantile from cumulative ``name_bucket`` samples (linear within a bucket)."""
    buckets: dict[float, float] = defaultdict(float)
    for key, v in samples.items():
        if key.startswith(name + "_bucket{"):
            le = key.split('le="', 1)[1].split('"', 1)[0]
            buckets[math.inf if le == "+Inf" else float(le)] += v
    if not buckets or buckets[max(buckets)] == 0:
        return None
    edges = sorted(buckets)
    total = buckets[edges[-1]]
    prev_edge, prev_count = 0.0, 0.0
    for e in edges:
        if buckets[e] >= q * total:
            if math.isinf(e):
                return prev_edge
            frac = (q * total - prev_count) / max(buckets[e] - prev_count, 1e-12)
            return prev_edge + frac * (e - prev_edge)
        prev_edge, prev_count = e, buckets[e]
    return prev_edge


def fmt_interval(bounds: Sequence[float | None]) -> str:
    return "[" + ", ".join("–" if b is None else f"{b:.1f}" for b in bounds) + "]"


def ab_versions(scraped: Mapping[str, Mapping[str, float]]) -> dict[str, str]:
    """Bucket -> the model version its server reports serving
    (``adloop_server_ab_model_version_info``; the control's is pinned)."""
    out: dict[str, str] = {}
    for samples in scraped.values():
        for key, v in samples.items():
            if key.startswith("adloop_server_ab_model_version_info{") and v:
                labels = dict(part.split("=", 1) for part in key[key.index("{") + 1:-1]
                              .split(","))
                out[labels["bucket"].strip('"')] = labels["version"].strip('"')
    return out


def ab_summary(rows: Sequence[Mapping[str, Any]], control_share: float,
               versions: Mapping[str, str], learn: Mapping[str, float]) -> dict[str, Any]:
    """The live A/B test, scored by the world: each request's bucket (the server's user
    hash; a control user served before the control model was loaded is outside the
    test), expected revenue per mille impressions per bucket in the first and last
    quarter of the run and over all of it, the always-valid test of
    :mod:`learner.abtest` on per-request expected revenue, and what the learner's live
    test (on realized revenue from the joined feedback) decided and did."""
    if control_share <= 0:
        return {}
    from learner.abtest import RevenueTest
    from server.abtest import CONTROL, ONLINE, assign
    from server.settings import ServerSettings

    salt = ServerSettings.model_fields["ab_salt"].default
    control_version = versions.get(CONTROL, "")

    def bucket(r: Mapping[str, Any]) -> str:
        b = assign(str(r["user"]), control_share, salt)
        return "" if b == CONTROL and r["version"] != control_version else b

    tagged = [(bucket(r), r) for r in rows]
    q = max(1, len(tagged) // 4)

    def rpm(part: Sequence[tuple[str, Mapping[str, Any]]], b: str) -> float | None:
        imp = sum(r["imp"] for x, r in part if x == b)
        return round(1000.0 * sum(r["exp"] for x, r in part if x == b) / imp, 3) \
            if imp else None

    def ratio(a: float | None, c: float | None) -> float | None:
        return round(a / c, 4) if a is not None and c else None

    test = RevenueTest()
    for b, r in tagged:
        if b:
            test.add(b, float(r["exp"]))
    res = test.result().evidence()
    out: dict[str, Any] = {
        "control_version": control_version,
        "requests_online": sum(1 for b, _ in tagged if b == ONLINE),
        "requests_control": sum(1 for b, _ in tagged if b == CONTROL),
        "requests_outside_test": sum(1 for b, _ in tagged if not b)}
    for name, part in (("first_quarter", tagged[:q]), ("last_quarter", tagged[-q:]),
                       ("whole_run", tagged)):
        out[f"online_rpm_{name}"] = rpm(part, ONLINE)
        out[f"control_rpm_{name}"] = rpm(part, CONTROL)
    out["online_over_control"] = ratio(out["online_rpm_last_quarter"],
                                       out["control_rpm_last_quarter"])
    out["online_over_control_first_quarter"] = ratio(out["online_rpm_first_quarter"],
                                                     out["control_rpm_first_quarter"])
    out["online_over_control_whole_run"] = ratio(out["online_rpm_whole_run"],
                                                 out["control_rpm_whole_run"])
    out["ab_rpm_diff"] = res["rpm_diff"]
    out["ab_rpm_diff_interval"] = [res["rpm_diff_lower"], res["rpm_diff_upper"]]
    out["ab_decision"] = res["decision"]
    out["live_test_rpm_diff"] = metric_sum(learn, "adloop_learner_abtest_rpm_difference",
                                           stat="estimate")
    out["live_test_rpm_diff_interval"] = [
        metric_sum(learn, "adloop_learner_abtest_rpm_difference", stat=s)
        for s in ("lower", "upper")]
    out["live_test_decisions"] = {
        d: metric_sum(learn, "adloop_learner_abtest_decisions_total", decision=d)
        for d in ("online_worse", "online_better")}
    out["rollbacks"] = metric_sum(learn, "adloop_learner_abtest_rollbacks_total",
                                  result="published")
    return out


def beyond_summary(users: Sequence[str], slates: Sequence[Sequence[str]], world: World,
                   prefix: Mapping[str, Hashable] | None = None,
                   bits: Callable[[str], float] | None = None,
                   prior: Mapping[str, Iterable[str]] | None = None, seed: int = 0,
                   prefix_key: str = "") -> dict[str, float | None]:
    """The beyond-accuracy metrics of ``slates`` shown to ``users`` in ``world`` (every ad
    it created servable; categories from the world; ``prefix``: semantic-ID level-0 codes),
    rounded to 4 places, None where undefined, each key prefixed by ``prefix_key``."""
    from learner.beyond import beyond_accuracy

    values = beyond_accuracy(
        users, slates, servable=len(world.ads), category_of=lambda a: world.ads[a].category,
        prefix_of=(lambda a: prefix.get(a, a)) if prefix is not None else None, bits=bits,
        prior=prior, seed=seed)
    return {prefix_key + k: round(v, 4) if math.isfinite(v) else None
            for k, v in values.items()}


# -- the run ---------------------------------------------------------------------------


class Demo:
    def __init__(self, s: DemoSettings) -> None:
        self.s = s
        self.run_dir = Path(s.out)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.stop = threading.Event()
        self.stack = LocalStack(self.run_dir / "stack", s.bootstrap_servers or None,
                                s.topic_prefix)
        self.step_no = 0
        self.t0 = time.monotonic()
        self.crash_loop: CrashLoopError | None = None
        self.pretrained: tuple[Any, Any] | None = None
        """(model, tokenizer) after pretraining: the frozen shadow's starting point."""
        self.console: Console | None = None
        """Set by :func:`run`: steps and progress on the console, logs to files."""
        self.replicas: list[str] = ["serve"]
        """The serving processes (``serve``, or ``serve-1`` ... behind ``lb``)."""
        self.logs: list[Any] = []
        """The logging phase's feedback: what each user was shown before the traffic and
        the click popularity novelty is measured against."""
        self.shadow_slates: dict[str, list[str]] = {}
        """request id -> the frozen shadow's slate (the first k ads of its answer)."""

    def say(self, msg: str) -> None:
        line = f"[{time.monotonic() - self.t0:6.1f}s] {msg}"
        if self.console is not None:
            self.console.say(line)
        else:
            print(line, flush=True)

    def progress(self, msg: str) -> None:
        """The live progress line (redrawn in place on a terminal)."""
        line = f"[{time.monotonic() - self.t0:6.1f}s] {msg}"
        if self.console is not None:
            self.console.progress(line)
        else:
            print(line, flush=True)

    def step(self, msg: str) -> None:
        self.step_no += 1
        self.say(f"({self.step_no}/7) {msg}")

    # 1-3 ---------------------------------------------------------------------------------
    def prepare(self) -> tuple[World, Path]:
        s = self.s
        self.step("starting Apache Kafka (embedded, KRaft) and creating topics")
        self.stack.start_broker()
        version = self.stack.broker.version if self.stack.broker else "(external)"
        self.say(f"     Kafka {version} on {self.stack.kafka.bootstrap_servers}")
        self.step(f"simulated world (seed {s.seed}): {s.n_users} users, {s.n_ads} ads; "
                  f"logging {s.log_requests} random-policy requests for pretraining")
        world = World(WorldConfig(seed=s.seed, n_users=s.n_users, n_ads=s.n_ads,
                                  new_ads_per_hour=s.new_ads_per_hour, request_rate=2.0,
                                  organic_slots=s.organic_slots,
                                  delays=DelayModel(window_s=s.attribution_window_s)))
        from adloop.evaluation import logging_phase

        logs = self.logs = logging_phase(world, EvalConfig(log_requests=s.log_requests),
                                         s.seed)
        import torch

        from learner.pretrain import PretrainSettings, pretrain

        threads = free_cores()
        torch.set_num_threads(threads)
        self.step(f"pretraining the generative recommender ({s.pretrain_steps} steps, "
                  f"{s.encoder} ad encoder, {threads} of {usable_cores()} cores free)")

        pre_dir = self.run_dir / "pretrain"
        shutil.rmtree(pre_dir, ignore_errors=True)
        with self.pretrain_progress(s.pretrain_steps):
            res = pretrain(PretrainSettings(
            run_dir=pre_dir, encoder=s.encoder, steps=s.pretrain_steps, level_sizes="64,32,16",
            history_len=10, batch_size=128, seed=s.seed, progress=False, checkpoint_every=0,
                held_out_frac=0.05, resume=False), [a.record for a in world.ads.values()],
                logs, world.organic_items() if s.organic_slots else None)
        self.say("     held-out: " + ", ".join(f"{k}={v:.3f}" for k, v in res.metrics.items()))
        self.pretrained_ads = len(res.tokenizer)
        self.pretrained = (res.model, res.tokenizer)
        return world, pre_dir

    @contextlib.contextmanager
    def pretrain_progress(self, steps: int) -> Iterator[None]:
        """A progress line while pretraining runs in this process: its step counter
        (``adloop_pretrain_steps_total``) and the rate, redrawn every two seconds."""
        from prometheus_client import REGISTRY

        def taken() -> float:
            return REGISTRY.get_sample_value("adloop_pretrain_steps_total") or 0.0

        start, t0, done = taken(), time.monotonic(), threading.Event()

        def show() -> None:
            while True:
                n = int(taken() - start)
                rate = n / max(time.monotonic() - t0, 1e-9)
                phase = (f"step {n}/{steps} ({rate:.1f} steps/s)" if n < steps
                         else "fitting the value model and evaluating")
                self.progress(f"     pretraining: {phase}")
                if done.wait(2.0):
                    return

        watcher = threading.Thread(target=show, name="pretrain-progress", daemon=True)
        watcher.start()
        try:
            yield
        finally:
            done.set()
            watcher.join()

    # 4 -----------------------------------------------------------------------------------
    def start_processes(self, pre_dir: Path) -> dict[str, str]:
        st = self.stack
        self.step("starting joiner, stats, learner and server (real processes)")
        ports = {"join": free_port(), "stats": free_port(), "learn": free_port(),
                 "serve": self.s.server_port or free_port()}
        kafka = st.kafka_args()
        st.add("join", ["join", *kafka, "--metrics-port", str(ports["join"]),
                        "--observation-window-s", str(self.s.observation_window_s),
                        "--attribution-window-s", str(self.s.attribution_window_s)],
               f"http://127.0.0.1:{ports['join']}/readyz")
        # windowed ad/advertiser/industry statistics (faust-streaming, at-least-once)
        st.add("stats", ["stats", *kafka, "--metrics-port", str(ports["stats"]),
                         "--data-dir", str(self.run_dir / "stats")],
               f"http://127.0.0.1:{ports['stats']}/readyz")
        st.add("learn", ["learn", *kafka, "--init-run-dir", str(pre_dir),
                         "--state-dir", str(self.run_dir / "learner"),
                         "--snapshot-store", str(self.run_dir / "snapshots"),
                         "--metrics-port", str(ports["learn"]),
                         *self.learner_cadence(),
                         "--snapshot-every-s", str(self.s.snapshot_every_s),
                         "--threads", str(self.s.threads)],
               f"http://127.0.0.1:{ports['learn']}/readyz")
        servers = st.add_servers([*kafka, "--snapshot-bases", str(self.run_dir / "snapshots"),
                                  "--explore", str(HARNESS.explore),
                                  "--control-share", str(self.s.control_share),
                                  "--control-version", "pretrained",
                                  "--explore-seed", str(self.s.seed)],
                                 self.s.server_replicas, ports["serve"],
                                 self.run_dir / "server-cache")
        urls = {name: f"http://127.0.0.1:{p}" for name, p in ports.items()}
        for name in servers:                    # each replica's own /metrics
            urls[name] = str(st.processes[name].ready_url).removesuffix("/readyz")
        shutil.rmtree(self.run_dir / "learner", ignore_errors=True)
        shutil.rmtree(self.run_dir / "snapshots", ignore_errors=True)
        names = ["join", "stats", "learn", *servers, *(["lb"] if "lb" in st.processes else [])]
        for name in names:
            st.processes[name].start()
        for name in names:
            st.processes[name].wait_ready(300)
            where = (f"{urls['serve']}, HAProxy in front of {len(servers)} replicas"
                     if name == "lb" else f"{urls[name]}/metrics")
            self.say(f"     {name} ready (pid {st.processes[name].pid}, {where})")
        self.supervise()
        self.replicas = servers
        return urls

    SNAPSHOT_EVERY_UPDATES: ClassVar[int] = 10
    """The live learner's update trigger for a snapshot (besides ``snapshot_every_s``).
    The harness publishes after every update because an export costs it no traffic; live,
    an export of the default model takes the learner about 2.6 s on 2 cores, and a
    snapshot after every update left it exporting for most of the run (seed 0: 51
    snapshots, 54 updates, 1,728 lists trained, against 78 updates and 2,511 lists at
    this cadence), so the time cadence governs, as docs/scale.md advises."""

    @classmethod
    def learner_cadence(cls) -> list[str]:
        """The live learner trains as the closed-loop harness's learning policies do: an
        update per ``batch`` feedback lists (waiting long enough for a batch to fill at
        the demo's rate); it publishes every :attr:`SNAPSHOT_EVERY_UPDATES` updates or
        ``snapshot_every_s`` seconds."""
        return ["--batch-lists", str(HARNESS.batch), "--max-wait-s", "5.0",
                "--snapshot-every-updates", str(cls.SNAPSHOT_EVERY_UPDATES)]

    def supervise(self) -> None:
        """Restart a process that exits on its own (with backoff); a crash loop stops
        the demo (:class:`adloop.stack.Supervisor`)."""
        s = self.s

        def on_crash_loop(err: CrashLoopError) -> None:
            self.crash_loop = err
            self.stop.set()

        self.stack.supervise(RestartPolicy(
            backoff_initial_s=s.restart_backoff_s, backoff_max_s=s.restart_backoff_max_s,
            crash_loop_exits=s.crash_loop_exits, crash_loop_window_s=s.crash_loop_window_s),
            on_crash_loop=on_crash_loop)

    def restarts(self) -> dict[str, int]:
        return {name: p.restarts for name, p in self.stack.processes.items()}

    def restarts_text(self) -> str:
        r = self.restarts()
        return f"restarts {sum(r.values())}" + (
            " (" + " ".join(f"{k}={v}" for k, v in r.items() if v) + ")" if any(r.values())
            else "")

    # 5 -----------------------------------------------------------------------------------
    def traffic(self, world: World, urls: dict[str, str]) -> tuple[RunStats, TrafficDriver]:
        s = self.s
        duration = 0.0 if s.keep_running else s.minutes * 60.0
        self.step(f"driving traffic: {s.rate:g} req/s for "
                  f"{'ever (Ctrl-C stops)' if s.keep_running else f'{s.minutes:g} min'}, "
                  f"simulated time ×{s.speed:g}")
        producer = EventProducer(self.stack.kafka)
        ledger = Ledger(self.run_dir / "ledger.jsonl", keep=True)
        driver = TrafficDriver(world, Emitter(producer=producer, ledger=ledger))
        driver.keep_responses = True
        if s.shadow_frozen and self.pretrained is not None:
            from adloop.policies import GenerativePolicy

            frozen = GenerativePolicy("frozen", world, *self.pretrained, update="none",
                                      beam_width=32)

            def shadow(reqs: list[Any]) -> list[list[str]]:
                slates = [sl.ad_ids() for sl in frozen.recommend_batch(reqs)]
                for r, ids in zip(reqs, slates, strict=True):   # asked for 2 k
                    self.shadow_slates[r.request_id] = ids[:max(1, r.k // 2)]
                return slates

            driver.shadow = shadow
            # scored after the traffic (each slate against the values its request saw),
            # so the shadow's inference takes no time from serving; a long run flushes
            # every 2048 requests to bound the queued value tables
            driver.shadow_batch = 2048 if s.keep_running else 10**9
        driver.start()
        for ad in world.ad_records():           # the catalog as it stands after logging
            driver.emitter.emit("ads", ad)
        opts = HttpOptions(server_url=urls["serve"], rate=s.rate, speed=s.speed,
                           duration_s=duration, timeout_s=2.0)

        def progress(stats: RunStats, in_flight: int) -> None:
            learn = scrape(urls["learn"] + "/metrics")
            join = scrape(urls["join"] + "/metrics")
            self.progress(
                f"     sim {time.strftime('%H:%M', time.gmtime(stats.sim_end))} | "
                f"requests {stats.requests} ({dict(stats.outcomes)}) | revenue "
                f"{stats.revenue:.1f} | feedback "
                f"{metric_sum(join, 'adloop_join_feedback_total'):.0f} | trained "
                f"{metric_sum(learn, 'adloop_learner_lists_total', outcome='trained'):.0f} | "
                f"model v{metric_sum(learn, 'adloop_learner_model_version'):.0f} | "
                f"{self.restarts_text()}")

        stats = asyncio.run(driver.run_http(opts, self.stop, drain=True,
                                            on_progress=progress))
        driver.flush_shadow()
        producer.flush()
        producer.close()
        ledger.close()
        return stats, driver

    # 6 -----------------------------------------------------------------------------------
    def report(self, stats: RunStats, driver: TrafficDriver,
               urls: dict[str, str]) -> dict[str, Any]:
        self.step("report")
        time.sleep(3.0)  # let the last scrapes settle
        # each process once: with replicas, "serve" is HAProxy (one replica per scrape)
        scraped = {name: scrape(url + "/metrics") for name, url in urls.items()
                   if not (name == "serve" and "serve" not in self.replicas)}
        req_entries = {e["request_id"]: e for e in driver.emitter.ledger.of_kind("request")} \
            if driver.emitter.ledger else {}
        timeline: list[dict[str, Any]] = []
        for resp in driver.responses:
            e = req_entries.get(resp.request_id, {})
            shadow_exp, shadow_imp = driver.shadow_values.get(resp.request_id, (0.0, 0))
            timeline.append({"t": resp.event_time, "exp": resp.expected_value,
                             "user": e.get("user_id") or "",
                             "rev": resp.reward, "imp": resp.impressions,
                             "version": e.get("model_version") or "",
                             "latency": e.get("latency_s"), "shadow_exp": shadow_exp,
                             "shadow_imp": shadow_imp})
        latencies = [e["latency_s"] for e in req_entries.values() if e.get("latency_s")]
        versions = sorted({t["version"] for t in timeline if t["version"]})
        n = len(timeline)
        q = max(1, n // 4)
        first, last = timeline[:q], timeline[-q:]

        def rpm(rows: list[dict[str, Any]], key: str = "exp", imp_key: str = "imp") -> float:
            imp = sum(r[imp_key] for r in rows)
            return 1000.0 * sum(r[key] for r in rows) / imp if imp else 0.0

        frozen_last = rpm(last, "shadow_exp", "shadow_imp")

        learn, join = scraped.get("learn", {}), scraped.get("join", {})
        summary: dict[str, Any] = {
            "requests": stats.requests, "outcomes": dict(stats.outcomes),
            "impressions": stats.impressions, "clicks": stats.clicks,
            "conversions": stats.conversions, "revenue": round(stats.revenue, 2),
            "sim_hours": round((stats.sim_end - stats.sim_start) / 3600.0, 2),
            "rpm_first_quarter": round(rpm(first), 3), "rpm_last_quarter": round(rpm(last), 3),
            "realized_rpm_all": round(rpm(timeline, "rev"), 3),
            "model_versions_served": versions,
            "latency_p50_ms": round(1000 * statistics.median(latencies), 2) if latencies else None,
            "latency_p99_ms": round(1000 * sorted(latencies)[int(0.99 * (len(latencies) - 1))],
                                    2) if latencies else None,
            "feedback_lists": metric_sum(join, "adloop_join_feedback_total"),
            "dead_letters": sum(metric_sum(s, "adloop_dead_letters_total")
                                for s in scraped.values()),
            "lists_trained": metric_sum(learn, "adloop_learner_lists_total", outcome="trained"),
            "rspo_updates": metric_sum(learn, "adloop_learner_updates_total"),
            "snapshots_published": metric_sum(learn, "adloop_learner_snapshots_published_total"),
            "snapshots_refused": metric_sum(learn, "adloop_learner_snapshots_refused_total"),
            "learner_freshness_p50_s": histogram_quantile(learn, "adloop_learner_freshness_seconds",
                                                          0.5),
            "learner_freshness_p95_s": histogram_quantile(learn, "adloop_learner_freshness_seconds",
                                                          0.95),
            "server_swaps_ok": sum(metric_sum(scraped.get(name, {}), "adloop_server_swaps_total",
                                              result="ok") for name in self.replicas),
            "process_restarts": self.restarts(),
            "frozen_rpm_first_quarter": round(rpm(first, "shadow_exp", "shadow_imp"), 3),
            "frozen_rpm_last_quarter": round(frozen_last, 3),
            "online_over_frozen_last_quarter": round(rpm(last) / frozen_last, 4)
            if frozen_last else None,
        }
        summary.update(ab_summary(timeline, self.s.control_share, ab_versions(scraped),
                                  learn))
        summary.update(organic_summary(stats, driver))
        if stats.organic_impressions:
            summary["organic_engagements_joined"] = metric_sum(
                join, "adloop_join_organic_engagements_total")
        summary.update(self.beyond(driver, req_entries))
        self._plots(timeline, latencies)
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        table = "\n".join(f"| {k} | {v} |" for k, v in summary.items())
        md = ("# adloop demo report\n\n"
              f"Seed {self.s.seed}, {self.s.minutes:g} wall minutes at {self.s.rate:g} req/s, "
              f"simulated time ×{self.s.speed:g}.\n\n| figure | value |\n|---|---|\n{table}\n\n"
              "RPM = expected revenue per 1000 impressions (ground-truth expected value of "
              "each shown ad). Beyond accuracy, of the impressions served (`frozen_`: "
              "the shadow's slates for the same requests): catalogue coverage (share of the "
              "ads created by the end shown at least once), slate diversity (distinct "
              "categories / slate length), SID diversity (share of a slate's ad pairs in "
              "different semantic-ID level-0 clusters), novelty unseen (share of shown ads "
              "the user had not been shown before) and in bits (-log2 of the ad's share of "
              "the logging phase's clicks), personalization (1 - mean Jaccard overlap of "
              "two users' slates). Mixed feeds (`organic_*`): organic items shown, the "
              "share viewed and liked, dwell seconds per item shown, and the true expected "
              "engagement per item, P(view)·(1 + P(like | view)), in the first and last "
              "quarter.\n\n![revenue per mille over simulated time](rpm.png)\n\n"
              "![latency](latency.png)\n")
        (self.run_dir / "report.md").write_text(md)
        table = "\n" + "\n".join(f"  {k:28s} {v}" for k, v in summary.items())
        if self.console is not None:
            self.console.say(table)
        else:
            print(table, flush=True)
        if summary.get("online_over_control") is not None:
            self.say(f"last quarter: online {summary['online_rpm_last_quarter']:.1f} RPM vs "
                     f"control {summary['control_rpm_last_quarter']:.1f} RPM "
                     f"(×{summary['online_over_control']:.3f}); whole run "
                     f"×{summary['online_over_control_whole_run']:.3f}; online - control "
                     f"{summary['ab_rpm_diff']:.1f} per 1000 requests, always-valid 95 % "
                     f"interval {fmt_interval(summary['ab_rpm_diff_interval'])} "
                     f"({summary['ab_decision']}); "
                     f"rollbacks {summary['rollbacks']:.0f}")
        if driver.shadow_values:
            self.say(f"last quarter: online {summary['rpm_last_quarter']:.1f} RPM vs frozen "
                     f"(shadow, never served) {summary['frozen_rpm_last_quarter']:.1f} RPM")
        self.say(f"report: {self.run_dir / 'report.md'}")
        return summary

    def beyond(self, driver: TrafficDriver,
               req_entries: Mapping[str, Mapping[str, Any]]) -> dict[str, float | None]:
        """Beyond-accuracy metrics of the impressions served (and ``frozen_*`` of the
        shadow's slates for the same requests): history from the logging phase on, novelty
        bits against its clicks, level-0 codes of the pretrained tokenizer."""
        from adloop.evaluation import SidPrefixes
        from learner.beyond import click_bits

        world = driver.world
        prior: dict[str, set[str]] = {}
        for fb in self.logs:
            prior.setdefault(fb.user_id, set()).update(it.ad_id for it in fb.items)
        prefix = SidPrefixes(self.pretrained[1])(world) if self.pretrained else None
        bits = click_bits(self.logs) if self.logs else None
        users = [str(req_entries.get(r.request_id, {}).get("user_id", "")) for r in
                 driver.responses]
        out = beyond_summary(users, [[o.ad_id for o in r.items] for r in driver.responses],
                             world, prefix, bits, prior, self.s.seed)
        if self.shadow_slates:
            known = [(u, self.shadow_slates[r.request_id])
                     for u, r in zip(users, driver.responses, strict=True)
                     if r.request_id in self.shadow_slates]
            out.update(beyond_summary([u for u, _ in known],
                                      [[a for a in ids if a in world.ads] for _, ids in known],
                                      world, prefix, bits, prior, self.s.seed, "frozen_"))
        return out

    def _plots(self, timeline: list[dict[str, Any]], latencies: list[float]) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        if timeline:
            t0 = timeline[0]["t"]
            n_buckets = 24
            span = max(1e-9, timeline[-1]["t"] - t0)
            sums: dict[int, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0, 0.0])
            for r in timeline:
                b = min(n_buckets - 1, int((r["t"] - t0) / span * n_buckets))
                sums[b][0] += r["exp"]
                sums[b][1] += r["imp"]
                sums[b][2] += r["shadow_exp"]
                sums[b][3] += r["shadow_imp"]
            xs = [(b + 0.5) * span / n_buckets / 3600 for b in sorted(sums)]
            ys = [1000 * sums[b][0] / sums[b][1] if sums[b][1] else 0 for b in sorted(sums)]
            fig, ax = plt.subplots(figsize=(8, 4))
            ax.plot(xs, ys, marker="o", label="online (served)")
            if any(sums[b][3] for b in sums):
                ax.plot(xs, [1000 * sums[b][2] / sums[b][3] if sums[b][3] else 0
                             for b in sorted(sums)], marker="x", linestyle="--",
                        label="frozen pretrained model (shadow, never served)")
                ax.legend(fontsize=8)
            seen = ""
            for r in timeline:
                if r["version"] and r["version"] != seen:
                    ax.axvline((r["t"] - t0) / 3600, color="grey", alpha=0.3)
                    seen = r["version"]
            ax.set_xlabel("simulated hours (grey lines: a new model version served)")
            ax.set_ylabel("expected RPM")
            ax.grid(alpha=0.3)
            fig.tight_layout()
            fig.savefig(self.run_dir / "rpm.png", dpi=110)
            plt.close(fig)
        if latencies:
            fig, ax = plt.subplots(figsize=(6, 3.5))
            ax.hist([1000 * x for x in latencies], bins=50)
            ax.set_xlabel("request latency at the client (ms)")
            ax.set_ylabel("requests")
            fig.tight_layout()
            fig.savefig(self.run_dir / "latency.png", dpi=110)
            plt.close(fig)

    def shutdown(self) -> None:
        self.step("stopping processes and the broker")
        codes = self.stack.stop()
        self.say("     exit codes: " + ", ".join(f"{k}={v}" for k, v in codes.items()))


def configure(parser: argparse.ArgumentParser) -> None:
    add_settings_arguments(parser, DemoSettings)


def run(args: argparse.Namespace) -> int:
    s = settings_from_args(DemoSettings, args)
    demo = Demo(s)

    def on_signal(signum: int, _frame: object) -> None:
        demo.say(f"{signal.Signals(signum).name}: finishing up")
        demo.stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    metrics = start_metrics_server(s.metrics_port, "127.0.0.1")
    console = demo.console = Console(demo.run_dir / "logs" / "demo.log", s.verbose).__enter__()
    if console.quiet:
        demo.say(f"logs: {console.log_path} (this process and the broker), "
                 f"{demo.stack.run_dir / 'logs'}/<process>.log (joiner, stats, learner, "
                 f"server); --verbose shows them here")
    try:
        world, pre_dir = demo.prepare()
        urls = demo.start_processes(pre_dir)
        stats, driver = demo.traffic(world, urls)
        if demo.crash_loop is not None:
            demo.say(f"stopping: {demo.crash_loop}")
            return 1
        demo.report(stats, driver, urls)
    finally:
        demo.shutdown()
        metrics.stop()
        console.close()
    return 0
