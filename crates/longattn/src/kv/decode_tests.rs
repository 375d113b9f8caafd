//! Batched paged decode against the f64 oracle: ragged lengths (0 included), page sizes, GQA / MQA
//! / MHA, scattered page tables, forced and planned splits, soft-cap, appends, bad input.
use super::*;
use crate::testing::{compare, out_tolerance, random_tensor, AWKWARD_SIZES, LSE_TOLERANCE};

fn filled_cache(
    dtype: DType,
    lens: &[usize],
    page: usize,
    hq: usize,
    hk: usize,
    d: usize,
    seed: u64,
) -> (PagedCache, Tensor) {
    random_cache(dtype, lens, page, hq, hk, d, seed).unwrap()
}

fn check(
    dtype: DType,
    lens: &[usize],
    page: usize,
    hq: usize,
    hk: usize,
    d: usize,
    params: &DecodeParams,
) {
    let seed = (page * 31 + hq * 7 + hk + d + lens.len()) as u64;
    let (c, q) = filled_cache(dtype, lens, page, hq, hk, d, seed);
    let qv = q.view("q").unwrap();
    let got = decode(&qv, &c.view(), &c.block_tables(), params).unwrap();
    let r = decode_reference(&qv, &c.view(), &c.block_tables(), params).unwrap();
    assert_eq!(got.out.shape, vec![lens.len(), 1, hq, d]);
    assert_eq!(got.out.dtype(), dtype);
    let (eo, el) = compare(&got.out, &got.lse, &r);
    assert!(
        eo <= out_tolerance(dtype) && el <= LSE_TOLERANCE,
        "{dtype} lens {lens:?} page {page} hq {hq} hk {hk} d {d} {params:?}: out err {eo:.2e}, lse err {el:.2e}"
    );
    // Length 0: o = 0 and lse = -inf exactly.
    let out = got.out.data.to_f32_vec();
    for (b, &len) in lens.iter().enumerate() {
        if len == 0 {
            assert!(out[b * hq * d..][..hq * d].iter().all(|&x| x == 0.0));
            assert!(got.lse[b * hq..][..hq]
                .iter()
                .all(|&x| x == f32::NEG_INFINITY));
        }
    }
}

#[test]
fn ragged_lengths_pages_and_groups_against_oracle() {
    let mut lens = AWKWARD_SIZES.to_vec();
    lens.push(0);
    let auto = DecodeParams::default();
    let forced = DecodeParams {
        split_len: Some(100), // not page-aligned: splits start inside pages
        ..Default::default()
    };
    for &page in &[16, 64, 256] {
        // GQA 4:1, MQA, MHA.
        check(DType::F32, &lens, page, 8, 2, 32, &auto);
        check(DType::BF16, &lens, page, 4, 1, 64, &forced);
        check(DType::F16, &lens, page, 3, 3, 32, &forced);
    }
}

#[test]
fn head_dims_and_soft_cap() {
    let lens = [65, 0, 300, 1];
    for &d in &[64, 128, 256] {
        check(DType::BF16, &lens, 16, 8, 2, d, &DecodeParams::default());
    }
    let capped = DecodeParams {
        softcap: Some(5.0),
        scale: Some(0.3),
        split_len: Some(64),
    };
    check(DType::F32, &lens, 32, 12, 4, 40, &capped);
    check(DType::F16, &lens, 16, 16, 1, 64, &capped);
}

#[test]
fn every_split_length_gives_the_same_answer() {
    let (c, q) = filled_cache(DType::F32, &[1023, 77, 4224], 16, 4, 2, 16, 5);
    let qv = q.view("q").unwrap();
    let r = decode_reference(&qv, &c.view(), &c.block_tables(), &DecodeParams::default()).unwrap();
    for split in [1, 15, 16, 17, 256, 1000, 5000] {
        let p = DecodeParams {
            split_len: Some(split),
            ..Default::default()
        };
        let got = decode(&qv, &c.view(), &c.block_tables(), &p).unwrap();
        let (eo, el) = compare(&got.out, &got.lse, &r);
        assert!(
            eo <= out_tolerance(DType::F32) && el <= LSE_TOLERANCE,
            "split {split}: {eo:.2e} {el:.2e}"
        );
    }
}

