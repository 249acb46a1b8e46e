"""The memories of their owners: a snapshot and a learn journal each, loaded on first use,
one lock each, all within byte budgets.

A memory belongs to its owner (the id of an owner token, server/owners.py) and is keyed by
(owner id, name): names are per owner, and another owner's memory is answered exactly like
a missing one. Its files are `<owner id>.<name>.holo` (the snapshot, persist.py) and
`<owner id>.<name>.holo.journal` (journal.py); the snapshot's meta repeats owner and name.

Every operation on a memory runs under that memory's lock, so concurrent learns on one
memory are applied one after the other; different memories do not wait for each other.
A learn is appended to the journal and synced before the call returns (the caller
acknowledges only what is on disk); a dream, and a learn that finds the journal larger than
the snapshot, write a new snapshot. If a write fails, the memory returns to its last saved
state: it is dropped and reloaded from disk on its next use.

Before anything is allocated, a memory's bytes are known from its config (budget.py): a
create or a learn that would take one memory past its budget is refused (413), as is one
that would take all memories past theirs (503, like a full server), and one owner holds at
most `MAX_PER_OWNER` of the `max_memories`. The budgets count every memory on disk, loaded
or not, so the registry reads the directory once at start: one anchor per directory. Owner
tokens are free, so the client (IP address) that created a memory counts too: one client
holds at most `client_share` of the memories and of their bytes (429), whatever its tokens.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np

from hpi.errors import (ClientQuota, InvalidName, MemoriesFull, MemoryCorrupted, MemoryExists, MemoryTooLarge,
                        OwnerMemoryLimit, TooManyMemories, TooShort, UnknownMemory, quoted)
from hpi.memory import budget, journal, persist
from hpi.memory.store import Config, Memory

log = logging.getLogger(__name__)

NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # safe as a file name, and without the dot that ends the owner id
FILE = re.compile(r"^([0-9a-f]{32})\.([A-Za-z0-9_-]{1,64})\.holo$")
SNAPSHOT_ID = re.compile(r"^[0-9a-f]{32}$")
T = TypeVar("T")
Key = tuple[str, str]  # (owner id, name)


@dataclass
class _Open:
    """A loaded memory and where its files stand."""
    mem: Memory
    snapshot: str  # the id its journal's header must carry
    snapshot_bytes: int
    journal_end: int  # acknowledged length of the journal


def _unknown(name: str) -> UnknownMemory:
    return UnknownMemory(f"no memory {quoted(name)}")


class Registry:
    def __init__(self, path: Path, max_memories: int, client_share: float = 1.0):
        self.path = path
        self.max_memories = max_memories
        self.client_share = client_share
        self.max_bytes, self.total_bytes = budget.MAX_MEMORY_BYTES, budget.MAX_TOTAL_BYTES
        self.per_owner = budget.MAX_PER_OWNER
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._loaded: dict[Key, _Open] = {}
        self._locks: dict[Key, threading.Lock] = {}
        self._charges: dict[Key, int] = {}  # every memory on disk: its bytes by budget.nbytes
        self._clients: dict[Key, str] = {}  # who created it
        self._guard = threading.Lock()  # protects the dicts above and the budgets
        self._scan()

    def file(self, key: Key) -> Path:
        return self.path / f"{key[0]}.{key[1]}.holo"

    def journal_file(self, key: Key) -> Path:
        return self.path / f"{key[0]}.{key[1]}.holo.journal"

    def names(self, owner: str) -> list[str]:
        with self._guard:
            return sorted(name for o, name in self._charges if o == owner)

    def _scan(self) -> None:
        ownerless = []
        for p in sorted(self.path.glob("*.holo")):
            m = FILE.match(p.name)
            if m:
                self._charges[(m[1], m[2])], self._clients[(m[1], m[2])] = self._charge_on_disk((m[1], m[2]))
            else:
                ownerless.append(p.name)
        if ownerless:
            log.warning("ignoring %d memory files of the layout without owners in %s: %s",
                        len(ownerless), self.path, ", ".join(ownerless))
        for j in self.path.glob("*.holo.journal"):
            if not j.with_suffix("").exists():
                j.unlink()  # left by a delete cut short after its snapshot was gone

    def _charge_on_disk(self, key: Key) -> tuple[int, str]:
        """Bytes of a memory not loaded (its snapshot's rows, plus a row per journaled token) and
        the client that created it."""
        try:
            config, rows, client = persist.peek(self.file(key))
        except persist.CorruptMemory:
            return self.file(key).stat().st_size, ""  # unusable until deleted: it holds its disk space
        try:
            journaled = max(0, self.journal_file(key).stat().st_size - journal.HEADER) // 4
        except FileNotFoundError:
            journaled = 0
        return budget.nbytes(config, rows + journaled), client

    def _lock(self, key: Key) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(key, threading.Lock())

    def create(self, owner: str, name: str, config: Config, client: str = "") -> Memory:
        if not NAME.match(name):
            raise InvalidName("a memory name is 1 to 64 of A-Z a-z 0-9 _ -")
        need = budget.nbytes(config, 0)
        if need > self.max_bytes:
            raise MemoryTooLarge(
                f"this memory would take {budget.mib(need)}; one memory may take "
                f"{budget.mib(self.max_bytes)} (fewer satellites, a smaller dim or vocab)")
        key = (owner, name)
        with self._lock(key):
            with self._guard:
                if key in self._charges:
                    raise MemoryExists(f"memory {name!r} already exists")
                if sum(o == owner for o, _ in self._charges) >= self.per_owner:
                    raise OwnerMemoryLimit(
                        f"one owner may hold {self.per_owner} memories; delete one first")
                if client and sum(c == client for c in self._clients.values()) >= self._client_count():
                    raise ClientQuota(f"one client may hold {self._client_count()} "
                                      "memories, whatever its owner tokens; delete one first")
                if len(self._charges) >= self.max_memories:
                    raise TooManyMemories(
                        f"the server holds its limit of {self.max_memories} memories")
                if self._total() + need > self.total_bytes:
                    raise MemoriesFull(
                        f"the server's memories have no room for {budget.mib(need)} more")
                self._check_client_bytes(client, need)
                self._charges[key] = need  # reserved before anything is allocated
                self._clients[key] = client
            try:
                mem = Memory(config)
                self._loaded[key] = self._snapshot(key, mem)
            except BaseException:
                with self._guard:
                    del self._charges[key], self._clients[key]
                self.file(key).unlink(missing_ok=True)
                self.journal_file(key).unlink(missing_ok=True)
                raise
            return mem

    @contextmanager
    def use(self, owner: str, name: str) -> Iterator[Memory]:
        """The memory, loaded if needed, under its lock (read-only use)."""
        key = (owner, name)
        with self._lock(key):
            yield self._get(key).mem

    def learn(self, owner: str, name: str, ids: np.ndarray) -> tuple[int, int]:
        """Learn a token sequence, journaled and synced before returning: (samples, patterns)."""
        key = (owner, name)
        with self._lock(key):
            entry = self._get(key)
            mem = entry.mem
            n = mem.config.context
            if len(ids) <= n:
                raise TooShort(f"{len(ids)} tokens make no sample for a context "
                               f"of {n}: give at least {n + 1}")
            mem.check_ids(ids)
            self._grow(key, mem, len(ids) - n)
            try:
                samples = mem.learn_sequence(ids)
                entry.journal_end = journal.append(self.journal_file(key), entry.journal_end, ids)
            except BaseException:
                self._loaded.pop(key, None)  # the next use reloads the last saved state
                raise
            if entry.journal_end - journal.HEADER > entry.snapshot_bytes:
                try:  # replay would cost more than reading the memory: fold the journal in
                    self._loaded[key] = self._snapshot(key, mem)
                except Exception:  # the learn is safe in the journal; the next use reloads it
                    log.exception("compacting memory %s failed", self.file(key).name)
                    self._loaded.pop(key, None)
            return samples, mem.patterns

    def change(self, owner: str, name: str, fn: Callable[[Memory], T]) -> T:
        """Apply `fn` to the memory under its lock and write a new snapshot before returning
        fn's result: for changes the journal cannot replay (dreaming)."""
        key = (owner, name)
        with self._lock(key):
            mem = self._get(key).mem
            try:
                result = fn(mem)
                self._loaded[key] = self._snapshot(key, mem)
            except BaseException:
                self._loaded.pop(key, None)
                raise
            with self._guard:
                self._charges[key] = budget.nbytes(mem.config, mem.episodic.bound())
            return result

    def delete(self, owner: str, name: str) -> None:
        key = (owner, name)
        with self._lock(key):
            with self._guard:
                if key not in self._charges:
                    raise _unknown(name)
            self.file(key).unlink(missing_ok=True)  # gone with its snapshot; then the journal
            self.journal_file(key).unlink(missing_ok=True)
            self._loaded.pop(key, None)
            with self._guard:
                del self._charges[key], self._clients[key]

    def _total(self) -> int:
        return sum(self._charges.values())

    def _client_count(self) -> int:
        return max(1, int(self.max_memories * self.client_share))

    def _check_client_bytes(self, client: str, extra: int) -> None:
        """429 when `extra` more bytes would take the client past its share (under the guard)."""
        share = int(self.total_bytes * self.client_share)
        held = sum(self._charges[k] for k, c in self._clients.items() if c == client)
        if client and held + extra > share:
            raise ClientQuota(f"this client's memories would take "
                              f"{budget.mib(held + extra)}; one client may hold {budget.mib(share)}")

    def _grow(self, key: Key, mem: Memory, samples: int) -> None:
        """Count `samples` more episode rows against the budgets before they are learned."""
        rows = mem.episodic.bound()
        if not self._fits(key, budget.nbytes(mem.config, rows + samples)):
            mem.episodic.compact()  # the bound counts a repeated (context, target) as new until then
            rows = len(mem.episodic.targets)
        need = budget.nbytes(mem.config, rows + samples)
        if need > self.max_bytes:
            raise MemoryTooLarge(
                f"learning {samples} more samples could take this memory to {budget.mib(need)}, "
                f"over the {budget.mib(self.max_bytes)} one memory may take")
        with self._guard:
            if not self._fits_total(key, need):
                raise MemoriesFull("the server's memories have no room for this learn")
            self._check_client_bytes(self._clients[key], need - self._charges[key])
            self._charges[key] = need

    def _fits(self, key: Key, need: int) -> bool:
        with self._guard:
            return need <= self.max_bytes and self._fits_total(key, need)

    def _fits_total(self, key: Key, need: int) -> bool:
        """Whether the memory `key` may take `need` bytes (under the guard)."""
        return self._total() - self._charges[key] + need <= self.total_bytes

    def _snapshot(self, key: Key, mem: Memory) -> _Open:
        """Write the memory whole, then an empty journal for it."""
        sid = secrets.token_hex(journal.ID_BYTES)
        size = persist.save(mem, key[1], self.file(key), owner=key[0], snapshot=sid,
                            client=self._clients.get(key, ""))
        return _Open(mem, sid, size, journal.start(self.journal_file(key), sid))

    def _get(self, key: Key) -> _Open:
        if key in self._loaded:
            return self._loaded[key]
        with self._guard:
            if key not in self._charges:
                raise _unknown(key[1])
        try:
            entry = self._open(key)
        except (persist.CorruptMemory, journal.CorruptJournal) as e:
            log.error("memory file %s is corrupted: %s", self.file(key), e)
            raise MemoryCorrupted(f"memory {key[1]!r} failed its checks at load and is not used (the failure is "
                                  "logged); delete it to start again") from None
        self._loaded[key] = entry
        with self._guard:
            self._charges[key] = budget.nbytes(entry.mem.config, entry.mem.episodic.bound())
        return entry

    def _open(self, key: Key) -> _Open:
        """Load a memory: its snapshot, checked, and the learns of its journal replayed."""
        path, jpath = self.file(key), self.journal_file(key)
        stored = persist.load(path)
        if (stored.owner, stored.name) != key:
            raise persist.CorruptMemory("the file holds another memory than its name says")
        if not SNAPSHOT_ID.match(stored.snapshot):
            raise persist.CorruptMemory("the file has no snapshot id")
        mem, size = stored.mem, path.stat().st_size
        found = journal.read(jpath, stored.snapshot)
        if found is None:  # none yet, or the journal an interrupted snapshot left behind
            return _Open(mem, stored.snapshot, size, journal.start(jpath, stored.snapshot))
        records, end = found
        for i, ids in enumerate(records):
            if len(ids) <= mem.config.context or ids.min() < 0 or ids.max() >= mem.config.vocab:
                raise journal.CorruptJournal(f"learn journal record {i} is no learn of this memory")
            mem.learn_sequence(ids)
        if end < jpath.stat().st_size:
            log.warning("dropping the torn last record of %s: a learn never acknowledged", jpath)
            os.truncate(jpath, end)
        return _Open(mem, stored.snapshot, size, end)
