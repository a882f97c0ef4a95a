"""The server's scheduler: one thread that owns the model and runs every request.

Between steps it admits waiting requests (up to the engine's max_batch), drops cancelled
ones and frees their sessions. Each step carries, per running sequence, a chunk of its prompt
(prefill) or its last sampled token (decode); the engine returns each sequence's last logits,
which an optional logits mask (structured output) narrows before edgekv's sampler draws.
Stop strings, end-of-turn tokens, max_tokens and a full context end a sequence; its session
then stays warm in the pool (LRU under max_sessions and kv_budget_bytes) so that the next
turn of the conversation, or any prompt sharing a prefix with it, reuses that prefix's KV.

Requests report back through ``Request.emit`` (called on the scheduler thread) with events:
``{"type": "delta", "text", "tokens": [info...]}``, ``{"type": "done", "finish_reason",
"prompt_tokens", "completion_tokens", "cached_tokens"}`` or ``{"type": "error", "error"}``.
emit may return a callable (waking the event loop). The scheduler hands those, just before its
next engine step or before it sleeps, to a small waker thread, which gets the GIL once the step is
in C: the woken loop then takes the GIL while the step computes, instead of between steps, where
it would hold up the scheduler's Python (a wakeup's socket send drops the GIL, and the loop,
woken by it, took the GIL first; ~0.25 ms a token measured on SmolLM2, docs/decisions.md).
"""

from __future__ import annotations

import collections
import logging
import threading
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from ..sampling import Sampler, SamplingParams
from ..stop import StopText

log = logging.getLogger("edgekv.server")


@dataclass
class Request:
    prompt_ids: list[int]
    max_tokens: int
    params: SamplingParams
    emit: Callable[[dict], Optional[Callable[[], None]]]
    stop: list[str] = field(default_factory=list)
    logprobs: Optional[int] = None  # None: off; k: the chosen token's logprob and the k most likely
    mask: Optional[object] = None   # edgekv.structured.JSONSchemaMask: .apply(logits), .accept(tok), .done
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self.cancelled.set()


class _Seq:
    """A running request: its session, how far its prompt is in, its sampling state."""

    def __init__(self, req: Request, session, reused: int, tokenizer):
        self.req = req
        self.session = session
        self.pos = reused  # prompt tokens in the session's KV
        self.cached = reused
        self.sampler = Sampler(req.params)
        self.text = StopText(tokenizer.stream_decoder(), req.stop)  # holds back a possible stop string's start
        self.generated = 0
        self.last: Optional[int] = None  # sampled, not yet run
        self.infos: list[dict] = []  # logprob records of tokens whose text is held back


class SessionPool:
    """Sessions not running a request, most recently used last; the longest shared prefix wins."""

    def __init__(self, engine, max_sessions: int, kv_budget_bytes: Optional[int]):
        self.engine = engine
        self.max_sessions = max_sessions
        self.kv_budget_bytes = kv_budget_bytes
        self.idle: "collections.OrderedDict[int, object]" = collections.OrderedDict()
        self.busy = 0
        self.evicted = 0
        self.freed = 0  # sessions closed: evicted or cancelled

    def acquire(self, ids: list[int]):
        """(session, tokens reused): the idle session sharing the longest prefix with ids,
        truncated to it (at least one token is left to run, for its logits), else a new one."""
        self.trim()
        best, best_n = None, 0
        for key, s in self.idle.items():
            n = _common_prefix(s.tokens, ids)
            if n > best_n:
                best, best_n = key, n
        if best is not None:
            s = self.idle.pop(best)
            n = min(best_n, len(ids) - 1)
            s.truncate(n)
        else:
            while self.idle and len(self.idle) + self.busy >= self.max_sessions:
                self._evict()
            s, n = self.engine.new_session(), 0
        self.busy += 1
        return s, n

    def release(self, session, keep: bool) -> None:
        self.busy -= 1
        if keep:
            self.idle[id(session)] = session
            self.trim()
        else:
            session.close()
            self.freed += 1

    def trim(self) -> None:
        for key in [k for k, s in self.idle.items() if s.n_past == 0]:
            self.idle.pop(key).close()  # it holds no KV: nothing to reuse
        while self.idle and len(self.idle) + self.busy > self.max_sessions:
            self._evict()
        if self.kv_budget_bytes is not None:
            while self.idle and self.kv_bytes() > self.kv_budget_bytes:
                self._evict()

    def kv_bytes(self) -> int:
        return sum(s.kv_bytes() for s in self.idle.values())

    def _evict(self) -> None:
        _, s = self.idle.popitem(last=False)
        s.close()
        self.evicted += 1
        self.freed += 1

    def close(self) -> None:
        while self.idle:
            self.idle.popitem()[1].close()


