//! The one entry point (`longattn::api`) on CPU memory: strided caller buffers in and out
//! against the f64 oracle (awkward sizes, Sq != Sk, decode, GQA), block tables, document ids,
//! decode over contiguous and paged caches, and errors that name the tensor. The CUDA route is
//! exercised by `longattn selftest --backend cuda` and the Python suite on the GPU; here a CUDA
//! tensor only has to fail cleanly without a driver.
use longattn::api::{self, AttnArgs, Device, KvCacheArgs, MaskArg, RawDType, RawTensor};
use longattn::kv::decode::DecodeParams;
use longattn::mask::{DocIds, MaskExpr, MaskShape};
use longattn::reference::attention_f64;
use longattn::testing::{compare, out_tolerance, random_tensor, AWKWARD_SIZES, LSE_TOLERANCE};
use longattn::{AttnParams, DType, Error, Tensor, TensorView};

fn f32_ptr(x: &[f32]) -> u64 {
    x.as_ptr() as u64
}

/// `t` ([B, S, H, D] contiguous) stored head-major ([B, H, S, D] memory), as a strided view.
fn head_major(t: &Tensor) -> (Vec<f32>, [usize; 4], [usize; 4]) {
    let [b, s, h, d]: [usize; 4] = t.shape.clone().try_into().unwrap();
    let x = t.data.to_f32_vec();
    let mut y = vec![0f32; x.len()];
    for ib in 0..b {
        for is in 0..s {
            for ih in 0..h {
                for id in 0..d {
                    y[((ib * h + ih) * s + is) * d + id] = x[((ib * s + is) * h + ih) * d + id];
                }
            }
        }
    }
    (y, [b, s, h, d], [h * s * d, d, s * d, 1])
}

/// A contiguous host f32 buffer as a caller's tensor of `shape`.
fn host_f32(x: &mut [f32], shape: &[usize]) -> RawTensor {
    RawTensor::contiguous(
        x.as_mut_ptr() as u64,
        RawDType::Float(DType::F32),
        shape,
        Device::Cpu,
    )
}

fn raw(ptr: u64, shape: [usize; 4], strides: [usize; 4]) -> RawTensor {
    let mut r = RawTensor::contiguous(ptr, RawDType::Float(DType::F32), &shape, Device::Cpu);
    r.strides = strides;
    r
}

/// Forward through the entry point with head-major K/V and a strided output buffer (every other
/// row of a larger buffer), against the oracle.
#[test]
fn forward_on_strided_caller_buffers_matches_the_oracle() {
    let expr = MaskExpr::parse("causal & (sinks(3) | window(40,0))").unwrap();
    let mut n = 0;
    for &sq in &AWKWARD_SIZES[..5] {
        for &sk in &[sq, 65, 1] {
            n += 1;
            let (b, hq, hk, d) = (2, 4, 2, 32);
            let q = random_tensor(DType::F32, &[b, sq, hq, d], 1.0, 11 + n);
            let k = random_tensor(DType::F32, &[b, sk, hk, d], 1.0, 12 + n);
            let v = random_tensor(DType::F32, &[b, sk, hk, d], 1.0, 13 + n);
            let (kx, ks, kst) = head_major(&k);
            let (vx, vs, vst) = head_major(&v);
            let qx = q.data.to_f32_vec();
            // out: rows spaced twice as far apart as needed.
            let mut out = vec![f32::NAN; b * sq * hq * d * 2];
            let mut lse = vec![0f32; b * hq * sq];
            let params = AttnParams::default();
            let a = AttnArgs {
                q: raw(f32_ptr(&qx), [b, sq, hq, d], [sq * hq * d, hq * d, d, 1]),
                k: raw(f32_ptr(&kx), ks, kst),
                v: raw(f32_ptr(&vx), vs, vst),
                mask: MaskArg::Expr(&expr),
                q_doc: None,
                k_doc: None,
                params: &params,
            };
            let o = raw(
                out.as_mut_ptr() as u64,
                [b, sq, hq, d],
                [2 * sq * hq * d, 2 * hq * d, d, 1],
            );
            let l = host_f32(&mut lse, &[b, hq, sq]);
            // SAFETY: every buffer lives to the end of the call and holds what its view addresses.
            unsafe { api::forward(&a, &o, &l, 0) }.unwrap();
            let bm = expr.bind(MaskShape { batch: b, sq, sk }, None).unwrap();
            let (qv, kv, vv) = (
                q.view("q").unwrap(),
                k.view("k").unwrap(),
                v.view("v").unwrap(),
            );
            let r =
                attention_f64(&qv, &kv, &vv, &params, &|bb, _, i, j| bm.allowed(bb, i, j)).unwrap();
            // Gather the strided output back into [B, Sq, Hq, D].
            let mut got = Vec::with_capacity(b * sq * hq * d);
            for ib in 0..b {
                for is in 0..sq {
                    let base = ib * 2 * sq * hq * d + is * 2 * hq * d;
                    got.extend_from_slice(&out[base..base + hq * d]);
                }
            }
            let got = Tensor::new(longattn::tensor::Buffer::F32(got), vec![b, sq, hq, d]).unwrap();
            let (eo, el) = compare(&got, &lse, &r);
            assert!(
                eo <= out_tolerance(DType::F32) && el <= LSE_TOLERANCE,
                "sq {sq} sk {sk}: out {eo:e} lse {el:e}"
            );
        }
    }
}

