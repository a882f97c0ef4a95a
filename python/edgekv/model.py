"""Model: one loaded GGUF model, its C state (weights, KV cache, threads) and tokenizer.

A Model owns exactly one C handle and frees it deterministically: ``close()``,
or use it as a context manager. Calls into C are serialized by a lock, so one
Model may be shared between threads (they take turns); two Models run in
parallel. A stream holds the model only while it computes a token (see
``Model.generate`` for what happens when another call runs in between).

Every call is a function of its arguments alone, whatever ran on the model
before it: the KV cache is reused only where that gives the same bits as a
fresh run (see ``Model._prefill_prompt``).
"""

from __future__ import annotations

import logging
import os
import threading
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from . import _native
from .errors import ContextOverflowError, EdgekvError, ModelClosedError, ModelLoadError
from .gguf_loader import LoadedGGUF, load_gguf, release_weight, trim_heap
from .kv_policy import KVPolicy, TokenFeatures, parse_policy
from .sampling import Sampler, SamplingParams
from .tokenizer import Tokenizer

ffi, lib = _native.ffi, _native.lib
log = logging.getLogger("edgekv")

DEFAULT_CTX = 4096
DEFAULT_BATCH = 256
# Quantization group size for 8-, 4- and 2-bit records (values of one head that share
# an fp16 scale and minimum); see benchmarks/results/kv_groups.md for the measurement.
DEFAULT_KV_GROUPS = (64, 64, 32)
# Generation: a KV policy that reads token features (the learned controller, the rule baseline)
# runs once per this many due tokens instead of at every step (see _apply_policy).
KV_DECIDE_BATCH = 16
# A stream being consumed keeps the model this long after each token it yields, so that
# threads streaming from one model take turns stream by stream instead of token by token
# (each switch re-runs the other stream's context). A stream left suspended longer than
# this no longer holds up other calls.
STREAM_HOLD_S = 0.2


def default_threads() -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        n = os.cpu_count() or 1
    return max(1, min(n, 8))


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


class _ModelLock:
    """Serializes calls into one Model (re-entrant within a thread) and records which stream
    used the KV cache last.

    ``with model._lock:`` holds it for a plain call. A stream holds it for one token at a
    time (``acquire(stream)`` / ``release(keep_for=stream)``); between tokens, other threads
    wait up to STREAM_HOLD_S for that stream's next token, and never longer. A call from the
    thread that consumes the stream does not wait: that stream is suspended.
    """

    def __init__(self):
        self._cv = threading.Condition(threading.RLock())  # RLock: a stream's finalizer may run inside
        self._thread = None  # the thread inside a call, if any
        self._depth = 0
        self._owner = None  # the stream whose step ran last (None: a plain call)
        self._held = None  # (stream, consumer thread, deadline) while a stream waits for its consumer

    def acquire(self, stream=None, touch: bool = True) -> bool:
        """Wait for the model; True if stream is the one that used the cache last. touch=False:
        the call leaves the cache as it is."""
        me = threading.get_ident()
        with self._cv:
            if self._thread == me:
                self._depth += 1
                same = stream is not None and self._owner is stream
                if touch:
                    self._owner = stream
                return same
            while True:
                h = self._held
                if self._thread is None:
                    if h is None or h[0] is stream or h[1] == me:
                        break
                    left = h[2] - time.monotonic()
                    if left <= 0:
                        break
                    self._cv.wait(left)
                else:
                    self._cv.wait()
            if self._held is not None and self._held[0] is not stream:
                self._held = None  # its stream was suspended too long: this call takes over
            self._thread, self._depth = me, 1
            same = stream is not None and self._owner is stream
            if touch:
                self._owner = stream
            return same

    def release(self, keep_for=None) -> None:
        with self._cv:
            self._depth -= 1
            if self._depth == 0:
                self._thread = None
                if keep_for is not None:
                    self._held = (keep_for, threading.get_ident(), time.monotonic() + STREAM_HOLD_S)
                self._cv.notify_all()

    def drop(self, stream) -> None:
        """A stream that ended (finished, closed, collected) holds nothing any more."""
        with self._cv:
            if self._held is not None and self._held[0] is stream:
                self._held = None
                self._cv.notify_all()

    def __enter__(self):
        self.acquire()
        return self

    @contextmanager
    def reading(self):
        """Hold the model for a call that leaves the cache as it is (a suspended stream need not re-run)."""
        self.acquire(touch=False)
        try:
            yield
        finally:
            self.release()

    def __exit__(self, *exc) -> None:
        self.release()


