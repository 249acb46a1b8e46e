"""What a memory costs in bytes, known from its configuration before anything is allocated.

A memory is held in full in RAM once used, and its files take about as much on disk, so
the anchor refuses a memory (or a learn) that would not fit instead of finding out by
running out of memory. The estimate is an upper bound of what `store.Memory` holds:

  fixed     S·d²·4 satellites + S·8 routing load + V·8 unigram + V·d²·(8+4) the two
            embedding tables (float64 for contexts, float32 rows for scoring) + V·16 the
            cached prior and its order + V·8 the learned-token index
  growing   per episode row (one per distinct (context, target)): n·4 context ids + 4 target
            + 8 count + 8 hash; and the prototypes dreaming may build from those rows, at
            most one per two distinct contexts (16 + 4·d² bytes each) with at most one
            (target, count) pair of 12 bytes per row: together n·4 + 40 + 2·d² per row

A learn of L tokens adds at most L - n rows, so its growth is checked before it is applied.
"""

from __future__ import annotations

from hpi.memory.store import Config

MAX_MEMORY_BYTES = 64 << 20  # one memory: refused with 413 memory_too_large beyond it
MAX_TOTAL_BYTES = 512 << 20  # all memories of the anchor together: 503 memories_full beyond it
MAX_PER_OWNER = 8  # memories one owner may hold, so no one takes all of HPI_MAX_MEMORIES


def fixed_bytes(c: Config) -> int:
    """Bytes of a memory with nothing learned."""
    d2 = c.dim * c.dim
    return c.satellites * (4 * d2 + 8) + c.vocab * (8 + 12 * d2 + 16 + 8)


def row_bytes(c: Config) -> int:
    """Bytes one more episode row may add, prototypes included."""
    return 4 * c.context + 40 + 2 * c.dim * c.dim


def nbytes(c: Config, rows: int) -> int:
    """Upper bound of a memory's bytes with `rows` episode rows."""
    return fixed_bytes(c) + rows * row_bytes(c)


def mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"
