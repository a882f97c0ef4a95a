"""Weights converted once: the bytes the C core reads, kept in a memory-mappable file per GGUF.

A load converts K-quants and Q5_0 (csrc/weight_convert.c) and interleaves matrices for the x8
kernels (csrc/quant_x8.c). Both are functions of the GGUF's bytes, of edgekv's weight format and
of the kernels this build has, so the first load writes their result to

    <dir>/<GGUF sha256>-w<FORMAT_VERSION>-<SIMD variant>-<layout fingerprint>.ekw

(a temporary file, then a rename) and later loads map that file read-only: the C core borrows
every tensor from the map (EK_TYPE_PACKED_X8 for interleaved matrices), nothing is converted or
copied, and pages are read from disk only when the forward pass touches them.

<dir> is $EDGEKV_WEIGHT_CACHE, else ``weights`` under the models cache (registry.cache_dir()),
which caches models of at least MIN_DEFAULT_BYTES (a tiny model converts in milliseconds; its
cached copy would only fill the disk). EDGEKV_WEIGHT_CACHE=off loads without the cache. A file
that fails the checks on open (magic, version, key, size, layout) is rebuilt with a warning; a
directory that cannot be written loads without the cache and says so.

File layout: MAGIC, u32 format version, u32 header length, u64 file size, the header (JSON: key
and one record per tensor), zeros up to DATA_ALIGN; the tensors, each at a 64-byte aligned offset
from there; END_MAGIC last (a file cut short fails the size check before it is read).
"""

from __future__ import annotations

import hashlib
import json
import logging
import mmap
import os
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from . import _native

log = logging.getLogger("edgekv")

L = _native.lib
ffi = _native.ffi

FORMAT_VERSION = 1  # bump when a conversion or a packed layout changes
MAGIC = b"EKWCACHE"
END_MAGIC = b"EKWC-END"
PREFIX = struct.Struct("<8sIIQ")  # magic, version, header length, file size
DATA_ALIGN = 4096
TENSOR_ALIGN = 64  # what the x8 kernels need of a borrowed packed matrix
MIN_DEFAULT_BYTES = 32 << 20
OFF = ("0", "off", "no", "false", "")

# what tests read to see whether a load converted or mapped (no timing involved)
stats = {"built": 0, "mapped": 0}


class CacheInvalid(Exception):
    """The cache file exists but cannot be used (the reason is the message)."""


def directory(model_bytes: int) -> Path | None:
    """Where this model's cache file goes, or None for no cache."""
    env = os.environ.get("EDGEKV_WEIGHT_CACHE")
    if env is not None:
        return None if env.strip().lower() in OFF else Path(env).expanduser()
    if model_bytes < MIN_DEFAULT_BYTES:
        return None
    from .registry import cache_dir

    return cache_dir() / "weights"


def simd() -> str:
    """The SIMD variant this build's kernels use (which matrices it interleaves depends on it)."""
    return ffi.string(L.ek_simd()).decode()


def file_name(sha: str) -> str:
    """The cache file of a GGUF for this build: builds that lay weights out differently keep apart."""
    return f"{sha}-w{FORMAT_VERSION}-{simd()}-{layout_fingerprint()}.ekw"


_fingerprint: str | None = None


def layout_fingerprint() -> str:
    """A hash of what this build's conversions and interleavings make of fixed bytes: part of the key,
    so a cache file written by a build that lays weights out differently is never borrowed (even if
    FORMAT_VERSION was not bumped with the change)."""
    global _fingerprint
    if _fingerprint is None:
        h = hashlib.sha256()
        src = np.frombuffer(hashlib.shake_256(b"edgekv weight layout").digest(8 * 256 * 2), np.uint8).copy()
        for ggml, n_in, n_rows, nbytes in ((12, 256, 8, 144), (6, 256, 8, 22 * 8), (14, 256, 8, 210)):
            dst_type = L.ek_convert_target(ggml, n_in)
            out = np.zeros(L.ek_type_row_bytes(dst_type, n_in) * n_rows, np.uint8)
            a = src[: nbytes * n_rows]
            h.update(bytes([L.ek_convert_weights(ggml, ffi.from_buffer(a), a.nbytes, n_in, n_rows,
                                                 ffi.from_buffer(out), out.nbytes) & 255]) + out.tobytes())
        for t in (2, 3, 8):  # Q4_0, Q4_1, Q8_0
            n = L.ek_type_row_bytes(t, 256) * 8
            a, out = src[:n], np.zeros(n, np.uint8)
            h.update(bytes([L.ek_pack_weights(t, ffi.from_buffer(a), n, 256, 8, ffi.from_buffer(out), n) & 255])
                     + out.tobytes())
        _fingerprint = h.hexdigest()[:16]
    return _fingerprint


