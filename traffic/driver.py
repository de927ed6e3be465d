"""The traffic driver: simulated users hitting the server, their responses into Kafka.

* :class:`SimClock` maps wall time to simulated event time (``speed`` sim s per wall s).
* :class:`TrafficDriver` takes requests from a :class:`~traffic.world.World` and
  either sends them **open loop** to the server's ``POST /v1/recommend`` at a target
  rate (:meth:`TrafficDriver.run_http`: a request is sent on schedule whatever the
  number outstanding, so overload is real) or asks an in-process :class:`Policy`
  (:meth:`TrafficDriver.run_inprocess`: no HTTP, no wall clock, fully deterministic).
  Responses are sampled from the world's ground truth; clicks and conversions wait in
  a heap until the simulated clock reaches their event time, then go to ``clicks`` /
  ``conversions``; ad lifecycle changes go to ``ads``. In a mixed feed the organic
  items' views, likes and dwells wait in the same heap for ``organic-engagements``; the
  organic catalogue goes to ``organic-items`` at the start.
* :class:`Emitter` is where every produced event goes: Kafka (optional), the sha256 of
  the stream (determinism checks), the recorded log (``--record``) and the
  :class:`Ledger` (``--ledger``, reconciled against Kafka by fault-injection checks).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import heapq
import json
import math
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any, Protocol

import httpx
import numpy as np

from streams.logs import get_logger
from streams.metrics import counter, gauge, histogram
from streams.schemas import (
    Ad,
    BeamCandidate,
    Click,
    Conversion,
    Event,
    Impression,
    OrganicEngagement,
    OrganicItem,
    OrganicSlot,
    SlateItem,
    encode,
)
from traffic.world import OrganicResponse, Request, Response, World

log = get_logger(__name__)

REQUESTS = counter("adloop_traffic_requests_total",
                   "Recommend requests by outcome (ok, shed, unavailable, timeout, "
                   "unreachable, http_error, bad_response, error, client_overload).",
                   ("outcome",))
LATENCY = histogram("adloop_traffic_request_latency_seconds",
                    "Wall time from sending a recommend request to its answer.")
IMPRESSIONS = counter("adloop_traffic_impressions_total", "Slate items shown to users.")
CLICKS = counter("adloop_traffic_clicks_total", "Clicks produced (at their event time).")
CONVERSIONS = counter("adloop_traffic_conversions_total",
                      "Conversions produced (at their event time).")
REVENUE = counter("adloop_traffic_revenue_total",
                  "Realized reward booked when responses are sampled (currency).")
AD_EVENTS = counter("adloop_traffic_ad_events_total", "Ad records produced, by status.",
                    ("status",))
PENDING = gauge("adloop_traffic_pending_events",
                "Delayed clicks, conversions and organic engagements waiting for their "
                "event time.")
SIM_TIME = gauge("adloop_traffic_sim_time_seconds", "Simulated clock (event time, epoch s).")
IN_FLIGHT = gauge("adloop_traffic_requests_in_flight", "Recommend requests awaiting an answer.")
ORGANIC_IMPRESSIONS = counter("adloop_traffic_organic_impressions_total",
                              "Organic items shown to users in mixed feeds.")
ORGANIC_ENGAGEMENTS = counter("adloop_traffic_organic_engagements_total",
                              "Organic engagement events produced (at their event time), "
                              "by action (view, like, dwell).", ("action",))
ORGANIC_DWELL = counter("adloop_traffic_organic_dwell_seconds_total",
                        "Seconds spent on organic items (the dwell events produced).")
BAD_LINES = counter("adloop_traffic_bad_lines_total",
                    "Recorded-log lines that could not be read, by reason.", ("reason",))
GAPS_CLAMPED = counter("adloop_traffic_replay_gaps_clamped_total",
                       "Recorded-log time jumps larger than max_gap_s that replay "
                       "shortened instead of waiting for, by direction.", ("direction",))

OUTCOMES = ("ok", "shed", "unavailable", "timeout", "unreachable", "http_error",
            "bad_response", "error", "client_overload")


# -- clock ------------------------------------------------------------------------------


class SimClock:
    """Simulated time running ``speed`` times faster than wall time from ``start``."""

    def __init__(self, start: float, speed: float,
                 wall: Callable[[], float] = time.monotonic,
                 wall0: float | None = None) -> None:
        if speed <= 0:
            raise ValueError("speed must be > 0")
        self.start = start
        self.speed = speed
        self._wall = wall
        self.wall0 = wall() if wall0 is None else wall0

    def now(self) -> float:
        """Current simulated (event) time."""
        return self.start + (self._wall() - self.wall0) * self.speed

    def wall_at(self, t: float) -> float:
        """The wall (monotonic) time at which simulated time reaches ``t``."""
        return self.wall0 + (t - self.start) / self.speed


# -- slates -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ServedAd:
    ad_id: str
    position: int
    score: float = 0.0
    expected_value: float = 0.0
    semantic_id: list[int] = field(default_factory=list)
    exposure: float = 0.0
    """The user's earlier impressions of this ad as the serving policy counted them
    (``SlateItem.exposure``); 0 when it does not count."""


@dataclass(frozen=True)
class ServedOrganic:
    """One organic item of a mixed feed (``Impression.organic``)."""

    item_id: str
    position: int
    """Rank among the feed's organic items, 0 first."""
    score: float = 0.0
    semantic_id: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class ServedSlate:
    """A recommend answer, from the HTTP server or an in-process policy."""

    request_id: str
    model_version: str
    ads: list[ServedAd]
    beam_widths: list[int] = field(default_factory=list)
    beams: list[BeamCandidate] = field(default_factory=list)
    """The final beams the slate was ranked from, as the server logs them
    (``Impression.beams``); only an in-process generative policy knows them."""
    organic: list[ServedOrganic] = field(default_factory=list)
    """The organic items of a mixed feed (empty in an ads-only answer)."""

    def ad_ids(self) -> list[str]:
        return [a.ad_id for a in sorted(self.ads, key=lambda a: a.position)]

    def organic_ids(self) -> list[str]:
        """Organic item ids in rank order."""
        return [o.item_id for o in sorted(self.organic, key=lambda o: o.position)]

    @classmethod
    def from_json(cls, obj: Any, request_id: str) -> ServedSlate:
        """Parse the server's JSON answer; raises ``ValueError`` when malformed."""
        if not isinstance(obj, dict) or not isinstance(obj.get("ads"), list):
            raise ValueError("answer has no 'ads' list")
        ads = []
        for n, a in enumerate(obj["ads"]):
            if not isinstance(a, dict) or not isinstance(a.get("ad_id"), str):
                raise ValueError(f"ads[{n}] has no ad_id")
            ads.append(ServedAd(
                ad_id=a["ad_id"], position=int(a.get("position", n)),
                score=float(a.get("score") or 0.0),
                expected_value=float(a.get("expected_value") or 0.0),
                semantic_id=[int(x) for x in a.get("semantic_id") or []]))
        return cls(request_id=str(obj.get("request_id") or request_id),
                   model_version=str(obj.get("model_version") or ""), ads=ads,
                   beam_widths=[int(x) for x in obj.get("beam_widths") or []],
                   organic=_organic_of(obj.get("organic")))


