"""Structured output: a logits mask that keeps generation inside a JSON schema (llguidance).

llguidance was chosen by measurement (benchmarks/results/grammar_choice.md, docs/decisions.md):
it compiles a schema in about a millisecond, needs no other package, and builds its tokenizer
from the GGUF vocabulary (each token's bytes, as edgekv's Tokenizer has them).

    mask = JSONSchemaMask(model.tokenizer, {"type": "object", ...})
    mask.apply(logits)   # in place: tokens the schema forbids next get -inf
    mask.accept(token)   # the sampled token
    mask.done            # the JSON is complete: only end-of-turn may follow
"""

from __future__ import annotations

import json
import threading
import weakref
from typing import Any

import numpy as np

_tokenizers: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def _llguidance():
    try:
        import llguidance
        import llguidance.numpy
    except ImportError as e:
        raise ImportError(f"structured output (json_schema) needs llguidance: pip install 'edgekv[serve]' ({e})") \
            from None
    return llguidance


def _ll_tokenizer(tok):
    """llguidance's tokenizer for an edgekv Tokenizer, built once (a second or so on 151k tokens)."""
    ll = _llguidance()
    with _lock:
        got = _tokenizers.get(tok)
        if got is None:
            pieces = [tok.token_to_piece(i, special=True) for i in range(tok.vocab_size)]
            eot = sorted(tok.eot_ids) or [tok.eos_id]

            class _Vocab:  # what llguidance.TokenizerWrapper reads
                eos_token_id = eot[0]
                bos_token_id = tok.bos_id
                tokens = pieces
                special_token_ids = sorted(tok.control_ids)

                def __call__(self, s):
                    s = s.decode("utf-8", "replace") if isinstance(s, bytes) else s
                    return tok.encode(s, add_bos=False, parse_special=False)

            got = ll.LLTokenizer(ll.TokenizerWrapper(_Vocab()), n_vocab=tok.vocab_size, eos_token=eot)
            _tokenizers[tok] = got
        return got


def check_schema(schema: Any) -> dict:
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise ValueError(f"json_schema is not valid JSON: {e}") from None
    if not isinstance(schema, dict):
        raise ValueError(f"json_schema must be a JSON schema object (a dict), got {type(schema).__name__}")
    return schema


class JSONSchemaMask:
    def __init__(self, tokenizer, schema: Any):
        ll = _llguidance()
        schema = check_schema(schema)
        lltok = _ll_tokenizer(tokenizer)
        try:
            grammar = ll.LLMatcher.grammar_from_json_schema(json.dumps(schema))
        except (ValueError, TypeError) as e:
            raise ValueError(f"json_schema: {e}") from None
        is_error, msgs = ll.LLMatcher.validate_grammar_with_warnings(grammar, lltok)
        if is_error:
            raise ValueError(f"json_schema is not usable: {msgs[0] if msgs else 'rejected by llguidance'}")
        self._m = ll.LLMatcher(lltok, grammar)
        if self._m.is_error():
            raise ValueError(f"json_schema is not usable: {self._m.get_error()}")
        self._n = tokenizer.vocab_size
        self._fill = ll.numpy.fill_next_token_bitmask
        self._bits = ll.numpy.allocate_token_bitmask(1, self._n)

    def apply(self, logits: np.ndarray) -> None:
        self._fill(self._m, self._bits, 0)
        allowed = np.unpackbits(self._bits[0].view(np.uint8), bitorder="little")[: logits.size].view(bool)
        np.putmask(logits, ~allowed, -np.inf)

    def accept(self, token: int) -> None:
        if not self._m.consume_token(int(token)):
            raise RuntimeError(f"structured output: token {token} broke the grammar: {self._m.get_error()}")

    @property
    def done(self) -> bool:
        return self._m.is_stopped()
