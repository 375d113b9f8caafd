#!/usr/bin/env python3
"""kvpress on the same weights and token ids as longattn (issue 16).

Runs under an environment with kvpress (it pins transformers < 5.3, and transformers 5.2 wants
`kernels>=0.10.2,<0.11`), torch and gguf:

    python scripts/kvpress_compare.py --longattn target/release/longattn \
        --text ~/.cache/longattn/gutenberg/austen-emma.txt --skip 2000 --tokens 1024 --score 128 \
        --budgets 0.5,0.2 --out /tmp/kvpress

For each press and budget B:
  * ours: `longattn kv keep` prefills the context in one forward, compresses every layer once and
    writes the kept positions per (layer, KV head), the values ranked, the token ids, the cache's
    bytes and the NLL of the `--score` tokens that follow (appended uncompressed);
  * kvpress: the GGUF loaded by transformers (dequantized to f32, eager attention), the same ids,
    the press as a context manager over the context's forward; its `score` method is wrapped to
    record each layer's scores, and the kept indices are `scores.topk(n).indices` with n the length
    the press left in the cache (the very call ScorerPress.compress makes on the same tensor); the
    scored tokens are then fed one at a time at their true positions (as kvpress's pipeline does
    with `position_ids`), and the cache's bytes are those of its key and value tensors.
The kept sets are compared per (layer, KV head) by Jaccard; ties are the entries whose kvpress
score lies within a relative 1e-4 of the score at the cut (the n-th largest), where the two
sides' float sums may order them differently.

The number kept: ours keeps ceil(B L) of L entries, kvpress int(L (1 - r)); the script gives
kvpress r = 1 - (ceil(B L) + 0.5) / L so that both keep the same count (PyramidKV: r = 1 - B and
our `counts=kvpress`, its per-layer counts).
"""
import argparse
import json
import math
import os
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

REL_TIE = 1e-4


def load_model(gguf):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    d, f = os.path.split(os.path.abspath(gguf))
    m = AutoModelForCausalLM.from_pretrained(
        d, gguf_file=f, dtype=torch.float32, attn_implementation="eager"
    )
    m.eval()
    return m


def ours_keep(args, spec, out, ids_file=None):
    cmd = [args.longattn, "kv", "keep", "--model", args.model, "--tokens", str(args.tokens),
           "--score", str(args.score), "--kv", spec, "--json", out, "--threads", str(args.threads)]
    if ids_file:
        cmd += ["--ids", ids_file]
    else:
        cmd += ["--text", args.text, "--skip", str(args.skip)]
    t0 = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"longattn kv keep failed ({spec}):\n{r.stderr}")
    with open(out) as fh:
        rep = json.load(fh)
    rep["seconds"] = time.time() - t0
    return rep


def kvpress_presses(budget, L):
    """(name, our spec, our spec under our own defaults or None, kvpress press) per press."""
    from kvpress import (KnormPress, ObservedAttentionPress, PyramidKVPress, SnapKVPress,
                         StreamingLLMPress, TOVAPress)

    n = math.ceil(budget * L)
    r = 1.0 - (n + 0.5) / L  # int(L (1 - r)) == n
    b = f"budget={budget}"
    return [
        ("StreamingLLM", f"streaming(sinks=4,window={n - 4})", None,
         StreamingLLMPress(compression_ratio=r, n_sink=4)),
        ("SnapKV", f"snapkv({b},window=64,kernel=5,pool=avg)", f"snapkv({b},window=64,kernel=5)",
         SnapKVPress(compression_ratio=r, window_size=64, kernel_size=5)),
        ("ObservedAttention", f"h2o({b},recent=0,score=mean)", f"h2o({b})",
         ObservedAttentionPress(compression_ratio=r)),
        ("TOVA", f"tova({b},heads=layer)", f"tova({b})", TOVAPress(compression_ratio=r)),
        ("Knorm", f"knorm({b})", None, KnormPress(compression_ratio=r)),
        # kvpress's beta: layer 0 keeps (2 beta - 1) times the last layer's budget; ours is that
        # ratio, so kvpress beta=2 is our beta=3.
        ("PyramidKV", f"pyramid({b},window=64,kernel=5,beta=3,pool=avg,counts=kvpress)",
         f"pyramid({b},window=64,kernel=5,beta=3,pool=avg)",
         PyramidKVPress(compression_ratio=1.0 - budget, window_size=64, kernel_size=5, beta=2)),
    ]


