"""The anchor on the real default model (SmolLM2-135M-Instruct, packaged GGUF)."""

from pathlib import Path

import numpy as np
import pytest
import torch

from hpi.protocol.holo import load_hologram
from hpi import hologram
from hpi.anchor import Caches
from hpi.llama import extend, forward, weights_from_hf
from hpi.pack import LINEAR, weights_from_pack
from hpi.resonator import Resonator

pytestmark = pytest.mark.real_model
REPO = Path(__file__).resolve().parent.parent
# Threshold for the default codec on these prompts; the benchmark (bench/fidelity.py)
# measures it on 24 held-out texts. Below this, something broke, not just drifted.
MIN_AGREEMENT = 0.85


def prompts(lm, n_tokens=400):
    texts = [(REPO / "protocol" / "SPEC.md").read_text(), (REPO / "server" / "spectral.py").read_text(),
             (REPO / "server" / "pack.py").read_text()]
    out = []
    for text in texts:
        body = lm.tokenizer.decode(lm.tokenizer(text, add_special_tokens=False)["input_ids"][:n_tokens])
        out.append(lm.chat_ids([{"role": "user", "content": "Summarise this:\n" + body}]))
    return out


def test_default_model_and_chat_template(smollm):
    c = smollm.config
    assert (c.model_type, c.num_hidden_layers, c.num_key_value_heads, c.vocab_size) == ("llama", 30, 3, 49152)
    ids = smollm.chat_ids([{"role": "user", "content": "Hi"}])
    text = smollm.tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>user\nHi<|im_end|>\n"
                                                                       "<|im_start|>assistant\n")
    assert smollm.tokenizer.convert_tokens_to_ids("<|im_end|>") in smollm.eos_token_ids


def test_pack_carries_exactly_the_anchor_weights(smollm_anchor):
    holo = load_hologram(smollm_anchor.pack_bytes)
    assert holo.meta["weights"]["layers.0.wq"] == "q4_1" and holo.meta["weights"]["embed"] == "q8_0"
    packed, exact = weights_from_pack(holo), weights_from_hf(smollm_anchor.lm.model)
    assert torch.equal(packed.embed, exact.embed)
    for lp, le in zip(packed.layers, exact.layers):
        for name in LINEAR:
            assert torch.equal(getattr(lp, name), getattr(le, name)), name
    assert len(smollm_anchor.pack_bytes) < 110e6  # Q4_1 linears + Q8_0 embedding + codec bases


def test_hologram_decode_agrees_with_the_exact_cache(smollm_anchor):
    lm = smollm_anchor.lm
    w = weights_from_hf(lm.model)
    agreements, ratios = [], []
    for ids in prompts(lm):
        caches = Caches()
        smollm_anchor.prefill(caches, ids)
        data = smollm_anchor.hologram_bytes(caches)
        seg = hologram.read(data, smollm_anchor.basis, smollm_anchor.pack_hash)
        end = len(ids) - 1
        exact = [(layer.keys[0, :, :end], layer.values[0, :, :end]) for layer in caches.anchor.layers]
        # the exact model's own greedy continuation, then one teacher-forced pass over the hologram
        seq, past = [ids[-1]], exact
        for pos in range(end, end + 32):
            logits, new = forward(w, torch.tensor(seq[-1:]), torch.tensor([pos]), past)
            past = extend(past, new)
            seq.append(int(logits[0].argmax()))
        logits, _ = forward(w, torch.tensor(seq[:-1]), torch.arange(end, end + 32), list(zip(seg.keys, seg.values)))
        agreements.append(float((logits.argmax(-1) == torch.tensor(seq[1:])).float().mean()))
        ratios.append(2 * 2 * seg.keys.numel() / len(data))
    assert np.mean(agreements) >= MIN_AGREEMENT, agreements
    assert min(ratios) > 2.5, ratios


def test_resonator_from_pack_and_hologram_matches_the_anchor(smollm_anchor):
    lm = smollm_anchor.lm
    ids = lm.chat_ids([{"role": "user", "content": "What is the capital of France? Answer in one word."}])
    caches = Caches()
    smollm_anchor.prefill(caches, ids)
    res = Resonator(smollm_anchor.pack_bytes)
    res.add_hologram(smollm_anchor.hologram_bytes(caches))
    got = res.generate(8)
    out = lm.model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)
    want = out[0, len(ids):].tolist()
    assert got[:4] == want[:4], (lm.tokenizer.decode(got), lm.tokenizer.decode(want))
