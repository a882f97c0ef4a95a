"""Load-time weight conversion (csrc/weight_convert.c) against gguf-py's NumPy dequantizers.

Random source blocks (random code bytes, scales drawn in a realistic range) are converted by
``ek_convert_weights`` and the result, dequantized, is compared with ``gguf.quants.dequantize`` of
the source, with the error each conversion is documented to make:

* Q5_0 -> Q8_0: exact (the same values, bit for bit);
* Q4_K -> Q4_1: only the sub-block scale d*sc and minimum dmin*m are rounded to fp16, so a value
  moves by at most 2^-11 * (15 |d sc| + |dmin m|) (plus float rounding);
* Q6_K -> Q8_0: requantized to 8 bits per block of 32: |error| <= d8 / 2 + 127 |d8 - fp16(d8)|
  with d8 = max|x| / 127 of the block, and the codes equal gguf-py's own Q8_0 quantizer's
  (the same rule) but for rare ties.
"""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

from edgekv._native import ffi, lib

Q = GGMLQuantizationType


def _convert(src_type: Q, raw: np.ndarray, n_in: int, n_rows: int) -> tuple[int, np.ndarray]:
    dst = lib.ek_convert_target(int(src_type), n_in)
    assert dst >= 0
    out = np.empty(lib.ek_type_row_bytes(dst, n_in) * n_rows, dtype=np.uint8)
    rc = lib.ek_convert_weights(int(src_type), ffi.from_buffer(raw), raw.nbytes, n_in, n_rows,
                                ffi.from_buffer(out), out.nbytes)
    assert rc == dst
    return dst, out


def _dequant(qtype: Q, b: np.ndarray) -> np.ndarray:
    """gguf-py's dequantizer for a converted buffer (the same one test_kernels.py uses)."""
    return quants.dequantize(b.reshape(1, -1), qtype).reshape(-1)


def _random_blocks(rng, qtype: Q, n_blocks: int) -> np.ndarray:
    """Random code bytes with the fp16 scale fields set to realistic magnitudes."""
    block, size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(n_blocks, size), dtype=np.uint8)

    def f16(lo, hi, n):
        return (rng.uniform(lo, hi, n) * rng.choice([-1, 1], n)).astype(np.float16).view(np.uint8).reshape(n, 2)

    if qtype == Q.Q5_0:
        raw[:, 0:2] = f16(1e-4, 0.05, n_blocks)
    elif qtype == Q.Q4_K:  # d and dmin are positive in real files; the signs are irrelevant here
        raw[:, 0:2] = np.abs(f16(1e-4, 2e-3, n_blocks).view(np.float16)).view(np.uint8)
        raw[:, 2:4] = np.abs(f16(1e-4, 2e-3, n_blocks).view(np.float16)).view(np.uint8)
    elif qtype == Q.Q6_K:
        raw[:, 208:210] = f16(1e-5, 1e-3, n_blocks)
    return raw.reshape(-1)


