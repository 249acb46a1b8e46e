"""The memory endpoints on the tiny model: create, learn, query, generate, dream, stats, delete;
persistence across a restart, atomic saves, corrupted files, bad input, concurrent learns."""

import threading

import pytest

from server import durable
from tests.http_errors import assert_error

TEXT = ("The anchor keeps the exact KV cache. The page decodes from the hologram. "
        "The anchor verifies the drafted tokens in one forward pass. ") * 4


def create(client, name="notes", **kw):
    r = client.post("/v1/memories", json={"name": name, "context": 2, "satellites": 4096, **kw})
    assert r.status_code == 201, r.text
    return r.json()


def test_create_learn_query_generate_dream_stats_delete(client, tiny):
    body = create(client)
    assert body["config"]["vocab"] == len(tiny.tokenizer) and body["config"]["dim"] == 4
    assert client.get("/v1/memories").json() == {"memories": ["notes"]}
    r = client.post("/v1/memories/notes/learn", json={"text": TEXT})
    assert r.status_code == 200, r.text
    ids = tiny.tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    assert r.json() == {"samples": len(ids) - 2, "patterns": len(ids) - 2}

    r = client.post("/v1/memories/notes/query", json={"tokens": ids[:5], "top_k": 3})
    (res,) = r.json()["results"]
    assert res["path"] == "episodic" and res["targets"][0]["token"] == ids[5]
    assert len(res["targets"]) == 3 and res["targets"][0]["confidence"] > res["targets"][1]["confidence"]
    assert res["targets"][0]["text"] == tiny.tokenizer.decode([ids[5]])

    r = client.post("/v1/memories/notes/query", json={"batch": [ids[:2], ids[3:5], [0, 0]]})
    results = r.json()["results"]
    assert [x["targets"][0]["token"] for x in results[:2]] == [ids[2], ids[5]]
    assert results[2]["path"] in ("holographic", "prior")

    r = client.post("/v1/memories/notes/generate", json={"text": "The anchor keeps", "n_tokens": 6})
    assert r.status_code == 200, r.text
    assert r.json()["paths"] == ["episodic"] * 6
    learned = {tuple(ids[i:i + 3]) for i in range(len(ids) - 2)}
    out = tiny.tokenizer("The anchor keeps", add_special_tokens=False)["input_ids"][-2:] + r.json()["tokens"]
    assert all(tuple(out[i:i + 3]) in learned for i in range(len(out) - 2))  # only learned transitions

    r = client.post("/v1/memories/notes/dream", json={})
    assert r.status_code == 200 and r.json()["episodes"] > 0
    stats = client.get("/v1/memories/notes/stats").json()
    assert stats["patterns"] == len(ids) - 2 and stats["dreams"] == 1 and stats["name"] == "notes"

    assert client.delete("/v1/memories/notes").status_code == 204
    assert_error(client.get("/v1/memories/notes/stats"), 404, "unknown_memory")
    assert client.get("/v1/memories").json() == {"memories": []}


def test_memories_survive_a_restart(make_client):
    first = make_client()
    create(first, dim=8)
    first.post("/v1/memories/notes/learn", json={"tokens": [5, 6, 7, 8, 9, 10]})
    first.post("/v1/memories/notes/dream")
    before = first.post("/v1/memories/notes/query", json={"batch": [[5, 6], [7, 8], [1, 1]], "top_k": 4}).json()
    second = make_client()  # a new app on the same directory: the anchor restarted
    after = second.post("/v1/memories/notes/query", json={"batch": [[5, 6], [7, 8], [1, 1]], "top_k": 4}).json()
    assert after == before
    stats = second.get("/v1/memories/notes/stats").json()
    assert stats["patterns"] == 4 and stats["dreams"] == 1 and stats["config"]["dim"] == 8


