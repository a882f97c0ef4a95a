"""Model: one loaded GGUF model, its C state (weights, KV cache, threads) and tokenizer.

A Model owns exactly one C handle and frees it deterministically: ``close()``,
or use it as a context manager. Calls into C are serialized by a lock, so one
Model may be shared between threads (they take turns); two Models run in
parallel.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from . import _native
from .errors import ContextOverflowError, EdgekvError, ModelClosedError, ModelLoadError
from .gguf_loader import LoadedGGUF, load_gguf
from .sampling import Sampler, SamplingParams
from .tokenizer import Tokenizer

ffi, lib = _native.ffi, _native.lib
log = logging.getLogger("edgekv")

DEFAULT_CTX = 4096
DEFAULT_BATCH = 256


def default_threads() -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        n = os.cpu_count() or 1
    return max(1, min(n, 8))


@dataclass
class GenerationStats:
    prompt_tokens: int = 0      # tokens of the prompt
    prefilled_tokens: int = 0   # of those, tokens actually run (the rest reused the cache)
    generated_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    kv_bytes: int = 0
    finish_reason: str = ""     # "stop" (end token or stop string), "length" or "context"

    @property
    def prefill_tok_s(self) -> float:
        return self.prefilled_tokens / self.prefill_s if self.prefill_s > 0 else float("nan")

    @property
    def decode_ms_per_token(self) -> float:
        # The first generated token comes out of prefill; each later one is one decode step.
        steps = self.generated_tokens - 1
        return 1000.0 * self.decode_s / steps if steps > 0 else float("nan")

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(prefill_tok_s=self.prefill_tok_s, decode_ms_per_token=self.decode_ms_per_token)
        return d

    def line(self) -> str:
        return (
            f"prompt {self.prompt_tokens} tok | prefill {self.prefill_tok_s:.1f} tok/s | "
            f"decode {self.decode_ms_per_token:.2f} ms/tok ({self.generated_tokens} tok) | "
            f"KV {self.kv_bytes / 1024:.1f} KiB | {self.finish_reason}"
        )


class Model:
    """A loaded model. Prefer :func:`edgekv.load` to constructing this directly."""

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        threads: int | None = None,
        ctx: int | None = None,
        n_batch: int = DEFAULT_BATCH,
        name: str | None = None,
    ):
        self._handle = ffi.NULL
        self._lock = threading.RLock()
        threads = default_threads() if threads is None else threads
        _check_int("threads", threads, 1, 256)
        _check_int("n_batch", n_batch, 1, 8192)
        g: LoadedGGUF = load_gguf(path)
        hp = g.hparams
        if ctx is None:
            ctx = min(hp["n_ctx_train"], DEFAULT_CTX)
        _check_int("ctx", ctx, 1, 1 << 22)
        if ctx > hp["n_ctx_train"]:
            warnings.warn(
                f"ctx={ctx} exceeds the {hp['n_ctx_train']} tokens this model was trained on; "
                "quality past that point is not guaranteed",
                stacklevel=2,
            )
        self.path = Path(path)
        self.name = name or self.path.name
        self.arch = g.arch
        self.hparams = hp
        self._gguf = g
        try:
            self.tokenizer = Tokenizer.from_fields(g.fields)
        except EdgekvError:
            raise
        except Exception as e:
            raise ModelLoadError(f"{self.path}: cannot build the tokenizer: {e}") from None
        if self.tokenizer.vocab_size != hp["n_vocab"]:
            raise ModelLoadError(
                f"{self.path}: tokenizer has {self.tokenizer.vocab_size} tokens but the model's vocab_size is "
                f"{hp['n_vocab']}"
            )

        cfg = ffi.new("ek_config *")
        for k in ("n_vocab", "n_embd", "n_layer", "n_head", "n_head_kv", "head_dim", "n_ff", "rope_dim"):
            setattr(cfg, k, hp[k])
        cfg.n_ctx = ctx
        cfg.rope_neox = int(g.spec.rope_neox)
        cfg.rope_base = hp["rope_base"]
        cfg.norm_eps = hp["norm_eps"]
        cfg.has_qkv_bias = int(g.spec.qkv_bias)
        cfg.n_threads = threads
        cfg.n_batch = n_batch
        err = ffi.new("char[512]")
        handle = lib.ek_model_create(cfg, err, 512)
        if handle == ffi.NULL:
            raise ModelLoadError(f"{self.path}: {ffi.string(err).decode()}")
        self._handle = handle
        try:
            for w in g.weights:
                ptr = ffi.cast("void *", w.array.ctypes.data)
                rc = lib.ek_model_set_tensor(handle, w.kind, w.layer, w.type, ptr, w.n_in, w.n_out, w.array.nbytes)
                if rc != 0:
                    raise ModelLoadError(f"{self.path}: tensor {w.name!r}: {self._c_error()}")
            if lib.ek_model_finalize(handle) != 0:
                raise ModelLoadError(f"{self.path}: {self._c_error()}")
        except BaseException:
            self.close()
            raise
        self.n_ctx = ctx
        self.threads = threads
        self._tokens: list[int] = []  # what the C context holds, position by position
        self._logits = np.empty(hp["n_vocab"], dtype=np.float32)
        self.last_stats: GenerationStats | None = None

    # ---- lifetime ----------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            if self._handle != ffi.NULL:
                lib.ek_model_free(self._handle)
                self._handle = ffi.NULL
            self._gguf = None

    @property
    def closed(self) -> bool:
        return self._handle == ffi.NULL

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"ctx={self.n_ctx}, threads={self.threads}"
        return f"<edgekv.Model {self.name} ({self.arch}) {state}>"

    # ---- tokens ------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.hparams["n_vocab"]

    def tokenize(self, text: str, add_bos: bool | None = None, special: bool = True) -> list[int]:
        """Token ids of text; special tokens (e.g. ``<|im_start|>``) are parsed unless special=False."""
        return self.tokenizer.encode(text, add_bos=add_bos, parse_special=special)

    def detokenize(self, ids: Sequence[int], skip_special: bool = False) -> str:
        return self.tokenizer.decode(ids, skip_special=skip_special)

    # ---- the C context -------------------------------------------------------

    def _c_error(self) -> str:
        return ffi.string(lib.ek_model_error(self._handle)).decode(errors="replace")

    def _check_open(self) -> None:
        if self._handle == ffi.NULL:
            raise ModelClosedError(f"{self!r} is closed")

    def _as_ids(self, ids) -> np.ndarray:
        arr = np.asarray(ids)
        if arr.ndim != 1 or arr.size == 0:
            raise ValueError("token ids must be a non-empty 1-D sequence of integers")
        if arr.dtype.kind not in "iu":
            raise ValueError(f"token ids must be integers, got dtype {arr.dtype}")
        bad = np.flatnonzero((arr < 0) | (arr >= self.vocab_size))
        if bad.size:
            i = int(bad[0])
            raise ValueError(f"token id {int(arr[i])} at index {i} is out of range [0, {self.vocab_size})")
        return np.ascontiguousarray(arr, dtype=np.int32)

    def _eval(self, ids: np.ndarray, logits_mode: int, out: np.ndarray | None) -> None:
        """Append ids to the context and run them (caller holds the lock and has validated ids)."""
        if len(self._tokens) + ids.size > self.n_ctx:
            raise ContextOverflowError(
                f"context overflow: {len(self._tokens)} tokens in context + {ids.size} new > ctx {self.n_ctx}"
            )
        optr = ffi.NULL if out is None else ffi.cast("float *", out.ctypes.data)
        rc = lib.ek_forward(self._handle, ffi.cast("int32_t *", ids.ctypes.data), ids.size, logits_mode, optr)
        if rc == lib.EK_ERR_CONTEXT:
            raise ContextOverflowError(self._c_error())
        if rc == lib.EK_ERR_TOKEN:
            raise ValueError(self._c_error())
        if rc != 0:
            raise EdgekvError(self._c_error())
        self._tokens.extend(int(t) for t in ids)

    def _truncate(self, n: int) -> None:
        if lib.ek_truncate(self._handle, n) != 0:
            raise EdgekvError(self._c_error())
        del self._tokens[n:]

    def reset(self) -> None:
        """Forget the context (the next call starts from an empty KV cache)."""
        with self._lock:
            self._check_open()
            self._truncate(0)

    @property
    def n_past(self) -> int:
        return len(self._tokens)

    @property
    def kv_bytes(self) -> int:
        """Bytes the KV cache holds for the tokens now in context."""
        self._check_open()
        return int(lib.ek_kv_bytes_used(self._handle))

    @property
    def kv_bytes_per_token(self) -> int:
        self._check_open()
        return int(lib.ek_kv_bytes_per_token(self._handle))

    # ---- scoring -------------------------------------------------------------

    def logits(self, token_ids: Sequence[int]) -> np.ndarray:
        """Next-token logits at every position, from a fresh context: float32 (len(token_ids), vocab)."""
        with self._lock:
            self._check_open()
            ids = self._as_ids(token_ids)
            if ids.size > self.n_ctx:
                raise ContextOverflowError(f"{ids.size} tokens do not fit in ctx {self.n_ctx}")
            out = np.empty((ids.size, self.vocab_size), dtype=np.float32)
            self._truncate(0)
            self._eval(ids, lib.EK_LOGITS_ALL, out)
            return out

    # ---- generation ------------------------------------------------------------

    def _prefill_prompt(self, ids: np.ndarray) -> tuple[np.ndarray, int]:
        """Make the context hold exactly ids, reusing the longest cached prefix; return last logits."""
        cached = self._tokens
        common = 0
        limit = min(len(cached), ids.size - 1)  # always run at least one token to get logits
        while common < limit and cached[common] == ids[common]:
            common += 1
        self._truncate(common)
        self._eval(ids[common:], lib.EK_LOGITS_LAST, self._logits)
        return self._logits, ids.size - common

    def generate(
        self,
        prompt: str | Sequence[int],
        max_tokens: int = 256,
        temperature: float = 0.8,
        top_k: int = 40,
        top_p: float = 0.95,
        seed: int | None = None,
        stream: bool = False,
        stop: Sequence[str] | None = None,
    ) -> str | Iterator[str]:
        """Continue prompt (text or token ids). Greedy when temperature == 0.

        Returns the text, or with stream=True an iterator of text pieces. Stops at an
        end-of-turn token, a stop string, max_tokens, or a full context. Statistics
        of the run are in ``model.last_stats`` afterwards.
        """
        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        _check_int("max_tokens", max_tokens, 0, 1 << 30)
        if stop is not None and (isinstance(stop, str) or not all(isinstance(s, str) and s for s in stop)):
            raise ValueError("stop must be a list of non-empty strings")
        self._check_open()
        ids = self._as_ids(self.tokenize(prompt) if isinstance(prompt, str) else prompt)
        if ids.size >= self.n_ctx:
            raise ContextOverflowError(
                f"prompt of {ids.size} tokens does not fit in ctx {self.n_ctx} (with room to generate)"
            )
        it = self._generate_iter(ids, max_tokens, params, list(stop or []))
        return it if stream else "".join(it)

    def _generate_iter(self, ids, max_tokens, params, stop) -> Iterator[str]:
        stats = GenerationStats(prompt_tokens=int(ids.size))
        self.last_stats = stats
        sampler = Sampler(params)
        decoder = self.tokenizer.stream_decoder()
        eot = self.tokenizer.eot_ids
        pending = ""  # text held back while it could still be the start of a stop string
        hold = max((len(s) for s in stop), default=1) - 1
        with self._lock:
            self._check_open()
            t0 = time.perf_counter()
            logits, stats.prefilled_tokens = self._prefill_prompt(ids)
            stats.prefill_s = time.perf_counter() - t0
            t_dec = time.perf_counter()
            stats.finish_reason = "length"
            for i in range(max_tokens):
                tok = sampler(logits)
                stats.generated_tokens += 1
                if tok in eot:
                    stats.finish_reason = "stop"
                    break
                pending += decoder.push(tok)
                if stop:
                    hit = min((pending.find(s) for s in stop if s in pending), default=-1)
                    if hit >= 0:
                        pending = pending[:hit]
                        stats.finish_reason = "stop"
                        break
                    if len(pending) > hold:
                        cut = len(pending) - hold
                        yield pending[:cut]
                        pending = pending[cut:]
                elif pending:
                    yield pending
                    pending = ""
                if i + 1 == max_tokens:
                    break
                if len(self._tokens) >= self.n_ctx:
                    stats.finish_reason = "context"
                    break
                self._eval(np.array([tok], dtype=np.int32), lib.EK_LOGITS_LAST, self._logits)
                logits = self._logits
            stats.decode_s = time.perf_counter() - t_dec
            stats.kv_bytes = self.kv_bytes
        pending += decoder.flush()
        if pending:
            yield pending

    def chat(self, messages: Sequence[dict], **kwargs) -> str | Iterator[str]:
        """Reply to a conversation ([{"role": ..., "content": ...}, ...]) using the model's chat template."""
        if not isinstance(messages, (list, tuple)) or not all(
            isinstance(m, dict) and "role" in m and "content" in m for m in messages
        ):
            raise ValueError('messages must be a list of {"role": ..., "content": ...} dicts')
        prompt = self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True)
        return self.generate(prompt, **kwargs)

    # ---- description -------------------------------------------------------------

    def info(self) -> dict:
        self._check_open()
        g = self._gguf
        n_params = sum(w.n_in * w.n_out for w in g.weights)
        return {
            "name": self.name,
            "path": str(self.path),
            "file_bytes": self.path.stat().st_size,
            "architecture": self.arch,
            "parameters": n_params,
            "weight_types": g.weight_types,
            "converted_at_load": dict(g.converted),
            "ctx": self.n_ctx,
            "ctx_train": self.hparams["n_ctx_train"],
            "threads": self.threads,
            "simd": _native.SIMD,
            "kv_bytes_per_token": self.kv_bytes_per_token,
            "hparams": dict(self.hparams),
        }


def _check_int(name: str, value, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not lo <= value <= hi:
        raise ValueError(f"{name} must be an integer in [{lo}, {hi}], got {value!r}")
