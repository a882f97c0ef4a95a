#!/usr/bin/env python3
"""Write tiny, randomly initialised GGUF models that edgekv (and llama.cpp) can load.

The files are complete models: every metadata key the loader reads, a real byte-level BPE
tokenizer (the 256 GPT-2 byte symbols, merges learned from a small built-in corpus, ChatML
control tokens and chat template) and random weights of a sensible scale, so logits are neither
flat nor dominated by one token. They are meant for tests: a few hundred KiB, built in
milliseconds, deterministic for a given seed.

    from make_tiny import write_tiny_model      # with models/ on sys.path (tests/conftest.py)
    write_tiny_model("tiny.gguf", arch="qwen2", weight_type="Q4_0")

    python models/make_tiny.py tiny.gguf --arch llama --type Q8_0 --size large

The tokenizer depends only on ``arch`` (pre-tokenizer name, special token placement) and
``n_merges``, never on the model's size or seed: a small and a large tiny model written with the
same ``arch`` share one tokenizer (``Tokenizer.same_as`` holds), which is what a draft/target
pair needs: ``size="small"`` and ``size="large"`` are the two presets (``SIZES``).

Architectures:
  llama  adjacent-pair RoPE, no Q/K/V biases, ``tokenizer.ggml.pre = "smollm"``, control tokens
         at ids 0..2 (SmolLM2's layout), ``llama.vocab_size`` written.
  qwen2  NEOX (half-split) RoPE, Q/K/V biases, ``tokenizer.ggml.pre = "qwen2"``, control tokens
         after the merges (Qwen2's layout), no ``qwen2.vocab_size`` (the loader falls back to the
         token list's length).
  qwen3  qwen2's tokenizer and RoPE, no biases, QK-norm (``blk.N.attn_q_norm`` / ``attn_k_norm``,
         head_dim values each, spread widely so that skipping them shows), ``attention.key_length``
         and ``value_length`` written.
  gemma3 qwen3's QK-norm, RoPE and tokenizer, plus post-attention and post-FFN norms
         (``blk.N.post_attention_norm`` / ``post_ffw_norm``) and ``attention.sliding_window``
         (``sliding_window``, default 8: a short prompt already slides); the layer pattern is
         llama.cpp's default for gemma3 (every 6th layer global), so give it 6 layers or more.
  any other name is written like llama (for tests of unsupported architectures).

``head_dim`` may differ from n_embd / n_head (written as ``attention.key_length`` and
``value_length``); ``rope_freqs`` writes ``rope_freqs.weight`` (Llama 3 RoPE scaling: per
rotated pair, the divisor of its angle).

Weight types: F32, F16, Q8_0, Q4_0, Q4_1 (run natively by edgekv), Q5_0, Q5_1 and BF16 (edgekv
converts them to Q8_0 at load time). Norms and biases are always F32.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

WEIGHT_TYPES = ("F32", "F16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "BF16")
NATIVE_WEIGHT_TYPES = ("F32", "F16", "Q8_0", "Q4_0", "Q4_1")

# Model shapes: head_dim 32 in both (a multiple of 32 and a power of two, as quantized KV
# caches want), grouped-query attention in both. Same tokenizer for both.
SIZES = {
    "small": dict(n_layer=2, n_embd=64, n_head=2, n_head_kv=1, n_ff=128),
    "large": dict(n_layer=4, n_embd=128, n_head=4, n_head_kv=2, n_ff=256),
}

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
END_TOKENS = ("<|endoftext|>", "<|im_end|>")  # what llama.cpp (and edgekv) treat as end of generation

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# What the merges are learned from: plain English with a little punctuation and digits.
CORPUS = """
The quick brown fox jumps over the lazy dog. The dog sleeps in the sun, and the fox runs
into the forest. Once upon a time there was a small model that wanted to learn how to speak.
It read the same sentences again and again: the sky is blue, the grass is green, the sea is
deep. What is the capital of France? The capital of France is Paris. How are you today?
I am fine, thank you. Hello, world! This is a test of the tokenizer, and these are the words
it should know: there, their, then, than, that, this, these, those, what, when, where, which.
Numbers like 12345 and 2024 are split into single digits. Let's see what happens when we
write something longer: models read text as tokens, and tokens are made of bytes.
"""

# GPT-2's pre-tokenizer, spelled for Python's re on ASCII text (enough for learning merges).
_PRETOKENIZE = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]| ?[^\sA-Za-z0-9]+|\s+(?!\S)|\s+")


def bytes_to_unicode() -> Dict[int, str]:
    """GPT-2's byte -> printable character table (printable bytes map to themselves)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def byte_symbols() -> List[str]:
    """The 256 byte-level symbols in GPT-2's vocabulary order."""
    return list(bytes_to_unicode().values())


