"""The ``edgekv`` command line: generate, chat, pull, info, serve.

    edgekv generate "Why is the sky blue?" --max-tokens 64
    echo "Write a haiku about caches" | edgekv generate - --chat
    edgekv chat --system "You are terse."
    edgekv pull --list
    edgekv info --json

Text goes to stdout; statistics, progress bars, log messages and errors go to stderr.
Mistakes a user can make (a bad flag value, a missing model file, an unknown model name, a
context overflow) print ``edgekv: error: <message>`` and exit with status 2, never a traceback.
Ctrl-C exits with status 130.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import sys
import warnings
from contextlib import contextmanager
from typing import Any, Iterable, List, Optional, Sequence

from . import registry
from .errors import ContextOverflowError, EdgekvError
from .sampling import SamplingParams

PROG = "edgekv"
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

log = logging.getLogger("edgekv")


# --------------------------------------------------------------------------------------------
# argument types
# --------------------------------------------------------------------------------------------

def _int_at_least(lo: int):
    def parse(text: str) -> int:
        try:
            value = int(text, 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {value}")
        return value

    parse.__name__ = f"integer >= {lo}"
    return parse


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


# --------------------------------------------------------------------------------------------
# the parser
# --------------------------------------------------------------------------------------------

class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps hand-wrapped descriptions and epilogs (defaults are spelled out in each help)."""


def _verbose_parent(top_level: bool) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    # On subcommands the default is SUPPRESS, so `edgekv -v generate ...` is not undone by the
    # subcommand's own default.
    p.add_argument(
        "-v", "--verbose", action="store_true",
        default=False if top_level else argparse.SUPPRESS,
        help="log progress at INFO level to stderr (e.g. weight types converted at load time)",
    )
    return p


def _model_parent() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("model")
    g.add_argument(
        "-m", "--model", default=registry.DEFAULT_MODEL, metavar="NAME_OR_PATH",
        help="a registry model name (fetched and verified on first use; see `edgekv pull --list`) "
             "or the path of a local .gguf file (default: %(default)s)",
    )
    g.add_argument(
        "-t", "--threads", type=_int_at_least(1), default=None, metavar="N",
        help="worker threads (default: available cores, at most 8; more than the available cores "
             "warns, as decoding then slows down)",
    )
    g.add_argument(
        "-c", "--ctx", type=_int_at_least(1), default=None, metavar="N",
        help="context window in tokens (default: the model's training context, at most 4096)",
    )
    g.add_argument(
        "--kv", default="fp16", metavar="POLICY",
        help="KV-cache precision: fp16, int8, int4, int3, int2, or keys/values apart such as k4v3 or k4v2; "
             "sink:P keeps P but the first token's key (the attention sink) at 8 bits, e.g. sink:int3; "
             "adaptive[@BITS] the learned controller; auto@BITS bits per layer from the model's calibration "
             "profile (`edgekv calibrate`) at most BITS on average, auto the cheapest such budget within 0.5%% "
             "of fp16 perplexity on calibration text (default: %(default)s)",
    )
    g.add_argument(
        "--kv-window", type=_int_at_least(0), default=0, metavar="W",
        help="decide a token's KV precision once it is W steps old (default: %(default)s, at once)",
    )
    g.add_argument(
        "--kv-fit-grid", action="store_true",
        help="fit each quantization group's scale and minimum for the least squared error instead of "
             "its min/max: less damage at 2 and 3 bits, a few percent slower encoding",
    )
    return p


