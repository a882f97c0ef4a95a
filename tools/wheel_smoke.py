#!/usr/bin/env python3
"""Smoke test of an installed edgekv wheel (cibuildwheel's test-command, and by hand).

Writes a tiny model with the source tree's generator (models/make_tiny.py, which needs only gguf
and numpy, both dependencies of edgekv), then checks that the *installed* package loads its
bundled library, that a wheel with kernel variants (libedgekv-<variant>.so) loaded the best one
this CPU supports and that it reports that variant's SIMD path, that every variant this CPU can
run loads (EDGEKV_VARIANT) and gives the same greedy tokens, and that ``edgekv generate``
produces text.

    python tools/wheel_smoke.py            # from any directory, with the wheel installed
"""

from __future__ import annotations

import os
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
    machine = native._MACHINES.get(platform.machine().lower())
    table = native.VARIANTS.get(machine, [])
    have = [v for v, _, _ in table if (pkg / f"libedgekv-{v}.so").is_file()]
    if sys.platform.startswith("linux") and table and not have:
        print(f"wheel_smoke: the package has no kernel variants (libedgekv-<variant>.so) in {pkg}")
        return 1
    runnable = []
    if have:
        feats = native.cpu_features(machine)
        runnable = [v for v, needs, _ in table if v in have and set(needs) <= feats]
        expect, _ = native.pick_variant(set(have), machine, feats, os.environ.get("EDGEKV_VARIANT") or None)
        simd = {v: s for v, _, s in table}
        if native.VARIANT != expect or native.SIMD != simd[expect]:
            print(f"wheel_smoke: loaded variant {native.VARIANT!r} (SIMD {native.SIMD!r}); expected {expect!r} "
                  f"({simd[expect]!r}) on this CPU")
            return 1
    sys.path.insert(0, str(ROOT / "models"))
    from make_tiny import write_tiny_model

    with tempfile.TemporaryDirectory() as td:
        model = write_tiny_model(Path(td) / "tiny.gguf", arch="llama", weight_type="Q4_0")
        with edgekv.Model(model, threads=2) as m:
            text = m.generate("Hello", max_tokens=8, temperature=0)
            n_gen = m.last_stats.generated_tokens
        if not text or n_gen != 8:
            print(f"wheel_smoke: the API generated {n_gen} tokens ({text!r}), expected 8")
            return 1
        cli = subprocess.run([sys.executable, "-m", "edgekv", "generate", "Hi", "--max-tokens", "8", "--model",
                              str(model)], capture_output=True, text=True, timeout=600)
        # every variant this CPU runs: loads, reports its SIMD path, same greedy tokens (F16 weights and
        # an fp16 cache give identical tokens on every build: docs/platforms.md)
        f16 = write_tiny_model(Path(td) / "tiny-f16.gguf", arch="llama", weight_type="F16", seed=1)
        code = ("import edgekv, edgekv._native as n, sys; m = edgekv.Model(sys.argv[1], threads=1); "
                "print(n.VARIANT, n.SIMD, repr(m.generate('The quick brown fox', max_tokens=16, temperature=0)))")
        per_variant = {}
        for v in runnable:
            env = dict(os.environ, EDGEKV_VARIANT=v)
            r = subprocess.run([sys.executable, "-c", code, str(f16)], capture_output=True, text=True, env=env,
                               timeout=600)
            if r.returncode != 0:
                print(f"wheel_smoke: EDGEKV_VARIANT={v} failed ({r.returncode}):\n{r.stderr[-2000:]}")
                return 1
            got_v, got_simd, got_text = r.stdout.strip().split(" ", 2)
            if (got_v, got_simd) != (v, simd[v]):
                print(f"wheel_smoke: EDGEKV_VARIANT={v} loaded {got_v} ({got_simd}), expected {simd[v]}")
                return 1
            per_variant[v] = got_text
        if len(set(per_variant.values())) > 1:
            print(f"wheel_smoke: the variants disagree on greedy tokens: {per_variant}")
            return 1
    if cli.returncode != 0 or not cli.stdout.strip():
        print(f"wheel_smoke: `edgekv generate` failed ({cli.returncode}, output {cli.stdout!r}):\n{cli.stderr[-2000:]}")
        return 1
    if runnable:
        print(f"wheel_smoke: variants {', '.join(runnable)} of {', '.join(have)} run here, same tokens "
              f"{next(iter(per_variant.values()))}")
    print(f"wheel_smoke: edgekv {edgekv.__version__} from {pkg}, library {lib.name} ({native.SIMD}: "
          f"{native.VARIANT_REASON}); "
          f"API {text!r}, CLI {cli.stdout.strip()!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
