"""Linear attention in flash-linear-attention's conventions (``[B, T, H, K]`` tensors).

The core recurrence, per sequence and head (kv head ``h // (H // Hk)``)::

    S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t        (state K x V, float32)
    o_t = scale * q_t S_t

with the log decay ``g`` (``<= 0``) given as ``None`` (plain), ``[H]`` (one constant per head,
RetNet / Lightning style), ``[B, T, H]`` (per token: ``chunk_simple_gla``) or ``[B, T, H, K]``
(per key dimension: ``chunk_gla``). Feature maps and normalisations are applied by the caller, as
in FLA; the Rust library (``longattn run --linear SPEC``) has them built in.

- :func:`chunk_simple_gla`, :func:`chunk_gla`, :func:`chunk_linear_attn`: chunked forward with
  longattn's backward under autograd (``loss.backward()`` gives dq, dk, dv, dg and the initial
  state's gradient); ``cu_seqlens`` (int32 ``[N + 1]``, batch 1) runs N sequences whose states
  never mix; ``initial_state`` / final state ``[N or B, H, K, V]`` float32.
- :func:`fused_recurrent_simple_gla`: the decode step (one token per sequence), state updated in
  place.

The log decays are checked (``g <= 0``, finite). On CUDA the chunked calls queue one reduction
and an 8-byte copy of (min, max) into pinned memory on a side stream, launch the kernels on the
caller's stream beside it, and only then wait for the copy: the device never idles for the check, and a bad ``g`` raises before any result
is returned (the results are fresh tensors, nothing the caller holds is written). The in-place
decode step waits before its kernel instead, since it updates the caller's state. The check is
skipped under CUDA graph capture and ``torch.compile``; :func:`check_decays` turns it off for
loops that produce ``g`` by construction (``F.logsigmoid``): the kernels never fault on a
positive decay, its state grows.

CPU: float32 / bfloat16 / float16. CUDA: bfloat16 / float16, K and V in {64, 128}, decays none /
per head / per token / per key dim (``chunk_gla``) in the chunked forward and backward, and in
the decode step.
"""
from __future__ import annotations

import torch

from . import _native
from ._ops import _lib, _stream

_lib.define(
    "linear_fwd(Tensor q, Tensor k, Tensor v, Tensor? g, Tensor? initial_state, "
    "Tensor? cu_seqlens, float scale) -> (Tensor, Tensor)"
)
_lib.define(
    "linear_bwd(Tensor dout, Tensor? d_final_state, Tensor q, Tensor k, Tensor v, Tensor? g, "
    "Tensor? initial_state, Tensor? cu_seqlens, float scale) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor)"
)


def _check(q, k, v, g, initial_state, cu_seqlens, op):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: `{name}` must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{op}: `{name}` has shape {tuple(t.shape)}; expected [B, T, H, K]")
        if t.device != q.device:
            raise ValueError(f"{op}: `{name}` is on {t.device}, `q` on {q.device}: one device per call")
        if t.dtype != q.dtype:
            raise TypeError(f"{op}: `{name}` has dtype {t.dtype}, `q` has {q.dtype}: one dtype per call")
    for name, t in (("g", g), ("initial_state", initial_state), ("cu_seqlens", cu_seqlens)):
        if t is not None and t.device != q.device:
            raise ValueError(f"{op}: `{name}` is on {t.device}, `q` on {q.device}: one device per call")
    if cu_seqlens is not None and cu_seqlens.dtype != torch.int32:
        raise TypeError(f"{op}: `cu_seqlens` must be int32, got {cu_seqlens.dtype}")


_CHECK_DECAYS = True


def check_decays(enabled: bool = True) -> bool:
    """Whether the linear-attention calls check their CUDA log decays (``g <= 0``) by reading a
    flag back from the device (a synchronisation per call; on by default). Returns the previous
    setting. CPU tensors are always checked."""
    global _CHECK_DECAYS
    prev, _CHECK_DECAYS = _CHECK_DECAYS, bool(enabled)
    return prev


def _decay_error(g, op):
    ok = (g <= 0) & (g > float("-inf"))
    i = int((~ok).flatten().nonzero()[0])
    return ValueError(
        f"{op}: `g` holds log decays, which must be finite and <= 0 (a decay in (0, 1]); "
        f"element {i} is {g.flatten()[i].item()}"
    )


def _decays_ok(lo, hi):
    # Every element in (-inf, 0]: NaN propagates into both extremes and fails both tests; -inf
    # would make the in-chunk differences of cumulative decays NaN.
    return hi <= 0 and lo > float("-inf")


_SIDE_STREAMS = {}


