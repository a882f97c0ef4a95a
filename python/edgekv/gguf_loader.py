"""Read a GGUF file into what the C core needs: a config and borrowed weight buffers.

Weights whose type runs natively (F32, F16, Q4_0, Q4_1, Q8_0) are handed to C as
pointers into the memory-mapped file: no copy. Q4_K, Q5_0 and Q6_K are converted
in C at load time (csrc/weight_convert.c: Q4_K -> Q4_1 keeping the codes, Q5_0 ->
Q8_0 exactly, Q6_K -> Q8_0 requantized); any other type (BF16, Q5_1, ...) is
dequantized with gguf's own dequantizers and requantized to Q8_0. The loader logs
what it converted. With a weight cache (weight_cache.py, the default for models of 32 MiB and
more) all of that, and the interleaving the C core does for its x8 kernels, runs once per GGUF:
later loads map the result and the C core borrows it.

Architectures are rows in ``ARCHS``; tensor names are rows in ``TENSORS``.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import _native
from .gguf_file import GGUFFile, GGUFFormatError, read_gguf
from .errors import ModelLoadError

log = logging.getLogger("edgekv")

L = _native.lib

# GGML type ids that the C kernels run directly.
NATIVE_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 8: "Q8_0"}
CONVERT_TO = 8  # Q8_0: what other weight types become at load time
# types gguf-py dequantizes whose conversion waits for Weight.materialize (others convert at once,
# so an unconvertible one fails in load_gguf)
_DEFERRED = {"F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"}
F32 = 0


@dataclass(frozen=True)
class ArchSpec:
    rope_neox: bool  # rotate halves (NEOX) rather than adjacent pairs
    qkv_bias: bool   # Q/K/V projections carry biases
    qk_norm: bool = False  # each head of q and k is RMS-normed before RoPE (attn_q_norm, attn_k_norm)
    # gemma3: GELU-gated FFN; attention and FFN outputs RMS-normed before the residual add
    # (post_attention_norm, post_ffw_norm); embeddings times sqrt(n_embd); sliding-window layers
    geglu: bool = False
    post_norms: bool = False
    embd_scale: bool = False
    sliding_window: bool = False


# Any of them may carry rope_freqs.weight (Llama 3 RoPE scaling) and {arch}.rope.scaling.factor (linear).
ARCHS: dict[str, ArchSpec] = {
    "llama": ArchSpec(rope_neox=False, qkv_bias=False),
    "qwen2": ArchSpec(rope_neox=True, qkv_bias=True),
    "qwen3": ArchSpec(rope_neox=True, qkv_bias=False, qk_norm=True),
    "gemma3": ArchSpec(rope_neox=True, qkv_bias=False, qk_norm=True, geglu=True, post_norms=True, embd_scale=True,
                       sliding_window=True),
}

# (C tensor kind, GGUF name, required, is a per-layer tensor)
TENSORS = [
    (L.EK_T_TOK_EMBD, "token_embd.weight", True, False),
    (L.EK_T_OUTPUT_NORM, "output_norm.weight", True, False),
    (L.EK_T_OUTPUT, "output.weight", False, False),
    (L.EK_T_ATTN_NORM, "blk.{}.attn_norm.weight", True, True),
    (L.EK_T_ATTN_Q, "blk.{}.attn_q.weight", True, True),
    (L.EK_T_ATTN_K, "blk.{}.attn_k.weight", True, True),
    (L.EK_T_ATTN_V, "blk.{}.attn_v.weight", True, True),
    (L.EK_T_ATTN_O, "blk.{}.attn_output.weight", True, True),
    (L.EK_T_ATTN_Q_BIAS, "blk.{}.attn_q.bias", False, True),
    (L.EK_T_ATTN_K_BIAS, "blk.{}.attn_k.bias", False, True),
    (L.EK_T_ATTN_V_BIAS, "blk.{}.attn_v.bias", False, True),
    (L.EK_T_FFN_NORM, "blk.{}.ffn_norm.weight", True, True),
    (L.EK_T_FFN_GATE, "blk.{}.ffn_gate.weight", True, True),
    (L.EK_T_FFN_UP, "blk.{}.ffn_up.weight", True, True),
    (L.EK_T_FFN_DOWN, "blk.{}.ffn_down.weight", True, True),
    (L.EK_T_ATTN_Q_NORM, "blk.{}.attn_q_norm.weight", False, True),
    (L.EK_T_ATTN_K_NORM, "blk.{}.attn_k_norm.weight", False, True),
    (L.EK_T_ATTN_POST_NORM, "blk.{}.post_attention_norm.weight", False, True),
    (L.EK_T_FFN_POST_NORM, "blk.{}.post_ffw_norm.weight", False, True),
]
_BIAS_KINDS = {L.EK_T_ATTN_Q_BIAS, L.EK_T_ATTN_K_BIAS, L.EK_T_ATTN_V_BIAS}
_QK_NORM_KINDS = {L.EK_T_ATTN_Q_NORM, L.EK_T_ATTN_K_NORM}
_POST_NORM_KINDS = {L.EK_T_ATTN_POST_NORM, L.EK_T_FFN_POST_NORM}
_VECTOR_KINDS = _BIAS_KINDS | _QK_NORM_KINDS | _POST_NORM_KINDS | {L.EK_T_OUTPUT_NORM, L.EK_T_ATTN_NORM, L.EK_T_FFN_NORM}


@dataclass
class Weight:
    """One tensor as the C core will see it; ``array`` keeps the bytes alive.

    A matrix converted in C at load (Q4_K, Q5_0, Q6_K) is converted when ``materialize`` is
    called, i.e. when the model hands it to the C core, which packs and releases it at once: the
    process then holds one converted matrix at a time, not all of them (Qwen2.5-Coder-1.5B: peak
    RSS while loading 2.69 -> 1.46 GB)."""

    name: str
    kind: int
    layer: int
    type: int
    n_in: int
    n_out: int
    array: np.ndarray | None  # None until materialize() for a matrix converted at load
    source_type: str  # the GGUF type it came from
    source: Any = None  # the file's tensor a pending conversion reads

    def materialize(self) -> np.ndarray:
        """The bytes the C core reads, converting the file's tensor now if that is pending."""
        if self.array is None:
            qtype, self.array, _ = _as_native(self.source, self.name, self.kind in _VECTOR_KINDS)
            assert qtype == self.type
            _drop_file_pages(self.source.data)  # read once by the conversion
            self.source = None
        return self.array


