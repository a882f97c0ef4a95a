"""Squared error of the KV record encoders: min/max grid against the fitted grid
(EK_RT_FIT, csrc/kv_quant.c), on Gaussian records, through the library's own round trip
(ek_kv_quant_roundtrip, plain-C dequantization).

    python benchmarks/kv_fit_mse.py [--records 4000]
writes benchmarks/results/kv_fit_mse.md and .json (the source of docs/kv-cache.md's
"less squared error" figures).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from common import command_line, machine, machine_line

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
if str(REPO / "python") not in sys.path:
    sys.path.insert(0, str(REPO / "python"))

HEAD_DIM = 64


def squared_error(lib, ffi, x: np.ndarray, bits: int, group: int, impl: int) -> float:
    y = np.empty_like(x)
    err = 0.0
    for row, out in zip(x, y):
        rc = lib.ek_kv_quant_roundtrip(bits, ffi.from_buffer("float[]", row), row.size, group,
                                       ffi.from_buffer("float[]", out), impl)
        if rc != 0:
            raise RuntimeError(f"ek_kv_quant_roundtrip({bits} bits, group {group}) returned {rc}")
    return float(np.mean((y - x) ** 2))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=4000, help="Gaussian records of head_dim 64 per precision")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)

    import edgekv._native as native
    from edgekv.model import DEFAULT_KV_GROUPS

    lib, ffi = native.lib, native.ffi
    group_of = {8: DEFAULT_KV_GROUPS[0], 4: DEFAULT_KV_GROUPS[1], 3: DEFAULT_KV_GROUPS[1], 2: DEFAULT_KV_GROUPS[2]}
    x = np.random.default_rng(0).standard_normal((args.records, HEAD_DIM)).astype(np.float32)
    rows = []
    for bits in (8, 4, 3, 2):
        g = group_of[bits]
        minmax = squared_error(lib, ffi, x, bits, g, 0)
        fitted = squared_error(lib, ffi, x, bits, g, lib.EK_RT_FIT)
        rows.append({"bits": bits, "group": g, "mse_minmax": minmax, "mse_fitted": fitted,
                     "reduction": 1.0 - fitted / minmax})
    info = machine(command_line("kv_fit_mse.py", argv))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "kv_fit_mse.json").write_text(json.dumps({"machine": info, "records": args.records,
                                                         "head_dim": HEAD_DIM, "rows": rows}, indent=2) + "\n")
    lines = ["# KV grid fitting: squared error on Gaussian records", "",
             f"{args.records} records of {HEAD_DIM} standard-normal values (seed 0), encoded and decoded by "
             "`ek_kv_quant_roundtrip` (plain-C decode), min/max grid against the fitted grid (`EK_RT_FIT`).", "",
             "| bits | group | MSE min/max | MSE fitted | less squared error |", "|---|---|---|---|---|"]
    lines += [f"| {r['bits']} | {r['group']} | {r['mse_minmax']:.3e} | {r['mse_fitted']:.3e} | {100 * r['reduction']:.1f}% |"
              for r in rows]
    lines += ["", f"Machine: {machine_line(info)}", ""]
    (args.out / "kv_fit_mse.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
