"""Frames of the reconciliation channel (`/v1/sessions/{id}/sync`): msgpack maps, validated here.

Layout, meaning and the chain hash: protocol/SPEC.md, "Reconciliation frames". Every frame
carries `v` (the frame version) and `type`; a frame that is too large, not msgpack, not a
map, of an unknown type or with a bad field is refused with a FrameError, whose message
goes back to the page in an `error` frame.
"""

from __future__ import annotations

import hashlib
from typing import Annotated, Literal, Union

import msgpack
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

VERSION = 1
MAX_FRAME_BYTES = 64 * 1024
MAX_DRAFT = 256
GENESIS = b"\x00" * 32


class FrameError(ValueError):
    pass


class _Frame(BaseModel):
    model_config = ConfigDict(extra="forbid")
    v: Literal[1]


Token = Annotated[int, Field(ge=0, lt=1 << 31)]
Chain = Annotated[bytes, Field(min_length=32, max_length=32)]


class Hello(_Frame):
    """Page -> anchor, first: who it is, what it has confirmed, and the sampling of the session."""
    type: Literal["hello"]
    token: str = Field(max_length=256)
    position: int = Field(ge=0)  # tokens of the conversation the page holds as confirmed
    chain: Chain  # chain hash at that position
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    seed: int = Field(0, ge=0, lt=1 << 32)


class Draft(_Frame):
    """Page -> anchor: tokens drafted after the confirmed position `position`."""
    type: Literal["draft"]
    position: int = Field(ge=0)
    chain: Chain
    tokens: list[Token] = Field(min_length=1, max_length=MAX_DRAFT)


class Ready(_Frame):
    """Anchor -> page, after hello: its confirmed position and chain, and the confirmed tokens
    after the page's position (with `refresh`, when the page's chain does not match the
    anchor's, all confirmed tokens of the current answer: the page then reloads the full
    hologram)."""
    type: Literal["ready"] = "ready"
    position: int
    chain: Chain
    tokens: list[int]
    refresh: bool = False


class Verdict(_Frame):
    """Anchor -> page, after a draft: `accepted` drafts kept, then the anchor's own `token`, which
    is a correction (type `correction`) or the next token (type `ack`)."""
    type: Literal["ack", "correction"]
    accepted: int
    token: int
    position: int  # confirmed tokens after this verdict
    chain: Chain


class Error(_Frame):
    type: Literal["error"] = "error"
    code: str
    message: str


ClientFrame = Annotated[Union[Hello, Draft], Field(discriminator="type")]
_client = TypeAdapter(ClientFrame)


def decode(data: bytes) -> Hello | Draft:
    if len(data) > MAX_FRAME_BYTES:
        raise FrameError(f"frame of {len(data)} bytes; the limit is {MAX_FRAME_BYTES}")
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises several unrelated types
        raise FrameError(f"not a msgpack frame: {e}") from None
    if not isinstance(obj, dict):
        raise FrameError("a frame is a msgpack map")
    if obj.get("v") != VERSION:
        raise FrameError(f"frame version {obj.get('v')!r}; this anchor speaks version {VERSION}")
    try:
        return _client.validate_python(obj)
    except ValidationError as e:
        raise FrameError("; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())) from None


def encode(frame: BaseModel) -> bytes:
    return msgpack.packb(frame.model_dump(), use_bin_type=True)


def chain_next(chain: bytes, token: int) -> bytes:
    """The chain hash after one more confirmed token: SHA-256(chain || token as u32 LE)."""
    return hashlib.sha256(chain + int(token).to_bytes(4, "little")).digest()