@dataclass
class _Prefill:
    """What a fresh prefill of ids under policy left behind: its last logits, and (for policies
    that read features) the row that gives the next token its log-prob. Valid while the cached
    positions below len(ids) stay exactly as that prefill left them (see _prefill_prompt)."""

    ids: tuple
    policy: KVPolicy
    logits: np.ndarray
    logp_row: tuple | None
    keys_quantized: bool


@dataclass
class GenerationStats:
    prompt_tokens: int = 0      # tokens of the prompt
    prefilled_tokens: int = 0   # of those, tokens actually run (the rest reused the cache)
    generated_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    kv_bytes: int = 0
    kv_bits: float = float("nan")  # average bits per cached key/value element, scales included
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
            f"KV {self.kv_bytes / 1024:.1f} KiB ({self.kv_bits:.2f} bits) | {self.finish_reason}"
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
        kv="fp16",
        kv_window: int = 0,
        kv_groups: tuple[int, int, int] | None = None,
        kv_rotate: bool = True,
        kv_center_keys: bool = True,
        kv_fit_grid: bool = False,
    ):
        self._handle = ffi.NULL
        self._lock = _ModelLock()
        threads = default_threads() if threads is None else threads
        _check_int("threads", threads, 1, 256)
        if threads > available_cpus():
            # allowed (a container may under-report its CPUs), but threads that share a core
            # spin-wait on each other: decoding gets many times slower, not faster
            warnings.warn(
                f"threads={threads} exceeds the {available_cpus()} CPUs this process may run on; "
                "decoding will be slower than with threads <= CPUs",
                stacklevel=2,
            )
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
        for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type"):
            g.fields.pop(key, None)  # the tokenizer has them now; no second copy for the model's lifetime
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
        cfg.has_qk_norm = int(g.spec.qk_norm)
        cfg.n_threads = threads
        cfg.n_batch = n_batch
        err = ffi.new("char[512]")
        handle = lib.ek_model_create(cfg, err, 512)
        if handle == ffi.NULL:
            raise ModelLoadError(f"{self.path}: {ffi.string(err).decode()}")
        self._handle = handle
        try:
            # The C core copies matrices it has a faster layout for (ek_model_tensor_released):
            # their source bytes are released at once, so loading never holds two copies of more
            # than one matrix (the tied token embedding: after finalize).
            released = 0
            for w in g.weights:
                try:
                    arr = w.materialize()  # a matrix converted at load is converted here, one at a time
                except ModelLoadError as e:
                    raise ModelLoadError(f"{self.path}: {e}") from None
                ptr = ffi.cast("void *", arr.ctypes.data)
                rc = lib.ek_model_set_tensor(handle, w.kind, w.layer, w.type, ptr, w.n_in, w.n_out, arr.nbytes)
                if rc != 0:
                    raise ModelLoadError(f"{self.path}: tensor {w.name!r}: {self._c_error()}")
                if lib.ek_model_tensor_released(handle, w.kind, w.layer):
                    release_weight(w)
                    released += 1
            if lib.ek_model_finalize(handle) != 0:
                raise ModelLoadError(f"{self.path}: {self._c_error()}")
            for w in g.weights:
                if w.array is not None and w.array.size and lib.ek_model_tensor_released(handle, w.kind, w.layer):
                    release_weight(w)
                    released += 1
            if released:
                trim_heap()
        except BaseException:
            self.close()
            raise
        self.n_ctx = ctx
        self.threads = threads
        self._tokens: list[int] = []  # what the C context holds, position by position
        self._logits = np.empty(hp["n_vocab"], dtype=np.float32)
        self.last_stats: GenerationStats | None = None
        self._configure_kv(kv_groups, kv_rotate, kv_center_keys, kv_fit_grid)
        self.kv_policy: KVPolicy = self._check_policy(parse_policy(kv, window=kv_window))
        self._ctx_policy: KVPolicy | None = None  # the policy the cached tokens were stored under
        self._kv_decided = 0  # positions below this have had their precision decided or queued
        self._keys_quantized = False  # a key below 16 bits was stored since the cache was last empty
        self._prefill: _Prefill | None = None  # the last fresh prefill, while it can be reused exactly
        self._stats_buf = np.empty((3, 1), np.float32)  # a decode step's logit statistics (from C)
        self._stats_ptr = ffi.cast("float *", self._stats_buf.ctypes.data)
        # generation steps' due tokens waiting for a batched decision, with their frozen features:
        # (positions, attention sum, sum of squares, count, age)
        self._pending: list[tuple] = []
        # per-position next-token statistics (NaN where logits were not computed)
        self._entropy = np.full(ctx, np.nan, np.float32)
        self._max_prob = np.full(ctx, np.nan, np.float32)
        self._logprob = np.full(ctx, np.nan, np.float32)
        # zero-copy views of the C store's attention statistics
        self._att_sum = np.frombuffer(ffi.buffer(lib.ek_attn_stat_sum(self._handle), 8 * ctx), np.float64)
        self._att_sumsq = np.frombuffer(ffi.buffer(lib.ek_attn_stat_sumsq(self._handle), 8 * ctx), np.float64)
        self._att_count = np.frombuffer(ffi.buffer(lib.ek_attn_stat_count(self._handle), 4 * ctx), np.int32)

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

    def _eval(self, ids: np.ndarray, logits_mode: int, out: np.ndarray | None, policy: KVPolicy | None = None,
              defer: bool = False) -> None:
        """Append ids to the context, run them, then let the KV policy decide the tokens that are due.

        The caller holds the lock and has validated ids. policy: the call's KV policy
        (default: the model's); logits are widened to every position when it needs features.
        defer: a generation step (see _apply_policy).
        """
        policy = policy or self.kv_policy
        if self._ctx_policy is not policy:
            if self._tokens:
                self._truncate(0)  # cached tokens were stored under another policy
            self._ctx_policy = policy
            # attention statistics cost a little per step: gather them only for policies that read them
            lib.ek_set_collect_stats(self._handle, int(bool(policy.needs_features)))
        if self._prefill is not None and policy.needs_features and self._kv_decided < len(self._prefill.ids):
            self._prefill = None  # new queries change the attention features of its undecided tokens
        first = len(self._tokens)
        if policy.needs_features:
            self._take_prev_logprob(first, int(ids[0]))
        own = None
        if policy.needs_features and logits_mode != lib.EK_LOGITS_ALL and ids.size > 1:
            own = np.empty((ids.size, self.vocab_size), np.float32)
            self._eval_raw(ids, lib.EK_LOGITS_ALL, own)
            if out is not None:
                out[...] = own[-1]
            self._record_logit_features(first, own)
        else:
            self._eval_raw(ids, logits_mode, out)
            if out is not None:
                rows = out.reshape(-1, self.vocab_size)
                self._record_logit_features(first + ids.size - rows.shape[0], rows)
        self._apply_policy(policy, defer=defer)

    def _record_logit_features(self, first_pos: int, logits: np.ndarray) -> None:
        """Entropy / max-prob at positions first_pos.., and the log-prob each next token got.

        logits: the rows the last forward call produced. The statistics come from C (for one
        row, computed inside that call's output matmul; else ek_logit_stats: one pass of a
        vectorized exp over each row;
        with m = max, s = sum exp(x - m): entropy = log s - sum(e z) / s, max-prob = 1 / s,
        log-prob of token i = x_i - m - log s). This runs at every decode step of a policy that
        needs features, so it is part of the controller's cost.
        """
        if not self._ctx_policy or not self._ctx_policy.needs_features:
            return
        logits = np.ascontiguousarray(logits, dtype=np.float32).reshape(-1, self.vocab_size)
        n = logits.shape[0]
        stats = self._stats_buf if n == 1 else np.empty((3, n), np.float32)  # max logit, log s, entropy
        # a one-row call (a decode step) had them computed inside its output matmul
        if n > 1 or lib.ek_last_logit_stats(self._handle, self._stats_ptr) != 0:
            rc = lib.ek_logit_stats(ffi.cast("float *", logits.ctypes.data), n, self.vocab_size,
                                    *(ffi.cast("float *", stats[i].ctypes.data) for i in range(3)))
            assert rc == 0
        mx, log_s, ent = stats
        self._entropy[first_pos:first_pos + n] = ent
        self._max_prob[first_pos:first_pos + n] = np.exp(-log_s)
        lse = mx + log_s  # log of the full partition sum
        nxt = np.arange(first_pos + 1, min(first_pos + n, len(self._tokens)))
        if nxt.size:
            ids = np.asarray([self._tokens[j] for j in nxt])
            rows = nxt - 1 - first_pos
            self._logprob[nxt] = logits[rows, ids] - lse[rows]
        # -- the last row predicts the first token of the next call (_take_prev_logprob); kept as
        # a view: copying 49k floats per step cost more than the statistics themselves
        self._last_logp_row = (first_pos + n - 1, logits[-1], float(lse[-1]))

    def _take_prev_logprob(self, pos: int, token: int) -> None:
        """Log-prob of the token at pos from the previous call's last row (before a forward pass
        can overwrite that row)."""
        prev, self._last_logp_row = getattr(self, "_last_logp_row", None), None
        if prev is not None and prev[0] == pos - 1:
            self._logprob[pos] = prev[1][token] - prev[2]

    def features(self, positions) -> TokenFeatures:
        """Token features (see edgekv.kv_policy) of cached positions."""
        return self._features(positions)

    def _changing_features(self, pos: np.ndarray) -> tuple:
        """The inputs of a position's features that keep changing as tokens are added: the
        attention it received (sum, sum of squares, count: copies, as fancy indexing makes) and its age."""
        return self._att_sum[pos], self._att_sumsq[pos], self._att_count[pos], len(self._tokens) - 1 - pos

    def _features(self, positions, frozen: tuple | None = None) -> TokenFeatures:
        """features(), with the attention statistics and age taken from frozen = (sum, sum of
        squares, count, age) when given (copies made when the positions became due)."""
        self._check_open()  # the statistics views point into C memory that close() frees
        pos = np.asarray(positions, dtype=np.int64)
        att_sum, att_sumsq, att_count, age = frozen or self._changing_features(pos)
        cnt = att_count.astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = att_sum / cnt
            var = np.maximum(att_sumsq / cnt - mean * mean, 0.0)
        return TokenFeatures(
            positions=pos.astype(np.int32),
            token_ids=np.asarray([self._tokens[j] for j in pos], dtype=np.int32),
            entropy=self._entropy[pos].copy(),
            max_prob=self._max_prob[pos].copy(),
            logprob=self._logprob[pos].copy(),
            attn_mean=mean.astype(np.float32),
            attn_var=var.astype(np.float32),
            age=np.asarray(age).astype(np.int32),
            rarity=self._controller_rarity(pos),
        )

    # ---- learned-controller support (edgekv.controller) --------------------------------------
    # The rarity feature and the policy hook live in this block; definitions in edgekv.kv_policy.

    def _controller_rarity(self, pos: np.ndarray) -> np.ndarray:
        """Rarity of the tokens at pos: prior table of this tokenizer + counts in the context."""
        prior = getattr(self, "_rarity_prior", None)
        if prior is None:
            from .controller import RarityPrior

            prior = self._rarity_prior = RarityPrior.for_tokenizer(self.tokenizer)
        return prior.rarity(self._tokens, pos)

    @staticmethod
    def _bind_policy(policy: KVPolicy, model: "Model") -> None:
        """Policies that depend on the model (the learned controller) attach to it before deciding."""
        bind = getattr(policy, "bind", None)
        if bind is not None:
            bind(model)

    def _apply_policy(self, policy: KVPolicy, flush: bool = False, defer: bool = False) -> None:
        """Decide the precision of every token at least W steps old (all of them when flush).

        defer (generation steps): a policy that reads features decides once KV_DECIDE_BATCH
        tokens are due, in one call, instead of one token per step (its fixed cost per call,
        onnxruntime's included, was ~10% of a decode step). Each token's features are frozen
        when it becomes due: its attention statistics and age are copied then, and the other
        features (logit statistics, rarity) never change afterwards; so deferring changes when
        a decision takes effect (up to KV_DECIDE_BATCH - 1 steps later; the token is kept at
        16 bits until then), not what is decided. Any call that is not deferred (a prefill,
        score()) decides everything queued first.
        """
        upto = len(self._tokens) - (0 if flush else policy.window)
        if policy.is_fp16:
            self._kv_decided = max(self._kv_decided, upto)
            self._pending.clear()
            return
        if upto > self._kv_decided:
            new = np.arange(self._kv_decided, upto, dtype=np.int32)
            self._kv_decided = upto
            if policy.needs_features:
                self._pending.append((new, *self._changing_features(new)))
            else:
                self._pending.append((new,))
        n_due = sum(p[0].size for p in self._pending)
        if n_due == 0 or (defer and policy.needs_features and n_due < KV_DECIDE_BATCH):
            return
        due, self._pending = self._pending, []
        pos = np.concatenate([d[0] for d in due])
        frozen = tuple(np.concatenate([d[i] for d in due]) for i in range(1, 5)) if len(due[0]) == 5 else None
        self._bind_policy(policy, self)
        n_layer = self.hparams["n_layer"]
        per_layer = hasattr(policy, "decide_layers")
        if per_layer:  # (n_layer, n) bits; one call for all layers where every layer agrees
            k_bits, v_bits = policy.decide_layers(self._features(pos, frozen), n_layer)
        else:
            k_bits, v_bits = policy.decide(self._features(pos, frozen))
        k_bits = np.ascontiguousarray(k_bits, dtype=np.int32)
        v_bits = np.ascontiguousarray(v_bits, dtype=np.int32)
        want = (n_layer, pos.size) if per_layer else pos.shape
        if per_layer and k_bits.shape == v_bits.shape == want and (k_bits == k_bits[0]).all() and (v_bits == v_bits[0]).all():
            k_bits, v_bits, per_layer, want = k_bits[0].copy(), v_bits[0].copy(), False, pos.shape
        if k_bits.shape != want or v_bits.shape != want:
            raise ValueError(f"policy {policy.name} returned {k_bits.shape}/{v_bits.shape} bit-widths for {pos.size} tokens")
        first_key = not self._keys_quantized and bool((k_bits < 16).any())
        self._keys_quantized |= first_key
        snap = self._prefill
        if snap is not None and (int(pos.min()) < len(snap.ids) or (first_key and not snap.keys_quantized)):
            # a token of the prefill changes precision, or the first quantized key fixes the key
            # centers (from the keys cached now, which a fresh run would not have)
            self._prefill = None
        for layer in range(n_layer) if per_layer else (-1,):
            kb, vb = (k_bits[layer], v_bits[layer]) if per_layer else (k_bits, v_bits)
            rc = lib.ek_kv_set_layer_bits(
                self._handle, layer, ffi.cast("int32_t *", pos.ctypes.data), ffi.cast("int32_t *", kb.ctypes.data),
                ffi.cast("int32_t *", vb.ctypes.data), pos.size,
            )
            if rc != 0:
                raise ValueError(f"KV policy {policy.name}: {self._c_error()}")

    def _check_policy(self, policy: KVPolicy) -> KVPolicy:
        """Refuse, before any work, a static quantized policy this model's head_dim cannot store."""
        if self.kv_groups is None and not policy.is_fp16 and hasattr(policy, "k_bits"):
            raise ValueError(
                f"KV policy {policy.name!r} needs head_dim to be a multiple of 32; this model's head_dim is "
                f"{self.hparams['head_dim']}, so its cache can only be fp16"
            )
        prepare = getattr(policy, "prepare", None)  # calibrated policies (edgekv.calibrate) allocate here
        if prepare is not None:
            prepare(self)
        check_layers = getattr(policy, "check_layers", None)
        if check_layers is not None:
            check_layers(self.hparams["n_layer"])
        target = getattr(policy, "target_bits", None)
        if target is not None and self.kv_groups is not None:
            # every token at 2 bits (group scales included) to every token at 16: nothing reaches beyond
            lo, hi = 2 + 32.0 / self.kv_groups[2], 16.0
            if not lo <= target <= hi:
                raise ValueError(
                    f"KV policy {policy.name!r}: target_bits {target:g} is outside the feasible range "
                    f"[{lo:g}, {hi:g}] bits per element for this model's cache"
                )
        return policy

    def _configure_kv(self, groups, rotate: bool, center_keys: bool, fit_grid: bool) -> None:
        hd = self.hparams["head_dim"]
        if groups is None and hd % 32:
            # No quantization group fits (groups are multiples of 32 dividing head_dim): the C
            # store keeps its defaults and the cache stays FP16 (ek_kv_set_bits refuses quantized
            # records for such a head_dim).
            self.kv_groups = None
            self._read_kv_flags()
            return
        # default: each group the largest multiple of 32 that divides head_dim, at most the default
        g8, g4, g2 = groups or tuple(
            max(c for c in range(32, min(g, hd) + 1, 32) if hd % c == 0) for g in DEFAULT_KV_GROUPS
        )
        can_rotate = hd % 32 == 0 and hd & (hd - 1) == 0
        flags = ((lib.EK_KV_ROTATE if rotate and can_rotate else 0) | (lib.EK_KV_CENTER_KEYS if center_keys else 0)
                 | (lib.EK_KV_FIT_GRID if fit_grid else 0))
        if lib.ek_kv_configure(self._handle, g8, g4, g2, flags) != 0:
            raise ValueError(self._c_error())
        self.kv_groups = (g8, g4, g2)
        self._read_kv_flags()

    def _read_kv_flags(self) -> None:
        """The layout flags as the C store holds them (it may refuse one, e.g. rotation)."""
        self.kv_rotate = bool(lib.ek_kv_rotating(self._handle))
        self.kv_center_keys = bool(lib.ek_kv_centering(self._handle))
        self.kv_fit_grid = bool(lib.ek_kv_fitting(self._handle))

    def kv_bits(self, per_layer: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(key bits, value bits) of every cached position: (n_past,) arrays, or (n_layer, n_past)
        with per_layer=True. Without per_layer, a cache whose layers differ raises ValueError."""
        with self._lock.reading():
            self._check_open()
            n, n_layer = len(self._tokens), self.hparams["n_layer"]
            k = np.empty((n_layer, n), np.int32)
            v = np.empty((n_layer, n), np.int32)
            for layer in range(n_layer if n else 0):
                lib.ek_kv_get_layer_bits(self._handle, layer, ffi.cast("int32_t *", k[layer].ctypes.data),
                                         ffi.cast("int32_t *", v[layer].ctypes.data))
            if per_layer:
                return k, v
            if n and not ((k == k[0]).all() and (v == v[0]).all()):
                raise ValueError("the KV cache's bits differ by layer: use kv_bits(per_layer=True)")
            return k[0].copy(), v[0].copy()

    @property
    def kv_layout(self) -> dict:
        """The KV record layout: what quantized records and their damage depend on (controller
        artifacts and benchmark results record it)."""
        return {"kv_groups": list(self.kv_groups) if self.kv_groups else None, "kv_rotate": self.kv_rotate,
                "kv_center_keys": self.kv_center_keys, "kv_fit_grid": self.kv_fit_grid}

    @property
    def kv_avg_bits(self) -> float:
        """Average bits per cached key/value element over every layer, scales and minimums included
        (maps excluded)."""
        self._check_open()
        n = len(self._tokens)
        hp = self.hparams
        elems = n * hp["n_layer"] * hp["n_head_kv"] * hp["head_dim"] * 2
        return 8.0 * lib.ek_kv_data_bytes(self._handle) / elems if elems else float("nan")

    def _eval_raw(self, ids: np.ndarray, logits_mode: int, out: np.ndarray | None) -> None:
        self._check_open()  # a suspended stream may resume after close(): never pass C a freed handle
        if len(self._tokens) + ids.size > self.n_ctx:
            raise ContextOverflowError(
                f"context overflow: {len(self._tokens)} tokens in context + {ids.size} new > ctx {self.n_ctx}"
            )
        optr = ffi.NULL if out is None else ffi.cast("float *", out.ctypes.data)
        prev = getattr(self, "_last_logp_row", None)
        if prev is not None and out is not None and np.shares_memory(prev[1], out):
            self._last_logp_row = (prev[0], prev[1].copy(), prev[2])  # still needed, about to be overwritten
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
        self._kv_decided = min(self._kv_decided, n)
        if n == 0:
            self._keys_quantized = False  # the C store sets new key centers for a new context
        if self._prefill is not None and n < len(self._prefill.ids):
            self._prefill = None
        self._pending = [tuple(a[d[0] < n] for a in d) for d in self._pending]
        self._pending = [d for d in self._pending if d[0].size]
        self._entropy[n:] = np.nan
        self._max_prob[n:] = np.nan
        self._logprob[n:] = np.nan

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

    def score(self, context, continuation, kv=None, sequential: bool = True) -> np.ndarray:
        """Log-probability of each continuation token given the context (texts or token ids).

        The context is prefilled into the cache and stored under the KV policy (its window
        W as configured) before the continuation is scored. sequential=True feeds the
        continuation one token at a time so each scored token also sits in the cache
        under the policy before the next is scored (how generation sees the cache);
        False scores it in one batch (continuation tokens then see each other at 16 bits).
        A context whose prefill is still in the cache exactly as it left it is reused.
        """
        policy = self.kv_policy if kv is None else self._check_policy(parse_policy(kv))
        ctx_ids = self._text_or_ids("context", context, special=True)
        cont_ids = self._text_or_ids("continuation", continuation, special=False)
        with self._lock:
            self._check_open()
            if ctx_ids.size + cont_ids.size > self.n_ctx:
                raise ContextOverflowError(
                    f"context ({ctx_ids.size}) + continuation ({cont_ids.size}) tokens exceed ctx {self.n_ctx}"
                )
            first, _ = self._prefill_prompt(ctx_ids, policy)
            first = first.copy()
            out = np.empty(cont_ids.size, np.float64)
            out[0] = _log_softmax_at(first, cont_ids[0])
            if cont_ids.size > 1:
                if sequential:
                    for i in range(cont_ids.size - 1):
                        self._eval(cont_ids[i:i + 1], lib.EK_LOGITS_LAST, self._logits, policy)
                        out[i + 1] = _log_softmax_at(self._logits, cont_ids[i + 1])
                else:
                    rows = np.empty((cont_ids.size - 1, self.vocab_size), np.float32)
                    self._eval(cont_ids[:-1], lib.EK_LOGITS_ALL, rows, policy)
                    for i in range(rows.shape[0]):
                        out[i + 1] = _log_softmax_at(rows[i], cont_ids[i + 1])
            return out

    def _text_or_ids(self, what: str, value, special: bool) -> np.ndarray:
        """Token ids of a text or an id sequence; an empty text is refused as a text."""
        if isinstance(value, str):
            ids = self.tokenize(value, special=special)
            if not ids:
                raise ValueError(f"the {what} is an empty text: it has no tokens" if not value else
                                 f"the {what} text {value!r} encodes to no tokens")
            return self._as_ids(ids)
        return self._as_ids(value)

    # ---- generation ------------------------------------------------------------

    def _prefill_prompt(self, ids: np.ndarray, policy: KVPolicy) -> tuple[np.ndarray, int]:
        """Make the context hold exactly ids under policy; return (last logits, tokens run).

        The result is what a fresh model computes. A cached prefix is reused only in the one
        case where that is exact by construction: ids are the prompt of the last fresh
        prefill (self._prefill) and every cached position below len(ids) is still as that
        prefill left it; the cache is then truncated back to it and its logits returned.
        Any other cached prefix is run again, as reusing it would not be exact: a fresh
        run's later prompt tokens see the prefix at 16 bits, not quantized, and even an fp16
        prefix computed in another pass differs from a fresh one in float rounding (the
        attention kernels group keys by how many the cache holds), enough to change greedy
        replies of SmolLM2 in chats.
        """
        snap = self._prefill
        if (snap is not None and snap.policy is policy and self._ctx_policy is policy
                and len(self._tokens) >= ids.size and snap.ids == tuple(ids.tolist())):
            self._truncate(ids.size)
            self._logits[...] = snap.logits
            if snap.logp_row is not None:
                p, row, lse = snap.logp_row
                self._last_logp_row = (p, row.copy(), lse)
            else:
                self._last_logp_row = None
            return self._logits, 0
        self._truncate(0)
        self._last_logp_row = None
        self._eval(ids, lib.EK_LOGITS_LAST, self._logits, policy)
        row = getattr(self, "_last_logp_row", None)
        self._prefill = _Prefill(
            ids=tuple(ids.tolist()), policy=policy, logits=self._logits.copy(),
            logp_row=None if row is None else (row[0], np.array(row[1], copy=True), row[2]),
            keys_quantized=self._keys_quantized,
        )
        return self._logits, ids.size

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
        kv=None,
    ) -> str | Iterator[str]:
        """Continue prompt (text or token ids). Greedy when temperature == 0.

        Returns the text, or with stream=True an iterator of text pieces. Stops at an
        end-of-turn token, a stop string, max_tokens, or a full context. Statistics
        of the run are in ``model.last_stats`` afterwards. kv: this call's KV policy
        (default: the one given at load).

        The result depends on the arguments alone, not on earlier calls (a stateful policy
        object such as RandomPolicy aside). Arguments are checked here, also when streaming.
        A stream holds the model only while it computes a token. Between tokens, other calls
        may run: at once from the thread that consumes the stream, after STREAM_HOLD_S (0.2 s)
        without a next() from other threads, and close() likewise. A stream whose cache
        another call used meanwhile re-runs its own context on its next token (its prompt,
        then each token it generated, as they first ran) and continues with the same text
        it would have produced undisturbed; after close() its next token raises
        ModelClosedError.
        """
        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        _check_int("max_tokens", max_tokens, 0, 1 << 30)
        if stop is not None and (isinstance(stop, str) or not all(isinstance(s, str) and s for s in stop)):
            raise ValueError("stop must be a list of non-empty strings")
        self._check_open()
        ids = self._text_or_ids("prompt", prompt, special=True)
        if ids.size >= self.n_ctx:
            raise ContextOverflowError(
                f"prompt of {ids.size} tokens does not fit in ctx {self.n_ctx} (with room to generate)"
            )
        policy = self.kv_policy if kv is None else self._check_policy(parse_policy(kv))
        it = self._generate_iter(ids, max_tokens, params, list(stop or []), policy)
        return it if stream else "".join(it)

    def _generate_iter(self, ids, max_tokens, params, stop, policy) -> Iterator[str]:
        stats = GenerationStats(prompt_tokens=int(ids.size))
        self.last_stats = stats
        sampler = Sampler(params)
        decoder = self.tokenizer.stream_decoder()
        eot = self.tokenizer.eot_ids
        pending = ""  # text held back while it could still be the start of a stop string
        hold = max((len(s) for s in stop), default=1) - 1
        lock, me = self._lock, object()  # me: this stream, as the lock knows it
        logits = np.empty(self.vocab_size, np.float32)  # own copy: other calls reuse self._logits
        context = [int(t) for t in ids]  # what the C context holds for this stream
        try:
            lock.acquire(me)
            try:
                self._check_open()
                t0 = time.perf_counter()
                first, stats.prefilled_tokens = self._prefill_prompt(ids, policy)
                np.copyto(logits, first)
                stats.prefill_s = time.perf_counter() - t0
                stats.kv_bytes, stats.kv_bits = self.kv_bytes, self.kv_avg_bits
            finally:
                lock.release(keep_for=me)
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
                        decoder.reset()  # bytes held back belong to the cut-off text
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
                if len(context) >= self.n_ctx:
                    stats.finish_reason = "context"
                    break
                undisturbed = lock.acquire(me)
                try:
                    self._check_open()  # a stream may resume after close(): never pass C a freed handle
                    if not undisturbed:
                        self._replay(ids, context, policy)
                    self._eval(np.array([tok], dtype=np.int32), lib.EK_LOGITS_LAST, self._logits, policy, defer=True)
                    np.copyto(logits, self._logits)
                    stats.kv_bytes, stats.kv_bits = self.kv_bytes, self.kv_avg_bits
                finally:
                    lock.release(keep_for=me)
                context.append(tok)
            stats.decode_s = time.perf_counter() - t_dec
        finally:
            lock.drop(me)
        pending += decoder.flush()
        if pending:
            yield pending

    def _replay(self, ids: np.ndarray, context: list, policy: KVPolicy) -> None:
        """Bring the cache back to what a stream left in it: its prompt's prefill, then each
        token it generated, one decode step each, as they first ran (the same operations on
        the same state give the same bits)."""
        self._prefill_prompt(ids, policy)
        for t in context[ids.size:]:
            self._eval(np.array([t], dtype=np.int32), lib.EK_LOGITS_LAST, self._logits, policy, defer=True)

    def chat(self, messages: Sequence[dict], **kwargs) -> str | Iterator[str]:
        """Reply to a conversation ([{"role": ..., "content": ...}, ...]) using the model's chat template.

        Every role and content must be a string. content=None (OpenAI's assistant message
        that holds only tool calls) is refused, naming the message: edgekv runs no tools,
        and pass content="" to send such a turn anyway."""
        if not isinstance(messages, (list, tuple)) or not all(
            isinstance(m, dict) and "role" in m and "content" in m for m in messages
        ):
            raise ValueError('messages must be a list of {"role": ..., "content": ...} dicts')
        for i, m in enumerate(messages):
            for field in ("role", "content"):
                if not isinstance(m[field], str):
                    raise ValueError(f"messages[{i}][{field!r}] must be a string, got {m[field]!r}")
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
            "converted_to": dict(g.converted_to),
            "ctx": self.n_ctx,
            "ctx_train": self.hparams["n_ctx_train"],
            "threads": self.threads,
            "simd": _native.SIMD,
            "kv_bytes_per_token": self.kv_bytes_per_token,
            "hparams": dict(self.hparams),
        }


def _log_softmax_at(logits: np.ndarray, idx: int) -> float:
    z = logits.astype(np.float64)
    m = z.max()
    return float(z[idx] - m - np.log(np.exp(z - m).sum()))


def _check_int(name: str, value, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not lo <= value <= hi:
        raise ValueError(f"{name} must be an integer in [{lo}, {hi}], got {value!r}")
