"""`longattn run` on both backends: the CUDA route of the CLI (the library's one entry point) must
agree with the CPU route on the same file, forward and backward, for expression masks, documents and
an explicit block mask. Needs torch (any device) and a built `longattn` binary; run on a GPU machine:

    python3 scripts/gpu/cli_backend_check.py --bin target/release/longattn --dir /tmp/clicheck
"""
import argparse
import json
import os
import struct
import subprocess
import sys

import torch

p = argparse.ArgumentParser()
p.add_argument("--bin", required=True)
p.add_argument("--dir", default="/tmp/longattn-cli-check")
args = p.parse_args()
os.makedirs(args.dir, exist_ok=True)

DT = {torch.bfloat16: "BF16", torch.float32: "F32", torch.int32: "I32", torch.uint8: "U8"}
RT = {v: k for k, v in DT.items()}


def save(path, tensors):
    """A minimal safetensors writer (header JSON + raw little-endian bytes)."""
    header, blobs, off = {}, [], 0
    for name, t in tensors.items():
        t = t.contiguous().cpu()
        raw = t.view(torch.uint8).numpy().tobytes() if t.dtype != torch.uint8 else t.numpy().tobytes()
        header[name] = {"dtype": DT[t.dtype], "shape": list(t.shape), "data_offsets": [off, off + len(raw)]}
        blobs.append(raw)
        off += len(raw)
    h = json.dumps(header).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def load(path):
    data = open(path, "rb").read()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    out = {}
    for name, m in header.items():
        if name == "__metadata__":
            continue
        a, b = m["data_offsets"]
        buf = bytearray(data[8 + n + a : 8 + n + b])
        out[name] = torch.frombuffer(buf, dtype=RT[m["dtype"]]).reshape(m["shape"]).float()
    return out


g = torch.Generator().manual_seed(7)
B, SQ, SK, HQ, HK, D = 2, 1000, 1000, 4, 2, 64


def rnd(*s):
    return torch.randn(*s, generator=g).to(torch.bfloat16)


