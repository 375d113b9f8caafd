//! The linear-attention CUDA kernels: the selftest's `linear` cases (quick subset) against the
//! f64 oracle on a GPU, skipped with a printed reason elsewhere. Timings against
//! flash-linear-attention: `bash scripts/gpu/linear_check.sh perf` on the GPU machine.
use longattn::cuda::selftest::{check_linear, check_linear_errors, linear_cases};
use longattn::cuda::try_default_device;

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
