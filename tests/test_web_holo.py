"""client_web/holo.js in headless Chromium: the shared vectors, parity with protocol/holo.py
on corrupted files, and a real conversation hologram from the anchor."""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import struct
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest

from hpi.protocol import make_vectors as mv
from hpi.protocol.holo import (
    CHECKSUM_LEN, HEADER, Holo, HoloError, content_hash, load_hologram, save_hologram,
)

pytestmark = pytest.mark.browser

VECTORS = Path(mv.__file__).parent / "vectors"
INDEX = json.loads((VECTORS / "index.json").read_text())
SPEC = (Path(mv.__file__).parent / "SPEC.md").read_text()
PHRASES = [line.split("`")[-2] for line in SPEC.split("## Reader obligations")[1].split("\n## ")[0].splitlines()
           if line.startswith("| ") and line.endswith("` |")]
ARRAYS = {"f32": "Float32Array", "f16": "Uint16Array", "i8": "Int8Array", "u8": "Uint8Array",
          "i16": "Int16Array", "u16": "Uint16Array", "i32": "Int32Array", "u32": "Uint32Array"}
TEST_FILES = "/__holo_test__/"  # answered by page.route only: the app has no such endpoint

# Loads each source ({url, headers} or {b64}) with loadHologram and describes the result in
# plain JSON: metadata as JSON text (exact even for lone surrogates), tensors with their
# typed array class, where they sit in the input buffer (null: not a view of it), and
# either their values and bytes or, with `digest`, SHA-256 of their bytes (and of f16ToF32).
LOAD = """async ({sources, options, digest}) => {
  const holo = await import('/client/holo.js');
  const hex = (b) => Array.from(b, (x) => x.toString(16).padStart(2, '0')).join('');
  const bytesOf = (a) => new Uint8Array(a.buffer, a.byteOffset, a.byteLength);
  const sha = async (a) => hex(new Uint8Array(await crypto.subtle.digest('SHA-256', bytesOf(a))));
  const results = [];
  for (const src of sources) {
    const buf = src.url ? await (await fetch(src.url, {headers: src.headers || {}})).arrayBuffer()
                        : Uint8Array.from(atob(src.b64), (c) => c.charCodeAt(0)).buffer;
    // misalign: the same bytes as a view at an odd offset of a bigger buffer.
    const input = src.misalign ? new Uint8Array(buf.byteLength + 1) : new Uint8Array(buf);
    if (src.misalign) input.set(new Uint8Array(buf), 1);
    const bytes = src.misalign ? input.subarray(1) : input;
    let h;
    try {
      h = await holo.loadHologram(src.misalign ? bytes : buf, options || {});
    } catch (e) {
      results.push({error: String(e.message), name: e.name, isHoloError: e instanceof holo.HoloError});
      continue;
    }
    const tensors = [];
    for (const [name, t] of Object.entries(h.tensors)) {
      const f16 = t.dtype === 'f16';
      const d = {name, dtype: t.dtype, shape: t.shape, array: t.data.constructor.name,
                 offset: t.data.buffer === buf ? t.data.byteOffset : null};
      if (digest) Object.assign(d, {sha: await sha(t.data), f32sha: f16 ? await sha(holo.f16ToF32(t.data)) : null});
      else Object.assign(d, {hex: hex(bytesOf(t.data)), values: Array.from(f16 ? holo.f16ToF32(t.data) : t.data),
                             bits: f16 ? Array.from(t.data) : null});
      tensors.push(d);
    }
    results.push({kind: h.kind, version: h.version, meta: JSON.stringify(h.meta), tensors,
                  hash: await holo.contentHash(bytes)});
  }
  return results;
}"""


def serve_vectors(page) -> None:
    def handle(route):
        path = VECTORS / route.request.url.split(TEST_FILES, 1)[1]
        route.fulfill(body=path.read_bytes(), content_type="application/octet-stream")
    page.route(f"**{TEST_FILES}*", handle)


