"""The learned KV controller: rarity feature, feature matrix, decision rule, the ONNX artifact
shipped in the package (loads, decides deterministically), LearnedPolicy / RulePolicy inside a
Model (tiny models), and kv="adaptive" parsing. Fast: no real model is run."""

from __future__ import annotations

import json

import numpy as np
import pytest

import sys

from conftest import REPO, THREADS
import edgekv
from edgekv import controller as ctl
from edgekv._native import lib
from edgekv.kv_policy import BITS, GROUP_OF, CallablePolicy, TokenFeatures, parse_policy
from edgekv.model import KV_DECIDE_BATCH

SHIPPED = sorted(ctl.DATA_DIR.glob("controller_*.json"))
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # the training package (controller/) lives at the top level


def _features(n: int, seed: int = 0, nan_logprob_first: bool = True) -> TokenFeatures:
    rng = np.random.default_rng(seed)
    pos = np.arange(n, dtype=np.int32)
    lp = -rng.exponential(3.0, n).astype(np.float32)
    if nan_logprob_first:
        lp[0] = np.nan
    return TokenFeatures(
        positions=pos,
        token_ids=rng.integers(0, 1000, n).astype(np.int32),
        entropy=rng.exponential(2.0, n).astype(np.float32),
        max_prob=rng.uniform(0.05, 1.0, n).astype(np.float32),
        logprob=lp,
        attn_mean=rng.uniform(0, 0.2, n).astype(np.float32),
        attn_var=rng.uniform(0, 0.01, n).astype(np.float32),
        age=(n - 1 - pos).astype(np.int32),
        rarity=rng.uniform(2, 14, n).astype(np.float32),
    )


# ---- features ---------------------------------------------------------------------------------

def test_token_features_rarity_is_optional():
    f = TokenFeatures(*(np.zeros(3, np.float32) for _ in range(8)))
    assert f.rarity.shape == (3,) and np.isnan(f.rarity).all()


@pytest.mark.parametrize("n_pos", [1, 5, 40])
def test_rarity_counts_only_the_past(n_pos):
    rng = np.random.default_rng(1)
    ctx = rng.integers(0, 7, 60)
    counts = np.bincount(rng.integers(0, 50, 500), minlength=50)
    prior = ctl.RarityPrior(counts, 50)
    pos = np.sort(rng.choice(60, n_pos, replace=False))
    got = prior.rarity(ctx, pos)
    w = ctl.RARITY_PRIOR_WEIGHT
    want = [-np.log((w * prior.q[ctx[j]] + np.count_nonzero(ctx[:j + 1] == ctx[j])) / (w + j + 1)) for j in pos]
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # a later occurrence makes a token less rare
    assert prior.rarity(np.array([3, 3]), np.array([1]))[0] < prior.rarity(np.array([3, 3]), np.array([0]))[0]


def test_feature_matrix_small_batches_match():
    """A decode step (one row) takes a plain-float path: it must give the numpy path's values."""
    f = _features(40, seed=7)
    f.entropy[5] = np.nan
    f.attn_mean[6] = np.nan
    f.attn_var[7] = np.nan
    X = ctl.feature_matrix(f)
    for i in range(40):
        one = TokenFeatures(**{k: getattr(f, k)[i:i + 1] for k in f.__dataclass_fields__})
        np.testing.assert_allclose(ctl.feature_matrix(one)[0], X[i], rtol=1e-6, atol=1e-6)


def test_feature_matrix_is_finite_and_ordered():
    f = _features(20)
    f.entropy[3] = np.nan
    f.attn_mean[4] = np.nan
    X = ctl.feature_matrix(f)
    assert X.shape == (20, len(ctl.FEATURE_NAMES)) and X.dtype == np.float32
    assert np.isfinite(X).all()
    assert X[0, ctl.FEATURE_NAMES.index("has_logprob")] == 0 and X[1, ctl.FEATURE_NAMES.index("has_logprob")] == 1


# ---- decision rule ---------------------------------------------------------------------------------

