"""Tests of `longattn.hf`, the Hugging Face transformers integration.

Run (from the repository root, after installing the package into the venv, see
crates/longattn-py/README.md; the model tests need the fixtures of scripts/fetch_fixtures.sh):

    /work/venv/bin/python -m pytest crates/longattn-py/tests/test_hf.py -v -s

- Without the built package every test skips ("longattn not built"). For developing the
  integration only, `LONGATTN_HF_STANDIN=1` runs the tests against a pure-torch stand-in of
  `longattn.attention` (tests/hf_helpers.py) instead.
- Without the GGUF / Gutenberg fixtures the model tests skip.
- The comparison with `longattn eval` needs the CLI binary (`$LONGATTN_BIN`, else
  `target/release/longattn`, else `longattn` on PATH; build it with
  `cargo build --release -p longattn-cli`); it skips otherwise.
- `LONGATTN_HF_GEMMA=0` skips the Gemma-3 tests (its GGUF takes ~70 s to load on 2 cores).

Numbers are printed with `-s`.
"""
from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import hf_helpers as H  # noqa: E402

try:
    import longattn

    HAVE_LONGATTN = hasattr(longattn, "attention")
except ImportError:
    HAVE_LONGATTN = False
STANDIN = not HAVE_LONGATTN and os.environ.get("LONGATTN_HF_STANDIN") == "1"
if not HAVE_LONGATTN and not STANDIN:
    pytest.skip("longattn not built", allow_module_level=True)

pytest.importorskip("transformers")
if STANDIN:
    # Development only: load hf.py from the source tree on its own (the package is not built) and
    # point it at the pure-torch stand-in.
    import importlib.util

    for m in [m for m in sys.modules if m == "longattn" or m.startswith("longattn.")]:
        del sys.modules[m]
    _spec = importlib.util.spec_from_file_location("longattn_hf_standin",
                                                   HERE.parent / "python" / "longattn" / "hf.py")
    hf = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(hf)
    hf._backend = H.standin_attention
    print("test_hf: running against the STAND-IN of longattn.attention (LONGATTN_HF_STANDIN=1)")
else:
    import longattn.hf as hf  # noqa: E402

from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

hf.register()

F32 = torch.float32


# ---------------------------------------------------------------------------------------------
# A spy on the backend: counts calls and records what longattn.attention receives.
# ---------------------------------------------------------------------------------------------


class Spy:
    def __init__(self, fn):
        self.fn = fn
        self.calls = []

    def __call__(self, q, k, v, mask="causal", **kw):
        self.calls.append(dict(q=tuple(q.shape), k=tuple(k.shape), mask=mask,
                               k_stride=k.stride(), v_stride=v.stride(),
                               k_contig=k.is_contiguous(), docs=kw.get("k_doc") is not None))
        return self.fn(q, k, v, mask, **kw)


@pytest.fixture
def spy():
    old = hf._backend
    s = Spy(hf._attention())
    hf._backend = s
    yield s
    hf._backend = old


def reference(q, k, v, mask, scale=None, softcap=None):
    """Dense reference in float64: q [B,Sq,Hq,D], k/v [B,Sk,Hk,D], mask bool [B,Sq,Sk]."""
    q, k, v = q.double(), k.double(), v.double()
    rep = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * (scale or 1 / math.sqrt(q.shape[-1]))
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    s = s.masked_fill(~mask[:, None], float("-inf"))
    w = torch.softmax(s, -1).nan_to_num(0.0)
    return torch.einsum("bhqk,bkhd->bqhd", w, v)


class Mod(torch.nn.Module):
    is_causal = True


def call(q, k, v, attention_mask=None, module=None, **kw):
    """attention_forward with [B,S,H,D] inputs given as transformers does ([B,H,S,D] views)."""
    module = Mod() if module is None else module
    out, w = hf.attention_forward(module, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                  attention_mask, **kw)
    assert w is None
    return out


def rnd(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=F32)


# ---------------------------------------------------------------------------------------------
# Unit tests of the attention / mask functions (no model, no fixtures)
# ---------------------------------------------------------------------------------------------


