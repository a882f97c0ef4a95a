"""Entropy adaptive decoding (EAD): a small model writes, a larger one of the same family
takes over while the text is hard.

    import edgekv
    with edgekv.load_pair("qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b") as pair:
        print(pair.generate("What is 17*23?", max_tokens=64, temperature=0))
        print(pair.last_stats.line())

The rule (after Simonds, arXiv 2502.06833): before each token, the active model's next-token
distribution gives an entropy H (bits). The rolling entropy is the mean of the last ``window``
entropies, one per generated position, each from the model that was active at that position.
The small model hands over to the large one when the rolling entropy exceeds ``tau``; the large
one hands back when it falls below ``tau_low`` (default ``tau``) after it has written at least
``d_min`` tokens. A switch takes effect at once: the token at the position where the rule
fired is written by the newly active model.

Catch-up: each model keeps its own KV cache. When a model becomes active it runs, in one batch,
exactly the tokens of the shared sequence it has not seen (its cache of the common prefix stays
valid), and the last of them gives its distribution for the current position.

``verify=True`` (speculative-decoding style): the small model's tokens are tentative. When the
large model catches up (at a switch up, when the small model ends the text, or after
``max_draft`` unchecked tokens) it gets its own distribution at every one of them from that same
batch, accepts each small-model token with probability min(1, p_large / p_small) and replaces
the first one it rejects by a sample from the residual max(0, p_large - p_small) (greedy: keeps
tokens while they are the large model's argmax and writes its argmax at the first that is not),
dropping everything after it. Every token is then distributed as the large model alone would
write it (greedy: the output is the large model's greedy output), so the switching rule only
decides how long the small model drafts. Text is streamed only once it is checked.
``verify_window=N`` checks only the last N tentative tokens at each verification and keeps the
older ones unchecked: a rejection then throws away at most N tokens (long drafts are where full
verification wastes most), at the price of that guarantee.

``EntropySwitch`` is the rule on its own and ``simulate_switching`` runs it over given entropy
sequences (teacher forcing: see benchmarks/ead.py).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator, List, Optional, Sequence

import numpy as np

from . import _native
from ._native import ffi
from .errors import ContextOverflowError, ModelLoadError, TokenizerError
from .model import Model
from .sampling import SamplingParams, distribution
from .stop import StopText, check_stop

lib = _native.lib

SMALL, LARGE = "small", "large"

# Defaults tuned on Qwen2.5-Coder 0.5B/1.5B; how each was chosen: docs/decisions.md.
DEFAULT_WINDOW = 1
DEFAULT_TAU = 0.3
DEFAULT_D_MIN = 1

EntropyFn = Callable[[str, np.ndarray, int], float]


# --------------------------------------------------------------------------------------------
# entropy
# --------------------------------------------------------------------------------------------

_LN2 = math.log(2.0)


def entropy_bits(logits: np.ndarray) -> float:
    """Entropy, in bits, of softmax(logits) (a 1-D array of raw logits).

    Computed in C (ek_logit_stats: one vectorized pass in float32, ~0.1 ms for a 152k vocabulary;
    the float64 NumPy form below took 3-6 ms, a quarter of a 0.5B decode step); within 1e-4 bits
    of the float64 form (tests). Rows C reports as non-finite (an -inf logit) take the float64 form.
    """
    z = np.ascontiguousarray(logits, dtype=np.float32).reshape(-1)
    out = np.empty(3, np.float32)
    p = [ffi.cast("float *", out[i:].ctypes.data) for i in range(3)]
    if z.size and lib.ek_logit_stats(ffi.cast("float *", z.ctypes.data), 1, z.size, *p) == 0 and np.isfinite(out[2]):
        return float(out[2]) / _LN2
    return entropy_bits_f64(logits)


def entropy_bits_f64(logits: np.ndarray) -> float:
    """entropy_bits in float64 NumPy (the reference; handles -inf logits)."""
    z = np.asarray(logits, dtype=np.float64)
    z = np.maximum(z - z.max(), -1e300)  # -inf logits: probability 0, contributing 0 (not NaN)
    e = np.exp(z)
    s = e.sum()
    return float((math.log(s) - float(np.dot(e, z)) / s) / _LN2)


def entropy_bits_rows(logits: np.ndarray) -> np.ndarray:
    """Row-wise entropy in bits of softmax over the last axis of a 2-D logits array."""
    z = np.asarray(logits, dtype=np.float64)
    z = np.maximum(z - z.max(axis=1, keepdims=True), -1e300)
    e = np.exp(z)
    s = e.sum(axis=1)
    return (np.log(s) - (e * z).sum(axis=1) / s) / _LN2


def default_entropy(role: str, logits: np.ndarray, position: int) -> float:
    """The entropy source EAD uses unless given another: H(softmax(logits)) in bits."""
    return entropy_bits(logits)


# --------------------------------------------------------------------------------------------
# the switching rule
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class EADConfig:
    """Parameters of entropy adaptive decoding (see the module docstring)."""

    tau: float = DEFAULT_TAU          # switch up when the rolling entropy (bits) exceeds this
    window: int = DEFAULT_WINDOW      # entropies averaged (one per generated position)
    d_min: int = DEFAULT_D_MIN        # tokens the large model writes before it may hand back
    tau_low: Optional[float] = None   # switch down below this (default: tau; lower = hysteresis)
    verify: bool = False              # the large model checks the small model's tokens
    max_draft: int = 0                # verify: check after this many unchecked tokens (0: never forced)
    verify_window: int = 0            # verify: check only the last this many tentative tokens (0: all)

    def __post_init__(self):
        for name in ("tau", "tau_low"):
            v = getattr(self, name)
            if v is None and name == "tau_low":
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v):
                raise ValueError(f"{name} must be a number (bits), got {v!r}")
        for name, lo in (("window", 1), ("d_min", 1), ("max_draft", 0), ("verify_window", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
                raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
        if self.tau_low is not None and self.tau_low > self.tau:
            raise ValueError(f"tau_low ({self.tau_low}) must not exceed tau ({self.tau})")
        for name in ("max_draft", "verify_window"):
            if getattr(self, name) and not self.verify:
                raise ValueError(f"{name} applies to verify mode only (set verify=True)")

    @property
    def tau_down(self) -> float:
        return self.tau if self.tau_low is None else self.tau_low


class EntropySwitch:
    """The switching rule alone: feed it one entropy per position, in order.

        rule = EntropySwitch(EADConfig(tau=2.0))
        for each position:
            rule.decide(entropy_of_the_active_models_distribution)   # True when it switched
            ... rule.active writes the token ...
            rule.wrote()
    """

    def __init__(self, config: EADConfig):
        self.config = config
        self.reset()

    def reset(self) -> None:
        self.active = SMALL
        self.run = 0                    # tokens the active model has written since it became active
        self.history: List[float] = []  # one entropy per decided position
        self.switches = 0

    @property
    def rolling(self) -> float:
        """Mean of the last ``window`` entropies (NaN before the first)."""
        w = self.history[-self.config.window:]
        return sum(w) / len(w) if w else float("nan")

    def decide(self, entropy: float) -> bool:
        """Record the active model's entropy at the next position; switch if the rule says so."""
        self.history.append(float(entropy))
        r = self.rolling
        cfg = self.config
        if self.active == SMALL:
            switch = r > cfg.tau
        else:
            switch = self.run >= cfg.d_min and r < cfg.tau_down
        if switch:
            self.active = LARGE if self.active == SMALL else SMALL
            self.run = 0
            self.switches += 1
        return switch

    def wrote(self) -> None:
        self.run += 1

    # verify mode rolls positions back
    def snapshot(self) -> tuple:
        return (self.active, self.run, len(self.history), self.switches)

    def restore(self, snap: tuple) -> None:
        self.active, self.run, n, self.switches = snap
        del self.history[n:]


