"""longattn.attention and longattn.Mask against the float64 reference."""
import math

import pytest
import torch

import longattn
from conftest import assert_close, assert_grad_close, leaf64, randn, skip_unsupported
from reference import allowed_matrix, ref_attention

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16


def make_qkv(device, dtype, B, Sq, Sk, Hq, Hk, D, Dv=None, qscale=1.0, requires_grad=False):
    Dv = D if Dv is None else Dv
    q = randn(B, Sq, Hq, D, dtype=dtype, device=device, scale=qscale)
    k = randn(B, Sk, Hk, D, dtype=dtype, device=device)
    v = randn(B, Sk, Hk, Dv, dtype=dtype, device=device)
    if requires_grad:
        for x in (q, k, v):
            x.requires_grad_(True)
    return q, k, v


def make_docs(device, B, Sq, Sk, kind="packed"):
    """Document ids int32: q_doc [B,Sq], k_doc [B,Sk].

    packed: sorted runs of random lengths, queries are the last Sq keys' documents (a prefill of
    packed sequences, bottom-right aligned); scattered: ids 0..2 in random order (documents need
    not be contiguous); disjoint: batch 0's queries include an id no key has (empty rows).
    """
    if kind == "scattered":
        kd = torch.randint(0, 3, (B, Sk), dtype=torch.int32)
        qd = torch.randint(0, 3, (B, Sq), dtype=torch.int32)
    else:
        kd = torch.zeros(B, Sk, dtype=torch.int32)
        for b in range(B):
            cuts = torch.sort(torch.randperm(max(Sk - 1, 1))[: min(4, max(Sk - 1, 0))] + 1).values
            for c in cuts.tolist():
                kd[b, c:] += 1
        if Sq <= Sk:
            qd = kd[:, Sk - Sq:].clone()
        else:
            qd = torch.cat([torch.full((B, Sq - Sk), -1, dtype=torch.int32), kd], 1)
        if kind == "disjoint":
            qd[0, : max(1, Sq // 3)] = 99
    return qd.to(device), kd.to(device)


def run_and_check(q, k, v, mask, dtype, *, scale=None, softcap=None, q_doc=None, k_doc=None):
    out, lse = longattn.attention(q, k, v, mask, scale=scale, softcap=softcap, q_doc=q_doc,
                                  k_doc=k_doc, return_lse=True)
    B, Sq, Hq, _ = q.shape
    assert out.dtype == dtype and out.device == q.device
    assert out.shape == (B, Sq, Hq, v.shape[-1])
    assert lse.dtype == torch.float32 and lse.shape == (B, Hq, Sq) and lse.device == q.device
    ro, rl = ref_attention(q.cpu(), k.cpu(), v.cpu(), mask, scale=scale, softcap=softcap,
                           q_doc=None if q_doc is None else q_doc.cpu(),
                           k_doc=None if k_doc is None else k_doc.cpu())
    assert_close(out, ro, dtype, "out")
    assert_close(lse, rl, dtype, "lse")
    return out, lse, ro, rl


# (mask, Sq, Sk, Hq, Hk): awkward sizes, both Sq < Sk and Sq > Sk, decode, GQA and MQA.
MASK_CASES = [
    ("causal", 113, 113, 4, 2),
    ("causal", 1, 1, 2, 1),
    ("causal", 7, 65, 4, 4),            # Sq < Sk: bottom-right, every row sees >= 59 keys
    ("causal", 65, 7, 4, 1),            # Sq > Sk: rows 0..57 have no key (out 0, lse -inf)
    ("full", 63, 113, 2, 2),
    (None, 1, 63, 8, 1),                # decode, MQA, mask=None = every pair
    ("window(16,0)", 113, 113, 2, 1),
    ("window(5,3)", 65, 63, 2, 2),
    ("causal & (sinks(4) | window(16,0))", 113, 113, 4, 2),
    ("chunk(16)", 65, 65, 2, 2),
    ("causal & chunk(8)", 63, 113, 2, 1),
    ("causal | prefix(10)", 63, 63, 2, 2),
    ("!causal", 7, 7, 2, 2),            # last row empty
    ("sinks(3) | window(2,2)", 1, 113, 4, 1),
    ("causal & (sinks(2) | window(7,0) | power(8))", 113, 113, 4, 2),
    ("power(5)", 65, 130, 2, 1),
    ("radial(16,6)", 113, 113, 2, 2),
    ("causal & radial(9,3)", 7, 65, 2, 1),
]


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["f32", "bf16"])
@pytest.mark.parametrize("mask,sq,sk,hq,hk", MASK_CASES, ids=[f"{c[0]}-{c[1]}x{c[2]}-h{c[3]}/{c[4]}"
                                                              for c in MASK_CASES])
def test_masks_match_reference(device, dtype, mask, sq, sk, hq, hk):
    skip_unsupported(device, dtype)
    q, k, v = make_qkv(device, dtype, 2, sq, sk, hq, hk, 32)
    out, lse, ro, rl = run_and_check(q, k, v, mask, dtype)
    # empty rows are exactly zero / -inf (assert_close already requires matching infinities)
    empty = ~allowed_matrix(mask, 2, sq, sk).any(-1)  # [B, Sq]
    if empty.any():
        assert (out.cpu()[empty] == 0).all()
        assert torch.isneginf(lse.cpu().permute(0, 2, 1)[empty]).all()


@pytest.mark.parametrize("mask,sq,sk", [("causal", 65, 65), ("window(7,0)", 63, 113),
                                         ("causal", 1, 113)])
def test_float16(device, mask, sq, sk):
    skip_unsupported(device, F16)
    q, k, v = make_qkv(device, F16, 2, sq, sk, 4, 2, 64)
    run_and_check(q, k, v, mask, F16)


def test_default_mask_is_causal_and_none_is_full(device):
    dtype = F32 if device == "cpu" else BF16
    q, k, v = make_qkv(device, dtype, 1, 33, 40, 2, 2, 16)
    out = longattn.attention(q, k, v)
    assert isinstance(out, torch.Tensor)  # return_lse=False gives the tensor alone
    ro, _ = ref_attention(q.cpu(), k.cpu(), v.cpu(), "causal")
    assert_close(out, ro, dtype)
    out_full = longattn.attention(q, k, v, None)
    rf, _ = ref_attention(q.cpu(), k.cpu(), v.cpu(), "full")
    assert_close(out_full, rf, dtype)
    assert (ro - rf).abs().max() > 0.1  # the two masks really differ here


@pytest.mark.parametrize("hq,hk", [(8, 8), (8, 2), (8, 1), (6, 3)])
def test_gqa_mqa(device, hq, hk):
    dtype = BF16
    q, k, v = make_qkv(device, dtype, 2, 65, 65, hq, hk, 32)
    run_and_check(q, k, v, "causal", dtype)


@pytest.mark.parametrize("d,dv", [(8, 8), (40, 40), (64, 32), (128, 128), (96, 160),
                                  (256, 256)])
def test_head_dims(device, d, dv):
    """Head dims off the usual grid and Dv != D, forward and backward."""
    dtype = F32 if device == "cpu" else BF16
    q, k, v = make_qkv(device, dtype, 1, 63, 65, 2, 1, d, dv, requires_grad=True)
    if device == "cuda" and (d % 16 or d != dv):
        # The CUDA kernels take D = Dv, 16..256 in steps of 16: a clear error names the dims.
        with pytest.raises(ValueError, match="head dims"):
            longattn.attention(q, k, v, "causal")
        return
    out, _, _, _ = run_and_check(q, k, v, "causal", dtype)
    dout = randn(*out.shape, dtype=dtype, device=device)
    g = torch.autograd.grad(out, (q, k, v), dout)
    l64 = [leaf64(x) for x in (q, k, v)]
    ro, _ = ref_attention(*l64, "causal")
    r = torch.autograd.grad(ro, l64, dout.cpu().double())
    for a, b, n in zip(g, r, "qkv"):
        assert_grad_close(a, b, dtype, "d" + n)


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["f32", "bf16"])
def test_scale_and_softcap(device, dtype):
    skip_unsupported(device, dtype)
    # q scaled up so that logits reach the range where tanh saturates and softcap matters
    q, k, v = make_qkv(device, dtype, 2, 65, 65, 4, 2, 32, qscale=4.0)
    run_and_check(q, k, v, "causal", dtype, softcap=5.0)
    run_and_check(q, k, v, "causal", dtype, scale=0.05)
    run_and_check(q, k, v, "window(9,9)", dtype, scale=0.3, softcap=2.0)
    # the options are not no-ops on this data
    base, _ = ref_attention(q.cpu(), k.cpu(), v.cpu(), "causal")
    capped, _ = ref_attention(q.cpu(), k.cpu(), v.cpu(), "causal", softcap=5.0)
    scaled, _ = ref_attention(q.cpu(), k.cpu(), v.cpu(), "causal", scale=0.05)
    assert (base - capped).abs().max() > 0.05 and (base - scaled).abs().max() > 0.05


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["f32", "bf16"])
@pytest.mark.parametrize("mask,kind,sq,sk", [
    ("causal & document", "packed", 113, 113),
    ("document", "scattered", 65, 63),
    ("causal & document", "packed", 7, 65),
    ("document | sinks(2)", "disjoint", 63, 63),   # rows of batch 0 with doc 99 see only sinks
    ("document", "disjoint", 63, 63),              # ... and here nothing: out 0, lse -inf
    ("causal & document", "packed", 65, 7),
])
def test_documents(device, dtype, mask, kind, sq, sk):
    skip_unsupported(device, dtype)
    q, k, v = make_qkv(device, dtype, 2, sq, sk, 4, 2, 32)
    qd, kd = make_docs(device, 2, sq, sk, kind)
    run_and_check(q, k, v, mask, dtype, q_doc=qd, k_doc=kd)


