"""OpenAI's API as clients call it: /v1/models and /v1/chat/completions, driven by the official `openai` client.

Every parameter the anchor honours is checked against `completions.decode` with the same Sampling (the
server-only path is that loop), plain and streamed; every one it refuses is refused by name.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import torch

from hpi import completions
from hpi.answer_rules import cut
from hpi.config import Settings
from hpi.openai_api import MAX_CHOICES, UNSUPPORTED_PARAMETERS, ChoiceText, completion_request
from hpi.sampling import GREEDY, Sampling

MESSAGES = [{"role": "user", "content": "Name three things a cache keeps."}]


@pytest.fixture(scope="module")
def client(tiny_server):
    base, _ = tiny_server
    return openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model(tiny):
    return tiny.model_id


def decoded(tiny, max_tokens: int, sampling: Sampling = GREEDY) -> tuple[str, list[int]]:
    """What the server-only path must answer: the text of `completions.decode`, its stop text cut, and its tokens."""
    ids = list(completions.decode(tiny, tiny.chat_ids(MESSAGES), max_tokens, sampling))
    text = tiny.tokenizer.decode([i for i in ids if i not in tiny.eos_token_ids], skip_special_tokens=True)
    return cut(text, sampling.stop)[0], ids


def streamed(client, **kwargs) -> tuple[list, dict[int, str]]:
    """The chunks of a streamed completion and each choice's text."""
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    texts: dict[int, str] = {}
    for c in chunks:
        for ch in c.choices:
            texts[ch.index] = texts.get(ch.index, "") + (ch.delta.content or "")
    return chunks, texts


# Models

def test_models_list_and_retrieve_in_openais_shape(client, tiny_server, model):
    _, anchor = tiny_server
    (m,) = client.models.list().data
    assert (m.id, m.object, m.owned_by) == (model, "model", "hpi") and isinstance(m.created, int)
    assert m.pack_hash == anchor.pack_hash and m.pack_url == f"/v1/models/{anchor.model_key}/pack"
    assert m.tokenizer_id == anchor.lm.tokenizer_id
    assert client.models.retrieve(model).id == model == client.models.retrieve(anchor.model_key).id
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("no-such-model")
    assert e.value.body["code"] == "unknown_model" and e.value.body["type"] == "invalid_request_error"
    assert e.value.body["param"] == "model"


def test_an_unknown_model_is_404_and_the_listed_ones_or_none_are_served(client, tiny_server, model):
    with pytest.raises(openai.NotFoundError, match="no-such-model") as e:
        client.chat.completions.create(model="no-such-model", messages=MESSAGES, max_tokens=2)
    assert (e.value.body["code"], e.value.body["param"]) == ("unknown_model", "model")
    assert client.chat.completions.create(model=tiny_server[1].model_key, messages=MESSAGES, max_tokens=2).choices
    r = httpx.post(f"{tiny_server[0]}/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 2})
    assert r.status_code == 200 and r.json()["model"] == model


# The answer, plain and streamed

def test_greedy_completion_equals_transformers_generate(client, tiny, model):
    r = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=24)
    ids = tiny.chat_ids(MESSAGES)
    out = tiny.model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False,
                              eos_token_id=tiny.eos_token_ids, pad_token_id=tiny.eos_token_ids[0])[0, len(ids):].tolist()
    assert r.choices[0].message.content == tiny.tokenizer.decode(out, skip_special_tokens=True)
    assert r.choices[0].message.role == "assistant" and r.choices[0].logprobs is None
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == len(out)
    assert r.choices[0].finish_reason == ("stop" if out[-1] in tiny.eos_token_ids else "length")
    short = client.chat.completions.create(model=model, messages=MESSAGES, max_completion_tokens=5, max_tokens=24)
    assert short.usage.completion_tokens == 5 and short.choices[0].finish_reason == "length"  # the newer name wins
    assert short.choices[0].message.content == decoded(tiny, 5)[0]


def test_streaming_sends_the_same_text(client, model):
    whole = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=24)
    chunks, texts = streamed(client, model=model, messages=MESSAGES, max_tokens=24)
    assert texts == {0: whole.choices[0].message.content}
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert all(c.usage is None for c in chunks)  # without stream_options.include_usage


