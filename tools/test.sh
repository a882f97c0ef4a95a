#!/usr/bin/env bash
# The README's test command: install edgekv with its test extras, the reference
# (llama-cpp-python) built for this CPU, and run the suite with skip reasons shown.
#
#   bash tools/test.sh [pytest args...]
#
# Run it inside the virtual environment you want the packages in. The reference is built from
# source once per (version, flags, CPU, Python) and the wheel kept under
# ~/.cache/edgekv/reference-wheels, so later runs install it in seconds.
#
# Why not a plain `pip install ".[test]"`: llama-cpp-python builds natively (-march=native), and
# on CPUs that advertise AMX its AMX kernels crash (SIGSEGV in decode) on the VMs seen here. The
# build below leaves AMX out; tests/conftest.py probes the reference before the suite and names
# this fix if an installed reference crashes anyway.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PIP_DISABLE_PIP_VERSION_CHECK=1

spec=$(grep -o 'llama-cpp-python==[0-9][0-9.]*' pyproject.toml | head -n 1)
[ -n "$spec" ] || { echo "tools/test.sh: pyproject.toml pins no llama-cpp-python==X" >&2; exit 2; }

cflags=""
if [ "$(uname -m)" = x86_64 ]; then
  amx_off="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
  # only a compiler that knows the AMX options can be told to leave them out (gcc >= 11, clang >= 12)
  if echo 'int main(void){return 0;}' | ${CC:-cc} -x c - $amx_off -o /dev/null 2>/dev/null; then
    cflags="$amx_off"
  fi
fi
cmake_args="-DLLAVA_BUILD=OFF"
cpu=$(grep -m1 -E '^(flags|Features)' /proc/cpuinfo 2>/dev/null || uname -m)
pytag=$("$PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
key=$(printf '%s\n' "$spec" "$cmake_args" "$cflags" "$(uname -m)" "$cpu" "$pytag" | sha256sum | cut -c1-16)
cache="${EDGEKV_REFERENCE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/edgekv/reference-wheels}/$key"

if ! ls "$cache"/llama_cpp_python-*.whl >/dev/null 2>&1; then
  echo "== building the reference $spec for this CPU (CFLAGS: ${cflags:-none}; 10-15 minutes on 2 cores, once)"
  tmp=$(mktemp -d)
  CMAKE_ARGS="$cmake_args" CFLAGS="$cflags" CXXFLAGS="$cflags" \
    "$PY" -m pip wheel --no-deps --no-binary llama-cpp-python --no-cache-dir -w "$tmp" "$spec"
  mkdir -p "$cache"
  printf '{"spec": "%s", "CMAKE_ARGS": "%s", "CFLAGS": "%s", "machine": "%s", "python": "%s"}\n' \
    "$spec" "$cmake_args" "$cflags" "$(uname -m)" "$pytag" > "$tmp/build.json"
  mv "$tmp"/* "$cache"/ && rmdir "$tmp"
fi
echo "== reference wheel: $cache ($(cat "$cache/build.json" 2>/dev/null || echo 'no build record'))"
"$PY" -m pip install -q --no-deps --force-reinstall "$cache"/llama_cpp_python-*.whl
# the build record travels with the installed reference: benchmarks write it into their results
cp "$cache/build.json" "$("$PY" -c 'import importlib.util as u, os; print(os.path.dirname(u.find_spec("llama_cpp").origin))')/edgekv_reference_build.json"

echo "== edgekv and its test extras"
"$PY" -m pip install -q ".[test]"

echo "== pytest"
# the tests import the installed package; tests/conftest.py probes the reference before the suite
exec "$PY" -m pytest -rfEs "$@"
