"""The best attention-mass recall any pair selection can reach at a given density, on captured q/k.

For each layer and query head of a capture (`longattn capture ... --dtype f32`, post-RoPE q/k of
shape [1, N, H, D] / [1, N, Hk, D]), with the causal softmax at scale 1/sqrt(D) (no soft-cap):

  greedy d: the head keeps the fraction d of its causal pairs with the largest p_ij, whatever the
            row; this maximises the head's recall (the mean over rows of the kept mass) at that
            density, so no selection of as many pairs does better;
  row d:    every row keeps its own top d of its keys (a per-row budget, as most estimators give).

The greedy threshold comes from a histogram of log2 p (8192 bins over [-80, 0]) with each bin's
pair count and mass, interpolated inside the threshold's bin. Prints one line per head and the
mean and worst head per density.

    longattn capture --model M.gguf --text T.txt --tokens 16384 --layers 5,11,17 --dtype f32 \\
        --output cap.safetensors
    python3 scripts/pair_ceiling.py cap.safetensors 5,11,17 [--densities 0.1,0.2,0.3]

Needs torch and safetensors; about 10 minutes for 3 layers x 4 heads at 16k on 2 cores.
"""
import argparse
import math

import torch
from safetensors import safe_open

BINS, LOG2_MIN = 8192, -80.0


def head_ceiling(q, k, densities):
    """q [N, D], k [N, D] (one head): {("greedy" | "row", d): recall}."""
    n, d = q.shape
    scale = 1.0 / math.sqrt(d)
    count = torch.zeros(BINS, dtype=torch.float64)
    mass = torch.zeros(BINS, dtype=torch.float64)
    row_sum = {x: 0.0 for x in densities}
    for r0 in range(0, n, 1024):
        r1 = min(n, r0 + 1024)
        s = (q[r0:r1] @ k[:r1].T) * scale
        ii = torch.arange(r0, r1).unsqueeze(1)
        jj = torch.arange(r1).unsqueeze(0)
        allowed = jj <= ii
        p = torch.softmax(s.double().masked_fill(~allowed, float("-inf")), dim=1)
        lp = torch.log2(p.clamp_min(2.0**LOG2_MIN)).float()
        b = ((lp - LOG2_MIN) / -LOG2_MIN * (BINS - 1)).long().clamp(0, BINS - 1)
        count += torch.bincount(b[allowed], minlength=BINS).double()
        mass += torch.bincount(b[allowed], weights=p[allowed], minlength=BINS)
        cum = torch.cumsum(torch.sort(p, dim=1, descending=True)[0], dim=1)
        keys = (torch.arange(r0, r1) + 1).double()
        for x in densities:
            last = torch.ceil(x * keys).long().clamp_min(1) - 1
            row_sum[x] += cum.gather(1, last.unsqueeze(1)).sum().item()
    pairs = n * (n + 1) / 2
    out = {}
    for x in densities:
        want, c_acc, m_acc = x * pairs, 0.0, 0.0
        for bi in range(BINS - 1, -1, -1):
            c = count[bi].item()
            if c_acc + c >= want:
                m_acc += (want - c_acc) / max(c, 1.0) * mass[bi].item()
                break
            c_acc += c
            m_acc += mass[bi].item()
        out[("greedy", x)] = m_acc / n
        out[("row", x)] = row_sum[x] / n
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("capture")
    ap.add_argument("layers")
    ap.add_argument("--densities", default="0.1,0.2,0.3")
    a = ap.parse_args()
    densities = [float(x) for x in a.densities.split(",")]
    torch.set_num_threads(max(1, torch.get_num_threads()))
    f = safe_open(a.capture, "pt")
    rows = []
    for layer in a.layers.split(","):
        q = f.get_tensor(f"q.{layer}")[0].float()
        k = f.get_tensor(f"k.{layer}")[0].float()
        heads, group = q.shape[1], q.shape[1] // k.shape[1]
        for h in range(heads):
            r = head_ceiling(q[:, h], k[:, h // group], densities)
            rows.append(r)
            cells = " ".join(f"{kind}{x}={v:.4f}" for (kind, x), v in r.items())
            print(f"layer {layer} head {h}: {cells}", flush=True)
    for x in densities:
        for kind in ("greedy", "row"):
            v = [r[(kind, x)] for r in rows]
            print(f"density {x} {kind}: mean {sum(v) / len(v):.4f} worst {min(v):.4f}")


if __name__ == "__main__":
    main()
