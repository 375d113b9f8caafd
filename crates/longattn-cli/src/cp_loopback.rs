//! `longattn cp loopback-check`: the ring pass-KV forward with P ranks as streams of one GPU
//! (`longattn::cp::loopback`), checked and timed.
//!
//! For every P (--ranks, or each of 1, 2, 3, 4, 5, 8) and the masks causal and full:
//! 1. a small awkward case (173 tokens): the ring's output against the f64 oracle, next to the
//!    single-GPU forward's error; PASS when the ring's error is at most 1.5 x the single-GPU
//!    error (or within the library's tolerance of the storage format);
//! 2. the timed case (--len, default 16411 tokens): the ring against the single-GPU forward
//!    (PASS within the sum of their tolerances against the truth), the single-GPU kernel's time
//!    T1, the ring's time from the first event to the last, and per step the compute time, the
//!    copy time and the exposed wait (max and mean over the ranks).
//!
//! Without a GPU it prints `skipped: no CUDA device (...)` and succeeds, unless --require-gpu.
use crate::common::{fmt_len, parse_len};
use anyhow::{bail, Context, Result};
use longattn::attention::{AttnParams, Dims, MaskSpec};
use longattn::cp::loopback::{run_device, LoopbackOut};
use longattn::cp::{zigzag_plan, CpMask};
use longattn::cuda::{CudaDevice, DevTensor, FwdPlan};
use longattn::mask::{BoundMask, MaskExpr, MaskShape};
use longattn::tensor::Buffer;
use longattn::testing::{compare, out_tolerance, random_tensor, LSE_TOLERANCE};
use longattn::{DType, Tensor};
use std::sync::Arc;

/// The small case checked against the f64 oracle (awkward: no tile divides it).
const ORACLE_LEN: usize = 173;

#[derive(clap::Args, Debug)]
pub struct LoopbackArgs {
    /// Ranks P (streams of the GPU); default: each of 1, 2, 3, 4, 5, 8.
    #[arg(long)]
    ranks: Option<usize>,
    /// Tokens of the timed case (e.g. 16k); at least 2 P.
    #[arg(long, default_value = "16411")]
    len: String,
    #[arg(long, default_value_t = 1)]
    batch: usize,
    #[arg(long, default_value_t = 8)]
    heads: usize,
    #[arg(long, default_value_t = 2)]
    kv_heads: usize,
    /// Head dim (a multiple of 16, at most 256).
    #[arg(long, default_value_t = 128)]
    dim: usize,
    /// f16 inputs instead of bf16.
    #[arg(long)]
    f16: bool,
    /// The GPU's ordinal.
    #[arg(long, default_value_t = 0)]
    device: usize,
    /// Fail when there is no CUDA device (instead of skipping).
    #[arg(long)]
    require_gpu: bool,
}

fn bound(causal: bool, batch: usize, n: usize) -> Result<BoundMask> {
    let text = if causal { "causal" } else { "full" };
    Ok(MaskExpr::parse(text)?.bind(
        MaskShape {
            batch,
            sq: n,
            sk: n,
        },
        None,
    )?)
}

/// Seeded inputs q `[B, n, Hq, D]`, k and v `[B, n, Hk, D]` in `dtype`.
fn inputs(a: &LoopbackArgs, dtype: DType, n: usize, seed: u64) -> [Tensor; 3] {
    let (b, h, hk, d) = (a.batch, a.heads, a.kv_heads, a.dim);
    [
        random_tensor(dtype, &[b, n, h, d], 1.0, seed),
        random_tensor(dtype, &[b, n, hk, d], 1.0, seed + 1),
        random_tensor(dtype, &[b, n, hk, d], 1.0, seed + 2),
    ]
}

/// The ring's output as the caller gets it (rounded to the input dtype).
fn as_tensor(x: &LoopbackOut, dtype: DType, shape: [usize; 4]) -> Result<Tensor> {
    Ok(Tensor::new(
        Buffer::from_f32(dtype, &x.out),
        shape.to_vec(),
    )?)
}

