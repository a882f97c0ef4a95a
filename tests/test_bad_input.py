"""Bad input never crashes: every case is a Python exception that names the problem, and a
rejected call leaves the model as it was.

Cases that could crash the process (corrupt files, use after close inside a stream) run in a
child Python: the test asserts the child exits normally (not by a signal) and reports the
expected exception for each case.
"""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import edgekv
from conftest import THREADS, subprocess_env, write_tiny_model
from edgekv import ContextOverflowError, EdgekvError, ModelClosedError, ModelLoadError
from edgekv._native import ffi, lib

PROMPT = "The quick brown fox jumps over the lazy dog."

# Runs in a child: load each file, use it, report what happened as JSON.
LOAD_CHILD = textwrap.dedent(
    """
    import json, sys, warnings
    warnings.simplefilter("ignore")
    import edgekv
    results = []
    for path in sys.argv[1:]:
        print("TRYING", path, flush=True)
        try:
            with edgekv.Model(path, threads=1) as m:
                logits = m.logits(m.tokenize("hello world"))
                m.generate("hi", max_tokens=2, temperature=0)
            results.append([path, "loaded", ""])
        except edgekv.EdgekvError as e:
            results.append([path, type(e).__name__, str(e)])
        except BaseException as e:
            results.append([path, "UNEXPECTED " + type(e).__name__, str(e)])
    print("RESULTS " + json.dumps(results), flush=True)
    """
)


def run_child(code: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-c", code, *args], env=subprocess_env(), capture_output=True, text=True, timeout=timeout
    )
    tried = [ln for ln in proc.stdout.splitlines() if ln.startswith("TRYING")]
    assert proc.returncode == 0, (
        f"child exited with {proc.returncode}"
        + (f" (killed by signal {-proc.returncode})" if proc.returncode < 0 else "")
        + (f" while on: {tried[-1]}" if tried else "")
        + f"\nstderr:\n{proc.stderr[-3000:]}"
    )
    return proc


def load_in_child(paths) -> dict:
    proc = run_child(LOAD_CHILD, *map(str, paths))
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS ")][-1]
    return {p: (kind, msg) for p, kind, msg in json.loads(line[len("RESULTS "):])}


# ---------------------------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.gguf"
    with pytest.raises(ModelLoadError, match="not found") as e:
        edgekv.Model(missing)
    assert str(missing) in str(e.value)


def test_directory(tmp_path):
    with pytest.raises(ModelLoadError, match="not a file") as e:
        edgekv.Model(tmp_path)
    assert str(tmp_path) in str(e.value)


def test_load_of_an_unknown_name():
    with pytest.raises(edgekv.ModelNotFoundError):
        edgekv.load("no-such-model-anywhere-xyz", progress=False)


