//! `longattn bench --linear SPEC`: the CPU linear-attention core through the entry point.
//!
//! For each length x head dim (K = V = D) x dtype: seeded random q, k, v (normal), `g` for the
//! gated families (uniform log decays in [-0.1, -0.001]), hedgehog weights when needed; a warm-up
//! call whose output is checked against the f64 oracle on a 1024-token prefix (for the identity map
//! without normalisation, where the output is the core's; the other maps are covered by the test
//! suite); then the median of the timed calls. FLOPs are those of the chunked algorithm
//! (`longattn::linear::cpu::chunked_flops`, `chunked_backward_flops` with `--backward`), counted
//! on the feature dim and the value width the core sees. The matmul ceiling (a 2048^3 f32 `gemm`
//! on the same threads) is measured in the same run and each row shows the ratio of its time to
//! the ceiling's time for the same FLOPs.
use crate::bench::{median, Args};
use crate::common::{fmt_len, parse_len, parse_list, pool};
use anyhow::{bail, Result};
use longattn::linear::{self, Backend, FeatureMap, LinearInputs, LinearSpec, Normalization};
use longattn::testing::Rng;
use longattn::{DType, TensorView};
use std::time::Instant;

/// GFLOP/s of an f32 `n x n x n` product through the library's `gemm` path (the ceiling).
fn matmul_ceiling(n: usize) -> f64 {
    let mut rng = Rng::new(1);
    let x: Vec<f32> = (0..n * n).map(|_| rng.normal() as f32).collect();
    let w = longattn::model::ops::Mat::new(n, n, x.clone());
    let mut y = vec![0.0f32; n * n];
    longattn::model::ops::matmul_t(&x, n, &w, &mut y);
    let times: Vec<f64> = (0..5)
        .map(|_| {
            let t0 = Instant::now();
            longattn::model::ops::matmul_t(&x, n, &w, &mut y);
            t0.elapsed().as_secs_f64()
        })
        .collect();
    2.0 * (n * n * n) as f64 / median(times) / 1e9
}

pub fn main(a: &Args, text: &str) -> Result<()> {
    let spec = LinearSpec::parse(text)?;
    if spec.window.is_some() {
        bail!("--linear `{text}`: the bench times the linear core; drop the window (`taylor+normalized`)");
    }
    let lens = parse_list(
        a.lens.as_deref().unwrap_or("1k,4k,16k"),
        "length",
        parse_len,
    )?;
    let dims = parse_list(a.dims.as_deref().unwrap_or("64,128"), "head dim", |x| {
        x.parse().ok()
    })?;
    let dtypes = parse_list(a.dtypes.as_deref().unwrap_or("f32"), "dtype", DType::parse)?;
    let (b, h) = (a.batch, a.heads);
    let hk = a.kv_heads.unwrap_or(h);
    let min_time = a.min_time.unwrap_or(0.5);
    let pool = pool(a.threads)?;
    let ceiling = pool.install(|| matmul_ceiling(2048));
    println!(
        "linear `{spec}` on {} threads; matmul ceiling {ceiling:.1} GFLOP/s (f32 2048^3 gemm){}",
        pool.current_num_threads(),
        if a.backward { "; backward" } else { "" }
    );
    println!(
        "{:>6} {:>4} {:>5} {:>3} {:>3} {:>5} {:>10} {:>9} {:>8} {:>8}",
        "T", "D", "dtype", "B", "H", "F", "ms", "GFLOP/s", "ceil x", "check"
    );
    for &n in &lens {
        for &d in &dims {
            for &dt in &dtypes {
                let mut rng = Rng::new(a.seed);
                let mut nv = |len: usize, s: f64| -> Vec<f32> {
                    (0..len).map(|_| (rng.normal() * s) as f32).collect()
                };
                let q = longattn::tensor::Buffer::from_f32(dt, &nv(b * n * h * d, 1.0));
                let k = longattn::tensor::Buffer::from_f32(dt, &nv(b * n * hk * d, 1.0));
                let v = longattn::tensor::Buffer::from_f32(dt, &nv(b * n * hk * d, 1.0));
                let fh = 32;
                let w = nv(hk * d * fh, 1.0 / (d as f64).sqrt());
                let f = spec.feature.dim(d, fh);
                let mut rng = Rng::new(a.seed + 1);
                let g: Vec<f32> = match spec.decay {
                    linear::DecaySpec::Token => (0..b * n * h)
                        .map(|_| -0.001 - 0.099 * rng.uniform() as f32)
                        .collect(),
                    linear::DecaySpec::Gate => (0..b * n * h * f)
                        .map(|_| -0.001 - 0.099 * rng.uniform() as f32)
                        .collect(),
                    _ => vec![],
                };
                let mut inp = LinearInputs::new(
                    TensorView::contiguous(q.as_slice(), [b, n, h, d])?,
                    TensorView::contiguous(k.as_slice(), [b, n, hk, d])?,
                    TensorView::contiguous(v.as_slice(), [b, n, hk, d])?,
                );
                inp.g = spec.decay.needs_input().then_some(&g[..]);
                inp.hedgehog = (spec.feature == FeatureMap::Hedgehog).then_some(&w[..]);
                let vx = d + (spec.norm == Normalization::Denominator) as usize;
                let dout: Vec<f32> = (0..b * n * h * d)
                    .map(|i| ((i % 7) as f32 - 3.0) * 0.1)
                    .collect();
                let call = || -> Result<()> {
                    if a.backward {
                        linear::linear_attention_backward(&inp, &spec, &dout, None, Backend::Cpu)?;
                    } else {
                        linear::linear_attention(&inp, &spec, Backend::Cpu)?;
                    }
                    Ok(())
                };
                let t0 = Instant::now();
                pool.install(call)?;
                let warm = t0.elapsed().as_secs_f64();
                let check =
                    if spec.feature == FeatureMap::Identity && spec.norm == Normalization::None {
                        format!(
                            "{:.1e}",
                            pool.install(|| check_prefix(&inp, &spec, n.min(1024)))?
                        )
                    } else {
                        "tests".into()
                    };
                let reps = a.reps.max((min_time / warm).ceil() as usize).min(50);
                let times: Vec<f64> = (0..reps)
                    .map(|_| {
                        let t0 = Instant::now();
                        pool.install(call).map(|_| t0.elapsed().as_secs_f64())
                    })
                    .collect::<Result<_>>()?;
                let secs = median(times);
                let lens_all = vec![n; b];
                let flops = if a.backward {
                    linear::cpu::chunked_backward_flops(&lens_all, h, f, vx, spec.chunk)
                } else {
                    linear::cpu::chunked_flops(&lens_all, h, f, vx, spec.chunk)
                };
                let gf = flops / secs / 1e9;
                println!(
                    "{:>6} {:>4} {:>5} {:>3} {:>3} {:>5} {:>10.2} {:>9.1} {:>8.2} {:>8}",
                    fmt_len(n),
                    d,
                    dt.name(),
                    b,
                    h,
                    f,
                    secs * 1e3,
                    gf,
                    ceiling / gf,
                    check
                );
            }
        }
    }
    Ok(())
}

