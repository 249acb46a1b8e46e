"""Load harness (issue 13): N users at once against a real anchor, and what they get back.

One `hpi serve` process (the default model, SmolLM2-135M-Instruct Q4_1, unless --model says
otherwise) on 127.0.0.1 with its default settings (--set HPI_X=Y changes one) and a fresh data
directory (the model pack is reused from the cache), serving the runs one after the other (its
peak RSS is reset at each run's start; --faults restarts it). Each of the N
users is a page: it creates a session, fetches its hologram and reconciles a greedy answer of
--new tokens over a real websocket, K = 16 drafts a pass, the drafts of bench/serving.py's
HPIUser (the reference resonator's drafts, worked out beforehand from the anchor-only answer)
with a wrong token injected into a share of them (--error-rate); then it deletes its session. A
share of server-only users (--server-share of N, on top of them) ask POST /v1/chat/completions
(streamed) for the same answers. Each user comes from a loopback address of its own
(127.0.x.y), as separate clients would, so the per-client shares and rates apply per user.
Refusals (429, 503, `server_busy` or `rate_limited` frames) are counted and retried after
their Retry-After (1 s without one), until the run's wall limit (--wall); then whoever is not
done stops and is counted as unfinished.

Measured (clients and anchor share this machine's cores):
  confirmed tokens/s   tokens confirmed to the reconciling users / the run's wall time
  round trip           client side, a draft's send to its verdict, p50 / p99
  first token          from a user's start (all start together) to its first confirmed token
                       (a reconciling user's first verdict; a server-only user's first chunk)
  /healthz             polled every 100 ms by a process of its own during the run: p50/p99/max
  RSS                  the anchor's peak resident memory (VmHWM of /proc/PID/status)
  CPU                  the anchor's CPU seconds during the run (/proc/PID/stat; a restart's
                       startup left out)
  errors               by code, with how fast they came back (p50 / max)
  differing            answers not equal to the anchor-only answer (must be 0)

--faults runs the long fault versions instead: every tenth websocket a page opens is dropped
mid-answer (right after a draft is sent, without a close frame, FIN or RST by turns) and the
anchor is SIGKILLed once a third of the tokens are confirmed, then restarted on the same data
dir and port; pages reconnect and say hello with their last confirmed position and chain.
Reported: tokens lost (a page's confirmed tokens the anchor no longer knows, or missing from its
final answer) and repeated (in its final answer more than once), both must be 0. An answer that
differs is reported with its page's trace (what happened on each of its channels).

The answers and drafts are worked out once per model and answer length (a few minutes on two
cores) and kept in var/bench-load/.

    python -m bench.load                                 # 16, 64, 128 users: docs/results/load.json, docs/RELIABILITY.md
    python -m bench.load --users 16,64 --new 32 --wall 300
    python -m bench.load --quick                         # a smoke run: 16 users, 12-token answers
    python -m bench.load --faults --users 16 --append    # the fault versions, added to load.json
"""

from __future__ import annotations

import argparse
import datetime
import difflib
import gc
import hashlib
import itertools
import json
import os
import random
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import httpx
import msgpack
import websockets.sync.client as ws_client
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

REPO = Path(__file__).resolve().parent.parent

from bench.serving import (GENESIS, K, HPIUser, Server, build_prompts, cpu_s, free_port, log, machine,
                           prepare, replace_table)

CACHE = REPO / "var" / "bench-load"  # prepared prompts, answers and drafts (git-ignored)


# ---- prompts, answers and drafts ------------------------------------------------------------


def prepared(model: str, new: int, n: int, long: bool) -> list[dict]:
    """bench/serving.py's prompts with their anchor-only answers and the resonator's drafts,
    cached in var/bench-load by model file, answer length and prompt choice."""
    from hpi.models import resolve_model_path

    path = resolve_model_path(model)
    stat = path.stat() if path.is_file() else next(path.glob("*.safetensors"), path).stat()
    key = hashlib.sha256(f"{path}|{stat.st_size}|{stat.st_mtime_ns}|{new}|{n}|{long}".encode()).hexdigest()[:16]
    cache = CACHE / f"prepared-{key}.json"
    if cache.exists():
        return json.loads(cache.read_text())
    from hpi.models import load_model

    os.environ.setdefault("HPI_DATA_DIR", str(REPO / "var" / "test-data"))  # the tests' pack cache
    lm = load_model(model, "cpu")
    prompts = [p for p in build_prompts(lm, 24) if long or not p["id"].startswith("long-")][:n]
    for p in prompts:  # what the users need of the model besides its answers
        p["eos"], p["vocab"] = list(lm.eos_token_ids), lm.config.vocab_size
    del lm
    gc.collect()
    prepare(prompts, new, model)
    CACHE.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(prompts))
    return prompts