def _sampling_parent() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("sampling")
    g.add_argument("-n", "--max-tokens", type=_int_at_least(0), default=256, metavar="N",
                   help="the most tokens to generate per reply (default: %(default)s)")
    g.add_argument("--temperature", type=_float, default=0.8, metavar="T",
                   help="sampling temperature; 0 is greedy (deterministic) (default: %(default)s)")
    g.add_argument("--top-k", type=_int_at_least(0), default=40, metavar="K",
                   help="sample among the K most likely tokens; 0 disables (default: %(default)s)")
    g.add_argument("--top-p", type=_float, default=0.95, metavar="P",
                   help="nucleus sampling: the smallest set of tokens whose probability reaches P; "
                        "1 disables (default: %(default)s)")
    g.add_argument("--seed", type=_seed, default=None, metavar="N",
                   help="random seed, for reproducible sampling (default: random)")
    return p


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="edgekv: on-device inference for small Llama-family language models.",
        epilog=(
            "examples:\n"
            '  edgekv generate "Why is the sky blue?" --max-tokens 64\n'
            '  echo "Name three primes" | edgekv generate - --chat --temperature 0\n'
            "  edgekv chat --system \"You are a helpful assistant.\"\n"
            "  edgekv pull --list\n"
            "  edgekv info --model ./model.gguf --json\n"
            "  edgekv serve --model qwen2.5-coder-0.5b --port 8000\n\n"
            "Run `edgekv COMMAND --help` for the options of one command."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[_verbose_parent(top_level=True)],
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    sub.required = True

    verbose = _verbose_parent(top_level=False)
    model = _model_parent()
    sampling = _sampling_parent()

    g = sub.add_parser(
        "generate",
        help="continue a prompt (or answer it with --chat), streaming the text",
        description=(
            "Generate text from PROMPT and stream it to stdout as it is produced. When it is done,\n"
            "one line of statistics goes to stderr: prompt tokens, prefill speed (tok/s), decode\n"
            "time per token (ms) and the bytes the KV cache holds."
        ),
        epilog=(
            "examples:\n"
            '  edgekv generate "Once upon a time" --max-tokens 64 --seed 1\n'
            '  edgekv generate "Why is the sky blue?" --chat --temperature 0\n'
            "  cat prompt.txt | edgekv generate - --json\n"
            "  edgekv generate \"What is 17*23?\" --chat --temperature 0 \\\n"
            "      --draft qwen2.5-coder-0.5b --model qwen2.5-coder-1.5b"
        ),
        formatter_class=_Formatter,
        parents=[verbose, model, sampling],
    )
    g.add_argument("prompt", metavar="PROMPT",
                   help="the prompt text; `-` reads it from stdin (trailing newlines are dropped)")
    g.add_argument("--chat", action="store_true",
                   help="send PROMPT as a user message through the model's chat template")
    g.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="stop when TEXT is generated (not included in the output); repeatable")
    g.add_argument("--json", action="store_true",
                   help="print one JSON object (text and statistics) instead of streaming")
    _add_ead_arguments(g)
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser(
        "chat",
        help="an interactive conversation",
        description=(
            "Chat with the model interactively. Each reply streams to stdout; the conversation\n"
            "so far is kept, and each turn runs all of it, so a reply is the one a fresh model\n"
            "would give to the same conversation. Type /reset to start over, /exit (or Ctrl-D) to quit.\n"
            "Ctrl-C while a reply is being written stops that reply; at the prompt it quits.\n"
            "With -v, a statistics line follows each reply on stderr."
        ),
        formatter_class=_Formatter,
        parents=[verbose, model, sampling],
    )
    c.add_argument("-s", "--system", default=None, metavar="TEXT",
                   help="a system message that starts the conversation (kept across /reset)")
    c.set_defaults(func=cmd_chat)

    p = sub.add_parser(
        "pull",
        help="download registry models into the local cache",
        description=(
            "Fetch models named in the registry into the local cache (verified against their\n"
            "pinned sha256) and print each one's path. Cached, verified models are not fetched\n"
            f"again. The cache is $EDGEKV_CACHE, else $XDG_CACHE_HOME/edgekv/models, else\n"
            "~/.cache/edgekv/models."
        ),
        formatter_class=_Formatter,
        parents=[verbose],
    )
    p.add_argument("names", nargs="*", metavar="NAME",
                   help=f"registry model names (default: {registry.DEFAULT_MODEL})")
    p.add_argument("-f", "--force", action="store_true",
                   help="fetch again even when a verified copy is cached")
    p.add_argument("-l", "--list", action="store_true",
                   help="list the known models (name, size, architecture, cached or not) and exit")
    p.set_defaults(func=cmd_pull)

    i = sub.add_parser(
        "info",
        help="describe a model: architecture, parameters, weight types, KV cache, SIMD path",
        description=(
            "Load a model and describe it: architecture, parameter count, weight types (and which\n"
            "were converted at load time), context window, KV cache bytes per token, the SIMD\n"
            "kernels in use, threads, and the file's path and size."
        ),
        formatter_class=_Formatter,
        parents=[verbose, model],
    )
    i.add_argument("--json", action="store_true", help="print the description as one JSON object")
    i.set_defaults(func=cmd_info)

    s = sub.add_parser(
        "serve",
        help="an OpenAI-compatible HTTP server (/v1/chat/completions, /v1/completions, /v1/models)",
        description=(
            "Serve the model over HTTP with OpenAI's API, streaming (SSE) or not, until Ctrl-C.\n"
            "Finished conversations stay warm: a next turn reuses the longest cached prefix.\n"
            "Needs the serve extra: pip install 'edgekv[serve]'. See docs/server.md."
        ),
        epilog=(
            "examples:\n"
            "  edgekv serve --model qwen2.5-coder-0.5b --port 8000\n"
            "  edgekv serve --kv int8 --max-sessions 8 --kv-budget-mb 256 --api-key secret"
        ),
        formatter_class=_Formatter,
        parents=[verbose, model],
    )
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    s.add_argument("--port", type=_int_at_least(1), default=8000, help="port (default: %(default)s)")
    s.add_argument("--max-sessions", type=_int_at_least(1), default=4, metavar="N",
                   help="sessions (running or kept warm) at most; the least recently used warm one "
                        "goes first (default: %(default)s)")
    s.add_argument("--kv-budget-mb", type=_float, default=None, metavar="MB",
                   help="evict warm sessions, least recently used first, while their KV exceeds MB "
                        "(default: no limit but --max-sessions)")
    s.add_argument("--api-key", default=None, metavar="KEY",
                   help="require `Authorization: Bearer KEY` (default: $EDGEKV_API_KEY, else no key)")
    s.add_argument("--served-name", default=None, metavar="NAME",
                   help="the model id clients send (default: the --model argument)")
    s.set_defaults(func=cmd_serve)
    k = sub.add_parser(
        "calibrate",
        help="measure a model's per-layer KV sensitivity (the profile auto@BITS uses)",
        description=(
            "Quantize one layer's keys or values at a time (6, 4, 3 and 2 bits, the rest of the cache int8)\n"
            "and measure the damage on calibration text (the package's docs and GSM8K training problems,\n"
            "never WikiText-2): the mean KL divergence of the next-token distribution. Then pick the\n"
            "budget `--kv auto` uses. Writes a JSON profile keyed by the file's sha256 into the edgekv\n"
            "cache (kv_profiles/); registry models ship theirs, so this is for other GGUF files."
        ),
        formatter_class=_Formatter,
        parents=[verbose],
    )
    k.add_argument("model", metavar="MODEL", help="a registry model name or the path of a local .gguf file")
    k.add_argument("-t", "--threads", type=_int_at_least(1), default=None, metavar="N",
                   help="worker threads (default: available cores, at most 8)")
    k.add_argument("-f", "--force", action="store_true", help="measure again even when a profile exists")
    k.add_argument("-o", "--out", default=None, metavar="DIR",
                   help="write the profile into DIR instead of the cache's kv_profiles/")
    k.add_argument("--json", action="store_true", help="print the profile instead of a summary")
    k.add_argument("--auto-only", action="store_true",
                   help="keep the existing per-layer table and only pick the `--kv auto` budget again")
    k.set_defaults(func=cmd_calibrate)
    return parser


