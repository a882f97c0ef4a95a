"""What loading a model costs, with and without the weight cache, against llama-cpp-python's load.

Each measurement runs in a fresh subprocess (so VmHWM is that load's peak alone); the engines take
turns rep by rep in one run. Per model:

* ``llama``: ``llama_cpp.Llama(path, n_ctx=1024, n_threads=2)`` (the baseline).
* ``nocache``: ``edgekv.load(model, ctx=1024)`` with EDGEKV_WEIGHT_CACHE=off: converts and
  interleaves at every load (what every load cost before the cache).
* ``first``: the same with an empty cache directory: converts once and writes the cache file.
* ``second``: the same again: maps the cache file.
* ``decode_ab`` (once): decode ms/token from the mapped cache vs from the heap copy, one process.
* ``phases`` (once per rep, cache off): where a converting load's time goes, per GGUF type, each
  phase run on its own: the GGUF header, the tokenizer, touching every tensor's bytes in the file
  map (page-in, from the page cache here), converting (weight_convert.c or gguf-py), interleaving
  (ek_pack_weights, the model's own repacking) and the copy into the cache file's layout.

Wall seconds, VmRSS after load and after a 256-token prefill (every weight read once), VmHWM.
Medians over --reps.

    PYTHONPATH=python python benchmarks/load_cost.py --models qwen2.5-coder-0.5b qwen2.5-coder-1.5b

Writes benchmarks/results/load_cost.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
sys.path.insert(0, str(REPO / "benchmarks"))

WORKER = r"""
import json, os, sys, time
sys.path.insert(0, sys.argv[1])
what, name = sys.argv[2], sys.argv[3]
import numpy as np
import edgekv
from edgekv import registry
path = registry.resolve(name, progress=False)

