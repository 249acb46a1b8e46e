"""Which sessions the anchor holds, and the limits on them, so that no client locks the others out.

README, "Limits":
- Every session counts against `max_sessions`, in memory or only on disk (restored after a
  restart, or idle), and against its client's share of them (`client_share` of the total;
  the client is the peer's IP address): over the share is 429 `client_quota`.
- A session holds at most `max_session_tokens` tokens however they arrived: prompt, turns,
  verified drafts, a fork's forced token. A request that would pass it is 413 `session_full`.
- Caches in memory are bounded by `max_live_sessions` and `max_kv_bytes` (503: the server is
  busy, the request itself is fine) and by the client's share of the KV memory (429) and of
  the live sessions (past it, the client's least recently used idle session is evicted to
  make room, so a client never locks itself out either). They apply when a session gets its
  caches: at creation, at a fork, and at its first use after a restart or an eviction. KV
  shared by forks is charged once, for as long as any session holds it.
A request that can never succeed because of its own size (prompt over the token limit) is 413.

Lock order: a session's lock, then this registry's. The registry only tries a session's lock
(to evict it), so the order cannot deadlock.
"""

from __future__ import annotations

import threading
import weakref
from collections import Counter
from collections.abc import Callable

from hpi.anchor import Caches
from hpi.config import Settings
from hpi.errors import ClientQuota, KVMemoryFull, PromptTooLong, SessionFull, TooManySessions
from hpi.session_state import Session


class Charge:
    """The KV memory of frozen runs (server/trail.py) that forks share: the limits count it once,
    for as long as any session's cache holds the runs tagged with it."""
    __slots__ = ("tokens", "__weakref__")

    def __init__(self):
        self.tokens = 0


