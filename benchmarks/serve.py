"""`edgekv serve` measured through the real `openai` client (issue 19).

Three modes, each writing JSON + markdown under benchmarks/results/ as it goes (a partial run
leaves its finished rows):

  python benchmarks/serve.py bench [--quick]   -> serve.{json,md}
      aggregate decode tokens/s, p50/p95 time-to-first-token and inter-token latency at 1, 2, 4, 8
      concurrent streamed chat clients (greedy, fixed prompts, fixed max_tokens), edgekv's server
      against llama-cpp-python's (`python -m llama_cpp.server`) on the same GGUF and threads,
      alternated one at a time in their own subprocesses, plus in-process `Model.generate`.
  python benchmarks/serve.py load              -> serve_load.{json,md}
      >= 500 requests from 8 clients (some cancelled mid-stream): errors, server RSS, busy sessions.
  python benchmarks/serve.py overhead          -> serve_overhead.{json,md}
      what the HTTP side costs per streamed token, without the model's compute: the server runs
      an engine whose step only hashes a buffer (dropping the GIL, as the C step does); wall time and CPU
      per token of the event loop, the scheduler and the client, against the scheduler alone.
  python benchmarks/serve.py structured        -> structured.{json,md}
      20+ schema/prompt pairs through response_format (validated with jsonschema), and the decode
      time json_schema adds in-process on Qwen2.5-Coder-1.5B (medians, same run).

The machine is shared: every measurement records os.getloadavg(); figures are medians over repeats.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from common import REPO, command_line, machine, machine_line

RESULTS = REPO / "benchmarks" / "results"
PY = sys.executable
THREADS = 2
CTX = 1024


def _prompts(n: int = 8) -> list[str]:
    """Fixed prompts: the first n long-enough WikiText-2 lines, each to be continued at length."""
    src = REPO.parent / "shared" / "data" / "wikitext2_valid.txt"
    if not src.exists():
        src = Path("/work/shared/data/wikitext2_valid.txt")
    lines = [ln.strip() for ln in src.read_text(encoding="utf-8").splitlines()
             if len(ln.strip()) > 200 and not ln.strip().startswith("=")]
    return [f"Write three paragraphs that continue this text:\n\n{ln[:300]}" for ln in lines[:n]]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


class Server:
    """One server in its own subprocess on a free 127.0.0.1 port; stop() ends it (by its pid)."""

    def __init__(self, kind: str, gguf: Path, name: str, max_sessions: int = 8):
        import httpx
        self.kind, self.port = kind, _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, PYTHONPATH=str(REPO / "python"))
        if kind == "edgekv":
            cmd = [PY, "-m", "edgekv", "serve", "--model", str(gguf), "--threads", str(THREADS), "--ctx", str(CTX),
                   "--port", str(self.port), "--max-sessions", str(max_sessions), "--served-name", name]
            ready = self.url + "/health"
        else:
            cmd = [PY, "-m", "llama_cpp.server", "--model", str(gguf), "--n_threads", str(THREADS),
                   "--n_threads_batch", str(THREADS), "--n_ctx", str(CTX), "--host", "127.0.0.1",
                   "--port", str(self.port), "--model_alias", name, "--verbose", "False",
                   "--interrupt_requests", "False"]  # queue concurrent requests (the default cuts the running one)
            ready = self.url + "/v1/models"
        self.log = open(f"/tmp/edgekv-serve-bench-{kind}-{os.getpid()}.log", "w")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{kind} server exited with {self.proc.returncode}; see {self.log.name}")
            try:
                if httpx.get(ready, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{kind} server did not start in 300 s")
            time.sleep(0.3)

    def health(self) -> dict:
        import httpx
        return httpx.get(self.url + "/health", timeout=10).json()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def _client(server: Server):
    import openai
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=600)


def _stream(client, name: str, prompt: str, max_tokens: int, cancel_after: int = 0, **extra) -> dict:
    """One streamed chat completion: arrival times of its text pieces (relative to the request),
    and the CPU time this client thread spent on it."""
    c0 = time.thread_time()
    t0 = time.perf_counter()
    stream = client.chat.completions.create(model=name, messages=[{"role": "user", "content": prompt}],
                                            max_tokens=max_tokens, temperature=0, stream=True, **extra)
    times, text = [], []
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            times.append(time.perf_counter() - t0)
            text.append(chunk.choices[0].delta.content)
            if cancel_after and len(times) >= cancel_after:
                stream.close()
                break
    return {"start": t0, "times": times, "text": "".join(text), "client_cpu_s": time.thread_time() - c0}


def _stream_lean(http, server: "Server", name: str, prompt: str, max_tokens: int) -> dict:
    """As _stream, through httpx and json.loads instead of the openai client's pydantic objects:
    the same request and SSE bytes, each chunk parsed, at a fraction of the client's CPU."""
    c0 = time.thread_time()
    t0 = time.perf_counter()
    times, text = [], []
    body = {"model": name, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True}
    with http.stream("POST", server.url + "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            content = chunk["choices"][0]["delta"].get("content") if chunk["choices"] else None
            if content:
                times.append(time.perf_counter() - t0)
                text.append(content)
    return {"start": t0, "times": times, "text": "".join(text), "client_cpu_s": time.thread_time() - c0}


def _thread_cpu_s(pid: int, tid: int) -> float:
    """CPU time (user + system) of one thread of a process, from /proc."""
    f = open(f"/proc/{pid}/task/{tid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def _proc_cpu_s(pid: int) -> float:
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def _round(server: Server, name: str, prompts: list[str], clients: int, max_tokens: int, tag: str = "",
           lean: bool = False) -> dict:
    """`clients` concurrent streams (prompt i to client i, tagged so that no earlier round's KV is
    reused beyond the chat template), timed together. lean: httpx + json.loads clients."""
    import httpx
    client = _client(server)
    http = httpx.Client(timeout=600)  # one client, as the openai client keeps one
    prompts = [f"[{tag}] {p}" for p in prompts]
    load0 = os.getloadavg()[0]
    pid = server.proc.pid
    cpu0, loop0 = _proc_cpu_s(pid), _thread_cpu_s(pid, pid)
    t0 = time.perf_counter()
    one = (lambda p: _stream_lean(http, server, name, p, max_tokens)) if lean else (lambda p: _stream(client, name, p, max_tokens))
    with cf.ThreadPoolExecutor(clients) as ex:
        outs = list(ex.map(one, prompts[:clients]))
    wall = time.perf_counter() - t0
    cpu1, loop1 = _proc_cpu_s(pid), _thread_cpu_s(pid, pid)
    http.close()
    ttft = [o["times"][0] for o in outs if o["times"]]
    itl = [b - a for o in outs for a, b in zip(o["times"], o["times"][1:])]
    toks = sum(len(o["times"]) for o in outs)
    # decode window: from the first first-token to the last token, all streams together
    first = min(o["start"] + o["times"][0] for o in outs if o["times"])
    last = max(o["start"] + o["times"][-1] for o in outs if o["times"])
    decode = sum(len(o["times"]) - 1 for o in outs if o["times"])
    # steady: while every stream decodes (last first-token .. first last-token), tokens of all streams
    lo = max(o["start"] + o["times"][0] for o in outs if o["times"])
    hi = min(o["start"] + o["times"][-1] for o in outs if o["times"])
    n_in = sum(1 for o in outs for t in o["times"] if lo < o["start"] + t <= hi)
    per_tok = 1e3 / max(1, toks)
    return {"clients": clients, "client": "httpx+json" if lean else "openai", "tokens": toks,
            "client_cpu_ms_per_token": per_tok * sum(o["client_cpu_s"] for o in outs),
            "server_cpu_ms_per_token": per_tok * (cpu1 - cpu0),
            "server_main_thread_cpu_ms_per_token": per_tok * (loop1 - loop0), "tokens_per_stream": [len(o["times"]) for o in outs], "wall_s": wall, "tok_s_all_in": toks / wall,
            "decode_tok_s": decode / (last - first) if last > first else None,
            "steady_tok_s": n_in / (hi - lo) if hi - lo > 0.2 else None,
            "times": [[round(o["start"] - t0, 4)] + [round(t, 4) for t in o["times"]] for o in outs],
            "ttft_p50_s": float(np.percentile(ttft, 50)), "ttft_p95_s": float(np.percentile(ttft, 95)),
            "itl_p50_s": float(np.percentile(itl, 50)) if itl else None,
            "itl_p95_s": float(np.percentile(itl, 95)) if itl else None,
            "loadavg_1m_start": load0, "loadavg_1m_end": os.getloadavg()[0]}


def _inprocess(gguf: Path, prompt: str, max_tokens: int) -> dict:
    """Model.generate (streamed, greedy) in this process: decode tok/s as the server rounds count it."""
    import edgekv
    m = edgekv.Model(str(gguf), threads=THREADS, ctx=CTX)
    try:
        load0 = os.getloadavg()[0]
        t0 = time.perf_counter()
        times = []
        for piece in m.chat([{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0, stream=True):
            if piece:
                times.append(time.perf_counter() - t0)
        return {"tokens": len(times), "ttft_s": times[0], "decode_tok_s": (len(times) - 1) / (times[-1] - times[0]),
                "steady_tok_s": (len(times) - 1) / (times[-1] - times[0]), "loadavg_1m_start": load0, "loadavg_1m_end": os.getloadavg()[0]}
    finally:
        m.close()


def _med(rows: list[dict], key: str):
    vals = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def _write(stem: str, data: dict, md: str) -> None:
    (RESULTS / f"{stem}.json").write_text(json.dumps(data, indent=1) + "\n")
    (RESULTS / f"{stem}.md").write_text(md)


# ---- bench ------------------------------------------------------------------------------------


def _bench_md(data: dict) -> str:
    out = [f"# `edgekv serve` vs llama-cpp-python's server\n\n{machine_line(data['machine'])}\n\n"
           f"Streamed chat completions through the `openai` client, greedy, max_tokens {data['max_tokens']} (a short chat "
           "answer; with 32 the decode window was mostly the other streams' prefill: docs/decisions.md), "
           f"threads {THREADS}, ctx {CTX}, fixed WikiText-2 prompts (client i gets prompt i, tagged per round so no earlier round's KV is reused past the chat template; llama-cpp-python's server runs with `--interrupt_requests False` so that concurrent requests queue instead of cutting the running one). Medians over "
           f"{data['repeats']} repeat(s) ({data.get('big_repeats', data['repeats'])} on the big model); llama-cpp-python's server at "
           f"{', '.join(map(str, data.get('llama_levels', [1, 2, 4, 8])))} client(s); servers alternated one at a time in their own subprocess. "
           "steady tok/s: tokens of all streams while every stream decodes (from the last first-token to the first last-token) over that window; "
           "decode tok/s: tokens after each stream's first, over the window from the first first-token to "
           "the last token (all streams); all-in: all tokens over the round's wall time. CPU ms/token: the "
           "server process's CPU time over the round (prefill included; in parentheses its main thread, which runs "
           "the event loop), and the client threads' CPU time (time.thread_time), per streamed token; client and "
           "server share the same 2 cores, so the client's CPU slows the server. `edgekv, httpx+json client`: the "
           "same 1-client round through httpx's line iterator and json.loads per chunk (the same request, bytes and "
           "parsing of each chunk's JSON, without the openai client's pydantic objects; the same prompt as the "
           "1-client openai round and the in-process run, so the same tokens: its prompt's KV is reused, which the decode "
           "figures do not count). The machine is "
           "shared (load average recorded per round, 2 cores).\n"]
    for mname, m in data["models"].items():
        out.append(f"\n## {mname}\n\n| server | clients | steady tok/s | decode tok/s | all-in tok/s | TTFT p50 / p95 (s) | ITL p50 / p95 (ms) | "
                   "CPU ms/token: server (main thread) / client | load avg |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|\n")
        for kind in ("edgekv", "edgekv_lean", "llama_cpp"):
            for c, rows in sorted(m.get(kind, {}).items(), key=lambda kv: int(kv[0])):
                f = lambda k: _med(rows, k) if _med(rows, k) is not None else float("nan")  # noqa: E731
                label = "edgekv, httpx+json client" if kind == "edgekv_lean" else kind
                out.append(f"| {label} | {c} | {f('steady_tok_s'):.2f} | {f('decode_tok_s'):.2f} | {f('tok_s_all_in'):.2f} | "
                           f"{f('ttft_p50_s'):.2f} / {f('ttft_p95_s'):.2f} | {1e3 * f('itl_p50_s'):.0f} / {1e3 * f('itl_p95_s'):.0f} | "
                           f"{f('server_cpu_ms_per_token'):.2f} ({f('server_main_thread_cpu_ms_per_token'):.2f}) / {f('client_cpu_ms_per_token'):.2f} | "
                           f"{f('loadavg_1m_start'):.1f} |\n")
        if m.get("inprocess"):
            out.append(f"\nIn-process `Model.chat(stream=True)`: decode {_med(m['inprocess'], 'decode_tok_s'):.2f} tok/s "
                       f"(median of {len(m['inprocess'])}, load avg {_med(m['inprocess'], 'loadavg_1m_start'):.1f}).\n")
        t = m.get("targets")
        if t:
            out.append("\nTargets (issue 19): " + "; ".join(f"{k}: {v}" for k, v in t.items()) + "\n")
    return "".join(out)


def _targets(m: dict) -> dict:
    e, l_ = m.get("edgekv", {}), m.get("llama_cpp", {})
    t = {}
    for key in ("steady_tok_s", "decode_tok_s"):
        if "4" in e and "1" in e and _med(e["4"], key) and _med(e["1"], key):
            r = _med(e["4"], key) / _med(e["1"], key)
            t[f"{key}: 4 clients / 1 client (edgekv, >= 2.5x)"] = f"{r:.2f}x {'met' if r >= 2.5 else 'NOT met'}"
        if "4" in e and "4" in l_ and _med(e["4"], key) and _med(l_["4"], key):
            r = _med(e["4"], key) / _med(l_["4"], key)
            t[f"{key}: edgekv / llama-cpp-python at 4 clients (>= 3x)"] = f"{r:.2f}x {'met' if r >= 3 else 'NOT met'}"
    for key, label in (("edgekv", "openai client"), ("edgekv_lean", "httpx+json client")):
        if "1" in m.get(key, {}) and m.get("inprocess"):
            r = _med(m[key]["1"], "decode_tok_s") / _med(m["inprocess"], "decode_tok_s")
            t[f"1 client via server ({label}) / in-process generate (>= 0.95)"] = f"{r:.3f} {'met' if r >= 0.95 else 'NOT met'}"
    return t


def bench(args) -> None:
    import edgekv
    prompts = _prompts(8)
    data = {"machine": machine(command_line("serve.py", sys.argv[1:])), "max_tokens": args.max_tokens,
            "repeats": args.repeats,
            "big_repeats": args.big_repeats, "llama_levels": args.llama_levels, "models": {}}
    for mname, levels, reps in ((args.small, args.levels, args.repeats), (args.big, args.big_levels, args.big_repeats)):
        gguf = Path(edgekv.registry.resolve(mname, progress=False))
        m = data["models"].setdefault(mname, {"edgekv": {}, "llama_cpp": {}, "inprocess": []})
        for rep in range(reps):
            order = ("edgekv", "llama_cpp") if rep % 2 == 0 else ("llama_cpp", "edgekv")
            for kind in order:
                srv = Server(kind, gguf, mname)
                try:
                    _stream(_client(srv), mname, prompts[0], 4)  # warm-up
                    rounds = [(kind, c, False) for c in levels if kind == "edgekv" or c in args.llama_levels]
                    if kind == "edgekv":  # the overhead target again, with a client that costs less CPU
                        rounds.insert(1, ("edgekv_lean", 1, True))
                    for key, c, lean in rounds:
                        row = _round(srv, mname, prompts, c, args.max_tokens, tag=f"{rep}-{c}", lean=lean)
                        row["repeat"] = rep
                        m.setdefault(key, {}).setdefault(str(c), []).append(row)
                        print(mname, key, json.dumps(row), flush=True)
                        m["targets"] = _targets(m)
                        _write("serve", data, _bench_md(data))
                finally:
                    srv.stop()
            m["inprocess"].append(_inprocess(gguf, f"[{rep}-1] {prompts[0]}", args.max_tokens))
            m["targets"] = _targets(m)
            _write("serve", data, _bench_md(data))
            print(mname, "inprocess", m["inprocess"][-1], flush=True)


# ---- load -------------------------------------------------------------------------------------


def load(args) -> None:
    import edgekv
    gguf = Path(edgekv.registry.resolve(args.small, progress=False))
    prompts = _prompts(8)
    srv = Server("edgekv", gguf, args.small, max_sessions=8)
    data = {"machine": machine(command_line("serve.py", sys.argv[1:])), "model": args.small,
            "requests": args.requests, "clients": 8, "max_tokens": args.load_max_tokens}
    errors, done, rss, cancelled = [], [0], {}, [0]
    client = _client(srv)
    t0 = time.perf_counter()
    load0 = os.getloadavg()[0]

    def one(i: int) -> None:
        cancel = 3 if i % 5 == 4 else 0  # every 5th request closes its stream after 3 pieces
        try:
            o = _stream(client, args.small, prompts[i % 8] + f" (request {i})", args.load_max_tokens, cancel_after=cancel)
            if cancel and len(o["times"]) >= cancel:
                cancelled[0] += 1
        except Exception as e:  # noqa: BLE001 - a benchmark counts every failure, of any kind
            errors.append(f"request {i}: {type(e).__name__}: {e}")

    try:
        with cf.ThreadPoolExecutor(8) as ex:
            futs = [ex.submit(one, i) for i in range(50)]
            cf.wait(futs)
            time.sleep(0.5)
            rss["after_50"] = _rss(srv.proc.pid)
            futs = [ex.submit(one, i) for i in range(50, args.requests)]
            cf.wait(futs)
        deadline = time.monotonic() + 60
        while True:
            st = srv.health()
            if st["running"] == 0 and st["waiting"] == 0 and st["busy_sessions"] == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        rss["end"] = _rss(srv.proc.pid)
    finally:
        srv.stop()
    ratio = rss["end"] / rss["after_50"]
    data.update({"errors": len(errors), "error_samples": errors[:10], "cancelled_by_client": cancelled[0],
                 "rss_after_50": rss["after_50"], "rss_end": rss["end"], "rss_ratio": ratio,
                 "server_stats_end": st, "wall_s": time.perf_counter() - t0, "loadavg_1m_start": load0,
                 "loadavg_1m_end": os.getloadavg()[0],
                 "targets": {"0 errors": len(errors) == 0, "RSS end within 5% of after-50": abs(ratio - 1) <= 0.05,
                             "0 busy sessions": st["busy_sessions"] == 0 and st["running"] == 0}})
    md = (f"# `edgekv serve` bounded load test\n\n{machine_line(data['machine'])}\n\n"
          f"{args.requests} streamed chat requests from 8 concurrent `openai` clients on {args.small} "
          f"(max_tokens {args.load_max_tokens}, greedy; every 5th closes its stream after 3 pieces), "
          f"edgekv server in a subprocess, threads {THREADS}, --max-sessions 8.\n\n"
          "| measure | value | target |\n|---|---:|---|\n"
          f"| errors | {len(errors)} | 0: {'met' if not errors else 'NOT met'} |\n"
          f"| cancelled mid-stream by the client | {cancelled[0]} | |\n"
          f"| server RSS after 50 requests | {rss['after_50'] / 2**20:.1f} MiB | |\n"
          f"| server RSS at the end | {rss['end'] / 2**20:.1f} MiB ({100 * (ratio - 1):+.2f}%) | within 5%: "
          f"{'met' if abs(ratio - 1) <= 0.05 else 'NOT met'} |\n"
          f"| busy sessions / running at the end | {st['busy_sessions']} / {st['running']} | 0 |\n"
          f"| server counters at the end | completed {st['completed']}, cancelled {st['cancelled']}, idle sessions {st['idle_sessions']} | |\n"
          f"| wall time | {data['wall_s']:.0f} s (load avg {load0:.1f} -> {data['loadavg_1m_end']:.1f}) | |\n")
    _write("serve_load", data, md)
    print(md)


# ---- structured -------------------------------------------------------------------------------

# bounded strings and integers: a small model may otherwise repeat a digit or letter up to max_tokens
_S, _I = {"type": "string", "maxLength": 24}, {"type": "integer", "minimum": -100000, "maximum": 100000000}
_N, _B = {"type": "number"}, {"type": "boolean"}


def _obj(props: dict, required=None) -> dict:
    return {"type": "object", "properties": props, "required": list(props) if required is None else required,
            "additionalProperties": False}


def _arr(items: dict, lo=1, hi=3) -> dict:
    return {"type": "array", "items": items, "minItems": lo, "maxItems": hi}


PAIRS = [
    (_obj({"name": _S, "age": _I}), "Describe a person named Ana who is 31 years old, as JSON."),
    (_obj({"city": _S, "country": _S, "population": _I}), "Give facts about Paris as JSON."),
    (_obj({"title": _S, "year": _I, "rating": _N}), "Describe a film you like as JSON."),
    (_obj({"color": {"enum": ["red", "green", "blue"]}}), "Pick a primary color. Answer in JSON."),
    (_obj({"sentiment": {"enum": ["positive", "negative", "neutral"]}, "score": _N}), "Classify: 'I love this!' as JSON."),
    (_obj({"items": _arr(_S)}), "List some fruits as JSON."),
    (_obj({"numbers": _arr(_I, 2, 5)}), "Give a few prime numbers as JSON."),
    (_obj({"user": _obj({"id": _I, "email": _S})}), "Make a user record as JSON."),
    (_obj({"order": _obj({"id": _I, "lines": _arr(_obj({"sku": _S, "qty": _I}))})}), "Make an order with items as JSON."),
    (_obj({"ok": _B}), "Is water wet? Answer as JSON."),
    (_obj({"x": _N, "y": _N}), "Give a 2D point as JSON."),
    (_obj({"name": _S, "tags": _arr({"enum": ["a", "b", "c"]})}), "Tag an item as JSON."),
    (_obj({"lang": {"enum": ["python", "c", "rust", "go"]}, "reason": _S}), "Which language for a CLI tool? JSON."),
    (_obj({"a": _I, "b": _I, "sum": _I}), "Add 2 and 3, show the operands and the sum as JSON."),
    (_obj({"name": _S, "nickname": _S}, required=["name"]), "A person with an optional nickname, as JSON."),
    (_obj({"matrix": _arr(_arr(_I, 2, 2), 2, 2)}), "A 2x2 identity matrix as JSON."),
    (_obj({"event": _S, "date": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"}}), "A holiday and its date, JSON."),
    (_obj({"temp_c": {"type": "number", "minimum": -50, "maximum": 60}, "unit": {"const": "C"}}), "Today's temperature as JSON."),
    (_obj({"steps": _arr(_obj({"n": _I, "text": _S}), 1, 3)}), "Steps to make tea as JSON."),
    (_obj({"book": _obj({"title": _S, "author": _obj({"first": _S, "last": _S})})}), "A book and its author as JSON."),
    (_obj({"status": {"enum": ["open", "closed"]}, "count": {"type": "integer", "minimum": 0, "maximum": 9}}), "Ticket status as JSON."),
    (_obj({"price": _N, "currency": {"enum": ["USD", "EUR"]}, "in_stock": _B}), "A product price as JSON."),
    (_arr(_obj({"k": _S, "v": _I}), 1, 3), "A JSON array of key/value pairs."),
    (_obj({"ids": _arr(_I, 1, 4), "meta": _obj({"source": _S})}), "Some ids with their source as JSON."),
]


def structured(args) -> None:
    import edgekv
    import jsonschema
    data = {"machine": machine(command_line("serve.py", sys.argv[1:])), "pairs": [], "overhead": []}
    gguf = Path(edgekv.registry.resolve(args.small, progress=False))
    srv = Server("edgekv", gguf, args.small, max_sessions=4)
    try:
        client = _client(srv)
        for i, (schema, prompt) in enumerate(PAIRS):
            r = client.chat.completions.create(
                model=args.small, messages=[{"role": "user", "content": prompt}], max_tokens=args.schema_max_tokens,
                temperature=0, response_format={"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schema}})
            text = r.choices[0].message.content
            try:
                jsonschema.validate(json.loads(text), schema)
                ok, why = True, ""
            except (ValueError, jsonschema.ValidationError) as e:
                ok, why = False, str(e)[:200]
            data["pairs"].append({"i": i, "prompt": prompt, "output": text, "valid": ok, "why": why,
                                  "finish_reason": r.choices[0].finish_reason})
            print(i, ok, text, flush=True)
    finally:
        srv.stop()
    # masking's added decode time, in-process on the big model: same prompt, alternated
    big = Path(edgekv.registry.resolve(args.big, progress=False))
    m = edgekv.Model(str(big), threads=THREADS, ctx=CTX)
    schema, prompt = PAIRS[8]
    try:
        for rep in range(args.struct_repeats):
            for mode in (("plain", "json") if rep % 2 == 0 else ("json", "plain")):
                load0 = os.getloadavg()[0]
                t0 = time.perf_counter()
                times = []
                kw = {"json_schema": schema} if mode == "json" else {}
                for piece in m.chat([{"role": "user", "content": prompt}], max_tokens=args.struct_tokens,
                                    temperature=0, stream=True, **kw):
                    if piece:
                        times.append(time.perf_counter() - t0)
                row = {"mode": mode, "repeat": rep, "tokens": len(times),
                       "decode_s_per_token": (times[-1] - times[0]) / (len(times) - 1), "loadavg_1m_start": load0}
                data["overhead"].append(row)
                print(row, flush=True)
    finally:
        m.close()
    plain = statistics.median(r["decode_s_per_token"] for r in data["overhead"] if r["mode"] == "plain")
    js = statistics.median(r["decode_s_per_token"] for r in data["overhead"] if r["mode"] == "json")
    nvalid = sum(p["valid"] for p in data["pairs"])
    data.update({"valid": nvalid, "total": len(PAIRS), "plain_ms_per_token": 1e3 * plain, "json_ms_per_token": 1e3 * js,
                 "added": js / plain - 1})
    md = (f"# Structured output: validity and masking cost\n\n{machine_line(data['machine'])}\n\n"
          f"{len(PAIRS)} schema/prompt pairs (in benchmarks/serve.py: nested objects, arrays, enums, numbers, "
          f"patterns, optional fields) through `response_format` json_schema on an edgekv server ({args.small}, "
          f"greedy, max_tokens {args.schema_max_tokens}), each output checked with `jsonschema.validate`.\n\n"
          f"| measure | value | target |\n|---|---:|---|\n"
          f"| outputs valid | {nvalid} / {len(PAIRS)} | 100%: {'met' if nvalid == len(PAIRS) else 'NOT met'} |\n"
          f"| decode ms/token, {args.big} plain | {1e3 * plain:.1f} | |\n"
          f"| decode ms/token, {args.big} with json_schema | {1e3 * js:.1f} | |\n"
          f"| added by masking | {100 * data['added']:+.1f}% | <= 10%: {'met' if data['added'] <= 0.10 else 'NOT met'} |\n\n"
          f"Masking cost: in-process `Model.chat(stream=True)`, greedy, max_tokens {args.struct_tokens}, the order-"
          f"schema prompt with and without `json_schema`, alternated, medians of {args.struct_repeats} each; decode "
          f"time per token after the first piece (load avg {statistics.median(r['loadavg_1m_start'] for r in data['overhead']):.1f}).\n")
    _write("structured", data, md)
    print(md)


# ---- overhead ---------------------------------------------------------------------------------


class _StubSession:
    def __init__(self):
        self.tokens = []

    @property
    def n_past(self):
        return len(self.tokens)

    def truncate(self, n):
        del self.tokens[n:]

    def kv_bytes(self):
        return 0

    def close(self):
        pass


class _StubEngine:
    """A step that hashes a buffer for about step_s (hashlib drops the GIL, as the C step does, and
    uses a core: a sleep's wakeup comes several ms late on a loaded machine) and returns logits that
    pick the next token of a fixed text: the model's compute replaced, the rest kept."""

    prefill_chunk, prefill_budget = 256, 64

    def __init__(self, vocab: int, text_ids: list[int], step_s: float, max_batch: int = 8):
        import hashlib
        self.vocab, self.text, self.max_batch = vocab, text_ids, max_batch
        probe = bytes(1 << 22)
        best = min(self._timed(hashlib, probe) for _ in range(5))
        self.blob = bytes(int(len(probe) * step_s / best))
        self.hashlib = hashlib

    @staticmethod
    def _timed(hashlib, b: bytes) -> float:
        t = time.perf_counter()
        hashlib.sha256(b).digest()
        return time.perf_counter() - t

    def new_session(self):
        return _StubSession()

    def step(self, sessions, ids):
        self.hashlib.sha256(self.blob).digest()
        out = []
        for s, x in zip(sessions, ids):
            s.tokens.extend(int(t) for t in x)
            s.generated = getattr(s, "generated", -1) + 1 if len(x) == 1 else 0
            row = np.full(self.vocab, -10.0, np.float32)
            row[self.text[s.generated % len(self.text)]] = 0.0
            out.append(row)
        return out


_OVERHEAD_CLIENT = r"""
import json, sys, time
sys.path.insert(0, {bench!r})
import serve as B
class S: url = {url!r}
lean = {lean!r}
import httpx
http, client = httpx.Client(timeout=600), B._client(S)
one = (lambda p: B._stream_lean(http, S, {name!r}, p, {ntok})) if lean else (lambda p: B._stream(client, {name!r}, p, {ntok}))
one("warm-up")
t0, c0 = time.perf_counter(), time.process_time()
outs = [one(f"request {{i}}") for i in range({nreq})]
print(json.dumps({{"pieces": sum(len(o["times"]) for o in outs), "wall_s": time.perf_counter() - t0,
                  "client_cpu_s": time.process_time() - c0}}))
"""


def _tcpu(tid: int) -> float:
    return _thread_cpu_s(os.getpid(), tid)


def overhead(args) -> None:
    import threading

    import uvicorn

    import edgekv
    from edgekv.sampling import SamplingParams
    from edgekv.server import create_app
    from edgekv.server.scheduler import Request, Scheduler

    gguf = Path(edgekv.registry.resolve(args.small, progress=False))
    model = edgekv.Model(str(gguf), threads=1, ctx=2048)
    text = " ".join(_prompts(8))
    ids = [t for t in model.tokenize(text * 4) if t not in model.tokenizer.eot_ids]
    step_s = args.step_ms / 1e3
    data = {"machine": machine(command_line("serve.py", sys.argv[1:])), "model": args.small, "step_ms": args.step_ms,
            "tokens_per_request": args.overhead_tokens, "requests": args.overhead_requests, "rows": []}
    n, ntok = args.overhead_requests, args.overhead_tokens

    def alone() -> dict:
        """The scheduler with the same engine, events into a list: no HTTP."""
        sched = Scheduler(_StubEngine(model.vocab_size, ids, step_s), model.tokenizer, 4096, max_sessions=4).start()
        try:
            pieces, t0 = 0, time.perf_counter()
            c0 = _tcpu(sched._thread.native_id)
            for i in range(n):
                done, evs = threading.Event(), []

                def emit(ev, evs=evs, done=done):
                    evs.append(ev)
                    if ev["type"] != "delta":
                        done.set()
                sched.submit(Request(prompt_ids=model.tokenize(f"request {i}"), max_tokens=ntok,
                                     params=SamplingParams(temperature=0), emit=emit))
                done.wait()
                pieces += sum(1 for e in evs if e["type"] == "delta" and e["text"])
            return {"pieces": pieces, "wall_s": time.perf_counter() - t0, "scheduler_cpu_s": _tcpu(sched._thread.native_id) - c0}
        finally:
            sched.shutdown()

    def served(lean: bool) -> dict:
        app = create_app(model, model_id=args.small, max_sessions=4,
                         engine=_StubEngine(model.vocab_size, ids, step_s))
        port = _free_port()
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        th = threading.Thread(target=server.run, daemon=True)
        th.start()
        while not server.started:
            time.sleep(0.02)
        sched = app.state.edgekv.scheduler
        tids = {"loop": th.native_id, "scheduler": sched._thread.native_id, "waker": sched._waker.native_id}
        try:
            code = _OVERHEAD_CLIENT.format(bench=str(REPO / "benchmarks"), url=f"http://127.0.0.1:{port}", lean=lean,
                                           name=args.small, ntok=ntok, nreq=n)
            c0 = {k: _tcpu(t) for k, t in tids.items()}
            out = subprocess.run([PY, "-c", code], capture_output=True, text=True,
                                 env=dict(os.environ, PYTHONPATH=str(REPO / "python")), check=True)
            c1 = {k: _tcpu(t) for k, t in tids.items()}
        finally:
            server.should_exit = True
            th.join(30)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        r.update({f"{k}_cpu_s": c1[k] - c0[k] for k in tids})
        return r

    try:
        for rep in range(args.repeats):
            for kind in ("alone", "openai", "httpx+json"):
                load0 = os.getloadavg()[0]
                r = alone() if kind == "alone" else served(kind == "httpx+json")
                per = 1e3 / r["pieces"]
                row = {"kind": kind, "repeat": rep, "pieces": r["pieces"], "wall_ms_per_token": per * r["wall_s"],
                       **{k.replace("_cpu_s", "_cpu_ms_per_token"): per * v for k, v in r.items() if k.endswith("_cpu_s")},
                       "loadavg_1m_start": load0}
                data["rows"].append(row)
                print(json.dumps(row), flush=True)
    finally:
        model.close()
    md = [f"# `edgekv serve`: what the HTTP side costs per token\n\n{machine_line(data['machine'])}\n\n"
          f"The server with an engine whose step hashes a buffer for ~{args.step_ms} ms on one core (hashlib drops the "
          f"GIL, as the C step does; the real step uses both cores) and picks the next token of a fixed text ({args.small}'s tokenizer and vocabulary): {n} streamed chat "
          f"requests of {ntok} tokens, one at a time, from a client in its own process (the openai client, or httpx + "
          "json.loads per chunk). `alone`: the scheduler with the same engine and no HTTP (events into a list). CPU "
          "ms/token per thread (from /proc, 10 ms ticks over the run): the event loop, the scheduler (the stub step's "
          "hashing included), its waker, and the client process. Wall ms/token (first request to last piece, over the "
          "pieces) depends on how much CPU the machine's other jobs leave: read it only on a quiet machine. Medians over "
          f"{args.repeats} repeats, the three kinds alternated; load average recorded (shared machine, 2 cores).\n\n"
          "| kind | loop CPU | scheduler CPU | waker CPU | client CPU | wall ms/token | load avg |\n"
          "|---|---:|---:|---:|---:|---:|---:|\n"]
    med = lambda kind, k: _med([r for r in data["rows"] if r["kind"] == kind], k)  # noqa: E731
    for kind in ("alone", "openai", "httpx+json"):
        f = lambda k: med(kind, k)  # noqa: E731
        cell = lambda k: "" if f(k) is None else f"{f(k):.3f}"  # noqa: E731
        md.append(f"| {kind} | {cell('loop_cpu_ms_per_token')} | {cell('scheduler_cpu_ms_per_token')} | "
                  f"{cell('waker_cpu_ms_per_token')} | {cell('client_cpu_ms_per_token')} | {f('wall_ms_per_token'):.2f} | "
                  f"{f('loadavg_1m_start'):.1f} |\n")
    _write("serve_overhead", data, "".join(md))
    print("".join(md))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=("bench", "load", "structured", "overhead"))
    ap.add_argument("--quick", action="store_true", help="bench: 1 repeat, big model at 1 and 4 clients only")
    ap.add_argument("--small", default="smollm2-135m")
    ap.add_argument("--big", default="qwen2.5-coder-1.5b")
    ap.add_argument("--max-tokens", type=int, default=128)  # a short chat answer (32 was mostly prefill: docs/decisions.md)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--big-repeats", type=int, help="repeats on the big model (default: --repeats)")
    ap.add_argument("--llama-levels", type=int, nargs="+", default=[1, 2, 4, 8],
                    help="client counts for llama-cpp-python's server (1 and 4 are what the targets use)")
    ap.add_argument("--requests", type=int, default=500)
    ap.add_argument("--load-max-tokens", type=int, default=8)
    ap.add_argument("--schema-max-tokens", type=int, default=160)
    ap.add_argument("--struct-tokens", type=int, default=24)
    ap.add_argument("--struct-repeats", type=int, default=3)
    ap.add_argument("--step-ms", type=float, default=4.0, help="overhead: the sleeping step (SmolLM2 decodes in ~4-5 ms)")
    ap.add_argument("--overhead-tokens", type=int, default=256)
    ap.add_argument("--overhead-requests", type=int, default=4)
    args = ap.parse_args(argv)
    args.levels = [1, 2, 4, 8]
    args.big_levels = [1, 4] if args.quick else [1, 2, 4, 8]
    args.big_repeats = 1 if args.quick else args.big_repeats or args.repeats
    if args.quick:
        args.repeats = 1
    {"bench": bench, "load": load, "structured": structured, "overhead": overhead}[args.mode](args)


if __name__ == "__main__":
    main()