def test_prefill_gqa_scale_softcap_window():
    B, S, Hq, Hk, D = 2, 37, 6, 2, 16
    q, k, v = rnd(B, S, Hq, D, seed=1), rnd(B, S, Hk, D, seed=2), rnd(B, S, Hk, D, seed=3)
    i, j = torch.arange(S)[:, None], torch.arange(S)[None]
    causal = (j <= i).expand(B, S, S)
    out = call(q, k, v, scaling=0.3, softcap=2.0)
    assert out.shape == (B, S, Hq, D)
    torch.testing.assert_close(out.double(), reference(q, k, v, causal, 0.3, 2.0), atol=2e-5, rtol=1e-4)
    out = call(q, k, v, sliding_window=8)
    torch.testing.assert_close(out.double(), reference(q, k, v, causal & (i - j < 8)), atol=2e-5, rtol=1e-4)


def test_is_causal_false_and_module_default():
    B, S, H, D = 1, 20, 2, 8
    q, k, v = rnd(B, S, H, D, seed=4), rnd(B, S, H, D, seed=5), rnd(B, S, H, D, seed=6)
    full = torch.ones(B, S, S, dtype=torch.bool)
    torch.testing.assert_close(call(q, k, v, is_causal=False).double(), reference(q, k, v, full),
                               atol=2e-5, rtol=1e-4)
    m = Mod()
    m.is_causal = False
    out, _ = hf.attention_forward(m, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None)
    torch.testing.assert_close(out.double(), reference(q, k, v, full), atol=2e-5, rtol=1e-4)


def test_decode_noncontiguous_cache_and_padding(spy):
    # K/V as a generation cache holds them: head-major [B, H, S, D]; one query; left padding.
    B, Sk, Hq, Hk, D = 2, 29, 4, 2, 8
    kc, vc = rnd(B, Hk, Sk, D, seed=7), rnd(B, Hk, Sk, D, seed=8)
    q = rnd(B, 1, Hq, D, seed=9)
    pad = torch.ones(B, Sk, dtype=torch.bool)
    pad[0, :5] = False
    out, _ = hf.attention_forward(Mod(), q.transpose(1, 2), kc, vc, pad)
    assert spy.calls[-1]["k_stride"] == kc.transpose(1, 2).stride(), "K/V must reach longattn as views"
    m = pad[:, None, :].expand(B, 1, Sk)
    torch.testing.assert_close(out.double(), reference(q, kc.transpose(1, 2), vc.transpose(1, 2), m),
                               atol=2e-5, rtol=1e-4)


def test_padding_prefill_left_and_right():
    B, S, H, D = 2, 24, 2, 8
    q, k, v = rnd(B, S, H, D, seed=10), rnd(B, S, H, D, seed=11), rnd(B, S, H, D, seed=12)
    pad = torch.ones(B, S, dtype=torch.bool)
    pad[0, :7] = False  # left
    pad[1, 19:] = False  # right
    out = call(q, k, v, pad)
    i, j = torch.arange(S)[:, None], torch.arange(S)[None]
    m = (j <= i) & pad[:, None, :]
    ref = reference(q, k, v, m)
    real = pad  # only real query rows are compared
    torch.testing.assert_close(out.double()[real], ref[real], atol=2e-5, rtol=1e-4)
    assert torch.isfinite(out).all()


def test_sparse_mask_with_padding(spy):
    # sinks(2) must mean the first 2 *real* tokens of each row.
    B, S, H, D = 2, 30, 2, 8
    q, k, v = rnd(B, S, H, D, seed=13), rnd(B, S, H, D, seed=14), rnd(B, S, H, D, seed=15)
    pad = torch.ones(B, S, dtype=torch.bool)
    pad[1, 21:] = False  # right padding only: one call
    mod = Mod()
    hf.set_mask(mod, "causal & (sinks(2) | window(3,0))")
    spy.calls.clear()
    out = call(q, k, v, pad, mod)
    assert len(spy.calls) == 1
    i, j = torch.arange(S)[:, None], torch.arange(S)[None]
    m = (j <= i) & ((j < 2) | (i - j <= 3)) & pad[:, None, :]
    torch.testing.assert_close(out.double()[pad], reference(q, k, v, m)[pad], atol=2e-5, rtol=1e-4)
    pad[0, :9] = False  # and left padding in row 0: per row
    spy.calls.clear()
    out = call(q, k, v, pad, mod)
    assert len(spy.calls) == 2
    for b, first in ((0, 9), (1, 0)):
        n = S - first
        i, j = torch.arange(n)[:, None], torch.arange(n)[None]
        m = ((j <= i) & ((j < 2) | (i - j <= 3)))[None] & pad[b:b + 1, None, first:]
        ref = reference(q[b:b + 1, first:], k[b:b + 1, first:], v[b:b + 1, first:], m)
        real = pad[b:b + 1, first:]
        torch.testing.assert_close(out[b:b + 1, first:].double()[real], ref[real], atol=2e-5, rtol=1e-4)


