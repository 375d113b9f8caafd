//! Shared helpers of the subcommands: seeded inputs, the oracle check, threads, machine facts.
use anyhow::{bail, Context, Result};
use longattn::io::Inputs;
use longattn::mask::BoundMask as Mask;
use longattn::reference::attention_f64;
use longattn::tensor::{Buffer, Slice};
use longattn::{AttnOutput, AttnParams, DType, Tensor, TensorView};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// A rayon pool of `threads` workers (None = all cores).
pub fn pool(threads: Option<usize>) -> Result<rayon::ThreadPool> {
    if threads == Some(0) {
        bail!("--threads must be >= 1");
    }
    let mut b = rayon::ThreadPoolBuilder::new();
    if let Some(t) = threads {
        b = b.num_threads(t);
    }
    b.build().context("cannot start the thread pool")
}

/// Seeded inputs, uniform in [-1, 1) (never zeros). `docs = Some(n)` adds n equal documents.
#[allow(clippy::too_many_arguments)]
pub fn random_inputs(
    dtype: DType,
    batch: usize,
    sq: usize,
    sk: usize,
    hq: usize,
    hk: usize,
    d: usize,
    seed: u64,
    docs: Option<usize>,
) -> Result<Inputs> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut mk = |shape: Vec<usize>| -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let x: Vec<f32> = (0..n).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
        Ok(Tensor::new(Buffer::from_f32(dtype, &x), shape)?)
    };
    let q = mk(vec![batch, sq, hq, d])?;
    let k = mk(vec![batch, sk, hk, d])?;
    let v = mk(vec![batch, sk, hk, d])?;
    let ids = |n: usize, nd: usize| -> Vec<i32> {
        (0..batch)
            .flat_map(|_| (0..n).map(move |i| (i * nd / n) as i32))
            .collect()
    };
    Ok(Inputs {
        q,
        k,
        v,
        q_doc: docs.map(|nd| ids(sq, nd)),
        k_doc: docs.map(|nd| ids(sk, nd)),
        block_mask: None,
    })
}

/// Errors on the first NaN/Inf of q, k or v, naming the tensor and the index.
pub fn check_finite(inputs: &Inputs) -> Result<()> {
    for (name, t) in [("q", &inputs.q), ("k", &inputs.k), ("v", &inputs.v)] {
        if let Some((index, value)) = t.view(name)?.find_non_finite() {
            let [b, s, h, d] = unflatten(index, &t.shape);
            bail!(
                "tensor `{name}` holds a non-finite value ({value}) at flat index {index} = [{b}, {s}, {h}, {d}] (pass --allow-nonfinite to compute anyway; NaN/Inf then propagates into the rows it touches)"
            );
        }
    }
    Ok(())
}

fn unflatten(mut i: usize, shape: &[usize]) -> [usize; 4] {
    let mut r = [0; 4];
    for a in (0..4).rev() {
        r[a] = i % shape[a];
        i /= shape[a];
    }
    r
}

/// The tolerance of the oracle check, relative to max |out| of the checked rows.
pub fn tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 1e-4,
        DType::BF16 => 2e-2,
        DType::F16 => 4e-3,
    }
}

fn sub_slice(s: Slice<'_>, start: usize) -> Slice<'_> {
    match s {
        Slice::F32(x) => Slice::F32(&x[start..]),
        Slice::BF16(x) => Slice::BF16(&x[start..]),
        Slice::F16(x) => Slice::F16(&x[start..]),
    }
}

/// The view of one (b, h) slice of a `[B, S, H, D]` view, restricted to rows `s0..` as `[1, S', 1, D]`.
fn head_view<'a>(
    t: &TensorView<'a>,
    b: usize,
    s0: usize,
    s_len: usize,
    h: usize,
) -> Result<TensorView<'a>> {
    let off = t.offset(b, s0, h, 0);
    Ok(TensorView::strided(
        sub_slice(t.data, off),
        [1, s_len, 1, t.shape[3]],
        [0, t.strides[1], 0, t.strides[3]],
    )?)
}

/// Result of comparing some rows of the fast output against the f64 oracle.
#[derive(Clone, Copy, Debug)]
pub struct Check {
    /// max |out - ref| / max |ref| over the checked rows.
    pub rel_err: f64,
    /// max |lse - ref| / max(1, |ref|).
    pub lse_err: f64,
    pub rows: usize,
}

