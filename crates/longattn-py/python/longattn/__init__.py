"""longattn: a long-context attention engine (Rust; CPU and CUDA) for PyTorch.

    import longattn
    out = longattn.attention(q, k, v, mask="causal & (sinks(4) | window(1024, 0))")

Tensors are ``[batch, seq, heads, dim]`` (the flash_attn layout), read where they are (any
strides; the CUDA kernels need a contiguous head dim), float32 / bfloat16 / float16 on the CPU,
bfloat16 / float16 on CUDA. Outputs are allocated by torch; CUDA work runs on
``torch.cuda.current_stream()``. ``longattn.flash_attn_func`` and the other ``flash_attn_*``
functions are drop-in replacements of the flash_attn package's; ``longattn.hf.register()`` adds
an ``attn_implementation="longattn"`` to Hugging Face transformers. ``longattn.chunk_simple_gla``
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
    "chunk_gla",
    "chunk_linear_attn",
    "chunk_simple_gla",
    "flash_attn_func",
    "flash_attn_kvpacked_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_with_kvcache",
    "fused_recurrent_simple_gla",
    "linear",
    "plan_counts",
    "set_cache_checks",
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


def plan_counts():
    """(forward, backward, decode) CUDA plans cached in this process."""
    return _native.plan_counts()


def __getattr__(name):
    # `longattn.hf` imports transformers only when used.
    if name == "hf":
        import importlib

        return importlib.import_module(".hf", __name__)
    raise AttributeError(f"module 'longattn' has no attribute {name!r}")
