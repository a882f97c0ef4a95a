"""Build: CMake compiles csrc/ into libedgekv, which is installed inside the package.

The Python side binds it with cffi in ABI mode (python/edgekv/_native.py), so there
is no compiled Python extension: the wheel is platform-specific only because of the
shared library it carries. Set EDGEKV_ARCH=portable for wheels meant for other
machines (the default, native, tunes for the build machine), or EDGEKV_VARIANTS=1 for a wheel
that carries every kernel variant of its architecture (libedgekv-<variant>.so; the package picks
one at load time). EDGEKV_CMAKE_ARGS adds CMake arguments (e.g. a cross toolchain file).
"""

import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.dist import Distribution

ROOT = Path(__file__).resolve().parent
LIB_NAMES = {"darwin": "libedgekv.dylib", "win32": "edgekv.dll"}
LIB_NAME = LIB_NAMES.get(sys.platform, "libedgekv.so")


def _cmake() -> str:
    exe = shutil.which("cmake")
    if exe is None:
        raise SystemExit(
            "edgekv: CMake was not found. `pip install .` normally brings it from PyPI "
            "(build requirement `cmake`); with --no-build-isolation run `pip install cmake ninja` first."
        )
    return exe


class BuildWithCMake(build_py):
    """Compile the C core and drop the library, header and model registry into the package."""

    def run(self):
        super().run()
        pkg_dir = Path(self.build_lib) / "edgekv"
        variants = os.environ.get("EDGEKV_VARIANTS", "0") not in ("", "0")
        # A fresh build folder each time: a cached CMake configuration would point at the
        # temporary cmake/ninja of an earlier isolated pip build, long gone.
        with tempfile.TemporaryDirectory(prefix="edgekv-cmake-") as tmp:
            build_dir = Path(tmp)
            args = [
                _cmake(), "-S", str(ROOT), "-B", str(build_dir),
                "-DCMAKE_BUILD_TYPE=Release",
                "-DEDGEKV_BUILD_TESTS=OFF",
                f"-DEDGEKV_ARCH={os.environ.get('EDGEKV_ARCH', 'native')}",
                f"-DEDGEKV_VARIANTS={'ON' if variants else 'OFF'}",
            ] + shlex.split(os.environ.get("EDGEKV_CMAKE_ARGS", ""))
            if shutil.which("ninja"):
                args += ["-G", "Ninja"]
            try:
                subprocess.run(args, check=True)
                subprocess.run([_cmake(), "--build", str(build_dir), "--config", "Release"]
                               + (["--target", "edgekv_variants"] if variants else []), check=True)
            except subprocess.CalledProcessError as e:
                raise SystemExit(f"edgekv: building the C core failed ({e}); a C11 compiler (gcc or clang) is required")
            pattern = "libedgekv-*.so" if variants else LIB_NAME
            built = sorted(build_dir.rglob(pattern))
            if not built:
                raise SystemExit(f"edgekv: CMake finished but {pattern} is not under {build_dir}")
            pkg_dir.mkdir(parents=True, exist_ok=True)
            for stale in pkg_dir.glob("libedgekv*"):  # from an earlier build of another kind in build/lib
                stale.unlink()
            for lib in built:
                shutil.copy2(lib, pkg_dir / lib.name)
        for header in ("edgekv.h", "edgekv_testing.h"):  # _native.py reads both cffi blocks
            shutil.copy2(ROOT / "csrc" / header, pkg_dir / header)
        shutil.copy2(ROOT / "models" / "registry.json", pkg_dir / "registry.json")


class BinaryDistribution(Distribution):
    """The wheel carries a native library, so it is tagged for this platform."""

    def has_ext_modules(self):
        return True


setup(
    package_dir={"": "python"},
    packages=["edgekv", "edgekv.server"],
    package_data={"edgekv": ["data/*", "data/kv_profiles/*"]},  # KV controller, rarity tables, KV profiles
    cmdclass={"build_py": BuildWithCMake},
    distclass=BinaryDistribution,
    zip_safe=False,
)
