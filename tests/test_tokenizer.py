"""Tests for edgekv.tokenizer.

Unit tests build a tiny byte-level BPE vocabulary in memory (no model file). Integration tests
load the real SmolLM2-135M and Qwen2.5-Coder-0.5B GGUFs (through the registry) and compare token
ids with llama.cpp through llama-cpp-python; a missing model or reference skips with the reason,
or fails under EDGEKV_REQUIRE_REFERENCE=1 (see conftest.py).
"""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from conftest import TEXT_EXCERPT, registry_model
from hypothesis import strategies as st

from edgekv.errors import EdgekvError, ModelLoadError, TokenizerError
from edgekv.tokenizer import (
    BYTE_TO_UNICODE,
    CHATML_TEMPLATE,
    PRE_TOKENIZERS,
    StreamDecoder,
    Tokenizer,
)


# --------------------------------------------------------------------------------------------
# a tiny byte-level BPE vocabulary
# --------------------------------------------------------------------------------------------

BYTE_SYMBOLS = [BYTE_TO_UNICODE[b] for b in range(256)]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
USER_DEFINED = ["<tool>"]
TINY_MERGES = [
    "h e", "l l", "he ll", "hell o",      # hello
    "Ġ w", "o r", "Ġw or", "Ġwor l", "Ġworl d",  # Ġworld
    "1 2",                                # "12" (only reachable when digits are not split)
    "Ġ Ġ",                                # two spaces
]


def _merged_tokens(merges):
    out = []
    for m in merges:
        a, b = m.split(" ")
        out.append(a + b)
    return out


def tiny_fields(pre="smollm", **overrides):
    merged = _merged_tokens(TINY_MERGES)
    tokens = SPECIALS + BYTE_SYMBOLS + merged + USER_DEFINED
    types = [3] * len(SPECIALS) + [1] * (len(BYTE_SYMBOLS) + len(merged)) + [4] * len(USER_DEFINED)
    fields = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": list(TINY_MERGES),
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.add_bos_token": False,
    }
    fields.update(overrides)
    return fields


@pytest.fixture(scope="module")
def tiny():
    return Tokenizer.from_fields(tiny_fields())


def tid(tok, text):
    i = tok.token_id(text)
    assert i is not None, text
    return i


def byte_ids(tok, data: bytes):
    return [tid(tok, BYTE_TO_UNICODE[b]) for b in data]


# --------------------------------------------------------------------------------------------
# construction and properties
# --------------------------------------------------------------------------------------------

def test_properties(tiny):
    n = len(SPECIALS) + 256 + len(TINY_MERGES) + len(USER_DEFINED)
    assert tiny.vocab_size == n == len(tiny)
    assert tiny.bos_id == 1 and tiny.eos_id == 2
    assert tiny.add_bos is False
    assert tiny.pre == "smollm"
    assert tiny.special_ids == {0, 1, 2, n - 1}
    assert tiny.control_ids == {0, 1, 2}
    # eos plus the template end tokens present in the vocabulary
    assert tiny.eot_ids == {0, 2}
    assert tiny.eot_id in (0, 2)
    assert tiny.dropped_merges == 0


def test_pre_tokenizer_table():
    assert {"smollm", "qwen2", "gpt2", "gpt-2", "default", "llama-bpe"} <= set(PRE_TOKENIZERS)
    assert PRE_TOKENIZERS["smollm"].regexes[0] == r"\p{N}"
    assert len(PRE_TOKENIZERS["default"].regexes) == 4


def test_encode_merges(tiny):
    assert tiny.encode("hello") == [tid(tiny, "hello")]
    assert tiny.encode("hello world") == [tid(tiny, "hello"), tid(tiny, "Ġworld")]
    assert tiny.decode(tiny.encode("hello world")) == "hello world"
    assert tiny.encode("") == []


def test_smollm_splits_digits_but_gpt2_does_not(tiny):
    assert tiny.encode("12") == byte_ids(tiny, b"12")
    gpt2 = Tokenizer.from_fields(tiny_fields(pre="gpt2"))
    assert gpt2.encode("12") == [tid(gpt2, "12")]
    assert gpt2.same_as(tiny) is False
    assert "pre-tokenizer" in gpt2.diff(tiny)


