"""KV-cache precision policies: which bit-width each token's keys and values get.

Every token enters the cache at 16 bits. Once a token is W steps old (W = the
policy's ``window``; W=0 means right after the forward pass that produced it),
the policy decides its key and value bit-widths (one of BITS: 16, 8, 4, 3, 2, ...), in batches:
a whole prefill is decided at once.

A policy is any object with ``decide(features) -> (k_bits, v_bits)`` (or a
plain callable with that signature), where ``features`` is a
:class:`TokenFeatures` batch. Static policies ignore the features.

Token features (all per cached position, one definition here):
  entropy       entropy (nats) of the next-token distribution computed at that position
  max_prob      the largest probability of that distribution (confidence)
  logprob       log-probability the model gave this token when it was the next token
                (from the previous position's distribution, also across calls, e.g. at each
                decode step; NaN for the first token of a context)
  attn_mean     mean attention probability the token received in the last layer,
                over heads and over every later query that has seen it so far
  attn_var      variance of the same samples
  age           steps since the token entered the cache (n_past - 1 - position)
  rarity        -log p(token id), p = (M * q(id) + c(id)) / (M + position + 1): q the model's
                prior token distribution (add-half smoothed counts over the controller's training
                text, edgekv/data/rarity_<model>.npy, built by `python -m controller.rarity`;
                uniform when none is shipped for the tokenizer), c(id) the occurrences of the id
                in the context at positions <= this one (running session counts), M = 1024
                (edgekv.controller.RARITY_PRIOR_WEIGHT)
Quantities that were not computed (e.g. logits at prefill positions when the
policy does not ask for them) are NaN.

All of them are causal: a token's features use only the tokens up to it, the
logits at its own position, and the attention it has received from the queries
run so far (at W=0 after a decode step that is only its own query; after a
prefill, every later query of the batch). The learned controller
(edgekv.controller, ``kv="adaptive"``) turns them into its input vector
(edgekv.controller.feature_matrix: attention relative to uniform, logs of
position and age).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np

from ._native import kv_precisions

# The bit-widths the C library's table of KV precisions has (csrc/kv_types.c), widest first, and
# which configured group size (8-, 4- or 2-bit; 16: none) each uses: a new row there needs no change here.
BITS = tuple(sorted((b for b, _ in kv_precisions()), reverse=True))
GROUP_OF = dict(kv_precisions())


@dataclass
class TokenFeatures:
    positions: np.ndarray
    token_ids: np.ndarray
    entropy: np.ndarray
    max_prob: np.ndarray
    logprob: np.ndarray
    attn_mean: np.ndarray
    attn_var: np.ndarray
    age: np.ndarray
    rarity: np.ndarray | None = None  # NaN-filled when not given

    def __post_init__(self):
        if self.rarity is None:
            self.rarity = np.full(self.positions.shape, np.nan, np.float32)

    def __len__(self) -> int:
        return int(self.positions.size)

    @classmethod
    def of_positions(cls, positions: np.ndarray, token_ids: np.ndarray, age: np.ndarray) -> "TokenFeatures":
        """What a policy with needs_features False is given: positions, token ids and age; the
        statistics NaN (the model does not collect them for it)."""
        nan = np.full(positions.shape, np.nan, np.float32)
        return cls(positions, token_ids, nan, nan, nan, nan, nan, age, nan)


class KVPolicy:
    """Base class. Subclasses set ``name`` and implement :meth:`decide`."""

    name = "policy"
    window = 0               # W: decide a token once it is this many steps old
    needs_features = False   # True: the model collects logit and attention statistics for decide();
                             # False: decide() gets TokenFeatures.of_positions (statistics NaN)

    def decide(self, features: TokenFeatures) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    @property
    def is_fp16(self) -> bool:
        return False

    def __repr__(self) -> str:
        return f"<KVPolicy {self.name} W={self.window}>"


# Position 0, the attention sink, reaches every later score (beyond the oracle's horizon): the
# learned policy and "sink:P" never store its key below this many bits (docs/decisions.md).
SINK_MIN_KEY_BITS = 8


def protect_sink(positions: np.ndarray, k_bits: np.ndarray) -> np.ndarray:
    """k_bits with position 0's key raised to at least SINK_MIN_KEY_BITS (in place; returned)."""
    sink = np.asarray(positions) == 0
    k_bits[sink] = np.maximum(k_bits[sink], SINK_MIN_KEY_BITS)
    return k_bits


