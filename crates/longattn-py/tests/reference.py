"""Float64 reference implementations for the longattn Python package tests.

Everything here is written straight from the definitions, independently of longattn:
the mask language is re-parsed in Python and evaluated as a dense boolean matrix, attention is
computed in float64 with an explicit softmax, and the paged / varlen / kv-cache variants are
reduced to that dense computation by gathering.

All functions take tensors in the package's layout ([batch, seq, heads, dim]) and are
differentiable: call them on float64 leaves with ``requires_grad=True`` and use
``torch.autograd.grad`` to get float64 reference gradients.  Rows with no allowed key give
out = 0 and lse = -inf, and their gradients are exactly 0 (no NaN).
"""
from __future__ import annotations

import math
import re
from typing import Callable, List, Optional, Sequence, Tuple

import torch

# --------------------------------------------------------------------------------------------
# Mask language (docs/MASKS.md): full, causal, window(L,R), sinks(S), prefix(P), chunk(C),
# strided(S), power(B), radial(F,W), document, combined with ! & | and parentheses; precedence ! > & > |.
# Query row i, key j, aligned query position pos = i + Sk - Sq (bottom-right alignment).
# --------------------------------------------------------------------------------------------

_TOKEN = re.compile(r"\s*(?:(?P<ident>[A-Za-z_][A-Za-z_0-9]*)|(?P<num>\d+)|(?P<op>[()!&|,]))")

# An evaluator gets (pos [Sq,1] int64, j [1,Sk] int64, q_doc [B,Sq,1] or None,
# k_doc [B,1,Sk] or None) and returns a bool tensor broadcastable to [B, Sq, Sk].
Evaluator = Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]],
                     torch.Tensor]


class MaskSyntaxError(ValueError):
    pass


def _tokenize(text: str) -> List[Tuple[str, str, int]]:
    toks = []
    i = 0
    while i < len(text):
        if text[i].isspace():
            i += 1
            continue
        m = _TOKEN.match(text, i)
        if m is None or m.end() == i:
            raise MaskSyntaxError(f"bad character at position {i} in {text!r}")
        kind = m.lastgroup
        toks.append((kind, m.group(kind), m.start(kind)))
        i = m.end()
    toks.append(("end", "", len(text)))
    return toks


def _atom(name: str, args: Sequence[int]) -> Evaluator:
    def need(n):
        if len(args) != n:
            raise MaskSyntaxError(f"{name} takes {n} argument(s), got {len(args)}")

    if name == "full":
        need(0)
        return lambda pos, j, qd, kd: torch.ones(pos.shape[0], j.shape[1], dtype=torch.bool)
    if name == "causal":
        need(0)
        return lambda pos, j, qd, kd: j <= pos
    if name == "window":
        need(2)
        left, right = args
        return lambda pos, j, qd, kd: (j >= pos - left) & (j <= pos + right)
    if name in ("sinks", "prefix"):
        need(1)
        n = args[0]
        return lambda pos, j, qd, kd: (j < n).expand(pos.shape[0], j.shape[1])
    if name == "chunk":
        need(1)
        c = args[0]
        if c < 1:
            raise MaskSyntaxError("chunk needs C >= 1")
        return lambda pos, j, qd, kd: (torch.div(pos, c, rounding_mode="floor")
                                       == torch.div(j, c, rounding_mode="floor"))
    if name == "strided":
        need(1)
        s = args[0]
        if s < 1:
            raise MaskSyntaxError("strided needs S >= 1")
        return lambda pos, j, qd, kd: torch.remainder(pos - j, s) == 0
    if name == "power":
        need(1)
        b = args[0]
        if b < 1:
            raise MaskSyntaxError("power needs B >= 1")

        def power(pos, j, qd, kd):
            # Block distance 0 or a power of two: 0, 1, 2, 4, ... (either side).
            d = (torch.div(pos, b, rounding_mode="floor") - torch.div(j, b, rounding_mode="floor")).abs()
            ok = d == 0
            p2 = 1
            while p2 <= int(d.max()):
                ok = ok | (d == p2)
                p2 *= 2
            return ok

        return power
    if name == "radial":
        need(2)
        f, w = args
        if f < 1:
            raise MaskSyntaxError("radial needs F >= 1")

        def radial(pos, j, qd, kd):
            # Frame distance dt; window w for dt <= 1, else w // 2**floor(log2 dt).
            dt = (torch.div(pos, f, rounding_mode="floor") - torch.div(j, f, rounding_mode="floor")).abs()
            ds = (torch.remainder(pos, f) - torch.remainder(j, f)).abs()
            halvings = torch.zeros_like(dt)
            for r in range(1, 63):
                halvings = torch.where(dt >= 2 ** r, torch.full_like(dt, r), halvings)
            width = torch.div(torch.full_like(dt, w), 2 ** halvings, rounding_mode="floor")
            return ds <= width

        return radial
    if name == "document":
        need(0)

        def doc(pos, j, qd, kd):
            if qd is None or kd is None:
                raise ValueError("document mask needs q_doc and k_doc")
            return qd == kd

        return doc
    raise MaskSyntaxError(f"unknown atom {name!r} (the reference implements no neighborhoods)")