def lost_and_repeated(truth: list[int], got: list[int]) -> tuple[int, int]:
    """Tokens of `truth` missing from `got`, and tokens in `got` that `truth` does not have there."""
    lost = repeated = 0
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(None, truth, got, autojunk=False).get_opcodes():
        lost += (i2 - i1) if op in ("delete", "replace") else 0
        repeated += (j2 - j1) if op in ("insert", "replace") else 0
    return lost, repeated


# ---- the run's shared state ------------------------------------------------------------------


class Run:
    """What every user of one run shares: the anchor's URL, the deadline, counts of errors."""

    def __init__(self, url: str, wall: float, faults: bool, error_rate: float, seed: int):
        self.url, self.faults, self.error_rate, self.seed = url, faults, error_rate, seed
        self.t0 = time.monotonic()
        self.deadline = self.t0 + wall
        self.errors: dict[str, list[float]] = defaultdict(list)  # code -> seconds until it came back
        self.channels = itertools.count()  # websockets opened, for the faults' one in ten
        self.lock = threading.Lock()
        self.confirmed = 0  # tokens confirmed so far, all users

    def error(self, code: str, seconds: float) -> None:
        with self.lock:
            self.errors[code].append(seconds)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def backoff(self, seconds: float) -> None:
        time.sleep(max(0.0, min(seconds, self.left())))


def address(u: int) -> str:
    """User u's loopback address: 127.0.1.1, 127.0.1.2, ... (127.0.0.1 is the health poller's)."""
    return f"127.0.{1 + u // 250}.{1 + u % 250}"


class Unfinished(Exception):
    """The user gave up: its deadline passed, or the anchor refused it for good."""


class Dropped(Exception):
    """The user dropped its own websocket (the fault)."""


def code_of(r: httpx.Response) -> str:
    try:
        return f"{r.status_code} {r.json()['error']['code']}"
    except (ValueError, KeyError, TypeError):
        return str(r.status_code)


def request(run: Run, client: httpx.Client, method: str, path: str, **kw) -> httpx.Response:
    """A request retried after refusals (429, 503) and connection failures until the deadline;
    other errors end the user."""
    while run.left() > 0:
        t0 = time.monotonic()
        try:
            r = client.request(method, path, **kw)
        except httpx.HTTPError as e:
            run.error(f"http {type(e).__name__}", time.monotonic() - t0)
            run.backoff(0.5)
            continue
        if r.status_code < 400:
            return r
        code = code_of(r)
        run.error(code, time.monotonic() - t0)
        if r.status_code not in (429, 503):
            raise Unfinished(code)
        run.backoff(float(r.headers.get("Retry-After", 1)))
    raise Unfinished("deadline")


# ---- the users ---------------------------------------------------------------------------------


