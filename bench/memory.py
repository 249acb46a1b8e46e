"""The holographic memory (server/memory/) measured: capacity, speed, exact recall, and next-token
prediction on real text against a plain n-gram model with backoff.

  capacity   k random bindings superposed in one basin (one d x d matrix), each unbound with its
             context's transpose and scored against a 1,000-token vocabulary: top-1 recall by k
             and d. The k at ≥90% recall is what store.BASIN_CAPACITY (the default satellite
             count) is built on; the run checks they agree.
  speed      learn samples/s (Memory.learn, batches of 100,000), queries/s batched (10,000 per
             call) and one at a time, on stored contexts (episodic path) and on unseen contexts
             of the text memory (prototype/holographic paths), generation tokens/s; saving the
             10^6-pattern memory to its .holo file.
  recall     top-1 = stored target for every stored context, 10^5 and 10^6 patterns of random
             token sequences (vocabulary 49,152), with the full memory and with the holographic
             part alone (episodic and prototypes off).
  text       Python 3.11's standard library sources (/usr/lib/python3.11, tests excluded),
             tokenized by SmolLM2's tokenizer; every 10th file (sorted by path) is held out.
             Next-token top-1 accuracy and perplexity on the held-out tokens for the memory
             (context n tokens), with each mechanism switched off in turn, against an
             interpolated Witten-Bell n-gram model (orders 0..n) trained on the same tokens.

    python -m bench.memory              # the full run; writes docs/results/memory.json
    python -m bench.memory --quick      # smaller sizes, nothing written
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent

from hpi.memory import persist, so4
from hpi.memory.dreaming import dream
from hpi.memory.episodic import Episodic
from hpi.memory.store import BASIN_CAPACITY, PATHS, Config, Mechanisms, Memory

STDLIB = Path("/usr/lib/python3.11")
VOCAB = 49152  # SmolLM2's
TARGETS = {"learn_per_s": 100_000, "batched_queries_per_s": 20_000, "generation_tokens_per_s": 100,
           "recall_1e6": 1.0}


def machine() -> dict:
    cpu = "?"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "numpy": np.__version__,
            "load_avg_start": round(os.getloadavg()[0], 2)}


def table(title: str, header: list[str], rows: list[list]) -> str:
    cells = [[str(c) for c in r] for r in [header] + rows]
    width = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, width))) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in width) + "|"
    return "\n".join([f"\n{title}", line(cells[0]), sep] + [line(r) for r in cells[1:]])


# -- capacity ------------------------------------------------------------------------------

def capacity(ks: list[int], vocab: int = 1000, probes: int = 4000, seed: int = 1) -> dict:
    rng = np.random.default_rng(seed)
    out = {}
    for d in so4.DIMS:
        emb = so4.embeddings(vocab, d, 0)
        flat = emb.reshape(vocab, -1)
        row = {}
        for k in ks:
            trials = max(1, probes // k)
            ctx = so4.embeddings(trials * k, d, int(rng.integers(1 << 30))).reshape(trials, k, d, d)
            tgt = rng.integers(0, vocab, (trials, k))
            basin = so4.bind(ctx, emb[tgt]).sum(1)  # (trials, d, d): k bindings superposed
            got = so4.unbind(ctx, basin[:, None]).reshape(trials * k, -1) @ flat.T
            row[k] = float((got.argmax(1) == tgt.ravel()).mean())
        out[d] = row
    return out


# -- speed and exact recall on random sequences --------------------------------------------

def random_memory(n_patterns: int, context: int, dim: int, seed: int = 0) -> tuple[Memory, np.ndarray, np.ndarray, float]:
    seq = np.random.default_rng(seed).integers(0, VOCAB, n_patterns + context)
    ctx, nxt = so4.windows(seq, context)
    mem = Memory(Config(vocab=VOCAB, context=context, dim=dim, planned_patterns=n_patterns))
    t = time.perf_counter()
    for lo in range(0, n_patterns, 100_000):
        mem.learn(ctx[lo:lo + 100_000], nxt[lo:lo + 100_000])
    mem.episodic.compact()  # part of learning: the first query would do it
    return mem, ctx, nxt, n_patterns / (time.perf_counter() - t)


def recall(mem: Memory, ctx: np.ndarray, nxt: np.ndarray, use: Mechanisms, limit: int | None = None) -> float:
    if limit:
        pick = np.random.default_rng(3).choice(len(nxt), min(limit, len(nxt)), replace=False)
        ctx, nxt = ctx[pick], nxt[pick]
    hits = 0
    for lo in range(0, len(nxt), 20_000):
        hits += int((mem.predict(ctx[lo:lo + 20_000], use=use).tokens[:, 0] == nxt[lo:lo + 20_000]).sum())
    return hits / len(nxt)


def batched_rate(mem: Memory, ctx: np.ndarray, batch: int = 10_000, repeat: int = 5) -> float:
    t = time.perf_counter()
    done = 0
    for i in range(repeat):
        lo = (i * batch) % max(1, len(ctx) - batch)
        done += len(mem.predict(ctx[lo:lo + batch], k=5).path)
    return done / (time.perf_counter() - t)


def single_rate(mem: Memory, ctx: np.ndarray, n: int = 2000) -> float:
    t = time.perf_counter()
    for i in range(n):
        mem.predict(ctx[i:i + 1], k=5)
    return n / (time.perf_counter() - t)


# -- real text -----------------------------------------------------------------------------

def stdlib_tokens(max_train: int, max_test: int) -> tuple[np.ndarray, np.ndarray, dict]:
    from transformers import AutoTokenizer
    from hpi.models import default_model_path
    path = default_model_path()
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    files = sorted(p for p in STDLIB.rglob("*.py")
                   if not {"test", "tests", "idle_test", "site-packages", "dist-packages"} & set(p.parts))
    train, test = [], []
    n_train = n_test = 0
    for i, f in enumerate(files):
        held = i % 10 == 0
        if (held and n_test >= max_test) or (not held and n_train >= max_train):
            continue
        ids = tok(f.read_text(errors="replace"), add_special_tokens=False)["input_ids"]
        (test if held else train).append(ids)
        if held:
            n_test += len(ids)
        else:
            n_train += len(ids)
        if n_train >= max_train and n_test >= max_test:
            break
    # Each file is its own sequence: no context spans two files.
    info = {"source": str(STDLIB), "files_train": len(train), "files_test": len(test),
            "tokenizer": "SmolLM2-135M-Instruct (GGUF)"}
    return train, test, info


def windows_of(seqs: list[list[int]], n: int) -> tuple[np.ndarray, np.ndarray]:
    parts = [so4.windows(np.array(s, np.int64), n) for s in seqs if len(s) > n]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


class WittenBell:
    """Interpolated Witten-Bell n-gram model, orders 0..n, exact counts (the baseline).

    P_m(w | h) = (c(h, w) + T(h) P_{m-1}(w | h')) / (c(h) + T(h)) where h has m tokens, h' drops
    its oldest one, T(h) is the number of distinct tokens seen after h; order 0 is add-one
    unigram. A context never seen falls back to the next shorter one.
    """

    def __init__(self, seqs: list[list[int]], n: int, vocab: int):
        self.n, self.vocab = n, vocab
        all_tokens = np.concatenate([np.array(s, np.int64) for s in seqs])
        self.unigram = (np.bincount(all_tokens, minlength=vocab) + 1.0) / (len(all_tokens) + vocab)
        self.tables = {}
        for m in range(1, n + 1):
            ctx, nxt = windows_of(seqs, m)
            ep = Episodic(m)
            ep.add(ctx, nxt)
            ep.compact()
            self.tables[m] = ep

    def prob(self, ctx: np.ndarray, w: np.ndarray) -> np.ndarray:
        p = self.unigram[w]
        for m in range(1, self.n + 1):
            q, tgt, cnt = self.tables[m].lookup(np.ascontiguousarray(ctx[:, self.n - m:]))
            c_h = np.bincount(q, weights=cnt, minlength=len(w))
            t_h = np.bincount(q, minlength=len(w))
            c_hw = np.bincount(q, weights=cnt * (tgt == w[q]), minlength=len(w))
            p = np.where(c_h > 0, (c_hw + t_h * p) / np.maximum(c_h + t_h, 1), p)
        return p

    def top1(self, ctx: np.ndarray, candidates: int = 8) -> np.ndarray:
        """argmax over the 8 most frequent continuations of the longest seen context and the
        unigram's best (the argmax of the interpolated distribution is among them in practice)."""
        B = len(ctx)
        cand_q, cand_w = [np.arange(B)], [np.full(B, int(self.unigram.argmax()))]
        found = np.zeros(B, bool)
        for m in range(self.n, 0, -1):
            q, tgt, cnt = self.tables[m].lookup(np.ascontiguousarray(ctx[:, self.n - m:]))
            keep = ~found[q]
            q, tgt, cnt = q[keep], tgt[keep], cnt[keep]
            order = np.lexsort((-cnt, q))
            q, tgt = q[order], tgt[order]
            rank = np.arange(len(q)) - np.searchsorted(q, q, "left")
            cand_q.append(q[rank < candidates])
            cand_w.append(tgt[rank < candidates])
            found[q] = True
        q, w = np.concatenate(cand_q), np.concatenate(cand_w)
        p = self.prob(ctx[q], w)
        order = np.lexsort((-p, q))
        q, w = q[order], w[order]
        first = np.concatenate([[True], q[1:] != q[:-1]])
        out = np.empty(B, np.int64)
        out[q[first]] = w[first]
        return out


def evaluate(predict, ctx: np.ndarray, nxt: np.ndarray, chunk: int = 10_000) -> dict:
    hits, logp, paths = 0, 0.0, np.zeros(len(PATHS), np.int64)
    t = time.perf_counter()
    for lo in range(0, len(nxt), chunk):
        top, prob, path = predict(ctx[lo:lo + chunk], nxt[lo:lo + chunk])
        hits += int((top == nxt[lo:lo + chunk]).sum())
        logp += float(np.log(prob).sum())
        if path is not None:
            paths += np.bincount(path, minlength=len(PATHS))
    out = {"accuracy": hits / len(nxt), "perplexity": math.exp(-logp / len(nxt)),
           "queries_per_s": len(nxt) / (time.perf_counter() - t)}
    if paths.sum():
        out["paths"] = {name: round(float(c / paths.sum()), 4) for name, c in zip(PATHS, paths)}
    return out


def memory_predictor(mem: Memory, use: Mechanisms):
    def predict(ctx, nxt):
        p = mem.predict(ctx, k=1, targets=nxt, use=use)
        return p.tokens[:, 0], p.target_prob, p.path
    return predict


def text_benchmark(train, test, n: int, dim: int) -> tuple[dict, Memory, np.ndarray]:
    ctx_tr, nxt_tr = windows_of(train, n)
    ctx_te, nxt_te = windows_of(test, n)
    mem = Memory(Config(vocab=VOCAB, context=n, dim=dim, planned_patterns=len(nxt_tr)))
    t = time.perf_counter()
    for s in train:
        mem.learn_sequence(np.array(s, np.int64))
    mem.episodic.compact()
    learn_s = time.perf_counter() - t
    awake = {name: evaluate(memory_predictor(mem, use), ctx_te, nxt_te) for name, use in (
        ("memory, no dreaming", Mechanisms()),
    )}
    t = time.perf_counter()
    report = dream(mem)
    dream_s = time.perf_counter() - t
    rows = {"memory (all mechanisms, after dreaming)": evaluate(memory_predictor(mem, Mechanisms()), ctx_te, nxt_te)}
    for name, use in (("episodic off", Mechanisms(episodic=False)),
                      ("prototypes off", Mechanisms(prototypes=False)),
                      ("holographic off", Mechanisms(holographic=False))):
        rows[name] = evaluate(memory_predictor(mem, use), ctx_te, nxt_te)
    rows["dreaming off"] = awake["memory, no dreaming"]
    rows["episodic only (+ prior)"] = evaluate(memory_predictor(mem, Mechanisms(True, False, False)), ctx_te, nxt_te)
    rows["holographic only (+ prior)"] = evaluate(memory_predictor(mem, Mechanisms(False, False, True)), ctx_te, nxt_te)
    t = time.perf_counter()
    wb = WittenBell(train, n, VOCAB)
    ngram_s = time.perf_counter() - t
    rows["n-gram, Witten-Bell backoff"] = evaluate(lambda c, w: (wb.top1(c), wb.prob(c, w), None), ctx_te, nxt_te,
                                                   chunk=2000)  # short contexts have thousands of continuations
    seen = mem.predict(ctx_te, k=1, use=Mechanisms(True, False, False)).path == PATHS.index("episodic")
    info = {"n": n, "dim": dim, "train_samples": int(len(nxt_tr)), "test_samples": int(len(nxt_te)),
            "test_contexts_seen_in_training": round(float(seen.mean()), 4),
            "learn_s": round(learn_s, 2), "ngram_train_s": round(ngram_s, 2), "dream_s": round(dream_s, 2),
            "dream": report.as_dict(),
            "stats_after_dreaming": mem.stats(), "rows": rows}
    return info, mem, ctx_te


# -- the memory as a draft source (prompt-lookup style) ------------------------------------

DRAFT_TASKS = [  # (instruction, repo file, which part): input-grounded tasks, where answers copy the input
    ("Add a docstring to each function in this code and repeat the code in full:", "server/rope.py", 0),
    ("Rewrite this code with the variable names unchanged, adding type hints:", "server/sampling.py", 0),
    ("Repeat this code exactly, fixing any typos in the comments:", "server/metrics.py", 0),
    ("Summarise this text in a few sentences, quoting its key terms:", "README.md", 1),
    ("Summarise this text in a few sentences, quoting its key terms:", "docs/codec.md", 1),
    ("Copy the table in this text and explain each row:", "docs/fidelity.md", 1),
]


def draft_prompts(tok, max_chars: int = 1800) -> list[list[int]]:
    prompts = []
    for instruction, path, _ in DRAFT_TASKS:
        text = (REPO / path).read_text()[:max_chars]
        messages = [{"role": "user", "content": f"{instruction}\n\n{text}"}]
        rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        prompts.append(tok(rendered, add_special_tokens=False)["input_ids"])
    return prompts


def decode_with_memory_drafts(model, eos: set[int], prompt: list[int], max_new: int, k: int, n: int):
    """Greedy decoding where a memory learned from the prompt (and the answer so far) drafts up to
    k tokens; only drafts its episodic path gives are proposed. One forward pass checks them all."""
    import torch
    from transformers import DynamicCache
    mem = Memory(Config(vocab=model.config.vocab_size, context=n, planned_patterns=max(len(prompt), 1024)))
    mem.learn_sequence(np.array(prompt, np.int64))
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt]), past_key_values=cache, use_cache=True).logits[0, -1]
        out = [int(logits.argmax())]
        passes, proposed, accepted = 1, 0, 0
        while len(out) < max_new and out[-1] not in eos:
            seq = prompt + out
            drafts = []
            for t, path in zip(*mem.generate(seq[-n:], k)):
                if path != "episodic":
                    break
                drafts.append(t)
            drafts = drafts[:max_new - len(out) - 1]
            feed = [out[-1]] + drafts  # the last confirmed token has no KV yet
            logits = model(input_ids=torch.tensor([feed]), past_key_values=cache, use_cache=True).logits[0]
            choice = logits.argmax(-1).tolist()  # choice[i]: the model's token after feed[:i+1]
            a = 0
            while a < len(drafts) and drafts[a] == choice[a] and drafts[a] not in eos:
                a += 1
            if len(drafts) > a:
                cache.crop(a - len(drafts))
            new = drafts[:a] + [choice[a]]
            mem.learn_sequence(np.array(seq[-n:] + new, np.int64))
            out += new
            passes += 1
            proposed += len(drafts)
            accepted += a
    return out[:max_new], passes, proposed, accepted


