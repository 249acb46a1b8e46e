"""The page's side of the sync channel in tests: an app client and a session, frames, the chain hash,
and a drifting drafter."""

from __future__ import annotations

from pathlib import Path

import msgpack

from hpi.protocol import frames
from hpi.anchor import Anchor
from hpi.app import create_app
from hpi.config import Settings
from tests.app_client import app_client


def client_for(anchor: Anchor, sessions: Path):
    return app_client(create_app(Settings(sessions_dir=str(sessions)), anchor))


def create(client, messages: list[dict]) -> tuple[dict, dict]:
    """A new session: its body and the authorization header of its token."""
    r = client.post("/v1/sessions", json={"messages": messages})
    assert r.status_code == 201, r.text
    return r.json(), {"Authorization": f"Bearer {r.json()['token']}"}


def send(ws, **frame) -> dict:
    ws.send_bytes(msgpack.packb({"v": 1, **frame}, use_bin_type=True))
    return msgpack.unpackb(ws.receive_bytes(), raw=False)


def chain_of(tokens: list[int], start: bytes = frames.GENESIS) -> bytes:
    c = start
    for t in tokens:
        c = frames.chain_next(c, t)
    return c


def sync_answer(ws, position: int, chain: bytes, truth: list[int], vocab: int,
                confirmed: list[int] | None = None) -> tuple[list[int], int, bytes, int]:
    """Draft `truth` (an anchor-only answer) after `confirmed`, eight tokens at a time with a wrong
    token in every third draft, until as many tokens as `truth` has are confirmed. Its last token
    is never drafted: the anchor confirms it itself, so nothing after an end token is confirmed.
    Returns all confirmed tokens, the position and chain after them, and the corrections."""
    confirmed = list(confirmed or [])
    corrections = 0
    while len(confirmed) < len(truth):
        at = len(confirmed)
        drafts = truth[at:min(at + 8, len(truth) - 1)] or [(truth[at] + 1) % vocab]
        if at % 3 == 0 and len(drafts) > 3:
            drafts[3] = (drafts[3] + 1) % vocab
        v = send(ws, type="draft", position=position, chain=chain, tokens=drafts)
        assert v["type"] in ("ack", "correction"), v
        corrections += v["type"] == "correction"
        confirmed += drafts[:v["accepted"]] + [v["token"]]
        position, chain = v["position"], v["chain"]
    return confirmed, position, chain, corrections
