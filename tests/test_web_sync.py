"""End to end on the tiny model: the page drafts on the GPU, the anchor verifies over the
websocket, and every answer is exactly the anchor-only answer of the same conversation,
through corrections, a second turn, a dropped websocket, an unreachable and restarted
anchor, and a chain the anchor does not know. (The tiny resonator disagrees with its anchor
often, so corrections are exercised without the drift switch too.)"""

from __future__ import annotations

from contextlib import ExitStack

import pytest

from hpi import completions
from hpi.app import create_app
from hpi.config import Settings
from hpi.headless import serve
from hpi.sampling import Sampling
from tests.test_web_page import PROMPT, Page

pytestmark = pytest.mark.browser


class Anchor:
    """The anchor app on the tiny model with its own data directory; it can be restarted."""

    def __init__(self, anchor, data_dir):
        self.anchor, self.data_dir = anchor, data_dir
        self.stack = ExitStack()
        self.port = 0
        self.start()

    def start(self):
        self.app = create_app(Settings(data_dir=str(self.data_dir)), self.anchor)
        self.url = self.stack.enter_context(serve(self.app, self.port))
        self.port = int(self.url.rsplit(":", 1)[1])

    def stop(self):
        self.stack.close()

    def alone(self, conv: dict, given: int = 0) -> list[int]:
        """What the anchor alone writes for the page's last answer, as many tokens as it has;
        its first `given` tokens are taken as they are (a fork's, written before it forked)."""
        session = self.app.state.store.get(conv["session"]["id"], conv["session"]["token"])
        answer = conv["turns"][-1]
        prompt = session.caches.ids[:answer["start"] + given]
        sampling = Sampling(conv["sampling"]["temperature"], conv["sampling"]["seed"])
        return answer["ids"][:given] + list(completions.decode(self.anchor.lm, prompt, len(answer["ids"]) - given,
                                                               sampling))


class Link:
    """The page's sync websockets, routed through Playwright: they can be cut and refused."""

    def __init__(self, page):
        self.up = True
        self.open = []
        page.route_web_socket("**/sync", self._route)

    def _route(self, ws):
        if not self.up:
            ws.close()
            return
        self.open.append((ws, ws.connect_to_server()))

    def cut(self, refuse: bool):
        self.up = not refuse
        for page_side, server_side in self.open:
            page_side.close()
            server_side.close()
        self.open.clear()


@pytest.fixture
def anchor(tiny_server, tmp_path):
    a = Anchor(tiny_server[1], tmp_path)
    yield a
    a.stop()


@pytest.fixture
def context(browser):
    ctx = browser.new_context()
    yield ctx
    ctx.close()


def conv(p: Page) -> dict:
    return p.page.evaluate("() => window.hpi.conv")


def stats(p: Page) -> dict:
    return p.page.evaluate("() => window.hpi.reconciler.stats")


@pytest.mark.parametrize("drift, temperature", [("0", 0), ("1", 0), ("0", 0.8)])
def test_verified_answer_equals_the_anchor_alone(context, anchor, drift, temperature):
    p = Page(context, anchor.url, f"?sync=4&drift={drift}")
    p.open()
    p.page.fill("#temperature", str(temperature))
    p.ask(PROMPT, 16)
    c = conv(p)
    assert c["sampling"]["temperature"] == temperature
    assert c["turns"][-1]["ids"] == anchor.alone(c)
    assert len(c["turns"][-1]["ids"]) >= 16 or c["turns"][-1]["ended"]
    assert p.page.evaluate("() => window.hpi.reconciler.provisional.length") == 0
    s = stats(p)
    assert s["passes"] >= 1 and s["accepted"] <= s["drafted"]
    if drift == "1":  # every draft of two or more tokens had a wrong one: a correction
        assert s["corrections"] >= s["passes"] - 1 >= 1
    assert not p.errors, p.errors


def test_a_second_turn_sends_only_its_text_and_its_answer_is_exact(context, anchor):
    p = Page(context, anchor.url, "?sync=4")
    p.open()
    p.ask(PROMPT, 12)
    first = conv(p)
    assert first["turns"][-1]["ids"] == anchor.alone(first)
    bodies = []
    p.page.on("request", lambda r: bodies.append(r.post_data) if r.url.endswith("/messages") else None)
    p.requests.clear()
    p.ask("And what about holograms?", 12)
    c = conv(p)
    assert [t["role"] for t in c["turns"]] == ["user", "assistant"] * 2
    assert c["turns"][1]["ids"] == first["turns"][-1]["ids"]
    assert c["turns"][-1]["ids"] == anchor.alone(c)
    assert p.count("/hologram") == 0 and p.count("/v1/sessions") == 1  # the delta only
    assert bodies == ['{"messages":[{"role":"user","content":"And what about holograms?"}]}']
    assert len(c["segments"]) == 2 and c["segments"][1]["start"] == c["segments"][0]["end"]

    p.open()  # reload: both turns come back from IndexedDB and the answer continues exactly
    assert p.count("/hologram") == 0 and p.count("/pack") == 0
    assert conv(p)["turns"] == c["turns"]
    p.more(6)
    c = conv(p)
    assert len(c["turns"][-1]["ids"]) > 12 and c["turns"][-1]["ids"] == anchor.alone(c)
    assert not p.errors, p.errors


