"""The raw binding: cffi (ABI mode) over libedgekv, mirroring csrc/edgekv.h.

This module is the only place that knows the C ABI. It reads the declarations
straight from the header (between the cffi-begin and cffi-end markers), so the
header is the single source of truth, and opens the shared library that the
build placed next to this file.

The library: $EDGEKV_LIB when set (it must exist), else this package's directory,
then the CMake build folder of a source checkout (``build/``), so tests can run
from the tree after ``cmake --build build``.
"""

from __future__ import annotations

import os
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


def _library_path() -> Path:
    env = os.environ.get("EDGEKV_LIB")
    if env:  # a named library is that library or an error, never a quiet fallback to another
        if not Path(env).is_file():
            raise EdgekvError(f"EDGEKV_LIB={env} is not a file; unset it to use the package's own library")
        return Path(env)
    candidates = [_HERE / n for n in _LIB_NAMES]
    candidates += [_REPO / "build" / n for n in _LIB_NAMES]
    return _find(candidates, "library")


ffi = cffi.FFI()
ffi.cdef(_header_decls())
LIB_PATH = _library_path()
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