#[test]
fn batched_append_writes_the_pages_it_reports() {
    let (b, hk, d, page) = (3, 2, 8, 16);
    let mut c = PagedCache::new(DType::BF16, hk, d, page, 20, b).unwrap();
    c.tables.shuffle_free(9);
    let mut steps = Vec::new();
    for step in 0..40u64 {
        let k = random_tensor(DType::BF16, &[b, 1, hk, d], 1.0, 2 * step);
        let v = random_tensor(DType::BF16, &[b, 1, hk, d], 1.0, 2 * step + 1);
        c.append(&k.view("k").unwrap(), &v.view("v").unwrap())
            .unwrap();
        steps.push((k, v));
    }
    assert_eq!(c.tables.lens(), vec![40; b]);
    assert_eq!(c.tables.free_pages(), 20 - b * 3);
    let bt = c.block_tables();
    let kv = c.view();
    for s in 0..b {
        for (j, (k, v)) in steps.iter().enumerate() {
            let pg = bt.tables[s * bt.max_pages + j / page] as usize;
            let r = (pg * page + j % page) * hk * d;
            for x in 0..hk * d {
                assert_eq!(
                    kv.k.get_f32(r + x),
                    k.view("k").unwrap().get(s, 0, x / d, x % d)
                );
                assert_eq!(
                    kv.v.get_f32(r + x),
                    v.view("v").unwrap().get(s, 0, x / d, x % d)
                );
            }
        }
    }
    // Out of pages: refused, and nothing changes (all or nothing).
    let k = random_tensor(DType::BF16, &[b, 200, hk, d], 1.0, 1);
    let e = c
        .append(&k.view("k").unwrap(), &k.view("v").unwrap())
        .unwrap_err();
    assert!(e.to_string().contains("out of pages"), "{e}");
    assert_eq!(c.tables.lens(), vec![40; b]);
    // Release returns the pages.
    c.tables.release(1).unwrap();
    assert_eq!(c.tables.free_pages(), 20 - (b - 1) * 3);
    assert_eq!(c.tables.len(1), 0);
}

#[test]
fn ragged_split_plan_counts_the_blocks_rows_launch() {
    // The benchmark's eviction to 20% at 8 x 128k: KV head h keeps 0.2 (0.5 + h / 7) of 131072
    // keys; 8 sequences x 8 heads, 132 SMs x 2 blocks, pages of 16.
    let row = |h: usize| (0.2 * (0.5 + h as f64 / 7.0) * 131072.0) as usize;
    let lens: Vec<usize> = (0..64).map(|r| row(r % 8)).collect();
    let max = *lens.iter().max().unwrap();
    let (slots, align) = (264, 16);
    let blocks = |p: SplitPlan| -> usize { lens.iter().map(|&l| l.div_ceil(p.split_len)).sum() };
    // Rows' worth of keys (43 rows at the longest length) fit one wave at 6 splits, but the rows
    // launch 280 blocks: a second wave of 16.
    let items = lens.iter().sum::<usize>().div_ceil(max);
    let old = plan_splits(items, slots, max, align);
    assert_eq!(old.num_splits, 6, "{old:?}");
    assert_eq!(blocks(old), 280);
    // Counting the blocks: the waves are nearly full.
    let p = plan_splits_ragged(&lens, 1, slots, max, align);
    let total: usize = lens.iter().sum();
    let eff = total as f64 / (blocks(p).div_ceil(slots) * slots * p.split_len) as f64;
    assert!(
        eff >= 0.85,
        "{p:?}: {} blocks, efficiency {eff:.3}",
        blocks(p)
    );
    assert!(
        p.num_splits > 6 && p.split_len.is_multiple_of(align),
        "{p:?}"
    );
    // Rows of equal length: the plan of rows' worth of keys.
    for (rows, len) in [(8, 131072), (256, 8192), (1, 4224), (3, 1023)] {
        let eq = vec![len; rows];
        assert_eq!(
            plan_splits_ragged(&eq, 1, slots, len, align),
            plan_splits(rows, slots, len, align),
            "{rows} x {len}"
        );
    }
    // No keys at all, and rows of no keys among others.
    assert_eq!(
        plan_splits_ragged(&[0, 0], 1, slots, 0, align).num_splits,
        1
    );
    let p = plan_splits_ragged(&[0, 0, 40000], 2, slots, 40000, align);
    assert!(
        p.num_splits >= 2 && p.split_len * p.num_splits >= 40000,
        "{p:?}"
    );
}

