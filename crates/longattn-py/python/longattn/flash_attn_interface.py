"""Drop-in replacements of the flash_attn package's functions (2.x signatures and conventions).

``import longattn as flash_attn`` style shims work: same argument names, defaults, return
conventions and shapes. What differs, deliberately:

- the LSE of a row with no allowed key is ``-inf`` (log of an empty sum; flash_attn writes
  ``+inf``), and that row's output is 0;
- ``dropout_p > 0``, ``alibi_slopes``, rotary embedding inside ``flash_attn_with_kvcache``
  (``rotary_cos`` / ``rotary_sin``), ``cache_batch_idx``, ``cache_leftpad`` and
  ``block_table`` in ``flash_attn_varlen_func`` raise ``ValueError`` naming the argument:
  never a silently different result;
- ``return_attn_probs=True`` returns ``(out, softmax_lse, None)``: the probabilities themselves
  are never materialised;
- ``flash_attn_varlen_func`` reads ``cu_seqlens`` on the host (one synchronisation) to bind the
  document layout; when ``cu_seqlens_q`` and ``cu_seqlens_k`` hold the same offsets (packed
  training batches) the whole batch is one kernel call with a ``document`` mask, otherwise one
  call per sequence;
- ``flash_attn_with_kvcache``: a single query per sequence (decode) without a window runs the
  paged decode kernel over the cache in place; other shapes (several new queries, windows)
  attend per sequence to views of the cache (pages gathered for paged caches).
"""
from __future__ import annotations

import math

import torch

from ._ops import decode as _ops_decode
from ._ops import fwd as _ops_fwd

#: Stands for "unbounded" in window masks (larger than any sequence the kernels take).
_UNBOUNDED = 1 << 30

#: Data-dependent checks of K/V caches (lengths within the capacity, block tables inside the
#: pool). On CUDA each costs a synchronisation; they are skipped under CUDA-graph capture and
#: when turned off with ``set_cache_checks(False)`` (then out-of-range entries are undefined
#: behaviour, as in flash_attn).
_CACHE_CHECKS = True


def set_cache_checks(on: bool) -> None:
    """Turns the data-dependent K/V cache checks of ``flash_attn_with_kvcache`` on or off."""
    global _CACHE_CHECKS
    _CACHE_CHECKS = bool(on)


def _unsupported(fn: str, **args) -> None:
    for name, (value, ok) in args.items():
        if not ok:
            raise ValueError(f"{fn}: `{name}`={value!r} is not supported by longattn")


def _common_checks(fn, dropout_p, alibi_slopes):
    _unsupported(
        fn,
        dropout_p=(dropout_p, dropout_p == 0.0),
        alibi_slopes=(None if alibi_slopes is None else "tensor", alibi_slopes is None),
    )


def _mask(causal: bool, window_size) -> "str | None":
    """flash_attn's (causal, window_size) as a mask expression (bottom-right aligned)."""
    try:
        left, right = (int(x) for x in window_size)
    except (TypeError, ValueError):
        raise ValueError(f"`window_size` must be a pair of ints (left, right), got {window_size!r}")
    if causal:
        right = 0
    if left < 0 and right < 0:
        return "causal" if causal else None
    lo = left if left >= 0 else _UNBOUNDED
    hi = right if right >= 0 else _UNBOUNDED
    w = f"window({lo}, {hi})"
    return f"causal & {w}" if causal else w


def _softcap(softcap) -> "float | None":
    if softcap is None or softcap == 0.0:
        return None
    if softcap < 0:
        raise ValueError(f"`softcap` must be >= 0 (0 disables it), got {softcap}")
    return float(softcap)


def flash_attn_func(
    q,
    k,
    v,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
):
    """q ``[B, Sq, Hq, D]``, k / v ``[B, Sk, Hk, D]`` -> out ``[B, Sq, Hq, D]``
    (``(out, softmax_lse [B, Hq, Sq], None)`` with ``return_attn_probs``)."""
    if dropout_p or alibi_slopes is not None:
        _common_checks("flash_attn_func", dropout_p, alibi_slopes)
    out, lse = _ops_fwd(
        q, k, v, _mask(causal, window_size), softmax_scale, _softcap(softcap), None, None,
        bool(deterministic), bool(return_attn_probs),
    )
    return (out, lse, None) if return_attn_probs else out


