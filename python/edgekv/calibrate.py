"""Per-model KV calibration (issue 18): how much each layer's keys and values suffer at each bit-width.

``calibrate(model)`` quantizes one layer at a time (its keys, or its values, at 4/3/2 bits) in a cache
that is otherwise int8 (the attention sink's key kept at 8 bits as ``auto@B`` keeps it) and measures,
on calibration text, the mean KL divergence of the next-token distribution from all-int8's (and the
change in log-perplexity). The reference is int8, not fp16: any quantized record, even 8-bit ones in
one layer, moves SmolLM2-135M's distribution by about as much as int8 in every layer does (KL ~0.004
nats, docs/decisions.md), a floor that does not add up over layers; against int8 each layer's number
is its own. int8 itself is measured once against fp16 (``int8_kl``). The result is a small JSON profile
keyed by the GGUF's sha256; ``auto@B`` (:class:`CalibratedPolicy`) spends a budget of B average
bits where the profile says damage per bit is largest.

Protocol: CALIB_WINDOWS windows of CALIB_CTX + CALIB_SCORED tokens (the evaluation's shape: 384
stored, 128 scored) spread over the calibration text (by default the package's ``data/calibration.txt``:
the project's own docs and GSM8K training problems, never the WikiText-2 evaluation text); the first
CALIB_CTX tokens are stored under the policy, the last CALIB_SCORED are scored in one batch (they see
each other at 16 bits, so every scored position gives a full distribution to compare; calibration ranks
layers, it does not report quality). The profile carries its own noise check: the rank agreement of the
per-layer damage between two halves of the windows (``split_half``). The allocator's damage table is
then chosen on the same windows (``validation``): each candidate's auto@B for a few budgets against the
best uniform policy and the same bit mix on random layers, by KL from fp16.

Profiles: registry models ship theirs in ``edgekv/data/kv_profiles/<sha256>.json``; any other GGUF is
calibrated on first use of a calibrated policy and cached in ``<edgekv cache>/kv_profiles/``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import time
import weakref
from pathlib import Path
from typing import Sequence

import numpy as np

from . import registry
from .kv_policy import BITS, KVPolicy, LayerPolicy, StaticPolicy, SINK_MIN_KEY_BITS

PROFILE_FORMAT = "edgekv-kv-profile"
PROFILE_VERSION = 1
DATA = Path(__file__).resolve().parent / "data"
CALIBRATION_TEXT = DATA / "calibration.txt"
SHIPPED = DATA / "kv_profiles"
CALIB_CTX, CALIB_SCORED, CALIB_WINDOWS = 384, 128, 4
AUTO_MAX_DPPL = 0.5           # kv="auto": the cheapest auto@B within this many percent of fp16
AUTO_GRID = (3.5, 3.75, 4.0, 4.5, 5.0, 6.0)
# damage tables the allocator may use (damage_table); calibration keeps the one whose auto@B does best on
# its windows at VALIDATE_BUDGETS. Profiles without "allocator" (version 1 before it) used the last.
ALLOCATORS = ("kl", "floor", "median", "floor+median")
DEFAULT_ALLOCATOR = "floor+median"
VALIDATE_BUDGETS = (3.5, 4.0, 4.5)
# auto@B holds its average at or under B once the cache holds this many tokens (the sink's 8-bit
# key is charged as if there were only this many; with fewer tokens its share is larger)
SINK_BUDGET_TOKENS = 128
MAP_BYTES_PER_POSITION = 5    # per map: a pool id (uint8) and a slot (int32), ek_kv_store_bytes


REFERENCE_BITS = 8             # the cache every per-layer measurement starts from


def quantized_bits() -> tuple[int, ...]:
    """The bit-widths below the reference's that the store takes (kv_policy.BITS), largest first."""
    return tuple(sorted((b for b in BITS if b < REFERENCE_BITS), reverse=True))


# ---- sha256 and profile files --------------------------------------------------------------------

_SHA_MEMO: dict[tuple, str] = {}