def test_empty_mask_everywhere(device):
    dtype = BF16
    q, k, v = make_qkv(device, dtype, 1, 9, 17, 2, 1, 16)
    out, lse = longattn.attention(q, k, v, "!full", return_lse=True)
    assert (out == 0).all() and out.shape == (1, 9, 2, 16)
    assert torch.isneginf(lse).all()


@pytest.mark.parametrize("dtype,d", [(F32, 32), (BF16, 32), (BF16, 128)],
                         ids=["f32-d32", "bf16-d32", "bf16-d128"])
def test_long_1023(device, dtype, d):
    skip_unsupported(device, dtype)
    q, k, v = make_qkv(device, dtype, 1, 1023, 1023, 2, 1, d)
    run_and_check(q, k, v, "causal & (sinks(4) | window(100,0))", dtype)
    run_and_check(q[:, -1:], k, v, "causal", dtype)  # decode against 1023 keys


@pytest.mark.parametrize("dtype,mask", [(F32, "causal"),
                                        (BF16, "causal & (sinks(4) | window(1024,0))")],
                         ids=["f32-causal", "bf16-sinks-window"])
def test_long_4224(device, dtype, mask):
    skip_unsupported(device, dtype)
    q, k, v = make_qkv(device, dtype, 1, 4224, 4224, 2, 1, 16)
    run_and_check(q, k, v, mask, dtype)


