"""Write the shared `.holo` test vectors to protocol/vectors/ (format: protocol/SPEC.md).

Both readers (Python `load_hologram`, JS `loadHologram`) must pass these files, so the
expected results are written next to each file as JSON, derived from the source arrays
rather than from a reader. Output is deterministic: the tests regenerate the vectors and
compare them byte for byte with the committed ones.

    python -m hpi.protocol.make_vectors             # rewrite protocol/vectors/
    python -m hpi.protocol.make_vectors --example   # print the worked example for SPEC.md
"""

from __future__ import annotations

import argparse
import hashlib
import json
import struct
import sys
from pathlib import Path

import numpy as np

from hpi.protocol.holo import (
    CHECKSUM_LEN, DEFAULT_MAX_INFLATE, DTYPE_CODES, ENTRY_HEAD, HEADER, MAX_DIM, MAX_META,
    MAX_TENSOR_BYTES, MAX_TENSORS, KIND_NAMES, Holo, HoloError, load_hologram, save_hologram,
)

VECTOR_DIR = Path(__file__).parent / "vectors"
DTYPE_NAMES = {0: "f32", 1: "f16", 2: "i8", 3: "u8", 4: "i16", 5: "u16", 6: "i32", 7: "u32"}
HEADER_FIELDS = [  # name, struct format, offset
    ("magic", "8s", 0), ("version", "<H", 8), ("kind", "<H", 10), ("meta_len", "<I", 12),
    ("n_tensors", "<I", 16), ("dir_len", "<I", 20), ("file_len", "<Q", 24),
]


def dtype_code(arr: np.ndarray) -> int:
    return DTYPE_CODES[arr.dtype.newbyteorder("<") if arr.dtype.byteorder == ">" else arr.dtype]


def layout(data: bytes) -> list[tuple[int, int, str, str, object]]:
    """(offset, size, label, struct format or '', value) for every field of a file we wrote.

    Trusts the input: it only walks files produced by save_hologram, to name the bytes
    that the invalid vectors corrupt and that the worked example annotates.
    """
    rows = [(off, struct.calcsize(fmt), name, fmt, struct.unpack_from(fmt, data, off)[0])
            for name, fmt, off in HEADER_FIELDS]
    _, _, _, meta_len, n_tensors, _, file_len = HEADER.unpack_from(data)
    rows.append((HEADER.size, meta_len, "metadata", "", bytes(data[HEADER.size:HEADER.size + meta_len])))
    pos, payloads = HEADER.size + meta_len, []
    for i in range(n_tensors):
        (name_len,) = ENTRY_HEAD.unpack_from(data, pos)
        rows.append((pos, 2, f"t{i}.name_len", "<H", name_len))
        rows.append((pos + 2, name_len, f"t{i}.name", "", bytes(data[pos + 2:pos + 2 + name_len])))
        pos += 2 + name_len
        for j, field in enumerate(("dtype", "ndim", "flags", "reserved")):
            rows.append((pos + j, 1, f"t{i}.{field}", "B", data[pos + j]))
        ndim = data[pos + 1]
        pos += 4
        for d in range(ndim):
            rows.append((pos, 4, f"t{i}.shape[{d}]", "<I", struct.unpack_from("<I", data, pos)[0]))
            pos += 4
        offset, nbytes = struct.unpack_from("<QQ", data, pos)
        rows.append((pos, 8, f"t{i}.offset", "<Q", offset))
        rows.append((pos + 8, 8, f"t{i}.nbytes", "<Q", nbytes))
        pos += 16
        payloads.append((offset, nbytes, f"t{i}.payload"))
    for offset, nbytes, label in payloads:
        if offset > pos:
            rows.append((pos, offset - pos, "padding", "", bytes(data[pos:offset])))
        rows.append((offset, nbytes, label, "", bytes(data[offset:offset + nbytes])))
        pos = max(pos, offset + nbytes)
    body_end = file_len - CHECKSUM_LEN
    if body_end > pos:
        rows.append((pos, body_end - pos, "padding", "", bytes(data[pos:body_end])))
    rows.append((body_end, CHECKSUM_LEN, "checksum", "", bytes(data[body_end:])))
    return rows


def field_pos(data: bytes, label: str) -> tuple[int, str]:
    for off, _, name, fmt, _ in layout(data):
        if name == label:
            return off, fmt
    raise KeyError(label)


def put(data: bytes, label: str, value: int | bytes) -> bytes:
    off, fmt = field_pos(data, label)
    return put_bytes(data, off, value if isinstance(value, bytes) else struct.pack(fmt, value))


