"""Evaluation harness of KV precision policies: HellaSwag accuracy and WikiText-2 perplexity
against average KV bits, for the learned controller and its baselines (measured at W=0).

    python benchmarks/controller_eval.py run --task hellaswag --n 1000 --policies fp16,int8,k4v2,adaptive@3.5
    python benchmarks/controller_eval.py run --task wikitext --n 40 --policies fp16,k4v2,adaptive@3.5
    python benchmarks/controller_eval.py run --task hellaswag --n 1000 --policies random:adaptive@3.5,rule:adaptive@3.5
    python benchmarks/controller_eval.py report      # JSON + Pareto PNG + paired bootstrap CIs
    python benchmarks/controller_eval.py cost        # controller cost per decode step at 1,024 tokens

Tasks
  hellaswag  ../shared/data/hellaswag_dev.txt, the first n tasks (llama.cpp's 6-line format). Context
             = the first line (``activity_label: ctx``), stored in the cache under the policy
             (prefill, then the policy decides every token at W=0); each ending (" " + ending) is
             scored in one batch (Model.score(sequential=False)); the prediction is the ending with
             the highest mean log-prob of its tokens (as llama.cpp does).
  wikitext   the held-out WikiText-2 articles (controller/corpus.py: article index % 4 == 3, never
             trained on), tokenized and concatenated, cut into n windows of 512 tokens: the first 256
             are prefilled under the policy, the next 256 are decoded one at a time (each stored
             under the policy at W=0 before the next is scored) and scored. Perplexity = exp(mean
             NLL) over all scored tokens.

Policies (comma-separated)
  fp16 int8 int4 int2 k4v2 k8v2 ...   static (edgekv.kv_policy.StaticPolicy)
  adaptive@B                           learned controller at target_bits B (edgekv.controller)
  adaptive-lam@L                       learned controller with its knob lambda = L
  rule@B                               rule-based "Dynamic KV" (entropy / attention thresholds
                                       calibrated on the controller's training features to B bits)
  rule:REF / random:REF                rule-based at REF's measured average bits on this task
                                       (thresholds set on features of the task's first items) /
                                       random routing (RandomPolicy) at REF's measured K and V bit mix
  random-sink:REF                      random:REF with the learned policy's attention-sink guard
                                       (position 0's key never below SINK_MIN_KEY_BITS)
  sink:P                               static policy P with that same guard (edgekv.kv_policy): the
                                       uniform baseline that shares the controller's one hand-made rule
  oracle@B                             (wikitext only) the learned controller's own objective with
                                       perfect knowledge: every token's exact single-token damage
                                       (controller/oracle.py, the training labels) measured on the
                                       window itself, then the bits that minimize the summed damage
                                       at B average bits, with the sink guard. Not a policy: what a
                                       controller that predicted its labels perfectly would reach.
                                       Slow (~10 forward passes per token); reported on its own windows
  P+wN                                 policy P with a window: each token stays at 16 bits until it
                                       is N steps old (kv_window=N; not W=0). Its bits count the
                                       tokens still at 16 bits when the item ends
Average bits: storage bits per cached K/V element, group scales and minimums included, over the
tokens whose precision the scores depend on (HellaSwag: context; WikiText: the whole window).

Results go to benchmarks/results/controller_eval/<task>/<policy>.jsonl, one line per task or
window, so a killed run resumes where it stopped. Those folders are not committed: the repository
keeps each as controller_eval/<task>.tar.gz, unpacked in place when the folder is missing (see
benchmarks/README.md). Report: benchmarks/results/controller_pareto.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tarfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
for _p in (REPO / "python", REPO):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from edgekv.controller import LearnedPolicy, RulePolicy, average_bits, protect_sink  # noqa: E402
from edgekv.kv_policy import CallablePolicy, KVPolicy, RandomPolicy, parse_policy  # noqa: E402

from common import bootstrap, ci95, machine, machine_line, read_hellaswag  # noqa: E402  (benchmarks/, the script's own folder)

RESULTS = REPO / "benchmarks" / "results"
OUT = RESULTS / "controller_eval"
HELLASWAG = REPO.parent / "shared" / "data" / "hellaswag_dev.txt"
WINDOW, CONTEXT = 512, 256


# ---- data -----------------------------------------------------------------------------

def hellaswag_tasks(path: Path = HELLASWAG) -> list[dict]:
    return [{"context": c, "label": label, "endings": e} for c, label, e in read_hellaswag(path)]


def wikitext_windows(model, n: int) -> list[np.ndarray]:
    from controller.corpus import wikitext_split

    _, heldout = wikitext_split()
    ids: list[int] = []
    for art in heldout:
        ids += model.tokenize(art, special=False)
    ids_a = np.asarray(ids, np.int32)
    n_all = ids_a.size // WINDOW
    if n > n_all:
        raise SystemExit(f"the held-out WikiText-2 articles hold only {n_all} windows of {WINDOW} tokens")
    return [ids_a[i * WINDOW:(i + 1) * WINDOW] for i in range(n)]


# ---- policies ---------------------------------------------------------------------------

def _task_dir(task: str) -> Path:
    """OUT/<task>, unpacked from the committed OUT/<task>.tar.gz when it is not there yet."""
    d, packed = OUT / task, OUT / f"{task}.tar.gz"
    if not d.exists() and packed.exists():
        with tarfile.open(packed) as tf:  # our own archive; the data filter where Python has it
            tf.extractall(OUT, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    return d


def _records(task: str, name: str) -> list[dict]:
    p = _task_dir(task) / f"{_fname(name)}.jsonl"
    if not p.exists():
        return []
    return [json.loads(x) for x in p.read_text().splitlines() if x.strip()]


def _fname(name: str) -> str:
    return name.replace("/", "_").replace(":", "~")


def _mix(records, key) -> dict[int, float]:
    tot: dict[int, float] = {}
    for r in records:
        for b, c in r[key].items():
            tot[int(b)] = tot.get(int(b), 0) + c
    s = sum(tot.values())
    return {b: c / s for b, c in sorted(tot.items())}


def _measured_bits(records) -> float:
    num = sum(r["bits"] * r["ntok"] for r in records)
    return num / sum(r["ntok"] for r in records)


def _split_window(spec: str) -> tuple[str, int]:
    """'k4v2+w4' -> ('k4v2', 4): the policy with kv_window W (tokens decided once W steps old)."""
    base, sep, w = spec.rpartition("+w")
    return (base, int(w)) if sep and w.isdigit() else (spec, 0)


def make_policy(spec: str, task: str, model, item: int = 0) -> KVPolicy:
    """The policy named spec (see the module docstring); item seeds random routing."""
    base, window = _split_window(spec)
    if window:
        pol = make_policy(base, task, model, item)
        pol.window = window
        pol.name = spec
        return pol
    if spec.startswith("adaptive-lam@"):
        return LearnedPolicy(lam=float(spec.split("@", 1)[1]), name=spec)
    if spec.startswith("adaptive@"):
        return LearnedPolicy(target_bits=float(spec.split("@", 1)[1]), name=spec)
    if spec.startswith("rule@"):
        return _rule_at(model, float(spec.split("@", 1)[1]), spec)
    if spec.startswith("rule:"):
        ref = _records(task, spec.split(":", 1)[1])
        if not ref:
            raise SystemExit(f"{spec}: run {spec.split(':', 1)[1]} on {task} first")
        pol = RulePolicy.calibrated(_probe_features(task, model), _measured_bits(ref), groups=model.kv_groups)
        pol.name = spec
        return pol
    if spec.startswith(("random:", "random-sink:")):
        ref = _records(task, spec.split(":", 1)[1])
        if not ref:
            raise SystemExit(f"{spec}: run {spec.split(':', 1)[1]} on {task} first")
        pol = RandomPolicy(_mix(ref, "k_hist"), _mix(ref, "v_hist"), seed=1000003 * (item + 1))
        if spec.startswith("random:"):
            return pol

        def with_sink(f):  # the learned policy's sink guard on top
            k, v = pol.decide(f)
            return protect_sink(f.positions, k), v

        return CallablePolicy(with_sink, needs_features=False, name=spec)
    if spec.startswith("oracle@"):
        raise SystemExit(f"{spec}: the oracle is measured per WikiText window (run --task wikitext)")
    return parse_policy(spec)


def oracle_policy(model, ids: np.ndarray, spec: str, progress: bool) -> KVPolicy:
    """oracle@B on one window: every token's exact single-token damage (controller/oracle.py) at
    each bit-width, then the bits that minimize the summed damage at B average bits for this
    window, with the learned policy's sink guard: the controller's objective (choose_bits) with
    the window's true damages in place of predicted ones."""
    from controller.oracle import budget_bits, window_damages
    from edgekv.controller import SINK_MIN_KEY_BITS
    from tqdm import tqdm

    ids = np.asarray(ids, np.int32)
    with tqdm(total=ids.size - 1, desc=f"{spec} damages", disable=not progress, file=sys.stderr,
              mininterval=10, leave=False) as bar:
        dmg = window_damages(model, ids, progress=lambda j: bar.update(1))
    floor = np.where(np.arange(ids.size) == 0, SINK_MIN_KEY_BITS, 0)
    kb, vb = budget_bits(dmg, float(spec.split("@", 1)[1]), model.kv_groups, floor)

    def by_position(f):
        pos = np.asarray(f.positions)
        return kb[pos].copy(), vb[pos].copy()

    return CallablePolicy(by_position, needs_features=False, name=spec)


