"""The distribution as a user installs it: the README's package install, line by line, into a
fresh virtualenv outside the repo; `hpi serve` from there on the default model; the chat page
at `/` in headless Chromium gets an answer the anchor confirmed, equal to the anchor's own.

The Dockerfile installs with the same script (scripts/install.sh); no Docker engine runs here.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.services import free_port

pytestmark = [pytest.mark.real_model, pytest.mark.browser]

ROOT = Path(__file__).resolve().parent.parent
MARK = "<!-- package install: tests/test_package.py runs this block -->"
ENV = "~/hpi-env"
PROMPT = "Name three colours."
N = 12


def readme_block() -> list[str]:
    """The commands of the README's package install, comments dropped."""
    text = (ROOT / "README.md").read_text()
    assert MARK in text
    block = re.search(r"```bash\n(.*?)```", text[text.index(MARK):], re.S).group(1)
    lines = [ln.split("  #")[0].strip() for ln in block.splitlines()]
    return [ln for ln in lines if ln and not ln.startswith("#")]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The README's lines run with the virtualenv under a temporary folder; yields `hpi serve`'s argv."""
    env_dir = tmp_path_factory.mktemp("user") / "hpi-env"
    *setup, serve = [ln.replace(ENV, str(env_dir)) for ln in readme_block()]
    assert serve.startswith(f"{env_dir}/bin/hpi serve"), serve
    for line in setup:
        done = subprocess.run(["bash", "-c", line], cwd=ROOT, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, f"{line}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    return shlex.split(serve), env_dir


def test_the_wheel_is_one_hpi_package_with_its_page_and_shaders(installed):
    _, env_dir = installed
    (site,) = env_dir.glob("lib/python*/site-packages")
    tops = {p.name for p in site.iterdir() if p.suffix not in (".pth",) and not p.name.startswith("_")}
    assert "hpi" in tops and not {"server", "protocol", "client_web", "shaders"} & tops
    probe = ("import hpi, hpi.memory.api, hpi._kernels; from importlib.resources import files; "
             "print(hpi.__file__); print(files('hpi.web').joinpath('index.html').is_file(), "
             "files('hpi.shaders').joinpath('gemv.wgsl').is_file())")
    done = subprocess.run([str(env_dir / "bin" / "python"), "-c", probe], cwd=env_dir.parent,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    where, found = done.stdout.split("\n")[:2]
    assert Path(where).is_relative_to(site) and found == "True True"


def test_hpi_serve_from_the_wheel_answers_the_page_exactly(installed, browser):
    argv, env_dir = installed
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("HPI_") and k != "PYTHONPATH"}
    # The pack and the converted model cached by the other real-model tests (a first build takes minutes).
    env["HPI_DATA_DIR"] = os.environ["HPI_DATA_DIR"]
    log = (env_dir.parent / "serve.log").open("w")
    proc = subprocess.Popen([*argv, "--port", str(port)], cwd=env_dir.parent, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            assert proc.poll() is None, (env_dir.parent / "serve.log").read_text()[-4000:]
            try:
                if httpx.get(f"{base}/healthz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "hpi serve did not start"
            time.sleep(1)

        ctx = browser.new_context()
        try:
            page = ctx.new_page()
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(f"{base}/")
            page.wait_for_function("window.hpi && window.hpi.ready", timeout=120_000)
            page.evaluate("() => window.hpi.ready")
            assert page.evaluate("() => window.hpi.mode") != "server", "the page did not run the resonator"
            page.fill("#max-new", str(N))
            page.fill("#prompt", PROMPT)
            page.click("#send")
            page.wait_for_function("window.hpi.conv && window.hpi.conv.turns.length >= 2 && !window.hpi.busy",
                                   timeout=300_000)
            conv = page.evaluate("() => window.hpi.conv")
            assert not errors, errors
        finally:
            ctx.close()
        answer = conv["turns"][-1]
        n = len(answer["ids"])  # at least N: the last verification pass may confirm a few more
        assert n >= N and conv["sync"]["position"] >= answer["start"] + n  # every token confirmed
        alone = httpx.post(f"{base}/v1/chat/completions", timeout=300, json={
            "messages": [{"role": "user", "content": PROMPT}], "max_tokens": n, "temperature": 0}).json()
        assert answer["content"] == alone["choices"][0]["message"]["content"]
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()