@pytest.mark.parametrize("pre", sorted(PRE_TOKENIZERS))
def test_every_pre_tokenizer_round_trips(pre):
    tok = Tokenizer.from_fields(tiny_fields(pre=pre))
    text = "Hello, world! It's 2024 - 3.14 $5 + <x>  \t\n\n  héllo 日本 🎉"
    assert tok.decode(tok.encode(text)) == text


def test_qwen2_regex_keeps_newline_runs_and_single_digits():
    tok = Tokenizer.from_fields(tiny_fields(pre="qwen2"))
    pieces = [p for p, _ in tok.hf_tokenizer.pre_tokenizer.pre_tokenize_str("a\n\n  b 123")]
    assert pieces == ["a", "ĊĊ", "Ġ", "Ġb", "Ġ", "1", "2", "3"]


def test_add_bos(tiny):
    assert tiny.encode("hello", add_bos=True) == [1, tid(tiny, "hello")]
    assert tiny.encode("hello", add_bos=False) == [tid(tiny, "hello")]
    with_bos = Tokenizer.from_fields(tiny_fields(**{"tokenizer.ggml.add_bos_token": True}))
    assert with_bos.encode("hello") == [1, tid(with_bos, "hello")]
    no_bos_id = tiny_fields()
    del no_bos_id["tokenizer.ggml.bos_token_id"]
    tok = Tokenizer.from_fields(no_bos_id)
    assert tok.bos_id is None
    with pytest.raises(TokenizerError, match="bos_token_id"):
        tok.encode("x", add_bos=True)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=60))
def test_round_trip_random_unicode(text):
    tok = Tokenizer.from_fields(tiny_fields())
    ids = tok.encode(text, parse_special=False)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
    assert tok.decode_bytes(ids) == text.encode("utf-8")


@settings(max_examples=100, deadline=None)
@given(st.lists(st.one_of(st.text(max_size=10), st.sampled_from(SPECIALS + USER_DEFINED)), max_size=8))
def test_round_trip_with_special_tokens(parts):
    tok = Tokenizer.from_fields(tiny_fields(pre="qwen2"))
    text = "".join(parts)
    assert tok.decode(tok.encode(text)) == text


# --------------------------------------------------------------------------------------------
# special tokens
# --------------------------------------------------------------------------------------------

def test_special_tokens_are_matched_whole(tiny):
    text = "<|im_start|>user\nhello<|im_end|>\n"
    ids = tiny.encode(text)
    assert ids[0] == 1
    assert ids.count(1) == 1 and ids.count(2) == 1
    assert ids == [1] + byte_ids(tiny, b"user") + byte_ids(tiny, b"\n") + [tid(tiny, "hello"), 2] + \
        byte_ids(tiny, b"\n")
    assert tiny.decode(ids) == text
    assert tiny.decode(ids, skip_special=True) == "user\nhello\n"


def test_special_tokens_as_text_when_not_parsing(tiny):
    ids = tiny.encode("<|im_start|>hello", parse_special=False)
    assert not set(ids) & tiny.control_ids
    assert ids[-1] == tid(tiny, "hello")
    assert tiny.decode(ids) == "<|im_start|>hello"


def test_user_defined_tokens_are_matched_even_without_parse_special(tiny):
    ud = tid(tiny, "<tool>")
    assert tiny.encode("a<tool>b") == byte_ids(tiny, b"a") + [ud] + byte_ids(tiny, b"b")
    assert tiny.encode("a<tool>b", parse_special=False) == byte_ids(tiny, b"a") + [ud] + byte_ids(tiny, b"b")
    # user-defined tokens are text, not control: skip_special keeps them
    assert tiny.decode([ud], skip_special=True) == "<tool>"


def test_special_tokens_never_split_and_adjacent(tiny):
    ids = tiny.encode("<|im_end|><|im_end|><|im_start|>")
    assert ids == [2, 2, 1]
    # a broken special token is plain text
    ids = tiny.encode("<|im_end|")
    assert 2 not in ids


