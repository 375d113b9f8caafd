"""What a per-row selection costs a tile kernel: the work of the rows' own keys at tile granularity.

For each layer and query head of a capture (`longattn capture ... --dtype f32`, post-RoPE q/k of
shape [1, N, H, D] / [1, N, Hk, D]), with the exact causal softmax at scale 1/sqrt(D) (no
soft-cap), every row keeps its `sink` first keys and its `local`-key band, then its other keys by
probability until the kept keys hold gamma of its mass (the rule of `lowbit_mass`, here on the
exact probabilities). Printed per head and over all heads:

  elem:     kept pairs / causal pairs (the selection's density);
  tileT:    causal T x T tiles holding a kept pair / causal tiles (what a kernel that computes
            every tile it must touch does, with T = 64 and 128);
  gatherG:  sum over groups of G consecutive rows of G x |union of their kept keys|, over causal
            pairs (what a kernel that gathers one key list for G rows does, G = 16, 64, 128).

    longattn capture --model M.gguf --text T.txt --tokens 16384 --layers 5,11,17 --dtype f32 \\
        --output cap.safetensors
    python3 scripts/row_cover.py cap.safetensors 5,11,17 [--gamma 0.96]

Needs torch and safetensors; about 3 minutes for 3 layers x 4 heads at 16k on 2 cores.
"""
import argparse
import math

import torch
from safetensors import safe_open

TILES, GROUPS, CHUNK = (64, 128), (16, 64, 128), 512


def head_cover(q, k, gamma, sink, local):
    """q [N, D], k [N, D] (one head): dict of the counts above (pairs, kept, tiles, gathers)."""
    n, d = q.shape
    scale = 1.0 / math.sqrt(d)
    out = {"pairs": 0, "kept": 0}
    tiles = {t: torch.zeros(n // t + 1, n // t + 1, dtype=torch.bool) for t in TILES}
    gathered = {g: 0 for g in GROUPS}
    cols = torch.arange(n).unsqueeze(0)
    for r0 in range(0, n, CHUNK):
        r1 = min(n, r0 + CHUNK)
        rows = torch.arange(r0, r1).unsqueeze(1)
        allowed = cols <= rows
        s = ((q[r0:r1] @ k.T) * scale).masked_fill(~allowed, float("-inf"))
        p = torch.softmax(s, dim=-1)
        forced = allowed & ((cols < sink) | (rows - cols < local))
        # The forced keys first (weight 2 sorts them ahead), then the others by probability;
        # a key is kept while the mass before it is below gamma.
        order, idx = p.masked_fill(forced, 2.0).sort(dim=-1, descending=True)
        mass = order.clamp(max=1.0) * (order <= 1.0)
        before = mass.cumsum(-1) - mass + (p * forced).sum(-1, keepdim=True)
        take = ((before < gamma) | (order > 1.5)) & (order > 0)
        keep = torch.zeros_like(allowed).scatter_(1, idx, take) & allowed
        out["pairs"] += int(allowed.sum())
        out["kept"] += int(keep.sum())
        for t in TILES:
            nr = r1 - r0
            pad_r, pad_c = (-nr) % t, (-n) % t
            kp = torch.nn.functional.pad(keep, (0, pad_c, 0, pad_r))
            hit = kp.view(kp.shape[0] // t, t, kp.shape[1] // t, t).any(3).any(1)
            tiles[t][r0 // t : r0 // t + hit.shape[0], : hit.shape[1]] |= hit
        for g in GROUPS:
            for a in range(0, r1 - r0, g):
                union = keep[a : a + g].any(0)
                gathered[g] += min(g, r1 - r0 - a) * int(union.sum())
    for t in TILES:
        nt = n // t + (n % t > 0)
        out[f"tile{t}"] = int(tiles[t][:nt, :nt].sum())
        out[f"causal_tiles{t}"] = nt * (nt + 1) // 2
    for g in GROUPS:
        out[f"gather{g}"] = gathered[g]
    return out


def line(tag, c):
    cells = [f"elem {c['kept'] / c['pairs']:.3f}"]
    cells += [f"tile{t} {c[f'tile{t}'] / c[f'causal_tiles{t}']:.3f}" for t in TILES]
    cells += [f"gather{g} {c[f'gather{g}'] / c['pairs']:.3f}" for g in GROUPS]
    print(f"{tag}: " + ", ".join(cells), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("capture")
    ap.add_argument("layers")
    ap.add_argument("--gamma", type=float, default=0.96)
    ap.add_argument("--sink", type=int, default=4)
    ap.add_argument("--local", type=int, default=64)
    a = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    total = {}
    with safe_open(a.capture, "pt") as f:
        for layer in a.layers.split(","):
            q, k = f.get_tensor(f"q.{layer}")[0].float(), f.get_tensor(f"k.{layer}")[0].float()
            hq, hk = q.shape[1], k.shape[1]
            for h in range(hq):
                c = head_cover(q[:, h], k[:, h // (hq // hk)], a.gamma, a.sink, a.local)
                line(f"layer {layer} head {h}", c)
                for key, x in c.items():
                    total[key] = total.get(key, 0) + x
    line(f"all heads (gamma {a.gamma})", total)


if __name__ == "__main__":
    main()
