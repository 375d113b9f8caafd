//! `longattn run`: attention over the tensors of a safetensors file.
use crate::common::{check_finite, pool};
use crate::maskglue::bind_input_mask;
use anyhow::{bail, Context, Result};
use longattn::mask::BlockSchedule;
use longattn::AttnParams;
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Input file with q [B,Sq,Hq,D], k [B,Sk,Hk,D], v [B,Sk,Hk,Dv] (f32/bf16/f16) and optional
    /// i32 q_doc [B,Sq], k_doc [B,Sk].
    #[arg(long)]
    input: PathBuf,
    /// Read the tensors `q.<L>`, `k.<L>`, `v.<L>` of layer L of a `longattn capture` file.
    #[arg(long)]
    layer: Option<usize>,
    /// Tile size (query and key) of the input's `block_mask` tensor, when it has one.
    #[arg(long, default_value_t = 64)]
    block_tile: usize,
    /// Mask expression, e.g. `causal & window(1024,0)`.
    #[arg(long, default_value = "full")]
    mask: String,
    /// Multiplier of q.k (default 1/sqrt(D)).
    #[arg(long)]
    scale: Option<f32>,
    /// Logit soft-cap c: s -> c * tanh(s / c).
    #[arg(long)]
    softcap: Option<f32>,
    /// Worker threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// `cpu` or `cuda` (bf16/f16 inputs on an NVIDIA GPU).
    #[arg(long, default_value = "cpu")]
    backend: String,
    /// GPU ordinal (with --backend cuda).
    #[arg(long, default_value_t = 0)]
    device: usize,
    /// Output file: out [B,Sq,Hq,Dv] (input dtype) and lse [B,Hq,Sq] (f32).
    #[arg(long)]
    output: PathBuf,
    /// Overwrite the output file if it exists.
    #[arg(long)]
    force: bool,
    /// Compute even if q/k/v (and do) hold NaN or Inf (it propagates into the rows it touches).
    #[arg(long)]
    allow_nonfinite: bool,
    /// Also run the backward pass: reads `do` [B,Sq,Hq,Dv] (the gradient of out, dtype of q) from
    /// the input file and writes `dq`, `dk`, `dv` (input dtype) next to `out` and `lse`.
    #[arg(long)]
    backward: bool,
    /// Backward in deterministic mode (bit-identical run to run; see docs/PERF.md for its cost).
    #[arg(long, requires = "backward")]
    deterministic: bool,
    /// Linear attention of this spec instead of softmax attention (CPU), e.g. `simple_gla`,
    /// `elu+normalized`, `based(window=64)` (grammar: `longattn::linear::spec`). The input file may
    /// also hold `g` (F32 log decay), `initial_state`, `cu_seqlens` (I32), `hedgehog` (weights) and,
    /// for --backward, `do` and `d_state`; the output holds `out` and `state` (F32), and with
    /// --backward `dq`, `dk`, `dv`, `d_initial_state`, `dg`, `d_hedgehog` (F32).
    #[arg(long, conflicts_with_all = ["mask", "softcap", "layer", "deterministic"])]
    linear: Option<String>,
    /// Dynamic sparse attention: select key tiles of --mask with this spec, e.g.
    /// `topmass(gamma=0.95,block=128)`, `relthresh(alpha=0.7)`, `moba(block=512,topk=3)`,
    /// `vertical_slash(v=1000,s=6096)`, `columns(gamma=0.97,rows=8,check=0.92,dense_last=64)`
    /// (element level), `vertical_slash(v=512,s=512,element=1)`, `lowbit(tau=0.3)`,
    /// `lowbit_mass(gamma=0.95)` (element level: each row its own keys), unions `A+B` (grammar: `longattn::sparse`). With --backend cuda the estimate runs on the GPU
    /// (vertical_slash and lowbit at tile level; tiles of the attention kernel; forward only; the dense fallback below 16k keys
    /// unless `dense_below` is given). The output also holds the selection: `block_mask` (u8 [B,
    /// Hq, query tiles, key tiles]: 0 = tile skipped, 1 = computed whole, 2 = computed in part,
    /// under --mask or on element-level lines) and `block_tile_q` / `block_tile_k` (i32 [1]).
    /// With the file's `q_doc` / `k_doc` and `--mask 'causal & document'` every estimate is
    /// made per document (CPU; the CUDA estimator refuses document ids).
    #[arg(long, conflicts_with = "linear")]
    sparse: Option<String>,
    /// Also write the block-pooled attention map of the forward at BLOCK x BLOCK (a multiple of
    /// 64; CPU, or CUDA on Hopper): `map_mass` (f32 [B, Hq, query blocks, key blocks], the mean over a block's rows
    /// of their probability mass in the key block) and `map_max` (the largest probability in
    /// the block): SeerAttention's training target, a sparse estimator's ground truth.
    #[arg(long, value_name = "BLOCK", conflicts_with_all = ["linear", "sparse"])]
    attention_map: Option<usize>,
}

