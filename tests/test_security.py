"""Security as a test suite (issue 13).

Who may call what: every endpoint of the app and the sync websocket, called with no credential,
with another's (another session's token, another owner's token) and with the right one; then
the same behind API keys, with no key, a wrong key and the right one. The table of calls is
checked against the app's routes, so an endpoint added without a row fails here.

What each limit refuses: every row of server/limits.py (the README's table is written from it)
is probed one past its value, where that is cheap with the tiny model; the few that need a
real server or many gigabytes check the class that enforces them and that the limit reaches it.
"""

from __future__ import annotations

import itertools
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from types import SimpleNamespace

import msgpack
import pydantic
import pytest
from starlette.websockets import WebSocketDisconnect

from hpi.protocol import frames
from hpi import capture_api, completions, limits, serving
from hpi.app import create_app
from hpi.config import Settings
from hpi.errors import CaptureBusy
from hpi.memory import budget
from hpi.memory.store import Config
from hpi.middleware import API_KEY_PROTOCOL
from tests.app_client import app_client
from tests.http_errors import assert_error
from tests.syncing import send

try:
    from fastapi.routing import iter_route_contexts  # a FastAPI that keeps included routers whole
except ImportError:  # one that copies their routes into the app's
    def iter_route_contexts(routes):
        return routes

USER = [{"role": "user", "content": "What does the anchor keep?"}]
TURN = [{"role": "assistant", "content": "The exact KV cache."}, {"role": "user", "content": "And the page?"}]
TEXT = "The anchor keeps the exact KV cache. The page decodes from the hologram."
KEY, SECOND_KEY, WRONG_KEY = "test-key-0123456789", "second.key_0123456789", "wrong-key-0123456789"
MINE = "mine"  # the name of the user's memory and collection: never in an answer to anyone else
SMALL_MEMORY = {"context": 2, "satellites": 64}


def outcome(r) -> tuple[int, str | None]:
    """An HTTP answer as (status, error code); the code is None for a success."""
    if r.status_code < 400:
        return r.status_code, None
    return r.status_code, assert_error(r, r.status_code, r.json()["error"]["code"])["code"]


def bearer(token: str | None) -> dict:
    return {"Authorization": f"Bearer {token}"} if token else {}


class World:
    """What the calls act on, made on first use: the user's session (with a checkpoint), memory
    and collection, and another session and owner. A fresh one for every call."""

    names = itertools.count()

    def __init__(self, client, key_headers: dict):
        self.client, self.key = client, key_headers

    def post(self, url: str, body: dict, token: str | None = None) -> dict:
        r = self.client.post(url, json=body, headers={**self.key, **bearer(token)})
        assert r.status_code in (200, 201), r.text
        return r.json()

    @cached_property
    def session(self) -> dict:
        return self.post("/v1/sessions", {"messages": USER})

    @cached_property
    def their_session(self) -> dict:
        return self.post("/v1/sessions", {"messages": USER})

    @cached_property
    def checkpoint(self) -> str:
        return self.post(f"/v1/sessions/{self.session['session_id']}/checkpoints", {"name": "start"},
                         self.session["token"])["name"]

    @cached_property
    def owner(self) -> str:
        token = self.post("/v1/memories", {"name": MINE, **SMALL_MEMORY})["owner_token"]
        self.post(f"/v1/memories/{MINE}/learn", {"text": TEXT}, token)
        return token

    @cached_property
    def their_owner(self) -> str:
        return self.post("/v1/memories", {"name": "theirs", **SMALL_MEMORY})["owner_token"]

    @cached_property
    def collection(self) -> dict:
        """The user's collection, of their session's states: its owner is the session's token."""
        return self.post("/v1/capture/store", {"session_id": self.session["session_id"], "collection": MINE,
                                               "state": "hook_resid_post", "layer": 0}, self.session["token"])

    def new_name(self) -> str:
        return f"m{next(self.names)}"


@dataclass(frozen=True)
class Row:
    """One endpoint: its call, what it needs (`session`, `owner` or `open`), and the outcome with no
    credential, with another's and with the right one."""
    call: Callable  # (world, token, key headers) -> response, or (status, code) for the websocket
    needs: str
    none: tuple[int, str | None]
    other: tuple[int, str | None]
    right: tuple[int, str | None]


def anyone(call: Callable, status: int) -> Row:
    return Row(call, "open", (status, None), (status, None), (status, None))


def holder(call: Callable, status: int) -> Row:
    return Row(call, "session", (401, "unauthorized"), (403, "forbidden"), (status, None))


