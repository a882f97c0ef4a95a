#!/usr/bin/env python
"""Entropy adaptive decoding (edgekv.ead) on Qwen2.5-Coder 0.5B (small) / 1.5B (large).

Three steps, each resumable, then a report:

``tf``: teacher-forced. Held-out text -- WikiText-2 (``../shared/data/wikitext2_valid.txt``, from
  its start) and Python source (Python standard-library files, ``SOURCE_MODULES``) -- is cut into
  chunks of ``--chunk`` tokens (``--tokens`` per domain). Both models score every chunk (all
  positions, edgekv, fp16 KV); per position we keep each model's NLL of the true next token, its
  next-token entropy (bits) and argmax. Since a model's prediction at a position does not depend
  on which model wrote the (fixed) text, EAD's rule can then be replayed offline
  (``edgekv.ead.simulate_switching``, the same rule the generator runs) for any parameters: the
  mixture's perplexity uses, at each position, the NLL of the model active there. Chunks
  alternate between a tuning half (even chunks: the defaults window / d_min / hysteresis were
  picked there) and an evaluation half (odd chunks: everything reported). Baselines at the same
  large-model share: random positions (i.i.d.; exact expectation), random segments (EAD's own
  segment lengths placed uniformly at random, mean of 20 draws) and an oracle (the positions where
  the large model's NLL gains most, an upper bound for any selection).

``gsm8k``: generation. The first ``--n`` problems of ``../shared/data/gsm8k_train500.jsonl``,
  greedy, chat template, max ``--max-tokens`` tokens, exact match of the final number (after
  ``####`` in the reply, else its last number) with the answer after ``####``. Settings (see
  ``ead_specs``): small only, large only, EAD settings (``--taus``: tau, optionally d_min and
  verify), and random switching matched to an EAD setting's share and segment length (``--match-tau``;
  the same generator with an injected random entropy source). Problem-major order (every setting on problem i before
  problem i+1), one JSON line per (setting, problem) appended to ``--runs``; a rerun skips what
  is there. A pilot (``--pilot``, problems 400.. of the file, not evaluated) calibrates the random
  baseline.

``report``: writes benchmarks/results/ead.json, ead.md and ead.png.

    PYTHONPATH=python python benchmarks/ead.py tf --tokens 16384
    nohup env PYTHONPATH=python python benchmarks/ead.py gsm8k --n 100 > /tmp/ead_gsm8k.log 2>&1 &
    PYTHONPATH=python python benchmarks/ead.py report
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import inspect
import json
import math
import os
import re
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
RESULTS = REPO / "benchmarks" / "results"
WORK = Path(os.environ.get("EDGEKV_EAD_WORK", "/tmp/edgekv-ead"))
if str(REPO / "python") not in sys.path:
    sys.path.insert(0, str(REPO / "python"))

if str(REPO / "benchmarks") not in sys.path:  # sibling scripts, when imported rather than run
    sys.path.insert(0, str(REPO / "benchmarks"))

import edgekv  # noqa: E402
from batch_cost import batch_times  # noqa: E402
from common import bootstrap, ci95, command_line, machine, machine_line, target_log_probs  # noqa: E402
from edgekv.ead import (  # noqa: E402
    DEFAULT_D_MIN, DEFAULT_TAU, DEFAULT_WINDOW, LARGE, SMALL, EADConfig, entropy_bits_rows, simulate_switching,
)

SMALL_NAME, LARGE_NAME = "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"
SOURCE_MODULES = ["textwrap", "json.decoder", "json.encoder", "heapq", "shlex", "fractions", "bisect",
                  "string", "colorsys", "difflib"]
LN2 = math.log(2.0)


def log(msg: str) -> None:
    print(f"[{_dt.datetime.now():%H:%M:%S}] {msg}", flush=True)


# ============================================================================================
# teacher forcing
# ============================================================================================

def tf_texts(tokenize, n_tokens: int) -> dict:
    wiki = (DATA / "wikitext2_valid.txt").read_text(encoding="utf-8")
    ids_w = tokenize(wiki[: 12 * n_tokens])[:n_tokens]
    src = []
    for name in SOURCE_MODULES:
        path = inspect.getsourcefile(importlib.import_module(name))
        src.append(Path(path).read_text(encoding="utf-8"))
    code = "\n\n".join(src)
    ids_c = tokenize(code)[:n_tokens]
    if len(ids_c) < n_tokens or len(ids_w) < n_tokens:
        raise SystemExit("not enough text for --tokens")
    return {"wikitext2": ids_w, "python": ids_c}


def score_positions(model, ids: list, sub: int = 128) -> dict:
    """Per position t (predicting ids[t+1]): NLL (nats), entropy (bits), argmax, from one context."""
    model.reset()
    n = len(ids)
    nll = np.empty(n - 1)
    ent = np.empty(n - 1)
    top = np.empty(n - 1, np.int32)
    arr = np.asarray(ids, np.int32)
    with model._lock:
        for a in range(0, n - 1, sub):
            b = min(a + sub, n - 1)
            out = model.session.eval(arr[a:b], logits="all")
            nll[a:b] = -target_log_probs(out, arr[a + 1:b + 1])
            ent[a:b] = entropy_bits_rows(out)
            top[a:b] = out.argmax(axis=1)
    model.reset()
    return {"nll": nll, "ent": ent, "top": top}


def cmd_tf(args) -> int:
    WORK.mkdir(parents=True, exist_ok=True)
    path = WORK / f"tf_{args.tokens}_{args.chunk}.npz"
    have = dict(np.load(path)) if path.exists() else {}
    todo = []
    tok = edgekv.tokenizer.Tokenizer.from_gguf(edgekv.registry.resolve(SMALL_NAME, progress=False))
    texts = tf_texts(lambda s: tok.encode(s, add_bos=False, parse_special=False), args.tokens)
    for dom, ids in texts.items():
        have[f"{dom}_ids"] = np.asarray(ids, np.int32)
    for role, name in ((SMALL, SMALL_NAME), (LARGE, LARGE_NAME)):
        keys = [(dom, c) for dom in texts for c in range(args.tokens // args.chunk)]
        missing = [k for k in keys if f"{k[0]}_{c_key(k[1])}_{role}_nll" not in have]
        if not missing:
            continue
        log(f"loading {name}")
        model = edgekv.load(name, threads=args.threads, ctx=args.chunk + 8, progress=False)
        for dom, c in missing:
            ids = texts[dom][c * args.chunk:(c + 1) * args.chunk]
            t0 = time.perf_counter()
            r = score_positions(model, ids)
            for k, v in r.items():
                have[f"{dom}_{c_key(c)}_{role}_{k}"] = v
            np.savez(path, **have)
            log(f"{role} {dom} chunk {c}: {len(ids)} tokens in {time.perf_counter() - t0:.1f} s, "
                f"ppl {math.exp(r['nll'].mean()):.2f}")
        model.close()
        todo.append(role)
    log(f"positions in {path}")
    return 0


def c_key(c: int) -> str:
    return f"c{c}"


def load_tf(tokens: int, chunk: int) -> dict:
    """{domain: [per chunk: {small_nll, large_nll, small_ent, large_ent, small_top, large_top}]}"""
    path = WORK / f"tf_{tokens}_{chunk}.npz"
    if not path.exists():
        raise SystemExit(f"{path} is missing: run `benchmarks/ead.py tf --tokens {tokens} --chunk {chunk}` first")
    d = np.load(path)
    out = {}
    for dom in ("wikitext2", "python"):
        chunks = []
        for c in range(tokens // chunk):
            chunks.append({f"{r}_{k}": d[f"{dom}_{c_key(c)}_{r}_{k}"] for r in (SMALL, LARGE)
                           for k in ("nll", "ent", "top")})
        out[dom] = chunks
    return out


def mixture(chunks: list, cfg: EADConfig) -> tuple[float, float, list]:
    """(mean NLL, large share, masks) of EAD replayed over the chunks."""
    masks = [simulate_switching(ch["small_ent"], ch["large_ent"], cfg) for ch in chunks]
    nll = np.concatenate([np.where(m, ch["large_nll"], ch["small_nll"]) for m, ch in zip(masks, chunks)])
    share = float(np.concatenate(masks).mean())
    return float(nll.mean()), share, masks


def random_segments_nll(chunks: list, masks: list, rng, draws: int = 20) -> float:
    """Mean NLL with EAD's large-model segments (same lengths) placed uniformly at random."""
    tot = []
    for _ in range(draws):
        parts = []
        for ch, m in zip(chunks, masks):
            n = m.size
            runs = _runs(m)
            rng.shuffle(runs)
            n_small = n - sum(runs)
            cuts = np.sort(rng.integers(0, n_small + 1, size=len(runs)))
            gaps = np.diff(np.concatenate([[0], cuts, [n_small]]))
            mm = np.zeros(n, bool)
            p = 0
            for g, r in zip(gaps, runs):
                p += g
                mm[p:p + r] = True
                p += r
            parts.append(np.where(mm, ch["large_nll"], ch["small_nll"]))
        tot.append(np.concatenate(parts).mean())
    return float(np.mean(tot))


