//! Host side of the CUDA backward (`kernels/attn_bwd.cu`): [`backward`] mirrors
//! [`crate::backward`] (same inputs, same checks, gradients in the input dtype).
//!
//! Three launches on the device's stream: `la_bwd_prep` (Delta = rowsum(dO * O), LSE in log2
//! units), `la_bwd_dq` (one block per 64 query rows, walking the schedule's rows) and
//! `la_bwd_dkdv` (one block per 64 keys and KV head, walking the schedule's columns for every
//! query head of the group). No atomics: every gradient element is summed in a fixed order by one
//! thread, so both [`BackwardParams`] modes give bit-identical results on the GPU (the
//! deterministic scheme is also the fast one here; see docs/PERF.md).
use std::sync::Arc;

use cudarc::driver::{CudaFunction, CudaSlice, DevicePtr, LaunchConfig, PushKernelArg};

use super::forward::{check_launch, unsupported, DevMask, DevTensor, COMMON, MMA_TILE};
use super::{drv, CudaDevice};
use crate::attention::{AttnParams, Dims, MaskSpec};
use crate::backward::{BackwardParams, Grads};
use crate::error::{Error, Result};
use crate::tensor::{DType, TensorView};

const PARAMS_BWD: &str = include_str!("kernels/attn_bwd.cu");
/// Query rows and keys per tile of both backward kernels.
const T: usize = 64;

/// Kernel parameters; field for field `LaBwdParams` in `kernels/attn_bwd.cu`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct LaBwdParams {
    q: u64,
    k: u64,
    v: u64,
    o: u64,
    dout: u64,
    lse: u64,
    lse2: u64,
    delta: u64,
    dq: u64,
    dk: u64,
    dv: u64,
    q_s: [i64; 3],
    k_s: [i64; 3],
    b: i32,
    sq: i32,
    sk: i32,
    hq: i32,
    hk: i32,
    scale_log2: f32,
    cap_pre: f32,
    cap_post: f32,
    scale: f32,
    row_off: u64,
    row_ent: u64,
    col_off: u64,
    col_ent: u64,
    sched_batch: i32,
    sched_heads: i32,
    q_tiles: i32,
    k_tiles: i32,
    qdoc: u64,
    kdoc: u64,
    blk: u64,
    blk_dims: [i32; 6],
}

// SAFETY: plain-old-data with the C layout of the kernel's parameter struct.
unsafe impl cudarc::driver::DeviceRepr for LaBwdParams {}

/// Everything of one backward problem that does not depend on the data: kernel variants, the
/// schedule (rows and columns) and mask buffers, the LSE/Delta work buffers.
pub struct BwdPlan {
    dev: Arc<CudaDevice>,
    dims: Dims,
    dtype: DType,
    f_prep: CudaFunction,
    f_dq: CudaFunction,
    f_dkdv: CudaFunction,
    base: LaBwdParams,
    smem: usize,
    _mask: DevMask,
    _cols: (CudaSlice<u32>, CudaSlice<u32>),
    /// Work buffers the kernel parameters point into (LSE in log2 units, Delta per row).
    _lse2: CudaSlice<f32>,
    _delta: CudaSlice<f32>,
}

