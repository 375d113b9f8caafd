//! Throughput of the AVX-512 f32 micro-kernels and the softmax step alone on L1/L2-resident data
//! (one thread): `cargo run --release --example f32_probe`.
use longattn::cpu::micro::avx512::Avx512;
use longattn::cpu::micro::{Logits, Micro, BQ, NC};
use std::time::Instant;

fn main() {
    for d in [64usize, 128] {
        let m = Avx512;
        let q = vec![0.5f32; BQ * d];
        let kt = vec![0.25f32; d * NC];
        let mut s = vec![0f32; BQ * 2 * NC];
        let iters = 20000;
        let t = Instant::now();
        for _ in 0..iters {
            m.qk(&q, BQ, d, &kt, &mut s, 2 * NC);
        }
        let el = t.elapsed().as_secs_f64();
        println!(
            "d{d} qk  {:.0} GFLOP/s",
            2.0 * (BQ * NC * d * iters) as f64 / el / 1e9
        );
        let p = vec![0.01f32; BQ * 2 * NC];
        let v = vec![0.5f32; NC * d];
        let vts: Vec<&[f32]> = vec![&v; 2];
        let alpha = vec![1.0f32; BQ];
        let mut o = vec![0f32; BQ * d];
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
        let mut pp = vec![0f32; BQ * 2 * NC];
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
