//! The one public entry point over tensors that live anywhere.
//!
//! A [`RawTensor`] describes memory the caller owns — a pointer, a shape, element strides, a
//! dtype and a device (CPU memory or a CUDA device) — so that a PyTorch tensor, a host buffer or
//! a cudarc allocation can be handed over without a copy. [`forward`], [`backward`] and
//! [`decode`] validate every tensor (errors name it and its shape), resolve the mask, and route:
//!
//! - all tensors in CPU memory -> the CPU kernels ([`crate::forward`], [`crate::backward`],
//!   [`crate::kv::decode::decode`]); outputs are written into the caller's buffers;
//! - all tensors on one CUDA device -> the CUDA plans ([`crate::cuda::FwdPlan`],
//!   [`crate::cuda::backward::BwdPlan`], [`crate::cuda::decode::DecodePlan`]), launched on the
//!   caller's stream with no copy of q/k/v, no allocation of outputs and no synchronisation.
//!   Plans are cached per problem (shapes, dtype, mask, constants; the stream too for plans that
//!   own a workspace), so a repeated call does no planning: warm a shape up before capturing it
//!   in a CUDA graph.
//!
//! The CLI (`longattn run`), the model runner and the Python package all call these.
mod linear;
pub use linear::{linear_backward, linear_forward, linear_step, LinearArgs, LinearGradsOut};

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex, OnceLock};

use half::{bf16, f16};

use crate::attention::{validate, AttnParams, Dims, MaskSpec};
use crate::backward::BackwardParams;
use crate::error::{Error, Result};
use crate::kv::decode::{BlockTables, DecodeParams, PagedKv};
use crate::mask::{DocIds, MaskExpr, MaskShape};
use crate::tensor::{DType, Slice, TensorView};

/// Where a tensor's memory lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Device {
    Cpu,
    /// A CUDA device by ordinal (the process's primary context: the one PyTorch uses).
    Cuda(usize),
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

/// Element type of a raw tensor: the float types of the kernels, and int32 for ids, lengths and
/// block tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RawDType {
    Float(DType),
    I32,
    /// One byte per element (uint8 or bool): block-mask tables.
    U8,
}

impl std::fmt::Display for RawDType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RawDType::Float(d) => d.fmt(f),
            RawDType::I32 => f.write_str("int32"),
            RawDType::U8 => f.write_str("uint8"),
        }
    }
}

/// A caller's tensor: `ptr` addresses element 0; `shape[..rank]` and element `strides[..rank]`
/// (non-negative; the unused trailing entries are ignored).
#[derive(Clone, Copy, Debug)]
pub struct RawTensor {
    pub ptr: u64,
    pub dtype: RawDType,
    pub rank: usize,
    pub shape: [usize; 4],
    pub strides: [usize; 4],
    pub device: Device,
}

impl RawTensor {
    /// A contiguous tensor of `shape` (rank = its length, at most 4).
    pub fn contiguous(ptr: u64, dtype: RawDType, shape: &[usize], device: Device) -> RawTensor {
        let mut sh = [1usize; 4];
        let mut st = [0usize; 4];
        let mut acc = 1;
        for a in (0..shape.len()).rev() {
            sh[a] = shape[a];
            st[a] = acc;
            acc *= shape[a];
        }
        RawTensor {
            ptr,
            dtype,
            rank: shape.len(),
            shape: sh,
            strides: st,
            device,
        }
    }

    /// A host view's memory (CPU).
    pub fn from_view(v: &TensorView) -> RawTensor {
        let ptr = match v.data {
            Slice::F32(x) => x.as_ptr() as u64,
            Slice::BF16(x) => x.as_ptr() as u64,
            Slice::F16(x) => x.as_ptr() as u64,
        };
        RawTensor {
            ptr,
            dtype: RawDType::Float(v.dtype()),
            rank: 4,
            shape: v.shape,
            strides: v.strides,
            device: Device::Cpu,
        }
    }

    pub fn dims(&self) -> &[usize] {
        &self.shape[..self.rank]
    }

    pub fn numel(&self) -> usize {
        self.dims().iter().product()
    }

    /// Elements from the first to one past the last addressed one (0 when empty).
    fn span(&self) -> usize {
        if self.numel() == 0 {
            return 0;
        }
        1 + (0..self.rank)
            .map(|a| (self.shape[a] - 1) * self.strides[a])
            .sum::<usize>()
    }

    fn is_contiguous(&self) -> bool {
        let mut acc = 1;
        for a in (0..self.rank).rev() {
            if self.shape[a] != 1 && self.strides[a] != acc {
                return false;
            }
            acc *= self.shape[a];
        }
        true
    }

    fn shape_err(&self, op: &'static str, name: &str, expected: String) -> Error {
        Error::Shape {
            op,
            tensor: name.into(),
            got: self.dims().to_vec(),
            expected,
        }
    }

    fn expect_rank(&self, op: &'static str, name: &str, rank: usize, what: &str) -> Result<()> {
        if self.rank != rank {
            return Err(self.shape_err(op, name, format!("rank {rank} {what}")));
        }
        Ok(())
    }

    fn float(&self, op: &'static str, name: &str) -> Result<DType> {
        match self.dtype {
            RawDType::Float(d) => Ok(d),
            other => Err(Error::DType {
                op,
                tensor: name.into(),
                got: other.to_string(),
                expected: "float32, bfloat16 or float16".into(),
            }),
        }
    }

    fn expect_dtype(&self, op: &'static str, name: &str, want: RawDType) -> Result<()> {
        if self.dtype != want {
            return Err(Error::DType {
                op,
                tensor: name.into(),
                got: self.dtype.to_string(),
                expected: want.to_string(),
            });
        }
        Ok(())
    }

    /// A 4-D view of CPU memory.
    ///
    /// # Safety
    /// `ptr` must address `span()` readable elements of the dtype for the view's lifetime.
    unsafe fn view<'a>(&self, op: &'static str, name: &str) -> Result<TensorView<'a>> {
        self.expect_rank(op, name, 4, "[batch, seq, heads, dim]")?;
        let dt = self.float(op, name)?;
        // SAFETY: the caller's contract above.
        let data = unsafe { host_slice(dt, self.ptr, self.span()) };
        TensorView::strided(data, self.shape, self.strides).map_err(|_| {
            self.shape_err(
                op,
                name,
                "every dimension >= 1 (empty tensors are not attention inputs)".into(),
            )
        })
    }

    /// The int32 elements of a contiguous CPU tensor.
    ///
    /// # Safety
    /// As for [`RawTensor::view`].
    unsafe fn host_i32<'a>(&self, op: &'static str, name: &str) -> Result<&'a [i32]> {
        self.expect_dtype(op, name, RawDType::I32)?;
        if !self.is_contiguous() {
            return Err(self.shape_err(op, name, "a contiguous int32 tensor".into()));
        }
        // SAFETY: the caller's contract.
        Ok(unsafe { std::slice::from_raw_parts(self.ptr as *const i32, self.numel()) })
    }
}

/// `n` elements of `dt` at host address `ptr`.
///
/// # Safety
/// `ptr` must address `n` readable elements of `dt` for the lifetime `'a`.
unsafe fn host_slice<'a>(dt: DType, ptr: u64, n: usize) -> Slice<'a> {
    let p = ptr as usize;
    // SAFETY: the caller's contract.
    unsafe {
        match dt {
            DType::F32 => Slice::F32(std::slice::from_raw_parts(p as *const f32, n)),
            DType::BF16 => Slice::BF16(std::slice::from_raw_parts(p as *const bf16, n)),
            DType::F16 => Slice::F16(std::slice::from_raw_parts(p as *const f16, n)),
        }
    }
}

/// Document ids held on the host as the int32 `[B, Sq]` / `[B, Sk]` tensors of a call.
fn doc_tensors(docs: Option<&DocIds>, b: usize, sq: usize, sk: usize) -> [Option<RawTensor>; 2] {
    let id = |x: &Vec<i32>, n: usize| {
        RawTensor::contiguous(x.as_ptr() as u64, RawDType::I32, &[b, n], Device::Cpu)
    };
    [docs.map(|d| id(&d.q, sq)), docs.map(|d| id(&d.k, sk))]
}

/// Which pairs attend: every pair, or a parsed mask expression (bound to the call's lengths and
/// document ids here).
#[derive(Clone, Copy)]
pub enum MaskArg<'a> {
    Full,
    Expr(&'a MaskExpr),
    /// An explicit block mask: `table` uint8 / bool `[B or 1, H or 1, q_tiles, k_tiles]`
    /// (contiguous; nonzero = attend the whole tile of `tile_q` queries x `tile_k` keys). With
    /// `under`, the table gates that mask expression (an external gate, SeerAttention-style):
    /// the pairs attend that `under` allows inside the kept tiles, `under & table`.
    Blocks {
        table: RawTensor,
        tile_q: usize,
        tile_k: usize,
        under: Option<&'a MaskExpr>,
    },
    /// A mask the caller resolved already (a bound expression, or a schedule with an optional
    /// row mask for its Partial tiles, as the paged KV cache builds per page run): CPU only.
    Prepared(MaskSpec<'a>),
}

/// The inputs of one attention call: q `[B, Sq, Hq, D]`, k `[B, Sk, Hk, D]`, v `[B, Sk, Hk, Dv]`
/// (any strides; the CUDA kernels need the head dim contiguous), the mask, document ids (int32
/// `[B, Sq]` / `[B, Sk]`, for masks with `document`) and the logit parameters.
#[derive(Clone, Copy)]
pub struct AttnArgs<'a> {
    pub q: RawTensor,
    pub k: RawTensor,
    pub v: RawTensor,
    pub mask: MaskArg<'a>,
    pub q_doc: Option<RawTensor>,
    pub k_doc: Option<RawTensor>,
    pub params: &'a AttnParams,
}