def test_mask_function_padding_and_packed():
    from transformers import masking_utils as mu

    am = torch.ones(2, 10, dtype=torch.bool)
    assert hf.mask_forward(2, 10, 10, mask_function=mu.causal_mask_function, attention_mask=am) is None
    am[0, :3] = False
    got = hf.mask_forward(2, 10, 10, mask_function=mu.causal_mask_function, attention_mask=am)
    assert got.dtype == torch.bool and torch.equal(got, am)
    # a sliding layer sees only the last kv_length keys
    got = hf.mask_forward(2, 1, 6, mask_function=mu.sliding_window_causal_mask_function(6), attention_mask=am)
    assert got is None  # its last 6 keys are all real
    # packed sequences: position ids restarting inside the row
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3, 4]])
    packed = mu.find_packed_sequence_indices(pos)
    fn = mu.and_masks(mu.remap_positions_for_packed_sequence(mu.causal_mask_function, pos),
                      mu.packed_sequence_mask_function(packed))
    got = hf.mask_forward(1, 10, 10, mask_function=fn, attention_mask=None)
    assert got.dtype == torch.int32 and got.tolist() == packed.tolist()
    # an unknown overlay is an error, not silently dropped
    with pytest.raises(NotImplementedError, match="longattn.hf"):
        hf.mask_forward(1, 10, 10, mask_function=mu.or_masks(mu.causal_mask_function, lambda b, h, q, k: q >= 0))


def test_packed_documents_in_attention():
    S, H, D = 12, 2, 8
    q, k, v = rnd(1, S, H, D, seed=16), rnd(1, S, H, D, seed=17), rnd(1, S, H, D, seed=18)
    docs = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 2]], dtype=torch.int32)
    out = call(q, k, v, docs)
    i, j = torch.arange(S)[:, None], torch.arange(S)[None]
    m = (j <= i) & (docs[0][:, None] == docs[0][None])
    torch.testing.assert_close(out.double(), reference(q, k, v, m[None]), atol=2e-5, rtol=1e-4)


def test_clear_errors():
    q = rnd(1, 4, 2, 8)
    with pytest.raises(NotImplementedError, match="dropout"):
        call(q, q, q, dropout=0.1)
    with pytest.raises(NotImplementedError, match="s_aux"):
        call(q, q, q, s_aux=torch.zeros(2))
    with pytest.raises(NotImplementedError, match="attention_mask"):
        call(q, q, q, torch.ones(1, 1, 4, 4, dtype=torch.bool))
    with pytest.raises(NotImplementedError, match="position_bias"):
        call(q, q, q, position_bias=torch.zeros(1, 2, 4, 4))
    with pytest.raises(ValueError, match="mask"):
        hf.set_mask(torch.nn.Linear(1, 1), "causal & bogus(3")
    with pytest.raises(ValueError, match="document"):
        hf.set_mask(torch.nn.Linear(1, 1), "causal & document")


# ---------------------------------------------------------------------------------------------
# Real models
# ---------------------------------------------------------------------------------------------

BOOK = "carroll-alice.txt"
N_TOKENS = 320


def need(*paths):
    missing = [str(p) for p in paths if not Path(p).exists()]
    if missing:
        pytest.skip(f"fixtures absent ({', '.join(missing)}): run scripts/fetch_fixtures.sh")


def load(path):
    pytest.importorskip("gguf")
    pytest.importorskip("accelerate")
    d, f = str(path.parent), path.name
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=F32, attn_implementation=hf.NAME)
    return model.eval(), tok


def logits(model, impl, ids, **kw):
    model.set_attn_implementation(impl)
    try:
        with torch.no_grad():
            return model(ids, **kw).logits.float()
    finally:
        model.set_attn_implementation(hf.NAME)


def mean_nll(lg, ids):
    return torch.nn.functional.cross_entropy(lg[0, :-1].double(), ids[0, 1:]).item()


@pytest.fixture(scope="module")
def smol():
    need(H.SMOL, H.BOOKS / BOOK)
    model, tok = load(H.SMOL)
    ids = tok(H.read_book(BOOK), add_special_tokens=True)["input_ids"][:N_TOKENS]
    return model, tok, torch.tensor([ids])


