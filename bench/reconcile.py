"""Reconciliation: drafts from a resonator, verified by the anchor, against the anchor alone.

One run, one model (the anchor's: SmolLM2-135M-Instruct Q4_1 by default), the fixed prompts
below (questions, instructions, explanations, and summaries of corpus excerpts of a few
hundred tokens, bench/corpus.py), each a user message in the model's chat template.

Per prompt, first the anchor alone: plain decoding (server/completions.py `decode`, one
forward pass per token over its KV cache) of N + max(K) tokens or to the end of turn, with
the process CPU time (`time.process_time`, all threads) and the wall clock stamped after
every token. Then for each K an anchor session (server/sessions.py SessionStore, exactly
what the sync websocket calls) and a resonator loaded with the session's hologram:

  loop: the resonator drafts K tokens (fewer if it drafts an end of turn)
        -> a Draft frame, msgpack-encoded as the page sends it
        -> the anchor: frames.decode, SessionStore.draft (server/verify.py: one forward
           pass), frames.encode of the Verdict                  <- only this is "anchor time"
        -> the resonator adopts the verdict: on a correction it drops its K/V after the
           accepted prefix and takes the anchor's token as its next input; on an ack it
           feeds its last draft, and the anchor's extra token is its next input
  until N tokens are confirmed (the last pass may confirm up to K more) or an end of turn.

Measured per K: accepted drafts per verification pass; anchor CPU (and wall) time per
confirmed token against plain decoding of the same tokens on the same prompt (prefill
excluded on both sides, reported apart), summed over all prompts, as a ratio; bytes on the
wire per confirmed token (Draft + Verdict frames; Hello + Ready once per answer; the
hologram once per answer, apart); and whether the confirmed tokens equal the anchor's own,
token for token (asserted: the run fails if any answer differs).

Drafts come from the Python reference resonator (server/resonator.py) for every prompt and
K, greedy; a subset (--sampled) also at temperature 0.7 with a seed; a subset (--browser)
from the WGSL engine (client_web/resonator.js) in headless Chromium (WebGPU on
SwiftShader, server/headless.py), verified by the same Python anchor.

    python -m bench.reconcile --prompts 2 --new 16 --ks 8,16 --sampled 1 --browser 1 --out /tmp/r.json
    python -m bench.reconcile --render                                       # the full run (~30 min)
    python -m bench.reconcile --from docs/results/reconcile.json --render    # tables and plot again
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

from bench import resonator as resonator_bench
from bench.resonator import files_digest, git_rev, log, machine

CODE_FILES = ("server/verify.py", "server/reconcile.py", "server/sessions.py", "server/anchor.py", "server/resonator.py",
              "protocol/frames.py", "server/spectral.py", "server/hologram.py")
ENGINE_FILES = ("client_web/resonator.js", "client_web/holo.js", "shaders")
SAMPLED_TEMPERATURE = 0.7

# id -> user message. "corpus:<text id>" marks a summary of the first SUMMARY_TOKENS tokens of
# that corpus text (the text itself is read from the machine, bench/corpus.py).
PROMPTS: list[tuple[str, str]] = [
    ("q-sky", "Why is the sky blue? Answer in a few sentences."),
    ("q-seasons", "What causes the seasons on Earth?"),
    ("q-photosynthesis", "What is photosynthesis, and why does it matter for life on Earth?"),
    ("q-list-tuple", "What is the difference between a list and a tuple in Python?"),
    ("q-browser", "What happens when I type a web address into my browser and press Enter?"),
    ("q-sleep", "How much sleep does an adult need, and why is it important?"),
    ("q-vaccines", "How do vaccines train the immune system?"),
    ("q-inflation", "What is inflation, and what usually causes it?"),
    ("i-email", "Write a short, polite email asking my manager for a day off next Friday."),
    ("i-poem", "Write a four-line poem about autumn leaves."),
    ("i-focus", "Give me five tips for staying focused while working from home."),
    ("i-soup", "Describe a simple recipe for tomato soup, step by step."),
    ("i-palindrome", "Write a Python function that checks whether a string is a palindrome."),
    ("i-robot", "Tell a short story about a robot who learns to paint."),
    ("i-algebra", "Make a three-day study plan for learning the basics of algebra."),
    ("i-planets", "List the planets of the solar system in order from the Sun, with one fact about each."),
    ("e-recursion", "Explain recursion to a beginner programmer, with an example."),
    ("e-interest", "Explain compound interest to a teenager."),
    ("e-git", "Explain what git branches are and why teams use them."),
    ("e-tcp-udp", "Explain the difference between TCP and UDP."),
    ("s-apache", "corpus:licence-apache-2.0"),
    ("s-pytest", "corpus:readme-pytest"),
    ("s-statistics", "corpus:stdlib-statistics"),
    ("s-h11", "corpus:readme-h11"),
]
SUMMARY_TOKENS = 384
SUMMARY_ASK = "Summarise the following text in a few sentences.\n\n"
BROWSER_DEFAULT = "q-sky,i-robot,s-pytest"  # a question, a story, a summary (longer hologram)


def build_prompts(lm, names: list[str] | None, count: int | None) -> list[dict]:
    from bench import corpus

    chosen = [p for p in PROMPTS if names is None or p[0] in names]
    if count is not None:
        chosen = chosen[:count]
    texts = {}
    if any(body.startswith("corpus:") for _, body in chosen):
        texts = {t.id: t.text for t in corpus.load("all")}
    out = []
    for pid, body in chosen:
        source = None
        if body.startswith("corpus:"):
            source = body.split(":", 1)[1]
            excerpt = lm.tokenizer(texts[source], add_special_tokens=False)["input_ids"][:SUMMARY_TOKENS]
            body = SUMMARY_ASK + lm.tokenizer.decode(excerpt).strip()
        messages = [{"role": "user", "content": body}]
        out.append({"id": pid, "kind": {"q": "question", "i": "instruction", "e": "explain",
                                        "s": "summarise"}[pid[0]],
                    "source": source, "messages": messages, "ids": lm.chat_ids(messages)})
    return out


# ---- the anchor alone -----------------------------------------------------------------------


def plain_decode(lm, ids: list[int], max_tokens: int, temperature: float, seed: int) -> dict:
    """hpi.completions.decode with CPU and wall stamps after each token (the first one
    comes from the prefill's logits, so stamp 0 closes the prefill)."""
    from hpi.completions import decode
    from hpi.sampling import Sampling

    tokens, cpu, wall = [], [], []
    c0, w0 = time.process_time(), time.perf_counter()
    for t in decode(lm, ids, max_tokens, Sampling(temperature, seed)):
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)
        tokens.append(t)
    return {"tokens": tokens, "cpu": cpu, "wall": wall}


