"""End to end: the page drafts on the GPU, the anchor verifies over the websocket, and the
answer is exactly the anchor-only answer (the tiny resonator disagrees often, so corrections
are exercised)."""

from __future__ import annotations

import pytest

from server import completions
from tests.test_web_page import PROMPT, Page

pytestmark = pytest.mark.browser


@pytest.mark.parametrize("drift", ["0", "1"])
def test_verified_answer_equals_the_anchor_alone(browser, tiny_server, tiny, drift):
    base, _ = tiny_server
    context = browser.new_context()
    try:
        p = Page(context, base)
        p.page.goto(f"{base}/client/?sync=4&drift={drift}")
        p.page.wait_for_function("window.hpi && window.hpi.ready", timeout=60_000)
        p.page.evaluate("() => window.hpi.ready")
        p.ask(PROMPT, 16)
        got = p.tokens()
        want = list(completions.decode(tiny, tiny.chat_ids([{"role": "user", "content": PROMPT}]), len(got)))
        assert got == want
        assert len(got) >= 16 or got[-1] in tiny.eos_token_ids
        assert p.page.evaluate("() => window.hpi.provisional.length") == 0
        if drift == "1":  # every draft had a wrong token: each verdict was a correction
            assert p.page.evaluate("() => window.hpi.corrections") > 0
        assert not p.errors, p.errors
    finally:
        context.close()
