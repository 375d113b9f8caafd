//! Linear attention: a recurrence over a matrix state instead of a softmax over keys.
//!
//! For one sequence and one query head h (key/value head `h / (H / Hk)`, GQA-style sharing):
//!
//! ```text
//!   S_0 = initial_state                                   (K x V, f32)
//!   S_t = diag(a_t) S_{t-1} + phi(k_t)^T v_t               a_t = exp(g_t) in (0, 1]
//!   o_t = scale * phi(q_t) S_t
//! ```
//!
//! with the decay `a_t` given in log space `g_t <= 0`:
//! - none: `g_t = 0` (plain linear attention, Katharopoulos et al. style);
//! - per head: a constant `g_h = ln(gamma_h)` (RetNet / Lightning Attention 2);
//! - per token: `g_t` of shape `[B, T, H]` (simple GLA, Mamba-2 style scalar gate);
//! - per key dimension: `g_t` of shape `[B, T, H, K]` (GLA).
//!
//! The feature map `phi` (identity, elu+1, BASED's second-order Taylor map, a learned Hedgehog map)
//! and the normalisation (`phi(q_t) z_t` denominator with `z_t = a_t z_{t-1} + phi(k_t)`, or
//! TransNormer's norm of the output) wrap this core: every kernel below computes the core only,
//! on features (`K` is the feature dimension after `phi`).
//!
//! - [`reference`]: the f64 recurrent oracle of the core, forward and backward (BPTT).
//! - [`cuda`]: the CUDA kernels of the core (chunked forward and backward, decode step).
//! - [`cpu`]: the chunked CPU form (forward and backward), the fused recurrent form and `step`.
//! - [`feature`]: the feature maps and output normalisations, forward and backward.
//! - [`spec`]: [`LinearSpec`] and its string grammar (`simple_gla(chunk=32)`, `elu+normalized`).
//! - [`entry`]: the public entry points [`linear_attention`], [`linear_attention_backward`] and
//!   [`linear_step`] (the one place that routes to a [`Backend`]).
pub mod cpu;
pub mod cuda;
pub mod entry;
pub mod feature;
pub mod reference;
pub mod spec;
#[cfg(test)]
mod tests;

pub use entry::{
    linear_attention, linear_attention_backward, linear_step, Backend, LinearGrads, LinearInputs,
    LinearOutput,
};
pub use feature::FeatureMap;
pub use spec::{DecaySpec, LinearSpec, Normalization};

use crate::error::{Error, Result};
use crate::tensor::TensorView;

/// The decay of the core recurrence, in log space (`g <= 0`, `a = exp(g)`).
#[derive(Clone, Copy, Debug)]
pub enum Decay<'a> {
    /// `a_t = 1`.
    None,
    /// One log decay per query head, `[H]`.
    PerHead(&'a [f32]),
    /// One log decay per token and query head, `[B, T, H]` contiguous.
    Token(&'a [f32]),
    /// One log decay per token, query head and key (feature) dimension, `[B, T, H, K]` contiguous.
    Gate(&'a [f32]),
}

/// One core problem: features `q [B, T, H, K]`, `k [B, T, Hk, K]`, values `v [B, T, Hk, V]`.
///
/// With `cu_seqlens` (`[N + 1]`, int32, starts at 0, non-decreasing, ends at T) `B` must be 1 and
/// the T tokens hold N independent sequences: the state restarts at every boundary and
/// `initial_state` / the final state are `[N, H, K, V]`; otherwise they are `[B, H, K, V]`.
#[derive(Clone, Copy, Debug)]
pub struct Core<'a> {
    pub q: TensorView<'a>,
    pub k: TensorView<'a>,
    pub v: TensorView<'a>,
    pub decay: Decay<'a>,
    pub scale: f32,
    pub initial_state: Option<&'a [f32]>,
    pub cu_seqlens: Option<&'a [i32]>,
}

/// Sizes of a validated core problem.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CoreDims {
    pub batch: usize,
    pub t: usize,
    pub h: usize,
    pub hk: usize,
    pub k: usize,
    pub v: usize,
    /// Number of sequences (`B`, or `N` with `cu_seqlens`).
    pub seqs: usize,
}

impl CoreDims {
    /// Elements of the state `[seqs, H, K, V]`.
    pub fn state_len(&self) -> usize {
        self.seqs * self.h * self.k * self.v
    }
    /// Token ranges `(batch index, first token, end token, state index)` of every sequence.
    pub fn sequences(&self, cu: Option<&[i32]>) -> Vec<(usize, usize, usize, usize)> {
        match cu {
            Some(cu) => (0..self.seqs)
                .map(|n| (0, cu[n] as usize, cu[n + 1] as usize, n))
                .collect(),
            None => (0..self.batch).map(|b| (b, 0, self.t, b)).collect(),
        }
    }
}

