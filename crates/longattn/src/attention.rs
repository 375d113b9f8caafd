//! The public entry point: validate shapes, resolve the mask to a block schedule, dispatch.
use crate::cpu::{self, Isa};
use crate::error::{Error, Result};
use crate::mask::{BlockSchedule, RowMask};
use crate::tensor::{Tensor, TensorView};

/// Tunables of one attention call. `Default` gives scale 1/sqrt(D), no soft-cap, the best ISA.
#[derive(Clone, Debug, Default)]
pub struct AttnParams {
    /// Multiplier of q.k (default 1/sqrt(D)).
    pub scale: Option<f32>,
    /// Logit soft-cap c: s -> c * tanh(s / c), applied before masking.
    pub softcap: Option<f32>,
    /// Force one CPU instruction-set path (tests); `None` picks the best the CPU has.
    pub isa: Option<Isa>,
    /// Skip-softmax threshold `lambda` in (0, 1) (an approximation, forward only: the CPU
    /// forward, and on the GPU the Hopper warp-specialized kernel, D 64 / 128): a group
    /// of key tiles in which every allowed logit of every row of the query block lies below
    /// the row's running maximum by more than `-ln lambda` (`exp(s - m) < lambda` for all of
    /// them) is dropped without its exponentials, its V reads and its P V. The row's true sum
    /// then misses at most `lambda` per skipped key relative to its largest term. `None`: exact.
    pub skip_below: Option<f32>,
}

impl AttnParams {
    /// Errors when skip-softmax is asked of a path that does not implement it (`what`).
    pub(crate) fn refuse_skip(&self, op: &'static str, what: &str) -> Result<()> {
        match self.skip_below {
            Some(l) => Err(Error::Param {
                op,
                msg: format!(
                    "skip-softmax (skip_below = {l}) is not available {what}: it is an approximation of the forward (CPU, and CUDA's warp-specialized kernel)"
                ),
            }),
            None => Ok(()),
        }
    }

    pub fn scale_for(&self, d: usize) -> f32 {
        self.scale.unwrap_or(1.0 / (d as f32).sqrt())
    }
    pub(crate) fn check(&self) -> Result<()> {
        if let Some(s) = self.scale {
            if !s.is_finite() {
                return Err(Error::Param {
                    op: "attention",
                    msg: format!("scale must be finite, got {s}"),
                });
            }
        }
        if let Some(c) = self.softcap {
            if !(c.is_finite() && c > 0.0) {
                return Err(Error::Param {
                    op: "attention",
                    msg: format!("softcap must be finite and > 0, got {c}"),
                });
            }
        }
        if let Some(l) = self.skip_below {
            if !(l > 0.0 && l < 1.0) {
                return Err(Error::Param {
                    op: "attention",
                    msg: format!("skip_below (skip-softmax lambda) must be in (0, 1), got {l}"),
                });
            }
        }
        Ok(())
    }
}

/// Which (query, key) pairs attend.
#[derive(Clone, Copy)]
pub enum MaskSpec<'a> {
    /// Every pair.
    Full,
    /// A bound mask expression: the kernel builds the schedule with its own tile sizes.
    Expr(&'a crate::mask::BoundMask),
    /// A prepared schedule; Partial tiles need `rows` (the element mask).
    Schedule {
        schedule: &'a BlockSchedule,
        rows: Option<&'a dyn RowMask>,
    },
    /// A mask expression gated by a block map (`mask & gate`, [`BlockSchedule::gated`]):
    /// `schedule` is the expression's schedule at the map's tiles with the map applied, `mask`
    /// the expression (the element mask of its Partial tiles). The CPU reads it as `Schedule`
    /// with `mask` as the row mask; the CUDA kernels as the expression's device program ANDed
    /// with a lookup of the kept tiles.
    Gated {
        mask: &'a crate::mask::BoundMask,
        schedule: &'a BlockSchedule,
    },
}

impl<'a> MaskSpec<'a> {
    /// A gated mask as the schedule and row mask the CPU paths read; every other spec as it is.
    pub fn as_schedule(self) -> MaskSpec<'a> {
        match self {
            MaskSpec::Gated { mask, schedule } => MaskSpec::Schedule {
                schedule,
                rows: Some(mask),
            },
            m => m,
        }
    }
}

/// Output in the input dtype `[B, Sq, Hq, Dv]` and the natural-log LSE `[B, Hq, Sq]` (f32).
#[derive(Clone, Debug)]
pub struct AttnOutput {
    pub out: Tensor,
    pub lse: Vec<f32>,
}

/// Problem sizes after validation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Dims {
    pub batch: usize,
    pub sq: usize,
    pub sk: usize,
    pub hq: usize,
    pub hk: usize,
    pub d: usize,
    pub dv: usize,
}

fn shape_err(op: &'static str, t: &str, got: &[usize; 4], expected: String) -> Error {
    Error::Shape {
        op,
        tensor: t.into(),
        got: got.to_vec(),
        expected,
    }
}

