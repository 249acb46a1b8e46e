"""Headless Chromium with WebGPU, and the anchor app on a loopback port: for the tests and the
benchmarks of the page (Playwright, a test extra, is imported only when a browser is launched).

WebGPU runs on SwiftShader (CPU Vulkan) with the flags of DESIGN.md §5. The browser is
Debian's /usr/bin/chromium (or HPI_CHROMIUM); elsewhere Playwright's own build is used.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import uvicorn

from hpi.serving import server_options

CHROMIUM_ARGS = ["--no-sandbox", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--enable-unsafe-webgpu", "--enable-features=Vulkan",
                 "--use-vulkan=swiftshader", "--use-angle=swiftshader"]


def chromium_path() -> str | None:
    path = os.environ.get("HPI_CHROMIUM", "/usr/bin/chromium")
    return path if Path(path).exists() else None


@contextmanager
def serve(app, port: int = 0):
    """Run an ASGI app with uvicorn on 127.0.0.1 (`port`, or a free one); yields its base URL."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restarted anchor takes the same port
    sock.bind(("127.0.0.1", port))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", **server_options()))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120  # the lifespan may build a model pack first
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the anchor app did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


@contextmanager
def launch():
    """A headless Chromium (Playwright sync API) with WebGPU on SwiftShader."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()
