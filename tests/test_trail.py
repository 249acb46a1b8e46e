"""Trail state: checkpoints, exact backtracking and forks that share their KV prefix copy-on-write."""

from __future__ import annotations

import threading

import pytest
import torch
from transformers import DynamicCache

from hpi.protocol import frames
from hpi.protocol.holo import load_hologram
from hpi import completions, turns
from hpi.anchor import Anchor
from hpi.models import load_model
from hpi.trail import TAIL_ROOM
from hpi.sampling import Sampling
from tests.syncing import chain_of, client_for, create, send, sync_answer
from tests.tiny_model import build_tiny_llama

MESSAGES = [{"role": "user", "content": "Walk the trail and come back."}]
FOLLOW_UP = [{"role": "user", "content": "Another way?"}]
OTHER_FOLLOW_UP = [{"role": "user", "content": "Or back?"}]


@pytest.fixture(scope="module")
def anchor(tiny):
    return Anchor(tiny)


def url(body: dict, what: str) -> str:
    return f"/v1/sessions/{body['session_id']}/{what}"


def checkpoint(client, body: dict, auth: dict, name: str) -> dict:
    r = client.post(url(body, "checkpoints"), headers=auth, json={"name": name})
    assert r.status_code == 201, r.text
    return r.json()


def post(client, body: dict, auth: dict, what: str, **payload) -> dict:
    r = client.post(url(body, what), headers=auth, json=payload)
    assert r.status_code in (200, 201), r.text
    return r.json()


def sync(client, body: dict, position: int, chain: bytes, truth: list[int], confirmed: list[int] | None = None,
         temperature: float = 0.0, seed: int = 0) -> tuple[list[int], int, bytes]:
    """Say hello at `position` (nothing may be missing there) and sync until `truth` is confirmed."""
    with client.websocket_connect(url(body, "sync")) as ws:
        ready = send(ws, type="hello", token=body["token"], position=position, chain=chain,
                     temperature=temperature, seed=seed)
        assert (ready["type"], ready["position"], ready["tokens"], ready["refresh"]) == ("ready", position, [], False)
        done, position, chain, _ = sync_answer(ws, position, chain, truth, client.app.state.anchor.lm.config.vocab_size,
                                               confirmed)
    return done, position, chain


def session_of(client, body: dict):
    return client.app.state.store.get(body["session_id"], body["token"])


@pytest.mark.parametrize("temperature,seed", [(0.0, 0), (1.0, 11)])
def test_after_a_backtrack_the_continuation_is_the_original_one(anchor, tiny, tmp_path, temperature, seed):
    prompt = tiny.chat_ids(MESSAGES)
    truth = list(completions.decode(tiny, prompt, 24, Sampling(temperature, seed)))
    mid = len(truth) // 2
    with client_for(anchor, tmp_path) as client:
        body, auth = create(client, MESSAGES)
        start = checkpoint(client, body, auth, "start")
        assert start["position"] == len(prompt)
        done, position, chain = sync(client, body, len(prompt), frames.GENESIS, truth[:mid], None, temperature, seed)
        assert checkpoint(client, body, auth, "mid")["position"] == len(prompt) + mid
        done, position, chain = sync(client, body, position, chain, truth, done, temperature, seed)
        checkpoint(client, body, auth, "end")
        assert done == truth

        back = post(client, body, auth, "backtrack", checkpoint="mid")
        assert (back["position"], back["dropped"], back["chain_base"]) == (len(prompt) + mid, len(truth) - mid, len(prompt))
        assert (back["chain"], back["tokens"], back["n_messages"]) == (chain_of(truth[:mid]).hex(), truth[:mid], 1)
        names = [c["name"] for c in client.get(url(body, "checkpoints"), headers=auth).json()["checkpoints"]]
        assert names == ["start", "mid"]  # "end" went with the tokens after "mid"
        caches = session_of(client, body).caches
        assert caches.ids == prompt + truth[:mid] and caches.pending == truth[mid - 1]
        assert caches.anchor.get_seq_length() == back["position"] - 1
        r = client.get(back["hologram_url"], headers=auth)
        meta = load_hologram(r.content).meta
        assert (meta["start"], meta["end"], meta["next_id"]) == (0, back["position"] - 1, truth[mid - 1])

        again, *_ = sync(client, body, back["position"], bytes.fromhex(back["chain"]), truth, truth[:mid],
                         temperature, seed)
        assert again == truth
        # Back to the end of the prompt: its last token waits for the next pass, as a verified one does.
        back = post(client, body, auth, "backtrack", checkpoint="start")
        assert (back["position"], back["tokens"], back["chain"]) == (len(prompt), [], frames.GENESIS.hex())
        assert sync(client, body, len(prompt), frames.GENESIS, truth, None, temperature, seed)[0] == truth