def test_choose_bits_monotone_in_lambda():
    rng = np.random.default_rng(2)
    p = rng.dirichlet(np.ones(3), 200)
    table = np.array([[0.0, 0.0, 0.0, 0.0], [1.0, 0.02, 0.0, 0.0], [3.0, 1.0, 0.01, 0.0]])  # labels 2, 4, 8
    eff = ctl.effective_bits((64, 64, 32))
    prev = None
    for lam in (0.0, 0.3, 1, 3, 10, 100, 1e4):
        b = ctl.choose_bits(p, table, lam, eff)
        assert set(np.unique(b)) <= {2, 4, 8, 16}
        if prev is not None:
            assert (b >= prev).all()
        prev = b
    assert (ctl.choose_bits(p, table, 0.0, eff) == 2).all()


def test_choose_bits_per_position_bucket():
    p = np.array([[0.5, 0.5], [0.5, 0.5]])
    table = np.array([[[0, 0, 0, 0], [10.0, 0, 0, 0]],     # bucket 0 (first token): going low is costly
                      [[0, 0, 0, 0], [0.5, 0, 0, 0]]])     # bucket 1
    eff = ctl.effective_bits((64, 64, 32))
    bucket = ctl.position_bucket(np.array([0, 5]), [0, 1])
    assert bucket.tolist() == [0, 1]
    assert ctl.choose_bits(p, table, 1.0, eff, bucket).tolist() == [4, 2]


def test_choose_bits_with_three_bit_choices():
    """Five choices (2, 3, 4, 8, 16): a 3-bit column between 2 and 4 is picked where its damage is
    low enough for its cost; a table whose width does not match the choices is refused."""
    p = np.array([[1.0], [1.0]])
    eff = ctl.effective_bits((64, 64, 32))  # 3.0, 3.5, 4.5, 8.5, 16 bits
    choices = (2, 3, 4, 8, 16)
    table = np.array([[2.0, 0.2, 0.0, 0.0, 0.0]])
    assert ctl.choose_bits(p, table, 1.0, eff, None, choices).tolist() == [3, 3]   # 3.5 + 0.2 < 3 + 2, < 4.5
    assert ctl.choose_bits(p, table, 0.1, eff, None, choices).tolist() == [2, 2]   # 3 + 0.2 < 3.5 + 0.02
    assert ctl.choose_bits(p, table, 100.0, eff, None, choices).tolist() == [4, 4]
    with pytest.raises(ValueError, match="columns"):
        ctl.choose_bits(p, table, 1.0, eff)  # the legacy choices are four


def test_lambda_for_target_interpolates():
    table = [[0.01, 3.0], [0.1, 3.2], [1.0, 3.6], [10.0, 4.4]]
    assert ctl.lambda_for_target(table, 2.0) == 0.01
    assert ctl.lambda_for_target(table, 9.0) == 10.0
    lam = ctl.lambda_for_target(table, 3.4)
    assert 0.1 < lam < 1.0
    assert ctl.lambda_for_target(table, 3.5) > lam


def test_effective_and_average_bits():
    eff = ctl.effective_bits((64, 64, 32))
    assert {b: eff[b] for b in (16, 8, 4, 3, 2)} == {16: 16.0, 8: 8.5, 4: 4.5, 3: 3.5, 2: 3.0}  # 3-bit: the 4-bit group
    # every row of the C table (kv_policy.BITS) has its cost: bits + one fp16 scale and minimum per group
    assert set(eff) == set(BITS)
    size = {8: 64, 4: 64, 2: 32}
    assert all(eff[b] == b + 32 / size[GROUP_OF[b]] for b in BITS if b != 16)
    assert ctl.average_bits(np.array([4, 4]), np.array([2, 2]), (64, 64, 32)) == pytest.approx(3.75)
    assert ctl.average_bits(np.array([3, 3]), np.array([3, 2]), (64, 32, 32)) == pytest.approx((4 + 4 + 4 + 3) / 4)


# ---- parsing ---------------------------------------------------------------------------------