def owned(call: Callable, status: int, other: tuple[int, str | None], needs: str = "owner") -> Row:
    """A resource of an owner: to anyone else it is answered like a missing one."""
    return Row(call, needs, (401, "unauthorized"), other, (status, None))


def sid(w: World) -> str:
    return w.session["session_id"]


def sync(w: World, token: str | None, key: dict) -> tuple[int, str | None]:
    """A hello on the session's channel: (101, the answer frame's type or error code), or (403,
    the close reason) when the channel is refused before it opens."""
    try:
        with w.client.websocket_connect(f"/v1/sessions/{sid(w)}/sync", headers=key) as ws:
            reply = send(ws, type="hello", token=token or "", position=w.session["n_tokens"],
                         chain=frames.GENESIS, temperature=0.0, seed=0)
    except WebSocketDisconnect as e:
        return 403, e.reason
    return 101, reply["code"] if reply["type"] == "error" else reply["type"]


def http(method: str, url: Callable[[World], str], body: Callable[[World], dict] | None = None, **kw) -> Callable:
    def call(w: World, token: str | None, key: dict):
        return w.client.request(method, url(w), json=body(w) if body else None, headers={**key, **bearer(token)},
                                **kw)
    return call


def memory(path: str, body: dict | None = None, status: int = 200) -> Row:
    return owned(http("POST" if body is not None else "GET", lambda w: f"/v1/memories/{MINE}{path}",
                      (lambda w: body) if body else None), status, (404, "unknown_memory"))


ROUTES: dict[str, Row] = {
    "GET HEAD /": anyone(http("GET", lambda w: "/", follow_redirects=False), 307),
    "GET /favicon.ico": anyone(http("GET", lambda w: "/favicon.ico"), 204),
    "GET /healthz": anyone(http("GET", lambda w: "/healthz"), 200),
    "GET /metrics": anyone(http("GET", lambda w: "/metrics"), 200),
    "GET HEAD /openapi.json": anyone(http("GET", lambda w: "/openapi.json"), 200),
    "GET HEAD /docs": anyone(http("GET", lambda w: "/docs"), 200),
    "GET HEAD /docs/oauth2-redirect": anyone(http("GET", lambda w: "/docs/oauth2-redirect"), 200),
    "GET HEAD /redoc": anyone(http("GET", lambda w: "/redoc"), 200),
    "MOUNT /client/shaders": anyone(http("GET", lambda w: "/client/shaders/gemv.wgsl"), 200),
    "MOUNT /client": anyone(http("GET", lambda w: "/client/"), 200),
    "MOUNT /shaders": anyone(http("GET", lambda w: "/shaders/README.md"), 200),
    "GET /v1/models": anyone(http("GET", lambda w: "/v1/models"), 200),
    "GET /v1/models/{model_id}": anyone(
        http("GET", lambda w: "/v1/models/" + w.client.get("/v1/models", headers=w.key).json()["data"][0]["id"]), 200),
    "GET /v1/models/{model_key}/pack": anyone(
        http("GET", lambda w: w.client.get("/v1/models", headers=w.key).json()["models"][0]["pack_url"]), 200),
    "POST /v1/chat/completions": anyone(http("POST", lambda w: "/v1/chat/completions",
                                            lambda w: {"messages": USER, "max_tokens": 1}), 200),
    "POST /v1/sessions": anyone(http("POST", lambda w: "/v1/sessions", lambda w: {"messages": USER}), 201),
    "GET /v1/sessions/{session_id}/hologram": holder(
        http("GET", lambda w: f"/v1/sessions/{sid(w)}/hologram"), 200),
    "POST /v1/sessions/{session_id}/checkpoints": holder(
        http("POST", lambda w: f"/v1/sessions/{sid(w)}/checkpoints", lambda w: {"name": "mark"}), 201),
    "GET /v1/sessions/{session_id}/checkpoints": holder(
        http("GET", lambda w: f"/v1/sessions/{sid(w)}/checkpoints"), 200),
    "POST /v1/sessions/{session_id}/backtrack": holder(
        http("POST", lambda w: f"/v1/sessions/{sid(w)}/backtrack", lambda w: {"checkpoint": w.checkpoint}), 200),
    "POST /v1/sessions/{session_id}/fork": holder(
        http("POST", lambda w: f"/v1/sessions/{sid(w)}/fork", lambda w: {"checkpoint": w.checkpoint}), 201),
    "POST /v1/sessions/{session_id}/messages": holder(
        http("POST", lambda w: f"/v1/sessions/{sid(w)}/messages", lambda w: {"messages": TURN}), 200),
    "DELETE /v1/sessions/{session_id}": holder(http("DELETE", lambda w: f"/v1/sessions/{sid(w)}"), 204),
    "WS /v1/sessions/{session_id}/sync": Row(sync, "session", (101, "unauthorized"), (101, "forbidden"),
                                             (101, "ready")),
    # A capture of text needs no credential; one of a session's tokens needs the session's.
    "POST /v1/capture": holder(http("POST", lambda w: "/v1/capture", lambda w: {"session_id": sid(w)}), 200),
    "POST /v1/capture/store": holder(http("POST", lambda w: "/v1/capture/store", lambda w: {
        "session_id": sid(w), "collection": MINE, "state": "hook_resid_post", "layer": 0}), 200),
    # Collections of a session's states belong to its token: another session's token is another owner.
    "POST /v1/capture/search": owned(http("POST", lambda w: "/v1/capture/search", lambda w: {
        "collection": MINE, "vector": [0.5] * w.collection["dim"]}), 200, (404, "unknown_collection"), "session"),
    "GET /v1/capture/collections": owned(http("GET", lambda w: "/v1/capture/collections"), 200, (200, None),
                                         "session"),
    "DELETE /v1/capture/collections/{name}": owned(
        http("DELETE", lambda w: f"/v1/capture/collections/{w.collection['collection']}"), 204,
        (404, "unknown_collection"), "session"),
    "GET /v1/memories": owned(http("GET", lambda w: "/v1/memories"), 200, (200, None)),
    # Anyone may create a memory: without a token it gets one, with one it is that owner's.
    "POST /v1/memories": Row(http("POST", lambda w: "/v1/memories",
                                  lambda w: {"name": w.new_name(), **SMALL_MEMORY}),
                             "owner", (201, None), (201, None), (201, None)),
    "DELETE /v1/memories/{name}": owned(http("DELETE", lambda w: f"/v1/memories/{MINE}"), 204,
                                        (404, "unknown_memory")),
    "POST /v1/memories/{name}/learn": memory("/learn", {"text": TEXT}),
    "POST /v1/memories/{name}/query": memory("/query", {"text": TEXT}),
    "POST /v1/memories/{name}/generate": memory("/generate", {"text": TEXT, "n_tokens": 2}),
    "POST /v1/memories/{name}/dream": memory("/dream", {}),
    "GET /v1/memories/{name}/stats": memory("/stats"),
}
# What an anchor with API keys still answers without one: the page, so that it loads, and the health check.
OPEN_WITHOUT_KEY = {"GET HEAD /", "GET /favicon.ico", "GET /healthz", "MOUNT /client/shaders", "MOUNT /client",
                    "MOUNT /shaders"}


