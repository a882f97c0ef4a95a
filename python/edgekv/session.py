"""Session: one sequence over a Model's weights: its KV cache (a C ek_seq), tokens and KV policy.

A Model holds the weights, tokenizer and config, and one default session that its own
generate/chat/score/logits use. ``Model.new_session()`` gives more; ``Model.step()`` runs one
pass over the weights for several sessions at once (see there).

Threads: every call on a session holds its model's lock (the sessions of one model share the
model's scratch buffers and threads in C), so sessions may be used from several threads; their
calls take turns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from . import _native
from .errors import ContextOverflowError, EdgekvError, ModelClosedError
from .kv_policy import KVPolicy, TokenFeatures, parse_policy

if TYPE_CHECKING:
    from .model import Model

ffi, lib = _native.ffi, _native.lib

_LOGITS_MODES = {"last": lib.EK_LOGITS_LAST, "all": lib.EK_LOGITS_ALL, "none": lib.EK_LOGITS_NONE}

# Generation: a KV policy that reads token features (the learned controller, the rule baseline)
# runs once per this many due tokens instead of at every step (see Session._apply_policy).
KV_DECIDE_BATCH = 16


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


class Session:
    """One sequence: ids in the cache (``tokens``), its KV store and its KV policy."""

    def __init__(self, model: "Model", kv=None, *, _default: bool = False):
        self.model = model
        self._default = _default
        if _default:
            self._seq = lib.ek_model_seq(model._handle)
            self._kv = None  # follows model.kv_policy
        else:
            self._kv = model.kv_policy if kv is None else model._check_policy(parse_policy(kv))
            seq = lib.ek_seq_create(model._handle)
            if seq == ffi.NULL:
                raise MemoryError(model._c_error())
            self._seq = seq
        ctx, vocab = model.n_ctx, model.vocab_size
        self.tokens: list[int] = []  # what the C sequence holds, position by position
        self._logits = np.empty(vocab, dtype=np.float32)
        self._ctx_policy: KVPolicy | None = None  # the policy the cached tokens were stored under
        self._kv_decided = 0  # positions below this have had their precision decided or queued
        self._keys_quantized = False  # a key below 16 bits was stored since the cache was last empty
        self._prefill: _Prefill | None = None  # the last fresh prefill, while it can be reused exactly
        self._stats_buf = np.empty((3, 1), np.float32)  # a decode step's logit statistics (from C)
        self._stats_ptr = ffi.cast("float *", self._stats_buf.ctypes.data)
        self._last_logp_row = None
        # generation steps' due tokens waiting for a batched decision, with their frozen features:
        # (positions, attention sum, sum of squares, count, age)
        self._pending: list[tuple] = []
        # per-position next-token statistics (NaN where logits were not computed)
        self._entropy = np.full(ctx, np.nan, np.float32)
        self._max_prob = np.full(ctx, np.nan, np.float32)
        self._logprob = np.full(ctx, np.nan, np.float32)
        # zero-copy views of the C store's attention statistics
        self._att_sum = np.frombuffer(ffi.buffer(lib.ek_seq_attn_stat_sum(self._seq), 8 * ctx), np.float64)
        self._att_sumsq = np.frombuffer(ffi.buffer(lib.ek_seq_attn_stat_sumsq(self._seq), 8 * ctx), np.float64)
        self._att_count = np.frombuffer(ffi.buffer(lib.ek_seq_attn_stat_count(self._seq), 4 * ctx), np.int32)

    # ---- lifetime ----------------------------------------------------------

    def close(self) -> None:
        """Free this session's KV cache (idempotent; later calls raise ModelClosedError)."""
        if self._default:
            raise ValueError("the default session closes with its model: use Model.close()")
        with self._hold():
            self._free()

    def _hold(self):
        """The model's lock for a call on this session. The lock also records which stream used
        the default session's cache last (Model.generate); a call on another session leaves that."""
        return self.model._lock if self._default else self.model._lock.reading()

    def _free(self) -> None:
        if self._seq != ffi.NULL:
            if not self._default:  # the default sequence is freed with the model
                lib.ek_seq_free(self._seq)
            self._seq = ffi.NULL
            self.tokens.clear()
            self.model._sessions.discard(self)

    @property
    def closed(self) -> bool:
        return self._seq == ffi.NULL

    def _check_open(self) -> None:
        if self._seq == ffi.NULL:
            self.model._check_open()
            raise ModelClosedError(f"{self!r} is closed")

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        # no lock: freeing a sequence touches only its own memory, and nothing else refers to it now
        try:
            if not self._default:
                self._free()
        except Exception:
            pass

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{len(self.tokens)} tokens"
        return f"<edgekv.Session of {self.model.name} ({'default, ' if self._default else ''}{state})>"

    # ---- public ------------------------------------------------------------

    @property
    def n_past(self) -> int:
        return len(self.tokens)

    @property
    def kv_policy(self) -> KVPolicy:
        return self.model.kv_policy if self._kv is None else self._kv

    def set_kv(self, kv) -> None:
        """This session's KV policy (any spec Model accepts; for the default session, the model's).
        Cached tokens were stored under the old policy: a session holding any is cleared now."""
        policy = self.model._check_policy(parse_policy(kv))
        with self._hold():
            self._check_open()
            if self.tokens and policy is not self._ctx_policy:
                self._truncate(0)
            if self._default:
                self.model.kv_policy = policy
            else:
                self._kv = policy

    def eval(self, ids, *, logits: str = "last", out: np.ndarray | None = None, kv=None,
             defer: bool = False) -> np.ndarray | None:
        """Append ids to the cache and run them; the last position's logits (float32, vocab).

        logits: "last" (a copy of the last position's row), "all" (every position's rows,
        (len(ids), vocab); into out when given) or "none" (returns None, computes no logits).
        kv: a KV policy for this call instead of the session's. defer: a generation step
        (precision decisions of feature-reading policies batched, see _apply_policy). A cache
        stored under another policy than the call's is cleared first.
        """
        mode = _LOGITS_MODES.get(logits)
        if mode is None:
            raise ValueError(f"logits must be one of {sorted(_LOGITS_MODES)}, got {logits!r}")
        arr = self.model._as_ids(ids)
        policy = None if kv is None else self.model._check_policy(parse_policy(kv))
        if mode == lib.EK_LOGITS_ALL:
            shape = (arr.size, self.model.vocab_size)
            if out is None:
                out = np.empty(shape, np.float32)
            elif out.shape != shape or out.dtype != np.float32 or not out.flags.c_contiguous:
                raise ValueError(f"out must be a C-contiguous float32 array of shape {shape}")
        elif out is not None:
            raise ValueError('out= takes the rows of logits="all"')
        with self._hold():
            self._check_open()
            if mode == lib.EK_LOGITS_LAST:
                self._eval(arr, mode, self._logits, policy, defer)
                return self._logits.copy()
            self._eval(arr, mode, out, policy, defer)
            if mode == lib.EK_LOGITS_ALL:
                self._logits[...] = out[-1]
            return out

    def set_bits(self, positions, k_bits, v_bits, layer: int = -1) -> None:
        """Re-encode cached positions at these key/value bit-widths (16, 8, 4, 3 or 2), in every
        layer (-1) or one; outside of the session's KV policy."""
        pos = np.ascontiguousarray(positions, dtype=np.int32).reshape(-1)
        kb = np.ascontiguousarray(k_bits, dtype=np.int32).reshape(-1)
        vb = np.ascontiguousarray(v_bits, dtype=np.int32).reshape(-1)
        if not pos.size == kb.size == vb.size:
            raise ValueError(f"{pos.size} positions, {kb.size} key and {vb.size} value bit-widths")
        with self._hold():
            self._check_open()
            rc = lib.ek_seq_kv_set_layer_bits(self._seq, int(layer), ffi.cast("int32_t *", pos.ctypes.data),
                                              ffi.cast("int32_t *", kb.ctypes.data), ffi.cast("int32_t *", vb.ctypes.data),
                                              pos.size)
            if rc != 0:
                raise ValueError(self._c_error())
            if (kb < 16).any():
                self._keys_quantized = True
            if pos.size and self._prefill is not None and int(pos.min()) < len(self._prefill.ids):
                self._prefill = None

    def truncate(self, n: int) -> None:
        """Keep the first n cached tokens."""
        with self._hold():
            self._check_open()
            if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 0 <= n <= len(self.tokens):
                raise ValueError(f"cannot truncate to {n!r}: the session holds {len(self.tokens)} tokens")
            self._truncate(int(n))

    def logits(self) -> np.ndarray:
        """The logits of the last eval (a copy)."""
        self._check_open()
        if not self.tokens:
            raise ValueError("the session holds no tokens: eval() some first")
        return self._logits.copy()

    def kv_bytes(self) -> int:
        """Bytes the KV cache holds for the tokens now in context (0 once closed)."""
        with self.model._lock.reading():
            if self.closed:
                return 0
            return int(lib.ek_seq_kv_bytes_used(self._seq))

    def kv_bits(self, per_layer: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(key bits, value bits) of every cached position: (n_past,) arrays, or (n_layer, n_past)
        with per_layer=True. Without per_layer, a cache whose layers differ raises ValueError."""
        with self.model._lock.reading():
            self._check_open()
            n, n_layer = len(self.tokens), self.model.hparams["n_layer"]
            k = np.empty((n_layer, n), np.int32)
            v = np.empty((n_layer, n), np.int32)
            for layer in range(n_layer if n else 0):
                lib.ek_seq_kv_get_layer_bits(self._seq, layer, ffi.cast("int32_t *", k[layer].ctypes.data),
                                             ffi.cast("int32_t *", v[layer].ctypes.data))
            if per_layer:
                return k, v
            if n and not ((k == k[0]).all() and (v == v[0]).all()):
                raise ValueError("the KV cache's bits differ by layer: use kv_bits(per_layer=True)")
            return k[0].copy(), v[0].copy()

    @property
    def kv_avg_bits(self) -> float:
        """Average bits per cached key/value element over every layer, scales and minimums included
        (maps excluded)."""
        self._check_open()
        n = len(self.tokens)
        hp = self.model.hparams
        elems = n * hp["n_layer"] * hp["n_head_kv"] * hp["head_dim"] * 2
        return 8.0 * lib.ek_seq_kv_data_bytes(self._seq) / elems if elems else float("nan")

    def features(self, positions) -> TokenFeatures:
        """Token features (see edgekv.kv_policy) of cached positions."""
        return self._features(positions)

    # ---- the C sequence (callers hold the model's lock and have validated ids) -----------------

    def _c_error(self) -> str:
        return self.model._c_error()

    def _begin(self, ids: np.ndarray, policy: KVPolicy) -> None:
        """What an eval does before its forward pass: switch policy (clearing a cache stored under
        another), drop a prefill snapshot that new queries would change, take the log-prob of ids[0]."""
        if self._ctx_policy is not policy:
            if self.tokens:
                self._truncate(0)  # cached tokens were stored under another policy
            self._ctx_policy = policy
            # attention statistics cost a little per step: gather them only for policies that read them
            lib.ek_seq_set_collect_stats(self._seq, int(bool(policy.needs_features)))
        if self._prefill is not None and policy.needs_features and self._kv_decided < len(self._prefill.ids):
            self._prefill = None  # new queries change the attention features of its undecided tokens
        if policy.needs_features:
            self._take_prev_logprob(len(self.tokens), int(ids[0]))

    def _eval(self, ids: np.ndarray, logits_mode: int, out: np.ndarray | None, policy: KVPolicy | None = None,
              defer: bool = False) -> None:
        """Append ids to the context, run them, then let the KV policy decide the tokens that are due.

        The caller holds the lock and has validated ids. policy: the call's KV policy
        (default: the session's); logits are widened to every position when it needs features.
        defer: a generation step (see _apply_policy).
        """
        policy = policy or self.kv_policy
        self._begin(ids, policy)
        first = len(self.tokens)
        own = None
        if policy.needs_features and logits_mode != lib.EK_LOGITS_ALL and ids.size > 1:
            own = np.empty((ids.size, self.model.vocab_size), np.float32)
            self._eval_raw(ids, lib.EK_LOGITS_ALL, own)
            if out is not None:
                out[...] = own[-1]
            self._record_logit_features(first, own)
        else:
            self._eval_raw(ids, logits_mode, out)
            if out is not None:
                rows = out.reshape(-1, self.model.vocab_size)
                self._record_logit_features(first + ids.size - rows.shape[0], rows)
        self._apply_policy(policy, defer=defer)

    def _eval_raw(self, ids: np.ndarray, logits_mode: int, out: np.ndarray | None) -> None:
        self._check_open()  # a suspended stream may resume after close(): never pass C a freed handle
        if len(self.tokens) + ids.size > self.model.n_ctx:
            raise ContextOverflowError(
                f"context overflow: {len(self.tokens)} tokens in context + {ids.size} new > ctx {self.model.n_ctx}"
            )
        optr = ffi.NULL if out is None else ffi.cast("float *", out.ctypes.data)
        self._keep_logp_row(out)
        rc = lib.ek_forward_seq(self._seq, ffi.cast("int32_t *", ids.ctypes.data), ids.size, logits_mode, optr)
        self.model._raise_for(rc)
        self.tokens.extend(int(t) for t in ids)

    def _keep_logp_row(self, out: np.ndarray | None) -> None:
        prev = self._last_logp_row
        if prev is not None and out is not None and np.shares_memory(prev[1], out):
            self._last_logp_row = (prev[0], prev[1].copy(), prev[2])  # still needed, about to be overwritten

    def _truncate(self, n: int) -> None:
        if lib.ek_truncate_seq(self._seq, n) != 0:
            raise EdgekvError(self._c_error())
        del self.tokens[n:]
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

    # ---- token features -----------------------------------------------------------------------

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
        vocab = self.model.vocab_size
        logits = np.ascontiguousarray(logits, dtype=np.float32).reshape(-1, vocab)
        n = logits.shape[0]
        stats = self._stats_buf if n == 1 else np.empty((3, n), np.float32)  # max logit, log s, entropy
        # a one-row call (a decode step) had them computed inside its output matmul
        if n > 1 or lib.ek_seq_last_logit_stats(self._seq, self._stats_ptr) != 0:
            rc = lib.ek_logit_stats(ffi.cast("float *", logits.ctypes.data), n, vocab,
                                    *(ffi.cast("float *", stats[i].ctypes.data) for i in range(3)))
            assert rc == 0
        mx, log_s, ent = stats
        self._entropy[first_pos:first_pos + n] = ent
        self._max_prob[first_pos:first_pos + n] = np.exp(-log_s)
        lse = mx + log_s  # log of the full partition sum
        nxt = np.arange(first_pos + 1, min(first_pos + n, len(self.tokens)))
        if nxt.size:
            ids = np.asarray([self.tokens[j] for j in nxt])
            rows = nxt - 1 - first_pos
            self._logprob[nxt] = logits[rows, ids] - lse[rows]
        # -- the last row predicts the first token of the next call (_take_prev_logprob); kept as
        # a view: copying 49k floats per step cost more than the statistics themselves
        self._last_logp_row = (first_pos + n - 1, logits[-1], float(lse[-1]))

    def _take_prev_logprob(self, pos: int, token: int) -> None:
        """Log-prob of the token at pos from the previous call's last row (before a forward pass
        can overwrite that row)."""
        prev, self._last_logp_row = self._last_logp_row, None
        if prev is not None and prev[0] == pos - 1:
            self._logprob[pos] = prev[1][token] - prev[2]

    def _changing_features(self, pos: np.ndarray) -> tuple:
        """The inputs of a position's features that keep changing as tokens are added: the
        attention it received (sum, sum of squares, count: copies, as fancy indexing makes) and its age."""
        return self._att_sum[pos], self._att_sumsq[pos], self._att_count[pos], len(self.tokens) - 1 - pos

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
            token_ids=np.asarray([self.tokens[j] for j in pos], dtype=np.int32),
            entropy=self._entropy[pos].copy(),
            max_prob=self._max_prob[pos].copy(),
            logprob=self._logprob[pos].copy(),
            attn_mean=mean.astype(np.float32),
            attn_var=var.astype(np.float32),
            age=np.asarray(age).astype(np.int32),
            rarity=self._controller_rarity(pos),
        )

    def _controller_rarity(self, pos: np.ndarray) -> np.ndarray:
        """Rarity of the tokens at pos: prior table of this tokenizer + counts in the context."""
        m = self.model
        prior = getattr(m, "_rarity_prior", None)
        if prior is None:
            from .controller import RarityPrior

            prior = m._rarity_prior = RarityPrior.for_tokenizer(m.tokenizer)
        return prior.rarity(self.tokens, pos)

    # ---- KV policy ----------------------------------------------------------------------------

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
        upto = len(self.tokens) - (0 if flush else policy.window)
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
        self.model._bind_policy(policy, self.model)
        n_layer = self.model.hparams["n_layer"]
        if policy.needs_features:
            feats = self._features(pos, frozen)
        else:  # a static policy at every decode step: skip the statistics and rarity (~0.3 ms)
            self._check_open()
            ids = np.asarray([self.tokens[j] for j in pos], dtype=np.int32)
            feats = TokenFeatures.of_positions(pos, ids, (len(self.tokens) - 1 - pos).astype(np.int32))
        per_layer = hasattr(policy, "decide_layers")
        if per_layer:  # (n_layer, n) bits; one call for all layers where every layer agrees
            k_bits, v_bits = policy.decide_layers(feats, n_layer)
        else:
            k_bits, v_bits = policy.decide(feats)
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
        # one cast per array, then pointer arithmetic per layer (k_bits/v_bits are C-contiguous)
        pp, kp, vp = (ffi.cast("int32_t *", a.ctypes.data) for a in (pos, k_bits, v_bits))
        for layer in range(n_layer) if per_layer else (-1,):
            off = layer * pos.size if per_layer else 0
            rc = lib.ek_seq_kv_set_layer_bits(self._seq, layer, pp, kp + off, vp + off, pos.size)
            if rc != 0:
                raise ValueError(f"KV policy {policy.name}: {self._c_error()}")

    # ---- prompts ------------------------------------------------------------------------------

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
                and len(self.tokens) >= ids.size and snap.ids == tuple(ids.tolist())):
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
        row = self._last_logp_row
        self._prefill = _Prefill(
            ids=tuple(ids.tolist()), policy=policy, logits=self._logits.copy(),
            logp_row=None if row is None else (row[0], np.array(row[1], copy=True), row[2]),
            keys_quantized=self._keys_quantized,
        )
        return self._logits, ids.size


def step(model: "Model", sessions, ids, *, defer: bool = False) -> list[np.ndarray]:
    """Model.step: one pass over the weights for several sessions (see there)."""
    if not isinstance(sessions, (list, tuple)) or not sessions:
        raise ValueError("step() needs a non-empty list of sessions")
    if not isinstance(ids, (list, tuple)) or len(ids) != len(sessions):
        raise ValueError(f"step() needs one id list per session: {len(sessions)} sessions, "
                         f"{len(ids) if isinstance(ids, (list, tuple)) else type(ids).__name__} id lists")
    seen = set()
    for i, s in enumerate(sessions):
        if not isinstance(s, Session) or s.model is not model:
            raise ValueError(f"sessions[{i}] is not a session of {model!r}")
        if id(s) in seen:
            raise ValueError(f"sessions[{i}] appears twice in one step")
        seen.add(id(s))
    arrs = []
    for i, x in enumerate(ids):
        try:
            arrs.append(model._as_ids(x))
        except ValueError as e:
            raise ValueError(f"ids[{i}]: {e}") from None
    vocab = model.vocab_size
    with model._lock if any(s._default for s in sessions) else model._lock.reading():
        model._check_open()
        for i, (s, a) in enumerate(zip(sessions, arrs)):
            s._check_open()
            if len(s.tokens) + a.size > model.n_ctx:
                raise ContextOverflowError(
                    f"sessions[{i}]: context overflow: {len(s.tokens)} tokens in context + {a.size} new > ctx {model.n_ctx}"
                )
        out: list[np.ndarray | None] = [None] * len(sessions)
        # a chunk under a feature-reading policy needs every position's logits: it runs on its own
        alone = [i for i, (s, a) in enumerate(zip(sessions, arrs)) if s.kv_policy.needs_features and a.size > 1]
        batch = [i for i in range(len(sessions)) if i not in alone]
        for i in alone:
            s = sessions[i]
            s._eval(arrs[i], lib.EK_LOGITS_LAST, s._logits, defer=defer)
            out[i] = s._logits.copy()
        if batch:
            policies = [sessions[i].kv_policy for i in batch]
            for i, p in zip(batch, policies):
                sessions[i]._begin(arrs[i], p)
            rows = np.empty((len(batch), vocab), np.float32)
            seqs = ffi.new("ek_seq *[]", [sessions[i]._seq for i in batch])
            toks = np.ascontiguousarray(np.concatenate([arrs[i] for i in batch]), dtype=np.int32)
            counts = np.asarray([arrs[i].size for i in batch], dtype=np.int32)
            rc = lib.ek_forward_batch(model._handle, seqs, len(batch), ffi.cast("int32_t *", toks.ctypes.data),
                                      ffi.cast("int32_t *", counts.ctypes.data), ffi.cast("float *", rows.ctypes.data))
            model._raise_for(rc)
            for r, (i, p) in enumerate(zip(batch, policies)):
                s = sessions[i]
                first = len(s.tokens)
                s.tokens.extend(int(t) for t in arrs[i])
                s._record_logit_features(first + arrs[i].size - 1, rows[r:r + 1])
                s._logits[...] = rows[r]
                out[i] = rows[r]
            for i, p in zip(batch, policies):
                sessions[i]._apply_policy(p, defer=defer)
        return out
