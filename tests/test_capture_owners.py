"""Capture collections belong to whoever created them: nobody else lists, searches, reads or deletes them."""

import numpy as np
from fastapi import FastAPI
from fastapi.testclient import TestClient

from hpi.capture_api import capture_router
from hpi.config import Settings
from hpi.owners import Owners
from tests.http_errors import assert_error

SECRET = "Note to self: my card PIN is 4711."


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def test_a_sessions_collection_is_invisible_to_everyone_else(client, tiny):
    s = client.post("/v1/sessions", json={"messages": [{"role": "user", "content": SECRET}]}).json()
    a = bearer(s["token"])
    store_a = {"session_id": s["session_id"], "layer": 1, "pool": "token"}
    for name in ("notes", "diary"):
        r = client.post("/v1/capture/store", json={**store_a, "collection": name}, headers=a)
        assert r.status_code == 200, r.text
        assert "owner_token" not in r.json()  # the session's token owns it
    secret_ids = list(client.app.state.store.get(s["session_id"], s["token"]).caches.ids)
    assert r.json()["size"] == len(secret_ids)

    query = {"vector": np.zeros(tiny.config.hidden_size).tolist(), "k": 100}

    # anonymous: nothing at all
    assert_error(client.get("/v1/capture/collections"), 401, "unauthorized")
    for name in ("notes", "diary"):
        assert_error(client.post("/v1/capture/search", json={**query, "collection": name}), 401, "unauthorized")
        assert_error(client.delete(f"/v1/capture/collections/{name}"), 401, "unauthorized")
    # B: an owner token of its own, issued with its first collection, named like one of A's
    r = client.post("/v1/capture/store", json={"collection": "notes", "text": "Shopping: bread.", "layer": 1,
                                               "pool": "token", "label": "b"})
    assert r.status_code == 200, r.text
    b = bearer(r.json()["owner_token"])
    assert r.json()["size"] == r.json()["added"]  # a collection of its own, not an addition to A's
    # B: its own collection only; A's are answered exactly like missing ones
    listed = client.get("/v1/capture/collections", headers=b).json()
    assert [(c["name"], c["size"]) for c in listed["collections"]] == [("notes", r.json()["size"])]
    hits = client.post("/v1/capture/search", json={**query, "collection": "notes"}, headers=b).json()
    assert {n["label"] for n in hits["results"][0]["neighbours"]} == {"b"}
    theirs = assert_error(client.post("/v1/capture/search", json={**query, "collection": "diary"}, headers=b),
                          404, "unknown_collection")
    missing = assert_error(client.post("/v1/capture/search", json={**query, "collection": "never"}, headers=b),
                           404, "unknown_collection")
    assert theirs["message"].replace("diary", "never") == missing["message"] and "diary" not in missing["message"]
    assert_error(client.delete("/v1/capture/collections/diary", headers=b), 404, "unknown_collection")
    # a forged owner token is refused; any other token reaches only what it owns, and creates nothing
    forged = bearer("hpo_" + "A" * 54)
    assert_error(client.get("/v1/capture/collections", headers=forged), 403, "forbidden")
    assert client.get("/v1/capture/collections", headers=bearer("guess")).json()["collections"] == []
    assert_error(client.post("/v1/capture/store", json={"collection": "mine", "text": "x", "layer": 1},
                             headers=bearer("guess")), 403, "forbidden")

    # A: its collections, the secret's tokens in them, with the session's token
    listed = client.get("/v1/capture/collections", headers=a).json()
    assert sorted(c["name"] for c in listed["collections"]) == ["diary", "notes"]
    hits = client.post("/v1/capture/search", json={**query, "collection": "diary"}, headers=a).json()
    assert sorted(n["token"] for n in hits["results"][0]["neighbours"]) == sorted(secret_ids)
    r = client.post("/v1/capture/store", json={"collection": "diary", "text": "More.", "layer": 1, "pool": "token"},
                    headers=a)  # the session's token adds text to the collection it owns
    assert r.status_code == 200 and r.json()["size"] > len(secret_ids)
    assert client.delete("/v1/capture/collections/diary", headers=a).status_code == 204
    assert_error(client.delete("/v1/capture/collections/diary", headers=a), 404, "unknown_collection")
    assert client.get("/v1/capture/collections", headers=b).json()["collections"][0]["name"] == "notes"


def test_owner_errors_are_json_in_an_app_without_the_anchors_handlers():
    app = FastAPI()
    app.include_router(capture_router(Settings(), Owners(b"k" * 32)))
    with TestClient(app) as c:
        r = c.get("/v1/capture/collections")
        assert_error(r, 401, "unauthorized")
        assert r.headers["www-authenticate"].startswith("Bearer")
        assert_error(c.get("/v1/capture/collections", headers=bearer("hpo_x")), 403, "forbidden")
        token = Owners(b"k" * 32).issue()
        assert c.get("/v1/capture/collections", headers=bearer(token)).json()["collections"] == []


def test_one_client_cannot_fill_the_store_with_many_owner_tokens(make_client, tiny):
    d = tiny.config.hidden_size
    per_vector = (d + 1) * 8
    client = make_client(capture_store_bytes=4 * 3 * per_vector)  # one client's share: 3 vectors
    body = {"text": "Shopping: bread.", "layer": 1, "pool": "mean"}
    for i in range(3):  # a fresh owner token each time
        r = client.post("/v1/capture/store", json={**body, "collection": f"c{i}"})
        assert r.status_code == 200, r.text
    assert_error(client.post("/v1/capture/store", json={**body, "collection": "c3"}), 429, "client_quota")
    other = client.__class__(client.app, base_url="http://localhost", client=("10.0.0.7", 1))
    assert other.post("/v1/capture/store", json={**body, "collection": "c3"}).status_code == 200
