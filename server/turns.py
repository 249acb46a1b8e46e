"""A new turn after an answer synced token by token: what the chat template puts after the answer.

The anchor holds a synced answer as the exact ids it confirmed. Rendering the conversation
again from the answer's text could tokenize it differently, so only the text after the
answer is rendered, with the model's own chat template: the end of the assistant turn, the
new messages and the generation prompt. It is the text that follows a placeholder answer.
"""

from __future__ import annotations

import secrets

from hpi.answer_rules import cut
from hpi.models import LoadedModel, ModelError


def next_turn_ids(lm: LoadedModel, history: list[dict], answer_ids: list[int], messages: list[dict]) -> list[int]:
    """The ids that follow `answer_ids` (the assistant's reply to `history`) to open `messages`' turn."""
    # A fresh random placeholder cannot occur in any message, so the split below is unambiguous.
    placeholder = f"\ue000{secrets.token_hex(8)}\ue000"
    text = lm.tokenizer.apply_chat_template(history + [{"role": "assistant", "content": placeholder}] + messages,
                                            tokenize=False, add_generation_prompt=True)
    if text.count(placeholder) != 1:
        raise ModelError(f"the chat template of {lm.path} does not render an assistant message verbatim, "
                         "so the turn after a synced answer cannot be rendered")
    ids = lm.tokenizer(text.split(placeholder)[1], add_special_tokens=False)["input_ids"]
    # A generated answer usually ends with the end-of-turn token the template would add.
    if ids and answer_ids and ids[0] == answer_ids[-1] and ids[0] in lm.eos_token_ids:
        ids = ids[1:]
    return ids


def answer_text(lm: LoadedModel, answer_ids: list[int], stops: tuple[str, ...] = ()) -> str:
    """The answer as the transcript keeps it: its text without special tokens, cut before a stop text
    (its tokens stay in the conversation as confirmed)."""
    return cut(lm.tokenizer.decode(answer_ids, skip_special_tokens=True), stops)[0]
