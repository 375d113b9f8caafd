"""longattn: a long-context attention engine (Rust; CPU and CUDA) for PyTorch.

    import longattn
    out = longattn.attention(q, k, v, mask="causal & (sinks(4) | window(1024, 0))")

Tensors are ``[batch, seq, heads, dim]`` (the flash_attn layout), read where they are (any
strides; the CUDA kernels need a contiguous head dim), float32 / bfloat16 / float16 on the CPU,
bfloat16 / float16 on CUDA. Outputs are allocated by torch; CUDA work runs on
``torch.cuda.current_stream()``. ``longattn.flash_attn_func`` and the other ``flash_attn_*``
functions are drop-in replacements of the flash_attn package's; ``longattn.hf.register()`` adds
an ``attn_implementation="longattn"`` to Hugging Face transformers. ``longattn.sparse_attention``
is training-free dynamic sparse prefill (estimated on the GPU on CUDA). ``longattn.chunk_simple_gla``
and its siblings (:mod:`longattn.linear`) are linear attention in flash-linear-attention's
conventions.
"""
from __future__ import annotations

import torch

from . import _native, _ops  # noqa: F401  (_ops registers the torch.library ops)
from ._ops import fwd as _ops_fwd
from .mask import BlockMask, Mask, mask_args
from . import linear  # noqa: F401  (registers the linear-attention ops)
from .linear import chunk_gla, chunk_linear_attn, chunk_simple_gla, fused_recurrent_simple_gla
from .flash_attn_interface import (
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
    flash_attn_with_kvcache,
    set_cache_checks,
)

__version__ = _native.__version__

