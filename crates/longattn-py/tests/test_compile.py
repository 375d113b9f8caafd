"""torch.compile(fullgraph=True) through longattn's torch.library ops, forward and backward.

Every test uses the default backend (inductor) and torch._dynamo.config defaults;
fullgraph=True makes any graph break an error.
"""
import pytest
import torch
import torch.nn as nn

import longattn
from conftest import randn

F32, BF16 = torch.float32, torch.bfloat16


class AttnBlock(nn.Module):
    def __init__(self, dim=64, heads=4, kv_heads=2, head_dim=16, mode="attention",
                 mask="causal", softcap=None):
        super().__init__()
        self.h, self.hk, self.hd = heads, kv_heads, head_dim
        self.q = nn.Linear(dim, heads * head_dim)
        self.k = nn.Linear(dim, kv_heads * head_dim)
        self.v = nn.Linear(dim, kv_heads * head_dim)
        self.o = nn.Linear(heads * head_dim, dim)
        self.mode, self.mask, self.softcap = mode, mask, softcap

    def forward(self, x, q_doc=None, k_doc=None):
        B, S, _ = x.shape
        q = self.q(x).view(B, S, self.h, self.hd)
        k = self.k(x).view(B, S, self.hk, self.hd)
        v = self.v(x).view(B, S, self.hk, self.hd)
        if self.mode == "attention":
            out = longattn.attention(q, k, v, self.mask, softcap=self.softcap, q_doc=q_doc,
                                     k_doc=k_doc)
        elif self.mode == "attention_lse":
            out, lse = longattn.attention(q, k, v, self.mask, return_lse=True)
            # use lse in a way that does not need its gradient: a detached per-row weight
            out = out * torch.sigmoid(lse.detach()).transpose(1, 2).unsqueeze(-1).to(out.dtype)
        else:
            out = longattn.flash_attn_func(q, k, v, causal=True, window_size=(16, -1),
                                           softcap=self.softcap or 0.0)
        return self.o(out.reshape(B, S, self.h * self.hd))


def _dtype(device):
    return F32 if device == "cpu" else BF16


def _tol(dtype):
    # compiled and eager call the same kernels; only the surrounding linear layers may be
    # fused / reordered by the compiler
    return (1e-4, 1e-4) if dtype == F32 else (2e-2, 2e-2)


def _compare(device, model, x, backend=None, extra=(), steps=1):
    dtype = x.dtype
    torch._dynamo.reset()
    model = model.to(device=device, dtype=dtype)
    compiled = torch.compile(model, fullgraph=True, **({} if backend is None else
                                                        {"backend": backend}))
    atol, rtol = _tol(dtype)
    for _ in range(steps):
        xe = x.detach().clone().requires_grad_(True)
        xc = x.detach().clone().requires_grad_(True)
        ye = model(xe, *extra)
        ge = torch.autograd.grad(ye.float().square().sum(), [xe] + list(model.parameters()))
        yc = compiled(xc, *extra)
        gc = torch.autograd.grad(yc.float().square().sum(), [xc] + list(model.parameters()))
        torch.testing.assert_close(yc, ye, atol=atol, rtol=rtol)
        assert ye.abs().max() > 0.01
        for a, b in zip(gc, ge):
            torch.testing.assert_close(a, b, atol=atol * 10, rtol=rtol * 10)
        assert any(float(g.abs().max()) > 0 for g in ge[1:5])  # q/k projections get gradient


def test_compile_attention_fwd_bwd(device):
    dtype = _dtype(device)
    x = randn(2, 65, 64, dtype=dtype, device=device)
    _compare(device, AttnBlock(mode="attention"), x)


def test_compile_flash_attn_func_fwd_bwd(device):
    dtype = _dtype(device)
    x = randn(2, 63, 64, dtype=dtype, device=device)
    _compare(device, AttnBlock(mode="flash", softcap=3.0), x)


@pytest.mark.parametrize("mask", ["causal & (sinks(2) | window(8,0))", "causal & document"])
def test_compile_masks_and_documents(device, mask):
    dtype = _dtype(device)
    x = randn(2, 40, 64, dtype=dtype, device=device)
    extra = ()
    if "document" in mask:
        d = torch.tensor([0] * 15 + [1] * 20 + [2] * 5, dtype=torch.int32, device=device)
        d = torch.stack([d, d.flip(0)])
        extra = (d, d)
    _compare(device, AttnBlock(mode="attention", mask=mask, softcap=4.0), x, extra=extra)


def test_compile_return_lse(device):
    dtype = _dtype(device)
    x = randn(1, 33, 64, dtype=dtype, device=device)
    _compare(device, AttnBlock(mode="attention_lse"), x)


def test_compile_new_sequence_length(device):
    """A second call with another sequence length (recompile, dynamic shape under the
    defaults) is still right."""
    dtype = _dtype(device)
    torch._dynamo.reset()
    model = AttnBlock(mode="attention").to(device=device, dtype=dtype)
    compiled = torch.compile(model, fullgraph=True)
    atol, rtol = _tol(dtype)
    for s in (17, 65, 113):
        x = randn(1, s, 64, dtype=dtype, device=device)
        torch.testing.assert_close(compiled(x), model(x), atol=atol, rtol=rtol)
