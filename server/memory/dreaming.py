"""Dreaming: consolidate episodes into prototypes, and φ-decay forgetting.

Non-REM consolidation clusters every stored episode by its witness (the scalar and
pseudoscalar part of its context matrix, the part Grace leaves intact) on a grid of cell
size `witness_resolution`; each cell with at least two distinct contexts becomes a
prototype: its centroid witness, its mean context matrix and the target distribution of
its episodes (the top CANDIDATES targets). Prototypes are rebuilt from all episodes at
each dream, so dreaming twice on the same memory gives the same prototypes.

Forgetting (optional, `forget` = k > 0): an episode whose target has count c in a context
whose most frequent target has count m has priority c/m and survives with probability
φ^(-k (1 - priority)); a forgotten episode is removed from the cache and its bindings are
taken back out of its basin, so the memory is exactly as if it had never been learned.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hpi.memory import clifford
from hpi.memory.store import CANDIDATES, InvalidInput, Memory, Prototypes


@dataclass
class DreamReport:
    episodes: int
    prototypes: int
    episodes_in_prototypes: int
    forgotten: int

    def as_dict(self) -> dict:
        return self.__dict__.copy()


def dream(mem: Memory, forget: float = 0.0) -> DreamReport:
    if forget < 0:
        raise InvalidInput(f"forget must be ≥ 0, got {forget}")
    ep = mem.episodic
    ep.compact()
    forgotten = _forget(mem, forget) if forget > 0 else 0
    mem.prototypes, covered = _consolidate(mem)
    mem.dreams += 1
    return DreamReport(len(ep.targets), len(mem.prototypes), covered, forgotten)


def _forget(mem: Memory, k: float) -> int:
    ep = mem.episodic
    if not len(ep.targets):  # the first row always starts a context: there must be one
        return 0
    # Rows are sorted by context hash, so a context's rows are adjacent: per-context maxima.
    start = np.concatenate([[True], (ep.keys[1:] != ep.keys[:-1]) | (ep.contexts[1:] != ep.contexts[:-1]).any(1)])
    group = np.cumsum(start) - 1
    peak = np.maximum.reduceat(ep.counts, np.flatnonzero(start))
    priority = ep.counts / peak[group]
    survival = clifford.PHI ** (-k * (1.0 - priority))
    rng = np.random.default_rng([mem.config.seed, mem.dreams])
    keep = rng.random(len(survival)) < survival
    gone = ~keep
    if gone.any():
        mem.unlearn(ep.contexts[gone], ep.targets[gone], ep.counts[gone])
        ep.remove(keep)
    return int(gone.sum())


def _consolidate(mem: Memory) -> tuple[Prototypes, int]:
    ep, cfg = mem.episodic, mem.config
    if not len(ep.targets):
        return Prototypes.empty(cfg.dim), 0
    uniq, first, inverse = np.unique(ep.keys, return_index=True, return_inverse=True)  # distinct contexts
    ctx = mem.context_matrices(ep.contexts[first])  # (C, d, d)
    w = clifford.witness(clifford.coefficients(ctx))  # (C, 2)
    cell_of_ctx = np.floor(w / cfg.witness_resolution).astype(np.int64)
    cells, cell_idx = np.unique(cell_of_ctx, axis=0, return_inverse=True)
    cell_idx = cell_idx.ravel()
    members = np.bincount(cell_idx, minlength=len(cells))
    kept = np.flatnonzero(members >= 2)  # a lone context is an episode, not a pattern
    if not len(kept):
        return Prototypes.empty(cfg.dim), 0
    renum = np.full(len(cells), -1)
    renum[kept] = np.arange(len(kept))
    proto_of_ctx = renum[cell_idx]
    P = len(kept)
    on = proto_of_ctx >= 0
    n_in = np.bincount(proto_of_ctx[on], minlength=P)[:, None]
    witness = np.stack([np.bincount(proto_of_ctx[on], weights=w[on, j], minlength=P) for j in range(2)], 1) / n_in
    flat = ctx.reshape(len(ctx), -1)
    matrix = np.stack([np.bincount(proto_of_ctx[on], weights=flat[on, j], minlength=P)
                       for j in range(flat.shape[1])], 1) / n_in

    # Target distribution per prototype: sum the counts of (prototype, target) pairs.
    proto_of_row = proto_of_ctx[inverse.ravel()]
    on_r = proto_of_row >= 0
    pair = proto_of_row[on_r] * cfg.vocab + ep.targets[on_r]
    pairs, pair_inv = np.unique(pair, return_inverse=True)
    pair_cnt = np.bincount(pair_inv.ravel(), weights=ep.counts[on_r]).astype(np.int64)
    p_of, t_of = pairs // cfg.vocab, pairs % cfg.vocab
    order = np.lexsort((-pair_cnt, p_of))
    p_of, t_of, pair_cnt = p_of[order], t_of[order], pair_cnt[order]
    rank = np.arange(len(p_of)) - np.searchsorted(p_of, p_of, "left")
    top = rank < CANDIDATES
    p_of, t_of, pair_cnt = p_of[top], t_of[top], pair_cnt[top]
    offsets = np.concatenate([[0], np.cumsum(np.bincount(p_of, minlength=P))])
    protos = Prototypes(witness.astype(np.float32), matrix.reshape(P, cfg.dim, cfg.dim).astype(np.float32),
                        offsets.astype(np.int64), t_of.astype(np.int32), pair_cnt)
    return protos, int(on_r.sum())
