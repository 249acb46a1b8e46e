"""A store of captured state vectors in a Poincaré ball, searched by hyperbolic distance.

The ball of curvature -c (c > 0) holds the points x with c|x|^2 < 1. A state vector u enters
it through the exponential map at the origin, after an affine map v = s (u - mu) that a
collection fixes with its first batch (mu: that batch's mean, or 0 without centring; s: one
over the batch's median |u - mu|, unless given):

    x = tanh(sqrt(c) |v|) v / (sqrt(c) |v|),        so that d(0, x) = 2 |v|.

The distance of two points has the closed form

    d(x, y) = arcosh(1 + 2c |x - y|^2 / ((1 - c|x|^2) (1 - c|y|^2))) / sqrt(c),

which for points given by their radii R = 2 sqrt(c) |v| and the angle θ between v and w is
the hyperbolic law of cosines, cosh(sqrt(c) d) = cosh R1 cosh R2 - sinh R1 sinh R2 cos θ:

    sqrt(c) d = arcosh(1 + z),    z = 2 sinh^2((R1 - R2) / 2) + sinh R1 sinh R2 (1 - cos θ).

So the store keeps each vector as its direction and |v| (float64), and evaluates z in log
space: no point has to be rounded onto the rim (float64 rounds tanh(R/2) to 1 from R ≈ 38 on),
and no sinh overflows, whatever the curvature. Far from the origin an angle θ weighs like
e^R θ^2, so angles are taken from unit-vector differences, not from dot products, when it counts. Which points are nearest depends on c and s only
through sqrt(c) s (a larger curvature acts as a larger scale); c alone scales the distances.
Euclidean (|v - w|) and cosine (1 - cos θ) distances over the same vectors are there to
compare against.
"""

from __future__ import annotations

import math
import re
import threading
from dataclasses import dataclass, field

import numpy as np

METRICS = ("hyperbolic", "euclidean", "cosine")
NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
CHUNK = 8192  # stored vectors compared per step: bounds the temporaries of a search
QUERY_CHUNK = 64  # queries whose candidates are re-ranked together
REFINE = 32  # candidates beyond k re-ranked with exact angles
LOG2 = math.log(2.0)


