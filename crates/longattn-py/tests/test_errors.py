"""Bad input is refused with an exception that names the offending argument.

The API promises ValueError / TypeError / RuntimeError naming the argument; each test accepts
that family and checks the message for the argument's name as a whole word (so a bare "q" in a
message about "k" does not count).
"""
import re

import pytest
import torch

import longattn
from longattn import (flash_attn_func, flash_attn_kvpacked_func, flash_attn_qkvpacked_func,
                      flash_attn_varlen_func, flash_attn_with_kvcache)
from conftest import require_cuda, randn

ERRORS = (ValueError, TypeError, RuntimeError)
BF16 = torch.bfloat16


def raises_naming(*names, exc=ERRORS):
    """pytest.raises whose message must mention one of ``names`` as a word."""
    pat = "|".join(rf"(?<![A-Za-z0-9_]){re.escape(n)}(?![A-Za-z0-9_])" for n in names)
    return pytest.raises(exc, match=pat)


def qkv(B=2, Sq=16, Sk=16, Hq=4, Hk=2, D=32, dtype=BF16):
    return (randn(B, Sq, Hq, D, dtype=dtype), randn(B, Sk, Hk, D, dtype=dtype),
            randn(B, Sk, Hk, D, dtype=dtype))


# --------------------------------------------------------------------------------------------
# attention()
# --------------------------------------------------------------------------------------------

def test_dtype_mismatch():
    q, k, v = qkv()
    with raises_naming("k", "dtype"):
        longattn.attention(q, k.float(), v, "causal")
    with raises_naming("v", "dtype"):
        longattn.attention(q, k, v.half(), "causal")
    with raises_naming("k", "dtype"):
        flash_attn_func(q, k.half(), v)


def test_unsupported_dtype():
    q, k, v = qkv(dtype=torch.float64)
    with raises_naming("q", "dtype", "float64"):
        longattn.attention(q, k, v)
    qi = torch.randint(0, 5, (1, 4, 2, 8), dtype=torch.int32)
    with raises_naming("q", "dtype", "int32"):
        longattn.attention(qi, qi, qi)


def test_wrong_rank():
    q, k, v = qkv()
    with raises_naming("q"):
        longattn.attention(q[0], k, v)
    with raises_naming("k"):
        longattn.attention(q, k.unsqueeze(0), v)
    with raises_naming("v"):
        flash_attn_func(q, k, v[..., 0])
    with raises_naming("qkv"):
        flash_attn_qkvpacked_func(randn(2, 16, 4, 32, dtype=BF16))
    with raises_naming("kv"):
        flash_attn_kvpacked_func(q, randn(2, 16, 3, 2, 32, dtype=BF16))  # 3 != 2 in the pack


def test_mismatched_batch_heads_dims():
    q, k, v = qkv()
    with raises_naming("k", "batch"):
        longattn.attention(q, k[:1], v[:1])
    with raises_naming("heads", "k", "Hk", "Hq", "num_heads"):
        longattn.attention(randn(2, 16, 6, 32, dtype=BF16), randn(2, 16, 4, 32, dtype=BF16),
                           randn(2, 16, 4, 32, dtype=BF16))  # 6 query heads, 4 kv heads
    with raises_naming("v", "heads"):
        longattn.attention(q, k, randn(2, 16, 1, 32, dtype=BF16))
    with raises_naming("v", "seq", "Sk"):
        longattn.attention(q, k, v[:, :15])
    with raises_naming("k", "head_dim", "dim", "D"):
        longattn.attention(q, randn(2, 16, 2, 16, dtype=BF16), v)


def test_mask_string_errors_name_position():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"(?i)position\D*9\b") as e:
        longattn.attention(q, k, v, "causal & foo(3)")
    assert "foo" in str(e.value)
    with pytest.raises(ValueError, match=r"(?i)position"):
        longattn.attention(q, k, v, "causal & (window(4,0)")     # unbalanced
    with pytest.raises(ValueError, match=r"(?i)position"):
        longattn.attention(q, k, v, "window(4)")                 # wrong arity
    with pytest.raises(ValueError, match=r"(?i)position"):
        longattn.Mask("causal &")
    with pytest.raises(ValueError, match=r"(?i)position"):
        longattn.Mask("chunk(0)")
    with pytest.raises(ValueError):
        longattn.Mask("")


def test_mask_wrong_type():
    q, k, v = qkv()
    with raises_naming("mask", exc=(TypeError, ValueError)):
        longattn.attention(q, k, v, 3)
    with raises_naming("mask", exc=(TypeError, ValueError)):
        longattn.attention(q, k, v, torch.ones(16, 16, dtype=torch.bool))