# --------------------------------------------------------------------------------------------
# Layouts
# --------------------------------------------------------------------------------------------

def test_noncontiguous_transposed(device):
    """[B,H,S,D] memory viewed as [B,S,H,D] (strides not in the natural order)."""
    dtype = F32 if device == "cpu" else BF16
    B, S, Hq, Hk, D = 2, 65, 4, 2, 32
    qt = randn(B, Hq, S, D, dtype=dtype, device=device)
    kt = randn(B, Hk, S, D, dtype=dtype, device=device)
    vt = randn(B, Hk, S, D, dtype=dtype, device=device)
    q, k, v = qt.transpose(1, 2), kt.transpose(1, 2), vt.transpose(1, 2)
    assert not q.is_contiguous()
    out, _, _, _ = run_and_check(q, k, v, "causal", dtype)
    out_c = longattn.attention(q.contiguous(), k.contiguous(), v.contiguous(), "causal")
    assert_close(out, out_c.double(), dtype, "transposed vs contiguous")


def test_noncontiguous_packed_and_strided(device):
    """Slices of a packed [B,S,3,H,D] qkv, and a last dimension with stride 2."""
    dtype = BF16
    B, S, H, D = 2, 63, 2, 32
    qkv = randn(B, S, 3, H, D, dtype=dtype, device=device)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    run_and_check(q, k, v, "causal", dtype)
    if device == "cpu":  # the CUDA kernels need a unit-stride head dim (documented)
        wide = randn(B, S, H, 2 * D, dtype=dtype, device=device)
        run_and_check(q, k, wide[..., ::2], "window(4,4)", dtype)
    # a batch slice with a gap (stride over batch larger than one sample)
    big = randn(2 * B, S, H, D, dtype=dtype, device=device)
    run_and_check(big[::2], k, v, "full", dtype)


def test_zero_stride_broadcast_kv(device):
    """k / v broadcast over the batch with expand() (batch stride 0), forward and backward."""
    dtype = F32 if device == "cpu" else BF16
    B, S, Hq, Hk, D = 3, 63, 4, 2, 32
    q = randn(B, S, Hq, D, dtype=dtype, device=device).requires_grad_(True)
    k1 = randn(1, S, Hk, D, dtype=dtype, device=device).requires_grad_(True)
    v1 = randn(1, S, Hk, D, dtype=dtype, device=device).requires_grad_(True)
    k, v = k1.expand(B, -1, -1, -1), v1.expand(B, -1, -1, -1)
    assert k.stride(0) == 0
    out = longattn.attention(q, k, v, "causal")
    q64, k64, v64 = leaf64(q), leaf64(k1), leaf64(v1)
    ro, _ = ref_attention(q64, k64.expand(B, -1, -1, -1), v64.expand(B, -1, -1, -1), "causal")
    assert_close(out, ro, dtype)
    dout = randn(*out.shape, dtype=dtype, device=device)
    g = torch.autograd.grad(out, (q, k1, v1), dout)
    r = torch.autograd.grad(ro, (q64, k64, v64), dout.cpu().double())
    for a, b, n in zip(g, r, "qkv"):
        assert_grad_close(a, b, dtype, "d" + n)


