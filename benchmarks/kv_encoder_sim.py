"""KV encoders the engine does not have, tried in a NumPy fake-quantization harness first.

A float64 forward pass of SmolLM2-135M (tests/reference.py) in which every layer's keys and
values are replaced by their quantize-dequantize round trip before attention; a position's own
key and value stay exact (the engine stores a token after its forward pass, W=0). Perplexity of
the last 256 tokens of 512-token windows of the held-out WikiText-2 articles
(controller/corpus.py), relative to fp16 on the same windows, with a bootstrap CI over windows.

Encoders:
  int3         the shipped layout, simulated: randomized Hadamard rotation, keys centered on the
               window's mean key (positions 1..), min/max groups of 64, 3 bits (3.5 bits/element)
  sink:int3    int3 with position 0's key and value exact
  klt@B        per-(layer, KV head) transform coding: the eigenbasis of the keys (centered) and of
               the values, from the training articles; bits per coefficient by reverse water-filling
               around B; one fp16 scale per head vector (the token's whitened RMS); Gaussian-optimal
               uniform steps; position 0 exact. B + 0.25 bits/element
  qmetric      int3 whose keys first go through A, chosen for the least expected *score* error
               (the query covariance as metric, A^T A = Sk^-1 # Sq, the matrix geometric mean);
               queries take A^-T, so scores are exact before quantization

    PYTHONPATH=python:. python benchmarks/kv_encoder_sim.py [--windows 8]

Writes benchmarks/results/kv_encoder_sim.{json,md}. A simulation, not the engine: it matches the
engine's int3 to about a point of perplexity, and is here to rank ideas before building them.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
RESULTS = ROOT / "benchmarks" / "results"

import edgekv  # noqa: E402
from common import target_log_probs  # noqa: E402  (benchmarks/, the script's own folder)
from controller.corpus import wikitext_split  # noqa: E402
from kv_layout import fmt_ci, paired_ci  # noqa: E402  (benchmarks/, the script's own folder)
from reference import ReferenceModel  # noqa: E402

# Gaussian-optimal uniform quantizer step (units of sigma) at b bits
GAUSS_STEP = {1: 1.596, 2: 0.9957, 3: 0.5860, 4: 0.3352, 5: 0.1881, 6: 0.1041, 7: 0.0569, 8: 0.0308}
SCORED = 256  # last tokens of each 512-token window


def hadamard_rotation(n: int, seed: int = 0) -> np.ndarray:
    h = np.array([[1.0]])
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    signs = np.random.default_rng(seed).choice([-1.0, 1.0], n)
    return h / np.sqrt(n) * signs[None, :]


def minmax_roundtrip(x: np.ndarray, bits: int, g: int) -> np.ndarray:
    n, d = x.shape
    y = x.reshape(n, d // g, g)
    lo, hi = y.min(-1, keepdims=True), y.max(-1, keepdims=True)
    step = (hi - lo) / (2**bits - 1)
    step[step == 0] = 1
    return (np.clip(np.round((y - lo) / step), 0, 2**bits - 1) * step + lo).reshape(n, d)


def psd_sqrt(s: np.ndarray) -> np.ndarray:
    e, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(np.maximum(e, 0))) @ v.T


def score_metric_transform(sk: np.ndarray, sq: np.ndarray, eps: float = 1e-3) -> np.ndarray:
    """A with A^T A = Sk^-1 # Sq: minimizes tr(A Sk A^T) tr(A^-T Sq A^-1), the expected squared score
    error of isotropic quantization noise after A; scaled so tr(A Sk A^T) = tr(Sk)."""
    n = sk.shape[0]
    sk = sk + eps * np.trace(sk) / n * np.eye(n)
    sq = sq + eps * np.trace(sq) / n * np.eye(n)
    h = psd_sqrt(sk)
    hi = np.linalg.inv(h)
    a = psd_sqrt(hi @ psd_sqrt(h @ sq @ h) @ hi)
    return a * np.sqrt(np.trace(sk) / np.trace(a @ sk @ a.T))


def allocate_bits(lam: np.ndarray, b: float) -> np.ndarray:
    """Integer bits per coefficient (0..8) by reverse water-filling, summing to b * n."""
    lam = np.maximum(lam, 1e-12 * lam.max())
    bits = np.clip(np.round(b + 0.5 * np.log2(lam / np.exp(np.log(lam).mean()))), 0, 8).astype(int)
    order = np.argsort(-lam)
    target = int(round(b * lam.size))
    while bits.sum() > target:  # take from the smallest variance that still has bits
        bits[[j for j in order[::-1] if bits[j] > 0][0]] -= 1
    while bits.sum() < target:
        bits[[j for j in order if bits[j] < 8][0]] += 1
    return bits


def coding_gain_bits(lam: np.ndarray) -> float:
    """Transform-coding gain of a covariance's eigenbasis in bits per element: half the log2 of the
    eigenvalues' arithmetic over geometric mean (what ideal bit allocation saves over equal bits)."""
    lam = np.maximum(lam, 1e-12 * lam.max())
    return 0.5 * float(np.log2(lam.mean() / np.exp(np.log(lam).mean())))