#[test]
fn split_plan_fills_the_device() {
    // The benchmark's problem on an H100-like device: 32 x 8 items, 132 SMs x 4 blocks.
    let p = plan_splits(256, 528, 8192, 16);
    assert!(p.num_splits >= 2, "{p:?}");
    assert_eq!(p.split_len % 16, 0);
    assert!(p.split_len * p.num_splits >= 8192);
    // Plenty of items already: one split.
    assert_eq!(plan_splits(4096, 528, 8192, 16).num_splits, 1);
    // One long sequence: many splits, each >= MIN_SPLIT_KEYS, at most MAX_SPLITS.
    let p = plan_splits(1, 528, 1 << 20, 64);
    assert!(
        p.num_splits <= MAX_SPLITS && p.split_len >= MIN_SPLIT_KEYS,
        "{p:?}"
    );
    // Short: no split.
    assert_eq!(plan_splits(1, 528, 100, 16).num_splits, 1);
    assert_eq!(plan_splits(1, 528, 0, 16).num_splits, 1);
    assert_eq!(
        split_plan_for(MAX_SPLITS * 100, 1, 1).num_splits,
        MAX_SPLITS
    );
    assert_eq!(heads_per_block(4), 4);
    assert_eq!(heads_per_block(32), 8);
    assert_eq!(heads_per_block(12), 6);
    assert_eq!(heads_per_block(7), 7);
    assert_eq!(heads_per_block(11), 1);
}

#[test]
fn merge_of_two_halves_is_the_whole() {
    // Keys {0, 1}: logits 0 and ln 3 -> weights 1/4, 3/4; split into one key each.
    let (o, l) = merge_splits(&[1.0, 0.0, 0.0, 1.0], &[0.0, 3f32.ln()], 2, 2, &[2]);
    assert!((l[0] - 4f32.ln()).abs() < 1e-6);
    assert!((o[0] - 0.25).abs() < 1e-6 && (o[1] - 0.75).abs() < 1e-6);
    // Only the first `count` splits are read; none -> o = 0, lse = -inf.
    let (o, l) = merge_splits(
        &[1.0, 1.0, f32::NAN, f32::NAN],
        &[0.5, f32::NAN],
        2,
        2,
        &[1],
    );
    assert_eq!((o[0], o[1], l[0]), (1.0, 1.0, 0.5));
    let (o, l) = merge_splits(&[f32::NAN; 4], &[f32::NAN; 2], 2, 2, &[0]);
    assert_eq!((o[0], l[0]), (0.0, f32::NEG_INFINITY));
}

