//! The public entry points of linear attention: [`linear_attention`] (forward),
//! [`linear_attention_backward`] and [`linear_step`] (decode), for a [`LinearSpec`].
//!
//! Pipeline (forward): feature maps on q and k (`feature::forward`; skipped for the identity map
//! without normalisation, so strided and half inputs go to the core as they are), `v' = [v, 1]`
//! for the denominator normalisation, the decay of the spec (per-head constants, or the input `g`),
//! the core ([`Backend`] picks the kernel), then the normalisation of the output rows and, for
//! `based(window=W)`, the exact causal softmax attention over the last `W` keys (the existing
//! softmax entry [`crate::attention::forward`] with mask `causal & window(W-1,0)`, plus
//! `& document` under `cu_seqlens`; scale `1/sqrt(D)`) added to the normalised linear output.
//! The backward recomputes the forward pieces it needs and runs the same steps in reverse; the
//! window part goes through [`crate::backward`] (its gradients are rounded to the input dtype).
use super::cpu::{self, CoreGrads, CoreOutput};
use super::cuda;
use super::feature::{self, FeatureMap, Hedgehog};
use super::spec::{DecaySpec, LinearSpec, Normalization};
use super::{Core, Decay};
use crate::attention::{AttnParams, MaskSpec};
use crate::cuda::CudaDevice;
use crate::error::{Error, Result};
use crate::mask::{BoundMask, DocIds, MaskExpr, MaskShape};
use crate::tensor::{Buffer, Tensor, TensorView};
use rayon::prelude::*;

/// Where the core runs. One place routes every entry point to a kernel.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Backend {
    #[default]
    Cpu,
    /// An NVIDIA GPU (ordinal): the core runs in the CUDA kernels (`linear::cuda`: bf16 / f16
    /// q, k, v with K and V of 64 or 128, decays none / per head / per token; the gate only in
    /// the step); feature maps, the ones column and the normalisations stay on the host.
    Cuda(usize),
}

/// Inputs of a linear-attention call: `q [B, T, H, D]`, `k [B, T, Hk, D]`, `v [B, T, Hk, V]`
/// (any strides, f32/bf16/f16); `g` the log decay of `simple_gla` (`[B, T, H]`) or `gla`
/// (`[B, T, H, F]`, F the feature dim), f32, `<= 0`; `initial_state [seqs, H, F, V']` f32 (`V' = V + 1`
/// with `normalized`: the last column is the denominator's `z`); `cu_seqlens [N + 1]` (B = 1);
/// `hedgehog` the weights `[Hk, D, Fh]` of the hedgehog map.
#[derive(Clone, Copy, Debug)]
pub struct LinearInputs<'a> {
    pub q: TensorView<'a>,
    pub k: TensorView<'a>,
    pub v: TensorView<'a>,
    pub g: Option<&'a [f32]>,
    pub initial_state: Option<&'a [f32]>,
    pub cu_seqlens: Option<&'a [i32]>,
    pub hedgehog: Option<&'a [f32]>,
}

impl<'a> LinearInputs<'a> {
    pub fn new(q: TensorView<'a>, k: TensorView<'a>, v: TensorView<'a>) -> Self {
        LinearInputs {
            q,
            k,
            v,
            g: None,
            initial_state: None,
            cu_seqlens: None,
            hedgehog: None,
        }
    }
}

/// Forward result: `out [B, T, H, V]` (f32) and the final state `[seqs, H, F, V']` (f32).
#[derive(Clone, Debug)]
pub struct LinearOutput {
    pub out: Tensor,
    pub final_state: Vec<f32>,
    pub state_shape: [usize; 4],
}

/// Gradients (f32, contiguous): `dq`, `dk`, `dv` shaped like q, k, v; `dg` like `g` (for
/// `simple_gla` / `gla`); `d_initial_state` like the state; `d_hedgehog` like the hedgehog weights.
#[derive(Clone, Debug)]
pub struct LinearGrads {
    pub dq: Tensor,
    pub dk: Tensor,
    pub dv: Tensor,
    pub dg: Option<Vec<f32>>,
    pub d_initial_state: Vec<f32>,
    pub d_hedgehog: Option<Vec<f32>>,
}