def _runs(m: np.ndarray) -> list:
    runs, n = [], 0
    for x in m:
        if x:
            n += 1
        elif n:
            runs.append(n)
            n = 0
    if n:
        runs.append(n)
    return runs


def _cat(chunks: list, key: str) -> np.ndarray:
    return np.concatenate([ch[key] for ch in chunks])


def _large_at_top(chunks: list, key: np.ndarray, share: float) -> float:
    """Mean NLL when the large model takes the `share` of positions where key is highest."""
    s, l_ = _cat(chunks, "small_nll"), _cat(chunks, "large_nll")
    idx = np.argsort(-key, kind="stable")[:int(round(share * s.size))]
    out = s.copy()
    out[idx] = l_[idx]
    return float(out.mean())


def oracle_nll(chunks: list, share: float) -> float:
    """The positions where the large model's NLL gains most: an upper bound for any selection."""
    return _large_at_top(chunks, _cat(chunks, "small_nll") - _cat(chunks, "large_nll"), share)


# tau grids (bits). The top must reach low shares for every d_min: a recovery is only read off
# between the shares a sweep actually reached (recovery_at), never extrapolated.
TAUS = [round(x, 2) for x in np.arange(0.25, 12.01, 0.25)]  # tuning grid
REPORT_TAUS = [round(x, 2) for x in np.arange(0.1, 12.01, 0.1)]  # held-out curves
ALT_D_MIN = 4 if DEFAULT_D_MIN != 4 else 1  # a second curve next to the defaults


def entropy_gate_nll(chunks: list, share: float) -> float:
    """Mean NLL when the large model takes exactly the positions where the small model's own
    entropy is highest: the best any per-position threshold on that entropy can do at this share
    (EAD's rule also sees the large model's entropy while it is active, and switching has to
    follow d_min)."""
    return _large_at_top(chunks, _cat(chunks, "small_ent"), share)


def ppl_recovery(ppl: float, ppl_s: float, ppl_l: float) -> float:
    """Share of the small-to-large perplexity gap a mixture with perplexity ppl closes."""
    return (ppl_s - ppl) / (ppl_s - ppl_l)


def sweep(chunks: list, cfg_base: dict, taus=TAUS, baselines: bool = True) -> list:
    ppl_s = math.exp(np.concatenate([c["small_nll"] for c in chunks]).mean())
    ppl_l = math.exp(np.concatenate([c["large_nll"] for c in chunks]).mean())
    mean_s = math.log(ppl_s)
    mean_l = math.log(ppl_l)
    rows = []
    rng = np.random.default_rng(0)
    for tau in taus:
        kw = dict(cfg_base)
        ratio = kw.pop("low_ratio", 1.0)
        cfg = EADConfig(tau=tau, tau_low=tau * ratio if ratio != 1.0 else None, **kw)
        nll, share, masks = mixture(chunks, cfg)
        ppl = math.exp(nll)
        row = {"tau": tau, "large_share": share, "ppl": ppl, "recovery": ppl_recovery(ppl, ppl_s, ppl_l)}
        rows.append(row)
        if not baselines:
            continue
        row.update({
            "ppl_random_iid": math.exp(mean_s + share * (mean_l - mean_s)),
            "ppl_entropy_gate": math.exp(entropy_gate_nll(chunks, share)),
            "ppl_random_segments": math.exp(random_segments_nll(chunks, masks, rng)),
            "ppl_oracle": math.exp(oracle_nll(chunks, share)),
            "switches_per_1k": 1000 * sum(int(np.abs(np.diff(m.astype(int))).sum() + m[0]) for m in masks)
                               / sum(m.size for m in masks),
        })
    return rows


def recovery_at(rows: list, share: float) -> float:
    """Gap recovery interpolated at a given large share; NaN outside the shares the sweep reached
    (np.interp would clamp, crediting a setting that never got that low with its best point)."""
    pts = sorted((r["large_share"], r["recovery"]) for r in rows)
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    if not xs or share < xs[0] or share > xs[-1]:
        return float("nan")
    return float(np.interp(share, xs, ys))