/// Documents as int32 caller tensors and an explicit block table through the entry point agree
/// with the oracle under the same element masks.
#[test]
fn documents_and_block_tables_through_the_entry_point() {
    let (b, sq, sk, h, d) = (2, 113, 70, 2, 16);
    let q = random_tensor(DType::F32, &[b, sq, h, d], 1.0, 1);
    let k = random_tensor(DType::F32, &[b, sk, h, d], 1.0, 2);
    let v = random_tensor(DType::F32, &[b, sk, h, d], 1.0, 3);
    let (qv, kv, vv) = (
        q.view("q").unwrap(),
        k.view("k").unwrap(),
        v.view("v").unwrap(),
    );
    let params = AttnParams::default();
    let run = |mask: MaskArg, docs: Option<&DocIds>| {
        api::forward_host(&qv, &kv, &vv, mask, docs, &params).unwrap()
    };
    // Documents: scattered ids.
    let docs = DocIds {
        q: (0..b * sq).map(|i| ((i * 7) % 3) as i32).collect(),
        k: (0..b * sk).map(|i| ((i * 5) % 3) as i32).collect(),
    };
    let expr = MaskExpr::parse("document | sinks(2)").unwrap();
    let got = run(MaskArg::Expr(&expr), Some(&docs));
    let r = attention_f64(&qv, &kv, &vv, &params, &|bb, _, i, j| {
        docs.q[bb * sq + i] == docs.k[bb * sk + j] || j < 2
    })
    .unwrap();
    let (eo, el) = compare(&got.out, &got.lse, &r);
    assert!(
        eo <= out_tolerance(DType::F32) && el <= LSE_TOLERANCE,
        "docs: {eo:e} {el:e}"
    );
    // Block table: 32 x 16 tiles, per batch row, shared by the heads.
    let (tq, tk) = (32, 16);
    let (nq, nk) = (sq.div_ceil(tq), sk.div_ceil(tk));
    let table: Vec<u8> = (0..b * nq * nk).map(|i| ((i * 13) % 5 < 3) as u8).collect();
    let t = RawTensor::contiguous(
        table.as_ptr() as u64,
        RawDType::U8,
        &[b, 1, nq, nk],
        Device::Cpu,
    );
    let got = run(
        MaskArg::Blocks {
            table: t,
            tile_q: tq,
            tile_k: tk,
            under: None,
        },
        None,
    );
    let r = attention_f64(&qv, &kv, &vv, &params, &|bb, _, i, j| {
        table[(bb * nq + i / tq) * nk + j / tk] != 0
    })
    .unwrap();
    let (eo, el) = compare(&got.out, &got.lse, &r);
    assert!(
        eo <= out_tolerance(DType::F32) && el <= LSE_TOLERANCE,
        "blocks: {eo:e} {el:e}"
    );
    // A table of the wrong shape is refused, naming it.
    let bad = RawTensor::contiguous(
        table.as_ptr() as u64,
        RawDType::U8,
        &[b, 1, nq, nk - 1],
        Device::Cpu,
    );
    let e = api::forward_host(
        &qv,
        &kv,
        &vv,
        MaskArg::Blocks {
            table: bad,
            tile_q: tq,
            tile_k: tk,
            under: None,
        },
        None,
        &params,
    )
    .unwrap_err();
    assert!(e.to_string().contains("block_mask"), "{e}");
}

