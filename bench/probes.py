"""The outside attacker's probes, repeated against a real anchor process: what each one costs now.

An anchor is started as its own process (`hpi serve`, the default model unless --model says
otherwise) on 127.0.0.1 with a fresh data directory (the model pack is reused from the
cache) and its default settings, but for max_session_tokens (512, so that one-token drafts
reach it in seconds). Each probe is what an anonymous client did when the holes were found (2026-11-29):

  leak       a user stores their session's states (pool "token", a PIN in the text); an
             anonymous client and another owner list, search and delete
  memory     a memory of 16x16 matrices with 2^19 satellites; a 5-token learn on the largest
             memory allowed; a 2^18-token vocabulary memory created and deleted
  sessions   one client creates sessions until refused, then another client (127.0.0.2)
             creates one; a session grown by drafts alone until refused
  slow work  40 concurrent long completions while /healthz is polled; then every client
             goes away and the decoded-token counter must stop
  websocket  a channel of an unknown session; a 15 MiB message; a ping flood never read
  errors     dream on an empty memory, a 1e308 scale, a 1e308 search vector, each followed
             by a request on the same keep-alive connection
  frames     loosely typed frames and a token id past the vocabulary
  origins    a DNS-rebinding Host header, a foreign Origin, a websocket from it

The anchor's RSS (and its peak, VmHWM) comes from /proc/PID/status.

    python -m bench.probes [--model default] [--out docs/results/probes.json]    # and docs/security.md
"""

from __future__ import annotations

import argparse
import base64
import datetime
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import msgpack
import websockets.sync.client as ws_client
from websockets.exceptions import ConnectionClosed, InvalidStatus

REPO = Path(__file__).resolve().parent.parent
GENESIS = bytes(32)
USER = [{"role": "user", "content": "Remember this for me: my PIN is 4711. What is a good way to keep it safe?"}]
MiB = 1 << 20
SESSION_TOKENS = 512  # the probe's anchor runs with this max_session_tokens, so drafts reach it in seconds


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


