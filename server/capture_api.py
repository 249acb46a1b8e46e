"""HTTP routes of state capture (server/capture.py) and of the hyperbolic store (server/hyperbolic.py).

    POST   /v1/capture                        a forward pass's states: aggregates as JSON, raw states on request
    POST   /v1/capture/store                  add captured state vectors to a named collection
    POST   /v1/capture/search                 nearest stored states of a query, by hyperbolic distance
    GET    /v1/capture/collections            the collections
    DELETE /v1/capture/collections/{name}     drop one

A capture runs over one context: `text` (tokenized as the tokenizer does by default),
`messages` (the chat template with the generation prompt), or `session_id` with the session's
bearer token: the session's tokens so far, prompt, turns and confirmed generated tokens alike.
The answer's size is estimated before the forward pass; over the `capture_max_bytes` setting
it is refused with 413 and the estimate.

Captures are admitted by their estimated bytes: several run at once (at most CAPTURES_AT_ONCE)
while their estimates add up to at most `capture_max_bytes`, so a small capture runs beside a
large one instead of queueing behind it, and memory stays bounded by one maximum-size capture.
One that cannot start within ADMIT_WAIT_S is refused with 503 `capture_busy` and `Retry-After`
rather than waiting without bound.

A collection belongs to the bearer of the token it was created with and is invisible to
everyone else (server/owners.py): an owner token (a store without a bearer token gets a new
one in its answer, `owner_token`, that once), or, for a store of a session's states, that
session's token. Every store, search, listing and deletion needs that token; another owner's
collection is answered exactly like a missing one.
Errors are server/errors.py's, answered like every other route's.
"""

import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Literal

import numpy as np
from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, FiniteFloat, model_validator

from hpi.capture import ACTIVATIONS, STATES, Capture, Dims, capture, estimate_bytes, json_values, select
from hpi.config import Settings
from hpi.errors import (ApiErrorRoute, CaptureBusy, CaptureTooLarge, EmptyContext, PromptTooLong, UnknownLayers,
                        UnknownStates, quoted)
from hpi.hyperbolic import StateStore
from hpi.messages import request_messages
from hpi.metrics import METRICS
from hpi.models import LoadedModel
from hpi.owners import PREFIX, Owners, owner_id
from hpi.sessions import SessionStore

HOLO_MEDIA_TYPE = "application/octet-stream"
# States a vector per token can be read from: a token axis first (pattern-like states are not).
VECTOR_STATES = tuple(n for n, s in STATES.items() if s.axes[0] == "t")
# Each capture's forward already spreads over torch's threads: a few at once keep the cores
# busy between a large capture's steps; more would only interleave.
CAPTURES_AT_ONCE = 2
ADMIT_WAIT_S = 2.0


class Admission:
    """Captures running at once: at most `slots` of them, their estimated bytes summing to at
    most `budget`. Waiting is bounded: a capture not admitted within `wait_s` gets 503."""

    def __init__(self, budget: int, slots: int, wait_s: float):
        self.budget, self.slots, self.wait_s = budget, slots, wait_s
        self.held = 0  # estimated bytes of the running captures
        self.running = 0
        self._cond = threading.Condition()

    @contextmanager
    def admit(self, need: int) -> Iterator[None]:
        with self._cond:
            if not self._cond.wait_for(lambda: self.running < self.slots and self.held + need <= self.budget,
                                       self.wait_s):
                retry_s = max(1, math.ceil(self.wait_s))
                raise CaptureBusy(f"captures holding {self.held} of {self.budget} estimated bytes are running; "
                                  f"this one needs {need}: retry in {retry_s} s", retry_s)
            self.held += need
            self.running += 1
        try:
            yield
        finally:
            with self._cond:
                self.held -= need
                self.running -= 1
                self._cond.notify_all()


