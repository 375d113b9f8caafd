//! Linear attention through the one entry point: the core recurrence of [`crate::linear`] over
//! caller tensors in CPU or CUDA memory (what the Python package's `chunk_simple_gla`,
//! `chunk_gla`, `chunk_linear_attn` and `fused_recurrent_simple_gla` call).
//!
//! `S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t`, `o_t = scale * q_t S_t` per sequence and head
//! (kv head `h / (H / Hk)`); `g` picks the decay by its rank: none, `[H]` (a constant per head),
//! `[B, T, H]` (per token), `[B, T, H, K]` (per key dimension). Feature maps and normalisations
//! are the caller's here (the Rust-level `linear::linear_attention` has them).
//!
//! Outputs are the caller's buffers, written in place; CUDA work goes on the caller's stream.
use super::{
    check_out, common_device, write_f32, write_host, Device, RawDType, RawTensor, StreamHandle,
};
use crate::error::{Error, Result};
use crate::linear::{cpu, Core, Decay};
use crate::tensor::{Buffer, DType};

/// Chunk length of the CPU path (the CUDA kernels' chunk is fixed at 64 too).
const CPU_CHUNK: usize = 64;

/// The inputs of one linear-attention call: `q [B, T, H, K]`, `k [B, T, Hk, K]`,
/// `v [B, T, Hk, V]` (one float dtype, any strides; the CUDA kernels need a contiguous head dim),
/// the log decay `g` (f32, contiguous, see the module header), `initial_state [N, H, K, V]` f32,
/// `cu_seqlens [N + 1]` int32 (batch 1; N = B without it).
#[derive(Clone, Copy, Debug)]
pub struct LinearArgs {
    pub q: RawTensor,
    pub k: RawTensor,
    pub v: RawTensor,
    pub g: Option<RawTensor>,
    pub initial_state: Option<RawTensor>,
    pub cu_seqlens: Option<RawTensor>,
    pub scale: f32,
    pub stream: StreamHandle,
}

/// Which decay `g` holds, from its rank.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    None,
    PerHead,
    Token,
    Gate,
}

/// Sizes of a checked call: B, T, H, K, V and the number of sequences.
#[derive(Clone, Copy, Debug)]
struct Sizes {
    b: usize,
    t: usize,
    h: usize,
    k: usize,
    v: usize,
    seqs: usize,
}

fn f32_contig(op: &'static str, name: &str, t: &RawTensor, dev: Device) -> Result<()> {
    t.expect_dtype(op, name, RawDType::Float(DType::F32))?;
    if !t.is_contiguous() {
        return Err(t.shape_err(op, name, "a contiguous float32 tensor".into()));
    }
    if t.device != dev {
        return Err(Error::Param {
            op,
            msg: format!("tensor `{name}` is on {}, `q` on {dev}", t.device),
        });
    }
    Ok(())
}

