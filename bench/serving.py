"""Serving cost: the anchor against llama.cpp's server on the same GGUF, the same prompts and answers.

Two server processes on 127.0.0.1, each with the same number of threads: the anchor (`hpi
serve`, the default model: SmolLM2-135M-Instruct Q4_1) and llama.cpp's `llama-server` on the
same GGUF file (parallel slots, continuous batching; built by ../shared/peers/setup.sh server).
24 prompts, each a user message in the chat template: 16 questions and instructions and 8
summaries of 1,100-token excerpts of texts on this machine (bench/corpus.py). U users at
once, user u answering prompt u mod 24, 64-token greedy answers. Configurations:

  hpi-resonator  reconciled over real websockets with the drafts of the reference resonator
                 (server/resonator.py, the browser engine's oracle). The drafts are worked out
                 beforehand from the anchor-only answer, since they depend only on the
                 confirmed tokens: the client's own decoding is the user's CPU, not the server's
  hpi-perfect    reconciled with perfect drafts (the answer itself): the upper bound
  hpi-server     the anchor decoding alone, /v1/chat/completions
  llama.cpp      llama-server's /completion with the prompt's token ids

Each run has a setup phase (sessions created and their holograms fetched; llama.cpp's slots
given their prompts with `n_predict` 0; one-token completions for hpi-server) and a decode
phase (the answers). Server CPU time comes from /proc/PID/stat around each phase, so
"decode" is the CPU of the decode phase alone and "total" adds the setup (prefill, holograms).
The configurations run interleaved, A B C D A B C D ..., for each user count, --repeats times;
medians and the spread are reported. Every reconciled answer is checked token for token
against the anchor-only answer; hpi-server's text against its decoded text.

    python -m bench.serving                                   # docs/results/serving.json, docs/serving.md
    python -m bench.serving --users 1,4 --repeats 1 --prompts 4 --out /tmp/s.json --no-docs
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import msgpack
import websockets.sync.client as ws_client

REPO = Path(__file__).resolve().parent.parent

from bench.reconcile import PROMPTS, SUMMARY_ASK, PythonDrafter
from bench.resonator import machine

CONFIGS = ("hpi-resonator", "hpi-perfect", "hpi-server", "llama.cpp")
LONG_TEXTS = ("licence-apache-2.0", "licence-gpl-3", "licence-mpl-2.0", "licence-gfdl-1.3",
              "torch-distributed-run", "readme-transformers", "readme-accelerate", "readme-fastapi")
LONG_TOKENS = 1100
K = 16  # drafted tokens per pass: the page's default (docs/reconcile.md)
GENESIS = bytes(32)
LLAMA_SERVER = "/tmp/llama-build/bin/llama-server"


def log(*a) -> None:
    print(f"[{time.strftime('%H:%M:%S')}]", *a, file=sys.stderr, flush=True)


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_up(url: str, proc: subprocess.Popen, what: str, timeout: float = 900) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start")
        time.sleep(0.5)


# ---- prompts, answers and the resonator's drafts, worked out beforehand ---------------------


def build_prompts(lm, n: int) -> list[dict]:
    from bench import corpus

    texts = {t.id: t.text for t in corpus.load("all")}
    bodies = [(pid, body) for pid, body in PROMPTS if not body.startswith("corpus:")][:16]
    for tid in LONG_TEXTS:
        excerpt = lm.tokenizer(texts[tid], add_special_tokens=False)["input_ids"][:LONG_TOKENS]
        bodies.append((f"long-{tid}", SUMMARY_ASK + lm.tokenizer.decode(excerpt).strip()))
    step = max(1, len(bodies) // n)
    chosen = (bodies[::step] + bodies)[:n] if n < len(bodies) else bodies
    out = []
    for pid, body in chosen:
        messages = [{"role": "user", "content": body}]
        out.append({"id": pid, "messages": messages, "ids": lm.chat_ids(messages)})
    return out


def prepare(prompts: list[dict], new: int, model: str = "default") -> None:
    """Per prompt: the anchor-only answer (`truth`, new + K + 1 tokens or to the end of turn) and
    the resonator's draft of every pass (`plan`), as the anchor's verdicts would steer it."""
    from hpi.anchor import Anchor, Caches
    from hpi.completions import decode
    from hpi.config import Settings
    from hpi.models import load_model

    lm = load_model(model, "cpu")
    anchor = Anchor(lm, **Settings().anchor_options())
    drafter = PythonDrafter(anchor.pack_bytes)
    eos = set(lm.eos_token_ids)
    for p in prompts:
        truth = list(decode(lm, p["ids"], new + K + 1))
        caches = Caches()
        anchor.prefill(caches, p["ids"])
        drafter.start(anchor.hologram_bytes(caches))
        confirmed, plan = [], []
        while len(confirmed) < new and not (confirmed and confirmed[-1] in eos):
            d = drafter.draft(K, 0.0, 0)
            at, acc = len(confirmed), 0
            while acc < len(d) and d[acc] not in eos and at + acc < len(truth) and d[acc] == truth[at + acc]:
                acc += 1
            token = truth[at + acc]
            plan.append(d)
            drafter.adopt(d, acc, token)
            confirmed += d[:acc] + [token]
        p["truth"], p["plan"] = truth, plan
        p["answer"] = confirmed  # what reconciliation confirms: up to `new` tokens and a last pass's extra
        p["text"] = lm.tokenizer.decode([t for t in truth[:new] if t not in eos], skip_special_tokens=True)
        log(f"prepared {p['id']}: {len(p['ids'])} prompt tokens, {len(plan)} passes")


# ---- the servers --------------------------------------------------------------------------


class Server:
    def __init__(self, cmd: list[str], env: dict, health: str, what: str, log: Path | None = None):
        """`log`: a file for the server's output (appended to), else it is discarded."""
        with open(log, "ab") if log else open(os.devnull, "wb") as out:
            self.proc = subprocess.Popen(cmd, env={**os.environ, **env}, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
        self.what = what
        wait_up(health, self.proc, what)

    def cpu(self) -> float:
        return cpu_s(self.proc.pid)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def start_hpi(threads: int, data_dir: Path) -> tuple[Server, str]:
    port = free_port()
    env = {"HPI_DATA_DIR": str(data_dir), "HPI_PORT": str(port), "HPI_THREADS": str(threads),
           "HPI_MAX_SESSIONS": "1024", "HPI_MAX_LIVE_SESSIONS": "256", "HPI_CLIENT_SHARE": "1",
           "HPI_MAX_COMPLETIONS": "64", "HPI_MAX_WAITING_COMPLETIONS": "64", "HPI_MAX_KV_BYTES": str(16 << 30),
           "HPI_MAX_COMPLETION_SECONDS": "3600",
           "OMP_NUM_THREADS": str(threads)}
    url = f"http://127.0.0.1:{port}"
    return Server([sys.executable, "-m", "hpi.cli", "serve"], env, url + "/healthz", "hpi"), url


def start_llama(binary: str, gguf: str, threads: int, slots: int) -> tuple[Server, str]:
    port = free_port()
    cmd = [binary, "-m", gguf, "-t", str(threads), "-tb", str(threads), "-np", str(slots), "-cb",
           "-c", str(slots * 1536), "--port", str(port), "--host", "127.0.0.1", "--no-warmup"]
    url = f"http://127.0.0.1:{port}"
    return Server(cmd, {}, url + "/health", "llama-server"), url


# ---- one user's work in each configuration -------------------------------------------------


def frame(ws, **f) -> dict:
    ws.send(msgpack.packb({"v": 1, **f}, use_bin_type=True))
    return msgpack.unpackb(ws.recv(timeout=600), raw=False)


class HPIUser:
    """A page: its session (setup), then its answer over the sync channel (decode)."""

    def __init__(self, url: str, prompt: dict, perfect: bool):
        self.url, self.p, self.perfect = url, prompt, perfect
        self.rtts: list[float] = []
        self.passes = self.accepted = 0

    def setup(self) -> None:
        with httpx.Client(base_url=self.url, timeout=600) as c:
            r = c.post("/v1/sessions", json={"messages": self.p["messages"]})
            r.raise_for_status()
            self.s = r.json()
            c.get(self.s["hologram_url"], headers={"Authorization": f"Bearer {self.s['token']}"}).raise_for_status()

    def decode(self) -> list[int]:
        p, s = self.p, self.s
        position, chain, confirmed = s["n_tokens"], GENESIS, []
        wsu = self.url.replace("http://", "ws://") + f"/v1/sessions/{s['session_id']}/sync"
        with ws_client.connect(wsu, max_size=1 << 20) as ws:
            frame(ws, type="hello", token=s["token"], position=position, chain=chain, temperature=0.0, seed=0)
            for i in range(len(p["plan"])):
                at = len(confirmed)
                drafts = p["truth"][at:at + K] if self.perfect else p["plan"][i]
                t0 = time.perf_counter()
                v = frame(ws, type="draft", position=position, chain=chain, tokens=drafts)
                self.rtts.append(time.perf_counter() - t0)
                if v["type"] not in ("ack", "correction"):
                    raise RuntimeError(f"{p['id']}: {v}")
                self.passes += 1
                self.accepted += v["accepted"]
                confirmed += drafts[:v["accepted"]] + [v["token"]]
                position, chain = v["position"], v["chain"]
                if len(confirmed) >= len(p["answer"]) or self.perfect and len(confirmed) >= len(p["answer"]) - 1:
                    break
        return confirmed


def hpi_server_user(url: str, p: dict, new: int, setup: bool) -> str:
    with httpx.Client(base_url=url, timeout=900) as c:
        r = c.post("/v1/chat/completions", json={"messages": p["messages"], "max_tokens": 1 if setup else new})
        r.raise_for_status()
        return r.json()["choices"][0]["message"]["content"]


def llama_user(url: str, p: dict, new: int, slot: int, setup: bool) -> list[int]:
    body = {"prompt": p["ids"], "n_predict": 0 if setup else new, "cache_prompt": True, "id_slot": slot,
            "temperature": 0.0, "top_k": 1, "samplers": ["top_k"], "ignore_eos": False, "return_tokens": True}
    with httpx.Client(base_url=url, timeout=900) as c:
        r = c.post("/completion", json=body)
        r.raise_for_status()
        return r.json().get("tokens", [])


def in_threads(fn, n: int) -> tuple[list, float]:
    """fn(i) for i < n at once; results and wall seconds."""
    out, errors = [None] * n, []

    def run(i):
        try:
            out[i] = fn(i)
        except Exception as e:  # noqa: BLE001 - reported
            errors.append(e)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return out, time.perf_counter() - t0


def histogram(url: str, name: str) -> tuple[float, float]:
    text = httpx.get(url + "/metrics").text
    get = lambda suffix: float(next(line.split()[1] for line in text.splitlines()  # noqa: E731
                                    if line.startswith(f"{name}_{suffix} ")))
    return get("sum"), get("count")


def run_config(cfg: str, users: int, prompts: list[dict], new: int, hpi: tuple, llama: tuple) -> dict:
    ps = [prompts[u % len(prompts)] for u in range(users)]
    server, url = llama if cfg == "llama.cpp" else hpi
    c0 = server.cpu()
    row: dict = {"config": cfg, "users": users}
    if cfg.startswith("hpi-") and cfg != "hpi-server":
        pages = [HPIUser(url, p, cfg == "hpi-perfect") for p in ps]
        in_threads(lambda i: pages[i].setup(), users)
        c1 = server.cpu()
        b0 = histogram(url, "hpi_batch_sequences")
        answers, wall = in_threads(lambda i: pages[i].decode(), users)
        b1 = histogram(url, "hpi_batch_sequences")
        tokens = sum(len(a) for a in answers)
        row["differ"] = sum(a[:len(p["truth"])] != p["truth"][:len(a)] for a, p in zip(answers, ps))
        rtts = sorted(r for pg in pages for r in pg.rtts)
        passes = sum(pg.passes for pg in pages)
        row.update(rtt_p50_ms=1000 * rtts[len(rtts) // 2], rtt_p99_ms=1000 * rtts[min(len(rtts) - 1, int(len(rtts) * .99))],
                   accepted_per_pass=sum(pg.accepted for pg in pages) / passes, passes=passes,
                   batch_mean=(b1[0] - b0[0]) / max(1, b1[1] - b0[1]))
    elif cfg == "hpi-server":
        in_threads(lambda i: hpi_server_user(url, ps[i], new, True), users)
        c1 = server.cpu()
        setup_tokens = users
        texts, wall = in_threads(lambda i: hpi_server_user(url, ps[i], new, False), users)
        row["differ"] = sum(t != p["text"] for t, p in zip(texts, ps))
        tokens = sum(min(new, len(p["truth"])) for p in ps)
        # The decode phase repeats the setup's prefill and first token: take them out.
        c0 = c0 - (c1 - c0)
        tokens -= setup_tokens
    else:
        in_threads(lambda i: llama_user(url, ps[i], new, i, True), users)
        c1 = server.cpu()
        outs, wall = in_threads(lambda i: llama_user(url, ps[i], new, i, False), users)
        tokens = sum(len(o) for o in outs)
        row["same_as_hpi"] = sum(o == p["truth"][:len(o)] for o, p in zip(outs, ps))
    c2 = server.cpu()
    row.update(tokens=tokens, decode_cpu_ms_per_token=1000 * (c2 - c1) / tokens,
               total_cpu_ms_per_token=1000 * (c2 - c0) / tokens, tokens_per_s=tokens / wall, decode_wall_s=wall)
    return row


# ---- report ----------------------------------------------------------------------------------


def summarize(rows: list[dict]) -> list[dict]:
    out = []
    keys = sorted({(r["users"], r["config"]) for r in rows}, key=lambda k: (k[0], CONFIGS.index(k[1])))
    for users, cfg in keys:
        rs = [r for r in rows if (r["users"], r["config"]) == (users, cfg)]
        s = {"users": users, "config": cfg, "runs": len(rs)}
        for m in ("decode_cpu_ms_per_token", "total_cpu_ms_per_token", "tokens_per_s", "rtt_p50_ms", "rtt_p99_ms",
                  "accepted_per_pass", "batch_mean"):
            vals = [r[m] for r in rs if m in r]
            if vals:
                s[m] = statistics.median(vals)
                s[m + "_range"] = [min(vals), max(vals)]
        s["differ"] = sum(r.get("differ", 0) for r in rs)
        out.append(s)
    for s in out:
        ref = next((x for x in out if x["users"] == s["users"] and x["config"] == "llama.cpp"), None)
        if ref:
            s["decode_vs_llama"] = s["decode_cpu_ms_per_token"] / ref["decode_cpu_ms_per_token"]
    return out


def render(result: dict) -> str:
    m = result["machine"]
    lines = [f"One run on {m.get('cpu', '?')}, {m.get('cores', '?')} cores, {result['date']}; both servers with "
             f"{result['threads']} threads; {result['prompts']} prompts, {result['new']}-token greedy answers, "
             f"{result['repeats']} interleaved repeats (median, range in brackets).", "",
             "| users | configuration | server CPU ms / token, decode | vs llama.cpp | incl. prefill, holograms | "
             "tokens/s | round trip p50 / p99 ms | accepted / pass | sessions / forward | answers differing |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for s in result["summary"]:
        f = lambda k, d=1: f"{s[k]:.{d}f}" if k in s else ""  # noqa: E731
        rng = s.get("decode_cpu_ms_per_token_range", [0, 0])
        lines.append(f"| {s['users']} | {s['config']} | {f('decode_cpu_ms_per_token', 2)} [{rng[0]:.2f}–{rng[1]:.2f}] | "
                     f"{f('decode_vs_llama', 2)} | {f('total_cpu_ms_per_token', 2)} | {f('tokens_per_s')} | "
                     f"{f('rtt_p50_ms', 0)} / {f('rtt_p99_ms', 0)} | {f('accepted_per_pass', 2)} | "
                     f"{f('batch_mean', 2)} | {s['differ'] if s['config'] != 'llama.cpp' else ''} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", default="1,4,16,64")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--llama-server", default=os.environ.get("LLAMA_SERVER", LLAMA_SERVER))
    ap.add_argument("--out", default=str(REPO / "docs" / "results" / "serving.json"))
    ap.add_argument("--no-docs", action="store_true", help="do not rewrite docs/serving.md's table")
    args = ap.parse_args(argv)
    users = [int(u) for u in args.users.split(",")]
    configs = args.configs.split(",")
    from hpi.models import load_model, resolve_model_path

    lm = load_model("default", "cpu")
    prompts = build_prompts(lm, args.prompts)
    del lm
    prepare(prompts, args.new)
    load0 = os.getloadavg()[0]
    data = Path(tempfile.mkdtemp(prefix="hpi-serving-"))
    packs = REPO / "var" / "test-data" / "packs"
    if packs.is_dir():
        (data / "packs").symlink_to(packs)
    hpi = start_hpi(args.threads, data)
    llama = start_llama(args.llama_server, str(resolve_model_path("default")), args.threads, max(users)) \
        if "llama.cpp" in configs else (None, None)
    rows = []
    try:
        for rep in range(args.repeats):
            for u in users:
                for cfg in configs:
                    row = run_config(cfg, u, prompts, args.new, hpi, llama)
                    row["repeat"] = rep
                    rows.append(row)
                    log(json.dumps(row))
    finally:
        hpi[0].stop()
        if llama[0]:
            llama[0].stop()
    result = {"date": datetime.date.today().isoformat(), "machine": machine(args.threads, load0),
              "threads": args.threads, "prompts": len(prompts), "new": args.new, "repeats": args.repeats, "k": K,
              "prompt_tokens": {p["id"]: len(p["ids"]) for p in prompts}, "rows": rows, "summary": summarize(rows)}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    table = render(result)
    print(table)
    if not args.no_docs:
        replace_table(REPO / "docs" / "serving.md", "serving table", table)


def replace_table(doc: Path, marker: str, table: str) -> None:
    """Put `table` between `<!-- marker -->` and `<!-- /marker -->` in `doc`."""
    text = doc.read_text() if doc.exists() else ""
    start, end = f"<!-- {marker} -->", f"<!-- /{marker} -->"
    if start in text:
        doc.write_text(text[:text.index(start) + len(start)] + "\n" + table + "\n" + text[text.index(end):])


if __name__ == "__main__":
    main()
