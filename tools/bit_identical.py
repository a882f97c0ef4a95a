#!/usr/bin/env python3
"""Dump what a change "with no change in behaviour" must leave bit for bit the same, and compare dumps.

For each model and KV policy (a fresh load with kv=POLICY, threads=1, the cache reset before each
call): the greedy tokens of each prompt (generate(temperature=0); the tokens are read back from the
model's context), score() log-probabilities of fixed continuations, sequential and batched
(float64 bytes: sha256 and every value in float.hex), and the sha256 of logits() over a prompt.

    # before: the library and package of the old commit; after: this checkout's
    PYTHONPATH=/old/tree/python python tools/bit_identical.py dump old.json
    PYTHONPATH=$PWD/python      python tools/bit_identical.py dump new.json
    python tools/bit_identical.py compare old.json new.json     # exit 1 on any difference

The dump records which edgekv package and library it ran (check them: PYTHONPATH decides).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
from pathlib import Path

MODELS = ["smollm2-135m", "qwen2.5-coder-0.5b"]
POLICIES = ["fp16", "int8", "int4", "k4v2", "int3"]
PROMPTS = ["The sky is", "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"]
SCORES = [
    ("The capital of France is", " Paris, a city known for its museums, its food and its long history."),
    ("for i in range(10):\n", "    print(i * i)\n"),
]


def _floats(a) -> dict:
    import numpy as np

    a = np.ascontiguousarray(a, dtype=np.float64)
    return {"sha256": hashlib.sha256(a.tobytes()).hexdigest(), "values": [float(x).hex() for x in a]}


def dump(out: Path, models: list[str], policies: list[str], n_tokens: int) -> None:
    import numpy as np

    import edgekv
    import edgekv._native as native

    pkg = Path(edgekv.__file__).resolve().parent
    git = subprocess.run(["git", "-C", str(pkg), "rev-parse", "HEAD"], capture_output=True, text=True)
    result = {
        "edgekv": str(pkg),
        "edgekv_commit": git.stdout.strip() if git.returncode == 0 else "(not in a git checkout)",
        "library": str(native.LIB_PATH),
        "simd": native.SIMD,
        "command": " ".join(sys.argv),
        "runs": {},
    }
    for name in models:
        for policy in policies:
            m = edgekv.load(name, threads=1, kv=policy, progress=False)
            try:
                run = {"generate": [], "score": []}
                for prompt in PROMPTS:
                    m.reset()
                    text = m.generate(prompt, max_tokens=n_tokens, temperature=0)
                    # the context now holds the prompt and every generated token but the last
                    run["generate"].append({"text": text, "context_tokens": [int(t) for t in m._tokens]})
                for ctx, cont in SCORES:
                    for sequential in (True, False):
                        m.reset()
                        lp = m.score(ctx, cont, sequential=sequential)
                        run["score"].append({"sequential": sequential, **_floats(lp)})
                m.reset()
                logits = np.ascontiguousarray(m.logits(m.tokenize(PROMPTS[0])), dtype=np.float32)
                run["logits_sha256"] = hashlib.sha256(logits.tobytes()).hexdigest()
            finally:
                m.close()
            result["runs"][f"{name} {policy}"] = run
            print(f"{name:>20} {policy:>5}: {run['generate'][0]['text'][:40]!r} "
                  f"score {run['score'][0]['sha256'][:12]} logits {run['logits_sha256'][:12]}", flush=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out} (edgekv {result['edgekv']}, library {result['library']}, {result['simd']})")


def compare(a_path: Path, b_path: Path) -> int:
    a, b = json.loads(a_path.read_text()), json.loads(b_path.read_text())
    print(f"A: {a_path}: {a['library']} ({a['simd']})\nB: {b_path}: {b['library']} ({b['simd']})")
    bad = 0
    for key in sorted(set(a["runs"]) | set(b["runs"])):
        ra, rb = a["runs"].get(key), b["runs"].get(key)
        if ra is None or rb is None:
            print(f"{key}: only in {'B' if ra is None else 'A'}")
            bad += 1
            continue
        diffs = [part for part in ("generate", "score", "logits_sha256") if ra[part] != rb[part]]
        n_tok = sum(len(g["context_tokens"]) for g in ra["generate"])
        n_lp = sum(len(s["values"]) for s in ra["score"])
        print(f"{key:>26}: {'DIFFERENT ' + ', '.join(diffs) if diffs else 'identical'} "
              f"({n_tok} context tokens, {n_lp} log-probs, logits {ra['logits_sha256'][:12]})")
        bad += bool(diffs)
    print(f"{len(set(a['runs']) | set(b['runs'])) - bad} identical, {bad} different")
    return 1 if bad else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("dump", help="write greedy tokens, score() and logits hashes to a JSON file")
    d.add_argument("out", type=Path)
    d.add_argument("--models", nargs="+", default=MODELS)
    d.add_argument("--policies", nargs="+", default=POLICIES)
    d.add_argument("--tokens", type=int, default=32, help="greedy tokens per prompt (default 32)")
    c = sub.add_parser("compare", help="exit 1 unless two dumps are equal")
    c.add_argument("a", type=Path)
    c.add_argument("b", type=Path)
    args = ap.parse_args()
    if args.cmd == "dump":
        dump(args.out, args.models, args.policies, args.tokens)
        return 0
    return compare(args.a, args.b)


if __name__ == "__main__":
    sys.exit(main())
