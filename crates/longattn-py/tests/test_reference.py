"""Checks of the float64 reference itself (no longattn needed): against PyTorch's SDPA and
against hand-written loops, so a failure elsewhere points at the package, not the reference."""
import math

import pytest
import torch
import torch.nn.functional as F

from reference import (allowed_matrix, flash_allowed, gather_pages, parse_mask, ref_attention,
                       ref_flash, ref_kvcache, ref_varlen)


def _sdpa(q, k, v, attn_mask=None, is_causal=False, scale=None):
    # SDPA layout is [B, H, S, D]; GQA by explicit repeat.
    hq, hk = q.shape[2], k.shape[2]
    k = k.repeat_interleave(hq // hk, dim=2)
    v = v.repeat_interleave(hq // hk, dim=2)
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       attn_mask=attn_mask, is_causal=is_causal, scale=scale)
    return o.transpose(1, 2)


@pytest.mark.parametrize("s", [1, 7, 65])
@pytest.mark.parametrize("hq,hk", [(4, 4), (4, 2), (4, 1)])
def test_causal_square_matches_sdpa(s, hq, hk):
    q = torch.randn(2, s, hq, 16, dtype=torch.float64)
    k = torch.randn(2, s, hk, 16, dtype=torch.float64)
    v = torch.randn(2, s, hk, 24, dtype=torch.float64)
    out, lse = ref_attention(q, k, v, "causal")
    torch.testing.assert_close(out, _sdpa(q, k, v, is_causal=True), atol=1e-12, rtol=1e-10)
    # lse against a direct logsumexp
    kk = k.repeat_interleave(hq // hk, dim=2)
    logits = torch.einsum("bihd,bjhd->bhij", q, kk) / 4.0
    logits = logits.masked_fill(~torch.ones(s, s, dtype=torch.bool).tril(), float("-inf"))
    torch.testing.assert_close(lse, torch.logsumexp(logits, -1), atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("sq,sk", [(7, 65), (65, 7), (1, 63)])
def test_bottom_right_causal_and_window_vs_sdpa_mask(sq, sk):
    q = torch.randn(1, sq, 2, 8, dtype=torch.float64)
    k = torch.randn(1, sk, 2, 8, dtype=torch.float64)
    v = torch.randn(1, sk, 2, 8, dtype=torch.float64)
    for expr in ["causal", "window(3,2)", "causal & (sinks(2) | window(4,0))", "chunk(5)"]:
        allowed = allowed_matrix(expr, 1, sq, sk)[0]
        # explicit loop definition
        for i in range(sq):
            pos = i + sk - sq
            for j in range(sk):
                want = {
                    "causal": j <= pos,
                    "window(3,2)": pos - 3 <= j <= pos + 2,
                    "causal & (sinks(2) | window(4,0))": j <= pos and (j < 2 or pos - 4 <= j),
                    "chunk(5)": math.floor(pos / 5) == j // 5,
                }[expr]
                assert bool(allowed[i, j]) == want, (expr, i, j)
        out, lse = ref_attention(q, k, v, expr)
        rows = allowed.any(-1)
        if rows.any():
            ref = _sdpa(q[:, rows], k, v, attn_mask=allowed[rows])
            torch.testing.assert_close(out[:, rows], ref, atol=1e-12, rtol=1e-10)
        assert (out[:, ~rows] == 0).all()
        assert torch.isneginf(lse[:, :, ~rows]).all()


def test_mask_precedence_and_documents():
    # a | b & !c == a | (b & (!c))
    a = allowed_matrix("sinks(1) | causal & !window(1,0)", 1, 6, 6)
    b = allowed_matrix("sinks(1) | (causal & (!window(1,0)))", 1, 6, 6)
    assert torch.equal(a, b)
    qd = torch.tensor([[0, 0, 1, 1, 2]], dtype=torch.int32)
    kd = torch.tensor([[0, 1, 1, 1, 2]], dtype=torch.int32)
    m = allowed_matrix("causal & document", 1, 5, 5, qd, kd)[0]
    want = torch.tensor([[1, 0, 0, 0, 0], [1, 0, 0, 0, 0], [0, 1, 1, 0, 0], [0, 1, 1, 1, 0],
                         [0, 0, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(m, want)
    with pytest.raises(ValueError):
        parse_mask("causal & foo(3)")


def test_flash_allowed():
    m = flash_allowed(3, 5, causal=True, window_size=(1, -1))
    want = torch.tensor([[0, 1, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 0, 1, 1]], dtype=torch.bool)
    assert torch.equal(m, want)
    assert flash_allowed(4, 4).all()


def test_grads_finite_on_empty_rows_and_match_sdpa():
    q = torch.randn(1, 9, 2, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 4, 2, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 4, 2, 8, dtype=torch.float64, requires_grad=True)
    out, lse = ref_attention(q, k, v, "causal", softcap=3.0)
    dout = torch.randn_like(out)
    g = torch.autograd.grad((out * dout).sum(), (q, k, v))
    assert all(torch.isfinite(x).all() for x in g)
    assert (g[0][:, :5] == 0).all()  # rows 0..4 have pos < 0: no key
    # without softcap, compare grads of the non-empty rows against SDPA's autograd
    out, _ = ref_attention(q, k, v, "causal")
    g = torch.autograd.grad((out[:, 5:] * dout[:, 5:]).sum(), (q, k, v))
    q2, k2, v2 = (x.detach().clone().requires_grad_() for x in (q, k, v))
    m = allowed_matrix("causal", 1, 9, 4)[0, 5:]
    o2 = _sdpa(q2[:, 5:], k2, v2, attn_mask=m)
    g2 = torch.autograd.grad((o2 * dout[:, 5:]).sum(), (q2, k2, v2))
    for a, b in zip(g, g2):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


def test_softcap_and_scale():
    q = torch.randn(1, 5, 1, 4, dtype=torch.float64) * 4
    k = torch.randn(1, 5, 1, 4, dtype=torch.float64)
    v = torch.randn(1, 5, 1, 4, dtype=torch.float64)
    out, lse = ref_attention(q, k, v, None, scale=0.7, softcap=2.0)
    s = 0.7 * torch.einsum("bihd,bjhd->bhij", q, k)
    s = 2.0 * torch.tanh(s / 2.0)
    torch.testing.assert_close(lse, torch.logsumexp(s, -1))
    torch.testing.assert_close(out, torch.einsum("bhij,bjhd->bihd", s.softmax(-1), v))


def test_varlen_and_paged_kvcache_consistent():
    torch.manual_seed(0)
    lens_k = [4, 5, 9]  # query lengths 1, 5, 3
    cq = torch.tensor([0, 1, 6, 9], dtype=torch.int32)
    ck = torch.tensor([0, 4, 9, 18], dtype=torch.int32)
    q = torch.randn(9, 2, 8, dtype=torch.float64)
    k = torch.randn(18, 1, 8, dtype=torch.float64)
    v = torch.randn(18, 1, 8, dtype=torch.float64)
    out, lse = ref_varlen(q, k, v, cq, ck, causal=True)
    assert lse.shape == (2, 9)
    for b in range(3):
        o, l = ref_flash(q[None, cq[b]:cq[b + 1]], k[None, ck[b]:ck[b + 1]],
                         v[None, ck[b]:ck[b + 1]], causal=True)
        torch.testing.assert_close(out[cq[b]:cq[b + 1]], o[0])
    # the same keys through a shuffled paged cache, page size 4
    page, nblk = 4, 12
    kc = torch.randn(nblk, page, 1, 8, dtype=torch.float64)
    vc = torch.randn(nblk, page, 1, 8, dtype=torch.float64)
    perm = torch.randperm(nblk).to(torch.int32)
    bt = perm[:9].view(3, 3)
    for b in range(3):
        for t in range(lens_k[b]):
            kc[bt[b, t // page], t % page] = k[ck[b] + t]
            vc[bt[b, t // page], t % page] = v[ck[b] + t]
    o2, l2 = ref_varlen(q, kc, vc, cq, ck, causal=True, block_table=bt)
    torch.testing.assert_close(o2, out)
    torch.testing.assert_close(l2, lse)
    assert torch.equal(gather_pages(kc, bt[2], 9), k[9:18])


def test_kvcache_append_matches_concat():
    torch.manual_seed(1)
    B, Sc, H, D = 2, 16, 2, 8
    kc = torch.randn(B, Sc, H, D)
    vc = torch.randn(B, Sc, H, D)
    seqlens = torch.tensor([3, 10], dtype=torch.int32)
    q = torch.randn(B, 2, H, D)
    kn = torch.randn(B, 2, H, D)
    vn = torch.randn(B, 2, H, D)
    out, lse, kc2, vc2 = ref_kvcache(q, kc, vc, kn, vn, seqlens, causal=True)
    assert torch.equal(kc2[0, 3:5], kn[0]) and torch.equal(kc2[1, 10:12], kn[1])
    assert torch.equal(kc2[0, :3], kc[0, :3]) and torch.equal(kc2[0, 5:], kc[0, 5:])
    for b, L in enumerate([3, 10]):
        kk = torch.cat([kc[b, :L], kn[b]])[None]
        vv = torch.cat([vc[b, :L], vn[b]])[None]
        o, _ = ref_flash(q[b:b + 1], kk, vv, causal=True)
        torch.testing.assert_close(out[b:b + 1], o)
