"""One holographic memory: satellites, the episodic cache, prototypes, retrieval, statistics.

Learning a (context, target) pair:
  C = E[t0] ... E[t_{n-1}]                      context matrix, (d, d) rotation
  basin = hash(quantize(Grace(coeffs(C)))) % S  routing by the Cl(3,1) coefficients
  satellite[basin] += φ⁻¹ · C E[target]          Hebbian accumulation (binding)
  episodic[context][target] += 1                 exact cache
Retrieval tries, in order: the episodic cache (exact), the prototype of the query's witness
cell (formed by dreaming; its targets are the candidates), holographic unbinding
Cᵀ satellite[basin] scored against the embeddings, and the unigram prior. Every answer
names the path that gave it. Everything is batched: B contexts at a time.

Learning is deterministic: the same learns applied in the same order to the same state give
bit-identical arrays (float32 sums in a fixed order; the episodic table merged into one
canonical order whenever it is merged), which is what lets journal.py replay learns onto a
snapshot. A memory owns its embedding tables, so deleting it frees them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from hpi.errors import InvalidRequest
from hpi.memory import clifford, so4
from hpi.memory.episodic import Episodic, hash_rows

PATHS = ("episodic", "prototype", "holographic", "prior")
EPISODIC, PROTOTYPE, HOLOGRAPHIC, PRIOR = range(4)
MAX_CONTEXT = 64
# Bindings one basin holds at ≥90% top-1 recall (1,000-token vocabulary), from the capacity
# curve that bench/memory.py measures (docs/memory.md): d=4 holds 1, d=8 3, d=16 12.
BASIN_CAPACITY = {4: 1, 8: 3, 16: 12}
CANDIDATES = 32  # targets a prototype keeps (the seeds' candidate narrowing: ~10-50)


def default_satellites(dim: int, planned_patterns: int) -> int:
    """Enough basins that `planned_patterns` bindings average at most one basin's capacity."""
    need = max(1, math.ceil(planned_patterns / BASIN_CAPACITY[dim]))
    return 1 << (need - 1).bit_length()


class InvalidInput(InvalidRequest, ValueError):
    """A configuration or token ids the memory cannot take (422 `invalid_request`); a ValueError
    too, so that a file's bad configuration reads as corruption (server/memory/persist.py)."""


@dataclass(frozen=True)
class Config:
    vocab: int
    context: int = 3
    dim: int = 4
    satellites: int = 0  # 0: default_satellites(dim, planned_patterns)
    planned_patterns: int = 1 << 16
    seed: int = 0
    resolution: float = clifford.PHI_INV ** 8  # routing quantum of the Grace coefficients
    witness_resolution: float = clifford.PHI_INV ** 6  # prototype cell size in witness space

    def __post_init__(self):
        if not 1 <= self.context <= MAX_CONTEXT:
            raise InvalidInput(f"context length must be 1 to {MAX_CONTEXT}, got {self.context}")
        if self.dim not in so4.DIMS:
            raise InvalidInput(f"matrix size must be one of {so4.DIMS}, got {self.dim}")
        if not 1 <= self.vocab <= 1 << 20:
            raise InvalidInput(f"vocabulary size must be 1 to {1 << 20}, got {self.vocab}")
        if self.satellites == 0:
            object.__setattr__(self, "satellites", default_satellites(self.dim, self.planned_patterns))
        if not 1 <= self.satellites <= 1 << 22:
            raise InvalidInput(f"satellites must be 1 to {1 << 22}, got {self.satellites}")
        if not (self.resolution > 0 and self.witness_resolution > 0):
            raise InvalidInput("resolutions must be positive")

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Mechanisms:
    """Which retrieval paths are on (the benchmark switches each off in turn)."""
    episodic: bool = True
    prototypes: bool = True
    holographic: bool = True