#[test]
fn bad_input_is_an_error_not_a_panic() {
    let (c, q) = filled_cache(DType::F32, &[40, 17], 16, 4, 2, 8, 3);
    let qv = q.view("q").unwrap();
    let kv = c.view();
    let (tables, w) = c.tables.block_tables();
    let lens = c.tables.lens();
    let p = DecodeParams::default();
    let run = |kv: &PagedKv, tables: &[i32], w: usize, lens: &[i32], q: &TensorView| {
        decode(q, kv, &BlockTables::shared(tables, w, lens), &p)
            .unwrap_err()
            .to_string()
    };
    // Table too short for the length.
    let e = run(&kv, &tables, w, &[49, 17], &qv);
    assert!(e.contains("needs 4 pages"), "{e}");
    // Page index out of range, negative page, negative length.
    let mut bad = tables.clone();
    bad[1] = kv.num_pages() as i32;
    assert!(run(&kv, &bad, w, &lens, &qv).contains("outside the pool"));
    bad[1] = -1;
    assert!(run(&kv, &bad, w, &lens, &qv).contains("outside the pool"));
    assert!(run(&kv, &tables, w, &[-1, 3], &qv).contains("negative length"));
    // Shape mismatches: tables, lens, q batch, q head dim, q seq, heads not a multiple.
    assert!(run(&kv, &tables[1..], w, &lens, &qv).contains("block tables"));
    assert!(run(&kv, &tables, w, &lens[..1], &qv).contains("lens"));
    let q3 = random_tensor(DType::F32, &[2, 1, 3, 8], 1.0, 1);
    assert!(run(&kv, &tables, w, &lens, &q3.view("q").unwrap()).contains("`q`"));
    let q2 = random_tensor(DType::F32, &[2, 2, 4, 8], 1.0, 1);
    assert!(run(&kv, &tables, w, &lens, &q2.view("q").unwrap()).contains("`q`"));
    let qd = random_tensor(DType::F32, &[2, 1, 4, 16], 1.0, 1);
    assert!(run(&kv, &tables, w, &lens, &qd.view("q").unwrap()).contains("`q`"));
    // dtype mismatch.
    let qb = random_tensor(DType::BF16, &[2, 1, 4, 8], 1.0, 1);
    assert!(run(&kv, &tables, w, &lens, &qb.view("q").unwrap()).contains("dtype"));
    // Page size outside 16..=256, pages not a whole number.
    let mut k8 = kv;
    k8.page_size = 8;
    assert!(run(&k8, &tables, w, &lens, &qv).contains("page size 8"));
    k8.page_size = 512;
    assert!(run(&k8, &tables, w, &lens, &qv).contains("page size 512"));
    let kf = c.k.to_f32_vec();
    let short = PagedKv {
        k: Slice::F32(&kf[1..]),
        ..kv
    };
    assert!(run(&short, &tables, w, &lens, &qv).contains("k/v pages"));
    // Parameters.
    for bad in [
        DecodeParams {
            split_len: Some(0),
            ..Default::default()
        },
        DecodeParams {
            softcap: Some(-1.0),
            ..Default::default()
        },
        DecodeParams {
            scale: Some(f32::NAN),
            ..Default::default()
        },
    ] {
        assert!(decode(&qv, &kv, &c.block_tables(), &bad).is_err());
    }
    assert!(PagedCache::new(DType::F32, 1, 8, 300, 4, 1).is_err());
    assert!(PageTables::new(15, 4, 1).is_err());
    let mut pt = PageTables::new(16, 4, 1).unwrap();
    assert!(pt.grow(1, 3).is_err(), "sequence outside the batch");
    assert!(pt.grow(0, 65).is_err(), "out of pages");
    assert_eq!(pt.len(0), 0);
}

#[test]
fn tables_rebuilt_from_raw_arrays_free_the_rest() {
    let (c, _) = filled_cache(DType::F32, &[40, 0, 17], 16, 2, 2, 8, 4);
    let (t, w) = c.tables.block_tables();
    let r = PageTables::from_tables(16, c.tables.num_pages(), &t, w, &c.tables.lens()).unwrap();
    assert_eq!(r.free_pages(), c.tables.free_pages());
    assert_eq!(r.block_tables(), (t.clone(), w));
    assert!(PageTables::from_tables(16, 2, &t, w, &c.tables.lens()).is_err());
    assert!(PageTables::from_tables(16, 9, &t[1..], w, &c.tables.lens()).is_err());
}

