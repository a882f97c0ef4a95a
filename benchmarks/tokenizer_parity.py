#!/usr/bin/env python
"""Token-id parity of edgekv.tokenizer with llama.cpp (through llama-cpp-python).

For each model (SmolLM2-135M by default, plus every Qwen2.5*.gguf already in the model cache):

* WikiText-2 validation (``../shared/data/wikitext2_valid.txt``) tokenized the way llama.cpp's
  ``perplexity`` does it: the whole file as ONE string, BOS as the GGUF says, special tokens not
  parsed. Also with special-token parsing on, and line by line.
* HellaSwag (``../shared/data/hellaswag_dev.txt``, first 200 tasks by default, 6-line format),
  the way llama.cpp's ``perplexity --hellaswag`` does it: the context, each ``" " + ending`` and
  each ``context + " " + ending``.
* A fuzz set of random strings (ASCII, whitespace, contractions, digits, random code points up to
  U+10FFFF, special-token texts), with special parsing on and off.
* SmolLM2's vocabulary under other ``tokenizer.ggml.pre`` names (a vocab-only GGUF copy with the
  name changed), to check every pre-tokenizer family against llama.cpp: wikitext lines + fuzz.

Writes ``benchmarks/results/tokenizer_parity.json`` and ``.md``. Exit status 1 if any mismatch.

    PYTHONPATH=python /work/venv/bin/python benchmarks/tokenizer_parity.py
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import random
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "python"))

from common import read_hellaswag  # noqa: E402  (benchmarks/, the script's own folder)
from edgekv.tokenizer import Tokenizer  # noqa: E402

DATA_DIR = REPO_ROOT.parent / "shared" / "data"
WIKITEXT = DATA_DIR / "wikitext2_valid.txt"
HELLASWAG = DATA_DIR / "hellaswag_dev.txt"
RESULTS = REPO_ROOT / "benchmarks" / "results"
CACHE = pathlib.Path(os.environ.get("EDGEKV_CACHE", pathlib.Path.home() / ".cache" / "edgekv" / "models"))
PRE_VARIANTS = ["gpt-2", "qwen2", "default", "llama-bpe", "stablelm2", "dbrx"]


def load_llama(path: pathlib.Path):
    import llama_cpp

    return llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)


class Tally:
    """Counts for one group of texts; keeps the first few mismatches."""

    def __init__(self, name: str, how: str) -> None:
        self.name, self.how = name, how
        self.texts = self.tokens = self.ref_tokens = self.mismatches = 0
        self.examples: List[Dict[str, Any]] = []
        self.seconds_ours = self.seconds_ref = 0.0

    def compare(self, tok: Tokenizer, llama, text: str, add_bos: bool, parse_special: bool) -> None:
        t0 = time.perf_counter()
        ours = tok.encode(text, add_bos=None if add_bos else False, parse_special=parse_special)
        t1 = time.perf_counter()
        ref = llama.tokenize(text.encode("utf-8"), add_bos=add_bos, special=parse_special)
        t2 = time.perf_counter()
        self.seconds_ours += t1 - t0
        self.seconds_ref += t2 - t1
        self.texts += 1
        self.tokens += len(ours)
        self.ref_tokens += len(ref)
        if ours != ref:
            self.mismatches += 1
            if len(self.examples) < 5:
                i = next((k for k, (a, b) in enumerate(zip(ours, ref)) if a != b), min(len(ours), len(ref)))
                self.examples.append({
                    "text": text[:200], "parse_special": parse_special, "first_diff_at": i,
                    "ours": ours[max(0, i - 3):i + 5], "llama_cpp": ref[max(0, i - 3):i + 5],
                })

    def as_dict(self) -> Dict[str, Any]:
        return {
            "group": self.name, "how": self.how, "texts": self.texts, "tokens": self.tokens,
            "llama_cpp_tokens": self.ref_tokens, "mismatches": self.mismatches,
            "seconds_edgekv": round(self.seconds_ours, 3), "seconds_llama_cpp": round(self.seconds_ref, 3),
            "examples": self.examples,
        }


def hellaswag_tasks(n: int) -> List[Tuple[str, List[str]]]:
    return [(ctx, endings) for ctx, _, endings in read_hellaswag(HELLASWAG, n)]


def fuzz_texts(n: int, specials: Sequence[str], seed: int = 0) -> List[str]:
    rng = random.Random(seed)
    pool = list(" \t\n\r\x0b\x0c'sStTrReEvVmMlLdD0123456789abcXYZ.,!?$+<=>^~|`-_") + [
        "\u00a0", "\u2003", "\u3000", "\u0085", "\u2028", "\u200b", "\u200d", "\u00ad", "\u1680",
        "\x1c", "\x1f", "  ", "\n\n", "'ll", "'re", "123", "é", "日本", "🎉", "👍🏽"]

    def rand_cp() -> str:
        while True:
            c = rng.choice([rng.randint(0x80, 0x2FFF), rng.randint(0x3000, 0xFFFF),
                            rng.randint(0x10000, 0x1FFFF), rng.randint(0x20000, 0x10FFFF)])
            if not 0xD800 <= c <= 0xDFFF:
                return chr(c)

    out = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(1, 16)):
            r = rng.random()
            if r < 0.55:
                parts.append(rng.choice(pool))
            elif r < 0.95:
                parts.append(rand_cp())
            elif specials:
                parts.append(rng.choice(specials))
        out.append("".join(parts))
    return out


def write_vocab_only_gguf(src: pathlib.Path, dest: pathlib.Path, overrides: Dict[str, Any]) -> Dict[str, Any]:
    """Copy ``src``'s metadata (no tensors) to ``dest`` with some values replaced; return the
    tokenizer fields of the copy."""
    import gguf

    reader = gguf.GGUFReader(str(src))
    w = gguf.GGUFWriter(str(dest), reader.fields["general.architecture"].contents())
    fields = {}
    for key, f in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        value = overrides.get(key, f.contents())
        if key.startswith("tokenizer."):
            fields[key] = value
        if f.types[0] == gguf.GGUFValueType.ARRAY:
            w.add_key_value(key, value, f.types[0], sub_type=f.types[-1])
        else:
            w.add_key_value(key, value, f.types[0])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return fields


def run_model(path: pathlib.Path, args) -> Dict[str, Any]:
    t0 = time.perf_counter()
    tok = Tokenizer.from_gguf(path)
    load_s = time.perf_counter() - t0
    llama = load_llama(path)
    print(f"== {path.name}: pre={tok.pre} vocab={tok.vocab_size} (loaded in {load_s:.1f}s)", flush=True)
    groups: List[Tally] = []

    wiki = WIKITEXT.read_text(encoding="utf-8")
    g = Tally("wikitext2_valid whole file", "the whole file as one string, BOS per GGUF, parse_special=False "
              "(llama.cpp perplexity)")
    g.compare(tok, llama, wiki, add_bos=True, parse_special=False)
    groups.append(g)
    g = Tally("wikitext2_valid whole file, specials parsed", "one string, no BOS, parse_special=True")
    g.compare(tok, llama, wiki, add_bos=False, parse_special=True)
    groups.append(g)
    g = Tally("wikitext2_valid lines", "each line (with its newline), no BOS, parse_special=True")
    for line in wiki.splitlines(keepends=True):
        g.compare(tok, llama, line, add_bos=False, parse_special=True)
    groups.append(g)

    tasks = hellaswag_tasks(args.hellaswag_tasks)
    g = Tally(f"hellaswag_dev first {len(tasks)} tasks",
              "context, each ' '+ending, each context+' '+ending; BOS per GGUF, parse_special=False "
              "(llama.cpp hellaswag)")
    for ctx, endings in tasks:
        g.compare(tok, llama, ctx, add_bos=True, parse_special=False)
        for e in endings:
            g.compare(tok, llama, " " + e, add_bos=False, parse_special=False)
            g.compare(tok, llama, ctx + " " + e, add_bos=True, parse_special=False)
    groups.append(g)

    specials = [tok.tokens[i] for i in sorted(tok.special_ids)][:40]
    g = Tally(f"fuzz {args.fuzz} random strings", "random ASCII/whitespace/code points/special-token "
              "texts, parse_special True and False")
    for text in fuzz_texts(args.fuzz, specials):
        g.compare(tok, llama, text, add_bos=False, parse_special=True)
        g.compare(tok, llama, text, add_bos=False, parse_special=False)
    groups.append(g)

    for gr in groups:
        print(f"   {gr.name}: texts={gr.texts} tokens={gr.tokens} mismatches={gr.mismatches}", flush=True)
    return {"model": path.name, "path": str(path), "pre": tok.pre, "vocab_size": tok.vocab_size,
            "tokenizer_load_seconds": round(load_s, 2), "groups": [gr.as_dict() for gr in groups],
            "_tok": tok}


def run_pre_variants(src: pathlib.Path, args) -> List[Dict[str, Any]]:
    out = []
    wiki_lines = WIKITEXT.read_text(encoding="utf-8").splitlines(keepends=True)[: args.variant_lines]
    with tempfile.TemporaryDirectory() as tmp:
        for pre in PRE_VARIANTS:
            dest = pathlib.Path(tmp) / f"vocab-{pre}.gguf"
            fields = write_vocab_only_gguf(src, dest, {"tokenizer.ggml.pre": pre})
            tok = Tokenizer.from_fields(fields)
            llama = load_llama(dest)
            g = Tally(f"{src.name} vocabulary with pre={pre!r}",
                      f"first {len(wiki_lines)} wikitext lines + {args.variant_fuzz} fuzz strings, "
                      f"parse_special True and False")
            for text in wiki_lines + fuzz_texts(args.variant_fuzz, [], seed=1):
                g.compare(tok, llama, text, add_bos=False, parse_special=True)
                g.compare(tok, llama, text, add_bos=False, parse_special=False)
            print(f"   pre={pre}: texts={g.texts} tokens={g.tokens} mismatches={g.mismatches}", flush=True)
            d = g.as_dict()
            d["pre"] = pre
            out.append(d)
    return out


def default_models() -> List[pathlib.Path]:
    models: List[pathlib.Path] = []
    try:
        from edgekv import registry

        models.append(pathlib.Path(registry.resolve("smollm2-135m", progress=False)))
    except Exception as exc:
        smol = CACHE / "SmolLM2-135M-Instruct.Q4_1.gguf"
        if smol.is_file():
            models.append(smol)
        else:
            print(f"SmolLM2 not available ({exc})", file=sys.stderr)
    models += sorted(p for p in CACHE.glob("Qwen2.5*.gguf") if p.is_file())
    return models


def write_markdown(report: Dict[str, Any], path: pathlib.Path) -> None:
    lines = [
        "# Tokenizer parity: edgekv.tokenizer vs llama.cpp",
        "",
        f"Reference: llama-cpp-python {report['llama_cpp_version']} (its bundled llama.cpp), "
        f"`Llama(vocab_only=True).tokenize(text, add_bos, special)`.",
        f"Command: `{report['command']}`",
        "",
        "WikiText-2 is tokenized as llama.cpp's `perplexity` does: the whole file as one string "
        "(not in chunks), BOS as the GGUF says, special tokens not parsed. HellaSwag as "
        "llama.cpp's `--hellaswag`: the context, each `\" \" + ending` and each "
        "`context + \" \" + ending`.",
        "",
        f"**Total: {report['total_texts']} texts, {report['total_tokens']} tokens, "
        f"{report['total_mismatches']} mismatches.**",
        "",
    ]
    for m in report["models"]:
        lines += [f"## {m['model']} (pre `{m['pre']}`, vocab {m['vocab_size']})", ""]
        if m.get("same_tokenizer_as"):
            lines += [f"Same tokenizer (identity) as {m['same_tokenizer_as']}.", ""]
        lines += ["| texts | how | compared | tokens | mismatches |", "|---|---|---:|---:|---:|"]
        for g in m["groups"]:
            lines.append(f"| {g['group']} | {g['how']} | {g['texts']} | {g['tokens']} | {g['mismatches']} |")
        lines.append("")
    if report["pre_variants"]:
        lines += ["## Other pre-tokenizers (SmolLM2 vocabulary, `tokenizer.ggml.pre` changed)", "",
                  "| pre | compared | tokens | mismatches |", "|---|---:|---:|---:|"]
        for g in report["pre_variants"]:
            lines.append(f"| `{g['pre']}` | {g['texts']} | {g['tokens']} | {g['mismatches']} |")
        lines.append("")
    examples = [(m["model"], g) for m in report["models"] for g in m["groups"] if g["examples"]]
    examples += [("pre variant", g) for g in report["pre_variants"] if g["examples"]]
    if examples:
        lines += ["## First mismatches", ""]
        for model, g in examples:
            for ex in g["examples"]:
                lines.append(f"- {model} / {g['group']}: `{ex['text']!r}` at {ex['first_diff_at']}: "
                             f"ours {ex['ours']} vs llama.cpp {ex['llama_cpp']}")
        lines.append("")
    path.write_text("\n".join(lines), encoding="utf-8")


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", type=pathlib.Path,
                    help="GGUF file (repeatable); default: SmolLM2 + Qwen2.5*.gguf in the cache")
    ap.add_argument("--hellaswag-tasks", type=int, default=200)
    ap.add_argument("--fuzz", type=int, default=5000, help="random strings per model")
    ap.add_argument("--variant-lines", type=int, default=1000, help="wikitext lines per pre variant")
    ap.add_argument("--variant-fuzz", type=int, default=3000, help="random strings per pre variant")
    ap.add_argument("--no-variants", action="store_true", help="skip the pre-tokenizer variants")
    ap.add_argument("--out", type=pathlib.Path, default=RESULTS)
    args = ap.parse_args(argv)

    try:
        import llama_cpp
    except ImportError:
        print("llama_cpp (llama-cpp-python) is not installed; nothing to compare against", file=sys.stderr)
        return 2
    for f in (WIKITEXT, HELLASWAG):
        if not f.is_file():
            print(f"missing data file {f}", file=sys.stderr)
            return 2

    models = args.model or default_models()
    if not models:
        print("no model files found", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    results = []
    for path in models:
        r = run_model(path, args)
        for prev in results:
            if prev["_tok"].same_as(r["_tok"]):
                r["same_tokenizer_as"] = prev["model"]
                break
        results.append(r)
    variants = []
    if not args.no_variants:
        smol = next((p for p in models if "smollm" in p.name.lower()), None)
        if smol is not None:
            print(f"== pre-tokenizer variants on {smol.name}", flush=True)
            variants = run_pre_variants(smol, args)
    for r in results:
        r.pop("_tok")

    all_groups = [g for m in results for g in m["groups"]] + variants
    report = {
        "command": "PYTHONPATH=python /work/venv/bin/python benchmarks/tokenizer_parity.py"
                   + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip(),
        "llama_cpp_version": getattr(llama_cpp, "__version__", "?"),
        "python": platform.python_version(),
        "seconds": round(time.perf_counter() - t0, 1),
        "total_texts": sum(g["texts"] for g in all_groups),
        "total_tokens": sum(g["tokens"] for g in all_groups),
        "total_mismatches": sum(g["mismatches"] for g in all_groups),
        "models": results,
        "pre_variants": variants,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "tokenizer_parity.json").write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n",
                                                    encoding="utf-8")
    write_markdown(report, args.out / "tokenizer_parity.md")
    print(f"total: {report['total_texts']} texts, {report['total_tokens']} tokens, "
          f"{report['total_mismatches']} mismatches ({report['seconds']}s); "
          f"wrote {args.out / 'tokenizer_parity.json'} and .md")
    return 1 if report["total_mismatches"] else 0


if __name__ == "__main__":
    sys.exit(main())