/// An external gate (a per-(batch, head) block map, SeerAttention-style) under a mask
/// expression: the pairs `mask & table` attend, the mask exact inside kept tiles (causal
/// diagonals, document boundaries), against the oracle; Sq != Sk, GQA, tiles that do not divide
/// the lengths, and a gate shared by the batch (on CUDA: `selftest`'s `gated(T):EXPR` cases).
#[test]
fn gates_under_a_mask_expression_match_the_oracle() {
    let params = AttnParams::default();
    for (n, (sq, sk, bn, hq, hk, tq, tk, text)) in [
        (113, 113, 2, 4, 2, 32, 16, "causal"),
        (
            65,
            130,
            1,
            2,
            1,
            16,
            64,
            "causal & (sinks(3) | window(40,0))",
        ),
        (70, 70, 2, 2, 2, 8, 8, "causal & document"),
        (1, 63, 2, 4, 1, 1, 16, "causal"),
    ]
    .into_iter()
    .enumerate()
    {
        let seed = 40 + 4 * n as u64;
        let q = random_tensor(DType::F32, &[bn, sq, hq, 16], 1.0, seed);
        let k = random_tensor(DType::F32, &[bn, sk, hk, 16], 1.0, seed + 1);
        let v = random_tensor(DType::F32, &[bn, sk, hk, 16], 1.0, seed + 2);
        let (qv, kv, vv) = (
            q.view("q").unwrap(),
            k.view("k").unwrap(),
            v.view("v").unwrap(),
        );
        let docs = DocIds {
            q: (0..bn * sq).map(|i| ((i % sq) / 23) as i32).collect(),
            k: (0..bn * sk).map(|j| ((j % sk) / 23) as i32).collect(),
        };
        let expr = MaskExpr::parse(text).unwrap();
        let bound = expr
            .bind(MaskShape { batch: bn, sq, sk }, Some(docs.clone()))
            .unwrap();
        let (nq, nk) = (sq.div_ceil(tq), sk.div_ceil(tk));
        // Per (batch, head) except the last case (batch shared: [1, Hq, ...]).
        let tb = if n == 3 { 1 } else { bn };
        let mut table: Vec<u8> = (0..tb * hq * nq * nk)
            .map(|i| ((i * 7 + n) % 5 < 2) as u8)
            .collect();
        // Head 0's last query tile keeps nothing: its rows attend no key.
        let last = ((nq - 1) * nk)..(nq * nk);
        table[last].fill(0);
        let t = RawTensor::contiguous(
            table.as_ptr() as u64,
            RawDType::U8,
            &[tb, hq, nq, nk],
            Device::Cpu,
        );
        let gate = MaskArg::Blocks {
            table: t,
            tile_q: tq,
            tile_k: tk,
            under: Some(&expr),
        };
        let got = api::forward_host(&qv, &kv, &vv, gate, Some(&docs), &params).unwrap();
        let r = attention_f64(&qv, &kv, &vv, &params, &|b, h, i, j| {
            let bb = if tb == 1 { 0 } else { b };
            bound.allowed(b, i, j) && table[((bb * hq + h) * nq + i / tq) * nk + j / tk] != 0
        })
        .unwrap();
        let (eo, el) = compare(&got.out, &got.lse, &r);
        assert!(
            eo <= out_tolerance(DType::F32) && el <= LSE_TOLERANCE,
            "`{text}` & gate: out {eo:e} lse {el:e}"
        );
        // Rows the gate leaves empty: out 0 and LSE -inf, as under a mask.
        let o = got.out.data.to_f32_vec();
        for i in (nq - 1) * tq..sq {
            assert_eq!(got.lse[i], f32::NEG_INFINITY, "`{text}` row {i}");
            assert!(
                o[i * hq * 16..][..16].iter().all(|&x| x == 0.0),
                "`{text}` row {i}"
            );
        }
    }
}