/// A caller's CUDA stream (`CUstream` as an integer; 0 = the legacy default stream). Ignored on
/// the CPU.
pub type StreamHandle = u64;

const FWD: &str = "attention";
const BWD: &str = "attention backward";
const DEC: &str = "decode";

/// The device every tensor of a call lives on (an error names the first that differs).
fn common_device(op: &'static str, ts: &[(&str, &RawTensor)]) -> Result<Device> {
    let dev = ts[0].1.device;
    for (name, t) in ts {
        if t.device != dev {
            return Err(Error::Param {
                op,
                msg: format!(
                    "tensor `{name}` is on {}, `{}` on {dev}: every tensor of a call must be on one device",
                    t.device, ts[0].0
                ),
            });
        }
    }
    Ok(dev)
}

/// Shapes and dtypes of q, k, v (no memory is touched).
fn dims_of(op: &'static str, a: &AttnArgs) -> Result<(Dims, DType)> {
    for (name, t) in [("q", &a.q), ("k", &a.k), ("v", &a.v)] {
        t.expect_rank(op, name, 4, "[batch, seq, heads, dim]")?;
        t.float(op, name)?;
        if t.numel() == 0 {
            return Err(t.shape_err(op, name, "every dimension >= 1".into()));
        }
    }
    // Validation on placeholder views of the right shapes: one set of shape rules for every
    // entry point (`attention::validate`).
    let dt = a.q.float(op, "q")?;
    let fake = |t: &RawTensor| -> Result<TensorView<'static>> {
        static ONE: [f32; 1] = [0.0];
        static ONE16: [bf16; 1] = [bf16::ZERO];
        static ONEH: [f16; 1] = [f16::ZERO];
        let data = match t.float(op, "")? {
            DType::F32 => Slice::F32(&ONE),
            DType::BF16 => Slice::BF16(&ONE16),
            DType::F16 => Slice::F16(&ONEH),
        };
        Ok(TensorView {
            data,
            shape: t.shape,
            strides: [0; 4],
        })
    };
    let dims = validate(op, &fake(&a.q)?, &fake(&a.k)?, &fake(&a.v)?)?;
    a.params.check()?;
    Ok((dims, dt))
}

fn check_out(
    op: &'static str,
    name: &str,
    t: &RawTensor,
    want: &[usize],
    dtype: RawDType,
    dev: Device,
) -> Result<()> {
    if t.dims() != want {
        return Err(t.shape_err(op, name, format!("{want:?}")));
    }
    t.expect_dtype(op, name, dtype)?;
    if t.device != dev {
        return Err(Error::Param {
            op,
            msg: format!("tensor `{name}` is on {}, the inputs on {dev}", t.device),
        });
    }
    Ok(())
}

/// What a mask needs from the host besides its expression: document ids or a block table
/// (copied from the device when they live there: a synchronisation of the caller's stream).
#[derive(Default)]
struct MaskData {
    docs: Option<DocIds>,
    blocks: Option<Vec<u8>>,
}

impl MaskData {
    /// A hash of the data (part of the CUDA plan key).
    fn key(&self) -> u64 {
        match (&self.docs, &self.blocks) {
            (Some(d), Some(b)) => hash_of(&(&d.q, &d.k, b)),
            (Some(d), None) => hash_of(&(&d.q, &d.k)),
            (None, Some(b)) => hash_of(b),
            (None, None) => 0,
        }
    }
}

fn mask_data(
    op: &'static str,
    a: &AttnArgs,
    dims: &Dims,
    stream: StreamHandle,
) -> Result<MaskData> {
    let mut blocks = None;
    if let MaskArg::Blocks {
        table,
        tile_q,
        tile_k,
        ..
    } = a.mask
    {
        table.expect_dtype(op, "block_mask", RawDType::U8)?;
        let (qt, kt) = (
            dims.sq.div_ceil(tile_q.max(1)),
            dims.sk.div_ceil(tile_k.max(1)),
        );
        let [tb, th, tq, tk] = table.shape;
        if table.rank != 4
            || !(tb == 1 || tb == dims.batch)
            || !(th == 1 || th == dims.hq)
            || (tq, tk) != (qt, kt)
            || !table.is_contiguous()
        {
            return Err(table.shape_err(
                op,
                "block_mask",
                format!(
                    "a contiguous [1 or {}, 1 or {}, {qt}, {kt}] uint8 / bool table (Sq {} / tile {tile_q}, Sk {} / tile {tile_k})",
                    dims.batch, dims.hq, dims.sq, dims.sk
                ),
            ));
        }
        let bytes = match table.device {
            // SAFETY: the caller of the entry point guarantees the tensor's memory.
            Device::Cpu => unsafe {
                std::slice::from_raw_parts(table.ptr as *const u8, table.numel()).to_vec()
            },
            Device::Cuda(ord) => cuda_route::read::<u8>(ord, &table, stream)?,
        };
        blocks = Some(bytes);
    }
    let uses = matches!(a.mask, MaskArg::Expr(e) | MaskArg::Blocks { under: Some(e), .. } if e.uses_documents());
    match (a.q_doc, a.k_doc, uses) {
        (_, _, false) => Ok(MaskData { docs: None, blocks }),
        (Some(qd), Some(kd), true) => {
            let mut ids = Vec::with_capacity(2);
            for (name, t, s) in [("q_doc", qd, dims.sq), ("k_doc", kd, dims.sk)] {
                if t.dims() != [dims.batch, s] {
                    return Err(t.shape_err(op, name, format!("[{}, {s}] int32", dims.batch)));
                }
                ids.push(read_i32(op, name, &t, stream)?);
            }
            let k = ids.pop().unwrap();
            let q = ids.pop().unwrap();
            Ok(MaskData {
                docs: Some(DocIds { q, k }),
                blocks,
            })
        }
        _ => Err(Error::Param {
            op,
            msg: "the mask uses `document`: pass q_doc [B, Sq] and k_doc [B, Sk] (int32)".into(),
        }),
    }
}

/// A contiguous int32 tensor's elements on the host.
fn read_i32(op: &'static str, name: &str, t: &RawTensor, stream: StreamHandle) -> Result<Vec<i32>> {
    match t.device {
        // SAFETY: the caller of the entry point guarantees the tensor's memory.
        Device::Cpu => Ok(unsafe { t.host_i32(op, name) }?.to_vec()),
        Device::Cuda(ord) => {
            t.expect_dtype(op, name, RawDType::I32)?;
            if !t.is_contiguous() {
                return Err(t.shape_err(op, name, "a contiguous int32 tensor".into()));
            }
            cuda_route::read::<i32>(ord, t, stream)
        }
    }
}

fn prepared_on_cuda() -> Error {
    Error::Param {
        op: FWD,
        msg: "a prepared mask (MaskArg::Prepared) runs on the CPU; on CUDA pass an expression or a block table".into(),
    }
}

/// A call's mask resolved for the kernels.
enum Resolved<'a> {
    Full,
    Bound(crate::mask::BoundMask),
    Blocks(crate::mask::BlockSchedule),
    /// A block table under an expression: the expression's schedule at the table's tiles, gated.
    Gated(crate::mask::BoundMask, crate::mask::BlockSchedule),
    Prepared(MaskSpec<'a>),
}

fn bind<'a>(a: &AttnArgs<'a>, dims: &Dims, data: MaskData) -> Result<Resolved<'a>> {
    let shape = MaskShape {
        batch: dims.batch,
        sq: dims.sq,
        sk: dims.sk,
    };
    match a.mask {
        MaskArg::Prepared(s) => Ok(Resolved::Prepared(s)),
        MaskArg::Full => Ok(Resolved::Full),
        MaskArg::Expr(e) => e.bind(shape, data.docs).map(Resolved::Bound),
        MaskArg::Blocks {
            table,
            tile_q,
            tile_k,
            under: Some(e),
        } => {
            let bound = e.bind(shape, data.docs)?;
            let gated = bound
                .schedule(tile_q, tile_k)?
                .gated(&data.blocks.unwrap_or_default(), table.shape)?;
            Ok(Resolved::Gated(bound, gated))
        }
        MaskArg::Blocks {
            table,
            tile_q,
            tile_k,
            under: None,
        } => {
            let bytes = data.blocks.unwrap_or_default();
            crate::mask::BlockSchedule::from_block_mask(
                &bytes,
                table.shape,
                tile_q,
                tile_k,
                dims.sq,
                dims.sk,
            )
            .map(Resolved::Blocks)
        }
    }
}

fn spec<'a>(r: &'a Resolved<'a>) -> MaskSpec<'a> {
    match r {
        Resolved::Prepared(s) => *s,
        Resolved::Full => MaskSpec::Full,
        Resolved::Bound(b) => MaskSpec::Expr(b),
        Resolved::Blocks(s) => MaskSpec::Schedule {
            schedule: s,
            rows: None,
        },
        Resolved::Gated(b, s) => MaskSpec::Gated {
            mask: b,
            schedule: s,
        },
    }
}

