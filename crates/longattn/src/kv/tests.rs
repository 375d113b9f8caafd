//! Paged cache against the f64 oracle on contiguous K/V: ragged lengths, page sizes, GQA,
//! q_len 1 (decode) and q_len > 1 (chunked prefill), masks, non-consecutive pages.
use super::*;
use crate::reference::attention_f64;
use crate::testing::{compare, out_tolerance, Rng, LSE_TOLERANCE};
use crate::DType;

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
        c.runs(s).len(),
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
    c.extend(a, 100).unwrap(); // 4 pages
    c.extend(b, 33).unwrap(); // 2 pages
    assert_eq!(c.pages_in_use(), 6);
    let before = c.bytes_allocated();
    assert_eq!(before, 6 * 2 * 32 * 2 * 8 * 3 * 4);
    c.drop_sequence(b).unwrap();
    assert_eq!(c.pages_in_use(), 4);
    assert!(c.len(b).is_err(), "a dropped sequence is gone");
    c.trim();
    assert!(c.bytes_allocated() < before);
    c.drop_sequence(a).unwrap();
    c.trim();
    assert_eq!(c.bytes_allocated(), 0);
    // Reuse after drop.
    let d = c.add_sequence();
    c.extend(d, 10).unwrap();
    assert_eq!(c.pages_in_use(), 1);
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
