"""Conversation sessions on the anchor: exact KV caches, the holograms sent from them, and limits.

`SessionStore` is what the routes use. It creates, finds, locks, sweeps and deletes sessions,
and composes the parts that each do one thing to them, in the order a session meets them:
- server/session_state.py: what a session holds;
- server/session_limits.py: which sessions the anchor holds, and the limits on them;
- server/session_durability.py: every change written to the session's transcript before a
  reply reveals it, and sessions restored from their transcripts;
- server/holograms.py: the full hologram and the delta of each new turn;
- server/reconcile.py: the sync channel's hello and drafts;
- server/checkpoints.py: checkpoints, backtracks and forks.

A session idle for `session_idle_s` loses its caches (its transcript stays: the next use
rebuilds them exactly); one unused for `session_ttl_s` is deleted with its transcript.
"""

from __future__ import annotations

import hmac
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager

from hpi.anchor import Anchor
from hpi.checkpoints import Checkpoints
from hpi.config import Settings
from hpi.errors import Forbidden, SessionNotFound, StorageError, Unauthorized, quoted
from hpi.holograms import Holograms
from hpi.reconcile import Reconciliation
from hpi.session_durability import Durability
from hpi.session_limits import SessionLimits
from hpi.session_state import Session
from hpi.transcripts import SESSION_ID
from hpi.sampling import Sampling


class SessionStore(Holograms, Reconciliation, Checkpoints):
    def __init__(self, anchor: Anchor, settings: Settings):
        self.anchor = anchor
        self.settings = settings
        self.limits = SessionLimits(settings, anchor.kv_bytes_per_token())
        self.durability = Durability(settings, anchor.lm, self.limits)
        for session in self.durability.restored():
            self.limits.register(session)

    def __len__(self) -> int:
        """Sessions in memory: the ones the limits count."""
        return len(self.limits)

    @property
    def kv_bytes(self) -> int:
        return self.limits.kv_bytes

    def check_admission(self, client: str) -> None:
        self.limits.check_admission(client)

    def create(self, messages: list[dict], client: str = "", sampling: Sampling | None = None) -> Session:
        """A session of the prompt `messages`. `sampling`: its answers' (else the first page's hello fixes
        the temperature and seed)."""
        ids = self.anchor.lm.chat_ids(messages)
        self.limits.check_prompt(len(ids), "the prompt")
        self.sweep()
        session = Session.new(client=client, messages=list(messages), sampling=sampling)
        self.limits.add(session, len(ids))
        # No lock needed: nobody else can reach the session before its token is returned.
        try:
            self.anchor.prefill(session.caches, ids)
            session.chain_base = len(ids)
            session.full = self.encode(session, 0)
        except Exception:
            self.limits.forget(session)  # never saved
            raise
        self.durability.save(session)
        return session

    def exists(self, session_id: str) -> bool:
        return self._find(session_id) is not None

    def _find(self, session_id: str) -> Session | None:
        """The session, taken up from a store other anchors share if this one does not hold it."""
        session = self.limits.get(session_id)
        if session is not None or not self.durability.shared or not re.fullmatch(SESSION_ID, session_id):
            return session
        t = self.durability.load(session_id)
        if t is None:
            return None
        return self.limits.adopt(session_id, t.client, lambda: self.durability.index(t))

    def get(self, session_id: str, token: str | None) -> Session:
        """The session, if it exists (404) and `token` is its token (401 when absent, 403 when wrong)."""
        session = self._find(session_id)
        if session is None:
            raise SessionNotFound(f"no session {quoted(session_id)}")
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
                raise SessionNotFound(f"session {quoted(session_id)} was deleted")
            if self.durability.shared:
                self.durability.catch_up(session)
            session.last_used = time.time()
            if wake and session.caches.anchor is None:
                self._wake(session)
            try:
                yield session
            finally:
                session.last_used = time.time()  # idle time counts from the end of the last request

    def _wake(self, session: Session) -> None:
        """Rebuild a restored session's caches from its token ids (prefill; KV limits apply)."""
        pending = session.caches.pending is not None
        self.limits.admit(session, session.n_tokens)
        try:
            session.caches = self.anchor.restore(session.caches.ids, pending)
        except Exception:
            self.limits.release(session)
            raise

    def sweep(self, now: float | None = None) -> tuple[int, int]:
        """Drop the caches of sessions idle for `session_idle_s` and delete the ones unused for
        `session_ttl_s`; (evicted, expired). A session in use (its lock held) is left alone."""
        now = time.time() if now is None else now
        evicted = expired = 0
        for s in self.limits.held():
            idle = now - s.last_used
            soonest = min(self.settings.session_idle_s, self.settings.session_ttl_s)
            if idle < soonest or not s.lock.acquire(blocking=False):
                continue
            try:
                if s.closed:
                    continue
                if idle >= self.settings.session_ttl_s:
                    if self.durability.shared:  # it expires there by itself; another anchor may hold it now
                        self.limits.forget(s)
                    else:
                        self.durability.delete(s)
                    expired += 1
                elif s.caches.anchor is not None and s.saved is not None:
                    self.limits.evict(s)
                    evicted += 1
            except StorageError:
                continue  # logged; the next sweep tries again
            finally:
                s.lock.release()
        return evicted, expired

    def delete(self, session: Session) -> None:
        """Free the session and remove its transcript; callers hold its lock (see `use`)."""
        self.durability.delete(session)