def _add_ead_arguments(g: argparse.ArgumentParser) -> None:
    from .ead import DEFAULT_D_MIN, DEFAULT_TAU, DEFAULT_WINDOW

    e = g.add_argument_group(
        "entropy adaptive decoding",
        "With --draft, the draft (small) model writes and --model (the large one, same tokenizer)\n"
        "takes over while the rolling entropy of the active model's next-token distribution\n"
        "exceeds --tau. The statistics line then gives each model's share of the tokens, the\n"
        "switches, the catch-up tokens and compute relative to running --model alone.",
    )
    e.add_argument("--draft", default=None, metavar="NAME_OR_PATH",
                   help="the small model that writes while the text is easy (registry name or .gguf path)")
    e.add_argument("--tau", type=_float, default=None, metavar="BITS",
                   help=f"switch to --model when the rolling entropy exceeds BITS (default: {DEFAULT_TAU})")
    e.add_argument("--tau-low", type=_float, default=None, metavar="BITS",
                   help="switch back when it falls below BITS (default: --tau; lower adds hysteresis)")
    e.add_argument("--window", type=_int_at_least(1), default=None, metavar="N",
                   help=f"tokens in the rolling entropy (default: {DEFAULT_WINDOW})")
    e.add_argument("--d-min", type=_int_at_least(1), default=None, metavar="N",
                   help=f"tokens --model writes before it may hand back (default: {DEFAULT_D_MIN})")
    e.add_argument("--verify", action="store_true",
                   help="--model checks the draft's tokens when it catches up and rolls back to the "
                        "first it would not have chosen (the output is then distributed as --model's)")
    e.add_argument("--max-draft", type=_int_at_least(0), default=None, metavar="N",
                   help="with --verify: check at least every N draft tokens (default: 0, only at switches "
                        "and at the end)")
    e.add_argument("--verify-window", type=_int_at_least(0), default=None, metavar="N",
                   help="with --verify: check only the last N draft tokens at each check, keeping older "
                        "ones (default: 0, all; a rejection then throws away at most N tokens)")


