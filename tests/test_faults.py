"""Faults on real processes (issue 13): `hpi serve` on the tiny model as a subprocess of its own,
pages on real websockets, and every reconciled answer compared token for token with the
anchor-only answer. Nothing a page was told is confirmed may be lost or repeated.

1. The anchor is SIGKILLed while pages reconcile and restarted on the same sessions dir; the
   pages reconnect (hello with their last confirmed position and chain) and finish.
2. One websocket in ten is dropped mid-answer (no close frame: a FIN or a RST, right after a
   draft was sent); its page reconnects.
3. While the anchor is down, one transcript is truncated and another replaced by garbage:
   the anchor starts, those two sessions are unknown (404 session_not_found; the sync channel
   is refused with HTTP 403), the others continue exactly.
4. The disk fills up under a transcript write (sessions dir on a small tmpfs): the draft gets
   an `error` frame `storage_error` and no verdict; once there is room again the session
   continues from its last saved state, and after a restart nothing confirmed is lost.

The long versions, at load on the real model, are `python -m bench.load --faults`.
"""

from __future__ import annotations

import errno
import itertools
import json
import os
import random
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import msgpack
import pytest
import websockets.sync.client as ws_client
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from hpi.protocol import frames
from hpi import completions
from tests.services import free_port

REPO = Path(__file__).resolve().parent.parent
K = 6  # drafted tokens per pass
ANSWER = 40  # anchor-only tokens per answer (fewer if the model ends its turn earlier)
# On the tiny model the first eight answers run to ANSWER tokens; the last two end their turn
# (an end token) after 26 and 10.
PROMPTS = ["What survives a crash?", "Tell me about disks.", "Why do sockets reset?", "Name a prime number.",
           "Write a line about rivers.", "Tell me a story.", "Count to ten.", "Say something kind.",
           "Describe the sea.", "How do transcripts work?"]


# ---- the anchor as a process ---------------------------------------------------------------

# Each anchor is `hpi serve` (hpi.cli.main) in a process of its own, forked from a process that
# imported the server once: a start then takes about a second rather than the eight that importing
# torch and transformers takes on two cores, and the file starts seven anchors. SIGKILL kills that
# process alone. The children's logs go to files; the forking process leaves them to the kernel to reap.
FORKER = r"""
import json, os, signal, sys
import hpi.app, hpi.cli
for name in ("transformers.models.llama.modeling_llama", "transformers.models.llama.configuration_llama",
             "transformers.tokenization_utils_fast", "uvicorn.protocols.http.h11_impl", "uvicorn.lifespan.on",
             "uvicorn.loops.auto", "uvicorn.protocols.websockets.websockets_sansio_impl"):
    try:
        __import__(name)
    except ImportError:
        pass
signal.signal(signal.SIGCHLD, signal.SIG_IGN)
print("ready", flush=True)
for line in sys.stdin:
    req = json.loads(line)
    pid = os.fork()
    if pid == 0:
        os.setsid()
        log = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        os.environ.update(req["env"])
        code = 1
        try:
            code = hpi.cli.main(req["args"])
        finally:
            os._exit(code or 0)
    print(pid, flush=True)
"""


class Forker:
    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, "-c", FORKER], cwd=REPO, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        self.lock = threading.Lock()
        self.ready = False  # it imports the server while the tests prepare their pages

    def spawn(self, args: list[str], env: dict, log: Path) -> Forked:
        with self.lock:
            if not self.ready and self.proc.stdout.readline().strip() != "ready":
                raise RuntimeError("the forking process did not start")
            self.ready = True
            self.proc.stdin.write(json.dumps({"args": args, "env": env, "log": str(log)}) + "\n")
            self.proc.stdin.flush()
            return Forked(int(self.proc.stdout.readline()))

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(30)


class Forked:
    """A process forked by the Forker (not this process's child)."""

    def __init__(self, pid: int):
        self.pid = pid

    def alive(self) -> bool:
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        return Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"

    def signal(self, sig: int) -> None:
        try:
            os.kill(self.pid, sig)
        except ProcessLookupError:
            pass


class Spawned:
    """A child process of this one: an anchor started inside another namespace (test 4's fallback)."""

    def __init__(self, popen: subprocess.Popen):
        self.popen, self.pid = popen, popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            self.popen.send_signal(sig)


