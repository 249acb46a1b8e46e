"""A new turn after an answer synced over the websocket: the anchor closes the answer's turn itself,
and the next answer is again exactly the anchor's."""

from __future__ import annotations


import pytest
import torch
from transformers import DynamicCache

from hpi.protocol import frames
from hpi.protocol.holo import load_hologram
from hpi import completions, turns
from hpi.anchor import Anchor
from hpi.models import load_model
from hpi.sampling import Sampling
from tests.syncing import client_for, create, send, sync_answer
from tests.tiny_model import build_tiny_llama

MESSAGES = [{"role": "user", "content": "Tell me about the reconciliation channel."}]
FOLLOW_UP = [{"role": "user", "content": "And after a restart?"}]


@pytest.fixture(scope="module")
def other(tmp_path_factory):
    """A second tiny model: the same tokenizer, other weights."""
    return load_model(str(build_tiny_llama(tmp_path_factory.mktemp("other") / "llama", seed=1)), device="cpu")


def synced_turn(client, body: dict, position: int, truth: list[int], temperature: float, seed: int) -> list[int]:
    """Sync one answer from `position`, where the chain restarts, as a page does after each turn."""
    vocab = client.app.state.anchor.lm.config.vocab_size
    with client.websocket_connect(f"/v1/sessions/{body['session_id']}/sync") as ws:
        ready = send(ws, type="hello", token=body["token"], position=position, chain=frames.GENESIS,
                     temperature=temperature, seed=seed)
        assert (ready["type"], ready["position"], ready["tokens"], ready["refresh"]) == ("ready", position, [], False)
        answer, *_ = sync_answer(ws, position, frames.GENESIS, truth, vocab)
    return answer


@pytest.mark.parametrize("temperature,seed", [(0.0, 0), (1.0, 5)])
def test_a_new_turn_after_a_synced_answer_continues_exactly(tiny, tmp_path, temperature, seed):
    with client_for(Anchor(tiny), tmp_path) as client:
        body, auth = create(client, MESSAGES)
        prompt = tiny.chat_ids(MESSAGES)
        first = client.get(body["hologram_url"], headers=auth)
        assert first.headers["x-hpi-end"] == str(len(prompt) - 1)
        truth = list(completions.decode(tiny, prompt, 16, Sampling(temperature, seed)))
        answer = synced_turn(client, body, len(prompt), truth, temperature, seed)
        assert answer == truth

        r = client.post(f"/v1/sessions/{body['session_id']}/messages", headers=auth, json={"messages": FOLLOW_UP})
        assert r.status_code == 200, r.text
        session = client.app.state.store.get(body["session_id"], body["token"])
        conv = list(session.caches.ids)
        # The anchor kept the confirmed tokens and added what the template renders after the answer.
        assert conv[:len(prompt) + len(answer)] == prompt + answer
        said = {"role": "assistant", "content": tiny.tokenizer.decode(answer, skip_special_tokens=True)}
        assert session.messages == MESSAGES + [said] + FOLLOW_UP
        # The template around the exact answer (a random tiny model may write special tokens in it,
        # which the transcript's text leaves out; a closing end-of-turn token is not repeated).
        exact = answer[:-1] if answer[-1] in tiny.eos_token_ids else answer
        assert tiny.tokenizer.decode(conv) == tiny.tokenizer.apply_chat_template(
            MESSAGES + [{"role": "assistant", "content": tiny.tokenizer.decode(exact)}] + FOLLOW_UP,
            tokenize=False, add_generation_prompt=True)
        # The delta covers the answer and the new turn, from where the page's hologram ended.
        assert (r.headers["x-hpi-start"], r.headers["x-hpi-end"]) == (str(len(prompt) - 1), str(len(conv) - 1))
        meta = load_hologram(r.content).meta
        assert (meta["start"], meta["end"], meta["next_id"]) == (len(prompt) - 1, len(conv) - 1, conv[-1])
        assert (session.chain_base, session.chains) == (len(conv), [frames.GENESIS])

        truth2 = list(completions.decode(tiny, conv, 16, Sampling(temperature, seed)))
        assert synced_turn(client, body, len(conv), truth2, temperature, seed) == truth2


