"""Long runs and concurrency: memory stays flat over 8,192 generated tokens, two models on two
threads give the tokens they give one after the other, and a closed model raises instead of
touching freed C memory.

All on the tiny generated models (seconds, not minutes).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

import edgekv
from conftest import subprocess_env, write_tiny_model
from edgekv import ModelClosedError

LONG_TOKENS = 8192
WARMUP_TOKENS = 512
# Growth of the resident set beyond what the KV cache itself holds, per generated token, over
# the 7,680 tokens after warm-up. What legitimately grows: the Python lists of token ids the model
# and the stream keep (~80 bytes a token) and page-granular rounding of the KV pools. A leak of
# one logits row per step would be n_vocab * 4 = 1.5 KB a token.
MAX_EXTRA_BYTES_PER_TOKEN = 512


# The measurement runs in a fresh process: in the test process the heap holds free pages (and
# other tests' threads and garbage) that make its resident set move by megabytes for reasons that
# have nothing to do with the generation being measured.
LONG_RUN = textwrap.dedent(
    """
    import json, os, sys
    import edgekv

    def rss_bytes():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    path, kv, n_tokens, warmup = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    with edgekv.Model(path, threads=1, ctx=n_tokens + 64, kv=kv) as m:
        prompt = m.tokenize("Once upon a time")
        it = m.generate(prompt, max_tokens=n_tokens, temperature=0.9, seed=3, stream=True)
        rss0 = kv0 = n0 = None
        for _ in it:
            if rss0 is None and m.n_past >= len(prompt) + warmup:
                rss0, kv0, n0 = rss_bytes(), m.kv_bytes, m.n_past
        rss1, kv1, n1 = rss_bytes(), m.kv_bytes, m.n_past
        st = m.last_stats
    print(json.dumps({"rss0": rss0, "kv0": kv0, "n0": n0, "rss1": rss1, "kv1": kv1, "n1": n1,
                      "generated_tokens": st.generated_tokens, "finish_reason": st.finish_reason,
                      "decode_ms_per_token": st.decode_ms_per_token}))
    """
)


@pytest.fixture(scope="module")
def endless_model(tmp_path_factory):
    """A tiny model that never ends its turn (end tokens pushed far down), trained context 8,448."""
    return write_tiny_model(tmp_path_factory.mktemp("long") / "endless.gguf", arch="llama", weight_type="Q8_0",
                            tie_embeddings=False, special_logit_bias=-20.0, context_length=LONG_TOKENS + 256)


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="RSS is read from /proc")
@pytest.mark.parametrize("kv", ["fp16", "k4v2"])
def test_8192_tokens_keep_memory_flat_beyond_the_kv_cache(endless_model, kv):
    proc = subprocess.run([sys.executable, "-c", LONG_RUN, str(endless_model), kv, str(LONG_TOKENS),
                           str(WARMUP_TOKENS)], env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["generated_tokens"] == LONG_TOKENS, r
    assert r["finish_reason"] == "length", r
    assert r["rss0"] is not None
    tokens = r["n1"] - r["n0"]
    extra = (r["rss1"] - r["rss0"]) - (r["kv1"] - r["kv0"])
    per_token = extra / tokens
    print(f"\nkv={kv}: {tokens} tokens after warm-up: RSS +{(r['rss1'] - r['rss0']) / 1024:.0f} KiB, KV cache "
          f"+{(r['kv1'] - r['kv0']) / 1024:.0f} KiB, beyond the cache {per_token:+.1f} bytes/token; "
          f"{r['decode_ms_per_token']:.3f} ms/token")
    assert per_token <= MAX_EXTRA_BYTES_PER_TOKEN, (
        f"memory grows {per_token:.0f} bytes per token beyond the KV cache "
        f"(RSS +{r['rss1'] - r['rss0']} B, KV +{r['kv1'] - r['kv0']} B over {tokens} tokens)"
    )


# ---------------------------------------------------------------------------------------------
# concurrency
# ---------------------------------------------------------------------------------------------

CALLS = [  # (prompt, generate kwargs): greedy and seeded sampling, and logits
    ("The quick brown fox", dict(max_tokens=48, temperature=0)),
    ("Hello, world!", dict(max_tokens=48, temperature=0.8, seed=7)),
    ("What is the capital of France?", dict(max_tokens=32, temperature=1.0, top_k=0, top_p=0.9, seed=11)),
]


def run_calls(model) -> list:
    out = []
    for prompt, kw in CALLS:
        out.append(model.generate(prompt, **kw))
        out.append(model.logits(model.tokenize(prompt)).astype(np.float64).sum())
    return out


@pytest.fixture(scope="module")
def two_model_paths(tmp_path_factory):
    d = tmp_path_factory.mktemp("conc")
    return (write_tiny_model(d / "a.gguf", arch="llama", weight_type="Q4_0", tie_embeddings=False, seed=1),
            write_tiny_model(d / "b.gguf", arch="qwen2", weight_type="Q8_0", tie_embeddings=False, seed=2,
                             size="large"))


def run_in_threads(fns) -> list:
    results = [None] * len(fns)
    errors = []
    barrier = threading.Barrier(len(fns))

    def work(i, fn):
        try:
            barrier.wait()
            results[i] = fn()
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i, fn)) for i, fn in enumerate(fns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a thread did not finish"
    assert not errors, errors
    return results


@pytest.mark.parametrize("threads", [1, 2])
def test_two_models_on_two_threads_match_sequential_runs(two_model_paths, threads):
    a_path, b_path = two_model_paths
    with edgekv.Model(a_path, threads=threads) as a, edgekv.Model(b_path, threads=threads) as b:
        want_a, want_b = run_calls(a), run_calls(b)
        for _ in range(3):
            got_a, got_b = run_in_threads([lambda: run_calls(a), lambda: run_calls(b)])
            assert got_a == want_a
            assert got_b == want_b
    # and models used from threads give what fresh models give
    with edgekv.Model(a_path, threads=1) as fresh:
        assert run_calls(fresh) == want_a


def test_one_model_shared_by_two_threads_takes_turns(two_model_paths):
    """Calls on one Model are serialized by its lock: each thread gets what it would get alone."""
    with edgekv.Model(two_model_paths[0], threads=2) as m:
        want = run_calls(m)
        got = run_in_threads([lambda: run_calls(m)] * 3)
        assert got == [want] * 3


def test_streams_from_two_threads_on_one_model(two_model_paths):
    """Two threads each draining a stream of the same model: a stream holds the model until it
    is done, so the other thread waits, and both get the full text they would get alone."""
    with edgekv.Model(two_model_paths[1], threads=1) as m:
        want = [m.generate(p, **kw) for p, kw in CALLS]

        def drain(i):
            p, kw = CALLS[i]
            return "".join(m.generate(p, stream=True, **kw))

        got = run_in_threads([lambda: drain(0), lambda: drain(1), lambda: drain(2)])
        assert got == want


def test_close_from_another_thread_waits_for_the_running_call(two_model_paths):
    m = edgekv.Model(two_model_paths[1], threads=1)
    want = m.generate("Once upon a time", max_tokens=200, temperature=0)
    started = threading.Event()
    result = {}

    def gen():
        it = m.generate("Once upon a time", max_tokens=200, temperature=0, stream=True)
        first = next(it)  # the stream now holds the model
        started.set()
        result["text"] = first + "".join(it)

    t = threading.Thread(target=gen)
    t.start()
    assert started.wait(60)
    m.close()  # takes the model's lock: returns once the stream has finished
    t.join(60)
    assert result.get("text") == want
    assert m.closed
    with pytest.raises(ModelClosedError):
        m.generate("Once upon a time", max_tokens=2)


# ---------------------------------------------------------------------------------------------
# use after close (in a child: a use of freed C memory may kill the process)
# ---------------------------------------------------------------------------------------------

AFTER_CLOSE = textwrap.dedent(
    """
    import sys, edgekv
    m = edgekv.Model(sys.argv[1], threads=1, ctx=int(sys.argv[2]))
    m.generate("hello there", max_tokens=4, temperature=0)
    suspended = m.generate("hello", max_tokens=8, temperature=0, stream=True)
    next(suspended)  # a stream started, then left suspended across close()
    m.close()
    m.close()  # closing twice is fine
    calls = {
        "features": lambda: m.features([0, 1]),
        "score": lambda: m.score("hello", " there"),
        "kv_bits": lambda: m.kv_bits(),
        "kv_avg_bits": lambda: m.kv_avg_bits,
        "logits": lambda: m.logits([1, 2]),
        "generate": lambda: m.generate("hi", max_tokens=2),
        "reset": lambda: m.reset(),
        "info": lambda: m.info(),
        "suspended stream": lambda: list(suspended),
    }
    for name, call in calls.items():
        print("TRYING", name, flush=True)
        try:
            call()
            print("NO-ERROR", name, flush=True)
        except edgekv.ModelClosedError:
            print("CLOSED", name, flush=True)
        except BaseException as e:
            print("OTHER", name, type(e).__name__, e, flush=True)
    print("DONE", flush=True)
    """
)


def run_after_close(path, ctx: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", AFTER_CLOSE, str(path), str(ctx)], env=subprocess_env(),
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("ctx", [256, 65536])  # 65536: the C statistics arrays are mmap'ed, freed by munmap
def test_every_call_after_close_raises_model_closed(two_model_paths, ctx):
    proc = run_after_close(two_model_paths[0], ctx)
    tried = [ln for ln in proc.stdout.splitlines() if ln.startswith("TRYING")]
    assert proc.returncode == 0, (
        f"child died (rc {proc.returncode}) on: {tried[-1] if tried else '?'}\n{proc.stderr[-2000:]}"
    )
    bad = [ln for ln in proc.stdout.splitlines() if ln.startswith(("NO-ERROR", "OTHER"))]
    assert not bad, proc.stdout
    assert "DONE" in proc.stdout