impl BwdPlan {
    /// Both [`BackwardParams`] modes run the same atomic-free kernels on the GPU (deterministic;
    /// a one-pass variant with f32 atomics for dQ is not in yet), so `_bwd` selects nothing.
    pub fn new(
        dev: &Arc<CudaDevice>,
        dims: Dims,
        dtype: DType,
        params: &AttnParams,
        mask: MaskSpec,
        _bwd: &BackwardParams,
    ) -> Result<BwdPlan> {
        let d = dims.d;
        if !matches!(dtype, DType::BF16 | DType::F16) {
            return Err(unsupported(format!(
                "dtype {dtype}: the CUDA backward takes bf16 or f16"
            )));
        }
        if d == 0 || !d.is_multiple_of(16) || d > 128 || dims.dv != d {
            return Err(unsupported(format!(
                "head dims D {d} / Dv {}: the CUDA backward needs D = Dv, a multiple of 16, at most 128",
                dims.dv
            )));
        }
        let (q_tiles, k_tiles) = (dims.sq.div_ceil(T), dims.sk.div_ceil(T));
        if q_tiles > 65535 || k_tiles > 65535 || dims.batch > 65535 {
            return Err(unsupported(
                "grid: more than 65535 tiles or batch rows".into(),
            ));
        }
        params.check()?;
        let dm = DevMask::new(dev, mask, T, T, dims)?;
        let cols = dm.columns(dev)?;
        // The mask program is a template on the parameter struct, instantiated in the kernels.
        let src = format!("{COMMON}\n{MMA_TILE}\n{}\n{PARAMS_BWD}", dm.program);
        let defines = vec![
            ("LA_F16".into(), ((dtype == DType::F16) as u8).to_string()),
            ("LA_D".into(), d.to_string()),
            (
                "LA_SOFTCAP".into(),
                (params.softcap.is_some() as u8).to_string(),
            ),
        ];
        let variant = format!("attn_bwd_{}_d{d}", dtype.name());
        let smem = 6 * T * d * 2;
        let f_prep = dev.function(&variant, "la_bwd_prep", &src, &defines, 0)?;
        let f_dq = dev.function(&variant, "la_bwd_dq", &src, &defines, smem)?;
        let f_dkdv = dev.function(&variant, "la_bwd_dkdv", &src, &defines, smem)?;
        let n_lse = dims.batch * dims.hq * dims.sq;
        let lse2 = dev.alloc_f32(n_lse)?;
        let delta = dev.alloc_f32(n_lse)?;
        let s = dev.stream();
        let scale = params.scale_for(d);
        let (scale_log2, cap_pre, cap_post) = super::forward::logit_consts(params, d);
        let base = LaBwdParams {
            lse2: lse2.device_ptr(s).0,
            delta: delta.device_ptr(s).0,
            b: dims.batch as i32,
            sq: dims.sq as i32,
            sk: dims.sk as i32,
            hq: dims.hq as i32,
            hk: dims.hk as i32,
            scale_log2,
            cap_pre,
            cap_post,
            scale,
            row_off: dm.row_off.device_ptr(s).0,
            row_ent: dm.row_ent.device_ptr(s).0,
            col_off: cols.0.device_ptr(s).0,
            col_ent: cols.1.device_ptr(s).0,
            sched_batch: dm.sched.batch as i32,
            sched_heads: dm.sched.heads as i32,
            q_tiles: q_tiles as i32,
            k_tiles: k_tiles as i32,
            qdoc: dm.qdoc.device_ptr(s).0,
            kdoc: dm.kdoc.device_ptr(s).0,
            blk: dm.blk.device_ptr(s).0,
            blk_dims: dm.blk_dims,
            ..Default::default()
        };
        Ok(BwdPlan {
            dev: dev.clone(),
            dims,
            dtype,
            f_prep,
            f_dq,
            f_dkdv,
            base,
            smem,
            _mask: dm,
            _cols: cols,
            _lse2: lse2,
            _delta: delta,
        })
    }