def gguf_sha256(path: Path, memo_dir: Path | None) -> str:
    """The GGUF's sha256: from the registry's verification marker when it matches the file's size
    and mtime, else from a memo of ours (same check), else hashed now (once per file version)."""
    st = path.stat()
    memo = memo_dir / "sha256" / (hashlib.sha1(str(path.resolve()).encode()).hexdigest() + ".json") if memo_dir else None
    for marker in (path.with_name(path.name + ".sha256-ok"), memo):
        try:
            doc = json.loads(marker.read_text(encoding="utf-8")) if marker else None
        except (OSError, ValueError):
            continue
        if isinstance(doc, dict) and doc.get("size") == st.st_size and doc.get("mtime_ns") == st.st_mtime_ns \
                and isinstance(doc.get("sha256"), str) and len(doc["sha256"]) == 64:
            return doc["sha256"]
    from .registry import sha256_file

    sha = sha256_file(path, progress=_tty(), desc=f"sha256 {path.name}")
    if memo is not None:
        try:
            memo.parent.mkdir(parents=True, exist_ok=True)
            _write_atomic(memo, json.dumps({"sha256": sha, "size": st.st_size, "mtime_ns": st.st_mtime_ns}).encode())
        except OSError:
            pass  # only costs hashing again next time
    return sha


def _tty() -> bool:
    return sys.stderr is not None and hasattr(sys.stderr, "isatty") and sys.stderr.isatty()


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _record(w) -> dict[str, Any]:
    return {"name": w.name, "kind": int(w.kind), "layer": int(w.layer), "type": int(w.type), "n_in": int(w.n_in),
            "n_out": int(w.n_out)}


def nbytes(w) -> int:
    """Bytes of a tensor as the C core reads it (before any packing: the same count)."""
    if w.array is not None:
        return int(w.array.nbytes)
    return int(L.ek_type_row_bytes(w.type, w.n_in)) * int(w.n_out)