@pytest.fixture(scope="module")
def smol_causal(smol):
    """(longattn logits, sdpa logits) of the N_TOKENS-token text, computed once."""
    model, _, ids = smol
    return logits(model, hf.NAME, ids), logits(model, "sdpa", ids)


def test_smol_nll_matches_sdpa(smol, smol_causal, spy):
    model, _, ids = smol
    la, ls = smol_causal
    a, s = mean_nll(la, ids), mean_nll(ls, ids)
    diff = (la - ls).abs().max().item()
    print(f"\nSmolLM2 {N_TOKENS} tokens of {BOOK}: NLL longattn {a:.7f}, sdpa {s:.7f}, "
          f"rel diff {abs(a - s) / s:.2e}, max |logit diff| {diff:.2e}")
    assert abs(a - s) <= 1e-4 * s
    assert diff < 2e-3
    assert 2.0 < a < 5.0
    # every layer goes through longattn.attention, with un-expanded GQA heads and plain causal
    logits(model, hf.NAME, ids[:, :16])
    n = model.config.num_hidden_layers
    assert len(spy.calls) == n
    c = spy.calls[0]
    assert c["mask"] == "causal" and c["q"][2] == model.config.num_attention_heads
    assert c["k"][2] == model.config.num_key_value_heads


def test_smol_nll_matches_cli(smol, smol_causal, tmp_path):
    cli = H.find_cli()
    if cli is None:
        pytest.skip("no longattn CLI binary ($LONGATTN_BIN or target/release/longattn): "
                    "build it with `cargo build --release -p longattn-cli`")
    model, _, ids = smol
    a = mean_nll(smol_causal[0], ids)
    c = H.cli_nll(cli, H.SMOL, ids[0].tolist(), tmp_path)
    print(f"\nSmolLM2 {N_TOKENS} tokens: NLL longattn.hf {a:.7f}, `longattn eval --ids` {c:.7f}, "
          f"rel diff {abs(a - c) / c:.2e}")
    # Both dequantize the same Q4_1 weights; the CLI runs its own f32 forward (own matmuls, RoPE,
    # norms), so agreement is to float32 accumulation, not bit-exact.
    assert abs(a - c) <= 1e-3 * c


def _batch(rows, side, pad_id):
    S = max(len(r) for r in rows)
    ids = torch.full((len(rows), S), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), S, dtype=torch.long)
    for b, r in enumerate(rows):
        sl = slice(S - len(r), S) if side == "left" else slice(0, len(r))
        ids[b, sl] = torch.tensor(r)
        mask[b, sl] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, pos


@pytest.mark.parametrize("side", ["left", "right"])
def test_smol_padded_batch(smol, side):
    model, _, ids = smol
    rows = [ids[0, :40].tolist(), ids[0, 100:172].tolist()]
    x, mask, pos = _batch(rows, side, pad_id=0)
    model.set_attn_implementation(hf.NAME)
    with torch.no_grad():
        lp = model(x, attention_mask=mask, position_ids=pos).logits
    worst = 0.0
    for b, r in enumerate(rows):
        single = logits(model, hf.NAME, torch.tensor([r]))[0]
        got = lp[b][mask[b].bool()]
        worst = max(worst, (got - single).abs().max().item())
        assert torch.equal(got.argmax(-1), single.argmax(-1))
    print(f"\nSmolLM2 {side}-padded batch vs unpadded: max |logit diff| {worst:.2e}")
    assert worst < 2e-3


def test_smol_generate_matches_sdpa(smol, spy):
    model, tok, ids = smol
    prompts = [ids[0, :24].tolist(), ids[0, 200:237].tolist()]
    x, mask, _ = _batch(prompts, "left", pad_id=tok.pad_token_id or 0)
    kw = dict(attention_mask=mask, max_new_tokens=16, do_sample=False,
              pad_token_id=tok.pad_token_id or 0)
    with torch.no_grad():
        model.set_attn_implementation("sdpa")
        ref = model.generate(x, **kw)
        model.set_attn_implementation(hf.NAME)
        spy.calls.clear()
        got = model.generate(x, **kw)
        single = model.generate(torch.tensor([prompts[1]]), max_new_tokens=16, do_sample=False,
                                pad_token_id=tok.pad_token_id or 0)
    print(f"\nSmolLM2 generate (left-padded batch of 2, 16 new): sdpa {ref[:, x.shape[1]:].tolist()}\n"
          f"  longattn {got[:, x.shape[1]:].tolist()}")
    assert torch.equal(got, ref)
    assert torch.equal(single[0, len(prompts[1]):], got[1, x.shape[1]:])
    # decode steps: one query, K/V from the cache passed as head-major views with padding documents
    dec = [c for c in spy.calls if c["q"][1] == 1 and c["q"][0] == 2]
    assert dec and all(not c["k_contig"] for c in dec)
    assert all(c["docs"] for c in dec)


