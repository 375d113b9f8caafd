//! Paged cache against the f64 oracle on contiguous K/V: ragged lengths, page sizes, GQA,
//! q_len 1 (decode) and q_len > 1 (chunked prefill), masks, non-consecutive pages.
use super::*;
use crate::reference::attention_f64;
use crate::testing::{compare, out_tolerance, Rng, LSE_TOLERANCE};
use crate::DType;

/// K and V `[len, Hk, D]` of one layer of a cache whose heads hold every position, as the
/// kernels see them (quantized entries dequantized by `gather_head`), placed by position.
pub(crate) fn dense_kv(cache: &PagedKvCache, id: SeqId, layer: usize) -> (Vec<f32>, Vec<f32>) {
    let c = cache.config();
    let (hk, d, dv, len) = (c.kv_heads, c.head_dim, c.v_dim, cache.len(id).unwrap());
    let (mut kf, mut vf) = (vec![0.0f32; len * hk * d], vec![0.0f32; len * hk * dv]);
    for kh in 0..hk {
        let (k, v, pos) = cache.gather_head(id, layer, kh).unwrap();
        assert_eq!(pos, (0..len as u32).collect::<Vec<_>>());
        for j in 0..len {
            kf[(j * hk + kh) * d..][..d].copy_from_slice(&k[j * d..][..d]);
            vf[(j * hk + kh) * dv..][..dv].copy_from_slice(&v[j * dv..][..dv]);
        }
    }
    (kf, vf)
}

fn randn(n: usize, rng: &mut Rng) -> Vec<f32> {
    (0..n).map(|_| rng.normal() as f32).collect()
}

/// Fills two sequences of lengths `la`, `lb` in interleaved chunks (so their pages alternate and
/// the block tables hold several runs), then checks attention of the last `sq` positions of each.
fn check(page: usize, la: usize, lb: usize, sq: usize, hq: usize, hk: usize, mask: Option<&str>) {
    let (d, layers) = (24, 2);
    let cfg = KvConfig {
        layers,
        kv_heads: hk,
        head_dim: d,
        v_dim: d,
        page_size: page,
    };
    let mut cache = PagedKvCache::new(cfg).unwrap();
    let mut rng = Rng::new((page * 1000 + la * 7 + lb + sq) as u64);
    let ids = [cache.add_sequence(), cache.add_sequence()];
    let lens = [la, lb];
    // Reference copies of what each sequence holds, per layer.
    let mut full: Vec<Vec<(Vec<f32>, Vec<f32>)>> = vec![vec![(vec![], vec![]); layers]; 2];
    let chunk = page / 2 + 3; // not a multiple of the page size
    let mut done = [0usize; 2];
    while done[0] < la || done[1] < lb {
        for s in 0..2 {
            let n = chunk.min(lens[s] - done[s]);
            if n == 0 {
                continue;
            }
            let kv: Vec<(Vec<f32>, Vec<f32>)> = (0..layers)
                .map(|_| (randn(n * hk * d, &mut rng), randn(n * hk * d, &mut rng)))
                .collect();
            let refs: Vec<(&[f32], &[f32])> = kv.iter().map(|(k, v)| (&k[..], &v[..])).collect();
            assert_eq!(cache.append(ids[s], &refs).unwrap(), done[s]);
            for (l, (k, v)) in kv.into_iter().enumerate() {
                full[s][l].0.extend(k);
                full[s][l].1.extend(v);
            }
            done[s] += n;
        }
    }
    let expr = mask.map(|m| MaskExpr::parse(m).unwrap());
    for s in 0..2 {
        let len = lens[s];
        assert_eq!(cache.len(ids[s]).unwrap(), len);
        let (gk, gv) = cache.gather(ids[s], 1).unwrap();
        assert_eq!(gk, full[s][1].0);
        assert_eq!(gv, full[s][1].1);
        let sq = sq.min(len);
        let qd = randn(sq * hq * d, &mut rng);
        let q = TensorView::contiguous(&qd[..], [1, sq, hq, d]).unwrap();
        for (l, (fk, fv)) in full[s].iter().enumerate() {
            let got = cache
                .attend(ids[s], l, &q, expr.as_ref(), &AttnParams::default())
                .unwrap();
            let k = TensorView::contiguous(&fk[..], [1, len, hk, d]).unwrap();
            let v = TensorView::contiguous(&fv[..], [1, len, hk, d]).unwrap();
            let bound = expr.as_ref().map(|e| {
                e.bind(
                    MaskShape {
                        batch: 1,
                        sq,
                        sk: len,
                    },
                    None,
                )
                .unwrap()
            });
            let allowed = |b: usize, _h: usize, i: usize, j: usize| {
                bound.as_ref().is_none_or(|m| m.allowed(b, i, j))
            };
            let r = attention_f64(&q, &k, &v, &AttnParams::default(), &allowed).unwrap();
            let (eo, el) = compare(&got.out, &got.lse, &r);
            assert!(
                eo <= out_tolerance(DType::F32) && el <= LSE_TOLERANCE,
                "page {page} len {len} sq {sq} hq {hq} hk {hk} mask {mask:?} layer {l}: out err {eo:.2e}, lse err {el:.2e}"
            );
        }
    }
}

