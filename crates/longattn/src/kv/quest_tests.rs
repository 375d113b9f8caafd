//! Quest: the page bound is an upper bound, running bounds equal recomputed ones, the selection
//! against its reference, the selected keys attended exactly (f64 oracle), budget >= length is
//! the full cache bit for bit, bad input.
use super::*;
use crate::kv::KvConfig;
use crate::mask::MaskShape;
use crate::reference::attention_f64;
use crate::testing::{compare, out_tolerance, Rng, LSE_TOLERANCE};
use crate::DType;

const LENS: [usize; 6] = [1, 7, 63, 65, 113, 1023];

fn randn(n: usize, rng: &mut Rng) -> Vec<f32> {
    (0..n).map(|_| rng.normal() as f32).collect()
}

#[test]
fn page_bound_is_an_upper_bound_of_every_key() {
    let mut rng = Rng::new(160);
    for case in 0..400 {
        let d = 1 + rng.below(40);
        let page = 1 + rng.below(20);
        let n = 1 + rng.below(3 * page);
        // Keys with a per-case offset and scale so signs and magnitudes vary.
        let (off, sc) = (rng.normal() as f32, 0.1 + 3.0 * rng.uniform() as f32);
        let keys: Vec<f32> = randn(n * d, &mut rng)
            .iter()
            .map(|x| off + sc * x)
            .collect();
        let q = randn(d, &mut rng);
        let mut b = PageBounds::new(page, d);
        // Appended in uneven pieces.
        let mut at = 0;
        while at < n {
            let m = (1 + rng.below(5)).min(n - at);
            b.append(&keys[at * d..(at + m) * d]);
            at += m;
        }
        assert_eq!((b.len(), b.pages()), (n, n.div_ceil(page)));
        for pg in 0..b.pages() {
            let bound = b.bound(&q, pg) as f64;
            let mut best = f64::NEG_INFINITY;
            for j in pg * page..((pg + 1) * page).min(n) {
                let dot: f64 = (0..d).map(|x| q[x] as f64 * keys[j * d + x] as f64).sum();
                best = best.max(dot);
                assert!(
                    bound >= dot - 1e-4 * (1.0 + dot.abs()),
                    "case {case} page {pg} key {j}: bound {bound} < q.k {dot}"
                );
            }
            // A page of one key: the bound is its q . k.
            if ((pg + 1) * page).min(n) - pg * page == 1 {
                assert!((bound - best).abs() <= 1e-4 * (1.0 + best.abs()));
            }
        }
    }
}

#[test]
fn selection_matches_its_reference() {
    let mut rng = Rng::new(161);
    for &len in &LENS {
        for &(budget, page) in &[(0.2, 16), (0.5, 7), (0.1, 1), (0.05, 64)] {
            let quest = Quest { budget, page };
            let d = 16;
            let keys = randn(len * d, &mut rng);
            let q = randn(d, &mut rng);
            let mut b = PageBounds::new(page, d);
            b.append(&keys);
            for at in [0, len / 2, len - 1] {
                let cur = at / page;
                let bounds: Vec<f32> = (0..cur).map(|pg| b.bound(&q, pg)).collect();
                let got = select_pages(&quest, &bounds, at);
                let want = select_reference(&quest, &keys, d, &q, at);
                assert_eq!(got, want, "len {len} at {at} budget {budget} page {page}");
                assert_eq!(got.len(), quest.pages_for(at).min(cur + 1));
                assert_eq!(got.last(), Some(&cur), "the page being filled is attended");
            }
        }
    }
}

/// Two sequences filled in interleaved chunks (their pages alternate: several runs per head);
/// returns the cache, the first sequence and its K / V per layer `[len, Hk, D]`.
fn filled(
    len: usize,
    hk: usize,
    d: usize,
    page: usize,
    rng: &mut Rng,
) -> (PagedKvCache, SeqId, Vec<f32>, Vec<f32>) {
    let cfg = KvConfig {
        layers: 1,
        kv_heads: hk,
        head_dim: d,
        v_dim: d,
        page_size: page,
    };
    let mut cache = PagedKvCache::new(cfg).unwrap();
    let ids = [cache.add_sequence(), cache.add_sequence()];
    let (mut fk, mut fv) = (Vec::new(), Vec::new());
    let mut done = 0;
    while done < len {
        let n = 37.min(len - done);
        for (s, &id) in ids.iter().enumerate() {
            let (k, v) = (randn(n * hk * d, rng), randn(n * hk * d, rng));
            cache.append(id, &[(&k[..], &v[..])]).unwrap();
            if s == 0 {
                fk.extend(k);
                fv.extend(v);
            }
        }
        done += n;
    }
    (cache, ids[0], fk, fv)
}