pub fn main(a: Args) -> Result<()> {
    if a.output.exists() && !a.force {
        bail!(
            "{}: output file already exists (pass --force to overwrite it)",
            a.output.display()
        );
    }
    if let Some(spec) = &a.linear {
        return run_linear(&a, spec);
    }
    let inputs = match a.layer {
        Some(l) => {
            longattn::io::read_captured(&a.input, Some(&[l]))?
                .remove(0)
                .1
        }
        None => longattn::io::read_inputs(&a.input)?,
    };
    if !a.allow_nonfinite {
        check_finite(&inputs).with_context(|| format!("{}", a.input.display()))?;
    }
    let dims = inputs.dims()?;
    let doc_ids = inputs
        .q_doc
        .clone()
        .zip(inputs.k_doc.clone())
        .map(|(q, k)| longattn::mask::DocIds { q, k });
    let mask = bind_input_mask(&a.mask, &inputs, &a.input)?;
    let params = AttnParams {
        scale: a.scale,
        softcap: a.softcap,
        isa: None,
        skip_below: None,
    };
    let (q, k, v) = (
        inputs.q.view("q")?,
        inputs.k.view("k")?,
        inputs.v.view("v")?,
    );
    // An explicit block mask in the file: whole tiles, or with --mask other than `full` a gate
    // over the mask (`mask & block_mask`: kept tiles keep the mask's pairs).
    let gated = *mask.expr() != longattn::mask::MaskExpr::Full;
    let blocks = match &inputs.block_mask {
        None => None,
        Some((bytes, shape)) => Some(
            match gated {
                false => BlockSchedule::from_block_mask(
                    bytes,
                    *shape,
                    a.block_tile,
                    a.block_tile,
                    dims.sq,
                    dims.sk,
                ),
                true => mask
                    .schedule(a.block_tile, a.block_tile)
                    .and_then(|s| s.gated(bytes, *shape)),
            }
            .with_context(|| {
                format!(
                    "{}: tensor `block_mask` with --block-tile {}",
                    a.input.display(),
                    a.block_tile
                )
            })?,
        ),
    };
    let rows = gated.then_some(&mask as &dyn longattn::mask::RowMask);
    let spec = match &blocks {
        Some(schedule) if gated => longattn::MaskSpec::Gated {
            mask: &mask,
            schedule,
        },
        Some(schedule) => longattn::MaskSpec::Schedule {
            schedule,
            rows: None,
        },
        None => longattn::MaskSpec::Expr(&mask),
    };
    let dout = match a.backward {
        false => None,
        true => {
            let t = longattn::io::read_dout(&a.input, &inputs)?;
            if !a.allow_nonfinite {
                if let Some((index, value)) = t.view("do")?.find_non_finite() {
                    bail!(
                        "{}: tensor `do` holds a non-finite value ({value}) at flat index {index} (pass --allow-nonfinite to compute anyway; NaN then propagates into dq of its row and dk/dv of the keys that row attends)",
                        a.input.display()
                    );
                }
            }
            Some(t)
        }
    };
    if let Some(text) = &a.sparse {
        if blocks.is_some() {
            bail!(
                "{}: --sparse selects within --mask; the file's `block_mask` cannot be combined with it",
                a.input.display()
            );
        }
        return run_sparse(&a, text, [&q, &k, &v], &mask, dout.as_ref(), &params);
    }
    // Every backend goes through the one entry point (`longattn::api`), as the Python package's
    // calls do; a block mask from the file travels as a host table.
    let table = inputs.block_mask.as_ref().map(|(bytes, shape)| {
        longattn::api::RawTensor::contiguous(
            bytes.as_ptr() as u64,
            longattn::api::RawDType::U8,
            shape,
            longattn::api::Device::Cpu,
        )
    });
    let marg = match table {
        Some(table) => longattn::api::MaskArg::Blocks {
            table,
            tile_q: a.block_tile,
            tile_k: a.block_tile,
            under: gated.then(|| mask.expr()),
        },
        None => longattn::api::MaskArg::Expr(mask.expr()),
    };
    let pool = pool(a.threads)?;
    let mut map = None;
    let (out, secs, engine) = match a.backend.as_str() {
        "cpu" if a.attention_map.is_some() => {
            // The map needs the kernel's own probabilities: the forward with the resolved mask.
            let t0 = Instant::now();
            let block = a.attention_map.unwrap_or_default();
            let (out, m) =
                pool.install(|| longattn::forward_with_map(&q, &k, &v, &params, spec, block))?;
            map = Some(m);
            let engine = format!("{} threads", pool.current_num_threads());
            (out, t0.elapsed().as_secs_f64(), engine)
        }
        "cuda" if a.attention_map.is_some() => {
            // The Hopper forward writes the map beside its output (`FwdPlan::with_map`).
            let dev = longattn::cuda::CudaDevice::open(a.device)?;
            let block = a.attention_map.unwrap_or_default();
            let t0 = Instant::now();
            let (out, m) =
                longattn::cuda::forward_with_map(&dev, &q, &k, &v, &params, spec, block)?;
            map = Some(m);
            (
                out,
                t0.elapsed().as_secs_f64(),
                format!("{} (copies and compile included)", dev.name),
            )
        }
        "cpu" => {
            let t0 = Instant::now();
            // Mask expressions go through the one entry point (`longattn::api`), as the Python
            // package's calls do; explicit block masks take the schedule path.
            let out = pool.install(|| {
                longattn::api::forward_host(&q, &k, &v, marg, doc_ids.as_ref(), &params)
            })?;
            let engine = format!("{} threads", pool.current_num_threads());
            (out, t0.elapsed().as_secs_f64(), engine)
        }
        "cuda" => {
            let dev = longattn::cuda::CudaDevice::open(a.device)?;
            // Timed as the user sees it: copies to and from the device included, compile excluded
            // (a first call compiles or loads the kernel variant).
            let run = || {
                longattn::api::forward_on_device(
                    a.device,
                    &q,
                    &k,
                    &v,
                    marg,
                    doc_ids.as_ref(),
                    &params,
                )
            };
            run()?;
            let t0 = Instant::now();
            let out = run()?;
            (
                out,
                t0.elapsed().as_secs_f64(),
                format!("{} (copies included)", dev.name),
            )
        }
        other => bail!("--backend {other}: expected `cpu` or `cuda`"),
    };
    let lse_shape = [dims.batch, dims.hq, dims.sq];
    let map_shape = map
        .as_ref()
        .map(|m| vec![m.batch, m.heads, m.q_blocks, m.k_blocks]);
    let extra: Vec<(&str, Vec<usize>, longattn::io::Extra)> = match (&map, map_shape) {
        (Some(m), Some(shape)) => vec![
            ("map_mass", shape.clone(), longattn::io::Extra::F32(&m.mass)),
            ("map_max", shape, longattn::io::Extra::F32(&m.max)),
        ],
        _ => Vec::new(),
    };
    match &dout {
        None => longattn::io::write_outputs_with(
            &a.output, &out.out, &out.lse, lse_shape, None, &extra, a.force,
        )?,
        Some(dout) => {
            let t1 = Instant::now();
            let bp = longattn::BackwardParams {
                deterministic: a.deterministic,
                ..Default::default()
            };
            let (ov, dov) = (out.out.view("out")?, dout.view("do")?);
            let grads = if a.backend == "cuda" {
                let dev = longattn::cuda::CudaDevice::open(a.device)?;
                longattn::cuda::backward::backward(
                    &dev, &q, &k, &v, &ov, &out.lse, &dov, &params, spec, &bp,
                )?
            } else {
                pool.install(|| {
                    longattn::backward(&q, &k, &v, &ov, &out.lse, &dov, &params, spec, &bp)
                })?
            };
            eprintln!(
                "backward ({} mode): {:.3} ms",
                if a.deterministic {
                    "deterministic"
                } else {
                    "fast"
                },
                t1.elapsed().as_secs_f64() * 1e3
            );
            longattn::io::write_outputs_with(
                &a.output,
                &out.out,
                &out.lse,
                lse_shape,
                Some(&grads),
                &extra,
                a.force,
            )?;
        }
    }
    // Useful pairs: the expression's, or the block mask's (whole tiles, or the mask's pairs
    // inside the kept tiles; mean over heads).
    let pairs: u64 = match &blocks {
        Some(s) => {
            (0..dims.batch)
                .flat_map(|b| (0..dims.hq).map(move |h| (b, h)))
                .map(|(b, h)| s.allowed_pairs(b, h, rows))
                .sum::<u64>()
                / dims.hq as u64
        }
        None => (0..dims.batch).map(|b| mask.allowed_pairs(b)).sum(),
    };
    let flops = 4.0 * dims.hq as f64 * pairs as f64 * dims.d as f64;
    eprintln!(
        "{}: B {} Sq {} Sk {} Hq {} Hk {} D {} Dv {} {} mask {} (density {:.4}): {:.3} ms, {:.1} useful GFLOP/s on {} -> {}",
        a.input.display(),
        dims.batch,
        dims.sq,
        dims.sk,
        dims.hq,
        dims.hk,
        dims.d,
        dims.dv,
        inputs.dtype(),
        match &inputs.block_mask {
            Some((_, shape)) if gated => format!(
                "`{}` & block_mask {shape:?} of {1}x{1} tiles",
                mask.expr(),
                a.block_tile
            ),
            Some((_, shape)) => format!("block_mask {shape:?} of {0}x{0} tiles", a.block_tile),
            None => format!("`{}`", mask.expr()),
        },
        pairs as f64 / (dims.batch * dims.sq * dims.sk) as f64,
        secs * 1e3,
        flops / secs / 1e9,
        engine,
        a.output.display()
    );
    Ok(())
}