def analyse_tf(tokens: int, chunk: int) -> dict:
    data = load_tf(tokens, chunk)
    tune = {d: ch[0::2] for d, ch in data.items()}
    held = {d: ch[1::2] for d, ch in data.items()}
    # ---- tuning: window, d_min, hysteresis, on the tuning half, both domains ----------------
    grid = []
    for window in (1, 2, 3, 5):
        for d_min in (1, 2, 4, 8, 16, 32):
            for ratio in (1.0, 0.5, 0.25):
                base = dict(window=window, d_min=d_min, low_ratio=ratio)
                score = []
                for dom in tune:
                    rows = sweep(tune[dom], base, baselines=False)
                    score.append(np.mean([recovery_at(rows, s) for s in (0.2, 0.3, 0.4, 0.5)]))
                grid.append({"window": window, "d_min": d_min, "tau_low_ratio": ratio,
                             "mean_recovery_20_50": float(np.mean(score)),
                             "per_domain": dict(zip(tune, map(float, score)))})
                log(f"tune w={window} d_min={d_min} ratio={ratio}: {np.mean(score):.3f}")
    # a setting that cannot reach every share (NaN) ranks last
    grid.sort(key=lambda g: -g["mean_recovery_20_50"] if np.isfinite(g["mean_recovery_20_50"]) else np.inf)
    # ---- report on the held-out half -------------------------------------------------------
    default = dict(window=DEFAULT_WINDOW, d_min=DEFAULT_D_MIN)
    out = {"tokens_per_domain": tokens, "chunk": chunk, "tuning_grid": grid, "domains": {}}
    for dom, chunks in held.items():
        s = np.concatenate([c["small_nll"] for c in chunks])
        l_ = np.concatenate([c["large_nll"] for c in chunks])
        es = np.concatenate([c["small_ent"] for c in chunks])
        agree = np.concatenate([c["small_top"] == c["large_top"] for c in chunks])
        bins = [0, 0.5, 1, 2, 3, 4, 6, 20]
        by_ent = []
        for a, b in zip(bins[:-1], bins[1:]):
            sel = (es >= a) & (es < b)
            if sel.any():
                by_ent.append({"small_entropy_bits": [a, b], "share_of_positions": float(sel.mean()),
                               "argmax_agreement": float(agree[sel].mean()),
                               "nll_gain_nats": float((s[sel] - l_[sel]).mean())})
        rows = sweep(chunks, default, taus=REPORT_TAUS)
        at_default = next(r for r in rows if abs(r["tau"] - DEFAULT_TAU) < 1e-9)
        ppl_s, ppl_l = math.exp(s.mean()), math.exp(l_.mean())
        gate50 = ppl_recovery(math.exp(entropy_gate_nll(chunks, 0.5)), ppl_s, ppl_l)
        alt_rows = sweep(chunks, dict(window=DEFAULT_WINDOW, d_min=ALT_D_MIN), taus=REPORT_TAUS, baselines=False)
        out["domains"][dom] = {
            "recovery_at_share_50": recovery_at(rows, 0.5),
            "entropy_gate_recovery_at_share_50": gate50,
            "alt_d_min": {"d_min": ALT_D_MIN, "recovery_at_share_50": recovery_at(alt_rows, 0.5), "sweep": alt_rows,
                          "best_recovery_at_share_le_50": max((r for r in alt_rows if r["large_share"] <= 0.5),
                                                              key=lambda r: r["recovery"])},
            "positions": int(s.size),
            "ppl_small": ppl_s, "ppl_large": ppl_l,
            "argmax_agreement": float(agree.mean()),
            "by_small_entropy": by_ent,
            "sweep_default_window_dmin": rows,
            "at_default": at_default,
            "best_recovery_at_share_le_50": max((r for r in rows if r["large_share"] <= 0.5),
                                                key=lambda r: r["recovery"]),
        }
    return out