def test_a_failed_save_loses_nothing_acknowledged(client, monkeypatch, tmp_path):
    create(client)
    client.post("/v1/memories/notes/learn", json={"tokens": [5, 6, 7, 8]})

    def crash(*args):
        raise OSError("disk full")

    monkeypatch.setattr(durable.os, "replace", crash)
    with pytest.raises(OSError):  # the test client re-raises the server error
        client.post("/v1/memories/notes/learn", json={"tokens": [20, 21, 22, 23]})
    monkeypatch.undo()
    assert not list((tmp_path / "memories").glob(".*.tmp"))  # no temporary file left behind
    stats = client.get("/v1/memories/notes/stats").json()
    assert stats["patterns"] == 2  # the acknowledged learn is there, the failed one is not
    r = client.post("/v1/memories/notes/query", json={"tokens": [20, 21]}).json()["results"][0]
    assert r["path"] != "episodic"


def test_a_corrupted_file_is_reported_not_used(make_client, tmp_path):
    first = make_client()
    create(first)
    first.post("/v1/memories/notes/learn", json={"tokens": [5, 6, 7, 8]})
    path = tmp_path / "memories" / "notes.holo"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    second = make_client()
    for r in (second.get("/v1/memories/notes/stats"),
              second.post("/v1/memories/notes/query", json={"tokens": [5, 6]}),
              second.post("/v1/memories/notes/learn", json={"tokens": [5, 6, 7]})):
        assert_error(r, 409, "memory_corrupted")
        assert "checksum" in r.json()["error"]["message"]
    assert path.read_bytes() == bytes(data)  # never overwritten
    assert second.delete("/v1/memories/notes").status_code == 204
    create(second)


def test_bad_input(make_client):
    client = make_client(max_learn_tokens=50, max_body_bytes=4096)
    for path, body in (("learn", {"tokens": [1, 2, 3]}), ("query", {"tokens": [1, 2]}),
                       ("generate", {"tokens": [1, 2]}), ("dream", {})):
        assert_error(client.post(f"/v1/memories/nope/{path}", json=body), 404, "unknown_memory")
    assert_error(client.get("/v1/memories/nope/stats"), 404, "unknown_memory")
    assert_error(client.delete("/v1/memories/nope"), 404, "unknown_memory")
    create(client)
    assert_error(client.post("/v1/memories", json={"name": "notes"}), 409, "memory_exists")
    assert_error(client.post("/v1/memories", json={"name": "../x"}), 422, "invalid_request")
    assert_error(client.post("/v1/memories", json={"name": "x", "dim": 5}), 422, "invalid_request")
    assert_error(client.post("/v1/memories/notes/learn", json={"tokens": []}), 422, "empty_batch")
    assert_error(client.post("/v1/memories/notes/learn", json={"text": ""}), 422, "empty_batch")
    assert_error(client.post("/v1/memories/notes/learn", json={"tokens": [1, 2]}), 422, "too_short")
    assert_error(client.post("/v1/memories/notes/learn", json={}), 422, "invalid_request")
    assert_error(client.post("/v1/memories/notes/learn", json={"tokens": [1] * 51}), 413, "batch_too_large")
    assert_error(client.post("/v1/memories/notes/learn", json={"tokens": [1] * 3000}), 413, "body_too_large")
    assert_error(client.post("/v1/memories/notes/learn", json={"tokens": [1, 2, 10 ** 5]}), 422, "invalid_request")
    assert_error(client.post("/v1/memories/notes/query", json={"tokens": [1]}), 422, "context_too_short")
    assert_error(client.post("/v1/memories/notes/query", json={"batch": []}), 422, "invalid_request")
    assert_error(client.post("/v1/memories/notes/generate", json={"tokens": [1, 2], "n_tokens": 10 ** 6}),
                 422, "invalid_request")
    assert client.get("/v1/memories/notes/stats").json()["patterns"] == 0


def test_concurrent_learns_on_one_memory_are_serialised(client):
    create(client)
    seqs = [[100 + i, 200 + i, 300 + i, 1 + i] for i in range(16)]
    errors = []

    def learn(seq):
        r = client.post("/v1/memories/notes/learn", json={"tokens": seq})
        if r.status_code != 200:
            errors.append(r.text)

    threads = [threading.Thread(target=learn, args=(s,)) for s in seqs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    stats = client.get("/v1/memories/notes/stats").json()
    assert stats["patterns"] == stats["episodes"] == 32
    r = client.post("/v1/memories/notes/query", json={"batch": [s[1:3] for s in seqs]}).json()
    assert [x["targets"][0]["token"] for x in r["results"]] == [s[3] for s in seqs]
