"""The reference resonator decodes from a pack and holograms alone, and samples reproducibly."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from hpi import hologram
from hpi.anchor import Anchor, Caches
from hpi.llama import extend, forward
from hpi.resonator import Resonator
from hpi.spectral import CodecParams
from hpi.sampling import Sampling, choose, gumbel, lowbias32, uniform

VECTORS = Path(__file__).resolve().parent.parent / "protocol" / "sampling_vectors.json"


def test_sampling_matches_the_shared_vectors():
    v = json.loads(VECTORS.read_text())
    for case in v["lowbias32"]:
        assert int(lowbias32(np.uint32(case["x"]))) == case["out"]
    for case in v["uniform"]:
        u = uniform(case["seed"], case["position"], np.array(case["token_ids"], np.uint32))
        assert u.view(np.uint32).tolist() == case["bits"]


def test_uniform_is_strictly_inside_0_1_and_exact_in_f32():
    u = uniform(7, 3, np.arange(200_000, dtype=np.uint32))
    assert u.dtype == np.float32 and u.min() > 0 and u.max() < 1
    assert np.all((u * (1 << 24)).astype(np.int64) % 2 == 1)  # odd multiples of 2^-24


def test_gumbel_max_samples_the_softmax():
    logits = np.array([2.0, 1.0, 0.0, -1.0], np.float32)
    want = np.exp(logits) / np.exp(logits).sum()
    n = 20_000
    picks = np.bincount([choose(logits, Sampling(1.0, 11), p) for p in range(n)], minlength=4) / n
    assert np.abs(picks - want).max() < 0.015  # about 4 standard errors at n = 20000
    hot = np.bincount([choose(logits, Sampling(0.25, 11), p) for p in range(2000)], minlength=4)
    assert hot[0] > 0.95 * 2000  # low temperature concentrates on the argmax


def test_sampling_is_a_function_of_seed_and_position():
    logits = np.zeros(1000, np.float32)
    a = [choose(logits, Sampling(1.0, 1), p) for p in range(50)]
    assert a == [choose(logits, Sampling(1.0, 1), p) for p in range(50)]
    assert a != [choose(logits, Sampling(1.0, 2), p) for p in range(50)]
    assert np.array_equal(gumbel(1, 5, 10), gumbel(1, 5, 10))
    assert choose(np.array([1.0, 3.0, 3.0])) == 1  # greedy ties go to the first index


# The tiny random model's logits are nearly flat, so any coding error flips its argmax:
# here the resonator is checked against the same math over the hologram's decoded K/V
# (its plumbing: positions, segments, first token), and a fine step keeps that K/V close
# to the anchor's. The codec's fidelity is measured on the real model
# (tests/test_real_model.py, bench/fidelity.py).
NEAR_LOSSLESS = CodecParams(key_step=0.01, value_step=0.01)


@pytest.fixture(scope="module")
def anchor(tiny):
    return Anchor(tiny, codec=NEAR_LOSSLESS, calibration_tokens=512)


def greedy_over(res: Resonator, past, first: int, start: int, n: int) -> list[int]:
    """Greedy tokens of the pack's weights over a given past K/V, written out step by step."""
    out, tok = [], first
    for pos in range(start, start + n):
        logits, new = forward(res.weights, torch.tensor([tok]), torch.tensor([pos]), past)
        past = extend(past, new)
        tok = int(logits[0].argmax())
        out.append(tok)
    return out


def test_resonator_follows_the_exact_decode(anchor, tiny):
    caches = Caches()
    ids = tiny.chat_ids([{"role": "user", "content": "The resonator decodes from the hologram. " * 6}])
    anchor.prefill(caches, ids)
    res = Resonator(anchor.pack_bytes)
    res.add_hologram(anchor.hologram_bytes(caches))
    assert res.position == len(ids) - 1 and res.next_id == ids[-1]
    got = res.generate(24, stop_at_eos=False)
    seg = hologram.read(anchor.hologram_bytes(caches), anchor.basis)
    end = len(ids) - 1
    assert got == greedy_over(res, list(zip(seg.keys, seg.values)), ids[-1], end, 24)
    exact = torch.stack([layer.keys[0, :, :end] for layer in caches.anchor.layers])
    assert float((seg.keys - exact).abs().max()) < 0.05 * float(exact.abs().max())


def test_delta_holograms_tile_the_conversation(anchor, tiny):
    caches = Caches()
    first = tiny.chat_ids([{"role": "user", "content": "first turn " * 10}])
    anchor.prefill(caches, first)
    h1 = anchor.hologram_bytes(caches)
    turns = [{"role": "user", "content": "first turn " * 10}, {"role": "assistant", "content": "ok"},
             {"role": "user", "content": "second turn"}]
    full = tiny.chat_ids(turns)
    assert full[:len(first)] == first
    anchor.prefill(caches, full[len(first):])
    h2 = anchor.hologram_bytes(caches, start=len(first) - 1)
    res = Resonator(anchor.pack_bytes)
    with pytest.raises(ValueError, match="starts at"):
        res.add_hologram(h2)
    res.add_hologram(h1)
    res.add_hologram(h2)
    assert res.position == len(full) - 1 and res.next_id == full[-1]
    one = Resonator(anchor.pack_bytes)
    one.add_hologram(anchor.hologram_bytes(caches))
    # The two tilings code different tokens exactly (each segment keeps its own recent tail),
    # so they agree to the codec's error, not bit for bit. Tokens are not compared: the tiny
    # model's logits are nearly flat, and one flipped argmax sends greedy decoding elsewhere.
    for (k1, v1), (k2, v2) in zip(res.past, one.past):
        assert float((k1 - k2).abs().max()) < 0.05 * float(k2.abs().max())
        assert float((v1 - v2).abs().max()) < 0.05 * float(v2.abs().max())
    a, b = res.step(res.next_id), one.step(one.next_id)
    assert float((a - b).abs().max()) < 0.05 * float(b.abs().max())


def test_seeded_sampling_is_reproducible(anchor, tiny):
    caches = Caches()
    anchor.prefill(caches, tiny.chat_ids([{"role": "user", "content": "sample me"}]))
    holo = anchor.hologram_bytes(caches)
    runs = []
    for seed in (5, 5, 6):
        res = Resonator(anchor.pack_bytes)
        res.add_hologram(holo)
        runs.append(res.generate(16, Sampling(1.0, seed), stop_at_eos=False))
    assert runs[0] == runs[1] and runs[0] != runs[2]


def test_resonator_refuses_a_hologram_of_another_pack(anchor, tiny):
    caches = Caches()
    anchor.prefill(caches, tiny.chat_ids([{"role": "user", "content": "hi"}]))
    other = Anchor(tiny, codec=NEAR_LOSSLESS, calibration_tokens=256)  # another calibration: another pack
    with pytest.raises(ValueError, match="built for pack"):
        Resonator(other.pack_bytes).add_hologram(anchor.hologram_bytes(caches))
