"""The JSON Schema of the reconciliation frames, generated from protocol/frames.py.

`python -m hpi.protocol.schema` rewrites protocol/frames.schema.json; tests/test_contracts.py
fails while the committed file differs from what this generates, and validates the frames
both the page (client_web/sync.js) and the anchor put on the wire against it.

A frame is a msgpack map, which JSON Schema describes once one convention is fixed: a msgpack
`bin` is written as its bytes in lowercase hex (`contentEncoding: base16`), so the schema's
string lengths are twice the byte lengths and pin them exactly. `as_json` applies it.

Page frames are described as the anchor accepts them (validation: `temperature` and `seed`
may be left out); anchor frames as it writes them (serialization: every field is present).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Union

from pydantic import Field, TypeAdapter
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaValue
from pydantic_core import core_schema

from hpi.protocol import frames

PATH = Path(__file__).with_name("frames.schema.json")
AnchorFrame = Annotated[Union[frames.Ready, frames.Verdict, frames.Error], Field(discriminator="type")]
HEX_BYTES = "^([0-9a-f]{2})*$"


class _FrameSchema(GenerateJsonSchema):
    def bytes_schema(self, schema: core_schema.BytesSchema) -> JsonSchemaValue:
        out: JsonSchemaValue = {"type": "string", "contentEncoding": "base16", "pattern": HEX_BYTES}
        if "min_length" in schema:
            out["minLength"] = 2 * schema["min_length"]
        if "max_length" in schema:
            out["maxLength"] = 2 * schema["max_length"]
        return out

    def field_is_required(self, field, total: bool) -> bool:
        # frames.encode dumps every field, defaults included.
        return self.mode == "serialization" or super().field_is_required(field, total)

    def field_title_should_be_set(self, schema) -> bool:
        return False  # "title": "Position" next to "position" says nothing


def _direction(frame_type: Any, mode: str) -> tuple[JsonSchemaValue, dict]:
    """The union's own schema (oneOf + discriminator) and the definitions it refers to."""
    schema = TypeAdapter(frame_type).json_schema(schema_generator=_FrameSchema, mode=mode)
    return schema, schema.pop("$defs")


def generate() -> dict:
    page, page_defs = _direction(frames.ClientFrame, "validation")
    anchor, anchor_defs = _direction(AnchorFrame, "serialization")
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": f"HPI reconciliation frames, version {frames.VERSION}",
        "description": (
            "Frames of /v1/sessions/{id}/sync (protocol/SPEC.md, 'Reconciliation frames'), generated from "
            "protocol/frames.py by `python -m hpi.protocol.schema`: edit frames.py, not this file. Each frame "
            "is a msgpack map of at most " f"{frames.MAX_FRAME_BYTES} bytes; a msgpack bin is given here as "
            "lowercase hex. #/$defs/PageFrame: page -> anchor; #/$defs/AnchorFrame: anchor -> page."),
        "oneOf": [{"$ref": "#/$defs/PageFrame"}, {"$ref": "#/$defs/AnchorFrame"}],
        "$defs": {"PageFrame": page, "AnchorFrame": anchor, **page_defs, **anchor_defs},
    }


def render() -> str:
    return json.dumps(generate(), indent=2, ensure_ascii=False) + "\n"


def as_json(value: Any) -> Any:
    """A decoded frame as the schema describes it: bytes (msgpack bin) as lowercase hex."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).hex()
    if isinstance(value, dict):
        return {k: as_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [as_json(v) for v in value]
    return value


if __name__ == "__main__":
    PATH.write_text(render(), encoding="utf-8")
    print(f"wrote {PATH}")