@pytest.mark.parametrize("n_in,n_rows", [(256, 3), (1536, 4)])
def test_q5_0_to_q8_0_is_exact(n_in, n_rows):
    rng = np.random.default_rng(1)
    raw = _random_blocks(rng, Q.Q5_0, n_in // 32 * n_rows)
    dst, out = _convert(Q.Q5_0, raw, n_in, n_rows)
    assert dst == int(Q.Q8_0)
    ref = quants.dequantize(raw, Q.Q5_0).reshape(-1)
    np.testing.assert_array_equal(_dequant(Q.Q8_0, out), ref)


@pytest.mark.parametrize("n_in,n_rows", [(256, 5), (1536, 3)])
def test_q4_k_to_q4_1_keeps_codes_and_rounds_only_scales(n_in, n_rows):
    rng = np.random.default_rng(2)
    raw = _random_blocks(rng, Q.Q4_K, n_in // 256 * n_rows)
    dst, out = _convert(Q.Q4_K, raw, n_in, n_rows)
    assert dst == int(Q.Q4_1)
    got = _dequant(Q.Q4_1, out)
    ref = quants.dequantize(raw, Q.Q4_K).reshape(-1).astype(np.float64)
    # per sub-block of 32: the magnitudes the fp16 roundings act on, from the converted block
    q41 = out.reshape(-1, 20)
    d = np.abs(q41[:, 0:2].copy().view(np.float16).astype(np.float64))
    m = np.abs(q41[:, 2:4].copy().view(np.float16).astype(np.float64))
    bound = np.repeat((2.0 ** -11 * (15 * d + m) * 1.001 + 1e-7 * (15 * d + m)).reshape(-1), 32)
    err = np.abs(got - ref)
    assert (err <= bound).all(), f"max error {err.max():.3g}, worst excess {(err - bound).max():.3g}"
    # and the conversion really keeps the codes: every block's values are on its own grid
    assert np.abs(got - ref).max() < 2.0 ** -10 * np.abs(ref).max()


@pytest.mark.parametrize("n_in,n_rows", [(256, 4), (896, 0)])
def test_q6_k_to_q8_0_error_within_half_a_step(n_in, n_rows):
    if n_rows == 0:  # 896 is not a multiple of 256: no C conversion (the loader falls back)
        assert lib.ek_convert_target(int(Q.Q6_K), n_in) == lib.EK_ERR_INVALID
        return
    rng = np.random.default_rng(3)
    raw = _random_blocks(rng, Q.Q6_K, n_in // 256 * n_rows)
    dst, out = _convert(Q.Q6_K, raw, n_in, n_rows)
    assert dst == int(Q.Q8_0)
    ref = quants.dequantize(raw, Q.Q6_K).reshape(-1).astype(np.float32)
    got = _dequant(Q.Q8_0, out)
    blocks = ref.reshape(-1, 32)
    d8 = np.abs(blocks).max(axis=1) / 127.0
    d8_16 = d8.astype(np.float16).astype(np.float64)
    bound = np.repeat(d8 / 2 + 127 * np.abs(d8 - d8_16) + 1e-6 * d8, 32)
    err = np.abs(got.astype(np.float64) - ref)
    assert (err <= bound).all(), f"worst excess {(err - bound).max():.3g}"
    # same codes as gguf-py's Q8_0 quantizer on the same values, ties aside
    mine = out.reshape(-1, 34)[:, 2:].copy().view(np.int8).astype(int)
    theirs = quants.quantize(ref.reshape(-1, n_in), Q.Q8_0).reshape(-1, 34)[:, 2:].copy().view(np.int8).astype(int)
    assert np.abs(mine - theirs).max() <= 1
    assert (mine != theirs).mean() < 1e-3


def test_convert_rejects_bad_arguments():
    invalid = lib.EK_ERR_INVALID
    raw = np.zeros(144, np.uint8)
    out = np.zeros(8 * 20, np.uint8)
    assert lib.ek_convert_target(int(Q.Q4_K), 255) == invalid      # not whole super-blocks
    assert lib.ek_convert_target(int(Q.Q4_K), 0) == invalid
    assert lib.ek_convert_target(int(Q.Q4_0), 256) == invalid      # runs natively: nothing to convert
    assert lib.ek_convert_target(int(Q.BF16), 256) == invalid      # no C conversion (NumPy fallback)
    ok = lib.ek_convert_weights(int(Q.Q4_K), ffi.from_buffer(raw), 144, 256, 1, ffi.from_buffer(out), 160)
    assert ok == int(Q.Q4_1)
    # wrong byte counts, rows, type: refused, nothing written past the buffers
    assert lib.ek_convert_weights(int(Q.Q4_K), ffi.from_buffer(raw), 143, 256, 1, ffi.from_buffer(out), 160) == invalid
    assert lib.ek_convert_weights(int(Q.Q4_K), ffi.from_buffer(raw), 144, 256, 1, ffi.from_buffer(out), 159) == invalid
    assert lib.ek_convert_weights(int(Q.Q4_K), ffi.from_buffer(raw), 144, 256, 2, ffi.from_buffer(out), 160) == invalid
    assert lib.ek_convert_weights(int(Q.Q4_K), ffi.NULL, 144, 256, 1, ffi.from_buffer(out), 160) == invalid
    assert lib.ek_convert_weights(99, ffi.from_buffer(raw), 144, 256, 1, ffi.from_buffer(out), 160) == invalid


def test_load_converts_each_matrix_when_handed_to_the_core(tiny_path, reference_for):
    """load_gguf only plans a C conversion (the weight's type is known, its array is not made);
    the model converts each matrix as it hands it over, so the finished model has no conversion
    pending, every converted matrix runs as the planned type, and the model computes what the
    file holds: its logits track the float64 reference of the Q5_0 file within the int8-activation
    bounds of test_forward.py (Q5_0 -> Q8_0 is exact, so no extra term)."""
    import edgekv
    from edgekv.gguf_loader import load_gguf

    path = tiny_path("qwen2", "Q5_0")
    g = load_gguf(path)
    pending = [w for w in g.weights if w.source is not None]
    assert pending and all(w.array is None and w.type == int(Q.Q8_0) for w in pending)
    with edgekv.Model(path, threads=1) as m:
        assert all(w.source is None for w in m._gguf.weights)
        assert m.info()["converted_to"] == {"Q5_0": "Q8_0"}
        ids = m.tokenize("Hi there, how are you today?")
        got = m.logits(ids).astype(np.float64)
        m.generate(ids, max_tokens=3, temperature=0)
        assert m.last_stats.generated_tokens == 3 and m.last_stats.finish_reason == "length"
    ref = reference_for(path).logits(ids)
    eps_q8a = np.sqrt(32) / 254.0
    diff = np.abs(got - ref) / ref.std()
    assert np.sqrt(np.mean(diff ** 2)) < 2 * eps_q8a and diff.max() < 8 * eps_q8a, (
        f"converted model vs reference: RMS {np.sqrt(np.mean(diff ** 2)):.2e}, max {diff.max():.2e} of the logits' std")