class LoadUser(HPIUser):
    """A page (bench/serving.py's HPIUser: its session, then its answer over the sync channel) that
    retries what is refused, reconnects after failures and, under --faults, drops one websocket in
    ten that it opens."""

    def __init__(self, run: Run, prompt: dict, u: int, new: int):
        super().__init__(run.url, prompt, perfect=False)
        self.run, self.u, self.new = run, u, new
        self.rng = random.Random(run.seed * 1000 + u)
        self.addr = address(u)
        self.confirmed: list[int] = []
        self.ws = None
        self.drop_after = 0
        self.first = None  # seconds from the start to the first confirmed token
        self.connects = self.drops = self.recovered = self.lost = 0
        self.finished = False
        self.why = ""
        self.trace: list[str] = []  # what happened on its channels, reported if its answer differs
        # The resonator's draft of each pass, by the confirmed tokens it follows.
        starts, n = {}, 0
        for d in prompt["plan"]:
            starts[n] = d
            acc = next((i for i, (a, b) in enumerate(zip(d, prompt["truth"][n:], strict=False)) if a != b), len(d))
            n += acc + 1
        self.plans = starts

    # -- HTTP: the session, its hologram, and its deletion
    def setup(self) -> None:
        self.client = httpx.Client(base_url=self.url, timeout=120,
                                   transport=httpx.HTTPTransport(local_address=self.addr))
        r = request(self.run, self.client, "POST", "/v1/sessions", json={"messages": self.p["messages"]})
        self.s = r.json()
        self.auth = {"Authorization": f"Bearer {self.s['token']}"}
        request(self.run, self.client, "GET", self.s["hologram_url"], headers=self.auth)
        self.prompt_len = self.s["n_tokens"]
        if self.prompt_len != len(self.p["ids"]):
            raise Unfinished(f"the anchor's prompt has {self.prompt_len} tokens, the prepared one {len(self.p['ids'])}")

    def done(self) -> bool:
        return len(self.confirmed) >= self.new or bool(self.confirmed) and self.confirmed[-1] in self.p["eos"]

    # -- the sync channel
    def position(self) -> int:
        return self.prompt_len + len(self.confirmed)

    def chain(self) -> bytes:
        from hpi.protocol.frames import chain_next
        c = GENESIS
        for t in self.confirmed:
            c = chain_next(c, t)
        return c

    def open(self) -> None:
        self.close()
        url = self.url.replace("http://", "ws://") + f"/v1/sessions/{self.s['session_id']}/sync"
        self.ws = ws_client.connect(url, open_timeout=30, close_timeout=2, proxy=None,
                                    source_address=(self.addr, 0)).__enter__()
        self.connects += 1
        self.drop_after = self.rng.randint(1, 3) if self.run.faults and next(self.run.channels) % 10 == 0 else 0
        self.trace.append(f"open at {len(self.confirmed)}" + (f", drop after {self.drop_after}" if self.drop_after else ""))
        self.hello()

    def hello(self) -> None:
        r = self.frame(type="hello", token=self.s["token"], position=self.position(), chain=self.chain(),
                       temperature=0.0, seed=0)
        if r["type"] == "error":
            self.run.error(f"frame {r['code']} (hello)", 0.0)
            raise FrameError(r)
        self.trace.append(f"ready at {len(self.confirmed)}: position {r['position'] - self.prompt_len}, "
                          f"{len(r['tokens'])} tokens{', refresh' if r['refresh'] else ''}")
        if r["refresh"]:  # the anchor does not know this page's chain: confirmed tokens were lost
            keep = len(os.path.commonprefix([self.confirmed, r["tokens"]]))
            self.lost += len(self.confirmed) - keep
            self.confirmed = list(r["tokens"])
        else:  # verdicts this page never received (its channel went away)
            self.recovered += len(r["tokens"])
            self.confirmed += r["tokens"]

    def frame(self, **f) -> dict:
        self.ws.send(msgpack.packb({"v": 1, **f}, use_bin_type=True))
        return msgpack.unpackb(self.ws.recv(timeout=max(1.0, self.run.left())), raw=False)

    def drafts(self) -> list[int]:
        at = len(self.confirmed)
        d = list(self.plans.get(at) or self.p["truth"][at:at + K])
        if len(d) > 1 and self.rng.random() < self.run.error_rate:
            i = self.rng.randrange(len(d))
            d[i] = (d[i] + 1) % self.p["vocab"]
        return d

    def drop(self) -> None:
        """Go away without a close frame: a RST (SO_LINGER 0) or a FIN, by turns."""
        self.drops += 1
        self.trace.append(f"drop at {len(self.confirmed)} ({'rst' if self.drops % 2 else 'fin'})")
        if self.drops % 2:
            self.ws.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close()
        raise Dropped

    def close(self) -> None:
        if self.ws is not None:
            self.ws.close_socket()
            self.ws = None

    def pass_(self) -> None:
        drafts = self.drafts()
        t0 = time.monotonic()
        self.ws.send(msgpack.packb({"v": 1, "type": "draft", "position": self.position(), "chain": self.chain(),
                                    "tokens": drafts}, use_bin_type=True))
        if self.drop_after:
            self.drop_after -= 1
            if self.drop_after == 0:
                self.drop()
        v = msgpack.unpackb(self.ws.recv(timeout=max(1.0, self.run.left())), raw=False)
        if v["type"] == "error":
            self.run.error(f"frame {v['code']}", time.monotonic() - t0)
            self.trace.append(f"draft at {len(self.confirmed)}: {v['code']}")
            raise FrameError(v)
        self.trace.append(f"draft at {len(self.confirmed)} of {len(drafts)}: {v['type']} {v['accepted']}, "
                          f"position {v['position'] - self.prompt_len}")
        self.rtts.append(time.monotonic() - t0)
        self.passes += 1
        self.accepted += v["accepted"]
        got = drafts[:v["accepted"]] + [v["token"]]
        self.confirmed += got
        with self.run.lock:
            self.run.confirmed += len(got)
        if self.first is None:
            self.first = time.monotonic() - self.run.t0

    def decode(self) -> list[int]:
        while not self.done():
            if self.run.left() <= 0:
                raise Unfinished("deadline")
            t0 = time.monotonic()
            try:
                if self.ws is None:
                    self.open()
                    continue  # `ready` may have brought the rest of the answer
                self.pass_()
            except FrameError as e:
                code = e.args[0]["code"]
                if code in ("session_not_found", "forbidden", "bad_frame", "sampling_mismatch", "session_full"):
                    raise Unfinished(f"frame {code}") from None
                if code not in ("stale_draft", "storage_error"):  # busy, rate limited, memory full: back off
                    self.run.backoff(1.0)
                try:
                    self.hello()
                except (FrameError, ConnectionClosed, OSError, TimeoutError):
                    self.close()
            except InvalidStatus as e:  # the channel refused: an unknown session is 403
                self.run.error(f"ws {e.response.status_code}", time.monotonic() - t0)
                self.close()
                if e.response.status_code == 403:
                    raise Unfinished("ws 403") from None
                self.run.backoff(1.0)
            except Dropped:
                pass
            except (ConnectionClosed, InvalidHandshake, OSError, TimeoutError) as e:
                self.run.error(f"ws {type(e).__name__}", time.monotonic() - t0)
                if not self.trace or not self.trace[-1].startswith(f"ws {type(e).__name__}"):
                    self.trace.append(f"ws {type(e).__name__} at {len(self.confirmed)}")
                self.close()
                self.run.backoff(0.5)
        return self.confirmed

    def go(self) -> None:
        try:
            self.setup()
            self.decode()
            self.finished = True
        except Unfinished as e:
            self.why = str(e)
        finally:
            self.close()
            if getattr(self, "s", None) and self.run.left() > 0:
                try:  # a page that is done gives its room back
                    self.client.delete(f"/v1/sessions/{self.s['session_id']}", headers=self.auth)
                except httpx.HTTPError:
                    pass
            if hasattr(self, "client"):
                self.client.close()


