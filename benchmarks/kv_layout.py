"""Which KV record layout to ship: group size, Hadamard rotation, key centering and grid fitting, measured.

WikiText-2 valid (../shared/data/wikitext2_valid.txt), SmolLM2-135M: windows of 512
tokens; the first 384 are stored under the policy, the last 128 scored one token at a
time (each scored token's predecessors all stored under the policy: W=0). Perplexity
for each (policy, group size, rotation, key centering), relative to fp16 on the same
positions. Two tables: group size x rotation (keys not centered), then key centering
off/on at the shipped groups with rotation, with a paired bootstrap CI over windows.

    PYTHONPATH=python python benchmarks/kv_layout.py [--windows 8]
    PYTHONPATH=python python benchmarks/kv_layout.py --part fit [--windows 32] [--policies int3,...]

Writes benchmarks/results/kv_groups.{json,md}; --part fit compares the fitted quantization grid
(kv_fit_grid: each group's scale and minimum chosen for the least squared error) with min/max at
the shipped layout, static policies and the learned controller at 3.5 bits, and writes
benchmarks/results/kv_fit.{json,md}.
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
from common import bootstrap, ci95

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
    pct = bootstrap(lambda idx: 100 * (np.exp(a[idx].mean(axis=(1, 2)) - b[idx].mean(axis=(1, 2))) - 1), a.shape[0], boot)
    return (100 * (np.exp(a.mean() - b.mean()) - 1), *ci95(pct))


def fmt_ci(t: tuple[float, float, float]) -> str:
    """paired_ci's (change, low, high) as '+1.23% [+0.45, +2.01]'."""
    return f"{t[0]:+.2f}% [{t[1]:+.2f}, {t[2]:+.2f}]"


FIT_POLICIES = ("int4", "k4v3", "k4v2", "int3", "k3v2", "int2", "adaptive@3.5")


def window_nll(path, text: str, windows: int, threads: int, **load) -> tuple[np.ndarray, float]:
    """(windows, 128) NLL of the last 128 tokens of each 512-token window, and the average KV bits."""
    with edgekv.load(path, threads=threads, ctx=512, progress=False, **load) as m:
        ids = m.tokenize(text, special=False)
        nll = [-m.score(ids[w * 512:w * 512 + 384], ids[w * 512 + 384:(w + 1) * 512], sequential=True)
               for w in range(windows)]
        return np.stack(nll), m.kv_avg_bits