def flash_attn_qkvpacked_func(
    qkv,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
):
    """qkv ``[B, S, 3, H, D]`` (views, no copies)."""
    if not isinstance(qkv, torch.Tensor) or qkv.dim() != 5 or qkv.shape[2] != 3:
        raise ValueError(
            f"flash_attn_qkvpacked_func: `qkv` has shape {tuple(getattr(qkv, 'shape', ()))}; "
            "expected [batch, seq, 3, heads, dim]"
        )
    return flash_attn_func(
        qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], dropout_p, softmax_scale, causal,
        window_size, softcap, alibi_slopes, deterministic, return_attn_probs,
    )


def flash_attn_kvpacked_func(
    q,
    kv,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
):
    """q ``[B, Sq, Hq, D]``, kv ``[B, Sk, 2, Hk, D]`` (views, no copies)."""
    if not isinstance(kv, torch.Tensor) or kv.dim() != 5 or kv.shape[2] != 2:
        raise ValueError(
            f"flash_attn_kvpacked_func: `kv` has shape {tuple(getattr(kv, 'shape', ()))}; "
            "expected [batch, seqlen_k, 2, heads_k, dim]"
        )
    return flash_attn_func(
        q, kv[:, :, 0], kv[:, :, 1], dropout_p, softmax_scale, causal, window_size, softcap,
        alibi_slopes, deterministic, return_attn_probs,
    )


def _offsets(name: str, cu, total: int, device) -> list:
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"`{name}` must be an int32 tensor, got {type(cu).__name__}")
    if cu.dtype != torch.int32:
        raise TypeError(f"`{name}` has dtype {cu.dtype}; expected torch.int32")
    if cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(f"`{name}` has shape {tuple(cu.shape)}; expected [batch + 1]")
    if cu.device != device:
        raise ValueError(f"`{name}` is on {cu.device}, q on {device}")
    offs = cu.tolist()
    if offs[0] != 0 or any(b < a for a, b in zip(offs, offs[1:])) or offs[-1] != total:
        raise ValueError(
            f"`{name}` = {offs[:8]}{'...' if len(offs) > 8 else ''} must start at 0, never "
            f"decrease and end at the total length {total}"
        )
    return offs


def flash_attn_varlen_func(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
    block_table=None,
):
    """Packed sequences: q ``[total_q, Hq, D]``, k / v ``[total_k, Hk, D]``, offsets
    ``cu_seqlens_*`` int32 ``[batch + 1]``. Each sequence attends within itself (causal
    bottom-right aligned per sequence). Returns out ``[total_q, Hq, D]``
    (``(out, softmax_lse [Hq, total_q], None)`` with ``return_attn_probs``)."""
    fn = "flash_attn_varlen_func"
    _common_checks(fn, dropout_p, alibi_slopes)
    _unsupported(fn, block_table=("tensor", block_table is None))
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            raise ValueError(
                f"{fn}: `{name}` has shape {tuple(getattr(t, 'shape', ()))}; expected [total, heads, dim]"
            )
    cq = _offsets("cu_seqlens_q", cu_seqlens_q, q.shape[0], q.device)
    ck = _offsets("cu_seqlens_k", cu_seqlens_k, k.shape[0], q.device)
    if len(cq) != len(ck):
        raise ValueError(
            f"{fn}: `cu_seqlens_q` has {len(cq) - 1} sequences, `cu_seqlens_k` {len(ck) - 1}"
        )
    base = _mask(causal, window_size)
    cap = _softcap(softcap)
    det = bool(deterministic)
    hq = q.shape[1]
    if cq == ck:
        # One call: the sequences are documents of one packed row (equal offsets make the
        # global causal / window positions the per-sequence ones).
        lens = torch.tensor([b - a for a, b in zip(cq, cq[1:])], device=q.device)
        seg = torch.repeat_interleave(
            torch.arange(len(cq) - 1, dtype=torch.int32, device=q.device), lens,
            output_size=q.shape[0],
        )[None]
        mask = "document" if base is None else f"({base}) & document"
        out, lse = _ops_fwd(
            q[None], k[None], v[None], mask, softmax_scale, cap, seg, seg, det,
            bool(return_attn_probs),
        )
        out, lse = out[0], lse[0]
    else:
        outs, lses = [], []
        for b in range(len(cq) - 1):
            (q0, q1), (k0, k1) = (cq[b], cq[b + 1]), (ck[b], ck[b + 1])
            if q1 == q0:
                continue
            if k1 == k0:
                outs.append(q.new_zeros((q1 - q0, hq, v.shape[2])))
                lses.append(torch.full((hq, q1 - q0), -math.inf, device=q.device))
                continue
            o, l = _ops_fwd(
                q[None, q0:q1], k[None, k0:k1], v[None, k0:k1], base, softmax_scale, cap,
                None, None, det, bool(return_attn_probs),
            )
            outs.append(o[0])
            lses.append(l[0])
        out = torch.cat(outs, 0) if outs else q.new_zeros((0, hq, v.shape[2]))
        lse = torch.cat(lses, 1) if lses else torch.zeros((hq, 0), device=q.device)
    return (out, lse, None) if return_attn_probs else out


