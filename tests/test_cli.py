"""Tests for the ``edgekv`` command line (edgekv.cli), run in-process on a tiny random model.

Nothing here touches the network: registry names are only listed, never pulled.
"""

from __future__ import annotations

import builtins
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

from conftest import run_cli, subprocess_env
from edgekv import cli, registry

STATS_RE = re.compile(r"prompt \d+ tok \| prefill .* tok/s \| decode .* ms/tok \(\d+ tok\) \| KV .* KiB")


# --------------------------------------------------------------------------------------------
# fixtures (tiny models come from conftest.py's tiny_path, i.e. models/make_tiny.py)
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def tiny_model(tiny_path) -> pathlib.Path:
    """A tiny llama with Q8_0 weights whose end tokens are biased away: every reply has text."""
    return tiny_path("llama", "Q8_0", tie_embeddings=False, special_logit_bias=-8.0)


pytestmark = pytest.mark.usefixtures("offline_cache")  # an empty model cache, no downloads


def assert_clean_error(rc, err, *needles):
    assert rc == 2, err
    assert "Traceback" not in err
    assert err.startswith("edgekv: error: "), err
    for needle in needles:
        assert needle in err, err


# --------------------------------------------------------------------------------------------
# generate
# --------------------------------------------------------------------------------------------

def test_generate_streams_text_then_one_stats_line(capsys, monkeypatch, tiny_model):
    writes = []
    real_out = cli._out
    monkeypatch.setattr(cli, "_out", lambda text: (writes.append(text), real_out(text)))
    rc, out, err = run_cli(capsys, "generate", "the cat sat on", "--model", tiny_model,
                           "--max-tokens", "12", "--temperature", "0", "--threads", "1")
    assert rc == 0, err
    assert out.strip(), "no text was generated"
    assert len(writes) >= 2, "the text was not streamed piece by piece"
    stats = [line for line in err.splitlines() if line.strip()]
    assert len(stats) == 1, err
    assert STATS_RE.search(stats[0]), stats[0]
    assert "ms/tok" in stats[0] and "tok/s" in stats[0] and "KV" in stats[0]


def test_generate_json_parses_and_matches_streaming(capsys, tiny_model):
    common = ["--model", tiny_model, "--max-tokens", "10", "--temperature", "0"]
    rc, streamed, _ = run_cli(capsys, "generate", "hello there", *common)
    assert rc == 0
    rc, out, err = run_cli(capsys, "generate", "hello there", *common, "--json")
    assert rc == 0, err
    doc = json.loads(out)  # one JSON object, nothing else on stdout
    assert set(doc) >= {"text", "stats", "model"}
    assert isinstance(doc["text"], str)
    assert streamed.rstrip("\n") == doc["text"].rstrip("\n")  # greedy: same text either way
    st = doc["stats"]
    assert st["prompt_tokens"] > 0
    assert st["generated_tokens"] == 10 and st["finish_reason"] == "length"  # end tokens biased away
    assert st["kv_bytes"] > 0
    assert "decode_ms_per_token" in st and "prefill_tok_s" in st
    assert "NaN" not in out


def test_generate_reads_prompt_from_stdin_and_chat_template(capsys, monkeypatch, tiny_model):
    import io

    counts = {}
    for chat in (False, True):
        monkeypatch.setattr(sys, "stdin", io.StringIO("what is in the box?\n"))
        rc, out, err = run_cli(capsys, "generate", "-", "--json", "--model", tiny_model,
                               "--max-tokens", "4", "--seed", "7", *(["--chat"] if chat else []))
        assert rc == 0, err
        doc = json.loads(out)
        assert doc["chat"] is chat
        counts[chat] = doc["stats"]["prompt_tokens"]
    # the trailing newline is dropped; --chat wraps the text in the template's role markers
    assert counts[True] >= counts[False] + 5


def test_generate_seed_is_reproducible(capsys, tiny_model):
    args = ["generate", "a", "--model", tiny_model, "--max-tokens", "8", "--seed", "3", "--json"]
    texts = []
    for _ in range(2):
        rc, out, err = run_cli(capsys, *args)
        assert rc == 0, err
        texts.append(json.loads(out)["text"])
    assert texts[0] == texts[1]


