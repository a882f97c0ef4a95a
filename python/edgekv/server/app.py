"""The OpenAI-compatible HTTP API: /v1/chat/completions, /v1/completions, /v1/models.

FastAPI + sse-starlette on uvicorn. Handlers check a request, turn it into token ids and a
``scheduler.Request``, and relay the scheduler's events: one JSON body, or SSE chunks in
OpenAI's format ending with ``data: [DONE]``. A client that goes away cancels its request;
the scheduler frees its session. Errors are OpenAI's JSON shape with a 4xx status.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import json
import math
import threading
import time
import uuid
from typing import Any, Optional

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.responses import JSONResponse
from sse_starlette.sse import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..sampling import SamplingParams
from .engine import ModelEngine
from .scheduler import Request, Scheduler

DISCONNECT_POLL_S = 0.25


class APIError(Exception):
    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_

    def response(self) -> JSONResponse:
        return _error(self.status, self.message, self.param, self.code, self.type)


def _error(status: int, message: str, param=None, code=None, type_="invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}},
                        status_code=status)


# ---- parameter checks: each names the parameter it refuses ----------------------------------

def _bad(param: str, message: str) -> APIError:
    return APIError(400, message, param=param, code="invalid_value")


def _opt_int(body: dict, name: str, lo: int, hi: int, default=None):
    v = body.get(name, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise _bad(name, f"{name} must be an integer in [{lo}, {hi}], got {v!r}")
    return v


def _opt_float(body: dict, name: str, lo: float, hi: float, default: float, lo_open: bool = False) -> float:
    v = body.get(name, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
            or not (lo < v if lo_open else lo <= v) or v > hi:
        rng = f"({lo}, {hi}]" if lo_open else f"[{lo}, {hi}]"
        raise _bad(name, f"{name} must be a number in {rng}, got {v!r}")
    return float(v)


def _stop(body: dict) -> list[str]:
    v = body.get("stop")
    if v is None:
        return []
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or len(v) > 4 or not all(isinstance(s, str) for s in v):
        raise _bad("stop", "stop must be a string or a list of at most 4 strings")
    return [s for s in v if s]


class _Context:
    """What the handlers share: the model, its scheduler, the served name and key."""

    def __init__(self, model, model_id: str, api_key: Optional[str], max_sessions: int,
                 kv_budget_bytes: Optional[int], engine=None):
        self.model = model
        self.model_id = model_id
        self.api_key = api_key
        self.created = int(time.time())
        engine = ModelEngine(model, max_sessions) if engine is None else engine
        self.scheduler = Scheduler(engine, model.tokenizer, model.n_ctx,
                                   max_sessions=max_sessions, kv_budget_bytes=kv_budget_bytes)

    def check_key(self, request: HTTPRequest) -> None:
        if self.api_key is None:
            return
        auth = request.headers.get("authorization", "")
        given = auth[7:] if auth.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(given.encode(), self.api_key.encode()):
            raise APIError(401, "missing or wrong API key (send `Authorization: Bearer <key>`)",
                           code="invalid_api_key")

    def check_model(self, body: dict) -> None:
        name = body.get("model")
        if not isinstance(name, str) or not name:
            raise APIError(400, "model is required (a string)", param="model", code="missing_required_parameter")
        if name != self.model_id:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {self.model_id!r}",
                           param="model", code="model_not_found")

    def request_from(self, body: dict, ids: list[int], max_tokens_name: str, logprobs: Optional[int],
                     emit, mask=None) -> Request:
        n = body.get("n", 1)
        if n != 1:
            raise _bad("n", "n must be 1: this server returns one choice per request")
        params = SamplingParams(
            temperature=_opt_float(body, "temperature", 0.0, 2.0, 1.0),
            top_p=_opt_float(body, "top_p", 0.0, 1.0, 1.0, lo_open=True),
            top_k=_opt_int(body, "top_k", 0, 1 << 30, 0),
            seed=_opt_int(body, "seed", 0, (1 << 63) - 1),
        )
        room = self.model.n_ctx - len(ids)
        if room <= 0:
            raise APIError(400, f"this model's maximum context length is {self.model.n_ctx} tokens; the prompt "
                                f"has {len(ids)}", param="messages" if max_tokens_name == "max_completion_tokens"
                           else "prompt", code="context_length_exceeded")
        max_tokens = _opt_int(body, max_tokens_name, 0, 1 << 30)
        if max_tokens is None and max_tokens_name == "max_completion_tokens":
            max_tokens = _opt_int(body, "max_tokens", 0, 1 << 30)
        if max_tokens is None:
            max_tokens = room
        elif max_tokens > room:
            raise APIError(400, f"this model's maximum context length is {self.model.n_ctx} tokens; you asked "
                                f"for {len(ids) + max_tokens} ({len(ids)} in the prompt, {max_tokens} to generate)",
                           param="max_tokens", code="context_length_exceeded")
        return Request(prompt_ids=ids, max_tokens=max_tokens, params=params, emit=emit, stop=_stop(body),
                       logprobs=logprobs, mask=mask)

    def token_text(self, tok: int) -> tuple[str, list[int]]:
        piece = self.model.tokenizer.token_to_piece(tok)
        return piece.decode("utf-8", errors="replace"), list(piece)


def _response_schema(body: dict) -> Optional[dict]:
    """The JSON schema response_format asks for: None for text, {"type": "object"} for json_object."""
    rf = body.get("response_format")
    if rf is None:
        return None
    kind = rf.get("type") if isinstance(rf, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        js = rf.get("json_schema")
        schema = js.get("schema") if isinstance(js, dict) else None
        if not isinstance(schema, dict):
            raise _bad("response_format", 'response_format json_schema needs {"json_schema": {"name": ..., "schema": {...}}}')
        return schema
    raise _bad("response_format", 'response_format type must be "text", "json_object" or "json_schema"')


async def _mask_for(ctx: "_Context", body: dict):
    schema = _response_schema(body)
    if schema is None:
        return None
    from ..structured import JSONSchemaMask

    try:
        import llguidance  # noqa: F401
    except ImportError:
        raise APIError(400, "structured output needs llguidance on the server (pip install 'edgekv[serve]')",
                       param="response_format", code="unsupported") from None
    try:  # the first one builds llguidance's tokenizer (a second on a large vocabulary): off the event loop
        return await asyncio.to_thread(JSONSchemaMask, ctx.model.tokenizer, schema)
    except ValueError as e:
        raise _bad("response_format", str(e)) from None


def _messages_prompt(ctx: _Context, body: dict) -> list[int]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise _bad("messages", "messages must be a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise _bad(f"messages[{i}]", f"messages[{i}] must be an object with a string role")
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise _bad(f"messages[{i}].content", "only text content parts are supported")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise _bad(f"messages[{i}].content", f"messages[{i}].content must be a string or text parts")
        out.append({"role": m["role"], "content": content})
    prompt = ctx.model.tokenizer.apply_chat_template(out, add_generation_prompt=True)
    return ctx.model.tokenize(prompt, special=True)


def _completion_prompt(ctx: _Context, body: dict) -> list[int]:
    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
        p = p[0]
    if isinstance(p, str):
        ids = ctx.model.tokenize(p, special=True) if p else []
    elif isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
        if not all(0 <= t < ctx.model.vocab_size for t in p):
            raise _bad("prompt", f"prompt token ids must be in [0, {ctx.model.vocab_size})")
        ids = list(p)
    else:
        raise _bad("prompt", "prompt must be a string, a list of token ids, or a list holding one of these")
    if not ids:
        raise _bad("prompt", "prompt has no tokens")
    if body.get("echo"):
        raise _bad("echo", "echo is not supported")
    if body.get("suffix"):
        raise _bad("suffix", "suffix is not supported")
    return ids


async def _body(request: HTTPRequest) -> dict:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    return body


def _usage(done: dict) -> dict:
    return {"prompt_tokens": done["prompt_tokens"], "completion_tokens": done["completion_tokens"],
            "total_tokens": done["prompt_tokens"] + done["completion_tokens"],
            "prompt_tokens_details": {"cached_tokens": done["cached_tokens"]}}


def _finite(x: float) -> float:
    return x if math.isfinite(x) else -9999.0  # a masked-out token: JSON has no -inf


def create_app(model, *, model_id: Optional[str] = None, api_key: Optional[str] = None, max_sessions: int = 4,
               kv_budget_mb: Optional[float] = None, engine=None) -> FastAPI:
    """The app for one loaded model; its scheduler runs while the app is up (lifespan).
    engine: what runs the steps (default: the model's, engine.py; benchmarks/serve.py's overhead
    mode passes one that only sleeps, to measure what the HTTP side costs)."""
    budget = None if kv_budget_mb is None else int(kv_budget_mb * 2**20)
    ctx = _Context(model, model_id or model.name, api_key, max_sessions, budget, engine)

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        ctx.scheduler.start()
        try:
            yield
        finally:
            ctx.scheduler.shutdown()

    app = FastAPI(title="edgekv", lifespan=lifespan)
    app.state.edgekv = ctx

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        return _error(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None)

    @app.exception_handler(ValueError)
    async def _value_error(request, exc: ValueError):  # SamplingParams and the tokenizer name what is wrong
        return _error(400, str(exc), code="invalid_value")

    @app.get("/v1/models")
    async def models(request: HTTPRequest):
        ctx.check_key(request)
        return {"object": "list", "data": [{"id": ctx.model_id, "object": "model", "created": ctx.created,
                                            "owned_by": "edgekv"}]}

    @app.get("/health")
    async def health():
        return {"status": "ok", **ctx.scheduler.stats()}

    @app.post("/v1/chat/completions")
    async def chat(request: HTTPRequest):
        ctx.check_key(request)
        body = await _body(request)
        ctx.check_model(body)
        ids = _messages_prompt(ctx, body)
        want_lp = body.get("logprobs") or False
        if not isinstance(want_lp, bool):
            raise _bad("logprobs", "logprobs must be a boolean")
        top = _opt_int(body, "top_logprobs", 0, 20, 0)
        if top and not want_lp:
            raise _bad("top_logprobs", "top_logprobs needs logprobs: true")
        return await _run(ctx, request, body, ids, "max_completion_tokens", top if want_lp else None, chat=True)

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest):
        ctx.check_key(request)
        body = await _body(request)
        ctx.check_model(body)
        ids = _completion_prompt(ctx, body)
        lp = _opt_int(body, "logprobs", 0, 5)
        if body.get("max_tokens") is None:
            body = dict(body, max_tokens=16)  # OpenAI's default for completions
        return await _run(ctx, request, body, ids, "max_tokens", lp, chat=False)

    return app


class _Relay:
    """Events from the scheduler thread to one request's handler on the event loop.

    emit appends under a lock and, when the handler waits, returns the call that wakes it, which
    the scheduler makes just before its next step (see scheduler.py): one wakeup per wait, not per
    token, and events that pile up while the loop is busy go out together."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.events: list[dict] = []
        self.lock = threading.Lock()
        self.waiter: Optional[asyncio.Future] = None

    def emit(self, ev: dict):  # on the scheduler thread
        with self.lock:
            self.events.append(ev)
            w, self.waiter = self.waiter, None
        return None if w is None else functools.partial(self._wake, w)

    def _wake(self, w: asyncio.Future) -> None:
        try:
            self.loop.call_soon_threadsafe(_set_done, w)
        except RuntimeError:  # the loop is gone (shutdown)
            pass

    async def get(self, timeout: Optional[float] = None) -> list[dict]:
        """The events so far (waits for one; [] after timeout seconds without)."""
        with self.lock:
            if self.events:
                out, self.events = self.events, []
                return out
            self.waiter = w = self.loop.create_future()
        if timeout is None:
            await w
        else:
            try:
                await asyncio.wait_for(w, timeout)
            except asyncio.TimeoutError:
                pass
        with self.lock:
            self.waiter = None
            out, self.events = self.events, []
        return out


