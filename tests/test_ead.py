"""Entropy adaptive decoding (edgekv.ead) on tiny generated models: two sizes, one tokenizer.

The switching rule is checked on scripted entropies (the entropy source is injectable), the
catch-up on the logits each model produced (no KV drift against a fresh model), verify mode
against the large model's own greedy output, and the pairing / CLI errors.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import edgekv
from edgekv._native import lib
from edgekv.ead import LARGE, SMALL, EADConfig, EntropySwitch, entropy_bits, entropy_bits_rows, simulate_switching

from conftest import THREADS, make_vocab, run_cli, write_tiny_model

PROMPT = "Once upon a time there was"


# --------------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def pair_paths(tiny_path):
    """(small, large) qwen2 tiny models sharing a tokenizer; end tokens biased away (never end)."""
    kw = dict(tie_embeddings=False, special_logit_bias=-8.0)
    return (tiny_path("qwen2", "Q8_0", size="small", seed=1, **kw),
            tiny_path("qwen2", "Q8_0", size="large", seed=11, **kw))


@pytest.fixture(scope="module")
def pair(pair_paths):
    """Shared by the tests (generation works from any cache state, which this also exercises)."""
    p = edgekv.load_pair(*pair_paths, threads=THREADS, progress=False)
    yield p
    p.close()


def pattern(sources):
    return "".join("L" if s == LARGE else "S" for s in sources)


class Script:
    """An entropy source that plays back scripted values and records what it was shown."""

    def __init__(self, small, large=None):
        self.small = list(small)
        self.large = list(small if large is None else large)
        self.calls = []  # (role, position, logits copy)

    def __call__(self, role, logits, position):
        self.calls.append((role, position, np.array(logits, copy=True)))
        return (self.large if role == LARGE else self.small)[position]


# --------------------------------------------------------------------------------------------
# the rule
# --------------------------------------------------------------------------------------------

# window 2, tau 2, tau_low 1, d_min 3; worked out by hand:
#  pos:      0    1    2    3    4    5    6    7    8    9    10   11
#  H:        1.0  3.5  0.5  0.5  0.5  2.5  2.5  1.5  1.5  1.5  0.9  0.9
#  rolling:  1.0  2.25 2.0  0.5  0.5  1.5  2.5  2.0  1.5  1.5  1.2  0.9
#  writer:   S    L    L    L    S    S    L    L    L    L    L    S
#   pos 1: 2.25 > 2 -> up; pos 3: 0.5 < 1 but only 2 large tokens; pos 4: down;
#   pos 6: up; pos 9: 1.5 is not below tau_low (hysteresis); pos 11: 0.9 < 1 -> down.
RULE_CFG = EADConfig(window=2, tau=2.0, tau_low=1.0, d_min=3)
RULE_H = [1.0, 3.5, 0.5, 0.5, 0.5, 2.5, 2.5, 1.5, 1.5, 1.5, 0.9, 0.9]
RULE_EXPECTED = "SLLLSSLLLLLS"


def test_rule_on_a_hand_worked_sequence():
    rule = EntropySwitch(RULE_CFG)
    got = []
    for h in RULE_H:
        rule.decide(h)
        got.append(rule.active)
        rule.wrote()
    assert pattern(got) == RULE_EXPECTED
    assert rule.switches == 4
    mask = simulate_switching(np.array(RULE_H), np.array(RULE_H), RULE_CFG)
    assert pattern([LARGE if x else SMALL for x in mask]) == RULE_EXPECTED


def test_simulation_reads_the_active_models_entropy():
    # the small model is always unsure, the large always sure: up at once, down after d_min
    cfg = EADConfig(window=1, tau=1.0, d_min=4)
    mask = simulate_switching(np.full(12, 3.0), np.zeros(12), cfg)
    assert pattern([LARGE if m else SMALL for m in mask]) == "LLLLSLLLLSLL"


def test_config_validation():
    for bad in (dict(window=0), dict(d_min=0), dict(tau=float("nan")), dict(tau=1.0, tau_low=2.0),
                dict(max_draft=-1), dict(window=True), dict(verify_window=-1), dict(verify_window=4),
                dict(max_draft=3)):
        with pytest.raises(ValueError):
            EADConfig(**bad)


def test_entropy_bits_c_path_matches_float64():
    from edgekv.ead import entropy_bits_f64

    rng = np.random.default_rng(7)
    for scale in (0.01, 1.0, 5.0, 30.0):
        for n in (2, 1000, 151936):
            z = (rng.standard_normal(n) * scale).astype(np.float32)
            assert abs(entropy_bits(z) - entropy_bits_f64(z)) < 1e-4 * max(1.0, entropy_bits_f64(z))
    z = np.full(5000, -20.0, np.float32)
    z[17] = 40.0  # nearly one-hot
    assert entropy_bits(z) == pytest.approx(entropy_bits_f64(z), abs=1e-6)


def test_entropy_bits():
    assert entropy_bits(np.zeros(8, np.float32)) == pytest.approx(3.0)
    assert entropy_bits(np.array([0.0, 0.0, -np.inf])) == pytest.approx(1.0)
    z = np.random.default_rng(0).normal(size=(3, 50))
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(entropy_bits_rows(z), -(p * np.log2(p)).sum(axis=1), rtol=1e-9)


# --------------------------------------------------------------------------------------------
# generation
# --------------------------------------------------------------------------------------------

def test_generation_follows_the_rule_exactly(pair):
    script = Script(RULE_H)
    pair.generate(PROMPT, max_tokens=len(RULE_H), temperature=0, config=RULE_CFG, entropy_fn=script)
    st = pair.last_stats
    assert pattern(st.sources) == RULE_EXPECTED
    assert (st.switches_up, st.switches_down) == (2, 2)
    assert st.small_tokens == 4 and st.large_tokens == 8 and st.large_share == pytest.approx(8 / 12)
    # the rule was shown, at each position, the model that was active before it decided
    assert [p for _, p, _ in script.calls] == list(range(len(RULE_H)))
    before = [SMALL] + [s for s in st.sources[:-1]]
    assert [r for r, _, _ in script.calls] == before


def test_role_dependent_entropies_match_the_simulation(pair):
    rng = np.random.default_rng(3)
    hs, hl = rng.uniform(0, 3, 40), rng.uniform(0, 2, 40)
    cfg = EADConfig(window=3, tau=1.6, tau_low=1.2, d_min=2)
    pair.generate(PROMPT, max_tokens=40, temperature=0, config=cfg, entropy_fn=Script(hs, hl))
    expected = [LARGE if m else SMALL for m in simulate_switching(hs, hl, cfg)]
    assert pair.last_stats.sources == expected
    assert pair.last_stats.switches >= 4


@pytest.fixture(scope="session")
def f16_pair_paths(tiny_path):
    kw = dict(tie_embeddings=False, special_logit_bias=-8.0)
    return (tiny_path("qwen2", "F16", size="small", seed=1, **kw),
            tiny_path("qwen2", "F16", size="large", seed=11, **kw))


def test_no_kv_drift_after_many_switches(f16_pair_paths, open_model):
    # F16 weights: with Q8_0 weights the C core's one-token and batched evaluations of the same
    # sequence can differ by ~0.1 in a logit (activations are quantized to 8 bits, and the
    # attention's softmax sum is rounded differently for a different number of keys), with or
    # without EAD; F16 keeps that difference at rounding level, so a cache error would show.
    paths = f16_pair_paths
    pair = edgekv.load_pair(*paths, threads=THREADS, progress=False)
    rng = np.random.default_rng(7)
    hs = rng.choice([0.0, 2.0], size=48, p=[0.7, 0.3])
    script = Script(hs, rng.choice([0.0, 2.0], size=48, p=[0.5, 0.5]))
    cfg = EADConfig(window=1, tau=1.0, d_min=1)
    prompt = pair.tokenize(PROMPT)
    pair.generate(prompt, max_tokens=48, temperature=0, config=cfg, entropy_fn=script)
    st = pair.last_stats
    assert st.switches >= 8 and st.catchup_tokens > 0
    full = prompt + st.tokens
    fresh = {SMALL: open_model(paths[0]).logits(full), LARGE: open_model(paths[1]).logits(full)}
    n0 = len(prompt)
    # every distribution the rule saw equals the fresh model's at that position
    for role, pos, logits in script.calls:
        np.testing.assert_allclose(logits, fresh[role][n0 + pos - 1], atol=1e-3, rtol=0)
    # each token was written by the argmax of its model's fresh logits (greedy)
    for pos, (src, tok) in enumerate(zip(st.sources, st.tokens)):
        assert int(np.argmax(fresh[src][n0 + pos - 1])) == tok
    for role, m in ((SMALL, pair.small), (LARGE, pair.large)):
        # the cache holds a prefix of the sequence, each token run exactly once
        assert m._tokens == full[:m.n_past]
        assert m.n_past == (st.small_evaluated if role == SMALL else st.large_evaluated)
        # and continues exactly as a fresh model does
        rest = np.asarray(full[m.n_past:], np.int32)
        out = np.empty((rest.size, m.vocab_size), np.float32)
        m._eval(rest, lib.EK_LOGITS_ALL, out)
        np.testing.assert_allclose(out, fresh[role][-rest.size:], atol=1e-3, rtol=0)
    pair.close()


def test_extremes_equal_single_models(pair):
    n = 20
    small_only = pair.generate(PROMPT, max_tokens=n, temperature=0, tau=1e9)
    assert pair.last_stats.large_tokens == 0 and pair.last_stats.large_evaluated == 0
    assert small_only == pair.small.generate(PROMPT, max_tokens=n, temperature=0)
    large_only = pair.generate(PROMPT, max_tokens=n, temperature=0, tau=-1.0, tau_low=-2.0)
    st = pair.last_stats
    assert st.large_share == 1.0 and st.switches == 1
    assert large_only == pair.large.generate(PROMPT, max_tokens=n, temperature=0)
    assert 0.9 < st.relative_compute < 1.5


def test_streaming_equals_text_and_stats(pair):
    kw = dict(max_tokens=24, temperature=0, tau=2.5, window=2, d_min=2)
    text = pair.generate(PROMPT, **kw)
    pieces = list(pair.generate(PROMPT, stream=True, **kw))
    assert "".join(pieces) == text and len(pieces) > 1
    st = pair.last_stats
    assert st.generated_tokens == 24 == st.small_tokens + st.large_tokens
    assert st.finish_reason == "length"
    d = st.as_dict()
    assert {"large_share", "switches", "catchup_tokens", "relative_compute", "wall_s", "ms_per_token"} <= set(d)
    assert "catch-up" in st.line()


def test_sampling_is_reproducible_with_a_seed(pair):
    kw = dict(max_tokens=20, temperature=0.9, seed=5, tau=2.5, window=2, d_min=2)
    assert pair.generate(PROMPT, **kw) == pair.generate(PROMPT, **kw)


# --------------------------------------------------------------------------------------------
# verify mode
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cfg", [
    EADConfig(tau=2.5, window=2, d_min=2, verify=True),
    EADConfig(tau=3.0, window=1, d_min=1, verify=True),
    EADConfig(tau=1e9, verify=True),                      # the small model drafts everything
    EADConfig(tau=2.5, window=2, d_min=2, verify=True, max_draft=3),
], ids=["switching", "frequent", "draft-all", "max-draft"])
def test_verify_greedy_equals_large_greedy(pair, cfg):
    n = 40
    want = pair.large.generate(PROMPT, max_tokens=n, temperature=0)
    got = pair.generate(PROMPT, max_tokens=n, temperature=0, config=cfg)
    st = pair.last_stats
    assert got == want
    assert st.generated_tokens == n and st.verifications >= 1 and st.rejected_tokens > 0


def test_verify_with_scripted_switches(pair):
    rng = np.random.default_rng(11)
    cfg = EADConfig(window=1, tau=1.0, d_min=1, verify=True)
    script = Script(rng.choice([0.0, 2.0], size=64, p=[0.6, 0.4]), rng.choice([0.0, 2.0], size=64))
    got = pair.generate(PROMPT, max_tokens=30, temperature=0, config=cfg, entropy_fn=script)
    assert got == pair.large.generate(PROMPT, max_tokens=30, temperature=0)


def test_verify_window_bounds_what_a_rejection_throws_away(pair):
    # the small model drafts everything; the large checks only the last 3 tentative tokens at the
    # end of the text and after every 6: each check looks at 3, so at most 3 are thrown away
    n = 40
    cfg = EADConfig(tau=1e9, verify=True, max_draft=6, verify_window=3)
    got = pair.generate(PROMPT, max_tokens=n, temperature=0, config=cfg)
    st = pair.last_stats
    assert st.generated_tokens == n and st.verifications >= n // 6
    assert st.checked_tokens <= 3 * st.verifications
    assert 0 < st.rejected_tokens <= 3 * st.verifications
    tokens, sources = st.tokens, pattern(st.sources)
    # tokens older than the window stay the small model's: the text is neither model's alone
    assert got != pair.large.generate(PROMPT, max_tokens=n, temperature=0)
    pair.generate(PROMPT, max_tokens=n, temperature=0, tau=1e9)
    small = pair.last_stats.tokens
    assert tokens != small and "S" in sources and "L" in sources
    # positions 0..2 are never in the last 3 of a 6-token draft: the small model's greedy tokens
    assert tokens[:3] == small[:3] and sources[:3] == "SSS"


def test_verify_window_wider_than_any_draft_is_plain_verify(pair):
    n = 30
    cfg = EADConfig(tau=2.5, window=2, d_min=2, verify=True, max_draft=5, verify_window=5)
    got = pair.generate(PROMPT, max_tokens=n, temperature=0, config=cfg)
    assert got == pair.large.generate(PROMPT, max_tokens=n, temperature=0)


def test_verify_when_the_draft_ends_the_text(tiny_path):
    # the small model ends its turn at once, the large never: verification must undo the end
    small = tiny_path("qwen2", "Q8_0", size="small", seed=1, tie_embeddings=False, special_logit_bias=8.0)
    large = tiny_path("qwen2", "Q8_0", size="large", seed=11, tie_embeddings=False, special_logit_bias=-8.0)
    with edgekv.load_pair(small, large, threads=THREADS, progress=False) as p:
        assert p.generate(PROMPT, max_tokens=10, temperature=0, tau=1e9) == ""
        assert p.last_stats.finish_reason == "stop"
        got = p.generate(PROMPT, max_tokens=10, temperature=0, tau=1e9, verify=True)
        assert got == p.large.generate(PROMPT, max_tokens=10, temperature=0) and got
        assert p.last_stats.finish_reason == "length"


def test_verify_sampling_follows_the_large_models_distribution(pair):
    # one token, drafted by the small model and checked by the large: accepted with probability
    # min(1, p/q), else redrawn from the residual, it must be distributed as the large model's
    from edgekv.sampling import distribution as _distribution
    from edgekv.sampling import SamplingParams

    ids = pair.tokenize(PROMPT)
    params = SamplingParams(temperature=1.5, top_k=4, top_p=1.0)
    idx, p = _distribution(pair.large.logits(ids)[-1], params)
    q_idx, _ = _distribution(pair.small.logits(ids)[-1], params)
    assert set(idx.tolist()) != set(q_idx.tolist())  # the two models disagree here
    n = 400
    counts = dict.fromkeys(idx.tolist(), 0)
    for seed in range(n):
        pair.generate(ids, max_tokens=1, temperature=1.5, top_k=4, top_p=1.0, seed=seed, tau=1e9, verify=True)
        tok = pair.last_stats.tokens[0]
        assert tok in counts
        counts[tok] += 1
    chi2 = sum((counts[t] - n * pk) ** 2 / (n * pk) for t, pk in zip(idx.tolist(), p))
    assert chi2 < 16.3, (counts, p)  # df 3, p = 0.001


def test_verify_sampling_accepts_a_model_checking_itself(pair_paths):
    small = edgekv.Model(pair_paths[0], threads=THREADS)
    twin = edgekv.Model(pair_paths[0], threads=THREADS)
    with edgekv.ModelPair(small, twin) as p:
        p.generate(PROMPT, max_tokens=30, temperature=1.0, seed=3, tau=1e9, verify=True, max_draft=7)
        st = p.last_stats
        assert st.checked_tokens == 30 and st.rejected_tokens == 0 and st.small_tokens == 30


# --------------------------------------------------------------------------------------------
# pairing errors
# --------------------------------------------------------------------------------------------

def test_mismatched_tokenizers_are_refused(tiny_path, pair_paths):
    other_arch = tiny_path("llama", "Q8_0", size="large")
    with pytest.raises(edgekv.TokenizerError, match="tokenizers differ.*pre-tokenizer"):
        edgekv.load_pair(pair_paths[0], other_arch, threads=THREADS, progress=False)
    fewer_merges = tiny_path("qwen2", "Q8_0", size="large", vocab=make_vocab("qwen2", n_merges=100))
    with pytest.raises(edgekv.TokenizerError, match="cannot be paired"):
        edgekv.load_pair(pair_paths[0], fewer_merges, threads=THREADS, progress=False)


def test_different_special_tokens_are_refused(pair_paths, tmp_path):
    vocab = make_vocab("qwen2")
    other_eos = write_tiny_model(tmp_path / "eos.gguf", arch="qwen2", size="large", vocab=vocab,
                                 extra_metadata={"tokenizer.ggml.eos_token_id": vocab.special_id("<|im_start|>")})
    with pytest.raises(edgekv.TokenizerError, match="eos id differs"):
        edgekv.load_pair(pair_paths[0], other_eos, threads=THREADS, progress=False)


def test_missing_large_model_is_a_clear_error(pair_paths, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEKV_CACHE", str(tmp_path / "cache"))
    with pytest.raises(edgekv.ModelNotFoundError, match="large model: model file not found"):
        edgekv.load_pair(pair_paths[0], tmp_path / "nope.gguf", progress=False)
    with pytest.raises(edgekv.ModelNotFoundError, match="large model: 'no-such-model' is neither"):
        edgekv.load_pair(pair_paths[0], "no-such-model", progress=False)
    with pytest.raises(edgekv.ModelNotFoundError, match="small \\(draft\\) model"):
        edgekv.load_pair(tmp_path / "nope.gguf", pair_paths[1], progress=False)


def test_one_model_cannot_pair_with_itself(pair_paths):
    with edgekv.Model(pair_paths[0], threads=THREADS) as m:
        with pytest.raises(ValueError, match="two Model objects"):
            edgekv.ModelPair(m, m)


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------



def test_cli_generate_with_draft(capsys, offline_cache, pair_paths):
    small, large = pair_paths
    common = ["generate", PROMPT, "--draft", small, "--model", large, "--max-tokens", "16",
              "--temperature", "0", "--threads", "1", "--tau", "2.5", "--window", "2", "--d-min", "2"]
    rc, out, err = run_cli(capsys, *common)
    assert rc == 0, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "% large" in lines[0] and "switches" in lines[0] and "compute" in lines[0]
    rc, out_json, err = run_cli(capsys, *common, "--json")
    assert rc == 0, err
    doc = json.loads(out_json)
    # the streamed text is the JSON text, plus the newline the CLI adds to end the line
    assert doc["text"].strip(), doc
    assert out == doc["text"] + ("" if doc["text"].endswith("\n") else "\n")
    assert doc["draft"] == str(small) and doc["ead"]["tau"] == 2.5 and doc["ead"]["d_min"] == 2
    s = doc["stats"]
    assert s["generated_tokens"] == 16 == s["small_tokens"] + s["large_tokens"]
    assert 0 <= s["large_share"] <= 1 and s["relative_compute"] > 0


def test_cli_verify_matches_the_large_model(capsys, offline_cache, pair_paths):
    small, large = pair_paths
    base = ["generate", PROMPT, "--model", large, "--max-tokens", "20", "--temperature", "0", "--json"]
    rc, want, err = run_cli(capsys, *base)
    assert rc == 0, err
    rc, got, err = run_cli(capsys, *base, "--draft", small, "--verify", "--max-draft", "4", "--tau", "2.5")
    assert rc == 0, err
    assert json.loads(got)["text"] == json.loads(want)["text"]
    assert json.loads(got)["stats"]["verifications"] >= 1


@pytest.mark.parametrize("argv, needle", [
    (["--tau", "2"], "--tau needs --draft"),
    (["--verify"], "--verify needs --draft"),
    (["--draft", "SMALL", "--max-draft", "3"], "--max-draft needs --verify"),
    (["--draft", "SMALL", "--verify-window", "3"], "--verify-window needs --verify"),
    (["--draft", "SMALL", "--tau", "1", "--tau-low", "2"], "tau_low"),
])
def test_cli_ead_flag_errors(capsys, offline_cache, pair_paths, argv, needle):
    argv = [pair_paths[0] if a == "SMALL" else a for a in argv]
    rc, out, err = run_cli(capsys, "generate", "hi", "--model", pair_paths[1], *argv)
    assert rc == 2 and err.startswith("edgekv: error: ") and needle in err, err


def test_cli_pair_errors_are_clean(capsys, offline_cache, pair_paths, tiny_path, tmp_path):
    rc, _, err = run_cli(capsys, "generate", "hi", "--draft", pair_paths[0], "--model", tmp_path / "none.gguf")
    assert rc == 2 and err.startswith("edgekv: error: large model: ") and "Traceback" not in err, err
    rc, _, err = run_cli(capsys, "generate", "hi", "--draft", pair_paths[0],
                         "--model", tiny_path("llama", "Q8_0", size="large"))
    assert rc == 2 and "tokenizers differ" in err and "Traceback" not in err, err


def test_cli_draft_takes_the_kv_policy(capsys, offline_cache, pair_paths, monkeypatch):
    from edgekv import ead

    seen = []
    real = ead.load_pair

    def spy(*args, **kw):
        seen.append(kw.get("kv"))
        return real(*args, **kw)

    monkeypatch.setattr(ead, "load_pair", spy)
    small, large = pair_paths
    rc, out, err = run_cli(capsys, "generate", "hi", "--draft", small, "--model", large, "--kv", "int4",
                           "--max-tokens", "4", "--temperature", "0", "--threads", "1")
    assert rc == 0, err
    assert seen == ["int4"]  # --kv was once dropped silently with --draft
    rc, _, err = run_cli(capsys, "generate", "hi", "--draft", small, "--model", large, "--kv-window", "4")
    assert rc == 2 and "--kv-window and --kv-fit-grid do not apply with --draft" in err, err
