"""Real outside services for tests, on loopback: Debian's redis-server and haproxy (installed by
scripts/setup.sh), and `hpi serve` as its own process. Each is stopped when its block ends."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def need(program: str) -> str:
    path = shutil.which(program) or next((p for p in (f"/usr/sbin/{program}", f"/usr/bin/{program}")
                                          if os.access(p, os.X_OK)), None)
    if path is None:
        raise RuntimeError(f"{program} is not installed: run scripts/setup.sh")
    return path


def _wait(ready, proc: subprocess.Popen, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start in {timeout} s")
        time.sleep(0.05)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


@contextmanager
def redis_server(folder: Path) -> Iterator[str]:
    """A Redis on a free loopback port, persisting nothing; yields its URL."""
    port = free_port()
    proc = subprocess.Popen([need("redis-server"), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(folder)], stdout=subprocess.DEVNULL)

    def up() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    try:
        _wait(up, proc, "redis-server", 30)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        _stop(proc)


class Anchor:
    """`hpi serve` as its own process (so it can be killed like a real one)."""

    def __init__(self, folder: Path, env: dict[str, str], port: int | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.folder, self.env = folder, env
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 300) -> Anchor:
        self.folder.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "HPI_HOST": "127.0.0.1", "HPI_PORT": str(self.port), **self.env}
        log = open(self.folder / "anchor.log", "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "hpi.cli", "serve"], cwd=REPO, env=env,
                                     stdout=log, stderr=subprocess.STDOUT)
        log.close()
        _wait(lambda: _answers(self.url + "/healthz"), self.proc, f"the anchor on port {self.port}", timeout)
        return self

    def kill(self) -> None:
        """SIGKILL: no shutdown, as a crash or a lost machine."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None:
            _stop(self.proc)


@contextmanager
def haproxy(folder: Path, anchor_a: str, anchor_b: str) -> Iterator[str]:
    """scripts/haproxy.cfg on a free loopback port in front of two anchors (host:port); yields its URL."""
    port = free_port()
    env = {**os.environ, "HPI_PROXY_BIND": f"127.0.0.1:{port}", "HPI_ANCHOR_A": anchor_a, "HPI_ANCHOR_B": anchor_b}
    with open(folder / "haproxy.log", "ab") as log:
        proc = subprocess.Popen([need("haproxy"), "-f", str(REPO / "scripts" / "haproxy.cfg"), "-db"], env=env,
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait(lambda: _answers(f"http://127.0.0.1:{port}/healthz"), proc, "haproxy", 60)
        yield f"http://127.0.0.1:{port}"
    finally:
        _stop(proc)
