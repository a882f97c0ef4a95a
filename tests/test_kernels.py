"""The weight kernels, through the C entry ``ek_matmul``, against NumPy.

``ek_matmul(type, w, n_in, n_out, x, n_tok, out, impl)`` computes ``out[t, r] = dot(W[r], x[t])``
with the plain C reference (impl=0) or the compiled SIMD path (impl=1); Q4_0/Q4_1/Q8_0 also with
their rows repacked 8 by 8 (quant_x8.c), through the SIMD x8 kernel the model uses (impl=2) and
its plain C reference (impl=3). The NumPy reference is
``x @ dequantize(W).T`` in float64, with ``gguf.quants.dequantize`` (not edgekv's code).

Error bounds (derived, not tuned)
---------------------------------
For Q8_0/Q4_0/Q4_1 weights the activations are first quantized to int8 in blocks of 32:
``d = amax / 127``, ``q = round(x / d)``, so every element is off by at most ``d / 2 =
amax / 254``. Over a row ``x_t`` that gives ``||e_t|| <= E_t = sqrt(sum_b 32 * (amax_b / 254)^2)``,
and by Cauchy-Schwarz each output is off by at most ``||W_r|| * E_t``. On top comes float32
rounding of the block sums (the integer dot product inside a block is exact): at most
``(n_acc + 8) * u * S_rt`` with ``u = 2^-24``, ``n_acc`` the number of float additions in a row
(two per block: the x8 kernels add the offset term on its own)
and ``S_rt = sum_b A_rb * sum_{i in b} |x_ti|``, where ``A_rb`` bounds what one unit of
activation can contribute through block b (``384 |d|`` for Q8_0: ``(255 + 128) |d|``, as the
interleaved VNNI kernel sums ``(w + 128) a`` and takes ``128 sum(a)`` back; ``24 |d|`` for Q4_0 (codes 0..15
and the folded-in -8 offset), ``16 |d| + |m|`` for Q4_1, ``|w_i|`` itself for F32/F16). The test
asserts ``|out - ref| <= 1.01 * ||W_r|| * E_t + 4 * (n_acc + 8) * u * S_rt`` element by element.

The normalized MSE ``sum (out - ref)^2 / sum ref^2`` has, for weights independent of the
rounding errors, expectation ``sum ||e_t||^2 / sum ||x_t||^2``; per block ``||e||^2 <= 32 *
(amax/254)^2`` and ``||x||^2 >= amax^2``, so the worst case is ``32 / 254^2 = 4.96e-4`` (a
Gaussian row is near ``3e-5``). It is asserted below ``NMSE_Q8A`` wherever there are enough
weight rows (16 or more) for the mean over them to be near its expectation, on rows without
outliers (Gaussian or uniform, where the expectation is ~3e-5, so the margin is >10x). F32 and F16 weights meet float32 activations as they
are: only float rounding is left, asserted below 1e-9.

All impls use the same quantized activations and integer sums; they differ only in the
order of float additions, so they must agree within ``2 * (n_acc + 8) * u * S_rt`` (about 1e-6
of the row's scale).
"""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgekv._native import ffi, lib

U = 2.0 ** -24  # float32 unit roundoff
QK = 32
NMSE_Q8A = 32.0 / 254.0 ** 2  # worst case of the int8 activation error, see the module docstring
NMSE_FLOAT = 1e-9

TYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 8}
QUANTIZED = ("Q4_0", "Q4_1", "Q8_0")


