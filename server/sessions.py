"""Conversation sessions on the anchor: exact KV caches, the holograms sent from them, and limits.

A session grows only at its end: a new turn adds tokens after the ones already prefilled
(its messages must render to an extension of them, or, after an answer synced over the
reconciliation channel, the anchor renders what follows that answer), so the anchor
prefills just the new tokens and sends a hologram delta starting where the last hologram it
sent ended.

Capacity errors (too many sessions, KV memory full) are 503: the server is busy, the
request itself is fine and may succeed once other sessions are deleted. A request that
can never succeed because of its own size (prompt over the token limit) is 413.
"""

from __future__ import annotations

import hmac
import secrets
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property

from protocol import frames
from protocol.holo import content_hash
from server.anchor import Anchor, Caches
from server import turns
from server.config import Settings
from server.verify import verify


class SessionError(Exception):
    """An error the HTTP layer answers with `status` and a machine-readable `code`."""
    status = 500
    code = "session_error"


class SessionNotFound(SessionError):
    status, code = 404, "session_not_found"


class Unauthorized(SessionError):
    status, code = 401, "unauthorized"


class Forbidden(SessionError):
    status, code = 403, "forbidden"


class PromptTooLong(SessionError):
    status, code = 413, "prompt_too_long"


class PrefixMismatch(SessionError):
    status, code = 409, "prefix_mismatch"


class AnswerConfirmed(SessionError):
    status, code = 409, "answer_confirmed"


class TooManySessions(SessionError):
    status, code = 503, "too_many_sessions"


class KVMemoryFull(SessionError):
    status, code = 503, "kv_memory_full"


class StaleDraft(SessionError):
    status, code = 409, "stale_draft"


class SamplingMismatch(SessionError):
    status, code = 409, "sampling_mismatch"


@dataclass
class Segment:
    """A `.holo` hologram of KV positions [start, end)."""
    data: bytes
    start: int
    end: int

    @cached_property
    def etag(self) -> str:
        return f'"{content_hash(self.data)}"'


@dataclass
class Session:
    id: str
    token: str
    caches: Caches = field(default_factory=Caches)
    messages: list[dict] = field(default_factory=list)
    holo_end: int = 0  # end of the last hologram sent: the next delta starts here
    reserved_tokens: int = 0  # KV budget held in the store, >= len(caches.ids)
    full: Segment | None = None  # the full hologram of the current caches, built once
    created: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.time)
    closed: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    # Reconciliation (protocol/SPEC.md): the chain hash after each token from chain_base, where
    # the current answer starts (the end of the prompt or of the last appended turn), and the
    # session's sampling, fixed by the first page that syncs.
    chain_base: int = 0
    chains: list[bytes] = field(default_factory=lambda: [frames.GENESIS])
    sampling: tuple[float, int] | None = None

    @property
    def n_tokens(self) -> int:
        return len(self.caches.ids)