/// `run --linear SPEC`: linear attention through `longattn::linear` (glue only).
/// `run --sparse`: select, attend through the selection (and the backward through it), write the
/// outputs with the selected block table.
fn run_sparse(
    a: &Args,
    text: &str,
    [q, k, v]: [&longattn::TensorView; 3],
    mask: &longattn::mask::BoundMask,
    dout: Option<&longattn::Tensor>,
    params: &AttnParams,
) -> Result<()> {
    let spec = longattn::SparseSpec::parse(text)?;
    if spec.skip.is_some() && dout.is_some() {
        bail!("--sparse {text}: skip-softmax approximates the forward only; drop `skip` for --backward");
    }
    if a.backend == "cuda" && matches!(spec.method, longattn::sparse::Method::Columns { .. }) {
        if dout.is_some() {
            bail!("--sparse with --backward runs on the CPU (--backend cpu): the CUDA backward through a device-written selection is not built yet");
        }
        return run_columns_cuda(a, &spec, [q, k, v], mask, params);
    }
    let pool = pool(a.threads)?;
    let t0 = Instant::now();
    let (out, sel) = match a.backend.as_str() {
        "cpu" => pool.install(|| {
            longattn::sparse::forward(q, k, v, params, &spec, longattn::MaskSpec::Expr(mask))
        })?,
        "cuda" => {
            if dout.is_some() {
                bail!("--sparse with --backward runs on the CPU (--backend cpu): the CUDA backward through a device-written schedule is not built yet");
            }
            let dev = longattn::cuda::CudaDevice::open(a.device)?;
            longattn::sparse::cuda::forward(
                &dev,
                q,
                k,
                v,
                params,
                &spec,
                longattn::MaskSpec::Expr(mask),
            )?
        }
        other => bail!("--backend {other}: expected `cpu` or `cuda`"),
    };
    let secs = t0.elapsed().as_secs_f64();
    let grads = match dout {
        None => None,
        Some(d) => {
            let bp = longattn::BackwardParams {
                deterministic: a.deterministic,
                ..Default::default()
            };
            let (ov, dov) = (out.out.view("out")?, d.view("do")?);
            Some(pool.install(|| {
                longattn::backward(q, k, v, &ov, &out.lse, &dov, params, sel.mask(), &bp)
            })?)
        }
    };
    let [b, sq, hq, _] = q.shape;
    let s = &sel.schedule;
    let table = sel.block_mask();
    let (tq, tk) = ([s.tile_q as i32], [s.tile_k as i32]);
    use longattn::io::Extra;
    longattn::io::write_outputs_with(
        &a.output,
        &out.out,
        &out.lse,
        [b, hq, sq],
        grads.as_ref(),
        &[
            (
                "block_mask",
                vec![b, hq, s.q_tiles, s.k_tiles],
                Extra::U8(&table),
            ),
            ("block_tile_q", vec![1], Extra::I32(&tq)),
            ("block_tile_k", vec![1], Extra::I32(&tk)),
        ],
        a.force,
    )?;
    let r = &sel.report;
    let (lo, hi) = (0..b * hq)
        .map(|i| r.head_density(i / hq, i % hq))
        .fold((f64::INFINITY, 0.0f64), |(lo, hi), x| {
            (lo.min(x), hi.max(x))
        });
    eprintln!(
        "{}: sparse {spec} within mask `{}`: density {:.4} of the mask's pairs (heads {lo:.4} .. {hi:.4}), {:.3} ms selection + attention{} -> {}",
        a.input.display(),
        mask.expr(),
        r.density(),
        secs * 1e3,
        if grads.is_some() { " (+ backward)" } else { "" },
        a.output.display()
    );
    if let Some((tested, dropped)) = sel.skipped {
        eprintln!(
            "  skip-softmax: {dropped} of {tested} tile groups dropped ({:.1}%)",
            100.0 * dropped as f64 / tested.max(1) as f64
        );
    }
    if sel.fallback {
        eprintln!(
            "  dense fallback: {} keys, fewer than dense_below = {} (give dense_below=0 to select)",
            k.shape[1],
            spec.dense_below_or(match a.backend.as_str() {
                "cuda" => longattn::sparse::cuda::CUDA_DENSE_BELOW,
                _ => longattn::sparse::DENSE_BELOW,
            })
        );
    }
    Ok(())
}

