"""What one anonymous client can do to the others: quotas, token limits, idle eviction and expiry,
work that outlives its client, slow work in front of the health check, the websocket's limits,
internal errors, and where requests may come from (issue 11's regression tests)."""

from __future__ import annotations

import base64
import os
import socket
import threading
import time

import httpx
import pytest
import websockets.sync.client as ws_client
from websockets.exceptions import ConnectionClosed, InvalidStatus

from hpi.protocol import frames
from hpi import completions
from hpi.app import create_app
from hpi.config import Settings
from hpi.metrics import METRICS
from tests.app_client import app_client
from hpi.headless import serve
from tests.http_errors import assert_error
from tests.syncing import create, send, sync_answer

USER = [{"role": "user", "content": "What does the anchor keep?"}]


def hello(ws, body: dict, position: int, chain: bytes = frames.GENESIS) -> dict:
    return send(ws, type="hello", token=body["token"], position=position, chain=chain, temperature=0.0, seed=0)


def other_client(client, host: str = "10.0.0.2"):
    """A client of the same running app from another address."""
    return app_client(client.app, client=(host, 5000))


# Sessions: quotas, token limits, eviction, expiry


def test_one_client_cannot_hold_every_session(make_client):
    client = make_client(max_sessions=8, client_share=0.25)
    for _ in range(2):
        create(client, USER)
    assert_error(client.post("/v1/sessions", json={"messages": USER}), 429, "client_quota")
    create(other_client(client), USER)  # another client is not locked out


def test_one_client_cannot_hold_every_live_session(make_client, tiny):
    client = make_client(max_live_sessions=4, client_share=0.5)
    st = client.app.state.store
    first, auth = create(client, USER)
    for _ in range(2):
        create(client, USER)  # the third evicts the client's least recently used: it stays at its share
    assert len(st) == 2 and st.get(first["session_id"], first["token"]).caches.anchor is None
    for _ in range(2):
        create(other_client(client), USER)  # the other client gets its share
    assert len(st) == 4
    r = client.get(first["hologram_url"], headers=auth)  # rebuilt on use, evicting another of its own
    assert r.status_code == 200 and len(st) == 4


def test_one_client_cannot_hold_every_kv_byte(make_client, tiny_anchor):
    n = len(tiny_anchor.lm.chat_ids(USER))
    client = make_client(max_kv_bytes=4 * n * tiny_anchor.kv_bytes_per_token(), client_share=0.5)
    for _ in range(2):
        create(client, USER)
    assert_error(client.post("/v1/sessions", json={"messages": USER}), 429, "client_quota")
    create(other_client(client), USER)


def test_drafts_count_against_the_session_token_limit(make_client, tiny):
    prompt = tiny.chat_ids(USER)
    truth = list(completions.decode(tiny, prompt, 12))
    client = make_client(max_session_tokens=len(prompt) + 6)
    body, _ = create(client, USER)
    with client.websocket_connect(f"/v1/sessions/{body['session_id']}/sync") as ws:
        hello(ws, body, len(prompt))
        e = send(ws, type="draft", position=len(prompt), chain=frames.GENESIS, tokens=truth[:8])
        assert e["type"] == "error" and e["code"] == "session_full", e
        v = send(ws, type="draft", position=len(prompt), chain=frames.GENESIS, tokens=truth[:3])
        assert v["type"] == "ack" and v["position"] == len(prompt) + 4
    session = client.app.state.store.get(body["session_id"], body["token"])
    assert session.n_tokens == len(prompt) + 4
    create(other_client(client), USER)


def test_a_token_id_past_the_vocabulary_is_a_bad_frame(client, tiny):
    prompt = tiny.chat_ids(USER)
    body, _ = create(client, USER)
    with client.websocket_connect(f"/v1/sessions/{body['session_id']}/sync") as ws:
        hello(ws, body, len(prompt))
        e = send(ws, type="draft", position=len(prompt), chain=frames.GENESIS, tokens=[tiny.config.vocab_size])
        assert e["type"] == "error" and e["code"] == "bad_frame", e


def test_idle_sessions_lose_their_caches_and_continue_exactly(make_client, tiny):
    prompt = tiny.chat_ids(USER)
    truth = list(completions.decode(tiny, prompt, 16))
    client = make_client(session_idle_s=60)
    st = client.app.state.store
    body, _ = create(client, USER)
    with client.websocket_connect(f"/v1/sessions/{body['session_id']}/sync") as ws:
        hello(ws, body, len(prompt))
        confirmed, position, chain, _ = sync_answer(ws, len(prompt), frames.GENESIS, truth[:6], tiny.config.vocab_size)
    assert st.sweep(time.time() + 1) == (0, 0)  # not idle long enough
    assert st.sweep(time.time() + 61) == (1, 0)
    assert len(st) == 0 and st.kv_bytes == 0
    with client.websocket_connect(f"/v1/sessions/{body['session_id']}/sync") as ws:
        assert hello(ws, body, position, chain)["refresh"] is False
        confirmed, *_ = sync_answer(ws, position, chain, truth, tiny.config.vocab_size, confirmed)
    assert confirmed == truth


