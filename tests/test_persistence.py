"""Sessions survive an anchor restart: transcripts on disk, caches rebuilt on first use."""

from __future__ import annotations

import json
import logging
import stat
from pathlib import Path

import pytest

from hpi.protocol import frames
from hpi.protocol.holo import load_hologram
from hpi import completions
from hpi.anchor import Anchor
from hpi.app import create_app
from hpi.config import Settings
from hpi.sampling import Sampling
from tests.app_client import app_client
from tests.syncing import chain_of, send, sync_answer

MESSAGES = [{"role": "user", "content": "What survives a restart?"}]


@pytest.fixture(scope="module")
def anchor(tiny):
    return Anchor(tiny)


def anchor_app(anchor: Anchor, sessions: Path, **limits):
    """An anchor app with a fresh session store on `sessions`: a restart, as far as sessions go."""
    return app_client(create_app(Settings(sessions_dir=str(sessions), **limits), anchor))


def create(client) -> tuple[dict, dict]:
    r = client.post("/v1/sessions", json={"messages": MESSAGES})
    assert r.status_code == 201, r.text
    return r.json(), {"Authorization": f"Bearer {r.json()['token']}"}


def hello(ws, body: dict, position: int, chain: bytes, temperature: float = 0.0, seed: int = 0) -> dict:
    return send(ws, type="hello", token=body["token"], position=position, chain=chain,
                temperature=temperature, seed=seed)


@pytest.mark.parametrize("temperature,seed", [(0.0, 0), (1.0, 3)])
def test_a_synced_session_continues_exactly_after_a_restart(anchor, tiny, tmp_path, temperature, seed):
    prompt = tiny.chat_ids(MESSAGES)
    truth = list(completions.decode(tiny, prompt, 24, Sampling(temperature, seed)))
    vocab = tiny.config.vocab_size
    with anchor_app(anchor, tmp_path) as before:
        body, auth = create(before)
        before.get(body["hologram_url"], headers=auth)
        with before.websocket_connect(f"/v1/sessions/{body['session_id']}/sync") as ws:
            hello(ws, body, len(prompt), frames.GENESIS, temperature, seed)
            confirmed, position, chain, _ = sync_answer(ws, len(prompt), frames.GENESIS, truth[:10], vocab)
        path = tmp_path / f"{body['session_id']}.json"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600  # it holds the session token
        saved = json.loads(path.read_text())
        assert saved["ids"] == prompt + confirmed and saved["pending"] is True
        assert (saved["chain_base"], saved["holo_end"], saved["messages"]) == (len(prompt), len(prompt) - 1, MESSAGES)

    with anchor_app(anchor, tmp_path) as after:
        store = after.app.state.store
        session = store.get(body["session_id"], body["token"])
        assert session.caches.anchor is None and len(store) == 0 == store.kv_bytes  # rebuilt on first use
        r = after.get(body["hologram_url"], headers=auth)
        assert r.status_code == 200 and len(store) == 1
        meta = load_hologram(r.content).meta
        assert (meta["start"], meta["end"], meta["next_id"]) == (0, position - 1, confirmed[-1])
        url = f"/v1/sessions/{body['session_id']}/sync"
        with after.websocket_connect(url) as ws:
            ready = hello(ws, body, position, chain, temperature, seed)
            assert (ready["type"], ready["position"], ready["chain"]) == ("ready", position, chain)
            assert (ready["tokens"], ready["refresh"]) == ([], False)
            confirmed, position, chain, _ = sync_answer(ws, position, chain, truth, vocab, confirmed)
        assert confirmed == truth
        with after.websocket_connect(url) as ws:
            ready = hello(ws, body, position, chain_of([1, 2, 3]), temperature, seed)
            assert ready["refresh"] and ready["tokens"] == truth and ready["position"] == position
            other = hello(ws, body, position, chain, 1.5, seed)  # the sampling was saved too
            assert other["code"] == "sampling_mismatch"
        assert after.delete(f"/v1/sessions/{body['session_id']}", headers=auth).status_code == 204
        assert not path.exists()


