"""Shared fixtures: tiny GGUF models written on the fly, their NumPy reference, the real models
(SmolLM2-135M, Qwen2.5-Coder-0.5B) and the reference llama.cpp (llama-cpp-python).

``models/`` (the tiny-model generator) and ``tests/`` (the reference forward pass) are put on
sys.path here, so test modules can ``import make_tiny`` and ``import reference``.

Required resources. A real model, llama-cpp-python or the text excerpt that is missing skips its
tests, with the reason (``pytest -rs``), for a user without them. With
``EDGEKV_REQUIRE_REFERENCE=1`` (CI) the same absence fails instead, and every skip fails unless
``EDGEKV_SKIP_ALLOWLIST`` names a file that lists it (``.ci/skip-allowlist``).

Before any test that uses the reference runs, one eval of SmolLM2 in llama-cpp-python is probed
in a subprocess: a native build that crashes on this CPU (AMX) stops the session with the cause
and the fix, instead of killing pytest mid-suite.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
for _p in (REPO / "models", REPO / "tests"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import edgekv  # noqa: E402
from make_tiny import NATIVE_WEIGHT_TYPES, WEIGHT_TYPES, make_vocab, write_tiny_model  # noqa: E402
from reference import ReferenceModel  # noqa: E402

ARCHS = ("llama", "qwen2")
# Every weight type the tiny generator writes that the tests cover (Q5_0 and BF16 are converted
# to Q8_0 at load time; the rest run natively).
TEST_WEIGHT_TYPES = ("Q8_0", "Q4_0", "Q4_1", "F16", "F32", "Q5_0", "BF16")
assert set(TEST_WEIGHT_TYPES) <= set(WEIGHT_TYPES)

# Text the parity tests tokenize and score: the first 200 lines of WikiText-2's validation split.
TEXT_EXCERPT = REPO / "tests" / "data" / "wikitext2_valid_head200.txt"
REQUIRED = os.environ.get("EDGEKV_REQUIRE_REFERENCE", "") not in ("", "0")

# Threads for models in tests: 1 (fastest for tiny models, and immune to a busy machine);
# tests of the thread pool ask for more.
THREADS = 1


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny_models")


@pytest.fixture(scope="session")
def tiny_path(tiny_dir):
    """A factory: ``tiny_path(arch="llama", weight_type="Q8_0", **write_tiny_model_kwargs)`` -> path.

    Each distinct argument set is written once per session (keyword values must be hashable)."""
    cache: dict = {}

    def get(arch: str = "llama", weight_type: str = "Q8_0", **kw) -> Path:
        key = (arch, weight_type, tuple(sorted(kw.items())))
        if key not in cache:
            path = tiny_dir / f"{arch}-{weight_type}-{len(cache)}.gguf"
            cache[key] = write_tiny_model(path, arch=arch, weight_type=weight_type, **kw)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def reference_for():
    """A factory: ``reference_for(path)`` -> ReferenceModel (built once per path)."""
    cache: dict = {}

    def get(path) -> ReferenceModel:
        key = str(path)
        if key not in cache:
            cache[key] = ReferenceModel(path)
        return cache[key]

    return get


@pytest.fixture(
    scope="session",
    params=[(a, t) for a in ARCHS for t in TEST_WEIGHT_TYPES],
    ids=[f"{a}-{t}" for a in ARCHS for t in TEST_WEIGHT_TYPES],
)
def tiny_any(request, tiny_path):
    """(arch, weight_type, path) for every architecture and weight type: tests using it run 14 times."""
    arch, wtype = request.param
    return arch, wtype, tiny_path(arch, wtype)


@pytest.fixture(scope="session", params=ARCHS)
def tiny_arch(request, tiny_path):
    """(arch, path) of the default Q8_0 tiny model of each architecture."""
    return request.param, tiny_path(request.param, "Q8_0")


@pytest.fixture
def open_model():
    """A factory: ``open_model(path, **Model_kwargs)`` -> Model, closed at the end of the test."""
    models = []

    def make(path, **kw):
        kw.setdefault("threads", THREADS)
        m = edgekv.Model(path, **kw)
        models.append(m)
        return m

    yield make
    for m in models:
        m.close()


def unavailable(what: str):
    """A test resource is missing: skip for a user who lacks it, fail where it is required."""
    if REQUIRED:
        pytest.fail(f"{what} (required: EDGEKV_REQUIRE_REFERENCE is set)", pytrace=False)
    pytest.skip(what)


def registry_model(name: str) -> Path:
    """A registry model's local file, fetched and verified on first use (``EDGEKV_CACHE``)."""
    try:
        return Path(edgekv.registry.resolve(name, progress=False))
    except edgekv.errors.ModelNotFoundError as e:  # not cached, and the registry cannot fetch it
        unavailable(f"{name} is not cached and cannot be fetched here: {e}")


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """The real SmolLM2-135M-Instruct GGUF (Q4_1)."""
    return registry_model("smollm2-135m")


@pytest.fixture(scope="session")
def qwen05_path() -> Path:
    """The real Qwen2.5-Coder-0.5B-Instruct GGUF (491 MB)."""
    return registry_model("qwen2.5-coder-0.5b")


@pytest.fixture(scope="session")
def llama_cpp():
    """The reference: llama-cpp-python (probed once before the session's tests, see above)."""
    try:
        import llama_cpp as module
    except ImportError as e:
        unavailable(f"llama-cpp-python is not installed (bash tools/test.sh installs it): {e}")
    return module


@pytest.fixture(scope="session")
def text_excerpt() -> str:
    """Real English text (WikiText-2 validation, first 200 lines) shipped with the tests."""
    return TEXT_EXCERPT.read_text(encoding="utf-8")


