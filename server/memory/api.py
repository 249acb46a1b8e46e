"""HTTP endpoints of the memory service, under /v1/memories (an APIRouter for server/app.py).

Text goes through the anchor model's tokenizer; token ids can be given directly. Errors
use the anchor's format `{"error": {"code", "message"}}`: unknown memory 404, empty or
too-short input 422, a learn batch over `max_learn_tokens` 413, a corrupted file 409.
"""

from __future__ import annotations

from typing import Annotated, Literal

import numpy as np
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator

from server.config import Settings
from server.owners import Owners
from server.memory.dreaming import dream
from server.memory.registry import MemoryServiceError, Registry
from server.memory.store import PATHS, Config, Memory

TokenId = Annotated[int, Field(ge=0, lt=1 << 20)]


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


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


def memory_router(settings: Settings, owners: Owners) -> APIRouter:
    registry = Registry(settings.memories_path(), settings.max_memories)
    router = APIRouter(prefix="/v1/memories", tags=["memories"])

    def tokenizer(request: Request):
        return request.app.state.anchor.lm.tokenizer

    def ids_of(request: Request, body: _Input | Query) -> np.ndarray:
        if body.text is not None:
            if len(body.text) > settings.max_learn_tokens * 32:
                raise MemoryServiceError(413, "batch_too_large", "the text is too long to learn at once")
            return np.array(tokenizer(request)(body.text, add_special_tokens=False)["input_ids"], np.int64)
        return np.array(body.tokens, np.int64)

    def run(fn):
        try:
            return fn()
        except MemoryServiceError as e:
            return _error(e.status, e.code, str(e))
        except ValueError as e:  # the memory's own validation (token ids out of range, ...)
            return _error(422, "invalid_request", str(e))

    def contexts(mem: Memory, rows: list[np.ndarray]) -> np.ndarray:
        n = mem.config.context
        for r in rows:
            if len(r) < n:
                raise MemoryServiceError(422, "context_too_short",
                                         f"a query needs at least {n} tokens (the memory's context), got {len(r)}")
        return np.stack([r[len(r) - n:] for r in rows])

    def decode(request: Request, ids: list[int]) -> str:
        return tokenizer(request).decode(ids)

    @router.get("")
    def list_memories():
        return {"memories": registry.names()}

    @router.post("", status_code=201)
    def create(body: CreateMemory, request: Request):
        def go():
            vocab = body.vocab or len(tokenizer(request))
            config = Config(vocab=vocab, context=body.context, dim=body.dim, satellites=body.satellites or 0,
                            planned_patterns=body.planned_patterns, seed=body.seed)
            registry.create(body.name, config)
            return JSONResponse({"name": body.name, "config": config.as_dict()}, status_code=201)
        return run(go)

    @router.delete("/{name}", status_code=204, response_class=Response)
    def delete(name: str):
        return run(lambda: registry.delete(name) or Response(status_code=204))

    @router.post("/{name}/learn")
    def learn(name: str, body: Learn, request: Request):
        def go():
            ids = ids_of(request, body)
            if len(ids) > settings.max_learn_tokens:
                raise MemoryServiceError(413, "batch_too_large",
                                         f"{len(ids)} tokens; one learn call takes at most {settings.max_learn_tokens}")
            if not len(ids):
                raise MemoryServiceError(422, "empty_batch", "nothing to learn")

            def apply(mem: Memory) -> dict:
                if len(ids) <= mem.config.context:
                    raise MemoryServiceError(422, "too_short", f"{len(ids)} tokens make no sample for a context "
                                             f"of {mem.config.context}: give at least {mem.config.context + 1}")
                samples = mem.learn_sequence(ids)
                return {"samples": samples, "patterns": mem.patterns}
            return registry.change(name, apply)
        return run(go)

    @router.post("/{name}/query")
    def query(name: str, body: Query, request: Request):
        def go():
            rows = [np.array(b, np.int64) for b in body.batch] if body.batch is not None else [ids_of(request, body)]
            with registry.use(name) as mem:
                pred = mem.predict(contexts(mem, rows), k=body.top_k)
            return {"results": [
                {"path": PATHS[pred.path[i]],
                 "targets": [{"token": int(t), "text": decode(request, [int(t)]), "confidence": float(p)}
                             for t, p in zip(pred.tokens[i], pred.probs[i])]}
                for i in range(len(rows))]}
        return run(go)

    @router.post("/{name}/generate")
    def generate(name: str, body: Generate, request: Request):
        def go():
            if body.n_tokens > settings.max_new_tokens:
                raise MemoryServiceError(422, "invalid_request", f"n_tokens is at most {settings.max_new_tokens}")
            ids = ids_of(request, body)
            with registry.use(name) as mem:
                contexts(mem, [ids])
                out, paths = mem.generate(ids.tolist(), body.n_tokens, body.sample, body.seed)
            return {"tokens": out, "text": decode(request, out), "paths": paths}
        return run(go)

    @router.post("/{name}/dream")
    def dream_(name: str, body: Dream | None = None):
        forget = body.forget if body else 0.0
        return run(lambda: registry.change(name, lambda mem: dream(mem, forget).as_dict()))

    @router.get("/{name}/stats")
    def stats(name: str):
        def go():
            with registry.use(name) as mem:
                return {"name": name, "config": mem.config.as_dict(), **mem.stats()}
        return run(go)

    return router