# --------------------------------------------------------------------------------------------
# user errors: exit 2, one clear line, no traceback
# --------------------------------------------------------------------------------------------

def test_missing_model_file_is_a_clean_error(capsys, tmp_path):
    missing = tmp_path / "nope" / "model.gguf"
    rc, out, err = run_cli(capsys, "generate", "hi", "--model", missing)
    assert_clean_error(rc, err, "not found", str(missing))
    assert out == ""


def test_unknown_model_name_is_a_clean_error(capsys):
    rc, _, err = run_cli(capsys, "info", "--model", "no-such-model")
    assert_clean_error(rc, err, "no-such-model", registry.DEFAULT_MODEL)


def test_not_a_gguf_file_is_a_clean_error(capsys, tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"this is not a gguf file at all" * 10)
    rc, _, err = run_cli(capsys, "info", "--model", bad)
    assert_clean_error(rc, err, str(bad))


def test_negative_temperature_exits_2(capsys, tiny_model):
    rc, out, err = run_cli(capsys, "generate", "hi", "--model", tiny_model, "--temperature", "-1")
    assert_clean_error(rc, err, "--temperature: ")
    assert out == ""


@pytest.mark.parametrize("flag, value, extra", [
    # checked by argparse (its error says "argument [-x/]--flag: ...")
    ("--max-tokens", "-3", []), ("--threads", "0", []), ("--ctx", "zero", []), ("--top-k", "-1", []),
    ("--temperature", "nan", []), ("--seed", "x", []), ("--kv-window", "-1", []),
    # checked by the library, which names its keyword (top_p, threads, ...): the CLI names the flag
    ("--top-p", "0", []), ("--top-p", "1.5", []), ("--temperature", "-1", []), ("--kv", "int5", []),
    ("--kv", "k5v2", []), ("--kv", "sink:adaptive", []), ("--kv", "adaptive@20", []),
    ("--max-tokens", "2000000000", []), ("--threads", "300", []), ("--ctx", "5000000", []),
    ("--tau-low", "2", ["--draft", "TINY"]),  # above the default --tau
])
def test_bad_flag_values_exit_2(capsys, tiny_model, flag, value, extra):
    extra = [str(tiny_model) if a == "TINY" else a for a in extra]
    rc, out, err = run_cli(capsys, "generate", "hi", "--model", tiny_model, *extra, flag, value)
    assert rc == 2, err
    assert "Traceback" not in err
    # the last line is the error (argparse prints its usage, which lists every flag, above it);
    # it names the option as typed, then what is wrong with the value
    last = err.strip().splitlines()[-1]
    assert "error:" in last and f"{flag}: " in last and value in last.split(f"{flag}: ", 1)[1], err
    assert out == ""


def test_empty_prompt_and_usage_errors_exit_2(capsys, tiny_model):
    rc, _, err = run_cli(capsys, "generate", "", "--model", tiny_model)
    assert_clean_error(rc, err, "prompt is empty")
    rc, _, err = run_cli(capsys)  # no command
    assert rc == 2 and "usage:" in err
    rc, _, err = run_cli(capsys, "frobnicate")
    assert rc == 2 and "usage:" in err


def test_context_overflow_is_a_clean_error(capsys, tiny_model):
    rc, _, err = run_cli(capsys, "generate", "word " * 50, "--model", tiny_model, "--ctx", "16")
    assert_clean_error(rc, err, "ctx")


def test_keyboard_interrupt_exits_130(capsys, monkeypatch, tiny_model):
    def interrupted(prompt=""):
        raise KeyboardInterrupt

    monkeypatch.setattr(builtins, "input", interrupted)
    rc, _, err = run_cli(capsys, "chat", "--model", tiny_model)
    assert rc == 130
    assert "Traceback" not in err


# --------------------------------------------------------------------------------------------
# info, pull, chat
# --------------------------------------------------------------------------------------------

def test_info_prints_the_architecture(capsys, tiny_model):
    rc, out, err = run_cli(capsys, "info", "--model", tiny_model, "--threads", "1", "--ctx", "64")
    assert rc == 0, err
    text = out.lower()
    assert re.search(r"^architecture\s+llama$", text, re.M), out
    for word in ("parameters", "weight types", "q8_0", "kv cache", "bytes/token", "simd", "threads",
                 str(tiny_model).lower()):
        assert word in text, (word, out)
    assert re.search(r"^context\s+64 tokens", text, re.M), out


