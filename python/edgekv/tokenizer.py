"""The tokenizer of a GGUF model, built from the file's metadata, giving the same ids as llama.cpp.

Two tokenizer models are supported: byte-level BPE (``tokenizer.ggml.model == "gpt2"``: SmolLM2,
Qwen, Llama 3), described below, and SentencePiece (``"llama"``: Gemma), encoded by ``_spm_encode``
with llama.cpp's ``llm_tokenizer_spm`` algorithm (no pre-tokenizer, no merge list).

A GGUF file with ``tokenizer.ggml.model == "gpt2"`` describes a byte-level BPE tokenizer: the
vocabulary (``tokenizer.ggml.tokens``), the merge list (``tokenizer.ggml.merges``), a type per
token (``tokenizer.ggml.token_type``) and the name of a pre-tokenizer (``tokenizer.ggml.pre``).
This module rebuilds that tokenizer with the HuggingFace ``tokenizers`` library (``models.BPE``
over the vocabulary and merges, a byte-level decoder) and reproduces llama.cpp's behaviour
around it:

* **Pre-tokenizer.** Each ``tokenizer.ggml.pre`` name maps (through the ``PRE_TOKENIZERS``
  table) to the list of regular expressions llama.cpp applies one after the other
  (``llm_tokenizer_bpe`` in ``llama-vocab.cpp``); each expression splits every piece produced by
  the previous one, keeping both the matches and the text between them. For ``smollm`` that is
  one digit per piece, then the GPT-2 split; for ``qwen2`` the Qwen2 expression (llama.cpp's
  case-spelled-out form of the ``(?i:'s|...)`` contractions); for ``gpt-2``/``gpt2`` the GPT-2
  split; for ``default`` (and a missing name) llama.cpp's four-expression default chain.
  No Unicode normalisation is applied (llama.cpp applies none, even where the HF tokenizer.json
  of the model has an NFC normaliser). Letters, digits and punctuation new in Unicode 16.0 are
  taken out of ``\\p{L}``/``\\p{N}``/``\\p{P}``, because llama.cpp's tables do not have them yet
  (see ``_UNICODE16_LNP``).
* **Special tokens.** Control tokens (type 3), user-defined tokens (type 4) and unknown tokens
  (type 2) are cut out of the input as whole tokens before the pre-tokenizer runs, longest token
  text first, leftmost occurrence first, exactly like llama.cpp's ``tokenizer_st_partition``.
  With ``parse_special=False`` control and unknown tokens are left as plain text, but
  user-defined tokens are still matched (llama.cpp does the same). Tokens whose text llama.cpp
  treats as end-of-turn / FIM / end-of-generation markers (``<|im_end|>``, ``<|endoftext|>``,
  ``<|fim_prefix|>`` ...) are promoted to control tokens, as llama.cpp does at load time.
* **Decoding.** Normal tokens are mapped back through the GPT-2 byte table; user-defined tokens
  are emitted as their raw text; control tokens as their text unless ``skip_special``; unused
  (type 5) and undefined (type 0) tokens as nothing (llama.cpp's ``token_to_piece``).

``parse_special`` defaults to ``True``, as in llama.cpp's chat and server paths: a prompt that
contains ``<|im_start|>`` gets the single control token, never its characters. Pass
``parse_special=False`` for untrusted text that must not be able to inject control tokens.

Public API: ``Tokenizer`` (``from_gguf``, ``from_fields``, ``encode``, ``decode``,
``token_to_piece``, ``stream_decoder``, ``apply_chat_template``, ``identity``, ``same_as``,
``diff``, properties ``vocab_size``, ``bos_id``, ``eos_id``, ``eot_ids``, ``special_ids``),
``StreamDecoder``, ``PRE_TOKENIZERS``, ``CHATML_TEMPLATE``.
"""

from __future__ import annotations

import codecs
import datetime
import json
import operator
import os
import warnings
from dataclasses import dataclass
from typing import Any, Dict, FrozenSet, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

from .errors import ModelLoadError, TokenizerError

__all__ = [
    "Tokenizer",
    "StreamDecoder",
    "PRE_TOKENIZERS",
    "CHATML_TEMPLATE",
    "BUILTIN_CHAT_FORMATS",
    "TOKEN_TYPE_UNDEFINED",
    "TOKEN_TYPE_NORMAL",
    "TOKEN_TYPE_UNKNOWN",
    "TOKEN_TYPE_CONTROL",
    "TOKEN_TYPE_USER_DEFINED",
    "TOKEN_TYPE_UNUSED",
    "TOKEN_TYPE_BYTE",
]

# GGUF token types (gguf.TokenType / llama_token_type).
TOKEN_TYPE_UNDEFINED = 0
TOKEN_TYPE_NORMAL = 1
TOKEN_TYPE_UNKNOWN = 2
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4
TOKEN_TYPE_UNUSED = 5
TOKEN_TYPE_BYTE = 6

# GGUF metadata keys read by this module.
KEY_MODEL = "tokenizer.ggml.model"
KEY_PRE = "tokenizer.ggml.pre"
KEY_TOKENS = "tokenizer.ggml.tokens"
KEY_TOKEN_TYPE = "tokenizer.ggml.token_type"
KEY_MERGES = "tokenizer.ggml.merges"
KEY_BOS = "tokenizer.ggml.bos_token_id"
KEY_EOS = "tokenizer.ggml.eos_token_id"
KEY_EOT = "tokenizer.ggml.eot_token_id"
KEY_EOM = "tokenizer.ggml.eom_token_id"
KEY_PAD = "tokenizer.ggml.padding_token_id"
KEY_ADD_BOS = "tokenizer.ggml.add_bos_token"
KEY_SCORES = "tokenizer.ggml.scores"
KEY_ADD_SPACE = "tokenizer.ggml.add_space_prefix"
KEY_CHAT_TEMPLATE = "tokenizer.chat_template"

# --------------------------------------------------------------------------------------------
# Pre-tokenizers (the regular expressions of llama.cpp's llm_tokenizer_bpe, per pre type)
# --------------------------------------------------------------------------------------------

# GPT-2: 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)  (llama.cpp's
# hand-written matcher also takes a lone trailing run of whitespace, i.e. the "|\s+" branch of the
# original GPT-2 expression; with the gaps kept as pieces, the two spellings split alike).
RE_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
RE_DIGIT = r"\p{N}"
# Qwen2 / StableLM2: llama.cpp's form of "(?i:'s|'t|'re|'ve|'m|'ll|'d)|..." with the case folding
# spelled out, so that e.g. "'ſ" (long s, which case-folds to s) is not taken as a contraction.
RE_QWEN2 = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
    r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
