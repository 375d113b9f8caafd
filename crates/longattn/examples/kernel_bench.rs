//! Quick kernel timing without the CLI:
//! `cargo run --release --example kernel_bench -- f32 128 4096 causal [isa]`
//! (dtype, head dim, sequence length, mask expression, optional ISA; 8 heads, batch 1).
//! Prints useful GFLOP/s (FLOPs of allowed pairs only) and the schedule build time.
use longattn::cpu::Isa;
use longattn::mask::{MaskExpr, MaskShape};
use longattn::testing::random_tensor;
use longattn::{forward, AttnParams, DType, MaskSpec};
use std::time::Instant;

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let dt = DType::parse(a.get(1).map_or("f32", |s| s)).expect("dtype");
    let d: usize = a.get(2).map_or(128, |s| s.parse().unwrap());
    let n: usize = a.get(3).map_or(4096, |s| s.parse().unwrap());
    let expr = a.get(4).map_or("full", |s| s);
    let isa = a
        .get(5)
        .map(|s| *Isa::ALL.iter().find(|i| i.name() == s).expect("isa"));
    let h = 8;
    let q = random_tensor(dt, &[1, n, h, d], 1.0, 1);
    let k = random_tensor(dt, &[1, n, h, d], 1.0, 2);
    let v = random_tensor(dt, &[1, n, h, d], 1.0, 3);
    let (qv, kv, vv) = (
        q.view("q").unwrap(),
        k.view("k").unwrap(),
        v.view("v").unwrap(),
    );
    let bound = MaskExpr::parse(expr)
        .unwrap()
        .bind(
            MaskShape {
                batch: 1,
                sq: n,
                sk: n,
            },
            None,
        )
        .unwrap();
    let t = Instant::now();
    let sched = bound.schedule(64, 64).unwrap();
    let t_sched = t.elapsed().as_secs_f64();
    std::hint::black_box(sched);
    let p = AttnParams {
        isa,
        ..Default::default()
    };
    let flops = 4.0 * h as f64 * bound.allowed_pairs(0) as f64 * d as f64;
    let mut times = vec![];
    for _ in 0..5 {
        let t = Instant::now();
        let o = forward(&qv, &kv, &vv, &p, MaskSpec::Expr(&bound)).unwrap();
        times.push(t.elapsed().as_secs_f64());
        std::hint::black_box(o);
    }
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let t = times[2];
    println!(
        "{dt} d{d} n{n} `{expr}`: {:.1} ms, {:.1} GFLOP/s (schedule {:.3} ms = {:.3}%)",
        t * 1e3,
        flops / t / 1e9,
        t_sched * 1e3,
        100.0 * t_sched / t
    );
}