def test_longest_special_token_wins():
    fields = tiny_fields()
    fields["tokenizer.ggml.tokens"] = fields["tokenizer.ggml.tokens"] + ["<a>", "<a><b>"]
    fields["tokenizer.ggml.token_type"] = fields["tokenizer.ggml.token_type"] + [3, 3]
    tok = Tokenizer.from_fields(fields)
    a, ab = tok.token_id("<a>"), tok.token_id("<a><b>")
    assert tok.encode("<a><b><a>") == [ab, a]


def test_control_looking_tokens_become_control():
    fields = tiny_fields()
    fields["tokenizer.ggml.tokens"] = fields["tokenizer.ggml.tokens"] + ["<|eot_id|>"]
    fields["tokenizer.ggml.token_type"] = fields["tokenizer.ggml.token_type"] + [1]
    tok = Tokenizer.from_fields(fields)
    eot = tok.token_id("<|eot_id|>")
    assert eot in tok.eot_ids and eot in tok.control_ids
    assert tok.encode("x<|eot_id|>") == byte_ids(tok, b"x") + [eot]


def test_unused_tokens_render_nothing():
    fields = tiny_fields()
    fields["tokenizer.ggml.tokens"] = fields["tokenizer.ggml.tokens"] + ["[PAD9]"]
    fields["tokenizer.ggml.token_type"] = fields["tokenizer.ggml.token_type"] + [5]
    tok = Tokenizer.from_fields(fields)
    pad = tok.token_id("[PAD9]")
    assert tok.token_to_piece(pad) == b""
    assert pad not in tok.encode("[PAD9]")


# --------------------------------------------------------------------------------------------
# decoding and streaming
# --------------------------------------------------------------------------------------------

def test_token_to_piece(tiny):
    assert tiny.token_to_piece(tid(tiny, "Ġworld")) == b" world"
    assert tiny.token_to_piece(1) == b"<|im_start|>"
    assert tiny.token_to_piece(1, special=False) == b""
    assert isinstance(tiny.token_to_piece(tid(tiny, BYTE_TO_UNICODE[0xF0])), bytes)


def test_stream_decoder_multibyte(tiny):
    text = "a🎉b é日"
    ids = tiny.encode(text)
    assert len(ids) > len(text)  # the emoji is four byte tokens
    dec = StreamDecoder(tiny)
    outs = [dec.push(i) for i in ids]
    assert "".join(outs) + dec.flush() == text
    assert all("\ufffd" not in o for o in outs)
    # the emoji's four tokens: nothing until the last one
    emoji = byte_ids(tiny, "🎉".encode())
    dec = tiny.stream_decoder()
    assert [dec.push(i) for i in emoji] == ["", "", "", "🎉"]
    assert dec.flush() == ""


def test_stream_decoder_flush_incomplete(tiny):
    dec = tiny.stream_decoder()
    first_two = byte_ids(tiny, "🎉".encode()[:2])
    assert dec.push(first_two[0]) == "" and dec.push(first_two[1]) == ""
    assert dec.pending == "🎉".encode()[:2]
    assert dec.flush() == "\ufffd"
    assert dec.push(tid(tiny, "hello")) == "hello"  # reset after flush


def test_stream_decoder_skip_special(tiny):
    dec = tiny.stream_decoder(skip_special=True)
    assert dec.push(1) == ""
    assert dec.push_many(tiny.encode("hello<|im_end|>")) == "hello"
    dec = tiny.stream_decoder()
    assert dec.push(2) == "<|im_end|>"


def test_decode_invalid_utf8_is_replaced(tiny):
    assert tiny.decode(byte_ids(tiny, b"\xff")) == "\ufffd"


def test_decode_out_of_range(tiny):
    n = tiny.vocab_size
    with pytest.raises(ValueError, match=f"size {n}"):
        tiny.decode([n])
    with pytest.raises(ValueError, match=str(n)) as exc:
        tiny.decode([5, -1])
    assert "-1" in str(exc.value)
    with pytest.raises(ValueError):
        tiny.token_to_piece(10**9)
    with pytest.raises(ValueError):
        tiny.stream_decoder().push(n)


