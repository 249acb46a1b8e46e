"""Both gemv layouts by context length, and the layout the engine picks against the engine as it
was before there were two (a "no regression" ratio), on one adapter in one run.

Built on bench/gpu_kernels.py (pack and holograms from the anchor) and its Node + Dawn runner
(bench/gpu/gpu_kernels.mjs); on a machine without a GPU that is SwiftShader.

1. Per layout (cpu, gpu) and context length: tok/s, ms per kernel of one step (grouped: gemv,
   attention, other), dispatches per token, bytes read per token (weights + K and V of the
   positions attention reads) and the bandwidth-bound ratio: ms per token over the ms that many
   bytes take at the adapter's measured copy bandwidth (1 = as fast as the memory allows).
2. The chosen layout of this tree against client_web/ + shaders/ of --baseline (default
   c3de21c, the last commit before the two layouts, taken with `git archive`), runner calls
   interleaved (this, baseline, this, ...) for --rounds rounds: median tok/s of each and their
   ratio; the target is >= 0.95.

    python -m bench.layouts                          # SmolLM2, contexts 256,1024,4096, 3 rounds
    python -m bench.layouts --model tiny             # the tests' tiny model, about a minute
    python -m bench.layouts --ctx 256 --rounds 3     # smaller: one context length
    python -m bench.layouts --rounds 0               # the table only

On SwiftShader a SmolLM2 step at 4096 positions in the `gpu` layout takes many seconds, so each
cell times few tokens (--new, after --warmup) and one profiled step (--profile-repeats); the
output says how many. A plain-text table on stdout, JSON at --out.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from bench import gpu_kernels

REPO = gpu_kernels.REPO
BASELINE = "c3de21c"
TARGET = 0.95
KERNEL_GROUPS = {
    "gemv": ("qkv", "wo", "gate_up", "down", "lm_head"),
    "attention": ("rope_append", "attn_scores", "attn_softmax", "attn_values"),
}
BYTES_COUNTED = ("bytes per token = weights the step reads (the engine's bytesPerToken: every layer's "
                 "matrices and norms, the LM head, one embedding row) + KV read (K and V, f32, of the "
                 "context + 1 positions attention reads at the first timed step, every layer); not "
                 "counted: activations, the new position's KV write, logits and scratch buffers")

log = gpu_kernels.log


# ---- pure parts (bench/test_bench.py) -----------------------------------------------------------

def kv_bytes(cfg: dict, positions: int) -> int:
    """Bytes of K and V attention reads in one step over `positions` cached positions (f32 cache)."""
    return 2 * cfg["L"] * positions * cfg["G"] * cfg["DH"] * 4


def bound_ratio(ms_per_token: float, bytes_per_token: float, gb_s: float) -> float:
    """Time per token over the time its bytes take at `gb_s` (1.0 = bandwidth-bound)."""
    return ms_per_token / (bytes_per_token / (gb_s * 1e9) * 1e3)


def group_kernels(kernels: dict[str, float]) -> dict[str, float]:
    """Per-kernel ms summed into the KERNEL_GROUPS, the rest under 'other'."""
    out = {g: 0.0 for g in (*KERNEL_GROUPS, "other")}
    for name, ms in kernels.items():
        out[next((g for g, names in KERNEL_GROUPS.items() if name in names), "other")] += ms
    return out


def cells(result: dict) -> list[dict]:
    """One row per layout and context length of a runner result (bench/gpu/gpu_kernels.mjs JSON)."""
    gb_s = result["bandwidth"]["gbS"]
    rows = []
    for lay in result["layouts"]:
        for c in lay["contexts"].values():
            kv = kv_bytes(lay["cfg"], c["positions"] + 1)
            total = lay["bytesPerToken"] + kv
            kernels = {k: float(ms) for k, ms in ((c.get("profile") or {}).get("kernels") or {}).items()}
            rows.append({
                "layout": lay["layout"], "context": c["positions"], "tokS": c["tokS"],
                "msPerToken": c["msPerToken"], "dispatches": c["dispatchesPerToken"],
                "weightBytes": lay["bytesPerToken"], "kvBytes": kv, "bytes": total,
                "boundMs": total / (gb_s * 1e9) * 1e3, "boundRatio": bound_ratio(c["msPerToken"], total, gb_s),
                "groups": group_kernels(kernels) if kernels else None, "kernels": kernels,
            })
    return rows


def regression(head: list[float], base: list[float], target: float = TARGET) -> dict:
    """Median tok/s of this tree's chosen layout and of the baseline, their ratio and whether it meets `target`."""
    h, b = statistics.median(head), statistics.median(base)
    return {"head": head, "base": base, "headMedian": h, "baseMedian": b, "ratio": h / b,
            "target": target, "ok": h / b >= target}