#[test]
fn decode_q1_against_oracle_ragged_pages() {
    for &page in &[16, 64, 256] {
        for &(la, lb) in &[(1, 7), (63, 65), (113, 300)] {
            check(page, la, lb, 1, 6, 2, Some("causal"));
            check(page, la, lb, 1, 4, 4, None);
        }
    }
}

#[test]
fn chunked_prefill_against_oracle() {
    for &page in &[16, 48, 128] {
        check(page, 300, 211, 37, 6, 3, Some("causal"));
        check(
            page,
            130,
            77,
            77,
            8,
            2,
            Some("causal & (sinks(4) | window(16,0))"),
        );
        check(page, 260, 199, 65, 3, 1, Some("causal & window(40,0)"));
    }
}

#[test]
fn multiple_runs_are_really_used() {
    let cfg = KvConfig {
        layers: 1,
        kv_heads: 1,
        head_dim: 4,
        v_dim: 4,
        page_size: 16,
    };
    let mut c = PagedKvCache::new(cfg).unwrap();
    let (a, b) = (c.add_sequence(), c.add_sequence());
    let x = vec![1.0f32; 16 * 4];
    for _ in 0..3 {
        c.append(a, &[(&x, &x)]).unwrap();
        c.append(b, &[(&x, &x)]).unwrap();
    }
    let s = c.seq(a).unwrap();
    assert_eq!(
        c.runs(&s.heads[0]).len(),
        3,
        "interleaved appends give one run per page"
    );
}

#[test]
fn dropping_a_sequence_frees_its_pages() {
    let cfg = KvConfig {
        layers: 3,
        kv_heads: 2,
        head_dim: 8,
        v_dim: 8,
        page_size: 32,
    };
    let mut c = PagedKvCache::new(cfg).unwrap();
    let (a, b) = (c.add_sequence(), c.add_sequence());
    c.extend(a, 100).unwrap(); // 4 pages per (layer, KV head)
    c.extend(b, 33).unwrap(); // 2 pages per (layer, KV head)
    assert_eq!(c.pages_in_use(), 6 * 3 * 2);
    let before = c.bytes_allocated();
    assert_eq!(before, 6 * 3 * 2 * 32 * 2 * 8 * 4);
    c.drop_sequence(b).unwrap();
    assert_eq!(c.pages_in_use(), 4 * 3 * 2);
    assert!(c.len(b).is_err(), "a dropped sequence is gone");
    c.trim();
    assert!(c.bytes_allocated() < before);
    c.drop_sequence(a).unwrap();
    c.trim();
    assert_eq!(c.bytes_allocated(), 0);
    // Reuse after drop.
    let d = c.add_sequence();
    c.extend(d, 10).unwrap();
    assert_eq!(c.pages_in_use(), 3 * 2);
}

#[test]
fn bad_input_is_refused() {
    let mut cfg = KvConfig {
        layers: 1,
        kv_heads: 1,
        head_dim: 4,
        v_dim: 4,
        page_size: 8,
    };
    assert!(PagedKvCache::new(cfg).is_err(), "page size below 16");
    cfg.page_size = 16;
    let mut c = PagedKvCache::new(cfg).unwrap();
    let a = c.add_sequence();
    c.extend(a, 2).unwrap();
    let x = vec![0.5f32; 3 * 4];
    let e = c.write(a, 0, 0, &x, &x).unwrap_err().to_string();
    assert!(e.contains("outside the sequence"), "{e}");
    let q = [0.1f32; 3 * 4];
    let qv = TensorView::contiguous(&q[..], [1, 3, 1, 4]).unwrap();
    assert!(c.attend(a, 0, &qv, None, &AttnParams::default()).is_err());
}

