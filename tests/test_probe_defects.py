"""Defects a reliability probe found that the rest of the suite missed (issue 17), one test each:

- the same call must give the same answer whatever ran on the model before it;
- a suspended stream must not block other threads' calls (nor close()) forever;
- `edgekv chat` / `edgekv generate -` with stdin closed: a clear error, not a traceback;
- a chat template that is not UTF-8 is refused, not rendered as an error message;
- clear errors for seed=-1, empty texts, content=None, infeasible adaptive targets, too many
  threads, and GGUF files whose header no longer matches their tensors.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import warnings

import numpy as np
import pytest

import edgekv
from conftest import THREADS, in_thread, subprocess_env
from edgekv import ModelClosedError, ModelLoadError, TokenizerError
from edgekv.kv_policy import parse_policy

PROMPT = "The sky is"
# Every policy of the README's KV table (RandomPolicy and callables have no fixed answer).
README_POLICIES = ["fp16", "int8", "int4", "k4v3", "k4v2", "int3", "int2", "sink:int3", "adaptive@3.5"]


# ---------------------------------------------------------------------------------------------
# the same call, the same answer
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    with edgekv.Model(smollm2_path, threads=THREADS, ctx=64) as m:
        yield m


@pytest.mark.parametrize("name", README_POLICIES)
def test_same_call_same_answer_under_every_policy(smollm2, name):
    """Greedy, twice in a row, after an abandoned stream, and after a stream that another call
    interrupted and that then resumed: the same text as the first, fresh call (the policy
    object is kept, so the calls may reuse the cache; a new policy would start afresh)."""
    m, policy = smollm2, parse_policy(name)
    kw = dict(max_tokens=10, temperature=0, kv=policy)
    first = m.generate(PROMPT, **kw)
    assert m.last_stats.prefilled_tokens == m.last_stats.prompt_tokens  # fresh: the policy is new
    assert m.generate(PROMPT, **kw) == first, f"{name}: the second call differs"
    it = m.generate(PROMPT, stream=True, **kw)
    next(it), next(it)
    it.close()  # abandoned after two pieces
    assert m.generate(PROMPT, **kw) == first, f"{name}: a call after an abandoned stream differs"
    it = m.generate(PROMPT, stream=True, **kw)
    head = next(it) + next(it)
    other = m.generate("Once upon a time", **kw)  # uses the cache while the stream is suspended
    assert head + "".join(it) == first, f"{name}: a resumed stream differs"
    assert m.generate(PROMPT, **kw) == first, f"{name}: a call after a resumed stream differs"
    assert m.generate("Once upon a time", **kw) == other


@pytest.mark.parametrize("name", ["fp16", "int4", "sink:int3"])
def test_seeded_sampling_repeats(smollm2, name):
    m, policy = smollm2, parse_policy(name)
    kw = dict(max_tokens=10, temperature=0.9, top_k=0, top_p=1.0, seed=11, kv=policy)
    first = m.generate(PROMPT, **kw)
    assert m.generate(PROMPT, **kw) == first
    it = m.generate(PROMPT, stream=True, **kw)
    next(it)
    it.close()
    assert m.generate(PROMPT, **kw) == first


@pytest.mark.parametrize("name", ["fp16", "int4", "int2", "adaptive@3.5"])
def test_score_is_a_function_of_its_arguments(smollm2, name):
    """score() after generate() on the same text, twice in a row, and with another ending of
    the same context (how HellaSwag is scored: the context's prefill is reused) equals a
    fresh score()."""
    m, policy = smollm2, parse_policy(name)
    a, b = " blue and the sun is shining", " a canvas"
    fresh_b = m.score(PROMPT, b, kv=parse_policy(name))
    fresh_a = m.score(PROMPT, a, kv=policy)  # first call under this policy object
    m.generate(PROMPT, max_tokens=6, temperature=0, kv=policy)
    np.testing.assert_array_equal(m.score(PROMPT, a, kv=policy), fresh_a)
    np.testing.assert_array_equal(m.score(PROMPT, a, kv=policy), fresh_a)
    np.testing.assert_array_equal(m.score(PROMPT, b, kv=policy), fresh_b)
    np.testing.assert_array_equal(m.score(PROMPT, a, kv=policy), fresh_a)


def test_prefix_of_a_longer_prompt_is_not_reused_inexactly(smollm2):
    """An fp16 prefix cached by an earlier prompt differs from a fresh pass in float rounding
    (which flipped greedy tokens in chats): a longer prompt must give the fresh model's text."""
    m, policy = smollm2, parse_policy("fp16")
    p1 = "Write a short poem about the sea."
    p2 = p1 + " Make it rhyme, and mention the moon."
    m.generate(p2, max_tokens=1, temperature=0, kv=policy)
    want = m.generate(p2, max_tokens=12, temperature=0, kv=parse_policy("fp16"))  # fresh (new policy)
    m.generate(p1, max_tokens=12, temperature=0, kv=policy)
    assert m.generate(p2, max_tokens=12, temperature=0, kv=policy) == want
    assert m.last_stats.prefilled_tokens == m.last_stats.prompt_tokens


# ---------------------------------------------------------------------------------------------
# a suspended stream does not hang other threads
# ---------------------------------------------------------------------------------------------


def test_a_suspended_stream_does_not_block_other_threads(tiny_path):
    m = edgekv.Model(tiny_path("llama", "Q8_0"), threads=THREADS, kv="int4")
    kw = dict(max_tokens=12, temperature=0)
    want = m.generate("Once upon a time", **kw)
    want_other = m.generate("Hello there", **kw)
    it = m.generate("Once upon a time", stream=True, **kw)
    try:
        head = next(it)  # suspended, held by this thread, never resumed by the others
        done, got = in_thread(lambda: m.generate("Hello there", **kw))
        assert done, "generate() from another thread hung behind a suspended stream"
        assert got == want_other
        done, got = in_thread(lambda: m.logits([1, 2, 3]).shape)
        assert done, "logits() from another thread hung behind a suspended stream"
        assert got == (3, m.vocab_size)
        # the stream goes on with its own text: it re-runs its context
        assert head + "".join(it) == want
        it = m.generate("Once upon a time", stream=True, **kw)
        next(it)
        done, got = in_thread(m.close)
        assert done, "close() from another thread hung behind a suspended stream"
        assert m.closed
        with pytest.raises(ModelClosedError):
            next(it)
    finally:
        it.close()  # with the old lock, this releases a hung thread
        m.close()


# ---------------------------------------------------------------------------------------------
# the CLI with stdin closed
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv", [["chat"], ["generate", "-"]], ids=["chat", "generate-"])
def test_cli_with_stdin_closed(tiny_path, argv):
    cmd = [sys.executable, "-m", "edgekv", *argv, "--model", str(tiny_path("llama", "Q8_0")), "--max-tokens", "2"]
    proc = subprocess.run(cmd, env=subprocess_env(), capture_output=False, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, timeout=120, preexec_fn=lambda: os.close(0))
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "standard input is closed" in proc.stderr, proc.stderr


# ---------------------------------------------------------------------------------------------
# a chat template that is not UTF-8
# ---------------------------------------------------------------------------------------------


def test_chat_template_with_invalid_utf8(tiny_path, tmp_path):
    marker = "@@MARK@@"
    template = "{{ messages[0]['content'] }}" + marker
    src = tiny_path("llama", "Q8_0", extra_metadata=(("tokenizer.chat_template", template),))
    data = src.read_bytes()
    assert data.count(marker.encode()) == 1
    bad = tmp_path / "bad-template.gguf"
    bad.write_bytes(data.replace(marker.encode(), b"\xff\xfe" + marker.encode()[2:]))  # same length
    with edgekv.Model(bad, threads=THREADS) as m:
        m.generate("hello", max_tokens=2, temperature=0)  # plain generation does not need the template
        with pytest.raises(TokenizerError, match=r"tokenizer\.chat_template.*UTF-8"):
            m.chat([{"role": "user", "content": "hi"}], max_tokens=2)


# ---------------------------------------------------------------------------------------------
# clear errors
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tiny_path):
    with edgekv.Model(tiny_path("llama", "Q8_0"), threads=THREADS) as m:
        yield m


