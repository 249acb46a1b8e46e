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

Every number the store answers with is finite: |v| is held to at most MAX_NORM (a vector, or
a scale, that would put a point further out is refused with 422), which keeps R finite for
any finite curvature and bounds every distance (d(x, y) <= d(0, x) + d(0, y) = 2|v| + 2|w|,
and |v - w| <= |v| + |w|) far below float64's largest number.

Collections belong to an owner (an owner id, server/owners.py) and are keyed by (owner, name):
owners never see, reach or collide with each other's collections, and a collection of another
owner is answered exactly like a missing one. The store holds at most `max_bytes` of vectors,
and one owner at most 1/OWNER_SHARE of that, so no single owner can fill it for everyone; nor
one client (IP address), which could take any number of owner tokens.
"""

from __future__ import annotations

import math
import re
import threading
from dataclasses import dataclass, field

import numpy as np

from hpi.errors import (ApiError, BadCollection, BadCurvature, BadMetric, BadScale, BadVectors, ClientQuota,
                        CollectionMismatch, CollectionTooLarge, Forbidden, OwnerStoreFull, StoreFull, UnknownCollection,
                        quoted)

METRICS = ("hyperbolic", "euclidean", "cosine")
NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
CHUNK = 8192  # stored vectors compared per step: bounds the temporaries of a search
QUERY_CHUNK = 64  # queries whose candidates are re-ranked together
REFINE = 32  # candidates beyond k re-ranked with exact angles
LOG2 = math.log(2.0)
MAX_NORM = 1e150  # largest |v| = s |u - mu| kept or searched for: squares and sums of norms stay finite
OWNER_SHARE = 4  # one owner holds at most 1/OWNER_SHARE of the store's bytes


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
    client: str = ""  # who created it (an IP address): owner tokens are free, so its share counts too

    @property
    def c(self) -> float:
        return -self.curvature

    @property
    def dim(self) -> int:
        return self.directions.shape[1]

    @property
    def nbytes(self) -> int:
        return self.directions.nbytes + self.norms.nbytes

    def tangent(self, u: np.ndarray, error: type[ApiError] = BadVectors) -> tuple[np.ndarray, np.ndarray]:
        """Directions [N, D] (float64) and norms [N] of v = s (u - mu) for state vectors u [N, D];
        `error` (a 422) when some |v| is beyond MAX_NORM (or overflows)."""
        with np.errstate(over="ignore", invalid="ignore"):
            v = (u.astype(np.float64) - self.center) * self.scale
            norms = np.linalg.norm(v, axis=1)
        if not (norms <= MAX_NORM).all():  # also false for nan
            raise error(f"at scale {self.scale:g} a vector maps to |v| = s |u - mu| = "
                        f"{np.max(norms):g}; the store takes |v| up to {MAX_NORM:g}, so that "
                        "every distance is a finite number")
        return _unit_rows(v), norms

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
    """Collections in memory keyed by (owner, name), bounded in bytes in all and per owner; safe
    to use from several threads. `owner` is an owner id (server/owners.py); the default "" serves
    a store with a single in-process user (bench/capture.py)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.owner_max_bytes = max_bytes // OWNER_SHARE
        self._collections: dict[tuple[str, str], Collection] = {}
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self._collections.values())

    def owner_nbytes(self, owner: str) -> int:
        return sum(c.nbytes for (o, _), c in self._collections.items() if o == owner)

    def add(self, name: str, u: np.ndarray, entries: list[dict], spec: dict, curvature: float | None = None,
            scale: float | None = None, center: bool | None = None, *, owner: str = "",
            create: bool = True, client: str = "") -> tuple[Collection, list[int]]:
        """Add state vectors u [N, D] with one metadata entry each to the owner's collection `name`;
        return the collection and the vectors' ids (positions in it, also put in their entries as
        "id"). The first batch creates the collection (unless `create` is false: 403) with
        `curvature` (default -1), `scale` (default: 1 / median |u - mu|) and `center` (default
        False); later batches must match its spec, dimension and any of those given."""
        if not NAME.fullmatch(name):
            raise BadCollection(f"collection names are 1-64 of A-Z a-z 0-9 _ . -, not {quoted(name)}")
        if u.ndim != 2 or len(u) == 0 or len(u) != len(entries):
            raise BadVectors(f"expected a non-empty [N, D] batch with N entries, got {u.shape}")
        if not np.isfinite(u).all():
            raise BadVectors("state vectors must be finite")
        if curvature is not None and not (curvature < 0 and math.isfinite(curvature)):
            raise BadCurvature(f"the curvature must be negative and finite, not {curvature}")
        with self._lock:
            col = self._collections.get((owner, name))
            new = col is None
            if new:
                if not create:
                    raise Forbidden(f"no collection {name!r} of this token's, and this token "
                                    "cannot create one: a new collection needs an owner token, "
                                    "or its session's token with the session as context")
                col = self._create(name, u, spec, -1.0 if curvature is None else curvature, scale, bool(center))
                col.client = client
            else:
                self._check_matches(col, u, spec, curvature, scale, center)
            added = u.shape[0] * (u.shape[1] + 1) * 8  # a direction and a norm, float64
            self._check_room(owner, col, added)
            directions, norms = col.tangent(u, BadScale if new and scale is not None else BadVectors)
            ids = list(range(len(col.entries), len(col.entries) + len(u)))
            col.directions = np.concatenate([col.directions, directions])
            col.norms = np.concatenate([col.norms, norms])
            col.entries.extend({**e, "id": i} for i, e in zip(ids, entries))
            self._collections[owner, name] = col
            return col, ids

    def _check_room(self, owner: str, col: Collection, added: int) -> None:
        """Refuse a batch of `added` bytes over the owner's share (413) or the store's room (503)."""
        share = self.owner_max_bytes
        if col.nbytes + added > share:
            raise CollectionTooLarge(f"collection {col.name!r} would hold {col.nbytes + added} "
                                     f"bytes; one owner holds at most {share} "
                                     f"(1/{OWNER_SHARE} of the store)")
        held = self.owner_nbytes(owner)
        if held + added > share:
            raise OwnerStoreFull(f"adding these vectors needs {added} bytes; this owner's "
                                 f"collections hold {held} of the {share} one owner may hold; "
                                 "delete collections first")
        by_client = sum(c.nbytes for c in self._collections.values() if c.client == col.client)
        if col.client and by_client + added > share:  # in-process callers name no client
            raise ClientQuota(f"adding these vectors needs {added} bytes; collections created "
                              f"from this client's address hold {by_client} of the {share} one "
                              "client may hold, whatever its owner tokens; delete some first")
        if self.nbytes + added > self.max_bytes:
            raise StoreFull(f"adding these vectors needs {added} bytes, more than is left of "
                            f"the store's {self.max_bytes}; try again later")

    @staticmethod
    def _create(name: str, u: np.ndarray, spec: dict, curvature: float, scale: float | None,
                center: bool) -> Collection:
        if center and len(u) < 2:
            raise BadVectors("centring takes the mean of the first batch: give at least 2 vectors")
        with np.errstate(over="ignore", invalid="ignore"):
            mu = u.mean(0) if center else np.zeros(u.shape[1])
        if scale is None:
            with np.errstate(over="ignore", invalid="ignore"):
                median = float(np.median(np.linalg.norm(u.astype(np.float64) - mu, axis=1)))
            scale = 1.0 / median if median > 0 else 1.0
            if not (0 < scale < math.inf):
                raise BadVectors(f"the first batch's median |u - mu| is {median:g}, which gives no "
                                 "usable default scale: give a scale")
        elif not (scale > 0 and math.isfinite(scale)):
            raise BadScale(f"the scale must be positive and finite, not {scale}")
        return Collection(name, curvature, scale, center, mu.astype(np.float64), dict(spec),
                          np.zeros((0, u.shape[1])), np.zeros(0))

    @staticmethod
    def _check_matches(col: Collection, u: np.ndarray, spec: dict, curvature, scale, center) -> None:
        if u.shape[1] != col.dim:
            raise CollectionMismatch(f"collection {col.name!r} holds {col.dim}-d vectors, "
                                     f"not {u.shape[1]}-d")
        if spec != col.spec:
            raise CollectionMismatch(f"collection {col.name!r} holds {col.spec}, not {spec}")
        given = {"curvature": (curvature, col.curvature), "scale": (scale, col.scale),
                 "center": (center, col.centered)}
        for what, (new, old) in given.items():
            if new is not None and new != old:
                raise CollectionMismatch(f"collection {col.name!r} has {what} {old}, not {new}; "
                                         "it is fixed when the collection is created")

    def _get(self, owner: str, name: str) -> Collection:
        col = self._collections.get((owner, name))
        if col is None:
            # Another owner's collection of that name is as missing as one that does not exist.
            own = [n for o, n in self._collections if o == owner]
            raise UnknownCollection(f"no collection {quoted(name)}; yours: {', '.join(own) or 'none'}")
        return col

    def get(self, name: str, *, owner: str = "") -> Collection:
        with self._lock:
            return self._get(owner, name)

    def search(self, name: str, u: np.ndarray, k: int, metric: str = "hyperbolic", *,
               owner: str = "") -> tuple[Collection, np.ndarray, np.ndarray]:
        if metric not in METRICS:
            raise BadMetric(f"unknown metric {quoted(metric)}; valid: {', '.join(METRICS)}")
        with self._lock:
            col = self._get(owner, name)
            if u.ndim != 2 or u.shape[1] != col.dim or not np.isfinite(u).all():
                raise BadVectors(f"collection {name!r} holds {col.dim}-d vectors; the query is "
                                 f"{u.shape[-1] if u.ndim else 0}-d or not finite")
            idx, dist = col.search(u, k, metric)
            return col, idx, dist

    def collections(self, *, owner: str = "") -> list[Collection]:
        with self._lock:
            return [c for (o, _), c in self._collections.items() if o == owner]

    def delete(self, name: str, *, owner: str = "") -> None:
        with self._lock:
            self._get(owner, name)
            del self._collections[owner, name]