def test_bad_inputs(tiny):
    with pytest.raises(ValueError, match="not an integer"):
        tiny.decode(["3"])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="not an integer"):
        tiny.decode([3.0])  # type: ignore[list-item]
    with pytest.raises(TypeError):
        tiny.encode(b"bytes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="UTF-8"):
        tiny.encode("a\ud800b")


def test_decode_accepts_numpy_ints(tiny):
    import numpy as np
    ids = np.array(tiny.encode("hello world"), dtype=np.int32)
    assert tiny.decode(ids) == "hello world"


# --------------------------------------------------------------------------------------------
# chat template
# --------------------------------------------------------------------------------------------

MESSAGES = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "Bye"}]


def test_chatml_fallback(tiny):
    assert tiny.chat_template is None
    out = tiny.apply_chat_template(MESSAGES)
    assert out == ("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n"
                   "<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n")
    assert not tiny.apply_chat_template(MESSAGES, add_generation_prompt=False).endswith("assistant\n")
    ids = tiny.encode(out)
    assert ids.count(1) == 4 and ids.count(2) == 3


def test_template_from_gguf_with_variables():
    template = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}"
                "{{ raise_exception('no system') }}{% endif %}[{{ m['role'] }}]{{ m['content'] }}"
                "{{ eos_token }}{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}"
                "{% if tools %}{{ tools | tojson }}{% endif %}")
    tok = Tokenizer.from_fields(tiny_fields(**{"tokenizer.chat_template": template}))
    assert tok.apply_chat_template(MESSAGES[:1]) == "<|im_start|>[user]Hi<|im_end|>[assistant]"
    assert tok.apply_chat_template(MESSAGES[:1], add_generation_prompt=False, tools=[{"n": "é"}]) == \
        '<|im_start|>[user]Hi<|im_end|>[{"n": "é"}]'
    with pytest.raises(TokenizerError, match="no system"):
        tok.apply_chat_template([{"role": "system", "content": "x"}])


def test_template_is_sandboxed():
    from jinja2.sandbox import SecurityError

    template = "{{ messages.__class__.__mro__ }}"
    tok = Tokenizer.from_fields(tiny_fields(**{"tokenizer.chat_template": template}))
    with pytest.raises(TokenizerError, match=r"chat template error: .*unsafe") as exc:
        tok.apply_chat_template(MESSAGES)
    assert isinstance(exc.value.__cause__, SecurityError)
    bad = Tokenizer.from_fields(tiny_fields(**{"tokenizer.chat_template": "{% for %}"}))
    with pytest.raises(TokenizerError, match="chat template"):
        bad.apply_chat_template(MESSAGES)


def test_chatml_constant_renders_like_smollm_template_shape():
    assert "<|im_start|>" in CHATML_TEMPLATE and "add_generation_prompt" in CHATML_TEMPLATE


# --------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------

def test_unknown_pre_names_it():
    with pytest.raises(TokenizerError, match="no-such-pre"):
        Tokenizer.from_fields(tiny_fields(pre="no-such-pre"))


def test_missing_pre_warns_and_uses_default():
    fields = tiny_fields()
    del fields["tokenizer.ggml.pre"]
    with pytest.warns(UserWarning, match="default"):
        tok = Tokenizer.from_fields(fields)
    assert tok.pre == "default"


@pytest.mark.parametrize("key", ["tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.merges"])
def test_missing_required_field_names_it(key):
    fields = tiny_fields()
    del fields[key]
    with pytest.raises(TokenizerError, match=key.replace(".", r"\.")):
        Tokenizer.from_fields(fields)


def test_unsupported_model_names_it():
    with pytest.raises(TokenizerError, match="'bert'") as exc:
        Tokenizer.from_fields(tiny_fields(**{"tokenizer.ggml.model": "bert"}))
    assert "tokenizer.ggml.model" in str(exc.value)
    assert isinstance(exc.value, EdgekvError)


def test_bad_fields():
    with pytest.raises(TokenizerError, match="token_type"):
        Tokenizer.from_fields(tiny_fields(**{"tokenizer.ggml.token_type": [1, 1]}))
    with pytest.raises(TokenizerError, match="eos_token_id"):
        Tokenizer.from_fields(tiny_fields(**{"tokenizer.ggml.eos_token_id": 10**6}))
    with pytest.raises(TokenizerError, match="tokenizer.ggml.tokens"):
        Tokenizer.from_fields(tiny_fields(**{"tokenizer.ggml.tokens": "abc"}))
    with pytest.raises(TokenizerError):
        Tokenizer.from_fields("not a mapping")  # type: ignore[arg-type]


