"""Which engine is off at the first position of a window? edgekv and llama.cpp against the float64
NumPy reference forward (tests/reference.py, dequantized weights) on the first 4 tokens of
WikiText-2 valid (no BOS): KL(reference || engine) per position.

    PYTHONPATH=python python tools/first_position_check.py qwen2.5-coder-1.5b
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
for sub in ("tests", "benchmarks"):
    sys.path.insert(0, str(REPO / sub))
sys.path.append(str(REPO / "python"))  # edgekv: installed first, the checkout as a fallback

import edgekv  # noqa: E402
import llama_cpp  # noqa: E402
from parity import DATA, log_softmax64  # noqa: E402
from reference import reference_logits  # noqa: E402


def kl(ref: np.ndarray, test: np.ndarray) -> np.ndarray:
    lp, lq = log_softmax64(ref), log_softmax64(test)
    return (np.exp(lp) * (lp - lq)).sum(-1)


def main() -> None:
    path = str(edgekv.registry.resolve(sys.argv[1] if len(sys.argv) > 1 else "qwen2.5-coder-1.5b", progress=False))
    llm = llama_cpp.Llama(path, n_ctx=64, n_batch=16, n_ubatch=16, logits_all=True, verbose=False, n_threads=2,
                          type_k=1, type_v=1, flash_attn=False)
    ids = llm.tokenize(DATA.read_text()[:400].encode(), add_bos=False, special=True)[:4]
    llm.eval(ids)
    ll = np.array(llm.scores[:len(ids)], np.float64)
    with edgekv.load(path, threads=2, ctx=64, progress=False) as m:
        ek = m.logits(ids).astype(np.float64)
    ref = reference_logits(path, ids)
    print("tokens", ids)
    print("KL(ref || llama.cpp)", np.round(kl(ref, ll), 4))
    print("KL(ref || edgekv)   ", np.round(kl(ref, ek), 4))
    print("max |dlogit| llama.cpp", np.round(np.abs(ref - ll).max(-1), 3), "edgekv", np.round(np.abs(ref - ek).max(-1), 3))


if __name__ == "__main__":
    main()