def plain_cost(plain: dict, m: int) -> tuple[float, float]:
    """CPU and wall seconds plain decoding spent on its first m tokens, prefill excluded."""
    m = min(m, len(plain["tokens"]))
    return plain["cpu"][m - 1] - plain["cpu"][0], plain["wall"][m - 1] - plain["wall"][0]


# ---- drafters -------------------------------------------------------------------------------


class PythonDrafter:
    """server/resonator.py, kept at the confirmed state between passes.

    Invariant at the start of each pass: position == confirmed tokens - 1, next_id == the
    last confirmed token (as right after add_hologram).
    """
    name = "python"

    def __init__(self, pack: bytes):
        from hpi.resonator import Resonator
        from hpi.sampling import Sampling

        self.r = Resonator(pack)
        self.sampling = Sampling

    def start(self, holo: bytes) -> None:
        self.r.past, self.r.position, self.r.next_id = None, 0, None
        self.r.add_hologram(holo)

    def draft(self, k: int, temperature: float, seed: int) -> list[int]:
        import torch

        with torch.inference_mode():
            return self.r.generate(k, self.sampling(temperature, seed))

    def adopt(self, drafts: list[int], accepted: int, token: int) -> None:
        import torch

        with torch.inference_mode():
            self.r.adopt(drafts, accepted, token)


JS_SETUP = """async ([timeoutMs]) => {
  window.within = (ms, what, p) => new Promise((resolve, reject) => {
    const t = setTimeout(() => reject(new Error(`${what}: no answer after ${ms / 1000} s`)), ms);
    p.then((v) => { clearTimeout(t); resolve(v); }, (e) => { clearTimeout(t); reject(e); });
  });
  const { Resonator } = await import('/client/resonator.js');
  const r = await Resonator.create({});
  r.onLost = (info) => console.error(`WebGPU device lost: ${info.reason} ${info.message}`);
  const m = (await (await fetch('/v1/models')).json()).models[0];
  const t0 = performance.now();
  const pack = await (await fetch(m.pack_url)).arrayBuffer();
  await within(timeoutMs, 'loadPack', r.loadPack(pack, m.pack_hash));
  window.R = r;
  return { adapter: r.adapter, userAgent: navigator.userAgent, packBytes: pack.byteLength,
    loadMs: performance.now() - t0 };
}"""

JS_START = """async ([url, timeoutMs]) => {
  const bytes = await (await fetch(url)).arrayBuffer();
  R.rewind(0, null);
  const m = await within(timeoutMs, 'addHologram', R.addHologram(bytes));
  return { start: m.start, end: m.end, nextId: m.next_id, position: R.position };
}"""

# Adopt the previous verdict (if any), then draft: one round trip per pass.
JS_PASS = """async ([verdict, k, temperature, seed, timeoutMs]) => {
  const t0 = performance.now();
  if (verdict) {
    const [drafts, accepted, token, position] = verdict;
    if (accepted === drafts.length) await within(timeoutMs, 'append', R.append([token]));
    else R.rewind(position - 1, token);
    if (R.position !== position - 1 || R.nextId !== token) {
      throw new Error(`engine at ${R.position}/${R.nextId}, expected ${position - 1}/${token}`);
    }
  }
  const t1 = performance.now();
  const drafts = await within(timeoutMs, 'generate', R.generate(k, { temperature, seed }));
  return { drafts, adoptMs: t1 - t0, draftMs: performance.now() - t1 };
}"""


class BrowserDrafter:
    """client_web/resonator.js in a page; holograms served to it by page.route."""
    name = "browser"

    def __init__(self, page, timeout_s: float):
        self.page = page
        self.timeout_ms = int(timeout_s * 1000)
        self.holos: dict[str, bytes] = {}
        self.count = 0
        self.pending = None  # the verdict to adopt before the next draft
        page.route("**/bench-holo/*", lambda route: route.fulfill(
            body=self.holos[route.request.url.rsplit("/", 1)[1]], content_type="application/octet-stream"))

    def start(self, holo: bytes) -> None:
        self.count += 1
        key = f"h{self.count}"  # a new URL per hologram: nothing cached
        self.holos = {key: holo}
        r = self.page.evaluate(JS_START, [f"/bench-holo/{key}", self.timeout_ms])
        self.pending = None
        self.position = r["position"]

    def draft(self, k: int, temperature: float, seed: int) -> list[int]:
        r = self.page.evaluate(JS_PASS, [self.pending, k, temperature, seed, self.timeout_ms])
        self.pending = None
        return r["drafts"]

    def adopt(self, drafts: list[int], accepted: int, token: int, position: int) -> None:
        # applied at the start of the next draft call (one round trip per pass)
        self.pending = [drafts, accepted, token, position]


