"""The resonator page in real headless Chromium: generate, reload, lose the GPU device, lack WebGPU.

Each test gets its own browser context, so its own IndexedDB. Requests are counted at the
browser, so "not downloaded again" means the page did not even ask.
"""

from __future__ import annotations

import httpx
import pytest

from hpi.resonator import Resonator

pytestmark = pytest.mark.browser

PROMPT = "Say something about caches."
N = 6


class Page:
    """The chat page plus the requests it made, by kind."""

    def __init__(self, context, base: str, query: str = ""):
        self.base = base
        self.query = query
        self.page = context.new_page()
        self.requests: list[str] = []
        self.errors: list[str] = []
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))

    def count(self, part: str) -> int:
        return sum(part in url for url in self.requests)

    def open(self) -> None:
        self.requests.clear()
        self.page.goto(f"{self.base}/client/{self.query}")
        self.page.wait_for_function("window.hpi && window.hpi.ready", timeout=60_000)
        self.page.evaluate("() => window.hpi.ready")

    def wait_idle(self) -> None:
        self.page.wait_for_function("!window.hpi.busy", timeout=180_000)

    def ask(self, prompt: str, n: int, wait: bool = True) -> None:
        turns = self.page.evaluate("() => window.hpi.conv ? window.hpi.conv.turns.length : 0")
        self.page.fill("#max-new", str(n))
        self.page.fill("#prompt", prompt)
        self.page.click("#send")
        self.page.wait_for_function(f"window.hpi.conv && window.hpi.conv.turns.length > {turns}", timeout=120_000)
        if wait:
            self.wait_idle()

    def more(self, n: int) -> None:
        before = len(self.tokens())
        self.page.fill("#max-new", str(n))
        self.page.click("#more")
        self.page.wait_for_function(f"window.hpi.conv.turns.at(-1).ids.length > {before} || !window.hpi.busy",
                                    timeout=120_000)
        self.wait_idle()

    def tokens(self) -> list[int]:
        """The last answer's confirmed token ids."""
        return self.page.evaluate("() => window.hpi.conv.turns.at(-1).ids")

    def session(self) -> dict:
        return self.page.evaluate("() => window.hpi.conv.session")


def reference(base: str, anchor, session: dict, n: int) -> list[int]:
    """What the resonator alone writes from the anchor's hologram of the session."""
    r = httpx.get(f"{base}/v1/sessions/{session['id']}/hologram",
                  headers={"Authorization": f"Bearer {session['token']}"}, timeout=60)
    res = Resonator(anchor.pack_bytes)
    res.add_hologram(r.content)
    return res.generate(n)


@pytest.fixture
def context(browser):
    ctx = browser.new_context()
    yield ctx
    ctx.close()


def test_answer_matches_the_reference_and_a_reload_resumes_without_downloads(context, tiny_server):
    base, anchor = tiny_server
    p = Page(context, base, "?sync=0")  # the resonator alone, unverified
    p.open()
    assert p.count("/pack") == 1
    p.ask(PROMPT, N)
    first = p.tokens()
    assert first == reference(base, anchor, p.session(), N)[:len(first)]
    assert p.page.inner_text("#messages .msg.assistant") != ""

    p.open()  # reload: pack and hologram come from IndexedDB
    assert p.count("/pack") == 0 and p.count("/hologram") == 0
    assert "Resumed" in p.page.inner_text("#status")
    assert p.tokens() == first
    p.more(N)
    assert p.tokens() == reference(base, anchor, p.session(), len(p.tokens()))
    assert p.count("/pack") == 0 and p.count("/hologram") == 0
    assert not p.errors, p.errors


def test_a_corrupted_pack_in_indexeddb_is_detected_and_fetched_again(context, tiny_server):
    base, _ = tiny_server
    p = Page(context, base)
    p.open()
    p.page.evaluate("""() => new Promise((resolve, reject) => {
      const req = indexedDB.open('hpi');
      req.onsuccess = () => {
        const tx = req.result.transaction('packs', 'readwrite');
        const packs = tx.objectStore('packs');
        packs.openCursor().onsuccess = (e) => {
          const cur = e.target.result;
          const bytes = new Uint8Array(cur.value.bytes);
          bytes[bytes.length >> 1] ^= 0x40;
          cur.update({ ...cur.value, bytes });
        };
        tx.oncomplete = () => { req.result.close(); resolve(); };
        tx.onerror = () => reject(tx.error);
      };
    })""")
    p.open()
    assert p.page.evaluate("() => window.hpi.store.corruptions") == 1
    assert p.count("/pack") == 1
    assert p.page.evaluate("() => window.hpi.stats.packFrom") == "network"
    p.open()
    assert p.count("/pack") == 0


def test_a_lost_device_restarts_from_indexeddb_and_continues_exactly(context, tiny_server):
    base, anchor = tiny_server
    p = Page(context, base, "?sync=0")
    p.open()
    p.ask(PROMPT, N)
    p.requests.clear()
    p.page.evaluate("() => window.hpi.engine.device.destroy()")
    p.page.wait_for_function("window.hpi.recoveries === 1", timeout=30_000)
    p.page.evaluate("() => window.hpi.ready")
    assert "Recovered" in p.page.inner_text("#status")
    p.more(N)
    assert p.tokens() == reference(base, anchor, p.session(), len(p.tokens()))
    assert p.count("/pack") == 0 and p.count("/hologram") == 0


def test_without_webgpu_the_anchor_answers_alone_and_says_so(context, tiny_server):
    base, _ = tiny_server
    context.add_init_script("delete Navigator.prototype.gpu")
    p = Page(context, base)
    p.open()
    assert "WebGPU" in p.page.inner_text("#nogpu") and p.page.is_visible("#nogpu")
    p.ask(PROMPT, N)
    answer = p.page.evaluate("() => window.hpi.conv.turns.at(-1).content")
    r = httpx.post(f"{base}/v1/chat/completions", timeout=60, json={
        "messages": [{"role": "user", "content": PROMPT}], "max_tokens": N})
    assert answer == r.json()["choices"][0]["message"]["content"] != ""
    assert "server only" in p.page.inner_text("#stats")
    assert p.count("/pack") == 0 and p.count("/v1/sessions") == 0
    assert not p.errors, p.errors


def test_the_url_overrides_the_kernels_layout(context, tiny_server):
    base, _ = tiny_server
    seen = {}
    for query in ("", "?layout=gpu", "?layout=gpu&subgroups=0"):
        p = Page(context, base, query)
        p.open()
        seen[query] = p.page.evaluate("() => [window.hpi.stats.layout, window.hpi.stats.subgroups]")
        assert not p.errors, p.errors
        p.page.close()
    assert seen[""] == ["cpu", 0]  # SwiftShader: the software layout, which shuffles nothing
    assert seen["?layout=gpu"][0] == "gpu" and seen["?layout=gpu"][1] > 0  # SwiftShader has subgroups
    assert seen["?layout=gpu&subgroups=0"] == ["gpu", 0]
