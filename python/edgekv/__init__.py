"""edgekv: an on-device inference runtime for small Llama-family language models.

    import edgekv
    with edgekv.load() as model:            # the default model, fetched on first use
        print(model.generate("Why is the sky blue?", max_tokens=64))
"""

from __future__ import annotations

import os

from .ead import EADConfig, EADStats, EntropySwitch, ModelPair, load_pair, simulate_switching
from .errors import (
    ContextOverflowError,
    EdgekvError,
    IntegrityError,
    ModelClosedError,
    ModelLoadError,
    ModelNotFoundError,
    TokenizerError,
)
from .kv_policy import KVPolicy, RandomPolicy, StaticPolicy, TokenFeatures
from .model import GenerationStats, Model
from .registry import DEFAULT_MODEL, resolve

__version__ = "0.1.0"

__all__ = [
    "load",
    "load_pair",
    "ModelPair",
    "EADConfig",
    "EADStats",
    "EntropySwitch",
    "simulate_switching",
    "Model",
    "GenerationStats",
    "KVPolicy",
    "StaticPolicy",
    "RandomPolicy",
    "TokenFeatures",
    "DEFAULT_MODEL",
    "EdgekvError",
    "ModelLoadError",
    "ModelNotFoundError",
    "IntegrityError",
    "TokenizerError",
    "ContextOverflowError",
    "ModelClosedError",
]


def load(
    model: str | os.PathLike = DEFAULT_MODEL,
    *,
    threads: int | None = None,
    ctx: int | None = None,
    n_batch: int = 256,
    progress: bool = True,
    kv="fp16",
    kv_window: int = 0,
    kv_groups: tuple[int, int, int] | None = None,
    kv_rotate: bool = True,
    kv_center_keys: bool = True,
    kv_fit_grid: bool = False,
) -> Model:
    """Load a model by registry name (fetched and verified on first use) or .gguf path.

    threads: worker threads (default: available cores, at most 8).
    ctx: context window in tokens (default: the model's training context, at most 4096).
    n_batch: tokens per prefill chunk.
    kv: KV-cache precision policy: "fp16", "int8", "int4", "int2", split forms such as
        "k4v2", or a policy object / callable (see edgekv.kv_policy).
    kv_window: W, the age in steps at which a token's precision is decided (0 = at once).
    kv_groups: group sizes for 8-, 4- and 2-bit records (default: see Model).
    kv_rotate: Hadamard-rotate quantized keys and values (on by default).
    kv_center_keys: store quantized keys minus a per-(layer, head) mean, added back exactly as a
        score offset (on by default; see Model).
    kv_fit_grid: fit each quantization group's scale and minimum to its values for the least
        squared error instead of taking its min/max (off by default; see Model).
    """
    path = resolve(str(model), progress=progress)
    return Model(path, threads=threads, ctx=ctx, n_batch=n_batch, name=str(model), kv=kv, kv_window=kv_window,
                 kv_groups=kv_groups, kv_rotate=kv_rotate, kv_center_keys=kv_center_keys,
                 kv_fit_grid=kv_fit_grid)
