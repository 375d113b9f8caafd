"""GPU checks and timings of the Python path (run on the device machine; see docs/PERF.md).

    python3 crates/longattn-py/bench/gpu_check.py [--quick] [--json out.json]

1. correctness on CUDA against float64 references: strided (head-major) K/V, GQA, windows,
   soft-cap, Sq != Sk, backward, decode on contiguous and paged caches, a side stream and a
   CUDA-graph capture, no planning on repeated calls;
2. per-call host overhead at decode size (Sq 1, Sk 1024, 8 / 2 heads, D 128) against SDPA;
3. forward and forward+backward times of `longattn.flash_attn_func` against SDPA (FLASH and
   cuDNN backends) and FlexAttention, full / causal / window, D 64 / 128, n 1k..64k, 16k tokens
   per config, model dim 2048 (heads = 2048 / D).
"""
import argparse
import json
import math
import time

import torch
import torch.nn.functional as F

import longattn

p = argparse.ArgumentParser()
p.add_argument("--quick", action="store_true")
p.add_argument("--no-perf", action="store_true", help="checks and host overhead only")
p.add_argument("--no-overhead", action="store_true")
p.add_argument("--json")
p.add_argument("--lens", default="1k,4k,16k,64k")
args = p.parse_args()
dev = "cuda"
results = {"checks": [], "overhead_us": {}, "perf": []}


def ref(q, k, v, causal=False, window=None, scale=None, softcap=None):
    qf, kf, vf = (t.double().transpose(1, 2) for t in (q, k, v))
    g = qf.shape[1] // kf.shape[1]
    kf, vf = kf.repeat_interleave(g, 1), vf.repeat_interleave(g, 1)
    s = qf @ kf.transpose(-1, -2) * (scale or 1 / math.sqrt(q.shape[-1]))
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    sq, sk = s.shape[-2:]
    i = torch.arange(sq, device=q.device)[:, None] + sk - sq
    j = torch.arange(sk, device=q.device)[None]
    ok = torch.ones(sq, sk, dtype=torch.bool, device=q.device)
    if causal:
        ok &= j <= i
    if window is not None:
        ok &= (j >= i - window[0]) & (j <= i + window[1])
    s = s.masked_fill(~ok, -math.inf)
    return (s.softmax(-1).nan_to_num(0.0) @ vf).transpose(1, 2)


def check(name, got, want, tol):
    err = (got.double() - want.double()).abs().max().item()
    scale = want.double().abs().max().item()
    ok = err <= tol * max(scale, 1.0)
    results["checks"].append({"name": name, "max_err": err, "ok": ok})
    print(f"{'PASS' if ok else 'FAIL'} {name}: max err {err:.3e} (tol {tol * max(scale, 1.0):.1e})", flush=True)


def rnd(*shape, dtype=torch.bfloat16):
    return torch.randn(*shape, device=dev, dtype=dtype)


torch.manual_seed(0)
TOL = {torch.bfloat16: 2e-2, torch.float16: 3e-3}
for dt in (torch.bfloat16, torch.float16):
    for (b, sq, sk, hq, hk, d, causal, win, cap) in [
        (2, 113, 113, 4, 2, 64, True, None, None),
        (1, 65, 1023, 8, 1, 128, True, None, None),
        (2, 1023, 63, 4, 4, 128, False, None, 30.0),
        (1, 4224, 4224, 8, 2, 128, True, (256, 0), None),
        (3, 7, 300, 6, 3, 256, True, None, None),
        (2, 1, 1024, 8, 2, 128, True, None, None),
    ]:
        q = rnd(b, sq, hq, d, dtype=dt)
        # K / V head-major as in Hugging Face's cache: [B, H, S, D] memory viewed as [B, S, H, D].
        k = rnd(b, hk, sk, d, dtype=dt).transpose(1, 2)
        v = rnd(b, hk, sk, d, dtype=dt).transpose(1, 2)
        ws = (-1, -1) if win is None else win
        o = longattn.flash_attn_func(q, k, v, causal=causal, window_size=ws, softcap=cap or 0.0)
        check(f"fwd {dt} b{b} sq{sq} sk{sk} h{hq}/{hk} d{d} causal={causal} win={win} cap={cap} (strided K/V)",
              o, ref(q, k, v, causal, win, softcap=cap), TOL[dt])
    # backward
    for (b, s, hq, hk, d, causal) in [(2, 257, 4, 2, 64, True), (1, 1024, 8, 8, 128, False), (1, 333, 4, 1, 128, True)]:
        q, k, v = (rnd(b, s, h, d, dtype=dt).requires_grad_() for h in (hq, hk, hk))
        o = longattn.flash_attn_func(q, k, v, causal=causal)
        do = torch.randn_like(o)
        g = torch.autograd.grad(o, (q, k, v), do)
        q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
        r = ref(q64, k64, v64, causal)
        gr = torch.autograd.grad(r, (q64, k64, v64), do.double())
        for n, a, w in zip("qkv", g, gr):
            check(f"bwd d{n} {dt} b{b} s{s} h{hq}/{hk} d{d} causal={causal}", a, w, 3 * TOL[dt])