# Each sampling option changes the answer as `completions.decode` with it does (and so is not ignored).
OPTIONS = {
    "seed": {"temperature": 1.0, "seed": 3},
    "top_p": {"temperature": 1.5, "seed": 3, "top_p": 0.3},
    "top_k": {"temperature": 1.5, "seed": 3, "top_k": 3},
    "presence_penalty": {"presence_penalty": 2.0},
    "frequency_penalty": {"frequency_penalty": 2.0},
    "logit_bias": {"logit_bias": {"42": 6.0, "98": -100}},
}


@pytest.mark.parametrize("name", OPTIONS)
def test_each_sampling_option_is_honoured_plain_and_streamed(client, tiny, model, name):
    fields = OPTIONS[name]
    top_k = fields.get("top_k")  # not OpenAI's: the client sends it as an extra field
    kwargs = {"model": model, "messages": MESSAGES, "max_tokens": 20, **{k: v for k, v in fields.items() if k != "top_k"},
              "extra_body": {"top_k": top_k} if top_k else None}
    want, ids = decoded(tiny, 20, Sampling.of(**fields))
    # the same answer without the option (another seed, for the seed)
    base = {k: v for k, v in fields.items() if k in ("temperature", "seed")} | ({"seed": 4} if name == "seed" else {})
    assert want != decoded(tiny, 20, Sampling.of(**base))[0], "the option changes nothing here: a weak test"
    r = client.chat.completions.create(**kwargs)
    assert r.choices[0].message.content == want and r.usage.completion_tokens == len(ids)
    assert streamed(client, **kwargs)[1] == {0: want}


def test_top_k_1_and_a_tiny_top_p_are_greedy(client, tiny, model):
    greedy = decoded(tiny, 16)[0]
    for extra in ({"top_k": 1}, {"top_p": 1e-6}):
        r = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=16, temperature=1.5, seed=9,
                                           extra_body=extra)
        assert r.choices[0].message.content == greedy, extra


def test_logit_bias_names_tokens_of_the_vocabulary(client, tiny, model):
    with pytest.raises(openai.UnprocessableEntityError, match="logit_bias"):
        client.chat.completions.create(model=model, messages=MESSAGES, logit_bias={str(tiny.config.vocab_size): 1})
    forced = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=5, logit_bias={"65": 100})
    assert forced.choices[0].message.content == tiny.tokenizer.decode([65] * 5)


# stop

def stop_case(tiny) -> tuple[str, str]:
    """A stop text inside the greedy answer (not at its start), and the answer it leaves."""
    full = decoded(tiny, 24)[0]
    stop = next(full[i:i + 2] for i in range(2, len(full) - 2) if "\ufffd" not in full[i:i + 2])
    return stop, cut(full, (stop,))[0]


def test_stop_ends_the_answer_before_the_stop_text(client, tiny, model):
    stop, want = stop_case(tiny)
    for stops in (stop, [stop], ["never in it", stop]):
        r = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=24, stop=stops)
        assert r.choices[0].message.content == want and r.choices[0].finish_reason == "stop"
        assert r.usage.completion_tokens == len(decoded(tiny, 24, Sampling.of(stop=stops))[1])
        chunks, texts = streamed(client, model=model, messages=MESSAGES, max_tokens=24, stop=stops)
        # what was sent is never taken back: the pieces add up to the cut answer, no stop text ever went out
        assert texts == {0: want} and chunks[-1].choices[0].finish_reason == "stop"


def test_a_stream_holds_back_what_could_begin_a_stop_text(tiny):
    ids = tiny.tokenizer("one two three four", add_special_tokens=False)["input_ids"]
    for stops, want in ((("thr",), "one two "), (("three x",), "one two three four"), (("our",), "one two three f")):
        text = ChoiceText(tiny, stops)
        sent = "".join(text.add(t) for t in ids)
        assert want.startswith(sent) and sent + text.finish() == want and text.stopped == (want != "one two three four")


# logprobs

