"""WikiText-2 perplexity against average KV bits (issue 18): static, calibrated (auto@B) and control
policies of edgekv, and llama.cpp's KV types on the same token ids.

Protocol: benchmarks/kv_layers.py's (consecutive 512-token windows of
../shared/data/wikitext2_valid.txt from its start, edgekv's tokenizer, no BOS; 384 tokens of context
stored under the policy, 128 scored one at a time, W=0; score_window). llama.cpp: benchmarks/
accuracy.py's LlamaRunner (the 512 tokens in one eval, the last 128 scored; its K/V cache at the type).

Policies: the static ones; auto@B (edgekv.calibrate: bits per layer from the model's shipped
calibration profile, measured on calibration text, never on WikiText-2); rand@B, the control: auto@B's
per-layer bit mix given to randomly permuted layers (same bits, same sink guard); auto, the budget the
profile picked on calibration text. Average bits: Model.kv_avg_bits (records and scales) and, in
`bits+maps`, with the store's position maps (one map per layer for policies that vary by layer).

Paired bootstrap 95% CIs over windows of the perplexity change against edgekv fp16 and against the
llama.cpp type at the same or more bits (q8_0 8.5, q5_0 5.5, q4_0 4.5).

Resumable: each window's result goes to benchmarks/results/cache/kv_pareto/<model>/<policy>.jsonl
(git-ignored); the report is written from the cache after every policy.

    PYTHONPATH=python python benchmarks/kv_pareto.py --model qwen2.5-coder-0.5b --windows 32
writes benchmarks/results/kv_pareto.{json,md} (all models found in the cache).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

import accuracy
from common import bootstrap, ci95, command_line, machine, machine_line
from kv_layers import N_CTX, WIKI, WINDOW, WINDOW_CTX, score_window, split_policies, wiki_prefix

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
CACHE = RESULTS / "cache" / "kv_pareto"
POLICIES = "fp16,int8,int4,k4v3,int3,auto@4.5,auto@4,auto@3.5,rand@4,auto"
LLAMA = "f16,q8_0,q5_0,q4_0"
accuracy.LLAMA_TYPES.setdefault("q5_0", (6, 5.5))  # GGML_TYPE_Q5_0: blocks of 32, one fp16 scale
SPEED_REPS = 8
UNIFORM = ("fp16", "int8", "int4", "k4v3", "int3")
UNIFORM_SLACK = 0.01  # a uniform policy's one map (about 0.01 bits) does not rule it out as auto@B's control
MODELS = ("smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b", "gemma3-270m")
TARGET_BITS = (8.5, 5.5, 4.5, 4.0, 3.5)  # issue 18's done-when budgets


def model_policy(m, name: str):
    """A policy object for this model; rand@B: auto@B's bit mix on a random permutation of the layers."""
    from edgekv.calibrate import CalibratedPolicy, permuted_policy
    from edgekv.kv_policy import parse_policy

    if not name.startswith("rand@"):
        return parse_policy(name)
    auto = CalibratedPolicy(float(name[5:]))
    auto.prepare(m)
    pol = permuted_policy(auto.allocation, seed=0)
    pol.name = name
    return pol


def cache_file(model: str, engine: str, policy: str) -> Path:
    return CACHE / model / f"{engine}_{policy.replace('@', '_at_').replace(':', '_')}.jsonl"


def load_cache(model: str, engine: str, policy: str) -> dict[int, dict]:
    f = cache_file(model, engine, policy)
    if not f.is_file():
        return {}
    out = {}
    for line in f.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            out[r["window"]] = r
    return out


def run(args) -> None:
    """Window-major: every policy and llama.cpp type on window 0, then window 1, ...; a run cut short
    leaves every row on the same windows (the report uses the windows all rows have)."""
    import edgekv

    path = Path(edgekv.registry.resolve(args.model))
    names = [n for n in split_policies(args.policies) if n]
    types = [t for t in args.llama.split(",") if t]
    done = {("edgekv", n): load_cache(args.model, "edgekv", n) for n in names}
    done.update({("llama", t): load_cache(args.model, "llama", t) for t in types})
    runners: dict = {}
    (CACHE / args.model).mkdir(parents=True, exist_ok=True)
    with edgekv.load(path, threads=args.threads, ctx=N_CTX, progress=False) as m:
        ids = m.tokenize(Path(WIKI).read_text(encoding="utf-8"), special=False)
        windows = [ids[w * WINDOW:(w + 1) * WINDOW] for w in range(args.windows)]
        pols = {}
        try:
            for w in range(args.windows):
                for name in names:
                    if w in done[("edgekv", name)]:
                        continue
                    pol = pols.get(name) or pols.setdefault(name, model_policy(m, name))
                    t0 = time.perf_counter()
                    r = score_window(m, windows[w], pol)
                    r.update(window=w, seconds=round(time.perf_counter() - t0, 2), policy=getattr(pol, "name", name))
                    if hasattr(pol, "allocation"):
                        r["allocation"] = pol.allocation
                    with open(cache_file(args.model, "edgekv", name), "a") as fh:
                        fh.write(json.dumps(r) + "\n")
                for t in types:
                    if w in done[("llama", t)]:
                        continue
                    runner = runners.get(t) or runners.setdefault(t, accuracy.LlamaRunner(path, t, args.threads))
                    lp = runner.window(windows[w])
                    with open(cache_file(args.model, "llama", t), "a") as fh:
                        fh.write(json.dumps({"window": w, "nll": float(-np.sum(lp)), "n": int(lp.size),
                                             "avg_bits": runner.bits}) + "\n")
                print(f"{args.model}: window {w} done", file=sys.stderr)
                report(args)
        finally:
            for r in runners.values():
                r.close()