def _organic_of(raw: Any) -> list[ServedOrganic]:
    """The ``organic`` list of an answer (absent or null: none); ``ValueError`` names the
    first malformed item: no string ``item_id``, a position that is not an integer in
    0..m-1, a non-numeric score or semantic id, an item id served twice."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise ValueError(f"answer's 'organic' is not a list: {type(raw).__name__}")
    out: list[ServedOrganic] = []
    seen: set[str] = set()
    for n, o in enumerate(raw):
        if not isinstance(o, dict) or not isinstance(o.get("item_id"), str) \
                or not o["item_id"]:
            raise ValueError(f"organic[{n}] has no item_id")
        item_id = o["item_id"]
        if item_id in seen:
            raise ValueError(f"organic[{n}].item_id {item_id!r} appears twice")
        seen.add(item_id)
        pos = o.get("position", n)
        if isinstance(pos, bool) or not isinstance(pos, int) or not 0 <= pos < len(raw):
            raise ValueError(f"organic[{n}].position {pos!r} is not an integer in "
                             f"0..{len(raw) - 1}")
        score = o.get("score") or 0.0
        if isinstance(score, bool) or not isinstance(score, int | float):
            raise ValueError(f"organic[{n}].score {score!r} is not a number")
        sid = o.get("semantic_id") or []
        if not isinstance(sid, list) or not all(
                isinstance(x, int) and not isinstance(x, bool) for x in sid):
            raise ValueError(f"organic[{n}].semantic_id is not a list of integers")
        out.append(ServedOrganic(item_id=item_id, position=pos, score=float(score),
                                 semantic_id=list(sid)))
    if len({o.position for o in out}) != len(out):
        raise ValueError("organic positions repeat")
    return out


class Policy(Protocol):
    """An in-process recommender: the same contract as ``POST /v1/recommend``."""

    def recommend(self, request: Request) -> ServedSlate: ...


class OraclePolicy:
    """Ranks servable ads by their true expected value per impression."""

    name = "oracle"

    def __init__(self, world: World) -> None:
        self.world = world

    def recommend(self, request: Request) -> ServedSlate:
        ids = self.world.oracle_slate(request.user_id, request.context, k=request.k,
                                      t=request.event_time)
        organic: list[ServedOrganic] = []
        if request.organic_k > 0:
            best = self.world.organic_oracle(request, request.organic_k)
            value = self.world.organic_expected_engagement(request, best)
            organic = [ServedOrganic(o, i, float(value[i])) for i, o in enumerate(best)]
        return ServedSlate(request.request_id, "oracle",
                           [ServedAd(a, i) for i, a in enumerate(ids)], organic=organic)


class RandomPolicy:
    """Uniformly random servable ads and organic items (seeded generators of its own;
    the organic one apart, so ad slates do not depend on ``organic_k``)."""

    name = "random"

    def __init__(self, world: World, seed: int = 0) -> None:
        self.world = world
        self.rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(7,)))
        self.rng_organic = np.random.default_rng(np.random.SeedSequence(seed,
                                                                        spawn_key=(8,)))

    def recommend(self, request: Request) -> ServedSlate:
        ads = sorted(a.ad_id for a in self.world.servable_ads())
        k = min(request.k, len(ads))
        pick: list[int] = (self.rng.choice(len(ads), size=k, replace=False).tolist()
                           if k else [])
        organic: list[ServedOrganic] = []
        if request.organic_k > 0:
            items = [o.item_id for o in self.world.organic_items()]
            m = min(request.organic_k, len(items))
            chosen = self.rng_organic.choice(len(items), size=m, replace=False).tolist()
            organic = [ServedOrganic(items[int(j)], i) for i, j in enumerate(chosen)]
        return ServedSlate(request.request_id, "random",
                           [ServedAd(ads[int(j)], i) for i, j in enumerate(pick)],
                           organic=organic)


def policy_by_name(name: str, world: World, seed: int = 0) -> Policy:
    if name == "oracle":
        return OraclePolicy(world)
    if name == "random":
        return RandomPolicy(world, seed)
    raise ValueError(f"unknown policy {name!r} (oracle, random)")


def impression_of(request: Request, slate: ServedSlate, world: World,
                  server_id: str = "sim") -> Impression:
    """The ``impressions`` record the server would log for ``slate``."""
    items = []
    for a in sorted(slate.ads, key=lambda a: a.position):
        ad = world.ads.get(a.ad_id)
        items.append(SlateItem(ad_id=a.ad_id, semantic_id=list(a.semantic_id),
                               position=a.position, score=a.score,
                               bid=ad.record.bid if ad else 0.0,
                               bid_type=ad.record.bid_type if ad else "cpc"))
    organic = [OrganicSlot(item_id=o.item_id, semantic_id=list(o.semantic_id),
                           position=o.position, score=o.score)
               for o in sorted(slate.organic, key=lambda o: o.position)]
    return Impression(request_id=request.request_id, event_time=request.event_time,
                      user_id=request.user_id, context=dict(request.context),
                      recent_ad_ids=list(request.recent_ad_ids),
                      recent_organic=list(request.recent_organic), slate=items,
                      model_version=slate.model_version, beam_widths=list(slate.beam_widths),
                      server_id=server_id, beams=list(slate.beams), organic=organic)


# -- ledger and emitter -----------------------------------------------------------------


class Ledger:
    """Every request sent, slate received and event produced, in memory and as JSONL.

    Entries (one JSON object per line, ``kind`` first): ``request`` (request_id,
    user_id, t, outcome, latency_s, model_version, ads, and organic when the answer had
    organic items), ``ad`` (ad_id, status, t), ``impression``, ``click`` (event_id,
    request_id, user_id, ad_id, t), ``conversion`` (the same plus value),
    ``organic_item`` (item_id, status, t) and ``organic_engagement`` (event_id,
    request_id, user_id, item_id, action, dwell_s, t). Events are written when
    *produced*.
    """

    def __init__(self, path: Path | str | None = None, keep: bool = True) -> None:
        self.path = Path(path) if path else None
        self.keep = keep
        self.entries: list[dict[str, Any]] = []
        self.counts: Counter[str] = Counter()
        self._fh: IO[str] | None = self.path.open("w", encoding="utf-8") if self.path else None
        self._lock = threading.Lock()

    def add(self, entry: dict[str, Any]) -> None:
        with self._lock:
            self.counts[entry["kind"]] += 1
            if self.keep:
                self.entries.append(entry)
            if self._fh is not None:
                self._fh.write(json.dumps(entry, separators=(",", ":")) + "\n")

    def request(self, request: Request, outcome: str, latency_s: float | None,
                slate: ServedSlate | None) -> None:
        entry: dict[str, Any] = {
            "kind": "request", "request_id": request.request_id,
            "user_id": request.user_id, "t": request.event_time, "outcome": outcome,
            "latency_s": None if latency_s is None else round(latency_s, 6),
            "model_version": slate.model_version if slate else None,
            "ads": slate.ad_ids() if slate else []}
        if slate is not None and slate.organic:
            entry["organic"] = slate.organic_ids()
        self.add(entry)

    def event(self, topic: str, record: Event) -> None:
        if isinstance(record, Click):
            self.add({"kind": "click", "event_id": record.event_id,
                      "request_id": record.request_id, "user_id": record.user_id,
                      "ad_id": record.ad_id, "t": record.event_time})
        elif isinstance(record, Conversion):
            self.add({"kind": "conversion", "event_id": record.event_id,
                      "request_id": record.request_id, "user_id": record.user_id,
                      "ad_id": record.ad_id, "t": record.event_time, "value": record.value})
        elif isinstance(record, Ad):
            self.add({"kind": "ad", "ad_id": record.ad_id, "status": record.status,
                      "t": record.event_time})
        elif isinstance(record, Impression):
            self.add({"kind": "impression", "request_id": record.request_id,
                      "user_id": record.user_id, "t": record.event_time,
                      "ads": [i.ad_id for i in record.slate]})
        elif isinstance(record, OrganicEngagement):
            self.add({"kind": "organic_engagement", "event_id": record.event_id,
                      "request_id": record.request_id, "user_id": record.user_id,
                      "item_id": record.item_id, "action": record.action,
                      "dwell_s": record.dwell_s, "t": record.event_time})
        elif isinstance(record, OrganicItem):
            self.add({"kind": "organic_item", "item_id": record.item_id,
                      "status": record.status, "t": record.event_time})

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.entries if e["kind"] == kind]

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


class EventSink(Protocol):
    """Where produced records go besides the hash (``EventProducer`` fits)."""

    def send(self, topic: str, record: Event) -> Any: ...


class RecordSink(Protocol):
    def write_event(self, topic: str, record: Event) -> None: ...

    def write_request(self, request: Request) -> None: ...


class Emitter:
    """Produces records in order and keeps the stream's sha256.

    The hash covers ``topic + "\\n" + encoded record + "\\n"`` per produced event,
    in production order; requests sent to a server are hashed separately
    (``requests_sha256``), since the server, not the traffic, produces impressions.
    """

    def __init__(self, producer: EventSink | None = None, recorder: RecordSink | None = None,
                 ledger: Ledger | None = None, keep: bool = False) -> None:
        self.producer = producer
        self.recorder = recorder
        self.ledger = ledger
        self._hash = hashlib.sha256()
        self._req_hash = hashlib.sha256()
        self.counts: Counter[str] = Counter()
        self.keep = keep
        self.events: list[tuple[str, Event]] = []

    def emit(self, topic: str, record: Event) -> None:
        self._hash.update(topic.encode() + b"\n" + encode(record) + b"\n")
        self.counts[topic] += 1
        if self.keep:
            self.events.append((topic, record))
        if self.producer is not None:
            self.producer.send(topic, record)
        if self.recorder is not None:
            self.recorder.write_event(topic, record)
        if self.ledger is not None:
            self.ledger.event(topic, record)
        if isinstance(record, Click):
            CLICKS.inc()
        elif isinstance(record, Conversion):
            CONVERSIONS.inc()
        elif isinstance(record, Ad):
            AD_EVENTS.labels(record.status).inc()
        elif isinstance(record, OrganicEngagement):
            ORGANIC_ENGAGEMENTS.labels(record.action).inc()
            if record.action == "dwell":
                ORGANIC_DWELL.inc(record.dwell_s)

    def note_request(self, request: Request) -> None:
        body = json.dumps(request.body(), sort_keys=True, separators=(",", ":"))
        self._req_hash.update(body.encode() + b"\n")
        self.counts["requests"] += 1
        if self.recorder is not None:
            self.recorder.write_request(request)

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()

    @property
    def requests_sha256(self) -> str:
        return self._req_hash.hexdigest()


class PendingEvents:
    """Delayed events ordered by (event time, insertion order)."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, str, Event]] = []
        self._n = 0

    def push(self, t: float, topic: str, record: Event) -> None:
        heapq.heappush(self._heap, (t, self._n, topic, record))
        self._n += 1

    def pop_until(self, t: float) -> list[tuple[str, Event]]:
        out = []
        while self._heap and self._heap[0][0] <= t:
            _, _, topic, rec = heapq.heappop(self._heap)
            out.append((topic, rec))
        return out

    def __len__(self) -> int:
        return len(self._heap)

    def next_time(self) -> float | None:
        return self._heap[0][0] if self._heap else None