def simulate_switching(entropy_small: np.ndarray, entropy_large: np.ndarray, config: EADConfig) -> np.ndarray:
    """Teacher-forced EAD: which model is active at each position (True = large).

    entropy_small[t], entropy_large[t]: each model's next-token entropy (bits) at position t of a
    fixed text. The rule sees, at each position, the entropy of the model active there."""
    es = np.asarray(entropy_small, dtype=np.float64)
    el = np.asarray(entropy_large, dtype=np.float64)
    if es.shape != el.shape or es.ndim != 1:
        raise ValueError("entropy_small and entropy_large must be 1-D arrays of the same length")
    rule = EntropySwitch(config)
    out = np.zeros(es.size, dtype=bool)
    for t in range(es.size):
        rule.decide(el[t] if rule.active == LARGE else es[t])
        out[t] = rule.active == LARGE
        rule.wrote()
    return out


# --------------------------------------------------------------------------------------------
# statistics
# --------------------------------------------------------------------------------------------

@dataclass
class EADStats:
    prompt_tokens: int = 0
    generated_tokens: int = 0      # tokens of the final text (an end token included)
    small_tokens: int = 0          # of those, written by each model
    large_tokens: int = 0
    switches_up: int = 0
    switches_down: int = 0
    small_evaluated: int = 0       # tokens each model ran (prompt, catch-up, decode, rework)
    large_evaluated: int = 0
    catchup_tokens: int = 0        # generated tokens run only to catch a model up
    catchup_batches: int = 0
    catchup_s: float = 0.0         # time of the batches that included catch-up tokens
    catchup_overhead_s: float = 0.0  # of that, beyond one decode step each (the ideal)
    verifications: int = 0         # verify: times the large model checked tentative tokens
    checked_tokens: int = 0        # verify: small-model tokens submitted to it
    rejected_tokens: int = 0       # verify: of those, thrown away (the first rejected and all after it)
    small_s: float = 0.0           # time inside each model's forward passes (the rest of wall_s is
    large_s: float = 0.0           #   Python: entropy, sampling, bookkeeping)
    wall_s: float = 0.0
    relative_compute: float = float("nan")  # parameter-weighted tokens run / the large model's alone
    #   (large alone: the prompt past what its cache held at the start, then the text)
    finish_reason: str = ""
    sources: List[str] = field(default_factory=list, repr=False)  # per generated token: "small"/"large"
    tokens: List[int] = field(default_factory=list, repr=False)   # the generated token ids

    @property
    def large_share(self) -> float:
        n = self.small_tokens + self.large_tokens
        return self.large_tokens / n if n else float("nan")

    @property
    def switches(self) -> int:
        return self.switches_up + self.switches_down

    @property
    def ms_per_token(self) -> float:
        return 1000.0 * self.wall_s / self.generated_tokens if self.generated_tokens else float("nan")

    @property
    def catchup_overhead(self) -> float:
        """Catch-up time beyond the ideal, as a fraction of the run's time without it."""
        base = self.wall_s - self.catchup_overhead_s
        return self.catchup_overhead_s / base if base > 0 else float("nan")

    @property
    def acceptance(self) -> float:
        return 1.0 - self.rejected_tokens / self.checked_tokens if self.checked_tokens else float("nan")

    def as_dict(self, sources: bool = False) -> dict:
        d = asdict(self)
        if not sources:
            d.pop("sources")
            d.pop("tokens")
        d.update(large_share=self.large_share, switches=self.switches, ms_per_token=self.ms_per_token,
                 catchup_overhead=self.catchup_overhead, acceptance=self.acceptance)
        return d

    def line(self) -> str:
        s = (
            f"{self.generated_tokens} tok: small {self.small_tokens}, large {self.large_tokens} "
            f"({100 * self.large_share:.0f}% large) | {self.switches} switches | "
            f"catch-up {self.catchup_tokens} tok (+{100 * self.catchup_overhead:.1f}% time) | "
            f"compute {self.relative_compute:.2f}x large-only | "
            f"{self.ms_per_token:.1f} ms/tok, {self.wall_s:.2f} s | {self.finish_reason}"
        )
        if self.verifications:
            s += f" | verify: {self.checked_tokens} checked, {self.rejected_tokens} rejected"
        return s