def format_table(header: list[str], rows: list[list]) -> str:
    """Plain text, columns aligned: text to the left, numbers to the right."""
    text = [[c if isinstance(c, str) else f"{c:,.2f}" if isinstance(c, float) else f"{c:,}" for c in r]
            for r in rows]
    width = [max(len(x) for x in col) for col in zip(header, *text)]
    left = [all(isinstance(r[i], str) for r in rows) for i in range(len(header))]

    def line(cs):
        return "  ".join(c.ljust(w) if lf else c.rjust(w) for c, w, lf in zip(cs, width, left)).rstrip()
    return "\n".join([line(header), line(["-" * w for w in width]), *map(line, text)])


def cell_table(rows: list[dict]) -> str:
    mb = 1e6
    return format_table(
        ["layout", "context", "tok/s", "ms/token", "dispatches", "weights MB", "KV MB", "MB/token",
         "bound ms", "time/bound", "gemv ms", "attention ms", "other ms"],
        [[r["layout"], r["context"], r["tokS"], r["msPerToken"], r["dispatches"], r["weightBytes"] / mb,
          r["kvBytes"] / mb, r["bytes"] / mb, r["boundMs"], r["boundRatio"],
          *([r["groups"][g] for g in (*KERNEL_GROUPS, "other")] if r["groups"] else ["–"] * 3)] for r in rows])


def kernel_table(rows: list[dict]) -> str:
    names = [n for g in KERNEL_GROUPS.values() for n in g]
    names += sorted({n for r in rows for n in r["kernels"]} - set(names))
    return format_table(["layout", "context", *names],
                        [[r["layout"], r["context"], *[r["kernels"].get(n, 0.0) for n in names]]
                         for r in rows if r["kernels"]])


def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores ({platform.system()} {platform.release()})"


# ---- runs ---------------------------------------------------------------------------------------

def baseline_engine(commit: str, dest: Path) -> tuple[Path, Path] | str:
    """client_web/ and shaders/ of `commit` under `dest`, or why not."""
    try:
        tar = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", commit, "client_web", "shaders"],
                             capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        err = getattr(e, "stderr", b"") or b""
        return f"git archive {commit} failed ({err.decode(errors='replace').strip() or e}): no git history here?"
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        t.extractall(dest, filter="data")
    return dest / "client_web", dest / "shaders"