class StaticPolicy(KVPolicy):
    """Every token gets the same key and value bit-widths; sink=True: except the attention sink's
    key (position 0), never below SINK_MIN_KEY_BITS (spelled "sink:int3")."""

    def __init__(self, k_bits: int, v_bits: int, window: int = 0, sink: bool = False):
        for b in (k_bits, v_bits):
            if b not in BITS:
                raise ValueError(f"bit-width must be one of {BITS}, got {b!r}")
        self.k_bits, self.v_bits, self.window = int(k_bits), int(v_bits), _check_window(window)
        self.sink = bool(sink)
        self.name = ("sink:" if self.sink else "") + _static_name(self.k_bits, self.v_bits)

    @property
    def is_fp16(self) -> bool:
        return self.k_bits == 16 and self.v_bits == 16

    def decide(self, features):
        n = len(features)
        k = np.full(n, self.k_bits, np.int32)
        if self.sink:
            protect_sink(features.positions, k)
        return k, np.full(n, self.v_bits, np.int32)


class LayerPolicy(KVPolicy):
    """Static bits per (layer, token): a static base for every layer, overridden for listed layers
    (spelled "layers:int4,0=k8v4,22-23=int8"). The base's sink guard applies in every layer.
    ``decide_layers(features, n_layer)`` gives (n_layer, n) key and value bits; ``decide`` is
    not defined (the bits differ by layer)."""

    def __init__(self, base: StaticPolicy, overrides: Mapping[int, tuple[int, int]], window: int = 0):
        if not isinstance(base, StaticPolicy):
            raise ValueError(f"LayerPolicy needs a static base policy, got {base!r}")
        self.base = base
        self.overrides = {}
        for layer, (k, v) in sorted(overrides.items()):
            if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or layer < 0:
                raise ValueError(f"layer must be an integer >= 0, got {layer!r}")
            self.overrides[int(layer)] = (int(StaticPolicy(k, v).k_bits), int(StaticPolicy(k, v).v_bits))
        self.window = _check_window(window)
        self.name = "layers:" + ",".join(
            [base.name] + [f"{layer}={_static_name(k, v)}" for layer, (k, v) in self.overrides.items()])

    @property
    def is_fp16(self) -> bool:
        return self.base.is_fp16 and all(kv == (16, 16) for kv in self.overrides.values())

    def check_layers(self, n_layer: int) -> None:
        bad = [layer for layer in self.overrides if layer >= n_layer]
        if bad:
            raise ValueError(f"KV policy {self.name!r}: layer {bad[0]} is out of range; the model has layers "
                             f"0..{n_layer - 1}")

    def decide(self, features):
        raise TypeError(f"KV policy {self.name!r} decides per layer: use decide_layers(features, n_layer)")

    def decide_layers(self, features, n_layer: int) -> tuple[np.ndarray, np.ndarray]:
        self.check_layers(n_layer)
        k0, v0 = self.base.decide(features)
        k = np.repeat(k0[None, :], n_layer, axis=0)
        v = np.repeat(v0[None, :], n_layer, axis=0)
        for layer, (kb, vb) in self.overrides.items():
            k[layer] = kb
            v[layer] = vb
            if self.base.sink:
                protect_sink(features.positions, k[layer])
        return k, v


class RandomPolicy(KVPolicy):
    """Bit-widths drawn at random with given proportions: the control a learned policy must beat."""

    def __init__(self, k_mix: Mapping[int, float], v_mix: Mapping[int, float], seed: int = 0, window: int = 0):
        self.k_bits, self.k_p = _mix(k_mix, "k_mix")
        self.v_bits, self.v_p = _mix(v_mix, "v_mix")
        self.rng = np.random.default_rng(seed)
        self.window = _check_window(window)
        fmt = lambda b, p: "+".join(f"{x}:{q:.2f}" for x, q in zip(b, p))  # noqa: E731
        self.name = f"random(k={fmt(self.k_bits, self.k_p)};v={fmt(self.v_bits, self.v_p)})"

    def decide(self, features):
        n = len(features)
        k = self.rng.choice(self.k_bits, size=n, p=self.k_p).astype(np.int32)
        v = self.rng.choice(self.v_bits, size=n, p=self.v_p).astype(np.int32)
        return k, v


class CallablePolicy(KVPolicy):
    """Wrap ``fn(features) -> (k_bits, v_bits)``."""

    def __init__(self, fn: Callable, window: int = 0, needs_features: bool = True, name: str | None = None):
        self.fn = fn
        self.window = _check_window(window)
        self.needs_features = needs_features
        self.name = name or getattr(fn, "__name__", "callable")

    def decide(self, features):
        return self.fn(features)


_ALIASES = {"fp16": (16, 16), "f16": (16, 16),
            **{f"{p}{b}": (b, b) for b in BITS if b != 16 for p in ("int", "q")}}


def _static_name(k: int, v: int) -> str:
    if k == v:
        return "fp16" if k == 16 else f"int{k}"
    return f"k{k}v{v}"