/// Compares `got` (attention of the queries `qd` `[1, Sq, Hq, D]` at the last Sq of `len`
/// positions) with the f64 oracle over `kt` / `vt` `[len, Hk, D]` under causal & the reference
/// selection of each (query head, row), selected from the full-precision keys `fk`.
#[allow(clippy::too_many_arguments)]
fn assert_selected_oracle(
    what: &str,
    got: &AttnOutput,
    quest: &Quest,
    fk: &[f32],
    kt: &[f32],
    vt: &[f32],
    qd: &[f32],
    [len, sq, hq, hk, d]: [usize; 5],
) {
    let g = hq / hk;
    let mut sel = vec![Vec::new(); hq * sq];
    for h in 0..hq {
        let kh = h / g;
        let keys: Vec<f32> = (0..len)
            .flat_map(|j| fk[(j * hk + kh) * d..][..d].to_vec())
            .collect();
        for i in 0..sq {
            let qv: Vec<f32> = (0..d).map(|x| qd[(i * hq + h) * d + x]).collect();
            sel[h * sq + i] = select_reference(quest, &keys, d, &qv, len - sq + i);
        }
    }
    if len >= 113 {
        let narrowed = (0..hq * sq).any(|t| sel[t].len() * quest.page < len - sq + t % sq);
        assert!(narrowed, "{what}: every query attended every page");
    }
    let bound = MaskExpr::parse("causal")
        .unwrap()
        .bind(
            MaskShape {
                batch: 1,
                sq,
                sk: len,
            },
            None,
        )
        .unwrap();
    let allowed = |b: usize, h: usize, i: usize, j: usize| {
        bound.allowed(b, i, j) && sel[h * sq + i].contains(&(j / quest.page))
    };
    let q = TensorView::contiguous(qd, [1, sq, hq, d]).unwrap();
    let k = TensorView::contiguous(kt, [1, len, hk, d]).unwrap();
    let v = TensorView::contiguous(vt, [1, len, hk, d]).unwrap();
    let r = attention_f64(&q, &k, &v, &AttnParams::default(), &allowed).unwrap();
    let (eo, el) = compare(&got.out, &got.lse, &r);
    assert!(
        eo <= out_tolerance(DType::F32) && el <= LSE_TOLERANCE,
        "{what}: out err {eo:.2e}, lse err {el:.2e}"
    );
}

/// Random queries `[1, Sq, Hq, D]` at the last Sq positions and their attention through `index`
/// under causal.
fn attend_random(
    index: &QuestIndex,
    cache: &PagedKvCache,
    id: SeqId,
    [sq, hq, d]: [usize; 3],
    rng: &mut Rng,
) -> (Vec<f32>, AttnOutput) {
    let qd = randn(sq * hq * d, rng);
    let q = TensorView::contiguous(&qd[..], [1, sq, hq, d]).unwrap();
    let expr = MaskExpr::parse("causal").unwrap();
    let got = index
        .attend(cache, id, 0, &q, Some(&expr), &AttnParams::default())
        .unwrap();
    (qd, got)
}

fn check(len: usize, sq: usize, hq: usize, hk: usize, quest: Quest, page: usize) {
    let d = 32;
    let mut rng = Rng::new((len * 13 + sq * 5 + hq + page) as u64);
    let (cache, id, fk, fv) = filled(len, hk, d, page, &mut rng);
    let mut index = QuestIndex::new(quest, &cache).unwrap();
    index.update(&cache, id, 0).unwrap();
    let sq = sq.min(len);
    let (qd, got) = attend_random(&index, &cache, id, [sq, hq, d], &mut rng);
    assert_selected_oracle(
        &format!("{quest} len {len} sq {sq} hq {hq} hk {hk} page {page}"),
        &got,
        &quest,
        &fk,
        &fk,
        &fv,
        &qd,
        [len, sq, hq, hk, d],
    );
}

