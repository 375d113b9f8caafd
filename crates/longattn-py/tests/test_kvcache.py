"""flash_attn_with_kvcache: contiguous and paged caches, ragged lengths, in-place appends."""
import pytest
import torch

from longattn import flash_attn_with_kvcache
from conftest import assert_close, randn, skip_unsupported
from reference import ref_kvcache

F32, BF16 = torch.float32, torch.bfloat16


def _dtype(device):
    return F32 if device == "cpu" else BF16


def _paged_cache(device, dtype, lens_total, page, Hk, D, extra_blocks=3, fill=None):
    """Pages for len(lens_total) sequences, block table a random permutation of the blocks
    (so logical order != physical order), plus ``extra_blocks`` never referenced."""
    B = len(lens_total)
    max_blocks = max((l + page - 1) // page for l in lens_total)
    num_blocks = B * max_blocks + extra_blocks
    kc = randn(num_blocks, page, Hk, D, dtype=dtype, device=device)
    vc = randn(num_blocks, page, Hk, D, dtype=dtype, device=device)
    perm = torch.randperm(num_blocks)
    bt = perm[: B * max_blocks].view(B, max_blocks).to(torch.int32).to(device)
    if fill is not None:  # slots past each sequence's end and unreferenced blocks
        used = torch.zeros(num_blocks, page, dtype=torch.bool)
        for b, l in enumerate(lens_total):
            for t in range(l):
                used[int(bt[b, t // page]), t % page] = True
        kc[~used.to(device)] = fill
        vc[~used.to(device)] = fill
    return kc, vc, bt


def _check(out_lse, ref, dtype):
    out, lse = out_lse
    ro, rl = ref[0], ref[1]
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert_close(out, ro, dtype, "out")
    assert_close(lse, rl, dtype, "softmax_lse")


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("hq,hk", [(8, 2), (4, 1), (2, 2)])
def test_decode_contiguous_ragged(device, causal, hq, hk):
    dtype = _dtype(device)
    B, Sc, D = 3, 128, 32
    kc = randn(B, Sc, hk, D, dtype=dtype, device=device)
    vc = randn(B, Sc, hk, D, dtype=dtype, device=device)
    seqlens = torch.tensor([1, 65, 113], dtype=torch.int32, device=device)
    q = randn(B, 1, hq, D, dtype=dtype, device=device)
    k0, v0 = kc.clone(), vc.clone()
    res = flash_attn_with_kvcache(q, kc, vc, cache_seqlens=seqlens, causal=causal,
                                  return_softmax_lse=True)
    assert isinstance(res, tuple) and len(res) == 2
    assert res[0].shape == (B, 1, hq, D) and res[1].shape == (B, hq, 1)
    _check(res, ref_kvcache(q.cpu(), kc.cpu(), vc.cpu(), cache_seqlens=seqlens.cpu(),
                            causal=causal), dtype)
    assert torch.equal(kc, k0) and torch.equal(vc, v0)  # no k/v given: cache untouched
    # without return_softmax_lse: the output alone
    out = flash_attn_with_kvcache(q, kc, vc, cache_seqlens=seqlens, causal=causal)
    assert isinstance(out, torch.Tensor)
    assert_close(out, res[0].double(), dtype, "out without lse")


def test_cache_seqlens_int_and_none(device):
    dtype = _dtype(device)
    B, Sc, H, D = 2, 63, 2, 32
    kc = randn(B, Sc, H, D, dtype=dtype, device=device)
    vc = randn(B, Sc, H, D, dtype=dtype, device=device)
    q = randn(B, 7, H, D, dtype=dtype, device=device)
    res = flash_attn_with_kvcache(q, kc, vc, cache_seqlens=40, causal=True,
                                  return_softmax_lse=True)
    _check(res, ref_kvcache(q.cpu(), kc.cpu(), vc.cpu(), cache_seqlens=40, causal=True), dtype)
    res = flash_attn_with_kvcache(q, kc, vc, causal=True, return_softmax_lse=True)
    _check(res, ref_kvcache(q.cpu(), kc.cpu(), vc.cpu(), causal=True), dtype)


@pytest.mark.parametrize("snew", [1, 7])
@pytest.mark.parametrize("causal", [True, False])
def test_append_contiguous(device, snew, causal):
    """New k / v land in the cache at cache_seqlens (in place) and are attended to; causal is
    aligned bottom-right against cache_seqlens + Snew."""
    dtype = _dtype(device)
    B, Sc, Hq, Hk, D = 3, 128, 4, 2, 32
    kc = randn(B, Sc, Hk, D, dtype=dtype, device=device)
    vc = randn(B, Sc, Hk, D, dtype=dtype, device=device)
    seqlens = torch.tensor([0, 40, 113], dtype=torch.int32, device=device)
    seq0 = seqlens.clone()
    q = randn(B, snew, Hq, D, dtype=dtype, device=device)
    kn = randn(B, snew, Hk, D, dtype=dtype, device=device)
    vn = randn(B, snew, Hk, D, dtype=dtype, device=device)
    ref = ref_kvcache(q.cpu(), kc.cpu(), vc.cpu(), kn.cpu(), vn.cpu(), seqlens.cpu(),
                      causal=causal)
    kc_ptr = kc.data_ptr()
    res = flash_attn_with_kvcache(q, kc, vc, k=kn, v=vn, cache_seqlens=seqlens, causal=causal,
                                  return_softmax_lse=True)
    _check(res, ref, dtype)
    assert kc.data_ptr() == kc_ptr
    assert torch.equal(kc.cpu(), ref[2]), "k_cache after the append"
    assert torch.equal(vc.cpu(), ref[3]), "v_cache after the append"
    assert torch.equal(seqlens, seq0), "cache_seqlens must not be modified"


def test_append_then_decode_equals_full_attention(device):
    """Filling a cache by appends (prefill chunk, then two decode steps) gives the same outputs
    as attending over the concatenated keys."""
    dtype = _dtype(device)
    B, Sc, H, D = 2, 80, 2, 32
    kc = torch.zeros(B, Sc, H, D, dtype=dtype, device=device)
    vc = torch.zeros(B, Sc, H, D, dtype=dtype, device=device)
    ks = randn(B, 67, H, D, dtype=dtype, device=device)
    vs = randn(B, 67, H, D, dtype=dtype, device=device)
    qs = randn(B, 67, H, D, dtype=dtype, device=device)
    outs = []
    pos = 0
    for n in (65, 1, 1):
        seq = torch.full((B,), pos, dtype=torch.int32, device=device)
        outs.append(flash_attn_with_kvcache(qs[:, pos:pos + n], kc, vc, k=ks[:, pos:pos + n],
                                            v=vs[:, pos:pos + n], cache_seqlens=seq,
                                            causal=True))
        pos += n
    out = torch.cat(outs, 1)
    from reference import ref_flash
    ro, _ = ref_flash(qs.cpu(), ks.cpu(), vs.cpu(), causal=True)
    assert_close(out, ro, dtype)
    assert torch.equal(kc[:, :67], ks) and torch.equal(vc[:, :67], vs)
    assert (kc[:, 67:] == 0).all()


@pytest.mark.parametrize("page", [16, 64, 256])
@pytest.mark.parametrize("snew", [0, 1, 3])
def test_paged(device, page, snew):
    dtype = _dtype(device)
    Hq, Hk, D = 4, 2, 32
    lens = [1, 100, 300]
    total = [l + snew for l in lens]
    kc, vc, bt = _paged_cache(device, dtype, total, page, Hk, D)
    seqlens = torch.tensor(lens, dtype=torch.int32, device=device)
    B = len(lens)
    sq = max(snew, 1)
    q = randn(B, sq, Hq, D, dtype=dtype, device=device)
    kn = vn = None
    if snew:
        kn = randn(B, snew, Hk, D, dtype=dtype, device=device)
        vn = randn(B, snew, Hk, D, dtype=dtype, device=device)
    ref = ref_kvcache(q.cpu(), kc.cpu(), vc.cpu(), None if kn is None else kn.cpu(),
                      None if vn is None else vn.cpu(), seqlens.cpu(), block_table=bt.cpu(),
                      causal=True)
    res = flash_attn_with_kvcache(q, kc, vc, k=kn, v=vn, cache_seqlens=seqlens, block_table=bt,
                                  causal=True, return_softmax_lse=True)
    _check(res, ref, dtype)
    assert torch.equal(kc.cpu(), ref[2]) and torch.equal(vc.cpu(), ref[3]), "pages after append"


@pytest.mark.parametrize("page", [16, 64])
def test_paged_matches_contiguous(device, page):
    """The same keys stored contiguously and in shuffled pages give the same answer."""
    dtype = _dtype(device)
    B, Hq, Hk, D = 2, 8, 1, 32
    lens = [63, 129]
    Sc = 160
    kc = randn(B, Sc, Hk, D, dtype=dtype, device=device)
    vc = randn(B, Sc, Hk, D, dtype=dtype, device=device)
    kp, vp, bt = _paged_cache(device, dtype, lens, page, Hk, D)
    for b, l in enumerate(lens):
        for t in range(l):
            kp[int(bt[b, t // page]), t % page] = kc[b, t]
            vp[int(bt[b, t // page]), t % page] = vc[b, t]
    seqlens = torch.tensor(lens, dtype=torch.int32, device=device)
    q = randn(B, 1, Hq, D, dtype=dtype, device=device)
    a = flash_attn_with_kvcache(q, kc, vc, cache_seqlens=seqlens)
    b = flash_attn_with_kvcache(q, kp, vp, cache_seqlens=seqlens, block_table=bt)
    assert_close(b, a.double(), dtype, "paged vs contiguous")
    ref = ref_kvcache(q.cpu(), kc.cpu(), vc.cpu(), cache_seqlens=seqlens.cpu())
    assert_close(a, ref[0], dtype)


def test_window_and_softcap_with_cache(device):
    dtype = _dtype(device)
    B, Sc, Hq, Hk, D = 2, 128, 4, 2, 32
    kc = randn(B, Sc, Hk, D, dtype=dtype, device=device)
    vc = randn(B, Sc, Hk, D, dtype=dtype, device=device)
    seqlens = torch.tensor([70, 100], dtype=torch.int32, device=device)
    q = randn(B, 5, Hq, D, dtype=dtype, device=device, scale=3.0)
    kn = randn(B, 5, Hk, D, dtype=dtype, device=device)
    vn = randn(B, 5, Hk, D, dtype=dtype, device=device)
    ref = ref_kvcache(q.cpu(), kc.cpu(), vc.cpu(), kn.cpu(), vn.cpu(), seqlens.cpu(),
                      causal=True, window_size=(32, 0), softcap=4.0, softmax_scale=0.25)
    res = flash_attn_with_kvcache(q, kc, vc, k=kn, v=vn, cache_seqlens=seqlens, causal=True,
                                  window_size=(32, 0), softcap=4.0, softmax_scale=0.25,
                                  return_softmax_lse=True)
    _check(res, ref, dtype)


def test_uninitialized_slots_are_not_read(device):
    """Policy asserted: cache slots at or past cache_seqlens (+ Snew) and pages the block table
    does not reference may hold anything - here NaN, as in a torch.empty cache - and must not
    affect the result (no NaN leaks in through 0 * NaN in P @ V)."""
    dtype = _dtype(device)
    B, Sc, H, D = 2, 96, 2, 32
    kc = randn(B, Sc, H, D, dtype=dtype, device=device)
    vc = randn(B, Sc, H, D, dtype=dtype, device=device)
    seqlens = torch.tensor([5, 70], dtype=torch.int32, device=device)
    for b, l in enumerate(seqlens.tolist()):
        kc[b, l:] = float("nan")
        vc[b, l:] = float("nan")
    q = randn(B, 1, H, D, dtype=dtype, device=device)
    out = flash_attn_with_kvcache(q, kc, vc, cache_seqlens=seqlens)
    assert_close(out, ref_kvcache(q.cpu(), kc.cpu(), vc.cpu(), cache_seqlens=seqlens.cpu())[0],
                 dtype, "contiguous cache with NaN tail")
    lens = [5, 70]
    kp, vp, bt = _paged_cache(device, dtype, lens, 16, H, D, fill=float("nan"))
    out = flash_attn_with_kvcache(q, kp, vp, cache_seqlens=seqlens, block_table=bt)
    ref = ref_kvcache(q.cpu(), kp.cpu(), vp.cpu(), cache_seqlens=seqlens.cpu(),
                      block_table=bt.cpu())
    assert_close(out, ref[0], dtype, "paged cache with NaN in unused slots")


@pytest.mark.parametrize("num_splits", [0, 1, 3])
def test_num_splits_same_result(device, num_splits):
    dtype = _dtype(device)
    B, Hq, Hk, D = 2, 4, 2, 32
    lens = [113, 1023]
    kc, vc, bt = _paged_cache(device, dtype, lens, 64, Hk, D)
    seqlens = torch.tensor(lens, dtype=torch.int32, device=device)
    q = randn(B, 1, Hq, D, dtype=dtype, device=device)
    res = flash_attn_with_kvcache(q, kc, vc, cache_seqlens=seqlens, block_table=bt,
                                  num_splits=num_splits, return_softmax_lse=True)
    _check(res, ref_kvcache(q.cpu(), kc.cpu(), vc.cpu(), cache_seqlens=seqlens.cpu(),
                            block_table=bt.cpu()), dtype)


def test_multi_query_rows_without_append(device):
    """Sq > 1 against a cache (speculative decoding style), causal bottom-right."""
    dtype = _dtype(device)
    B, Sc, Hq, Hk, D = 2, 64, 4, 4, 32
    kc = randn(B, Sc, Hk, D, dtype=dtype, device=device)
    vc = randn(B, Sc, Hk, D, dtype=dtype, device=device)
    seqlens = torch.tensor([7, 63], dtype=torch.int32, device=device)
    q = randn(B, 4, Hq, D, dtype=dtype, device=device)
    res = flash_attn_with_kvcache(q, kc, vc, cache_seqlens=seqlens, causal=True,
                                  return_softmax_lse=True)
    _check(res, ref_kvcache(q.cpu(), kc.cpu(), vc.cpu(), cache_seqlens=seqlens.cpu(),
                            causal=True), dtype)


def test_noncontiguous_q_and_new_kv(device):
    dtype = _dtype(device)
    B, Sc, H, D = 2, 64, 2, 32
    kc = randn(B, Sc, H, D, dtype=dtype, device=device)
    vc = randn(B, Sc, H, D, dtype=dtype, device=device)
    qkv = randn(B, 3, 3, H, D, dtype=dtype, device=device)  # packed projections
    q, kn, vn = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    seqlens = torch.tensor([10, 50], dtype=torch.int32, device=device)
    ref = ref_kvcache(q.cpu(), kc.cpu(), vc.cpu(), kn.cpu(), vn.cpu(), seqlens.cpu(),
                      causal=True)
    res = flash_attn_with_kvcache(q, kc, vc, k=kn, v=vn, cache_seqlens=seqlens, causal=True,
                                  return_softmax_lse=True)
    _check(res, ref, dtype)
    assert torch.equal(kc.cpu(), ref[2]) and torch.equal(vc.cpu(), ref[3])


def test_bf16_paged_decode_long(device):
    skip_unsupported(device, BF16)
    B, Hq, Hk, D = 2, 8, 2, 64
    lens = [4224, 1]
    kc, vc, bt = _paged_cache(device, BF16, lens, 256, Hk, D, extra_blocks=1)
    seqlens = torch.tensor(lens, dtype=torch.int32, device=device)
    q = randn(B, 1, Hq, D, dtype=BF16, device=device)
    res = flash_attn_with_kvcache(q, kc, vc, cache_seqlens=seqlens, block_table=bt,
                                  return_softmax_lse=True)
    _check(res, ref_kvcache(q.cpu(), kc.cpu(), vc.cpu(), cache_seqlens=seqlens.cpu(),
                            block_table=bt.cpu()), BF16)


@pytest.mark.parametrize("paged", [False, True])
def test_decode_softcap_and_scale(device, paged):
    """One query per sequence, no window (the decode kernel's path) with softcap and scale."""
    dtype = _dtype(device)
    Hq, Hk, D = 8, 2, 64
    lens = [7, 200]
    seqlens = torch.tensor(lens, dtype=torch.int32, device=device)
    q = randn(2, 1, Hq, D, dtype=dtype, device=device, scale=3.0)
    if paged:
        kc, vc, bt = _paged_cache(device, dtype, lens, 64, Hk, D)
    else:
        kc = randn(2, 256, Hk, D, dtype=dtype, device=device)
        vc = randn(2, 256, Hk, D, dtype=dtype, device=device)
        bt = None
    res = flash_attn_with_kvcache(q, kc, vc, cache_seqlens=seqlens, block_table=bt,
                                  softmax_scale=0.2, softcap=3.0, causal=True,
                                  return_softmax_lse=True)
    _check(res, ref_kvcache(q.cpu(), kc.cpu(), vc.cpu(), cache_seqlens=seqlens.cpu(),
                            block_table=None if bt is None else bt.cpu(), softmax_scale=0.2,
                            softcap=3.0, causal=True), dtype)


@pytest.mark.parametrize("sq", [1, 3])
def test_empty_cache_row(device, sq):
    """cache_seqlens = 0 and nothing appended: that sequence has no key, so its output is 0 and
    its lse infinite (-inf by longattn's convention; flash_attn writes +inf, either accepted).
    The other sequence is unaffected."""
    dtype = _dtype(device)
    B, Sc, H, D = 2, 32, 2, 32
    kc = randn(B, Sc, H, D, dtype=dtype, device=device)
    vc = randn(B, Sc, H, D, dtype=dtype, device=device)
    seqlens = torch.tensor([0, 9], dtype=torch.int32, device=device)
    q = randn(B, sq, H, D, dtype=dtype, device=device)
    out, lse = flash_attn_with_kvcache(q, kc, vc, cache_seqlens=seqlens, causal=True,
                                       return_softmax_lse=True)
    assert (out[0] == 0).all() and torch.isinf(lse[0]).all()
    ref = ref_kvcache(q[1:].cpu(), kc[1:].cpu(), vc[1:].cpu(), cache_seqlens=seqlens[1:].cpu(),
                      causal=True)
    _check((out[1:], lse[1:]), ref, dtype)


def test_paged_append_in_place_only_touches_target_slots(device):
    """An append writes exactly the Snew target slots of each sequence's pages: every other
    element of the page pool (other sequences' pages, unreferenced pages) is bit-identical."""
    dtype = _dtype(device)
    page, Hk, D = 16, 2, 32
    lens = [15, 33]  # sequence 0's append crosses a page boundary
    kc, vc, bt = _paged_cache(device, dtype, [l + 2 for l in lens], page, Hk, D)
    k0, v0 = kc.clone(), vc.clone()
    seqlens = torch.tensor(lens, dtype=torch.int32, device=device)
    kn = randn(2, 2, Hk, D, dtype=dtype, device=device)
    vn = randn(2, 2, Hk, D, dtype=dtype, device=device)
    q = randn(2, 2, 4, D, dtype=dtype, device=device)
    flash_attn_with_kvcache(q, kc, vc, k=kn, v=vn, cache_seqlens=seqlens, block_table=bt,
                            causal=True)
    touched = torch.zeros(kc.shape[:2], dtype=torch.bool)
    for b, l in enumerate(lens):
        for t in range(2):
            p = l + t
            blk, off = int(bt[b, p // page]), p % page
            touched[blk, off] = True
            assert torch.equal(kc[blk, off], kn[b, t]) and torch.equal(vc[blk, off], vn[b, t])
    touched = touched.to(device)
    assert torch.equal(kc[~touched], k0[~touched]) and torch.equal(vc[~touched], v0[~touched])
