"""HTTP API: request validation, routes, admin auth, body limit, request metrics.

The handlers only translate: they validate, hand the request to the batcher, turn
the result into JSON and offer an impression to the logger.
"""

from __future__ import annotations

import asyncio
import hmac
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from typing import Annotated, Any

import msgspec
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

from server import metrics as M
from server.abtest import AB_REQUESTS, RoutedRequest, ServedResult
from server.batcher import OverloadedError
from server.controller import BeamController
from server.engine import NotReadyError, RecRequest, RecResult
from server.service import Service
from streams.logs import get_logger
from streams.schemas import Impression, OrganicSlot, SlateItem

log = get_logger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

ContextKey = Annotated[str, StringConstraints(min_length=1, max_length=64)]
ContextValue = Annotated[str, StringConstraints(max_length=256)]
AdId = Annotated[str, StringConstraints(min_length=1, max_length=128)]


class RecommendRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user_id: str = Field(min_length=1, max_length=128)
    context: dict[ContextKey, ContextValue] = Field(
        default_factory=dict, max_length=32,
        description="request context (device, placement, hour, region, ...); hashed with "
        "streams.features.context_ids for the features the snapshot names")
    recent_ad_ids: list[AdId] = Field(default_factory=list, max_length=200,
                                      description="the user's recent ads, most relevant first")
    recent_organic: list[AdId] = Field(
        default_factory=list, max_length=200,
        description="the user's recent organic items (videos, articles) as "
        "'<topic>#<n>', oldest first; the snapshot reads the last organic_len topics")
    k: int = Field(10, ge=1, le=50, description="slate size")
    organic_k: int = Field(
        0, ge=0, le=50, description="organic items (videos, articles) wanted besides the "
        "ads: a mixed feed that shows organic item 0, ad 0, organic item 1, ad 1, ...; "
        "0 = ads only. Ranked by the same model, never one of recent_organic; empty when "
        "the serving snapshot has no organic items")
    request_id: str | None = Field(None, min_length=1, max_length=128,
                                   description="generated when absent")
    event_time: float | None = Field(
        None, ge=0, description="event time of the request (seconds since the epoch) for "
        "simulated-time replays; the server's clock when absent")

    @field_validator("k", "organic_k", "event_time", mode="before")
    @classmethod
    def _json_numbers_only(cls, v: Any) -> Any:
        """JSON numbers only: no ``"10"`` for 10 and no ``false`` for 0 (16.0 is 16)."""
        if isinstance(v, bool | str):
            raise ValueError(f"must be a JSON number, not {type(v).__name__}")
        return v


class RecommendedAd(BaseModel):
    ad_id: str
    score: float = Field(description="log-probability of the ad's id under the model")
    expected_value: float = Field(description="CPC bid·pCTR, CPA bid·pCTR·pCVR, CPM bid/1000")
    position: int
    semantic_id: list[int]
    pctr: float
    pcvr: float
    bid: float
    bid_type: str
    propensity: float = Field(
        gt=0, le=1, description="probability that the server's policy puts this ad at this "
        "position given the request: 1.0 for ranked slots (without exploration, every "
        "slot); with ADLOOP_SERVER_EXPLORE = e, the last slot's ranked ad 1 - e (1.0 when "
        "no ad is eligible for exploration) and an ad drawn by exploration e / |eligible|")


class RecommendedOrganic(BaseModel):
    item_id: str = Field(description="organic item id, '<topic>#<n>'")
    semantic_id: list[int]
    position: int = Field(description="rank among the organic items, 0 first (the feed "
                          "shows organic item 0, ad 0, organic item 1, ad 1, ...)")
    score: float = Field(description="log-probability of the item's id under the model")


class RecommendResponse(BaseModel):
    request_id: str
    model_version: str
    ads: list[RecommendedAd]
    organic: list[RecommendedOrganic] = Field(
        description="the mixed feed's organic items, best first (empty when organic_k is 0 "
        "or the serving snapshot has no organic items)")
    beam_widths: list[int] = Field(description="beam width used per id level (empty when "
                                   "the whole servable catalogue was scored)")
    server_id: str
    bucket: str = Field(description="the live A/B bucket whose model served the request: "
                        "'online' or 'control' ('' without a control bucket, and for a "
                        "control user while the control model is not loaded yet)")


class RollbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: str | None = Field(None, min_length=1, max_length=200,
                                description="a kept version; default: the previous one")


_bearer = HTTPBearer(auto_error=False, description="ADLOOP_SERVER_ADMIN_TOKEN")