/// Writes a contiguous `[B, S, H, D]` host result into a caller's strided CPU tensor.
///
/// # Safety
/// `dst` must address `span()` writable elements of its dtype.
unsafe fn write_host(dst: &RawTensor, src: &crate::tensor::Buffer) {
    let [b, s, h, d] = dst.shape;
    let st = dst.strides;
    macro_rules! copy {
        ($t:ty, $x:expr) => {{
            let p = dst.ptr as *mut $t;
            let mut n = 0;
            for ib in 0..b {
                for is in 0..s {
                    for ih in 0..h {
                        let o = ib * st[0] + is * st[1] + ih * st[2];
                        for id in 0..d {
                            // SAFETY: inside the span the caller guarantees.
                            unsafe { *p.add(o + id * st[3]) = $x[n] };
                            n += 1;
                        }
                    }
                }
            }
        }};
    }
    match src {
        crate::tensor::Buffer::F32(x) => copy!(f32, x),
        crate::tensor::Buffer::BF16(x) => copy!(bf16, x),
        crate::tensor::Buffer::F16(x) => copy!(f16, x),
    }
}

/// Writes f32 values in row-major order into a caller's (strided) f32 CPU tensor of rank <= 4.
///
/// # Safety
/// As for [`write_host`].
unsafe fn write_f32(dst: &RawTensor, src: &[f32]) {
    let mut sh = [1usize; 4];
    let mut st = [0usize; 4];
    let off = 4 - dst.rank;
    sh[off..].copy_from_slice(dst.dims());
    st[off..].copy_from_slice(&dst.strides[..dst.rank]);
    let p = dst.ptr as *mut f32;
    let mut n = 0;
    for a in 0..sh[0] {
        for b in 0..sh[1] {
            for c in 0..sh[2] {
                for d in 0..sh[3] {
                    // SAFETY: inside the span the caller guarantees.
                    unsafe { *p.add(a * st[0] + b * st[1] + c * st[2] + d * st[3]) = src[n] };
                    n += 1;
                }
            }
        }
    }
}

/// What forward and backward check first: q, k, v (shapes, dtypes, one device) and the LSE
/// `[B, Hq, Sq]` f32 on that device.
fn prologue(op: &'static str, a: &AttnArgs, lse: &RawTensor) -> Result<(Dims, DType, Device)> {
    let (dims, dt) = dims_of(op, a)?;
    let dev = common_device(op, &[("q", &a.q), ("k", &a.k), ("v", &a.v)])?;
    check_out(
        op,
        "lse",
        lse,
        &[dims.batch, dims.hq, dims.sq],
        RawDType::Float(DType::F32),
        dev,
    )?;
    Ok((dims, dt, dev))
}

/// [`prologue`], then `out` `[B, Sq, Hq, Dv]` in q's dtype on the same device (every forward).
fn fwd_prologue(
    op: &'static str,
    a: &AttnArgs,
    out: &RawTensor,
    lse: &RawTensor,
) -> Result<(Dims, DType, Device)> {
    let (dims, dt, dev) = prologue(op, a, lse)?;
    check_out(
        op,
        "out",
        out,
        &[dims.batch, dims.sq, dims.hq, dims.dv],
        RawDType::Float(dt),
        dev,
    )?;
    Ok((dims, dt, dev))
}

/// q, k, v of a CPU call as host views.
///
/// # Safety
/// The entry points' contract: each tensor addresses live host memory of its shape and strides.
unsafe fn host_qkv<'t>(
    op: &'static str,
    a: &AttnArgs,
) -> Result<(TensorView<'t>, TensorView<'t>, TensorView<'t>)> {
    // SAFETY: forwarded.
    unsafe { Ok((a.q.view(op, "q")?, a.k.view(op, "k")?, a.v.view(op, "v")?)) }
}

/// A CPU forward's output and LSE into the caller's `out` and `lse`.
///
/// # Safety
/// `out` and `lse` address writable host memory of their shapes and strides.
unsafe fn write_result(out: &RawTensor, lse: &RawTensor, r: &crate::attention::AttnOutput) {
    // SAFETY: forwarded.
    unsafe {
        write_host(out, &r.out.data);
        write_f32(lse, &r.lse);
    }
}

/// Attention forward: writes `out` `[B, Sq, Hq, Dv]` (q's dtype) and `lse` `[B, Hq, Sq]` (f32,
/// natural log; -inf on rows with no allowed key, whose output is 0).
///
/// # Safety
/// Every tensor's pointer must address the elements its shape and strides describe, on its
/// device, for the duration of the call (CPU) or until the queued kernels finish (CUDA); `out`
/// and `lse` must not overlap the inputs.
pub unsafe fn forward(
    a: &AttnArgs,
    out: &RawTensor,
    lse: &RawTensor,
    stream: StreamHandle,
) -> Result<()> {
    let (dims, dt, dev) = fwd_prologue(FWD, a, out, lse)?;
    match dev {
        Device::Cpu => {
            let data = mask_data(FWD, a, &dims, stream)?;
            let bm = bind(a, &dims, data)?;
            // SAFETY: the caller's contract.
            let (q, k, v) = unsafe { host_qkv(FWD, a)? };
            let r = crate::forward(&q, &k, &v, a.params, spec(&bm))?;
            // SAFETY: the caller's contract (outputs writable).
            unsafe { write_result(out, lse, &r) };
            Ok(())
        }
        Device::Cuda(_) if matches!(a.mask, MaskArg::Prepared(_)) => Err(prepared_on_cuda()),
        Device::Cuda(ord) => cuda_route::forward(ord, a, &dims, dt, out, lse, stream),
    }
}

/// [`forward`] that also writes the block-pooled attention map ([`crate::AttnMap`]) at `block` x
/// `block` into `mass` and `max` (f32, contiguous `[B, Hq, ceil(Sq / block), ceil(Sk / block)]`).
/// On CUDA the Hopper warp-specialized forward writes it ([`crate::cuda::FwdPlan::with_map`]);
/// other kernels refuse.
///
/// # Safety
/// As for [`forward`]; `mass` and `max` address writable host memory of their shapes.
pub unsafe fn forward_map(
    a: &AttnArgs,
    out: &RawTensor,
    lse: &RawTensor,
    [mass, max]: [&RawTensor; 2],
    block: usize,
    stream: StreamHandle,
) -> Result<()> {
    const OP: &str = "attention map";
    let (dims, dt, dev) = fwd_prologue(OP, a, out, lse)?;
    if let Device::Cuda(_) = dev {
        if matches!(a.mask, MaskArg::Prepared(_)) {
            return Err(prepared_on_cuda());
        }
    }
    let want = [
        dims.batch,
        dims.hq,
        dims.sq.div_ceil(block.max(1)),
        dims.sk.div_ceil(block.max(1)),
    ];
    for (name, t) in [("mass", mass), ("max", max)] {
        check_out(OP, name, t, &want, RawDType::Float(DType::F32), dev)?;
        if !t.is_contiguous() {
            return Err(t.shape_err(OP, name, format!("a contiguous {want:?} f32 tensor")));
        }
    }
    if let Device::Cuda(ord) = dev {
        return cuda_route::forward_map(ord, a, &dims, dt, out, lse, [mass, max], block, stream);
    }
    let data = mask_data(OP, a, &dims, stream)?;
    let bm = bind(a, &dims, data)?;
    // SAFETY: the caller's contract.
    let (q, k, v) = unsafe { host_qkv(OP, a)? };
    let (r, map) = crate::attention::forward_with_map(&q, &k, &v, a.params, spec(&bm), block)?;
    // SAFETY: the caller's contract (outputs writable, shapes checked above).
    unsafe {
        write_result(out, lse, &r);
        write_f32(mass, &map.mass);
        write_f32(max, &map.max);
    }
    Ok(())
}

/// What a sparse forward selected ([`sparse_forward`]).
#[derive(Clone, Debug)]
pub struct SparseInfo {
    /// The dense fallback ran (fewer keys than the spec's `dense_below`, per backend).
    pub fallback: bool,
    /// Tiles of the selection (query rows, keys): the spec's block on the CPU, the attention
    /// kernel's tiles on CUDA.
    pub tiles: (usize, usize),
    /// With `report`: allowed pairs kept / allowed pairs of the mask, and the selection as a u8
    /// table `[B, Hq, query tiles, key tiles]` (0 skipped, 1 whole tile, 2 tile under the mask).
    pub density: Option<f64>,
    pub table: Option<(Vec<u8>, [usize; 4])>,
    /// With `report` and skip-softmax: (tile groups tested, dropped) ([`crate::sparse::Selection::skipped`]).
    pub skipped: Option<(u64, u64)>,
}

fn sparse_info(sel: &crate::sparse::Selection, report: bool) -> SparseInfo {
    let s = &sel.schedule;
    let r = &sel.report;
    SparseInfo {
        fallback: sel.fallback,
        tiles: (s.tile_q, s.tile_k),
        density: report.then(|| r.density()),
        table: report.then(|| (sel.block_mask(), [r.batch, r.heads, s.q_tiles, s.k_tiles])),
        skipped: if report { sel.skipped } else { None },
    }
}