def put_bytes(data: bytes, off: int, new: bytes) -> bytes:
    return data[:off] + new + data[off + len(new):]


def _put_shape(data: bytes, shape: list[int]) -> bytes:
    """`data` with the dimensions of its first tensor replaced (same rank)."""
    for d, value in enumerate(shape):
        data = put(data, f"t0.shape[{d}]", value)
    return data


def reseal(data: bytes) -> bytes:
    """Recompute the trailing SHA-256 so a reader gets past the checksum to the defect."""
    return data[:-CHECKSUM_LEN] + hashlib.sha256(data[:-CHECKSUM_LEN]).digest()


def _arr(values, dtype, shape=None) -> np.ndarray:
    a = np.array(values, dtype=dtype)
    return a.reshape(shape) if shape is not None else a


def valid_vectors() -> list[tuple[str, str, Holo, frozenset[str]]]:
    """(name, description, hologram, names of deflated tensors)."""
    return [
        ("tiny", "the worked example in SPEC.md: one f16 tensor",
         Holo("conversation", {"model": "tiny"}, {"t": _arr([1.0, -2.0], "<f2")}), frozenset()),
        ("all_dtypes", "one tensor per dtype with extreme values (f16 includes -0, max, subnormal)",
         Holo("conversation", {"note": "every dtype"}, {
             "f32": _arr([0.0, 1.5, -2.25, 0.1, 3.4028234663852886e38, 1.401298464324817e-45],
                         "<f4", (2, 3)),
             "f16": _arr([0.0, -0.0, 1.0, -2.5, 65504.0, 2.0 ** -24, 0.1], "<f2"),
             "i8": _arr([-128, -1, 0, 1, 127], "i1"),
             "u8": _arr([0, 1, 128, 255], "u1"),
             "i16": _arr([-32768, -1, 0, 32767], "<i2", (2, 2)),
             "u16": _arr([0, 1, 65535], "<u2"),
             "i32": _arr([-2147483648, -1, 0, 2147483647], "<i4", (4, 1)),
             "u32": _arr([0, 1, 4294967295], "<u4"),
         }), frozenset()),
        ("scalar_0d", "0-d tensors: shape [] holds exactly one value",
         Holo("captured_state", {"note": "scalars"}, {
             "pos": np.array(42, "<i4"), "temperature": np.array(0.7, "<f4")}), frozenset()),
        ("empty_tensors", "tensors with a 0 dimension (one of them deflated); a zero-size "
         "payload may share its offset with the next tensor",
         Holo("captured_state", {}, {
             "none": _arr([], "u1"), "rows": _arr([], "<f4", (3, 0)),
             "cols": _arr([], "<i2", (0, 4)), "zlib_empty": _arr([], "<f2"),
             "after": _arr([7, 9], "u1")}), frozenset({"zlib_empty"})),
        ("deflate", "flag 1: payloads are zlib streams (RFC 1950); 'b' is stored raw between them",
         Holo("model_pack", {"note": "deflated"}, {
             "w": (np.arange(32, dtype="<f4") / 4 - 3).reshape(4, 8),
             "b": _arr([1.0, 2.0, 3.0, 4.0], "<f4"),
             "ids": np.tile(np.arange(8, dtype="<u2"), 8)}), frozenset({"w", "ids"})),
        ("unicode_names", "tensor names are UTF-8 (up to 256 bytes); metadata strings are "
         "non-ASCII (the writer escapes them as \\uXXXX)",
         Holo("conversation", {"título": "ñandú", "emoji": "🧠", "cjk": "日本語"}, {
             "ключ": _arr([1], "u1"), "日本語/層.0": _arr([2], "u1"),
             "emoji🧠": _arr([3], "u1"),
             "n" * 256: _arr([4], "u1")}), frozenset()),
        ("nested_meta", "metadata with nested objects, arrays, null, booleans, escapes and "
         "the largest integer exact in a double",
         Holo("conversation", {
             "model": {"id": "SmolLM2-135M-Instruct", "rope": {"theta": 100000.0, "scaling": None}},
             "positions": [0, 1, 2], "flags": [True, False], "empty": {}, "list": [{"a": 1}, {"b": []}],
             "codec": {"rank": 16, "bands": [[0, 8], [8, 64]], "scale": -1.5e-10},
             "big": 9007199254740991, "text": "line\nbreak \"quoted\" \\ tab\t"},
             {"x": _arr([5], "u1")}), frozenset()),
        ("meta_only", "a model pack with metadata and no tensors",
         Holo("model_pack", {"note": "no tensors"}, {}), frozenset()),
        ("max_rank", "a tensor of the maximum rank 8",
         Holo("captured_state", {}, {"r8": np.arange(16, dtype="<f4").reshape(1, 2, 1, 2, 1, 2, 1, 2)}),
         frozenset()),
        ("empty_at_limit", "an empty u8 tensor of shape [0, 2^20, 2^20]: its nonzero dimensions "
         "give exactly MAX_TENSOR_BYTES (2^40), the most allowed",
         Holo("captured_state", {}, {"e": np.zeros((0, 1 << 20, 1 << 20), "u1")}), frozenset()),
    ]