def plot_tf(tf: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, (dom, d) in zip(axes, tf["domains"].items()):
        rows = sorted(d["sweep_default_window_dmin"], key=lambda r: r["large_share"])
        x = [r["large_share"] for r in rows]
        ax.plot(x, [r["ppl"] for r in rows], "o-", ms=2, label=f"EAD (tau sweep, w={DEFAULT_WINDOW}, d_min={DEFAULT_D_MIN})")
        ax.plot(x, [r["ppl_random_segments"] for r in rows], "s--", ms=3, label="random segments (same lengths)")
        ax.plot(x, [r["ppl_random_iid"] for r in rows], ":", label="random positions (i.i.d.)")
        r1 = sorted(d["alt_d_min"]["sweep"], key=lambda r: r["large_share"])
        ax.plot([r["large_share"] for r in r1], [r["ppl"] for r in r1], "-", color="C0", alpha=0.5, lw=1.5,
                label=f"EAD, d_min={d['alt_d_min']['d_min']}")
        ax.axhline(d["ppl_small"] - 0.8 * (d["ppl_small"] - d["ppl_large"]), color="k", ls=":", lw=0.8,
                   label="80% of the gap (target)")
        ax.plot(x, [r["ppl_entropy_gate"] for r in rows], "-", color="C4", lw=1,
                label="entropy gate (highest small-model entropy)")
        ax.plot(x, [r["ppl_oracle"] for r in rows], "-.", color="gray", lw=1, label="oracle (best positions)")
        ax.axhline(d["ppl_small"], color="C3", lw=1, label=f"small only ({d['ppl_small']:.2f})")
        ax.axhline(d["ppl_large"], color="C2", lw=1, label=f"large only ({d['ppl_large']:.2f})")
        r0 = d["at_default"]
        ax.plot([r0["large_share"]], [r0["ppl"]], "k*", ms=12, label=f"default tau={DEFAULT_TAU}")
        ax.axvline(0.5, color="k", lw=0.5, alpha=0.4)
        ax.set_xlim(0, 1)
        ax.set_xlabel("share of positions given to the large model")
        ax.set_ylabel("perplexity")
        ax.set_title(f"{dom} (held-out half, {d['positions']} positions)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Teacher-forced EAD: Qwen2.5-Coder 0.5B -> 1.5B")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ============================================================================================
# GSM8K
# ============================================================================================

INSTRUCTION = ("Solve this math word problem. Reason step by step in a few short lines, then write the final "
               "answer as a number on the last line, in the form '#### <number>'.")
SHOT = 499  # the one worked example shown before each problem (the file's last problem; never evaluated)
PILOT = 400  # pilot problems start here (never evaluated)


def gsm8k_messages(probs: list, i: int) -> list:
    ex = probs[SHOT]
    worked = re.sub(r"<<[^>]*>>", "", ex["answer"])  # drop the calculator annotations
    return [{"role": "user", "content": INSTRUCTION + "\n\n" + ex["question"]},
            {"role": "assistant", "content": worked},
            {"role": "user", "content": INSTRUCTION + "\n\n" + probs[i]["question"]}]


def gold_answer(ans: str) -> str:
    return norm_number(ans.split("####")[-1])


def norm_number(s: str) -> str:
    s = s.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        v = float(s)
    except ValueError:
        return s
    return str(int(v)) if v == int(v) else str(v)


_NUM = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def predicted(text: str) -> str:
    """The number after the last '####', else in the last \\boxed{}, else the last number."""
    if "####" in text:
        m = _NUM.search(text.split("####")[-1])
        if m:
            return norm_number(m.group(0))
    boxed = re.findall(r"\\boxed\{([^}]*)\}", text)
    if boxed:
        m = _NUM.search(boxed[-1])
        if m:
            return norm_number(m.group(0))
    nums = _NUM.findall(text)
    return norm_number(nums[-1]) if nums else ""


class RandomEntropy:
    """Random switching through EAD's own generator: with window 1 and tau 1, the small model hands
    over with probability p_up per token; the large one hands back after exactly d_min tokens."""

    def __init__(self, p_up: float, seed: int):
        self.p = p_up
        self.rng = np.random.default_rng(seed)

    def __call__(self, role, logits, pos):
        if role == SMALL:
            return 2.0 if self.rng.random() < self.p else 0.0
        return 0.0


LEGACY_D_MIN = 4  # names without _dN (runs from before d_min became part of the name) had d_min 4


def ead_specs(text: str | None) -> list:
    """'0.9,1.0/1,2.0/4/v8' -> [(name, setting)]: TAU[/D_MIN[/vW]]. D_MIN defaults to
    DEFAULT_D_MIN; vW turns verify on with verify_window W (v0: check every draft token). The name
    carries _dN unless N is LEGACY_D_MIN."""
    out = []
    for part in (text or "").split(","):
        if not part.strip():
            continue
        fields = part.strip().split("/")
        tau = float(fields[0])
        d_min = int(fields[1]) if len(fields) > 1 and fields[1] else DEFAULT_D_MIN
        setting = {"kind": "ead", "tau": tau, "d_min": d_min}
        name = f"ead_tau{tau}" + ("" if d_min == LEGACY_D_MIN else f"_d{d_min}")
        if len(fields) > 2:
            if d_min == LEGACY_D_MIN:
                name += f"_d{d_min}"
            if not fields[2].startswith("v"):
                raise SystemExit(f"bad EAD setting {part!r}: TAU[/D_MIN[/vW]]")
            setting.update(verify=True, verify_window=int(fields[2][1:]))
            name += f"_v{int(fields[2][1:])}"
        out.append((name, setting))
    return out


def run_one(pair, setting: dict, prompt: str, max_tokens: int, seed: int, keep: int) -> dict:
    """Run one setting on one prompt. Both caches are first cut to the ``keep`` tokens every prompt
    shares (system message and worked example), so every run pays for its own question."""
    for m in (pair.small, pair.large):
        if m.n_past > keep:
            m.session.truncate(keep)
    n_prompt = len(pair.tokenize(prompt))
    t0 = time.perf_counter()
    if setting["kind"] in ("small", "large"):
        m = pair.small if setting["kind"] == "small" else pair.large
        text = m.generate(prompt, max_tokens=max_tokens, temperature=0)
        st = m.last_stats
        wall = time.perf_counter() - t0
        role = setting["kind"]
        ev = st.prefilled_tokens + max(0, st.generated_tokens - 1)
        d = {"text": text, "generated_tokens": st.generated_tokens, "finish_reason": st.finish_reason,
             "large_share": 1.0 if role == LARGE else 0.0, "switches": 0, "catchup_tokens": 0,
             "catchup_overhead_s": 0.0, "catchup_s": 0.0, "wall_s": wall,
             "small_evaluated": ev if role == SMALL else 0, "large_evaluated": ev if role == LARGE else 0}
    else:
        kw = dict(max_tokens=max_tokens, temperature=0)
        if setting["kind"] == "random":
            kw.update(config=EADConfig(tau=1.0, window=1, d_min=setting["d_min"]),
                      entropy_fn=RandomEntropy(setting["p_up"], seed))
        else:
            kw.update(tau=setting["tau"], d_min=setting["d_min"],
                      verify=setting.get("verify", False), max_draft=setting.get("max_draft", 0),
                      verify_window=setting.get("verify_window", 0))
        text = pair.generate(prompt, **kw)
        st = pair.last_stats
        d = st.as_dict()
        d.update(text=text, wall_s=time.perf_counter() - t0)
        d["large_segments"] = len(_runs(np.array([x == LARGE for x in st.sources])))
    # parameter-weighted tokens run, relative to the large model alone on this prompt and text
    base = pair.params[LARGE] * max(1, n_prompt - keep + d["generated_tokens"] - 1)
    d["relative_compute"] = (pair.params[SMALL] * d["small_evaluated"] + pair.params[LARGE] * d["large_evaluated"]) / base
    d["question_tokens"] = n_prompt - keep
    return d


def load_runs(path: Path) -> list:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        if line.strip():
            out.append(json.loads(line))
    return out


def calibrate_random(pilot_rows: list, match: str) -> dict:
    share = sum(r["large_tokens"] for r in pilot_rows) / max(1, sum(r["generated_tokens"] for r in pilot_rows))
    n_seg = sum(r["large_segments"] for r in pilot_rows)
    mean_seg = sum(r["large_tokens"] for r in pilot_rows) / max(1, n_seg)
    d_min = max(1, int(round(mean_seg)))
    # small segments of mean length d_min (1 - s) / s: a per-token hand-over probability
    small_len = max(1.0, d_min * (1 - share) / max(share, 1e-6))
    return {"matched_to": match, "pilot_problems": len(pilot_rows), "pilot_large_share": share,
            "pilot_mean_large_segment": mean_seg, "d_min": d_min, "p_up": 1.0 / (small_len + 1.0)}


def cmd_gsm8k(args) -> int:
    probs = [json.loads(x) for x in (DATA / "gsm8k_train500.jsonl").read_text().splitlines() if x.strip()]
    runs_path = Path(args.runs)
    runs_path.parent.mkdir(parents=True, exist_ok=True)
    done = {(r["setting"], r["idx"]) for r in load_runs(runs_path)}
    log(f"loading {SMALL_NAME} + {LARGE_NAME}")
    pair = edgekv.load_pair(SMALL_NAME, LARGE_NAME, threads=args.threads, ctx=1024, progress=False)
    chat = pair.tokenizer.apply_chat_template
    prompts = {}

    def prompt_of(i):
        if i not in prompts:
            prompts[i] = chat(gsm8k_messages(probs, i), add_generation_prompt=True)
        return prompts[i]

    a, b = pair.tokenize(prompt_of(0)), pair.tokenize(prompt_of(1))
    keep = next(k for k in range(min(len(a), len(b))) if a[k] != b[k])
    log(f"prompts share their first {keep} tokens (system message + worked example): kept cached")
    for m in (pair.small, pair.large):  # cache them once, so that no run pays for them
        m.session.eval(a[:keep])

    def run(name, setting, i):
        if (name, i) in done:
            return
        r = run_one(pair, setting, prompt_of(i), args.max_tokens, i, keep)
        gold = gold_answer(probs[i]["answer"])
        pred = predicted(r["text"])
        r.update(setting=name, idx=i, gold=gold, pred=pred, correct=pred == gold, config=setting)
        r.pop("sources", None)
        r.pop("tokens", None)
        with open(runs_path, "a") as f:
            f.write(json.dumps(r) + "\n")
        done.add((name, i))
        log(f"{name:>18} #{i:<3} {'ok ' if r['correct'] else 'BAD'} pred={pred!r:>8} gold={gold!r:>8} "
            f"tok={r['generated_tokens']:<3} large={r['large_share']:.2f} sw={r.get('switches', 0):<3} "
            f"catch-up={r.get('catchup_tokens', 0):<4} wall={r['wall_s']:.1f}s "
            f"({1000 * r['wall_s'] / max(1, r['generated_tokens']):.0f} ms/tok) compute={r['relative_compute']:.2f}")

    # ---- pilot (problems PILOT..): tau -> large share in generation, random-baseline calibration
    pilot = ead_specs(args.pilot_taus)
    for i in range(PILOT, PILOT + args.pilot):
        for name, setting in pilot:
            run(f"pilot_{name}", setting, i)
    runs = load_runs(runs_path)
    for name, _ in pilot:
        rows = [r for r in runs if r["setting"] == f"pilot_{name}" and PILOT <= r["idx"] < PILOT + args.pilot]
        tok = sum(r["generated_tokens"] for r in rows)
        log(f"pilot {name}: {len(rows)} problems, large share {sum(r['large_tokens'] for r in rows) / max(1, tok):.3f}, "
            f"{sum(r['switches'] for r in rows) / max(1, len(rows)):.1f} switches/problem, "
            f"catch-up overhead {sum(r['catchup_overhead_s'] for r in rows) / max(1e-9, sum(r['wall_s'] - r['catchup_overhead_s'] for r in rows)):.3f}")
    if not args.taus:
        log("no --taus: pilot only")
        pair.close()
        return 0
    specs = ead_specs(args.taus)
    sets = {"small": {"kind": "small"}, "large": {"kind": "large"}}
    sets.update(specs)
    # one random baseline per matched EAD setting, calibrated on that setting's pilot runs
    for match, _ in (ead_specs(args.match_tau) if args.match_tau else specs[:1]):
        pilot_rows = [r for r in runs if r["setting"] == f"pilot_{match}"]
        if not pilot_rows:
            raise SystemExit(f"--match-tau: run the pilot with {match} first (--pilot-taus)")
        calib = calibrate_random(pilot_rows, match)
        log(f"random baseline for {match}: {calib}")
        name = f"random@{match}"
        used = {r["config"]["p_up"] for r in runs if r["setting"] == name}
        if used - {calib["p_up"]}:
            raise SystemExit(f"{name}: the pilot now calibrates p_up {calib['p_up']:.4f}, but {args.runs} "
                             f"holds runs at {sorted(used)}: move them away first")
        sets[name] = {"kind": "random", **calib}
    for i in range(args.start, args.start + args.n):
        for name, setting in sets.items():
            run(name, setting, i)
    pair.close()
    log("done")
    return 0


def summarize_gsm8k(runs: list, n: int) -> dict:
    """Per setting, over the problems (< n) it shares with small-only and large-only: accuracy,
    gap recovery with a paired bootstrap CI (10,000 resamples of those problems), cost. Settings
    may have run on different problems (a setting added later runs on fewer); each random
    baseline is compared with its matched setting on the problems both ran."""
    by = {}
    for r in runs:
        if r["idx"] < n:
            by.setdefault(r["setting"], {})[r["idx"]] = r
    base = set(by.get("small", {})) & set(by.get("large", {}))
    out = {}
    for name, rs in by.items():
        ids = sorted(set(rs) & base if base else set(rs))
        if not ids:
            continue
        sel = [rs[i] for i in ids]
        tok = sum(r["generated_tokens"] for r in sel)
        wall = sum(r["wall_s"] for r in sel)
        d = {
            "problems": len(sel),
            "first_last": [ids[0], ids[-1]],
            "accuracy": float(np.mean([r["correct"] for r in sel])),
            "correct": int(sum(r["correct"] for r in sel)),
            "large_share": sum(r["large_share"] * r["generated_tokens"] for r in sel) / max(1, tok),
            "relative_compute": float(np.mean([r["relative_compute"] for r in sel])),
            "ms_per_token": 1000 * wall / max(1, tok),
            "wall_s_per_problem": wall / len(sel),
            "tokens_per_problem": tok / len(sel),
            "truncated": int(sum(r["finish_reason"] == "length" for r in sel)),
            "config": sel[0].get("config"),
            "ids": ids,
        }
        if any("switches" in r for r in sel):
            d["switches_per_problem"] = float(np.mean([r.get("switches", 0) for r in sel]))
        if any(r.get("catchup_overhead_s") for r in sel):
            co = sum(r.get("catchup_overhead_s", 0.0) for r in sel)
            d["catchup_tokens_per_problem"] = float(np.mean([r.get("catchup_tokens", 0) for r in sel]))
            d["catchup_overhead_s"] = co
            d["catchup_overhead_vs_ideal"] = co / (wall - co)
            d["catchup_time_s"] = sum(r.get("catchup_s", 0.0) for r in sel)
        if any(r.get("verifications") for r in sel):
            d["checked_tokens"] = int(sum(r.get("checked_tokens", 0) for r in sel))
            d["rejected_tokens"] = int(sum(r.get("rejected_tokens", 0) for r in sel))
        out[name] = d

    def correct(name, ids):
        return np.array([by[name][i]["correct"] for i in ids], np.float64)

    if base:
        for name, d in out.items():
            ids = d["ids"]
            cs, cl, ce = correct("small", ids), correct("large", ids), correct(name, ids)
            d["small_accuracy"], d["large_accuracy"] = float(cs.mean()), float(cl.mean())
            d["gap_recovery"] = (ce.mean() - cs.mean()) / (cl.mean() - cs.mean()) if cl.mean() != cs.mean() else float("nan")

            def recovery(idx, cs=cs, cl=cl, ce=ce):  # resamples where large and small tie are left out
                bs_s, bs_l, bs_e = cs[idx].mean(1), cl[idx].mean(1), ce[idx].mean(1)
                ok = bs_l != bs_s
                return (bs_e[ok] - bs_s[ok]) / (bs_l[ok] - bs_s[ok])

            d["gap_recovery_ci95"] = ci95(bootstrap(recovery, len(ids)))
        for name, d in out.items():
            m = d["config"].get("matched_to") if name.startswith("random@") else None
            if m in out:  # the matched EAD setting minus this random baseline, accuracy points
                ids = sorted(set(d["ids"]) & set(out[m]["ids"]))
                cm, cr = correct(m, ids), correct(name, ids)
                diff = bootstrap(lambda idx: 100 * (cm[idx].mean(1) - cr[idx].mean(1)), len(ids))
                d["matched_minus_random_points"] = float(100 * (cm.mean() - cr.mean()))
                d["matched_minus_random_ci95"] = ci95(diff)
                d["matched_minus_random_problems"] = len(ids)
        # verify against large-only on the same problems: identical texts?
        for name, d in out.items():
            if d["config"].get("verify") and not d["config"].get("verify_window"):
                same = [by[name][i]["text"] == by["large"][i]["text"] for i in d["ids"]]
                d["same_text_as_large"] = f"{sum(same)}/{len(same)}"
                bl = [by["large"][i] for i in d["ids"]]
                d["large_only_ms_per_token_same_problems"] = 1000 * sum(r["wall_s"] for r in bl) / max(
                    1, sum(r["generated_tokens"] for r in bl))
    for d in out.values():
        d.pop("ids")
    return out


# ============================================================================================
# timing: where EAD's time goes (a controlled run, separate from the accuracy run)
# ============================================================================================

def cmd_timing(args) -> int:
    """Per-model forward time inside EAD runs, and what a batch of k tokens costs each model.

    For --problems GSM8K problems (from --start), runs large-only and EAD at each --taus, in
    rotating order, --reps times; reports wall time, time inside each model and Python's share.
    Then, after a 300-token context, times a batch of k new tokens (k = 1, 2, 4, ..., 64) on
    each model: catch-up runs such batches where an up-to-date model would run one token."""
    probs = [json.loads(x) for x in (DATA / "gsm8k_train500.jsonl").read_text().splitlines() if x.strip()]
    pair = edgekv.load_pair(SMALL_NAME, LARGE_NAME, threads=args.threads, ctx=1024, progress=False)
    chat = pair.tokenizer.apply_chat_template
    prompts = [chat(gsm8k_messages(probs, i), add_generation_prompt=True) for i in range(args.start, args.start + args.problems)]
    a, b = pair.tokenize(prompts[0]), pair.tokenize(prompts[1])
    keep = next(k for k in range(min(len(a), len(b))) if a[k] != b[k])
    for m in (pair.small, pair.large):
        m.session.eval(a[:keep])
    settings = [("large", None)] + ead_specs(args.taus)
    rows = []
    for rep in range(args.reps):
        for j, p in enumerate(prompts):
            order = settings[(j + rep) % len(settings):] + settings[:(j + rep) % len(settings)]
            for name, setting in order:
                for m in (pair.small, pair.large):
                    if m.n_past > keep:
                        m.session.truncate(keep)
                t0 = time.perf_counter()
                if setting is None:
                    pair.large.generate(p, max_tokens=args.max_tokens, temperature=0)
                    st = pair.large.last_stats
                    r = {"wall_s": time.perf_counter() - t0, "tokens": st.generated_tokens,
                         "large_s": st.prefill_s + st.decode_s, "small_s": 0.0}
                else:
                    pair.generate(p, max_tokens=args.max_tokens, temperature=0, tau=setting["tau"],
                                  d_min=setting["d_min"])
                    st = pair.last_stats
                    r = {"wall_s": time.perf_counter() - t0, "tokens": st.generated_tokens, "large_s": st.large_s,
                         "small_s": st.small_s, "catchup_overhead_s": st.catchup_overhead_s,
                         "catchup_tokens": st.catchup_tokens, "large_share": st.large_share,
                         "large_evaluated": st.large_evaluated, "small_evaluated": st.small_evaluated,
                         "switches": st.switches}
                r.update(setting=name, problem=args.start + j, rep=rep, load=os.getloadavg()[0])
                rows.append(r)
                log(f"{name:>12} #{args.start + j} rep {rep}: {r['tokens']} tok, wall {r['wall_s']:.1f} s "
                    f"(small {r['small_s']:.1f}, large {r['large_s']:.1f}), load {r['load']:.1f}")
    # batch cost curve
    ctx_ids = np.asarray(pair.tokenize((DATA / "wikitext2_valid.txt").read_text()[:4000])[:364], np.int32)
    curve = {}
    for role, m in ((SMALL, pair.small), (LARGE, pair.large)):
        m.reset()
        m.session.eval(ctx_ids[:300])
        pts = []
        for k in (1, 2, 4, 8, 16, 32, 64):
            ts = batch_times(m, ctx_ids, 300, k, args.reps + 1)
            pts.append({"k": k, "median_s": float(np.median(ts))})
            log(f"{role} batch of {k}: {1000 * np.median(ts):.0f} ms")
        curve[role] = pts
    pair.close()
    (WORK / "timing.json").write_text(json.dumps({"runs": rows, "batch_cost": curve, "max_tokens": args.max_tokens,
                                                  "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M")},
                                                 indent=1))
    log(f"wrote {WORK / 'timing.json'}")
    return 0


