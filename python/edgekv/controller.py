"""Learned KV bit-width controller (``kv="adaptive"``) and the rule-based baseline.

A :class:`LearnedPolicy` turns each token's features (see :mod:`edgekv.kv_policy`)
into a fixed-length vector (:func:`feature_matrix`), runs a small scikit-learn model
exported to ONNX (onnxruntime, one batched call per decision) and gets, for keys and
for values separately, the probability of each *oracle label* -- the lowest bit-width
whose damage stays under the training tolerance (controller/oracle.py). Its decision
for a token and each of K and V is

    bits = argmin_b  eff_bits(b) + lambda * sum_c P(label = c) * D[bucket, c, b]

(eff_bits: storage bits per element with the group's fp16 scale and minimum; D[bucket, c, b]:
the mean oracle damage, on the training set, of tokens with label c stored at b bits, among
tokens of the same position bucket -- the first tokens of a context, attention sinks, do far
more damage when under-provisioned than their label alone says), so one
knob, ``lambda``, trades bits for expected damage, the same for keys and values; the
artifact carries a table from ``lambda`` to the average bits it gave on held-out training
folds, which is how ``target_bits`` (average bits per element) picks ``lambda``.

The artifact is trained per model by ``python -m controller.train`` and shipped as
``edgekv/data/controller_<model>.onnx`` + ``controller_<model>.json``; the policy picks
the one whose tokenizer fingerprint and shape match the model it first decides for.
The rarity prior is ``edgekv/data/rarity_<model>.npy`` (token counts), matched by
tokenizer fingerprint.

:class:`RulePolicy` is the "Dynamic KV" baseline: thresholds on next-token entropy
and attention mass split tokens between two rungs of the static ladder.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import weakref
from pathlib import Path

import numpy as np

from .kv_policy import BITS, GROUP_OF, SINK_MIN_KEY_BITS, KVPolicy, TokenFeatures, protect_sink  # noqa: F401

log = logging.getLogger("edgekv")

DATA_DIR = Path(__file__).resolve().parent / "data"

# Per-element feature vector given to the classifier, in this order (definitions in
# edgekv.kv_policy; transforms here):
FEATURE_NAMES = (
    "entropy",         # nats
    "max_prob",
    "logprob",         # NaN (first token, unknown) -> 0, flagged by has_logprob
    "has_logprob",
    "rarity",          # nats
    "log_attn_rel",    # log10(attn_mean * n_ref), n_ref = position + 1 + age / 2: attention relative to uniform
    "log_attn_std",    # log10(sqrt(attn_var) * n_ref)
    "log_position",    # log2(1 + position)
    "log_age",         # log2(1 + age)
)

# rarity: p(t) = (PRIOR_WEIGHT * q(t) + c(t)) / (PRIOR_WEIGHT + j + 1), q the add-half prior
RARITY_PRIOR_WEIGHT = 1024.0


# ---- identities ----------------------------------------------------------------------

def vocab_fingerprint(tokenizer) -> str:
    """sha256 of the token texts and pre-tokenizer: what decides token ids."""
    h = hashlib.sha256()
    h.update(str(tokenizer.pre).encode())
    for t in tokenizer.tokens:
        h.update(b"\0")
        h.update(t.encode("utf-8", "surrogatepass"))
    return h.hexdigest()


def model_shape(model) -> dict:
    hp = model.hparams
    return {k: int(hp[k]) for k in ("n_vocab", "n_embd", "n_layer", "n_head", "n_head_kv", "head_dim")}


def effective_bits(groups) -> dict[int, float]:
    """Storage bits per element for each bit-width, fp16 scale and minimum per group included
    (each precision uses the group size of kv_policy.GROUP_OF: 3-bit records the 4-bit one)."""
    g8, g4, g2 = groups if groups is not None else (64, 64, 32)
    size = {8: g8, 4: g4, 2: g2}
    return {b: 16.0 if b == 16 else b + 32.0 / size[GROUP_OF[b]] for b in BITS}


def average_bits(k_bits: np.ndarray, v_bits: np.ndarray, groups) -> float:
    """Average storage bits per cached K/V element of the given per-token bit-widths."""
    eb = effective_bits(groups)
    if len(k_bits) == 0:
        return float("nan")
    lut = np.zeros(17)
    for b, e in eb.items():
        lut[b] = e
    return float((lut[np.asarray(k_bits)].sum() + lut[np.asarray(v_bits)].sum()) / (2 * len(k_bits)))


# ---- rarity ---------------------------------------------------------------------------

class RarityPrior:
    """Prior token distribution q (add-half smoothed counts) for the rarity feature."""

    def __init__(self, counts: np.ndarray | None, vocab_size: int, source: str = "uniform"):
        c = np.zeros(vocab_size, np.float64) if counts is None else np.asarray(counts, np.float64)
        if c.size != vocab_size:
            raise ValueError(f"rarity table has {c.size} entries for a vocabulary of {vocab_size}")
        self.q = (c + 0.5) / (c.sum() + 0.5 * vocab_size)
        self.source = source

    @classmethod
    def for_tokenizer(cls, tokenizer) -> "RarityPrior":
        """The shipped table whose tokenizer fingerprint matches; uniform if there is none."""
        fp = vocab_fingerprint(tokenizer)
        for meta_path in sorted(DATA_DIR.glob("rarity_*.json")):
            meta = json.loads(meta_path.read_text())
            if meta.get("vocab_sha256") == fp:
                return cls(np.load(meta_path.with_suffix(".npy")), tokenizer.vocab_size, meta_path.stem)
        return cls(None, tokenizer.vocab_size)

    def rarity(self, context, positions: np.ndarray) -> np.ndarray:
        """-log p(token at j) for each position j, with the session counts of context[:j+1].

        context: the token ids in the cache (a list or an array)."""
        positions = np.asarray(positions, np.int64)
        if positions.size == 0:
            return np.zeros(0, np.float32)
        if positions.size <= 8:  # a decode step: no conversion of the whole context
            seq = context if isinstance(context, list) else np.asarray(context).tolist()
            ids = np.array([seq[j] for j in positions], np.int64)
            counts = np.array([seq[:j + 1].count(t) for j, t in zip(positions.tolist(), ids.tolist())], np.float64)
        else:
            context = np.asarray(context, np.int64)
            ids = context[positions]
            # occurrences of context[j] in context[:j+1], for every j, by a stable sort
            upto = int(positions.max()) + 1
            c = context[:upto]
            order = np.argsort(c, kind="stable")
            sc = c[order]
            start = np.r_[0, np.flatnonzero(sc[1:] != sc[:-1]) + 1]
            run_start = np.repeat(start, np.diff(np.r_[start, sc.size]))
            rank = np.empty(upto, np.int64)
            rank[order] = np.arange(upto) - run_start + 1
            counts = rank[positions].astype(np.float64)
        w = RARITY_PRIOR_WEIGHT
        p = (w * self.q[ids] + counts) / (w + positions + 1)
        return (-np.log(p)).astype(np.float32)


# ---- features -> matrix -----------------------------------------------------------------

_FILL = (0.0, 1.0, 0.0, 0.0, 10.0, 0.0, -1.0, 0.0, 0.0)  # for features that were not computed (NaN)


def _feature_row(pos, age, ent, mp, lp, rar, am, av) -> list:
    """One row of feature_matrix in plain floats (a decode step decides one token: numpy's
    per-call overhead would cost more than the arithmetic)."""
    n_ref = pos + 1.0 + age / 2.0
    has_lp = math.isfinite(lp)
    a = am * n_ref
    sd = math.sqrt(av) * n_ref if av >= 0 else (0.0 if math.isfinite(av) else float("nan"))
    row = [ent, mp, lp if has_lp else 0.0, 1.0 if has_lp else 0.0, rar,
           math.log10(max(a, 1e-4)) if math.isfinite(a) else float("nan"),
           math.log10(max(sd, 1e-4)) if math.isfinite(sd) else float("nan"),
           math.log2(1.0 + pos), math.log2(1.0 + age)]
    return [x if math.isfinite(x) else _FILL[i] for i, x in enumerate(row)]


def feature_matrix(f: TokenFeatures) -> np.ndarray:
    """(n, len(FEATURE_NAMES)) float32, the classifier's input; finite everywhere."""
    n = len(f)
    if n <= 2:
        rar = f.rarity if f.rarity is not None else np.full(n, np.nan, np.float32)
        rows = [_feature_row(float(f.positions[i]), float(f.age[i]), float(f.entropy[i]), float(f.max_prob[i]),
                             float(f.logprob[i]), float(rar[i]), float(f.attn_mean[i]), float(f.attn_var[i]))
                for i in range(n)]
        return np.array(rows, np.float32).reshape(n, len(FEATURE_NAMES))
    pos = f.positions.astype(np.float64)
    age = f.age.astype(np.float64)
    n_ref = pos + 1.0 + age / 2.0
    lp = f.logprob.astype(np.float64)
    has_lp = np.isfinite(lp)
    rar = f.rarity if f.rarity is not None else np.full(n, np.nan, np.float32)
    with np.errstate(invalid="ignore", divide="ignore"):
        attn_rel = np.log10(np.maximum(f.attn_mean.astype(np.float64) * n_ref, 1e-4))
        attn_std = np.log10(np.maximum(np.sqrt(np.maximum(f.attn_var.astype(np.float64), 0.0)) * n_ref, 1e-4))
    cols = [
        f.entropy.astype(np.float64),
        f.max_prob.astype(np.float64),
        np.where(has_lp, lp, 0.0),
        has_lp.astype(np.float64),
        rar.astype(np.float64),
        attn_rel,
        attn_std,
        np.log2(1.0 + pos),
        np.log2(1.0 + age),
    ]
    X = np.stack(cols, axis=1)
    # not computed (NaN): entropy / max_prob / rarity of a position without logits, attention of
    # a token no query has seen yet; fill with values that mean "unremarkable"
    fill = np.array(_FILL)
    bad = ~np.isfinite(X)
    if bad.any():
        X[bad] = np.broadcast_to(fill, X.shape)[bad]
    return X.astype(np.float32)


