"""GPU peers for `longattn bench --backend cuda --compare torch`, in the same run on the same device.

Usage: python3 peer_torch_cuda.py JOB.json. For each forward config it times PyTorch SDPA with the
FLASH_ATTENTION and CUDNN_ATTENTION backends (full and causal masks only: SDPA has no other fused
masks) and FlexAttention (torch.compile(flex_attention) with create_block_mask on the same mask),
FlashAttention-4 (`flash_attn.cute.flash_attn_func`, full and causal, [B, S, H, D] inputs) when it is
importable, and prints one JSON line per (config, peer): {"id", "peer", "ms"} or {"id", "peer", "error"}.
Where FA4 runs and this Python can import longattn's own package, ours is timed here too, through
`longattn.flash_attn_func` on the same tensors just before and just after FA4 (peer "ours_py": the
mean of the two, "rounds" both), so that one ratio comes from one process and one timer;
FlexAttention lines also carry "build_ms" (create_block_mask, after its first compiled call). Decode
configs time SDPA on q [B, Hq, 1, D] against k, v [B, Hk, n, D] (GQA). With "backward": true in the
job, every peer times `out.backward(dO)` alone (the forward runs once, its graph is kept). "peers"
in the job names the peers to time (default all).
Timing: triton.testing.do_bench, median, after warm-up ("sustain_s" in the job: a warm-up of that
many seconds); inputs uniform in [-1, 1) (never zeros).
"""
import json
import sys
import time


def time_pass(fwd, tensors, backward, warmup_ms=25.0):
    """Median ms (`triton.testing.do_bench`, `warmup_ms` of warm-up, 100 ms of runs) of the
    forward `fwd`, or with `backward` of `out.backward(dO)` alone: the forward runs once, its
    graph is kept, dO is uniform in [-1, 1) and the inputs' gradients are set to None before
    every run. Also imported by scripts/gpu/fa4_parity.py."""
    import torch
    import triton.testing

    if not backward:
        fwd()
        return triton.testing.do_bench(fwd, warmup=warmup_ms, rep=100, return_mode="median")
    for t in tensors:
        t.requires_grad_(True)
    out = fwd()
    dout = torch.rand_like(out) * 2 - 1

    def bwd():
        out.backward(dout, retain_graph=True)

    bwd()
    ms = triton.testing.do_bench(bwd, warmup=warmup_ms, rep=100, return_mode="median", grad_to_none=tensors)
    for t in tensors:
        t.requires_grad_(False)
        t.grad = None
    return ms


