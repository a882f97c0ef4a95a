"""Cost of one forward pass over k new tokens, relative to k = 1 (the price of EAD's catch-up).

When entropy adaptive decoding hands over to a model, that model runs the k tokens it has not seen
in one batch where an up-to-date model would run one: catch-up costs what a batch of k costs more
than a single step. For each k, after a --context-token prefix of WikiText-2 valid, the script
times one forward pass of k tokens (logits for the last one, as EAD asks), --reps times, median.

--libs runs the same measurement against several builds of libedgekv (EDGEKV_LIB), one
subprocess per build and round, rounds interleaved: a before/after comparison on one machine.

    PYTHONPATH=python python benchmarks/batch_cost.py --model qwen2.5-coder-1.5b
    PYTHONPATH=python python benchmarks/batch_cost.py --libs old/libedgekv.so build/libedgekv.so

Writes benchmarks/results/batch_cost.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "wikitext2_valid.txt"
RESULTS = REPO / "benchmarks" / "results"
KS = (1, 2, 3, 4, 6, 8, 16)


def batch_times(m, ids, context: int, k: int, runs: int) -> list:
    """Seconds of `runs` forward passes over ids[context:context+k] on top of the cached
    ids[:context] (logits for the last token), the cache cut back to `context` before each."""
    import time

    import numpy as np

    batch = np.asarray(ids[context:context + k], np.int32)
    ts = []
    for _ in range(runs):
        m.session.truncate(context)
        t0 = time.perf_counter()
        m.session.eval(batch)
        ts.append(time.perf_counter() - t0)
    return ts


def measure(model: str, context: int, reps: int, threads: int) -> dict:
    """In this process: {k: [seconds per rep]}."""
    import numpy as np

    import edgekv

    with edgekv.load(model, threads=threads, ctx=context + max(KS) + 8, progress=False) as m:
        ids = np.asarray(m.tokenize(DATA.read_text()[:20000])[: context + max(KS)], np.int32)
        m.session.eval(ids[:context])
        return {str(k): batch_times(m, ids, context, k, reps + 1)[1:] for k in KS}  # the first is a warm-up


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="qwen2.5-coder-1.5b")
    ap.add_argument("--context", type=int, default=300)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2, help="subprocess rounds per build (interleaved)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--libs", nargs="*", default=None, help="libedgekv builds to compare (default: the one found)")
    ap.add_argument("--labels", nargs="*", default=None, help="a name per --libs entry, for the table")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        print(json.dumps(measure(a.model, a.context, a.reps, a.threads)))
        return 0
    libs = a.libs or [None]
    runs: dict = {str(lib): {str(k): [] for k in KS} for lib in libs}
    for rnd in range(a.rounds):
        for lib in (libs if rnd % 2 == 0 else libs[::-1]):
            env = dict(os.environ)
            if lib:
                env["EDGEKV_LIB"] = str(Path(lib).resolve())
            cmd = [sys.executable, __file__, "--worker", "--model", a.model, "--context", str(a.context),
                   "--reps", str(a.reps), "--threads", str(a.threads)]
            res = json.loads(subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout)
            for k, ts in res.items():
                runs[str(lib)][k] += ts
            print(f"round {rnd} {lib or 'default'}: " + ", ".join(
                f"k={k} {1e3 * statistics.median(ts):.1f} ms" for k, ts in res.items()), file=sys.stderr)
    rows = {lib: {k: statistics.median(ts) for k, ts in r.items()} for lib, r in runs.items()}
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "batch_cost.json").write_text(json.dumps(
        {"date": date, "model": a.model, "context": a.context, "threads": a.threads, "reps": a.reps,
         "rounds": a.rounds, "median_s": rows, "raw_s": runs, "command": " ".join(["python", *sys.argv])}, indent=1))
    L = ["# Forward-pass cost of k new tokens (EAD catch-up)", "",
         f"Model `{a.model}`, {a.threads} threads, after a {a.context}-token prefix of WikiText-2 valid; median "
         f"of {a.reps} reps x {a.rounds} rounds; {date}. Command: `{' '.join(['python', *sys.argv])}`", "",
         "| build | " + " | ".join(f"k={k}" for k in KS) + " |", "|---|" + "---:|" * len(KS)]
    names = dict(zip(map(str, libs), a.labels or []))
    for lib, r in rows.items():
        L.append(f"| {names.get(lib, lib if lib != 'None' else 'default')} | " + " | ".join(
            f"{1e3 * r[str(k)]:.1f} ms ({r[str(k)] / r['1']:.2f}x)" for k in KS) + " |")
    (RESULTS / "batch_cost.md").write_text("\n".join(L) + "\n")
    print("\n".join(L))
    return 0


if __name__ == "__main__":
    sys.exit(main())
