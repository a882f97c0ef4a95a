"""Which token-mask library edgekv uses for structured output: llguidance, xgrammar or outlines-core.

For each library: its tokenizer is built from the GGUF vocabulary (edgekv's Tokenizer: every
token's bytes, the end-of-turn ids, control tokens marked special), each JSON schema is compiled,
then a valid instance of the schema (its Qwen tokens, then end-of-turn) is walked token by token:
at each step the library computes the next-token mask into a bool array over the vocabulary
(what the sampler needs), the instance's token must be allowed, and the library consumes it.
Reported: tokenizer build time, compile time per schema, and the mask time per token (median, p95)
on Qwen2.5-Coder-0.5B's 151,936-token vocabulary (masking the logits included); whether every
instance token was allowed; whether an aarch64 wheel of that version is on the package index
(`pip download --platform ... --only-binary=:all:`); what the package requires. Then, for the
chosen library (llguidance, through Model.generate's json_schema=), decode time per token with
and without the mask on the same model and prompts, in the same run.

    python benchmarks/grammar_choice.py                 # needs llguidance, xgrammar, outlines-core
    python benchmarks/grammar_choice.py --model qwen2.5-coder-0.5b --repeats 5
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import REPO, command_line, machine, machine_line

sys.path.insert(0, str(REPO / "python"))
from edgekv import registry  # noqa: E402
from edgekv.tokenizer import Tokenizer  # noqa: E402

OUT = REPO / "benchmarks" / "results"

# (schema, a valid instance): nested objects, arrays, enums, numbers, free strings
CASES = [
    ({"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
      "required": ["name", "age"]},
     {"name": "Ada Lovelace", "age": 36}),
    ({"type": "object", "properties": {
        "city": {"type": "string"}, "country": {"type": "string"},
        "population": {"type": "integer", "minimum": 0}, "capital": {"type": "boolean"},
        "coords": {"type": "array", "items": {"type": "number"}, "minItems": 2, "maxItems": 2}},
      "required": ["city", "country", "population", "capital", "coords"]},
     {"city": "Paris", "country": "France", "population": 2102650, "capital": True, "coords": [48.8566, 2.3522]}),
    ({"type": "object", "properties": {
        "sentiment": {"enum": ["positive", "negative", "neutral"]},
        "confidence": {"type": "number"},
        "keywords": {"type": "array", "items": {"type": "string"}}},
      "required": ["sentiment", "confidence", "keywords"]},
     {"sentiment": "positive", "confidence": 0.93, "keywords": ["fast", "cheap", "reliable"]}),
    ({"type": "object", "properties": {
        "function": {"type": "string"}, "arguments": {"type": "object", "properties": {
            "path": {"type": "string"}, "recursive": {"type": "boolean"}, "depth": {"type": "integer"}},
            "required": ["path", "recursive", "depth"]}},
      "required": ["function", "arguments"]},
     {"function": "list_files", "arguments": {"path": "/home/user/src", "recursive": False, "depth": 3}}),
    ({"type": "array", "items": {"type": "object", "properties": {
        "id": {"type": "integer"}, "title": {"type": "string"}, "done": {"type": "boolean"}},
        "required": ["id", "title", "done"]}},
     [{"id": 1, "title": "write the server", "done": True}, {"id": 2, "title": "measure grammars", "done": False},
      {"id": 3, "title": "document it", "done": False}]),
]


def vocab(tok: Tokenizer):
    """Every token's bytes (control tokens: their text, marked special), and the end-of-turn ids."""
    n = tok.vocab_size
    pieces = [tok.token_to_piece(i, special=True) for i in range(n)]
    special = sorted(tok.control_ids)
    return pieces, special, sorted(tok.eot_ids)


def unpack(bitmask: np.ndarray, n: int) -> np.ndarray:
    """A little-endian int32 bitmask as a bool array over n tokens."""
    return np.unpackbits(bitmask.view(np.uint8), bitorder="little")[:n].astype(bool)


class LLGuidance:
    name = "llguidance"

    def __init__(self, pieces, special, eot, n, encode):
        import llguidance
        import llguidance.numpy as lln

        self.ll, self.lln, self.n = llguidance, lln, n

        class G:  # what llguidance.TokenizerWrapper reads
            eos_token_id = eot[0]
            bos_token_id = None
            tokens = pieces
            special_token_ids = special

            def __call__(self, s):  # llguidance tokenizes some lexemes itself
                return encode(s.decode("utf-8", "replace") if isinstance(s, bytes) else s)

        self.tok = llguidance.LLTokenizer(llguidance.TokenizerWrapper(G()), n_vocab=n, eos_token=eot)
        self.bits = lln.allocate_token_bitmask(1, n)

    def compile(self, schema):
        g = self.ll.LLMatcher.grammar_from_json_schema(json.dumps(schema))
        m = self.ll.LLMatcher(self.tok, g)
        if m.is_error():
            raise RuntimeError(m.get_error())
        return m

    def mask(self, m) -> np.ndarray:
        self.lln.fill_next_token_bitmask(m, self.bits, 0)
        return unpack(self.bits[0], self.n)

    def accept(self, m, t) -> bool:
        return m.consume_token(t)

    def version(self):
        import importlib.metadata as md
        return md.version("llguidance")