def parse_policy(spec, window: int = 0) -> KVPolicy:
    """A policy from a name ("fp16", "int8", "int4", "int3", "int2", "k4v2", "k4v3", ..., "sink:int3"
    (a static policy with the attention-sink guard), "adaptive", "adaptive@3.5", "layers:int4,0=k8v4"
    (static bits per layer: the base for every layer, L=P or A-B=P for listed layers), "auto@4.0" (bits per
    layer from the model's calibration profile, at most 4.0 average bits), "auto" (the cheapest calibrated
    budget within 0.5% of fp16 perplexity on the calibration text)),
    a policy object or a callable."""
    if isinstance(spec, KVPolicy):
        return spec
    if isinstance(spec, str):
        s = spec.strip().lower()
        if s.startswith("layers:"):
            return _parse_layers(spec, s[7:], window)
        if s.startswith("sink:"):
            base = parse_policy(s[5:], window)
            if not isinstance(base, StaticPolicy) or base.sink:
                raise ValueError(f"unknown KV policy {spec!r}: sink: takes a static policy (int3, k4v2, ...)")
            return StaticPolicy(base.k_bits, base.v_bits, window=window, sink=True)
        if s in _ALIASES:
            return StaticPolicy(*_ALIASES[s], window=window)
        b = "|".join(map(str, BITS))
        m = re.fullmatch(rf"k({b})v({b})", s)
        if m:
            return StaticPolicy(int(m.group(1)), int(m.group(2)), window=window)
        m = re.fullmatch(r"auto(?:@(\d+(?:\.\d*)?))?", s)
        if m:  # static bits per layer from the model's calibration profile (edgekv.calibrate)
            from .calibrate import CalibratedPolicy

            return CalibratedPolicy(target_bits=float(m.group(1)) if m.group(1) else None, window=window)
        m = re.fullmatch(r"adaptive(?:@(\d+(?:\.\d*)?))?", s)
        if m:  # the learned controller (edgekv.controller); "adaptive@3.5" sets target_bits
            from .controller import LearnedPolicy

            return LearnedPolicy(target_bits=float(m.group(1)) if m.group(1) else None, window=window)
        raise ValueError(
            f"unknown KV policy {spec!r}: use fp16, {', '.join(f'int{b}' for b in BITS if b != 16)}, a split form such as "
            "k4v2, sink:int3, adaptive, "
            "layers:int4,0=k8v4, auto, auto@4.0, "
            "an edgekv.kv_policy.KVPolicy (e.g. RandomPolicy), or a callable"
        )
    if callable(spec):
        return CallablePolicy(spec, window=window)
    raise ValueError(f"kv must be a policy name, a KVPolicy or a callable, got {type(spec).__name__}")


def _parse_layers(spec: str, body: str, window: int) -> LayerPolicy:
    parts = [p.strip() for p in body.split(",")]
    base = parse_policy(parts[0], window) if parts[0] and "=" not in parts[0] else None
    if not isinstance(base, StaticPolicy):
        raise ValueError(f"unknown KV policy {spec!r}: layers: starts with a static policy for every layer "
                         "(int4, k4v3, sink:int4, ...), e.g. layers:int4,0=k8v4")
    overrides: dict[int, tuple[int, int]] = {}
    for part in parts[1:]:
        m = re.fullmatch(r"(\d+)(?:-(\d+))?=(.+)", part)
        p = parse_policy(m.group(3), window) if m and not m.group(3).startswith(("layers:", "sink:")) else None
        if not isinstance(p, StaticPolicy):
            raise ValueError(f"unknown KV policy {spec!r}: {part!r} must be LAYER=P or FIRST-LAST=P with P static "
                             "(int8, k8v4, ...)")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo:
            raise ValueError(f"unknown KV policy {spec!r}: layer range {part!r} is empty")
        for layer in range(lo, hi + 1):
            if layer in overrides:
                raise ValueError(f"unknown KV policy {spec!r}: layer {layer} is given twice")
            overrides[layer] = (p.k_bits, p.v_bits)
    return LayerPolicy(base, overrides, window=window)


def _check_window(w) -> int:
    if isinstance(w, bool) or not isinstance(w, (int, np.integer)) or w < 0:
        raise ValueError(f"window must be an integer >= 0, got {w!r}")
    return int(w)


def _mix(mix: Mapping[int, float], what: str):
    if not mix:
        raise ValueError(f"{what} must map bit-widths to proportions")
    bits = np.array(list(mix.keys()), dtype=np.int32)
    p = np.array(list(mix.values()), dtype=np.float64)
    if any(b not in BITS for b in bits) or np.any(p < 0) or not np.isfinite(p).all() or p.sum() <= 0:
        raise ValueError(f"{what}: bit-widths must be in {BITS} with non-negative proportions, got {dict(mix)}")
    return bits, p / p.sum()