    /// Enqueues the three kernels: dq, dk, dv (input dtype) from q, k, v, the forward's out and
    /// LSE, and dO (all on the device, contiguous).
    #[allow(clippy::too_many_arguments)]
    pub fn launch(
        &self,
        q: &DevTensor,
        k: &DevTensor,
        v: &DevTensor,
        out: &DevTensor,
        lse: &CudaSlice<f32>,
        dout: &DevTensor,
        dq: &mut DevTensor,
        dk: &mut DevTensor,
        dv: &mut DevTensor,
    ) -> Result<()> {
        let Dims {
            batch,
            sq,
            sk,
            hq,
            hk,
            d,
            ..
        } = self.dims;
        let qs = [batch, sq, hq, d];
        let ks = [batch, sk, hk, d];
        check_launch(
            "cuda attention backward",
            self.dtype,
            &[
                ("q", q, qs),
                ("k", k, ks),
                ("v", v, ks),
                ("out", out, qs),
                ("do", dout, qs),
                ("dq", &*dq, qs),
                ("dk", &*dk, ks),
                ("dv", &*dv, ks),
            ],
            lse.len(),
            [batch, hq, sq],
        )?;
        let s = self.dev.stream();
        let mut p = self.base;
        p.q = q.data.device_ptr(s).0;
        p.k = k.data.device_ptr(s).0;
        p.v = v.data.device_ptr(s).0;
        p.o = out.data.device_ptr(s).0;
        p.dout = dout.data.device_ptr(s).0;
        p.lse = lse.device_ptr(s).0;
        p.dq = dq.data.device_ptr(s).0;
        p.dk = dk.data.device_ptr(s).0;
        p.dv = dv.data.device_ptr(s).0;
        p.q_s = q.strides();
        p.k_s = k.strides();
        let launch = |f: &CudaFunction, cfg: LaunchConfig| -> Result<()> {
            let mut b = s.launch_builder(f);
            b.arg(&p);
            // SAFETY: the parameter struct matches the kernels'; every pointer is a live
            // allocation of the size the kernels index (shapes checked above; plan buffers owned
            // by self).
            unsafe { b.launch(cfg) }.map_err(drv("launch backward"))?;
            Ok(())
        };
        let rows = batch * sq * hq;
        launch(
            &self.f_prep,
            LaunchConfig {
                grid_dim: (rows.div_ceil(8) as u32, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            },
        )?;
        launch(
            &self.f_dq,
            LaunchConfig {
                grid_dim: (hq as u32, batch as u32, sq.div_ceil(T) as u32),
                block_dim: (128, 1, 1),
                shared_mem_bytes: self.smem as u32,
            },
        )?;
        launch(
            &self.f_dkdv,
            LaunchConfig {
                grid_dim: (hk as u32, batch as u32, sk.div_ceil(T) as u32),
                block_dim: (128, 1, 1),
                shared_mem_bytes: self.smem as u32,
            },
        )?;
        Ok(())
    }
}

/// dQ, dK, dV of `sum(out * dout)` on the GPU; `out` and `lse` are the forward's results for
/// the same inputs and mask. bf16/f16, head dims that are multiples of 16 up to 128, D = Dv.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    dev: &Arc<CudaDevice>,
    q: &TensorView,
    k: &TensorView,
    v: &TensorView,
    out: &TensorView,
    lse: &[f32],
    dout: &TensorView,
    params: &AttnParams,
    mask: MaskSpec,
    _bwd: &BackwardParams,
) -> Result<Grads> {
    let dims =
        crate::backward::validate_inputs("cuda attention backward", q, k, v, out, lse, dout)?;
    if let Some(i) = lse.iter().position(|x| x.is_nan() || *x == f32::INFINITY) {
        return Err(Error::NonFinite {
            tensor: "lse".into(),
            index: i,
            value: lse[i],
        });
    }
    let plan = BwdPlan::new(dev, dims, q.dtype(), params, mask, _bwd)?;
    let up = |name: &str, t: &TensorView| DevTensor::upload(dev, name, t);
    let (qd, kd, vd, od, dod) = (
        up("q", q)?,
        up("k", k)?,
        up("v", v)?,
        up("out", out)?,
        up("do", dout)?,
    );
    let lse_d = dev.upload(lse)?;
    let mut dq = DevTensor::alloc(dev, q.shape, q.dtype())?;
    let mut dk = DevTensor::alloc(dev, k.shape, q.dtype())?;
    let mut dv = DevTensor::alloc(dev, v.shape, q.dtype())?;
    plan.launch(&qd, &kd, &vd, &od, &lse_d, &dod, &mut dq, &mut dk, &mut dv)?;
    dev.synchronize()?;
    Ok(Grads {
        dq: dq.download(dev)?,
        dk: dk.download(dev)?,
        dv: dv.download(dev)?,
    })
}
