"""Conversation sessions on the anchor: exact KV caches, the holograms sent from them, and limits.

A session grows at its end: a new turn adds tokens after the ones already prefilled (its
messages must render to an extension of them, or, after an answer synced over the
reconciliation channel, the anchor renders what follows that answer), so the anchor
prefills just the new tokens and sends a hologram delta starting where the last hologram it
sent ended.

It goes back only to one of its named checkpoints (its trail): a backtrack restores the
exact state at a checkpoint, and a fork starts a new session there whose KV prefix is
shared copy-on-write with this one (server/trail.py). Checkpoints record what a backtrack
restores besides the ids: the turns and the start of the answer then being written, so the
chain hash is the one the page had at that position (protocol/SPEC.md, "Checkpoints,
backtracking and forks").

Every session is kept on disk as its transcript (server/transcripts.py), written before any
reply that reveals a change: after creation, each appended turn, each verified draft, the
session's sampling, each hologram sent, each checkpoint, backtrack and fork. So nothing the anchor has told a client is
lost when it restarts. Then the store indexes the transcripts, and a session's caches are
rebuilt from its token ids on its first use (a fork then gets a cache of its own: sharing
is not restored). If a write fails, the session goes back to its last transcript (and the
reply is an error), so memory never runs ahead of the disk.

Limits, so that no client can lock the others out (README, "Limits"):
- Every session counts against `max_sessions`, in memory or only on disk (restored after a
  restart, or idle), and against its client's share of them (`client_share` of the total;
  the client is the peer's IP address): over the share is 429 `client_quota`.
- A session holds at most `max_session_tokens` tokens however they arrived: prompt, turns,
  verified drafts, a fork's forced token. A request that would pass it is 413 `session_full`.
- Caches in memory are bounded by `max_live_sessions` and `max_kv_bytes` (503: the server is
  busy, the request itself is fine) and by the client's share of the KV memory (429) and of
  the live sessions (past it, the client's least recently used idle session is evicted to
  make room, so a client never locks itself out either). They
  apply when a session gets its caches: at creation, at a fork, and at its first use after a
  restart or an eviction. KV shared by forks is charged once, for as long as any session holds it.
- A session idle for `session_idle_s` loses its caches (its transcript stays: the next use
  rebuilds them exactly); one unused for `session_ttl_s` is deleted with its transcript.
A request that can never succeed because of its own size (prompt over the token limit) is 413.
"""

from __future__ import annotations

import hmac
import logging
import re
import secrets
import threading
import time
import weakref
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property

from hpi.protocol import frames
from hpi.protocol.holo import content_hash
from hpi import turns
from hpi.anchor import Anchor, Caches
from hpi.config import Settings
from hpi.transcripts import SESSION_ID, Checkpoint, Transcript, TranscriptConflict, open_transcripts
from hpi.verify import verify

log = logging.getLogger(__name__)

MAX_CHECKPOINTS = 64  # per session: each is a line of its transcript and of the page's list


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


class ClientQuota(SessionError):
    status, code = 429, "client_quota"


class SessionFull(SessionError):
    status, code = 413, "session_full"


class BadDraft(SessionError):
    """A draft no page of this model can send (a token id past the vocabulary): a bad frame."""
    status, code = 422, "bad_frame"


class KVMemoryFull(SessionError):
    status, code = 503, "kv_memory_full"


class StorageError(SessionError):
    """The transcript could not be written (a full disk, an unreachable Redis): the change is undone."""
    status, code = 503, "storage_error"


class SessionMoved(SessionError):
    """Another anchor changed the session since this one read it; it now holds that state."""
    status, code = 409, "session_moved"


class StaleDraft(SessionError):
    status, code = 409, "stale_draft"


class SamplingMismatch(SessionError):
    status, code = 409, "sampling_mismatch"


class CheckpointNotFound(SessionError):
    status, code = 404, "checkpoint_not_found"


class CheckpointExists(SessionError):
    status, code = 409, "checkpoint_exists"


class TooManyCheckpoints(SessionError):
    status, code = 409, "too_many_checkpoints"