def expected(holo: Holo, deflate: frozenset[str], data: bytes, description: str) -> dict:
    tensors = []
    for name, arr in holo.tensors.items():
        arr = np.asarray(arr)
        code = dtype_code(arr)
        t = {"name": name, "dtype": DTYPE_NAMES[code], "dtype_code": code, "shape": list(arr.shape),
             "flags": 1 if name in deflate else 0, "values": arr.ravel().tolist()}
        if code == 1:
            t["bits"] = arr.astype("<f2").view("<u2").ravel().tolist()
        tensors.append(t)
    return {"description": description, "kind": holo.kind, "meta": holo.meta,
            "size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "tensors": tensors}


def invalid_vectors() -> list[tuple[str, str, str, bytes]]:
    """(name, description, expected error substring, file bytes)."""
    base = save_hologram(Holo("conversation", {"v": 1}, {
        "a": _arr([1, 2, 3, 4], "u1"), "b": _arr([5, 6], "<i2")}))
    empty_meta = save_hologram(Holo("conversation", {}, {"a": _arr([1], "u1")}))
    zbase = save_hologram(Holo("conversation", {}, {"z": np.arange(16, dtype="u1")}), frozenset({"z"}))
    zeros = save_hologram(Holo("conversation", {}, {"z": np.zeros(4096, "u1")}), frozenset({"z"}))
    quad = save_hologram(Holo("conversation", {}, {"q": np.ones((1, 1, 1, 1), "u1")}))
    octo = save_hologram(Holo("conversation", {}, {"o": np.ones((1,) * 8, "u1")}))
    empty3 = save_hologram(Holo("conversation", {}, {"e": np.zeros((0, 1, 1), "u1")}))
    meta_off, _ = field_pos(base, "metadata")
    dir_len = HEADER.unpack_from(base)[5]
    a_off, _ = field_pos(base, "t0.payload")
    assert a_off - (meta_off + len(b'{"v":1}') + dir_len) >= 4, "dir_len_mismatch needs padding"
    z_payload, _ = field_pos(zbase, "t0.payload")
    return [
        ("truncated_header", "only 40 bytes: shorter than header + checksum", "truncated",
         base[:40]),
        ("truncated", "the last 64 bytes are missing; file_len still names the full size",
         "truncated", base[:-64]),
        ("padded", "64 extra bytes before the checksum (checksum recomputed, file_len unchanged)",
         "truncated or padded", reseal(base[:-CHECKSUM_LEN] + bytes(64) + base[-CHECKSUM_LEN:])),
        ("bad_magic", "magic 'HOLO' spelled 'HXLO'", "bad magic", reseal(put_bytes(base, 2, b"X"))),
        ("bad_version", "format version 2", "unsupported version", reseal(put(base, "version", 2))),
        ("unknown_kind", "kind code 9", "unknown kind", reseal(put(base, "kind", 9))),
        ("bad_checksum", "one payload byte flipped, checksum left as it was", "checksum mismatch",
         put_bytes(base, a_off, b"\xfe")),
        ("absurd_meta_len", f"meta_len {MAX_META + 1} exceeds the 1 MiB limit", "absurd header",
         reseal(put(base, "meta_len", MAX_META + 1))),
        ("absurd_n_tensors", f"n_tensors {MAX_TENSORS + 1} exceeds the limit", "absurd header",
         reseal(put(base, "n_tensors", MAX_TENSORS + 1))),
        ("dir_past_end", "dir_len 1 MiB: metadata + directory run past the end",
         "run past the end", reseal(put(base, "dir_len", 1 << 20))),
        ("meta_not_json", "metadata bytes are not JSON", "metadata is not valid JSON",
         reseal(put_bytes(base, meta_off, b"{v:1}xx"))),
        ("meta_not_utf8", "metadata contains the byte 0xff", "metadata is not valid JSON",
         reseal(put_bytes(base, meta_off + 2, b"\xff"))),
        ("meta_bom", "metadata starts with a UTF-8 byte order mark (JSON text must not)",
         "metadata is not valid JSON", reseal(put_bytes(base, meta_off, b"\xef\xbb\xbf{}  "))),
        ("meta_not_object", "metadata is the JSON array []", "metadata must be a JSON object",
         reseal(put_bytes(empty_meta, HEADER.size, b"[]"))),
        ("entry_past_dir", "dir_len one byte short: the last entry runs past the directory",
         "directory entry runs past the directory", reseal(put(base, "dir_len", dir_len - 1))),
        ("dir_len_mismatch", "dir_len 4 bytes longer than its entries",
         "directory length does not match its entries", reseal(put(base, "dir_len", dir_len + 4))),
        ("name_len_zero", "a tensor name of length 0", "bad tensor name length",
         reseal(put(base, "t0.name_len", 0))),
        ("name_too_long", "a tensor name of length 257", "bad tensor name length",
         reseal(put(base, "t0.name_len", 257))),
        ("name_not_utf8", "tensor name is the byte 0xff", "tensor name is not UTF-8",
         reseal(put(base, "t0.name", b"\xff"))),
        ("unknown_dtype", "dtype code 8", "unknown dtype code", reseal(put(base, "t0.dtype", 8))),
        ("bad_rank", "ndim 9 exceeds the maximum rank 8", "bad rank", reseal(put(base, "t0.ndim", 9))),
        ("bad_flags", "flags 2: an unknown flag bit", "bad rank", reseal(put(base, "t0.flags", 2))),
        ("absurd_shape", f"a dimension of {MAX_DIM} (2^31)", "absurd shape",
         reseal(put(base, "t0.shape[0]", MAX_DIM))),
        ("shape_overflow", "shape [65536]*4 of u8 with nbytes 0: the size 2^64 bytes wraps to 0 "
         "in 64-bit arithmetic, which would pass the size bound; compute it exactly", "absurd shape",
         reseal(put(put(put(put(put(quad, "t0.shape[0]", 65536), "t0.shape[1]", 65536),
                            "t0.shape[2]", 65536), "t0.shape[3]", 65536), "t0.nbytes", 0))),
        ("empty_absurd_shape", "shape [2^31 - 1]*7 + [0] of u8 with nbytes 0: no elements, but "
         "the nonzero dimensions multiply to about 2^217 bytes, far over MAX_TENSOR_BYTES",
         "absurd shape", reseal(put(_put_shape(octo, [MAX_DIM - 1] * 7 + [0]), "t0.nbytes", 0))),
        ("empty_over_limit", "an empty u8 tensor of shape [0, 2^20 + 1, 2^20]: its nonzero "
         f"dimensions give 2^40 + 2^20 bytes, over MAX_TENSOR_BYTES ({MAX_TENSOR_BYTES})",
         "absurd shape", reseal(_put_shape(empty3, [0, (1 << 20) + 1, 1 << 20]))),
        ("nbytes_mismatch", "nbytes 3 for a u8 tensor of shape [4]", "bytes stored",
         reseal(put(base, "t0.nbytes", 3))),
        ("offset_past_end", "payload offset beyond the end of the file", "out of range or misaligned",
         reseal(put(base, "t1.offset", 1 << 20))),
        ("offset_misaligned", "payload offset not a multiple of 64", "out of range or misaligned",
         reseal(put(base, "t0.offset", a_off + 1))),
        ("offset_in_directory", "payload offset 0: inside the header", "out of range or misaligned",
         reseal(put(base, "t0.offset", 0))),
        ("overlapping_offsets", "the second payload starts where the first one does",
         "out of range or misaligned", reseal(put(base, "t1.offset", a_off))),
        ("duplicate_name", "two tensors named 'a'", "duplicate tensor name",
         reseal(put(base, "t1.name", b"a"))),
        ("bad_deflate", "the zlib stream's header byte 0x78 replaced by 0x00", "bad deflate stream",
         reseal(put_bytes(zbase, z_payload, b"\x00"))),
        ("deflate_too_long", "the zlib stream inflates to 16 bytes, shape says 15",
         "does not inflate to", reseal(put(zbase, "t0.shape[0]", 15))),
        ("deflate_too_short", "the zlib stream inflates to 16 bytes, shape says 17",
         "does not inflate to", reseal(put(zbase, "t0.shape[0]", 17))),
        ("deflate_into_empty", "shape [0] but the zlib stream inflates to 4096 bytes; a reader "
         "must not inflate more than the shape needs", "does not inflate to",
         reseal(put(zeros, "t0.shape[0]", 0))),
        ("inflate_limit", f"a deflated u8 tensor claiming {DEFAULT_MAX_INFLATE + 1} bytes, over "
         "the default 1 GiB inflate limit", "inflated size exceeds limit",
         reseal(put(zbase, "t0.shape[0]", DEFAULT_MAX_INFLATE + 1))),
    ]


def _dump_json(info: dict) -> bytes:
    """One line per top-level key and per tensor, so diffs of the vectors stay readable."""
    def one(v) -> str:
        return json.dumps(v, ensure_ascii=False)

    lines = []
    for key, value in info.items():
        if key == "tensors" and value:
            value = "[\n" + ",\n".join(f"  {one(t)}" for t in value) + "\n ]"
        else:
            value = one(value)
        lines.append(f" {one(key)}: {value}")
    return ("{\n" + ",\n".join(lines) + "\n}\n").encode()


def build() -> dict[str, bytes]:
    """File name -> content for the whole vectors directory; checks every vector hits its check."""
    files: dict[str, bytes] = {}
    index = {"valid": [], "invalid": []}

    def add(name: str, data: bytes, info: dict) -> None:
        assert len(data) < 10_000, name
        files[f"{name}.holo"] = data
        files[f"{name}.json"] = _dump_json(info)

    for name, description, holo, deflate in valid_vectors():
        data = save_hologram(holo, deflate)
        assert load_hologram(data).tensors.keys() == holo.tensors.keys()
        add(name, data, expected(holo, deflate, data, description))
        index["valid"].append(name)
    for name, description, error, data in invalid_vectors():
        try:
            load_hologram(data)
        except HoloError as e:
            assert error in str(e), (name, str(e))
        else:
            raise AssertionError(f"invalid vector {name} loads")
        add(name, data, {"description": description, "error": error})
        index["invalid"].append(name)
    files["index.json"] = _dump_json(index)
    return files


def write(out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    files = build()
    for stale in out_dir.iterdir():  # a renamed vector must not linger under its old name
        if stale.name not in files and stale.suffix in (".holo", ".json"):
            stale.unlink()
    for name, content in files.items():
        (out_dir / name).write_bytes(content)


def hexdump(data: bytes) -> str:
    lines = []
    for off in range(0, len(data), 16):
        chunk = data[off:off + 16]
        # single bytes, not xxd's 2-byte groups, which read like big-endian u16s
        hexes = f"{chunk[:8].hex(' '):<23}  {chunk[8:].hex(' ')}"
        text = "".join(chr(b) if 32 <= b < 127 else "." for b in chunk)
        lines.append(f"{off:08x}  {hexes:<48}  |{text}|")
    return "\n".join(lines)


def _show(label: str, value: int | bytes) -> str:
    if label == "kind":
        return f"{value} ({KIND_NAMES[value]})"
    if label.endswith(".dtype"):
        return f"{value} ({DTYPE_NAMES[value]})"
    if not isinstance(value, bytes):
        return str(value)
    if label == "magic":
        return repr(value)
    if label == "metadata" or label.endswith(".name"):
        return value.decode()
    if label.endswith(".payload"):
        return "f16 bits " + " ".join(f"{v:#06x}" for v in np.frombuffer(value, "<u2"))
    if label == "padding":
        return "zeros" if not any(value) else value.hex()
    return value.hex()


def example() -> str:
    """The worked example section of SPEC.md (tests check that SPEC.md contains it verbatim)."""
    name, _, holo, deflate = valid_vectors()[0]
    data = save_hologram(holo, deflate)
    rows = [f"| {off} | {size} | {label} | `{_show(label, value)}` |"
            for off, size, label, _, value in layout(data)]
    return "\n".join([
        f"`protocol/vectors/{name}.holo` ({len(data)} bytes), written by "
        f"`save_hologram(Holo({holo.kind!r}, {holo.meta!r}, {{'t': np.array([1.0, -2.0], '<f2')}}))`:",
        "",
        "| offset | size | field | value |",
        "|---:|---:|---|---|",
        *rows,
        "",
        "```",
        hexdump(data),
        "```",
    ])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=VECTOR_DIR)
    p.add_argument("--example", action="store_true", help="print the SPEC.md worked example")
    args = p.parse_args(argv)
    if args.example:
        sys.stdout.write(example() + "\n")
    else:
        write(args.out)


if __name__ == "__main__":
    main()