_RULE_X = None


def _rule_at(model, target: float, name: str) -> RulePolicy:
    """Rule thresholds calibrated on the controller's training feature rows (shipped sample)."""
    global _RULE_X
    if _RULE_X is None:
        from edgekv.controller import find_artifact

        art = find_artifact(model)
        _RULE_X = np.load(art.path.with_name(art.path.stem + "_calib.npy"))
    pol = RulePolicy.calibrated(_RULE_X, target, groups=model.kv_groups)
    pol.name = name
    return pol


def _probe_features(task: str, model) -> np.ndarray:
    """feature_matrix rows of the first items of a task, as a W=0 policy sees them (cache at 16 bits):
    what rule:REF calibrates its thresholds on, so it lands on REF's bits on this task. (This gives the
    rule baseline the feature quantiles of the evaluation data, an advantage the controller lacks.)"""
    path = _task_dir(task) / "_probe_features.npy"
    if path.exists():
        return np.load(path)
    from edgekv.controller import feature_matrix

    store: list = []

    def fn(f):
        store.append(feature_matrix(f))
        return np.full(len(f), 16, np.int32), np.full(len(f), 16, np.int32)

    cap = CallablePolicy(fn, name="probe")
    if task == "hellaswag":
        for t in hellaswag_tasks()[:100]:
            model.score(model.tokenize(t["context"]), model.tokenize(" " + t["endings"][0], add_bos=False,
                                                                   special=False)[:1], kv=cap)
    else:
        for w in wikitext_windows(model, 4):
            model.reset()
            model.score(w[:CONTEXT], w[CONTEXT:], kv=cap, sequential=True)
    X = np.concatenate(store)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, X)
    return X