def mib(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")

out = {}
if what == "phases":
    from collections import defaultdict
    from edgekv import gguf_loader, weight_cache
    from edgekv._native import ffi, lib
    from edgekv.tokenizer import Tokenizer
    ph = defaultdict(float)
    t = time.perf_counter(); g = gguf_loader.load_gguf(path, weight_cache=False); ph["header"] = time.perf_counter() - t
    t = time.perf_counter(); Tokenizer.from_fields(g.fields); ph["tokenizer"] = time.perf_counter() - t
    tied = not any(w.kind == lib.EK_T_OUTPUT for w in g.weights)
    pack = gguf_loader._MATRIX_KINDS | ({lib.EK_T_TOK_EMBD} if tied else set())
    by_type = defaultdict(lambda: defaultdict(float))
    for w in g.weights:
        b = by_type[w.source_type]
        src = w.source.data if w.source is not None else w.array
        b["file_mib"] += src.nbytes / 2**20
        t = time.perf_counter(); int(np.asarray(src).view(np.uint8)[::4096].sum()); b["page_in"] += time.perf_counter() - t
        t = time.perf_counter(); arr = w.materialize(); b["convert"] += time.perf_counter() - t
        dst = np.empty(arr.nbytes, np.uint8)
        t = time.perf_counter()
        packed = w.kind in pack and lib.ek_pack_weights(w.type, ffi.from_buffer(arr), arr.nbytes, w.n_in, w.n_out,
                                                         ffi.from_buffer(dst), dst.nbytes) == 1
        b["interleave"] += time.perf_counter() - t
        if not packed:
            t = time.perf_counter(); dst[:] = arr.reshape(-1).view(np.uint8); b["copy"] += time.perf_counter() - t
        b["tensors"] += 1
        b["runs_mib"] += arr.nbytes / 2**20
        w.array = None
    out = {"phases": dict(ph), "by_type": {k: dict(v) for k, v in by_type.items()}}
elif what == "llama":
    import llama_cpp
    t0 = time.perf_counter()
    m = llama_cpp.Llama(str(path), n_ctx=1024, n_threads=2, verbose=False)
    out["seconds"] = time.perf_counter() - t0
    out["rss_mib"], out["peak_mib"] = mib("VmRSS"), mib("VmHWM")
    m.eval(list(range(100, 356)))
    out["rss_prefill_mib"] = mib("VmRSS")
else:
    from edgekv import gguf_loader
    t0 = time.perf_counter()
    m = edgekv.load(name, threads=2, ctx=1024, progress=False)
    out["seconds"] = time.perf_counter() - t0
    out["rss_mib"], out["peak_mib"] = mib("VmRSS"), mib("VmHWM")
    out["converted"] = gguf_loader.stats["converted"]
    out["cache_built"] = m._gguf.weight_cache_built
    out["cache_mib"] = m._gguf.weight_cache.stat().st_size / 2**20 if m._gguf.weight_cache else 0.0
    m.logits(list(range(100, 356)))
    out["rss_prefill_mib"] = mib("VmRSS")
out.setdefault("peak_mib", mib("VmHWM"))
print(json.dumps(out))
"""


# Decode from the mapped cache vs from the heap copy a load without the cache makes: both models in one
# process, a 256-token prefill each (logits must be identical), then blocks of 8 greedy steps taking turns.
AB_WORKER = r"""
import json, os, statistics, sys, time
sys.path.insert(0, sys.argv[1])
name, cache, steps = sys.argv[2], sys.argv[3], int(sys.argv[4])
import numpy as np
import edgekv
models = {}
for tag, where in (("mapped", cache), ("heap", "off")):
    os.environ["EDGEKV_WEIGHT_CACHE"] = where
    models[tag] = edgekv.load(name, threads=2, ctx=512, progress=False)
assert models["mapped"]._gguf.weight_cache is not None and models["heap"]._gguf.weight_cache is None
text = open(sys.argv[5], encoding="utf-8").read()[:4000]
ids = np.asarray(models["mapped"].tokenize(text)[:256], dtype=np.int32)
sessions = {tag: m.new_session() for tag, m in models.items()}
outs = {tag: s.eval(ids) for tag, s in sessions.items()}
assert np.array_equal(outs["mapped"], outs["heap"]), "mapped and heap weights gave different logits"
nxt = {k: int(np.argmax(v)) for k, v in outs.items()}
times = {k: [] for k in models}
for blk in range(steps // 8):
    for tag in (("mapped", "heap") if blk % 2 == 0 else ("heap", "mapped")):
        time.sleep(0.02)
        for _ in range(8):
            t = time.perf_counter()
            outs[tag] = sessions[tag].eval([nxt[tag]])
            times[tag].append(time.perf_counter() - t)
            nxt[tag] = int(np.argmax(outs[tag]))
print(json.dumps({k + "_ms": 1000 * statistics.median(v) for k, v in times.items()} | {"steps": steps}))
"""


def decode_ab(name: str, steps: int) -> dict:
    data = REPO.parent / "shared" / "data" / "wikitext2_valid.txt"
    with tempfile.TemporaryDirectory(prefix="edgekv-load-cost-") as d:
        run("load", name, d)  # writes the cache file
        r = subprocess.run([sys.executable, "-c", AB_WORKER, str(REPO / "python"), name, d, str(steps), str(data)],
                           check=True, capture_output=True, text=True)
    out = json.loads(r.stdout.strip().splitlines()[-1])
    out["ratio"] = out["mapped_ms"] / out["heap_ms"]
    return out


def run(what: str, name: str, cache: str) -> dict:
    env = dict(os.environ, EDGEKV_WEIGHT_CACHE=cache)
    r = subprocess.run([sys.executable, "-c", WORKER, str(REPO / "python"), what, name], check=True,
                       capture_output=True, text=True, env=env)
    return json.loads(r.stdout.strip().splitlines()[-1])


def med(rs: list[dict]) -> dict:
    return {k: statistics.median(r[k] for r in rs) for k in rs[0] if isinstance(rs[0][k], (int, float))}


def main() -> int:
    from common import command_line, machine

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--decode-steps", type=int, default=64, help="decode steps per weight source in the A/B (0: none)")
    a = ap.parse_args()
    cmd = command_line("load_cost.py")
    rows = []
    for name in a.models:
        ab = decode_ab(name, a.decode_steps) if a.decode_steps else None
        runs: dict[str, list] = {k: [] for k in ("llama", "nocache", "first", "second", "phases")}
        for _ in range(a.reps):
            with tempfile.TemporaryDirectory(prefix="edgekv-load-cost-") as d:
                runs["first"].append(run("load", name, d))
                for what, cache in (("llama", "off"), ("second", d), ("nocache", "off"), ("phases", "off")):
                    runs[what].append(run("load" if what != "llama" and what != "phases" else what, name, cache))
        row = {"model": name, "gguf_mib": Path(_resolve(name)).stat().st_size / 2**20}
        for k in ("llama", "nocache", "first", "second"):
            row[k] = med(runs[k])
        row["phases"] = {k: statistics.median(r["phases"][k] for r in runs["phases"]) for k in runs["phases"][0]["phases"]}
        types = runs["phases"][0]["by_type"]
        row["by_type"] = {t: {k: statistics.median(r["by_type"][t][k] for r in runs["phases"]) for k in types[t]}
                          for t in types}
        row["second_over_llama"] = row["second"]["seconds"] / row["llama"]["seconds"]
        row["decode_ab"] = ab
        rows.append(row)
        print(name, json.dumps(row), flush=True)
    doc = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "command": cmd,
           "machine": machine(cmd), "reps": a.reps, "loadavg_end": list(os.getloadavg()), "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "load_cost.json").write_text(json.dumps(doc, indent=1) + "\n")
    write_md(doc)
    return 0


def write_md(doc: dict) -> None:
    from common import machine_line

    rows = doc["rows"]
    L = ["# Load cost", "",
         f"{doc['date']}; median of {doc['reps']} fresh subprocesses each, the engines taking turns; load average "
         f"(1 min) at the end {doc['loadavg_end'][0]:.1f} (a shared 2-core machine: others' jobs ran meanwhile).", "",
         f"Command: `{doc['command']}`", "", f"Machine: {machine_line(doc['machine'])}", "",
         "`cache mapped`: edgekv.load mapping the weight cache the `first load` wrote; `no cache`: "
         "EDGEKV_WEIGHT_CACHE=off (converts and interleaves at every load, as every load did before the cache). "
         "RSS after prefill: after a 256-token prefill, every weight read once.", "",
         "| model (GGUF MiB) | engine | load s | x llama.cpp | RSS after load MiB | RSS after prefill MiB | peak while loading MiB | "
         "cache file MiB |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        base = r["llama"]["seconds"]
        for k, label in (("llama", "llama-cpp-python"), ("second", "edgekv, cache mapped"),
                         ("first", "edgekv, first load (writes cache)"), ("nocache", "edgekv, no cache")):
            x = r[k]
            cache = f"{x['cache_mib']:.0f}" if x.get("cache_mib") else "-"
            L.append(f"| {r['model']} ({r['gguf_mib']:.0f}) | {label} | {x['seconds']:.2f} | {x['seconds'] / base:.2f}x | "
                     f"{x['rss_mib']:.0f} | {x['rss_prefill_mib']:.0f} | {x['peak_mib']:.0f} | {cache} |")
    L += ["", "Where a converting load's time goes (each phase run on its own, cache off; seconds):", "",
          "| model | GGUF header and plan | tokenizer |", "|---|---:|---:|"]
    for r in rows:
        L.append(f"| {r['model']} | {r['phases']['header']:.2f} | {r['phases']['tokenizer']:.2f} |")
    L += ["", "| model | GGUF type | tensors | MiB in file | MiB as run | page-in s | convert s | interleave s | copy s |",
          "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        for t, b in sorted(r["by_type"].items()):
            L.append(f"| {r['model']} | {t} | {b['tensors']:.0f} | {b['file_mib']:.0f} | {b['runs_mib']:.0f} | "
                     f"{b['page_in']:.2f} | {b['convert']:.2f} | {b['interleave']:.2f} | {b.get('copy', 0):.2f} |")
    abs_ = [(r["model"], r.get("decode_ab")) for r in rows if r.get("decode_ab")]
    if abs_:
        L += ["", "Decode from the mapped cache vs from the heap copy of a load without it (one process, identical "
              "logits after a 256-token prefill checked, then blocks of 8 greedy steps taking turns; median ms/token):", "",
              "| model | steps each | mapped | heap | mapped / heap |", "|---|---:|---:|---:|---:|"]
        for name, ab in abs_:
            L.append(f"| {name} | {ab['steps']} | {ab['mapped_ms']:.1f} | {ab['heap_ms']:.1f} | {ab['ratio']:.2f}x |")
    (RESULTS / "load_cost.md").write_text("\n".join(L) + "\n")


def _resolve(name: str) -> str:
    sys.path.insert(0, str(REPO / "python"))
    from edgekv import registry

    return str(registry.resolve(name, progress=False))


if __name__ == "__main__":
    if sys.argv[1:] == ["--render"]:  # the markdown again from the JSON
        write_md(json.loads((RESULTS / "load_cost.json").read_text()))
    else:
        raise SystemExit(main())
