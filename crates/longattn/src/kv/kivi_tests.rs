//! KIVI: round-trip bounds, attention over a quantized cache against the f64 oracle on the
//! dequantized entries, the no-op, eviction after quantization, memory, bad input.
use super::*;
use crate::attention::AttnParams;
use crate::kv::score::{KvScores, Reduce, ScoreKind, ScoreParams};
use crate::kv::spec::KvSpec;
use crate::kv::{KvConfig, PagedKvCache, SeqId};
use crate::mask::{MaskExpr, MaskShape};
use crate::reference::attention_f64;
use crate::tensor::TensorView;
use crate::testing::{compare, out_tolerance, Rng, LSE_TOLERANCE};
use crate::DType;

const LENS: [usize; 6] = [1, 7, 63, 65, 113, 1023];

fn randn(n: usize, rng: &mut Rng) -> Vec<f32> {
    (0..n).map(|_| rng.normal() as f32).collect()
}

fn kivi(bits: u32, group: usize, residual: usize) -> Kivi {
    Kivi::uniform(bits, group, residual)
}

/// `zipvl(lo,hi,mass,f=0.95,group,residual)`.
fn zipvl(lo: u32, hi: u32, mass: f32, group: usize, residual: usize) -> Kivi {
    Kivi {
        mixed: Some(Mixed {
            bits: hi,
            mass,
            f: 0.95,
        }),
        ..kivi(lo, group, residual)
    }
}

/// K and V `[len, Hk, D]` of each layer.
type LayerKv = Vec<(Vec<f32>, Vec<f32>)>;

/// Appends `n` random positions to sequence `id` of a 2-layer cache, and their K / V to `full`.
fn append_random(cache: &mut PagedKvCache, id: SeqId, n: usize, rng: &mut Rng, full: &mut LayerKv) {
    let c = cache.config();
    let m = n * c.kv_heads * c.head_dim;
    let kv: Vec<(Vec<f32>, Vec<f32>)> = (0..2).map(|_| (randn(m, rng), randn(m, rng))).collect();
    let refs: Vec<(&[f32], &[f32])> = kv.iter().map(|(k, v)| (&k[..], &v[..])).collect();
    cache.append(id, &refs).unwrap();
    for (l, (k, v)) in kv.into_iter().enumerate() {
        full[l].0.extend(k);
        full[l].1.extend(v);
    }
}

/// A cache of one sequence of `len` positions (2 layers), filled in chunks of 13, with its
/// K / V per layer `[len, Hk, D]` kept for reference.
fn filled(
    len: usize,
    hk: usize,
    d: usize,
    page: usize,
    rng: &mut Rng,
) -> (PagedKvCache, SeqId, LayerKv) {
    let cfg = KvConfig {
        layers: 2,
        kv_heads: hk,
        head_dim: d,
        v_dim: d,
        page_size: page,
    };
    let mut cache = PagedKvCache::new(cfg).unwrap();
    let id = cache.add_sequence();
    let mut full = vec![(Vec::new(), Vec::new()); 2];
    let mut done = 0;
    while done < len {
        let n = 13.min(len - done);
        append_random(&mut cache, id, n, rng, &mut full);
        done += n;
    }
    (cache, id, full)
}

