"""Which KV record layout to ship: group size, Hadamard rotation and key centering, measured.

WikiText-2 valid (../shared/data/wikitext2_valid.txt), SmolLM2-135M: windows of 512
tokens; the first 384 are stored under the policy, the last 128 scored one token at a
time (each scored token's predecessors all stored under the policy: W=0). Perplexity
for each (policy, group size, rotation, key centering), relative to fp16 on the same
positions. Two tables: group size x rotation (keys not centered), then key centering
off/on at the shipped groups with rotation, with a paired bootstrap CI over windows.

    PYTHONPATH=python python benchmarks/kv_layout.py [--windows 8]

Writes benchmarks/results/kv_groups.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

import edgekv

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "wikitext2_valid.txt"
RESULTS = ROOT / "benchmarks" / "results"

DEFAULT_GROUPS = (64, 64, 32)
# (policy, groups for 8/4/2 bits, rotate, center keys)
CONFIGS = [("fp16", DEFAULT_GROUPS, True, False)] + [
    (pol, (g, g, g), rot, False) for pol in ("int4", "k4v2", "int2") for g in (32, 64) for rot in (False, True)
] + [(pol, DEFAULT_GROUPS, True, c) for pol in ("int4", "k4v2", "k2v4", "int2") for c in (False, True)]


def paired_ci(a: np.ndarray, b: np.ndarray, boot: int = 10000) -> tuple[float, float, float]:
    """Perplexity of a relative to b in percent, with a 95% bootstrap CI over windows (rows)."""
    r = np.random.default_rng(0)
    idx = r.integers(0, a.shape[0], (boot, a.shape[0]))
    pct = 100 * (np.exp(a[idx].mean(axis=(1, 2)) - b[idx].mean(axis=(1, 2))) - 1)
    return 100 * (np.exp(a.mean() - b.mean()) - 1), float(np.percentile(pct, 2.5)), float(np.percentile(pct, 97.5))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    path = edgekv.registry.resolve("smollm2-135m")
    text = DATA.read_text()
    rows, nlls = [], {}
    ref = None
    for pol, groups, rot, center in tqdm(CONFIGS, desc="configs"):
        t0 = time.time()
        with edgekv.load(path, threads=args.threads, ctx=512, kv=pol, kv_groups=groups, kv_rotate=rot,
                         kv_center_keys=center, progress=False) as m:
            ids = m.tokenize(text, special=False)
            nll = []
            for w in range(args.windows):
                win = ids[w * 512:(w + 1) * 512]
                nll.append(-m.score(win[:384], win[384:], sequential=True))
            bits = m.kv_avg_bits
        nll = np.stack(nll)  # (windows, 128)
        nlls[(pol, groups, rot, center)] = nll
        ppl = float(np.exp(nll.mean()))
        if pol == "fp16":
            ref = ppl
        rows.append({"policy": pol, "groups": list(groups), "rotate": rot, "center_keys": center, "avg_bits": bits,
                     "ppl": ppl, "ppl_rel_pct": 100 * (ppl / ref - 1), "positions": int(nll.size),
                     "seconds": time.time() - t0})
    fp16 = nlls[CONFIGS[0]]
    centering = []
    for pol in ("int4", "k4v2", "k2v4", "int2"):
        off, on = nlls[(pol, DEFAULT_GROUPS, True, False)], nlls[(pol, DEFAULT_GROUPS, True, True)]
        centering.append({"policy": pol, "off_vs_fp16": paired_ci(off, fp16),
                          "on_vs_fp16": paired_ci(on, fp16), "on_vs_off": paired_ci(on, off)})
    RESULTS.mkdir(exist_ok=True)
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "data": "shared/data/wikitext2_valid.txt", "windows": args.windows,
            "command": f"PYTHONPATH=python python benchmarks/kv_layout.py --windows {args.windows}"}
    (RESULTS / "kv_groups.json").write_text(json.dumps({"meta": meta, "rows": rows, "centering": centering},
                                                       indent=2))
    lines = ["# KV record layout: group size, rotation and key centering", "",
             f"WikiText-2 valid, SmolLM2-135M-Instruct Q4_1, {args.windows} windows of 512 tokens: 384 stored under "
             f"the policy, the last 128 scored one at a time (W=0); {rows[0]['positions']} positions. {meta['date']}.",
             f"Command: `{meta['command']}`", "",
             "## Group size and rotation (keys not centered)", "",
             "| policy | group | rotation | avg bits | perplexity | vs fp16 |", "|---|---:|---|---:|---:|---:|"]
    for r in rows:
        if r["center_keys"] or (r["policy"] != "fp16" and r["groups"][0] != r["groups"][2]):
            continue
        g = "-" if r["policy"] == "fp16" else str(r["groups"][1] if r["policy"] != "int2" else r["groups"][2])
        lines.append(f"| {r['policy']} | {g} | {'on' if r['rotate'] else 'off'} | {r['avg_bits']:.2f} | "
                     f"{r['ppl']:.3f} | {r['ppl_rel_pct']:+.2f}% |")
    lines += ["", f"## Key centering (groups {list(DEFAULT_GROUPS)} for 8/4/2 bits, rotation on)", "",
              "Quantized keys stored minus their head's mean key (kv_store.h); the mean comes back as a score "
              "offset, so only the quantization error changes. Perplexity change in %, 95% bootstrap CI over "
              "windows (10,000 resamples).", "",
              "| policy | avg bits | not centered vs fp16 | centered vs fp16 | centered vs not centered |",
              "|---|---:|---:|---:|---:|"]
    bits_of = {r["policy"]: r["avg_bits"] for r in rows if r["center_keys"]}

    def fmt(t):
        return f"{t[0]:+.2f}% [{t[1]:+.2f}, {t[2]:+.2f}]"

    for c in centering:
        lines.append(f"| {c['policy']} | {bits_of[c['policy']]:.2f} | {fmt(c['off_vs_fp16'])} | {fmt(c['on_vs_fp16'])} | "
                     f"{fmt(c['on_vs_off'])} |")
    (RESULTS / "kv_groups.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