class Anchor:
    """`hpi serve` in a process of its own."""

    def __init__(self, model: str, data_dir: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "HPI_DATA_DIR": str(data_dir), "HPI_MODEL": model, "HPI_PORT": str(self.port),
               "HPI_MAX_SESSION_TOKENS": str(SESSION_TOKENS)}
        self.proc = subprocess.Popen([sys.executable, "-m", "hpi.cli", "serve"], cwd=REPO, env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 600
        while True:
            try:
                if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the anchor did not start: " + self.proc.stderr.read().decode()[-2000:])
            time.sleep(0.5)

    def rss_mib(self) -> float:
        return status_kb(self.proc.pid, "VmRSS") / 1024

    def peak_mib(self) -> float:
        return status_kb(self.proc.pid, "VmHWM") / 1024

    def reset_peak(self) -> None:
        Path(f"/proc/{self.proc.pid}/clear_refs").write_text("5")  # resets VmHWM to the current RSS

    def cpu_s(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def client(anchor: Anchor, source: str = "127.0.0.1", **kw) -> httpx.Client:
    return httpx.Client(base_url=anchor.url, transport=httpx.HTTPTransport(local_address=source),
                        timeout=kw.pop("timeout", 120), **kw)


def code_of(r: httpx.Response) -> str:
    try:
        return f"{r.status_code} {r.json()['error']['code']}"
    except (ValueError, KeyError, TypeError):
        return str(r.status_code)


def ws_url(anchor: Anchor, session_id: str) -> str:
    return anchor.url.replace("http://", "ws://") + f"/v1/sessions/{session_id}/sync"


def frame(ws, **f) -> dict:
    ws.send(msgpack.packb(f, use_bin_type=True))
    return msgpack.unpackb(ws.recv(timeout=60), raw=False)


def probe_leak(a: Anchor) -> list[tuple[str, str, str]]:
    c = client(a)
    s = c.post("/v1/sessions", json={"messages": USER}).json()
    auth = {"Authorization": f"Bearer {s['token']}"}
    r = c.post("/v1/capture/store", headers=auth, json={"session_id": s["session_id"], "collection": "mine",
                                                        "pool": "token", "layer": 3})
    stored = code_of(r) if r.status_code != 200 else f"200, {r.json()['added']} vectors"
    anon = client(a)
    other = anon.post("/v1/capture/store", json={"text": "another owner's text", "collection": "theirs",
                                                   "layer": 3}).json()
    b = {"Authorization": f"Bearer {other['owner_token']}"}
    listed = anon.get("/v1/capture/collections")
    seen_b = [x["name"] for x in anon.get("/v1/capture/collections", headers=b).json()["collections"]]
    search = anon.post("/v1/capture/search", headers=b, json={"collection": "mine", "vector": [0.0] * 576})
    delete = anon.delete("/v1/capture/collections/mine", headers=b)
    own = c.post("/v1/capture/search", headers=auth, json={"collection": "mine", "vector": [0.0] * 576})
    return [("leak", "user stores own session states", stored),
            ("leak", "anonymous lists collections", code_of(listed)),
            ("leak", "another owner lists", f"sees {seen_b}"),
            ("leak", "another owner searches / deletes the user's", f"{code_of(search)} / {code_of(delete)}"),
            ("leak", "the user searches their own", str(own.status_code))]


def probe_memory(a: Anchor) -> list[tuple[str, str, str]]:
    c = client(a)
    rows = []
    a.reset_peak()
    rss0, cpu0, t0 = a.rss_mib(), a.cpu_s(), time.monotonic()
    r = c.post("/v1/memories", json={"name": "m", "dim": 16, "satellites": 524288})
    rows.append(("memory", "create dim 16, 2^19 satellites",
                 f"{code_of(r)}; {time.monotonic() - t0:.2f} s, {a.cpu_s() - cpu0:.2f} CPU-s, "
                 f"peak +{a.peak_mib() - rss0:.0f} MiB"))
    # the largest memory allowed at the default dim: halve the satellites until one is accepted
    sat = 1 << 22
    while (r := c.post("/v1/memories", json={"name": f"big{sat}", "satellites": sat})).status_code != 201:
        if sat == 1:
            return rows + [("memory", "largest memory allowed", code_of(r))]
        sat //= 2
    auth = {"Authorization": f"Bearer {r.json()['owner_token']}"}
    a.reset_peak()
    rss0, t0 = a.rss_mib(), time.monotonic()
    learn = c.post(f"/v1/memories/big{sat}/learn", headers=auth, json={"tokens": [1, 2, 3, 4, 5]})
    rows.append(("memory", f"5-token learn on the largest allowed (d 4, 2^{sat.bit_length() - 1} satellites)",
                 f"{code_of(learn)}; {1000 * (time.monotonic() - t0):.0f} ms, peak +{a.peak_mib() - rss0:.0f} MiB"))
    rss0 = a.rss_mib()
    r = c.post("/v1/memories", json={"name": "wide", "vocab": 1 << 18, "satellites": 1024}, headers=auth)
    made = code_of(r)
    d = c.delete("/v1/memories/wide", headers=auth)
    rows.append(("memory", "vocab 2^18: create, delete", f"{made}, {d.status_code}; RSS after delete "
                 f"{a.rss_mib() - rss0:+.0f} MiB"))
    return rows


def probe_sessions(a: Anchor) -> list[tuple[str, str, str]]:
    c = client(a, "127.0.0.10")
    made, last = [], None
    for _ in range(80):
        r = c.post("/v1/sessions", json={"messages": [{"role": "user", "content": "hi"}]})
        if r.status_code != 201:
            last = code_of(r)
            break
        made.append(r.json())
    other = client(a, "127.0.0.11").post("/v1/sessions", json={"messages": [{"role": "user", "content": "hi"}]})
    rows = [("sessions", "one client creates sessions", f"{len(made)} created, then {last}"),
            ("sessions", "another client creates one", code_of(other))]
    for s in made:  # the rest of the probes need room
        c.delete(f"/v1/sessions/{s['session_id']}", headers={"Authorization": f"Bearer {s['token']}"})
    s = client(a, "127.0.0.12").post("/v1/sessions", json={"messages": USER}).json()
    grown, reply, token = s["n_tokens"], {}, 17
    with ws_client.connect(ws_url(a, s["session_id"])) as ws:
        frame(ws, v=1, type="hello", token=s["token"], position=grown, chain=GENESIS, temperature=0.0, seed=0)
        chain = GENESIS
        for _ in range(2 * SESSION_TOKENS):  # each pass confirms at least the anchor's own token
            reply = frame(ws, v=1, type="draft", position=grown, chain=chain, tokens=[token])
            if reply["type"] == "error":
                break
            grown, chain, token = reply["position"], reply["chain"], reply["token"]
    rows.append(("sessions", f"one session grown by drafts alone from {s['n_tokens']} tokens",
                 f"stopped at {grown} tokens: {reply.get('code')}"))
    return rows


def probe_slow_work(a: Anchor) -> list[tuple[str, str, str]]:
    host, port = a.url.removeprefix("http://").split(":")
    body = json.dumps({"messages": USER, "max_tokens": 1024}).encode()
    socks = []
    for _ in range(40):  # raw sockets, so that going away is a real disconnect
        sock = socket.create_connection((host, int(port)))
        sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: "
                     f"application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        socks.append(sock)
    h = client(a)
    lat = []
    t_end = time.monotonic() + 15
    while time.monotonic() < t_end:
        t0 = time.monotonic()
        h.get("/healthz")
        lat.append(1000 * (time.monotonic() - t0))
        time.sleep(0.2)
    refused = 0
    for sock in socks:
        sock.setblocking(False)
        try:
            refused += sock.recv(64).startswith(b"HTTP/1.1 503")
        except BlockingIOError:
            pass
        sock.close()  # every client goes away mid-answer
    metric = lambda: float(next(line.split()[1] for line in h.get("/metrics").text.splitlines()  # noqa: E731
                                if line.startswith("hpi_tokens_decoded_total ")))
    time.sleep(2)
    d0 = metric()
    time.sleep(5)
    lat.sort()
    return [("slow work", "/healthz during 40 long completions",
             f"median {lat[len(lat) // 2]:.1f} ms, max {lat[-1]:.1f} ms ({len(lat)} polls)"),
            ("slow work", "completions turned away at once", f"{refused} of 40 got 503 server_busy"),
            ("slow work", "tokens decoded 2-7 s after every client left", f"{metric() - d0:.0f}")]


def probe_websocket(a: Anchor) -> list[tuple[str, str, str]]:
    rows = []
    try:
        ws_client.connect(ws_url(a, "nosuchsession")).close()
        rows.append(("websocket", "channel of an unknown session", "opened"))
    except InvalidStatus as e:
        rows.append(("websocket", "channel of an unknown session", f"refused, HTTP {e.response.status_code}"))
    s = client(a).post("/v1/sessions", json={"messages": [{"role": "user", "content": "hi"}]}).json()
    with ws_client.connect(ws_url(a, s["session_id"]), max_size=None) as ws:
        try:
            ws.send(b"\x00" * (15 * MiB))
            ws.recv(timeout=30)
            rows.append(("websocket", "a 15 MiB message", "answered"))
        except ConnectionClosed as e:
            rows.append(("websocket", "a 15 MiB message", f"closed, code {e.rcvd.code if e.rcvd else '?'}"))
    rss0 = a.rss_mib()
    host, port = a.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall((f"GET /v1/sessions/{s['session_id']}/sync HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket"
                  f"\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)
    ping = bytes([0x89, 0xFD]) + bytes(4) + b"p" * 125
    sent = 0
    try:
        for _ in range(2_000_000):
            sock.sendall(ping)
            sent += 1
    except OSError:
        pass
    sock.close()
    rows.append(("websocket", "2 M pings, never reading", f"dropped after {sent} pings; RSS {a.rss_mib() - rss0:+.1f} MiB"))
    return rows


def raw_requests(a: Anchor, requests: list[tuple[str, str, dict | None]], headers: dict) -> list[str]:
    """Requests one after the other on one keep-alive connection: the status of each, or 'reset'."""
    host, port = a.url.removeprefix("http://").split(":")
    extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    out = []
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        for method, path, body in requests:
            data = json.dumps(body).encode() if body is not None else b""
            try:
                sock.sendall(f"{method} {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
                             f"{extra}Content-Length: {len(data)}\r\n\r\n".encode() + data)
                got = b""
                while b"\r\n\r\n" not in got:
                    chunk = sock.recv(65536)
                    if not chunk:
                        raise ConnectionError
                    got += chunk
                head, _, rest = got.partition(b"\r\n\r\n")
                n = int(next(x.split(b":")[1] for x in head.split(b"\r\n") if x.lower().startswith(b"content-length")))
                while len(rest) < n:
                    rest += sock.recv(65536)
                code = json.loads(rest).get("error", {}).get("code", "") if rest.startswith(b"{") else ""
                out.append(f"{head.split()[1].decode()} {code}".strip())
            except (OSError, ConnectionError):
                out.append("reset")
    return out


def probe_errors(a: Anchor) -> list[tuple[str, str, str]]:
    c = client(a)
    m = c.post("/v1/memories", json={"name": "e"}).json()
    auth = {"Authorization": f"Bearer {m['owner_token']}"}
    dream, after = raw_requests(a, [("POST", "/v1/memories/e/dream", {"forget": 1}), ("GET", "/healthz", None)], auth)
    rows = [("errors", "dream forget=1 on an empty memory", f"{dream}; next request on the connection: {after}"),
            ("errors", "capture store with scale 1e308",
             code_of(c.post("/v1/capture/store", json={"text": "a text", "collection": "c", "scale": 1e308,
                                                       "layer": 3})))]
    store = c.post("/v1/capture/store", json={"text": "a text", "collection": "c2", "layer": 3}).json()
    r = c.post("/v1/capture/search", headers={"Authorization": f"Bearer {store['owner_token']}"},
               json={"collection": "c2", "vector": [1e308] * store["dim"]})
    rows.append(("errors", "search with a 1e308 vector", code_of(r)))
    return rows


def probe_frames(a: Anchor) -> list[tuple[str, str, str]]:
    s = client(a).post("/v1/sessions", json={"messages": [{"role": "user", "content": "hi"}]}).json()
    n = s["n_tokens"]
    hello = {"v": 1, "type": "hello", "token": s["token"], "position": n, "chain": GENESIS, "temperature": 0.0,
             "seed": 0}
    cases = {'"v": true': {**hello, "v": True}, '"position": "34"': {**hello, "position": str(n)},
             "a 32-character string chain": {**hello, "chain": "0" * 32}}
    rows = []
    with ws_client.connect(ws_url(a, s["session_id"])) as ws:
        for what, f in cases.items():
            rows.append(("frames", what, frame(ws, **f).get("code", "accepted")))
        frame(ws, **hello)
        draft = {"v": 1, "type": "draft", "position": n, "chain": GENESIS}
        rows.append(("frames", "string token ids", frame(ws, **draft, tokens=["5"]).get("code", "accepted")))
        rows.append(("frames", "token id = vocabulary size", frame(ws, **draft, tokens=[49152]).get("code", "accepted")))
    return rows


def probe_origins(a: Anchor) -> list[tuple[str, str, str]]:
    c = client(a)
    rows = [("origins", "Host: rebound.example", code_of(c.get("/v1/models", headers={"Host": "rebound.example"}))),
            ("origins", "Origin: http://evil.example",
             code_of(c.post("/v1/sessions", json={"messages": USER}, headers={"Origin": "http://evil.example"})))]
    s = c.post("/v1/sessions", json={"messages": [{"role": "user", "content": "hi"}]}).json()
    try:
        ws_client.connect(ws_url(a, s["session_id"]), origin="http://evil.example").close()
        rows.append(("origins", "websocket from http://evil.example", "opened"))
    except InvalidStatus as e:
        rows.append(("origins", "websocket from http://evil.example", f"refused, HTTP {e.response.status_code}"))
    return rows


# What the probes found before the fixes (issue 11, 2026-11-29), for the table.
BEFORE = {
    "anonymous lists collections": "200: every collection",
    "another owner searches / deletes the user's": "200 (token ids back verbatim) / 204",
    "create dim 16, 2^19 satellites": "201; 539 MB file, +2.05 GB peak, 5.6 CPU-s",
    "vocab 2^18: create, delete": "+768 MiB resident after delete",
    "one client creates sessions": "64 created, then 503 for everyone",
    "another client creates one": "503 too_many_sessions",
    "/healthz during 40 long completions": "waited up to 74.6 s",
    "tokens decoded 2-7 s after every client left": "decoding went on (+122 tokens in 60 s)",
    "channel of an unknown session": "accepted",
    "2 M pings, never reading": "+239 MiB RSS",
    "dream forget=1 on an empty memory": "500 IndexError text; next request reset",
    "capture store with scale 1e308": "500", "search with a 1e308 vector": "500",
    '"v": true': "accepted", '"position": "34"': "accepted", "a 32-character string chain": "accepted",
    "string token ids": "accepted", "token id = vocabulary size": "stale_draft",
    "Host: rebound.example": "200", "Origin: http://evil.example": "201",
    "websocket from http://evil.example": "accepted", "a 15 MiB message": "accepted (up to 16 MiB)",
    "one session grown by drafts alone from 54 tokens": "grew past max_prompt_tokens (58 to 1,200 tokens)",
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--out", default=str(REPO / "docs" / "results" / "probes.json"))
    ap.add_argument("--no-docs", action="store_true", help="do not rewrite docs/security.md's table")
    ap.add_argument("--only", default="", help="comma-separated probe names (leak, memory, ...); default all")
    args = ap.parse_args()
    data = Path(tempfile.mkdtemp(prefix="hpi-probes-"))
    for cache in (Path("~/.cache/hpi/packs").expanduser(), REPO / "var" / "test-data" / "packs"):
        if cache.is_dir():
            shutil.copytree(cache, data / "packs", dirs_exist_ok=True)
    anchor = Anchor(args.model, data)
    rows = []
    try:
        for probe in (probe_leak, probe_memory, probe_sessions, probe_errors, probe_frames, probe_origins,
                      probe_websocket, probe_slow_work):
            if args.only and probe.__name__.removeprefix("probe_") not in args.only.split(","):
                continue
            got = probe(anchor)
            rows += got
            for r in got:
                print(" | ".join(r), flush=True)
        rss = anchor.rss_mib()
    finally:
        anchor.stop()
        shutil.rmtree(data, ignore_errors=True)
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    print(f"\nAnchor: `hpi serve` (model {args.model}), one process on 127.0.0.1; {cpu}, {os.cpu_count()} cores; "
          f"RSS at the end {rss:.0f} MiB.\n")
    table = "\n".join(["| probe | what | before | now |", "|---|---|---|---|"] +
                      [f"| {group} | {what} | {BEFORE.get(what, '')} | {now} |" for group, what, now in rows]) + "\n"
    print(table)
    if not args.no_docs:
        doc = REPO / "docs" / "security.md"
        text = doc.read_text()
        start, end = "<!-- probes table -->", "<!-- /probes table -->"
        doc.write_text(text[:text.index(start) + len(start)] + "\n" + table + text[text.index(end):])
    Path(args.out).write_text(json.dumps({
        "date": datetime.date.today().isoformat(), "model": args.model, "cpu": cpu, "cores": os.cpu_count(),
        "rss_end_mib": round(rss, 1),
        "rows": [{"probe": g, "what": w, "before": BEFORE.get(w, ""), "now": n} for g, w, n in rows]}, indent=1) + "\n")


if __name__ == "__main__":
    main()