__all__ = [
    "BlockMask",
    "Mask",
    "attention",
    "attention_map",
    "chunk_gla",
    "chunk_linear_attn",
    "chunk_simple_gla",
    "flash_attn_func",
    "flash_attn_kvpacked_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_with_kvcache",
    "fused_recurrent_simple_gla",
    "gather_tiles",
    "gathered_attention",
    "linear",
    "plan_counts",
    "set_cache_checks",
    "sparse_attention",
]


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: "str | Mask | BlockMask | None" = "causal",
    *,
    scale: "float | None" = None,
    softcap: "float | None" = None,
    q_doc: "torch.Tensor | None" = None,
    k_doc: "torch.Tensor | None" = None,
    return_lse: bool = False,
    deterministic: bool = False,
):
    """Masked attention: ``softmax(scale * q k^T [softcap] + mask) v`` per head.

    q ``[B, Sq, Hq, D]``, k ``[B, Sk, Hk, D]``, v ``[B, Sk, Hk, Dv]`` with Hq a multiple of Hk
    (GQA / MQA: K/V are never expanded). ``mask``: an expression string, a :class:`Mask`, or an
    explicit :class:`BlockMask` (``None``: every pair attends); masks align the query rows to the end of the keys
    (``pos = i + Sk - Sq``), like flash_attn's causal. ``scale`` defaults to ``1/sqrt(D)``;
    ``softcap`` c maps a scaled logit s to ``c * tanh(s / c)``. ``q_doc`` / ``k_doc``: int32
    document ids ``[B, Sq]`` / ``[B, Sk]`` for masks with ``document`` (on CUDA they are read to
    the host to build the schedule: one synchronisation per new layout).

    Returns ``out [B, Sq, Hq, Dv]`` in q's dtype, and with ``return_lse=True`` also
    ``lse [B, Hq, Sq]`` (float32, natural log). A row with no allowed key gets out 0 and lse -inf.
    Differentiable in q, k, v, through the output and (without softcap) the LSE; ``deterministic=True`` makes the backward
    bit-identical run to run. NaN in the inputs is not scanned for: it propagates to the rows it
    touches.
    """
    text, blocks, bq, bk = mask_args(mask)
    out, lse = _ops_fwd(
        q, k, v, text, scale, softcap, q_doc, k_doc, deterministic, return_lse, blocks, bq, bk
    )
    return (out, lse) if return_lse else out


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    spec: str,
    mask: "str | Mask | None" = "causal",
    *,
    scale: "float | None" = None,
    softcap: "float | None" = None,
    q_doc: "torch.Tensor | None" = None,
    k_doc: "torch.Tensor | None" = None,
    return_lse: bool = False,
    return_selection: bool = False,
):
    """Training-free dynamic sparse attention (forward): an estimator keeps some key tiles of
    every (batch row, query head, query tile) that ``mask`` schedules, and attention runs
    through the kept tiles (``mask & selection``: exact for the mask part).

    ``spec`` is a method with keyword arguments, e.g. ``"vertical_slash(v=64,s=32)"``,
    ``"flexprefill(gamma=0.9,tau=0.1)"``, ``"topmass(gamma=0.95)"``, ``"proxy(gamma=0.9)"``,
    ``"moba(block=512,topk=3)"``, ``"relthresh(alpha=0.7)"``, ``"skip(factor=600)"``,
    ``"columns(gamma=0.97,rows=8,check=0.92)"`` (element level: the keys each query tile's
    sampled rows weigh most), ``"lowbit(tau=0.3)"`` (every pair's logit estimated from int8
    Q and K), ``"lowbit_mass(gamma=0.95)"`` (element level: the same estimate, each row its
    own keys to that share of its estimated mass), ``element=1`` on ``vertical_slash`` / ``flexprefill`` (only the
    pairs on the kept lines), or a union ``"A + B"`` (the grammar and every argument: the Rust
    crate's ``longattn::sparse``; element-level selections and unions run on the CPU only). Every method takes
    ``dense_below=N``: with fewer keys the mask runs dense (default 1024 on the CPU, 16384 on
    CUDA). On CUDA the estimator runs on the device with no host synchronisation
    (``vertical_slash``, ``lowbit``; the selection is made at the attention kernel's tiles; other methods
    raise a clear error); on the CPU every method. Shapes, dtypes and ``mask`` (an expression
    string, a :class:`Mask` or ``None``) as for :func:`attention`. With ``q_doc`` / ``k_doc``
    (packed varlen, ``mask="causal & document"``) the CPU estimators work per document (each
    document's own last rows, sinks and budgets; ids must be contiguous runs); the CUDA
    estimator refuses document ids.

    Returns ``out`` (and ``lse`` with ``return_lse``), and with ``return_selection`` also a dict:
    ``block_mask`` (uint8 ``[B, Hq, query tiles, key tiles]`` on the CPU: 0 skipped, 1 whole
    tile, 2 tile in part: under the mask or the kept lines), ``tile_q`` / ``tile_k``, ``density`` (allowed pairs kept /
    allowed pairs of the mask), ``fallback`` (the dense fallback ran) and ``skipped``
    (skip-softmax's ``(tested, dropped)`` tile groups in this forward, or ``None`` without it;
    on the CPU read from process-wide counters, so concurrent calls mix); on CUDA this
    synchronises.

    Differentiable in q, k, v through ``out`` for tile-level selections (eager autograd; ``lse``
    is not differentiable): the selection is made once, in the forward, and the backward runs
    through the same tiles (``mask & selection`` as a :class:`BlockMask` gating ``mask``; on
    CUDA the selection is read to the host: one synchronisation). Element-level selections
    (``columns``, ``lowbit_mass``, ``element=1``) and skip-softmax (a forward approximation)
    raise when gradients are wanted: :func:`gathered_attention` takes a per-tile key selection
    with gradients.
    """
    from ._ops import check_qkv

    check_qkv(q, k, v, "sparse_attention")
    if isinstance(mask, BlockMask):
        raise ValueError(
            "sparse_attention selects within a mask expression (or None); an explicit BlockMask "
            "cannot be combined with it"
        )
    text, _, _, _ = mask_args(mask)
    args = (spec, text, scale, softcap, q_doc, k_doc)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        element, skip = _native.sparse_spec_info(spec)
        if element:
            raise RuntimeError(
                f"sparse_attention: no gradients through the element-level selection of {spec!r} "
                "(it keeps single pairs); use a tile-level method, call it under torch.no_grad(), "
                "or pass the selection to longattn.gathered_attention, which has a backward"
            )
        if skip:
            raise RuntimeError(
                f"sparse_attention: no gradients with skip-softmax ({spec!r} drops tiles as a "
                "forward approximation); drop `skip` for training or call it under torch.no_grad()"
            )
        out, lse, info = _SparseTiles.apply(q, k, v, args)
    else:
        out, lse, info = _sparse_fwd(q, k, v, args, return_selection)
    fallback, (tq, tk), density, table, shape, skipped = info
    res = (out, lse) if return_lse else (out,)
    if return_selection:
        sel = {
            "block_mask": torch.frombuffer(bytearray(table), dtype=torch.uint8).reshape(shape),
            "tile_q": tq,
            "tile_k": tk,
            "density": density,
            "fallback": fallback,
            "skipped": skipped,
        }
        res = res + (sel,)
    return res[0] if len(res) == 1 else res