def drafts_benchmark(max_new: int = 96, k: int = 10, n: int = 2) -> dict:
    import torch
    from hpi.models import load_model
    # One thread: on this shared 2-core machine two torch threads contend with the other work
    # and decode 8x slower (measured: 16 tokens in 42 s with 2 threads, 5.3 s with 1).
    torch.set_num_threads(1)
    lm = load_model("default", device="cpu")
    model, eos = lm.model, set(lm.eos_token_ids)
    gen = dict(max_new_tokens=max_new, do_sample=False, eos_token_id=sorted(eos), pad_token_id=lm.tokenizer.pad_token_id)
    rows = []
    for task, prompt in zip(DRAFT_TASKS, draft_prompts(lm.tokenizer)):
        ids = torch.tensor([prompt])
        t = time.perf_counter()
        plain = model.generate(ids, **gen)[0, len(prompt):].tolist()
        t_plain = time.perf_counter() - t
        t = time.perf_counter()
        lookup = model.generate(ids, prompt_lookup_num_tokens=k, **gen)[0, len(prompt):].tolist()
        t_lookup = time.perf_counter() - t
        t = time.perf_counter()
        mine, passes, proposed, accepted = decode_with_memory_drafts(model, eos, prompt, max_new, k, n)
        t_mine = time.perf_counter() - t
        rows.append({"task": f"{task[0].split(' ')[0]} {task[1]}", "prompt_tokens": len(prompt),
                     "tokens": len(plain), "plain_s": t_plain, "prompt_lookup_s": t_lookup, "memory_s": t_mine,
                     "prompt_lookup_same": lookup == plain, "memory_same": mine == plain,
                     "memory_passes": passes, "memory_proposed": proposed, "memory_accepted": accepted})
    tot = lambda key: sum(r[key] for r in rows)
    return {"k": k, "n": n, "max_new_tokens": max_new, "rows": rows,
            "speedup_prompt_lookup": tot("plain_s") / tot("prompt_lookup_s"),
            "speedup_memory": tot("plain_s") / tot("memory_s"),
            "memory_acceptance": tot("memory_accepted") / max(tot("memory_proposed"), 1),
            "memory_tokens_per_pass": tot("tokens") / tot("memory_passes")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes; writes nothing")
    ap.add_argument("--drafts", action="store_true",
                    help="only the draft-source comparison on SmolLM2; adds it to docs/results/memory.json")
    args = ap.parse_args()
    if args.drafts:
        return drafts_main(args.quick)
    quick = args.quick
    mach = machine()
    command = "python -m bench.memory" + (" --quick" if quick else "")
    out = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "command": command,
           "machine": mach, "targets": TARGETS}
    printed = [f"machine: {mach['cpu']}, {mach['cores']} cores, load average {mach['load_avg_start']} at start; "
               f"python {mach['python']}, numpy {mach['numpy']}", f"command: {command}"]
    print("\n".join(printed), flush=True)

    def show(text: str) -> None:
        printed.append(text)
        print(text, flush=True)

    # capacity
    ks = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32]
    cap = capacity(ks, probes=1000 if quick else 6000)
    held = {d: max([k for k in ks if cap[d][k] >= 0.9], default=0) for d in cap}
    out["capacity"] = {"vocab": 1000, "recall": {str(d): {str(k): v for k, v in r.items()} for d, r in cap.items()},
                       "bindings_at_90pct": held, "store_defaults": BASIN_CAPACITY,
                       "defaults_agree": held == BASIN_CAPACITY}
    show(table("Capacity: top-1 recall of k bindings superposed in one basin (1,000-token vocabulary)",
               ["d \\ k"] + [str(k) for k in ks] + ["k at ≥90%"],
               [[f"{d}x{d}"] + [f"{cap[d][k]:.3f}" for k in ks] + [held[d]] for d in cap]))
    show(f"store.BASIN_CAPACITY = {BASIN_CAPACITY}: {'agrees' if held == BASIN_CAPACITY else 'DIFFERS'}")

    # speed + recall on random sequences
    sizes = [10 ** 4, 10 ** 5] if quick else [10 ** 5, 10 ** 6]
    speed_rows, recall_rows, out["random"] = [], [], {}
    for n_pat in sizes:
        mem, ctx, nxt, learn_rate = random_memory(n_pat, 3, 4)
        r_full = recall(mem, ctx, nxt, Mechanisms())
        r_holo = recall(mem, ctx, nxt, Mechanisms(episodic=False, prototypes=False), limit=100_000)
        rec = {"patterns": n_pat, "satellites": mem.config.satellites, "learn_per_s": learn_rate,
               "recall_full": r_full, "recall_holographic_only": r_holo,
               "batched_queries_per_s": batched_rate(mem, ctx), "single_queries_per_s": single_rate(mem, ctx)}
        if n_pat == sizes[-1]:
            with tempfile.TemporaryDirectory() as tmp:
                t = time.perf_counter()
                size = persist.save(mem, "bench", Path(tmp) / "bench.holo")
                rec["save_s"], rec["file_bytes"] = time.perf_counter() - t, size
                t = time.perf_counter()
                persist.load(Path(tmp) / "bench.holo")
                rec["load_s"] = time.perf_counter() - t
        out["random"][str(n_pat)] = rec
        recall_rows.append([f"{n_pat:,}", f"{mem.config.satellites:,}", f"{r_full:.4%}", f"{r_holo:.2%}"])
        speed_rows.append([f"{n_pat:,}", f"{learn_rate:,.0f}", f"{rec['batched_queries_per_s']:,.0f}",
                           f"{rec['single_queries_per_s']:,.0f}"])
        del mem
    for d in (8, 16):
        mem, ctx, nxt, rate = random_memory(10 ** 5, 3, d)
        r_holo = recall(mem, ctx, nxt, Mechanisms(episodic=False, prototypes=False), limit=5000)
        out["random"][f"d{d}"] = {"patterns": 10 ** 5, "satellites": mem.config.satellites, "learn_per_s": rate,
                                  "recall_holographic_only": r_holo}
        speed_rows.append([f"100,000 (d={d})", f"{rate:,.0f}", "", ""])
        recall_rows.append([f"100,000 (d={d})", f"{mem.config.satellites:,}", "", f"{r_holo:.2%}"])
        del mem
    show(table("Exact recall of stored contexts (random sequences, vocabulary 49,152, n=3, d=4 unless said)",
               ["patterns", "satellites", "top-1 = stored, full memory", "holographic alone"], recall_rows))
    show(table("Speed, random sequences (d=4 unless said; queries on stored contexts: episodic path)",
               ["patterns", "learn samples/s", "batched queries/s (10,000 per call)", "single queries/s"],
               speed_rows))

    # real text
    train, test, info = stdlib_tokens(200_000 if quick else 1_000_000, 20_000 if quick else 100_000)
    out["text"] = {"corpus": info, "runs": []}
    for n in ((3,) if quick else (2, 3, 4)):
        res, mem, ctx_te = text_benchmark(train, test, n, 4)
        out["text"]["runs"].append(res)
        rows = [[name, f"{r['accuracy']:.2%}", f"{r['perplexity']:.1f}",
                 ", ".join(f"{k} {v:.0%}" for k, v in r.get("paths", {}).items() if v) or "—",
                 f"{r['queries_per_s']:,.0f}"] for name, r in res["rows"].items()]
        show(table(f"Held-out next token, Python stdlib, n={n}, d=4: {res['train_samples']:,} training samples, "
                   f"{res['test_samples']:,} held-out ({res['test_contexts_seen_in_training']:.1%} of held-out "
                   f"contexts seen in training)",
                   ["model", "top-1", "perplexity", "answered by", "queries/s"], rows))
        show(f"training: memory {res['learn_s']:.2f} s (+ dreaming {res['dream_s']:.2f} s), "
             f"n-gram counts {res['ngram_train_s']:.2f} s")
        if n == 3:
            novel = ctx_te[mem.predict(ctx_te, use=Mechanisms(True, False, False)).path != PATHS.index("episodic")]
            out["text"]["unseen_batched_queries_per_s"] = batched_rate(mem, novel)
            t = time.perf_counter()
            gen, _ = mem.generate(ctx_te[0].tolist(), 1000)
            out["text"]["generation_tokens_per_s"] = 1000 / (time.perf_counter() - t)
            show(f"unseen held-out contexts, batched: {out['text']['unseen_batched_queries_per_s']:,.0f} queries/s; "
                 f"generation: {out['text']['generation_tokens_per_s']:,.0f} tokens/s (greedy, 1,000 tokens)")
        del mem

    big = out["random"][str(sizes[-1])]
    met = {
        "learn_per_s": big["learn_per_s"] >= TARGETS["learn_per_s"],
        "batched_queries_per_s": big["batched_queries_per_s"] >= TARGETS["batched_queries_per_s"]
        and out["text"]["unseen_batched_queries_per_s"] >= TARGETS["batched_queries_per_s"],
        "generation_tokens_per_s": out["text"]["generation_tokens_per_s"] >= TARGETS["generation_tokens_per_s"],
        "recall_1e6": big["recall_full"] >= TARGETS["recall_1e6"],
    }
    out["targets_met"] = met
    mach["load_avg_end"] = round(os.getloadavg()[0], 2)
    show(table("Targets", ["target", "measured", "met"], [
        ["learn ≥ 100,000 samples/s", f"{big['learn_per_s']:,.0f}", "met" if met["learn_per_s"] else "NOT met"],
        ["batched queries ≥ 20,000/s (stored; unseen)",
         f"{big['batched_queries_per_s']:,.0f}; {out['text']['unseen_batched_queries_per_s']:,.0f}",
         "met" if met["batched_queries_per_s"] else "NOT met"],
        ["generation ≥ 100 tokens/s", f"{out['text']['generation_tokens_per_s']:,.0f}",
         "met" if met["generation_tokens_per_s"] else "NOT met"],
        [f"100% recall at {sizes[-1]:,} patterns", f"{big['recall_full']:.4%}",
         "met" if met["recall_1e6"] else "NOT met"],
    ]))
    show(f"load average at the end: {mach['load_avg_end']}")
    out["printed"] = "\n".join(printed)
    if not quick:
        path = REPO / "docs" / "results" / "memory.json"
        if path.exists() and "drafts" in (old := json.loads(path.read_text())):
            out["drafts"] = old["drafts"]  # a separate run (--drafts) that this one does not repeat
        path.write_text(json.dumps(out, indent=1, default=lambda o: o.item() if hasattr(o, "item") else str(o)) + "\n")
        print(f"wrote {path.relative_to(REPO)}")


