"""Sessions (edgekv.session): several sequences over one Model's weights, and Model.step, one pass
over the weights for several of them.

Tolerance: a sequence's logits do not depend on other sequences except through float summation
order in the batched matmuls; on this build's kernels a row's dot products do not depend on the
other rows at all, so the tests below hold logits to STEP_ATOL (relative to the logits' scale) and
greedy tokens exactly.
"""

from __future__ import annotations

import numpy as np
import pytest

import edgekv
from edgekv.errors import ContextOverflowError, ModelClosedError
from edgekv.kv_policy import CallablePolicy, parse_policy

from conftest import THREADS

# |step logits - alone logits| <= STEP_ATOL * max|alone logits| (docs/architecture.md)
STEP_ATOL = 1e-5

PROMPTS = ["The capital of France is", "def add(a, b):\n    return", "Once upon a time, in a small village"]


@pytest.fixture(scope="module")
def smol(smollm2_path):
    m = edgekv.Model(smollm2_path, threads=THREADS, ctx=256)
    yield m
    m.close()


def _close(a: np.ndarray, b: np.ndarray) -> bool:
    return float(np.abs(a - b).max()) <= STEP_ATOL * float(np.abs(b).max())


def _greedy_alone(model, prompt_ids, n_steps, kv=None):
    """Reference: one session on its own, eval by eval: (logits of each step, greedy tokens)."""
    s = model.new_session(kv=kv)
    try:
        logits = [s.eval(prompt_ids)]
        toks = []
        for _ in range(n_steps):
            toks.append(int(logits[-1].argmax()))
            logits.append(s.eval([toks[-1]]))
        return logits, toks, s.kv_bits()
    finally:
        s.close()


def test_two_sessions_interleaved_match_each_alone(smol):
    a_ids, b_ids = smol.tokenize(PROMPTS[0]), smol.tokenize(PROMPTS[1])
    ref_a, toks_a, _ = _greedy_alone(smol, a_ids, 6)
    ref_b, toks_b, _ = _greedy_alone(smol, b_ids, 6)
    sa, sb = smol.new_session(), smol.new_session()
    got_a, got_b = [sa.eval(a_ids)], [sb.eval(b_ids)]
    for i in range(6):  # alternate calls: each session's cache is its own, the scratch is shared
        got_a.append(sa.eval([toks_a[i]]))
        got_b.append(sb.eval([toks_b[i]]))
    # the same calls on the same sequence state: bit-identical, whatever ran in between
    for x, y in zip(got_a + got_b, ref_a + ref_b):
        assert np.array_equal(x, y)
    assert sa.tokens == a_ids + toks_a and sb.tokens == b_ids + toks_b
    sa.close()
    sb.close()


def test_default_session_is_untouched_by_other_sessions(smol):
    ids = smol.tokenize(PROMPTS[0])
    want = smol.logits(ids)[-1]
    s = smol.new_session()
    s.eval(smol.tokenize(PROMPTS[2]))
    assert smol.n_past == len(ids) and s.n_past == len(smol.tokenize(PROMPTS[2]))
    smol.session.truncate(len(ids) - 1)
    assert np.array_equal(smol.session.eval(ids[-1:]), want)
    s.close()


def _step_vs_alone(model, kvs, n_steps=16):
    """Session 0 prefills its prompt while 1 and 2 decode, then all three decode n_steps in
    lockstep through Model.step; against each session run alone."""
    ids = [model.tokenize(p) for p in PROMPTS]
    refs = [_greedy_alone(model, ids[i], n_steps + (0 if i == 0 else 1), kv=kvs[i]) for i in range(3)]
    ss = [model.new_session(kv=kv) for kv in kvs]
    try:
        first = [ss[1].eval(ids[1]), ss[2].eval(ids[2])]
        # one step: a prompt chunk of 0 beside one decode token each of 1 and 2
        out = model.step(ss, [ids[0], [refs[1][1][0]], [refs[2][1][0]]])
        got = [[out[0]], [first[0], out[1]], [first[1], out[2]]]
        toks = [[], [refs[1][1][0]], [refs[2][1][0]]]
        for _ in range(n_steps):
            nxt = [int(g[-1].argmax()) for g in got]
            out = model.step(ss, [[t] for t in nxt])
            for i in range(3):
                toks[i].append(nxt[i])
                got[i].append(out[i])
        for i in range(3):
            ref_logits, ref_toks, ref_bits = refs[i]
            assert toks[i] == ref_toks[:len(toks[i])], f"session {i}: greedy tokens differ from running alone"
            for j, (x, y) in enumerate(zip(got[i], ref_logits)):
                assert _close(x, y), f"session {i} step {j}: max |diff| {np.abs(x - y).max():.3g}"
            k, v = ss[i].kv_bits()
            assert ss[i].tokens == ids[i] + toks[i]
            assert np.array_equal(k, ref_bits[0][:k.size]) and np.array_equal(v, ref_bits[1][:v.size])
        return ss
    finally:
        for s in ss:
            s.close()