class InvalidRequest(SessionError):
    status, code = 422, "invalid_request"


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
    client: str = ""  # who created it (an IP address): its quota counts the session
    caches: Caches = field(default_factory=Caches)
    messages: list[dict] = field(default_factory=list)
    holo_end: int = 0  # end of the last hologram sent: the next delta starts here
    # KV budget held in the store for the positions past the frozen runs the caches hold (those
    # are charged to their `Charge`); with them it covers every position of caches.ids.
    reserved_tokens: int = 0
    admitted: bool = False  # holds caches that the store's limits count
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
    checkpoints: dict[str, Checkpoint] = field(default_factory=dict)  # by name, in creation order
    saved: Transcript | None = None  # the last transcript written: what a restart would bring back

    @property
    def n_tokens(self) -> int:
        return len(self.caches.ids)

    @property
    def answer(self) -> list[int]:
        """The confirmed tokens of the answer being written (from chain_base)."""
        return self.caches.ids[self.chain_base:]


class Charge:
    """The KV memory of frozen runs (server/trail.py) that forks share: the store counts it once,
    for as long as any session's cache holds the runs tagged with it."""
    __slots__ = ("tokens", "__weakref__")

    def __init__(self):
        self.tokens = 0


class SessionStore:
    def __init__(self, anchor: Anchor, settings: Settings):
        self.anchor = anchor
        self.settings = settings
        self.kv_bytes_per_token = anchor.kv_bytes_per_token()
        self._sessions: dict[str, Session] = {}  # restored ones included, before their caches are rebuilt
        self._live = 0  # sessions holding caches
        self._kv_tokens = 0  # sessions' own reservations
        self._charges: weakref.WeakSet[Charge] = weakref.WeakSet()  # shared runs some cache still holds
        self._per_client: Counter[str] = Counter()  # sessions, restored ones included
        self._client_tokens: Counter[str] = Counter()  # their own KV reservations
        self._client_live: Counter[str] = Counter()  # their sessions holding caches
        self._lock = threading.Lock()  # guards the fields above; taken after a session lock
        self.transcripts = open_transcripts(settings)
        for t in self.transcripts.load_all():
            self._index(t)

    def __len__(self) -> int:
        """Sessions in memory: the ones the limits count."""
        return self._live

    @property
    def kv_bytes(self) -> int:
        return self._charged_tokens() * self.kv_bytes_per_token

    def _charged_tokens(self) -> int:
        return self._kv_tokens + sum(c.tokens for c in list(self._charges))

    def create(self, messages: list[dict], client: str = "") -> Session:
        ids = self.anchor.lm.chat_ids(messages)
        self._check_prompt(len(ids), "the prompt")
        self.sweep()
        session = Session(secrets.token_urlsafe(12), secrets.token_urlsafe(32), client=client, messages=list(messages))
        with self._lock:
            self._add(session, len(ids))
        # No lock needed: nobody else can reach the session before its token is returned.
        try:
            self.anchor.prefill(session.caches, ids)
            session.chain_base = len(ids)
            session.full = self._build(session, 0)
        except Exception:
            self._forget(session)  # never saved
            raise
        self._save(session)
        return session

    def check_admission(self, client: str) -> None:
        """Refuse now what `create` would refuse for the counts alone, before a worker thread and a
        prefill are spent on it. Only counters are read: the event loop may call it."""
        with self._lock:
            self._check_count(client)
            if self._live >= self.settings.max_live_sessions and not self._client_live[client]:
                self._refuse_live_full()

    def _refuse_live_full(self) -> None:
        raise TooManySessions(f"the server holds its limit of {self.settings.max_live_sessions} sessions in "
                              "memory; retry in a while")

    def exists(self, session_id: str) -> bool:
        return self._find(session_id) is not None

    def _find(self, session_id: str) -> Session | None:
        """The session, taken up from a store other anchors share if this one does not hold it."""
        with self._lock:
            session = self._sessions.get(session_id)
        if session is not None or not self.transcripts.shared or not re.fullmatch(SESSION_ID, session_id):
            return session
        t = self._read(lambda: self.transcripts.load(session_id))
        if t is None:
            return None
        with self._lock:
            if (session := self._sessions.get(session_id)) is None:
                self._check_count(t.client)
                session = self._index(t)
        return session

    @staticmethod
    def _read(load):
        try:
            return load()
        except OSError as e:
            log.warning("the session store failed: %s", e)
            raise StorageError("the session store cannot be read now; retry shortly") from e

    def get(self, session_id: str, token: str | None) -> Session:
        """The session, if it exists (404) and `token` is its token (401 when absent, 403 when wrong)."""
        session = self._find(session_id)
        if session is None:
            raise SessionNotFound(f"no session {session_id!r:.72}")
        if not token:
            raise Unauthorized("this endpoint needs `Authorization: Bearer <session token>`")
        if not hmac.compare_digest(token.encode(), session.token.encode()):
            raise Forbidden("the token does not belong to this session")
        return session

    @contextmanager
    def use(self, session_id: str, token: str | None, wake: bool = True) -> Iterator[Session]:
        """Hold the session's lock: one request at a time changes or reads its caches, which are
        rebuilt first if the session was restored from its transcript (unless `wake` is false)."""
        session = self.get(session_id, token)
        with session.lock:
            if session.closed:
                raise SessionNotFound(f"session {session_id!r:.72} was deleted")
            if self.transcripts.shared:
                self._catch_up(session)
            session.last_used = time.time()
            if wake and session.caches.anchor is None:
                self._wake(session)
            try:
                yield session
            finally:
                session.last_used = time.time()  # idle time counts from the end of the last request

    def sweep(self, now: float | None = None) -> tuple[int, int]:
        """Drop the caches of sessions idle for `session_idle_s` and delete the ones unused for
        `session_ttl_s`; (evicted, expired). A session in use (its lock held) is left alone."""
        now = time.time() if now is None else now
        with self._lock:
            sessions = list(self._sessions.values())
        evicted = expired = 0
        for s in sessions:
            idle = now - s.last_used
            soonest = min(self.settings.session_idle_s, self.settings.session_ttl_s)
            if idle < soonest or not s.lock.acquire(blocking=False):
                continue
            try:
                if s.closed:
                    continue
                if idle >= self.settings.session_ttl_s:
                    if self.transcripts.shared:  # it expires there by itself; another anchor may hold it now
                        self._forget(s)
                    else:
                        self.delete(s)
                    expired += 1
                elif s.caches.anchor is not None and s.saved is not None:
                    with self._lock:
                        self._evict(s)
                    evicted += 1
            except StorageError:
                continue  # logged; the next sweep tries again
            finally:
                s.lock.release()
        return evicted, expired

    def hologram(self, session: Session, start: int = 0) -> Segment:
        """The hologram of KV positions [start, end): from 0 the whole conversation, else a delta
        after segments the page holds (a fork's page reuses its parent's). Later deltas start
        at its end."""
        end = session.n_tokens - 1
        if not 0 <= start <= end:
            raise InvalidRequest(f"start must be between 0 and {end}, the end of this conversation's hologram")
        if start:
            segment = self._build(session, start)
        else:
            if session.full is None:
                session.full = self._build(session, 0)
            segment = session.full
        if session.holo_end != segment.end:
            session.holo_end = segment.end
            self._save(session)
        return segment

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
        self._check_prompt(len(ids) - session.n_tokens, "the new turn")
        with self._lock:
            self._reserve(session, len(ids))
        try:
            self.anchor.prefill(session.caches, ids[session.n_tokens:])
        except Exception:
            # A failed prefill may have extended some layers and not others.
            self._revert(session)
            raise
        session.messages.extend(messages)
        session.chain_base, session.chains = session.n_tokens, [frames.GENESIS]
        session.full = None
        delta = self._build(session, session.holo_end)
        session.holo_end = delta.end
        self._save(session)
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
            self._save(session)
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
            raise BadDraft(f"token ids must be below the vocabulary size {vocab}")
        with self._lock:
            self._reserve(session, session.n_tokens + len(tokens) + 1)
        try:
            v = verify(self.anchor.lm, session.caches, tokens, *session.sampling)
        except Exception:
            self._revert(session)  # the pass may have left the cache half extended
            raise
        for t in tokens[:v.accepted] + [v.token]:
            session.chains.append(frames.chain_next(session.chains[-1], t))
        session.full = None
        self._save(session)  # before the verdict: what the page is told is confirmed survives a restart
        return frames.Verdict(v=1, type="correction" if v.corrected else "ack", accepted=v.accepted,
                              token=v.token, position=session.n_tokens, chain=session.chains[-1])

    def checkpoint(self, session: Session, name: str) -> Checkpoint:
        """Name the session's current confirmed position."""
        if name in session.checkpoints:
            raise CheckpointExists(f"the session already has a checkpoint {name!r}")
        if len(session.checkpoints) >= MAX_CHECKPOINTS:
            raise TooManyCheckpoints(f"a session keeps at most {MAX_CHECKPOINTS} checkpoints")
        c = Checkpoint(name=name, position=session.n_tokens, chain_base=session.chain_base,
                       n_messages=len(session.messages), created=time.time())
        session.checkpoints[name] = c
        self._save(session)
        return c

    def _checkpoint(self, session: Session, name: str) -> Checkpoint:
        c = session.checkpoints.get(name)
        if c is None:
            raise CheckpointNotFound(f"session {session.id!r} has no checkpoint {name!r}")
        return c

    def backtrack(self, session: Session, name: str) -> int:
        """Restore the session's exact state at a checkpoint; the number of tokens dropped.

        Later tokens, their KV and the checkpoints after them are dropped; the turns and the
        answer's start are the checkpoint's, so the chain at its position is the one the page had
        there. The last token is left pending (server/anchor.py `rewind`), so the next pass
        continues exactly as the original one did. A session not rebuilt since a restart is
        only cut: its caches are rebuilt shorter on first use.
        """
        c = self._checkpoint(session, name)
        dropped = session.n_tokens - c.position
        self.anchor.rewind(session.caches, c.position)
        session.messages = session.messages[:c.n_messages]
        session.chain_base = c.chain_base
        self._rechain(session)
        session.holo_end = min(session.holo_end, c.position - 1)
        session.full = None
        session.checkpoints = {k: v for k, v in session.checkpoints.items() if v.position <= c.position}
        self._save(session)
        return dropped

    def fork(self, parent: Session, name: str, token: int | None = None, temperature: float | None = None,
             seed: int | None = None, client: str = "") -> Session:
        """A new session from the parent's checkpoint `name`, its KV prefix shared copy-on-write.

        The fork's first confirmed token is `token` if given; its sampling is the parent's unless
        `temperature` or `seed` is given. It keeps the parent's checkpoints up to the fork's point.
        """
        c = self._checkpoint(parent, name)
        vocab = self.anchor.lm.config.vocab_size
        if token is not None and token >= vocab:
            raise InvalidRequest(f"token must be below the vocabulary size {vocab}")
        sampling = parent.sampling
        if temperature is not None or seed is not None:
            base = parent.sampling or (0.0, 0)
            sampling = (base[0] if temperature is None else temperature, base[1] if seed is None else seed)
            if seed is not None and sampling[0] == 0:
                raise InvalidRequest("a seed only changes sampled decoding: give a temperature above 0 too")
        self.sweep()
        with self._lock:  # before the parent's prefix is frozen for a fork that may not be admitted
            self._check_count(client)
        charge = Charge()
        caches, frozen = self.anchor.branch(parent.caches, c.position, charge)
        with self._lock:  # the parent's own positions just frozen are now the shared runs' charge
            if frozen:
                charge.tokens = frozen
                parent.reserved_tokens -= frozen
                self._kv_tokens -= frozen
                self._charges.add(charge)
        child = Session(secrets.token_urlsafe(12), secrets.token_urlsafe(32), client=client, caches=caches,
                        messages=parent.messages[:c.n_messages], chain_base=c.chain_base, sampling=sampling,
                        holo_end=min(parent.holo_end, c.position - 1),
                        checkpoints={k: v for k, v in parent.checkpoints.items() if v.position <= c.position})
        with self._lock:
            self._add(child, c.position + (token is not None))
        try:
            if token is not None:
                self.anchor.prefill(child.caches, [token])
            self._rechain(child)
        except Exception:
            self._forget(child)  # never saved
            raise
        self._save(child)
        return child

    def _build(self, session: Session, start: int) -> Segment:
        data = self.anchor.hologram_bytes(session.caches, start)
        return Segment(data, start, session.n_tokens - 1)

    def _check_prompt(self, n: int, what: str) -> None:
        limit = self.settings.max_prompt_tokens
        if n > limit:
            raise PromptTooLong(f"{what} is {n} tokens; the limit per session is {limit}")

    def _client_limit(self, total: int) -> int:
        return max(1, int(total * self.settings.client_share))

    def _check_count(self, client: str) -> None:
        """Room for one more session, and in its client's share; callers hold the store's lock."""
        if len(self._sessions) >= self.settings.max_sessions:
            raise TooManySessions(f"the server keeps its limit of {self.settings.max_sessions} sessions; "
                                  "retry after other sessions are deleted or expire")
        if self._per_client[client] >= (limit := self._client_limit(self.settings.max_sessions)):
            raise ClientQuota(f"one client keeps at most {limit} sessions; delete some of yours first")

    def _add(self, session: Session, n_tokens: int) -> None:
        """Count a new session and hold memory for its caches over `n_tokens`; callers hold the store's lock."""
        self._check_count(session.client)
        self._admit(session, n_tokens)
        self._sessions[session.id] = session
        self._per_client[session.client] += 1

    def _admit(self, session: Session, n_tokens: int) -> None:
        """Hold memory for the session's caches over `n_tokens`; 503 when the server is full.
        Callers hold the store's lock."""
        if not session.admitted and self._client_live[session.client] >= self._client_limit(
                self.settings.max_live_sessions) and not self._evict_lru(session.client):
            raise ClientQuota("every session this client holds in memory is in use; retry when one is done")
        if not session.admitted and self._live >= self.settings.max_live_sessions:
            self._refuse_live_full()
        self._reserve(session, n_tokens)

    def _reserve(self, session: Session, n_tokens: int) -> None:
        """Hold memory for `n_tokens` positions of the session's caches, past the frozen runs it
        holds (those are charged already). Callers hold the store's lock."""
        if n_tokens > self.settings.max_session_tokens:
            raise SessionFull(f"the session would hold {n_tokens} tokens; a session holds at most "
                              f"{self.settings.max_session_tokens}: start a new one")
        anchor = session.caches.anchor
        own = n_tokens - (anchor.frozen_tokens if anchor is not None else 0)
        extra = own - session.reserved_tokens
        need = (self._charged_tokens() + extra) * self.kv_bytes_per_token
        if need > self.settings.max_kv_bytes:
            raise KVMemoryFull(f"{n_tokens} tokens need {extra * self.kv_bytes_per_token} more bytes of KV "
                               f"memory; {self.kv_bytes} of {self.settings.max_kv_bytes} bytes are in use; "
                               "retry after other sessions are deleted")
        share = self._client_limit(self.settings.max_kv_bytes)
        if extra > 0 and (self._client_tokens[session.client] + extra) * self.kv_bytes_per_token > share:
            raise ClientQuota(f"{n_tokens} tokens would take this client past its {share} bytes of KV memory; "
                              "delete some of its sessions first")
        self._live += not session.admitted
        self._client_live[session.client] += not session.admitted
        session.admitted = True
        self._kv_tokens += extra
        self._client_tokens[session.client] += extra
        session.reserved_tokens = own

    def _release(self, session: Session) -> None:
        """Give back the session's own memory (shared runs go with the last cache holding them);
        callers hold the store's lock."""
        self._live -= session.admitted
        self._client_live[session.client] -= session.admitted
        self._kv_tokens -= session.reserved_tokens
        self._client_tokens[session.client] -= session.reserved_tokens
        session.reserved_tokens, session.admitted = 0, False

    def _evict_lru(self, client: str) -> bool:
        """Evict the client's least recently used session not in use; whether one was. Callers
        hold the store's lock (a session's lock is only tried, so the usual order cannot deadlock)."""
        held = sorted((s for s in self._sessions.values() if s.client == client and s.admitted and s.saved),
                      key=lambda s: s.last_used)
        for s in held:
            if s.lock.acquire(blocking=False):
                try:
                    if not s.closed:
                        self._evict(s)
                        return True
                finally:
                    s.lock.release()
        return False

    def _evict(self, session: Session) -> None:
        """Drop the session's caches; what it holds is its saved transcript, so `use` rebuilds them
        exactly. Callers hold the session's lock and the store's."""
        c = session.caches
        session.caches = Caches(ids=list(c.ids), pending=c.ids[-1] if c.pending is not None else None)
        session.full = None
        self._release(session)

    def _catch_up(self, session: Session) -> None:
        """Take the state another anchor saved since this one last did, or forget a session it
        deleted. Callers hold the session's lock."""
        held = self._read(lambda: self.transcripts.revision(session.id))
        if session.saved is not None and held == session.saved.revision:
            return
        t = self._read(lambda: self.transcripts.load(session.id)) if held is not None else None
        if t is None:
            self._forget(session)
            raise SessionNotFound(f"session {session.id!r} was deleted")
        self._restore(session, t)

    def _index(self, t: Transcript) -> Session | None:
        """Restore a session from its transcript (at startup, or taken up from a shared store),
        unless it belongs to another model. Callers hold the store's lock, or run before it is shared."""
        lm = self.anchor.lm
        why = None
        if t.model_id != lm.model_id:
            why = f"it is a conversation of model {t.model_id}, not of the anchor's {lm.model_id}"
        elif max(t.ids) >= lm.config.vocab_size:
            why = f"it holds token ids beyond the vocabulary size {lm.config.vocab_size}"
        if why:
            log.warning("skipping the transcript of session %s: %s", t.id, why)
            return None
        session = Session(t.id, t.token, client=t.client, created=t.created, last_used=t.last_used or t.created)
        self._restore(session, t, locked=True)
        self._sessions[t.id] = session
        self._per_client[t.client] += 1
        return session

    def _restore(self, session: Session, t: Transcript, locked: bool = False) -> None:
        """Make the session what its transcript says, without caches: `use` rebuilds them.
        `locked`: the caller holds the store's lock."""
        if locked:
            self._release(session)
        else:
            with self._lock:
                self._release(session)
        session.messages = [m.model_dump() for m in t.messages]
        session.caches = Caches(ids=list(t.ids), pending=t.ids[-1] if t.pending else None)
        session.chain_base = t.chain_base
        self._rechain(session)
        session.sampling, session.holo_end = t.sampling, t.holo_end
        session.checkpoints = {c.name: c for c in t.checkpoints}
        session.full = None
        session.saved = t

    @staticmethod
    def _rechain(session: Session) -> None:
        """The chain hashes after each confirmed token of the answer (protocol/SPEC.md)."""
        session.chains = [frames.GENESIS]
        for token in session.answer:
            session.chains.append(frames.chain_next(session.chains[-1], token))

    def _wake(self, session: Session) -> None:
        """Rebuild a restored session's caches from its token ids (prefill; KV limits apply)."""
        pending = session.caches.pending is not None
        with self._lock:
            self._admit(session, session.n_tokens)
        try:
            session.caches = self.anchor.restore(session.caches.ids, pending)
        except Exception:
            with self._lock:
                self._release(session)
            raise

    def _save(self, session: Session) -> None:
        """Write the session's transcript; if that fails, go back to the last one written."""
        c = session.caches
        t = Transcript(id=session.id, token=session.token, model_id=self.anchor.lm.model_id,
                       messages=session.messages, ids=list(c.ids), pending=c.pending is not None,
                       chain_base=session.chain_base, sampling=session.sampling, holo_end=session.holo_end,
                       created=session.created, checkpoints=list(session.checkpoints.values()),
                       client=session.client, last_used=time.time(),
                       revision=session.saved.revision + 1 if session.saved else 1)
        try:
            self.transcripts.save(t)
        except OSError as e:
            log.warning("session %s could not be saved: %s", session.id, e)
            self._revert(session)
            raise StorageError("the session could not be saved; it continues from its last saved state: "
                               "say hello again") from e
        except TranscriptConflict as e:
            log.warning("session %s: %s", session.id, e)
            t = self._read(lambda: self.transcripts.load(session.id))
            if t is None:
                self._forget(session)
                raise SessionNotFound(f"session {session.id!r} was deleted by another anchor") from e
            self._restore(session, t)
            raise SessionMoved("another anchor changed this session meanwhile; it continues from that "
                               "state: say hello again") from e
        session.saved = t

    def _revert(self, session: Session) -> None:
        """Back to the last transcript written, or gone if none was."""
        if session.saved is None:
            self._forget(session)
        else:
            self._restore(session, session.saved)

    def delete(self, session: Session) -> None:
        """Free the session and remove its transcript; callers outside this class hold its lock (see `use`)."""
        try:
            self.transcripts.delete(session.id)
        except OSError as e:
            log.warning("the transcript of session %s could not be deleted: %s", session.id, e)
            raise StorageError("the session store cannot be written now; retry shortly") from e
        self._forget(session)

    def _forget(self, session: Session) -> None:
        """Free the session, leaving its transcript to whoever deleted or holds it."""
        session.closed = True
        session.caches = Caches()
        session.full = None
        with self._lock:
            if self._sessions.pop(session.id, None) is session:
                self._release(session)
                self._per_client[session.client] -= 1