def impls(type_name: str) -> tuple[int, ...]:
    """Kernel paths of a type: row reference and SIMD, plus the interleaved (x8) ones."""
    return (0, 1, 2, 3) if type_name in QUANTIZED else (0, 1)


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def ek_matmul(type_name: str, w: np.ndarray, n_in: int, n_out: int, x: np.ndarray, impl: int) -> np.ndarray:
    """Call the C kernel entry: w holds the weight bytes, x is (n_tok, n_in) float32."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    w = np.ascontiguousarray(w)
    n_tok = x.shape[0]
    out = np.full((n_tok, n_out), np.nan, dtype=np.float32)
    rc = lib.ek_matmul(
        TYPES[type_name], ffi.from_buffer(w), n_in, n_out, ffi.cast("float *", x.ctypes.data), n_tok,
        ffi.cast("float *", out.ctypes.data), impl,
    )
    assert rc == 0, f"ek_matmul({type_name}, n_in={n_in}, n_out={n_out}, n_tok={n_tok}, impl={impl}) -> {rc}"
    return out


def encode(type_name: str, wf: np.ndarray) -> np.ndarray:
    """float32 (n_out, n_in) weights -> the bytes of that GGML type (gguf's own quantizers)."""
    if type_name == "F32":
        return np.ascontiguousarray(wf, dtype=np.float32)
    if type_name == "F16":
        return np.ascontiguousarray(wf, dtype=np.float16)
    return quants.quantize(np.ascontiguousarray(wf, dtype=np.float32), GGMLQuantizationType[type_name])


def raw_codes(type_name: str, n_in: int, n_out: int, rng: np.random.Generator, scale: float = 0.05) -> np.ndarray:
    """Weight bytes with uniformly random codes (every nibble / int8 value, -128 included) and
    random fp16 scales (and mins): layouts a quantizer would rarely produce."""
    block_size, type_size = GGML_QUANT_SIZES[GGMLQuantizationType[type_name]]
    nb = n_in // block_size
    b = rng.integers(0, 256, size=(n_out, nb, type_size), dtype=np.uint8)
    d = (rng.uniform(0.2, 1.0, size=(n_out, nb)) * scale * rng.choice([-1, 1], size=(n_out, nb))).astype(np.float16)
    b[..., 0:2] = d.view(np.uint8).reshape(n_out, nb, 2)
    if type_name == "Q4_1":
        m = (rng.uniform(-8, 0, size=(n_out, nb)) * scale).astype(np.float16)
        b[..., 2:4] = m.view(np.uint8).reshape(n_out, nb, 2)
    return b.reshape(n_out, nb * type_size)


def dequant(type_name: str, w: np.ndarray, n_in: int, n_out: int) -> np.ndarray:
    if type_name == "F32":
        return w.astype(np.float64).reshape(n_out, n_in)
    if type_name == "F16":
        return w.astype(np.float64).reshape(n_out, n_in)
    return quants.dequantize(w, GGMLQuantizationType[type_name]).astype(np.float64).reshape(n_out, n_in)


def block_scale(type_name: str, w: np.ndarray, wd: np.ndarray, n_in: int, n_out: int) -> np.ndarray:
    """Per-element bound on |dW/dx| contributions (A_rb of the docstring), (n_out, n_in)."""
    if type_name in ("F32", "F16"):
        return np.abs(wd)
    _, type_size = GGML_QUANT_SIZES[GGMLQuantizationType[type_name]]
    nb = n_in // QK
    blocks = w.reshape(n_out, nb, type_size)
    d = np.abs(blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float64))
    if type_name == "Q8_0":
        a = 384.0 * d  # the VNNI x8 kernel sums (w + 128) a (<= 255 |a|) and takes back 128 * sum(a)
    elif type_name == "Q4_0":
        a = 24.0 * d
    else:
        m = np.abs(blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float64))
        a = 16.0 * d + m
    return np.repeat(a, QK, axis=1)