def test_a_dropped_websocket_reconnects_and_nothing_is_lost_or_repeated(context, anchor):
    p = Page(context, anchor.url, "?sync=4")
    link = Link(p.page)
    p.open()
    p.ask(PROMPT, 40, wait=False)
    p.page.wait_for_function("window.hpi.reconciler && window.hpi.reconciler.stats.passes >= 2", timeout=60_000)
    link.cut(refuse=False)
    p.wait_idle()
    c = conv(p)
    assert c["turns"][-1]["ids"] == anchor.alone(c)
    assert len(c["turns"][-1]["ids"]) >= 40 or c["turns"][-1]["ended"]
    assert stats(p)["reconnects"] >= 1
    assert not p.errors, p.errors


def test_unreachable_anchor_bounds_the_provisional_text_and_a_restarted_anchor_resumes(context, anchor):
    p = Page(context, anchor.url, "?sync=4&provisional=10")
    link = Link(p.page)
    p.open()
    p.ask(PROMPT, 40, wait=False)
    p.page.wait_for_function("window.hpi.reconciler && window.hpi.reconciler.stats.passes >= 2", timeout=60_000)
    link.cut(refuse=True)
    anchor.stop()
    p.page.wait_for_function("window.hpi.reconciler.provisional.length === 10", timeout=60_000)
    confirmed = len(conv(p)["turns"][-1]["ids"])
    assert "10/10 (anchor unreachable" in p.page.inner_text("#stats")
    p.page.wait_for_timeout(1000)
    assert p.page.evaluate("() => window.hpi.reconciler.provisional.length") == 10  # the bound holds
    anchor.start()  # a new app: sessions come back from their persisted transcripts
    link.up = True
    p.wait_idle()
    c = conv(p)
    assert len(c["turns"][-1]["ids"]) > confirmed
    assert c["turns"][-1]["ids"] == anchor.alone(c)
    assert not p.errors, p.errors


def test_a_chain_the_anchor_does_not_know_reloads_the_full_hologram(context, anchor):
    p = Page(context, anchor.url, "?sync=4")
    p.open()
    p.ask(PROMPT, 8)
    p.page.evaluate("() => { window.hpi.conv.sync.chain = new Uint8Array(32).fill(7); }")
    p.requests.clear()
    p.more(8)
    c = conv(p)
    assert stats(p)["refreshes"] == 1 and p.count("/hologram") == 1
    assert len(c["turns"][-1]["ids"]) > 8 and c["turns"][-1]["ids"] == anchor.alone(c)
    assert not p.errors, p.errors


def test_backtrack_continues_as_before_and_a_fork_answers_exactly_on_its_own(context, anchor):
    p = Page(context, anchor.url, "?sync=4")
    p.open()
    p.ask(PROMPT, 8)
    at = conv(p)["sync"]["position"]
    p.page.click("#trail summary")
    p.page.click("#checkpoint")
    p.page.wait_for_function("window.hpi.conv.checkpoints?.length === 1")
    p.more(8)
    original = p.tokens()
    p.page.click("#backtrack")
    p.page.wait_for_function(f"window.hpi.conv.sync.position === {at} && !window.hpi.busy")
    assert p.tokens() == original[:at - conv(p)["turns"][-1]["start"]]
    p.more(8)
    assert p.tokens()[:len(original)] == original  # greedy: the same continuation from the checkpoint

    p.page.fill("#temperature", "0.8")
    p.page.click("#fork")
    p.page.wait_for_function("window.hpi.conversations.length === 2 && !window.hpi.busy")
    fork = conv(p)
    assert fork["session"]["id"] != p.page.evaluate("() => window.hpi.conversations[1].session.id")
    assert fork["sampling"]["temperature"] == 0.8 and fork["sync"]["position"] == at
    p.more(8)
    c = conv(p)
    given = len(fork["turns"][-1]["ids"])
    assert len(c["turns"][-1]["ids"]) > given and c["turns"][-1]["ids"] == anchor.alone(c, given)
    assert not p.errors, p.errors


@pytest.mark.real_model
def test_smollm2_answers_exactly_through_a_drop_a_reload_and_drift(browser, smollm_anchor, tmp_path):
    a = Anchor(smollm_anchor, tmp_path)
    ctx = browser.new_context()
    try:
        p = Page(ctx, a.url, "?sync=8")
        link = Link(p.page)
        p.open()
        p.ask("Explain in a few sentences how a CPU cache works.", 24, wait=False)
        p.page.wait_for_function("window.hpi.reconciler && window.hpi.reconciler.stats.passes >= 1", timeout=120_000)
        link.cut(refuse=False)
        p.wait_idle()
        c = conv(p)
        assert len(c["turns"][-1]["ids"]) >= 24 and c["turns"][-1]["ids"] == a.alone(c)
        assert stats(p)["reconnects"] >= 1

        p.query = "?sync=8&drift=1"
        p.open()  # reload: pack and hologram from IndexedDB, then the answer goes on through corrections
        assert p.count("/pack") == 0 and p.count("/hologram") == 0
        p.more(8)
        c = conv(p)
        assert len(c["turns"][-1]["ids"]) >= 32 and c["turns"][-1]["ids"] == a.alone(c)
        assert stats(p)["corrections"] >= 1
        assert not p.errors, p.errors
    finally:
        ctx.close()
        a.stop()
