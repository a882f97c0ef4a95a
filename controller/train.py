"""Build the learned KV bit-width controller of one model, from scratch.

    python -m controller.train [--model smollm2-135m] [--windows 56] [--seed 0] [--fresh]

1. rarity prior table (controller/rarity.py) if it is not there yet
2. training windows (controller/dataset.py): token features in both W=0 regimes and exact
   oracle damages (controller/oracle.py) of ~12 tokens per window; cached per window under
   build/controller_cache/ so an interrupted run resumes (--fresh starts over)
3. scikit-learn: logistic regression, a decision tree, gradient boosting and an MLP (128, 128),
   each predicting the key label and the value label; 5-fold cross-validation grouped by window;
   the family with the lowest mean oracle damage at equal bits (the decision rule of
   edgekv.controller at 3.5 average bits, on out-of-fold probabilities and out-of-fold damage
   tables) is kept and refit on all rows. Bits and damages are averaged with weights that undo
   the over-sampling of positions 0-2 (a uniform position within each window), not the fits.
4. skl2onnx export of both classifiers into one graph (input X, outputs k_probs, v_probs), checked
   against scikit-learn; metadata JSON (features, classes, damage tables per position bucket,
   lambda -> bits table, cross-validation results, offline baselines); a feature sample (drawn with
   the same weights) for calibrating the rule baseline

Sizing: about 4-5 s per window on this 2-core machine (one thread, other benchmarks running; oracle
~7 forward runs of 17 tokens per labeled token along the 2/3/4/8-bit ladder), so the default 56
windows take ~4 min and the whole build ~5 min (261 s and 321 s on 2026-11-29).

Writes python/edgekv/data/controller_<model>.{onnx,json} and controller_<model>_calib.npy.
Same seed, same windows, same decisions (one thread; scikit-learn seeded).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

REPO = Path(__file__).resolve().parent.parent

from controller import dataset, oracle  # noqa: E402  (controller/__init__ puts python/ on sys.path)
from controller.common import load_model, model_slug  # noqa: E402
from edgekv.controller import (DATA_DIR, FEATURE_NAMES, RulePolicy, choose_bits, effective_bits,  # noqa: E402
                               feature_matrix, model_shape, position_bucket, vocab_fingerprint)

BIT_CHOICES = oracle.CHOICES  # (2, 3, 4, 8, 16)
_GROUPS: list = [64, 64, 32]  # the model's KV groups (set in main)
TARGETS = (3.25, 3.5, 3.75, 4.0, 4.5)
SELECT_AT = 3.5


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---- model families -------------------------------------------------------------------------

def families(seed: int) -> dict:
    from sklearn.ensemble import GradientBoostingClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.tree import DecisionTreeClassifier

    return {
        "logreg": lambda: make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000)),
        "tree": lambda: DecisionTreeClassifier(max_depth=4, min_samples_leaf=40, random_state=seed),
        "gboost": lambda: GradientBoostingClassifier(n_estimators=100, max_depth=2, learning_rate=0.05,
                                                     subsample=0.8, min_samples_leaf=20, random_state=seed),
        # a few hundred labeled tokens: strong L2 and early stopping keep the (128, 128) MLP from memorizing
        "mlp": lambda: make_pipeline(StandardScaler(), MLPClassifier(hidden_layer_sizes=(128, 128), alpha=0.1,
                                                                     max_iter=200, early_stopping=True,
                                                                     n_iter_no_change=20, random_state=seed)),
    }


def _final_estimator(est):
    return est.steps[-1][1] if hasattr(est, "steps") else est


def proba_full(est, X: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """predict_proba with a column for every class of `classes` (0 for classes the fit never saw)."""
    p = est.predict_proba(X)
    out = np.zeros((X.shape[0], classes.size))
    seen = list(_final_estimator(est).classes_)
    for i, c in enumerate(seen):
        out[:, int(np.flatnonzero(classes == c)[0])] = p[:, i]
    return out


# position buckets of the damage tables: the first token, the next two, the rest of the first 16, later
DAMAGE_BUCKETS = (0, 1, 3, 16)
MIN_CELL = 8  # a (bucket, label) cell with few tokens is shrunk toward the label's overall mean


def damage_table(labels: np.ndarray, excess: np.ndarray, classes: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """(B, C, len(BIT_CHOICES)): mean excess damage at each of BIT_CHOICES of the tokens with each label,
    per position bucket (DAMAGE_BUCKETS), each cell shrunk toward the label's overall mean by MIN_CELL
    tokens."""
    t = np.zeros((classes.size, len(BIT_CHOICES)))
    for i, c in enumerate(classes):
        sel = labels == c
        if sel.any():
            t[i] = excess[sel].mean(axis=0)
    b = position_bucket(positions, DAMAGE_BUCKETS)
    out = np.repeat(t[None], len(DAMAGE_BUCKETS), axis=0)
    for bi in range(len(DAMAGE_BUCKETS)):
        for i, c in enumerate(classes):
            sel = (labels == c) & (b == bi)
            n = int(sel.sum())
            if n:
                out[bi, i] = (n * excess[sel].mean(axis=0) + MIN_CELL * t[i]) / (n + MIN_CELL)
    return out


# ---- decisions and their oracle cost --------------------------------------------------------

def decide(pk, pv, tk, tv, lam, eff):
    """Decisions of the controller's rule; tk, tv: damage tables per row, (n, C, len(BIT_CHOICES))."""
    rows = np.arange(pk.shape[0])
    return (choose_bits(pk, tk, lam, eff, rows, BIT_CHOICES), choose_bits(pv, tv, lam, eff, rows, BIT_CHOICES))


