"""Which engine is off at the first position of a window? edgekv and llama.cpp against the float64
NumPy reference forward (tests/reference.py, dequantized weights) on the first 4 tokens of
WikiText-2 valid (no BOS): KL(reference || engine) per position.

    PYTHONPATH=python python tools/first_position_check.py qwen2.5-coder-1.5b
"""
import sys, numpy as np
sys.path.insert(0, "python"); sys.path.insert(0, "tests")
import edgekv, llama_cpp
from reference import reference_logits
path = str(edgekv.registry.resolve(sys.argv[1], progress=False))
text = open("/work/shared/data/wikitext2_valid.txt").read()[:400]
llm = llama_cpp.Llama(path, n_ctx=64, n_batch=16, n_ubatch=16, logits_all=True, verbose=False, n_threads=2, type_k=1, type_v=1, flash_attn=False)
ids = llm.tokenize(text.encode(), add_bos=False, special=True)[:4]
llm.eval(ids); ll = np.array(llm.scores[:len(ids)], np.float64)
with edgekv.load(path, threads=2, ctx=64, progress=False) as m:
    ek = m.logits(ids).astype(np.float64)
ref = reference_logits(path, ids)
def lsm(x): x = x - x.max(-1, keepdims=True); return x - np.log(np.exp(x).sum(-1, keepdims=True))
def kl(a, b): la, lb = lsm(a), lsm(b); return (np.exp(la) * (la - lb)).sum(-1)
print("tokens", ids)
print("KL(ref||llama)", np.round(kl(ref, ll), 4))
print("KL(ref||edgekv)", np.round(kl(ref, ek), 4))
print("max|d| ref-llama", np.round(np.abs(ref-ll).max(-1),3), "ref-edgekv", np.round(np.abs(ref-ek).max(-1),3))
