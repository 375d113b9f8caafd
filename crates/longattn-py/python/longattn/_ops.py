"""The torch.library ops of longattn: implementations (CPU, CUDA), fake tensors, autograd.

Three ops, defined once with `torch.library.Library` (low per-call overhead):

- ``longattn::fwd(q, k, v, mask, scale, softcap, q_doc, k_doc, deterministic) -> (out, lse)``
- ``longattn::bwd(dout, q, k, v, out, lse, mask, scale, softcap, q_doc, k_doc, deterministic)
  -> (dq, dk, dv)``
- ``longattn::decode(q, k_cache, v_cache, block_table, cache_seqlens, scale, softcap) -> (out, lse)``

Outputs are allocated here by torch (its caching allocator owns all memory) and written in place
by the Rust entry point (`longattn::api`), which reads the inputs where they are (no copies) and
queues CUDA work on ``torch.cuda.current_stream()``. The fake implementations give shapes only,
so ``torch.compile(fullgraph=True)`` traces through the ops; the registered autograd makes
``loss.backward()`` run longattn's backward.
"""
from __future__ import annotations

import torch

from . import _native

_lib = torch.library.Library("longattn", "DEF")
_lib.define(
    "fwd(Tensor q, Tensor k, Tensor v, str? mask, float? scale, float? softcap, "
    "Tensor? q_doc, Tensor? k_doc, bool deterministic=False, bool lse_grad=False, "
    "Tensor? block_mask=None, int block_q=0, int block_k=0) -> (Tensor, Tensor)"
)
_lib.define(
    "bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, str? mask, "
    "float? scale, float? softcap, Tensor? q_doc, Tensor? k_doc, bool deterministic=False, "
    "Tensor? block_mask=None, int block_q=0, int block_k=0) -> (Tensor, Tensor, Tensor)"
)
_lib.define(
    "decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor? block_table, "
    "Tensor cache_seqlens, float? scale, float? softcap) -> (Tensor, Tensor)"
)


def _stream(t: torch.Tensor) -> int:
    """The CUstream of torch's current stream on t's device (0 on the CPU)."""
    dev = t.get_device()
    if dev >= 0:
        return torch._C._cuda_getCurrentRawStream(dev)
    return 0


