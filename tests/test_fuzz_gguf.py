"""The GGUF loader fuzzer (tools/fuzz_gguf.py): its machinery, a short run, and regressions for
what it found (each one now a ModelLoadError instead of a stray exception or a hang).

The long run (20,000+ cases) is in tools/ci_native_checks.sh.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import edgekv
from conftest import REPO, subprocess_env, write_tiny_model
from edgekv import ModelLoadError

sys.path.insert(0, str(REPO / "tools"))
import fuzz_gguf as fz  # noqa: E402

FUZZ = [sys.executable, str(REPO / "tools" / "fuzz_gguf.py")]


@pytest.fixture(scope="module")
def seed_cache(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("fuzz-seeds")
    fz.Seeds(d, None)  # written once for the module
    return d


@pytest.fixture(scope="module")
def tiny_bytes(tmp_path_factory) -> bytes:
    return write_tiny_model(tmp_path_factory.mktemp("fz") / "t.gguf", arch="llama", weight_type="Q8_0").read_bytes()


def test_gguf_structure_round_trips(seed_cache):
    seeds = fz.Seeds(seed_cache, None)
    for name, b in zip(seeds.names, seeds.bytes):
        assert fz.write_gguf(fz.parse_gguf(b)) == b, name


def test_cases_are_a_function_of_seed_and_number(seed_cache):
    seeds = fz.Seeds(seed_cache, None)
    a = [fz.make_case(seeds, 7, c) for c in range(40)]
    b = [fz.make_case(seeds, 7, c) for c in range(40)]
    assert a == b
    assert len({x[0] for x in a}) > 30  # and they differ from each other
    assert [fz.make_case(seeds, 8, c) for c in range(5)] != a[:5]


def run_fuzz(args, env_extra=None, timeout=600) -> subprocess.CompletedProcess:
    env = subprocess_env()
    env.update(env_extra or {})
    return subprocess.run(FUZZ + args, capture_output=True, text=True, timeout=timeout, env=env)


def test_short_run_has_no_failures(seed_cache, tmp_path):
    p = run_fuzz(["--cases", "300", "--jobs", "2", "--batch", "150", "--no-real", "--cache", str(seed_cache),
                  "--artifacts", str(tmp_path / "art"), "--seed", "99"])
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "300 passed, 0 failed" in p.stdout


def test_a_crash_is_caught_and_bisected_to_its_case(seed_cache, tmp_path):
    p = run_fuzz(["--cases", "20", "--jobs", "1", "--batch", "20", "--no-real", "--cache", str(seed_cache),
                  "--artifacts", str(tmp_path / "art")], {"EDGEKV_FUZZ_INJECT_CRASH": "5"})
    assert p.returncode == 1
    assert "FAIL case 5 " in p.stdout and "CRASH" in p.stdout
    assert "reproducer: [5]" in p.stdout
    assert "19 passed, 1 failed" in p.stdout  # the cases after the crash ran in a new worker
    assert (tmp_path / "art" / "case-5.gguf").is_file()


def test_a_crash_that_needs_an_earlier_case_is_bisected_to_both(seed_cache, tmp_path):
    p = run_fuzz(["--cases", "16", "--jobs", "1", "--batch", "16", "--no-real", "--cache", str(seed_cache),
                  "--artifacts", str(tmp_path / "art")], {"EDGEKV_FUZZ_INJECT_CRASH_AFTER": "3:11"})
    assert p.returncode == 1
    assert "FAIL case 11 " in p.stdout
    assert "reproducer: [3, 11]" in p.stdout, p.stdout


def test_replay_prints_the_outcome(seed_cache, tmp_path):
    out = tmp_path / "case.gguf"
    p = run_fuzz(["--replay", "17", "--no-real", "--cache", str(seed_cache), "--save", str(out)])
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("case 17: seed file ")
    assert out.is_file()


# ---------------------------------------------------------------------------------------------
# regressions: what the fuzzer found in python/edgekv/gguf_loader.py
# ---------------------------------------------------------------------------------------------


def mutated(tmp_path, base: bytes, edit) -> Path:
    d = fz.parse_gguf(base)
    edit(d)
    p = tmp_path / "mutated.gguf"
    p.write_bytes(fz.write_gguf(d))
    return p


def kv(d, key: bytes) -> fz.KV:
    return next(x for x in d.kvs if x.key == key)


def test_tensor_without_dimensions(tmp_path, tiny_bytes):
    """n_dims = 0 made the loader index an empty shape (IndexError)."""

    def edit(d):
        next(t for t in d.tensors if t.name == b"blk.0.ffn_norm.weight").dims = []

    with pytest.raises(ModelLoadError, match="no dimensions"):
        edgekv.Model(mutated(tmp_path, tiny_bytes, edit), threads=1)


@pytest.mark.parametrize("value", [float("inf"), float("-inf")])
def test_infinite_integer_metadata(tmp_path, tiny_bytes, value):
    """A float infinity where an integer belongs: int(inf) raised OverflowError."""

    def edit(d):
        x = kv(d, b"llama.attention.head_count_kv")
        x.vtype, x.value = fz.T_F32, value

    with pytest.raises(ModelLoadError, match="unusable value"):
        edgekv.Model(mutated(tmp_path, tiny_bytes, edit), threads=1)


@pytest.mark.parametrize("key", [b"llama.embedding_length", b"llama.attention.head_count",
                                 b"llama.rope.dimension_count"])
def test_metadata_too_large_for_the_c_config(tmp_path, tiny_bytes, key):
    """A value past C's int range made cffi raise OverflowError while filling the config."""

    def edit(d):
        x = kv(d, key)
        x.vtype, x.value = fz.T_U64, 1 << 40

    with pytest.raises(ModelLoadError, match="out of range"):
        edgekv.Model(mutated(tmp_path, tiny_bytes, edit), threads=1)