# ---- one reconciled answer ------------------------------------------------------------------


def ws_bytes(n: int, masked: bool) -> int:
    """A binary WebSocket frame of n payload bytes (RFC 6455): header, mask key from the page."""
    return n + (2 if n <= 125 else 4 if n < 65536 else 10) + (4 if masked else 0)


def reconcile(store, prompt: dict, drafter, k: int, n_new: int, temperature: float, seed: int) -> dict:
    from hpi.protocol import frames

    c0, w0 = time.process_time(), time.perf_counter()
    session = store.create(prompt["messages"])
    create_cpu, create_wall = time.process_time() - c0, time.perf_counter() - w0
    try:
        holo = session.full.data
        base = session.n_tokens
        hello = frames.encode(frames.Hello(v=1, type="hello", token=session.token, position=base,
                                           chain=frames.GENESIS, temperature=temperature, seed=seed))
        c0, w0 = time.process_time(), time.perf_counter()
        h = frames.decode(hello)
        ready = frames.encode(store.ready(session, h.position, h.chain, (h.temperature, h.seed)))
        cpu, wall = time.process_time() - c0, time.perf_counter() - w0
        w0 = time.perf_counter()
        drafter.start(holo)
        start_wall = time.perf_counter() - w0
        eos = set(store.anchor.lm.eos_token_ids)
        confirmed: list[int] = []
        passes = []
        draft_wall = 0.0
        # verify does not stop at an end of turn: an accepted end of turn drafted last gets a
        # token after it confirmed too, which the answer (cut after the end of turn) drops
        while len(confirmed) < n_new and not eos.intersection(confirmed):
            w0 = time.perf_counter()
            drafts = drafter.draft(k, temperature, seed)
            draft_wall += time.perf_counter() - w0
            if not drafts:
                raise RuntimeError("the drafter returned no tokens")
            sent = frames.encode(frames.Draft(v=1, type="draft", position=session.n_tokens,
                                              chain=session.chains[-1], tokens=drafts))
            c0, w0 = time.process_time(), time.perf_counter()
            d = frames.decode(sent)
            verdict = store.draft(session, d.position, d.chain, d.tokens)
            back = frames.encode(verdict)
            pc, pw = time.process_time() - c0, time.perf_counter() - w0
            cpu, wall = cpu + pc, wall + pw
            confirmed += drafts[:verdict.accepted] + [verdict.token]
            passes.append({"drafted": len(drafts), "accepted": verdict.accepted, "corrected": verdict.type == "correction",
                           "draft_bytes": len(sent), "verdict_bytes": len(back), "cpu": pc, "wall": pw})
            w0 = time.perf_counter()
            if isinstance(drafter, BrowserDrafter):
                drafter.adopt(drafts, verdict.accepted, verdict.token, verdict.position)
            else:
                drafter.adopt(drafts, verdict.accepted, verdict.token)
                r = drafter.r
                assert r.position == session.n_tokens - 1 and r.next_id == session.caches.ids[-1]
            draft_wall += time.perf_counter() - w0
        assert session.caches.ids[base:] == confirmed
        answer = confirmed[:next((i + 1 for i, t in enumerate(confirmed) if t in eos), len(confirmed))]
        return {"tokens": answer, "confirmed_all": len(confirmed), "passes": passes, "hologram_bytes": len(holo), "prompt_tokens": base,
                "hello_bytes": len(hello), "ready_bytes": len(ready), "create_cpu": create_cpu,
                "create_wall": create_wall, "anchor_cpu": cpu, "anchor_wall": wall, "drafter_wall": draft_wall,
                "start_wall": start_wall}
    finally:
        store.delete(session)


def summarize(run: dict, plain: dict) -> dict:
    """Per-answer figures; the plain decoder's cost of the same tokens; exactness."""
    p = run["passes"]
    m = len(run["tokens"])
    want = plain["tokens"][:m]
    pcpu, pwall = plain_cost(plain, m)
    return {
        "confirmed": m, "passes": len(p), "drafted": sum(x["drafted"] for x in p),
        "accepted": sum(x["accepted"] for x in p), "corrections": sum(x["corrected"] for x in p),
        "wire_bytes": sum(x["draft_bytes"] + x["verdict_bytes"] for x in p),
        "ws_bytes": sum(ws_bytes(x["draft_bytes"], True) + ws_bytes(x["verdict_bytes"], False) for x in p),
        "handshake_bytes": run["hello_bytes"] + run["ready_bytes"], "hologram_bytes": run["hologram_bytes"],
        "prompt_tokens": run["prompt_tokens"], "anchor_cpu": run["anchor_cpu"], "anchor_wall": run["anchor_wall"],
        "plain_cpu": pcpu, "plain_wall": pwall, "plain_prefill_cpu": plain["cpu"][0],
        "create_cpu": run["create_cpu"], "drafter_wall": run["drafter_wall"],
        "confirmed_all": run["confirmed_all"],
        "equal": run["tokens"] == want and len(want) == m,
        "first_diff": next((i for i, (a, b) in enumerate(zip(run["tokens"], want)) if a != b), None),
        "accepted_per_pass": [x["accepted"] for x in p], "drafted_per_pass": [x["drafted"] for x in p],
        "corrected_per_pass": [x["corrected"] for x in p],
    }


