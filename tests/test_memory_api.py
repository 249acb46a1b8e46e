"""The memory endpoints on the tiny model: create, learn, query, generate, dream, stats, delete;
persistence across a restart, atomic saves, corrupted files, bad input, concurrent learns."""

import os
import threading

from tests.http_errors import assert_error

TEXT = ("The anchor keeps the exact KV cache. The page decodes from the hologram. "
        "The anchor verifies the drafted tokens in one forward pass. ") * 4


def create(client, name="notes", auth=None, **kw):
    """Create a memory; its owner's Authorization header is in the answer's `auth`."""
    r = client.post("/v1/memories", json={"name": name, "context": 2, "satellites": 4096, **kw}, headers=auth)
    assert r.status_code == 201, r.text
    body = r.json()
    body["auth"] = auth or {"Authorization": f"Bearer {body['owner_token']}"}
    return body


def test_create_learn_query_generate_dream_stats_delete(client, tiny):
    body = create(client)
    h = body["auth"]
    assert body["config"]["vocab"] == len(tiny.tokenizer) and body["config"]["dim"] == 4
    assert client.get("/v1/memories", headers=h).json() == {"memories": ["notes"]}
    r = client.post("/v1/memories/notes/learn", json={"text": TEXT}, headers=h)
    assert r.status_code == 200, r.text
    ids = tiny.tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    assert r.json() == {"samples": len(ids) - 2, "patterns": len(ids) - 2}

    r = client.post("/v1/memories/notes/query", json={"tokens": ids[:5], "top_k": 3}, headers=h)
    (res,) = r.json()["results"]
    assert res["path"] == "episodic" and res["targets"][0]["token"] == ids[5]
    assert len(res["targets"]) == 3 and res["targets"][0]["confidence"] > res["targets"][1]["confidence"]
    assert res["targets"][0]["text"] == tiny.tokenizer.decode([ids[5]])

    r = client.post("/v1/memories/notes/query", json={"batch": [ids[:2], ids[3:5], [0, 0]]}, headers=h)
    results = r.json()["results"]
    assert [x["targets"][0]["token"] for x in results[:2]] == [ids[2], ids[5]]
    assert results[2]["path"] in ("holographic", "prior")

    r = client.post("/v1/memories/notes/generate", json={"text": "The anchor keeps", "n_tokens": 6}, headers=h)
    assert r.status_code == 200, r.text
    assert r.json()["paths"] == ["episodic"] * 6
    learned = {tuple(ids[i:i + 3]) for i in range(len(ids) - 2)}
    out = tiny.tokenizer("The anchor keeps", add_special_tokens=False)["input_ids"][-2:] + r.json()["tokens"]
    assert all(tuple(out[i:i + 3]) in learned for i in range(len(out) - 2))  # only learned transitions

    r = client.post("/v1/memories/notes/dream", json={}, headers=h)
    assert r.status_code == 200 and r.json()["episodes"] > 0
    stats = client.get("/v1/memories/notes/stats", headers=h).json()
    assert stats["patterns"] == len(ids) - 2 and stats["dreams"] == 1 and stats["name"] == "notes"
    assert 0 < stats["bytes"] <= stats["max_bytes"]

    assert client.delete("/v1/memories/notes", headers=h).status_code == 204
    assert_error(client.get("/v1/memories/notes/stats", headers=h), 404, "unknown_memory")
    assert client.get("/v1/memories", headers=h).json() == {"memories": []}


def test_memories_survive_a_restart(make_client):
    first = make_client()
    h = create(first, dim=8)["auth"]
    first.post("/v1/memories/notes/learn", json={"tokens": [5, 6, 7, 8, 9, 10]}, headers=h)
    first.post("/v1/memories/notes/dream", headers=h)
    batch = {"batch": [[5, 6], [7, 8], [1, 1]], "top_k": 4}
    before = first.post("/v1/memories/notes/query", json=batch, headers=h).json()
    second = make_client()  # a new app on the same directory: the anchor restarted
    after = second.post("/v1/memories/notes/query", json=batch, headers=h).json()
    assert after == before
    stats = second.get("/v1/memories/notes/stats", headers=h).json()
    assert stats["patterns"] == 4 and stats["dreams"] == 1 and stats["config"]["dim"] == 8


def test_a_failed_write_loses_nothing_acknowledged_and_names_no_exception(client, monkeypatch, tmp_path):
    h = create(client)["auth"]
    client.post("/v1/memories/notes/learn", json={"tokens": [5, 6, 7, 8]}, headers=h)

    def crash(*args):
        raise OSError("disk full at /secret/path")

    monkeypatch.setattr(os, "fsync", crash)  # the record is written, never synced
    r = client.post("/v1/memories/notes/learn", json={"tokens": [20, 21, 22, 23]}, headers=h)
    assert "disk full" not in r.text and "secret" not in r.text and "OSError" not in r.text
    assert_error(r, 500, "internal_error")
    monkeypatch.undo()
    stats = client.get("/v1/memories/notes/stats", headers=h).json()
    assert stats["patterns"] == 2  # the acknowledged learn is there, the failed one is not
    r = client.post("/v1/memories/notes/query", json={"tokens": [20, 21]}, headers=h).json()["results"][0]
    assert r["path"] != "episodic"
    # The next learn follows the acknowledged one directly: the half-written record is cut off.
    assert client.post("/v1/memories/notes/learn", json={"tokens": [30, 31, 32]}, headers=h).status_code == 200

    monkeypatch.setattr(os, "replace", crash)  # a dream's snapshot fails to land
    r = client.post("/v1/memories/notes/dream", json={}, headers=h)
    assert_error(r, 500, "internal_error")
    assert "disk full" not in r.text
    monkeypatch.undo()
    assert not list((tmp_path / "memories").glob(".*.tmp"))  # no temporary file left behind
    stats = client.get("/v1/memories/notes/stats", headers=h).json()
    assert stats["patterns"] == 3 and stats["dreams"] == 0