# Decode: contiguous and paged caches with ragged lengths.
for page in (None, 16, 64, 256):
    b, hq, hk, d, cap = 4, 8, 2, 128, 1024
    lens = torch.tensor([1, 300, 1024, 777], dtype=torch.int32, device=dev)
    q = rnd(b, 1, hq, d)
    if page is None:
        kc, vc, bt = rnd(b, cap, hk, d), rnd(b, cap, hk, d), None
        kseq = [kc[i, : lens[i]] for i in range(b)]
        vseq = [vc[i, : lens[i]] for i in range(b)]
    else:
        npg = cap // page
        kc, vc = rnd(b * npg + 3, page, hk, d), rnd(b * npg + 3, page, hk, d)
        bt = torch.randperm(b * npg + 3, device=dev)[: b * npg].int().view(b, npg)
        kseq = [kc[bt[i].long()].reshape(-1, hk, d)[: lens[i]] for i in range(b)]
        vseq = [vc[bt[i].long()].reshape(-1, hk, d)[: lens[i]] for i in range(b)]
    o = longattn.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens, block_table=bt)
    want = torch.cat([ref(q[i : i + 1], kseq[i][None], vseq[i][None]) for i in range(b)])
    check(f"decode page={page} lens={lens.tolist()}", o, want, TOL[torch.bfloat16])

# Side stream and graph capture.
q, k, v = rnd(2, 512, 8, 128), rnd(2, 512, 2, 128), rnd(2, 512, 2, 128)
want = ref(q, k, v, True)
s = torch.cuda.Stream()
with torch.cuda.stream(s):
    o = longattn.flash_attn_func(q, k, v, causal=True)
torch.cuda.current_stream().wait_stream(s)
check("side stream", o, want, TOL[torch.bfloat16])
o = longattn.flash_attn_func(q, k, v, causal=True)  # warm (plan cached)
before = longattn.plan_counts()
g = torch.cuda.CUDAGraph()
with torch.cuda.graph(g):
    og = longattn.flash_attn_func(q, k, v, causal=True)
q.copy_(rnd(2, 512, 8, 128))
g.replay()
torch.cuda.synchronize()
check("cuda graph replay (new q)", og, ref(q, k, v, True), TOL[torch.bfloat16])
after = longattn.plan_counts()
results["checks"].append({"name": "no planning on repeated calls", "ok": before == after, "plans": [before, after]})
print(f"{'PASS' if before == after else 'FAIL'} repeated calls plan nothing: {before} -> {after}")

# Host overhead at decode size.
def host_us(fn, n=2000):
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    dt = (time.perf_counter() - t) / n * 1e6
    torch.cuda.synchronize()
    return dt

if args.no_overhead:
    host_us = lambda fn, n=0: float("nan")  # noqa: E731
q1, kc, vc = rnd(1, 1, 8, 128), rnd(1, 1024, 2, 128), rnd(1, 1024, 2, 128)
lens = torch.full((1,), 1024, dtype=torch.int32, device=dev)
qT, kT, vT = q1.transpose(1, 2), kc.transpose(1, 2), vc.transpose(1, 2)
ov = {
    "sdpa (enable_gqa)": host_us(lambda: F.scaled_dot_product_attention(qT, kT, vT, enable_gqa=True)),
    "longattn.flash_attn_func": host_us(lambda: longattn.flash_attn_func(q1, kc, vc)),
    "longattn.flash_attn_with_kvcache": host_us(lambda: longattn.flash_attn_with_kvcache(q1, kc, vc, cache_seqlens=lens)),
    "torch.ops.longattn.decode": host_us(lambda: torch.ops.longattn.decode(q1, kc, vc, None, lens, None, None)),
    "torch.ops.longattn.fwd": host_us(lambda: torch.ops.longattn.fwd(q1, kc, vc, None, None, None, None, None, False)),
}
longattn.set_cache_checks(False)
ov["longattn.flash_attn_with_kvcache (cache checks off)"] = host_us(
    lambda: longattn.flash_attn_with_kvcache(q1, kc, vc, cache_seqlens=lens))
longattn.set_cache_checks(True)
results["overhead_us"] = ov
for kk, vv in ov.items():
    print(f"host overhead {kk}: {vv:.1f} us/call")


# Timings.
def gpu_ms(fn, reps=20):
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    if time.perf_counter() - t0 > 0.02:  # long calls: fewer repetitions
        reps = 5
    for _ in range(2):
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


