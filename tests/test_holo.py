"""The `.holo` container: round trips, every reader check, the shared vectors, fuzzing."""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
import struct
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hpi.protocol import make_vectors as mv
from hpi.protocol.holo import (
    CHECKSUM_LEN, DTYPES, HEADER, KINDS, MAGIC, MAX_META, Holo, HoloError, content_hash,
    load_hologram, save_hologram,
)

VECTORS = Path(mv.__file__).parent / "vectors"
SPEC = Path(mv.__file__).parent / "SPEC.md"
INDEX = json.loads((VECTORS / "index.json").read_text())
FUZZ_INFLATE = 1 << 16
# Beyond the input and the inflate budget, a load may allocate Python objects for the JSON
# metadata and the directory; a few dozen bytes per input byte covers the worst of those.
ALLOC_PER_INPUT_BYTE = 64
ALLOC_SLACK = 256 << 10


def bits(arr: np.ndarray) -> np.ndarray:
    """Integer view, so -0.0, NaN payloads and infinities compare exactly."""
    return arr.view(f"u{arr.dtype.itemsize}")


def assert_same_tensors(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert list(got) == list(want)
    for name, w in want.items():
        w = np.asarray(w)
        g = got[name]
        assert g.shape == w.shape, name
        assert g.dtype == w.dtype.newbyteorder("<"), name
        np.testing.assert_array_equal(bits(g), bits(w.astype(g.dtype)), err_msg=name)


def roundtrip(holo: Holo, deflate=frozenset()) -> Holo:
    back = load_hologram(save_hologram(holo, deflate))
    assert back.kind == holo.kind and back.meta == holo.meta
    assert_same_tensors(back.tensors, holo.tensors)
    return back


def reseal(data: bytes) -> bytes:
    """Make file_len and the checksum agree with `data`, so parsing gets past both."""
    if len(data) < HEADER.size + CHECKSUM_LEN:
        return data
    return mv.reseal(data[:24] + struct.pack("<Q", len(data)) + data[32:])


def load_bounded(data: bytes, max_inflate: int = FUZZ_INFLATE) -> Holo | HoloError:
    """Load `data`, returning the HoloError if any; memory must stay bounded by the input."""
    tracemalloc.start()
    try:
        holo = load_hologram(data, max_inflate=max_inflate)
    except HoloError as e:
        holo = e
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak <= ALLOC_SLACK + ALLOC_PER_INPUT_BYTE * len(data) + max_inflate
    if isinstance(holo, Holo):
        whole = np.frombuffer(data, np.uint8)
        views = [a for a in holo.tensors.values() if np.shares_memory(a, whole)]
        inflated = [a for a in holo.tensors.values() if not np.shares_memory(a, whole)]
        assert sum(a.nbytes for a in views) <= len(data)
        assert sum(a.nbytes for a in inflated) <= max_inflate
    return holo


# --- round trips -------------------------------------------------------------------------

@pytest.mark.parametrize("code", sorted(DTYPES))
def test_roundtrip_every_dtype(code):
    dt = DTYPES[code]
    rng = np.random.default_rng(code)
    arr = rng.integers(0, 256, size=3 * 5 * dt.itemsize, dtype=np.uint8).view(dt).reshape(3, 5)
    roundtrip(Holo("conversation", {"code": code}, {"x": arr}))


@pytest.mark.parametrize("code", sorted(DTYPES))
def test_roundtrip_every_dtype_deflated(code):
    arr = np.tile(np.arange(8), 40).astype(DTYPES[code]).reshape(10, 32)
    data = save_hologram(Holo("model_pack", {}, {"x": arr}), {"x"})
    stored = {label: value for _, _, label, _, value in mv.layout(data)}["t0.payload"]
    assert zlib.decompress(stored) == arr.tobytes() and len(stored) < arr.nbytes
    assert_same_tensors(load_hologram(data).tensors, {"x": arr})


def test_roundtrip_kinds_meta_and_order():
    meta = {"z": [1, 2.5, None, True], "a": {"ñ": "🧠", "nested": {"deep": []}}, "n": -3}
    tensors = {name: np.arange(3, dtype="<i4") for name in ("zeta", "alpha", "日本", "m" * 256)}
    for kind in KINDS:
        back = roundtrip(Holo(kind, meta, tensors))
        assert list(back.tensors) == list(tensors)


def test_roundtrip_empty_and_scalar():
    tensors = {
        "scalar": np.array(3.5, "<f4"), "scalar_int": np.array(-7, "<i2"),
        "empty": np.zeros(0, "u1"), "empty2d": np.zeros((4, 0), "<f2"),
        "empty0": np.zeros((0, 9), "<u4"),
        "after": np.arange(5, dtype="u1"), "rank8": np.ones((1, 2, 1, 2, 1, 2, 1, 2), "i1"),
    }
    back = roundtrip(Holo("captured_state", {}, tensors))
    assert back.tensors["scalar"].shape == ()
    roundtrip(Holo("captured_state", {}, tensors), {"empty", "scalar", "empty2d"})


def test_roundtrip_no_tensors():
    data = save_hologram(Holo("model_pack", {}, {}))
    assert len(data) == 64 + CHECKSUM_LEN  # header + "{}" padded to 64, then the checksum
    assert load_hologram(data).tensors == {}


def test_roundtrip_non_contiguous_input():
    base = np.arange(60, dtype="<f4").reshape(6, 10)
    tensors = {"cols": base[:, ::3], "t": base.T, "fortran": np.asfortranarray(base),
               "neg": base[::-1, 2:5]}
    for t in tensors.values():
        assert not t.flags.c_contiguous
    roundtrip(Holo("conversation", {}, tensors))
    roundtrip(Holo("conversation", {}, tensors), {"t", "neg"})


def test_roundtrip_big_endian_input():
    tensors = {f"x{c}": np.arange(-4, 8).astype(DTYPES[c].newbyteorder(">")) for c in DTYPES}
    back = roundtrip(Holo("conversation", {}, tensors))
    for name, arr in back.tensors.items():
        assert arr.dtype.byteorder in "<|=" and arr.tolist() == tensors[name].tolist()


def test_save_is_deterministic_and_hash_is_sha256_of_file():
    holo = Holo("conversation", {"b": 1, "a": 2}, {"x": np.arange(100, dtype="<f4")})
    a = save_hologram(holo, {"x"})
    assert a == save_hologram(Holo(holo.kind, {"a": 2, "b": 1}, holo.tensors), {"x"})
    assert content_hash(a) == hashlib.sha256(a).hexdigest()
    assert a[-CHECKSUM_LEN:] == hashlib.sha256(a[:-CHECKSUM_LEN]).digest()
    assert (len(a) - CHECKSUM_LEN) % 64 == 0


def test_load_accepts_bytearray_and_memoryview():
    data = save_hologram(Holo("conversation", {}, {"x": np.arange(4, dtype="u1")}))
    for buf in (bytearray(data), memoryview(data)):
        assert load_hologram(buf).tensors["x"].tolist() == [0, 1, 2, 3]


# --- writer errors -----------------------------------------------------------------------

@pytest.mark.parametrize("holo, message", [
    (Holo("chat", {}, {}), "unknown kind 'chat'"),
    (Holo("conversation", {"x": "y" * MAX_META}, {}), "limit 1048576"),
    (Holo("conversation", {}, {"x": np.zeros(2, "<f8")}), "unsupported dtype float64"),
    (Holo("conversation", {}, {"x": np.zeros(2, "<i8")}), "unsupported dtype int64"),
    (Holo("conversation", {}, {"x": np.zeros(2, bool)}), "unsupported dtype bool"),
    (Holo("conversation", {}, {"": np.zeros(2, "u1")}), "bad name length or rank"),
    (Holo("conversation", {}, {"é" * 129: np.zeros(2, "u1")}), "bad name length or rank"),
    (Holo("conversation", {}, {"x": np.zeros((1,) * 9, "u1")}), "bad name length or rank"),
    (Holo("conversation", {}, {"x": np.zeros((0, 2**31), "u1")}), "beyond the format's limits"),
    (Holo("conversation", {}, {"x": np.zeros((0, 1 << 20, 1 << 19), "<u4")}), "beyond the format's limits"),
])
def test_save_rejects(holo, message):
    with pytest.raises(HoloError, match=re.escape(message)):
        save_hologram(holo)


def test_save_rejects_nan_in_meta():
    with pytest.raises(ValueError):
        save_hologram(Holo("conversation", {"x": float("nan")}, {}))


# --- reader errors beyond the vectors ----------------------------------------------------

def file_with_meta(meta: bytes) -> bytes:
    body = HEADER.pack(MAGIC, 1, 1, len(meta), 0, 0, 0) + meta
    body += bytes(-len(body) % 64)
    return reseal(body + bytes(CHECKSUM_LEN))


@pytest.mark.parametrize("meta", [b"[" * 100_000, b'{"n":' + b"9" * 5000 + b"}", b'{"x":NaN}',
                                  b'{"x":-Infinity}'], ids=["deep", "huge_int", "nan", "infinity"])
def test_metadata_that_python_json_cannot_parse_is_a_holo_error(meta):
    with pytest.raises(HoloError, match="metadata is not valid JSON"):
        load_hologram(file_with_meta(meta))


def test_bytes_after_the_deflate_stream_are_rejected():
    holo = Holo("conversation", {}, {"a": np.arange(64, dtype="u1")})
    data = save_hologram(holo, {"a"})
    stream = zlib.compress(np.arange(64, dtype="u1").tobytes(), 9)
    at = data.index(stream)
    # Grow the payload by one trailing byte inside the same aligned slot, and say so in nbytes.
    grown = data[:at + len(stream)] + b"\x00" + data[at + len(stream) + 1:]
    entry = data.index(struct.pack("<QQ", at, len(stream)))
    grown = grown[:entry] + struct.pack("<QQ", at, len(stream) + 1) + grown[entry + 16:]
    with pytest.raises(HoloError, match="deflate stream does not inflate"):
        load_hologram(reseal(grown))


def test_inflate_limit_counts_all_deflated_tensors():
    holo = Holo("conversation", {}, {name: np.zeros(40, "u1") for name in "abc"})
    data = save_hologram(holo, {"a", "b"})
    assert set(load_hologram(data, max_inflate=80).tensors) == {"a", "b", "c"}
    with pytest.raises(HoloError, match="tensor 'b': inflated size exceeds limit 79"):
        load_hologram(data, max_inflate=79)


def test_zip_bomb_in_empty_tensor_is_not_inflated():
    data = save_hologram(Holo("conversation", {}, {"z": np.zeros(16 << 20, "u1")}), {"z"})
    bomb = reseal(mv.put(data, "t0.shape[0]", 0))
    assert len(bomb) < 32 << 10
    err = load_bounded(bomb, max_inflate=1024)
    assert isinstance(err, HoloError) and "does not inflate to 0 bytes" in str(err)


def test_huge_shape_product_is_computed_exactly():
    data = save_hologram(Holo("conversation", {}, {"q": np.ones((1,) * 8, "<u4")}), {"q"})
    for d in range(8):
        data = mv.put(data, f"t0.shape[{d}]", 2**31 - 1)
    with pytest.raises(HoloError, match="absurd shape"):  # ~2^250 bytes: over MAX_TENSOR_BYTES
        load_hologram(reseal(data))
    # Within MAX_TENSOR_BYTES, a deflated tensor still meets the inflate limit before inflating.
    data = save_hologram(Holo("conversation", {}, {"q": np.ones((1, 1), "u1")}), {"q"})
    data = reseal(mv.put(mv.put(data, "t0.shape[0]", 1 << 20), "t0.shape[1]", 1 << 20))
    with pytest.raises(HoloError, match="inflated size exceeds limit"):
        load_hologram(data)


def file_with_shape(shape: list[int], dtype: str = "u1", deflate: bool = False, nbytes: int | None = None) -> bytes:
    """A valid one-tensor file whose shape field is then set to `shape` (and nbytes, if given)."""
    holo = Holo("conversation", {}, {"t": np.zeros((1,) * len(shape), dtype)})
    data = save_hologram(holo, {"t"} if deflate else set())
    for d, value in enumerate(shape):
        data = mv.put(data, f"t0.shape[{d}]", value)
    if nbytes is not None:
        data = mv.put(data, "t0.nbytes", nbytes)
    return reseal(data)


MAX = 2**31 - 1
EMPTY_ABSURD = {  # name: (shape, dtype); raw size 0, extent over MAX_TENSOR_BYTES (2^40)
    "seven_max_then_zero": ([MAX] * 7 + [0], "u1"),
    "zero_then_seven_max": ([0] + [MAX] * 7, "u1"),
    "zero_in_the_middle": ([MAX, MAX, 0, MAX], "<f2"),
    "two_max_and_zero": ([MAX, MAX, 0], "u1"),  # ~2^62 bytes: numpy's own limit is 2^63
    "wraps_u64_to_zero": ([0, 65536, 65536, 65536, 65536], "u1"),
    "just_over_u8": ([0, (1 << 20) + 1, 1 << 20], "u1"),
    "just_over_f32": ([0, 1 << 20, (1 << 18) + 1], "<f4"),
}


@pytest.mark.parametrize("deflate", [False, True], ids=["raw", "deflated"])
@pytest.mark.parametrize("case", list(EMPTY_ABSURD))
def test_empty_tensor_with_absurd_other_dimensions_is_a_holo_error(case, deflate):
    shape, dtype = EMPTY_ABSURD[case]
    data = file_with_shape(shape, dtype, deflate, nbytes=None if deflate else 0)
    err = load_bounded(data)
    assert isinstance(err, HoloError) and "absurd shape" in str(err), err


@pytest.mark.parametrize("shape, dtype", [([0, 1 << 20, 1 << 20], "u1"), ([1 << 20, 0, 1 << 18], "<f4"),
                                          ([0, MAX], "<u2"), ([0] * 8, "<i4")])
def test_empty_tensor_at_the_extent_limit_loads(shape, dtype):
    holo = load_bounded(file_with_shape(shape, dtype, nbytes=0))
    assert isinstance(holo, Holo), holo
    assert holo.tensors["t"].shape == tuple(shape) and holo.tensors["t"].size == 0


def test_shape_checks_precede_numpy():
    """The reader, not numpy, refuses every shape: nothing but HoloError on any rank-8 shape."""
    rng = random.Random(7)
    values = [0, 1, 2, 3, 255, 65535, 65536, 1 << 20, (1 << 20) + 1, MAX, 2**31, 2**32 - 1]
    for _ in range(300):
        shape = [rng.choice(values) for _ in range(rng.randint(1, 8))]
        data = file_with_shape(shape, rng.choice(["u1", "<f4"]), rng.random() < 0.3,
                               nbytes=rng.choice([None, 0, 4, 64]))
        try:
            load_hologram(data, max_inflate=FUZZ_INFLATE)
        except HoloError:
            pass


# --- shared vectors ----------------------------------------------------------------------

@pytest.mark.parametrize("name", INDEX["valid"])
def test_valid_vector(name):
    data = (VECTORS / f"{name}.holo").read_bytes()
    want = json.loads((VECTORS / f"{name}.json").read_text("utf-8"))
    holo = load_hologram(data)
    assert (holo.kind, holo.meta) == (want["kind"], want["meta"])
    assert (len(data), content_hash(data)) == (want["size"], want["sha256"])
    assert list(holo.tensors) == [t["name"] for t in want["tensors"]]
    fields = {label: value for _, _, label, _, value in mv.layout(data)}
    for i, t in enumerate(want["tensors"]):
        arr = holo.tensors[t["name"]]
        assert arr.dtype == DTYPES[t["dtype_code"]] and mv.DTYPE_NAMES[t["dtype_code"]] == t["dtype"]
        assert list(arr.shape) == t["shape"] and len(t["values"]) == math.prod(t["shape"])
        assert fields[f"t{i}.flags"] == t["flags"]
        assert arr.ravel().tolist() == t["values"]
        if t["dtype"] == "f16":
            assert bits(arr).ravel().tolist() == t["bits"]


@pytest.mark.parametrize("name", INDEX["invalid"])
def test_invalid_vector(name):
    data = (VECTORS / f"{name}.holo").read_bytes()
    want = json.loads((VECTORS / f"{name}.json").read_text("utf-8"))
    with pytest.raises(HoloError) as e:
        load_hologram(data)
    assert want["error"] in str(e.value)
    if name != "bad_checksum" and not name.startswith("truncated"):
        assert data[-CHECKSUM_LEN:] == hashlib.sha256(data[:-CHECKSUM_LEN]).digest()


def test_vector_directory_matches_index():
    names = INDEX["valid"] + INDEX["invalid"]
    assert len(set(names)) == len(names)
    listed = {f"{n}.{ext}" for n in names for ext in ("holo", "json")} | {"index.json"}
    assert {p.name for p in VECTORS.iterdir()} == listed
    assert all(p.stat().st_size < 10_000 for p in VECTORS.iterdir())
    kinds = {json.loads((VECTORS / f"{n}.json").read_text())["kind"] for n in INDEX["valid"]}
    assert kinds == set(KINDS)


def test_every_reader_check_in_the_spec_has_a_vector():
    section = SPEC.read_text().split("## Reader obligations")[1].split("\n## ")[0]
    rows = re.findall(r"^\| \d+ \| .* \| `([^`]+)` \|$", section, re.M)
    assert len(rows) == 23
    covered = {json.loads((VECTORS / f"{n}.json").read_text())["error"] for n in INDEX["invalid"]}
    assert set(rows) <= covered


def test_vectors_are_reproducible(tmp_path):
    mv.write(tmp_path)
    for path in VECTORS.iterdir():
        assert (tmp_path / path.name).read_bytes() == path.read_bytes(), path.name
    assert {p.name for p in tmp_path.iterdir()} == {p.name for p in VECTORS.iterdir()}


def test_spec_worked_example_is_current():
    assert mv.example() in SPEC.read_text()


# --- fuzzing -----------------------------------------------------------------------------

SEEDS = [(VECTORS / f"{n}.holo").read_bytes() for n in INDEX["valid"]]
INTERESTING = [0, 1, 63, 64, 65, 255, 256, 257, 65535, 65536, 2**31 - 1, 2**31, 2**32 - 1,
               2**63, 2**64 - 1, MAX_META, MAX_META + 1]
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.binary(max_size=400))
def test_fuzz_random_bytes(data):
    load_bounded(data)
    load_bounded(MAGIC + data)