def load_js(page, files: list[bytes], digest: bool = False, **options) -> list[dict]:
    sources = [{"b64": base64.b64encode(f).decode()} for f in files]
    return page.evaluate(LOAD, {"sources": sources, "options": options, "digest": digest})


def phrase(message: str) -> str:
    """The SPEC phrase a reader's message carries (the longest, as one can contain another)."""
    return max((p for p in PHRASES if p in message), key=len, default=message)


def python_result(data: bytes, **kw) -> Holo | str:
    try:
        return load_hologram(data, **kw)
    except HoloError as e:
        return phrase(str(e))


def doubles(value):
    """JSON value with every number as a double: JS parses integers beyond 2^53 inexactly."""
    if isinstance(value, dict):
        return {k: doubles(v) for k, v in value.items()}
    if isinstance(value, list):
        return [doubles(v) for v in value]
    return float(value) if isinstance(value, int) and not isinstance(value, bool) else value


def assert_same_as_python(js: dict, data: bytes, **kw) -> None:
    """A JS result (error or hologram) agrees with Python's load_hologram on the same bytes."""
    want = python_result(data, **kw)
    if isinstance(want, str):
        assert "error" in js and js["isHoloError"], (want, js)
        assert phrase(js["error"]) == want, js["error"]
        return
    assert "error" not in js, (js["error"], want)
    assert (js["kind"], doubles(json.loads(js["meta"]))) == (want.kind, doubles(want.meta))
    assert [t["name"] for t in js["tensors"]] == list(want.tensors)
    for t in js["tensors"]:
        arr = want.tensors[t["name"]]
        assert (t["dtype"], t["shape"]) == (mv.DTYPE_NAMES[mv.dtype_code(arr)], list(arr.shape))
        assert t["hex"] == arr.tobytes().hex()


@pytest.mark.parametrize("name", INDEX["valid"])
def test_valid_vector(page, name):
    serve_vectors(page)
    want = json.loads((VECTORS / f"{name}.json").read_text("utf-8"))
    data = (VECTORS / f"{name}.holo").read_bytes()
    [got] = page.evaluate(LOAD, {"sources": [{"url": f"{TEST_FILES}{name}.holo"}], "digest": False})
    assert "error" not in got, got
    assert (got["kind"], got["version"], json.loads(got["meta"])) == (want["kind"], 1, want["meta"])
    assert got["hash"] == want["sha256"] == content_hash(data)
    assert [t["name"] for t in got["tensors"]] == [t["name"] for t in want["tensors"]]
    fields = {label: value for _, _, label, _, value in mv.layout(data)}
    py = load_hologram(data).tensors
    for i, (g, w) in enumerate(zip(got["tensors"], want["tensors"])):
        assert (g["dtype"], g["shape"], g["array"]) == (w["dtype"], w["shape"], ARRAYS[w["dtype"]])
        assert g["values"] == w["values"] and g["bits"] == w.get("bits")
        assert g["hex"] == py[w["name"]].tobytes().hex()
        # Raw payloads are views of the fetched buffer at their file offset; inflated ones are not.
        assert g["offset"] == (None if w["flags"] else fields[f"t{i}.offset"])


@pytest.mark.parametrize("name", INDEX["invalid"])
def test_invalid_vector(page, name):
    serve_vectors(page)
    want = json.loads((VECTORS / f"{name}.json").read_text("utf-8"))
    [got] = page.evaluate(LOAD, {"sources": [{"url": f"{TEST_FILES}{name}.holo"}], "digest": False})
    assert got.get("isHoloError") and got["name"] == "HoloError", got
    assert want["error"] in got["error"]
    assert phrase(got["error"]) == python_result((VECTORS / f"{name}.holo").read_bytes())


def reseal(data: bytes) -> bytes:
    """Make file_len and the checksum agree with `data`, so a reader gets to the change."""
    if len(data) < HEADER.size + CHECKSUM_LEN:
        return data
    return mv.reseal(data[:24] + struct.pack("<Q", len(data)) + data[32:])


