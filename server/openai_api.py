"""OpenAI's API as its clients call it: `GET /v1/models`, `GET /v1/models/{id}` and `POST /v1/chat/completions`.

A completion is anchor-only decoding (server/completions.py): the server-side baseline the resonator is
measured against, with the token choice every party shares (server/answer_rules.py). Every parameter of
OpenAI's request is honoured or refused by name, none is accepted and ignored: the README's table "OpenAI
parameters" says which. A parameter the anchor does not honour gets 400 `unsupported_parameter`; a value out of
range, an unknown field or a combination that means nothing gets 422 `invalid_request`; an unknown `model` 404
`unknown_model`. Errors here also carry OpenAI's `type` and `param`.
"""

import asyncio
import json
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any, Self

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, create_model, field_validator, model_validator
from pydantic_core import PydanticCustomError
from starlette.concurrency import run_in_threadpool

from hpi import completions
from hpi.admission import Slots
from hpi.anchor import Anchor
from hpi.answer_rules import cut, held
from hpi.config import Settings
from hpi.errors import UNSUPPORTED, ApiError, PromptTooLong, UnknownModel, quoted, validation_error
from hpi.logprobs import MAX_TOP_LOGPROBS, logprob_entry
from hpi.messages import request_messages
from hpi.models import LoadedModel
from hpi.request_sampling import SamplingFields

# Choices of one request. Each is a whole decode of its own, run one after another in the request's turn, so
# `n` multiplies what one request costs; four keeps that within a few ordinary requests.
MAX_CHOICES = 4

# OpenAI's parameters the anchor does not honour, and why: refused by name (400) unless absent or null.
UNSUPPORTED_PARAMETERS = {
    "tools": "there are no tool calls", "tool_choice": "there are no tool calls",
    "parallel_tool_calls": "there are no tool calls", "functions": "there are no function calls",
    "function_call": "there are no function calls", "audio": "the anchor answers in text only",
    "modalities": "the anchor answers in text only", "prediction": "there is no predicted output",
    "web_search_options": "there is no web search", "reasoning_effort": "the model does not reason apart",
    "verbosity": "the model has no verbosity setting", "service_tier": "there are no service tiers",
    "store": "completions are not stored", "metadata": "completions are not stored",
    "user": "requests are not tracked by end user", "safety_identifier": "requests are not tracked by end user",
    "prompt_cache_key": "there is no prompt cache to route by",
    "prompt_cache_retention": "there is no prompt cache to keep",
    "prompt_cache_options": "there is no prompt cache to keep", "moderation": "there is no moderation",
}

# OpenAI's error `type`, by HTTP status (any other 4xx is an invalid request).
ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}


def openai_error(error: ApiError, param: str | None = None) -> ApiError:
    """The error with OpenAI's `type` and `param` (the request field it is about, or null) added to its body."""
    error.extra.setdefault("type", "server_error" if error.status >= 500 else
                           ERROR_TYPES.get(error.status, "invalid_request_error"))
    error.extra.setdefault("param", param)
    return error


def _param(errs: list[dict]) -> str | None:
    """The request field the first validation error is about, as OpenAI names it ("messages.0.content")."""
    loc = [str(p) for p in (errs[0].get("loc", ()) if errs else ())]
    return (".".join(loc[1:])[:80] or None) if loc[:1] == ["body"] else None


