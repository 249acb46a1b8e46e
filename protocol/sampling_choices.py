"""Test vectors of the token choice with every sampling option (protocol/SPEC.md, "Sampling").

`python -m hpi.protocol.sampling_choices` rewrites the `choices` of protocol/sampling_vectors.json
from server/sampling.py; tests/test_sampling.py fails while the committed file differs, and the
page's client_web/sampling.js is checked against the same cases. The logits are small, exact
binary fractions, so no case depends on rounding of the inputs.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from hpi.sampling import Sampling, choose

VECTORS = Path(__file__).resolve().parent / "sampling_vectors.json"
VOCAB = 24

OPTIONS = [
    {},
    {"temperature": 0.7, "seed": 5},
    {"temperature": 1.0, "seed": 9, "top_k": 3},
    {"temperature": 1.3, "seed": 2, "top_p": 0.5},
    {"temperature": 1.0, "seed": 4, "top_k": 6, "top_p": 0.8},
    {"presence_penalty": 1.5, "frequency_penalty": 0.75},
    {"temperature": 0.9, "seed": 3, "presence_penalty": -0.5, "frequency_penalty": 1.25},
    {"logit_bias": {"3": 5.0, "7": -100.0, "11": 2.5}},
    {"temperature": 1.1, "seed": 8, "logit_bias": {"0": 3.0}, "top_p": 0.9, "frequency_penalty": 0.5},
]


def cases() -> list[dict]:
    rng = np.random.default_rng(20261129)
    out = []
    for i, opts in enumerate(OPTIONS):
        for j in range(3):
            logits = (rng.integers(-256, 256, VOCAB) / 64).astype(np.float32)  # exact in f32
            answer = rng.integers(0, VOCAB, int(rng.integers(0, 8))).tolist()
            allowed = None if j < 2 else rng.random(VOCAB) < 0.5
            if allowed is not None:
                allowed[int(np.argmax(logits))] = True  # never an empty mask
            position = int(rng.integers(0, 5000))
            s = Sampling.of(**opts)
            out.append({"logits": logits.tolist(), "options": opts, "answer": answer, "position": position,
                        "allowed": None if allowed is None else [int(k) for k in np.flatnonzero(allowed)],
                        "token": choose(logits, s, position, answer, allowed)})
    return out


def document() -> dict:
    v = json.loads(VECTORS.read_text())
    v["about"] = ("Counter-based sampling noise and the token choice (protocol/SPEC.md, Sampling). lowbias32: "
                  "x -> out (u32). uniform: float32 bit patterns of uniform(seed, position, token_ids). choices: "
                  "the token chosen from logits with options, after answer (the answer's tokens so far) at "
                  "position, allowed being a grammar's mask (token ids; null: all); written by "
                  "protocol/sampling_choices.py.")
    v["choices"] = cases()
    return v


def text() -> str:
    return json.dumps(document(), indent=1) + "\n"


if __name__ == "__main__":
    VECTORS.write_text(text())