/// Dynamic sparse attention forward (`crate::sparse`): selects key tiles of the mask by `spec`
/// and attends through the selection; writes `out` and `lse` as [`forward`] does. The mask must
/// be an expression (or `None`: full). On CUDA the estimator runs on the device (no host
/// synchronisation unless `report` asks for the selection on the host).
///
/// # Safety
/// As for [`forward`].
pub unsafe fn sparse_forward(
    a: &AttnArgs,
    spec: &crate::sparse::SparseSpec,
    out: &RawTensor,
    lse: &RawTensor,
    stream: StreamHandle,
    report: bool,
) -> Result<SparseInfo> {
    const OP: &str = "sparse attention";
    let (dims, dt, dev) = fwd_prologue(OP, a, out, lse)?;
    if !matches!(a.mask, MaskArg::Full | MaskArg::Expr(_)) {
        return Err(Error::Param {
            op: OP,
            msg: "the selection is made within a mask expression (or no mask); an explicit block mask or a prepared schedule cannot be combined with it".into(),
        });
    }
    match dev {
        Device::Cpu => {
            let data = mask_data(OP, a, &dims, stream)?;
            let bm = bind(a, &dims, data)?;
            // SAFETY: the caller's contract.
            let (q, k, v) = unsafe { host_qkv(OP, a)? };
            let (r, sel) = crate::sparse::forward(&q, &k, &v, a.params, spec, self::spec(&bm))?;
            // SAFETY: the caller's contract (outputs writable).
            unsafe { write_result(out, lse, &r) };
            Ok(sparse_info(&sel, report))
        }
        Device::Cuda(ord) => {
            cuda_route::sparse_forward(ord, a, spec, &dims, dt, out, lse, stream, report)
        }
    }
}

/// Attention over a caller's gathered-key selection ([`crate::sparse::gather::TileKeys`]: per
/// query tile, key tiles computed whole and single keys computed besides; the pairs kept are
/// `mask & selection`): writes `out` and `lse` as [`forward`] does. The mask must be an
/// expression (or `None`: full). On CUDA the Hopper warp-specialized forward runs it
/// (`FwdPlan::with_gather`, planned per call: the selection is lowered and uploaded from the
/// host), whose tiles the selection must use ([`gather_tiles`]); the CPU takes any tiles.
///
/// # Safety
/// As for [`forward`].
pub unsafe fn forward_gathered(
    a: &AttnArgs,
    sel: &crate::sparse::gather::TileKeys,
    out: &RawTensor,
    lse: &RawTensor,
    stream: StreamHandle,
) -> Result<()> {
    const OP: &str = "gathered attention";
    let (dims, dt, dev) = fwd_prologue(OP, a, out, lse)?;
    gathered_fits(OP, a, sel, &dims)?;
    match dev {
        Device::Cpu => {
            let data = mask_data(OP, a, &dims, stream)?;
            let bm = bind(a, &dims, data)?;
            // SAFETY: the caller's contract.
            let (q, k, v) = unsafe { host_qkv(OP, a)? };
            let r = crate::sparse::gather::forward(&q, &k, &v, a.params, self::spec(&bm), sel)?;
            // SAFETY: the caller's contract (outputs writable).
            unsafe { write_result(out, lse, &r) };
            Ok(())
        }
        Device::Cuda(ord) => cuda_route::forward_gathered(ord, a, &dims, dt, sel, out, lse, stream),
    }
}

/// A backward on the host: the mask bound, the LSE checked contiguous, q, k, v, out, dout as
/// views, `run` (gradients from them, the LSE and the mask), the gradients written to dq, dk, dv.
///
/// # Safety
/// As for [`backward`].
unsafe fn host_backward(
    op: &'static str,
    a: &AttnArgs,
    dims: &Dims,
    [out, lse, dout, dq, dk, dv]: [&RawTensor; 6],
    stream: StreamHandle,
    run: impl FnOnce([&TensorView; 5], &[f32], MaskSpec) -> Result<crate::Grads>,
) -> Result<()> {
    let data = mask_data(op, a, dims, stream)?;
    let bm = bind(a, dims, data)?;
    if !lse.is_contiguous() {
        return Err(lse.shape_err(op, "lse", "a contiguous [B, Hq, Sq] f32 tensor".into()));
    }
    // SAFETY: the caller's contract.
    let (q, k, v, o, d_o, l) = unsafe {
        (
            a.q.view(op, "q")?,
            a.k.view(op, "k")?,
            a.v.view(op, "v")?,
            out.view(op, "out")?,
            dout.view(op, "dout")?,
            std::slice::from_raw_parts(lse.ptr as *const f32, lse.numel()),
        )
    };
    let g = run([&q, &k, &v, &o, &d_o], l, spec(&bm))?;
    // SAFETY: the caller's contract (gradients writable).
    unsafe {
        write_host(dq, &g.dq.data);
        write_host(dk, &g.dk.data);
        write_host(dv, &g.dv.data);
    }
    Ok(())
}

/// A backward's out, dout (`[B, Sq, Hq, Dv]`) and gradients (q's, k's and v's shapes): the
/// inputs' float dtype, on their device.
fn check_bwd_tensors(
    op: &'static str,
    dims: &Dims,
    dt: DType,
    dev: Device,
    [out, dout, dq, dk, dv]: [&RawTensor; 5],
) -> Result<()> {
    let f = RawDType::Float(dt);
    let qs = [dims.batch, dims.sq, dims.hq, dims.d];
    let os = [dims.batch, dims.sq, dims.hq, dims.dv];
    let ks = [dims.batch, dims.sk, dims.hk, dims.d];
    let vs = [dims.batch, dims.sk, dims.hk, dims.dv];
    for (name, t, want) in [
        ("out", out, &os),
        ("dout", dout, &os),
        ("dq", dq, &qs),
        ("dk", dk, &ks),
        ("dv", dv, &vs),
    ] {
        check_out(op, name, t, want, f, dev)?;
    }
    Ok(())
}

/// A gathered selection's mask must be an expression (or none) and its sizes the inputs'.
fn gathered_fits(
    op: &'static str,
    a: &AttnArgs,
    sel: &crate::sparse::gather::TileKeys,
    dims: &Dims,
) -> Result<()> {
    if !matches!(a.mask, MaskArg::Full | MaskArg::Expr(_)) {
        return Err(Error::Param {
            op,
            msg: "a gathered selection is taken within a mask expression (or no mask); an explicit block mask or a prepared schedule cannot be combined with it".into(),
        });
    }
    if (sel.sq, sel.sk) != (dims.sq, dims.sk)
        || !(sel.batch == 1 || sel.batch == dims.batch)
        || !(sel.heads == 1 || sel.heads == dims.hq)
    {
        return Err(Error::Param {
            op,
            msg: format!(
                "the selection is for Sq {} x Sk {}, batch {} x heads {}; the inputs have Sq {} x Sk {}, batch {} x query heads {} (a selection's batch and heads are 1 or the inputs')",
                sel.sq, sel.sk, sel.batch, sel.heads, dims.sq, dims.sk, dims.batch, dims.hq
            ),
        });
    }
    Ok(())
}

/// The backward of [`forward_gathered`]: gradients through the same selection (`mask &
/// selection`, pair for pair), arguments as [`backward`]'s. The CPU runs
/// [`crate::sparse::gather::backward`]; CUDA the attention backward over the selection at its
/// own tiles, each tile holding a kept key tested pair by pair against the mask and the
/// selection's key bits ([`crate::cuda::BwdPlan::with_gather`]; a tile costs its whole product,
/// the forward's key gathering has no backward twin yet). Any tiles on either device.
///
/// # Safety
/// As for [`backward`].
#[allow(clippy::too_many_arguments)]
pub unsafe fn backward_gathered(
    a: &AttnArgs,
    sel: &crate::sparse::gather::TileKeys,
    out: &RawTensor,
    lse: &RawTensor,
    dout: &RawTensor,
    dq: &RawTensor,
    dk: &RawTensor,
    dv: &RawTensor,
    bwd: &BackwardParams,
    stream: StreamHandle,
) -> Result<()> {
    const OP: &str = "gathered attention backward";
    let (dims, dt, dev) = prologue(OP, a, lse)?;
    gathered_fits(OP, a, sel, &dims)?;
    check_bwd_tensors(OP, &dims, dt, dev, [out, dout, dq, dk, dv])?;
    match dev {
        // SAFETY: the caller's contract.
        Device::Cpu => unsafe {
            host_backward(
                OP,
                a,
                &dims,
                [out, lse, dout, dq, dk, dv],
                stream,
                |[q, k, v, o, d_o], l, m| {
                    crate::sparse::gather::backward(q, k, v, o, l, d_o, a.params, m, sel, bwd)
                },
            )
        },
        Device::Cuda(ord) => cuda_route::backward_gathered(
            ord,
            a,
            &dims,
            dt,
            sel,
            [out, lse, dout, dq, dk, dv],
            bwd,
            stream,
        ),
    }
}

/// The (query rows, keys) tiles a gathered selection ([`forward_gathered`]) must use for
/// these inputs: on CUDA the warp-specialized forward's (an error where that kernel does not
/// run: other GPUs, head dims past 256); on the CPU any tiles run, and this gives (64, 64).
pub fn gather_tiles(a: &AttnArgs) -> Result<(usize, usize)> {
    const OP: &str = "gathered attention";
    let (dims, _) = dims_of(OP, a)?;
    match common_device(OP, &[("q", &a.q), ("k", &a.k), ("v", &a.v)])? {
        Device::Cpu => Ok((64, 64)),
        Device::Cuda(ord) => cuda_route::gather_tiles(ord, a, &dims),
    }
}