/// Checks that a bound mask was bound to the inputs' batch, Sq and Sk.
pub(crate) fn check_bound(
    op: &'static str,
    bound: &crate::mask::BoundMask,
    dims: &Dims,
) -> Result<()> {
    let s = bound.shape();
    if (s.batch, s.sq, s.sk) == (dims.batch, dims.sq, dims.sk) {
        return Ok(());
    }
    Err(Error::Param {
        op,
        msg: format!(
            "mask `{}` is bound to batch {} / sq {} / sk {}, the inputs have batch {} / sq {} / sk {}",
            bound.expr(),
            s.batch,
            s.sq,
            s.sk,
            dims.batch,
            dims.sq,
            dims.sk
        ),
    })
}

/// Checks q `[B,Sq,Hq,D]`, k `[B,Sk,Hk,D]`, v `[B,Sk,Hk,Dv]`, one dtype, Hq a multiple of Hk.
pub fn validate(op: &'static str, q: &TensorView, k: &TensorView, v: &TensorView) -> Result<Dims> {
    let [b, sq, hq, d] = q.shape;
    let [kb, sk, hk, kd] = k.shape;
    if kb != b || kd != d {
        return Err(shape_err(
            op,
            "k",
            &k.shape,
            format!("[{b}, Sk, Hk, {d}] (batch and head dim of q {:?})", q.shape),
        ));
    }
    let [vb, vs, vh, dv] = v.shape;
    if vb != b || vs != sk || vh != hk {
        return Err(shape_err(
            op,
            "v",
            &v.shape,
            format!(
                "[{b}, {sk}, {hk}, Dv] (batch, seq and heads of k {:?})",
                k.shape
            ),
        ));
    }
    if hq % hk != 0 {
        return Err(shape_err(
            op,
            "q",
            &q.shape,
            format!("query heads {hq} to be a multiple of key/value heads {hk} (GQA/MQA)"),
        ));
    }
    for (name, t) in [("k", k), ("v", v)] {
        if t.dtype() != q.dtype() {
            return Err(Error::DType {
                op,
                tensor: name.into(),
                got: t.dtype().to_string(),
                expected: format!("{} (the dtype of q)", q.dtype()),
            });
        }
    }
    Ok(Dims {
        batch: b,
        sq,
        sk,
        hq,
        hk,
        d,
        dv,
    })
}

/// Block-pooled attention probabilities of one forward, `[B, Hq, q_blocks, k_blocks]` each
/// (blocks of `block` query rows x `block` keys, the last ones shorter): SeerAttention's
/// training target and a sparse estimator's ground truth, from the forward's own scores.
/// With p_ij = exp(s_ij - LSE_i) over the allowed keys (0 elsewhere):
///   mass[qb, kb] = 1/|qb| sum_{i in qb} sum_{j in kb} p_ij   (each query block's row sums to
///                  the share of its rows that have any key: 1, or less with empty rows),
///   max[qb, kb]  = max_{i in qb, j in kb} p_ij                (the 2-D max-pool).
#[derive(Clone, Debug, PartialEq)]
pub struct AttnMap {
    pub block: usize,
    pub batch: usize,
    pub heads: usize,
    pub q_blocks: usize,
    pub k_blocks: usize,
    pub mass: Vec<f32>,
    pub max: Vec<f32>,
}

impl AttnMap {
    /// Index of (b, h, qb, kb) in [`mass`](Self::mass) / [`max`](Self::max).
    pub fn index(&self, b: usize, h: usize, qb: usize, kb: usize) -> usize {
        ((b * self.heads + h) * self.q_blocks + qb) * self.k_blocks + kb
    }
}

/// [`forward`] that also returns the block-pooled attention map ([`AttnMap`]) at `block` x
/// `block` (a multiple of 64, the CPU kernel's key chunk), from the softmax step's own
/// probabilities (one more read of them, no extra exponential or matrix product); the output
/// and LSE are the forward's, bit for bit. With skip-softmax, skipped key groups count 0.
pub fn forward_with_map(
    q: &TensorView,
    k: &TensorView,
    v: &TensorView,
    params: &AttnParams,
    mask: MaskSpec,
    block: usize,
) -> Result<(AttnOutput, AttnMap)> {
    let dims = validate("attention", q, k, v)?;
    params.check()?;
    cpu::forward_map(q, k, v, &dims, params, mask, Some(block))
        .map(|(out, map)| (out, map.expect("a map was asked for")))
}

/// Masked attention forward on the CPU.
///
/// NaN or Inf in q/k/v is not scanned for (that would cost a pass over the inputs): it propagates
/// into the rows it touches. Use [`TensorView::find_non_finite`] (the CLI does) to reject it.
pub fn forward(
    q: &TensorView,
    k: &TensorView,
    v: &TensorView,
    params: &AttnParams,
    mask: MaskSpec,
) -> Result<AttnOutput> {
    let dims = validate("attention", q, k, v)?;
    params.check()?;
    cpu::forward(q, k, v, &dims, params, mask)
}
