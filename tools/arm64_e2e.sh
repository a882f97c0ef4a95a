#!/usr/bin/env bash
# arm64 Python end to end under qemu-user, on an x86_64 Debian/Ubuntu machine:
#
#   bash tools/arm64_e2e.sh [OUT_DIR]          (default OUT_DIR: build/arm64-e2e)
#
#   1. an arm64 Debian root (bookworm, python3 + venv) made with `debootstrap --foreign --arch=arm64`,
#      every package unpacked with dpkg-deb (debootstrap's second stage would need binfmt_misc,
#      which containers rarely allow); cached under $EDGEKV_ARM64_CACHE (~/.cache/edgekv/arm64)
#   2. a venv of that arm64 Python, with edgekv's dependencies from PyPI as arm64 wheels (cached
#      with the root). Its bin/python is a script running the arm64 interpreter under
#      `qemu-aarch64 -L <root>`, so console scripts (`edgekv`) and subprocesses work without binfmt.
#   3. the aarch64 wheel, cross-built here (gcc-aarch64-linux-gnu; EDGEKV_VARIANTS=1: neon and
#      dotprod) and tagged linux_aarch64, installed into the venv
#   4. as a Cortex-A72 (Raspberry Pi 4: the neon variant) and a Cortex-A76 (Pi 5: dotprod):
#      `edgekv info` names the variant; `edgekv generate` on SmolLM2-135M (through the registry;
#      16 tokens, greedy) must print the same text as the checkout's x86_64 build; and, on the
#      A76, tools/wheel_smoke.py (API + CLI smoke test, every variant)
#
# Exit 0: passed; 77: skipped, this machine cannot run qemu-aarch64 (the reason is printed); other:
# failed. Environment: PYTHON (the x86_64 Python with edgekv's dependencies; default python3),
# EDGEKV_ARM64_CACHE, DEBIAN_MIRROR (default http://deb.debian.org/debian).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$(mkdir -p "${1:-$ROOT/build/arm64-e2e}" && cd "${1:-$ROOT/build/arm64-e2e}" && pwd)"
PY="${PYTHON:-python3}"
CACHE="${EDGEKV_ARM64_CACHE:-$HOME/.cache/edgekv/arm64}"
RFS="$CACHE/rootfs-bookworm"
VENV="$CACHE/venv-bookworm"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
# 16 greedy tokens whose top-1/top-2 logit margins are all >= 1.7 on the x86_64 build: a last-bit
# difference between kernel builds cannot flip one ("The capital of France is" has a 0.02 near-tie
# at step 15, where the plain-C and SIMD builds part: docs/platforms.md)
PROMPT="1, 2, 3, 4, 5,"
T0=$SECONDS
cd "$ROOT"
step() { echo "== [$((SECONDS - T0)) s] $*"; }
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
apt_install() { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "$@" >/dev/null; }

