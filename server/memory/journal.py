"""The learn journal: what a memory learned since its last snapshot, appended, one record a learn.

Rewriting a whole memory file on every learn costs the whole memory each time; appending
the learned token ids costs the learn alone. A memory on disk is therefore its `.holo`
snapshot plus this journal, and loading it replays the journal onto the snapshot. Replay
reproduces the state exactly because learning is deterministic (store.py).

Layout (little-endian):
  header  8 bytes MAGIC, 16 bytes the snapshot id (persist.py writes it in the snapshot's meta)
  record  u32 n, n × i32 token ids, u32 CRC-32 of the n and the ids

The header ties the journal to one snapshot: a journal whose id is not the snapshot's
predates it (the snapshot already holds those learns) and is dropped. A record is synced
before its learn is acknowledged. A crash while appending can leave only the last record
incomplete or garbled; that tail was never acknowledged and is cut off at load. Any other
bad record means the file was damaged, and the memory is reported corrupted.
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np

from hpi.durable import write_atomic

MAGIC = b"HPIMJ\x001\n"
ID_BYTES = 16
HEADER = len(MAGIC) + ID_BYTES
_U32 = struct.Struct("<I")


class CorruptJournal(ValueError):
    """A journal failed its checks anywhere but in a torn last record."""


def start(path: Path, snapshot: str) -> int:
    """Replace the journal by an empty one for `snapshot` (hex id); returns its length."""
    write_atomic(path, MAGIC + bytes.fromhex(snapshot))
    return HEADER


def record(ids: np.ndarray) -> bytes:
    body = _U32.pack(len(ids)) + np.asarray(ids, "<i4").tobytes()
    return body + _U32.pack(zlib.crc32(body))


def append(path: Path, end: int, ids: np.ndarray) -> int:
    """Write one record at `end` (the journal's acknowledged length), synced; returns the new end.

    Whatever lies past `end` (the remains of a failed append) is cut off first, so a record
    always follows the last acknowledged one directly.
    """
    data = record(ids)
    fd = os.open(path, os.O_WRONLY)
    try:
        if os.fstat(fd).st_size != end:
            os.ftruncate(fd, end)
        written = 0
        while written < len(data):
            written += os.pwrite(fd, data[written:], end + written)
        os.fsync(fd)
    except BaseException:
        try:  # a learn that failed must not come back at the next load
            os.ftruncate(fd, end)
        except OSError:
            pass  # a complete record then stays and is replayed: saved, though reported failed
        raise
    finally:
        os.close(fd)
    return end + len(data)


def read(path: Path, snapshot: str) -> tuple[list[np.ndarray], int] | None:
    """The records learned since `snapshot` and the length of the file they fill.

    None when there is no journal or it belongs to an older snapshot. A length short of the
    file's means a torn last record follows.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    if len(data) < HEADER or data[:len(MAGIC)] != MAGIC:
        raise CorruptJournal("the learn journal has no valid header")
    if data[len(MAGIC):HEADER] != bytes.fromhex(snapshot):
        return None
    records, pos = [], HEADER
    while pos < len(data):
        end = pos + 8 + 4 * _U32.unpack_from(data, pos)[0] if pos + 4 <= len(data) else len(data) + 1
        if end > len(data):
            break  # torn: the last record runs past the end of the file
        body = data[pos:end - 4]
        if _U32.unpack_from(data, end - 4)[0] != zlib.crc32(body):
            if end == len(data) or data.count(0, pos) == len(data) - pos:
                break  # torn: the last record garbled, or the zeros of a block never written
            raise CorruptJournal(f"learn journal record at byte {pos} fails its checksum")
        records.append(np.frombuffer(body, "<i4", offset=4).astype(np.int64))
        pos = end
    return records, pos