def speed(args) -> None:
    """Decode ms/token at each --speed-ctx context, fp16 against each --speed-policies policy
    (benchmarks/decode.py's way: one ek_forward per step through Session.eval, blocks of 16 steps
    taking turns, medians; here one session per policy in one Model, each cache refilled per rep)."""
    for ctx in args.speed_ctx:
        speed_at(args, ctx)


def speed_at(args, ctx: int) -> dict:
    import edgekv

    path = Path(edgekv.registry.resolve(args.model))
    names = ["fp16"] + [p for p in args.speed_policies.split(",") if p and p != "fp16"]
    times: dict = {n: [] for n in names}
    with edgekv.load(path, threads=args.threads, ctx=ctx + 32, progress=False) as m:
        ids = wiki_prefix(m, ctx)
        sessions = {n: m.new_session(kv=model_policy(m, n)) for n in names}
        for rep in range(SPEED_REPS):
            for n in names if rep % 2 == 0 else names[::-1]:
                s = sessions[n]
                s.truncate(0)
                tok = int(np.argmax(s.eval(ids)))  # ctx tokens cached under the policy
                for _ in range(16):
                    t0 = time.perf_counter()
                    logits = s.eval([tok], defer=True)
                    times[n].append(1000 * (time.perf_counter() - t0))
                    tok = int(np.argmax(logits))
    out = {"model": path.name, "ctx": ctx, "threads": args.threads, "steps_per_policy": len(times["fp16"]),
           "ms_per_token": {n: float(np.median(t)) for n, t in times.items()}}
    f = Path(args.out + "_speed.json")
    prev = json.loads(f.read_text()) if f.is_file() else {}
    prev[f"{args.model}@{ctx}"] = out
    f.write_text(json.dumps(prev, indent=1))
    print(out, file=sys.stderr)
    return out


def paired(a: np.ndarray, b: np.ndarray, n_tok: int, resamples: int = 10000) -> dict:
    """Perplexity change of a vs b in percent with a paired bootstrap 95% CI over windows."""
    d = a - b
    pct = lambda s: 100 * (np.exp(s / (n_tok * d.size)) - 1)  # noqa: E731  (n_tok: per window)
    return {"pct": float(pct(d.sum())), "ci95": ci95(bootstrap(lambda idx: pct(d[idx].sum(axis=1)), d.size, resamples))}


