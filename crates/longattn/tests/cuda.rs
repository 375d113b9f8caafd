//! CUDA backend tests. Machines without an NVIDIA GPU (CI) check that the backend says so
//! clearly and skip the device cases, printing why; on a GPU machine the forward matrix runs
//! against the f64 oracle (`longattn selftest --backend cuda` runs the whole matrix).
use longattn::cuda::selftest::{
    backward_cases, check_backward, check_errors, check_forward, check_mask_constants,
    forward_cases,
};
use longattn::cuda::{try_default_device, CudaDevice};
use longattn::mask::MaskExpr;

#[test]
fn without_a_device_the_error_is_clear() {
    match CudaDevice::open(0) {
        Err(e) => {
            let m = e.to_string();
            assert!(m.starts_with("cuda open:"), "unclear error: {m}");
            eprintln!("no CUDA device here (as expected on CI): {m}");
        }
        Ok(_) => {
            let e = CudaDevice::open(999)
                .err()
                .expect("device 999 must not exist");
            assert!(e.to_string().contains("no CUDA device 999"), "{e}");
        }
    }
}

#[test]
fn forward_matrix_on_the_gpu_or_skip() {
    let dev = match try_default_device() {
        Ok(d) => d,
        Err(why) => {
            eprintln!("skipping the CUDA forward matrix: {why}");
            return;
        }
    };
    let failed: Vec<String> = forward_cases(true)
        .iter()
        .enumerate()
        .map(|(n, c)| check_forward(&dev, c, 77 + n as u64))
        .chain(check_errors(&dev))
        .chain(check_mask_constants(&dev))
        .filter(|r| !r.passed)
        .map(|r| {
            format!(
                "{}: err {:.2e} (tol {:.2e}) {}",
                r.name, r.err, r.tol, r.detail
            )
        })
        .collect();
    assert!(failed.is_empty(), "failed cases:\n{}", failed.join("\n"));
}

#[test]
fn backward_matrix_on_the_gpu_or_skip() {
    let dev = match try_default_device() {
        Ok(d) => d,
        Err(why) => {
            eprintln!("skipping the CUDA backward matrix: {why}");
            return;
        }
    };
    let failed: Vec<String> = backward_cases(true)
        .iter()
        .enumerate()
        .map(|(n, c)| check_backward(&dev, c, 91 + n as u64))
        .filter(|r| !r.passed)
        .map(|r| {
            format!(
                "{}: err {:.2e} (tol {:.2e}) {}",
                r.name, r.err, r.tol, r.detail
            )
        })
        .collect();
    assert!(failed.is_empty(), "failed cases:\n{}", failed.join("\n"));
}

/// The generated device program tests every atom, reading the atoms' constants from the kernel
/// parameters (`p.mc`, returned beside the source) (host-side; the device selftest checks its
/// semantics against the CPU element reference).
#[test]
fn mask_program_is_generated_for_every_atom() {
    use longattn::mask::{DocIds, MaskShape};
    let shape = MaskShape {
        batch: 1,
        sq: 512,
        sk: 512,
    };
    let cases: [(&str, &str, &[i32]); 9] = [
        ("causal", "(j <= pos)", &[]),
        (
            "window(7,3)",
            "pos - p.mc[0] <= j && j <= pos + p.mc[1]",
            &[7, 3],
        ),
        (
            "sinks(4) | prefix(9)",
            "(j < p.mc[0]) || (j < p.mc[1])",
            &[4, 9],
        ),
        ("chunk(64)", "la_fdiv(pos, p.mc[0])", &[64]),
        ("strided(3)", "la_emod(pos - j, p.mc[0])", &[3]),
        ("!causal & document", "p.qdoc[", &[]),
        ("causal & power(64)", "la_power(pos, j, p.mc[0])", &[64]),
        (
            "radial(1560,780)",
            "la_radial(pos, j, p.mc[0], p.mc[1])",
            &[1560, 780],
        ),
        (
            "neighborhood2d(16,32,5,7)",
            "la_nbr_axis(i, j, p.mc[0], p.mc[1], p.mc[2], p.mc[3]) && la_nbr_axis(i, j, p.mc[4], ",
            &[16, 32, 5, 1, 32, 1, 7, 1],
        ),
    ];
    for (expr, needle, consts) in cases {
        let e = MaskExpr::parse(expr).unwrap();
        let docs = e.uses_documents().then(|| DocIds {
            q: vec![0; 512],
            k: vec![0; 512],
        });
        let prog = e.bind(shape, docs).unwrap().cuda_program();
        assert!(prog.source.contains(needle), "`{expr}` -> {}", prog.source);
        assert!(prog.source.contains("bool la_mask("), "{}", prog.source);
        assert_eq!(prog.consts, consts, "`{expr}`");
    }
}

/// The one-interval-per-row form (two compares per element in the warp-specialized kernel) is
/// offered exactly for `&`-combinations of interval atoms; its bounds are the atoms' own.
#[test]
fn interval_programs_only_for_interval_masks() {
    use longattn::mask::{DocIds, MaskShape};
    let shape = MaskShape {
        batch: 1,
        sq: 512,
        sk: 512,
    };
    for (expr, want) in [
        ("causal", Some(("0", "pos"))),
        (
            "causal & window(1024,0)",
            Some(("(pos - p.mc[0])", "(pos + p.mc[1])")),
        ),
        (
            "prefix(9) & chunk(64)",
            Some(("la_fdiv(pos, p.mc[1]) * p.mc[1]", "(p.mc[0] - 1)")),
        ),
        ("full", Some(("-2147483647", "2147483647"))),
        ("causal & (sinks(4) | window(8,0))", None),
        ("!causal", None),
        ("strided(3)", None),
        ("causal & document", Some(("p.dlo[", "la_imin(pos, p.dhi["))),
        ("neighborhood(5)", None),
    ] {
        let e = MaskExpr::parse(expr).unwrap();
        let docs = e.uses_documents().then(|| DocIds {
            q: vec![0; 512],
            k: vec![0; 512],
        });
        let bound = e.bind(shape, docs).unwrap();
        let prog = bound.cuda_interval_program();
        if let Some(p) = &prog {
            // The element program's constants, in the same slots.
            assert_eq!(p.consts, bound.cuda_program().consts, "`{expr}`");
        }
        match (want, &prog) {
            (None, None) => {}
            (Some((lo, hi)), Some(p)) => {
                let p = &p.source;
                let lo_line = p
                    .lines()
                    .find(|l| l.trim_start().starts_with("lo ="))
                    .unwrap();
                let hi_line = p
                    .lines()
                    .find(|l| l.trim_start().starts_with("hi ="))
                    .unwrap();
                assert!(
                    lo_line.contains(lo) || (lo == "0" && lo_line.contains("-2147483647")),
                    "`{expr}`: {lo_line}"
                );
                assert!(hi_line.contains(hi), "`{expr}`: {hi_line}");
                assert!(p.contains("#define LA_MASK_INTERVAL 1"), "{p}");
            }
            _ => panic!("`{expr}`: expected {want:?}, got {prog:?}"),
        }
    } // Documents whose keys are not one run each (ids alternate) keep the element program.
    let e = MaskExpr::parse("causal & document").unwrap();
    let ids: Vec<i32> = (0..512).map(|t| t % 2).collect();
    let bound = e
        .bind(
            shape,
            Some(DocIds {
                q: ids.clone(),
                k: ids,
            }),
        )
        .unwrap();
    assert!(bound.cuda_interval_program().is_none());
    assert!(bound.doc_key_intervals().is_none());
}
