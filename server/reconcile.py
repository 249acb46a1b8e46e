"""The anchor's side of the reconciliation channel (protocol/SPEC.md): a page's hello and its drafts.

A hello fixes the session's sampling (the first page's) and tells the page the confirmed
tokens it lacks; a draft is verified in one forward pass (server/verify.py), and what the
anchor confirms extends the session's chain and its transcript before the page is told.
"""

from __future__ import annotations

import hmac

from hpi.anchor import Anchor
from hpi.answer_rules import AnswerRules
from hpi.errors import BadFrame, SamplingMismatch, StaleDraft
from hpi.protocol import frames
from hpi.sampling import Sampling
from hpi.session_durability import Durability
from hpi.session_limits import SessionLimits
from hpi.session_state import Session
from hpi.verify import verify


class Reconciliation:
    """Part of SessionStore (server/sessions.py); callers hold the session's lock."""
    anchor: Anchor
    limits: SessionLimits
    durability: Durability

    def ready(self, session: Session, position: int, chain: bytes, sampling: tuple[float, int]) -> frames.Ready:
        """Answer a page's hello: the confirmed tokens it lacks, or all of them if its chain is not ours."""
        if session.sampling is None:
            session.sampling = Sampling(*sampling)
            self.durability.save(session)
        elif session.sampling.pair != sampling:
            raise SamplingMismatch(f"this session samples with (temperature, seed) = {session.sampling.pair}")
        at = position - session.chain_base
        known = 0 <= at < len(session.chains) and hmac.compare_digest(session.chains[at], chain)
        start = position if known else session.chain_base
        return frames.Ready(v=1, position=session.n_tokens, chain=session.chains[-1],
                            tokens=session.caches.ids[start:], refresh=not known)

    def draft(self, session: Session, position: int, chain: bytes, tokens: list[int]) -> frames.Verdict:
        """Verify drafted tokens and extend the chain by what is confirmed."""
        if session.sampling is None:
            raise StaleDraft("send a hello frame first")
        if position != session.n_tokens or not hmac.compare_digest(chain, session.chains[-1]):
            raise StaleDraft(f"the draft starts at position {position}; the anchor has confirmed "
                             f"{session.n_tokens} tokens: say hello again to catch up")
        vocab = self.anchor.lm.config.vocab_size
        if any(t >= vocab for t in tokens):
            raise BadFrame(f"token ids must be below the vocabulary size {vocab}")
        self.limits.reserve(session, session.n_tokens + len(tokens) + 1)
        try:
            if session.rules is None or session.rules.sampling != session.sampling:
                session.rules = AnswerRules(self.anchor.lm, session.sampling)
            v = verify(self.anchor.lm, session.caches, tokens, session.rules, session.chain_base)
        except Exception:
            self.durability.revert(session)  # the pass may have left the cache half extended
            raise
        for t in tokens[:v.accepted] + [v.token]:
            session.chains.append(frames.chain_next(session.chains[-1], t))
        session.full = None
        self.durability.save(session)  # before the verdict: what the page is told is confirmed survives a restart
        return frames.Verdict(v=1, type="correction" if v.corrected else "ack", accepted=v.accepted,
                              token=v.token, position=session.n_tokens, chain=session.chains[-1])
