"""Integration test: edgekv against llama.cpp (llama-cpp-python) on real models, SmolLM2-135M
(Q4_1, llama) and Qwen2.5-Coder-0.5B (qwen2), the same GGUF file for both engines.

* token ids identical to llama.cpp's ``tokenize(text.encode(), add_bos=False, special=True)`` on
  texts with special tokens, digits, unicode and whitespace runs;
* logits of one 256-token window of WikiText-2 (``tests/data``) against llama.cpp with
  ``logits_all=True`` (f16 K/V): mean KL(llama || edgekv) < 0.01 nats, top-1 agreement >= 0.9,
  perplexity of the window within 1.5%, and at every position where the two argmaxes differ the
  choice must be a near tie for llama.cpp (its logit for edgekv's token within ARGMAX_TIE of its
  own maximum).

The models come through the registry (``EDGEKV_CACHE``); a missing model or reference skips, or
fails under EDGEKV_REQUIRE_REFERENCE=1 (see conftest.py). About a minute on two cores.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import registry_model

import edgekv

MODELS = ["smollm2-135m", "qwen2.5-coder-0.5b"]
WINDOW = 256
ARGMAX_TIE = 0.5  # logits (nats): a disagreement is tolerated only inside this margin
MAX_MEAN_KL = 0.01  # nats; benchmarks/results/parity*.md measure 0.0034 (SmolLM2) and 0.0013 (Qwen)
MAX_PPL_REL_DIFF = 0.015

TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
    "<|im_start|>assistant\n",
    "<|endoftext|>plain text after an end token<|endoftext|>",
    "Digits: 0 7 42 123 1234 12345 3.14159 -273.15 1,000,000 2024-01-31 0x1F 1e-5",
    "Unicode: café naïve Ünïcödé — “quotes” ‘single’ … 日本語のテキスト 中文 한국어 Ελληνικά русский 🙂👍🏽 ∑∫√",
    "  leading spaces,\ttabs\t\tand\n\n\nnewlines   trailing   ",
    "def f(x):\n    return x ** 2  # comment\n\nprint(f(3))\n",
    "I'm sure they'll say we've done it, isn't it? DON'T SHOUT. 's 't 're",
    " = Robert Boulter = \n Robert Boulter is an English film and television actor . @-@ 1 @,@ 000 <unk> ",
]


@pytest.fixture(scope="module", params=MODELS)
def engines(request, llama_cpp):
    path = str(registry_model(request.param))
    model = edgekv.load(path, threads=2, ctx=WINDOW, n_batch=256, progress=False)
    llm = llama_cpp.Llama(
        model_path=path, n_ctx=WINDOW, n_batch=WINDOW, n_ubatch=WINDOW, n_threads=2,
        n_threads_batch=2, logits_all=True, verbose=False, flash_attn=False,
        type_k=llama_cpp.GGML_TYPE_F16, type_v=llama_cpp.GGML_TYPE_F16,
    )
    yield model, llm
    model.close()
    llm.close()


@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
def test_token_ids_match_llama(engines, text):
    model, llm = engines
    expected = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
    assert model.tokenize(text) == expected


def _window_ids(llm, text: str) -> list[int]:
    ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
    assert len(ids) >= WINDOW
    return ids[:WINDOW]


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - (m + np.log(np.exp(x - m).sum(axis=-1, keepdims=True)))


def test_logits_match_llama(engines, text_excerpt):
    model, llm = engines
    ids = _window_ids(llm, text_excerpt)
    ek = model.logits(ids)
    llm.reset()
    llm.eval(ids)
    ll = np.array(llm.scores[: len(ids)], dtype=np.float32)
    assert ek.shape == ll.shape == (WINDOW, model.vocab_size)
    assert np.isfinite(ek).all()

    lp, lq = _log_softmax(ll), _log_softmax(ek)
    kl = (np.exp(lp) * (lp - lq)).sum(axis=-1)
    a_ll, a_ek = ll.argmax(-1), ek.argmax(-1)
    top1 = float((a_ll == a_ek).mean())
    assert kl.mean() < MAX_MEAN_KL, f"mean KL(llama || edgekv) = {kl.mean():.5f} nats (max {kl.max():.4f} at {kl.argmax()})"
    assert top1 >= 0.9, f"top-1 agreement {top1:.3f}"
    # perplexity of the window's own next tokens: catches a logit scale that KL on near-flat rows misses
    pos, nxt = np.arange(len(ids) - 1), np.asarray(ids[1:])
    ppl_ll = float(np.exp(-lp[pos, nxt].mean()))
    ppl_ek = float(np.exp(-lq[pos, nxt].mean()))
    assert abs(ppl_ek / ppl_ll - 1) < MAX_PPL_REL_DIFF, f"perplexity edgekv {ppl_ek:.4f} vs llama.cpp {ppl_ll:.4f}"

    # per position: a different argmax is acceptable only where llama.cpp itself is torn
    rows = np.arange(len(ids))
    gap = ll[rows, a_ll] - ll[rows, a_ek]
    bad = np.flatnonzero((a_ll != a_ek) & (gap > ARGMAX_TIE))
    assert bad.size == 0, (
        f"argmax differs beyond a near tie at positions {bad[:10].tolist()}: llama {a_ll[bad[:10]].tolist()} "
        f"vs edgekv {a_ek[bad[:10]].tolist()}, llama logit gaps {np.round(gap[bad[:10]], 3).tolist()}"
    )