def compute_params(model: Model) -> int:
    """Weights a token is multiplied through (the token embedding only when it is also the output)."""
    ws = model._gguf.weights
    n = sum(w.n_in * w.n_out for w in ws if w.kind != lib.EK_T_TOK_EMBD)
    if not any(w.kind == lib.EK_T_OUTPUT for w in ws):
        n += sum(w.n_in * w.n_out for w in ws if w.kind == lib.EK_T_TOK_EMBD)
    return int(n)


# --------------------------------------------------------------------------------------------
# sampling distributions (speculative verification needs them explicitly)
# --------------------------------------------------------------------------------------------

def _prob_of(dist: tuple[np.ndarray, np.ndarray], tok: int) -> float:
    idx, probs = dist
    hit = np.flatnonzero(idx == tok)
    return float(probs[hit[0]]) if hit.size else 0.0


def _residual(p: tuple[np.ndarray, np.ndarray], q: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """norm(max(0, p - q)) over p's support (where it can be positive)."""
    pi, pp = p
    qi, qp = q
    qmap = dict(zip(qi.tolist(), qp.tolist()))
    r = np.maximum(pp - np.array([qmap.get(int(t), 0.0) for t in pi]), 0.0)
    s = r.sum()
    if s <= 0:  # p == q: cannot happen after a rejection, but stay safe
        return p
    return pi, r / s


# --------------------------------------------------------------------------------------------
# the pair
# --------------------------------------------------------------------------------------------

class ModelPair:
    """A small and a large model with one tokenizer, decoding together (see the module docstring).

    Prefer :func:`edgekv.load_pair`. The pair owns both models and closes them with itself."""

    def __init__(self, small: Model, large: Model):
        if small is large:
            raise ValueError("the small and the large model must be two Model objects (each keeps its own cache)")
        if not small.tokenizer.same_as(large.tokenizer):
            raise TokenizerError(
                f"{small.name} and {large.name} do not share a tokenizer: {small.tokenizer.diff(large.tokenizer)}"
            )
        if small.vocab_size != large.vocab_size:
            raise TokenizerError(f"vocab sizes differ: {small.vocab_size} vs {large.vocab_size}")
        self.small = small
        self.large = large
        self.tokenizer = small.tokenizer
        self.params = {SMALL: compute_params(small), LARGE: compute_params(large)}
        self.last_stats: Optional[EADStats] = None

    # ---- lifetime / description ------------------------------------------------------------

    def close(self) -> None:
        self.small.close()
        self.large.close()

    def __enter__(self) -> "ModelPair":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<edgekv.ModelPair small={self.small.name} large={self.large.name}>"

    @property
    def n_ctx(self) -> int:
        return min(self.small.n_ctx, self.large.n_ctx)

    def model(self, role: str) -> Model:
        return self.small if role == SMALL else self.large

    def tokenize(self, text: str, **kw) -> List[int]:
        return self.small.tokenize(text, **kw)

    def detokenize(self, ids: Sequence[int], skip_special: bool = False) -> str:
        return self.small.detokenize(ids, skip_special=skip_special)

    def reset(self) -> None:
        self.small.reset()
        self.large.reset()

    # ---- generation --------------------------------------------------------------------------

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
        *,
        tau: float = DEFAULT_TAU,
        window: int = DEFAULT_WINDOW,
        d_min: int = DEFAULT_D_MIN,
        tau_low: float | None = None,
        verify: bool = False,
        max_draft: int = 0,
        verify_window: int = 0,
        config: EADConfig | None = None,
        entropy_fn: EntropyFn | None = None,
    ) -> str | Iterator[str]:
        """Continue prompt (text or token ids) with EAD. Greedy when temperature == 0.

        Same arguments as Model.generate, plus the EAD parameters (or a ready ``config``).
        entropy_fn(role, logits, position) -> bits: the entropy source (default: the entropy of
        softmax(logits)); position counts generated tokens from 0. Statistics of the run are in
        ``pair.last_stats`` (an EADStats) afterwards.

        A stream shares the models as Model.generate's stream does: it holds both only while it
        computes a token, so calls on either model (close() included) run in between. A model
        whose cache another call used meanwhile is brought back on the stream's next token by
        re-running what the stream ran on it (the cached prefix it started from, in one batch,
        then its own batches and truncations in order), so the text is the one it would have
        produced undisturbed (exactly so when that prefix was empty); after close() of either
        model its next token raises ModelClosedError.
        """
        cfg = config or EADConfig(tau=tau, window=window, d_min=d_min, tau_low=tau_low, verify=verify,
                                  max_draft=max_draft, verify_window=verify_window)
        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, (int, np.integer)) or max_tokens < 0:
            raise ValueError(f"max_tokens must be an integer >= 0, got {max_tokens!r}")
        stop = check_stop(stop)
        self.small._check_open()
        self.large._check_open()
        ids = self.small._as_ids(self.small.tokenize(prompt) if isinstance(prompt, str) else prompt)
        if ids.size >= self.n_ctx:
            raise ContextOverflowError(
                f"prompt of {ids.size} tokens does not fit in ctx {self.n_ctx} (with room to generate)"
            )
        it = _EADRun(self, ids.tolist(), max_tokens, params, cfg, stop,
                     entropy_fn or default_entropy).text()
        return it if stream else "".join(it)

    def chat(self, messages: Sequence[dict], **kwargs) -> str | Iterator[str]:
        """Reply to a conversation with the (shared) chat template; arguments as generate."""
        if not isinstance(messages, (list, tuple)) or not all(
            isinstance(m, dict) and "role" in m and "content" in m for m in messages
        ):
            raise ValueError('messages must be a list of {"role": ..., "content": ...} dicts')
        prompt = self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True)
        return self.generate(prompt, **kwargs)


