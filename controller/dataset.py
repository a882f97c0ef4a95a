"""Training rows for the controller: token features as a policy sees them, and oracle labels.

Windows come from the training text only (controller/corpus.py: WikiText-2 training
articles, GSM8K problems). Window k (drawn by a seeded RNG) has a context length P
(cycling through CONTEXTS) and holds P + T tokens; a few positions j < P are labeled
(always 0, 1, 2 -- the attention-sink region -- plus uniform draws), each with the exact
oracle of controller/oracle.py. Each labeled token gives two feature rows, the two ways
a W=0 policy meets it:

  prefill  the P tokens prefilled at once, then decided together (age = P-1-j; attention
           statistics over every later query of the batch)
  stream   the first P0 = P - min(P/2, 48) tokens prefilled and decided, the rest decoded one
           at a time and each decided right after its own step (age 0, only its own query)

Every window is cached under build/controller_cache/<model>/ (one .npz), so an
interrupted build resumes; ``--fresh`` ignores the cache.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import fields
from pathlib import Path

import numpy as np

from controller import corpus, oracle
from edgekv.kv_policy import CallablePolicy, TokenFeatures

CONTEXTS = (32, 96, 256, 448)   # P, cycled over windows
N_LABELED = 12                   # labeled positions per window (0, 1, 2 + uniform draws)
STREAM_MAX = 48                  # at most this many tokens of a window are decoded one at a time
FEATURE_FIELDS = [f.name for f in fields(TokenFeatures)]


def token_streams(model) -> list[tuple[str, np.ndarray]]:
    """(source, ids): every WikiText-2 training article, and the GSM8K problems joined."""
    train, _ = corpus.wikitext_split()
    out = [("wikitext2", np.asarray(model.tokenize(a, special=False), np.int32)) for a in train]
    gsm = "\n\n".join(corpus.gsm8k_texts())
    out.append(("gsm8k", np.asarray(model.tokenize(gsm, special=False), np.int32)))
    return out


def window_specs(streams, n: int, seed: int) -> list[dict]:
    """n windows: stream (every 5th from GSM8K), start offset, P, labeled positions."""
    rng = np.random.default_rng(seed)
    wiki = [i for i, (s, _) in enumerate(streams) if s == "wikitext2"]
    gsm = [i for i, (s, _) in enumerate(streams) if s == "gsm8k"]
    specs = []
    T = oracle.HORIZON
    for k in range(n):
        P = CONTEXTS[k % len(CONTEXTS)]
        pool = gsm if (k % 5 == 4 and gsm) else wiki
        for _ in range(100):
            si = int(rng.choice(pool))
            if streams[si][1].size >= P + T + 1:
                break
        ids = streams[si][1]
        start = int(rng.integers(0, ids.size - (P + T) + 1))
        extra = rng.choice(np.arange(3, P), size=min(N_LABELED - 3, P - 3), replace=False)
        pos = np.sort(np.r_[[0, 1, 2], extra]).astype(np.int32)
        specs.append({"k": k, "stream": si, "source": streams[si][0], "start": start, "P": P, "positions": pos.tolist()})
    return specs


def _capture_policy(store: list):
    def fn(f: TokenFeatures):
        store.append(f)
        n = len(f)
        return np.full(n, 16, np.int32), np.full(n, 16, np.int32)

    return CallablePolicy(fn, window=0, needs_features=True, name="capture")


def _gather(batches: list[TokenFeatures], positions: np.ndarray) -> dict:
    """Feature fields of the given positions, from the decisions captured (last decision wins)."""
    cols = {name: np.concatenate([getattr(b, name) for b in batches]) for name in FEATURE_FIELDS}
    where = {int(p): i for i, p in enumerate(cols["positions"])}
    idx = np.array([where[int(p)] for p in positions])
    return {name: v[idx] for name, v in cols.items()}


def window_features(model, ids: np.ndarray, P: int, positions: np.ndarray) -> dict[str, dict]:
    """Feature fields of the labeled positions in the prefill and stream regimes."""
    out = {}
    store: list = []
    pol = _capture_policy(store)
    s = model.session
    s.truncate(0)
    s.eval(ids[:P], kv=pol)
    out["prefill"] = _gather(store, positions)
    store.clear()
    s.truncate(0)
    P0 = max(1, P - min(P // 2, STREAM_MAX))
    s.eval(ids[:P0], kv=pol)
    for j in range(P0, P):
        s.eval(ids[j:j + 1], kv=pol)
    out["stream"] = _gather(store, positions)
    s.truncate(0)
    return out


def build_window(model, streams, spec: dict) -> dict:
    """Features and oracle measurements of one window (a flat dict of arrays)."""
    T = oracle.HORIZON
    ids = streams[spec["stream"]][1][spec["start"]:spec["start"] + spec["P"] + T]
    pos = np.asarray(spec["positions"], np.int32)
    t0 = time.perf_counter()
    feats = window_features(model, ids, spec["P"], pos)
    t1 = time.perf_counter()
    orc = oracle.WindowOracle(model, ids, T)
    recs = [orc.measure(int(j)) for j in pos]
    t2 = time.perf_counter()
    out = {f"{reg}.{name}": v for reg, d in feats.items() for name, v in d.items()}
    for key in recs[0]:
        out[f"oracle.{key}"] = np.array([r[key] for r in recs], np.float64)
    out["meta"] = np.array(json.dumps({**spec, "runs": orc.runs, "s_features": t1 - t0, "s_oracle": t2 - t1}))
    return out


def cache_dir(repo: Path, slug: str, seed: int, layout: dict | None = None) -> Path:
    """Cache folder of one build's windows; its name hashes everything the rows depend on (the
    oracle's horizon and tolerances, the window recipe, the seed, the model's KV layout)."""
    tag = hashlib.sha256(json.dumps({"T": oracle.HORIZON, "tol": oracle.TOL, "null": oracle.NULL_SPLIT,
                                     "ctx": CONTEXTS, "n_lab": N_LABELED, "stream": STREAM_MAX,
                                     "seed": seed, **({"layout": layout} if layout else {})}).encode()).hexdigest()[:10]
    return repo / "build" / "controller_cache" / f"{slug}-{tag}"


def load_rows(windows: list[dict]) -> dict:
    """Stack cached windows into training rows: X-fields per regime, oracle arrays, groups."""
    rows: dict = {"group": [], "regime": []}
    for w in windows:
        meta = json.loads(str(w["meta"]))
        n = len(meta["positions"])
        for reg in ("prefill", "stream"):
            for name in FEATURE_FIELDS:
                rows.setdefault(f"f.{name}", []).append(w[f"{reg}.{name}"])
            for key in [k for k in w if k.startswith("oracle.")]:
                rows.setdefault(key, []).append(w[key])
            rows["group"].append(np.full(n, meta["k"]))
            rows.setdefault("P", []).append(np.full(n, meta["P"]))
            rows["regime"].append(np.full(n, reg))
    return {k: np.concatenate(v) for k, v in rows.items()}


def features_of(rows: dict) -> TokenFeatures:
    return TokenFeatures(**{name: rows[f"f.{name}"] for name in FEATURE_FIELDS})
