"""Every limit on what one request, frame, batch or client may cost, in one table.

The README's table of limits is written from it (`python -m hpi.limits` rewrites it between
its markers; tests/test_security.py fails while the two differ), and tests/test_security.py
checks for each row that going one past the limit is refused as the row says. A limit is a
setting (`HPI_<NAME>`, server/config.py), whose default is read from the settings, or a fixed
constant, read from the module that enforces it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from hpi.protocol import frames
from hpi import capture_api, checkpoints, hyperbolic, openai_api, serving
from hpi.config import Settings
from hpi.memory import budget

README = Path(__file__).resolve().parent.parent / "README.md"
MARKERS = ("<!-- limits table -->", "<!-- /limits table -->")


@dataclass(frozen=True)
class Limit:
    name: str  # a Settings field, or the constant's name in `module`
    bounds: str
    status: int | None  # the HTTP status past the limit; None for a sync frame, or when nothing is refused
    code: str | None  # the error code (of an HTTP answer, or of a sync `error` frame)
    unit: str = ""  # how the value reads: "bytes", "s", "/s", "1/n", or a noun
    over: str = ""  # what else happens past it
    module: ModuleType | None = None  # where a fixed limit is defined

    @property
    def value(self):
        return getattr(self.module, self.name) if self.module else Settings.model_fields[self.name].default

    @property
    def source(self) -> str:
        if not self.module:
            return f"`{self.name}`"
        return f"`{self.name}` (fixed, `{self.module.__name__.replace('.', '/')}.py`)"

    def past(self) -> str:
        if self.status:
            head = f"{self.status} `{self.code}`"
        else:
            head = f"`error` frame `{self.code}`" if self.code else ""
        return "; ".join(p for p in (head, self.over) if p)


def fixed(module: ModuleType, name: str, bounds: str, status: int | None, code: str | None, unit: str = "",
          over: str = "") -> Limit:
    return Limit(name, bounds, status, code, unit, over, module)


LIMITS = [
    # Requests
    Limit("max_body_bytes", "bytes of one request body, whatever Content-Length says", 413, "body_too_large",
          "bytes"),
    Limit("max_messages", "messages in one request (session, turn, completion, capture)", 422, "invalid_request"),
    Limit("max_message_chars", "characters of one message, or of a capture's text", 422, "invalid_request"),
    Limit("max_prompt_tokens", "tokens of a session's prompt, of one new turn, of a completion's prompt", 413,
          "prompt_too_long", "tokens"),
    Limit("max_new_tokens", "tokens one chat completion (`max_tokens`) or a memory's generate (`n_tokens`) asks "
                            "for", 422, "invalid_request", "tokens"),
    fixed(openai_api, "MAX_CHOICES", "choices (`n`) of one chat completion, decoded one after another", 422,
          "invalid_request"),
    Limit("rate_per_ip", "requests one client address sends a minute (the page, `/healthz` and `/metrics` are not "
                         "counted)", 429, "rate_limited", "/min", "with `Retry-After`"),
    Limit("rate_per_token", "requests one bearer token, or sync frames one session, sends a minute", 429,
          "rate_limited", "/min", "with `Retry-After`; a sync frame gets an `error` frame `rate_limited`"),
    # Sessions
    Limit("max_sessions", "sessions kept, in memory or as transcripts (restored ones included)", 503,
          "too_many_sessions"),
    Limit("client_share", "the part of `max_sessions`, `max_live_sessions`, `max_kv_bytes`, `max_memories` and "
                          "the memories' bytes one client (IP address) may hold", 429, "client_quota",
          over="past its share of live sessions a client's own least recently used idle one is evicted instead"),
    Limit("max_live_sessions", "sessions holding KV caches in memory", 503, "too_many_sessions"),
    Limit("max_kv_bytes", "KV cache bytes of all sessions", 503, "kv_memory_full", "bytes"),
    Limit("max_session_tokens", "tokens one session holds: prompt, turns, verified drafts, forced tokens", 413,
          "session_full", "tokens", "a draft over it gets an `error` frame `session_full`"),
    fixed(checkpoints, "MAX_CHECKPOINTS", "checkpoints of one session", 409, "too_many_checkpoints"),
    Limit("session_idle_s", "idle time after which a session's caches are dropped", None, None, "s",
          "its transcript stays; the next use rebuilds them exactly"),
    Limit("session_ttl_s", "unused time after which a session is deleted with its transcript", 404,
          "session_not_found", "s"),
    # The sync channel
    fixed(frames, "MAX_FRAME_BYTES", "bytes of one sync message", None, "bad_frame", "bytes",
          "served by `hpi serve`, the connection is closed (1009)"),
    fixed(frames, "MAX_DRAFT", "tokens drafted in one frame", None, "bad_frame"),
    fixed(serving, "CONTROL_RATE", "control frames (ping, pong) per second, on average", None, None, "/s",
          "the connection is dropped"),
    fixed(serving, "CONTROL_BURST", "control frames at once", None, None, "",
          "the connection is dropped"),
    fixed(serving, "MAX_BACKLOG", "bytes sent to a client that it has not read", None, None, "bytes",
          "the connection is dropped"),
    # Model work
    Limit("max_queued_rows", "token rows waiting for a forward; new model work is refused once they reach it", 503,
          "server_busy", "rows", "with `Retry-After`"),
    Limit("max_completion_seconds", "decoding time of one chat completion", None, None, "s",
          'it ends with `finish_reason: "length"`'),
    Limit("max_completions", "chat completions decoding at once", None, None, "",
          "more wait in line for a turn"),
    Limit("max_waiting_completions", "chat completions waiting for a turn", 503, "server_busy", "",
          "with `Retry-After`"),
    # Captures
    Limit("capture_max_tokens", "context tokens one state capture runs over", 413, "prompt_too_long", "tokens"),
    Limit("capture_max_bytes", "estimated bytes of one capture's answer, and of the captures running at once", 413,
          "capture_too_large", "bytes"),
    fixed(capture_api, "CAPTURES_AT_ONCE", "captures running at once", 503, "capture_busy", "",
          f"with `Retry-After`, when one cannot start within {capture_api.ADMIT_WAIT_S:g} s"),
    Limit("capture_store_bytes", "state vectors of the capture store, every owner's", 503, "store_full", "bytes"),
    fixed(hyperbolic, "OWNER_SHARE", "the part of `capture_store_bytes` one owner, or one client whatever its "
                                     "tokens, may hold", 413, "collection_too_large", "1/n",
          "413 `store_full` over its collections; 429 `client_quota` for a client"),
    # Memories
    Limit("max_memories", "memories on the anchor", 503, "too_many_memories"),
    fixed(budget, "MAX_PER_OWNER", "memories of one owner", 429, "owner_memory_limit"),
    fixed(budget, "MAX_MEMORY_BYTES", "bytes of one memory, known from its configuration before it is made", 413,
          "memory_too_large", "bytes", "for a create, or a learn that would take it there"),
    fixed(budget, "MAX_TOTAL_BYTES", "bytes of all memories", 503, "memories_full", "bytes"),
    Limit("max_learn_tokens", "tokens one learn call adds to a memory", 413, "batch_too_large", "tokens"),
]


def human(value, unit: str) -> str:
    if unit == "bytes":
        for size, name in ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
            if value >= size and value % size == 0:
                return f"{value // size} {name}"
        return f"{value:,} bytes"
    if unit == "s" and value >= 86400 and value % 86400 == 0:
        return f"{int(value) // 86400} days"
    if unit == "1/n":
        return f"1/{value}"
    number = f"{value:,}" if isinstance(value, int) else f"{value:g}"
    return number + {"": "", "/s": "/s", "/min": "/min", "s": " s"}.get(unit, f" {unit}")


def table() -> str:
    rows = ["| limit | what it bounds | default | past it |", "|---|---|---|---|"]
    rows += [f"| {m.source} | {m.bounds} | {human(m.value, m.unit)} | {m.past()} |" for m in LIMITS]
    return "\n".join(rows) + "\n"


def in_readme(text: str) -> str:
    start, end = MARKERS
    return text[text.index(start) + len(start):text.index(end)].strip("\n") + "\n"


def write_readme(path: Path = README) -> None:
    text = path.read_text()
    start, end = MARKERS
    path.write_text(text[:text.index(start) + len(start)] + "\n" + table() + text[text.index(end):])


if __name__ == "__main__":
    write_readme()
