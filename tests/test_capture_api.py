"""POST /v1/capture and the hyperbolic store routes, on the tiny model."""

import numpy as np
import pytest

from protocol.holo import load_hologram
from server.capture import STATES, Dims, capture, select
from tests.http_errors import assert_error

TEXT = "The anchor keeps the exact KV cache; the page decodes from a hologram of it."
USER = [{"role": "user", "content": "What does the anchor keep?"}]


def test_default_answer_is_aggregates_as_json(client, tiny):
    r = client.post("/v1/capture", json={"text": TEXT})
    assert r.status_code == 200, r.text
    body = r.json()
    ids = tiny.tokenizer(TEXT)["input_ids"]
    d = Dims.of(tiny.config)
    assert body["n_tokens"] == len(ids) and body["range"] == [0, len(ids)] and body["tensors"] == {}
    assert body["layers"] == list(range(d.layers)) and body["heads"] == list(range(d.heads))
    tokens = body["tokens"]
    assert tokens["ids"] == ids and "".join(tokens["pieces"]) == tiny.tokenizer.decode(ids)
    assert len(tokens["attention_received"]) == len(tokens["activation_norm"]) == len(ids)
    peaks = body["peaks"]
    assert peaks["percentile"] == 90 and peaks["activation"]["state"] == "mlp.hook_post"
    assert all(tokens["attention_received"][p] >= peaks["attention"]["threshold"] for p in peaks["attention"]["positions"])
    assert len(body["head_summary"]["entropy"]) == d.layers and len(body["head_summary"]["entropy"][0]) == d.heads
    assert body["trajectory"][0]["component"] == "embed" and body["estimate_bytes"] >= len(r.content)


def test_raw_states_on_request_as_json_and_holo(client, tiny):
    ids = tiny.tokenizer(TEXT)["input_ids"]
    request = {"text": TEXT, "layers": [1], "heads": [0, 3], "start": 4, "end": 10,
               "states": ["attn.hook_pattern", "attn.hook_attn_scores", "hook_resid_post"]}
    want = capture(tiny, ids, select(Dims.of(tiny.config), len(ids), layers=[1], heads=[0, 3], start=4, end=10,
                                     states=request["states"]))
    r = client.post("/v1/capture", json=request)
    body = r.json()
    assert len(r.content) <= body["estimate_bytes"]
    pattern = body["tensors"]["blocks.1.attn.hook_pattern"]
    assert pattern["shape"] == [2, 6, 10]
    assert np.array_equal(np.array(pattern["data"], dtype=np.float32), want.tensors["blocks.1.attn.hook_pattern"])
    scores = body["tensors"]["blocks.1.attn.hook_attn_scores"]["data"]
    assert scores[0][0][4] is not None and scores[0][0][5] is None  # query 4 sees keys 0..4 only: -inf is null
    r = client.post("/v1/capture", json={**request, "format": "holo"})
    assert r.status_code == 200 and r.headers["content-type"] == "application/octet-stream"
    holo = load_hologram(r.content)
    assert holo.kind == "captured_state" and holo.meta["layers"] == [1]
    for name, a in want.tensors.items():
        assert np.array_equal(holo.tensors[name], a)


def test_capture_of_messages_and_of_a_session_with_generated_tokens(client, tiny):
    chat = client.post("/v1/capture", json={"messages": USER}).json()
    assert chat["tokens"]["ids"] == tiny.chat_ids(USER)
    s = client.post("/v1/sessions", json={"messages": USER}).json()
    auth = {"Authorization": f"Bearer {s['token']}"}
    session = client.app.state.store.get(s["session_id"], s["token"])
    session.caches.ids.append(7)  # as if verification had confirmed a generated token
    r = client.post("/v1/capture", json={"session_id": s["session_id"], "start": s["n_tokens"]}, headers=auth)
    assert r.status_code == 200, r.text
    assert r.json()["tokens"]["ids"] == [7] and r.json()["n_tokens"] == s["n_tokens"] + 1
    session.caches.ids.pop()
    assert_error(client.post("/v1/capture", json={"session_id": s["session_id"]}), 401, "unauthorized")
    assert_error(client.post("/v1/capture", json={"session_id": s["session_id"]},
                             headers={"Authorization": "Bearer nope"}), 403, "forbidden")
    assert_error(client.post("/v1/capture", json={"session_id": "missing"}, headers=auth), 404, "session_not_found")


