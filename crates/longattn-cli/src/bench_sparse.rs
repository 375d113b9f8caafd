//! `longattn bench --sparse SPEC[;SPEC...]`: dynamic sparse prefill on the CPU against the dense
//! forward under the same mask, in one run.
//!
//! Inputs: the captured layers of `--data` (real q / k / v: sinks, local bands, outliers), or
//! seeded uniform random ones (`--lens`, `--dims`, `--heads`, `--kv-heads`; random scores have no
//! structure, so their densities say little). Per (input, spec): the median time of the dense
//! forward under `--masks`' first mask (default `causal`), of `sparse::select` and of the forward
//! through the selection (`Selection::params`, so `skip=F` applies), the selection's density and
//! the end-to-end speedup dense / (select + sparse), and the share of key groups skip-softmax
//! dropped in the timed sparse calls. With `--recall` also the exact mass recall
//! (`sparse::mass_recall`: two f64 oracle passes, small inputs only).
use crate::bench::{median, Args};
use crate::common::{fmt_len, parse_len, parse_list, pool, random_inputs};
use crate::maskglue::bind_mask;
use anyhow::{bail, Context, Result};
use longattn::{AttnParams, MaskSpec, SparseSpec};
use std::time::Instant;

/// FlexAttention on the selected blocks (`--backend cuda --compare torch`).
const PEER_SCRIPT: &str = include_str!("peer_sparse_cuda.py");

/// Median seconds of `f` over at least 3 calls and `min_time` seconds (after one warm-up).
fn timed(min_time: f64, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    let (mut times, t_all) = (Vec::new(), Instant::now());
    while times.len() < 3 || t_all.elapsed().as_secs_f64() < min_time {
        let t0 = Instant::now();
        f()?;
        times.push(t0.elapsed().as_secs_f64());
    }
    Ok(median(times))
}

pub fn main(a: &Args, text: &str) -> Result<()> {
    let specs: Vec<SparseSpec> = text
        .split(';')
        .map(|s| SparseSpec::parse(s).with_context(|| format!("--sparse `{s}`")))
        .collect::<Result<_>>()?;
    match a.backend.as_str() {
        "cpu" => {}
        "cuda" => return cuda(a, &specs),
        b => bail!("--sparse runs on `cpu` or `cuda`, not `{b}`"),
    }
    let mask_text = match &a.masks {
        Some(m) if m.contains(',') => bail!("--sparse takes one mask expression in --masks"),
        Some(m) => m.clone(),
        None => "causal".into(),
    };
    let pool = pool(a.threads)?;
    let min_time = a.min_time.unwrap_or(0.5);
    let inputs: Vec<(String, longattn::io::Inputs)> = match &a.data {
        Some(path) => {
            let layers = match &a.layers {
                Some(s) => Some(parse_list(s, "layer", |x| x.parse::<usize>().ok())?),
                None => None,
            };
            longattn::io::read_captured(path, layers.as_deref())?
                .into_iter()
                .map(|(l, i)| (format!("layer {l}"), i))
                .collect()
        }
        None => {
            let lens = parse_list(a.lens.as_deref().unwrap_or("4k,16k"), "length", parse_len)?;
            let dims = parse_list(a.dims.as_deref().unwrap_or("64"), "head dim", |x| {
                x.parse().ok()
            })?;
            let hk = a.kv_heads.unwrap_or(a.heads);
            let mut v = Vec::new();
            for &n in &lens {
                for &d in &dims {
                    let inp = random_inputs(
                        longattn::DType::F32,
                        a.batch,
                        n,
                        n,
                        a.heads,
                        hk,
                        d,
                        a.seed,
                        None,
                    )?;
                    v.push((format!("random n {} D {d}", fmt_len(n)), inp));
                }
            }
            v
        }
    };
    println!(
        "sparse prefill on {} threads, mask `{mask_text}`",
        pool.current_num_threads()
    );
    println!(
        "{:<22} {:<58} {:>8} {:>9} {:>9} {:>9} {:>8} {:>8} {:>8}",
        "input", "spec", "density", "dense ms", "select", "sparse", "speedup", "recall", "skipped"
    );
    for (name, inp) in &inputs {
        let d = inp.dims()?;
        let (q, k, v) = (inp.q.view("q")?, inp.k.view("k")?, inp.v.view("v")?);
        let bound = bind_mask(&mask_text, d.batch, d.sq, d.sk, None)?;
        let params = AttnParams::default();
        let dense = pool.install(|| {
            timed(min_time, || {
                longattn::forward(&q, &k, &v, &params, MaskSpec::Expr(&bound))?;
                Ok(())
            })
        })?;
        for spec in &specs {
            let sel = pool.install(|| {
                longattn::sparse::select(&q, &k, &params, spec, MaskSpec::Expr(&bound))
            })?;
            let t_sel = pool.install(|| {
                timed(min_time, || {
                    longattn::sparse::select(&q, &k, &params, spec, MaskSpec::Expr(&bound))?;
                    Ok(())
                })
            })?;
            let p = sel.params(&params, spec)?;
            longattn::cpu::reset_skip_stats();
            let t_sparse = pool.install(|| {
                timed(min_time, || {
                    longattn::forward(&q, &k, &v, &p, sel.mask())?;
                    Ok(())
                })
            })?;
            let recall = match a.recall {
                true => format!(
                    "{:.4}",
                    pool.install(|| longattn::sparse::mass_recall(&q, &k, &params, &sel))?
                        .mean
                ),
                false => "-".into(),
            };
            let (tested, dropped) = longattn::cpu::skip_stats();
            let skipped = match tested {
                0 => "-".to_string(),
                _ => format!("{:.1}%", 100.0 * dropped as f64 / tested as f64),
            };
            println!(
                "{:<22} {:<58} {:>8.4} {:>9.2} {:>9.2} {:>9.2} {:>7.2}x {:>8} {:>8}",
                name,
                spec.to_string(),
                sel.report.density(),
                dense * 1e3,
                t_sel * 1e3,
                t_sparse * 1e3,
                dense / (t_sel + t_sparse),
                recall,
                skipped
            );
        }
    }
    Ok(())
}