def route_keys(app) -> set[str]:
    keys = set()
    for r in iter_route_contexts(app.routes):
        kind = type(r.original_route if hasattr(r, "original_route") else r).__name__
        if "WebSocket" in kind:
            keys.add(f"WS {r.path}")
        elif kind == "Mount":
            keys.add(f"MOUNT {r.path}")
        else:
            keys.add(f"{' '.join(sorted(r.methods))} {r.path}")
    return keys


def roomy(**settings) -> Settings:
    """Room for every row's world in one app: each makes sessions and memories of its own, and requests."""
    return Settings(max_sessions=4096, max_live_sessions=4096, max_memories=4096, client_share=1, rate_per_ip=0,
                    rate_per_token=0, **settings)


@pytest.fixture(scope="module")
def apps(tiny_anchor, tmp_path_factory):
    """One app as it is by default and one with API keys; the rows' worlds share them."""
    made = {}
    for name, extra in (("plain", {}), ("keyed", {"api_keys": [KEY, SECOND_KEY]})):
        d = tmp_path_factory.mktemp(name)
        app = create_app(roomy(sessions_dir=str(d / "sessions"), memories_dir=str(d / "memories"), **extra),
                         tiny_anchor)
        made[name] = app_client(app).__enter__()
    yield made
    for c in made.values():
        c.__exit__(None, None, None)


def credential(w: World, row: Row, who: str) -> str | None:
    """No token, another's, or the right one: an owner token where the row needs one, else a session's."""
    if who == "none":
        return None
    if row.needs == "owner":
        return w.owner if who == "right" else w.their_owner
    return w.session["token"] if who == "right" else w.their_session["token"]


def test_every_route_has_a_row(apps):
    for client in apps.values():
        assert route_keys(client.app) == set(ROUTES)


