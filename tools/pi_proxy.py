#!/usr/bin/env python3
"""Instructions per decoded token under qemu-aarch64: edgekv vs llama.cpp, a Raspberry Pi PROXY.

    PYTHON=/path/to/venv/bin/python  $PYTHON tools/pi_proxy.py            # everything: 21 min of qemu runs
                                                                          # on 2 cores, + ~8 min of builds from cold
    $PYTHON tools/pi_proxy.py --models smollm2-135m --no-long             # the short-prompt table only
    $PYTHON tools/pi_proxy.py --out benchmarks/results/pi_proxy           # writes pi_proxy.json and .md

What it measures: the guest instructions qemu-aarch64 executes (counted by our own TCG plugin,
tools/qemu_insn_count.c) while each engine decodes greedily from the same prompt, with one thread,
from the same GGUF file. Instructions per decoded token = (count of a run giving N2 tokens - count of
a run giving N1 tokens) / (N2 - N1): loading, prefill and exit cancel. It is a proxy: instructions
executed under qemu, not time. On a Pi, decode is bounded by memory bandwidth as much as by
instructions, and instruction counts ignore memory traffic, cache misses and the cost of each
instruction (a dotprod counts as one instruction, as does an add).

Builds (all cached under ~/.cache/edgekv/pi_proxy, every compile and qemu run under nice -n 19):
  * the plugin: host cc -shared -fPIC; checked on a static aarch64 loop of exactly 4 instructions
    per iteration (10^6 iterations must add exactly 4,000,000)
  * edgekv: tools/ci_native_checks.sh with EDGEKV_CI_STEPS=crossbuild (its aarch64 folder: plain
    armv8-a NEON, run as a Cortex-A72 / Pi 4; its aarch64-dotprod folder: -march=armv8.2-a+dotprod+fp16,
    run as a Cortex-A76 / Pi 5), and its C driver tests/c/run_model on dumps written by
    tools/dump_model.py (through the x86_64 build's library, as tools/e2e_tokens.py does)
  * llama.cpp: the vendor/llama.cpp of the llama-cpp-python sdist the project pins (pip download),
    cross-built static with aarch64-linux-gnu-gcc/g++, GGML_NATIVE=OFF, GGML_CPU_ARM_ARCH=armv8-a or
    armv8.2-a+dotprod+fp16 (the same -march as edgekv's two builds), GGML_OPENMP=OFF, otherwise its
    defaults; and tools/llama_decode.cpp, a small greedy driver over llama.h fed edgekv's prompt ids.

Environment: PYTHON (the interpreter with edgekv's dependencies, used for the dumps),
EDGEKV_PI_PROXY_CACHE (default ~/.cache/edgekv/pi_proxy).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("EDGEKV_PI_PROXY_CACHE", Path.home() / ".cache" / "edgekv" / "pi_proxy"))
SYSROOT = "/usr/aarch64-linux-gnu"
NICE = ["nice", "-n", "19"]
LLAMA_CPP_PYTHON = "0.3.36"  # pyproject.toml's pin
MODELS = {  # registry name -> the file registry.py downloads (resolved through edgekv.registry)
    "smollm2-135m": None,
    "qwen2.5-coder-0.5b": None,
}
SHORT_PROMPT = "The quick brown fox jumps over the lazy dog."
# ~500 tokens of plain prose for the long-context point (fixed text: the figure must be repeatable)
LONG_PARAGRAPHS = [
    "The history of the lighthouse on the northern cape begins with a wooden tower built by fishermen "
    "who had lost too many boats to the rocks below the cliffs.",
    "For forty years a lamp fed with whale oil burned at the top, tended by a keeper who lived in a "
    "stone cottage with his wife, three children, two goats and a dog that was afraid of the sea.",
    "When the wooden tower burned down in a storm, the harbour board raised money for a new one of "
    "granite, cut from a quarry inland and carried to the coast on carts pulled by oxen.",
    "The new light used a lens made of many rings of glass, which gathered the flame into a beam that "
    "sailors could see from twenty miles away on a clear night.",
    "Keepers came and went. Some wrote long letters about the weather, the birds and the passing "
    "ships; others wrote nothing at all, and their names survive only in the pay books.",
    "In the winter of the great gale the keeper's daughter rowed out alone to a schooner that had "
    "struck the outer reef, and brought back four sailors before the mast broke and the hull went down.",
    "Electric power reached the cape late, long after the towns along the river had streetlights, and "
    "for a few years the lamp ran on a diesel generator that the keeper started by hand every evening.",
    "The last keeper left when the light was automated. He took the logbooks with him, and for a long "
    "time nobody knew where they were, until his grandson gave them to the museum in the harbour town.",
    "Today the cottage is a small museum. Visitors climb the spiral stairs, one hundred and twelve "
    "steps, to stand beside the lens and look out over the water where so many ships were lost.",
    "The guides tell the story of the gale, show the oil cans and the brass tools, and point out the "
    "marks on the window frames where the keepers measured the height of the waves in bad weather.",
]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sh(cmd, cwd=None, env=None, capture=True, check=True) -> subprocess.CompletedProcess:
    p = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=capture, text=True)
    if check and p.returncode != 0:
        tail = (p.stdout or "")[-2000:] + (p.stderr or "")[-3000:]
        raise RuntimeError(f"{' '.join(map(str, cmd))} exited {p.returncode}\n{tail}")
    return p


# ------------------------------------------------------------------------------------------------
# builds
# ------------------------------------------------------------------------------------------------
def build_plugin() -> tuple[Path, dict]:
    so, src = CACHE / "qemu_insn_count.so", ROOT / "tools" / "qemu_insn_count.c"
    if not so.exists() or so.stat().st_mtime < src.stat().st_mtime:
        sh([*NICE, "cc", "-O2", "-Wall", "-Wextra", "-shared", "-fPIC", "-fvisibility=hidden", "-o", so, src])
    # check: a static aarch64 loop whose body is exactly 4 instructions (add, add, cmp, b.ne)
    loop_c, loop = CACHE / "loop4.c", CACHE / "loop4"
    loop_c.write_text(
        "int main(int argc, char **argv) {\n"
        "    long n = argc > 1 ? 1000000L * (argv[1][0] - '0') : 0, s = 0;\n"
        "    for (long i = 0; i < n; i++) __asm__ volatile(\"add %0, %0, %1\" : \"+r\"(s) : \"r\"(i));\n"
        "    return (int)(s & 1);\n}\n")
    sh([*NICE, "aarch64-linux-gnu-gcc", "-O1", "-static", "-o", loop, loop_c])
    counts = [count_insns([loop, k], "cortex-a72", CACHE / f"loop4-{k}.count")[0] for k in ("0", "1")]
    ok = counts[1] - counts[0] == 4_000_000
    log(f"plugin check: loop of 10^6 x 4 instructions adds {counts[1] - counts[0]} ({'ok' if ok else 'WRONG'})")
    if not ok:
        raise RuntimeError("the instruction-count plugin does not count the test loop exactly")
    return so, {"loop_0_iterations": counts[0], "loop_1e6_iterations": counts[1], "difference": counts[1] - counts[0],
                "expected": 4_000_000}


def build_edgekv(python: str) -> Path:
    b = CACHE / "ek"
    env = dict(os.environ, EDGEKV_CI_STEPS="crossbuild", EDGEKV_CI_BUILD=str(b), PYTHON=python)
    log("edgekv: tools/ci_native_checks.sh (EDGEKV_CI_STEPS=crossbuild)")
    sh([*NICE, "bash", ROOT / "tools" / "ci_native_checks.sh"], env=env)
    for d in ("x86_64", "aarch64", "aarch64-dotprod"):
        if not (b / d / "run_model").exists():
            raise RuntimeError(f"edgekv build {b / d} has no run_model")
    return b


LLAMA_VARIANTS = {"a72": "armv8-a", "a76": "armv8.2-a+dotprod+fp16"}


def llama_source(python: str) -> Path:
    src = CACHE / f"llama_cpp_python-{LLAMA_CPP_PYTHON}" / "vendor" / "llama.cpp"
    if (src / "CMakeLists.txt").exists():
        return src
    sdist = CACHE / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
    if not sdist.exists():
        log(f"pip download llama-cpp-python=={LLAMA_CPP_PYTHON} (sdist)")
        sh([python, "-m", "pip", "download", "--no-binary", "llama-cpp-python", "--no-deps",
            f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", CACHE])
    with tarfile.open(sdist) as t:
        prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp/"
        t.extractall(CACHE, members=[m for m in t.getmembers() if m.name.startswith(prefix)])
    return src


def build_llama(python: str) -> dict[str, Path]:
    src = llama_source(python)
    exes = {}
    for name, march in LLAMA_VARIANTS.items():
        b = CACHE / f"llama-{name}"
        exe = b / "llama_decode"
        driver = ROOT / "tools" / "llama_decode.cpp"
        lib = b / "src" / "libllama.a"
        if not lib.exists():
            log(f"llama.cpp: cross build {name} (-march={march})")
            sh([*NICE, "cmake", "-S", src, "-B", b, "-G", "Ninja",
                f"-DCMAKE_TOOLCHAIN_FILE={ROOT / 'cmake' / 'aarch64-linux-gnu.cmake'}",
                "-DCMAKE_CXX_COMPILER=aarch64-linux-gnu-g++", "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF",
                "-DGGML_NATIVE=OFF", f"-DGGML_CPU_ARM_ARCH={march}", "-DGGML_OPENMP=OFF",
                "-DLLAMA_BUILD_COMMON=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_TOOLS=OFF",
                "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_OPENSSL=OFF"])
            sh([*NICE, "cmake", "--build", b, "-j", "2", "--target", "llama"])
        if not exe.exists() or exe.stat().st_mtime < max(driver.stat().st_mtime, lib.stat().st_mtime):
            sh([*NICE, "aarch64-linux-gnu-g++", "-O2", "-std=c++17", "-static", "-pthread",
                f"-I{src / 'include'}", f"-I{src / 'ggml' / 'include'}", "-o", exe, driver,
                lib, b / "ggml/src/libggml.a", b / "ggml/src/libggml-cpu.a", b / "ggml/src/libggml-base.a", "-lm"])
        exes[name] = exe
    return exes


# ------------------------------------------------------------------------------------------------
# runs
# ------------------------------------------------------------------------------------------------
PLUGIN: Path | None = None


def count_insns(cmd, cpu: str, out: Path) -> tuple[int, int, str, str]:
    """Runs cmd under qemu-aarch64 -cpu CPU with the counting plugin: (insns, vcpus, stdout, stderr)."""
    out.unlink(missing_ok=True)
    so = PLUGIN or CACHE / "qemu_insn_count.so"
    p = sh([*NICE, "qemu-aarch64", "-cpu", cpu, "-L", SYSROOT, "-plugin", f"{so},out={out}", *cmd], check=False)
    if p.returncode not in (0, 1) or not out.exists():  # loop4 returns s & 1
        raise RuntimeError(f"qemu run failed ({p.returncode}): {' '.join(map(str, cmd))}\n{p.stderr[-3000:]}")
    m = re.match(r"insns (\d+) vcpus (\d+)", out.read_text())
    return int(m.group(1)), int(m.group(2)), p.stdout, p.stderr


def parse_tokens(stdout: str) -> list[int]:
    for line in stdout.splitlines():
        if line.startswith("tokens:"):
            return [int(t) for t in line.split()[1:]]
    return []


def make_dump(python: str, ek: Path, gguf: Path, prompt: str, tag: str) -> tuple[Path, Path, int]:
    dump, ids = CACHE / f"{tag}.ekd", CACHE / f"{tag}.ids"
    if not dump.exists() or not ids.exists() or dump.stat().st_mtime < gguf.stat().st_mtime:
        env = dict(os.environ, EDGEKV_LIB=str(ek / "x86_64" / "libedgekv.so"),
                   PYTHONPATH=f"{ROOT / 'python'}:{ROOT / 'tools'}")
        code = ("import sys; from dump_model import dump_model; "
                "info = dump_model(sys.argv[1], sys.argv[2], sys.argv[3]); "
                "open(sys.argv[4], 'w').write(' '.join(map(str, info['prompt_ids'])) + '\\n')")
        sh([*NICE, python, "-c", code, gguf, dump, prompt, ids], env=env)
    return dump, ids, len(ids.read_text().split())


def main(argv=None) -> int:
    global PLUGIN
    ap = argparse.ArgumentParser(description="instructions per decoded token under qemu: edgekv vs llama.cpp (a proxy)")
    ap.add_argument("--models", default=",".join(MODELS), help="registry names, comma separated")
    ap.add_argument("--n1", type=int, default=4, help="tokens of the shorter run")
    ap.add_argument("--n2", type=int, default=12, help="tokens of the longer run")
    ap.add_argument("--no-long", action="store_true", help="skip the ~500-token-prompt point")
    ap.add_argument("--long-model", default="smollm2-135m")
    ap.add_argument("--long-builds", default="a76", help="builds for the long-prompt point (a72,a76)")
    ap.add_argument("--jobs", type=int, default=2, help="qemu runs at once")
    ap.add_argument("--out", type=Path, help="write OUT.json and OUT.md")
    ap.add_argument("--fresh", action="store_true", help="rerun every qemu run (default: reuse a run whose "
                    "command, plugin, program and model file are unchanged, from CACHE/counts)")
    args = ap.parse_args(argv)
    python = os.environ.get("PYTHON", sys.executable)
    CACHE.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    PLUGIN, plugin_check = build_plugin()
    ek = build_edgekv(python)
    llama = build_llama(python)

    sys.path.insert(0, str(ROOT / "python"))
    os.environ["EDGEKV_LIB"] = str(ek / "x86_64" / "libedgekv.so")  # this checkout's Python on its own library
    from edgekv import registry

    builds = {"a72": ("cortex-a72", ek / "aarch64", llama["a72"]), "a76": ("cortex-a76", ek / "aarch64-dotprod", llama["a76"])}
    long_prompt = " ".join(LONG_PARAGRAPHS + LONG_PARAGRAPHS[:3])  # 500 SmolLM2 tokens
    # (model, prompt tag, build, engine, kv label, argv tail)
    cases, long_cases = [], []
    ggufs, prompt_len = {}, {}
    for model in args.models.split(","):
        gguf = Path(registry.resolve(model, progress=False))
        ggufs[model] = gguf
        prompts = [("short", SHORT_PROMPT)]
        if not args.no_long and model == args.long_model:
            prompts.append(("long", long_prompt))
        for ptag, text in prompts:
            dump, ids, n_prompt = make_dump(python, ek, gguf, text, f"{model}-{ptag}")
            prompt_len[(model, ptag)] = n_prompt
            for b, (cpu, ekb, lexe) in builds.items():
                if ptag == "long" and b not in args.long_builds.split(","):
                    continue
                ek_modes = [("fp16", ["--kv", "16", "16"])] + ([("int4", ["--kv", "4", "4"])] if ptag == "long" else [])
                ll_modes = [("f16", ["--kv", "f16"])] + ([("q4_0", ["--kv", "q4_0", "--fa", "on"])] if ptag == "long" else [])
                to = cases if ptag == "short" else long_cases
                for kv, extra in ek_modes:
                    to.append((model, ptag, b, cpu, "edgekv", kv, [ekb / "run_model", dump, "--threads", "1", "--batch", "64", *extra]))
                for kv, extra in ll_modes:
                    to.append((model, ptag, b, cpu, "llama.cpp", kv, [lexe, gguf, "--ids", ids, "--threads", "1", "--batch", "64", *extra]))
    cases += long_cases  # the slow ones last

    jobs = [(i, n) for i in range(len(cases)) for n in (args.n1, args.n2)]
    log(f"{len(jobs)} qemu runs, {args.jobs} at once")

    def run(job):
        (model, ptag, b, cpu, engine, kv, cmd), n = cases[job[0]], job[1]
        tag = f"{model}-{ptag}-{b}-{engine}-{kv}-{n}"
        command = " ".join(map(str, ["qemu-aarch64", "-cpu", cpu, "-L", SYSROOT, "-plugin",
                                     "qemu_insn_count.so,out=FILE", *cmd, "--steps", n]))
        # a run is reused (unless --fresh) when its command, plugin, program and model file are unchanged
        key = {"command": command, "plugin_sha256": hashlib.sha256(PLUGIN.read_bytes()).hexdigest(),
               "mtimes": [int(Path(f).stat().st_mtime) for f in cmd[:2]]}
        cached = CACHE / "counts" / f"{tag}.json"
        if not args.fresh and cached.exists():
            prev = json.loads(cached.read_text())
            if prev.get("key") == key:
                log(f"{tag}: {prev['insns']} insns (reused from {prev['date_utc']})")
                return job, prev
        t = time.time()
        insns, vcpus, out, err = count_insns([*cmd, "--steps", str(n)], cpu, CACHE / "counts" / f"{tag}.txt")
        toks = parse_tokens(out)
        fa = sorted({ln.strip() for ln in err.splitlines() if "flash" in ln.lower()})
        log(f"{tag}: {insns} insns, {vcpus} vcpu(s), {time.time() - t:.0f} s, tokens {toks}")
        res = {"insns": insns, "vcpus": vcpus, "tokens": toks, "seconds": round(time.time() - t, 1),
               "stderr_flash_attn": fa, "command": command, "key": key,
               "date_utc": datetime.datetime.utcnow().strftime("%Y-%m-%d %H:%M")}
        cached.write_text(json.dumps(res))
        return job, res

    (CACHE / "counts").mkdir(exist_ok=True)
    with ThreadPoolExecutor(args.jobs) as ex:
        done = dict(ex.map(run, jobs))

    rows = []
    for i, c in enumerate(cases):
        model, ptag, b, cpu, engine, kv, cmd = c
        r1, r2 = done[(i, args.n1)], done[(i, args.n2)]
        per_tok = (r2["insns"] - r1["insns"]) / (args.n2 - args.n1)
        rows.append({"model": model, "gguf": ggufs[model].name, "prompt": ptag, "prompt_tokens": prompt_len[(model, ptag)],
                     "build": b, "qemu_cpu": cpu, "engine": engine, "kv": kv, "n1": args.n1, "n2": args.n2,
                     "insns_n1": r1["insns"], "insns_n2": r2["insns"], "insns_per_token": round(per_tok),
                     "vcpus": max(r1["vcpus"], r2["vcpus"]), "tokens_n2": r2["tokens"],
                     "n1_prefix_of_n2": r2["tokens"][:args.n1] == r1["tokens"] and len(r1["tokens"]) == args.n1,
                     "flash_attn_log": r2["stderr_flash_attn"], "command_n2": r2["command"],
                     "qemu_seconds": [r1["seconds"], r2["seconds"]], "run_dates_utc": [r1["date_utc"], r2["date_utc"]]})
    ratios = []
    for r in rows:
        if r["engine"] != "edgekv":
            continue
        for o in rows:
            if (o["engine"] == "llama.cpp" and (o["model"], o["prompt"], o["build"]) == (r["model"], r["prompt"], r["build"])
                    and {"fp16": "f16", "int4": "q4_0"}[r["kv"]] == o["kv"]):
                common = next((i for i, (a, b2) in enumerate(zip(r["tokens_n2"], o["tokens_n2"])) if a != b2),
                              min(len(r["tokens_n2"]), len(o["tokens_n2"])))
                ratios.append({"model": r["model"], "prompt": r["prompt"], "prompt_tokens": r["prompt_tokens"],
                               "build": r["build"], "kv_edgekv": r["kv"], "kv_llama_cpp": o["kv"],
                               "edgekv_insns_per_token": r["insns_per_token"],
                               "llama_cpp_insns_per_token": o["insns_per_token"],
                               "ratio_edgekv_over_llama_cpp": round(r["insns_per_token"] / o["insns_per_token"], 3),
                               "greedy_tokens_agree_for": common})
    result = {
        "what": "a proxy: instructions executed under qemu, not time; on a Pi memory bandwidth bounds decode, "
                "and instruction counts ignore it",
        "method": f"guest instructions counted by tools/qemu_insn_count.c (a qemu TCG plugin) over a run giving "
                  f"{args.n2} tokens minus a run giving {args.n1}, divided by {args.n2 - args.n1}; greedy, 1 thread, "
                  "batch 64 for the prompt, same GGUF and same prompt ids for both engines",
        "command": " ".join(["tools/pi_proxy.py", *(argv if argv is not None else sys.argv[1:])]),
        "commit": sh(["git", "-C", ROOT, "rev-parse", "HEAD"]).stdout.strip(),
        "dirty": bool(sh(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no"]).stdout.strip()),
        "date_utc": datetime.datetime.utcnow().strftime("%Y-%m-%d %H:%M"),
        "machine": next((ln.split(":", 1)[1].strip() for ln in sh(["lscpu"]).stdout.splitlines()
                         if ln.startswith("Model name")), platform.processor()),
        "qemu": sh(["qemu-aarch64", "--version"]).stdout.splitlines()[0],
        "compilers": {c: sh([c, "--version"]).stdout.splitlines()[0] for c in
                      ("cc", "aarch64-linux-gnu-gcc", "aarch64-linux-gnu-g++")},
        "builds": {
            "a72": {"qemu_cpu": "cortex-a72", "edgekv": "tools/ci_native_checks.sh aarch64 folder: -DEDGEKV_ARCH=portable "
                    "-DCMAKE_BUILD_TYPE=Release (gcc's default armv8-a, NEON)",
                    "llama_cpp": "-DGGML_NATIVE=OFF -DGGML_CPU_ARM_ARCH=armv8-a -DGGML_OPENMP=OFF -DCMAKE_BUILD_TYPE=Release, static"},
            "a76": {"qemu_cpu": "cortex-a76", "edgekv": "tools/ci_native_checks.sh aarch64-dotprod folder: -DEDGEKV_ARCH=none "
                    "-DCMAKE_C_FLAGS=-march=armv8.2-a+dotprod+fp16 -DCMAKE_BUILD_TYPE=Release",
                    "llama_cpp": "-DGGML_NATIVE=OFF -DGGML_CPU_ARM_ARCH=armv8.2-a+dotprod+fp16 -DGGML_OPENMP=OFF "
                                 "-DCMAKE_BUILD_TYPE=Release, static"},
        },
        "llama_cpp": f"vendor/llama.cpp of the llama-cpp-python {LLAMA_CPP_PYTHON} sdist, driven by tools/llama_decode.cpp",
        "plugin_check": plugin_check,
        "ratios": ratios,
        "runs": rows,
        "wall_seconds": round(time.time() - t0),
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(text + "\n")
        args.out.with_suffix(".md").write_text(markdown(result))
        log(f"wrote {args.out.with_suffix('.json')} and .md")
    return 0


def markdown(r: dict) -> str:
    lines = [
        "# Pi proxy: instructions per decoded token under qemu-aarch64, edgekv vs llama.cpp",
        "",
        f"**{r['what'][0].upper() + r['what'][1:]}.** These are not measurements of a Raspberry Pi: no Pi was used.",
        "",
        f"- method: {r['method']}",
        f"- command: `{r['command']}` (commit {r['commit'][:12]}{' + uncommitted changes' if r['dirty'] else ''}, "
        f"{r['date_utc']} UTC, {r['wall_seconds']} s)",
        f"- machine: {r['machine']}; {r['qemu']}",
        f"- compilers: {'; '.join(f'{k}: {v}' for k, v in r['compilers'].items())}",
        f"- llama.cpp: {r['llama_cpp']}",
    ]
    for b, d in r["builds"].items():
        lines.append(f"- {b} (qemu -cpu {d['qemu_cpu']}): edgekv {d['edgekv']}; llama.cpp {d['llama_cpp']}")
    pc = r["plugin_check"]
    lines += [f"- plugin check: a static aarch64 loop of 10^6 iterations x 4 instructions adds {pc['difference']} "
              f"instructions (expected {pc['expected']})", "",
              "| model | prompt tokens | build | KV (edgekv / llama.cpp) | edgekv insns/token | llama.cpp insns/token "
              "| ratio edgekv / llama.cpp | greedy tokens agree for |",
              "|---|---:|---|---|---:|---:|---:|---:|"]
    for x in r["ratios"]:
        lines.append(f"| {x['model']} | {x['prompt_tokens']} | {x['build']} | {x['kv_edgekv']} / {x['kv_llama_cpp']} "
                     f"| {x['edgekv_insns_per_token'] / 1e6:.1f} M | {x['llama_cpp_insns_per_token'] / 1e6:.1f} M "
                     f"| {x['ratio_edgekv_over_llama_cpp']:.2f} | {x['greedy_tokens_agree_for']} of {r['runs'][0]['n2']} |")
    lines += ["", "Runs (tokens of the longer run; every run used one guest thread unless vcpus says otherwise):", "",
              "| model | prompt | build | engine | KV | insns (N1) | insns (N2) | vcpus | N1 tokens a prefix of N2 | tokens |",
              "|---|---|---|---|---|---:|---:|---:|---|---|"]
    for x in r["runs"]:
        lines.append(f"| {x['model']} | {x['prompt']} | {x['build']} | {x['engine']} | {x['kv']} | {x['insns_n1']} "
                     f"| {x['insns_n2']} | {x['vcpus']} | {x['n1_prefix_of_n2']} | {' '.join(map(str, x['tokens_n2']))} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