#[test]
fn selected_pages_are_attended_exactly() {
    for &len in &LENS {
        check(
            len,
            1,
            6,
            2,
            Quest {
                budget: 0.2,
                page: 16,
            },
            16,
        );
        check(
            len,
            5,
            4,
            4,
            Quest {
                budget: 0.3,
                page: 7,
            },
            64,
        );
    }
    check(
        1023,
        9,
        6,
        3,
        Quest {
            budget: 0.1,
            page: 32,
        },
        32,
    );
}

#[test]
fn budget_at_least_the_length_is_the_full_cache_bit_for_bit() {
    for &len in &LENS {
        let mut rng = Rng::new(len as u64);
        let (cache, id, _, _) = filled(len, 2, 32, 16, &mut rng);
        let sq = 3.min(len);
        let qd = randn(sq * 6 * 32, &mut rng);
        let q = TensorView::contiguous(&qd[..], [1, sq, 6, 32]).unwrap();
        let expr = MaskExpr::parse("causal").unwrap();
        let params = AttnParams::default();
        let full = cache.attend(id, 0, &q, Some(&expr), &params).unwrap();
        for page in [1, 16, 100] {
            let quest = Quest { budget: 1.0, page };
            let mut index = QuestIndex::new(quest, &cache).unwrap();
            index.update(&cache, id, 0).unwrap();
            let got = index
                .attend(&cache, id, 0, &q, Some(&expr), &params)
                .unwrap();
            assert_eq!(got.out.data.to_f32_vec(), full.out.data.to_f32_vec());
            assert_eq!(got.lse, full.lse);
        }
    }
}

#[test]
fn bad_input_is_refused_with_a_clear_error() {
    for (spec, needle) in [
        ("quest(budget=0)", "budget 0 outside (0, 1]"),
        ("quest(budget=1.5,page=16)", "outside (0, 1]"),
        ("quest(budget=0.2,page=0)", "page must be >= 1"),
        ("quest(page=16)", "argument `budget` is required"),
        ("quest(budget=0.2,pages=3)", "unknown argument `pages`"),
    ] {
        let e = Quest::parse(spec).unwrap_err().to_string();
        assert!(e.contains(needle), "{spec}: {e}");
    }
    // A selection made before a compression is refused until the index is updated.
    let mut rng = Rng::new(4);
    let (mut cache, id, _, _) = filled(40, 1, 32, 16, &mut rng);
    let mut index = QuestIndex::new(
        Quest {
            budget: 0.2,
            page: 8,
        },
        &cache,
    )
    .unwrap();
    index.update(&cache, id, 0).unwrap();
    let keep: Vec<usize> = (0..40).step_by(2).collect();
    cache.compress(id, 0, 0, &keep).unwrap();
    let qd = randn(32, &mut rng);
    let q = TensorView::contiguous(&qd[..], [1, 1, 1, 32]).unwrap();
    let e = index.select(&cache, id, 0, &q).err().unwrap().to_string();
    assert!(e.contains("update first"), "{e}");
    index.update(&cache, id, 0).unwrap();
    assert!(index.select(&cache, id, 0, &q).is_ok());
}

