"""GPU peers for `longattn kv bench`: decode of one layer on the full cache, same run, same device.

Usage: python3 peer_kv_cuda.py JOB.json. Per config (batch, len, heads, kv_heads, d, page) it times
PyTorch SDPA on q [B, Hq, 1, D] against contiguous k, v [B, Hk, len, D] (GQA) and FlashInfer's
paged decode (BatchDecodeWithPagedKVCacheWrapper, NHD pages of `page` tokens, tensor cores on, the
pages of each sequence scattered over the pool as in ours), and prints one JSON line per (config,
peer): {"id", "peer", "ms"} or {"id", "peer", "error"}. Timing: CUDA events around 20 back-to-back
calls, median of 7 samples after warm-up (as `longattn kv bench` times ours); bf16 inputs uniform
in [-1, 1) (never zeros).
"""
import json
import sys


def main():
    job = json.load(open(sys.argv[1]))
    try:
        import torch
        import torch.nn.functional as F
    except Exception as e:  # noqa: BLE001
        print(json.dumps({"fatal": f"torch is not available ({e})"}), flush=True)
        return
    if not torch.cuda.is_available():
        print(json.dumps({"fatal": "torch sees no CUDA device"}), flush=True)
        return
    want = set(job.get("peers") or ["sdpa", "flashinfer"])
    fi, fi_err = None, None
    if "flashinfer" in want:
        try:
            import flashinfer as fi
        except Exception as e:  # noqa: BLE001
            fi_err = f"not importable ({type(e).__name__}: {str(e)[:200]})"
    ver = f"torch {torch.__version__}"
    if fi is not None:
        ver += f"; flashinfer {getattr(fi, '__version__', '?')}"
    print(json.dumps({"version": ver, "device": torch.cuda.get_device_name()}), flush=True)
    dev = "cuda"

    def timed(fn, reps=20, samples=7):
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        ts = []
        for _ in range(samples):
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            for _ in range(reps):
                fn()
            e1.record()
            torch.cuda.synchronize()
            ts.append(e0.elapsed_time(e1) / reps)
        return sorted(ts)[len(ts) // 2]

    def out(c, peer, fn):
        try:
            print(json.dumps({"id": c["id"], "peer": peer, "ms": timed(fn)}), flush=True)
        except Exception as e:  # noqa: BLE001
            print(json.dumps({"id": c["id"], "peer": peer, "error": f"{type(e).__name__}: {str(e)[:300]}"}), flush=True)

    for c in job["configs"]:
        b, n, h, hk, d, page = c["batch"], c["len"], c["heads"], c["kv_heads"], c["d"], c["page"]
        g = torch.Generator(device=dev).manual_seed(7000 + c["id"])

        def rnd(*shape):
            return (torch.rand(*shape, generator=g, device=dev) * 2 - 1).to(torch.bfloat16)

        if "sdpa" in want:
            q, k, v = rnd(b, h, 1, d), rnd(b, hk, n, d), rnd(b, hk, n, d)
            out(c, "sdpa", lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=hk != h))
            del q, k, v
            torch.cuda.empty_cache()
        if "flashinfer" in want:
            if fi is None:
                print(json.dumps({"id": c["id"], "peer": "flashinfer", "error": fi_err}), flush=True)
                continue
            try:
                per = (n + page - 1) // page
                pages = b * per
                kc, vc = rnd(pages, page, hk, d), rnd(pages, page, hk, d)
                perm = torch.randperm(pages, generator=g, device=dev).to(torch.int32)
                indptr = torch.arange(0, b + 1, device=dev, dtype=torch.int32) * per
                last = torch.full((b,), n - (per - 1) * page, device=dev, dtype=torch.int32)
                ws = torch.empty(256 << 20, dtype=torch.uint8, device=dev)
                w = fi.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD", use_tensor_cores=True)
                w.plan(indptr, perm, last, h, hk, d, page, q_data_type=torch.bfloat16,
                       kv_data_type=torch.bfloat16)
                q = rnd(b, h, d)
                out(c, "flashinfer", lambda: w.run(q, (kc, vc)))
                del kc, vc, ws, w, q
                torch.cuda.empty_cache()
            except Exception as e:  # noqa: BLE001
                print(json.dumps({"id": c["id"], "peer": "flashinfer", "error": f"{type(e).__name__}: {str(e)[:300]}"}), flush=True)


if __name__ == "__main__":
    main()