def _side_stream(device):
    """One stream per device for the decay checks."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SIDE_STREAMS:
        _SIDE_STREAMS[idx] = torch.cuda.Stream(device=idx)
    return _SIDE_STREAMS[idx]


class _DecayCheck:
    """The (min, max) of a CUDA ``g`` on its way to pinned host memory: one reduction and an
    8-byte copy queued on the current stream, waited for by :meth:`wait` once the kernels that
    read ``g`` are queued behind it."""

    def __init__(self, g, op):
        self.g, self.op = g, op
        self.host = torch.empty(2, dtype=torch.float32, pin_memory=True)
        # On a side stream that starts where the caller's stream is (g is ready there): the
        # reduction and the copy run beside the kernels queued next instead of before them. `g`
        # is held until wait(), so its memory is not reused while the side stream reads it.
        main = torch.cuda.current_stream(g.device)
        side = _side_stream(g.device)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            self.host.copy_(torch.stack(torch.aminmax(g)), non_blocking=True)
            self.done = torch.cuda.Event()
            self.done.record(side)

    def wait(self):
        self.done.synchronize()
        lo, hi = self.host.tolist()
        if not _decays_ok(lo, hi):
            raise _decay_error(self.g, self.op)


def _check_g(g, op, deferred=False):
    """float32 log decays, <= 0. Returns ``(g, pending)``: with ``deferred`` a CUDA check is only
    queued and ``pending.wait()`` finishes it (call it after queuing the kernels); otherwise it is
    finished here and ``pending`` is None. Skipped under graph capture and compilation."""
    if g is None:
        return None, None
    if not g.is_floating_point():
        raise TypeError(f"{op}: `g` must be a floating tensor of log decays, got {g.dtype}")
    g = g.float().contiguous()  # no copy when it already is
    if torch.compiler.is_compiling() or g.numel() == 0:
        return g, None
    if g.is_cuda:
        if not _CHECK_DECAYS or torch.cuda.is_current_stream_capturing():
            return g, None
        pending = _DecayCheck(g, op)
        if deferred:
            return g, pending
        pending.wait()
        return g, None
    lo, hi = torch.stack(torch.aminmax(g)).tolist()
    if not _decays_ok(lo, hi):
        raise _decay_error(g, op)
    return g, None


def _seqs(q, cu_seqlens):
    return q.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1


def _fwd_impl(q, k, v, g, initial_state, cu_seqlens, scale):
    b, t, h, _ = q.shape
    out = q.new_empty((b, t, h, v.shape[3]))
    state = torch.empty((_seqs(q, cu_seqlens), h, q.shape[3], v.shape[3]), dtype=torch.float32,
                        device=q.device)
    _native.linear_fwd(q, k, v, g, initial_state, cu_seqlens, out, state, scale, _stream(q))
    return out, state


def _bwd_impl(dout, d_final_state, q, k, v, g, initial_state, cu_seqlens, scale):
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    dg = torch.empty_like(g) if g is not None and g.dim() > 1 else q.new_empty((0,), dtype=torch.float32)
    ds0 = torch.empty((_seqs(q, cu_seqlens), q.shape[2], q.shape[3], v.shape[3]),
                      dtype=torch.float32, device=q.device)
    _native.linear_bwd(q, k, v, g, initial_state, cu_seqlens, dout.to(q.dtype).contiguous(), d_final_state,
                       dq, dk, dv, dg if dg.numel() else None, ds0, scale, _stream(q))
    return dq, dk, dv, dg, ds0


for _key in ("CPU", "CUDA"):
    _lib.impl("linear_fwd", _fwd_impl, _key)
    _lib.impl("linear_bwd", _bwd_impl, _key)


@torch.library.register_fake("longattn::linear_fwd")
def _fwd_fake(q, k, v, g, initial_state, cu_seqlens, scale):
    b, t, h, kd = q.shape
    n = b if cu_seqlens is None else cu_seqlens.shape[0] - 1
    return (q.new_empty((b, t, h, v.shape[3])),
            q.new_empty((n, h, kd, v.shape[3]), dtype=torch.float32))


@torch.library.register_fake("longattn::linear_bwd")
def _bwd_fake(dout, d_final_state, q, k, v, g, initial_state, cu_seqlens, scale):
    n = q.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    dg = torch.empty_like(g) if g is not None and g.dim() > 1 else q.new_empty((0,), dtype=torch.float32)
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dg,
            q.new_empty((n, q.shape[2], q.shape[3], v.shape[3]), dtype=torch.float32))


def _setup(ctx, inputs, output):
    q, k, v, g, s0, cu, scale = inputs
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(q, k, v, g, s0, cu)
    ctx.scale = scale


def _backward(ctx, dout, dstate):
    q, k, v, g, s0, cu = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros(q.shape[:3] + (v.shape[3],), dtype=q.dtype, device=q.device)
    dq, dk, dv, dg, ds0 = torch.ops.longattn.linear_bwd(dout, dstate, q, k, v, g, s0, cu, ctx.scale)
    return (dq, dk, dv, dg if (g is not None and g.dim() > 1) else None,
            ds0 if s0 is not None else None, None, None)


torch.library.register_autograd("longattn::linear_fwd", _backward, setup_context=_setup)


def _run(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens, op):
    _check(q, k, v, g, initial_state, cu_seqlens, op)
    scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
    g, pending = _check_g(g, op, deferred=True)
    if initial_state is not None:
        if initial_state.dtype != torch.float32:
            raise TypeError(f"{op}: `initial_state` must be float32, got {initial_state.dtype}")
        initial_state = initial_state.contiguous()
    if cu_seqlens is not None:
        cu_seqlens = cu_seqlens.contiguous()
    grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, g, initial_state)
    )
    if grad or torch.compiler.is_compiling():
        o, s = torch.ops.longattn.linear_fwd(q, k, v, g, initial_state, cu_seqlens, scale)
    else:
        o, s = _fwd_impl(q, k, v, g, initial_state, cu_seqlens, scale)
    if pending is not None:
        pending.wait()  # the kernels are queued: the device does not idle for the check
    return o, (s if output_final_state else None)


def chunk_simple_gla(q, k, v, g=None, scale=None, initial_state=None, output_final_state=False,
                     cu_seqlens=None, **kwargs):
    """Per-token scalar log decay ``g [B, T, H]`` (or ``[H]``, or None). Returns
    ``(o [B, T, H, V], final_state [N, H, K, V] or None)``."""
    _refuse(kwargs, "chunk_simple_gla")
    if g is not None and g.dim() not in (1, 3):
        raise ValueError(f"chunk_simple_gla: `g` has shape {tuple(g.shape)}; expected [B, T, H] or [H]")
    if g is not None and g.dim() == 1 and g.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            "chunk_simple_gla: a per-head `g [H]` is a constant decay (no gradient); pass "
            "g.detach(), or a per-token g [B, T, H] to learn it"
        )
    return _run(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens, "chunk_simple_gla")


def chunk_gla(q, k, v, g, scale=None, initial_state=None, output_final_state=False,
              cu_seqlens=None, **kwargs):
    """Per key-dimension log decay ``g [B, T, H, K]`` (GLA)."""
    _refuse(kwargs, "chunk_gla")
    if g is None or g.dim() != 4:
        raise ValueError(f"chunk_gla: `g` must be [B, T, H, K], got {None if g is None else tuple(g.shape)}")
    return _run(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens, "chunk_gla")


def chunk_linear_attn(q, k, v, scale=None, initial_state=None, output_final_state=False,
                      cu_seqlens=None, **kwargs):
    """Plain linear attention (no decay)."""
    _refuse(kwargs, "chunk_linear_attn")
    return _run(q, k, v, None, scale, initial_state, output_final_state, cu_seqlens,
                "chunk_linear_attn")


def fused_recurrent_simple_gla(q, k, v, g=None, scale=None, initial_state=None,
                               output_final_state=True, **kwargs):
    """One decode step per sequence: q/k/v ``[B, 1, H, K]``, ``g [B, 1, H]`` / ``[B, 1, H, K]`` /
    ``[H]`` / None, ``initial_state [B, H, K, V]`` float32 (updated in place when given; zeros
    otherwise). Returns ``(o [B, 1, H, V], state)``. Not differentiable (inference)."""
    _refuse(kwargs, "fused_recurrent_simple_gla")
    op = "fused_recurrent_simple_gla"
    _check(q, k, v, g, initial_state, None, op)
    if q.shape[1] != 1:
        raise ValueError(f"{op}: one token per step, `q` has shape {tuple(q.shape)}")
    b, _, h, kd = q.shape
    if initial_state is None:
        initial_state = torch.zeros((b, h, kd, v.shape[3]), dtype=torch.float32, device=q.device)
    elif initial_state.dtype != torch.float32:
        raise TypeError(f"{op}: `initial_state` must be float32, got {initial_state.dtype}")
    elif not initial_state.is_contiguous():
        raise ValueError(f"{op}: `initial_state` is updated in place and must be contiguous")
    g, _ = _check_g(g, op)  # finished before the kernel: the state is updated in place
    scale = float(kd ** -0.5 if scale is None else scale)
    out = q.new_empty((b, 1, h, v.shape[3]))
    _native.linear_step(q, k, v, g, initial_state, out, scale, _stream(q))
    return out, (initial_state if output_final_state else None)


def _refuse(kwargs, op):
    for name, val in kwargs.items():
        if name in ("head_first",) and val:
            raise ValueError(f"{op}: `head_first=True` is not supported; pass [B, T, H, K] tensors")
        if name not in ("head_first", "reverse") or (name == "reverse" and val):
            raise ValueError(f"{op}: unsupported argument `{name}`={val!r}")