class BodyLimitAndMetrics:
    """Pure ASGI middleware: 413 above ``max_bytes`` (header or streamed body), 400 for a
    bad Content-Length, and status/latency metrics for ``/v1/recommend``."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]],
                 max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        track = scope.get("path") == "/v1/recommend"
        status = {"code": 500}

        async def send_wrapped(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = int(message["status"])
            await send(message)

        try:
            problem = await self._check_body(scope, receive)
            if isinstance(problem, tuple):
                code, detail = problem
                await _send_json(send_wrapped, code, {"detail": detail})
                return
            await self.app(scope, problem, send_wrapped)
        finally:
            if track:
                M.REQUESTS.labels(str(status["code"])).inc()
                M.REQUEST_SECONDS.observe(time.perf_counter() - started)

    async def _check_body(self, scope: Scope, receive: Receive) -> Receive | tuple[int, str]:
        if scope.get("method") not in ("POST", "PUT", "PATCH"):
            return receive
        headers = dict(scope.get("headers") or [])
        raw_len = headers.get(b"content-length")
        if raw_len is not None:
            try:
                length = int(raw_len)
            except ValueError:
                return 400, "Content-Length header is not an integer"
            if length > self.max_bytes:
                return 413, f"request body is {length} bytes; the limit is {self.max_bytes}"
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return 400, "client disconnected while sending the body"
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return 413, f"request body exceeds the limit of {self.max_bytes} bytes"
            chunks.append(chunk)
            more = bool(message.get("more_body"))
        body = b"".join(chunks)
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return replay


async def _send_json(send: Send, code: int, payload: dict[str, Any]) -> None:
    body = msgspec.json.encode(payload)
    await send({"type": "http.response.start", "status": code,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class LoopLag:
    """How late the event loop runs a 10 ms timer (EWMA, seconds).

    Requests that wait for the HTTP front (parsing, the accept queue) are invisible to
    the batcher's queue; a late loop is how that wait shows. With beams already at their
    narrowest, a loop later than the latency target sheds requests with 429 at once.
    A sample during which a snapshot swap ran (``controller``) is left out: the swap's
    thread holding the GIL makes the loop late, not the request rate."""

    def __init__(self, interval_s: float = 0.01,
                 controller: BeamController | None = None) -> None:
        self.interval_s = interval_s
        self.controller = controller
        self.value = 0.0

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            t = loop.time()
            mark = self.controller.swap_mark() if self.controller is not None else 0
            await asyncio.sleep(self.interval_s)
            if self.controller is not None and self.controller.overlapped_swap(mark):
                continue
            late = max(0.0, loop.time() - t - self.interval_s)
            self.value = 0.8 * self.value + 0.2 * late
            M.LOOP_LAG.set(self.value)

    def sheds(self, controller: BeamController) -> bool:
        """Refuse a request now: beams at their narrowest, the loop later than the
        latency target, and no swap in progress."""
        return (controller.dynamic and controller.at_floor and self.value > controller.slo_s
                and not controller.swap_in_progress)


def create_api(service: Service) -> FastAPI:
    settings = service.settings
    lag = LoopLag(controller=service.controller)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        service.batcher.start()
        await asyncio.to_thread(service.start_threads)
        lag_task = asyncio.create_task(lag.run())
        try:
            yield
        finally:
            lag_task.cancel()
            await service.batcher.stop()
            await asyncio.to_thread(service.stop_threads)

    app = FastAPI(title="adloop serving worker", version="1", lifespan=lifespan,
                  description="Generative ad recommendation: trie-constrained beam search "
                  "with dynamic beam width on onnxruntime; snapshot hot swap.")
    def admin(creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> None:
        token = settings.admin_token
        if not token:
            raise HTTPException(403, "admin endpoints are disabled: set "
                                "ADLOOP_SERVER_ADMIN_TOKEN to enable them")
        if creds is None or creds.scheme.lower() != "bearer" or not hmac.compare_digest(
                creds.credentials.encode(), token.encode()):
            raise HTTPException(401, "a valid bearer token is required",
                                headers={"WWW-Authenticate": "Bearer"})

    @app.post("/v1/recommend", response_model=RecommendResponse,
              responses={400: {"description": "the body is not valid JSON"},
                         429: {"description": "overloaded at the narrowest beams"},
                         503: {"description": "no model snapshot loaded yet"},
                         413: {"description": "request body too large"}})
    async def recommend(req: RecommendRequest) -> Response:
        now = time.time()
        request_id = req.request_id or uuid.uuid4().hex
        if service.models.state is None:
            return JSONResponse({"detail": "not ready: no model snapshot loaded yet"}, 503,
                                headers={"Retry-After": "1"})
        ctl = service.controller
        if lag.sheds(ctl):
            M.SHED.inc()
            return JSONResponse({"detail": f"overloaded: the HTTP front runs "
                                 f"{1000 * lag.value:.0f} ms late at the narrowest beams"},
                                429, headers={"Retry-After": "1"})
        assigned = service.assign(req.user_id)
        if assigned:
            AB_REQUESTS.labels(assigned).inc()
        try:
            served, _wait, widths = await service.batcher.submit(RoutedRequest(
                RecRequest(req.user_id, dict(req.context), list(req.recent_ad_ids), req.k,
                           list(req.recent_organic), req.organic_k), assigned))
        except OverloadedError as exc:
            M.SHED.inc()
            return JSONResponse({"detail": f"overloaded: {exc}"}, 429,
                                headers={"Retry-After": "1"})
        except NotReadyError as exc:
            return JSONResponse({"detail": f"not ready: {exc}"}, 503,
                                headers={"Retry-After": "1"})
        assert isinstance(served, ServedResult)
        result = served.result
        assert isinstance(result, RecResult)
        for level, w in enumerate(widths):
            M.REQUEST_BEAM_WIDTH.labels(str(level)).observe(w)
        ads = [{"ad_id": a.ad_id, "score": a.score, "expected_value": a.expected_value,
                "position": a.position, "semantic_id": a.semantic_id, "pctr": a.pctr,
                "pcvr": a.pcvr, "bid": a.bid, "bid_type": a.bid_type,
                "propensity": a.propensity} for a in result.ads]
        organic = [{"item_id": o.item_id, "semantic_id": o.semantic_id, "position": o.position,
                    "score": o.score} for o in result.organic]
        if service.impressions is not None:
            service.impressions.offer(Impression(
                request_id=request_id,
                event_time=req.event_time if req.event_time is not None else now,
                user_id=req.user_id, context=dict(req.context),
                recent_ad_ids=list(req.recent_ad_ids),
                recent_organic=list(req.recent_organic),
                slate=[SlateItem(ad_id=a.ad_id, semantic_id=a.semantic_id, position=a.position,
                                 score=a.score, bid=a.bid, bid_type=a.bid_type,  # type: ignore[arg-type]
                                 propensity=a.propensity, exposure=a.exposure)
                       for a in result.ads],
                model_version=result.model_version, beam_widths=list(result.beam_widths),
                server_id=settings.server_id, beams=result.beams, bucket=served.bucket,
                organic=[OrganicSlot(item_id=o.item_id, semantic_id=o.semantic_id,
                                     position=o.position, score=o.score)
                         for o in result.organic]))
        body = msgspec.json.encode({"request_id": request_id,
                                    "model_version": result.model_version, "ads": ads,
                                    "organic": organic,
                                    "beam_widths": result.beam_widths,
                                    "server_id": settings.server_id,
                                    "bucket": served.bucket})
        return Response(body, media_type="application/json")

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", responses={503: {"description": "not ready; the body says why"}})
    async def readyz() -> JSONResponse:
        ok, detail = service.readiness()
        return JSONResponse({"ready": ok, **detail}, 200 if ok else 503)

    @app.get("/metrics", response_class=Response)
    async def metrics() -> Response:
        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)

    admin_responses: dict[int | str, dict[str, Any]] = {
        401: {"description": "missing or wrong bearer token"},
        403: {"description": "admin endpoints are disabled (no token configured)"}}

    @app.get("/v1/models", dependencies=[Depends(admin)], responses=admin_responses)
    async def models() -> dict[str, Any]:
        return {**service.models.describe(), "ab": service.router.describe()}

    @app.post("/v1/models/rollback", dependencies=[Depends(admin)],
              responses={**admin_responses,
                         400: {"description": "the body is not valid JSON"},
                         413: {"description": "request body too large"},
                         409: {"description": "no such kept version, or it failed to load"}})
    async def rollback(request: Request, body: RollbackRequest | None = None) -> JSONResponse:
        version = body.version if body is not None else None
        result, target = await asyncio.to_thread(service.models.rollback, version)
        service.router.refresh()
        payload = {"result": result, "version": target, "serving": service.models.version}
        return JSONResponse(payload, 200 if result == "ok" else 409)

    app.add_middleware(BodyLimitAndMetrics, max_bytes=settings.max_body_bytes)
    return app