def model_sha256(path) -> str:
    """The GGUF's sha256: from the registry's verification marker when it matches the file's size
    and mtime, else hashed (and remembered for this process)."""
    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key in _SHA_MEMO:
        return _SHA_MEMO[key]
    sha = None
    try:
        doc = json.loads(path.with_name(path.name + registry.MARKER_SUFFIX).read_text(encoding="utf-8"))
        if doc.get("size") == st.st_size and doc.get("mtime_ns") == st.st_mtime_ns:
            sha = str(doc["sha256"])
    except (OSError, ValueError, KeyError, AttributeError):
        pass
    _SHA_MEMO[key] = sha = sha or registry.sha256_file(path)
    return sha


def cache_profiles_dir() -> Path:
    return registry.cache_dir() / "kv_profiles"


def profile_paths(sha: str) -> list[Path]:
    """Where a profile for this sha256 may be: shipped in the package, then the user's cache."""
    return [SHIPPED / f"{sha}.json", cache_profiles_dir() / f"{sha}.json"]


def check_profile(doc, sha: str | None = None, n_layer: int | None = None, where: str = "profile") -> dict:
    """doc if it is a well-formed profile (for this sha256 and layer count when given), else ValueError."""
    def bad(why: str):
        raise ValueError(f"KV calibration profile {where} is not valid: {why}; delete it, or run "
                         "`edgekv calibrate MODEL --force` to measure it again")
    if not isinstance(doc, dict) or doc.get("format") != PROFILE_FORMAT:
        bad(f"format is not {PROFILE_FORMAT!r}")
    if doc.get("version") != PROFILE_VERSION:
        bad(f"version {doc.get('version')!r}, expected {PROFILE_VERSION}")
    if sha is not None and doc.get("sha256") != sha:
        bad(f"it is for sha256 {doc.get('sha256')!r}, not {sha}")
    layers = doc.get("layers")
    if not isinstance(layers, list) or not layers:
        bad("no per-layer table")
    if n_layer is not None and len(layers) != n_layer:
        bad(f"{len(layers)} layers, the model has {n_layer}")
    for i, row in enumerate(layers):
        for kind in ("k", "v"):
            t = row.get(kind) if isinstance(row, dict) else None
            if not isinstance(t, dict) or not t:
                bad(f"layer {i} has no {kind!r} table")
            for b, x in t.items():
                if not (b.isdigit() and int(b) in BITS and isinstance(x, (int, float)) and math.isfinite(x) and x >= 0):
                    bad(f"layer {i} {kind!r}: entry {b!r}: {x!r} is not a bit-width with a finite damage >= 0")
    if doc.get("allocator", DEFAULT_ALLOCATOR) not in ALLOCATORS:
        bad(f"allocator {doc.get('allocator')!r} is not one of {ALLOCATORS}")
    auto = doc.get("auto_bits")
    if auto is not None and not (isinstance(auto, (int, float)) and 2 < auto <= 16):
        bad(f"auto_bits {auto!r} is not a budget in (2, 16]")
    return doc


def load_profile(path) -> dict:
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"KV calibration profile {path} cannot be read: {e}; delete it, or run "
                         "`edgekv calibrate MODEL --force`") from None
    return check_profile(doc, where=str(path))


def find_profile(path, n_layer: int | None = None) -> dict | None:
    sha = model_sha256(path)
    for p in profile_paths(sha):
        if p.is_file():
            return check_profile(load_profile(p), sha, n_layer, str(p))
    return None


def profile_for(model, progress: bool = False) -> dict:
    """The profile of a loaded model: shipped, cached, or measured now (and cached)."""
    prof = find_profile(model.path, model.hparams["n_layer"])
    if prof is None:
        prof = calibrate(model.path, threads=model.threads, progress=progress)
        save_profile(prof, cache_profiles_dir())
    return prof


def save_profile(prof: dict, folder) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / f"{prof['sha256']}.json"
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(prof, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, out)
    return out