@FUZZ
@given(kind=st.integers(0, 4), version=st.sampled_from([1, 1, 1, 0, 2]), meta_len=st.integers(0, 300),
       n_tensors=st.integers(0, 8), dir_len=st.integers(0, 400), body=st.binary(max_size=600))
def test_fuzz_sealed_random_body(kind, version, meta_len, n_tensors, dir_len, body):
    header = HEADER.pack(MAGIC, version, kind, meta_len, n_tensors, dir_len, 0)
    load_bounded(reseal(header + body + bytes(CHECKSUM_LEN)))


@st.composite
def mutated(draw):
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["byte", "int", "insert", "delete", "truncate", "extend"]))
        # Past the magic, and modulo: Hypothesis favours the bounds of a range, which would
        # mostly hit one header field.
        pos = len(MAGIC) + draw(st.integers(0, 2**32)) % max(len(data) - len(MAGIC), 1)
        if op == "byte" and pos < len(data):
            data[pos] = draw(st.integers(0, 255))
        elif op == "int":
            fmt = draw(st.sampled_from(["<H", "<I", "<Q", "B"]))
            value = draw(st.sampled_from(INTERESTING)) % (1 << 8 * struct.calcsize(fmt))
            data[pos:pos + struct.calcsize(fmt)] = struct.pack(fmt, value)
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=70))
        elif op == "delete":
            del data[pos:pos + draw(st.integers(1, 70))]
        elif op == "truncate":
            del data[max(pos, len(data) // 2):]
        elif op == "extend":
            data += draw(st.binary(min_size=1, max_size=130))
    return bytes(data), draw(st.sampled_from([False, False, False, True]))


@settings(FUZZ, max_examples=1000)
@given(mutated())
def test_fuzz_mutated_valid_files(case):
    data, keep_checksum = case
    load_bounded(data if keep_checksum else reseal(data))


@st.composite
def holograms(draw):
    tensors, deflate = {}, set()
    for name in draw(st.lists(st.text(min_size=1, max_size=12), max_size=5, unique=True)):
        dt = DTYPES[draw(st.sampled_from(sorted(DTYPES)))]
        shape = tuple(draw(st.lists(st.integers(0, 4), max_size=4)))
        size = dt.itemsize * math.prod(shape)
        raw = draw(st.binary(min_size=size, max_size=size))
        tensors[name] = np.frombuffer(raw, dt).reshape(shape)
        if draw(st.booleans()):
            deflate.add(name)
    scalars = (st.none() | st.booleans() | st.integers(-2**53, 2**53) | st.text(max_size=8)
               | st.floats(allow_nan=False, allow_infinity=False))
    values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                          | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=10)
    meta = draw(st.dictionaries(st.text(max_size=8), values, max_size=4))
    return Holo(draw(st.sampled_from(sorted(KINDS))), meta, tensors), frozenset(deflate)


@settings(FUZZ, max_examples=150)
@given(holograms())
def test_fuzz_roundtrip(case):
    holo, deflate = case
    data = save_hologram(holo, deflate)
    back = load_bounded(data, max_inflate=1 << 20)
    assert isinstance(back, Holo) and back.kind == holo.kind and back.meta == holo.meta
    assert_same_tensors(back.tensors, holo.tensors)
    assert (len(data) - CHECKSUM_LEN) % 64 == 0
    for _, _, label, _, value in mv.layout(data):
        if label.endswith(".offset"):
            assert value % 64 == 0
        if label == "padding":
            assert not any(value)


def test_every_single_byte_change_of_every_valid_vector():
    """Exhaustive where Hypothesis samples: resealed, so each change meets the deep checks."""
    phrases = set()
    for seed in SEEDS:
        for pos in range(len(seed) - CHECKSUM_LEN):
            for value in (0, 0x80, 0xFF):
                try:
                    load_hologram(reseal(seed[:pos] + bytes([value]) + seed[pos + 1:]))
                except HoloError as e:
                    phrases.add(re.sub(r"^tensor '.*?': ", "", str(e)).split(":")[0])
    assert len(phrases) >= 15, phrases


def test_seeded_fuzz_raises_only_holo_errors():
    """Byte flips, field overwrites and truncations of the valid vectors, and random headers,
    mostly resealed so the damage gets past the checksum: a Holo or a HoloError, nothing else."""
    rng = random.Random(20240611)
    fields = [[(off, fmt) for off, _, _, fmt, _ in mv.layout(seed) if fmt not in ("", "8s")] for seed in SEEDS]
    shapes = [[[off for off, _, label, _, _ in mv.layout(seed) if label.startswith(f"t{t}.shape[")]
               + [off for off, _, label, _, _ in mv.layout(seed) if label == f"t{t}.nbytes"]
               for t in range(len(load_hologram(seed).tensors))] for seed in SEEDS]
    outcomes = {"ok": 0, "error": 0}
    for i in range(4000):
        if i % 4 == 3:  # a random header over a random body
            header = HEADER.pack(MAGIC if rng.random() < 0.9 else rng.randbytes(8),
                                 rng.choice([1, 1, 1, 0, 2]), rng.randint(0, 4),
                                 rng.choice([0, 2, rng.randint(0, 300), MAX_META, 2**32 - 1]),
                                 rng.choice([0, 1, 2, rng.randint(0, 8), 2**32 - 1]),
                                 rng.choice([0, rng.randint(0, 400), 2**32 - 1]), 0)
            data = header + rng.randbytes(rng.randint(0, 600)) + bytes(CHECKSUM_LEN)
        else:
            k = rng.randrange(len(SEEDS))
            data = bytearray(SEEDS[k])
            for _ in range(rng.randint(1, 4)):
                op = rng.random()
                if op < 0.15 and shapes[k]:  # a whole new shape, often with nbytes 0
                    *dims, nbytes = rng.choice(shapes[k])
                    for off in dims:
                        data[off:off + 4] = struct.pack("<I", rng.choice([0, 0, 1, 2, 65536, 2**31 - 1]))
                    if rng.random() < 0.5:
                        data[nbytes:nbytes + 8] = bytes(8)
                elif op < 0.4:  # flip bits of one byte past the magic
                    pos = rng.randrange(len(MAGIC), len(data)) if len(data) > len(MAGIC) else 0
                    if pos < len(data):
                        data[pos] ^= 1 << rng.randrange(8)
                elif op < 0.8:  # overwrite an integer field (shape dims included) with an edge value
                    pos, fmt = rng.choice([f for f in fields[k] if f[0] + struct.calcsize(f[1]) <= len(data)]
                                          or [(8, "<H")])
                    size = struct.calcsize(fmt)
                    value = rng.choice(INTERESTING + [rng.getrandbits(8 * size)]) % (1 << 8 * size)
                    data[pos:pos + size] = struct.pack(fmt, value)
                else:  # truncate
                    del data[rng.randrange(len(data) + 1):]
            data = bytes(data)
        if rng.random() < 0.85:
            data = reseal(data)
        try:
            load_hologram(data, max_inflate=FUZZ_INFLATE)
            outcomes["ok"] += 1
        except HoloError:
            outcomes["error"] += 1
    assert outcomes["ok"] and outcomes["error"]