def test_info_json(capsys, tiny_model):
    rc, out, err = run_cli(capsys, "info", "--model", tiny_model, "--json")
    assert rc == 0, err
    info = json.loads(out)
    assert info["architecture"] == "llama"
    assert info["parameters"] > 0
    assert info["kv_bytes_per_token"] > 0
    assert info["file_bytes"] == tiny_model.stat().st_size
    assert "Q8_0" in info["weight_types"]


def test_info_reports_weights_converted_at_load(capsys, tiny_path):
    path = tiny_path("qwen2", "Q5_0")
    rc, out, err = run_cli(capsys, "-v", "info", "--model", path)
    assert rc == 0, err
    assert re.search(r"^architecture\s+qwen2$", out, re.M), out
    assert re.search(r"^converted\s+Q5_0 x\d+ -> Q8_0 \(at load time\)$", out, re.M), out
    assert re.search(r"converts \d+ Q5_0 to Q8_0", err), err  # the loader's INFO log, shown by -v
    rc, out, err = run_cli(capsys, "info", "--model", path, "--json")
    info = json.loads(out)
    assert info["converted_at_load"].get("Q5_0", 0) > 0


def test_verbose_logs_to_stderr(capsys, tiny_model):
    rc, out, err = run_cli(capsys, "-v", "info", "--model", tiny_model)
    assert rc == 0
    assert "edgekv: loading" in err
    rc, out, err = run_cli(capsys, "info", "-v", "--model", tiny_model)
    assert rc == 0
    assert "edgekv: loading" in err
    rc, out, err = run_cli(capsys, "info", "--model", tiny_model)
    assert "loading" not in err  # the handler does not outlive one main() call


def test_pull_list_shows_known_models(capsys):
    rc, out, err = run_cli(capsys, "pull", "--list")
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0].split()[:5] == ["NAME", "SIZE", "ARCH", "QUANT", "CACHED"]
    row = next(line for line in lines if line.startswith("smollm2-135m"))
    assert "(default)" in row and "llama" in row and "MiB" in row
    assert re.search(r"\bno\b", row)  # the cache is empty in these tests
    for entry in registry.list_models():
        assert any(line.startswith(entry["name"]) for line in lines), entry["name"]
    gemma = next(line for line in lines if line.startswith("gemma3-270m"))
    assert " gemma3 " in gemma and "Q4_K_M" in gemma
    assert "Gemma Terms of Use" in gemma  # its license, named where it is listed


def test_pull_list_marks_cached_models(capsys, tmp_path):
    entry = registry.get_entry(registry.DEFAULT_MODEL)
    cache = registry.cache_dir()
    cache.mkdir(parents=True)
    with open(cache / entry["file"], "wb") as fh:
        fh.truncate(entry["size"])  # sparse: only its size is checked by --list
    rc, out, _ = run_cli(capsys, "pull", "--list", registry.DEFAULT_MODEL)
    assert rc == 0
    rows = [line for line in out.splitlines() if line.startswith("smollm2")]
    assert len(rows) == 1 and re.search(r"\byes\b", rows[0])


def test_pull_unknown_name_fails_before_downloading(capsys):
    rc, out, err = run_cli(capsys, "pull", "no-such-model")
    assert_clean_error(rc, err, "unknown model", "smollm2-135m")
    assert out == ""


def test_chat_answers_and_exits(capsys, monkeypatch, tiny_model):
    script = iter(["hello there", "", "/help", "how are you", "/reset", "again", "/exit", "never read"])
    prompts = []

    def fake_input(prompt=""):
        prompts.append(prompt)
        return next(script)

    monkeypatch.setattr(builtins, "input", fake_input)
    rc, out, err = run_cli(capsys, "chat", "--model", tiny_model, "--system", "Be brief.",
                           "--max-tokens", "6", "--temperature", "0", "-v")
    assert rc == 0, err
    assert len(prompts) == 7  # stopped reading at /exit
    assert "Traceback" not in err
    assert "/reset" in err and "(conversation cleared)" in err
    assert len(STATS_RE.findall(err)) == 3  # one per reply, with -v
    assert out.strip()  # the replies
    # the second turn's prompt holds the first exchange; /reset starts over
    turns = [int(n) for n in re.findall(r"prompt (\d+) tok", err)]
    assert turns[1] > turns[0] and turns[2] < turns[1]


