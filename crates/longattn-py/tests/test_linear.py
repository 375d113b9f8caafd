"""Linear attention (`longattn.chunk_simple_gla` and siblings) against a float64 recurrence.

The reference steps the recurrence token by token in float64:
``S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t``, ``o_t = scale * q_t S_t`` (kv head ``h // (H // Hk)``),
and its autograd gives the reference gradients.
"""
import pytest
import torch

import longattn

# CUDA kernels: bf16 / f16, K = V in {64, 128}; the CPU path takes any size and float dtype.
TOL = {torch.float32: 2e-5, torch.bfloat16: 2.5e-2, torch.float16: 4e-3}


def ref(q, k, v, g=None, scale=None, s0=None, cu=None):
    """float64 recurrence; returns (o [B, T, H, V], final state [N, H, K, V])."""
    q, k, v = (x.double() for x in (q, k, v))
    b, t, h, kd = q.shape
    hk, vd = k.shape[2], v.shape[3]
    rep = h // hk
    k, v = k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)
    scale = kd ** -0.5 if scale is None else scale
    if g is None:
        a = torch.ones(b, t, h, kd, dtype=torch.float64, device=q.device)
    elif g.dim() == 1:
        a = g.double().exp().view(1, 1, h, 1).expand(b, t, h, kd)
    elif g.dim() == 3:
        a = g.double().exp().unsqueeze(-1).expand(b, t, h, kd)
    else:
        a = g.double().exp()
    bounds = [(bi, 0, t, bi) for bi in range(b)] if cu is None else [
        (0, int(cu[n]), int(cu[n + 1]), n) for n in range(len(cu) - 1)
    ]
    outs = [None] * (b * t)
    finals = []
    for bi, t0, t1, n in bounds:
        s = torch.zeros(h, kd, vd, dtype=torch.float64, device=q.device) if s0 is None else s0[n].double()
        for i in range(t0, t1):
            s = a[bi, i].unsqueeze(-1) * s + k[bi, i].unsqueeze(-1) * v[bi, i].unsqueeze(-2)
            outs[bi * t + i] = scale * torch.einsum("hk,hkv->hv", q[bi, i], s)
        finals.append(s)
    o = torch.stack(outs).view(b, t, h, vd)
    return o, torch.stack(finals)


def rnd(*shape, dtype=torch.float32, device="cpu", std=1.0):
    return (torch.randn(*shape, dtype=torch.float64) * std).to(dtype).to(device)


def log_decay(shape, device, low=-0.5):
    return (torch.rand(*shape, dtype=torch.float64) * low).float().to(device)


def relerr(got, want):
    return ((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-9)).item()


def dims_for(device):
    return (64, 64) if device == "cuda" else (16, 8)


@pytest.mark.parametrize("t", [1, 7, 63, 65, 113, 1023])
@pytest.mark.parametrize("decay", ["none", "head", "token", "gate"])
def test_forward(device, t, decay):
    kd, vd = dims_for(device)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    b, h, hk = 2, 4, 2
    q, k = rnd(b, t, h, kd, dtype=dtype, device=device), rnd(b, t, hk, kd, dtype=dtype, device=device)
    v = rnd(b, t, hk, vd, dtype=dtype, device=device)
    g = {"none": None, "head": log_decay((h,), device, -0.2), "token": log_decay((b, t, h), device),
         "gate": log_decay((b, t, h, kd), device)}[decay]
    s0 = rnd(b, h, kd, vd, device=device)
    want_o, want_s = ref(q, k, v, g, 0.3, s0)
    if decay == "gate":
        o, s = longattn.chunk_gla(q, k, v, g, scale=0.3, initial_state=s0, output_final_state=True)
    else:
        o, s = longattn.chunk_simple_gla(q, k, v, g, scale=0.3, initial_state=s0, output_final_state=True)
    assert o.dtype == dtype and o.shape == (b, t, h, vd)
    assert s.dtype == torch.float32 and s.shape == (b, h, kd, vd)
    assert relerr(o, want_o) < TOL[dtype], relerr(o, want_o)
    assert relerr(s, want_s) < TOL[dtype], relerr(s, want_s)


