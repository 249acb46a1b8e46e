"""The page's engine (WGSL on SwiftShader) with sampling options: its confirmed answers equal the
anchor-only answers with the same options, its text is cut at a stop text, and no streamed delta
is ever cut later."""

from __future__ import annotations

import pytest

from hpi import completions
from hpi.answer_rules import AnswerRules, cut
from hpi.sampling import Sampling

pytestmark = pytest.mark.browser

MESSAGES = [{"role": "user", "content": "Name a few tide pool animals."}]

RUN = """async ([anchor, messages, options, n]) => {
  const { createEngine } = await import('/client/index.js');
  const engine = await createEngine({ anchor, draftSize: 4 });
  const chunks = [];
  const stream = await engine.chat.completions.create({ messages, max_tokens: n, stream: true, ...options });
  for await (const chunk of stream) chunks.push(chunk);
  let refused = null;
  try { await engine.chat.completions.create({ messages, tools: [] }); } catch (e) { refused = e.message; }
  return { chunks, refused };
}"""


def anchor_alone(anchor, options: dict, n: int) -> tuple[list[int], str]:
    sampling = Sampling.of(**options)
    ids = list(completions.decode(anchor.lm, anchor.lm.chat_ids(MESSAGES), n, sampling))
    return ids, cut(AnswerRules(anchor.lm, sampling).text(ids), sampling.stop)[0]


@pytest.mark.parametrize("options", [
    {"temperature": 0.9, "seed": 6, "top_p": 0.7, "presence_penalty": 0.5},
    {"logit_bias": {"11": 3.0}, "frequency_penalty": 0.8, "top_k": 4},
], ids=["top_p+presence", "bias+frequency+top_k"])
def test_the_page_confirms_the_anchor_only_answer_with_options(page, tiny_server, options):
    url, anchor = tiny_server
    got = page.evaluate(RUN, [url, MESSAGES, options, 14])
    ids, text = anchor_alone(anchor, options, 14)
    chunks = got["chunks"]
    confirmed = [t for c in chunks for t in c["hpi"]["tokens"]]
    assert confirmed[:len(ids)] == ids
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == text
    assert "tools" in got["refused"]
    stats = chunks[-1]["hpi"]["stats"]  # the page applies the options itself: most drafts stand
    assert stats["accepted"] >= stats["drafted"] // 2, stats


def test_a_stop_text_cuts_the_page_answer_where_the_anchor_stops(page, tiny_server):
    url, anchor = tiny_server
    free, _ = anchor_alone(anchor, {"temperature": 0.7, "seed": 3}, 20)
    stop = anchor.lm.tokenizer.decode(free[6:8]).strip()[:5]
    assert stop
    options = {"temperature": 0.7, "seed": 3, "stop": [stop]}
    ids, text = anchor_alone(anchor, options, 20)
    got = page.evaluate(RUN, [url, MESSAGES, options, 20])
    chunks = got["chunks"]
    assert [t for c in chunks for t in c["hpi"]["tokens"]] == ids  # nothing confirmed after the stop's token
    deltas = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert deltas == text and stop not in deltas
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