# ---- running ------------------------------------------------------------------------------

def _hist(bits: np.ndarray) -> dict[str, int]:
    u, c = np.unique(bits, return_counts=True)
    return {str(int(b)): int(n) for b, n in zip(u, c)}


def _artifact_tag(model, spec: str) -> str | None:
    """Short hash of the controller artifact a learned / rule / random spec depends on."""
    if not spec.startswith(("adaptive", "rule", "random")):
        return None
    import hashlib

    from edgekv.controller import find_artifact

    art = find_artifact(model)
    h = hashlib.sha256(art.path.read_bytes() + art.path.with_suffix(".json").read_bytes())
    return h.hexdigest()[:12]


# records from before the layout was recorded were all made with this one
OLD_LAYOUT = "g64-64-32-rot"


def _layout_tag(model, spec: str) -> str | None:
    """The KV record layout a policy's results depend on (None for fp16, whose records are plain)."""
    if spec == "fp16":
        return None
    g8, g4, g2 = model.kv_groups
    return f"g{g8}-{g4}-{g2}" + ("-rot" if model.kv_rotate else "") + ("-ck" if model.kv_center_keys else "") \
        + ("-fit" if model.kv_fit_grid else "")


def _resume(task: str, spec: str, model) -> tuple[set, str | None, str | None]:
    """Items already done, after checking they came from the controller artifact now shipped and
    the KV layout the model uses now."""
    tag, layout = _artifact_tag(model, spec), _layout_tag(model, spec)
    recs = _records(task, spec)
    stale = [r for r in recs if r.get("artifact") != tag]
    if stale:
        raise SystemExit(f"{OUT / task / _fname(spec)}.jsonl holds results of another controller artifact "
                         f"({stale[0].get('artifact')} vs {tag}): delete it to rerun")
    stale = [r for r in recs if layout is not None and r.get("layout", OLD_LAYOUT) != layout]
    if stale:
        raise SystemExit(f"{OUT / task / _fname(spec)}.jsonl holds results of another KV layout "
                         f"({stale[0].get('layout', OLD_LAYOUT)} vs {layout}): delete it to rerun")
    return {r["i"] for r in recs}, tag, layout


