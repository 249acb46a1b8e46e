"""What an answer may contain and where it ends, as functions of its tokens so far.

Anchor-only decoding (server/completions.py), the verification of drafts (server/verify.py)
and the reference resonator all choose each token with `AnswerRules.choose` and stop with
`AnswerRules.ended`, so they agree token for token. An answer ends at an end-of-turn token or
when its text contains one of the request's `stop` texts; the answer's text is then cut
before the first of them (protocol/SPEC.md, "Sampling").
"""

from __future__ import annotations

import numpy as np

from hpi.constraints import Constraint
from hpi.models import LoadedModel
from hpi.sampling import Sampling, adjust, pick


def cut(text: str, stops: tuple[str, ...]) -> tuple[str, bool]:
    """(text before the first stop text, whether there was one)."""
    at = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    return (text, False) if at < 0 else (text[:at], True)


def held(text: str, stops: tuple[str, ...]) -> int:
    """How many characters at the end of `text` could begin a stop text: a stream holds them back."""
    return max((n for s in stops for n in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:n])),
               default=0)


class AnswerRules:
    def __init__(self, lm: LoadedModel, sampling: Sampling):
        self.lm, self.sampling = lm, sampling
        self.eos = set(lm.eos_token_ids)
        self.constraint = Constraint(lm, sampling.response_format) if sampling.response_format else None

    def allowed(self, answer: list[int]) -> np.ndarray | None:
        return None if self.constraint is None else self.constraint.allowed(answer)

    def scores(self, logits, answer: list[int]) -> np.ndarray:
        """The logits [V] float32 after the bias, the penalties and the mask, for the token after `answer`."""
        return adjust(logits, self.sampling, answer, self.allowed(answer))

    def choose(self, logits, position: int, answer: list[int]) -> int:
        """The token at `position`, after the answer's tokens `answer`."""
        return pick(self.scores(logits, answer), self.sampling, position)

    def text(self, answer: list[int]) -> str:
        return self.lm.tokenizer.decode([t for t in answer if t not in self.eos], skip_special_tokens=True)

    def ended(self, answer: list[int]) -> bool:
        """Whether the answer is over: its last token ends a turn, or its text holds a stop text."""
        if answer and answer[-1] in self.eos:
            return True
        return bool(self.sampling.stop) and cut(self.text(answer), self.sampling.stop)[1]