def test_strong_gate_no_nan(device):
    """Per-key-dim log decays down to -20 a step in some dims, weak in others: finite, exact."""
    kd, vd = dims_for(device)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    t, h = 200, 2
    q, k, v = (rnd(1, t, h, d, dtype=dtype, device=device) for d in (kd, kd, vd))
    gen = torch.Generator().manual_seed(5)
    g = -0.02 * torch.rand(1, t, h, kd, generator=gen)
    g[..., ::4] = -20.0 * torch.rand(1, t, h, (kd + 3) // 4, generator=gen)
    g = g.to(device)
    o, s = longattn.chunk_gla(q, k, v, g, output_final_state=True)
    want_o, want_s = ref(q, k, v, g)
    assert torch.isfinite(o).all() and torch.isfinite(s).all()
    assert relerr(o, want_o) < TOL[dtype], relerr(o, want_o)
    assert relerr(s, want_s) < TOL[dtype], relerr(s, want_s)


def test_strong_decay_no_nan(device):
    """Per-step log decay -20: every intermediate stays finite."""
    kd, vd = dims_for(device)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    t, h = 200, 2
    q, k, v = (rnd(1, t, h, d, dtype=dtype, device=device) for d in (kd, kd, vd))
    g = torch.full((1, t, h), -20.0, device=device)
    o, s = longattn.chunk_simple_gla(q, k, v, g, output_final_state=True)
    want_o, want_s = ref(q, k, v, g)
    assert torch.isfinite(o).all() and torch.isfinite(s).all()
    assert relerr(o, want_o) < TOL[dtype]


@pytest.mark.parametrize("lens", [[5, 0, 70, 1], [129, 64, 300]])
def test_varlen(device, lens):
    kd, vd = dims_for(device)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    t, h = sum(lens), 3 if device == "cpu" else 2
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32, device=device)
    q, k, v = (rnd(1, t, h, d, dtype=dtype, device=device) for d in (kd, kd, vd))
    g = log_decay((1, t, h), device)
    s0 = rnd(len(lens), h, kd, vd, device=device)
    o, s = longattn.chunk_simple_gla(q, k, v, g, initial_state=s0, output_final_state=True, cu_seqlens=cu)
    want_o, want_s = ref(q, k, v, g, None, s0, cu.tolist())
    assert relerr(o, want_o) < TOL[dtype]
    assert relerr(s, want_s) < TOL[dtype]