def _run_items(task: str, model, spec: str, items: list, progress: bool, score, s_digits: int) -> None:
    """Score every item of a task not yet in its results file under the policy `spec`, appending one
    JSON record per item. score(item, policy) -> (fields, k_bits, v_bits of the tokens scored on)."""
    out = _task_dir(task) / f"{_fname(spec)}.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    done, tag, layout = _resume(task, spec, model)
    # random routing is seeded per item (make_policy's item), so random:REF and random-sink:REF
    # draw the same bits for the same item
    per_item = spec.startswith(("random:", "random-sink:", "oracle@"))
    static = None if per_item else make_policy(spec, task, model)
    from tqdm import tqdm

    todo = [i for i in range(len(items)) if i not in done]
    if todo:  # where and how these records were made: the report names it
        with (out.parent / "runs.jsonl").open("a") as fh:
            fh.write(json.dumps({"policy": spec, "items": len(todo),
                                 **machine(" ".join(["python", "benchmarks/controller_eval.py"] + sys.argv[1:]))}) + "\n")
    with out.open("a") as fh:
        for i in tqdm(todo, desc=f"{task} {spec}", disable=not progress, file=sys.stderr, mininterval=5):
            if spec.startswith("oracle@"):
                pol = oracle_policy(model, items[i], spec, progress)
            else:
                pol = static or make_policy(spec, task, model, item=i)
            t0 = time.perf_counter()
            fields, kb, vb = score(items[i], pol)
            rec = {"i": i, **fields, "bits": average_bits(kb, vb, model.kv_groups), "k_hist": _hist(kb),
                   "v_hist": _hist(vb), "s": round(time.perf_counter() - t0, s_digits), "artifact": tag,
                   "layout": layout}
            fh.write(json.dumps(rec) + "\n")
            fh.flush()


def run_hellaswag(model, spec: str, n: int, progress: bool) -> None:
    def score(t, pol):
        ctx = model.tokenize(t["context"])
        lps = []
        for j, e in enumerate(t["endings"]):
            lp = model.score(ctx, model.tokenize(" " + e, add_bos=False, special=False), kv=pol, sequential=False)
            lps.append(float(lp.mean()))
            if j == 0:
                kb, vb = model.kv_bits()
                kb, vb = kb[:len(ctx)], vb[:len(ctx)]
        return {"label": t["label"], "lp": lps, "pred": int(np.argmax(lps)), "ntok": len(ctx)}, kb, vb

    _run_items("hellaswag", model, spec, hellaswag_tasks()[:n], progress, score, 4)


def run_wikitext(model, spec: str, n: int, progress: bool) -> None:
    def score(w, pol):
        model.reset()
        lp = model.score(w[:CONTEXT], w[CONTEXT:], kv=pol, sequential=True)
        kb, vb = model.kv_bits()
        return {"nll": float(-lp.sum()), "n": int(lp.size), "ntok": int(kb.size)}, kb, vb

    _run_items("wikitext", model, spec, wikitext_windows(model, n), progress, score, 3)


def load_model(name: str, threads: int):
    from controller.common import load_model as _load

    return _load(name, threads=threads, ctx=1100)


def cmd_run(args) -> None:
    model = load_model(args.model, args.threads)
    for spec in [s.strip() for s in args.policies.split(",") if s.strip()]:
        t0 = time.time()
        if args.task == "hellaswag":
            run_hellaswag(model, spec, args.n, not args.quiet)
        else:
            run_wikitext(model, spec, args.n, not args.quiet)
        print(f"{args.task} {spec}: done in {time.time() - t0:.0f} s", file=sys.stderr, flush=True)


# ---- report -------------------------------------------------------------------------------