def test_logprobs_are_the_models_log_softmax_after_the_requests_processing(client, tiny, model):
    bias = {"42": 3.0}
    r = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=12, logprobs=True, top_logprobs=4,
                                       logit_bias=bias)
    entries = r.choices[0].logprobs.content
    _, ids = decoded(tiny, 12, Sampling.of(logit_bias=bias))
    assert len(entries) == r.usage.completion_tokens == len(ids)
    prompt = tiny.chat_ids(MESSAGES)
    with torch.no_grad():
        logits = tiny.model(torch.tensor([prompt + ids])).logits[0, len(prompt) - 1:-1].double()
    logits[:, 42] += 3.0
    truth = torch.log_softmax(logits, dim=-1).numpy()
    for e, t, row in zip(entries, ids, truth):
        assert bytes(e.bytes).decode(errors="replace") == e.token
        assert abs(e.logprob - row[t]) < 1e-3
        assert len(e.top_logprobs) == 4 and e.top_logprobs[0].logprob == e.logprob  # greedy: the likeliest
        assert np.allclose([x.logprob for x in e.top_logprobs], np.sort(row)[::-1][:4], atol=1e-3)
    assert b"".join(bytes(e.bytes) for e in entries).decode(errors="replace") .startswith(
        r.choices[0].message.content[:1])
    chunks = list(client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=12, logprobs=True,
                                                 top_logprobs=4, logit_bias=bias, stream=True))
    streamed_entries = [e for c in chunks for ch in c.choices if ch.logprobs for e in ch.logprobs.content]
    assert [e.model_dump() for e in streamed_entries] == [e.model_dump() for e in entries]
    plain = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=3, logprobs=True)
    assert all(e.top_logprobs == [] for e in plain.choices[0].logprobs.content)


def test_logprobs_under_a_mask_name_only_allowed_rivals(client, model):
    schema = {"type": "object", "properties": {"a": {"type": "boolean"}}, "required": ["a"],
              "additionalProperties": False}
    r = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=24, logprobs=True, top_logprobs=20,
                                       response_format={"type": "json_schema",
                                                        "json_schema": {"name": "flag", "schema": schema}})
    first = r.choices[0].logprobs.content[0]
    assert first.token == "{" and first.logprob == 0.0 and len(first.top_logprobs) == 1  # nothing else may begin


# n

def test_n_choices_sample_with_seed_plus_index(client, tiny, model):
    kwargs = {"model": model, "messages": MESSAGES, "max_tokens": 10, "temperature": 1.0, "seed": 5}
    r = client.chat.completions.create(n=3, **kwargs)
    want = [decoded(tiny, 10, Sampling.of(1.0, 5 + i)) for i in range(3)]
    assert [c.message.content for c in r.choices] == [w[0] for w in want]
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert r.usage.completion_tokens == sum(len(w[1]) for w in want)
    assert r.usage.prompt_tokens == len(tiny.chat_ids(MESSAGES))
    chunks, texts = streamed(client, n=3, **kwargs)
    assert texts == {i: w[0] for i, w in enumerate(want)}
    assert sorted(ch.index for c in chunks for ch in c.choices if ch.finish_reason) == [0, 1, 2]
    with pytest.raises(openai.UnprocessableEntityError, match="n"):
        client.chat.completions.create(n=MAX_CHOICES + 1, **kwargs)


# stream_options

def test_include_usage_sends_a_last_chunk_with_the_usage(client, model):
    whole = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=8, n=2)
    chunks = list(client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=8, n=2, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert all(c.usage is None for c in chunks[:-1])
    with pytest.raises(openai.UnprocessableEntityError, match="stream_options"):
        client.chat.completions.create(model=model, messages=MESSAGES, stream_options={"include_usage": True})


# messages

def test_text_parts_and_the_developer_role(client, model):
    plain = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name three things."}]
    parts = [{"role": "developer", "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}]},
             {"role": "user", "content": [{"type": "text", "text": "Name three things."}]}]
    want = client.chat.completions.create(model=model, messages=plain, max_tokens=12).choices[0].message.content
    assert client.chat.completions.create(model=model, messages=parts, max_tokens=12).choices[0].message.content == want
    assert streamed(client, model=model, messages=parts, max_tokens=12)[1] == {0: want}
    image = {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}
    with pytest.raises(openai.BadRequestError, match="image_url") as e:
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": [image]}])
    assert (e.value.body["code"], e.value.body["param"]) == ("unsupported_parameter", "messages.0")
    with pytest.raises(openai.BadRequestError, match="tool"):
        client.chat.completions.create(model=model, messages=[{"role": "tool", "content": "4", "tool_call_id": "x"}])


def test_sessions_take_text_parts_and_the_developer_role_too(tiny_server, tiny):
    parts = [{"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
             {"role": "user", "content": "Name three things."}]
    r = httpx.post(f"{tiny_server[0]}/v1/sessions", json={"messages": parts})
    assert r.status_code == 201, r.text
    kept = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name three things."}]
    assert r.json()["n_tokens"] == len(tiny.chat_ids(kept))


# response_format

def test_json_schema_and_json_object_answer_json(client, tiny, model):
    schema = {"type": "object", "properties": {"a": {"type": "boolean"}}, "required": ["a"],
              "additionalProperties": False}
    rf = {"type": "json_schema", "json_schema": {"name": "flag", "schema": schema, "strict": True}}
    r = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=24, response_format=rf)
    assert r.choices[0].finish_reason == "stop" and set(json.loads(r.choices[0].message.content)) == {"a"}
    assert r.choices[0].message.content == decoded(tiny, 24, Sampling.of(response_format=rf))[0]
    assert streamed(client, model=model, messages=MESSAGES, max_tokens=24, response_format=rf)[1] == {
        0: r.choices[0].message.content}
    r = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=24,
                                       response_format={"type": "json_object"})
    assert r.choices[0].finish_reason == "stop" and isinstance(json.loads(r.choices[0].message.content), dict)
    cut_short = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=3, response_format=rf)
    assert cut_short.choices[0].finish_reason == "length"  # unfinished JSON: the answer ran out of tokens
    with pytest.raises(openai.UnprocessableEntityError, match="response_format"):
        client.chat.completions.create(model=model, messages=MESSAGES, response_format={"type": "xml"})