def test_unused_sessions_expire_with_their_transcripts(make_client, tmp_path):
    client = make_client(session_ttl_s=3600)
    body, auth = create(client, USER)
    transcripts = list((tmp_path / "sessions-0").glob("*.json"))
    assert len(transcripts) == 1
    assert client.app.state.store.sweep(time.time() + 3601) == (0, 1)
    assert_error(client.get(body["hologram_url"], headers=auth), 404, "session_not_found")
    assert not transcripts[0].exists()


def test_a_ttl_shorter_than_the_idle_time_still_expires_sessions(make_client):
    client = make_client(session_ttl_s=30, session_idle_s=600)
    body, auth = create(client, USER)
    assert client.app.state.store.sweep(time.time() + 31) == (0, 1)
    assert_error(client.get(body["hologram_url"], headers=auth), 404, "session_not_found")


def test_restored_sessions_count_against_the_limits(tiny_anchor, tmp_path):
    settings = {"sessions_dir": str(tmp_path), "max_sessions": 8, "client_share": 0.25}
    with app_client(create_app(Settings(**settings), tiny_anchor)) as before:
        for _ in range(2):
            create(before, USER)
    with app_client(create_app(Settings(**settings), tiny_anchor)) as after:
        assert len(after.app.state.store) == 0  # nothing rebuilt yet
        assert_error(after.post("/v1/sessions", json={"messages": USER}), 429, "client_quota")
    with app_client(create_app(Settings(**{**settings, "max_sessions": 2, "client_share": 1}), tiny_anchor)) as c:
        assert_error(c.post("/v1/sessions", json={"messages": USER}), 503, "too_many_sessions")


# Model work: health never waits, work of a gone client stops, bounded time and line


@pytest.fixture
def live(tiny_anchor, tmp_path):
    """Start the real app over uvicorn on loopback with some settings: (base URL, app)."""
    stack = []

    def start(app=None, **settings):
        app = app or create_app(Settings(sessions_dir=str(tmp_path / "sessions"), **settings), tiny_anchor)
        ctx = serve(app)
        stack.append(ctx)
        return ctx.__enter__(), app

    yield start
    for ctx in reversed(stack):
        ctx.__exit__(None, None, None)


def test_health_answers_while_every_worker_thread_is_busy(live, tiny_anchor, tmp_path):
    app = create_app(Settings(sessions_dir=str(tmp_path / "s")), tiny_anchor)
    release = threading.Event()

    @app.get("/slow")
    def slow():  # holds a worker thread, as a long forward pass does
        release.wait(30)
        return {}

    url, _ = live(app)
    busy = [threading.Thread(target=httpx.get, args=(url + "/slow",), kwargs={"timeout": 60}) for _ in range(48)]
    for t in busy:
        t.start()
    time.sleep(1.0)
    try:
        t0 = time.monotonic()
        assert httpx.get(url + "/healthz", timeout=10).status_code == 200
        assert httpx.get(url + "/metrics", timeout=10).status_code == 200
        assert time.monotonic() - t0 < 2.0
    finally:
        release.set()
        for t in busy:
            t.join()


def decoded() -> int:
    return METRICS.get("hpi_tokens_decoded_total")


def test_a_completion_stops_when_its_client_goes_away(live):
    url, _ = live()
    before = decoded()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + "/v1/chat/completions", json={"messages": USER, "max_tokens": 1024}, timeout=1.0)
    time.sleep(1.0)
    stopped = decoded()
    assert stopped > before  # it was decoding
    time.sleep(1.5)
    assert decoded() == stopped


def test_a_completion_decodes_for_at_most_its_time_limit(live):
    url, _ = live(max_completion_seconds=0.3)
    t0 = time.monotonic()
    r = httpx.post(url + "/v1/chat/completions", json={"messages": USER, "max_tokens": 1024}, timeout=60)
    assert r.status_code == 200 and time.monotonic() - t0 < 5
    body = r.json()
    assert body["choices"][0]["finish_reason"] == "length" and 0 < body["usage"]["completion_tokens"] < 1024


def test_a_full_line_of_completions_is_503_with_retry_after(live):
    url, _ = live(max_completions=1, max_waiting_completions=0)
    first = threading.Thread(target=httpx.post, args=(url + "/v1/chat/completions",),
                             kwargs={"json": {"messages": USER, "max_tokens": 1024}, "timeout": 60})
    first.start()
    time.sleep(0.5)
    r = httpx.post(url + "/v1/chat/completions", json={"messages": USER, "max_tokens": 4}, timeout=60)
    first.join()
    assert_error(r, 503, "server_busy")
    assert int(r.headers["retry-after"]) > 0
    assert httpx.post(url + "/v1/chat/completions", json={"messages": USER, "max_tokens": 4}).status_code == 200