def correction_positions(row: dict) -> list[int]:
    """Answer positions (0 = the first answer token) of the tokens the anchor corrected."""
    acc, dr = row["accepted_per_pass"], row["drafted_per_pass"]
    corr = row.get("corrected_per_pass")
    if corr is None:  # older JSON: an end-of-turn draft the anchor agreed with ends the last pass short, too
        corr = [a < d for a, d in zip(acc, dr)]
        if sum(corr) > row["corrections"]:
            corr[-1] = False
    out, at = [], 0
    for a, c in zip(acc, corr):
        if c:
            out.append(at + a)
        at += a + 1
    return out


def aggregate(rows: list[dict]) -> dict:
    s = lambda key: sum(r[key] for r in rows)  # noqa: E731
    conf, passes = s("confirmed"), s("passes")
    out = {"answers": len(rows), "confirmed": conf, "passes": passes, "drafted": s("drafted"),
           "accepted": s("accepted"), "corrections": s("corrections"),
           "accepted_per_pass": s("accepted") / passes, "confirmed_per_pass": conf / passes,
           "acceptance": s("accepted") / s("drafted"),
           "anchor_cpu_ms": 1e3 * s("anchor_cpu") / conf, "plain_cpu_ms": 1e3 * s("plain_cpu") / conf,
           "anchor_wall_ms": 1e3 * s("anchor_wall") / conf, "plain_wall_ms": 1e3 * s("plain_wall") / conf,
           "wire_bytes_per_token": s("wire_bytes") / conf, "ws_bytes_per_token": s("ws_bytes") / conf,
           "handshake_bytes_per_token": s("handshake_bytes") / conf,
           "hologram_bytes_per_token": s("hologram_bytes") / conf,
           "drafter_steps_per_token": (s("drafted") + sum(r["passes"] - r["corrections"] for r in rows)) / conf,
           "drafter_wall_ms": 1e3 * s("drafter_wall") / conf,
           "differing": sum(not r["equal"] for r in rows)}
    out["cpu_ratio"] = out["anchor_cpu_ms"] / out["plain_cpu_ms"]
    out["wall_ratio"] = out["anchor_wall_ms"] / out["plain_wall_ms"]
    ratios = [r["anchor_cpu"] / r["plain_cpu"] for r in rows if r["plain_cpu"] > 0]
    out["cpu_ratio_median"] = statistics.median(ratios) if ratios else None
    out["cpu_ratio_max"] = max(ratios) if ratios else None
    out["e2e_ms"] = out["drafter_wall_ms"] + out["anchor_wall_ms"]
    return out


# ---- runs -----------------------------------------------------------------------------------


def python_phase(store, prompts, args, ks, result) -> None:
    kmax = max(ks + args.sampled_ks_list)
    drafter = PythonDrafter(store.anchor.pack_bytes)
    t_phase = time.perf_counter()
    for i, pr in enumerate(prompts):
        pid = pr["id"]
        rec = result["prompts"].setdefault(pid, {"kind": pr["kind"], "source": pr["source"],
                                                 "prompt_tokens": len(pr["ids"])})
        modes = [("greedy", 0.0, 0, ks)]
        if i < args.sampled:
            modes.append(("sampled", SAMPLED_TEMPERATURE, args.seed + i, args.sampled_ks_list))
        for mode, temp, seed, mode_ks in modes:
            plain = plain_decode(store.anchor.lm, pr["ids"], args.new + kmax, temp, seed)
            rec.setdefault("plain", {})[mode] = {
                "tokens": len(plain["tokens"]), "ids": plain["tokens"][:args.new], "seed": seed,
                "temperature": temp, "prefill_cpu": plain["cpu"][0],
                "cpu_ms_per_token": 1e3 * (plain["cpu"][-1] - plain["cpu"][0]) / max(1, len(plain["tokens"]) - 1),
                "text": store.anchor.lm.tokenizer.decode(plain["tokens"][:args.new], skip_special_tokens=True)}
            for k in mode_ks:
                run = reconcile(store, pr, drafter, k, args.new, temp, seed)
                row = summarize(run, plain)
                row.update({"prompt": pid, "k": k, "mode": mode, "drafter": "python"})
                result["answers"].append(row)
                flag = "" if row["equal"] else f"  DIFFERS at token {row['first_diff']}"
                log(f"  [{i + 1}/{len(prompts)}] {pid:<17} {mode:<7} K={k:<2} {row['confirmed']:>3} tok "
                    f"{row['passes']:>2} passes, accepted/pass {row['accepted'] / row['passes']:5.2f}, "
                    f"{row['corrections']} corr, anchor {1e3 * row['anchor_cpu'] / row['confirmed']:5.1f} "
                    f"vs plain {1e3 * row['plain_cpu'] / row['confirmed']:5.1f} ms CPU/tok{flag}")
        log(f"  ... {time.perf_counter() - t_phase:.0f} s so far")


