"""The API's errors: one exception class per condition, and the one way each reaches a client.

Every class names a code and an HTTP status of protocol/errors.py (tests/test_errors.py
holds them to it). Whatever raises one, a route, a router mounted in another app, a
middleware or the sync channel, the client gets the same thing: an HTTP answer
`{"error": {"code", "message"}}` (`response`), an `error` frame (`frame`), or a websocket
refused with the code as its close reason.

A message is fixed text for people, with numbers and validated values of the request; a
value the client sent that no validation bounds is cut (`quoted`, `listed`). Exception text of the
libraries underneath never goes into a message: it is logged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

from fastapi import Request, Response
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute

from hpi.protocol import frames

MAX_QUOTED = 72  # characters of a value the client sent that a message repeats
MAX_LISTED = 8  # values of a list the client sent that a message repeats


def quoted(value) -> str:
    """A value the client sent, as a message repeats it: its repr, cut to MAX_QUOTED characters."""
    return f"{value!r:.{MAX_QUOTED}}"


def listed(values: list) -> str:
    """A list the client sent, as a message repeats it: its first MAX_LISTED values, quoted."""
    more = ", ..." if len(values) > MAX_LISTED else ""
    return f"[{', '.join(quoted(v) for v in values[:MAX_LISTED])}{more}]"


class ApiError(Exception):
    code: ClassVar[str]
    status: ClassVar[int]

    def __init__(self, message: str, *, headers: dict[str, str] | None = None, **extra):
        super().__init__(message)
        self.message = message
        self.headers = dict(headers or {})
        self.extra = extra  # more fields of the error body, for a program to act on

    def response(self) -> JSONResponse:
        headers = self.headers
        if self.status == 401:  # says how to authenticate: a bearer token unless the error names another scheme
            headers = {"WWW-Authenticate": 'Bearer realm="hpi"', **headers}
        return JSONResponse({"error": {"code": self.code, "message": self.message, **self.extra}},
                            status_code=self.status, headers=headers)

    def frame(self) -> frames.Error:
        return frames.Error(v=1, code=self.code, message=self.message)


class _RetryLater(ApiError):
    """Refused for now, not for what the request is: `Retry-After` says when to come back."""

    def __init__(self, message: str, retry_after: int = 2):
        super().__init__(message, headers={"Retry-After": str(retry_after)})


async def handle(request: Request, exc: ApiError) -> Response:
    """The app's exception handler for every ApiError."""
    return exc.response()


class ApiErrorRoute(APIRoute):
    """A route that answers ApiError itself: a router cannot register exception handlers, and it
    may serve in an app whose handlers do not know these errors."""

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except ApiError as e:
                return e.response()

        return route


UNSUPPORTED = "unsupported"  # the pydantic error type of a field the anchor refuses because it does not honour it


def validation_error(errs: list[dict]) -> ApiError:
    """The error of a request that failed validation: 400 unsupported_parameter when all it did wrong is ask for
    what the anchor does not honour, else 422 invalid_request; the message names at most MAX_LISTED of the defects
    (a body of thousands of bad fields must not get a larger answer), each by its place in the request."""
    parts = []
    for err in errs[:MAX_LISTED]:
        loc = ".".join(f"{p!s:.40}" for p in err.get("loc", ()))  # names are the client's: cut them
        parts.append(f"{loc}: {err.get('msg', 'invalid')}" if loc else err.get("msg", "invalid"))
    more = f"; and {len(errs) - MAX_LISTED} more" if len(errs) > MAX_LISTED else ""
    kind = UnsupportedParameter if errs and all(e.get("type") == UNSUPPORTED for e in errs) else InvalidRequest
    return kind(("; ".join(parts) or "invalid request") + more)


# Any request
class BadRequest(ApiError):
    code, status = "bad_request", 400


class HttpError(ApiError):
    code, status = "http_error", 400


class InvalidRequest(ApiError):
    code, status = "invalid_request", 422


class UnsupportedParameter(ApiError):
    """A parameter of OpenAI's API (or a kind of message content) the anchor does not honour: it is refused by name
    rather than ignored."""
    code, status = "unsupported_parameter", 400


class NotFound(ApiError):
    code, status = "not_found", 404


class MethodNotAllowed(ApiError):
    code, status = "method_not_allowed", 405


class BodyTooLarge(ApiError):
    code, status = "body_too_large", 413


class UntrustedHost(ApiError):
    code, status = "untrusted_host", 421


class OriginNotAllowed(ApiError):
    code, status = "origin_not_allowed", 403


class ApiKeyRequired(ApiError):
    code, status = "api_key_required", 401