def test_a_backtrack_over_a_turn_restores_the_turns_and_the_answer(anchor, tiny, tmp_path):
    prompt = tiny.chat_ids(MESSAGES)
    answer = list(completions.decode(tiny, prompt, 8))
    with client_for(anchor, tmp_path) as client:
        body, auth = create(client, MESSAGES)
        sync(client, body, len(prompt), frames.GENESIS, answer)
        checkpoint(client, body, auth, "answered")
        r = client.post(url(body, "messages"), headers=auth, json={"messages": FOLLOW_UP})
        assert r.status_code == 200
        conv = session_of(client, body).caches.ids
        sync(client, body, len(conv), frames.GENESIS, list(completions.decode(tiny, conv, 6)))

        back = post(client, body, auth, "backtrack", checkpoint="answered")
        assert (back["position"], back["chain_base"], back["tokens"]) == (len(prompt) + len(answer), len(prompt), answer)
        assert back["n_messages"] == 1 and back["holo_end"] <= back["position"] - 1
        # The answer is open again: a different next turn follows it, as after the original answer.
        r = client.post(url(body, "messages"), headers=auth, json={"messages": OTHER_FOLLOW_UP})
        assert r.status_code == 200, r.text
        assert r.headers["x-hpi-start"] == str(back["holo_end"])
        conv = session_of(client, body).caches.ids
        assert conv == prompt + answer + turns.next_turn_ids(tiny, MESSAGES, answer, OTHER_FOLLOW_UP)
        truth = list(completions.decode(tiny, conv, 8))
        assert sync(client, body, len(conv), frames.GENESIS, truth)[0] == truth


@pytest.mark.parametrize("alternative", ["token", "seed"])
def test_a_fork_continues_as_the_anchor_alone_and_never_sees_its_parent(anchor, tiny, tmp_path, alternative):
    prompt = tiny.chat_ids(MESSAGES)
    truth = list(completions.decode(tiny, prompt, 24))
    mid = len(truth) // 2
    prefix = prompt + truth[:mid]
    with client_for(anchor, tmp_path) as client:
        body, auth = create(client, MESSAGES)
        done, position, chain = sync(client, body, len(prompt), frames.GENESIS, truth[:mid])
        checkpoint(client, body, auth, "fork here")
        if alternative == "token":
            forced = (truth[mid] + 1) % tiny.config.vocab_size
            f = post(client, body, auth, "fork", checkpoint="fork here", token=forced)
            own, sampling = [forced], (0.0, 0)
        else:
            f = post(client, body, auth, "fork", checkpoint="fork here", temperature=1.0, seed=5)
            own, sampling = [], (1.0, 5)
        assert f["forked_from"] == {"session_id": body["session_id"], "checkpoint": "fork here", "position": len(prefix)}
        assert (f["position"], f["tokens"]) == (len(prefix) + len(own), truth[:mid] + own)
        assert Sampling.from_json(f["sampling"]) == Sampling(*sampling)
        assert f["chain"] == chain_of(truth[:mid] + own).hex() and f["shared_tokens"] == len(prefix) - 1
        fork_auth = {"Authorization": f"Bearer {f['token']}"}
        fork_truth = own + list(completions.decode(tiny, prefix + own, 16, Sampling(*sampling)))

        # The parent goes on (and back, and on again) while the fork writes its own answer.
        parent_done, *_ = sync(client, body, position, chain, truth, done)
        post(client, body, auth, "backtrack", checkpoint="fork here")
        fork_done, *_ = sync(client, f, f["position"], bytes.fromhex(f["chain"]), fork_truth, own, *sampling)
        parent_again, *_ = sync(client, body, position, chain, truth, done)
        assert parent_done == parent_again == truth and fork_done == fork_truth
        assert session_of(client, body).caches.ids == prompt + truth
        assert session_of(client, f).caches.ids == prefix + fork_truth
        # A fork is a session of its own: its token, its checkpoints (the parent's up to the fork).
        assert client.get(url(f, "checkpoints"), headers=auth).status_code == 403
        names = [c["name"] for c in client.get(url(f, "checkpoints"), headers=fork_auth).json()["checkpoints"]]
        assert names == ["fork here"]