/// Decode through the entry point over a contiguous cache (ragged lengths, a zero length) and a
/// paged one (shuffled pages), against the oracle on each sequence's keys.
#[test]
fn decode_over_contiguous_and_paged_caches() {
    let (b, hq, hk, d, cap) = (3, 4, 2, 32, 96);
    let lens = [1i32, 0, 96];
    let q = random_tensor(DType::F32, &[b, 1, hq, d], 1.0, 5);
    let kc = random_tensor(DType::F32, &[b, cap, hk, d], 1.0, 6);
    let vc = random_tensor(DType::F32, &[b, cap, hk, d], 1.0, 7);
    let (qx, kx, vx) = (
        q.data.to_f32_vec(),
        kc.data.to_f32_vec(),
        vc.data.to_f32_vec(),
    );
    let params = DecodeParams::default();
    let check = |cache: KvCacheArgs, what: &str| {
        let mut out = vec![f32::NAN; b * hq * d];
        let mut lse = vec![0f32; b * hq];
        let qr = RawTensor::contiguous(
            f32_ptr(&qx),
            RawDType::Float(DType::F32),
            &[b, 1, hq, d],
            Device::Cpu,
        );
        let o = host_f32(&mut out, &[b, 1, hq, d]);
        let l = host_f32(&mut lse, &[b, hq]);
        // SAFETY: every buffer lives to the end of the call.
        unsafe { api::decode(&qr, &cache, &o, &l, &params, 0) }.unwrap();
        for (bi, &n) in lens.iter().enumerate() {
            let qb =
                TensorView::contiguous(&qx[bi * hq * d..(bi + 1) * hq * d], [1, 1, hq, d]).unwrap();
            let rows = &out[bi * hq * d..(bi + 1) * hq * d];
            if n == 0 {
                assert!(
                    rows.iter().all(|&x| x == 0.0),
                    "{what}: empty sequence gives 0"
                );
                assert!(lse[bi * hq..(bi + 1) * hq]
                    .iter()
                    .all(|&x| x == f32::NEG_INFINITY));
                continue;
            }
            let n = n as usize;
            let span = cap * hk * d;
            let kb = TensorView::contiguous(&kx[bi * span..bi * span + n * hk * d], [1, n, hk, d])
                .unwrap();
            let vb = TensorView::contiguous(&vx[bi * span..bi * span + n * hk * d], [1, n, hk, d])
                .unwrap();
            let r =
                attention_f64(&qb, &kb, &vb, &AttnParams::default(), &|_, _, _, _| true).unwrap();
            let got = Tensor::new(
                longattn::tensor::Buffer::F32(rows.to_vec()),
                vec![1, 1, hq, d],
            )
            .unwrap();
            let (eo, el) = compare(&got, &lse[bi * hq..(bi + 1) * hq], &r);
            assert!(
                eo <= out_tolerance(DType::F32) && el <= LSE_TOLERANCE,
                "{what} seq {bi}: {eo:e} {el:e}"
            );
        }
    };
    let lens_t = RawTensor::contiguous(lens.as_ptr() as u64, RawDType::I32, &[b], Device::Cpu);
    let cache = |k: &[f32], v: &[f32], shape: [usize; 4], bt: Option<RawTensor>| KvCacheArgs {
        k: RawTensor::contiguous(f32_ptr(k), RawDType::Float(DType::F32), &shape, Device::Cpu),
        v: RawTensor::contiguous(f32_ptr(v), RawDType::Float(DType::F32), &shape, Device::Cpu),
        block_table: bt,
        seqlens: lens_t,
    };
    check(cache(&kx, &vx, [b, cap, hk, d], None), "contiguous");
    // Paged: pages of 16 tokens; the same keys, pages stored in reverse order.
    let (p, per) = (16, cap / 16);
    let npages = b * per;
    let page_elems = p * hk * d;
    let mut kp = vec![0f32; npages * page_elems];
    let mut vp = vec![0f32; npages * page_elems];
    let mut table = vec![0i32; b * per];
    for bi in 0..b {
        for pi in 0..per {
            let slot = npages - 1 - (bi * per + pi);
            table[bi * per + pi] = slot as i32;
            let src = (bi * cap + pi * p) * hk * d;
            kp[slot * page_elems..(slot + 1) * page_elems]
                .copy_from_slice(&kx[src..src + page_elems]);
            vp[slot * page_elems..(slot + 1) * page_elems]
                .copy_from_slice(&vx[src..src + page_elems]);
        }
    }
    let bt = RawTensor::contiguous(table.as_ptr() as u64, RawDType::I32, &[b, per], Device::Cpu);
    check(cache(&kp, &vp, [npages, p, hk, d], Some(bt)), "paged p16");
}

