#!/usr/bin/env bash
# Build edgekv's wheel the way a release would (EDGEKV_ARCH=portable), install it into a fresh
# virtual environment with no compiler on PATH, and generate with it.
#
#   bash tools/check_wheel.sh [OUT_DIR]        (default OUT_DIR: build/wheel-check)
#
# Needs PyPI (build requirements and the wheel's dependencies, binary wheels only). The model is the
# cached SmolLM2-135M when edgekv's cache has it, else a tiny generated model. Environment:
# PYTHON (default python3), EDGEKV_WHEEL_MODEL (a .gguf to generate with instead).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$(mkdir -p "${1:-$ROOT/build/wheel-check}" && cd "${1:-$ROOT/build/wheel-check}" && pwd)"
PY="${PYTHON:-python3}"
cd "$ROOT"

echo "== building the wheel (EDGEKV_ARCH=portable)"
rm -rf "$OUT/dist" "$OUT/venv"
EDGEKV_ARCH=portable "$PY" -m pip wheel . --no-deps -w "$OUT/dist" -q
WHEEL="$(ls "$OUT"/dist/edgekv-*.whl)"
echo "   $(basename "$WHEEL") ($(du -k "$WHEEL" | cut -f1) KiB)"
"$PY" - "$WHEEL" <<'EOF'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
need = ["edgekv/libedgekv.so", "edgekv/edgekv.h", "edgekv/edgekv_testing.h", "edgekv/registry.json", "edgekv/_native.py"]
missing = [n for n in need if n not in names]
assert not missing, f"wheel lacks {missing}: {names}"
assert not any(n.endswith((".c", "CMakeLists.txt")) for n in names), "sources in the wheel"
print("   contents ok:", ", ".join(need))
EOF
# what a manylinux repair would see (informational: the library needs glibc and libgomp-free libc only)
echo "   libedgekv.so needs: $(unzip -p "$WHEEL" edgekv/libedgekv.so > "$OUT/libedgekv.so" && \
    objdump -p "$OUT/libedgekv.so" | awk '/NEEDED/ {printf "%s ", $2}')"
echo "   newest glibc symbol: $(objdump -T "$OUT/libedgekv.so" | grep -oE 'GLIBC_[0-9.]+' | sort -uV | tail -1)"

echo "== fresh venv, binary wheels only"
# Without PYTHONPATH: a source tree on it (with python/edgekv.egg-info from an earlier build) makes
# pip think edgekv is already installed and skip the wheel.
VPY=(env -u PYTHONPATH -u PYTHONHOME "$OUT/venv/bin/python")
"$PY" -m venv "$OUT/venv"
"${VPY[@]}" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
"${VPY[@]}" -m pip install -q --only-binary=:all: "$WHEEL"
FILES="$("${VPY[@]}" -m pip show -f edgekv)"
[[ "$FILES" == *"edgekv/libedgekv.so"* ]] || { echo "the wheel did not install: $FILES"; exit 1; }

MODEL="${EDGEKV_WHEEL_MODEL:-}"
if [ -z "$MODEL" ]; then
    MODEL="$(PYTHONPATH="$ROOT/python" "$PY" -c \
        "import edgekv; print(edgekv.registry.resolve('smollm2-135m', progress=False))" 2>/dev/null || true)"
fi
if [ -z "$MODEL" ] || [ ! -f "$MODEL" ]; then
    MODEL="$OUT/tiny.gguf"
    PYTHONPATH="$ROOT/models" "$PY" "$ROOT/models/make_tiny.py" "$MODEL" --arch llama --type Q4_0 >/dev/null
    echo "   SmolLM2 is not cached here: generating with a tiny model"
fi

echo "== edgekv generate, no compiler on PATH, outside the source tree"
cd "$OUT"
# only the venv on PATH (no gcc/cc/cmake), CC pointing nowhere, nothing from the source tree
env -i HOME="$HOME" PATH="$OUT/venv/bin" CC=/nonexistent/cc LANG=C.UTF-8 \
    "$OUT/venv/bin/python" -c "
import shutil, edgekv, edgekv._native as n
assert shutil.which('gcc') is None and shutil.which('cc') is None and shutil.which('cmake') is None
assert 'site-packages' in str(n.LIB_PATH), n.LIB_PATH
print('   edgekv', edgekv.__version__, 'library', n.LIB_PATH, 'simd', n.SIMD)
"
TEXT="$(env -i HOME="$HOME" PATH="$OUT/venv/bin" CC=/nonexistent/cc LANG=C.UTF-8 \
    "$OUT/venv/bin/edgekv" generate "Hi" --max-tokens 8 --model "$MODEL")"
echo "   output: $(printf '%q' "$TEXT")"
[ -n "$TEXT" ] || { echo "no text generated"; exit 1; }
echo "wheel ok: $(basename "$WHEEL") installs in a fresh venv and generates ($(basename "$MODEL"))"