/// Shapes, dtypes and devices of every input (no memory is read).
fn check(op: &'static str, a: &LinearArgs) -> Result<(Sizes, Kind, DType, Device)> {
    for (name, t) in [("q", &a.q), ("k", &a.k), ("v", &a.v)] {
        t.expect_rank(op, name, 4, "[B, T, heads, dim]")?;
    }
    let dt = a.q.float(op, "q")?;
    for (name, t) in [("k", &a.k), ("v", &a.v)] {
        if t.float(op, name)? != dt {
            return Err(Error::DType {
                op,
                tensor: name.into(),
                got: t.dtype.to_string(),
                expected: format!("{dt} (the dtype of q)"),
            });
        }
    }
    let dev = common_device(op, &[("q", &a.q), ("k", &a.k), ("v", &a.v)])?;
    let [b, t, h, kd] = a.q.shape;
    let [_, _, hk, _] = a.k.shape;
    if a.k.shape[..2] != [b, t] || a.k.shape[3] != kd || hk == 0 || h % hk != 0 {
        return Err(a.k.shape_err(
            op,
            "k",
            format!("[{b}, {t}, Hk, {kd}] with Hk dividing H = {h}"),
        ));
    }
    if a.v.shape[..3] != [b, t, hk] {
        return Err(a.v.shape_err(op, "v", format!("[{b}, {t}, {hk}, V]")));
    }
    let kind = match &a.g {
        None => Kind::None,
        Some(g) => {
            f32_contig(op, "g", g, dev)?;
            match g.rank {
                1 if g.dims() == [h] => Kind::PerHead,
                3 if g.dims() == [b, t, h] => Kind::Token,
                4 if g.dims() == [b, t, h, kd] => Kind::Gate,
                _ => {
                    return Err(g.shape_err(
                        op,
                        "g",
                        format!("[{h}] (per head), [{b}, {t}, {h}] (per token) or [{b}, {t}, {h}, {kd}] (per key dim)"),
                    ))
                }
            }
        }
    };
    let seqs = match &a.cu_seqlens {
        None => b,
        Some(cu) => {
            cu.expect_dtype(op, "cu_seqlens", RawDType::I32)?;
            if cu.rank != 1 || cu.shape[0] < 2 || b != 1 {
                return Err(cu.shape_err(
                    op,
                    "cu_seqlens",
                    format!(
                        "[N + 1] with N >= 1, and q of batch 1 (q is {:?})",
                        a.q.dims()
                    ),
                ));
            }
            if cu.device != dev {
                return Err(Error::Param {
                    op,
                    msg: format!("tensor `cu_seqlens` is on {}, `q` on {dev}", cu.device),
                });
            }
            cu.shape[0] - 1
        }
    };
    let s = Sizes {
        b,
        t,
        h,
        k: kd,
        v: a.v.shape[3],
        seqs,
    };
    if let Some(s0) = &a.initial_state {
        f32_contig(op, "initial_state", s0, dev)?;
        if s0.dims() != [seqs, h, kd, s.v] {
            return Err(s0.shape_err(op, "initial_state", format!("[{seqs}, {h}, {kd}, {}]", s.v)));
        }
    }
    if !a.scale.is_finite() {
        return Err(Error::Param {
            op,
            msg: format!("scale must be finite, got {}", a.scale),
        });
    }
    Ok((s, kind, dt, dev))
}

/// The host core of a CPU call.
///
/// # Safety
/// The tensors of `a` address CPU memory of their shapes and strides for `'a`.
unsafe fn host_core<'a>(op: &'static str, a: &LinearArgs, kind: Kind) -> Result<Core<'a>> {
    let f32s = |t: &RawTensor| -> &'a [f32] {
        // SAFETY: checked contiguous f32 CPU tensors; the caller's contract.
        unsafe { std::slice::from_raw_parts(t.ptr as *const f32, t.numel()) }
    };
    let g = a.g.as_ref().map(f32s);
    let decay = match (kind, g) {
        (Kind::PerHead, Some(g)) => Decay::PerHead(g),
        (Kind::Token, Some(g)) => Decay::Token(g),
        (Kind::Gate, Some(g)) => Decay::Gate(g),
        _ => Decay::None,
    };
    Ok(Core {
        // SAFETY: forwarded.
        q: unsafe { a.q.view(op, "q")? },
        k: unsafe { a.k.view(op, "k")? },
        v: unsafe { a.v.view(op, "v")? },
        decay,
        scale: a.scale,
        initial_state: a.initial_state.as_ref().map(f32s),
        // SAFETY: forwarded.
        cu_seqlens: match &a.cu_seqlens {
            Some(cu) => Some(unsafe { cu.host_i32(op, "cu_seqlens")? }),
            None => None,
        },
    })
}

/// Linear attention forward: writes `out [B, T, H, V]` (q's dtype) and `final_state
/// [N, H, K, V]` (f32, contiguous).
///
/// # Safety
/// Every tensor's pointer must address the elements its shape and strides describe, on its
/// device, for the duration of the call (CPU) or until the queued kernels finish (CUDA); the
/// outputs must not overlap the inputs.
pub unsafe fn linear_forward(
    a: &LinearArgs,
    out: &RawTensor,
    final_state: &RawTensor,
) -> Result<()> {
    const OP: &str = "linear attention";
    let (s, kind, dt, dev) = check(OP, a)?;
    check_out(
        OP,
        "out",
        out,
        &[s.b, s.t, s.h, s.v],
        RawDType::Float(dt),
        dev,
    )?;
    check_out(
        OP,
        "final_state",
        final_state,
        &[s.seqs, s.h, s.k, s.v],
        RawDType::Float(DType::F32),
        dev,
    )?;
    match dev {
        Device::Cpu => {
            // SAFETY: the caller's contract.
            let core = unsafe { host_core(OP, a, kind)? };
            let r = cpu::forward_chunked(&core, CPU_CHUNK)?;
            // SAFETY: checked shapes; the caller's contract.
            unsafe {
                write_host(out, &Buffer::from_f32(dt, &r.out));
                write_f32(final_state, &r.state);
            }
            Ok(())
        }
        // SAFETY: forwarded.
        Device::Cuda(ord) => unsafe { cuda::forward(ord, a, kind, out, final_state) },
    }
}

