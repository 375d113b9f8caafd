//! Quick kernel timing without the CLI:
//! `cargo run --release --example kernel_bench -- f32 128 4096 causal [isa] [--backward]`
//! (dtype, head dim, sequence length, mask expression, optional ISA; 8 heads, batch 1).
//! Prints useful GFLOP/s (FLOPs of allowed pairs only) of the median and the best run (at least 5
//! runs and 1 s) and the schedule build time. `--backward` times the backward (fast mode, 2.5x the
//! forward's FLOPs) on the forward's output and a random dO instead.
use longattn::cpu::Isa;
use longattn::mask::{MaskExpr, MaskShape};
use longattn::testing::random_tensor;
use longattn::{backward, forward, AttnParams, BackwardParams, DType, MaskSpec};
use std::time::Instant;

fn main() {
    let all: Vec<String> = std::env::args().collect();
    let bwd = all.iter().any(|x| x == "--backward");
    let a: Vec<String> = all.into_iter().filter(|x| x != "--backward").collect();
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
        .bind(MaskShape::square(n), None)
        .unwrap();
    let t = Instant::now();
    let sched = bound.schedule(64, 64).unwrap();
    let t_sched = t.elapsed().as_secs_f64();
    std::hint::black_box(sched);
    let p = AttnParams {
        isa,
        ..Default::default()
    };
    let flops =
        4.0 * h as f64 * bound.allowed_pairs(0) as f64 * d as f64 * if bwd { 2.5 } else { 1.0 };
    // The forward's output and LSE feed the backward; the call is also the warm-up.
    let fwd = forward(&qv, &kv, &vv, &p, MaskSpec::Expr(&bound)).unwrap();
    let dout = random_tensor(dt, &[1, n, h, d], 1.0, 4);
    let (ov, dov) = (fwd.out.view("out").unwrap(), dout.view("do").unwrap());
    let bp = BackwardParams {
        deterministic: false,
        ..Default::default()
    };
    let mut times = vec![];
    let mut cpu = vec![];
    // At least 5 runs and 1 s: the best run is the steadiest figure on a shared machine.
    let start = Instant::now();
    while times.len() < 5 || start.elapsed().as_secs_f64() < 1.0 {
        let (t, c) = (Instant::now(), cpu_seconds());
        if bwd {
            let g = backward(
                &qv,
                &kv,
                &vv,
                &ov,
                &fwd.lse,
                &dov,
                &p,
                MaskSpec::Expr(&bound),
                &bp,
            );
            std::hint::black_box(g.unwrap());
        } else {
            let o = forward(&qv, &kv, &vv, &p, MaskSpec::Expr(&bound)).unwrap();
            std::hint::black_box(o);
        }
        times.push(t.elapsed().as_secs_f64());
        cpu.push(cpu_seconds() - c);
    }
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    cpu.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let t = times[times.len() / 2];
    // CPU time per thread: a steadier figure than wall time when other work shares the cores.
    let tc = cpu[cpu.len() / 2] / rayon::current_num_threads() as f64;
    println!("  cpu-time based: {:.1} GFLOP/s", flops / tc / 1e9);
    println!(
        "  best of {}: {:.3} ms, {:.1} GFLOP/s",
        times.len(),
        times[0] * 1e3,
        flops / times[0] / 1e9
    );
    println!(
        "{dt} d{d} n{n} `{expr}`: {:.1} ms, {:.1} GFLOP/s (schedule {:.3} ms = {:.3}%)",
        t * 1e3,
        flops / t / 1e9,
        t_sched * 1e3,
        100.0 * t_sched / t
    );
}

/// User + system CPU seconds of this process so far.
fn cpu_seconds() -> f64 {
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage writes into the struct we pass.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    tv(u.ru_utime) + tv(u.ru_stime)
}