/// The truth for a (possibly compressed) cache: per KV head, its kept entries gathered and attended
/// by the f64 oracle, the mask read at the entries' positions (query row i at position
/// i + len - Sq). Output `[1, Sq, Hq, Dv]`, LSE `[1, Hq, Sq]`.
fn oracle_kept(
    c: &PagedKvCache,
    id: SeqId,
    layer: usize,
    q: &TensorView,
    mask: Option<&MaskExpr>,
) -> crate::reference::RefOutput {
    let cfg = c.config();
    let [_, sq, hq, d] = q.shape;
    let (hk, dv) = (cfg.kv_heads, cfg.v_dim);
    let g = hq / hk;
    let len = c.len(id).unwrap();
    let bound = mask.map(|e| {
        e.bind(
            MaskShape {
                batch: 1,
                sq,
                sk: len,
            },
            None,
        )
        .unwrap()
    });
    let mut out = vec![0.0f64; sq * hq * dv];
    let mut lse = vec![f64::NEG_INFINITY; hq * sq];
    for kh in 0..hk {
        let (k, v, pos) = c.gather_head(id, layer, kh).unwrap();
        if pos.is_empty() {
            continue;
        }
        let qg: Vec<f32> = (0..sq * g * d)
            .map(|x| q.get(0, x / (g * d), kh * g + (x / d) % g, x % d))
            .collect();
        let qv = TensorView::contiguous(&qg[..], [1, sq, g, d]).unwrap();
        let kv = TensorView::contiguous(&k[..], [1, pos.len(), 1, d]).unwrap();
        let vv = TensorView::contiguous(&v[..], [1, pos.len(), 1, dv]).unwrap();
        let allowed = |_b: usize, _h: usize, i: usize, j: usize| {
            bound
                .as_ref()
                .is_none_or(|m| m.allowed(0, i, pos[j] as usize))
        };
        let r = attention_f64(&qv, &kv, &vv, &AttnParams::default(), &allowed).unwrap();
        for i in 0..sq {
            for gi in 0..g {
                out[(i * hq + kh * g + gi) * dv..][..dv]
                    .copy_from_slice(&r.out[(i * g + gi) * dv..][..dv]);
                lse[(kh * g + gi) * sq + i] = r.lse[gi * sq + i];
            }
        }
    }
    crate::reference::RefOutput {
        out,
        lse,
        shape: [1, sq, hq, dv],
    }
}

/// A cache of `layers` x `hk` heads holding one sequence of `len` random positions, appended in
/// chunks of `page / 2 + 3` next to a second sequence (scattered pages).
fn filled(
    page: usize,
    len: usize,
    hk: usize,
    d: usize,
    layers: usize,
    seed: u64,
) -> (PagedKvCache, SeqId) {
    let cfg = KvConfig {
        layers,
        kv_heads: hk,
        head_dim: d,
        v_dim: d,
        page_size: page,
    };
    let mut c = PagedKvCache::new(cfg).unwrap();
    let mut rng = Rng::new(seed);
    let (a, other) = (c.add_sequence(), c.add_sequence());
    let chunk = page / 2 + 3;
    let mut done = 0;
    while done < len {
        let n = chunk.min(len - done);
        for id in [a, other] {
            let kv: Vec<(Vec<f32>, Vec<f32>)> = (0..layers)
                .map(|_| (randn(n * hk * d, &mut rng), randn(n * hk * d, &mut rng)))
                .collect();
            let refs: Vec<(&[f32], &[f32])> = kv.iter().map(|(k, v)| (&k[..], &v[..])).collect();
            c.append(id, &refs).unwrap();
        }
        done += n;
    }
    (c, a)
}

/// A random keep set of about `frac` of `len` entries (never empty), different per head.
fn random_keep(len: usize, frac: f64, rng: &mut Rng) -> Vec<usize> {
    let mut keep: Vec<usize> = (0..len).filter(|_| rng.uniform() < frac).collect();
    if keep.is_empty() {
        keep.push(rng.below(len));
    }
    keep
}