@pytest.mark.parametrize("dtype,mask,sq,sk,hq,hk", [
    (F32, "causal", 33, 33, 2, 1),
    (F32, "causal", 65, 7, 4, 2),                 # empty rows (lse -inf, excluded by where)
    (BF16, "causal & window(8,0)", 7, 65, 4, 1),
], ids=["f32-causal", "f32-empty-rows", "bf16-window-mqa"])
def test_lse_gradient_refused_or_correct(device, dtype, mask, sq, sk, hq, hk):
    """A loss that uses lse: the package either computes the right gradient through it or refuses
    loudly (RuntimeError naming lse) - a silently missing term is the one wrong answer.
    Using lse.detach() in the loss must always work."""
    skip_unsupported(device, dtype)
    q, k, v = make_qkv(device, dtype, 2, sq, sk, hq, hk, 16, requires_grad=True)
    out, lse = longattn.attention(q, k, v, mask, return_lse=True)
    l64 = [leaf64(x) for x in (q, k, v)]
    ro, rl = ref_attention(*l64, mask)
    wl = torch.randn(rl.shape, dtype=torch.float64)  # random weights on the lse terms

    def lse_term(x, w):
        return torch.where(torch.isfinite(x), x * w, torch.zeros_like(x)).sum()

    try:
        g = torch.autograd.grad(out.float().sum() + lse_term(lse, wl.to(lse)), (q, k, v))
    except RuntimeError as e:
        assert "lse" in str(e), e
    else:
        r = torch.autograd.grad(ro.sum() + lse_term(rl, wl), l64, retain_graph=True)
        for a, b, n in zip(g, r, "qkv"):
            assert_grad_close(a, b, dtype, "d" + n + " (through lse)")
    out, lse = longattn.attention(q, k, v, mask, return_lse=True)
    lw = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse)).detach()
    g = torch.autograd.grad((out.float() * lw.transpose(1, 2)[..., None]).sum(), (q, k, v))
    rw = torch.where(torch.isfinite(rl), rl, torch.zeros_like(rl)).detach()
    r = torch.autograd.grad((ro * rw.transpose(1, 2)[..., None]).sum(), l64)
    for a, b, n in zip(g, r, "qkv"):
        assert_grad_close(a, b, dtype, "d" + n + " (lse detached)")


def test_mask_object_with_documents_reused(device):
    dtype = BF16
    m = longattn.Mask("causal & document")
    for sq, sk in [(65, 65), (7, 63)]:
        q, k, v = make_qkv(device, dtype, 2, sq, sk, 2, 1, 32)
        qd, kd = make_docs(device, 2, sq, sk, "packed")
        out = longattn.attention(q, k, v, m, q_doc=qd, k_doc=kd)
        ro, _ = ref_attention(q.cpu(), k.cpu(), v.cpu(), "causal & document", q_doc=qd.cpu(),
                              k_doc=kd.cpu())
        assert_close(out, ro, dtype)


def test_inputs_not_modified(device):
    dtype = BF16
    q, k, v = make_qkv(device, dtype, 2, 65, 65, 4, 2, 32, requires_grad=True)
    copies = [x.detach().clone() for x in (q, k, v)]
    out = longattn.attention(q, k, v, "causal")
    out.backward(torch.randn_like(out))
    for x, c in zip((q, k, v), copies):
        assert torch.equal(x.detach(), c)


def test_no_grad_and_inference_mode(device):
    dtype = BF16
    q, k, v = make_qkv(device, dtype, 1, 33, 33, 2, 2, 16, requires_grad=True)
    with torch.no_grad():
        a = longattn.attention(q, k, v, "causal")
    assert not a.requires_grad
    with torch.inference_mode():
        b = longattn.attention(q.detach(), k.detach(), v.detach(), "causal")
    assert torch.equal(a, b)
    ro, _ = ref_attention(q.cpu(), k.cpu(), v.cpu(), "causal")
    assert_close(a, ro, dtype)


# --------------------------------------------------------------------------------------------
# Mask objects
# --------------------------------------------------------------------------------------------

def test_mask_object_canonical_text_and_reuse(device):
    m = longattn.Mask("causal&(sinks(4)|window( 16 , 0 ))")
    canon = "causal & (sinks(4) | window(16,0))"  # docs/MASKS.md: minimal parentheses
    assert str(m) == canon and m.expr == canon
    assert longattn.Mask(str(m)).expr == canon
    assert longattn.Mask("!causal|full").expr == "!causal | full"
    text = m.explain(64, 64)
    assert isinstance(text, str) and text.strip()
    dtype = BF16
    for sq, sk in [(113, 113), (7, 65)]:  # one Mask, several shapes
        q, k, v = make_qkv(device, dtype, 2, sq, sk, 4, 2, 32)
        out_m, lse_m = longattn.attention(q, k, v, m, return_lse=True)
        out_s, lse_s = longattn.attention(q, k, v, canon, return_lse=True)
        assert torch.equal(out_m, out_s) and torch.equal(lse_m, lse_s)
        ro, _ = ref_attention(q.cpu(), k.cpu(), v.cpu(), canon)
        assert_close(out_m, ro, dtype)


