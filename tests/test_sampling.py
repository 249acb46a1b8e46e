"""The token choice with every sampling option: its rules, and the page's copy (client_web/sampling.js)
against the anchor's (server/sampling.py) on the shared vectors and on random cases."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from hpi.answer_rules import cut, held
from hpi.protocol import sampling_choices
from hpi.sampling import Sampling, choose, nucleus

REPO = Path(__file__).resolve().parent.parent

# Runs the page's module over cases given on stdin; prints the chosen tokens.
NODE_CHOOSER = """
import { choose } from '%s';
let raw = '';
for await (const chunk of process.stdin) raw += chunk;
const out = JSON.parse(raw).map((c) => {
  let allowed = null;
  if (c.allowed) { allowed = new Array(c.logits.length).fill(false); c.allowed.forEach((i) => { allowed[i] = true; }); }
  return choose(c.logits, c.options, c.position, c.answer, allowed);
});
console.log(JSON.stringify(out));
""" % (REPO / "client_web" / "sampling.js").as_uri()


def page_choices(cases: list[dict]) -> list[int]:
    r = subprocess.run(["node", "--input-type=module", "-e", NODE_CHOOSER], input=json.dumps(cases),
                       capture_output=True, text=True, timeout=120, check=True)
    return json.loads(r.stdout)


def test_the_committed_vectors_are_what_the_generator_writes():
    assert sampling_choices.VECTORS.read_text() == sampling_choices.text(), \
        "run python -m hpi.protocol.sampling_choices"


def test_the_anchor_makes_the_vectors_choices():
    for c in json.loads(sampling_choices.VECTORS.read_text())["choices"]:
        allowed = None
        if c["allowed"] is not None:
            allowed = np.zeros(len(c["logits"]), bool)
            allowed[c["allowed"]] = True
        assert choose(np.array(c["logits"], np.float32), Sampling.of(**c["options"]), c["position"], c["answer"],
                      allowed) == c["token"]


node = pytest.mark.skipif(shutil.which("node") is None, reason="node (>= 20) is not on PATH")


@node
def test_the_page_makes_the_vectors_choices():
    cases = json.loads(sampling_choices.VECTORS.read_text())["choices"]
    assert page_choices(cases) == [c["token"] for c in cases]


@node
def test_the_page_agrees_with_the_anchor_on_model_sized_logits():
    """Vocabulary-sized float32 logits as a model makes them: the two float32 pipelines agree
    (they may differ only where exp/log round differently, which these cases never hit)."""
    rng = np.random.default_rng(7)
    cases, want = [], []
    for i in range(24):
        logits = (rng.standard_normal(4096) * 3).astype(np.float32)
        opts = {"temperature": float(rng.choice([0.0, 0.6, 1.0, 1.7])), "seed": int(rng.integers(0, 1 << 32)),
                "top_p": float(rng.choice([1.0, 0.9, 0.5, 0.05])), "top_k": int(rng.choice([0, 1, 40])),
                "presence_penalty": float(rng.choice([0.0, 0.8])), "frequency_penalty": float(rng.choice([0.0, -0.4])),
                "logit_bias": {str(int(t)): float(rng.uniform(-5, 5)) for t in rng.integers(0, 4096, 3)}}
        answer = rng.integers(0, 4096, 30).tolist()
        position = int(rng.integers(0, 1 << 20))
        cases.append({"logits": logits.tolist(), "options": opts, "answer": answer, "position": position,
                      "allowed": None})
        want.append(choose(logits, Sampling.of(**opts), position, answer))
    assert page_choices(cases) == want


def test_top_k_one_and_a_tiny_top_p_are_greedy():
    rng = np.random.default_rng(1)
    for p in range(50):
        logits = rng.standard_normal(64).astype(np.float32)
        best = int(np.argmax(logits))
        assert choose(logits, Sampling(1.5, 3, top_k=1), p) == best
        assert choose(logits, Sampling(1.5, 3, top_p=1e-6), p) == best


def test_top_p_keeps_the_shortest_prefix_reaching_the_mass():
    scaled = np.log(np.array([0.125, 0.5, 0.25, 0.125], np.float32))  # exact in float32
    assert nucleus(scaled, 0, 0.5).tolist() == [1]
    assert nucleus(scaled, 0, 0.75).tolist() == [1, 2]
    assert nucleus(scaled, 0, 0.8).tolist() == [1, 2, 0]  # ties: the lower id first
    assert nucleus(scaled, 2, 1.0).tolist() == [1, 2]


def test_penalties_and_bias_follow_openai():
    logits = np.array([1.0, 0.9, 0.0], np.float32)
    assert choose(logits, Sampling(presence_penalty=0.2), 0, [0]) == 1
    assert choose(logits, Sampling(presence_penalty=0.05), 0, [0]) == 0
    assert choose(logits, Sampling(frequency_penalty=0.04), 0, [0, 0, 0]) == 1  # 3 * 0.04 > 0.1
    assert choose(logits, Sampling(logit_bias=((2, 1.5),)), 0) == 2
    for p in range(20):  # a -100 bias bans a token even when sampling
        assert choose(np.array([5.0, 0.0], np.float32), Sampling(2.0, 1, logit_bias=((0, -100.0),)), p) == 1


def test_stop_texts_are_cut_and_held_back():
    assert cut("one two. three", ("two", ".")) == ("one ", True)
    assert cut("nothing here", ("stop",)) == ("nothing here", False)
    assert held("the end is ne", ("near", "ending")) == 2
    assert held("abc", ("x",)) == 0
    assert held("it was EN", ("END",)) == 2


def test_sampling_round_trips_through_json_and_older_transcripts():
    s = Sampling.of(0.8, 3, 0.9, 5, 0.1, 0.2, {"7": 1.0, "2": -3.0}, "STOP", {"type": "json_object"})
    assert Sampling.from_json(json.loads(json.dumps(s.to_json()))) == s
    assert s.logit_bias == ((2, -3.0), (7, 1.0)) and s.stop == ("STOP",)
    assert Sampling.from_json([0.5, 9]) == Sampling(0.5, 9)


@node
def test_the_page_takes_the_anchors_sampling_fields():
    from hpi.request_sampling import SamplingFields
    r = subprocess.run(["node", "--input-type=module", "-e",
                        f"import {{ SAMPLING_FIELDS }} from '{(REPO / 'client_web' / 'sampling.js').as_uri()}';"
                        "console.log(JSON.stringify(SAMPLING_FIELDS));"], capture_output=True, text=True, check=True)
    assert json.loads(r.stdout) == list(SamplingFields.model_fields)
