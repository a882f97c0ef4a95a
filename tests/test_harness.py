"""The test harness itself (tests/conftest.py): the reference probe, required resources and the
skip allow-list. Each check runs pytest or the probe in a child process, so it cannot pass by
leaving this session's state as it found it."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import conftest
from conftest import subprocess_env


def test_probe_names_a_crashing_reference_and_the_fix(monkeypatch, tmp_path):
    # a "reference" that dies the way the AMX build does: SIGSEGV in its first eval
    monkeypatch.setattr(conftest, "_PROBE", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)")
    problem = conftest.probe_reference(tmp_path / "model.gguf")
    assert problem is not None
    assert "died with SIGSEGV" in problem and "model.gguf" in problem
    assert "bash tools/test.sh" in problem and "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" in problem


def test_probe_reports_a_failing_reference(monkeypatch, tmp_path):
    monkeypatch.setattr(conftest, "_PROBE", "raise SystemExit('no such model')")
    problem = conftest.probe_reference(tmp_path / "model.gguf")
    assert problem is not None and "exit 1" in problem and "no such model" in problem


def test_probe_passes_a_working_reference(monkeypatch, tmp_path):
    monkeypatch.setattr(conftest, "_PROBE", "import sys; print(sys.argv[1])")
    assert conftest.probe_reference(tmp_path / "model.gguf") is None


def _pytest_child(tmp_path, body: str, **env_extra) -> subprocess.CompletedProcess:
    """pytest on one test file in tmp_path, with tests/conftest.py loaded as a plugin."""
    (tmp_path / "test_child.py").write_text(textwrap.dedent(body))
    env = subprocess_env()
    for k in ("EDGEKV_REQUIRE_REFERENCE", "EDGEKV_SKIP_ALLOWLIST"):
        env.pop(k, None)
    env.update(env_extra)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider", "-p", "conftest",
                           str(tmp_path)],
                          capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)


CHILD = """
    import pytest
    from conftest import unavailable

    def test_missing_resource():
        unavailable("the frobnicator is not installed")

    def test_plain_skip():
        pytest.skip("not on this platform")

    def test_passes():
        assert True
"""


def test_missing_resources_skip_for_a_user(tmp_path):
    r = _pytest_child(tmp_path, CHILD)
    assert r.returncode == 0, r.stdout[-2000:]
    assert "1 passed, 2 skipped" in r.stdout and "the frobnicator is not installed" in r.stdout


def test_missing_resources_fail_where_required(tmp_path):
    allow = tmp_path / "allow"
    allow.write_text("# reasons\ntest_child.py::test_plain_skip  # skips on this platform\n")
    r = _pytest_child(tmp_path, CHILD, EDGEKV_REQUIRE_REFERENCE="1", EDGEKV_SKIP_ALLOWLIST=str(allow))
    assert r.returncode == 1, r.stdout[-2000:]
    assert "1 failed, 1 passed, 1 skipped" in r.stdout
    assert "FAILED test_child.py::test_missing_resource" in r.stdout and "required" in r.stdout


def test_unlisted_skips_fail_under_the_allowlist(tmp_path):
    allow = tmp_path / "allow"
    allow.write_text("# nothing may skip\n")
    r = _pytest_child(tmp_path, CHILD, EDGEKV_SKIP_ALLOWLIST=str(allow))
    assert r.returncode == 1, r.stdout[-2000:]
    assert "2 failed, 1 passed" in r.stdout
    assert "skipped (not on this platform), and" in r.stdout and "does not list it" in r.stdout
