"""Oracle labels: the damage quantizing one token's keys or values does, measured exactly.

damage(j, kind, b) = sum over i in j+1..j+T of KL(p_i || q_i): p_i is the next-token
distribution at position i with every cached token at 16 bits, q_i the same when only
token j's keys (kind "k") or values ("v") are stored at b bits. Exact: the context is cut
back to j, token j is re-run and re-encoded at b bits (ek_kv_set_bits on that one
position), then positions j+1..j+T are re-run in one batch with all logits (the model's
own forward pass, no approximation).

Noise floor. The engine quantizes activations (Q8) for its integer matmuls, so *any*
perturbation, however small -- even re-running the same tokens through a different
batch split -- moves later logits by a KL of a few 1e-3 nats per position. That floor
is measured per token (``null``: the baseline run with positions j+1..j+T split into two
batches, which changes nothing but the kernel path) and subtracted:

    excess(j, kind, b) = damage(j, kind, b) - null(j)

The label of a token, for keys and values separately, is the lowest b in 2, 3, 4, 8 whose
excess is at most the kind's tolerance (``TOL``), else 16. Higher bit-widths are only
measured when the lower one fails (damage falls as bits rise).
"""

from __future__ import annotations

import numpy as np

from edgekv.kv_policy import parse_policy

# the window runs at 16 bits but for the bits the oracle sets itself (Session.set_bits)
FP16 = parse_policy("fp16")

HORIZON = 16              # T: following positions over which KL is summed (controller.train --horizon)
NULL_SPLIT = 5            # the null run feeds j+1..j+5, then the rest
TOL = {"k": 0.5, "v": 0.05}  # tolerance on the excess damage (nats summed over T positions), at T = 16
LADDER = (2, 3, 4, 8)
CHOICES = LADDER + (16,)  # the bit-widths a decision picks from (excess_table's columns)