/// [`forward`] over host views with outputs allocated here: `out` (q's dtype) and the LSE.
pub fn forward_host(
    q: &TensorView,
    k: &TensorView,
    v: &TensorView,
    mask: MaskArg,
    docs: Option<&DocIds>,
    params: &AttnParams,
) -> Result<crate::attention::AttnOutput> {
    let [b, sq, hq, _] = q.shape;
    let dv = v.shape[3];
    let mut out = crate::tensor::Buffer::zeros(q.dtype(), b * sq * hq * dv);
    let mut lse = vec![0f32; b * hq * sq];
    let out_ptr = match &mut out {
        crate::tensor::Buffer::F32(x) => x.as_mut_ptr() as u64,
        crate::tensor::Buffer::BF16(x) => x.as_mut_ptr() as u64,
        crate::tensor::Buffer::F16(x) => x.as_mut_ptr() as u64,
    };
    let [q_doc, k_doc] = doc_tensors(docs, b, sq, k.shape[1]);
    let a = AttnArgs {
        q: RawTensor::from_view(q),
        k: RawTensor::from_view(k),
        v: RawTensor::from_view(v),
        mask,
        q_doc,
        k_doc,
        params,
    };
    let o = RawTensor::contiguous(
        out_ptr,
        RawDType::Float(q.dtype()),
        &[b, sq, hq, dv],
        Device::Cpu,
    );
    let l = RawTensor::contiguous(
        lse.as_mut_ptr() as u64,
        RawDType::Float(DType::F32),
        &[b, hq, sq],
        Device::Cpu,
    );
    // SAFETY: the views borrow live host memory; `out` and `lse` are owned here, sized above.
    unsafe { forward(&a, &o, &l, 0)? };
    Ok(crate::attention::AttnOutput {
        out: crate::tensor::Tensor::new(out, vec![b, sq, hq, dv])?,
        lse,
    })
}

/// [`forward`] on CUDA device `ordinal` for host views (the CLI's `run --backend cuda`): q, k, v
/// are copied to the device (contiguous), the call goes through the same device route as every
/// caller's (plan cache, launch), and out / LSE come back. Document ids and block tables stay on
/// the host (the entry point reads them there).
pub fn forward_on_device(
    ordinal: usize,
    q: &TensorView,
    k: &TensorView,
    v: &TensorView,
    mask: MaskArg,
    docs: Option<&DocIds>,
    params: &AttnParams,
) -> Result<crate::attention::AttnOutput> {
    cuda_route::forward_on_device(ordinal, q, k, v, mask, docs, params)
}

/// Attention backward: dQ, dK, dV (`dq` `[B, Sq, Hq, D]`, `dk` `[B, Sk, Hk, D]`, `dv`
/// `[B, Sk, Hk, Dv]`, the inputs' dtype) of `sum(out * dout)`, from the forward's `out` and `lse`.
/// On CUDA, out / dout / dq take q's strides and v / dk / dv take k's (the kernels' contract).
///
/// # Safety
/// As for [`forward`]; `dq`, `dk`, `dv` are written.
#[allow(clippy::too_many_arguments)]
pub unsafe fn backward(
    a: &AttnArgs,
    out: &RawTensor,
    lse: &RawTensor,
    dout: &RawTensor,
    dq: &RawTensor,
    dk: &RawTensor,
    dv: &RawTensor,
    bwd: &BackwardParams,
    stream: StreamHandle,
) -> Result<()> {
    let (dims, dt, dev) = prologue(BWD, a, lse)?;
    check_bwd_tensors(BWD, &dims, dt, dev, [out, dout, dq, dk, dv])?;
    match dev {
        // SAFETY: the caller's contract.
        Device::Cpu => unsafe {
            host_backward(
                BWD,
                a,
                &dims,
                [out, lse, dout, dq, dk, dv],
                stream,
                |[q, k, v, o, d_o], l, m| crate::backward(q, k, v, o, l, d_o, a.params, m, bwd),
            )
        },
        Device::Cuda(ord) => {
            cuda_route::backward(ord, a, &dims, dt, [out, lse, dout, dq, dk, dv], bwd, stream)
        }
    }
}

/// The K/V cache of [`decode`]: pages `[num_pages, page_size, Hk, D]` with `block_table`
/// `[B, max_pages]` (int32 page ids), or one slab per sequence `[B, capacity, Hk, D]`
/// (`block_table` None); `seqlens` `[B]` int32 keys per sequence.
#[derive(Clone, Copy, Debug)]
pub struct KvCacheArgs {
    pub k: RawTensor,
    pub v: RawTensor,
    pub block_table: Option<RawTensor>,
    pub seqlens: RawTensor,
}

/// Single-query decode against a K/V cache (no copies of the cache): `q` `[B, 1, Hq, D]`
/// (contiguous), writes `out` `[B, 1, Hq, D]` and `lse` `[B, Hq]`. Every sequence attends to its
/// first `seqlens[b]` keys (0 keys: out 0, lse -inf). The caches must be contiguous.
///
/// On the CPU the lengths and block tables are checked against the cache (errors name the entry);
/// on CUDA they are read by the kernel where they are (the Python layer checks them first unless
/// asked not to, e.g. under graph capture).
///
/// # Safety
/// As for [`forward`].
pub unsafe fn decode(
    q: &RawTensor,
    cache: &KvCacheArgs,
    out: &RawTensor,
    lse: &RawTensor,
    params: &DecodeParams,
    stream: StreamHandle,
) -> Result<()> {
    params.check()?;
    q.expect_rank(DEC, "q", 4, "[batch, 1, heads, dim]")?;
    let dt = q.float(DEC, "q")?;
    let [b, one, hq, d] = q.shape;
    if one != 1 || !q.is_contiguous() {
        return Err(q.shape_err(DEC, "q", format!("a contiguous [{b}, 1, {hq}, {d}]")));
    }
    let mut ts = vec![("q", q), ("k_cache", &cache.k), ("v_cache", &cache.v)];
    ts.push(("cache_seqlens", &cache.seqlens));
    if let Some(bt) = &cache.block_table {
        ts.push(("block_table", bt));
    }
    let dev = common_device(DEC, &ts)?;
    let (kc, vc) = (&cache.k, &cache.v);
    for (name, t) in [("k_cache", kc), ("v_cache", vc)] {
        t.expect_rank(DEC, name, 4, "[pages or batch, tokens, kv heads, dim]")?;
        t.expect_dtype(DEC, name, RawDType::Float(dt))?;
        if !t.is_contiguous() {
            return Err(t.shape_err(DEC, name, "a contiguous cache".into()));
        }
    }
    if kc.shape != vc.shape {
        return Err(vc.shape_err(
            DEC,
            "v_cache",
            format!("{:?} (the shape of k_cache)", kc.dims()),
        ));
    }
    let [n0, tokens, hk, kd] = kc.shape;
    if kd != d || hk == 0 || hq % hk != 0 {
        return Err(kc.shape_err(
            DEC,
            "k_cache",
            format!("head dim {d} and KV heads dividing the {hq} query heads"),
        ));
    }
    if cache.seqlens.dims() != [b] {
        return Err(cache
            .seqlens
            .shape_err(DEC, "cache_seqlens", format!("[{b}] int32")));
    }
    cache
        .seqlens
        .expect_dtype(DEC, "cache_seqlens", RawDType::I32)?;
    if let Some(bt) = &cache.block_table {
        bt.expect_dtype(DEC, "block_table", RawDType::I32)?;
        if bt.rank != 2 || bt.shape[0] != b || !bt.is_contiguous() {
            return Err(bt.shape_err(
                DEC,
                "block_table",
                format!("a contiguous [{b}, max_pages] int32"),
            ));
        }
    } else if n0 != b {
        return Err(kc.shape_err(
            DEC,
            "k_cache",
            format!("[{b}, capacity, {hk}, {d}] (batch {b})"),
        ));
    }
    check_out(DEC, "out", out, &[b, 1, hq, d], RawDType::Float(dt), dev)?;
    check_out(DEC, "lse", lse, &[b, hq], RawDType::Float(DType::F32), dev)?;
    match dev {
        Device::Cpu => {
            // SAFETY: the caller's contract.
            let (qv, kslice, vslice, lens) = unsafe {
                let qv = q.view(DEC, "q")?;
                let sl = |t: &RawTensor| host_slice(dt, t.ptr, t.numel());
                (
                    qv,
                    sl(kc),
                    sl(vc),
                    cache.seqlens.host_i32(DEC, "cache_seqlens")?,
                )
            };
            let r = match &cache.block_table {
                Some(bt) => {
                    // SAFETY: the caller's contract.
                    let tables = unsafe { bt.host_i32(DEC, "block_table")? };
                    let kv = PagedKv {
                        k: kslice,
                        v: vslice,
                        page_size: tokens,
                        kv_heads: hk,
                        head_dim: d,
                    };
                    let bt = BlockTables::shared(tables, bt.shape[1], lens);
                    crate::kv::decode::decode(&qv, &kv, &bt, params)?
                }
                None => contiguous_decode_cpu(&qv, kc, vc, lens, params)?,
            };
            // SAFETY: the caller's contract (outputs writable).
            unsafe {
                write_host(out, &r.out.data);
                write_f32(lse, &r.lse);
            }
            Ok(())
        }
        Device::Cuda(ord) => cuda_route::decode(ord, q, cache, out, lse, params, dt, stream),
    }
}

