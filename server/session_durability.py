"""Sessions kept as their transcripts, so that nothing the anchor has told a client is lost.

Every session is kept in the transcript store (server/transcripts.py), written before any
reply that reveals a change: after creation, each appended turn, each verified draft, the
session's sampling, each hologram sent, each checkpoint, backtrack and fork. After a restart
the transcripts are indexed, and a session's caches are rebuilt from its token ids on its
first use (a fork then gets a cache of its own: sharing is not restored). If a write fails,
the session goes back to its last transcript (and the reply is an error), so memory never
runs ahead of the disk.

Anchors that share a store (Redis) each take up a session there on its first request, and
catch up with what another anchor saved before each use.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

from hpi.anchor import Caches
from hpi.config import Settings
from hpi.errors import SessionMoved, SessionNotFound, StorageError
from hpi.models import LoadedModel
from hpi.session_limits import SessionLimits
from hpi.session_state import Session
from hpi.transcripts import Transcript, TranscriptConflict, open_transcripts

log = logging.getLogger(__name__)
T = TypeVar("T")


class Durability:
    def __init__(self, settings: Settings, lm: LoadedModel, limits: SessionLimits):
        self.lm = lm
        self.limits = limits
        self.transcripts = open_transcripts(settings)

    @property
    def shared(self) -> bool:
        """Other anchors may change the sessions of this store."""
        return self.transcripts.shared

    def restored(self) -> Iterator[Session]:
        """The sessions of every transcript this anchor can continue, without caches."""
        for t in self.transcripts.load_all():
            if (session := self.index(t)) is not None:
                yield session

    def index(self, t: Transcript) -> Session | None:
        """The session a transcript holds, unless it belongs to another model."""
        why = None
        if t.model_id != self.lm.model_id:
            why = f"it is a conversation of model {t.model_id}, not of the anchor's {self.lm.model_id}"
        elif max(t.ids) >= self.lm.config.vocab_size:
            why = f"it holds token ids beyond the vocabulary size {self.lm.config.vocab_size}"
        if why:
            log.warning("skipping the transcript of session %s: %s", t.id, why)
            return None
        session = Session(t.id, t.token, client=t.client, created=t.created, last_used=t.last_used or t.created)
        self._apply(session, t)
        return session

    def load(self, session_id: str) -> Transcript | None:
        return self._read(lambda: self.transcripts.load(session_id))

    @staticmethod
    def _read(load: Callable[[], T]) -> T:
        try:
            return load()
        except OSError as e:
            log.warning("the session store failed: %s", e)
            raise StorageError("the session store cannot be read now; retry shortly") from e

    def catch_up(self, session: Session) -> None:
        """Take the state another anchor saved since this one last did, or forget a session it
        deleted. Callers hold the session's lock."""
        held = self._read(lambda: self.transcripts.revision(session.id))
        if session.saved is not None and held == session.saved.revision:
            return
        t = self.load(session.id) if held is not None else None
        if t is None:
            self.limits.forget(session)
            raise SessionNotFound(f"session {session.id!r} was deleted")
        self.restore(session, t)

    def restore(self, session: Session, t: Transcript) -> None:
        """Make the session what its transcript says, without caches: its next use rebuilds them."""
        self.limits.release(session)
        self._apply(session, t)

    @staticmethod
    def _apply(session: Session, t: Transcript) -> None:
        session.messages = [m.model_dump() for m in t.messages]
        session.caches = Caches(ids=list(t.ids), pending=t.ids[-1] if t.pending else None)
        session.chain_base = t.chain_base
        session.rechain()
        session.sampling, session.holo_end = t.sampling, t.holo_end
        session.checkpoints = {c.name: c for c in t.checkpoints}
        session.full = None
        session.saved = t

    def save(self, session: Session) -> None:
        """Write the session's transcript; if that fails, go back to the last one written."""
        c = session.caches
        t = Transcript(id=session.id, token=session.token, model_id=self.lm.model_id,
                       messages=session.messages, ids=list(c.ids), pending=c.pending is not None,
                       chain_base=session.chain_base, sampling=session.sampling, holo_end=session.holo_end,
                       created=session.created, checkpoints=list(session.checkpoints.values()),
                       client=session.client, last_used=time.time(),
                       revision=session.saved.revision + 1 if session.saved else 1)
        try:
            self.transcripts.save(t)
        except OSError as e:
            log.warning("session %s could not be saved: %s", session.id, e)
            self.revert(session)
            raise StorageError("the session could not be saved; it continues from its last saved state: "
                               "say hello again") from e
        except TranscriptConflict as e:
            log.warning("session %s: %s", session.id, e)
            t = self.load(session.id)
            if t is None:
                self.limits.forget(session)
                raise SessionNotFound(f"session {session.id!r} was deleted by another anchor") from e
            self.restore(session, t)
            raise SessionMoved("another anchor changed this session meanwhile; it continues from that "
                               "state: say hello again") from e
        session.saved = t

    def revert(self, session: Session) -> None:
        """Back to the last transcript written, or gone if none was."""
        if session.saved is None:
            self.limits.forget(session)
        else:
            self.restore(session, session.saved)

    def delete(self, session: Session) -> None:
        """Free the session and remove its transcript."""
        try:
            self.transcripts.delete(session.id)
        except OSError as e:
            log.warning("the transcript of session %s could not be deleted: %s", session.id, e)
            raise StorageError("the session store cannot be written now; retry shortly") from e
        self.limits.forget(session)
