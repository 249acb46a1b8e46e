"""The anchor's HTTP API: model pack, conversation sessions and their holograms.

It mounts the routers of OpenAI's API (server/openai_api.py), state capture and memories. It also serves the resonator page: `client_web/` at /client/ and the WGSL kernels of
`shaders/` at /shaders/, as plain static files (no build step).

Every error is JSON `{"error": {"code", "message"}}` (server/errors.py). Session endpoints need the session's
token as `Authorization: Bearer <token>`; the session is looked up first (404), then the
token is checked (401 when absent, 403 when wrong).
"""

import asyncio
from contextlib import asynccontextmanager
from http import HTTPStatus
from importlib.resources import files
from pathlib import Path
from typing import Annotated

import anyio
from fastapi import Depends, FastAPI, Query, Request, Response, WebSocket, WebSocketDisconnect
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import RedirectResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
import torch

from hpi.protocol import frames
from hpi import kernels
from hpi import errors
from hpi.anchor import Anchor
from hpi.capture_api import capture_router
from hpi.config import Settings
from hpi.errors import ApiError, BadFrame, RateLimited, SessionNotFound, UnknownModel, quoted
from hpi.memory.api import memory_router
from hpi.messages import request_messages
from hpi.metrics import METRICS
from hpi.middleware import ApiKeys, BodyLimit, InternalErrors, OriginPolicy
from hpi.models import load_model
from hpi.openai_api import openai_router
from hpi.ratelimit import LocalCounts, RateLimit, RateLimiter, RedisCounts
from hpi.request_sampling import SamplingFields
from hpi.session_state import EncodedSegment, Session
from hpi.sessions import SessionStore
from hpi.transcripts import CHECKPOINT_NAME

HOLO_MEDIA_TYPE = "application/octet-stream"
# Names the session a response created, so a proxy can keep its later requests on this anchor
# (scripts/haproxy.cfg), where its caches are.
SESSION_HEADER = "X-HPI-Session"
# The page and the kernels ship inside the distribution (hpi.web is client_web/, hpi.shaders is
# shaders/); the kernels are also under the page's own folder, where the web SDK looks for them
# (new URL("./shaders/", import.meta.url)).
STATIC = {"/client/shaders": Path(str(files("hpi.shaders"))), "/client": Path(str(files("hpi.web"))),
          "/shaders": Path(str(files("hpi.shaders")))}
OPEN_PATHS = ("/", "/favicon.ico", "/healthz")  # with the static files: what needs no API key
bearer = HTTPBearer(auto_error=False, description="the session token returned by POST /v1/sessions")


def _etag_matches(if_none_match: str | None, etag: str) -> bool:
    if not if_none_match:
        return False
    tags = [t.strip().removeprefix("W/") for t in if_none_match.split(",")]
    return "*" in tags or etag in tags


def _holo_response(request: Request, data: bytes, etag: str, cache_control: str,
                   headers: dict[str, str] | None = None) -> Response:
    headers = {"ETag": etag, "Cache-Control": cache_control, **(headers or {})}
    if _etag_matches(request.headers.get("if-none-match"), etag):
        return Response(status_code=304, headers=headers)
    METRICS.add("hpi_bytes_sent_total", len(data))
    return Response(data, media_type=HOLO_MEDIA_TYPE, headers=headers)


def _segment_response(request: Request, seg: EncodedSegment) -> Response:
    return _holo_response(request, seg.data, seg.etag, "private, no-cache",
                          {"X-HPI-Start": str(seg.start), "X-HPI-End": str(seg.end)})


def framework_error(exc: StarletteHTTPException) -> ApiError:
    """The error of a refusal by the web framework, with its status's standard phrase: its own detail
    is no message of ours."""
    kind = {404: errors.NotFound, 405: errors.MethodNotAllowed}.get(exc.status_code, errors.HttpError)
    error = kind(HTTPStatus(exc.status_code).phrase, headers=dict(exc.headers or {}))
    error.status = exc.status_code  # the framework's status stands, whatever it refused (400 in practice)
    return error


def request_models(settings: Settings) -> tuple[type[BaseModel], type[BaseModel]]:
    """Request bodies, sized by the settings."""
    Messages = request_messages(settings)

    class CreateSession(SamplingFields):
        """The prompt, and the answers' sampling (OpenAI's fields, as in chat completions). Without
        any sampling field the first page's hello fixes the temperature and seed."""
        model_config = ConfigDict(extra="forbid")
        messages: Messages

    class AppendMessages(BaseModel):
        model_config = ConfigDict(extra="forbid")
        messages: Messages

    return CreateSession, AppendMessages


class SessionCreated(BaseModel):
    session_id: str
    token: str
    n_tokens: int
    hologram_url: str
    hologram_bytes: int
    sampling: dict | None = Field(description="the answers' sampling (protocol/SPEC.md, Sampling), if the "
                                              "request gave one; else the first page's hello fixes it")