/// Errors name the tensor: a rank, a dtype, a device mismatch, a wrong output shape; a CUDA
/// tensor on a machine without a driver is a clean CUDA error.
#[test]
fn bad_input_names_the_tensor() {
    let x = vec![0.5f32; 2 * 8 * 2 * 16];
    let params = AttnParams::default();
    let good = RawTensor::contiguous(
        f32_ptr(&x),
        RawDType::Float(DType::F32),
        &[2, 8, 2, 16],
        Device::Cpu,
    );
    let mut lse = vec![0f32; 2 * 2 * 8];
    let mut out = vec![0f32; x.len()];
    let l = host_f32(&mut lse, &[2, 2, 8]);
    let o = host_f32(&mut out, &[2, 8, 2, 16]);
    let call = |q: RawTensor, k: RawTensor, o: RawTensor| -> Error {
        let a = AttnArgs {
            q,
            k,
            v: good,
            mask: MaskArg::Full,
            q_doc: None,
            k_doc: None,
            params: &params,
        };
        // SAFETY: the buffers live to the end of the call; the calls fail before reading.
        unsafe { api::forward(&a, &o, &l, 0) }.unwrap_err()
    };
    let rank3 = RawTensor::contiguous(
        f32_ptr(&x),
        RawDType::Float(DType::F32),
        &[2, 8, 32],
        Device::Cpu,
    );
    assert!(call(rank3, good, o).to_string().contains("`q`"));
    let mut bf = good;
    bf.dtype = RawDType::Float(DType::BF16);
    assert!(matches!(call(good, bf, o), Error::DType { ref tensor, .. } if tensor == "k"));
    let mut gpu = good;
    gpu.device = Device::Cuda(0);
    assert!(call(good, gpu, o).to_string().contains("`k` is on cuda:0"));
    let small = host_f32(&mut out, &[2, 8, 2, 8]);
    assert!(call(good, good, small).to_string().contains("`out`"));
    // All on a CUDA device that this machine may not have: a clean error, never a crash.
    let mut all = [good; 3];
    for t in &mut all {
        t.device = Device::Cuda(0);
    }
    let mut og = o;
    og.device = Device::Cuda(0);
    let mut lg = l;
    lg.device = Device::Cuda(0);
    let a = AttnArgs {
        q: all[0],
        k: all[1],
        v: all[2],
        mask: MaskArg::Full,
        q_doc: None,
        k_doc: None,
        params: &params,
    };
    if longattn::cuda::try_default_device().is_err() {
        // SAFETY: fails before any memory is touched (no driver).
        let e = unsafe { api::forward(&a, &og, &lg, 0) }.unwrap_err();
        assert!(matches!(e, Error::Cuda { .. }), "{e}");
    } else {
        eprintln!("skipped: a CUDA device is present (f32 is refused there by dtype instead)");
    }
}