def test_a_corrupted_file_is_reported_not_used(make_client, tmp_path, caplog):
    first = make_client()
    h = create(first)["auth"]
    first.post("/v1/memories/notes/learn", json={"tokens": [5, 6, 7, 8]}, headers=h)
    (path,) = (tmp_path / "memories").glob("*.notes.holo")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    second = make_client()
    for r in (second.get("/v1/memories/notes/stats", headers=h),
              second.post("/v1/memories/notes/query", json={"tokens": [5, 6]}, headers=h),
              second.post("/v1/memories/notes/learn", json={"tokens": [5, 6, 7]}, headers=h)):
        assert "checksum" not in assert_error(r, 409, "memory_corrupted")["message"]  # the reason is logged only
    assert "checksum" in caplog.text
    assert path.read_bytes() == bytes(data)  # never overwritten
    assert second.delete("/v1/memories/notes", headers=h).status_code == 204
    assert not list((tmp_path / "memories").iterdir())
    create(second, auth=h)


def test_bad_input(make_client):
    client = make_client(max_learn_tokens=50, max_body_bytes=4096)
    h = create(client, "other")["auth"]
    for path, body in (("learn", {"tokens": [1, 2, 3]}), ("query", {"tokens": [1, 2]}),
                       ("generate", {"tokens": [1, 2]}), ("dream", {})):
        assert_error(client.post(f"/v1/memories/nope/{path}", json=body, headers=h), 404, "unknown_memory")
    assert_error(client.get("/v1/memories/nope/stats", headers=h), 404, "unknown_memory")
    assert_error(client.delete("/v1/memories/nope", headers=h), 404, "unknown_memory")
    create(client, auth=h)
    assert_error(client.post("/v1/memories", json={"name": "notes"}, headers=h), 409, "memory_exists")
    assert_error(client.post("/v1/memories", json={"name": "../x"}), 422, "invalid_request")
    assert_error(client.post("/v1/memories", json={"name": "a.b"}), 422, "invalid_request")
    assert_error(client.post("/v1/memories", json={"name": "x", "dim": 5}), 422, "invalid_request")

    def learn(body):
        return client.post("/v1/memories/notes/learn", json=body, headers=h)
    assert_error(learn({"tokens": []}), 422, "empty_batch")
    assert_error(learn({"text": ""}), 422, "empty_batch")
    assert_error(learn({"tokens": [1, 2]}), 422, "too_short")
    assert_error(learn({}), 422, "invalid_request")
    assert_error(learn({"tokens": [1] * 51}), 413, "batch_too_large")
    assert_error(learn({"tokens": [1] * 3000}), 413, "body_too_large")
    assert_error(learn({"tokens": [1, 2, 10 ** 5]}), 422, "invalid_request")
    assert_error(client.post("/v1/memories/notes/query", json={"tokens": [1]}, headers=h), 422, "context_too_short")
    assert_error(client.post("/v1/memories/notes/query", json={"batch": []}, headers=h), 422, "invalid_request")
    assert_error(client.post("/v1/memories/notes/generate", json={"tokens": [1, 2], "n_tokens": 10 ** 6}, headers=h),
                 422, "invalid_request")
    assert client.get("/v1/memories/notes/stats", headers=h).json()["patterns"] == 0


def test_concurrent_learns_on_one_memory_are_serialised(client):
    h = create(client)["auth"]
    seqs = [[100 + i, 200 + i, 300 + i, 1 + i] for i in range(16)]
    errors = []

    def learn(seq):
        r = client.post("/v1/memories/notes/learn", json={"tokens": seq}, headers=h)
        if r.status_code != 200:
            errors.append(r.text)

    threads = [threading.Thread(target=learn, args=(s,)) for s in seqs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    stats = client.get("/v1/memories/notes/stats", headers=h).json()
    assert stats["patterns"] == stats["episodes"] == 32
    r = client.post("/v1/memories/notes/query", json={"batch": [s[1:3] for s in seqs]}, headers=h).json()
    assert [x["targets"][0]["token"] for x in r["results"]] == [s[3] for s in seqs]


def test_dreaming_with_forgetting_on_an_empty_memory(client):
    h = create(client, "e")["auth"]
    r = client.post("/v1/memories/e/dream", json={"forget": 1}, headers=h)
    assert r.status_code == 200, r.text
    assert r.json() == {"episodes": 0, "prototypes": 0, "episodes_in_prototypes": 0, "forgotten": 0}


def test_unexpected_errors_name_no_exception(client, monkeypatch):
    from hpi.memory import store
    h = create(client)["auth"]

    def boom(*args, **kwargs):
        raise RuntimeError("internal detail /var/secret")

    monkeypatch.setattr(store.Memory, "predict", boom)
    monkeypatch.setattr(store.Memory, "stats", boom)
    for r in (client.post("/v1/memories/notes/query", json={"tokens": [1, 2]}, headers=h),
              client.get("/v1/memories/notes/stats", headers=h)):
        assert_error(r, 500, "internal_error")
        assert "secret" not in r.text and "RuntimeError" not in r.text