/// Per-head tables: every (sequence, KV head) has its own length (0 included) and scattered pages
/// of one head each; the decode agrees with the oracle over the same tables, with planned and
/// forced splits, and mis-sized per-head tables are refused.
#[test]
fn per_head_tables_against_oracle() {
    let (page, d) = (16, 16);
    for &(hq, hk) in &[(8, 2), (3, 3), (4, 1)] {
        let batch = 3;
        let mut lens: Vec<i32> = (0..batch * hk)
            .map(|r| AWKWARD_SIZES[(r * 5 + hk) % 6] as i32)
            .collect();
        let n = lens.len();
        lens[1 % n] = 0;
        let w = lens
            .iter()
            .map(|&l| (l as usize).div_ceil(page))
            .max()
            .unwrap()
            .max(1);
        let pages: usize = lens
            .iter()
            .map(|&l| (l as usize).div_ceil(page))
            .sum::<usize>()
            + 2;
        let mut order: Vec<i32> = (0..pages as i32).collect();
        let mut rng = crate::testing::Rng::new(hk as u64);
        for i in (1..order.len()).rev() {
            order.swap(i, rng.below(i + 1));
        }
        let mut tables = vec![-1i32; batch * hk * w];
        let mut next = order.into_iter();
        for (r, &l) in lens.iter().enumerate() {
            for x in tables[r * w..][..(l as usize).div_ceil(page)].iter_mut() {
                *x = next.next().unwrap();
            }
        }
        let k = random_tensor(DType::F32, &[pages * page * d], 1.0, 3);
        let v = random_tensor(DType::F32, &[pages * page * d], 1.0, 4);
        let q = random_tensor(DType::F32, &[batch, 1, hq, d], 1.0, 5);
        let kv = PagedKv {
            k: k.data.as_slice(),
            v: v.data.as_slice(),
            page_size: page,
            kv_heads: hk,
            head_dim: d,
        };
        let bt = BlockTables::per_head(&tables, w, &lens);
        let qv = q.view("q").unwrap();
        for params in [
            DecodeParams::default(),
            DecodeParams {
                split_len: Some(37),
                ..Default::default()
            },
        ] {
            let got = decode(&qv, &kv, &bt, &params).unwrap();
            let r = decode_reference(&qv, &kv, &bt, &params).unwrap();
            let (eo, el) = compare(&got.out, &got.lse, &r);
            assert!(
                eo <= out_tolerance(DType::F32) && el <= LSE_TOLERANCE,
                "hq {hq} hk {hk} {params:?}: out err {eo:.2e}, lse err {el:.2e}"
            );
        }
        // Shared-table sizes given with head_tables: refused, naming the tensor.
        if hk > 1 {
            let short = BlockTables::per_head(&tables, w, &lens[..batch]);
            let e = decode(&qv, &kv, &short, &DecodeParams::default())
                .unwrap_err()
                .to_string();
            assert!(e.contains("lens") && e.contains("KV heads"), "{e}");
        }
    }
}

#[test]
fn rebuild_keeps_old_pages_until_given_back() {
    let mut t = PageTables::new(16, 10, 2).unwrap();
    t.grow(0, 40).unwrap(); // 3 pages
    t.grow(1, 17).unwrap(); // 2 pages
    let free0 = t.free_pages();
    let (old, slots) = t.rebuild(0, 20).unwrap();
    assert_eq!(old.len(), 3);
    assert_eq!(slots.len(), 20);
    // The new pages are fresh: none of the old ones, none of row 1's.
    for s in &slots {
        let pg = (s / 16) as i32;
        assert!(!old.contains(&pg) && !t.pages(1).contains(&pg), "slot {s}");
    }
    assert_eq!(t.free_pages(), free0 - 2);
    // Too many entries for the free list: an error, the row unchanged.
    let before = t.pages(1).to_vec();
    assert!(t.rebuild(1, 16 * 9).is_err());
    assert_eq!(t.pages(1), &before[..]);
    assert_eq!(t.len(1), 17);
    t.give_back(&old);
    assert_eq!(t.free_pages(), free0 + 1);
    assert_eq!(t.slot(0, 19).map(|s| s / 16), Some(t.pages(0)[1] as usize));
    assert_eq!(t.slot(0, 20), None);
}
