"""What the benchmark scripts share: the HellaSwag reader, log-softmax, bootstrap intervals, and the
description of the machine (and commit and command) a result comes from.

The scripts run as ``python benchmarks/NAME.py``, so this folder is first on ``sys.path`` and they
``from common import ...``.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

REPO = Path(__file__).resolve().parents[1]

# ---- data -------------------------------------------------------------------------------------


def read_hellaswag(path: Path, n: Optional[int] = None) -> list[tuple[str, int, list[str]]]:
    """The first n tasks (all when n is None) of a llama.cpp-format HellaSwag file (6 lines a task:
    context, label, 4 endings) as (context, label, endings)."""
    lines = Path(path).read_text(encoding="utf-8").split("\n")
    tasks = []
    for i in range(0, len(lines) - 5, 6):
        if len(tasks) == n:
            break
        ctx, label, ends = lines[i].rstrip("\r"), int(lines[i + 1]), [e.rstrip("\r") for e in lines[i + 2:i + 6]]
        if not 0 <= label < 4:
            raise ValueError(f"{path}:{i + 2}: label {label} is not in 0..3")
        tasks.append((ctx, label, ends))
    return tasks


# ---- log-probabilities --------------------------------------------------------------------------


def _shifted(x) -> tuple[np.ndarray, np.ndarray]:
    """x - max and log(sum(exp(x - max))) over the last axis, float64."""
    z = np.asarray(x, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z, np.log(np.exp(z).sum(axis=-1, keepdims=True))


def log_softmax(x) -> np.ndarray:
    """log-softmax over the last axis, float64."""
    z, lse = _shifted(x)
    return z - lse


def target_log_probs(rows, targets) -> np.ndarray:
    """log p(targets[i]) under logit row rows[i], float64 (without the full log-softmax matrix)."""
    z, lse = _shifted(rows)
    return z[np.arange(len(targets)), np.asarray(targets)] - lse[:, 0]


# ---- bootstrap ----------------------------------------------------------------------------------


def bootstrap(stat: Callable[[np.ndarray], np.ndarray], n: int, resamples: int = 10000, seed: int = 0) -> np.ndarray:
    """stat over resamples of range(n) with replacement: stat takes a (k, n) index array and returns
    an array of values (one per row, or fewer when it drops some); they are concatenated. Drawn 1,000
    rows at a time (memory), the same draws as one (resamples, n) call."""
    rng = np.random.default_rng(seed)
    vals = []
    for start in range(0, resamples, 1000):
        vals.append(stat(rng.integers(0, n, size=(min(1000, resamples - start), n))))
    return np.concatenate(vals)


def ci95(samples) -> list[float]:
    """The 95% percentile interval of bootstrap samples."""
    return [float(np.percentile(samples, 2.5)), float(np.percentile(samples, 97.5))]


# ---- the machine, commit and command --------------------------------------------------------------

# Flags that decide which kernels run: ours (AVX2/FMA/F16C, AVX-512 VNNI+VBMI, AVX-VNNI; NEON dotprod
# and fp16 on aarch64) and llama.cpp's (AMX builds crash on some VMs: issue 17).
CPU_FLAGS = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512vbmi",
             "avx512_bf16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16", "asimd", "asimddp", "asimdhp", "fphp")


def _cpu() -> tuple[Optional[str], list[str]]:
    model, have = None, set()
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8", errors="replace"):
            key, _, val = line.partition(":")
            key = key.strip()
            if key == "model name" and model is None:
                model = val.strip()
            elif key in ("flags", "Features") and not have:
                have = set(val.split())
    except OSError:
        pass
    if model is None:  # aarch64 /proc/cpuinfo has no model name; lscpu does
        try:
            out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
            model = next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), None)
        except (OSError, subprocess.SubprocessError):
            pass
    return model or platform.processor() or platform.machine(), [f for f in CPU_FLAGS if f in have]


def _git(*args: str) -> Optional[str]:
    try:
        r = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def command_line(script: str, argv: Optional[Sequence[str]] = None) -> str:
    """How this run was started: ``python benchmarks/SCRIPT`` and its arguments (argv: the
    arguments main() was given, else sys.argv[1:])."""
    return " ".join(["python", f"benchmarks/{script}"] + list(sys.argv[1:] if argv is None else argv))


def machine(command: Optional[str] = None) -> dict:
    """The machine (CPU model and flags, cores, memory), the commit, the command and the libraries
    that produced a result. Keys of earlier results (cpu_model, cpu_flags, cpu_count, ...) kept."""
    model, flags = _cpu()
    info: dict = {"date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                  "cpu_model": model, "cpu_flags": flags, "cpu_count": os.cpu_count()}
    if hasattr(os, "sched_getaffinity"):
        info["cpu_affinity"] = len(os.sched_getaffinity(0))
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal"):
                info["mem_total_bytes"] = int(line.split()[1]) * 1024
    except OSError:
        pass
    info.update({"platform": platform.platform(), "python": platform.python_version(), "numpy": np.__version__})
    info["git_commit"] = _git("rev-parse", "HEAD")
    dirty = _git("status", "--porcelain", "--", "csrc", "python")
    info["git_dirty_csrc_or_python"] = None if dirty is None else bool(dirty)
    info["command"] = command
    try:
        import edgekv
        import edgekv._native as native
    except ImportError as e:
        info["edgekv"] = f"unavailable: {e}"
    else:
        lib = Path(native.LIB_PATH)
        info.update({"edgekv": edgekv.__version__, "edgekv_simd": native.SIMD, "edgekv_lib": str(lib),
                     "edgekv_lib_sha256": hashlib.sha256(lib.read_bytes()).hexdigest()})
    try:
        import llama_cpp
    except ImportError as e:
        info["llama_cpp_python"] = f"unavailable: {e}"
    else:
        info["llama_cpp_python"] = llama_cpp.__version__
        info["llama_cpp_system_info"] = llama_cpp.llama_print_system_info().decode().strip()
        # how the reference was built: tools/test.sh installs its build record next to the package
        record = Path(llama_cpp.__file__).parent / "edgekv_reference_build.json"
        try:
            info["llama_cpp_build"] = json.loads(record.read_text())
        except (OSError, ValueError):
            info["llama_cpp_build"] = "not recorded (not installed by tools/test.sh)"
    try:
        from importlib.metadata import PackageNotFoundError, version
    except ImportError:
        pass
    else:
        try:
            info["gguf"] = version("gguf")
        except PackageNotFoundError:
            info["gguf"] = None
    return info


def machine_line(info: dict) -> str:
    """machine()'s dict in one line for a report: CPU model and flags, cores, SIMD path, commit, command."""
    commit = (info.get("git_commit") or "unknown")[:12] + (" (csrc/python modified)" if info.get("git_dirty_csrc_or_python") else "")
    line = (f"{info.get('cpu_model')} ({info.get('cpu_count')} CPUs; flags {' '.join(info.get('cpu_flags') or []) or 'none listed'}), "
            f"edgekv SIMD `{info.get('edgekv_simd')}`, commit {commit}")
    build = info.get("llama_cpp_build")
    if isinstance(build, dict):
        line += f", reference llama-cpp-python {info.get('llama_cpp_python')} built with CFLAGS `{build.get('CFLAGS') or 'none'}`"
    elif build:
        line += f", reference llama-cpp-python {info.get('llama_cpp_python')} ({build})"
    return line + (f", command `{info['command']}`" if info.get("command") else "")