class FrameError(Exception):
    """An `error` frame from the anchor."""


class ServerOnlyUser:
    """POST /v1/chat/completions, streamed: the anchor decodes the answer alone."""

    def __init__(self, run: Run, prompt: dict, u: int, new: int):
        self.run, self.p, self.u, self.new = run, prompt, u, new
        self.first = None
        self.text = ""
        self.finished = False
        self.why = ""

    def go(self) -> None:
        body = {"messages": self.p["messages"], "max_tokens": self.new, "temperature": 0, "stream": True}
        transport = httpx.HTTPTransport(local_address=address(self.u))
        with httpx.Client(base_url=self.run.url, timeout=httpx.Timeout(60, read=None), transport=transport) as c:
            while self.run.left() > 0:
                t0 = time.monotonic()
                try:
                    with c.stream("POST", "/v1/chat/completions", json=body) as r:
                        if r.status_code != 200:
                            r.read()
                            self.run.error(code_of(r), time.monotonic() - t0)
                            if r.status_code not in (429, 503):
                                self.why = code_of(r)
                                return
                            self.run.backoff(float(r.headers.get("Retry-After", 1)))
                            continue
                        parts = []
                        for line in r.iter_lines():
                            if not line.startswith("data: ") or line == "data: [DONE]":
                                continue
                            piece = json.loads(line[6:])["choices"][0]["delta"].get("content")
                            if piece and self.first is None:
                                self.first = time.monotonic() - self.run.t0
                            parts.append(piece or "")
                        self.text, self.finished = "".join(parts), True
                        return
                except httpx.HTTPError as e:
                    self.run.error(f"http {type(e).__name__}", time.monotonic() - t0)
                    self.run.backoff(0.5)
            self.why = "deadline"

    @property
    def tokens(self) -> int:
        truth = self.p["truth"][:self.new]
        end = next((i + 1 for i, t in enumerate(truth) if t in self.p["eos"]), len(truth))
        return end if self.finished and self.text == self.p["text"] else 0