# ---- decisions from class probabilities -------------------------------------------------

LEGACY_CHOICES = (2, 4, 8, 16)  # artifacts without "bit_choices" were trained on these
LAYOUT_BEFORE_RECORDED = {"kv_fit_grid": False}  # artifacts without a layout key were trained with these


def choose_bits(probs: np.ndarray, damage_table, lam: float, eff: dict[int, float],
                bucket: np.ndarray | None = None, choices=LEGACY_CHOICES) -> np.ndarray:
    """argmin over b in choices of eff[b] + lam * E[damage(b)], per row.

    probs (n, C): class probabilities (oracle labels). damage_table: mean excess damage
    (controller/oracle.py) of a token with label c stored at each of the choices, from the
    training set: (C, len(choices)), or (B, C, len(choices)) per position bucket with ``bucket``
    (n,) giving each row's bucket. E[damage(b)] = sum_c probs[c] * table[c, b]."""
    cand = np.asarray(choices)
    table = np.asarray(damage_table, np.float64)
    if table.shape[-1] != cand.size:
        raise ValueError(f"damage table has {table.shape[-1]} bit-width columns, choices {tuple(choices)}")
    p = np.asarray(probs, np.float64)
    if table.ndim == 3:
        cost = np.einsum("nc,ncb->nb", p, table[np.asarray(bucket)])
    else:
        cost = p @ table
    cost = lam * cost + np.array([eff[int(b)] for b in cand])
    return cand[np.argmin(cost, axis=1)].astype(np.int32)


