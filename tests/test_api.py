import pytest

from hpi.protocol import frames
from hpi.protocol.holo import content_hash, load_hologram
from hpi.app import create_app
from hpi.config import Settings
from tests.app_client import app_client
from tests.http_errors import assert_error

USER = [{"role": "user", "content": "What does the anchor keep?"}]
TURN = [{"role": "assistant", "content": "The exact KV cache."}, {"role": "user", "content": "And the page?"}]


def create(client, messages=USER):
    r = client.post("/v1/sessions", json={"messages": messages})
    assert r.status_code == 201, r.text
    body = r.json()
    return body, {"Authorization": f"Bearer {body['token']}"}


def store(client):
    return client.app.state.store


def session_of(client, body):
    return store(client).get(body["session_id"], body["token"])


def test_health_root_and_models(client, tiny_anchor):
    assert client.get("/healthz").json() == {"status": "ok"}
    for r in client.get("/", follow_redirects=False), client.head("/", follow_redirects=False):
        assert r.status_code in (302, 307) and r.headers["location"] == "/client/"
    (m,) = client.get("/v1/models").json()["models"]
    assert m["model_key"] == tiny_anchor.model_key and m["pack_hash"] == tiny_anchor.pack_hash
    assert m["anchor_model"] == m["resonator_model"] == tiny_anchor.lm.model_id
    assert m["tokenizer_id"] == tiny_anchor.lm.tokenizer_id
    assert m["pack_url"] == f"/v1/models/{tiny_anchor.model_key}/pack"


def test_pack_etag_and_304(client, tiny_anchor):
    url = f"/v1/models/{tiny_anchor.model_key}/pack"
    r = client.get(url)
    assert r.status_code == 200 and r.headers["content-type"] == "application/octet-stream"
    assert r.headers["etag"] == f'"{content_hash(r.content)}"' and content_hash(r.content) == tiny_anchor.pack_hash
    assert load_hologram(r.content).kind == "model_pack"
    r2 = client.get(url, headers={"If-None-Match": r.headers["etag"]})
    assert r2.status_code == 304 and not r2.content and r2.headers["etag"] == r.headers["etag"]
    assert client.get(url, headers={"If-None-Match": '"other"'}).status_code == 200
    assert_error(client.get("/v1/models/0123456789abcdef/pack"), 404, "unknown_model")


def test_session_hologram_and_append(client, tiny_anchor):
    body, auth = create(client)
    n = body["n_tokens"]
    assert n == len(tiny_anchor.lm.chat_ids(USER))
    assert body["hologram_url"] == f"/v1/sessions/{body['session_id']}/hologram"

    r = client.get(body["hologram_url"], headers=auth)
    assert r.status_code == 200 and len(r.content) == body["hologram_bytes"]
    assert r.headers["etag"] == f'"{content_hash(r.content)}"'
    assert (r.headers["x-hpi-start"], r.headers["x-hpi-end"]) == ("0", str(n - 1))
    holo = load_hologram(r.content)
    assert holo.kind == "conversation" and (holo.meta["start"], holo.meta["end"]) == (0, n - 1)
    assert holo.meta["pack_hash"] == tiny_anchor.pack_hash
    r304 = client.get(body["hologram_url"], headers={**auth, "If-None-Match": r.headers["etag"]})
    assert r304.status_code == 304 and not r304.content

    session = session_of(client, body)
    cache_before = session.caches.anchor
    r = client.post(f"/v1/sessions/{body['session_id']}/messages", headers=auth, json={"messages": TURN})
    assert r.status_code == 200, r.text
    n2 = len(tiny_anchor.lm.chat_ids(USER + TURN))
    assert n2 > n
    assert (int(r.headers["x-hpi-start"]), int(r.headers["x-hpi-end"])) == (n - 1, n2 - 1)
    assert r.headers["etag"] == f'"{content_hash(r.content)}"'
    delta = load_hologram(r.content).meta
    assert (delta["start"], delta["end"]) == (n - 1, n2 - 1)
    # Only the new tokens were prefilled: the same cache object, now exactly n2 long.
    assert session.caches.anchor is cache_before
    assert session.caches.anchor.get_seq_length() == n2 == len(session.caches.ids)
    # The sync channel's chain restarts at the new end, where the next answer starts.
    assert (session.chain_base, session.chains) == (n2, [frames.GENESIS])

    # The full hologram now spans the whole conversation; the next delta starts at its end.
    full = load_hologram(client.get(body["hologram_url"], headers=auth).content).meta
    assert (full["start"], full["end"]) == (0, n2 - 1)


def test_delta_without_fetching_starts_at_zero(client, tiny_anchor):
    body, auth = create(client)
    r = client.post(f"/v1/sessions/{body['session_id']}/messages", headers=auth, json={"messages": TURN})
    assert r.status_code == 200
    assert r.headers["x-hpi-start"] == "0"


def test_prefix_mismatch_409(client):
    body, auth = create(client)
    url = f"/v1/sessions/{body['session_id']}/messages"
    # A user turn straight after the generation prompt does not extend the prefilled tokens.
    r = client.post(url, headers=auth, json={"messages": [{"role": "user", "content": "again"}]})
    assert_error(r, 409, "prefix_mismatch")
    assert "assistant" in r.json()["error"]["message"]
    assert client.post(url, headers=auth, json={"messages": TURN}).status_code == 200


def test_delete_frees_the_session(client):
    body, auth = create(client)
    url = f"/v1/sessions/{body['session_id']}"
    session = session_of(client, body)
    r = client.delete(url, headers=auth)
    assert r.status_code == 204 and not r.content
    assert session.caches.anchor is None and len(store(client)) == 0 and store(client).kv_bytes == 0
    assert_error(client.get(url + "/hologram", headers=auth), 404, "session_not_found")
    assert_error(client.delete(url, headers=auth), 404, "session_not_found")


