"""Linear attention on the GPU against flash-linear-attention (FLA), in one process.

    python3 crates/longattn-py/bench/linear_check.py [--json OUT] [--quick]

Checks (bf16, per-token log decay g = logsigmoid(x) / 16 as FLA's own tests draw it): longattn's
`chunk_simple_gla` against FLA's on the same inputs and against a float64 chunk-free reference
(small shapes); then times forward and forward + backward (`torch.autograd.grad` of q, k, v, g)
at the issue's shapes, FLA in the same loop (its gated backward refuses Triton < 3.7.1 on Hopper:
the error is printed and other FLA backward kernels are tried), and the decode step against the
measured copy bandwidth.
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
p.add_argument("--no-fla", action="store_true", help="leave FLA out (sweeps of longattn's own settings)")
args = p.parse_args()
dev = "cuda"
torch.manual_seed(0)
res = {"checks": [], "perf": [], "decode": {}}


def gpu_ms(fn, reps=20):
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    if time.perf_counter() - t0 > 0.05:
        reps = 5
    es = [torch.cuda.Event(enable_timing=True) for _ in range(2 * reps)]
    for i in range(reps):
        es[2 * i].record()
        fn()
        es[2 * i + 1].record()
    torch.cuda.synchronize()
    t = sorted(es[2 * i].elapsed_time(es[2 * i + 1]) for i in range(reps))
    return t[len(t) // 2]


def graph_ms(fn, reps=10):
    """GPU time of one call replayed from a CUDA graph of `reps` calls: the kernels alone, without
    the host work of an eager call (longattn's eager path also reads one flag back from the
    device to check that the log decays are <= 0; that check is skipped under capture)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    gr = torch.cuda.CUDAGraph()
    with torch.cuda.graph(gr):
        for _ in range(reps):
            fn()
    ms = gpu_ms(gr.replay, reps=5) / reps
    del gr
    return ms


def try_graph_ms(fn, row, key):
    try:
        row[key] = graph_ms(fn)
    except Exception as e:  # noqa
        row[key + "_error"] = str(e).splitlines()[0][:160] if str(e) else type(e).__name__


def inputs(b, t, h, k=128, v=128, grad=False):
    q = torch.randn(b, t, h, k, device=dev, dtype=torch.bfloat16)
    kk = torch.randn(b, t, h, k, device=dev, dtype=torch.bfloat16)
    vv = torch.randn(b, t, h, v, device=dev, dtype=torch.bfloat16)
    g = F.logsigmoid(torch.randn(b, t, h, device=dev)) / 16
    if grad:
        for x in (q, kk, vv, g):
            x.requires_grad_()
    return q, kk, vv, g


def ref_f64(q, k, v, g, scale):
    """Quadratic float64 form: o_i = scale * sum_{j <= i} exp(b_i - b_j) (q_i . k_j) v_j, b = cumsum g."""
    q, k, v, g = (x.double() for x in (q, k, v, g))
    bcum = g.cumsum(1)  # [B, T, H]
    s = torch.einsum("bihd,bjhd->bhij", q, k) * scale
    dec = (bcum.transpose(1, 2).unsqueeze(-1) - bcum.transpose(1, 2).unsqueeze(-2))
    t = q.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
    w = torch.where(causal, s * dec.clamp(max=0).exp(), torch.zeros((), dtype=torch.float64, device=q.device))
    return torch.einsum("bhij,bjhd->bihd", w, v)


def check(name, got, want, tol):
    err = ((got.double() - want.double()).abs().max() / want.double().abs().max()).item()
    ok = err < tol
    res["checks"].append({"name": name, "err": err, "ok": ok})
    print(f"{'PASS' if ok else 'FAIL'} {name}: rel err {err:.2e} (tol {tol:.0e})", flush=True)


try:
    from fla.ops.simple_gla import chunk_simple_gla as fla_simple_gla
except Exception as e:  # noqa
    fla_simple_gla = None
    print("FLA unavailable:", str(e)[:200])
try:
    from fla.ops.simple_gla import fused_recurrent_simple_gla as fla_recurrent
except Exception:  # noqa
    fla_recurrent = None
if args.no_fla:
    fla_simple_gla = fla_recurrent = None

# Correctness at small shapes (both kernels against float64; both against each other).
for (b, t, h, kd) in [] if args.perf_only else [(1, 1000, 4, 128), (2, 4224, 2, 64), (1, 65, 3, 128)]:
    q, k, v, g = inputs(b, t, h, kd, kd)
    want = ref_f64(q, k, v, g, kd ** -0.5)
    o, _ = longattn.chunk_simple_gla(q, k, v, g)
    check(f"longattn vs f64 b{b} t{t} h{h} d{kd}", o, want, 2e-2)
    if fla_simple_gla is not None:
        of, _ = fla_simple_gla(q, k, v, g)
        check(f"FLA vs f64 b{b} t{t} h{h} d{kd}", of, want, 2e-2)

