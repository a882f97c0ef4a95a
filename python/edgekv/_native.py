"""The raw binding: cffi (ABI mode) over libedgekv, mirroring csrc/edgekv.h.

This module is the only place that knows the C ABI. It reads the declarations
straight from the header (between the cffi-begin and cffi-end markers), so the
header is the single source of truth, and opens the shared library that the
build placed next to this file.

The library: $EDGEKV_LIB when set (it must exist); else, when this package's
directory holds kernel variants (``libedgekv-<variant>.so``, what wheels ship), the
best one this CPU supports ($EDGEKV_VARIANT picks one by name); else this package's
``libedgekv.so``, then the CMake build folder of a source checkout (``build/``), so
tests can run from the tree after ``cmake --build build``.
"""

from __future__ import annotations

import ctypes
import os
import platform
import re
import sys
from pathlib import Path

import cffi

from .errors import EdgekvError

_HERE = Path(__file__).resolve().parent
_REPO = _HERE.parent.parent

if sys.platform == "darwin":
    _LIB_NAMES = ["libedgekv.dylib"]
elif sys.platform == "win32":
    _LIB_NAMES = ["edgekv.dll", "libedgekv.dll"]
else:
    _LIB_NAMES = ["libedgekv.so"]


def _find(candidates: list[Path], what: str) -> Path:
    for c in candidates:
        if c.is_file():
            return c
    looked = "\n  ".join(str(c) for c in candidates)
    raise EdgekvError(
        f"edgekv's native {what} was not found; looked in:\n  {looked}\n"
        "Install the package with `pip install .` (it builds the C core with CMake), "
        "or build it in a checkout with `cmake -S . -B build && cmake --build build`."
    )


def _header_decls() -> str:
    # edgekv.h's block, then edgekv_testing.h's (test and benchmark entry points, using edgekv.h's
    # types), both from the folder that has edgekv.h: the package's when installed, else csrc/.
    header = _find([_HERE / "edgekv.h", _REPO / "csrc" / "edgekv.h"], "header edgekv.h")
    blocks = []
    for h in (header, _find([header.parent / "edgekv_testing.h"], "header edgekv_testing.h")):
        m = re.search(r"/\* cffi-begin[^\n]*\*/\n(.*?)/\* cffi-end \*/", h.read_text(), re.S)
        if not m:
            raise EdgekvError(f"{h} has no cffi-begin/cffi-end block")
        # cffi's parser takes plain declarations: drop comments.
        blocks.append(re.sub(r"/\*.*?\*/", "", m.group(1), flags=re.S))
    return "\n".join(blocks)


# Kernel variants (CMakeLists.txt's EK_VARIANT_FLAGS_<name>), best first per machine: the CPU
# features each needs (x86_64: /proc/cpuinfo flags; aarch64: HWCAP names, as /proc/cpuinfo spells
# them) and the SIMD path its library reports.
VARIANTS = {
    "x86_64": [
        ("avx512", ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512vbmi"),
         "avx2+vnni+avx512"),
        ("avx2vnni", ("avx2", "fma", "f16c", "avx_vnni"), "avx2+vnni"),
        ("avx2", ("avx2", "fma", "f16c"), "avx2"),
        ("scalar", (), "scalar"),
    ],
    "aarch64": [
        ("dotprod", ("asimd", "asimddp"), "neon+dotprod"),
        ("neon", ("asimd",), "neon"),
    ],
}
_MACHINES = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}
_HWCAP_BITS = {"asimd": 1 << 1, "asimddp": 1 << 20}  # linux/arch/arm64 uapi hwcap.h (AT_HWCAP)
_VARIANT_RE = re.compile(r"^libedgekv-([a-z0-9]+)\.so$")


def cpu_features(machine: str, cpuinfo: str | None = None, hwcap: int | None = None) -> set:
    """The CPU features the variant table names: the ``flags`` (x86) or ``Features`` (ARM) of
    /proc/cpuinfo, plus, on aarch64, the AT_HWCAP bits (right under qemu-user too, whose
    /proc/cpuinfo is the host's)."""
    feats: set = set()
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            cpuinfo = ""
    key = "flags" if machine == "x86_64" else "Features"
    for line in cpuinfo.splitlines():
        name, _, value = line.partition(":")
        if name.strip() == key:
            feats |= set(value.split())
            break
    if machine == "aarch64":
        if hwcap is None:
            try:
                getauxval = ctypes.CDLL(None).getauxval
                getauxval.restype = ctypes.c_ulong
                hwcap = int(getauxval(ctypes.c_ulong(16)))  # AT_HWCAP
            except (OSError, AttributeError):
                hwcap = 0
        feats |= {n for n, bit in _HWCAP_BITS.items() if hwcap & bit}
    return feats