@pytest.mark.parametrize("route", ROUTES)
def test_who_may_call_what(apps, route):
    row = ROUTES[route]
    for who in ("none", "other", "right"):
        w = World(apps["plain"], {})
        r = row.call(w, credential(w, row, who), {})
        got = r if isinstance(r, tuple) else outcome(r)
        assert got == getattr(row, who), (who, got, getattr(r, "text", ""))
        if who == "other" and row.needs != "open" and got[0] < 300 and not isinstance(r, tuple):
            assert MINE not in r.text  # what another may see of the user's: nothing


@pytest.mark.parametrize("route", ROUTES)
def test_api_keys_guard_every_route(apps, route):
    row = ROUTES[route]
    for key, refusal in (({}, "api_key_required"), ({"X-API-Key": WRONG_KEY}, "bad_api_key"),
                         ({"X-API-Key": KEY}, None), ({"X-API-Key": SECOND_KEY}, None)):
        w = World(apps["keyed"], {"X-API-Key": KEY})
        r = row.call(w, credential(w, row, "right"), key)
        got = r if isinstance(r, tuple) else outcome(r)
        if refusal is None or route in OPEN_WITHOUT_KEY:
            assert got == row.right, (key, got)
        elif row.call is sync:
            assert got == (403, refusal)  # refused before it opens
        else:
            assert got == (401, refusal), (key, got)
            assert r.headers["www-authenticate"].startswith("ApiKey ")


def test_a_page_sends_its_websocket_key_as_a_subprotocol(apps):
    w = World(apps["keyed"], {"X-API-Key": KEY})
    url = f"/v1/sessions/{sid(w)}/sync"
    with w.client.websocket_connect(url, subprotocols=["hpi", API_KEY_PROTOCOL + KEY]) as ws:
        assert ws.accepted_subprotocol == "hpi"  # a browser needs one it offered, and never the key back
        reply = send(ws, type="hello", token=w.session["token"], position=w.session["n_tokens"],
                     chain=frames.GENESIS, temperature=0.0, seed=0)
        assert reply["type"] == "ready"
    with pytest.raises(WebSocketDisconnect) as e, \
            w.client.websocket_connect(url, subprotocols=["hpi", API_KEY_PROTOCOL + WRONG_KEY]):
        pass
    assert e.value.reason == "bad_api_key"


@pytest.mark.parametrize("offered", [["hpi"], ["hpi", API_KEY_PROTOCOL + KEY]])
def test_an_anchor_without_keys_accepts_the_channel_protocol_a_page_offers(apps, offered):
    w = World(apps["plain"], {})
    with w.client.websocket_connect(f"/v1/sessions/{sid(w)}/sync", subprotocols=offered) as ws:
        assert ws.accepted_subprotocol == frames.SUBPROTOCOL  # else a browser fails the handshake
        reply = send(ws, type="hello", token=w.session["token"], position=w.session["n_tokens"],
                     chain=frames.GENESIS, temperature=0.0, seed=0)
        assert reply["type"] == "ready"


def test_cross_origin_pages_reach_a_keyed_anchor(tiny_anchor, make_client):
    client = make_client(api_keys=[KEY], allowed_origins=["https://app.example"])
    origin = {"Origin": "https://app.example"}
    preflight = client.options("/v1/sessions", headers={**origin, "Access-Control-Request-Method": "POST",
                                                        "Access-Control-Request-Headers": "x-api-key,content-type"})
    assert preflight.status_code == 200 and "x-api-key" in preflight.headers["access-control-allow-headers"].lower()
    refused = client.post("/v1/sessions", json={"messages": USER}, headers=origin)
    assert_error(refused, 401, "api_key_required")
    assert refused.headers["access-control-allow-origin"] == "https://app.example"  # the page can read why
    assert client.post("/v1/sessions", json={"messages": USER}, headers={**origin, "X-API-Key": KEY}).status_code == 201


def test_key_guesses_count_against_their_clients_rate(make_client):
    client = make_client(api_keys=[KEY], rate_per_ip=2)
    for _ in range(2):
        assert_error(client.get("/v1/models", headers={"X-API-Key": WRONG_KEY}), 401, "bad_api_key")
    assert_error(client.get("/v1/models", headers={"X-API-Key": KEY}), 429, "rate_limited")


def test_api_keys_come_from_the_environment_as_a_json_list(monkeypatch):
    monkeypatch.setenv("HPI_API_KEYS", json.dumps([KEY, SECOND_KEY]))
    assert Settings().api_keys == [KEY, SECOND_KEY]
    for bad in (["short"], ["has/slash-and=equals"], [""]):  # too guessable, or not offerable as a subprotocol
        with pytest.raises(pydantic.ValidationError):
            Settings(api_keys=bad)


# Limits: server/limits.py, the README's table, and a probe one past each