pub fn main(a: LoopbackArgs) -> Result<()> {
    let n = parse_len(&a.len).with_context(|| format!("--len `{}`: not a length", a.len))?;
    let ranks: Vec<usize> = match a.ranks {
        Some(0) => bail!("--ranks 0: the ring needs at least one rank"),
        Some(p) => vec![p],
        None => vec![1, 2, 3, 4, 5, 8],
    };
    let pmax = ranks.iter().copied().max().unwrap_or(1);
    if n < 2 * pmax || ORACLE_LEN < 2 * pmax {
        bail!(
            "--len {n} with --ranks {pmax}: the zigzag placement cuts the sequence into 2P chunks, so it needs at least 2P tokens (and P <= {})",
            ORACLE_LEN / 2
        );
    }
    if a.batch == 0 || a.heads == 0 || a.kv_heads == 0 || !a.heads.is_multiple_of(a.kv_heads) {
        bail!("--batch and --heads must be >= 1 and --kv-heads must divide --heads");
    }
    if a.dim == 0 || !a.dim.is_multiple_of(16) || a.dim > 256 {
        bail!(
            "--dim {}: the CUDA kernel needs a multiple of 16, at most 256",
            a.dim
        );
    }
    let dev = match CudaDevice::open(a.device) {
        Ok(d) => d,
        Err(e) if a.require_gpu => bail!("no CUDA device: {e}"),
        Err(e) => {
            println!("skipped: no CUDA device ({e})");
            return Ok(());
        }
    };
    let dtype = if a.f16 { DType::F16 } else { DType::BF16 };
    println!(
        "cp loopback on {} (GPU {}): B {} Hq {} Hk {} D {} {dtype}, ranks as streams, ring pass-KV over the zigzag placement",
        dev.name, a.device, a.batch, a.heads, a.kv_heads, a.dim
    );
    let params = AttnParams::default();
    let mut failed = 0;
    for &p in &ranks {
        for causal in [true, false] {
            let what = format!("P {p} {}", if causal { "causal" } else { "full" });
            match oracle_case(&a, &dev, dtype, &params, p, causal) {
                Ok(line) => {
                    if line.starts_with("FAIL") {
                        failed += 1;
                    }
                    println!("{line}");
                }
                Err(e) => {
                    failed += 1;
                    println!("FAIL {what} n {ORACLE_LEN} vs oracle: {e:#}");
                }
            }
            match timed_case(&a, &dev, dtype, &params, p, causal, n) {
                Ok(lines) => {
                    if lines[0].starts_with("FAIL") {
                        failed += 1;
                    }
                    for l in lines {
                        println!("{l}");
                    }
                }
                Err(e) => {
                    failed += 1;
                    println!("FAIL {what} n {}: {e:#}", fmt_len(n));
                }
            }
        }
    }
    if failed > 0 {
        bail!("{failed} loopback check(s) failed");
    }
    Ok(())
}

/// The small case against the f64 oracle, next to the single-GPU forward.
fn oracle_case(
    a: &LoopbackArgs,
    dev: &Arc<CudaDevice>,
    dtype: DType,
    params: &AttnParams,
    p: usize,
    causal: bool,
) -> Result<String> {
    let n = ORACLE_LEN;
    let [q, k, v] = inputs(a, dtype, n, 17 + p as u64);
    let (qv, kv, vv) = (q.view("q")?, k.view("k")?, v.view("v")?);
    let bm = bound(causal, a.batch, n)?;
    let oracle =
        longattn::reference::attention_f64(&qv, &kv, &vv, params, &|_, _, i, j| !causal || j <= i)?;
    let single = longattn::cuda::forward(dev, &qv, &kv, &vv, params, MaskSpec::Expr(&bm))?;
    let plan = zigzag_plan(&CpMask::new(bm, 16)?, p)?;
    let ring = run_device(dev, &plan, causal, (&qv, &kv, &vv), params, 1)?;
    let shape = [a.batch, n, a.heads, a.dim];
    let (so, sl) = compare(&single.out, &single.lse, &oracle);
    let (ro, rl) = compare(&as_tensor(&ring, dtype, shape)?, &ring.lse, &oracle);
    let ok = ro <= (1.5 * so).max(out_tolerance(dtype)) && rl <= (1.5 * sl).max(LSE_TOLERANCE);
    Ok(format!(
        "{} P {p} {} n {n} vs f64 oracle: ring out {ro:.2e} lse {rl:.2e}, single GPU out {so:.2e} lse {sl:.2e} (bound: 1.5 x single, or {:.1e} / {LSE_TOLERANCE:.0e})",
        if ok { "PASS" } else { "FAIL" },
        if causal { "causal" } else { "full" },
        out_tolerance(dtype)
    ))
}