@dataclass
class Prediction:
    """Answers for B contexts: top-k tokens and probabilities, the path, and optionally P(target)."""
    tokens: np.ndarray  # (B, k) int
    probs: np.ndarray  # (B, k) mixture probability of each
    path: np.ndarray  # (B,) index into PATHS
    target_prob: np.ndarray | None = None  # (B,) probability of the given targets


@dataclass
class Prototypes:
    witness: np.ndarray  # (P, 2) float32 cell centroid in witness space
    matrix: np.ndarray  # (P, d, d) float32 mean context matrix
    offsets: np.ndarray  # (P+1,) int64: prototype p's targets are [offsets[p], offsets[p+1])
    targets: np.ndarray  # (sum,) int32
    counts: np.ndarray  # (sum,) int64
    _cells: tuple | None = field(default=None, repr=False, compare=False)  # lookup index, built on first use

    @classmethod
    def empty(cls, dim: int) -> Prototypes:
        return cls(np.zeros((0, 2), np.float32), np.zeros((0, dim, dim), np.float32),
                   np.zeros(1, np.int64), np.zeros(0, np.int32), np.zeros(0, np.int64))

    def __len__(self) -> int:
        return len(self.witness)

    def find(self, w: np.ndarray, resolution: float) -> tuple[np.ndarray, np.ndarray]:
        """(b, 2) witnesses -> (query index, prototype index) for queries whose grid cell holds a
        prototype (a prototype's centroid lies in its own cell: cells are convex)."""
        if self._cells is None:
            cells = np.floor(self.witness / np.float32(resolution)).astype(np.int64)
            keys = hash_rows(cells)
            order = np.argsort(keys)
            self._cells = (cells, keys[order], order)
        cells, keys, order = self._cells
        q_cells = np.floor(w / np.float32(resolution)).astype(np.int64)
        pos = np.minimum(np.searchsorted(keys, hash_rows(q_cells)), max(len(keys) - 1, 0))
        proto = order[pos] if len(keys) else np.zeros(len(w), np.int64)
        hit = np.flatnonzero((cells[proto] == q_cells).all(1)) if len(keys) else np.zeros(0, np.int64)
        return hit, proto[hit]


