"""Model: one loaded GGUF model, its C state (weights, threads) and tokenizer, and its sessions.

The KV cache of a sequence lives in a Session (edgekv.session); the Model keeps a default session
that generate/chat/score/logits use, gives more (``new_session``) and steps several at once in one
pass over the weights (``step``).

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
import weakref
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
from .stop import StopText, check_stop
from .session import KV_DECIDE_BATCH, Session  # noqa: F401 (KV_DECIDE_BATCH: its old home, tests import it)
from .session import step as _step
from .tokenizer import Tokenizer

ffi, lib = _native.ffi, _native.lib
log = logging.getLogger("edgekv")

DEFAULT_CTX = 4096
DEFAULT_BATCH = 256
# Quantization group size for 8-, 4- and 2-bit records (values of one head that share
# an fp16 scale and minimum); see benchmarks/results/kv_groups.md for the measurement.
DEFAULT_KV_GROUPS = (64, 64, 32)
# A stream being consumed keeps the model this long after each token it yields, so that
# threads streaming from one model take turns stream by stream instead of token by token
# (each switch re-runs the other stream's context). A stream left suspended longer than
# this no longer holds up other calls.
STREAM_HOLD_S = 0.2


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def default_threads() -> int:
    return max(1, min(available_cpus(), 8))


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
            if self._thread == me:  # a call inside a call: the outer one says who used the cache
                self._depth += 1
                return stream is not None and self._owner is stream
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
        if threads > (cpus := available_cpus()):
            # allowed (a container may under-report its CPUs), but threads that share a core
            # spin-wait on each other: decoding gets many times slower, not faster
            warnings.warn(
                f"threads={threads} exceeds the {cpus} CPUs this process may run on; "
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
        cfg.ffn_geglu = int(g.spec.geglu)
        cfg.has_post_norms = int(g.spec.post_norms)
        cfg.embd_scale = hp["n_embd"] ** 0.5 if g.spec.embd_scale else 0.0
        cfg.attn_scale, cfg.rope_base_swa = hp["attn_scale"], hp["rope_base_swa"]
        cfg.swa_window, cfg.swa_period = hp["swa_window"], hp["swa_period"]
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
        self.last_stats: GenerationStats | None = None
        self._sessions = weakref.WeakSet()  # open sessions but the default: closed with the model
        self._configure_kv(kv_groups, kv_rotate, kv_center_keys, kv_fit_grid)
        self.kv_policy: KVPolicy = self._check_policy(parse_policy(kv, window=kv_window))
        self._session = Session(self, _default=True)

    # ---- lifetime ----------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            for sess in list(getattr(self, "_sessions", ())):
                sess._free()  # before the model: a sequence refers to it
            if getattr(self, "_session", None) is not None:
                self._session._free()
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

    # ---- the default session (the per-sequence state and calls live in edgekv.session) -------

    @property
    def c_handle(self):
        """The C ek_model * (cffi), for the test and benchmark entry points of edgekv_testing.h."""
        self._check_open()
        return self._handle

    @property
    def session(self) -> Session:
        """The default session: what generate/chat/score/logits run on."""
        return self._session

    def new_session(self, kv=None) -> Session:
        """A new empty sequence over this model's weights, with its own KV cache and policy
        (kv: any spec the model accepts; default: the model's). Close it to free its cache."""
        with self._lock:
            self._check_open()
            sess = Session(self, kv)
            self._sessions.add(sess)
            return sess

    def step(self, sessions: Sequence[Session], ids: Sequence[Sequence[int]], *, defer: bool = False) -> list[np.ndarray]:
        """One pass over the weights for several sessions: session i appends ids[i] (1 token when
        decoding, a chunk when prefilling); returns each session's last logits (float32, vocab).

        The matmuls run once over every session's rows (at most n_batch per pass); attention runs
        per session over its own cache at its own position and KV policy. Each session's logits are
        what ``session.eval(ids[i])`` alone gives (float summation order aside: see
        docs/architecture.md), and the KV decisions after the step are the same. A chunk (more
        than one token) under a policy that reads token features needs logits at every position
        and runs on its own, in the same call. defer: as in Session.eval.
        """
        return _step(self, sessions, ids, defer=defer)

    def _raise_for(self, rc: int) -> None:
        if rc == lib.EK_ERR_CONTEXT:
            raise ContextOverflowError(self._c_error())
        if rc == lib.EK_ERR_TOKEN:
            raise ValueError(self._c_error())
        if rc != 0:
            raise EdgekvError(self._c_error())

    # thin delegates to the default session, for callers written before sessions
    def _eval(self, ids: np.ndarray, logits_mode: int, out: np.ndarray | None, policy: KVPolicy | None = None,
              defer: bool = False) -> None:
        self._session._eval(ids, logits_mode, out, policy, defer)

    def _eval_raw(self, ids: np.ndarray, logits_mode: int, out: np.ndarray | None) -> None:
        self._session._eval_raw(ids, logits_mode, out)

    def _truncate(self, n: int) -> None:
        self._session._truncate(n)

    def _record_logit_features(self, first_pos: int, logits: np.ndarray) -> None:
        self._session._record_logit_features(first_pos, logits)

    def _features(self, positions, frozen: tuple | None = None) -> TokenFeatures:
        return self._session._features(positions, frozen)

    def _controller_rarity(self, pos: np.ndarray) -> np.ndarray:
        return self._session._controller_rarity(pos)

    def _apply_policy(self, policy: KVPolicy, flush: bool = False, defer: bool = False) -> None:
        self._session._apply_policy(policy, flush, defer)

    def _prefill_prompt(self, ids: np.ndarray, policy: KVPolicy) -> tuple[np.ndarray, int]:
        return self._session._prefill_prompt(ids, policy)

    @property
    def _tokens(self) -> list[int]:
        return self._session.tokens

    @property
    def _logits(self) -> np.ndarray:
        return self._session._logits

    @property
    def _ctx_policy(self) -> KVPolicy | None:
        return self._session._ctx_policy

    @_ctx_policy.setter
    def _ctx_policy(self, policy: KVPolicy | None) -> None:
        self._session._ctx_policy = policy

    @property
    def _att_sum(self) -> np.ndarray:
        return self._session._att_sum

    @property
    def _att_sumsq(self) -> np.ndarray:
        return self._session._att_sumsq

    @property
    def _att_count(self) -> np.ndarray:
        return self._session._att_count

    def features(self, positions) -> TokenFeatures:
        """Token features (see edgekv.kv_policy) of cached positions of the default session."""
        return self._session.features(positions)

    # ---- learned-controller support (edgekv.controller) --------------------------------------

    @staticmethod
    def _bind_policy(policy: KVPolicy, model: "Model") -> None:
        """Policies that depend on the model (the learned controller) attach to it before deciding."""
        bind = getattr(policy, "bind", None)
        if bind is not None:
            bind(model)

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
        """(key bits, value bits) of every cached position of the default session: (n_past,) arrays,
        or (n_layer, n_past) with per_layer=True. Without per_layer, a cache whose layers differ
        raises ValueError."""
        return self._session.kv_bits(per_layer)

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
        return self._session.kv_avg_bits

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
        """Bytes the KV cache of the default session holds for the tokens now in context."""
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
        json_schema: dict | None = None,
    ) -> str | Iterator[str]:
        """Continue prompt (text or token ids). Greedy when temperature == 0.

        Returns the text, or with stream=True an iterator of text pieces. Stops at an
        end-of-turn token, a stop string, max_tokens, or a full context. Statistics
        of the run are in ``model.last_stats`` afterwards. kv: this call's KV policy
        (default: the one given at load). json_schema: the reply is JSON valid under this schema
        (a logits mask, edgekv.structured; ``{"type": "object"}`` for any JSON object).

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
        stop = check_stop(stop)
        self._check_open()
        ids = self._text_or_ids("prompt", prompt, special=True)
        if ids.size >= self.n_ctx:
            raise ContextOverflowError(
                f"prompt of {ids.size} tokens does not fit in ctx {self.n_ctx} (with room to generate)"
            )
        policy = self.kv_policy if kv is None else self._check_policy(parse_policy(kv))
        mask = None
        if json_schema is not None:
            from .structured import JSONSchemaMask
            mask = JSONSchemaMask(self.tokenizer, json_schema)
        it = self._generate_iter(ids, max_tokens, params, stop, policy, mask)
        return it if stream else "".join(it)

    def _generate_iter(self, ids, max_tokens, params, stop, policy, mask=None) -> Iterator[str]:
        stats = GenerationStats(prompt_tokens=int(ids.size))
        self.last_stats = stats
        sampler = Sampler(params)
        text = StopText(self.tokenizer.stream_decoder(), stop)
        tail = ""
        eot = self.tokenizer.eot_ids
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
                if mask is not None:
                    mask.apply(logits)
                tok = sampler(logits)
                stats.generated_tokens += 1
                if mask is not None:
                    mask.accept(tok)
                if tok in eot:
                    stats.finish_reason = "stop"
                    break
                piece = text.push(tok)
                if text.stopped:
                    stats.finish_reason = "stop"
                    tail = piece  # yielded after the statistics are final
                    break
                if piece:
                    yield piece
                if mask is not None and mask.done:
                    stats.finish_reason = "stop"
                    break
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
        rest = tail + text.flush()
        if rest:
            yield rest

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
