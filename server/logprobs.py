"""OpenAI's `logprobs` of an answer's tokens: how likely the anchor model made each, and its likeliest rivals.

A token's log-probability is log_softmax of the logits after the request's processing (logit_bias, the
penalties over the answer so far, response_format's mask: server/sampling.py `adjust`) but before the
temperature and top-k/top-p, so it describes the model under the request's rules and is the same for every
temperature. The tokens are the ones `completions.decode` chose; a `Scorer` follows them over a cache of its
own (a second forward per token, paid by the requests that ask for logprobs), so decoding itself stays the
one shared loop of server/completions.py.
"""

from __future__ import annotations

import numpy as np
from transformers.convert_slow_tokenizer import bytes_to_unicode

from hpi.anchor import prefill
from hpi.answer_rules import AnswerRules
from hpi.engine import Seq
from hpi.models import LoadedModel
from hpi.sampling import Sampling, adjust
from hpi.trail import TrailCache

MAX_TOP_LOGPROBS = 20  # OpenAI's limit
BYTE_OF = {c: b for b, c in bytes_to_unicode().items()}  # byte-level BPE writes each byte as one of these characters


def token_bytes(lm: LoadedModel, token: int) -> bytes:
    """A token's own bytes: exact for a byte-level BPE vocabulary (half a character included), else its text's."""
    piece = lm.tokenizer.convert_ids_to_tokens(token)
    if isinstance(piece, str) and piece and all(c in BYTE_OF for c in piece):
        return bytes(BYTE_OF[c] for c in piece)
    return lm.tokenizer.decode([token]).encode()


def entry(lm: LoadedModel, token: int, logprob: float) -> dict:
    data = token_bytes(lm, token)
    return {"token": data.decode(errors="replace"), "logprob": logprob, "bytes": list(data)}


class Scorer:
    """The logprobs entry of each token of an answer, in order, after `prompt_ids`."""

    def __init__(self, lm: LoadedModel, prompt_ids: list[int], sampling: Sampling, top: int):
        self.lm, self.sampling, self.top = lm, sampling, top
        self.rules = AnswerRules(lm, sampling)
        self.cache = TrailCache(config=lm.config)
        self.logits = prefill(lm, self.cache, prompt_ids).numpy()
        self.answer: list[int] = []

    def add(self, token: int) -> dict:
        """OpenAI's entry for the answer's next token: {token, logprob, bytes, top_logprobs}."""
        if self.answer:  # the logits after the previous token, only now that they are needed
            (rows,) = self.lm.scheduler.run([Seq(self.cache, [self.answer[-1]], generated=True, all_logits=True)])
            self.logits = rows[-1].numpy()
        scores = adjust(self.logits, self.sampling, self.answer, self.rules.allowed(self.answer)).astype(np.float64)
        finite = np.isfinite(scores)
        logprobs = scores - (scores[finite].max() + np.log(np.exp(scores[finite] - scores[finite].max()).sum()))
        self.answer.append(token)
        # Ties in id order, as the token choice breaks them; a token the request forbids is no rival.
        rivals = [int(t) for t in np.argsort(-logprobs, kind="stable")[:self.top] if finite[t]]
        return {**entry(self.lm, token, float(logprobs[token])),
                "top_logprobs": [entry(self.lm, t, float(logprobs[t])) for t in rivals]}