#[test]
fn round_trip_error_is_at_most_half_a_step() {
    let mut rng = Rng::new(16);
    for bits in [2u32, 4, 8] {
        // 8-bit codes exist as zipvl's high width.
        let policy = |group| match bits {
            8 => zipvl(2, 8, 0.5, group, 0),
            b => kivi(b, group, 0),
        };
        for &(n, d, group) in &[(1, 8, 8), (7, 16, 4), (32, 64, 32), (13, 24, 8)] {
            let k = randn(n * d, &mut rng);
            let v: Vec<f32> = randn(n * d, &mut rng).iter().map(|x| 3.0 * x).collect();
            let pos: Vec<u32> = (0..n as u32).collect();
            let mut h = QuantHead::default();
            h.push_group(&policy(group), bits, d, d, &k, &v, &pos)
                .unwrap();
            let (kk, vv) = h.dequantize();
            let levels = ((1u32 << bits) - 1) as f32;
            let mut worst = 0.0f32;
            // K: per channel over the n tokens.
            for x in 0..d {
                let col: Vec<f32> = (0..n).map(|t| k[t * d + x]).collect();
                let (lo, hi) = col
                    .iter()
                    .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &y| {
                        (a.min(y), b.max(y))
                    });
                let step = (hi - lo) / levels;
                for t in 0..n {
                    let e = (k[t * d + x] - kk[t * d + x]).abs();
                    assert!(
                        e <= step / 2.0 * 1.0001 + 1e-6,
                        "bits {bits} K[{t},{x}]: error {e} > half step {}",
                        step / 2.0
                    );
                    worst = worst.max(e / (hi - lo).max(1e-30));
                }
            }
            // V: per token over groups of channels.
            for t in 0..n {
                for g0 in (0..d).step_by(group) {
                    let ch = &v[t * d + g0..][..group];
                    let (lo, hi) = ch
                        .iter()
                        .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &y| {
                            (a.min(y), b.max(y))
                        });
                    let step = (hi - lo) / levels;
                    for x in g0..g0 + group {
                        let e = (v[t * d + x] - vv[t * d + x]).abs();
                        assert!(
                            e <= step / 2.0 * 1.0001 + 1e-6,
                            "bits {bits} V[{t},{x}]: error {e} > half step {}",
                            step / 2.0
                        );
                    }
                }
            }
            // The bound is reached in order of magnitude (codes really round, not truncate).
            if n >= 7 {
                assert!(worst > 0.1 / levels, "bits {bits}: suspiciously exact");
            }
        }
    }
}

/// The f64 oracle of `q` over one layer of a cache whose heads hold every position in order
/// (quantized entries dequantized by gather_head), under `bound`.
fn oracle_over_cache(
    cache: &PagedKvCache,
    id: SeqId,
    layer: usize,
    q: &TensorView,
    bound: &crate::mask::BoundMask,
) -> crate::reference::RefOutput {
    let c = cache.config();
    let (hk, d, dv, len) = (c.kv_heads, c.head_dim, c.v_dim, cache.len(id).unwrap());
    let (kf, vf) = crate::kv::tests::dense_kv(cache, id, layer);
    let kt = TensorView::contiguous(&kf[..], [1, len, hk, d]).unwrap();
    let vt = TensorView::contiguous(&vf[..], [1, len, hk, dv]).unwrap();
    let allowed = |b: usize, _h: usize, i: usize, j: usize| bound.allowed(b, i, j);
    attention_f64(q, &kt, &vt, &AttnParams::default(), &allowed).unwrap()
}

/// Attention of the last `sq` positions over a quantized cache against the oracle over the
/// dequantized entries (gather_head), causal mask, per layer.
fn check_attend(len: usize, sq: usize, hq: usize, hk: usize, k: Kivi, page: usize) {
    let d = 32;
    let mut rng = Rng::new((len * 31 + sq * 7 + hq + k.bits as usize) as u64);
    let (mut cache, id, _) = filled(len, hk, d, page, &mut rng);
    let quantized = cache.quantize(id, &k).unwrap();
    let expect = if len >= k.residual + k.group {
        (len - k.residual) / k.group * k.group * 2 * hk
    } else {
        0
    };
    assert_eq!(quantized, expect, "len {len}: entries quantized");
    let sq = sq.min(len);
    let expr = MaskExpr::parse("causal").unwrap();
    let bound = expr
        .bind(
            MaskShape {
                batch: 1,
                sq,
                sk: len,
            },
            None,
        )
        .unwrap();
    for l in 0..2 {
        let qd = randn(sq * hq * d, &mut rng);
        let q = TensorView::contiguous(&qd[..], [1, sq, hq, d]).unwrap();
        let got = cache
            .attend(id, l, &q, Some(&expr), &AttnParams::default())
            .unwrap();
        let r = oracle_over_cache(&cache, id, l, &q, &bound);
        let (eo, el) = compare(&got.out, &got.lse, &r);
        assert!(
            eo <= out_tolerance(DType::F32) && el <= LSE_TOLERANCE,
            "{k} len {len} sq {sq} hq {hq} hk {hk} layer {l}: out err {eo:.2e}, lse err {el:.2e}"
        );
        if sq == 1 {
            // The decode entry point takes the same path.
            let dec = cache
                .decode(&[id], l, &q, &crate::kv::decode::DecodeParams::default())
                .unwrap();
            let (eo, el) = compare(&dec.out, &dec.lse, &r);
            assert!(eo <= out_tolerance(DType::F32) && el <= LSE_TOLERANCE);
        }
    }
}