def deflated(values: np.ndarray, name: str = "z") -> tuple[bytes, int, bytes]:
    """A file with one deflated tensor: (file, payload offset, zlib stream)."""
    data = save_hologram(Holo("conversation", {}, {name: values}), {name})
    stream = zlib.compress(values.tobytes(), 9)
    return data, data.index(stream), stream


def with_stream(data: bytes, at: int, old: bytes, new: bytes) -> bytes:
    """`data` with the payload `old` at `at` replaced by `new` (which must fit its slot)."""
    body = data[:at] + new + bytes(max(len(old) - len(new), 0)) + data[at + max(len(old), len(new)):]
    entry = body.index(struct.pack("<QQ", at, len(old)))
    return reseal(body[:entry] + struct.pack("<QQ", at, len(new)) + body[entry + 16:])


@functools.cache
def deflate_cases() -> dict[str, tuple[bytes, dict]]:
    """Files whose deflate payloads exercise each verdict, with loadHologram options."""
    small, at, stream = deflated(np.arange(64, dtype="u1"))
    noise = np.random.default_rng(0).integers(0, 256, 40_000, dtype=np.uint8)  # ~40 kB of stream
    big, big_at, big_stream = deflated(noise)
    corrupt = bytearray(big_stream)
    corrupt[30_000] ^= 0xFF  # past the first 16 KiB chunk: the byte-by-byte replay finds it
    bomb = reseal(mv.put(deflated(np.zeros(16 << 20, "u1"))[0], "t0.shape[0]", 0))
    three = save_hologram(Holo("conversation", {}, {n: np.zeros(40, "u1") for n in "abc"}), {"a", "b"})
    huge = save_hologram(Holo("conversation", {}, {"q": np.ones((1,) * 8, "<u4")}), {"q"})
    for d in range(8):
        huge = mv.put(huge, f"t0.shape[{d}]", 2**31 - 1)
    shorter = reseal(mv.put(big, "t0.shape[0]", len(noise) - 1))  # output goes past the shape
    return {
        "bytes_after_stream": (with_stream(small, at, stream, stream + b"\0"), {}),
        "stream_cut_short": (with_stream(small, at, stream, stream[:-3]), {}),
        "empty_stream": (with_stream(small, at, stream, b""), {}),
        "bad_adler": (with_stream(small, at, stream, stream[:-1] + bytes([stream[-1] ^ 1])), {}),
        "corrupt_late": (with_stream(big, big_at, big_stream, bytes(corrupt)), {}),
        "bytes_after_long_stream": (with_stream(big, big_at, big_stream, big_stream + b"\1\2"), {}),
        "output_past_shape": (shorter, {}),
        "zip_bomb_in_empty_tensor": (bomb, {"maxInflate": 1024}),
        "limit_counts_all_tensors_ok": (three, {"maxInflate": 80}),
        "limit_counts_all_tensors": (three, {"maxInflate": 79}),
        "huge_shape_product": (reseal(huge), {}),
        "long_stream_ok": (big, {}),
    }


@pytest.mark.parametrize("case", list(deflate_cases()))
def test_deflate_verdicts_match_python(page, case):
    data, options = deflate_cases()[case]
    [got] = load_js(page, [data], **options)
    assert_same_as_python(got, data, **({"max_inflate": options["maxInflate"]} if options else {}))


def with_shape(shape: list[int], dtype: str, deflate: bool) -> bytes:
    """A one-tensor file whose shape is then set to `shape`; a raw payload gets nbytes 0."""
    data = save_hologram(Holo("conversation", {}, {"t": np.zeros((1,) * len(shape), dtype)}),
                         {"t"} if deflate else set())
    for d, value in enumerate(shape):
        data = mv.put(data, f"t0.shape[{d}]", value)
    return reseal(data if deflate else mv.put(data, "t0.nbytes", 0))