def parse_mask(text: str) -> Evaluator:
    """Parses a mask expression into an evaluator (see ``allowed_matrix``)."""
    toks = _tokenize(text)
    k = 0

    def peek():
        return toks[k]

    def take(expected=None):
        nonlocal k
        t = toks[k]
        if expected is not None and t[1] != expected:
            raise MaskSyntaxError(f"expected {expected!r} at position {t[2]} in {text!r}")
        k += 1
        return t

    def p_or():
        e = p_and()
        while peek()[1] == "|":
            take()
            a, b = e, p_and()
            e = (lambda a, b: lambda *x: a(*x) | b(*x))(a, b)
        return e

    def p_and():
        e = p_unary()
        while peek()[1] == "&":
            take()
            a, b = e, p_unary()
            e = (lambda a, b: lambda *x: a(*x) & b(*x))(a, b)
        return e

    def p_unary():
        if peek()[1] == "!":
            take()
            a = p_unary()
            return lambda *x: ~a(*x)
        return p_primary()

    def p_primary():
        t = peek()
        if t[1] == "(":
            take()
            e = p_or()
            take(")")
            return e
        if t[0] != "ident":
            raise MaskSyntaxError(f"expected an atom at position {t[2]} in {text!r}")
        take()
        args = []
        if peek()[1] == "(":
            take()
            while True:
                n = take()
                if n[0] != "num":
                    raise MaskSyntaxError(f"expected a number at position {n[2]} in {text!r}")
                args.append(int(n[1]))
                if peek()[1] == ",":
                    take()
                    continue
                take(")")
                break
        return _atom(t[1], args)

    e = p_or()
    if peek()[0] != "end":
        raise MaskSyntaxError(f"trailing input at position {peek()[2]} in {text!r}")
    return e


def allowed_matrix(mask, batch: int, sq: int, sk: int, q_doc=None, k_doc=None) -> torch.Tensor:
    """Dense bool [batch, sq, sk] of allowed (query, key) pairs, on the CPU.

    ``mask``: None (every pair), a mask-expression string, an object whose ``str()`` is one
    (e.g. ``longattn.Mask``), or a bool tensor broadcastable to [batch, sq, sk].
    """
    if mask is None:
        return torch.ones(batch, sq, sk, dtype=torch.bool)
    if isinstance(mask, torch.Tensor):
        return mask.to(device="cpu", dtype=torch.bool).expand(batch, sq, sk).clone()
    ev = parse_mask(str(mask))
    pos = (torch.arange(sq, dtype=torch.int64) + (sk - sq)).view(sq, 1)
    j = torch.arange(sk, dtype=torch.int64).view(1, sk)
    qd = kd = None
    if q_doc is not None:
        qd = q_doc.detach().to("cpu", torch.int64).view(batch, sq, 1)
    if k_doc is not None:
        kd = k_doc.detach().to("cpu", torch.int64).view(batch, 1, sk)
    return ev(pos, j, qd, kd).expand(batch, sq, sk).clone()


def flash_allowed(sq: int, sk: int, causal: bool = False, window_size=(-1, -1)) -> torch.Tensor:
    """flash_attn 2.x semantics as a bool [sq, sk]: causal sets the right window to 0; key j is
    allowed iff pos - left <= j <= pos + right (a bound of -1 is unbounded), pos = i + sk - sq."""
    left, right = window_size
    if causal:
        right = 0
    pos = (torch.arange(sq, dtype=torch.int64) + (sk - sq)).view(sq, 1)
    j = torch.arange(sk, dtype=torch.int64).view(1, sk)
    ok = torch.ones(sq, sk, dtype=torch.bool)
    if left >= 0:
        ok &= j >= pos - left
    if right >= 0:
        ok &= j <= pos + right
    return ok


