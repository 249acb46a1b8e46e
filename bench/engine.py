"""The anchor's forward, by engine: fp32 weights (BLAS) against the GGUF's own blocks (server/_kernels.c).

One process, the default model (SmolLM2-135M-Instruct Q4_1), a 1,000-token prompt in its cache.
For each engine and kernel thread count, interleaved (A B C D A B C D ...), it times the three
forwards the anchor runs: one decoding row (anchor-only answers), a verification pass of 17
rows (16 drafts and the token after them) and a 256-row prompt chunk (prefill), and reports
the median wall and CPU time (the process's, threads included) per forward. Torch's own ops
run on one thread inside the forward, as the scheduler runs them when the kernels do the
products ("blocks"); "blocks, torch N" gives torch the same N threads as the kernels, to
show what their two pools cost each other; the fp32 engine gets torch's threads for its BLAS.

Then, whether the engines choose the same tokens: the greedy answers (64 tokens, or to the end
of the turn) to bench/serving.py's 24 prompts from the blocks engine, the fp32 engine and
transformers' own `generate` over the same weights, counted token for token.

    python -m bench.engine                  # docs/results/engine.json, tables in docs/serving.md
    python -m bench.engine --repeats 2 --agreement-prompts 4 --no-docs
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

import torch

REPO = Path(__file__).resolve().parent.parent

from bench.resonator import machine
from bench.serving import build_prompts, replace_table
from hpi import kernels
from hpi.engine import PREFILL_CHUNK, Engine, Seq
from hpi.models import load_model
from hpi.quant import gguf_blocks
from hpi.trail import TrailCache

PROMPT_TOKENS = 1000
SHAPES = {"decode, 1 row": 1, "verify, 17 rows": 17, "prefill chunk, 256 rows": 256}


def timed(fn) -> tuple[float, float]:
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


def run(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", default="1,2", help="kernel (and BLAS) thread counts to compare")
    ap.add_argument("--agreement-prompts", type=int, default=24)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--out", default=str(REPO / "docs" / "results" / "engine.json"))
    ap.add_argument("--no-docs", action="store_true")
    args = ap.parse_args(argv)

    load0 = os.getloadavg()[0]
    lm = load_model(quantized=False)
    text = (REPO / "README.md").read_text() + (REPO / "docs" / "serving.md").read_text()
    ids = lm.tokenizer(text)["input_ids"][:PROMPT_TOKENS]
    blocks = gguf_blocks(lm.path, lm.model)
    engines = {"blocks": Engine(lm.model, blocks), "fp32": Engine(lm.model)}
    caches = {}
    torch.set_num_threads(1)
    for name, e in engines.items():
        caches[name] = TrailCache(lm.config)
        for at in range(0, PROMPT_TOKENS, 256):
            e.forward([Seq(caches[name], ids[at:at + 256], generated=False, all_logits=False)])

    threads = [int(t) for t in args.threads.split(",")]
    configs = [(name, th, 1 if name == "blocks" else th) for name in engines for th in threads]
    configs += [("blocks", th, th) for th in threads if th > 1]
    samples: dict[tuple, list] = {}
    for rep in range(args.repeats):
        for name, th, torch_threads in configs:
            e, cache = engines[name], caches[name]
            kernels.set_threads(th)
            torch.set_num_threads(torch_threads)
            label = name if torch_threads == 1 or name == "fp32" else f"{name}, torch {torch_threads}"
            for shape, rows in SHAPES.items():
                seq = Seq(cache, ids[:rows], generated=rows < 256, all_logits=rows < 256)
                samples.setdefault((label, th, shape), []).append(timed(lambda: e.forward([seq])))
                cache.crop(-rows)
        print(f"repeat {rep + 1}/{args.repeats} done", file=sys.stderr, flush=True)

    rows = []
    for (name, th, shape), got in samples.items():
        rows.append({"engine": name, "threads": th, "forward": shape, "rows": SHAPES[shape],
                     "wall_ms": 1e3 * statistics.median(w for w, _ in got),
                     "cpu_ms": 1e3 * statistics.median(c for _, c in got),
                     "cpu_ms_range": [1e3 * min(c for _, c in got), 1e3 * max(c for _, c in got)]})
    kernels.set_threads(max(threads))
    agreement = agree(lm, engines, build_prompts(lm, args.agreement_prompts), args.new)
    result = {"date": datetime.date.today().isoformat(), "machine": machine(max(threads), load0),
              "repeats": args.repeats, "prompt_tokens": PROMPT_TOKENS, "model": lm.model_id, "rows": rows,
              "agreement": agreement}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    table, agreement_table = render(result), render_agreement(result)
    print(table + "\n\n" + agreement_table)
    if not args.no_docs:
        replace_table(REPO / "docs" / "serving.md", "engine table", table)
        replace_table(REPO / "docs" / "serving.md", "agreement table", agreement_table)
    return result


def greedy(engine: Engine, lm, ids: list[int], new: int) -> list[int]:
    """The engine's greedy answer: prompt chunks as the anchor prefills them, then one row a token."""
    eos, cache = set(lm.eos_token_ids), TrailCache(lm.config)
    for at in range(0, len(ids), PREFILL_CHUNK):
        (logits,) = engine.forward([Seq(cache, ids[at:at + PREFILL_CHUNK], generated=False, all_logits=False)])
    out = [int(logits[-1].argmax())]
    while len(out) < new and out[-1] not in eos:
        (logits,) = engine.forward([Seq(cache, out[-1:], generated=True, all_logits=True)])
        out.append(int(logits[-1].argmax()))
    return out