# The websocket


def ws_url(url: str, session_id: str) -> str:
    return url.replace("http://", "ws://") + f"/v1/sessions/{session_id}/sync"


def test_a_websocket_of_no_session_is_refused_before_it_opens(live):
    url, _ = live()
    with pytest.raises(InvalidStatus) as e:
        ws_client.connect(ws_url(url, "nosuchsession"))
    assert e.value.response.status_code == 403


def test_a_message_over_the_protocol_limit_closes_the_connection(live):
    url, _ = live()
    body = httpx.post(url + "/v1/sessions", json={"messages": USER}).json()
    with ws_client.connect(ws_url(url, body["session_id"]), max_size=None) as ws:
        ws.send(b"\x00" * (frames.MAX_FRAME_BYTES + 1))
        with pytest.raises(ConnectionClosed) as e:
            ws.recv(timeout=10)
    assert e.value.rcvd is not None and e.value.rcvd.code == 1009  # message too big


def raw_websocket(url: str, path: str) -> socket.socket:
    """A websocket opened by hand, so the test can send frames and never read what comes back."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall((f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


def test_a_ping_flood_that_never_reads_is_dropped(live):
    url, _ = live()
    body = httpx.post(url + "/v1/sessions", json={"messages": USER}).json()
    sock = raw_websocket(url, f"/v1/sessions/{body['session_id']}/sync")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    payload = b"p" * 125
    ping = bytes([0x89, 0x80 | len(payload)]) + b"\x00\x00\x00\x00" + payload  # masked with zeros
    sent = 0
    with pytest.raises(OSError):
        for _ in range(200_000):
            sock.sendall(ping)
            sent += 1
    sock.close()
    assert sent < 20_000  # dropped long before 2 M pings; the server wrote at most its backlog of pongs
    assert httpx.get(url + "/healthz").status_code == 200


# Errors


def test_an_internal_error_is_json_without_its_text_and_the_connection_stays(live, tiny_anchor, tmp_path):
    app = create_app(Settings(sessions_dir=str(tmp_path / "s")), tiny_anchor)

    @app.get("/boom")
    def boom():
        raise RuntimeError("secret internal detail")

    url, _ = live(app)
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        replies = []
        for path in ("/boom", "/healthz"):
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
            replies.append(read_response(sock))
    (status, text), (status2, _) = replies
    assert status == 500 and '"code":"internal_error"' in text and "secret" not in text and "RuntimeError" not in text
    assert status2 == 200  # the same keep-alive connection answers the next request


def read_response(sock: socket.socket) -> tuple[int, str]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        assert chunk, "the connection was closed"
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
    while len(rest) < length:
        rest += sock.recv(4096)
    return int(head.split()[1]), rest.decode()


# Hosts and origins


def test_untrusted_host_names_are_refused(client):
    assert_error(client.get("/healthz", headers={"Host": "rebound.example"}), 421, "untrusted_host")
    assert client.get("/healthz", headers={"Host": "127.0.0.1:8000"}).status_code == 200


def test_requests_from_other_origins_are_refused_unless_allowed(make_client):
    client = make_client()
    evil = {"Origin": "http://evil.example"}
    assert_error(client.post("/v1/sessions", json={"messages": USER}, headers=evil), 403, "origin_not_allowed")
    assert_error(client.get("/v1/capture/collections", headers=evil), 403, "origin_not_allowed")
    assert client.post("/v1/sessions", json={"messages": USER}, headers={"Origin": "http://localhost"}).status_code == 201
    with pytest.raises(Exception):
        with client.websocket_connect("/v1/sessions/x/sync", headers=evil):
            pass
    allowed = make_client(allowed_origins=["https://app.example"])
    r = allowed.post("/v1/sessions", json={"messages": USER}, headers={"Origin": "https://app.example"})
    assert r.status_code == 201 and r.headers["access-control-allow-origin"] == "https://app.example"


def test_metrics_and_docs_can_be_private(make_client):
    client = make_client(private_metrics=True, private_docs=True)
    outside = other_client(client, "203.0.113.9")
    for path in ("/metrics", "/docs", "/openapi.json"):
        assert_error(outside.get(path), 404, "not_found")
        assert other_client(client, "127.0.0.1").get(path).status_code == 200
    assert outside.get("/healthz").status_code == 200


def test_the_page_learns_why_its_channel_was_refused(page):
    """A browser cannot read the status of a refused websocket: the page asks the session's endpoint."""
    code = page.evaluate("""async () => {
        const { SyncChannel } = await import('/client/sync.js');
        try { await SyncChannel.open('nosuchsession', 'x', { position: 1 }); return 'opened'; }
        catch (e) { return `${e.name}: ${e.anchorCode ?? e.message}`; }
    }""")
    assert code == "SessionExpired: session_not_found"