def test_a_new_turn_after_a_restart_continues_exactly(anchor, tiny, tmp_path):
    prompt = tiny.chat_ids(MESSAGES)
    truth = list(completions.decode(tiny, prompt, 6))
    with anchor_app(anchor, tmp_path) as before:
        body, auth = create(before)
        with before.websocket_connect(f"/v1/sessions/{body['session_id']}/sync") as ws:
            hello(ws, body, len(prompt), frames.GENESIS)
            sync_answer(ws, len(prompt), frames.GENESIS, truth, tiny.config.vocab_size)
    follow_up = {"messages": [{"role": "user", "content": "And then?"}]}
    with anchor_app(anchor, tmp_path) as after:
        r = after.post(f"/v1/sessions/{body['session_id']}/messages", headers=auth, json=follow_up)
        assert r.status_code == 200, r.text
        conv = after.app.state.store.get(body["session_id"], body["token"]).caches.ids
        assert conv[:len(prompt) + len(truth)] == prompt + truth
    with anchor_app(anchor, tmp_path) as again:
        with again.websocket_connect(f"/v1/sessions/{body['session_id']}/sync") as ws:
            ready = hello(ws, body, len(conv), frames.GENESIS)
            assert (ready["position"], ready["tokens"], ready["refresh"]) == (len(conv), [], False)
            truth2 = list(completions.decode(tiny, conv, 6))
            assert sync_answer(ws, len(conv), frames.GENESIS, truth2, tiny.config.vocab_size)[0] == truth2


def test_bad_transcripts_are_reported_and_skipped(anchor, tmp_path, caplog):
    with anchor_app(anchor, tmp_path) as before:
        body, auth = create(before)
    good = json.loads((tmp_path / f"{body['session_id']}.json").read_text())
    (tmp_path / "garbage.json").write_bytes(b"\x00{not json")
    (tmp_path / "renamed.json").write_text(json.dumps(good))
    (tmp_path / "ZZinconsistent.json").write_text(json.dumps({**good, "id": "ZZinconsistent", "chain_base": 10_000}))
    (tmp_path / "ZZother.json").write_text(json.dumps({**good, "id": "ZZother", "model_id": "another@model"}))
    (tmp_path / "unreadable.json").mkdir()
    with caplog.at_level(logging.WARNING, logger="server"), anchor_app(anchor, tmp_path) as after:
        assert after.get(body["hologram_url"], headers=auth).status_code == 200
        assert {s.id for s in after.app.state.store.limits.held()} == {body["session_id"]}
    warned = "\n".join(r.getMessage() for r in caplog.records)
    for name in ("garbage.json", "renamed.json", "ZZinconsistent.json", "unreadable.json"):
        assert f"{tmp_path / name}" in warned
    assert "holds session" in warned and "chain_base" in warned and "ZZother" in warned and "another@model" in warned


def test_limits_apply_when_a_restored_session_is_rebuilt(anchor, tmp_path):
    with anchor_app(anchor, tmp_path) as before:
        body, auth = create(before)
    with anchor_app(anchor, tmp_path, max_live_sessions=1, client_share=1) as after:
        # A restored session holds no memory until it is used; another client takes the only place.
        elsewhere = app_client(after.app, client=("10.0.0.3", 5000))
        other, other_auth = create(elsewhere)
        r = after.get(body["hologram_url"], headers=auth)
        assert r.status_code == 503 and r.json()["error"]["code"] == "too_many_sessions"
        elsewhere.delete(f"/v1/sessions/{other['session_id']}", headers=other_auth)
        assert after.get(body["hologram_url"], headers=auth).status_code == 200


def test_deleting_a_restored_session_rebuilds_nothing(anchor, tmp_path):
    with anchor_app(anchor, tmp_path) as before:
        body, auth = create(before)
    with anchor_app(anchor, tmp_path) as after:
        assert after.delete(f"/v1/sessions/{body['session_id']}", headers=auth).status_code == 204
        assert after.app.state.store.kv_bytes == 0 and not list(tmp_path.glob("*.json"))
        assert after.get(body["hologram_url"], headers=auth).status_code == 404


def test_a_verdict_that_cannot_be_saved_is_not_sent(anchor, tiny, tmp_path, monkeypatch):
    prompt = tiny.chat_ids(MESSAGES)
    truth = list(completions.decode(tiny, prompt, 12))
    with anchor_app(anchor, tmp_path) as client:
        body, _ = create(client)
        store = client.app.state.store
        with client.websocket_connect(f"/v1/sessions/{body['session_id']}/sync") as ws:
            hello(ws, body, len(prompt), frames.GENESIS)
            first = send(ws, type="draft", position=len(prompt), chain=frames.GENESIS, tokens=truth[:3])
            assert first["type"] == "ack"

            def disk_full(transcript):
                raise OSError(28, "No space left on device")

            monkeypatch.setattr(store.durability.transcripts, "save", disk_full)
            e = send(ws, type="draft", position=first["position"], chain=first["chain"], tokens=truth[4:8])
            assert e["type"] == "error" and e["code"] == "storage_error"
            monkeypatch.undo()
            # The anchor went back to what is on disk: the first verdict, which the page has.
            ready = hello(ws, body, first["position"], first["chain"])
            assert (ready["position"], ready["tokens"], ready["refresh"]) == (first["position"], [], False)
            confirmed, *_ = sync_answer(ws, first["position"], first["chain"], truth, tiny.config.vocab_size,
                                        truth[:4])
        assert confirmed == truth
