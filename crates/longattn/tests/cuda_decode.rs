//! The CUDA decode matrix (`cuda::decode::selftest`) and a short benchmark smoke run, on a GPU;
//! skipped with the reason printed on machines without one (CI).
use longattn::cuda::{self, decode};

#[test]
fn cuda_decode_selftest_passes_or_skips() {
    let dev = match cuda::try_default_device() {
        Ok(d) => d,
        Err(why) => {
            eprintln!("skipping the CUDA decode selftest: {why}");
            return;
        }
    };
    let results = decode::selftest(&dev).expect("selftest runs");
    let mut failed = Vec::new();
    for r in &results {
        eprintln!(
            "{:<6} {:<40} {} err {:.2e} (tol {:.1e}) lse {:.2e} {}",
            r.group,
            r.name,
            if r.passed { "ok  " } else { "FAIL" },
            r.err,
            r.tol,
            r.lse_err,
            r.detail
        );
        if !r.passed {
            failed.push(r.name.clone());
        }
    }
    assert!(failed.is_empty(), "failed: {failed:?}");
    // A small benchmark run: every row times something and moves bytes.
    let cfg = decode::DecodeBenchConfig {
        batch: 4,
        len: 1024,
        reps: 3,
        warmup: 1,
        ..Default::default()
    };
    let rows = decode::bench(&dev, &cfg).expect("bench runs");
    assert_eq!(rows.len(), 4);
    for r in rows {
        eprintln!("{r:?}");
        assert!(r.ms_median > 0.0 && r.gbps > 0.0);
    }
}

#[test]
fn cuda_decode_without_a_device_is_a_clear_error() {
    if cuda::try_default_device().is_ok() {
        return;
    }
    let e = cuda::CudaDevice::open(0)
        .err()
        .expect("no device here")
        .to_string();
    assert!(e.contains("cuda"), "{e}");
}
