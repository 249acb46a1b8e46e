"""One forward at a time over all pending work: continuous batching of the anchor's model.

Request threads (verification passes, prefill chunks, anchor-only decoding steps) submit
sequences and wait; one worker thread takes everything that arrived, waits up to `wait_s`
for more while the batch is small, runs a single batched forward (server/engine.py) and
hands each caller its logits. So the cores run one forward with all their threads instead
of many forwards fighting over them, and a batch reads the weights once for all its rows.
A long prompt arrives in chunks (server/anchor.py), so it cannot hold everyone's
verification back for longer than a chunk. Callers ask `check_room` before they start
model work: past `max_queued_rows` rows waiting, new work is refused (503) at once rather
than every user's next token waiting longer.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

import torch

from hpi import kernels
from hpi.errors import ServerBusy
from hpi.engine import Engine, Seq, check_invariance
from hpi.metrics import METRICS

log = logging.getLogger(__name__)


@dataclass
class _Job:
    seqs: list[Seq]
    rows: int
    steps: bool  # rows of generated tokens only (verification, decoding): a user waits on them mid-answer
    queued: float = field(default_factory=time.monotonic)
    done: threading.Event = field(default_factory=threading.Event)
    result: list[torch.Tensor] | None = None
    error: BaseException | None = None


class Scheduler:
    def __init__(self, engine: Engine, max_rows: int = 512, wait_s: float = 0.002, max_queued_rows: int = 0):
        self.engine = engine
        self.max_rows = max_rows
        self.wait_s = wait_s
        self.max_queued_rows = max_queued_rows  # 0: no bound
        self._pending: list[_Job] = []
        self._cv = threading.Condition()
        self._worker: threading.Thread | None = None
        if not check_invariance(engine):
            log.warning("on this machine a row's projection differs alone and in a batch: verification may "
                        "disagree with anchor-only decoding where two tokens tie to the last bit")

    def check_room(self) -> None:
        """ServerBusy if the rows already waiting for a forward reach `max_queued_rows`."""
        with self._cv:
            queued = sum(j.rows for j in self._pending)
        if self.max_queued_rows and queued >= self.max_queued_rows:
            METRICS.add("hpi_refused_busy_total")
            raise ServerBusy(f"the anchor's forwards are {queued} rows behind; retry shortly", retry_after=1)

    def run(self, seqs: list[Seq]) -> list[torch.Tensor]:
        """Run the sequences in the next forward; their logits (see Engine.forward)."""
        job = _Job(seqs, sum(len(s.ids) for s in seqs), all(s.generated for s in seqs))
        with self._cv:
            if self._worker is None:
                self._worker = threading.Thread(target=self._serve, name="hpi-forward", daemon=True)
                self._worker.start()
            self._pending.append(job)
            self._cv.notify()
        job.done.wait()
        if job.error is not None:
            raise job.error
        return job.result

    def _take(self) -> list[_Job]:
        """The next batch: what is pending, after waiting briefly for more while it is small.

        Steps (verification passes, decoding steps) go first, so a user mid-answer waits for one
        forward rather than behind every prompt chunk queued before its draft; prompt chunks fill
        the rest and keep a quarter of the rows while they wait, so they are never starved. Each
        kind is taken in arrival order. A row's bits do not depend on its batch, so the order
        changes no answer."""
        with self._cv:
            while not self._pending:
                self._cv.wait()
            deadline = time.monotonic() + self.wait_s
            while sum(j.rows for j in self._pending) < self.max_rows and (left := deadline - time.monotonic()) > 0:
                self._cv.wait(left)
            steps = [j for j in self._pending if j.steps]
            prompts = [j for j in self._pending if not j.steps]
            batch, rows = [], 0
            for jobs, room in ((steps, self.max_rows - (self.max_rows // 4 if prompts else 0)), (prompts, self.max_rows)):
                for job in jobs:
                    if batch and rows + job.rows > room:
                        break
                    batch.append(job)
                    rows += job.rows
            taken = {id(j) for j in batch}
            self._pending = [j for j in self._pending if id(j) not in taken]
            return batch

    def _serve(self) -> None:
        # Where the kernels run every product (server/kernels.py, on HPI_THREADS threads), torch's
        # own ops in the forward are small: on one thread they cannot spin against the kernels' pool.
        torch.set_num_threads(1 if self.engine.all_kernels else kernels.threads())
        while True:  # a batch is referenced by the call alone: its caches are not kept past it
            self._forward(self._take())

    def _forward(self, batch: list[_Job]) -> None:
        now = time.monotonic()
        for job in batch:
            METRICS.observe("hpi_queue_wait_seconds", now - job.queued)
        seqs = [s for job in batch for s in job.seqs]
        METRICS.observe("hpi_batch_sequences", len(seqs))
        METRICS.observe("hpi_batch_rows", sum(job.rows for job in batch))
        try:
            logits = self.engine.forward(seqs)
            METRICS.add("hpi_forward_passes_total")
        except BaseException as e:  # each caller reverts its own session
            for job in batch:
                job.error = e
                job.done.set()
            return
        for job in batch:
            job.result, logits = logits[:len(job.seqs)], logits[len(job.seqs):]
            job.done.set()
