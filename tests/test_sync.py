"""The reconciliation websocket: drafts in, verdicts out, and the confirmed text is the anchor's own."""

from __future__ import annotations

import msgpack
import pytest
from starlette.websockets import WebSocketDisconnect

from hpi.protocol import frames
from hpi import completions
from hpi.anchor import Anchor
from hpi.app import create_app
from hpi.config import Settings
from hpi.sampling import Sampling
from tests.app_client import app_client
from tests.syncing import chain_of, send

MESSAGES = [{"role": "user", "content": "Tell me about the reconciliation channel."}]


@pytest.fixture(scope="module")
def client(tiny, tmp_path_factory):
    settings = Settings(sessions_dir=str(tmp_path_factory.mktemp("sessions")))
    with app_client(create_app(settings, Anchor(tiny))) as c:
        yield c


def session(client) -> dict:
    r = client.post("/v1/sessions", json={"messages": MESSAGES})
    assert r.status_code == 201
    return r.json()


@pytest.mark.parametrize("temperature,seed", [(0.0, 0), (1.0, 11)])
def test_drifting_drafts_end_in_the_anchor_only_text(client, tiny, temperature, seed):
    s = session(client)
    prompt = tiny.chat_ids(MESSAGES)
    truth = list(completions.decode(tiny, prompt, 40, Sampling(temperature, seed)))
    with client.websocket_connect(f"/v1/sessions/{s['session_id']}/sync") as ws:
        ready = send(ws, type="hello", token=s["token"], position=len(prompt), chain=frames.GENESIS,
                     temperature=temperature, seed=seed)
        assert ready["type"] == "ready" and ready["position"] == len(prompt) and ready["tokens"] == []
        confirmed, position, chain, corrections = [], len(prompt), frames.GENESIS, 0
        while len(confirmed) < 24:
            at = len(confirmed)
            drafts = truth[at:at + 8]
            if at % 3 == 0:  # drift: a wrong token in the middle of every third draft
                drafts[3] = (drafts[3] + 1) % tiny.config.vocab_size
            v = send(ws, type="draft", position=position, chain=chain, tokens=drafts)
            assert v["type"] in ("ack", "correction")
            corrections += v["type"] == "correction"
            confirmed += drafts[:v["accepted"]] + [v["token"]]
            position, chain = v["position"], v["chain"]
            assert position == len(prompt) + len(confirmed) and chain == chain_of(confirmed)
    assert confirmed == truth[:len(confirmed)]
    assert corrections > 0


def test_reconnect_catches_up_and_a_foreign_chain_gets_a_refresh(client, tiny):
    s = session(client)
    prompt = tiny.chat_ids(MESSAGES)
    truth = list(completions.decode(tiny, prompt, 12))
    url = f"/v1/sessions/{s['session_id']}/sync"
    with client.websocket_connect(url) as ws:
        send(ws, type="hello", token=s["token"], position=len(prompt), chain=frames.GENESIS)
        v = send(ws, type="draft", position=len(prompt), chain=frames.GENESIS, tokens=truth[:5])
        assert v["type"] == "ack" and v["accepted"] == 5
    with client.websocket_connect(url) as ws:  # the page only saw the first 2 confirmed tokens
        r = send(ws, type="hello", token=s["token"], position=len(prompt) + 2, chain=chain_of(truth[:2]))
        assert (r["refresh"], r["tokens"], r["position"]) == (False, truth[2:6], len(prompt) + 6)
        r = send(ws, type="hello", token=s["token"], position=len(prompt) + 2, chain=chain_of([1, 2]))
        assert r["refresh"] and r["tokens"] == truth[:6]
        stale = send(ws, type="draft", position=len(prompt), chain=frames.GENESIS, tokens=truth[:3])
        assert stale["type"] == "error" and stale["code"] == "stale_draft"


def test_bad_frames_get_error_frames_and_the_session_survives(client, tiny):
    s = session(client)
    prompt = tiny.chat_ids(MESSAGES)
    with client.websocket_connect(f"/v1/sessions/{s['session_id']}/sync") as ws:
        first = send(ws, type="draft", position=0, chain=frames.GENESIS, tokens=[1])
        assert first["code"] == "bad_frame" and "hello" in first["message"]
        send(ws, type="hello", token=s["token"], position=len(prompt), chain=frames.GENESIS)
        for bad, why in [({"type": "draft"}, "position"), ({"type": "nope"}, "type"),
                         ({"type": "draft", "position": len(prompt), "chain": frames.GENESIS, "tokens": []}, "tokens"),
                         ({"type": "draft", "position": len(prompt), "chain": b"x", "tokens": [1]}, "chain")]:
            e = send(ws, **bad)
            assert e["type"] == "error" and e["code"] == "bad_frame" and why in e["message"], e
        for raw in [b"\xc1", msgpack.packb([1, 2]), msgpack.packb({"v": 2, "type": "hello"}), b"\x00" * 70_000]:
            ws.send_bytes(raw)
            assert msgpack.unpackb(ws.receive_bytes())["code"] == "bad_frame"
        ws.send_text("hello")
        assert msgpack.unpackb(ws.receive_bytes())["code"] == "bad_frame"
        big = send(ws, type="draft", position=len(prompt), chain=frames.GENESIS, tokens=[1 << 30])
        assert big["code"] == "bad_frame" and "vocabulary" in big["message"]
        ok = send(ws, type="draft", position=len(prompt), chain=frames.GENESIS, tokens=[1])
        assert ok["type"] in ("ack", "correction")
        other = send(ws, type="hello", token=s["token"], position=len(prompt), chain=frames.GENESIS,
                     temperature=1.0)
        assert other["code"] == "sampling_mismatch"


def test_a_wrong_token_closes_the_channel(client):
    s = session(client)
    with client.websocket_connect(f"/v1/sessions/{s['session_id']}/sync") as ws:
        e = send(ws, type="hello", token="wrong", position=0, chain=frames.GENESIS)
        assert e["code"] == "forbidden"
    with pytest.raises(WebSocketDisconnect) as refused:  # an unknown session is refused before the channel opens
        client.websocket_connect("/v1/sessions/nope/sync").__enter__()
    assert refused.value.code == 1008 and refused.value.reason == "session_not_found"


def test_metrics_count_passes_and_verdicts(client, tiny):
    def read() -> dict[str, float]:
        r = client.get("/metrics")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        for name in ("hpi_forward_passes_total", "hpi_sessions"):
            assert f"# TYPE {name} " in r.text
        return {k: float(v) for k, v in (line.split() for line in r.text.splitlines() if not line.startswith("#"))}

    s = session(client)
    prompt = tiny.chat_ids(MESSAGES)
    truth = list(completions.decode(tiny, prompt, 6))
    before = read()
    with client.websocket_connect(f"/v1/sessions/{s['session_id']}/sync") as ws:
        send(ws, type="hello", token=s["token"], position=len(prompt), chain=frames.GENESIS)
        wrong = [truth[0], truth[1], (truth[2] + 1) % tiny.config.vocab_size]
        v = send(ws, type="draft", position=len(prompt), chain=frames.GENESIS, tokens=wrong)
        assert (v["type"], v["accepted"]) == ("correction", 2)
    after = read()
    delta = {k: after[k] - before.get(k, 0) for k in after}
    assert delta["hpi_forward_passes_total"] == 1
    assert delta["hpi_tokens_verified_total"] == 3 and delta["hpi_tokens_accepted_total"] == 2
    assert delta["hpi_tokens_corrected_total"] == 1 and delta["hpi_bytes_sent_total"] > 0
    assert after["hpi_sessions"] >= 1