def test_document_mask_needs_doc_ids():
    q, k, v = qkv()
    with raises_naming("q_doc", "k_doc", "document"):
        longattn.attention(q, k, v, "causal & document")
    qd = torch.zeros(2, 16, dtype=torch.int32)
    with raises_naming("q_doc", "k_doc"):
        longattn.attention(q, k, v, "document", q_doc=qd, k_doc=torch.zeros(2, 15,
                                                                            dtype=torch.int32))
    with raises_naming("q_doc"):
        longattn.attention(q, k, v, "document", q_doc=torch.zeros(1, 16, dtype=torch.int32),
                           k_doc=qd)


def test_device_mismatch():
    require_cuda()
    q, k, v = qkv()
    with raises_naming("k", "device", "cuda"):
        longattn.attention(q, k.cuda(), v)
    with raises_naming("v", "device", "cuda"):
        flash_attn_func(q.cuda(), k.cuda(), v)


# --------------------------------------------------------------------------------------------
# flash_attn drop-ins: unsupported features
# --------------------------------------------------------------------------------------------

def test_dropout_refused():
    q, k, v = qkv()
    with raises_naming("dropout_p", exc=ValueError):
        flash_attn_func(q, k, v, dropout_p=0.1)
    with raises_naming("dropout_p", exc=ValueError):
        flash_attn_qkvpacked_func(torch.stack([q, q, q], 2), dropout_p=0.5)
    with raises_naming("dropout_p", exc=ValueError):
        flash_attn_kvpacked_func(q, torch.stack([k, v], 2), dropout_p=0.5)
    cu = torch.tensor([0, 16], dtype=torch.int32)
    with raises_naming("dropout_p", exc=ValueError):
        flash_attn_varlen_func(q[0], k[0], v[0], cu, cu, 16, 16, dropout_p=0.1)


def test_alibi_refused():
    q, k, v = qkv()
    slopes = torch.rand(4, dtype=torch.float32)
    with raises_naming("alibi_slopes", exc=ValueError):
        flash_attn_func(q, k, v, alibi_slopes=slopes)
    cu = torch.tensor([0, 16], dtype=torch.int32)
    with raises_naming("alibi_slopes", exc=ValueError):
        flash_attn_varlen_func(q[0], k[0], v[0], cu, cu, 16, 16, alibi_slopes=slopes)
    kc, vc = randn(2, 32, 2, 32, dtype=BF16), randn(2, 32, 2, 32, dtype=BF16)
    with raises_naming("alibi_slopes", exc=ValueError):
        flash_attn_with_kvcache(q[:, :1], kc, vc, cache_seqlens=8, alibi_slopes=slopes)