def keys_up_to(session, n: int) -> list[torch.Tensor]:
    return [layer.keys[..., :n, :].clone() for layer in session.caches.anchor.layers]


def kv_bytes_per_token(tiny) -> int:
    c = tiny.config
    return 2 * c.num_hidden_layers * c.num_key_value_heads * (c.hidden_size // c.num_attention_heads) * 4


def own_bytes(tiny, parent, forks) -> list[tuple[int, int]]:
    """For each fork: the bytes of the storages no session before it holds, and its own positions' bytes."""
    per_token = kv_bytes_per_token(tiny)
    held = parent.caches.anchor.storages()
    out = []
    for f in forks:
        mine = f.caches.anchor.storages()
        out.append((sum(n for ptr, n in mine.items() if ptr not in held),
                    (f.caches.anchor.get_seq_length() - f.caches.anchor.frozen_tokens) * per_token))
        held |= mine
    return out


def test_forks_share_the_prefix_and_cannot_change_it(anchor, tiny, tmp_path):
    prompt = tiny.chat_ids(MESSAGES)
    truth = list(completions.decode(tiny, prompt, 12))
    with client_for(anchor, tmp_path) as client:
        body, auth = create(client, MESSAGES)
        _, position, chain = sync(client, body, len(prompt), frames.GENESIS, truth)
        checkpoint(client, body, auth, "here")
        store = client.app.state.store
        forks = [post(client, body, auth, "fork", checkpoint="here", token=t) for t in (3, 4, 5)]
        shared = position - 1
        assert all(f["shared_tokens"] == shared for f in forks)
        prefix = keys_up_to(session_of(client, forks[0]), shared)

        # Each fork adds its own tokens: drafts the anchor accepts, so no rejected draft is left in a tail.
        eos = set(tiny.eos_token_ids)
        for f in forks:
            own = list(completions.decode(tiny, session_of(client, f).caches.ids, 8))
            own = own[:next((i for i, t in enumerate(own) if t in eos), len(own))]
            with client.websocket_connect(url(f, "sync")) as ws:
                send(ws, type="hello", token=f["token"], position=f["position"], chain=bytes.fromhex(f["chain"]))
                v = send(ws, type="draft", position=f["position"], chain=bytes.fromhex(f["chain"]), tokens=own)
                assert (v["type"], v["accepted"]) == ("ack", len(own))
        # Memory: each fork's storage beyond what the sessions before it hold is its own positions, with
        # at most the room a tail keeps to grow in place (a quarter more, or TAIL_ROOM positions).
        measured = own_bytes(tiny, session_of(client, body), [session_of(client, f) for f in forks])
        per_token = kv_bytes_per_token(tiny)
        assert all(want <= got <= max(want * 5 // 4 + per_token, TAIL_ROOM * per_token) for got, want in measured)
        assert sum(want for _, want in measured) > 0

        # The parent grows and goes back below the shared prefix: the forks' prefix does not change.
        sync(client, body, position, chain, list(completions.decode(tiny, prompt, 20)), truth)
        anchor.rewind(session_of(client, body).caches, len(prompt) // 2)
        assert all(map(torch.equal, keys_up_to(session_of(client, forks[0]), shared), prefix))

        # The store charges the shared positions once, also after the parent is gone.
        assert store.kv_bytes < (len(forks) + 1) * shared * store.limits.kv_bytes_per_token
        assert client.delete(url(body, ""), headers=auth).status_code == 204
        assert store.kv_bytes >= shared * store.limits.kv_bytes_per_token
        for f in forks:
            assert client.delete(url(f, ""), headers={"Authorization": f"Bearer {f['token']}"}).status_code == 204
        assert store.kv_bytes == 0 and len(store) == 0


def test_the_hologram_of_a_fork_reuses_its_parents(anchor, tiny, tmp_path):
    prompt = tiny.chat_ids(MESSAGES)
    truth = list(completions.decode(tiny, prompt, 12))
    with client_for(anchor, tmp_path) as client:
        body, auth = create(client, MESSAGES)
        _, position, chain = sync(client, body, len(prompt), frames.GENESIS, truth[:6])
        checkpoint(client, body, auth, "here")
        full = client.get(url(body, "hologram"), headers=auth)
        sync(client, body, position, chain, truth, truth[:6])

        # Without a forced token the fork's whole hologram is the parent's at the checkpoint: a 304.
        f = post(client, body, auth, "fork", checkpoint="here")
        fork_auth = {"Authorization": f"Bearer {f['token']}"}
        r = client.get(f["hologram_url"], headers={**fork_auth, "If-None-Match": full.headers["etag"]})
        assert r.status_code == 304 and r.headers["x-hpi-end"] == str(position - 1)
        # With one, the page keeps the parent's segments and fetches the delta after them.
        g = post(client, body, auth, "fork", checkpoint="here", token=7)
        assert g["holo_end"] == position - 1
        r = client.get(g["hologram_url"] + f"?start={g['holo_end']}",
                       headers={"Authorization": f"Bearer {g['token']}"})
        meta = load_hologram(r.content).meta
        assert (meta["start"], meta["end"], meta["next_id"]) == (position - 1, position, 7)
        assert (r.headers["x-hpi-start"], r.headers["x-hpi-end"]) == (str(position - 1), str(position))


def test_bad_trail_requests(anchor, tiny, tmp_path):
    with client_for(anchor, tmp_path) as client:
        a, a_auth = create(client, MESSAGES)
        b, b_auth = create(client, MESSAGES)
        checkpoint(client, a, a_auth, "of-a")

        def error(r, status: int, code: str) -> None:
            assert r.status_code == status, r.text
            assert r.json()["error"]["code"] == code and r.json()["error"]["message"]

        # Another session's checkpoint, or none by that name: 404.
        error(client.post(url(b, "backtrack"), headers=b_auth, json={"checkpoint": "of-a"}), 404, "checkpoint_not_found")
        error(client.post(url(b, "fork"), headers=b_auth, json={"checkpoint": "of-a"}), 404, "checkpoint_not_found")
        error(client.post(url(a, "backtrack"), headers=a_auth, json={"checkpoint": "nope"}), 404, "checkpoint_not_found")
        error(client.post(url(a, "backtrack"), headers=b_auth, json={"checkpoint": "of-a"}), 403, "forbidden")
        error(client.post("/v1/sessions/unknown/backtrack", headers=a_auth, json={"checkpoint": "of-a"}), 404,
              "session_not_found")
        # Bad bodies: 422.
        for payload in ({}, {"name": ""}, {"name": "x" * 65}, {"name": "../etc"}, {"name": "a\nb"},
                        {"name": "ok", "extra": 1}, {"name": 5}):
            error(client.post(url(a, "checkpoints"), headers=a_auth, json=payload), 422, "invalid_request")
        vocab = tiny.config.vocab_size
        for payload in ({}, {"checkpoint": "of-a", "token": -1}, {"checkpoint": "of-a", "token": vocab},
                        {"checkpoint": "of-a", "temperature": 2.5}, {"checkpoint": "of-a", "seed": 1 << 32},
                        {"checkpoint": "of-a", "seed": 3}, {"checkpoint": "of-a", "what": 1}):
            error(client.post(url(a, "fork"), headers=a_auth, json=payload), 422, "invalid_request")
        error(client.get(url(a, "hologram") + "?start=100000", headers=a_auth), 422, "invalid_request")
        error(client.get(url(a, "hologram") + "?start=-1", headers=a_auth), 422, "invalid_request")
        error(client.post(url(a, "checkpoints"), headers=a_auth, json={"name": "of-a"}), 409, "checkpoint_exists")
        error(client.post(url(a, "checkpoints"), headers=a_auth, content=b"{" * 2_000_000), 413, "body_too_large")
        assert len(client.app.state.store) == 2  # no fork was left behind


def test_a_backtrack_waits_for_the_session_and_a_draft_after_it_is_stale(anchor, tiny, tmp_path):
    prompt = tiny.chat_ids(MESSAGES)
    truth = list(completions.decode(tiny, prompt, 12))
    with client_for(anchor, tmp_path) as client:
        body, auth = create(client, MESSAGES)
        checkpoint(client, body, auth, "start")
        with client.websocket_connect(url(body, "sync")) as ws:
            send(ws, type="hello", token=body["token"], position=len(prompt), chain=frames.GENESIS)
            _, position, chain, _ = sync_answer(ws, len(prompt), frames.GENESIS, truth[:6], tiny.config.vocab_size)
            replies = []
            with session_of(client, body).lock:  # as a verification in progress holds it
                t = threading.Thread(target=lambda: replies.append(
                    client.post(url(body, "backtrack"), headers=auth, json={"checkpoint": "start"})))
                t.start()
                t.join(0.5)
                assert t.is_alive() and not replies
            t.join(10)
            assert replies[0].status_code == 200 and replies[0].json()["position"] == len(prompt)
            stale = send(ws, type="draft", position=position, chain=chain, tokens=truth[6:9])
            assert (stale["type"], stale["code"]) == ("error", "stale_draft")
            ready = send(ws, type="hello", token=body["token"], position=position, chain=chain)
            assert ready["refresh"] and ready["position"] == len(prompt) and ready["tokens"] == []
            done, *_ = sync_answer(ws, len(prompt), frames.GENESIS, truth, tiny.config.vocab_size)
            assert done == truth


def test_checkpoints_and_forks_survive_a_restart(anchor, tiny, tmp_path):
    prompt = tiny.chat_ids(MESSAGES)
    truth = list(completions.decode(tiny, prompt, 16))
    mid = len(truth) // 2
    with client_for(anchor, tmp_path) as before:
        body, auth = create(before, MESSAGES)
        done, position, chain = sync(before, body, len(prompt), frames.GENESIS, truth[:mid])
        listed = [checkpoint(before, body, auth, "mid")]
        sync(before, body, position, chain, truth, done)
        listed.append(checkpoint(before, body, auth, "end"))
        f = post(before, body, auth, "fork", checkpoint="mid", token=9)
    with client_for(anchor, tmp_path) as after:
        assert after.get(url(body, "checkpoints"), headers=auth).json() == {"checkpoints": listed}
        back = post(after, body, auth, "backtrack", checkpoint="mid")
        parent = session_of(after, body)
        assert parent.caches.anchor is None  # cut without being rebuilt: rebuilt shorter on first use
        assert (back["position"], back["chain"]) == (position, chain.hex())
        assert sync(after, body, position, chain, truth, done)[0] == truth
        # The fork is rebuilt as a session of its own (sharing is not restored) and continues exactly.
        fork_truth = [9] + list(completions.decode(tiny, prompt + truth[:mid] + [9], 8))
        fork_done, *_ = sync(after, f, f["position"], bytes.fromhex(f["chain"]), fork_truth, [9])
        assert fork_done == fork_truth and session_of(after, f).caches.anchor.frozen_tokens == 0


def test_a_fork_shares_a_separate_resonator_cache_too(tiny, tmp_path_factory, tmp_path):
    other = load_model(str(build_tiny_llama(tmp_path_factory.mktemp("other") / "llama", seed=1)), device="cpu")
    prompt = tiny.chat_ids(MESSAGES)
    truth = list(completions.decode(tiny, prompt, 12))
    with client_for(Anchor(tiny, other), tmp_path) as client:
        body, auth = create(client, MESSAGES)
        _, position, chain = sync(client, body, len(prompt), frames.GENESIS, truth[:6])
        checkpoint(client, body, auth, "here")
        client.get(url(body, "hologram"), headers=auth)  # the resonator cache catches up with the answer
        f = post(client, body, auth, "fork", checkpoint="here", token=7)
        caches = session_of(client, f).caches
        assert caches.resonator.frozen_tokens == position - 1
        r = client.get(f["hologram_url"], headers={"Authorization": f"Bearer {f['token']}"})
        assert r.status_code == 200 and load_hologram(r.content).meta["end"] == position
        fresh = DynamicCache(config=other.config)
        with torch.no_grad():
            other.model(input_ids=torch.tensor([caches.ids]), cache=fresh, use_cache=True)
        assert caches.resonator.get_seq_length() == len(caches.ids)  # the forced token was prefilled
        for got, want in zip(caches.resonator.layers, fresh.layers):
            assert torch.allclose(got.keys, want.keys, atol=1e-5) and torch.allclose(got.values, want.values, atol=1e-5)
        assert sync(client, body, position, chain, truth, truth[:6])[0] == truth