class _EADRun:
    """One generation: the shared token sequence, the rule, both caches kept in step lazily."""

    def __init__(self, pair: ModelPair, prompt: List[int], max_tokens: int, params: SamplingParams,
                 cfg: EADConfig, stop: List[str], entropy_fn: EntropyFn):
        self.pair = pair
        self.seq: List[int] = list(prompt)
        self.n_prompt = len(prompt)
        self.max_tokens = max_tokens
        self.params = params
        self.cfg = cfg
        self.stop = stop
        self.entropy_fn = entropy_fn
        self.rng = np.random.default_rng(params.seed)
        self.rule = EntropySwitch(cfg)
        self.role = SMALL
        self.sources: List[str] = []       # per generated position: the model that wrote it
        self.snaps: List[tuple] = []       # verify: rule state before each position's decision
        self.drafts: dict = {}             # verify: position -> the small model's sampling distribution
        self.final = self.n_prompt         # positions below this are final (checked, in verify mode)
        self.stats = EADStats(prompt_tokens=len(prompt))
        self.step_s = {SMALL: [0.0, 0], LARGE: [0.0, 0]}  # one-token evaluations: seconds, count
        self.catchups: List[tuple] = []    # (role, seconds, prompt tokens, tokens) of catch-up batches
        self.eot = pair.tokenizer.eot_ids
        # per role: the tokens its cache held when the run began (None until then) and what the run
        # did to that cache since (an int: truncate to it; (ids, mode): run ids), for _restore
        self.start: dict = {SMALL: None, LARGE: None}
        self.ops: dict = {SMALL: [], LARGE: []}

    # ---- evaluation ---------------------------------------------------------------------------

    def sync(self, role: str, all_from: int | None = None) -> np.ndarray:
        """Bring ``role``'s cache up to the sequence and return its logits at position len(seq).

        Runs, in one batch, the tokens of seq it has not seen (at least one: the last), keeping
        its cache of the common prefix. all_from: return instead the rows for positions all_from
        .. len(seq) (the row for position p predicts seq[p]), the last being the next position."""
        m = self.pair.model(role)
        cached = m.session.tokens
        limit = len(self.seq) - 1
        if all_from is not None:
            limit = min(limit, all_from - 1)
        common = 0
        n = min(len(cached), limit)
        while common < n and cached[common] == self.seq[common]:
            common += 1
        if common < len(cached):
            self._cut(role, common)
        new = np.asarray(self.seq[common:], dtype=np.int32)
        k_prompt = max(0, self.n_prompt - common)
        k_gen = new.size - k_prompt
        t0 = time.perf_counter()
        if all_from is not None:
            result = self._run(role, new, "all")[all_from - 1 - common:]
        else:
            result = self._run(role, new, "last")
        dt = time.perf_counter() - t0
        st = self.stats
        if role == SMALL:
            st.small_evaluated += int(new.size)
            st.small_s += dt
        else:
            st.large_evaluated += int(new.size)
            st.large_s += dt
        if new.size == 1 and k_gen == 1:
            self.step_s[role][0] += dt
            self.step_s[role][1] += 1
        elif k_gen > 1:
            # a model that had kept up would have run one token here (besides any prompt)
            st.catchup_tokens += k_gen - 1
            st.catchup_batches += 1
            self.catchups.append((role, dt, k_prompt, int(new.size)))
        return result

    def _cut(self, role: str, n: int) -> None:
        self.pair.model(role).session.truncate(n)
        self.ops[role].append(n)

    def _run(self, role: str, ids: np.ndarray, logits: str) -> np.ndarray:
        out = self.pair.model(role).session.eval(ids, logits=logits)
        self.ops[role].append((ids.copy(), logits))
        return out

    def _restore(self, role: str) -> None:
        """Bring role's cache back to what this run left in it, after another call used it: the
        same operations from an empty cache (the same operations on the same state give the same
        bits; the prefix the run started from is re-run as one batch)."""
        s = self.pair.model(role).session
        s.truncate(0)
        if self.start[role]:
            s.eval(self.start[role])
        for op in self.ops[role]:
            if isinstance(op, int):
                s.truncate(op)
            else:
                ids, logits = op
                s.eval(ids, logits=logits)

    def _step(self, gen: Iterator[int]):
        """next(gen) holding both models (None at its end). A model another call used since the
        last step is restored first; both are held for this stream for a while afterwards
        (Model's stream lock: see Model.generate)."""
        pair = self.pair
        same = {SMALL: pair.small._lock.acquire(self)}
        try:
            same[LARGE] = pair.large._lock.acquire(self)
            try:
                pair.small._check_open()  # a stream may resume after close(): never pass C a freed handle
                pair.large._check_open()
                for role in (SMALL, LARGE):
                    if self.start[role] is None:
                        self.start[role] = list(pair.model(role).session.tokens)
                    elif not same[role]:
                        self._restore(role)
                return next(gen, None)
            finally:
                pair.large._lock.release(keep_for=self)
        finally:
            pair.small._lock.release(keep_for=self)

    def _settle_catchup_time(self) -> None:
        """Time of catch-up beyond the ideal (a model always up to date runs one token per step)."""
        total = spent = 0.0
        for role, dt, k_prompt, n in self.catchups:
            s, c = self.step_s[role]
            if not c:  # no single step of this model was timed: scale the other one's by parameters
                other = LARGE if role == SMALL else SMALL
                s, c = self.step_s[other]
                s *= self.pair.params[role] / self.pair.params[other]
            step = s / c if c else 0.0
            if k_prompt:  # the batch also prefilled the prompt: charge the catch-up tokens' share
                share = dt * (n - k_prompt - 1) / n
                spent += share
                total += share
            else:
                spent += dt
                total += max(0.0, dt - step)
        self.stats.catchup_s = spent
        self.stats.catchup_overhead_s = total

    # ---- sampling and writing ------------------------------------------------------------------

    def _sample(self, logits: np.ndarray) -> int:
        if self.cfg.verify and self.role == SMALL:
            dist = distribution(logits, self.params)
            self.drafts[len(self.seq)] = dist
            return self._draw(dist)
        if self.params.temperature == 0:
            return int(np.argmax(logits))
        return self._draw(distribution(logits, self.params))

    def _draw(self, dist) -> int:
        idx, probs = dist
        if idx.size == 1:
            return int(idx[0])
        return int(idx[self.rng.choice(idx.size, p=probs)])

    def _write(self, tok: int, source: str) -> None:
        self.seq.append(tok)
        self.sources.append(source)
        self.rule.wrote()
        if not (self.cfg.verify and source == SMALL):
            self.final = len(self.seq)

    def _ended(self) -> str:
        """Why the text ends here ("" when it goes on): an end token, max_tokens or a full context."""
        n_gen = len(self.seq) - self.n_prompt
        if n_gen and self.seq[-1] in self.eot:
            return "stop"
        if n_gen >= self.max_tokens:
            return "length"
        if len(self.seq) >= self.pair.n_ctx:
            return "context"
        return ""

    def _verify(self, at_switch: bool) -> tuple[bool, np.ndarray]:
        """The large model checks the tentative tokens seq[final:].

        Returns (rejected, logits): when all are accepted, logits is the large model's
        distribution at the next position; when one is rejected, the sequence has been cut there
        and the large model's correction written in its place (and logits is meaningless)."""
        first = self.final
        st = self.stats
        w = self.cfg.verify_window
        if w and len(self.seq) - first > w:
            # older tentative tokens are kept as they are: a rejection throws away at most w tokens
            for q in range(first, len(self.seq) - w):
                self.drafts.pop(q, None)
            first = self.final = len(self.seq) - w
        st.verifications += 1
        rows = self.sync(LARGE, all_from=first)
        greedy = self.params.temperature == 0
        st.checked_tokens += len(self.seq) - first
        for i in range(len(self.seq) - first):
            p = first + i
            tok = self.seq[p]
            pdist = distribution(rows[i], self.params)
            qdist = self.drafts.pop(p)
            if greedy:
                ok = int(pdist[0][0]) == tok
            else:
                q = _prob_of(qdist, tok)
                ok = q > 0 and self.rng.random() < min(1.0, _prob_of(pdist, tok) / q)
            if ok:
                continue
            # rejected at p: drop seq[p:], the large model writes position p
            st.rejected_tokens += len(self.seq) - p
            corr = int(pdist[0][0]) if greedy else self._draw(_residual(pdist, qdist))
            for q in range(p + 1, len(self.seq)):
                self.drafts.pop(q, None)
            gpos = p - self.n_prompt
            h_small = self.rule.history[gpos]
            del self.seq[p:]
            del self.sources[gpos:]
            self.rule.restore(self.snaps[gpos])
            del self.snaps[gpos + 1:]
            if at_switch:
                # the switch up moves back to p: position p's entropy is the large model's
                self.rule.history.append(float(self.entropy_fn(LARGE, rows[i], gpos)))
                self.rule.active, self.rule.run = LARGE, 0
                self.rule.switches += 1
            else:
                # the small model stays on; the correction is the one token a speculative
                # decoder's target adds (the rule sees position p as before)
                self.rule.decide(h_small)
            self.role = self.rule.active
            large = self.pair.large
            if len(large.session.tokens) > p:
                self._cut(LARGE, p)
            self._write(corr, LARGE)
            self.final = len(self.seq)
            return True, rows[i]
        self.final = len(self.seq)
        return False, rows[-1]

    # ---- the loop -------------------------------------------------------------------------------

    def tokens(self) -> Iterator[int]:
        """Generate; yields each position's final token (verify mode: once checked)."""
        cfg, st, rule = self.cfg, self.stats, self.rule
        t_start = time.perf_counter()
        emitted = self.n_prompt
        # what the large model alone would run: the prompt past its cached prefix, then the text
        cached, n = self.pair.large.session.tokens, 0
        while n < min(len(cached), self.n_prompt - 1) and cached[n] == self.seq[n]:
            n += 1
        large_only_prompt = self.n_prompt - n
        try:
            if self.max_tokens == 0:
                st.finish_reason = "length"
                return
            logits: np.ndarray | None = self.sync(SMALL)
            while True:
                if logits is None:
                    logits = self.sync(self.role)
                gpos = len(self.seq) - self.n_prompt
                if cfg.verify:
                    del self.snaps[gpos:]
                    self.snaps.append(rule.snapshot())
                corrected = False
                if rule.decide(float(self.entropy_fn(self.role, logits, gpos))):
                    self.role = rule.active
                    if self.role == LARGE:
                        st.switches_up += 1
                    else:
                        st.switches_down += 1
                    if cfg.verify and self.role == LARGE and self.final < len(self.seq):
                        corrected, logits = self._verify(at_switch=True)
                    else:
                        logits = self.sync(self.role)
                if not corrected:
                    self._write(self._sample(logits), self.role)
                logits = None
                end = self._ended()
                if cfg.verify and self.role == SMALL and self.final < len(self.seq) and (
                    end or (cfg.max_draft and len(self.seq) - self.final >= cfg.max_draft)
                ):
                    if self._verify(at_switch=False)[0]:
                        end = self._ended()
                if end:
                    st.finish_reason = end  # before the last yield: the consumer stops at an end token
                while emitted < self.final:
                    yield self.seq[emitted]
                    emitted += 1
                if end:
                    return
        finally:
            st.wall_s = time.perf_counter() - t_start
            self._settle_catchup_time()
            n_final = self.final - self.n_prompt
            st.generated_tokens = n_final
            st.sources = list(self.sources[:n_final])
            st.tokens = list(self.seq[self.n_prompt:self.final])
            st.small_tokens = st.sources.count(SMALL)
            st.large_tokens = st.sources.count(LARGE)
            base = self.pair.params[LARGE] * max(1, large_only_prompt + n_final - 1)
            st.relative_compute = (self.pair.params[SMALL] * st.small_evaluated
                                   + self.pair.params[LARGE] * st.large_evaluated) / base

    def text(self) -> Iterator[str]:
        pair = self.pair
        pair.last_stats = self.stats
        text = StopText(pair.tokenizer.stream_decoder(), self.stop)
        tail = ""
        gen = self.tokens()
        try:
            while (tok := self._step(gen)) is not None:
                if tok in self.eot:
                    break
                piece = text.push(tok)
                if text.stopped:
                    tail = piece
                    gen.close()
                    self.stats.finish_reason = "stop"
                    break
                if piece:
                    yield piece
        finally:
            gen.close()
            pair.small._lock.drop(self)
            pair.large._lock.drop(self)
        rest = tail + text.flush()
        if rest:
            yield rest


