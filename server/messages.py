"""A conversation's messages: as a transcript keeps them, and as a request may send them.

A request may send what current OpenAI clients send: content as a list of text parts, and the
`developer` role. Both become the kept shape as they are validated, so everything past the request
(chat templates, transcripts, sessions) sees only `Message`: parts are joined, and `developer` is
`system`, the role chat templates render for a model's instructions (OpenAI's own models treat the
two alike).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator
from pydantic_core import PydanticCustomError

from hpi.config import Settings
from hpi.errors import UNSUPPORTED, quoted


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str


def _text(content: Any) -> Any:
    """A list of text parts as one text; anything else as it came (the field's own validation judges it)."""
    if not isinstance(content, list):
        return content
    texts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text":
            if isinstance(kind, str):  # a part of OpenAI's that the anchor does not read (images, audio, files)
                raise PydanticCustomError(UNSUPPORTED, "content parts of type {kind} are not supported: only text",
                                          {"kind": quoted(kind)})
            raise ValueError('a content part is an object {"type": "text", "text": ...}')
        if set(part) != {"type", "text"} or not isinstance(part["text"], str):
            raise ValueError('a text part is {"type": "text", "text": <string>} and nothing else')
        texts.append(part["text"])
    return "".join(texts)


class RequestMessage(Message):
    """A message as a request sends it; validated into the kept shape."""

    @model_validator(mode="before")
    @classmethod
    def _kept_shape(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        if data.get("role") in ("tool", "function"):  # answers to tool calls, which the anchor never makes
            raise PydanticCustomError(UNSUPPORTED, "messages of role {role} are not supported: there are no tools",
                                      {"role": quoted(data["role"])})
        data = dict(data)
        if data.get("role") == "developer":
            data["role"] = "system"
        if "content" in data:
            data["content"] = _text(data["content"])
        return data


def request_messages(settings: Settings) -> Any:
    """The type of a request's `messages`: 1 to `max_messages` of at most `max_message_chars` each (the text
    parts of one message together)."""
    bounded = create_model("Message", __base__=RequestMessage,
                           content=(str, Field(max_length=settings.max_message_chars)))
    return Annotated[list[bounded], Field(min_length=1, max_length=settings.max_messages)]
