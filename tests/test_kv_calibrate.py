"""KV calibration profiles and the calibrated policy auto@B (edgekv.calibrate, issue 18)."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

import edgekv
from edgekv import calibrate
from edgekv.errors import ModelNotFoundError

T = 1  # threads


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    """An empty edgekv cache, so profiles measured here land in tmp_path/kv_profiles."""
    monkeypatch.setenv("EDGEKV_CACHE", str(tmp_path))
    return tmp_path


@pytest.fixture()
def counted(monkeypatch):
    """calibrate.calibrate with short windows, counting its calls."""
    calls = []
    real = calibrate.calibrate

    def fast(model, **kw):
        calls.append(model)
        kw.update(n_ctx=96, n_scored=16, windows=2)
        return real(model, **kw)

    monkeypatch.setattr(calibrate, "calibrate", fast)
    return calls


def _fake_profile(n_layer: int, fragile_k: int | None = None) -> dict:
    """A profile whose damage is the same in every layer except layer fragile_k's keys (x50)."""
    layers = []
    for i in range(n_layer):
        k = {"8": 0.0, "4": 0.001, "3": 0.003, "2": 0.02}
        if i == fragile_k:
            k = {b: 50 * x for b, x in k.items()}
        layers.append({"k": k, "v": {"8": 0.0, "4": 0.001, "3": 0.003, "2": 0.02}})
    return {"format": calibrate.PROFILE_FORMAT, "version": calibrate.PROFILE_VERSION, "sha256": "x" * 64,
            "layers": layers}


def test_profile_round_trip_keyed_by_sha256(tiny_path, cache, tmp_path):
    path = tiny_path(arch="qwen2")
    prof = calibrate.calibrate(path, threads=T, progress=False, n_ctx=96, n_scored=16, windows=2)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    assert prof["sha256"] == sha and calibrate.model_sha256(path) == sha
    assert prof["text"]["sha256"] == hashlib.sha256(calibrate.CALIBRATION_TEXT.read_bytes()).hexdigest()
    n_layer = prof["n_layer"]
    assert len(prof["layers"]) == n_layer >= 2
    for row in prof["layers"]:
        assert set(row["k"]) == set(row["v"]) == {"8"} | {str(b) for b in calibrate.quantized_bits()}
        assert row["k"]["8"] == 0.0 and all(x >= 0 for x in row["k"].values())
    assert prof["edgekv"]["version"] == edgekv.__version__
    assert 2 < prof["auto_bits"] <= 16
    # the noise check and the allocator's validation are in the profile, and consistent
    assert prof["split_half"]["windows"] == [1, 1] and -1 <= prof["split_half"]["median"] <= 1
    assert prof["allocator"] in calibrate.ALLOCATORS
    rows = prof["validation"]
    budgets = sorted({r["budget"] for r in rows})
    assert budgets and set(budgets) <= set(calibrate.VALIDATE_BUDGETS)
    total = {a: sum(r["kl"] for r in rows if r["allocator"] == a and r["policy"].startswith("auto@"))
             for a in calibrate.ALLOCATORS}
    assert total[prof["allocator"]] == min(total.values())
    for b in budgets:
        mine = [r for r in rows if r["budget"] == b]
        assert {r["policy"] for r in mine} >= {f"auto@{b:g}", f"rand@{b:g}"}
        assert any(r["allocator"] is None for r in mine)  # the uniform control
    out = calibrate.save_profile(prof, calibrate.cache_profiles_dir())
    assert out == cache / "kv_profiles" / f"{sha}.json"
    assert calibrate.load_profile(out) == json.loads(json.dumps(prof))
    assert calibrate.find_profile(path, n_layer) == calibrate.load_profile(out)
    # another file (other weights) has another sha256, so no profile
    other = tiny_path(arch="qwen2", seed=7)
    assert calibrate.find_profile(other) is None
    # a profile filed under a sha256 it does not carry is refused
    wrong = dict(prof, sha256="0" * 64)
    (cache / "kv_profiles" / f"{calibrate.model_sha256(other)}.json").write_text(json.dumps(wrong))
    with pytest.raises(ValueError, match="not valid: it is for sha256"):
        calibrate.find_profile(other)


def test_first_use_calibrates_once_then_reuses_the_cache(tiny_path, cache, counted):
    path = tiny_path(arch="qwen2", seed=3)
    with edgekv.load(path, threads=T, kv="auto@6", progress=False) as m:
        assert counted == [path]
        assert (cache / "kv_profiles" / f"{calibrate.model_sha256(path)}.json").is_file()
    with edgekv.load(path, threads=T, kv="auto@5", progress=False) as m:
        m.score(list(range(3, 40)), [5, 6, 7])
    assert counted == [path]  # the second model and a second budget read the cached profile


