"""Sessions in a Redis that two anchors share (server/redis_transcripts.py), on a real redis-server.

Two apps here are two anchors: each has its own session store and memory, and they share
only Redis, as two processes behind a proxy do (tests/test_failover.py runs those).
"""

from __future__ import annotations

import pytest

from hpi.protocol import frames
from hpi import completions
from hpi.app import create_app
from hpi.config import Settings
from hpi.sampling import Sampling
from tests.app_client import app_client
from tests.services import redis_server
from tests.syncing import create, send, sync_answer

MESSAGES = [{"role": "user", "content": "Who holds this conversation?"}]


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    with redis_server(tmp_path_factory.mktemp("redis")) as url:
        yield url


@pytest.fixture
def anchors(tiny_anchor, redis_url, tmp_path):
    """Two anchor apps on one Redis, each with its own (unused) sessions folder."""
    settings = [Settings(session_store="redis", redis_url=redis_url, sessions_dir=str(tmp_path / name))
                for name in "ab"]
    with app_client(create_app(settings[0], tiny_anchor)) as a, app_client(create_app(settings[1], tiny_anchor)) as b:
        yield a, b


def hello(ws, body: dict, position: int, chain: bytes) -> dict:
    return send(ws, type="hello", token=body["token"], position=position, chain=chain, temperature=0.0, seed=0)


def test_another_anchor_takes_a_session_over_and_it_ends_exactly(anchors, tiny):
    a, b = anchors
    prompt = tiny.chat_ids(MESSAGES)
    truth = list(completions.decode(tiny, prompt, 24, Sampling(0.0, 0)))
    vocab = tiny.config.vocab_size
    body, auth = create(a, MESSAGES)
    sync = f"/v1/sessions/{body['session_id']}/sync"
    with a.websocket_connect(sync) as ws:
        hello(ws, body, len(prompt), frames.GENESIS)
        confirmed, position, chain, _ = sync_answer(ws, len(prompt), frames.GENESIS, truth[:10], vocab)
    # b never saw the session: it finds it in Redis and rebuilds its caches from the token ids
    assert b.get(body["hologram_url"], headers=auth).status_code == 200
    with b.websocket_connect(sync) as ws:
        ready = hello(ws, body, position, chain)
        assert ready["type"] == "ready" and ready["position"] == position and not ready["refresh"]
        confirmed, position, chain, _ = sync_answer(ws, position, chain, truth, vocab, confirmed)
    assert confirmed == truth
    # a still holds its old copy: it catches up with what b confirmed before answering
    with a.websocket_connect(sync) as ws:
        ready = hello(ws, body, len(prompt), frames.GENESIS)
        assert ready["position"] == position and ready["tokens"] == truth


def test_a_stale_anchor_cannot_overwrite_what_another_confirmed(anchors, tiny):
    a, b = anchors
    prompt = tiny.chat_ids(MESSAGES)
    truth = list(completions.decode(tiny, prompt, 16, Sampling(0.0, 0)))
    vocab = tiny.config.vocab_size
    body, _ = create(a, MESSAGES)
    store_a = a.app.state.store
    with store_a.use(body["session_id"], body["token"]) as s:
        store_a.ready(s, len(prompt), frames.GENESIS, (0.0, 0))
        # while a holds the session, b confirms tokens of it
        with b.websocket_connect(f"/v1/sessions/{body['session_id']}/sync") as ws:
            hello(ws, body, len(prompt), frames.GENESIS)
            confirmed, position, chain, _ = sync_answer(ws, len(prompt), frames.GENESIS, truth[:6], vocab)
        with pytest.raises(Exception) as moved:
            store_a.draft(s, len(prompt), frames.GENESIS, truth[:4])
        assert getattr(moved.value, "code", None) == "session_moved"
        assert s.caches.ids == prompt + confirmed  # a now holds b's state, not its own draft's


def test_a_session_deleted_on_one_anchor_is_gone_on_the_other(anchors):
    a, b = anchors
    body, auth = create(a, MESSAGES)
    assert b.get(body["hologram_url"], headers=auth).status_code == 200
    assert b.delete(f"/v1/sessions/{body['session_id']}", headers=auth).status_code == 204
    r = a.get(body["hologram_url"], headers=auth)
    assert r.status_code == 404 and r.json()["error"]["code"] == "session_not_found"


def test_an_unreachable_store_is_503_not_500(tiny_anchor, tmp_path):
    from tests.services import free_port
    settings = Settings(session_store="redis", redis_url=f"redis://127.0.0.1:{free_port()}/0",
                        sessions_dir=str(tmp_path / "s"))
    with app_client(create_app(settings, tiny_anchor)) as c:
        r = c.post("/v1/sessions", json={"messages": MESSAGES})
        assert r.status_code == 503 and r.json()["error"]["code"] == "storage_error"
        assert "Error" not in r.json()["error"]["message"]  # no exception text
        r = c.get("/v1/sessions/abc/hologram", headers={"Authorization": "Bearer x"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "storage_error"