def position_weights(rows: dict) -> np.ndarray:
    """Row weights that undo the labeled-position sampling: within a window of context P, the
    three always-labeled positions 0, 1, 2 stand for one position each and the uniform draws
    for the rest, so weighted rows follow a uniform position over [0, P); windows weigh alike."""
    P = rows["P"].astype(np.float64)
    pos = rows["f.positions"].astype(np.float64)
    n_draw = np.maximum(np.minimum(dataset.N_LABELED, P) - 3, 1)
    w = np.where(pos < 3, 1.0 / P, (P - 3) / (n_draw * P))
    return w / w.mean()


def avg_bits(kb, vb, eff, w=None) -> float:
    lut = np.zeros(17)
    for b, e in eff.items():
        lut[b] = e
    return float((np.average(lut[kb], weights=w) + np.average(lut[vb], weights=w)) / 2)


def oracle_damage(kb, vb, excess, w=None) -> float:
    """Mean over tokens of the excess damage of the chosen key and value bit-widths."""
    bi = {b: i for i, b in enumerate(BIT_CHOICES)}
    ik = np.array([bi[int(b)] for b in kb])
    iv = np.array([bi[int(b)] for b in vb])
    n = np.arange(kb.size)
    return float(np.average(excess[n, 0, ik], weights=w) + np.average(excess[n, 1, iv], weights=w))


def lambda_at(pk, pv, tk, tv, eff, target: float, w=None) -> float:
    """The lambda whose decisions average `target` bits (bisection in log lambda)."""
    lo, hi = -6.0, 8.0
    for _ in range(50):
        mid = (lo + hi) / 2
        kb, vb = decide(pk, pv, tk, tv, 10 ** mid, eff)
        if avg_bits(kb, vb, eff, w) < target:
            lo = mid
        else:
            hi = mid
    return 10 ** hi


def lambda_table(pk, pv, tk, tv, eff, w=None) -> list:
    rows = []
    for e in np.linspace(-4, 6, 81):
        kb, vb = decide(pk, pv, tk, tv, 10 ** e, eff)
        rows.append([float(10 ** e), avg_bits(kb, vb, eff, w)])
    return rows


# ---- offline baselines on the labeled rows ---------------------------------------------------

def offline_baselines(X, excess, eff, target: float, seed: int, mix_k, mix_v, w, X_calib) -> dict:
    """Oracle damage of uniform, random-at-mix and rule-based decisions on the labeled rows."""
    n = X.shape[0]
    res = {}
    for name, (k, v) in {"int2": (2, 2), "int3": (3, 3), "k4v2": (4, 2), "k2v4": (2, 4), "k4v3": (4, 3),
                         "int4": (4, 4), "int8": (8, 8)}.items():
        kb, vb = np.full(n, k), np.full(n, v)
        res[name] = {"bits": avg_bits(kb, vb, eff, w), "damage": oracle_damage(kb, vb, excess, w)}
    rng = np.random.default_rng(seed)
    kb = rng.choice(list(mix_k), size=n, p=list(mix_k.values()))
    vb = rng.choice(list(mix_v), size=n, p=list(mix_v.values()))
    res["random@mix"] = {"bits": avg_bits(kb, vb, eff, w), "damage": oracle_damage(kb, vb, excess, w)}
    rule = RulePolicy.calibrated(X_calib, target, groups=tuple(k for k in _GROUPS))
    imp = (X[:, 0] > rule.tau_entropy) | (X[:, 5] > rule.tau_attn)
    kb = np.where(imp, rule.hi[0], rule.lo[0])
    vb = np.where(imp, rule.hi[1], rule.lo[1])
    res[f"rule@{target:.3f}"] = {"bits": avg_bits(kb, vb, eff, w), "damage": oracle_damage(kb, vb, excess, w)}
    # perfect knowledge of the oracle damages, same rule as the controller: the floor a classifier could reach
    lo, hi = -6.0, 8.0
    costs = np.array([eff[b] for b in BIT_CHOICES])
    for _ in range(50):
        mid = (lo + hi) / 2
        kb = np.array(BIT_CHOICES)[np.argmin(costs + 10 ** mid * excess[:, 0], axis=1)]
        vb = np.array(BIT_CHOICES)[np.argmin(costs + 10 ** mid * excess[:, 1], axis=1)]
        lo, hi = (mid, hi) if avg_bits(kb, vb, eff, w) < target else (lo, mid)
    kb = np.array(BIT_CHOICES)[np.argmin(costs + 10 ** hi * excess[:, 0], axis=1)]
    vb = np.array(BIT_CHOICES)[np.argmin(costs + 10 ** hi * excess[:, 1], axis=1)]
    res[f"oracle@{target:.3f}"] = {"bits": avg_bits(kb, vb, eff, w), "damage": oracle_damage(kb, vb, excess, w)}
    return res


