"""A conversation's messages: as a transcript keeps them, and as a request may send them."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model

from hpi.config import Settings


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str


def request_messages(settings: Settings) -> Any:
    """The type of a request's `messages`: 1 to `max_messages` of at most `max_message_chars` each."""
    bounded = create_model("Message", __base__=Message, content=(str, Field(max_length=settings.max_message_chars)))
    return Annotated[list[bounded], Field(min_length=1, max_length=settings.max_messages)]