@pytest.mark.parametrize("decay", ["none", "token", "gate", "gate-strong"])
@pytest.mark.parametrize("t", [7, 65, 300])
def test_gradients(device, decay, t):
    kd, vd = dims_for(device)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    b, h, hk = 1, 4, 2
    q = rnd(b, t, h, kd, dtype=dtype, device=device).requires_grad_()
    k = rnd(b, t, hk, kd, dtype=dtype, device=device).requires_grad_()
    v = rnd(b, t, hk, vd, dtype=dtype, device=device).requires_grad_()
    g = None if decay == "none" else log_decay((b, t, h) if decay == "token" else (b, t, h, kd), device)
    if decay == "gate-strong":  # down to -20 a step in every fourth key dim (the exact form)
        gen = torch.Generator().manual_seed(t)
        g = g.cpu()
        g[..., ::4] = -20.0 * torch.rand(b, t, h, (kd + 3) // 4, generator=gen)
        g = g.to(device)
    if g is not None:
        g.requires_grad_()
    s0 = rnd(b, h, kd, vd, device=device).requires_grad_()
    fn = longattn.chunk_gla if decay.startswith("gate") else longattn.chunk_simple_gla
    o, s = fn(q, k, v, g, scale=0.5, initial_state=s0, output_final_state=True)
    do, ds = rnd(*o.shape, device=device), rnd(*s.shape, device=device)
    ((o.float() * do).sum() + (s * ds).sum()).backward()
    leaves = [q, k, v, s0] + ([g] if g is not None else [])
    got = [x.grad.clone() for x in leaves]
    rl = [x.detach().double().requires_grad_() for x in leaves]
    ro, rs = ref(rl[0], rl[1], rl[2], rl[4] if g is not None else None, 0.5, rl[3])
    ((ro * do.double()).sum() + (rs * ds.double()).sum()).backward()
    tol = 4 * TOL[dtype] if dtype != torch.float32 else 1e-4
    for name, a, r in zip(["dq", "dk", "dv", "ds0", "dg"], got, rl):
        assert relerr(a, r.grad) < tol, (name, relerr(a, r.grad))


def test_step_matches_chunked(device):
    kd, vd = dims_for(device)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    b, t, h = 3, 9, 2
    q, k, v = (rnd(b, t, h, d, dtype=dtype, device=device) for d in (kd, kd, vd))
    g = log_decay((b, t, h), device)
    want, want_s = ref(q, k, v, g)
    state = torch.zeros(b, h, kd, vd, device=device)
    outs = []
    for i in range(t):
        o, state = longattn.fused_recurrent_simple_gla(
            q[:, i:i + 1], k[:, i:i + 1], v[:, i:i + 1], g[:, i:i + 1], initial_state=state)
        outs.append(o)
    assert relerr(torch.cat(outs, 1), want) < TOL[dtype]
    assert relerr(state, want_s) < TOL[dtype]


def test_compile_fullgraph(device):
    kd, vd = dims_for(device)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32

    class Mix(torch.nn.Module):
        def forward(self, q, k, v, g):
            o, _ = longattn.chunk_simple_gla(q, k, v, g)
            return o.float().square().sum()

    q, k, v = (rnd(1, 70, 2, d, dtype=dtype, device=device).requires_grad_() for d in (kd, kd, vd))
    g = log_decay((1, 70, 2), device).requires_grad_()
    eager = Mix()(q, k, v, g)
    grads = torch.autograd.grad(eager, (q, k, v, g))
    compiled = torch.compile(Mix(), fullgraph=True, backend="aot_eager")(q, k, v, g)
    cgrads = torch.autograd.grad(compiled, (q, k, v, g))
    # The CUDA backward sums with float atomics (order varies run to run): bf16-level tolerance.
    rtol = 1e-5 if dtype == torch.float32 else 1e-2
    assert torch.allclose(eager, compiled, rtol=rtol)
    for a, c in zip(grads, cgrads):
        assert relerr(c, a.double()) < rtol, relerr(c, a.double())


def test_errors(device):
    kd, vd = dims_for(device)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q, k, v = (rnd(1, 10, 2, d, dtype=dtype, device=device) for d in (kd, kd, vd))
    with pytest.raises(ValueError, match="`g`"):
        longattn.chunk_simple_gla(q, k, v, torch.zeros(1, 10, 3, device=device))
    with pytest.raises(ValueError, match="<= 0"):
        longattn.chunk_simple_gla(q, k, v, torch.full((1, 10, 2), 0.1, device=device))
    with pytest.raises(ValueError, match="cu_seqlens"):
        longattn.chunk_simple_gla(q, k, v, cu_seqlens=torch.tensor([0, 6, 4, 10], dtype=torch.int32, device=device))
    with pytest.raises(TypeError, match="int32"):
        longattn.chunk_simple_gla(q, k, v, cu_seqlens=torch.tensor([0, 10], device=device))
    with pytest.raises(ValueError, match="initial_state"):
        longattn.chunk_simple_gla(q, k, v, initial_state=torch.zeros(1, 2, kd, vd + 1, device=device))
    with pytest.raises(TypeError, match="initial_state"):
        longattn.chunk_simple_gla(q, k, v, initial_state=torch.zeros(1, 2, kd, vd, dtype=torch.float64, device=device))
    with pytest.raises(ValueError, match="head_first"):
        longattn.chunk_simple_gla(q, k, v, head_first=True)
    with pytest.raises(ValueError, match="one token"):
        longattn.fused_recurrent_simple_gla(q, k, v)


def test_check_decays_switch(device):
    """`check_decays(False)` skips the CUDA read-back (CPU always checks); the setting round-trips."""
    kd, vd = dims_for(device)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q, k, v = (rnd(1, 10, 2, d, dtype=dtype, device=device) for d in (kd, kd, vd))
    bad = torch.full((1, 10, 2), 0.1, device=device)
    good = -torch.rand(1, 10, 2, device=device)
    assert longattn.linear.check_decays(False) is True
    try:
        if device == "cuda":
            o, _ = longattn.chunk_simple_gla(q, k, v, bad)  # unchecked: runs, the state grows
            assert o.shape == (1, 10, 2, vd)
        else:
            with pytest.raises(ValueError, match="<= 0"):
                longattn.chunk_simple_gla(q, k, v, bad)
        o1, _ = longattn.chunk_simple_gla(q, k, v, good)
    finally:
        assert longattn.linear.check_decays(True) is False
    o2, _ = longattn.chunk_simple_gla(q, k, v, good)
    assert torch.equal(o1, o2)


def test_refused_step_keeps_state(device):
    """The decode step updates its state in place: a refused decay leaves the state untouched."""
    kd, vd = dims_for(device)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q, k, v = (rnd(3, 1, 2, d, dtype=dtype, device=device) for d in (kd, kd, vd))
    state = torch.randn(3, 2, kd, vd, device=device)
    before = state.clone()
    g = -torch.rand(3, 1, 2, device=device)
    g[2, 0, 1] = 0.25
    with pytest.raises(ValueError, match="element 5"):
        longattn.fused_recurrent_simple_gla(q, k, v, g, initial_state=state)
    assert torch.equal(state, before)


@pytest.mark.parametrize("value", [float("nan"), float("-inf"), 0.5])
def test_bad_decay_values(device, value):
    """NaN, -inf and positive log decays are refused with the element named."""
    kd, vd = dims_for(device)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q, k, v = (rnd(1, 10, 2, d, dtype=dtype, device=device) for d in (kd, kd, vd))
    g = -torch.rand(1, 10, 2, device=device)
    g[0, 7, 1] = value
    with pytest.raises(ValueError, match="element 15"):
        longattn.chunk_simple_gla(q, k, v, g)