def test_bad_merges_are_dropped_and_counted():
    tok = Tokenizer.from_fields(tiny_fields(**{"tokenizer.ggml.merges": TINY_MERGES + ["x", "q z", "h e"]}))
    assert tok.dropped_merges == 2   # "x" has no space; "qz" is not a token; the duplicate is skipped
    assert tok.encode("hello") == [tid(tok, "hello")]


def test_from_gguf_missing_file(tmp_path):
    with pytest.raises(ModelLoadError):
        Tokenizer.from_gguf(tmp_path / "nope.gguf")


# --------------------------------------------------------------------------------------------
# identity
# --------------------------------------------------------------------------------------------

def test_identity_same_as_diff(tiny):
    other = Tokenizer.from_fields(tiny_fields())
    assert hash(tiny.identity()) == hash(other.identity())
    assert tiny.same_as(other) and other.same_as(tiny)
    assert tiny.diff(other) == ""
    assert not tiny.same_as("x")  # type: ignore[arg-type]

    fields = tiny_fields()
    fields["tokenizer.ggml.tokens"] = list(fields["tokenizer.ggml.tokens"])
    fields["tokenizer.ggml.tokens"][100] = "changed"
    changed = Tokenizer.from_fields(fields)
    assert not tiny.same_as(changed)
    assert "token 100" in tiny.diff(changed) and "changed" in tiny.diff(changed)

    bigger = tiny_fields()
    bigger["tokenizer.ggml.tokens"] = bigger["tokenizer.ggml.tokens"] + ["extra"]
    bigger["tokenizer.ggml.token_type"] = bigger["tokenizer.ggml.token_type"] + [1]
    assert "vocab size" in tiny.diff(Tokenizer.from_fields(bigger))

    fewer = Tokenizer.from_fields(tiny_fields(**{"tokenizer.ggml.merges": TINY_MERGES[:-1]}))
    assert "merge" in tiny.diff(fewer)
    swapped = Tokenizer.from_fields(tiny_fields(**{"tokenizer.ggml.merges": TINY_MERGES[1:2] + TINY_MERGES[:1] + TINY_MERGES[2:]}))
    assert "merge 0" in tiny.diff(swapped)

    assert "bos" in tiny.diff(Tokenizer.from_fields(tiny_fields(**{"tokenizer.ggml.bos_token_id": 0})))
    assert "eos" in tiny.diff(Tokenizer.from_fields(tiny_fields(**{"tokenizer.ggml.eos_token_id": 0})))


# --------------------------------------------------------------------------------------------
# a real GGUF file written here (reader path, no big download)
# --------------------------------------------------------------------------------------------