# The matrices the C core interleaves for its x8 kernels (model.c): all but the token embedding,
# which it interleaves only as the tied output.
_MATRIX_KINDS = {L.EK_T_OUTPUT, L.EK_T_ATTN_Q, L.EK_T_ATTN_K, L.EK_T_ATTN_V, L.EK_T_ATTN_O, L.EK_T_FFN_GATE,
                 L.EK_T_FFN_UP, L.EK_T_FFN_DOWN}

# conversions run by this process (tests read it: a load from the weight cache runs none)
stats = {"converted": 0}


@dataclass
class LoadedGGUF:
    path: Path
    arch: str
    spec: ArchSpec
    hparams: dict[str, Any]
    fields: dict[str, Any]  # all metadata as Python values (tokenizer included)
    weights: list[Weight] = field(default_factory=list)
    converted: dict[str, int] = field(default_factory=dict)  # source type -> tensor count
    converted_to: dict[str, str] = field(default_factory=dict)  # source type -> the type it runs as
    weight_cache: Path | None = None  # the converted-once file the weights are mapped from, if any
    weight_cache_built: bool = False  # this load wrote that file (converting)

    @property
    def weight_types(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for w in self.weights:
            counts[w.source_type] = counts.get(w.source_type, 0) + 1
        return counts


def _drop_file_pages(arr: np.ndarray) -> None:
    """madvise(MADV_DONTNEED) the whole pages of a view of the read-only file map (Linux): they are
    dropped from this process (the kernel would re-read them from the file if touched again)."""
    import mmap

    base = arr
    while isinstance(base, np.ndarray) and not isinstance(base, np.memmap):
        base = base.base
    if isinstance(base, memoryview):  # np.frombuffer over the file's mmap (gguf_file.py)
        base = base.obj
    file_map = isinstance(base, mmap.mmap) or (isinstance(base, np.memmap) and base.mode == "r")
    if file_map and sys.platform.startswith("linux") and arr.nbytes:
        import ctypes

        page = mmap.PAGESIZE
        start = -(-arr.ctypes.data // page) * page  # whole pages inside the tensor only
        end = (arr.ctypes.data + arr.nbytes) // page * page
        if end > start:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
            libc.madvise(start, end - start, 4)  # MADV_DONTNEED; failure only costs memory


def release_weight(w: Weight) -> None:
    """Give back the memory of a weight the C core no longer reads (it keeps a repacked copy).

    A tensor converted at load owns its array: dropping it frees the memory. A tensor used as
    the file holds it is a view of the read-only memory map: its pages, read once for the
    repacking, are dropped from this process (_drop_file_pages).
    """
    if w.array is None:
        return
    _drop_file_pages(w.array)
    w.array = np.empty(0, dtype=w.array.dtype)


def trim_heap() -> None:
    """Return freed heap memory to the system (glibc keeps freed blocks of a few MiB, as the
    converted tensors are, in its heap otherwise); a no-op elsewhere."""
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL(None).malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
            pass


def _open_gguf(path: Path) -> GGUFFile:
    try:
        return read_gguf(path)
    except GGUFFormatError as e:
        raise ModelLoadError(f"{path}: not a valid GGUF file ({e})") from None


def _get(fields: dict, key: str, typ, default=None, required: bool = True):
    v = fields.get(key, default)
    if isinstance(v, Exception):
        raise ModelLoadError(f"metadata field {key!r} is malformed: {v}")
    if v is None:
        if required:
            raise ModelLoadError(f"metadata field {key!r} is missing")
        return None
    try:
        return typ(v)
    except (TypeError, ValueError, OverflowError):  # OverflowError: int(inf) (found by tools/fuzz_gguf.py)
        raise ModelLoadError(f"metadata field {key!r} has an unusable value {v!r}") from None


def _rope_scale(fields: dict, a: str) -> float:
    """Linear RoPE scaling as llama.cpp reads it: angles times 1 / {a}.rope.scaling.factor (or
    {a}.rope.scale_linear); 1.0 when absent or 0. YaRN and LongRoPE also need other terms: refused."""
    kind = _get(fields, f"{a}.rope.scaling.type", str, default="none")
    if kind not in ("none", "linear"):
        raise ModelLoadError(f"metadata: {a}.rope.scaling.type = {kind!r} is not supported (edgekv runs none, linear)")
    factor = _get(fields, f"{a}.rope.scaling.factor", float, required=False)
    if factor is None:
        factor = _get(fields, f"{a}.rope.scale_linear", float, default=0.0)
    if factor == 0.0:
        return 1.0
    if not 0.0 < factor < float("inf"):
        raise ModelLoadError(f"metadata: {a}.rope.scaling.factor (or rope.scale_linear) = {factor} must be positive")
    return factor


def read_hparams(fields: dict, arch: str) -> dict[str, Any]:
    a = arch
    n_embd = _get(fields, f"{a}.embedding_length", int)
    n_head = _get(fields, f"{a}.attention.head_count", int)
    if n_head <= 0 or n_embd <= 0:
        raise ModelLoadError(f"metadata: embedding_length ({n_embd}) and head_count ({n_head}) must be positive")
    head_dim = _get(fields, f"{a}.attention.key_length", int, default=n_embd // n_head)
    # one head size for keys and values is what the KV cache holds (llama.cpp reads them apart)
    v_dim = _get(fields, f"{a}.attention.value_length", int, default=head_dim)
    if v_dim != head_dim:
        raise ModelLoadError(f"metadata: {a}.attention.value_length ({v_dim}) differs from the key length "
                             f"({head_dim}); edgekv needs one head size for keys and values")
    tokens = fields.get("tokenizer.ggml.tokens")
    n_vocab = _get(fields, f"{a}.vocab_size", int, default=len(tokens) if isinstance(tokens, list) else None)
    hp = dict(
        n_vocab=n_vocab,
        n_embd=n_embd,
        n_layer=_get(fields, f"{a}.block_count", int),
        n_head=n_head,
        n_head_kv=_get(fields, f"{a}.attention.head_count_kv", int, default=n_head),
        head_dim=head_dim,
        n_ff=_get(fields, f"{a}.feed_forward_length", int),
        n_ctx_train=_get(fields, f"{a}.context_length", int, default=2048),
        rope_dim=_get(fields, f"{a}.rope.dimension_count", int, default=head_dim),
        rope_base=_get(fields, f"{a}.rope.freq_base", float, default=10000.0),
        norm_eps=_get(fields, f"{a}.attention.layer_norm_rms_epsilon", float, default=1e-5),
        rope_scale=_rope_scale(fields, a),
    )
    hp.update(_gemma3_hparams(fields, a, hp) if ARCHS[a].sliding_window else
              dict(swa_window=0, swa_period=0, rope_base_swa=0.0, attn_scale=0.0))
    # n_embd and n_head too: every value must fit the C config's int fields (a larger one made
    # cffi raise OverflowError; found by tools/fuzz_gguf.py).
    for k in ("n_vocab", "n_embd", "n_layer", "n_head", "n_head_kv", "n_ff", "head_dim", "n_ctx_train"):
        if hp[k] <= 0 or hp[k] > 1 << 24:
            raise ModelLoadError(f"metadata: {k} = {hp[k]} is out of range")
    # the C core checks it against head_dim; it must fit an int first. 0 would leave positions
    # unencoded (the model then loads and writes garbage).
    if not 0 < hp["rope_dim"] <= 1 << 24:
        raise ModelLoadError(f"metadata: rope_dim = {hp['rope_dim']} ({a}.rope.dimension_count) is out of range "
                             f"(1..{1 << 24})")
    return hp


def _gemma3_hparams(fields: dict, a: str, hp: dict) -> dict[str, Any]:
    """Sliding window, its layer pattern and RoPE base, and the query scale, as llama.cpp reads them for
    gemma3: every swa_period-th layer (5, 11, ... for 6) attends globally with {a}.rope.freq_base, the
    others to the last {a}.attention.sliding_window positions with base 10000 (or
    {a}.rope.freq_base_swa); queries scaled by 1/sqrt(head_dim) (27B, 62 layers: 1/sqrt(n_embd / n_head))."""
    window = _get(fields, f"{a}.attention.sliding_window", int, default=0)
    if window <= 0:
        raise ModelLoadError(f"metadata: {a}.attention.sliding_window is missing or 0; edgekv runs {a} with "
                             f"sliding-window layers only")
    if window > 1 << 24:
        raise ModelLoadError(f"metadata: {a}.attention.sliding_window = {window} is out of range")
    period = fields.get(f"{a}.attention.sliding_window_pattern", 6)
    if isinstance(period, list):
        raise ModelLoadError(f"metadata: {a}.attention.sliding_window_pattern as a per-layer array is not supported "
                             f"(edgekv runs a period: every n-th layer global)")
    period = _get({"p": period}, "p", int)
    if not 1 <= period <= 1 << 24:
        raise ModelLoadError(f"metadata: {a}.attention.sliding_window_pattern = {period} is out of range")
    base_swa = _get(fields, f"{a}.rope.freq_base_swa", float, default=10000.0)
    if not 0.0 < base_swa < float("inf"):
        raise ModelLoadError(f"metadata: {a}.rope.freq_base_swa = {base_swa} must be positive")
    width = hp["n_embd"] // hp["n_head"] if hp["n_layer"] == 62 else hp["head_dim"]
    return dict(swa_window=window, swa_period=period, rope_base_swa=base_swa, attn_scale=width ** -0.5)


def _as_native(t, name: str, want_f32: bool, defer: bool = False) -> tuple[int, np.ndarray | None, str]:
    """(type, contiguous array, source type name) for one GGUF tensor, converting if needed.

    want_f32: norms and biases, which the C core reads as float32 vectors. defer: for a C
    conversion, return the type it will have and None (Weight.materialize converts later).
    """
    from gguf import GGMLQuantizationType, quants

    qtype = int(t.tensor_type)
    src = t.tensor_type.name
    data = t.data
    n_in = int(t.shape[0])
    n_out = int(np.prod(t.shape[1:])) if len(t.shape) > 1 else 1
    expected = int(t.n_bytes)
    if data.nbytes != expected:
        raise ModelLoadError(f"tensor {name!r}: file holds {data.nbytes} of its {expected} bytes (truncated file?)")
    if qtype == F32 or (qtype in NATIVE_TYPES and not want_f32):
        return qtype, np.ascontiguousarray(data), src
    if not want_f32:
        dst = L.ek_convert_target(qtype, n_in)
        if dst >= 0 and defer:
            return dst, None, src
        if dst >= 0:  # a C conversion (csrc/weight_convert.c)
            stats["converted"] += 1
            src_arr = np.ascontiguousarray(data)
            out = np.empty(L.ek_type_row_bytes(dst, n_in) * n_out, dtype=np.uint8)
            rc = L.ek_convert_weights(qtype, _native.ffi.from_buffer(src_arr), src_arr.nbytes, n_in, n_out,
                                      _native.ffi.from_buffer(out), out.nbytes)
            if rc != dst:
                raise ModelLoadError(f"tensor {name!r}: cannot convert weight type {src} ({n_in} x {n_out})")
            return dst, out, src
    if defer and src in _DEFERRED:  # gguf-py's dequantizer, run by Weight.materialize
        return (F32 if want_f32 or n_in % 32 else CONVERT_TO), None, src
    stats["converted"] += 1
    try:
        f32 = quants.dequantize(data, GGMLQuantizationType(qtype)).astype(np.float32, copy=False)
    except Exception as e:
        raise ModelLoadError(f"tensor {name!r}: cannot convert weight type {src}: {e}") from None
    f32 = np.ascontiguousarray(f32.reshape(n_out, n_in))
    if want_f32 or n_in % 32:  # Q8_0 needs whole blocks of 32
        return F32, f32, src
    return CONVERT_TO, np.ascontiguousarray(quants.quantize(f32, GGMLQuantizationType.Q8_0)), src


def _add_rope_factors(out: LoadedGGUF, t, path: Path) -> None:
    """The RoPE angle divisors per rotated dimension pair: rope_freqs.weight (Llama 3 scaling, as
    llama.cpp applies it: theta_i / factor_i) times the linear scaling factor; nothing when both
    are absent (the C core then divides by nothing, as before)."""
    scale, half = out.hparams["rope_scale"], out.hparams["rope_dim"] // 2
    if t is None and scale == 1.0:
        return
    if t is None:
        f = np.ones(half, dtype=np.float32)
    else:
        if len(t.shape) == 0:
            raise ModelLoadError(f"{path}: tensor 'rope_freqs.weight' has no dimensions")
        try:
            _, f, _ = _as_native(t, "rope_freqs.weight", True)
        except ModelLoadError as e:
            raise ModelLoadError(f"{path}: {e}") from None
        f = np.asarray(f, dtype=np.float32).reshape(-1)
        if f.size != half:
            raise ModelLoadError(f"{path}: tensor 'rope_freqs.weight' has {f.size} values, "
                                 f"expected rope_dim / 2 = {half}")
        if not np.all(np.isfinite(f) & (f > 0)):
            raise ModelLoadError(f"{path}: tensor 'rope_freqs.weight' holds a factor that is not positive and finite")
    f = np.ascontiguousarray(f * np.float32(scale), dtype=np.float32)
    src = t.tensor_type.name if t is not None else "F32"
    out.weights.append(Weight("rope_freqs.weight", L.EK_T_ROPE_FREQS, -1, F32, half, 1, f, src))


def _use_weight_cache(out: LoadedGGUF, progress: bool | None) -> None:
    """Map the weights from their converted-once file (weight_cache.py), writing it first if needed.
    Without a usable cache directory the weights stay as they are (converted at this load)."""
    from . import weight_cache as wc

    d = wc.directory(out.path.stat().st_size)
    if d is None:
        return
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        _cache_unwritable(out, e)
        return
    sha = wc.gguf_sha256(out.path, d)
    key = {"gguf_sha256": sha, "weight_format": wc.FORMAT_VERSION, "simd": wc.simd(), "layout": wc.layout_fingerprint()}
    file = d / wc.file_name(sha)
    sizes = [wc.nbytes(w) for w in out.weights]
    mapped = None
    if file.exists():
        try:
            mapped = wc.open_file(file, key, out.weights, sizes)
        except wc.CacheInvalid as e:
            warnings.warn(f"edgekv: weight cache file {file} is unusable ({e}); rebuilding it", stacklevel=3)
    if mapped is None:
        tied = not any(w.kind == L.EK_T_OUTPUT for w in out.weights)
        pack = _MATRIX_KINDS | ({L.EK_T_TOK_EMBD} if tied else set())
        try:
            log.info("%s: converting the weights once into %s", out.path.name, file)
            wc.build_file(file, key, out.weights, sizes, pack, progress)
        except OSError as e:
            if any(w.array is not None and w.array.size == 0 for w in out.weights):  # consumed before it failed
                out.weights = load_gguf(out.path, weight_cache=False).weights
            _cache_unwritable(out, e)
            return
        wc.stats["built"] += 1
        out.weight_cache_built = True
        mapped = wc.open_file(file, key, out.weights, sizes)
    mm, recs = mapped
    for w, r in zip(out.weights, recs):
        w.array = np.frombuffer(mm, np.uint8, count=r["nbytes"], offset=r["offset"])
        w.type, w.source = r["type"], None
    wc.stats["mapped"] += 1
    out.weight_cache = file


def _cache_unwritable(out: LoadedGGUF, e: OSError) -> None:
    warnings.warn(f"edgekv: cannot write the weight cache ({e}); loading {out.path.name} without it, converting "
                  f"at every load. Set EDGEKV_WEIGHT_CACHE to a writable directory, or to 'off' to load without "
                  f"the cache silently.", stacklevel=4)


def load_gguf(path: str | os.PathLike, weight_cache: bool = True, progress: bool | None = None) -> LoadedGGUF:
    """weight_cache: map the weights from their converted-once file (weight_cache.py; also
    EDGEKV_WEIGHT_CACHE=off). progress: a progress bar while converting (None: when stderr is a terminal)."""
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"model file not found: {path}")
    if not path.is_file():
        raise ModelLoadError(f"model path is not a file: {path}")
    gf = _open_gguf(path)
    fields = gf.fields
    arch = fields.get("general.architecture")
    if not isinstance(arch, str):
        raise ModelLoadError(f"{path}: metadata field 'general.architecture' is missing")
    if arch not in ARCHS:
        raise ModelLoadError(
            f"{path}: unsupported architecture {arch!r} (edgekv runs: {', '.join(sorted(ARCHS))})"
        )
    tokens = fields.get("tokenizer.ggml.tokens")
    # The vocabulary must be strings: an array of numbers there built a tokenizer that encoded every
    # text to no tokens at all (found by tools/fuzz_gguf.py).
    if isinstance(tokens, list) and not all(isinstance(t, str) for t in tokens):
        raise ModelLoadError(f"{path}: metadata field 'tokenizer.ggml.tokens' must be an array of strings")
    try:
        hp = read_hparams(fields, arch)
    except ModelLoadError as e:
        raise ModelLoadError(f"{path}: {e}") from None
    # Weight arrays are views of the file's memory map and keep the map alive on their own.
    out = LoadedGGUF(path=path, arch=arch, spec=ARCHS[arch], hparams=hp, fields=fields)
    by_name = {t.name: t for t in gf.tensors}
    # Tensors of layers past block_count would be ignored: a smaller block_count than the file
    # holds runs a truncated network that writes garbage.
    layer_of = {t.name: t.name.split(".")[1] for t in gf.tensors if t.name.startswith("blk.")}
    beyond = [n for n, layer in layer_of.items() if layer.isdigit() and int(layer) >= hp["n_layer"]]
    if beyond:
        raise ModelLoadError(
            f"{path}: tensor {beyond[0]!r} belongs to no layer: {arch}.block_count = {hp['n_layer']}, "
            f"but the file has tensors for more layers ({len(beyond)} tensors past the last)"
        )
    _add_rope_factors(out, by_name.get("rope_freqs.weight"), path)
    for kind, pattern, required, per_layer in TENSORS:
        if kind in _QK_NORM_KINDS and not ARCHS[arch].qk_norm:
            continue  # llama.cpp reads them for QK-norm architectures only
        if kind in _POST_NORM_KINDS and not ARCHS[arch].post_norms:
            continue
        layers = range(hp["n_layer"]) if per_layer else [-1]
        for layer in layers:
            name = pattern.format(layer) if per_layer else pattern
            t = by_name.get(name)
            if t is None:
                if required or (kind in _BIAS_KINDS and ARCHS[arch].qkv_bias) or kind in _QK_NORM_KINDS | _POST_NORM_KINDS:
                    raise ModelLoadError(f"{path}: tensor {name!r} is missing")
                continue
            if len(t.shape) == 0:  # n_dims = 0 in the file: no row length (was an IndexError; tools/fuzz_gguf.py)
                raise ModelLoadError(f"{path}: tensor {name!r} has no dimensions")
            want_f32 = kind in _VECTOR_KINDS
            try:
                qtype, arr, src = _as_native(t, name, want_f32, defer=True)
            except ModelLoadError as e:
                raise ModelLoadError(f"{path}: {e}") from None
            if src not in NATIVE_TYPES.values():
                out.converted[src] = out.converted.get(src, 0) + 1
                if not want_f32:
                    out.converted_to[src] = NATIVE_TYPES[qtype]
            n_in = int(t.shape[0])
            n_out = int(np.prod(t.shape[1:])) if len(t.shape) > 1 else 1
            out.weights.append(Weight(name, kind, layer, qtype, n_in, n_out, arr, src, t if arr is None else None))
    if out.converted:
        desc = ", ".join(f"{n} {k}" + (f" to {out.converted_to[k]}" if k in out.converted_to else "")
                         for k, n in sorted(out.converted.items()))
        log.info("%s: converts %s tensors (norms and biases to F32)", path.name, desc)
    if weight_cache:
        _use_weight_cache(out, progress)
    return out
