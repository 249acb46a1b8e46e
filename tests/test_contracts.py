"""Contracts shared across languages, each from one source: the sync frames' JSON Schema
(protocol/frames.schema.json, generated from protocol/frames.py) and the WGSL kernels with
their shared prelude (shaders/common.wgsl, shaders/README.md).

The frames both sides put on the wire validate against the schema: the anchor's (through the
app, no browser) and the page's (client_web/sync.js + reconcile.js in headless Chromium),
and the schema refuses what frames.py refuses wherever JSON can tell the difference. Every
kernel compiles in Chromium as client_web/resonator.js assembles it.
"""

from __future__ import annotations

import json
import re
from importlib.resources import files
from pathlib import Path

import jsonschema
import msgpack
import pytest

from hpi import completions
from hpi.protocol import frames, schema
from tests.syncing import send
from tests.test_frames import CASES, DRAFT, HELLO
from tests.test_web_page import PROMPT, Page
from tests.test_web_sync import anchor, context  # noqa: F401  (fixtures)

DOCUMENT = json.loads(schema.PATH.read_text(encoding="utf-8"))


def validator(direction: str) -> jsonschema.Draft202012Validator:
    """Frames of one direction: 'PageFrame' or 'AnchorFrame'."""
    return jsonschema.Draft202012Validator({"$ref": f"#/$defs/{direction}", "$defs": DOCUMENT["$defs"]})


def refusal(direction: str, frame: dict) -> str | None:
    error = jsonschema.exceptions.best_match(validator(direction).iter_errors(frame))
    return None if error is None else f"{error.json_path}: {error.message}"


def test_the_committed_schema_is_the_generated_one():
    assert schema.PATH.read_text(encoding="utf-8") == schema.render(), \
        "protocol/frames.schema.json is stale: run python -m hpi.protocol.schema"


def test_the_schema_is_a_valid_json_schema():
    jsonschema.Draft202012Validator.check_schema(DOCUMENT)
    assert set(DOCUMENT["$defs"]) == {"PageFrame", "AnchorFrame", "Hello", "Draft", "Ready", "Verdict", "Error"}


# JSON has one number and one string type where msgpack has two of each, and no NaN: what
# frames.py refuses for an integer sent as a float (1.0), a str field sent as bin or a NaN,
# the schema cannot see.
MSGPACK_ONLY = {"v_float", "position_float", "seed_float", "token_float", "session_token_bin", "temperature_nan"}


@pytest.mark.parametrize("case", sorted(set(CASES) - MSGPACK_ONLY))
def test_the_schema_refuses_what_frames_py_refuses(case):
    frame, _ = CASES[case]
    assert refusal("PageFrame", schema.as_json(frame)) is not None


@pytest.mark.parametrize("frame", [
    HELLO, DRAFT, {**HELLO, "temperature": 0}, {**HELLO, "temperature": 2}, {**HELLO, "temperature": 1e-3},
    {k: v for k, v in HELLO.items() if k not in ("temperature", "seed")},
    {**DRAFT, "tokens": [2**31 - 1] * frames.MAX_DRAFT},
], ids=["hello", "draft", "greedy", "hottest", "coolest", "defaults", "longest"])
def test_the_schema_accepts_what_frames_py_accepts(frame):
    frames.decode(msgpack.packb(frame, use_bin_type=True))
    assert refusal("PageFrame", schema.as_json(frame)) is None


def test_every_frame_the_anchor_sends_is_in_the_schema(client, tiny):
    messages = [{"role": "user", "content": "Tell me about the reconciliation channel."}]
    s = client.post("/v1/sessions", json={"messages": messages}).json()
    prompt = tiny.chat_ids(messages)
    truth = list(completions.decode(tiny, prompt, 8))
    wrong = (truth[2] + 1) % tiny.config.vocab_size
    url = f"/v1/sessions/{s['session_id']}/sync"
    start = dict(type="hello", token=s["token"], position=len(prompt), chain=frames.GENESIS)
    sent = []
    with client.websocket_connect(url) as ws:
        sent.append(send(ws, **start))
        sent.append(send(ws, type="draft", position=len(prompt), chain=frames.GENESIS, tokens=truth[:2] + [wrong]))
        v = sent[-1]
        sent.append(send(ws, type="draft", position=v["position"], chain=v["chain"], tokens=truth[3:5]))
        sent.append(send(ws, **{**start, "chain": b"\x07" * 32}))  # a chain it does not know: refresh
        sent.append(send(ws, type="draft", position=0, chain=frames.GENESIS, tokens=[]))  # bad_frame
    with client.websocket_connect(url) as ws:
        sent.append(send(ws, **{**start, "token": "wrong"}))  # forbidden
    kinds = [(f["type"], f.get("refresh"), f.get("code")) for f in sent]
    assert kinds == [("ready", False, None), ("correction", None, None), ("ack", None, None),
                     ("ready", True, None), ("error", None, "bad_frame"), ("error", None, "forbidden")]
    for frame in sent:
        assert refusal("AnchorFrame", schema.as_json(frame)) is None, frame


# ---- the page, in headless Chromium -------------------------------------------------------