class XGrammar:
    name = "xgrammar"

    def __init__(self, pieces, special, eot, n, encode):
        import xgrammar as xgr

        self.xgr, self.n = xgr, n
        sp = set(special)
        # an empty string marks a special token for xgrammar: it never matches text
        enc = [b"" if i in sp else p for i, p in enumerate(pieces)]
        info = xgr.TokenizerInfo(enc, xgr.VocabType.RAW, vocab_size=n, stop_token_ids=eot)
        self.compiler = xgr.GrammarCompiler(info, max_threads=1)
        self.bits = np.full((1, (n + 31) // 32), -1, np.int32)

    def compile(self, schema):
        return self.xgr.GrammarMatcher(self.compiler.compile_json_schema(json.dumps(schema)))

    def mask(self, m) -> np.ndarray:
        m.fill_next_token_bitmask(self.bits, 0)
        return unpack(self.bits[0], self.n)

    def accept(self, m, t) -> bool:
        return m.accept_token(t)

    def version(self):
        import importlib.metadata as md
        return md.version("xgrammar")


class OutlinesCore:
    name = "outlines-core"

    def __init__(self, pieces, special, eot, n, encode):
        import outlines_core as oc
        from outlines_core.json_schema import build_regex_from_schema

        self.oc, self.regex, self.n = oc, build_regex_from_schema, n
        sp = set(special) | set(eot)
        m: dict = {}
        for i, p in enumerate(pieces):
            if i not in sp and p:
                m.setdefault(p, []).append(i)
        self.vocab = oc.Vocabulary(eot[0], m)
        self.eot = eot
        self.bits = np.zeros((n + 31) // 32, np.int32)

    def compile(self, schema):
        return self.oc.Guide(self.oc.Index(self.regex(json.dumps(schema)), self.vocab))

    def mask(self, g) -> np.ndarray:
        g.write_mask_into(self.bits.ctypes.data, self.bits.size, 4)
        return unpack(self.bits, self.n)

    def accept(self, g, t) -> bool:
        if t in self.eot:
            return g.is_finished()
        g.advance(t)
        return True

    def version(self):
        import importlib.metadata as md
        return md.version("outlines-core")


def aarch64_wheel(dist: str, version: str):
    """The aarch64 Linux wheel pip finds for dist==version (CPython 3.11), or None."""
    plats = ["manylinux2014_aarch64", "manylinux_2_28_aarch64", "manylinux_2_31_aarch64", "manylinux_2_34_aarch64"]
    with tempfile.TemporaryDirectory() as d:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
               "--python-version", "311", "-d", d, f"{dist}=={version}"]
        for p in plats:
            cmd += ["--platform", p]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        names = [p.name for p in Path(d).iterdir()]
        return names[0] if r.returncode == 0 and names else None


def decode_cost(model_name: str, prompts: int, tokens: int) -> dict:
    """Decode ms per token, Model.chat with and without json_schema= (llguidance), same prompts; each
    the fastest of 3 runs, alternating, so that other load on the machine counts less."""
    from edgekv import load

    m = load(model_name, progress=False)
    rows = []
    for schema, instance in CASES[:prompts]:
        msgs = [{"role": "user", "content": "Reply with JSON like this one, with other values: "
                 + json.dumps(instance)}]
        row = {"free": np.inf, "json_schema": np.inf}
        for _ in range(3):
            for label, kw in (("free", {}), ("json_schema", {"json_schema": schema})):
                m.chat(msgs, max_tokens=tokens, temperature=0, **kw)
                st = m.last_stats
                row[label] = min(row[label], st.decode_s * 1e3 / max(1, st.generated_tokens - 1))
        rows.append(row)
    free = float(np.median([r["free"] for r in rows]))
    masked = float(np.median([r["json_schema"] for r in rows]))
    m.close()
    return {"model": model_name, "threads": m.threads, "prompts": prompts, "max_tokens": tokens,
            "decode_ms_per_token_free": round(free, 2), "decode_ms_per_token_json_schema": round(masked, 2),
            "overhead_pct": round(100 * (masked / free - 1), 1)}


LIBS = {"llguidance": LLGuidance, "xgrammar": XGrammar, "outlines-core": OutlinesCore}


def run(lib_cls, tok: Tokenizer, pieces, special, eot, repeats: int) -> dict:
    n = tok.vocab_size
    t0 = time.perf_counter()
    lib = lib_cls(pieces, special, eot, n, lambda s: tok.encode(s, add_bos=False, parse_special=False))
    build_s = time.perf_counter() - t0
    compile_ms, mask_ms, all_allowed, steps = [], [], True, 0
    logits = np.zeros(n, np.float32)
    for schema, instance in CASES:
        ids = tok.encode(json.dumps(instance), add_bos=False, parse_special=False) + [eot[0]]
        for r in range(repeats):
            t0 = time.perf_counter()
            m = lib.compile(schema)
            c = time.perf_counter() - t0
            if r == 0:
                compile_ms.append(1e3 * c)
            for t in ids:
                t0 = time.perf_counter()
                allowed = lib.mask(m)
                np.putmask(logits, ~allowed, -np.inf)  # what the sampler gets
                mask_ms.append(1e3 * (time.perf_counter() - t0))
                ok = bool(allowed[t]) and lib.accept(m, t)
                all_allowed &= ok
                steps += 1
                if not ok:
                    break
    mm = np.array(mask_ms)
    dist = {"llguidance": "llguidance", "xgrammar": "xgrammar", "outlines-core": "outlines-core"}[lib.name]
    needs = [r.split(";")[0].strip() for r in md.requires(dist) or [] if "extra ==" not in r]
    return {"library": lib.name, "version": lib.version(), "requires": needs,
            "aarch64_wheel": aarch64_wheel(dist, lib.version()), "tokenizer_build_s": round(build_s, 3),
            "compile_ms_per_schema": [round(x, 1) for x in compile_ms],
            "mask_ms_median": round(float(np.median(mm)), 4), "mask_ms_p95": round(float(np.percentile(mm, 95)), 4),
            "mask_ms_max": round(float(mm.max()), 3), "steps": steps, "every_instance_token_allowed": all_allowed}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b", help="a registry name or .gguf (its vocabulary)")
    ap.add_argument("--repeats", type=int, default=3, help="walks of each instance (default: %(default)s)")
    ap.add_argument("--libs", default=",".join(LIBS), help="comma-separated (default: all three)")
    ap.add_argument("--decode-tokens", type=int, default=48, help="tokens per reply in the decode comparison")
    args = ap.parse_args(argv)
    tok = Tokenizer.from_gguf(registry.resolve(args.model, progress=False))
    pieces, special, eot = vocab(tok)
    rows = [run(LIBS[name], tok, pieces, special, eot, args.repeats) for name in args.libs.split(",")]
    dec = decode_cost(args.model, len(CASES), args.decode_tokens)
    info = machine(command_line("grammar_choice.py", argv))
    result = {"model": args.model, "vocab_size": tok.vocab_size, "schemas": len(CASES), "repeats": args.repeats,
              "results": rows, "decode": dec, "machine": info}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "grammar_choice.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# Structured output: token-mask libraries on Qwen's vocabulary",
        "",
        f"{args.model}, {tok.vocab_size} tokens; {len(CASES)} JSON schemas, each valid instance walked "
        f"{args.repeats}x token by token (mask into a bool array over the vocabulary, check the token, consume).",
        "",
        "| library | version | tokenizer build (s) | compile per schema (ms) | mask per token median (ms) "
        "| p95 (ms) | max (ms) | every instance token allowed | aarch64 wheel | requires |",
        "|---|---|---:|---|---:|---:|---:|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['library']} | {r['version']} | {r['tokenizer_build_s']} | "
                     f"{', '.join(str(x) for x in r['compile_ms_per_schema'])} | {r['mask_ms_median']} | "
                     f"{r['mask_ms_p95']} | {r['mask_ms_max']} | {r['every_instance_token_allowed']} | "
                     f"{r['aarch64_wheel'] or 'none found'} | "
                     f"{', '.join(r['requires']) or 'nothing'} |")
    lines += ["", f"Decode with the chosen mask (llguidance via `Model.chat(json_schema=...)`), {dec['model']}, "
              f"{dec['threads']} threads, {dec['prompts']} prompts, greedy, up to {dec['max_tokens']} tokens, "
              f"median over prompts of the fastest of 3 runs, ms per token: {dec['decode_ms_per_token_free']} free, "
              f"{dec['decode_ms_per_token_json_schema']} with json_schema ({dec['overhead_pct']:+}%).",
              "", f"Machine: {machine_line(info)}", ""]
    (OUT / "grammar_choice.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