class SessionLimits:
    def __init__(self, settings: Settings, kv_bytes_per_token: int):
        self.settings = settings
        self.kv_bytes_per_token = kv_bytes_per_token
        self._sessions: dict[str, Session] = {}  # restored ones included, before their caches are rebuilt
        self._live = 0  # sessions holding caches
        self._kv_tokens = 0  # sessions' own reservations
        self._charges: weakref.WeakSet[Charge] = weakref.WeakSet()  # shared runs some cache still holds
        self._per_client: Counter[str] = Counter()  # sessions, restored ones included
        self._client_tokens: Counter[str] = Counter()  # their own KV reservations
        self._client_live: Counter[str] = Counter()  # their sessions holding caches
        self._lock = threading.Lock()  # guards the fields above

    def __len__(self) -> int:
        """Sessions in memory: the ones the limits count."""
        return self._live

    @property
    def kv_bytes(self) -> int:
        return self._charged_tokens() * self.kv_bytes_per_token

    def _charged_tokens(self) -> int:
        return self._kv_tokens + sum(c.tokens for c in list(self._charges))

    def get(self, session_id: str) -> Session | None:
        with self._lock:
            return self._sessions.get(session_id)

    def held(self) -> list[Session]:
        with self._lock:
            return list(self._sessions.values())

    def check_prompt(self, n: int, what: str) -> None:
        limit = self.settings.max_prompt_tokens
        if n > limit:
            raise PromptTooLong(f"{what} is {n} tokens; the limit per session is {limit}")

    def check_admission(self, client: str) -> None:
        """Refuse now what `add` would refuse for the counts alone, before a worker thread and a
        prefill are spent on it. Only counters are read: the event loop may call it."""
        with self._lock:
            self._check_count(client)
            if self._live >= self.settings.max_live_sessions and not self._client_live[client]:
                self._refuse_live_full()

    def check_count(self, client: str) -> None:
        """Room for one more session of `client`."""
        with self._lock:
            self._check_count(client)

    def _refuse_live_full(self) -> None:
        raise TooManySessions(f"the server holds its limit of {self.settings.max_live_sessions} sessions in "
                              "memory; retry in a while")

    def _client_limit(self, total: int) -> int:
        return max(1, int(total * self.settings.client_share))

    def _check_count(self, client: str) -> None:
        if len(self._sessions) >= self.settings.max_sessions:
            raise TooManySessions(f"the server keeps its limit of {self.settings.max_sessions} sessions; "
                                  "retry after other sessions are deleted or expire")
        if self._per_client[client] >= (limit := self._client_limit(self.settings.max_sessions)):
            raise ClientQuota(f"one client keeps at most {limit} sessions; delete some of yours first")

    def add(self, session: Session, n_tokens: int) -> None:
        """Count a new session and hold memory for its caches over `n_tokens`."""
        with self._lock:
            self._check_count(session.client)
            self._admit(session, n_tokens)
            self._register(session)

    def register(self, session: Session) -> None:
        """Count a session restored from its transcript, without caches."""
        with self._lock:
            self._register(session)

    def adopt(self, session_id: str, client: str, restore: Callable[[], Session | None]) -> Session | None:
        """The session, restored by `restore` and counted unless another request did so first."""
        with self._lock:
            if (session := self._sessions.get(session_id)) is None:
                self._check_count(client)
                if (session := restore()) is not None:
                    self._register(session)
            return session

    def _register(self, session: Session) -> None:
        self._sessions[session.id] = session
        self._per_client[session.client] += 1

    def admit(self, session: Session, n_tokens: int) -> None:
        """Hold memory for the session's caches over `n_tokens`; 503 when the server is full."""
        with self._lock:
            self._admit(session, n_tokens)

    def _admit(self, session: Session, n_tokens: int) -> None:
        if not session.admitted and self._client_live[session.client] >= self._client_limit(
                self.settings.max_live_sessions) and not self._evict_lru(session.client):
            raise ClientQuota("every session this client holds in memory is in use; retry when one is done")
        if not session.admitted and self._live >= self.settings.max_live_sessions:
            self._refuse_live_full()
        self._reserve(session, n_tokens)

    def reserve(self, session: Session, n_tokens: int) -> None:
        """Hold memory for `n_tokens` positions of the session's caches, past the frozen runs it
        holds (those are charged already)."""
        with self._lock:
            self._reserve(session, n_tokens)

    def _reserve(self, session: Session, n_tokens: int) -> None:
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

    def share(self, parent: Session, charge: Charge, frozen: int) -> None:
        """The parent's own positions just frozen for a fork are now charged to the shared runs."""
        if not frozen:
            return
        with self._lock:
            charge.tokens = frozen
            parent.reserved_tokens -= frozen
            self._kv_tokens -= frozen
            self._charges.add(charge)

    def release(self, session: Session) -> None:
        """Give back the session's own memory (shared runs go with the last cache holding them)."""
        with self._lock:
            self._release(session)

    def _release(self, session: Session) -> None:
        self._live -= session.admitted
        self._client_live[session.client] -= session.admitted
        self._kv_tokens -= session.reserved_tokens
        self._client_tokens[session.client] -= session.reserved_tokens
        session.reserved_tokens, session.admitted = 0, False

    def _evict_lru(self, client: str) -> bool:
        """Evict the client's least recently used session not in use; whether one was."""
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

    def evict(self, session: Session) -> None:
        """Drop the session's caches; what it holds is its saved transcript, so its next use
        rebuilds them exactly. Callers hold the session's lock."""
        with self._lock:
            self._evict(session)

    def _evict(self, session: Session) -> None:
        c = session.caches
        session.caches = Caches(ids=list(c.ids), pending=c.ids[-1] if c.pending is not None else None)
        session.full = None
        self._release(session)

    def forget(self, session: Session) -> None:
        """Free the session, leaving its transcript to whoever deleted or holds it."""
        session.closed = True
        session.caches = Caches()
        session.full = None
        with self._lock:
            if self._sessions.pop(session.id, None) is session:
                self._release(session)
                self._per_client[session.client] -= 1
