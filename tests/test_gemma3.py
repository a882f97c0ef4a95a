"""Gemma 3 beyond the architecture-row checks of test_arch_rows.py (which compare tiny gemma3 GGUFs
with the NumPy reference and llama.cpp):

* each gemma3 piece (sliding window, its RoPE base, post-norms, GeGLU, embedding scaling) moves the
  reference's logits by far more than the bounds edgekv is held to, so none can be skipped unseen;
* the sliding window over quantized KV records (every pool masks, not only the FP16 one);
* fused attention with head_dim 256 (Gemma 3 270M's) over mixed-precision records against
  dequantize-then-attend (test_kv.py's check);
* chat templates: Gemma's and ChatML render exactly what llama.cpp's llama_chat_apply_template renders;
* the real Gemma 3 270M against llama.cpp on a short WikiText-2 prefix, and closer than llama.cpp to
  the float64 reference over its weights.
"""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
from test_arch_rows import ROWS, row_path, write_tiny  # noqa: F401  (write_tiny: the fixture)
from test_forward import PROMPT, bounds_for

import edgekv
from conftest import TEXT_EXCERPT, THREADS, registry_model

# A Gemma-style template written for these tests (llama.cpp picks its built-in Gemma format for any
# template containing <start_of_turn>; the jinja body only has to be valid).
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{{ m['content'] | trim }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)

CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "  Be kind.\n"}, {"role": "user", "content": " What is 2+2? \n"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"}],
    [{"role": "system", "content": "A"}, {"role": "system", "content": "B"}, {"role": "assistant", "content": "x"},
     {"role": "user", "content": "y"}],
    [{"role": "user", "content": "é 😀 <b>bold</b>"}, {"role": "assistant", "content": "ok\n\n"}],
]


# ---------------------------------------------------------------------------------------------
# the pieces matter
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("piece", ["window", "swa_base", "post_norms", "gelu", "embd_scale"])
def test_each_piece_changes_the_logits(piece, write_tiny, reference_for):
    """Without one gemma3 piece the reference's logits move by more than 10x the largest error
    test_arch_rows allows (the F32 max bound): an engine that skipped it could not pass there."""
    path = row_path(write_tiny, "gemma3", "F32")
    ref = reference_for(path)
    ids = edgekv.Model(path, threads=THREADS).tokenize(PROMPT)
    assert len(ids) > 2 * ref.hp.swa_window  # the window really cuts
    full = ref.logits(ids)
    saved = (ref.hp.swa_window, ref.rope_base_swa, dict(ref.w), ref.gelu, ref.embd_scale)
    try:
        if piece == "window":
            ref.hp.swa_window = 10 ** 6  # layers still "slide", over everything
        elif piece == "swa_base":
            ref.rope_base_swa = ref.hp.rope_base
        elif piece == "post_norms":
            ref.w = {k: v for k, v in ref.w.items() if "post_" not in k}
            assert len(ref.w) < len(saved[2])
        elif piece == "gelu":
            ref.gelu = False
        else:
            ref.embd_scale = 1.0
        without = ref.logits(ids)
    finally:
        ref.hp.swa_window, ref.rope_base_swa, ref.w, ref.gelu, ref.embd_scale = saved
    moved = np.abs(full - without).max() / full.std()
    assert moved > 10 * bounds_for("F32")[1], f"{piece}: moves the logits by only {moved:.2e} of their std"


def test_window_masks_quantized_records(write_tiny, open_model):
    """After a 30-token prefill (window 8), every cached position is re-encoded at 8 bits; the next
    24 tokens' logits stay within the int8 bounds of those over the FP16 cache. Attending to the
    positions before the window (a pool that did not mask them) moves them far outside."""
    from edgekv._native import ffi, lib

    path = row_path(write_tiny, "gemma3-hd256", "F32")
    fp16 = open_model(path)
    ids = fp16.tokenize(PROMPT)[:54]
    want = fp16.logits(ids)[30:].astype(np.float64)
    m = open_model(path, kv="int8")
    m.logits(ids[:30])
    pos = np.arange(30, dtype=np.int32)
    b = np.full(30, 8, dtype=np.int32)
    i32 = lambda a: ffi.cast("int32_t *", a.ctypes.data)  # noqa: E731
    assert lib.ek_kv_set_bits(m._handle, i32(pos), i32(b), i32(b), 30) == 0, m._c_error()
    got = np.empty((24, want.shape[1]), np.float32)
    assert lib.ek_forward(m._handle, i32(np.asarray(ids[30:], np.int32)), 24, 2, ffi.cast("float *", got.ctypes.data)) == 0
    diff = np.abs(got.astype(np.float64) - want)
    rms, mx = np.sqrt(np.mean(diff ** 2)) / want.std(), diff.max() / want.std()
    rms_bound, max_bound = bounds_for("Q8_0")
    assert 0 < rms < rms_bound and mx < max_bound, f"int8 KV with a window: RMS {rms:.2e}, max {mx:.2e} of the std"


