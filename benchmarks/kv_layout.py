"""Which KV record layout to ship: group size and Hadamard rotation, measured.

WikiText-2 valid (../shared/data/wikitext2_valid.txt), SmolLM2-135M: windows of 512
tokens; the first 384 are stored under the policy, the last 128 scored one token at a
time (each scored token's predecessors all stored under the policy: W=0). Perplexity
for each (policy, group size, rotation), relative to fp16 on the same positions.

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

# (policy, groups for 8/4/2 bits, rotate)
CONFIGS = [("fp16", (64, 64, 32), True)] + [
    (pol, (g, g, g), rot) for pol in ("int4", "k4v2", "int2") for g in (32, 64) for rot in (False, True)
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    path = edgekv.registry.resolve("smollm2-135m")
    text = DATA.read_text()
    rows = []
    ref = None
    for pol, groups, rot in tqdm(CONFIGS, desc="configs"):
        t0 = time.time()
        with edgekv.load(path, threads=args.threads, ctx=512, kv=pol, kv_groups=groups, kv_rotate=rot,
                         progress=False) as m:
            ids = m.tokenize(text, special=False)
            nll = []
            for w in range(args.windows):
                win = ids[w * 512:(w + 1) * 512]
                nll.append(-m.score(win[:384], win[384:], sequential=True))
            bits = m.kv_avg_bits
        nll = np.concatenate(nll)
        ppl = float(np.exp(nll.mean()))
        if pol == "fp16":
            ref = ppl
        rows.append({"policy": pol, "groups": list(groups), "rotate": rot, "avg_bits": bits, "ppl": ppl,
                     "ppl_rel_pct": 100 * (ppl / ref - 1), "positions": int(nll.size), "seconds": time.time() - t0})
    RESULTS.mkdir(exist_ok=True)
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "data": "shared/data/wikitext2_valid.txt", "windows": args.windows,
            "command": f"PYTHONPATH=python python benchmarks/kv_layout.py --windows {args.windows}"}
    (RESULTS / "kv_groups.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = ["# KV record layout: group size and rotation", "",
             f"WikiText-2 valid, SmolLM2-135M-Instruct Q4_1, {args.windows} windows of 512 tokens: 384 stored under "
             f"the policy, the last 128 scored one at a time (W=0); {rows[0]['positions']} positions. {meta['date']}.",
             f"Command: `{meta['command']}`", "",
             "| policy | group | rotation | avg bits | perplexity | vs fp16 |", "|---|---:|---|---:|---:|---:|"]
    for r in rows:
        g = "-" if r["policy"] == "fp16" else str(r["groups"][1] if r["policy"] != "int2" else r["groups"][2])
        lines.append(f"| {r['policy']} | {g} | {'on' if r['rotate'] else 'off'} | {r['avg_bits']:.2f} | "
                     f"{r['ppl']:.3f} | {r['ppl_rel_pct']:+.2f}% |")
    (RESULTS / "kv_groups.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