def learn_merges(corpus: str, n_merges: int) -> List[Tuple[str, str]]:
    """Byte-level BPE merges learned from ``corpus`` (ties broken by the pair's text: deterministic).

    Digits are never merged with anything (the smollm and qwen2 pre-tokenizers split digits one
    by one, so such merges could never apply)."""
    table = bytes_to_unicode()
    words: Dict[Tuple[str, ...], int] = {}
    for piece in _PRETOKENIZE.findall(corpus):
        sym = tuple(table[b] for b in piece.encode("utf-8"))
        words[sym] = words.get(sym, 0) + 1
    merges: List[Tuple[str, str]] = []
    for _ in range(n_merges):
        counts: Dict[Tuple[str, str], int] = {}
        for w, c in words.items():
            for a, b in zip(w, w[1:]):
                if any(ch.isdigit() for ch in a + b):
                    continue
                counts[(a, b)] = counts.get((a, b), 0) + c
        if not counts:
            break
        best = min(counts, key=lambda p: (-counts[p], p))
        merges.append(best)
        joined = best[0] + best[1]
        new_words: Dict[Tuple[str, ...], int] = {}
        for w, c in words.items():
            out: List[str] = []
            i = 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(joined)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            new_words[tuple(out)] = new_words.get(tuple(out), 0) + c
        words = new_words
    return merges


@dataclass(frozen=True)
class TinyVocab:
    """A byte-level BPE vocabulary in GGUF terms."""

    tokens: Tuple[str, ...]
    token_types: Tuple[int, ...]  # 1 normal, 3 control
    merges: Tuple[str, ...]       # "a b"
    pre: str
    bos_id: int
    eos_id: int
    pad_id: int

    @property
    def size(self) -> int:
        return len(self.tokens)

    def special_id(self, text: str) -> int:
        return self.tokens.index(text)

    def fields(self) -> dict:
        """The ``tokenizer.*`` GGUF metadata as Python values (what ``Tokenizer.from_fields`` takes)."""
        return {
            "tokenizer.ggml.model": "gpt2",
            "tokenizer.ggml.pre": self.pre,
            "tokenizer.ggml.tokens": list(self.tokens),
            "tokenizer.ggml.token_type": list(self.token_types),
            "tokenizer.ggml.merges": list(self.merges),
            "tokenizer.ggml.bos_token_id": self.bos_id,
            "tokenizer.ggml.eos_token_id": self.eos_id,
            "tokenizer.ggml.padding_token_id": self.pad_id,
            "tokenizer.ggml.add_bos_token": False,
            "tokenizer.chat_template": CHAT_TEMPLATE,
        }


def make_vocab(arch: str = "llama", n_merges: int = 120) -> TinyVocab:
    """The tiny models' tokenizer: byte symbols, learned merges, three ChatML control tokens.

    llama (and unknown architectures): specials first (SmolLM2: ``<|endoftext|>`` 0,
    ``<|im_start|>`` 1 = BOS, ``<|im_end|>`` 2 = EOS = PAD), pre-tokenizer ``smollm``.
    qwen2, qwen3, gemma3: specials last (Qwen2: BOS = PAD = ``<|endoftext|>``, EOS = ``<|im_end|>``),
    pre-tokenizer ``qwen2``."""
    merges = learn_merges(CORPUS, n_merges)
    normal = byte_symbols() + [a + b for a, b in merges]
    assert len(set(normal)) == len(normal), "a merge produced a token twice"
    merge_strs = tuple(f"{a} {b}" for a, b in merges)
    if arch in ("qwen2", "qwen3", "gemma3"):
        tokens = tuple(normal) + SPECIAL_TOKENS
        types = (1,) * len(normal) + (3,) * len(SPECIAL_TOKENS)
        eot = tokens.index("<|endoftext|>")
        return TinyVocab(tokens, types, merge_strs, "qwen2", bos_id=eot, eos_id=tokens.index("<|im_end|>"), pad_id=eot)
    tokens = SPECIAL_TOKENS + tuple(normal)
    types = (3,) * len(SPECIAL_TOKENS) + (1,) * len(normal)
    return TinyVocab(tokens, types, merge_strs, "smollm", bos_id=1, eos_id=2, pad_id=2)


