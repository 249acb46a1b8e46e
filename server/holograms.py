"""What a page is sent of a session's KV: the full hologram, and a delta after each new turn.

A session grows at its end: a new turn adds tokens after the ones already prefilled (its
messages must render to an extension of them, or, after an answer synced over the
reconciliation channel, the anchor renders what follows that answer), so the anchor
prefills just the new tokens and sends a hologram delta starting where the last hologram it
sent ended.
"""

from __future__ import annotations

from hpi import turns
from hpi.anchor import Anchor
from hpi.errors import AnswerConfirmed, InvalidRequest, PrefixMismatch
from hpi.protocol import frames
from hpi.session_durability import Durability
from hpi.session_limits import SessionLimits
from hpi.session_state import EncodedSegment, Session


class Holograms:
    """Part of SessionStore (server/sessions.py); callers hold the session's lock."""
    anchor: Anchor
    limits: SessionLimits
    durability: Durability

    def hologram(self, session: Session, start: int = 0) -> EncodedSegment:
        """The hologram of KV positions [start, end): from 0 the whole conversation, else a delta
        after segments the page holds (a fork's page reuses its parent's). Later deltas start
        at its end."""
        end = session.n_tokens - 1
        if not 0 <= start <= end:
            raise InvalidRequest(f"start must be between 0 and {end}, the end of this conversation's hologram")
        if start:
            segment = self.encode(session, start)
        else:
            if session.full is None:
                session.full = self.encode(session, 0)
            segment = session.full
        if session.holo_end != segment.end:
            session.holo_end = segment.end
            self.durability.save(session)
        return segment

    def encode(self, session: Session, start: int) -> EncodedSegment:
        data = self.anchor.hologram_bytes(session.caches, start)
        return EncodedSegment(data, start, session.n_tokens - 1)

    def append(self, session: Session, messages: list[dict]) -> EncodedSegment:
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
        self.limits.check_prompt(len(ids) - session.n_tokens, "the new turn")
        self.limits.reserve(session, len(ids))
        try:
            self.anchor.prefill(session.caches, ids[session.n_tokens:])
        except Exception:
            # A failed prefill may have extended some layers and not others.
            self.durability.revert(session)
            raise
        session.messages.extend(messages)
        session.chain_base, session.chains = session.n_tokens, [frames.GENESIS]
        session.full = None
        delta = self.encode(session, session.holo_end)
        session.holo_end = delta.end
        self.durability.save(session)
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
        stops = session.sampling.stop if session.sampling else ()
        return ids, [{"role": "assistant", "content": turns.answer_text(lm, answer, stops)}, *messages]