def test_from_gguf_small_file(tmp_path):
    import gguf
    fields = tiny_fields(**{"tokenizer.chat_template": CHATML_TEMPLATE})
    path = tmp_path / "tiny.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model(fields["tokenizer.ggml.model"])
    w.add_tokenizer_pre(fields["tokenizer.ggml.pre"])
    w.add_token_list(fields["tokenizer.ggml.tokens"])
    w.add_token_types(fields["tokenizer.ggml.token_type"])
    w.add_token_merges(fields["tokenizer.ggml.merges"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(CHATML_TEMPLATE)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    from_file = Tokenizer.from_gguf(path)
    assert from_file.same_as(Tokenizer.from_fields(fields)), from_file.diff(Tokenizer.from_fields(fields))
    assert Tokenizer.read_fields(path)["tokenizer.ggml.pre"] == "smollm"
    assert from_file.encode("hello<|im_end|>") == [tid(from_file, "hello"), 2]


# --------------------------------------------------------------------------------------------
# integration: the real SmolLM2 file vs llama.cpp
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm_path():
    return registry_model("smollm2-135m")


@pytest.fixture(scope="module")
def smollm_meta(smollm_path):
    """Every metadata field of the SmolLM2 file: key -> (value, GGUF value types)."""
    import gguf
    reader = gguf.GGUFReader(str(smollm_path))
    return {k: (f.contents(), list(f.types)) for k, f in reader.fields.items()}


@pytest.fixture(scope="module")
def smollm(smollm_meta):
    return Tokenizer.from_fields({k: v for k, (v, _) in smollm_meta.items() if k.startswith("tokenizer.")})


def _llama(llama_cpp, path):
    return llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)


@pytest.fixture(scope="module")
def smollm_llama(llama_cpp, smollm_path):
    return _llama(llama_cpp, smollm_path)


def _wikitext_lines(n=200):
    with open(TEXT_EXCERPT, encoding="utf-8") as f:
        lines = f.readlines()
    assert len(lines) >= n, f"{TEXT_EXCERPT} has {len(lines)} lines, {n} wanted"
    return lines[:n]


EDGE_TEXTS = [
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "12345 3.14159",
    "1,000,000.50 and -42e10 ¹²³ ١٢٣",
    "   leading and trailing   ",
    "tabs\t\tand\nnewlines\n\n\n  \n x\r\n\r\ny",
    "     ",
    "\n",
    "héllo wörld — naïve café, Ελληνικά, русский, 日本語のテキスト, 한국어, עברית, العربية",
    "emoji 🎉👍🏽👨‍👩‍👧 and symbols ∑∫√ ™ ©",
    "don't I'LL we've they're she'd 'S 'sup",
    "\u00a0nbsp\u2003em\u3000ideographic\u200bzero-width",
    "<|im_end|<|im_start> broken <reponame> <|endoftext|>",
    "",
]


def test_smollm_metadata(smollm):
    assert smollm.vocab_size == 49152
    assert smollm.pre == "smollm"
    assert smollm.bos_id == 1 and smollm.eos_id == 2
    assert smollm.add_bos is False
    assert {0, 2} <= smollm.eot_ids  # <|endoftext|>, <|im_end|>
    assert smollm.chat_template and "<|im_start|>" in smollm.chat_template
    assert smollm.dropped_merges == 0


@pytest.mark.parametrize("parse_special", [True, False])
def test_smollm_edge_cases_match_llama_cpp(smollm, smollm_llama, parse_special):
    for text in EDGE_TEXTS:
        ours = smollm.encode(text, parse_special=parse_special)
        ref = smollm_llama.tokenize(text.encode("utf-8"), add_bos=False, special=parse_special)
        assert ours == ref, text
        assert smollm.decode(ours) == text


def test_smollm_wikitext_lines_match_llama_cpp(smollm, smollm_llama):
    lines = _wikitext_lines(200)
    for line in lines:
        assert smollm.encode(line) == smollm_llama.tokenize(line.encode("utf-8"), add_bos=False, special=True), line
    joined = "".join(lines)
    ours = smollm.encode(joined)
    assert ours == smollm_llama.tokenize(joined.encode("utf-8"), add_bos=False, special=True)
    assert smollm.decode(ours) == joined


def _write_vocab_only_gguf(meta, path, overrides):
    """A GGUF with ``meta``'s key/values (``overrides`` replacing some) and no tensors: enough for
    llama.cpp's vocab_only load."""
    import gguf

    w = gguf.GGUFWriter(str(path), meta["general.architecture"][0])
    for key, (value, types) in meta.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        value = overrides.get(key, value)
        if types[0] == gguf.GGUFValueType.ARRAY:
            w.add_key_value(key, value, types[0], sub_type=types[-1])
        else:
            w.add_key_value(key, value, types[0])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("pre", ["qwen2", "gpt-2", "default", "llama-bpe"])
def test_other_pre_tokenizers_match_llama_cpp(llama_cpp, smollm_meta, tmp_path, pre):
    """SmolLM2's vocabulary under another tokenizer.ggml.pre: our regex table vs llama.cpp's."""
    path = tmp_path / f"vocab-{pre}.gguf"
    _write_vocab_only_gguf(smollm_meta, path, {"tokenizer.ggml.pre": pre})
    fields = {k: v for k, (v, _) in smollm_meta.items() if k.startswith("tokenizer.")}
    fields["tokenizer.ggml.pre"] = pre
    tok = Tokenizer.from_fields(fields)
    llama = _llama(llama_cpp, path)
    texts = EDGE_TEXTS + _wikitext_lines(100) + ["\U00013ba6's \u1b4e! \u0f3a\u2e80 x\u1c89y 12\U0001ccf5"]
    for text in texts:
        for parse_special in (True, False):
            assert tok.encode(text, parse_special=parse_special) == \
                llama.tokenize(text.encode("utf-8"), add_bos=False, special=parse_special), (pre, text)


def test_smollm_chat_template_round_trip(smollm, smollm_llama):
    prompt = smollm.apply_chat_template([{"role": "user", "content": "What is 12*12?"}])
    assert prompt == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
                      "Face<|im_end|>\n<|im_start|>user\nWhat is 12*12?<|im_end|>\n<|im_start|>assistant\n")
    ids = smollm.encode(prompt)
    assert ids == smollm_llama.tokenize(prompt.encode(), add_bos=False, special=True)
    assert ids[0] == 1 and ids.count(1) == 3 and ids.count(2) == 2