/// Quest over heads an eviction press compacted (each KV head its own kept set): the pages are
/// runs of kept entries, rebuilt after the compression; every (query head, row) selects what the
/// reference selects from the kept keys of the positions it sees, the selected entries are
/// attended exactly (f64 oracle over the kept entries), and budget 1 is the compacted cache's
/// plain attention bit for bit. The press's scores under the selection match their reference
/// with the same selection and give 0 to what no query attended.
#[test]
fn quest_over_evicted_heads() {
    use crate::kv::score::{
        column_scores, column_scores_reference, Observation, Reduce, ScoreParams,
    };
    // (len, sq, hq, hk, page, KIVI bits after the compression: 0 = none)
    for &(len, sq, hq, hk, page, bits) in &[
        (113, 1, 4, 2, 4, 0),
        (300, 7, 4, 1, 8, 0),
        (1023, 3, 2, 2, 16, 0),
        (300, 7, 4, 2, 8, 4),
        (700, 1, 2, 1, 16, 2),
    ] {
        let d = 32;
        let mut rng = Rng::new((len * 7 + sq) as u64);
        let (mut cache, id, _, _) = filled(len, hk, d, 16, &mut rng);
        let quest = Quest { budget: 0.25, page };
        let mut index = QuestIndex::new(quest, &cache).unwrap();
        index.update(&cache, id, 0).unwrap();
        // Each KV head keeps its own subset (the newest Sq positions always).
        for kh in 0..hk {
            let keep: Vec<usize> = (0..len)
                .filter(|&e| e >= len - sq || (e * (3 + kh) + kh) % 5 < 2)
                .collect();
            cache.compress(id, 0, kh, &keep).unwrap();
        }
        if bits > 0 {
            // Then KIVI: the head's oldest kept entries in whole groups; the rebuilt bounds
            // read them dequantized, as they are attended.
            let kivi = crate::kv::kivi::Kivi {
                bits,
                group: 32,
                residual: 32,
                mixed: None,
            };
            cache.quantize(id, &kivi).unwrap();
            assert!(cache.head_quantized(id, 0, 0).unwrap() > 0);
        }
        index.update(&cache, id, 0).unwrap();
        let qd = randn(sq * hq * d, &mut rng);
        let q = TensorView::contiguous(&qd[..], [1, sq, hq, d]).unwrap();
        let expr = MaskExpr::parse("causal").unwrap();
        let params = AttnParams::default();
        let sel = index.select(&cache, id, 0, &q).unwrap();
        assert!(!sel.whole, "len {len}: every query attended every page");
        let got = index
            .attend_selection(&cache, id, 0, &q, Some(&expr), &params, &sel)
            .unwrap();
        let select = index.selector(&sel, &cache, 0);
        let g = hq / hk;
        for kh in 0..hk {
            let (k, v, pos) = cache.gather_head(id, 0, kh).unwrap();
            let n = pos.len();
            for gi in 0..g {
                let h = kh * g + gi;
                for i in 0..sq {
                    let at = len - sq + i;
                    let seen = pos.iter().filter(|&&p| p as usize <= at).count();
                    let qv: Vec<f32> = (0..d).map(|x| qd[(i * hq + h) * d + x]).collect();
                    let pages = select_reference(&quest, &k[..seen * d], d, &qv, seen - 1);
                    for (e, &p) in pos.iter().enumerate() {
                        let want = (p as usize) <= at && pages.contains(&(e / page));
                        let inside = select(h, i, p as usize) && (p as usize) <= at;
                        assert_eq!(inside, want, "len {len} head {h} row {i} entry {e}");
                    }
                    // The oracle over this head's kept entries.
                    let q1 = TensorView::contiguous(&qv[..], [1, 1, 1, d]).unwrap();
                    let kt = TensorView::contiguous(&k[..], [1, n, 1, d]).unwrap();
                    let vt = TensorView::contiguous(&v[..], [1, n, 1, d]).unwrap();
                    let r = attention_f64(&q1, &kt, &vt, &params, &|_, _, _, j| {
                        (pos[j] as usize) <= at && pages.contains(&(j / page))
                    })
                    .unwrap();
                    let o = got.out.data.to_f32_vec();
                    let row = &o[(i * hq + h) * d..][..d];
                    let eo = row
                        .iter()
                        .zip(&r.out)
                        .map(|(a, b)| (*a as f64 - b).abs())
                        .fold(0.0, f64::max);
                    let el = (got.lse[h * sq + i] as f64 - r.lse[0]).abs();
                    assert!(
                        eo <= out_tolerance(DType::F32) && el <= LSE_TOLERANCE,
                        "len {len} head {h} row {i}: out {eo:e} lse {el:e}"
                    );
                }
            }
        }
        // The scores under the selection.
        let w = vec![1.0f64; sq];
        let sp = ScoreParams {
            scale: None,
            softcap: None,
            reduce: Reduce::Max,
        };
        let obs = Observation {
            q: &q,
            lse: &got.lse,
            mask: Some(&expr),
            select: Some(&select),
        };
        let fast = column_scores(&cache, id, 0, &obs, &w, &sp).unwrap();
        let slow = column_scores_reference(&cache, id, 0, &obs, &w, &sp).unwrap();
        for kh in 0..hk {
            let pos = cache.positions(id, 0, kh).unwrap();
            for (e, (&a, &b)) in fast[kh].iter().zip(&slow[kh]).enumerate() {
                assert!(
                    (a as f64 - b).abs() <= 1e-4 * (1.0 + b.abs()),
                    "kh {kh} entry {e}: {a} vs {b}"
                );
                let attended = (0..g).any(|gi| {
                    (0..sq).any(|i| {
                        select(kh * g + gi, i, pos[e] as usize) && pos[e] as usize <= len - sq + i
                    })
                });
                if !attended {
                    assert_eq!(a, 0.0, "kh {kh} entry {e}: not attended, scored {a}");
                }
            }
        }
        // Budget 1: the compacted cache's own attention, bit for bit.
        let mut whole = QuestIndex::new(Quest { budget: 1.0, page }, &cache).unwrap();
        whole.update(&cache, id, 0).unwrap();
        let a = whole
            .attend(&cache, id, 0, &q, Some(&expr), &params)
            .unwrap();
        let b = cache.attend(id, 0, &q, Some(&expr), &params).unwrap();
        assert_eq!(a.out.data.to_f32_vec(), b.out.data.to_f32_vec());
        assert_eq!(a.lse, b.lse);
    }
}

