"""Build the prior token-frequency table behind the rarity feature.

    python -m controller.rarity [--model smollm2-135m]

Counts every token id of the controller's training text (the WikiText-2 training
articles and GSM8K training problems, never HellaSwag and never the held-out
WikiText-2 articles; see controller/corpus.py) with the model's own tokenizer and
writes python/edgekv/data/rarity_<model>.npy (int32 counts, one per token id)
and rarity_<model>.json (tokenizer fingerprint, corpus, totals).
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
from tqdm import tqdm

from controller import corpus
from controller.common import load_model, model_slug
from edgekv.controller import DATA_DIR, vocab_fingerprint


def count_tokens(tokenizer, texts) -> np.ndarray:
    counts = np.zeros(tokenizer.vocab_size, np.int64)
    for _, text in tqdm(texts, desc="rarity: tokenizing", unit="doc", file=sys.stderr):
        ids = np.asarray(tokenizer.encode(text, add_bos=False, parse_special=False), np.int64)
        counts += np.bincount(ids, minlength=tokenizer.vocab_size)
    return counts


def build(model_name: str) -> None:
    from edgekv.tokenizer import Tokenizer
    from edgekv import registry

    path = load_model(model_name, tokenizer_only=True)
    tok = Tokenizer.from_gguf(path)
    texts = corpus.training_texts()
    counts = count_tokens(tok, texts)
    slug = model_slug(model_name)
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    np.save(DATA_DIR / f"rarity_{slug}.npy", counts.astype(np.int32))
    meta = {
        "model": model_name,
        "vocab_size": int(tok.vocab_size),
        "vocab_sha256": vocab_fingerprint(tok),
        "corpus": "WikiText-2 validation, training articles (index % 4 != 3), + GSM8K train (first 500)",
        "documents": len(texts),
        "tokens": int(counts.sum()),
        "distinct_tokens": int((counts > 0).sum()),
    }
    (DATA_DIR / f"rarity_{slug}.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(f"rarity_{slug}: {meta['tokens']} tokens, {meta['distinct_tokens']} distinct", file=sys.stderr)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m", help="registry name or GGUF path")
    args = ap.parse_args(argv)
    build(args.model)


if __name__ == "__main__":
    main()