/// `run --sparse 'columns(...)' --backend cuda`: the gathered form on the device
/// (`sparse::columns::ColumnsPlan`), the outputs written with its block table (2 for the tiles
/// it computes in part: gathered keys, and the mask's Partial tiles).
fn run_columns_cuda(
    a: &Args,
    spec: &longattn::SparseSpec,
    [q, k, v]: [&longattn::TensorView; 3],
    mask: &longattn::mask::BoundMask,
    params: &AttnParams,
) -> Result<()> {
    use longattn::cuda::{CudaDevice, DevTensor};
    let dev = CudaDevice::open(a.device)?;
    let dims = longattn::attention::validate("sparse attention", q, k, v)?;
    let t0 = Instant::now();
    let mut plan = longattn::sparse::columns::ColumnsPlan::new(
        &dev,
        dims,
        q.dtype(),
        params,
        spec,
        longattn::MaskSpec::Expr(mask),
    )?;
    let (qd, kd, vd) = (
        DevTensor::upload(&dev, "q", q)?,
        DevTensor::upload(&dev, "k", k)?,
        DevTensor::upload(&dev, "v", v)?,
    );
    let [b, sq, hq, d] = q.shape;
    let mut o = DevTensor::alloc(&dev, [b, sq, hq, d], q.dtype())?;
    let mut lse = dev.alloc_f32(b * hq * sq)?;
    plan.launch_on(dev.stream(), &qd, &kd, &vd, &mut o, &mut lse)?;
    dev.synchronize()?;
    let secs = t0.elapsed().as_secs_f64();
    let (out, lse) = (o.download(&dev)?, dev.download(&lse)?);
    let sel = plan.selection()?;
    let cand = plan.candidates();
    let rows = Some(mask as &dyn longattn::mask::RowMask);
    let (density, table) = longattn::sparse::gather::report(&sel, cand, rows, b, hq)?;
    let (tq, tk) = ([cand.tile_q as i32], [cand.tile_k as i32]);
    use longattn::io::Extra;
    longattn::io::write_outputs_with(
        &a.output,
        &out,
        &lse,
        [b, hq, sq],
        None,
        &[
            (
                "block_mask",
                vec![b, hq, cand.q_tiles, cand.k_tiles],
                Extra::U8(&table),
            ),
            ("block_tile_q", vec![1], Extra::I32(&tq)),
            ("block_tile_k", vec![1], Extra::I32(&tk)),
        ],
        a.force,
    )?;
    eprintln!(
        "{}: sparse {spec} (gathered form) within mask `{}`: density {density:.4} of the mask's pairs, {:.3} ms plan + selection + attention -> {}",
        a.input.display(),
        mask.expr(),
        secs * 1e3,
        a.output.display()
    );
    if plan.fallback {
        eprintln!(
            "  dense fallback: {} keys, fewer than dense_below = {} (give dense_below=0 to select)",
            k.shape[1],
            spec.dense_below_or(longattn::sparse::cuda::CUDA_DENSE_BELOW)
        );
    }
    Ok(())
}