/// Gradient outputs of [`linear_backward`]: `dq`, `dk`, `dv` like q, k, v; `dg` like `g` (per
/// token or per key dim; `None` for no decay or a per-head constant); `d_initial_state
/// [N, H, K, V]` f32.
#[derive(Clone, Copy, Debug)]
pub struct LinearGradsOut {
    pub dq: RawTensor,
    pub dk: RawTensor,
    pub dv: RawTensor,
    pub dg: Option<RawTensor>,
    pub d_initial_state: RawTensor,
}

/// Linear attention backward of `loss(out, final_state)` given `dout [B, T, H, V]` (q's dtype)
/// and optionally `d_final_state [N, H, K, V]` f32.
///
/// # Safety
/// As for [`linear_forward`].
pub unsafe fn linear_backward(
    a: &LinearArgs,
    dout: &RawTensor,
    d_final_state: Option<&RawTensor>,
    g: &LinearGradsOut,
) -> Result<()> {
    const OP: &str = "linear attention backward";
    let (s, kind, dt, dev) = check(OP, a)?;
    let fl = RawDType::Float(dt);
    check_out(OP, "dout", dout, &[s.b, s.t, s.h, s.v], fl, dev)?;
    check_out(OP, "dq", &g.dq, a.q.dims(), fl, dev)?;
    check_out(OP, "dk", &g.dk, a.k.dims(), fl, dev)?;
    check_out(OP, "dv", &g.dv, a.v.dims(), fl, dev)?;
    let state = [s.seqs, s.h, s.k, s.v];
    let f32t = RawDType::Float(DType::F32);
    check_out(OP, "d_initial_state", &g.d_initial_state, &state, f32t, dev)?;
    f32_contig(OP, "d_initial_state", &g.d_initial_state, dev)?;
    if let Some(d) = d_final_state {
        f32_contig(OP, "d_final_state", d, dev)?;
        check_out(OP, "d_final_state", d, &state, f32t, dev)?;
    }
    match (kind, &g.dg, &a.g) {
        (Kind::Token | Kind::Gate, Some(dg), Some(gin)) => {
            f32_contig(OP, "dg", dg, dev)?;
            check_out(OP, "dg", dg, gin.dims(), f32t, dev)?;
        }
        (Kind::Token | Kind::Gate, None, _) => {
            return Err(Error::Param {
                op: OP,
                msg: "a per-token or per-key-dim decay `g` needs its gradient buffer `dg`".into(),
            })
        }
        (Kind::None | Kind::PerHead, Some(_), _) => {
            return Err(Error::Param {
                op: OP,
                msg: "`dg` was given but `g` has no gradient (no decay, or a per-head constant)"
                    .into(),
            })
        }
        _ => {}
    }
    match dev {
        Device::Cpu => {
            // SAFETY: the caller's contract.
            let core = unsafe { host_core(OP, a, kind)? };
            // SAFETY: as above.
            let dview = unsafe { dout.view(OP, "dout")? };
            let mut dvec = Vec::with_capacity(dout.numel());
            for b in 0..s.b {
                for t in 0..s.t {
                    for h in 0..s.h {
                        for j in 0..s.v {
                            dvec.push(dview.get(b, t, h, j));
                        }
                    }
                }
            }
            let dfin = d_final_state.map(|d| {
                // SAFETY: checked contiguous f32 CPU tensor.
                unsafe { std::slice::from_raw_parts(d.ptr as *const f32, d.numel()) }
            });
            let r = cpu::backward_chunked(&core, &dvec, dfin, CPU_CHUNK)?;
            // SAFETY: checked shapes; the caller's contract.
            unsafe {
                write_host(&g.dq, &Buffer::from_f32(dt, &r.dq));
                write_host(&g.dk, &Buffer::from_f32(dt, &r.dk));
                write_host(&g.dv, &Buffer::from_f32(dt, &r.dv));
                write_f32(&g.d_initial_state, &r.d_initial_state);
                if let (Some(dg), Some(x)) = (&g.dg, &r.dg) {
                    write_f32(dg, x);
                }
            }
            Ok(())
        }
        // SAFETY: forwarded.
        Device::Cuda(ord) => unsafe { cuda::backward(ord, a, kind, dout, d_final_state, g) },
    }
}

