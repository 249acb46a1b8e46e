"""HTTP endpoints of the memory service, under /v1/memories (an APIRouter for server/app.py).

A memory belongs to whoever created it. Creating one issues an owner token, returned once
as `owner_token` (a create that already carries `Authorization: Bearer <owner token>` adds
the memory to that owner instead, so one client keeps its memories under one token). Every
other endpoint needs the token and sees only its owner's memories: names are per owner,
and another owner's memory is answered exactly like a missing one.

Text goes through the anchor model's tokenizer; token ids can be given directly. Errors
use the anchor's format `{"error": {"code", "message"}}`: no owner token 401, a token the
anchor did not issue 403, unknown memory 404, empty or too-short input 422, a learn batch
over `max_learn_tokens` 413, a memory (or a learn) over its byte budget 413, an owner's
memory count over its limit 429, no room left on the server 503, a corrupted file 409.
Anything unexpected is a 500 whose message names no exception: its text is only logged
(server/middleware.py `InternalErrors`).
"""

from __future__ import annotations

from typing import Annotated, Literal

import numpy as np
from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, model_validator

from hpi.config import Settings
from hpi.memory import budget
from hpi.memory.dreaming import dream
from hpi.errors import ApiErrorRoute, BatchTooLarge, ContextTooShort, EmptyBatch, InvalidRequest
from hpi.memory.registry import Registry
from hpi.memory.store import PATHS, Config, Memory
from hpi.owners import Owners, owner_id

TokenId = Annotated[int, Field(ge=0, lt=1 << 20)]
bearer = HTTPBearer(auto_error=False, description="the owner token returned by POST /v1/memories")
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]


class _Input(BaseModel):
    """Exactly one of `text` (tokenized by the anchor model) or `tokens`."""
    model_config = ConfigDict(extra="forbid")
    text: str | None = None
    tokens: list[TokenId] | None = None

    @model_validator(mode="after")
    def _one(self):
        if (self.text is None) == (self.tokens is None):
            raise ValueError("give exactly one of 'text' or 'tokens'")
        return self