@pytest.mark.parametrize("arg", ["rotary", "cache_batch_idx", "cache_leftpad"])
def test_kvcache_unsupported_args(arg):
    B, Sc, H, D = 2, 32, 2, 32
    q = randn(B, 1, H, D, dtype=BF16)
    kc, vc = randn(B, Sc, H, D, dtype=BF16), randn(B, Sc, H, D, dtype=BF16)
    kw = {}
    if arg == "rotary":
        kw = dict(k=randn(B, 1, H, D, dtype=BF16), v=randn(B, 1, H, D, dtype=BF16),
                  rotary_cos=torch.rand(Sc, D // 2).to(BF16),
                  rotary_sin=torch.rand(Sc, D // 2).to(BF16))
        names = ("rotary_cos", "rotary_sin")
    elif arg == "cache_batch_idx":
        kw = dict(cache_batch_idx=torch.tensor([1, 0], dtype=torch.int32))
        names = ("cache_batch_idx",)
    else:
        kw = dict(cache_leftpad=torch.tensor([0, 3], dtype=torch.int32))
        names = ("cache_leftpad",)
    with raises_naming(*names, exc=ValueError):
        flash_attn_with_kvcache(q, kc, vc, cache_seqlens=torch.tensor([8, 9], dtype=torch.int32),
                                **kw)


# --------------------------------------------------------------------------------------------
# varlen / kv-cache argument checks
# --------------------------------------------------------------------------------------------

def _varlen_inputs():
    q = randn(16, 4, 32, dtype=BF16)
    k = randn(16, 2, 32, dtype=BF16)
    v = randn(16, 2, 32, dtype=BF16)
    cu = torch.tensor([0, 3, 10, 16], dtype=torch.int32)
    return q, k, v, cu


def test_cu_seqlens_not_int32():
    q, k, v, cu = _varlen_inputs()
    with raises_naming("cu_seqlens_q"):
        flash_attn_varlen_func(q, k, v, cu.long(), cu, 7, 7, causal=True)
    with raises_naming("cu_seqlens_k"):
        flash_attn_varlen_func(q, k, v, cu, cu.float(), 7, 7, causal=True)


def test_cu_seqlens_not_monotonic_or_inconsistent():
    q, k, v, cu = _varlen_inputs()
    bad = torch.tensor([0, 10, 3, 16], dtype=torch.int32)
    with raises_naming("cu_seqlens_q"):
        flash_attn_varlen_func(q, k, v, bad, cu, 7, 7)
    with raises_naming("cu_seqlens_k"):
        flash_attn_varlen_func(q, k, v, cu, bad, 7, 7)
    past = torch.tensor([0, 3, 10, 20], dtype=torch.int32)  # ends past total_k = 16
    with raises_naming("cu_seqlens_k", "k"):
        flash_attn_varlen_func(q, k, v, cu, past, 7, 7)
    with raises_naming("cu_seqlens_k", "cu_seqlens_q", "batch"):  # batch 3 vs batch 2
        flash_attn_varlen_func(q, k, v, cu, torch.tensor([0, 8, 16], dtype=torch.int32), 7, 8)
    with raises_naming("q"):
        flash_attn_varlen_func(q[None], k, v, cu, cu, 7, 7)  # varlen q is 3-D


def test_block_table_past_cache():
    B, page, H, D = 2, 16, 2, 32
    num_blocks = 4
    kc, vc = randn(num_blocks, page, H, D, dtype=BF16), randn(num_blocks, page, H, D, dtype=BF16)
    q = randn(B, 1, H, D, dtype=BF16)
    seqlens = torch.tensor([20, 30], dtype=torch.int32)
    bt = torch.tensor([[0, 1], [2, 4]], dtype=torch.int32)  # block 4 does not exist
    with raises_naming("block_table", exc=ERRORS + (IndexError,)):
        flash_attn_with_kvcache(q, kc, vc, cache_seqlens=seqlens, block_table=bt)
    bt = torch.tensor([[0, 1], [2, -1]], dtype=torch.int32)  # negative block id
    with raises_naming("block_table", exc=ERRORS + (IndexError,)):
        flash_attn_with_kvcache(q, kc, vc, cache_seqlens=seqlens, block_table=bt)
    # in range, but the table is too short for cache_seqlens + the appended tokens
    bt = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    with raises_naming("block_table", "cache_seqlens", exc=ERRORS + (IndexError,)):
        flash_attn_with_kvcache(q, kc, vc, k=randn(B, 3, H, D, dtype=BF16),
                                v=randn(B, 3, H, D, dtype=BF16),
                                cache_seqlens=torch.tensor([20, 31], dtype=torch.int32),
                                block_table=bt)


def test_cache_seqlens_past_contiguous_cache():
    B, Sc, H, D = 2, 32, 2, 32
    kc, vc = randn(B, Sc, H, D, dtype=BF16), randn(B, Sc, H, D, dtype=BF16)
    q = randn(B, 1, H, D, dtype=BF16)
    with raises_naming("cache_seqlens", "k_cache", exc=ERRORS + (IndexError,)):
        flash_attn_with_kvcache(q, kc, vc, cache_seqlens=torch.tensor([8, 33],
                                                                      dtype=torch.int32))
    with raises_naming("cache_seqlens", "k_cache", "k", exc=ERRORS + (IndexError,)):
        flash_attn_with_kvcache(q, kc, vc, k=randn(B, 2, H, D, dtype=BF16),
                                v=randn(B, 2, H, D, dtype=BF16),
                                cache_seqlens=torch.tensor([8, 31], dtype=torch.int32))


def test_kvcache_shape_errors():
    B, Sc, H, D = 2, 32, 2, 32
    kc, vc = randn(B, Sc, H, D, dtype=BF16), randn(B, Sc, H, D, dtype=BF16)
    q = randn(B, 1, H, D, dtype=BF16)
    with raises_naming("k_cache"):
        flash_attn_with_kvcache(q, kc[0], vc, cache_seqlens=4)
    with raises_naming("v_cache", "dtype"):
        flash_attn_with_kvcache(q, kc, vc.float(), cache_seqlens=4)
    with raises_naming("v"):  # k given without v
        flash_attn_with_kvcache(q, kc, vc, k=randn(B, 1, H, D, dtype=BF16), cache_seqlens=4)


def test_no_partial_cache_write_on_error():
    """A call refused for bad arguments leaves the cache as it was."""
    B, Sc, H, D = 2, 32, 2, 32
    kc, vc = randn(B, Sc, H, D, dtype=BF16), randn(B, Sc, H, D, dtype=BF16)
    k0 = kc.clone()
    with pytest.raises(ValueError):
        flash_attn_with_kvcache(randn(B, 1, H, D, dtype=BF16), kc, vc,
                                k=randn(B, 1, H, D, dtype=BF16), v=randn(B, 1, H, D, dtype=BF16),
                                cache_seqlens=torch.tensor([1, 2], dtype=torch.int32),
                                cache_leftpad=torch.tensor([0, 1], dtype=torch.int32))
    assert torch.equal(kc, k0)
