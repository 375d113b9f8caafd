"""Probe: document masks that are not key runs, on CUDA vs the CPU path (same bf16 inputs)."""
import torch
import longattn

torch.manual_seed(0)
for d in (32, 64, 128):
    for (sq, sk, mask, kind) in [(65, 63, "document", "scattered"), (63, 63, "document | sinks(2)", "disjoint"),
                                 (128, 128, "document", "scattered"), (64, 64, "document", "scattered")]:
        B, H, HK = 2, 4, 2
        q = torch.randn(B, sq, H, d, dtype=torch.bfloat16)
        k = torch.randn(B, sk, HK, d, dtype=torch.bfloat16)
        v = torch.randn(B, sk, HK, d, dtype=torch.bfloat16)
        if kind == "scattered":
            kd = torch.randint(0, 3, (B, sk), dtype=torch.int32)
            qd = torch.randint(0, 3, (B, sq), dtype=torch.int32)
        else:
            kd = torch.zeros(B, sk, dtype=torch.int32); kd[:, sk // 2:] = 1
            qd = kd.clone(); qd[0, : sq // 3] = 99
        want = longattn.attention(q, k, v, mask, q_doc=qd, k_doc=kd).float()
        got = longattn.attention(q.cuda(), k.cuda(), v.cuda(), mask, q_doc=qd.cuda(), k_doc=kd.cuda()).float().cpu()
        err = (got - want).abs().nan_to_num(99.0)
        bad = (err.amax(-1) > 0.05)
        rows = bad.nonzero().tolist()[:6]
        print(f"D{d} sq{sq} sk{sk} {mask!r} {kind}: max err {err.max():.3g}, bad (b,i,h) {bad.sum().item()} e.g. {rows}", flush=True)