# -- the driver -------------------------------------------------------------------------


@dataclass
class RunStats:
    """What a run did (also the basis of the evaluation report)."""

    requests: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    impressions: int = 0
    clicks: int = 0
    conversions: int = 0
    revenue: float = 0.0
    expected_revenue: float = 0.0
    """Sum of the true expected value of every slate served (low-variance revenue)."""
    organic_impressions: int = 0
    """Organic items shown in mixed feeds."""
    organic_views: int = 0
    organic_likes: int = 0
    organic_dwell_s: float = 0.0
    """Views, likes and dwell seconds produced (at their event time, like clicks)."""
    organic_expected_engagement: float = 0.0
    """Sum of the true expected engagement of every organic item served
    (:meth:`~traffic.world.World.organic_expected_engagement`)."""
    pending_left: int = 0
    sim_start: float = 0.0
    sim_end: float = 0.0
    wall_s: float = 0.0
    events_sha256: str = ""
    requests_sha256: str = ""
    produced: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items()}
        d["outcomes"] = dict(self.outcomes)
        return d


@dataclass(frozen=True)
class HttpOptions:
    server_url: str = "http://127.0.0.1:8000"
    rate: float = 20.0
    """Requests per wall second (Poisson arrivals)."""
    speed: float = 60.0
    """Simulated seconds per wall second."""
    duration_s: float = 0.0
    """Stop after this many wall seconds (0 = no limit)."""
    n_requests: int = 0
    """Stop after this many requests (0 = no limit)."""
    timeout_s: float = 2.0
    max_in_flight: int = 256
    """Safety cap on outstanding requests; beyond it arrivals count as client_overload."""
    tick_s: float = 0.05
    """How often delayed events and the ad lifecycle are released."""