/// A caller's gathered-key selection through the entry point (`api::forward_gathered`): head-major
/// K / V, awkward sizes, GQA, batch 2, one selection per (batch row, head) and one shared by all,
/// against the oracle over `mask & selection`; then the errors that name a mismatched selection.
#[test]
fn gathered_forward_matches_the_oracle() {
    use longattn::sparse::gather::TileKeys;
    let expr = MaskExpr::parse("causal & (sinks(2) | window(300,0))").unwrap();
    let mut n = 0;
    for &(sq, sk) in &[(1, 1), (7, 7), (65, 65), (113, 300), (300, 113), (1, 1023)] {
        for shared in [false, true] {
            n += 1;
            let (b, hq, hk, d) = (2, 4, 2, 32);
            let (sb, sh) = if shared { (1, 1) } else { (b, hq) };
            let sel = TileKeys::synthetic((64, 32), (sq, sk), (sb, sh), 0.3, n).unwrap();
            let q = random_tensor(DType::F32, &[b, sq, hq, d], 1.0, 40 + n);
            let k = random_tensor(DType::F32, &[b, sk, hk, d], 1.0, 41 + n);
            let v = random_tensor(DType::F32, &[b, sk, hk, d], 1.0, 42 + n);
            let (kx, ks, kst) = head_major(&k);
            let (vx, vs, vst) = head_major(&v);
            let qx = q.data.to_f32_vec();
            let mut out = vec![f32::NAN; b * sq * hq * d];
            let mut lse = vec![0f32; b * hq * sq];
            let params = AttnParams::default();
            let a = AttnArgs {
                q: raw(f32_ptr(&qx), [b, sq, hq, d], [sq * hq * d, hq * d, d, 1]),
                k: raw(f32_ptr(&kx), ks, kst),
                v: raw(f32_ptr(&vx), vs, vst),
                mask: MaskArg::Expr(&expr),
                q_doc: None,
                k_doc: None,
                params: &params,
            };
            let o = host_f32(&mut out, &[b, sq, hq, d]);
            let l = host_f32(&mut lse, &[b, hq, sq]);
            assert_eq!(api::gather_tiles(&a).unwrap(), (64, 64));
            // SAFETY: every buffer lives to the end of the call and holds what its view addresses.
            unsafe { api::forward_gathered(&a, &sel, &o, &l, 0) }.unwrap();
            let bm = expr.bind(MaskShape { batch: b, sq, sk }, None).unwrap();
            let (qv, kv, vv) = (
                q.view("q").unwrap(),
                k.view("k").unwrap(),
                v.view("v").unwrap(),
            );
            let r = attention_f64(&qv, &kv, &vv, &params, &|bb, h, i, j| {
                bm.allowed(bb, i, j) && sel.keeps(bb, h, i, j)
            })
            .unwrap();
            let got = Tensor::new(
                longattn::tensor::Buffer::F32(out.clone()),
                vec![b, sq, hq, d],
            )
            .unwrap();
            let (eo, el) = compare(&got, &lse, &r);
            assert!(
                eo < out_tolerance(DType::F32) && el < LSE_TOLERANCE,
                "sq {sq} sk {sk} shared {shared}: out err {eo}, lse err {el}"
            );
            // A selection for other sizes or another batch is refused by name.
            let other = TileKeys::synthetic((64, 32), (sq + 1, sk), (1, 1), 0.3, n).unwrap();
            let e = unsafe { api::forward_gathered(&a, &other, &o, &l, 0) }
                .unwrap_err()
                .to_string();
            assert!(e.contains("the selection is for Sq"), "{e}");
            let three = TileKeys::synthetic((64, 32), (sq, sk), (3, 1), 0.3, n).unwrap();
            let e = unsafe { api::forward_gathered(&a, &three, &o, &l, 0) }
                .unwrap_err()
                .to_string();
            assert!(e.contains("batch 3"), "{e}");
        }
    }
}