def klt_roundtrip(x: np.ndarray, basis: tuple, b: float) -> np.ndarray:
    u, lam, mu = basis
    bits = allocate_bits(lam, b)
    sig = np.sqrt(np.maximum(lam, 1e-20))
    y = (x - mu) @ u
    s = np.sqrt(((y / sig) ** 2).mean(1)).astype(np.float16).astype(np.float64)
    s[s == 0] = 1
    out = np.zeros_like(y)
    for i in np.flatnonzero(bits):
        step = sig[i] * s * GAUSS_STEP[bits[i]]
        half = 2 ** (bits[i] - 1)
        out[:, i] = (np.clip(np.floor(y[:, i] / step), -half, half - 1) + 0.5) * step
    return out @ u.T + mu


class Harness:
    def __init__(self, path, n_cal: int = 1024):
        self.r = ReferenceModel(path)
        hp = self.r.hp
        self.hd, self.grp = hp.head_dim, hp.n_head // hp.n_head_kv
        self.rot = hadamard_rotation(self.hd)
        train, held = wikitext_split()
        with edgekv.load(path, progress=False) as m:
            cal = m.tokenize("\n".join(train)[:40000], special=False)[:n_cal]
            self.held = m.tokenize("\n".join(held), special=False)
        self._calibrate(np.asarray(cal))

    def _qkv(self, layer: int, x: np.ndarray, pos: np.ndarray):
        r, hp, w, p, n = self.r, self.r.hp, self.r.w, f"blk.{layer}.", len(x)
        h = r.rmsnorm(x, w[p + "attn_norm.weight"])
        q = r.rope((h @ w[p + "attn_q.weight"].T).reshape(n, hp.n_head, self.hd), pos)
        k = r.rope((h @ w[p + "attn_k.weight"].T).reshape(n, hp.n_head_kv, self.hd), pos)
        v = (h @ w[p + "attn_v.weight"].T).reshape(n, hp.n_head_kv, self.hd)
        return q, k, v

    def _ffn(self, layer: int, x: np.ndarray) -> np.ndarray:
        r, w, p = self.r, self.r.w, f"blk.{layer}."
        h = r.rmsnorm(x, w[p + "ffn_norm.weight"])
        g, u = h @ w[p + "ffn_gate.weight"].T, h @ w[p + "ffn_up.weight"].T
        return x + (g / (1 + np.exp(-g)) * u) @ w[p + "ffn_down.weight"].T

    def _calibrate(self, ids: np.ndarray) -> None:
        """Eigenbases (klt) and score-metric transforms (qmetric) from the training articles."""
        hp, w = self.r.hp, self.r.w
        x, pos = w["token_embd.weight"][ids], np.arange(ids.size)
        self.k_basis, self.v_basis, self.k_metric = {}, {}, {}
        for layer in range(hp.n_layer):
            q, k, v = self._qkv(layer, x, pos)
            for j in range(hp.n_head_kv):
                kc = k[1:, j] - k[1:, j].mean(0)
                for data, table in ((kc, self.k_basis), (v[1:, j], self.v_basis)):
                    mu = data.mean(0)
                    lam, u = np.linalg.eigh(np.cov((data - mu).T))
                    table[layer, j] = (u, lam, mu)
                qs = q[1:, j * self.grp:(j + 1) * self.grp].reshape(-1, self.hd)
                self.k_metric[layer, j] = score_metric_transform(kc.T @ kc / len(kc), qs.T @ qs / len(qs))
            x = self._ffn(layer, x + self.r.attention(q, k, v) @ w[f"blk.{layer}.attn_output.weight"].T)

    def _store(self, enc: str, layer: int, j: int, k: np.ndarray, v: np.ndarray):
        """Round trip of one head's keys and values (n, hd) under encoder enc."""
        c = k[1:].mean(0)
        if enc.startswith("klt@"):
            b = float(enc[4:])
            return klt_roundtrip(k - c, self.k_basis[layer, j], b) + c, klt_roundtrip(v, self.v_basis[layer, j], b)
        a = self.k_metric[layer, j] if enc == "qmetric" else np.eye(self.hd)
        tk = self.rot @ a
        kq = np.linalg.solve(tk, minmax_roundtrip((k - c) @ tk.T, 3, 64).T).T + c
        return kq, minmax_roundtrip(v @ self.rot.T, 3, 64) @ self.rot

    def nll(self, ids: np.ndarray, enc: str) -> np.ndarray:
        hp, w, hd, grp = self.r.hp, self.r.w, self.hd, self.grp
        n = ids.size
        pos, idx = np.arange(n), np.arange(n)
        causal = np.triu(np.ones((n, n), bool), 1)
        x = w["token_embd.weight"][ids]
        for layer in range(hp.n_layer):
            q, k, v = self._qkv(layer, x, pos)
            kq, vq = k.copy(), v.copy()
            if enc != "fp16":
                for j in range(hp.n_head_kv):
                    kq[:, j], vq[:, j] = self._store(enc.removeprefix("sink:"), layer, j, k[:, j], v[:, j])
                if enc.startswith(("sink:", "klt@")):
                    kq[0], vq[0] = k[0], v[0]
            sc = np.einsum("thd,shd->hts", q, np.repeat(kq, grp, 1)) / np.sqrt(hd)
            sc[:, idx, idx] = np.einsum("thd,thd->ht", q, np.repeat(k, grp, 1)) / np.sqrt(hd)  # own key exact
            sc[:, causal] = -np.inf
            p = np.exp(sc - sc.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            own = p[:, idx, idx].copy()
            p[:, idx, idx] = 0
            o = np.einsum("hts,shd->thd", p, np.repeat(vq, grp, 1)) + own.T[:, :, None] * np.repeat(v, grp, 1)
            x = self._ffn(layer, x + o.reshape(n, -1) @ w[f"blk.{layer}.attn_output.weight"].T)
        h = self.r.rmsnorm(x, w["output_norm.weight"])
        lg = h @ w["token_embd.weight"].T
        return -target_log_probs(lg[:n - 1], ids[1:])[-SCORED:]


ENCODERS = {"int3": 3.5, "sink:int3": 3.5, "qmetric": 3.5, "klt@3.0": 3.25, "klt@3.25": 3.5}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--windows", type=int, default=8)
    args = ap.parse_args()
    t0 = time.time()
    hs = Harness(edgekv.registry.resolve("smollm2-135m"))
    wins = [np.asarray(hs.held[i * 512:(i + 1) * 512]) for i in range(args.windows)]
    base = np.stack([hs.nll(wd, "fp16") for wd in tqdm(wins, desc="fp16")])
    rows = []
    for enc, bits in ENCODERS.items():
        nll = np.stack([hs.nll(wd, enc) for wd in tqdm(wins, desc=enc)])
        rows.append({"encoder": enc, "bits": bits, "vs_fp16": paired_ci(nll, base)})
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "windows": args.windows, "positions": args.windows * SCORED, "seconds": time.time() - t0,
            "fp16_ppl": float(np.exp(base.mean())),
            "klt_coding_gain_bits_median": {
                "keys": float(np.median([coding_gain_bits(b[1]) for b in hs.k_basis.values()])),
                "values": float(np.median([coding_gain_bits(b[1]) for b in hs.v_basis.values()]))},
            "command": f"PYTHONPATH=python:. python benchmarks/kv_encoder_sim.py --windows {args.windows}"}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "kv_encoder_sim.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = ["# KV encoders in simulation (NumPy fake quantization, not the engine)", "",
             f"SmolLM2-135M-Instruct Q4_1 weights, float64 reference forward; held-out WikiText-2 articles, "
             f"{args.windows} windows of 512 tokens, the last {SCORED} scored ({meta['positions']} positions), "
             f"fp16 perplexity {meta['fp16_ppl']:.3f}. {meta['date']}.", f"Command: `{meta['command']}`", "",
             "Encoders: see benchmarks/kv_encoder_sim.py. 95% paired bootstrap CI over windows (10,000 resamples). "
             "The eigenvalues of the calibration covariances promise a transform-coding gain of "
             f"{meta['klt_coding_gain_bits_median']['keys']:.2f} bits per element for keys and "
             f"{meta['klt_coding_gain_bits_median']['values']:.2f} for values (median over layers and heads).", "",
             "| encoder | bits/element | perplexity vs fp16 |", "|---|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['encoder']} | {r['bits']:.2f} | {fmt_ci(r['vs_fp16'])} |")
    (RESULTS / "kv_encoder_sim.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