@pytest.mark.parametrize("stream", [False, True])
def test_negative_seed_is_refused_at_the_call(tiny, stream):
    with pytest.raises(ValueError, match=r"seed must be an integer >= 0"):
        tiny.generate(PROMPT, max_tokens=2, seed=-1, stream=stream)  # at the call, not at next()


def test_empty_texts_are_named_as_texts(tiny):
    for call, what in ((lambda: tiny.generate("", max_tokens=2), "prompt"),
                       (lambda: tiny.score(PROMPT, ""), "continuation"),
                       (lambda: tiny.score("", " x"), "context")):
        with pytest.raises(ValueError) as e:
            call()
        msg = str(e.value)
        assert what in msg and "empty text" in msg and "token ids" not in msg, msg


def test_chat_content_none_names_the_message(tiny):
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None}, {"role": "user", "content": "x"}]
    with pytest.raises(ValueError, match=r"messages\[1\]\['content'\] must be a string, got None"):
        tiny.chat(msgs, max_tokens=2)


@pytest.mark.parametrize("spec", ["adaptive@1.0", "adaptive@20"])
def test_infeasible_adaptive_targets(tiny_path, tiny, spec):
    with pytest.raises(ValueError, match=r"outside the feasible range \[3, 16\]"):
        edgekv.Model(tiny_path("llama", "Q8_0"), threads=THREADS, kv=spec)
    with pytest.raises(ValueError, match=r"outside the feasible range"):
        tiny.generate(PROMPT, max_tokens=2, kv=spec)