def hellaswag_summary(recs: list[dict]) -> dict:
    correct = np.array([r["pred"] == r["label"] for r in recs], np.float64)
    return {"n": len(recs), "acc": 100 * correct.mean(), "bits": _measured_bits(recs),
            "s_per_task": float(np.mean([r["s"] for r in recs]))}


def wikitext_summary(recs: list[dict]) -> dict:
    nll = sum(r["nll"] for r in recs)
    n = sum(r["n"] for r in recs)
    return {"n": len(recs), "tokens": n, "ppl": float(np.exp(nll / n)), "bits": _measured_bits(recs),
            "s_per_window": float(np.mean([r["s"] for r in recs]))}


def paired_hellaswag(a: list[dict], b: list[dict], boot: int = 10000) -> dict:
    """Accuracy of a minus b (points) on their common tasks, with a 95% paired bootstrap CI."""
    bi = {r["i"]: r for r in b}
    common = [r for r in a if r["i"] in bi]
    ca = np.array([r["pred"] == r["label"] for r in common], np.float64)
    cb = np.array([bi[r["i"]]["pred"] == bi[r["i"]]["label"] for r in common], np.float64)
    d = 100 * (ca - cb)
    bs = bootstrap(lambda idx: d[idx].mean(axis=1), d.size, boot)
    return {"n": int(d.size), "diff": float(d.mean()), "ci95": ci95(bs), "p_le_0": float(np.mean(bs <= 0))}


def paired_wikitext(a: list[dict], b: list[dict], boot: int = 10000) -> dict:
    """Perplexity of a relative to b (percent) on their common windows, 95% paired bootstrap CI."""
    bi = {r["i"]: r for r in b}
    common = [r for r in a if r["i"] in bi]
    na = np.array([r["nll"] for r in common])
    nb = np.array([bi[r["i"]]["nll"] for r in common])
    nt = np.array([r["n"] for r in common], np.float64)
    rel = lambda x, y, t: 100 * (np.exp((x.sum(-1) - y.sum(-1)) / t.sum(-1)) - 1)  # noqa: E731
    bs = bootstrap(lambda idx: rel(na[idx], nb[idx], nt[idx]), na.size, boot)
    return {"n": int(na.size), "diff_pct": float(rel(na, nb, nt)), "ci95": ci95(bs), "p_le_0": float(np.mean(bs <= 0))}


def _default_pairs(pols: dict) -> list[tuple[str, str]]:
    """Each learned policy against fp16, the uniform policies around its bits (int3 3.5, k4v2 3.75, k4v3
    4.0) and every baseline run at its bits (random, random-sink, rule); random-sink against random (the
    sink guard alone, same draws); the static policies against fp16."""
    out = []
    for name in sorted(pols):
        if name.startswith("adaptive@") and "+w" not in name:
            out += [(name, b) for b in ("fp16", "int3", "k4v2", "k4v3", "sink:int3", "sink:k4v2", "sink:k4v3",
                                        f"random:{name}", f"random-sink:{name}", f"rule:{name}") if b in pols]
            if f"random-sink:{name}" in pols and f"random:{name}" in pols:  # the sink guard alone
                out.append((f"random-sink:{name}", f"random:{name}"))
    out += [(name, "fp16") for name in ("int8", "int4", "k4v3", "k4v2", "int3", "k2v4", "int2") if name in pols]
    out += [(f"sink:{name}", name) for name in ("k4v3", "k4v2", "int3") if f"sink:{name}" in pols]  # the guard alone
    for name in sorted(pols):  # the oracle against fp16 and the learned policy at its budget
        if name.startswith("oracle@"):
            out += [(name, b) for b in ("fp16", "adaptive@" + name.split("@", 1)[1], "int3") if b in pols]
    return out


def _provenance(summary: dict) -> list:
    """Where the report and the runs behind its records were made (runs log themselves in runs.jsonl)."""
    if "provenance" in summary:
        return summary["provenance"]
    out = [f"This report: {machine_line(machine('python benchmarks/controller_eval.py report'))}"]
    for task, t in summary["tasks"].items():
        runs_file = _task_dir(task) / "runs.jsonl"
        runs = [json.loads(x) for x in runs_file.read_text().splitlines() if x.strip()] if runs_file.exists() else []
        out += [f"{task} {r['policy']} ({r['items']} items, {r['date_utc']}): {machine_line(r)}" for r in runs]
        made = sum(p.get("items_run", 0) for p in t["policies"].values())
        if made > sum(r["items"] for r in runs):
            out.append(f"{task}: {made - sum(r['items'] for r in runs)} records come from runs before runs were logged "
                       "(2026-12-05): their command, commit and machine were not recorded")
    return out


