//! The linear-attention CUDA kernels: the selftest's `linear` cases (quick subset) against the
//! f64 oracle on a GPU, skipped with a printed reason elsewhere; and an ignored benchmark
//! (`cargo test --release -p longattn --test linear_cuda -- --ignored --nocapture`), shapes from
//! `LONGATTN_LINEAR_BENCH="B,T,H,Hk,K,V;..."` (default: the (1, 64k, 32, 128) and
//! (4, 32k, 32, 128)), decay from `LONGATTN_LINEAR_DECAY` (none | head | token, default token).
use longattn::cuda::selftest::{check_linear, check_linear_errors, linear_cases};
use longattn::cuda::try_default_device;
use longattn::tensor::DType;

#[test]
fn linear_matrix_on_the_gpu_or_skip() {
    let dev = match try_default_device() {
        Ok(d) => d,
        Err(why) => {
            eprintln!("skipped: no CUDA device ({why})");
            return;
        }
    };
    let mut failed = Vec::new();
    for (n, c) in linear_cases(true).iter().enumerate() {
        let r = check_linear(&dev, c, 300 + n as u64);
        if !r.passed {
            failed.push(format!(
                "{}: err {:.2e} > {:.2e} ({})",
                r.name, r.err, r.tol, r.detail
            ));
        }
    }
    for r in check_linear_errors(&dev) {
        if !r.passed {
            failed.push(format!("{}: {}", r.name, r.detail));
        }
    }
    assert!(
        failed.is_empty(),
        "linear cases failed:\n{}",
        failed.join("\n")
    );
}

#[test]
#[ignore = "benchmark: needs a GPU, run with --ignored --nocapture"]
fn linear_bench() {
    let dev = match try_default_device() {
        Ok(d) => d,
        Err(why) => {
            eprintln!("skipped: no CUDA device ({why})");
            return;
        }
    };
    let shapes = std::env::var("LONGATTN_LINEAR_BENCH").unwrap_or_else(|_| {
        "1,65536,32,32,128,128;4,32768,32,32,128,128;1,16384,32,32,128,128".into()
    });
    let decay = std::env::var("LONGATTN_LINEAR_DECAY").unwrap_or_else(|_| "token".into());
    for s in shapes.split(';') {
        let x: Vec<usize> = s
            .split(',')
            .map(|v| v.trim().parse().expect("shape"))
            .collect();
        let [b, t, h, hk, k, v] = x[..] else {
            panic!("shape `{s}`: expected B,T,H,Hk,K,V");
        };
        let r = longattn::linear::cuda::bench(&dev, (b, t, h, hk, k, v), DType::BF16, &decay, 10)
            .expect("bench");
        println!(
            "linear bf16 {decay} B{b} T{t} H{h}/{hk} K{k} V{v}: forward {:.3} ms ({:.2} TB/s of q/k/v/o), forward+backward {:.3} ms, step {:.4} ms ({:.2} TB/s of state)",
            r.forward_ms,
            r.forward_bytes / r.forward_ms / 1e9,
            r.forward_backward_ms,
            r.step_ms,
            r.step_bytes / r.step_ms / 1e9
        );
    }
}