#[test]
fn attention_over_quantized_cache_matches_oracle_on_dequantized_entries() {
    for &len in &LENS {
        for bits in [4, 2] {
            check_attend(len, 1, 6, 2, kivi(bits, 8, 0), 16);
            check_attend(len, 5, 4, 4, kivi(bits, 16, 16), 64);
        }
    }
    check_attend(1023, 17, 6, 3, kivi(4, 32, 32), 64);
}

#[test]
fn quantized_attention_stays_close_to_the_full_cache() {
    // Sanity of the quantization itself: int4 is closer to the full-precision result than int2.
    let (len, hq, hk, d) = (200, 4, 2, 32);
    let mut errs = Vec::new();
    for bits in [4, 2] {
        let mut rng = Rng::new(77);
        let (mut cache, id, _) = filled(len, hk, d, 16, &mut rng);
        let qd = randn(hq * d, &mut rng);
        let q = TensorView::contiguous(&qd[..], [1, 1, hq, d]).unwrap();
        let full = cache
            .attend(id, 0, &q, None, &AttnParams::default())
            .unwrap();
        cache.quantize(id, &kivi(bits, 32, 0)).unwrap();
        let got = cache
            .attend(id, 0, &q, None, &AttnParams::default())
            .unwrap();
        let (a, b) = (full.out.data.to_f32_vec(), got.out.data.to_f32_vec());
        let e = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0f32, f32::max);
        errs.push(e);
    }
    assert!(
        errs[0] > 0.0 && errs[0] < errs[1],
        "int4 / int2 errors {errs:?}"
    );
}

#[test]
fn bits_16_is_the_full_cache_bit_for_bit() {
    let mut rng = Rng::new(5);
    let (mut cache, id, _) = filled(113, 2, 32, 16, &mut rng);
    let qd = randn(3 * 4 * 32, &mut rng);
    let q = TensorView::contiguous(&qd[..], [1, 3, 4, 32]).unwrap();
    let expr = MaskExpr::parse("causal").unwrap();
    let before = cache
        .attend(id, 1, &q, Some(&expr), &AttnParams::default())
        .unwrap();
    let mem = cache.memory();
    assert_eq!(
        cache
            .quantize(id, &Kivi::parse("kivi(bits=16)").unwrap())
            .unwrap(),
        0
    );
    let after = cache
        .attend(id, 1, &q, Some(&expr), &AttnParams::default())
        .unwrap();
    assert_eq!(before.out.data.to_f32_vec(), after.out.data.to_f32_vec());
    assert_eq!(before.lse, after.lse);
    assert_eq!(mem, cache.memory());
}

