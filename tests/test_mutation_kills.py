"""Tests written because a mutant of tools/mutation_check.py survived the suite.

Sampling (python/edgekv/sampling.py): nothing checked which tokens top-k and top-p keep, so a
sampler that ignored top_p, or kept k + 1 tokens, passed every test. These belong in a
tests/test_sampling.py (the module has no test file of its own).
"""

from __future__ import annotations

import numpy as np
import pytest

from edgekv.sampling import Sampler, SamplingParams, distribution


def reference_distribution(logits, temperature, top_k, top_p):
    """The textbook rule, written independently: softmax at the temperature, the k most likely
    tokens, then the smallest most-likely-first prefix whose probability reaches top_p."""
    z = np.asarray(logits, np.float64) / temperature
    order = sorted(range(z.size), key=lambda i: (-z[i], i))
    if top_k:
        order = order[:top_k]
    p = np.exp(z[order] - z[order].max())
    p /= p.sum()
    keep, acc = len(order), 0.0
    for i, x in enumerate(p):
        acc += x
        if acc >= top_p:
            keep = i + 1
            break
    kept = p[:keep] / p[:keep].sum()
    return dict(zip(order[:keep], kept))


def as_dict(dist):
    idx, probs = dist
    return {int(i): float(p) for i, p in zip(idx, probs)}


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    logits = np.log([0.5, 0.3, 0.15, 0.05])
    d = as_dict(distribution(logits, SamplingParams(temperature=1.0, top_k=0, top_p=0.7)))
    assert set(d) == {0, 1}
    assert d[0] == pytest.approx(0.5 / 0.8) and d[1] == pytest.approx(0.3 / 0.8)
    assert set(as_dict(distribution(logits, SamplingParams(temperature=1.0, top_k=0, top_p=0.4)))) == {0}
    assert set(as_dict(distribution(logits, SamplingParams(temperature=1.0, top_k=0, top_p=1.0)))) == {0, 1, 2, 3}


def test_top_k_keeps_exactly_k_tokens():
    logits = np.array([0.1, 2.0, -1.0, 1.5, 0.7, 3.0])
    for k in (1, 2, 3, 5):
        d = as_dict(distribution(logits, SamplingParams(temperature=1.0, top_k=k, top_p=1.0)))
        assert set(d) == set(np.argsort(-logits)[:k].tolist()), k


@pytest.mark.parametrize("seed", range(20))
def test_top_k_and_top_p_match_the_textbook_rule(seed):
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 2, size=int(rng.integers(2, 200)))
    temperature = float(rng.choice([0.5, 1.0, 1.7]))
    top_k = int(rng.choice([0, 1, 5, 40]))
    top_p = float(rng.choice([0.3, 0.9, 0.95, 1.0]))
    got = as_dict(distribution(logits, SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)))
    want = reference_distribution(logits, temperature, top_k, top_p)
    assert set(got) == set(want)
    for i, p in want.items():
        assert got[i] == pytest.approx(p, rel=1e-9, abs=1e-12)


def test_sampler_draws_only_kept_tokens():
    logits = np.log([0.45, 0.35, 0.15, 0.05])
    top_p = Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=0.75, seed=3))
    assert {top_p(logits) for _ in range(400)} == {0, 1}
    top_k = Sampler(SamplingParams(temperature=1.0, top_k=3, top_p=1.0, seed=3))
    assert {top_k(logits) for _ in range(400)} == {0, 1, 2}


# ---- tokenizer (python/edgekv/tokenizer.py): the GPT-2 pre-tokenizer's whitespace rule ------------
# Without llama.cpp and the cached SmolLM2 the parity tests skip, and no test of the tiny tokenizer
# looked at runs of spaces: dropping the \s+(?!\S) branch survived. Belongs in tests/test_tokenizer.py
# next to test_qwen2_regex_keeps_newline_runs_and_single_digits.

@pytest.mark.parametrize("pre", ["smollm", "gpt2"])
def test_gpt2_pre_tokenizer_leaves_the_last_space_to_the_next_word(pre):
    from edgekv.tokenizer import PRE_TOKENIZERS

    pt = PRE_TOKENIZERS[pre].build()
    # GPT-2: a run of n spaces before a word is n - 1 spaces, then the word with its space
    assert [p for p, _ in pt.pre_tokenize_str("a  b   c")] == ["a", "Ġ", "Ġb", "ĠĠ", "Ġc"]
    assert [p for p, _ in pt.pre_tokenize_str("x   ")] == ["x", "ĠĠĠ"]