# Where backward time goes at one config: autograd, the op, the binding with outputs given.
if not args.no_overhead:
    from longattn import _native
    b, n, h, d = 4, 4096, 32, 64
    q, k, v = (rnd(b, n, h, d).requires_grad_() for _ in range(3))
    o, lse = torch.ops.longattn.fwd(q, k, v, None, None, None, None, None, False, False)
    do = torch.randn_like(o)
    qd, kd, vd, od = (t.detach() for t in (q, k, v, o))
    dq, dk, dv = torch.empty_like(qd), torch.empty_like(kd), torch.empty_like(vd)
    probe = {
        "autograd.grad": gpu_ms(lambda: torch.autograd.grad(o, (q, k, v), do, retain_graph=True)),
        "torch.ops.longattn.bwd": gpu_ms(lambda: torch.ops.longattn.bwd(do, qd, kd, vd, od, lse, None, None, None, None, None, False)),
        "_native.bwd (outputs given)": gpu_ms(lambda: _native.bwd(qd, kd, vd, od, lse, do, dq, dk, dv, None, None, None, None, None, False, 0)),
    }
    results["bwd_probe_ms"] = probe
    for kk, vv in probe.items():
        print(f"bwd probe b4 n4096 h32 d64 full, {kk}: {vv:.3f} ms")
    del q, k, v, o, do, qd, kd, vd, od, dq, dk, dv

try:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    import torch._dynamo
    # One compiled flex kernel per (shape, mask) of the sweep: raise the recompile limit, or dynamo
    # silently falls back to the eager (unfused, quadratic-memory) flex after 8 variants.
    for knob in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, 256)
    flex = torch.compile(flex_attention, dynamic=False)
except Exception as e:  # noqa
    flex = None
    print("flex unavailable:", e)

lens_list = [] if args.no_perf else [int(x[:-1]) * 1024 if x.endswith("k") else int(x) for x in args.lens.split(",")]
if args.quick:
    lens_list = lens_list[:2]
for d in (64, 128):
    h = 2048 // d
    for n in lens_list:
        b = max(1, 16384 // n)
        for mname in ("full", "causal", "window"):
            causal = mname != "full"
            ws = (1023, 0) if mname == "window" else (-1, -1)
            q, k, v = (rnd(b, n, h, d).requires_grad_() for _ in range(3))
            do = torch.randn_like(q)
            qT, kT, vT = (t.detach().transpose(1, 2).requires_grad_() for t in (q, k, v))
            if mname == "window":
                npairs = sum(min(i, 1023) + 1 for i in range(n))
            elif causal:
                npairs = n * (n + 1) // 2
            else:
                npairs = n * n
            fl = 4 * b * h * d * npairs
            row = {"d": d, "n": n, "batch": b, "mask": mname}

            def la_f():
                return longattn.flash_attn_func(q, k, v, causal=causal, window_size=ws)

            row["longattn_fwd_ms"] = gpu_ms(la_f)
            o = la_f()
            row["longattn_bwd_ms"] = gpu_ms(lambda: torch.autograd.grad(o, (q, k, v), do, retain_graph=True))
            peers = {}
            if mname != "window":
                for pname, be in (("sdpa_flash", SDPBackend.FLASH_ATTENTION), ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION)):
                    try:
                        with sdpa_kernel(be):
                            f = lambda: F.scaled_dot_product_attention(qT, kT, vT, is_causal=causal)
                            peers[pname + "_fwd_ms"] = gpu_ms(f)
                            oo = f()
                            peers[pname + "_bwd_ms"] = gpu_ms(lambda: torch.autograd.grad(oo, (qT, kT, vT), do.transpose(1, 2), retain_graph=True))
                    except Exception as e:  # noqa
                        print(pname, "failed:", str(e)[:100])
            if flex is not None:
                try:
                    if mname == "full":
                        mm = lambda bb, hh, qi, kv: qi >= 0
                    elif mname == "causal":
                        mm = lambda bb, hh, qi, kv: kv <= qi
                    else:
                        mm = lambda bb, hh, qi, kv: (kv <= qi) & (qi - kv <= 1023)
                    bm = create_block_mask(mm, None, None, n, n, device=dev)
                    f = lambda: flex(qT, kT, vT, block_mask=bm)
                    peers["flex_fwd_ms"] = gpu_ms(f)
                    oo = f()
                    peers["flex_bwd_ms"] = gpu_ms(lambda: torch.autograd.grad(oo, (qT, kT, vT), do.transpose(1, 2), retain_graph=True))
                except Exception as e:  # noqa
                    print("flex failed:", str(e)[:100])
            row.update(peers)
            row["fwd_tflops"] = fl / row["longattn_fwd_ms"] / 1e9
            row["bwd_tflops"] = 2.5 * fl / row["longattn_bwd_ms"] / 1e9
            results["perf"].append(row)
            ratios = " ".join(
                f"{kk[:-7]}:{row[kk] / row['longattn_' + kk[-6:]]:.2f}x" for kk in peers
            )
            print(f"D{d} n{n} b{b} {mname}: fwd {row['longattn_fwd_ms']:.3f} ms ({row['fwd_tflops']:.0f} TF/s) "
                  f"bwd {row['longattn_bwd_ms']:.3f} ms ({row['bwd_tflops']:.0f} TF/s) | peer/ours {ratios}", flush=True)
            del q, k, v, qT, kT, vT, o, do
            torch.cuda.empty_cache()

if args.json:
    json.dump(results, open(args.json, "w"), indent=1)
fails = [c for c in results["checks"] if not c["ok"]]
print(f"{len(results['checks']) - len(fails)} / {len(results['checks'])} checks passed")