@pytest.mark.parametrize("flag, value", [("--top-p", "0"), ("--threads", "300"), ("--kv", "int5"),
                                         ("--max-tokens", "2000000000")])
def test_chat_errors_name_the_flag(capsys, monkeypatch, tiny_model, flag, value):
    """chat checks its options as generate does; --max-tokens is checked at the first turn."""
    script = iter(["hello there"])
    monkeypatch.setattr(builtins, "input", lambda prompt="": next(script))
    rc, _, err = run_cli(capsys, "chat", "--model", tiny_model, flag, value)
    assert rc == 2, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("edgekv: error: ") and f"{flag}: " in last and value in last, err


def test_chat_reuses_the_cache_for_the_shared_prefix(capsys, monkeypatch, tiny_model):
    from edgekv.model import Model

    seen = []
    real_chat = Model.chat

    def spy_chat(self, messages, **kwargs):
        seen.append([dict(m) for m in messages])
        yield from real_chat(self, messages, **kwargs)
        seen[-1] = (seen[-1], self.last_stats.prompt_tokens, self.last_stats.prefilled_tokens)

    monkeypatch.setattr(Model, "chat", spy_chat)
    script = iter(["first question", "second question"])
    monkeypatch.setattr(builtins, "input", _then_eof(script))
    rc, out, err = run_cli(capsys, "chat", "--model", tiny_model, "--max-tokens", "4", "--temperature", "0")
    assert rc == 0, err
    (msgs1, p1, run1), (msgs2, p2, run2) = seen
    assert [m["role"] for m in msgs1] == ["user"]
    assert [m["role"] for m in msgs2] == ["user", "assistant", "user"]
    assert msgs2[0]["content"] == "first question" and msgs2[2]["content"] == "second question"
    assert run1 == p1
    assert run2 == p2  # each turn runs the whole conversation, as a fresh model would


def test_kv_options_reach_the_model(capsys, monkeypatch, tiny_model):
    """--kv, --kv-window and --kv-fit-grid configure the model the command runs on."""
    from edgekv.model import Model

    seen = []
    real_generate = Model.generate

    def spy_generate(self, *a, **kw):
        seen.append((self.kv_policy.name, self.kv_policy.window, self.kv_fit_grid))
        return real_generate(self, *a, **kw)

    monkeypatch.setattr(Model, "generate", spy_generate)
    for extra, want in (([], ("fp16", 0, False)),
                        (["--kv", "sink:int3", "--kv-window", "2", "--kv-fit-grid"], ("sink:int3", 2, True))):
        rc, out, err = run_cli(capsys, "generate", "--model", tiny_model, "--max-tokens", "2", "--temperature", "0",
                               *extra, "hello")
        assert rc == 0, err
        assert seen[-1] == want


def _then_eof(script):
    def fake_input(prompt=""):
        try:
            return next(script)
        except StopIteration:
            raise EOFError from None
    return fake_input


# --------------------------------------------------------------------------------------------
# the module entry point
# --------------------------------------------------------------------------------------------

def test_python_m_edgekv_help():
    env = subprocess_env()  # the edgekv under test, installed or the checkout's
    for argv in ([], ["generate"], ["chat"], ["pull"], ["info"]):
        proc = subprocess.run([sys.executable, "-m", "edgekv", *argv, "--help"], capture_output=True,
                              text=True, env=env, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.startswith("usage: edgekv"), proc.stdout
        assert "Traceback" not in proc.stderr
        if not argv:
            assert all(cmd in proc.stdout for cmd in ("generate", "chat", "pull", "info"))


def test_main_returns_status_for_help_and_version(capsys):
    assert cli.main(["--help"]) == 0
    assert cli.main(["--version"]) == 0
    out, _ = capsys.readouterr()
    assert "edgekv" in out
