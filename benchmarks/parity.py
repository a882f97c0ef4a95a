#!/usr/bin/env python
"""Correctness of edgekv against llama.cpp (llama-cpp-python) on WikiText-2 valid.

1. Token ids: edgekv's tokenizer (``Model.tokenize(text)``, special tokens parsed, no BOS) against
   llama.cpp's ``tokenize(text.encode(), add_bos=False, special=True)``, on the whole file and
   line by line (how many of the file's non-empty lines tokenize differently).
2. Logits: the file tokenized by llama.cpp (the reference ids, fed to both engines) is cut into
   non-overlapping windows of ``--window`` tokens (default 512); the first ``--windows`` of them
   (default 8) are run from a fresh context by both engines, every position's logits kept
   (edgekv ``Model.logits``; llama.cpp ``logits_all=True``, f16 K/V, flash attention off,
   n_batch = n_ubatch = window). No BOS is inserted (SmolLM2's GGUF has add_bos_token = false,
   so llama.cpp's ``perplexity`` tool would not insert one either); a model whose GGUF adds BOS
   (Gemma 3) gets it as each window's first token, followed by window - 1 text tokens, as
   llama.cpp's ``perplexity`` does (``--bos`` / ``--no-bos`` override).

   Scored positions: ALL predictions in each window (logits at position i predict token i+1,
   i = 0..window-2: 511 per 512-token window, 4,088 for the default 8 windows) -- the headline
   figures. The same metrics restricted to the second half of each window (i >= window/2, what
   llama.cpp's ``perplexity`` scores: 255 per window, 2,040 by default) are reported too.

   Metrics (float64, log-softmax over the full vocabulary):
   * mean KL(llama || edgekv) = sum_v p_llama(v) (log p_llama(v) - log p_edgekv(v)), in nats;
   * top-1 agreement: argmax equal;
   * perplexity of each engine on the actual next tokens, and the relative difference
     (ppl_edgekv - ppl_llama) / ppl_llama.
   Also the KL by position bucket inside the window (does the error grow with position?).

Targets (pass/fail in parity.md): mean KL <= 0.005 nats, top-1 >= 95%, perplexity within 1%.

3. ``--reference``: a third engine, the float64 NumPy forward pass of tests/reference.py over the
   file's weights dequantized exactly (no activation rounding, no FP16 cache), on the same windows:
   KL(reference || edgekv) and KL(reference || llama.cpp) say which engine is closer to what the
   file's weights compute, and KL(llama || reference) is the floor of the headline KL: what an
   exact engine would score against llama.cpp.
4. ``--exact-weights``: everything above on a copy of the GGUF (written once under
   ``~/.cache/edgekv/parity``) whose quantized matrices are dequantized to F32, so that neither engine
   rounds weights or activations in its matmuls: what is left is each engine's graph (norms, RoPE,
   attention, FFN) and float arithmetic.

Writes benchmarks/results/parity.json and benchmarks/results/parity.md.

    PYTHONPATH=python python benchmarks/parity.py
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "wikitext2_valid.txt"
RESULTS = REPO / "benchmarks" / "results"
if str(REPO / "python") not in sys.path:
    sys.path.insert(0, str(REPO / "python"))

from common import command_line, log_softmax, machine  # noqa: E402  (benchmarks/, the script's own folder)

GGML_TYPE_F16 = 1
TARGETS = {"mean_kl_max": 0.005, "top1_min": 0.95, "ppl_rel_diff_max": 0.01}


def compare_logits(ref: np.ndarray, test: np.ndarray, targets: np.ndarray, rows: int = 128) -> dict:
    """Per-position KL(ref || test), argmax agreement and NLLs; ref/test: (n, vocab) float32 logits
    whose row i predicts targets[i]."""
    n = ref.shape[0]
    kl = np.empty(n)
    agree = np.empty(n, dtype=bool)
    nll_ref = np.empty(n)
    nll_test = np.empty(n)
    for i in range(0, n, rows):
        a = log_softmax(ref[i:i + rows])
        b = log_softmax(test[i:i + rows])
        kl[i:i + rows] = (np.exp(a) * (a - b)).sum(axis=-1)
        agree[i:i + rows] = ref[i:i + rows].argmax(-1) == test[i:i + rows].argmax(-1)
        t = targets[i:i + rows]
        idx = np.arange(len(t))
        nll_ref[i:i + rows] = -a[idx, t]
        nll_test[i:i + rows] = -b[idx, t]
    return {"kl": kl, "agree": agree, "nll_ref": nll_ref, "nll_test": nll_test}


def metrics(kl, agree, nll_ref, nll_test) -> dict:
    ppl_r = float(np.exp(nll_ref.mean()))
    ppl_t = float(np.exp(nll_test.mean()))
    return {
        "positions": int(kl.size),
        "mean_kl": float(kl.mean()),
        "median_kl": float(np.median(kl)),
        "p99_kl": float(np.percentile(kl, 99)),
        "max_kl": float(kl.max()),
        "frac_kl_gt_0.01": float((kl > 0.01).mean()),
        "top1_agreement": float(agree.mean()),
        "ppl_llama": ppl_r,
        "ppl_edgekv": ppl_t,
        "ppl_rel_diff": (ppl_t - ppl_r) / ppl_r,
    }


def check(m: dict) -> list[dict]:
    return [
        {"target": "mean KL <= 0.005 nats", "value": m["mean_kl"], "pass": m["mean_kl"] <= TARGETS["mean_kl_max"]},
        {"target": "top-1 agreement >= 95%", "value": m["top1_agreement"],
         "pass": m["top1_agreement"] >= TARGETS["top1_min"]},
        {"target": "perplexity within 1%", "value": m["ppl_rel_diff"],
         "pass": abs(m["ppl_rel_diff"]) <= TARGETS["ppl_rel_diff_max"]},
    ]


def token_check(model, llm, text: str) -> dict:
    t0 = time.perf_counter()
    ek = model.tokenize(text, add_bos=False)
    t_ek = time.perf_counter() - t0
    t0 = time.perf_counter()
    ll = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
    t_ll = time.perf_counter() - t0
    out = {"chars": len(text), "edgekv_tokens": len(ek), "llama_tokens": len(ll), "identical": ek == ll,
           "edgekv_s": t_ek, "llama_s": t_ll}
    if ek != ll:
        i = next((j for j, (a, b) in enumerate(zip(ek, ll)) if a != b), min(len(ek), len(ll)))
        out["first_mismatch"] = {
            "index": i,
            "edgekv": ek[max(0, i - 3): i + 5],
            "llama": ll[max(0, i - 3): i + 5],
            "edgekv_text": model.detokenize(ek[max(0, i - 3): i + 5]),
            "llama_text": model.detokenize(ll[max(0, i - 3): i + 5]),
        }
    lines = [ln for ln in text.split("\n") if ln.strip()]
    bad = []
    for ln in lines:
        if model.tokenize(ln, add_bos=False) != llm.tokenize(ln.encode("utf-8"), add_bos=False, special=True):
            bad.append(ln)
    out["lines_checked"] = len(lines)
    out["lines_differing"] = len(bad)
    out["differing_line_examples"] = [b[:200] for b in bad[:5]]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="edgekv vs llama.cpp: token ids, KL, top-1, perplexity")
    p.add_argument("--model", default="smollm2-135m", help="registry name or .gguf path")
    p.add_argument("--window", type=int, default=512, help="tokens per window")
    p.add_argument("--windows", type=int, default=8, help="number of leading non-overlapping windows")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--bos", action=argparse.BooleanOptionalAction, default=None,
                   help="start each window with BOS (default: the GGUF's tokenizer.ggml.add_bos_token)")
    p.add_argument("--reference", action="store_true",
                   help="also run the float64 NumPy reference (tests/reference.py) on the same windows")
    p.add_argument("--exact-weights", nargs="?", const="all", default=None, metavar="NAMES",
                   help="run on a copy of the GGUF with its quantized matrices dequantized to F32 (all, or only "
                        "the tensors whose names contain one of the comma-separated NAMES, e.g. ffn_down)")
    args = p.parse_args(argv)

    import edgekv
    import llama_cpp
    from tqdm import tqdm

    path = str(edgekv.registry.resolve(args.model, progress=True))
    source_path = path
    if args.exact_weights:
        path = str(dequantized_copy(Path(path), None if args.exact_weights == "all" else args.exact_weights.split(",")))
        os.environ["EDGEKV_WEIGHT_CACHE"] = "off"  # F32 is used as it is: a cached copy would only fill the disk
    ref_model = None
    if args.reference:
        sys.path.insert(0, str(REPO / "tests"))
        from reference import ReferenceModel

        ref_model = ReferenceModel(path)
    text = DATA.read_text(encoding="utf-8")
    model = edgekv.load(path, threads=args.threads, ctx=args.window, n_batch=256, progress=False)
    llm = llama_cpp.Llama(
        model_path=path, n_ctx=args.window, n_batch=args.window, n_ubatch=args.window,
        n_threads=args.threads, n_threads_batch=args.threads, logits_all=True, verbose=False,
        flash_attn=False, type_k=GGML_TYPE_F16, type_v=GGML_TYPE_F16,
    )

    with tqdm(total=1 + args.windows, desc="parity", file=sys.stderr, dynamic_ncols=True) as bar:
        tok = token_check(model, llm, text)
        bar.update(1)
        ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)  # the reference ids
        bos = model.tokenizer.add_bos if args.bos is None else args.bos
        W = args.window
        step = W - 1 if bos else W  # text tokens per window
        n_win = min(args.windows, len(ids) // step)
        parts = {k: [] for k in ("kl", "agree", "nll_ref", "nll_test")}
        # reference comparisons: (ref, test) pairs by name; each entry like parts
        ref_pairs = ("reference||edgekv", "reference||llama.cpp", "llama.cpp||reference")
        ref_parts = {name: {k: [] for k in parts} for name in ref_pairs}
        pos_in_win = []
        per_window = []
        for w in range(n_win):
            win = ([model.tokenizer.bos_id] if bos else []) + ids[w * step:(w + 1) * step]
            t0 = time.perf_counter()
            ek = model.logits(win)  # (W, vocab)
            t_ek = time.perf_counter() - t0
            t0 = time.perf_counter()
            llm.reset()
            llm.eval(win)
            ll = np.array(llm.scores[:W], dtype=np.float32)
            t_ll = time.perf_counter() - t0
            r = compare_logits(ll[:-1], ek[:-1], np.asarray(win[1:]))
            if ref_model is not None:
                rf = ref_model.logits(win)
                tg = np.asarray(win[1:])
                for name, (a, b) in zip(ref_pairs, ((rf, ek), (rf, ll), (ll, rf))):
                    rr = compare_logits(a[:-1], b[:-1], tg)
                    for k in parts:
                        ref_parts[name][k].append(rr[k])
                del rf
            for k in parts:
                parts[k].append(r[k])
            pos_in_win.append(np.arange(W - 1))
            mw = metrics(r["kl"], r["agree"], r["nll_ref"], r["nll_test"])
            mw.update(window=w, edgekv_s=t_ek, llama_s=t_ll, max_abs_logit_diff=float(np.abs(ll - ek).max()))
            per_window.append(mw)
            bar.update(1)
            bar.set_postfix_str(f"KL {mw['mean_kl']:.2e} top1 {mw['top1_agreement']:.3f}")

    cat = {k: np.concatenate(v) for k, v in parts.items()}
    pos = np.concatenate(pos_in_win)
    overall = metrics(cat["kl"], cat["agree"], cat["nll_ref"], cat["nll_test"])
    second = pos >= W // 2
    second_half = metrics(*(cat[k][second] for k in ("kl", "agree", "nll_ref", "nll_test")))
    buckets = []
    edges = list(range(0, W, max(1, W // 8))) + [W - 1]
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (pos >= lo) & (pos < hi)
        if sel.any():
            buckets.append({"positions": f"{lo}-{hi - 1}", "n": int(sel.sum()), "mean_kl": float(cat["kl"][sel].mean()),
                            "top1_agreement": float(cat["agree"][sel].mean())})
    reference = None
    if ref_model is not None:
        reference = {}
        for name, d in ref_parts.items():
            c = {k: np.concatenate(v) for k, v in d.items()}
            reference[name] = metrics(c["kl"], c["agree"], c["nll_ref"], c["nll_test"])
    checks = check(overall)
    checks_second = check(second_half)

    res = {
        "command": command_line("parity.py", argv),
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(command_line("parity.py", argv)),
        "model_path": path,
        "source_model_path": source_path,
        "exact_weights": args.exact_weights,
        "data": str(DATA.relative_to(REPO.parent)),
        "setup": {
            "window": W, "windows": n_win, "threads": args.threads, "bos": bool(bos),
            "ids": "llama.cpp tokenization of the whole file, windows [w*W, (w+1)*W) for w < windows"
                   + ("; with BOS: BOS + text tokens [w*(W-1), (w+1)*(W-1))" if bos else ""),
            "scored": "all positions: logits at i predict token i+1, i = 0..W-2; "
                      "second_half: i >= W/2 (llama.cpp perplexity's convention)",
            "llama": "logits_all=True, type_k=type_v=f16, flash_attn=False, n_batch=n_ubatch=W",
            "edgekv": "Model.logits(window), ctx=W, n_batch=256",
            "kl": "KL(llama || edgekv) in nats, float64 log-softmax over the full vocabulary",
        },
        "tokenizer": tok,
        "all_positions": overall,
        "second_half": second_half,
        "kl_by_position": buckets,
        "per_window": per_window,
        "targets": TARGETS,
        "checks": checks,
        "checks_second_half": checks_second,
        "reference": reference,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "parity.json").write_text(json.dumps(res, indent=1))
    write_md(res, args.out / "parity.md")
    print(f"tokens: whole file identical={tok['identical']} ({tok['edgekv_tokens']} vs {tok['llama_tokens']}); "
          f"lines differing {tok['lines_differing']}/{tok['lines_checked']}")
    for name, m in (("all positions", overall), ("second half", second_half)):
        print(f"{name}: {m['positions']} positions, mean KL {m['mean_kl']:.5f} nats, top-1 "
              f"{100 * m['top1_agreement']:.2f}%, ppl llama {m['ppl_llama']:.4f} edgekv {m['ppl_edgekv']:.4f} "
              f"({100 * m['ppl_rel_diff']:+.3f}%)")
    for c in checks:
        print(f"{'PASS' if c['pass'] else 'FAIL'}  {c['target']}")
    for name, m in (reference or {}).items():
        print(f"KL({name}) {m['mean_kl']:.3g} nats, top-1 {100 * m['top1_agreement']:.2f}%")
    print(f"wrote {args.out / 'parity.json'} and {args.out / 'parity.md'}")
    return 0


def dequantized_copy(src: Path, names: list[str] | None = None) -> Path:
    """src with every quantized tensor (or those whose names contain one of ``names``) dequantized
    to F32 (gguf-py's dequantizers: the values the file's blocks encode), written once under
    ~/.cache/edgekv/parity as ``<stem>.f32[-names].gguf``."""
    import gguf
    from gguf import GGUFReader, GGUFWriter, quants

    tag = "" if names is None else "-" + "-".join(names)
    out = Path.home() / ".cache" / "edgekv" / "parity" / f"{src.stem}.f32{tag}.gguf"
    if out.exists() and out.stat().st_mtime >= src.stat().st_mtime:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    r = GGUFReader(str(src))
    w = GGUFWriter(str(tmp), r.fields["general.architecture"].contents())
    for f in r.fields.values():
        if f.name == "general.architecture" or f.name.startswith("GGUF."):
            continue  # the writer adds these itself
        vt = f.types[0]
        w.add_key_value(f.name, f.contents(), vt, sub_type=f.types[-1] if vt == gguf.GGUFValueType.ARRAY else None)
    for t in r.tensors:
        if t.tensor_type.name in ("F32", "F16", "BF16") or (names and not any(n in t.name for n in names)):
            w.add_tensor(t.name, t.data, raw_shape=t.data.shape, raw_dtype=t.tensor_type)
        else:
            a = quants.dequantize(t.data, t.tensor_type).astype(np.float32)
            w.add_tensor(t.name, a.reshape(tuple(int(d) for d in reversed(list(t.shape)))))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tmp.replace(out)
    return out


def write_md(res: dict, path: Path) -> None:
    s = res["setup"]
    tok = res["tokenizer"]
    L = ["# Parity: edgekv vs llama.cpp on WikiText-2 valid\n"]
    if res.get("exact_weights"):
        which = ("every quantized matrix" if res["exact_weights"] == "all" else
                 f"the quantized tensors whose names contain {res['exact_weights']}")
        L.append(f"**Exact weights**: a copy of `{Path(res['source_model_path']).name}` with {which} "
                 f"dequantized to F32 (`{Path(res['model_path']).name}`): neither engine rounds those weights or "
                 f"their activations.\n")
    L.append(f"Model `{Path(res['model_path']).name}`; `{res['data']}`; {s['windows']} non-overlapping windows of "
             f"{s['window']} tokens from the start of the file (llama.cpp's tokenization), "
             f"{'BOS first' if s['bos'] else 'no BOS'}; each window from "
             f"a fresh context. llama.cpp: {s['llama']}. edgekv: {s['edgekv']}. KL = {s['kl']}. "
             f"edgekv {res['machine']['edgekv']} (SIMD `{res['machine']['edgekv_simd']}`), llama-cpp-python "
             f"{res['machine']['llama_cpp_python']}, {res['date_utc']}.\n")
    L.append("## Token ids\n")
    L.append(f"Whole file ({tok['chars']} chars): edgekv {tok['edgekv_tokens']} tokens, llama.cpp "
             f"{tok['llama_tokens']} tokens, identical: **{tok['identical']}**. Line by line: "
             f"{tok['lines_differing']} of {tok['lines_checked']} non-empty lines differ.\n")
    if "first_mismatch" in tok:
        fm = tok["first_mismatch"]
        L.append(f"First mismatch at token {fm['index']}: edgekv {fm['edgekv']} ({fm['edgekv_text']!r}) vs "
                 f"llama.cpp {fm['llama']} ({fm['llama_text']!r}).\n")
    L.append("## Logits\n")
    L.append("| scored positions | n | mean KL (nats) | p99 KL | max KL | top-1 agreement | ppl llama.cpp | "
             "ppl edgekv | rel. diff |")
    L.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, key in (("all (i = 0..W-2) -- headline", "all_positions"),
                      ("second half (llama.cpp perplexity)", "second_half")):
        m = res[key]
        L.append(f"| {name} | {m['positions']} | {m['mean_kl']:.5f} | {m['p99_kl']:.4f} | {m['max_kl']:.4f} | "
                 f"{100 * m['top1_agreement']:.2f}% | {m['ppl_llama']:.4f} | {m['ppl_edgekv']:.4f} | "
                 f"{100 * m['ppl_rel_diff']:+.3f}% |")
    L.append("")
    L.append("KL by position inside the window: " + "; ".join(
        f"{b['positions']}: {b['mean_kl']:.5f} (top-1 {100 * b['top1_agreement']:.1f}%)"
        for b in res["kl_by_position"]) + ".\n")
    L.append("Per window: " + "; ".join(
        f"#{w['window']} KL {w['mean_kl']:.5f}, top-1 {100 * w['top1_agreement']:.1f}%, max |dlogit| "
        f"{w['max_abs_logit_diff']:.3f}" for w in res["per_window"]) + ".\n")
    if res.get("reference"):
        L.append("## Against the float64 reference (tests/reference.py)\n")
        L.append("The same windows and scored positions (all); KL(P || Q) in nats, perplexity columns: P's and Q's. "
                 "KL(llama.cpp || reference) is the floor of the headline KL: what an engine computing the file's "
                 "weights exactly would score against llama.cpp.\n")
        L.append("| P \\|\\| Q | mean KL | p99 KL | top-1 agreement | ppl P | ppl Q |")
        L.append("|---|---:|---:|---:|---:|---:|")
        for name, m in res["reference"].items():
            a, b = name.split("||")
            L.append(f"| {a} \\|\\| {b} | {m['mean_kl']:.5f} | {m['p99_kl']:.4f} | {100 * m['top1_agreement']:.2f}% | "
                     f"{m['ppl_llama']:.4f} | {m['ppl_edgekv']:.4f} |")
        L.append("")
    L.append("## Targets (all positions)\n")
    L.append("| target | value | result |")
    L.append("|---|---:|---|")
    for c in res["checks"]:
        v = c["value"]
        shown = f"{v:.5f}" if "KL" in c["target"] else f"{100 * v:+.3f}%" if "perplexity" in c["target"] \
            else f"{100 * v:.2f}%"
        L.append(f"| {c['target']} | {shown} | {'PASS' if c['pass'] else 'FAIL'} |")
    L.append("")
    L.append("Second half only: " + ", ".join(
        f"{c['target']}: {'PASS' if c['pass'] else 'FAIL'}" for c in res["checks_second_half"]) + ".\n")
    L.append(f"Command: `{res['command']}`\n")
    path.write_text("\n".join(L))


if __name__ == "__main__":
    sys.exit(main())