def browser_phase(store, prompts, args, result, base: str) -> None:
    from hpi.headless import launch

    ks = args.browser_ks_list
    out = result["browser"]
    with launch() as browser:
        out["chromium"] = browser.version
        page = browser.new_page()
        page.on("console", lambda m: m.type == "error" and (log(f"  [page error] {m.text[:500]}"),
                                                             out["console_errors"].append(m.text[:500])))
        page.on("pageerror", lambda e: (log(f"  [page error] {e}"), out["console_errors"].append(str(e)[:500])))
        page.goto(f"{base}/client/README.md")
        log(f"browser: chromium {browser.version}; Resonator.create + pack + loadPack ...")
        out["setup"] = page.evaluate(JS_SETUP, [int(args.timeout * 1000)])
        log(f"  adapter {out['setup']['adapter']}; loadPack {out['setup']['loadMs'] / 1e3:.1f} s")
        drafter = BrowserDrafter(page, args.timeout)
        for pr in prompts:
            pid = pr["id"]
            plain = plain_decode(store.anchor.lm, pr["ids"], args.new + max(ks), 0.0, 0)
            for k in ks:
                run = reconcile(store, pr, drafter, k, args.new, 0.0, 0)
                row = summarize(run, plain)
                row.update({"prompt": pid, "k": k, "mode": "greedy", "drafter": "browser"})
                result["answers"].append(row)
                flag = "" if row["equal"] else f"  DIFFERS at token {row['first_diff']}"
                log(f"  browser {pid:<17} K={k:<2} {row['confirmed']:>3} tok {row['passes']:>2} passes, "
                    f"accepted/pass {row['accepted'] / row['passes']:5.2f}, {row['corrections']} corr, "
                    f"drafting {row['drafter_wall'] / row['confirmed'] * 1e3:.0f} ms/tok{flag}")
        page.close()


def derive(result: dict) -> None:
    """Aggregates per (drafter, mode, K) from the per-answer rows; the targets."""
    groups: dict[str, list] = {}
    for r in result["answers"]:
        groups.setdefault(f"{r['drafter']}/{r['mode']}/{r['k']}", []).append(r)
    result["summary"] = {key: aggregate(rows) for key, rows in groups.items()}
    # browser vs python on the same prompts and K
    pairs = {}
    for r in result["answers"]:
        if r["drafter"] == "browser":
            py = [x for x in result["answers"] if x["drafter"] == "python" and x["mode"] == "greedy"
                  and x["prompt"] == r["prompt"] and x["k"] == r["k"]]
            if py:
                pairs.setdefault(r["k"], []).append((r, py[0]))
    result["browser_vs_python"] = {
        str(k): {"prompts": [b["prompt"] for b, _ in v], "browser": aggregate([b for b, _ in v]),
                 "python": aggregate([p for _, p in v]),
                 "same_passes": sum(b["accepted_per_pass"] == p["accepted_per_pass"] for b, p in v)}
        for k, v in sorted(pairs.items())}
    # verify (server/verify.py) confirms one more token after an accepted end-of-turn draft
    kmax = max(result["flags"]["ks"] + result["flags"].get("sampled_ks", []))
    for r in result["answers"]:
        if "confirmed_all" not in r:  # older JSON: an answer cut by an end of turn that the last pass accepted
            plain = result["prompts"][r["prompt"]]["plain"][r["mode"]]["tokens"]
            eos_end = plain < result["flags"]["new"] + kmax and plain == r["confirmed"]
            r["confirmed_all"] = r["confirmed"] + int(eos_end and r["accepted_per_pass"][-1] == r["drafted_per_pass"][-1])
    result["after_eos"] = sum(r["confirmed_all"] > r["confirmed"] for r in result["answers"])
    s16 = result["summary"].get("python/greedy/16")
    total_diff = sum(not r["equal"] for r in result["answers"])
    greedy = [v for key, v in result["summary"].items() if key.startswith("python/greedy/")]
    result["targets"] = {
        "accepted_per_pass_k16": s16 and s16["accepted_per_pass"], "accepted_target_k16": 0.8 * 16,
        "accepted_met": bool(s16 and s16["accepted_per_pass"] >= 0.8 * 16),
        "cpu_ratio_k16": s16 and s16["cpu_ratio"],
        "cpu_ratio_met_k": sorted(int(key.rsplit("/", 1)[1]) for key, v in result["summary"].items()
                                  if key.startswith("python/greedy/") and v["cpu_ratio"] <= 0.25),
        "cpu_ratio_met_k16": bool(s16 and s16["cpu_ratio"] <= 0.25),
        "answers": len(result["answers"]), "differing": total_diff, "exact_met": total_diff == 0,
        "greedy_answers": sum(v["answers"] for v in greedy)}


# ---- report ---------------------------------------------------------------------------------