class StoreError(ValueError):
    """A store request that cannot be served; the HTTP layer answers with `status` and `code`."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code = status, code


def _log_sinh(r: np.ndarray) -> np.ndarray:
    """log sinh(r) for r >= 0 without overflow: r + log(1 - e^(-2r)) - log 2 (-inf at 0)."""
    with np.errstate(divide="ignore"):
        return r + np.log(-np.expm1(-2.0 * r)) - LOG2


def hyperbolic_distance(r1: np.ndarray, r2: np.ndarray, one_minus_cos: np.ndarray, c: float) -> np.ndarray:
    """Distances in the ball of curvature -c between points of radii r1 and r2 (R = 2 sqrt(c) |v|,
    i.e. sqrt(c) times the distance from the origin) at angles θ given by 1 - cos θ
    (all broadcast together); see the module docstring."""
    delta = np.abs(r1 - r2)
    with np.errstate(divide="ignore"):
        log_t1 = delta + 2.0 * np.log(-np.expm1(-delta)) - LOG2  # log 2 sinh^2(delta / 2)
        log_t2 = _log_sinh(r1) + _log_sinh(r2) + np.log(np.clip(one_minus_cos, 0.0, 2.0))
    log_z = np.logaddexp(log_t1, log_t2)
    # arcosh(1 + z) = log(1 + z + sqrt(z (z + 2))); past z = e^30 as log z + log(1 + 1/z + sqrt(1 + 2/z))
    small = log_z <= 30.0
    z = np.exp(np.where(small, log_z, 0.0))
    inv = np.exp(-np.where(small, 30.0, log_z))
    d = np.where(small, np.log1p(z + np.sqrt(z * (z + 2.0))), log_z + np.log1p(inv + np.sqrt(1.0 + 2.0 * inv)))
    return d / math.sqrt(c)


def _unit_rows(a: np.ndarray) -> np.ndarray:
    """Rows scaled to length 1 in float64 (zero rows stay zero)."""
    a = a.astype(np.float64)
    n = np.linalg.norm(a, axis=1, keepdims=True)
    return a / np.where(n > 0, n, 1.0)


RIM = 1.0 - 1e-12  # tanh(R/2) is capped here: float64 cannot tell points closer to the rim apart


def to_ball(directions: np.ndarray, norms: np.ndarray, c: float) -> np.ndarray:
    """The ball points x = tanh(sqrt(c)|v|) / sqrt(c) * v/|v| [N, D] (float64).

    Far out (sqrt(c)|v| > 14) the radius is held at RIM / sqrt(c), so every point is strictly
    inside; distances never use these coordinates.
    """
    t = np.minimum(np.tanh(math.sqrt(c) * norms), RIM)
    return directions * (t / math.sqrt(c))[:, None]


@dataclass
class Collection:
    name: str
    curvature: float  # -c
    scale: float  # s
    centered: bool
    center: np.ndarray  # mu [D] (zeros when not centred)
    spec: dict  # what the vectors are (set by the caller, e.g. state, layer, pooling)
    directions: np.ndarray  # [N, D] float64: v / |v| (0 where v = 0); far out, angles need every digit
    norms: np.ndarray  # [N] float64: |v|
    entries: list[dict] = field(default_factory=list)  # caller's metadata per vector

    @property
    def c(self) -> float:
        return -self.curvature

    @property
    def dim(self) -> int:
        return self.directions.shape[1]

    @property
    def nbytes(self) -> int:
        return self.directions.nbytes + self.norms.nbytes

    def tangent(self, u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Directions [N, D] (float64) and norms [N] of v = s (u - mu) for state vectors u [N, D]."""
        v = (u.astype(np.float64) - self.center) * self.scale
        return _unit_rows(v), np.linalg.norm(v, axis=1)

    def radii(self) -> np.ndarray:
        """Each point's Euclidean distance from the ball's centre, below 1 / sqrt(c)."""
        return np.linalg.norm(to_ball(self.directions, self.norms, self.c), axis=1)

    def search(self, u: np.ndarray, k: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
        """The k nearest stored vectors of each query u [m, D]: indices and distances [m, k'],
        nearest first, k' = min(k, N).

        1 - cos θ from a dot product cancels for tiny angles, and far from the origin tiny
        angles are long distances. So dot products only pick k + REFINE candidates, which
        are then ranked with 1 - cos θ = |a - b|^2 / 2 from the unit vectors' difference.
        """
        q_dir, q_norm = self.tangent(u)
        q_norm = q_norm[:, None]  # [m, 1]
        keep = min(len(self.norms), k + REFINE)
        cand_d = np.empty((len(u), 0))
        cand_i = np.empty((len(u), 0), dtype=np.int64)
        for lo in range(0, len(self.norms), CHUNK):
            b_dir = self.directions[lo:lo + CHUNK]
            d = self._distance(q_norm, self.norms[None, lo:lo + CHUNK], 1.0 - q_dir @ b_dir.T, metric)
            cand_d = np.concatenate([cand_d, d], axis=1)
            cand_i = np.concatenate([cand_i, np.broadcast_to(np.arange(lo, lo + d.shape[1]), d.shape)], axis=1)
            if cand_d.shape[1] > keep:
                part = np.argpartition(cand_d, keep - 1, axis=1)[:, :keep]
                cand_d, cand_i = np.take_along_axis(cand_d, part, axis=1), np.take_along_axis(cand_i, part, axis=1)
        dist = np.empty(cand_i.shape)
        for lo in range(0, len(u), QUERY_CHUNK):
            i = cand_i[lo:lo + QUERY_CHUNK]  # [mq, keep]
            diff = q_dir[lo:lo + QUERY_CHUNK, None, :] - self.directions[i]  # [mq, keep, D]
            dist[lo:lo + QUERY_CHUNK] = self._distance(q_norm[lo:lo + QUERY_CHUNK], self.norms[i],
                                                       0.5 * np.einsum("qkd,qkd->qk", diff, diff), metric)
        order = np.argsort(dist, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(cand_i, order, axis=1), np.take_along_axis(dist, order, axis=1)

    def _distance(self, n1: np.ndarray, n2: np.ndarray, one_minus_cos: np.ndarray, metric: str) -> np.ndarray:
        """Distances of vectors with norms |v| n1, n2 and angles given by 1 - cos θ (broadcast)."""
        if metric == "hyperbolic":
            sc = math.sqrt(self.c)
            return hyperbolic_distance(2 * sc * n1, 2 * sc * n2, one_minus_cos, self.c)
        if metric == "euclidean":  # |v - w|^2 = (|v| - |w|)^2 + 2 |v||w| (1 - cos θ)
            return np.sqrt((n1 - n2) ** 2 + 2 * n1 * n2 * np.clip(one_minus_cos, 0.0, 2.0))
        return one_minus_cos


class StateStore:
    """Named collections in memory, bounded in bytes; safe to use from several threads."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._collections: dict[str, Collection] = {}
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self._collections.values())

    def add(self, name: str, u: np.ndarray, entries: list[dict], spec: dict, curvature: float | None = None,
            scale: float | None = None, center: bool | None = None) -> tuple[Collection, list[int]]:
        """Add state vectors u [N, D] with one metadata entry each; return the collection and the
        vectors' ids (positions in it, also put in their entries as "id"). The first batch creates
        the collection with `curvature` (default -1), `scale` (default: 1 / median |u - mu|) and
        `center` (default False); later batches must match its spec, dimension and any of those given."""
        if not NAME.fullmatch(name):
            raise StoreError(422, "bad_collection", f"collection names are 1-64 of A-Z a-z 0-9 _ . -, not {name!r}")
        if u.ndim != 2 or len(u) == 0 or len(u) != len(entries):
            raise StoreError(422, "bad_vectors", f"expected a non-empty [N, D] batch with N entries, got {u.shape}")
        if not np.isfinite(u).all():
            raise StoreError(422, "bad_vectors", "state vectors must be finite")
        if curvature is not None and not (curvature < 0 and math.isfinite(curvature)):
            raise StoreError(422, "bad_curvature", f"the curvature must be negative and finite, not {curvature}")
        with self._lock:
            col = self._collections.get(name)
            if col is None:
                col = self._create(name, u, spec, -1.0 if curvature is None else curvature, scale, bool(center))
            else:
                self._check_matches(col, u, spec, curvature, scale, center)
            added = u.shape[0] * (u.shape[1] + 1) * 8  # a direction and a norm, float64
            if self.nbytes + added > self.max_bytes:
                raise StoreError(503, "store_full", f"adding {len(u)} vectors needs {added} bytes; the store "
                                                    f"holds {self.nbytes} of its {self.max_bytes}; delete "
                                                    "collections first")
            directions, norms = col.tangent(u)
            ids = list(range(len(col.entries), len(col.entries) + len(u)))
            col.directions = np.concatenate([col.directions, directions])
            col.norms = np.concatenate([col.norms, norms])
            col.entries.extend({**e, "id": i} for i, e in zip(ids, entries))
            self._collections[name] = col
            return col, ids

    @staticmethod
    def _create(name: str, u: np.ndarray, spec: dict, curvature: float, scale: float | None,
                center: bool) -> Collection:
        if center and len(u) < 2:
            raise StoreError(422, "bad_vectors", "centring takes the mean of the first batch: give at least 2 vectors")
        mu = u.mean(0) if center else np.zeros(u.shape[1])
        if scale is None:
            median = float(np.median(np.linalg.norm(u.astype(np.float64) - mu, axis=1)))
            scale = 1.0 / median if median > 0 else 1.0
        elif not (scale > 0 and math.isfinite(scale)):
            raise StoreError(422, "bad_scale", f"the scale must be positive and finite, not {scale}")
        return Collection(name, curvature, scale, center, mu.astype(np.float64), dict(spec),
                          np.zeros((0, u.shape[1])), np.zeros(0))

    @staticmethod
    def _check_matches(col: Collection, u: np.ndarray, spec: dict, curvature, scale, center) -> None:
        if u.shape[1] != col.dim:
            raise StoreError(409, "collection_mismatch", f"collection {col.name!r} holds {col.dim}-d vectors, "
                                                         f"not {u.shape[1]}-d")
        if spec != col.spec:
            raise StoreError(409, "collection_mismatch", f"collection {col.name!r} holds {col.spec}, not {spec}")
        given = {"curvature": (curvature, col.curvature), "scale": (scale, col.scale),
                 "center": (center, col.centered)}
        for what, (new, old) in given.items():
            if new is not None and new != old:
                raise StoreError(409, "collection_mismatch", f"collection {col.name!r} has {what} {old}, not {new}; "
                                                             "it is fixed when the collection is created")

    def _get(self, name: str) -> Collection:
        col = self._collections.get(name)
        if col is None:
            raise StoreError(404, "unknown_collection", f"no collection {name!r}; collections: "
                                                        f"{', '.join(self._collections) or 'none'}")
        return col

    def get(self, name: str) -> Collection:
        with self._lock:
            return self._get(name)

    def search(self, name: str, u: np.ndarray, k: int, metric: str = "hyperbolic") -> tuple[Collection, np.ndarray, np.ndarray]:
        if metric not in METRICS:
            raise StoreError(422, "bad_metric", f"unknown metric {metric!r}; valid: {', '.join(METRICS)}")
        with self._lock:
            col = self._get(name)
            if u.ndim != 2 or u.shape[1] != col.dim or not np.isfinite(u).all():
                raise StoreError(422, "bad_vectors", f"collection {name!r} holds {col.dim}-d vectors; the query is "
                                                     f"{u.shape[-1] if u.ndim else 0}-d or not finite")
            idx, dist = col.search(u, k, metric)
            return col, idx, dist

    def collections(self) -> list[Collection]:
        with self._lock:
            return list(self._collections.values())

    def delete(self, name: str) -> None:
        with self._lock:
            if self._collections.pop(name, None) is None:
                raise StoreError(404, "unknown_collection", f"no collection {name!r}")
