"""The anchor-only baseline, POST /v1/chat/completions, driven by the official `openai` client."""

from __future__ import annotations

import openai
import pytest
import torch

from hpi import completions
from hpi.sampling import Sampling

MESSAGES = [{"role": "user", "content": "Name three things a cache keeps."}]


@pytest.fixture(scope="module")
def client(tiny_server):
    base, _ = tiny_server
    return openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)


def test_greedy_completion_equals_transformers_generate(client, tiny):
    r = client.chat.completions.create(model="anchor", messages=MESSAGES, max_tokens=24)
    ids = tiny.chat_ids(MESSAGES)
    out = tiny.model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False,
                              eos_token_id=tiny.eos_token_ids, pad_token_id=tiny.eos_token_ids[0])[0, len(ids):].tolist()
    assert r.choices[0].message.content == tiny.tokenizer.decode(out, skip_special_tokens=True)
    assert r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == len(out)
    assert r.choices[0].finish_reason == ("stop" if out[-1] in tiny.eos_token_ids else "length")


def test_streaming_sends_the_same_text(client):
    whole = client.chat.completions.create(model="anchor", messages=MESSAGES, max_tokens=24)
    chunks = list(client.chat.completions.create(model="anchor", messages=MESSAGES, max_tokens=24, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_seeded_sampling_is_reproducible_and_follows_the_shared_hash(client, tiny):
    def sample(seed):
        return client.chat.completions.create(model="anchor", messages=MESSAGES, max_tokens=16,
                                              temperature=1.0, seed=seed).choices[0].message.content
    assert sample(3) == sample(3)
    assert sample(3) != sample(4)
    ids = list(completions.decode(tiny, tiny.chat_ids(MESSAGES), 16, Sampling(1.0, 3)))
    assert sample(3) == tiny.tokenizer.decode([i for i in ids if i not in tiny.eos_token_ids],
                                              skip_special_tokens=True)


def test_bad_requests_get_clear_errors(client, tiny_server):
    with pytest.raises(openai.UnprocessableEntityError, match="max_tokens"):
        client.chat.completions.create(model="anchor", messages=MESSAGES, max_tokens=0)
    with pytest.raises(openai.UnprocessableEntityError, match="temperature"):
        client.chat.completions.create(model="anchor", messages=MESSAGES, temperature=5.0)
    with pytest.raises(openai.UnprocessableEntityError, match="temperature"):
        client.chat.completions.create(model="anchor", messages=MESSAGES, temperature=1e-30)
    with pytest.raises(openai.UnprocessableEntityError, match="n"):
        client.chat.completions.create(model="anchor", messages=MESSAGES, n=2)
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(model="anchor", messages=[{"role": "user", "content": "word " * 6000}])
    assert e.value.status_code == 413 and "limit" in str(e.value)


def test_text_stream_never_splits_a_character(tiny):
    ids = tiny.tokenizer("naïve café — ünïcödé", add_special_tokens=False)["input_ids"]
    stream = completions.TextStream(tiny)
    pieces = [stream.add(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == tiny.tokenizer.decode(ids)
    assert not any("\ufffd" in p for p in pieces)
