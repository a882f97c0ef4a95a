"""A float64 NumPy reference forward pass for the models edgekv runs (llama, qwen2, qwen3, gemma3).

It reads the GGUF file on its own, with ``gguf.GGUFReader`` and ``gguf.quants.dequantize``
(nothing from edgekv), and computes the next-token logits at every position of a token
sequence in one causal pass:

    x = token_embd[tokens]
    per layer:  h = rmsnorm(x) * attn_norm
                q, k, v = h @ Wq.T (+ bq), h @ Wk.T (+ bk), h @ Wv.T (+ bv)
                qwen3: q, k = rmsnorm(each head of q) * q_norm, rmsnorm(each head of k) * k_norm
                rotate q, k (RoPE; theta_i = pos * base^(-2i / rope_dim) / f_i, i < rope_dim / 2,
                   f_i = rope_freqs[i] (1 without it) * rope.scaling.factor (1 without it))
                   llama: pairs (2i, 2i+1) of each head;  qwen2, qwen3 (NEOX): pairs (i, i + rope_dim/2)
                o = softmax(q k^T / sqrt(head_dim) + causal mask) v   (query head h reads KV head
                    h // (n_head / n_head_kv))
                x += o @ Wo.T
                h = rmsnorm(x) * ffn_norm;  x += (silu(h @ Wg.T) * (h @ Wu.T)) @ Wd.T
    logits = (rmsnorm(x) * output_norm) @ (output or token_embd).T

gemma3 (as llama.cpp's gemma3 graph): x = token_embd[tokens] * sqrt(n_embd); QK-norm as qwen3; the
scores scaled by 1/sqrt(head_dim); every 6th layer (l % 6 == 5) global with rope.freq_base, the
others over the last attention.sliding_window positions with base 10000; the attention and FFN
outputs each rmsnorm'd (post_attention_norm, post_ffw_norm) before their residual add; the FFN gate
is GELU (tanh approximation) instead of SiLU.

Everything is float64 on the dequantized weights: the only differences left against edgekv are
edgekv's own approximations (int8 activations for quantized weights, the FP16 KV cache, float32
arithmetic), which the tests bound.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np

NEOX_ARCHS = {"qwen2", "qwen3", "gemma3"}
GEMMA_SWA_PERIOD, GEMMA_SWA_BASE = 6, 10000.0


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def _dequantize(t) -> np.ndarray:
    """A GGUF tensor as float64, shaped (n_out, n_in) for matrices and (n,) for vectors."""
    from gguf import GGMLQuantizationType, quants

    a = quants.dequantize(t.data, GGMLQuantizationType(int(t.tensor_type)))
    shape = [int(s) for s in t.shape]  # GGUF order: ne[0] (values per row) first
    return np.asarray(a, dtype=np.float64).reshape(tuple(reversed(shape)) if len(shape) > 1 else shape[0])


@dataclass
class Hparams:
    arch: str
    n_vocab: int
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int
    rope_dim: int
    rope_base: float
    norm_eps: float
    rope_factors: np.ndarray  # (rope_dim / 2,) angle divisors
    swa_window: int = 0  # gemma3: sliding window of layers with l % 6 != 5

    @property
    def neox(self) -> bool:
        return self.arch in NEOX_ARCHS


class ReferenceModel:
    """The reference forward pass over one GGUF file (weights dequantized once, to float64)."""

    def __init__(self, path):
        from gguf import GGUFReader

        self.path = Path(path)
        reader = GGUFReader(str(self.path), "r")
        arch = _field(reader, "general.architecture")
        a = arch
        n_embd = int(_field(reader, f"{a}.embedding_length"))
        n_head = int(_field(reader, f"{a}.attention.head_count"))
        head_dim = int(_field(reader, f"{a}.attention.key_length", n_embd // n_head))
        self.w: Dict[str, np.ndarray] = {t.name: _dequantize(t) for t in reader.tensors}
        n_vocab = self.w["token_embd.weight"].shape[0]
        self.hp = Hparams(
            arch=arch,
            n_vocab=n_vocab,
            n_embd=n_embd,
            n_layer=int(_field(reader, f"{a}.block_count")),
            n_head=n_head,
            n_head_kv=int(_field(reader, f"{a}.attention.head_count_kv", n_head)),
            head_dim=head_dim,
            n_ff=int(_field(reader, f"{a}.feed_forward_length")),
            rope_dim=int(_field(reader, f"{a}.rope.dimension_count", head_dim)),
            rope_base=float(_field(reader, f"{a}.rope.freq_base", 10000.0)),
            norm_eps=float(_field(reader, f"{a}.attention.layer_norm_rms_epsilon", 1e-5)),
            rope_factors=np.ones(1),
        )
        factors = self.w.get("rope_freqs.weight", np.ones(self.hp.rope_dim // 2))
        scale = float(_field(reader, f"{a}.rope.scaling.factor", 0.0) or 1.0)
        self.hp.rope_factors = np.asarray(factors, dtype=np.float64) * scale
        self.hp.swa_window = int(_field(reader, f"{a}.attention.sliding_window", 0))
        # gemma3's pieces, as attributes so that tests can take each one away
        self.gelu = arch == "gemma3"
        self.embd_scale = np.sqrt(n_embd) if arch == "gemma3" else 1.0
        self.rope_base_swa = GEMMA_SWA_BASE

    # ---- pieces ---------------------------------------------------------------------------

    def rmsnorm(self, x: np.ndarray, w: np.ndarray) -> np.ndarray:
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + self.hp.norm_eps) * w

    def slides(self, layer: int) -> bool:
        return self.hp.swa_window > 0 and layer % GEMMA_SWA_PERIOD != GEMMA_SWA_PERIOD - 1

    def rope(self, x: np.ndarray, positions: np.ndarray, swa: bool = False) -> np.ndarray:
        """Rotate x (n_tok, n_heads, head_dim) at the given positions."""
        hp = self.hp
        half = hp.rope_dim // 2
        if swa:  # sliding-window layers: base 10000, unscaled
            inv_freq = self.rope_base_swa ** (-2.0 * np.arange(half) / hp.rope_dim)
        else:
            inv_freq = hp.rope_base ** (-2.0 * np.arange(half) / hp.rope_dim) / hp.rope_factors
        theta = positions[:, None].astype(np.float64) * inv_freq[None, :]  # (n_tok, half)
        cos, sin = np.cos(theta)[:, None, :], np.sin(theta)[:, None, :]
        out = x.copy()
        if hp.neox:
            a, b = np.arange(half), np.arange(half) + half
        else:
            a, b = 2 * np.arange(half), 2 * np.arange(half) + 1
        x0, x1 = x[..., a], x[..., b]
        out[..., a] = x0 * cos - x1 * sin
        out[..., b] = x0 * sin + x1 * cos
        return out

    def attention(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, window: int = 0) -> np.ndarray:
        """Causal GQA attention: q (n, n_head, hd), k and v (n, n_head_kv, hd) -> (n, n_head * hd)."""
        hp = self.hp
        n = q.shape[0]
        group = hp.n_head // hp.n_head_kv
        kh = np.repeat(k, group, axis=1)  # query head h -> KV head h // group
        vh = np.repeat(v, group, axis=1)
        scores = np.einsum("thd,shd->hts", q, kh) / np.sqrt(hp.head_dim)
        mask = np.triu(np.ones((n, n), dtype=bool), 1)
        if window:  # key j out of query t's window: t - j >= window
            mask |= np.tril(np.ones((n, n), dtype=bool), -window)
        scores[:, mask] = -np.inf
        scores -= scores.max(axis=-1, keepdims=True)
        p = np.exp(scores)
        p /= p.sum(axis=-1, keepdims=True)
        out = np.einsum("hts,shd->thd", p, vh)
        return out.reshape(n, hp.n_head * hp.head_dim)

    # ---- the forward pass -----------------------------------------------------------------

    def logits(self, tokens: Sequence[int]) -> np.ndarray:
        """Next-token logits at every position: float64 (len(tokens), n_vocab)."""
        hp, w = self.hp, self.w
        ids = np.asarray(tokens, dtype=np.int64)
        if ids.ndim != 1 or ids.size == 0 or ids.min() < 0 or ids.max() >= hp.n_vocab:
            raise ValueError("tokens must be a non-empty sequence of ids in [0, n_vocab)")
        n = ids.size
        pos = np.arange(n)
        x = w["token_embd.weight"][ids]
        x = x * self.embd_scale
        for l in range(hp.n_layer):
            swa = self.slides(l)
            p = f"blk.{l}."
            h = self.rmsnorm(x, w[p + "attn_norm.weight"])
            q = h @ w[p + "attn_q.weight"].T
            k = h @ w[p + "attn_k.weight"].T
            v = h @ w[p + "attn_v.weight"].T
            if p + "attn_q.bias" in w:
                q = q + w[p + "attn_q.bias"]
                k = k + w[p + "attn_k.bias"]
                v = v + w[p + "attn_v.bias"]
            q = q.reshape(n, hp.n_head, hp.head_dim)
            k = k.reshape(n, hp.n_head_kv, hp.head_dim)
            if p + "attn_q_norm.weight" in w:  # qwen3: every head normed on its own
                q = self.rmsnorm(q, w[p + "attn_q_norm.weight"])
                k = self.rmsnorm(k, w[p + "attn_k_norm.weight"])
            q = self.rope(q, pos, swa)
            k = self.rope(k, pos, swa)
            v = v.reshape(n, hp.n_head_kv, hp.head_dim)
            # (the window only when sliding: subclasses override attention(q, k, v))
            att = self.attention(q, k, v, window=hp.swa_window) if swa else self.attention(q, k, v)
            o = att @ w[p + "attn_output.weight"].T
            if p + "post_attention_norm.weight" in w:
                o = self.rmsnorm(o, w[p + "post_attention_norm.weight"])
            x = x + o
            h = self.rmsnorm(x, w[p + "ffn_norm.weight"])
            g = h @ w[p + "ffn_gate.weight"].T
            u = h @ w[p + "ffn_up.weight"].T
            if self.gelu:
                act = 0.5 * g * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (g + 0.044715 * g ** 3)))
            else:
                act = g / (1.0 + np.exp(-g))
            f = (act * u) @ w[p + "ffn_down.weight"].T
            if p + "post_ffw_norm.weight" in w:
                f = self.rmsnorm(f, w[p + "post_ffw_norm.weight"])
            x = x + f
        h = self.rmsnorm(x, w["output_norm.weight"])
        out_w: Optional[np.ndarray] = w.get("output.weight")
        return h @ (w["token_embd.weight"] if out_w is None else out_w).T


def reference_logits(path, tokens: Sequence[int]) -> np.ndarray:
    """One-shot helper: ``ReferenceModel(path).logits(tokens)``."""
    return ReferenceModel(path).logits(tokens)