RE_LLAMA3 = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
    r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# llama.cpp's LLAMA_VOCAB_PRE_TYPE_DEFAULT chain.
RE_DEFAULT_CHAIN = (
    r"[\p{P}\$\+<=>\^~\|]+",
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)",
    r"\p{N}+",
    r"[0-9][0-9][0-9]",
)


# Letters, numbers and punctuation that Unicode 16.0 (2024) added. The HuggingFace tokenizers
# regex engine (Oniguruma) already knows them, but llama.cpp's unicode tables (llama-cpp-python
# 0.3.36's llama.cpp) predate Unicode 16 and see them as unassigned, i.e. neither \p{L}, \p{N}
# nor \p{P}. The ranges were found by probing llama.cpp with every code point; ``_llama_regex``
# takes them out of those classes so that the splits agree for them too.
_UNICODE16_LNP = (
    (0x01B4E, 0x01B4F), (0x01B7F, 0x01B7F), (0x01C89, 0x01C8A), (0x0A7CB, 0x0A7CD),
    (0x0A7DA, 0x0A7DC), (0x105C0, 0x105F3), (0x10D40, 0x10D65), (0x10D6E, 0x10D85),
    (0x10EC2, 0x10EC4), (0x11380, 0x11389), (0x1138B, 0x1138B), (0x1138E, 0x1138E),
    (0x11390, 0x113B5), (0x113B7, 0x113B7), (0x113D1, 0x113D1), (0x113D3, 0x113D5),
    (0x113D7, 0x113D8), (0x116D0, 0x116E3), (0x11BC0, 0x11BE1), (0x11BF0, 0x11BF9),
    (0x13460, 0x143FA), (0x16100, 0x1611D), (0x16130, 0x16139), (0x16D40, 0x16D79),
    (0x18CFF, 0x18CFF), (0x1CCF0, 0x1CCF9), (0x1E5D0, 0x1E5ED), (0x1E5F0, 0x1E5FA),
    (0x1E5FF, 0x1E5FF),
)


def _llama_regex(rx: str) -> str:
    r"""``rx`` for Oniguruma with llama.cpp's idea of \p{L}, \p{N} and \p{P} (see
    ``_UNICODE16_LNP``). A nested class works both inside and outside brackets."""
    excl = "".join(
        "\\x{%X}" % a if a == b else "\\x{%X}-\\x{%X}" % (a, b) for a, b in _UNICODE16_LNP)
    for cls in ("L", "N", "P"):
        rx = rx.replace("\\p{%s}" % cls, "[\\p{%s}&&[^%s]]" % (cls, excl))
    return rx


@dataclass(frozen=True)
class PreTokenizerSpec:
    """How llama.cpp pre-tokenizes for one ``tokenizer.ggml.pre`` family.

    ``regexes`` are applied in order, each splitting every piece of the previous step (matches
    and the text between matches both become pieces); ``ignore_merges`` takes a whole piece as
    one token when it is in the vocabulary; ``add_bos`` is llama.cpp's default for the family
    (the GGUF's ``tokenizer.ggml.add_bos_token`` overrides it)."""

    family: str
    regexes: Tuple[str, ...]
    ignore_merges: bool = False
    add_bos: bool = False

    def build(self):
        """The HuggingFace pre-tokenizer: the regex splits, then the GPT-2 byte-to-unicode map."""
        from tokenizers import Regex, pre_tokenizers

        steps = [pre_tokenizers.Split(Regex(_llama_regex(rx)), behavior="isolated")
                 for rx in self.regexes]
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False))
        return pre_tokenizers.Sequence(steps)


_SPEC_DEFAULT = PreTokenizerSpec("default", RE_DEFAULT_CHAIN)
_SPEC_GPT2 = PreTokenizerSpec("gpt2", (RE_GPT2,))
_SPEC_SMOLLM = PreTokenizerSpec("smollm", (RE_DIGIT, RE_GPT2))
_SPEC_QWEN2 = PreTokenizerSpec("qwen2", (RE_QWEN2,))
_SPEC_LLAMA3 = PreTokenizerSpec("llama3", (RE_LLAMA3,), ignore_merges=True, add_bos=True)
_SPEC_DBRX = PreTokenizerSpec("dbrx", (RE_LLAMA3,))

# tokenizer.ggml.pre name -> pre-tokenizer spec (the names llama.cpp's llama-vocab.cpp accepts
# for these families, plus "gpt2" as an alias of llama.cpp's "gpt-2").
PRE_TOKENIZERS: Dict[str, PreTokenizerSpec] = {
    "default": _SPEC_DEFAULT,
    # single-digit split, then GPT-2
    "smollm": _SPEC_SMOLLM,
    "starcoder": _SPEC_SMOLLM,
    "refact": _SPEC_SMOLLM,
    "command-r": _SPEC_SMOLLM,
    "codeshell": _SPEC_SMOLLM,
    "exaone": _SPEC_SMOLLM,
    "minerva-7b": _SPEC_SMOLLM,
    # plain GPT-2
    "gpt2": _SPEC_GPT2,
    "gpt-2": _SPEC_GPT2,
    "phi-2": _SPEC_GPT2,
    "mpt": _SPEC_GPT2,
    "olmo": _SPEC_GPT2,
    "jais": _SPEC_GPT2,
    "exaone4": _SPEC_GPT2,
    # Qwen2
    "qwen2": _SPEC_QWEN2,
    "deepseek-r1-qwen": _SPEC_QWEN2,
    "stablelm2": _SPEC_QWEN2,
    "megrez": _SPEC_QWEN2,
    "hunyuan": _SPEC_QWEN2,
    # Llama 3
    "llama3": _SPEC_LLAMA3,
    "llama-v3": _SPEC_LLAMA3,
    "llama-bpe": _SPEC_LLAMA3,
    "falcon3": _SPEC_LLAMA3,
    "dbrx": _SPEC_DBRX,
    "smaug-bpe": _SPEC_DBRX,
}

# tokenizer.ggml.model values of tokenizers this module cannot build, with what they are.
_UNSUPPORTED_MODELS = {
    "bert": "WordPiece (WPM)",
    "t5": "Unigram (UGM)",
    "rwkv": "RWKV",
    "plamo2": "PLaMo-2",
    "none": "no tokenizer",
    "no_vocab": "no tokenizer",
}

