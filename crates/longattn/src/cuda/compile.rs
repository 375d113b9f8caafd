//! Run-time compilation of the `.cu` kernels with NVRTC, cached in memory (per device, in
//! [`super::CudaDevice`]) and on disk.
//!
//! Disk cache: `$LONGATTN_CUDA_CACHE` or `~/.cache/longattn/cuda/`, one CUBIN per variant, named
//! `<kernel>-<sha256 of (source, options, architecture, NVRTC version)>.cubin`, written to a
//! temporary file and renamed, so concurrent processes never read half a file. A changed source,
//! option or NVRTC version is a new key; stale files are simply never read again.
use std::ffi::{CStr, CString};
use std::path::PathBuf;
use std::time::Instant;

use cudarc::nvrtc::{result as nvres, sys as nv};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

fn err(msg: impl Into<String>) -> Error {
    Error::Cuda {
        op: "compile",
        msg: msg.into(),
    }
}

/// Makes NVRTC loadable when `libnvrtc` is not on the loader path but in a CUDA install
/// (`$CUDA_HOME`, `$CUDA_PATH`, `/usr/local/cuda`): the library is opened by its full path, so a
/// later open by name finds it already loaded.
pub(crate) fn nvrtc_present() -> bool {
    // SAFETY: only opens shared libraries; no symbol is called here.
    if unsafe { nv::is_culib_present() } {
        return true;
    }
    let roots = ["CUDA_HOME", "CUDA_PATH"]
        .iter()
        .filter_map(|v| std::env::var(v).ok())
        .chain(["/usr/local/cuda".to_string()]);
    for root in roots {
        let dir = PathBuf::from(root).join("lib64");
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        let mut libs: Vec<PathBuf> = rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("libnvrtc.so.") && !n.contains("builtins"))
            })
            .collect();
        libs.sort();
        for lib in libs {
            let Ok(c) = CString::new(lib.to_string_lossy().as_bytes()) else {
                continue;
            };
            // SAFETY: dlopen with a valid C string; the handle is kept open for the process.
            let h = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
            if !h.is_null() && unsafe { nv::is_culib_present() } {
                return true;
            }
        }
    }
    false
}

/// NVRTC's version as `major.minor`.
pub(crate) fn nvrtc_version() -> Result<(i32, i32)> {
    let (mut a, mut b) = (0, 0);
    // SAFETY: out-pointers to live integers; the library was found by `nvrtc_present`.
    unsafe { nv::nvrtcVersion(&mut a, &mut b) }
        .result()
        .map_err(|e| err(format!("nvrtcVersion: {e:?}")))?;
    Ok((a, b))
}

fn cache_dir() -> Option<PathBuf> {
    if let Ok(d) = std::env::var("LONGATTN_CUDA_CACHE") {
        return Some(PathBuf::from(d));
    }
    std::env::var("HOME")
        .ok()
        .map(|h| PathBuf::from(h).join(".cache/longattn/cuda"))
}

/// How a module was obtained (reported by `selftest` and `bench`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CompileSource {
    /// NVRTC compiled it in this process.
    Compiled,
    /// Read from the disk cache.
    DiskCache,
}

/// A compiled CUBIN and where it came from.
pub struct Compiled {
    pub cubin: Vec<u8>,
    pub source: CompileSource,
    pub seconds: f64,
}