#[test]
fn memory_counts_packed_bytes_and_scales_and_frees_pages() {
    let (hk, d, page) = (2, 32, 16);
    for bits in [4u32, 2] {
        let mut rng = Rng::new(9);
        let (mut cache, id, _) = filled(113, hk, d, page, &mut rng);
        let before = cache.memory();
        let k = kivi(bits, 8, 5);
        cache.quantize(id, &k).unwrap();
        let m = cache.memory();
        // Per head: 113 - 5 = 108 -> 13 groups of 8 = 104 quantized, 9 in the residual.
        let (nq, nr, groups) = (104, 9usize, 13);
        let row = d * bits as usize / 8;
        let per_head = nq * 2 * row + groups * 2 * d * 4 + nq * (d / 8) * 2 * 4;
        let heads = 2 * hk;
        assert_eq!(m.bytes_quantized, heads * per_head);
        assert_eq!(m.pages_in_use, heads * nr.div_ceil(page));
        assert_eq!(
            m.bytes_in_use,
            m.pages_in_use * page * 2 * d * 4 + heads * per_head
        );
        assert_eq!(m.bytes_entries, heads * nr * 2 * d * 4 + heads * per_head);
        assert_eq!(m.bytes_full, before.bytes_full);
        assert!(
            m.bytes_in_use * 2 < before.bytes_in_use,
            "{m:?} vs {before:?}"
        );
        for kh in 0..hk {
            assert_eq!(cache.head_len(id, 0, kh).unwrap(), 113);
            assert_eq!(cache.head_quantized(id, 0, kh).unwrap(), nq);
        }
    }
}

#[test]
fn eviction_after_quantization_keeps_the_kept_entries_values() {
    let (hk, d) = (2, 32);
    let mut rng = Rng::new(21);
    let (mut cache, id, _) = filled(150, hk, d, 16, &mut rng);
    cache.quantize(id, &kivi(4, 8, 8)).unwrap();
    let (k0, v0, p0) = cache.gather_head(id, 1, 1).unwrap();
    // Keep a scattered set across both parts: whole groups dropped, groups cut, residual cut.
    let keep: Vec<usize> = (0..150)
        .filter(|&e| !(8..16).contains(&e) && (e % 3 != 1 || e > 140))
        .collect();
    cache.compress(id, 1, 1, &keep).unwrap();
    let (k1, v1, p1) = cache.gather_head(id, 1, 1).unwrap();
    assert_eq!(p1.len(), keep.len());
    for (i, &e) in keep.iter().enumerate() {
        assert_eq!(p1[i], p0[e]);
        assert_eq!(k1[i * d..][..d], k0[e * d..][..d], "K of entry {e}");
        assert_eq!(v1[i * d..][..d], v0[e * d..][..d], "V of entry {e}");
    }
    // Attention over the compacted head against the oracle over its (dequantized) entries.
    let qd = randn(2 * d, &mut rng);
    let q = TensorView::contiguous(&qd[..], [1, 1, 2, d]).unwrap();
    let got = cache
        .attend(id, 1, &q, None, &AttnParams::default())
        .unwrap();
    let n = keep.len();
    let kt = TensorView::contiguous(&k1[..], [1, n, 1, d]).unwrap();
    let vt = TensorView::contiguous(&v1[..], [1, n, 1, d]).unwrap();
    let r = attention_f64(&q, &kt, &vt, &AttnParams::default(), &|_, _, _, _| true).unwrap();
    // The cache has one query head per KV head: query head 1 reads the compacted KV head 1.
    let out = got.out.data.to_f32_vec();
    let scale = r.out[d..].iter().fold(0.0f64, |a, &x| a.max(x.abs()));
    for x in 0..d {
        let e = (out[d + x] as f64 - r.out[d + x]).abs() / scale;
        assert!(e <= out_tolerance(DType::F32), "out[{x}] err {e:.2e}");
    }
    assert!((got.lse[1] as f64 - r.lse[1]).abs() <= LSE_TOLERANCE);
}

