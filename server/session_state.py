"""What one conversation session is on the anchor: its caches, turns, chain and checkpoints.

The parts of server/sessions.py read and change it under the session's lock; this module only
says what each field means.
"""

from __future__ import annotations

import secrets
import threading
import time
from dataclasses import dataclass, field
from functools import cached_property

from hpi.anchor import Caches
from hpi.answer_rules import AnswerRules
from hpi.protocol import frames
from hpi.protocol.holo import content_hash
from hpi.sampling import Sampling
from hpi.transcripts import Checkpoint, Transcript


@dataclass
class EncodedSegment:
    """The `.holo` bytes of a hologram of KV positions [start, end), as sent to a page
    (server/hologram.py `Segment` is one decoded)."""
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
    full: EncodedSegment | None = None  # the full hologram of the current caches, built once
    created: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.time)
    closed: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    # Reconciliation (protocol/SPEC.md): the chain hash after each token from chain_base, where
    # the current answer starts (the end of the prompt or of the last appended turn), and the
    # session's sampling, fixed at creation or by the first page that syncs.
    chain_base: int = 0
    chains: list[bytes] = field(default_factory=lambda: [frames.GENESIS])
    sampling: Sampling | None = None
    # The session's AnswerRules for its sampling (a grammar's matcher keeps state): built on first use.
    rules: AnswerRules | None = field(default=None, repr=False, compare=False)
    checkpoints: dict[str, Checkpoint] = field(default_factory=dict)  # by name, in creation order
    saved: Transcript | None = None  # the last transcript written: what a restart would bring back

    @classmethod
    def new(cls, **fields) -> Session:
        """A session of fresh random id and token: the token is its only credential."""
        return cls(secrets.token_urlsafe(12), secrets.token_urlsafe(32), **fields)

    @property
    def n_tokens(self) -> int:
        return len(self.caches.ids)

    @property
    def answer(self) -> list[int]:
        """The confirmed tokens of the answer being written (from chain_base)."""
        return self.caches.ids[self.chain_base:]

    def rechain(self) -> None:
        """The chain hashes after each confirmed token of the answer (protocol/SPEC.md)."""
        self.chains = [frames.GENESIS]
        for token in self.answer:
            self.chains.append(frames.chain_next(self.chains[-1], token))