def _llama_piece(llama, token_id, special=True):
    """llama.cpp's token_to_piece with a buffer large enough for any token (llama-cpp-python's own
    detokenize uses 32 bytes per token and returns nothing for longer pieces)."""
    import ctypes

    import llama_cpp

    buf = ctypes.create_string_buffer(1024)
    n = llama_cpp.llama_token_to_piece(llama._model.vocab, token_id, buf, len(buf), 0, special)
    assert 0 <= n <= len(buf)
    return buf.raw[:n]


def test_smollm_pieces_match_llama_cpp(smollm, smollm_llama):
    rng = random.Random(0)
    ids = list(range(0, 300)) + rng.sample(range(smollm.vocab_size), 3000)
    for i in ids:
        assert smollm.token_to_piece(i) == _llama_piece(smollm_llama, i), i
        assert smollm.token_to_piece(i, special=False) == _llama_piece(smollm_llama, i, special=False), i


def test_smollm_stream_decoder_matches_decode(smollm):
    text = "".join(EDGE_TEXTS)
    ids = smollm.encode(text)
    dec = smollm.stream_decoder()
    streamed = "".join(dec.push(i) for i in ids) + dec.flush()
    assert streamed == smollm.decode(ids) == text


def test_smollm_same_as_itself_not_tiny(smollm, smollm_path, tiny):
    again = Tokenizer.from_fields(Tokenizer.read_fields(smollm_path))
    assert smollm.same_as(again) and smollm.diff(again) == ""
    assert not smollm.same_as(tiny)
    assert "vocab size" in smollm.diff(tiny)


# --------------------------------------------------------------------------------------------
# integration: Qwen2.5-Coder-0.5B (pre "qwen2")
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def qwen(llama_cpp, qwen05_path):
    return Tokenizer.from_gguf(qwen05_path), _llama(llama_cpp, qwen05_path)


def test_qwen_matches_llama_cpp(qwen):
    tok, llama = qwen
    assert tok.pre == "qwen2"
    texts = EDGE_TEXTS + ["<tool_call>{\"a\": 1}</tool_call> [PAD151665] <|fim_prefix|>x<|fim_suffix|>"]
    texts += _wikitext_lines(50)
    for text in texts:
        for parse_special in (True, False):
            assert tok.encode(text, parse_special=parse_special) == \
                llama.tokenize(text.encode("utf-8"), add_bos=False, special=parse_special), text
    assert {151643, 151645} <= tok.eot_ids
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")


# --------------------------------------------------------------------------------------------
# SentencePiece (tokenizer.ggml.model "llama"): a tiny vocabulary, then Gemma 3 vs llama.cpp
# --------------------------------------------------------------------------------------------

def spm_fields(**overrides):
    """Control tokens, the 256 byte tokens, then scored pieces. "ab" outscores "bc" (so "abc" is
    "ab" + "c" although "bc" comes first in the list); "xy" twice in a row ties: leftmost first."""
    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    byte_tokens = ["<0x%02X>" % b for b in range(256)]
    pieces = [("\u2581", -1.0), ("a", -2.0), ("b", -2.0), ("c", -2.0), ("x", -2.0), ("y", -2.0),
              ("bc", -5.0), ("ab", -3.0), ("xy", -4.0), ("yx", -4.0), ("\u2581a", -2.5), ("\u2581ab", -1.5)]
    fields = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": specials + byte_tokens + [p for p, _ in pieces],
        "tokenizer.ggml.scores": [-1000.0] * 4 + [0.0] * 256 + [s for _, s in pieces],
        "tokenizer.ggml.token_type": [3, 3, 3, 2] + [6] * 256 + [1] * len(pieces),
        "tokenizer.ggml.bos_token_id": 2,
        "tokenizer.ggml.eos_token_id": 1,
        "tokenizer.ggml.add_space_prefix": False,
    }
    fields.update(overrides)
    return fields