# ---- measurement ---------------------------------------------------------------------------------

def _window_logprobs(m, ids: np.ndarray, n_ctx: int, policy: KVPolicy) -> np.ndarray:
    """log-softmax rows (float32) predicting ids[n_ctx:]: ids[:n_ctx] prefilled and stored under
    policy, the rest run in one batch. Reads Model internals (one prefill, one batch of logits)."""
    from ._native import lib

    ctx, cont = ids[:n_ctx], ids[n_ctx:]
    with m._lock:
        m._check_open()
        first, _ = m._prefill_prompt(ctx, policy)
        rows = np.empty((cont.size, m.vocab_size), np.float32)
        rows[0] = first
        if cont.size > 1:
            m._eval(np.ascontiguousarray(cont[:-1]), lib.EK_LOGITS_ALL, rows[1:], policy)
    rows -= rows.max(axis=1, keepdims=True)
    rows -= np.log(np.exp(rows).sum(axis=1, keepdims=True))
    return rows


def _compare(ref: np.ndarray, lp: np.ndarray, targets: np.ndarray) -> tuple[float, float]:
    """(mean KL(ref || lp) over positions, mean NLL(lp) - NLL(ref) of the targets), in nats."""
    kl = float(np.mean(np.sum(np.exp(ref) * (ref - lp), axis=1, dtype=np.float64)))
    i = np.arange(targets.size)
    return max(kl, 0.0), float(np.mean(ref[i, targets] - lp[i, targets]))


