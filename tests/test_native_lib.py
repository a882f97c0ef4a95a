"""Which native library the package loads: $EDGEKV_LIB is that library or an error."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import subprocess_env

import edgekv._native as native

SHOW = "import edgekv._native as n; print(n.LIB_PATH); print(n.SIMD)"


def _python(code: str, **env_extra) -> subprocess.CompletedProcess:
    env = subprocess_env()
    env.pop("EDGEKV_LIB", None)
    env.update(env_extra)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)


def test_edgekv_lib_missing_file_is_an_error(tmp_path):
    missing = tmp_path / "no-such" / "libedgekv.so"
    r = _python(SHOW, EDGEKV_LIB=str(missing))
    assert r.returncode != 0
    assert "EdgekvError" in r.stderr and f"EDGEKV_LIB={missing} is not a file" in r.stderr, r.stderr[-800:]


def test_edgekv_lib_names_the_library_loaded(tmp_path):
    copy = tmp_path / native.LIB_PATH.name
    copy.write_bytes(Path(native.LIB_PATH).read_bytes())
    r = _python(SHOW, EDGEKV_LIB=str(copy))
    assert r.returncode == 0, r.stderr[-800:]
    assert r.stdout.splitlines() == [str(copy), native.SIMD]