def test_step_mixed_prefill_and_decode_matches_sequential(smol):
    _step_vs_alone(smol, [None, None, None])


def test_step_sessions_with_different_kv_policies(smol):
    # each sequence attends over its own store at its own precisions; a window keeps recent tokens at 16 bits
    _step_vs_alone(smol, ["int4", parse_policy("k4v2", window=4), "fp16"])


def test_step_with_a_feature_reading_policy(smol):
    # a policy that reads token features: its prompt chunk runs on its own, its decode steps in the batch
    static = parse_policy("int4")
    feat = CallablePolicy(lambda f: static.decide(f), needs_features=True, name="int4+features")
    _step_vs_alone(smol, [feat, "int8", feat], n_steps=4)


def test_step_on_tiny_models(tiny_arch, open_model):
    arch, path = tiny_arch
    m = open_model(path, ctx=64, n_batch=8)  # prompt chunks longer than n_batch go in several passes
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, m.vocab_size, n).tolist() for n in (11, 3, 5)]
    alone = []
    for p in prompts:
        s = m.new_session()
        alone.append([s.eval(p), s.eval([7]), s.eval([9])])
        s.close()
    ss = [m.new_session() for _ in prompts]
    o1 = m.step(ss, prompts)
    o2 = m.step(ss, [[7]] * 3)
    o3 = m.step(ss, [[9]] * 3)
    for i in range(3):
        for x, y in zip((o1[i], o2[i], o3[i]), alone[i]):
            assert _close(x, y), f"{arch} session {i}: max |diff| {np.abs(x - y).max():.3g}"
    for s in ss:
        s.close()


def test_close_frees_kv_and_model_close_closes_sessions(smollm2_path):
    m = edgekv.Model(smollm2_path, threads=THREADS, ctx=128)
    s, t = m.new_session(), m.new_session(kv="int4")
    ids = m.tokenize(PROMPTS[2])
    s.eval(ids)
    t.eval(ids)
    assert s.kv_bytes() > t.kv_bytes() > 0
    assert s.kv_bytes() == m.kv_bytes_per_token * len(ids)  # fp16: every token at its full size
    s.close()
    assert s.closed and s.kv_bytes() == 0 and s.n_past == 0
    s.close()  # idempotent
    assert t.kv_bytes() > 0 and m.n_past == 0
    m.close()
    assert t.closed
    with pytest.raises(ModelClosedError):
        t.eval([1])
    t.close()


def test_use_after_close_and_bad_input_raise_clear_errors(smol, smollm2_path):
    s = smol.new_session()
    s.eval([1, 2, 3])
    other = smol.new_session()
    for bad, msg in (([], "non-empty"), ([1, smol.vocab_size], "out of range"), ([1.5], "integers"),
                     ([-1], "out of range")):
        with pytest.raises(ValueError, match=msg):
            s.eval(bad)
        with pytest.raises(ValueError, match=msg):
            smol.step([s, other], [[1], bad])
    assert s.n_past == 3 and other.n_past == 0  # a refused step changes no session
    with pytest.raises(ValueError, match="one id list per session"):
        smol.step([s, other], [[1]])
    with pytest.raises(ValueError, match="twice"):
        smol.step([s, s], [[1], [2]])
    with pytest.raises(ValueError, match="non-empty list"):
        smol.step([], [])
    with pytest.raises(ValueError, match="cannot truncate"):
        s.truncate(4)
    with pytest.raises(ContextOverflowError, match="sessions\\[1\\]"):
        smol.step([s, other], [[1], [5] * (smol.n_ctx + 1)])
    assert s.n_past == 3 and other.n_past == 0
    with pytest.raises(ValueError, match="no tokens"):
        other.logits()
    m2 = edgekv.Model(smollm2_path, threads=THREADS, ctx=64)
    foreign = m2.new_session()
    with pytest.raises(ValueError, match="not a session of"):
        smol.step([s, foreign], [[1], [1]])
    m2.close()
    other.close()
    with pytest.raises(ModelClosedError, match="closed"):
        other.eval([1])
    with pytest.raises(ModelClosedError, match="closed"):
        smol.step([s, other], [[1], [1]])
    with pytest.raises(ModelClosedError, match="closed"):
        other.truncate(0)
    assert s.n_past == 3
    s.truncate(1)
    assert s.tokens == [1]
    s.close()