# --------------------------------------------------------------------------------------------
# the reference probe and the skip allow-list
# --------------------------------------------------------------------------------------------

_PROBE = """
import sys, llama_cpp
llm = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=64, n_threads=1, verbose=False)
llm.eval(llm.tokenize(b"The sky is blue because", add_bos=False))
print(len(llm.scores))
"""


def _cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def probe_reference(model_path: Path, timeout: float = 300) -> str | None:
    """Run one eval of ``model_path`` in llama-cpp-python in a child process; None when it worked,
    else what went wrong, with the likely cause and the fix."""
    try:
        r = subprocess.run([sys.executable, "-c", _PROBE, str(model_path)], capture_output=True, text=True,
                           timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"one eval of {model_path.name} in llama-cpp-python did not finish in {timeout:.0f} s"
    if r.returncode == 0:
        return None
    if r.returncode < 0:
        try:
            how = f"died with {signal.Signals(-r.returncode).name}"
        except ValueError:
            how = f"died with signal {-r.returncode}"
    else:
        how = f"failed (exit {r.returncode}): {r.stderr.strip()[-600:]}"
    amx = sorted(f for f in _cpu_flags() if f.startswith("amx"))
    cause = (f"This CPU advertises {' '.join(amx)}: a native llama-cpp-python build uses AMX kernels that crash "
             "on such machines. " if amx else "")
    return (f"The reference llama-cpp-python {how} in one eval of {model_path.name}. {cause}"
            "Fix: rebuild it for this CPU without AMX with `bash tools/test.sh`, or by hand: "
            "CMAKE_ARGS=\"-DLLAVA_BUILD=OFF\" CFLAGS=\"-mno-amx-tile -mno-amx-int8 -mno-amx-bf16\" "
            "CXXFLAGS=\"$CFLAGS\" pip install --force-reinstall --no-deps --no-cache-dir llama-cpp-python==0.3.36")


def pytest_collection_finish(session):
    """Probe the reference before the first test that uses it (and not at all when none does)."""
    if not any("llama_cpp" in getattr(item, "fixturenames", ()) for item in session.items):
        return
    if importlib.util.find_spec("llama_cpp") is None:
        return  # the llama_cpp fixture reports it, test by test
    try:
        path = Path(edgekv.registry.resolve("smollm2-135m", progress=False))
    except edgekv.errors.ModelNotFoundError:
        return  # likewise, smollm2_path
    problem = probe_reference(path)
    if problem:
        pytest.exit(problem, returncode=3)


def pytest_configure(config):
    from edgekv import _native

    named = os.environ.get("EDGEKV_LIB")
    if named and Path(_native.LIB_PATH).resolve() != Path(named).resolve():
        # _native refuses a missing EDGEKV_LIB; this catches a loader that picked another file
        raise pytest.UsageError(f"EDGEKV_LIB={named}, but edgekv loaded {_native.LIB_PATH}")


def pytest_report_header(config):
    """Which edgekv and which native library this run tests (tools/ci_native_checks.sh reads it;
    shown unless -q)."""
    from edgekv import _native

    return [f"edgekv: {Path(edgekv.__file__).parent}", f"edgekv library: {_native.LIB_PATH} (simd: {_native.SIMD})"]


def _read_allowlist() -> list | None:
    path = os.environ.get("EDGEKV_SKIP_ALLOWLIST")
    if not path:
        return None
    entries = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            entry = line.split("#", 1)[0].strip()
            if entry:
                entries.append(entry)
    return entries


_ALLOWED_SKIPS = _read_allowlist()


def _skip_reason(rep) -> str:
    reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
    return reason[len("Skipped: "):] if reason.startswith("Skipped: ") else reason


def _fail_unlisted_skip(rep, nodeid: str) -> None:
    if _ALLOWED_SKIPS is None or not rep.skipped or hasattr(rep, "wasxfail"):
        return
    if any(nodeid.startswith(entry) for entry in _ALLOWED_SKIPS):
        return
    rep.outcome = "failed"
    rep.longrepr = f"skipped ({_skip_reason(rep)}), and {os.environ['EDGEKV_SKIP_ALLOWLIST']} does not list it"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _fail_unlisted_skip(outcome.get_result(), item.nodeid)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    _fail_unlisted_skip(outcome.get_result(), collector.nodeid)


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """An empty model cache: nothing is cached, and nothing may fetch a model."""
    monkeypatch.setenv("EDGEKV_CACHE", str(tmp_path / "cache"))

    def no_downloads(*args, **kwargs):
        raise AssertionError("a CLI test tried to download a model")

    monkeypatch.setattr(edgekv.registry, "download_wheel", no_downloads)


def run_cli(capsys, *argv):
    """edgekv's CLI in this process: (exit code, stdout, stderr)."""
    from edgekv import cli

    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def subprocess_env() -> dict:
    """Environment for a child Python that must import the same edgekv (and test helpers)."""
    env = dict(os.environ)
    pkg_root = str(Path(edgekv.__file__).resolve().parent.parent)
    paths = [pkg_root, str(REPO / "models"), str(REPO / "tests")]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


__all__ = [
    "ARCHS",
    "REQUIRED",
    "TEXT_EXCERPT",
    "NATIVE_WEIGHT_TYPES",
    "TEST_WEIGHT_TYPES",
    "THREADS",
    "make_vocab",
    "registry_model",
    "unavailable",
    "run_cli",
    "subprocess_env",
    "write_tiny_model",
]


def in_thread(fn, timeout=30.0):
    """fn() in a daemon thread: (finished, result or exception)."""
    box = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as e:  # handed back to the test, which asserts on it
            box["value"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    return not t.is_alive(), box.get("value")