def test_bad_requests(client, tiny):
    error = assert_error(client.post("/v1/capture", json={"text": TEXT, "layers": [0, 9]}), 422, "unknown_layers")
    assert "0..1" in error["message"]
    assert "0..3" in assert_error(client.post("/v1/capture", json={"text": TEXT, "heads": [-1]}),
                                  422, "unknown_heads")["message"]
    error = assert_error(client.post("/v1/capture", json={"text": TEXT, "states": ["pattern"]}), 422, "unknown_states")
    assert all(name in error["message"] for name in STATES)
    assert_error(client.post("/v1/capture", json={"text": TEXT, "end": 999}), 422, "bad_range")
    assert_error(client.post("/v1/capture", json={"text": TEXT, "messages": USER}), 422, "invalid_request")
    assert_error(client.post("/v1/capture", json={}), 422, "invalid_request")
    assert_error(client.post("/v1/capture", json={"text": TEXT, "format": "csv"}), 422, "invalid_request")
    assert_error(client.post("/v1/capture", json={"text": ""}), 422, "empty_context")


def test_oversized_selections_are_refused_with_the_estimate(make_client, tiny):
    n = len(tiny.tokenizer(TEXT)["input_ids"])
    client = make_client(capture_max_bytes=100_000, capture_max_tokens=n)
    r = client.post("/v1/capture", json={"text": TEXT, "states": ["logits"]})
    error = assert_error(r, 413, "capture_too_large")
    assert error["estimate_bytes"] > error["limit_bytes"] == 100_000
    assert str(error["estimate_bytes"]) in error["message"]
    ok = client.post("/v1/capture", json={"text": TEXT, "states": ["logits"], "start": n - 4, "format": "holo"})
    assert ok.status_code == 200 and int(ok.headers["x-hpi-estimate-bytes"]) <= 100_000
    assert_error(client.post("/v1/capture", json={"text": TEXT * 3}), 413, "prompt_too_long")


def test_store_and_search_states(client, tiny):
    texts = {"a": "anchor keeps the exact KV cache.", "b": "page decodes tokens on the GPU."}
    for label, text in texts.items():
        r = client.post("/v1/capture/store", json={"collection": "runs", "text": text, "layer": 1,
                                                   "pool": "token", "label": label})
        assert r.status_code == 200, r.text
    body = r.json()
    n_a = len(tiny.tokenizer(texts["a"])["input_ids"])
    assert body["ids"][0] == n_a and body["size"] == n_a + body["added"] and body["curvature"] == -1.0
    assert body["spec"] == {"state": "hook_resid_post", "layer": 1, "heads": None, "pool": "token"}
    # a stored text's own states come back first, at distance 0
    r = client.post("/v1/capture/search", json={"collection": "runs", "text": texts["b"], "k": 3})
    results = r.json()["results"]
    assert len(results) == body["added"]
    for q in results:
        first = q["neighbours"][0]
        assert (first["label"], first["position"]) == ("b", q["query"]["position"]) and first["distance"] < 1e-6
    vector = np.zeros(tiny.config.hidden_size).tolist()
    for metric in ("hyperbolic", "euclidean", "cosine"):
        r = client.post("/v1/capture/search", json={"collection": "runs", "vector": vector, "k": 2, "metric": metric})
        assert r.status_code == 200 and len(r.json()["results"][0]["neighbours"]) == 2
    listed = client.get("/v1/capture/collections").json()
    assert [c["name"] for c in listed["collections"]] == ["runs"] and listed["bytes"] > 0
    assert_error(client.post("/v1/capture/store", json={"collection": "runs", "text": TEXT, "layer": 0}),
                 409, "collection_mismatch")
    assert_error(client.post("/v1/capture/store", json={"collection": "x", "text": TEXT}), 422, "unknown_layers")
    assert_error(client.post("/v1/capture/store", json={"collection": "x", "text": TEXT, "state": "attn.hook_pattern",
                                                        "layer": 0}), 422, "unknown_states")
    assert_error(client.post("/v1/capture/search", json={"collection": "runs", "vector": [1.0]}), 422, "bad_vectors")
    assert_error(client.post("/v1/capture/search", json={"collection": "nope", "text": TEXT}), 404,
                 "unknown_collection")
    assert_error(client.post("/v1/capture/search", json={"collection": "runs"}), 422, "invalid_request")
    assert client.delete("/v1/capture/collections/runs").status_code == 204
    assert_error(client.delete("/v1/capture/collections/runs"), 404, "unknown_collection")


def test_store_of_mean_states_per_text_with_its_own_curvature(client):
    for i, text in enumerate([TEXT, "Another text entirely.", "And a third one here."]):
        r = client.post("/v1/capture/store", json={"collection": "texts", "text": text, "layer": 0, "start": 1,
                                                   "curvature": -0.5, "center": False, "label": str(i)})
        assert r.status_code == 200, r.text
    assert r.json()["size"] == 3 and r.json()["curvature"] == -0.5
    hits = client.post("/v1/capture/search", json={"collection": "texts", "text": TEXT, "start": 1}).json()
    (result,) = hits["results"]
    assert result["neighbours"][0]["label"] == "0" and result["neighbours"][0]["distance"] < 1e-6
    assert_error(client.post("/v1/capture/store", json={"collection": "texts", "text": TEXT, "layer": 0,
                                                        "curvature": -1.0}), 409, "collection_mismatch")