#[test]
fn compress_keep_all_is_bit_identical() {
    let (d, hk, hq) = (24, 2, 6);
    for &(page, len) in &[(16, 113), (64, 65), (16, 1023)] {
        let (mut c, a) = filled(page, len, hk, d, 2, len as u64);
        let mut rng = Rng::new(5);
        let mem = c.memory();
        for &(sq, mask) in &[
            (1, Some("causal")),
            (7, Some("causal & window(30,0)")),
            (3, None),
        ] {
            let expr = mask.map(|m| MaskExpr::parse(m).unwrap());
            let qd = randn(sq * hq * d, &mut rng);
            let q = TensorView::contiguous(&qd[..], [1, sq, hq, d]).unwrap();
            let before = c
                .attend(a, 1, &q, expr.as_ref(), &AttnParams::default())
                .unwrap();
            for l in 0..2 {
                for kh in 0..hk {
                    let all: Vec<usize> = (0..len).collect();
                    assert_eq!(c.compress(a, l, kh, &all).unwrap(), 0);
                }
            }
            let after = c
                .attend(a, 1, &q, expr.as_ref(), &AttnParams::default())
                .unwrap();
            assert_eq!(
                before.out.data, after.out.data,
                "page {page} len {len} sq {sq}"
            );
            assert_eq!(before.lse, after.lse);
            assert_eq!(c.memory(), mem, "keeping everything frees nothing");
        }
    }
}

#[test]
fn compressed_heads_attend_exactly_the_kept_keys() {
    let d = 16;
    let masks = [
        None,
        Some("causal"),
        Some("causal & (sinks(4) | window(40,0))"),
    ];
    for &len in &[1usize, 7, 63, 65, 113, 1023] {
        for &(page, hq, hk) in &[(16, 6, 2), (32, 4, 4), (16, 3, 1)] {
            let layers = 2;
            let (mut c, a) = filled(page, len, hk, d, layers, (len * 3 + page + hk) as u64);
            let mut rng = Rng::new(len as u64 + 11);
            // Ragged heads: each keeps its own random subset (one head keeps everything).
            for l in 0..layers {
                for kh in 0..hk {
                    let frac = if kh == 0 && l == 0 {
                        1.0
                    } else {
                        0.15 + 0.2 * kh as f64
                    };
                    let keep = random_keep(len, frac, &mut rng);
                    c.compress(a, l, kh, &keep).unwrap();
                    let pos = c.positions(a, l, kh).unwrap();
                    assert!(keep.iter().zip(pos).all(|(&e, p)| e == p as usize));
                }
            }
            // Chunked queries after compression: new positions appended to every head.
            let extra = 1 + len % 9;
            let kv: Vec<(Vec<f32>, Vec<f32>)> = (0..layers)
                .map(|_| {
                    (
                        randn(extra * hk * d, &mut rng),
                        randn(extra * hk * d, &mut rng),
                    )
                })
                .collect();
            let refs: Vec<(&[f32], &[f32])> = kv.iter().map(|(k, v)| (&k[..], &v[..])).collect();
            c.append(a, &refs).unwrap();
            for &sq in &[1, extra] {
                let qd = randn(sq * hq * d, &mut rng);
                let q = TensorView::contiguous(&qd[..], [1, sq, hq, d]).unwrap();
                for mask in masks {
                    let expr = mask.map(|m| MaskExpr::parse(m).unwrap());
                    for l in 0..layers {
                        let got = c
                            .attend(a, l, &q, expr.as_ref(), &AttnParams::default())
                            .unwrap();
                        let r = oracle_kept(&c, a, l, &q, expr.as_ref());
                        let (eo, el) = compare(&got.out, &got.lse, &r);
                        assert!(
                            eo <= out_tolerance(DType::F32) && el <= LSE_TOLERANCE,
                            "len {len} page {page} hq {hq} hk {hk} sq {sq} mask {mask:?} layer {l}: out err {eo:.2e}, lse err {el:.2e}"
                        );
                    }
                }
            }
            // The batched decode over the per-head tables agrees with the same truth.
            let qd = randn(hq * d, &mut rng);
            let q = TensorView::contiguous(&qd[..], [1, 1, hq, d]).unwrap();
            for l in 0..layers {
                let got = c
                    .decode(&[a], l, &q, &decode::DecodeParams::default())
                    .unwrap();
                let r = oracle_kept(&c, a, l, &q, None);
                let (eo, el) = compare(&got.out, &got.lse, &r);
                assert!(
                    eo <= out_tolerance(DType::F32) && el <= LSE_TOLERANCE,
                    "decode len {len} page {page} hq {hq} hk {hk}: out err {eo:.2e}, lse err {el:.2e}"
                );
            }
        }
    }
}