def summarize_timing(t: dict) -> dict:
    out = {"batch_cost": t["batch_cost"], "settings": {}, "date": t.get("date")}
    by = {}
    for r in t["runs"]:
        by.setdefault(r["setting"], []).append(r)
    large = {(r["problem"], r["rep"]): r for r in by.get("large", [])}
    for name, rs in by.items():
        tok = sum(r["tokens"] for r in rs)
        d = {"runs": len(rs), "ms_per_token": 1000 * sum(r["wall_s"] for r in rs) / tok,
             "small_share_of_wall": sum(r["small_s"] for r in rs) / sum(r["wall_s"] for r in rs),
             "large_share_of_wall": sum(r["large_s"] for r in rs) / sum(r["wall_s"] for r in rs),
             "mean_load": float(np.mean([r["load"] for r in rs]))}
        if name != "large":
            d["catchup_overhead_vs_ideal"] = sum(r["catchup_overhead_s"] for r in rs) / sum(
                r["wall_s"] - r["catchup_overhead_s"] for r in rs)
            d["large_share"] = sum(r["large_share"] * r["tokens"] for r in rs) / tok
            ratios = [(r["wall_s"] / r["tokens"]) / (large[(r["problem"], r["rep"])]["wall_s"] / large[(r["problem"], r["rep"])]["tokens"])
                      for r in rs if (r["problem"], r["rep"]) in large]
            d["median_paired_ms_per_token_vs_large"] = float(np.median(ratios)) if ratios else None
        out["settings"][name] = d
    return out


