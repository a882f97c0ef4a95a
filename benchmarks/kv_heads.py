"""Do KV heads within a layer differ as much as layers do? (issue 18: per layer or per (layer, head)).

A float32 NumPy forward pass (tests/reference.py's weights and pieces) on windows of the calibration
text (edgekv/data/calibration.txt): CTX tokens of context, then SCORED tokens whose queries read the
context's keys with one (layer, KV head) fake-quantized (the engine's int4/int3 record simulated:
Hadamard rotation with random signs, key centered on the context's mean key, min/max groups of 64,
position 0 exact as the sink guard keeps it); everything else exact. Damage = mean KL of the scored
tokens' next-token distributions from the exact pass. Only the scored tokens are recomputed (the
context's own pass is not affected at W=0), so every (layer, head) is cheap.

    PYTHONPATH=python:tests python benchmarks/kv_heads.py --model qwen2.5-coder-0.5b
writes benchmarks/results/kv_heads.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "python"), str(REPO / "tests")]
RESULTS = REPO / "benchmarks" / "results"
CTX, SCORED = 192, 32


def hadamard(n: int, seed: int = 0) -> np.ndarray:
    h = np.array([[1.0]])
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return (h / np.sqrt(n) * np.random.default_rng(seed).choice([-1.0, 1.0], n)[None, :]).astype(np.float32)


def fake_quant(x: np.ndarray, bits: int, rot: np.ndarray, center: bool, g: int = 64) -> np.ndarray:
    g = min(g, x.shape[1])
    """Round trip of rows x (n, hd): centered (keys), rotated, min/max per group of g, back."""
    c = x[1:].mean(0) if center else np.zeros(x.shape[1], x.dtype)
    y = (x - c) @ rot.T
    y = y.reshape(len(y), -1, g)
    lo, hi = y.min(-1, keepdims=True), y.max(-1, keepdims=True)
    s = np.maximum(hi - lo, 1e-12) / (2 ** bits - 1)
    y = (np.round((y - lo) / s) * s + lo).reshape(len(x), -1)
    out = y @ rot + c
    out[0] = x[0]  # the sink guard
    return out


class Probe:
    def __init__(self, path):
        from reference import ReferenceModel

        self.r = ReferenceModel(path)
        self.w = {k: v.astype(np.float32) for k, v in self.r.w.items()}
        self.r.w = None
        self.hp = self.r.hp
        self.rot = hadamard(self.hp.head_dim)

    def _qkv(self, layer: int, x: np.ndarray, pos: np.ndarray):
        w, hp, p, n = self.w, self.hp, f"blk.{layer}.", len(x)
        h = self.r.rmsnorm(x, w[p + "attn_norm.weight"])
        q, k, v = (h @ w[p + f"attn_{t}.weight"].T + w.get(p + f"attn_{t}.bias", 0) for t in "qkv")
        q = self.r.rope(q.reshape(n, hp.n_head, hp.head_dim), pos).astype(np.float32)
        k = self.r.rope(k.reshape(n, hp.n_head_kv, hp.head_dim), pos).astype(np.float32)
        return q, k, v.reshape(n, hp.n_head_kv, hp.head_dim)

    def _rest(self, layer: int, x, q, kf, vf, first: int):
        """Attention of queries at positions first.. over keys/values kf, vf (all positions), then the FFN."""
        hp, w, p = self.hp, self.w, f"blk.{layer}."
        grp = hp.n_head // hp.n_head_kv
        sc = np.einsum("thd,shd->hts", q, np.repeat(kf, grp, 1)) / np.sqrt(hp.head_dim)
        t = np.arange(first, first + len(q))
        sc = np.where(np.arange(kf.shape[0])[None, None, :] > t[None, :, None], -np.inf, sc)
        pr = np.exp(sc - sc.max(-1, keepdims=True))
        pr /= pr.sum(-1, keepdims=True)
        o = np.einsum("hts,shd->thd", pr, np.repeat(vf, grp, 1)).reshape(len(q), -1)
        x = x + o @ w[p + "attn_output.weight"].T
        h = self.r.rmsnorm(x, w[p + "ffn_norm.weight"])
        g, u = h @ w[p + "ffn_gate.weight"].T, h @ w[p + "ffn_up.weight"].T
        return x + (g / (1 + np.exp(-g)) * u) @ w[p + "ffn_down.weight"].T

    def _logp(self, x):
        h = self.r.rmsnorm(x, self.w["output_norm.weight"])
        lg = h @ self.w.get("output.weight", self.w["token_embd.weight"]).T
        lg -= lg.max(-1, keepdims=True)
        return lg - np.log(np.exp(lg).sum(-1, keepdims=True))

    def run(self, ids: np.ndarray, configs):
        """{config: KL} for configs (layer, head, kind, bits)."""
        n = len(ids)
        pos = np.arange(n)
        x = self.w["token_embd.weight"][ids]
        xs, ks, vs = [], [], []
        for layer in range(self.hp.n_layer):
            xs.append(x)
            q, k, v = self._qkv(layer, x, pos)
            ks.append(k)
            vs.append(v)
            x = self._rest(layer, x, q, k, v, 0)
        ref = self._logp(x[CTX:])
        out = {}
        for cfg in configs:
            l0, head, kind, bits = cfg
            x = xs[l0][CTX:]
            for layer in range(l0, self.hp.n_layer):
                q, k, v = self._qkv(layer, x, pos[CTX:])
                kc, vc = ks[layer][:CTX].copy(), vs[layer][:CTX].copy()
                if layer == l0:
                    heads = range(self.hp.n_head_kv) if head is None else [head]
                    for j in heads:
                        if kind == "k":
                            kc[:, j] = fake_quant(kc[:, j], bits, self.rot, True)
                        else:
                            vc[:, j] = fake_quant(vc[:, j], bits, self.rot, False)
                x = self._rest(layer, x, q, np.concatenate([kc, k]), np.concatenate([vc, v]), CTX)
            lp = self._logp(x)
            out[cfg] = float(np.mean(np.sum(np.exp(ref) * (ref - lp), -1)))
        return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--out", default=str(RESULTS / "kv_heads"))
    args = ap.parse_args(argv)
    import edgekv
    from edgekv import calibrate
    from common import command_line, machine, machine_line

    path = Path(edgekv.registry.resolve(args.model))
    with edgekv.load(path, threads=1, ctx=CTX + SCORED, progress=False) as m:
        wins = calibrate._text_windows(m, calibrate.CALIBRATION_TEXT.read_text(encoding="utf-8"), args.windows, CTX, SCORED)
    pr = Probe(path)
    L, H = pr.hp.n_layer, pr.hp.n_head_kv
    cfgs = [(layer, h, kind, args.bits) for layer in range(L) for h in [*range(H), None] for kind in "kv"]
    acc: dict = {}
    for i, w in enumerate(wins):
        for c, kl in pr.run(np.asarray(w), cfgs).items():
            acc.setdefault(c, []).append(kl)
        print(f"window {i + 1}/{len(wins)}", file=sys.stderr)
    kl = {c: float(np.mean(v)) for c, v in acc.items()}
    res = {"model": path.name, "bits": args.bits, "windows": len(wins), "ctx": CTX, "scored": SCORED,
           "machine": machine(command_line("kv_heads.py", argv)),
           "kl": [{"layer": c[0], "head": c[1], "kind": c[2], "kl": v} for c, v in kl.items()]}
    lines = [f"# KV damage per (layer, head): {path.name}, {args.bits}-bit keys or values, {len(wins)} calibration "
             f"windows", "", "Mean KL (nats) of the scored tokens from the exact pass when one KV head's context "
             "keys (or values) are fake-quantized; `layer` = both heads of the layer.", ""]
    for kind in "kv":
        per_layer = np.array([kl[(layer, None, kind, args.bits)] for layer in range(L)])
        heads = np.array([[kl[(layer, h, kind, args.bits)] for h in range(H)] for layer in range(L)])
        within = np.mean(heads.max(1) - heads.min(1))
        spread = np.std(np.log(np.maximum(per_layer, 1e-9)))
        within_log = np.mean(np.std(np.log(np.maximum(heads, 1e-9)), axis=1))
        res[f"{kind}_summary"] = {"between_layers_log_sd": float(spread), "within_layer_log_sd": float(within_log),
                                  "mean_head_range": float(within)}
        lines += [f"## {'keys' if kind == 'k' else 'values'}", "", "| layer | " + " | ".join(f"head {h}" for h in range(H))
                  + " | layer |", "|---" * (H + 2) + "|"]
        for layer in range(L):
            lines.append(f"| {layer} | " + " | ".join(f"{x:.5f}" for x in heads[layer]) + f" | {per_layer[layer]:.5f} |")
        lines += ["", f"Spread (standard deviation of log KL): between layers {spread:.2f}, between the heads of a "
                  f"layer {within_log:.2f} (mean over layers).", ""]
    lines += [f"Machine: {machine_line(res['machine'])}", ""]
    Path(args.out + ".json").write_text(json.dumps(res, indent=1))
    Path(args.out + ".md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
