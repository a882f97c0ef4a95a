#!/usr/bin/env python3
"""Fuzz edgekv's model loader with mutated GGUF files (tiny generated models, and a real one).

Every case is a seed file plus one to three mutations (structure-aware: truncation, bit flips,
huge counts, lengths and offsets, metadata of the wrong type or with edge values, tensors of the
wrong shape or type, dropped/duplicated/renamed keys and tensors, broken vocabularies, splices).
A case is loaded with ``edgekv.Model``; when it loads, it is used a little (logits, greedy and
sampled generation). The outcome is classified:

  ok            loaded and ran
  rejected      raised an edgekv.errors.EdgekvError subclass (ModelLoadError, TokenizerError, ...)
  value-error   raised ValueError (edgekv's documented error for bad arguments); accepted, counted
  UNEXPECTED    any other exception: a failing case
  CRASH         the process died by a signal (or aborted): a failing case
  HANG          no result within --case-timeout seconds: a failing case

Cases are a pure function of (--seed, case number): the parent never ships bytes, only numbers,
and any case can be replayed with ``--replay N`` (``--save DIR`` writes its file).

Engines:
  batch (default)  The parent starts --jobs worker processes, each loading many cases in a row
                   (a new interpreter per case would cost ~100x the case). A worker prints a line
                   before and after each case; when it dies, the parent knows the case it was on,
                   re-runs it alone in a fresh worker, and if that does not crash, bisects the
                   worker's earlier cases for the shortest run of cases ending in it that does
                   (a crash that needs state left by earlier cases). Hangs are killed and recorded.
  atheris          Coverage-guided (libFuzzer through atheris, when it is installed): the same
                   mutators as a custom mutator, the same oracle; libFuzzer stops at the first
                   failing input and writes it out (crash-*). For exploration, not for CI counts.

    python tools/fuzz_gguf.py --cases 20000 --jobs 2           # CI: prints counts and a rate
    python tools/fuzz_gguf.py --replay 1234 --save /tmp/case   # one case, in this process
    python tools/fuzz_gguf.py --engine atheris --time 60       # coverage-guided exploration

Exit status: 0 when no case failed, 1 otherwise. The last line is "N passed, M failed".
"""

from __future__ import annotations

import argparse
import json
import os
import random
import select
import signal
import struct
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT / "models") not in sys.path:
    sys.path.insert(0, str(ROOT / "models"))
# edgekv: the installed package (or PYTHONPATH's) first; the checkout's python/ only as a fallback,
# since its native library exists only after an in-tree build
if str(ROOT / "python") not in sys.path:
    sys.path.append(str(ROOT / "python"))

# ----------------------------------------------------------------------------------------------
# GGUF structure: just enough to parse a valid file and write it back, and to know where every
# integer of the header lies (for in-place overwrites).
# ----------------------------------------------------------------------------------------------

T_U8, T_I8, T_U16, T_I16, T_U32, T_I32, T_F32, T_BOOL, T_STR, T_ARR, T_U64, T_I64, T_F64 = range(13)
SCALAR = {T_U8: "<B", T_I8: "<b", T_U16: "<H", T_I16: "<h", T_U32: "<I", T_I32: "<i", T_F32: "<f",
          T_BOOL: "<?", T_U64: "<Q", T_I64: "<q", T_F64: "<d"}
INT_TYPES = (T_U8, T_I8, T_U16, T_I16, T_U32, T_I32, T_U64, T_I64)
GGML_TYPES = (0, 1, 2, 3, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 19, 20, 23, 24, 25, 26, 27, 28, 30, 34, 35, 39)


@dataclass
class KV:
    key: bytes
    vtype: int
    value: Any  # int/float/bool, bytes (string), or (subtype, [values]) for arrays


@dataclass
class TensorInfo:
    name: bytes
    dims: list[int]
    ttype: int
    offset: int


@dataclass
class Doc:
    version: int
    kvs: list[KV]
    tensors: list[TensorInfo]
    data: bytes             # the data section (tensor offsets are relative to its start)
    header_ints: list = field(default_factory=list)  # (offset, size, label) of header integers


def _s(b: bytes) -> str:
    return b.decode("utf-8", "replace")


class _Buf:
    def __init__(self, b: bytes):
        self.b, self.o = b, 0

    def take(self, fmt: str):
        v = struct.unpack_from(fmt, self.b, self.o)[0]
        self.o += struct.calcsize(fmt)
        return v

    def string(self) -> bytes:
        n = self.take("<Q")
        s = self.b[self.o:self.o + n]
        self.o += n
        return s


def _read_value(buf: _Buf, vtype: int, ints: list, label: str):
    if vtype == T_STR:
        ints.append((buf.o, 8, label + ".len"))
        return buf.string()
    if vtype == T_ARR:
        ints.append((buf.o, 4, label + ".subtype"))
        sub = buf.take("<I")
        ints.append((buf.o, 8, label + ".count"))
        n = buf.take("<Q")
        return (sub, [_read_value(buf, sub, ints if i < 4 else [], f"{label}[{i}]") for i in range(n)])
    if vtype in INT_TYPES:
        ints.append((buf.o, struct.calcsize(SCALAR[vtype]), label))
    return buf.take(SCALAR[vtype])


