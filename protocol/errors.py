"""Every error code the anchor sends, with its HTTP status and whether it ends a sync channel.

An HTTP error is `{"error": {"code", "message"}}` with the status below; a sync `error` frame
carries the same code (protocol/SPEC.md, "Reconciliation frames"); a websocket refused before
it is accepted closes with code 1008 and the error code as its reason. Messages are for
people: programs read the code.

`fatal`: on the sync channel, an error that saying hello again cannot cure, so the page stops
reconciling (client_web/reconcile.js). Every other error frame is followed by a back-off and a
new hello.

This table is plain data so that other languages are generated from it (protocol/javascript.py
writes it into client_web/protocol.js): `CATALOGUE` is a
tuple of `ErrorCode(code, status, fatal, meaning)`; a code is listed once, and `statuses` names
every status it is sent with (the first is the usual one). server/errors.py holds one exception
class per condition, each naming a code and a status listed here (tests/test_errors.py).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ErrorCode:
    code: str
    statuses: tuple[int, ...]
    fatal: bool = False
    meaning: str = ""


CATALOGUE: tuple[ErrorCode, ...] = (
    # Any request
    ErrorCode("bad_request", (400,), meaning="the request is malformed at the HTTP level (Content-Length)"),
    ErrorCode("http_error", (400,), meaning="a request the web framework refused before any route"),
    ErrorCode("invalid_request", (422,), meaning="a body, query or field that is not valid"),
    ErrorCode("unsupported_parameter", (400,), meaning="an OpenAI parameter or content part the anchor does not "
                                                       "honour (the message names it)"),
    ErrorCode("not_found", (404,), meaning="no such route"),
    ErrorCode("method_not_allowed", (405,), meaning="the route does not take that method"),
    ErrorCode("body_too_large", (413,), meaning="the request body is over `max_body_bytes`"),
    ErrorCode("untrusted_host", (421,), meaning="the Host header names no host the anchor answers for"),
    ErrorCode("origin_not_allowed", (403,), meaning="the request comes from an origin that is not allowed"),
    ErrorCode("api_key_required", (401,), fatal=True, meaning="the anchor needs an API key and none came"),
    ErrorCode("bad_api_key", (401,), fatal=True, meaning="the API key is not one of the anchor's"),
    ErrorCode("rate_limited", (429,), meaning="the client, token or session sends faster than its rate"),
    ErrorCode("server_busy", (503,), meaning="the line of model work is full; retry after Retry-After"),
    ErrorCode("internal_error", (500,), meaning="an unexpected failure; it is logged, never described"),
    # Credentials (session and owner tokens)
    ErrorCode("unauthorized", (401,), fatal=True, meaning="no bearer token"),
    ErrorCode("forbidden", (403,), fatal=True, meaning="the bearer token does not reach this resource"),
    # Models
    ErrorCode("unknown_model", (404,), meaning="no model, or model pack, of that id or key"),
    # Sessions
    ErrorCode("session_not_found", (404,), fatal=True, meaning="no such session, or it was deleted"),
    ErrorCode("prompt_too_long", (413,), meaning="a prompt, turn or context over its token limit"),
    ErrorCode("session_full", (413,), meaning="the session would hold more than `max_session_tokens`"),
    ErrorCode("too_many_sessions", (503,), meaning="the server holds its limit of sessions"),
    ErrorCode("kv_memory_full", (503,), meaning="the KV memory of all sessions is at `max_kv_bytes`"),
    ErrorCode("client_quota", (429,), meaning="the client holds its share of sessions, memory or storage"),
    ErrorCode("storage_error", (503,), meaning="the session store cannot be read or written now"),
    ErrorCode("session_moved", (409,), meaning="another anchor changed the session meanwhile"),
    ErrorCode("prefix_mismatch", (409,), meaning="new messages do not extend the session's conversation"),
    ErrorCode("answer_confirmed", (409,), meaning="a turn repeats an answer the anchor already confirmed"),
    ErrorCode("checkpoint_not_found", (404,), meaning="the session has no checkpoint of that name"),
    ErrorCode("checkpoint_exists", (409,), meaning="the session already has a checkpoint of that name"),
    ErrorCode("too_many_checkpoints", (409,), meaning="the session holds its limit of checkpoints"),
    # The sync channel
    ErrorCode("bad_frame", (422,), meaning="a frame that is not valid (also: a drafted token past the vocabulary)"),
    ErrorCode("stale_draft", (409,), meaning="a draft that does not start at the anchor's confirmed position"),
    ErrorCode("sampling_mismatch", (409,), fatal=True, meaning="a hello with another sampling than the session's"),
    # State capture and its store
    ErrorCode("empty_context", (422,), meaning="the context has no tokens"),
    ErrorCode("capture_too_large", (413,), meaning="the capture's answer would be over `capture_max_bytes`"),
    ErrorCode("capture_busy", (503,), meaning="captures running now leave no room; retry after Retry-After"),
    ErrorCode("unknown_layers", (422,), meaning="layers the model does not have"),
    ErrorCode("unknown_heads", (422,), meaning="query heads the model does not have"),
    ErrorCode("unknown_states", (422,), meaning="state names that are not captured (or have no vector per token)"),
    ErrorCode("unknown_activation", (422,), meaning="a state that cannot rank activation peaks"),
    ErrorCode("bad_range", (422,), meaning="a token range outside the context"),
    ErrorCode("bad_percentile", (422,), meaning="a percentile outside [0, 100]"),
    ErrorCode("bad_collection", (422,), meaning="a collection name that is not valid"),
    ErrorCode("bad_vectors", (422,), meaning="state vectors of the wrong shape, not finite, or too far out"),
    ErrorCode("bad_curvature", (422,), meaning="a curvature that is not negative and finite"),
    ErrorCode("bad_scale", (422,), meaning="a scale that is not positive and finite"),
    ErrorCode("bad_metric", (422,), meaning="an unknown distance"),
    ErrorCode("unknown_collection", (404,), meaning="no collection of that name of this owner's"),
    ErrorCode("collection_mismatch", (409,), meaning="vectors or parameters that differ from the collection's"),
    ErrorCode("collection_too_large", (413,), meaning="the collection would pass one owner's share"),
    ErrorCode("store_full", (503, 413), meaning="no room in the store (503), or in the owner's share (413)"),
    # Memories
    ErrorCode("unknown_memory", (404,), meaning="no memory of that name of this owner's"),
    ErrorCode("invalid_name", (422,), meaning="a memory name that is not valid"),
    ErrorCode("memory_exists", (409,), meaning="the owner already has a memory of that name"),
    ErrorCode("memory_corrupted", (409,), meaning="the memory's files failed their checks; delete it"),
    ErrorCode("memory_too_large", (413,), meaning="the memory would pass the bytes one memory may take"),
    ErrorCode("owner_memory_limit", (429,), meaning="the owner holds its limit of memories"),
    ErrorCode("too_many_memories", (503,), meaning="the server holds its limit of memories"),
    ErrorCode("memories_full", (503,), meaning="the memories of all owners leave no room"),
    ErrorCode("batch_too_large", (413,), meaning="one learn call over `max_learn_tokens`"),
    ErrorCode("empty_batch", (422,), meaning="nothing to learn"),
    ErrorCode("too_short", (422,), meaning="a sequence too short to make one sample of the memory's context"),
    ErrorCode("context_too_short", (422,), meaning="a query shorter than the memory's context"),
)

BY_CODE: dict[str, ErrorCode] = {e.code: e for e in CATALOGUE}
FATAL: frozenset[str] = frozenset(e.code for e in CATALOGUE if e.fatal)