# Gradients against float64 autograd (one shape).
if not args.perf_only:
    q, k, v, g = inputs(1, 777, 2, 64, 64, grad=True)
    o, _ = longattn.chunk_simple_gla(q, k, v, g)
    do = torch.randn_like(o)
    got = torch.autograd.grad(o, (q, k, v, g), do)
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v, g)]
    want = torch.autograd.grad(ref_f64(*leaves, 64 ** -0.5), leaves, do.double())
    for n, a, w in zip("qkvg", got, want):
        check(f"grad d{n} t777 d64 vs f64", a, w, 5e-2)

shapes = [(1, 16384, 32), (1, 65536, 32), (4, 32768, 32)]
if args.quick:
    shapes = shapes[:1]
for (b, t, h) in shapes:
    q, k, v, g = inputs(b, t, h, grad=True)
    row = {"b": b, "t": t, "h": h, "k": 128, "v": 128}
    gb = (4 * b * t * h * 128 * 2 + b * t * h * 4) / 1e9
    row["longattn_fwd_ms"] = gpu_ms(lambda: longattn.chunk_simple_gla(q, k, v, g))
    qd, kd_, vd, gd = (x.detach() for x in (q, k, v, g))
    longattn.linear.check_decays(False)  # eager without the read-back of the decay check
    row["longattn_fwd_nocheck_ms"] = gpu_ms(lambda: longattn.chunk_simple_gla(q, k, v, g))
    longattn.linear.check_decays(True)
    try_graph_ms(lambda: longattn.chunk_simple_gla(qd, kd_, vd, gd), row, "longattn_fwd_graph_ms")
    o, _ = longattn.chunk_simple_gla(q, k, v, g)
    do = torch.randn_like(o)

    def fb():
        o, _ = longattn.chunk_simple_gla(q, k, v, g)
        return torch.autograd.grad(o, (q, k, v, g), do)

    row["longattn_fwdbwd_ms"] = gpu_ms(fb)
    longattn.linear.check_decays(False)
    row["longattn_fwdbwd_nocheck_ms"] = gpu_ms(fb)
    longattn.linear.check_decays(True)
    if fla_simple_gla is not None:
        row["fla_fwd_ms"] = gpu_ms(lambda: fla_simple_gla(q, k, v, g))
        try_graph_ms(lambda: fla_simple_gla(qd, kd_, vd, gd), row, "fla_fwd_graph_ms")
        of, _ = fla_simple_gla(q.detach(), k.detach(), v.detach(), g.detach())
        ol, _ = longattn.chunk_simple_gla(q.detach(), k.detach(), v.detach(), g.detach())
        row["longattn_vs_fla_rel"] = ((ol.float() - of.float()).abs().max() / of.float().abs().max()).item()
        try:
            def fla_fb():
                o, _ = fla_simple_gla(q, k, v, g)
                return torch.autograd.grad(o, (q, k, v, g), do)
            row["fla_fwdbwd_ms"] = gpu_ms(fla_fb)
            # Gradient agreement (max |a - b| / max |b| per tensor, FLA as b).
            gl, gf = fb(), fla_fb()
            row["grad_vs_fla_rel"] = {n: ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()
                                      for n, a, b in zip("qkvg", gl, gf)}
        except Exception as e:  # noqa
            row["fla_bwd_error"] = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
    row["longattn_fwd_TBps"] = gb / row["longattn_fwd_ms"]
    res["perf"].append(row)
    line = f"b{b} t{t} h{h} d128: longattn fwd {row['longattn_fwd_ms']:.3f} ms ({row['longattn_fwd_TBps']:.2f} TB/s) fwd+bwd {row['longattn_fwdbwd_ms']:.3f} ms"
    if "fla_fwd_ms" in row:
        line += f" | FLA fwd {row['fla_fwd_ms']:.3f} ms ({row['fla_fwd_ms'] / row['longattn_fwd_ms']:.2f}x)"
        line += f" fwd+bwd {row['fla_fwdbwd_ms']:.3f} ms ({row['fla_fwdbwd_ms'] / row['longattn_fwdbwd_ms']:.2f}x)" if "fla_fwdbwd_ms" in row else f" bwd: {row.get('fla_bwd_error')}"
        line += f" | out vs FLA {row['longattn_vs_fla_rel']:.1e}"
        if "grad_vs_fla_rel" in row:
            line += " grads vs FLA " + " ".join(f"d{n} {e:.1e}" for n, e in row["grad_vs_fla_rel"].items())
    line += f" | eager without the decay check: longattn fwd {row['longattn_fwd_nocheck_ms']:.3f} ms"
    if "fla_fwd_ms" in row:
        line += f" ({row['fla_fwd_ms'] / row['longattn_fwd_nocheck_ms']:.2f}x FLA)"
    line += f" fwd+bwd {row['longattn_fwdbwd_nocheck_ms']:.3f} ms"
    if "fla_fwdbwd_ms" in row:
        line += f" ({row['fla_fwdbwd_ms'] / row['longattn_fwdbwd_nocheck_ms']:.2f}x FLA)"
    if "longattn_fwd_graph_ms" in row:
        line += f" | graphs: longattn fwd {row['longattn_fwd_graph_ms']:.3f} ms"
        if "fla_fwd_graph_ms" in row:
            line += f", FLA fwd {row['fla_fwd_graph_ms']:.3f} ms ({row['fla_fwd_graph_ms'] / row['longattn_fwd_graph_ms']:.2f}x)"
    for key in ("longattn_fwd_graph_ms_error", "fla_fwd_graph_ms_error"):
        if key in row:
            line += f" | {key}: {row[key]}"
    print(line, flush=True)
    del q, k, v, g, o, do
    torch.cuda.empty_cache()