def capture_router(settings: Settings, owners: Owners) -> APIRouter:
    api = APIRouter(route_class=ApiErrorRoute, tags=["capture"])
    bearer = HTTPBearer(auto_error=False, description="a session's token (to capture that session, or to reach "
                                                      "collections stored from it) or an owner token")
    Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
    admission = Admission(settings.capture_max_bytes, CAPTURES_AT_ONCE, ADMIT_WAIT_S)
    store = StateStore(settings.capture_store_bytes)

    Messages = request_messages(settings)

    class Context(BaseModel):
        """One of text, messages or session_id; a token range [start, end) of it (end: its length)."""
        model_config = ConfigDict(extra="forbid")
        text: str | None = Field(None, max_length=settings.max_message_chars)
        messages: Messages | None = None
        session_id: str | None = Field(None, max_length=128)
        start: int = Field(0, ge=0)
        end: int | None = Field(None, ge=1)

        def sources(self) -> list[str]:
            return [k for k in ("text", "messages", "session_id") if getattr(self, k) is not None]

    class OneContext(Context):
        @model_validator(mode="after")
        def _one_source(self):
            if len(self.sources()) != 1:
                raise ValueError("give exactly one of text, messages or session_id")
            return self

    class CaptureBody(OneContext):
        layers: list[int] | None = Field(None, max_length=4096, description="default: all")
        heads: list[int] | None = Field(None, max_length=4096, description="query heads; default: all")
        states: list[str] = Field([], max_length=len(STATES), description="raw states to return; default: none")
        percentile: float = Field(90.0, ge=0, le=100, description="peaks: tokens at or above this percentile")
        activation: str = Field("mlp.hook_post", description=f"state whose norm ranks activation peaks: {', '.join(ACTIVATIONS)}")
        format: Literal["json", "holo"] = "json"

    class StoreBody(OneContext):
        collection: str = Field(max_length=64)
        state: str = "hook_resid_post"
        layer: int | None = Field(None, description="needed for per-block states")
        heads: list[int] | None = Field(None, max_length=4096, description="for per-head states; default: all")
        pool: Literal["token", "mean"] = Field("mean", description="one vector per token, or their mean")
        label: str = Field("", max_length=256)
        # Non-finite numbers are refused here, before any lookup, like every other malformed field.
        curvature: float | None = Field(None, lt=0, allow_inf_nan=False, description="at creation; default -1")
        scale: float | None = Field(None, gt=0, allow_inf_nan=False,
                                    description="at creation; default 1 / median norm of the first batch")
        center: bool | None = Field(None, description="at creation: subtract the first batch's mean; default false")

    class SearchBody(Context):
        collection: str = Field(max_length=64)
        vector: list[FiniteFloat] | None = Field(None, max_length=1 << 16, description="a raw state vector to look up")
        k: int = Field(5, ge=1, le=100)
        metric: Literal["hyperbolic", "euclidean", "cosine"] = "hyperbolic"

        @model_validator(mode="after")
        def _one_query(self):
            if len(self.sources()) + (self.vector is not None) != 1:
                raise ValueError("give exactly one of vector, text, messages or session_id")
            return self

    def lm_of(request: Request) -> LoadedModel:
        return request.app.state.anchor.lm

    def context_ids(request: Request, body: Context, creds: HTTPAuthorizationCredentials | None) -> list[int]:
        lm = lm_of(request)
        if body.text is not None:
            ids = lm.tokenizer(body.text)["input_ids"]
        elif body.messages is not None:
            ids = lm.chat_ids([m.model_dump() for m in body.messages])
        else:
            sessions: SessionStore = request.app.state.store
            # The ids are copied under the session's lock; the capture itself does not hold it.
            with sessions.use(body.session_id, creds.credentials if creds else None, wake=False) as s:
                ids = list(s.caches.ids)
        if not ids:
            raise EmptyContext("the context has no tokens")
        if len(ids) > settings.capture_max_tokens:
            raise PromptTooLong(f"the context is {len(ids)} tokens; a capture runs over at most "
                                f"{settings.capture_max_tokens}")
        return ids

    def run(lm: LoadedModel, ids: list[int], fmt: str, **selection) -> tuple[Capture, int]:
        dims = Dims.of(lm.config)
        sel = select(dims, len(ids), **selection)
        need = estimate_bytes(dims, sel, fmt)
        if need > settings.capture_max_bytes:
            limit = settings.capture_max_bytes
            raise CaptureTooLarge(f"the answer would be about {need} bytes; the limit is {limit}: select fewer "
                                  "layers, heads, states or tokens", estimate_bytes=need, limit_bytes=limit)
        with admission.admit(need):
            cap = capture(lm, ids, sel)
        METRICS.add("hpi_forward_passes_total")
        return cap, need

    @api.post("/v1/capture", responses={200: {"content": {"application/json": {}, HOLO_MEDIA_TYPE: {}}}})
    def capture_state(body: CaptureBody, request: Request, creds: Credentials):
        """Per-layer, per-head state of the anchor's forward pass over a context (docs/capture.md)."""
        lm = lm_of(request)
        ids = context_ids(request, body, creds)
        cap, need = run(lm, ids, body.format, layers=body.layers, heads=body.heads, states=body.states,
                        start=body.start, end=body.end, percentile=body.percentile, activation=body.activation)
        if body.format == "holo":
            return Response(cap.holo_bytes(lm.model_id, lm.tokenizer_id), media_type=HOLO_MEDIA_TYPE,
                            headers={"X-HPI-Estimate-Bytes": str(need)})
        out = {"model_id": lm.model_id, "estimate_bytes": need, **cap.summary()}
        out["tokens"]["pieces"] = [lm.tokenizer.decode([t]) for t in out["tokens"]["ids"]]
        out["tensors"] = {name: {"shape": list(a.shape), "data": json_values(a)} for name, a in cap.tensors.items()}
        return JSONResponse(out)

    def spec_of(body: StoreBody, lm: LoadedModel) -> dict:
        if body.state not in VECTOR_STATES:
            raise UnknownStates(f"state {quoted(body.state)} has no vector per token; valid: "
                                f"{', '.join(VECTOR_STATES)}")
        block = STATES[body.state].block
        if block and body.layer is None:
            raise UnknownLayers(f"{body.state} is a per-block state: give a layer "
                                f"(0..{lm.config.num_hidden_layers - 1})")
        per_head = any(a in "hg" for a in STATES[body.state].axes)
        heads = sorted(set(body.heads)) if body.heads is not None else list(range(lm.config.num_attention_heads))
        return {"state": body.state, "layer": body.layer if block else None, "heads": heads if per_head else None,
                "pool": body.pool}

    def vectors(lm: LoadedModel, ids: list[int], body: Context, spec: dict) -> tuple[np.ndarray, list[dict]]:
        """The state vectors of a context's ids under a collection's spec, [n, D], and what each one is."""
        layer = spec["layer"]
        cap, _ = run(lm, ids, "holo", layers=None if layer is None else [layer], heads=spec["heads"],
                     states=[spec["state"]], start=body.start, end=body.end)
        key = spec["state"] if layer is None else f"blocks.{layer}.{spec['state']}"
        u = cap.tensors[key].reshape(cap.sel.end - cap.sel.start, -1)  # [n, D]
        positions = list(range(cap.sel.start, cap.sel.end))
        if spec["pool"] == "mean":
            return u.mean(0, keepdims=True), [{"range": [cap.sel.start, cap.sel.end]}]
        return u, [{"position": p, "token": ids[p]} for p in positions]

    def owner_of(creds: HTTPAuthorizationCredentials | None) -> str:
        """The owner whose collections a bearer token reaches. An owner token must be one this
        anchor issued (401 without a token, 403 otherwise). Any other token is taken as a
        session's: its owner id is the token's hash, which only the token's holder can name,
        and only a store that checked the token against its session creates collections under it."""
        token = creds.credentials if creds else None
        if token is None or token.startswith(PREFIX):
            return owners.check(token)
        return owner_id(token)

    @api.post("/v1/capture/store")
    def store_states(body: StoreBody, request: Request, creds: Credentials):
        """Add a context's state vectors (one per token, or their mean) to a collection in the Poincaré ball."""
        lm = lm_of(request)
        spec = spec_of(body, lm)
        issued = None
        if body.session_id is not None:
            ids = context_ids(request, body, creds)  # the token is checked against the session here
            owner, create = owner_id(creds.credentials), True
        elif creds is None:
            issued = owners.issue()
            owner, create = owner_id(issued), True
            ids = context_ids(request, body, creds)
        else:  # an owner token, checked by owner_of; any other token may only add to what it owns
            owner, create = owner_of(creds), creds.credentials.startswith(PREFIX)
            ids = context_ids(request, body, creds)
        u, entries = vectors(lm, ids, body, spec)
        col, vector_ids = store.add(body.collection, u, [{"label": body.label, **e} for e in entries], spec,
                                    body.curvature, body.scale, body.center, owner=owner, create=create,
                                    client=request.client.host if request.client else "")
        out = {"collection": col.name, "added": len(vector_ids), "ids": vector_ids, **describe(col)}
        if issued:
            out["owner_token"] = issued
        return out

    def describe(col) -> dict:
        return {"size": len(col.entries), "dim": col.dim, "curvature": col.curvature, "scale": col.scale,
                "centered": col.centered, "spec": col.spec, "bytes": col.nbytes}

    @api.post("/v1/capture/search")
    def search_states(body: SearchBody, request: Request, creds: Credentials):
        """The k stored states nearest to a query vector, or to each state vector of a context."""
        if body.session_id is not None:
            ids = context_ids(request, body, creds)  # the token is checked against the session here
            owner = owner_id(creds.credentials)
        else:
            owner = owner_of(creds)
            ids = None if body.vector is not None else context_ids(request, body, creds)
        col = store.get(body.collection, owner=owner)
        if ids is None:
            u, queries = np.asarray([body.vector], dtype=np.float64), [{}]
        else:
            u, queries = vectors(lm_of(request), ids, body, col.spec)
        col, idx, dist = store.search(body.collection, u, body.k, body.metric, owner=owner)
        return {"collection": col.name, "metric": body.metric, "curvature": col.curvature,
                "results": [{"query": q, "neighbours": [{**col.entries[i], "distance": float(d)}
                                                        for i, d in zip(row_i, row_d)]}
                            for q, row_i, row_d in zip(queries, idx, dist)]}

    @api.get("/v1/capture/collections")
    def collections(creds: Credentials):
        """The caller's collections; `limit_bytes` is what one owner may hold."""
        cols = store.collections(owner=owner_of(creds))
        return {"bytes": sum(c.nbytes for c in cols), "limit_bytes": store.owner_max_bytes,
                "collections": [{"name": c.name, **describe(c)} for c in cols]}

    @api.delete("/v1/capture/collections/{name}", status_code=204, response_class=Response)
    def delete_collection(name: str, creds: Credentials):
        store.delete(name, owner=owner_of(creds))
        return Response(status_code=204)

    return api
