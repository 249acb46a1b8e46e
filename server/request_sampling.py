"""The sampling fields of a request, in OpenAI's names and ranges: chat completions and sessions.

One model for both, so a session reconciled with a page and an anchor-only completion take the
same options the same way; `checked` turns them into the `Sampling` every party applies
(server/sampling.py), refusing what the model cannot honour with a message naming the field.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from hpi import constraints
from hpi.errors import InvalidRequest
from hpi.models import LoadedModel
from hpi.protocol import frames
from hpi.sampling import Sampling

MAX_STOPS = 4  # OpenAI's limit
MAX_STOP_CHARS = 64
MAX_LOGIT_BIAS = 300
MAX_SCHEMA_CHARS = 16_384


class JsonSchema(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = Field(None, max_length=1024)
    schema_: dict[str, Any] = Field(default_factory=lambda: {"type": "object"}, alias="schema")
    strict: bool | None = None  # the schema is always enforced: a strict one and a loose one alike


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchema | None = None

    @field_validator("json_schema")
    @classmethod
    def _size(cls, v: JsonSchema | None) -> JsonSchema | None:
        if v is not None and len(str(v.schema_)) > MAX_SCHEMA_CHARS:
            raise ValueError(f"the schema is over {MAX_SCHEMA_CHARS} characters")
        return v

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type json_schema needs a json_schema object")
        return self


Stop = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]


class SamplingFields(BaseModel):
    temperature: frames.Temperature = Field(0.0, description="0 is greedy (the default here)")
    seed: int = Field(0, ge=0, lt=1 << 32, description="Gumbel-max noise seed when temperature > 0")
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    top_k: int = Field(0, ge=0, description="keep the k likeliest tokens; 0 keeps all")
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0, allow_inf_nan=False)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0, allow_inf_nan=False)
    logit_bias: dict[Annotated[str, Field(pattern=r"^[0-9]{1,9}$")],
                     Annotated[float, Field(ge=-100.0, le=100.0, allow_inf_nan=False)]] | None = Field(
        None, max_length=MAX_LOGIT_BIAS, description="token id (as a string) -> bias added to its logit")
    stop: Stop | Annotated[list[Stop], Field(max_length=MAX_STOPS)] | None = None
    response_format: ResponseFormat | None = None

    def given(self) -> bool:
        """Whether the request set any sampling field."""
        return bool(self.model_fields_set & set(SamplingFields.model_fields))

    def checked(self, lm: LoadedModel) -> Sampling:
        """The Sampling these fields ask for, or InvalidRequest naming the field the model cannot honour."""
        vocab = lm.config.vocab_size
        bias = {int(t): b for t, b in (self.logit_bias or {}).items()}
        if any(t >= vocab for t in bias):
            raise InvalidRequest(f"logit_bias: token ids must be below the vocabulary size {vocab}")
        rf = self.response_format.model_dump(by_alias=True, exclude_none=True) if self.response_format else None
        if rf is not None and rf["type"] == "text":
            rf = None
        if rf is not None:
            try:
                constraints.check(lm, rf)
            except constraints.GrammarError as e:
                raise InvalidRequest(str(e)) from None
        return Sampling.of(self.temperature, self.seed, self.top_p, self.top_k, self.presence_penalty,
                           self.frequency_penalty, bias, self.stop, rf)