/// The backward through a gathered-key selection (`api::backward_gathered`, the CPU route):
/// dQ, dK, dV of a forward through the entry point against the f64 gradient oracle over `mask &
/// selection`, awkward sizes, GQA, batch 2, a per-(row, head) and a shared selection; a
/// mismatched selection is refused by name.
#[test]
fn gathered_backward_matches_the_oracle() {
    use longattn::reference::attention_backward_f64;
    use longattn::sparse::gather::TileKeys;
    use longattn::testing::{compare_grad, grad_tolerance};
    let expr = MaskExpr::parse("causal & (sinks(2) | window(90,0))").unwrap();
    let mut n = 100;
    for &(sq, sk) in &[(1, 63), (7, 7), (65, 130), (113, 65)] {
        for shared in [false, true] {
            n += 1;
            let (b, hq, hk, d) = (2, 4, 2, 16);
            let (sb, sh) = if shared { (1, 1) } else { (b, hq) };
            let sel = TileKeys::synthetic((32, 16), (sq, sk), (sb, sh), 0.3, n).unwrap();
            let t =
                |s: usize, h: usize, seed: u64| random_tensor(DType::F32, &[b, s, h, d], 1.0, seed);
            let (q, k, v, dout) = (
                t(sq, hq, n),
                t(sk, hk, n + 1),
                t(sk, hk, n + 2),
                t(sq, hq, n + 3),
            );
            let (qx, kx, vx, dox) = (
                q.data.to_f32_vec(),
                k.data.to_f32_vec(),
                v.data.to_f32_vec(),
                dout.data.to_f32_vec(),
            );
            let (mut out, mut lse) = (vec![0f32; b * sq * hq * d], vec![0f32; b * hq * sq]);
            let (mut dq, mut dk, mut dv) = (
                vec![f32::NAN; qx.len()],
                vec![f32::NAN; kx.len()],
                vec![f32::NAN; vx.len()],
            );
            let params = AttnParams::default();
            let a = AttnArgs {
                q: raw(f32_ptr(&qx), [b, sq, hq, d], [sq * hq * d, hq * d, d, 1]),
                k: raw(f32_ptr(&kx), [b, sk, hk, d], [sk * hk * d, hk * d, d, 1]),
                v: raw(f32_ptr(&vx), [b, sk, hk, d], [sk * hk * d, hk * d, d, 1]),
                mask: MaskArg::Expr(&expr),
                q_doc: None,
                k_doc: None,
                params: &params,
            };
            let o = host_f32(&mut out, &[b, sq, hq, d]);
            let l = host_f32(&mut lse, &[b, hq, sq]);
            let g = raw(f32_ptr(&dox), [b, sq, hq, d], [sq * hq * d, hq * d, d, 1]);
            let (gq, gk, gv) = (
                host_f32(&mut dq, &[b, sq, hq, d]),
                host_f32(&mut dk, &[b, sk, hk, d]),
                host_f32(&mut dv, &[b, sk, hk, d]),
            );
            let bp = longattn::BackwardParams::default();
            // SAFETY: every buffer lives to the end of the calls and holds what its view addresses.
            unsafe {
                api::forward_gathered(&a, &sel, &o, &l, 0).unwrap();
                api::backward_gathered(&a, &sel, &o, &l, &g, &gq, &gk, &gv, &bp, 0).unwrap();
            }
            let bm = expr.bind(MaskShape { batch: b, sq, sk }, None).unwrap();
            let r = attention_backward_f64(
                &q.view("q").unwrap(),
                &k.view("k").unwrap(),
                &v.view("v").unwrap(),
                &dout.view("do").unwrap(),
                &params,
                &|bb, h, i, j| bm.allowed(bb, i, j) && sel.keeps(bb, h, i, j),
            )
            .unwrap();
            let floor = r.dv.iter().fold(0.0f64, |m, &x| m.max(x.abs()));
            for (name, got, want, shape) in [
                ("dq", &dq, &r.dq, [b, sq, hq, d]),
                ("dk", &dk, &r.dk, [b, sk, hk, d]),
                ("dv", &dv, &r.dv, [b, sk, hk, d]),
            ] {
                let t = Tensor::new(longattn::tensor::Buffer::F32(got.clone()), shape.to_vec())
                    .unwrap();
                let e = compare_grad(&t, want, floor);
                assert!(
                    e < grad_tolerance(DType::F32),
                    "sq {sq} sk {sk} shared {shared}: {name} err {e}"
                );
            }
            // A selection for other sizes is refused by name, the gradients left as they were.
            let other = TileKeys::synthetic((32, 16), (sq, sk + 1), (1, 1), 0.3, n).unwrap();
            let before = dq.clone();
            let e =
                unsafe { api::backward_gathered(&a, &other, &o, &l, &g, &gq, &gk, &gv, &bp, 0) }
                    .unwrap_err()
                    .to_string();
            assert!(e.contains("the selection is for Sq"), "{e}");
            assert_eq!(
                dq.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                before.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
            );
        }
    }
}