class CreateMemory(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    context: int = Field(3, ge=1, le=64, description="tokens of context that predict the next one")
    dim: Literal[4, 8, 16] = Field(4, description="side of the token matrices")
    vocab: int | None = Field(None, ge=1, le=1 << 20, description="default: the anchor tokenizer's size")
    satellites: int | None = Field(None, ge=1, le=1 << 22, description="default: from the capacity curve")
    planned_patterns: int = Field(1 << 16, ge=1, le=1 << 26, description="sizes the default satellites")
    seed: int = Field(0, ge=0, lt=1 << 32)


class Learn(_Input):
    pass


class Query(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str | None = None
    tokens: list[TokenId] | None = None
    batch: list[list[TokenId]] | None = Field(None, min_length=1, max_length=4096)
    top_k: int = Field(5, ge=1, le=64)

    @model_validator(mode="after")
    def _one(self):
        if sum(x is not None for x in (self.text, self.tokens, self.batch)) != 1:
            raise ValueError("give exactly one of 'text', 'tokens' or 'batch'")
        return self


class Generate(_Input):
    n_tokens: int = Field(32, ge=1)
    sample: bool = Field(False, description="draw from the top candidates instead of taking the best")
    seed: int = Field(0, ge=0, lt=1 << 32)


class Dream(BaseModel):
    model_config = ConfigDict(extra="forbid")
    forget: float = Field(0.0, ge=0.0, le=64.0, description="φ-decay strength; 0 forgets nothing")


def memory_router(settings: Settings, owners: Owners) -> APIRouter:
    registry = Registry(settings.memories_path(), settings.max_memories, settings.client_share)
    router = APIRouter(prefix="/v1/memories", tags=["memories"], route_class=ApiErrorRoute)

    def owner(creds: HTTPAuthorizationCredentials | None) -> str:
        return owners.check(creds.credentials if creds else None)

    def tokenizer(request: Request):
        return request.app.state.anchor.lm.tokenizer

    def ids_of(request: Request, body: _Input | Query) -> np.ndarray:
        if body.text is not None:
            if len(body.text) > settings.max_learn_tokens * 32:
                raise BatchTooLarge("the text is too long to learn at once")
            return np.array(tokenizer(request)(body.text, add_special_tokens=False)["input_ids"], np.int64)
        return np.array(body.tokens, np.int64)

    def contexts(mem: Memory, rows: list[np.ndarray]) -> np.ndarray:
        n = mem.config.context
        for r in rows:
            if len(r) < n:
                raise ContextTooShort(f"a query needs at least {n} tokens (the memory's context), got {len(r)}")
        return np.stack([r[len(r) - n:] for r in rows])

    def decode(request: Request, ids: list[int]) -> str:
        return tokenizer(request).decode(ids)

    @router.get("")
    def list_memories(creds: Credentials):
        return {"memories": registry.names(owner(creds))}

    @router.post("", status_code=201)
    def create(body: CreateMemory, request: Request, creds: Credentials):
        token = None if creds else owners.issue()
        who = owner(creds) if creds else owner_id(token)
        vocab = body.vocab or len(tokenizer(request))
        config = Config(vocab=vocab, context=body.context, dim=body.dim, satellites=body.satellites or 0,
                        planned_patterns=body.planned_patterns, seed=body.seed)
        registry.create(who, body.name, config, request.client.host if request.client else "")
        out = {"name": body.name, "config": config.as_dict()}
        if token:
            out["owner_token"] = token
        return JSONResponse(out, status_code=201)

    @router.delete("/{name}", status_code=204, response_class=Response)
    def delete(name: str, creds: Credentials):
        registry.delete(owner(creds), name)
        return Response(status_code=204)

    @router.post("/{name}/learn")
    def learn(name: str, body: Learn, request: Request, creds: Credentials):
        who = owner(creds)
        ids = ids_of(request, body)
        if len(ids) > settings.max_learn_tokens:
            raise BatchTooLarge(f"{len(ids)} tokens; one learn call takes at most {settings.max_learn_tokens}")
        if not len(ids):
            raise EmptyBatch("nothing to learn")
        samples, patterns = registry.learn(who, name, ids)
        return {"samples": samples, "patterns": patterns}

    @router.post("/{name}/query")
    def query(name: str, body: Query, request: Request, creds: Credentials):
        who = owner(creds)
        rows = [np.array(b, np.int64) for b in body.batch] if body.batch is not None else [ids_of(request, body)]
        with registry.use(who, name) as mem:
            pred = mem.predict(contexts(mem, rows), k=body.top_k)
        return {"results": [
            {"path": PATHS[pred.path[i]],
             "targets": [{"token": int(t), "text": decode(request, [int(t)]), "confidence": float(p)}
                         for t, p in zip(pred.tokens[i], pred.probs[i])]}
            for i in range(len(rows))]}

    @router.post("/{name}/generate")
    def generate(name: str, body: Generate, request: Request, creds: Credentials):
        who = owner(creds)
        if body.n_tokens > settings.max_new_tokens:
            raise InvalidRequest(f"n_tokens is at most {settings.max_new_tokens}")
        ids = ids_of(request, body)
        with registry.use(who, name) as mem:
            contexts(mem, [ids])
            out, paths = mem.generate(ids.tolist(), body.n_tokens, body.sample, body.seed)
        return {"tokens": out, "text": decode(request, out), "paths": paths}

    @router.post("/{name}/dream")
    def dream_(name: str, creds: Credentials, body: Dream | None = None):
        forget = body.forget if body else 0.0
        return registry.change(owner(creds), name, lambda mem: dream(mem, forget).as_dict())

    @router.get("/{name}/stats")
    def stats(name: str, creds: Credentials):
        with registry.use(owner(creds), name) as mem:
            out = {"name": name, "config": mem.config.as_dict(), **mem.stats()}
            out["bytes"] = budget.nbytes(mem.config, mem.episodic.bound())  # what the budgets count
            return {**out, "max_bytes": registry.max_bytes}

    return router
