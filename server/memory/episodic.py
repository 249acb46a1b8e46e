"""The exact episodic cache: which targets followed each stored context, and how often.

A context is n token ids. Learning appends to a pending log (O(1) per batch); the first
lookup after that merges the log into one table sorted by (hash of the context, target),
so a batch of lookups is a vectorised binary search. Every hit is checked against the
stored ids, so a hash collision can never return another context's targets: recall of a
stored context is exact by construction.
"""

from __future__ import annotations

import numpy as np

_MIX = np.random.default_rng(0x5EED).integers(1, 1 << 63, 256, dtype=np.uint64) | np.uint64(1)


def _finalize(h: np.ndarray) -> np.ndarray:
    # splitmix64's finalizer: spreads the bits so that the low bits alone are uniform.
    h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return h ^ (h >> np.uint64(31))


def hash_rows(rows: np.ndarray) -> np.ndarray:
    """(B, m) integers -> (B,) uint64; m ≤ 256 columns, each with its own odd multiplier."""
    if rows.shape[1] > len(_MIX):
        raise ValueError(f"at most {len(_MIX)} columns can be hashed, got {rows.shape[1]}")
    with np.errstate(over="ignore"):
        h = (rows.astype(np.uint64) * _MIX[: rows.shape[1]]).sum(axis=1, dtype=np.uint64)
        return _finalize(h)


class Episodic:
    def __init__(self, n: int):
        self.n = n
        self.contexts = np.zeros((0, n), np.int32)  # (N, n) one row per (context, target) pair
        self.targets = np.zeros(0, np.int32)  # (N,)
        self.counts = np.zeros(0, np.int64)  # (N,)
        self.keys = np.zeros(0, np.uint64)  # (N,) hash of the context; rows sorted by (key, target)
        self._pending: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    def add(self, contexts: np.ndarray, targets: np.ndarray, counts: np.ndarray | None = None) -> None:
        if counts is None:
            counts = np.ones(len(targets), np.int64)
        self._pending.append((contexts.astype(np.int32), targets.astype(np.int32), counts.astype(np.int64)))

    def __len__(self) -> int:
        self.compact()
        return len(self.targets)

    def bound(self) -> int:
        """Rows there will be after the next compaction, at most, without compacting."""
        return len(self.targets) + sum(len(p[1]) for p in self._pending)

    def compact(self) -> None:
        """Merge the pending log into the sorted table, summing repeated (context, target) pairs."""
        if not self._pending:
            return
        ctx = np.concatenate([self.contexts] + [p[0] for p in self._pending])
        tgt = np.concatenate([self.targets] + [p[1] for p in self._pending])
        cnt = np.concatenate([self.counts] + [p[2] for p in self._pending])
        self._pending = []
        keys = hash_rows(ctx)
        order = np.lexsort((tgt, keys))
        ctx, tgt, cnt, keys = ctx[order], tgt[order], cnt[order], keys[order]
        same_kt = (keys[1:] == keys[:-1]) & (tgt[1:] == tgt[:-1])
        same_ctx = (ctx[1:] == ctx[:-1]).all(axis=1)
        if (same_kt & ~same_ctx).any():
            # Two contexts share a 64-bit hash: order by the ids too so equal pairs stay adjacent.
            order = np.lexsort((*ctx.T[::-1], tgt, keys))
            ctx, tgt, cnt, keys = ctx[order], tgt[order], cnt[order], keys[order]
            same_kt = (keys[1:] == keys[:-1]) & (tgt[1:] == tgt[:-1])
            same_ctx = (ctx[1:] == ctx[:-1]).all(axis=1)
        starts = np.flatnonzero(np.concatenate([[True], ~(same_kt & same_ctx)])) if len(tgt) else np.zeros(0, int)
        self.contexts, self.targets, self.keys = ctx[starts], tgt[starts], keys[starts]
        self.counts = np.add.reduceat(cnt, starts) if len(starts) else cnt

    def lookup(self, contexts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(B, n) contexts -> matching rows as (query index, target, count), grouped by query."""
        self.compact()
        q = hash_rows(contexts)
        lo = np.searchsorted(self.keys, q, "left")
        hi = np.searchsorted(self.keys, q, "right")
        span = hi - lo
        qidx = np.repeat(np.arange(len(q)), span)
        rows = np.arange(span.sum()) - np.repeat(np.cumsum(span) - span, span) + np.repeat(lo, span)
        ok = (self.contexts[rows] == contexts[qidx]).all(axis=1)
        rows, qidx = rows[ok], qidx[ok]
        return qidx, self.targets[rows], self.counts[rows]

    def remove(self, keep: np.ndarray) -> None:
        """Keep only the rows where `keep` is true (the table must be compact)."""
        self.contexts, self.targets = self.contexts[keep], self.targets[keep]
        self.counts, self.keys = self.counts[keep], self.keys[keep]