def _common_prefix(a, b) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class Scheduler:
    def __init__(self, engine, tokenizer, n_ctx: int, max_sessions: int = 4,
                 kv_budget_bytes: Optional[int] = None):
        self.engine = engine
        self.tokenizer = tokenizer
        self.n_ctx = n_ctx
        self.eot = tokenizer.eot_ids
        self.pool = SessionPool(engine, max_sessions, kv_budget_bytes)
        self.max_batch = min(engine.max_batch, max_sessions)
        self._waiting: "collections.deque[Request]" = collections.deque()
        self._running: list[_Seq] = []
        self._cv = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="edgekv-scheduler", daemon=True)
        self.completed = 0
        self.cancelled = 0
        self._wakes: list[Callable[[], None]] = []  # what emit returned, for the waker
        self._waker_cv = threading.Condition()
        self._waker_jobs: list[Callable[[], None]] = []
        self._waker_stop = False
        self._waker = threading.Thread(target=self._waker_loop, name="edgekv-waker", daemon=True)

    # ---- the request side (any thread) ----------------------------------------------

    def start(self) -> "Scheduler":
        self._waker.start()
        self._thread.start()
        return self

    def submit(self, req: Request) -> None:
        with self._cv:
            if self._stop:
                raise RuntimeError("the scheduler is shut down")
            self._waiting.append(req)
            self._cv.notify()

    def shutdown(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)
        with self._waker_cv:
            self._waker_stop = True
            self._waker_cv.notify()
        if self._waker.is_alive():
            self._waker.join(timeout)

    def stats(self) -> dict:
        with self._cv:
            return {"waiting": len(self._waiting), "running": len(self._running),
                    "idle_sessions": len(self.pool.idle), "busy_sessions": self.pool.busy,
                    "idle_kv_bytes": self.pool.kv_bytes(), "evicted_sessions": self.pool.evicted, "freed_sessions": self.pool.freed,
                    "completed": self.completed, "cancelled": self.cancelled}

    # ---- the loop (the scheduler thread) ----------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stop and not self._waiting and not self._running:
                    self._wake()
                    self._cv.wait()
                if self._stop:
                    break
                self._admit()
            self._drop_cancelled()
            if self._running:
                try:
                    self._step()
                except Exception as e:  # a failed step ends its sequences, never the server
                    log.exception("step failed")
                    for s in list(self._running):
                        self._finish(s, error=e)
        with self._cv:
            for s in list(self._running):
                self._finish(s, error=RuntimeError("the server is shutting down"))
            while self._waiting:
                self._emit(self._waiting.popleft(), {"type": "error", "error": RuntimeError("the server is shutting down")})
            self.pool.close()
        self._wake()

    def _admit(self) -> None:
        while self._waiting and len(self._running) < self.max_batch:
            req = self._waiting.popleft()
            if req.cancelled.is_set():
                self.cancelled += 1
                continue
            session, reused = self.pool.acquire(req.prompt_ids)
            self._running.append(_Seq(req, session, reused, self.tokenizer))

    def _drop_cancelled(self) -> None:
        for s in [s for s in self._running if s.req.cancelled.is_set()]:
            with self._cv:  # stats() reads the pool from other threads
                self._running.remove(s)
                self.pool.release(s.session, keep=False)  # a cancelled sequence's KV is freed at once
                self.cancelled += 1

    def _step(self) -> None:
        # while any sequence decodes, prompts share at most prefill_budget tokens per step (oldest
        # first), so that a new prompt delays the decoding streams by one short step, not its prefill
        chunk = self.engine.prefill_chunk
        decoding = any(s.pos >= len(s.req.prompt_ids) for s in self._running)
        budget = self.engine.prefill_budget if decoding and self.engine.prefill_budget is not None else None
        members, batch = [], []
        for s in self._running:
            ids = s.req.prompt_ids
            if s.pos < len(ids):
                end = len(ids) if chunk is None else min(len(ids), s.pos + chunk)
                if budget is not None:
                    end = min(end, s.pos + budget)
                    if end == s.pos:
                        continue  # the budget is spent: this prompt waits for the next step
                    budget -= end - s.pos
                batch.append(np.asarray(ids[s.pos:end], np.int32))
            else:
                batch.append(np.asarray([s.last], np.int32))
            members.append(s)
        self._wake()
        logits = self.engine.step([s.session for s in members], batch)
        for s, x, row in zip(members, batch, logits):
            if s.pos < len(s.req.prompt_ids):
                s.pos += x.size
                if s.pos < len(s.req.prompt_ids):
                    continue  # more prompt to prefill
                if s.req.max_tokens == 0:
                    self._finish(s, "length")
                    continue
            self._sample(s, row)

    def _sample(self, s: _Seq, logits: np.ndarray) -> None:
        req = s.req
        mask = req.mask
        if mask is not None:
            logits = np.array(logits, np.float32)  # the engine's row stays as it is
            mask.apply(logits)
        tok = s.sampler(logits)
        s.generated += 1
        if req.logprobs is not None:
            s.infos.append(self._logprob_info(logits, tok, req.logprobs))
        if mask is not None:
            mask.accept(tok)
        if tok in self.eot:
            if req.logprobs is not None:
                s.infos.pop()  # the end-of-turn token has no text
            return self._finish(s, "stop")
        piece = s.text.push(tok)
        if piece or (s.text.stopped and s.infos):
            self._emit_text(s, piece)
        if s.text.stopped:
            return self._finish(s, "stop")
        if mask is not None and mask.done:
            return self._finish(s, "stop")
        if s.generated >= req.max_tokens:
            return self._finish(s, "length")
        if s.session.n_past >= self.n_ctx:
            return self._finish(s, "length")  # the context is full
        s.last = tok

    def _emit(self, req: Request, ev: dict) -> None:
        wake = req.emit(ev)
        if wake is not None:
            self._wakes.append(wake)

    def _wake(self) -> None:
        """Hand what emit returned to the waker (no syscall that drops the GIL here)."""
        if self._wakes:
            with self._waker_cv:
                self._waker_jobs.extend(self._wakes)
                self._waker_cv.notify()
            self._wakes = []

    def _waker_loop(self) -> None:
        while True:
            with self._waker_cv:
                while not self._waker_jobs and not self._waker_stop:
                    self._waker_cv.wait()
                jobs, self._waker_jobs = self._waker_jobs, []
                if not jobs:
                    return  # stopped, nothing left
            for w in jobs:
                w()

    def _emit_text(self, s: _Seq, text: str) -> None:
        self._emit(s.req, {"type": "delta", "text": text, "tokens": s.infos})
        s.infos = []

    def _finish(self, s: _Seq, reason: str = "stop", error: Optional[Exception] = None) -> None:
        if error is None:
            tail = s.text.flush()
            if tail or s.infos:
                self._emit_text(s, tail)
        with self._cv:  # stats() reads the pool from other threads
            if s in self._running:
                self._running.remove(s)
            self.pool.release(s.session, keep=error is None)
            if error is None:
                self.completed += 1
        if error is not None:
            self._emit(s.req, {"type": "error", "error": error})
            return
        self._emit(s.req, {"type": "done", "finish_reason": reason, "prompt_tokens": len(s.req.prompt_ids),
                    "completion_tokens": s.generated, "cached_tokens": s.cached})

    def _logprob_info(self, logits: np.ndarray, tok: int, k: int) -> dict:
        z = logits.astype(np.float64)
        finite = np.isfinite(z)
        m = z[finite].max()
        lp = z - m - np.log(np.exp(z[finite] - m).sum())
        info = {"id": int(tok), "logprob": float(lp[tok]), "top": []}
        if k:
            top = np.argpartition(-lp, k - 1)[:k] if k < lp.size else np.arange(lp.size)
            top = top[np.argsort(-lp[top], kind="stable")]
            info["top"] = [(int(t), float(lp[t])) for t in top]
        return info