def open_file(path: Path, key: dict[str, Any], weights: list, sizes: list[int]) -> tuple[mmap.mmap, list[dict[str, Any]]]:
    """Map a cache file and check it against the key and the loader's tensors (sizes: their bytes);
    CacheInvalid if it cannot be used."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < PREFIX.size + len(END_MAGIC):
                raise CacheInvalid(f"{size} bytes is too short")
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as e:
        raise CacheInvalid(f"cannot read it ({e})") from None
    try:
        magic, version, hlen, total = PREFIX.unpack_from(mm, 0)
        if magic != MAGIC:
            raise CacheInvalid("not an edgekv weight cache file (bad magic)")
        if version != FORMAT_VERSION:
            raise CacheInvalid(f"format version {version}, this edgekv writes {FORMAT_VERSION}")
        if total != size:
            raise CacheInvalid(f"{size} bytes on disk, the header says {total} (truncated?)")
        if mm[size - len(END_MAGIC):] != END_MAGIC:
            raise CacheInvalid("the end marker is missing")
        if PREFIX.size + hlen > size:
            raise CacheInvalid("the header runs past the end of the file")
        try:
            head = json.loads(bytes(mm[PREFIX.size:PREFIX.size + hlen]))
        except ValueError as e:
            raise CacheInvalid(f"the header is not valid JSON ({e})") from None
        if not isinstance(head, dict) or head.get("key") != key:
            raise CacheInvalid("its key (GGUF sha256, weight format, SIMD variant, layout) does not match")
        recs, start = head.get("tensors"), head.get("data_start")
        if not isinstance(recs, list) or len(recs) != len(weights) or not isinstance(start, int):
            raise CacheInvalid("its tensor list does not match the GGUF's")
        for r, w, nbytes in zip(recs, weights, sizes):
            want = _record(w)
            if not isinstance(r, dict) or any(r.get(k) != v for k, v in want.items() if k != "type") \
                    or r.get("type") & ~L.EK_TYPE_PACKED_X8 != want["type"]:
                raise CacheInvalid(f"tensor {w.name!r} does not match the GGUF's")
            off, n = r.get("offset"), r.get("nbytes")
            if not (isinstance(off, int) and isinstance(n, int) and off % TENSOR_ALIGN == 0 and off >= 0
                    and n == nbytes and start + off + n <= size - len(END_MAGIC)):
                raise CacheInvalid(f"tensor {w.name!r} lies outside the file")
        return mm, [dict(r, offset=start + r["offset"]) for r in recs]
    except (CacheInvalid, struct.error, TypeError):
        mm.close()
        raise


def build_file(path: Path, key: dict[str, Any], weights: list, sizes: list[int], pack_kinds: set[int],
               progress: bool | None) -> None:
    """Convert and interleave every tensor into a new cache file at path (temporary file + rename).
    The weights' arrays are consumed (emptied) as they are written."""
    from tqdm import tqdm

    from .gguf_loader import _drop_file_pages

    for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a build that was killed
        try:
            if stale.stat().st_mtime < time.time() - 3600:
                stale.unlink()
        except OSError:
            pass
    recs, off = [], 0
    for w, n in zip(weights, sizes):
        recs.append(dict(_record(w), offset=off, nbytes=n))
        off = -(-(off + n) // TENSOR_ALIGN) * TENSOR_ALIGN
    head = {"key": key, "data_start": 0, "tensors": recs}
    hlen = len(json.dumps(head)) + 4 * len(recs) + 32  # room for data_start's digits and the packed flags
    start = -(-(PREFIX.size + hlen) // DATA_ALIGN) * DATA_ALIGN
    total = start + off + len(END_MAGIC)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "r+b") as f:
            os.fchmod(f.fileno(), 0o644)  # mkstemp's 0600 would hide it from other users of a shared cache
            f.truncate(total)
            mm = mmap.mmap(f.fileno(), total)
            try:
                bar = tqdm(total=sum(r["nbytes"] for r in recs), desc=f"converting {path.name[:12]}.. once",
                           unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr,
                           disable=(not _tty()) if progress is None else not progress, leave=True)
                with bar:
                    for w, r in zip(weights, recs):
                        src = w.materialize()
                        dst = np.frombuffer(mm, np.uint8, count=r["nbytes"], offset=start + r["offset"])
                        packed = 0
                        if w.kind in pack_kinds:
                            packed = L.ek_pack_weights(w.type, ffi.from_buffer(src), src.nbytes, w.n_in, w.n_out,
                                                       ffi.from_buffer(dst), dst.nbytes)
                            if packed < 0:
                                raise CacheInvalid(f"tensor {w.name!r}: cannot pack type {w.type}")
                        if not packed:
                            dst[:] = src.reshape(-1).view(np.uint8)
                        if packed:
                            r["type"] = w.type | L.EK_TYPE_PACKED_X8
                        _drop_file_pages(src)  # read once: the file's pages go (a converted array is freed below)
                        w.array, w.source = np.empty(0, np.uint8), None
                        del dst
                        bar.update(r["nbytes"])
                head["data_start"] = start
                blob = json.dumps(head).encode()
                assert PREFIX.size + len(blob) <= start
                mm[:PREFIX.size] = PREFIX.pack(MAGIC, FORMAT_VERSION, len(blob), total)
                mm[PREFIX.size:PREFIX.size + len(blob)] = blob
                mm[total - len(END_MAGIC):] = END_MAGIC
                mm.flush()
            finally:
                mm.close()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