def test_parse_adaptive():
    p = parse_policy("adaptive")
    assert isinstance(p, ctl.LearnedPolicy) and p.needs_features and p.target_bits is None
    q = parse_policy("adaptive@3.25", window=2)
    assert q.target_bits == 3.25 and q.window == 2 and q.name == "adaptive@3.25"
    with pytest.raises(ValueError):
        parse_policy("adaptive@")


# ---- the shipped artifact ------------------------------------------------------------------------

def test_an_artifact_ships():
    """The package ships SmolLM2's controller: without it the test below has no cases (test_kv_smollm2.py
    runs it end to end)."""
    assert "controller_smollm2-135m.json" in [p.name for p in SHIPPED], SHIPPED


# the one that must ship is a case even when missing (a failure, not an empty parameter set)
SHIPPED_CASES = sorted(set(SHIPPED) | {ctl.DATA_DIR / "controller_smollm2-135m.json"})


@pytest.mark.parametrize("meta_path", SHIPPED_CASES, ids=[p.stem for p in SHIPPED_CASES])
def test_shipped_artifact_loads_and_decides_deterministically(meta_path):
    meta = json.loads(meta_path.read_text())
    assert meta["features"] == list(ctl.FEATURE_NAMES)
    assert meta_path.with_suffix(".onnx").exists()
    art = ctl.load_artifact(str(meta_path))
    X = ctl.feature_matrix(_features(64, seed=3))
    pk, pv = art.predict_proba(X)
    assert pk.shape == (64, len(meta["k_classes"])) and pv.shape == (64, len(meta["v_classes"]))
    np.testing.assert_allclose(pk.sum(1), 1, atol=1e-4)
    np.testing.assert_allclose(pv.sum(1), 1, atol=1e-4)
    # a fresh session gives the same probabilities, and the decisions follow the target
    art2 = ctl.ControllerArtifact(meta_path.with_suffix(".onnx"), meta)
    pk2, pv2 = art2.predict_proba(X)
    np.testing.assert_array_equal(pk, pk2)
    np.testing.assert_array_equal(pv, pv2)
    eff = ctl.effective_bits(meta["kv_groups"])
    bucket = ctl.position_bucket(np.arange(64), meta["damage_buckets"])
    choices = tuple(meta.get("bit_choices", ctl.LEGACY_CHOICES))
    assert np.asarray(meta["k_damage_table"]).shape[-1] == len(choices)
    bits = []
    for tb in (3.25, 3.5, 4.0, 4.5):
        lam = ctl.lambda_for_target(meta["lambda_table"], tb)
        k = ctl.choose_bits(pk, meta["k_damage_table"], lam, eff, bucket, choices)
        v = ctl.choose_bits(pv, meta["v_damage_table"], lam, eff, bucket, choices)
        np.testing.assert_array_equal(k, ctl.choose_bits(pk2, meta["k_damage_table"], lam, eff, bucket, choices))
        bits.append(ctl.average_bits(k, v, meta["kv_groups"]))
    assert bits == sorted(bits)
    # the policy object gives the same decisions as the rule spelled out here
    pol = ctl.LearnedPolicy(target_bits=3.5, artifact=meta_path)
    pol.attach(art, meta["kv_groups"])
    assert pol.lam == ctl.lambda_for_target(meta["lambda_table"], 3.5)
    feats = _features(64, seed=3)
    k, v = pol.decide(feats)
    want_k = ctl.choose_bits(pk, meta["k_damage_table"], pol.lam, eff, bucket, choices)
    sink = feats.positions == 0  # the attention sink's key: never below SINK_MIN_KEY_BITS
    assert sink.any()
    want_k[sink] = np.maximum(want_k[sink], ctl.SINK_MIN_KEY_BITS)
    np.testing.assert_array_equal(k, want_k)
    assert (k[sink] >= 8).all()
    np.testing.assert_array_equal(v, ctl.choose_bits(pv, meta["v_damage_table"], pol.lam, eff, bucket, choices))
    # rule-baseline calibration sample ships with it
    calib = np.load(meta_path.with_name(meta_path.stem + "_calib.npy"))
    assert calib.shape[1] == len(ctl.FEATURE_NAMES)