def render(result: dict) -> str:
    m, fl = result["machine"], result["flags"]
    S = result["summary"]
    md = ["# Reconciliation benchmark (bench/reconcile.py)", "",
          f"- machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; torch {m['torch']} "
          f"({m['torch_threads']} threads), transformers {m['transformers']}, Python {m['python']}",
          f"- load average {m['load_avg_start']:.2f} at the start, {m['load_avg_end']:.2f} at the end"
          + (" (other work shared the machine)" if max(m['load_avg_start'], m['load_avg_end']) > 0.7 else ""),
          f"- date: {result['date']}; run time {result['run_seconds'] / 60:.1f} min",
          f"- command: `{result['command']}`",
          f"- code: {result['code_rev']} of {', '.join(CODE_FILES)}; engine {result['engine_rev']}",
          f"- model `{result['model']}`, codec preset `{result['codec']}`; {len(result['prompts'])} prompts, "
          f"up to {fl['new']} new tokens (the last pass may confirm up to K more) or the end of turn",
          "- anchor = frames.decode + SessionStore.draft (verify, one forward pass) + frames.encode per pass; "
          "plain = server/completions.py `decode` of the same tokens on the same prompt, same run; "
          "prefill excluded on both sides; CPU = process time, all threads", ""]

    def table(prefix: str, title: str) -> None:
        keys = sorted((key for key in S if key.startswith(prefix)), key=lambda x: int(x.rsplit("/", 1)[1]))
        if not keys:
            return
        md.extend([f"## {title}", "",
                   "| K | answers | tokens | passes | accepted / pass | (target 0.8·K) | confirmed / pass | "
                   "drafts accepted | corrections | anchor CPU ms/tok | plain CPU ms/tok | **CPU ratio** | "
                   "wall ratio | wire B/tok | differing |",
                   "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"])
        for key in keys:
            v, k = S[key], int(key.rsplit("/", 1)[1])
            md.append(f"| {k} | {v['answers']} | {v['confirmed']} | {v['passes']} | {v['accepted_per_pass']:.2f} | "
                      f"{0.8 * k:.1f} | {v['confirmed_per_pass']:.2f} | {100 * v['acceptance']:.1f}% | "
                      f"{v['corrections']} | {v['anchor_cpu_ms']:.1f} | {v['plain_cpu_ms']:.1f} | "
                      f"**{v['cpu_ratio']:.3f}** | {v['wall_ratio']:.3f} | {v['wire_bytes_per_token']:.1f} | "
                      f"{v['differing']} |")
        md.append("")

    table("python/greedy/", "Python resonator drafts, greedy")
    table("python/sampled/", f"Python resonator drafts, temperature {SAMPLED_TEMPERATURE}, seeded")

    keys = sorted((key for key in S if key.startswith("python/")), key=lambda x: (x.split("/")[1], int(x.rsplit("/", 1)[1])))
    md.extend(["## Bytes on the wire and drafting work", "",
               "| drafts | K | Draft + Verdict B/tok | with WebSocket headers | Hello + Ready B/tok | "
               "hologram B/tok (once) | resonator steps / tok | drafting ms/tok | anchor ms/tok (wall) | "
               "per-answer CPU ratio median / max |",
               "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"])
    for key in keys:
        v = S[key]
        md.append(f"| {key.split('/')[1]} | {key.rsplit('/', 1)[1]} | {v['wire_bytes_per_token']:.1f} | "
                  f"{v['ws_bytes_per_token']:.1f} | {v['handshake_bytes_per_token']:.1f} | "
                  f"{v['hologram_bytes_per_token']:.0f} | {v['drafter_steps_per_token']:.2f} | "
                  f"{v['drafter_wall_ms']:.0f} | {v['anchor_wall_ms']:.1f} | "
                  f"{v['cpu_ratio_median']:.3f} / {v['cpu_ratio_max']:.3f} |")
    md.append("")

    md.extend(["## Where the corrections fall (Python drafts)", "",
               "Answer position of each corrected token (0 = the answer's first token), over all answers of a K.",
               "", "| drafts | K | corrections | at 0-3 | at 4-15 | at 16-63 | at 64+ | answers with none |",
               "|---|---:|---:|---:|---:|---:|---:|---:|"])
    for key in keys:
        _, mode, k = key.split("/")
        rows = [r for r in result["answers"] if r["drafter"] == "python" and r["mode"] == mode and r["k"] == int(k)]
        pos = [p for r in rows for p in correction_positions(r)]
        bins = [sum(lo <= p < hi for p in pos) for lo, hi in ((0, 4), (4, 16), (16, 64), (64, 1 << 30))]
        md.append(f"| {mode} | {k} | {len(pos)} | " + " | ".join(map(str, bins))
                  + f" | {sum(not correction_positions(r) for r in rows)} of {len(rows)} |")
    md.append("")

    bvp = result.get("browser_vs_python") or {}
    b = result.get("browser") or {}
    if bvp:
        md.extend(["## Browser (WGSL engine) drafts against Python drafts, same prompts", "",
                   f"Chromium {b.get('chromium')}, adapter {((b.get('setup') or {}).get('adapter'))}; "
                   f"prompts: {', '.join(next(iter(bvp.values()))['prompts'])}; greedy.", "",
                   "| K | drafts | tokens | passes | accepted / pass | corrections | anchor CPU ms/tok | "
                   "CPU ratio | drafting ms/tok | identical passes | differing |",
                   "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"])
        for k, v in bvp.items():
            for name in ("browser", "python"):
                a = v[name]
                md.append(f"| {k} | {name} | {a['confirmed']} | {a['passes']} | {a['accepted_per_pass']:.2f} | "
                          f"{a['corrections']} | {a['anchor_cpu_ms']:.1f} | {a['cpu_ratio']:.3f} | "
                          f"{a['drafter_wall_ms']:.0f} | "
                          f"{v['same_passes'] if name == 'browser' else ''}{'/' + str(a['answers']) if name == 'browser' else ''} | "
                          f"{a['differing']} |")
        md.append("")
    elif b.get("error"):
        md.extend(["## Browser", "", f"The browser part failed: {b['error']}", ""])

    md.extend(["## Per prompt (Python drafts, greedy)", "",
               "| prompt | kind | prompt tokens | answer tokens (plain, ≤ N) | hologram KB | "
               + " | ".join(f"K={k} acc/pass" for k in result["flags"]["ks"]) + " | K=16 CPU ratio |",
               "|---|---|---:|---:|---:|" + "---:|" * len(result["flags"]["ks"]) + "---:|"])
    for pid, p in result["prompts"].items():
        rows = {r["k"]: r for r in result["answers"] if r["prompt"] == pid and r["drafter"] == "python"
                and r["mode"] == "greedy"}
        if not rows:
            continue
        any_row = next(iter(rows.values()))
        r16 = rows.get(16)
        ratio = f"{r16['anchor_cpu'] / r16['plain_cpu']:.3f}" if r16 and r16["plain_cpu"] > 0 else ""
        accs = " | ".join(f"{rows[k]['accepted'] / rows[k]['passes']:.2f}" if k in rows else "" for k in fl["ks"])
        md.append(f"| {pid} | {p['kind']} | {p['prompt_tokens']} | {len(p['plain']['greedy']['ids'])} | "
                  f"{any_row['hologram_bytes'] / 1e3:.0f} | {accs} | {ratio} |")
    md.append("")

    t = result["targets"]
    md.extend(["## Targets", "",
               "| target | measured | met? |", "|---|---|---|",
               f"| accepted tokens per pass ≥ 0.8·K at K=16 (12.8), default codec, Python drafts | "
               f"{t['accepted_per_pass_k16']:.2f} | {'yes' if t['accepted_met'] else 'no'} |",
               f"| anchor CPU per confirmed token ≤ 1/4 of plain decoding | K=16: {t['cpu_ratio_k16']:.3f}; met at K = "
               f"{', '.join(map(str, t['cpu_ratio_met_k'])) or 'none'} | "
               f"{'yes' if t['cpu_ratio_met_k16'] else 'no'} (at K=16) |",
               f"| zero differing answers, reconciled vs anchor alone | {t['differing']} of {t['answers']} answers "
               f"differ | {'yes' if t['exact_met'] else 'no'} |", ""])
    if result.get("after_eos"):
        md.extend([f"{result['after_eos']} answers ended with an end-of-turn draft that the anchor accepted; "
                   "server/verify.py then confirms one more token after it (the answers above stop at the end "
                   "of turn and do not count it).", ""])
    return "\n".join(md)


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    S = result["summary"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    n_prompts = len(result["prompts"])
    for prefix, label, style in (("python/greedy/", f"Python drafts, greedy, {n_prompts} prompts", "o-"),
                                 ("python/sampled/", f"Python drafts, T={SAMPLED_TEMPERATURE}, "
                                  f"first {result['flags']['sampled']} prompts", "s")):
        keys = sorted((key for key in S if key.startswith(prefix)), key=lambda x: int(x.rsplit("/", 1)[1]))
        if not keys:
            continue
        ks = [int(key.rsplit("/", 1)[1]) for key in keys]
        a1.plot(ks, [S[key]["accepted_per_pass"] for key in keys], style, label=label)
        a2.plot(ks, [S[key]["cpu_ratio"] for key in keys], style, label=label)
    bvp = result.get("browser_vs_python") or {}
    if bvp:
        bk = [int(k) for k in bvp]
        n = len(next(iter(bvp.values()))["prompts"])
        for name, label, style in (("browser", f"WGSL drafts (browser), greedy, {n} prompts", "^:"),
                                   ("python", f"Python drafts, greedy, the same {n} prompts", "v:")):
            a1.plot(bk, [bvp[str(k)][name]["accepted_per_pass"] for k in bk], style, label=label, mfc="none")
            a2.plot(bk, [bvp[str(k)][name]["cpu_ratio"] for k in bk], style, label=label, mfc="none")
    ks = result["flags"]["ks"]
    a1.plot(ks, ks, color="gray", lw=1, label="K (every draft accepted)")
    a1.plot(ks, [0.8 * k for k in ks], color="gray", ls="--", lw=1, label="target 0.8·K")
    a2.axhline(0.25, color="gray", ls="--", lw=1, label="target 1/4")
    for ax in (a1, a2):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ks)
        ax.set_xticklabels([str(k) for k in ks])
        ax.set_xlabel("draft length K")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    a1.set_ylabel("accepted drafts per verification pass")
    a2.set_ylabel("anchor CPU per token / plain decoding")
    a2.set_ylim(0, None)
    m = result["machine"]
    fig.suptitle(f"SmolLM2-135M, {len(result['prompts'])} prompts, up to {result['flags']['new']} tokens, "
                 f"{m['cores']} CPU cores", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def emit(result: dict, args) -> None:
    resonator_bench.emit(result, args, render, plot)


# ---- main -----------------------------------------------------------------------------------


def ints(s: str) -> list[int]:
    return sorted({int(x) for x in s.split(",") if x.strip()})


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ks", default="4,8,16,32", help="draft lengths, comma-separated")
    ap.add_argument("--new", type=int, default=64, help="tokens per answer (or to the end of turn)")
    ap.add_argument("--prompts", type=int, default=None, help="only the first N prompts")
    ap.add_argument("--only", default=None, help="only these prompt ids, comma-separated")
    ap.add_argument("--sampled", type=int, default=8,
                    help=f"also run the first N prompts at temperature {SAMPLED_TEMPERATURE}, seeded")
    ap.add_argument("--sampled-ks", default="8,16,32", help="K values of the sampled runs")
    ap.add_argument("--seed", type=int, default=1234, help="seed of the first sampled prompt (then +1 each)")
    ap.add_argument("--browser", default=BROWSER_DEFAULT,
                    help="prompt ids drafted by the WGSL engine in Chromium ('' skips the browser)")
    ap.add_argument("--browser-ks", default="8,16")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (anchor and Python resonator); with 2 on a shared 2-core machine, "
                         "spin-waiting threads inflated plain decoding's CPU time 4-5x")
    ap.add_argument("--codec", default=None, help="codec preset (default: Settings().codec)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds for any one browser operation")
    ap.add_argument("--model", default="default")
    ap.add_argument("--out", type=Path, default=REPO / "docs/results/reconcile.json")
    ap.add_argument("--md", type=Path, default=None, help="also write the tables as markdown here")
    ap.add_argument("--render", type=Path, nargs="?", const=REPO / "docs/reconcile.png", default=None,
                    metavar="PNG", help="plot accepted/pass and the CPU ratio against K (default docs/reconcile.png)")
    ap.add_argument("--from", dest="from_json", type=Path, metavar="JSON",
                    help="measure nothing: print (and --md / --render) the report of an earlier --out")
    args = ap.parse_args(argv)
    if args.from_json:
        result = json.loads(args.from_json.read_text())
        derive(result)
        emit(result, args)
        return
    ks = ints(args.ks)
    args.sampled_ks_list = ints(args.sampled_ks) if args.sampled else []
    args.browser_ks_list = ints(args.browser_ks)
    if args.new < 1 or not ks:
        ap.error("need --new >= 1 and at least one K")
    command = "python -m bench.reconcile " + " ".join(argv if argv is not None else sys.argv[1:])
    t_start = time.perf_counter()
    revs = {"code_rev": git_rev(CODE_FILES), "engine_rev": git_rev(ENGINE_FILES),
            "engine_digest": files_digest(ENGINE_FILES)}  # the code this process imports: taken at the start
    load = os.getloadavg()[0]
    if load > 1.0:
        log(f"warning: load average {load:.1f} on {os.cpu_count()} cores: other work is running")

    import torch

    torch.set_num_threads(args.threads)
    from hpi.anchor import Anchor
    from hpi.config import Settings
    from hpi.models import load_model
    from hpi.sessions import SessionStore

    settings = Settings() if args.codec is None else Settings(codec=args.codec)
    log(f"loading {args.model} (torch threads {args.threads}), codec {settings.codec} ...")
    lm = load_model(args.model, device="cpu")
    anchor = Anchor(lm, **settings.anchor_options())
    log(f"  pack {len(anchor.pack_bytes) / 1e6:.1f} MB")
    store = SessionStore(anchor, settings)
    names = [x for x in args.only.split(",") if x] if args.only else None
    prompts = build_prompts(lm, names, args.prompts)
    log(f"{len(prompts)} prompts, {min(len(p['ids']) for p in prompts)}..{max(len(p['ids']) for p in prompts)} "
        f"tokens; K = {ks}; sampled: {min(args.sampled, len(prompts))} prompts at K = {args.sampled_ks_list}")

    result: dict = {"prompts": {}, "answers": [], "browser": {"console_errors": [], "error": None}}
    # warm-up, not recorded: the first forward passes of each shape are slower (allocations, kernels)
    log("warm-up ...")
    plain_decode(lm, prompts[0]["ids"], 8, 0.0, 0)
    reconcile(store, prompts[0], PythonDrafter(anchor.pack_bytes), max(ks), 8, 0.0, 0)
    log("Python resonator drafts ...")
    python_phase(store, prompts, args, ks, result)

    partial = args.out.with_suffix(".partial.json")
    partial.write_text(json.dumps(result) + "\n")  # the Python part, in case the browser part brings the process down
    log(f"wrote {partial}")
    browser_ids = [x for x in args.browser.split(",") if x]
    if browser_ids:
        bprompts = build_prompts(lm, browser_ids, None)
        log(f"browser drafts: {', '.join(p['id'] for p in bprompts)} at K = {args.browser_ks_list} ...")
        try:
            from hpi.app import create_app
            from hpi.headless import serve

            with serve(create_app(settings, anchor)) as base:
                browser_phase(store, bprompts, args, result, base)
        except Exception as e:  # no Chromium or WebGPU: the Python part still stands
            result["browser"]["error"] = f"{type(e).__name__}: {e}"
            log(f"browser part FAILED: {e}")

    result.update({
        "machine": machine(args.threads, load),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "command": command,
        "flags": {"ks": ks, "new": args.new, "sampled": args.sampled, "sampled_ks": args.sampled_ks_list,
                  "sampled_temperature": SAMPLED_TEMPERATURE, "seed": args.seed, "browser": browser_ids,
                  "browser_ks": args.browser_ks_list, "threads": args.threads, "summary_tokens": SUMMARY_TOKENS},
        **revs, "model": lm.model_id, "codec": settings.codec,
        "pack": {"bytes": len(anchor.pack_bytes), "hash": anchor.pack_hash},
        "run_seconds": time.perf_counter() - t_start})
    derive(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    partial.unlink(missing_ok=True)
    emit(result, args)
    log(f"wrote {args.out} in {result['run_seconds'] / 60:.1f} min")
    differing = result["targets"]["differing"]
    if differing:
        raise SystemExit(f"{differing} reconciled answers differ from the anchor alone")


if __name__ == "__main__":
    main()
