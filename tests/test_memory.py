"""The memory's mechanisms: SO(d) embeddings, Cl(3,1) basis and Grace, episodic cache,
holographic binding, retrieval paths, dreaming and forgetting, persistence."""

import numpy as np
import pytest

from hpi.protocol.holo import load_hologram, save_hologram
from hpi.memory import clifford, persist, so4
from hpi.memory.dreaming import dream
from hpi.memory.episodic import Episodic
from hpi.memory.store import PATHS, Config, Mechanisms, Memory, default_satellites


@pytest.mark.parametrize("dim", so4.DIMS)
def test_embeddings_are_deterministic_rotations(dim):
    e = so4.embeddings(50, dim, seed=7)
    assert e.shape == (50, dim, dim)
    np.testing.assert_allclose(np.linalg.det(e), 1.0, atol=1e-9)
    np.testing.assert_allclose(e @ e.transpose(0, 2, 1), np.broadcast_to(np.eye(dim), e.shape), atol=1e-9)
    assert np.array_equal(e, so4.embeddings(50, dim, seed=7))
    assert not np.allclose(e, so4.embeddings(50, dim, seed=8))


def test_embeddings_refuse_other_sizes():
    with pytest.raises(ValueError, match="matrix size"):
        so4.embeddings(10, 5, 0)


def test_context_product_is_ordered_and_unbinds_with_the_transpose():
    e = so4.embeddings(20, 4, 0)
    ids = np.array([[1, 2, 3], [3, 2, 1]])
    c = so4.contexts(e, ids)
    np.testing.assert_allclose(c[0], e[1] @ e[2] @ e[3])
    assert not np.allclose(c[0], c[1])  # order matters
    np.testing.assert_allclose(np.linalg.det(c), 1.0)
    np.testing.assert_allclose(so4.unbind(c, so4.bind(c, e[[5, 6]])), e[[5, 6]], atol=1e-12)
    ctx, nxt = so4.windows(np.arange(6), 3)
    assert ctx.tolist() == [[0, 1, 2], [1, 2, 3], [2, 3, 4]] and nxt.tolist() == [3, 4, 5]


def test_clifford_basis_generators_and_round_trip():
    g = clifford.GENERATORS
    for i, sign in enumerate([1, 1, 1, -1]):
        np.testing.assert_allclose(g[i] @ g[i], sign * np.eye(4))
        for j in range(i):
            np.testing.assert_allclose(g[i] @ g[j], -g[j] @ g[i])
    assert np.bincount(clifford.GRADES).tolist() == [1, 4, 6, 4, 1]
    m = np.random.default_rng(0).standard_normal((3, 8, 8))
    c = clifford.coefficients(m)
    assert c.shape == (3, 4, 16)
    np.testing.assert_allclose(clifford.from_coefficients(c), m, atol=1e-12)
    # The identity is pure scalar: witness (1, 0), stability 1.
    ci = clifford.coefficients(np.eye(4)[None])
    np.testing.assert_allclose(ci[0, 0], np.eye(16)[0], atol=1e-12)
    np.testing.assert_allclose(clifford.witness(ci), [[1.0, 0.0]])
    assert clifford.stability(ci)[0] == pytest.approx(1.0)


def test_grace_scales_each_grade_by_phi():
    phi = clifford.PHI
    scaled = clifford.grace(np.ones(16))
    want = {0: 1, 1: phi ** -1, 2: phi ** -2, 3: phi ** -3, 4: phi ** -1}
    for blade, grade in enumerate(clifford.GRADES):
        assert scaled[blade] == pytest.approx(want[grade])


def test_episodic_counts_are_exact_and_survive_hash_collisions(monkeypatch):
    ep = Episodic(2)
    ep.add(np.array([[1, 2], [1, 2], [3, 4]]), np.array([5, 5, 6]))
    ep.add(np.array([[1, 2]]), np.array([7]))
    q, t, c = ep.lookup(np.array([[1, 2], [9, 9], [3, 4]]))
    assert sorted(zip(q.tolist(), t.tolist(), c.tolist())) == [(0, 5, 2), (0, 7, 1), (2, 6, 1)]
    # Every context hashing alike: lookups stay exact because hits are checked against the ids.
    from hpi.memory import episodic
    monkeypatch.setattr(episodic, "hash_rows", lambda rows: np.zeros(len(rows), np.uint64))
    ep = Episodic(2)
    ep.add(np.array([[1, 2], [3, 4], [1, 2]]), np.array([5, 5, 5]))
    q, t, c = ep.lookup(np.array([[3, 4], [1, 2]]))
    assert sorted(zip(q.tolist(), t.tolist(), c.tolist())) == [(0, 5, 1), (1, 5, 2)]