def summarize(model: str) -> dict | None:
    d = CACHE / model
    if not d.is_dir():
        return None
    rows = []
    for f in sorted(d.glob("*.jsonl")):
        engine, _, _ = f.stem.partition("_")
        recs = {}
        for line in f.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                recs[r["window"]] = r
        name = next(iter(recs.values())).get("policy") if engine == "edgekv" and recs else None
        key = f.stem.partition("_")[2].replace("_at_", "@")
        rows.append({"engine": engine, "policy": key, "recs": recs, "resolved": name})
    common = None
    for r in rows:
        common = set(r["recs"]) if common is None else common & set(r["recs"])
    if not common:
        return None
    ws = sorted(common)
    out = []
    for r in rows:
        recs = [r["recs"][w] for w in ws]
        n_tok = int(np.mean([x["n"] for x in recs]))
        nll = np.array([x["nll"] for x in recs])
        row = {"engine": r["engine"], "policy": r["policy"], "windows": len(ws), "n_tok": n_tok,
               "ppl": float(np.exp(nll.sum() / (n_tok * len(ws)))),
               "avg_bits": float(np.mean([x["avg_bits"] for x in recs])), "nll": nll}
        if r["engine"] == "edgekv":
            row["avg_bits_maps"] = float(np.mean([x["avg_bits_maps"] for x in recs]))
            if "allocation" in recs[0]:
                row["allocation"] = recs[0]["allocation"]
            row["resolved"] = r["resolved"]
        out.append(row)
    by = {(r["engine"], r["policy"]): r for r in out}
    fp16 = by.get(("edgekv", "fp16"))
    llama = sorted([r for r in out if r["engine"] == "llama"], key=lambda r: r["avg_bits"])
    for r in out:
        if fp16 is not None:
            r["vs_fp16"] = paired(r["nll"], fp16["nll"], r["n_tok"])
        if r["engine"] == "edgekv":
            bits = r["avg_bits"]  # llama.cpp's bits count its blocks' scales, as avg_bits does, and no map
            ref = [q for q in llama if q["avg_bits"] >= bits - 1e-9 and q["policy"] != "f16"]
            if ref:
                r["vs_llama"] = {"type": ref[0]["policy"], **paired(r["nll"], ref[0]["nll"], r["n_tok"])}
    uniform = [r for r in out if r["engine"] == "edgekv" and r["policy"] in UNIFORM]
    for r in out:
        if r["engine"] != "edgekv" or not r["policy"].startswith("auto@"):
            continue
        budget = float(r["policy"][5:])
        cands = [u for u in uniform if u["avg_bits_maps"] <= budget + UNIFORM_SLACK]
        if cands:
            u = min(cands, key=lambda u: u["ppl"])
            r["vs_uniform"] = {"policy": u["policy"], **paired(r["nll"], u["nll"], r["n_tok"])}
        rnd = by.get(("edgekv", "rand@" + r["policy"][5:]))
        if rnd is not None:
            r["vs_random"] = paired(r["nll"], rnd["nll"], r["n_tok"])
    best = {}
    slack = lambda r: UNIFORM_SLACK if r["policy"] in UNIFORM else 1e-9  # noqa: E731
    for b in TARGET_BITS:  # the targets: the best edgekv policy at <= b bits, maps included
        cands = [r for r in out if r["engine"] == "edgekv" and "vs_fp16" in r  # rand@B is a control, not a policy
                 and not r["policy"].startswith("rand@") and r["avg_bits_maps"] <= b + slack(r)]
        if cands:
            r = min(cands, key=lambda r: r["ppl"])
            best[str(b)] = {"policy": r["policy"], "avg_bits_maps": r["avg_bits_maps"], **r["vs_fp16"]}
    for r in out:
        r["nll"] = r["nll"].tolist()
    return {"model": model, "windows": len(ws), "rows": out, "best_at": best, "profile": profile_summary(model)}


def profile_summary(model: str) -> dict | None:
    """The shipped profile's noise check and allocator (edgekv.calibrate), for the report."""
    from edgekv import calibrate, registry

    try:
        prof = calibrate.load_profile(calibrate.SHIPPED / f"{registry.get_entry(model)['sha256']}.json")
    except (ValueError, KeyError):
        return None
    keep = ("text", "split_half", "allocator", "validation", "auto_bits", "seconds", "bits")
    return {k: prof.get(k) for k in keep}


