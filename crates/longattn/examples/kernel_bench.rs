//! Quick kernel timing without the CLI: `cargo run --release --example kernel_bench -- f32 128 4096 causal`
//! (dtype, head dim, sequence length, full|causal; 8 heads, batch 1). Prints useful GFLOP/s.
use longattn::cpu::Isa;
use longattn::testing::{brute_force_schedule, random_tensor, FnMask};
use longattn::{forward, AttnParams, DType, MaskSpec};
use std::time::Instant;

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let dt = DType::parse(a.get(1).map_or("f32", |s| s)).expect("dtype");
    let d: usize = a.get(2).map_or(128, |s| s.parse().unwrap());
    let n: usize = a.get(3).map_or(4096, |s| s.parse().unwrap());
    let causal = a.get(4).is_some_and(|s| s == "causal");
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
    let cm = |_: usize, i: usize, j: usize| j <= i;
    let rows = FnMask(cm);
    let sched = causal.then(|| brute_force_schedule(64, 64, 1, n, n, &cm).unwrap());
    let spec = match &sched {
        Some(s) => MaskSpec::Schedule {
            schedule: s,
            rows: Some(&rows),
        },
        None => MaskSpec::Full,
    };
    let p = AttnParams {
        isa,
        ..Default::default()
    };
    let pairs = if causal { n * (n + 1) / 2 } else { n * n } as f64;
    let flops = 4.0 * h as f64 * pairs * d as f64;
    let mut times = vec![];
    for _ in 0..5 {
        let t = Instant::now();
        let o = forward(&qv, &kv, &vv, &p, spec).unwrap();
        times.push(t.elapsed().as_secs_f64());
        std::hint::black_box(o);
    }
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let t = times[2];
    println!(
        "{dt} d{d} n{n} {} : {:.1} ms, {:.1} GFLOP/s",
        if causal { "causal" } else { "full" },
        t * 1e3,
        flops / t / 1e9
    );
}