# ---------------------------------------------------------------------------------------------
step "tools"
need=()
command -v qemu-aarch64 >/dev/null || need+=(qemu-user)
command -v aarch64-linux-gnu-gcc >/dev/null || need+=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross)
command -v debootstrap >/dev/null || [ -x /usr/sbin/debootstrap ] || need+=(debootstrap)
[ ${#need[@]} -eq 0 ] || apt_install "${need[@]}" || echo "apt-get install ${need[*]} failed"
PATH="$PATH:/usr/sbin"
if ! command -v qemu-aarch64 >/dev/null || ! qemu-aarch64 --version >/dev/null 2>&1; then
    echo "skipped: qemu-aarch64 is not installed, could not be installed, or does not start here"; exit 77
fi
echo "   $(qemu-aarch64 --version | head -1); $(aarch64-linux-gnu-gcc --version | head -1)"

# ---------------------------------------------------------------------------------------------
if [ ! -e "$RFS/.complete" ]; then
    step "arm64 Debian root (debootstrap, cached in $RFS)"
    rm -rf "$RFS" "$VENV"
    mkdir -p "$CACHE"
    debootstrap --foreign --arch=arm64 --variant=minbase --include=python3,python3-venv,ca-certificates \
        bookworm "$RFS" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1 || { tail -20 "$CACHE/debootstrap.log"; exit 1; }
    for deb in "$RFS"/var/cache/apt/archives/*.deb; do dpkg-deb -x "$deb" "$RFS"; done
    rm -f "$RFS"/var/cache/apt/archives/*.deb
    touch "$RFS/.complete"
fi
ARMPY="$RFS/usr/bin/python3"
ARMPY="$RFS/usr/bin/$(basename "$(readlink "$ARMPY")")"   # python3 -> python3.11

if [ ! -e "$VENV/.complete" ]; then
    step "arm64 venv (cached in $VENV)"
    rm -rf "$VENV"
    qemu-aarch64 -L "$RFS" "$ARMPY" -m venv --without-pip "$VENV"
    rm -f "$VENV"/bin/python*
    cat >"$VENV/bin/python3" <<EOF
#!/bin/sh
# the arm64 interpreter of $RFS under qemu-user; argv[0] stays this script, so sys.executable does
exec qemu-aarch64 -L "$RFS" -0 "\$0" "$ARMPY" "\$@"
EOF
    chmod +x "$VENV/bin/python3"
    ln -s python3 "$VENV/bin/python"
    # pip itself (pure Python) put in by the host's pip: ensurepip under qemu takes minutes
    SITE="$(env -u PYTHONPATH "$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')"
    "$PY" -m pip install -q --no-compile --no-deps --target "$SITE" pip
    touch "$VENV/.complete"
fi
VPY=(env -u PYTHONPATH -u PYTHONHOME "$VENV/bin/python")
echo "   $("${VPY[@]}" -c 'import platform, sys; print("Python", sys.version.split()[0], platform.machine(), sys.prefix)')"

# ---------------------------------------------------------------------------------------------
step "aarch64 wheel (cross-built, EDGEKV_VARIANTS=1)"
rm -rf "$OUT/dist"
EDGEKV_ARCH=portable EDGEKV_VARIANTS=1 EDGEKV_CMAKE_ARGS="-DCMAKE_TOOLCHAIN_FILE=$ROOT/cmake/aarch64-linux-gnu.cmake" \
    "$PY" -m pip wheel . --no-deps -w "$OUT/dist/host" -q >"$OUT/wheel-build.log" 2>&1 || { tail -30 "$OUT/wheel-build.log"; exit 1; }
PYTAG="$("${VPY[@]}" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')"
# the wheel's files do not depend on the Python version (cffi ABI mode): tag it for the arm64 Python
WHEEL="$("$PY" - "$OUT/dist/host"/edgekv-*.whl "$OUT/dist" "$PYTAG-$PYTAG-linux_aarch64" <<'EOF'
import base64, hashlib, re, sys, zipfile
from pathlib import Path
src, out, tag = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
name, version = src.name.split("-")[:2]
dst = out / f"{name}-{version}-{tag}.whl"
zin = zipfile.ZipFile(src)
files, libs = {}, []
for item in zin.infolist():
    data = zin.read(item)
    if item.filename.endswith(".dist-info/WHEEL"):
        data = re.sub(rb"(?m)^Tag: .*\n", b"", data).rstrip(b"\n") + f"\nTag: {tag}\n".encode()
    if re.search(r"/libedgekv-[a-z0-9]+\.so$", item.filename):
        assert data[:4] == b"\x7fELF" and int.from_bytes(data[18:20], "little") == 183, f"{item.filename} is not AArch64"
        libs.append(item.filename.rsplit("/", 1)[1])
    files[item.filename] = data
assert {"libedgekv-neon.so", "libedgekv-dotprod.so"} <= set(libs), libs
record = next(f for f in files if f.endswith(".dist-info/RECORD"))
rows = []
for f, data in files.items():
    if f == record:
        rows.append(f"{f},,")
    else:
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        rows.append(f"{f},sha256={digest},{len(data)}")
files[record] = ("\n".join(rows) + "\n").encode()
meta = files[next(f for f in files if f.endswith(".dist-info/METADATA"))].decode()
(out / "requires.txt").write_text("".join(l + "\n" for l in meta.splitlines()
                                          if l.startswith("Requires-Dist:") and "extra ==" not in l))
with zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zout:
    for f, data in files.items():
        zout.writestr(f, data)
print(dst)
EOF
)"
echo "   $(basename "$WHEEL") ($(du -k "$WHEEL" | cut -f1) KiB)"

# pip under qemu is slow: the dependencies are installed once per requirement list (and no .pyc
# compiled ahead), later runs reinstall only edgekv
REQ_SUM="$(sha256sum "$OUT/dist/requires.txt" | cut -c1-16)"
if [ "$(cat "$VENV/.deps-ok" 2>/dev/null)" = "$REQ_SUM" ]; then
    step "install into the arm64 venv (dependencies cached)"
    "${VPY[@]}" -m pip install -q --no-compile --no-deps --force-reinstall "$WHEEL" 2>&1 | grep -v "^WARNING: Location" || true
else
    step "install into the arm64 venv (dependencies from PyPI: arm64 wheels)"
    "${VPY[@]}" -m pip uninstall -q -y edgekv >/dev/null 2>&1 || true
    "${VPY[@]}" -m pip install -q --no-compile --only-binary=:all: "$WHEEL" 2>&1 | grep -v "^WARNING: Location" || true
    rm -f "$VENV/.deps-ok"
fi
FILES="$("${VPY[@]}" -m pip show -f edgekv)"
[[ "$FILES" == *"edgekv/libedgekv-dotprod.so"* ]] || { echo "the wheel did not install: $FILES"; exit 1; }
[ -e "$VENV/.deps-ok" ] || { "${VPY[@]}" -m pip check && echo "$REQ_SUM" >"$VENV/.deps-ok"; }

# ---------------------------------------------------------------------------------------------
step "x86_64 reference: the checkout's build"
MODEL="$(PYTHONPATH="$ROOT/python" "$PY" -c "import edgekv; print(edgekv.registry.resolve('smollm2-135m', progress=False))")"
REFLIB="$ROOT/build/libedgekv.so"
if [ ! -f "$REFLIB" ]; then
    cmake -S "$ROOT" -B "$OUT/ref-build" -DCMAKE_BUILD_TYPE=Release -DEDGEKV_BUILD_TESTS=OFF >/dev/null
    cmake --build "$OUT/ref-build" >/dev/null
    REFLIB="$OUT/ref-build/libedgekv.so"
fi
GEN=(generate "$PROMPT" --model smollm2-135m --max-tokens 16 --temperature 0 --threads 2)
REF="$(EDGEKV_LIB="$REFLIB" PYTHONPATH="$ROOT/python" "$PY" -m edgekv "${GEN[@]}" 2>/dev/null)"
echo "   x86_64 ($(basename "$REFLIB")): $(printf '%q' "$REF")"
[ -n "$REF" ] || { echo "the x86_64 build generated no text"; exit 1; }

# the arm64 runs: outside the source tree, the registry's cache is the host's (the file is not copied)
ARM=(env -u PYTHONPATH -u EDGEKV_LIB -u EDGEKV_VARIANT EDGEKV_CACHE="$(dirname "$MODEL")" LANG=C.UTF-8)
cd "$OUT"
fail=0
for cpu in cortex-a72:neon cortex-a76:dotprod; do
    QCPU="${cpu%%:*}"; EXPECT="${cpu#*:}"
    step "arm64 Python as $QCPU: edgekv info, edgekv generate (16 greedy tokens)"
    KERN="$("${ARM[@]}" QEMU_CPU="$QCPU" "$VENV/bin/edgekv" info --model smollm2-135m | grep -E "^(SIMD|kernels) ")"
    echo "$KERN" | sed 's/^/   /'
    [[ "$KERN" == *"kernels "*" $EXPECT variant "* ]] || { echo "   expected the $EXPECT variant on $QCPU"; fail=1; }
    t=$SECONDS
    TEXT="$("${ARM[@]}" QEMU_CPU="$QCPU" "$VENV/bin/edgekv" "${GEN[@]}" 2>"$OUT/generate-$QCPU.err")" || {
        tail -5 "$OUT/generate-$QCPU.err"; fail=1; }
    echo "   aarch64 $QCPU ($((SECONDS - t)) s): $(printf '%q' "$TEXT")   [$(tail -1 "$OUT/generate-$QCPU.err")]"
    [ "$TEXT" = "$REF" ] && echo "   same text as x86_64" || { echo "   DIFFERS from x86_64"; fail=1; }
done

step "tools/wheel_smoke.py (arm64 Python as cortex-a76: both variants)"
"${ARM[@]}" QEMU_CPU=cortex-a76 "$VENV/bin/python" "$ROOT/tools/wheel_smoke.py" || fail=1

step "done"
[ $fail -eq 0 ] || { echo "arm64 e2e FAILED"; exit 1; }
echo "arm64 e2e ok: $(basename "$WHEEL") in an arm64 venv under qemu; cortex-a72 (neon) and cortex-a76 (dotprod)" \
     "print x86_64's 16 greedy tokens; wheel_smoke passed ($((SECONDS - T0)) s)"