def test_the_readme_table_is_the_limits_table():
    assert limits.in_readme(limits.README.read_text()) == limits.table(), "run `python -m hpi.limits`"


@dataclass
class Probe:
    limit: limits.Limit
    make_client: Callable
    anchor: object
    monkeypatch: pytest.MonkeyPatch

    def refused(self, r) -> None:
        assert_error(r, self.limit.status, self.limit.code)

    def n_user(self) -> int:
        return len(self.anchor.lm.chat_ids(USER))


def client_from(client, host: str):
    return app_client(client.app, client=(host, 5000))


def create_session(client) -> dict:
    r = client.post("/v1/sessions", json={"messages": USER})
    assert r.status_code == 201, r.text
    return r.json()


def probe_body_bytes(p: Probe):
    client = p.make_client(max_body_bytes=100)
    head, json_type = b'{"messages": []}', {"Content-Type": "application/json"}
    at = client.post("/v1/sessions", content=head + b" " * (100 - len(head)), headers=json_type)
    assert_error(at, 422, "invalid_request")  # read and validated
    p.refused(client.post("/v1/sessions", content=head + b" " * (101 - len(head)), headers=json_type))


def probe_messages(p: Probe):
    client = p.make_client(max_messages=3)
    assert client.post("/v1/sessions", json={"messages": USER + TURN}).status_code == 201
    p.refused(client.post("/v1/sessions", json={"messages": USER + TURN + USER}))


def probe_message_chars(p: Probe):
    client = p.make_client(max_message_chars=10)
    assert client.post("/v1/sessions", json={"messages": [{"role": "user", "content": "x" * 10}]}).status_code == 201
    p.refused(client.post("/v1/sessions", json={"messages": [{"role": "user", "content": "x" * 11}]}))


def probe_prompt_tokens(p: Probe):
    n = p.n_user()
    assert p.make_client(max_prompt_tokens=n).post("/v1/sessions", json={"messages": USER}).status_code == 201
    client = p.make_client(max_prompt_tokens=n - 1)
    p.refused(client.post("/v1/sessions", json={"messages": USER}))
    p.refused(client.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 1}))


def probe_new_tokens(p: Probe):
    client = p.make_client(max_new_tokens=2)
    assert client.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 2}).status_code == 200
    p.refused(client.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 3}))
    auth = bearer(client.post("/v1/memories", json={"name": MINE, **SMALL_MEMORY}).json()["owner_token"])
    client.post(f"/v1/memories/{MINE}/learn", json={"text": TEXT}, headers=auth)
    assert client.post(f"/v1/memories/{MINE}/generate", json={"text": TEXT, "n_tokens": 2},
                       headers=auth).status_code == 200
    p.refused(client.post(f"/v1/memories/{MINE}/generate", json={"text": TEXT, "n_tokens": 3}, headers=auth))


def probe_choices(p: Probe):
    client, body = p.make_client(), {"messages": USER, "max_tokens": 1}
    assert client.post("/v1/chat/completions", json={**body, "n": p.limit.value}).status_code == 200
    p.refused(client.post("/v1/chat/completions", json={**body, "n": p.limit.value + 1}))


def probe_rate_per_ip(p: Probe):
    client = p.make_client(rate_per_ip=3, rate_per_token=0)
    for _ in range(3):
        assert client.get("/v1/models").status_code == 200
    p.refused(client.get("/v1/models"))


def probe_rate_per_token(p: Probe):
    client = p.make_client(rate_per_ip=0, rate_per_token=3)
    for _ in range(3):
        assert client.get("/v1/models", headers=bearer("some-token")).status_code == 200
    p.refused(client.get("/v1/models", headers=bearer("some-token")))


def probe_queued_rows(p: Probe):
    sched = p.anchor.lm.scheduler
    p.monkeypatch.setattr(sched, "max_queued_rows", sched.max_queued_rows)  # the anchor is shared: restored after
    client = p.make_client(max_queued_rows=4)
    assert sched.max_queued_rows == 4
    waiting = [SimpleNamespace(rows=3)]
    p.monkeypatch.setattr(sched, "_pending", waiting)  # rows waiting for a forward (none runs: nothing notifies)
    sched.check_room()
    waiting[0].rows = 4
    p.refused(client.post("/v1/sessions", json={"messages": USER}))


def probe_sessions(p: Probe):
    client = p.make_client(max_sessions=2, client_share=1)
    for _ in range(2):
        create_session(client)
    p.refused(client.post("/v1/sessions", json={"messages": USER}))


