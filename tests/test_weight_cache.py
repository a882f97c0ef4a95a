"""The weight cache (python/edgekv/weight_cache.py): weights converted once, then mapped.

Tiny random GGUFs of every weight type the loader takes (models/make_tiny.py; K-quant files are
written from random blocks with small scales, as gguf-py has no K-quant quantizer). Each test
points EDGEKV_WEIGHT_CACHE at its own temporary directory."""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

import edgekv
from edgekv import gguf_loader, weight_cache
from edgekv._native import ffi, lib

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
import make_tiny  # noqa: E402

# bytes per 256-value block and the offsets of their fp16 scale fields (d, then dmin if any)
K_BLOCKS = {"Q4_K": (144, (0, 2)), "Q5_K": (176, (0, 2)), "Q6_K": (210, (208,))}
TYPES = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "F16", "BF16", "Q4_K", "Q5_K", "Q6_K"]
F32, Q8_0 = 0, 8  # GGML type ids, as the C core takes them
TEXT = "Hi there, how are you today? def f(x): return x"


def _encode_k(a: np.ndarray, weight_type: str, seed: int):
    """Random K-quant blocks for an (n_out, n_in) matrix: codes and sub-scales uniform, the fp16
    super-block scales small enough that weights stay of order 0.1."""
    from gguf import GGMLQuantizationType

    size, scale_at = K_BLOCKS[weight_type]
    n_out, n_in = a.shape
    rng = np.random.default_rng(seed + n_in * 7 + n_out)
    blocks = rng.integers(0, 256, size=(n_out * n_in // 256, size), dtype=np.uint8)
    for off in scale_at:
        d = rng.uniform(2e-4, 1e-3, size=len(blocks)).astype(np.float16)
        blocks[:, off:off + 2] = d.view(np.uint8).reshape(-1, 2)
    return blocks.reshape(n_out, -1), GGMLQuantizationType[weight_type]


def write_model(path: Path, weight_type: str, tied: bool = True, seed: int = 0, n_merges: int | None = None) -> Path:
    """A tiny model (2 layers, 256 wide so that K-quant rows are whole blocks) of one weight type.
    Tied: 376 tokens, so the output (the embedding) has whole groups of 8 rows and is interleaved;
    untied: 379 tokens, so the output runs as rows."""
    vocab = make_tiny.make_vocab("llama", n_merges=n_merges or (117 if tied else 120))
    kw = dict(n_embd=256, n_head=8, n_head_kv=2, n_ff=256, tie_embeddings=tied, seed=seed, vocab=vocab)
    if weight_type not in K_BLOCKS:
        return make_tiny.write_tiny_model(path, weight_type=weight_type, **kw)
    # make_tiny writes K-quant blocks where it would write Q8_0 (file_type metadata says Q8_0)
    orig_encode = make_tiny._encode_weight
    make_tiny._encode_weight = lambda a, t: _encode_k(a, weight_type, seed) if t == "Q8_0" else orig_encode(a, t)
    try:
        return make_tiny.write_tiny_model(path, weight_type="Q8_0", **kw)
    finally:
        make_tiny._encode_weight = orig_encode


def load(path, monkeypatch, cache) -> tuple[edgekv.Model, np.ndarray, int]:
    """(model, logits of TEXT, conversions this load ran), with EDGEKV_WEIGHT_CACHE = cache."""
    monkeypatch.setenv("EDGEKV_WEIGHT_CACHE", str(cache))
    before = gguf_loader.stats["converted"]
    m = edgekv.Model(path, threads=1, ctx=64)
    return m, m.logits(m.tokenize(TEXT)).copy(), gguf_loader.stats["converted"] - before


def cache_files(d: Path) -> list[Path]:
    return sorted(d.glob("*.ekw")) if d.is_dir() else []


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("weight_type", TYPES)
def test_second_load_maps_the_cache_converting_nothing(tmp_path, monkeypatch, weight_type, tied):
    """First load with a cache converts and writes one file; the second maps it: no conversion
    runs, every matrix the build interleaves is borrowed interleaved (EK_TYPE_PACKED_X8) from the
    map and not released, and the logits equal, bit for bit, both the first load's and those of
    a load without the cache (the converted bytes are the same bytes)."""
    path = write_model(tmp_path / f"{weight_type}.gguf", weight_type, tied)
    cache = tmp_path / "cache"
    m0, ref, _ = load(path, monkeypatch, "off")
    m0.close()
    assert cache_files(cache) == []
    m1, first, conv1 = load(path, monkeypatch, cache)
    assert m1._gguf.weight_cache_built and m1._gguf.weight_cache in cache_files(cache)
    if weight_type not in ("Q8_0", "Q4_0", "Q4_1", "F16"):  # the others are converted (F16 matrices run natively)
        assert conv1 > 0
    m1.close()
    m2, second, conv2 = load(path, monkeypatch, cache)
    assert conv2 == 0 and not m2._gguf.weight_cache_built and m2._gguf.weight_cache == cache_files(cache)[0]
    assert len(cache_files(cache)) == 1
    packed = [w for w in m2._gguf.weights if w.type & lib.EK_TYPE_PACKED_X8]
    runs_as = {w.type & ~lib.EK_TYPE_PACKED_X8 for w in m2._gguf.weights if w.kind == lib.EK_T_FFN_UP}
    if all(_build_packs(t) for t in runs_as):  # every layer matrix, and the output (the tied embedding)
        out = lib.EK_T_TOK_EMBD if tied else lib.EK_T_OUTPUT  # interleaved when its rows come in 8s
        assert {w.kind for w in packed} - set(gguf_loader._MATRIX_KINDS) <= {out}
        assert len(packed) == 7 * m2.hparams["n_layer"] + (m2.hparams["n_vocab"] % 8 == 0)
    else:
        assert packed == []
    for w in m2._gguf.weights:
        assert not lib.ek_model_tensor_released(m2._handle, w.kind, w.layer)
        assert isinstance(_root(w.array), __import__("mmap").mmap), w.name
    m2.close()
    np.testing.assert_array_equal(first, ref)
    np.testing.assert_array_equal(second, ref)
    assert np.isfinite(ref).all() and ref.std() > 0


def _build_packs(ek_type: int) -> bool:
    """Whether this build interleaves matrices of this type (it has an x8 kernel for it)."""
    n = lib.ek_type_row_bytes(ek_type, 32) * 8
    if n == 0:
        return False
    src, dst = np.zeros(n, np.uint8), np.zeros(n, np.uint8)
    return lib.ek_pack_weights(ek_type, ffi.from_buffer(src), n, 32, 8, ffi.from_buffer(dst), n) == 1


def _root(a):
    while isinstance(a, np.ndarray):
        a = a.base
    return a.obj if isinstance(a, memoryview) else a


@pytest.mark.parametrize("damage", ["truncate", "magic", "header", "empty", "version"])
def test_damaged_cache_file_is_rebuilt_with_a_warning(tmp_path, monkeypatch, damage):
    """A cache file cut short, with a wrong magic, a garbled header, no bytes, or another format
    version is not used: the load warns that it is rebuilding it, converts again, computes the
    same logits, and leaves a good file (the next load maps it silently)."""
    path = write_model(tmp_path / "m.gguf", "Q5_0")
    cache = tmp_path / "cache"
    m, ref, _ = load(path, monkeypatch, cache)
    m.close()
    (f,) = cache_files(cache)
    raw = bytearray(f.read_bytes())
    if damage == "truncate":
        raw = raw[: len(raw) // 2]
    elif damage == "magic":
        raw[:8] = b"NOTACACH"
    elif damage == "header":
        raw[weight_cache.PREFIX.size:weight_cache.PREFIX.size + 16] = b"\xff" * 16
    elif damage == "empty":
        raw = bytearray()
    else:
        raw[8:12] = (weight_cache.FORMAT_VERSION + 1).to_bytes(4, "little")
    f.write_bytes(bytes(raw))
    with pytest.warns(UserWarning, match="unusable .* rebuilding it"):
        m, got, conv = load(path, monkeypatch, cache)
    assert m._gguf.weight_cache_built and conv > 0
    m.close()
    np.testing.assert_array_equal(got, ref)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m, again, conv = load(path, monkeypatch, cache)
    assert conv == 0 and not m._gguf.weight_cache_built
    m.close()
    np.testing.assert_array_equal(again, ref)


def test_changed_gguf_gets_its_own_entry(tmp_path, monkeypatch):
    """The key is the GGUF's sha256: a file rewritten in place with other weights (same size, new
    mtime) gets a new cache file and its own logits, never the old file's weights."""
    path = tmp_path / "m.gguf"
    cache = tmp_path / "cache"
    write_model(path, "Q4_K", seed=1)
    m, a, _ = load(path, monkeypatch, cache)
    m.close()
    size, sha_a = path.stat().st_size, weight_cache.gguf_sha256(path, None)
    write_model(path, "Q4_K", seed=2)
    assert path.stat().st_size == size
    sha_b = weight_cache.gguf_sha256(path, None)
    assert sha_b != sha_a
    m, b, conv = load(path, monkeypatch, cache)
    assert m._gguf.weight_cache_built and conv > 0
    m.close()
    monkeypatch.setenv("EDGEKV_WEIGHT_CACHE", "off")
    with edgekv.Model(path, threads=1, ctx=64) as m:
        ref = m.logits(m.tokenize(TEXT))
    np.testing.assert_array_equal(b, ref)
    assert not np.array_equal(a, b)
    assert {f.name[:64] for f in cache_files(cache)} == {sha_a, sha_b}


def test_unwritable_cache_dir_loads_without_the_cache(tmp_path, monkeypatch):
    """A cache directory that cannot be made (its parent is a file) loads the model as without a
    cache, saying so and how to silence it; EDGEKV_WEIGHT_CACHE=off loads silently."""
    path = write_model(tmp_path / "m.gguf", "Q6_K")
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.warns(UserWarning, match="cannot write the weight cache .*EDGEKV_WEIGHT_CACHE"):
        m, got, conv = load(path, monkeypatch, blocker / "cache")
    assert m._gguf.weight_cache is None and conv > 0
    m.close()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m, ref, _ = load(path, monkeypatch, "off")
    assert m._gguf.weight_cache is None
    m.close()
    np.testing.assert_array_equal(got, ref)


def test_default_location_skips_tiny_models(tmp_path, monkeypatch):
    """Without EDGEKV_WEIGHT_CACHE the cache sits under the models cache, for models of at least
    MIN_DEFAULT_BYTES only: a tiny one writes nothing."""
    path = write_model(tmp_path / "m.gguf", "Q5_0")
    monkeypatch.delenv("EDGEKV_WEIGHT_CACHE", raising=False)
    monkeypatch.setenv("EDGEKV_CACHE", str(tmp_path / "models"))
    assert weight_cache.directory(weight_cache.MIN_DEFAULT_BYTES) == tmp_path / "models" / "weights"
    with edgekv.Model(path, threads=1, ctx=64) as m:
        assert m._gguf.weight_cache is None
    assert not (tmp_path / "models").exists()


def test_core_rejects_a_bad_borrowed_packed_tensor(tmp_path):
    """ek_model_set_tensor with EK_TYPE_PACKED_X8 takes only a matrix this build interleaves, 64-byte
    aligned; a packed token embedding only with tied embeddings (finalize). Errors, not crashes."""
    path = write_model(tmp_path / "m.gguf", "Q8_0", tied=False, n_merges=117)  # 376 output rows: packable
    g = gguf_loader.load_gguf(path, weight_cache=False)
    build_packs = _build_packs(Q8_0)
    hp = g.hparams
    cfg = ffi.new("ek_config *")
    for k in ("n_vocab", "n_embd", "n_layer", "n_head", "n_head_kv", "head_dim", "n_ff", "rope_dim"):
        setattr(cfg, k, hp[k])
    cfg.n_ctx, cfg.rope_base, cfg.norm_eps, cfg.n_threads, cfg.n_batch = 64, hp["rope_base"], hp["norm_eps"], 1, 64
    err = ffi.new("char[256]")
    h = lib.ek_model_create(cfg, err, 256)
    assert h != ffi.NULL, ffi.string(err)
    try:
        q8 = Q8_0 | lib.EK_TYPE_PACKED_X8
        keep = []
        for w in g.weights:
            arr = w.materialize()
            buf = np.empty(arr.nbytes + 128, np.uint8)
            start = -buf.ctypes.data % 64
            a = buf[start:start + arr.nbytes]
            keep.append(buf)
            kind_type = w.type
            if w.kind in gguf_loader._MATRIX_KINDS | {lib.EK_T_TOK_EMBD}:
                packs = lib.ek_pack_weights(w.type, ffi.from_buffer(arr), arr.nbytes, w.n_in, w.n_out,
                                            ffi.from_buffer(a), a.nbytes)
                assert packs == build_packs
                mis = buf[start + 1:start + 1 + arr.nbytes]
                assert lib.ek_model_set_tensor(h, w.kind, w.layer, q8, ffi.from_buffer(a if not packs else mis), w.n_in,
                                               w.n_out, a.nbytes) == lib.EK_ERR_INVALID
                assert b"a matrix this build packs, 64-byte aligned" in ffi.string(lib.ek_model_error(h))
                if not packs:  # a build with no x8 kernel: nothing more to check
                    return
                kind_type = q8
            else:
                a[:] = arr.reshape(-1).view(np.uint8)
                if w.kind == lib.EK_T_ATTN_NORM:
                    assert lib.ek_model_set_tensor(h, w.kind, w.layer, F32 | lib.EK_TYPE_PACKED_X8,
                                                   ffi.from_buffer(a), w.n_in, w.n_out, a.nbytes) == lib.EK_ERR_INVALID
            assert lib.ek_model_set_tensor(h, w.kind, w.layer, kind_type, ffi.from_buffer(a), w.n_in, w.n_out,
                                           a.nbytes) == 0, ffi.string(lib.ek_model_error(h))
        assert lib.ek_model_finalize(h) == lib.EK_ERR_INVALID
        assert b"tied embeddings" in ffi.string(lib.ek_model_error(h))
    finally:
        lib.ek_model_free(h)


def test_build_removes_temporary_files_of_killed_builds(tmp_path, monkeypatch):
    """A temporary file a killed build left (over an hour old) goes when the file is built again; a
    recent one (a build that may still be running) stays."""
    path = write_model(tmp_path / "m.gguf", "Q5_0")
    cache = tmp_path / "cache"
    cache.mkdir()
    name = weight_cache.file_name(weight_cache.gguf_sha256(path, None))
    old, recent = cache / f".{name}.old.tmp", cache / f".{name}.new.tmp"
    old.write_bytes(b"x" * 100)
    recent.write_bytes(b"x" * 100)
    os.utime(old, (1e9, 1e9))
    m, _, _ = load(path, monkeypatch, cache)
    assert m._gguf.weight_cache_built and m._gguf.weight_cache.name == name
    m.close()
    assert not old.exists() and recent.exists()


def test_first_load_shows_progress_the_second_none(tmp_path, monkeypatch, capsys):
    """The load that converts draws a progress bar on stderr (on a terminal by default; asked for
    here); the load that maps the file has nothing to show."""
    path = write_model(tmp_path / "m.gguf", "Q6_K")
    monkeypatch.setenv("EDGEKV_WEIGHT_CACHE", str(tmp_path / "cache"))
    g = gguf_loader.load_gguf(path, progress=True)
    assert g.weight_cache_built and "once: 100%" in capsys.readouterr().err
    g = gguf_loader.load_gguf(path, progress=True)
    assert not g.weight_cache_built and g.weight_cache is not None and capsys.readouterr().err == ""


def test_file_from_a_build_with_another_layout_is_not_borrowed(tmp_path, monkeypatch):
    """The key holds a fingerprint of the build's conversions and interleavings: a file written by a
    build whose layout differs (simulated: another fingerprint) is rebuilt, not borrowed."""
    path = write_model(tmp_path / "m.gguf", "Q4_K")
    cache = tmp_path / "cache"
    m, ref, _ = load(path, monkeypatch, cache)
    m.close()
    assert len(weight_cache.layout_fingerprint()) == 16
    (first,) = cache_files(cache)
    monkeypatch.setattr(weight_cache, "_fingerprint", "0" * 16)
    m, got, conv = load(path, monkeypatch, cache)  # its own file name
    other = m._gguf.weight_cache
    assert m._gguf.weight_cache_built and conv > 0 and other != first
    m.close()
    np.testing.assert_array_equal(got, ref)
    other.replace(first)  # under the other build's name: the key inside still differs
    monkeypatch.setattr(weight_cache, "_fingerprint", None)
    with pytest.warns(UserWarning, match="key .* does not match"):
        m, got, conv = load(path, monkeypatch, cache)
    assert m._gguf.weight_cache_built and conv > 0
    m.close()
    np.testing.assert_array_equal(got, ref)