def position_bucket(positions: np.ndarray, edges) -> np.ndarray:
    """Index of each position's bucket: edges (ascending, first 0) are bucket starts."""
    return np.searchsorted(np.asarray(edges), np.asarray(positions), side="right") - 1


def lambda_for_target(table, target_bits: float) -> float:
    """Interpolate the artifact's (lambda, average bits) table at target_bits (bits rise with lambda)."""
    lam = np.array([r[0] for r in table], np.float64)
    bits = np.array([r[1] for r in table], np.float64)
    order = np.argsort(lam)
    lam, bits = lam[order], np.maximum.accumulate(bits[order])
    if target_bits <= bits[0]:
        return float(lam[0])
    if target_bits >= bits[-1]:
        return float(lam[-1])
    i = int(np.searchsorted(bits, target_bits, side="right"))
    # piecewise linear in log(lambda)
    l0, l1 = np.log(max(lam[i - 1], 1e-6)), np.log(max(lam[i], 1e-6))
    b0, b1 = bits[i - 1], bits[i]
    t = 0.0 if b1 == b0 else (target_bits - b0) / (b1 - b0)
    return float(np.exp(l0 + t * (l1 - l0)))


# ---- the artifact ---------------------------------------------------------------------------

class ControllerArtifact:
    """A trained controller: metadata + an onnxruntime session (outputs k_probs, v_probs)."""

    def __init__(self, onnx_path: Path, meta: dict):
        try:
            import onnxruntime as ort
        except ImportError:
            raise ImportError("the learned KV controller (kv=\"adaptive\") runs on onnxruntime: "
                              "pip install onnxruntime") from None

        self.path = Path(onnx_path)
        self.meta = meta
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1  # tiny model: a thread pool costs more than it saves
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(str(self.path), opts, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.k_classes = list(meta["k_classes"])
        self.v_classes = list(meta["v_classes"])

    def predict_proba(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        pk, pv = self.session.run(["k_probs", "v_probs"], {self.input_name: np.ascontiguousarray(X, np.float32)})
        return pk, pv

    def matches(self, model) -> bool:
        return (self.meta.get("vocab_sha256") == vocab_fingerprint(model.tokenizer)
                and self.meta.get("shape") == model_shape(model))


@functools.lru_cache(maxsize=8)
def load_artifact(json_path: str) -> ControllerArtifact:
    p = Path(json_path)
    meta = json.loads(p.read_text())
    return ControllerArtifact(p.with_suffix(".onnx"), meta)


def find_artifact(model) -> ControllerArtifact:
    """The shipped controller trained for this model (tokenizer fingerprint and shape)."""
    fp, shape = vocab_fingerprint(model.tokenizer), model_shape(model)
    for meta_path in sorted(DATA_DIR.glob("controller_*.json")):
        meta = json.loads(meta_path.read_text())
        if meta.get("vocab_sha256") == fp and meta.get("shape") == shape:
            return load_artifact(str(meta_path))
    raise ValueError(
        f"no learned KV controller is shipped for {model.name} (looked in {DATA_DIR}); train one with "
        f"`python -m controller.train --model <registry name or GGUF path>`, or use a static policy such as k4v2"
    )


# ---- policies -----------------------------------------------------------------------------

# The attention-sink guard (SINK_MIN_KEY_BITS, protect_sink) lives in kv_policy: static policies
# take it too ("sink:int3").


class LearnedPolicy(KVPolicy):
    """Per-token key and value bit-widths from the learned controller (onnxruntime).

    target_bits: average storage bits per element to aim for (scales included); None uses
    the artifact's default. lam: set the decision knob directly instead. artifact: a
    controller_<model>.json path; None picks the shipped one for the model it decides for.
    """

    needs_features = True

    def __init__(self, target_bits: float | None = None, window: int = 0, artifact=None, lam: float | None = None,
                 name: str | None = None):
        from .kv_policy import _check_window

        self.window = _check_window(window)
        self.target_bits = None if target_bits is None else float(target_bits)
        self.lam_override = lam
        self._artifact_path = None if artifact is None else str(Path(artifact).with_suffix(".json"))
        self._art: ControllerArtifact | None = None
        self._bound = None  # weak reference to the model bound last
        self.lam = float("nan")
        self.eff = effective_bits(None)
        self._name = name

    @property
    def name(self) -> str:
        if self._name:
            return self._name
        if self.lam_override is not None:
            return f"adaptive(lam={self.lam_override:g})"
        return "adaptive" if self.target_bits is None else f"adaptive@{self.target_bits:g}"

    def bind(self, model) -> None:
        """Attach to the model about to be decided for: pick the artifact, the knob and bit costs."""
        if self._bound is not None and self._bound() is model:
            return
        art = load_artifact(self._artifact_path) if self._artifact_path else find_artifact(model)
        if self._artifact_path and not art.matches(model):
            raise ValueError(f"controller {art.path.name} was trained for {art.meta.get('model')}, not {model.name}")
        self.attach(art, getattr(model, "kv_groups", None))
        self._bound = weakref.ref(model)
        # the damage tables were measured on one KV layout; another one still runs, less well matched
        layout = getattr(model, "kv_layout", {})
        trained = {**LAYOUT_BEFORE_RECORDED, **{k: v for k, v in art.meta.items() if v is not None}}
        differs = [f"{k} {v} (trained with {trained[k]})" for k, v in layout.items()
                   if trained.get(k) is not None and v is not None and trained[k] != v]
        if differs:
            log.warning("controller %s was trained on another KV layout: %s", art.path.name, ", ".join(differs))

    def attach(self, art: ControllerArtifact, groups=None) -> None:
        """Use this artifact, with the bit costs of these KV groups (bind does this for a model)."""
        self._art = art
        meta = art.meta
        self._tables = (np.asarray(meta["k_damage_table"], np.float64), np.asarray(meta["v_damage_table"], np.float64),
                        meta.get("damage_buckets"))
        self.choices = tuple(meta.get("bit_choices", LEGACY_CHOICES))
        self.eff = effective_bits(groups)
        if self.lam_override is not None:
            self.lam = float(self.lam_override)
        else:
            tb = self.target_bits if self.target_bits is not None else meta["default_target_bits"]
            self.lam = lambda_for_target(meta["lambda_table"], tb)

    @property
    def artifact(self) -> ControllerArtifact:
        if self._art is None:
            raise RuntimeError("LearnedPolicy is not bound to a model yet (it binds on its first decision)")
        return self._art

    def probabilities(self, features: TokenFeatures) -> tuple[np.ndarray, np.ndarray]:
        return self.artifact.predict_proba(feature_matrix(features))

    def decide(self, features: TokenFeatures):
        if len(features) == 0:
            return np.zeros(0, np.int32), np.zeros(0, np.int32)
        pk, pv = self.probabilities(features)
        tk, tv, edges = self._tables
        bucket = position_bucket(features.positions, edges) if edges is not None else None
        k = choose_bits(pk, tk, self.lam, self.eff, bucket, self.choices)
        v = choose_bits(pv, tv, self.lam, self.eff, bucket, self.choices)
        return protect_sink(features.positions, k), v


# static configurations ordered by storage bits: the rungs a rule-based policy splits tokens between
LADDER = ((2, 2), (4, 2), (4, 4), (8, 4), (8, 8), (16, 16))


class RulePolicy(KVPolicy):
    """Rule-based "Dynamic KV" baseline: a token is important when its next-token entropy or the
    attention it received (relative to uniform) exceeds a threshold; important tokens are stored
    at ``hi`` = (k_bits, v_bits), the others at ``lo``."""

    needs_features = True

    def __init__(self, tau_entropy: float, tau_attn: float, hi=(4, 2), lo=(2, 2), window: int = 0,
                 name: str | None = None):
        from .kv_policy import _check_window

        self.tau_entropy, self.tau_attn = float(tau_entropy), float(tau_attn)
        self.hi, self.lo = tuple(int(b) for b in hi), tuple(int(b) for b in lo)
        for b in self.hi + self.lo:
            if b not in BITS:
                raise ValueError(f"bit-width must be one of {BITS}, got {b!r}")
        self.window = _check_window(window)
        self.name = name or (f"rule(H>{self.tau_entropy:.2f}|A>{self.tau_attn:.2f}:"
                             f"k{self.hi[0]}v{self.hi[1]}/k{self.lo[0]}v{self.lo[1]})")

    def important(self, features: TokenFeatures) -> np.ndarray:
        X = feature_matrix(features)
        return (X[:, 0] > self.tau_entropy) | (X[:, 5] > self.tau_attn)

    def decide(self, features: TokenFeatures):
        imp = self.important(features)
        k = np.where(imp, self.hi[0], self.lo[0]).astype(np.int32)
        v = np.where(imp, self.hi[1], self.lo[1]).astype(np.int32)
        return k, v

    @classmethod
    def calibrated(cls, X: np.ndarray, target_bits: float, groups=None, window: int = 0) -> "RulePolicy":
        """Thresholds that store tokens like X (feature_matrix rows) at target_bits on average.

        The two rungs of LADDER around target_bits; entropy and attention thresholds at the
        same quantile, set so the union of important tokens has the needed share."""
        eb = effective_bits(groups)
        rung_bits = [(eb[k] + eb[v]) / 2 for k, v in LADDER]
        i = int(np.clip(np.searchsorted(rung_bits, target_bits) - 1, 0, len(LADDER) - 2))
        lo, hi = LADDER[i], LADDER[i + 1]
        share = float(np.clip((target_bits - rung_bits[i]) / (rung_bits[i + 1] - rung_bits[i]), 0.0, 1.0))
        H, A = X[:, 0], X[:, 5]
        # the union share is monotone in the common quantile: bisect
        lo_q, hi_q = 0.0, 1.0
        for _ in range(40):
            q = (lo_q + hi_q) / 2
            frac = np.mean((H > np.quantile(H, q)) | (A > np.quantile(A, q)))
            if frac > share:
                lo_q = q
            else:
                hi_q = q
        q = hi_q
        return cls(float(np.quantile(H, q)), float(np.quantile(A, q)), hi=hi, lo=lo, window=window)
