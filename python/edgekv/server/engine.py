"""What the scheduler drives: sessions (one sequence's KV each) and a step over several of them.

The scheduler needs only this (any object with it will do: the tests use a fake one):

    engine.max_batch            how many sequences one step may carry
    engine.prefill_chunk        prompt tokens a sequence feeds per step (None: all at once)
    engine.prefill_budget       prompt tokens of all sequences in a step while any decodes (None: no cap)
    engine.new_session()        a session: .tokens, .n_past, .truncate(n), .kv_bytes(), .close()
    engine.step(sessions, ids)  append ids[i] to sessions[i]; the last logits of each
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

DEFAULT_PREFILL_CHUNK = 256  # a long prompt shares steps with the decoding streams, chunk by chunk
# while a stream decodes, a step carries at most this many prompt tokens: on the 1.5B a step costs
# ~25 ms + ~3.8 ms per token (batch_cost.md), so a new prompt adds ~0.27 s to the decoders' next
# token instead of stalling them for its whole prefill (docs/decisions.md, "Prefill budget")
DEFAULT_PREFILL_BUDGET = 64


class ModelEngine:
    """A Model's sessions, batched by Model.step (one pass over the weights per step)."""

    prefill_chunk = DEFAULT_PREFILL_CHUNK
    prefill_budget = DEFAULT_PREFILL_BUDGET

    def __init__(self, model, max_batch: int):
        self.model = model
        self.max_batch = max_batch

    def new_session(self):
        return self.model.new_session()

    def step(self, sessions: Sequence, ids: Sequence[np.ndarray]) -> list[np.ndarray]:
        # a step of single tokens is a generation step (defer: as Model.generate's decode steps)
        return self.model.step(list(sessions), list(ids), defer=all(len(x) == 1 for x in ids))
