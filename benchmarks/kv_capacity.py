"""How many warm 1,000-token conversations 1 GiB of KV holds, per registry model and KV policy
(issue 19, item 4). Exact bytes, not timed: a session's `kv_bytes()` (records, scales, minimums
and position maps) after prefilling 1,000 tokens of WikiText-2 under the policy.

    PYTHONPATH=python python benchmarks/kv_capacity.py
writes benchmarks/results/kv_capacity.{json,md}.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import command_line, machine, machine_line
from kv_layers import RESULTS, wiki_prefix

MODELS = ("smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b")  # the three
POLICIES = "fp16,int8,int4,auto@4,auto"
GIB = 1 << 30


def measure(model: str, policies: list[str], tokens: int, threads: int) -> dict:
    import edgekv

    out = {}
    with edgekv.load(edgekv.registry.resolve(model), threads=threads, ctx=tokens + 24, progress=False) as m:
        ids = wiki_prefix(m, tokens)
        for p in policies:
            s = m.new_session(kv=p)
            try:
                s.eval(ids, logits="none")
                b = s.kv_bytes()
                out[p] = {"bytes": b, "avg_bits": s.kv_avg_bits, "per_gib": GIB // b}
            finally:
                s.close()
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--policies", default=POLICIES)
    ap.add_argument("--tokens", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(RESULTS / "kv_capacity"))
    args = ap.parse_args(argv)
    pols = [p for p in args.policies.split(",") if p]
    res = {"machine": machine(command_line("kv_capacity.py", argv)), "tokens": args.tokens,
           "models": {mo: measure(mo, pols, args.tokens, args.threads) for mo in args.models}}
    Path(args.out + ".json").write_text(json.dumps(res, indent=1) + "\n")
    L = [f"# Warm {args.tokens:,}-token conversations per GiB of KV", "",
         f"A session's `kv_bytes()` (records, scales, minimums, position maps) after prefilling {args.tokens:,} "
         "tokens of `../shared/data/wikitext2_valid.txt` under the policy; conversations per GiB = 2^30 // bytes. "
         "Exact bytes, not timed.", "",
         "| model | " + " | ".join(f"`{p}`" for p in pols) + " |", "|---|" + "---:|" * len(pols)]
    for mo, r in res["models"].items():
        L.append(f"| {mo} | " + " | ".join(
            f"{r[p]['per_gib']} ({r[p]['bytes'] / 1e6:.1f} MB, {r[p]['avg_bits']:.2f} b)" for p in pols) + " |")
    L += ["", f"Machine: {machine_line(res['machine'])}", ""]
    Path(args.out + ".md").write_text("\n".join(L))
    print("\n".join(L))


if __name__ == "__main__":
    main()