# Token texts llama.cpp treats as end-of-turn, end-of-message and FIM markers; it forces them to
# be control tokens at load time. (first occurrence wins per role, as llama.cpp keeps one id each)
_EOT_NAMES = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
              "<|end_of_text|>", "<EOT>", "_<EOT>", "[EOT]", "<end_of_utterance>")
_EOM_NAMES = ("<|eom_id|>",)
_FIM_PRE_NAMES = ("<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<PRE>", "<|code_prefix|>",
                  "<|prefix|>")
_FIM_SUF_NAMES = ("<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<SUF>", "<|code_suffix|>",
                  "<|suffix|>")
_FIM_MID_NAMES = ("<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<MID>", "<|code_middle|>",
                  "<|middle|>")
_FIM_PAD_NAMES = ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]")
_FIM_REP_NAMES = ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>")
_FIM_SEP_NAMES = ("<|file_sep|>",)
# Token texts that end generation (llama.cpp's special_eog_ids list, by text).
_EOG_NAMES = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<end_of_turn>",
              "<|endoftext|>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
              "<|end_of_text|>", "<end_of_utterance>", "</s>")  # "</s>": user-defined in Gemma 3, EOG to llama.cpp

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _bytes_to_unicode() -> Dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable unicode characters."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    table = {b: chr(b) for b in keep}
    n = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + n)
            n += 1
    return table


BYTE_TO_UNICODE: Dict[int, str] = _bytes_to_unicode()
UNICODE_TO_BYTE: Dict[str, int] = {c: b for b, c in BYTE_TO_UNICODE.items()}


def _byte_level_decode(text: str) -> bytes:
    """The bytes a normal byte-level token stands for (llama.cpp's ``llama_decode_text``)."""
    try:
        return bytes(UNICODE_TO_BYTE[c] for c in text)
    except KeyError:
        out = bytearray()
        for c in text:
            b = UNICODE_TO_BYTE.get(c)
            if b is not None:
                out.append(b)
            else:  # what llama.cpp emits for a character outside the byte table
                out += b"[UNK_BYTE_0x" + c.encode("utf-8").hex().encode() + text.encode("utf-8") + b"]"
        return bytes(out)


# --------------------------------------------------------------------------------------------
# SentencePiece (tokenizer.ggml.model == "llama"): llama.cpp's llm_tokenizer_spm
# --------------------------------------------------------------------------------------------

SPM_SPACE = "\u2581"  # what SentencePiece writes for a space
SPM_UNKNOWN_PIECE = "\u2585".encode("utf-8")  # what llama.cpp renders for the unknown token
_MODELS = ("gpt2", "llama")
_SPEC_SPM = PreTokenizerSpec("spm", (), add_bos=True)  # llama.cpp's default: SentencePiece adds BOS


def _spm_byte(text: str) -> bytes:
    """The byte a ``<0xXX>`` byte token stands for (its text otherwise)."""
    if len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
        try:
            return bytes([int(text[3:5], 16)])
        except ValueError:
            pass
    return text.encode("utf-8")


def _spm_byte_ids(token_to_id: Mapping[str, int]) -> List[Optional[int]]:
    """Per byte value, the token llama.cpp falls back to (byte_to_token): ``<0xXX>``, else the
    one-character token of that byte, else None (llama.cpp would throw; we raise when used)."""
    out: List[Optional[int]] = []
    for b in range(256):
        tid = token_to_id.get("<0x%02X>" % b)
        if tid is None and b < 128:
            tid = token_to_id.get(chr(b))
        out.append(tid)
    return out


def _spm_encode(text: str, token_to_id: Mapping[str, int], scores: Sequence[float],
                byte_ids: Sequence[Optional[int]]) -> List[int]:
    """SentencePiece BPE over one raw piece (spaces already U+2581): start from the characters,
    repeatedly merge the adjacent pair whose concatenation is the highest-scoring token (ties: the
    leftmost pair), then emit each symbol's token, or its UTF-8 bytes as byte tokens when the
    symbol is no token (llama.cpp's llm_tokenizer_spm_session)."""
    import heapq

    chars = list(text)
    n = len(chars)
    if n == 0:
        return []
    sym = chars[:]  # text of each live symbol ("" once merged into its left neighbour)
    prev = list(range(-1, n - 1))
    nxt = list(range(1, n + 1))
    nxt[-1] = -1
    heap: List[Tuple[float, int, str]] = []

    def push(left: int, right: int) -> None:
        if left < 0 or right < 0:
            return
        joined = sym[left] + sym[right]
        tid = token_to_id.get(joined)
        if tid is not None:
            heapq.heappush(heap, (-scores[tid], left, joined))

    for i in range(n - 1):
        push(i, i + 1)
    while heap:
        _, left, joined = heapq.heappop(heap)
        right = nxt[left] if sym[left] else -1
        # stale: a side was merged away or grew since this pair was queued
        if right < 0 or sym[left] + sym[right] != joined:
            continue
        sym[left] = joined
        sym[right] = ""
        nxt[left] = nxt[right]
        if nxt[right] >= 0:
            prev[nxt[right]] = left
        push(prev[left], left)
        push(left, nxt[left])
    out: List[int] = []
    i = 0
    while i >= 0:
        tid = token_to_id.get(sym[i])
        if tid is not None:
            out.append(tid)
        else:
            for b in sym[i].encode("utf-8"):
                bid = byte_ids[b]
                if bid is None:
                    raise TokenizerError(f"the vocabulary has no byte token for 0x{b:02X} (needed for {sym[i]!r})")
                out.append(bid)
        i = nxt[i]
    return out


# --------------------------------------------------------------------------------------------
# Field helpers
# --------------------------------------------------------------------------------------------

def _as_str(value: Any, key: str) -> str:
    if isinstance(value, UnicodeDecodeError):  # the GGUF reader keeps a value that is not UTF-8 as its error
        raise TokenizerError(f"GGUF field {key} is not valid UTF-8 ({value.reason} at byte {value.start})")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).decode("utf-8", errors="replace")
    return str(value)


def _as_str_list(key: str, value: Any) -> List[str]:
    if isinstance(value, UnicodeDecodeError):
        _as_str(value, key)  # raises
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise TokenizerError(f"GGUF field {key} should be an array of strings, got {type(value).__name__}")
    return [_as_str(v, key) for v in value]


def _as_int_list(key: str, value: Any) -> List[int]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise TokenizerError(f"GGUF field {key} should be an array of integers, got {type(value).__name__}")
    try:
        return [int(v) for v in value]
    except (TypeError, ValueError) as exc:
        raise TokenizerError(f"GGUF field {key} should be an array of integers: {exc}") from None