def test_smol_packed_sequences(smol):
    """Two sequences packed in one row (position ids restart, no mask, no cache) attend only
    within themselves: as transformers does for DataCollatorWithFlattening."""
    model, _, ids = smol
    a, b = ids[:, :30], ids[:, 50:90]
    x = torch.cat([a, b], 1)
    pos = torch.cat([torch.arange(30), torch.arange(40)])[None]
    model.set_attn_implementation(hf.NAME)
    with torch.no_grad():
        lp = model(x, position_ids=pos, use_cache=False).logits
    la, lb = logits(model, hf.NAME, a), logits(model, hf.NAME, b)
    worst = max((lp[:, :30] - la).abs().max().item(), (lp[:, 30:] - lb).abs().max().item())
    print(f"\nSmolLM2 packed row (30 + 40 tokens) vs separate runs: max |logit diff| {worst:.2e}")
    assert worst < 2e-3


def test_smol_backward_matches_sdpa(smol):
    """Training path (model.train(), attention dropout 0): gradients through longattn.attention."""
    model, _, ids = smol
    x = ids[:, :48]
    w = model.model.layers[0].self_attn.q_proj.weight
    grads = {}
    model.train()
    try:
        for impl in ("sdpa", hf.NAME):
            model.set_attn_implementation(impl)
            model.zero_grad(set_to_none=True)
            loss = model(x, labels=x).loss
            loss.backward()
            grads[impl] = (loss.item(), w.grad.clone())
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()
        model.set_attn_implementation(hf.NAME)
    (ls, gs), (la, ga) = grads["sdpa"], grads[hf.NAME]
    rel = ((ga - gs).abs().max() / gs.abs().max()).item()
    print(f"\nSmolLM2 backward (48 tokens): loss sdpa {ls:.7f}, longattn {la:.7f}; "
          f"layer-0 q_proj grad max rel diff {rel:.2e}")
    assert abs(la - ls) <= 1e-4 * ls and rel < 1e-3


# `past_key_values` is renamed `cache` in transformers 5.2x (deprecated, removed in 5.40); the old
# name still works and is what older 5.x versions accept.
@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated")
def test_smol_static_cache(smol):
    """A StaticCache hands over all its slots; only the written ones may be attended (no mask)."""
    from transformers import StaticCache

    model, _, ids = smol
    got = {}
    for impl in ("sdpa", hf.NAME):
        model.set_attn_implementation(impl)
        cache = StaticCache(config=model.config, max_cache_len=64)
        with torch.no_grad():
            a = model(ids[:, :20], past_key_values=cache, use_cache=True).logits
            b = model(ids[:, 20:22], past_key_values=cache, use_cache=True).logits
        got[impl] = torch.cat([a, b], 1)
    model.set_attn_implementation(hf.NAME)
    assert (got["sdpa"] - got[hf.NAME]).abs().max().item() < 2e-3


SPARSE = "causal & (sinks(4) | window(64,0))"


def test_smol_sparse_mask(smol, smol_causal):
    model, _, ids = smol
    S = ids.shape[1]
    hf.set_mask(model, SPARSE)
    try:
        ls = logits(model, hf.NAME, ids)
    finally:
        hf.clear_mask(model)
    i, j = torch.arange(S)[:, None], torch.arange(S)[None]
    dense = ((j <= i) & ((j < 4) | (i - j <= 64)))[None, None]
    lr = logits(model, "sdpa", ids, attention_mask=dense)
    a, r, c = mean_nll(ls, ids), mean_nll(lr, ids), mean_nll(smol_causal[0], ids)
    diff = (ls - lr).abs().max().item()
    print(f"\nSmolLM2 `{SPARSE}`: NLL longattn {a:.7f}, sdpa with the 4-D mask {r:.7f} "
          f"(max |logit diff| {diff:.2e}); causal {c:.7f}")
    assert abs(a - r) <= 1e-4 * r and diff < 2e-3
    assert a - c > 1e-3  # the pattern drops context, so it changes (raises) the loss


