import math

import numpy as np
import pytest

from hpi.errors import ApiError
from hpi.hyperbolic import MAX_NORM, METRICS, OWNER_SHARE, StateStore, to_ball


def mobius_add(x, y, c):
    """x ⊕_c y in the Poincaré ball of curvature -c (Ungar's gyrovector addition)."""
    xy, xx, yy = x @ y, x @ x, y @ y
    return ((1 + 2 * c * xy + c * yy) * x + (1 - c * xx) * y) / (1 + 2 * c * xy + c * c * xx * yy)


def mobius_distance(x, y, c):
    return 2 / math.sqrt(c) * math.atanh(math.sqrt(c) * np.linalg.norm(mobius_add(-x, y, c)))


def arcosh_distance(x, y, c):
    z = 2 * c * np.sum((x - y) ** 2) / ((1 - c * x @ x) * (1 - c * y @ y))
    return math.acosh(1 + z) / math.sqrt(c)


def all_distances(col, u, metric="hyperbolic"):
    idx, dist = col.search(u, len(col.norms), metric)
    out = np.empty_like(dist)
    np.put_along_axis(out, idx, dist, axis=1)
    return out


@pytest.mark.parametrize("curvature", [-0.25, -1.0, -3.0])
def test_distances_match_the_closed_forms(curvature):
    rng = np.random.default_rng(0)
    u = rng.normal(size=(40, 16)) * rng.uniform(0.1, 3, size=(40, 1))
    store = StateStore(1 << 20)
    col, _ = store.add("c", u, [{}] * 40, {}, curvature=curvature, center=True)
    c = -curvature
    x = to_ball(col.directions, col.norms, c)
    got = all_distances(col, u)
    for i in range(0, 40, 3):
        for j in range(40):
            want = mobius_distance(x[i], x[j], c)
            assert got[i, j] == pytest.approx(want, rel=1e-4, abs=1e-4)
            if i != j:
                assert got[i, j] == pytest.approx(arcosh_distance(x[i], x[j], c), rel=1e-4)
    # from the origin (the query u = mu maps to v = 0) the distance is 2 |v|
    d0 = all_distances(col, u.mean(0, keepdims=True))[0]
    assert np.allclose(d0, 2 * col.norms, rtol=1e-6)


def test_points_stay_inside_the_ball_and_far_distances_stay_exact():
    rng = np.random.default_rng(1)
    direction = rng.normal(size=8)
    direction /= np.linalg.norm(direction)
    norms = np.array([1e-3, 1.0, 5.0, 15.0, 400.0, 1e6])
    u = norms[:, None] * direction
    for c in (0.1, 1.0, 4.0, 50.0):
        col, _ = StateStore(1 << 20).add("far", u, [{}] * len(u), {}, curvature=-c, scale=1.0)
        assert np.all(c * col.radii() ** 2 < 1)
        d = all_distances(col, u)
        assert np.all(np.isfinite(d)) and np.all(np.diag(d) == 0)
        # On one ray the distance is the difference of the distances from the origin, 2 | |v| - |w| |,
        # as long as float64's angles (~1e-16 apart) stay negligible: e^R θ^2 << 1, R = 2 sqrt(c)|v| < 70.
        near = 2 * math.sqrt(c) * norms < 70
        want = 2 * np.abs(norms[:, None] - norms[None, :])
        assert np.allclose(d[np.ix_(near, near)], want[np.ix_(near, near)], rtol=1e-9)


def test_search_returns_the_planted_nearest_neighbour():
    rng = np.random.default_rng(2)
    base = rng.normal(size=(3000, 24)) * rng.uniform(0.2, 5, size=(3000, 1))
    planted = rng.choice(3000, size=20, replace=False)
    queries = base[planted] + rng.normal(scale=1e-3, size=(20, 24))
    store = StateStore(1 << 24)
    store.add("base", base, [{"i": i} for i in range(3000)], {"state": "x"})
    for metric in METRICS:
        col, idx, dist = store.search("base", queries, 5, metric)
        assert idx.shape == (20, 5) and np.all(np.diff(dist, axis=1) >= 0)
        assert [col.entries[i]["i"] for i in idx[:, 0]] == planted.tolist()


