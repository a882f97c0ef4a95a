#!/usr/bin/env python3
"""Smoke test of an installed edgekv wheel (cibuildwheel's test-command, and by hand).

Writes a tiny model with the source tree's generator (models/make_tiny.py, which needs only gguf
and numpy, both dependencies of edgekv), then checks that the *installed* package loads its
bundled library, that the library's SIMD path is the portable one for this machine, and that
``edgekv generate`` produces text.

    python tools/wheel_smoke.py            # from any directory, with the wheel installed
"""

from __future__ import annotations

import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    import edgekv
    import edgekv._native as native

    pkg = Path(edgekv.__file__).resolve().parent
    if ROOT / "python" in pkg.parents or pkg.parent == ROOT / "python":
        print(f"wheel_smoke: edgekv was imported from the source tree ({pkg}), not from the wheel")
        return 1
    lib = Path(native.LIB_PATH).resolve()
    if lib.parent != pkg:
        print(f"wheel_smoke: the library {lib} is not the one inside the package ({pkg})")
        return 1
    machine = platform.machine().lower()
    expect = {"x86_64": "avx2", "amd64": "avx2", "aarch64": "neon", "arm64": "neon"}.get(machine)
    if expect and native.SIMD != expect:
        print(f"wheel_smoke: {machine} wheel runs SIMD path {native.SIMD!r}, expected the portable {expect!r}")
        return 1
    sys.path.insert(0, str(ROOT / "models"))
    from make_tiny import write_tiny_model

    with tempfile.TemporaryDirectory() as td:
        model = write_tiny_model(Path(td) / "tiny.gguf", arch="llama", weight_type="Q4_0")
        with edgekv.Model(model, threads=2) as m:
            text = m.generate("Hello", max_tokens=8, temperature=0)
        cli = subprocess.run([sys.executable, "-m", "edgekv", "generate", "Hi", "--max-tokens", "8", "--model",
                              str(model)], capture_output=True, text=True, timeout=300)
    if cli.returncode != 0:
        print(f"wheel_smoke: `edgekv generate` failed ({cli.returncode}):\n{cli.stderr[-2000:]}")
        return 1
    print(f"wheel_smoke: edgekv {edgekv.__version__} from {pkg}, library {lib.name} ({native.SIMD}); "
          f"API {text!r}, CLI {cli.stdout.strip()!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