def test_mask_precedence_in_package(device):
    """`a | b & !c` parses as `a | (b & (!c))`."""
    dtype = F32 if device == "cpu" else BF16
    q, k, v = make_qkv(device, dtype, 1, 40, 40, 2, 2, 16)
    a = longattn.attention(q, k, v, "sinks(2) | causal & !window(3,0)")
    b = longattn.attention(q, k, v, "sinks(2) | (causal & (!window(3,0)))")
    c = longattn.attention(q, k, v, "(sinks(2) | causal) & !window(3,0)")
    assert torch.equal(a, b)
    ro, _ = ref_attention(q.cpu(), k.cpu(), v.cpu(), "sinks(2) | (causal & (!window(3,0)))")
    assert_close(a, ro, dtype)
    assert (a.double() - c.double()).abs().max() > 1e-2


# --------------------------------------------------------------------------------------------
# Gradients
# --------------------------------------------------------------------------------------------

GRAD_CASES = [
    # (mask, Sq, Sk, Hq, Hk, softcap, docs)
    ("causal", 65, 65, 4, 2, None, None),
    ("causal", 7, 113, 4, 1, None, None),
    ("causal", 65, 7, 2, 2, None, None),      # empty rows: their dq must be 0, not NaN
    ("window(8,4)", 63, 63, 2, 1, None, None),
    ("causal & (sinks(4) | window(16,0))", 113, 113, 2, 2, None, None),
    ("causal", 63, 63, 2, 2, 5.0, None),
    ("causal & document", 65, 65, 4, 2, None, "packed"),
    ("document", 63, 63, 2, 2, None, "disjoint"),
    (None, 1, 113, 8, 2, None, None),         # decode
]


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["f32", "bf16"])
@pytest.mark.parametrize("mask,sq,sk,hq,hk,softcap,docs", GRAD_CASES,
                         ids=[f"{c[0]}-{c[1]}x{c[2]}-h{c[3]}/{c[4]}-cap{c[5]}-{c[6]}"
                              for c in GRAD_CASES])
def test_grads_match_reference(device, dtype, mask, sq, sk, hq, hk, softcap, docs):
    skip_unsupported(device, dtype)
    q, k, v = make_qkv(device, dtype, 2, sq, sk, hq, hk, 32, qscale=2.0 if softcap else 1.0,
                       requires_grad=True)
    qd = kd = None
    if docs:
        qd, kd = make_docs(device, 2, sq, sk, docs)
    out = longattn.attention(q, k, v, mask, softcap=softcap, q_doc=qd, k_doc=kd)
    dout = randn(*out.shape, dtype=dtype, device=device)
    gq, gk, gv = torch.autograd.grad(out, (q, k, v), dout)
    q64, k64, v64 = leaf64(q), leaf64(k), leaf64(v)
    ro, _ = ref_attention(q64, k64, v64, mask, softcap=softcap,
                          q_doc=None if qd is None else qd.cpu(),
                          k_doc=None if kd is None else kd.cpu())
    rq, rk, rv = torch.autograd.grad(ro, (q64, k64, v64), dout.cpu().double())
    assert gq.dtype == dtype and gk.dtype == dtype and gv.dtype == dtype
    assert_grad_close(gq, rq, dtype, "dq")
    assert_grad_close(gk, rk, dtype, "dk")
    assert_grad_close(gv, rv, dtype, "dv")
    empty = ~allowed_matrix(mask, 2, sq, sk, qd, kd).any(-1)
    if empty.any():
        assert (gq.cpu()[empty] == 0).all()


def test_grads_float16(device):
    skip_unsupported(device, F16)
    q, k, v = make_qkv(device, F16, 1, 63, 65, 4, 2, 64, requires_grad=True)
    out = longattn.attention(q, k, v, "causal")
    dout = randn(*out.shape, dtype=F16, device=device)
    g = torch.autograd.grad(out, (q, k, v), dout)
    l64 = [leaf64(x) for x in (q, k, v)]
    ro, _ = ref_attention(*l64, "causal")
    r = torch.autograd.grad(ro, l64, dout.cpu().double())
    for a, b, n in zip(g, r, "qkv"):
        assert_grad_close(a, b, F16, "d" + n)


