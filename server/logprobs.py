"""OpenAI's `logprobs` of an answer's tokens: how likely the anchor model made each, and its likeliest rivals.

A token's log-probability is log_softmax of the logits after the request's processing (logit_bias, the
penalties over the answer so far, response_format's mask: server/sampling.py `adjust`) but before the
temperature and top-k/top-p, so it describes the model under the request's rules and is the same for every
temperature: the scores `completions.decode_steps` chose each token from, so they cost no forward of their own.
"""

from __future__ import annotations

import numpy as np
from hpi.models import LoadedModel
from hpi.pack import byte_decoder

MAX_TOP_LOGPROBS = 20  # OpenAI's limit
BYTE_OF = byte_decoder()  # byte-level BPE writes each byte as one of these characters


def token_bytes(lm: LoadedModel, token: int) -> bytes:
    """A token's own bytes: exact for a byte-level BPE vocabulary (half a character included), else its text's."""
    piece = lm.tokenizer.convert_ids_to_tokens(token)
    if isinstance(piece, str) and piece and all(c in BYTE_OF for c in piece):
        return bytes(BYTE_OF[c] for c in piece)
    return lm.tokenizer.decode([token]).encode()


def entry(lm: LoadedModel, token: int, logprob: float) -> dict:
    data = token_bytes(lm, token)
    return {"token": data.decode(errors="replace"), "logprob": logprob, "bytes": list(data)}


def logprob_entry(lm: LoadedModel, scores: np.ndarray, token: int, top: int) -> dict:
    """OpenAI's entry for `token`, chosen from `scores` (decode_steps'): {token, logprob, bytes, top_logprobs}."""
    scores = scores.astype(np.float64)
    finite = np.isfinite(scores)
    logp = scores - (scores[finite].max() + np.log(np.exp(scores[finite] - scores[finite].max()).sum()))
    # Ties in id order, as the token choice breaks them; a token the request forbids is no rival.
    rivals = [int(t) for t in np.argsort(-logp, kind="stable")[:top] if finite[t]]
    return {**entry(lm, token, float(logp[token])), "top_logprobs": [entry(lm, t, float(logp[t])) for t in rivals]}