def parse_gguf(b: bytes) -> Doc:
    buf = _Buf(b)
    if buf.take("<I") != 0x46554747:
        raise ValueError("not GGUF")
    ints = [(4, 4, "version"), (8, 8, "tensor_count"), (16, 8, "kv_count")]
    version = buf.take("<I")
    n_t, n_kv = buf.take("<Q"), buf.take("<Q")
    kvs = []
    for _ in range(n_kv):
        ints.append((buf.o, 8, "key.len"))
        key = buf.string()
        ints.append((buf.o, 4, _s(key) + ".type"))
        vt = buf.take("<I")
        kvs.append(KV(key, vt, _read_value(buf, vt, ints, _s(key))))
    tensors = []
    for _ in range(n_t):
        ints.append((buf.o, 8, "tensor.name.len"))
        name = buf.string()
        ints.append((buf.o, 4, _s(name) + ".n_dims"))
        nd = buf.take("<I")
        dims = []
        for i in range(nd):
            ints.append((buf.o, 8, f"{_s(name)}.ne[{i}]"))
            dims.append(buf.take("<Q"))
        ints.append((buf.o, 4, _s(name) + ".type"))
        tt = buf.take("<I")
        ints.append((buf.o, 8, _s(name) + ".offset"))
        tensors.append(TensorInfo(name, dims, tt, buf.take("<Q")))
    align = next((kv.value for kv in kvs if kv.key == b"general.alignment" and kv.vtype == T_U32), 32)
    align = align if 0 < align <= 1 << 16 and align & (align - 1) == 0 else 32
    start = -(-buf.o // align) * align
    return Doc(version, kvs, tensors, b[start:], ints)


def _write_value(out: list, vtype: int, value) -> None:
    if vtype == T_STR:
        out.append(struct.pack("<Q", len(value)) + value)
    elif vtype == T_ARR:
        sub, items = value
        out.append(struct.pack("<IQ", sub, len(items)))
        for it in items:
            _write_value(out, sub, it)
    else:
        out.append(struct.pack(SCALAR[vtype], value))


def write_gguf(d: Doc, align: int | None = None) -> bytes:
    out = [struct.pack("<IIQQ", 0x46554747, d.version, len(d.tensors), len(d.kvs))]
    for kv in d.kvs:
        out.append(struct.pack("<Q", len(kv.key)) + kv.key + struct.pack("<I", kv.vtype))
        _write_value(out, kv.vtype, kv.value)
    for t in d.tensors:
        out.append(struct.pack("<Q", len(t.name)) + t.name + struct.pack("<I", len(t.dims)))
        out.append(b"".join(struct.pack("<Q", x) for x in t.dims) + struct.pack("<IQ", t.ttype, t.offset))
    head = b"".join(out)
    if align is None:
        a = next((kv.value for kv in d.kvs if kv.key == b"general.alignment" and kv.vtype == T_U32), 32)
        align = a if isinstance(a, int) and 0 < a <= 1 << 16 and a & (a - 1) == 0 else 32
    return head + b"\0" * (-len(head) % align) + d.data


# ----------------------------------------------------------------------------------------------
# mutations
# ----------------------------------------------------------------------------------------------

EDGE_INTS = [0, 1, 2, 3, 7, 8, 31, 32, 33, 63, 64, 65, 127, 128, 255, 256, 1023, 1024, 4096, 8192, 65535, 65536,
             1 << 20, 1 << 24, (1 << 24) + 1, (1 << 31) - 1, 1 << 31, (1 << 32) - 1, 1 << 32, 1 << 40, 1 << 62,
             (1 << 63) - 1, 1 << 63, (1 << 64) - 1]
EDGE_FLOATS = [0.0, -0.0, -1.0, 1e-30, 1e-45, 1e30, 3.4e38, float("inf"), float("-inf"), float("nan"), 0.5, 1e6]
INT_RANGE = {T_U8: (0, 255), T_I8: (-128, 127), T_U16: (0, 65535), T_I16: (-32768, 32767), T_U32: (0, 2**32 - 1),
             T_I32: (-2**31, 2**31 - 1), T_U64: (0, 2**64 - 1), T_I64: (-2**63, 2**63 - 1)}
# metadata the loader reads (by suffix: "llama.block_count" and "qwen2.block_count" alike)
HPARAM_SUFFIXES = (b".block_count", b".embedding_length", b".attention.head_count", b".attention.head_count_kv",
                   b".feed_forward_length", b".context_length", b".attention.key_length", b".rope.dimension_count",
                   b".vocab_size", b".rope.freq_base", b".attention.layer_norm_rms_epsilon")
BAD_STRINGS = [b"", b"\xff\xfe", b"\xc3", b"\x00", b"a" * 5000, "é€😀".encode(), b"{% for %}", b"{{ 1/0 }}",
               b"{{ raise_exception('boom') }}", b"<|im_start|>", b" ", b"\n\n", b"a b c", b"llama", b"qwen2",
               b"gpt2", b"llama\x00", b"LLAMA"]


def _edge_int(rng: random.Random, vtype: int, orig: int | None = None) -> int:
    lo, hi = INT_RANGE.get(vtype, (0, 2**64 - 1))
    choices = [v for v in EDGE_INTS if lo <= v <= hi] + [v for v in (-1, -2, -(1 << 31), lo) if lo <= v <= hi]
    if orig is not None:
        choices += [v for v in (orig + 1, orig - 1, orig * 2, orig // 2, orig * 3 // 2, orig + 32) if lo <= v <= hi]
    return rng.choice(choices)


def _pick_kv(rng: random.Random, d: Doc, prefer_hparams: float = 0.6) -> KV | None:
    if not d.kvs:
        return None
    hp = [kv for kv in d.kvs if kv.key.endswith(HPARAM_SUFFIXES)]
    return rng.choice(hp) if hp and rng.random() < prefer_hparams else rng.choice(d.kvs)


def _convert(value, vtype: int, rng: random.Random):
    """A value of vtype made from an old value (for retyping a key)."""
    num = value if isinstance(value, (int, float)) and not isinstance(value, bool) else rng.choice([0, 1, 2, 64])
    if vtype == T_STR:
        return str(num).encode() if rng.random() < 0.7 else rng.choice(BAD_STRINGS)
    if vtype == T_ARR:
        sub = rng.choice([T_U32, T_I32, T_STR, T_F32, T_ARR])
        if sub == T_ARR:
            return (T_ARR, [(T_U32, [1, 2])])
        return (sub, [_convert(num, sub, rng) for _ in range(rng.choice([0, 1, 2]))])
    if vtype == T_BOOL:
        return bool(num)
    if vtype in (T_F32, T_F64):
        return float(num) if rng.random() < 0.6 else rng.choice(EDGE_FLOATS)
    lo, hi = INT_RANGE[vtype]
    try:
        n = int(num)
    except (OverflowError, ValueError):
        n = 0
    return n if lo <= n <= hi else _edge_int(rng, vtype)


def m_kv_edge(rng, d: Doc):
    """A metadata value (mostly a hyperparameter) set to an edge value of its own type."""
    kv = _pick_kv(rng, d, 0.8)
    if kv is None:
        return "kv-edge: none"
    if kv.vtype in INT_TYPES:
        kv.value = _edge_int(rng, kv.vtype, kv.value)
    elif kv.vtype in (T_F32, T_F64):
        kv.value = rng.choice(EDGE_FLOATS)
    elif kv.vtype == T_STR:
        kv.value = rng.choice(BAD_STRINGS)
    elif kv.vtype == T_BOOL:
        kv.value = not kv.value
    elif kv.vtype == T_ARR:
        return m_array(rng, d, kv)
    return f"kv-edge {_s(kv.key)}"


def m_kv_retype(rng, d: Doc):
    """A metadata value re-encoded as another type (or an invalid type id)."""
    kv = _pick_kv(rng, d)
    if kv is None:
        return "kv-retype: none"
    if rng.random() < 0.08:
        kv.vtype, kv.value = rng.choice([13, 99, 2**32 - 1]), 0
        return f"kv-retype {_s(kv.key)} -> invalid"
    nt = rng.choice([t for t in range(13) if t != kv.vtype])
    kv.value = _convert(kv.value if not isinstance(kv.value, tuple) else len(kv.value[1]), nt, rng)
    kv.vtype = nt
    return f"kv-retype {_s(kv.key)} -> {nt}"


def m_array(rng, d: Doc, kv: KV | None = None):
    """Vocabulary arrays (tokens, token types, merges, ...): shortened, padded, broken items."""
    arrs = [k for k in d.kvs if k.vtype == T_ARR]
    if kv is None:
        if not arrs:
            return "array: none"
        kv = rng.choice(arrs)
    sub, items = kv.value
    items = list(items)
    op = rng.randrange(7)
    if op == 0 and items:
        del items[rng.randrange(len(items)):]
    elif op == 1:
        filler = items[-1] if items else b"x" if sub == T_STR else (T_U32, []) if sub == T_ARR else 0
        items += [filler] * rng.choice([1, 10, 1000])
    elif op == 2 and items:
        i = rng.randrange(len(items))
        items[i] = rng.choice(BAD_STRINGS) if sub == T_STR else _convert(items[i], sub, rng) if sub != T_ARR else items[i]
        if sub in INT_TYPES:
            items[i] = _edge_int(rng, sub)
    elif op == 3 and items:
        rng.shuffle(items)
    elif op == 4:
        nsub = rng.choice([T_I32, T_STR, T_F32, T_U8])
        items = [_convert(v if not isinstance(v, bytes) else len(v), nsub, rng) for v in items[:2000]]
        sub = nsub
    elif op == 5 and items and sub == T_STR:
        i = rng.randrange(len(items))
        items[i] = items[rng.randrange(len(items))]  # a duplicate token or merge
    else:
        items = []
    kv.value = (sub, items)
    return f"array {_s(kv.key)} op{op}"


def m_kv_drop_dup(rng, d: Doc):
    kv = _pick_kv(rng, d, 0.5)
    if kv is None:
        return "kv-drop: none"
    if rng.random() < 0.6:
        d.kvs.remove(kv)
        return f"kv-drop {_s(kv.key)}"
    d.kvs.insert(rng.randrange(len(d.kvs) + 1), KV(kv.key, kv.vtype, kv.value))
    return f"kv-dup {_s(kv.key)}"


def m_kv_add(rng, d: Doc):
    arch = next((kv.value for kv in d.kvs if kv.key == b"general.architecture" and kv.vtype == T_STR), b"llama")
    key = rng.choice([b".attention.key_length", b".vocab_size", b".rope.dimension_count", b".context_length"])
    if rng.random() < 0.3:
        k, vt = b"general.alignment", rng.choice([T_U32, T_U32, T_U64, T_I32])
    else:
        k, vt = arch + key, rng.choice([T_U32, T_I32, T_U64, T_I64, T_F32, T_STR])
    d.kvs = [kv for kv in d.kvs if kv.key != k]
    val = _edge_int(rng, vt) if vt in INT_TYPES else _convert(rng.choice([0, 1, 16, 32, 64, 1 << 20]), vt, rng)
    d.kvs.append(KV(k, vt, val))
    return f"kv-add {_s(k)}"


def m_tensor_shape(rng, d: Doc):
    """A tensor with other dimensions: swapped, scaled, zero, huge, more or fewer of them."""
    if not d.tensors:
        return "shape: none"
    t = rng.choice(d.tensors)
    op = rng.randrange(6)
    if op == 0 and len(t.dims) > 1:
        t.dims = t.dims[::-1]
    elif op == 1:
        i = rng.randrange(len(t.dims)) if t.dims else 0
        if t.dims:
            t.dims[i] = _edge_int(rng, T_U64, t.dims[i])
    elif op == 2:
        t.dims = t.dims[:rng.randrange(len(t.dims) + 1)]
    elif op == 3:
        t.dims = t.dims + [rng.choice([1, 1, 2, 0])] * rng.randrange(1, 4)
    elif op == 4 and t.dims:
        t.dims = [t.dims[0] * 2] + [max(1, x // 2) for x in t.dims[1:]]
    else:
        t.dims = [rng.choice([32, 64, 1, 0]) for _ in range(rng.randrange(0, 5))]
    return f"shape {_s(t.name)} -> {t.dims}"


def m_tensor_type(rng, d: Doc):
    if not d.tensors:
        return "type: none"
    t = rng.choice(d.tensors)
    t.ttype = rng.choice(GGML_TYPES + (4, 5, 31, 42, 99, 2**32 - 1))
    return f"type {_s(t.name)} -> {t.ttype}"


def m_tensor_offset(rng, d: Doc):
    if not d.tensors:
        return "offset: none"
    t = rng.choice(d.tensors)
    other = rng.choice(d.tensors)
    t.offset = rng.choice([t.offset + 1, t.offset - 32 if t.offset >= 32 else 1, t.offset + 32, 0, other.offset,
                           len(d.data), len(d.data) - 32, len(d.data) + 4096, 1 << 40, (1 << 63) - 1, 2**64 - 1,
                           2**64 - 32])
    return f"offset {_s(t.name)} -> {t.offset}"


def m_tensor_name(rng, d: Doc):
    if len(d.tensors) < 2:
        return "name: none"
    a, b = rng.sample(d.tensors, 2)
    op = rng.randrange(4)
    if op == 0:
        a.name, b.name = b.name, a.name
    elif op == 1:
        a.name = b.name  # duplicate name
    elif op == 2:
        a.name = rng.choice(BAD_STRINGS[:6]) + a.name
    else:
        a.name = a.name.replace(b"blk.0", b"blk.99").replace(b"blk.1", b"blk.-1")
    return f"name op{op}"


def m_tensor_drop_dup(rng, d: Doc):
    if not d.tensors:
        return "tensor-drop: none"
    t = rng.choice(d.tensors)
    if rng.random() < 0.6:
        d.tensors.remove(t)
        return f"tensor-drop {_s(t.name)}"
    d.tensors.append(TensorInfo(t.name + (b"" if rng.random() < 0.5 else b".x"), list(t.dims), t.ttype, t.offset))
    return f"tensor-dup {_s(t.name)}"


def m_tensor_data(rng, d: Doc):
    """Weights full of NaN, Inf or huge values (fp16 scales of quantized blocks included)."""
    if not d.tensors or not d.data:
        return "data: none"
    t = rng.choice(d.tensors)
    pat = rng.choice([b"\x00\x7c", b"\x00\x7e", b"\xff\xff", b"\x00\x00\xc0\x7f", b"\x00\x00\x80\x7f", b"\xff" * 4,
                      b"\x00"])
    start = min(t.offset, len(d.data))
    n = min(rng.choice([2, 34, 256, 4096, 1 << 20]), len(d.data) - start)
    data = bytearray(d.data)
    data[start:start + n] = (pat * (n // len(pat) + 1))[:n]
    d.data = bytes(data)
    return f"data {_s(t.name)} {pat.hex()} x{n}"


def m_version(rng, d: Doc):
    d.version = rng.choice([0, 1, 2, 4, 0x10000, 2**32 - 1])
    return f"version {d.version}"


STRUCTURAL: list[tuple[float, Callable]] = [
    (3, m_kv_edge), (2, m_kv_retype), (2, m_array), (1.5, m_kv_drop_dup), (1, m_kv_add), (2, m_tensor_shape),
    (1.5, m_tensor_type), (1.5, m_tensor_offset), (1, m_tensor_name), (1, m_tensor_drop_dup), (1, m_tensor_data),
    (0.2, m_version),
]


def b_truncate(rng, b: bytes, ints) -> tuple[bytes, str]:
    if rng.random() < 0.5 and ints:
        off = rng.choice(ints)[0] + rng.choice([0, 1, 3, 4, 7, 8])
    else:
        off = rng.randrange(len(b) + 1)
    return b[:off], f"truncate {off}/{len(b)}"


def b_bitflip(rng, b: bytes, ints) -> tuple[bytes, str]:
    x = bytearray(b)
    header_end = max((o + s for o, s, _ in ints), default=len(b))
    n = rng.choice([1, 1, 2, 4, 16])
    for _ in range(n):
        i = rng.randrange(header_end if rng.random() < 0.8 else len(x)) if x else 0
        if x:
            x[i] ^= 1 << rng.randrange(8)
    return bytes(x), f"bitflip x{n}"


def b_int_overwrite(rng, b: bytes, ints) -> tuple[bytes, str]:
    """A count, length, dimension, type id or offset of the header set to a huge or odd value."""
    if not ints:
        return b, "int: none"
    pref = [f for f in ints if f[2].endswith((".len", ".count", "_count", "n_dims", ".offset", ".type", ".subtype"))
            or ".ne[" in f[2]]
    off, size, label = rng.choice(pref if pref and rng.random() < 0.7 else ints)
    orig = int.from_bytes(b[off:off + size], "little")
    v = _edge_int(rng, T_U64 if size == 8 else T_U32 if size == 4 else T_U16 if size == 2 else T_U8, orig) % (1 << 8 * size)
    return b[:off] + v.to_bytes(size, "little") + b[off + size:], f"int {label}={v}"


def b_splice(rng, b: bytes, ints, other: bytes) -> tuple[bytes, str]:
    header_end = max((o + s for o, s, _ in ints), default=len(b))
    i = rng.randrange(max(1, header_end))
    n = rng.choice([1, 8, 64, 512])
    j = rng.randrange(max(1, len(other) - n))
    if rng.random() < 0.5:
        return b[:i] + other[j:j + n] + b[i + n:], f"splice-over {i}+{n}"
    return b[:i] + other[j:j + n] + b[i:], f"splice-insert {i}+{n}"


def b_delete(rng, b: bytes, ints) -> tuple[bytes, str]:
    header_end = max((o + s for o, s, _ in ints), default=len(b))
    i = rng.randrange(max(1, header_end))
    n = rng.choice([1, 4, 8, 100])
    return b[:i] + b[i + n:], f"delete {i}+{n}"


# ----------------------------------------------------------------------------------------------
# seeds and cases
# ----------------------------------------------------------------------------------------------

TINY_SEEDS = [  # (name, vocabulary, write_tiny_model kwargs)
    ("llama-Q8_0", "micro", dict(arch="llama", weight_type="Q8_0")),
    ("qwen2-Q4_0", "micro", dict(arch="qwen2", weight_type="Q4_0")),
    ("llama-Q4_1-untied", "micro", dict(arch="llama", weight_type="Q4_1", tie_embeddings=False)),
    ("qwen2-F16", "micro", dict(arch="qwen2", weight_type="F16")),
    ("llama-Q5_0", "micro", dict(arch="llama", weight_type="Q5_0")),   # converted to Q8_0 at load
    ("llama-F32-BF16embd", "micro", dict(arch="llama", weight_type="F32", embd_type="BF16")),
    ("llama-Q8_0-fullvocab", "full", dict(arch="llama", weight_type="Q8_0")),
    ("qwen2-Q4_0-fullvocab", "full", dict(arch="qwen2", weight_type="Q4_0")),
]


def micro_vocab(arch: str):
    """A 76-token byte-level BPE vocabulary (printable ASCII subset, five merges, the ChatML specials).

    gguf's reader costs ~10 us per array element, so the 380-token vocabulary of make_tiny's
    models makes a load ~3x slower than this one: most seeds use it, two keep the full one."""
    from make_tiny import SPECIAL_TOKENS, TinyVocab, bytes_to_unicode

    b2u = bytes_to_unicode()
    chars = [b2u[b] for b in b" abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?\n"]
    merges = [("t", "h"), ("h", "e"), ("\u0120", "t"), ("\u0120t", "h"), ("\u0120th", "e")]
    normal = list(dict.fromkeys(chars + [a + b for a, b in merges]))
    ms = tuple(f"{a} {b}" for a, b in merges)
    if arch == "qwen2":
        toks = tuple(normal) + SPECIAL_TOKENS
        eot = toks.index("<|endoftext|>")
        return TinyVocab(toks, (1,) * len(normal) + (3,) * 3, ms, "qwen2", eot, toks.index("<|im_end|>"), eot)
    return TinyVocab(SPECIAL_TOKENS + tuple(normal), (3,) * 3 + (1,) * len(normal), ms, "smollm", 1, 2, 2)


class Seeds:
    """The seed files (written once into a cache folder) and their parsed structure."""

    def __init__(self, cache: Path, real: Path | None):
        from make_tiny import make_vocab, write_tiny_model

        cache.mkdir(parents=True, exist_ok=True)
        self.names, self.bytes, self.docs = [], [], []
        for name, voc, kw in TINY_SEEDS:
            p = cache / f"{name}.gguf"
            if not p.exists():
                tmp = p.with_suffix(f".tmp{os.getpid()}")
                vocab = micro_vocab(kw["arch"]) if voc == "micro" else make_vocab(kw["arch"])
                write_tiny_model(tmp, vocab=vocab, **kw)
                os.replace(tmp, p)
            self._add(name, p.read_bytes())
        self.n_tiny = len(self.names)
        self.real_path = real
        if real is not None:
            self._add("real:" + real.name, None)

    def _add(self, name, b):
        self.names.append(name)
        self.bytes.append(b)
        self.docs.append(None if b is None else parse_gguf(b))

    def real_bytes(self) -> bytes:
        if self.bytes[-1] is None:
            self.bytes[-1] = self.real_path.read_bytes()
        return self.bytes[-1]


def _copy_doc(d: Doc) -> Doc:
    kvs = [KV(kv.key, kv.vtype, (kv.value[0], list(kv.value[1])) if kv.vtype == T_ARR else kv.value) for kv in d.kvs]
    ts = [TensorInfo(t.name, list(t.dims), t.ttype, t.offset) for t in d.tensors]
    return Doc(d.version, kvs, ts, d.data, d.header_ints)


def _header_ints(b: bytes, fallback: Doc) -> list:
    """Header integer locations of a mutated file (the seed's when it no longer parses)."""
    try:
        return parse_gguf(b).header_ints
    except Exception:  # noqa: BLE001 - any unparseable mutation
        return fallback.header_ints


def _write_kv_raw(d: Doc) -> bytes:
    """write_gguf, allowing invalid type ids (value written as nothing)."""
    ok = [kv for kv in d.kvs if kv.vtype in SCALAR or kv.vtype in (T_STR, T_ARR)]
    bad = [kv for kv in d.kvs if kv not in ok]
    if not bad:
        return write_gguf(d)
    d2 = Doc(d.version, ok, d.tensors, d.data)
    b = write_gguf(d2)
    # put the invalid-typed keys at the start of the KV section with kv_count fixed up
    extra = b"".join(struct.pack("<Q", len(kv.key)) + kv.key + struct.pack("<I", kv.vtype) for kv in bad)
    return struct.pack("<IIQQ", 0x46554747, d.version, len(d.tensors), len(d.kvs)) + extra + b[24:]


def make_case(seeds: Seeds, seed: int, case: int, real_every: int = 0) -> tuple[bytes, str, str]:
    """(file bytes, seed name, description of the mutations) of one case: deterministic."""
    rng = random.Random(f"edgekv-fuzz:{seed}:{case}")
    use_real = real_every and seeds.real_path is not None and case % real_every == real_every - 1
    if use_real:
        base = seeds.real_bytes()
        name = seeds.names[-1]
        # the real file: in-place header mutations and truncation only (no 100 MB rewrites per op)
        if seeds.docs[-1] is None:
            seeds.docs[-1] = _header_only_doc(base)
        ints = seeds.docs[-1].header_ints
        ops = [rng.choice([b_int_overwrite, b_bitflip, b_truncate, b_int_overwrite]) for _ in range(rng.randint(1, 2))]
        b, desc = base, []
        for op in ops:
            b, what = op(rng, b, ints)
            desc.append(what)
        return b, name, "; ".join(desc)
    i = rng.randrange(seeds.n_tiny)
    name, base, doc = seeds.names[i], seeds.bytes[i], seeds.docs[i]
    desc = []
    n_struct = rng.choice([0, 1, 1, 1, 2, 2, 3])
    n_bytes = rng.choice([0, 0, 1]) if n_struct else 1
    if n_struct:
        d = _copy_doc(doc)
        weights = [w for w, _ in STRUCTURAL]
        for fn in rng.choices([f for _, f in STRUCTURAL], weights=weights, k=n_struct):
            desc.append(fn(rng, d))
        b = _write_kv_raw(d)
        ints = _header_ints(b, doc) if n_bytes else []
    else:
        b, ints = base, doc.header_ints
    for _ in range(n_bytes):
        op = rng.choices([b_truncate, b_bitflip, b_int_overwrite, b_splice, b_delete], weights=[2, 3, 4, 1, 1])[0]
        if op is b_splice:
            b, what = op(rng, b, ints, seeds.bytes[rng.randrange(seeds.n_tiny)])
        else:
            b, what = op(rng, b, ints)
        desc.append(what)
    return b, name, "; ".join(desc)


def _header_only_doc(b: bytes) -> Doc:
    """Header integer locations of a big file without materializing its arrays (read lazily)."""
    buf = _Buf(b)
    buf.take("<I")
    ints = [(4, 4, "version"), (8, 8, "tensor_count"), (16, 8, "kv_count")]
    buf.take("<I")
    n_t, n_kv = buf.take("<Q"), buf.take("<Q")

    def skip(vt, label, keep):
        if vt == T_STR:
            if keep:
                ints.append((buf.o, 8, label + ".len"))
            buf.o += 8 + struct.unpack_from("<Q", buf.b, buf.o)[0]
        elif vt == T_ARR:
            ints.append((buf.o, 4, label + ".subtype"))
            ints.append((buf.o + 4, 8, label + ".count"))
            sub, n = struct.unpack_from("<IQ", buf.b, buf.o)
            buf.o += 12
            if sub in SCALAR:
                buf.o += n * struct.calcsize(SCALAR[sub])
            else:
                for i in range(n):
                    skip(sub, f"{label}[{i}]", i < 2)
        else:
            if vt in INT_TYPES:
                ints.append((buf.o, struct.calcsize(SCALAR[vt]), label))
            buf.o += struct.calcsize(SCALAR[vt])

    for _ in range(n_kv):
        ints.append((buf.o, 8, "key.len"))
        key = buf.string().decode()
        ints.append((buf.o, 4, key + ".type"))
        skip(buf.take("<I"), key, True)
    for _ in range(n_t):
        name = buf.string().decode()
        ints.append((buf.o, 4, name + ".n_dims"))
        nd = buf.take("<I")
        for i in range(nd):
            ints.append((buf.o, 8, f"{name}.ne[{i}]"))
            buf.o += 8
        ints.append((buf.o, 4, name + ".type"))
        ints.append((buf.o + 4, 8, name + ".offset"))
        buf.o += 12
    return Doc(0, [], [], b"", ints)


# ----------------------------------------------------------------------------------------------
# the oracle
# ----------------------------------------------------------------------------------------------

def run_case_file(path: str) -> tuple[str, str]:
    """Load one file with edgekv.Model and use it: (outcome, detail)."""
    import numpy as np

    import edgekv
    from edgekv.errors import EdgekvError

    stage = "load"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with edgekv.Model(path, threads=1, ctx=64) as m:
                stage = "logits"
                n = min(m.vocab_size, 5)
                m.logits(np.arange(n, dtype=np.int32))
                stage = "generate"
                m.generate("Hi there", max_tokens=3, temperature=0)
                stage = "sample"
                m.generate([0], max_tokens=2, temperature=0.8, seed=1)
        return "ok", ""
    except EdgekvError as e:
        return "rejected", f"{type(e).__name__}: {str(e)[:160]}"
    except ValueError as e:
        return "value-error", f"{stage}: {str(e)[:200]}"
    except Exception as e:  # noqa: BLE001 - this is what the fuzzer looks for
        tb = traceback.extract_tb(e.__traceback__)
        where = " <- ".join(f"{Path(f.filename).name}:{f.lineno}" for f in tb[::-1][:4])
        return "UNEXPECTED", f"{stage}: {type(e).__name__}: {str(e)[:200]} [{where}]"


FAILING = ("UNEXPECTED", "CRASH", "HANG")


def _scratch_dir() -> str | None:
    """Where case files go: /dev/shm (no disk traffic) when it has room for a real model per job
    (containers often give it only 64 MB), else the default temporary folder."""
    import shutil

    try:
        if os.path.isdir("/dev/shm") and shutil.disk_usage("/dev/shm").free >= 1 << 30:
            return "/dev/shm"
    except OSError:
        pass
    return None


def _limit_memory(gib: float) -> None:
    if gib <= 0:
        return
    try:
        import resource

        lim = int(gib * (1 << 30))
        resource.setrlimit(resource.RLIMIT_AS, (lim, lim))
    except (ImportError, ValueError, OSError):
        pass


def worker_main(args) -> int:
    """Run cases args.worker_cases (a list "a:b" range or comma list); one result line per case."""
    _limit_memory(args.mem_limit_gib)
    seeds = Seeds(args.cache, args.real)
    spec = args.worker_cases
    if ":" in spec:
        a, b = map(int, spec.split(":"))
        cases = range(a, b)
    else:
        cases = [int(x) for x in spec.split(",") if x]
    inject = {int(x) for x in os.environ.get("EDGEKV_FUZZ_INJECT_CRASH", "").split(",") if x}
    after = os.environ.get("EDGEKV_FUZZ_INJECT_CRASH_AFTER")  # "X:Y": crash at Y only if X ran before
    armed = False
    tmpdir = Path(args.tmpdir)
    out = sys.stdout
    for c in cases:
        try:
            data, name, desc = make_case(seeds, args.seed, c, args.real_every)
        except Exception as e:  # noqa: BLE001 - a bug of this harness: reported as a failing case
            out.write(f"S {c}\n" + "R " + json.dumps([c, "UNEXPECTED", "?", "make_case", f"harness: {e!r}", 0]) + "\n")
            out.flush()
            continue
        path = tmpdir / f"case-{os.getpid()}-{c}.gguf"
        path.write_bytes(data)
        out.write(f"S {c}\n")
        out.flush()
        if after:
            x, y = map(int, after.split(":"))
            armed |= c == x
            if c == y and armed:
                os.kill(os.getpid(), signal.SIGSEGV)
        if c in inject:
            os.kill(os.getpid(), signal.SIGSEGV)
        t0 = time.perf_counter()
        try:
            outcome, detail = run_case_file(str(path))
        finally:
            try:
                path.unlink()
            except OSError:
                pass
        ms = (time.perf_counter() - t0) * 1000
        out.write("R " + json.dumps([c, outcome, name, desc, detail, round(ms, 2)]) + "\n")
        out.flush()
    return 0


# ----------------------------------------------------------------------------------------------
# the parent: workers, crash detection, bisection
# ----------------------------------------------------------------------------------------------

@dataclass
class Batch:
    cases: list[int]
    proc: subprocess.Popen | None = None
    started: list[int] = field(default_factory=list)
    buf: bytes = b""
    last_progress: float = 0.0
    done: int = 0


class Parent:
    def __init__(self, args):
        self.args = args
        self.counts: dict[str, int] = {}
        self.failures: list[dict] = []
        self.by_seed: dict[str, int] = {}
        self.details: dict[str, dict[str, int]] = {"rejected": {}, "value-error": {}}
        self.examples: dict[str, list[int]] = {}  # a few case numbers for each kind of rejection
        self.ms_total = 0.0
        self.n_results = 0
        self.tmpdir = tempfile.mkdtemp(prefix="edgekv-fuzz-", dir=_scratch_dir())

    def worker_cmd(self, cases: str) -> list[str]:
        a = self.args
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", cases, "--seed", str(a.seed),
               "--cache", str(a.cache), "--tmpdir", self.tmpdir, "--real-every", str(a.real_every),
               "--mem-limit-gib", str(a.mem_limit_gib)]
        if a.real:
            cmd += ["--real", str(a.real)]
        return cmd

    def start(self, batch: Batch) -> None:
        spec = ",".join(map(str, batch.cases))
        batch.proc = subprocess.Popen(self.worker_cmd(spec), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      env=os.environ.copy())
        os.set_blocking(batch.proc.stdout.fileno(), False)
        batch.last_progress = time.monotonic()

    def record(self, res: list) -> None:
        c, outcome, name, desc, detail, ms = res
        self.counts[outcome] = self.counts.get(outcome, 0) + 1
        self.by_seed[name] = self.by_seed.get(name, 0) + 1
        self.ms_total += ms
        self.n_results += 1
        if outcome in self.details:
            key = detail.split(":")[0] if outcome == "rejected" else detail[:90]
            d = self.details[outcome]
            d[key] = d.get(key, 0) + 1
            ex = self.examples.setdefault(key, [])
            if len(ex) < 3:
                ex.append(c)
        if outcome in FAILING:
            self.failures.append({"case": c, "outcome": outcome, "seed_file": name, "mutations": desc,
                                  "detail": detail})
            print(f"FAIL case {c} ({name}; {desc}): {outcome} {detail}", flush=True)

    def pump(self, batch: Batch) -> bool:
        """Read what the worker wrote; False once it has exited (everything read)."""
        try:
            chunk = os.read(batch.proc.stdout.fileno(), 1 << 16)
        except BlockingIOError:
            chunk = None
        if chunk:
            batch.buf += chunk
            batch.last_progress = time.monotonic()
            *lines, batch.buf = batch.buf.split(b"\n")
            for ln in lines:
                if ln.startswith(b"S "):
                    batch.started.append(int(ln[2:]))
                elif ln.startswith(b"R "):
                    self.record(json.loads(ln[2:]))
                    batch.done += 1
            return True
        if chunk == b"":  # EOF
            batch.proc.wait()
            return False
        return True

    def crashes_alone(self, cases: list[int]) -> tuple[bool, int, str]:
        """Run cases in one fresh worker: (died by a signal or abort, return code, stderr tail)."""
        p = subprocess.run(self.worker_cmd(",".join(map(str, cases))), capture_output=True,
                           timeout=max(60, 5 * len(cases)))
        return p.returncode != 0, p.returncode, _s(p.stderr)[-3000:]

    def bisect(self, history: list[int], crash: int) -> dict:
        """The shortest run of cases ending in `crash` (taken from the worker's history) that crashes."""
        alone, rc, err = self.crashes_alone([crash])
        if alone:
            return {"reproducer": [crash], "returncode": rc, "stderr": err}
        prior = [c for c in history if c != crash]
        ok, rc, err = self.crashes_alone(prior + [crash])
        if not ok:
            return {"reproducer": None, "note": "did not reproduce in a fresh worker (flaky or resource-dependent)"}
        lo, hi = 0, len(prior)  # prior[lo:] + [crash] crashes; find the largest such lo
        while hi - lo > 1:
            mid = (lo + hi) // 2
            ok_mid, rc_m, err_m = self.crashes_alone(prior[mid:] + [crash])
            if ok_mid:
                lo, rc, err = mid, rc_m, err_m
            else:
                hi = mid
        # then drop cases from the front window one by one where possible (cheap: windows are short)
        window = prior[lo:]
        if len(window) > 64:  # too long to minimize one by one: report the window as it is
            return {"reproducer": window + [crash], "returncode": rc, "stderr": err}
        needed = []
        for i, c in enumerate(window):
            rest = needed + window[i + 1:]
            ok_r, rc_r, err_r = self.crashes_alone(rest + [crash])
            if ok_r:
                rc, err = rc_r, err_r
            else:
                needed.append(c)
        return {"reproducer": needed + [crash], "returncode": rc, "stderr": err}

    def handle_death(self, batch: Batch, outcome: str) -> list[int]:
        """The worker died (or hung): record the case it was on, bisect, return the cases left to run."""
        rc = batch.proc.returncode
        stderr = batch.proc.stderr.read().decode(errors="replace") if batch.proc.stderr else ""
        crash = batch.started[-1] if batch.started else batch.cases[0]
        history = batch.started[:-1]
        seeds = Seeds(self.args.cache, self.args.real)
        data, name, desc = make_case(seeds, self.args.seed, crash, self.args.real_every)
        info = {"case": crash, "outcome": outcome, "seed_file": name, "mutations": desc, "returncode": rc,
                "stderr": stderr[-3000:]}
        if outcome == "CRASH":
            info.update(self.bisect(history, crash))
        self.counts[outcome] = self.counts.get(outcome, 0) + 1
        self.failures.append(info)
        save = Path(self.args.artifacts)
        save.mkdir(parents=True, exist_ok=True)
        (save / f"case-{crash}.gguf").write_bytes(data)
        print(f"FAIL case {crash} ({name}; {desc}): {outcome} (rc {rc}); saved {save / f'case-{crash}.gguf'}; "
              f"reproducer: {info.get('reproducer')}\n{stderr[-1500:]}", flush=True)
        idx = batch.cases.index(crash)
        return batch.cases[idx + 1:]

    def run(self) -> int:
        a = self.args
        all_cases = list(range(a.start, a.start + a.cases))
        chunks = [all_cases[i:i + a.batch] for i in range(0, len(all_cases), a.batch)]
        pending = [Batch(c) for c in chunks]
        running: list[Batch] = []
        t0 = time.monotonic()
        deadline = t0 + a.max_time if a.max_time else None
        last_report = t0
        while pending or running:
            while pending and len(running) < a.jobs and not (deadline and time.monotonic() > deadline):
                b = pending.pop(0)
                self.start(b)
                running.append(b)
            if not running:
                break
            fds = [b.proc.stdout.fileno() for b in running]
            select.select(fds, [], [], 0.5)
            for b in list(running):
                alive = self.pump(b)
                if alive and time.monotonic() - b.last_progress > a.case_timeout:
                    b.proc.kill()
                    b.proc.wait()
                    running.remove(b)
                    rest = self.handle_death(b, "HANG")
                    if rest:
                        pending.insert(0, Batch(rest))
                    continue
                if not alive:
                    running.remove(b)
                    finished = len(b.started) == b.done and b.done == len(b.cases)
                    if b.proc.returncode != 0 or not finished:
                        rest = self.handle_death(b, "CRASH")
                        if rest:
                            pending.insert(0, Batch(rest))
            if time.monotonic() - last_report > 15:
                last_report = time.monotonic()
                n = sum(self.counts.values())
                print(f"  ... {n} cases, {n / (last_report - t0):.0f}/s", flush=True)
        wall = time.monotonic() - t0
        return self.report(wall)

    def report(self, wall: float) -> int:
        n = sum(self.counts.values())
        failed = sum(self.counts.get(k, 0) for k in FAILING)
        summary = {
            "cases": n, "wall_s": round(wall, 1), "rate_per_s": round(n / wall, 1) if wall else 0,
            "mean_case_ms": round(self.ms_total / max(1, self.n_results), 2), "jobs": self.args.jobs,
            "outcomes": self.counts, "seed_files": self.by_seed,
            "top_rejections": dict(sorted(self.details["rejected"].items(), key=lambda kv: -kv[1])[:12]),
            "value_errors": dict(sorted(self.details["value-error"].items(), key=lambda kv: -kv[1])[:12]),
            "failures": self.failures[:50],
        }
        if self.args.json:
            Path(self.args.json).write_text(json.dumps(summary, indent=1))
        print(f"fuzz: {n} cases in {wall:.1f} s ({summary['rate_per_s']}/s on {self.args.jobs} jobs; "
              f"{summary['mean_case_ms']} ms per case in a worker)")
        print("fuzz outcomes: " + ", ".join(f"{k} {v}" for k, v in sorted(self.counts.items())))
        print("fuzz seed files: " + ", ".join(f"{k} {v}" for k, v in sorted(self.by_seed.items())))
        if self.details["value-error"]:
            print("fuzz ValueErrors (accepted): " + "; ".join(
                f"{v}x {k} (e.g. cases {self.examples.get(k)})" for k, v in summary["value_errors"].items()))
        if n < self.args.cases:
            print(f"fuzz: stopped after {n} of {self.args.cases} cases (--max-time)")
        import shutil

        shutil.rmtree(self.tmpdir, ignore_errors=True)  # files of cases whose worker died are left there
        print(f"{n - failed} passed, {failed} failed")
        return 1 if failed else 0


# ----------------------------------------------------------------------------------------------
# atheris (coverage-guided) engine
# ----------------------------------------------------------------------------------------------

def atheris_main(args) -> int:
    try:
        import atheris
    except ImportError:
        print("fuzz: atheris is not installed (pip install atheris); use the batch engine")
        return 2
    _limit_memory(args.mem_limit_gib)
    seeds = Seeds(args.cache, None)
    with atheris.instrument_imports():
        import gguf  # noqa: F401

        import edgekv  # noqa: F401
        import edgekv.gguf_loader  # noqa: F401
    import shutil

    # one fixed work folder, emptied at each start (libFuzzer ends the process without cleanup)
    tmp = Path(_scratch_dir() or tempfile.gettempdir()) / f"edgekv-atheris-{os.getuid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    path = tmp / "input.gguf"

    def test_one(data: bytes) -> None:
        path.write_bytes(data)
        outcome, detail = run_case_file(str(path))
        if outcome == "UNEXPECTED":
            raise RuntimeError(detail)

    def mutator(data: bytes, max_size: int, seed: int) -> bytes:
        rng = random.Random(seed)
        try:
            doc = parse_gguf(data)
        except Exception:  # noqa: BLE001 - not parseable any more: byte-level mutation
            return atheris.Mutate(data, max_size)
        if rng.random() < 0.25:
            return atheris.Mutate(data, max_size)
        try:
            d = _copy_doc(doc)
            for fn in rng.choices([f for _, f in STRUCTURAL], weights=[w for w, _ in STRUCTURAL],
                                  k=rng.randint(1, 2)):
                fn(rng, d)
            b = _write_kv_raw(d)
        except Exception:  # noqa: BLE001 - libFuzzer's byte mutations can leave values no writer takes
            return atheris.Mutate(data, max_size)
        if rng.random() < 0.3:
            b, _ = rng.choice([b_truncate, b_bitflip, b_int_overwrite])(rng, b, _header_ints(b, doc))
        return b[:max_size]

    corpus = tmp / "corpus"
    corpus.mkdir()
    for n, b in zip(seeds.names, seeds.bytes):
        (corpus / n).write_bytes(b)
    argv = [sys.argv[0], str(corpus), f"-max_len={max(len(b) for b in seeds.bytes) * 2}",
            f"-max_total_time={args.time}", f"-seed={args.seed}", f"-artifact_prefix={args.artifacts}/",
            "-rss_limit_mb=4096", "-timeout=30"]
    Path(args.artifacts).mkdir(parents=True, exist_ok=True)
    atheris.Setup(argv, test_one, custom_mutator=mutator)
    atheris.Fuzz()
    return 0


# ----------------------------------------------------------------------------------------------

def default_real() -> Path | None:
    """The real SmolLM2 GGUF if it is in edgekv's cache (never downloaded here)."""
    try:
        import edgekv

        p = Path(edgekv.registry.resolve("smollm2-135m", progress=False))
        return p if p.is_file() else None
    except Exception:  # noqa: BLE001 - not cached, no network: fuzz the tiny models only
        return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=2000)
    ap.add_argument("--start", type=int, default=0, help="first case number")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--jobs", type=int, default=max(1, min(os.cpu_count() or 1, 4)))
    ap.add_argument("--batch", type=int, default=1000, help="cases per worker process")
    ap.add_argument("--case-timeout", type=float, default=60.0)
    ap.add_argument("--max-time", type=float, default=0, help="stop starting new batches after this many seconds")
    ap.add_argument("--real", type=Path, default=None, help="a real GGUF to mutate too (default: cached SmolLM2)")
    ap.add_argument("--no-real", action="store_true")
    ap.add_argument("--real-every", type=int, default=2500, help="every Nth case mutates the real file (0: never)")
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "edgekv-fuzz-seeds")
    ap.add_argument("--artifacts", default="fuzz-artifacts", help="where failing inputs are saved")
    ap.add_argument("--mem-limit-gib", type=float, default=4.0, help="address-space limit of a worker (0: none)")
    ap.add_argument("--json", help="write the summary here")
    ap.add_argument("--engine", choices=["batch", "atheris"], default="batch")
    ap.add_argument("--time", type=int, default=60, help="atheris: seconds to run")
    ap.add_argument("--replay", type=int, help="run one case in this process and print its outcome")
    ap.add_argument("--save", type=Path, help="with --replay: write the case's file here")
    ap.add_argument("--worker", dest="worker_cases", help=argparse.SUPPRESS)
    ap.add_argument("--tmpdir", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.no_real:
        args.real = None
    elif args.real is None and not args.worker_cases:
        args.real = default_real()
    if args.worker_cases:
        return worker_main(args)
    if args.engine == "atheris":
        return atheris_main(args)
    if args.replay is not None:
        seeds = Seeds(args.cache, args.real)
        data, name, desc = make_case(seeds, args.seed, args.replay, args.real_every)
        with tempfile.TemporaryDirectory() as td:
            p = args.save or Path(td) / "case.gguf"
            p.write_bytes(data)
            outcome, detail = run_case_file(str(p))
        print(f"case {args.replay}: seed file {name}; mutations: {desc}\n{outcome} {detail}")
        return 1 if outcome in FAILING else 0
    Seeds(args.cache, args.real)  # write the seed files once, before the workers start
    print(f"fuzz: {args.cases} cases from case {args.start}, seed {args.seed}, {args.jobs} jobs; seed files: "
          f"{len(TINY_SEEDS)} tiny" + (f" + real {args.real.name} every {args.real_every}th case" if args.real and
                                       args.real_every else ""), flush=True)
    return Parent(args).run()


if __name__ == "__main__":
    sys.exit(main())