def test_grads_long_1023_bf16(device):
    q, k, v = make_qkv(device, BF16, 1, 1023, 1023, 2, 1, 32, requires_grad=True)
    out = longattn.attention(q, k, v, "causal")
    dout = randn(*out.shape, dtype=BF16, device=device)
    g = torch.autograd.grad(out, (q, k, v), dout)
    l64 = [leaf64(x) for x in (q, k, v)]
    ro, _ = ref_attention(*l64, "causal")
    r = torch.autograd.grad(ro, l64, dout.cpu().double())
    for a, b, n in zip(g, r, "qkv"):
        assert_grad_close(a, b, BF16, "d" + n)


def test_grads_noncontiguous_packed_qkv(device):
    """Gradient flows back into a packed qkv leaf through non-contiguous slices."""
    dtype = F32 if device == "cpu" else BF16
    B, S, H, D = 2, 65, 2, 32
    qkv = randn(B, S, 3, H, D, dtype=dtype, device=device).requires_grad_(True)
    out = longattn.attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], "causal")
    dout = randn(*out.shape, dtype=dtype, device=device)
    (g,) = torch.autograd.grad(out, qkv, dout)
    p64 = leaf64(qkv)
    ro, _ = ref_attention(p64[:, :, 0], p64[:, :, 1], p64[:, :, 2], "causal")
    (r,) = torch.autograd.grad(ro, p64, dout.cpu().double())
    assert_grad_close(g, r, dtype, "dqkv")


def test_deterministic_bitwise(device):
    dtype = BF16
    q, k, v = make_qkv(device, dtype, 2, 113, 113, 4, 2, 32, requires_grad=True)
    dout = randn(2, 113, 4, 32, dtype=dtype, device=device)
    runs = []
    for _ in range(2):
        out, lse = longattn.attention(q, k, v, "causal", deterministic=True, return_lse=True)
        g = torch.autograd.grad(out, (q, k, v), dout)
        runs.append((out, lse) + tuple(g))
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    l64 = [leaf64(x) for x in (q, k, v)]
    ro, _ = ref_attention(*l64, "causal")
    r = torch.autograd.grad(ro, l64, dout.cpu().double())
    for a, b, n in zip(runs[0][2:], r, "qkv"):
        assert_grad_close(a, b, dtype, "d" + n)


# --------------------------------------------------------------------------------------------
# NaN policy
# --------------------------------------------------------------------------------------------

def test_nan_in_q_propagates_to_that_row_only(device):
    """Policy asserted: a NaN anywhere in q[b, i, h, :] makes out[b, i, h, :] entirely NaN (it
    is not silently dropped or zeroed); every other (b, i, h) row is finite and matches the
    reference computed on the same data (the NaN does not leak into other rows or heads)."""
    dtype = F32 if device == "cpu" else BF16
    q, k, v = make_qkv(device, dtype, 2, 65, 65, 4, 2, 32)
    q[1, 40, 3, 5] = float("nan")
    out = longattn.attention(q, k, v, "causal").cpu()
    assert torch.isnan(out[1, 40, 3]).all()
    ok = torch.ones(out.shape[:3], dtype=torch.bool)
    ok[1, 40, 3] = False
    ro, _ = ref_attention(q.cpu(), k.cpu(), v.cpu(), "causal")
    assert torch.isfinite(out[ok]).all()
    assert_close(out[ok], ro[ok], dtype, "rows without NaN")


# --------------------------------------------------------------------------------------------
# CUDA
# --------------------------------------------------------------------------------------------

def test_cuda_matches_cpu_and_keeps_device():
    """The CUDA kernels agree with the CPU kernels (bf16), and results stay on the GPU."""
    from conftest import require_cuda
    require_cuda()
    q, k, v = make_qkv("cpu", BF16, 2, 113, 113, 4, 2, 64, requires_grad=True)
    qc, kc, vc = (x.detach().cuda().requires_grad_(True) for x in (q, k, v))
    mask = "causal & (sinks(4) | window(32,0))"
    out, lse = longattn.attention(q, k, v, mask, return_lse=True)
    outc, lsec = longattn.attention(qc, kc, vc, mask, return_lse=True)
    assert outc.is_cuda and lsec.is_cuda
    assert_close(outc, out.double(), BF16, "cuda vs cpu out")
    assert_close(lsec, lse.double(), BF16, "cuda vs cpu lse")
    dout = randn(*out.shape, dtype=BF16)
    g = torch.autograd.grad(out, (q, k, v), dout)
    gc = torch.autograd.grad(outc, (qc, kc, vc), dout.cuda())
    for a, b, n in zip(gc, g, "qkv"):
        assert a.is_cuda
        assert_grad_close(a, b.double(), BF16, "cuda vs cpu d" + n)