/// One decode step: `q [B, 1, H, K]`, `k [B, 1, Hk, K]`, `v [B, 1, Hk, V]`, `g` (`[H]`,
/// `[B, 1, H]` or `[B, 1, H, K]`), `state [B, H, K, V]` f32 (read and updated in place); writes
/// `out [B, 1, H, V]`.
///
/// # Safety
/// As for [`linear_forward`]; `state` is read and written.
pub unsafe fn linear_step(a: &LinearArgs, state: &RawTensor, out: &RawTensor) -> Result<()> {
    const OP: &str = "linear attention step";
    if a.initial_state.is_some() || a.cu_seqlens.is_some() {
        return Err(Error::Param {
            op: OP,
            msg: "the decode step takes its state as `state` (no initial_state / cu_seqlens)"
                .into(),
        });
    }
    let (s, kind, dt, dev) = check(OP, a)?;
    if s.t != 1 {
        return Err(a
            .q
            .shape_err(OP, "q", "one token per sequence: [B, 1, H, K]".into()));
    }
    check_out(
        OP,
        "out",
        out,
        &[s.b, 1, s.h, s.v],
        RawDType::Float(dt),
        dev,
    )?;
    f32_contig(OP, "state", state, dev)?;
    check_out(
        OP,
        "state",
        state,
        &[s.b, s.h, s.k, s.v],
        RawDType::Float(DType::F32),
        dev,
    )?;
    match dev {
        Device::Cpu => {
            // SAFETY: the caller's contract.
            let core = unsafe { host_core(OP, a, kind)? };
            // SAFETY: a contiguous f32 CPU tensor the caller lets us write.
            let st =
                unsafe { std::slice::from_raw_parts_mut(state.ptr as *mut f32, state.numel()) };
            let o = cpu::step(&core, st)?;
            // SAFETY: checked shape.
            unsafe { write_host(out, &Buffer::from_f32(dt, &o)) };
            Ok(())
        }
        // SAFETY: forwarded.
        Device::Cuda(ord) => unsafe { cuda::step(ord, a, kind, state, out) },
    }
}

/// The CUDA arm: caller memory borrowed (never freed here), work on the caller's stream.
mod cuda {
    use super::super::cuda_route::{dev_tensor, device, read, stream_of};
    use super::*;
    use crate::cuda::{Borrowed, DevTensor};
    use crate::linear::cuda::{self as lc, DevCore, DevDecay, GradsOut};

    /// A caller's contiguous device tensor as a `CudaSlice<T>` for the call.
    ///
    /// # Safety
    /// `t` addresses `numel` elements of `T` on the stream's device.
    unsafe fn borrow<T>(
        s: &std::sync::Arc<cudarc::driver::CudaStream>,
        t: &RawTensor,
    ) -> Borrowed<T> {
        // SAFETY: forwarded.
        unsafe { Borrowed::new(s, t.ptr, t.numel()) }
    }

    /// The borrowed device inputs of one call.
    struct Inputs {
        q: DevTensor,
        k: DevTensor,
        v: DevTensor,
        g: Option<Borrowed<f32>>,
        s0: Option<Borrowed<f32>>,
        cu: Option<Borrowed<i32>>,
    }

