"""The per-key-dimension gate (GLA) forward on the GPU against flash-linear-attention's `chunk_gla`.

    python3 crates/longattn-py/bench/gla_check.py [--json OUT] [--quick]

Checks (bf16, g = logsigmoid(x) / 16 per key dim as FLA's own tests draw it, plus strong gates
of up to -20 a step in every fourth key dim): longattn's `chunk_gla` and FLA's against a float64
recurrence at small shapes, gradients of q, k, v, g against float64 autograd; then times the
forward and forward + backward (`torch.autograd.grad` of q, k, v, g) at the linear-attention
issue's shapes, FLA in the same loop (its gated backward needs Triton >= 3.7.1 on Hopper).
"""
import argparse
import json
import time

import torch
import torch.nn.functional as F

import longattn

p = argparse.ArgumentParser()
p.add_argument("--json")
p.add_argument("--quick", action="store_true")
p.add_argument("--perf-only", action="store_true", help="only the timings at the issue's shapes")
args = p.parse_args()
dev = "cuda"
torch.manual_seed(0)
res = {"checks": [], "perf": []}


def gpu_ms(fn, reps=20):
    fn()
    torch.cuda.synchronize()
    es = [torch.cuda.Event(enable_timing=True) for _ in range(2 * reps)]
    for i in range(reps):
        es[2 * i].record()
        fn()
        es[2 * i + 1].record()
    torch.cuda.synchronize()
    t = sorted(es[2 * i].elapsed_time(es[2 * i + 1]) for i in range(reps))
    return t[len(t) // 2]


def inputs(b, t, h, k=128, v=128, strong=False):
    q = torch.randn(b, t, h, k, device=dev, dtype=torch.bfloat16)
    kk = torch.randn(b, t, h, k, device=dev, dtype=torch.bfloat16)
    vv = torch.randn(b, t, h, v, device=dev, dtype=torch.bfloat16)
    g = F.logsigmoid(torch.randn(b, t, h, k, device=dev)) / 16
    if strong:
        g[..., ::4] = -20.0 * torch.rand(b, t, h, (k + 3) // 4, device=dev)
    return q, kk, vv, g


def ref_f64(q, k, v, g, scale):
    """The recurrence in float64: S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t, o_t = scale q_t S_t."""
    q, k, v, g = (x.double() for x in (q, k, v, g))
    b, t, h, kd = q.shape
    s = torch.zeros(b, h, kd, v.shape[-1], dtype=torch.float64, device=q.device)
    out = torch.empty(b, t, h, v.shape[-1], dtype=torch.float64, device=q.device)
    for i in range(t):
        s = g[:, i].exp().unsqueeze(-1) * s + k[:, i].unsqueeze(-1) * v[:, i].unsqueeze(-2)
        out[:, i] = scale * torch.einsum("bhk,bhkv->bhv", q[:, i], s)
    return out


def check(name, got, want, tol):
    err = ((got.double() - want.double()).abs().max() / want.double().abs().max()).item()
    ok = err < tol
    res["checks"].append({"name": name, "err": err, "ok": ok})
    print(f"{'PASS' if ok else 'FAIL'} {name}: rel err {err:.2e} (tol {tol:.0e})", flush=True)


try:
    from fla.ops.gla import chunk_gla as fla_gla
except Exception as e:  # noqa
    fla_gla = None
    print("FLA unavailable:", str(e)[:200])

with torch.no_grad():
    for (b, t, h, kd, strong) in [] if args.perf_only else [(1, 1000, 2, 128, False), (2, 333, 2, 64, True), (1, 65, 3, 128, True)]:
        q, k, v, g = inputs(b, t, h, kd, kd, strong)
        want = ref_f64(q, k, v, g, kd ** -0.5)
        o, _ = longattn.chunk_gla(q, k, v, g)
        tag = f"b{b} t{t} h{h} d{kd}{' strong' if strong else ''}"
        check(f"longattn chunk_gla vs f64 {tag}", o, want, 2e-2)
        if fla_gla is not None:
            try:
                of, _ = fla_gla(q, k, v, g)
                check(f"FLA chunk_gla vs f64 {tag}", of, want, 2e-2)
            except Exception as e:  # noqa
                print(f"FLA chunk_gla {tag}: {type(e).__name__}: {str(e)[:160]}")

# Gradients against float64 autograd of the recurrence (weak and strong gates).
for (t, strong) in [] if args.perf_only else [(200, False), (150, True)]:
    q, k, v, g = inputs(1, t, 2, 64, 64, strong)
    leaves = [x.clone().requires_grad_() for x in (q, k, v, g)]
    o, _ = longattn.chunk_gla(*leaves)
    do = torch.randn_like(o)
    got = torch.autograd.grad(o, leaves, do)
    ref_leaves = [x.detach().double().requires_grad_() for x in (q, k, v, g)]
    want = torch.autograd.grad(ref_f64(*ref_leaves, 64 ** -0.5), ref_leaves, do.double())
    for n, a, w in zip("qkvg", got, want):
        check(f"grad d{n} t{t}{' strong' if strong else ''} vs f64", a, w, 5e-2)

with torch.no_grad():
    shapes = [(1, 16384, 32), (1, 65536, 32), (4, 32768, 32)]
    if args.quick:
        shapes = shapes[:1]
    for (b, t, h) in shapes:
        q, k, v, g = inputs(b, t, h)
        row = {"shape": [b, t, h, 128, 128]}
        row["longattn_fwd_ms"] = gpu_ms(lambda: longattn.chunk_gla(q, k, v, g))
        longattn.linear.check_decays(False)
        row["longattn_fwd_nocheck_ms"] = gpu_ms(lambda: longattn.chunk_gla(q, k, v, g))
        longattn.linear.check_decays(True)
        if fla_gla is not None:
            try:
                row["fla_fwd_ms"] = gpu_ms(lambda: fla_gla(q, k, v, g))
                row["ratio_fla_over_ours"] = row["fla_fwd_ms"] / row["longattn_fwd_ms"]
            except Exception as e:  # noqa
                row["fla_error"] = f"{type(e).__name__}: {str(e)[:160]}"
        with torch.enable_grad():
            leaves = [x.clone().requires_grad_() for x in (q, k, v, g)]
            do = torch.randn_like(v)

            def fb(fn):
                def run():
                    o, _ = fn(*leaves)
                    torch.autograd.grad(o, leaves, do)
                return run

            try:
                row["longattn_fwdbwd_ms"] = gpu_ms(fb(longattn.chunk_gla), reps=10)
            except Exception as e:  # noqa
                row["longattn_fwdbwd_error"] = f"{type(e).__name__}: {str(e)[:160]}"
            if fla_gla is not None:
                try:
                    row["fla_fwdbwd_ms"] = gpu_ms(fb(fla_gla), reps=10)
                    row["ratio_fla_over_ours_fwdbwd"] = row["fla_fwdbwd_ms"] / row["longattn_fwdbwd_ms"]
                except Exception as e:  # noqa
                    row["fla_fwdbwd_error"] = f"{type(e).__name__}: {str(e)[:160]}"
            del leaves
        res["perf"].append(row)
        print(json.dumps(row), flush=True)
        del q, k, v, g
        torch.cuda.empty_cache()

if args.json:
    with open(args.json, "w") as f:
        json.dump(res, f, indent=1)
