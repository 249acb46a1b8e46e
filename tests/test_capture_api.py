"""POST /v1/capture and the hyperbolic store routes, on the tiny model."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from hpi.protocol.holo import load_hologram
from hpi import capture_api
from hpi.capture import STATES, Dims, capture, estimate_bytes, select
from hpi.capture_api import Admission
from hpi.errors import CaptureBusy
from hpi.config import Settings
from hpi.hyperbolic import OWNER_SHARE
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


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def test_store_and_search_states(client, tiny):
    texts = {"a": "anchor keeps the exact KV cache.", "b": "page decodes tokens on the GPU."}
    first = client.post("/v1/capture/store", json={"collection": "runs", "text": texts["a"], "layer": 1,
                                                   "pool": "token", "label": "a"})
    assert first.status_code == 200, first.text
    auth = bearer(first.json()["owner_token"])  # issued to a store without a token, that once
    r = client.post("/v1/capture/store", json={"collection": "runs", "text": texts["b"], "layer": 1,
                                               "pool": "token", "label": "b"}, headers=auth)
    assert r.status_code == 200, r.text
    body = r.json()
    assert "owner_token" not in body
    n_a = len(tiny.tokenizer(texts["a"])["input_ids"])
    assert body["ids"][0] == n_a and body["size"] == n_a + body["added"] and body["curvature"] == -1.0
    assert body["spec"] == {"state": "hook_resid_post", "layer": 1, "heads": None, "pool": "token"}
    # a stored text's own states come back first, at distance 0
    r = client.post("/v1/capture/search", json={"collection": "runs", "text": texts["b"], "k": 3}, headers=auth)
    results = r.json()["results"]
    assert len(results) == body["added"]
    for q in results:
        first = q["neighbours"][0]
        assert (first["label"], first["position"]) == ("b", q["query"]["position"]) and first["distance"] < 1e-6
    vector = np.zeros(tiny.config.hidden_size).tolist()
    for metric in ("hyperbolic", "euclidean", "cosine"):
        r = client.post("/v1/capture/search", json={"collection": "runs", "vector": vector, "k": 2, "metric": metric},
                        headers=auth)
        assert r.status_code == 200 and len(r.json()["results"][0]["neighbours"]) == 2
    listed = client.get("/v1/capture/collections", headers=auth).json()
    assert [c["name"] for c in listed["collections"]] == ["runs"] and listed["bytes"] > 0
    assert listed["limit_bytes"] == Settings().capture_store_bytes // OWNER_SHARE  # one owner's share
    assert_error(client.post("/v1/capture/store", json={"collection": "runs", "text": TEXT, "layer": 0},
                             headers=auth), 409, "collection_mismatch")
    assert_error(client.post("/v1/capture/store", json={"collection": "x", "text": TEXT}), 422, "unknown_layers")
    assert_error(client.post("/v1/capture/store", json={"collection": "x", "text": TEXT, "state": "attn.hook_pattern",
                                                        "layer": 0}), 422, "unknown_states")
    assert_error(client.post("/v1/capture/search", json={"collection": "runs", "vector": [1.0]}, headers=auth),
                 422, "bad_vectors")
    assert_error(client.post("/v1/capture/search", json={"collection": "nope", "text": TEXT}, headers=auth), 404,
                 "unknown_collection")
    assert_error(client.post("/v1/capture/search", json={"collection": "runs"}, headers=auth), 422, "invalid_request")
    assert client.delete("/v1/capture/collections/runs", headers=auth).status_code == 204
    assert_error(client.delete("/v1/capture/collections/runs", headers=auth), 404, "unknown_collection")


def test_store_of_mean_states_per_text_with_its_own_curvature(client):
    auth = {}
    for i, text in enumerate([TEXT, "Another text entirely.", "And a third one here."]):
        r = client.post("/v1/capture/store", json={"collection": "texts", "text": text, "layer": 0, "start": 1,
                                                   "curvature": -0.5, "center": False, "label": str(i)}, headers=auth)
        assert r.status_code == 200, r.text
        auth = auth or bearer(r.json()["owner_token"])
    assert r.json()["size"] == 3 and r.json()["curvature"] == -0.5
    hits = client.post("/v1/capture/search", json={"collection": "texts", "text": TEXT, "start": 1},
                       headers=auth).json()
    (result,) = hits["results"]
    assert result["neighbours"][0]["label"] == "0" and result["neighbours"][0]["distance"] < 1e-6
    assert_error(client.post("/v1/capture/store", json={"collection": "texts", "text": TEXT, "layer": 0,
                                                        "curvature": -1.0}, headers=auth), 409, "collection_mismatch")


def test_numbers_that_would_not_be_finite_are_refused_with_422(client, tiny):
    """JSON has no inf or nan: a scale or a query that would put them in an answer is a bad request."""
    store = {"collection": "far", "text": TEXT, "layer": 1, "pool": "token"}
    assert_error(client.post("/v1/capture/store", json={**store, "scale": 1e308}), 422, "bad_scale")
    r = client.post("/v1/capture/store", json=store)
    assert r.status_code == 200, r.text
    auth = bearer(r.json()["owner_token"])
    for value in (1e308, 1e200):
        for metric in ("hyperbolic", "euclidean", "cosine"):
            query = {"collection": "far", "vector": [value] * tiny.config.hidden_size, "metric": metric}
            assert_error(client.post("/v1/capture/search", json=query, headers=auth), 422, "bad_vectors")
    # far out but within the store's bound, every metric answers finite distances
    for metric in ("hyperbolic", "euclidean", "cosine"):
        query = {"collection": "far", "vector": [1e140] * tiny.config.hidden_size, "metric": metric}
        r = client.post("/v1/capture/search", json=query, headers=auth)
        assert r.status_code == 200, r.text
        assert all(np.isfinite(n["distance"]) for n in r.json()["results"][0]["neighbours"])


def test_admission_bounds_bytes_and_count_and_refuses_after_a_short_wait():
    admission = Admission(budget=100, slots=2, wait_s=0.2)
    with admission.admit(90):
        with admission.admit(10):  # fits beside the large one
            t0 = time.monotonic()
            with pytest.raises(CaptureBusy) as e, admission.admit(1):  # two are running
                pass
            assert 0.2 <= time.monotonic() - t0 < 2 and e.value.headers == {"Retry-After": "1"}
        with pytest.raises(CaptureBusy), admission.admit(11):  # over the bytes left
            pass
        with admission.admit(10):
            pass
    assert admission.held == admission.running == 0


def test_a_small_capture_runs_beside_a_large_one_and_an_over_budget_one_gets_503(make_client, tiny, monkeypatch):
    dims = Dims.of(tiny.config)
    small, large = {"text": "Hi", "format": "holo"}, {"text": TEXT, "states": ["attn.hook_pattern"], "format": "holo"}
    n_large = len(tiny.tokenizer(TEXT)["input_ids"])
    need_small = estimate_bytes(dims, select(dims, len(tiny.tokenizer("Hi")["input_ids"])), "holo")
    need_large = estimate_bytes(dims, select(dims, n_large, states=large["states"]), "holo")
    assert need_large > need_small
    running, release = threading.Event(), threading.Event()

    def held_capture(lm, ids, sel):  # the large capture stays in its forward until released
        if len(ids) == n_large:
            running.set()
            release.wait(10)
        return capture(lm, ids, sel)

    monkeypatch.setattr(capture_api, "capture", held_capture)
    monkeypatch.setattr(capture_api, "ADMIT_WAIT_S", 0.3)
    client = make_client(capture_max_bytes=need_large + need_small)  # one large and one small at once
    with ThreadPoolExecutor(1) as pool:
        try:
            first = pool.submit(client.post, "/v1/capture", json=large)
            assert running.wait(10)
            t0 = time.monotonic()
            assert client.post("/v1/capture", json=small).status_code == 200
            assert time.monotonic() - t0 < 5  # did not wait for the large one
            t0 = time.monotonic()
            busy = client.post("/v1/capture", json=large)
            assert time.monotonic() - t0 < 5
            assert_error(busy, 503, "capture_busy")
            assert busy.headers["retry-after"] == "1"
        finally:
            release.set()
        assert first.result(10).status_code == 200
    assert client.post("/v1/capture", json=large).status_code == 200  # the budget is free again