def report(args) -> None:
    # a model with no window cache here (it is git-ignored) keeps its entry from the committed JSON
    f = Path(args.out + ".json")
    prev = {s["model"]: s for s in json.loads(f.read_text())["models"]} if f.is_file() else {}
    res = {"machine": machine(command_line("kv_pareto.py", args.argv)), "window": WINDOW, "window_ctx": WINDOW_CTX,
           "models": [s for s in (summarize(mo) or prev.get(mo) for mo in MODELS) if s]}
    Path(args.out + ".json").write_text(json.dumps(res, indent=1))
    L = ["# KV precision Pareto: WikiText-2 perplexity against average KV bits", "",
         f"`../shared/data/wikitext2_valid.txt`, consecutive {WINDOW}-token windows; {WINDOW_CTX} tokens of context "
         f"stored under the policy, {WINDOW - WINDOW_CTX} scored one at a time (W=0); llama.cpp on the same ids (one "
         "eval, its cache at the type). `bits`: Model.kv_avg_bits (records and scales); `bits+maps`: with the store's "
         "position maps. `rand@B`: auto@B's per-layer mix on randomly permuted layers. CIs: paired bootstrap over "
         "windows; llama.cpp rows against edgekv fp16. `vs llama.cpp`: against the llama.cpp type with the same or more "
         "bits than `bits`.", ""]
    for s in res["models"]:
        L += [f"## {s['model']} ({s['windows']} windows)", "",
              "| engine | policy | bits | bits+maps | perplexity | vs fp16 [95% CI] | vs llama.cpp [95% CI] |",
              "|---|---|---|---|---|---|---|"]
        for r in sorted(s["rows"], key=lambda r: (-r.get("avg_bits_maps", r["avg_bits"]), r["engine"])):
            v = r.get("vs_fp16")
            vl = r.get("vs_llama")
            pol = r["policy"] + (f" ({r['resolved']})" if r.get("resolved") and r["resolved"] != r["policy"] else "")
            L.append(f"| {r['engine']} | `{pol}` | {r['avg_bits']:.3f} | "
                     f"{r['avg_bits_maps']:.3f} | " if r["engine"] == "edgekv" else
                     f"| {r['engine']} | `{pol}` | {r['avg_bits']:.2f} | -- | ")
            L[-1] += (f"{r['ppl']:.3f} | " + (f"{v['pct']:+.2f}% [{v['ci95'][0]:+.2f}, {v['ci95'][1]:+.2f}] | " if v else "-- | ")
                      + (f"{vl['pct']:+.2f}% vs {vl['type']} [{vl['ci95'][0]:+.2f}, {vl['ci95'][1]:+.2f}] |" if vl else "-- |"))
        ctl = [r for r in s["rows"] if r.get("vs_uniform") or r.get("vs_random")]
        if ctl:
            L += ["", "| policy | vs best uniform at <= B bits [95% CI] | vs rand@B (same mix, random layers) [95% CI] |",
                  "|---|---|---|"]
            f = lambda d: f"{d['pct']:+.2f}% [{d['ci95'][0]:+.2f}, {d['ci95'][1]:+.2f}]"  # noqa: E731
            for r in ctl:
                u, q = r.get("vs_uniform"), r.get("vs_random")
                L.append(f"| `{r['policy']}` | " + (f"{f(u)} vs `{u['policy']}`" if u else "--") + " | "
                         + (f(q) if q else "--") + " |")
        if s.get("best_at"):
            L += ["", "| at <= bits (maps included; a uniform policy's one map not counted) | best edgekv policy | "
                  "vs fp16 [95% CI] |", "|---|---|---|"]
            for b, d in s["best_at"].items():
                L.append(f"| {b} | `{d['policy']}` ({d['avg_bits_maps']:.3f}) | {d['pct']:+.2f}% "
                         f"[{d['ci95'][0]:+.2f}, {d['ci95'][1]:+.2f}] |")
        pr = s.get("profile")
        if pr:
            t, sh = pr.get("text") or {}, pr.get("split_half")
            L += ["", f"Profile: {t.get('windows')} calibration windows of {t.get('context')} + {t.get('scored')} "
                  f"tokens, levels {pr.get('bits')}, allocator `{pr.get('allocator') or 'floor+median (v1 default)'}`, "
                  + (f"split-half Spearman of the per-layer damage {sh['spearman']} (median {sh['median']})"
                     if sh else "no split-half check (one window)") + "."]
        allocs = [r for r in s["rows"] if r.get("allocation")]
        for r in allocs:
            L.append("")
            L.append(f"`{r['policy']}` per layer (k, v): " + ", ".join(f"{i}:{k}/{v}" for i, (k, v) in enumerate(r["allocation"])))
        L.append("")
    f = Path(args.out + "_speed.json")
    if f.is_file():
        sps = json.loads(f.read_text()).values()
        cols = list(dict.fromkeys(c for sp in sps for c in sp["ms_per_token"]))
        L += ["## Decode speed (`--speed`)", "", "| model | context | steps | " + " | ".join(cols) + " |",
              "|---|---|---|" + "---|" * len(cols)]
        for sp in sps:
            ms = sp["ms_per_token"]
            L.append(f"| {sp['model']} | {sp['ctx']} | {sp['steps_per_policy']} | " + " | ".join(
                f"{ms[c]:.2f} ms" if c in ms else "--" for c in cols) + " |")
        L += ["", "Median ms/token over blocks of 16 decode steps taking turns (one Model, same run).", ""]
    L += [f"Machine: {machine_line(res['machine'])}", ""]
    Path(args.out + ".md").write_text("\n".join(L))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--policies", default=POLICIES)
    ap.add_argument("--llama", default=LLAMA, help="llama.cpp KV types ('' for none)")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--speed", action="store_true", help="only time decode: fp16 vs --speed-policies at --speed-ctx")
    ap.add_argument("--speed-ctx", type=int, nargs="+", default=[256], help="context lengths (tokens cached)")
    ap.add_argument("--speed-policies", default="auto,int4")
    ap.add_argument("--out", default=str(RESULTS / "kv_pareto"))
    args = ap.parse_args(argv)
    args.argv = argv
    if args.speed:
        speed(args)
        return
    if not args.report_only:
        run(args)
    report(args)


if __name__ == "__main__":
    main()