def _sparse_fwd(q, k, v, args, report):
    from ._ops import _stream

    spec, text, scale, softcap, q_doc, k_doc = args
    b, sq, hq, _ = q.shape
    out = q.new_empty((b, sq, hq, v.shape[3]))
    lse = torch.empty((b, hq, sq), dtype=torch.float32, device=q.device)
    info = _native.sparse_fwd(
        q, k, v, out, lse, spec, text, scale, softcap, q_doc, k_doc, _stream(q), report
    )
    return out, lse, info


class _SparseTiles(torch.autograd.Function):
    """:func:`sparse_attention` for a tile-level selection, with the backward through the
    forward's selection: the kept tiles as a block table gating the mask."""

    @staticmethod
    def forward(ctx, q, k, v, args):
        out, lse, info = _sparse_fwd(q, k, v, args, True)
        _, (tq, tk), _, table, shape, _ = info
        ctx.mark_non_differentiable(lse)
        ctx.save_for_backward(q, k, v, out, lse)
        kept = torch.frombuffer(bytearray(table), dtype=torch.uint8).reshape(shape) != 0
        ctx.gate = (kept.to(torch.uint8), tq, tk)
        ctx.args = args
        return out, lse, info

    @staticmethod
    def backward(ctx, dout, _dlse, _dinfo=None):
        q, k, v, out, lse = ctx.saved_tensors
        _, text, scale, softcap, q_doc, k_doc = ctx.args
        gate, tq, tk = ctx.gate
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dk, dv = torch.ops.longattn.bwd(
            dout, q, k, v, out, lse, text, scale, softcap, q_doc, k_doc, False, gate, tq, tk
        )
        return dq, dk, dv, None


def _int32_bytes(name: str, t) -> bytes:
    """The values of an integer tensor (or sequence) as contiguous int32 bytes (host copy)."""
    if not isinstance(t, torch.Tensor):
        t = torch.as_tensor(t, dtype=torch.int64)
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"`{name}` must hold integers, got dtype {t.dtype}")
    t = t.detach().reshape(-1)
    if t.numel() and (int(t.min()) < 0 or int(t.max()) > 2**31 - 1):
        raise ValueError(f"`{name}` must hold values in [0, 2^31 - 1]")
    return t.to(device="cpu", dtype=torch.int32).contiguous().numpy().tobytes()


def gather_tiles(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: "str | Mask | None" = "causal",
    *,
    q_doc: "torch.Tensor | None" = None,
    k_doc: "torch.Tensor | None" = None,
) -> "tuple[int, int]":
    """The ``(tile_q, tile_k)`` a :func:`gathered_attention` selection must use for these
    inputs: on CUDA the Hopper warp-specialized forward's tiles (other GPUs and head dims past
    256 raise); on the CPU any tiles run, and this returns ``(64, 64)``."""
    from ._ops import check_qkv

    check_qkv(q, k, v, "gather_tiles")
    if isinstance(mask, BlockMask):
        raise ValueError("gathered attention takes a mask expression (or None), not a BlockMask")
    text, _, _, _ = mask_args(mask)
    return _native.gather_tiles(q, k, v, text, q_doc, k_doc)