# ---- the anchor and what is measured around it ------------------------------------------------


def status_kb(pid: int, field: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


class Anchor:
    """`hpi serve` on a fixed port and data dir, restartable (the faults)."""

    def __init__(self, model: str, threads: int, settings: dict[str, str], data: Path):
        self.port, self.data = free_port(), data
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {"HPI_DATA_DIR": str(data), "HPI_MODEL": model, "HPI_PORT": str(self.port),
                    "OMP_NUM_THREADS": str(threads), "HPI_THREADS": str(threads), **settings}
        self.log = data / "anchor.log"
        self.processes: list[Server] = []
        self.cpu: dict[int, float] = {}  # last CPU seconds read, per process
        self.cpu_up: dict[int, float] = {}  # CPU seconds a process had spent when it was up (its startup)
        self.peak_kb = 0
        self.start()

    def start(self) -> None:
        t0 = time.monotonic()
        self.server = Server([sys.executable, "-m", "hpi.cli", "serve"], self.env, self.url + "/healthz", "hpi",
                             self.log)
        self.processes.append(self.server)
        self.startup_s = time.monotonic() - t0
        self.sample()
        self.cpu_up[self.server.proc.pid] = self.cpu.get(self.server.proc.pid, 0.0)

    def reset_peak(self) -> None:
        """Start a run's peak RSS afresh (VmHWM back to the current RSS)."""
        try:
            Path(f"/proc/{self.server.proc.pid}/clear_refs").write_text("5")
        except OSError:
            pass
        self.peak_kb = 0
        self.sample()

    def sample(self) -> None:
        """Read the live process's CPU seconds and peak RSS (a killed one keeps its last reading)."""
        pid = self.server.proc.pid
        try:
            self.cpu[pid] = cpu_s(pid)
        except (OSError, IndexError):
            return
        for field in ("VmHWM", "VmRSS"):
            self.peak_kb = max(self.peak_kb, status_kb(pid, field) or 0)

    def cpu_total(self) -> float:
        """CPU seconds of serving: every process's, less its startup's."""
        return sum(c - self.cpu_up.get(pid, 0.0) for pid, c in self.cpu.items())

    def kill(self) -> None:
        self.sample()
        self.server.proc.kill()
        self.server.proc.wait(30)

    def stop(self) -> None:
        self.sample()
        if self.server.proc.poll() is None:
            self.server.stop()

    def log_size(self) -> int:
        return self.log.stat().st_size if self.log.exists() else 0

    def tracebacks(self, since: int = 0) -> int:
        """Failures the anchor logged with a traceback, from byte `since` of its log (a bug even
        where the client coped)."""
        text = self.log.read_bytes()[since:].decode(errors="replace") if self.log.exists() else ""
        # A chained traceback is two; count each logged failure once.
        chained = text.count("During handling of the above exception") + text.count("direct cause of the following")
        return text.count("Traceback (most recent call last):") - chained


# /healthz is polled from a process of its own, as a proxy's or an orchestrator's health check
# would be: a thread among the users' threads would measure this process's own GIL as well.
HEALTH_PROBE = """
import sys, time, httpx
with httpx.Client(base_url=sys.argv[1], timeout=10) as c:
    while True:
        t0 = time.monotonic()
        try:
            c.get("/healthz").raise_for_status()
            print(time.monotonic() - t0, flush=True)
        except httpx.HTTPError:
            print("failed", flush=True)
        time.sleep(max(0.0, 0.1 - (time.monotonic() - t0)))
"""


class Poller(threading.Thread):
    """/healthz every 100 ms (from a process of its own), and the anchor's CPU and memory."""

    def __init__(self, anchor: Anchor):
        super().__init__(daemon=True)
        self.anchor, self.stopping = anchor, threading.Event()
        self.latencies: list[float] = []
        self.failures = 0

    def run(self) -> None:
        probe = subprocess.Popen([sys.executable, "-c", HEALTH_PROBE, self.anchor.url], stdout=subprocess.PIPE,
                                 text=True)
        while not self.stopping.is_set():
            self.anchor.sample()
            self.stopping.wait(0.1)
        probe.terminate()
        out, _ = probe.communicate()
        for line in out.split():
            if line == "failed":
                self.failures += 1
            else:
                self.latencies.append(float(line))


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, int(q * len(v)))]


