"""The Python API on tiny models: lifetime, info(), KV accounting, chat, tokenization round
trips, stopping rules and GenerationStats."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import edgekv
from conftest import THREADS, make_vocab, write_tiny_model
from edgekv import GenerationStats, ModelClosedError

PROMPT = "Once upon a time there was a small model that wanted to learn how to speak."


# ---------------------------------------------------------------------------------------------
# lifetime
# ---------------------------------------------------------------------------------------------


def test_context_manager_closes(tiny_arch):
    _, path = tiny_arch
    with edgekv.Model(path, threads=THREADS) as m:
        assert not m.closed
        assert m.logits([1, 2, 3]).shape == (3, m.vocab_size)
        assert "closed" not in repr(m)
    assert m.closed
    assert "closed" in repr(m)
    with pytest.raises(ModelClosedError):
        m.logits([1, 2, 3])
    m.close()  # closing twice is harmless
    assert m.closed


def test_context_manager_closes_when_the_body_raises(tiny_arch):
    _, path = tiny_arch
    with pytest.raises(KeyError):
        with edgekv.Model(path, threads=THREADS) as m:
            raise KeyError("boom")
    assert m.closed


def test_load_takes_a_path(tiny_arch):
    arch, path = tiny_arch
    with edgekv.load(str(path), threads=THREADS, ctx=64, n_batch=8, progress=False) as m:
        assert m.arch == arch
        assert m.n_ctx == 64
        assert m.threads == THREADS
        assert m.generate("Hello", max_tokens=3, temperature=0) == m.generate("Hello", max_tokens=3, temperature=0)


# ---------------------------------------------------------------------------------------------
# info() and KV accounting
# ---------------------------------------------------------------------------------------------


def expected_params(n_vocab, n_embd, n_layer, n_head, n_head_kv, n_ff, qwen2, tied):
    hd = n_embd // n_head
    per_layer = (
        2 * n_embd  # attention and ffn norms
        + n_embd * n_head * hd + 2 * n_embd * n_head_kv * hd + n_head * hd * n_embd  # q, k, v, o
        + 3 * n_embd * n_ff  # gate, up, down
        + ((n_head + 2 * n_head_kv) * hd if qwen2 else 0)  # biases
    )
    return n_vocab * n_embd * (1 if tied else 2) + n_embd + n_layer * per_layer


@pytest.mark.parametrize("wtype", ["Q8_0", "F16", "Q5_0", "BF16"])
def test_info_fields(tiny_arch, wtype, tiny_path, open_model):
    arch, _ = tiny_arch
    path = tiny_path(arch, wtype)
    m = open_model(path, ctx=128)
    info = m.info()
    hp = info["hparams"]
    assert info["architecture"] == arch
    assert info["path"] == str(path)
    assert info["file_bytes"] == path.stat().st_size
    assert info["ctx"] == 128 and info["ctx_train"] == 256
    assert info["threads"] == THREADS
    assert info["simd"] in ("avx2", "avx2+vnni", "avx2+vnni+avx512", "neon", "neon+dotprod", "scalar")
    vocab = make_vocab(arch)
    assert hp["n_vocab"] == vocab.size == m.vocab_size
    want = dict(n_embd=64, n_layer=2, n_head=2, n_head_kv=1, head_dim=32, n_ff=128, rope_dim=32, n_ctx_train=256)
    assert {k: hp[k] for k in want} == want
    assert hp["rope_base"] == 10000.0
    assert hp["norm_eps"] == pytest.approx(1e-5)
    assert info["parameters"] == expected_params(vocab.size, 64, 2, 2, 1, 128, arch == "qwen2", tied=True)
    n_matrices = 1 + 7 * 2  # token embedding (tied output) + 7 per layer
    n_vectors = 1 + 2 * 2 + (3 * 2 if arch == "qwen2" else 0)
    assert info["weight_types"] == {wtype: n_matrices, "F32": n_vectors}
    if wtype in ("Q5_0", "BF16"):
        assert info["converted_at_load"] == {wtype: n_matrices}
    else:
        assert info["converted_at_load"] == {}
    fp16_record = 2 * 2 * hp["n_layer"] * hp["n_head_kv"] * hp["head_dim"]  # K and V, 2 bytes each
    assert fp16_record <= info["kv_bytes_per_token"] <= fp16_record + 16


def test_info_counts_a_separate_output_head(tiny_path, open_model):
    m = open_model(tiny_path("llama", "Q4_0", tie_embeddings=False))
    info = m.info()
    assert info["parameters"] == expected_params(m.vocab_size, 64, 2, 2, 1, 128, False, tied=False)
    assert info["weight_types"]["Q4_0"] == 2 + 7 * 2


def test_kv_bytes_grow_per_token(tiny_arch, open_model):
    _, path = tiny_arch
    m = open_model(path, ctx=64)
    per = m.kv_bytes_per_token
    assert per > 0
    assert m.kv_bytes == 0 and m.n_past == 0
    ids = m.tokenize(PROMPT)
    for n in (1, 5, len(ids)):
        m.logits(ids[:n])
        assert m.n_past == n
        assert m.kv_bytes == n * per
    m.generate(ids, max_tokens=4, temperature=0)
    s = m.last_stats
    # the prompt and every generated token but the last (it was sampled, never run) are cached
    assert m.n_past == len(ids) + s.generated_tokens - 1
    assert m.kv_bytes == m.n_past * per == s.kv_bytes
    m.reset()
    assert m.kv_bytes == 0 and m.n_past == 0


# ---------------------------------------------------------------------------------------------
# tokenization and chat
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "Hello, world!",
        "The capital of France is Paris. 12345",
        "  leading and trailing spaces  ",
        "tabs\tand\nnew\r\nlines\n\n",
        "Unicode: café, naïve, 日本語, Ελληνικά, emoji 🙂👍🏽",
        "<|im_start|>user\nhi<|im_end|>\n",
        "",
    ],
)
def test_detokenize_tokenize_round_trip(tiny_arch, text, open_model):
    _, path = tiny_arch
    m = open_model(path)
    ids = m.tokenize(text)
    assert all(isinstance(i, int) and 0 <= i < m.vocab_size for i in ids)
    assert m.detokenize(ids) == text


def test_special_tokens(tiny_arch, open_model):
    arch, path = tiny_arch
    m = open_model(path)
    vocab = make_vocab(arch)
    im_start, im_end = vocab.special_id("<|im_start|>"), vocab.special_id("<|im_end|>")
    assert m.tokenize("<|im_start|>") == [im_start]
    assert m.tokenize("a<|im_end|>b") == m.tokenize("a") + [im_end] + m.tokenize("b")
    assert im_start not in m.tokenize("<|im_start|>", special=False)  # left as plain text
    assert m.detokenize([im_start], skip_special=True) == ""
    assert im_end in m.tokenizer.eot_ids
    # merges apply: common words take fewer tokens than bytes
    assert len(m.tokenize(" the")) == 1
    assert len(m.tokenize("the capital of France")) < len("the capital of France")


def test_chat_applies_the_template(tiny_arch, open_model):
    _, path = tiny_arch
    m = open_model(path)
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is the capital of France?"},
    ]
    expected = (
        "<|im_start|>system\nYou are terse.<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert m.tokenizer.apply_chat_template(messages) == expected
    reply = m.chat(messages, max_tokens=8, temperature=0)
    assert m.last_stats.prompt_tokens == len(m.tokenize(expected))
    assert reply == m.generate(expected, max_tokens=8, temperature=0)
    with pytest.raises(ValueError):
        m.chat([{"content": "no role"}], max_tokens=1)
    with pytest.raises(ValueError):
        m.chat("not a list", max_tokens=1)


def test_small_and_large_models_share_a_tokenizer(tmp_path):
    small = write_tiny_model(tmp_path / "small.gguf", size="small", seed=1)
    large = write_tiny_model(tmp_path / "large.gguf", size="large", seed=2)
    with edgekv.Model(small, threads=THREADS) as a, edgekv.Model(large, threads=THREADS) as b:
        assert a.tokenizer.same_as(b.tokenizer), a.tokenizer.diff(b.tokenizer)
        assert b.hparams["n_layer"] > a.hparams["n_layer"] and b.hparams["n_embd"] > a.hparams["n_embd"]
        assert a.vocab_size == b.vocab_size
        ids = a.tokenize(PROMPT)
        assert ids == b.tokenize(PROMPT)
        assert not np.allclose(a.logits(ids), b.logits(ids))  # different models all the same


# ---------------------------------------------------------------------------------------------
# stopping rules and statistics
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def eager_stopper(tmp_path_factory):
    """A model whose every next-token distribution is dominated by the end-of-generation tokens."""
    return write_tiny_model(tmp_path_factory.mktemp("stop") / "stop.gguf", tie_embeddings=False,
                            special_logit_bias=20.0)


@pytest.fixture(scope="module")
def never_stopper(tmp_path_factory):
    """A model that never ends its turn (the end-of-generation logits are pushed far down)."""
    return write_tiny_model(tmp_path_factory.mktemp("nostop") / "nostop.gguf", tie_embeddings=False,
                            special_logit_bias=-20.0)


def test_generation_stops_at_end_of_turn(eager_stopper, open_model):
    m = open_model(eager_stopper)
    nxt = int(np.argmax(m.logits(m.tokenize(PROMPT))[-1]))
    assert nxt in m.tokenizer.eot_ids
    for kw in (dict(temperature=0), dict(temperature=0.8, seed=1), dict(temperature=1.0, top_k=0, seed=2)):
        assert m.generate(PROMPT, max_tokens=50, **kw) == ""
        s = m.last_stats
        assert s.finish_reason == "stop"
        assert s.generated_tokens == 1


def test_generation_stops_at_max_tokens(never_stopper, open_model):
    m = open_model(never_stopper)
    for n in (1, 7, 20):
        text = m.generate(PROMPT, max_tokens=n, temperature=1.0, seed=n)
        s = m.last_stats
        assert s.finish_reason == "length"
        assert s.generated_tokens == n
        assert isinstance(text, str)
    assert m.generate(PROMPT, max_tokens=0) == ""
    assert m.last_stats.generated_tokens == 0 and m.last_stats.finish_reason == "length"


def test_generation_stops_at_a_full_context(never_stopper, open_model):
    m = open_model(never_stopper, ctx=24)
    ids = m.tokenize(PROMPT)[:16]
    m.generate(ids, max_tokens=100, temperature=0)
    s = m.last_stats
    assert s.finish_reason == "context"
    assert s.generated_tokens == 24 - 16 + 1  # the last token is sampled from a full context
    assert m.n_past == 24


def test_generation_stats_are_sane(tiny_arch, open_model):
    _, path = tiny_arch
    m = open_model(path)
    assert m.last_stats is None
    ids = m.tokenize(PROMPT)
    m.generate(ids, max_tokens=10, temperature=0.7, seed=0)
    s = m.last_stats
    assert isinstance(s, GenerationStats)
    assert s.prompt_tokens == len(ids)
    assert s.prefilled_tokens == len(ids)  # nothing cached yet
    assert 1 <= s.generated_tokens <= 10
    assert s.prefill_s >= 0 and s.decode_s >= 0
    assert s.finish_reason in ("stop", "length")
    assert s.kv_bytes == m.kv_bytes > 0
    d = s.as_dict()
    assert set(f.name for f in dataclasses.fields(GenerationStats)) <= set(d)
    assert "prefill_tok_s" in d and "decode_ms_per_token" in d
    assert isinstance(s.line(), str) and s.finish_reason in s.line()
    # a second call on the same prompt reuses the cache
    m.generate(ids, max_tokens=3, temperature=0)
    assert m.last_stats.prefilled_tokens == 0  # the whole prefill: it is still in the cache as it was
    assert m.last_stats is not s


def test_stream_stats_are_filled_when_the_stream_ends(tiny_arch, open_model):
    _, path = tiny_arch
    m = open_model(path)
    it = m.generate(PROMPT, max_tokens=6, temperature=0, stream=True)
    pieces = list(it)
    s = m.last_stats
    assert s.generated_tokens >= 1
    assert "".join(pieces) == m.generate(PROMPT, max_tokens=6, temperature=0)


# ---------------------------------------------------------------------------------------------
# the text side of generation, with scripted tokens
# ---------------------------------------------------------------------------------------------


class ScriptedSampler:
    """Stands in for edgekv.model.Sampler: returns a fixed token sequence (the model still runs)."""

    script: list = []

    def __init__(self, params):
        self.i = 0

    def __call__(self, logits):
        tok = self.script[self.i]
        self.i += 1
        return tok


def byte_token(m, b: int) -> int:
    """The id of the single-byte token for byte b."""
    from make_tiny import bytes_to_unicode

    return m.tokenizer.token_id(bytes_to_unicode()[b])


def scripted(monkeypatch, ids):
    monkeypatch.setattr(edgekv.model, "Sampler", ScriptedSampler)
    ScriptedSampler.script = list(ids)


def test_multibyte_characters_split_over_tokens_stream_whole(tiny_arch, open_model, monkeypatch):
    _, path = tiny_arch
    m = open_model(path)
    text = "a🙂é日"
    ids = [byte_token(m, b) for b in text.encode()]
    scripted(monkeypatch, ids)
    pieces = list(m.generate("x", max_tokens=len(ids), stream=True))
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)  # no half characters on the way
    assert pieces == ["a", "🙂", "é", "日"]


def test_stop_string_across_tokens(tiny_arch, open_model, monkeypatch):
    _, path = tiny_arch
    m = open_model(path)
    ids = [byte_token(m, b) for b in b"hello world END more"]
    for stream in (False, True):
        scripted(monkeypatch, ids)
        out = m.generate("x", max_tokens=len(ids), stop=["END", "never"], stream=stream)
        assert (out if isinstance(out, str) else "".join(out)) == "hello world "
        s = m.last_stats
        assert s.finish_reason == "stop"
        assert s.generated_tokens == len(b"hello world END")


def test_stop_string_leaves_no_partial_character(tmp_path, open_model, monkeypatch):
    """The token that completes a stop string may also start a multi-byte character: what is
    cut off with the stop string must not come back as U+FFFD at the end of the text."""
    from make_tiny import bytes_to_unicode

    b2u = bytes_to_unicode()
    base = make_vocab("llama")
    piece = b2u[ord("b")] + b2u[0xF0]  # one token: "b" and the first byte of a 4-byte character
    vocab = dataclasses.replace(base, tokens=base.tokens + (piece,), token_types=base.token_types + (1,),
                                merges=base.merges + (f"{b2u[ord('b')]} {b2u[0xF0]}",))
    m = open_model(write_tiny_model(tmp_path / "v.gguf", vocab=vocab))
    ids = [byte_token(m, ord("a")), m.tokenizer.token_id(piece)]
    for stream in (False, True):
        scripted(monkeypatch, ids)
        out = m.generate("x", max_tokens=2, stop=["ab"], stream=stream)
        assert (out if isinstance(out, str) else "".join(out)) == ""
        scripted(monkeypatch, ids)
        out = m.generate("x", max_tokens=2, stop=["a"], stream=stream)
        assert (out if isinstance(out, str) else "".join(out)) == ""
    scripted(monkeypatch, ids)
    assert m.generate("x", max_tokens=2) == "ab\ufffd"  # an unfinished character at the very end: U+FFFD


def test_end_of_turn_is_not_in_the_text(tiny_arch, open_model, monkeypatch):
    arch, path = tiny_arch
    m = open_model(path)
    eot = make_vocab(arch).special_id("<|im_end|>")
    ids = [byte_token(m, b) for b in b"ok"] + [eot, byte_token(m, ord("!"))]
    scripted(monkeypatch, ids)
    assert m.generate("x", max_tokens=10) == "ok"
    assert m.last_stats.finish_reason == "stop" and m.last_stats.generated_tokens == 3