def _set_done(w: asyncio.Future) -> None:
    if not w.done():
        w.set_result(None)


def _sse(data: str) -> bytes:
    return b"data: " + data.encode() + b"\r\n\r\n"


async def _run(ctx: _Context, request: HTTPRequest, body: dict, ids: list[int], max_name: str,
               logprobs: Optional[int], chat: bool):
    loop = asyncio.get_running_loop()
    relay = _Relay(loop)
    req = ctx.request_from(body, ids, max_name, logprobs, relay.emit, await _mask_for(ctx, body))
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise _bad("stream", "stream must be a boolean")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise _bad("stream_options", "stream_options must be an object")
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    created = int(time.time())
    ctx.scheduler.submit(req)
    fmt = _Format(ctx, rid, created, chat, logprobs)

    if stream:
        async def events():
            # SSE events as bytes (sse-starlette sends bytes as they are); the events that came
            # together go out in one write
            try:
                if chat:
                    yield _sse(json.dumps(fmt.chunk({"role": "assistant", "content": ""}, None)))
                while True:
                    out = []
                    for ev in await relay.get():
                        if ev["type"] == "delta":
                            out.append(_sse(fmt.delta_chunk(ev["text"], ev["tokens"])))
                        elif ev["type"] == "done":
                            out.append(_sse(json.dumps(fmt.chunk({} if chat else "", ev["finish_reason"]))))
                            if opts.get("include_usage"):
                                out.append(_sse(json.dumps(dict(fmt.chunk({}, None), choices=[], usage=_usage(ev)))))
                            out.append(_sse("[DONE]"))
                            yield b"".join(out)
                            return
                        else:
                            out.append(_sse(json.dumps({"error": {"message": str(ev["error"]), "type": "server_error",
                                                                  "param": None, "code": None}})))
                            yield b"".join(out)
                            return
                    yield b"".join(out)
            finally:
                req.cancel()  # a no-op once done; on a disconnect, the scheduler frees the sequence

        async def on_close(message):
            req.cancel()

        return EventSourceResponse(events(), ping=15, client_close_handler_callable=on_close)

    text, tokens = [], []
    next_check = loop.time() + DISCONNECT_POLL_S
    try:
        while True:
            evs = await relay.get(max(0.0, next_check - loop.time()))
            if loop.time() >= next_check:  # events may flow without a pause: check on a clock
                if await request.is_disconnected():
                    return JSONResponse({}, status_code=499)
                next_check = loop.time() + DISCONNECT_POLL_S
            for ev in evs:
                if ev["type"] == "delta":
                    text.append(ev["text"])
                    tokens.extend(ev["tokens"])
                elif ev["type"] == "done":
                    return fmt.whole("".join(text), tokens, ev)
                else:
                    return _error(500, str(ev["error"]), type_="server_error")
    finally:
        req.cancel()


