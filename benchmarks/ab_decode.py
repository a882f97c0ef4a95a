#!/usr/bin/env python
"""Decode speed of two edgekv builds in the same run: this checkout against another commit (or
another checkout), for KV policies and context lengths.

Each side is a persistent child process that imports its own checkout's ``python/`` package with
``EDGEKV_LIB`` set to its own ``build/libedgekv.so``. Both load the same GGUF, prefill the same
WikiText-2 ids (``../shared/data/wikitext2_valid.txt``, this checkout's tokenizer) under the policy,
then take turns: a block of ``--block`` greedy decode steps on one side, then the other (the order
alternates block by block), each block followed by a truncation back to the prefill so every
block decodes at the same context length. Between blocks the parent sleeps ``--gap-ms`` so that
one side's spinning worker threads do not overlap the other's timed steps.

Reported per (policy, context): each side's median ms/token over all steps, and the median over
block pairs of the ratio B/A (adjacent blocks, which cancels slow drifts of a shared machine) with
a bootstrap 95% interval over block pairs.

    python benchmarks/ab_decode.py --b-commit 0dbe543 --kv int4 --ctx 1024 4096 8192
    python benchmarks/ab_decode.py --b-dir /path/to/other/checkout --kv int4 k4v3

``--b-commit`` checks the commit out into a temporary worktree and builds it (Release). Writes
benchmarks/results/ab_decode.json and .md (``--name`` changes the file stem).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import bootstrap, ci95, command_line, machine, machine_line

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
DATA = REPO.parent / "shared" / "data" / "wikitext2_valid.txt"


# ---- the child: one edgekv build, driven over stdin/stdout ----------------------------------------

def child(via: str) -> None:
    """Drives its checkout through public API only: sessions (per-step times; ABI 9 and later), or
    Model.generate and its last_stats (one mean per block; every tree since the cache reuse of issue 17)."""
    import warnings

    import edgekv

    if via == "session" and not hasattr(edgekv.Model, "new_session"):
        raise SystemExit(f"{edgekv.__file__}: this edgekv has no Session API (ABI < 9); use --via generate")
    m = s = ids = logits = kv = None
    out = sys.stdout
    sys.stdout = sys.stderr  # only the protocol goes to the parent
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd["op"]
        if op == "load":
            if m is not None:
                m.close()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # ctx beyond the training context
                # generate: the policy given at load, so that every call has the same policy object
                # (a prompt's cache is reused only under the very policy it was stored with)
                m = edgekv.load(cmd["path"], threads=cmd["threads"], ctx=cmd["ctx"], progress=False,
                                **({"kv": cmd["kv"]} if via == "generate" else {}))
            kv = cmd["kv"]
            s = m.new_session(kv=kv) if via == "session" else None
            reply = {"lib": str(edgekv._native.LIB_PATH), "edgekv": str(edgekv.__file__)}
        elif op == "prefill" and via == "generate":
            ids = [int(i) for i in cmd["ids"]]
            t0 = time.perf_counter()
            m.generate(ids, max_tokens=1, temperature=0)
            reply = {"s": time.perf_counter() - t0}
        elif op == "steps" and via == "generate":
            # the same prompt again: its cache is reused exactly (0 tokens prefilled), then n greedy steps
            text = m.generate(ids, max_tokens=cmd["n"] + 1, temperature=0)
            st = m.last_stats
            if st.prefilled_tokens != 0 or st.generated_tokens != cmd["n"] + 1:
                raise SystemExit(f"generate re-ran {st.prefilled_tokens} prompt tokens / made "
                                 f"{st.generated_tokens} of {cmd['n'] + 1}: not a clean decode block")
            reply = {"times": [st.decode_ms_per_token / 1000], "tokens": text}
        elif op == "prefill":
            ids = np.asarray(cmd["ids"], np.int32)
            s.truncate(0)
            t0 = time.perf_counter()
            logits = s.eval(ids)
            reply = {"s": time.perf_counter() - t0, "argmax": int(logits.argmax())}
        elif op == "steps":
            n0, times, toks = len(s.tokens), [], []
            tok = int(logits.argmax())
            for _ in range(cmd["n"]):
                t0 = time.perf_counter()
                step = s.eval([tok], defer=True)
                times.append(time.perf_counter() - t0)
                tok = int(step.argmax())
                toks.append(tok)
            s.truncate(n0 - 1)  # back to the prefill minus its last token, which is re-run for the logits
            logits = s.eval(ids[-1:])
            reply = {"times": times, "tokens": toks}
        elif op == "quit":
            break
        else:
            reply = {"error": f"unknown op {op}"}
        out.write(json.dumps(reply) + "\n")
        out.flush()


class Side:
    def __init__(self, name: str, checkout: Path, via: str):
        lib = checkout / "build" / "libedgekv.so"
        if not lib.is_file():
            raise SystemExit(f"{lib} is missing: build {checkout} first")
        env = dict(os.environ, EDGEKV_LIB=str(lib), PYTHONPATH=str(checkout / "python"))
        self.name, self.checkout = name, checkout
        self.p = subprocess.Popen([sys.executable, __file__, "--_child", "--via", via], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True, env=env, cwd=str(checkout))

    def ask(self, **cmd) -> dict:
        self.p.stdin.write(json.dumps(cmd) + "\n")
        self.p.stdin.flush()
        line = self.p.stdout.readline()
        if not line:
            raise SystemExit(f"side {self.name} ({self.checkout}) exited with {self.p.wait()}")
        reply = json.loads(line)
        if "error" in reply:
            raise SystemExit(f"side {self.name}: {reply['error']}")
        return reply

    def close(self) -> None:
        try:
            self.ask(op="quit")
        except (SystemExit, BrokenPipeError, json.JSONDecodeError):
            pass
        self.p.wait(timeout=30)


def build_commit(commit: str, where: Path) -> Path:
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(where), commit], check=True,
                   stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "-S", str(where), "-B", str(where / "build"), "-G", "Ninja",
                    "-DCMAKE_BUILD_TYPE=Release"], check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", str(where / "build"), "--target", "edgekv"], check=True,
                   stdout=subprocess.DEVNULL)
    return where


def wikitext_ids(path: str, n: int) -> list[int]:
    sys.path.insert(0, str(REPO / "python"))
    from edgekv.gguf_loader import load_gguf
    from edgekv.tokenizer import Tokenizer

    text = DATA.read_text(encoding="utf-8")[: max(20000, n * 8)]
    ids = Tokenizer.from_fields(load_gguf(path).fields).encode(text, add_bos=False)
    if len(ids) < n:
        raise SystemExit(f"{DATA} gave only {len(ids)} tokens; {n} needed")
    return ids[:n]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--b-commit", help="the other side: this commit, built in a temporary worktree")
    ap.add_argument("--b-dir", type=Path, help="the other side: a built checkout")
    ap.add_argument("--a-dir", type=Path, default=REPO, help="side A (default: this checkout)")
    ap.add_argument("--model", default="smollm2-135m", help="registry name or .gguf path")
    ap.add_argument("--kv", nargs="+", default=["int4"])
    ap.add_argument("--ctx", type=int, nargs="+", default=[1024, 4096, 8192])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--blocks", type=int, default=12, help="decode blocks per side and (policy, context)")
    ap.add_argument("--block", type=int, default=16, help="greedy steps per block")
    ap.add_argument("--gap-ms", type=float, default=20.0)
    ap.add_argument("--via", choices=("session", "generate"), default="session",
                    help="session: per-step times (both sides ABI >= 9); generate: Model.generate's "
                         "decode ms/token per block (any tree, e.g. before sessions)")
    ap.add_argument("--name", default="ab_decode")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--_child", dest="child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(args.via)
    if (args.b_commit is None) == (args.b_dir is None):
        ap.error("give exactly one of --b-commit and --b-dir")

    sys.path.insert(0, str(REPO / "python"))
    from edgekv.registry import resolve

    path = str(resolve(args.model))
    tmp = None
    try:
        if args.b_commit:
            tmp = Path(tempfile.mkdtemp(prefix="edgekv-ab-"))
            b_dir = build_commit(args.b_commit, tmp / "b")
        else:
            b_dir = args.b_dir
        sides = [Side("A", args.a_dir.resolve(), args.via), Side("B", b_dir.resolve(), args.via)]
        commits = [subprocess.run(["git", "-C", str(s.checkout), "rev-parse", "HEAD"], capture_output=True,
                                  text=True).stdout.strip() for s in sides]
        ids_all = wikitext_ids(path, max(args.ctx))
        rows = []
        for kv in args.kv:
            for n in args.ctx:
                for s in sides:
                    s.ask(op="load", path=path, ctx=n + args.block + 8, threads=args.threads, kv=kv)
                    s.ask(op="prefill", ids=ids_all[:n])
                    s.ask(op="steps", n=4)  # warm-up
                times = {s.name: [] for s in sides}
                ratios, same_tokens = [], True
                for b in range(args.blocks):
                    order = sides if b % 2 == 0 else sides[::-1]
                    block = {}
                    for s in order:
                        time.sleep(args.gap_ms / 1000)
                        reply = s.ask(op="steps", n=args.block)
                        block[s.name], block[s.name + "_tokens"] = reply["times"], reply["tokens"]
                        times[s.name] += block[s.name]
                    same_tokens &= block["A_tokens"] == block["B_tokens"]
                    ratios.append(np.median(block["B"]) / np.median(block["A"]))
                ratios = np.array(ratios)
                boot = bootstrap(lambda idx: np.median(ratios[idx], axis=1), len(ratios))
                row = {"kv": kv, "ctx": n, "ms_a": 1e3 * float(np.median(times["A"])),
                       "ms_b": 1e3 * float(np.median(times["B"])), "ratio_b_over_a": float(np.median(ratios)),
                       "ratio_ci95": ci95(boot), "steps_per_side": len(times["A"]),
                       "same_greedy_tokens": bool(same_tokens)}
                rows.append(row)
                print(f"{kv:>8} ctx {n:>5}: A {row['ms_a']:.3f} ms  B {row['ms_b']:.3f} ms  "
                      f"B/A {row['ratio_b_over_a']:.3f} [{row['ratio_ci95'][0]:.3f}, {row['ratio_ci95'][1]:.3f}]"
                      f"{'' if same_tokens else '  (greedy tokens differ)'}",
                      flush=True)
        for s in sides:
            s.close()
    finally:
        if tmp is not None:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tmp / "b")],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            shutil.rmtree(tmp, ignore_errors=True)

    info = machine(command_line("ab_decode.py", argv))
    res = {"machine": info, "model": args.model, "a": {"dir": str(args.a_dir), "commit": commits[0]},
           "b": {"dir": str(args.b_dir) if args.b_dir else None, "commit": commits[1]},
           "threads": args.threads, "via": args.via, "blocks": args.blocks, "block": args.block, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(res, indent=2) + "\n")
    lines = [f"# Decode ms/token: two edgekv builds in one run ({args.model})", "",
             f"A = {commits[0][:12]} ({args.a_dir}), B = {commits[1][:12]}. {args.threads} threads; "
             f"{args.blocks} blocks of {args.block} greedy steps per side, alternating; "
             + ("per-step times through sessions" if args.via == "session" else
                "per-block mean ms/token of Model.generate (its last_stats; the prompt's cache reused, 0 tokens re-run)")
             + "; medians; B/A is the median "
             "of adjacent block-pair ratios with a bootstrap 95% interval. \"Same tokens\": both sides decoded the "
             "same greedy tokens in every block.", "",
             "| KV | context | A ms/token | B ms/token | B/A [95% CI] | same tokens |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['kv']} | {r['ctx']} | {r['ms_a']:.3f} | {r['ms_b']:.3f} | {r['ratio_b_over_a']:.3f} "
              f"[{r['ratio_ci95'][0]:.3f}, {r['ratio_ci95'][1]:.3f}] | {'yes' if r['same_greedy_tokens'] else 'no'} |"
              for r in rows]
    lines += ["", f"Machine: {machine_line(info)}", ""]
    (args.out / f"{args.name}.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