def gguf_offsets(path) -> dict:
    """Byte offsets of the regions of a GGUF file, from gguf's own reader."""
    from gguf import GGUFReader

    r = GGUFReader(str(path))
    fields = r.fields
    tensors = r.tensors
    return {
        "size": path.stat().st_size,
        "kv_start": fields["general.architecture"].offset,
        "tokens": fields["tokenizer.ggml.tokens"].offset,
        "template": fields["tokenizer.chat_template"].offset,
        "tensor_info": tensors[0].field.offset,
        "tensor_info_mid": tensors[len(tensors) // 2].field.offset,
        "data": min(t.data_offset for t in tensors),
        "last_tensor": max(t.data_offset for t in tensors),
    }


def test_truncated_files(tiny_path, tmp_path):
    src = tiny_path("qwen2", "Q4_0")
    data = src.read_bytes()
    off = gguf_offsets(src)
    cuts = {
        "empty": 0,
        "in the magic": 3,
        "in the header": 10,
        "after the header": 24,
        "in the first key": off["kv_start"] + 5,
        "in the token list": off["tokens"] + 200,
        "in the chat template": off["template"] + 20,
        "in the tensor infos": off["tensor_info"] + 10,
        "mid tensor infos": off["tensor_info_mid"] + 3,
        "at the tensor data": off["data"],
        "in the first tensor": off["data"] + 100,
        "in the last tensor": off["last_tensor"] + 7,
        "one byte short": off["size"] - 1,
    }
    paths = {}
    for what, n in cuts.items():
        assert 0 <= n < len(data)
        p = tmp_path / f"cut{n}.gguf"
        p.write_bytes(data[:n])
        paths[str(p)] = what
    results = load_in_child(paths)
    for p, what in paths.items():
        kind, msg = results[p]
        assert kind == "ModelLoadError", f"truncated {what}: {kind} {msg}"
        assert p in msg, f"truncated {what}: the message does not name the file: {msg}"
        assert "GGUF" in msg or "truncated" in msg, f"truncated {what}: unclear message: {msg}"


def test_random_header_bytes(tiny_path, tmp_path):
    src = tiny_path("llama", "Q8_0")
    data = bytearray(src.read_bytes())
    rng = random.Random(1234)
    paths = []
    for i, n in enumerate([4, 8, 24, 24, 64, 64, 256]):
        d = bytearray(data)
        d[:n] = bytes(rng.randrange(256) for _ in range(n))
        p = tmp_path / f"rand{i}.gguf"
        p.write_bytes(bytes(d))
        paths.append(p)
    noise = tmp_path / "noise.gguf"
    noise.write_bytes(bytes(rng.randrange(256) for _ in range(5000)))
    text = tmp_path / "text.gguf"
    text.write_text("this is not a model\n" * 50)
    paths += [noise, text]
    results = load_in_child(paths)
    for p in paths:
        kind, msg = results[str(p)]
        assert kind == "ModelLoadError", f"{p.name}: {kind} {msg}"
        assert "not a valid GGUF file" in msg, f"{p.name}: {msg}"


def test_bit_flips_never_crash(tiny_path, tmp_path):
    """Single-bit flips anywhere in the header, metadata and tensor infos (and a few in the
    data): the file either still loads and runs, or fails with an edgekv error."""
    src = tiny_path("qwen2", "Q8_0")
    data = src.read_bytes()
    off = gguf_offsets(src)
    rng = random.Random(99)
    positions = [rng.randrange(0, off["data"]) for _ in range(48)] + [4, 8, 16, 24, off["tensor_info"] + 8]
    positions += [rng.randrange(off["data"], len(data)) for _ in range(6)]
    paths = []
    for i, pos in enumerate(positions):
        d = bytearray(data)
        d[pos] ^= 1 << rng.randrange(8)
        p = tmp_path / f"flip{i}_{pos}.gguf"
        p.write_bytes(bytes(d))
        paths.append(p)
    results = load_in_child(paths)
    kinds = [results[str(p)][0] for p in paths]
    bad = [(p.name, *results[str(p)]) for p in paths if results[str(p)][0].startswith("UNEXPECTED")]
    assert not bad, f"bit flips raised non-edgekv exceptions: {bad}"
    assert kinds.count("loaded") < len(kinds), "no flip was detected at all: the test is not testing"
    assert all(k in ("loaded", "ModelLoadError", "TokenizerError") for k in kinds), set(kinds)


@pytest.mark.parametrize("arch", ["gpt2", "mamba"])
def test_unsupported_architecture(arch, tmp_path):
    p = write_tiny_model(tmp_path / f"{arch}.gguf", arch=arch)
    with pytest.raises(ModelLoadError, match=f"unsupported architecture '{arch}'"):
        edgekv.Model(p)


@pytest.mark.parametrize(
    "arch,name",
    [
        ("llama", "blk.1.ffn_up.weight"),
        ("llama", "token_embd.weight"),
        ("llama", "output_norm.weight"),
        ("qwen2", "blk.0.attn_k.bias"),
        ("qwen2", "blk.1.attn_norm.weight"),
    ],
)
def test_missing_tensor(arch, name, tmp_path):
    p = write_tiny_model(tmp_path / "m.gguf", arch=arch, omit_tensors=[name])
    with pytest.raises(ModelLoadError, match="missing") as e:
        edgekv.Model(p)
    assert repr(name) in str(e.value)


@pytest.mark.parametrize(
    "kw,pattern",
    [
        (dict(omit_metadata=["general.architecture"]), "general.architecture"),
        (dict(omit_metadata=["llama.block_count"]), "llama.block_count"),
        (dict(omit_metadata=["llama.embedding_length"]), "llama.embedding_length"),
        (dict(extra_metadata={"llama.attention.head_count": 0}), "head_count"),
        (dict(extra_metadata={"llama.context_length": 0}), "context_length|n_ctx_train"),
        (dict(extra_metadata={"llama.vocab_size": 1000}), "vocab"),
        (dict(extra_metadata={"llama.rope.freq_base": -1.0}), "rope_base"),
        (dict(extra_metadata={"llama.rope.dimension_count": 7}), "rope_dim"),
        (dict(extra_metadata={"llama.attention.head_count_kv": 3}), "n_head_kv"),
        (dict(extra_metadata={"tokenizer.ggml.model": "bert"}), "tokenizer"),
        (dict(omit_metadata=["tokenizer.ggml.tokens"]), "tokenizer.ggml.tokens"),
    ],
    ids=["no-arch", "no-block-count", "no-embedding-length", "zero-heads", "zero-context", "vocab-mismatch",
         "negative-rope-base", "odd-rope-dim", "kv-heads-not-dividing", "wpm-tokenizer", "no-tokens"],
)
def test_bad_metadata(kw, pattern, tmp_path):
    p = write_tiny_model(tmp_path / "m.gguf", **kw)
    with pytest.raises(EdgekvError, match=pattern):
        edgekv.Model(p)


# ---------------------------------------------------------------------------------------------
# a loaded model, bad calls
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def model(tiny_path, open_model):
    return open_model(tiny_path("llama", "Q8_0"), ctx=32)


def test_token_ids_out_of_range(model):
    v = model.vocab_size
    for bad in ([1, 2, v], [v + 100], [-1], [3, -7, 4], [2**40]):
        with pytest.raises(ValueError, match="out of range") as e:
            model.logits(bad)
        assert str([b for b in bad if b < 0 or b >= v][0]) in str(e.value)
        with pytest.raises(ValueError, match="out of range"):
            model.generate(bad, max_tokens=2)
        with pytest.raises(ValueError, match="out of range"):
            model.generate(bad, max_tokens=2, stream=True)  # checked at the call, not at the first piece
    with pytest.raises(ValueError, match="out of range"):
        model.detokenize([v])
    assert model.logits([v - 1, 0]).shape == (2, v)  # the edges are fine


@pytest.mark.parametrize("bad", [[], [[1, 2]], [1.5, 2.0], ["a"], [True, False]], ids=repr)
def test_malformed_token_lists(model, bad):
    with pytest.raises(ValueError):
        model.logits(bad)


def test_prompt_longer_than_context(model):
    ids = model.tokenize(PROMPT * 3)
    assert len(ids) > 32
    with pytest.raises(ContextOverflowError, match="32"):
        model.logits(ids)
    with pytest.raises(ContextOverflowError):
        model.generate(ids, max_tokens=1)
    with pytest.raises(ContextOverflowError):
        model.generate(PROMPT * 3, max_tokens=1, stream=True)
    with pytest.raises(ContextOverflowError):
        model.generate(ids[:32], max_tokens=1)  # a full context leaves no room to generate
    with pytest.raises(ContextOverflowError):
        model.chat([{"role": "user", "content": PROMPT * 3}], max_tokens=1)
    assert model.logits(ids[:32]).shape[0] == 32  # exactly the context is fine for scoring
    model.generate(ids[:31], max_tokens=1)


@pytest.mark.parametrize(
    "kw,name",
    [
        (dict(temperature=-1), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(temperature=float("inf")), "temperature"),
        (dict(temperature="hot"), "temperature"),
        (dict(top_k=-1), "top_k"),
        (dict(top_k=2.5), "top_k"),
        (dict(top_p=0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_p=-0.1), "top_p"),
        (dict(top_p=float("nan")), "top_p"),
        (dict(max_tokens=-1), "max_tokens"),
        (dict(max_tokens=2.0), "max_tokens"),
        (dict(max_tokens="3"), "max_tokens"),
        (dict(seed="abc"), "seed"),
        (dict(seed=1.5), "seed"),
        (dict(stop="END"), "stop"),
        (dict(stop=[""]), "stop"),
        (dict(stop=[3]), "stop"),
    ],
    ids=lambda x: repr(x) if isinstance(x, dict) else None,
)
def test_invalid_sampling_parameters(model, kw, name):
    with pytest.raises(ValueError, match=name):
        model.generate(PROMPT, **kw)
    with pytest.raises(ValueError, match=name):
        model.generate(PROMPT, stream=True, **kw)
    with pytest.raises(ValueError, match=name):
        model.chat([{"role": "user", "content": "hi"}], **kw)


@pytest.mark.parametrize(
    "kw,name",
    [
        (dict(threads=0), "threads"),
        (dict(threads=-2), "threads"),
        (dict(threads="2"), "threads"),
        (dict(threads=2.0), "threads"),
        (dict(threads=True), "threads"),
        (dict(ctx=0), "ctx"),
        (dict(ctx=-5), "ctx"),
        (dict(ctx="64"), "ctx"),
        (dict(ctx=64.0), "ctx"),
        (dict(n_batch=0), "n_batch"),
        (dict(n_batch=1.5), "n_batch"),
    ],
    ids=lambda x: repr(x) if isinstance(x, dict) else None,
)
def test_invalid_load_parameters(tiny_path, kw, name):
    with pytest.raises(ValueError, match=name):
        edgekv.Model(tiny_path("llama", "Q8_0"), **kw)


def test_use_after_close(tiny_path):
    m = edgekv.Model(tiny_path("llama", "Q8_0"), threads=THREADS)
    it = m.generate(PROMPT, max_tokens=3, stream=True)  # created before close, never started
    m.close()
    calls = [
        lambda: m.logits([1, 2]),
        lambda: m.generate(PROMPT, max_tokens=2),
        lambda: m.generate(PROMPT, max_tokens=2, stream=True),
        lambda: m.chat([{"role": "user", "content": "hi"}], max_tokens=2),
        lambda: m.info(),
        lambda: m.reset(),
        lambda: m.kv_bytes,
        lambda: m.kv_bytes_per_token,
        lambda: next(it),
    ]
    for i, call in enumerate(calls):
        with pytest.raises(ModelClosedError, match="closed"):
            call()


CLOSE_DURING_STREAM = textwrap.dedent(
    """
    import sys, edgekv
    m = edgekv.Model(sys.argv[1], threads=2)
    it = m.generate("Once upon a time", max_tokens=20, temperature=0, stream=True)
    first = next(it)
    m.close()
    try:
        rest = list(it)
        print("NO-ERROR", repr(rest))
    except edgekv.ModelClosedError as e:
        print("CLOSED-ERROR", e)
    # the same from inside the loop
    m = edgekv.Model(sys.argv[1], threads=1)
    try:
        for i, piece in enumerate(m.generate("Hello", max_tokens=20, temperature=0, stream=True)):
            if i == 1:
                m.close()
        print("NO-ERROR-2")
    except edgekv.ModelClosedError as e:
        print("CLOSED-ERROR-2", e)
    """
)


def test_close_during_a_stream(tiny_path):
    """Closing the model while a stream is suspended: the stream's next piece is a
    ModelClosedError, never a use of the freed C model."""
    proc = run_child(CLOSE_DURING_STREAM, str(tiny_path("llama", "Q8_0")))
    assert "CLOSED-ERROR " in proc.stdout, proc.stdout
    assert "CLOSED-ERROR-2" in proc.stdout, proc.stdout


# ---------------------------------------------------------------------------------------------
# a rejected call changes nothing
# ---------------------------------------------------------------------------------------------


def test_failed_calls_leave_the_model_usable(model):
    ids = model.tokenize(PROMPT)
    base_logits = model.logits(ids)
    base_text = model.generate(PROMPT, max_tokens=6, temperature=0)
    n_past, kv = model.n_past, model.kv_bytes
    bad_calls = [
        (ValueError, lambda: model.logits(ids + [model.vocab_size])),
        (ValueError, lambda: model.generate([-1], max_tokens=3)),
        (ValueError, lambda: model.generate(PROMPT, temperature=-1)),
        (ValueError, lambda: model.generate(PROMPT, top_p=2)),
        (ValueError, lambda: model.generate(PROMPT, max_tokens=-1)),
        (ContextOverflowError, lambda: model.logits(ids * 4)),
        (ContextOverflowError, lambda: model.generate(ids * 4, max_tokens=1)),
        (ValueError, lambda: model.chat("hi")),
    ]
    for exc, call in bad_calls:
        with pytest.raises(exc):
            call()
        # the context generate() left behind is still there, untouched
        assert (model.n_past, model.kv_bytes) == (n_past, kv)
    assert model.generate(PROMPT, max_tokens=6, temperature=0) == base_text
    assert model.last_stats.prefilled_tokens == 0, "the cached context was lost by a rejected call"
    assert np.array_equal(model.logits(ids), base_logits)


def test_c_core_rejects_bad_calls_without_changing_state(tiny_path, open_model):
    """The C entry points validate before they touch anything (edgekv.h: 'A failed call leaves
    the model's state as it was'), even when Python's own checks are bypassed. (F32 weights:
    continuing the cached context must match a fresh pass tightly.)"""
    model = open_model(tiny_path("llama", "F32"), ctx=32)
    ids = model.tokenize(PROMPT)
    base = model.logits(ids)
    h = model._handle
    n = lib.ek_n_past(h)
    assert n == len(ids)
    out = np.empty((40, model.vocab_size), np.float32)
    pout = ffi.cast("float *", out.ctypes.data)

    def forward(tokens, mode=lib.EK_LOGITS_ALL, ptr=pout):
        arr = np.asarray(tokens, dtype=np.int32)
        return lib.ek_forward(h, ffi.cast("int32_t *", arr.ctypes.data), arr.size, mode, ptr)

    assert forward([1, 2, model.vocab_size]) == lib.EK_ERR_TOKEN
    assert "out of range" in ffi.string(lib.ek_model_error(h)).decode()
    assert forward([-3]) == lib.EK_ERR_TOKEN
    assert forward([1] * (model.n_ctx - n + 1)) == lib.EK_ERR_CONTEXT
    assert "context" in ffi.string(lib.ek_model_error(h)).decode()
    assert forward([1, 2], mode=7) == lib.EK_ERR_INVALID
    assert forward([1, 2], ptr=ffi.NULL) == lib.EK_ERR_INVALID
    assert lib.ek_forward(h, ffi.NULL, 1, lib.EK_LOGITS_LAST, pout) == lib.EK_ERR_INVALID
    assert forward([]) == lib.EK_ERR_INVALID
    assert lib.ek_truncate(h, n + 1) == lib.EK_ERR_INVALID
    assert lib.ek_truncate(h, -1) == lib.EK_ERR_INVALID
    assert lib.ek_n_past(h) == n
    assert lib.ek_kv_bytes_used(h) == n * lib.ek_kv_bytes_per_token(h)
    # the cached context is intact: continuing it matches a fresh run of the whole sequence
    nxt = [5, 6, 7]
    assert forward(nxt) == 0
    assert np.allclose(out[:3], model.logits(ids + nxt)[-3:], rtol=0, atol=1e-4 * base.std())
    assert not np.allclose(out[:3], model.logits(nxt), rtol=0, atol=0.1 * base.std())  # context mattered


def test_interleaved_streams_each_get_their_own_context(tiny_path, open_model):
    """Two streams of one model consumed in turn (one thread): each decode step must run on its
    own stream's context, not on whatever the other stream left in the cache."""
    path = tiny_path("llama", "Q8_0")
    m = open_model(path)
    kw = dict(max_tokens=12, temperature=1.0, top_k=0, top_p=1.0, seed=7)  # sampled: sensitive to context
    solo_a = m.generate("Once upon a time", **kw)
    solo_b = m.generate("The capital of France is", **kw)
    a = m.generate("Once upon a time", stream=True, **kw)
    b = m.generate("The capital of France is", stream=True, **kw)
    out_a, out_b = [], []
    for _ in range(20):
        out_a.append(next(a, ""))
        out_b.append(next(b, ""))
    assert "".join(out_a) == solo_a
    assert "".join(out_b) == solo_b
    m.logits([1, 2, 3])  # and a scoring call in the middle of a stream
    c = m.generate("Hello, world!", stream=True, **kw)
    first = next(c)
    m.logits([4, 5, 6])
    assert first + "".join(c) == m.generate("Hello, world!", **kw)
