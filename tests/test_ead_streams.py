"""An EAD stream (ModelPair.generate(stream=True)) shares its two models as Model's stream does.

While it is suspended between tokens, calls on either model from other threads run (they
used to wait forever for the stream's locks), the stream then continues with the text it
would have produced undisturbed, and close() of either model returns and makes the stream's
next token raise ModelClosedError. Every cross-thread call runs under a timeout, so a
regression fails instead of hanging the suite.
"""

from __future__ import annotations


import pytest

import edgekv
from edgekv import ModelClosedError
from edgekv.ead import LARGE, SMALL

from conftest import THREADS, in_thread

PROMPT = "Once upon a time there was"
OTHER = "Hello there"
N = 24
# A pure function of the position: switches every 3 tokens, so both models write and each
# switch makes a model catch up on the other's tokens (batches of several tokens).
KW = dict(max_tokens=N, temperature=0, tau=2.0, window=1, d_min=1,
          entropy_fn=lambda role, logits, pos: 3.0 if (pos // 3) % 2 == 0 else 0.0)
# Quantized KV: a cache rebuilt any other way than the stream built it (say, its sequence run
# again in one batch, which sees its keys at 16 bits) changes these tiny models' greedy text.
KV = "int3"
MODES = {"plain": {}, "verify": dict(verify=True, max_draft=4)}


@pytest.fixture(scope="module")
def pair(tiny_path):
    """A fresh pair of tiny qwen2 models (KV int3) sharing a tokenizer (end tokens biased away: never end)."""
    kw = dict(tie_embeddings=False, special_logit_bias=-8.0)
    p = edgekv.load_pair(tiny_path("qwen2", "Q8_0", size="small", seed=1, **kw),
                         tiny_path("qwen2", "Q8_0", size="large", seed=11, **kw),
                         threads=THREADS, progress=False, kv=KV)
    yield p
    p.close()


@pytest.mark.parametrize("mode", sorted(MODES))
def test_a_suspended_ead_stream_does_not_block_other_threads(pair, mode):
    kw = dict(KW, **MODES[mode])
    pair.reset()  # every EAD run below starts from empty caches, as this one
    want = pair.generate(PROMPT, **kw)
    st = pair.last_stats
    assert st.small_evaluated > 0 and st.large_evaluated > 0 and st.switches >= 4
    if mode == "verify":  # the large model checks drafts: LOGITS_ALL batches and truncations
        assert st.verifications >= 2 and st.rejected_tokens > 0
    else:
        assert st.small_tokens > 0 and st.large_tokens > 0
    want_small = pair.small.generate(OTHER, max_tokens=8, temperature=0)
    want_large = pair.large.generate(OTHER, max_tokens=8, temperature=0)
    want_logits = pair.large.logits([1, 2, 3])
    calls = [  # another thread's calls on either model, made while the stream is suspended
        ("small.generate", lambda: pair.small.generate(OTHER, max_tokens=8, temperature=0), want_small),
        ("large.generate", lambda: pair.large.generate(OTHER, max_tokens=8, temperature=0), want_large),
        ("large.logits", lambda: pair.large.logits([1, 2, 3]), want_logits),
        ("small.reset", pair.small.reset, None),
    ]
    pair.reset()
    it = pair.generate(PROMPT, stream=True, **kw)
    try:
        got = ""
        for name, call, expected in calls:
            got += next(it)  # the stream is suspended here, never resumed by the other thread
            done, value = in_thread(call, timeout=20.0)
            assert done, f"{name}() from another thread hung behind a suspended EAD stream"
            if expected is None:
                assert value is None, value
            elif isinstance(expected, str):
                assert value == expected, name
            else:
                assert value.shape == expected.shape and (value == expected).all(), name
        got += "".join(it)
        # the stream restored both caches and wrote what it writes undisturbed
        assert got == want
        assert pair.last_stats.tokens == st.tokens and pair.last_stats.sources == st.sources
    finally:
        it.close()  # with the old locks, this releases a hung thread


def test_another_ead_stream_runs_between_tokens(pair):
    pair.reset()
    want = pair.generate(PROMPT, **KW)
    pair.reset()
    it = pair.generate(PROMPT, stream=True, **KW)
    try:
        got = next(it)
        done, other = in_thread(lambda: pair.generate(OTHER, **KW))
        assert done, "an EAD generate() from another thread hung behind a suspended EAD stream"
        assert isinstance(other, str) and other
        got += "".join(it)
        assert got == want
    finally:
        it.close()


@pytest.mark.parametrize("role", [SMALL, LARGE])
def test_closing_either_model_under_a_suspended_ead_stream(tiny_path, role):
    kw = dict(tie_embeddings=False, special_logit_bias=-8.0)
    p = edgekv.load_pair(tiny_path("qwen2", "Q8_0", size="small", seed=1, **kw),
                         tiny_path("qwen2", "Q8_0", size="large", seed=11, **kw),
                         threads=THREADS, progress=False, kv=KV)
    it = p.generate(PROMPT, stream=True, **KW)
    try:
        assert next(it)
        m = p.model(role)
        done, value = in_thread(m.close)
        assert done, f"close() of the {role} model hung behind a suspended EAD stream"
        assert value is None and m.closed
        with pytest.raises(ModelClosedError):
            next(it)
        # the other model is free again: the ended stream holds nothing
        other = p.model(LARGE if role == SMALL else SMALL)
        done, value = in_thread(lambda: other.generate(OTHER, max_tokens=4, temperature=0))
        assert done and isinstance(value, str), value
    finally:
        it.close()
        p.close()