def test_auth(client):
    body, auth = create(client)
    url = f"/v1/sessions/{body['session_id']}/hologram"
    r = client.get(url)
    assert_error(r, 401, "unauthorized")
    assert r.headers["www-authenticate"].startswith("Bearer")
    assert_error(client.get(url, headers={"Authorization": f"Basic {body['token']}"}), 401, "unauthorized")
    assert_error(client.get(url, headers={"Authorization": "Bearer wrong"}), 403, "forbidden")
    other, other_auth = create(client)
    assert_error(client.get(url, headers=other_auth), 403, "forbidden")
    assert_error(client.delete(f"/v1/sessions/{body['session_id']}", headers=other_auth), 403, "forbidden")
    # Existence is checked before the token.
    assert_error(client.get("/v1/sessions/nope/hologram"), 404, "session_not_found")
    assert_error(client.post("/v1/sessions/nope/messages", headers=auth, json={"messages": TURN}),
                 404, "session_not_found")


@pytest.mark.parametrize("payload", [
    {},
    {"messages": []},
    {"messages": [{"role": "robot", "content": "hi"}]},
    {"messages": [{"role": "user"}]},
    {"messages": [{"role": "user", "content": 3}]},
    {"messages": [{"role": "user", "content": "hi", "name": "x"}]},
    {"messages": USER, "extra": 1},
    {"messages": [{"role": "user", "content": "x" * 101}]},
    {"messages": USER * 5},
])
def test_invalid_bodies_422(make_client, payload):
    client = make_client(max_message_chars=100, max_messages=4)
    r = client.post("/v1/sessions", json=payload)
    assert_error(r, 422, "invalid_request")
    assert "body" in r.json()["error"]["message"]


def test_a_body_of_thousands_of_bad_fields_gets_a_short_422(client):
    # found by tests/test_fuzz.py: 90,000 unknown keys got a 4 MB answer
    body = {"messages": USER, **{f"k{i}" + "x" * 200: 0 for i in range(3000)}}
    r = client.post("/v1/sessions", json=body)
    assert_error(r, 422, "invalid_request")
    assert len(r.content) < 2048 and r.json()["error"]["message"].endswith("and 2992 more")


def test_invalid_json_422(client):
    r = client.post("/v1/sessions", content=b"{not json", headers={"Content-Type": "application/json"})
    assert_error(r, 422, "invalid_request")


def test_unknown_route_is_json_404(client):
    assert_error(client.get("/v1/nothing"), 404, "not_found")
    assert_error(client.put("/healthz"), 405, "method_not_allowed")


def test_prompt_token_limit_413(make_client, tiny_anchor):
    n = len(tiny_anchor.lm.chat_ids(USER))
    client = make_client(max_prompt_tokens=n - 1)
    r = client.post("/v1/sessions", json={"messages": USER})
    assert_error(r, 413, "prompt_too_long")
    assert f"{n} tokens" in r.json()["error"]["message"] and str(n - 1) in r.json()["error"]["message"]
    assert len(store(client)) == 0

    client = make_client(max_prompt_tokens=n)
    body, auth = create(client)
    r = client.post(f"/v1/sessions/{body['session_id']}/messages", headers=auth, json={"messages": TURN})
    assert_error(r, 413, "prompt_too_long")
    assert session_of(client, body).n_tokens == n and store(client).kv_bytes == n * tiny_anchor.kv_bytes_per_token()


def test_session_limit_503(make_client):
    client = make_client(max_sessions=2, client_share=1)
    first, auth = create(client)
    create(client)
    assert_error(client.post("/v1/sessions", json={"messages": USER}), 503, "too_many_sessions")
    client.delete(f"/v1/sessions/{first['session_id']}", headers=auth)
    create(client)


def test_kv_memory_limit_503(make_client, tiny_anchor):
    n = len(tiny_anchor.lm.chat_ids(USER))
    client = make_client(max_kv_bytes=(n + 3) * tiny_anchor.kv_bytes_per_token(), client_share=1)
    body, auth = create(client)
    assert store(client).kv_bytes == n * tiny_anchor.kv_bytes_per_token()
    assert_error(client.post("/v1/sessions", json={"messages": USER}), 503, "kv_memory_full")
    r = client.post(f"/v1/sessions/{body['session_id']}/messages", headers=auth, json={"messages": TURN})
    assert_error(r, 503, "kv_memory_full")
    client.delete(f"/v1/sessions/{body['session_id']}", headers=auth)
    create(client)


def test_body_size_limit_413(make_client):
    client = make_client(max_body_bytes=200)
    big = {"messages": [{"role": "user", "content": "x" * 300}]}
    assert_error(client.post("/v1/sessions", json=big), 413, "body_too_large")

    def chunks():  # no Content-Length: the middleware must count the bytes itself
        yield b'{"messages": [{"role": "user", "content": "'
        yield b"x" * 300
        yield b'"}]}'

    r = client.post("/v1/sessions", content=chunks(), headers={"Content-Type": "application/json"})
    assert_error(r, 413, "body_too_large")
    assert client.post("/v1/sessions", json={"messages": USER}).status_code == 201


@pytest.mark.real_model
def test_real_model_session(smollm_anchor, tmp_path):
    with app_client(create_app(Settings(sessions_dir=str(tmp_path)), smollm_anchor)) as client:
        body, auth = create(client, [{"role": "user", "content": "Name a colour."}])
        r = client.get(body["hologram_url"], headers=auth)
        assert r.status_code == 200
        meta = load_hologram(r.content).meta
        assert (meta["start"], meta["end"]) == (0, body["n_tokens"] - 1)
        assert meta["model_id"] == smollm_anchor.res_lm.model_id
