#!/usr/bin/env python3
"""Reference values for the GGUF dequantizers, from the `gguf` PyPI package (llama.cpp's own Python
implementation: `gguf.quants.dequantize`), written to crates/longattn/tests/data/gguf_reference.json.

Two parts:
- "synthetic": for each type, one or two blocks of seeded random bytes (the f16/f32 scale fields set to
  finite random values) and the f32 values gguf.quants.dequantize gives for them (hex of the f32 bits).
  Needs no model file; the Rust test runs it always.
- "real": for a few tensors of each type in the two real GGUF files (when present), per selected row:
  the f64 sum and sum of squares of the dequantized row and 8 values at fixed positions. Statistics
  rather than whole rows, so that no weights are committed. The Rust test checks them when the files
  are in the cache.

Usage: pip install gguf numpy; python3 scripts/gguf_reference.py   (LONGATTN_CACHE as for the fetch)
"""
import json
import os
import struct
import sys

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader
from gguf.quants import dequantize

OUT = os.path.join(os.path.dirname(__file__), "..", "crates", "longattn", "tests", "data",
                   "gguf_reference.json")
CACHE = os.environ.get("LONGATTN_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "longattn"))
FILES = {
    "smollm2": os.path.join(CACHE, "smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "gemma3": os.path.join(CACHE, "gemma3", "gemma-3-270m-q4_k_m.gguf"),
}

# (type, block elements, block bytes, byte offsets of f16 scale fields)
BLOCKS = [
    (T.Q4_0, 32, 18, [0]),
    (T.Q4_1, 32, 20, [0, 2]),
    (T.Q5_0, 32, 22, [0]),
    (T.Q5_1, 32, 24, [0, 2]),
    (T.Q8_0, 32, 34, [0]),
    (T.Q2_K, 256, 84, [80, 82]),
    (T.Q3_K, 256, 110, [108]),
    (T.Q4_K, 256, 144, [0, 2]),
    (T.Q5_K, 256, 176, [0, 2]),
    (T.Q6_K, 256, 210, [208]),
]


def f32_hex(a):
    return np.asarray(a, dtype="<f4").tobytes().hex()


def synthetic(rng):
    out = []
    for ty, be, bb, f16_at in BLOCKS:
        n_blocks = 2 if be == 32 else 1
        raw = bytearray(rng.integers(0, 256, size=n_blocks * bb, dtype=np.uint8).tobytes())
        for blk in range(n_blocks):
            for at in f16_at:
                v = np.float16(rng.normal() * 0.05)
                raw[blk * bb + at: blk * bb + at + 2] = v.tobytes()
        y = dequantize(np.frombuffer(bytes(raw), dtype=np.uint8), ty).reshape(-1)
        assert y.size == n_blocks * be and np.all(np.isfinite(y))
        out.append({"type": ty.name, "bytes": bytes(raw).hex(), "values": f32_hex(y)})
    # Plain float types: random values, the f32 they convert to.
    x = rng.normal(size=16).astype(np.float32) * 3
    for name, dt in [("F16", "<f2"), ("F32", "<f4")]:
        raw = x.astype(dt).tobytes()
        y = np.frombuffer(raw, dtype=dt).astype(np.float32)
        out.append({"type": name, "bytes": raw.hex(), "values": f32_hex(y)})
    bf = (x.view(np.uint32) >> 16).astype("<u2")  # bf16 = top 16 bits (truncation; exact below)
    y = dequantize(np.frombuffer(bf.tobytes(), dtype=np.uint8), T.BF16).reshape(-1)
    out.append({"type": "BF16", "bytes": bf.tobytes().hex(), "values": f32_hex(y)})
    return out


def real(name, path):
    r = GGUFReader(path)
    by_type = {}
    for t in r.tensors:
        by_type.setdefault(t.tensor_type.name, []).append(t)
    tensors = []
    for ty, ts in sorted(by_type.items()):
        # The first and the last tensor of each type (the last is often in a deep layer).
        for t in {ts[0].name: ts[0], ts[-1].name: ts[-1]}.values():
            dims = [int(d) for d in t.shape]
            row_len = dims[0]
            n_rows = int(np.prod(dims[1:])) if len(dims) > 1 else 1
            y = dequantize(t.data, t.tensor_type).reshape(n_rows, row_len).astype(np.float64)
            rows = sorted({0, n_rows // 2, n_rows - 1})
            pos = [int(p) for p in np.linspace(0, row_len - 1, 8).round()]
            tensors.append({
                "name": t.name, "type": ty, "dims": dims,
                "rows": [{"row": ri, "sum": float(y[ri].sum()), "sumsq": float((y[ri] ** 2).sum()),
                          "positions": pos, "values": f32_hex(y[ri, pos])} for ri in rows],
            })
    return {"file": name, "architecture": str(r.fields["general.architecture"].contents()),
            "n_tensors": len(r.tensors), "tensors": tensors}


def main():
    rng = np.random.default_rng(20261122)
    from importlib.metadata import version
    doc = {"generated_by": f"scripts/gguf_reference.py, gguf {version('gguf')}, numpy {np.__version__}",
           "synthetic": synthetic(rng), "real": []}
    for name, path in FILES.items():
        if os.path.exists(path):
            doc["real"].append(real(name, path))
        else:
            print(f"skipping {name}: {path} absent", file=sys.stderr)
    with open(OUT, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    print(f"wrote {OUT} ({os.path.getsize(OUT)} bytes)")


if __name__ == "__main__":
    main()