fn shape_err(op: &'static str, tensor: &str, got: &[usize], expected: String) -> Error {
    Error::Shape {
        op,
        tensor: tensor.into(),
        got: got.to_vec(),
        expected,
    }
}

impl<'a> Core<'a> {
    /// Checks every shape, the gate's sign and length, `cu_seqlens` and the initial state.
    pub fn validate(&self, op: &'static str) -> Result<CoreDims> {
        let [b, t, h, kd] = self.q.shape;
        let [kb, kt, hk, kk] = self.k.shape;
        let [vb, vt, vh, vd] = self.v.shape;
        if (kb, kt, kk) != (b, t, kd) || hk == 0 || h % hk != 0 {
            return Err(shape_err(
                op,
                "k",
                &self.k.shape,
                format!(
                    "[{b}, {t}, Hk, {kd}] with Hk dividing H = {h} (q is {:?})",
                    self.q.shape
                ),
            ));
        }
        if (vb, vt, vh) != (b, t, hk) {
            return Err(shape_err(
                op,
                "v",
                &self.v.shape,
                format!("[{b}, {t}, {hk}, V] (matching k {:?})", self.k.shape),
            ));
        }
        if !self.scale.is_finite() {
            return Err(Error::Param {
                op,
                msg: format!("scale must be finite, got {}", self.scale),
            });
        }
        let (g, want, shape): (&[f32], usize, Vec<usize>) = match self.decay {
            Decay::None => (&[], 0, vec![]),
            Decay::PerHead(g) => (g, h, vec![h]),
            Decay::Token(g) => (g, b * t * h, vec![b, t, h]),
            Decay::Gate(g) => (g, b * t * h * kd, vec![b, t, h, kd]),
        };
        if g.len() != want {
            return Err(shape_err(
                op,
                "g",
                &[g.len()],
                format!("{want} elements (shape {shape:?})"),
            ));
        }
        if let Some((i, x)) = g.iter().enumerate().find(|(_, x)| x.is_nan() || **x > 0.0) {
            return Err(Error::Param {
                op,
                msg: format!(
                    "log decay `g` must be finite and <= 0 (a decay in (0, 1]); element {i} is {x}"
                ),
            });
        }
        if let Some((i, x)) = g.iter().enumerate().find(|(_, x)| !x.is_finite()) {
            return Err(Error::NonFinite {
                tensor: "g".into(),
                index: i,
                value: *x,
            });
        }
        let seqs = match self.cu_seqlens {
            None => b,
            Some(cu) => {
                if b != 1 {
                    return Err(shape_err(
                        op,
                        "q",
                        &self.q.shape,
                        "batch 1 with cu_seqlens".into(),
                    ));
                }
                if cu.len() < 2 || cu[0] != 0 || *cu.last().unwrap() as usize != t {
                    return Err(Error::Param {
                        op,
                        msg: format!(
                            "cu_seqlens must start at 0 and end at T = {t} with at least one sequence, got {} entries from {:?} to {:?}",
                            cu.len(),
                            cu.first(),
                            cu.last()
                        ),
                    });
                }
                if let Some(i) = (1..cu.len()).find(|&i| cu[i] < cu[i - 1]) {
                    return Err(Error::Param {
                        op,
                        msg: format!(
                            "cu_seqlens must be non-decreasing: entry {i} is {} after {}",
                            cu[i],
                            cu[i - 1]
                        ),
                    });
                }
                cu.len() - 1
            }
        };
        let dims = CoreDims {
            batch: b,
            t,
            h,
            hk,
            k: kd,
            v: vd,
            seqs,
        };
        if let Some(s) = self.initial_state {
            if s.len() != dims.state_len() {
                return Err(shape_err(
                    op,
                    "initial_state",
                    &[s.len()],
                    format!("[{seqs}, {h}, {kd}, {vd}] = {} elements", dims.state_len()),
                ));
            }
        }
        Ok(dims)
    }

    /// Log decay of token `t` (global token index within batch `b`), head `h`, key dim `i`.
    #[inline]
    pub fn log_decay(&self, dims: &CoreDims, b: usize, t: usize, h: usize, i: usize) -> f32 {
        match self.decay {
            Decay::None => 0.0,
            Decay::PerHead(g) => g[h],
            Decay::Token(g) => g[(b * dims.t + t) * dims.h + h],
            Decay::Gate(g) => g[((b * dims.t + t) * dims.h + h) * dims.k + i],
        }
    }
}