def set_horizon(t: int) -> None:
    """Sum damage over t following positions; the tolerances scale with t (they are per 16)."""
    global HORIZON, TOL
    TOL = {kind: tol * t / HORIZON for kind, tol in TOL.items()}
    HORIZON = int(t)


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    z -= z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def kl_rows(logp_ref: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """KL(p_ref || q) per row; logp_ref a log-softmax, logits raw."""
    logq = log_softmax(logits)
    return np.maximum((np.exp(logp_ref) * (logp_ref - logq)).sum(axis=-1), 0.0)


def set_bits(model, pos: int, kb: int, vb: int) -> None:
    model.session.set_bits([pos], [kb], [vb])


class WindowOracle:
    """Exact single-token damage in one window of token ids (16-bit background).

    Batched prefill and one-token decode take different kernel paths, so every comparison
    is against a baseline that follows exactly the same path with nothing quantized: for
    token j the context is cut back to j, token j is re-run alone, optionally re-encoded,
    then j+1..j+T run in one batch with all logits.
    """

    def __init__(self, model, ids: np.ndarray, horizon: int | None = None):
        self.model = model
        self.ids = np.ascontiguousarray(ids, dtype=np.int32)
        self.T = int(HORIZON if horizon is None else horizon)
        model.session.truncate(0)
        self._base = None  # (j, log-softmax of the baseline rows)
        self.runs = 0

    def _run(self, j: int, kb: int = 16, vb: int = 16, split: int = 0) -> np.ndarray:
        m, s = self.model, self.model.session
        end = min(j + 1 + self.T, self.ids.size)
        if m.n_past > j:
            s.truncate(j)
        elif m.n_past < j:
            s.eval(self.ids[m.n_past:j], logits="none", kv=FP16)
        s.eval(self.ids[j:j + 1], logits="none", kv=FP16)
        if kb != 16 or vb != 16:
            set_bits(m, j, kb, vb)
        out = np.empty((end - j - 1, m.vocab_size), np.float32)
        if 0 < split < end - j - 1:
            s.eval(self.ids[j + 1:j + 1 + split], logits="all", out=out[:split], kv=FP16)
            s.eval(self.ids[j + 1 + split:end], logits="all", out=out[split:], kv=FP16)
        else:
            s.eval(self.ids[j + 1:end], logits="all", out=out, kv=FP16)
        self.runs += 1
        return out

    def _baseline(self, j: int) -> np.ndarray:
        if self._base is None or self._base[0] != j:
            self._base = (j, log_softmax(self._run(j)))
        return self._base[1]

    def damage(self, j: int, kind: str, bits: int) -> float:
        """Summed KL over j+1..j+T with token j's keys (kind "k") or values ("v") at `bits`."""
        base = self._baseline(j)
        out = self._run(j, bits if kind == "k" else 16, bits if kind == "v" else 16)
        return float(kl_rows(base, out).sum())

    def null(self, j: int) -> float:
        """Summed KL of the same computation through another batch split (the noise floor)."""
        base = self._baseline(j)
        return float(kl_rows(base, self._run(j, split=NULL_SPLIT)).sum())

    def measure(self, j: int, tol=None) -> dict:
        """null and damages of token j along the ladder (NaN where not measured: a lower
        bit-width already passed)."""
        tol = TOL if tol is None else tol
        if j + 1 + self.T > self.ids.size:
            raise ValueError(f"position {j} needs {self.T} following tokens in the window")
        rec = {"null": self.null(j)}
        for kind in ("k", "v"):
            passed = False
            for b in LADDER:
                if passed:
                    rec[f"{kind}{b}"] = float("nan")
                    continue
                rec[f"{kind}{b}"] = d = self.damage(j, kind, b)
                passed = d - rec["null"] <= tol[kind]
        return rec


def labels_from(rec_arrays: dict, tol=None) -> tuple[np.ndarray, np.ndarray]:
    """Oracle labels (key bits, value bits) from measured damages (arrays keyed like measure())."""
    tol = TOL if tol is None else tol
    out = []
    for kind in ("k", "v"):
        n = rec_arrays["null"].size
        lab = np.full(n, 16, np.int32)
        for b in reversed(LADDER):
            ex = rec_arrays[f"{kind}{b}"] - rec_arrays["null"]
            lab = np.where(np.isfinite(ex) & (ex <= tol[kind]), b, lab)
        out.append(lab)
    return out[0], out[1]


def excess_table(rec_arrays: dict) -> np.ndarray:
    """(n, 2, len(CHOICES)) excess damage for kind (k, v) x bits (CHOICES); unmeasured bits above a
    passing one are taken as 0 (at or under the floor), 16 bits as 0."""
    n = rec_arrays["null"].size
    t = np.zeros((n, 2, len(CHOICES)))
    for ki, kind in enumerate(("k", "v")):
        for bi, b in enumerate(LADDER):
            ex = np.maximum(rec_arrays[f"{kind}{b}"] - rec_arrays["null"], 0.0)
            t[:, ki, bi] = np.where(np.isfinite(ex), ex, 0.0)
    return t


# ---- the oracle as a policy: the controller's objective with perfect labels ---------------

def window_damages(model, ids: np.ndarray, progress=None) -> np.ndarray:
    """(n, 2, len(CHOICES)) excess damage (damage - null, at least 0) of every token of a window,
    keys and values, at every bit-width of the ladder (16 bits: 0), each measured alone against
    the 16-bit background. Near the end of the window the sums run over the positions that are
    left (the last token has none).

    Key centers (EK_KV_CENTER_KEYS) are fixed when the first key is quantized and kept while the
    context holds a token. They are first set from the whole window (as a policy run sets them
    from its prefilled context), so every token from 1 on is measured against the same centers;
    token 0, measured first from an empty context, gets centers of its own."""
    wo = WindowOracle(model, ids)
    n = wo.ids.size
    t = np.zeros((n, 2, len(CHOICES)))

    def measure(j):
        floor = wo.null(j) if j + 1 + NULL_SPLIT < n else 0.0  # too few positions left to split
        for ki, kind in enumerate(("k", "v")):
            for bi, b in enumerate(LADDER):
                t[j, ki, bi] = max(wo.damage(j, kind, b) - floor, 0.0)
        if progress is not None:
            progress(j)

    measure(0)
    if model.kv_center_keys and n > 2:
        model.session.truncate(0)
        model.session.eval(wo.ids, logits="none", kv=FP16)
        set_bits(model, n - 1, 8, 16)  # the first quantized key: centers from keys 1..n-1
        model.session.truncate(n - 1)
        wo._base = None
    for j in range(1, n - 1):
        measure(j)
    model.session.truncate(0)
    return t


def budget_bits(damage: np.ndarray, target_bits: float, groups, min_key_bits: np.ndarray | None = None,
                iters: int = 60) -> tuple[np.ndarray, np.ndarray]:
    """Per-token (key bits, value bits) minimizing the summed damage at an average storage cost
    (edgekv.controller.average_bits with these KV groups) of at most target_bits: argmin_b
    eff[b] + lam * damage[b] per token and kind, lam found by bisection. min_key_bits (n,): a
    floor on each token's key bits (the attention-sink guard)."""
    from edgekv.controller import average_bits, effective_bits

    eff = effective_bits(groups)
    cand = np.asarray(CHOICES)
    cost_b = np.array([eff[int(b)] for b in cand])
    floor = np.zeros(damage.shape[0], np.int32) if min_key_bits is None else np.asarray(min_key_bits)

    def pick(lam):
        c = cost_b + lam * damage  # (n, 2, C)
        c[:, 0, :] = np.where(cand[None, :] < floor[:, None], np.inf, c[:, 0, :])
        b = cand[np.argmin(c, axis=2)]
        return b[:, 0].astype(np.int32), b[:, 1].astype(np.int32)

    def fits(lam):
        return average_bits(*pick(lam), groups) <= target_bits

    lo, hi = 1e-6, 1e9  # lam: bits rise with it
    if not fits(lo):
        return pick(lo)
    for _ in range(iters):
        mid = float(np.sqrt(lo * hi))
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return pick(lo)
