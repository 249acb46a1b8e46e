"""Constrained output: OpenAI's `response_format` as a token mask, by llguidance.

llguidance compiles a JSON schema (or "any JSON object") into a grammar over the model's own
tokenizer and says, after any tokens, which token ids may come next. The mask is a
deterministic function of the answer's tokens so far, so anchor-only decoding and the
verification of drafts (which moves back and forth over drafted tokens) apply the same one.
"""

from __future__ import annotations

import json

import llguidance
import llguidance.hf
import numpy as np

from hpi.models import LoadedModel

# Bounds on what one request's schema may make the compiler build (llguidance allows 500 000);
# a schema past them is refused with the compiler's reason.
LIMITS = llguidance.LLParserLimits(max_grammar_size=200_000)


class GrammarError(ValueError):
    """A response_format llguidance cannot compile; its message says why."""


_TOKENIZERS: dict[tuple, llguidance.LLTokenizer] = {}


def _tokenizer(lm: LoadedModel) -> llguidance.LLTokenizer:
    """The model's tokenizer as llguidance sees it (about a second to build: once per model)."""
    key = (lm.tokenizer_id, lm.config.vocab_size, tuple(lm.eos_token_ids))
    if key not in _TOKENIZERS:
        _TOKENIZERS[key] = llguidance.hf.from_tokenizer(lm.tokenizer, n_vocab=lm.config.vocab_size,
                                                        eos_token=lm.eos_token_ids)
    return _TOKENIZERS[key]


def grammar(response_format: dict) -> str | None:
    """llguidance's grammar for OpenAI's response_format, or None for plain text."""
    kind = response_format.get("type")
    if kind == "text":
        return None
    schema = {"type": "object"} if kind == "json_object" else response_format.get("json_schema", {}).get("schema")
    if kind in ("json_object", "json_schema"):
        try:  # compact JSON: whitespace between tokens would only let a model ramble
            return llguidance.LLMatcher.grammar_from_json_schema(schema or {"type": "object"},
                                                                  defaults={"whitespace_flexible": False})
        except ValueError as e:
            raise GrammarError(f"response_format.json_schema.schema is not a JSON schema: {str(e)[:200]}") from None
    raise GrammarError(f"response_format type {kind!r} is not one of text, json_object, json_schema")


def check(lm: LoadedModel, response_format: dict) -> None:
    """Refuse, with the compiler's reason, a response_format that does not compile."""
    g = grammar(response_format)
    if g is not None:
        failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(g, _tokenizer(lm), limits=LIMITS)
        if failed:
            raise GrammarError(f"response_format does not compile: {'; '.join(messages)[:300]}")


class Constraint:
    """The tokens a response_format allows after an answer's tokens."""

    def __init__(self, lm: LoadedModel, response_format_json: str):
        g = grammar(json.loads(response_format_json))
        tok = _tokenizer(lm)
        self.vocab = lm.config.vocab_size
        self.matcher = llguidance.LLMatcher(tok, g, limits=LIMITS) if g is not None else None
        self.consumed: list[int] = []  # the tokens the matcher has taken, in order

    def allowed(self, answer: list[int]) -> np.ndarray | None:
        """[V] bool: which tokens may follow `answer` (None: any)."""
        if self.matcher is None:
            return None
        self._move_to(answer)
        bits = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)
        return np.unpackbits(bits, bitorder="little")[:self.vocab].astype(bool)

    def _move_to(self, answer: list[int]) -> None:
        same = 0
        while same < min(len(answer), len(self.consumed)) and answer[same] == self.consumed[same]:
            same += 1
        if same < len(self.consumed):
            self.matcher.rollback(len(self.consumed) - same)
            del self.consumed[same:]
        for t in answer[same:]:
            # Only tokens the mask allowed are ever confirmed; a forbidden one would put the
            # matcher in an error state it never leaves, so it is not consumed at all.
            if self.matcher.validate_tokens([t]) != 1:
                break
            self.matcher.consume_token(t)
            self.consumed.append(t)
