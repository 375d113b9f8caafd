"""Peer for `longattn bench --compare torch`: PyTorch CPU scaled_dot_product_attention.

Usage: python3 peer_torch.py JOB.json. The job lists configurations; for each one this prints one
JSON line {"id", "time_s", "reps"} or {"id", "error"}. The timing protocol is the bench's: one
warm-up call, then max(reps, ceil(min_time / warm-up time)) calls (at most 50), median.
Masks: "none" (full), "causal" (is_causal=True), "file" (a dense boolean attn_mask read from a
raw n*n u8 file written by the bench from the very same mask).
With "backward": true the timed call is `out.backward(do)` alone (q, k, v require grad; the
forward runs untimed before each call; the gradients are cleared between calls).
"""
import json
import math
import statistics
import sys
import time


def main():
    job = json.load(open(sys.argv[1]))
    try:
        import torch
        import torch.nn.functional as F
    except Exception as e:  # noqa: BLE001
        print(json.dumps({"fatal": f"torch is not installed ({e})"}), flush=True)
        return
    torch.set_num_threads(job["threads"])
    print(json.dumps({"version": torch.__version__, "threads": torch.get_num_threads()}), flush=True)
    dts = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}
    for c in job["configs"]:
        try:
            g = torch.Generator().manual_seed(1000 + c["id"])
            b, h, hk, n, d = c["batch"], c["heads"], c["kv_heads"], c["n"], c["d"]
            dt = dts[c["dtype"]]

            def rnd(heads):
                return (torch.rand(b, heads, n, d, generator=g) * 2 - 1).to(dt)

            q, k, v = rnd(h), rnd(hk), rnd(hk)
            kw = {}
            if hk != h:
                kw["enable_gqa"] = True
            if c["mask"] == "causal":
                kw["is_causal"] = True
            elif c["mask"] == "file":
                m = torch.from_file(c["mask_file"], shared=False, size=n * n, dtype=torch.uint8)
                kw["attn_mask"] = m.view(n, n).bool()
            if c.get("backward"):
                for t in (q, k, v):
                    t.requires_grad_(True)
                dout = (torch.rand(b, h, n, d, generator=g) * 2 - 1).to(dt)

                def once():
                    out = F.scaled_dot_product_attention(q, k, v, **kw)
                    t0 = time.perf_counter()
                    out.backward(dout)
                    t = time.perf_counter() - t0
                    q.grad = k.grad = v.grad = None
                    return t

                warm = once()
                reps = max(job["reps"], min(50, math.ceil(job["min_time"] / max(warm, 1e-9))))
                ts = [once() for _ in range(reps)]
            else:
                with torch.inference_mode():
                    t0 = time.perf_counter()
                    F.scaled_dot_product_attention(q, k, v, **kw)
                    warm = time.perf_counter() - t0
                    reps = max(job["reps"], min(50, math.ceil(job["min_time"] / max(warm, 1e-9))))
                    ts = []
                    for _ in range(reps):
                        t0 = time.perf_counter()
                        F.scaled_dot_product_attention(q, k, v, **kw)
                        ts.append(time.perf_counter() - t0)
            print(json.dumps({"id": c["id"], "time_s": statistics.median(ts), "reps": reps}), flush=True)
        except Exception as e:  # noqa: BLE001
            print(json.dumps({"id": c["id"], "error": f"{type(e).__name__}: {e}"}), flush=True)


if __name__ == "__main__":
    main()
