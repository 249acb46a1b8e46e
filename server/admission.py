"""Admission of long model work (chat completions): a few run at once, a bounded line waits,
and the rest are refused at once with 503 and `Retry-After` rather than slowing everyone down.

Forwards that run side by side on a few cores only share them: forty decodes at once made
each token three times slower and the health check wait behind them. So `running` jobs hold
the cores and at most `waiting` more wait for a turn.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from hpi.errors import ServerBusy


class Slots:
    def __init__(self, running: int, waiting: int, what: str = "requests"):
        self.what = what
        self._turns = threading.Semaphore(running)
        self._capacity = running + waiting
        self._admitted = 0
        self._lock = threading.Lock()

    def admit(self) -> Place:
        """A place (running or waiting), or ServerBusy. Give it back with `release` (also done when it is
        dropped, so a response that is never iterated cannot keep one)."""
        with self._lock:
            if self._admitted >= self._capacity:
                raise ServerBusy(f"the anchor is serving its limit of {self._capacity} {self.what}; retry shortly")
            self._admitted += 1
        return Place(self)

    def _release(self) -> None:
        with self._lock:
            self._admitted -= 1

    @contextmanager
    def turn(self) -> Iterator[None]:
        """Run once a turn is free, on an admitted place (blocking: call it in a worker thread)."""
        with self._turns:
            yield


class Place:
    def __init__(self, slots: Slots):
        self._slots: Slots | None = slots

    def release(self) -> None:
        slots, self._slots = self._slots, None
        if slots is not None:
            slots._release()

    __del__ = release