# ---- ONNX ----------------------------------------------------------------------------------

def export_onnx(est_k, est_v, n_features: int, path: Path) -> None:
    """Both classifiers in one ONNX graph: input X (n, F) float32 -> k_probs, v_probs."""
    import onnx
    from onnx import compose, helper
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType

    parts = []
    for prefix, est in (("k_", est_k), ("v_", est_v)):
        m = convert_sklearn(est, initial_types=[("X", FloatTensorType([None, n_features]))],
                            options={id(_final_estimator(est)): {"zipmap": False}}, target_opset={"": 15, "ai.onnx.ml": 3})
        m = compose.add_prefix(m, prefix)
        parts.append(m)
    nodes, inits, outputs = [], [], []
    for prefix, m in zip(("k_", "v_"), parts):
        g = m.graph
        nodes.append(helper.make_node("Identity", ["X"], [g.input[0].name], name=f"{prefix}input"))
        nodes.extend(g.node)
        inits.extend(g.initializer)
        prob = [o for o in g.output if o.name.endswith("probabilities")][0]
        nodes.append(helper.make_node("Identity", [prob.name], [f"{prefix}probs"], name=f"{prefix}output"))
        outputs.append(helper.make_tensor_value_info(f"{prefix}probs", onnx.TensorProto.FLOAT, [None, None]))
    graph = helper.make_graph(nodes, "edgekv_kv_controller",
                              [helper.make_tensor_value_info("X", onnx.TensorProto.FLOAT, [None, n_features])],
                              outputs, initializer=inits)
    opsets = {}
    for m in parts:
        for o in m.opset_import:
            opsets[o.domain] = max(opsets.get(o.domain, 0), o.version)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in sorted(opsets.items())],
                              producer_name="edgekv controller.train")
    model.ir_version = min(model.ir_version, 8)
    onnx.checker.check_model(model)
    path.write_bytes(model.SerializeToString())


# ---- main ----------------------------------------------------------------------------------

