"""Verification of drafted tokens against the anchor's own choices, in one forward pass.

A resonator drafts tokens; the anchor runs them through its exact model over the session's
exact KV cache and, position by position, makes the choice it would have made alone (greedy,
or Gumbel-max with the session's seed, after the session's logit processing:
server/answer_rules.py). It accepts the longest prefix of
drafts that matches, and its own choice right after that prefix is confirmed too: the
correction of the first mismatch, or one more token when every draft matched. So the
confirmed tokens are exactly the anchor's, whatever the drafts were.

The confirmed token after the accepted prefix has no KV yet (`Caches.pending`); the next
pass, or the prefill of a new turn, feeds it first. The cache is cropped back to the confirmed
tokens, so rejected drafts leave nothing behind. The pass goes through the model's batched
forward (server/scheduler.py) with the passes of other sessions, as rows of generated tokens:
each draft's logits are the bits plain decoding would compute (server/engine.py).

Apart from that forward and the KV bookkeeping, the acceptance rule is a pure function
(`accept`) of the logits, the drafts, the answer so far and the session's rules (whose masks
and ends are themselves functions of the answer's tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hpi.anchor import Caches
from hpi.answer_rules import AnswerRules
from hpi.engine import Seq
from hpi.metrics import METRICS
from hpi.models import LoadedModel


@dataclass
class Verification:
    accepted: int  # drafts accepted, a prefix
    token: int  # the anchor's own next token after them, confirmed as well
    corrected: bool  # `token` replaces a mismatching draft (else it follows all of them)


@torch.no_grad()
def verify(lm: LoadedModel, caches: Caches, drafts: list[int], rules: AnswerRules, answer_start: int) -> Verification:
    """Check `drafts` (the tokens after the confirmed ones) and confirm what the anchor chooses.
    The answer being drafted starts at position `answer_start`."""
    if caches.anchor is None or (caches.pending is None and caches.next_logits is None):
        raise ValueError("the session has no prefilled state to verify against")
    base = len(caches.ids)  # position of drafts[0]
    feed = ([caches.pending] if caches.pending is not None else []) + list(drafts)
    heads = []  # heads[i]: logits that choose the token at position base + i
    if caches.pending is None:
        heads.append(caches.next_logits)
    if feed:
        (logits,) = lm.scheduler.run([Seq(caches.anchor, feed, generated=True, all_logits=True)])
        heads.extend(logits)
    accepted, token, corrected = accept(heads, drafts, base, caches.ids[answer_start:], rules)
    fed_drafts = len(drafts) if feed else 0
    if fed_drafts > accepted:
        caches.anchor.crop(accepted - fed_drafts)  # a negative count removes that many from the end
    caches.ids.extend(list(drafts[:accepted]) + [token])
    caches.pending = token
    caches.next_logits = None
    METRICS.add("hpi_tokens_verified_total", len(drafts))
    METRICS.add("hpi_tokens_accepted_total", accepted)
    METRICS.add("hpi_tokens_corrected_total", int(corrected))
    METRICS.add("hpi_verification_passes_total")
    METRICS.observe("hpi_accepted_per_pass", accepted)
    for i in range(accepted):
        METRICS.observe("hpi_draft_position_accepted", i)
    return Verification(accepted, token, corrected)


def accept(heads: list[torch.Tensor], drafts: list[int], base: int, answer: list[int],
           rules: AnswerRules) -> tuple[int, int, bool]:
    """The acceptance rule: (drafts accepted, the anchor's token after them, whether it corrects a
    draft). `heads[i]` are the logits that choose the token at position base + i; `answer` the
    answer's confirmed tokens before it. A draft that ends the answer (an end-of-turn token, or
    one completing a stop text) and that the anchor agrees with is its own token: the answer
    ends there."""
    accepted = 0
    while True:  # the anchor's choice at each position, once, until a draft differs or ends the answer
        token = rules.choose(heads[accepted].numpy(), base + accepted, answer + drafts[:accepted])
        if accepted == len(drafts) or drafts[accepted] != token or rules.ended(answer + drafts[:accepted + 1]):
            return accepted, token, accepted < len(drafts) and drafts[accepted] != token
        accepted += 1