fn run_linear(a: &Args, text: &str) -> Result<()> {
    use longattn::linear::{self, Backend, LinearInputs, LinearSpec};
    let backend = match a.backend.as_str() {
        "cpu" => Backend::Cpu,
        "cuda" => Backend::Cuda(a.device),
        other => bail!("--backend {other}: expected `cpu` or `cuda`"),
    };
    let mut spec = LinearSpec::parse(text)?;
    if a.scale.is_some() {
        spec.scale = a.scale;
    }
    let inputs = longattn::io::read_inputs(&a.input)?;
    if !a.allow_nonfinite {
        check_finite(&inputs).with_context(|| format!("{}", a.input.display()))?;
    }
    let extra = longattn::io::read_linear_extras(&a.input)?;
    let mut inp = LinearInputs::new(
        inputs.q.view("q")?,
        inputs.k.view("k")?,
        inputs.v.view("v")?,
    );
    inp.g = extra.g.as_ref().map(|(x, _)| &x[..]);
    inp.initial_state = extra.initial_state.as_ref().map(|(x, _)| &x[..]);
    inp.cu_seqlens = extra.cu_seqlens.as_deref();
    inp.hedgehog = extra.hedgehog.as_ref().map(|(x, _)| &x[..]);
    let pool = pool(a.threads)?;
    let t0 = Instant::now();
    let out = pool.install(|| linear::linear_attention(&inp, &spec, backend))?;
    let secs = t0.elapsed().as_secs_f64();
    let grads = match a.backward {
        false => None,
        true => {
            let dout = extra.dout.as_ref().with_context(|| {
                format!(
                    "{}: --backward needs the tensor `do` (the gradient of out, [B, T, H, V])",
                    a.input.display()
                )
            })?;
            let d_state = extra.d_state.as_ref().map(|(x, _)| &x[..]);
            let t1 = Instant::now();
            let g = pool.install(|| {
                linear::linear_attention_backward(
                    &inp,
                    &spec,
                    &dout.data.to_f32_vec(),
                    d_state,
                    backend,
                )
            })?;
            eprintln!("backward: {:.3} ms", t1.elapsed().as_secs_f64() * 1e3);
            Some(g)
        }
    };
    longattn::io::write_linear_outputs(
        &a.output,
        &out.out,
        &out.final_state,
        out.state_shape,
        grads.as_ref(),
        extra.g.as_ref().map(|(_, s)| &s[..]),
        extra.hedgehog.as_ref().map(|(_, s)| &s[..]),
        a.force,
    )?;
    let [b, t, h, _] = inp.q.shape;
    eprintln!(
        "{}: linear `{spec}` B {b} T {t} H {h} Hk {} D {} V {} {}: {:.3} ms on {} threads -> {} (state {:?})",
        a.input.display(),
        inp.k.shape[2],
        inp.q.shape[3],
        inp.v.shape[3],
        inputs.dtype(),
        secs * 1e3,
        pool.current_num_threads(),
        a.output.display(),
        out.state_shape
    );
    Ok(())
}