# ============================================================================================
# report
# ============================================================================================

def cmd_report(args) -> int:
    res = {"date": _dt.date.today().isoformat(), "small": SMALL_NAME, "large": LARGE_NAME,
           "defaults": {"tau": DEFAULT_TAU, "window": DEFAULT_WINDOW, "d_min": DEFAULT_D_MIN},
           "machine": machine_line(machine(command_line("ead.py")))}
    try:
        res["teacher_forced"] = analyse_tf(args.tokens, args.chunk)
        plot_tf(res["teacher_forced"], RESULTS / "ead.png")
    except SystemExit as e:
        log(f"teacher-forced part skipped: {e}")
    runs = load_runs(Path(args.runs))
    if runs:
        res["gsm8k"] = {"max_tokens": args.max_tokens, "instruction": INSTRUCTION, "worked_example": SHOT,
                        "settings": summarize_gsm8k(runs, args.n)}
    if (WORK / "timing.json").exists():
        res["timing"] = summarize_timing(json.loads((WORK / "timing.json").read_text()))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "ead.json").write_text(json.dumps(res, indent=1, default=float) + "\n")
    write_md(res, RESULTS / "ead.md")
    log("wrote benchmarks/results/ead.json, ead.md" + (", ead.png" if "teacher_forced" in res else ""))
    return 0


