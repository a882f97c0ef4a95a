"""What the scheduler drives: sessions (one sequence's KV each) and a step over several of them.

The scheduler needs only this:

    engine.max_batch            how many sequences one step may carry
    engine.prefill_chunk        prompt tokens a sequence feeds per step (None: all at once)
    engine.new_session()        a session: .tokens, .n_past, .truncate(n), .kv_bytes(), .close()
    engine.step(sessions, ids)  append ids[i] to sessions[i]; the last logits of each

``make_engine`` picks the batched engine when the model has ``Model.new_session``/``Model.step``
(issue 19, item 2), else ``SingleContextEngine``: today's ``Model`` holds one sequence, so it
runs one sequence at a time (max_batch 1) and a session that loses the context loses its KV.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .._native import lib

DEFAULT_PREFILL_CHUNK = 256


def make_engine(model, max_sessions: int):
    if hasattr(model, "new_session") and hasattr(model, "step"):
        return BatchedEngine(model, max_sessions)
    return SingleContextEngine(model)


class BatchedEngine:
    """Sessions of a model that batches them (Model.new_session / Model.step)."""

    prefill_chunk = DEFAULT_PREFILL_CHUNK

    def __init__(self, model, max_batch: int):
        self.model = model
        self.max_batch = max_batch

    def new_session(self):
        return self.model.new_session()

    def step(self, sessions: Sequence, ids: Sequence[np.ndarray]) -> list[np.ndarray]:
        # a step of single tokens is a generation step (defer: as Model.generate's decode steps)
        return self.model.step(list(sessions), list(ids), defer=all(len(x) == 1 for x in ids))


class _ContextSession:
    """A sequence of SingleContextEngine: it holds the model's one context while it is resident;
    once another session takes the context, its KV is gone (tokens == [])."""

    def __init__(self, engine: "SingleContextEngine"):
        self._engine = engine
        self._closed = False

    @property
    def resident(self) -> bool:
        return self._engine._resident is self

    @property
    def tokens(self) -> list[int]:
        return list(self._engine.model._tokens) if self.resident else []

    @property
    def n_past(self) -> int:
        return self._engine.model.n_past if self.resident else 0

    def truncate(self, n: int) -> None:
        if self.resident:
            with self._engine.model._lock:
                self._engine.model._truncate(n)
        elif n:
            raise ValueError(f"cannot keep {n} tokens: this session holds none")

    def kv_bytes(self) -> int:
        return self._engine.model.kv_bytes if self.resident else 0

    def close(self) -> None:
        if self.resident:
            self.truncate(0)
            self._engine._resident = None
        self._closed = True


class SingleContextEngine:
    """Today's Model: one context, one sequence per step, prompts prefilled whole (as
    Model.generate does, so greedy replies equal generate's when no prefix is reused)."""

    max_batch = 1
    prefill_chunk = None

    def __init__(self, model):
        self.model = model
        self._resident: _ContextSession | None = None
        self._out = np.empty(model.vocab_size, np.float32)

    def new_session(self) -> _ContextSession:
        return _ContextSession(self)

    def step(self, sessions: Sequence[_ContextSession], ids: Sequence[np.ndarray]) -> list[np.ndarray]:
        if len(sessions) != 1 or len(ids) != 1:
            raise ValueError(f"this engine runs one sequence per step, got {len(sessions)}")
        s, x = sessions[0], np.ascontiguousarray(ids[0], dtype=np.int32)
        m = self.model
        with m._lock:
            if self._resident is not s:
                m._truncate(0)  # the context now belongs to s; the session that held it loses its KV
                self._resident = s
            # a decode step defers the KV policy's decisions as Model.generate's steps do
            m._eval(x, lib.EK_LOGITS_LAST, self._out, defer=x.size == 1 and m.n_past > 0)
            return [self._out.copy()]