/// Feature-space inputs of the core, owned where a map or the ones column made copies.
struct Prepared {
    fq: Option<Vec<f32>>,
    fk: Option<Vec<f32>>,
    vx: Option<Vec<f32>>,
    g_head: Option<Vec<f32>>,
    f: usize,
    vd: usize,
    group: usize,
}

fn hedgehog<'a>(
    op: &'static str,
    inp: &LinearInputs<'a>,
    spec: &LinearSpec,
) -> Result<Option<Hedgehog<'a>>> {
    let [_, _, hk, d] = inp.k.shape;
    match (spec.feature, inp.hedgehog) {
        (FeatureMap::Hedgehog, None) => Err(Error::Param {
            op,
            msg: "the hedgehog feature map needs its weights `hedgehog` [Hk, D, F]".into(),
        }),
        (FeatureMap::Hedgehog, Some(w)) => {
            if w.is_empty() || w.len() % (hk * d) != 0 {
                return Err(Error::Shape {
                    op,
                    tensor: "hedgehog".into(),
                    got: vec![w.len()],
                    expected: format!(
                        "[Hk = {hk}, D = {d}, F] with F >= 1 (a multiple of {})",
                        hk * d
                    ),
                });
            }
            Ok(Some(Hedgehog {
                w,
                heads: hk,
                d,
                f: w.len() / (hk * d),
            }))
        }
        (_, Some(w)) => Err(Error::Param {
            op,
            msg: format!(
                "hedgehog weights ({} elements) given, but the spec's feature map is {}",
                w.len(),
                spec.feature.name()
            ),
        }),
        (_, None) => Ok(None),
    }
}

fn prepare(op: &'static str, inp: &LinearInputs, spec: &LinearSpec) -> Result<Prepared> {
    spec.check(op)?;
    // Shapes of q, k, v first (named errors), with the core's own checks.
    Core {
        q: inp.q,
        k: inp.k,
        v: inp.v,
        decay: Decay::None,
        scale: 1.0,
        initial_state: None,
        cu_seqlens: None,
    }
    .validate(op)?;
    let [_, _, h, d] = inp.q.shape;
    let hk = inp.k.shape[2];
    let group = h / hk;
    let hh = hedgehog(op, inp, spec)?;
    let fh = hh.map_or(0, |w| w.f);
    let maps = spec.feature != FeatureMap::Identity || spec.norm == Normalization::Denominator;
    let (fq, fk) = if maps {
        (
            Some(feature::forward(spec.feature, &inp.q, hh.as_ref(), group)?),
            Some(feature::forward(spec.feature, &inp.k, hh.as_ref(), 1)?),
        )
    } else {
        (None, None)
    };
    let vd = inp.v.shape[3];
    let vx = (spec.norm == Normalization::Denominator).then(|| {
        let [_, t, hv, _] = inp.v.shape;
        let mut x = vec![1.0f32; inp.v.shape[0] * t * hv * (vd + 1)];
        // One task per token; column V stays 1.
        x.par_chunks_mut(hv * (vd + 1))
            .enumerate()
            .for_each(|(n, block)| {
                for (ih, row) in block.chunks_exact_mut(vd + 1).enumerate() {
                    for (j, y) in row[..vd].iter_mut().enumerate() {
                        *y = inp.v.get(n / t, n % t, ih, j);
                    }
                }
            });
        x
    });
    match (spec.decay.needs_input(), inp.g) {
        (true, None) => {
            return Err(Error::Param {
                op,
                msg: format!(
                    "spec `{spec}` needs the log decay `g` ({})",
                    if spec.decay == DecaySpec::Token {
                        "[B, T, H]"
                    } else {
                        "[B, T, H, F], F the feature dim"
                    }
                ),
            })
        }
        (false, Some(g)) => {
            return Err(Error::Param {
                op,
                msg: format!(
                    "a log decay `g` ({} elements) was given, but spec `{spec}` takes none (use simple_gla or gla)",
                    g.len()
                ),
            })
        }
        _ => {}
    }
    Ok(Prepared {
        fq,
        fk,
        vx,
        g_head: spec.decay.per_head(h),
        f: spec.feature.dim(d, fh),
        vd,
        group,
    })
}

