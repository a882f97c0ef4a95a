"""Per-layer KV precision, a first data point (issue 18): WikiText-2 perplexity of static policies
that differ by layer against their layer-uniform base.

Protocol (benchmarks/accuracy.py's): consecutive windows of 512 tokens of
../shared/data/wikitext2_valid.txt (edgekv's tokenizer, no BOS); in each, 384 tokens of context
stored under the policy, then 128 tokens scored one at a time (Model.score(..., sequential=True),
W=0). Perplexity = exp(mean NLL over all scored tokens); average bits from Model.kv_avg_bits
(records of every layer, scales and minimums included).

    python benchmarks/kv_layers.py --model qwen2.5-coder-0.5b --windows 6
writes benchmarks/results/kv_layers.md and .json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from common import command_line, machine, machine_line

REPO = Path(__file__).resolve().parents[1]
WIKI = REPO.parent / "shared" / "data" / "wikitext2_valid.txt"
RESULTS = REPO / "benchmarks" / "results"
if str(REPO / "python") not in sys.path:
    sys.path.insert(0, str(REPO / "python"))

WINDOW, WINDOW_CTX, N_CTX = 512, 384, 1024
DEFAULT_POLICIES = "fp16,int4,layers:int4,0=k8v4,k4v3,layers:k4v3,0=k8v3"


def wiki_prefix(m, n: int) -> np.ndarray:
    """The first n tokens of WIKI (edgekv's tokenizer, no BOS), int32; SystemExit if the text is shorter."""
    ids = np.asarray(m.tokenize(WIKI.read_text(encoding="utf-8")[:8 * n], special=False)[:n], np.int32)
    if ids.size < n:
        raise SystemExit(f"{WIKI.name} gives only {ids.size} of the {n} tokens asked for")
    return ids


def split_policies(s: str) -> list[str]:
    """Comma-separated policies; a part that is an override (L=P) belongs to the layers: before it."""
    out: list[str] = []
    for part in s.split(","):
        if out and out[-1].startswith("layers:") and "=" in part:
            out[-1] += "," + part
        else:
            out.append(part)
    return out


def score_window(m, ids, policy) -> dict:
    """One window: ids[:WINDOW_CTX] stored under policy, the rest scored one token at a time.
    nll: summed over the scored tokens; avg_bits: Model.kv_avg_bits (records and scales);
    avg_bits_maps: the same with the store's position maps (Model.kv_bytes)."""
    lp = m.score(ids[:WINDOW_CTX], ids[WINDOW_CTX:], kv=policy, sequential=True)
    hp = m.hparams
    elems = m.n_past * hp["n_layer"] * hp["n_head_kv"] * hp["head_dim"] * 2
    return {"nll": float(-np.sum(lp)), "n": int(lp.size), "avg_bits": float(m.kv_avg_bits),
            "avg_bits_maps": 8.0 * m.kv_bytes / elems}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--windows", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--policies", default=DEFAULT_POLICIES)
    ap.add_argument("--out", default=str(RESULTS / "kv_layers"))
    ap.add_argument("--text", default=str(WIKI), help="evaluation text (default: ../shared/data/wikitext2_valid.txt)")
    args = ap.parse_args(argv)
    import edgekv
    from edgekv.kv_policy import parse_policy

    path = Path(args.model) if args.model.endswith(".gguf") else Path(edgekv.registry.resolve(args.model))
    info = machine(command_line("kv_layers.py", argv))
    rows = []
    with edgekv.load(path, threads=args.threads, ctx=N_CTX, progress=False) as m:
        ids = m.tokenize(Path(args.text).read_text(encoding="utf-8"), special=False)
        windows = [ids[w * WINDOW:(w + 1) * WINDOW] for w in range(args.windows)]
        for name in split_policies(args.policies):
            pol = parse_policy(name)
            nll, n, bits, t0 = [], 0, [], time.perf_counter()
            for w in windows:
                one = score_window(m, w, pol)
                nll.append(one["nll"])
                n += one["n"]
                bits.append(one["avg_bits"])
            rows.append({"policy": name, "ppl": float(np.exp(sum(nll) / n)), "avg_bits": float(np.mean(bits)),
                         "window_nll": nll, "n_scored": n, "seconds": round(time.perf_counter() - t0, 1)})
            print(f"{name}: ppl {rows[-1]['ppl']:.3f} bits {rows[-1]['avg_bits']:.3f}", file=sys.stderr)
    base = next((r["ppl"] for r in rows if r["policy"] == "fp16"), None)
    res = {"model": path.name, "windows": args.windows, "window": WINDOW, "window_ctx": WINDOW_CTX,
           "machine": info, "rows": rows}
    Path(args.out + ".json").write_text(json.dumps(res, indent=1))
    lines = [f"# Per-layer KV precision: {path.name}, WikiText-2, {args.windows} windows",
             "", f"{WINDOW_CTX} tokens of context stored under the policy, then {WINDOW - WINDOW_CTX} scored one at a "
             "time (W=0). A first data point (few windows, no CIs), not issue 18's done-when.", "",
             "| policy | avg bits | perplexity | vs fp16 |", "|---|---|---|---|"]
    for r in rows:
        rel = f"{100 * (r['ppl'] / base - 1):+.2f}%" if base else ""
        lines.append(f"| `{r['policy']}` | {r['avg_bits']:.3f} | {r['ppl']:.3f} | {rel} |")
    lines += ["", f"Machine: {machine_line(info)}", ""]
    Path(args.out + ".md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
