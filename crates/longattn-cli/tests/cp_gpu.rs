//! The GPU transports' commands on any machine: `cp nccl-check` and `cp loopback-check` either
//! pass or name what is missing (the NCCL library, the GPU), never a panic. On a GPU machine with
//! NCCL they run their checks (PASS lines only).
use std::process::{Command, Output};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_longattn"))
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// Without NCCL (CI, this machine) a clear error naming the library, cudarc's names and how to
/// point at it; without a GPU a clear CUDA error; with both, PASS lines only.
#[test]
fn nccl_check_passes_or_names_what_is_missing() {
    let o = bin()
        .args(["cp", "nccl-check", "--timeout", "20", "--len", "1031"])
        .env_remove("RANK")
        .env_remove("LONGATTN_NCCL_LIB")
        .output()
        .unwrap();
    let (out, err) = text(&o);
    assert!(!err.contains("panicked"), "{err}");
    if o.status.success() {
        assert!(out.contains("PASS rank 0 of 1: nccl all-reduce"), "{out}");
        assert!(!out.contains("FAIL"), "{out}");
    } else if out.contains("nccl loads") {
        // NCCL is here, the GPU is not
        assert!(err.contains("cuda") || err.contains("GPU"), "{err}");
    } else {
        for part in [
            "the NCCL library (libnccl) was not found",
            "libnccl.so.13",
            "not libnccl.so.2",
            "LONGATTN_NCCL_LIB",
            "/usr/local/cuda/lib64",
        ] {
            assert!(err.contains(part), "`{part}` in {err}");
        }
    }
    let o = bin()
        .args(["cp", "nccl-check"])
        .env("LONGATTN_NCCL_LIB", "/nonexistent/libnccl.so.2")
        .output()
        .unwrap();
    let (_, err) = text(&o);
    assert!(
        !o.status.success()
            && err.contains("LONGATTN_NCCL_LIB=/nonexistent/libnccl.so.2: no such file"),
        "{err}"
    );
    let o = bin()
        .args(["cp", "nccl-check", "--len", "0"])
        .output()
        .unwrap();
    let (_, err) = text(&o);
    assert!(!o.status.success() && err.contains("--len 0"), "{err}");
}

/// Without a GPU: "skipped: no CUDA device" and success, or failure with --require-gpu; bad
/// arguments are named before any device is opened. With a GPU: the checks of one P, PASS only.
#[test]
fn loopback_check_skips_without_a_gpu_or_passes() {
    let o = bin()
        .args(["cp", "loopback-check", "--ranks", "3", "--len", "1031"])
        .output()
        .unwrap();
    let (out, err) = text(&o);
    assert!(!err.contains("panicked"), "{err}");
    let gpu = !out.contains("skipped: no CUDA device");
    if gpu {
        assert!(o.status.success(), "{out}\n{err}");
        assert!(out.contains("PASS P 3 causal n 173 vs f64 oracle"), "{out}");
        assert!(out.contains("PASS P 3 full n 1031"), "{out}");
        assert!(out.contains("step 2: compute"), "{out}");
        assert!(!out.contains("FAIL"), "{out}");
    } else {
        assert!(o.status.success(), "{err}");
        let o = bin()
            .args(["cp", "loopback-check", "--require-gpu", "--ranks", "2"])
            .output()
            .unwrap();
        let (_, err) = text(&o);
        assert!(
            !o.status.success() && err.contains("no CUDA device"),
            "{err}"
        );
    }
    for (args, want) in [
        (vec!["--ranks", "0"], "--ranks 0"),
        (
            vec!["--ranks", "9", "--len", "17"],
            "needs at least 2P tokens",
        ),
        (vec!["--dim", "72"], "--dim 72"),
        (
            vec!["--heads", "6", "--kv-heads", "4"],
            "--kv-heads must divide",
        ),
    ] {
        let o = bin()
            .args(["cp", "loopback-check"])
            .args(&args)
            .output()
            .unwrap();
        let (_, err) = text(&o);
        assert!(!o.status.success() && err.contains(want), "{args:?}: {err}");
    }
}

/// A stand-in NCCL built here (every function longattn looks for; `ncclGetVersion` says 2.27.3,
/// the others fail) under the name NCCL ships with, `libnccl.so.2`, which cudarc does not open
/// by name: `cp nccl-check` starts itself again once with the link folder first on
/// LD_LIBRARY_PATH, then loads it by name (PASS with its version) and stops at the hidden GPU
/// with a clear error. A process marked as restarted that still cannot load it by name fails
/// with the reason instead of starting again (no loop). Needs a C compiler (`cc`, the one Rust
/// links with).
#[test]
fn nccl_restart_with_the_link_folder_happens_once() {
    let dir = std::env::temp_dir().join(format!("longattn-fake-nccl-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let src = dir.join("fake.c");
    let mut c = String::from("int ncclGetVersion(int* v) { *v = 22703; return 0; }\n");
    for f in longattn::cp::nccl::SYMBOLS
        .iter()
        .filter(|&&f| f != "ncclGetVersion")
    {
        c.push_str(&format!("int {f}(void) {{ return 1; }}\n"));
    }
    std::fs::write(&src, c).unwrap();
    let lib = dir.join("libnccl.so.2");
    let built = Command::new("cc")
        .args(["-shared", "-fPIC", "-o"])
        .arg(&lib)
        .arg(&src)
        .status()
        .expect("a C compiler (cc)");
    assert!(built.success());
    let run = |restarted: bool| {
        let mut cmd = bin();
        cmd.args(["cp", "nccl-check"])
            .env("LONGATTN_NCCL_LIB", &lib)
            .env("CUDA_VISIBLE_DEVICES", "")
            .env_remove("RANK");
        if restarted {
            cmd.env("LONGATTN_NCCL_RESTARTED", "1");
        }
        text(&cmd.output().unwrap())
    };
    let (out, err) = run(false);
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(err.matches("starting again with").count(), 1, "{err}");
    assert!(
        out.contains("PASS rank 0 of 1: nccl loads (version 22703)"),
        "{out}\n{err}"
    );
    assert!(err.contains("GPU 0") || err.contains("cuda"), "{err}");
    let (out, err) = run(true);
    assert!(!err.contains("starting again"), "{err}");
    assert!(
        err.contains("still does not load by name") && !out.contains("PASS"),
        "{out}\n{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