/// Quest over KIVI: the page bounds are folded in while the keys are in full precision, then the
/// oldest groups are quantized; the selected pages are attended over both parts (quantized
/// entries dequantized) and equal the f64 oracle over the dequantized keys and values
/// (`gather_head`) under causal & the reference selection of the full-precision keys. Budget
/// >= length stays the quantized cache's plain attention bit for bit.
#[test]
fn selected_pages_over_quantized_entries_are_attended_exactly() {
    use crate::kv::kivi::Kivi;
    for &(len, sq, hq, hk, page, bits) in &[
        (7usize, 1usize, 2usize, 1usize, 16usize, 4u32),
        (113, 1, 6, 2, 16, 4),
        (113, 3, 4, 4, 7, 2),
        (1023, 5, 6, 3, 32, 4),
        (1023, 1, 8, 2, 16, 2),
    ] {
        let d = 32;
        let mut rng = Rng::new((len * 7 + hq * 3 + page + bits as usize) as u64);
        let (mut cache, id, fk, _) = filled(len, hk, d, 16, &mut rng);
        let quest = Quest { budget: 0.2, page };
        let mut index = QuestIndex::new(quest, &cache).unwrap();
        index.update(&cache, id, 0).unwrap();
        let kivi = Kivi {
            bits,
            group: 32,
            residual: 32,
            mixed: None,
        };
        cache.quantize(id, &kivi).unwrap();
        let quantized = cache.head_quantized(id, 0, 0).unwrap();
        assert_eq!(quantized, len.saturating_sub(32) / 32 * 32, "len {len}");
        let (qd, got) = attend_random(&index, &cache, id, [sq, hq, d], &mut rng);
        // The cache's entries as the kernels see them: dequantized, then full precision.
        let (kt, vt) = crate::kv::tests::dense_kv(&cache, id, 0);
        assert_selected_oracle(
            &format!("{quest}+int{bits} len {len} sq {sq} hq {hq} hk {hk}"),
            &got,
            &quest,
            &fk,
            &kt,
            &vt,
            &qd,
            [len, sq, hq, hk, d],
        );
        // Budget 1: the quantized cache's own attention, bit for bit.
        let mut whole = QuestIndex::new(Quest { budget: 1.0, page }, &cache).unwrap();
        whole.heads = index.heads.clone();
        whole.pos = index.pos.clone();
        let q = TensorView::contiguous(&qd[..], [1, sq, hq, d]).unwrap();
        let expr = MaskExpr::parse("causal").unwrap();
        let params = AttnParams::default();
        let a = whole
            .attend(&cache, id, 0, &q, Some(&expr), &params)
            .unwrap();
        let b = cache.attend(id, 0, &q, Some(&expr), &params).unwrap();
        assert_eq!(a.out.data.to_f32_vec(), b.out.data.to_f32_vec());
        assert_eq!(a.lse, b.lse);
    }
}