def _text_windows(m, text: str, n_windows: int, n_ctx: int, n_scored: int) -> list[np.ndarray]:
    ids = np.asarray(m.tokenize(text, special=False), np.int32)
    w = n_ctx + n_scored
    n = min(n_windows, ids.size // w)
    if n < 1:
        raise ValueError(f"the calibration text has {ids.size} tokens; one window needs {w}")
    # spread the windows over the whole text (docs and problems alike)
    starts = np.linspace(0, ids.size - w, n).astype(int)
    return [ids[s:s + w] for s in starts]


def _edgekv_commit() -> str | None:
    try:
        r = subprocess.run(["git", "-C", str(Path(__file__).resolve().parent), "rev-parse", "HEAD"],
                           capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() or None if r.returncode == 0 else None


def calibrate(model, threads: int | None = None, progress: bool = True, text: str | None = None,
              windows: int = CALIB_WINDOWS, n_ctx: int = CALIB_CTX, n_scored: int = CALIB_SCORED,
              bits: Sequence[int] | None = None, pick_auto: bool = True) -> dict:
    """Measure a model's KV profile (see the module docstring). model: registry name or .gguf path."""
    import edgekv
    from tqdm import tqdm

    path = Path(registry.resolve(model, progress=progress))
    bits = tuple(bits) if bits is not None else quantized_bits()
    text_name = "edgekv/data/calibration.txt" if text is None else "custom"
    text = CALIBRATION_TEXT.read_text(encoding="utf-8") if text is None else text
    sha = model_sha256(path)
    t0 = time.perf_counter()
    with edgekv.load(path, threads=threads, ctx=n_ctx + n_scored, progress=False) as m:
        if m.kv_groups is None:
            raise ValueError(f"{path.name}: head_dim {m.hparams['head_dim']} cannot hold quantized KV records; "
                             "there is nothing to calibrate")
        n_layer = m.hparams["n_layer"]
        wins = _text_windows(m, text, windows, n_ctx, n_scored)
        configs = [(layer, kind, b) for layer in range(n_layer) for kind in ("k", "v") for b in bits]
        n_check = len(VALIDATE_BUDGETS) * (len(ALLOCATORS) + 2) + len(AUTO_GRID) if pick_auto else 0
        bar = tqdm(total=len(wins) * (2 + len(configs) + n_check), desc=f"calibrate {path.name}", unit="run",
                   disable=not progress, dynamic_ncols=True)
        refs, ref8, int8_kl = [], [], []
        R = REFERENCE_BITS
        r8 = StaticPolicy(R, R, sink=True)
        for w in wins:
            refs.append(_window_logprobs(m, w, n_ctx, StaticPolicy(16, 16)))
            ref8.append(_window_logprobs(m, w, n_ctx, r8))
            int8_kl.append(_compare(refs[-1], ref8[-1], w[n_ctx:])[0])
            bar.update(2)
        kl = np.zeros((len(configs), len(wins)))
        dl = np.zeros_like(kl)
        for c, (layer, kind, b) in enumerate(configs):
            pol = LayerPolicy(r8, {layer: (b, R) if kind == "k" else (R, b)})
            for i, (w, ref) in enumerate(zip(wins, ref8)):
                kl[c, i], dl[c, i] = _compare(ref, _window_logprobs(m, w, n_ctx, pol), w[n_ctx:])
                bar.update()
        table = [{"k": {str(R): 0.0}, "v": {str(R): 0.0}, "k_dlogppl": {str(R): 0.0}, "v_dlogppl": {str(R): 0.0}}
                 for _ in range(n_layer)]
        for c, (layer, kind, b) in enumerate(configs):
            table[layer][kind][str(b)] = float(kl[c].mean())
            table[layer][kind + "_dlogppl"][str(b)] = float(dl[c].mean())
        prof = {
            "format": PROFILE_FORMAT, "version": PROFILE_VERSION, "model": path.name, "sha256": sha,
            "n_layer": n_layer, "n_head_kv": m.hparams["n_head_kv"], "head_dim": m.hparams["head_dim"],
            "kv_layout": m.kv_layout, "metric": f"mean KL(int{R} || one layer quantized) per scored token, nats",
            "text": {"name": text_name, "sha256": hashlib.sha256(text.encode()).hexdigest(),
                     "windows": len(wins), "context": n_ctx, "scored": n_scored},
            "reference": f"int{R}", "int8_kl": float(np.mean(int8_kl)), "bits": [R, *bits], "layers": table,
            "split_half": split_half(configs, kl),
            "edgekv": {"version": edgekv.__version__, "commit": _edgekv_commit()},
        }
        if pick_auto:
            _validate_allocators(m, prof, wins, refs, n_ctx, bar)
            _auto_curve(m, prof, wins, refs, n_ctx, bar)
        bar.close()
    prof["seconds"] = round(time.perf_counter() - t0, 1)
    return check_profile(prof, sha, n_layer)


def _ranks(x: np.ndarray) -> np.ndarray:
    return np.argsort(np.argsort(x, kind="stable"), kind="stable").astype(float)


def _spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    ra, rb = _ranks(a), _ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return None
    return float(np.corrcoef(ra, rb)[0, 1])


def split_half(configs, kl: np.ndarray) -> dict | None:
    """The profile's own noise check: Spearman correlation, across layers, of the damage measured on the
    even windows against the odd ones, per (keys or values, bits), and its median. Near 1: the ranking
    the allocator uses is the text's, not the noise's; near 0: it is chance."""
    if kl.shape[1] < 2:
        return None
    a, b = kl[:, 0::2].mean(axis=1), kl[:, 1::2].mean(axis=1)
    out = {}
    for kind in ("k", "v"):
        for bits in sorted({c[2] for c in configs}, reverse=True):
            idx = [i for i, c in enumerate(configs) if c[1] == kind and c[2] == bits]
            rho = _spearman(a[idx], b[idx])
            if rho is not None:
                out[f"{kind}{bits}"] = round(rho, 3)
    vals = list(out.values())
    return {"windows": [int(kl.shape[1] + 1) // 2, int(kl.shape[1]) // 2], "spearman": out,
            "median": round(float(np.median(vals)), 3) if vals else None}


def _mean_kl(m, pol, wins, refs, n_ctx: int, bar=None) -> tuple[float, float, float]:
    """(mean KL from fp16, Δ perplexity % against fp16, average bits with maps) of pol on the windows."""
    kls, dls, bts = [], [], []
    for w, ref in zip(wins, refs):
        kl, dl = _compare(ref, _window_logprobs(m, w, n_ctx, pol), w[n_ctx:])
        kls.append(kl)
        dls.append(dl)
        bts.append(8.0 * m.kv_bytes / (m.n_past * _elems_per_position(m)))
        if bar is not None:
            bar.update()
    return float(np.mean(kls)), 100 * float(np.expm1(np.mean(dls))), float(np.mean(bts))


def permuted_policy(alloc: list[tuple[int, int]], seed: int = 0) -> LayerPolicy:
    """rand@B, the control: the same per-layer (key, value) bits on randomly permuted layers."""
    rng = np.random.default_rng(seed)
    for _ in range(100):  # a permutation that moves the mix (unless every layer has the same bits)
        perm = rng.permutation(len(alloc))
        if any(alloc[i] != alloc[j] for i, j in enumerate(perm)) or len(set(alloc)) == 1:
            break
    mixed = {layer: alloc[perm[layer]] for layer in range(len(alloc))}
    return LayerPolicy(StaticPolicy(*mixed[0], sink=True), mixed)


UNIFORM = ((8, 8), (6, 4), (4, 4), (4, 3), (3, 3), (3, 2))  # the uniform controls, most bits first


def best_uniform(budget: float, groups) -> tuple[int, int] | None:
    """The uniform (key, value) bits with the most bits at or under budget (records and scales)."""
    for k, v in UNIFORM:
        if (element_bits(k, groups) + element_bits(v, groups)) / 2 <= budget + 1e-9:
            return k, v
    return None


def _validate_allocators(m, prof: dict, wins, refs, n_ctx: int, bar=None) -> None:
    """prof["allocator"]: of ALLOCATORS, the damage table whose auto@B has the least KL from fp16 summed
    over VALIDATE_BUDGETS on the calibration windows; prof["validation"]: every candidate's KL and
    Δ perplexity there, with the best uniform policy and the chosen mix on random layers (rand@B)."""
    hp = m.hparams
    epl = 2 * hp["n_head_kv"] * hp["head_dim"]
    floor = min_budget(prof, m.kv_groups, epl)
    rows, seen, total = [], {}, {a: 0.0 for a in ALLOCATORS}
    budgets = [b for b in VALIDATE_BUDGETS if b >= floor]
    for budget in budgets:
        n_new = 0
        for mode in ALLOCATORS:
            alloc = list(zip(*allocate(prof, budget, m.kv_groups, epl, mode=mode)))
            key = (budget, tuple(alloc))
            if key not in seen:
                pol = LayerPolicy(StaticPolicy(*alloc[0], sink=True), dict(enumerate(alloc)))
                seen[key] = _mean_kl(m, pol, wins, refs, n_ctx, bar)
                n_new += 1
            kl, dppl, bits = seen[key]
            total[mode] += kl
            pred = sum(damage_table(prof, kind, "kl")[layer, levels(prof).index(b)]
                       for layer, kv in enumerate(alloc) for kind, b in zip("kv", kv))
            rows.append({"budget": budget, "policy": f"auto@{budget:g}", "allocator": mode, "kl": kl,
                         "dppl_pct": dppl, "avg_bits": bits, "additive_kl": float(pred + prof["int8_kl"])})
        if bar is not None:
            bar.update((len(ALLOCATORS) - n_new) * len(wins))
    best = min(ALLOCATORS, key=lambda a: (total[a], ALLOCATORS.index(a))) if budgets else DEFAULT_ALLOCATOR
    for budget in budgets:
        alloc = list(zip(*allocate(prof, budget, m.kv_groups, epl, mode=best)))
        for name, pol in (("rand", permuted_policy(alloc)),
                          ("uniform", StaticPolicy(*best_uniform(budget, m.kv_groups)))):
            kl, dppl, bits = _mean_kl(m, pol, wins, refs, n_ctx, bar)
            rows.append({"budget": budget, "policy": pol.name if name == "uniform" else f"rand@{budget:g}",
                         "allocator": best if name == "rand" else None, "kl": kl, "dppl_pct": dppl, "avg_bits": bits})
    prof["allocator"] = best
    prof["validation"] = rows


def _auto_curve(m, prof: dict, wins, refs, n_ctx: int, bar=None) -> None:
    """prof["auto_curve"] and prof["auto_bits"]: Δ perplexity of auto@B against fp16 on the windows."""
    curve = []
    hp = m.hparams
    floor = min_budget(prof, m.kv_groups, 2 * hp["n_head_kv"] * hp["head_dim"])
    for budget in AUTO_GRID:
        if budget < floor:
            if bar is not None:
                bar.update(len(wins))
            continue
        pol = CalibratedPolicy(budget)
        pol.prepare(m, profile=prof)
        kl, dppl, bits = _mean_kl(m, pol, wins, refs, n_ctx, bar)
        curve.append({"budget": budget, "avg_bits": bits, "kl": kl, "dppl_pct": dppl,
                      "policy": pol.layer_policy.name})
    prof["auto_curve"] = curve
    prof["auto_text"] = {"windows": len(wins), "context": n_ctx, "scored": int(wins[0].size - n_ctx)}
    prof["auto_bits"] = pick_auto_budget(curve)


def refresh_auto(prof: dict, path, threads: int | None = None, progress: bool = True) -> dict:
    """Pick prof's allocator and auto budget again (after an allocator change), on the same calibration text."""
    import edgekv
    from tqdm import tqdm

    t = prof.get("auto_text") or {"windows": CALIB_WINDOWS, "context": CALIB_CTX, "scored": CALIB_SCORED}
    with edgekv.load(path, threads=threads, ctx=t["context"] + t["scored"], progress=False) as m:
        wins = _text_windows(m, CALIBRATION_TEXT.read_text(encoding="utf-8"), t["windows"], t["context"], t["scored"])
        n_check = len(VALIDATE_BUDGETS) * (len(ALLOCATORS) + 2) + len(AUTO_GRID)
        bar = tqdm(total=len(wins) * (1 + n_check), desc=f"auto budget {Path(path).name}", unit="run",
                   disable=not progress, dynamic_ncols=True)
        refs = []
        for w in wins:
            refs.append(_window_logprobs(m, w, t["context"], StaticPolicy(16, 16)))
            bar.update()
        _validate_allocators(m, prof, wins, refs, t["context"], bar)
        _auto_curve(m, prof, wins, refs, t["context"], bar)
        bar.close()
    return check_profile(prof, prof["sha256"], prof["n_layer"])


def pick_auto_budget(curve: list[dict], max_dppl: float = AUTO_MAX_DPPL) -> float:
    """The smallest budget within max_dppl% of fp16 whose next larger budget is too (one point alone is
    within the calibration windows' noise, about a percent on 128 tokens); 16 (int8 in every layer,
    the allocator's ceiling) when there is none."""
    rows = sorted(curve, key=lambda r: r["budget"])
    for i, row in enumerate(rows):
        if all(r["dppl_pct"] <= max_dppl for r in rows[i:i + 2]):
            return row["budget"]
    return 16.0


# ---- auto@B: the calibrated static policy --------------------------------------------------------

def _elems_per_position(m) -> int:
    hp = m.hparams
    return hp["n_layer"] * hp["n_head_kv"] * hp["head_dim"] * 2


def element_bits(b: int, groups: tuple[int, int, int]) -> float:
    """Bits per stored element of a b-bit record: the codes and an fp16 scale and minimum per group."""
    if b == 16:
        return 16.0
    g8, g4, g2 = groups
    g = g8 if b >= 8 else g2 if b <= 2 else g4
    return b + 32.0 / g


def noise_floor(prof: dict) -> float:
    """The KL any one-layer change costs whatever its bits: the median, over layers, keys and values, of
    the highest measured level below the reference (4 bits). It does not add over layers (SmolLM2-135M:
    about 0.0025 nats for one layer at 4 bits, 0.0044 for int8 in all 30), so it is not damage."""
    lv = levels(prof)
    if len(lv) < 2:
        return 0.0
    b = str(lv[-2])
    return float(np.median([row[kind][b] for row in prof["layers"] for kind in ("k", "v")]))


def damage_table(prof: dict, kind: str, mode: str | None = None) -> np.ndarray:
    """(n_layer, len(levels)) damage per layer at each level of levels(), made non-increasing in bits
    (fewer bits never less damage than more). mode (ALLOCATORS; default: the profile's "allocator"):
    "kl", the measured KL; "floor", the KL above the noise floor (noise_floor); "median", at least the
    median layer's at the same bits (one noisy window once made 2-bit keys look free in 5 SmolLM2 layers
    that cost +8.7% perplexity together); "floor+median", both."""
    mode = mode or prof.get("allocator", DEFAULT_ALLOCATOR)
    if mode not in ALLOCATORS:
        raise ValueError(f"unknown KV allocator {mode!r}; one of {ALLOCATORS}")
    lv = levels(prof)
    d = np.zeros((len(prof["layers"]), len(lv)))
    for i, row in enumerate(prof["layers"]):
        for j, b in enumerate(lv):
            d[i, j] = float(row[kind][str(b)])
    top = len(lv) - 1  # the reference level: 0 by definition
    if "floor" in mode:
        d[:, :top] = np.maximum(d[:, :top] - noise_floor(prof), 0.0)
    if "median" in mode:
        d = np.maximum(d, np.median(d, axis=0, keepdims=True))
    return np.maximum.accumulate(d[:, ::-1], axis=1)[:, ::-1]


def levels(prof: dict) -> list[int]:
    """Bit-widths the allocator may choose: those the profile measured (the reference's included); ascending."""
    common = set(map(int, prof["layers"][0]["k"])) & set(map(int, prof["layers"][0]["v"]))
    return sorted(b for b in common if b in BITS)


def min_budget(prof: dict, groups: tuple[int, int, int], elems_per_layer_position: int,
               sink_tokens: int = SINK_BUDGET_TOKENS) -> float:
    """The least average bits allocate() can reach: the fewest bits in every layer."""
    lo = levels(prof)[0]
    kc, vc = element_bits(lo, groups), element_bits(lo, groups)
    sink = max(element_bits(SINK_MIN_KEY_BITS, groups) - kc, 0.0) / sink_tokens
    return (kc + sink + vc) / 2 + 8.0 * MAP_BYTES_PER_POSITION / elems_per_layer_position


def allocate(prof: dict, budget: float, groups: tuple[int, int, int], elems_per_layer_position: int,
             sink_tokens: int = SINK_BUDGET_TOKENS, mode: str | None = None) -> tuple[list[int], list[int]]:
    """Per-layer (key bits, value bits) with average bits <= budget, scales, per-layer maps and the
    sink's 8-bit key (charged at sink_tokens cached tokens) included: greedy by damage reduction per
    bit, from every layer at the fewest bits. ValueError when even that does not fit."""
    lv = levels(prof)
    n_layer = len(prof["layers"])
    cost = np.array([element_bits(b, groups) for b in lv])
    sink_k = element_bits(SINK_MIN_KEY_BITS, groups)
    dk, dv = damage_table(prof, "k", mode), damage_table(prof, "v", mode)
    maps = 8.0 * MAP_BYTES_PER_POSITION / elems_per_layer_position  # one map per layer, averaged

    # each level's share of the average, per layer: keys pay the sink's extra bits, values do not
    share = {"k": (cost + np.maximum(sink_k - cost, 0.0) / sink_tokens) / (2 * n_layer), "v": cost / (2 * n_layer)}
    idx = {"k": np.zeros(n_layer, int), "v": np.zeros(n_layer, int)}
    dmg = {"k": dk, "v": dv}
    spent = n_layer * (share["k"][0] + share["v"][0]) + maps
    if spent > budget + 1e-9:
        raise ValueError(f"KV budget {budget:g} bits is below the least this model's cache can hold: {spent:.3f} "
                         f"bits per element ({lv[0]}-bit keys and values in every layer, their scales, the "
                         f"per-layer maps and the sink's {SINK_MIN_KEY_BITS}-bit key)")
    while True:
        best = None  # (damage saved per bit, kind, layer, new level, bits spent)
        for kind in ("k", "v"):
            for layer in range(n_layer):
                i = idx[kind][layer]
                for j in range(i + 1, len(lv)):
                    spend = share[kind][j] - share[kind][i]
                    if spent + spend > budget + 1e-9:
                        continue
                    gain = (dmg[kind][layer, i] - dmg[kind][layer, j]) / spend
                    if gain > 0 and (best is None or gain > best[0]):
                        best = (gain, kind, layer, j, spend)
        if best is None:
            break
        _, kind, layer, j, spend = best
        idx[kind][layer] = j
        spent += spend
    ki, vi = idx["k"], idx["v"]
    return [lv[j] for j in ki], [lv[j] for j in vi]


class CalibratedPolicy(KVPolicy):
    """``auto@B``: static bits per layer from the model's calibration profile, average <= B bits
    (scales, maps and the sink guard included); ``auto``: B = the profile's auto_bits, the cheapest
    budget within AUTO_MAX_DPPL% of fp16 on the calibration text. The first token's key is kept at
    SINK_MIN_KEY_BITS in every layer."""

    def __init__(self, target_bits: float | None = None, window: int = 0):
        if target_bits is not None and not (isinstance(target_bits, (int, float)) and math.isfinite(target_bits)):
            raise ValueError(f"auto@B: B must be a number of bits, got {target_bits!r}")
        self.target_bits = None if target_bits is None else float(target_bits)
        self.window = window
        self.name = "auto" if target_bits is None else f"auto@{target_bits:g}"
        self.layer_policy: LayerPolicy | None = None
        self._for = None  # (sha256, groups) the allocation was made for
        self._bound = None  # weakref to the model bind() last prepared for

    def prepare(self, model, profile: dict | None = None) -> None:
        """Allocate bits for this model (its profile loaded, or measured and cached, first)."""
        key = (model_sha256(model.path), model.kv_groups)
        if self._for == key and profile is None:
            return
        if model.kv_groups is None:
            raise ValueError(f"KV policy {self.name!r} needs quantized KV records; this model's cache can only be fp16")
        prof = profile or profile_for(model)
        budget = self.target_bits if self.target_bits is not None else prof.get("auto_bits")
        if budget is None:
            raise ValueError(f"the KV profile of {model.path.name} has no auto_bits: run `edgekv calibrate` on it")
        hp = model.hparams
        k, v = allocate(prof, budget, model.kv_groups, 2 * hp["n_head_kv"] * hp["head_dim"])
        self.allocation = list(zip(k, v))
        self.budget = float(budget)
        over = {layer: kv for layer, kv in enumerate(self.allocation)}
        self.layer_policy = LayerPolicy(StaticPolicy(*self.allocation[0], sink=True), over, window=self.window)
        self._for = key

    def bind(self, model) -> None:
        # at every decode step: a loaded model's file and groups do not change, so the model it was
        # prepared for last is enough (prepare hashes the path's stat, ~50 us)
        if self._bound is None or self._bound() is not model:
            self.prepare(model)
            self._bound = weakref.ref(model)

    def check_layers(self, n_layer: int) -> None:
        if self.layer_policy is not None:
            self.layer_policy.check_layers(n_layer)

    def decide(self, features):
        raise TypeError(f"KV policy {self.name!r} decides per layer: use decide_layers(features, n_layer)")

    def decide_layers(self, features, n_layer: int):
        if self.layer_policy is None:
            raise ValueError(f"KV policy {self.name!r} has not been prepared for a model")
        return self.layer_policy.decide_layers(features, n_layer)