class AnchorProcess:
    """`hpi serve --model <tiny>` with its own data and sessions dirs; `prefix` runs it inside
    another namespace (the tmpfs fallback of test 4)."""

    def __init__(self, forker: Forker, model: Path, data: Path, sessions: Path, port: int | None = None,
                 prefix: tuple[str, ...] = ()):
        self.forker, self.model, self.data, self.sessions, self.prefix = forker, model, data, sessions, prefix
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = data / f"anchor-{self.port}-{time.monotonic_ns()}.log"
        env = {"HPI_DATA_DIR": str(data), "HPI_SESSIONS_DIR": str(sessions), "HPI_MEMORIES_DIR": str(data / "memories"),
               "HPI_THREADS": "1", "HPI_CLIENT_SHARE": "1"}
        args = ["serve", "--model", str(model), "--port", str(self.port)]
        if prefix:
            with self.log.open("wb") as out:
                self.proc = Spawned(subprocess.Popen([*prefix, sys.executable, "-m", "hpi.cli", *args], cwd=REPO,
                                                     env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT))
        else:
            self.proc = forker.spawn(args, env, self.log)

    def wait_up(self, timeout: float = 120) -> AnchorProcess:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if not self.proc.alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the anchor did not start:\n{self.output()[-3000:]}")
            time.sleep(0.02)

    def restart(self) -> AnchorProcess:
        """A new process on the same port, data and sessions dirs (this one must be gone)."""
        assert not self.proc.alive()
        return AnchorProcess(self.forker, self.model, self.data, self.sessions, self.port, self.prefix)

    def _gone(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.proc.alive():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    def kill(self) -> None:
        self.proc.signal(signal.SIGKILL)
        assert self._gone(30)

    def stop(self) -> None:
        self.proc.signal(signal.SIGTERM)
        if not self._gone(15):
            self.kill()

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


CHAINED = re.compile(r"\n(\S[^\n]*)\n\n(?:During handling of the above exception, another exception occurred|"
                     r"The above exception was the direct cause of the following exception):\n\n"
                     r"Traceback \(most recent call last\):")


def tracebacks(output: str) -> list[str]:
    """The tracebacks in an anchor's log (chained ones as one), each up to its last exception line."""
    out = []
    for chunk in CHAINED.sub(r"\n  \1 (then)", output).split("Traceback (most recent call last):")[1:]:
        lines = chunk.splitlines()[1:]
        end = next((i for i, line in enumerate(lines) if line and not line[0].isspace()), len(lines) - 1)
        out.append("\n".join(lines[:end + 1]))
    return out


@pytest.fixture(scope="module")
def forker():
    f = Forker()
    yield f
    f.close()


@pytest.fixture
def anchors(forker, tiny_model_dir, tmp_path):
    """Start anchors on the tiny model: `start(sessions_dir=None)`, `start.restart(anchor)`. All are
    stopped at the end, and none may have logged a traceback (an exception in the app is a bug even
    if its client coped)."""
    data = tmp_path / "data"
    data.mkdir()
    packs = REPO / "var" / "test-data" / "packs"
    for pack in packs.glob(f"pack-{tiny_model_dir.name}@*") if packs.is_dir() else ():
        (data / "packs").mkdir(exist_ok=True)
        shutil.copy(pack, data / "packs" / pack.name)  # the tiny model's pack, built by an earlier run
    started: list[AnchorProcess] = []

    def start(sessions: Path | None = None, prefix: tuple[str, ...] = ()) -> AnchorProcess:
        a = AnchorProcess(forker, tiny_model_dir, data, sessions or tmp_path / "sessions", prefix=prefix)
        started.append(a)
        return a.wait_up()

    def restart(a: AnchorProcess) -> AnchorProcess:
        b = a.restart()
        started.append(b)
        return b.wait_up()

    start.restart = restart
    start.started = started
    yield start
    for a in started:
        a.stop()
    for a in started:
        assert not tracebacks(a.output()), a.output()[-6000:]


# ---- a page --------------------------------------------------------------------------------


def chain_of(tokens: list[int]) -> bytes:
    c = frames.GENESIS
    for t in tokens:
        c = frames.chain_next(c, t)
    return c


class Dropped(Exception):
    """The page dropped its own websocket (the fault under test)."""


class Page:
    """One conversation: its session, the anchor-only answer (`truth`) and what the anchor has
    confirmed to it. It drafts the answer K tokens at a time with a wrong token in some drafts
    (never the answer's last token, which the anchor confirms itself), and after any failure says
    hello again with its last confirmed position and chain. With `drops` (a shared counter of
    channels), every tenth channel opened is dropped mid-answer, right after a draft is sent."""

    def __init__(self, url: str, prompt: str, tiny, seed: int, drops: itertools.count | None = None,
                 pause: float = 0.0):
        self.url, self.rng, self.channels, self.pause = url, random.Random(seed), drops, pause
        self.messages = [{"role": "user", "content": prompt}]
        self.prompt = tiny.chat_ids(self.messages)
        self.truth = list(completions.decode(tiny, self.prompt, ANSWER))
        self.vocab = tiny.config.vocab_size
        r = httpx.post(url + "/v1/sessions", json={"messages": self.messages}, timeout=30)
        assert r.status_code == 201, r.text
        self.s = r.json()
        assert self.s["n_tokens"] == len(self.prompt)
        self.confirmed: list[int] = []
        self.ws = None
        self.drop_after = 0  # drafts on this channel before it is dropped; 0: never
        self.connects = self.drops = self.passes = self.recovered = self.refreshes = self.stale = 0
        self.abort = False  # set by a failing test, so that its threads end

    @property
    def position(self) -> int:
        return len(self.prompt) + len(self.confirmed)

    @property
    def done(self) -> bool:
        return len(self.confirmed) >= len(self.truth)

    def _send(self, **f) -> None:
        self.ws.send(msgpack.packb({"v": 1, **f}, use_bin_type=True))

    def _recv(self) -> dict:
        return msgpack.unpackb(self.ws.recv(timeout=30), raw=False)

    def connect(self) -> dict:
        self.close()
        url = self.url.replace("http://", "ws://") + f"/v1/sessions/{self.s['session_id']}/sync"
        # Entered here and left by close(), which drops the socket without a close frame, as a
        # page that goes away does.
        self.ws = ws_client.connect(url, open_timeout=5, close_timeout=1, proxy=None).__enter__()
        self.connects += 1
        self.drop_after = self.rng.randint(1, 3) if self.channels is not None and next(self.channels) % 10 == 0 else 0
        return self.hello()

    def hello(self) -> dict:
        self._send(type="hello", token=self.s["token"], position=self.position, chain=chain_of(self.confirmed),
                   temperature=0.0, seed=0)
        r = self._recv()
        assert r["type"] == "ready", r
        if r["refresh"]:  # the anchor does not know this page's chain: confirmed tokens were lost
            self.refreshes += 1
            self.confirmed = list(r["tokens"])
        else:  # tokens confirmed after the page's position: verdicts it never received
            self.recovered += len(r["tokens"])
            self.confirmed += r["tokens"]
        assert (r["position"], r["chain"]) == (self.position, chain_of(self.confirmed))
        return r

    def draft(self, drop: str | None = None) -> dict:
        """One pass: a verdict (its tokens taken), or the anchor's error frame. `drop` ("fin" or
        "rst"): go away right after sending the draft."""
        at = len(self.confirmed)
        drafts = self.truth[at:min(at + K, len(self.truth) - 1)] or [(self.truth[at] + 1) % self.vocab]
        if len(drafts) > 2 and self.rng.random() < 0.4:
            i = self.rng.randrange(1, len(drafts))
            drafts[i] = (drafts[i] + 1) % self.vocab
        self._send(type="draft", position=self.position, chain=chain_of(self.confirmed), tokens=drafts)
        if drop:
            self.drop(drop)
        v = self._recv()
        if v["type"] == "error":
            return v
        assert v["type"] in ("ack", "correction"), v
        self.passes += 1
        self.confirmed += drafts[:v["accepted"]] + [v["token"]]
        assert (v["position"], v["chain"]) == (self.position, chain_of(self.confirmed)), v
        return v

    def drop(self, how: str) -> None:
        """Go away without a close frame: a FIN, or a RST (SO_LINGER 0)."""
        self.drops += 1
        if how == "rst":
            self.ws.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.ws.close_socket()
        self.ws = None
        raise Dropped

    def close(self) -> None:
        if self.ws is not None:
            self.ws.close_socket()
            self.ws = None

    def finish(self, deadline: float, until: int | None = None) -> None:
        """Reconcile until the answer is complete (or `until` tokens are confirmed), reconnecting
        after every failure, until `deadline` (time.monotonic)."""
        goal = len(self.truth) if until is None else until
        while len(self.confirmed) < goal:
            assert time.monotonic() < deadline and not self.abort, f"page {self.s['session_id']}: not done in time"
            try:
                if self.ws is None:
                    self.connect()
                    continue  # `ready` may have brought the rest of the answer
                self.drop_after -= 1
                v = self.draft(drop=("rst", "fin")[self.drops % 2] if self.drop_after == 0 else None)
                if v["type"] == "error":
                    # A dropped channel's draft verified late, or the anchor asking the page to back off.
                    assert v["code"] in ("stale_draft", "rate_limited", "server_busy"), v
                    self.stale += 1
                    time.sleep(0.2 if v["code"] != "stale_draft" else 0)
                    self.hello()
                time.sleep(self.pause)
            except (Dropped, ConnectionClosed, InvalidHandshake, OSError, TimeoutError):
                self.close()
                time.sleep(0.05)

    def check(self, sessions: Path | None = None) -> None:
        """The answer is the anchor-only one: nothing lost, nothing repeated; and so is the transcript."""
        assert self.refreshes == 0
        assert self.confirmed == self.truth, (self.confirmed, self.truth)
        if sessions is not None:
            saved = json.loads((sessions / f"{self.s['session_id']}.json").read_text())
            assert saved["ids"] == self.prompt + self.truth


def in_threads(fn, items) -> None:
    """`fn` on each item, each in its own thread; the first failure is raised."""
    with ThreadPoolExecutor(len(items)) as pool:
        list(pool.map(fn, items))


# ---- the faults ----------------------------------------------------------------------------


def test_sigkill_mid_run_and_restart_loses_nothing(anchors, tiny, tmp_path):
    anchor = anchors()
    pages = [Page(anchor.url, p, tiny, seed=i, pause=0.02) for i, p in enumerate(PROMPTS[:6])]
    deadline = time.monotonic() + 60

    def run(page: Page) -> None:
        page.finish(deadline)

    workers = threading.Thread(target=in_threads, args=(run, pages))
    workers.start()
    try:
        while min(len(p.confirmed) for p in pages) < 8 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert not any(p.done for p in pages), "the pages finished before the kill: make the answers longer"
        anchor.kill()  # mid-run: every page is between verdicts or has a draft in flight
        at_kill = [len(p.confirmed) for p in pages]
        restarted = anchors.restart(anchor)
        workers.join(70)
        assert not workers.is_alive()
    finally:
        for p in pages:
            p.abort = True
        workers.join()
    for page, n in zip(pages, at_kill, strict=True):
        page.check(tmp_path / "sessions")
        assert page.connects >= 2 and len(page.truth) > n  # each reconnected, and finished after the restart
    assert restarted.proc.alive()


def test_a_tenth_of_the_websockets_dropped_mid_answer(anchors, tiny, tmp_path):
    anchor = anchors()
    channels = itertools.count()
    pages = [Page(anchor.url, PROMPTS[i % len(PROMPTS)], tiny, seed=100 + i, drops=channels) for i in range(20)]
    deadline = time.monotonic() + 40
    in_threads(lambda page: page.finish(deadline), pages)
    drops, connects = sum(p.drops for p in pages), sum(p.connects for p in pages)
    assert drops >= 2 and drops <= connects // 10 + 1, (drops, connects)
    for page in pages:
        page.check(tmp_path / "sessions")
    # The anchor-only answer over HTTP is the same text.
    page = pages[0]
    r = httpx.post(anchor.url + "/v1/chat/completions", json={"messages": page.messages, "max_tokens": ANSWER,
                                                             "temperature": 0}, timeout=30)
    text = completions.TextStream(tiny)
    assert r.json()["choices"][0]["message"]["content"] == "".join(text.add(t) for t in page.truth) + text.flush()


def test_a_channel_dropped_while_its_draft_is_verified_logs_no_exception(anchors, tiny):
    anchor = anchors()
    page = Page(anchor.url, PROMPTS[0], tiny, seed=7)
    page.connect()
    page.draft()
    with pytest.raises(Dropped):
        page.draft(drop="fin")  # the draft is sent, then the page goes away without a close frame
    page.connect()
    assert page.recovered > 0  # the draft was verified and saved: its verdict comes with `ready`
    page.finish(time.monotonic() + 20)
    page.check()
    page.close()
    anchor.stop()
    assert tracebacks(anchor.output()) == []


def test_corrupted_transcripts_are_refused_and_the_others_continue(anchors, tiny, tmp_path):
    anchor = anchors()
    sessions = tmp_path / "sessions"
    pages = [Page(anchor.url, p, tiny, seed=200 + i) for i, p in enumerate(PROMPTS[:4])]
    deadline = time.monotonic() + 30
    in_threads(lambda page: page.finish(deadline, until=10), pages)
    for p in pages:
        p.close()
    anchor.kill()
    truncated, garbage = (sessions / f"{p.s['session_id']}.json" for p in pages[:2])
    truncated.write_bytes(truncated.read_bytes()[:truncated.stat().st_size // 2])
    garbage.write_bytes(os.urandom(300))
    restarted = anchors.restart(anchor)  # the anchor starts all the same
    log = restarted.output()
    for path in (truncated, garbage):
        assert f"skipping the session transcript {path}" in log
    for p in pages[:2]:
        r = httpx.get(restarted.url + p.s["hologram_url"], headers={"Authorization": f"Bearer {p.s['token']}"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "session_not_found", r.text
        with pytest.raises(InvalidStatus) as refused:  # closed before it is accepted
            p.connect()
        assert refused.value.response.status_code == 403
    for p in pages[2:]:
        ready = p.connect()
        assert (ready["refresh"], ready["tokens"]) == (False, [])
    in_threads(lambda page: page.finish(time.monotonic() + 30), pages[2:])
    for p in pages[2:]:
        p.check(sessions)


# ---- a full disk -----------------------------------------------------------------------------


class Tmpfs:
    """A small tmpfs for the sessions dir: mounted here if this process may (root), else inside a
    user and mount namespace held by a `sleep` (`unshare --user --map-root-user --mount`), which
    the anchors join (`prefix`) and this process reaches through /proc/<pid>/root."""

    def __init__(self, where: Path, size: str):
        where.mkdir()
        self.where, self.holder, self.prefix = where, None, ()
        try:
            mount = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(where)],
                                   check=False, capture_output=True, text=True)
            why = f"`mount -t tmpfs` failed: {mount.stderr.strip() or mount.returncode}"
        except FileNotFoundError:
            mount, why = None, "`mount` is not installed"
        if mount is not None and mount.returncode == 0:
            self.here = where
            return
        if not shutil.which("unshare") or not shutil.which("nsenter"):
            pytest.skip(f"{why}; and unshare/nsenter are not installed")
        self.holder = subprocess.Popen(
            ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
             f"mount -t tmpfs -o size={size},mode=0700 tmpfs '{where}' && echo mounted && exec sleep 3600"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if self.holder.stdout.readline().strip() != "mounted":
            self.holder.wait(10)
            pytest.skip(f"{why}; `unshare --user --map-root-user --mount` failed: {self.holder.stderr.read().strip()}")
        self.here = Path(f"/proc/{self.holder.pid}/root") / where.relative_to("/")
        self.prefix = ("nsenter", "--target", str(self.holder.pid), "--user", "--mount", "--preserve-credentials",
                       "--")

    def fill(self) -> Path:
        """A filler file taking every free block: the next transcript write fails with ENOSPC."""
        filler = self.here / "filler"
        with filler.open("wb", buffering=0) as f:
            chunk = b"\xff" * 4096
            try:
                while True:
                    f.write(chunk)
            except OSError as e:
                assert e.errno == errno.ENOSPC
        return filler

    def close(self) -> None:
        if self.holder is not None:
            self.holder.kill()
            self.holder.wait(10)
        else:
            subprocess.run(["umount", "-l", str(self.where)], check=False)


@pytest.fixture
def tmpfs(tmp_path):
    t = Tmpfs(tmp_path / "tmpfs", "512k")
    yield t
    t.close()


def test_a_full_disk_refuses_the_verdict_then_the_session_continues(anchors, tiny, tmpfs):
    anchor = anchors(tmpfs.where / "sessions", prefix=tmpfs.prefix)
    sessions = tmpfs.here / "sessions"
    page, other = (Page(anchor.url, p, tiny, seed=300 + i) for i, p in enumerate(PROMPTS[:2]))
    page.finish(time.monotonic() + 20, until=10)
    other.finish(time.monotonic() + 20, until=4)
    filler = tmpfs.fill()

    before = list(page.confirmed)
    e = page.draft()
    assert (e["type"], e["code"]) == ("error", "storage_error"), e
    assert page.confirmed == before  # no verdict: nothing the disk does not hold was confirmed
    saved = json.loads((sessions / f"{page.s['session_id']}.json").read_text())
    assert saved["ids"] == page.prompt + before
    ready = page.hello()  # the anchor went back to what is on disk, which is what the page has
    assert (ready["tokens"], ready["refresh"]) == ([], False)
    assert page.draft()["code"] == "storage_error"  # still full: still refused
    r = httpx.post(anchor.url + "/v1/sessions", json={"messages": page.messages})
    assert r.status_code == 503 and r.json()["error"]["code"] == "storage_error", r.text
    assert other.draft()["code"] == "storage_error"

    filler.unlink()
    page.hello()
    page.finish(time.monotonic() + 20)
    other.hello()
    other.finish(time.monotonic() + 20)
    for p in (page, other):
        p.check(sessions)
        p.close()
    anchor.kill()
    restarted = anchors.restart(anchor)
    for p in (page, other):  # nothing confirmed was lost
        ready = p.connect()
        assert (ready["position"], ready["tokens"], ready["refresh"]) == (p.position, [], False)
        p.check(sessions)
        p.close()
    assert restarted.proc.alive()