#[test]
fn bad_input_is_refused_with_a_clear_error() {
    for (spec, needle) in [
        ("kivi(bits=3)", "bits must be 2 or 4"),
        ("kivi(bits=8)", "bits must be 2 or 4"),
        ("kivi(bits=4,group=0)", "group must be >= 1"),
        ("kivi(bits=4,size=3)", "unknown argument `size`"),
        ("kivi(bits=4.5)", "non-negative integer"),
    ] {
        let e = Kivi::parse(spec).unwrap_err().to_string();
        assert!(e.contains(needle), "{spec}: {e}");
    }
    let mut rng = Rng::new(3);
    let (mut cache, id, _) = filled(40, 1, 24, 16, &mut rng);
    let mem = cache.memory();
    let e = cache.quantize(id, &kivi(4, 32, 0)).unwrap_err().to_string();
    assert!(e.contains("not divisible by the group 32"), "{e}");
    assert_eq!(
        mem,
        cache.memory(),
        "a refused quantization changes nothing"
    );
    cache.quantize(id, &kivi(4, 8, 0)).unwrap();
    let e = cache.quantize(id, &kivi(2, 8, 0)).unwrap_err().to_string();
    assert!(e.contains("in groups of 8 at bits [4"), "{e}");
    let mem = cache.memory();
    let e = cache.quantize(id, &kivi(4, 4, 0)).unwrap_err().to_string();
    assert!(e.contains("in groups of 8"), "{e}");
    assert_eq!(
        mem,
        cache.memory(),
        "a refused quantization changes nothing"
    );
}

#[test]
fn specs_compose_with_plus() {
    let s = KvSpec::parse("snapkv(budget=0.2) + kivi(bits=4)").unwrap();
    assert!(s.evict.is_some());
    assert_eq!(s.kivi, Some(kivi(4, 32, 32)));
    assert_eq!(
        s.to_string(),
        "snapkv(budget=0.2,window=32,kernel=5)+kivi(bits=4,group=32,residual=32)"
    );
    assert_eq!(KvSpec::parse(&s.to_string()).unwrap(), s);
    let qe = KvSpec::parse("h2o(budget=0.5)+quest(budget=0.2,page=16)").unwrap();
    assert!(qe.quest.is_some() && qe.evict.is_some() && qe.kivi.is_none());
    assert_eq!(KvSpec::parse(&qe.to_string()).unwrap(), qe);
    let all = KvSpec::parse("snapkv(budget=0.5)+kivi(bits=4)+quest(budget=0.2)").unwrap();
    assert!(all.quest.is_some() && all.evict.is_some() && all.kivi.is_some());
    assert_eq!(KvSpec::parse(&all.to_string()).unwrap(), all);
    let qk = KvSpec::parse("quest(budget=0.2,page=16)+kivi(bits=4)").unwrap();
    assert!(qk.quest.is_some() && qk.kivi.is_some() && qk.evict.is_none());
    assert_eq!(KvSpec::parse(&qk.to_string()).unwrap(), qk);
    for (spec, needle) in [
        ("kivi(bits=4)+kivi(bits=2)", "more than one quantization"),
        ("h2o(budget=0.2)+tova(budget=0.2)", "more than one eviction"),
        ("quest(budget=0.2)+h2o(budget=0.5)+merge", "no `merge`"),
        ("h2o(budget=0.2)+", "empty policy"),
        ("zip(bits=4)", "unknown press `zip`"),
    ] {
        let e = KvSpec::parse(spec).unwrap_err().to_string();
        assert!(e.contains(needle), "{spec}: {e}");
    }
}

