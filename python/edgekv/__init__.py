"""edgekv: an on-device inference runtime for small Llama-family language models.

    import edgekv
    with edgekv.load() as model:            # the default model, fetched on first use
        print(model.generate("Why is the sky blue?", max_tokens=64))
"""

from __future__ import annotations

import os

from .errors import (
    ContextOverflowError,
    EdgekvError,
    IntegrityError,
    ModelClosedError,
    ModelLoadError,
    ModelNotFoundError,
    TokenizerError,
)
from .model import GenerationStats, Model
from .registry import DEFAULT_MODEL, resolve

__version__ = "0.1.0"

__all__ = [
    "load",
    "Model",
    "GenerationStats",
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
) -> Model:
    """Load a model by registry name (fetched and verified on first use) or .gguf path.

    threads: worker threads (default: available cores, at most 8).
    ctx: context window in tokens (default: the model's training context, at most 4096).
    n_batch: tokens per prefill chunk.
    """
    path = resolve(str(model), progress=progress)
    return Model(path, threads=threads, ctx=ctx, n_batch=n_batch, name=str(model))