def pick_variant(available, machine: str, features: set, override: str | None = None):
    """(variant, reason): the override when set (it must exist here and suit this CPU), else the
    first variant of the table that this package has and this CPU supports."""
    table = VARIANTS.get(machine, [])
    have = [v for v, _, _ in table if v in available]
    if override:
        row = next((r for r in table if r[0] == override), None)
        if row is None or override not in available:
            raise EdgekvError(f"EDGEKV_VARIANT={override} is not a kernel variant of this package; "
                              f"it has: {', '.join(have) or 'none'} ({machine}); unset it to pick by CPU")
        missing = [f for f in row[1] if f not in features]
        if missing:
            raise EdgekvError(f"EDGEKV_VARIANT={override} needs CPU features this CPU lacks: {', '.join(missing)}; "
                              f"it would die with 'Illegal instruction'")
        return override, "forced by EDGEKV_VARIANT"
    passed = []
    for name, needs, _ in table:
        if name not in available:
            continue
        missing = [f for f in needs if f not in features]
        if not missing:
            why = f"the best of this package's variants ({', '.join(have)}) that this CPU supports"
            return name, why + "".join(f"; {p}" for p in passed)
        passed.append(f"{name} needs {', '.join(missing)}, which this CPU lacks")
    raise EdgekvError(f"none of this package's kernel variants ({', '.join(sorted(available))}) "
                      f"runs on this {machine} CPU: {'; '.join(passed) or 'none is known for it'}")


def _variant_library(folder: Path):
    """(path, variant, reason) when ``folder`` holds kernel variants, else None."""
    try:
        available = {m.group(1) for p in folder.iterdir() if (m := _VARIANT_RE.match(p.name))}
    except OSError:
        return None
    if not available:
        return None
    machine = _MACHINES.get(platform.machine().lower(), platform.machine().lower())
    name, reason = pick_variant(available, machine, cpu_features(machine), os.environ.get("EDGEKV_VARIANT") or None)
    return folder / f"libedgekv-{name}.so", name, reason


def _library_path(folder: Path = _HERE):
    """(library, variant or None, why this one)."""
    env = os.environ.get("EDGEKV_LIB")
    if env:  # a named library is that library or an error, never a quiet fallback to another
        if not Path(env).is_file():
            raise EdgekvError(f"EDGEKV_LIB={env} is not a file; unset it to use the package's own library")
        return Path(env), None, "named by EDGEKV_LIB"
    picked = _variant_library(folder)
    if picked:
        return picked
    if os.environ.get("EDGEKV_VARIANT"):
        raise EdgekvError(f"EDGEKV_VARIANT={os.environ['EDGEKV_VARIANT']} is set, but {folder} holds no kernel "
                          "variants (libedgekv-<variant>.so, built with -DEDGEKV_VARIANTS=ON): unset it")
    candidates = [folder / n for n in _LIB_NAMES]
    candidates += [_REPO / "build" / n for n in _LIB_NAMES]
    path = _find(candidates, "library")
    return path, None, "single library" + (", a source checkout's build" if path.parent != folder else "")


ffi = cffi.FFI()
ffi.cdef(_header_decls())
LIB_PATH, VARIANT, VARIANT_REASON = _library_path()
lib = ffi.dlopen(str(LIB_PATH))

if lib.ek_abi_version() != lib.EK_ABI_VERSION:
    raise EdgekvError(
        f"{LIB_PATH} has C ABI version {lib.ek_abi_version()}, but the Python package expects "
        f"{lib.EK_ABI_VERSION}: rebuild or reinstall edgekv"
    )

SIMD = ffi.string(lib.ek_simd()).decode()


def kv_precisions() -> tuple[tuple[int, int], ...]:
    """The KV precisions the library has, one (bits, group_bits) pair per row of its table
    (csrc/kv_types.c) in the store's id order: group_bits names which of the three configured group
    sizes (8-, 4- or 2-bit) the precision uses, 16 for FP16 (the whole head)."""
    n = lib.ek_kv_precisions(ffi.NULL, ffi.NULL, 0)
    bits, groups = ffi.new("int32_t[]", n), ffi.new("int32_t[]", n)
    lib.ek_kv_precisions(bits, groups, n)
    return tuple((int(bits[i]), int(groups[i])) for i in range(n))
