"""``adloop stats``: windowed ad statistics from ``feedback``, on faust-streaming.

Per ad, advertiser and industry, over event-time windows of the impression time
(tumbling ``tumbling_s``; hopping ``hopping_size_s`` every ``hopping_step_s``): impressions,
clicks, conversions, revenue (sum of rewards), conversion value, CTR, CVR and eCPM, into
the compacted topic ``ad-stats`` (:class:`streams.schemas.AdStats`, one record per
dimension, id, window kind and window start; the latest record is the current value).
Only ``final`` feedback lists count (each impression has exactly one; provisional lists and
corrections would count it again).

Three faust agents, each ``concurrency=1``:

* ``ads``: the compacted ``ads`` topic → ad id → advertiser, industry;
* ``finals``: ``feedback`` (4 partitions) → the final lists, reduced to what the stats need,
  sent to the internal one-partition topic ``<app id>-finals`` keyed by request id; the send
  is awaited until the broker acknowledged it before the next event is taken;
* ``aggregate``: ``<app id>-finals`` → the window sums (key ``<window>|<start>|<dimension>|
  <id>``, five sums) → ``ad-stats``, every send awaited to its acknowledgement before the
  next event; windows whose end is more than ``retention_s`` behind the newest impression
  time are dropped from memory (``ad-stats`` keeps them until its own retention).

The one-partition hop gives every window key one home (and one worker: run one worker per
``app_id``).

State: **not in faust tables.** faust-streaming 0.15.3 commits offsets after awaiting
``ProducerBuffer.flush()``, which returns after 0.1 s without progress even with table
changelog writes still queued; the first version of this stage kept its sums in a faust
``Table`` and its kill -9 test lost counts (windows 1-4 impressions short of their input,
offsets committed). Now the sums are held in memory and restored at start from the
compacted output itself: the latest ``ad-stats`` record per key was acknowledged before the
event that produced it could be committed, so it includes every committed event. The ads
are re-read from the compacted ``ads`` topic at start.

Guarantee: **at-least-once**, what faust-streaming gives (the exactly-once join does not run
on it, see ``streams/README.md``), configured the safe way: agent concurrency 1 (no commit
past in-flight events, faust-streaming/faust#606), every send awaited to its
acknowledgement inside the agent, agent errors crash the worker (``CrashingSupervisor``)
instead of being logged and skipped. A kill -9 loses nothing and can **double** the events
processed since the last offset commit on each of the two hops: faust commits after
``commit_every`` acknowledged events (checked when its fetcher takes the next record, which
the stream buffer of ``commit_every`` records keeps close behind) or ``commit_interval_s``,
so about ``2 × commit_every`` events per hop. ``tests/streams/test_stats.py`` kills the worker
with SIGKILL mid-stream and compares every window with the exact sums of its input: none is
short, and none is over by more than ``4 × commit_every`` lists (two hops). The figures are for
dashboards and operators, never for training or billing (the learner and the reconciler
read ``feedback``, whose exactly-once effect the joiner guarantees).

Metrics (bounded labels: industries are few; ads and advertisers only as a top-N):
``adloop_stats_events_total{topic,outcome}``, ``adloop_stats_industry_impressions_total``,
``..._clicks_total``, ``..._conversions_total``, ``..._revenue_total`` (label ``industry``),
``adloop_stats_top_revenue{dimension,rank,id}`` (top ``top_n`` ads and advertisers by
revenue in the newest complete tumbling window), ``adloop_stats_window_end_seconds``,
``adloop_stats_ad_stats_sent_total``.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import msgspec
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from streams.kafka_io import read_all
from streams.logs import get_logger
from streams.metrics import counter, gauge, start_metrics_server
from streams.schemas import Ad, AdStats, DecodeFailure, Feedback, StatsWindow, decode, encode
from streams.settings import KafkaSettings, add_settings_arguments, settings_from_args
from streams.topics import Topics

log = get_logger(__name__)

EVENTS = counter("adloop_stats_events_total",
                 "Records the stats stage read, by topic and outcome "
                 "(counted, skipped: not final, bad: undecodable).", ("topic", "outcome"))
IND_IMPRESSIONS = counter("adloop_stats_industry_impressions_total",
                          "Ad impressions in final feedback lists, by industry.", ("industry",))
IND_CLICKS = counter("adloop_stats_industry_clicks_total",
                     "Clicked ads in final feedback lists, by industry.", ("industry",))
IND_CONVERSIONS = counter("adloop_stats_industry_conversions_total",
                          "Converted ads in final feedback lists, by industry.", ("industry",))
IND_REVENUE = counter("adloop_stats_industry_revenue_total",
                      "Revenue (sum of rewards) in final feedback lists, by industry.",
                      ("industry",))
TOP_REVENUE = gauge("adloop_stats_top_revenue",
                    "Revenue of the top-N ads and advertisers in the newest complete tumbling "
                    "window; rank 1 is the largest.", ("dimension", "rank", "id"))
WINDOW_END = gauge("adloop_stats_window_end_seconds",
                   "Event-time end of the newest complete tumbling window in the top-N.")
SENT = counter("adloop_stats_ad_stats_sent_total", "AdStats records acknowledged by the broker.")

UNKNOWN = "unknown"


class StatsSettings(BaseSettings):
    """Settings of ``adloop stats`` (env ``ADLOOP_STATS_<NAME>``). Windows in event seconds."""

    model_config = SettingsConfigDict(env_prefix="ADLOOP_STATS_", extra="ignore")

    app_id: str = Field("adloop-stats", description="faust app id: consumer group and "
                        "internal topic names (the topic prefix is prepended)")
    tumbling_s: float = Field(60.0, description="tumbling window size (event seconds)")
    hopping_size_s: float = Field(300.0, description="hopping window size (event seconds)")
    hopping_step_s: float = Field(60.0, description="hopping window step (event seconds)")
    retention_s: float = Field(6 * 3600.0, description="windows ending this long before the "
                               "newest impression time are dropped from the table")
    top_n: int = Field(10, description="ads and advertisers exported as metrics")
    commit_every: int = Field(100, description="commit offsets after this many events")
    commit_interval_s: float = Field(1.0, description="... or after this many wall seconds")
    metrics_port: int = Field(9468, description="port of /metrics /healthz /readyz (0 = any)")
    metrics_host: str = Field("127.0.0.1", description="address of the metrics endpoint")
    data_dir: str = Field("", description="faust's data directory (default: a temporary one)")

    def model_post_init(self, _ctx: object) -> None:
        if self.tumbling_s <= 0 or self.hopping_step_s <= 0 or \
                self.hopping_size_s < self.hopping_step_s:
            raise ValueError("need tumbling_s > 0 and hopping_size_s >= hopping_step_s > 0")


# -- the pure part ----------------------------------------------------------------------
class FinalItem(msgspec.Struct, array_like=True):
    ad_id: str
    clicked: bool
    converted: bool
    reward: float
    conversion_value: float


class FinalList(msgspec.Struct, array_like=True):
    """What the aggregate agent needs of one final feedback list (internal topic)."""

    request_id: str
    impression_time: float
    items: list[FinalItem]


def final_of(fb: Feedback) -> FinalList:
    return FinalList(fb.request_id, fb.impression_time,
                     [FinalItem(i.ad_id, i.clicked, i.converted, i.reward, i.conversion_value)
                      for i in fb.items])


@dataclass(frozen=True)
class Windows:
    tumbling_s: float
    hopping_size_s: float
    hopping_step_s: float

    def of(self, t: float) -> Iterator[tuple[StatsWindow, float, float]]:
        """The windows an event time falls in: (kind, start, end), start <= t < end."""
        start = math.floor(t / self.tumbling_s) * self.tumbling_s
        yield "tumbling", start, start + self.tumbling_s
        last = math.floor(t / self.hopping_step_s) * self.hopping_step_s
        first = last - self.hopping_size_s + self.hopping_step_s
        s = last
        while s >= first - 1e-9:
            if s <= t < s + self.hopping_size_s:
                yield "hopping", s, s + self.hopping_size_s
            s -= self.hopping_step_s


SUMS = 5  # impressions, clicks, conversions, revenue, conversion value


def table_key(window: str, start: float, dimension: str, ident: str) -> str:
    return f"{window}|{start:.0f}|{dimension}|{ident}"


def parse_key(key: str) -> tuple[StatsWindow, float, str, str]:
    window, start, dimension, ident = key.split("|", 3)
    return window, float(start), dimension, ident  # type: ignore[return-value]


def stats_record(key: str, sums: list[float], windows: Windows) -> AdStats:
    window, start, dimension, ident = parse_key(key)
    size = windows.tumbling_s if window == "tumbling" else windows.hopping_size_s
    imp, clk, conv, rev, value = sums
    return AdStats(
        dimension=dimension, id=ident, window=window,  # type: ignore[arg-type]
        window_start=start, window_end=start + size, impressions=int(imp), clicks=int(clk),
        conversions=int(conv), revenue=round(rev, 6), conversion_value=round(value, 6),
        ctr=clk / imp if imp else 0.0, cvr=conv / clk if clk else 0.0,
        ecpm=1000.0 * rev / imp if imp else 0.0, updated_time=time.time())


def contributions(final: FinalList, ads: Any, windows: Windows
                  ) -> Iterator[tuple[str, list[float], str]]:
    """(table key, increments, industry) for every window, dimension and item of a list."""
    for item in final.items:
        meta = ads.get(item.ad_id)
        advertiser, industry = (meta[0], meta[1]) if meta else (UNKNOWN, UNKNOWN)
        inc = [1.0, float(item.clicked), float(item.converted), item.reward,
               item.conversion_value]
        for window, start, _end in windows.of(final.impression_time):
            for dimension, ident in (("ad", item.ad_id), ("advertiser", advertiser),
                                     ("industry", industry)):
                yield table_key(window, start, dimension, ident), inc, industry


def top_n(table_items: Any, window_start: float, n: int) -> dict[str, list[tuple[str, float]]]:
    """Top-``n`` ads and advertisers by revenue in the tumbling window at ``window_start``."""
    out: dict[str, list[tuple[str, float]]] = {"ad": [], "advertiser": []}
    for key, sums in table_items:
        window, start, dimension, ident = parse_key(key)
        if window == "tumbling" and start == window_start and dimension in out:
            out[dimension].append((ident, float(sums[3])))
    return {d: sorted(v, key=lambda kv: (-kv[1], kv[0]))[:n] for d, v in out.items()}


# -- the faust app ----------------------------------------------------------------------
class StatsApp:
    """The faust app, its topics, tables and agents."""

    def __init__(self, settings: StatsSettings, kafka: KafkaSettings) -> None:
        import faust
        from mode import CrashingSupervisor

        self.s = settings
        self.kafka = kafka
        self.topics = Topics(kafka.topic_prefix)
        self.windows = Windows(settings.tumbling_s, settings.hopping_size_s,
                               settings.hopping_step_s)
        self.app_id = kafka.topic_prefix + settings.app_id
        if kafka.security_protocol != "PLAINTEXT":
            raise ValueError("adloop stats supports PLAINTEXT brokers only")
        extra: dict[str, Any] = {}
        if settings.data_dir:
            extra["datadir"] = settings.data_dir
        else:
            import tempfile

            extra["datadir"] = tempfile.mkdtemp(prefix="adloop-stats-")
        self.app = faust.App(
            self.app_id,
            broker=[f"kafka://{b}" for b in kafka.bootstrap_servers.split(",")],
            store="memory://",
            processing_guarantee="at_least_once",
            agent_supervisor=CrashingSupervisor,
            producer_acks=-1,
            broker_commit_every=settings.commit_every,
            broker_commit_interval=settings.commit_interval_s,
            # faust commits every `commit_every` acks only when its fetcher takes the next
            # record; a small stream buffer keeps the fetcher (and so the commits) close
            # behind the agents, which bounds what a kill -9 re-processes
            stream_buffer_maxsize=settings.commit_every,
            consumer_auto_offset_reset="earliest",
            # find topics created after start-up within seconds, not aiokafka's 5 minutes
            consumer_metadata_max_age_ms=kafka.metadata_max_age_ms,
            producer_metadata_max_age_ms=kafka.metadata_max_age_ms,
            topic_partitions=1,
            topic_replication_factor=1,
            table_standby_replicas=0,
            web_enabled=False,
            **extra,
        )
        raw: dict[str, Any] = {"key_serializer": "raw", "value_serializer": "raw"}
        self.feedback_topic = self.app.topic(self.topics.feedback, **raw)
        self.ads_topic = self.app.topic(self.topics.ads, **raw)
        self.out_topic = self.app.topic(self.topics.ad_stats, **raw)
        self.finals_topic = self.app.topic(f"{self.app_id}-finals", partitions=1,
                                           internal=True, **raw)
        # State lives in plain dicts restored from Kafka at start, not in faust tables:
        # faust's commit can run ahead of its table changelog writes (see above).
        self.ads: dict[str, list[str]] = {}
        self.table: dict[str, list[float]] = {}
        self.newest_time = float("-inf")
        self.ready = False
        self.restore()
        self.app.agent(self.ads_topic, name="ads", concurrency=1)(self._ads_agent)
        self.app.agent(self.feedback_topic, name="finals", concurrency=1)(self._finals_agent)
        self.app.agent(self.finals_topic, name="aggregate", concurrency=1)(
            self._aggregate_agent)
        self.app.timer(1.0)(self._publish_top)
        self.app.task(self._started)

    def restore(self) -> None:
        """Load the ads and the window sums from ``ads`` and ``ad-stats`` (compacted).

        Every ``ad-stats`` record was acknowledged before the event that produced it could
        be committed, so the latest record per key includes at least every committed
        event; events after the last commit are processed again (at-least-once).
        """
        for r in read_all(self.kafka, "ads", timeout_s=60):
            self.ads[r.record.ad_id] = [r.record.advertiser_id, r.record.industry]
        for r in read_all(self.kafka, "ad-stats", timeout_s=60):
            rec: AdStats = r.record
            key = table_key(rec.window, rec.window_start, rec.dimension, rec.id)
            self.table[key] = [float(rec.impressions), float(rec.clicks),
                               float(rec.conversions), rec.revenue, rec.conversion_value]
            self.newest_time = max(self.newest_time, rec.window_start)
        log.info("stats.restored", ads=len(self.ads), windows=len(self.table))

    # -- agents ------------------------------------------------------------------------
    async def _started(self) -> None:
        self.ready = True  # the worker is up and its agents are running

    async def _ads_agent(self, stream: Any) -> None:
        async for event in stream.events():
            if event.value is None:  # tombstone: the ad is gone
                self.ads.pop(event.key.decode("utf-8", "replace") if event.key else "", None)
                continue
            ad = decode(event.value, Ad)
            if isinstance(ad, DecodeFailure):
                EVENTS.labels("ads", "bad").inc()  # the learner dead-letters bad ads
                continue
            EVENTS.labels("ads", "counted").inc()
            self.ads[ad.ad_id] = [ad.advertiser_id, ad.industry]

    async def _finals_agent(self, stream: Any) -> None:
        async for value in stream:
            fb = decode(value, Feedback) if value is not None else None
            if fb is None or isinstance(fb, DecodeFailure):
                EVENTS.labels("feedback", "bad").inc()  # the learner dead-letters feedback
                continue
            if fb.kind != "final":
                EVENTS.labels("feedback", "skipped").inc()
                continue
            fut = await self.finals_topic.send(key=fb.request_id.encode(),
                                               value=msgspec.json.encode(final_of(fb)))
            await fut  # acknowledged before this event can be committed
            EVENTS.labels("feedback", "counted").inc()

    async def _aggregate_agent(self, stream: Any) -> None:
        decoder = msgspec.json.Decoder(FinalList)
        async for value in stream:
            final = decoder.decode(value)
            dirty: dict[str, list[float]] = {}
            for key, inc, industry in contributions(final, self.ads, self.windows):
                sums = dirty.get(key) or list(self.table.get(key) or [0.0] * SUMS)
                for i in range(SUMS):
                    sums[i] += inc[i]
                dirty[key] = sums
                if key.startswith("tumbling|") and "|industry|" in key:
                    IND_IMPRESSIONS.labels(industry).inc()
                    IND_CLICKS.labels(industry).inc(inc[1])
                    IND_CONVERSIONS.labels(industry).inc(inc[2])
                    IND_REVENUE.labels(industry).inc(inc[3])
            futs = []
            for key, sums in dirty.items():
                self.table[key] = sums
                rec = stats_record(key, sums, self.windows)
                futs.append(await self.out_topic.send(key=rec.key().encode(),
                                                      value=encode(rec)))
            await asyncio.gather(*futs)
            SENT.inc(len(futs))
            EVENTS.labels("finals", "counted").inc()
            if final.impression_time > self.newest_time:
                self.newest_time = final.impression_time
                self._expire()

    def _expire(self) -> None:
        horizon = self.newest_time - self.s.retention_s
        old = []
        for key in list(self.table.keys()):
            window, start, _d, _i = parse_key(key)
            size = self.s.tumbling_s if window == "tumbling" else self.s.hopping_size_s
            if start + size < horizon:
                old.append(key)
        for key in old:
            del self.table[key]

    async def _publish_top(self) -> None:
        if self.newest_time == float("-inf"):
            return
        # the newest tumbling window that is complete (the one before the newest time's)
        start = (math.floor(self.newest_time / self.s.tumbling_s) - 1) * self.s.tumbling_s
        tops = top_n(list(self.table.items()), start, self.s.top_n)
        TOP_REVENUE.clear()
        for dimension, ranked in tops.items():
            for rank, (ident, revenue) in enumerate(ranked, start=1):
                TOP_REVENUE.labels(dimension, str(rank), ident).set(revenue)
        WINDOW_END.set(start + self.s.tumbling_s)

    def ready_check(self) -> tuple[bool, dict[str, Any]]:
        return self.ready, {"worker_started": self.ready}


# -- command line -----------------------------------------------------------------------
def configure(parser: argparse.ArgumentParser) -> None:
    add_settings_arguments(parser, KafkaSettings)
    add_settings_arguments(parser, StatsSettings)


def run(args: argparse.Namespace) -> int:
    """Run the stats worker until SIGTERM/SIGINT; serves /metrics /healthz /readyz."""
    import faust

    kafka = settings_from_args(KafkaSettings, args)
    settings = settings_from_args(StatsSettings, args)
    stats = StatsApp(settings, kafka)
    server = start_metrics_server(settings.metrics_port, settings.metrics_host,
                                  ready_check=stats.ready_check)
    log.info("stats.start", app_id=stats.app_id, metrics=server.url,
             tumbling_s=settings.tumbling_s, hopping_size_s=settings.hopping_size_s,
             hopping_step_s=settings.hopping_step_s)
    print(f"metrics {server.url}", flush=True)
    # faust's worker installs its own SIGTERM/SIGINT handlers: they stop the agents,
    # commit what was processed and leave the group.
    worker = faust.Worker(stats.app, loglevel="WARNING", quiet=True,
                          override_logging=False)
    try:
        worker.execute_from_commandline()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 0
        log.info("stats.stopped", code=code)
        return code
    finally:
        server.stop()
    return 0