def targets_md(res: dict) -> list:
    """The issue's targets, checked against what was measured."""
    def yes(b):
        return "**met**" if b else "**not met**"

    L = ["## Targets", "", "| target | measured | |", "|---|---|---|"]
    tf = res.get("teacher_forced")
    if tf:
        for dom, d in tf["domains"].items():
            b = d["best_recovery_at_share_le_50"]
            b1 = d["alt_d_min"]["best_recovery_at_share_le_50"]
            L.append(f"| text ({dom}): >= 80% of the perplexity gap at a large share <= 50% | "
                     f"best {100 * b['recovery']:.1f}% (tau {b['tau']}, share {100 * b['large_share']:.1f}%; "
                     f"d_min {d['alt_d_min']['d_min']}: {100 * b1['recovery']:.1f}% at tau {b1['tau']}, "
                     f"share {100 * b1['large_share']:.1f}%). "
                     f"Ceiling of any per-position threshold on the small model's entropy at 50%: "
                     f"{100 * d['entropy_gate_recovery_at_share_50']:.1f}% | "
                     f"{yes(max(b['recovery'], b1['recovery']) >= 0.8)} |")
            # below a 5% share both sit within 0.1% of small-only and the comparison is noise
            rows = [r for r in d["sweep_default_window_dmin"] if 0.05 <= r["large_share"] <= 0.5]
            wins = sum(r["ppl"] < r["ppl_random_segments"] for r in rows)
            L.append(f"| text ({dom}): beats random switching at the same share | lower perplexity than random "
                     f"segments at {wins} of {len(rows)} taus with a share of 5-50% | {yes(wins == len(rows))} |")
    gs = res.get("gsm8k")
    if gs:
        st = gs["settings"]
        for name, d in st.items():
            if name.startswith("ead_tau") and d["large_share"] <= 0.5:
                lo, hi = d["gap_recovery_ci95"]
                mode = " (verify: slower than the large model alone)" if (
                    d["config"].get("verify") and d["ms_per_token"] > d.get("large_only_ms_per_token_same_problems",
                                                                             st["large"]["ms_per_token"])) else ""
                L.append(f"| GSM8K {name}{mode}: >= 80% of the accuracy gap at a large share <= 50% | "
                         f"{100 * d['gap_recovery']:.0f}% [{100 * lo:.0f}, {100 * hi:.0f}] at share "
                         f"{100 * d['large_share']:.1f}% ({d['problems']} problems; compute "
                         f"{d['relative_compute']:.2f}x, {d['ms_per_token']:.0f} ms/token) | "
                         f"{yes(d['gap_recovery'] >= 0.8 - 1e-9)} |")  # 36 of a 45-problem gap is 80%
        for name, d in st.items():
            m = d["config"].get("matched_to") if name.startswith("random@") else None
            if m in st:
                lo, hi = d.get("matched_minus_random_ci95", (float("nan"),) * 2)
                L.append(f"| GSM8K: beats random switching at the same share | {m} {100 * st[m]['accuracy']:.1f}% "
                         f"(share {100 * st[m]['large_share']:.1f}%) vs {name} {100 * d['accuracy']:.1f}% "
                         f"(share {100 * d['large_share']:.1f}%): {d.get('matched_minus_random_points', float('nan')):+.0f} "
                         f"points [{lo:+.0f}, {hi:+.0f}] on {d.get('matched_minus_random_problems')} problems | "
                         f"{yes(d.get('matched_minus_random_points', 0) > 0)} |")
        for name, d in st.items():
            if name.startswith("ead_tau") and "catchup_overhead_vs_ideal" in d:
                L.append(f"| catch-up adds < 10% to wall time vs no catch-up cost ({name}, GSM8K run) | "
                         f"+{100 * d['catchup_overhead_vs_ideal']:.1f}% | {yes(d['catchup_overhead_vs_ideal'] < 0.1)} |")
    tm = res.get("timing")
    if tm:  # the controlled timing run (its own date: it may be newer than the GSM8K run's build)
        for name, d in tm["settings"].items():
            if "catchup_overhead_vs_ideal" in d:
                co = d["catchup_overhead_vs_ideal"]
                L.append(f"| catch-up adds < 10% to wall time vs no catch-up cost ({name}, timing run, "
                         f"{d['runs']} runs{', ' + tm['date'] if tm.get('date') else ''}) | +{100 * co:.1f}% | {yes(co < 0.1)} |")
    return L + [""]