def test_cuda_float32_refused_or_supported():
    """f32 on CUDA is outside the documented support matrix: it must either raise an error that
    names the dtype, or compute the right answer - never return garbage."""
    from conftest import require_cuda
    require_cuda()
    q, k, v = make_qkv("cuda", F32, 1, 33, 33, 2, 2, 64)
    try:
        out = longattn.attention(q, k, v, "causal")
    except (TypeError, ValueError, RuntimeError) as e:
        assert "float32" in str(e) or "dtype" in str(e)
        return
    ro, _ = ref_attention(q.cpu(), k.cpu(), v.cpu(), "causal")
    assert_close(out, ro, F32)


def check_forward_and_grads(q, k, v, mask, allowed, dtype, what, **docs):
    """longattn.attention under ``mask`` and its gradients for a random dO against the float64
    reference restricted to ``allowed``."""
    out = longattn.attention(q, k, v, mask, **docs)
    l64 = [leaf64(x) for x in (q, k, v)]
    ro, _ = ref_attention(*l64, None, allowed=allowed)
    assert_close(out, ro, dtype)
    dout = randn(*out.shape, dtype=dtype, device=q.device)
    g = torch.autograd.grad(out, (q, k, v), dout)
    r = torch.autograd.grad(ro, l64, dout.cpu().double())
    for a, b, n in zip(g, r, "qkv"):
        assert_grad_close(a, b, dtype, f"d{n} ({what})")