def test_only_the_product_of_sqrt_curvature_and_scale_changes_the_ranking():
    rng = np.random.default_rng(3)
    u = rng.normal(size=(500, 12)) + 2
    q = rng.normal(size=(10, 12)) + 2
    a, _ = StateStore(1 << 20).add("a", u, [{}] * 500, {}, curvature=-4.0, scale=0.3)
    b, _ = StateStore(1 << 20).add("b", u, [{}] * 500, {}, curvature=-1.0, scale=0.6)
    ia, da = a.search(q, 10, "hyperbolic")
    ib, db = b.search(q, 10, "hyperbolic")
    assert np.array_equal(ia, ib) and np.allclose(2 * da, db)


def fails(status, code, fn, *a, **kw):
    with pytest.raises(ApiError) as e:
        fn(*a, **kw)
    assert (e.value.status, e.value.code) == (status, code), str(e.value)
    return str(e.value)


def test_collections_grow_check_their_parameters_and_are_bounded():
    rng = np.random.default_rng(4)
    store = StateStore(max_bytes=OWNER_SHARE * 100 * (8 + 1) * 8)  # one owner: 100 vectors of 8-d
    spec = {"state": "hook_resid_post", "layer": 1}
    col, ids = store.add("runs", rng.normal(size=(30, 8)), [{}] * 30, spec, center=True)
    assert col.centered and col.scale > 0 and len(col.norms) == 30 and ids == list(range(30))
    _, ids = store.add("runs", rng.normal(size=(20, 8)), [{"x": 1}] * 20, spec, curvature=-1.0)
    assert ids == list(range(30, 50)) and col.entries[49] == {"x": 1, "id": 49}
    assert len(store.get("runs").norms) == 50 and store.nbytes == 50 * 9 * 8

    fails(409, "collection_mismatch", store.add, "runs", rng.normal(size=(2, 9)), [{}] * 2, spec)
    fails(409, "collection_mismatch", store.add, "runs", rng.normal(size=(2, 8)), [{}] * 2, {"layer": 2})
    fails(409, "collection_mismatch", store.add, "runs", rng.normal(size=(2, 8)), [{}] * 2, spec, curvature=-2.0)
    fails(413, "collection_too_large", store.add, "runs", rng.normal(size=(51, 8)), [{}] * 51, spec)
    fails(413, "store_full", store.add, "other", rng.normal(size=(51, 8)), [{}] * 51, spec)
    fails(422, "bad_collection", store.add, "no spaces", rng.normal(size=(2, 8)), [{}] * 2, spec)
    fails(422, "bad_curvature", store.add, "x", rng.normal(size=(2, 8)), [{}] * 2, spec, curvature=1.0)
    fails(422, "bad_vectors", store.add, "x", np.full((2, 8), np.nan), [{}] * 2, spec)
    fails(422, "bad_vectors", store.add, "x", rng.normal(size=(1, 8)), [{}], spec, center=True)
    fails(404, "unknown_collection", store.search, "nope", rng.normal(size=(1, 8)), 3)
    fails(422, "bad_vectors", store.search, "runs", rng.normal(size=(1, 5)), 3)
    fails(422, "bad_metric", store.search, "runs", rng.normal(size=(1, 8)), 3, "manhattan")
    assert store.nbytes == 50 * 9 * 8  # nothing refused was kept
    store.delete("runs")
    assert store.collections() == [] and store.nbytes == 0
    fails(404, "unknown_collection", store.delete, "runs")


