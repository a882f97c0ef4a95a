"""KV precision per (layer, position) (issue 18, item 1): ek_kv_set_layer_bits, the per-layer maps,
their accounting, and the static per-layer policy ("layers:int4,0=k8v4")."""

from __future__ import annotations

import numpy as np
import pytest

from edgekv._native import lib
from edgekv.kv_policy import LayerPolicy, parse_policy
from reference import ReferenceModel
from test_kv import ALL_BITS, _ptr, kv_read_all, kv_set_bits, rand_ids, record_bytes, model_groups, same_bits


def set_layer_bits(m, layer, pos, kb, vb) -> int:
    pos = np.ascontiguousarray(pos, np.int32)
    kb = np.ascontiguousarray(np.broadcast_to(kb, pos.shape), np.int32)
    vb = np.ascontiguousarray(np.broadcast_to(vb, pos.shape), np.int32)
    return lib.ek_kv_set_layer_bits(m._handle, layer, _ptr(pos, "int32_t *"), _ptr(kb, "int32_t *"),
                                    _ptr(vb, "int32_t *"), pos.size)


def expected_bytes(m, k: np.ndarray, v: np.ndarray) -> int:
    """Record bytes of (n_layer, n) key and value bits: every layer's records at its own bits."""
    hp, g = m.hparams, model_groups(m)
    hd = hp["head_dim"]
    per = {b: record_bytes(b, hd, g.get(b)) for b in ALL_BITS}
    return hp["n_head_kv"] * int(sum(per[int(a)] + per[int(b)] for a, b in zip(k.ravel(), v.ravel())))


@pytest.fixture(scope="module")
def f32_path(tiny_path):
    # F32 weights: activations are not quantized, so the only errors left are the KV records'
    return tiny_path("llama", "F32", n_layer=3, n_embd=128, n_head=4, n_head_kv=2)


def test_one_layers_bits_touch_only_that_layer_and_account_exactly(open_model, f32_path):
    m = open_model(f32_path)
    L, n = m.hparams["n_layer"], 24
    m.logits(rand_ids(m, n, 1))
    before = kv_read_all(m)
    assert lib.ek_kv_layer_maps(m._handle) == 1
    assert m.kv_bytes == lib.ek_kv_bytes_used(m._handle) == expected_bytes(m, *m.kv_bits(per_layer=True)) + n * 5
    # setting a layer's bits to what they are does not split the store
    assert set_layer_bits(m, 1, np.arange(n), 16, 16) == 0
    assert lib.ek_kv_layer_maps(m._handle) == 1
    assert set_layer_bits(m, 1, [3, 7], 4, 2) == 0
    assert lib.ek_kv_layer_maps(m._handle) == L
    after = kv_read_all(m)
    others = np.ones((L, n), bool)
    others[1, [3, 7]] = False
    assert same_bits(after[others], before[others])
    assert not same_bits(after[1, 3], before[1, 3])
    k, v = m.kv_bits(per_layer=True)
    want_k, want_v = np.full((L, n), 16), np.full((L, n), 16)
    want_k[1, [3, 7]], want_v[1, [3, 7]] = 4, 2
    np.testing.assert_array_equal(k, want_k)
    np.testing.assert_array_equal(v, want_v)
    with pytest.raises(ValueError, match="differ by layer"):
        m.kv_bits()
    # exact accounting: records at each layer's bits, one map per layer
    data = expected_bytes(m, k, v)
    assert lib.ek_kv_data_bytes(m._handle) == data
    assert m.kv_bytes == data + L * n * 5
    elems = n * L * m.hparams["n_head_kv"] * m.hparams["head_dim"] * 2
    assert m.kv_avg_bits == pytest.approx(8.0 * data / elems, rel=1e-12)
    # all layers at once on a split store, then truncation keeps each layer's bits
    assert set_layer_bits(m, -1, [5], 8, 8) == 0
    want_k[:, 5] = want_v[:, 5] = 8
    assert set_layer_bits(m, 2, [5, 20], 3, 16) == 0
    want_k[2, [5, 20]], want_v[2, [5, 20]] = 3, 16
    np.testing.assert_array_equal(m.kv_bits(per_layer=True)[0], want_k)
    m._truncate(10)
    k, v = m.kv_bits(per_layer=True)
    np.testing.assert_array_equal(k, want_k[:, :10])
    np.testing.assert_array_equal(v, want_v[:, :10])
    assert m.kv_bytes == expected_bytes(m, k, v) + L * 10 * 5
    # an empty context goes back to one shared map
    m.reset()
    m.logits(rand_ids(m, 8, 2))
    assert lib.ek_kv_layer_maps(m._handle) == 1 and m.kv_bytes == expected_bytes(m, *m.kv_bits(per_layer=True)) + 40


class _OverriddenKV(ReferenceModel):
    """The float64 reference whose attention, in each layer, sees the given keys and values at the
    cached positions (the store's dequantized records): dequantize-then-attend, per layer."""

    def __init__(self, path, kv):
        super().__init__(path)
        self.kv, self.layer = kv, 0

    def attention(self, q, k, v):
        n_c = self.kv.shape[1]
        k, v = k.copy(), v.copy()
        k[:n_c] = self.kv[self.layer, :, 0].reshape(n_c, *k.shape[1:])
        v[:n_c] = self.kv[self.layer, :, 1].reshape(n_c, *v.shape[1:])
        self.layer += 1
        return super().attention(q, k, v)