# ---------------------------------------------------------------------------------------------
# attention kernels at head_dim 256
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(24))
def test_attention_head_dim_256_equals_dequantize_then_attend(seed):
    """test_kv.py's fused-attention check (stored records within one code of the reference
    formats; output within the derived bound of dequantize-then-attend) at head_dim 256 (int8
    query path and AVX-512 value kernels at their size limit), 1..8 query heads per KV head,
    all precisions mixed, with and without rotation and key centering."""
    from test_kv import ALL_BITS, c_attention, check_attention, check_stored

    r = np.random.default_rng(seed)
    hd, gs, n_pos = 256, int(r.integers(1, 9)), int(r.integers(1, 200))
    group, rot, center = [32, 64][seed % 2], bool(seed % 3), bool(seed % 4 < 2)
    q = r.normal(0, [0.2, 1.0, 3.0][seed % 3], (gs, hd)).astype(np.float32)
    k = r.normal(0, 1, (n_pos, hd)).astype(np.float32)
    v = r.normal(0, 1, (n_pos, hd)).astype(np.float32)
    k[:, r.integers(hd)] *= 8
    k[:, r.integers(hd)] += 6
    kb, vb = r.choice(ALL_BITS, n_pos), r.choice(ALL_BITS, n_pos)
    rc, out, kd, vd, q_key, c = c_attention(q, k, v, kb, vb, group, rot, center)
    assert rc == 0
    assert np.isfinite(out).all()
    check_stored(k, kd, np.asarray(kb), group, rot, c)
    check_stored(v, vd, np.asarray(vb), group, rot)
    check_attention(out, q, kd, vd, q_key, kb, vb, group, rot, c)


# ---------------------------------------------------------------------------------------------
# chat templates against llama.cpp
# ---------------------------------------------------------------------------------------------

def llama_chat(llama_cpp, template, messages, add_ass=True) -> str:
    """llama.cpp's llama_chat_apply_template (None: the default, ChatML)."""
    keep = [(m["role"].encode(), m["content"].encode()) for m in messages]
    chat = (llama_cpp.llama_chat_message * len(keep))(*[llama_cpp.llama_chat_message(r, c) for r, c in keep])
    buf = ctypes.create_string_buffer(1 << 16)
    tmpl = template.encode() if template is not None else None
    n = llama_cpp.llama_chat_apply_template(tmpl, chat, len(keep), add_ass, buf, len(buf))
    assert 0 < n <= len(buf), f"llama_chat_apply_template returned {n}"
    return buf.raw[:n].decode()


@pytest.mark.parametrize("arch, template", [("gemma3", GEMMA_TEMPLATE), ("qwen3", None)], ids=["gemma", "qwen3-chatml"])
def test_chat_template_matches_llama_cpp(arch, template, write_tiny, llama_cpp):
    """Gemma's template (a tiny gemma3 GGUF carrying it) and the tiny qwen3's ChatML render what
    llama.cpp renders for the same messages, with and without the generation prompt: system
    messages merged into the next user turn (Gemma), contents trimmed, assistant -> model."""
    kw = dict(ROWS[arch if arch == "gemma3" else "qwen3"])
    kw.pop("arch")
    if template is not None:
        kw["extra_metadata"] = {"tokenizer.chat_template": template}
    tok = edgekv.Model(write_tiny(arch, "F32", **kw), threads=THREADS).tokenizer
    for msgs in CONVERSATIONS:
        for gen in (True, False):
            got = tok.apply_chat_template(msgs, add_generation_prompt=gen)
            assert got == llama_chat(llama_cpp, tok.chat_template, msgs, gen), msgs
    if template is not None:  # no BOS in the text: encoding adds it
        assert tok.apply_chat_template(CONVERSATIONS[1]) == "<start_of_turn>user\nYou are terse.\n\nHi<end_of_turn>\n" \
                                                           "<start_of_turn>model\n"