def probe_client_share(p: Probe):
    client = p.make_client(max_sessions=4, client_share=0.5)
    for _ in range(2):
        create_session(client)
    p.refused(client.post("/v1/sessions", json={"messages": USER}))
    create_session(client_from(client, "10.0.0.2"))  # another client has its own share


def probe_live_sessions(p: Probe):
    client = p.make_client(max_live_sessions=2, client_share=0.5)
    for host in ("10.0.0.2", "10.0.0.3"):
        create_session(client_from(client, host))
    p.refused(client_from(client, "10.0.0.4").post("/v1/sessions", json={"messages": USER}))


def probe_kv_bytes(p: Probe):
    client = p.make_client(max_kv_bytes=p.n_user() * p.anchor.kv_bytes_per_token(), client_share=1)
    create_session(client)
    p.refused(client.post("/v1/sessions", json={"messages": USER}))


def probe_session_tokens(p: Probe):
    n = p.n_user()
    client = p.make_client(max_session_tokens=n)
    body = create_session(client)
    p.refused(client.post(f"/v1/sessions/{body['session_id']}/messages", json={"messages": TURN},
                          headers=bearer(body["token"])))
    p.refused(p.make_client(max_session_tokens=n - 1).post("/v1/sessions", json={"messages": USER}))


def probe_checkpoints(p: Probe):
    client = p.make_client()
    body = create_session(client)
    url, auth = f"/v1/sessions/{body['session_id']}/checkpoints", bearer(body["token"])
    for i in range(p.limit.value):
        assert client.post(url, json={"name": f"c{i}"}, headers=auth).status_code == 201
    p.refused(client.post(url, json={"name": "one-more"}, headers=auth))


def probe_idle(p: Probe):
    client = p.make_client(session_idle_s=60)
    create_session(client)
    st = client.app.state.store
    assert st.sweep(time.time() + 59) == (0, 0)
    assert st.sweep(time.time() + 61) == (1, 0) and len(st) == 0


def probe_ttl(p: Probe):
    client = p.make_client(session_ttl_s=3600)
    body = create_session(client)
    st = client.app.state.store
    assert st.sweep(time.time() + 3599)[1] == 0  # (its caches go: it has been idle)
    assert st.sweep(time.time() + 3601)[1] == 1
    p.refused(client.get(body["hologram_url"], headers=bearer(body["token"])))


@contextmanager
def channel(client) -> Iterator[tuple[object, dict]]:
    """An open channel of a new session, past its hello, and the session."""
    body = create_session(client)
    with client.websocket_connect(f"/v1/sessions/{body['session_id']}/sync") as ws:
        assert send(ws, type="hello", token=body["token"], position=body["n_tokens"], chain=frames.GENESIS,
                    temperature=0.0, seed=0)["type"] == "ready"
        yield ws, body


def probe_frame_bytes(p: Probe):
    size_error = f"the limit is {frames.MAX_FRAME_BYTES}"
    with channel(p.make_client()) as (ws, _):
        for n in (p.limit.value, p.limit.value + 1):
            ws.send_bytes(b"\x00" * n)
            e = msgpack.unpackb(ws.receive_bytes())
            assert e["code"] == p.limit.code and (size_error in e["message"]) == (n > p.limit.value), e
    assert serving.server_options()["ws_max_size"] == p.limit.value  # uvicorn closes (1009) before reading more


def probe_draft(p: Probe):
    with channel(p.make_client()) as (ws, body):
        for n in (p.limit.value, p.limit.value + 1):
            reply = send(ws, type="draft", position=body["n_tokens"], chain=frames.GENESIS, tokens=[0] * n)
            assert (reply.get("code") == p.limit.code) == (n > p.limit.value), reply


class FakeTransport:
    def __init__(self):
        self.unread, self.aborted = 0, False

    def get_write_buffer_size(self) -> int:
        return self.unread

    def abort(self):
        self.aborted = True


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def time(self) -> float:
        return self.now


def guarded() -> serving.GuardedWebSocket:
    """The websocket protocol's control-frame guard without a connection: a clock that stands still
    unless moved, and a transport whose unread bytes the probe sets."""
    ws = object.__new__(serving.GuardedWebSocket)
    ws.loop, ws.transport = FakeClock(), FakeTransport()
    ws._allowance, ws._counted_at, ws._dropped = serving.CONTROL_BURST, 0.0, False
    ws.client, ws.logger = ("10.0.0.2", 5000), logging.getLogger(__name__)
    return ws


def probe_control_burst(p: Probe):
    assert serving.server_options()["ws"] is serving.GuardedWebSocket
    ws = guarded()
    assert all(ws._control_frame_ok() for _ in range(int(p.limit.value)))
    assert not ws._control_frame_ok() and ws.transport.aborted


