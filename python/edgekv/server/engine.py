"""What the scheduler drives: sessions (one sequence's KV each) and a step over several of them.

The scheduler needs only this (any object with it will do: the tests use a fake one):

    engine.max_batch            how many sequences one step may carry
    engine.prefill_chunk        prompt tokens a sequence feeds per step (None: all at once)
    engine.new_session()        a session: .tokens, .n_past, .truncate(n), .kv_bytes(), .close()
    engine.step(sessions, ids)  append ids[i] to sessions[i]; the last logits of each
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

DEFAULT_PREFILL_CHUNK = 256  # a long prompt shares steps with the decoding streams, chunk by chunk
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MMAP_THRESHOLD = 1 << 20


def pin_mmap_threshold() -> bool:
    """Keep glibc serving blocks of 1 MiB and more with mmap. A session's KV store is a large
    calloc that is mostly never touched. By default glibc raises its mmap threshold when such a
    block is freed, and serves the next one from the heap, zeroed in full. A server that closes
    and creates sessions all day then grows by hundreds of MB per session (+81% RSS over 500
    requests, benchmarks/results/serve_load.md). False where there is no glibc mallopt."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt if name else None
    except (OSError, AttributeError):
        return False
    return bool(mallopt and mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))


class ModelEngine:
    """A Model's sessions, batched by Model.step (one pass over the weights per step)."""

    prefill_chunk = DEFAULT_PREFILL_CHUNK

    def __init__(self, model, max_batch: int):
        self.model = model
        self.max_batch = max_batch
        pin_mmap_threshold()

    def new_session(self):
        return self.model.new_session()

    def step(self, sessions: Sequence, ids: Sequence[np.ndarray]) -> list[np.ndarray]:
        # a step of single tokens is a generation step (defer: as Model.generate's decode steps)
        return self.model.step(list(sessions), list(ids), defer=all(len(x) == 1 for x in ids))
