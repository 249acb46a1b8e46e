"""Session transcripts: what rebuilds a session exactly after the anchor restarts.

Two stores keep them, with one interface (`TranscriptDir` here, `RedisTranscripts` in
server/redis_transcripts.py for several anchors serving the same users; `open_transcripts`
picks one from the settings):
- `save(t)`: durably, before the reply that reveals the change; `t.revision` is the saved
  one's plus 1, and a store that other anchors write refuses it (`TranscriptConflict`) when
  the revision it holds is not `t.revision - 1`: then another anchor changed the session.
- `load(id)`, `revision(id)`, `delete(id)`, `load_all()` (what to index at startup).
- `shared`: whether other anchors write it, so a session must be checked before each use.
A store that cannot be reached raises `StoreUnavailable` (an OSError, like a full disk).

Here: one JSON file per session, `<sessions_dir>/<id>.json`, readable by its owner only: it
holds the session's token. A write goes to a temporary file that is synced and then renamed
over the old one (and the directory synced), so a crash leaves the old transcript or the new
one, never a mix. Reading validates every file; one that is unreadable or invalid is logged
and skipped, so it cannot stop the anchor from starting.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_serializer, field_validator, model_validator

from hpi.durable import write_atomic
from hpi.messages import Message
from hpi.sampling import Sampling

log = logging.getLogger(__name__)

SESSION_ID = r"^[A-Za-z0-9_-]{1,64}$"  # what secrets.token_urlsafe writes: safe as a file name
CHECKPOINT_NAME = r"^[A-Za-z0-9][A-Za-z0-9 _.:-]{0,63}$"  # printable in any page or log, no path characters


class Checkpoint(BaseModel):
    """A named position of a session's trail and what a backtrack to it restores besides the ids
    (server/checkpoints.py): the turns then recorded and where the answer then being written started."""
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(pattern=CHECKPOINT_NAME)
    position: int = Field(ge=1)  # confirmed tokens: the ids are the session's first `position`
    chain_base: int = Field(ge=1)
    n_messages: int = Field(ge=1)
    created: float


class Transcript(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: Literal[1] = 1
    id: str = Field(pattern=SESSION_ID)
    token: str = Field(min_length=1)
    model_id: str  # the anchor model whose token ids these are
    messages: list[Message]
    ids: list[Annotated[int, Field(ge=0)]] = Field(min_length=1)
    pending: bool  # the last id is confirmed but not yet in the anchor's KV cache
    chain_base: int = Field(ge=1)
    sampling: Sampling | None  # a (temperature, seed) pair in older transcripts
    holo_end: int = Field(ge=0)
    created: float
    checkpoints: list[Checkpoint] = []  # in creation order; all on the current trail (positions <= len(ids))
    client: str = Field("", max_length=64)  # the IP address that created it: its quota counts the session
    last_used: float = 0.0  # when it was last saved; 0 in older transcripts (then `created` counts)
    revision: int = Field(0, ge=0)  # saves of this session so far: 0 in older transcripts

    @field_validator("sampling", mode="before")
    @classmethod
    def _sampling(cls, v):
        return v if v is None or isinstance(v, Sampling) else Sampling.from_json(v)

    @field_serializer("sampling")
    def _sampling_json(self, v: Sampling | None) -> dict | None:
        return None if v is None else v.to_json()

    @model_validator(mode="after")
    def _consistent(self) -> Transcript:
        if self.chain_base > len(self.ids):
            raise ValueError(f"chain_base {self.chain_base} is past the {len(self.ids)} token ids")
        if self.holo_end >= len(self.ids):
            raise ValueError(f"holo_end {self.holo_end} is past the last of the {len(self.ids)} token ids")
        if len({c.name for c in self.checkpoints}) != len(self.checkpoints):
            raise ValueError("checkpoint names repeat")
        for c in self.checkpoints:
            if c.position > len(self.ids) or not c.chain_base <= c.position or c.n_messages > len(self.messages):
                raise ValueError(f"checkpoint {c.name!r} is not on the session's trail")
        return self


class StoreUnavailable(OSError):
    """The transcript store could not be read or written (a Redis server that cannot be reached)."""


class TranscriptConflict(Exception):
    """Another anchor saved or deleted the session since this one last read it."""


def parse(data: bytes, session_id: str, where: str) -> Transcript | None:
    """The transcript of `session_id` in `data`, or None (logged) if it is invalid."""
    try:
        t = Transcript.model_validate_json(data)
        if t.id != session_id:
            raise ValueError(f"it holds session {t.id!r}")
    except ValueError as e:  # pydantic's ValidationError is a ValueError
        why = e
        if isinstance(e, ValidationError):
            why = "; ".join(f"{'.'.join(map(str, x['loc'])) or 'file'}: {x['msg']}" for x in e.errors()[:3])
        log.warning("skipping the session transcript %s: %s", where, why)
        return None
    return t


class TranscriptDir:
    shared = False  # one anchor's own directory

    def __init__(self, path: Path):
        self.path = path
        path.mkdir(mode=0o700, parents=True, exist_ok=True)

    def file(self, session_id: str) -> Path:
        return self.path / f"{session_id}.json"

    def save(self, transcript: Transcript) -> None:
        """Replace the session's transcript atomically and durably."""
        write_atomic(self.file(transcript.id), transcript.model_dump_json().encode())

    def delete(self, session_id: str) -> None:
        self.file(session_id).unlink(missing_ok=True)

    def load(self, session_id: str) -> Transcript | None:
        path = self.file(session_id)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            log.warning("skipping the session transcript %s: %s", path, e)
            return None
        return parse(data, session_id, str(path))

    def revision(self, session_id: str) -> int | None:
        t = self.load(session_id)
        return None if t is None else t.revision

    def load_all(self) -> list[Transcript]:
        """Every valid transcript; the others are logged and skipped."""
        return [t for path in sorted(self.path.glob("*.json")) if (t := self.load(path.stem)) is not None]


def open_transcripts(settings) -> TranscriptDir:
    """The store the settings name (server/config.py `session_store`)."""
    if settings.session_store == "redis":
        from hpi.redis_transcripts import RedisTranscripts
        return RedisTranscripts(settings.redis_url, settings.session_ttl_s)
    return TranscriptDir(settings.sessions_path())
