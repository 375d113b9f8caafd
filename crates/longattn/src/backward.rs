//! The public backward entry point: validate, then dispatch to the CPU kernel
//! ([`crate::cpu::backward`]). Mirrors [`crate::forward`].
use crate::attention::{validate, AttnParams, Dims, MaskSpec};
use crate::cpu::backward::{self as kernel, BwdInputs};
use crate::error::{Error, Result};
use crate::tensor::{Tensor, TensorView};

/// Options of the backward pass.
#[derive(Clone, Copy, Debug, Default)]
pub struct BackwardParams {
    /// Bit-identical results run to run (and whatever the thread count): dQ is accumulated in
    /// per-range buffers summed in a fixed order. Off (fast mode): dQ is accumulated under locks
    /// in whatever order the threads reach it (differences of a few f32 ulps run to run).
    /// On the GPU the deterministic mode runs two atomic-free passes (S and dP computed twice;
    /// 1.5-1.9x the fast mode's time on an H100) and the fast mode one pass with dQ summed by
    /// bulk reduce-adds (Hopper, D 64 / 128; see `cuda::backward` and docs/PERF.md).
    pub deterministic: bool,
    /// The given `out` and `lse` belong to a larger set of keys than this call's (context
    /// parallelism: the call sees one block of keys of each row's softmax and returns that
    /// block's contributions, P = exp(S - LSE) and D = rowsum(dO o O) taken from the whole row).
    /// Skips the CPU check that each row's probabilities sum to 1, and allows a finite LSE on a
    /// row with no allowed key in this call (its keys lie in other blocks; its gradients here
    /// are 0); the CUDA path has no such checks.
    pub partial_keys: bool,
}

/// Gradients in the input dtype: `dq` `[B, Sq, Hq, D]`, `dk` `[B, Sk, Hk, D]`, `dv`
/// `[B, Sk, Hk, Dv]` (dK/dV summed over the query heads of each group under GQA/MQA).
#[derive(Clone, Debug)]
pub struct Grads {
    pub dq: Tensor,
    pub dk: Tensor,
    pub dv: Tensor,
}

const OP: &str = "attention backward";

/// Gradients of `sum(out * dout)` through masked attention, on the CPU.
///
/// `out` and `lse` are the forward's results for the same q, k, v, params and mask
/// ([`crate::forward`]); `dout` (`do`) has the shape of `out`. Checked: shapes and dtypes (errors
/// name the tensor); the LSE's length; NaN or +inf in the LSE; an LSE of -inf on a row that has
/// allowed keys or a finite LSE on a row that has none; and, during the pass, a probability
/// exp(s - LSE) above 1 (an LSE that belongs to other inputs). A NaN in `dout` is not scanned for:
/// it propagates into dQ of its row and into dK/dV of the keys that row attends (use
/// [`TensorView::find_non_finite`] to reject it first, as the CLI does). Fully masked rows get
/// zero gradients.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    q: &TensorView,
    k: &TensorView,
    v: &TensorView,
    out: &TensorView,
    lse: &[f32],
    dout: &TensorView,
    params: &AttnParams,
    mask: MaskSpec,
    bwd: &BackwardParams,
) -> Result<Grads> {
    let dims = validate_inputs(OP, q, k, v, out, lse, dout)?;
    params.check()?;
    // The forward's skipped groups are not recorded: a backward through them would not be the
    // gradient of that forward.
    params.refuse_skip(OP, "in the backward")?;
    let inp = BwdInputs {
        q,
        k,
        v,
        out,
        dout,
        lse,
    };
    kernel::backward(&inp, &dims, params, mask, bwd)
}

/// Checks q, k, v and the backward's other inputs: `out` and `do` shaped and typed as the
/// forward's output, the LSE's length (errors name the tensor). Shared by the CPU and CUDA paths.
pub(crate) fn validate_inputs(
    op: &'static str,
    q: &TensorView,
    k: &TensorView,
    v: &TensorView,
    out: &TensorView,
    lse: &[f32],
    dout: &TensorView,
) -> Result<Dims> {
    let dims = validate(op, q, k, v)?;
    let want = [dims.batch, dims.sq, dims.hq, dims.dv];
    for (name, t) in [("out", out), ("do", dout)] {
        if t.shape != want {
            return Err(Error::Shape {
                op,
                tensor: name.into(),
                got: t.shape.to_vec(),
                expected: format!(
                    "{want:?} ([B, Sq, Hq, Dv] of q {:?} and v {:?})",
                    q.shape, v.shape
                ),
            });
        }
        if t.dtype() != q.dtype() {
            return Err(Error::DType {
                op,
                tensor: name.into(),
                got: t.dtype().to_string(),
                expected: format!("{} (the dtype of q)", q.dtype()),
            });
        }
    }
    let n_lse = dims.batch * dims.hq * dims.sq;
    if lse.len() != n_lse {
        return Err(Error::Shape {
            op,
            tensor: "lse".into(),
            got: vec![lse.len()],
            expected: format!(
                "{n_lse} values ([B, Hq, Sq] = [{}, {}, {}])",
                dims.batch, dims.hq, dims.sq
            ),
        });
    }
    Ok(dims)
}