/// Compares `rows` query rows x `heads` heads of batch row 0 of `got` (computed by the fast path
/// on the whole problem) against `longattn::reference::attention_f64` with the mask's `allowed`.
pub fn check_rows(
    inputs: &Inputs,
    mask: &Mask,
    params: &AttnParams,
    got: &AttnOutput,
    rows: &[usize],
    heads: &[usize],
) -> Result<Check> {
    let (q, k, v) = (
        inputs.q.view("q")?,
        inputs.k.view("k")?,
        inputs.v.view("v")?,
    );
    let [_, sq, hq, _] = q.shape;
    let [_, sk, hk, _] = k.shape;
    let dv = v.shape[3];
    let group = hq / hk;
    let out = got.out.data.as_slice();
    let (mut max_err, mut max_ref, mut lse_err) = (0.0f64, 0.0f64, 0.0f64);
    for &h in heads {
        let kv = h / group;
        let kh = head_view(&k, 0, 0, sk, kv)?;
        let vh = head_view(&v, 0, 0, sk, kv)?;
        for &i in rows {
            let qh = head_view(&q, 0, i, 1, h)?;
            let r = attention_f64(&qh, &kh, &vh, params, &|_, _, _, j| mask.allowed(0, i, j))?;
            for x in 0..dv {
                let g = out.get_f32(((i * hq) + h) * dv + x) as f64;
                max_err = max_err.max((g - r.out[x]).abs());
                if g.is_nan() {
                    max_err = f64::INFINITY;
                }
                max_ref = max_ref.max(r.out[x].abs());
            }
            let gl = got.lse[h * sq + i] as f64;
            let rl = r.lse[0];
            let e = if gl == rl {
                0.0
            } else {
                (gl - rl).abs() / rl.abs().max(1.0)
            };
            lse_err = lse_err.max(if e.is_nan() { f64::INFINITY } else { e });
        }
    }
    Ok(Check {
        rel_err: max_err / max_ref.max(f64::MIN_POSITIVE),
        lse_err,
        rows: rows.len() * heads.len(),
    })
}

/// `count` query rows spread over `0..sq`, always including the first and the last.
pub fn spread_rows(sq: usize, count: usize) -> Vec<usize> {
    let count = count.clamp(1, sq);
    let mut r: Vec<usize> = (0..count)
        .map(|t| {
            if count == 1 {
                sq - 1
            } else {
                t * (sq - 1) / (count - 1)
            }
        })
        .collect();
    r.dedup();
    r
}

/// The process's peak resident set (VmHWM) in KiB, where /proc is available.
pub fn peak_rss_kib() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    s.lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// CPU model name (from /proc/cpuinfo), or "unknown".
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|x| x.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

/// UTC date and time (`date -u`), or seconds since the epoch where `date` is missing.
pub fn now_utc() -> String {
    std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M:%S UTC"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            format!("{t} s since 1970 UTC")
        })
}

/// Parses a comma-separated list.
pub fn parse_list<T>(s: &str, what: &str, f: impl Fn(&str) -> Option<T>) -> Result<Vec<T>> {
    s.split(',')
        .map(|x| x.trim())
        .filter(|x| !x.is_empty())
        .map(|x| f(x).with_context(|| format!("invalid {what} `{x}`")))
        .collect()
}

/// Lengths with an optional k/K suffix (1k = 1024).
pub fn parse_len(s: &str) -> Option<usize> {
    let s = s.to_ascii_lowercase();
    let v = match s.strip_suffix('k') {
        Some(x) => x.parse::<usize>().ok()?.checked_mul(1024)?,
        None => s.parse().ok()?,
    };
    (v > 0).then_some(v)
}

pub fn fmt_len(n: usize) -> String {
    if n >= 1024 && n.is_multiple_of(1024) {
        format!("{}k", n / 1024)
    } else {
        n.to_string()
    }
}

/// Largest error of dQ on `rows` x `heads` of batch row 0 against the f64 gradient oracle,
/// relative to max |oracle| there (dQ of row i depends on row i only, so the oracle runs on those
/// rows alone). `dq` is `[B, Sq, Hq, D]` (any dtype).
#[allow(clippy::too_many_arguments)]
pub fn check_dq_rows(
    q: &TensorView,
    k: &TensorView,
    v: &TensorView,
    dout: &TensorView,
    params: &AttnParams,
    mask: &Mask,
    dq: &longattn::Tensor,
    rows: &[usize],
    heads: &[usize],
) -> Result<f64> {
    let (n, hq, d) = (q.seq(), q.heads(), q.dim());
    let mut sel = vec![false; n];
    rows.iter().for_each(|&i| sel[i] = true);
    let want = longattn::reference::attention_backward_f64_rows(
        q,
        k,
        v,
        dout,
        params,
        &|b, _, i, j| mask.allowed(b, i, j),
        &|b, h, i| b == 0 && sel[i] && heads.contains(&h),
    )?;
    let got = dq.data.to_f32_vec();
    let (mut err, mut scale) = (0.0f64, 1e-30f64);
    for &i in rows {
        for &h in heads {
            for x in 0..d {
                let at = (i * hq + h) * d + x;
                scale = scale.max(want.dq[at].abs());
                let e = (got[at] as f64 - want.dq[at]).abs();
                err = err.max(if e.is_nan() { f64::INFINITY } else { e });
            }
        }
    }
    Ok(err / scale)
}