/// The important set against its definition on random weights: it holds `mass` of the total,
/// every important unit weighs at least as much as every other, and it is the fewest such units
/// (up to ties with the last one taken).
#[test]
fn important_units_follow_their_definition() {
    let mut rng = Rng::new(77);
    for &n in &[1usize, 7, 63, 65, 113] {
        // Heavy-tailed weights, some exactly 0.
        let a: Vec<f64> = (0..n)
            .map(|e| {
                if e % 5 == 3 {
                    0.0
                } else {
                    (3.0 * rng.normal()).exp()
                }
            })
            .collect();
        for &mass in &[0.1f32, 0.5, 0.9, 0.99] {
            let imp = important_set(&a, mass);
            let total: f64 = a.iter().sum();
            let held: f64 = (0..n).filter(|&e| imp[e]).map(|e| a[e]).sum();
            assert!(
                held >= mass as f64 * total * (1.0 - 1e-12),
                "n {n} mass {mass}"
            );
            let lo_in = (0..n)
                .filter(|&e| imp[e])
                .map(|e| a[e])
                .fold(f64::INFINITY, f64::min);
            let hi_out = (0..n)
                .filter(|&e| !imp[e])
                .map(|e| a[e])
                .fold(0.0, f64::max);
            assert!(lo_in >= hi_out, "n {n} mass {mass}: {lo_in} < {hi_out}");
            let above: f64 = (0..n).filter(|&e| a[e] > lo_in).map(|e| a[e]).sum();
            assert!(
                above < mass as f64 * total,
                "n {n} mass {mass}: not the fewest"
            );
        }
    }
    // Nothing observed yet: nothing important; mass 1: everything.
    assert_eq!(important_set(&[0.0, 0.0], 0.9), vec![false, false]);
    assert_eq!(important_set(&[0.0, 0.0], 1.0), vec![true, true]);
}

/// A2SF(0.95) scores of every head of `cache` where the entries of `hot` hold most of the
/// importance and the rest is spread evenly.
fn scores_with_hot_entries(cache: &PagedKvCache, id: SeqId, hot: &[usize]) -> KvScores {
    let params = ScoreParams {
        scale: None,
        softcap: None,
        reduce: Reduce::Mean,
    };
    let mut s = KvScores::new(cache, ScoreKind::A2sf(0.95), params).unwrap();
    let c = cache.config();
    for l in 0..c.layers {
        for kh in 0..c.kv_heads {
            let n = cache.head_len(id, l, kh).unwrap();
            s.scores[l * c.kv_heads + kh] = (0..n)
                .map(|e| if hot.contains(&e) { 10.0 } else { 0.01 })
                .collect();
        }
    }
    s
}