# Refusals

@pytest.mark.parametrize("name", sorted(UNSUPPORTED_PARAMETERS))
def test_every_parameter_not_honoured_is_refused_by_name(client, model, name):
    with pytest.raises(openai.BadRequestError, match=name) as e:
        client.chat.completions.create(model=model, messages=MESSAGES, extra_body={name: ["a value"]})
    assert e.value.body["code"] == "unsupported_parameter" and e.value.body["type"] == "invalid_request_error"
    assert e.value.body["param"] == name


def test_tools_through_the_client_and_null_parameters(client, model, tiny_server):
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    with pytest.raises(openai.BadRequestError, match="tools"):
        client.chat.completions.create(model=model, messages=MESSAGES, tools=[tool])
    r = httpx.post(f"{tiny_server[0]}/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 2,
                                                                    "tools": None, "user": None})
    assert r.status_code == 200  # null is absent


def test_every_parameter_of_the_client_is_honoured_or_refused_and_in_the_readme():
    from openai.types.chat.completion_create_params import CompletionCreateParamsBase
    sent = set(CompletionCreateParamsBase.__annotations__)
    fields = set(completion_request(Settings()).model_fields)
    assert sent <= fields, "a parameter of the client that is neither honoured nor refused by name"
    readme = Path(__file__).resolve().parent.parent.joinpath("README.md").read_text()
    table = readme.split("### OpenAI parameters")[1].split("\n## ")[0]
    assert [p for p in sorted(sent | fields) if f"`{p}`" not in table] == []


def test_bad_requests_get_clear_errors(client, model):
    with pytest.raises(openai.UnprocessableEntityError, match="max_tokens"):
        client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=0)
    with pytest.raises(openai.UnprocessableEntityError, match="temperature") as e:
        client.chat.completions.create(model=model, messages=MESSAGES, temperature=5.0)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.UnprocessableEntityError, match="temperature"):
        client.chat.completions.create(model=model, messages=MESSAGES, temperature=1e-30)
    with pytest.raises(openai.UnprocessableEntityError, match="top_logprobs"):
        client.chat.completions.create(model=model, messages=MESSAGES, top_logprobs=2)
    with pytest.raises(openai.UnprocessableEntityError, match="top_logprobs"):
        client.chat.completions.create(model=model, messages=MESSAGES, logprobs=True, top_logprobs=21)
    with pytest.raises(openai.UnprocessableEntityError, match="no_such_field"):
        client.chat.completions.create(model=model, messages=MESSAGES, extra_body={"no_such_field": 1})
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "word " * 6000}])
    assert e.value.status_code == 413 and "limit" in str(e.value)


def test_text_stream_never_splits_a_character(tiny):
    ids = tiny.tokenizer("naïve café — ünïcödé", add_special_tokens=False)["input_ids"]
    stream = completions.TextStream(tiny)
    pieces = [stream.add(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == tiny.tokenizer.decode(ids)
    assert not any("\ufffd" in p for p in pieces)