/// A seeded q / k generator of the GPU benches (`sparse::structured_qk`, ...): dtype, batch, Sq,
/// Sk, query heads, KV heads, head dim, seed.
type QkGen = fn(
    longattn::DType,
    usize,
    usize,
    usize,
    usize,
    usize,
    usize,
    u64,
) -> (longattn::Tensor, longattn::Tensor);

/// The GPU benches' inputs on the device: bf16 q / k from `gen`, random v (seed + 2), `n` tokens,
/// head dim `d`, (query, KV) heads; with their problem dims.
fn device_inputs(
    dev: &std::sync::Arc<longattn::cuda::CudaDevice>,
    a: &Args,
    gen: QkGen,
    n: usize,
    d: usize,
    (hq, hk): (usize, usize),
) -> Result<(
    longattn::attention::Dims,
    longattn::cuda::DevTensor,
    longattn::cuda::DevTensor,
    longattn::cuda::DevTensor,
)> {
    use longattn::cuda::DevTensor;
    let bf = longattn::DType::BF16;
    let (q, k) = gen(bf, a.batch, n, n, hq, hk, d, a.seed);
    let v = longattn::testing::random_tensor(bf, &[a.batch, n, hk, d], 1.0, a.seed + 2);
    let (qv, kv, vv) = (q.view("q")?, k.view("k")?, v.view("v")?);
    let dm = longattn::attention::validate("bench", &qv, &kv, &vv)?;
    Ok((
        dm,
        DevTensor::upload(dev, "q", &qv)?,
        DevTensor::upload(dev, "k", &kv)?,
        DevTensor::upload(dev, "v", &vv)?,
    ))
}