impl Prepared {
    fn core<'a>(&'a self, inp: &LinearInputs<'a>, spec: &LinearSpec) -> Result<Core<'a>> {
        let [b, t, h, d] = inp.q.shape;
        let hk = inp.k.shape[2];
        let q = match &self.fq {
            Some(x) => TensorView::contiguous(&x[..], [b, t, h, self.f])?,
            None => inp.q,
        };
        let k = match &self.fk {
            Some(x) => TensorView::contiguous(&x[..], [b, t, hk, self.f])?,
            None => inp.k,
        };
        let v = match &self.vx {
            Some(x) => TensorView::contiguous(&x[..], [b, t, hk, self.vd + 1])?,
            None => inp.v,
        };
        let decay = match (spec.decay, &self.g_head, inp.g) {
            (DecaySpec::Token, _, Some(g)) => Decay::Token(g),
            (DecaySpec::Gate, _, Some(g)) => Decay::Gate(g),
            (_, Some(gh), _) => Decay::PerHead(gh),
            _ => Decay::None,
        };
        Ok(Core {
            q,
            k,
            v,
            decay,
            scale: spec.scale_for(d),
            initial_state: inp.initial_state,
            cu_seqlens: inp.cu_seqlens,
        })
    }
}

fn core_forward(core: &Core, spec: &LinearSpec, backend: Backend) -> Result<CoreOutput> {
    match backend {
        Backend::Cpu => {
            // A few tokens per sequence: the token-by-token form is cheaper than chunking.
            if core.q.shape[1] * core.q.shape[0] <= 8 && core.cu_seqlens.is_none() {
                cpu::forward_recurrent(core)
            } else {
                cpu::forward_chunked(core, spec.chunk)
            }
        }
        Backend::Cuda(ord) => {
            let dev = CudaDevice::open(ord)?;
            let d = core.validate("linear_attention")?;
            let (out, state) = cuda::forward_host(&dev, core)?;
            Ok(CoreOutput {
                out: out.data.to_f32_vec(),
                state,
                dims: d,
            })
        }
    }
}

fn core_backward(
    core: &Core,
    spec: &LinearSpec,
    dout: &[f32],
    d_final: Option<&[f32]>,
    backend: Backend,
) -> Result<CoreGrads> {
    match backend {
        Backend::Cpu => cpu::backward_chunked(core, dout, d_final, spec.chunk),
        Backend::Cuda(ord) => {
            let dev = CudaDevice::open(ord)?;
            // The kernels take dout in q's dtype.
            let [b, t, h, _] = core.q.shape;
            let dbuf = Buffer::from_f32(core.q.dtype(), dout);
            let dview =
                TensorView::contiguous(dbuf.as_slice(), [b, t, h, dout.len() / (b * t * h)])?;
            let g = cuda::backward_host(&dev, core, &dview, d_final)?;
            Ok(CoreGrads {
                dq: g.dq.data.to_f32_vec(),
                dk: g.dk.data.to_f32_vec(),
                dv: g.dv.data.to_f32_vec(),
                dg: g.dg,
                d_initial_state: g.d_initial_state,
            })
        }
    }
}

/// The sliding-window softmax part of `based(window=W)`: its bound mask.
fn window_mask(w: usize, inp: &LinearInputs) -> Result<BoundMask> {
    let [b, t, _, _] = inp.q.shape;
    let mut expr = format!("causal & window({},0)", w - 1);
    let docs = inp.cu_seqlens.map(|cu| {
        expr += " & document";
        let ids: Vec<i32> = (0..t)
            .map(|i| cu[1..].iter().filter(|&&e| e as usize <= i).count() as i32)
            .collect();
        DocIds {
            q: ids.clone(),
            k: ids,
        }
    });
    MaskExpr::parse(&expr)?.bind(
        MaskShape {
            batch: b,
            sq: t,
            sk: t,
        },
        docs,
    )
}