/// The timed case: the ring against the single-GPU forward, with T1 and the per-step times.
#[allow(clippy::too_many_arguments)]
fn timed_case(
    a: &LoopbackArgs,
    dev: &Arc<CudaDevice>,
    dtype: DType,
    params: &AttnParams,
    p: usize,
    causal: bool,
    n: usize,
) -> Result<Vec<String>> {
    let [q, k, v] = inputs(a, dtype, n, 1000 + p as u64);
    let (qv, kv, vv) = (q.view("q")?, k.view("k")?, v.view("v")?);
    let bm = bound(causal, a.batch, n)?;
    // Single GPU: the output, and the kernel's device time (a warm launch, then a timed one).
    let single = longattn::cuda::forward(dev, &qv, &kv, &vv, params, MaskSpec::Expr(&bm))?;
    let (b, h, hk, d) = (a.batch, a.heads, a.kv_heads, a.dim);
    let dims = Dims {
        batch: b,
        sq: n,
        sk: n,
        hq: h,
        hk,
        d,
        dv: d,
    };
    let fp = FwdPlan::new(dev, dims, dtype, params, MaskSpec::Expr(&bm))?;
    let (qd, kd, vd) = (
        DevTensor::upload(dev, "q", &qv)?,
        DevTensor::upload(dev, "k", &kv)?,
        DevTensor::upload(dev, "v", &vv)?,
    );
    let mut o = DevTensor::alloc(dev, [b, n, h, d], dtype)?;
    let mut lse = dev.alloc_f32(b * h * n)?;
    fp.launch(&qd, &kd, &vd, &mut o, &mut lse)?;
    let t1 = dev.time_ms(|| fp.launch(&qd, &kd, &vd, &mut o, &mut lse))?;
    dev.synchronize()?;
    // The ring: three runs, the last timed.
    let plan = zigzag_plan(&CpMask::new(bm, 16)?, p)?;
    let ring = run_device(dev, &plan, causal, (&qv, &kv, &vv), params, 3)?;
    let want = single.out.data.to_f32_vec();
    let got = as_tensor(&ring, dtype, [b, n, h, d])?.data.to_f32_vec();
    let scale = want.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-30);
    let eo = got
        .iter()
        .zip(&want)
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()))
        / scale;
    let el = ring.lse.iter().zip(&single.lse).fold(0f32, |m, (x, y)| {
        m.max(if x == y { 0.0 } else { (x - y).abs() })
    });
    // Both within their tolerance of the truth: within the sum of each other.
    let (bo, bl) = (2.0 * out_tolerance(dtype), 2.0 * LSE_TOLERANCE);
    let ok = (eo as f64) <= bo && (el as f64) <= bl;
    let mask = if causal { "causal" } else { "full" };
    let mut lines = vec![format!(
        "{} P {p} {mask} n {}: ring vs single GPU out {eo:.2e} (<= {bo:.1e}) lse {el:.2e} (<= {bl:.0e}); T1 {t1:.3} ms, ring {:.3} ms ({:.2}x T1) in {} blocks, queued in {:.3} ms on the host",
        if ok { "PASS" } else { "FAIL" },
        fmt_len(n),
        ring.total_ms,
        ring.total_ms / t1.max(1e-9),
        ring.blocks,
        ring.enqueue_ms
    )];
    for (s, row) in ring.steps.iter().enumerate() {
        let stat = |f: &dyn Fn(&longattn::cp::loopback::StepTime) -> f64| {
            let max = row.iter().map(f).fold(0f64, f64::max);
            let mean = row.iter().map(f).sum::<f64>() / row.len().max(1) as f64;
            format!("{max:.3} / {mean:.3}")
        };
        lines.push(format!(
            "  step {s}: compute {} ms, copy {} ms, exposed wait {} ms (max / mean over ranks)",
            stat(&|t| t.compute_ms),
            stat(&|t| t.copy_ms),
            stat(&|t| t.wait_ms)
        ));
    }
    Ok(lines)
}