def make_memory(vocab=1000, context=3, dim=4, n=3000, seed=0, **kw):
    mem = Memory(Config(vocab=vocab, context=context, dim=dim, planned_patterns=n, **kw))
    seq = np.random.default_rng(seed).integers(0, vocab, n + context)
    mem.learn_sequence(seq)
    ctx, nxt = so4.windows(seq, context)
    return mem, ctx, nxt


def test_stored_contexts_are_recalled_exactly_by_the_episodic_path():
    mem, ctx, nxt = make_memory()
    pred = mem.predict(ctx, k=3, targets=nxt)
    assert (pred.tokens[:, 0] == nxt).all()
    assert (pred.path == PATHS.index("episodic")).all()
    assert (pred.probs[:, 0] > pred.probs[:, 1]).all()
    np.testing.assert_allclose(pred.target_prob, pred.probs[:, 0])


@pytest.mark.parametrize("dim", so4.DIMS)
def test_one_binding_per_basin_unbinds_exactly(dim):
    # Many more satellites than patterns: nearly every basin holds one binding.
    mem, ctx, nxt = make_memory(dim=dim, n=200, satellites=1 << 16)
    pred = mem.predict(ctx, targets=nxt, use=Mechanisms(episodic=False, prototypes=False))
    assert (pred.path == PATHS.index("holographic")).all()
    assert (pred.tokens[:, 0] == nxt).mean() > 0.97
    wrong = (nxt + 1) % 1000  # every token keeps some probability, even a wrong one
    assert (mem.predict(ctx, targets=wrong, use=Mechanisms(episodic=False, prototypes=False)).target_prob > 0).all()


def test_crosstalk_grows_with_load_and_larger_matrices_hold_more():
    recall = {}
    for dim in (4, 16):
        mem, ctx, nxt = make_memory(dim=dim, n=2000, satellites=256)  # ~8 bindings per basin
        pred = mem.predict(ctx, use=Mechanisms(episodic=False, prototypes=False))
        recall[dim] = (pred.tokens[:, 0] == nxt).mean()
    assert recall[4] < 0.3 < 0.8 < recall[16]


def test_default_satellites_follow_the_capacity():
    assert default_satellites(4, 1000) == 1024
    assert default_satellites(16, 1000) == 128
    assert Config(vocab=10).satellites == default_satellites(4, 1 << 16)


def test_unknown_contexts_fall_back_and_say_which_path():
    mem, ctx, nxt = make_memory()
    novel = np.array([[0, 0, 0], [1, 1, 1]])
    assert set(mem.predict(novel).path.tolist()) <= {PATHS.index("holographic"), PATHS.index("prior")}
    only_prior = mem.predict(novel, k=2, use=Mechanisms(False, False, False))
    assert (only_prior.path == PATHS.index("prior")).all()
    prior, order = mem.prior()
    assert only_prior.tokens[0].tolist() == order[:2].tolist()
    np.testing.assert_allclose(only_prior.probs[0], prior[order[:2]])


def test_out_of_range_ids_are_refused():
    mem, _, _ = make_memory(n=10)
    with pytest.raises(ValueError, match="token ids"):
        mem.learn(np.array([[1, 2, 1000]]), np.array([1]))
    with pytest.raises(ValueError, match="token ids"):
        mem.predict(np.array([[-1, 2, 3]]))


def test_dreaming_forms_prototypes_that_answer_unseen_contexts():
    mem, ctx, nxt = make_memory(n=3000)
    report = dream(mem)
    assert report.prototypes > 0 and report.episodes == 3000 and report.forgotten == 0
    assert mem.prototypes.offsets[-1] == len(mem.prototypes.targets)
    again = dream(mem)
    assert again.prototypes == report.prototypes  # rebuilt from the same episodes: the same
    pred = mem.predict(ctx, use=Mechanisms(episodic=False))
    assert (pred.path == PATHS.index("prototype")).mean() > 0.9


def test_forgetting_keeps_the_dominant_target_and_unlearns_the_rest():
    mem = Memory(Config(vocab=50, context=2, satellites=64))
    ctx = np.array([[1, 2]] * 9 + [[3, 4]])
    tgt = np.array([5] * 8 + [6] + [7])
    mem.learn(ctx, tgt)
    before = mem.satellites.copy()
    report = dream(mem, forget=40.0)  # survival of the minority target: φ^(-40·7/8) ≈ 5e-8
    assert report.forgotten == 1
    q, t, c = mem.episodic.lookup(np.array([[1, 2], [3, 4]]))
    assert sorted(zip(q.tolist(), t.tolist(), c.tolist())) == [(0, 5, 8), (1, 7, 1)]
    assert mem.unigram[6] == 0 and mem.load.sum() == 9
    fresh = Memory(Config(vocab=50, context=2, satellites=64))
    fresh.learn(np.array([[1, 2]] * 8 + [[3, 4]]), np.array([5] * 8 + [7]))
    np.testing.assert_allclose(mem.satellites, fresh.satellites, atol=1e-5)
    assert not np.allclose(before, mem.satellites)