@pytest.mark.parametrize("sq,sk,tq,tk", [(65, 113, 64, 64), (200, 63, 128, 32), (7, 7, 16, 16)])
def test_block_mask(device, sq, sk, tq, tk):
    """An explicit block mask (per batch row, shared by the heads), forward and gradients,
    against the reference with the same tiles expanded to elements; a table of the wrong shape
    is refused naming `block_mask`."""
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    q, k, v = make_qkv(device, dtype, 2, sq, sk, 4, 2, 32, requires_grad=True)
    gen = torch.Generator().manual_seed(sq * 1000 + sk)
    nq, nk = -(-sq // tq), -(-sk // tk)
    table = (torch.rand(2, 1, nq, nk, generator=gen) > 0.4).to(torch.uint8)
    table[1, 0, :, 0] = 1  # batch row 1: every query tile sees the first key tile
    i = torch.arange(sq)[:, None] // tq
    j = torch.arange(sk)[None] // tk
    allowed = table[:, 0][:, i, j].bool()  # [B, Sq, Sk]
    check_forward_and_grads(q, k, v, longattn.BlockMask(table.to(device), (tq, tk)), allowed,
                            dtype, "block mask")
    with pytest.raises(ValueError, match="block_mask"):
        wrong = torch.cat([table, table[..., :1]], -1)  # one key tile too many
        longattn.attention(q, k, v, longattn.BlockMask(wrong.to(device), (tq, tk)))


@pytest.mark.parametrize("under,sq,sk,tq,tk", [("causal", 113, 113, 32, 16),
                                                ("causal & (sinks(2) | window(30,0))", 65, 130, 16, 64),
                                                ("causal & document", 70, 70, 8, 8)])
def test_block_mask_gates_a_mask(device, under, sq, sk, tq, tk):
    """A per-(batch, head) block map gating a mask expression (an external gate): forward and
    gradients against the reference of ``under & table`` (the mask exact inside kept tiles)."""
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    b, hq = 2, 4
    q, k, v = make_qkv(device, dtype, b, sq, sk, hq, 2, 32, requires_grad=True)
    gen = torch.Generator().manual_seed(sq * 7 + sk)
    nq, nk = -(-sq // tq), -(-sk // tk)
    table = (torch.rand(b, hq, nq, nk, generator=gen) > 0.5).to(torch.uint8)
    q_doc = k_doc = None
    if "document" in under:
        q_doc = (torch.arange(sq) // 23).to(torch.int32).expand(b, sq).contiguous()
        k_doc = (torch.arange(sk) // 23).to(torch.int32).expand(b, sk).contiguous()
    gate = longattn.BlockMask(table.to(device), (tq, tk), under=under)
    assert "under=" in repr(gate)
    docs = {} if q_doc is None else {"q_doc": q_doc.to(device), "k_doc": k_doc.to(device)}
    i = torch.arange(sq)[:, None] // tq
    j = torch.arange(sk)[None] // tk
    allowed = allowed_matrix(under, b, sq, sk, q_doc, k_doc)[:, None] & table[:, :, i, j].bool()
    check_forward_and_grads(q, k, v, gate, allowed, dtype, "gate", **docs)
    with pytest.raises(TypeError, match="under"):
        longattn.BlockMask(table, (tq, tk), under=3)


def pooled_reference(q, k, allowed, block):
    """(mass, max) pooled per block x block from float64 probabilities under ``allowed``
    ([B, 1 or Hq, Sq, Sk]); GQA by repeating K's heads; rows with no key hold 0."""
    b, sq, hq, d = q.shape
    sk = k.shape[1]
    kk = k.double().repeat_interleave(hq // k.shape[2], dim=2)
    s = torch.einsum("bihd,bjhd->bhij", q.double(), kk) / math.sqrt(d)
    p = torch.softmax(s.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0.0)
    nq, nk = -(-sq // block), -(-sk // block)
    pad = torch.zeros(b, hq, nq * block, nk * block, dtype=torch.float64)
    pad[:, :, :sq, :sk] = p
    blocks = pad.view(b, hq, nq, block, nk, block)
    rows = torch.tensor([min(block, sq - i * block) for i in range(nq)], dtype=torch.float64)
    return blocks.sum((3, 5)) / rows[None, None, :, None], blocks.amax((3, 5))


@pytest.mark.parametrize("mask,sq,sk,block", [("causal", 113, 113, 64), ("causal & power(16)", 200, 300, 128),
                                              ("window(40,10)", 65, 1, 64)])
def test_attention_map_pools_the_probabilities(mask, sq, sk, block):
    """longattn.attention_map (CPU): out / lse equal longattn.attention's, and the pooled maps
    equal the float64 probabilities pooled per block (mean row mass, 2-D max)."""
    q, k, v = make_qkv("cpu", F32, 2, sq, sk, 4, 2, 32)
    with torch.no_grad():
        out, lse, mass, top = longattn.attention_map(q, k, v, mask, block=block)
        ref_out, ref_lse = longattn.attention(q, k, v, mask, return_lse=True)
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)
    allowed = allowed_matrix(mask, 2, sq, sk)[:, None]  # [B, 1, Sq, Sk]
    want_mass, want_max = pooled_reference(q, k, allowed, block)
    assert mass.shape == want_mass.shape and top.shape == want_max.shape
    torch.testing.assert_close(mass.double(), want_mass, atol=2e-5, rtol=0)
    torch.testing.assert_close(top.double(), want_max, atol=2e-5, rtol=0)
    with pytest.raises(ValueError, match="multiple of 64"):
        longattn.attention_map(q, k, v, mask, block=96)


def test_attention_map_under_a_gate():
    """attention_map through a gate (a BlockMask under an expression): the maps are those of
    ``under & table`` (the gate's skipped blocks hold 0) and out / lse equal attention's."""
    sq = sk = 200
    q, k, v = make_qkv("cpu", F32, 1, sq, sk, 2, 1, 32)
    table = (torch.rand(1, 2, 4, 4, generator=torch.Generator().manual_seed(5)) > 0.4).to(torch.uint8)
    gate = longattn.BlockMask(table, 64, under="causal")
    with torch.no_grad():
        out, lse, mass, top = longattn.attention_map(q, k, v, gate, block=64)
        ref_out, ref_lse = longattn.attention(q, k, v, gate, return_lse=True)
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)
    i = torch.arange(sq)[:, None] // 64
    j = torch.arange(sk)[None] // 64
    allowed = allowed_matrix("causal", 1, sq, sk)[:, None] & table[:, :, i, j].bool()  # [1, 2, Sq, Sk]
    want_mass, want_max = pooled_reference(q, k, allowed, 64)
    torch.testing.assert_close(mass.double(), want_mass, atol=2e-5, rtol=0)
    torch.testing.assert_close(top.double(), want_max, atol=2e-5, rtol=0)
    assert (mass[table == 0] == 0).all()


@pytest.mark.parametrize("mask,sq,sk,block", [("causal", 300, 300, 64), ("causal & window(100,0)", 129, 700, 128),
                                              ("full", 1, 1000, 192)])
def test_attention_map_on_cuda_matches_the_pooled_probabilities(mask, sq, sk, block):
    """longattn.attention_map on CUDA (the Hopper forward writes the map): tensors stay on the
    device, out / lse equal longattn.attention's on CUDA, and the maps equal the float64
    probabilities of the same bf16 inputs pooled per block."""
    from conftest import require_cuda

    require_cuda()
    BF16 = torch.bfloat16
    q, k, v = (x.cuda() for x in make_qkv("cpu", BF16, 2, sq, sk, 4, 2, 128))
    with torch.no_grad():
        try:
            out, lse, mass, top = longattn.attention_map(q, k, v, mask, block=block)
        except ValueError as e:  # not a Hopper GPU: refused by name
            assert "warp-specialized" in str(e)
            pytest.skip(f"no Hopper forward here: {e}")
        ref_out, ref_lse = longattn.attention(q, k, v, mask, return_lse=True)
    assert mass.is_cuda and top.is_cuda and lse.is_cuda
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)
    allowed = allowed_matrix(mask, 2, sq, sk)[:, None]
    want_mass, want_max = pooled_reference(q.cpu().float(), k.cpu().float(), allowed, block)
    torch.testing.assert_close(mass.cpu().double(), want_mass, atol=2e-4, rtol=2e-3)
    torch.testing.assert_close(top.cpu().double(), want_max, atol=2e-4, rtol=2e-3)
