"""FlashAttention-4's forward under sustained load (issue 14: the forward at 64k against 16k).

    python3 scripts/gpu/fa4_sustained.py MASK N D SECONDS

Runs FA4's forward back to back for SECONDS (16k tokens per config and model dim 2048, as the
bench: B = 16k / N, H = 2048 / D) and prints its useful TFLOP/s over each half second, timed with
CUDA events, so that a clock the power cap lowers shows as a falling rate.
"""

import sys
import time

import torch
from fa4_bwd import tokens  # this folder: run as a script, its folder is on the path
from flash_attn.cute import flash_attn_func


def main():
    mask, n, d, secs = sys.argv[1], tokens(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    b, h = max(1, 16384 // n), 2048 // d
    causal = mask == "causal"
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    # Useful FLOPs: 4 n^2 D per (batch, head), half of it under the causal mask.
    flops = 4 * b * h * n * n * d * (0.5 if causal else 1.0)
    for _ in range(2):
        flash_attn_func(q, k, v, causal=causal)
    torch.cuda.synchronize()
    rates, t_end = [], time.time() + secs
    while time.time() < t_end:
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        launches, t_win = 0, time.time() + 0.5
        while time.time() < t_win or launches == 0:
            flash_attn_func(q, k, v, causal=causal)
            launches += 1
            if launches % 4 == 0:
                stop.record()
                stop.synchronize()
        stop.record()
        stop.synchronize()
        ms = start.elapsed_time(stop) / launches
        rates.append(flops / (ms * 1e-3) / 1e12)
    print(f"fa4 forward {mask} n {n} D {d} B {b} H {h}: TFLOP/s per half second "
          + " ".join(f"{r:.0f}" for r in rates))


if __name__ == "__main__":
    main()