def transformers_greedy(lm, ids: list[int], new: int) -> list[int]:
    eos = set(lm.eos_token_ids)
    torch.set_num_threads(kernels.threads())
    with torch.no_grad():
        got = lm.model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                max_new_tokens=new, do_sample=False)[0, len(ids):].tolist()
    return got[:next((i + 1 for i, t in enumerate(got) if t in eos), len(got))]


def agree(lm, engines: dict, prompts: list[dict], new: int) -> dict:
    answers = []
    for p in prompts:
        torch.set_num_threads(1)
        a = {name: greedy(e, lm, p["ids"], new) for name, e in engines.items()}
        a["transformers"] = transformers_greedy(lm, p["ids"], new)
        answers.append({"id": p["id"], "prompt_tokens": len(p["ids"]), **a})
        print(f"agreement {p['id']}: " + ", ".join(f"{k} {len(v)}" for k, v in a.items()), file=sys.stderr, flush=True)

    def first_difference(x: list[int], y: list[int]) -> int | None:
        return next((i for i, (s, t) in enumerate(zip(x, y)) if s != t), None if len(x) == len(y) else min(len(x), len(y)))

    pairs = [("blocks", "fp32"), ("blocks", "transformers"), ("fp32", "transformers")]
    return {"new": new, "answers": answers,
            "pairs": [{"a": a, "b": b, "identical": sum(first_difference(r[a], r[b]) is None for r in answers),
                       "prompts": len(answers),
                       "first_differences": [d for r in answers if (d := first_difference(r[a], r[b])) is not None]}
                      for a, b in pairs]}


def render_agreement(result: dict) -> str:
    g = result["agreement"]
    lines = [f"Greedy answers ({g['new']} tokens or to the end of the turn) to bench/serving.py's prompts, "
             f"same run.", "", "| engines | identical answers | where the others first differ (token index) |",
             "|---|---:|---|"]
    for p in g["pairs"]:
        where = ", ".join(map(str, sorted(p["first_differences"]))) or "–"
        lines.append(f"| {p['a']} / {p['b']} | {p['identical']} of {p['prompts']} | {where} |")
    return "\n".join(lines)


def render(result: dict) -> str:
    m = result["machine"]
    lines = [f"One run on {m.get('cpu', '?')}, {m.get('cores', '?')} cores, {result['date']}; "
             f"{result['prompt_tokens']} tokens in the cache; median of {result['repeats']} interleaved repeats "
             f"(CPU range in brackets).", "",
             "| forward | engine | threads | wall ms | CPU ms | CPU ms per row |", "|---|---|---:|---:|---:|---:|"]
    for r in sorted(result["rows"], key=lambda r: (r["rows"], r["engine"], r["threads"])):
        lo, hi = r["cpu_ms_range"]
        lines.append(f"| {r['forward']} | {r['engine']} | {r['threads']} | {r['wall_ms']:.1f} | "
                     f"{r['cpu_ms']:.1f} [{lo:.1f}–{hi:.1f}] | {r['cpu_ms'] / r['rows']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    run()