def this_engine(dest: Path) -> tuple[tuple[Path, Path], str]:
    """A copy of this tree's client_web/ and shaders/ under `dest` (others may edit them while the
    bench runs: every call then measures the same engine), and which commit it is."""
    for name in ("client_web", "shaders"):
        shutil.copytree(REPO / name, dest / name)
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "client_web", "shaders"],
                               capture_output=True, text=True, check=True).stdout.strip()
        version = head + (" + uncommitted changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        version = "no git history"
    return (dest / "client_web", dest / "shaders"), version


def run(files: Path, args: list[str], out: Path) -> dict:
    """One runner call (its progress on stderr, its own table dropped); its JSON result."""
    r = gpu_kernels.run_runner(files, [*args, "--out", str(out)], stdout=subprocess.DEVNULL)
    if r.returncode != 0:
        raise SystemExit(f"bench/gpu/gpu_kernels.mjs {' '.join(args)} failed (exit {r.returncode})")
    result = json.loads(out.read_text())
    for lay in result["layouts"]:
        if lay["errors"]:
            raise SystemExit(f"layout {lay['layout']}: WebGPU errors {lay['errors'][:3]}")
    return result


def report(main_result: dict, rows: list[dict], ratio: dict | str | None, opts: dict) -> str:
    a, bw = main_result["adapter"], main_result["bandwidth"]
    stamps = "timestamp-query" in a["features"]
    lines = [
        (f"machine: {machine()}; 1-min load average {main_result['loadAvgStart']:.2f} at start, "
         f"{main_result['loadAvgEnd']:.2f} at end of the table run"),
        (f"adapter: {a.get('vendor') or '?'} / {a.get('architecture') or '?'} / {a.get('description') or '?'}; "
         f"isFallbackAdapter {a.get('isFallbackAdapter')}; timestamp-query {'yes' if stamps else 'no'}; "
         f"Dawn (npm webgpu {main_result['webgpu']}), Node {main_result['node']}"),
        (f"engine: client_web + shaders of {main_result['engine']}; layout it picks on this adapter: "
         f"{main_result['chosenLayout']}"),
        (f"copy bandwidth: {bw['gbS']:.2f} GB/s ({bw['kernel']}, {bw['bytes'] / 2 ** 20:.0f} MiB, read + write, "
         f"{bw['method']})"),
        f"model: {main_result['model']}; pack {main_result['packBytes'] / 1e6:.1f} MB",
        (f"per cell: {opts['warmup']} warm-up + {opts['new']} timed greedy tokens (few: figures are rough); "
         f"per-kernel ms of {opts['profile_repeats']} profiled step(s) "
         f"({'GPU timestamps' if stamps else 'isolated kernels, wall clock'})"),
        BYTES_COUNTED,
        "time/bound = ms/token over bound ms (the ms MB/token take at the copy bandwidth); 1 = bandwidth-bound",
        "", cell_table(rows), "", "ms per kernel of one step:", "", kernel_table(rows), "",
    ]
    if isinstance(ratio, str):
        lines.append(f"no-regression ratio: skipped ({ratio})")
    elif ratio is not None:
        lines += [
            (f"no-regression ratio: this tree's chosen layout ({ratio['layout']}) vs. {ratio['baseline']} "
             f"(client_web + shaders before the two layouts), context {ratio['context']}, {ratio['warmup']} warm-up + "
             f"{ratio['new']} timed tokens per call, {len(ratio['head'])} interleaved rounds (this, baseline, ...), "
             "one runner process each"), "",
            format_table(["round", f"this ({ratio['layout']}) tok/s", f"{ratio['baseline']} tok/s"],
                         [[i + 1, h, b] for i, (h, b) in enumerate(zip(ratio["head"], ratio["base"]))]), "",
            (f"median: this {ratio['headMedian']:.3f} tok/s, {ratio['baseline']} {ratio['baseMedian']:.3f} tok/s; "
             f"ratio {ratio['ratio']:.3f} (target >= {ratio['target']}): {'MET' if ratio['ok'] else 'NOT MET'}; "
             f"same greedy tokens: {'yes' if ratio['sameTokens'] else 'NO'}"),
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default", help="'default' (SmolLM2), 'tiny' (tests/tiny_model.py) or a path")
    ap.add_argument("--ctx", default="256,1024,4096", help="context lengths of the table, comma-separated")
    ap.add_argument("--layouts", default="cpu,gpu", help="gemv layouts of the table")
    ap.add_argument("--new", type=int, default=2, help="timed tokens per cell")
    ap.add_argument("--warmup", type=int, default=1, help="untimed tokens per cell first")
    ap.add_argument("--profile-repeats", type=int, default=1, help="profiled steps per cell (per-kernel ms)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the no-regression ratio; 0 skips it")
    ap.add_argument("--ratio-ctx", type=int, default=256, help="context length of the ratio")
    ap.add_argument("--ratio-new", type=int, default=4, help="timed tokens per ratio call")
    ap.add_argument("--ratio-warmup", type=int, default=2, help="untimed tokens per ratio call")
    ap.add_argument("--baseline", default=BASELINE, help="commit whose client_web + shaders are 'today's figures'")
    ap.add_argument("--adapter", default="auto", help="the runner's --adapter: auto | system | swiftshader")
    ap.add_argument("--threads", type=int, default=2, help="torch threads for the anchor's prefill")
    ap.add_argument("--out", type=Path, default=None, help="JSON (default var/gpu-kernels/layouts-<model>.json)")
    args = ap.parse_args(argv)
    contexts = sorted({int(c) for c in args.ctx.split(",") if c.strip()})

    import torch
    torch.set_num_threads(args.threads)
    from hpi.anchor import Anchor
    from hpi.config import Settings
    lm = gpu_kernels.load(args.model, gpu_kernels.FILES / "tiny-model")
    anchor = Anchor(lm, **Settings().anchor_options())
    files = gpu_kernels.prepare(anchor, lm, sorted({*contexts, args.ratio_ctx}), gpu_kernels.FILES / anchor.model_key)

    with tempfile.TemporaryDirectory(prefix="hpi-layouts-") as tmp:
        tmp = Path(tmp)
        (client, shaders), version = this_engine(tmp / "this")
        log(f"engine: client_web + shaders of {version}, copied to {tmp / 'this'}")
        common = ["--adapter", args.adapter, "--client", str(client), "--shaders", str(shaders)]
        log(f"table: layouts {args.layouts}, contexts {contexts}")
        main_result = run(files, [*common, "--ctx", ",".join(map(str, contexts)), "--layouts", args.layouts,
                                  "--new", str(args.new), "--warmup", str(args.warmup),
                                  "--profile-repeats", str(args.profile_repeats)], tmp / "table.json")
        rows = cells(main_result)

        ratio: dict | str | None = None
        if args.rounds > 0:
            engine = baseline_engine(args.baseline, tmp / "baseline")
            if isinstance(engine, str):
                ratio = engine
            else:
                chosen = main_result["chosenLayout"]
                calls = {"this": [*common, "--layouts", chosen],
                         "baseline": ["--adapter", args.adapter, "--client", str(engine[0]), "--shaders", str(engine[1])]}
                each = ["--ctx", str(args.ratio_ctx), "--new", str(args.ratio_new), "--warmup",
                        str(args.ratio_warmup), "--profile-repeats", "0", "--probe-mb", "8"]
                tok_s: dict[str, list[float]] = {"this": [], "baseline": []}
                tokens: dict[str, list] = {"this": [], "baseline": []}
                for i in range(args.rounds):
                    for who, extra in calls.items():
                        log(f"ratio round {i + 1}/{args.rounds}: {who}")
                        c = run(files, [*each, *extra], tmp / f"{who}-{i}.json")["layouts"][0]["contexts"][str(args.ratio_ctx)]
                        tok_s[who].append(c["tokS"])
                        tokens[who].append(c["tokens"])
                ratio = {**regression(tok_s["this"], tok_s["baseline"]), "layout": chosen, "baseline": args.baseline,
                         "context": args.ratio_ctx, "new": args.ratio_new, "warmup": args.ratio_warmup,
                         "sameTokens": all(t == tokens["this"][0] for t in tokens["this"] + tokens["baseline"])}

    opts = {"new": args.new, "warmup": args.warmup, "profile_repeats": args.profile_repeats}
    text = report(main_result | {"engine": version}, rows, ratio, opts)
    print(text)
    out = args.out or gpu_kernels.FILES / f"layouts-{files.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": " ".join(["python -m bench.layouts", *(argv if argv is not None else sys.argv[1:])]),
                               "machine": machine(), "engine": version, "options": vars(args) | {"out": str(out)}, "table": main_result,
                               "cells": rows, "ratio": ratio, "text": text}, indent=1, default=str) + "\n")
    log(f"wrote {out}")


if __name__ == "__main__":
    main()