def test_tokens_that_are_not_strings(tmp_path, tiny_bytes):
    """Numbers as the token list built a tokenizer that encoded every text to nothing."""

    def edit(d):
        x = kv(d, b"tokenizer.ggml.tokens")
        x.value = (fz.T_F32, [float(i) for i in range(len(x.value[1]))])

    with pytest.raises(ModelLoadError, match="array of strings"):
        edgekv.Model(mutated(tmp_path, tiny_bytes, edit), threads=1)


HANG_CHILD = textwrap.dedent(
    """
    import sys, edgekv
    try:
        edgekv.Model(sys.argv[1], threads=1)
        print("LOADED")
    except edgekv.ModelLoadError as e:
        print("REJECTED", e)
    """
)


@pytest.mark.parametrize("count", [1 << 40, (1 << 64) - 1])
@pytest.mark.parametrize("key", [b"tokenizer.ggml.token_type", b"tokenizer.ggml.tokens", b"tokenizer.ggml.merges"])
def test_array_count_past_the_end_of_the_file(tmp_path, tiny_bytes, key, count):
    """gguf's reader looped over every announced array element (for hours): the count is now
    checked against the file size first. In a child with a timeout: a regression would hang."""
    d = fz.parse_gguf(tiny_bytes)
    off = next(o for o, s, label in d.header_ints if label == key.decode() + ".count")
    p = tmp_path / "huge-count.gguf"
    p.write_bytes(tiny_bytes[:off] + count.to_bytes(8, "little") + tiny_bytes[off + 8:])
    proc = subprocess.run([sys.executable, "-c", HANG_CHILD, str(p)], capture_output=True, text=True, timeout=60,
                          env=subprocess_env())
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("REJECTED") and "array of" in proc.stdout, proc.stdout


@pytest.mark.parametrize("label", ["tensor_count", "kv_count", "tensor.name.len", "key.len"])
def test_header_counts_past_the_end_of_the_file(tmp_path, tiny_bytes, label):
    d = fz.parse_gguf(tiny_bytes)
    off, size, _ = next(f for f in d.header_ints if f[2] == label)
    p = tmp_path / "huge.gguf"
    p.write_bytes(tiny_bytes[:off] + (1 << 50).to_bytes(size, "little") + tiny_bytes[off + size:])
    with pytest.raises(ModelLoadError, match="not a valid GGUF file"):
        edgekv.Model(p, threads=1)


def _same_as_gguf_py(path: Path) -> None:
    """edgekv's reader (gguf_file.py) against gguf-py's GGUFReader on one file: every metadata value
    and every tensor's name, dims, type, byte count, view shape and bytes."""
    import numpy as np
    from gguf import GGUFReader

    from edgekv.gguf_file import read_gguf

    ours, ref = read_gguf(path), GGUFReader(path)
    ref_fields = {k: f.contents() for k, f in ref.fields.items() if not k.startswith("GGUF.")}
    assert ours.fields == ref_fields
    assert [t.name for t in ours.tensors] == [t.name for t in ref.tensors]
    for a, b in zip(ours.tensors, ref.tensors):
        assert a.shape == [int(x) for x in b.shape] and a.tensor_type == b.tensor_type, a.name
        assert a.n_bytes == b.n_bytes and a.n_elements == b.n_elements, a.name
        assert a.data.shape == b.data.shape and a.data.dtype == b.data.dtype, a.name
        assert np.array_equal(a.data.view(np.uint8).reshape(-1), b.data.view(np.uint8).reshape(-1)), a.name


@pytest.mark.parametrize("arch,wtype", [("llama", "Q4_1"), ("qwen2", "Q8_0"), ("llama", "F16"), ("qwen2", "Q5_0"),
                                        ("llama", "BF16"), ("qwen2", "F32")])
def test_reader_matches_gguf_py_on_generated_files(tmp_path, arch, wtype):
    _same_as_gguf_py(write_tiny_model(tmp_path / "t.gguf", arch=arch, weight_type=wtype))


def test_reader_matches_gguf_py_on_smollm2(smollm2_path):
    """The real SmolLM2 GGUF, resolved through the registry (not whatever an earlier test happened
    to cache). gguf-py takes ~7 s per larger file, so the Qwen2.5 files were checked by hand:
    `_same_as_gguf_py` on each."""
    _same_as_gguf_py(smollm2_path)