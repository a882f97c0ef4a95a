"""Decode ms/token of several edgekv source trees at one context length, in the same run.

A before/after check of a change to the C core: each tree (a checkout with its ``build/``) gets a
worker subprocess with ``PYTHONPATH=TREE/python`` (so the tree's own package and library, whatever
their ABI version), which loads the model with ``kv=POLICY``, prefills the first --ctx tokens of
WikiText-2 valid once, and then on each turn times --block greedy decode steps (one ``ek_forward``
each, the KV policy applied as in generation, ``Model._eval(..., defer=True)`` as
benchmarks/decode.py drives it) and cuts the context back to --ctx. The parent gives the trees
turns block by block for --rounds rounds (the first tree to go alternates), so the drifts of a
shared machine reach every tree alike. Reports per tree the median ms/token over all steps, and
per later tree the median of its paired block ratios to the first (the baseline).

    PYTHONPATH=python python benchmarks/decode_ab.py --trees /path/to/old/checkout . --ctx 4096 --kv int4

Writes benchmarks/results/decode_ab.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "wikitext2_valid.txt"
RESULTS = REPO / "benchmarks" / "results"


def worker(args) -> None:
    """One tree: load, prefill, then time a block per line read from stdin; print JSON lines."""
    import warnings

    import numpy as np

    import edgekv
    from edgekv._native import LIB_PATH, SIMD, lib

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = edgekv.load(args.model, threads=args.threads, ctx=args.ctx + args.block + 8, kv=args.kv, progress=False)
    text = DATA.read_text(encoding="utf-8")[: max(20000, args.ctx * 8)]
    ids = np.ascontiguousarray(m.tokenize(text)[: args.ctx], np.int32)
    if ids.size < args.ctx:
        raise SystemExit(f"{DATA} gave only {ids.size} tokens")
    t0 = time.perf_counter()
    m._eval(ids, lib.EK_LOGITS_LAST, m._logits)
    prefill_s = time.perf_counter() - t0
    one = np.zeros(1, np.int32)
    for _ in range(2):  # warm-up steps, untimed
        one[0] = int(m._logits.argmax())
        m._eval(one, lib.EK_LOGITS_LAST, m._logits, defer=True)
    m._truncate(args.ctx)
    print(json.dumps({"ready": True, "lib": str(LIB_PATH), "simd": SIMD, "package": edgekv.__file__,
                      "prefill_s": prefill_s}), flush=True)
    first = int(m._logits.argmax())
    for line in sys.stdin:
        if line.strip() != "block":
            break
        times, tok = [], first
        for _ in range(args.block):
            one[0] = tok
            t0 = time.perf_counter()
            m._eval(one, lib.EK_LOGITS_LAST, m._logits, defer=True)
            times.append(time.perf_counter() - t0)
            tok = int(m._logits.argmax())
        m._truncate(args.ctx)
        print(json.dumps({"times": times}), flush=True)
    m.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trees", nargs="+", default=[], help="source trees, the baseline first")
    ap.add_argument("--labels", nargs="*", default=None, help="a name per tree (default: the paths)")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--ctx", type=int, default=4096)
    ap.add_argument("--kv", default="int4")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--block", type=int, default=16, help="decode steps per turn")
    ap.add_argument("--rounds", type=int, default=12, help="turns per tree")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return

    if not args.trees:
        raise SystemExit("--trees: at least one source tree")
    trees = [Path(t).resolve() for t in args.trees]
    labels = args.labels or [str(t) for t in trees]
    if len(labels) != len(trees):
        raise SystemExit("--labels needs one name per tree")
    wargs = ["--worker", "--model", args.model, "--ctx", str(args.ctx), "--kv", args.kv, "--threads",
             str(args.threads), "--block", str(args.block)]
    procs, info = [], []
    for t in trees:  # one at a time: prefills do not overlap
        env = dict(os.environ, PYTHONPATH=str(t / "python"))
        env.pop("EDGEKV_LIB", None)
        p = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), *wargs], env=env, cwd=str(t),
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        info.append(json.loads(p.stdout.readline()))
        procs.append(p)
    times = [[] for _ in trees]
    blocks = [[] for _ in trees]
    for r in range(args.rounds):
        order = list(range(len(trees)))
        if r % 2:
            order.reverse()
        for i in order:
            procs[i].stdin.write("block\n")
            procs[i].stdin.flush()
            ts = json.loads(procs[i].stdout.readline())["times"]
            times[i] += ts
            blocks[i].append(statistics.median(ts))
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{labels[i]} {1e3 * blocks[i][-1]:.2f}" for i in range(len(trees))),
              flush=True)
    for p in procs:
        p.stdin.close()
        p.wait()

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import command_line, machine, machine_line

    fastest = min(min(b) for b in blocks)
    rows = []
    for i, t in enumerate(trees):
        row = {"label": labels[i], "tree": str(t), **info[i], "ms_per_token_median": 1e3 * statistics.median(times[i]),
               "ms_per_token_p10": 1e3 * sorted(times[i])[len(times[i]) // 10],
               "ms_per_token_p90": 1e3 * sorted(times[i])[9 * len(times[i]) // 10], "steps": len(times[i]),
               "block_medians_ms": [1e3 * b for b in blocks[i]]}
        if i:
            row["ratio_of_medians"] = row["ms_per_token_median"] / rows[0]["ms_per_token_median"]
            row["ratio_of_p10"] = row["ms_per_token_p10"] / rows[0]["ms_per_token_p10"]
            row["median_paired_ratio"] = statistics.median(b / a for a, b in zip(blocks[0], blocks[i]))
            # pairs where neither block was slowed by other processes (both within 1.25x of the fastest
            # block of the run): on a loaded machine, the comparison that load does not decide
            clean = [b / a for a, b in zip(blocks[0], blocks[i]) if max(a, b) <= 1.25 * fastest]
            row["clean_pairs"] = len(clean)
            row["median_clean_paired_ratio"] = statistics.median(clean) if clean else None
        rows.append(row)
    meta = machine(command_line("decode_ab.py"))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "decode_ab.json").write_text(json.dumps({"machine": meta, "args": vars(args) | {"out": str(args.out)},
                                                        "rows": rows}, indent=1, default=str) + "\n")
    lines = ["# Decode ms/token, source trees against the first, same run", "",
             f"{args.model}, kv={args.kv}, context {args.ctx} (WikiText-2 valid), {args.threads} threads, "
             f"{args.rounds} turns of {args.block} steps per tree, turns interleaved; {machine_line(meta)}.", "",
             "Ratios to the first tree: of the medians, of the p10s, the median of the paired block ratios (adjacent "
             "turns), and the same over the clean pairs only (both blocks within 1.25x of the run's fastest block: "
             "on a shared machine, the pairs that other processes did not slow).", "",
             "| tree | SIMD | ms/token median | p10 | p90 | ratio of medians | ratio of p10 | median paired ratio | "
             "clean pairs: median ratio (n) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        clean = "-" if "clean_pairs" not in r else (
            f"{r['median_clean_paired_ratio']:.3f} ({r['clean_pairs']})" if r["clean_pairs"] else "none")
        lines.append(f"| {r['label']} | {r['simd']} | {r['ms_per_token_median']:.2f} | {r['ms_per_token_p10']:.2f} | "
                     f"{r['ms_per_token_p90']:.2f} | {r.get('ratio_of_medians', 1.0):.3f} | {r.get('ratio_of_p10', 1.0):.3f} | "
                     f"{r.get('median_paired_ratio', 1.0):.3f} | {clean} |")
    (args.out / "decode_ab.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