/// Largest error of the forward on the first `m` tokens against the f64 oracle of the core,
/// relative to max |oracle|.
fn check_prefix(inp: &LinearInputs, spec: &LinearSpec, m: usize) -> Result<f64> {
    fn cut<'a>(x: &TensorView<'a>, m: usize) -> Result<TensorView<'a>> {
        let [b, _, hh, dd] = x.shape;
        Ok(TensorView::strided(x.data, [b, m, hh, dd], x.strides)?)
    }
    let [b, t, h, d] = inp.q.shape;
    let mut p = *inp;
    p.q = cut(&inp.q, m)?;
    p.k = cut(&inp.k, m)?;
    p.v = cut(&inp.v, m)?;
    let gp: Vec<f32>;
    if let Some(g) = inp.g {
        let per = g.len() / (b * t);
        gp = (0..b)
            .flat_map(|ib| g[ib * t * per..][..m * per].iter().copied())
            .collect();
        p.g = Some(&gp);
    }
    let got = linear::linear_attention(&p, spec, Backend::Cpu)?;
    let per_head = spec.decay.per_head(h);
    let decay = match (spec.decay, p.g, &per_head) {
        (linear::DecaySpec::Token, Some(g), _) => linear::Decay::Token(g),
        (linear::DecaySpec::Gate, Some(g), _) => linear::Decay::Gate(g),
        (_, _, Some(ph)) => linear::Decay::PerHead(ph),
        _ => linear::Decay::None,
    };
    let core = linear::Core {
        q: p.q,
        k: p.k,
        v: p.v,
        decay,
        scale: spec.scale_for(d),
        initial_state: None,
        cu_seqlens: None,
    };
    let want = linear::reference::forward_f64(&core)?;
    let scale = want.out.iter().fold(1e-30f64, |a, &x| a.max(x.abs()));
    let e = got
        .out
        .data
        .to_f32_vec()
        .iter()
        .zip(&want.out)
        .fold(0.0f64, |a, (&x, &y)| a.max((x as f64 - y).abs()));
    Ok(e / scale)
}