def probe_control_rate(p: Probe):
    ws = guarded()
    assert all(ws._control_frame_ok() for _ in range(int(serving.CONTROL_BURST)))
    ws.loop.now += 1.0
    assert all(ws._control_frame_ok() for _ in range(int(p.limit.value)))
    assert not ws._control_frame_ok() and ws.transport.aborted


def probe_backlog(p: Probe):
    ws = guarded()
    ws.transport.unread = p.limit.value
    assert ws._control_frame_ok()
    ws.transport.unread = p.limit.value + 1
    assert not ws._control_frame_ok() and ws.transport.aborted


def probe_completion_seconds(p: Probe):
    client = p.make_client(max_completion_seconds=1e-6)
    body = client.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 8}).json()
    assert body["usage"]["completion_tokens"] == 1 and body["choices"][0]["finish_reason"] == "length"


def completions_in_line(p: Probe) -> tuple[bool, list, object]:
    """With one completion decoding and one place to wait: whether a second waited for its turn,
    the two's answers, and a third's answer."""
    client = p.make_client(max_completions=1, max_waiting_completions=1)
    started, release = threading.Semaphore(0), threading.Event()

    def decode_steps(*args, **kwargs):
        started.release()
        release.wait(30)
        yield from ()

    p.monkeypatch.setattr(completions, "decode_steps", decode_steps)
    answers = []

    def post():
        answers.append(client.post("/v1/chat/completions", json={"messages": USER}))

    first = threading.Thread(target=post)
    first.start()
    assert started.acquire(timeout=10)
    second = threading.Thread(target=post)
    second.start()
    waited = not started.acquire(timeout=0.5)  # the second waits for a turn
    third = client.post("/v1/chat/completions", json={"messages": USER})
    release.set()
    first.join()
    second.join()
    return waited, answers, third


def probe_completions(p: Probe):
    waited, answers, _ = completions_in_line(p)
    assert waited and [a.status_code for a in answers] == [200, 200]


def probe_waiting_completions(p: Probe):
    _, answers, third = completions_in_line(p)
    p.refused(third)
    assert int(third.headers["retry-after"]) > 0 and [a.status_code for a in answers] == [200, 200]


def probe_capture_tokens(p: Probe):
    n = len(p.anchor.lm.tokenizer(TEXT)["input_ids"])
    assert p.make_client(capture_max_tokens=n).post("/v1/capture", json={"text": TEXT}).status_code == 200
    p.refused(p.make_client(capture_max_tokens=n - 1).post("/v1/capture", json={"text": TEXT}))


def probe_capture_bytes(p: Probe):
    need = p.make_client().post("/v1/capture", json={"text": TEXT}).json()["estimate_bytes"]
    assert p.make_client(capture_max_bytes=need).post("/v1/capture", json={"text": TEXT}).status_code == 200
    p.refused(p.make_client(capture_max_bytes=need - 1).post("/v1/capture", json={"text": TEXT}))


def probe_captures_at_once(p: Probe):
    made, admission = [], capture_api.Admission
    p.monkeypatch.setattr(capture_api, "Admission", lambda *a: made.append(a) or admission(*a))
    p.make_client()
    assert made[0][1] == p.limit.value  # the capture routes admit by it
    line = admission(1 << 20, p.limit.value, 0.0)
    held = [line.admit(1) for _ in range(p.limit.value)]
    for h in held:
        h.__enter__()
    with pytest.raises(CaptureBusy) as e:
        line.admit(1).__enter__()
    assert (e.value.status, e.value.code) == (p.limit.status, p.limit.code)

STORE = {"text": TEXT, "collection": MINE, "state": "hook_resid_post", "layer": 0}


def store_bytes(p: Probe) -> int:
    """The bytes one stored (mean-pooled) state vector takes."""
    return p.make_client().post("/v1/capture/store", json=STORE).json()["bytes"]


def probe_store_bytes(p: Probe):
    b = store_bytes(p)
    client = p.make_client(capture_store_bytes=4 * b)  # each owner and client may hold b
    for i in range(4):
        assert client_from(client, f"10.0.0.{i + 2}").post("/v1/capture/store", json=STORE).status_code == 200
    p.refused(client_from(client, "10.0.0.9").post("/v1/capture/store", json=STORE))


def probe_owner_share(p: Probe):
    b = store_bytes(p)
    client = p.make_client(capture_store_bytes=p.limit.value * b)
    first = client.post("/v1/capture/store", json=STORE)
    assert first.status_code == 200 and first.json()["bytes"] == b
    p.refused(client.post("/v1/capture/store", json=STORE, headers=bearer(first.json()["owner_token"])))