/// The GPU benches' problem shape: `--lens` (default `lens`), `--dims` (default 128), query / KV
/// heads (32 / 8 unless --heads / --kv-heads say otherwise) and repetitions (at least 10).
#[allow(clippy::type_complexity)]
fn gpu_shape(a: &Args, lens: &str) -> Result<(Vec<usize>, Vec<usize>, (usize, usize), usize)> {
    let lens = parse_list(a.lens.as_deref().unwrap_or(lens), "length", parse_len)?;
    let dims = parse_list(a.dims.as_deref().unwrap_or("128"), "head dim", |x| {
        x.parse().ok()
    })?;
    let hq = if a.heads == 8 && a.kv_heads.is_none() {
        32
    } else {
        a.heads
    };
    let hk = a.kv_heads.unwrap_or(if hq == 32 { 8 } else { hq });
    Ok((lens, dims, (hq, hk), a.reps.max(10)))
}

/// `--backend cuda`: per length, our dense forward under the mask against, per spec, the device
/// estimator + schedule build (`SparsePlan::launch_select_on`) and the attention through the
/// device-written schedule (`launch_attention_on`), each the median of CUDA-event timings after
/// a warm-up. Inputs: [`longattn::sparse::structured_qk`] (sinks, hub columns, diagonals; seeded)
/// and random values, bf16, `--heads` / `--kv-heads` (default 32 / 8), `--dims` (default 128).
fn cuda(a: &Args, specs: &[SparseSpec]) -> Result<()> {
    use longattn::cuda::{CudaDevice, DevTensor, FwdPlan};
    use longattn::sparse::cuda::SparsePlan;
    let mask_text = match &a.masks {
        Some(m) if m.contains(',') => bail!("--sparse takes one mask expression in --masks"),
        Some(m) => m.clone(),
        None => "causal".into(),
    };
    for spec in specs {
        match spec.method {
            longattn::sparse::Method::Columns { .. } => {
                if mask_text != "causal" {
                    bail!("--sparse `{spec}` on CUDA: the gathered form's density is counted under `causal` only (--masks causal)");
                }
                longattn::sparse::columns::ColumnsArgs::of(spec).map(|_| ())
            }
            _ => longattn::sparse::cuda::check_spec(spec),
        }
        .with_context(|| format!("--sparse `{spec}`"))?;
    }
    let dev = CudaDevice::open(a.device)?;
    let (lens, dims, (hq, hk), reps) = gpu_shape(a, "4k,8k,64k,128k")?;
    println!(
        "sparse prefill on {} (CUDA), mask `{mask_text}`, bf16, batch {}, heads {hq} / {hk}, {} q / k, median of {reps} (dense timed in turn with each)",
        dev.name, a.batch, a.inputs
    );
    println!(
        "{:<10} {:<50} {:>8} {:>9} {:>9} {:>7} {:>9} {:>9} {:>8} {:>8} {:>8}",
        "input",
        "spec",
        "density",
        "dense ms",
        "select",
        "sel/dns",
        "sparse",
        "e2e",
        "speedup",
        "kernel",
        "skipped"
    );
    let median_ms = |f: &mut dyn FnMut() -> longattn::Result<()>| -> Result<f64> {
        f()?;
        let mut t = Vec::new();
        for _ in 0..reps {
            t.push(dev.time_ms(&mut *f)?);
        }
        Ok(median(t))
    };
    // The medians of two launches timed in turn, one of each per repetition, so that the
    // device's clock and temperature drift over the run weigh on both alike (timed one after
    // the other, the later one ran up to 6% slower for no reason of its own).
    type Launch<'a> = &'a mut dyn FnMut() -> longattn::Result<()>;
    let in_turn = |a: Launch, b: Launch| -> Result<(f64, f64)> {
        a()?;
        b()?;
        let (mut ta, mut tb) = (Vec::with_capacity(reps), Vec::with_capacity(reps));
        for _ in 0..reps {
            ta.push(dev.time_ms(&mut *a)?);
            tb.push(dev.time_ms(&mut *b)?);
        }
        Ok((median(ta), median(tb)))
    };
    // One row of the table; kernel = sparse kernel time against density x dense (1.00:
    // proportional).
    let print_row = |name: &str,
                     spec: &SparseSpec,
                     density: f64,
                     [dense, t_sel, t_att, t_e2e, dense_e2e]: [f64; 5],
                     skipped: &str| {
        println!(
            "{:<10} {:<50} {:>8.4} {:>9.3} {:>9.3} {:>6.1}% {:>9.3} {:>9.3} {:>7.2}x {:>7.2}x {:>8}",
            name,
            spec.to_string(),
            density,
            dense,
            t_sel,
            100.0 * t_sel / dense,
            t_att,
            t_e2e,
            dense_e2e / t_e2e,
            t_att / (density * dense).max(1e-9),
            skipped,
        )
    };
    let compare = match a.compare.as_deref() {
        None => false,
        Some("torch") => true,
        Some(o) => bail!("--compare {o}: expected `torch` (FlexAttention on the same blocks)"),
    };
    let dir = a.out.join(".peer");
    if compare {
        std::fs::create_dir_all(&dir)?;
    }
    // (job config, label, our dense ms, our sparse-kernel ms, density) per compared row.
    let mut peer_rows: Vec<(serde_json::Value, String, f64, f64, f64)> = Vec::new();
    for &n in &lens {
        for &d in &dims {
            let gen = match a.inputs.as_str() {
                "structured" => longattn::sparse::structured_qk,
                "sharp" => longattn::sparse::structured_qk_sharp,
                "planted" => longattn::sparse::skip_check::planted_near_far,
                o => bail!("--inputs {o}: expected `structured`, `sharp` or `planted`"),
            };
            let bound = bind_mask(&mask_text, a.batch, n, n, None)?;
            let (dm, qd, kd, vd) = device_inputs(&dev, a, gen, n, d, (hq, hk))?;
            let mut o = DevTensor::alloc(&dev, [a.batch, n, hq, d], longattn::DType::BF16)?;
            let mut lse = dev.alloc_f32(a.batch * hq * n)?;
            let params = AttnParams::default();
            let s = dev.stream().clone();
            let dense_plan = FwdPlan::new(
                &dev,
                dm,
                longattn::DType::BF16,
                &params,
                MaskSpec::Expr(&bound),
            )?;
            let mut o_dense = DevTensor::alloc(&dev, [a.batch, n, hq, d], longattn::DType::BF16)?;
            let mut lse_dense = dev.alloc_f32(a.batch * hq * n)?;
            let name = format!("n {} D {d}", fmt_len(n));
            for spec in specs {
                if matches!(spec.method, longattn::sparse::Method::Columns { .. }) {
                    // `columns` runs in the gathered form (sparse::columns): estimate, key lists,
                    // the gathered forward.
                    let mut plan = longattn::sparse::columns::ColumnsPlan::new(
                        &dev,
                        dm,
                        longattn::DType::BF16,
                        &params,
                        spec,
                        MaskSpec::Expr(&bound),
                    )?;
                    let t_sel = median_ms(&mut || plan.launch_select_on(&s, &qd, &kd))?;
                    let sel = plan.selection()?;
                    let mut dense_launch =
                        || dense_plan.launch_on(&s, &qd, &kd, &vd, &mut o_dense, &mut lse_dense);
                    let (dense, t_att) = in_turn(&mut dense_launch, &mut || {
                        plan.launch_attention_on(&s, &qd, &kd, &vd, &mut o, &mut lse)
                    })?;
                    let (dense_e2e, t_e2e) = in_turn(&mut dense_launch, &mut || {
                        plan.launch_on(&s, &qd, &kd, &vd, &mut o, &mut lse)
                    })?;
                    let mut kept = 0.0;
                    for b in 0..a.batch {
                        for h in 0..hq {
                            kept += causal_kept(&sel, b, h, n).0;
                        }
                    }
                    let density =
                        kept / (n as f64 * (n as f64 + 1.0) / 2.0) / (a.batch * hq) as f64;
                    let stages = plan
                        .profile_select_on(&s, &qd, &kd)?
                        .iter()
                        .map(|(n, ms)| format!("{n} {ms:.3}"))
                        .collect::<Vec<_>>()
                        .join(", ");
                    print_row(
                        &name,
                        spec,
                        density,
                        [dense, t_sel, t_att, t_e2e, dense_e2e],
                        "-",
                    );
                    println!(
                        "{:<10} estimator stages (ms): {stages}; scratch {} MB",
                        "",
                        plan.scratch_bytes() >> 20
                    );
                    continue;
                }
                let mut plan = SparsePlan::new(
                    &dev,
                    dm,
                    longattn::DType::BF16,
                    &params,
                    spec,
                    MaskSpec::Expr(&bound),
                )?;
                let t_sel = median_ms(&mut || plan.launch_select_on(&s, &qd, &kd))?;
                let sel = plan.selection(Some(&bound as &dyn longattn::mask::RowMask))?;
                plan.take_skip_stats()?;
                // Dense and the sparse kernel alone, timed in turn.
                let mut dense_launch =
                    || dense_plan.launch_on(&s, &qd, &kd, &vd, &mut o_dense, &mut lse_dense);
                let (dense, t_att) = in_turn(&mut dense_launch, &mut || {
                    plan.launch_attention_on(&s, &qd, &kd, &vd, &mut o, &mut lse)
                })?;
                // Skip-softmax: the share of the tested key tiles the kernel dropped.
                let skipped = match plan.take_skip_stats()? {
                    Some((t, d)) => format!("{:.1}%", 100.0 * d as f64 / t.max(1) as f64),
                    None => "-".into(),
                };
                // The end-to-end speedup against dense timed in turn with it, in its own pass.
                let (dense_e2e, t_e2e) = in_turn(&mut dense_launch, &mut || {
                    plan.launch_on(&s, &qd, &kd, &vd, &mut o, &mut lse)
                })?;
                let density = sel.report.density();
                let stages = plan
                    .profile_select_on(&s, &qd, &kd)?
                    .iter()
                    .map(|(n, ms)| format!("{n} {ms:.3}"))
                    .collect::<Vec<_>>()
                    .join(", ");
                print_row(
                    &name,
                    spec,
                    density,
                    [dense, t_sel, t_att, t_e2e, dense_e2e],
                    &skipped,
                );
                if !stages.is_empty() {
                    println!("{:<10} estimator stages (ms): {stages}", "");
                }
                if compare {
                    let id = peer_rows.len();
                    let path = dir.join(format!("sparse_{id}.bin"));
                    std::fs::write(&path, sel.block_mask())?;
                    let sch = &sel.schedule;
                    peer_rows.push((
                        serde_json::json!({"id": id, "n": n, "b": a.batch, "hq": hq, "hk": hk, "d": d,
                            "table": path, "nq": sch.q_tiles, "nk": sch.k_tiles, "bq": sch.tile_q,
                            "bk": sch.tile_k, "reps": reps}),
                        format!("{name} {spec}"),
                        dense,
                        t_att,
                        density,
                    ));
                }
            }
        }
    }
    if compare && !peer_rows.is_empty() {
        println!("FlexAttention on the same blocks (BlockMask.from_kv_blocks of our selection), random bf16 inputs of the same shapes ...");
        let configs: Vec<serde_json::Value> = peer_rows.iter().map(|r| r.0.clone()).collect();
        let mut flex: std::collections::BTreeMap<(usize, String), Result<f64, String>> =
            Default::default();
        let version = crate::peer::run_script(
            &dir,
            "peer_sparse_cuda.py",
            PEER_SCRIPT,
            &serde_json::json!({ "configs": configs }),
            |l| {
                let (Some(id), Some(p)) = (
                    l.get("id").and_then(|x| x.as_u64()),
                    l.get("peer").and_then(|x| x.as_str()),
                ) else {
                    return;
                };
                let r = match (l.get("ms").and_then(|x| x.as_f64()), l.get("error")) {
                    (Some(ms), _) => Ok(ms),
                    (_, Some(e)) => Err(e.to_string()),
                    _ => return,
                };
                flex.insert((id as usize, p.to_string()), r);
            },
        )?;
        println!("torch {version}");
        println!(
            "{:<78} {:>8} {:>10} {:>10} {:>9} {:>10} {:>10} {:>9}",
            "input, spec",
            "density",
            "ours sp",
            "flex sp",
            "flex/ours",
            "ours dense",
            "flex dense",
            "flex/ours"
        );
        for (id, (_, label, dense, att, density)) in peer_rows.iter().enumerate() {
            let get = |p: &str| flex.get(&(id, p.to_string())).cloned();
            let fmt = |x: &Option<Result<f64, String>>, ours: f64| match x {
                Some(Ok(ms)) => (format!("{ms:.3}"), format!("{:.2}x", ms / ours)),
                Some(Err(e)) => (format!("error: {e}"), "-".into()),
                None => ("-".into(), "-".into()),
            };
            let (fs, rs) = fmt(&get("flex_sparse"), *att);
            let (fd, rd) = fmt(&get("flex_dense"), *dense);
            println!(
                "{label:<78} {density:>8.4} {att:>10.3} {fs:>10} {rs:>9} {dense:>10.3} {fd:>10} {rd:>9}"
            );
        }
    }
    Ok(())
}

