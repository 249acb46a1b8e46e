"""Reconciled answers with a session's sampling options (stop, top-p/top-k, penalties, logit bias, a
JSON schema) are exactly the anchor-only answers with the same options.

The page here is the reference resonator (server/resonator.py) drafting from the session's
hologram with the same options (without the grammar's mask, as a page does), over the real
sync websocket."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from hpi import completions
from hpi.anchor import Anchor
from hpi.answer_rules import AnswerRules, cut
from hpi.protocol import frames
from hpi.resonator import Resonator
from hpi.sampling import Sampling
from tests.syncing import client_for, send

MESSAGES = [{"role": "user", "content": "List three facts about tide pools."}]
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                           "size": {"type": "integer"}},
          "required": ["name", "size"], "additionalProperties": False}


@pytest.fixture(scope="module")
def anchor(tiny):
    return Anchor(tiny)


@pytest.fixture(scope="module")
def client(anchor, tmp_path_factory):
    with client_for(anchor, tmp_path_factory.mktemp("sessions")) as c:
        yield c


def reconcile(client, anchor, options: dict, limit: int) -> tuple[list[int], dict]:
    """Create a session with `options`, draft its answer with the reference resonator, and return
    the confirmed tokens and the session's creation body."""
    r = client.post("/v1/sessions", json={"messages": MESSAGES, **options})
    assert r.status_code == 201, r.text
    return drive(client, anchor, r.json(), limit), r.json()


def drive(client, anchor, s: dict, limit: int, k: int = 6) -> list[int]:
    """Draft the answer of session `s` (its creation body) until it ends or `limit` tokens."""
    sampling = Sampling.from_json(s["sampling"])
    page_rules = AnswerRules(anchor.lm, replace(sampling, response_format=None))  # a page has no grammar
    res = Resonator(anchor.pack_bytes)
    res.add_hologram(client.get(s["hologram_url"], headers={"Authorization": f"Bearer {s['token']}"}).content)
    confirmed: list[int] = []
    with client.websocket_connect(f"/v1/sessions/{s['session_id']}/sync") as ws, torch.inference_mode():
        ready = send(ws, type="hello", token=s["token"], position=s["n_tokens"], chain=frames.GENESIS,
                     temperature=sampling.temperature, seed=sampling.seed)
        position, chain = ready["position"], ready["chain"]
        while not page_rules.ended(confirmed) and len(confirmed) < limit:
            drafts = res.generate(min(k, limit - len(confirmed)), rules=page_rules, answer=confirmed)
            v = send(ws, type="draft", position=position, chain=chain, tokens=drafts)
            assert v["type"] in ("ack", "correction"), v
            res.adopt(drafts, v["accepted"], v["token"])
            confirmed += drafts[:v["accepted"]] + [v["token"]]
            position, chain = v["position"], v["chain"]
    return confirmed


def alone(anchor, options: dict, limit: int) -> list[int]:
    """The anchor-only answer: what /v1/chat/completions decodes."""
    return list(completions.decode(anchor.lm, anchor.lm.chat_ids(MESSAGES), limit,
                                   Sampling.of(**options)))


@pytest.mark.parametrize("options", [
    {"temperature": 0.9, "seed": 4, "top_p": 0.8},
    {"temperature": 1.2, "seed": 9, "top_k": 5, "presence_penalty": 0.6, "frequency_penalty": 0.4},
    {"logit_bias": {"5": 4.0, "17": -100}, "frequency_penalty": 1.0},
], ids=["top_p", "top_k+penalties", "bias+greedy"])
def test_sampled_options_reconcile_to_the_anchor_only_answer(client, anchor, options):
    truth = alone(anchor, options, 20)
    confirmed, s = reconcile(client, anchor, options, 20)
    assert confirmed[:len(truth)] == truth
    assert Sampling.from_json(s["sampling"]) == Sampling.of(**options)


def test_a_stop_text_ends_the_reconciled_answer_where_the_anchor_ends(client, anchor):
    lm = anchor.lm
    free = alone(anchor, {"temperature": 0.8, "seed": 2}, 24)
    stop = lm.tokenizer.decode(free[8:10]).strip()[:6]  # a text the answer reaches, mid-way
    assert stop
    options = {"temperature": 0.8, "seed": 2, "stop": [stop, "\u2603never"]}
    truth = alone(anchor, options, 24)
    assert len(truth) < len(free)  # the stop ended it early
    confirmed, _ = reconcile(client, anchor, options, 24)
    assert confirmed == truth  # ends exactly there: nothing after the stop's token is confirmed
    text, found = cut(AnswerRules(lm, Sampling.of(**options)).text(confirmed), (stop,))
    assert found and stop not in text


def test_a_json_schema_answer_reconciles_exactly_though_the_page_drafts_without_the_grammar(client, anchor):
    options = {"response_format": {"type": "json_schema", "json_schema": {"name": "pool", "schema": SCHEMA}}}
    truth = alone(anchor, options, 48)
    confirmed, _ = reconcile(client, anchor, options, 48)
    assert confirmed == truth
    rules = AnswerRules(anchor.lm, Sampling.of(**options))
    if rules.ended(truth):  # the random model closed the object: it is the schema's
        value = json.loads(rules.text(truth))
        assert set(value) == {"name", "size"} and isinstance(value["size"], int)


def test_a_sessions_options_survive_a_restart(anchor, tmp_path):
    options = {"temperature": 1.0, "seed": 12, "top_k": 8, "stop": ["\n\n"], "logit_bias": {"3": 2.0}}
    with client_for(anchor, tmp_path) as before:
        s = before.post("/v1/sessions", json={"messages": MESSAGES, **options}).json()
    with client_for(anchor, tmp_path) as after:
        truth = alone(anchor, options, 16)
        assert drive(after, anchor, s, 16)[:len(truth)] == truth


def test_a_hello_with_other_sampling_than_the_session_was_created_with_is_refused(client, anchor):
    r = client.post("/v1/sessions", json={"messages": MESSAGES, "temperature": 0.5, "seed": 1, "stop": "x"})
    s = r.json()
    with client.websocket_connect(f"/v1/sessions/{s['session_id']}/sync") as ws:
        e = send(ws, type="hello", token=s["token"], position=s["n_tokens"], chain=frames.GENESIS,
                 temperature=0.0, seed=0)
    assert e["type"] == "error" and e["code"] == "sampling_mismatch"


@pytest.mark.parametrize("body,field", [
    ({"top_p": 0}, "top_p"), ({"top_k": -1}, "top_k"), ({"presence_penalty": 3}, "presence_penalty"),
    ({"logit_bias": {"999999999": 1}}, "logit_bias"), ({"logit_bias": {"a": 1}}, "logit_bias"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"), ({"stop": ""}, "stop"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
])
def test_bad_options_are_refused_naming_the_field(client, body, field):
    r = client.post("/v1/sessions", json={"messages": MESSAGES, **body})
    assert r.status_code == 422 and field in r.text, r.text