def _as_float_list(key: str, value: Any) -> List[float]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise TokenizerError(f"GGUF field {key} should be an array of numbers, got {type(value).__name__}")
    try:
        return [float(v) for v in value]
    except (TypeError, ValueError) as exc:
        raise TokenizerError(f"GGUF field {key} should be an array of numbers: {exc}") from None


def _opt_int(fields: Mapping[str, Any], key: str) -> Optional[int]:
    value = fields.get(key)
    if value is None:
        return None
    if isinstance(value, (list, tuple)) and len(value) == 1:
        value = value[0]
    try:
        return int(value)
    except (TypeError, ValueError):
        raise TokenizerError(f"GGUF field {key} should be an integer, got {value!r}") from None


def _opt_bool(fields: Mapping[str, Any], key: str) -> Optional[bool]:
    value = fields.get(key)
    if value is None:
        return None
    if isinstance(value, (list, tuple)) and len(value) == 1:
        value = value[0]
    return bool(value)


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------

class Tokenizer:
    """A GGUF model's byte-level BPE tokenizer; ``encode`` gives llama.cpp's token ids.

    Build it with ``Tokenizer.from_gguf(path)`` or ``Tokenizer.from_fields(fields)``."""

    def __init__(
        self,
        tokens: Sequence[str],
        merges: Sequence[str],
        token_types: Optional[Sequence[int]] = None,
        *,
        pre: Optional[str] = "default",
        bos_id: Optional[int] = None,
        eos_id: Optional[int] = None,
        eot_id: Optional[int] = None,
        eom_id: Optional[int] = None,
        pad_id: Optional[int] = None,
        add_bos: Optional[bool] = None,
        chat_template: Optional[str] = None,
        model: str = "gpt2",
        scores: Optional[Sequence[float]] = None,
        add_space_prefix: Optional[bool] = None,
    ) -> None:
        if model not in _MODELS:
            what = _UNSUPPORTED_MODELS.get(model, "unknown")
            raise TokenizerError(
                f"unsupported tokenizer: {KEY_MODEL} = {model!r} ({what}); supported: 'gpt2' "
                f"(byte-level BPE) and 'llama' (SentencePiece)"
            )
        spm = model == "llama"
        if spm:
            pre = pre or "default"  # SentencePiece has no pre-tokenizer; the name is not used
        if pre is None or pre == "":
            warnings.warn(
                f"GGUF has no {KEY_PRE}; using llama.cpp's 'default' pre-tokenizer "
                f"(llama.cpp warns that generation quality will be degraded)",
                stacklevel=3,
            )
            pre = "default"
        spec = _SPEC_SPM if spm else PRE_TOKENIZERS.get(pre)
        if spec is None:
            raise TokenizerError(
                f"unsupported pre-tokenizer: {KEY_PRE} = {pre!r}; supported: "
                f"{', '.join(sorted(PRE_TOKENIZERS))}"
            )
        if not tokens:
            raise TokenizerError(f"GGUF field {KEY_TOKENS} is empty")

        n = len(tokens)
        # llama.cpp renames empty tokens so that they cannot match anything
        tokens = [t if t else f"[EMPTY_{i}]" for i, t in enumerate(tokens)]
        if token_types is None:
            token_types = [TOKEN_TYPE_NORMAL] * n
        token_types = list(token_types)
        if len(token_types) != n:
            raise TokenizerError(
                f"GGUF field {KEY_TOKEN_TYPE} has {len(token_types)} entries but {KEY_TOKENS} has {n}"
            )
        for key, tid in ((KEY_BOS, bos_id), (KEY_EOS, eos_id), (KEY_EOT, eot_id), (KEY_EOM, eom_id),
                         (KEY_PAD, pad_id)):
            if tid is not None and not 0 <= tid < n:
                raise TokenizerError(f"GGUF field {key} = {tid} is outside the vocabulary (size {n})")

        self._model = model
        self._pre = pre
        self._spec = spec
        self._tokens: Tuple[str, ...] = tuple(tokens)
        self._file_token_types: Tuple[int, ...] = tuple(int(t) for t in token_types)
        self._merges: Tuple[str, ...] = tuple(merges)
        self._bos_id = bos_id
        self._eos_id = eos_id
        self._pad_id = pad_id
        self._add_bos = spec.add_bos if add_bos is None else bool(add_bos)
        # SentencePiece: per-token scores (llama.cpp: 0 when the file has none); the space prefix
        if scores is not None and len(scores) != n:
            raise TokenizerError(f"GGUF field {KEY_SCORES} has {len(scores)} entries but {KEY_TOKENS} has {n}")
        self._scores: Tuple[float, ...] = tuple(float(x) for x in scores) if scores is not None else (0.0,) * n
        self._add_space_prefix = spm and (True if add_space_prefix is None else bool(add_space_prefix))
        self._chat_template = chat_template
        self._template_error: Optional[str] = None  # why the GGUF's template cannot be used
        self._compiled_template = None
        self._identity: Optional[tuple] = None

        # text -> id: a later duplicate wins, as in llama.cpp's token_to_id map
        self._token_to_id: Dict[str, int] = {t: i for i, t in enumerate(self._tokens)}

        # effective types after llama.cpp's load-time fix-ups
        types = list(self._file_token_types)
        first: Dict[str, Optional[int]] = {}
        for role, names, explicit in (
            ("eot", _EOT_NAMES, eot_id), ("eom", _EOM_NAMES, eom_id),
            ("fim_pre", _FIM_PRE_NAMES, None), ("fim_suf", _FIM_SUF_NAMES, None),
            ("fim_mid", _FIM_MID_NAMES, None), ("fim_pad", _FIM_PAD_NAMES, None),
            ("fim_rep", _FIM_REP_NAMES, None), ("fim_sep", _FIM_SEP_NAMES, None),
        ):
            found = explicit
            if found is None:
                ids = [self._token_to_id[nm] for nm in names if nm in self._token_to_id]
                found = min(ids) if ids else None
                if found is not None and types[found] != TOKEN_TYPE_CONTROL:
                    types[found] = TOKEN_TYPE_CONTROL
            first[role] = found
        eog = set()
        for role in ("fim_pad", "fim_rep", "fim_sep"):
            if first[role] is not None:
                eog.add(first[role])
        for nm in _EOG_NAMES:
            tid = self._token_to_id.get(nm)
            if tid is not None:
                eog.add(tid)
                types[tid] = TOKEN_TYPE_CONTROL
        for tid in (eos_id, first["eot"], first["eom"]):
            if tid is not None:
                eog.add(tid)
        self._eot_id = first["eot"]
        self._eot_ids: FrozenSet[int] = frozenset(eog)
        self._types: Tuple[int, ...] = tuple(types)

        special_types = (TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED, TOKEN_TYPE_UNKNOWN)
        special = [i for i, t in enumerate(self._types) if t in special_types]
        self._special_ids: FrozenSet[int] = frozenset(special)
        self._control_ids: FrozenSet[int] = frozenset(
            i for i in special if self._types[i] != TOKEN_TYPE_USER_DEFINED)
        # llama.cpp's cache_special_tokens: longest text first (ties by id, for determinism)
        self._special_order: Tuple[Tuple[str, int, bool], ...] = tuple(
            (self._tokens[i], i, self._types[i] != TOKEN_TYPE_USER_DEFINED)
            for i in sorted(special, key=lambda i: (-len(self._tokens[i].encode("utf-8")), i))
        )

        # the bytes each token stands for, as llama.cpp's token_to_piece(special=True)
        pieces: List[bytes] = []
        for text, typ in zip(self._tokens, self._types):
            if spm and typ == TOKEN_TYPE_NORMAL:
                pieces.append(text.replace(SPM_SPACE, " ").encode("utf-8"))
            elif spm and typ == TOKEN_TYPE_BYTE:
                pieces.append(_spm_byte(text))
            elif spm and typ == TOKEN_TYPE_UNKNOWN:
                pieces.append(SPM_UNKNOWN_PIECE)
            elif typ in (TOKEN_TYPE_NORMAL, TOKEN_TYPE_BYTE):
                pieces.append(_byte_level_decode(text))
            elif typ in special_types:
                pieces.append(text.encode("utf-8"))
            else:  # unused / undefined: llama.cpp renders nothing
                pieces.append(b"")
        self._pieces: Tuple[bytes, ...] = tuple(pieces)

        if spm:
            self._hf, self.dropped_merges = None, 0
            self._spm_bytes = _spm_byte_ids(self._token_to_id)
        else:
            self._hf, self.dropped_merges = self._build_hf(spec)

    # ---------------------------------------------------------------- construction

    def _build_hf(self, spec: PreTokenizerSpec):
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models

        vocab = self._token_to_id
        pairs: List[Tuple[str, str]] = []
        seen = set()
        dropped = 0
        for m in self._merges:
            pos = m.find(" ", 1)  # llama.cpp splits at the first space after the first character
            if pos < 0:
                dropped += 1
                continue
            a, b = m[:pos], m[pos + 1:]
            if (a, b) in seen:  # llama.cpp keeps the first rank of a duplicated merge
                continue
            if a not in vocab or b not in vocab or (a + b) not in vocab:
                dropped += 1
                continue
            seen.add((a, b))
            pairs.append((a, b))
        try:
            bpe = models.BPE(vocab=dict(vocab), merges=pairs, ignore_merges=spec.ignore_merges)
        except Exception as exc:  # pragma: no cover - tokenizers rejects only malformed input
            raise TokenizerError(f"cannot build the BPE model from the GGUF vocabulary: {exc}") from exc
        hf = HFTokenizer(bpe)
        hf.pre_tokenizer = spec.build()
        hf.decoder = decoders.ByteLevel()
        return hf, dropped

    @classmethod
    def from_fields(cls, fields: Mapping[str, Any]) -> "Tokenizer":
        """Build from a mapping of GGUF metadata keys to Python values.

        Required: ``tokenizer.ggml.model`` (must be ``"gpt2"``), ``tokenizer.ggml.tokens``
        (list of str), ``tokenizer.ggml.merges`` (list of ``"a b"`` str). Optional:
        ``tokenizer.ggml.token_type`` (list of int; all normal when absent), ``tokenizer.ggml.pre``
        (llama.cpp's ``default`` with a warning when absent), ``tokenizer.ggml.bos_token_id``,
        ``tokenizer.ggml.eos_token_id``, ``tokenizer.ggml.eot_token_id``,
        ``tokenizer.ggml.eom_token_id``, ``tokenizer.ggml.padding_token_id``,
        ``tokenizer.ggml.add_bos_token``, ``tokenizer.chat_template``. Other keys are ignored.
        Raises TokenizerError naming the field or value that is missing or unsupported."""
        if not isinstance(fields, Mapping):
            raise TokenizerError(f"expected a mapping of GGUF keys to values, got {type(fields).__name__}")
        if KEY_MODEL not in fields or fields[KEY_MODEL] is None:
            raise TokenizerError(f"GGUF metadata has no {KEY_MODEL} field")
        model = _as_str(fields[KEY_MODEL], KEY_MODEL)
        if model not in _MODELS:
            what = _UNSUPPORTED_MODELS.get(model, "unknown")
            raise TokenizerError(
                f"unsupported tokenizer: {KEY_MODEL} = {model!r} ({what}); supported: 'gpt2' "
                f"(byte-level BPE) and 'llama' (SentencePiece)"
            )
        for key in (KEY_TOKENS, KEY_MERGES) if model == "gpt2" else (KEY_TOKENS,):
            if key not in fields or fields[key] is None:
                raise TokenizerError(f"GGUF metadata has no {key} field (required for a '{model}' tokenizer)")
        tokens = _as_str_list(KEY_TOKENS, fields[KEY_TOKENS])
        merges = _as_str_list(KEY_MERGES, fields[KEY_MERGES]) if model == "gpt2" else []
        scores = None
        if model == "llama" and fields.get(KEY_SCORES) is not None:
            scores = _as_float_list(KEY_SCORES, fields[KEY_SCORES])
        token_types = None
        if fields.get(KEY_TOKEN_TYPE) is not None:
            token_types = _as_int_list(KEY_TOKEN_TYPE, fields[KEY_TOKEN_TYPE])
        pre = fields.get(KEY_PRE)
        pre = None if pre is None else _as_str(pre, KEY_PRE)
        template = fields.get(KEY_CHAT_TEMPLATE)
        template_error = None
        if isinstance(template, UnicodeDecodeError):
            # refused when a chat is rendered, not at load: plain generation does not need it
            try:
                _as_str(template, KEY_CHAT_TEMPLATE)
            except TokenizerError as e:
                template_error, template = str(e), None
        template = None if template is None else _as_str(template, KEY_CHAT_TEMPLATE)
        tok = cls(
            tokens,
            merges,
            token_types,
            pre=pre,
            bos_id=_opt_int(fields, KEY_BOS),
            eos_id=_opt_int(fields, KEY_EOS),
            eot_id=_opt_int(fields, KEY_EOT),
            eom_id=_opt_int(fields, KEY_EOM),
            pad_id=_opt_int(fields, KEY_PAD),
            add_bos=_opt_bool(fields, KEY_ADD_BOS),
            chat_template=template,
            model=model,
            scores=scores,
            add_space_prefix=_opt_bool(fields, KEY_ADD_SPACE),
        )
        tok._template_error = template_error
        return tok

    @staticmethod
    def read_fields(path: Union[str, "os.PathLike[str]"]) -> Dict[str, Any]:
        """The ``tokenizer.*`` metadata of a GGUF file as a dict of Python values (what
        ``from_fields`` takes). Raises ModelLoadError when the file cannot be read."""
        from .gguf_file import GGUFFormatError, read_gguf

        path = os.fspath(path)
        if not os.path.isfile(path):
            raise ModelLoadError(f"model file not found: {path}")
        try:
            fields = read_gguf(path).fields
        except (GGUFFormatError, OSError) as exc:
            raise ModelLoadError(f"cannot read GGUF metadata from {path}: {exc}") from exc
        out: Dict[str, Any] = {}
        for key, value in fields.items():
            if key.startswith("tokenizer."):
                if isinstance(value, Exception):
                    raise ModelLoadError(f"{path}: metadata field {key!r} is malformed: {value}")
                out[key] = value
        return out

    @classmethod
    def from_gguf(cls, path: Union[str, "os.PathLike[str]"]) -> "Tokenizer":
        """Build from a GGUF file's metadata (see ``from_fields``)."""
        return cls.from_fields(cls.read_fields(path))

    # ---------------------------------------------------------------- properties

    @property
    def vocab_size(self) -> int:
        """Number of token ids (the length of ``tokenizer.ggml.tokens``)."""
        return len(self._tokens)

    @property
    def bos_id(self) -> Optional[int]:
        """``tokenizer.ggml.bos_token_id``, or None when the GGUF has none."""
        return self._bos_id

    @property
    def eos_id(self) -> Optional[int]:
        """``tokenizer.ggml.eos_token_id``, or None when the GGUF has none."""
        return self._eos_id

    @property
    def eot_id(self) -> Optional[int]:
        """The end-of-turn token (``tokenizer.ggml.eot_token_id``, else found by text as llama.cpp
        does: ``<|im_end|>``, ``<|eot_id|>``, ``<|endoftext|>`` ...), or None."""
        return self._eot_id

    @property
    def pad_id(self) -> Optional[int]:
        return self._pad_id

    @property
    def add_bos(self) -> bool:
        """Whether ``encode`` prepends BOS by default (GGUF ``tokenizer.ggml.add_bos_token``)."""
        return self._add_bos

    @property
    def eot_ids(self) -> FrozenSet[int]:
        """Ids that end generation: EOS, EOT/EOM and every token whose text llama.cpp treats as an
        end-of-generation marker (``<|im_end|>``, ``<|endoftext|>``, ``<|eot_id|>`` ... and the
        FIM pad/repo/file-separator tokens), mirroring llama.cpp's ``special_eog_ids``."""
        return self._eot_ids

    @property
    def special_ids(self) -> FrozenSet[int]:
        """Ids matched as whole tokens in input text: control, user-defined and unknown tokens."""
        return self._special_ids

    @property
    def control_ids(self) -> FrozenSet[int]:
        """The control and unknown tokens (what ``skip_special`` leaves out when decoding)."""
        return self._control_ids

    @property
    def pre(self) -> str:
        """The ``tokenizer.ggml.pre`` name."""
        return self._pre

    @property
    def tokens(self) -> Tuple[str, ...]:
        return self._tokens

    @property
    def merges(self) -> Tuple[str, ...]:
        return self._merges

    @property
    def token_types(self) -> Tuple[int, ...]:
        """Effective token types (the GGUF's, with llama.cpp's control-token fix-ups applied)."""
        return self._types

    @property
    def chat_template(self) -> Optional[str]:
        """The GGUF's ``tokenizer.chat_template``, or None (then ChatML is used)."""
        return self._chat_template

    @property
    def hf_tokenizer(self):
        """The underlying ``tokenizers.Tokenizer`` (BPE + pre-tokenizer, no special tokens);
        None for a SentencePiece tokenizer."""
        return self._hf

    def token_id(self, text: str) -> Optional[int]:
        """The id of the token whose text is exactly ``text``, or None."""
        return self._token_to_id.get(text)

    def __len__(self) -> int:
        return len(self._tokens)

    def __repr__(self) -> str:
        return (f"Tokenizer(model={self._model!r}, pre={self._pre!r}, vocab_size={self.vocab_size}, "
                f"bos_id={self._bos_id}, eos_id={self._eos_id})")

    # ---------------------------------------------------------------- encoding

    def _partition(self, text: str, parse_special: bool) -> List[Union[str, int]]:
        """Split ``text`` into raw-text pieces and special token ids (llama.cpp's
        ``tokenizer_st_partition``): each special token in turn, longest text first, cuts every
        remaining raw piece at all of its non-overlapping leftmost occurrences."""
        frags: List[Union[str, int]] = [text]
        for stext, sid, is_control in self._special_order:
            if is_control and not parse_special:
                continue
            if stext not in text:  # cheap filter: it cannot be in any piece either
                continue
            out: List[Union[str, int]] = []
            for f in frags:
                if isinstance(f, int) or stext not in f:
                    out.append(f)
                    continue
                parts = f.split(stext)
                for i, p in enumerate(parts):
                    if i:
                        out.append(sid)
                    if p:
                        out.append(p)
            frags = out
        return frags

    def encode(self, text: str, add_bos: Optional[bool] = None, parse_special: bool = True) -> List[int]:
        """Token ids of ``text``, identical to llama.cpp's ``llama_tokenize``.

        ``add_bos``: prepend the BOS token; None (default) follows the GGUF's
        ``tokenizer.ggml.add_bos_token`` (False for SmolLM2 and Qwen2.5).
        ``parse_special``: match control tokens such as ``<|im_start|>`` written in ``text`` as
        single tokens (default True, as llama.cpp's chat path does); with False they are
        tokenized as plain text (user-defined tokens are still matched, as in llama.cpp)."""
        if not isinstance(text, str):
            raise TypeError(f"encode() expects str, got {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:  # lone surrogates: not text llama.cpp could receive
            raise ValueError(f"text is not valid Unicode (it cannot be encoded as UTF-8): {exc}") from None
        if add_bos is None:
            add_bos = self._add_bos
        out: List[int] = []
        if add_bos:
            if self._bos_id is None:
                raise TokenizerError(f"add_bos requested but the GGUF has no {KEY_BOS}")
            out.append(self._bos_id)
        if not text:
            return out
        frags = self._partition(text, parse_special) if self._special_order else [text]
        if self._hf is None:
            return out + self._spm_encode_frags(frags)
        raw = [f for f in frags if isinstance(f, str)]
        if not raw:
            out.extend(frags)  # type: ignore[arg-type]
            return out
        if len(raw) == 1:
            encoded = [self._hf.encode(raw[0], add_special_tokens=False).ids]
        else:
            encoded = [e.ids for e in self._hf.encode_batch(raw, add_special_tokens=False)]
        it = iter(encoded)
        for f in frags:
            if isinstance(f, int):
                out.append(f)
            else:
                out.extend(next(it))
        return out

    def _spm_encode_frags(self, frags: List[Union[str, int]]) -> List[int]:
        """SentencePiece over the partitioned text, as llama.cpp's llama_tokenize_impl: a raw piece
        that follows a special token (or starts the text) gets a leading space when
        add_space_prefix is set; spaces become U+2581."""
        out: List[int] = []
        prev_special = True
        for f in frags:
            if isinstance(f, int):
                out.append(f)
                prev_special = True
                continue
            text = (" " + f) if self._add_space_prefix and prev_special else f
            out.extend(_spm_encode(text.replace(" ", SPM_SPACE), self._token_to_id, self._scores,
                                   self._spm_bytes))
            prev_special = False
        return out

    def encode_batch(self, texts: Sequence[str], add_bos: Optional[bool] = None,
                     parse_special: bool = True) -> List[List[int]]:
        """``encode`` over many texts."""
        return [self.encode(t, add_bos=add_bos, parse_special=parse_special) for t in texts]

    # ---------------------------------------------------------------- decoding

    def _check_id(self, tid: Any) -> int:
        try:
            i = operator.index(tid)  # ints and numpy integers; not floats or strings
        except TypeError:
            raise ValueError(f"token id {tid!r} is not an integer") from None
        if not 0 <= i < len(self._tokens):
            raise ValueError(f"token id {i} is out of range for a vocabulary of size {len(self._tokens)}")
        return i

    def token_to_piece(self, token_id: int, special: bool = True) -> bytes:
        """The bytes token ``token_id`` stands for (llama.cpp's ``token_to_piece``). A normal
        token may be part of a multi-byte UTF-8 character, so this is bytes, not str; use
        ``StreamDecoder`` to print tokens as they come. With ``special=False`` control tokens give
        ``b""``. Raises ValueError for an id outside the vocabulary."""
        i = self._check_id(token_id)
        if not special and i in self._control_ids:
            return b""
        return self._pieces[i]

    def decode_bytes(self, ids: Iterable[int], skip_special: bool = False) -> bytes:
        """The concatenated bytes of ``ids``."""
        pieces = self._pieces
        control = self._control_ids
        out = []
        for tid in ids:
            i = self._check_id(tid)
            if skip_special and i in control:
                continue
            out.append(pieces[i])
        return b"".join(out)

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """Text of ``ids``. Control tokens are written as their text unless ``skip_special``;
        invalid UTF-8 (e.g. a sequence cut in the middle of a character) becomes U+FFFD.
        Raises ValueError naming the id and the vocabulary size for an out-of-range id."""
        return self.decode_bytes(ids, skip_special=skip_special).decode("utf-8", errors="replace")

    def stream_decoder(self, skip_special: bool = False) -> "StreamDecoder":
        """A ``StreamDecoder`` over this tokenizer."""
        return StreamDecoder(self, skip_special=skip_special)

    # ---------------------------------------------------------------- chat template

    def _template(self):
        if self._template_error is not None:
            raise TokenizerError(f"cannot render the chat template: {self._template_error}")
        if self._compiled_template is None:
            self._compiled_template = _compile_template(self._chat_template or CHATML_TEMPLATE)
        return self._compiled_template

    def _builtin_format(self):
        """The llama.cpp built-in format this model's template is rendered with, or None (jinja)."""
        for marker, render in BUILTIN_CHAT_FORMATS:
            if self._chat_template and marker in self._chat_template:
                return render
        return None

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                            **kwargs: Any) -> str:
        """Render ``messages`` (a list of ``{"role": ..., "content": ...}``) with the GGUF's
        ``tokenizer.chat_template``, the way HuggingFace transformers does: jinja2 in an
        immutable sandbox, ``trim_blocks``/``lstrip_blocks``, the ``loopcontrols`` extension, a
        ``raise_exception(msg)`` helper, a ``tojson`` filter and a ``strftime_now`` helper, and
        the variables ``messages``, ``add_generation_prompt``, ``bos_token`` and ``eos_token``
        (plus any keyword arguments, e.g. ``tools=[...]``).

        When the GGUF has no chat template, ChatML is used (``CHATML_TEMPLATE``:
        ``<|im_start|>role\\ncontent<|im_end|>\\n`` per message, then ``<|im_start|>assistant\\n``).
        A template of a family in ``BUILTIN_CHAT_FORMATS`` (Gemma's) is rendered as llama.cpp's
        ``llama_chat_apply_template`` renders it instead (its jinja would also write the BOS that
        encoding adds, and raises on roles out of turn).

        The result is a string; encode it with ``parse_special=True`` (the default) so that the
        template's control tokens become single tokens. Raises TokenizerError when the template
        cannot be compiled or raises while rendering (e.g. through ``raise_exception``)."""
        import jinja2

        if isinstance(messages, Mapping) or isinstance(messages, (str, bytes)):
            raise TypeError("messages must be a list of {'role': ..., 'content': ...} dicts")
        render = self._builtin_format() if self._template_error is None else None
        if render is not None:
            return render([dict(m) for m in messages], bool(add_generation_prompt))
        template = self._template()
        variables: Dict[str, Any] = {
            "bos_token": self._tokens[self._bos_id] if self._bos_id is not None else "",
            "eos_token": self._tokens[self._eos_id] if self._eos_id is not None else "",
        }
        variables.update(kwargs)
        variables["messages"] = [dict(m) for m in messages]
        variables["add_generation_prompt"] = bool(add_generation_prompt)
        try:
            return template.render(**variables)
        except jinja2.TemplateError as exc:
            raise TokenizerError(f"chat template error: {exc}") from exc

    # ---------------------------------------------------------------- identity

    def identity(self) -> tuple:
        """A hashable summary of everything that decides token ids: the tokenizer model and
        pre-tokenizer name, the token texts, their effective types, the merges, BOS/EOS and the
        add-BOS flag, the special and end-of-generation ids. Two tokenizers with equal identities
        encode and decode alike."""
        if self._identity is None:
            self._identity = (
                self._model,
                self._pre,
                self._tokens,
                self._types,
                self._merges,
                self._bos_id,
                self._eos_id,
                self._add_bos,
                self._scores,
                self._add_space_prefix,
                tuple(sorted(self._special_ids)),
                tuple(sorted(self._eot_ids)),
            )
        return self._identity

    def same_as(self, other: "Tokenizer") -> bool:
        """Whether ``other`` has the same identity (see ``identity``)."""
        if not isinstance(other, Tokenizer):
            return False
        return self is other or self.identity() == other.identity()

    def diff(self, other: "Tokenizer") -> str:
        """A description of the first difference from ``other`` ("" when there is none): the
        tokenizer model or pre-tokenizer, the vocabulary size, the first differing token text or
        type, the merges (count or first differing rank), BOS/EOS, add-BOS, special ids."""
        if not isinstance(other, Tokenizer):
            return f"not a Tokenizer: {type(other).__name__}"
        if self._model != other._model:
            return f"tokenizer model differs: {self._model!r} vs {other._model!r}"
        if self._pre != other._pre:
            return f"pre-tokenizer differs: {self._pre!r} vs {other._pre!r}"
        if self.vocab_size != other.vocab_size:
            return f"vocab size differs: {self.vocab_size} vs {other.vocab_size}"
        if self._tokens != other._tokens:
            i = next(i for i, (a, b) in enumerate(zip(self._tokens, other._tokens)) if a != b)
            return f"token {i} differs: {self._tokens[i]!r} vs {other._tokens[i]!r}"
        if self._types != other._types:
            i = next(i for i, (a, b) in enumerate(zip(self._types, other._types)) if a != b)
            return f"type of token {i} ({self._tokens[i]!r}) differs: {self._types[i]} vs {other._types[i]}"
        if self._merges != other._merges:
            for i, (a, b) in enumerate(zip(self._merges, other._merges)):
                if a != b:
                    return f"merge {i} differs: {a!r} vs {b!r}"
            return f"merge count differs: {len(self._merges)} vs {len(other._merges)}"
        if self._bos_id != other._bos_id:
            return f"bos id differs: {self._bos_id} vs {other._bos_id}"
        if self._eos_id != other._eos_id:
            return f"eos id differs: {self._eos_id} vs {other._eos_id}"
        if self._add_bos != other._add_bos:
            return f"add_bos differs: {self._add_bos} vs {other._add_bos}"
        if self._scores != other._scores:
            i = next(i for i, (a, b) in enumerate(zip(self._scores, other._scores)) if a != b)
            return f"score of token {i} ({self._tokens[i]!r}) differs: {self._scores[i]} vs {other._scores[i]}"
        if self._add_space_prefix != other._add_space_prefix:
            return f"add_space_prefix differs: {self._add_space_prefix} vs {other._add_space_prefix}"
        if self._special_ids != other._special_ids:
            return f"special ids differ: {sorted(self._special_ids ^ other._special_ids)} are in only one"
        if self._eot_ids != other._eot_ids:
            return f"end-of-generation ids differ: {sorted(self._eot_ids)} vs {sorted(other._eot_ids)}"
        return ""


