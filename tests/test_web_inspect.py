"""The page's attention view shows what POST /v1/capture returns for the last answer."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from tests.test_web_page import PROMPT, Page

pytestmark = pytest.mark.browser


def test_the_attention_view_draws_the_anchors_weights_and_peaks(browser, tiny_server):
    base, _ = tiny_server
    context = browser.new_context()
    try:
        p = Page(context, base, "?sync=4")
        p.open()
        p.ask(PROMPT, 10)
        p.page.click("#inspect summary")
        p.page.fill("#layer", "1")
        p.page.fill("#head", "2")
        p.page.click("#show-attention")
        p.page.wait_for_function("window.hpi.attention !== undefined", timeout=30_000)
        shown = p.page.evaluate("() => window.hpi.attention")
        conv = p.page.evaluate("() => window.hpi.conv")
        answer = conv["turns"][-1]
        assert (shown["start"], shown["end"]) == (answer["start"], answer["start"] + len(answer["ids"]))
        r = httpx.post(f"{base}/v1/capture", timeout=60, headers={"Authorization": f"Bearer {conv['session']['token']}"},
                       json={"session_id": conv["session"]["id"], "layers": [1], "heads": [2],
                             "states": ["attn.hook_pattern"], "start": shown["start"], "end": shown["end"]})
        want = r.json()
        assert np.array_equal(np.array(shown["rows"]), np.array(want["tensors"]["blocks.1.attn.hook_pattern"]["data"][0]))
        assert shown["peaks"] == want["peaks"]["attention"]["positions"] != []
        n = shown["end"] - shown["start"]
        assert p.page.locator("#attention-tokens span").count() == n
        assert p.page.locator("#attention-tokens span.peak").count() == len(shown["peaks"])
        assert p.page.evaluate("() => document.getElementById('attention').width") >= 2 * n
        assert not p.errors, p.errors
    finally:
        context.close()
