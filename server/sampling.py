"""Token choice shared by the anchor and every resonator: greedy, or Gumbel-max with a shared seed,
after the request's logit processing (bias, penalties, a grammar's mask, top-k, top-p).

Sampling is made reproducible across machines by drawing the Gumbel noise from a
counter-based hash of (seed, position, token id) instead of a stateful generator, so the
anchor and a browser draw the same noise for the same position without exchanging any.
The hash is pure 32-bit integer arithmetic (bit-identical in numpy and WGSL); the uniform
it yields is exact in float32. Every processing step is a deterministic function of the
logits and the answer's tokens so far, so verification of a draft and anchor-only decoding
make the same choice. Spec: protocol/SPEC.md, "Sampling".
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

M1, M2 = np.uint32(0x7FEB352D), np.uint32(0x846CA68B)


@dataclass(frozen=True)
class Sampling:
    """How a conversation's answers are chosen. The defaults change nothing: greedy over raw logits.

    `stop` ends an answer at the first of these texts (protocol/SPEC.md); `response_format` is
    OpenAI's object as canonical JSON text (server/constraints.py turns it into a token mask).
    """
    temperature: float = 0.0
    seed: int = 0
    top_p: float = 1.0
    top_k: int = 0  # 0: every token
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias), ids ascending
    stop: tuple[str, ...] = ()
    response_format: str | None = None

    @property
    def pair(self) -> tuple[float, int]:
        """What a page's hello says: (temperature, seed)."""
        return self.temperature, self.seed

    def to_json(self) -> dict:
        d = asdict(self)
        d["logit_bias"] = {str(t): b for t, b in self.logit_bias}
        d["stop"] = list(self.stop)
        return d

    @classmethod
    def from_json(cls, d: dict | Sequence) -> Sampling:
        """From `to_json`'s dict, or the (temperature, seed) pair older transcripts hold."""
        if not isinstance(d, dict):
            return cls(float(d[0]), int(d[1]))
        return cls(**{**d, "logit_bias": tuple(sorted((int(t), float(b)) for t, b in d.get("logit_bias", {}).items())),
                      "stop": tuple(d.get("stop", ()))})

    @classmethod
    def of(cls, temperature: float = 0.0, seed: int = 0, top_p: float | None = None, top_k: int | None = None,
           presence_penalty: float | None = None, frequency_penalty: float | None = None,
           logit_bias: dict | None = None, stop: str | Sequence[str] | None = None,
           response_format: dict | None = None) -> Sampling:
        """From a request's fields (None: the default)."""
        return cls(float(temperature), int(seed), 1.0 if top_p is None else float(top_p), top_k or 0,
                   presence_penalty or 0.0, frequency_penalty or 0.0,
                   tuple(sorted((int(t), float(b)) for t, b in (logit_bias or {}).items())),
                   (stop,) if isinstance(stop, str) else tuple(stop or ()),
                   None if response_format is None else json.dumps(response_format, sort_keys=True,
                                                                   separators=(",", ":")))


GREEDY = Sampling()


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


def adjust(logits, s: Sampling, answer: Sequence[int] = (), allowed: np.ndarray | None = None) -> np.ndarray:
    """Logits [V] float32 after the bias, the penalties over the answer's tokens so far (OpenAI's:
    minus count * frequency_penalty, minus presence_penalty once for a token that occurred) and
    the mask (`allowed` [V] bool, a grammar's: the others become -inf)."""
    scores = np.array(logits, dtype=np.float32)
    for t, b in s.logit_bias:
        if t < scores.shape[0]:
            scores[t] += np.float32(b)
    if (s.presence_penalty or s.frequency_penalty) and len(answer):
        ids, counts = np.unique(np.asarray(answer, dtype=np.int64), return_counts=True)
        keep = ids < scores.shape[0]
        ids, counts = ids[keep], counts[keep].astype(np.float32)
        scores[ids] -= counts * np.float32(s.frequency_penalty) + np.float32(s.presence_penalty)
    if allowed is not None:
        scores[~allowed[:scores.shape[0]]] = -np.inf
    return scores


def nucleus(scaled: np.ndarray, top_k: int, top_p: float) -> np.ndarray:
    """The token ids kept by top-k, then top-p, of temperature-scaled scores [V].

    Order: score descending, id ascending on ties. Top-p keeps the shortest prefix whose
    sequential float32 sum of exp(score - max) reaches top_p times the sum over all the
    top-k ones (so at least one token)."""
    order = np.argsort(-scaled, kind="stable")
    if top_k:
        order = order[:top_k]
    if top_p < 1.0:
        e = np.exp(scaled[order] - scaled[order[0]])
        c = np.cumsum(e, dtype=np.float32)  # sequential, as every party sums
        order = order[:int(np.argmax(c >= np.float32(top_p) * c[-1])) + 1]
    return order


def choose(logits, s: Sampling = GREEDY, position: int = 0, answer: Sequence[int] = (),
           allowed: np.ndarray | None = None) -> int:
    """The next token: argmax of the adjusted logits (first index on ties), or, when T > 0,
    argmax(adjusted / T + Gumbel) over the tokens top-k and top-p keep."""
    return pick(adjust(logits, s, answer, allowed), s, position)


def pick(scores: np.ndarray, s: Sampling, position: int) -> int:
    """`choose` after `adjust`: the token from adjusted logits [V] float32."""
    if s.temperature <= 0:
        return int(np.argmax(scores))
    scaled = scores / np.float32(s.temperature)
    noisy = scaled + gumbel(s.seed, position, scaled.shape[-1])
    if s.top_k or s.top_p < 1.0:
        kept = np.sort(nucleus(scaled, s.top_k, s.top_p))  # ids ascending: ties go to the first, as below
        return int(kept[np.argmax(noisy[kept])])
    return int(np.argmax(noisy))