# Decode: batch 64, 32 heads, 128 x 128 state (f32), one token.
if not args.perf_only:
    b, h = 64, 32
    q, k, v, _ = inputs(b, 1, h)
    g = F.logsigmoid(torch.randn(b, 1, h, device=dev)) / 16
    state = torch.randn(b, h, 128, 128, device=dev)
    ms = gpu_ms(lambda: longattn.fused_recurrent_simple_gla(q, k, v, g, initial_state=state))
    state_bytes = state.numel() * 4
    big = torch.empty(2 ** 28, device=dev)  # 1 GiB
    big2 = torch.empty_like(big)
    copy_ms = gpu_ms(lambda: big2.copy_(big))
    copy_tbps = 2 * big.numel() * 4 / copy_ms / 1e9
    step_tbps = 2 * state_bytes / ms / 1e9
    res["decode"] = {"ms": ms, "TBps": step_tbps, "copy_TBps": copy_tbps, "share_of_copy": step_tbps / copy_tbps}
    line = f"decode step b{b} h{h} 128x128: eager {ms * 1000:.1f} us, {step_tbps:.2f} TB/s = {100 * step_tbps / copy_tbps:.0f}% of copy ({copy_tbps:.2f} TB/s)"
    try_graph_ms(lambda: longattn.fused_recurrent_simple_gla(q, k, v, g, initial_state=state), res["decode"], "graph_ms")
    if "graph_ms" in res["decode"]:
        gms = res["decode"]["graph_ms"]
        res["decode"]["graph_TBps"] = 2 * state_bytes / gms / 1e9
        res["decode"]["graph_share_of_copy"] = res["decode"]["graph_TBps"] / copy_tbps
        line += f" | graph {gms * 1000:.1f} us, {res['decode']['graph_TBps']:.2f} TB/s = {100 * res['decode']['graph_share_of_copy']:.0f}% of copy"
    else:
        line += f" | graph failed: {res['decode'].get('graph_ms_error')}"
    if fla_recurrent is not None:
        try:
            s2 = state.clone()
            fms = gpu_ms(lambda: fla_recurrent(q, k, v, g, initial_state=s2, output_final_state=True))
            res["decode"]["fla_ms"] = fms
            line += f" | FLA fused_recurrent eager {fms * 1000:.1f} us ({fms / ms:.2f}x)"
            try_graph_ms(lambda: fla_recurrent(q, k, v, g, initial_state=s2, output_final_state=True), res["decode"], "fla_graph_ms")
            if "fla_graph_ms" in res["decode"] and "graph_ms" in res["decode"]:
                fg = res["decode"]["fla_graph_ms"]
                line += f", graph {fg * 1000:.1f} us ({fg / res['decode']['graph_ms']:.2f}x)"
        except Exception as e:  # noqa
            line += f" | FLA fused_recurrent failed: {str(e)[:100]}"
    print(line, flush=True)
    # The step agrees with the chunked form on the same token.
    s1 = state.clone()
    o1, _ = longattn.fused_recurrent_simple_gla(q, k, v, g, initial_state=s1)
    o2, s2 = longattn.chunk_simple_gla(q, k, v, g, initial_state=state.clone(), output_final_state=True)
    check("decode step vs chunked (one token)", o1, o2, 1e-2)
    check("decode state vs chunked", s1, s2, 1e-4)

if args.json:
    json.dump(res, open(args.json, "w"), indent=1)
fails = [c for c in res["checks"] if not c["ok"]]
print(f"{len(res['checks']) - len(fails)} / {len(res['checks'])} checks passed")