def new_memory(client, name: str, auth: dict | None = None, **config):
    return client.post("/v1/memories", json={"name": name, **SMALL_MEMORY, **config}, headers=auth)


def probe_memories(p: Probe):
    client = p.make_client(max_memories=2, client_share=0.5)  # a client may hold one
    for host in ("10.0.0.2", "10.0.0.3"):
        assert new_memory(client_from(client, host), MINE).status_code == 201
    p.refused(new_memory(client_from(client, "10.0.0.4"), MINE))


def probe_per_owner(p: Probe):
    client = p.make_client(client_share=1)
    auth = bearer(new_memory(client, "m0").json()["owner_token"])
    for i in range(1, p.limit.value):
        assert new_memory(client, f"m{i}", auth).status_code == 201
    p.refused(new_memory(client, "one-more", auth))


def probe_memory_bytes(p: Probe):
    def nbytes(satellites: int) -> int:
        return budget.nbytes(Config(vocab=1024, context=2, dim=16, satellites=satellites), 0)

    over = next(s for s in itertools.count(p.limit.value // nbytes(1)) if nbytes(s) > p.limit.value)
    assert nbytes(over - 1) <= p.limit.value  # the largest allowed: made, it would take the limit's bytes
    p.refused(new_memory(p.make_client(), "big", vocab=1024, dim=16, satellites=over))


def probe_total_bytes(p: Probe):
    one = budget.nbytes(Config(vocab=len(p.anchor.lm.tokenizer), **SMALL_MEMORY), 0)
    p.monkeypatch.setattr(budget, "MAX_TOTAL_BYTES", 2 * one)  # the registry reads it when it is made
    client = p.make_client(client_share=1)
    auth = bearer(new_memory(client, "a").json()["owner_token"])
    assert new_memory(client, "b", auth).status_code == 201
    p.refused(new_memory(client, "c", auth))


def probe_learn_tokens(p: Probe):
    client = p.make_client(max_learn_tokens=5)
    auth = bearer(new_memory(client, MINE).json()["owner_token"])
    assert client.post(f"/v1/memories/{MINE}/learn", json={"tokens": [1] * 5}, headers=auth).status_code == 200
    p.refused(client.post(f"/v1/memories/{MINE}/learn", json={"tokens": [1] * 6}, headers=auth))


PROBES: dict[str, Callable[[Probe], None]] = {
    "max_body_bytes": probe_body_bytes,
    "max_messages": probe_messages,
    "max_message_chars": probe_message_chars,
    "max_prompt_tokens": probe_prompt_tokens,
    "max_new_tokens": probe_new_tokens,
    "MAX_CHOICES": probe_choices,
    "rate_per_ip": probe_rate_per_ip,
    "rate_per_token": probe_rate_per_token,
    "max_sessions": probe_sessions,
    "client_share": probe_client_share,
    "max_live_sessions": probe_live_sessions,
    "max_kv_bytes": probe_kv_bytes,
    "max_session_tokens": probe_session_tokens,
    "MAX_CHECKPOINTS": probe_checkpoints,
    "session_idle_s": probe_idle,
    "session_ttl_s": probe_ttl,
    "MAX_FRAME_BYTES": probe_frame_bytes,
    "MAX_DRAFT": probe_draft,
    "CONTROL_RATE": probe_control_rate,
    "CONTROL_BURST": probe_control_burst,
    "MAX_BACKLOG": probe_backlog,
    "max_queued_rows": probe_queued_rows,
    "max_completion_seconds": probe_completion_seconds,
    "max_completions": probe_completions,
    "max_waiting_completions": probe_waiting_completions,
    "capture_max_tokens": probe_capture_tokens,
    "capture_max_bytes": probe_capture_bytes,
    "CAPTURES_AT_ONCE": probe_captures_at_once,
    "capture_store_bytes": probe_store_bytes,
    "OWNER_SHARE": probe_owner_share,
    "max_memories": probe_memories,
    "MAX_PER_OWNER": probe_per_owner,
    "MAX_MEMORY_BYTES": probe_memory_bytes,
    "MAX_TOTAL_BYTES": probe_total_bytes,
    "max_learn_tokens": probe_learn_tokens,
}


def test_every_limit_has_a_probe():
    assert [m.name for m in limits.LIMITS] == list(PROBES)


@pytest.mark.parametrize("limit", limits.LIMITS, ids=lambda m: m.name)
def test_one_past_each_limit(limit, make_client, tiny_anchor, monkeypatch):
    PROBES[limit.name](Probe(limit, make_client, tiny_anchor, monkeypatch))