class SessionStore:
    def __init__(self, anchor: Anchor, settings: Settings):
        self.anchor = anchor
        self.settings = settings
        self.kv_bytes_per_token = anchor.kv_bytes_per_token()
        self._sessions: dict[str, Session] = {}
        self._kv_tokens = 0
        self._lock = threading.Lock()  # guards _sessions and _kv_tokens; taken after a session lock

    def __len__(self) -> int:
        return len(self._sessions)

    @property
    def kv_bytes(self) -> int:
        return self._kv_tokens * self.kv_bytes_per_token

    def create(self, messages: list[dict]) -> Session:
        ids = self.anchor.lm.chat_ids(messages)
        self._check_prompt(len(ids), "the prompt")
        session = Session(secrets.token_urlsafe(12), secrets.token_urlsafe(32), messages=list(messages))
        with self._lock:
            if len(self._sessions) >= self.settings.max_sessions:
                raise TooManySessions(f"the server holds its limit of {self.settings.max_sessions} sessions; "
                                      "retry after other sessions are deleted")
            self._reserve(session, len(ids))
            self._sessions[session.id] = session
        # No lock needed: nobody else can reach the session before its token is returned.
        try:
            self.anchor.prefill(session.caches, ids)
            session.chain_base = len(ids)
            session.full = self._build(session, 0)
        except Exception:
            self.delete(session)
            raise
        return session

    def get(self, session_id: str, token: str | None) -> Session:
        """The session, if it exists (404) and `token` is its token (401 when absent, 403 when wrong)."""
        with self._lock:
            session = self._sessions.get(session_id)
        if session is None:
            raise SessionNotFound(f"no session {session_id!r}")
        if not token:
            raise Unauthorized("this endpoint needs `Authorization: Bearer <session token>`")
        if not hmac.compare_digest(token.encode(), session.token.encode()):
            raise Forbidden("the token does not belong to this session")
        return session

    @contextmanager
    def use(self, session_id: str, token: str | None) -> Iterator[Session]:
        """Hold the session's lock: one request at a time changes or reads its caches."""
        session = self.get(session_id, token)
        with session.lock:
            if session.closed:
                raise SessionNotFound(f"session {session_id!r} was deleted")
            session.last_used = time.time()
            yield session

    def full_hologram(self, session: Session) -> Segment:
        """The hologram of the whole conversation; later deltas start at its end."""
        if session.full is None:
            session.full = self._build(session, 0)
        session.holo_end = session.full.end
        return session.full

    def append(self, session: Session, messages: list[dict]) -> Segment:
        """Prefill the tokens `messages` add to the conversation; return the hologram delta.

        After an answer the page decoded alone, `messages` start with that answer as text,
        exactly as generated. After an answer confirmed over the sync channel (the chain grew
        past `chain_base`) the anchor already holds its exact tokens: `messages` are only the
        new ones, and the anchor closes the answer's turn itself. Either way the chain then
        restarts at the new end of the conversation.
        """
        if session.n_tokens > session.chain_base:
            ids, messages = self._after_synced_answer(session, messages)
        else:
            ids = self._extending(session, messages)
        self._check_prompt(len(ids), "the conversation")
        with self._lock:
            self._reserve(session, len(ids))
        try:
            self.anchor.prefill(session.caches, ids[session.n_tokens:])
        except Exception:
            # A failed prefill may have extended some layers and not others: the state is lost.
            self.delete(session)
            raise
        session.messages.extend(messages)
        session.chain_base, session.chains = session.n_tokens, [frames.GENESIS]
        session.full = None
        delta = self._build(session, session.holo_end)
        session.holo_end = delta.end
        return delta

    def _extending(self, session: Session, messages: list[dict]) -> list[int]:
        """The conversation's ids with `messages`, which must extend the prefilled ones."""
        old = session.caches.ids
        ids = self.anchor.lm.chat_ids(session.messages + list(messages))
        if len(ids) <= len(old) or ids[:len(old)] != old:
            at = next((i for i, (a, b) in enumerate(zip(old, ids)) if a != b), min(len(old), len(ids)))
            raise PrefixMismatch(
                f"the conversation with these messages does not extend the session's {len(old)} tokens "
                f"(they differ from token {at}); append the assistant's reply before a new user turn, "
                "exactly as generated")
        return ids

    def _after_synced_answer(self, session: Session, messages: list[dict]) -> tuple[list[int], list[dict]]:
        """The conversation's ids after the synced answer and `messages`, and the turns to record."""
        if any(m["role"] == "assistant" for m in messages):
            raise AnswerConfirmed(
                f"the anchor already holds the confirmed answer ({session.n_tokens - session.chain_base} "
                "tokens verified over the sync channel); send only the new user or system messages")
        lm = self.anchor.lm
        answer = session.caches.ids[session.chain_base:]
        ids = session.caches.ids + turns.next_turn_ids(lm, session.messages, answer, list(messages))
        return ids, [{"role": "assistant", "content": turns.answer_text(lm, answer)}, *messages]

    def ready(self, session: Session, position: int, chain: bytes, sampling: tuple[float, int]) -> frames.Ready:
        """Answer a page's hello: the confirmed tokens it lacks, or all of them if its chain is not ours."""
        if session.sampling is None:
            session.sampling = sampling
        elif session.sampling != sampling:
            raise SamplingMismatch(f"this session samples with (temperature, seed) = {session.sampling}")
        at = position - session.chain_base
        known = 0 <= at < len(session.chains) and hmac.compare_digest(session.chains[at], chain)
        start = position if known else session.chain_base
        return frames.Ready(v=1, position=session.n_tokens, chain=session.chains[-1],
                            tokens=session.caches.ids[start:], refresh=not known)

    def draft(self, session: Session, position: int, chain: bytes, tokens: list[int]) -> frames.Verdict:
        """Verify drafted tokens (server/verify.py) and extend the chain by what is confirmed."""
        if session.sampling is None:
            raise StaleDraft("send a hello frame first")
        if position != session.n_tokens or not hmac.compare_digest(chain, session.chains[-1]):
            raise StaleDraft(f"the draft starts at position {position}; the anchor has confirmed "
                             f"{session.n_tokens} tokens: say hello again to catch up")
        vocab = self.anchor.lm.config.vocab_size
        if any(t >= vocab for t in tokens):
            raise StaleDraft(f"token ids must be below the vocabulary size {vocab}")
        with self._lock:
            self._reserve(session, session.n_tokens + len(tokens) + 1)
        v = verify(self.anchor.lm, session.caches, tokens, *session.sampling)
        for t in tokens[:v.accepted] + [v.token]:
            session.chains.append(frames.chain_next(session.chains[-1], t))
        session.full = None
        return frames.Verdict(v=1, type="correction" if v.corrected else "ack", accepted=v.accepted,
                              token=v.token, position=session.n_tokens, chain=session.chains[-1])

    def _build(self, session: Session, start: int) -> Segment:
        data = self.anchor.hologram_bytes(session.caches, start)
        return Segment(data, start, session.n_tokens - 1)

    def _check_prompt(self, n: int, what: str) -> None:
        limit = self.settings.max_prompt_tokens
        if n > limit:
            raise PromptTooLong(f"{what} is {n} tokens; the limit per session is {limit}")

    def _reserve(self, session: Session, n_tokens: int) -> None:
        extra = n_tokens - session.reserved_tokens
        need = (self._kv_tokens + extra) * self.kv_bytes_per_token
        if need > self.settings.max_kv_bytes:
            raise KVMemoryFull(f"{n_tokens} tokens need {extra * self.kv_bytes_per_token} more bytes of KV "
                               f"memory; {self.kv_bytes} of {self.settings.max_kv_bytes} bytes are in use; "
                               "retry after other sessions are deleted")
        self._kv_tokens += extra
        session.reserved_tokens = n_tokens

    def delete(self, session: Session) -> None:
        """Free the session's caches; callers outside this class hold its lock (see `use`)."""
        session.closed = True
        session.caches = Caches()
        session.full = None
        with self._lock:
            if self._sessions.pop(session.id, None) is session:
                self._kv_tokens -= session.reserved_tokens
            session.reserved_tokens = 0