def test_owners_see_only_their_own_collections():
    rng = np.random.default_rng(5)
    store = StateStore(1 << 20)
    a, _ = store.add("c", rng.normal(size=(3, 8)), [{"who": "a"}] * 3, {}, owner="A")
    store.add("a-only", rng.normal(size=(3, 8)), [{"who": "a"}] * 3, {}, owner="A")
    b, _ = store.add("c", rng.normal(size=(2, 4)), [{"who": "b"}] * 2, {}, owner="B")  # same name, its own
    assert a is not b and store.get("c", owner="A") is a and store.get("c", owner="B") is b
    assert [c.name for c in store.collections(owner="B")] == ["c"] and store.collections() == []
    col, idx, _ = store.search("c", rng.normal(size=(1, 4)), 5, owner="B")
    assert {col.entries[i]["who"] for i in idx[0]} == {"b"}
    # another owner's collection is exactly a missing one; no message names another owner's collections
    theirs = fails(404, "unknown_collection", store.search, "a-only", rng.normal(size=(1, 4)), 1, owner="B")
    missing = fails(404, "unknown_collection", store.search, "never", rng.normal(size=(1, 4)), 1, owner="B")
    assert theirs.replace("a-only", "never") == missing and "a-only" not in missing
    fails(404, "unknown_collection", store.delete, "a-only", owner="B")
    fails(403, "forbidden", store.add, "new", rng.normal(size=(1, 4)), [{}], {}, owner="B", create=False)
    store.add("c", rng.normal(size=(1, 4)), [{"who": "b"}], {}, owner="B", create=False)  # adding to its own
    store.delete("a-only", owner="A")
    assert [c.name for c in store.collections(owner="A")] == ["c"]


def test_one_owner_holds_at_most_a_share_and_the_store_is_bounded_for_all():
    rng = np.random.default_rng(6)
    row = (8 + 1) * 8
    store = StateStore(max_bytes=OWNER_SHARE * 10 * row)  # 10 vectors per owner
    assert store.owner_max_bytes == 10 * row
    fails(413, "collection_too_large", store.add, "c", rng.normal(size=(11, 8)), [{}] * 11, {}, owner="A")
    store.add("c", rng.normal(size=(6, 8)), [{}] * 6, {}, owner="A")
    fails(413, "store_full", store.add, "d", rng.normal(size=(5, 8)), [{}] * 5, {}, owner="A")
    store.add("d", rng.normal(size=(4, 8)), [{}] * 4, {}, owner="A")
    for owner in "BCD":
        store.add("c", rng.normal(size=(10, 8)), [{}] * 10, {}, owner=owner)
    assert store.nbytes == store.max_bytes
    fails(503, "store_full", store.add, "c", rng.normal(size=(1, 8)), [{}], {}, owner="E")
    store.delete("c", owner="B")
    store.add("c", rng.normal(size=(1, 8)), [{}], {}, owner="E")


@pytest.mark.parametrize("curvature", [-1e-300, -1e-6, -1.0, -1e6, -1e300])
def test_every_distance_is_finite_up_to_the_largest_norm(curvature):
    rng = np.random.default_rng(7)
    direction = rng.normal(size=(6, 8))
    norms = np.array([0.0, 1e-300, 1.0, 1e50, 1e149, MAX_NORM])
    col, _ = StateStore(1 << 20).add("c", direction / np.linalg.norm(direction, axis=1, keepdims=True) * norms[:, None],
                                     [{}] * 6, {}, curvature=curvature, scale=1.0)
    queries = np.concatenate([col.directions * col.norms[:, None], -col.directions * col.norms[:, None]])
    for metric in METRICS:
        _, dist = col.search(queries, 6, metric)
        assert np.isfinite(dist).all(), metric


def test_scales_and_vectors_that_overflow_are_refused():
    rng = np.random.default_rng(8)
    u = rng.normal(size=(4, 8))
    store = StateStore(1 << 20)
    fails(422, "bad_scale", store.add, "c", u, [{}] * 4, {}, scale=1e308)
    fails(422, "bad_scale", store.add, "c", u, [{}] * 4, {}, scale=MAX_NORM)
    fails(422, "bad_vectors", store.add, "c", np.full((2, 8), 1e200), [{}] * 2, {})  # |u| overflows: no scale
    fails(422, "bad_vectors", store.add, "c", np.array([[1e308, -1e308], [-1e308, 1e308]]), [{}] * 2, {},
          center=True)
    store.add("c", u, [{}] * 4, {})
    fails(422, "bad_vectors", store.add, "c", np.full((1, 8), 1e200), [{}], {})
    for metric in METRICS:
        fails(422, "bad_vectors", store.search, "c", np.full((1, 8), 1e308), 3, metric)
    assert store.nbytes == 4 * 9 * 8