# The page's own msgpack decoder reads every recorded frame; bin comes back as a Uint8Array,
# which the schema's convention writes as hex.
DECODE = """async (payloads) => {
  const { decode } = await import('/client/msgpack.js');
  const hex = (b) => Array.from(b, (x) => x.toString(16).padStart(2, '0')).join('');
  const json = (v) => v instanceof Uint8Array ? hex(v)
    : Array.isArray(v) ? v.map(json)
    : v && typeof v === 'object' ? Object.fromEntries(Object.entries(v).map(([k, x]) => [k, json(x)]))
    : v;
  return payloads.map((p) => json(decode(new Uint8Array(p))));
}"""

# The page's SyncChannel with a token the anchor refuses: it reads the `error` frame.
FORBIDDEN = """async () => {
  const { SyncChannel } = await import('/client/sync.js');
  const s = window.hpi.conv.session;
  try { await SyncChannel.open(s.id, 'wrong', { position: 0 }); } catch { return true; }
  return false;
}"""


@pytest.mark.browser
def test_every_frame_the_page_sends_and_receives_is_in_the_schema(context, anchor):  # noqa: F811
    p = Page(context, anchor.url, "?sync=4&drift=1")
    wire: list[tuple[str, bytes]] = []

    def record(ws):
        ws.on("framesent", lambda payload: wire.append(("PageFrame", payload)))
        ws.on("framereceived", lambda payload: wire.append(("AnchorFrame", payload)))

    p.page.on("websocket", record)
    p.open()
    p.page.fill("#temperature", "0.8")
    p.ask(PROMPT, 12)  # drift: every pass has a wrong draft, a correction
    p.query = "?sync=1"
    p.open()
    # Greedy from here, in a chat of its own: a sampled answer (a seed of the page's choosing)
    # may end its turn at any token, and then there is nothing to continue.
    p.page.click("#new")
    p.page.fill("#temperature", "0")
    p.ask(PROMPT, 6)  # one draft a pass, kept as often as not: acks
    p.page.evaluate("() => { window.hpi.conv.sync.chain = new Uint8Array(32).fill(7); }")
    p.more(4)  # a chain the anchor does not know: a ready frame with refresh
    assert p.page.evaluate(FORBIDDEN)
    assert not p.errors, p.errors

    assert all(isinstance(payload, bytes) for _, payload in wire), "frames are binary"
    decoded = p.page.evaluate(DECODE, [list(payload) for _, payload in wire])
    seen = set()
    for (direction, payload), frame in zip(wire, decoded):
        assert frame == schema.as_json(msgpack.unpackb(payload, raw=False)), "msgpack.js and msgpack disagree"
        assert refusal(direction, frame) is None, (direction, frame)
        seen.add((direction, frame["type"], frame.get("refresh")))
    assert seen >= {("PageFrame", "hello", None), ("PageFrame", "draft", None), ("AnchorFrame", "ready", False),
                    ("AnchorFrame", "ready", True), ("AnchorFrame", "ack", None),
                    ("AnchorFrame", "correction", None), ("AnchorFrame", "error", None)}, seen


# ---- WGSL ---------------------------------------------------------------------------------

SHADERS = Path(str(files("hpi.shaders")))
SCHEMES = ("q4_1", "q8_0")  # weight schemes, prepended to the kernels that read weights
WEIGHTED = ("embed", "gemv", "gemv_wg")


# A struct that several kernels use is in common.wgsl; a kernel's own structs are named for it,
# so no two files declare one name.
def test_each_wgsl_struct_is_declared_in_one_file():
    declared: dict[str, list[str]] = {}
    for path in sorted(SHADERS.glob("*.wgsl")):
        for name in re.findall(r"^struct (\w+)", path.read_text(encoding="utf-8"), re.M):
            declared.setdefault(name, []).append(path.name)
    assert {n: where for n, where in declared.items() if len(where) > 1} == {}


# Each kernel as resonator.js compiles it; bindingSlots refuses a slot declared twice (a kernel
# over its weight scheme's slots).
COMPILE = """async (variants) => {
  const { Resonator, bindingSlots } = await import('/client/resonator.js');
  const r = await Resonator.create();
  const errors = [];
  for (const [kernel, scheme] of variants) {
    const code = r.source(kernel, scheme);
    bindingSlots(code, kernel);
    const info = await r.device.createShaderModule({ code, label: kernel }).getCompilationInfo();
    errors.push(info.messages.filter((m) => m.type === 'error').map((m) => `${m.lineNum}:${m.linePos} ${m.message}`));
  }
  r.destroy();
  return { loaded: Object.keys(r.sources), errors };
}"""


@pytest.mark.browser
def test_every_kernel_compiles_with_the_shared_prelude(browser, tiny_server):
    files_ = sorted(p.stem for p in SHADERS.glob("*.wgsl"))
    kernels = [k for k in files_ if k not in ("common", *SCHEMES)]
    variants = [(k, s) for k in kernels for s in (SCHEMES if k in WEIGHTED else (None,))]
    page = browser.new_page()
    try:
        page.goto(f"{tiny_server[0]}/client/README.md")  # the module resolves shaders/ next to itself
        out = page.evaluate(COMPILE, variants)
    finally:
        page.close()
    assert sorted(out["loaded"]) == files_
    assert dict(zip(variants, out["errors"])) == {v: [] for v in variants}