def test_set_kv_sets_the_policy_of_one_session(smol):
    ids = smol.tokenize(PROMPTS[0])
    s, other = smol.new_session(), smol.new_session()
    s.eval(ids)
    other.eval(ids)
    assert (s.kv_bits()[0] == 16).all()
    s.set_kv("int4")  # tokens stored under fp16: cleared now, not silently at the next eval
    assert s.n_past == 0 and s.kv_bytes() == 0
    s.eval(ids)
    k, v = s.kv_bits()
    assert (k == 4).all() and (v == 4).all() and s.kv_bytes() < other.kv_bytes()
    assert (other.kv_bits()[0] == 16).all() and smol.kv_policy.name == "fp16"  # the others keep theirs
    with pytest.raises(ValueError):
        s.set_kv("int5")
    assert s.n_past == len(ids)
    s.close()
    other.close()


def test_eval_logits_modes_kv_and_set_bits(smol):
    ids = smol.tokenize(PROMPTS[1])
    n, vocab = len(ids), smol.vocab_size
    ref = smol.logits(ids)  # the default session, fresh
    s = smol.new_session()
    rows = s.eval(ids, logits="all")
    assert rows.shape == (n, vocab) and np.array_equal(rows, ref) and np.array_equal(s.logits(), ref[-1])
    s.truncate(0)
    assert s.eval(ids, logits="none") is None and s.n_past == n
    out = np.empty((2, vocab), np.float32)
    assert s.eval([5, 6], logits="all", out=out) is out and s.n_past == n + 2
    with pytest.raises(ValueError, match="shape"):
        s.eval([5, 6], logits="all", out=np.empty((3, vocab), np.float32))
    with pytest.raises(ValueError, match="logits must be one of"):
        s.eval([5], logits="first")
    with pytest.raises(ValueError, match="out="):
        s.eval([5], out=out)
    assert s.n_past == n + 2  # refused calls ran nothing
    s.set_bits([0, 1], [4, 4], [2, 2])
    k, v = s.kv_bits()
    assert k[:2].tolist() == [4, 4] and v[:2].tolist() == [2, 2] and (k[2:] == 16).all() and (v[2:] == 16).all()
    with pytest.raises(ValueError, match="not in the context"):
        s.set_bits([n + 2], [4], [4])
    with pytest.raises(ValueError, match="bit-widths"):
        s.set_bits([0], [5], [4])
    t = smol.new_session()
    t.eval(ids, kv="int8")  # one call's policy; the session's own stays
    assert (t.kv_bits()[0] == 8).all() and t.kv_policy.name == "fp16"
    s.close()
    t.close()


def test_other_sessions_leave_a_generation_stream_undisturbed(smol, monkeypatch):
    """A stream on the default session re-runs its context only when another call used that
    session's cache in between, not when other sessions ran."""
    replays = []
    real = type(smol)._replay
    monkeypatch.setattr(type(smol), "_replay", lambda self, *a: (replays.append(1), real(self, *a)))
    want = smol.generate(PROMPTS[0], max_tokens=6, temperature=0)
    s = smol.new_session()
    it = smol.generate(PROMPTS[0], max_tokens=6, temperature=0, stream=True)
    got = next(it)
    s.eval(smol.tokenize(PROMPTS[2]))
    smol.step([s], [[5]])
    got += "".join(it)
    assert got == want and replays == []
    it = smol.generate(PROMPTS[0], max_tokens=6, temperature=0, stream=True)
    got = next(it)
    smol.session.eval(smol.tokenize(PROMPTS[2]))  # the default session's cache: the stream re-runs
    got += "".join(it)
    assert got == want and len(replays) == 1
    s.close()