fn window_params() -> AttnParams {
    AttnParams {
        scale: None,
        softcap: None,
        isa: None,
        skip_below: None,
    }
}

fn check_window_dtypes(op: &'static str, inp: &LinearInputs) -> Result<()> {
    for (name, x) in [("k", &inp.k), ("v", &inp.v)] {
        if x.dtype() != inp.q.dtype() {
            return Err(Error::DType {
                op,
                tensor: name.into(),
                got: x.dtype().to_string(),
                expected: format!(
                    "{} (the dtype of q: the window part of `based` is softmax attention)",
                    inp.q.dtype()
                ),
            });
        }
    }
    Ok(())
}

/// Linear attention forward for `spec` (see the module header).
pub fn linear_attention(
    inp: &LinearInputs,
    spec: &LinearSpec,
    backend: Backend,
) -> Result<LinearOutput> {
    const OP: &str = "linear_attention";
    let p = prepare(OP, inp, spec)?;
    let core = p.core(inp, spec)?;
    let d = core.validate(OP)?;
    let r = core_forward(&core, spec, backend)?;
    let [b, t, h, _] = inp.q.shape;
    let mut out = match spec.norm {
        Normalization::None => r.out,
        Normalization::Denominator => feature::normalize(&r.out, p.vd),
        Normalization::Rms => feature::rms(&r.out, p.vd),
    };
    if let Some(w) = spec.window {
        check_window_dtypes(OP, inp)?;
        let mask = window_mask(w, inp)?;
        let wo = crate::attention::forward(
            &inp.q,
            &inp.k,
            &inp.v,
            &window_params(),
            MaskSpec::Expr(&mask),
        )?;
        for (o, x) in out.iter_mut().zip(wo.out.data.to_f32_vec()) {
            *o += x;
        }
    }
    Ok(LinearOutput {
        out: Tensor::new(Buffer::F32(out), vec![b, t, h, p.vd])?,
        final_state: r.state,
        state_shape: [d.seqs, d.h, d.k, d.v],
    })
}

/// Linear attention backward: `dout [B, T, H, V]` (f32) and optionally the final state's gradient
/// (shaped like the state). Recomputes the forward it needs.
pub fn linear_attention_backward(
    inp: &LinearInputs,
    spec: &LinearSpec,
    dout: &[f32],
    d_final_state: Option<&[f32]>,
    backend: Backend,
) -> Result<LinearGrads> {
    const OP: &str = "linear_attention_backward";
    let p = prepare(OP, inp, spec)?;
    let core = p.core(inp, spec)?;
    core.validate(OP)?;
    let [b, t, h, dq_dim] = inp.q.shape;
    let [_, _, hk, _] = inp.k.shape;
    if dout.len() != b * t * h * p.vd {
        return Err(Error::Shape {
            op: OP,
            tensor: "dout".into(),
            got: vec![dout.len()],
            expected: format!("[{b}, {t}, {h}, {}] = {} elements", p.vd, b * t * h * p.vd),
        });
    }
    // Gradient reaching the core's output.
    let dcore = match spec.norm {
        Normalization::None => dout.to_vec(),
        Normalization::Denominator => {
            let r = core_forward(&core, spec, backend)?;
            feature::normalize_backward(&r.out, p.vd, dout)
        }
        Normalization::Rms => {
            let r = core_forward(&core, spec, backend)?;
            feature::rms_backward(&r.out, p.vd, dout)
        }
    };
    let g = core_backward(&core, spec, &dcore, d_final_state, backend)?;
    let hh = hedgehog(OP, inp, spec)?;
    let mut d_hh = hh.map(|w| vec![0.0f32; w.w.len()]);
    let (mut dq, mut dk) = if p.fq.is_some() {
        (
            feature::backward(
                spec.feature,
                &inp.q,
                hh.as_ref(),
                p.group,
                &g.dq,
                d_hh.as_deref_mut(),
            )?,
            feature::backward(
                spec.feature,
                &inp.k,
                hh.as_ref(),
                1,
                &g.dk,
                d_hh.as_deref_mut(),
            )?,
        )
    } else {
        (g.dq, g.dk)
    };
    let mut dv = match &p.vx {
        None => g.dv,
        Some(_) => {
            g.dv.chunks_exact(p.vd + 1)
                .flat_map(|r| r[..p.vd].iter().copied())
                .collect()
        }
    };
    if let Some(w) = spec.window {
        check_window_dtypes(OP, inp)?;
        let mask = window_mask(w, inp)?;
        let params = window_params();
        let wo = crate::attention::forward(&inp.q, &inp.k, &inp.v, &params, MaskSpec::Expr(&mask))?;
        let dt = Buffer::from_f32(inp.q.dtype(), dout);
        let dview = TensorView::contiguous(dt.as_slice(), [b, t, h, p.vd])?;
        let wg = crate::backward(
            &inp.q,
            &inp.k,
            &inp.v,
            &wo.out.view("out")?,
            &wo.lse,
            &dview,
            &params,
            MaskSpec::Expr(&mask),
            &crate::BackwardParams::default(),
        )?;
        for (x, y) in [(&mut dq, &wg.dq), (&mut dk, &wg.dk), (&mut dv, &wg.dv)] {
            for (a, b) in x.iter_mut().zip(y.data.to_f32_vec()) {
                *a += b;
            }
        }
    }
    Ok(LinearGrads {
        dq: Tensor::new(Buffer::F32(dq), vec![b, t, h, dq_dim])?,
        dk: Tensor::new(Buffer::F32(dk), vec![b, t, hk, dq_dim])?,
        dv: Tensor::new(Buffer::F32(dv), vec![b, t, hk, p.vd])?,
        dg: g.dg,
        d_initial_state: g.d_initial_state,
        d_hedgehog: d_hh,
    })
}

