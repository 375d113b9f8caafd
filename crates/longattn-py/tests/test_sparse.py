"""longattn.sparse_attention: dynamic sparse prefill through the one entry point (CPU: every
method; CUDA: vertical_slash estimated on the device). Each output is checked against the f64
reference restricted to the tiles the call reports it kept (per head), and the selection
against the mask (every kept pair is allowed by the mask; tile kinds as the mask makes them)."""
import pytest
import torch

import longattn
from conftest import HAS_CUDA, assert_close, assert_grad_close, require_cuda
from reference import allowed_matrix, ref_attention


def qkv(b, sq, sk, hq, hk, d, dtype, device, gen_seed=0):
    g = torch.Generator().manual_seed(gen_seed)
    mk = lambda s, h: torch.randn(b, s, h, d, generator=g).to(dtype).to(device)  # noqa: E731
    return mk(sq, hq), mk(sk, hk), mk(sk, hk)


def selected_ref(q, k, v, mask, sel):
    """f64 reference per head with the element mask = mask & kept tiles."""
    b, sq, hq, _ = q.shape
    sk, hk = k.shape[1], k.shape[2]
    tq, tk = sel["tile_q"], sel["tile_k"]
    table = sel["block_mask"]
    assert table.shape == (b, hq, -(-sq // tq), -(-sk // tk)), table.shape
    base = allowed_matrix(mask, b, sq, sk) if mask is not None else torch.ones(b, sq, sk, dtype=torch.bool)
    outs, lses = [], []
    for h in range(hq):
        kept = table[:, h].repeat_interleave(tq, 1)[:, :sq].repeat_interleave(tk, 2)[:, :, :sk] > 0
        g = h // (hq // hk)
        o, l = ref_attention(q[:, :, h:h + 1].cpu(), k[:, :, g:g + 1].cpu(), v[:, :, g:g + 1].cpu(),
                             allowed=base & kept)
        outs.append(o)
        lses.append(l)
    return torch.cat(outs, 2), torch.cat(lses, 1), base


CPU_SPECS = [
    "vertical_slash(v=8,s=4,block=32,last=16,dense_below=0)",
    "flexprefill(gamma=0.8,tau=0.1,min_budget=32,block=32,last=16,dense_below=0)",
    "topmass(gamma=0.8,block=32,dense_below=0)",
    "relthresh(alpha=0.3,block=32,dense_below=0)",
    "moba(block=32,topk=2,dense_below=0)",
    "proxy(gamma=0.8,rows=4,block=32,last=16,dense_below=0)",
    "lowbit(tau=0.3,block=32,sink=2,local=16,dense_below=0)",
]


@pytest.mark.parametrize("spec", CPU_SPECS)
@pytest.mark.parametrize("sq,sk", [(7, 7), (65, 65), (113, 300), (1, 257)])
def test_cpu_matches_reference_on_the_kept_tiles(spec, sq, sk):
    q, k, v = qkv(1, sq, sk, 4, 2, 32, torch.float32, "cpu", gen_seed=sq * 1000 + sk)
    out, lse, sel = longattn.sparse_attention(q, k, v, spec, "causal", return_lse=True,
                                              return_selection=True)
    ref_o, ref_l, base = selected_ref(q, k, v, "causal", sel)
    assert_close(out, ref_o, torch.float32)
    fin = torch.isfinite(ref_l)
    assert torch.equal(fin, torch.isfinite(lse.double()))
    assert (lse.double()[fin] - ref_l[fin]).abs().max() < 1e-4
    # Kinds: a tile the mask allows whole is 1, in part 2, nothing 0 (never kept).
    tq, tk = sel["tile_q"], sel["tile_k"]
    t = sel["block_mask"]
    for qi in range(t.shape[2]):
        for ki in range(t.shape[3]):
            blk = base[0, qi * tq:(qi + 1) * tq, ki * tk:(ki + 1) * tk]
            want = 0 if not blk.any() else (1 if blk.all() else 2)
            kinds = set(t[0, :, qi, ki].tolist())
            assert kinds <= {0, want}, (qi, ki, kinds, want)
    assert 0.0 < sel["density"] <= 1.0 and not sel["fallback"]


def test_dense_fallback_keeps_every_tile_and_equals_attention():
    q, k, v = qkv(1, 200, 200, 2, 2, 32, torch.float32, "cpu")
    out, sel = longattn.sparse_attention(q, k, v, "vertical_slash(v=2,s=2)", "causal",
                                         return_selection=True)
    assert sel["fallback"] and sel["density"] == 1.0
    dense = longattn.attention(q, k, v, "causal")
    assert torch.equal(out, dense)


def test_element_level_selections():
    """Element level (CPU): `columns` that samples every row of its tiles at gamma = 1 keeps
    every allowed pair (the dense result, density 1, Partial tiles); element lines keep fewer
    pairs than the tiles they cross, which are reported in part (2)."""
    q, k, v = qkv(1, 150, 150, 4, 2, 32, torch.float32, "cpu", gen_seed=5)
    spec = "columns(gamma=1,rows=16,block=16,sink=0,local=0,dense_below=0)"
    out, lse, sel = longattn.sparse_attention(q, k, v, spec, "causal", return_lse=True,
                                              return_selection=True)
    ref_o, ref_l = longattn.attention(q, k, v, "causal", return_lse=True)
    assert_close(out, ref_o, torch.float32)
    assert (lse - ref_l).abs().max() < 1e-4
    assert sel["density"] == 1.0 and (sel["block_mask"] == 2).any()
    tiles = "vertical_slash(v=3,s=2,block=16,last=8,dense_below=0)"
    _, whole = longattn.sparse_attention(q, k, v, tiles, "causal", return_selection=True)
    out_e, lines = longattn.sparse_attention(q, k, v, tiles[:-1] + ",element=1)", "causal",
                                             return_selection=True)
    assert torch.equal(lines["block_mask"] > 0, whole["block_mask"] > 0)
    assert lines["density"] < whole["density"]
    assert (lines["block_mask"] == 2).sum() > (whole["block_mask"] == 2).sum()
    assert torch.isfinite(out_e).all()
    # `lowbit_mass`: gamma = 1 keeps every row's every key (the dense result); below 1 each row
    # keeps only part of its keys.
    full = "lowbit_mass(gamma=1,block=16,sink=0,local=0,dense_below=0)"
    out_m, lse_m, sel_m = longattn.sparse_attention(q, k, v, full, "causal", return_lse=True,
                                                    return_selection=True)
    assert_close(out_m, ref_o, torch.float32)
    assert (lse_m - ref_l).abs().max() < 1e-4 and sel_m["density"] == 1.0
    _, part = longattn.sparse_attention(q, k, v, full.replace("gamma=1", "gamma=0.8"), "causal",
                                        return_selection=True)
    assert 0.0 < part["density"] < 1.0 and (part["block_mask"] == 2).any()


def test_no_mask_and_window_mask():
    q, k, v = qkv(1, 150, 150, 2, 1, 32, torch.float32, "cpu")
    for mask in (None, "causal & window(40,0)"):
        out, sel = longattn.sparse_attention(q, k, v, "topmass(gamma=0.7,block=32,dense_below=0)",
                                             mask, return_selection=True)
        ref_o, _, _ = selected_ref(q, k, v, mask, sel)
        assert_close(out, ref_o, torch.float32)


def test_bad_input_is_a_clear_error():
    q, k, v = qkv(1, 64, 64, 2, 2, 32, torch.float32, "cpu")
    with pytest.raises(ValueError, match="unknown method"):
        longattn.sparse_attention(q, k, v, "nosuch(a=1)")
    with pytest.raises(ValueError, match="gamma"):
        longattn.sparse_attention(q, k, v, "topmass(gamma=2)")
    with pytest.raises(ValueError, match="BlockMask"):
        longattn.sparse_attention(q, k, v, "topmass()",
                                  longattn.BlockMask(torch.ones(1, 1, 1, 1, dtype=torch.bool), (64, 64)))
    # Gradients: refused by name where the selection is finer than tiles or skip-softmax
    # approximates the forward; under no_grad those run.
    qg = q.clone().requires_grad_(True)
    for spec, what in (("columns(gamma=0.9,block=32,dense_below=0)", "element-level"),
                       ("vertical_slash(v=8,s=4,block=32,element=1,dense_below=0)", "element-level"),
                       ("skip(factor=600,block=32)", "skip-softmax")):
        with pytest.raises(RuntimeError, match=what):
            longattn.sparse_attention(qg, k, v, spec)
        with torch.no_grad():
            longattn.sparse_attention(qg, k, v, spec)
    with pytest.raises(ValueError, match="unknown method"):
        longattn.sparse_attention(qg, k, v, "nosuch()")


GRAD_SPECS = [
    "topmass(gamma=0.8,block=32,dense_below=0)",
    "moba(block=32,topk=2,dense_below=0)",
    "vertical_slash(v=8,s=4,block=32,last=16,dense_below=0)",
    "lowbit(tau=0.3,block=32,sink=2,local=16,dense_below=0)+topmass(gamma=0.5,block=32)",
    "topmass(gamma=0.8,block=32,dense_below=4096)",   # the dense fallback
]


@pytest.mark.parametrize("spec", GRAD_SPECS)
@pytest.mark.parametrize("sq,sk,mask", [(65, 65, "causal"), (113, 300, "causal & (sinks(4) | window(64,0))"),
                                        (1, 257, None)])
def test_cpu_grads_run_through_the_selected_tiles(spec, sq, sk, mask):
    q, k, v = qkv(2, sq, sk, 4, 2, 32, torch.float32, "cpu", gen_seed=sq + 7 * sk)
    q, k, v = (x.requires_grad_(True) for x in (q, k, v))
    out, sel = longattn.sparse_attention(q, k, v, spec, mask, return_selection=True)
    assert (sel["block_mask"] == 0).any() or sel["fallback"], "nothing dropped: the test says little"
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    grads = torch.autograd.grad(out, (q, k, v), dout)
    # The f64 reference through mask & kept tiles, per head, and its gradients.
    l64 = [x.detach().double().requires_grad_(True) for x in (q, k, v)]
    ro, _, _ = selected_ref(*l64, mask, sel)
    assert_close(out, ro, torch.float32)
    ref = torch.autograd.grad(ro, l64, dout.double())
    for a, r, n in zip(grads, ref, ("dq", "dk", "dv")):
        assert_grad_close(a, r, torch.float32, n)


@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA: no CUDA device (skipped)")
@pytest.mark.parametrize("sq,sk", [(1, 2048), (113, 113), (1023, 1023), (3000, 3000), (500, 2100)])
def test_cuda_vertical_slash_matches_reference_and_the_cpu_selection(sq, sk):
    require_cuda()
    spec = "vertical_slash(v=16,s=8,block=128,last=64,dense_below=0)"
    q, k, v = qkv(1, sq, sk, 4, 2, 128, torch.bfloat16, "cuda", gen_seed=sq + sk)
    out, lse, sel = longattn.sparse_attention(q, k, v, spec, "causal", return_lse=True,
                                              return_selection=True)
    ref_o, ref_l, _ = selected_ref(q, k, v, "causal", sel)
    assert_close(out.cpu(), ref_o, torch.bfloat16)
    # From 2k keys the D 128 kernel's tiles are 128 x 128, the CPU spec's block: the selections
    # agree (f32 vs f64 masses; random inputs have no near-ties at the cut).
    if sk >= 2048 and (sel["tile_q"], sel["tile_k"]) == (128, 128):
        _, cpu_sel = longattn.sparse_attention(q.cpu(), k.cpu(), v.cpu(), spec, "causal",
                                               return_selection=True)
        assert torch.equal(cpu_sel["block_mask"], sel["block_mask"])


@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA: no CUDA device (skipped)")
@pytest.mark.parametrize("sq,sk", [(113, 113), (1023, 1023), (500, 2100)])
def test_cuda_grads_run_through_the_device_selection(sq, sk):
    require_cuda()
    spec = "vertical_slash(v=16,s=8,block=128,last=64,dense_below=0)"
    q, k, v = qkv(1, sq, sk, 4, 2, 128, torch.bfloat16, "cuda", gen_seed=sq + 3 * sk)
    q, k, v = (x.requires_grad_(True) for x in (q, k, v))
    out, sel = longattn.sparse_attention(q, k, v, spec, "causal", return_selection=True)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16).cuda()
    grads = torch.autograd.grad(out, (q, k, v), dout)
    l64 = [x.detach().cpu().double().requires_grad_(True) for x in (q, k, v)]
    ro, _, _ = selected_ref(*l64, "causal", sel)
    ref = torch.autograd.grad(ro, l64, dout.cpu().double())
    for a, r, n in zip(grads, ref, ("dq", "dk", "dv")):
        assert_grad_close(a, r, torch.bfloat16, n)


def test_skip_counts_in_the_selection():
    """Skip-softmax's (tested, dropped) groups come back with the selection; None without it."""
    q, k, v = qkv(1, 300, 900, 2, 1, 64, torch.float32, "cpu")
    _, sel = longattn.sparse_attention(q, k, v, "skip(factor=3.5,dense_below=0)", "causal",
                                       return_selection=True)
    tested, dropped = sel["skipped"]
    assert tested > 0 and 0 <= dropped <= tested
    _, sel = longattn.sparse_attention(q, k, v, "topmass(gamma=0.9,dense_below=0)", "causal",
                                       return_selection=True)
    assert sel["skipped"] is None


@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA: no CUDA device (skipped)")
def test_cuda_fallback_and_refusals():
    require_cuda()
    q, k, v = qkv(1, 300, 300, 2, 2, 64, torch.bfloat16, "cuda")
    out, sel = longattn.sparse_attention(q, k, v, "vertical_slash()", "causal", return_selection=True)
    assert sel["fallback"]
    torch.testing.assert_close(out, longattn.attention(q, k, v, "causal"), rtol=0, atol=0)
    with pytest.raises(ValueError, match="no CUDA estimator"):
        longattn.sparse_attention(q, k, v, "topmass(dense_below=0)")
    # Skip-softmax runs in the Hopper warp-specialized kernel (D 64 / 128); other head dims are
    # refused by name.
    if torch.cuda.get_device_capability() == (9, 0):
        out_s = longattn.sparse_attention(q, k, v, "skip(factor=10,dense_below=0)", "causal")
        assert torch.isfinite(out_s.float()).all()
    q32, k32, v32 = qkv(1, 300, 300, 2, 2, 32, torch.bfloat16, "cuda")
    with pytest.raises(ValueError, match="warp-specialized"):
        longattn.sparse_attention(q32, k32, v32, "skip(factor=10,dense_below=0)")
    # No selection requested: no synchronisation, the same output.
    o1 = longattn.sparse_attention(q, k, v, "vertical_slash(v=4,s=4,dense_below=0)")
    o2, _ = longattn.sparse_attention(q, k, v, "vertical_slash(v=4,s=4,dense_below=0)",
                                      return_selection=True)
    torch.testing.assert_close(o1, o2, rtol=0, atol=0)


@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA: no CUDA device (skipped)")
@pytest.mark.parametrize("sq,sk", [(1023, 1023), (500, 2100)])
def test_cuda_columns_runs_the_gathered_form(sq, sk):
    """`columns` on CUDA is the gathered form: the CPU's `gathered=1` selects the same tiles and
    keys up to the f32 / f64 bin edges, so the tables and the outputs agree almost everywhere."""
    require_cuda()
    # gamma 0.3: well below the half of the candidate keys where a tile turns whole (random inputs
    # near that edge flip whole rows between the f32 and f64 bins).
    spec = "columns(gamma=0.3,rows=4,block=128,sink=4,local=64,dense_below=0)"
    q, k, v = qkv(1, sq, sk, 4, 2, 128, torch.bfloat16, "cuda", gen_seed=sq + 3 * sk)
    out, sel = longattn.sparse_attention(q, k, v, spec, "causal", return_selection=True)
    assert not sel["fallback"] and 0.0 < sel["density"] <= 1.0
    assert torch.isfinite(out.float()).all()
    if (sel["tile_q"], sel["tile_k"]) != (128, 128):
        return  # the kernel's tiles differ from the CPU spec's block: no like-for-like
    cpu_out, cpu_sel = longattn.sparse_attention(q.cpu(), k.cpu(), v.cpu(),
                                                 spec.replace(")", ",gathered=1)"), "causal",
                                                 return_selection=True)
    same = (cpu_sel["block_mask"] == sel["block_mask"]).float().mean().item()
    assert same >= 0.98, same
    row_err = (out.cpu().float() - cpu_out.float()).abs().amax(dim=-1)
    assert (row_err <= 3e-2).float().mean().item() >= 0.98