def run_kvpress(model, press, ctx, cont, one_by_one=False):
    """Kept indices and scores per layer [Hk][n], the cache's bytes, the NLL of `cont`."""
    from transformers import DynamicCache

    recorded = {}
    if press is not None:
        orig = press.score

        def score(module, *a, **kw):
            s = orig(module, *a, **kw)
            recorded[module.layer_idx] = s.detach().clone()
            return s

        press.score = score
    cache = DynamicCache()
    ids = torch.tensor([ctx])
    with torch.no_grad():
        if press is not None:
            with press(model):
                out = model(input_ids=ids, past_key_values=cache)
        else:
            out = model(input_ids=ids, past_key_values=cache)
    if press is not None:
        press.score = orig
    layers = len(cache.layers)
    kept, scores = [], []
    nbytes = 0
    for li in range(layers):
        k, v = cache.layers[li].keys, cache.layers[li].values
        nbytes += k.numel() * k.element_size() + v.numel() * v.element_size()
        if press is None:
            continue
        s = recorded[li][0]  # [Hk, L]
        n = k.shape[2]
        idx = s.topk(n, dim=-1).indices  # the call ScorerPress.compress makes
        kept.append([sorted(row.tolist()) for row in idx])
        scores.append(s.float().tolist())
        # The cache holds exactly those keys (gathered in topk order).
        assert n <= s.shape[-1]
    # NLL of cont: the context's last logits predict cont[0], a forward over cont[:-1] at its
    # true positions (kvpress's pipeline passes position_ids: the compressed cache is shorter than
    # the positions seen) the rest. When the layers hold different lengths (PyramidKV) one
    # causal mask cannot serve them all, so the tokens go one at a time.
    L = len(ctx)
    lens = {cache.layers[li].keys.shape[2] for li in range(layers)}
    # The scored tokens through SDPA: with one query row it takes no mask (eager's mask has
    # layer 0's length, which fails on PyramidKV's shorter layers).
    model.set_attn_implementation("sdpa")
    nll = [float(torch.nn.functional.cross_entropy(out.logits[0, -1:], torch.tensor(cont[:1])))]
    with torch.no_grad():
        if len(lens) == 1 and not one_by_one:
            o = model(input_ids=torch.tensor([cont[:-1]]), past_key_values=cache,
                      position_ids=torch.arange(L, L + len(cont) - 1)[None])
            nll += torch.nn.functional.cross_entropy(
                o.logits[0], torch.tensor(cont[1:]), reduction="none").tolist()
        else:
            for i, t in enumerate(cont[:-1]):
                o = model(input_ids=torch.tensor([[t]]), past_key_values=cache,
                          position_ids=torch.tensor([[L + i]]))
                nll.append(float(torch.nn.functional.cross_entropy(
                    o.logits[0, -1:], torch.tensor([cont[i + 1]]))))
    model.set_attn_implementation("eager")
    return kept, scores, nbytes, nll


def near_cut(scores, n):
    """Entries whose order at the cut is a matter of ties: those within REL_TIE of the n-th
    largest score, when that group straddles the cut (some kept, some not). A group wholly kept
    (StreamingLLM's ones, kvpress's padded windows) is no tie."""
    if n == 0 or n >= len(scores):
        return set()
    cut = sorted(scores, reverse=True)[n - 1]
    tol = REL_TIE * max(abs(cut), 1e-30)
    group = {j for j, s in enumerate(scores) if abs(s - cut) <= tol}
    above = sum(1 for s in scores if s > cut + tol)
    if above + len(group) <= n:
        return set()
    return group


def compare(ours, kv_kept, kv_scores):
    """Per (layer, head) Jaccard, Jaccard apart from near-ties, tie counts."""
    hk = ours["kv_heads"]
    rows = []
    for h in ours["heads"]:
        li, kh = h["layer"], h["kv_head"]
        a = set(h["kept"])
        b = set(kv_kept[li][kh])
        s = kv_scores[li][kh]
        # kvpress pads forced entries with max + 1: treat anything above every real score as
        # forced (never at the cut).
        ties = near_cut(s, len(b))
        j = len(a & b) / len(a | b)
        a2, b2 = a - ties, b - ties
        j2 = len(a2 & b2) / max(1, len(a2 | b2))
        rows.append((li, kh, j, j2, len(ties), len(a), len(b), len(a ^ b), len(b - a)))
    assert len(rows) == len(ours["heads"]) and hk > 0
    return rows


