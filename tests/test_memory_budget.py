"""Byte budgets of the memories: refused before anything is allocated, per memory (413), all
together (503) and per learn; a deleted memory's tables are freed."""

import gc
import time
import tracemalloc

import numpy as np

from hpi.memory import budget
from hpi.memory.store import Config
from tests.http_errors import assert_error
from tests.test_memory_api import create


def test_an_oversized_memory_is_refused_before_it_is_allocated(client, tmp_path):
    start = time.process_time()
    r = client.post("/v1/memories", json={"name": "m", "dim": 16, "satellites": 524288})
    assert_error(r, 413, "memory_too_large")
    assert time.process_time() - start < 2  # it used to allocate and write 539 MB
    assert not list((tmp_path / "memories").iterdir())
    assert_error(client.post("/v1/memories", json={"name": "m", "dim": 16, "vocab": 1 << 18}), 413, "memory_too_large")


def test_the_estimate_bounds_what_a_memory_holds():
    config = Config(vocab=1000, context=3, dim=8, satellites=512)
    from hpi.memory.store import Memory
    mem = Memory(config)
    held = sum(a.nbytes for a in (mem.satellites, mem.load, mem.unigram, mem.emb, mem._emb_flat))
    assert held <= budget.fixed_bytes(config) <= 1.5 * held


def test_memories_together_stay_within_the_total(make_client, monkeypatch):
    config = {"context": 2, "satellites": 4096, "vocab": 1000}
    one = budget.nbytes(Config(**config), 0)
    monkeypatch.setattr(budget, "MAX_TOTAL_BYTES", 2 * one + one // 2)
    client = make_client(client_share=1)  # one client here: the server's total is what is tested
    h = create(client, "a", **config)["auth"]
    create(client, "b", **config)  # another owner: the total is the server's
    r = client.post("/v1/memories", json={"name": "c", **config}, headers=h)
    assert_error(r, 503, "memories_full")
    # A learn that would grow past the total is refused before it is applied.
    tokens = np.random.default_rng(0).integers(0, 1000, 4000).tolist()  # ~4,000 new rows: 320 kB
    assert_error(client.post("/v1/memories/a/learn", json={"tokens": tokens}, headers=h), 503, "memories_full")
    assert client.get("/v1/memories/a/stats", headers=h).json()["patterns"] == 0
    assert client.post("/v1/memories/a/learn", json={"tokens": tokens[:20]}, headers=h).status_code == 200
    assert client.delete("/v1/memories/a", headers=h).status_code == 204
    create(client, "c", auth=h, **config)


def test_a_learn_is_refused_before_it_grows_a_memory_past_its_budget(make_client, monkeypatch):
    config = {"context": 2, "satellites": 4096, "vocab": 1000}
    fixed = budget.nbytes(Config(**config), 0)
    row = budget.row_bytes(Config(**config))
    monkeypatch.setattr(budget, "MAX_MEMORY_BYTES", fixed + 100 * row)
    client = make_client()
    h = create(client, **config)["auth"]
    learn = lambda tokens: client.post("/v1/memories/notes/learn", json={"tokens": tokens}, headers=h)  # noqa: E731
    assert_error(learn(list(range(1, 200))), 413, "memory_too_large")
    assert client.get("/v1/memories/notes/stats", headers=h).json()["patterns"] == 0
    for _ in range(4):  # a learn counts as if all its samples were new rows, until the table is merged
        assert learn(list(range(1, 41))).status_code == 200  # 38 samples, the same rows each time
    assert_error(learn(list(range(100, 170))), 413, "memory_too_large")  # 38 + 68 rows > 100
    stats = client.get("/v1/memories/notes/stats", headers=h).json()
    assert stats["patterns"] == 4 * 38 and stats["episodes"] == 38 and stats["bytes"] <= stats["max_bytes"]


def test_a_deleted_memory_frees_its_tables(client):
    tracemalloc.start()
    try:
        h = create(client, "v", vocab=1 << 18)["auth"]
        client.post("/v1/memories/v/learn", json={"tokens": [1, 2, 3, 4, 5]}, headers=h)
        client.post("/v1/memories/v/query", json={"tokens": [1, 2]}, headers=h)
        assert client.delete("/v1/memories/v", headers=h).status_code == 204
        gc.collect()
        current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak > 48 << 20  # the tables were built (2^18 × 16 × (8 + 4) bytes) and traced
    assert current < 8 << 20, f"{current / 2 ** 20:.0f} MiB still held after the delete"