def start_anchor(args) -> Anchor:
    """One anchor for all the runs, with a fresh data dir (the model pack and the converted model
    from the tests' cache, which the first run fills)."""
    data = Path(tempfile.mkdtemp(prefix="hpi-load-"))
    for kept in ("packs", "models"):
        cache = REPO / "var" / "test-data" / kept
        cache.mkdir(parents=True, exist_ok=True)
        (data / kept).symlink_to(cache)
    anchor = Anchor(args.model, args.threads, dict(s.split("=", 1) for s in args.set), data)
    log(f"anchor up in {anchor.startup_s:.1f} s ({anchor.url}, log {anchor.log})")
    return anchor


def run_once(args, anchor: Anchor, prompts: list[dict], users: int, faults: bool) -> dict:
    log(f"{users} users{' (faults)' if faults else ''}")
    n_server = round(users * args.server_share)
    run = Run(anchor.url, args.wall, faults, args.error_rate, seed=users)
    pages = [LoadUser(run, prompts[u % len(prompts)], u, args.new) for u in range(users)]
    servers = [ServerOnlyUser(run, prompts[u % len(prompts)], users + u, args.new) for u in range(n_server)]
    goal = sum(min(args.new, len(p.p["answer"])) for p in pages)
    poller = Poller(anchor)
    outage = None
    since = anchor.log_size()
    load0 = os.getloadavg()[0]
    anchor.reset_peak()
    cpu0 = anchor.cpu_total()
    poller.start()
    run.t0 = time.monotonic()
    run.deadline = run.t0 + args.wall
    threads = [threading.Thread(target=x.go, daemon=True) for x in pages + servers]
    for t in threads:
        t.start()
    if faults:  # SIGKILL once a third of the tokens are confirmed, then restart on the same dir
        while run.confirmed < goal / 3 and run.left() > 0 and any(t.is_alive() for t in threads):
            time.sleep(0.05)
        if run.left() > 0 and any(t.is_alive() for t in threads):
            t_kill = time.monotonic()
            anchor.kill()
            log(f"SIGKILL at {t_kill - run.t0:.1f} s, {run.confirmed} of {goal} tokens confirmed")
            anchor.start()
            outage = time.monotonic() - t_kill
            log(f"restarted: {outage:.1f} s without an anchor")
    for t in threads:
        t.join(max(0.0, run.left()) + 60)
    wall = time.monotonic() - run.t0
    poller.stopping.set()
    poller.join()
    anchor.sample()
    cpu = anchor.cpu_total() - cpu0
    tracebacks = anchor.tracebacks(since)

    confirmed = sum(len(p.confirmed) for p in pages)
    differ = sum(p.confirmed != p.p["truth"][:len(p.confirmed)] for p in pages)
    lost = repeated = 0
    for p in pages:
        missing, extra = lost_and_repeated(p.p["truth"][:len(p.confirmed)], p.confirmed)
        lost += p.lost + missing
        repeated += extra
    rtts = [r for p in pages for r in p.rtts]
    firsts = [p.first for p in pages if p.first is not None]
    s_firsts = [s.first for s in servers if s.first is not None]
    errors = {code: {"count": len(v), "p50_ms": 1000 * pct(v, .5), "max_ms": 1000 * max(v)}
              for code, v in sorted(run.errors.items())}
    row = {
        "users": users, "server_only_users": n_server, "faults": faults, "wall_s": wall,
        "finished": sum(p.finished for p in pages), "server_only_finished": sum(s.finished for s in servers),
        "unfinished_why": dict(sorted({w: sum(x.why == w for x in pages + servers)
                                       for w in {x.why for x in pages + servers if x.why}}.items())),
        "confirmed_tokens": confirmed, "confirmed_tokens_per_s": confirmed / wall,
        "server_only_tokens": sum(s.tokens for s in servers),
        "server_only_tokens_per_s": sum(s.tokens for s in servers) / wall,
        "passes": sum(p.passes for p in pages), "accepted_per_pass": sum(p.accepted for p in pages) / max(1, sum(
            p.passes for p in pages)),
        "rtt_p50_ms": 1000 * (pct(rtts, .5) or 0), "rtt_p99_ms": 1000 * (pct(rtts, .99) or 0),
        "first_token_p50_s": pct(firsts, .5), "first_token_p99_s": pct(firsts, .99),
        "server_only_first_token_p50_s": pct(s_firsts, .5), "server_only_first_token_p99_s": pct(s_firsts, .99),
        "healthz_p50_ms": 1000 * (pct(poller.latencies, .5) or 0), "healthz_p99_ms": 1000 * (pct(poller.latencies, .99) or 0),
        "healthz_max_ms": 1000 * max(poller.latencies, default=0), "healthz_polls": len(poller.latencies),
        "healthz_failures": poller.failures,
        "rss_peak_mib": anchor.peak_kb / 1024, "anchor_cpu_s": cpu,
        "anchor_cpu_ms_per_token": 1000 * cpu / max(1, confirmed + sum(s.tokens for s in servers)),
        "errors": errors, "load_avg": [round(load0, 2), round(os.getloadavg()[0], 2)],
        "differing": differ, "server_only_differing": sum(s.finished and s.text != s.p["text"] for s in servers),
        "anchor_tracebacks": tracebacks,
    }
    row["differing_answers"] = [
        {"user": p.u, "prompt": p.p["id"], "truth": p.p["truth"], "confirmed": p.confirmed, "trace": p.trace}
        for p in pages if p.confirmed != p.p["truth"][:len(p.confirmed)]]
    if faults:
        row.update(lost_tokens=lost, repeated_tokens=repeated, dropped_websockets=sum(p.drops for p in pages),
                   websockets=sum(p.connects for p in pages), recovered_from_ready=sum(p.recovered for p in pages),
                   outage_s=outage)
    log(json.dumps(row))
    return row