def test_shape_extent_limit_matches_python(page):
    """Empty tensors whose other dimensions multiply past MAX_TENSOR_BYTES (2^40) are refused,
    those at the limit load: the same verdicts as Python's, for raw and deflated payloads."""
    big = 2**31 - 1
    shapes = [([big] * 7 + [0], "u1"), ([0] + [big] * 7, "u1"), ([big, 0, big], "<f2"),
              ([0, 65536, 65536, 65536, 65536], "u1"), ([0, (1 << 20) + 1, 1 << 20], "u1"),
              ([0, 1 << 20, (1 << 18) + 1], "<f4"), ([0, 1 << 20, 1 << 20], "u1"),
              ([1 << 20, 0, 1 << 18], "<f4"), ([0, big], "<u2"), ([big] * 8, "<u4")]
    files = [with_shape(shape, dtype, deflate) for shape, dtype in shapes for deflate in (False, True)]
    results = load_js(page, files)
    for data, got in zip(files, results, strict=True):
        assert_same_as_python(got, data)
    verdicts = [got.get("error") and phrase(got["error"]) for got in results]
    # At the limit a raw empty tensor loads; a deflated one holds a stream of 1 byte, not 0.
    assert verdicts == ["absurd shape"] * 12 + [None, "does not inflate to"] * 3 + ["absurd shape"] * 2


def stopped_at_cap(seed: bytes, data: bytes, pos: int) -> bool:
    """Whether Python's capped inflate stopped before the corruption the browser saw.

    `data` is `seed` with byte `pos` changed. Python inflates at most the raw size and so
    never reads past it; the browser's zlib inflates ahead and finds the bad bytes. This
    holds when `pos` is in a deflated payload that is no zlib stream, yet whose first
    raw-size bytes inflate without error.
    """
    rows = {label: (off, size, value) for off, size, label, _, value in mv.layout(seed)}
    for i, arr in enumerate(load_hologram(seed).tensors.values()):
        off, size, _ = rows[f"t{i}.payload"]
        if rows[f"t{i}.flags"][2] and off <= pos < off + size:
            stream = data[off:off + size]
            with pytest.raises(zlib.error):
                zlib.decompress(stream)
            return len(zlib.decompressobj().decompress(stream, arr.nbytes)) == arr.nbytes
    return False


def test_every_single_byte_change_matches_python(page):
    """Each byte of each valid vector's body set to 0 and 0xFF, resealed: same verdict as Python."""
    cases = []
    for name in INDEX["valid"]:
        seed = (VECTORS / f"{name}.holo").read_bytes()
        cases += [(seed, pos, reseal(seed[:pos] + bytes([value]) + seed[pos + 1:]))
                  for pos in range(len(seed) - CHECKSUM_LEN) for value in (0, 0xFF) if seed[pos] != value]
    results = load_js(page, [data for _, _, data in cases])
    stopped = 0
    for (seed, pos, data), got in zip(cases, results, strict=True):
        # The one way the readers part: both reject a corrupt stream, Python by its size.
        if (phrase(got.get("error", "")), python_result(data)) == ("bad deflate stream", "does not inflate to"):
            assert stopped_at_cap(seed, data, pos), got
            stopped += 1
            continue
        assert_same_as_python(got, data)
    assert stopped <= 2
    assert len({r.get("error") and phrase(r["error"]) for r in results}) >= 15


def test_metadata_and_names_js_could_misread(page):
    meta_files = [reseal(mv.put_bytes(save_hologram(Holo("conversation", {"x": 1}, {})), 32, m))
                  for m in (b'{"x":N}', b'{"x":I}')]  # NaN / Infinity are not JSON
    names = {"__proto__": np.arange(2, dtype="u1"), "constructor": np.arange(3, dtype="<i2"),
             "toString": np.zeros(0, "<f4")}
    odd = save_hologram(Holo("captured_state", {"__proto__": {"polluted": True}}, names))
    results = load_js(page, meta_files + [odd])
    for data, got in zip(meta_files + [odd], results):
        assert_same_as_python(got, data)
    assert json.loads(results[-1]["meta"]) == {"__proto__": {"polluted": True}}
    assert page.evaluate("({}).polluted") is None


def test_misaligned_input_view_is_copied_and_still_loads(page):
    data = (VECTORS / "all_dtypes.holo").read_bytes()
    [got] = page.evaluate(LOAD, {"sources": [{"b64": base64.b64encode(data).decode(), "misalign": True}],
                                 "digest": False})
    assert_same_as_python(got, data)
    assert got["hash"] == content_hash(data)