def gathered_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    tile_counts,
    tiles,
    key_counts,
    keys,
    mask: "str | Mask | None" = "causal",
    *,
    tile_q: int,
    tile_k: int,
    scale: "float | None" = None,
    softcap: "float | None" = None,
    q_doc: "torch.Tensor | None" = None,
    k_doc: "torch.Tensor | None" = None,
    deterministic: bool = False,
    return_lse: bool = False,
):
    """Attention over a caller's selection of keys per query tile: each query tile of
    ``tile_q`` rows computes some key tiles (of ``tile_k`` keys) whole and some single keys
    besides, under ``mask`` (the pairs kept are ``mask & selection``). This is how a selection
    that keeps a few keys scattered over the whole prefix (a MInference column list, per-tile
    top keys) runs at the cost of the keys kept: on CUDA the Hopper forward copies the single
    keys' rows into tiles of their own.

    The selection, in flat lists: ``tile_counts`` and ``key_counts`` are integer tensors of
    shape ``[Bs, Hs, ceil(Sq / tile_q)]`` (``Bs`` 1 or B, ``Hs`` 1 or Hq: one selection shared
    by the batch rows / heads), and ``tiles`` / ``keys`` the concatenation, in that order, of
    each (batch row, head, query tile)'s key tiles and keys, each ascending (keys inside a
    listed tile are dropped). The lists are read on the host (a copy from the GPU synchronises).
    On CUDA the tiles must be :func:`gather_tiles`'s, the inputs contiguous bf16 / f16 with the
    head dim at most 256; the plan is made per call. Shapes, ``mask`` (an expression, a
    :class:`Mask` or ``None``), ``scale``, ``softcap`` and documents as for :func:`attention`.
    Returns ``out`` (and ``lse`` with ``return_lse``).

    Differentiable in q, k, v through ``out`` (eager autograd; ``lse`` is not differentiable):
    the backward runs through the same selection, pair for pair (on CUDA the attention backward
    over the tiles holding kept keys, each tested against the mask and the selection: a tile
    costs its whole product there; ``deterministic`` as for :func:`attention`).
    """
    from ._ops import check_qkv

    check_qkv(q, k, v, "gathered_attention")
    if isinstance(mask, BlockMask):
        raise ValueError("gathered attention takes a mask expression (or None), not a BlockMask")
    for name, x in (("tile_q", tile_q), ("tile_k", tile_k)):
        if not isinstance(x, int) or x < 1:
            raise ValueError(f"gathered_attention: `{name}` must be a positive int, got {x!r}")
    b, sq, hq, _ = q.shape
    nq = -(-sq // tile_q)
    layout = None
    for name, c in (("tile_counts", tile_counts), ("key_counts", key_counts)):
        shape = tuple(torch.as_tensor(c).shape) if not isinstance(c, torch.Tensor) else tuple(c.shape)
        if len(shape) != 3 or shape[0] not in (1, b) or shape[1] not in (1, hq) or shape[2] != nq:
            raise ValueError(
                f"gathered_attention: `{name}` must have shape [1 or {b}, 1 or {hq}, {nq}] "
                f"(batch rows, query heads, query tiles of {tile_q}), got {list(shape)}"
            )
        if layout is not None and shape[:2] != layout:
            raise ValueError("gathered_attention: `tile_counts` and `key_counts` must have the same shape")
        layout = shape[:2]
    text, _, _, _ = mask_args(mask)
    sel = (
        (tile_q, tile_k), layout,
        _int32_bytes("tile_counts", tile_counts), _int32_bytes("tiles", tiles),
        _int32_bytes("key_counts", key_counts), _int32_bytes("keys", keys),
    )
    args = (text, scale, softcap, q_doc, k_doc, bool(deterministic), sel)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        out, lse = _Gathered.apply(q, k, v, args)
    else:
        out, lse = _gathered_fwd(q, k, v, args)
    return (out, lse) if return_lse else out


def _gathered_fwd(q, k, v, args):
    from ._ops import _stream

    text, scale, softcap, q_doc, k_doc, _, sel = args
    b, sq, hq, _ = q.shape
    out = q.new_empty((b, sq, hq, v.shape[3]))
    lse = torch.empty((b, hq, sq), dtype=torch.float32, device=q.device)
    _native.fwd_gathered(q, k, v, out, lse, text, scale, softcap, q_doc, k_doc, _stream(q), *sel)
    return out, lse


class _Gathered(torch.autograd.Function):
    """:func:`gathered_attention` with its backward through the same selection."""

    @staticmethod
    def forward(ctx, q, k, v, args):
        out, lse = _gathered_fwd(q, k, v, args)
        ctx.mark_non_differentiable(lse)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = args
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        from ._ops import _stream

        q, k, v, out, lse = ctx.saved_tensors
        text, scale, softcap, q_doc, k_doc, deterministic, sel = ctx.args
        # One set of strides per tensor shape in the kernels: contiguous copies where needed.
        q, k, v, out = q.contiguous(), k.contiguous(), v.contiguous(), out.contiguous()
        dout = torch.zeros_like(out) if dout is None else dout.to(q.dtype).contiguous()
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        _native.bwd_gathered(
            q, k, v, out, lse, dout, dq, dk, dv, text, scale, softcap, q_doc, k_doc,
            deterministic, _stream(q), *sel,
        )
        return dq, dk, dv, None


def attention_map(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: "str | Mask | BlockMask | None" = "causal",
    *,
    block: int = 64,
    scale: "float | None" = None,
    softcap: "float | None" = None,
    q_doc: "torch.Tensor | None" = None,
    k_doc: "torch.Tensor | None" = None,
):
    """Attention forward that also returns its block-pooled probabilities (forward only):
    SeerAttention's training target and a sparse estimator's ground truth, from the kernel's own
    softmax (no second pass over Q K^T). On CUDA the Hopper forward writes it (contiguous bf16 /
    f16 inputs; other GPUs and kernels raise), queued on the current stream.

    Arguments as for :func:`attention`; ``block`` (a multiple of 64) is the pooling block of
    query rows and keys. Returns ``(out, lse, mass, max)``: ``mass`` and ``max`` are float32
    ``[B, Hq, ceil(Sq / block), ceil(Sk / block)]``, with p the attention probabilities under
    the mask, ``mass[qb, kb]`` the mean over the block's query rows of their probability in key
    block kb (a row of ``mass`` sums to 1 unless the block has rows with no key) and
    ``max[qb, kb]`` the largest p in the block (2-D max pooling).
    """
    from ._ops import _stream, check_qkv

    check_qkv(q, k, v, "attention_map")
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise RuntimeError("attention_map is forward-only: call it under torch.no_grad()")
    if not isinstance(block, int) or block < 64 or block % 64 != 0:
        raise ValueError(f"attention_map: `block` must be a positive multiple of 64, got {block!r}")
    text, blocks, bq, bk = mask_args(mask)
    b, sq, hq, _ = q.shape
    sk = k.shape[1]
    out = q.new_empty((b, sq, hq, v.shape[3]))
    lse = torch.empty((b, hq, sq), dtype=torch.float32, device=q.device)
    shape = (b, hq, -(-sq // block), -(-sk // block))
    mass = torch.empty(shape, dtype=torch.float32, device=q.device)
    top = torch.empty(shape, dtype=torch.float32, device=q.device)
    _native.fwd_map(q, k, v, out, lse, mass, top, block, text, scale, softcap, q_doc, k_doc,
                    blocks, bq, bk, _stream(q))
    return out, lse, mass, top


def plan_counts():
    """(forward, backward, decode) CUDA plans cached in this process."""
    return _native.plan_counts()


def __getattr__(name):
    # `longattn.hf` imports transformers only when used.
    if name == "hf":
        import importlib

        return importlib.import_module(".hf", __name__)
    raise AttributeError(f"module 'longattn' has no attribute {name!r}")