def test_smol_sparse_mask_kwarg_default_and_padding(smol):
    model, _, ids = smol
    m = "causal & (sinks(4) | window(16,0))"
    x = ids[:, :96]
    hf.set_mask(model, m)
    try:
        a = logits(model, hf.NAME, x)
        rows = [ids[0, :40].tolist(), ids[0, :96].tolist()]
        xb, mask, pos = _batch(rows, "left", pad_id=0)
        with torch.no_grad():
            lb = model(xb, attention_mask=mask, position_ids=pos).logits
        one = logits(model, hf.NAME, ids[:, :40])
    finally:
        hf.clear_mask(model)
    b = logits(model, hf.NAME, x, longattn_mask=m)
    hf.register(mask=m)
    try:
        c = logits(model, hf.NAME, x)
    finally:
        hf.register()
    plain = logits(model, hf.NAME, x)
    assert (a - b).abs().max().item() == 0.0 and (a - c).abs().max().item() == 0.0
    assert (a - plain).abs().max().item() > 1e-3
    # with left padding, sinks are the first real tokens of each row
    assert (lb[1] - a[0]).abs().max().item() < 2e-3
    assert (lb[0, -40:] - one[0]).abs().max().item() < 2e-3


@pytest.fixture(scope="module")
def gemma():
    if os.environ.get("LONGATTN_HF_GEMMA") == "0":
        pytest.skip("LONGATTN_HF_GEMMA=0")
    need(H.GEMMA, H.BOOKS / BOOK)
    model, tok = load(H.GEMMA)
    ids = tok(H.read_book(BOOK), add_special_tokens=True)["input_ids"]
    return model, tok, ids


def test_gemma_nll_matches_sdpa(gemma, tmp_path, spy):
    model, tok, ids = gemma
    cfg = model.config
    sw = cfg.sliding_window
    n = sw + 88  # past the local window, so the sliding layers differ from causal
    x = torch.tensor([ids[:n]])
    la, ls = logits(model, hf.NAME, x), logits(model, "sdpa", x)
    masks = [c["mask"] for c in spy.calls]
    local = sum(t == "sliding_attention" for t in cfg.layer_types)
    assert len(masks) == cfg.num_hidden_layers
    assert masks.count(f"causal & window({sw - 1},0)") == local and masks.count("causal") == len(masks) - local
    a, s = mean_nll(la, x), mean_nll(ls, x)
    diff = (la - ls).abs().max().item()
    print(f"\nGemma-3 {n} tokens (window {sw}, softcap {cfg.attn_logit_softcapping}, "
          f"scaling {cfg.query_pre_attn_scalar}^-0.5): NLL longattn {a:.7f}, sdpa {s:.7f}, "
          f"rel diff {abs(a - s) / s:.2e}, max |logit diff| {diff:.2e}; first id {ids[0]} (BOS {tok.bos_token_id})")
    assert abs(a - s) <= 1e-4 * s and diff < 5e-3
    assert 2.0 < a < 6.0
    cli = H.find_cli()
    if cli is not None:
        c = H.cli_nll(cli, H.GEMMA, x[0].tolist(), tmp_path)
        print(f"  `longattn eval --ids` {c:.7f}, rel diff {abs(a - c) / c:.2e}")
        assert abs(a - c) <= 1e-3 * c


def test_gemma_generate_through_sliding_cache(gemma):
    """Greedy generate with the local window shrunk to 24 so that the sliding-window cache drops
    tokens during decoding (a 40-token left-padded prompt + 10 new tokens)."""
    model, tok, ids = gemma
    attn = [m for m in model.modules() if getattr(m, "sliding_window", None)]
    old = model.config.sliding_window
    try:
        model.config.sliding_window = 24
        for m in attn:
            m.sliding_window = 24
        prompts = [ids[:40], ids[:1] + ids[300:327]]
        x, mask, _ = _batch(prompts, "left", pad_id=tok.pad_token_id or 0)
        kw = dict(attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=tok.pad_token_id or 0)
        with torch.no_grad():
            model.set_attn_implementation("sdpa")
            ref = model.generate(x, **kw)
            model.set_attn_implementation(hf.NAME)
            got = model.generate(x, **kw)
    finally:
        model.config.sliding_window = old
        for m in attn:
            m.sliding_window = old
        model.set_attn_implementation(hf.NAME)
    print(f"\nGemma-3 generate (window 24): sdpa {ref[:, x.shape[1]:].tolist()}\n  longattn {got[:, x.shape[1]:].tolist()}")
    assert torch.equal(got, ref)