def _check_cache_tables(block_table, lens, num_blocks: int, page: int) -> None:
    """Every page a sequence uses must exist. A data-dependent check (a synchronisation on CUDA):
    callers skip it under graph capture and after ``set_cache_checks(False)``."""
    used = torch.arange(block_table.shape[1], device=block_table.device)[None] < (
        (lens + page - 1) // page
    )[:, None]
    bad = used & ((block_table < 0) | (block_table >= num_blocks))
    if bool(bad.any()):
        b, p = (int(x) for x in bad.nonzero()[0])
        raise ValueError(
            f"flash_attn_with_kvcache: `block_table`[{b}, {p}] = {int(block_table[b, p])} points "
            f"outside the cache's {num_blocks} pages (k_cache has shape [num_blocks={num_blocks}, "
            f"page_size={page}, heads, dim])"
        )
    if page * block_table.shape[1] < int(lens.max()):
        raise ValueError(
            f"flash_attn_with_kvcache: a sequence holds {int(lens.max())} keys but `block_table` "
            f"has room for {page * block_table.shape[1]}"
        )


def flash_attn_with_kvcache(
    q,
    k_cache,
    v_cache,
    k=None,
    v=None,
    rotary_cos=None,
    rotary_sin=None,
    cache_seqlens=None,
    cache_batch_idx=None,
    cache_leftpad=None,
    block_table=None,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    rotary_interleaved=True,
    alibi_slopes=None,
    num_splits=0,
    return_softmax_lse=False,
):
    """Attention of q ``[B, Sq, Hq, D]`` to a K/V cache: ``[B, capacity, Hk, D]``, or pages
    ``[num_blocks, page_size, Hk, D]`` with ``block_table`` ``[B, max_blocks]`` int32.
    ``cache_seqlens`` (int or int32 ``[B]``; None = the whole capacity) keys per sequence; new
    ``k`` / ``v`` ``[B, Snew, Hk, D]`` are written into the cache at those positions (in place)
    and attended to. Returns out (and ``softmax_lse [B, Hq, Sq]`` with
    ``return_softmax_lse``). Not differentiable (inference)."""
    fn = "flash_attn_with_kvcache"
    _unsupported(
        fn,
        rotary_cos=("tensor", rotary_cos is None),
        rotary_sin=("tensor", rotary_sin is None),
        cache_batch_idx=("tensor", cache_batch_idx is None),
        cache_leftpad=("tensor", cache_leftpad is None),
        alibi_slopes=("tensor", alibi_slopes is None),
    )
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(
                f"{fn}: `{name}` has shape {tuple(getattr(t, 'shape', ()))}; expected rank 4"
            )
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"{fn}: `v_cache` {tuple(v_cache.shape)} differs from `k_cache` {tuple(k_cache.shape)}")
    bsz, sq, hq, d = q.shape
    n0, tokens, hk, _ = k_cache.shape
    paged = block_table is not None
    if paged:
        if block_table.dtype != torch.int32:
            raise TypeError(f"{fn}: `block_table` has dtype {block_table.dtype}; expected torch.int32")
        if block_table.dim() != 2 or block_table.shape[0] != bsz:
            raise ValueError(f"{fn}: `block_table` has shape {tuple(block_table.shape)}; expected [{bsz}, max_blocks]")
        capacity = tokens * block_table.shape[1]
    else:
        if n0 != bsz:
            raise ValueError(f"{fn}: `k_cache` has shape {tuple(k_cache.shape)}; expected batch {bsz} (no block_table)")
        capacity = tokens
    if cache_seqlens is None:
        lens = torch.full((bsz,), capacity, dtype=torch.int32, device=q.device)
    elif isinstance(cache_seqlens, int):
        lens = torch.full((bsz,), cache_seqlens, dtype=torch.int32, device=q.device)
    else:
        if cache_seqlens.dtype != torch.int32:
            raise TypeError(f"{fn}: `cache_seqlens` has dtype {cache_seqlens.dtype}; expected torch.int32")
        if tuple(cache_seqlens.shape) != (bsz,):
            raise ValueError(f"{fn}: `cache_seqlens` has shape {tuple(cache_seqlens.shape)}; expected [{bsz}]")
        lens = cache_seqlens
    if (k is None) != (v is None):
        raise ValueError(f"{fn}: pass both `k` and `v` (new keys and values) or neither")
    no_checks = not _CACHE_CHECKS or (
        q.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    )
    if k is not None:
        snew = k.shape[1]
        if k.shape != (bsz, snew, hk, d) or v.shape[:3] != (bsz, snew, hk):
            raise ValueError(f"{fn}: new `k` {tuple(k.shape)} / `v` {tuple(v.shape)}; expected [{bsz}, Snew, {hk}, {d}]")
        if not no_checks and int((lens + snew).max()) > capacity:
            raise ValueError(
                f"{fn}: `cache_seqlens` + {snew} new keys = {int((lens + snew).max())} overflows the "
                f"cache's capacity {capacity} ({'block_table pages x page_size' if paged else 'k_cache seq dim'})"
            )
        pos = lens.long()[:, None] + torch.arange(snew, device=q.device)[None]
        if paged:
            if not no_checks:
                _check_cache_tables(block_table, lens + snew, n0, tokens)
            pages = torch.gather(block_table.long(), 1, pos // tokens)
            k_cache[pages, pos % tokens] = k.to(k_cache.dtype)
            v_cache[pages, pos % tokens] = v.to(v_cache.dtype)
        else:
            rows = torch.arange(bsz, device=q.device)[:, None]
            k_cache[rows, pos] = k.to(k_cache.dtype)
            v_cache[rows, pos] = v.to(v_cache.dtype)
        lens = lens + snew
    elif paged and not no_checks:
        _check_cache_tables(block_table, lens, n0, tokens)
    lens = lens.to(torch.int32)
    scale, cap = softmax_scale, _softcap(softcap)
    mask = _mask(causal, window_size)
    if sq == 1 and mask in (None, "causal"):
        # One query per sequence: causal allows every cached key; the decode kernel.
        if not no_checks and not paged and int(lens.max()) > capacity:
            raise ValueError(f"{fn}: `cache_seqlens` exceeds the cache's capacity {capacity}")
        out, lse = _ops_decode(q, k_cache, v_cache, block_table, lens, scale, cap)
        lse = lse[:, :, None]
    else:
        outs, lses = [], []
        for b, n in enumerate(lens.tolist()):
            if n == 0:
                outs.append(q.new_zeros((1, sq, hq, d)))
                lses.append(torch.full((1, hq, sq), -math.inf, device=q.device))
                continue
            if paged:
                pages = block_table[b, : (n + tokens - 1) // tokens].long()
                kb = k_cache[pages].reshape(-1, hk, d)[:n][None]
                vb = v_cache[pages].reshape(-1, hk, v_cache.shape[3])[:n][None]
            else:
                kb, vb = k_cache[b : b + 1, :n], v_cache[b : b + 1, :n]
            o, l = _ops_fwd(q[b : b + 1], kb, vb, mask, scale, cap, None, None, False)
            outs.append(o)
            lses.append(l)
        out, lse = torch.cat(outs, 0), torch.cat(lses, 0)
    return (out, lse) if return_softmax_lse else out