# --------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------

def load_pair(
    small: str | os.PathLike,
    large: str | os.PathLike,
    *,
    threads: int | None = None,
    ctx: int | None = None,
    n_batch: int = 256,
    progress: bool = True,
    kv="fp16",
) -> ModelPair:
    """Load a small (draft) and a large model that share one tokenizer, for EAD.

    Both are resolved (registry names are fetched) before either is loaded, and the large model's
    tokenizer is compared with the small one's before its weights are: two models whose
    vocabularies, merges or special tokens differ raise TokenizerError saying where."""
    from . import load
    from .registry import resolve
    from .tokenizer import Tokenizer

    try:
        small_path = resolve(str(small) if not isinstance(small, os.PathLike) else small, progress=progress)
    except ModelLoadError as e:
        raise type(e)(f"small (draft) model: {e}") from None
    try:
        large_path = resolve(str(large) if not isinstance(large, os.PathLike) else large, progress=progress)
    except ModelLoadError as e:
        raise type(e)(f"large model: {e}") from None
    large_tok = Tokenizer.from_gguf(large_path)
    small_tok = Tokenizer.from_gguf(small_path)
    if not small_tok.same_as(large_tok):
        raise TokenizerError(
            f"{small} and {large} cannot be paired: their tokenizers differ ({small_tok.diff(large_tok)})"
        )
    kw = dict(threads=threads, ctx=ctx, n_batch=n_batch, progress=progress, kv=kv)
    s = load(small_path, **kw)
    s.name = str(small)
    try:
        m = load(large_path, **kw)
        m.name = str(large)
    except BaseException:
        s.close()
        raise
    try:
        return ModelPair(s, m)
    except BaseException:
        s.close()
        m.close()
        raise