def cmd_report(args) -> None:
    summary: dict = {"protocol": __doc__.split("Policies")[0].strip(), "tasks": {}}
    pairs = [p.split("~vs~") for p in args.compare.split(",") if p] if args.compare else None
    for task, summ, paired in (("hellaswag", hellaswag_summary, paired_hellaswag),
                               ("wikitext", wikitext_summary, paired_wikitext)):
        d = _task_dir(task)
        if not d.exists():
            continue
        pols = {}
        for f in sorted(d.glob("*.jsonl")):
            recs = [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
            if recs:
                pols[f.stem.replace("~", ":")] = recs
        # compare on the items every policy finished; the oracle (slow: measured per window) runs on
        # fewer windows and is summarized, and paired, on its own
        full = [v for k, v in pols.items() if not k.startswith("oracle@")]
        common = set.intersection(*[{r["i"] for r in v} for v in full]) if full else set()
        res = {}
        for name, recs in pols.items():
            own = name.startswith("oracle@")
            sel = recs if own else [r for r in recs if r["i"] in common]
            s = summ(sel)
            if own:
                s["own_items"] = True
            s["k_mix"] = _mix(sel, "k_hist")
            s["v_mix"] = _mix(sel, "v_hist")
            s["items_run"] = len(recs)
            res[name] = s
        cmp = {}
        for a, b in (pairs if pairs is not None else _default_pairs(pols)):
            if a in pols and b in pols:
                keep = (lambda r: True) if a.startswith("oracle@") else (lambda r: r["i"] in common)
                pa = [r for r in pols[a] if keep(r)]
                pb = [r for r in pols[b] if keep(r)]
                cmp[f"{a} vs {b}"] = paired(pa, pb)  # on the items both have
        summary["tasks"][task] = {"common_items": len(common), "policies": res, "paired": cmp}
    summary["provenance"] = _provenance(summary)
    (RESULTS / "controller_pareto.json").write_text(json.dumps(summary, indent=1) + "\n")
    _plot(summary, RESULTS / "controller_pareto.png")
    lines = ["# KV policies: quality vs average KV bits (W=0)", "",
             "SmolLM2-135M-Instruct Q4_1. Command: `python benchmarks/controller_eval.py report`; protocol in "
             "benchmarks/controller_eval.py. Bits: storage bits per K/V element, group scales included. "
             "Every policy decides a token right after its forward pass (W=0), except `P+wN`: a token stays at "
             "16 bits until it is N steps old (its bits include the tokens still at 16 bits at the end).", ""]
    for task, t in summary["tasks"].items():
        key = "acc" if task == "hellaswag" else "ppl"
        unit = "tasks" if key == "acc" else "windows"
        lines += [f"## {task}: {t['common_items']} {unit}", "",
                  f"| policy | avg bits | {'accuracy %' if key == 'acc' else 'perplexity'} | K mix | V mix |",
                  "|---|---:|---:|---|---|"]
        fp = t["policies"].get("fp16", {}).get(key)
        for name, s in sorted(t["policies"].items(), key=lambda kv: kv[1]["bits"]):
            rel = "" if fp is None or key == "acc" else f" ({100 * (s[key] / fp - 1):+.2f}%)"
            mix = lambda m: " ".join(f"{b}:{p:.2f}" for b, p in m.items())  # noqa: E731
            if s.get("own_items"):  # not on the common items: compare through its paired rows
                rel = f" ({s['n']} {unit} only: see the paired rows)"
            lines.append(f"| {name} | {s['bits']:.3f} | {s[key]:.3f}{rel} | {mix(s['k_mix'])} | {mix(s['v_mix'])} |")
        if t["paired"]:
            lines += ["", "Paired bootstrap (10,000 resamples), A minus B"
                      + (" in accuracy points" if key == "acc" else " as perplexity change in %") + ":", "",
                      "| A vs B | diff | 95% CI | P(diff <= 0) |", "|---|---:|---|---:|"]
            for k, v in t["paired"].items():
                dd = v.get("diff", v.get("diff_pct"))
                lines.append(f"| {k} | {dd:+.3f} | [{v['ci95'][0]:+.3f}, {v['ci95'][1]:+.3f}] | {v['p_le_0']:.3f} |")
        lines.append("")
    lines += ["## Provenance", ""] + [f"- {x}" for x in _provenance(summary)]
    lines.append("")
    (RESULTS / "controller_pareto.md").write_text("\n".join(lines))
    print("\n".join(lines))


def _plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in ("hellaswag", "wikitext") if t in summary["tasks"]]
    if not tasks:
        return
    fig, axes = plt.subplots(1, len(tasks), figsize=(7 * len(tasks), 5.2), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        t = summary["tasks"][task]
        key = "acc" if task == "hellaswag" else "ppl"
        for name, s in t["policies"].items():
            if s.get("own_items"):  # measured on other (fewer) items: not comparable on this plot
                continue
            kind = ("window" if _split_window(name)[1] else "adaptive" if name.startswith("adaptive")
                    else "rule" if name.startswith("rule") else "random" if name.startswith("random")
                    else "sink" if name.startswith("sink:") else "static")
            style = {"adaptive": ("o", "C3"), "rule": ("s", "C2"), "random": ("^", "C1"), "static": ("D", "C0"),
                     "sink": ("P", "C9"), "window": ("x", "C4")}[kind]
            ax.scatter(s["bits"], s[key], marker=style[0], color=style[1], s=40, zorder=3)
            ax.annotate(name, (s["bits"], s[key]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        if "fp16" in t["policies"]:
            ax.axhline(t["policies"]["fp16"][key], color="grey", lw=0.8, ls="--")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("average KV bits per element (scales included)")
        ax.set_ylabel("HellaSwag accuracy (%)" if key == "acc" else "WikiText-2 perplexity")
        ax.set_title(f"{task}: {t['common_items']} {'tasks' if key == 'acc' else 'windows'} (W=0 unless +wN)")
        ax.grid(alpha=0.3)
    for kind, (m, c) in {"adaptive (learned)": ("o", "C3"), "rule-based": ("s", "C2"), "random": ("^", "C1"),
                         "static": ("D", "C0"), "static + sink guard (sink:P)": ("P", "C9"),
                         "with window W=N (+wN)": ("x", "C4")}.items():
        axes[0][0].scatter([], [], marker=m, color=c, label=kind)
    axes[0][0].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=130)


# ---- controller cost ------------------------------------------------------------------------

def cmd_cost(args) -> None:
    """Decode ms/token at `ctx` tokens of context for fp16, a static policy and the controller,
    and the time the controller path spends per step (features incl. rarity, ONNX, decision).

    The controller is timed twice: deciding every token at its step (as score() and the
    quality runs do) and as generation runs it (decisions batched KV_DECIDE_BATCH tokens at a
    time on features frozen when each token became due; see Model._apply_policy)."""
    from controller.common import load_model as _load

    model = _load(args.model, threads=args.threads, ctx=args.ctx + args.steps + 8)
    from controller.corpus import wikitext_split

    _, heldout = wikitext_split()
    ids = model.tokenize("".join(heldout), special=False)[:args.ctx + args.steps]
    timers = {"features": 0.0, "decide": 0.0, "logit_stats": 0.0}
    from edgekv.session import Session

    orig_features, orig_stats = Session._features, Session._record_logit_features

    def t_features(self, pos, frozen=None):
        t = time.perf_counter()
        r = orig_features(self, pos, frozen)
        timers["features"] += time.perf_counter() - t
        return r

    def t_stats(self, first, logits):
        t = time.perf_counter()
        r = orig_stats(self, first, logits)
        timers["logit_stats"] += time.perf_counter() - t
        return r

    result = {"ctx": args.ctx, "steps": args.steps, "threads": args.threads, "policies": {}}
    runs = (("fp16", "fp16", False), ("k4v2", "k4v2", False), ("adaptive@3.5", "adaptive@3.5", False),
            ("adaptive@3.5 generation", "adaptive@3.5", True))
    for label, spec, defer in runs:
        pol = make_policy(spec, "cost", model)
        if hasattr(pol, "decide"):
            orig_decide = pol.decide

            def t_decide(f, _d=orig_decide):
                t = time.perf_counter()
                r = _d(f)
                timers["decide"] += time.perf_counter() - t
                return r

            pol.decide = t_decide
        Session._features, Session._record_logit_features = t_features, t_stats
        best = None
        for rep in range(args.reps):
            model.reset()
            model.score(ids[:args.ctx], ids[args.ctx:args.ctx + 1], kv=pol)  # prefill under the policy
            for k in timers:
                timers[k] = 0.0
            t0 = time.perf_counter()
            for j in range(args.ctx, args.ctx + args.steps):
                model.session.eval([ids[j]], kv=pol, defer=defer)
            dt = time.perf_counter() - t0
            row = {"ms_per_token": 1000 * dt / args.steps, **{f"{k}_ms": 1000 * v / args.steps for k, v in timers.items()}}
            if best is None or row["ms_per_token"] < best["ms_per_token"]:
                best = row
        Session._features, Session._record_logit_features = orig_features, orig_stats
        result["policies"][label] = best
        print(label, json.dumps(best), file=sys.stderr)
    # the same components in isolation (best of many calls: robust to a busy machine), at the
    # state the decode loop left: 1,024+ tokens in context, one position to decide
    import timeit

    pol = make_policy("adaptive@3.5", "cost", model)
    pol.bind(model)
    row = model.session.logits().reshape(1, -1)
    last = np.array([model.n_past - 1])  # cached under the last run's policy, which reads features too

    def best_us(fn, number=200):
        return 1e6 * min(timeit.repeat(fn, number=number, repeat=7)) / number

    feats = model.features(last)
    iso = {"logit_stats_us": best_us(lambda: orig_stats(model.session, model.n_past - 1, row)),
           "features_us": best_us(lambda: orig_features(model.session, last, None)),
           "rarity_us": best_us(lambda: model.session._controller_rarity(last)),
           "decide_us": best_us(lambda: pol.decide(feats))}
    result["isolated"] = iso
    iso_ctrl_ms = (iso["logit_stats_us"] + iso["features_us"] + iso["decide_us"]) / 1000
    best_decode = min(p["ms_per_token"] for p in result["policies"].values())
    result["isolated_controller_ms"] = iso_ctrl_ms
    result["isolated_share_of_fastest_decode"] = iso_ctrl_ms / best_decode
    f = result["policies"]["fp16"]
    for key, label in (("", "adaptive@3.5"), ("generation_", "adaptive@3.5 generation")):
        a = result["policies"][label]
        ctrl = a["features_ms"] + a["decide_ms"] + a["logit_stats_ms"]
        result[f"{key}controller_ms_per_token"] = ctrl
        result[f"{key}controller_share_of_decode"] = ctrl / a["ms_per_token"]
        result[f"{key}overhead_vs_fp16"] = a["ms_per_token"] / f["ms_per_token"] - 1
    (RESULTS / "controller_cost.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="KV policy evaluation: HellaSwag / WikiText-2 vs average bits")
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--task", choices=("hellaswag", "wikitext"), required=True)
    r.add_argument("--n", type=int, required=True, help="tasks (hellaswag) or windows of 512 tokens (wikitext)")
    r.add_argument("--policies", required=True)
    r.add_argument("--model", default="smollm2-135m")
    r.add_argument("--threads", type=int, default=int(os.environ.get("EDGEKV_THREADS", "1")))
    r.add_argument("--quiet", action="store_true")
    p = sub.add_parser("report")
    p.add_argument("--compare", default="", help="pairs A~vs~B, comma-separated, for paired bootstrap CIs "
                   "(default: each adaptive@B against fp16, k4v2 and the baselines run at B; statics vs fp16)")
    c = sub.add_parser("cost")
    c.add_argument("--model", default="smollm2-135m")
    c.add_argument("--ctx", type=int, default=1024)
    c.add_argument("--steps", type=int, default=64)
    c.add_argument("--reps", type=int, default=3)
    c.add_argument("--threads", type=int, default=int(os.environ.get("EDGEKV_THREADS", "2")))
    args = ap.parse_args(argv)
    {"run": cmd_run, "report": cmd_report, "cost": cmd_cost}[args.cmd](args)


if __name__ == "__main__":
    main()
