"""Verification confirms exactly the anchor's own tokens, whatever the drafts (greedy and sampled)."""

from __future__ import annotations

import random

import pytest
import torch

from hpi import completions
from hpi.anchor import Anchor, Caches
from hpi.answer_rules import AnswerRules
from hpi.sampling import GREEDY, Sampling
from hpi.verify import verify

MESSAGES = [{"role": "user", "content": "Draft a short answer about caches."}]


@pytest.fixture(scope="module")
def anchor(tiny):
    return Anchor(tiny)


def run(anchor, tiny, n: int, k: int, temperature: float, seed: int, drift: float) -> tuple[list[int], int, int]:
    """Confirm n tokens with drafts of k taken from the anchor-only answer, each corrupted with
    probability `drift`; return the confirmed tokens, the passes and the corrections."""
    prompt = tiny.chat_ids(MESSAGES)
    truth = list(completions.decode(tiny, prompt, n + k, Sampling(temperature, seed)))
    caches = Caches()
    anchor.prefill(caches, prompt)
    rng = random.Random(seed)
    passes = corrections = 0
    while len(caches.ids) - len(prompt) < n:
        at = len(caches.ids) - len(prompt)
        drafts = [t if rng.random() >= drift else (t + 1) % tiny.config.vocab_size for t in truth[at:at + k]]
        v = verify(tiny, caches, drafts, AnswerRules(tiny, Sampling(temperature, seed)), len(prompt))
        passes += 1
        corrections += v.corrected
        assert caches.anchor.get_seq_length() == len(caches.ids) - 1  # only the pending token lacks KV
    return caches.ids[len(prompt):len(prompt) + n], passes, corrections


@pytest.mark.parametrize("temperature,seed", [(0.0, 0), (1.0, 7)])
def test_confirmed_tokens_equal_the_anchor_alone(anchor, tiny, temperature, seed):
    truth = list(completions.decode(tiny, tiny.chat_ids(MESSAGES), 24, Sampling(temperature, seed)))
    n = len(truth)  # fewer when the random model ends its answer early: nothing follows an end token
    exact, passes, corrections = run(anchor, tiny, n, 6, temperature, seed, drift=0.0)
    assert exact == truth[:n]
    assert corrections == 0 and passes <= -(-n // 7) + 1  # k accepted + 1 confirmed per pass
    drifted, _, corrections = run(anchor, tiny, n, 6, temperature, seed, drift=0.3)
    assert drifted == truth[:n]
    assert corrections > 0


def test_wrong_drafts_are_corrected_one_token_per_pass(anchor, tiny):
    prompt = tiny.chat_ids(MESSAGES)
    truth = list(completions.decode(tiny, prompt, 4))
    caches = Caches()
    anchor.prefill(caches, prompt)
    v = verify(tiny, caches, [(truth[0] + 1) % tiny.config.vocab_size] * 5, AnswerRules(tiny, GREEDY), len(prompt))
    assert (v.accepted, v.token, v.corrected) == (0, truth[0], True)
    assert caches.ids[len(prompt):] == truth[:1] and caches.anchor.get_seq_length() == len(prompt)
    v = verify(tiny, caches, truth[1:3], AnswerRules(tiny, GREEDY), len(prompt))
    assert (v.accepted, v.token, v.corrected) == (2, truth[3], False)


def test_a_prefill_after_verification_feeds_the_pending_token_first(anchor, tiny):
    prompt = tiny.chat_ids(MESSAGES)
    truth = list(completions.decode(tiny, prompt, 4))
    caches = Caches()
    anchor.prefill(caches, prompt)
    verify(tiny, caches, truth[:2], AnswerRules(tiny, GREEDY), len(prompt))
    assert caches.pending == truth[2]
    turn = tiny.tokenizer("<|im_end|>\nmore", add_special_tokens=False)["input_ids"]
    logits = anchor.prefill(caches, turn)
    whole = prompt + truth[:3] + turn
    assert caches.ids == whole and caches.pending is None and caches.anchor.get_seq_length() == len(whole)
    fresh = Caches()
    assert torch.allclose(logits, anchor.prefill(fresh, whole), atol=1e-5)
    for got, want in zip(caches.anchor.layers, fresh.anchor.layers):
        assert torch.allclose(got.keys, want.keys, atol=1e-5) and torch.allclose(got.values, want.values, atol=1e-5)


def test_verify_needs_a_prefilled_session(tiny):
    with pytest.raises(ValueError, match="prefilled"):
        verify(tiny, Caches(), [1, 2], AnswerRules(tiny, GREEDY), 0)


def test_an_agreed_end_of_turn_ends_the_confirmed_answer(anchor, tiny, monkeypatch):
    prompt = tiny.chat_ids(MESSAGES)
    truth = list(completions.decode(tiny, prompt, 8))
    # Make a later token of the anchor's an end-of-turn token, as a real answer's last one is.
    end = next(i for i in range(1, len(truth)) if truth[i] not in truth[:i])
    monkeypatch.setattr(type(tiny), "eos_token_ids", property(lambda self: [truth[end]]))
    caches = Caches()
    anchor.prefill(caches, prompt)
    v = verify(tiny, caches, truth, AnswerRules(tiny, GREEDY), len(prompt))
    assert (v.accepted, v.token, v.corrected) == (end, truth[end], False)
    assert caches.ids[len(prompt):] == truth[:end + 1]
