"""Memory snapshots on disk: one `.holo` file each (kind `captured_state`, format `hpi.memory/2`).

A snapshot is the whole memory; what it learned since is in its journal (journal.py). A
snapshot's meta names its owner and memory name, so a file renamed or copied to another
owner is refused, and a random snapshot id, which ties the journal to it. A save writes the
whole memory to a temporary file, syncs it, renames it over the old one and syncs the
directory, so a crash leaves the previous file or the new one, never a mix. A load checks
the container's SHA-256 first (protocol/holo.py) and then every array against the
configuration, so a corrupted or hostile file is reported, never used.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import NamedTuple

import numpy as np

from hpi.protocol.holo import HEADER, Holo, HoloError, load_hologram, save_hologram
from hpi.durable import write_atomic
from hpi.memory import so4
from hpi.memory.episodic import Episodic
from hpi.memory.store import Config, Memory, Prototypes

FORMAT = "hpi.memory/2"  # /1 had no owner, snapshot id or episode count
KIND = "captured_state"


class CorruptMemory(ValueError):
    """A memory file failed its checksum or its consistency checks."""


class Stored(NamedTuple):
    owner: str  # the owner id (server/owners.py); "" outside the service
    name: str
    snapshot: str  # hex id the journal's header repeats; "" when there is no journal
    mem: Memory


def to_holo(mem: Memory, name: str, owner: str = "", snapshot: str = "", client: str = "") -> Holo:
    ep, pr = mem.episodic, mem.prototypes
    ep.compact()
    meta = {"format": FORMAT, "owner": owner, "client": client, "name": name, "snapshot": snapshot,
            "config": mem.config.as_dict(),
            "patterns": mem.patterns, "dreams": mem.dreams, "episodes": len(ep.targets),
            "embeddings": so4.fingerprint(mem.emb)}
    tensors = {
        "satellites": mem.satellites,
        "load": mem.load.astype(np.uint32),
        "unigram": mem.unigram.astype(np.uint32),
        "episodic.contexts": ep.contexts,
        "episodic.targets": ep.targets,
        "episodic.counts": ep.counts.astype(np.uint32),
        "prototypes.witness": pr.witness,
        "prototypes.matrix": pr.matrix,
        "prototypes.offsets": pr.offsets.astype(np.uint32),
        "prototypes.targets": pr.targets,
        "prototypes.counts": pr.counts.astype(np.uint32),
    }
    return Holo(KIND, meta, tensors)


def from_holo(holo: Holo) -> Stored:
    meta, t = holo.meta, holo.tensors
    if holo.kind != KIND or meta.get("format") != FORMAT:
        raise CorruptMemory(f"not a memory file (kind {holo.kind!r}, format {meta.get('format')!r})")
    try:
        config = Config(**meta["config"])
        owner, name, snapshot = str(meta["owner"]), str(meta["name"]), str(meta["snapshot"])
        patterns, dreams, episodes = int(meta["patterns"]), int(meta["dreams"]), int(meta["episodes"])
    except (KeyError, TypeError, ValueError) as e:
        raise CorruptMemory(f"bad memory metadata: {e}") from None
    c = config
    need = {"satellites": ((c.satellites, c.dim, c.dim), "<f4"), "load": ((c.satellites,), "<u4"),
            "unigram": ((c.vocab,), "<u4"), "episodic.contexts": ((None, c.context), "<i4"),
            "episodic.targets": ((None,), "<i4"), "episodic.counts": ((None,), "<u4"),
            "prototypes.witness": ((None, 2), "<f4"), "prototypes.matrix": ((None, c.dim, c.dim), "<f4"),
            "prototypes.offsets": ((None,), "<u4"), "prototypes.targets": ((None,), "<i4"),
            "prototypes.counts": ((None,), "<u4")}
    for key, (shape, dtype) in need.items():
        a = t.get(key)
        if a is None or a.dtype != np.dtype(dtype) or a.ndim != len(shape) or any(
                s is not None and s != n for s, n in zip(shape, a.shape)):
            raise CorruptMemory(f"tensor {key!r} is missing or has the wrong dtype or shape")
    n_ep, n_pr = len(t["episodic.targets"]), len(t["prototypes.witness"])
    offsets = t["prototypes.offsets"].astype(np.int64)
    checks = [
        (episodes == len(t["episodic.contexts"]) == n_ep == len(t["episodic.counts"]),
         "episodic arrays differ in length"),
        (_ids_ok(t["episodic.contexts"], c.vocab) and _ids_ok(t["episodic.targets"], c.vocab), "token id out of range"),
        (bool((t["episodic.counts"] > 0).all()), "an episode has count 0"),
        (len(t["prototypes.matrix"]) == n_pr and len(offsets) == n_pr + 1, "prototype arrays differ in length"),
        (offsets[0] == 0 and bool((np.diff(offsets) >= 0).all()) and offsets[-1] == len(t["prototypes.targets"])
         == len(t["prototypes.counts"]), "prototype offsets are inconsistent"),
        (_ids_ok(t["prototypes.targets"], c.vocab), "prototype target out of range"),
        (bool(np.isfinite(t["satellites"]).all() and np.isfinite(t["prototypes.witness"]).all()), "non-finite values"),
    ]
    for ok, why in checks:
        if not ok:
            raise CorruptMemory(why)
    ep = Episodic(c.context)
    ep.add(np.array(t["episodic.contexts"]), np.array(t["episodic.targets"]), t["episodic.counts"].astype(np.int64))
    ep.compact()
    protos = Prototypes(np.array(t["prototypes.witness"]), np.array(t["prototypes.matrix"]), offsets,
                        np.array(t["prototypes.targets"]), t["prototypes.counts"].astype(np.int64))
    mem = Memory(config, np.array(t["satellites"]), t["load"].astype(np.int64), t["unigram"].astype(np.int64),
                 ep, protos, patterns, dreams)
    if so4.fingerprint(mem.emb) != meta.get("embeddings"):
        raise CorruptMemory("the token embeddings rebuilt from the seed differ from the saved ones")
    return Stored(owner, name, snapshot, mem)


def _ids_ok(a: np.ndarray, vocab: int) -> bool:
    return a.size == 0 or (int(a.min()) >= 0 and int(a.max()) < vocab)


def save(mem: Memory, name: str, path: Path, owner: str = "", snapshot: str = "", client: str = "") -> int:
    """Write the memory to `path` atomically and durably; returns the bytes written."""
    data = save_hologram(to_holo(mem, name, owner, snapshot, client))
    write_atomic(path, data)
    return len(data)


def load(path: Path) -> Stored:
    """Read a memory file; CorruptMemory says what is wrong with it."""
    try:
        return from_holo(load_hologram(path.read_bytes()))
    except HoloError as e:
        raise CorruptMemory(str(e)) from None


def peek(path: Path) -> tuple[Config, int, str]:
    """A snapshot's config, episode rows and creating client from its meta alone, unchecked: what
    the anchor counts against its budgets at start without reading every memory in full."""
    try:
        with path.open("rb") as f:
            head = f.read(HEADER.size)
            meta_len = HEADER.unpack(head)[3]
            meta = json.loads(f.read(meta_len))
        return Config(**meta["config"]), int(meta["episodes"]), str(meta.get("client", ""))
    except (OSError, struct.error, ValueError, TypeError, KeyError) as e:
        raise CorruptMemory(f"unreadable memory metadata ({type(e).__name__})") from None