#[test]
fn zipvl_gives_the_high_width_to_groups_with_important_entries() {
    let (hk, d, len) = (2, 32, 150);
    let mut rng = Rng::new(31);
    let (mut cache, id, full) = filled(len, hk, d, 16, &mut rng);
    // Entry 20 holds 10 / (10 + 149 x 0.01) = 87% of each head's importance: with mass 0.5 its
    // group (entries 16..24) alone is important and takes 4 bits, the rest 2.
    let z = zipvl(2, 4, 0.5, 8, 8);
    assert_eq!(z.mixed.unwrap().f, 0.95);
    let s = scores_with_hot_entries(&cache, id, &[20]);
    let e = cache.quantize(id, &z).unwrap_err().to_string();
    assert!(e.contains("no scores were given"), "{e}");
    let n = cache.quantize_scored(id, &z, Some(&s)).unwrap();
    // Per head: 150 - 8 = 142 -> 17 groups of 8 = 136 quantized.
    assert_eq!(n, 136 * 2 * hk);
    let heads = 2 * hk;
    assert_eq!(
        cache.quantized_by_bits(id).unwrap(),
        vec![(2, 128 * heads), (4, 8 * heads)]
    );
    // Each entry within half a step of its group's width: the 4-bit group is ~5x closer.
    let mut worst = [0.0f32; 2];
    for (l, (kl, _)) in full.iter().enumerate() {
        for kh in 0..hk {
            let (k, _, pos) = cache.gather_head(id, l, kh).unwrap();
            assert_eq!(pos.len(), len);
            for e in 0..136 {
                let hot = (16..24).contains(&e) as usize;
                for x in 0..d {
                    let err = (k[e * d + x] - kl[(e * hk + kh) * d + x]).abs();
                    worst[hot] = worst[hot].max(err);
                }
            }
        }
    }
    assert!(
        worst[1] * 3.0 < worst[0],
        "4-bit / 2-bit worst errors {worst:?}"
    );
    // Attention over the mixed cache against the oracle over its dequantized entries.
    let qd = randn(3 * 4 * d, &mut rng);
    let q = TensorView::contiguous(&qd[..], [1, 3, 4, d]).unwrap();
    let expr = MaskExpr::parse("causal").unwrap();
    let bound = expr
        .bind(
            MaskShape {
                batch: 1,
                sq: 3,
                sk: len,
            },
            None,
        )
        .unwrap();
    let got = cache
        .attend(id, 1, &q, Some(&expr), &AttnParams::default())
        .unwrap();
    let r = oracle_over_cache(&cache, id, 1, &q, &bound);
    let (eo, el) = compare(&got.out, &got.lse, &r);
    assert!(
        eo <= out_tolerance(DType::F32) && el <= LSE_TOLERANCE,
        "out {eo:.2e} lse {el:.2e}"
    );
    // Eviction across mixed groups keeps the kept entries' values (and their widths).
    let (k0, v0, p0) = cache.gather_head(id, 0, 1).unwrap();
    let keep: Vec<usize> = (0..len).filter(|&e| e % 3 != 0 || e == 21).collect();
    cache.compress(id, 0, 1, &keep).unwrap();
    let (k1, v1, p1) = cache.gather_head(id, 0, 1).unwrap();
    for (i, &e) in keep.iter().enumerate() {
        assert_eq!(
            (p1[i], &k1[i * d..][..d], &v1[i * d..][..d]),
            (p0[e], &k0[e * d..][..d], &v0[e * d..][..d])
        );
    }
    // Plain KIVI at the low width cannot extend heads that hold 4-bit groups.
    let mem = cache.memory();
    let e = cache.quantize(id, &kivi(2, 8, 8)).unwrap_err().to_string();
    assert!(e.contains("at bits [2, 2, 4"), "{e}");
    assert_eq!(mem, cache.memory());
}

#[test]
fn zipvl_specs_parse_print_and_refuse_bad_input() {
    let s = KvSpec::parse("a2sf(budget=0.5,f=0.95) + zipvl(lo=2,hi=8,mass=0.8)").unwrap();
    assert_eq!(s.kivi, Some(zipvl(2, 8, 0.8, 32, 32)));
    assert_eq!(
        s.to_string(),
        "a2sf(budget=0.5,f=0.95)+zipvl(lo=2,hi=8,mass=0.8,f=0.95,group=32,residual=32)"
    );
    assert_eq!(KvSpec::parse(&s.to_string()).unwrap(), s);
    assert_eq!(Kivi::parse("zipvl").unwrap(), zipvl(2, 4, 0.9, 32, 32));
    for (spec, needle) in [
        ("zipvl(lo=4,hi=4)", "hi must be 4 or 8 and more than lo"),
        ("zipvl(hi=16)", "hi must be 4 or 8"),
        ("zipvl(lo=8,hi=8)", "lo must be 2 or 4"),
        ("zipvl(mass=0)", "mass must be in (0, 1]"),
        ("zipvl(mass=1.5)", "mass must be in (0, 1]"),
        ("zipvl(f=1)", "f must be in [0, 1)"),
        ("zipvl(bits=4)", "unknown argument `bits`"),
    ] {
        let e = Kivi::parse(spec).unwrap_err().to_string();
        assert!(e.contains(needle), "{spec}: {e}");
    }
    for (spec, needle) in [
        ("zipvl()+kivi(bits=4)", "more than one quantization"),
        ("snapkv(budget=0.2)+zipvl()", "by their recent attention"),
        ("h2o(budget=0.2)+zipvl()", "by their recent attention"),
        (
            "a2sf(budget=0.2,f=0.9)+zipvl()",
            "by their recent attention",
        ),
    ] {
        let e = KvSpec::parse(spec).unwrap_err().to_string();
        assert!(e.contains(needle), "{spec}: {e}");
    }
    for ok in [
        "streaming(sinks=4,window=60)+zipvl()",
        "knorm(budget=0.3)+zipvl()",
        "a2sf(budget=0.2,f=0.9)+zipvl(f=0.9)",
    ] {
        KvSpec::parse(ok).unwrap();
    }
}

