"""What loading a model costs: wall time, peak and final memory, and the GGUF header read.

For each model, in a fresh subprocess (so VmHWM is this load's peak alone): the seconds of
``edgekv.gguf_file.read_gguf`` and of gguf-py's ``GGUFReader`` on the same file (each in its own
subprocess), then ``edgekv.load(model, ctx=1024)``: wall seconds, VmHWM (peak RSS) and VmRSS after.
Median of --reps subprocess runs.

    PYTHONPATH=python python benchmarks/load_cost.py --models smollm2-135m qwen2.5-coder-0.5b qwen2.5-coder-1.5b

Writes benchmarks/results/load_cost.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"

WORKER = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
what, name = sys.argv[2], sys.argv[3]
import edgekv
from edgekv import registry
path = registry.resolve(name, progress=False)

def mib(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")

t0 = time.perf_counter()
if what == "edgekv_reader":
    from edgekv.gguf_file import read_gguf
    read_gguf(path)
elif what == "gguf_py_reader":
    from gguf import GGUFReader
    r = GGUFReader(path)
    {k: f.contents() for k, f in r.fields.items()}
else:
    m = edgekv.load(name, threads=2, ctx=1024, progress=False)
out = {"seconds": time.perf_counter() - t0, "peak_mib": mib("VmHWM"), "rss_mib": mib("VmRSS")}
print(json.dumps(out))
"""


def run(what: str, name: str) -> dict:
    r = subprocess.run([sys.executable, "-c", WORKER, str(REPO / "python"), what, name], check=True,
                       capture_output=True, text=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"])
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()
    rows = []
    for name in a.models:
        row = {"model": name}
        for what in ("edgekv_reader", "gguf_py_reader", "load"):
            rs = [run(what, name) for _ in range(a.reps)]
            row[what] = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
        rows.append(row)
        print(name, json.dumps(row))
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    cmd = "PYTHONPATH=python python benchmarks/load_cost.py --models " + " ".join(a.models) + f" --reps {a.reps}"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "load_cost.json").write_text(json.dumps({"date": date, "command": cmd, "rows": rows}, indent=1) + "\n")
    L = ["# Load cost", "", f"{date}; median of {a.reps} fresh subprocesses each. Command: `{cmd}`", "",
         "| model | GGUF header, edgekv reader | GGUF header, gguf-py GGUFReader | edgekv.load (ctx 1024) | peak RSS while loading | RSS after |",
         "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        ld = r["load"]
        L.append(f"| {r['model']} | {r['edgekv_reader']['seconds']:.2f} s | {r['gguf_py_reader']['seconds']:.2f} s | "
                 f"{ld['seconds']:.2f} s | {ld['peak_mib']:.0f} MiB | {ld['rss_mib']:.0f} MiB |")
    (RESULTS / "load_cost.md").write_text("\n".join(L) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