#[test]
fn compression_frees_pages_and_accounts_exactly() {
    let (page, len, hk, d, layers) = (16, 200, 2, 8, 3);
    let (mut c, a) = filled(page, len, hk, d, layers, 9);
    let entry = 2 * d * 4;
    let m0 = c.memory();
    // Two sequences of 200 positions: 13 pages per (sequence, layer, head).
    assert_eq!(m0.pages_in_use, 2 * layers * hk * 13);
    assert_eq!(m0.bytes_entries, 2 * layers * hk * len * entry);
    assert_eq!(m0.bytes_full, m0.bytes_entries);
    assert_eq!(m0.bytes_in_use, m0.pages_in_use * page * entry);
    // Keep 20 entries of layer 1 head 0 (2 pages): 11 pages freed.
    let keep: Vec<usize> = (0..len).step_by(10).collect();
    assert_eq!(c.compress(a, 1, 0, &keep).unwrap(), 11);
    let m1 = c.memory();
    assert_eq!(m1.pages_in_use, m0.pages_in_use - 11);
    assert_eq!(m1.bytes_entries, m0.bytes_entries - (len - 20) * entry);
    assert_eq!(m1.bytes_full, m0.bytes_full);
    assert_eq!(
        m1.bytes_allocated, m0.bytes_allocated,
        "freed pages stay in the pool"
    );
    // The freed pages are reused by the next growth before the pool grows.
    c.extend(a, 1).unwrap();
    assert_eq!(c.memory().pages_allocated, m0.pages_allocated);
    assert_eq!(c.head_len(a, 1, 0).unwrap(), 21);
    assert_eq!(c.head_len(a, 1, 1).unwrap(), len + 1);
    // Dropping everything and trimming returns all memory.
    let ids: Vec<SeqId> = (0..2).map(SeqId).collect();
    for id in ids {
        c.drop_sequence(id).unwrap();
    }
    c.trim();
    assert_eq!(c.memory().bytes_allocated, 0);
}

#[test]
fn failed_compression_and_writes_to_evicted_positions_leave_the_cache_as_it_was() {
    let (page, len, hk, d) = (16, 65, 2, 8);
    let (mut c, a) = filled(page, len, hk, d, 1, 4);
    let before: Vec<_> = (0..hk).map(|kh| c.gather_head(a, 0, kh).unwrap()).collect();
    let mem = c.memory();
    for (keep, what) in [
        (vec![3, 2], "strictly increasing"),
        (vec![1, 1], "strictly increasing"),
        (vec![0, 65], "below the head's 65 entries"),
    ] {
        let e = c.compress(a, 0, 1, &keep).unwrap_err().to_string();
        assert!(e.contains(what), "{e}");
    }
    assert!(c
        .compress(a, 1, 0, &[0])
        .unwrap_err()
        .to_string()
        .contains("layer 1"));
    assert!(c
        .compress(a, 0, 2, &[0])
        .unwrap_err()
        .to_string()
        .contains("KV head 2"));
    let after: Vec<_> = (0..hk).map(|kh| c.gather_head(a, 0, kh).unwrap()).collect();
    assert_eq!(before, after);
    assert_eq!(c.memory(), mem);
    // A compressed head no longer holds the old positions: writing them is refused.
    c.compress(a, 0, 1, &[0, 5, 64]).unwrap();
    let x = vec![0.5f32; hk * d];
    let e = c.write(a, 0, 10, &x, &x).unwrap_err().to_string();
    assert!(e.contains("compressed away"), "{e}");
    assert!(c
        .gather(a, 0)
        .unwrap_err()
        .to_string()
        .contains("gather_head"));
    // The last position is still held by every head.
    c.write(a, 0, 64, &x, &x).unwrap();
}