def _encode_weight(a: np.ndarray, weight_type: str):
    """(array to write, raw GGML type or None) for a float32 (n_out, n_in) matrix."""
    from gguf import GGMLQuantizationType, quants

    a = np.ascontiguousarray(a, dtype=np.float32)
    if weight_type == "F32":
        return a, None
    if weight_type == "F16":
        return a.astype(np.float16), None
    qt = GGMLQuantizationType[weight_type]
    return quants.quantize(a, qt), qt


def write_tiny_model(
    path,
    arch: str = "llama",
    weight_type: str = "Q8_0",
    n_layer: Optional[int] = None,
    n_embd: Optional[int] = None,
    n_head: Optional[int] = None,
    n_head_kv: Optional[int] = None,
    n_ff: Optional[int] = None,
    size: str = "small",
    vocab: Optional[TinyVocab] = None,
    seed: int = 0,
    tie_embeddings: bool = True,
    context_length: int = 256,
    rope_base: float = 10000.0,
    rope_dim: Optional[int] = None,
    norm_eps: float = 1e-5,
    special_logit_bias: float = 0.0,
    omit_tensors: Iterable[str] = (),
    omit_metadata: Iterable[str] = (),
    extra_metadata: Optional[dict] = None,
    embd_type: Optional[str] = None,
    head_dim: Optional[int] = None,
    rope_freqs: Optional[Sequence[float]] = None,
    sliding_window: int = 8,
) -> Path:
    """Write a tiny random model to ``path`` (a .gguf file) and return the path.

    n_layer, n_embd, n_head, n_head_kv, n_ff: the shape; each one not given comes from
      ``SIZES[size]`` ("small": 2 layers, 64 wide, 2 heads of 32 over 1 KV head, ff 128;
      "large": 4 layers, 128 wide, 4 heads of 32 over 2 KV heads, ff 256).
    weight_type: the type of every 2-D weight (token embedding and output included, unless
      ``embd_type`` gives the token embedding's own type); norms and biases are F32.
    vocab: a ``TinyVocab`` (default ``make_vocab(arch)``); keep it to share a tokenizer.
    tie_embeddings: False writes a separate ``output.weight``.
    rope_dim: dimensions rotated per head (default head_dim; even and at most head_dim).
    special_logit_bias: with tie_embeddings=False, shifts the logits of the end-of-generation
      tokens (``<|endoftext|>``, ``<|im_end|>``) by about this much times ~4 at every position:
      large positive makes the model end its turn at once, large negative makes it never end
      it. Done through one residual dimension held large by the embedding.
    omit_tensors: tensor names to leave out (for tests of incomplete files).
    omit_metadata: metadata keys to leave out (e.g. "llama.block_count").
    extra_metadata: more key/values to write (str, int, float, bool, or list thereof); an
      existing key is replaced.
    """
    from gguf import GGUFWriter

    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    preset = SIZES[size]
    n_layer = preset["n_layer"] if n_layer is None else n_layer
    n_embd = preset["n_embd"] if n_embd is None else n_embd
    n_head = preset["n_head"] if n_head is None else n_head
    n_head_kv = preset["n_head_kv"] if n_head_kv is None else n_head_kv
    n_ff = preset["n_ff"] if n_ff is None else n_ff
    if weight_type not in WEIGHT_TYPES:
        raise ValueError(f"weight_type must be one of {WEIGHT_TYPES}, got {weight_type!r}")
    if embd_type is not None and embd_type not in WEIGHT_TYPES:
        raise ValueError(f"embd_type must be one of {WEIGHT_TYPES}, got {embd_type!r}")
    if (head_dim is None and n_embd % n_head) or n_head % n_head_kv:
        raise ValueError("n_embd must be a multiple of n_head (unless head_dim is given), "
                         "and n_head a multiple of n_head_kv")
    explicit_head_dim = head_dim is not None and head_dim != n_embd // n_head
    head_dim = n_embd // n_head if head_dim is None else head_dim
    if head_dim % 8:
        raise ValueError(f"head_dim = n_embd / n_head = {head_dim} must be a multiple of 8")
    for name, n in (("n_embd", n_embd), ("n_ff", n_ff), ("n_head * head_dim", n_head * head_dim)):
        if n % 32:
            raise ValueError(f"{name} = {n} must be a multiple of 32 (the quantization block size)")
    rope_dim = head_dim if rope_dim is None else rope_dim
    if rope_dim % 2 or not 0 < rope_dim <= head_dim:
        raise ValueError(f"rope_dim must be even and in (0, head_dim={head_dim}], got {rope_dim}")
    if rope_freqs is not None and len(rope_freqs) != rope_dim // 2:
        raise ValueError(f"rope_freqs needs rope_dim / 2 = {rope_dim // 2} values, got {len(rope_freqs)}")
    if special_logit_bias and tie_embeddings:
        raise ValueError("special_logit_bias needs tie_embeddings=False (a separate output.weight)")
    vocab = vocab or make_vocab(arch)
    n_vocab = vocab.size
    q_dim, kv_dim = n_head * head_dim, n_head_kv * head_dim
    qwen2 = arch == "qwen2"
    gemma3 = arch == "gemma3"
    qwen3 = arch in ("qwen3", "gemma3")  # gemma3 shares qwen3's QK-norm (and what follows from it)
    # qwen3: larger q/k projections, so the per-head norms (not the projection scale) set q and k
    qk_std = (3.0 if qwen3 else 1.0) * n_embd ** -0.5
    omit = set(omit_tensors)
    rng = np.random.default_rng(seed)

    def normal(shape, std):
        return (rng.standard_normal(shape) * std).astype(np.float32)

    def norm_weight():
        return (1.0 + 0.1 * rng.standard_normal(n_embd)).astype(np.float32)

    # name -> (float32 array, type); matrices are (n_out, n_in), which GGUF stores as ne = (n_in, n_out)
    tensors: List[Tuple[str, np.ndarray, str]] = []
    embd = normal((n_vocab, n_embd), 0.35)
    if special_logit_bias:
        embd[:, 0] = 4.0  # a residual dimension that stays large and positive at every position
    tensors.append(("token_embd.weight", embd, embd_type or weight_type))
    tensors.append(("output_norm.weight", norm_weight(), "F32"))
    if not tie_embeddings:
        out = normal((n_vocab, n_embd), 0.35)
        if special_logit_bias:
            out[:, 0] = 0.0
            for name in END_TOKENS:
                out[vocab.special_id(name), 0] = special_logit_bias
        tensors.append(("output.weight", out, weight_type))
    for l in range(n_layer):
        p = f"blk.{l}."
        tensors.append((p + "attn_norm.weight", norm_weight(), "F32"))
        tensors.append((p + "attn_q.weight", normal((q_dim, n_embd), qk_std), weight_type))
        tensors.append((p + "attn_k.weight", normal((kv_dim, n_embd), qk_std), weight_type))
        tensors.append((p + "attn_v.weight", normal((kv_dim, n_embd), n_embd ** -0.5), weight_type))
        if qwen2:
            tensors.append((p + "attn_q.bias", normal(q_dim, 0.2), "F32"))
            tensors.append((p + "attn_k.bias", normal(kv_dim, 0.2), "F32"))
            tensors.append((p + "attn_v.bias", normal(kv_dim, 0.2), "F32"))
        if qwen3:  # spread out (0.4 .. 2.6): skipping a norm, or using the wrong one, shows in the logits
            tensors.append((p + "attn_q_norm.weight", rng.uniform(0.4, 2.6, head_dim).astype(np.float32), "F32"))
            tensors.append((p + "attn_k_norm.weight", rng.uniform(0.4, 2.6, head_dim).astype(np.float32), "F32"))
        tensors.append((p + "attn_output.weight", normal((n_embd, q_dim), 0.5 * q_dim ** -0.5), weight_type))
        if gemma3:  # 0.5 .. 1.5: wider ranges made the tiny model amplify int8 rounding past the tests' bounds
            tensors.append((p + "post_attention_norm.weight", rng.uniform(0.5, 1.5, n_embd).astype(np.float32), "F32"))
        tensors.append((p + "ffn_norm.weight", norm_weight(), "F32"))
        tensors.append((p + "ffn_gate.weight", normal((n_ff, n_embd), n_embd ** -0.5), weight_type))
        tensors.append((p + "ffn_up.weight", normal((n_ff, n_embd), n_embd ** -0.5), weight_type))
        tensors.append((p + "ffn_down.weight", normal((n_embd, n_ff), 0.5 * n_ff ** -0.5), weight_type))
        if gemma3:
            tensors.append((p + "post_ffw_norm.weight", rng.uniform(0.5, 1.5, n_embd).astype(np.float32), "F32"))
    if rope_freqs is not None:
        tensors.append(("rope_freqs.weight", np.asarray(rope_freqs, dtype=np.float32), "F32"))
    unknown = omit - {name for name, _, _ in tensors}
    if unknown:
        raise ValueError(f"omit_tensors names tensors this model does not have: {sorted(unknown)}")

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # GGUFWriter writes general.architecture itself (first) unless it is to be left out.
    w = GGUFWriter(str(path), arch)
    if "general.architecture" in omit_metadata:
        w.kv_data[0].pop("general.architecture", None)
    a = arch
    meta: dict = {
        "general.name": f"edgekv tiny {arch} {weight_type}",
        f"{a}.block_count": n_layer,
        f"{a}.context_length": context_length,
        f"{a}.embedding_length": n_embd,
        f"{a}.feed_forward_length": n_ff,
        f"{a}.attention.head_count": n_head,
        f"{a}.attention.head_count_kv": n_head_kv,
        f"{a}.rope.freq_base": float(rope_base),
        f"{a}.attention.layer_norm_rms_epsilon": float(norm_eps),
        f"{a}.rope.dimension_count": rope_dim,
    }
    if gemma3:
        meta[f"{a}.attention.sliding_window"] = sliding_window
    if qwen3 or explicit_head_dim:
        meta[f"{a}.attention.key_length"] = head_dim
        meta[f"{a}.attention.value_length"] = head_dim
    if not (qwen2 or qwen3):
        meta[f"{a}.vocab_size"] = n_vocab
    meta["general.file_type"] = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9,
                                 "BF16": 32}[weight_type]
    meta.update(vocab.fields())
    meta.update(extra_metadata or {})
    for key in omit_metadata:
        meta.pop(key, None)
    for key, value in meta.items():
        _add_value(w, key, value)
    for name, arr, typ in tensors:
        if name in omit:
            continue
        if arr.ndim == 1:
            w.add_tensor(name, arr)
            continue
        data, raw = _encode_weight(arr, typ)
        if raw is None:
            w.add_tensor(name, data)
        else:
            w.add_tensor(name, data, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _add_value(w, key: str, value) -> None:
    from gguf import GGUFValueType

    if isinstance(value, bool):
        w.add_bool(key, value)
    elif isinstance(value, int):
        w.add_uint32(key, value) if 0 <= value < 2**32 else w.add_int64(key, value)
    elif isinstance(value, float):
        w.add_float32(key, value)
    elif isinstance(value, str):
        w.add_string(key, value)
    elif isinstance(value, (list, tuple)):
        if value and all(isinstance(v, str) for v in value):
            w.add_array(key, list(value))
        elif all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            w.add_key_value(key, list(value), GGUFValueType.ARRAY, sub_type=GGUFValueType.INT32)
        else:
            w.add_array(key, list(value))
    else:
        raise TypeError(f"metadata {key!r}: cannot write a {type(value).__name__}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description="Write a tiny random GGUF model for tests.")
    ap.add_argument("output", help="the .gguf file to write")
    ap.add_argument("--arch", default="llama", help="llama, qwen2 or qwen3 (default: llama)")
    ap.add_argument("--type", dest="weight_type", default="Q8_0", choices=WEIGHT_TYPES)
    ap.add_argument("--size", default="small", choices=sorted(SIZES), help="shape preset (default: small)")
    ap.add_argument("--layers", type=int, help="override the preset's n_layer")
    ap.add_argument("--embd", type=int, help="override the preset's n_embd")
    ap.add_argument("--heads", type=int, help="override the preset's n_head")
    ap.add_argument("--heads-kv", type=int, help="override the preset's n_head_kv")
    ap.add_argument("--ff", type=int, help="override the preset's n_ff")
    ap.add_argument("--head-dim", type=int, help="head size apart from embd / heads (attention.key_length)")
    ap.add_argument("--ctx", type=int, default=256, help="context_length metadata")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--untied", action="store_true", help="write a separate output.weight")
    args = ap.parse_args(argv)
    try:
        p = write_tiny_model(
            args.output, arch=args.arch, weight_type=args.weight_type, n_layer=args.layers, n_embd=args.embd,
            n_head=args.heads, n_head_kv=args.heads_kv, n_ff=args.ff, size=args.size, context_length=args.ctx,
            seed=args.seed, head_dim=args.head_dim,
            tie_embeddings=not args.untied,
        )
    except ValueError as e:
        print(f"make_tiny: {e}", file=sys.stderr)
        return 2
    print(f"{p} ({p.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