class BadApiKey(ApiError):
    code, status = "bad_api_key", 401


class RateLimited(_RetryLater):
    code, status = "rate_limited", 429


class ServerBusy(_RetryLater):
    """The line of model work is full; the sync channel answers an error frame and the page backs off."""
    code, status = "server_busy", 503


class InternalError(ApiError):
    code, status = "internal_error", 500


# Credentials
class Unauthorized(ApiError):
    code, status = "unauthorized", 401


class Forbidden(ApiError):
    code, status = "forbidden", 403


# Models
class UnknownModel(ApiError):
    code, status = "unknown_model", 404


# Sessions
class SessionNotFound(ApiError):
    code, status = "session_not_found", 404


class PromptTooLong(ApiError):
    code, status = "prompt_too_long", 413


class SessionFull(ApiError):
    code, status = "session_full", 413


class TooManySessions(ApiError):
    code, status = "too_many_sessions", 503


class KVMemoryFull(ApiError):
    code, status = "kv_memory_full", 503


class ClientQuota(ApiError):
    code, status = "client_quota", 429


class StorageError(ApiError):
    """The session store cannot be read or written (a full disk, an unreachable Redis); a change is undone."""
    code, status = "storage_error", 503


class SessionMoved(ApiError):
    """Another anchor changed the session since this one read it; this one now holds that state."""
    code, status = "session_moved", 409


class PrefixMismatch(ApiError):
    code, status = "prefix_mismatch", 409


class AnswerConfirmed(ApiError):
    code, status = "answer_confirmed", 409


class CheckpointNotFound(ApiError):
    code, status = "checkpoint_not_found", 404


class CheckpointExists(ApiError):
    code, status = "checkpoint_exists", 409


class TooManyCheckpoints(ApiError):
    code, status = "too_many_checkpoints", 409


# The sync channel
class BadFrame(ApiError):
    """A frame no page of this model sends: malformed, or a drafted token past the vocabulary."""
    code, status = "bad_frame", 422


class StaleDraft(ApiError):
    code, status = "stale_draft", 409


class SamplingMismatch(ApiError):
    code, status = "sampling_mismatch", 409


# State capture and its store
class EmptyContext(ApiError):
    code, status = "empty_context", 422


class CaptureTooLarge(ApiError):
    code, status = "capture_too_large", 413


class CaptureBusy(_RetryLater):
    code, status = "capture_busy", 503


class UnknownLayers(ApiError):
    code, status = "unknown_layers", 422


class UnknownHeads(ApiError):
    code, status = "unknown_heads", 422


class UnknownStates(ApiError):
    code, status = "unknown_states", 422


class UnknownActivation(ApiError):
    code, status = "unknown_activation", 422


class BadRange(ApiError):
    code, status = "bad_range", 422


class BadPercentile(ApiError):
    code, status = "bad_percentile", 422


class BadCollection(ApiError):
    code, status = "bad_collection", 422


class BadVectors(ApiError):
    code, status = "bad_vectors", 422


class BadCurvature(ApiError):
    code, status = "bad_curvature", 422


class BadScale(ApiError):
    code, status = "bad_scale", 422


class BadMetric(ApiError):
    code, status = "bad_metric", 422


class UnknownCollection(ApiError):
    code, status = "unknown_collection", 404


class CollectionMismatch(ApiError):
    code, status = "collection_mismatch", 409


class CollectionTooLarge(ApiError):
    code, status = "collection_too_large", 413


class OwnerStoreFull(ApiError):
    """The owner's collections hold its share of the store."""
    code, status = "store_full", 413


class StoreFull(ApiError):
    """The store holds all it may, every owner's."""
    code, status = "store_full", 503


# Memories
class UnknownMemory(ApiError):
    code, status = "unknown_memory", 404


class InvalidName(ApiError):
    code, status = "invalid_name", 422


class MemoryExists(ApiError):
    code, status = "memory_exists", 409


class MemoryCorrupted(ApiError):
    code, status = "memory_corrupted", 409


class MemoryTooLarge(ApiError):
    code, status = "memory_too_large", 413


class OwnerMemoryLimit(ApiError):
    code, status = "owner_memory_limit", 429


class TooManyMemories(ApiError):
    code, status = "too_many_memories", 503


class MemoriesFull(ApiError):
    code, status = "memories_full", 503


class BatchTooLarge(ApiError):
    code, status = "batch_too_large", 413


class EmptyBatch(ApiError):
    code, status = "empty_batch", 422


class TooShort(ApiError):
    code, status = "too_short", 422


class ContextTooShort(ApiError):
    code, status = "context_too_short", 422