def test_spm_merges_by_score_ties_leftmost_and_falls_back_to_bytes():
    tok = Tokenizer.from_fields(spm_fields())
    t = tok.token_id
    assert tok.hf_tokenizer is None and tok.add_bos is True  # llama.cpp's SentencePiece default
    assert tok.encode("abc", add_bos=False) == [t("ab"), t("c")]  # score, not list order
    assert tok.encode("xyxy", add_bos=False) == [t("xy"), t("xy")]  # equal scores: leftmost pair first
    assert tok.encode(" ab", add_bos=False) == [t("\u2581ab")]  # spaces are U+2581
    assert tok.encode("é", add_bos=False) == [t("<0xC3>"), t("<0xA9>")]  # no piece: UTF-8 bytes
    assert tok.encode("ab") == [2, t("ab")]
    assert tok.encode("<eos>ab", add_bos=False) == [1, t("ab")]
    assert tok.decode(tok.encode(" ab é", add_bos=False)) == " ab é"
    assert tok.token_to_piece(3) == "\u2585".encode()  # llama.cpp's rendering of <unk>
    spaced = Tokenizer.from_fields(spm_fields(**{"tokenizer.ggml.add_space_prefix": True}))
    assert spaced.encode("ab", add_bos=False) == [t("\u2581ab")]
    assert spaced.encode("<eos>ab", add_bos=False) == [1, t("\u2581ab")]  # again after a special token
    assert not spaced.same_as(tok) and "add_space_prefix" in spaced.diff(tok)


def test_spm_bad_scores_named():
    with pytest.raises(TokenizerError, match="scores"):
        Tokenizer.from_fields(spm_fields(**{"tokenizer.ggml.scores": [0.0, 1.0]}))


@pytest.fixture(scope="module")
def gemma(llama_cpp):
    path = registry_model("gemma3-270m")
    return Tokenizer.from_gguf(path), _llama(llama_cpp, path)


GEMMA_TEXTS = EDGE_TEXTS + ["<start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\n",
                            "<bos><eos><unk><pad> <mask> [multimodal] <unused0>", "\x00\x01\x7f ÿ"]


def test_gemma_matches_llama_cpp(gemma):
    """Gemma 3's 262,144-token SentencePiece vocabulary: the ids llama.cpp gives, with and without
    BOS and special-token parsing, on edge cases and 200 lines of WikiText-2 (one by one and
    joined), and the text back."""
    tok, llama = gemma
    assert tok.vocab_size == 262144 and tok.bos_id == 2 and tok.add_bos is True
    assert {1, tok.token_id("<end_of_turn>")} <= tok.eot_ids
    lines = _wikitext_lines(200)
    for text in GEMMA_TEXTS + lines + ["".join(lines)]:
        for parse_special in (True, False):
            ours = tok.encode(text, parse_special=parse_special)
            assert ours == llama.tokenize(text.encode("utf-8"), add_bos=True, special=parse_special), text
            assert tok.decode(ours[1:]) == text
    assert tok.encode("x", add_bos=False) == llama.tokenize(b"x", add_bos=False, special=True)


def test_gemma_pieces_match_llama_cpp(gemma):
    """Pieces of a sample of ids, and the end-of-generation set over the whole vocabulary
    (llama.cpp counts the user-defined "</s>" as one)."""
    import llama_cpp

    tok, llama = gemma
    vocab = llama._model.vocab
    assert tok.eot_ids == {i for i in range(tok.vocab_size) if llama_cpp.llama_vocab_is_eog(vocab, i)}
    for i in list(range(400)) + list(range(400, tok.vocab_size, 997)):
        assert tok.token_to_piece(i) == _llama_piece(llama, i), i
        assert tok.token_to_piece(i, special=False) == _llama_piece(llama, i, special=False), i
