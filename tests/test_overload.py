"""Under overload the anchor refuses at once instead of making everyone wait: rates per client
and per token (429), a bounded queue of model work (503), both with Retry-After, and both
counted across anchors that share a Redis."""

from __future__ import annotations

import threading
import time

from hpi.app import create_app
from hpi.config import Settings
from tests.app_client import app_client
from tests.http_errors import assert_error
from tests.services import redis_server
from tests.syncing import create, send

USER = [{"role": "user", "content": "How busy is the anchor?"}]
TURN = [{"role": "assistant", "content": "Busy."}, {"role": "user", "content": "And now?"}]


def other_client(client, host: str = "10.0.0.2"):
    return app_client(client.app, client=(host, 5000))


def assert_retry_after(r, most: int) -> None:
    assert 1 <= int(r.headers["Retry-After"]) <= most


def test_a_client_past_its_rate_gets_429_and_the_others_do_not(make_client):
    client = make_client(rate_per_ip=5, rate_per_token=0)
    for _ in range(5):
        assert client.get("/v1/models").status_code == 200
    r = client.get("/v1/models")
    assert_error(r, 429, "rate_limited")
    assert_retry_after(r, 60)
    assert client.get("/healthz").status_code == 200  # never counted, never refused
    assert client.get("/client/").status_code == 200  # nor the page
    assert other_client(client).get("/v1/models").status_code == 200


def test_a_token_past_its_rate_gets_429_and_other_tokens_do_not(make_client):
    client = make_client(rate_per_ip=0, rate_per_token=3)
    body, auth = create(client, USER)
    other, other_auth = create(client, USER)
    for _ in range(3):
        assert client.get(body["hologram_url"], headers=auth).status_code == 200
    assert_error(client.get(body["hologram_url"], headers=auth), 429, "rate_limited")
    assert client.get(other["hologram_url"], headers=other_auth).status_code == 200


def test_sync_frames_past_the_rate_get_an_error_frame_and_the_channel_stays(make_client, tiny):
    client = make_client(rate_per_ip=0, rate_per_token=3)
    body, _ = create(client, USER)
    with client.websocket_connect(f"/v1/sessions/{body['session_id']}/sync") as ws:
        hello = {"type": "hello", "token": body["token"], "position": body["n_tokens"], "chain": bytes(32),
                 "temperature": 0.0, "seed": 0}
        replies = [send(ws, **hello) for _ in range(4)]
        assert [r["type"] for r in replies[:3]] == ["ready"] * 3
        assert replies[3]["type"] == "error" and replies[3]["code"] == "rate_limited"
        ws.send_bytes(b"\x80")  # the channel is still open: it answers the next frame
        assert send(ws, type="hello")["code"] == "bad_frame"


def test_anchors_on_one_redis_count_a_client_together(tiny_anchor, tmp_path):
    with redis_server(tmp_path) as url:
        def anchor(name):
            return app_client(create_app(Settings(session_store="redis", redis_url=url, rate_per_ip=4,
                                                  sessions_dir=str(tmp_path / name)), tiny_anchor))
        with anchor("a") as a, anchor("b") as b:
            for c in (a, b, a, b):
                assert c.get("/v1/models").status_code == 200
            assert_error(a.get("/v1/models"), 429, "rate_limited")
            assert_error(b.get("/v1/models"), 429, "rate_limited")


def test_a_full_queue_of_model_work_is_503_at_once_and_changes_nothing(make_client, tiny_anchor, monkeypatch):
    client = make_client(max_queued_rows=1, rate_per_ip=0)
    body, auth = create(client, USER)
    engine = tiny_anchor.lm.scheduler.engine
    forward, release, running = engine.forward, threading.Event(), threading.Event()

    def held_forward(seqs):  # the real forward, held back as a long one on a busy anchor would be
        running.set()
        release.wait(30)
        return forward(seqs)

    monkeypatch.setattr(engine, "forward", held_forward)
    done = []
    threads = [threading.Thread(target=lambda: done.append(client.post("/v1/sessions", json={"messages": USER})))
               for _ in range(2)]
    try:
        threads[0].start()
        assert running.wait(10)  # one forward runs ...
        threads[1].start()
        deadline = time.monotonic() + 10
        while not tiny_anchor.lm.scheduler._pending and time.monotonic() < deadline:
            time.sleep(0.01)  # ... and the other's prefill waits for the next one
        t0 = time.monotonic()
        r = client.post("/v1/sessions", json={"messages": USER})
        assert time.monotonic() - t0 < 0.1
        assert_error(r, 503, "server_busy")
        assert_retry_after(r, 5)
        r = client.post(f"/v1/sessions/{body['session_id']}/messages", headers=auth,
                        json={"messages": TURN})
        assert_error(r, 503, "server_busy")
    finally:
        release.set()
        for t in threads:
            t.join(30)
    assert [r.status_code for r in done] == [201, 201]
    monkeypatch.undo()
    # the refused turn changed nothing: the session takes it now
    r = client.post(f"/v1/sessions/{body['session_id']}/messages", headers=auth,
                    json={"messages": TURN})
    assert r.status_code == 200
