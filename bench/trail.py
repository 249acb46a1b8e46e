"""Memory and latency of trail state: 16 copy-on-write forks against 16 full copies of a session.

A SmolLM2 session is created from a long prompt (a repo doc in the chat template), writes
--before tokens, is checkpointed, and writes --after more. Then:

  forks        16 `SessionStore.fork`s at the checkpoint (the server's path, transcript write
               included), half with a forced first token, half with another sampling seed;
               each writes --own tokens, one verification pass per token;
  full copies  16 caches that copy the parent's KV up to the checkpoint (the way to fork
               without sharing), each writing the same tokens as its fork (checked equal);
  backtrack    --rounds times: the parent writes 8 tokens, then `SessionStore.backtrack`s
               to the checkpoint;
  pass cost    --rounds times, one verification pass on the parent, a fork and a full copy in
               turn (interleaved, so a change of the machine's load hits all three alike).

Memory is measured from tensor storage: the distinct storages (by data pointer) the caches
hold, so KV shared by several caches counts once; process RSS growth is reported beside it.

    python -m bench.trail                       # writes docs/results/trail.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent

from hpi.protocol import frames
from hpi import completions
from hpi.anchor import Anchor, Caches
from hpi.config import Settings
from hpi.models import load_model
from hpi.sessions import Session, SessionStore
from hpi.trail import TrailCache
from hpi.verify import verify

ALTERNATIVES = [" However", " Instead", " First", " Actually", " The", " In", " No", " Yes"]


def machine(load_start: float) -> dict:
    cpu = platform.processor() or "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "load_avg_start": load_start, "load_avg_end": os.getloadavg()[0]}


def rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def storages(caches: list[Caches]) -> dict[int, int]:
    out = {}
    for c in caches:
        out |= c.anchor.storages()
    return out


def mib(n: float) -> float:
    return round(n / 2**20, 2)


def prompt_messages(lm, tokens: int) -> list[dict]:
    """A user message asking about a repo doc, cut so the prompt is about `tokens` tokens."""
    text = (REPO / "docs" / "codec.md").read_text()
    ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"][:tokens]
    return [{"role": "user", "content": "Summarise this design note:\n\n" + lm.tokenizer.decode(ids)}]


def write(store: SessionStore, s: Session, n: int) -> None:
    """The session writes `n` tokens, one verification pass each (no drafts)."""
    for _ in range(n):
        store.draft(s, s.n_tokens, s.chains[-1], [])


def timed(f) -> float:
    t0 = time.perf_counter()
    f()
    return (time.perf_counter() - t0) * 1e3


def copy_of(fork: Caches, position: int, config) -> Caches:
    """Caches over the fork's first `position` ids with a private copy of the KV it shares (the
    positions before `position`): a fork without sharing. One concatenation copies each layer."""
    cache = TrailCache(config=config)
    for mine, theirs in zip(cache.layers, fork.anchor.layers):
        keys = torch.cat([r.keys for r in theirs.runs], dim=-2)
        values = torch.cat([r.values for r in theirs.runs], dim=-2)
        mine.lazy_initialization(keys, values)
        mine.keys, mine.values = keys, values
    ids = fork.ids[:position]
    return Caches(ids=ids, anchor=cache, pending=ids[-1])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt-tokens", type=int, default=1100, help="tokens of the doc in the prompt")
    ap.add_argument("--before", type=int, default=16, help="tokens the parent writes before the checkpoint")
    ap.add_argument("--after", type=int, default=16, help="tokens the parent writes after it")
    ap.add_argument("--forks", type=int, default=16)
    ap.add_argument("--own", type=int, default=32, help="tokens each fork writes")
    ap.add_argument("--rounds", type=int, default=10, help="backtracks measured")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: on a shared 2-core machine more threads wait on each other)")
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "results" / "trail.json")
    args = ap.parse_args(argv)
    command = "python -m bench.trail" + ("" if argv is None and len(sys.argv) == 1 else " " + " ".join(sys.argv[1:]))

    load_start = os.getloadavg()[0]
    torch.set_num_threads(args.threads)
    lm = load_model("default", device="cpu")
    anchor = Anchor(lm, **Settings().anchor_options())
    _ = anchor.basis  # the model pack (cached), so session creation times a prefill and a hologram only
    # one client holds the parent and every fork: lift the per-client share of live sessions
    store = SessionStore(anchor, Settings(sessions_dir=tempfile.mkdtemp(prefix="hpi-trail-"), client_share=1))
    per_token = store.kv_bytes_per_token

    t0 = time.perf_counter()
    parent = store.create(prompt_messages(lm, args.prompt_tokens))
    create_ms = (time.perf_counter() - t0) * 1e3
    prompt_tokens = parent.n_tokens
    store.ready(parent, parent.n_tokens, frames.GENESIS, (0.0, 0))
    write(store, parent, args.before)
    checkpoint = store.checkpoint(parent, "c")
    write(store, parent, args.after)
    print(f"prompt {prompt_tokens} tokens, created in {create_ms:.0f} ms; checkpoint at {checkpoint.position}",
          file=sys.stderr)

    # 16 forks through the store: the server's path.
    alternatives = [lm.tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in ALTERNATIVES]
    rss0 = rss()
    forks, fork_ms = [], {"token": [], "seed": []}
    for i in range(args.forks):
        kind = "token" if i % 2 == 0 else "seed"
        options = {"token": alternatives[i // 2 % len(alternatives)]} if kind == "token" else \
            {"temperature": 1.0, "seed": 1000 + i}
        t0 = time.perf_counter()
        f = store.fork(parent, "c", **options)
        fork_ms[kind].append((time.perf_counter() - t0) * 1e3)
        store.ready(f, f.n_tokens, f.chains[-1], f.sampling)
        own = args.own - (kind == "token")  # a forced token is the fork's first own token
        write(store, f, own)
        forks.append(f)
        print(f"fork {i}: {kind}, {fork_ms[kind][-1]:.1f} ms", file=sys.stderr)
    rss_forks = rss() - rss0
    parent_bytes = sum(storages([parent.caches]).values())
    shared_bytes = sum(storages([parent.caches] + [f.caches for f in forks]).values()) - parent_bytes
    forks_alone = sum(storages([f.caches for f in forks]).values())
    fork_own_tokens = sum(f.caches.anchor.get_seq_length() - f.caches.anchor.frozen_tokens for f in forks)

    # Two forks checked against anchor-only decoding of (prefix + their tokens).
    for f in forks[:2]:
        own = f.caches.ids[checkpoint.position:]
        forced = own[:1] if f.sampling == (0.0, 0) else []
        truth = forced + list(completions.decode(lm, f.caches.ids[:checkpoint.position] + forced,
                                                 len(own) - len(forced), *f.sampling))
        assert own[:len(truth)] == truth, "a fork's tokens are not the anchor's"  # decode stops at an end token

    # 16 full copies writing the same tokens.
    rss1 = rss()
    copies, copy_ms = [], []
    for f in forks:
        t0 = time.perf_counter()
        c = copy_of(f.caches, checkpoint.position, lm.config)
        copy_ms.append((time.perf_counter() - t0) * 1e3)
        forced = f.caches.ids[checkpoint.position:checkpoint.position + 1] if f.sampling == (0.0, 0) else []
        if forced:
            anchor.prefill(c, forced)
        while len(c.ids) < len(f.caches.ids):
            verify(lm, c, [], *f.sampling)
        assert c.ids == f.caches.ids, "a full copy wrote other tokens than its fork"
        copies.append(c)
    rss_copies = rss() - rss1
    copies_bytes = sum(storages(copies).values())

    # Backtracks of the parent.
    back_ms, rewind_ms = [], []
    for _ in range(args.rounds):
        write(store, parent, 8)
        back_ms.append(timed(lambda: store.backtrack(parent, "c")))
    for _ in range(args.rounds):  # the cache operation alone, without the transcript write
        write(store, parent, 8)
        rewind_ms.append(timed(lambda: anchor.rewind(parent.caches, checkpoint.position)))
        store.backtrack(parent, "c")  # the session state to match

    # One pass each on the parent, a fork and a full copy, in turn (caches only: no transcript).
    pass_ms = {"parent": [], "fork": [], "copy": []}
    for i in range(args.rounds):
        f, c = forks[i % len(forks)], copies[i % len(forks)]
        for kind, caches, sampling in (("parent", parent.caches, parent.sampling), ("fork", f.caches, f.sampling),
                                       ("copy", c, f.sampling)):
            pass_ms[kind].append(timed(lambda: verify(lm, caches, [], *sampling)))

    med = statistics.median
    result = {
        "machine": machine(load_start), "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command, "model": lm.model_id, "kv_bytes_per_token": per_token,
        "prompt_tokens": prompt_tokens, "checkpoint_position": checkpoint.position,
        "parent_tokens_at_fork": checkpoint.position + args.after, "forks": args.forks, "own_tokens_per_fork": args.own,
        "memory": {
            "parent_bytes": parent_bytes,
            "forks_bytes_beyond_parent": shared_bytes,
            "forks_own_positions": fork_own_tokens,
            "forks_own_positions_bytes": fork_own_tokens * per_token,
            "forks_alone_bytes": forks_alone,
            "full_copies_bytes": copies_bytes,
            "ratio_copies_to_forks": round(copies_bytes / shared_bytes, 1),
            "rss_growth_forks": rss_forks, "rss_growth_copies": rss_copies,
            "store_kv_bytes": store.kv_bytes,
        },
        "latency_ms": {
            "create_session": round(create_ms, 1),
            "fork_forced_token_median": round(med(fork_ms["token"]), 2),
            "fork_seed_median": round(med(fork_ms["seed"]), 2),
            "full_copy_median": round(med(copy_ms), 2),
            "backtrack_median": round(med(back_ms), 2),
            "rewind_cache_only_median": round(med(rewind_ms), 3),
            "pass_parent_median": round(med(pass_ms["parent"]), 1),
            "pass_fork_median": round(med(pass_ms["fork"]), 1),
            "pass_full_copy_median": round(med(pass_ms["copy"]), 1),
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(table(result))


def table(r: dict) -> str:
    m, mem, lat = r["machine"], r["memory"], r["latency_ms"]
    n = r["forks"]
    return "\n".join([
        f"- machine: {m['cpu']}, {m['cores']} cores shared with other work (load average {m['load_avg_start']:.1f} "
        f"at the start, {m['load_avg_end']:.1f} at the end), "
        f"torch {m['torch']} ({m['torch_threads']} threads), Python {m['python']}",
        f"- command: `{r['command']}` ({r['date']})",
        f"- model: {r['model']}, {r['kv_bytes_per_token']} KV bytes per position; prompt {r['prompt_tokens']} tokens, "
        f"checkpoint at {r['checkpoint_position']}, parent at {r['parent_tokens_at_fork']} when forked, "
        f"{n} forks of {r['own_tokens_per_fork']} tokens each",
        "",
        "| memory (tensor storage) | MiB |",
        "|---|---:|",
        f"| parent session | {mib(mem['parent_bytes'])} |",
        f"| {n} forks, beyond the parent | {mib(mem['forks_bytes_beyond_parent'])} |",
        f"| their own positions x KV bytes per position ({mem['forks_own_positions']} positions) "
        f"| {mib(mem['forks_own_positions_bytes'])} |",
        f"| {n} full copies | {mib(mem['full_copies_bytes'])} |",
        f"| full copies / forks | {mem['ratio_copies_to_forks']}x |",
        f"| process RSS growth: forks / full copies | {mib(mem['rss_growth_forks'])} / {mib(mem['rss_growth_copies'])} |",
        "",
        "| latency (median) | ms |",
        "|---|---:|",
        f"| fork with a forced token (store: share, 2-token prefill, transcript) | {lat['fork_forced_token_median']} |",
        f"| fork with another seed (store: share, transcript) | {lat['fork_seed_median']} |",
        f"| full copy of the KV up to the checkpoint | {lat['full_copy_median']} |",
        f"| backtrack (store: crop, transcript) | {lat['backtrack_median']} |",
        f"| backtrack, the cache crop alone | {lat['rewind_cache_only_median']} |",
        f"| one verification pass: parent / fork / full copy | {lat['pass_parent_median']} / "
        f"{lat['pass_fork_median']} / {lat['pass_full_copy_median']} |",
    ])


if __name__ == "__main__":
    main()
