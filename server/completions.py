"""Plain anchor-only decoding: the server-side baseline the resonator is measured against.

The anchor model decodes alone, one token per forward over its own KV cache, with the same
token choice and the same end as every resonator (server/answer_rules.py, server/sampling.py). Its
steps go through the model's batched forward (server/scheduler.py), so concurrent
completions share forwards with each other and with verification, as the reconciled path
does. `POST /v1/chat/completions` (server/openai_api.py) serves it in OpenAI's format.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import numpy as np

from hpi.anchor import prefill
from hpi.answer_rules import AnswerRules
from hpi.engine import Seq
from hpi.metrics import METRICS
from hpi.models import LoadedModel
from hpi.sampling import GREEDY, Sampling, pick
from hpi.trail import TrailCache


def decode(lm: LoadedModel, prompt_ids: list[int], max_tokens: int, sampling: Sampling = GREEDY,
           deadline: float | None = None, stop: threading.Event | None = None) -> Iterator[int]:
    """Token ids after the prompt, one at a time, until the answer ends (its last token
    included: an end token, or the one that completes a stop text), max_tokens, the `deadline`
    (time.monotonic) or `stop` being set (its client went away).

    The token at index i of the conversation is chosen with position i, as the resonator does.
    """
    for token, _ in decode_steps(lm, prompt_ids, max_tokens, sampling, deadline, stop):
        yield token


def decode_steps(lm: LoadedModel, prompt_ids: list[int], max_tokens: int, sampling: Sampling = GREEDY,
                 deadline: float | None = None, stop: threading.Event | None = None
                 ) -> Iterator[tuple[int, np.ndarray]]:
    """`decode`, each token with the scores it was chosen from: the logits [V] after the bias, the
    penalties and the mask (server/answer_rules.py `scores`), which logprobs describe."""
    rules = AnswerRules(lm, sampling)
    cache = TrailCache(config=lm.config)
    logits = prefill(lm, cache, prompt_ids)
    position = len(prompt_ids)
    answer: list[int] = []
    for _ in range(max_tokens):
        scores = rules.scores(logits.numpy(), answer)
        token = pick(scores, sampling, position)
        answer.append(token)
        METRICS.add("hpi_tokens_decoded_total")
        yield token, scores
        if rules.ended(answer) or (stop is not None and stop.is_set()) or (
                deadline is not None and time.monotonic() > deadline):
            return
        position += 1
        (rows,) = lm.scheduler.run([Seq(cache, [token], generated=True, all_logits=True)])
        logits = rows[-1]


class TextStream:
    """Incremental detokenization: the new text each token adds, never half a UTF-8 character."""

    def __init__(self, lm: LoadedModel):
        self.lm = lm
        self.ids: list[int] = []
        self.sent = ""

    def add(self, token: int) -> str:
        if token not in self.lm.eos_token_ids:
            self.ids.append(token)
        return self._new(final=False)

    def flush(self) -> str:
        """What is left at the end, an incomplete character included (as U+FFFD)."""
        return self._new(final=True)

    def _new(self, final: bool) -> str:
        text = self.lm.tokenizer.decode(self.ids, skip_special_tokens=True)
        if not final and text.endswith("\ufffd"):  # maybe an incomplete character: wait
            return ""
        new, self.sent = text[len(self.sent):], text
        return new