/// Decode against one slab per sequence on the CPU: each sequence's first `len` keys through the
/// forward kernel (views into the cache, no copies), results stacked.
fn contiguous_decode_cpu(
    q: &TensorView,
    kc: &RawTensor,
    vc: &RawTensor,
    lens: &[i32],
    params: &DecodeParams,
) -> Result<crate::attention::AttnOutput> {
    let [b, _, hq, d] = q.shape;
    let [_, cap, hk, _] = kc.shape;
    let dt = q.dtype();
    let mut out = crate::tensor::Buffer::zeros(dt, b * hq * d);
    let mut lse = vec![f32::NEG_INFINITY; b * hq];
    let attn = AttnParams {
        scale: params.scale,
        softcap: params.softcap,
        isa: None,
        skip_below: None,
    };
    for (bi, &len) in lens.iter().enumerate() {
        if len < 0 || len as usize > cap {
            return Err(Error::Param {
                op: DEC,
                msg: format!(
                    "cache_seqlens[{bi}] = {len} outside 0..={cap} (the cache's capacity)"
                ),
            });
        }
        if len == 0 {
            continue;
        }
        let len = len as usize;
        let sub = |t: &RawTensor| -> Result<TensorView<'_>> {
            let mut s = *t;
            s.ptr += (bi * t.strides[0] * dt.size()) as u64;
            s.shape = [1, len, hk, d];
            // SAFETY: a sub-view of the caller's cache (batch row bi, first len tokens).
            unsafe { s.view(DEC, "k_cache") }
        };
        let qv = slice_batch(q, bi)?;
        let r = crate::forward(&qv, &sub(kc)?, &sub(vc)?, &attn, MaskSpec::Full)?;
        copy_rows(&mut out, bi * hq * d, &r.out.data);
        lse[bi * hq..(bi + 1) * hq].copy_from_slice(&r.lse);
    }
    crate::tensor::Tensor::new(out, vec![b, 1, hq, d])
        .map(|out| crate::attention::AttnOutput { out, lse })
}

/// Batch row `bi` of a 4-D view as a view of batch 1.
fn slice_batch<'a>(v: &TensorView<'a>, bi: usize) -> Result<TensorView<'a>> {
    let off = bi * v.strides[0];
    let data = match v.data {
        Slice::F32(x) => Slice::F32(&x[off..]),
        Slice::BF16(x) => Slice::BF16(&x[off..]),
        Slice::F16(x) => Slice::F16(&x[off..]),
    };
    TensorView::strided(data, [1, v.shape[1], v.shape[2], v.shape[3]], v.strides)
}

fn copy_rows(dst: &mut crate::tensor::Buffer, at: usize, src: &crate::tensor::Buffer) {
    use crate::tensor::Buffer;
    match (dst, src) {
        (Buffer::F32(d), Buffer::F32(s)) => d[at..at + s.len()].copy_from_slice(s),
        (Buffer::BF16(d), Buffer::BF16(s)) => d[at..at + s.len()].copy_from_slice(s),
        (Buffer::F16(d), Buffer::F16(s)) => d[at..at + s.len()].copy_from_slice(s),
        _ => unreachable!("one dtype per call"),
    }
}

/// A hash of values that select a plan (document ids, parameters).
fn hash_of<T: Hash>(x: &T) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    x.hash(&mut h);
    h.finish()
}

/// Plans per problem, shared by all calls of the process: at most `CAP` per kind (the cache is
/// emptied when full: a workload cycling through more shapes than that re-plans).
struct PlanCache<K, V> {
    map: Mutex<HashMap<K, Arc<V>>>,
}

const CAP: usize = 512;

impl<K: Hash + Eq, V> PlanCache<K, V> {
    fn new() -> Self {
        PlanCache {
            map: Mutex::new(HashMap::new()),
        }
    }
    fn get_or(&self, key: K, make: impl FnOnce() -> Result<V>) -> Result<Arc<V>> {
        if let Some(p) = self.map.lock().unwrap().get(&key) {
            return Ok(p.clone());
        }
        let p = Arc::new(make()?);
        let mut m = self.map.lock().unwrap();
        if m.len() >= CAP {
            m.clear();
        }
        m.insert(key, p.clone());
        Ok(p)
    }
    fn len(&self) -> usize {
        self.map.lock().unwrap().len()
    }
}

/// Number of cached plans (forward, backward, decode) — tests check that repeated calls reuse.
pub fn plan_counts() -> (usize, usize, usize) {
    cuda_route::plan_counts()
}

/// The CUDA half of the routing: devices, borrowed tensors, plan caches.
mod cuda_route {
    use super::*;
    use crate::cuda::backward::BwdPlan;
    use crate::cuda::decode::{DecodePlan, KvLayout};
    use crate::cuda::{Borrowed, CudaDevice, DevTensor, FwdPlan};

    static DEVICES: OnceLock<Mutex<HashMap<usize, Arc<CudaDevice>>>> = OnceLock::new();

    /// The device (opened once per process; its context is the primary one PyTorch uses).
    pub(super) fn device(ord: usize) -> Result<Arc<CudaDevice>> {
        let m = DEVICES.get_or_init(|| Mutex::new(HashMap::new()));
        if let Some(d) = m.lock().unwrap().get(&ord) {
            return Ok(d.clone());
        }
        let d = CudaDevice::open(ord)?;
        m.lock().unwrap().insert(ord, d.clone());
        Ok(d)
    }

    #[derive(Hash, PartialEq, Eq)]
    struct FwdKey {
        ord: usize,
        dims: Dims,
        dtype: DType,
        mask: Option<String>,
        docs: u64,
        scale: Option<u32>,
        softcap: Option<u32>,
        tma: bool,
        /// The pooled attention map's block (a plan that writes it).
        map: Option<usize>,
    }

    #[derive(Hash, PartialEq, Eq)]
    struct BwdKey {
        fwd: FwdKey,
        deterministic: bool,
        stream: u64,
    }

    #[derive(Hash, PartialEq, Eq)]
    struct DecKey {
        ord: usize,
        layout: (usize, usize),
        dtype: DType,
        hk: usize,
        d: usize,
        batch: usize,
        hq: usize,
        max_len: usize,
        scale: Option<u32>,
        softcap: Option<u32>,
        stream: u64,
    }

    /// The three plan caches of the process: forward, backward, decode.
    type Plans = (
        PlanCache<FwdKey, FwdPlan>,
        PlanCache<BwdKey, BwdPlan>,
        PlanCache<DecKey, DecodePlan>,
    );

