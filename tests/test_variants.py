"""The kernel-variant picker of python/edgekv/_native.py: which libedgekv-<variant>.so a wheel
loads for a CPU (from /proc/cpuinfo flags or AT_HWCAP bits), the EDGEKV_VARIANT override, and the
errors a bad override gets. The variant libraries here are copies of the checkout's build under
the variant names (the picker reads names and CPU features only); tools/check_wheel.sh and
tools/wheel_smoke.py run the real per-variant builds."""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import edgekv._native as native
from edgekv.errors import EdgekvError

REPO = Path(__file__).resolve().parent.parent

# /proc/cpuinfo lines of real machines (trimmed to the flags that matter and a few others)
HASWELL = "flags\t\t: fpu sse2 ssse3 sse4_1 sse4_2 avx f16c fma avx2 bmi2"
ALDER_LAKE = "flags\t\t: fpu sse2 avx f16c fma avx2 avx_vnni sha_ni"
ZEN4 = ("flags\t\t: fpu sse2 avx f16c fma avx2 avx512f avx512dq avx512bw avx512vl avx512_vnni avx512vbmi "
        "avx512_bf16")
SKYLAKE_X = "flags\t\t: fpu sse2 avx f16c fma avx2 avx512f avx512dq avx512bw avx512vl"  # no VNNI, no VBMI
OLD_X86 = "flags\t\t: fpu sse2 ssse3 sse4_1 sse4_2 avx"  # Sandy Bridge: AVX, no AVX2
PI4 = "processor\t: 0\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm crc32 cpuid\nCPU part\t: 0xd08"
PI5 = ("processor\t: 0\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid "
       "asimdrdm lrcpc dcpop asimddp\nCPU part\t: 0xd0b")
X86_ALL = {"scalar", "avx2", "avx2vnni", "avx512"}
ARM_ALL = {"neon", "dotprod"}


def pick_x86(cpuinfo, available=X86_ALL, override=None):
    return native.pick_variant(available, "x86_64", native.cpu_features("x86_64", cpuinfo), override)


@pytest.mark.parametrize("cpuinfo, expect", [
    (ZEN4, "avx512"), (ALDER_LAKE, "avx2vnni"), (HASWELL, "avx2"), (SKYLAKE_X, "avx2"), (OLD_X86, "scalar"),
])
def test_x86_pick_from_cpuinfo_flags(cpuinfo, expect):
    name, reason = pick_x86(cpuinfo)
    assert name == expect
    assert "the best of this package's variants" in reason


def test_x86_reason_names_the_missing_features():
    name, reason = pick_x86(SKYLAKE_X)
    assert name == "avx2"
    assert "avx512 needs avx512_vnni, avx512vbmi, which this CPU lacks" in reason
    assert "avx2vnni needs avx_vnni" in reason


def test_pick_is_limited_to_the_package_contents():
    assert pick_x86(ZEN4, available={"scalar", "avx2"})[0] == "avx2"
    assert pick_x86(HASWELL, available={"scalar"})[0] == "scalar"
    with pytest.raises(EdgekvError, match="none of this package's kernel variants .avx2. runs on this x86_64 CPU"):
        pick_x86(OLD_X86, available={"avx2"})


def test_aarch64_pick_from_cpuinfo_and_hwcap():
    pi4 = native.cpu_features("aarch64", PI4, hwcap=0)
    pi5 = native.cpu_features("aarch64", PI5, hwcap=0)
    assert native.pick_variant(ARM_ALL, "aarch64", pi4)[0] == "neon"
    assert native.pick_variant(ARM_ALL, "aarch64", pi5)[0] == "dotprod"
    # under qemu-user /proc/cpuinfo is the host's: the HWCAP bits alone must decide
    host = native.cpu_features("aarch64", HASWELL, hwcap=(1 << 1) | (1 << 20))
    assert host >= {"asimd", "asimddp"}
    assert native.pick_variant(ARM_ALL, "aarch64", host)[0] == "dotprod"
    a72 = native.cpu_features("aarch64", "", hwcap=(1 << 1))
    name, reason = native.pick_variant(ARM_ALL, "aarch64", a72)
    assert (name, "dotprod needs asimddp" in reason) == ("neon", True)


def test_override_picks_a_lower_variant():
    assert pick_x86(ZEN4, override="avx2") == ("avx2", "forced by EDGEKV_VARIANT")
    assert pick_x86(ZEN4, override="scalar")[0] == "scalar"


def test_bad_overrides_are_clear_errors():
    with pytest.raises(EdgekvError, match=r"EDGEKV_VARIANT=avx9 is not a kernel variant of this package; "
                                          r"it has: avx512, avx2vnni, avx2, scalar \(x86_64\)"):
        pick_x86(ZEN4, override="avx9")
    with pytest.raises(EdgekvError, match="EDGEKV_VARIANT=avx512 needs CPU features this CPU lacks: "
                                          "avx512f, avx512bw, avx512vl, avx512_vnni, avx512vbmi"):
        pick_x86(HASWELL, override="avx512")
    with pytest.raises(EdgekvError, match="EDGEKV_VARIANT=avx512 is not a kernel variant"):
        pick_x86(ZEN4, available={"scalar", "avx2"}, override="avx512")
    with pytest.raises(EdgekvError, match="EDGEKV_VARIANT=neon is not a kernel variant"):
        pick_x86(ZEN4, override="neon")  # an aarch64 name on x86_64


