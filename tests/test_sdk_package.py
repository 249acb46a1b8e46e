"""client_web/ as an npm package: `npm pack`, installed into an empty project outside the repo,
imported by a page of another origin, answering through the real anchor in headless Chromium.

The anchor needs an API key here, so the key goes as `X-API-Key` and as the websocket
subprotocol; the page's origin is in its allowed origins (CORS). Answers are compared, as
text, with the anchor's own /v1/chat/completions for the same messages and sampling.
"""

from __future__ import annotations

import functools
import http.server
import json
import shutil
import socket
import subprocess
import threading
from pathlib import Path

import httpx
import pytest

from hpi.app import create_app
from hpi.config import Settings
from hpi.headless import serve

pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(shutil.which("npm") is None, reason="needs npm to pack the SDK")]

REPO = Path(__file__).resolve().parent.parent
KEY = "sdk-test-key-0123456789"
MESSAGES = [{"role": "system", "content": "You are brief."}, {"role": "user", "content": "Say something about caches."}]
PAGE = """<!doctype html>
<script type="importmap">{"imports": {"@hpi/web": "./node_modules/@hpi/web/index.js"}}</script>
<script type="module">window.sdk = await import('@hpi/web');</script>
"""


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """An empty project with the packed SDK installed from its tarball."""
    root = tmp_path_factory.mktemp("sdk")
    subprocess.run(["npm", "pack", "--pack-destination", str(root)], cwd=REPO / "client_web", check=True,
                   capture_output=True)
    (tarball,) = root.glob("*.tgz")
    app = root / "app"
    app.mkdir()
    (app / "package.json").write_text(json.dumps({"name": "sdk-consumer", "private": True, "type": "module"}))
    subprocess.run(["npm", "install", "--offline", "--no-audit", "--no-fund", str(tarball)], cwd=app, check=True,
                   capture_output=True)
    installed = app / "node_modules" / "@hpi" / "web"
    assert sorted(p.name for p in (installed / "shaders").glob("*.wgsl")) == \
        sorted(p.name for p in (REPO / "shaders").glob("*.wgsl"))
    (app / "index.html").write_text(PAGE)
    return app


@pytest.fixture(scope="module")
def site(project):
    """The project served on a loopback port of its own: another origin than the anchor's."""
    handler = functools.partial(_Quiet, directory=str(project))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def anchor_url(tiny_server, site, tmp_path_factory):
    settings = Settings(sessions_dir=str(tmp_path_factory.mktemp("sdk-sessions")), allowed_origins=[site],
                        api_keys=[KEY])
    with serve(create_app(settings, tiny_server[1])) as url:
        yield url


def open_page(browser, site: str, init_script: str | None = None):
    context = browser.new_context()
    if init_script:
        context.add_init_script(init_script)
    page = context.new_page()
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    page.goto(f"{site}/index.html")
    page.wait_for_function("window.sdk !== undefined")
    return context, page, requests


def anchor_alone(url: str, n: int, temperature: float, seed: int) -> dict:
    r = httpx.post(f"{url}/v1/chat/completions", headers={"X-API-Key": KEY}, timeout=60, json={
        "messages": MESSAGES, "max_tokens": n, "temperature": temperature, "seed": seed})
    r.raise_for_status()
    return r.json()["choices"][0]


def test_the_installed_package_answers_exactly_as_the_anchor(browser, site, anchor_url):
    context, page, requests = open_page(browser, site)
    try:
        got = page.evaluate("""async ([anchor, key, messages]) => {
          const progress = [];
          const engine = await window.sdk.createEngine({ anchor, apiKey: key, draftSize: 4,
            onProgress: (p) => progress.push(p) });
          const plain = await engine.chat.completions.create({ messages, max_tokens: 12 });
          const chunks = [];
          const stream = await engine.chat.completions.create({ messages, max_tokens: 16, temperature: 0.8, seed: 5,
            stream: true });
          for await (const chunk of stream) chunks.push(chunk);
          return { progress, plain, chunks };
        }""", [anchor_url, KEY, MESSAGES])
    finally:
        context.close()
    downloads = [p for p in got["progress"] if p["phase"] == "download"]
    assert downloads[-1]["loaded"] == downloads[-1]["total"] > 0 and not downloads[-1]["cached"]
    assert sum("/pack" in u for u in requests) == 1

    plain = got["plain"]
    alone = anchor_alone(anchor_url, 12, 0, 0)
    assert plain["object"] == "chat.completion" and plain["hpi"]["mode"] == "verified"
    assert plain["choices"][0]["message"] == alone["message"] and alone["message"]["content"]
    assert plain["choices"][0]["finish_reason"] == alone["finish_reason"]
    assert plain["usage"]["completion_tokens"] == len(plain["hpi"]["tokens"])

    chunks = got["chunks"]
    alone = anchor_alone(anchor_url, 16, 0.8, 5)
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == alone["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == alone["finish_reason"]
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    confirmed = [c["hpi"]["confirmed"] for c in chunks]
    assert confirmed == sorted(confirmed)
    assert confirmed[-1] == sum(len(c["hpi"]["tokens"]) for c in chunks)
    assert any(c["hpi"]["provisional"] for c in chunks)  # drafts were shown before the anchor confirmed them
    assert chunks[-1]["hpi"]["provisional"] == [] and chunks[-1]["hpi"]["provisional_text"] == ""


def test_without_webgpu_create_engine_fails_before_any_download(browser, site, anchor_url):
    context, page, requests = open_page(browser, site, "delete Navigator.prototype.gpu")
    try:
        error = page.evaluate("""async ([anchor, key]) => {
          try { await window.sdk.createEngine({ anchor, apiKey: key }); return null; }
          catch (e) { return { name: e.name, code: e.code, typed: e instanceof window.sdk.WebGPUUnavailable
                                && e instanceof window.sdk.HPIError }; }
        }""", [anchor_url, KEY])
    finally:
        context.close()
    assert error == {"name": "WebGPUUnavailable", "code": "webgpu_unavailable", "typed": True}
    assert not [u for u in requests if u.startswith(anchor_url)]


def test_an_unreachable_anchor_is_anchor_unreachable(browser, site):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"  # bound, never listening: refused
        context, page, _ = open_page(browser, site)
        try:
            error = page.evaluate("""async (anchor) => {
              try { await window.sdk.createEngine({ anchor }); return null; }
              catch (e) { return { name: e.name, code: e.code, typed: e instanceof window.sdk.AnchorUnreachable }; }
            }""", closed)
        finally:
            context.close()
    assert error == {"name": "AnchorUnreachable", "code": "anchor_unreachable", "typed": True}
