"""Named memories: one file each under a directory, loaded on first use, one lock each.

Every operation on a memory runs under that memory's lock, so concurrent learns on one
memory are applied one after the other; different memories do not wait for each other.
A change is saved before the call returns (the caller acknowledges only what is on disk);
if the save fails, the memory returns to its last saved state.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from server.memory import persist
from server.memory.store import Config, Memory

log = logging.getLogger(__name__)

NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # safe as a file name
T = TypeVar("T")


class MemoryServiceError(Exception):
    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code = status, code


class Registry:
    def __init__(self, path: Path, max_memories: int):
        self.path = path
        self.max_memories = max_memories
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._loaded: dict[str, Memory] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()  # protects the two dicts and file creation/deletion

    def file(self, name: str) -> Path:
        return self.path / f"{name}.holo"

    def names(self) -> list[str]:
        return sorted(p.stem for p in self.path.glob("*.holo") if NAME.match(p.stem))

    def _lock(self, name: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(name, threading.Lock())

    def create(self, name: str, config: Config) -> Memory:
        if not NAME.match(name):
            raise MemoryServiceError(422, "invalid_name", "a memory name is 1 to 64 of A-Z a-z 0-9 _ -")
        with self._lock(name):
            with self._guard:
                if self.file(name).exists():
                    raise MemoryServiceError(409, "memory_exists", f"memory {name!r} already exists")
                if len(self.names()) >= self.max_memories:
                    raise MemoryServiceError(503, "too_many_memories",
                                             f"the server holds its limit of {self.max_memories} memories")
            mem = Memory(config)
            persist.save(mem, name, self.file(name))
            self._loaded[name] = mem
            return mem

    @contextmanager
    def use(self, name: str) -> Iterator[Memory]:
        """The memory, loaded if needed, under its lock (read-only use)."""
        with self._lock(name):
            yield self._get(name)

    def change(self, name: str, fn: Callable[[Memory], T]) -> T:
        """Apply `fn` to the memory under its lock and save it before returning fn's result."""
        with self._lock(name):
            mem = self._get(name)
            try:
                result = fn(mem)
                persist.save(mem, name, self.file(name))
            except BaseException:
                self._loaded.pop(name, None)  # the next use reloads the last saved state
                raise
            return result

    def delete(self, name: str) -> None:
        with self._lock(name):
            self._check_name(name)
            path = self.file(name)
            if not path.exists():
                raise MemoryServiceError(404, "unknown_memory", f"no memory {name!r}")
            path.unlink()
            self._loaded.pop(name, None)

    def _check_name(self, name: str) -> None:
        if not NAME.match(name):
            raise MemoryServiceError(404, "unknown_memory", f"no memory {name!r}")

    def _get(self, name: str) -> Memory:
        self._check_name(name)
        if name in self._loaded:
            return self._loaded[name]
        path = self.file(name)
        if not path.exists():
            raise MemoryServiceError(404, "unknown_memory", f"no memory {name!r}")
        try:
            stored, mem = persist.load(path)
        except persist.CorruptMemory as e:
            log.error("memory file %s is corrupted: %s", path, e)
            raise MemoryServiceError(409, "memory_corrupted",
                                     f"memory {name!r} failed its checks at load and is not used: {e}; "
                                     "delete it to start again") from None
        if stored != name:
            raise MemoryServiceError(409, "memory_corrupted", f"the file of {name!r} holds memory {stored!r}")
        self._loaded[name] = mem
        return mem