base = {"q": rnd(B, SQ, HQ, D), "k": rnd(B, SK, HK, D), "v": rnd(B, SK, HK, D), "do": rnd(B, SQ, HQ, D)}
docs = torch.tensor([0] * 300 + [1] * 450 + [2] * 250, dtype=torch.int32).repeat(B, 1)
table = (torch.rand(1, HQ, (SQ + 63) // 64, (SK + 63) // 64, generator=g) < 0.4).to(torch.uint8)
cases = [
    ("causal", {}, ["--mask", "causal"]),
    ("window", {}, ["--mask", "causal & window(300,7)"]),
    ("sinks|window", {}, ["--mask", "causal & (sinks(4) | window(128,0))"]),
    ("documents", {"q_doc": docs, "k_doc": docs}, ["--mask", "causal & document"]),
    ("block_mask", {"block_mask": table}, ["--block-tile", "64"]),
]
fails = 0
for name, extra, flags in cases:
    inp = os.path.join(args.dir, f"in_{len(extra)}_{name.replace('|', '_')}.safetensors")
    save(inp, {**base, **extra})
    outs = {}
    for be in ("cpu", "cuda"):
        out = os.path.join(args.dir, f"out_{be}.safetensors")
        cmd = [args.bin, "run", "--input", inp, "--output", out, "--force", "--backward", "--backend", be] + flags
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            print(f"FAIL {name} {be}: {r.stderr.strip()[:400]}")
            fails += 1
            break
        outs[be] = load(out)
    if len(outs) < 2:
        continue
    worst = {}
    for key in ("out", "lse", "dq", "dk", "dv"):
        a, b = outs["cpu"][key], outs["cuda"][key]
        fin = torch.isfinite(a)
        same_inf = torch.equal(fin, torch.isfinite(b))
        err = ((a[fin] - b[fin]).abs().max() / a[fin].abs().max().clamp_min(1e-6)).item() if fin.any() else 0.0
        worst[key] = err
        if not same_inf or err > (2e-2 if key != "lse" else 1e-3):
            fails += 1
            print(f"FAIL {name} {key}: rel err {err:.2e} (non-finite pattern equal: {same_inf})")
    print(f"{name}: cpu vs cuda " + " ".join(f"{k} {v:.1e}" for k, v in worst.items()), flush=True)

# Linear attention: `run --linear simple_gla --backward` on both backends (the CUDA core through
# the same entry point), GQA, per-token log decay, an initial state.
T, H, HK, K = 1000, 4, 2, 64
lin = {"q": rnd(1, T, H, K), "k": rnd(1, T, HK, K), "v": rnd(1, T, HK, K), "do": rnd(1, T, H, K),
       "g": -torch.rand(1, T, H, generator=g) * 0.2, "initial_state": torch.randn(1, H, K, K, generator=g)}
inp = os.path.join(args.dir, "in_linear.safetensors")
save(inp, lin)
outs = {}
for be in ("cpu", "cuda"):
    out = os.path.join(args.dir, f"out_linear_{be}.safetensors")
    r = subprocess.run([args.bin, "run", "--linear", "simple_gla", "--input", inp, "--output", out,
                        "--force", "--backward", "--backend", be], capture_output=True, text=True)
    if r.returncode != 0:
        print(f"FAIL linear {be}: {r.stderr.strip()[:400]}")
        fails += 1
        break
    outs[be] = load(out)
if len(outs) == 2:
    errs = {}
    for key in ("out", "state", "dq", "dk", "dv", "dg", "d_initial_state"):
        a, b = outs["cpu"][key], outs["cuda"][key]
        errs[key] = ((a - b).abs().max() / a.abs().max().clamp_min(1e-6)).item()
        if errs[key] > 3e-2:
            fails += 1
            print(f"FAIL linear {key}: rel err {errs[key]:.2e}")
    print("linear simple_gla: cpu vs cuda " + " ".join(f"{k} {v:.1e}" for k, v in errs.items()), flush=True)
# Dynamic sparse prefill: `run --sparse vertical_slash(...)` on both backends. The CPU selects at
# the spec's 128 x 128 blocks, the GPU at its D 128 kernel's tiles (128 x 128 from 2k keys): the
# same tiles, so the selections must agree (f64 vs f32 masses; random inputs have no near-ties at
# the cut) and the outputs with them.
S2 = 3000
sp = {"q": rnd(1, S2, 4, 128), "k": rnd(1, S2, 2, 128), "v": rnd(1, S2, 2, 128)}
inp = os.path.join(args.dir, "in_sparse.safetensors")
save(inp, sp)
outs = {}
for be in ("cpu", "cuda"):
    out = os.path.join(args.dir, f"out_sparse_{be}.safetensors")
    r = subprocess.run([args.bin, "run", "--sparse", "vertical_slash(v=16,s=8,block=128,dense_below=0)",
                        "--mask", "causal", "--input", inp, "--output", out, "--force", "--backend", be],
                       capture_output=True, text=True)
    if r.returncode != 0:
        print(f"FAIL sparse {be}: {r.stderr.strip()[:400]}")
        fails += 1
        break
    print(f"sparse {be}: {r.stderr.strip()[:300]}")
    outs[be] = load(out)
if len(outs) == 2:
    a, b = outs["cpu"], outs["cuda"]
    tiles = (a["block_tile_q"].item(), a["block_tile_k"].item(), b["block_tile_q"].item(), b["block_tile_k"].item())
    differ = (a["block_mask"] != b["block_mask"]).sum().item() if a["block_mask"].shape == b["block_mask"].shape else -1
    err = ((a["out"] - b["out"]).abs().max() / a["out"].abs().max()).item()
    print(f"sparse vertical_slash: tiles cpu {tiles[:2]} cuda {tiles[2:]}, block_mask tiles differing {differ}, out rel err {err:.1e}")
    if differ != 0 or err > 2e-2:
        fails += 1
        print("FAIL sparse: selections or outputs differ")
print(f"cli backend check: {len(cases) + 2} cases, {fails} failures")
sys.exit(1 if fails else 0)