/// One decode step of `spec`: `q [B, 1, H, D]`, `k [B, 1, Hk, D]`, `v [B, 1, Hk, V]`, `g` for this
/// token (`[B, 1, H]` / `[B, 1, H, F]`), against `state [B, H, F, V']` updated in place; returns
/// `out [B, 1, H, V]` (f32). `based` is refused (its window part needs the past keys: run the
/// softmax decode over a KV cache beside this).
pub fn linear_step(
    inp: &LinearInputs,
    spec: &LinearSpec,
    state: &mut [f32],
    backend: Backend,
) -> Result<Tensor> {
    const OP: &str = "linear_step";
    if spec.window.is_some() {
        return Err(Error::Param {
            op: OP,
            msg: "`based` has a softmax window over past keys, which a state step cannot hold; step the linear part (`taylor+normalized`) and run the window over a KV cache".into(),
        });
    }
    if inp.initial_state.is_some() || inp.cu_seqlens.is_some() {
        return Err(Error::Param {
            op: OP,
            msg:
                "the step takes its state as an argument: pass neither initial_state nor cu_seqlens"
                    .into(),
        });
    }
    let p = prepare(OP, inp, spec)?;
    let core = p.core(inp, spec)?;
    let d = core.validate(OP)?;
    if state.len() != d.state_len() {
        return Err(Error::Shape {
            op: OP,
            tensor: "state".into(),
            got: vec![state.len()],
            expected: format!(
                "[{}, {}, {}, {}] = {} elements",
                d.seqs,
                d.h,
                d.k,
                d.v,
                d.state_len()
            ),
        });
    }
    let o = match backend {
        Backend::Cpu => cpu::step(&core, state)?,
        Backend::Cuda(ord) => {
            let dev = CudaDevice::open(ord)?;
            cuda::step_host(
                &dev, &core.q, &core.k, &core.v, core.decay, core.scale, state,
            )?
            .data
            .to_f32_vec()
        }
    };
    let out = match spec.norm {
        Normalization::None => o,
        Normalization::Denominator => feature::normalize(&o, p.vd),
        Normalization::Rms => feature::rms(&o, p.vd),
    };
    let [b, t, h, _] = inp.q.shape;
    Tensor::new(Buffer::F32(out), vec![b, t, h, p.vd])
}
