"""The batched forward: concurrent sessions verified in one forward confirm exactly their
anchor-only answers, rows give the same bits in any batch, and the serving metrics are exposed."""

import threading

import pytest
import torch

from hpi import completions
from hpi.anchor import Caches
from hpi.answer_rules import AnswerRules
from hpi.engine import Seq, check_invariance
from hpi.trail import TrailCache
from hpi.verify import verify
from hpi.sampling import Sampling

SESSIONS = 8


def spy(tiny, monkeypatch) -> list[int]:
    """From now on the tiny model's scheduler waits long enough for every thread's pass; the
    number of sequences in each forward it runs."""
    sched = tiny.scheduler
    seen = []
    forward = sched.engine.forward

    def counted(seqs):
        seen.append(len(seqs))
        return forward(seqs)

    monkeypatch.setattr(sched.engine, "forward", counted)
    monkeypatch.setattr(sched, "wait_s", 0.5)
    return seen


@pytest.mark.parametrize("temperature,seed", [(0.0, 0), (1.0, 5)])
def test_sessions_verified_in_one_forward_confirm_their_anchor_only_answers(tiny, tiny_anchor, monkeypatch,
                                                                            temperature, seed):
    prompts = [tiny.chat_ids([{"role": "user", "content": f"Question {i}: what does the anchor keep?"}])
               for i in range(SESSIONS)]
    truths = [list(completions.decode(tiny, p, 14, Sampling(temperature, seed))) for p in prompts]
    caches = [Caches() for _ in prompts]
    for c, p in zip(caches, prompts):
        tiny_anchor.prefill(c, p)
    confirmed = [[] for _ in prompts]
    barrier = threading.Barrier(SESSIONS)
    errors = []

    def reconcile(i: int) -> None:
        try:
            while len(confirmed[i]) < len(truths[i]):
                at = len(confirmed[i])
                drafts = truths[i][at:at + 5]
                if i % 2 and len(drafts) > 2:  # every other session drafts a wrong token
                    drafts[2] = (drafts[2] + 1) % tiny.config.vocab_size
                if not at:
                    barrier.wait(timeout=30)  # the first passes of all sessions arrive together
                v = verify(tiny, caches[i], drafts, AnswerRules(tiny, Sampling(temperature, seed)), len(prompts[i]))
                confirmed[i] += drafts[:v.accepted] + [v.token]
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)
            barrier.abort()

    spied = spy(tiny, monkeypatch)
    threads = [threading.Thread(target=reconcile, args=(i,)) for i in range(SESSIONS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert [c[:len(t)] for c, t in zip(confirmed, truths)] == truths
    assert spied and max(spied) == SESSIONS  # the first passes of all sessions went through one forward


def test_a_row_gets_the_same_logits_alone_and_in_a_batch(tiny):
    sched = tiny.scheduler
    assert check_invariance(sched.engine)
    prompt = tiny.chat_ids([{"role": "user", "content": "Rows alone and together"}])
    alone = TrailCache(config=tiny.config)
    sched.run([Seq(alone, prompt, generated=False, all_logits=False)])
    (want,) = sched.run([Seq(alone, [5, 6, 7], generated=True, all_logits=True)])
    together = TrailCache(config=tiny.config)
    others = [TrailCache(config=tiny.config) for _ in range(3)]
    got = sched.engine.forward([Seq(together, prompt, False, False)] +
                               [Seq(o, list(range(1, 40 + 7 * k)), False, True) for k, o in enumerate(others)])
    got = sched.engine.forward([Seq(o, [9], True, True) for o in others] + [Seq(together, [5, 6, 7], True, True)])
    assert torch.equal(got[-1], want)


def test_serving_metrics_are_exposed(client, tiny):
    client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
    text = client.get("/metrics").text
    for name in ("hpi_batch_sequences", "hpi_batch_rows", "hpi_queue_wait_seconds", "hpi_accepted_per_pass",
                 "hpi_draft_position_accepted"):
        assert f"# TYPE {name} histogram" in text and f'{name}_bucket{{le="+Inf"}}' in text
    for name in ("hpi_prefill_tokens_total", "hpi_verification_passes_total", "hpi_kv_bytes"):
        assert f"{name} " in text
    rows = float(next(line.split()[1] for line in text.splitlines() if line.startswith("hpi_batch_rows_count")))
    assert rows >= 3
