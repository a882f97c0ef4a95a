"""Shared fixtures: tiny GGUF models written on the fly, their NumPy reference, the real SmolLM2.

``models/`` (the tiny-model generator) and ``tests/`` (the reference forward pass) are put on
sys.path here, so test modules can ``import make_tiny`` and ``import reference``.
"""

from __future__ import annotations

import os
import sys
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


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """The real SmolLM2-135M-Instruct GGUF (fetched and verified on first use)."""
    try:
        return Path(edgekv.registry.resolve("smollm2-135m", progress=False))
    except edgekv.EdgekvError as e:
        pytest.skip(f"SmolLM2-135M is not cached and cannot be fetched here: {e}")


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
    "NATIVE_WEIGHT_TYPES",
    "TEST_WEIGHT_TYPES",
    "THREADS",
    "make_vocab",
    "run_cli",
    "subprocess_env",
    "write_tiny_model",
]
