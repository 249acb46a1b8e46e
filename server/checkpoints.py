"""A session's trail: named checkpoints, a backtrack to one, and forks from one.

A session goes back only to one of its named checkpoints: a backtrack restores the exact
state at a checkpoint, and a fork starts a new session there whose KV prefix is shared
copy-on-write with this one (server/trail.py). Checkpoints record what a backtrack restores
besides the ids: the turns and the start of the answer then being written, so the chain hash
is the one the page had at that position (protocol/SPEC.md, "Checkpoints, backtracking and
forks").
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace

from hpi.anchor import Anchor
from hpi.errors import CheckpointExists, CheckpointNotFound, InvalidRequest, TooManyCheckpoints
from hpi.session_durability import Durability
from hpi.session_limits import Charge, SessionLimits
from hpi.session_state import Session
from hpi.sampling import GREEDY
from hpi.transcripts import Checkpoint

MAX_CHECKPOINTS = 64  # per session: each is a line of its transcript and of the page's list


class Checkpoints:
    """Part of SessionStore (server/sessions.py); callers hold the session's lock."""
    anchor: Anchor
    limits: SessionLimits
    durability: Durability

    sweep: Callable[[], tuple[int, int]]

    def checkpoint(self, session: Session, name: str) -> Checkpoint:
        """Name the session's current confirmed position."""
        if name in session.checkpoints:
            raise CheckpointExists(f"the session already has a checkpoint {name!r}")
        if len(session.checkpoints) >= MAX_CHECKPOINTS:
            raise TooManyCheckpoints(f"a session keeps at most {MAX_CHECKPOINTS} checkpoints")
        c = Checkpoint(name=name, position=session.n_tokens, chain_base=session.chain_base,
                       n_messages=len(session.messages), created=time.time())
        session.checkpoints[name] = c
        self.durability.save(session)
        return c

    @staticmethod
    def _checkpoint(session: Session, name: str) -> Checkpoint:
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
        session.rechain()
        session.holo_end = min(session.holo_end, c.position - 1)
        session.full = None
        session.checkpoints = {k: v for k, v in session.checkpoints.items() if v.position <= c.position}
        self.durability.save(session)
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
            base = parent.sampling or GREEDY
            sampling = replace(base, temperature=base.temperature if temperature is None else temperature,
                               seed=base.seed if seed is None else seed)
            if seed is not None and sampling.temperature == 0:
                raise InvalidRequest("a seed only changes sampled decoding: give a temperature above 0 too")
        self.sweep()
        self.limits.check_count(client)  # before the parent's prefix is frozen for a fork that may not be admitted
        charge = Charge()
        caches, frozen = self.anchor.branch(parent.caches, c.position, charge)
        self.limits.share(parent, charge, frozen)
        child = Session.new(client=client, caches=caches, messages=parent.messages[:c.n_messages],
                            chain_base=c.chain_base, sampling=sampling, holo_end=min(parent.holo_end, c.position - 1),
                            checkpoints={k: v for k, v in parent.checkpoints.items() if v.position <= c.position})
        self.limits.add(child, c.position + (token is not None))
        try:
            if token is not None:
                self.anchor.prefill(child.caches, [token])
            child.rechain()
        except Exception:
            self.limits.forget(child)  # never saved
            raise
        self.durability.save(child)
        return child
