"""The reference resonator: decode from a model pack and conversation holograms alone.

No transformers model is involved: weights come from the pack, the past from holograms.
It is the oracle the browser's WGSL engine is tested against, and the fidelity tool.
"""

from __future__ import annotations

import torch

from hpi.protocol.holo import Holo, content_hash, load_hologram
from hpi import hologram
from hpi.llama import KV, extend, forward
from hpi.pack import basis_from_pack, weights_from_pack
from hpi.answer_rules import AnswerRules
from hpi.sampling import GREEDY, Sampling, choose


class Resonator:
    def __init__(self, pack_data: bytes):
        holo = load_hologram(pack_data)
        self.pack_hash = content_hash(pack_data)
        self.meta = holo.meta
        self.weights = weights_from_pack(holo)
        self.basis = basis_from_pack(holo)
        self.past: list[KV] | None = None  # per layer [G, P, Dh]
        self.position = 0  # number of positions in `past`
        self.next_id: int | None = None  # the token to feed at `position`

    @property
    def eos_ids(self) -> list[int]:
        return self.meta["eos_ids"]

    def add_hologram(self, data: bytes | Holo) -> None:
        """Append a hologram segment; it must start where the state ends."""
        seg = hologram.read(data, self.basis, self.pack_hash)
        if seg.start != self.position:
            raise ValueError(f"hologram starts at {seg.start}, the resonator is at {self.position}")
        layers = list(zip(seg.keys, seg.values))
        self.past = extend(self.past, layers)
        self.position = seg.end
        self.next_id = seg.meta["next_id"]

    def step(self, token: int) -> torch.Tensor:
        """Feed `token` at the current position; return the logits [V] for the next one."""
        logits, new = forward(self.weights, torch.tensor([token]), torch.tensor([self.position]), self.past)
        self.past = extend(self.past, new)
        self.position += 1
        return logits[0]

    def generate(self, max_new: int, sampling: Sampling = GREEDY, stop_at_eos: bool = True,
                 rules: AnswerRules | None = None, answer: list[int] | None = None) -> list[int]:
        """Decode up to `max_new` tokens after the holograms; token i is chosen for position P + i.
        With `rules` (which hold the sampling, and need the model's tokenizer), the tokens chosen
        and where the answer ends are the anchor's; `answer`: its tokens confirmed before these."""
        if self.next_id is None:
            raise ValueError("no hologram loaded")
        out: list[int] = []
        before = list(answer or [])
        token = self.next_id
        for _ in range(max_new):
            logits = self.step(token).numpy()
            if rules is None:
                token = choose(logits, sampling, self.position)
            else:
                token = rules.choose(logits, self.position, before + out)
            out.append(token)
            if rules is not None and rules.ended(before + out) or stop_at_eos and token in self.eos_ids:
                break
        self.next_id = token
        return out

    def adopt(self, drafts: list[int], accepted: int, token: int) -> None:
        """Take a verdict on `drafts` (just generated): keep the K/V of the accepted ones, and
        continue from the anchor's `token`, as a page does (protocol/SPEC.md)."""
        if accepted == len(drafts):  # ack: the last draft has no K/V yet
            self.step(drafts[-1])
        else:  # correction: drop the K/V of the rejected drafts
            keep = self.position - (len(drafts) - 1 - accepted)
            self.past = [(k[:, :keep], v[:, :keep]) for k, v in self.past]
            self.position = keep
        self.next_id = token