def test_bad_input(tiny_path, cache, counted):
    with pytest.raises(ModelNotFoundError, match="no-such-model"):
        calibrate.calibrate("no-such-model", progress=False)
    path = tiny_path(arch="qwen2", seed=4)
    bad = cache / "kv_profiles" / f"{calibrate.model_sha256(path)}.json"
    bad.parent.mkdir(parents=True)
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="cannot be read"):
        edgekv.load(path, threads=T, kv="auto@4", progress=False)
    bad.write_text(json.dumps({"format": calibrate.PROFILE_FORMAT, "version": 1, "layers": [{"k": {"4": -1}}]}))
    with pytest.raises(ValueError, match="not valid"):
        edgekv.load(path, threads=T, kv="auto@4", progress=False)
    bad.unlink()
    assert counted == ["no-such-model"]  # corrupt profiles are reported, never silently measured again
    with pytest.raises(ValueError, match="below the least"):
        edgekv.load(path, threads=T, kv="auto@3.1", progress=False)
    with pytest.raises(ValueError, match="unknown KV policy"):
        edgekv.load(path, threads=T, kv="auto@", progress=False)
    with pytest.raises(ValueError, match="below the least"):
        calibrate.allocate(_fake_profile(4), 2.9, (64, 64, 32), 256)


@pytest.mark.parametrize("budget", [3.8, 4.5, 6.0])
def test_auto_accounting_is_exact_and_within_budget(tiny_path, cache, counted, budget):
    path = tiny_path(arch="qwen2", seed=5, n_layer=3)
    with edgekv.load(path, threads=T, kv=f"auto@{budget}", progress=False) as m:
        pol = m.kv_policy
        ids = list(range(3, 3 + calibrate.SINK_BUDGET_TOKENS))
        m.score(ids[:-8], ids[-8:])
        hp = m.hparams
        elems = m.n_past * hp["n_layer"] * hp["n_head_kv"] * hp["head_dim"] * 2
        with_maps = 8.0 * m.kv_bytes / elems
        assert with_maps <= budget and m.kv_avg_bits < with_maps
        k, v = m.kv_bits(per_layer=True)
        for layer, (kb, vb) in enumerate(pol.allocation):
            assert (k[layer, 1:] == kb).all() and (v[layer] == vb).all()
            assert k[layer, 0] == max(kb, calibrate.SINK_MIN_KEY_BITS)  # the sink guard
        # the store's bytes are what the allocator charged: records, scales, sink and per-layer maps
        g = m.kv_groups
        rec = np.mean([(calibrate.element_bits(kb, g) + calibrate.element_bits(vb, g)) / 2 for kb, vb in pol.allocation])
        sink = np.mean([calibrate.element_bits(max(kb, 8), g) - calibrate.element_bits(kb, g)
                        for kb, _ in pol.allocation]) / 2 / m.n_past
        maps = (8.0 * calibrate.MAP_BYTES_PER_POSITION / (2 * hp["n_head_kv"] * hp["head_dim"])
                if len(set(pol.allocation)) > 1 else 8.0 * calibrate.MAP_BYTES_PER_POSITION / elems * m.n_past)
        assert with_maps == pytest.approx(rec + sink + maps, rel=1e-9)


def test_allocator_gives_the_fragile_layer_more_bits():
    groups = (64, 64, 32)
    for fragile in (0, 5):
        prof = _fake_profile(8, fragile_k=fragile)
        k, v = calibrate.allocate(prof, 4.0, groups, 256)
        others = [b for i, b in enumerate(k) if i != fragile]
        assert k[fragile] > max(others), (fragile, k)
        assert k[fragile] >= max(v)  # the values' damage is the ordinary layers'


def test_split_half_is_the_ranking_agreement_of_the_two_halves():
    configs = [(layer, kind, 4) for layer in range(6) for kind in ("k", "v")]
    damage = np.array([0.1, 0.5, 0.2, 0.9, 0.3, 0.4, 0.8, 0.05, 0.6, 0.7, 0.15, 0.25])
    same = calibrate.split_half(configs, np.stack([damage, damage * 2, damage, damage * 3], axis=1))
    assert same["windows"] == [2, 2] and same["spearman"] == {"k4": 1.0, "v4": 1.0} and same["median"] == 1.0
    flipped = calibrate.split_half(configs, np.stack([damage, 1 / damage], axis=1))
    assert flipped["spearman"] == {"k4": -1.0, "v4": -1.0}
    assert calibrate.split_half(configs, damage[:, None]) is None  # one window has no halves


def test_damage_table_modes():
    prof = _fake_profile(8, fragile_k=2)
    prof["layers"][5]["k"]["3"] = 0.0  # a layer that looks free at 3 bits (noise)
    raw, med = calibrate.damage_table(prof, "k", "kl"), calibrate.damage_table(prof, "k", "median")
    lv = calibrate.levels(prof)
    assert raw[5, lv.index(3)] == raw[5, lv.index(4)] == 0.001  # never less damage with more bits
    assert med[5, lv.index(3)] == 0.003 and (med >= raw).all()
    assert (calibrate.damage_table(prof, "k", "floor") <= raw).all()
    assert (calibrate.damage_table(prof, "k") == calibrate.damage_table(prof, "k", calibrate.DEFAULT_ALLOCATOR)).all()
    with pytest.raises(ValueError, match="unknown KV allocator"):
        calibrate.damage_table(prof, "k", "best")
    with pytest.raises(ValueError, match="allocator"):
        calibrate.check_profile(dict(prof, allocator="best"))


def test_registry_models_ship_their_profile():
    from edgekv import registry

    for name in ("smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b", "gemma3-270m"):
        sha = registry.get_entry(name)["sha256"]
        prof = calibrate.load_profile(calibrate.SHIPPED / f"{sha}.json")
        calibrate.check_profile(prof, sha)
        assert prof["text"]["name"] == "edgekv/data/calibration.txt" and prof.get("auto_bits")