# --------------------------------------------------------------------------------------------
# Dense masked attention
# --------------------------------------------------------------------------------------------

def _expand_kv_heads(x: torch.Tensor, hq: int) -> torch.Tensor:
    """[B, S, Hk, D] -> [B, S, Hq, D]: query head h reads kv head h // (Hq // Hk)."""
    hk = x.shape[2]
    assert hq % hk == 0, (hq, hk)
    return x.repeat_interleave(hq // hk, dim=2)


def ref_attention(q, k, v, mask="causal", *, scale=None, softcap=None, q_doc=None, k_doc=None,
                  allowed: Optional[torch.Tensor] = None, row_chunk: int = 1024):
    """Reference attention in float64.

    q [B,Sq,Hq,D], k [B,Sk,Hk,D], v [B,Sk,Hk,Dv]. ``allowed`` (bool [B or 1, Sq, Sk], or per
    head [B or 1, Hq, Sq, Sk]) overrides ``mask``. Returns (out [B,Sq,Hq,Dv] float64, lse [B,Hq,Sq] float64). Scaled logits
    s = scale * q.k; with softcap c, s -> c * tanh(s / c). Empty rows: out 0, lse -inf.
    Differentiable (grads of empty rows are 0). Query rows are processed in chunks of
    ``row_chunk`` to bound memory on long sequences.
    """
    B, Sq, Hq, D = q.shape
    Sk = k.shape[1]
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    dev = q.device
    q64 = q.to(torch.float64)
    k64 = _expand_kv_heads(k.to(torch.float64), Hq)
    v64 = _expand_kv_heads(v.to(torch.float64), Hq)
    if allowed is None:
        allowed = allowed_matrix(mask, B, Sq, Sk, q_doc, k_doc)
    per_head = allowed.dim() == 4
    allowed = allowed.to(dev).expand(B, Hq, Sq, Sk) if per_head else allowed.to(dev).expand(B, Sq, Sk)
    if Sq == 0:
        return (q64.new_zeros(B, 0, Hq, v.shape[-1]),
                q64.new_zeros(B, Hq, 0))
    if Sk == 0:  # no keys at all: every row is empty (keep the graph connected for autograd)
        out = (q64[..., :1] * 0).expand(B, Sq, Hq, v.shape[-1]) * 0 + v64.sum() * 0
        lse = torch.full((B, Hq, Sq), float("-inf"), dtype=torch.float64, device=dev)
        return out, lse
    # [B, H, S, D]
    qh = q64.permute(0, 2, 1, 3)
    kh = k64.permute(0, 2, 1, 3)
    vh = v64.permute(0, 2, 1, 3)
    outs, lses = [], []
    for r0 in range(0, Sq, row_chunk):
        r1 = min(Sq, r0 + row_chunk)
        s = torch.matmul(qh[:, :, r0:r1], kh.transpose(-1, -2)) * scale  # [B,H,r,Sk]
        if softcap:
            s = softcap * torch.tanh(s / softcap)
        ok = allowed[:, :, r0:r1, :] if per_head else allowed[:, None, r0:r1, :]
        s = s.masked_fill(~ok, float("-inf"))
        # Constant shift for stability (softmax and lse are invariant to it): no gradient.
        m = s.detach().amax(dim=-1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        p = torch.exp(s - m)  # exactly 0 where masked
        denom = p.sum(dim=-1, keepdim=True)
        # a row is empty by the mask alone (a NaN logit must propagate, not look empty)
        nonempty = ok.any(dim=-1, keepdim=True).expand_as(denom)
        safe = torch.where(nonempty, denom, torch.ones_like(denom))
        out = torch.matmul(p, vh) / safe
        out = torch.where(nonempty, out, torch.zeros_like(out))
        lse = torch.where(nonempty, torch.log(safe) + m,
                          torch.full_like(denom, float("-inf"))).squeeze(-1)
        outs.append(out)
        lses.append(lse)
    out = torch.cat(outs, dim=2).permute(0, 2, 1, 3)  # [B,Sq,H,Dv]
    lse = torch.cat(lses, dim=2)  # [B,H,Sq]
    return out, lse


def ref_flash(q, k, v, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0):
    """flash_attn_func semantics in float64: (out [B,Sq,H,Dv], lse [B,H,Sq])."""
    Sq, Sk = q.shape[1], k.shape[1]
    allowed = flash_allowed(Sq, Sk, causal, window_size)[None]
    return ref_attention(q, k, v, scale=softmax_scale, softcap=softcap or None, allowed=allowed)


# --------------------------------------------------------------------------------------------
# Varlen
# --------------------------------------------------------------------------------------------

def gather_pages(cache: torch.Tensor, block_table_row: torch.Tensor, length: int) -> torch.Tensor:
    """Logical tokens [0, length) of one sequence from a paged cache.

    cache [num_blocks, page_size, H, D]; token t lives in block block_table_row[t // page_size]
    at offset t % page_size. Returns [length, H, D] (differentiable w.r.t. ``cache``).
    """
    page = cache.shape[1]
    t = torch.arange(length, device=cache.device)
    blocks = block_table_row.to(cache.device, torch.int64)[t // page]
    return cache[blocks, t % page]


def ref_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale=None, causal=False,
               window_size=(-1, -1), softcap=0.0, block_table=None):
    """flash_attn_varlen_func semantics in float64.

    q [total_q, Hq, D]; k, v [total_k, Hk, D] (or paged [num_blocks, page, Hk, D] with
    block_table [batch, max_blocks]). Each sequence attends within itself, causal / window
    bottom-right aligned per sequence. Returns (out [total_q, Hq, Dv], lse [Hq, total_q]).
    """
    cq = [int(x) for x in cu_seqlens_q.tolist()]
    ck = [int(x) for x in cu_seqlens_k.tolist()]
    outs, lses = [], []
    for b in range(len(cq) - 1):
        qb = q[cq[b]:cq[b + 1]]
        lk = ck[b + 1] - ck[b]
        if block_table is None:
            kb, vb = k[ck[b]:ck[b + 1]], v[ck[b]:ck[b + 1]]
        else:
            kb = gather_pages(k, block_table[b], lk)
            vb = gather_pages(v, block_table[b], lk)
        o, l = ref_flash(qb[None], kb[None], vb[None], softmax_scale, causal, window_size, softcap)
        outs.append(o[0])
        lses.append(l[0])
    return torch.cat(outs, 0), torch.cat(lses, 1)


# --------------------------------------------------------------------------------------------
# KV cache
# --------------------------------------------------------------------------------------------

def ref_kvcache(q, k_cache, v_cache, k=None, v=None, cache_seqlens=None, block_table=None,
                softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0):
    """flash_attn_with_kvcache semantics in float64.

    Returns (out [B,Sq,Hq,Dv] f64, lse [B,Hq,Sq] f64, k_cache_after, v_cache_after) where the
    caches "after" are clones of the inputs (same dtype) with the new k / v written at logical
    positions cache_seqlens[b] .. cache_seqlens[b] + Snew - 1 (through block_table when paged).
    Sequence b attends to its first cache_seqlens[b] (+ Snew) keys; causal / window are
    bottom-right aligned against that length. cache_seqlens None means the whole cache.
    """
    B = q.shape[0]
    paged = block_table is not None
    cap = block_table.shape[1] * k_cache.shape[1] if paged else k_cache.shape[1]
    if cache_seqlens is None:
        lens = [cap] * B
    elif isinstance(cache_seqlens, int):
        lens = [cache_seqlens] * B
    else:
        lens = [int(x) for x in cache_seqlens.tolist()]
    kc = k_cache.detach().clone()
    vc = v_cache.detach().clone()
    snew = 0 if k is None else k.shape[1]
    if k is not None:
        for b in range(B):
            for t in range(snew):
                pos = lens[b] + t
                if paged:
                    page = kc.shape[1]
                    blk = int(block_table[b, pos // page])
                    kc[blk, pos % page] = k[b, t].to(kc.dtype)
                    vc[blk, pos % page] = v[b, t].to(vc.dtype)
                else:
                    kc[b, pos] = k[b, t].to(kc.dtype)
                    vc[b, pos] = v[b, t].to(vc.dtype)
    outs, lses = [], []
    for b in range(B):
        lk = lens[b] + snew
        if paged:
            kb = gather_pages(kc, block_table[b], lk)
            vb = gather_pages(vc, block_table[b], lk)
        else:
            kb, vb = kc[b, :lk], vc[b, :lk]
        o, l = ref_flash(q[b:b + 1], kb[None], vb[None], softmax_scale, causal, window_size,
                         softcap)
        outs.append(o)
        lses.append(l)
    return torch.cat(outs, 0), torch.cat(lses, 0), kc, vc