def bounds(type_name: str, w: np.ndarray, wd: np.ndarray, x: np.ndarray):
    """(per-element error bound vs the exact product, bound on |impl0 - impl1|), both (n_tok, n_out)."""
    n_out, n_in = wd.shape
    x64 = x.astype(np.float64)
    absx = np.abs(x64)
    a = block_scale(type_name, w, wd, n_in, n_out)
    if type_name in QUANTIZED:
        amax = absx.reshape(x.shape[0], n_in // QK, QK).max(axis=2)
        e_norm = np.sqrt((32.0 * (amax / 254.0) ** 2).sum(axis=1))  # E_t
        quant = 1.01 * np.outer(e_norm, np.linalg.norm(wd, axis=1))
        n_acc = 2 * (n_in // QK)
        # the kernels sum the quantized activations: |xq| <= |x| + amax / 254
        scale = (absx + np.repeat(amax, QK, axis=1) / 127.0) @ a.T  # S_rt, (n_tok, n_out)
    else:
        quant = np.zeros((x.shape[0], n_out))
        n_acc = n_in
        scale = absx @ a.T
    fl = (n_acc + 8) * U * scale
    return quant + 4.0 * fl + 1e-30, 2.0 * fl + 1e-30


def nmse(out: np.ndarray, ref: np.ndarray) -> float:
    den = float((ref ** 2).sum())
    return float(((out - ref) ** 2).sum()) / den if den > 0 else float(((out - ref) ** 2).sum())


def check(type_name: str, w: np.ndarray, x: np.ndarray, n_in: int, n_out: int, *, stat_check: bool = True):
    """Run both implementations and assert every bound; return (out_ref_impl, out_simd, exact)."""
    wd = dequant(type_name, w, n_in, n_out)
    exact = x.astype(np.float64) @ wd.T
    err_bound, agree_bound = bounds(type_name, w, wd, x)
    outs = []
    for impl in impls(type_name):
        out = ek_matmul(type_name, w, n_in, n_out, x, impl).astype(np.float64)
        assert np.all(np.isfinite(out)), f"{type_name} impl={impl}: non-finite output"
        excess = np.abs(out - exact) - err_bound
        i = np.unravel_index(np.argmax(excess), excess.shape)
        assert excess[i] <= 0, (
            f"{type_name} impl={impl} n_in={n_in} n_out={n_out} n_tok={x.shape[0]}: out[{i}] = {out[i]!r}, "
            f"exact {exact[i]!r}, |diff| {abs(out[i] - exact[i]):.3e} > bound {err_bound[i]:.3e}"
        )
        if stat_check and n_out >= 16 and np.abs(exact).max() > 0:
            limit = NMSE_Q8A if type_name in QUANTIZED else NMSE_FLOAT
            e = nmse(out, exact)
            assert e < limit, f"{type_name} impl={impl}: normalized MSE {e:.3e} >= {limit:.3e}"
        outs.append(out)
    for impl, out in zip(impls(type_name)[1:], outs[1:]):
        diff = np.abs(outs[0] - out)
        i = np.unravel_index(np.argmax(diff - agree_bound), diff.shape)
        assert diff[i] <= agree_bound[i], (
            f"{type_name}: impl 0 and {impl} disagree at {i}: {outs[0][i]!r} vs {out[i]!r} "
            f"(|diff| {diff[i]:.3e} > {agree_bound[i]:.3e})"
        )
    return outs[0], outs[1], exact


# ---------------------------------------------------------------------------------------------
# property tests
# ---------------------------------------------------------------------------------------------


@st.composite
def matmul_case(draw):
    n_in = QK * draw(st.integers(1, 24))
    n_out = draw(st.integers(1, 40))
    n_tok = draw(st.integers(1, 9))
    seed = draw(st.integers(0, 2**32 - 1))
    dist = draw(st.sampled_from(["normal", "uniform", "heavy", "sparse", "positive"]))
    x_scale = 10.0 ** draw(st.integers(-3, 3))
    weights = draw(st.sampled_from(["quantized", "raw"]))
    return n_in, n_out, n_tok, seed, dist, x_scale, weights


def activations(rng: np.random.Generator, dist: str, shape, scale: float) -> np.ndarray:
    if dist == "normal":
        x = rng.standard_normal(shape)
    elif dist == "uniform":
        x = rng.uniform(-1, 1, shape)
    elif dist == "heavy":  # outliers: a few values dominate their block's scale
        x = rng.standard_t(1.5, shape)
    elif dist == "sparse":
        x = rng.standard_normal(shape) * (rng.random(shape) < 0.1)
    else:
        x = rng.exponential(1.0, shape)
    return (x * scale).astype(np.float32)


@pytest.mark.parametrize("type_name", list(TYPES))
@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(case=matmul_case())
def test_matmul_matches_numpy(type_name, case):
    n_in, n_out, n_tok, seed, dist, x_scale, weights = case
    rng = np.random.default_rng(seed)
    if weights == "raw" and type_name in QUANTIZED:
        w = raw_codes(type_name, n_in, n_out, rng)
    else:
        w = encode(type_name, rng.standard_normal((n_out, n_in)).astype(np.float32) / np.sqrt(n_in))
    x = activations(rng, dist, (n_tok, n_in), x_scale)
    # The NMSE bound is on an expectation: checked where rows are well spread (for outlier-heavy
    # rows a sample can sit near the worst case; the element-wise bound still holds for them).
    check(type_name, w, x, n_in, n_out, stat_check=dist in ("normal", "uniform"))


@pytest.mark.parametrize("type_name", list(TYPES))
@pytest.mark.parametrize("n_tok", [1, 3, 4, 5, 8, 9, 17])
def test_matmul_real_shapes(type_name, n_tok):
    """SmolLM2-sized rows (576 and 1536 values) through every token-count path (4-wide and tail)."""
    rng = np.random.default_rng(n_tok)
    for n_in, n_out in ((576, 48), (1536, 24)):
        w = encode(type_name, rng.standard_normal((n_out, n_in)).astype(np.float32) * 0.05)
        x = activations(rng, "normal", (n_tok, n_in), 1.0)
        check(type_name, w, x, n_in, n_out)


def test_nmse_bound_is_not_vacuous():
    """The activation error really is there (and near its Gaussian expectation), so the bounds
    above test something: Q8_0 kernels are not exact, and not far from 3e-5 either."""
    rng = np.random.default_rng(7)
    n_in, n_out, n_tok = 512, 64, 8
    w = encode("Q8_0", rng.standard_normal((n_out, n_in)).astype(np.float32))
    x = rng.standard_normal((n_tok, n_in)).astype(np.float32)
    _, _, exact = check("Q8_0", w, x, n_in, n_out)
    e = nmse(ek_matmul("Q8_0", w, n_in, n_out, x, 0).astype(np.float64), exact)
    assert 3e-6 < e < 3e-4


# ---------------------------------------------------------------------------------------------
# edge cases
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("type_name", list(TYPES))
def test_zero_weights_give_zero(type_name):
    n_in, n_out = 96, 11  # 8 interleaved rows and 3 row-major ones on the x8 paths
    w = encode(type_name, np.zeros((n_out, n_in), dtype=np.float32))
    x = np.random.default_rng(1).standard_normal((5, n_in)).astype(np.float32)
    for impl in impls(type_name):
        out = ek_matmul(type_name, w, n_in, n_out, x, impl)
        assert np.array_equal(out, np.zeros_like(out)), f"impl {impl}"


@pytest.mark.parametrize("type_name", list(TYPES))
def test_zero_activations_give_zero(type_name):
    n_in, n_out = 96, 11
    rng = np.random.default_rng(2)
    w = encode(type_name, rng.standard_normal((n_out, n_in)).astype(np.float32))
    x = np.zeros((6, n_in), dtype=np.float32)
    x[3, 40:72] = rng.standard_normal(32)  # one non-zero block in one row: the rest stay exactly 0
    for impl in impls(type_name):
        out = ek_matmul(type_name, w, n_in, n_out, x, impl)
        assert np.array_equal(out[[0, 1, 2, 4, 5]], np.zeros((5, n_out), dtype=np.float32)), f"impl {impl}"
        assert np.all(out[3] != 0), f"impl {impl}"


@pytest.mark.parametrize("type_name", list(TYPES))
def test_zero_blocks_among_nonzero(type_name):
    """An all-zero activation block (d = 0) next to normal ones contributes nothing."""
    n_in, n_out = 128, 9
    rng = np.random.default_rng(3)
    w = encode(type_name, rng.standard_normal((n_out, n_in)).astype(np.float32))
    x = rng.standard_normal((4, n_in)).astype(np.float32)
    x[:, 32:64] = 0.0
    check(type_name, w, x, n_in, n_out)


@pytest.mark.parametrize("type_name", list(TYPES))
@pytest.mark.parametrize("x_scale", [1e4, 1e6])
def test_large_magnitudes(type_name, x_scale):
    """Large weights (fp16 scales near their top for F16) and large activations: finite, in bounds."""
    n_in, n_out = 256, 16
    rng = np.random.default_rng(4)
    w_scale = 2e4 if type_name == "F16" else 1e3
    wf = np.clip(rng.standard_normal((n_out, n_in)) * w_scale, -6e4, 6e4).astype(np.float32)
    w = encode(type_name, wf)
    x = (rng.standard_normal((5, n_in)) * x_scale).astype(np.float32)
    out, _, exact = check(type_name, w, x, n_in, n_out)
    assert np.abs(exact).max() > 1e6 * x_scale / 1e4  # the case is really large


@pytest.mark.parametrize("type_name", QUANTIZED)
def test_extreme_codes(type_name):
    """Every code at its extreme (Q8_0: -128 and 127; Q4: 0 and 15) with activations at +-amax:
    the int8/int16 intermediate sums of the SIMD path must not saturate."""
    n_in, n_out = 64, 4
    rng = np.random.default_rng(5)
    w = raw_codes(type_name, n_in, n_out, rng)
    blocks = w.reshape(n_out, n_in // QK, -1)
    lo, hi = (0x80, 0x7F) if type_name == "Q8_0" else (0x00, 0xFF)
    start = 2 if type_name == "Q8_0" else (2 if type_name == "Q4_0" else 4)
    blocks[0, :, start:] = lo
    blocks[1, :, start:] = hi
    blocks[2, :, start:] = lo if type_name != "Q8_0" else 0x81  # -127
    w = blocks.reshape(n_out, -1)
    x = np.stack([np.full(n_in, 3.0), np.full(n_in, -3.0), np.where(np.arange(n_in) % 2, 3.0, -3.0)]).astype(np.float32)
    check(type_name, w, x, n_in, n_out, stat_check=False)


@pytest.mark.parametrize("type_name", ["F32", "F16"])
@pytest.mark.parametrize("n_in", [1, 7, 37, 100])
def test_float_types_take_any_row_length(type_name, n_in):
    """F32/F16 rows need not be whole blocks: the SIMD loops' scalar tails must be right too."""
    rng = np.random.default_rng(n_in)
    w = encode(type_name, rng.standard_normal((5, n_in)).astype(np.float32))
    x = rng.standard_normal((6, n_in)).astype(np.float32)
    check(type_name, w, x, n_in, 5, stat_check=False)


@pytest.mark.parametrize("type_name", list(TYPES))
def test_row_bytes_match_gguf(type_name):
    block_size, type_size = GGML_QUANT_SIZES[GGMLQuantizationType[type_name]]
    for n in (32, 64, 576, 1536):
        assert lib.ek_type_row_bytes(TYPES[type_name], n) == n // block_size * type_size
    if block_size > 1:
        assert lib.ek_type_row_bytes(TYPES[type_name], 48) == 0  # not whole blocks


def test_invalid_arguments_are_rejected():
    x = np.ones((1, 64), dtype=np.float32)
    out = np.zeros((1, 2), dtype=np.float32)
    w = np.zeros(2 * 2 * 34, dtype=np.uint8)
    px, po, pw = ffi.cast("float *", x.ctypes.data), ffi.cast("float *", out.ctypes.data), ffi.from_buffer(w)
    invalid = lib.EK_ERR_INVALID
    assert lib.ek_matmul(6, pw, 64, 2, px, 1, po, 0) == invalid  # Q5_0 does not run natively
    assert lib.ek_matmul(99, pw, 64, 2, px, 1, po, 0) == invalid
    assert lib.ek_matmul(-1, pw, 64, 2, px, 1, po, 0) == invalid
    assert lib.ek_matmul(8, pw, 48, 2, px, 1, po, 0) == invalid  # not whole blocks
    assert lib.ek_matmul(8, pw, 64, 2, px, 0, po, 0) == invalid  # no tokens
    assert lib.ek_matmul(0, pw, 64, 2, px, 1, po, 2) == invalid  # F32 has no interleaved layout
    assert lib.ek_matmul(8, pw, 64, 2, px, 1, po, 4) == invalid  # no such impl
    assert lib.ek_matmul(8, pw, 64, 0, px, 1, po, 0) == invalid  # no rows
    assert lib.ek_matmul(8, ffi.NULL, 64, 2, px, 1, po, 0) == invalid
    assert lib.ek_matmul(8, pw, 64, 2, px, 1, po, 1) == 0


def test_simd_name_is_known():
    assert ffi.string(lib.ek_simd()).decode() in ("avx2", "avx2+vnni", "avx2+vnni+avx512", "neon", "neon+dotprod", "scalar")


# ---------------------------------------------------------------------------------------------
# next-token statistics of logit rows (ek_logit_stats, the KV controller's features)
# ---------------------------------------------------------------------------------------------


def logit_stats(x: np.ndarray):
    x = np.ascontiguousarray(x, dtype=np.float32)
    n, v = x.shape
    out = [np.empty(n, np.float32) for _ in range(3)]
    f = "float *"
    rc = lib.ek_logit_stats(ffi.cast(f, x.ctypes.data), n, v, *(ffi.cast(f, o.ctypes.data) for o in out))
    assert rc == 0
    return out


@pytest.mark.parametrize("n_vocab", [1, 7, 16, 379, 49152])
def test_logit_stats_match_numpy(n_vocab):
    """max, log sum exp(x - max) and entropy against float64 NumPy. Bound: exp's polynomial is
    within 2e-7 relative, and the float32 sums run over at most n_vocab / 16 terms per lane, so
    the sums are within (n_vocab / 16 + 2) * 2^-24 relative; log s is then within that absolute,
    and the entropy within it times (1 + |sum(e z) / s|)."""
    rng = np.random.default_rng(n_vocab)
    rows = [rng.standard_normal(n_vocab) * s for s in (0.1, 3.0, 30.0)]
    rows.append(np.full(n_vocab, 2.5))  # uniform: entropy log n
    hot = np.full(n_vocab, -50.0)
    hot[n_vocab // 2] = 40.0  # one-hot: entropy ~0
    rows.append(hot)
    x = np.stack(rows).astype(np.float32)
    mx, log_s, ent = logit_stats(x)
    xd = x.astype(np.float64)
    m = xd.max(axis=1)
    z = xd - m[:, None]
    e = np.exp(z)
    s = e.sum(axis=1)
    ref_ent = np.log(s) - (e * z).sum(axis=1) / s
    rel = (n_vocab / 16 + 2) * U + 2e-7
    np.testing.assert_array_equal(mx, m.astype(np.float32))
    assert np.all(np.abs(log_s - np.log(s)) <= 2 * rel + 1e-7)
    assert np.all(np.abs(ent - ref_ent) <= 2 * rel * (1 + np.abs((e * z).sum(axis=1) / s)) + 1e-6)
    assert abs(ent[3] - np.log(n_vocab)) <= 1e-5 * max(1.0, np.log(n_vocab))


def test_logit_stats_non_finite_rows_give_nan():
    x = np.zeros((4, 40), np.float32)
    x[1, 3] = np.nan
    x[2, 39] = np.inf  # in the scalar tail of the vector loop
    x[3, :] = -np.inf
    mx, log_s, ent = logit_stats(x)
    assert np.isfinite([mx[0], log_s[0], ent[0]]).all()
    assert np.isnan(mx[1:]).all() and np.isnan(log_s[1:]).all() and np.isnan(ent[1:]).all()
    assert lib.ek_logit_stats(ffi.NULL, 1, 40, ffi.NULL, ffi.NULL, ffi.NULL) == lib.EK_ERR_INVALID
