#!/usr/bin/env python3
"""Dump a GGUF model into the flat format tests/c/run_model.c reads (no Python needed there).

The tensors come from edgekv's own loader (python/edgekv/gguf_loader.py), converted exactly as
``edgekv.Model`` would hand them to the C core, and the KV layout (quantization groups, rotation,
key centering) is the one ``edgekv.Model`` picks, so the C driver and the Python API run the same
computation.

    python tools/dump_model.py tiny.gguf tiny.ekd --prompt "The quick brown fox"

Format (little-endian; 64-byte aligned tensor data):
    b"EKDUMP02"
    int32 x 19: n_vocab n_embd n_layer n_head n_head_kv head_dim n_ff rope_dim rope_neox
                has_qkv_bias kv_group8 kv_group4 kv_group2 kv_flags (ek_kv_configure's flags)
                has_qk_norm ffn_geglu has_post_norms swa_window swa_period
    float32 x 5: rope_base norm_eps embd_scale attn_scale rope_base_swa
    (RoPE factors, rope_freqs, travel as a tensor: EK_T_ROPE_FREQS)
    int32 x 3: n_tensors n_prompt n_eot
    n_tensors x (int32 kind, layer, type, pad; int64 n_in, n_out, n_bytes, offset)
    int32 x n_prompt: the prompt's token ids;  int32 x n_eot: end-of-generation ids
    tensor bytes
"""

from __future__ import annotations

import argparse
import struct
import sys
import warnings
from pathlib import Path

MAGIC = b"EKDUMP02"
ALIGN = 64


def dump_model(gguf_path, out_path, prompt: str = "The quick brown fox jumps over the lazy dog.") -> dict:
    """Write the dump; returns a description (prompt ids, eot ids, config) for the caller's checks."""
    import edgekv
    from edgekv.gguf_loader import load_gguf

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with edgekv.Model(gguf_path, threads=1, ctx=16) as m:  # the KV layout edgekv picks
            groups = m.kv_groups or (0, 0, 0)
            from edgekv._native import lib

            flags = (lib.EK_KV_ROTATE if m.kv_rotate else 0) | (lib.EK_KV_CENTER_KEYS if m.kv_center_keys else 0)
            prompt_ids = m.tokenize(prompt)
            eot = sorted(m.tokenizer.eot_ids)
    g = load_gguf(gguf_path)
    hp = g.hparams
    if groups == (0, 0, 0):  # head_dim with no valid quantization group: keep the C defaults
        groups = (32, 32, 32)
    ints = [hp["n_vocab"], hp["n_embd"], hp["n_layer"], hp["n_head"], hp["n_head_kv"], hp["head_dim"], hp["n_ff"],
            hp["rope_dim"], int(g.spec.rope_neox), int(g.spec.qkv_bias), *groups, flags,
            int(g.spec.qk_norm), int(g.spec.geglu), int(g.spec.post_norms), hp["swa_window"], hp["swa_period"]]
    floats = [hp["rope_base"], hp["norm_eps"], hp["n_embd"] ** 0.5 if g.spec.embd_scale else 0.0, hp["attn_scale"],
              hp["rope_base_swa"]]  # as edgekv.Model sets them (model.py)
    header = MAGIC + struct.pack("<19i", *ints) + struct.pack("<5f", *floats)
    header += struct.pack("<3i", len(g.weights), len(prompt_ids), len(eot))
    table_len = len(g.weights) * 48 + 4 * (len(prompt_ids) + len(eot))
    offset = -(-(len(header) + table_len) // ALIGN) * ALIGN
    recs, blobs = [], []
    for w in g.weights:
        data = w.materialize().tobytes()  # converts a Q4_K/Q5_0/Q6_K matrix now
        recs.append(struct.pack("<4i4q", w.kind, w.layer, w.type, 0, w.n_in, w.n_out, len(data), offset))
        pad = -len(data) % ALIGN
        blobs.append(data + b"\0" * pad)
        offset += len(data) + pad
    body = header + b"".join(recs) + struct.pack(f"<{len(prompt_ids)}i", *prompt_ids)
    body += struct.pack(f"<{len(eot)}i", *eot)
    body += b"\0" * (-len(body) % ALIGN)
    out = Path(out_path)
    out.write_bytes(body + b"".join(blobs))
    return {"prompt_ids": list(prompt_ids), "eot": eot, "kv_groups": tuple(groups), "kv_flags": flags,
            "n_tensors": len(g.weights), "bytes": out.stat().st_size}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("gguf")
    ap.add_argument("output")
    ap.add_argument("--prompt", default="The quick brown fox jumps over the lazy dog.")
    args = ap.parse_args(argv)
    info = dump_model(args.gguf, args.output, args.prompt)
    print(f"{args.output}: {info['n_tensors']} tensors, {len(info['prompt_ids'])} prompt tokens, {info['bytes']} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