def decode_cost(path, text: str, threads: int, pol: str = "int3", ctx: int = 1024, blocks: int = 24,
                per_block: int = 16) -> dict:
    """Decode ms/token under `pol` with min/max vs fitted grids: both models in this process, one
    prefill of ctx/2 tokens each, then single-token steps in blocks alternating between them (each
    new token is encoded once per layer and head at W=0, so the fit's cost is in every step)."""
    models = {fit: edgekv.load(path, threads=threads, ctx=ctx, kv=pol, kv_fit_grid=fit, progress=False)
              for fit in (False, True)}
    try:
        ids = models[False].tokenize(text, special=False)
        times = {False: [], True: []}
        for fit, m in models.items():
            m.logits(ids[:ctx // 2])
        pos = ctx // 2
        for b in range(blocks):
            for fit in ((False, True) if b % 2 == 0 else (True, False)):
                m = models[fit]
                with m._lock:
                    for t in range(per_block):
                        tok = np.array([ids[pos + t]], np.int32)
                        t0 = time.perf_counter()
                        m.session.eval(tok)
                        times[fit].append(time.perf_counter() - t0)
            pos += per_block
            if pos + per_block >= ctx:
                break
    finally:
        for m in models.values():
            m.close()
    med = {fit: 1e3 * float(np.median(t)) for fit, t in times.items()}
    return {"policy": pol, "context": f"{ctx // 2}..{pos}", "steps_each": len(times[False]),
            "ms_per_token_minmax": med[False], "ms_per_token_fit": med[True],
            "ratio": med[True] / med[False]}


def fit_part(args) -> None:
    """Grid fitting off/on at the shipped layout (groups, rotation, key centering)."""
    path = edgekv.registry.resolve("smollm2-135m")
    text = DATA.read_text()
    t0 = time.time()
    fp16, _ = window_nll(path, text, args.windows, args.threads, kv="fp16")
    rows = []
    for pol in tqdm(args.policies.split(","), desc="policies"):
        nll, bits = {}, {}
        for fit in (False, True):
            nll[fit], bits[fit] = window_nll(path, text, args.windows, args.threads, kv=pol, kv_fit_grid=fit)
        rows.append({"policy": pol, "avg_bits_minmax": bits[False], "avg_bits_fit": bits[True],
                     "minmax_vs_fp16": paired_ci(nll[False], fp16), "fit_vs_fp16": paired_ci(nll[True], fp16),
                     "fit_vs_minmax": paired_ci(nll[True], nll[False])})
    cost = decode_cost(path, text, args.threads)
    default_set = args.policies == ",".join(FIT_POLICIES)
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "data": "shared/data/wikitext2_valid.txt", "windows": args.windows, "positions": int(fp16.size),
            "fp16_ppl": float(np.exp(fp16.mean())), "seconds": time.time() - t0,
            "command": f"PYTHONPATH=python python benchmarks/kv_layout.py --part fit --windows {args.windows}"
                       + ("" if default_set else f" --policies {args.policies}")}
    RESULTS.mkdir(exist_ok=True)
    out = "kv_fit" if default_set else f"kv_fit_{args.windows}w"
    (RESULTS / f"{out}.json").write_text(json.dumps({"meta": meta, "rows": rows, "decode_cost": cost}, indent=2))
    lines = ["# KV quantization grid: min/max vs fitted (kv_fit_grid)", "",
             f"WikiText-2 valid, SmolLM2-135M-Instruct Q4_1, {args.windows} windows of 512 tokens: 384 stored under "
             f"the policy, the last 128 scored one at a time (W=0); {fp16.size} positions, fp16 perplexity "
             f"{meta['fp16_ppl']:.3f}. Shipped layout (groups {list(DEFAULT_GROUPS)}, rotation, key centering). "
             f"{meta['date']}.", f"Command: `{meta['command']}`", "",
             "Fitted grid: per group, the scale and minimum of least squared error among min/max, min/max refined "
             "by two least-squares steps, and the range clipped to 80% refined the same way (csrc/kv_quant.c); "
             "same record format and bits. Perplexity change in %, 95% paired bootstrap CI over windows "
             "(10,000 resamples). The learned controller decides from the same features either way; its "
             "bits can differ slightly because its inputs come from a forward pass over a differently "
             "quantized cache.", "",
             "| policy | avg bits (min/max, fit) | min/max vs fp16 | fit vs fp16 | fit vs min/max |",
             "|---|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['policy']} | {r['avg_bits_minmax']:.3f}, {r['avg_bits_fit']:.3f} | "
                     f"{fmt_ci(r['minmax_vs_fp16'])} | {fmt_ci(r['fit_vs_fp16'])} | {fmt_ci(r['fit_vs_minmax'])} |")
    lines += ["", "## Encoding cost", "",
              f"Decode ms/token, kv={cost['policy']} (every new token encoded at once), context {cost['context']}, "
              f"{cost['steps_each']} steps each, both models in one process in alternating blocks of 16, "
              f"{args.threads} threads, median: min/max {cost['ms_per_token_minmax']:.3f}, fit "
              f"{cost['ms_per_token_fit']:.3f} ({cost['ratio']:.3f}x). A shared 2-core machine: differences "
              "of a few percent are within its noise."]
    (RESULTS / f"{out}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", choices=("layout", "fit"), default="layout")
    ap.add_argument("--windows", type=int, default=None, help="windows of 512 tokens (default: 8; 32 for --part fit)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--policies", default=",".join(FIT_POLICIES),
                    help="--part fit: policies to compare (other than the default set: writes kv_fit_<windows>w.*)")
    args = ap.parse_args()
    if args.part == "fit":
        args.windows = args.windows or 32
        return fit_part(args)
    args.windows = args.windows or 8
    path = edgekv.registry.resolve("smollm2-135m")
    text = DATA.read_text()
    rows, nlls = [], {}
    ref = None
    for pol, groups, rot, center in tqdm(CONFIGS, desc="configs"):
        t0 = time.time()
        nll, bits = window_nll(path, text, args.windows, args.threads, kv=pol, kv_groups=groups, kv_rotate=rot,
                               kv_center_keys=center)
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
    for c in centering:
        lines.append(f"| {c['policy']} | {bits_of[c['policy']]:.2f} | {fmt_ci(c['off_vs_fp16'])} | {fmt_ci(c['on_vs_fp16'])} | "
                     f"{fmt_ci(c['on_vs_off'])} |")
    (RESULTS / "kv_groups.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