def test_generation_follows_a_learned_sequence():
    mem = Memory(Config(vocab=100, context=2, satellites=256))
    seq = np.array([10, 11, 12, 13, 14, 15, 16, 17, 18, 19])
    mem.learn_sequence(seq)
    out, paths = mem.generate([10, 11], 8)
    assert out == seq[2:].tolist() and set(paths) == {"episodic"}
    sampled, _ = mem.generate([10, 11], 8, sample=True, seed=3)
    assert sampled == mem.generate([10, 11], 8, sample=True, seed=3)[0]


def test_stats_report_sizes_stability_and_coverage():
    mem, ctx, nxt = make_memory(n=1000)
    s = mem.stats()
    assert s["patterns"] == s["episodes"] == s["contexts"] == 1000
    assert 0 < s["coverage"] <= 1 and 0 <= s["stability"] <= 1
    assert 1 <= s["perplexity_on_stored"] < 3  # Witten-Bell gives a single observation λ = 1/2


def test_memory_round_trips_through_holo_and_answers_the_same():
    mem, ctx, nxt = make_memory(n=2000)
    dream(mem)
    novel = np.random.default_rng(5).integers(0, 1000, (200, 3))
    data = save_hologram(persist.to_holo(mem, "m", owner="o" * 32))
    stored = persist.from_holo(load_hologram(data))
    back = stored.mem
    assert (stored.owner, stored.name) == ("o" * 32, "m")
    assert back.config == mem.config and back.patterns == mem.patterns
    for contexts in (ctx, novel):
        for use in (Mechanisms(), Mechanisms(episodic=False), Mechanisms(episodic=False, prototypes=False)):
            a, b = mem.predict(contexts, k=3, use=use), back.predict(contexts, k=3, use=use)
            assert np.array_equal(a.tokens, b.tokens) and np.array_equal(a.path, b.path)
            np.testing.assert_allclose(a.probs, b.probs, rtol=1e-6)


def test_inconsistent_memory_files_are_refused():
    mem, _, _ = make_memory(n=100)
    holo = persist.to_holo(mem, "m")
    holo.tensors["episodic.targets"] = holo.tensors["episodic.targets"].copy()
    holo.tensors["episodic.targets"][0] = 10 ** 6
    with pytest.raises(persist.CorruptMemory, match="out of range"):
        persist.from_holo(load_hologram(save_hologram(holo)))
    holo = persist.to_holo(mem, "m")
    del holo.tensors["satellites"]
    with pytest.raises(persist.CorruptMemory, match="satellites"):
        persist.from_holo(load_hologram(save_hologram(holo)))


def test_replaying_learns_onto_a_snapshot_reproduces_the_memory_bit_for_bit():
    rng = np.random.default_rng(3)
    seqs = [rng.integers(0, 1000, int(rng.integers(4, 40))) for _ in range(60)]
    mem = Memory(Config(vocab=1000, context=3, dim=8, satellites=64))
    for s in seqs[:30]:
        mem.learn_sequence(s)
    dream(mem)
    copy = persist.from_holo(load_hologram(save_hologram(persist.to_holo(mem, "m")))).mem
    for i, s in enumerate(seqs[30:]):
        mem.learn_sequence(s)
        copy.learn_sequence(s)
        if i % 7 == 0:  # a lookup merges the pending log: here in one of the two only
            mem.predict(s[None, :3])
    assert np.array_equal(mem.satellites, copy.satellites) and np.array_equal(mem.load, copy.load)
    assert np.array_equal(mem.unigram, copy.unigram) and mem.patterns == copy.patterns
    a, b = mem.episodic, copy.episodic
    a.compact(), b.compact()
    for x, y in ((a.contexts, b.contexts), (a.targets, b.targets), (a.counts, b.counts)):
        assert np.array_equal(x, y)


def test_dreaming_with_forgetting_on_an_empty_memory():
    mem = Memory(Config(vocab=50, context=2, satellites=64))
    report = dream(mem, forget=1.0)  # used to fail: IndexError in the per-context maxima
    assert (report.episodes, report.prototypes, report.forgotten) == (0, 0, 0)


def test_a_memory_owns_its_embedding_tables():
    import gc
    import weakref
    mem = Memory(Config(vocab=100, dim=4, satellites=16))
    tables = weakref.ref(mem.emb), weakref.ref(mem._emb_flat)
    del mem
    gc.collect()
    assert tables[0]() is None and tables[1]() is None  # nothing outlives the memory