class OpenAIRoute(APIRoute):
    """A route that answers its errors in OpenAI's shape: `{"error": {"code", "message", "type", "param"}}`."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def route(request: Request):
            try:
                return await handler(request)
            except RequestValidationError as e:
                return openai_error(validation_error(e.errors()), _param(e.errors())).response()
            except ApiError as e:
                return openai_error(e).response()

        return route


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = Field(False, description="a last chunk with empty `choices` and the whole `usage`")


def completion_request(settings: Settings) -> type[BaseModel]:
    Messages = request_messages(settings)

    class Honoured(SamplingFields):
        """OpenAI's request. Sampling fields as sessions take them (server/request_sampling.py)."""
        model_config = ConfigDict(extra="forbid")
        model: str | None = Field(None, description="an id of /v1/models (or its model_key); absent: the anchor's")
        messages: Messages
        max_tokens: int | None = Field(None, ge=1, le=settings.max_new_tokens)
        max_completion_tokens: int | None = Field(None, ge=1, le=settings.max_new_tokens)
        n: int = Field(1, ge=1, le=MAX_CHOICES, description="choices; choice i samples with seed + i")
        stream: bool = False
        stream_options: StreamOptions | None = None
        logprobs: bool = False
        top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

        @model_validator(mode="before")
        @classmethod
        def _null_is_absent(cls, data: Any) -> Any:
            """As OpenAI takes it: a null field means its default (so an unsupported one is not asked for)."""
            return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data

        @field_validator(*UNSUPPORTED_PARAMETERS, check_fields=False)
        @classmethod
        def _unsupported(cls, v: Any, info: ValidationInfo) -> Any:
            raise PydanticCustomError(UNSUPPORTED, "{name} is not supported: {why}",
                                      {"name": info.field_name, "why": UNSUPPORTED_PARAMETERS[info.field_name]})

        @model_validator(mode="after")
        def _combinations(self) -> Self:
            if self.stream_options is not None and not self.stream:
                raise ValueError("stream_options is only for a streamed completion (stream: true)")
            if self.top_logprobs is not None and not self.logprobs:
                raise ValueError("top_logprobs needs logprobs: true")
            return self

    # Named as fields, so that asking for one is refused by its name rather than as an unknown field.
    return create_model("ChatCompletion", __base__=Honoured, **{
        name: (Any, Field(None, description=f"not supported ({why}): refused unless null"))
        for name, why in UNSUPPORTED_PARAMETERS.items()})


def model_card(a: Anchor) -> dict:
    """The anchor's model as OpenAI lists one, with HPI's own fields (the web SDK reads them)."""
    return {"id": a.lm.model_id, "object": "model", "created": int(a.lm.path.stat().st_mtime), "owned_by": "hpi",
            "model_key": a.model_key, "anchor_model": a.lm.model_id, "resonator_model": a.res_lm.model_id,
            "tokenizer_id": a.res_lm.tokenizer_id, "pack_hash": a.pack_hash, "pack_bytes": len(a.pack_bytes),
            "pack_url": f"/v1/models/{a.model_key}/pack"}


def check_model(a: Anchor, model: str | None) -> None:
    if model and model not in (a.lm.model_id, a.model_key):
        raise UnknownModel(f"no model {quoted(model)}; this anchor serves {a.lm.model_id!r} (see /v1/models)",
                           param="model")


class ChoiceText:
    """One choice's text as it may be sent: cut before its first stop text, and, while it grows, without the
    characters at its end that could begin one (a stream never sends text that a stop later cuts)."""

    def __init__(self, lm: LoadedModel, stops: tuple[str, ...]):
        self.stream = completions.TextStream(lm)
        self.stops = stops
        self.text, self.sent, self.stopped = "", 0, False

    def add(self, token: int) -> str:
        """The text that token lets out."""
        self.text += self.stream.add(token)
        return self._release(final=False)

    def finish(self) -> str:
        """The text left once the choice ends."""
        self.text += self.stream.flush()
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        visible, self.stopped = cut(self.text, self.stops)
        end = len(visible) if final or self.stopped else len(visible) - held(visible, self.stops)
        new = visible[self.sent:end]
        self.sent = max(self.sent, end)
        return new


