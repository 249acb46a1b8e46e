"""Two anchors behind HAProxy on one Redis: when the anchor holding sessions is killed, they
finish on the other with exactly the anchor-only text.

Everything is real and on loopback: Debian's redis-server and haproxy (scripts/haproxy.cfg,
the file docker-compose.yml's "scaled" profile runs), two `hpi serve` processes on one
thread each, websockets through the proxy. Sessions are reconciled halfway, the anchor
holding the first one gets SIGKILL, and every session reconnects through the proxy, says
hello with what it had confirmed, and finishes. The time from the kill to each session's
next confirmed token is measured.

The short version runs in the suite on the tiny model. The long one is the benchmark of
docs/deploy.md: `HPI_FAILOVER_SESSIONS=16 HPI_FAILOVER_MODEL=default HPI_FAILOVER_OUT=docs/results/failover.json
python -m pytest -s tests/test_failover.py`.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import msgpack
import pytest
from websockets.exceptions import InvalidHandshake
from websockets.sync.client import connect

from hpi.protocol import frames
from hpi import completions
from hpi.sampling import Sampling
from tests.services import Anchor, haproxy, redis_server
from tests.syncing import sync_answer

SESSIONS = int(os.environ.get("HPI_FAILOVER_SESSIONS", "6"))
MODEL = os.environ.get("HPI_FAILOVER_MODEL", "")  # empty: the tiny test model
TOKENS = int(os.environ.get("HPI_FAILOVER_TOKENS", "24"))
OUT = os.environ.get("HPI_FAILOVER_OUT", "")


class Channel:
    """A sync websocket through the proxy, with the frame calls tests/syncing.py uses."""

    def __init__(self, url: str, session_id: str):
        self.ws = connect(url.replace("http://", "ws://") + f"/v1/sessions/{session_id}/sync", open_timeout=10)
        self.anchor = self.ws.response.headers.get("X-HPI-Anchor")

    def __enter__(self) -> Channel:
        self.ws.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.ws.__exit__(*exc)

    def send_bytes(self, data: bytes) -> None:
        self.ws.send(data)

    def receive_bytes(self) -> bytes:
        return self.ws.recv(timeout=120)

    def hello(self, token: str, position: int, chain: bytes) -> dict:
        self.send_bytes(msgpack.packb({"v": 1, "type": "hello", "token": token, "position": position,
                                       "chain": chain, "temperature": 0.0, "seed": 0}, use_bin_type=True))
        return msgpack.unpackb(self.receive_bytes(), raw=False)


@pytest.fixture(scope="module")
def lm(tiny):
    if not MODEL:
        return tiny
    from hpi.models import load_model
    return load_model(MODEL, device="cpu")


@pytest.fixture(scope="module")
def fleet(tiny_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("fleet")
    with redis_server(folder) as redis_url:
        env = {"HPI_MODEL": MODEL or str(tiny_model_dir), "HPI_SESSION_STORE": "redis", "HPI_REDIS_URL": redis_url,
               "HPI_THREADS": "1", "HPI_CLIENT_SHARE": "1"}  # every page here is one client, 127.0.0.1
        if MODEL:  # the real model's pack is built once, in the cache the other tests use
            env["HPI_DATA_DIR"] = os.environ["HPI_DATA_DIR"]
        anchors = {name: Anchor(folder / name, {"HPI_DATA_DIR": str(folder / name), **env}) for name in "ab"}
        try:
            for a in anchors.values():
                a.start()
            with haproxy(folder, *(f"127.0.0.1:{a.port}" for a in anchors.values())) as url:
                yield url, anchors
        finally:
            for a in anchors.values():
                a.stop()


def prompts(n: int) -> list[list[dict]]:
    topics = ["rivers", "bridges", "owls", "clocks", "maps", "salt", "glass", "rain", "bells", "kites",
              "ferns", "tides", "wheels", "lamps", "moss", "ink", "sand", "wool", "reeds", "coal"]
    return [[{"role": "user", "content": f"Tell me one thing about {topics[i % len(topics)]} ({i})."}]
            for i in range(n)]


def test_a_killed_anchors_sessions_finish_exactly_on_the_other(fleet, lm):
    url, anchors = fleet
    vocab = lm.config.vocab_size
    runs = []
    with httpx.Client(base_url=url, timeout=300) as http:
        for messages in prompts(SESSIONS):
            prompt = lm.chat_ids(messages)
            r = http.post("/v1/sessions", json={"messages": messages})
            assert r.status_code == 201, r.text
            body = r.json()
            runs.append({"body": body, "prompt": prompt, "anchor": r.headers["X-HPI-Anchor"],
                         "truth": list(completions.decode(lm, prompt, TOKENS, Sampling(0.0, 0)))})
        assert {r["anchor"] for r in runs} == {"a", "b"}, "the proxy should spread new sessions"

        for run in runs:  # halfway, on the anchor that created it
            with Channel(url, run["body"]["session_id"]) as ch:
                assert ch.anchor == run["anchor"]
                start = len(run["prompt"])
                ch.hello(run["body"]["token"], start, frames.GENESIS)
                run["confirmed"], run["position"], run["chain"], _ = sync_answer(
                    ch, start, frames.GENESIS, run["truth"][:TOKENS // 2], vocab)

        victim = runs[0]["anchor"]
        anchors[victim].kill()
        killed = time.monotonic()

        def go_on(run: dict) -> float:
            """As its page would: reconnect through the proxy, say hello with what it had, finish.
            The time from the kill to its next confirmed token."""
            while True:
                try:
                    ch = Channel(url, run["body"]["session_id"])
                    break
                except (OSError, InvalidHandshake):  # the proxy may not know yet that the anchor is gone
                    time.sleep(0.1)
            with ch:
                assert ch.anchor != victim
                ready = ch.hello(run["body"]["token"], run["position"], run["chain"])
                assert ready["type"] == "ready" and ready["position"] == run["position"], ready
                assert not ready["refresh"], ready
                done = len(run["confirmed"])
                confirmed, at, chain, _ = sync_answer(ch, run["position"], run["chain"], run["truth"][:done + 1],
                                                      vocab, run["confirmed"])
                first = time.monotonic() - killed
                confirmed, *_ = sync_answer(ch, at, chain, run["truth"], vocab, confirmed)
                assert confirmed == run["truth"]  # nothing lost, nothing twice, nothing else
                return first

        with ThreadPoolExecutor(len(runs)) as pool:
            firsts = list(pool.map(go_on, runs))
        moved = [f for f, run in zip(firsts, runs) if run["anchor"] == victim]
        stayed = [f for f, run in zip(firsts, runs) if run["anchor"] != victim]

        # the other anchor serves the killed one's sessions from now on
        for run in runs:
            r = http.get(run["body"]["hologram_url"], headers={"Authorization": f"Bearer {run['body']['token']}"})
            assert r.status_code == 200 and r.headers["X-HPI-Anchor"] != victim

    def spread(times: list[float]) -> dict:
        times = sorted(times)
        p99 = times[min(len(times) - 1, int(len(times) * 0.99))]
        return {"n": len(times), "p50": statistics.median(times), "p99": p99, "max": times[-1]}

    figures = {"moved": spread(moved), "stayed": spread(stayed)}
    if OUT:
        cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                    if ln.startswith("model name")), platform.machine())
        Path(OUT).write_text(json.dumps({
            "machine": f"{cpu}, {os.cpu_count()} cores", "date": time.strftime("%Y-%m-%d"),
            "model": MODEL or "tiny test model", "sessions": SESSIONS, "answer_tokens": TOKENS,
            "anchor_threads": 1, "exact_answers": len(runs),
            "kill_to_next_confirmed_s": figures}, indent=2) + "\n")
    print(f"\nkill to next confirmed token (s): {figures}")