/// Pairs a selection computes under `causal` (n x n) for (b, h), and the key tiles it touches:
/// a whole tile's rows i keep keys k0 ..= min(i, k1 - 1); a kept key j rows max(q0, j) .. q1 - 1.
fn causal_kept(
    sel: &longattn::sparse::gather::TileKeys,
    b: usize,
    h: usize,
    n: usize,
) -> (f64, usize) {
    let (tq, tk) = (sel.tile_q, sel.tile_k);
    let (mut kept, mut touched) = (0f64, 0usize);
    for qt in 0..sel.q_tiles {
        let (q0, q1) = (qt * tq, ((qt + 1) * tq).min(n));
        let tiles = sel.tiles_of(b, h, qt);
        for &kt in tiles {
            let (k0, k1) = (kt as usize * tk, ((kt as usize + 1) * tk).min(n));
            kept += (q0..q1)
                .map(|i| (i.min(k1 - 1) + 1).saturating_sub(k0) as f64)
                .sum::<f64>();
        }
        let keys = sel.keys_of(b, h, qt);
        kept += keys
            .iter()
            .map(|&j| q1.saturating_sub((j as usize).max(q0)) as f64)
            .sum::<f64>();
        let mut kts: Vec<u32> = keys.iter().map(|&j| j / tk as u32).collect();
        kts.extend_from_slice(tiles);
        kts.sort_unstable();
        kts.dedup();
        touched += kts.len();
    }
    (kept, touched)
}

