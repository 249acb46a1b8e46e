"""Plain anchor-only decoding: the server-side baseline the resonator is measured against.

The anchor model decodes alone, one token per forward over its own KV cache, with the same
token choice as every resonator (server/sampling.py): greedy, or Gumbel-max with a seed. Its
steps go through the model's batched forward (server/scheduler.py), so concurrent
completions share forwards with each other and with verification, as the reconciled path
does. `POST /v1/chat/completions` (server/app.py) serves it in OpenAI's format.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

from hpi.anchor import prefill
from hpi.engine import Seq
from hpi.metrics import METRICS
from hpi.models import LoadedModel
from hpi.sampling import choose
from hpi.trail import TrailCache


def decode(lm: LoadedModel, prompt_ids: list[int], max_tokens: int, temperature: float = 0.0,
           seed: int = 0, deadline: float | None = None, stop: threading.Event | None = None) -> Iterator[int]:
    """Token ids after the prompt, one at a time, until an end token (included), max_tokens,
    the `deadline` (time.monotonic) or `stop` being set (its client went away).

    The token at index i of the conversation is chosen with position i, as the resonator does.
    """
    cache = TrailCache(config=lm.config)
    logits = prefill(lm, cache, prompt_ids)
    eos = set(lm.eos_token_ids)
    position = len(prompt_ids)
    for _ in range(max_tokens):
        token = choose(logits.numpy(), temperature, seed, position)
        METRICS.add("hpi_tokens_decoded_total")
        yield token
        if token in eos or (stop is not None and stop.is_set()) or (
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
