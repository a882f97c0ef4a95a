#!/usr/bin/env python
"""Quality of edgekv's static KV-cache policies (W=0) against llama.cpp's KV cache types.

Model: SmolLM2-135M-Instruct Q4_1 (``edgekv.registry.resolve("smollm2-135m")``). Token ids come
from edgekv's tokenizer (``Model.tokenize(text, special=False)``, no BOS: SmolLM2's GGUF does not
add one); the same ids are fed to both engines, so every task is scored on identical input.

WikiText-2 perplexity (``../shared/data/wikitext2_valid.txt``)
    The whole file is tokenized and cut into non-overlapping windows of 512 tokens from its
    start; the first ``--windows`` are used. Context = the first 384 tokens of a window, stored
    under the policy; the last 128 are scored.
    * edgekv: ``Model.score(context, continuation, kv=policy, sequential=True)``: the context is
      prefilled and stored under the policy, then the continuation is fed one token at a time,
      each token stored under the policy right after its forward pass (W=0), so every scored
      token's predecessors sit in the cache at the policy's precision. The first scored token
      is predicted by the prefill pass itself (as the first generated token of a prompt is).
    * llama.cpp: the 512 tokens in one eval (n_batch=512), the last 128 positions' logits.
      llama.cpp writes K/V into its (quantized) cache and attends over the cache, so every
      prediction reads quantized K/V.

HellaSwag (``../shared/data/hellaswag_dev.txt``, llama.cpp's 6-line format), first ``--tasks``
    Each ending is scored as `` " " + ending`` given the task's context (``activity_label: ctx``).
    Choice = argmax of the mean log-prob of the ending's tokens (llama.cpp's ``--hellaswag``
    rule); the argmax of the sum is reported too.
    * edgekv: the context is stored under the policy (one prefill per task, reused for its four
      endings: the policy is passed as one KVPolicy object, see notes); the ending is scored with
      ``sequential=False`` (ending tokens see each other at 16 bits). A check on the first
      ``--seq-tasks`` tasks repeats fp16/int4/int2 with ``sequential=True``.
    * llama.cpp: the context is evaluated once, then each ending is evaluated on top of it
      (positions after the context are dropped between endings). That is the same computation
      as one eval of context+ending -- the endings attend over the same cached context -- at
      less than half the cost; the script checks it on the first ``--split-check`` tasks
      (``llama_split_check`` in the JSON).

Paired comparisons: for each policy vs fp16 (same engine; llama.cpp rows also vs edgekv fp16),
the accuracy difference with a paired bootstrap 95% CI over tasks, and the perplexity change with
a paired bootstrap 95% CI over windows (``--bootstrap`` resamples).

Resumable: every task / window result is appended to a JSONL under
``benchmarks/results/cache/accuracy/<fingerprint>/`` (git-ignored); ``--resume`` skips what is
there. The report (``accuracy.json``, ``accuracy.md``, ``accuracy.png`` in benchmarks/results/) is
written from the cache at the end of every run.

    PYTHONPATH=python python benchmarks/accuracy.py --tasks 1000 --windows 32 --resume
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from common import bootstrap, ci95, command_line, machine, read_hellaswag, target_log_probs

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = REPO.parent / "shared" / "data"
WIKI = DATA_DIR / "wikitext2_valid.txt"
HELLASWAG = DATA_DIR / "hellaswag_dev.txt"
RESULTS = REPO / "benchmarks" / "results"
CACHE_ROOT = RESULTS / "cache" / "accuracy"
if str(REPO / "python") not in sys.path:
    sys.path.insert(0, str(REPO / "python"))

N_CTX = 1024          # context size of both engines
WINDOW = 512          # WikiText-2 window
WINDOW_CTX = 384      # of which the context stored under the policy; the rest is scored

DEFAULT_POLICIES = "fp16,int8,k8v4,int4,k4v2,k2v4,int2"
SEQ_POLICIES = "fp16,int4,int2"
# llama.cpp KV cache types: GGML type id and bits per element (block of 32 + one fp16 scale)
LLAMA_TYPES = {"f16": (1, 16.0), "q8_0": (8, 8.5), "q4_0": (2, 4.5)}
TARGETS = [  # (what, policy, metric, bound)
    ("WikiText-2 perplexity: int8 within 0.5% of fp16", "edgekv:int8", "ppl_pct", 0.5),
    ("WikiText-2 perplexity: int4 within 3% of fp16", "edgekv:int4", "ppl_pct", 3.0),
    ("HellaSwag (mean rule): int8 within 0.5 points of fp16", "edgekv:int8", "hs_points", 0.5),
]
SIM_CALIBRATION = ("NumPy simulation (the project's calibration figures): K8V8 +0.2% ppl, K4V4 +3.6% "
                   "(groups of 32; groups of 64 rotated: -0.2%), K4V2 +4.6%, K2V4 +224%, K2V2 +291%.")


# ---- result cache ------------------------------------------------------------------------------

class Cache:
    """One JSONL per (engine, policy, kind): a record per window / task, keyed by its index."""

    def __init__(self, root: Path, resume: bool):
        self.root = root
        self.resume = resume
        root.mkdir(parents=True, exist_ok=True)
        ignore = root.parent / ".gitignore"  # the cache is not a result: keep it out of git
        if not ignore.exists():
            ignore.write_text("*\n")
        self._fresh: set[Path] = set()

    def path(self, engine: str, policy: str, kind: str) -> Path:
        return self.root / f"{engine}_{policy}_{kind}.jsonl"

    def load(self, engine: str, policy: str, kind: str) -> dict[int, dict]:
        p = self.path(engine, policy, kind)
        out: dict[int, dict] = {}
        if not p.exists():
            return out
        for line in p.read_text().splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a killed run
            out[int(r["i"])] = r
        return out

    def done(self, engine: str, policy: str, kind: str) -> dict[int, dict]:
        """Records a run may reuse: all of them with --resume, none (and the file emptied) without."""
        p = self.path(engine, policy, kind)
        if not self.resume and p not in self._fresh:
            p.write_text("")
            self._fresh.add(p)
        return self.load(engine, policy, kind)

    def append(self, engine: str, policy: str, kind: str, record: dict) -> None:
        with open(self.path(engine, policy, kind), "a") as f:
            f.write(json.dumps(record) + "\n")


def fingerprint(model_path: Path) -> str:
    """Settings that change the numbers; a change starts a new cache folder."""
    key = json.dumps({
        "model": [model_path.name, model_path.stat().st_size], "n_ctx": N_CTX, "window": WINDOW,
        "window_ctx": WINDOW_CTX, "wiki": WIKI.stat().st_size, "hellaswag": HELLASWAG.stat().st_size, "v": 1,
        # edgekv's default KV layout (groups, rotation, key centering) since key centering
        "kv_layout": "g64-64-32-rot-ck",
    }, sort_keys=True)
    return hashlib.sha1(key.encode()).hexdigest()[:10]


# ---- engines ------------------------------------------------------------------------------------

class EdgekvRunner:
    def __init__(self, model_path: Path, threads: int):
        import edgekv
        self.model = edgekv.load(model_path, threads=threads, ctx=N_CTX)
        self.version = edgekv.__version__

    def policy(self, name: str):
        # One object per policy for the whole run: score() reuses a cached context only when it
        # is given the very policy object it was stored under.
        from edgekv.kv_policy import parse_policy
        return parse_policy(name)

    def window(self, policy, ids: list[int]) -> tuple[np.ndarray, float]:
        lp = self.model.score(ids[:WINDOW_CTX], ids[WINDOW_CTX:], kv=policy, sequential=True)
        return lp, self.model.kv_avg_bits

    def task(self, policy, ctx_ids: list[int], ends_ids: list[list[int]], sequential: bool):
        lps = [self.model.score(ctx_ids, e, kv=policy, sequential=sequential) for e in ends_ids]
        return lps, self.model.kv_avg_bits


class LlamaRunner:
    def __init__(self, model_path: Path, type_name: str, threads: int):
        import llama_cpp
        type_id, self.bits = LLAMA_TYPES[type_name]
        self.llm = llama_cpp.Llama(
            model_path=str(model_path), n_ctx=N_CTX, n_threads=threads, n_threads_batch=threads, n_batch=512,
            logits_all=True, flash_attn=True, type_k=type_id, type_v=type_id, verbose=False,
        )
        self.version = llama_cpp.__version__

    def close(self) -> None:
        self.llm.close()

    def window(self, ids: list[int]) -> np.ndarray:
        self.llm.reset()
        self.llm.eval(ids)
        return target_log_probs(self.llm.scores[WINDOW_CTX - 1:WINDOW - 1], ids[WINDOW_CTX:])

    def task(self, ctx_ids: list[int], ends_ids: list[list[int]]) -> list[np.ndarray]:
        """Context once, then each ending on top of it (the cache past the context dropped)."""
        llm = self.llm
        llm.reset()
        llm.eval(ctx_ids)
        n = llm.n_tokens
        last = np.array(llm.scores[n - 1], dtype=np.float32)  # predicts each ending's first token
        out = []
        for e in ends_ids:
            llm.n_tokens = n  # eval() removes cached positions >= n_tokens before running
            llm.eval(e)
            rows = np.vstack([last[None, :], llm.scores[n:n + len(e) - 1]])
            out.append(target_log_probs(rows, e))
        return out

    def task_one_eval(self, ctx_ids: list[int], ends_ids: list[list[int]]) -> list[np.ndarray]:
        """The literal protocol: context+ending in one eval from an empty cache, per ending."""
        out = []
        for e in ends_ids:
            self.llm.reset()
            self.llm.eval(ctx_ids + e)
            c = len(ctx_ids)
            out.append(target_log_probs(self.llm.scores[c - 1:c + len(e) - 1], e))
        return out


def tqdm_bar(desc: str, total: int, initial: int):
    return tqdm(total=total, initial=initial, desc=desc, file=sys.stderr, mininterval=5.0, dynamic_ncols=True)


def hs_record(i: int, label: int, lps: list[np.ndarray], bits: float, seconds: float) -> dict:
    return {
        "i": i, "label": label, "mean": [float(x.mean()) for x in lps], "sum": [float(x.sum()) for x in lps],
        "n": [int(x.size) for x in lps], "bits": bits, "s": round(seconds, 4),
    }


def run_edgekv(args, cache: Cache, model_path: Path, windows: list[list[int]], tasks_ids) -> None:
    runner = None
    for name in args.policies if "wikitext2" in args.parts else []:
        todo = [w for w in range(len(windows)) if w not in cache.done("edgekv", name, "ppl")]
        if not todo:
            continue
        runner = runner or EdgekvRunner(model_path, args.threads)
        pol = runner.policy(name)
        with tqdm_bar(f"edgekv {name} wikitext2", len(windows), len(windows) - len(todo)) as bar:
            for w in todo:
                t0 = time.perf_counter()
                lp, bits = runner.window(pol, windows[w])
                cache.append("edgekv", name, "ppl", {
                    "i": w, "nll": float(-lp.sum()), "n": int(lp.size), "bits": bits,
                    "s": round(time.perf_counter() - t0, 4), "lp": [round(float(x), 6) for x in lp],
                })
                bar.update()
    jobs = [(name, "hs", False, args.tasks) for name in args.policies if "hellaswag" in args.parts]
    jobs += [(name, "hsseq", True, min(args.seq_tasks, args.tasks)) for name in args.seq_policies
             if "seq" in args.parts]
    for name, kind, sequential, n in jobs:
        done = cache.done("edgekv", name, kind)
        todo = [i for i in range(n) if i not in done]
        if not todo:
            continue
        runner = runner or EdgekvRunner(model_path, args.threads)
        pol = runner.policy(name)
        what = "hellaswag" + (" sequential" if sequential else "")
        with tqdm_bar(f"edgekv {name} {what}", n, n - len(todo)) as bar:
            for i in todo:
                ctx_ids, label, ends_ids = tasks_ids[i]
                t0 = time.perf_counter()
                lps, bits = runner.task(pol, ctx_ids, ends_ids, sequential)
                cache.append("edgekv", name, kind, hs_record(i, label, lps, bits, time.perf_counter() - t0))
                bar.update()


def run_llama(args, cache: Cache, model_path: Path, windows: list[list[int]], tasks_ids) -> None:
    for name in args.llama_types:
        todo_w = todo_t = todo_c = []
        n_check = min(args.split_check, args.tasks)
        if "wikitext2" in args.parts:
            todo_w = [w for w in range(len(windows)) if w not in cache.done("llama", name, "ppl")]
        if "hellaswag" in args.parts:
            hs_done = cache.done("llama", name, "hs")
            todo_t = [i for i in range(args.tasks) if i not in hs_done]
            chk_done = cache.done("llama", name, "split")
            todo_c = [i for i in range(n_check) if i not in chk_done]
        if not (todo_w or todo_t or todo_c):
            continue
        runner = LlamaRunner(model_path, name, args.llama_threads)
        try:
            with tqdm_bar(f"llama.cpp {name} wikitext2", len(windows), len(windows) - len(todo_w)) as bar:
                for w in todo_w:
                    t0 = time.perf_counter()
                    lp = runner.window(windows[w])
                    cache.append("llama", name, "ppl", {
                        "i": w, "nll": float(-lp.sum()), "n": int(lp.size), "bits": runner.bits,
                        "s": round(time.perf_counter() - t0, 4), "lp": [round(float(x), 6) for x in lp],
                    })
                    bar.update()
            # HellaSwag tasks, and the check that scores context + ending in one eval
            for kind, desc, total, todo, score in (("hs", "hellaswag", args.tasks, todo_t, runner.task),
                                                   ("split", "one-eval check", n_check, todo_c, runner.task_one_eval)):
                with tqdm_bar(f"llama.cpp {name} {desc}", total, total - len(todo)) as bar:
                    for i in todo:
                        ctx_ids, label, ends_ids = tasks_ids[i]
                        t0 = time.perf_counter()
                        lps = score(ctx_ids, ends_ids)
                        cache.append("llama", name, kind, hs_record(i, label, lps, runner.bits, time.perf_counter() - t0))
                        bar.update()
        finally:
            runner.close()


# ---- statistics ---------------------------------------------------------------------------------

def hs_arrays(recs: dict[int, dict], n: int):
    """Per task (first n): correct under the mean rule, under the sum rule; None if incomplete."""
    if any(i not in recs for i in range(n)):
        return None
    mean_ok = np.array([int(np.argmax(recs[i]["mean"])) == recs[i]["label"] for i in range(n)], dtype=np.float64)
    sum_ok = np.array([int(np.argmax(recs[i]["sum"])) == recs[i]["label"] for i in range(n)], dtype=np.float64)
    return mean_ok, sum_ok


def paired_acc(a: np.ndarray, b: np.ndarray, resamples: int) -> dict:
    """a - b in accuracy points (same tasks), with a paired bootstrap 95% CI."""
    d = a - b
    ci = ci95(bootstrap(lambda idx: d[idx].mean(axis=1), d.size, resamples))
    return {"points": 100 * float(d.mean()), "ci95": [100 * ci[0], 100 * ci[1]],
            "tasks_better": int((d > 0).sum()), "tasks_worse": int((d < 0).sum())}


def paired_ppl(nll_a: np.ndarray, nll_b: np.ndarray, n_tok: int, resamples: int) -> dict:
    """Perplexity change of a vs b in percent (same windows, equal tokens per window), with a
    paired bootstrap 95% CI over windows."""
    d = nll_a - nll_b  # per window: summed NLL of a minus summed NLL of b
    pct = lambda s: 100 * (np.exp(s / n_tok) - 1)  # noqa: E731
    ci = ci95(bootstrap(lambda idx: pct(d[idx].sum(axis=1)), d.size, resamples))
    return {"pct": float(pct(d.sum())), "ci95": ci}


def summarize(args, cache: Cache, versions: dict, n_wiki_tokens: int) -> dict:
    nw, nt = args.windows, args.tasks
    rows: dict[str, dict] = {}
    entries = [("edgekv", p) for p in args.report_policies] + [("llama", t) for t in args.report_llama_types]
    for engine, name in entries:
        key = f"{engine}:{name}"
        ppl_recs = cache.load(engine, name, "ppl")
        hs_recs = cache.load(engine, name, "hs")
        row: dict = {"engine": "edgekv" if engine == "edgekv" else "llama.cpp", "policy": name}
        bits = [r["bits"] for r in list(ppl_recs.values()) + list(hs_recs.values())]
        row["avg_bits"] = float(np.mean(bits)) if bits else None
        if engine == "llama":
            row["avg_bits"] = LLAMA_TYPES[name][1]
            row["ggml_type"] = LLAMA_TYPES[name][0]
        if all(w in ppl_recs for w in range(nw)):
            nll = np.array([ppl_recs[w]["nll"] for w in range(nw)])
            ntok = int(sum(ppl_recs[w]["n"] for w in range(nw)))
            row["wikitext2"] = {"ppl": float(np.exp(nll.sum() / ntok)), "windows": nw, "scored_tokens": ntok,
                                "runtime_s": float(sum(ppl_recs[w]["s"] for w in range(nw))), "_nll": nll}
        arr = hs_arrays(hs_recs, nt)
        if arr is not None:
            row["hellaswag"] = {"acc_mean": 100 * float(arr[0].mean()), "acc_sum": 100 * float(arr[1].mean()),
                                "tasks": nt, "runtime_s": float(sum(hs_recs[i]["s"] for i in range(nt))),
                                "_arr": arr}
        rows[key] = row

    def compare(key: str, ref_key: str, label: str) -> None:
        row, ref = rows[key], rows.get(ref_key)
        if ref is None or key == ref_key:
            return
        if "wikitext2" in row and "wikitext2" in ref:
            w = row["wikitext2"]
            w[f"vs_{label}"] = paired_ppl(w["_nll"], ref["wikitext2"]["_nll"], w["scored_tokens"], args.bootstrap)
        if "hellaswag" in row and "hellaswag" in ref:
            h, r = row["hellaswag"]["_arr"], ref["hellaswag"]["_arr"]
            row["hellaswag"][f"vs_{label}"] = {"mean_rule": paired_acc(h[0], r[0], args.bootstrap),
                                               "sum_rule": paired_acc(h[1], r[1], args.bootstrap)}

    for key in rows:
        if key.startswith("edgekv:"):
            compare(key, "edgekv:fp16", "fp16")
        else:
            compare(key, "llama:f16", "fp16")
            compare(key, "edgekv:fp16", "edgekv_fp16")

    # sequential=True check on the first seq_tasks tasks
    n_seq = min(args.seq_tasks, nt)
    seq = {"tasks": n_seq, "policies": {}}
    for name in args.seq_policies:
        s_arr = hs_arrays(cache.load("edgekv", name, "hsseq"), n_seq)
        b_arr = hs_arrays(cache.load("edgekv", name, "hs"), n_seq)
        if s_arr is None or b_arr is None:
            continue
        s_recs, b_recs = cache.load("edgekv", name, "hsseq"), cache.load("edgekv", name, "hs")
        dlp = [abs(a - b) for i in range(n_seq) for a, b in zip(s_recs[i]["mean"], b_recs[i]["mean"])]
        seq["policies"][name] = {
            "acc_mean_sequential": 100 * float(s_arr[0].mean()), "acc_mean_batch": 100 * float(b_arr[0].mean()),
            "acc_sum_sequential": 100 * float(s_arr[1].mean()), "acc_sum_batch": 100 * float(b_arr[1].mean()),
            "sequential_minus_batch_mean_rule": paired_acc(s_arr[0], b_arr[0], args.bootstrap),
            "choices_changed_mean_rule": int(sum(
                int(np.argmax(s_recs[i]["mean"])) != int(np.argmax(b_recs[i]["mean"])) for i in range(n_seq))),
            "mean_abs_diff_of_mean_logprob": float(np.mean(dlp)),
            "runtime_s_sequential": float(sum(s_recs[i]["s"] for i in range(n_seq))),
            "runtime_s_batch": float(sum(b_recs[i]["s"] for i in range(n_seq))),
        }
    names = list(seq["policies"])
    if "fp16" in names:  # the degradation each protocol shows, on the same tasks
        for name in names:
            if name == "fp16":
                continue
            p = seq["policies"][name]
            for proto, kind in (("sequential", "hsseq"), ("batch", "hs")):
                a = hs_arrays(cache.load("edgekv", name, kind), n_seq)[0]
                f = hs_arrays(cache.load("edgekv", "fp16", kind), n_seq)[0]
                p[f"vs_fp16_{proto}_mean_rule"] = paired_acc(a, f, args.bootstrap)

    # llama.cpp: context reused across endings vs context+ending in one eval
    split = {"tasks": min(args.split_check, nt), "types": {}}
    for name in args.report_llama_types:
        one, reuse = cache.load("llama", name, "split"), cache.load("llama", name, "hs")
        n = split["tasks"]
        if any(i not in one or i not in reuse for i in range(n)):
            continue
        d = [abs(a - b) for i in range(n) for a, b in zip(one[i]["mean"], reuse[i]["mean"])]
        split["types"][name] = {
            "max_abs_diff_of_mean_logprob": float(np.max(d)), "mean_abs_diff_of_mean_logprob": float(np.mean(d)),
            "choices_changed_mean_rule": int(sum(
                int(np.argmax(one[i]["mean"])) != int(np.argmax(reuse[i]["mean"])) for i in range(n))),
            "runtime_s_one_eval": float(sum(one[i]["s"] for i in range(n))),
            "runtime_s_context_reused": float(sum(reuse[i]["s"] for i in range(n))),
        }

    targets = []
    for what, key, metric, bound in TARGETS:
        row = rows.get(key, {})
        value = ci = None
        if metric == "ppl_pct" and "vs_fp16" in row.get("wikitext2", {}):
            value, ci = row["wikitext2"]["vs_fp16"]["pct"], row["wikitext2"]["vs_fp16"]["ci95"]
        if metric == "hs_points" and "vs_fp16" in row.get("hellaswag", {}):
            v = row["hellaswag"]["vs_fp16"]["mean_rule"]
            value, ci = v["points"], v["ci95"]
        targets.append({
            "target": what, "value": value, "ci95": ci, "bound": bound,
            "pass": None if value is None else abs(value) <= bound,
            "ci_within_bound": None if ci is None else (-bound <= ci[0] and ci[1] <= bound),
        })

    for row in rows.values():  # drop the arrays kept for the comparisons
        row.get("wikitext2", {}).pop("_nll", None)
        row.get("hellaswag", {}).pop("_arr", None)
        row["runtime_s"] = sum(row.get(k, {}).get("runtime_s", 0.0) for k in ("wikitext2", "hellaswag"))
    return {
        "rows": rows, "sequential_check": seq, "llama_split_check": split, "targets": targets,
        "n_wikitext_tokens_in_file": n_wiki_tokens, **versions,
    }


# ---- report --------------------------------------------------------------------------------------

def fmt(x, spec: str, dash: str = "--") -> str:
    return dash if x is None else format(x, spec)


def fmt_ci(ci, spec: str = "+.2f") -> str:
    return "--" if ci is None else f"[{ci[0]:{spec}}, {ci[1]:{spec}}]"


def observations(res: dict) -> list[str]:
    """Sentences computed from the figures (only those whose inputs exist)."""
    rows, out = res["rows"], []

    def ppl_pct(key, vs="vs_fp16"):
        return rows.get(key, {}).get("wikitext2", {}).get(vs, {}).get("pct")

    def hs_pts(key, vs="vs_fp16"):
        return rows.get(key, {}).get("hellaswag", {}).get(vs, {}).get("mean_rule", {}).get("points")

    a, b = ppl_pct("llama:f16", "vs_edgekv_fp16"), hs_pts("llama:f16", "vs_edgekv_fp16")
    if a is not None and b is not None:
        out.append(f"Execution-path noise floor: the two engines at 16 bits (llama.cpp f16 vs edgekv fp16) differ by "
                   f"{a:+.2f}% in perplexity and {b:+.2f} points on HellaSwag; differences of that size between "
                   f"policies are not meaningful.")
    for ek, ll, bits in (("int8", "q8_0", "8.5"), ("int4", "q4_0", "4.5")):
        x, y = ppl_pct(f"edgekv:{ek}"), ppl_pct(f"llama:{ll}")
        if x is not None and y is not None:
            hx, hy = hs_pts(f"edgekv:{ek}"), hs_pts(f"llama:{ll}")
            hs = "" if hx is None or hy is None else f"; HellaSwag {hx:+.2f} vs {hy:+.2f} points"
            out.append(f"At {bits} bits: edgekv {ek} {x:+.2f}% perplexity vs llama.cpp {ll} {y:+.2f}% (each against "
                       f"its own 16-bit cache){hs}. Formats: edgekv groups of {res['kv_groups'][0 if ek == 'int8' else 1]} "
                       f"values with an fp16 scale and minimum{', rotated' if res['kv_rotate'] else ''}; llama.cpp "
                       f"blocks of 32 with one fp16 scale.")
    x, y = ppl_pct("edgekv:k2v4"), ppl_pct("edgekv:k4v2")
    if x is not None and y is not None:
        half = "Keys" if x > y else "Values"
        out.append(f"{half} are the more sensitive half: at the same 3.75 bits, 2-bit keys (k2v4) cost {x:+.1f}% "
                   f"perplexity, 2-bit values (k4v2) {y:+.1f}%.")
    x, h = ppl_pct("edgekv:int2"), hs_pts("edgekv:int2")
    if x is not None and h is not None:
        seq = res["sequential_check"]["policies"].get("int2", {})
        extra = ""
        if "vs_fp16_sequential_mean_rule" in seq and "vs_fp16_batch_mean_rule" in seq:
            extra = (f" On the first {res['sequential_check']['tasks']} tasks int2 loses "
                     f"{seq['vs_fp16_batch_mean_rule']['points']:+.1f} points with `sequential=False` and "
                     f"{seq['vs_fp16_sequential_mean_rule']['points']:+.1f} with `sequential=True`.")
        out.append(f"int2 raises perplexity by {x:+.0f}% but moves HellaSwag by only {h:+.2f} points: with "
                   f"`sequential=False` only the ~30-token context is read at 2 bits (an ending's tokens see each "
                   f"other at 16 bits and its first token is predicted by the 16-bit prefill pass), and choosing "
                   f"among four endings is coarser than perplexity.{extra}")
    return out


def write_md(res: dict, path: Path) -> None:
    s = res["settings"]
    rows = res["rows"]
    L = ["# KV-cache precision vs quality: edgekv static policies (W=0) and llama.cpp KV types", ""]
    L.append(
        f"Model `{res['model']['file']}` (SmolLM2-135M-Instruct, Q4_1 weights). edgekv {res['edgekv_version']} "
        f"(threads {s['threads']}, ctx {s['n_ctx']}, KV groups {res['kv_groups']}, rotation "
        f"{'on' if res['kv_rotate'] else 'off'}), llama-cpp-python {res['llama_cpp_version']} (ctx {s['n_ctx']}, "
        f"n_batch 512, flash attention, {s['llama_threads']} thread(s)). {res['date']}.")
    L.append("")
    L.append("## Data")
    L.append("")
    L.append(f"* WikiText-2: `../shared/data/wikitext2_valid.txt` ({res['n_wikitext_tokens_in_file']:,} tokens "
             f"with edgekv's tokenizer, no BOS); the first {s['windows']} non-overlapping windows of {WINDOW} tokens "
             f"from the start of the file; context = the first {WINDOW_CTX} tokens of a window, scored = the last "
             f"{WINDOW - WINDOW_CTX} ({s['windows'] * (WINDOW - WINDOW_CTX):,} scored positions).")
    L.append(f"* HellaSwag: `../shared/data/hellaswag_dev.txt` (validation, llama.cpp's 6-line format); the first "
             f"{s['tasks']:,} tasks; each of the 4 endings scored as `\" \" + ending` after `activity_label: ctx`; "
             f"`acc (mean)` picks the ending with the highest mean token log-prob (llama.cpp's rule), "
             f"`acc (sum)` the highest summed log-prob.")
    L.append("")
    L.append("## Protocol")
    L.append("")
    L.append("* edgekv, WikiText-2: `Model.score(context, continuation, kv=policy, sequential=True)`: the "
             "context is prefilled and stored under the policy, then the 128 tokens are fed one at a time and "
             "each is stored under the policy right after its forward pass (W=0), so every scored token reads "
             "its predecessors at the policy's precision. Exception: the first scored token of a window is "
             "predicted by the prefill pass, which attends to the context at 16 bits (as the first generated "
             "token of a prompt is); 1 of 128 scored tokens.")
    L.append("* edgekv, HellaSwag: the context is stored under the policy (one prefill per task, reused for its "
             "four endings), each ending is scored with **`sequential=False`**: the ending's tokens are run in one "
             "batch and see each other at 16 bits; only the context is read at the policy's precision. As above, "
             "an ending's first token is predicted by the context's prefill pass (context at 16 bits). The "
             "sequential check below repeats fp16/int4/int2 with `sequential=True` on the first "
             f"{res['sequential_check']['tasks']} tasks.")
    L.append("* llama.cpp: WikiText-2 window = 512 tokens in one eval, log-probs of the last 128. HellaSwag: "
             "context evaluated once, each ending evaluated on top of it (llama.cpp attends over its cache, so the "
             "ending reads the context and its own earlier tokens at the cache type; the first ending token "
             "too). Checked against context+ending in one eval from an empty cache (table below). Bits: f16 = 16, "
             "q8_0 = 8.5, q4_0 = 4.5 (blocks of 32 with an fp16 scale).")
    L.append("* The same token ids go to both engines. edgekv `avg bits` = `Model.kv_avg_bits` (scales and "
             "minimums included).")
    L.append("* Paired comparisons: differences vs fp16 on the same tasks/windows, 95% CIs from a paired "
             f"bootstrap ({s['bootstrap']:,} resamples of tasks, resp. windows).")
    L.append("")
    L.append("## Results")
    L.append("")
    L.append("| engine | KV | avg bits | ppl | ppl vs fp16 | 95% CI | HS acc (mean) | vs fp16 (points) | 95% CI | "
             "HS acc (sum) | vs fp16 (points) | runtime |")
    L.append("|---|---|---:|---:|---:|---|---:|---:|---|---:|---:|---:|")
    for key, r in rows.items():
        w, h = r.get("wikitext2", {}), r.get("hellaswag", {})
        wv, hv = w.get("vs_fp16"), h.get("vs_fp16")
        is_ref = key in ("edgekv:fp16", "llama:f16")
        na = "ref" if is_ref else "--"
        L.append("| " + " | ".join([
            r["engine"], r["policy"], fmt(r["avg_bits"], ".2f"), fmt(w.get("ppl"), ".3f"),
            na if wv is None else f"{wv['pct']:+.2f}%", "" if is_ref else fmt_ci(wv and wv["ci95"]) + ("%" if wv else ""),
            fmt(h.get("acc_mean"), ".2f"), na if hv is None else f"{hv['mean_rule']['points']:+.2f}",
            "" if is_ref else fmt_ci(hv and hv["mean_rule"]["ci95"]), fmt(h.get("acc_sum"), ".2f"),
            na if hv is None else f"{hv['sum_rule']['points']:+.2f}", f"{r['runtime_s'] / 60:.1f} min",
        ]) + " |")
    L.append("")
    L.append("`vs fp16`: edgekv policies against edgekv fp16; llama.cpp types against llama.cpp f16. "
             "Runtime = summed engine time (score / eval calls) for this row's windows and tasks, measured on a "
             "shared 2-core machine running many jobs at once (this benchmark's own parallel processes "
             "included), so it says little about speed.")
    L.append("")
    parts = [
        f"{r['policy']} ppl {r['wikitext2']['vs_edgekv_fp16']['pct']:+.2f}% "
        f"{fmt_ci(r['wikitext2']['vs_edgekv_fp16']['ci95'])}, HellaSwag "
        f"{r['hellaswag']['vs_edgekv_fp16']['mean_rule']['points']:+.2f} points "
        f"{fmt_ci(r['hellaswag']['vs_edgekv_fp16']['mean_rule']['ci95'])}"
        for k, r in rows.items()
        if k.startswith("llama:") and "vs_edgekv_fp16" in r.get("wikitext2", {})
        and "vs_edgekv_fp16" in r.get("hellaswag", {})
    ]
    if parts:
        L.append("llama.cpp against edgekv fp16 (same windows and tasks; f16 vs fp16 is the two engines' "
                 "execution-path difference): " + "; ".join(parts) + ".")
        L.append("")
    L.append("## Targets")
    L.append("")
    L.append("| target | value | 95% CI | result | CI inside the bound |")
    L.append("|---|---:|---|---|---|")
    for t in res["targets"]:
        unit = "%" if "perplexity" in t["target"] else " points"
        res_s = "--" if t["pass"] is None else ("PASS" if t["pass"] else "FAIL")
        ci_s = "--" if t["ci_within_bound"] is None else ("yes" if t["ci_within_bound"] else "no")
        L.append(f"| {t['target']} | {fmt(t['value'], '+.2f')}{unit} | {fmt_ci(t['ci95'])} | {res_s} | {ci_s} |")
    L.append("")
    L.append("PASS/FAIL is on the point estimate (|difference| <= bound).")
    L.append("")
    seq = res["sequential_check"]
    if seq["policies"]:
        L.append(f"## HellaSwag: `sequential=True` vs `sequential=False` (first {seq['tasks']} tasks)")
        L.append("")
        L.append("| KV | acc (mean), sequential | acc (mean), batch | sequential - batch | 95% CI | choices changed | "
                 "mean abs diff of mean log-prob | vs fp16, sequential | vs fp16, batch | time seq / batch |")
        L.append("|---|---:|---:|---:|---|---:|---:|---:|---:|---:|")
        for name, p in seq["policies"].items():
            d = p["sequential_minus_batch_mean_rule"]
            vs = lambda proto: (f"{p[f'vs_fp16_{proto}_mean_rule']['points']:+.2f} "  # noqa: E731
                                f"{fmt_ci(p[f'vs_fp16_{proto}_mean_rule']['ci95'], '+.1f')}"
                                if f"vs_fp16_{proto}_mean_rule" in p else "--")
            L.append(f"| {name} | {p['acc_mean_sequential']:.2f} | {p['acc_mean_batch']:.2f} | {d['points']:+.2f} | "
                     f"{fmt_ci(d['ci95'])} | {p['choices_changed_mean_rule']} | "
                     f"{p['mean_abs_diff_of_mean_logprob']:.4f} | {vs('sequential')} | {vs('batch')} | "
                     f"{p['runtime_s_sequential']:.0f} s / {p['runtime_s_batch']:.0f} s |")
        L.append("")
    sp = res["llama_split_check"]
    if sp["types"]:
        L.append(f"## llama.cpp: context reused across endings vs context+ending in one eval (first {sp['tasks']} tasks)")
        L.append("")
        L.append("| type | max abs diff of mean log-prob | mean abs diff | choices changed |")
        L.append("|---|---:|---:|---:|")
        for name, p in sp["types"].items():
            L.append(f"| {name} | {p['max_abs_diff_of_mean_logprob']:.2e} | {p['mean_abs_diff_of_mean_logprob']:.2e} | "
                     f"{p['choices_changed_mean_rule']} |")
        L.append("")
    obs = observations(res)
    if obs:
        L.append("## Reading the figures")
        L.append("")
        L.extend(f"* {o}" for o in obs)
        L.append("")
    L.append("## Notes")
    L.append("")
    for n in res.get("notes", []):
        L.append(f"* {n}")
    L.append(f"* Calibration: {SIM_CALIBRATION}")
    L.append("")
    L.append("## Command")
    L.append("")
    L.append("```sh")
    L.append("cmake -S . -B build -G Ninja && cmake --build build")
    L.append(f"PYTHONPATH=python python {res['command']}")
    L.append("```")
    L.append("")
    L.append(res.get("run_note", ""))
    L.append("")
    path.write_text("\n".join(L).rstrip() + "\n")


def write_png(res: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedFormatter, FixedLocator, NullFormatter, ScalarFormatter

    rows, s = res["rows"], res["settings"]
    fig, (ax_hs, ax_ppl) = plt.subplots(1, 2, figsize=(13, 5.2))
    styles = {"edgekv": dict(marker="o", color="tab:blue", label="edgekv, W=0"),
              "llama.cpp": dict(marker="s", color="tab:orange", label="llama.cpp KV type")}
    for ax, metric in ((ax_hs, "hellaswag"), (ax_ppl, "wikitext2")):
        pts = [r for r in rows.values() if r.get(metric) and r["avg_bits"] is not None]
        same_x: dict[tuple, list] = {}
        for r in pts:  # points of one engine at the same bits are spread sideways a little
            same_x.setdefault((r["engine"], round(r["avg_bits"], 2)), []).append(r["policy"])
        labelled = set()
        for r in pts:
            st = styles[r["engine"]]
            group = same_x[(r["engine"], round(r["avg_bits"], 2))]
            x = r["avg_bits"] * 2 ** (0.035 * (group.index(r["policy"]) - (len(group) - 1) / 2))
            if metric == "hellaswag":
                h = r[metric]
                y = h["acc_mean"]
                err = 100 * 1.96 * np.sqrt(y / 100 * (1 - y / 100) / h["tasks"])
                d = h.get("vs_fp16", {}).get("mean_rule", {}).get("points")
                text = r["policy"] + ("" if d is None else f" {d:+.1f}")
            else:
                y, err = r[metric]["ppl"], None
                d = r[metric].get("vs_fp16", {}).get("pct")
                text = r["policy"] + ("" if d is None else f" {d:+.1f}%")
            ax.errorbar(x, y, yerr=err, fmt=st["marker"], color=st["color"], capsize=3, ms=6,
                        label=st["label"] if r["engine"] not in labelled else None)
            labelled.add(r["engine"])
            up = r["engine"] == "edgekv"  # edgekv labels above right, llama.cpp's below right
            ax.annotate(text, (x, y), textcoords="offset points",
                        xytext=(6, (5 if up else -13) - 10 * group.index(r["policy"])),
                        ha="left", fontsize=8, color=st["color"])
        ax.set_xscale("log", base=2)
        ticks = sorted({round(r["avg_bits"], 2) for r in pts})
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.xaxis.set_major_formatter(FixedFormatter([f"{t:g}" for t in ticks]))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlim(2.7, 24)
        ax.set_xlabel("average KV bits per element, log scale (scales included; llama.cpp: 16, 8.5, 4.5)")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="center right", fontsize=8)
    fp = rows.get("edgekv:fp16", {})
    ax_hs.set_ylabel("HellaSwag accuracy (%), mean log-prob rule")
    ax_hs.set_title(f"HellaSwag, first {s['tasks']:,} tasks (bars: 95% binomial; label: points vs fp16)", fontsize=10)
    if fp.get("hellaswag"):
        ax_hs.axhline(fp["hellaswag"]["acc_mean"], ls="--", color="gray", lw=0.8)
    ax_hs.axhline(25, ls=":", color="red", lw=0.8)
    ax_hs.text(23, 25.4, "chance", color="red", fontsize=8, ha="right")
    ax_ppl.set_ylabel("WikiText-2 perplexity")
    ax_ppl.set_title(f"WikiText-2, {s['windows']} windows x 128 scored tokens after 384 of context "
                     f"(label: % vs fp16)", fontsize=10)
    ppls = [r["wikitext2"]["ppl"] for r in rows.values() if r.get("wikitext2")]
    if ppls and max(ppls) / min(ppls) > 2:
        ax_ppl.set_yscale("log")
        ticks = [t for t in (10, 12, 14, 16, 20, 25, 30, 40, 50, 70, 100, 150, 200, 300)
                 if min(ppls) / 1.15 <= t <= max(ppls) * 1.15]
        ax_ppl.yaxis.set_major_locator(FixedLocator(ticks))
        ax_ppl.yaxis.set_major_formatter(ScalarFormatter())
        ax_ppl.yaxis.set_minor_formatter(NullFormatter())
    if fp.get("wikitext2"):
        ax_ppl.axhline(fp["wikitext2"]["ppl"], ls="--", color="gray", lw=0.8)
    fig.suptitle(f"{res['model']['file']}: KV-cache precision vs quality (dashed: edgekv fp16)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


# ---- main ------------------------------------------------------------------------------------------

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", type=int, default=1000, help="HellaSwag tasks (from the start of the file)")
    ap.add_argument("--windows", type=int, default=16, help="WikiText-2 windows of 512 tokens")
    ap.add_argument("--policies", default=DEFAULT_POLICIES, help="edgekv KV policies to compute, comma-separated, in this order (reports always include fp16, "
                         "the reference: keep it in the list unless it is cached)")
    ap.add_argument("--seq-policies", default=SEQ_POLICIES, help="policies of the sequential=True HellaSwag check")
    ap.add_argument("--seq-tasks", type=int, default=200, help="tasks of the sequential=True check")
    ap.add_argument("--llama-types", default=",".join(LLAMA_TYPES), help="llama.cpp KV types: f16,q8_0,q4_0")
    ap.add_argument("--split-check", type=int, default=20,
                    help="tasks on which llama.cpp's context-reuse scoring is checked against one eval per ending")
    ap.add_argument("--skip-llama", action="store_true", help="run no llama.cpp work (report from the cache)")
    ap.add_argument("--skip-edgekv", action="store_true", help="run no edgekv work (report from the cache)")
    ap.add_argument("--resume", action="store_true", help="reuse cached per-window / per-task results")
    ap.add_argument("--parts", default="wikitext2,hellaswag,seq",
                    help="what to compute (the report uses whatever is cached): wikitext2, hellaswag (with "
                         "llama.cpp's one-eval check), seq (edgekv's sequential=True HellaSwag check)")
    ap.add_argument("--threads", type=int, default=2, help="edgekv threads")
    ap.add_argument("--llama-threads", type=int, default=2, help="llama.cpp threads (n_threads and n_threads_batch)")
    ap.add_argument("--bootstrap", type=int, default=10000, help="bootstrap resamples")
    ap.add_argument("--model", default="smollm2-135m", help="registry name or GGUF path")
    ap.add_argument("--out", default=str(RESULTS), help="folder for accuracy.json/.md/.png")
    ap.add_argument("--cache", default=str(CACHE_ROOT), help="folder of the per-task result cache")
    ap.add_argument("--note", default="", help="a line for accuracy.md on how this run was carried out")
    args = ap.parse_args(argv)
    args.policies = [p.strip().lower() for p in args.policies.split(",") if p.strip()]
    # computed in the order given; reported with fp16 (the reference) first
    args.report_policies = ["fp16"] + [p for p in args.policies if p != "fp16"]
    args.seq_policies = [p.strip().lower() for p in args.seq_policies.split(",") if p.strip()]
    args.llama_types = [t.strip().lower() for t in args.llama_types.split(",") if t.strip()]
    args.parts = {x.strip() for x in args.parts.split(",") if x.strip()}
    if args.parts - {"wikitext2", "hellaswag", "seq"}:
        ap.error(f"--parts: unknown {sorted(args.parts - {'wikitext2', 'hellaswag', 'seq'})}")
    for t in args.llama_types:
        if t not in LLAMA_TYPES:
            ap.error(f"unknown llama.cpp KV type {t!r}; known: {', '.join(LLAMA_TYPES)}")
    args.report_llama_types = ["f16"] + [t for t in args.llama_types if t != "f16"] if args.llama_types else []
    from edgekv.kv_policy import parse_policy
    for p in args.policies + args.seq_policies:
        parse_policy(p)  # fail now on a bad name, not an hour in
    return args


def reproduce_command(args) -> str:
    parts = ["benchmarks/accuracy.py", f"--tasks {args.tasks}", f"--windows {args.windows}"]
    if args.report_policies != DEFAULT_POLICIES.split(","):
        parts.append(f"--policies {','.join(args.report_policies)}")
    if args.seq_tasks != 200:
        parts.append(f"--seq-tasks {args.seq_tasks}")
    if args.llama_threads != 2:
        parts.append(f"--llama-threads {args.llama_threads}")
    parts.append("--resume")
    return " ".join(parts)


def main(argv=None) -> int:
    args = parse_args(argv)
    import edgekv
    model_path = Path(edgekv.registry.resolve(args.model)) if not args.model.endswith(".gguf") else Path(args.model)
    t_start = time.time()
    load_start = os.getloadavg()
    cache = Cache(Path(args.cache) / fingerprint(model_path), args.resume)
    print(f"cache: {cache.root}", file=sys.stderr)

    # token ids (edgekv's tokenizer, identical to llama.cpp's; no BOS) for both engines
    tok = edgekv.Model(model_path, threads=1, ctx=16)
    ids = tok.tokenize(WIKI.read_text(encoding="utf-8"), special=False)
    n_win = len(ids) // WINDOW
    if args.windows > n_win:
        raise SystemExit(f"--windows {args.windows}: the file has only {n_win} windows of {WINDOW} tokens")
    windows = [ids[w * WINDOW:(w + 1) * WINDOW] for w in range(args.windows)]
    tasks = read_hellaswag(HELLASWAG, args.tasks)
    if len(tasks) < args.tasks:
        raise SystemExit(f"--tasks {args.tasks}: {HELLASWAG} has only {len(tasks)} tasks")
    tasks_ids = [(tok.tokenize(c, special=False), label, [tok.tokenize(" " + e, special=False) for e in ends])
                 for c, label, ends in tasks]
    kv_groups, kv_rotate = tok.kv_groups, tok.kv_rotate
    tok.close()

    if not args.skip_edgekv:
        run_edgekv(args, cache, model_path, windows, tasks_ids)
    if not args.skip_llama:
        run_llama(args, cache, model_path, windows, tasks_ids)

    import llama_cpp
    versions = {"edgekv_version": edgekv.__version__, "llama_cpp_version": llama_cpp.__version__}
    res = summarize(args, cache, versions, len(ids))
    res.update({
        "model": {"file": model_path.name, "path": str(model_path), "bytes": model_path.stat().st_size},
        "kv_groups": list(kv_groups) if kv_groups else None, "kv_rotate": kv_rotate,
        "data": {"wikitext2": str(WIKI.relative_to(REPO.parent)), "hellaswag": str(HELLASWAG.relative_to(REPO.parent))},
        "settings": {"tasks": args.tasks, "windows": args.windows, "window": WINDOW, "window_context": WINDOW_CTX,
                     "n_ctx": N_CTX, "threads": args.threads, "llama_threads": args.llama_threads,
                     "bootstrap": args.bootstrap, "policies": args.report_policies, "llama_types": args.report_llama_types,
                     "hellaswag_edgekv_sequential": False, "wikitext2_edgekv_sequential": True},
        "command": reproduce_command(args),
        "invoked_as": " ".join(["benchmarks/accuracy.py"] + (argv if argv is not None else sys.argv[1:])),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {**machine(command_line("accuracy.py", argv)), "loadavg_start": [round(x, 2) for x in load_start],
                    "loadavg_end": [round(x, 2) for x in os.getloadavg()]},
        "wall_s_this_invocation": round(time.time() - t_start, 1),
        "notes": NOTES,
        "run_note": args.note,
    })
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "accuracy.json").write_text(json.dumps(res, indent=1) + "\n")
    write_md(res, out / "accuracy.md")
    write_png(res, out / "accuracy.png")
    print(f"wrote {out / 'accuracy.json'}, accuracy.md, accuracy.png", file=sys.stderr)
    return 0


NOTES = [
    "`Model.score(..., kv=\"int4\")` (a policy *name*) parses a new policy object on every call, and the "
    "context cache is only reused for the very object it was stored under (`self._ctx_policy is policy`), "
    "so with names every call re-prefills its context (same numbers, ~2x the HellaSwag time). This script "
    "passes one `KVPolicy` object per policy (`edgekv.kv_policy.parse_policy`) so a task's four endings share "
    "one prefill.",
    "W=0 in edgekv means a token is quantized after the forward pass that produced it: inside a batch (a "
    "prefill, or `sequential=False`) tokens attend to each other's 16-bit K/V. Hence the first continuation "
    "token is always predicted with the context at 16 bits (its log-prob is identical under fp16 and int2). "
    "llama.cpp stores K/V in the cache type before attending, so all its predictions read quantized K/V.",
    "Execution-path noise: edgekv (like llama.cpp) quantizes matmul activations to 8 bits, and one "
    "position's logits depend on the size of the batch it is computed in (next-token log-prob at position "
    "99 of WikiText-2: -2.711 in a batch of 100 or 101 tokens, -2.597 in a batch of 104 or more, -2.801 one "
    "token at a time; llama.cpp batch vs one at a time differs similarly). fp16 `sequential=True` vs `False` on window 0 differ by 0.06 nats per "
    "token on average (mean abs), but only 0.02% in perplexity: the noise is symmetric.",
    "llama.cpp ran with 1 thread (`--llama-threads 1`, n_threads = n_threads_batch = 1): on this shared "
    "2-core machine (load average ~10) its spinning 2-thread barrier made an eval 3-5x slower; the logits "
    "are bit-identical for 1 and 2 threads (checked on a 512-token window, f16 and q4_0).",
]

if __name__ == "__main__":
    sys.exit(main())
