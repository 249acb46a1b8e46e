"""Token choice shared by the anchor and every resonator: greedy, or Gumbel-max with a shared seed.

Sampling is made reproducible across machines by drawing the Gumbel noise from a
counter-based hash of (seed, position, token id) instead of a stateful generator, so the
anchor and a browser draw the same noise for the same position without exchanging any.
The hash is pure 32-bit integer arithmetic (bit-identical in numpy and WGSL); the uniform
it yields is exact in float32. Spec: protocol/SPEC.md, "Sampling".
"""

from __future__ import annotations

import numpy as np

M1, M2 = np.uint32(0x7FEB352D), np.uint32(0x846CA68B)


def lowbias32(x: np.ndarray) -> np.ndarray:
    """A 32-bit integer mixer (C. Wellons' lowbias32): every input bit affects every output bit."""
    x = np.asarray(x, dtype=np.uint32)
    with np.errstate(over="ignore"):
        x = x ^ (x >> np.uint32(16))
        x = x * M1
        x = x ^ (x >> np.uint32(15))
        x = x * M2
        return x ^ (x >> np.uint32(16))


def uniform(seed: int, position: int, token_ids: np.ndarray) -> np.ndarray:
    """U(0, 1) float32 per token id: ((h >> 9) * 2 + 1) / 2^24, so never 0 or 1 and exact."""
    with np.errstate(over="ignore"):
        h = lowbias32(np.uint32(seed & 0xFFFFFFFF))
        h = lowbias32(h + np.uint32(position & 0xFFFFFFFF))
        h = lowbias32(h + np.asarray(token_ids, dtype=np.uint32))
    return ((h >> np.uint32(9)).astype(np.float32) * np.float32(2) + np.float32(1)) / np.float32(1 << 24)


def gumbel(seed: int, position: int, vocab: int) -> np.ndarray:
    """Gumbel(0, 1) noise [vocab] in float32 for one position."""
    u = uniform(seed, position, np.arange(vocab, dtype=np.uint32))
    return -np.log(-np.log(u))


def choose(logits, temperature: float = 0.0, seed: int = 0, position: int = 0) -> int:
    """The next token: argmax (first index on ties), or argmax(logits / T + Gumbel) when T > 0."""
    scores = np.asarray(logits, dtype=np.float32)
    if temperature > 0:
        scores = scores / np.float32(temperature) + gumbel(seed, position, scores.shape[-1])
    return int(np.argmax(scores))