CheckpointName = Annotated[str, Field(pattern=CHECKPOINT_NAME, description="1 to 64 letters, digits, ' _.:-'")]


class NewCheckpoint(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: CheckpointName


class Backtrack(BaseModel):
    model_config = ConfigDict(extra="forbid")
    checkpoint: CheckpointName


class Fork(BaseModel):
    model_config = ConfigDict(extra="forbid")
    checkpoint: CheckpointName
    token: int | None = Field(None, ge=0, description="forced first token of the fork (confirmed)")
    temperature: frames.Temperature | None = Field(None, description="default: the parent's sampling")
    seed: int | None = Field(None, ge=0, lt=1 << 32, description="default: the parent's sampling")


class CheckpointInfo(BaseModel):
    name: str
    position: int
    created: float


class CheckpointList(BaseModel):
    checkpoints: list[CheckpointInfo]


class TrailPosition(BaseModel):
    """Where a page continues a session: load a hologram ending at `position - 1`, then say hello
    with `position` and `chain`."""
    position: int
    chain_base: int
    chain: str = Field(description="hex of the chain hash at `position`")
    tokens: list[int] = Field(description="the confirmed tokens of the current answer, from chain_base")
    n_messages: int = Field(description="the session's recorded messages; later ones are gone")
    holo_end: int = Field(description="the next hologram delta of a new turn starts here")
    hologram_url: str


class Backtracked(TrailPosition):
    checkpoint: str
    dropped: int = Field(description="confirmed tokens dropped")


class ForkOrigin(BaseModel):
    session_id: str
    checkpoint: str
    position: int


class Forked(TrailPosition):
    session_id: str
    token: str
    forked_from: ForkOrigin
    shared_tokens: int = Field(description="KV positions shared with the parent (copy-on-write)")
    sampling: dict | None = Field(description="the fork's sampling (protocol/SPEC.md, Sampling): its parent's, with "
                                              "its own temperature and seed if given")


def _trail_position(s: Session) -> dict:
    return {"position": s.n_tokens, "chain_base": s.chain_base, "chain": s.chains[-1].hex(), "tokens": s.answer,
            "n_messages": len(s.messages), "holo_end": s.holo_end, "hologram_url": f"/v1/sessions/{s.id}/hologram"}


def check_room(app: FastAPI) -> None:
    """503 server_busy at once, before any state changes, when the forwards' queue is full."""
    app.state.anchor.lm.scheduler.check_room()


def load_anchor(settings: Settings) -> Anchor:
    lm = load_model(settings.model, settings.device, quantized=settings.weights == "blocks",
                    cache=settings.models_path())
    res = None
    if settings.resonator_model and settings.resonator_model != settings.model:
        res = load_model(settings.resonator_model, settings.device)
    return Anchor(lm, res, **settings.anchor_options())


def create_app(settings: Settings, anchor: Anchor | None = None) -> FastAPI:
    CreateSession, AppendMessages = request_models(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        a = anchor or load_anchor(settings)
        _ = a.basis  # builds the model pack now rather than in the first requests, concurrently
        app.state.anchor = a
        app.state.store = SessionStore(a, settings)
        METRICS.gauges["hpi_sessions"] = ("sessions holding caches in memory", lambda: len(app.state.store))
        METRICS.gauges["hpi_kv_bytes"] = ("KV cache bytes held for sessions", lambda: app.state.store.kv_bytes)
        # Sync channels wait in worker threads for their forward: room for one per live session, and
        # as many again for every other request, so that neither starves the other (anyio's default is 40).
        anyio.to_thread.current_default_thread_limiter().total_tokens = max(40, 2 * settings.max_live_sessions)
        if settings.threads:
            torch.set_num_threads(settings.threads)
            kernels.set_threads(settings.threads)
        sched = a.lm.scheduler
        sched.wait_s, sched.max_rows, sched.max_queued_rows = (settings.batch_wait_ms / 1000, settings.batch_max_rows,
                                                               settings.max_queued_rows)
        sweeper = asyncio.create_task(sweep(app.state.store))
        yield
        sweeper.cancel()

    async def sweep(st: SessionStore):
        """Evict idle sessions' caches and delete expired sessions, now and then."""
        every = min(60.0, settings.session_idle_s / 4, settings.session_ttl_s / 4)
        while True:
            await asyncio.sleep(every)
            await run_in_threadpool(st.sweep)

    app = FastAPI(title="HPI anchor", version="0.1.0", lifespan=lifespan)
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    # API keys: outside BodyLimit, so a request without one is refused before its body is read; inside
    # the rate limit, so guesses count against their client's rate; inside CORS, since preflights carry
    # no key and a refusal must still carry the headers the page reads it by.
    if settings.api_keys:
        app.add_middleware(ApiKeys, keys=settings.api_keys, open_paths=OPEN_PATHS, open_prefixes=tuple(STATIC))
    # The fleet's anchors count each client together where they share a Redis.
    counts = RedisCounts(settings.redis_url) if settings.session_store == "redis" else LocalCounts()
    limiter = RateLimiter(settings.rate_per_ip, settings.rate_per_token, counts)
    app.add_middleware(RateLimit, limiter=limiter)
    if settings.allowed_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.allowed_origins, allow_methods=["*"],
                           allow_headers=["Authorization", "Content-Type", "If-None-Match", "X-API-Key"],
                           expose_headers=["ETag", "Retry-After", "X-HPI-Start", "X-HPI-End", "X-HPI-Estimate-Bytes"])
    app.add_middleware(OriginPolicy, allowed_hosts=settings.allowed_hosts, allowed_origins=settings.allowed_origins,
                       private_metrics=settings.private_metrics, private_docs=settings.private_docs)
    app.add_middleware(InternalErrors)  # outermost of ours: whatever fails below gets a JSON 500
    owners = settings.owners()
    app.include_router(capture_router(settings, owners))
    app.include_router(memory_router(settings, owners))
    app.include_router(openai_router(settings))

    app.add_exception_handler(ApiError, errors.handle)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return errors.validation_error(exc.errors()).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        """The framework's own refusals (no route, a method the route lacks, a body it cannot parse)."""
        return framework_error(exc).response()

    def store(request: Request) -> SessionStore:
        return request.app.state.store

    Store = Annotated[SessionStore, Depends(store)]
    Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]

    def token(creds: HTTPAuthorizationCredentials | None) -> str | None:
        return creds.credentials if creds else None

    def client_of(request: Request) -> str:
        """Whose quota a request counts against: the peer's address (a trusted proxy's
        forwarded address where uvicorn is told to believe it)."""
        return request.client.host if request.client else ""

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    def root():
        return RedirectResponse("/client/")

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon():
        return Response(status_code=204)

    # Health and metrics are answered on the event loop: they never wait for a worker thread
    # that model work may be holding.
    @app.get("/metrics", include_in_schema=False)
    async def metrics():
        return Response(METRICS.render(), media_type="text/plain; version=0.0.4")

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/v1/models/{model_key}/pack", response_class=Response,
             responses={200: {"content": {HOLO_MEDIA_TYPE: {}}}, 304: {}, 404: {}})
    def model_pack(model_key: str, request: Request):
        a: Anchor = request.app.state.anchor
        if model_key != a.model_key:
            raise UnknownModel(f"no model pack {quoted(model_key)}; see /v1/models")
        # The URL names the pack's content hash, so what it serves never changes.
        return _holo_response(request, a.pack_bytes, f'"{a.pack_hash}"', "public, max-age=31536000, immutable")

    @app.post("/v1/sessions", status_code=201, response_model=SessionCreated)
    async def create_session(body: CreateSession, st: Store, request: Request, response: Response):
        client = client_of(request)
        check_room(request.app)
        st.check_admission(client)  # a full server says so at once, not after a worker thread is free
        sampling = body.checked(request.app.state.anchor.lm) if body.given() else None
        s = await run_in_threadpool(st.create, [m.model_dump() for m in body.messages], client, sampling)
        response.headers[SESSION_HEADER] = s.id
        return SessionCreated(session_id=s.id, token=s.token, n_tokens=s.n_tokens,
                              hologram_url=f"/v1/sessions/{s.id}/hologram", hologram_bytes=len(s.full.data),
                              sampling=s.sampling and s.sampling.to_json())

    @app.get("/v1/sessions/{session_id}/hologram", response_class=Response,
             responses={200: {"content": {HOLO_MEDIA_TYPE: {}}}, 304: {}})
    def hologram(session_id: str, request: Request, st: Store, creds: Credentials,
                 start: Annotated[int, Query(ge=0, description="0: the whole conversation; else a delta "
                                                              "after the segments the page holds")] = 0):
        with st.use(session_id, token(creds)) as s:
            return _segment_response(request, st.hologram(s, start))

    @app.post("/v1/sessions/{session_id}/checkpoints", status_code=201, response_model=CheckpointInfo)
    def create_checkpoint(session_id: str, body: NewCheckpoint, st: Store, creds: Credentials):
        with st.use(session_id, token(creds), wake=False) as s:
            c = st.checkpoint(s, body.name)
        return CheckpointInfo(name=c.name, position=c.position, created=c.created)

    @app.get("/v1/sessions/{session_id}/checkpoints", response_model=CheckpointList)
    def list_checkpoints(session_id: str, st: Store, creds: Credentials):
        with st.use(session_id, token(creds), wake=False) as s:
            return CheckpointList(checkpoints=[CheckpointInfo(name=c.name, position=c.position, created=c.created)
                                               for c in s.checkpoints.values()])

    @app.post("/v1/sessions/{session_id}/backtrack", response_model=Backtracked)
    def backtrack(session_id: str, body: Backtrack, st: Store, creds: Credentials):
        with st.use(session_id, token(creds), wake=False) as s:
            dropped = st.backtrack(s, body.checkpoint)
            return Backtracked(checkpoint=body.checkpoint, dropped=dropped, **_trail_position(s))

    @app.post("/v1/sessions/{session_id}/fork", status_code=201, response_model=Forked)
    def fork(session_id: str, body: Fork, st: Store, creds: Credentials, request: Request, response: Response):
        check_room(request.app)
        with st.use(session_id, token(creds)) as parent:
            f = st.fork(parent, body.checkpoint, body.token, body.temperature, body.seed, client_of(request))
            position = parent.checkpoints[body.checkpoint].position
        response.headers[SESSION_HEADER] = f.id
        return Forked(session_id=f.id, token=f.token, shared_tokens=f.caches.anchor.frozen_tokens,
                      forked_from=ForkOrigin(session_id=session_id, checkpoint=body.checkpoint, position=position),
                      sampling=f.sampling and f.sampling.to_json(), **_trail_position(f))

    @app.post("/v1/sessions/{session_id}/messages", response_class=Response,
              responses={200: {"content": {HOLO_MEDIA_TYPE: {}}}})
    def append_messages(session_id: str, body: AppendMessages, st: Store, creds: Credentials, request: Request):
        check_room(request.app)
        with st.use(session_id, token(creds)) as s:
            delta = st.append(s, [m.model_dump() for m in body.messages])
            METRICS.add("hpi_bytes_sent_total", len(delta.data))
            return Response(delta.data, media_type=HOLO_MEDIA_TYPE,
                            headers={"ETag": delta.etag, "X-HPI-Start": str(delta.start),
                                     "X-HPI-End": str(delta.end)})

    @app.websocket("/v1/sessions/{session_id}/sync")
    async def sync(ws: WebSocket, session_id: str):
        """The reconciliation channel: msgpack frames (protocol/frames.py, protocol/SPEC.md).

        A bad frame gets an error frame and the connection stays; an unknown session or a
        wrong token gets an error frame and the connection is closed.
        """
        st: SessionStore = ws.app.state.store
        if not await run_in_threadpool(st.exists, session_id):  # refused before accepting: the client sees HTTP 403
            await ws.close(code=1008, reason=SessionNotFound.code)
            return
        await ws.accept(subprotocol=frames.SUBPROTOCOL if frames.SUBPROTOCOL in ws.scope["subprotocols"] else None)
        session_ok = False
        while True:
            try:
                message = await ws.receive()
            except WebSocketDisconnect:
                return
            if message["type"] == "websocket.disconnect":
                return
            close = False
            try:
                data = message.get("bytes")
                if data is None:
                    raise frames.FrameError("frames are binary msgpack, not text")
                frame = frames.decode(data)
                if await limiter.check(None, f"session:{session_id}") is not None:
                    raise RateLimited("this session sends frames faster than the anchor allows: say hello again later")
                check_room(ws.app)
                if isinstance(frame, frames.Hello):
                    def hello():
                        with st.use(session_id, frame.token) as s:
                            return st.ready(s, frame.position, frame.chain, (frame.temperature, frame.seed))
                    reply = await run_in_threadpool(hello)
                    session_ok, token = True, frame.token
                elif not session_ok:
                    raise frames.FrameError("the first frame must be a hello")
                else:
                    def draft():
                        with st.use(session_id, token) as s:
                            return st.draft(s, frame.position, frame.chain, frame.tokens)
                    reply = await run_in_threadpool(draft)
            except frames.FrameError as e:  # its message is the anchor's own, naming the bad field
                reply = BadFrame(str(e)).frame()
            except ApiError as e:  # the page backs off and says hello again, or stops if the code is fatal
                reply = e.frame()
                close = e.status in (401, 403, 404)  # this session cannot be reached on this channel
            out = frames.encode(reply)
            METRICS.add("hpi_bytes_sent_total", len(out))
            try:
                await ws.send_bytes(out)
            except WebSocketDisconnect:  # the page went away meanwhile: its verdict is saved, `ready` brings it
                return
            if close:
                await ws.close(code=1008)
                return

    @app.delete("/v1/sessions/{session_id}", status_code=204, response_class=Response)
    def delete_session(session_id: str, st: Store, creds: Credentials):
        with st.use(session_id, token(creds), wake=False) as s:
            st.delete(s)
        return Response(status_code=204)

    for prefix, folder in STATIC.items():
        app.mount(prefix, StaticFiles(directory=folder, html=True), name=prefix.strip("/"))
    return app