def main():
    job = json.load(open(sys.argv[1]))
    try:
        import torch
        import triton.testing
        from torch.nn.attention import SDPBackend, sdpa_kernel
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        import torch.nn.functional as F
    except Exception as e:  # noqa: BLE001
        print(json.dumps({"fatal": f"torch/triton with CUDA is not available ({e})"}), flush=True)
        return
    if not torch.cuda.is_available():
        print(json.dumps({"fatal": "torch sees no CUDA device"}), flush=True)
        return
    want = set(job.get("peers") or ["sdpa_flash", "sdpa_cudnn", "flex", "fa4"])
    fa4, fa4_error = None, None
    if "fa4" in want:
        try:
            from flash_attn.cute import flash_attn_func as fa4
        except Exception as e:  # noqa: BLE001
            fa4_error = f"not importable ({type(e).__name__}: {str(e)[:200]})"
    if fa4 is not None:
        try:
            import importlib.metadata as md
            fa4_status = "flash-attn-4 " + md.version("flash-attn-4")
        except Exception:  # noqa: BLE001
            fa4_status = "flash-attn-4 (version unknown)"
    else:
        fa4_status = fa4_error or "FA4 not asked"
    ours_py = None
    if fa4 is not None:
        try:
            import longattn

            ours_py = longattn.flash_attn_func
            fa4_status += "; ours also in this process (longattn package)"
        except Exception:  # noqa: BLE001
            pass
    print(json.dumps({"version": f"{torch.__version__}; {fa4_status}",
                      "device": torch.cuda.get_device_name()}), flush=True)
    dev = "cuda"
    dts = {"bf16": torch.bfloat16, "f16": torch.float16}
    # Every (shape, mask) is a new compiled graph: lift dynamo's recompile limit (default 8), past
    # which it silently falls back to eager flex_attention (materialized scores, out of memory).
    import torch._dynamo
    torch._dynamo.config.cache_size_limit = 4096
    if hasattr(torch._dynamo.config, "accumulated_cache_size_limit"):
        torch._dynamo.config.accumulated_cache_size_limit = 65536
    flex = torch.compile(flex_attention, dynamic=False) if "flex" in want else None

    # `--sustain`: the warm-up runs this long (do_bench's warm-up is a time in ms), so that
    # timing starts at the clock the power cap settles into, as ours does.
    warmup_ms = max(25.0, 1000.0 * float(job.get("sustain_s") or 0.0))

    def bench(fn):
        return triton.testing.do_bench(fn, warmup=warmup_ms, rep=100, return_mode="median")

    backward = bool(job.get("backward"))
    if backward:
        # The timed backward runs repeatedly on one graph (retain_graph=True); compiled
        # FlexAttention donates its saved buffers to the first backward unless told not to.
        import torch._functorch.config as functorch_config

        functorch_config.donated_buffer = False

    def timed(fwd, tensors):
        """Median ms of the forward, or of the backward alone when the job asks for it."""
        return time_pass(fwd, tensors, backward, warmup_ms)

    def mask_mod(c):
        n, kind = c["n"], c["mask"]
        if kind == "causal":
            return lambda b, h, q, kv: q >= kv
        if kind == "sliding_window":
            w = c["window"]
            return lambda b, h, q, kv: (q >= kv) & (q - kv <= w)
        if kind == "document":
            doc = (torch.arange(n, device=dev) * c["docs"]) // n
            return lambda b, h, q, kv: (q >= kv) & (doc[q] == doc[kv])
        if kind == "neighborhood2d":
            s, k = c["grid"], c["kernel"]

            def nb(b, h, q, kv):
                qr, qc, kr, kc = q // s, q % s, kv // s, kv % s
                r0 = (qr - k // 2).clamp(0, s - k)
                c0 = (qc - k // 2).clamp(0, s - k)
                return (kr >= r0) & (kr < r0 + k) & (kc >= c0) & (kc < c0 + k)

            return nb
        return None

    for c in job["configs"]:
        b, h, hk, n, d = c["batch"], c["heads"], c["kv_heads"], c["n"], c["d"]
        dt = dts[c["dtype"]]
        g = torch.Generator(device=dev).manual_seed(1000 + c["id"])

        def rnd(heads, length):
            return (torch.rand(b, heads, length, d, generator=g, device=dev) * 2 - 1).to(dt)

        if c.get("decode"):
            q, k, v = rnd(h, 1), rnd(hk, n), rnd(hk, n)
            try:
                ms = bench(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=hk != h))
                print(json.dumps({"id": c["id"], "peer": "sdpa", "ms": ms}), flush=True)
            except Exception as e:  # noqa: BLE001
                print(json.dumps({"id": c["id"], "peer": "sdpa", "error": f"{type(e).__name__}: {e}"}), flush=True)
            del q, k, v
            continue
        q, k, v = rnd(h, n), rnd(hk, n), rnd(hk, n)
        kw = {"enable_gqa": True} if hk != h else {}
        if c["mask"] in ("full", "causal"):
            for name, be in (("sdpa_flash", SDPBackend.FLASH_ATTENTION), ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION)):
                if name not in want:
                    continue
                try:
                    with sdpa_kernel([be]):
                        fn = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=c["mask"] == "causal", **kw)  # noqa: E731
                        ms = timed(fn, [q, k, v])
                    print(json.dumps({"id": c["id"], "peer": name, "ms": ms}), flush=True)
                except Exception as e:  # noqa: BLE001
                    print(json.dumps({"id": c["id"], "peer": name, "error": f"{type(e).__name__}: {e}"}), flush=True)
            if fa4 is not None:
                # FA4 takes [B, S, H, D]: the same values, transposed once outside the timing.
                qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k, v))
                causal = c["mask"] == "causal"
                ours_fn = (lambda: ours_py(qt, kt, vt, causal=causal)) if ours_py else None  # noqa: E731
                rounds, who = [], "ours_py"
                try:
                    if ours_fn:
                        rounds.append(timed(ours_fn, [qt, kt, vt]))
                    who = "fa4"
                    fn = lambda: fa4(qt, kt, vt, causal=causal)[0]  # noqa: E731
                    ms = timed(fn, [qt, kt, vt])
                    print(json.dumps({"id": c["id"], "peer": "fa4", "ms": ms}), flush=True)
                    who = "ours_py"
                    if ours_fn:
                        rounds.append(timed(ours_fn, [qt, kt, vt]))
                        print(json.dumps({"id": c["id"], "peer": "ours_py", "ms": sum(rounds) / 2, "rounds": rounds}),
                              flush=True)
                except Exception as e:  # noqa: BLE001
                    print(json.dumps({"id": c["id"], "peer": who, "error": f"{type(e).__name__}: {str(e)[:300]}"}), flush=True)
                del qt, kt, vt
        if flex is None:
            del q, k, v
            torch.cuda.empty_cache()
            continue
        try:
            mm = mask_mod(c)
            if mm is None:
                out = lambda: flex(q, k, v, enable_gqa=hk != h)  # noqa: E731
                build_ms = 0.0
            else:
                bm = create_block_mask(mm, None, None, n, n, device=dev, _compile=True)
                out = lambda: flex(q, k, v, block_mask=bm, enable_gqa=hk != h)  # noqa: E731
                out()
                torch.cuda.synchronize()
                ts = []
                for _ in range(5):
                    t0 = time.perf_counter()
                    create_block_mask(mm, None, None, n, n, device=dev, _compile=True)
                    torch.cuda.synchronize()
                    ts.append((time.perf_counter() - t0) * 1e3)
                build_ms = sorted(ts)[len(ts) // 2]
            ms = timed(out, [q, k, v])
            print(json.dumps({"id": c["id"], "peer": "flex", "ms": ms, "build_ms": build_ms}), flush=True)
        except Exception as e:  # noqa: BLE001
            print(json.dumps({"id": c["id"], "peer": "flex", "error": f"{type(e).__name__}: {str(e)[:300]}"}), flush=True)
        del q, k, v
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
