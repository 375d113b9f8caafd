"""Per-kernel GPU time of one longattn linear forward (and forward + backward) at the issue's
shapes, from torch.profiler: where the time of a cut (segmented) problem goes.

    python3 scripts/gpu/linear_breakdown.py [--bwd] [T ...]
"""
import sys

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import longattn

bwd = "--bwd" in sys.argv
ts = [int(x) for x in sys.argv[1:] if x.isdigit()] or [16384, 65536]
for t in ts:
    q, k, v = (torch.randn(1, t, 32, 128, device="cuda", dtype=torch.bfloat16, requires_grad=bwd) for _ in range(3))
    g = (F.logsigmoid(torch.randn(1, t, 32, device="cuda")) / 16).requires_grad_(bwd)

    def run():
        o, _ = longattn.chunk_simple_gla(q, k, v, g)
        if bwd:
            torch.autograd.grad(o, (q, k, v, g), torch.ones_like(o))

    for _ in range(2):
        run()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            run()
        torch.cuda.synchronize()
    rows = {}
    for e in prof.events():
        if e.device_type.name == "CUDA":
            rows[e.name] = rows.get(e.name, 0.0) + e.device_time / 3
    total = sum(rows.values())
    print(f"T {t}{' fwd+bwd' if bwd else ' fwd'}: {total / 1000:.3f} ms of kernels")
    for name, us in sorted(rows.items(), key=lambda x: -x[1])[:10]:
        print(f"  {us / 1000:8.3f} ms  {name[:70]}")
