"""Attention kernel throughput over the mixed-precision KV cache, in GB/s of cache read.

For each KV precision and context length, the script fills a real model's cache
(SmolLM2-135M geometry: 30 layers x 3 KV heads x head_dim 64) with synthetic keys
and values stored at that precision, then times one decode step's attention over
all layers (the same C code path as generation; median of --iters runs). Bytes
read = every record of the cache (scales and minimums included). In the same run
it measures this machine's sequential read bandwidth (one thread, and --threads),
the ceiling a bandwidth-bound kernel would reach: the machine is shared, so each
row is timed in rounds, each right after a bandwidth sample, and both figures
are medians over the run.

    PYTHONPATH=python python benchmarks/kernels.py [--ctx 1024 4096 8192] [--threads 2]

Writes benchmarks/results/kernels.{json,md,png}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
from pathlib import Path

import edgekv
from common import command_line, machine, machine_line
from edgekv._native import SIMD, lib

RESULTS = Path(__file__).resolve().parent / "results"
POLICIES = [("fp16", 16, 16), ("int8", 8, 8), ("int4", 4, 4), ("k4v2", 4, 2), ("int2", 2, 2)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ctx", type=int, nargs="+", default=[1024, 4096, 8192])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=21, help="decode steps timed per round")
    ap.add_argument("--rounds", type=int, default=5, help="rounds per (context, policy), each after a bandwidth sample")
    ap.add_argument("--model", default="smollm2-135m")
    args = ap.parse_args()

    # The machine is shared and its speed drifts within seconds: each (context, policy) is timed in
    # --rounds rounds, each round right after a read-bandwidth sample, and both are reported as
    # medians over the run (attention: the median of the rounds' medians of --iters steps).
    bw_samples: dict[str, list[float]] = {"1": [], str(args.threads): []}

    def sample_bandwidth() -> None:
        for t in bw_samples:
            bw_samples[t].append(lib.ek_bench_read_bandwidth(1 << 28, int(t), 5) / 1e9)

    rows = []
    for n in args.ctx:
        with edgekv.load(args.model, threads=args.threads, ctx=n, progress=False) as m:
            for name, kb, vb in POLICIES:
                if lib.ek_bench_fill_kv(m.c_handle, n, kb, vb, 7) != 0:
                    raise RuntimeError(m._c_error())
                times = []
                for _ in range(args.rounds):
                    sample_bandwidth()
                    times.append(lib.ek_bench_attention(m.c_handle, args.iters))
                t = statistics.median(times)
                nbytes = lib.ek_kv_data_bytes(m.c_handle)
                hp = m.hparams
                elems = 2 * n * hp["n_layer"] * hp["n_head_kv"] * hp["head_dim"]  # K and V values cached
                records = n * hp["n_layer"] * hp["n_head_kv"]  # (token, layer, KV head) records read per step
                row = {
                    "policy": name, "ctx": n, "ms_per_step": 1e3 * t, "ms_per_step_rounds": [1e3 * x for x in times],
                    "cache_mb": nbytes / 1e6, "gb_s": nbytes / t / 1e9, "avg_bits": 8 * nbytes / elems,
                    "ns_per_record_thread": 1e9 * t * args.threads / records,
                }
                rows.append(row)
                print(f"ctx {n:5d} {name:5s}: {row['ms_per_step']:7.2f} ms/step (rounds {min(times) * 1e3:.2f}-"
                      f"{max(times) * 1e3:.2f})  {row['cache_mb']:7.1f} MB  {row['gb_s']:6.2f} GB/s  "
                      f"(read bandwidth so far: {statistics.median(bw_samples[str(args.threads)]):.1f} GB/s)")
            m.reset()
    bw = {t: statistics.median(v) for t, v in bw_samples.items()}
    for row in rows:
        row["frac_bw_1t"] = row["gb_s"] / bw["1"]
        row["frac_bw_nt"] = row["gb_s"] / bw[str(args.threads)]

    RESULTS.mkdir(exist_ok=True)
    info = machine(command_line("kernels.py"))
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": info["cpu_model"], "machine": info, "simd": SIMD, "threads": args.threads, "iters": args.iters, "rounds": args.rounds,
        "model": args.model,
        "read_bandwidth_gb_s": bw, "read_bandwidth_samples_gb_s": bw_samples, "command": "PYTHONPATH=python python benchmarks/kernels.py " +
        " ".join(["--ctx", *map(str, args.ctx), "--threads", str(args.threads)]),
    }
    # target (issue 3): at 8,192 tokens, int4 attention reads its cache at >= 60% of the measured
    # sequential read bandwidth; checked against the higher of the two (median) bandwidth figures
    checks = []
    for r in rows:
        if r["policy"] == "int4" and r["ctx"] >= 8192:
            ref = max(bw.values())
            checks.append({"target": f"int4 attention at ctx {r['ctx']} >= 60% of read bandwidth ({ref:.1f} GB/s)",
                           "value": r["gb_s"] / ref, "pass": r["gb_s"] / ref >= 0.6})
    (RESULTS / "kernels.json").write_text(json.dumps({"meta": meta, "rows": rows, "checks": checks}, indent=2))
    lines = [
        "# KV attention throughput (GB/s of cache read)", "",
        f"One decode step's attention over all 30 layers of {args.model}'s cache geometry, synthetic keys/values "
        f"stored at each precision; {args.threads} threads; "
        f"{machine_line(info)}; {meta['date']}.",
        f"Each row: the median of {args.rounds} rounds, each round timed right after a sample of the sequential "
        f"read bandwidth (the machine is shared; its speed drifts within seconds). Read bandwidth, median of "
        f"{len(bw_samples['1'])} samples: **{bw['1']:.1f} GB/s** (1 thread; {min(bw_samples['1']):.1f}-"
        f"{max(bw_samples['1']):.1f}), **{bw[str(args.threads)]:.1f} GB/s** ({args.threads} threads; "
        f"{min(bw_samples[str(args.threads)]):.1f}-{max(bw_samples[str(args.threads)]):.1f}).", "",
        f"Command: `{meta['command']}`", "",
        "| ctx | policy | avg bits | cache MB | ms/step | ns/record/thread | GB/s | % of 1-thread bw | % of n-thread bw |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['ctx']} | {r['policy']} | {r['avg_bits']:.2f} | {r['cache_mb']:.1f} | {r['ms_per_step']:.2f} | "
                     f"{r['ns_per_record_thread']:.1f} | {r['gb_s']:.2f} | {100 * r['frac_bw_1t']:.0f}% | "
                     f"{100 * r['frac_bw_nt']:.0f}% |")
    lines += ["", "A record: one token's keys and values for one layer and KV head (64 + 64 values, read by the 3 query "
              "heads that share the KV head).", ""]
    if checks:
        lines += ["## Target", "", "| target | value | result |", "|---|---:|---|"]
        lines += [f"| {c['target']} | {100 * c['value']:.0f}% | {'PASS' if c['pass'] else 'FAIL'} |" for c in checks]
        lines.append("")
    (RESULTS / "kernels.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(1, 2, figsize=(11, 4))
        for name, _, _ in POLICIES:
            rr = [r for r in rows if r["policy"] == name]
            ax[0].plot([r["ctx"] for r in rr], [r["gb_s"] for r in rr], "o-", label=name)
            ax[1].plot([r["ctx"] for r in rr], [r["ms_per_step"] for r in rr], "o-", label=name)
        ax[0].axhline(bw["1"], ls="--", c="gray", label="read bw, 1 thread")
        ax[0].axhline(bw[str(args.threads)], ls=":", c="gray", label=f"read bw, {args.threads} threads")
        ax[0].set(xscale="log", xlabel="context (tokens)", ylabel="GB/s of cache read", title="attention throughput")
        ax[1].set(xscale="log", xlabel="context (tokens)", ylabel="ms per decode step (attention only)",
                  title="attention time")
        ax[0].legend(fontsize=8)
        ax[1].legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(RESULTS / "kernels.png", dpi=110)
    except ImportError:
        print("matplotlib not installed: no plot")


if __name__ == "__main__":
    main()