# --------------------------------------------------------------------------------------------
# Streaming decode
# --------------------------------------------------------------------------------------------

class StreamDecoder:
    """Turns a stream of token ids into text, emitting only complete UTF-8 characters.

    A character of several bytes may be split over tokens (an emoji is often four byte tokens);
    ``push`` holds back an incomplete trailing sequence until the token that completes it
    arrives. ``flush`` returns what is held back at the end (an unfinished sequence becomes
    U+FFFD) and resets the decoder. Invalid bytes inside the stream also become U+FFFD.

        dec = tok.stream_decoder()
        for tid in generated:
            print(dec.push(tid), end="", flush=True)
        print(dec.flush())
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = False) -> None:
        self._tok = tokenizer
        self._skip_special = skip_special
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """Add one token; return the text that is now complete (possibly "")."""
        piece = self._tok.token_to_piece(token_id, special=not self._skip_special)
        return self._decoder.decode(piece, final=False)

    def push_many(self, ids: Iterable[int]) -> str:
        return "".join(self.push(t) for t in ids)

    @property
    def pending(self) -> bytes:
        """Bytes held back, waiting for the rest of a character."""
        return self._decoder.getstate()[0]

    def flush(self) -> str:
        """Return whatever is held back (U+FFFD for an unfinished character) and reset."""
        out = self._decoder.decode(b"", final=True)
        self._decoder.reset()
        return out

    def reset(self) -> None:
        self._decoder.reset()


# --------------------------------------------------------------------------------------------
# llama.cpp's built-in chat formats (llama_chat_apply_template)
# --------------------------------------------------------------------------------------------

_C_SPACE = " \t\n\v\f\r"  # what llama.cpp's trim() strips (C isspace)


def _render_gemma(messages: List[Dict[str, Any]], add_generation_prompt: bool) -> str:
    """Gemma's turns: ``<start_of_turn>{user|model}\\n{content}<end_of_turn>\\n``, contents trimmed;
    system messages (trimmed, concatenated) go in front of the next non-model turn, followed by a
    blank line; then ``<start_of_turn>model\\n``. No BOS: encoding adds it."""
    out: List[str] = []
    system = ""
    for m in messages:
        role, content = str(m["role"]), str(m["content"])
        if role == "system":
            system += content.strip(_C_SPACE)
            continue
        role = "model" if role == "assistant" else role
        out.append(f"<start_of_turn>{role}\n")
        if system and role != "model":
            out.append(system + "\n\n")
            system = ""
        out.append(content.strip(_C_SPACE) + "<end_of_turn>\n")
    if add_generation_prompt:
        out.append("<start_of_turn>model\n")
    return "".join(out)


# (text that marks the template's family, renderer), in llama.cpp's detection order
BUILTIN_CHAT_FORMATS = (("<start_of_turn>", _render_gemma),)


# --------------------------------------------------------------------------------------------
# Jinja
# --------------------------------------------------------------------------------------------

def _compile_template(source: str):
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        return datetime.datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateError as exc:
        raise TokenizerError(f"cannot compile the chat template: {exc}") from exc