    fn plans() -> &'static Plans {
        static P: OnceLock<Plans> = OnceLock::new();
        P.get_or_init(|| (PlanCache::new(), PlanCache::new(), PlanCache::new()))
    }

    pub(super) fn plan_counts() -> (usize, usize, usize) {
        let p = plans();
        (p.0.len(), p.1.len(), p.2.len())
    }

    pub(super) fn stream_of(
        dev: &Arc<CudaDevice>,
        raw: StreamHandle,
    ) -> Arc<cudarc::driver::CudaStream> {
        // SAFETY: the caller (PyTorch's current stream) owns the stream and keeps it alive for
        // the call; work is ordered on it.
        unsafe { dev.borrow_stream(raw) }
    }

    /// # Safety
    /// `t` addresses live device memory of its shape and strides.
    pub(super) unsafe fn dev_tensor(
        s: &Arc<cudarc::driver::CudaStream>,
        name: &str,
        t: &RawTensor,
    ) -> Result<DevTensor> {
        let dt = t.float("cuda attention", name)?;
        // SAFETY: forwarded.
        unsafe { DevTensor::borrow(s, name, t.ptr, t.shape, t.strides, dt) }
    }

    /// A backward's inputs (q, k, v, out, dout) and gradients (dq, dk, dv) as device tensors
    /// on stream `s`.
    ///
    /// # Safety
    /// As for [`dev_tensor`], for every tensor.
    unsafe fn bwd_tensors(
        s: &Arc<cudarc::driver::CudaStream>,
        a: &AttnArgs,
        [out, dout, dq, dk, dv]: [&RawTensor; 5],
    ) -> Result<([DevTensor; 5], [DevTensor; 3])> {
        // SAFETY: forwarded.
        unsafe {
            Ok((
                [
                    dev_tensor(s, "q", &a.q)?,
                    dev_tensor(s, "k", &a.k)?,
                    dev_tensor(s, "v", &a.v)?,
                    dev_tensor(s, "out", out)?,
                    dev_tensor(s, "dout", dout)?,
                ],
                [
                    dev_tensor(s, "dq", dq)?,
                    dev_tensor(s, "dk", dk)?,
                    dev_tensor(s, "dv", dv)?,
                ],
            ))
        }
    }

    /// q, k, v and the output of a forward as device tensors on stream `s`.
    ///
    /// # Safety
    /// As for [`dev_tensor`], for each of them.
    unsafe fn qkv_out(
        s: &Arc<cudarc::driver::CudaStream>,
        a: &AttnArgs,
        out: &RawTensor,
    ) -> Result<(DevTensor, DevTensor, DevTensor, DevTensor)> {
        // SAFETY: forwarded.
        unsafe {
            Ok((
                dev_tensor(s, "q", &a.q)?,
                dev_tensor(s, "k", &a.k)?,
                dev_tensor(s, "v", &a.v)?,
                dev_tensor(s, "out", out)?,
            ))
        }
    }

    /// The device, the caller's stream and q, k, v, out of a call that runs the Hopper
    /// warp-specialized forward (`what` on CUDA needs TMA-aligned inputs); `lse` contiguous.
    ///
    /// # Safety
    /// The entry point's contract.
    #[allow(clippy::type_complexity)]
    unsafe fn tma_inputs(
        op: &'static str,
        what: &str,
        ord: usize,
        a: &AttnArgs,
        out: &RawTensor,
        lse: &RawTensor,
        stream: StreamHandle,
    ) -> Result<(
        Arc<CudaDevice>,
        Arc<cudarc::driver::CudaStream>,
        [DevTensor; 4],
    )> {
        f32_contig(op, "lse", lse)?;
        let dev = device(ord)?;
        let s = stream_of(&dev, stream);
        // SAFETY: forwarded.
        let (q, k, v, o) = unsafe { qkv_out(&s, a, out)? };
        if !(q.tma_aligned() && k.tma_aligned() && v.tma_aligned()) {
            return Err(Error::Param {
                op,
                msg: format!("{what} on CUDA: q / k / v addresses and strides must be multiples of 16 bytes (the warp-specialized kernel's TMA): pass contiguous tensors"),
            });
        }
        Ok((dev, s, [q, k, v, o]))
    }

    fn f32_contig(op: &'static str, name: &str, t: &RawTensor) -> Result<()> {
        if !t.is_contiguous() {
            return Err(t.shape_err(op, name, "a contiguous float32 tensor".into()));
        }
        Ok(())
    }

    fn fwd_key(
        ord: usize,
        a: &AttnArgs,
        dims: &Dims,
        dt: DType,
        data: &MaskData,
        tma: bool,
    ) -> FwdKey {
        FwdKey {
            ord,
            dims: *dims,
            dtype: dt,
            mask: match a.mask {
                MaskArg::Full => None,
                MaskArg::Expr(e) => Some(e.to_string()),
                MaskArg::Blocks {
                    table,
                    tile_q,
                    tile_k,
                    under,
                } => Some(format!(
                    "blocks {tile_q}x{tile_k} {:?} under {under:?}",
                    table.shape
                )),
                // Refused before the CUDA route (`prepared_on_cuda`).
                MaskArg::Prepared(_) => Some("prepared".into()),
            },
            docs: data.key(),
            scale: a.params.scale.map(f32::to_bits),
            softcap: a.params.softcap.map(f32::to_bits),
            tma,
            map: None,
        }
    }

    /// A contiguous device tensor's elements on the host (ids, lengths, block tables): a copy
    /// on the caller's stream, which it synchronises.
    pub(super) fn read<T>(ord: usize, t: &RawTensor, stream: StreamHandle) -> Result<Vec<T>>
    where
        T: cudarc::driver::DeviceRepr + Default + Clone,
    {
        let dev = device(ord)?;
        let s = stream_of(&dev, stream);
        // SAFETY: the entry point's contract: a live allocation of numel elements of T.
        let b = unsafe { Borrowed::<T>::new(&s, t.ptr, t.numel()) };
        s.clone_dtoh(&*b).map_err(crate::cuda::drv("copy to host"))
    }

    pub(super) fn forward_on_device(
        ord: usize,
        q: &TensorView,
        k: &TensorView,
        v: &TensorView,
        mask: MaskArg,
        docs: Option<&DocIds>,
        params: &AttnParams,
    ) -> Result<crate::attention::AttnOutput> {
        use cudarc::driver::DevicePtr;
        let dev = device(ord)?;
        let [b, sq, hq, _] = q.shape;
        let dv = v.shape[3];
        let up = |name: &str, t: &TensorView| DevTensor::upload(&dev, name, t);
        let (qd, kd, vd) = (up("q", q)?, up("k", k)?, up("v", v)?);
        let o = DevTensor::alloc(&dev, [b, sq, hq, dv], q.dtype())?;
        let lse = dev.alloc_f32(b * hq * sq)?;
        let s = dev.stream();
        let raw = |t: &DevTensor| {
            let mut r = RawTensor::contiguous(
                t.data.device_ptr(s).0,
                RawDType::Float(t.dtype),
                &t.shape,
                Device::Cuda(ord),
            );
            r.strides = t.strides;
            r
        };
        let [q_doc, k_doc] = doc_tensors(docs, b, sq, k.shape[1]);
        let a = AttnArgs {
            q: raw(&qd),
            k: raw(&kd),
            v: raw(&vd),
            mask,
            q_doc,
            k_doc,
            params,
        };
        let l = RawTensor::contiguous(
            lse.device_ptr(s).0,
            RawDType::Float(DType::F32),
            &[b, hq, sq],
            Device::Cuda(ord),
        );
        // SAFETY: every device tensor is owned here and outlives the synchronisation below.
        unsafe { super::forward(&a, &raw(&o), &l, 0)? };
        dev.synchronize()?;
        Ok(crate::attention::AttnOutput {
            out: o.download(&dev)?,
            lse: dev.download(&lse)?,
        })
    }

    /// [`super::forward_map`] on the device: a plan that writes the map, launched on the
    /// caller's stream into the caller's `mass` and `max` (zeroed there first).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn forward_map(
        ord: usize,
        a: &AttnArgs,
        dims: &Dims,
        dt: DType,
        out: &RawTensor,
        lse: &RawTensor,
        [mass, max]: [&RawTensor; 2],
        block: usize,
        stream: StreamHandle,
    ) -> Result<()> {
        const OP: &str = "attention map";
        // SAFETY: the entry point's contract.
        let (dev, s, [q, k, v, mut o]) =
            unsafe { tma_inputs(OP, "the pooled attention map", ord, a, out, lse, stream)? };
        let data = mask_data(OP, a, dims, stream)?;
        let mut key = fwd_key(ord, a, dims, dt, &data, true);
        key.map = Some(block);
        let plan = plans().0.get_or(key, || {
            let bm = bind(a, dims, data)?;
            FwdPlan::with_map(&dev, *dims, dt, a.params, spec(&bm), block)
        })?;
        // SAFETY: the entry point's contract (contiguous f32 tensors of the checked shapes).
        let (mut l, mut ms, mut mx) = unsafe {
            (
                Borrowed::<f32>::new(&s, lse.ptr, lse.numel()),
                Borrowed::<f32>::new(&s, mass.ptr, mass.numel()),
                Borrowed::<f32>::new(&s, max.ptr, max.numel()),
            )
        };
        plan.launch_map_on(&s, &q, &k, &v, &mut o, &mut l, &mut ms, &mut mx)
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn forward_gathered(
        ord: usize,
        a: &AttnArgs,
        dims: &Dims,
        dt: DType,
        sel: &crate::sparse::gather::TileKeys,
        out: &RawTensor,
        lse: &RawTensor,
        stream: StreamHandle,
    ) -> Result<()> {
        const OP: &str = "gathered attention";
        // SAFETY: the entry point's contract.
        let (dev, s, [q, k, v, mut o]) =
            unsafe { tma_inputs(OP, "gathered keys", ord, a, out, lse, stream)? };
        let data = mask_data(OP, a, dims, stream)?;
        let bm = bind(a, dims, data)?;
        // Planned per call: the plan holds the lowered selection.
        let plan = FwdPlan::with_gather(&dev, *dims, dt, a.params, spec(&bm), sel)?;
        // SAFETY: the entry point's contract.
        let mut l = unsafe { Borrowed::<f32>::new(&s, lse.ptr, lse.numel()) };
        plan.launch_on(&s, &q, &k, &v, &mut o, &mut l)
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn backward_gathered(
        ord: usize,
        a: &AttnArgs,
        dims: &Dims,
        dt: DType,
        sel: &crate::sparse::gather::TileKeys,
        [out, lse, dout, dq, dk, dv]: [&RawTensor; 6],
        bwd: &BackwardParams,
        stream: StreamHandle,
    ) -> Result<()> {
        const OP: &str = "gathered attention backward";
        f32_contig(OP, "lse", lse)?;
        let dev = device(ord)?;
        let s = stream_of(&dev, stream);
        // SAFETY: the entry point's contract.
        let ([q, k, v, o, d_o], [mut g_q, mut g_k, mut g_v]) =
            unsafe { bwd_tensors(&s, a, [out, dout, dq, dk, dv])? };
        let data = mask_data(OP, a, dims, stream)?;
        let bm = bind(a, dims, data)?;
        // Planned per call: the plan holds the selection's schedule and key bits.
        let plan = BwdPlan::with_gather(&dev, *dims, dt, a.params, spec(&bm), sel, bwd)?;
        // SAFETY: the entry point's contract.
        let l = unsafe { Borrowed::<f32>::new(&s, lse.ptr, lse.numel()) };
        plan.launch_on(&s, &q, &k, &v, &o, &l, &d_o, &mut g_q, &mut g_k, &mut g_v)
    }

    pub(super) fn gather_tiles(ord: usize, a: &AttnArgs, dims: &Dims) -> Result<(usize, usize)> {
        const OP: &str = "gathered attention";
        let dev = device(ord)?;
        let data = mask_data(OP, a, dims, 0)?;
        let bm = bind(a, dims, data)?;
        crate::cuda::gather_tiles(&dev, dims.d, dims.sk, &spec(&bm))
    }

    pub(super) fn forward(
        ord: usize,
        a: &AttnArgs,
        dims: &Dims,
        dt: DType,
        out: &RawTensor,
        lse: &RawTensor,
        stream: StreamHandle,
    ) -> Result<()> {
        f32_contig(FWD, "lse", lse)?;
        let dev = device(ord)?;
        let s = stream_of(&dev, stream);
        // SAFETY: the entry point's contract.
        let (q, k, v, mut o) = unsafe { qkv_out(&s, a, out)? };
        let tma = q.tma_aligned() && k.tma_aligned() && v.tma_aligned();
        let data = mask_data(FWD, a, dims, stream)?;
        let key = fwd_key(ord, a, dims, dt, &data, tma);
        let plan = plans().0.get_or(key, || {
            let bm = bind(a, dims, data)?;
            FwdPlan::with_tma(&dev, *dims, dt, a.params, spec(&bm), tma)
        })?;
        // SAFETY: the entry point's contract.
        let mut l = unsafe { Borrowed::<f32>::new(&s, lse.ptr, lse.numel()) };
        plan.launch_on(&s, &q, &k, &v, &mut o, &mut l)
    }

    #[derive(Hash, PartialEq, Eq)]
    struct SparseKey {
        fwd: FwdKey,
        spec: String,
        stream: u64,
    }

    type SparsePlans = PlanCache<SparseKey, Mutex<crate::sparse::cuda::SparsePlan>>;

    fn sparse_plans() -> &'static SparsePlans {
        static P: OnceLock<SparsePlans> = OnceLock::new();
        P.get_or_init(PlanCache::new)
    }

    type ColumnsPlans = PlanCache<SparseKey, Mutex<crate::sparse::columns::ColumnsPlan>>;

    fn columns_plans() -> &'static ColumnsPlans {
        static P: OnceLock<ColumnsPlans> = OnceLock::new();
        P.get_or_init(PlanCache::new)
    }

    /// The device estimator and the attention through its schedule, on the caller's stream; one
    /// plan (scratch included) per problem, spec and stream (two streams never share scratch).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn sparse_forward(
        ord: usize,
        a: &AttnArgs,
        spec: &crate::sparse::SparseSpec,
        dims: &Dims,
        dt: DType,
        out: &RawTensor,
        lse: &RawTensor,
        stream: StreamHandle,
        report: bool,
    ) -> Result<SparseInfo> {
        const OP: &str = "sparse attention";
        f32_contig(OP, "lse", lse)?;
        let dev = device(ord)?;
        let s = stream_of(&dev, stream);
        // SAFETY: the entry point's contract.
        let (q, k, v, mut o) = unsafe { qkv_out(&s, a, out)? };
        let data = mask_data(OP, a, dims, stream)?;
        let key = SparseKey {
            fwd: fwd_key(ord, a, dims, dt, &data, true),
            spec: spec.to_string(),
            stream,
        };
        let docs = data.docs.clone();
        if matches!(spec.method, crate::sparse::Method::Columns { .. }) {
            // `columns` on the device: the gathered form (sparse::columns).
            let plan = columns_plans().get_or(key, || {
                let bm = bind(a, dims, data)?;
                crate::sparse::columns::ColumnsPlan::new(
                    &dev,
                    *dims,
                    dt,
                    a.params,
                    spec,
                    super::spec(&bm),
                )
                .map(Mutex::new)
            })?;
            let mut plan = plan.lock().unwrap();
            // SAFETY: the entry point's contract.
            let mut l = unsafe { Borrowed::<f32>::new(&s, lse.ptr, lse.numel()) };
            plan.launch_on(&s, &q, &k, &v, &mut o, &mut l)?;
            let tiles = plan.tiles();
            let (density, table) = if report {
                s.synchronize().map_err(crate::cuda::drv("synchronize"))?;
                let bm = bind(a, dims, MaskData { docs, blocks: None })?;
                let rows = match &bm {
                    Resolved::Bound(b) => Some(b as &dyn crate::mask::RowMask),
                    _ => None,
                };
                let sel = plan.selection()?;
                let cand = plan.candidates();
                let (d, t) = crate::sparse::gather::report(&sel, cand, rows, dims.batch, dims.hq)?;
                let shape = [dims.batch, dims.hq, cand.q_tiles, cand.k_tiles];
                (Some(d), Some((t, shape)))
            } else {
                (None, None)
            };
            return Ok(SparseInfo {
                fallback: plan.fallback,
                tiles,
                density,
                table,
                skipped: None,
            });
        }
        let plan = sparse_plans().get_or(key, || {
            let bm = bind(a, dims, data)?;
            crate::sparse::cuda::SparsePlan::new(&dev, *dims, dt, a.params, spec, super::spec(&bm))
                .map(Mutex::new)
        })?;
        let mut plan = plan.lock().unwrap();
        // SAFETY: the entry point's contract.
        let mut l = unsafe { Borrowed::<f32>::new(&s, lse.ptr, lse.numel()) };
        if report {
            // Skip-softmax's counters of this launch alone: earlier launches (on this stream,
            // without a report) are done and their counts dropped.
            s.synchronize().map_err(crate::cuda::drv("synchronize"))?;
            plan.take_skip_stats()?;
        }
        plan.launch_on(&s, &q, &k, &v, &mut o, &mut l)?;
        let (tq, tk) = plan.tiles();
        if !report {
            return Ok(SparseInfo {
                fallback: plan.fallback,
                tiles: (tq, tk),
                density: None,
                table: None,
                skipped: None,
            });
        }
        s.synchronize().map_err(crate::cuda::drv("synchronize"))?;
        let bm = bind(a, dims, MaskData { docs, blocks: None })?;
        let rows = match &bm {
            Resolved::Bound(b) => Some(b as &dyn crate::mask::RowMask),
            _ => None,
        };
        Ok(sparse_info(&plan.selection_after_forward(rows)?, true))
    }

    pub(super) fn backward(
        ord: usize,
        a: &AttnArgs,
        dims: &Dims,
        dt: DType,
        [out, lse, dout, dq, dk, dv]: [&RawTensor; 6],
        bwd: &BackwardParams,
        stream: StreamHandle,
    ) -> Result<()> {
        f32_contig(BWD, "lse", lse)?;
        let dev = device(ord)?;
        let s = stream_of(&dev, stream);
        // SAFETY: the entry point's contract.
        let ([q, k, v, o, d_o], [mut g_q, mut g_k, mut g_v]) =
            unsafe { bwd_tensors(&s, a, [out, dout, dq, dk, dv])? };
        let data = mask_data(BWD, a, dims, stream)?;
        let key = BwdKey {
            fwd: fwd_key(ord, a, dims, dt, &data, true),
            deterministic: bwd.deterministic,
            stream,
        };
        let plan = plans().1.get_or(key, || {
            let bm = bind(a, dims, data)?;
            BwdPlan::new(&dev, *dims, dt, a.params, spec(&bm), bwd)
        })?;
        // SAFETY: the entry point's contract.
        let l = unsafe { Borrowed::<f32>::new(&s, lse.ptr, lse.numel()) };
        plan.launch_on(&s, &q, &k, &v, &o, &l, &d_o, &mut g_q, &mut g_k, &mut g_v)
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn decode(
        ord: usize,
        q: &RawTensor,
        c: &KvCacheArgs,
        out: &RawTensor,
        lse: &RawTensor,
        params: &DecodeParams,
        dt: DType,
        stream: StreamHandle,
    ) -> Result<()> {
        f32_contig(DEC, "lse", lse)?;
        if !out.is_contiguous() {
            return Err(out.shape_err(DEC, "out", "a contiguous tensor".into()));
        }
        let dev = device(ord)?;
        let s = stream_of(&dev, stream);
        let [b, _, hq, d] = q.shape;
        let [_, tokens, hk, _] = c.k.shape;
        let (layout, max_len, max_pages) = match &c.block_table {
            Some(bt) => (
                KvLayout::Paged { page_size: tokens },
                bt.shape[1] * tokens,
                bt.shape[1],
            ),
            None => (KvLayout::Contiguous { seq_cap: tokens }, tokens, 1),
        };
        let key = DecKey {
            ord,
            layout: match layout {
                KvLayout::Paged { page_size } => (1, page_size),
                KvLayout::HeadPaged { page_size } => (2, page_size),
                KvLayout::Contiguous { seq_cap } => (0, seq_cap),
            },
            dtype: dt,
            hk,
            d,
            batch: b,
            hq,
            max_len,
            scale: params.scale.map(f32::to_bits),
            softcap: params.softcap.map(f32::to_bits),
            stream,
        };
        let plan = plans().2.get_or(key, || {
            DecodePlan::for_layout(&dev, layout, (dt, hk, d, b), hq, max_len, params)
        })?;
        let tables = c.block_table.map_or(0, |t| t.ptr);
        // SAFETY: the entry point's contract; shapes were checked by `api::decode`.
        unsafe {
            plan.launch_raw(
                &s,
                crate::cuda::decode::RawDecode {
                    q: q.ptr,
                    k: c.k.ptr,
                    v: c.v.ptr,
                    tables,
                    max_pages,
                    lens: c.seqlens.ptr,
                    o: out.ptr,
                    lse: lse.ptr,
                },
            )
        }
    }
}