/// Compiles `src` for `arch` (e.g. `sm_90a`) or reads the CUBIN from the disk cache.
pub fn compile(
    name: &str,
    src: &str,
    arch: &str,
    defines: &[(String, String)],
) -> Result<Compiled> {
    let t0 = Instant::now();
    if !nvrtc_present() {
        return Err(err(
            "NVRTC (libnvrtc.so) was not found: add the CUDA toolkit's lib64 folder to LD_LIBRARY_PATH or set CUDA_HOME",
        ));
    }
    let ver = nvrtc_version()?;
    let mut opts = vec![
        format!("--gpu-architecture={arch}"),
        "--std=c++17".to_string(),
        "-default-device".to_string(),
        "-lineinfo".to_string(),
    ];
    opts.extend(defines.iter().map(|(k, v)| format!("-D{k}={v}")));
    // `LONGATTN_CUDA_VERBOSE=1`: ptxas reports registers, spills and shared memory per kernel
    // (printed to stderr); tuning runs.
    let verbose = std::env::var("LONGATTN_CUDA_VERBOSE").is_ok_and(|v| v == "1");
    if verbose {
        opts.push("--ptxas-options=-v".to_string());
    }

    let mut h = Sha256::new();
    h.update(src.as_bytes());
    for o in &opts {
        h.update(o.as_bytes());
        h.update([0]);
    }
    h.update(format!("nvrtc {}.{}", ver.0, ver.1).as_bytes());
    let key: String = h.finalize()[..12]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let path = cache_dir().map(|d| d.join(format!("{name}-{key}.cubin")));
    if let Some(p) = &path {
        if let Ok(cubin) = std::fs::read(p) {
            if !cubin.is_empty() {
                return Ok(Compiled {
                    cubin,
                    source: CompileSource::DiskCache,
                    seconds: t0.elapsed().as_secs_f64(),
                });
            }
        }
    }

    let (cubin, log) = nvrtc_build(name, src, arch, &opts)?;
    if verbose {
        eprintln!("nvrtc {name}: {log}");
    }
    if let Some(p) = &path {
        // A failed write only costs a recompile next time.
        if let Some(dir) = p.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let tmp = p.with_extension(format!("tmp{}", std::process::id()));
        if std::fs::write(&tmp, &cubin).is_ok() {
            let _ = std::fs::rename(&tmp, p);
        }
    }
    Ok(Compiled {
        cubin,
        source: CompileSource::Compiled,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// One NVRTC compilation of `src` with `opts`: the CUBIN and the program log (ptxas's report
/// with `--ptxas-options=-v`).
fn nvrtc_build(name: &str, src: &str, arch: &str, opts: &[String]) -> Result<(Vec<u8>, String)> {
    let csrc = CString::new(src).map_err(|_| err("kernel source holds a NUL byte"))?;
    let cname = CString::new(format!("{name}.cu")).map_err(|_| err("bad kernel name"))?;
    let prog = nvres::create_program(&csrc, Some(&cname))
        .map_err(|e| err(format!("nvrtcCreateProgram: {e:?}")))?;
    // SAFETY: `prog` is a live program until destroyed below; buffers are sized by NVRTC's calls.
    let result = unsafe {
        let compiled = nvres::compile_program(prog, opts);
        let log = nvres::get_program_log(prog)
            .ok()
            .map(|l| CStr::from_ptr(l.as_ptr()).to_string_lossy().into_owned())
            .unwrap_or_default();
        match compiled {
            Err(e) => Err(err(format!(
                "NVRTC failed on kernel `{name}` for {arch} ({e:?}):\n{log}"
            ))),
            Ok(()) => {
                let mut size = 0usize;
                let r = nv::nvrtcGetCUBINSize(prog, &mut size);
                if r != nv::nvrtcResult::NVRTC_SUCCESS || size == 0 {
                    Err(err(format!(
                        "no CUBIN for `{name}` ({r:?}): the architecture `{arch}` must be a real one (sm_XX)"
                    )))
                } else {
                    let mut cubin = vec![0u8; size];
                    let r = nv::nvrtcGetCUBIN(prog, cubin.as_mut_ptr().cast());
                    if r != nv::nvrtcResult::NVRTC_SUCCESS {
                        Err(err(format!("nvrtcGetCUBIN: {r:?}")))
                    } else {
                        Ok((cubin, log))
                    }
                }
            }
        }
    };
    // SAFETY: destroyed once; not used afterwards.
    let _ = unsafe { nvres::destroy_program(prog) };
    result
}

/// Compiles `src` for `arch` with `defines` and panics with the compiler's message if it fails:
/// the tests that need a kernel to build and nothing more.
#[cfg(test)]
pub(crate) fn assert_compiles(name: &str, src: &str, arch: &str, defines: &[(String, String)]) {
    if let Err(e) = compile(name, src, arch, defines) {
        panic!("{name} {defines:?}: {e}");
    }
}

/// Compiles `src` for sm_90a with `defines` afresh and panics, with ptxas's report, unless ptxas
/// kept every wgmma asynchronous (no "wgmma.mma_async instructions are serialized" note: C7512
/// for lack of registers, C7519 for a branch it cannot prove uniform) and no kernel of the
/// module spills: the tests that guard a kernel's register use and asynchrony.
#[cfg(test)]
pub(crate) fn assert_ptxas_clean(name: &str, src: &str, defines: &[(String, String)]) {
    let log =
        ptxas_report(name, src, defines).unwrap_or_else(|e| panic!("{name} {defines:?}: {e}"));
    assert!(
        !log.contains("wgmma.mma_async instructions are serialized"),
        "{name} {defines:?}: {log}"
    );
    assert_eq!(
        log.matches(" 0 bytes spill stores").count(),
        log.matches("bytes spill stores").count(),
        "{name} {defines:?}: {log}"
    );
}

/// ptxas's report (registers, spills, performance notes such as C7519) of `src` for sm_90a with
/// `defines`, compiled afresh.
#[cfg(test)]
fn ptxas_report(name: &str, src: &str, defines: &[(String, String)]) -> Result<String> {
    let mut opts = vec![
        "--gpu-architecture=sm_90a".to_string(),
        "--std=c++17".to_string(),
        "-default-device".to_string(),
        "--ptxas-options=-v".to_string(),
    ];
    opts.extend(defines.iter().map(|(k, v)| format!("-D{k}={v}")));
    nvrtc_build(name, src, "sm_90a", &opts).map(|(_, log)| log)
}

/// The tuning aids' CUBIN dump (ignored tests `dump_forward_cubins` / `dump_backward_cubins`):
/// the folder `$LONGATTN_DUMP_CUBIN`, or `None` with a printed "skipped".
#[cfg(test)]
pub(crate) fn dump_dir() -> Option<String> {
    let dir = std::env::var("LONGATTN_DUMP_CUBIN").ok();
    if dir.is_none() {
        eprintln!("skipped: set LONGATTN_DUMP_CUBIN to a folder");
    }
    dir
}

/// Compiles `src` with `defines` for sm_90a and writes its CUBIN to `dir/file.cubin`, for
/// `nvdisasm`.
#[cfg(test)]
pub(crate) fn dump_cubin(dir: &str, file: &str, src: &str, defines: &[(String, String)]) {
    let c = compile(file, src, "sm_90a", defines).unwrap_or_else(|e| panic!("{file}: {e}"));
    let path = format!("{dir}/{file}.cubin");
    std::fs::write(&path, &c.cubin).unwrap_or_else(|e| panic!("{path}: {e}"));
}

/// For the tests that compile kernels without a GPU: the element and interval mask programs of
/// a banded causal mask (`causal & window(100,0)` at 300 x 300), or `None` (and a printed
/// "skipped") when `libnvrtc` cannot be found.
#[cfg(test)]
pub(crate) fn test_programs() -> Option<(String, String)> {
    if !nvrtc_present() {
        eprintln!("skipped: libnvrtc not found (set LD_LIBRARY_PATH to a CUDA lib folder)");
        return None;
    }
    let shape = crate::mask::MaskShape {
        batch: 1,
        sq: 300,
        sk: 300,
    };
    let bm = crate::mask::MaskExpr::parse("causal & window(100,0)")
        .unwrap()
        .bind(shape, None)
        .unwrap();
    Some((
        bm.cuda_program().source,
        bm.cuda_interval_program().unwrap().source,
    ))
}