def test_table_matches_cmake():
    """Every variant CMake builds has a row here (CPU features, SIMD name) and the other way round."""
    cmake = (REPO / "CMakeLists.txt").read_text()
    built = sorted(sorted(names.split()) for names in re.findall(r"set\(EK_VARIANTS ([a-z0-9 ]+)\)", cmake))
    assert built == sorted(sorted(v for v, _, _ in rows) for rows in native.VARIANTS.values())
    for v in (v for rows in native.VARIANTS.values() for v, _, _ in rows):
        assert f"set(EK_VARIANT_FLAGS_{v} " in cmake


# --------------------------------------------------------------------------------------------
# the loader, over a package folder holding variant-named libraries
# --------------------------------------------------------------------------------------------

MACHINE = native._MACHINES[platform.machine().lower()]  # CI runs x86_64 (and aarch64 under qemu)


def _fake_package(tmp_path: Path) -> Path:
    """A copy of the edgekv package with every variant of this machine as a copy of the loaded library."""
    pkg = tmp_path / "site" / "edgekv"
    shutil.copytree(Path(native.__file__).parent, pkg, ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    for h in ("edgekv.h", "edgekv_testing.h"):
        if not (pkg / h).exists():
            shutil.copy2(REPO / "csrc" / h, pkg / h)
    for v, _, _ in native.VARIANTS[MACHINE]:
        shutil.copy2(native.LIB_PATH, pkg / f"libedgekv-{v}.so")
    return pkg


def _import_in(pkg: Path, **env):
    run_env = {k: v for k, v in os.environ.items() if k not in ("EDGEKV_LIB", "EDGEKV_VARIANT", "PYTHONPATH")}
    run_env.update(env, PYTHONPATH=str(pkg.parent))
    code = "import edgekv._native as n; print(n.LIB_PATH); print(n.VARIANT); print(n.VARIANT_REASON)"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=run_env,
                          cwd=pkg.parent, timeout=120)


def test_loader_picks_this_cpus_best_variant(tmp_path):
    pkg = _fake_package(tmp_path)
    expect, _ = native.pick_variant({v for v, _, _ in native.VARIANTS[MACHINE]}, MACHINE,
                                    native.cpu_features(MACHINE))
    r = _import_in(pkg)
    assert r.returncode == 0, r.stderr
    lib, variant, reason = r.stdout.splitlines()
    assert (Path(lib), variant) == (pkg / f"libedgekv-{expect}.so", expect)
    assert reason.startswith("the best of this package's variants")


def test_loader_env_override_and_bad_override(tmp_path):
    pkg = _fake_package(tmp_path)
    lowest = native.VARIANTS[MACHINE][-1][0]  # needs no more than the baseline of the machine
    r = _import_in(pkg, EDGEKV_VARIANT=lowest)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [str(pkg / f"libedgekv-{lowest}.so"), lowest, "forced by EDGEKV_VARIANT"]
    r = _import_in(pkg, EDGEKV_VARIANT="bogus")
    assert r.returncode == 1
    assert "EdgekvError: EDGEKV_VARIANT=bogus is not a kernel variant of this package" in r.stderr


def test_override_without_variants_is_an_error(tmp_path, monkeypatch):
    monkeypatch.delenv("EDGEKV_LIB", raising=False)
    monkeypatch.setenv("EDGEKV_VARIANT", "avx2")
    with pytest.raises(EdgekvError, match="EDGEKV_VARIANT=avx2 is set, but .* holds no kernel variants"):
        native._library_path(tmp_path)


def test_single_library_path_is_unchanged(tmp_path, monkeypatch):
    """Without variants: the package's libedgekv.so, else the checkout's build/ (as before)."""
    monkeypatch.delenv("EDGEKV_LIB", raising=False)
    monkeypatch.delenv("EDGEKV_VARIANT", raising=False)
    checkout, pkg = tmp_path / "checkout", tmp_path / "pkg"
    (checkout / "build").mkdir(parents=True)
    pkg.mkdir()
    shutil.copy2(native.LIB_PATH, checkout / "build" / "libedgekv.so")
    monkeypatch.setattr(native, "_REPO", checkout)
    assert native._library_path(pkg) == (checkout / "build" / "libedgekv.so", None,
                                         "single library, a source checkout's build")
    shutil.copy2(native.LIB_PATH, pkg / "libedgekv.so")
    assert native._library_path(pkg) == (pkg / "libedgekv.so", None, "single library")


def test_info_says_which_variant_and_why(tmp_path):
    """`edgekv info` names the loaded variant and the reason, in text and JSON."""
    from make_tiny import write_tiny_model

    pkg = _fake_package(tmp_path)
    model = write_tiny_model(tmp_path / "tiny.gguf", arch="llama", weight_type="F16")
    expect, _ = native.pick_variant({v for v, _, _ in native.VARIANTS[MACHINE]}, MACHINE,
                                    native.cpu_features(MACHINE))
    lowest = native.VARIANTS[MACHINE][-1][0]
    env = {k: v for k, v in os.environ.items() if k not in ("EDGEKV_LIB", "EDGEKV_VARIANT")}
    env["PYTHONPATH"] = str(pkg.parent)
    cmd = [sys.executable, "-m", "edgekv", "info", "--model", str(model), "--threads", "1"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("kernels "))
    names = ", ".join(v for v, _, _ in native.VARIANTS[MACHINE])
    assert line.split(None, 1)[1].startswith(
        f"{expect} variant (libedgekv-{expect}.so): the best of this package's variants ({names}) that this CPU supports")
    r = subprocess.run(cmd + ["--json"], capture_output=True, text=True, env=dict(env, EDGEKV_VARIANT=lowest),
                       cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert (info["variant"], info["variant_reason"], info["library"]) == (
        lowest, "forced by EDGEKV_VARIANT", str(pkg / f"libedgekv-{lowest}.so"))