async def sleep_until(due: float, stop: threading.Event) -> bool:
    """Sleep until monotonic time ``due`` in short steps; False if ``stop`` was set."""
    while not stop.is_set():
        delay = due - time.monotonic()
        if delay <= 0:
            return True
        await asyncio.sleep(min(delay, 0.1))
    return False


def _warn(event: str, **kw: Any) -> None:
    """Log a warning; a broken log sink must never lose a request's outcome."""
    with contextlib.suppress(ValueError, OSError):
        log.warning(event, **kw)


class HttpRecommender:
    """``POST /v1/recommend`` over one ``httpx.AsyncClient``; never raises."""

    def __init__(self, server_url: str, timeout_s: float = 2.0, max_connections: int = 256,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.url = server_url.rstrip("/") + "/v1/recommend"
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout_s),
            limits=httpx.Limits(max_connections=max_connections,
                                max_keepalive_connections=min(64, max_connections)),
            transport=transport)
        self._unreachable_logged = 0

    async def recommend(self, request: Request,
                        body: dict[str, Any] | None = None
                        ) -> tuple[str, ServedSlate | None, float | None]:
        """(outcome, slate or None, latency in seconds or None)."""
        t0 = time.monotonic()
        try:
            resp = await self.client.post(self.url, json=body or request.body())
        except httpx.TimeoutException:
            return "timeout", None, time.monotonic() - t0
        except (httpx.ConnectError, httpx.RemoteProtocolError, OSError) as exc:
            self._unreachable_logged += 1
            if self._unreachable_logged in (1, 10) or self._unreachable_logged % 1000 == 0:
                _warn("traffic.server_unreachable", url=self.url, error=repr(exc),
                      count=self._unreachable_logged)
            return "unreachable", None, None
        except httpx.HTTPError as exc:
            _warn("traffic.request_error", error=repr(exc))
            return "error", None, time.monotonic() - t0
        latency = time.monotonic() - t0
        if resp.status_code == 429:
            return "shed", None, latency
        if resp.status_code == 503:
            return "unavailable", None, latency
        if resp.status_code != 200:
            return "http_error", None, latency
        try:
            slate = ServedSlate.from_json(resp.json(), request.request_id)
        except (ValueError, TypeError, KeyError):
            return "bad_response", None, latency
        return "ok", slate, latency

    async def aclose(self) -> None:
        await self.client.aclose()


