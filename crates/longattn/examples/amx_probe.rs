//! Throughput of the AMX micro-kernels alone on L1/L2-resident data (one thread):
//! `cargo run --release --example amx_probe`.
use longattn::cpu::micro::amx::{available, Amx};
use longattn::cpu::micro::{Micro, BQ, NC};
use std::time::Instant;

fn main() {
    if !available() {
        println!("no AMX");
        return;
    }
    let d = 128;
    let m = Amx;
    m.begin();
    let q = vec![0x3F80u16; BQ * d];
    let kt = vec![0x3F00u16; d * NC];
    let mut s = vec![0f32; BQ * 4 * NC];
    let iters = 20000;
    let t = Instant::now();
    for _ in 0..iters {
        m.qk(&q, BQ, d, &kt, &mut s, 4 * NC);
    }
    let el = t.elapsed().as_secs_f64();
    println!(
        "qk  {:.0} GFLOP/s",
        2.0 * (BQ * NC * d * iters) as f64 / el / 1e9
    );
    let p = vec![0x3C00u16; BQ * 4 * NC];
    let v = vec![0x3C00u16; NC * d];
    let vts: Vec<&[u16]> = vec![&v; 4];
    let alpha = vec![1.0f32; BQ];
    let mut o = vec![0f32; BQ * d];
    let t = Instant::now();
    for _ in 0..iters / 4 {
        m.pv(&p, BQ, &vts, d, &alpha, &mut o);
    }
    let el = t.elapsed().as_secs_f64();
    println!(
        "pv  {:.0} GFLOP/s",
        2.0 * (BQ * 4 * NC * d * (iters / 4)) as f64 / el / 1e9
    );
}