class _Format:
    """OpenAI's response objects, chat or legacy completion."""

    def __init__(self, ctx: _Context, rid: str, created: int, chat: bool, logprobs: Optional[int]):
        self.ctx, self.rid, self.created, self.chat, self.logprobs = ctx, rid, created, chat, logprobs
        self.offset = 0  # text_offset of legacy logprobs
        # a text-only chunk (no logprobs) is this template around the JSON of its text: the same
        # bytes as json.dumps(self.chunk(self.delta(text), None)), without building the dicts
        head, _, tail = json.dumps(self.chunk(self.delta("\0"), None)).rpartition(json.dumps("\0"))
        self._text_chunk = (head, tail)

    def delta(self, text: str):
        return {"content": text} if self.chat else text

    def delta_chunk(self, text: str, tokens: list) -> str:
        """The JSON of a streamed chunk carrying text (and its tokens' logprobs)."""
        if tokens and self.logprobs is not None:
            return json.dumps(self.chunk(self.delta(text), None, tokens))
        head, tail = self._text_chunk
        return head + json.dumps(text) + tail

    def lp(self, tokens: list[dict], text: str = ""):
        if self.logprobs is None:
            return None
        if self.chat:
            out = []
            for t in tokens:
                s, b = self.ctx.token_text(t["id"])
                out.append({"token": s, "logprob": _finite(t["logprob"]), "bytes": b, "top_logprobs": [
                    dict(zip(("token", "bytes"), self.ctx.token_text(i)), logprob=_finite(v)) for i, v in t["top"]]})
            return {"content": out}
        toks, lps, tops, offs = [], [], [], []
        for t in tokens:
            s = self.ctx.token_text(t["id"])[0]
            toks.append(s)
            lps.append(_finite(t["logprob"]))
            tops.append({self.ctx.token_text(i)[0]: _finite(v) for i, v in t["top"]})
            offs.append(self.offset)
            self.offset += len(s)
        return {"tokens": toks, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offs}

    def chunk(self, delta, finish: Optional[str], tokens: Optional[list] = None) -> dict:
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish,
                                  "logprobs": self.lp(tokens) if tokens else None}
        if self.chat:
            choice["delta"] = delta
        else:
            choice["text"] = delta
        return {"id": self.rid, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.ctx.model_id, "choices": [choice]}

    def whole(self, text: str, tokens: list[dict], done: dict) -> dict:
        choice: dict[str, Any] = {"index": 0, "finish_reason": done["finish_reason"], "logprobs": self.lp(tokens)}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        return {"id": self.rid, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.ctx.model_id, "choices": [choice], "usage": _usage(done)}