def check_qkv(q, k, v, op: str = "attention") -> None:
    """Ranks, devices and dtypes of q, k, v, with errors that name the tensor and the shapes."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: `{name}` must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(
                f"{op}: `{name}` has shape {tuple(t.shape)}; expected rank 4 [batch, seq, heads, dim]"
            )
    for name, t in (("k", k), ("v", v)):
        if t.device != q.device:
            raise ValueError(f"{op}: `{name}` is on {t.device}, `q` on {q.device}: one device per call")
        if t.dtype != q.dtype:
            raise TypeError(f"{op}: `{name}` has dtype {t.dtype}, `q` has {q.dtype}: one dtype per call")


def _fwd_impl(q, k, v, mask, scale, softcap, q_doc, k_doc, deterministic=False, lse_grad=False,
              block_mask=None, block_q=0, block_k=0):
    check_qkv(q, k, v)
    b, sq, hq, _ = q.shape
    out = q.new_empty((b, sq, hq, v.shape[3]))
    lse = torch.empty((b, hq, sq), dtype=torch.float32, device=q.device)
    _native.fwd(q, k, v, out, lse, mask, scale, softcap, q_doc, k_doc, _stream(q),
                block_mask, block_q, block_k)
    return out, lse


def _bwd_impl(dout, q, k, v, out, lse, mask, scale, softcap, q_doc, k_doc, deterministic=False,
              block_mask=None, block_q=0, block_k=0):
    # The CUDA kernels take one set of strides for q-shaped tensors and one for k-shaped ones:
    # contiguous copies where needed (a no-op for contiguous tensors).
    q, k, v, out = q.contiguous(), k.contiguous(), v.contiguous(), out.contiguous()
    dout = dout.to(q.dtype).contiguous()
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    _native.bwd(
        q, k, v, out, lse.contiguous(), dout, dq, dk, dv, mask, scale, softcap, q_doc, k_doc,
        bool(deterministic), _stream(q), block_mask, block_q, block_k,
    )
    return dq, dk, dv


def _decode_impl(q, k_cache, v_cache, block_table, cache_seqlens, scale, softcap):
    q = q.contiguous()
    out = torch.empty_like(q)
    lse = torch.empty((q.shape[0], q.shape[2]), dtype=torch.float32, device=q.device)
    _native.decode(
        q, k_cache, v_cache, block_table, cache_seqlens, out, lse, scale, softcap, _stream(q)
    )
    return out, lse


for _key in ("CPU", "CUDA"):
    _lib.impl("fwd", _fwd_impl, _key)
    _lib.impl("bwd", _bwd_impl, _key)
    _lib.impl("decode", _decode_impl, _key)


@torch.library.register_fake("longattn::fwd")
def _fwd_fake(q, k, v, mask, scale, softcap, q_doc, k_doc, deterministic=False, lse_grad=False,
              block_mask=None, block_q=0, block_k=0):
    check_qkv(q, k, v)
    b, sq, hq, _ = q.shape
    return (
        q.new_empty((b, sq, hq, v.shape[3])),
        q.new_empty((b, hq, sq), dtype=torch.float32),
    )


@torch.library.register_fake("longattn::bwd")
def _bwd_fake(dout, q, k, v, out, lse, mask, scale, softcap, q_doc, k_doc, deterministic=False,
              block_mask=None, block_q=0, block_k=0):
    return (
        torch.empty(q.shape, dtype=q.dtype, device=q.device),
        torch.empty(k.shape, dtype=k.dtype, device=k.device),
        torch.empty(v.shape, dtype=v.dtype, device=v.device),
    )


@torch.library.register_fake("longattn::decode")
def _decode_fake(q, k_cache, v_cache, block_table, cache_seqlens, scale, softcap):
    return (
        torch.empty(q.shape, dtype=q.dtype, device=q.device),
        q.new_empty((q.shape[0], q.shape[2]), dtype=torch.float32),
    )


def _fwd_setup(ctx, inputs, output):
    (q, k, v, mask, scale, softcap, q_doc, k_doc, deterministic, lse_grad, block_mask, block_q,
     block_k) = inputs
    out, lse = output
    if not lse_grad:
        # The caller never sees this LSE (e.g. `attention(..., return_lse=False)`).
        ctx.mark_non_differentiable(lse)
    # Unused output gradients arrive as None (not zeros), so the LSE term below runs only when
    # a loss really uses the LSE.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(q, k, v, out, lse, q_doc, k_doc, block_mask)
    ctx.args = (mask, scale, softcap, deterministic, block_q, block_k)


def _fwd_backward(ctx, dout, dlse):
    q, k, v, out, lse, q_doc, k_doc, blocks = ctx.saved_tensors
    mask, scale, softcap, deterministic, bq, bk = ctx.args
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = torch.ops.longattn.bwd(
        dout, q, k, v, out, lse, mask, scale, softcap, q_doc, k_doc, deterministic, blocks, bq, bk
    )
    if dlse is not None:
        # LSE_i = log sum_j exp(s_ij), s_ij = scale q_i . k_j, so dLSE_i / ds_ij = P_ij and the
        # extra logit gradient is dS_ij = P_ij dLSE_i. Hence
        #   dQ_i += scale dLSE_i sum_j P_ij k_j = scale dLSE_i attention(q, k, k)_i
        #   dK_j += scale sum_i P_ij dLSE_i q_i  = scale (P^T (dLSE o q))_j,
        # the dV of attention(q, k, k) for dO = dLSE o q (summed over a GQA group's heads).
        if softcap is not None:
            raise RuntimeError(
                "longattn.attention: gradients through `lse` with softcap are not supported "
                "(use lse.detach())"
            )
        s = scale if scale is not None else q.shape[-1] ** -0.5
        w = dlse.transpose(1, 2).unsqueeze(-1).to(torch.float32)  # [B, Sq, Hq, 1]
        pk, _ = torch.ops.longattn.fwd(
            q, k, k, mask, scale, None, q_doc, k_doc, deterministic, False, blocks, bq, bk
        )
        dq = (dq.float() + s * w * pk.float()).to(dq.dtype)
        _, _, dk_lse = torch.ops.longattn.bwd(
            (w * q.float()).to(q.dtype), q, k, k, pk, lse, mask, scale, None, q_doc, k_doc,
            deterministic, blocks, bq, bk,
        )
        dk = (dk.float() + s * dk_lse.float()).to(dk.dtype)
    return dq, dk, dv, None, None, None, None, None, None, None, None, None, None


torch.library.register_autograd("longattn::fwd", _fwd_backward, setup_context=_fwd_setup)


def fwd(q, k, v, mask, scale, softcap, q_doc, k_doc, deterministic=False, lse_grad=False,
        block_mask=None, block_q=0, block_k=0):
    """``torch.ops.longattn.fwd``, or straight to its implementation in eager mode when no
    gradient is wanted (inference): the dispatcher and autograd layers cost more host time than
    the kernel at decode sizes. Traced code (torch.compile) always sees the op."""
    if not torch.compiler.is_compiling() and not (
        torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    ):
        return _fwd_impl(q, k, v, mask, scale, softcap, q_doc, k_doc, deterministic, lse_grad,
                         block_mask, block_q, block_k)
    return torch.ops.longattn.fwd(
        q, k, v, mask, scale, softcap, q_doc, k_doc, deterministic, lse_grad, block_mask,
        block_q, block_k,
    )


def decode(q, k_cache, v_cache, block_table, cache_seqlens, scale, softcap):
    """``torch.ops.longattn.decode`` (straight to the implementation in eager mode)."""
    if not torch.compiler.is_compiling():
        return _decode_impl(q, k_cache, v_cache, block_table, cache_seqlens, scale, softcap)
    return torch.ops.longattn.decode(q, k_cache, v_cache, block_table, cache_seqlens, scale, softcap)