# ---- inside a Model (tiny) ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_model(tiny_path):
    m = edgekv.load(str(tiny_path("llama", "Q8_0")), threads=THREADS, ctx=128)
    yield m
    m.close()


def test_adaptive_without_artifact_is_a_clear_error(tiny_model):
    with pytest.raises(ValueError, match="no learned KV controller"):
        tiny_model.generate([1, 2, 3, 4], max_tokens=2, temperature=0, kv="adaptive")


def test_model_fills_rarity_and_decode_logprob(tiny_model):
    seen = []

    def fn(f):
        seen.append(f)
        return np.full(len(f), 16, np.int32), np.full(len(f), 16, np.int32)

    tiny_model.generate([5, 6, 7, 5, 6], max_tokens=KV_DECIDE_BATCH + 4, temperature=0, kv=CallablePolicy(fn))
    prefill, steps = seen[0], seen[1:]
    assert np.isfinite(prefill.rarity).all()
    assert np.isnan(prefill.logprob[0]) and np.isfinite(prefill.logprob[1:]).all()
    # decode steps, decided in one batch: each token's log-prob came from the previous step's logits
    assert len(steps) == 1 and len(steps[0]) == KV_DECIDE_BATCH
    assert np.isfinite(steps[0].logprob).all() and np.isfinite(steps[0].rarity).all()
    # repeated ids become less rare within the session
    assert prefill.rarity[3] < prefill.rarity[0]