class TrafficDriver:
    """Serves world requests through a policy or the HTTP server; emits the feedback."""

    def __init__(self, world: World, emitter: Emitter | None = None,
                 record_impressions: bool = True) -> None:
        self.world = world
        self.emitter = emitter or Emitter()
        self.pending = PendingEvents()
        self.stats = RunStats(sim_start=world.now, sim_end=world.now)
        self.record_impressions = record_impressions
        """Write served slates as ``impression`` lines to the recorder (HTTP mode)."""
        self._started = False
        self.responses: list[Response] = []
        self.organic_responses: list[OrganicResponse] = []
        self._unknown_organic = 0
        """Answers with organic ids outside the world's catalogue (logged sparsely)."""
        self.keep_responses = False
        """Keep every sampled response (``responses``, ``organic_responses``)."""
        self.shadow: Callable[[list[Request]], list[list[str]]] | None = None
        """A policy that answers every request in shadow (never served): its slates are
        scored against the world's truth as it stood when the request came in."""
        self.shadow_batch = 32
        """Queued requests that trigger a flush (the shadow's inference then runs in the
        serving loop); a large value defers it to :meth:`flush_shadow` after the run."""
        self.shadow_chunk = 64
        """Requests per call of the shadow policy."""
        self.shadow_values: dict[str, tuple[float, int]] = {}
        """request id -> (true expected revenue, impressions) of the shadow slate."""
        self._shadow_queue: list[tuple[Request, list[str], np.ndarray]] = []

    # -- building blocks (usable by an evaluation harness) -----------------------------
    def start(self) -> None:
        """Produce the initial catalog to ``ads`` and the organic catalogue to
        ``organic-items`` (once)."""
        if self._started:
            return
        self._started = True
        for ad in self.world.initial_ads():
            self.emitter.emit("ads", ad)
        for item in self.world.organic_items():
            self.emitter.emit("organic-items", item)

    def advance(self, t: float) -> None:
        """Run the ad lifecycle to ``t`` and produce delayed events due by ``t``."""
        for ad in self.world.advance_to(t):
            self.emitter.emit("ads", ad)
        self.release(t)
        self.stats.sim_end = max(self.stats.sim_end, t)
        SIM_TIME.set(t)

    def release(self, t: float) -> int:
        due = self.pending.pop_until(t)
        for topic, rec in due:
            self.emitter.emit(topic, rec)
            if topic == "clicks":
                self.stats.clicks += 1
            elif topic == "conversions":
                self.stats.conversions += 1
            elif isinstance(rec, OrganicEngagement):
                if rec.action == "view":
                    self.stats.organic_views += 1
                elif rec.action == "like":
                    self.stats.organic_likes += 1
                else:
                    self.stats.organic_dwell_s += rec.dwell_s
        PENDING.set(len(self.pending))
        return len(due)

    def serve(self, request: Request, slate: ServedSlate) -> Response:
        """Sample the user's response to ``slate``; schedule its clicks and conversions,
        and the engagement with its organic items (their own random stream)."""
        if self.shadow is not None:
            ids, table = self.world.value_table(request)
            self._shadow_queue.append((request, ids, table.astype(np.float32)))
            if len(self._shadow_queue) >= self.shadow_batch:
                self.flush_shadow()
        resp = self.world.respond(request, slate.ad_ids())
        for c in resp.clicks:
            self.pending.push(c.event_time, "clicks", c)
        for v in resp.conversions:
            self.pending.push(v.event_time, "conversions", v)
        for ad in resp.ad_updates:
            self.emitter.emit("ads", ad)
        self.stats.impressions += resp.impressions
        self.stats.revenue += resp.reward
        self.stats.expected_revenue += resp.expected_value
        IMPRESSIONS.inc(resp.impressions)
        if resp.reward > 0:
            REVENUE.inc(resp.reward)
        PENDING.set(len(self.pending))
        if slate.organic:
            self._serve_organic(request, slate)
        if self.keep_responses:
            self.responses.append(resp)
        return resp

    def _serve_organic(self, request: Request, slate: ServedSlate) -> OrganicResponse:
        oresp = self.world.respond_organic(request, slate.organic_ids())
        for ev in oresp.events:
            self.pending.push(ev.event_time, "organic-engagements", ev)
        self.stats.organic_impressions += oresp.impressions
        self.stats.organic_expected_engagement += oresp.expected_engagement
        ORGANIC_IMPRESSIONS.inc(oresp.impressions)
        if oresp.unknown_item_ids:
            self._unknown_organic += 1
            n = self._unknown_organic
            if n in (1, 10) or n % 1000 == 0:
                _warn("traffic.unknown_organic_items", request_id=request.request_id,
                      item_ids=oresp.unknown_item_ids[:10], requests=n)
        PENDING.set(len(self.pending))
        if self.keep_responses:
            self.organic_responses.append(oresp)
        return oresp

    def flush_shadow(self) -> None:
        """Ask the shadow policy for the queued requests' slates (one batch, twice the
        slate size) and score each against the values its request saw: the first ``k``
        of its ads that were servable then, at their positions."""
        queue, self._shadow_queue = self._shadow_queue, []
        if self.shadow is None or not queue:
            return
        slates: list[list[str]] = []
        for i in range(0, len(queue), self.shadow_chunk):
            slates += self.shadow([replace(q[0], k=2 * q[0].k)
                                   for q in queue[i:i + self.shadow_chunk]])
        for (req, ids, table), slate in zip(queue, slates, strict=True):
            col = {a: i for i, a in enumerate(ids)}
            shown = [a for a in slate if a in col][: req.k]
            self.shadow_values[req.request_id] = (
                float(sum(table[pos, col[a]] for pos, a in enumerate(shown))), len(shown))

    def drain(self) -> int:
        """Produce every pending event now (end of run, ``--drain``)."""
        return self.release(math.inf)

    def finish(self, drain: bool = True) -> RunStats:
        if drain:
            self.drain()
        s = self.stats
        s.pending_left = len(self.pending)
        s.events_sha256 = self.emitter.sha256
        s.requests_sha256 = self.emitter.requests_sha256
        s.produced = {k: v for k, v in self.emitter.counts.items() if k != "requests"}
        return s

    def _count(self, request: Request, outcome: str, latency: float | None,
               slate: ServedSlate | None) -> None:
        self.stats.requests += 1
        self.stats.outcomes[outcome] += 1
        REQUESTS.labels(outcome).inc()
        if latency is not None:
            LATENCY.observe(latency)
        if self.emitter.ledger is not None:
            self.emitter.ledger.request(request, outcome, latency, slate)

    # -- in-process, deterministic -----------------------------------------------------
    def run_inprocess(self, policy: Policy, n_requests: int, produce_impressions: bool = True,
                      drain: bool = True, clock: SimClock | None = None,
                      stop: threading.Event | None = None) -> RunStats:
        """Serve ``n_requests`` world requests with ``policy``; no HTTP, no races.

        With ``clock``, requests are paced to wall time (for demos); the produced event
        stream does not depend on pacing. ``produce_impressions`` writes the slate to
        ``impressions`` as the server would.
        """
        t_wall = time.monotonic()
        self.start()
        for _ in range(n_requests):
            if stop is not None and stop.is_set():
                break
            req = self.world.next_request()
            if clock is not None:
                delay = clock.wall_at(req.event_time) - time.monotonic()
                if delay > 0 and stop is not None:
                    if stop.wait(delay):
                        break
                elif delay > 0:
                    time.sleep(delay)
            self.advance(req.event_time)
            slate = policy.recommend(req)
            self.emitter.note_request(req)
            if produce_impressions:
                self.emitter.emit("impressions", impression_of(req, slate, self.world))
            self._count(req, "ok", None, slate)
            self.serve(req, slate)
        self.stats.wall_s = time.monotonic() - t_wall
        return self.finish(drain)

    # -- open loop over HTTP -----------------------------------------------------------
    async def run_http(self, opts: HttpOptions, stop: threading.Event | None = None,
                       recommender: HttpRecommender | None = None,
                       drain: bool = True,
                       on_progress: Callable[[RunStats, int], None] | None = None
                       ) -> RunStats:
        """Send world requests open loop at ``opts.rate``/s to the server until the
        duration or request count is reached or ``stop`` is set.

        An unreachable or overloaded server is counted per outcome, never raised.
        """
        stop = stop or threading.Event()
        if opts.rate <= 0:
            raise ValueError("rate must be > 0")
        own = recommender is None
        rec = recommender or HttpRecommender(opts.server_url, opts.timeout_s,
                                             opts.max_in_flight)
        clock = SimClock(self.world.now, opts.speed)
        self._set_arrival_rate(opts.rate / opts.speed)
        t_wall = time.monotonic()
        wall_end = t_wall + opts.duration_s if opts.duration_s > 0 else math.inf
        self.start()
        in_flight: set[asyncio.Task[None]] = set()
        done_sending = asyncio.Event()

        async def pump() -> None:
            last_progress = time.monotonic()
            while True:
                self.advance(clock.now())
                IN_FLIGHT.set(len(in_flight))
                if on_progress is not None and time.monotonic() - last_progress >= 5.0:
                    last_progress = time.monotonic()
                    on_progress(self.stats, len(in_flight))
                if done_sending.is_set():
                    return
                await asyncio.sleep(opts.tick_s)

        async def send(req: Request) -> None:
            outcome, slate, latency = await rec.recommend(req)
            self._count(req, outcome, latency, slate)
            if slate is not None:
                if self.record_impressions and self.emitter.recorder is not None:
                    self.emitter.recorder.write_event(
                        "impressions", impression_of(req, slate, self.world, "recorded"))
                self.serve(req, slate)

        pump_task = asyncio.create_task(pump())
        sent = 0
        try:
            while not stop.is_set():
                if opts.n_requests and sent >= opts.n_requests:
                    break
                req = self.world.next_request()
                due = clock.wall_at(req.event_time)
                if due > wall_end:
                    break
                if not await sleep_until(due, stop):
                    break
                await asyncio.sleep(0)  # behind schedule: still let answers and the pump in
                sent += 1
                self.emitter.note_request(req)
                if len(in_flight) >= opts.max_in_flight:
                    self._count(req, "client_overload", None, None)
                    continue
                task = asyncio.create_task(send(req))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
            if in_flight:
                await asyncio.wait(set(in_flight), timeout=opts.timeout_s + 1.0)
            for task in list(in_flight):
                task.cancel()
        finally:
            done_sending.set()
            await pump_task
            if own:
                await rec.aclose()
        self.advance(clock.now())
        IN_FLIGHT.set(0)
        self.stats.wall_s = time.monotonic() - t_wall
        return self.finish(drain)

    def _set_arrival_rate(self, per_sim_second: float) -> None:
        import dataclasses

        self.world.config = dataclasses.replace(self.world.config,
                                                request_rate=per_sim_second)