def _ead_config(args: argparse.Namespace):
    """The EAD configuration of a generate command (None without --draft); fails fast on bad values."""
    from .ead import EADConfig

    given = {k: getattr(args, k) for k in ("tau", "tau_low", "window", "d_min", "max_draft", "verify_window")
             if getattr(args, k) is not None}
    if args.draft is None:
        flags = [f"--{k.replace('_', '-')}" for k in given] + (["--verify"] if args.verify else [])
        if flags:
            raise ValueError(f"{', '.join(flags)} needs --draft (the small model of the pair)")
        return None
    for k in ("max_draft", "verify_window"):
        if k in given and not args.verify:
            raise ValueError(f"--{k.replace('_', '-')} needs --verify")
    with _naming_options(_EAD_OPTIONS):
        return EADConfig(verify=args.verify, **given)


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------

def _out(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _err(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _show_progress() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


# The options whose values the library checks, by the keyword its errors start with (per call:
# "window" is --kv-window to load() and --window to EADConfig).
_SAMPLING_OPTIONS = {"temperature": "--temperature", "top_k": "--top-k", "top_p": "--top-p", "seed": "--seed"}
_MODEL_OPTIONS = {"threads": "--threads", "ctx": "--ctx"}
_EAD_OPTIONS = {"tau": "--tau", "tau_low": "--tau-low", "window": "--window", "d_min": "--d-min",
                "max_draft": "--max-draft", "verify_window": "--verify-window"}
_GENERATE_OPTIONS = {"max_tokens": "--max-tokens"}


@contextmanager
def _naming_options(options: dict, kv: bool = False):
    """A ValueError the library raises about one of options' keywords names the option as typed
    ("--top-p: top_p must be in (0, 1], got 0"); kv: one about the KV policy names --kv."""
    try:
        yield
    except ValueError as exc:
        msg = str(exc)
        word = re.match(r"\w*", msg).group()
        flag = options.get(word)
        if flag is None and kv and (word in ("kv", "bit", "controller") or "KV policy" in msg
                                    or "KV controller" in msg):
            flag = "--kv"
        if flag is not None:
            exc.args = (f"{flag}: {msg}",)
        raise


def _sampling_kwargs(args: argparse.Namespace) -> dict:
    kwargs = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                  top_p=args.top_p, seed=args.seed)
    # Validate before loading anything: a bad value should fail in milliseconds, not after a
    # download or a model load. SamplingParams raises ValueError with the library's message.
    with _naming_options(_SAMPLING_OPTIONS):
        SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    return kwargs


def _load(args: argparse.Namespace, progress: Optional[bool] = None):
    from . import load

    log.info("loading %s", args.model)
    with _naming_options(dict(_MODEL_OPTIONS, window="--kv-window"), kv=True):
        return load(args.model, threads=args.threads, ctx=args.ctx, kv=args.kv, kv_window=args.kv_window,
                    kv_fit_grid=args.kv_fit_grid, progress=_show_progress() if progress is None else progress)


def _json_safe(value: Any) -> Any:
    """NaN and infinities are not JSON: they become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _human_bytes(n: Optional[int]) -> str:
    if n is None:
        return "?"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # not reached


def _human_count(n: int) -> str:
    for div, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.1f}{suffix}"
    return str(n)


def _stdin(reads: str):
    """sys.stdin, or a clear error when there is none (`edgekv ... <&-` leaves it None)."""
    if sys.stdin is None or getattr(sys.stdin, "closed", False):
        raise ValueError(f"standard input is closed, and {reads} from it")
    return sys.stdin


def _read_prompt(prompt: str) -> str:
    if prompt == "-":
        prompt = _stdin("`generate -` reads the prompt").read().rstrip("\r\n")
    if not prompt:
        raise ValueError("the prompt is empty")
    return prompt


# --------------------------------------------------------------------------------------------
# commands
# --------------------------------------------------------------------------------------------

def _load_pair(args: argparse.Namespace):
    from .ead import load_pair

    log.info("loading %s (draft) and %s", args.draft, args.model)
    if args.kv_window or args.kv_fit_grid:
        raise ValueError("--kv-window and --kv-fit-grid do not apply with --draft (EAD takes --kv only)")
    with _naming_options(_MODEL_OPTIONS, kv=True):
        return load_pair(args.draft, args.model, threads=args.threads, ctx=args.ctx, kv=args.kv,
                         progress=_show_progress())


def cmd_generate(args: argparse.Namespace) -> int:
    kwargs = _sampling_kwargs(args)
    ead = _ead_config(args)
    prompt = _read_prompt(args.prompt)
    if args.stop is not None and not all(args.stop):
        raise ValueError("--stop needs a non-empty TEXT")
    kwargs["stop"] = args.stop
    if ead is not None:
        kwargs["config"] = ead

    with (_load(args) if ead is None else _load_pair(args)) as model:
        if args.chat:
            def run(stream: bool):
                return model.chat([{"role": "user", "content": prompt}], stream=stream, **kwargs)
        else:
            def run(stream: bool):
                return model.generate(prompt, stream=stream, **kwargs)

        if args.json:
            with _naming_options(_GENERATE_OPTIONS, kv=True):
                text = run(stream=False)
            if ead is None:
                doc = {"model": model.name, "path": str(model.path), "chat": args.chat, "text": text,
                       "stats": model.last_stats.as_dict()}
            else:
                doc = {"model": model.large.name, "path": str(model.large.path), "draft": model.small.name,
                       "draft_path": str(model.small.path), "chat": args.chat, "text": text,
                       "ead": {k: getattr(ead, k) for k in ("tau", "tau_low", "window", "d_min", "verify",
                                                            "max_draft", "verify_window")},
                       "stats": model.last_stats.as_dict()}
            _out(json.dumps(_json_safe(doc), ensure_ascii=False) + "\n")
            return EXIT_OK

        last = ""
        try:
            with _naming_options(_GENERATE_OPTIONS, kv=True):  # also what a policy raises at a step
                for piece in run(stream=True):
                    _out(piece)
                    last = piece or last
        finally:
            if last and not last.endswith("\n"):
                _out("\n")  # end the line, so the shell prompt (or the stats line) starts afresh
        _err(model.last_stats.line())
    return EXIT_OK


CHAT_HELP = "commands: /reset clears the conversation, /exit quits, /help shows this"


def cmd_chat(args: argparse.Namespace) -> int:
    kwargs = _sampling_kwargs(args)
    try:  # line editing and history for input(), where available
        import readline  # noqa: F401
    except ImportError:
        pass

    base: List[dict] = [{"role": "system", "content": args.system}] if args.system else []
    _stdin("chat reads the conversation")  # before loading anything
    with _load(args) as model:
        _err(f"edgekv chat: {model.name} ({model.arch}, ctx {model.n_ctx}). {CHAT_HELP}.")
        history = list(base)
        while True:
            try:
                line = input("> ")
            except EOFError:
                _out("\n")
                return EXIT_OK
            text = line.strip()
            if not text:
                continue
            if text in ("/exit", "/quit", "/bye"):
                return EXIT_OK
            if text == "/reset":
                history = list(base)
                model.reset()
                _err("(conversation cleared)")
                continue
            if text in ("/help", "/?"):
                _err(CHAT_HELP)
                continue
            if text.startswith("/") and " " not in text:
                _err(f"unknown command {text!r}; {CHAT_HELP}")
                continue

            history.append({"role": "user", "content": text})
            reply: List[str] = []
            try:
                with _naming_options(_GENERATE_OPTIONS, kv=True):
                    for piece in model.chat(history, stream=True, **kwargs):
                        reply.append(piece)
                        _out(piece)
            except KeyboardInterrupt:
                # Stop this reply, keep the session: the unfinished turn is dropped.
                _out("\n")
                _err("(interrupted)")
                history.pop()
                continue
            except ContextOverflowError as exc:
                _out("\n")
                _err(f"edgekv: error: {exc}\n(the conversation no longer fits the context window: "
                     f"/reset starts over; a larger --ctx keeps more)")
                history.pop()
                continue
            _out("\n")
            history.append({"role": "assistant", "content": "".join(reply)})
            if getattr(args, "verbose", False):
                _err(model.last_stats.line())


def _cached_state(entry: dict) -> str:
    path = registry.cache_dir() / entry["file"]
    try:
        st = path.stat()
    except OSError:
        return "no"
    size = entry.get("size")
    if size is not None and st.st_size != size:
        return "partial" if st.st_size < size else "mismatch"
    return "yes"


def _list_models(names: Sequence[str]) -> int:
    entries = registry.list_models()
    if names:
        wanted = [registry.get_entry(n)["name"] for n in names]  # unknown names raise
        entries = [e for e in entries if e["name"] in wanted]
    rows = [("NAME", "SIZE", "ARCH", "QUANT", "CACHED", "DESCRIPTION")]
    for e in entries:
        name = e["name"] + (" (default)" if e["name"] == registry.DEFAULT_MODEL else "")
        rows.append((name, _human_bytes(e.get("size")), e.get("architecture", "?"),
                     e.get("quantization", "?"), _cached_state(e), e.get("description", "")))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        _out("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1] + "\n")
    _out(f"\ncache: {registry.cache_dir()}\n")
    return EXIT_OK


def cmd_pull(args: argparse.Namespace) -> int:
    if args.list:
        return _list_models(args.names)
    names = args.names or [registry.DEFAULT_MODEL]
    for name in names:
        registry.get_entry(name)  # fail fast, before any download, on a typo
    for name in names:
        log.info("pulling %s", name)
        path = registry.pull(name, progress=True, force=args.force)
        _out(f"{path}\n")
    return EXIT_OK


def _info_lines(info: dict) -> Iterable[str]:
    hp = info.get("hparams", {})
    types = ", ".join(f"{t} x{n}" for t, n in sorted(info["weight_types"].items(), key=lambda kv: -kv[1]))
    conv = info.get("converted_at_load") or {}
    to = info.get("converted_to") or {}
    conv_text = ", ".join(f"{t} x{n}" + (f" -> {to[t]}" if t in to else "") for t, n in sorted(conv.items())) + " (at load time)" \
        if conv else "none (all weight types run natively)"
    ctx = f"{info['ctx']} tokens"
    if info.get("ctx_train"):
        ctx += f" (trained on {info['ctx_train']})"
    kv = info["kv_bytes_per_token"]
    rows = [
        ("model", info["name"]),
        ("architecture", info["architecture"]),
        ("parameters", f"{_human_count(info['parameters'])} ({info['parameters']:,})"),
        ("weight types", types),
        ("converted", conv_text),
    ]
    if hp:
        rows.append(("shape", f"{hp['n_layer']} layers, n_embd {hp['n_embd']}, {hp['n_head']} heads "
                              f"({hp['n_head_kv']} KV) of {hp['head_dim']}, n_ff {hp['n_ff']}, "
                              f"vocab {hp['n_vocab']}"))
    rows += [
        ("context", ctx),
        ("KV cache", f"{kv:,} bytes/token ({_human_bytes(kv * info['ctx'])} for the full context)"),
        ("SIMD", info["simd"]),
        ("kernels", _kernels_line()),
        ("threads", str(info["threads"])),
        ("file", info["path"]),
        ("file size", f"{_human_bytes(info['file_bytes'])} ({info['file_bytes']:,} bytes)"),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        yield f"{k.ljust(width)}  {v}"


def _kernels_line() -> str:
    """Which library was loaded and why: a wheel's kernel variant picked for this CPU, or a single library."""
    from . import _native
    if _native.VARIANT:
        return f"{_native.VARIANT} variant ({_native.LIB_PATH.name}): {_native.VARIANT_REASON}"
    return f"{_native.LIB_PATH} ({_native.VARIANT_REASON})"
def cmd_calibrate(args: argparse.Namespace) -> int:
    from . import calibrate

    path = registry.resolve(args.model, progress=True)
    prof = None if args.force else calibrate.find_profile(path)
    where = "existing profile"
    if prof is not None and args.auto_only:
        prof = calibrate.refresh_auto(prof, path, threads=args.threads, progress=True)
        where = str(calibrate.save_profile(prof, args.out or calibrate.cache_profiles_dir()))
    if prof is None:
        prof = calibrate.calibrate(path, threads=args.threads, progress=True)
        where = str(calibrate.save_profile(prof, args.out or calibrate.cache_profiles_dir()))
    if args.json:
        _out(json.dumps(prof, indent=1) + "\n")
        return EXIT_OK
    _out(f"{prof['model']} (sha256 {prof['sha256'][:16]}...): {where}\n")
    _out(f"KL vs int8 per layer (keys at 6/4/3/2 bits | values at 6/4/3/2 bits); int8 vs fp16: {prof['int8_kl']:.5f}\n")
    for i, row in enumerate(prof["layers"]):
        k = " ".join(f"{row['k'][str(b)]:.5f}" for b in (6, 4, 3, 2) if str(b) in row["k"])
        v = " ".join(f"{row['v'][str(b)]:.5f}" for b in (6, 4, 3, 2) if str(b) in row["v"])
        _out(f"  layer {i:3d}  k {k} | v {v}\n")
    if prof.get("auto_bits") is not None:
        _out(f"--kv auto = auto@{prof['auto_bits']:g}\n")
    return EXIT_OK


def cmd_info(args: argparse.Namespace) -> int:
    from . import _native
    with _load(args) as model:
        info = model.info()
    info.update(variant=_native.VARIANT, variant_reason=_native.VARIANT_REASON, library=str(_native.LIB_PATH))
    if args.json:
        _out(json.dumps(_json_safe(info), indent=2) + "\n")
    else:
        for line in _info_lines(info):
            _out(line + "\n")
    return EXIT_OK


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from .server import serve
    except ImportError as exc:
        raise ValueError(f"edgekv serve needs the serve extra (pip install 'edgekv[serve]'): {exc}") from None
    if args.kv_budget_mb is not None and args.kv_budget_mb < 0:
        raise ValueError(f"--kv-budget-mb must be >= 0, got {args.kv_budget_mb}")
    if args.port > 65535:
        raise ValueError(f"--port must be in [0, 65535], got {args.port}")
    api_key = args.api_key if args.api_key is not None else os.environ.get("EDGEKV_API_KEY") or None
    with _load(args) as model:
        serve(model, host=args.host, port=args.port, model_id=args.served_name or args.model, api_key=api_key,
              max_sessions=args.max_sessions, kv_budget_mb=args.kv_budget_mb,
              log_level="info" if args.verbose else "warning")
    return EXIT_OK


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------

def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    _err(f"{PROG}: warning: {message}")


def _setup_logging(verbose: bool) -> Optional[logging.Handler]:
    if not verbose:
        return None
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{PROG}: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    return handler


def _quiet_broken_stdout() -> None:
    """After the reader of our stdout went away (`edgekv generate ... | head`), point stdout at
    /dev/null so that Python's final flush does not complain."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 failure, 2 user error, 130 Ctrl-C)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error (argparse printed it)
        return exc.code if isinstance(exc.code, int) else (EXIT_OK if exc.code is None else EXIT_USAGE)

    handler = _setup_logging(args.verbose)
    old_level = None if handler is None else log.level
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            return args.func(args)
    except KeyboardInterrupt:
        _err("")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        _quiet_broken_stdout()
        return EXIT_FAILURE
    except (EdgekvError, ValueError) as exc:
        _err(f"{PROG}: error: {exc}")
        return EXIT_USAGE
    except OSError as exc:  # unreadable files, an unwritable cache, a full disk
        _err(f"{PROG}: error: {exc}")
        return EXIT_FAILURE
    finally:
        if handler is not None:
            log.removeHandler(handler)
            log.setLevel(old_level)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