/// `--gather P,...` (`--backend cuda`): the gathered forward ([`longattn::cuda::FwdPlan::with_gather`])
/// of a seeded selection ([`longattn::sparse::gather::TileKeys::synthetic`]: the sink tile and the
/// local band whole, each earlier key with probability P; one selection shared by the heads)
/// under `causal`, against our dense causal forward, the two timed in turn (medians of CUDA-event
/// timings after a warm-up). density = kept pairs / causal pairs; kernel = gathered / (density x
/// dense), 1.00 being a kernel whose time is proportional to the pairs kept; touched = the share
/// of causal tiles holding a kept pair (what a tile-level schedule of the same selection would
/// compute whole). The first row of each length (P `tiles`) keeps every causal tile whole: the
/// gathered variant on the dense forward's own work.
pub fn gather(a: &Args, list: &str) -> Result<()> {
    use longattn::cuda::{gather_tiles, CudaDevice, DevTensor, FwdPlan};
    use longattn::sparse::gather::TileKeys;
    if a.backend != "cuda" {
        bail!("--gather times the CUDA forward (--backend cuda)");
    }
    if a.masks.as_deref().is_some_and(|m| m != "causal") {
        bail!("--gather runs under `causal` (its density is counted for that mask)");
    }
    let probs = parse_list(list, "key probability", |x| {
        x.parse::<f64>().ok().filter(|p| (0.0..=1.0).contains(p))
    })?;
    let dev = CudaDevice::open(a.device)?;
    let (lens, dims, (hq, hk), reps) = gpu_shape(a, "16k,64k,128k")?;
    println!(
        "gathered keys on {} (CUDA), causal, bf16, batch {}, heads {hq} / {hk}, median of {reps} (dense timed in turn)",
        dev.name, a.batch
    );
    println!(
        "{:<12} {:>6} {:>8} {:>8} {:>9} {:>9} {:>9} {:>8} {:>7} {:>9}",
        "input",
        "P",
        "density",
        "touched",
        "entries",
        "dense ms",
        "gather",
        "speedup",
        "kernel",
        "plan s"
    );
    for &n in &lens {
        for &d in &dims {
            let bound = bind_mask("causal", a.batch, n, n, None)?;
            let (dm, qd, kd, vd) =
                device_inputs(&dev, a, longattn::sparse::structured_qk, n, d, (hq, hk))?;
            let bf = longattn::DType::BF16;
            let params = AttnParams::default();
            let s = dev.stream().clone();
            let dense_plan = FwdPlan::new(&dev, dm, bf, &params, MaskSpec::Expr(&bound))?;
            let (mut o1, mut o2) = (
                DevTensor::alloc(&dev, [a.batch, n, hq, d], bf)?,
                DevTensor::alloc(&dev, [a.batch, n, hq, d], bf)?,
            );
            let (mut l1, mut l2) = (
                dev.alloc_f32(a.batch * hq * n)?,
                dev.alloc_f32(a.batch * hq * n)?,
            );
            let (tq, tk) = gather_tiles(&dev, d, n, &MaskSpec::Expr(&bound))?;
            let causal_pairs = (n as f64) * (n as f64 + 1.0) / 2.0;
            let causal_tiles: usize = (0..n.div_ceil(tq))
                .map(|qt| ((qt + 1) * tq).min(n).div_ceil(tk))
                .sum();
            // First every causal tile whole (the variant's own cost against the plain kernel on
            // the same work: kernel = 1.00 is none), then each probability.
            let all = {
                let tiles: Vec<Vec<u32>> = (0..n.div_ceil(tq))
                    .map(|qt| (0..((qt + 1) * tq).min(n).div_ceil(tk) as u32).collect())
                    .collect();
                let keys = vec![Vec::new(); tiles.len()];
                TileKeys::new((tq, tk), (n, n), (1, 1), tiles, keys)?
            };
            for p in std::iter::once(None).chain(probs.iter().map(|&p| Some(p))) {
                let sel = match p {
                    None => all.clone(),
                    Some(p) => TileKeys::synthetic((tq, tk), (n, n), (1, 1), p, a.seed + 9)?,
                };
                let (kept, touched) = causal_kept(&sel, 0, 0, n);
                let density = kept / causal_pairs;
                let t0 = Instant::now();
                let plan =
                    FwdPlan::with_gather(&dev, dm, bf, &params, MaskSpec::Expr(&bound), &sel)?;
                let plan_s = t0.elapsed().as_secs_f64();
                let (tiles, chunks) = plan.gather_counts().unwrap_or_default();
                let mut one = || dense_plan.launch_on(&s, &qd, &kd, &vd, &mut o1, &mut l1);
                let mut two = || plan.launch_on(&s, &qd, &kd, &vd, &mut o2, &mut l2);
                one()?;
                two()?;
                let (mut ta, mut tb) = (Vec::new(), Vec::new());
                for _ in 0..reps {
                    ta.push(dev.time_ms(&mut one)?);
                    tb.push(dev.time_ms(&mut two)?);
                }
                let (dense, t) = (median(ta), median(tb));
                println!(
                    "{:<12} {:>6} {:>8.4} {:>7.1}% {:>9} {:>9.3} {:>9.3} {:>7.2}x {:>7.2}x {:>9.2}",
                    format!("n {} D {d}", fmt_len(n)),
                    p.map_or("tiles".to_string(), |p| p.to_string()),
                    density,
                    100.0 * touched as f64 / causal_tiles as f64,
                    format!("{tiles}+{chunks}"),
                    dense,
                    t,
                    dense / t,
                    t / (density * dense).max(1e-9),
                    plan_s
                );
            }
        }
    }
    Ok(())
}