def test_generation_batches_decisions_on_frozen_features(tiny_model):
    """Generation decides a feature-reading policy's tokens KV_DECIDE_BATCH at a time, with each
    token's features as they were when it became due: the same features a per-step decision
    sees (all-16-bit decisions keep both runs' caches identical, so they must match exactly).
    Queued tokens stay at 16 bits until their batch; any other call decides them first."""
    def recorder(store, bits=16):
        def fn(f):
            store.append(f)
            return np.full(len(f), bits, np.int32), np.full(len(f), bits, np.int32)
        return CallablePolicy(fn)

    prompt = [5, 6, 7, 5, 6]
    n_gen = 2 * KV_DECIDE_BATCH + 3
    batched = []
    tiny_model.generate(prompt, max_tokens=n_gen, temperature=0, kv=recorder(batched))
    tokens = list(tiny_model._tokens)
    assert [len(f) for f in batched] == [len(prompt), KV_DECIDE_BATCH, KV_DECIDE_BATCH]
    per_step = []
    pol = recorder(per_step)
    tiny_model.reset()
    tiny_model._eval(np.asarray(prompt, np.int32), lib.EK_LOGITS_LAST, tiny_model._logits, pol)
    for t in tokens[len(prompt):]:
        tiny_model._eval(np.asarray([t], np.int32), lib.EK_LOGITS_LAST, tiny_model._logits, pol)
    assert [len(f) for f in per_step] == [len(prompt)] + [1] * (len(tokens) - len(prompt))
    cat = lambda fs, name: np.concatenate([getattr(f, name) for f in fs])  # noqa: E731
    n = sum(len(f) for f in batched)
    for name in ("positions", "token_ids", "entropy", "max_prob", "logprob", "rarity", "attn_mean", "attn_var", "age"):
        np.testing.assert_array_equal(cat(batched, name), cat(per_step, name)[:n], err_msg=name)
    # and the decode steps' logit statistics (computed inside the output matmul, the log-prob from
    # the previous step's row) are those of the logits themselves, in float64
    ref = tiny_model.logits(tokens[:n + 1]).astype(np.float64)  # all 16-bit: same cache as above
    z = ref - ref.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    pos = cat(batched, "positions")
    np.testing.assert_allclose(cat(batched, "entropy"), -(np.exp(logp) * logp).sum(axis=1)[pos], rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(cat(batched, "max_prob"), np.exp(logp.max(axis=1))[pos], rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(cat(batched, "logprob")[1:], logp[pos[1:] - 1, np.asarray(tokens)[pos[1:]]],
                               rtol=1e-3, atol=1e-3)
    # quantizing decisions: applied per batch; the queued rest at 16 bits until the next prefill
    tiny_model.reset()
    pol4 = recorder([], bits=4)
    tiny_model.generate(prompt, max_tokens=n_gen, temperature=0, kv=pol4)
    kb, vb = tiny_model.kv_bits()
    assert (kb[:n] == 4).all() and (vb[:n] == 4).all() and (kb[n:] == 16).all() and kb.size > n
    tiny_model.generate(list(tiny_model._tokens) + [9], max_tokens=1, temperature=0, kv=pol4)
    assert (tiny_model.kv_bits()[0][:kb.size] == 4).all()


def _tiny_artifact(model, tmp_path):
    """A small controller for the tiny model: a decision tree on synthetic labels, exported like the real one."""
    from sklearn.tree import DecisionTreeClassifier

    from controller.train import export_onnx

    rng = np.random.default_rng(0)
    X = ctl.feature_matrix(_features(300, seed=4))
    yk = np.where(X[:, 0] > np.median(X[:, 0]), 4, 2)
    yv = np.where(X[:, 5] > np.median(X[:, 5]), 4, 2)
    yk[rng.integers(0, 300, 10)] = 8
    est_k = DecisionTreeClassifier(max_depth=3, random_state=0).fit(X, yk)
    est_v = DecisionTreeClassifier(max_depth=3, random_state=0).fit(X, yv)
    onnx_path = tmp_path / "controller_tiny.onnx"
    export_onnx(est_k, est_v, X.shape[1], onnx_path)
    meta = {
        "model": "tiny", "vocab_sha256": ctl.vocab_fingerprint(model.tokenizer), "shape": ctl.model_shape(model),
        "kv_groups": list(model.kv_groups), "features": list(ctl.FEATURE_NAMES),
        "k_classes": [2, 4, 8], "v_classes": [2, 4],
        "k_damage_table": [[0, 0, 0, 0], [5.0, 0, 0, 0], [10.0, 5.0, 0, 0]],
        "v_damage_table": [[0, 0, 0, 0], [5.0, 0, 0, 0]],
        "lambda_table": [[0.01, 3.0], [1.0, 3.4], [10.0, 4.0], [100.0, 5.0]],
        "default_target_bits": 3.5,
    }
    json_path = onnx_path.with_suffix(".json")
    json_path.write_text(json.dumps(meta))
    return json_path


def test_learned_policy_in_a_model(tiny_model, tmp_path):
    art = _tiny_artifact(tiny_model, tmp_path)
    ids = list(range(3, 40))
    results = []
    for _ in range(2):
        pol = ctl.LearnedPolicy(target_bits=3.5, artifact=art)
        out = tiny_model.generate(ids, max_tokens=6, temperature=0, kv=pol)
        results.append((out, *tiny_model.kv_bits()))
    (o1, k1, v1), (o2, k2, v2) = results
    assert o1 == o2
    np.testing.assert_array_equal(k1, k2)
    np.testing.assert_array_equal(v1, v2)
    # It does route. Only the prompt's tokens were decided (at prefill, window 0); the generated
    # ones wait at 16 bits for a batch of KV_DECIDE_BATCH, so 16 in the cache says nothing about
    # the controller. Position 0's key is raised to the sink floor whatever was decided.
    decided = np.arange(k1.size) < len(ids)
    assert k1.size == len(ids) + 5 and 5 < KV_DECIDE_BATCH
    assert (k1[~decided] == 16).all() and (v1[~decided] == 16).all()
    kq, vq = k1[decided][1:], v1[decided][1:]
    assert set(np.unique(kq)) <= {2, 4, 8} and set(np.unique(vq)) <= {2, 4, 8}
    assert len(np.unique(kq)) > 1, f"keys all at {np.unique(kq)}: the controller did not route"
    # more bits asked, no fewer bits given
    lo = ctl.LearnedPolicy(lam=0.0, artifact=art)
    hi = ctl.LearnedPolicy(lam=1e4, artifact=art)
    tiny_model.score(ids, [7, 8], kv=lo)
    bits_lo = tiny_model.kv_avg_bits
    tiny_model.score(ids, [7, 8], kv=hi)
    assert tiny_model.kv_avg_bits > bits_lo


def test_learned_policy_refuses_another_models_artifact(tiny_model, tmp_path):
    art = _tiny_artifact(tiny_model, tmp_path)
    meta = json.loads(art.read_text())
    meta["shape"]["n_layer"] += 1
    art.write_text(json.dumps(meta))
    ctl.load_artifact.cache_clear()
    with pytest.raises(ValueError, match="trained for"):
        tiny_model.score([1, 2, 3], [4], kv=ctl.LearnedPolicy(artifact=art))


def test_learned_policy_warns_on_another_kv_layout(tiny_model, tmp_path, caplog):
    """The damage tables belong to the KV layout the controller was trained on: another layout still
    runs, with a warning that names what differs; the same layout runs silently."""
    art = _tiny_artifact(tiny_model, tmp_path)
    meta = json.loads(art.read_text())
    assert tiny_model.kv_layout == {"kv_groups": list(tiny_model.kv_groups), "kv_rotate": tiny_model.kv_rotate,
                                    "kv_center_keys": tiny_model.kv_center_keys, "kv_fit_grid": tiny_model.kv_fit_grid}
    meta.update(tiny_model.kv_layout)
    art.write_text(json.dumps(meta))
    ctl.load_artifact.cache_clear()
    with caplog.at_level("WARNING", logger="edgekv"):
        tiny_model.score([1, 2, 3], [4], kv=ctl.LearnedPolicy(artifact=art))
    assert "another KV layout" not in caplog.text
    meta["kv_center_keys"] = not tiny_model.kv_center_keys
    art.write_text(json.dumps(meta))
    ctl.load_artifact.cache_clear()
    with caplog.at_level("WARNING", logger="edgekv"):
        tiny_model.score([1, 2, 3], [4], kv=ctl.LearnedPolicy(artifact=art))
    assert "another KV layout" in caplog.text and "kv_center_keys" in caplog.text
    # artifacts from before kv_fit_grid existed were trained with min/max grids
    meta["kv_center_keys"] = tiny_model.kv_center_keys
    del meta["kv_fit_grid"]
    art.write_text(json.dumps(meta))
    ctl.load_artifact.cache_clear()
    caplog.clear()
    with caplog.at_level("WARNING", logger="edgekv"):
        tiny_model.score([1, 2, 3], [4], kv=ctl.LearnedPolicy(artifact=art))
    assert "another KV layout" not in caplog.text
    with edgekv.Model(tiny_model.path, threads=THREADS, ctx=128, kv_fit_grid=True) as fitted, \
            caplog.at_level("WARNING", logger="edgekv"):
        fitted.score([1, 2, 3], [4], kv=ctl.LearnedPolicy(artifact=art))
    assert "another KV layout" in caplog.text and "kv_fit_grid True (trained with False)" in caplog.text


def test_rule_policy(tiny_model):
    X = ctl.feature_matrix(_features(400, seed=5))
    rule = ctl.RulePolicy.calibrated(X, 3.5, groups=(64, 64, 32))
    assert rule.lo == (2, 2) and rule.hi == (4, 2)
    imp = (X[:, 0] > rule.tau_entropy) | (X[:, 5] > rule.tau_attn)
    assert abs(imp.mean() - 2 / 3) < 0.02  # 3.5 bits = 2/3 of keys at 4 bits (4.5) and 1/3 at 2 (3.0)
    tiny_model.score(list(range(3, 30)), [5], kv=rule)
    k, v = tiny_model.kv_bits()
    assert set(np.unique(k)) <= {2, 4} and set(np.unique(v)) == {2}


# ---- the oracle (controller/oracle.py) ----------------------------------------------------------------

def test_oracle_horizon_scales_tolerances():
    from controller import oracle

    saved = (oracle.HORIZON, dict(oracle.TOL))
    try:
        oracle.set_horizon(64)
        assert oracle.HORIZON == 64
        assert oracle.TOL == {k: v * 4 for k, v in saved[1].items()}
        oracle.set_horizon(16)
        assert oracle.HORIZON == 16 and oracle.TOL == pytest.approx(saved[1])
    finally:
        oracle.HORIZON, oracle.TOL = saved


def test_oracle_damage_is_exact_against_its_baseline(tiny_model):
    """A token left at 16 bits does no damage (the same path as the baseline: KL exactly 0); one at
    2 bits does some; measure() walks the ladder and stops at the first bit-width that passes."""
    from controller import oracle

    ids = np.arange(5, 5 + 40, dtype=np.int32)
    orc = oracle.WindowOracle(tiny_model, ids, horizon=8)
    j = 10
    assert orc.damage(j, "k", 16) == 0.0 and orc.damage(j, "v", 16) == 0.0
    assert orc.damage(j, "k", 2) > 0.0
    rec = orc.measure(j, tol={"k": np.inf, "v": np.inf})  # everything passes at 2 bits
    assert np.isfinite(rec["k2"]) and all(np.isnan(rec[f"k{b}"]) for b in oracle.LADDER[1:])
    rec = orc.measure(j, tol={"k": -np.inf, "v": -np.inf})  # nothing passes: the whole ladder
    assert all(np.isfinite(rec[f"{kind}{b}"]) for kind in "kv" for b in oracle.LADDER)
    with pytest.raises(ValueError, match="following tokens"):
        orc.measure(ids.size - 3)


def test_oracle_budget_bits_meets_the_budget_and_spends_it_where_damage_is():
    from controller import oracle

    rng = np.random.default_rng(0)
    n = 200
    groups = (64, 64, 32)
    # damage falls with bits; half the tokens are 10x as sensitive
    scale = np.where(np.arange(n) % 2 == 0, 10.0, 1.0)[:, None, None] * rng.uniform(0.5, 1.5, (n, 2, 1))
    dmg = scale * np.array([8.0, 4.0, 2.0, 0.2, 0.0])[None, None, :]
    floor = np.where(np.arange(n) == 0, 8, 0)
    for target in (3.25, 3.5, 4.5, 8.0):
        kb, vb = oracle.budget_bits(dmg, target, groups, floor)
        assert ctl.average_bits(kb, vb, groups) <= target + 1e-9
        assert kb[0] >= 8
        sens = np.arange(n) % 2 == 0
        assert kb[sens].mean() >= kb[~sens].mean() and vb[sens].mean() >= vb[~sens].mean()
    # a tighter budget never raises a token's bits
    k35, v35 = oracle.budget_bits(dmg, 3.5, groups)
    k45, v45 = oracle.budget_bits(dmg, 4.5, groups)
    assert (k35 <= k45).all() and (v35 <= v45).all()
    # no budget can go below the cheapest choice: the cheapest is returned
    kb, vb = oracle.budget_bits(dmg, 1.0, groups)
    assert (kb == 2).all() and (vb == 2).all()


def test_oracle_window_damages(tiny_model):
    from controller import oracle

    ids = np.arange(5, 5 + 24, dtype=np.int32)
    saved = oracle.HORIZON
    try:
        oracle.HORIZON = 6
        t = oracle.window_damages(tiny_model, ids)
    finally:
        oracle.HORIZON = saved
    assert t.shape == (ids.size, 2, len(oracle.CHOICES))
    assert (t[:, :, -1] == 0).all() and (t[-1] == 0).all()  # 16 bits, and the last token: no damage
    assert (t >= 0).all() and (t[1:-1, :, 0] > 0).mean() > 0.9  # 2 bits does some, above the floor
    assert (t[:-1, :, 0].mean(axis=0) > t[:-1, :, 3].mean(axis=0)).all()  # 2 bits worse than 8 on average
    assert tiny_model.n_past == 0
