"""Memories belong to whoever created them: owner tokens, per-owner names, nothing of another
owner's memories observable, the per-owner limit, files named and stamped by owner."""

import logging

import pytest

from hpi.protocol.holo import load_hologram
from hpi.memory import budget
from hpi.errors import MemoryCorrupted
from hpi.memory.registry import Registry
from tests.http_errors import assert_error
from tests.test_memory_api import create

ENDPOINTS = (("post", "/v1/memories/notes/learn", {"tokens": [1, 2, 3, 4]}),
             ("post", "/v1/memories/notes/query", {"tokens": [1, 2]}),
             ("post", "/v1/memories/notes/generate", {"tokens": [1, 2], "n_tokens": 2}),
             ("post", "/v1/memories/notes/dream", {}),
             ("get", "/v1/memories/notes/stats", None),
             ("delete", "/v1/memories/notes", None),
             ("get", "/v1/memories", None))


def call(client, method, path, body, headers=None):
    return client.request(method.upper(), path, json=body, headers=headers)


def test_every_endpoint_but_create_needs_an_owner_token_the_anchor_issued(client):
    body = create(client)
    assert body["owner_token"].startswith("hpo_")
    for method, path, payload in ENDPOINTS:
        r = call(client, method, path, payload)
        assert_error(r, 401, "unauthorized")
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
        forged = {"Authorization": "Bearer hpo_" + "A" * 54}
        assert_error(call(client, method, path, payload, forged), 403, "forbidden")
    assert_error(client.post("/v1/memories", json={"name": "x"}, headers={"Authorization": "Bearer nope"}),
                 403, "forbidden")
    assert client.get("/v1/memories/notes/stats", headers=body["auth"]).status_code == 200


def test_another_owners_memory_is_answered_like_a_missing_one(client):
    a = create(client)["auth"]
    client.post("/v1/memories/notes/learn", json={"tokens": [5, 6, 7, 8]}, headers=a)
    b = create(client, "mine")["auth"]
    assert client.get("/v1/memories", headers=b).json() == {"memories": ["mine"]}
    seen = {}
    for method, path, payload in ENDPOINTS[:-1]:
        r = call(client, method, path, payload, b)
        assert_error(r, 404, "unknown_memory")
        seen[path] = r.json()
    # The same answers once the memory is really gone: nothing tells the two apart.
    assert client.delete("/v1/memories/notes", headers=a).status_code == 204
    for method, path, payload in ENDPOINTS[:-1]:
        assert call(client, method, path, payload, b).json() == seen[path]


def test_names_are_per_owner(client):
    a = create(client)["auth"]
    b = create(client)["auth"]  # the same name, another owner: no 409, another memory
    assert a != b
    client.post("/v1/memories/notes/learn", json={"tokens": [5, 6, 7, 8]}, headers=a)
    assert client.get("/v1/memories/notes/stats", headers=a).json()["patterns"] == 2
    assert client.get("/v1/memories/notes/stats", headers=b).json()["patterns"] == 0
    assert client.delete("/v1/memories/notes", headers=b).status_code == 204
    assert client.get("/v1/memories/notes/stats", headers=a).json()["patterns"] == 2


def test_a_create_with_an_owner_token_keeps_that_owner(client):
    first = create(client, "one")
    h = first["auth"]
    second = create(client, "two", auth=h)
    assert "owner_token" not in second  # issued once, at the owner's first memory
    assert client.get("/v1/memories", headers=h).json() == {"memories": ["one", "two"]}
    assert_error(client.post("/v1/memories", json={"name": "two"}, headers=h), 409, "memory_exists")


def test_one_owner_holds_at_most_its_share_of_memories(client):
    h = create(client, "m0")["auth"]
    for i in range(1, budget.MAX_PER_OWNER):
        create(client, f"m{i}", auth=h)
    assert_error(client.post("/v1/memories", json={"name": "more", "satellites": 16}, headers=h),
                 429, "owner_memory_limit")
    create(client, "more")  # another owner is not held back
    client.delete("/v1/memories/m0", headers=h)
    create(client, "more", auth=h)


def test_files_carry_the_owner_and_ownerless_files_are_ignored(make_client, tmp_path, caplog):
    first = make_client()
    body = create(first)
    folder = tmp_path / "memories"
    (snapshot,) = folder.glob("*.holo")
    owner = snapshot.name.split(".")[0]
    assert len(owner) == 32 and snapshot.name == f"{owner}.notes.holo"
    assert owner not in body["owner_token"]  # the file keeps a hash of the token, never the token
    assert load_hologram(snapshot.read_bytes()).meta["owner"] == owner

    (folder / "old.holo").write_bytes(snapshot.read_bytes())  # the layout before owners
    # A file moved under another owner's id is refused at load: its meta names its owner.
    (folder / f"{'0' * 32}.notes.holo").write_bytes(snapshot.read_bytes())
    second = make_client()
    assert second.get("/v1/memories", headers=body["auth"]).json() == {"memories": ["notes"]}
    registry = Registry(folder, 64)
    with caplog.at_level(logging.ERROR), pytest.raises(MemoryCorrupted) as e:
        with registry.use("0" * 32, "notes"):
            pass
    assert "another memory" in caplog.text and "another memory" not in e.value.message  # logged, not told


def test_one_client_cannot_take_every_memory_with_many_owner_tokens(make_client):
    client = make_client(max_memories=8, client_share=0.25)
    for i in range(2):
        create(client, name=f"m{i}")  # each with a fresh owner token
    assert_error(client.post("/v1/memories", json={"name": "m2", "context": 2, "satellites": 4096}),
                 429, "client_quota")
    other = client.__class__(client.app, base_url="http://localhost", client=("10.0.0.9", 1))
    create(other, name="m2")


def test_a_clients_memories_are_counted_after_a_restart(make_client):
    first = make_client(max_memories=8, client_share=0.25)
    for i in range(2):
        create(first, name=f"m{i}")
    again = make_client(max_memories=8, client_share=0.25)  # same memories directory
    assert_error(again.post("/v1/memories", json={"name": "m2", "context": 2, "satellites": 4096}),
                 429, "client_quota")