def openai_router(settings: Settings) -> APIRouter:
    router = APIRouter(route_class=OpenAIRoute)
    ChatCompletion = completion_request(settings)
    slots = Slots(settings.max_completions, settings.max_waiting_completions, "chat completions")

    @router.get("/v1/models")
    def list_models(request: Request):
        """OpenAI's list; `models` holds the same entries for HPI's clients."""
        card = model_card(request.app.state.anchor)
        return {"object": "list", "data": [card], "models": [card]}

    @router.get("/v1/models/{model_id}")
    def get_model(model_id: str, request: Request):
        a: Anchor = request.app.state.anchor
        check_model(a, model_id)
        return model_card(a)

    @router.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletion, request: Request):
        """Anchor-only decoding in OpenAI's format (and SSE with `stream`): the baseline.

        A completion decodes for at most `max_completion_seconds` (all its choices together), stops when its
        client goes away, and takes one of `max_completions` turns (503 with Retry-After when the line is full).
        """
        a: Anchor = request.app.state.anchor
        lm = a.lm
        check_model(a, body.model)
        sampling = body.checked(lm)
        ids = lm.chat_ids([m.model_dump() for m in body.messages])
        if len(ids) > settings.max_prompt_tokens:
            raise PromptTooLong(f"the prompt is {len(ids)} tokens; the limit is {settings.max_prompt_tokens}",
                                param="messages")
        limit = body.max_completion_tokens or body.max_tokens or settings.max_new_tokens
        top = (body.top_logprobs or 0) if body.logprobs else None
        head = {"id": f"chatcmpl-{secrets.token_hex(12)}", "created": int(time.time()), "model": lm.model_id}
        gone = threading.Event()  # the client went away: stop decoding
        place = slots.admit()

        def choice(i: int, deadline: float) -> Iterator[tuple[int, dict | None]]:
            """Choice i's tokens, each with its logprobs entry if asked for. Its seed is the request's + i."""
            s = replace(sampling, seed=(sampling.seed + i) % (1 << 32))
            for token, scores in completions.decode_steps(lm, ids, limit, s, deadline, gone):
                yield token, None if top is None else logprob_entry(lm, scores, token, top)

        def choices() -> Iterator[Iterator[tuple[int, dict | None]]]:
            """Each choice in turn (take one's tokens before the next)."""
            try:
                with slots.turn():
                    deadline = time.monotonic() + settings.max_completion_seconds
                    for i in range(body.n):
                        if gone.is_set():  # its client left (while it waited for a turn, or meanwhile)
                            return
                        yield choice(i, deadline)
            finally:
                place.release()

        def finish(text: ChoiceText, last: int | None) -> str:
            return "stop" if text.stopped or last in lm.eos_token_ids else "length"

        def usage(completion_tokens: int) -> dict:
            return {"prompt_tokens": len(ids), "completion_tokens": completion_tokens,
                    "total_tokens": len(ids) + completion_tokens}

        if not body.stream:
            def run() -> list[list[tuple[int, dict | None]]]:
                return [list(c) for c in choices()]

            work = asyncio.ensure_future(run_in_threadpool(run))
            while not (await asyncio.wait({work}, timeout=0.25))[0]:
                if await request.is_disconnected():
                    gone.set()
            results, out = await work, []
            for i, steps in enumerate(results):
                text = ChoiceText(lm, sampling.stop)
                content = "".join(text.add(t) for t, _ in steps) + text.finish()
                out.append({"index": i, "message": {"role": "assistant", "content": content, "refusal": None},
                            "logprobs": None if top is None else {"content": [lp for _, lp in steps], "refusal": None},
                            "finish_reason": finish(text, steps[-1][0] if steps else None)})
            return {**head, "object": "chat.completion", "choices": out,
                    "usage": usage(sum(len(steps) for steps in results))}

        include_usage = body.stream_options is not None and body.stream_options.include_usage

        def events() -> Iterator[str]:
            def chunk(choices: list[dict], **more) -> str:
                extra = {"usage": None} if include_usage else {}
                return "data: " + json.dumps({**head, "object": "chat.completion.chunk", "choices": choices,
                                              **extra, **more}) + "\n\n"

            def delta(i: int, content: dict, entries: list[dict] | None = None, reason: str | None = None) -> str:
                logprobs = None if entries is None else {"content": entries, "refusal": None}
                return chunk([{"index": i, "delta": content, "logprobs": logprobs, "finish_reason": reason}])

            try:
                completion_tokens = 0
                for i, steps in enumerate(choices()):
                    yield delta(i, {"role": "assistant", "content": ""})
                    text, last = ChoiceText(lm, sampling.stop), None
                    for last, lp in steps:
                        completion_tokens += 1
                        piece = text.add(last)
                        if piece or lp:
                            yield delta(i, {"content": piece}, None if lp is None else [lp])
                    if piece := text.finish():
                        yield delta(i, {"content": piece})
                    yield delta(i, {}, reason=finish(text, last))
                if include_usage:
                    yield chunk([], usage=usage(completion_tokens))
                yield "data: [DONE]\n\n"
            finally:  # the response stops pulling when its client goes away
                gone.set()

        return StreamingResponse(events(), media_type="text/event-stream")

    return router
