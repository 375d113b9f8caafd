"""FlashAttention-4's backward, run for Nsight Compute (issue 14): one config, a few launches.

    python3 scripts/gpu/fa4_bwd.py MASK N D [ITERS]

MASK is full or causal, N the sequence length (4k, 16k or a number), D the head dim; 16k tokens
per config and model dim 2048, as the bench (B = 16k / N, H = 2048 / D). Each iteration runs the
forward and the backward; the profile takes the backward's main kernel of a later iteration
(`dense_check.sh ncu_fa4_bwd`) or the forward's (`dense_check.sh ncu_fwd`).
"""

import sys

import torch
from flash_attn.cute import flash_attn_func


def tokens(s):
    return int(s[:-1]) * 1024 if s.endswith("k") else int(s)


def main():
    mask, n, d = sys.argv[1], tokens(sys.argv[2]), int(sys.argv[3])
    iters = int(sys.argv[4]) if len(sys.argv) > 4 else 4
    b, h = max(1, 16384 // n), 2048 // d
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
               for _ in range(3))
    do = torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16, generator=g)
    for _ in range(iters):
        out = flash_attn_func(q, k, v, causal=mask == "causal")[0]
        torch.autograd.grad(out, (q, k, v), do)
    torch.cuda.synchronize()
    print(f"fa4 backward {mask} n {n} D {d} B {b} H {h}: {iters} iterations")


if __name__ == "__main__":
    main()
