"""FlexAttention on the blocks longattn selected (`longattn bench --backend cuda --sparse ...
--compare torch`): each config's selection comes as a u8 table [B, Hq, query tiles, key tiles]
(0 skipped, 1 whole tile, 2 tile under the mask: causal) in a raw file; the BlockMask is built
from it (`BlockMask.from_kv_blocks`: Partial tiles as kv blocks with the causal mask_mod, whole
tiles as full kv blocks, the kernel's tile sizes as BLOCK_SIZE), and `torch.compile(flex_attention)`
runs on seeded random bf16 q / k / v of the same shapes (timing depends on the blocks, not the
values). Also Flex on the dense causal mask (`create_block_mask`) for scale. One JSON line per
result: {"id", "peer": "flex_sparse" | "flex_dense", "ms"} or {"id", "peer", "error"}.
"""
import json
import sys


def main():
    job = json.load(open(sys.argv[1]))
    try:
        import torch
        from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
    except Exception as e:  # noqa: BLE001
        print(json.dumps({"fatal": f"torch / flex_attention unavailable: {e}"}), flush=True)
        return
    print(json.dumps({"version": torch.__version__}), flush=True)
    dev = "cuda"
    flex = torch.compile(flex_attention, dynamic=False)

    def causal(b, h, q, kv):
        return kv <= q

    def ms(fn, reps):
        fn()
        torch.cuda.synchronize()
        out = []
        for _ in range(reps):
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            fn()
            e1.record()
            torch.cuda.synchronize()
            out.append(e0.elapsed_time(e1))
        out.sort()
        return out[len(out) // 2]

    dense_done = {}
    for c in job["configs"]:
        cid, n, b, hq, hk, d = c["id"], c["n"], c["b"], c["hq"], c["hk"], c["d"]
        try:
            g = torch.Generator(device=dev).manual_seed(7)
            q = torch.randn(b, hq, n, d, device=dev, dtype=torch.bfloat16, generator=g)
            k = torch.randn(b, hk, n, d, device=dev, dtype=torch.bfloat16, generator=g)
            v = torch.randn(b, hk, n, d, device=dev, dtype=torch.bfloat16, generator=g)
            raw = torch.frombuffer(bytearray(open(c["table"], "rb").read()), dtype=torch.uint8)
            t = raw.view(b, hq, c["nq"], c["nk"]).to(dev)
            part, full = t == 2, t == 1

            def blocks(sel):
                num = sel.sum(-1, dtype=torch.int32)
                idx = torch.argsort((~sel).to(torch.int8), dim=-1, stable=True).to(torch.int32)
                return num, idx

            kn, ki = blocks(part)
            fn_, fi = blocks(full)
            bm = BlockMask.from_kv_blocks(
                kn, ki, fn_, fi, BLOCK_SIZE=(c["bq"], c["bk"]), mask_mod=causal, seq_lengths=(n, n)
            )
            t_sp = ms(lambda: flex(q, k, v, block_mask=bm, enable_gqa=hq != hk), c["reps"])
            print(json.dumps({"id": cid, "peer": "flex_sparse", "ms": t_sp}), flush=True)
        except Exception as e:  # noqa: BLE001
            print(json.dumps({"id": cid, "peer": "flex_sparse", "error": f"{type(e).__name__}: {e}"[:400]}), flush=True)
            continue
        try:
            key = (n, b, hq, hk, d)
            if key not in dense_done:
                # Compiled block-mask build: the eager one materializes the n x n mask.
                dm = create_block_mask(causal, None, None, n, n, device=dev, _compile=True)
                dense_done[key] = ms(lambda: flex(q, k, v, block_mask=dm, enable_gqa=hq != hk), c["reps"])
            print(json.dumps({"id": cid, "peer": "flex_dense", "ms": dense_done[key]}), flush=True)
            del q, k, v, t, part, full, bm
            torch.cuda.empty_cache()
        except Exception as e:  # noqa: BLE001
            print(json.dumps({"id": cid, "peer": "flex_dense", "error": f"{type(e).__name__}: {e}"[:400]}), flush=True)


if __name__ == "__main__":
    main()