def weight_check(args, model, ids):
    """Mean NLL of `ids` under transformers against `longattn eval --ids` (same weights)."""
    f = os.path.join(args.out, "ids_check.txt")
    with open(f, "w") as fh:
        fh.write(" ".join(map(str, ids)))
    js = os.path.join(args.out, "eval_check.json")
    r = subprocess.run([args.longattn, "eval", "--model", args.model, "--ids", f, "--tokens",
                        str(len(ids)), "--json", js, "--threads", str(args.threads)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"longattn eval failed:\n{r.stderr}")
    with open(js) as fh:
        ours = json.load(fh)["nll_mean"]
    with torch.no_grad():
        lg = model(input_ids=torch.tensor([ids])).logits[0, :-1]
    theirs = float(torch.nn.functional.cross_entropy(lg, torch.tensor(ids[1:])))
    return ours, theirs


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--longattn", default="target/release/longattn")
    ap.add_argument("--model", default=os.path.expanduser(
        "~/.cache/longattn/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--text", default=os.path.expanduser(
        "~/.cache/longattn/gutenberg/austen-emma.txt"))
    ap.add_argument("--skip", type=int, default=2000)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--score", type=int, default=128)
    ap.add_argument("--budgets", default="0.5,0.2")
    ap.add_argument("--presses", default="", help="comma-separated names (default: all six)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="/tmp/kvpress_compare")
    ap.add_argument("--weight-check", type=int, default=256,
                    help="tokens of the NLL check of the weights (0: none)")
    ap.add_argument("--check-one-by-one", action="store_true",
                    help="also score the full cache's tokens one at a time (mask check)")
    ap.add_argument("--markdown", help="print the tables of an earlier result.json and stop")
    args = ap.parse_args()
    if args.markdown:
        with open(args.markdown) as fh:
            print(markdown(json.load(fh)))
        return
    os.makedirs(args.out, exist_ok=True)
    torch.set_num_threads(args.threads)
    budgets = [float(x) for x in args.budgets.split(",")]
    want = set(filter(None, args.presses.split(",")))

    model = load_model(args.model)
    L, S = args.tokens, args.score
    # Full cache on both sides (and the token ids, from our tokenizer).
    full = ours_keep(args, "knorm(budget=1)", os.path.join(args.out, "full.json"))
    ids = full["ids"]
    ids_file = os.path.join(args.out, "ids.txt")
    with open(ids_file, "w") as fh:
        fh.write(" ".join(map(str, ids)))
    ctx, cont = ids[:L], ids[L:]
    result = {"tokens": L, "score": S, "text": args.text, "skip": args.skip, "rows": [],
              "jaccard": []}
    if args.weight_check:
        o, t = weight_check(args, model, ids[:args.weight_check])
        print(f"weights: NLL of {args.weight_check} ids, longattn {o:.6f}, transformers {t:.6f}, "
              f"difference {abs(o - t):.2e}")
        result["weight_check"] = {"tokens": args.weight_check, "longattn": o, "transformers": t}
    t0 = time.time()
    _, _, kv_full_bytes, kv_full_nll = run_kvpress(model, None, ctx, cont)
    t1 = time.time()
    if args.check_one_by_one:
        _, _, _, nll1 = run_kvpress(model, None, ctx, cont, one_by_one=True)
        print(f"full cache, scored tokens in one forward {sum(kv_full_nll) / S:.6f} "
              f"vs one at a time {sum(nll1) / S:.6f}")
    print(f"kvpress full-cache run {t1 - t0:.1f} s")
    result["full"] = {"ours_nll": full["nll_mean"], "kvpress_nll": sum(kv_full_nll) / S,
                      "ours_bytes": full["kv_bytes"], "kvpress_bytes": kv_full_bytes}
    print(f"full cache: NLL ours {full['nll_mean']:.4f} kvpress {sum(kv_full_nll) / S:.4f}; "
          f"bytes ours {full['kv_bytes']} kvpress {kv_full_bytes}")
    for budget in budgets:
        for name, spec, own, press in kvpress_presses(budget, L):
            if want and name not in want:
                continue
            t0 = time.time()
            kv_kept, kv_scores, kv_bytes, kv_nll = run_kvpress(model, press, ctx, cont)
            kv_s = time.time() - t0
            for which, sp in (("kvpress convention", spec), ("our defaults", own)):
                if sp is None:
                    continue
                ours = ours_keep(args, sp, os.path.join(args.out, "ours.json"), ids_file)
                assert ours["ids"] == ids
                rows = compare(ours, kv_kept, kv_scores)
                js = [r[2] for r in rows]
                j2 = [r[3] for r in rows]
                ties = sum(r[4] for r in rows)
                differ = sum(r[7] for r in rows)
                only_kv = sum(r[8] for r in rows)
                rec = {"press": name, "budget": budget, "ours": sp, "which": which,
                       "jaccard_mean": sum(js) / len(js), "jaccard_min": min(js),
                       "jaccard_ex_ties_mean": sum(j2) / len(j2), "jaccard_ex_ties_min": min(j2),
                       "tied_entries": ties, "differing_entries": differ,
                       "kvpress_only_entries": only_kv,
                       "kept_ours": sum(r[5] for r in rows), "kept_kvpress": sum(r[6] for r in rows),
                       "worst": min(rows, key=lambda r: r[2])[:2]}
                result["jaccard"].append(rec)
                print(f"{name:18s} B={budget:<4} {sp:48s} Jaccard mean {rec['jaccard_mean']:.4f} "
                      f"min {rec['jaccard_min']:.4f} (apart from ties: {rec['jaccard_ex_ties_mean']:.4f}"
                      f" / {rec['jaccard_ex_ties_min']:.4f}; {ties} near-tie entries, {differ} differ,"
                      f" {only_kv} kept by kvpress alone;"
                      f" kept {rec['kept_ours']} / {rec['kept_kvpress']})", flush=True)
                if which == "kvpress convention":
                    result["rows"].append({
                        "press": name, "budget": budget, "ours": sp,
                        "ours_nll": ours["nll_mean"], "kvpress_nll": sum(kv_nll) / S,
                        "ours_bytes": ours["kv_bytes"], "ours_bytes_entries": ours["kv_bytes_entries"],
                        "kvpress_bytes": kv_bytes, "ours_seconds": ours["seconds"],
                        "kvpress_seconds": kv_s})
                    print(f"{'':18s} NLL of {S} next tokens: ours {ours['nll_mean']:.4f} kvpress "
                          f"{sum(kv_nll) / S:.4f}; KV bytes ours {ours['kv_bytes']} (entries "
                          f"{ours['kv_bytes_entries']}) kvpress {kv_bytes}", flush=True)
    with open(os.path.join(args.out, "result.json"), "w") as fh:
        json.dump(result, fh, indent=1)
    print(markdown(result))


def markdown(result):
    """The two tables of docs/QUALITY.md from a result."""
    out = ["| kvpress press | B | our spec | Jaccard mean / min | apart from ties mean / min "
           "| near-tie entries | entries kept ours / kvpress |", "|---|---|---|---|---|---|---|"]
    for r in result["jaccard"]:
        out.append(f"| {r['press']} | {r['budget']} | `{r['ours']}` | {r['jaccard_mean']:.4f} / "
                   f"{r['jaccard_min']:.4f} | {r['jaccard_ex_ties_mean']:.4f} / "
                   f"{r['jaccard_ex_ties_min']:.4f} | {r['tied_entries']} | {r['kept_ours']} / "
                   f"{r['kept_kvpress']} |")
    f = result["full"]
    mib = 1 / 1048576
    out += ["", f"| press | B | NLL ours | NLL kvpress | KV MiB ours: pages in use (entries) "
            f"| KV MiB kvpress (tensors) |", "|---|---|---|---|---|---|",
            f"| full cache | 1 | {f['ours_nll']:.4f} | {f['kvpress_nll']:.4f} | "
            f"{f['ours_bytes'] * mib:.2f} | {f['kvpress_bytes'] * mib:.2f} |"]
    for r in result["rows"]:
        out.append(f"| {r['press']} | {r['budget']} | {r['ours_nll']:.4f} | {r['kvpress_nll']:.4f}"
                   f" | {r['ours_bytes'] * mib:.2f} ({r['ours_bytes_entries'] * mib:.2f}) | "
                   f"{r['kvpress_bytes'] * mib:.2f} |")
    return "\n".join(out)


if __name__ == "__main__":
    main()