@dataclass
class Memory:
    config: Config
    satellites: np.ndarray = None  # (S, d, d) float32
    load: np.ndarray = None  # (S,) int64 bindings per satellite
    unigram: np.ndarray = None  # (V,) int64 target counts: the prior
    episodic: Episodic = None
    prototypes: Prototypes = None
    patterns: int = 0
    dreams: int = 0
    emb: np.ndarray = field(init=False, repr=False)

    def __post_init__(self):
        c = self.config
        # Each memory owns its tables, so they are freed with it (budget.py counts them per memory).
        self.emb, self._emb_flat = _embedding_tables(c.vocab, c.dim, c.seed)
        self._prior = self._seen_tokens = None  # caches, dropped whenever the counts change
        if self.satellites is None:
            self.satellites = np.zeros((c.satellites, c.dim, c.dim), np.float32)
            self.load = np.zeros(c.satellites, np.int64)
            self.unigram = np.zeros(c.vocab, np.int64)
            self.episodic = Episodic(c.context)
            self.prototypes = Prototypes.empty(c.dim)

    # -- routing ---------------------------------------------------------------------------

    def context_matrices(self, contexts: np.ndarray) -> np.ndarray:
        return so4.contexts(self.emb, contexts)

    def route(self, ctx: np.ndarray) -> np.ndarray:
        """(B, d, d) context matrices -> (B,) satellite index from the quantized Grace coefficients."""
        g = clifford.grace(clifford.coefficients(ctx)).reshape(len(ctx), -1)  # (B, d²)
        q = np.floor(g / self.config.resolution).astype(np.int64)
        return (hash_rows(q) % np.uint64(self.config.satellites)).astype(np.int64)

    # -- learning --------------------------------------------------------------------------

    def check_ids(self, ids: np.ndarray) -> None:
        if ids.size and (ids.min() < 0 or ids.max() >= self.config.vocab):
            raise InvalidInput(f"token ids must be in [0, {self.config.vocab})")

    def learn(self, contexts: np.ndarray, targets: np.ndarray) -> None:
        """(B, n) contexts, (B,) next tokens: bind each into its basin and cache it exactly."""
        self.check_ids(contexts)
        self.check_ids(targets)
        ctx = self.context_matrices(contexts)
        basin = self.route(ctx)
        binding = (clifford.PHI_INV * so4.bind(ctx, self.emb[targets])).astype(np.float32)
        torch.from_numpy(self.satellites).index_add_(0, torch.from_numpy(basin), torch.from_numpy(binding))
        self.load += np.bincount(basin, minlength=self.config.satellites)
        self.unigram += np.bincount(targets, minlength=self.config.vocab)
        self.episodic.add(contexts, targets)
        self.patterns += len(targets)
        self._changed()

    def learn_sequence(self, tokens: np.ndarray) -> int:
        """Every window of n tokens of a sequence predicts the token after it; returns how many."""
        tokens = np.asarray(tokens, np.int64)
        if len(tokens) <= self.config.context:
            return 0
        contexts, targets = so4.windows(tokens, self.config.context)
        self.learn(contexts, targets)
        return len(targets)

    def unlearn(self, contexts: np.ndarray, targets: np.ndarray, counts: np.ndarray) -> None:
        """Take bindings back out of their basins exactly (forgetting)."""
        ctx = self.context_matrices(contexts)
        basin = self.route(ctx)
        binding = (clifford.PHI_INV * counts[:, None, None] * so4.bind(ctx, self.emb[targets])).astype(np.float32)
        torch.from_numpy(self.satellites).index_add_(0, torch.from_numpy(basin), torch.from_numpy(-binding))
        self.load -= np.bincount(basin, weights=counts, minlength=self.config.satellites).astype(np.int64)
        self.unigram -= np.bincount(targets, weights=counts, minlength=self.config.vocab).astype(np.int64)
        self._changed()

    # -- retrieval -------------------------------------------------------------------------

    def prior(self) -> tuple[np.ndarray, np.ndarray]:
        """(V,) add-one smoothed unigram distribution and its tokens, most probable first."""
        if self._prior is None:
            u = self.unigram.astype(np.float64) + 1.0
            self._prior = (u / u.sum(), np.argsort(-u, kind="stable"))
        return self._prior

    def _seen(self) -> np.ndarray:
        """Tokens learned as targets at least once: the holographic path's candidates."""
        if self._seen_tokens is None:
            self._seen_tokens = np.flatnonzero(self.unigram)
        return self._seen_tokens

    def _changed(self) -> None:
        self._prior = self._seen_tokens = None

    def predict(self, contexts: np.ndarray, k: int = 1, targets: np.ndarray | None = None,
                use: Mechanisms = Mechanisms()) -> Prediction:
        """(B, n) contexts -> top-k answers with probabilities and the path that gave each.

        The probability of token t is λ·P_path(t) + (1-λ)·prior(t): λ is Witten-Bell's
        N/(N+T) for count-based paths (N observations, T distinct targets) and the best
        cosine for holographic unbinding, so no token ever has probability zero.
        """
        self.check_ids(contexts)
        B = len(contexts)
        ans = _Answers(B, k, targets)

        if use.episodic:
            q, tok, cnt = self.episodic.lookup(contexts)
            cnt = cnt.astype(np.float64)
            ans.take(q, tok, cnt, cnt, EPISODIC)

        sub = np.flatnonzero(ans.todo)
        if len(sub) and (use.prototypes and len(self.prototypes) or use.holographic):
            ctx = self.context_matrices(contexts[sub])  # (b, d, d)
            retrieved, load = self._unbind(ctx)  # (b, d²), (b,)
            if use.prototypes and len(self.prototypes):
                local, tok, cnt = self._prototype_candidates(ctx)
                weight = cnt.astype(np.float64)
                if use.holographic:  # the unbound matrix reweights the candidates by the φ-kernel
                    cos = (retrieved[local] * self._emb_flat[tok]).sum(1) / self.config.dim
                    weight = weight * clifford.PHI ** -(1.0 - cos)
                ans.take(sub[local], tok, weight, cnt.astype(np.float64), PROTOTYPE)
            if use.holographic:
                keep = ans.todo[sub]
                self._holographic(sub[keep], retrieved[keep], load[keep], ans)
        return ans.finish(*self.prior())

    def _prototype_candidates(self, ctx: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(b, d, d) -> rows (local query index, token, count) of the prototype of each query's
        witness cell, for queries whose cell has one."""
        w = clifford.witness(clifford.coefficients(ctx)).astype(np.float32)  # (b, 2)
        s_idx, p_idx = self.prototypes.find(w, self.config.witness_resolution)
        lo, hi = self.prototypes.offsets[p_idx], self.prototypes.offsets[p_idx + 1]
        rows = _ranges(lo, hi)
        return np.repeat(s_idx, hi - lo), self.prototypes.targets[rows], self.prototypes.counts[rows]

    def _unbind(self, ctx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(b, d, d) contexts -> (b, d²) Cᵀ satellite[basin] scaled to the norm of a rotation
        (zero for an empty basin), and (b,) the bindings in each basin."""
        basin = self.route(ctx)
        r = so4.unbind(ctx, self.satellites[basin].astype(np.float64)).reshape(len(ctx), -1)
        norm = np.linalg.norm(r, axis=1, keepdims=True)
        scale = np.divide(math.sqrt(self.config.dim), norm, out=np.zeros_like(norm), where=norm > 0)
        return (r * scale).astype(np.float32), self.load[basin]

    def _holographic(self, idx: np.ndarray, retrieved: np.ndarray, load: np.ndarray, ans: _Answers) -> None:
        """Score the unbound matrices against every learned token; the φ-kernel gives P_path."""
        seen = self._seen()
        if not len(idx) or not len(seen):
            return
        emb = torch.from_numpy(self._emb_flat[seen])  # (Vs, d²)
        chunk = max(1, (1 << 22) // len(seen))  # bounds the (b, Vs) score matrix
        for lo in range(0, len(idx), chunk):
            self._holographic_chunk(idx[lo:lo + chunk], retrieved[lo:lo + chunk], load[lo:lo + chunk], seen, emb, ans)

    def _noise_gate(self, n_tokens: int) -> float:
        """The cosine that about one of n random tokens reaches by chance: below it, unbinding
        found nothing. A random unit vector in D = d² dimensions has P(cos > t) ≈ (1-t²)^((D-1)/2).

        The seeds gate at a fixed φ⁻²; that refuses most right answers at d=16, where a basin
        of k bindings unbinds with cosine ≈ 1/√k, and passes pure noise at d=4.
        """
        return math.sqrt(1.0 - max(n_tokens, 2) ** (-2.0 / (self.config.dim ** 2 - 1)))

    def _holographic_chunk(self, idx, retrieved, load, seen, emb, ans: _Answers) -> None:
        cos = torch.from_numpy(retrieved) @ emb.T / self.config.dim  # (b, Vs): both norms are √d
        kk = min(ans.k, len(seen))
        top_cos, part = torch.topk(cos, kk, dim=1)  # (b, kk), best first
        best = top_cos[:, 0].numpy()
        ok = best >= self._noise_gate(len(seen))
        if not ok.any():
            return
        sel = torch.from_numpy(np.flatnonzero(ok))
        idx, cos, best, load = idx[ok], cos[sel], best[ok], load[ok]
        top_cos, part = top_cos[sel], part[sel]
        # φ-kernel: weight φ^-distance with distance = 1 - cosine, normalised over the vocabulary.
        log_phi = math.log(clifford.PHI)
        total = torch.exp(log_phi * (cos - 1.0)).sum(1, dtype=torch.float64).numpy()  # (b,)
        p_top = np.exp(log_phi * (top_cos.numpy().astype(np.float64) - 1.0)) / total[:, None]
        # Like one observation per binding (Witten-Bell N/(N+1)), discounted by how well it unbound.
        lam = np.clip(best, 0.0, 1.0) * load / (load + 1.0)
        ans.set(np.repeat(idx, kk), seen[part.numpy()].ravel(), p_top.ravel(), lam, idx, HOLOGRAPHIC)
        if ans.targets is not None:
            pos = np.searchsorted(seen, ans.targets[idx])
            found = (pos < len(seen)) & (seen[np.minimum(pos, len(seen) - 1)] == ans.targets[idx])
            rows = np.flatnonzero(found)
            c = cos[torch.from_numpy(rows), torch.from_numpy(pos[found])].numpy().astype(np.float64)
            ans.tgt_p[idx[found]] = np.exp(log_phi * (c - 1.0)) / total[found]

    def generate(self, tokens: list[int], n: int, sample: bool = False, seed: int = 0,
                 use: Mechanisms = Mechanisms()) -> tuple[list[int], list[str]]:
        """n more tokens after `tokens`: greedy, or drawn from the answer's top candidates."""
        rng = np.random.default_rng(seed)
        out, paths, ctx = [], [], list(tokens[-self.config.context:])
        for _ in range(n):
            pred = self.predict(np.array([ctx], np.int64), k=8 if sample else 1, use=use)
            if sample:
                p = pred.probs[0] / pred.probs[0].sum()
                t = int(pred.tokens[0, rng.choice(len(p), p=p)])
            else:
                t = int(pred.tokens[0, 0])
            out.append(t)
            paths.append(PATHS[pred.path[0]])
            ctx = ctx[1:] + [t]
        return out, paths

    # -- statistics ------------------------------------------------------------------------

    def stats(self, sample: int = 2048) -> dict:
        """Sizes, routing load, Grace stability, coverage and perplexity on stored episodes."""
        ep = self.episodic
        n_rows = len(ep)
        used = int((self.load > 0).sum())
        if len(self.prototypes):
            stab = clifford.stability(clifford.coefficients(self.prototypes.matrix.astype(np.float64)))
        else:
            stab = clifford.stability(clifford.coefficients(self.satellites[self.load > 0].astype(np.float64)))
        ppl = None
        if n_rows:
            pick = np.random.default_rng(0).choice(n_rows, min(sample, n_rows), replace=False)
            pred = self.predict(ep.contexts[pick], k=1, targets=ep.targets[pick])
            w = ep.counts[pick].astype(np.float64)
            ppl = float(np.exp(-(w * np.log(pred.target_prob)).sum() / w.sum()))
        return {
            "patterns": self.patterns,
            "episodes": n_rows,
            "contexts": int(len(np.unique(ep.keys))),
            "vocab_seen": int((self.unigram > 0).sum()),
            "satellites": self.config.satellites,
            "satellites_used": used,
            "bindings_per_used_satellite": float(self.load.sum() / used) if used else 0.0,
            "max_bindings_in_a_satellite": int(self.load.max()) if len(self.load) else 0,
            "prototypes": len(self.prototypes),
            "dreams": self.dreams,
            "stability": float(stab.mean()) if len(stab) else None,
            "coverage": used / self.patterns if self.patterns else None,
            "perplexity_on_stored": ppl,
        }


def _embedding_tables(vocab: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(V, d, d) float64 embeddings and their (V, d²) float32 rows (read-only)."""
    emb = so4.embeddings(vocab, dim, seed)
    flat = emb.reshape(vocab, -1).astype(np.float32)
    emb.flags.writeable = flat.flags.writeable = False
    return emb, flat


def _ranges(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Concatenated index ranges [lo_i, hi_i)."""
    span = hi - lo
    return np.arange(span.sum()) - np.repeat(np.cumsum(span) - span, span) + np.repeat(lo, span)


class _Answers:
    """Answers being assembled for B queries: each path claims the queries still open."""

    def __init__(self, B: int, k: int, targets: np.ndarray | None):
        self.B, self.k, self.targets = B, k, targets
        self.todo = np.ones(B, bool)
        self.path = np.full(B, PRIOR, np.int8)
        self.lam = np.zeros(B)
        self.tgt_p = np.zeros(B)
        self.rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # (query, token, P_path)

    def take(self, q, tok, weight, observed, path_id) -> None:
        """Rows (query, token, weight) grouped by query; open queries with rows are answered."""
        total = np.bincount(q, weights=weight, minlength=self.B)
        n_obs = np.bincount(q, weights=observed, minlength=self.B)
        distinct = np.bincount(q, minlength=self.B)
        hit = (distinct > 0) & self.todo
        keep = hit[q]
        q, tok, p = q[keep], tok[keep], weight[keep] / total[q[keep]]
        if self.targets is not None:
            m = tok == self.targets[q]
            self.tgt_p[q[m]] = p[m]
        order = np.lexsort((-p, q))
        q, tok, p = q[order], tok[order], p[order]
        best = (np.arange(len(q)) - np.searchsorted(q, q, "left")) < self.k
        lam = n_obs[hit] / (n_obs[hit] + distinct[hit])  # Witten-Bell
        self.set(q[best], tok[best], p[best], lam, np.flatnonzero(hit), path_id)

    def set(self, q, tok, p, lam, answered, path_id) -> None:
        self.rows.append((q, tok, p))
        self.lam[answered] = lam
        self.path[answered] = path_id
        self.todo[answered] = False

    def finish(self, prior: np.ndarray, prior_order: np.ndarray) -> Prediction:
        """Each query's path candidates by P_path, then the prior's top tokens; with mixture probabilities.

        The path that answered decides the order: a flat path distribution (the φ-kernel over
        a large vocabulary) must not let the prior's favourite token replace its answer.
        """
        B, k = self.B, self.k
        prior_top = prior_order[:k]
        q = np.concatenate([r[0] for r in self.rows] + [np.repeat(np.arange(B), len(prior_top))])
        tok = np.concatenate([r[1] for r in self.rows] + [np.tile(prior_top, B)])
        p_path = np.concatenate([r[2] for r in self.rows] + [np.zeros(B * len(prior_top))])
        from_path = np.concatenate([np.ones(sum(len(r[0]) for r in self.rows), bool), np.zeros(B * len(prior_top), bool)])
        order = np.lexsort((-p_path, tok, q))  # per (query, token) the path's row first
        q, tok, p_path, from_path = q[order], tok[order], p_path[order], from_path[order]
        first = np.concatenate([[True], (q[1:] != q[:-1]) | (tok[1:] != tok[:-1])])
        q, tok, p_path, from_path = q[first], tok[first], p_path[first], from_path[first]
        mix = self.lam[q] * p_path + (1 - self.lam[q]) * prior[tok]
        order = np.lexsort((-mix, -p_path, ~from_path, q))
        q, tok, mix = q[order], tok[order], mix[order]
        rank = np.arange(len(q)) - np.searchsorted(q, q, "left")
        r = rank < k
        width = min(k, len(prior))
        tokens = np.zeros((B, width), np.int64)
        probs = np.zeros((B, width))
        tokens[q[r], rank[r]] = tok[r]
        probs[q[r], rank[r]] = mix[r]
        target_prob = None
        if self.targets is not None:
            target_prob = self.lam * self.tgt_p + (1 - self.lam) * prior[self.targets]
        return Prediction(tokens, probs, self.path, target_prob)