def test_an_assistant_message_after_a_synced_answer_is_refused(tiny, tmp_path):
    with client_for(Anchor(tiny), tmp_path) as client:
        body, auth = create(client, MESSAGES)
        prompt = tiny.chat_ids(MESSAGES)
        synced_turn(client, body, len(prompt), list(completions.decode(tiny, prompt, 4)), 0.0, 0)
        url = f"/v1/sessions/{body['session_id']}/messages"
        r = client.post(url, headers=auth, json={"messages": [{"role": "assistant", "content": "x"}] + FOLLOW_UP})
        assert r.status_code == 409 and r.json()["error"]["code"] == "answer_confirmed"
        assert "already holds the confirmed answer" in r.json()["error"]["message"]
        assert client.post(url, headers=auth, json={"messages": FOLLOW_UP}).status_code == 200


def test_a_separate_resonator_cache_catches_up_with_the_verified_tokens(tiny, other, tmp_path):
    anchor = Anchor(tiny, other)
    with client_for(anchor, tmp_path) as client:
        body, auth = create(client, MESSAGES)
        prompt = tiny.chat_ids(MESSAGES)
        truth = list(completions.decode(tiny, prompt, 12))
        answer = synced_turn(client, body, len(prompt), truth, 0.0, 0)
        assert answer == truth  # the anchor model's tokens, whatever the resonator model is
        r = client.get(body["hologram_url"], headers=auth)  # covers the verified tokens: they are fed now
        end = len(prompt) + len(answer) - 1
        assert r.status_code == 200 and load_hologram(r.content).meta["end"] == end
        r = client.post(f"/v1/sessions/{body['session_id']}/messages", headers=auth, json={"messages": FOLLOW_UP})
        assert r.status_code == 200 and r.headers["x-hpi-start"] == str(end)
        caches = client.app.state.store.get(body["session_id"], body["token"]).caches
        conv = caches.ids
        assert caches.anchor.get_seq_length() == caches.resonator.get_seq_length() == len(conv)
        fresh = DynamicCache(config=other.config)
        with torch.no_grad():
            other.model(input_ids=torch.tensor([conv]), cache=fresh, use_cache=True)
        for got, want in zip(caches.resonator.layers, fresh.layers):
            assert torch.allclose(got.keys, want.keys, atol=1e-5) and torch.allclose(got.values, want.values, atol=1e-5)
        truth2 = list(completions.decode(tiny, conv, 8))
        assert synced_turn(client, body, len(conv), truth2, 0.0, 0) == truth2


@pytest.mark.parametrize("model", ["tiny", pytest.param("smollm", marks=pytest.mark.real_model)])
def test_the_turn_after_an_answer_is_what_the_template_renders(request, model):
    lm = request.getfixturevalue(model)
    reply = {"role": "assistant", "content": "The exact KV cache."}
    prompt = lm.chat_ids(MESSAGES)
    answer = lm.tokenizer(reply["content"], add_special_tokens=False)["input_ids"]
    whole = lm.chat_ids(MESSAGES + [reply] + FOLLOW_UP)
    assert whole[:len(prompt) + len(answer)] == prompt + answer  # the reply tokenizes the same in place
    after = whole[len(prompt) + len(answer):]
    assert turns.next_turn_ids(lm, MESSAGES, answer, FOLLOW_UP) == after
    # An answer that ended with the end-of-turn token, as a generated one does, is not closed twice.
    assert after[0] in lm.eos_token_ids
    assert turns.next_turn_ids(lm, MESSAGES, answer + after[:1], FOLLOW_UP) == after[1:]