def test_more_threads_than_cpus_warns(tiny_path):
    path = tiny_path("llama", "Q8_0")
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    with pytest.warns(UserWarning, match=rf"threads={cpus + 1} exceeds the {cpus} CPUs"):
        edgekv.Model(path, threads=cpus + 1).close()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        edgekv.Model(path, threads=1).close()


def _tensor_info(data: bytes, name: str) -> tuple[int, int]:
    """Byte positions of the type and of the data offset in the tensor info of name."""
    key = struct.pack("<Q", len(name)) + name.encode()
    at = data.index(key) + len(key)
    n_dims = struct.unpack_from("<I", data, at)[0]
    type_at = at + 4 + 8 * n_dims
    return type_at, type_at + 4


def _edited(src, tmp_path, label: str, edit) -> str:
    data = bytearray(src.read_bytes())
    edit(data)
    p = tmp_path / f"{label}.gguf"
    p.write_bytes(bytes(data))
    return str(p)


GGUF_EDITS = ["block_count=1", "rope.dimension_count=0", "misaligned offset", "Q8_0 -> Q4_0 mid",
              "Q8_0 -> Q4_0 last", "Q8_0 -> F16 mid"]


@pytest.mark.parametrize("what", GGUF_EDITS)
def test_gguf_headers_that_do_not_match_their_tensors(tiny_path, tmp_path, what):
    """Each edit loaded before and ran a network other than the file's (garbage out)."""
    src = tiny_path("llama", "Q8_0")
    mid, last = "blk.0.attn_k.weight", "blk.1.ffn_down.weight"
    data = src.read_bytes()
    assert data.index(last.encode()) > data.index(mid.encode())  # last: the final tensor info

    def add_to_offset(name, delta):
        def edit(d):
            _, off_at = _tensor_info(d, name)
            struct.pack_into("<Q", d, off_at, struct.unpack_from("<Q", d, off_at)[0] + delta)
        return edit

    def set_type(name, ggml_type):
        def edit(d):
            type_at, _ = _tensor_info(d, name)
            struct.pack_into("<I", d, type_at, ggml_type)
        return edit

    cases = {
        "block_count=1": (lambda: tiny_path("llama", "Q8_0", extra_metadata=(("llama.block_count", 1),)),
                          r"'blk\.1\..*' belongs to no layer: llama\.block_count = 1"),
        "rope.dimension_count=0": (lambda: tiny_path("llama", "Q8_0",
                                                     extra_metadata=(("llama.rope.dimension_count", 0),)),
                                   r"rope_dim = 0 \(llama\.rope\.dimension_count\) is out of range"),
        "misaligned offset": (lambda: _edited(src, tmp_path, "misaligned", add_to_offset(mid, 1)),
                              rf"{mid}.*not a multiple of the alignment"),
        "Q8_0 -> Q4_0 mid": (lambda: _edited(src, tmp_path, "q4mid", set_type(mid, 2)),
                             rf"data offset \d+, but the data of '{mid}' \(Q4_0"),
        "Q8_0 -> Q4_0 last": (lambda: _edited(src, tmp_path, "q4last", set_type(last, 2)),
                              rf"follow the data of the last tensor '{last}' \(Q4_0"),
        "Q8_0 -> F16 mid": (lambda: _edited(src, tmp_path, "f16mid", set_type(mid, 1)),
                            rf"data offset \d+, but the data of '{mid}' \(F16"),
    }
    make, pattern = cases[what]
    path = make()
    with pytest.raises(ModelLoadError, match=pattern) as e:
        edgekv.Model(path, threads=THREADS)
    assert str(path) in str(e.value)
