"""``adloop replay``: simulated or recorded traffic against the server and Kafka.

Three modes:

* **simulated, HTTP** (default): a seeded :class:`~traffic.world.World` sends
  open-loop requests at ``--rate`` per wall second to ``--server-url``; responses
  are sampled from the ground truth; clicks/conversions/ads go to Kafka at their
  event times (``--speed`` simulated seconds per wall second). With
  ``--organic-slots M`` requests ask for a mixed feed of M organic items, and the
  users' views, likes and dwells go to ``organic-engagements``.
* **simulated, in-process** (``--policy oracle|random``): no server; the policy
  ranks and the driver also produces ``impressions``. Fully deterministic.
* **recorded** (``--from FILE``): replays a recorded log (docs/traffic.md) at
  ``--speed``× preserving inter-arrival times: requests to the server, ads/clicks/
  conversions/organic items and engagements (and impressions when no server is used)
  to Kafka.

``--record FILE`` writes the recorded format from a simulated run, ``--ledger FILE``
the request/event ledger. ``--convert-criteo TSV --record FILE`` converts the Criteo
attribution dataset. The summary (counts, outcomes, sha256 of the produced events)
is printed as JSON at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from streams.joiner_core import end_of_stream_marker
from streams.kafka_io import EventProducer
from streams.logs import get_logger
from streams.schemas import encode
from streams.settings import KafkaSettings, add_settings_arguments, settings_from_args
from traffic.driver import (
    BAD_LINES,
    GAPS_CLAMPED,
    LATENCY,
    REQUESTS,
    SIM_TIME,
    Emitter,
    HttpOptions,
    HttpRecommender,
    Ledger,
    RunStats,
    SimClock,
    TrafficDriver,
    policy_by_name,
    sleep_until,
)
from traffic.recorded import Recorded, RecordError, RecordWriter, read_recorded
from traffic.world import DEFAULT_START_TIME, DelayModel, World, WorldConfig

log = get_logger(__name__)


class ReplaySettings(BaseSettings):
    """Settings of ``adloop replay`` (env ``ADLOOP_REPLAY_*``)."""

    model_config = SettingsConfigDict(env_prefix="ADLOOP_REPLAY_", extra="ignore")

    server_url: str = Field("http://127.0.0.1:8000", description="the serving worker")
    seed: int = Field(0, description="seed of the simulated world")
    rate: float = Field(20.0, description="requests per wall second (Poisson arrivals)")
    speed: float = Field(60.0, description="simulated seconds per wall second "
                         "(recorded replay: N× speed; 0 = as fast as possible)")
    duration: float = Field(0.0, description="stop after this many wall seconds (0 = no limit)")
    requests: int = Field(0, description="stop after this many requests (0 = no limit)")
    n_users: int = Field(2000, description="simulated users")
    n_ads: int = Field(200, description="ads at the start")
    new_ads_per_hour: float = Field(6.0, description="new ads per simulated hour")
    slate_size: int = Field(5, description="k of each recommend request")
    organic_slots: int = Field(0, ge=0, description="organic items each request asks for "
                               "next to the ads (organic_k of a mixed feed; 0 = ads-only)")
    start_time: float = Field(DEFAULT_START_TIME,
                              description="simulated start (epoch s); 0 = now")
    attribution_window_s: float = Field(3600.0, description="attribution window (sim s); "
                                        "scales the conversion delay distribution")
    budget_scale: float = Field(1.0, description="multiplies every ad budget")
    run_id: str = Field("", description="request id prefix (default sim<seed>)")
    policy: str = Field("", description="'' = the HTTP server; oracle|random = in-process")
    timeout_s: float = Field(2.0, description="HTTP request timeout")
    max_in_flight: int = Field(256, description="cap on outstanding HTTP requests")
    metrics_port: int = Field(0, description="port of /metrics /healthz /readyz (0 = any)")
    metrics_host: str = Field("127.0.0.1", description="address of the metrics endpoint")
    from_file: Path | None = Field(None, description="recorded log to replay (JSONL/Parquet)")
    record_file: Path | None = Field(None, description="write a recorded log of this run")
    ledger_file: Path | None = Field(None, description="write the request/event ledger")
    on_error: Literal["skip", "stop"] = Field("skip", description="bad recorded line: "
                                              "skip it (reported) or stop")
    max_gap_s: float = Field(3600.0, gt=0, description="recorded replay: the most recorded "
                             "seconds the pacing waits for between two lines; a larger jump "
                             "of `t` (a far-future or far-past line) is shortened to this and "
                             "reported (replay.gap_clamped)")
    impressions: Literal["auto", "kafka", "skip"] = Field(
        "auto", description="recorded impressions: auto = to Kafka unless the server "
        "answered the file's request for it (then the server logged it); kafka = always; "
        "skip = never")
    end_of_stream: bool = Field(
        True, description="recorded replay: at the end of the file produce an end-of-stream "
        "marker to every impressions partition, so the joiner closes every window")
    drain: bool = Field(True, description="at the end, produce pending delayed events now")
    kafka: bool = Field(True, description="produce to Kafka (--no-kafka: hash/record only)")


def world_config(s: ReplaySettings) -> WorldConfig:
    return WorldConfig(
        seed=s.seed, n_users=s.n_users, n_ads=s.n_ads,
        start_time=s.start_time or float(int(time.time())),
        request_rate=s.rate / s.speed if s.speed > 0 else s.rate, slate_size=s.slate_size,
        organic_slots=s.organic_slots,
        run_id=s.run_id, new_ads_per_hour=s.new_ads_per_hour, budget_scale=s.budget_scale,
        delays=DelayModel(window_s=s.attribution_window_s))


# -- recorded replay --------------------------------------------------------------------


@dataclass
class ReplayStats:
    entries: int = 0
    by_kind: Counter[str] = field(default_factory=Counter)
    """Entries read, per kind."""
    produced: Counter[str] = field(default_factory=Counter)
    """Entries produced to Kafka by this replay, per kind."""
    server_logged: int = 0
    """Impressions whose request the server answered (``ok``): the server logged them."""
    skipped: Counter[str] = field(default_factory=Counter)
    """Entries deliberately not produced (``--impressions skip``)."""
    end_of_stream: float | None = None
    """Event time of the end-of-stream marker produced at the end, if any."""
    bad_lines: list[str] = field(default_factory=list)
    gaps_clamped: list[str] = field(default_factory=list)
    """One line per jump of ``t`` larger than ``max_gap_s`` (shortened, not waited for)."""
    stopped_at_line: int | None = None
    outcomes: Counter[str] = field(default_factory=Counter)
    events_sha256: str = ""
    requests_sha256: str = ""
    wall_s: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"entries": self.entries, "by_kind": dict(self.by_kind),
                "produced": dict(self.produced), "server_logged": self.server_logged,
                "skipped": dict(self.skipped), "missing": self.missing(),
                "end_of_stream": self.end_of_stream,
                "bad_lines": len(self.bad_lines), "gaps_clamped": len(self.gaps_clamped),
                "stopped_at_line": self.stopped_at_line,
                "outcomes": dict(self.outcomes), "events_sha256": self.events_sha256,
                "requests_sha256": self.requests_sha256, "wall_s": round(self.wall_s, 3)}

    def missing(self) -> dict[str, int]:
        """Per kind, entries read but neither produced, logged by the server nor skipped
        on purpose (requests are sent, not produced: never missing)."""
        out: dict[str, int] = {}
        for kind, n in self.by_kind.items():
            if kind == "request":
                continue
            done = self.produced[kind] + self.skipped[kind]
            if kind == "impression":
                done += self.server_logged
            if n > done:
                out[kind] = n - done
        return out


async def replay_recorded(path: Path | str, emitter: Emitter, *, speed: float = 1.0,
                          on_error: str = "skip", server_url: str | None = None,
                          impressions: str = "auto", timeout_s: float = 2.0,
                          max_in_flight: int = 256, stop: threading.Event | None = None,
                          recommender: HttpRecommender | None = None,
                          end_of_stream: bool = False,
                          max_gap_s: float = 3600.0) -> ReplayStats:
    """Replay a recorded log in file order at ``speed``× (0 = no waiting).

    Pacing follows ``t``, but between two consecutive lines the pacing clock moves by at
    most ``max_gap_s`` recorded seconds either way: a line far in the future (or, after
    it, the return to the file's real times) is replayed after at most ``max_gap_s /
    speed`` wall seconds instead of sleeping until the end of time; each such jump is
    logged (``replay.gap_clamped`` with the line and the gap), counted
    (``adloop_traffic_replay_gaps_clamped_total``) and listed in ``stats.gaps_clamped``.
    Records keep their recorded times.

    Requests go to ``server_url`` (open loop, counted per outcome) when given; ads,
    clicks and conversions to the emitter. Impressions: with ``kafka`` always to the
    emitter; with ``auto`` to the emitter unless the file's ``request`` line of the same
    request id was sent to the server and answered ``ok`` (the server logged that
    impression), so a file without requests, or a server that is not there, never loses
    one; with ``skip`` never (counted as skipped). Without a server the produced stream
    depends only on the file, so its sha256 is the same on every replay.
    ``stats.missing()`` lists what was read but went nowhere.
    """
    if impressions not in ("auto", "kafka", "skip"):
        raise ValueError(f"impressions must be auto, kafka or skip, not {impressions!r}")
    if not max_gap_s > 0:
        raise ValueError(f"max_gap_s must be > 0, not {max_gap_s!r}")
    stop = stop or threading.Event()
    stats = ReplayStats()
    answered: dict[str, asyncio.Task[str]] = {}
    """Request id -> the task sending that request (its result is the outcome)."""
    rec_client = recommender or (HttpRecommender(server_url, timeout_s, max_in_flight)
                                 if server_url else None)
    own_client = recommender is None and rec_client is not None
    in_flight: set[asyncio.Task[str]] = set()

    def bad(err: RecordError) -> None:
        stats.bad_lines.append(str(err))
        BAD_LINES.labels(err.reason.split(":", 1)[0][:40]).inc()
        log.warning("replay.bad_line", line=err.line, reason=err.reason, action=on_error)

    async def send(entry: Recorded) -> str:
        assert rec_client is not None
        req = entry.record
        outcome, slate, latency = await rec_client.recommend(req)  # type: ignore[arg-type]
        stats.outcomes[outcome] += 1
        REQUESTS.labels(outcome).inc()
        if latency is not None:
            LATENCY.observe(latency)
        if emitter.ledger is not None:
            emitter.ledger.request(req, outcome, latency, slate)  # type: ignore[arg-type]
        return outcome

    async def server_logged(request_id: str) -> bool:
        """Whether the server answered this impression's request (then it logged it)."""
        task = answered.pop(request_id, None)
        if task is None:
            return False
        try:
            return await task == "ok"
        except Exception:  # the send failed: the server logged nothing
            return False

    def clamp(entry: Recorded, gap: float) -> None:
        direction = "forward" if gap > 0 else "backward"
        stats.gaps_clamped.append(f"line {entry.line}: t jumps {gap:+.3f} s "
                                  f"(more than max_gap_s={max_gap_s:g})")
        GAPS_CLAMPED.labels(direction).inc()
        log.warning("replay.gap_clamped", line=entry.line, t=entry.t, gap_s=gap,
                    max_gap_s=max_gap_s, direction=direction)

    t_wall0 = time.monotonic()
    t0: float | None = None
    t_last: float | None = None
    t_prev: float | None = None
    shift = 0.0
    """Recorded seconds taken out of the pacing by clamped jumps (pace = t - shift)."""
    entries = read_recorded(path, "stop" if on_error == "stop" else "skip",
                            errors=_Reporter(bad))
    try:
        while not stop.is_set():
            try:
                entry = next(entries)
            except StopIteration:
                break
            except RecordError as err:
                bad(err)
                stats.stopped_at_line = err.line
                break
            if t0 is None:
                t0 = entry.t
            if t_prev is not None and abs(entry.t - t_prev) > max_gap_s:
                gap = entry.t - t_prev
                # the pace moves by max_gap_s forward, or stays put backward
                shift += gap - max_gap_s if gap > 0 else gap
                clamp(entry, gap)
            t_prev = entry.t
            t_last = entry.t if t_last is None else max(t_last, entry.t)
            due = t_wall0 + (entry.t - shift - t0) / speed if speed > 0 else 0.0
            if speed > 0 and not await sleep_until(due, stop):
                break
            stats.entries += 1
            stats.by_kind[entry.kind] += 1
            SIM_TIME.set(entry.t)
            if entry.kind == "request":
                emitter.note_request(entry.record)  # type: ignore[arg-type]
                if rec_client is not None:
                    if len(in_flight) >= max_in_flight:
                        stats.outcomes["client_overload"] += 1
                        REQUESTS.labels("client_overload").inc()
                        continue
                    task = asyncio.create_task(send(entry))
                    in_flight.add(task)
                    task.add_done_callback(in_flight.discard)
                    if impressions == "auto":
                        answered[entry.record.request_id] = task  # type: ignore[union-attr]
            elif entry.kind == "impression":
                rid = entry.record.request_id  # type: ignore[union-attr]
                if impressions == "skip":
                    stats.skipped["impression"] += 1
                elif impressions == "auto" and answered and await server_logged(rid):
                    stats.server_logged += 1
                else:
                    emitter.emit("impressions", entry.record)  # type: ignore[arg-type]
                    stats.produced["impression"] += 1
            else:
                assert entry.topic is not None
                emitter.emit(entry.topic, entry.record)  # type: ignore[arg-type]
                stats.produced[entry.kind] += 1
            if speed <= 0 and stats.entries % 256 == 0:
                await asyncio.sleep(0)  # let responses in
        if in_flight:
            await asyncio.wait(set(in_flight), timeout=timeout_s + 1.0)
        for task in list(in_flight):
            task.cancel()
        closes = (end_of_stream and t_last is not None and not stop.is_set()
                  and stats.stopped_at_line is None)
        if closes and t_last is not None and send_end_of_stream(emitter, t_last):
            stats.end_of_stream = t_last
    finally:
        if own_client and rec_client is not None:
            await rec_client.aclose()
    stats.events_sha256 = emitter.sha256
    stats.requests_sha256 = emitter.requests_sha256
    stats.wall_s = time.monotonic() - t_wall0
    return stats


def send_end_of_stream(emitter: Emitter, t_end: float) -> int:
    """Produce the joiner's end-of-stream marker (:func:`streams.joiner_core.
    end_of_stream_marker`) at ``t_end`` to every partition of ``impressions``; returns
    the number of partitions. Not part of ``events_sha256`` (the file's stream). Without
    a Kafka producer there is nothing to close (0)."""
    producer = emitter.producer
    if not isinstance(producer, EventProducer):
        return 0
    marker = encode(end_of_stream_marker(t_end))
    name = producer.topics.name("impressions")
    partitions = sorted(producer.raw.partitions_for(name) or {0})
    for p in partitions:
        producer.raw.send(name, value=marker, key=b"", partition=p)
    log.info("replay.end_of_stream", t=t_end, partitions=len(partitions))
    return len(partitions)


class _Reporter(list[RecordError]):
    """An ``errors`` list that reports each bad line as it is appended."""

    def __init__(self, report: Callable[[RecordError], None]) -> None:
        super().__init__()
        self._report = report

    def append(self, err: RecordError) -> None:
        super().append(err)
        self._report(err)


# -- the command ------------------------------------------------------------------------


def configure(parser: argparse.ArgumentParser) -> None:
    add_settings_arguments(parser, ReplaySettings)
    add_settings_arguments(parser, KafkaSettings)
    short = parser.add_argument_group("short forms")
    short.add_argument("--from", dest="from_file", type=Path, default=None,
                       help="same as --from-file")
    short.add_argument("--record", dest="record_file", type=Path, default=None,
                       help="same as --record-file")
    short.add_argument("--ledger", dest="ledger_file", type=Path, default=None,
                       help="same as --ledger-file")
    parser.add_argument("--convert-criteo", type=Path, default=None, metavar="TSV",
                        help="convert the Criteo attribution dataset TSV to the recorded "
                             "format at --record FILE and exit")
    parser.add_argument("--convert-limit", type=int, default=None,
                        help="rows to convert (default: all)")


def run(args: argparse.Namespace) -> int:
    settings = settings_from_args(ReplaySettings, args)
    if getattr(args, "convert_criteo", None):
        from traffic.recorded import convert_criteo_attribution

        if settings.record_file is None:
            print("--convert-criteo needs --record FILE")
            return 2
        counts = convert_criteo_attribution(args.convert_criteo, settings.record_file,
                                            settings.start_time or DEFAULT_START_TIME,
                                            args.convert_limit)
        print(json.dumps({"converted": counts, "to": str(settings.record_file)}))
        return 0
    kafka = settings_from_args(KafkaSettings, args)
    stop = threading.Event()
    ready = {"running": False}

    def on_signal(signum: int, _frame: object) -> None:
        log.info("replay.signal", signal=signal.Signals(signum).name)
        stop.set()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
    from streams.metrics import start_metrics_server

    metrics = start_metrics_server(settings.metrics_port, settings.metrics_host,
                                   ready_check=lambda: (ready["running"], {}))
    log.info("replay.metrics", url=metrics.url)
    producer = None
    if settings.kafka:
        producer = EventProducer(kafka)
    recorder = RecordWriter(settings.record_file) if settings.record_file else None
    ledger = Ledger(settings.ledger_file, keep=False) if settings.ledger_file else None
    emitter = Emitter(producer, recorder, ledger)
    summary: dict[str, Any]
    code = 0
    ready["running"] = True
    try:
        if settings.from_file is not None:
            rstats = asyncio.run(replay_recorded(
                settings.from_file, emitter, speed=settings.speed, on_error=settings.on_error,
                server_url=settings.server_url or None, impressions=settings.impressions,
                timeout_s=settings.timeout_s, max_in_flight=settings.max_in_flight,
                stop=stop, end_of_stream=settings.end_of_stream,
                max_gap_s=settings.max_gap_s))
            summary = {"mode": "recorded", **rstats.as_dict()}
            for line in rstats.bad_lines[:20] + rstats.gaps_clamped[:20]:
                print(line)
            if rstats.stopped_at_line is not None:
                code = 2
            missing = rstats.missing()
            if missing:
                log.warning("replay.not_produced", missing=missing,
                            read=dict(rstats.by_kind), produced=dict(rstats.produced),
                            server_logged=rstats.server_logged)
                if settings.on_error == "stop" and code == 0:
                    code = 3
        else:
            summary = _run_simulated(settings, emitter, stop)
    finally:
        ready["running"] = False
        if producer is not None:
            producer.flush(30.0)
            producer.close()
        if recorder is not None:
            recorder.close()
        if ledger is not None:
            ledger.close()
        metrics.stop()
    print(json.dumps(summary, default=str))
    return code


def _progress(stats: RunStats, in_flight: int) -> None:
    log.info("replay.progress", requests=stats.requests, outcomes=dict(stats.outcomes),
             in_flight=in_flight, impressions=stats.impressions, clicks=stats.clicks,
             conversions=stats.conversions, revenue=round(stats.revenue, 2),
             organic_impressions=stats.organic_impressions, organic_views=stats.organic_views,
             sim_time=round(stats.sim_end, 1))


def _run_simulated(settings: ReplaySettings, emitter: Emitter,
                   stop: threading.Event) -> dict[str, Any]:
    world = World(world_config(settings))
    driver = TrafficDriver(world, emitter)
    if settings.policy:
        policy = policy_by_name(settings.policy, world, settings.seed)
        if settings.requests > 0:
            n = settings.requests
        elif settings.duration > 0:
            n = max(1, int(settings.duration * settings.rate))
        else:
            n = 2**62
        clock = SimClock(world.now, settings.speed) if settings.speed > 0 else None
        stats = driver.run_inprocess(policy, n, drain=settings.drain, clock=clock, stop=stop)
        mode = f"inprocess:{settings.policy}"
    else:
        opts = HttpOptions(server_url=settings.server_url, rate=settings.rate,
                           speed=settings.speed if settings.speed > 0 else 1.0,
                           duration_s=settings.duration, n_requests=settings.requests,
                           timeout_s=settings.timeout_s, max_in_flight=settings.max_in_flight)
        stats = asyncio.run(driver.run_http(opts, stop, drain=settings.drain,
                                            on_progress=_progress))
        mode = "http"
    d = stats.as_dict()
    d["revenue"] = round(d["revenue"], 4)
    d["expected_revenue"] = round(d["expected_revenue"], 4)
    d["organic_dwell_s"] = round(d["organic_dwell_s"], 3)
    d["organic_expected_engagement"] = round(d["organic_expected_engagement"], 4)
    if not math.isfinite(d["sim_end"]):
        d["sim_end"] = None
    return {"mode": mode, **d}
