"""Frames of the reconciliation channel (`/v1/sessions/{id}/sync`): msgpack maps, validated here.

Layout, meaning and the chain hash: protocol/SPEC.md, "Reconciliation frames". Every frame
carries `v` (the frame version) and `type`; a frame that is too large, not msgpack, not a
map, of another version, of an unknown type or with a bad field is refused with a
FrameError, whose message (naming the field) goes back to the page in an `error` frame.

Frames from the page are validated strictly: no coercion between types. Integers are
msgpack integers (never booleans, floats or strings), bytes are msgpack `bin` (never `str`),
`temperature` is a number (an integer or a float, never a boolean), and unknown keys are
refused. Frames the anchor builds itself (`Ready`, `Verdict`, `Error`) are not checked
strictly.
"""

from __future__ import annotations

import hashlib
from typing import Annotated, Any, Literal, Union

import msgpack
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

VERSION = 1
# The websocket subprotocol a page may offer for the channel. A page that sends an API key as the
# subprotocol `api-key.<key>` offers it beside this one, and a browser fails the handshake unless
# the anchor accepts one of those it offered, whether or not the anchor asks for keys.
SUBPROTOCOL = "hpi"
MAX_FRAME_BYTES = 64 * 1024  # the largest message of the channel, in bytes (SPEC: 64 KiB)
MAX_DRAFT = 256  # drafted tokens per draft frame
MAX_TOKEN_ID = 1 << 31  # token ids are below this (and below the model's vocabulary size)
MAX_SESSION_TOKEN = 256  # characters of the session token in a hello
MAX_LISTED = 8  # defects one error message names; the others are only counted
GENESIS = b"\x00" * 32


class FrameError(ValueError):
    pass


class _Frame(BaseModel):
    model_config = ConfigDict(extra="forbid")
    v: Literal[1]

    @field_validator("v", mode="before")
    @classmethod
    def _version(cls, v: Any) -> Any:
        # Literal[1] alone takes True and 1.0, which equal 1 in Python.
        if type(v) is not int or v != VERSION:
            raise ValueError(f"the frame version must be the integer {VERSION}")
        return v


class _PageFrame(_Frame):
    """A frame from the page: every field has exactly its msgpack type."""
    model_config = ConfigDict(extra="forbid", strict=True)


Token = Annotated[int, Field(ge=0, lt=MAX_TOKEN_ID)]
Chain = Annotated[bytes, Field(min_length=32, max_length=32)]
MIN_TEMPERATURE = 1e-3  # below it scores / temperature overflow float32 and sampling stops meaning the scores


def _sampling_temperature(t: float) -> float:
    if 0 < t < MIN_TEMPERATURE:
        raise ValueError(f"a temperature is 0 (greedy) or at least {MIN_TEMPERATURE}")
    return t


# The sampling temperature of every API that takes one (sync hello, chat completions, forks).
# The JSON Schemas (OpenAPI, protocol/frames.schema.json) state _sampling_temperature's rule too.
Temperature = Annotated[float, Field(ge=0.0, le=2.0, allow_inf_nan=False,
                                     json_schema_extra={"anyOf": [{"const": 0}, {"minimum": MIN_TEMPERATURE}]}),
                        AfterValidator(_sampling_temperature)]


class Hello(_PageFrame):
    """Page -> anchor, first: who it is, what it has confirmed, and the sampling of the session."""
    type: Literal["hello"]
    token: str = Field(max_length=MAX_SESSION_TOKEN)
    position: int = Field(ge=0)  # tokens of the conversation the page holds as confirmed
    chain: Chain  # chain hash at that position
    temperature: Temperature = 0.0
    seed: int = Field(0, ge=0, lt=1 << 32)


class Draft(_PageFrame):
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
    """Parse one frame from the page; any defect raises FrameError naming it (and the field)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise FrameError("frames are binary msgpack")
    if len(data) > MAX_FRAME_BYTES:
        raise FrameError(f"frame of {len(data)} bytes; the limit is {MAX_FRAME_BYTES}")
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception:  # msgpack raises several unrelated types, whose text is not the page's business
        raise FrameError("not a msgpack frame") from None
    if not isinstance(obj, dict):
        raise FrameError(f"a frame is a msgpack map, not {_type_name(obj)}")
    v = obj.get("v")
    if type(v) is not int or v != VERSION:
        raise FrameError(f"v: frame version {v!r:.40} ({_type_name(v)}); this anchor speaks version "
                         f"{VERSION}, the integer")
    try:
        return _client.validate_python(obj)
    except ValidationError as e:
        raise FrameError(_summary(e.errors(include_url=False))) from None
    except Exception:  # never let a validator's own exception escape as something else, nor its text
        raise FrameError("bad frame") from None


def _type_name(value: Any) -> str:
    names = {bool: "boolean", int: "integer", float: "float", str: "string (msgpack str)",
             bytes: "bytes (msgpack bin)", list: "array", dict: "map", type(None): "nil"}
    return names.get(type(value), type(value).__name__)


def _summary(errors: list[dict]) -> str:
    """The first MAX_LISTED defects and the count of the rest. Keys and values are the page's: a
    64 KiB frame of thousands of unknown keys, or of one long key, must not make an error frame
    larger than itself."""
    listed = "; ".join(_describe(x) for x in errors[:MAX_LISTED])
    return listed + (f"; and {len(errors) - MAX_LISTED} more" if len(errors) > MAX_LISTED else "")


def _describe(error: dict) -> str:
    """`field: what is wrong (got <type>)`, the field path without the frame's type tag."""
    kind = error["type"]
    if kind == "union_tag_not_found":
        return "type: missing (a page sends 'hello' or 'draft')"
    if kind == "union_tag_invalid":
        return f"type: unknown frame type '{error['ctx']['tag']:.40}' (a page sends 'hello' or 'draft')"
    loc = list(error["loc"])
    if loc and loc[0] in ("hello", "draft"):
        loc = loc[1:]
    where = ".".join(f"{part!s:.40}" for part in loc) or "frame"
    got = "" if kind in ("missing", "extra_forbidden") else f" (got {_type_name(error['input'])})"
    return f"{where}: {error['msg']}{got}"


def encode(frame: BaseModel) -> bytes:
    return msgpack.packb(frame.model_dump(), use_bin_type=True)


def chain_next(chain: bytes, token: int) -> bytes:
    """The chain hash after one more confirmed token: SHA-256(chain || token as u32 LE)."""
    return hashlib.sha256(chain + int(token).to_bytes(4, "little")).digest()
