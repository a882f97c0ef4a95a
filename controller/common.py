"""Helpers shared by the controller scripts: model loading, names, progress."""

from __future__ import annotations

import os
import re
from pathlib import Path

from edgekv import registry
from edgekv.model import Model


def model_path(name: str) -> Path:
    """A registry model's cached GGUF path (pulled if needed), or a path given directly."""
    p = Path(name)
    if p.suffix == ".gguf" and p.exists():
        return p
    return Path(registry.pull(name))


def model_slug(name: str) -> str:
    p = Path(name)
    base = p.stem if p.suffix == ".gguf" else name
    return re.sub(r"[^a-z0-9.]+", "-", base.lower()).strip("-")


def load_model(name: str, tokenizer_only: bool = False, threads: int | None = None, ctx: int = 2048):
    path = model_path(name)
    if tokenizer_only:
        return path
    threads = threads or int(os.environ.get("EDGEKV_THREADS", "1"))
    return Model(path, threads=threads, ctx=ctx, name=model_slug(name))