@pytest.mark.parametrize("bits", [
    {0: (2, 2)},                      # layer 0 coarse, the rest 16 bits
    {1: (4, 3), 2: (2, 16)},          # two layers differ
    {0: (8, 4), 1: (3, 8), 2: (4, 4)},  # every layer its own
], ids=["layer0-2bit", "two-layers", "all-differ"])
def test_each_layer_attends_to_its_own_records(open_model, f32_path, bits):
    """A decode step on a per-layer mixed cache gives the reference's logits when each layer of
    the reference attends to that layer's dequantized records; the bound is 20x smaller than the
    difference the quantization makes, so a layer reading another layer's records fails."""
    m = open_model(f32_path)
    n = 40
    ids = rand_ids(m, n + 1, 3)
    m.logits(ids[:n])
    fp16_kv = kv_read_all(m)
    r = np.random.default_rng(4)
    for layer, (kb, vb) in bits.items():
        pos = np.sort(r.choice(n, n // 2, replace=False))  # half the positions, so pools mix
        assert set_layer_bits(m, layer, pos, kb, vb) == 0
    kv = kv_read_all(m)
    out = np.empty(m.vocab_size, np.float32)
    m._eval(ids[n:n + 1], lib.EK_LOGITS_LAST, out)  # one decode step on this cache
    want = _OverriddenKV(f32_path, kv).logits(ids)[-1]
    fp16_ref = _OverriddenKV(f32_path, fp16_kv).logits(ids)[-1]
    scale = np.abs(want).max()
    err = np.abs(out - want).max()
    effect = np.abs(want - fp16_ref).max()
    bound = 2e-4 * scale  # float32 activations, fp16 new records and the int8-rounded query (measured: <= 1.1e-5)
    assert err <= bound, (err, scale)
    assert effect >= 20 * bound, (effect, bound)


def test_layer_uniform_policies_are_bit_identical(open_model, tiny_path):
    """A per-layer policy that does not vary by layer stores and computes exactly what the plain
    policy does, with one shared map (no extra map bytes)."""
    path = tiny_path("llama", "Q8_0", n_layer=3)
    ids = None
    res = {}
    for kv in ("int4", "layers:int4", "layers:int4,1=int4", "layers:int4,0-2=int4"):
        m = open_model(path, kv=kv)
        ids = rand_ids(m, 30, 5) if ids is None else ids
        lg = m.logits(ids)
        assert lib.ek_kv_layer_maps(m._handle) == 1
        res[kv] = (lg, kv_read_all(m), m.kv_bytes)
    for kv, (lg, kvr, nb) in res.items():
        assert same_bits(lg, res["int4"][0]), kv
        assert same_bits(kvr, res["int4"][1]), kv
        assert nb == res["int4"][2], kv


def test_layer_policy_bits_and_average(open_model, tiny_path):
    path = tiny_path("llama", "Q8_0", n_layer=3)
    m = open_model(path, kv="layers:sink:int4,0=k8v4,2=k3v2")
    n = 25
    m.logits(rand_ids(m, n, 6))
    k, v = m.kv_bits(per_layer=True)
    want_k = np.array([[8] * n, [8] + [4] * (n - 1), [8] + [3] * (n - 1)])  # the sink key at >= 8 bits
    want_v = np.array([[4] * n, [4] * n, [2] * n])
    np.testing.assert_array_equal(k, want_k)
    np.testing.assert_array_equal(v, want_v)
    data = expected_bytes(m, k, v)
    assert lib.ek_kv_data_bytes(m._handle) == data
    assert m.kv_bytes == data + 3 * n * 5
    elems = n * 3 * m.hparams["n_head_kv"] * m.hparams["head_dim"] * 2
    assert m.kv_avg_bits == pytest.approx(8.0 * data / elems, rel=1e-12)


@pytest.mark.parametrize("spec,msg", [
    ("layers:", "starts with a static policy"),
    ("layers:0=int8", "starts with a static policy"),
    ("layers:adaptive", "starts with a static policy"),
    ("layers:int4,x=int8", "LAYER=P"),
    ("layers:int4,0=k5v4", "unknown KV policy .k5v4."),
    ("layers:int4,3-1=int8", "is empty"),
    ("layers:int4,0=int8,0-1=int4", "given twice"),
])
def test_bad_layer_specs_raise(spec, msg):
    with pytest.raises(ValueError, match=msg):
        parse_policy(spec)


def test_layer_out_of_range_raises_and_changes_nothing(open_model, tiny_path):
    path = tiny_path("llama", "Q8_0", n_layer=3)
    with pytest.raises(ValueError, match="layer 3 is out of range"):
        open_model(path, kv="layers:int4,3=int8")
    m = open_model(path)
    m.logits(rand_ids(m, 10, 7))
    with pytest.raises(ValueError, match="layer 3 is out of range"):
        m.score(rand_ids(m, 5, 8), rand_ids(m, 3, 9), kv=LayerPolicy(parse_policy("int4"), {3: (8, 8)}))
    for layer in (3, -2):
        assert set_layer_bits(m, layer, [0], 4, 4) == lib.EK_ERR_INVALID
        assert "layer" in m._c_error()
    assert set_layer_bits(m, 1, [0, 99], 4, 4) == lib.EK_ERR_INVALID  # position out of the context
    assert set_layer_bits(m, 1, [0], 5, 4) == lib.EK_ERR_INVALID
    assert lib.ek_kv_layer_maps(m._handle) == 1
    assert (m.kv_bits()[0] == 16).all()
    assert kv_set_bits(m, [0], 4, 4) == 0
