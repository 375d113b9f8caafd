//! Throughput of the AMX micro-kernels and the bf16 softmax step alone on L1/L2-resident,
//! cache-line aligned data (one thread): `cargo run --release --example amx_probe`.
//! A group is 4 chunks of 64 keys (S and P rows 256 long), as in the driver.
use longattn::cpu::buf::AlignedBuf;
use longattn::cpu::micro::amx::{available, Amx};
use longattn::cpu::micro::{Logits, Micro, BQ, LDP, LDS, NC};
use std::time::Instant;

fn buf<T: bytemuck::Pod>(len: usize, x: T) -> AlignedBuf<T> {
    let mut b = AlignedBuf::zeroed(len);
    b.fill(x);
    b
}

fn main() {
    if !available() {
        println!("no AMX");
        return;
    }
    let m = Amx;
    m.begin();
    let w = 4;
    for d in [64usize, 128] {
        let q = buf(BQ * d, 0x3F80u16);
        let kt = buf(d * NC, 0x3F00u16);
        let mut s = buf(BQ * LDS, 0f32);
        let iters = 20000;
        let t = Instant::now();
        for _ in 0..iters {
            m.qk(&q, BQ, d, &kt, &mut s, LDS);
        }
        let el = t.elapsed().as_secs_f64();
        println!(
            "d{d} qk  {:.0} GFLOP/s",
            2.0 * (BQ * NC * d * iters) as f64 / el / 1e9
        );
        let p = buf(BQ * LDP, 0x3C00u16);
        let v = buf(NC * d, 0x3C00u16);
        let vts: Vec<&[u16]> = vec![&v; w];
        let alpha = vec![1.0f32; BQ];
        let mut o = buf(BQ * d, 0f32);
        let t = Instant::now();
        for _ in 0..iters / w {
            m.pv(&p, BQ, &vts, d, &alpha, &mut o);
        }
        let el = t.elapsed().as_secs_f64();
        println!(
            "d{d} pv  {:.0} GFLOP/s",
            2.0 * (BQ * w * NC * d * (iters / w)) as f64 / el / 1e9
        );
    }
    // The same with K^T / V chunks streaming from a 1 MiB (L2-resident) panel, as in the driver.
    for d in [64usize, 128] {
        let chunks = (1 << 20) / (2 * d * NC);
        let q = buf(BQ * d, 0x3F80u16);
        let kt = buf(chunks * d * NC, 0x3F00u16);
        let mut s = buf(BQ * LDS, 0f32);
        let iters = 20000;
        let t = Instant::now();
        for i in 0..iters {
            let c = (i % chunks) * d * NC;
            m.qk(&q, BQ, d, &kt[c..c + d * NC], &mut s, LDS);
        }
        let el = t.elapsed().as_secs_f64();
        println!(
            "d{d} qk, K^T from L2: {:.0} GFLOP/s",
            2.0 * (BQ * NC * d * iters) as f64 / el / 1e9
        );
        let p = buf(BQ * LDP, 0x3C00u16);
        let v = buf(chunks * NC * d, 0x3C00u16);
        let alpha = vec![1.0f32; BQ];
        let mut o = buf(BQ * d, 0f32);
        let t = Instant::now();
        for i in 0..iters / w {
            let vts: Vec<&[u16]> = (0..w)
                .map(|g| {
                    let c = ((i * w + g) % chunks) * NC * d;
                    &v[c..c + NC * d]
                })
                .collect();
            m.pv(&p, BQ, &vts, d, &alpha, &mut o);
        }
        let el = t.elapsed().as_secs_f64();
        println!(
            "d{d} pv, V from L2: {:.0} GFLOP/s",
            2.0 * (BQ * w * NC * d * (iters / w)) as f64 / el / 1e9
        );
    }
    // One group step as the driver runs it (qk on 4 chunks, softmax, pv) with K^T / V streaming
    // from a 1 MiB panel: ns per (query, key) pair.
    for d in [64usize, 128] {
        let chunks = (1 << 20) / (2 * d * NC);
        let q = buf(BQ * d, 0x3F80u16);
        let kt = buf(chunks * d * NC, 0x3C00u16);
        let v = buf(chunks * NC * d, 0x3C00u16);
        let mut s = buf(BQ * LDS, 0f32);
        let mut p = buf(BQ * LDP, 0u16);
        let mut o = buf(BQ * d, 0f32);
        let mask = vec![u64::MAX; BQ * 4];
        let lg = Logits {
            scale: 0.01,
            softcap: None,
        };
        let (mut mm, mut l, mut a) = (vec![f32::NEG_INFINITY; BQ], vec![0f32; BQ], vec![0f32; BQ]);
        let groups = 4000;
        let t = Instant::now();
        for i in 0..groups {
            let mut vts: [&[u16]; 4] = [&[]; 4];
            for (g, vt) in vts.iter_mut().enumerate() {
                let c = (i * w + g) % chunks;
                m.qk(
                    &q,
                    BQ,
                    d,
                    &kt[c * d * NC..(c + 1) * d * NC],
                    &mut s[g * NC..],
                    LDS,
                );
                *vt = &v[c * NC * d..(c + 1) * NC * d];
            }
            m.softmax(&s, BQ, w, &mask, &lg, &mut mm, &mut l, &mut a, &mut p);
            m.pv(&p, BQ, &vts, d, &a, &mut o);
        }
        let el = t.elapsed().as_secs_f64();
        println!(
            "d{d} group step, K/V from L2: {:.3} ns per pair ({:.0} GFLOP/s)",
            el * 1e9 / (groups * BQ * w * NC) as f64,
            4.0 * (groups * BQ * w * NC * d) as f64 / el / 1e9
        );
    }
    // The softmax step on a group of 4 chunks, every key allowed; logits spread over a few
    // units so the running max settles after the first call.
    let mut s = AlignedBuf::<f32>::zeroed(BQ * LDS);
    for (i, x) in s.iter_mut().enumerate() {
        *x = ((i * 7919) % 1000) as f32 * 0.01;
    }
    let mask = vec![u64::MAX; BQ * 4];
    let lg = Logits {
        scale: 0.3,
        softcap: None,
    };
    let (mut mm, mut l, mut a) = (vec![f32::NEG_INFINITY; BQ], vec![0f32; BQ], vec![0f32; BQ]);
    let mut pp = AlignedBuf::<u16>::zeroed(BQ * LDP);
    let iters = 20000;
    let t = Instant::now();
    for _ in 0..iters {
        m.softmax(&s, BQ, w, &mask, &lg, &mut mm, &mut l, &mut a, &mut pp);
    }
    let el = t.elapsed().as_secs_f64();
    println!(
        "softmax (bf16 P) {:.3} ns per element",
        el * 1e9 / (BQ * w * NC * iters) as f64
    );
}