    impl Inputs {
        fn core(&self, a: &LinearArgs, kind: Kind) -> DevCore<'_> {
            let decay = match (kind, self.g.as_deref()) {
                (Kind::PerHead, Some(g)) => DevDecay::PerHead(g),
                (Kind::Token, Some(g)) => DevDecay::Token(g),
                (Kind::Gate, Some(g)) => DevDecay::Gate(g),
                _ => DevDecay::None,
            };
            DevCore {
                q: &self.q,
                k: &self.k,
                v: &self.v,
                decay,
                scale: a.scale,
                initial_state: self.s0.as_deref(),
                cu_seqlens: self.cu.as_deref(),
            }
        }
    }

    /// # Safety
    /// The entry point's contract.
    unsafe fn inputs(
        op: &'static str,
        ord: usize,
        a: &LinearArgs,
        s: &std::sync::Arc<cudarc::driver::CudaStream>,
    ) -> Result<Inputs> {
        if let Some(cu) = &a.cu_seqlens {
            // The kernels trust the boundaries: check them on the host (one synchronisation of
            // the caller's stream per varlen call, as flash-linear-attention's own varlen
            // preparation does).
            let v = read::<i32>(ord, cu, a.stream)?;
            let t = a.q.shape[1];
            if v[0] != 0 || *v.last().unwrap() as usize != t || v.windows(2).any(|w| w[1] < w[0]) {
                return Err(Error::Param {
                    op,
                    msg: format!(
                        "cu_seqlens must start at 0, never decrease and end at T = {t}; got {v:?}"
                    ),
                });
            }
        }
        // SAFETY: the caller's contract: each tensor addresses its elements on this device.
        unsafe {
            Ok(Inputs {
                q: dev_tensor(s, "q", &a.q)?,
                k: dev_tensor(s, "k", &a.k)?,
                v: dev_tensor(s, "v", &a.v)?,
                g: a.g.map(|t| borrow(s, &t)),
                s0: a.initial_state.map(|t| borrow(s, &t)),
                cu: a.cu_seqlens.map(|t| borrow(s, &t)),
            })
        }
    }

    /// The log decays are taken as given here (checking `g <= 0` would copy `g` to the host on
    /// every call): the Python layer checks them outside graph capture, `Core::validate` on the
    /// CPU. A positive log decay makes the state grow; it never faults.
    pub(super) unsafe fn forward(
        ord: usize,
        a: &LinearArgs,
        kind: Kind,
        out: &RawTensor,
        fin: &RawTensor,
    ) -> Result<()> {
        const OP: &str = "linear attention";
        let dev = device(ord)?;
        let s = stream_of(&dev, a.stream);
        // SAFETY: the entry point's contract.
        unsafe {
            let x = inputs(OP, ord, a, &s)?;
            let o = dev_tensor(&s, "out", out)?;
            let f = borrow::<f32>(&s, fin);
            lc::forward_on(&dev, &s, &x.core(a, kind), &o, &f)
        }
    }

    pub(super) unsafe fn backward(
        ord: usize,
        a: &LinearArgs,
        kind: Kind,
        dout: &RawTensor,
        dfin: Option<&RawTensor>,
        g: &LinearGradsOut,
    ) -> Result<()> {
        const OP: &str = "linear attention backward";
        let dev = device(ord)?;
        let s = stream_of(&dev, a.stream);
        // SAFETY: the entry point's contract.
        unsafe {
            let x = inputs(OP, ord, a, &s)?;
            let d = dev_tensor(&s, "dout", dout)?;
            let df = dfin.map(|t| borrow::<f32>(&s, t));
            let (dq, dk, dv) = (
                dev_tensor(&s, "dq", &g.dq)?,
                dev_tensor(&s, "dk", &g.dk)?,
                dev_tensor(&s, "dv", &g.dv)?,
            );
            let dg = g.dg.map(|t| borrow::<f32>(&s, &t));
            let ds0 = borrow::<f32>(&s, &g.d_initial_state);
            let out = GradsOut {
                dq: &dq,
                dk: &dk,
                dv: &dv,
                dg: dg.as_deref(),
                d_initial_state: &ds0,
            };
            lc::backward_on(&dev, &s, &x.core(a, kind), &d, df.as_deref(), &out)
        }
    }

    pub(super) unsafe fn step(
        ord: usize,
        a: &LinearArgs,
        kind: Kind,
        state: &RawTensor,
        out: &RawTensor,
    ) -> Result<()> {
        const OP: &str = "linear attention step";
        let dev = device(ord)?;
        let s = stream_of(&dev, a.stream);
        // SAFETY: the entry point's contract.
        unsafe {
            let x = inputs(OP, ord, a, &s)?;
            let o = dev_tensor(&s, "out", out)?;
            let st = borrow::<f32>(&s, state);
            let c = x.core(a, kind);
            lc::step_on(&dev, &s, c.q, c.k, c.v, c.decay, a.scale, &st, &o)
        }
    }
}
