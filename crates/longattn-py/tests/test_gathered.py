"""longattn.gathered_attention: a caller's per-query-tile selection of whole key tiles and single
keys, through the one entry point (CPU every dtype; CUDA the Hopper forward's gathered chunks),
and its gradients through the same selection. Each output and gradient is checked against the
f64 reference over ``mask & selection``, built here from the same flat lists the call takes; bad
lists raise errors that name them."""
import pytest
import torch

import longattn
from conftest import HAS_CUDA, assert_close, assert_grad_close, require_cuda
from reference import allowed_matrix, ref_attention


def qkv(b, sq, sk, hq, hk, d, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda s, h: torch.randn(b, s, h, d, generator=g).to(dtype).to(device)  # noqa: E731
    return mk(sq, hq), mk(sk, hk), mk(sk, hk)


def random_selection(bs, hs, sq, sk, tq, tk, p, seed):
    """Per (batch row, head, query tile): each key tile whole with probability p / 2, else each
    of its keys with probability p; flat lists in the call's form and the [Bs, Hs, Sq, Sk]
    boolean matrix of the pairs it keeps (before the mask)."""
    g = torch.Generator().manual_seed(seed)
    nq, nk = -(-sq // tq), -(-sk // tk)
    tc = torch.zeros(bs, hs, nq, dtype=torch.int64)
    kc = torch.zeros(bs, hs, nq, dtype=torch.int64)
    tiles, keys = [], []
    kept = torch.zeros(bs, hs, sq, sk, dtype=torch.bool)
    for b in range(bs):
        for h in range(hs):
            for qt in range(nq):
                rows = slice(qt * tq, min(sq, (qt + 1) * tq))
                whole = (torch.rand(nk, generator=g) < p / 2).nonzero().flatten().tolist()
                single = (torch.rand(sk, generator=g) < p).nonzero().flatten().tolist()
                single = [j for j in single if j // tk not in whole]
                tc[b, h, qt], kc[b, h, qt] = len(whole), len(single)
                tiles += whole
                keys += single
                for t in whole:
                    kept[b, h, rows, t * tk:(t + 1) * tk] = True
                kept[b, h, rows, single] = True
    return (tc, torch.tensor(tiles, dtype=torch.int64), kc, torch.tensor(keys, dtype=torch.int64)), kept


def reference(q, k, v, mask, kept):
    b, sq, hq, _ = q.shape
    sk = k.shape[1]
    base = allowed_matrix(mask, b, sq, sk) if mask is not None else torch.ones(b, sq, sk, dtype=torch.bool)
    allowed = base[:, None] & kept.expand(b, hq, sq, sk)
    return ref_attention(q.cpu(), k.cpu(), v.cpu(), allowed=allowed)


CASES = [
    # (b, sq, sk, hq, hk, d, per-head selection, mask)
    (1, 1, 1, 2, 1, 16, False, "causal"),
    (2, 7, 7, 4, 2, 32, True, "causal"),
    (1, 65, 130, 2, 2, 32, True, "causal & (sinks(4) | window(40,0))"),
    (2, 113, 63, 4, 1, 64, False, None),
    (1, 300, 300, 2, 1, 32, True, "causal"),
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gathered_attention_matches_the_reference_cpu(case, dtype):
    b, sq, sk, hq, hk, d, per_head, mask = case
    tq, tk = longattn.gather_tiles(*qkv(1, sq, sk, hq, hk, d, dtype, "cpu"), mask)
    assert (tq, tk) == (64, 64)
    tq, tk = 32, 16  # any tiles run on the CPU
    q, k, v = qkv(b, sq, sk, hq, hk, d, dtype, "cpu", seed=sq + sk)
    bs, hs = (b, hq) if per_head else (1, 1)
    lists, kept = random_selection(bs, hs, sq, sk, tq, tk, 0.3, seed=sq)
    out, lse = longattn.gathered_attention(q, k, v, *lists, mask, tile_q=tq, tile_k=tk, return_lse=True)
    ro, rl = reference(q, k, v, mask, kept)
    assert_close(out, ro, dtype)
    assert_close(lse, rl, dtype, "lse")


def test_gathered_attention_bad_lists_are_named():
    q, k, v = qkv(1, 70, 70, 2, 1, 16, torch.float32, "cpu")
    (tc, t, kc, ks), _ = random_selection(1, 1, 70, 70, 32, 32, 0.3, seed=1)
    run = lambda *a, **kw: longattn.gathered_attention(q, k, v, *a, "causal", tile_q=32, tile_k=32, **kw)  # noqa: E731
    with pytest.raises(ValueError, match="tile_counts"):
        run(tc[:, :, :2], t, kc, ks)
    with pytest.raises(ValueError, match="key counts add up to"):
        run(tc, t, kc + 1, ks)
    zero, none = torch.zeros_like(tc), torch.tensor([], dtype=torch.int64)
    two = torch.zeros_like(kc)
    two[0, 0, 0] = 2
    with pytest.raises(ValueError, match="must ascend"):
        run(zero, none, two, torch.tensor([5, 3]))
    with pytest.raises(ValueError, match=r"\[0, 2\^31 - 1\]"):
        run(zero, none, two, torch.tensor([-1, 3]))
    with pytest.raises(ValueError, match="tile_q"):
        longattn.gathered_attention(q, k, v, tc, t, kc, ks, tile_q=0, tile_k=32)
    with pytest.raises(TypeError, match="integers"):
        run(tc, t.float(), kc, ks)


@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA: no CUDA device (skipped)")
@pytest.mark.parametrize("sq,sk,d", [(1, 1, 128), (200, 700, 128), (1000, 1000, 64), (513, 513, 256)])
def test_gathered_attention_on_cuda(sq, sk, d):
    require_cuda()
    b, hq, hk = 2, 4, 2
    dtype = torch.bfloat16
    q, k, v = qkv(b, sq, sk, hq, hk, d, dtype, "cuda", seed=sq)
    mask = "causal"
    tq, tk = longattn.gather_tiles(q, k, v, mask)
    lists, kept = random_selection(b, hq, sq, sk, tq, tk, 0.2, seed=sk)
    out, lse = longattn.gathered_attention(q, k, v, *lists, mask, tile_q=tq, tile_k=tk, return_lse=True)
    torch.cuda.synchronize()
    ro, rl = reference(q, k, v, mask, kept)
    assert_close(out, ro, dtype)
    assert_close(lse, rl, dtype, "lse")
    with pytest.raises(ValueError, match="tiles"):
        other, _ = random_selection(b, hq, sq, sk, tq // 2, tk, 0.2, seed=1)
        longattn.gathered_attention(q, k, v, *other, mask, tile_q=tq // 2, tile_k=tk)


def gathered_grads(q, k, v, lists, mask, tq, tk, dout, **kw):
    q, k, v = (x.detach().requires_grad_(True) for x in (q, k, v))
    out = longattn.gathered_attention(q, k, v, *lists, mask, tile_q=tq, tile_k=tk, **kw)
    return out, torch.autograd.grad(out, (q, k, v), dout)


def reference_grads(q, k, v, mask, kept, dout):
    l64 = [x.detach().cpu().double().requires_grad_(True) for x in (q, k, v)]
    ro, _ = reference(*l64, mask, kept)
    return torch.autograd.grad(ro, l64, dout.cpu().double())


GRAD_CASES = [
    # (b, sq, sk, hq, hk, d, per-head selection, mask, tiles)
    (1, 1, 113, 4, 2, 32, True, None, (64, 64)),                     # decode row
    (2, 65, 65, 4, 2, 32, True, "causal", (32, 16)),
    (1, 113, 63, 2, 1, 16, False, "causal", (16, 32)),                # Sq > Sk: empty rows
    (1, 63, 130, 2, 2, 32, True, "causal & (sinks(4) | window(40,0))", (64, 64)),
]


@pytest.mark.parametrize("case", GRAD_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gathered_attention_grads_match_the_reference_cpu(case, dtype):
    b, sq, sk, hq, hk, d, per_head, mask, (tq, tk) = case
    q, k, v = qkv(b, sq, sk, hq, hk, d, dtype, "cpu", seed=sq * 3 + sk)
    bs, hs = (b, hq) if per_head else (1, 1)
    lists, kept = random_selection(bs, hs, sq, sk, tq, tk, 0.3, seed=sk)
    g = torch.Generator().manual_seed(5)
    dout = torch.randn(b, sq, hq, d, generator=g).to(dtype)
    out, grads = gathered_grads(q, k, v, lists, mask, tq, tk, dout)
    ref = reference_grads(q, k, v, mask, kept, dout)
    for a, r, n in zip(grads, ref, ("dq", "dk", "dv")):
        assert a.dtype == dtype and a.shape == r.shape, n
        assert_grad_close(a, r, dtype, n)
    # The gradients are the selection's: keys no row of a KV group keeps get none, exactly.
    base = allowed_matrix(mask, b, sq, sk) if mask is not None else torch.ones(b, sq, sk, dtype=torch.bool)
    used = (base[:, None] & kept.expand(b, hq, sq, sk)).any(2)                # [B, Hq, Sk]
    unused = ~used.reshape(b, hk, hq // hk, sk).any(2)                         # [B, Hk, Sk]
    for t in (grads[1], grads[2]):
        assert (t.permute(0, 2, 1, 3)[unused] == 0).all()
    # No grad wanted: the forward alone, same output.
    with torch.no_grad():
        again = longattn.gathered_attention(q, k, v, *lists, mask, tile_q=tq, tile_k=tk)
    assert torch.equal(again, out.detach())


@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA: no CUDA device (skipped)")
@pytest.mark.parametrize("sq,sk,d", [(1, 300, 128), (200, 700, 64), (513, 513, 128)])
def test_gathered_attention_grads_on_cuda(sq, sk, d):
    require_cuda()
    b, hq, hk = 2, 4, 2
    dtype = torch.bfloat16
    q, k, v = qkv(b, sq, sk, hq, hk, d, dtype, "cuda", seed=sq + 1)
    mask = "causal"
    tq, tk = longattn.gather_tiles(q, k, v, mask)
    lists, kept = random_selection(b, hq, sq, sk, tq, tk, 0.2, seed=sk + 1)
    dout = torch.randn(b, sq, hq, d, generator=torch.Generator().manual_seed(9)).to(dtype).cuda()
    _, grads = gathered_grads(q, k, v, lists, mask, tq, tk, dout)
    torch.cuda.synchronize()
    ref = reference_grads(q, k, v, mask, kept, dout)
    for a, r, n in zip(grads, ref, ("dq", "dk", "dv")):
        assert_grad_close(a, r, dtype, n)
