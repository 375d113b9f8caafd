//! Throughput of the AVX-512 f32 micro-kernels and the softmax step alone on L1/L2-resident data
//! (one thread, cache-line aligned buffers): `cargo run --release --example f32_probe`.
use longattn::cpu::buf::AlignedBuf;
use longattn::cpu::micro::avx512::Avx512;
use longattn::cpu::micro::{Logits, Micro, BQ, LDP, LDS, NC};
use std::time::Instant;

/// A cache-line aligned buffer filled with `x` (as the kernel's scratch is).
fn buf(len: usize, x: f32) -> AlignedBuf<f32> {
    let mut b = AlignedBuf::zeroed(len);
    b.fill(x);
    b
}

fn main() {
    for d in [64usize, 128] {
        let m = Avx512;
        let q = buf(BQ * d, 0.5);
        let kt = buf(d * NC, 0.25);
        let mut s = buf(BQ * LDS, 0.0);
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
        let p = buf(BQ * LDP, 0.01);
        let v = buf(NC * d, 0.5);
        let vts: Vec<&[f32]> = vec![&v; 2];
        let alpha = vec![1.0f32; BQ];
        let mut o = buf(BQ * d, 0.0);
        let t = Instant::now();
        for _ in 0..iters / 2 {
            m.pv(&p, BQ, &vts, d, &alpha, &mut o);
        }
        let el = t.elapsed().as_secs_f64();
        println!(
            "d{d} pv  {:.0} GFLOP/s",
            2.0 * (BQ * 2 * NC * d * (iters / 2)) as f64 / el / 1e9
        );
        let mask = vec![u64::MAX; BQ * 4];
        let lg = Logits {
            scale: 0.1,
            softcap: None,
        };
        let (mut mm, mut l, mut a) = (vec![0f32; BQ], vec![0f32; BQ], vec![0f32; BQ]);
        let mut pp = buf(BQ * LDP, 0.0);
        let t = Instant::now();
        for _ in 0..iters / 2 {
            m.softmax(&s, BQ, 2, &mask, &lg, &mut mm, &mut l, &mut a, &mut pp);
        }
        let el = t.elapsed().as_secs_f64();
        println!(
            "softmax {:.2} ns per element",
            el * 1e9 / (BQ * 2 * NC * (iters / 2)) as f64
        );
    }
}