def test_bad_arguments_are_type_errors(page):
    got = page.evaluate("""async () => {
      const {loadHologram, HoloError} = await import('/client/holo.js');
      try { await loadHologram('not bytes'); } catch (e) { return [e.name, e instanceof HoloError]; }
    }""")
    assert got == ["TypeError", False]


def test_content_hash_matches_python(page):
    files = [(VECTORS / f"{n}.holo").read_bytes() for n in ("tiny", "deflate")] + [b"", b"abc" * 1000]
    got = page.evaluate("""async (b64s) => {
      const {contentHash} = await import('/client/holo.js');
      const bytes = b64s.map((s) => Uint8Array.from(atob(s), (c) => c.charCodeAt(0)));
      return [...await Promise.all(bytes.map(contentHash)), await contentHash(bytes[0].buffer)];
    }""", [base64.b64encode(f).decode() for f in files])
    want = [content_hash(f) for f in files]
    assert got == want + want[:1]
    assert want[2] == hashlib.sha256(b"").hexdigest()


def test_f16_to_f32_is_exact_for_every_bit_pattern(page):
    got = page.evaluate("""async () => {
      const {f16ToF32} = await import('/client/holo.js');
      const f = f16ToF32(Uint16Array.from({length: 65536}, (_, i) => i));
      return Array.from(new Uint8Array(f.buffer), (x) => x.toString(16).padStart(2, '0')).join('');
    }""")
    want = np.arange(65536, dtype="<u2").view("<f2").astype("<f4")
    got = np.frombuffer(bytes.fromhex(got), "<f4")
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(got), nan)
    assert np.array_equal(got[~nan].view("<u4"), want[~nan].view("<u4"))


def assert_digests_match(got: dict, data: bytes) -> None:
    """A digest-mode JS result has the tensors (names, dtypes, shapes, bytes) Python reads."""
    want = load_hologram(data)
    assert "error" not in got, got
    assert got["hash"] == content_hash(data)
    assert (got["kind"], json.loads(got["meta"])) == (want.kind, want.meta)
    assert [t["name"] for t in got["tensors"]] == list(want.tensors)
    for t in got["tensors"]:
        arr = want.tensors[t["name"]]
        assert (t["dtype"], t["shape"]) == (mv.DTYPE_NAMES[mv.dtype_code(arr)], list(arr.shape))
        assert t["sha"] == hashlib.sha256(arr.tobytes()).hexdigest(), t["name"]
        if t["dtype"] == "f16":
            assert t["f32sha"] == hashlib.sha256(arr.astype("<f4").tobytes()).hexdigest(), t["name"]


def test_anchor_hologram_loads_like_python(page, tiny_server):
    base, _ = tiny_server
    messages = [{"role": "user", "content": "What does the anchor keep, and what does the page rebuild?"}]
    created = httpx.post(f"{base}/v1/sessions", json={"messages": messages}).raise_for_status().json()
    headers = {"Authorization": f"Bearer {created['token']}"}
    r = httpx.get(base + created["hologram_url"], headers=headers).raise_for_status()
    [got] = page.evaluate(LOAD, {"sources": [{"url": created["hologram_url"], "headers": headers}], "digest": True})
    assert_digests_match(got, r.content)
    assert got["kind"] == "conversation" and got["hash"] == r.headers["etag"].strip('"')
    assert any(t["offset"] is None for t in got["tensors"])  # the codes are deflated


def test_anchor_model_pack_loads_like_python(page, tiny_server):
    _, anchor = tiny_server
    url = f"/v1/models/{anchor.model_key}/pack"
    [got] = page.evaluate(LOAD, {"sources": [{"url": url}], "digest": True})
    assert_digests_match(got, anchor.pack_bytes)
    assert got["kind"] == "model_pack" and got["hash"] == anchor.pack_hash
    assert all(t["offset"] is not None for t in got["tensors"])  # all views: uploaded without a copy
