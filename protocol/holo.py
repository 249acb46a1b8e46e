"""Read and write the `.holo` container (byte layout: protocol/SPEC.md).

One container carries conversation holograms, model packs and captured state. The
reader treats every byte as hostile: each length, shape and offset is checked against
the input before anything is allocated, and the whole file is covered by a SHA-256.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
import zlib
from dataclasses import dataclass, field

import numpy as np

MAGIC = b"\x89HOLO\r\n\x1a"
VERSION = 1
KINDS = {"conversation": 1, "model_pack": 2, "captured_state": 3}
KIND_NAMES = {v: k for k, v in KINDS.items()}
DTYPES = {  # code -> numpy dtype (little-endian)
    0: np.dtype("<f4"),
    1: np.dtype("<f2"),
    2: np.dtype("i1"),
    3: np.dtype("u1"),
    4: np.dtype("<i2"),
    5: np.dtype("<u2"),
    6: np.dtype("<i4"),
    7: np.dtype("<u4"),
}
DTYPE_CODES = {dt: code for code, dt in DTYPES.items()}
FLAG_DEFLATE = 1

HEADER = struct.Struct("<8sHHIIIQ")  # magic, version, kind, meta_len, n_tensors, dir_len, file_len
ENTRY_HEAD = struct.Struct("<H")  # name_len
ENTRY_TYPE = struct.Struct("<BBBB")  # dtype, ndim, flags, reserved
ENTRY_TAIL = struct.Struct("<QQ")  # offset, nbytes
ALIGN = 64
CHECKSUM_LEN = 32

MAX_META = 1 << 20
MAX_TENSORS = 1 << 16
MAX_NAME = 256
MAX_NDIM = 8
MAX_DIM = 1 << 31
MAX_TENSOR_BYTES = 1 << 40  # the product of a shape's nonzero dimensions times the dtype size
DEFAULT_MAX_INFLATE = 1 << 30


class HoloError(ValueError):
    """A `.holo` input is malformed; the message says which check failed."""


@dataclass
class Holo:
    kind: str
    meta: dict
    tensors: dict[str, np.ndarray] = field(default_factory=dict)


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def _extent(shape: tuple[int, ...], itemsize: int) -> int:
    """Bytes of the shape with every 0 dimension counted as 1: what bounds a shape (SPEC check 16)."""
    return itemsize * math.prod(d for d in shape if d)


def content_hash(data: bytes) -> str:
    """Hex SHA-256 of a whole `.holo` file: its identity (ETag, IndexedDB key)."""
    return hashlib.sha256(data).hexdigest()


def save_hologram(holo: Holo, deflate: frozenset[str] | set[str] = frozenset(), level: int = 9,
                  strategy: int = zlib.Z_DEFAULT_STRATEGY) -> bytes:
    """Serialise `holo`; tensors named in `deflate` are stored zlib-compressed.

    `level` and `strategy` go to zlib; any choice yields a standard zlib stream.
    """
    if holo.kind not in KINDS:
        raise HoloError(f"unknown kind {holo.kind!r}")
    meta = json.dumps(holo.meta, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()
    if len(meta) > MAX_META:
        raise HoloError(f"metadata is {len(meta)} bytes, limit {MAX_META}")
    payloads, entries = [], []
    for name, arr in holo.tensors.items():
        arr = np.asarray(arr, order="C")  # ascontiguousarray would turn 0-d into shape (1,)
        dt = arr.dtype.newbyteorder("<") if arr.dtype.byteorder == ">" else arr.dtype
        if dt not in DTYPE_CODES:
            raise HoloError(f"tensor {name!r}: unsupported dtype {arr.dtype}")
        raw = arr.astype(dt, copy=False).tobytes()
        flags = 0
        if name in deflate:
            co = zlib.compressobj(level, strategy=strategy)
            raw, flags = co.compress(raw) + co.flush(), FLAG_DEFLATE
        encoded = name.encode()
        if not 0 < len(encoded) <= MAX_NAME or arr.ndim > MAX_NDIM:
            raise HoloError(f"tensor {name!r}: bad name length or rank")
        if any(d >= MAX_DIM for d in arr.shape) or _extent(arr.shape, dt.itemsize) > MAX_TENSOR_BYTES:
            raise HoloError(f"tensor {name!r}: shape {arr.shape} is beyond the format's limits")
        entries.append((encoded, DTYPE_CODES[dt], arr.shape, flags))
        payloads.append(raw)
    dir_len = sum(ENTRY_HEAD.size + len(n) + ENTRY_TYPE.size + 4 * len(s) + ENTRY_TAIL.size
                  for n, _, s, _ in entries)
    offset = _align(HEADER.size + len(meta) + dir_len)
    directory = bytearray()
    offsets = []
    for (name, code, shape, flags), raw in zip(entries, payloads):
        directory += ENTRY_HEAD.pack(len(name)) + name
        directory += ENTRY_TYPE.pack(code, len(shape), flags, 0)
        directory += struct.pack(f"<{len(shape)}I", *shape)
        directory += ENTRY_TAIL.pack(offset, len(raw))
        offsets.append(offset)
        offset = _align(offset + len(raw))
    file_len = offset + CHECKSUM_LEN
    out = bytearray(file_len - CHECKSUM_LEN)
    out[:HEADER.size] = HEADER.pack(MAGIC, VERSION, KINDS[holo.kind], len(meta), len(entries),
                                    dir_len, file_len)
    pos = HEADER.size
    out[pos:pos + len(meta)] = meta
    pos += len(meta)
    out[pos:pos + dir_len] = directory
    for off, raw in zip(offsets, payloads):
        out[off:off + len(raw)] = raw
    return bytes(out) + hashlib.sha256(out).digest()


def load_hologram(data: bytes, max_inflate: int = DEFAULT_MAX_INFLATE) -> Holo:
    """Parse and verify a `.holo` file; raise HoloError naming the first failed check."""
    data = memoryview(bytes(data)) if not isinstance(data, (bytes, bytearray)) else memoryview(data)
    n = len(data)
    if n < HEADER.size + CHECKSUM_LEN:
        raise HoloError(f"truncated: {n} bytes is shorter than the header")
    magic, version, kind, meta_len, n_tensors, dir_len, file_len = HEADER.unpack_from(data, 0)
    if magic != MAGIC:
        raise HoloError("bad magic: not a .holo file")
    if version != VERSION:
        raise HoloError(f"unsupported version {version} (this reader knows {VERSION})")
    if kind not in KIND_NAMES:
        raise HoloError(f"unknown kind code {kind}")
    if file_len != n:
        raise HoloError(f"truncated or padded: header says {file_len} bytes, got {n}")
    if hashlib.sha256(data[:n - CHECKSUM_LEN]).digest() != bytes(data[n - CHECKSUM_LEN:]):
        raise HoloError("checksum mismatch: the file is corrupted")
    body_end = n - CHECKSUM_LEN
    if meta_len > MAX_META or n_tensors > MAX_TENSORS:
        raise HoloError(f"absurd header: meta_len={meta_len}, n_tensors={n_tensors}")
    data_start = HEADER.size + meta_len + dir_len
    if data_start > body_end:
        raise HoloError("metadata and directory run past the end of the file")
    try:
        meta = json.loads(bytes(data[HEADER.size:HEADER.size + meta_len]).decode(),
                          parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:  # also huge ints and deep nesting
        raise HoloError(f"metadata is not valid JSON: {e}") from None
    if not isinstance(meta, dict):
        raise HoloError("metadata must be a JSON object")

    pos, dir_end = HEADER.size + meta_len, data_start
    tensors: dict[str, np.ndarray] = {}
    prev_end, inflated = data_start, 0

    def take(size: int) -> memoryview:
        nonlocal pos
        if pos + size > dir_end:
            raise HoloError("directory entry runs past the directory")
        chunk = data[pos:pos + size]
        pos += size
        return chunk

    for _ in range(n_tensors):
        (name_len,) = ENTRY_HEAD.unpack(take(ENTRY_HEAD.size))
        if not 0 < name_len <= MAX_NAME:
            raise HoloError(f"bad tensor name length {name_len}")
        try:
            name = bytes(take(name_len)).decode()
        except UnicodeDecodeError:
            raise HoloError("tensor name is not UTF-8") from None
        code, ndim, flags, _ = ENTRY_TYPE.unpack(take(ENTRY_TYPE.size))
        if code not in DTYPES:
            raise HoloError(f"tensor {name!r}: unknown dtype code {code}")
        if ndim > MAX_NDIM or flags & ~FLAG_DEFLATE:
            raise HoloError(f"tensor {name!r}: bad rank {ndim} or flags {flags}")
        shape = struct.unpack(f"<{ndim}I", take(4 * ndim))
        dtype = DTYPES[code]
        # Python ints: exact, where a uint64 product can wrap to 0. A 0 dimension makes the
        # tensor empty, yet numpy still refuses a shape whose other dimensions multiply past
        # its index range, so they are bounded too.
        if any(d >= MAX_DIM for d in shape) or _extent(shape, dtype.itemsize) > MAX_TENSOR_BYTES:
            raise HoloError(f"tensor {name!r}: absurd shape {shape}")
        offset, nbytes = ENTRY_TAIL.unpack(take(ENTRY_TAIL.size))
        if name in tensors:
            raise HoloError(f"duplicate tensor name {name!r}")
        if offset % ALIGN or offset < prev_end or offset + nbytes > body_end:
            raise HoloError(f"tensor {name!r}: offset {offset}+{nbytes} out of range or misaligned")
        prev_end = offset + nbytes
        raw_size = dtype.itemsize * math.prod(shape)  # <= extent <= MAX_TENSOR_BYTES
        stored = data[offset:offset + nbytes]
        if flags & FLAG_DEFLATE:
            inflated += raw_size
            if inflated > max_inflate:
                raise HoloError(f"tensor {name!r}: inflated size exceeds limit {max_inflate}")
            stored = _inflate(name, stored, raw_size)
        elif nbytes != raw_size:
            raise HoloError(f"tensor {name!r}: {nbytes} bytes stored, shape {shape} needs {raw_size}")
        tensors[name] = np.frombuffer(stored, dtype=dtype).reshape(shape)
    if pos != dir_end:
        raise HoloError("directory length does not match its entries")
    return Holo(KIND_NAMES[kind], meta, tensors)


def _reject_constant(token: str):
    # JSON has no NaN/Infinity; JSON.parse in the browser rejects them, so this reader does too.
    raise ValueError(f"{token} is not JSON")


def _inflate(name: str, stored: memoryview, raw_size: int) -> bytes:
    d = zlib.decompressobj()
    try:
        out = d.decompress(stored, max(raw_size, 1))  # max_length 0 would mean unlimited
    except zlib.error as e:
        raise HoloError(f"tensor {name!r}: bad deflate stream ({e})") from None
    if len(out) != raw_size or d.unconsumed_tail or d.unused_data or not d.eof:
        raise HoloError(f"tensor {name!r}: deflate stream does not inflate to {raw_size} bytes")
    return out
