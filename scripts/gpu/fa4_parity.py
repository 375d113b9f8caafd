"""Ours against FlashAttention-4 in one process, both timed by `triton.testing.do_bench` (issue 14).

    python3 scripts/gpu/fa4_parity.py [--lens 4k,16k] [--dims 64,128] [--masks full,causal]
                                      [--passes fwd,bwd] [--rounds 3] [--clocks]

Ours is the Python package's `longattn.flash_attn_func` on PyTorch's stream, FA4 is
`flash_attn.cute.flash_attn_func`; both take the same bf16 tensors [B, S, H, D] (uniform in
[-1, 1), 16k tokens per config, model dim 2048: B = 16k / n, H = 2048 / D, as `longattn bench
--backend cuda`). The two are timed in turn, `--rounds` times each (ours, FA4, ours, FA4, ...),
with the same flush, warm-up and repetitions; the report gives each side's TFLOP/s (mean of its
rounds) and ours / FA4. The backward is timed as the peers' script times it: `out.backward(dO)`
alone on a kept graph, gradients set to None before every run. This separates the kernels from
the harness: `longattn bench` times ours from Rust and the peers from Python. `--clocks` samples
nvidia-smi's SM clock and power during each side's timings and reports their medians (the power
reading is nvidia-smi's running average, slower than a phase of ~0.2 s: read the clock).
On the device: `bash scripts/gpu/dense_check.sh parity`.
"""

import argparse
import math
import os
import statistics
import subprocess
import sys
import time
from datetime import datetime

import torch

import longattn
from flash_attn.cute import flash_attn_func as fa4

# The peers' timing (`longattn bench --backend cuda`'s script), so both harnesses time alike.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "crates", "longattn-cli", "src"))
from peer_torch_cuda import time_pass  # noqa: E402


def tokens(s):
    return int(s[:-1]) * 1024 if s.endswith("k") else int(s)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--lens", default="4k,16k")
    p.add_argument("--dims", default="64,128")
    p.add_argument("--masks", default="full,causal")
    p.add_argument("--passes", default="fwd,bwd")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--clocks", action="store_true",
                   help="sample nvidia-smi's SM clock and power every 20 ms; report each side's medians")
    a = p.parse_args()
    spans, smi = [], None
    if a.clocks:
        smi = subprocess.Popen(["nvidia-smi", "--query-gpu=timestamp,clocks.sm,power.draw", "--format=csv,noheader,nounits",
                                "-lms", "20"], stdout=subprocess.PIPE, text=True)

    def phase(who, cfg, fn):
        t0 = time.time()
        r = fn()
        spans.append((who, cfg, t0, time.time()))
        return r

    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}")
    print("| pass | mask | n | D | B x H | ours TFLOP/s (rounds) | FA4 TFLOP/s (rounds) | ours / FA4 |")
    print("|---|---|---|---|---|---|---|---|")
    ratios = {}
    for ps in a.passes.split(","):
        backward = ps == "bwd"
        for mask in a.masks.split(","):
            for n in map(tokens, a.lens.split(",")):
                for d in map(int, a.dims.split(",")):
                    b, h = max(1, 16384 // n), 2048 // d
                    causal = mask == "causal"
                    g = torch.Generator(device="cuda").manual_seed(n + d)
                    q, k, v = ((torch.rand(b, n, h, d, generator=g, device="cuda") * 2 - 1).to(torch.bfloat16)
                               for _ in range(3))
                    flops = 4.0 * b * h * n * n * d * (0.5 if causal else 1.0) * (2.5 if backward else 1.0)
                    ours_fn = lambda: longattn.flash_attn_func(q, k, v, causal=causal)  # noqa: E731
                    fa4_fn = lambda: fa4(q, k, v, causal=causal)[0]  # noqa: E731
                    ours, theirs = [], []
                    for _ in range(a.rounds):
                        cfg = f"{ps}:{mask}:{n // 1024}k:{d}"
                        ours.append(flops / phase("ours", cfg, lambda: time_pass(ours_fn, [q, k, v], backward)) / 1e9)
                        theirs.append(flops / phase("fa4", cfg, lambda: time_pass(fa4_fn, [q, k, v], backward)) / 1e9)
                    mo, mt = sum(ours) / len(ours), sum(theirs) / len(theirs)
                    ratios[(ps, mask, n, d)] = mo / mt
                    fo = " ".join(f"{x:.0f}" for x in ours)
                    ft = " ".join(f"{x:.0f}" for x in theirs)
                    print(f"| {ps} | {mask} | {n // 1024}k | {d} | {b}x{h} | {mo:.0f} ({fo}) | {mt:.0f} ({ft}) | {mo / mt:.3f} |",
                          flush=True)
                    del q, k, v
                    torch.cuda.empty_cache()
    if smi:
        smi.terminate()
        samples = []
        for line in smi.stdout.read().splitlines():
            f = [x.strip() for x in line.split(",")]
            try:
                samples.append((datetime.strptime(f[0], "%Y/%m/%d %H:%M:%S.%f").timestamp(), float(f[1]), float(f[2])))
            except (ValueError, IndexError):
                pass
        print("| config | side | samples | SM clock MHz (median) | power W (median) |")
        print("|---|---|---|---|---|")
        for cfg in dict.fromkeys(c for _, c, _, _ in spans):
            for who in ("ours", "fa4"):
                s = [x for w, c, t0, t1 in spans if (w, c) == (who, cfg) for x in samples if t0 <= x[0] <= t1]
                # Loaded samples only (a first call's compile leaves the device idle).
                s = [x for x in s if x[2] >= max(y[2] for y in s) / 2] if s else s
                if s:
                    print(f"| {cfg} | {who} | {len(s)} | {statistics.median(x[1] for x in s):.0f} | "
                          f"{statistics.median(x[2] for x in s):.0f} |")
    for ps in a.passes.split(","):
        r = [v for key, v in ratios.items() if key[0] == ps]
        if r:
            gm = math.exp(sum(map(math.log, r)) / len(r))
            print(f"{ps}: geometric mean ours / FA4 {gm:.3f}, lowest {min(r):.3f} over {len(r)} configs")


if __name__ == "__main__":
    main()