def write_md(res: dict, path: Path) -> None:
    L = [f"# Entropy adaptive decoding: {res['small']} -> {res['large']}", "",
         f"{res['date']}; {res['machine']}. Defaults: tau {res['defaults']['tau']} bits, "
         f"window {res['defaults']['window']}, d_min {res['defaults']['d_min']}. "
         "Produced by `benchmarks/ead.py` (see its docstring for the method).", ""]
    L += targets_md(res)
    tf = res.get("teacher_forced")
    if tf:
        L += ["## Teacher-forced perplexity", "",
              f"{tf['tokens_per_domain']} tokens per domain in chunks of {tf['chunk']}; the tuning half (even chunks) "
              "chose window / d_min / hysteresis, everything below is on the held-out half (odd chunks). "
              "Recovery = (ppl_small - ppl) / (ppl_small - ppl_large). ![](ead.png)", ""]
        for dom, d in tf["domains"].items():
            L += [f"### {dom}: small {d['ppl_small']:.3f}, large {d['ppl_large']:.3f} "
                  f"({d['positions']} positions; argmax agreement {100 * d['argmax_agreement']:.1f}%)", "",
                  "| tau | large share | EAD ppl | recovery | random segments | random i.i.d. | entropy gate | oracle | switches/1k |",
                  "|---|---|---|---|---|---|---|---|---|"]
            for r in d["sweep_default_window_dmin"]:
                if r["tau"] in (0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0):
                    L.append(f"| {r['tau']} | {100 * r['large_share']:.1f}% | {r['ppl']:.3f} | "
                             f"{100 * r['recovery']:.1f}% | {r['ppl_random_segments']:.3f} | "
                             f"{r['ppl_random_iid']:.3f} | {r['ppl_entropy_gate']:.3f} | {r['ppl_oracle']:.3f} | "
                             f"{r['switches_per_1k']:.0f} |")
            b = d["best_recovery_at_share_le_50"]
            b1 = d["alt_d_min"]["best_recovery_at_share_le_50"]
            L += ["", f"Best recovery at a large share <= 50% (taus every 0.1 bit): {100 * b['recovery']:.1f}% "
                      f"(tau {b['tau']}, share {100 * b['large_share']:.1f}%, random segments there "
                      f"{b['ppl_random_segments']:.3f} vs EAD {b['ppl']:.3f}); interpolated at 50%: "
                      f"{100 * d['recovery_at_share_50']:.1f}%. With d_min {d['alt_d_min']['d_min']}: {100 * b1['recovery']:.1f}% "
                      f"(tau {b1['tau']}, share {100 * b1['large_share']:.1f}%), at 50% "
                      f"{100 * d['alt_d_min']['recovery_at_share_50']:.1f}%. The entropy gate -- the large model "
                      "at exactly the positions where the small model's entropy is highest, the best any "
                      "per-position threshold on that entropy can do -- recovers "
                      f"{100 * d['entropy_gate_recovery_at_share_50']:.1f}% at 50%.", "",
                  "| small entropy (bits) | positions | argmax agreement | NLL gain of large (nats) |",
                  "|---|---|---|---|"]
            for e in d["by_small_entropy"]:
                L.append(f"| {e['small_entropy_bits'][0]}-{e['small_entropy_bits'][1]} | "
                         f"{100 * e['share_of_positions']:.1f}% | {100 * e['argmax_agreement']:.1f}% | "
                         f"{e['nll_gain_nats']:.3f} |")
            L.append("")
        L += ["### Tuning (tuning half; mean recovery over shares 20/30/40/50%, both domains)", "",
              "| window | d_min | tau_low / tau | mean recovery |", "|---|---|---|---|"]
        for g in tf["tuning_grid"][:10]:
            L.append(f"| {g['window']} | {g['d_min']} | {g['tau_low_ratio']} | {100 * g['mean_recovery_20_50']:.1f}% |")
        L.append("")
    gs = res.get("gsm8k")
    if gs:
        L += ["## GSM8K generation", "",
              f"Greedy, chat template, max {gs['max_tokens']} tokens, exact match of the final number. "
              "ms/token is wall time per generated token (prefill included) on a shared 2-core machine. "
              "Compute is parameter-weighted tokens run (prompt, catch-up, decode) relative to the large model alone. "
              "Each setting is summarized on the problems it ran (settings added later ran on fewer); its gap "
              "recovery uses small-only's and large-only's accuracy on those same problems, with a paired "
              "bootstrap 95% CI over them.",
              "", "| setting | problems | accuracy | gap recovery [95% CI] | large share | compute | ms/token | "
              "switches | catch-up tok | catch-up overhead | truncated |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for name, d in gs["settings"].items():
            co = d.get("catchup_overhead_vs_ideal")
            L.append(f"| {name} | {d['problems']} ({d['first_last'][0]}-{d['first_last'][1]}) | "
                     f"{100 * d['accuracy']:.1f}% ({d['correct']}) | "
                     f"{100 * d.get('gap_recovery', float('nan')):.0f}% "
                     f"[{100 * d.get('gap_recovery_ci95', [np.nan] * 2)[0]:.0f}, "
                     f"{100 * d.get('gap_recovery_ci95', [np.nan] * 2)[1]:.0f}] | {100 * d['large_share']:.1f}% | "
                     f"{d['relative_compute']:.2f} | {d['ms_per_token']:.0f} | {d.get('switches_per_problem', 0):.1f} | "
                     f"{d.get('catchup_tokens_per_problem', 0):.1f} | "
                     f"{'' if co is None else f'{100 * co:.1f}%'} | {d['truncated']} |")
        for name, d in gs["settings"].items():
            if name.startswith("random@"):
                c = d["config"]
                L += ["", f"{name}: the small model hands over with probability {c['p_up']:.3f} per token "
                          f"and the large one writes exactly d_min = {c['d_min']} tokens, calibrated on "
                          f"{c['pilot_problems']} pilot problems (400..) of {c['matched_to']} (share "
                          f"{100 * c['pilot_large_share']:.1f}%, mean large segment {c['pilot_mean_large_segment']:.1f})."]
        for name, d in gs["settings"].items():
            if "same_text_as_large" in d:
                L += ["", f"{name}: text identical to large-only on {d['same_text_as_large']} problems; "
                          f"{d.get('checked_tokens', 0)} draft tokens checked, {d.get('rejected_tokens', 0)} thrown away; "
                          f"{d['ms_per_token']:.0f} ms/token vs large-only {d['large_only_ms_per_token_same_problems']:.0f} "
                          "on the same problems."]
        L.append("")
    tm = res.get("timing")
    if tm:
        L += ["## Where the time goes (controlled timing run)", "",
              "Large-only and EAD on the same problems (GSM8K problems from 100; a speed measurement, no setting is chosen on it), rotating order, "
              "each run's caches cut back to the shared prefix first. 'paired' is the median over runs of "
              "EAD's ms/token divided by large-only's on the same problem and repetition.", "",
              "| setting | runs | ms/token | paired vs large | small fwd share of wall | large fwd share of wall | "
              "large share | catch-up overhead | mean load |", "|---|---|---|---|---|---|---|---|---|"]
        for name, d in tm["settings"].items():
            pr = d.get("median_paired_ms_per_token_vs_large")
            co = d.get("catchup_overhead_vs_ideal")
            L.append(f"| {name} | {d['runs']} | {d['ms_per_token']:.0f} | {'' if pr is None else f'{pr:.2f}x'} | "
                     f"{100 * d['small_share_of_wall']:.0f}% | {100 * d['large_share_of_wall']:.0f}% | "
                     f"{100 * d.get('large_share', 1.0):.0f}% | {'' if co is None else f'+{100 * co:.1f}%'} | "
                     f"{d['mean_load']:.1f} |")
        L += ["", "Cost of one forward pass over k new tokens after a 300-token context (median), relative to k = 1:", "",
              "| k | " + " | ".join(str(p["k"]) for p in tm["batch_cost"][SMALL]) + " |",
              "|---|" + "---|" * len(tm["batch_cost"][SMALL])]
        for role in (SMALL, LARGE):
            pts = tm["batch_cost"][role]
            L.append(f"| {role} | " + " | ".join(f"{1000 * p['median_s']:.0f} ms ({p['median_s'] / pts[0]['median_s']:.1f}x)"
                                                 for p in pts) + " |")
        L.append("")
    path.write_text("\n".join(L) + "\n")


# ============================================================================================

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("tf", help="teacher-forced per-position scores of both models")
    t.add_argument("--tokens", type=int, default=16384)
    t.add_argument("--chunk", type=int, default=1024)
    t.add_argument("--threads", type=int, default=None)
    t.set_defaults(func=cmd_tf)
    g = sub.add_parser("gsm8k", help="generation on GSM8K (resumable)")
    g.add_argument("--n", type=int, default=100)
    g.add_argument("--start", type=int, default=0)
    g.add_argument("--max-tokens", type=int, default=256)
    g.add_argument("--threads", type=int, default=None)
    g.add_argument("--runs", default=str(WORK / "gsm8k_runs.jsonl"))
    g.add_argument("--pilot", type=int, default=8, help="pilot problems (400..) for --pilot-taus")
    g.add_argument("--pilot-taus", default=None,
                   help="comma-separated EAD settings (TAU or TAU/D_MIN) to run on the pilot problems")
    g.add_argument("--taus", default=None, help="comma-separated EAD settings, TAU or TAU/D_MIN (none: pilot only)")
    g.add_argument("--match-tau", default=None, help="EAD setting (TAU or TAU/D_MIN) the random baseline is matched to")
    g.set_defaults(func=cmd_gsm8k)
    t2 = sub.add_parser("timing", help="where EAD's time goes (controlled, small)")
    t2.add_argument("--problems", type=int, default=4)
    t2.add_argument("--start", type=int, default=100)
    t2.add_argument("--reps", type=int, default=2)
    t2.add_argument("--taus", default="1.0,2.0", help="EAD settings, TAU or TAU/D_MIN (no verify)")
    t2.add_argument("--max-tokens", type=int, default=256)
    t2.add_argument("--threads", type=int, default=None)
    t2.set_defaults(func=cmd_timing)
    r = sub.add_parser("report", help="write benchmarks/results/ead.{json,md,png}")
    r.add_argument("--tokens", type=int, default=16384)
    r.add_argument("--chunk", type=int, default=1024)
    r.add_argument("--runs", default=str(WORK / "gsm8k_runs.jsonl"))
    r.add_argument("--n", type=int, default=200)
    r.add_argument("--max-tokens", type=int, default=256)
    r.set_defaults(func=cmd_report)
    args = ap.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
