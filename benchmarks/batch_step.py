"""Aggregate decode throughput of B sessions stepped together (Model.step) against the same B
sessions stepped one after another (Session.eval), in the same run.

For each model and B in --batches: B sessions each prefill their own --context-token slice of
WikiText-2 valid; then, --reps times, alternating the two ways (the sessions cut back to their
prefixes before each): --steps greedy decode steps of all B sessions, by one Model.step per step
("step") or by B Session.eval calls per step ("sequential"). Throughput: B * steps / seconds,
median over reps. Both ways must produce the same greedy tokens (checked and recorded).

    PYTHONPATH=python python benchmarks/batch_step.py

Writes benchmarks/results/batch_step.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command_line, machine, machine_line  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "wikitext2_valid.txt"
RESULTS = REPO / "benchmarks" / "results"


def _decode(model, sessions, first, steps: int, batched: bool) -> tuple[float, list]:
    """Seconds for `steps` greedy steps of every session from logits `first`; the tokens."""
    nxt = [int(f.argmax()) for f in first]
    toks = [[] for _ in sessions]
    t0 = time.perf_counter()
    for _ in range(steps):
        if batched:
            out = model.step(sessions, [[t] for t in nxt])
        else:
            out = [s.eval([t]) for s, t in zip(sessions, nxt)]
        for i, o in enumerate(out):
            toks[i].append(nxt[i])
        nxt = [int(o.argmax()) for o in out]
    return time.perf_counter() - t0, toks


def measure(name: str, batches, context: int, steps: int, reps: int, threads: int, text: str) -> dict:
    import edgekv

    rows = {}
    with edgekv.load(name, threads=threads, ctx=context + steps + 8, progress=False) as m:
        ids = m.tokenize(text)
        for b in batches:
            prompts = [ids[i * context:(i + 1) * context] for i in range(b)]
            sessions = [m.new_session() for _ in range(b)]
            first = [s.eval(p) for s, p in zip(sessions, prompts)]
            times: dict = {"step": [], "sequential": []}
            tokens: dict = {}
            for rep in range(reps + 1):  # rep 0: warm-up
                for mode in (("step", "sequential") if rep % 2 == 0 else ("sequential", "step")):
                    for s in sessions:
                        s.truncate(context)
                    dt, toks = _decode(m, sessions, first, steps, mode == "step")
                    tokens[mode] = toks
                    if rep:
                        times[mode].append(dt)
            for s in sessions:
                s.close()
            med = {k: statistics.median(v) for k, v in times.items()}
            rows[str(b)] = {
                "step_tok_s": b * steps / med["step"], "sequential_tok_s": b * steps / med["sequential"],
                "speedup": med["sequential"] / med["step"], "same_tokens": tokens["step"] == tokens["sequential"],
                "raw_s": times,
            }
            r = rows[str(b)]
            print(f"{name} B={b}: step {r['step_tok_s']:.1f} tok/s, sequential {r['sequential_tok_s']:.1f} tok/s "
                  f"({r['speedup']:.2f}x), same tokens: {r['same_tokens']}", file=sys.stderr, flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["smollm2-135m", "qwen2.5-coder-0.5b"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 2, 4, 8])
    ap.add_argument("--context", type=int, default=64, help="prompt tokens per session")
    ap.add_argument("--steps", type=int, default=16, help="decode steps per rep")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    cmd = command_line("batch_step.py", argv)
    info = machine(cmd)
    text = DATA.read_text()[:40000]
    load0 = os.getloadavg()[0]
    res = {name: measure(name, a.batches, a.context, a.steps, a.reps, a.threads, text) for name in a.models}
    load = [load0, os.getloadavg()[0]]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "batch_step.json").write_text(json.dumps(
        {"machine": info, "load_average_1min_start_end": load, "threads": a.threads, "context": a.context, "steps": a.steps, "reps": a.reps,
         "results": res}, indent=1) + "\n")
    L = ["# Batched decode step: B sessions in one pass over the weights", "",
         f"Aggregate decode tokens/s of B sessions, each after its own {a.context}-token slice of WikiText-2 "
         f"valid: `Model.step` (one pass over the weights per step for all B) against B `Session.eval` calls "
         f"per step, {a.steps} greedy steps, median of {a.reps} reps alternating the two, {a.threads} threads, "
         "same run. \"same tokens\": both ways produced identical greedy tokens.", "",
         f"Machine: {machine_line(info)}; {info['date_utc']}. 1-minute load average {load[0]:.1f} at the start, "
         f"{load[1]:.1f} at the end (other jobs share the CPUs: absolute tokens/s are low, the two ways alternate "
         "within each rep so their ratio holds).", "",
         "| model | B | step (tok/s) | sequential (tok/s) | speedup | same tokens |",
         "|---|---:|---:|---:|---:|---|"]
    for name, rows in res.items():
        for b, r in rows.items():
            L.append(f"| {name} | {b} | {r['step_tok_s']:.1f} | {r['sequential_tok_s']:.1f} | {r['speedup']:.2f}x | "
                     f"{'yes' if r['same_tokens'] else 'NO'} |")
    (RESULTS / "batch_step.md").write_text("\n".join(L) + "\n")
    print("\n".join(L))
    return 0


if __name__ == "__main__":
    sys.exit(main())