def drafts_main(quick: bool) -> None:
    mach = machine()
    command = "python -m bench.memory --drafts" + (" --quick" if quick else "")
    print(f"machine: {mach['cpu']}, {mach['cores']} cores, load average {mach['load_avg_start']} at start\n"
          f"command: {command}", flush=True)
    if quick:
        del DRAFT_TASKS[2:]
    res = drafts_benchmark(max_new=24 if quick else 96)
    mach["load_avg_end"] = round(os.getloadavg()[0], 2)
    rows = [[r["task"], r["prompt_tokens"], r["tokens"], f"{r['plain_s']:.2f}",
             f"{r['prompt_lookup_s']:.2f}" + ("" if r["prompt_lookup_same"] else " (differs)"),
             f"{r['memory_s']:.2f}" + ("" if r["memory_same"] else " (differs)"),
             f"{r['memory_accepted']}/{r['memory_proposed']}", r["memory_passes"]] for r in res["rows"]]
    rows.append(["all", "", sum(r["tokens"] for r in res["rows"]), "1.00x",
                 f"{res['speedup_prompt_lookup']:.2f}x", f"{res['speedup_memory']:.2f}x",
                 f"{res['memory_acceptance']:.0%}", f"{res['memory_tokens_per_pass']:.2f} tok/pass"])
    text = table(f"SmolLM2-135M greedy, {res['max_new_tokens']} new tokens: plain decoding, transformers' prompt "
                 f"lookup (k={res['k']}) and memory drafts (n={res['n']}, up to {res['k']} episodic drafts)",
                 ["task", "prompt", "tokens", "plain s", "prompt lookup s", "memory drafts s",
                  "drafts accepted", "passes"], rows)
    text += f"\nload average at the end: {mach['load_avg_end']}"
    print(text, flush=True)
    if not quick:
        path = REPO / "docs" / "results" / "memory.json"
        out = json.loads(path.read_text())
        out["drafts"] = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "command": command,
                         "machine": mach, **res, "printed": text}
        path.write_text(json.dumps(out, indent=1) + "\n")
        print(f"updated {path.relative_to(REPO)}")


if __name__ == "__main__":
    main()