@pytest.fixture(scope="module")
def gemma_path():
    return registry_model("gemma3-270m")


def test_gemma_270m_without_template_renders_chatml_as_llama_cpp(gemma_path, llama_cpp):
    """The 270M base model's GGUF has no chat template: llama.cpp falls back to ChatML, so does edgekv."""
    from edgekv.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf(gemma_path)
    assert tok.chat_template is None
    for msgs in CONVERSATIONS:
        assert tok.apply_chat_template(msgs) == llama_chat(llama_cpp, None, msgs), msgs


# ---------------------------------------------------------------------------------------------
# the real model
# ---------------------------------------------------------------------------------------------

def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _kl(p_logits, q_logits):
    """Per-position KL(P || Q) in nats, float64."""
    lp, lq = _log_softmax(p_logits), _log_softmax(q_logits)
    return (np.exp(lp) * (lp - lq)).sum(-1)


@pytest.fixture(scope="module")
def prefix_logits(gemma_path, llama_cpp):
    """BOS + the first 96 WikiText-2 tokens: (ids, edgekv's logits, llama.cpp's logits), float64."""
    with open(TEXT_EXCERPT, encoding="utf-8") as f:
        text = f.read()
    m = edgekv.Model(gemma_path, threads=THREADS, ctx=128)
    info = m.info()
    assert info["architecture"] == "gemma3" and m.hparams["head_dim"] == 256 and m.hparams["swa_window"] == 512
    ids = m.tokenize(text)[:97]
    assert ids[0] == m.tokenizer.bos_id
    ours = m.logits(ids).astype(np.float64)
    m.close()
    llm = llama_cpp.Llama(str(gemma_path), n_ctx=128, n_batch=128, logits_all=True, verbose=False, n_threads=THREADS)
    try:
        llm.eval(ids)
        theirs = np.array(llm.scores[: len(ids)], dtype=np.float64)
    finally:
        llm.close()
    return ids, ours, theirs


def test_gemma_270m_matches_llama_cpp_on_a_short_prefix(prefix_logits):
    """Both engines on the same prefix: a gross error (a norm, scale or RoPE base wrong) puts KL far
    above 0.1. Measured: mean KL 0.0075 nats, top-1 92.8% (WikiText-2, 4 x 1,024 tokens:
    benchmarks/results/parity_gemma3-270m), so this asserts 0.02 and 85%. The issue's 0.005 is out
    of any engine's reach here: llama.cpp itself is 0.006 from the exact result (next test)."""
    _, ours, theirs = prefix_logits
    kl = _kl(theirs, ours)
    top1 = np.mean(theirs.argmax(-1) == ours.argmax(-1))
    assert kl.mean() <= 0.02 and top1 >= 0.85, f"mean KL {kl.mean():.4f} nats, top-1 {top1:.1%}"


def test_gemma_270m_is_closer_to_the_exact_result_than_llama_cpp(gemma_path, prefix_logits):
    """The float64 NumPy reference over the file's weights dequantized exactly (tests/reference.py:
    no activation rounding, no FP16 cache) is what the GGUF computes; edgekv must stay closer to it
    than llama.cpp, whose int8 activation blocks of 256 for the K-quant matrices (ffn_down) cost it
    most of its error (docs/decisions.md). Measured on this prefix: KL(reference || edgekv) 0.0036,
    KL(reference || llama.cpp) 0.0063 nats. A regression to llama.cpp's rounding (measured: 256-wide
    activation blocks put edgekv at 0.0056 on a 256-token prefix, llama.cpp 0.0048) fails here."""
    from reference import ReferenceModel

    ids, ours, theirs = prefix_logits
    exact = ReferenceModel(gemma_path).logits(ids)
    kl_ek, kl_ll = _kl(exact, ours).mean(), _kl(exact, theirs).mean()
    assert kl_ek < 0.75 * kl_ll and kl_ek <= 0.008, f"KL from exact: edgekv {kl_ek:.5f}, llama.cpp {kl_ll:.5f} nats"