# ---- report -----------------------------------------------------------------------------------


def render(result: dict) -> str:
    m = result["machine"]
    lines = [f"{m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; {result['date']}; the anchor (`hpi serve "
             f"--model {result['model']}`, {result['threads']} threads, default settings"
             f"{' but ' + ', '.join(result['settings']) if result['settings'] else ''}) and the users' threads on "
             f"the same machine, 1-min load average {m['load_avg_start']:.2f} at the start, {m['load_avg_end']:.2f} "
             f"at the end. {result['new']}-token greedy answers, K = {result['k']} drafts a pass, the resonator's "
             f"drafts with a wrong token in {100 * result['error_rate']:.0f}% of passes; "
             f"{100 * result['server_share']:.0f}% more users server-only; {result['wall']:.0f} s wall limit per run.",
             "",
             "| users (+ server-only) | faults | wall s | done | confirmed tok/s | server-only tok/s | round trip p50 / p99 ms "
             "| first token p50 / p99 s | server-only first token p50 s | /healthz p50 / p99 / max ms | RSS peak MiB "
             "| anchor CPU s | errors (count, p50 / max ms) | differing | lost / repeated |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|"]

    def f(x, d=1):
        return "" if x is None else f"{x:.{d}f}"

    for r in result["runs"]:
        errs = "; ".join(f"{c}: {e['count']} ({e['p50_ms']:.0f} / {e['max_ms']:.0f})" for c, e in r["errors"].items())
        lines.append(
            f"| {r['users']} (+{r['server_only_users']}) | {'yes' if r['faults'] else 'no'} | {r['wall_s']:.0f} | "
            f"{r['finished']}/{r['users']} (+{r['server_only_finished']}/{r['server_only_users']}) | "
            f"{r['confirmed_tokens_per_s']:.1f} | {r['server_only_tokens_per_s']:.1f} | "
            f"{r['rtt_p50_ms']:.0f} / {r['rtt_p99_ms']:.0f} | {f(r['first_token_p50_s'])} / {f(r['first_token_p99_s'])} "
            f"| {f(r['server_only_first_token_p50_s'])} | {r['healthz_p50_ms']:.1f} / {r['healthz_p99_ms']:.1f} / "
            f"{r['healthz_max_ms']:.0f} | {r['rss_peak_mib']:.0f} | {r['anchor_cpu_s']:.1f} | {errs or 'none'} | "
            f"{r['differing']} + {r['server_only_differing']} | "
            f"{str(r['lost_tokens']) + ' / ' + str(r['repeated_tokens']) if r['faults'] else ''} |")
    for r in result["runs"]:
        if r["faults"]:
            lines.append(f"\nFaults at {r['users']} users: {r['dropped_websockets']} of {r['websockets']} websockets "
                         f"dropped mid-answer, the anchor SIGKILLed and back after {f(r['outage_s'])} s; "
                         f"{r['recovered_from_ready']} tokens reached their pages through `ready` (verdicts whose "
                         f"channel went away); {r['lost_tokens']} lost, {r['repeated_tokens']} repeated.")
    lines.append("\n1-min load average (start, end of each run, other work on the machine included): " + "; ".join(
        f"{r['users']} users{' (faults)' if r['faults'] else ''}: {r['load_avg'][0]:.2f}, {r['load_avg'][1]:.2f}"
        for r in result["runs"] if "load_avg" in r) + ".")
    lines.append("\nTracebacks in the anchor's log: " + ", ".join(
        f"{r['users']} users{' (faults)' if r['faults'] else ''}: {r['anchor_tracebacks']}" for r in result["runs"]) + ".")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", default="16,64,128", help="comma-separated user counts, one run each")
    ap.add_argument("--new", type=int, default=32, help="tokens per answer")
    ap.add_argument("--wall", type=float, default=300, help="wall limit of one run, seconds")
    ap.add_argument("--server-share", type=float, default=0.25, help="server-only users, as a share of --users")
    ap.add_argument("--error-rate", type=float, default=0.1, help="share of passes with a wrong token injected")
    ap.add_argument("--prompts", type=int, default=16, help="distinct prompts (users take them in turn)")
    ap.add_argument("--long", action="store_true", help="include the 1,100-token summaries among the prompts")
    ap.add_argument("--model", default="default")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--set", action="append", default=[], metavar="HPI_X=Y", help="an anchor setting (repeatable)")
    ap.add_argument("--faults", action="store_true", help="the long fault versions: 10%% of websockets dropped, "
                                                          "SIGKILL and restart mid-run")
    ap.add_argument("--quick", action="store_true", help="a smoke run: 16 users, 12-token answers, 120 s")
    ap.add_argument("--out", help="JSON results (default docs/results/load.json; with --quick a temporary file)")
    ap.add_argument("--append", action="store_true", help="add these runs to the file's, replacing same ones")
    args = ap.parse_args(argv)
    if args.quick:
        args.users, args.new, args.wall, args.prompts = "16", 12, 120.0, 8
    out = Path(args.out or (Path(tempfile.gettempdir()) / "hpi-load-quick.json" if args.quick
                            else REPO / "docs" / "results" / "load.json"))
    prompts = prepared(args.model, args.new, args.prompts, args.long)
    for p in prompts:
        p["eos"] = set(p["eos"])
    load0 = os.getloadavg()[0]
    anchor = start_anchor(args)
    try:
        runs = [run_once(args, anchor, prompts, int(u), args.faults) for u in args.users.split(",")]
    finally:
        anchor.stop()
    result = {"anchor_startup_s": anchor.startup_s, "date": datetime.date.today().isoformat(), "machine": machine(args.threads, load0), "model": args.model,
              "threads": args.threads, "settings": args.set, "new": args.new, "k": K, "error_rate": args.error_rate,
              "server_share": args.server_share, "wall": args.wall, "prompts": len(prompts),
              "command": "python -m bench.load " + " ".join(argv if argv is not None else sys.argv[1:]), "runs": runs}
    if args.append and out.exists():
        old = json.loads(out.read_text())
        keep = [r for r in old.get("runs", []) if (r["users"], r["faults"]) not in {(x["users"], x["faults"]) for x in runs}]
        result["runs"] = keep + runs
        result["commands"] = old.get("commands", [old.get("command")]) + [result["command"]]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(render(result))
    log(f"wrote {out}")
    if not args.quick and not args.out:
        replace_table(REPO / "docs" / "RELIABILITY.md", "load table", render(result))


if __name__ == "__main__":
    main()