/// A high-width group that is no longer important is re-quantized to the low width from its
/// dequantized values (error within half a low step plus half a high step of the original), a
/// newly important one takes the high width, and nothing else moves.
#[test]
fn zipvl_demotes_groups_that_lose_their_importance() {
    let (hk, d) = (1, 32);
    let mut rng = Rng::new(41);
    let (mut cache, id, mut full) = filled(100, hk, d, 16, &mut rng);
    let z = zipvl(2, 4, 0.5, 8, 8);
    let s = scores_with_hot_entries(&cache, id, &[20]);
    cache.quantize_scored(id, &z, Some(&s)).unwrap();
    // 100 - 8 = 92 -> 11 groups of 8 = 88 quantized; group 2 (entries 16..24) at 4 bits.
    assert_eq!(
        cache.quantized_by_bits(id).unwrap(),
        vec![(2, 80 * 2), (4, 8 * 2)]
    );
    let (k_before, v_before, _) = cache.gather_head(id, 0, 0).unwrap();
    // 40 more positions; now entry 100 is the hot one.
    for _ in 0..4 {
        append_random(&mut cache, id, 10, &mut rng, &mut full);
    }
    let s = scores_with_hot_entries(&cache, id, &[100]);
    cache.quantize_scored(id, &z, Some(&s)).unwrap();
    // 140 - 8 = 132 -> 16 groups = 128 quantized: group 12 (96..104) at 4 bits, group 2 demoted.
    assert_eq!(
        cache.quantized_by_bits(id).unwrap(),
        vec![(2, 120 * 2), (4, 8 * 2)]
    );
    let (k_after, v_after, pos) = cache.gather_head(id, 0, 0).unwrap();
    assert_eq!(pos, (0..140).collect::<Vec<u32>>());
    let (k0, v0) = (&full[0].0, &full[0].1);
    for e in 0..88 {
        let demoted = (16..24).contains(&e);
        for x in 0..d {
            let (kb, ka, vb, va) = (
                k_before[e * d + x],
                k_after[e * d + x],
                v_before[e * d + x],
                v_after[e * d + x],
            );
            if !demoted {
                assert_eq!((ka, va), (kb, vb), "entry {e}: a kept group moved");
                continue;
            }
            // The bound over a quantization group whose elements sit at `at` (K: channel x of
            // the group's entries; V: the entry's channel group): half a 2-bit step over the
            // 4-bit values plus half a 4-bit step over the original ones.
            let bound = |orig: &[f32], before: &[f32], at: &[usize]| {
                let span = |src: &[f32]| {
                    let (lo, hi) = at
                        .iter()
                        .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &i| {
                            (a.min(src[i]), b.max(src[i]))
                        });
                    hi - lo
                };
                span(before) / 3.0 / 2.0 + span(orig) / 15.0 / 2.0
            };
            let kat: Vec<usize> = (16..24).map(|t| t * d + x).collect();
            assert!(
                (ka - k0[e * d + x]).abs() <= bound(k0, &k_before, &kat) * 1.0001 + 1e-6,
                "K entry {e} ch {x}"
            );
            let g0 = x / 8 * 8;
            let vat: Vec<usize> = (g0..g0 + 8).map(|c| e * d + c).collect();
            assert!(
                (va - v0[e * d + x]).abs() <= bound(v0, &v_before, &vat) * 1.0001 + 1e-6,
                "V entry {e} ch {x}"
            );
        }
    }
}
