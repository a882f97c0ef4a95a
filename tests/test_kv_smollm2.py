"""KV policies end to end on the real SmolLM2-135M (head_dim 64): the README's policy table holds
per position and on average, and kv="adaptive@3.5" runs with the controller shipped in the package.

The text is a short passage written for this test (no data files needed).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import edgekv
from conftest import THREADS
from edgekv import controller as ctl
from edgekv.model import KV_DECIDE_BATCH

TEXT = (
    "The harbour town woke slowly that winter. Fishing boats that had spent the night on the water came "
    "back one by one, their decks stacked with crates of cod and herring, and the gulls followed them in, "
    "circling and crying above the cranes. On the quay, the auction house opened its doors at six. Buyers "
    "from the restaurants inland stood in small groups, stamping their feet against the cold and talking "
    "about prices, about the weather, about the new road that was supposed to bring tourists in the summer. "
    "Nobody believed the road would be finished on time. The mayor had promised it three years in a row, and "
    "each spring the diggers arrived, worked for a month, and left again when the money ran out. Still, the "
    "town had changed. The old cannery had become a museum, the school had a new roof, and the bakery on the "
    "corner now sold coffee in paper cups to people who took photographs of the lighthouse. Some of the older "
    "fishermen grumbled about it, but their grandchildren worked in the cafes and the hotel, and nobody wanted "
    "them to leave for the city the way so many had before."
)
N_CONT = 64  # scored continuation tokens (the rest of TEXT is the context)

# The README's table: policy -> (key bits, value bits, bits per element at head_dim 64, scales included)
README_TABLE = {
    "fp16": (16, 16, 16.0),
    "int8": (8, 8, 8.5),
    "int4": (4, 4, 4.5),
    "k4v3": (4, 3, 4.0),
    "k4v2": (4, 2, 3.75),
    "int3": (3, 3, 3.5),
    "int2": (2, 2, 3.0),
}


@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    m = edgekv.load(str(smollm2_path), threads=THREADS, ctx=512)
    assert m.hparams["head_dim"] == 64 and m.kv_groups == (64, 64, 32)
    yield m
    m.close()


@pytest.fixture(scope="module")
def text_ids(smollm2):
    ids = smollm2.tokenize(TEXT)
    assert len(ids) > 200
    return ids


def test_the_smollm2_controller_ships_in_the_package(smollm2):
    """The package carries a controller for SmolLM2 and it loads: its absence is a failure here,
    never a skip (the unit tests in test_controller.py run over whatever ships)."""
    shipped = sorted(ctl.DATA_DIR.glob("controller_*.json"))
    assert [p.name for p in shipped] == ["controller_smollm2-135m.json"]
    art = ctl.find_artifact(smollm2)
    assert art.path.stem == "controller_smollm2-135m"
    meta = json.loads(shipped[0].read_text())
    assert meta["kv_groups"] == list(smollm2.kv_groups)


@pytest.mark.parametrize("spec", list(README_TABLE))
def test_static_policy_bits_match_the_readme_table(smollm2, text_ids, spec):
    """Every position holds the policy's key and value bits, and kv_avg_bits (from the C store's
    byte count) is the README's figure, under score() and under generate()."""
    want_k, want_v, want_avg = README_TABLE[spec]
    smollm2.score(text_ids[:-N_CONT], text_ids[-N_CONT:], kv=spec, sequential=False)
    k, v = smollm2.kv_bits()
    assert k.size == len(text_ids) - 1
    np.testing.assert_array_equal(k, want_k)
    np.testing.assert_array_equal(v, want_v)
    assert smollm2.kv_avg_bits == pytest.approx(want_avg, abs=1e-12)
    assert ctl.average_bits(k, v, smollm2.kv_groups) == pytest.approx(want_avg, abs=1e-12)
    # generation: a static policy decides each token as soon as it is cached (window 0)
    smollm2.generate(text_ids[:40], max_tokens=12, temperature=0, kv=spec)
    k, v = smollm2.kv_bits()
    assert k.size == 40 + 11
    np.testing.assert_array_equal(k, want_k)
    np.testing.assert_array_equal(v, want_v)
    assert smollm2.kv_avg_bits == pytest.approx(want_avg, abs=1e-12)


def test_sink_int3_bits(smollm2, text_ids):
    """sink:int3: position 0's key at 8 bits, the rest int3; average 3.5 + (8.5 - 3.5) / (2 n)."""
    smollm2.score(text_ids[:-N_CONT], text_ids[-N_CONT:], kv="sink:int3", sequential=False)
    k, v = smollm2.kv_bits()
    n = k.size
    np.testing.assert_array_equal(k, np.where(np.arange(n) == 0, 8, 3))
    np.testing.assert_array_equal(v, 3)
    assert smollm2.kv_avg_bits == pytest.approx(3.5 + (8.5 - 3.5) / (2 * n), abs=1e-12)


TARGET = 3.5


def test_adaptive_end_to_end(smollm2, text_ids):
    """kv="adaptive@3.5" with the shipped artifact on real text: the cache averages within 0.1 bit
    of the target, position 0's key is at 8 bits or more, the widths are routed (not one static
    pair), and the same call decides the same bits again."""
    spec = f"adaptive@{TARGET}"
    ctx, cont = text_ids[:-N_CONT], text_ids[-N_CONT:]
    lp = smollm2.score(ctx, cont, kv=spec, sequential=False)
    assert np.isfinite(lp).all()
    k, v = smollm2.kv_bits()
    assert k.size == len(text_ids) - 1  # score() decides every cached token (window 0)
    assert k[0] >= 8, f"position 0's key at {k[0]} bits"
    assert abs(smollm2.kv_avg_bits - TARGET) <= 0.1, smollm2.kv_avg_bits
    assert smollm2.kv_avg_bits == pytest.approx(ctl.average_bits(k, v, smollm2.kv_groups), abs=1e-12)
    assert set(np.unique(k)) | set(np.unique(v)) <= {2, 3, 4, 8, 16}
    assert len({(a, b) for a, b in zip(k[1:], v[1:])}) > 1, "one (key, value) pair everywhere: no routing"
    smollm2.reset()
    smollm2.score(ctx, cont, kv=spec, sequential=False)
    k2, v2 = smollm2.kv_bits()
    np.testing.assert_array_equal(k2, k)
    np.testing.assert_array_equal(v2, v)

    # generation decides tokens KV_DECIDE_BATCH at a time: the queued tail waits at 16 bits, the
    # decided rest meets the target
    n_gen = 40
    smollm2.generate(TEXT, max_tokens=n_gen, temperature=0, kv=spec)
    k, v = smollm2.kv_bits()
    n_new = k.size - len(text_ids)  # generated tokens in the cache (the last one is not fed back)
    assert 0 < n_new < n_gen
    queued = n_new % KV_DECIDE_BATCH
    dec = np.arange(k.size) < k.size - queued
    assert (k[~dec] == 16).all() and (v[~dec] == 16).all()
    assert k[0] >= 8
    assert abs(ctl.average_bits(k[dec], v[dec], smollm2.kv_groups) - TARGET) <= 0.1