def build_windows(model, slug: str, n: int, seed: int, fresh: bool) -> list[dict]:
    streams = dataset.token_streams(model)
    specs = dataset.window_specs(streams, n, seed)
    cdir = dataset.cache_dir(REPO, slug, seed, model.kv_layout)
    cdir.mkdir(parents=True, exist_ok=True)
    out = []
    bar = tqdm(specs, desc="windows (features + oracle)", unit="win", file=sys.stderr)
    for spec in bar:
        f = cdir / f"w{spec['k']:04d}.npz"
        if f.exists() and not fresh:
            out.append(dict(np.load(f, allow_pickle=False)))
            continue
        w = dataset.build_window(model, streams, spec)
        tmp = f.with_suffix(".tmp.npz")
        np.savez(tmp, **w)
        tmp.replace(f)
        out.append(w)
        meta = json.loads(str(w["meta"]))
        bar.set_postfix(P=spec["P"], oracle_s=f"{meta['s_oracle']:.1f}")
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="build the learned KV controller (see module docstring)")
    ap.add_argument("--model", default="smollm2-135m", help="registry name or GGUF path")
    ap.add_argument("--windows", type=int, default=56, help="training windows (about 12 labeled tokens each)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fresh", action="store_true", help="ignore cached windows")
    ap.add_argument("--threads", type=int, default=1, help="engine threads (1: deterministic and polite)")
    ap.add_argument("--out", default=str(DATA_DIR))
    ap.add_argument("--horizon", type=int, default=oracle.HORIZON,
                    help="oracle: following positions damage is summed over (tolerances scale with it)")
    args = ap.parse_args(argv)
    if args.horizon != oracle.HORIZON:
        if args.horizon < 1:
            raise SystemExit("--horizon must be >= 1")
        oracle.set_horizon(args.horizon)
    t_start = time.time()
    slug = model_slug(args.model)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    if not (DATA_DIR / f"rarity_{slug}.npy").exists() or args.fresh:
        from controller import rarity

        log("rarity table")
        rarity.build(args.model)

    model = load_model(args.model, threads=args.threads, ctx=1024)
    log(f"model {model.name}: {model.hparams['n_layer']} layers, KV layout {model.kv_layout}")
    windows = build_windows(model, slug, args.windows, args.seed, args.fresh)
    rows = dataset.load_rows(windows)
    feats = dataset.features_of(rows)
    X = feature_matrix(feats)
    orc = {k[len("oracle."):]: v for k, v in rows.items() if k.startswith("oracle.")}
    yk, yv = oracle.labels_from(orc)
    excess = oracle.excess_table(orc)
    groups = rows["group"]
    eff = effective_bits(model.kv_groups)
    _GROUPS[:] = list(model.kv_groups)
    positions = rows["f.positions"]
    bucket = position_bucket(positions, DAMAGE_BUCKETS)
    # weights for everything measured in bits or damage (not for fitting); the rule baseline's
    # calibration sample is drawn with the same weights
    w = position_weights(rows)
    X_calib = X[np.sort(np.random.default_rng(args.seed).choice(X.shape[0], 4000, p=w / w.sum()))].astype(np.float32)
    n_tok = int(np.unique(np.c_[groups, rows["f.positions"]], axis=0).shape[0])
    log(f"{X.shape[0]} rows ({n_tok} labeled tokens x 2 regimes), {len(windows)} windows")
    lab_k = {int(c): int((yk == c).sum()) // 2 for c in np.unique(yk)}
    lab_v = {int(c): int((yv == c).sum()) // 2 for c in np.unique(yv)}
    log(f"labels K {lab_k}  V {lab_v}")
    half = rows["regime"] == "prefill"  # one row per labeled token for oracle summaries
    null_stats = {"null_mean": float(np.mean(orc["null"][half])),
                  "k8_mean_when_measured": float(np.nanmean(orc["k8"][half])) if np.isfinite(orc["k8"][half]).any() else None,
                  "excess_k2_median": float(np.median(excess[half, 0, 0])),
                  "excess_v2_median": float(np.median(excess[half, 1, 0]))}

    classes_k = np.array(sorted(set(yk.tolist())))
    classes_v = np.array(sorted(set(yv.tolist())))

    # -- cross-validation of the four families
    from sklearn.metrics import log_loss
    from sklearn.model_selection import GroupKFold

    folds = list(GroupKFold(n_splits=5).split(X, yk, groups))
    fams = families(args.seed)
    cv = {}
    oof = {}
    for name, make in fams.items():
        t0 = time.time()
        pk = np.zeros((X.shape[0], classes_k.size))
        pv = np.zeros((X.shape[0], classes_v.size))
        for tr, te in tqdm(folds, desc=f"cv {name}", leave=False, file=sys.stderr):
            for y, classes, p in ((yk, classes_k, pk), (yv, classes_v, pv)):
                if np.unique(y[tr]).size == 1:
                    p[te] = (classes == y[tr][0]).astype(float)
                    continue
                est = make().fit(X[tr], y[tr])
                p[te] = proba_full(est, X[te], classes)
        # damage tables from the training folds only, like the probabilities
        tk = np.zeros((X.shape[0], classes_k.size, len(BIT_CHOICES)))
        tv = np.zeros((X.shape[0], classes_v.size, len(BIT_CHOICES)))
        for tr, te in folds:
            tk[te] = damage_table(yk[tr], excess[tr, 0], classes_k, positions[tr])[bucket[te]]
            tv[te] = damage_table(yv[tr], excess[tr, 1], classes_v, positions[tr])[bucket[te]]
        norm = lambda p: np.clip(p, 1e-6, 1) / np.clip(p, 1e-6, 1).sum(1, keepdims=True)  # noqa: E731
        res = {"s": round(time.time() - t0, 1),
               "logloss_k": float(log_loss(yk, norm(pk), labels=classes_k)),
               "logloss_v": float(log_loss(yv, norm(pv), labels=classes_v)),
               "acc_k": float(np.mean(classes_k[pk.argmax(1)] == yk)),
               "acc_v": float(np.mean(classes_v[pv.argmax(1)] == yv))}
        for tgt in TARGETS:
            lam = lambda_at(pk, pv, tk, tv, eff, tgt, w)
            kb, vb = decide(pk, pv, tk, tv, lam, eff)
            res[f"@{tgt}"] = {"bits": avg_bits(kb, vb, eff, w), "damage": oracle_damage(kb, vb, excess, w),
                              "lambda": lam}
        cv[name] = res
        oof[name] = (pk, pv, tk, tv)
        log(f"cv {name:7s} logloss K {res['logloss_k']:.3f} V {res['logloss_v']:.3f} | damage at "
            + " ".join(f"{t}b {res[f'@{t}']['damage']:.3f}" for t in TARGETS) + f" | {res['s']} s")
    best = min(cv, key=lambda n: cv[n][f"@{SELECT_AT}"]["damage"])
    log(f"best at {SELECT_AT} bits: {best}")

    # -- offline baselines at the best family's bit mix
    pk, pv, tk, tv = oof[best]
    kb, vb = decide(pk, pv, tk, tv, cv[best][f"@{SELECT_AT}"]["lambda"], eff)
    mix_k = {int(b): float(np.average(kb == b, weights=w)) for b in BIT_CHOICES if np.any(kb == b)}
    mix_v = {int(b): float(np.average(vb == b, weights=w)) for b in BIT_CHOICES if np.any(vb == b)}
    base = offline_baselines(X, excess, eff, avg_bits(kb, vb, eff, w), args.seed, mix_k, mix_v, w, X_calib)
    for k, v in base.items():
        log(f"offline {k:14s} bits {v['bits']:.3f} damage {v['damage']:.3f}")

    # -- final fit, export, check
    est_k = fams[best]().fit(X, yk)
    est_v = fams[best]().fit(X, yv)
    onnx_path = out_dir / f"controller_{slug}.onnx"
    export_onnx(est_k, est_v, X.shape[1], onnx_path)
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    ok, ov = sess.run(["k_probs", "v_probs"], {"X": X})
    diff = max(float(np.abs(ok - proba_full(est_k, X, classes_k)).max()),
               float(np.abs(ov - proba_full(est_v, X, classes_v)).max()))
    log(f"onnx vs scikit-learn: max |dp| = {diff:.2e}")
    if diff > 1e-3:
        raise SystemExit("ONNX export disagrees with scikit-learn")

    meta = {
        "format": 1,
        "model": args.model,
        "model_name": model.name,
        "vocab_sha256": vocab_fingerprint(model.tokenizer),
        "shape": model_shape(model),
        **model.kv_layout,  # kv_groups, kv_rotate, kv_center_keys
        "features": list(FEATURE_NAMES),
        "k_classes": classes_k.tolist(),
        "v_classes": classes_v.tolist(),
        "damage_buckets": list(DAMAGE_BUCKETS),
        "bit_choices": list(BIT_CHOICES),
        "k_damage_table": damage_table(yk, excess[:, 0], classes_k, positions).tolist(),
        "v_damage_table": damage_table(yv, excess[:, 1], classes_v, positions).tolist(),
        "lambda_table": lambda_table(pk, pv, tk, tv, eff, w),
        "default_target_bits": SELECT_AT,
        "family": best,
        "estimator": repr(_final_estimator(est_k)),
        "oracle": {"horizon": oracle.HORIZON, "tolerance": oracle.TOL, "null_split": oracle.NULL_SPLIT,
                   "ladder": list(oracle.LADDER), **null_stats},
        "training": {"windows": len(windows), "labeled_tokens": n_tok, "rows": int(X.shape[0]), "seed": args.seed,
                     "contexts": list(dataset.CONTEXTS), "labels_k": lab_k, "labels_v": lab_v,
                     "text": "WikiText-2 validation training articles (index % 4 != 3) + GSM8K train500"},
        "cv": cv,
        "offline_baselines": base,
        "onnx_max_abs_diff": diff,
        "build_s": round(time.time() - t_start, 1),
    }
    (out_dir / f"controller_{slug}.json").write_text(json.dumps(meta, indent=1) + "\n")
    np.save(out_dir / f"controller_{slug}_calib.npy", X_calib)
    log(f"wrote {onnx_path} ({onnx_path.stat().st_size} bytes) and its JSON; {time.time() - t_start:.0f} s in all")


if __name__ == "__main__":
    import warnings

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    warnings.filterwarnings("ignore", message=".*Maximum iterations.*")  # MLP: a fixed budget, on purpose
    main()
