//! The CPU forms of the core recurrence in f32: the chunked form (forward and backward), the fused
//! recurrent form for short sequences, and the one-token decode `step`.
//!
//! ## Chunked forward
//!
//! Each sequence is cut into chunks of `C` tokens **starting at the sequence's first token** (so a
//! `cu_seqlens` boundary never falls inside a chunk: the chunks of one sequence never see another's
//! tokens or state). Inside a chunk of `L <= C` tokens (local index `t = 0..L`), with `S_0` the state
//! at the chunk's start and `b_t = g_0 + ... + g_t` the inclusive cumulative log decay (a scalar or
//! a `K`-vector; `b` is non-increasing because `g <= 0`):
//!
//! ```text
//!   S_t = diag(e^{b_t}) S_0 + sum_{s <= t} diag(e^{b_t - b_s}) k_s^T v_s
//!   o_t = scale * [ (q_t ⊙ e^{b_t}) S_0  +  sum_{s <= t} A_ts v_s ]
//!   A_ts = sum_i q_t[i] k_s[i] e^{b_t[i] - b_s[i]}                  (s <= t, else 0)
//!   S_L = diag(e^{b_L}) S_0 + (K ⊙ e^{b_L - b})^T V                  (the state passed on)
//! ```
//!
//! Every exponent above is `<= 0` (`b_t - b_s <= 0` for `s <= t`), so nothing overflows however
//! strong the decay (a per-step log decay of -20 underflows to exact zeros instead of inf * 0).
//! The cumulative sums are kept in f64 so that `b_t - b_s` keeps its precision when `b` is large.
//! - Scalar decays (none, per head, per token): `A = (Q K^T) ⊙ D` with `D_ts = e^{b_t - b_s}` built
//!   element by element (`C^2` exponentials per chunk), `Q K^T` one matrix product.
//! - Per-key-dimension gates: the decay sits inside the sum over `i`, so `A` is not a masked matrix
//!   product. The chunk is split into sub-blocks of [`SUB`] tokens; for the queries of sub-block
//!   `[a0, a1)` and all keys `s < a0`, pick the reference token `r = a0 - 1` (so `s <= r < t`):
//!   `e^{b_t - b_s} = e^{b_t - b_r} e^{b_r - b_s}`, both factors `<= 1`, and
//!   `A[a0..a1, 0..a0] = (Q ⊙ e^{b - b_r}) (K ⊙ e^{b_r - b})^T` is one matrix product. The diagonal
//!   sub-blocks (`a0 <= s <= t < a1`) take the exponentials element by element.
//!
//! The matrix products go through the `gemm` crate (run-time SIMD dispatch); the (sequence, head)
//! pairs run in parallel on the current rayon pool.
//!
//! ## Chunked backward
//!
//! A forward pass first records the state at every chunk start. Then, chunk by chunk from the end,
//! with `dS` the gradient reaching the state at the chunk's end (the final-state gradient for the
//! last chunk) and `M_ts = scale * do_t . v_s` (`s <= t`):
//!
//! ```text
//!   dV    = scale * A^T dO + (K ⊙ e^{b_L - b}) dS
//!   dq_t  = sum_{s <= t} M_ts k_s ⊙ e^{b_t - b_s}  +  scale * e^{b_t} ⊙ (do_t S_0^T)
//!   dk_s  = sum_{t >= s} M_ts q_t ⊙ e^{b_t - b_s}  +  e^{b_L - b_s} ⊙ (v_s dS^T)
//!   dS_0  = diag(e^{b_L}) dS + scale * (Q ⊙ e^{b})^T dO               (the previous chunk's dS)
//! ```
//!
//! (the first two sums are `(M ⊙ D) K` and `(M ⊙ D)^T Q` for scalar decays, and the same sub-block
//! factorization as the forward for gates). `dS_0` of the first chunk is `d_initial_state`.
//!
//! **Decay gradient** (log space). With `B_t` the cumulative log decay from the sequence's start,
//! the forward only depends on `B` through `q_t ⊙ e^{B_t}`, `k_s ⊙ e^{-B_s}` and the factor
//! `diag(e^{B_T})` of the final state `S_T`. Hence (for one query head, `dk` its own share of the
//! key gradient before the GQA sum, `dS_T` the final-state gradient)
//!
//! ```text
//!   dL/dB_t[i] = q_t[i] dq_t[i] - k_t[i] dk_t[i]  (+ sum_j dS_T[i,j] S_T[i,j] at the last token)
//!   dg_t[i]    = sum_{t' >= t} dL/dB_{t'}[i]                       (reverse cumulative sum)
//! ```
//!
//! summed over `i` for a per-token scalar decay. No `e^{-B}` is ever formed.
//!
//! ## Recurrent forms
//!
//! [`forward_recurrent`] runs `S_t = diag(a_t) S_{t-1} + k_t^T v_t`, `o_t = scale q_t S_t` token by
//! token in f32 (the oracle's structure): cheaper than chunking for a few tokens. [`step`] is its
//! decode form: one token of `B` sequences against a state `[B, H, K, V]` updated in place.
use super::{Core, CoreDims, Decay};
use crate::error::{Error, Result};
use crate::tensor::{Element, Slice, TensorView};
use half::{bf16, f16};
use rayon::prelude::*;

/// Default chunk length of the chunked form.
pub const DEFAULT_CHUNK: usize = 64;
/// Sub-block length of the per-key-dimension gate's intra-chunk products.
pub const SUB: usize = 16;
/// Fast path bound: when a chunk's total log decay `-b_L` is at most this in every dimension,
/// `e^{b_t - b_s} = e^{b_t} e^{-b_s}` is formed from per-token factors in `[e^-60, e^60]` (no
/// overflow, no subnormal in f32) and `A = (Q ⊙ e^{b}) (K ⊙ e^{-b})^T` is one masked product, for
/// scalar decays and gates alike; stronger decays take the element-wise / sub-block forms.
pub const FAST_SPAN: f64 = 60.0;
/// Largest accepted chunk length (the chunk's `C x C` scratch is allocated per task).
pub const MAX_CHUNK: usize = 4096;

/// Core forward result: `out [B, T, H, V]` and the final state `[seqs, H, K, V]`, both f32.
#[derive(Clone, Debug)]
pub struct CoreOutput {
    pub out: Vec<f32>,
    pub state: Vec<f32>,
    pub dims: CoreDims,
}

/// Core gradients, shaped like their inputs (contiguous f32): `dq [B, T, H, K]`,
/// `dk [B, T, Hk, K]`, `dv [B, T, Hk, V]`, `dg` like the decay (`None` for none / per head),
/// `d_initial_state [seqs, H, K, V]`.
#[derive(Clone, Debug)]
pub struct CoreGrads {
    pub dq: Vec<f32>,
    pub dk: Vec<f32>,
    pub dv: Vec<f32>,
    pub dg: Option<Vec<f32>>,
    pub d_initial_state: Vec<f32>,
}

pub(crate) fn check_chunk(op: &'static str, chunk: usize) -> Result<()> {
    if chunk == 0 || chunk > MAX_CHUNK {
        return Err(Error::Param {
            op,
            msg: format!("chunk must be in 1..={MAX_CHUNK}, got {chunk}"),
        });
    }
    Ok(())
}

/// `dst [m, n]` (row-major, row stride `ldd`) `(+)= beta * lhs [m, k] rhs [k, n]`, where `lhs` and
/// `rhs` are given by element strides `(row, col)`. Bounds are checked before the unsafe call.
#[allow(clippy::too_many_arguments)]
fn mm(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    ldd: usize,
    accumulate: bool,
    lhs: &[f32],
    (lrs, lcs): (usize, usize),
    rhs: &[f32],
    (rrs, rcs): (usize, usize),
    beta: f32,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for r in 0..m {
                dst[r * ldd..r * ldd + n].fill(0.0);
            }
        }
        return;
    }
    assert!(n <= ldd && (m - 1) * ldd + n <= dst.len(), "mm: dst bounds");
    assert!((m - 1) * lrs + (k - 1) * lcs < lhs.len(), "mm: lhs bounds");
    assert!((k - 1) * rrs + (n - 1) * rcs < rhs.len(), "mm: rhs bounds");
    // SAFETY: the asserts above bound every element gemm addresses (dst: rows < m with stride ldd,
    // columns < n; lhs and rhs: their strides times their extents); dst is a distinct &mut slice,
    // so it aliases neither input.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            ldd as isize,
            accumulate,
            lhs.as_ptr(),
            lcs as isize,
            lrs as isize,
            rhs.as_ptr(),
            rcs as isize,
            rrs as isize,
            1.0,
            beta,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// Output rows `[B, T, H, V]` shared by the (sequence, head) tasks: each task writes only the rows
/// `(b, t, h)` of its own sequence and head, so the writes of different tasks never overlap.
#[derive(Clone, Copy)]
struct SharedOut {
    ptr: *mut f32,
    len: usize,
}

// SAFETY: the pointer is only written through `mm_out`, at elements that belong to one task (see
// the type's documentation); the buffer outlives the parallel section that uses it.
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

/// `out[off + r * ldd + j] (+)= beta * (lhs rhs)[r, j]` for `r < m`, `j < n`.
#[allow(clippy::too_many_arguments)]
fn mm_out(
    (m, n, k): (usize, usize, usize),
    out: SharedOut,
    off: usize,
    ldd: usize,
    accumulate: bool,
    lhs: &[f32],
    (lrs, lcs): (usize, usize),
    rhs: &[f32],
    (rrs, rcs): (usize, usize),
    beta: f32,
) {
    if m == 0 || n == 0 || k == 0 {
        return;
    }
    assert!(
        n <= ldd && off + (m - 1) * ldd + n <= out.len,
        "mm_out: dst bounds"
    );
    assert!(
        (m - 1) * lrs + (k - 1) * lcs < lhs.len(),
        "mm_out: lhs bounds"
    );
    assert!(
        (k - 1) * rrs + (n - 1) * rcs < rhs.len(),
        "mm_out: rhs bounds"
    );
    // SAFETY: bounds checked above; the rows written belong to the calling task only (SharedOut),
    // and the inputs are distinct buffers of the task.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.ptr.add(off),
            1,
            ldd as isize,
            accumulate,
            lhs.as_ptr(),
            lcs as isize,
            lrs as isize,
            rhs.as_ptr(),
            rcs as isize,
            rrs as isize,
            1.0,
            beta,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// Copies rows `t0 .. t0 + n` of head `h` of batch row `b` into `dst [n, dim]` as f32.
fn load(view: &TensorView, b: usize, t0: usize, n: usize, h: usize, dst: &mut [f32]) {
    fn go<T: Element>(x: &[T], view: &TensorView, b: usize, t0: usize, h: usize, dst: &mut [f32]) {
        let d = view.shape[3];
        let sd = view.strides[3];
        for (r, row) in dst.chunks_exact_mut(d).enumerate() {
            let o = view.offset(b, t0 + r, h, 0);
            if sd == 1 {
                for (y, x) in row.iter_mut().zip(&x[o..o + d]) {
                    *y = x.to_f32();
                }
            } else {
                for (i, y) in row.iter_mut().enumerate() {
                    *y = x[o + i * sd].to_f32();
                }
            }
        }
    }
    let dst = &mut dst[..n * view.shape[3]];
    match view.data {
        Slice::F32(x) => go::<f32>(x, view, b, t0, h, dst),
        Slice::BF16(x) => go::<bf16>(x, view, b, t0, h, dst),
        Slice::F16(x) => go::<f16>(x, view, b, t0, h, dst),
    }
}

/// Width of the decay: 1 for scalar decays, `K` for per-key-dimension gates.
fn decay_width(c: &Core, d: &CoreDims) -> usize {
    match c.decay {
        Decay::Gate(_) => d.k,
        _ => 1,
    }
}

/// Inclusive cumulative log decay of the chunk `[t0, t0 + l)` of batch row `b`, head `h`, in f64:
/// `bc [l, w]`.
fn cumulative(c: &Core, d: &CoreDims, b: usize, t0: usize, l: usize, h: usize, bc: &mut [f64]) {
    let w = decay_width(c, d);
    let mut acc = vec![0.0f64; w];
    for t in 0..l {
        for (i, a) in acc.iter_mut().enumerate() {
            *a += c.log_decay(d, b, t0 + t, h, i) as f64;
        }
        bc[t * w..(t + 1) * w].copy_from_slice(&acc);
    }
}

/// Scratch and the per-chunk math shared by the forward and the backward of one (sequence, head).
struct Chunk {
    c: usize,
    k: usize,
    v: usize,
    /// Decay width (1 or K).
    w: usize,
    q: Vec<f32>,
    kc: Vec<f32>,
    vc: Vec<f32>,
    /// Cumulative log decay `[C, w]`.
    b: Vec<f64>,
    /// Intra-chunk scores `A [C, C]` (decayed, causal, unscaled).
    a: Vec<f32>,
    /// `Q ⊙ e^{b}` and `K ⊙ e^{b_L - b}`, `[C, K]`.
    qs: Vec<f32>,
    kh: Vec<f32>,
    /// Sub-block scratch for gates.
    qt: Vec<f32>,
    kt: Vec<f32>,
    /// `K ⊙ e^{-b}` `[C, K]` (the fast path only).
    kneg: Vec<f32>,
    /// Per-token factors `[C, w]` (f32): `e^{b}`, `e^{b_L - b}`, `e^{-b}` (the last: fast path only).
    eb: Vec<f32>,
    ebl: Vec<f32>,
    ebn: Vec<f32>,
    /// Whether this chunk takes the fast path (`-b_L <= FAST_SPAN` in every dimension).
    fast: bool,
}

impl Chunk {
    fn new(c: usize, d: &CoreDims, w: usize) -> Chunk {
        Chunk {
            c,
            k: d.k,
            v: d.v,
            w,
            q: vec![0.0; c * d.k],
            kc: vec![0.0; c * d.k],
            vc: vec![0.0; c * d.v],
            b: vec![0.0; c * w],
            a: vec![0.0; c * c],
            qs: vec![0.0; c * d.k],
            kh: vec![0.0; c * d.k],
            qt: vec![0.0; SUB * d.k],
            kt: vec![0.0; c * d.k],
            kneg: vec![0.0; c * d.k],
            eb: vec![0.0; c * w],
            ebl: vec![0.0; c * w],
            ebn: vec![0.0; c * w],
            fast: false,
        }
    }

    /// Element `(t, i)` of a per-token factor `[C, w]`.
    #[inline]
    fn at(&self, x: &[f32], t: usize, i: usize) -> f32 {
        if self.w == 1 {
            x[t]
        } else {
            x[t * self.w + i]
        }
    }

    #[inline]
    fn bv(&self, t: usize, i: usize) -> f64 {
        if self.w == 1 {
            self.b[t]
        } else {
            self.b[t * self.w + i]
        }
    }

    /// Loads the chunk `[t0, t0 + l)` and computes `b`, `A`, `Q ⊙ e^{b}`, `K ⊙ e^{b_L - b}`.
    fn prepare(&mut self, core: &Core, d: &CoreDims, bi: usize, t0: usize, l: usize, h: usize) {
        let hk = h / (d.h / d.hk);
        let (kd, c) = (self.k, self.c);
        load(&core.q, bi, t0, l, h, &mut self.q);
        load(&core.k, bi, t0, l, hk, &mut self.kc);
        load(&core.v, bi, t0, l, hk, &mut self.vc);
        cumulative(core, d, bi, t0, l, h, &mut self.b);
        let span = (0..self.w).fold(0.0f64, |a, i| a.max(-self.b[(l - 1) * self.w + i]));
        self.fast = span <= FAST_SPAN;
        let w = self.w;
        for t in 0..l {
            for j in 0..w {
                let bt = self.b[t * w + j];
                self.eb[t * w + j] = bt.exp() as f32;
                self.ebl[t * w + j] = (self.b[(l - 1) * w + j] - bt).exp() as f32;
                if self.fast {
                    self.ebn[t * w + j] = (-bt).exp() as f32;
                }
            }
        }
        for t in 0..l {
            let r = t * kd..(t + 1) * kd;
            let (q, kc) = (&self.q[r.clone()], &self.kc[r.clone()]);
            let (qs, kh, kn) = (
                &mut self.qs[r.clone()],
                &mut self.kh[r.clone()],
                &mut self.kneg[r],
            );
            if w == 1 {
                let (e, el, en) = (self.eb[t], self.ebl[t], self.ebn[t]);
                for i in 0..kd {
                    qs[i] = q[i] * e;
                    kh[i] = kc[i] * el;
                    kn[i] = kc[i] * en;
                }
            } else {
                let o = t * w;
                for i in 0..kd {
                    qs[i] = q[i] * self.eb[o + i];
                    kh[i] = kc[i] * self.ebl[o + i];
                    kn[i] = kc[i] * self.ebn[o + i];
                }
            }
        }
        if self.fast {
            // A = (Q ⊙ e^{b}) (K ⊙ e^{-b})^T, causal: every factor within [e^-FAST_SPAN, e^FAST_SPAN].
            mm(
                (l, l, kd),
                &mut self.a,
                c,
                false,
                &self.qs,
                (kd, 1),
                &self.kneg,
                (1, kd),
                1.0,
            );
            for t in 0..l {
                self.a[t * c + t + 1..t * c + l].fill(0.0);
            }
        } else if self.w == 1 {
            // A = (Q K^T) ⊙ D, D_ts = e^{b_t - b_s} for s <= t.
            mm(
                (l, l, kd),
                &mut self.a,
                c,
                false,
                &self.q,
                (kd, 1),
                &self.kc,
                (1, kd),
                1.0,
            );
            for t in 0..l {
                let bt = self.b[t];
                let row = &mut self.a[t * c..t * c + l];
                for (s, x) in row.iter_mut().enumerate() {
                    *x = if s <= t {
                        *x * ((bt - self.b[s]).exp() as f32)
                    } else {
                        0.0
                    };
                }
            }
        } else {
            for a0 in (0..l).step_by(SUB) {
                let a1 = (a0 + SUB).min(l);
                for t in a0..a1 {
                    self.a[t * c..t * c + l].fill(0.0);
                }
                if a0 > 0 {
                    let r = a0 - 1;
                    self.ref_scaled(a0, a1, r);
                    mm(
                        (a1 - a0, a0, kd),
                        &mut self.a[a0 * c..],
                        c,
                        false,
                        &self.qt,
                        (kd, 1),
                        &self.kt,
                        (1, kd),
                        1.0,
                    );
                }
                for t in a0..a1 {
                    for s in a0..=t {
                        let mut acc = 0.0f32;
                        for i in 0..kd {
                            let e = (self.b[t * kd + i] - self.b[s * kd + i]).exp() as f32;
                            acc += self.q[t * kd + i] * self.kc[s * kd + i] * e;
                        }
                        self.a[t * c + s] = acc;
                    }
                }
            }
        }
    }

    /// Gate sub-block factors around reference token `r`: `qt = Q[a0..a1] ⊙ e^{b - b_r}`,
    /// `kt = K[0..a0] ⊙ e^{b_r - b}` (both exponents `<= 0`).
    fn ref_scaled(&mut self, a0: usize, a1: usize, r: usize) {
        let kd = self.k;
        for t in a0..a1 {
            for i in 0..kd {
                let e = (self.b[t * kd + i] - self.b[r * kd + i]).exp() as f32;
                self.qt[(t - a0) * kd + i] = self.q[t * kd + i] * e;
            }
        }
        for s in 0..a0 {
            for i in 0..kd {
                let e = (self.b[r * kd + i] - self.b[s * kd + i]).exp() as f32;
                self.kt[s * kd + i] = self.kc[s * kd + i] * e;
            }
        }
    }

    /// `o [l, V] = scale * (Qs S_0 + A V)`, written into the rows of `out` from `off` with row
    /// stride `ldd`.
    fn output(&self, l: usize, s0: &[f32], scale: f32, out: SharedOut, off: usize, ldd: usize) {
        let (kd, vd, c) = (self.k, self.v, self.c);
        let qs = (kd, 1);
        mm_out(
            (l, vd, kd),
            out,
            off,
            ldd,
            false,
            &self.qs,
            qs,
            s0,
            (vd, 1),
            scale,
        );
        mm_out(
            (l, vd, l),
            out,
            off,
            ldd,
            true,
            &self.a,
            (c, 1),
            &self.vc,
            (vd, 1),
            scale,
        );
    }

    /// `S <- diag(e^{b_L}) S + (K ⊙ e^{b_L - b})^T V`.
    fn advance(&self, l: usize, s: &mut [f32]) {
        let (kd, vd) = (self.k, self.v);
        for i in 0..kd {
            let f = self.bv(l - 1, i).exp() as f32;
            for x in &mut s[i * vd..(i + 1) * vd] {
                *x *= f;
            }
        }
        mm(
            (kd, vd, l),
            s,
            vd,
            true,
            &self.kh,
            (1, kd),
            &self.vc,
            (vd, 1),
            1.0,
        );
    }
}

/// The initial state of (sequence `n`, head `h`), or zeros.
fn initial(c: &Core, d: &CoreDims, n: usize, h: usize) -> Vec<f32> {
    let kv = d.k * d.v;
    match c.initial_state {
        Some(s0) => s0[(n * d.h + h) * kv..][..kv].to_vec(),
        None => vec![0.0; kv],
    }
}

/// One (sequence, head) of the chunked forward: writes its output rows into `out` (when given)
/// and returns its final state; `starts` (when given) receives the state at every chunk's start.
fn forward_head(
    core: &Core,
    d: &CoreDims,
    (bi, t0, t1, n): (usize, usize, usize, usize),
    h: usize,
    chunk: usize,
    out: Option<SharedOut>,
    mut starts: Option<&mut Vec<f32>>,
) -> Vec<f32> {
    let mut s = initial(core, d, n, h);
    let mut ch = Chunk::new(chunk.min((t1 - t0).max(1)), d, decay_width(core, d));
    let mut c0 = t0;
    while c0 < t1 {
        let l = chunk.min(t1 - c0);
        if let Some(st) = starts.as_deref_mut() {
            st.extend_from_slice(&s);
        }
        ch.prepare(core, d, bi, c0, l, h);
        if let Some(out) = out {
            let off = ((bi * d.t + c0) * d.h + h) * d.v;
            ch.output(l, &s, core.scale, out, off, d.h * d.v);
        }
        ch.advance(l, &mut s);
        c0 += l;
    }
    s
}

fn tasks(d: &CoreDims, cu: Option<&[i32]>) -> Vec<((usize, usize, usize, usize), usize)> {
    d.sequences(cu)
        .into_iter()
        .flat_map(|seq| (0..d.h).map(move |h| (seq, h)))
        .collect()
}

/// The chunked forward of the core (see the module header).
pub fn forward_chunked(core: &Core, chunk: usize) -> Result<CoreOutput> {
    const OP: &str = "linear::cpu::forward_chunked";
    let d = core.validate(OP)?;
    check_chunk(OP, chunk)?;
    let mut out = vec![0.0f32; d.batch * d.t * d.h * d.v];
    let shared = SharedOut {
        ptr: out.as_mut_ptr(),
        len: out.len(),
    };
    let states: Vec<_> = tasks(&d, core.cu_seqlens)
        .into_par_iter()
        .map(|(seq, h)| {
            (
                seq.3,
                h,
                forward_head(core, &d, seq, h, chunk, Some(shared), None),
            )
        })
        .collect();
    let kv = d.k * d.v;
    let mut state = vec![0.0f32; d.state_len()];
    for (n, h, s) in states {
        state[(n * d.h + h) * kv..][..kv].copy_from_slice(&s);
    }
    Ok(CoreOutput {
        out,
        state,
        dims: d,
    })
}

/// The final state `[seqs, H, K, V]` of the chunked forward alone (the chunks' state updates,
/// no output rows): what context parallelism's state passing needs of one rank's tokens.
pub fn final_state_chunked(core: &Core, chunk: usize) -> Result<Vec<f32>> {
    const OP: &str = "linear::cpu::final_state_chunked";
    let d = core.validate(OP)?;
    check_chunk(OP, chunk)?;
    let states: Vec<_> = tasks(&d, core.cu_seqlens)
        .into_par_iter()
        .map(|(seq, h)| (seq.3, h, forward_head(core, &d, seq, h, chunk, None, None)))
        .collect();
    let kv = d.k * d.v;
    let mut state = vec![0.0f32; d.state_len()];
    for (n, h, s) in states {
        state[(n * d.h + h) * kv..][..kv].copy_from_slice(&s);
    }
    Ok(state)
}

/// The gradient of the initial state `[seqs, H, K, V]` that the output gradient
/// `dout [B, T, H, V]` alone gives (the final state's gradient zero), per (sequence, head):
///   dS_0 = scale sum_t diag(e^{B_t}) q_t^T do_t,   B_t = g_0 + .. + g_t
/// (the chunked backward's `dS_0` with `dS = 0` at the end, in f64). The whole `dS_0` is this
/// plus `diag(e^{B_T}) dS_T`: context parallelism's state passing runs that sum across ranks.
pub fn initial_state_grad(core: &Core, dout: &[f32]) -> Result<Vec<f32>> {
    const OP: &str = "linear::cpu::initial_state_grad";
    let d = core.validate(OP)?;
    let want = d.batch * d.t * d.h * d.v;
    if dout.len() != want {
        return Err(Error::Shape {
            op: OP,
            tensor: "dout".into(),
            got: vec![dout.len()],
            expected: format!("[{}, {}, {}, {}] = {want} elements", d.batch, d.t, d.h, d.v),
        });
    }
    let w = decay_width(core, &d);
    let (kd, vd) = (d.k, d.v);
    let grads: Vec<_> = tasks(&d, core.cu_seqlens)
        .into_par_iter()
        .map(|((bi, t0, t1, n), h)| {
            let l = t1 - t0;
            let mut q = vec![0.0f32; l * kd];
            load(&core.q, bi, t0, l, h, &mut q);
            let mut bc = vec![0.0f64; l * w];
            cumulative(core, &d, bi, t0, l, h, &mut bc);
            let mut acc = vec![0.0f64; kd * vd];
            for t in 0..l {
                let o = &dout[((bi * d.t + t0 + t) * d.h + h) * vd..][..vd];
                for i in 0..kd {
                    let e = bc[t * w + if w == 1 { 0 } else { i }].exp();
                    let x = core.scale as f64 * q[t * kd + i] as f64 * e;
                    for (a, &y) in acc[i * vd..][..vd].iter_mut().zip(o) {
                        *a += x * y as f64;
                    }
                }
            }
            (n, h, acc)
        })
        .collect();
    let kv = kd * vd;
    let mut ds = vec![0.0f32; d.state_len()];
    for (n, h, acc) in grads {
        for (y, x) in ds[(n * d.h + h) * kv..][..kv].iter_mut().zip(&acc) {
            *y = *x as f32;
        }
    }
    Ok(ds)
}

/// A sequence `(batch row, first token, end token, state index)`.
type Seq = (usize, usize, usize, usize);
/// One task's result of the recurrent form: its sequence, head, output rows and final state.
type HeadResult = (Seq, usize, (Vec<f32>, Vec<f32>));

/// Scatters per-(sequence, head) output rows and final states into `out` and the state.
fn assemble(d: &CoreDims, results: Vec<HeadResult>) -> CoreOutput {
    let (kv, vd) = (d.k * d.v, d.v);
    let mut out = vec![0.0f32; d.batch * d.t * d.h * vd];
    let mut state = vec![0.0f32; d.state_len()];
    for ((bi, t0, _, n), h, (o, s)) in results {
        for (r, row) in o.chunks_exact(vd).enumerate() {
            out[((bi * d.t + t0 + r) * d.h + h) * vd..][..vd].copy_from_slice(row);
        }
        state[(n * d.h + h) * kv..][..kv].copy_from_slice(&s);
    }
    CoreOutput {
        out,
        state,
        dims: *d,
    }
}

/// Per-(sequence, head) gradients before the GQA reduction.
struct HeadGrads {
    dq: Vec<f32>,
    dk: Vec<f32>,
    dv: Vec<f32>,
    /// `dg [len, w]` (already reverse-summed), when the decay has a gradient.
    dg: Option<Vec<f32>>,
    d0: Vec<f32>,
}

#[allow(clippy::too_many_arguments)]
fn backward_head(
    core: &Core,
    d: &CoreDims,
    seq: (usize, usize, usize, usize),
    h: usize,
    chunk: usize,
    dout: &[f32],
    d_final: Option<&[f32]>,
    want_dg: bool,
) -> HeadGrads {
    let (bi, t0, t1, n) = seq;
    let (kd, vd, kv) = (d.k, d.v, d.k * d.v);
    let len = t1 - t0;
    let mut starts = Vec::new();
    let s_fin = forward_head(core, d, seq, h, chunk, None, Some(&mut starts));
    let c = chunk.min(len.max(1));
    let mut ch = Chunk::new(c, d, decay_width(core, d));
    let w = ch.w;
    let mut dq = vec![0.0f32; len * kd];
    let mut dk = vec![0.0f32; len * kd];
    let mut dv = vec![0.0f32; len * vd];
    let mut db = vec![0.0f64; if want_dg { len * w } else { 0 }];
    let mut ds = match d_final {
        Some(f) => f[(n * d.h + h) * kv..][..kv].to_vec(),
        None => vec![0.0f32; kv],
    };
    if want_dg && len > 0 {
        // The final state's factor diag(e^{B_T}): dL/dB_T[i] += sum_j dS_T[i,j] S_T[i,j].
        for i in 0..kd {
            let x: f64 = (0..vd)
                .map(|j| ds[i * vd + j] as f64 * s_fin[i * vd + j] as f64)
                .sum();
            db[(len - 1) * w + if w == 1 { 0 } else { i }] += x;
        }
    }
    let mut do_c = vec![0.0f32; c * vd];
    let mut m = vec![0.0f32; c * c];
    let mut tmp = vec![0.0f32; c * kd];
    let scale = core.scale;
    let nchunks = starts.len() / kv.max(1);
    for ci in (0..nchunks).rev() {
        let c0 = t0 + ci * chunk;
        let l = chunk.min(t1 - c0);
        let lo = c0 - t0;
        let s0 = &starts[ci * kv..(ci + 1) * kv];
        ch.prepare(core, d, bi, c0, l, h);
        for t in 0..l {
            do_c[t * vd..(t + 1) * vd]
                .copy_from_slice(&dout[((bi * d.t + c0 + t) * d.h + h) * vd..][..vd]);
        }
        let dvc = &mut dv[lo * vd..(lo + l) * vd];
        // dV = scale * A^T dO + Kh dS
        mm(
            (l, vd, l),
            dvc,
            vd,
            false,
            &ch.a,
            (1, c),
            &do_c,
            (vd, 1),
            scale,
        );
        mm(
            (l, vd, kd),
            dvc,
            vd,
            true,
            &ch.kh,
            (kd, 1),
            &ds,
            (vd, 1),
            1.0,
        );
        // M = scale * dO V^T, causal.
        mm(
            (l, l, vd),
            &mut m,
            c,
            false,
            &do_c,
            (vd, 1),
            &ch.vc,
            (1, vd),
            scale,
        );
        let dqc = &mut dq[lo * kd..(lo + l) * kd];
        let dkc = &mut dk[lo * kd..(lo + l) * kd];
        if ch.fast {
            // dQ = (M (K ⊙ e^{-b})) ⊙ e^{b}, dK = (M^T (Q ⊙ e^{b})) ⊙ e^{-b}
            for t in 0..l {
                m[t * c + t + 1..t * c + l].fill(0.0);
            }
            mm(
                (l, kd, l),
                dqc,
                kd,
                false,
                &m,
                (c, 1),
                &ch.kneg,
                (kd, 1),
                1.0,
            );
            mm((l, kd, l), dkc, kd, false, &m, (1, c), &ch.qs, (kd, 1), 1.0);
            for t in 0..l {
                for i in 0..kd {
                    dqc[t * kd + i] *= ch.at(&ch.eb, t, i);
                    dkc[t * kd + i] *= ch.at(&ch.ebn, t, i);
                }
            }
        } else if w == 1 {
            for t in 0..l {
                for s in 0..l {
                    m[t * c + s] = if s <= t {
                        m[t * c + s] * ((ch.b[t] - ch.b[s]).exp() as f32)
                    } else {
                        0.0
                    };
                }
            }
            mm((l, kd, l), dqc, kd, false, &m, (c, 1), &ch.kc, (kd, 1), 1.0);
            mm((l, kd, l), dkc, kd, false, &m, (1, c), &ch.q, (kd, 1), 1.0);
        } else {
            dqc.fill(0.0);
            dkc.fill(0.0);
            for a0 in (0..l).step_by(SUB) {
                let a1 = (a0 + SUB).min(l);
                if a0 > 0 {
                    let r = a0 - 1;
                    ch.ref_scaled(a0, a1, r);
                    // dq[a] += (M[a, :a0] Kt) ⊙ e^{b_t - b_r}
                    mm(
                        (a1 - a0, kd, a0),
                        &mut tmp,
                        kd,
                        false,
                        &m[a0 * c..],
                        (c, 1),
                        &ch.kt,
                        (kd, 1),
                        1.0,
                    );
                    for t in a0..a1 {
                        for i in 0..kd {
                            let e = (ch.b[t * kd + i] - ch.b[r * kd + i]).exp() as f32;
                            dqc[t * kd + i] += tmp[(t - a0) * kd + i] * e;
                        }
                    }
                    // dk[:a0] += (M[a, :a0]^T Qt) ⊙ e^{b_r - b_s}
                    mm(
                        (a0, kd, a1 - a0),
                        &mut tmp,
                        kd,
                        false,
                        &m[a0 * c..],
                        (1, c),
                        &ch.qt,
                        (kd, 1),
                        1.0,
                    );
                    for s in 0..a0 {
                        for i in 0..kd {
                            let e = (ch.b[r * kd + i] - ch.b[s * kd + i]).exp() as f32;
                            dkc[s * kd + i] += tmp[s * kd + i] * e;
                        }
                    }
                }
                for t in a0..a1 {
                    for s in a0..=t {
                        let mts = m[t * c + s];
                        for i in 0..kd {
                            let e = (ch.b[t * kd + i] - ch.b[s * kd + i]).exp() as f32;
                            dqc[t * kd + i] += mts * ch.kc[s * kd + i] * e;
                            dkc[s * kd + i] += mts * ch.q[t * kd + i] * e;
                        }
                    }
                }
            }
        }
        // dq += scale * e^{b_t} ⊙ (dO S_0^T)
        mm(
            (l, kd, vd),
            &mut tmp,
            kd,
            false,
            &do_c,
            (vd, 1),
            s0,
            (1, vd),
            scale,
        );
        for t in 0..l {
            for i in 0..kd {
                dqc[t * kd + i] += tmp[t * kd + i] * ch.at(&ch.eb, t, i);
            }
        }
        // dk += e^{b_L - b_s} ⊙ (V dS^T)
        mm(
            (l, kd, vd),
            &mut tmp,
            kd,
            false,
            &ch.vc,
            (vd, 1),
            &ds,
            (1, vd),
            1.0,
        );
        for s in 0..l {
            for i in 0..kd {
                dkc[s * kd + i] += tmp[s * kd + i] * ch.at(&ch.ebl, s, i);
            }
        }
        // dS <- diag(e^{b_L}) dS + scale * Qs^T dO
        for i in 0..kd {
            let f = ch.bv(l - 1, i).exp() as f32;
            for x in &mut ds[i * vd..(i + 1) * vd] {
                *x *= f;
            }
        }
        mm(
            (kd, vd, l),
            &mut ds,
            vd,
            true,
            &ch.qs,
            (1, kd),
            &do_c,
            (vd, 1),
            scale,
        );
        if want_dg {
            for t in 0..l {
                for i in 0..kd {
                    let x = ch.q[t * kd + i] as f64 * dqc[t * kd + i] as f64
                        - ch.kc[t * kd + i] as f64 * dkc[t * kd + i] as f64;
                    db[(lo + t) * w + if w == 1 { 0 } else { i }] += x;
                }
            }
        }
    }
    let dg = want_dg.then(|| {
        // dg_t = sum_{t' >= t} dL/dB_{t'}
        let mut acc = vec![0.0f64; w];
        let mut dg = vec![0.0f32; len * w];
        for t in (0..len).rev() {
            for i in 0..w {
                acc[i] += db[t * w + i];
                dg[t * w + i] = acc[i] as f32;
            }
        }
        dg
    });
    HeadGrads {
        dq,
        dk,
        dv,
        dg,
        d0: ds,
    }
}

/// The chunked backward of the core: `dout [B, T, H, V]` (f32) and optionally the gradient of the
/// final state `[seqs, H, K, V]` (see the module header).
pub fn backward_chunked(
    core: &Core,
    dout: &[f32],
    d_final_state: Option<&[f32]>,
    chunk: usize,
) -> Result<CoreGrads> {
    const OP: &str = "linear::cpu::backward_chunked";
    let d = core.validate(OP)?;
    check_chunk(OP, chunk)?;
    let want = d.batch * d.t * d.h * d.v;
    if dout.len() != want {
        return Err(Error::Shape {
            op: OP,
            tensor: "dout".into(),
            got: vec![dout.len()],
            expected: format!("[{}, {}, {}, {}] = {want} elements", d.batch, d.t, d.h, d.v),
        });
    }
    if let Some(f) = d_final_state {
        if f.len() != d.state_len() {
            return Err(Error::Shape {
                op: OP,
                tensor: "d_final_state".into(),
                got: vec![f.len()],
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
    }
    let want_dg = matches!(core.decay, Decay::Token(_) | Decay::Gate(_));
    let results: Vec<_> = tasks(&d, core.cu_seqlens)
        .into_par_iter()
        .map(|(seq, h)| {
            let g = backward_head(core, &d, seq, h, chunk, dout, d_final_state, want_dg);
            (seq, h, g)
        })
        .collect();
    let (kd, vd, kv) = (d.k, d.v, d.k * d.v);
    let w = decay_width(core, &d);
    let mut dq = vec![0.0f32; d.batch * d.t * d.h * kd];
    let mut dk = vec![0.0f32; d.batch * d.t * d.hk * kd];
    let mut dv = vec![0.0f32; d.batch * d.t * d.hk * vd];
    let mut dg = want_dg.then(|| vec![0.0f32; d.batch * d.t * d.h * w]);
    let mut d0 = vec![0.0f32; d.state_len()];
    let group = d.h / d.hk;
    for ((bi, t0, t1, n), h, g) in results {
        let hk = h / group;
        for r in 0..t1 - t0 {
            let row = bi * d.t + t0 + r;
            dq[(row * d.h + h) * kd..][..kd].copy_from_slice(&g.dq[r * kd..][..kd]);
            for (x, y) in dk[(row * d.hk + hk) * kd..][..kd]
                .iter_mut()
                .zip(&g.dk[r * kd..][..kd])
            {
                *x += y;
            }
            for (x, y) in dv[(row * d.hk + hk) * vd..][..vd]
                .iter_mut()
                .zip(&g.dv[r * vd..][..vd])
            {
                *x += y;
            }
            if let (Some(dg), Some(src)) = (&mut dg, &g.dg) {
                dg[(row * d.h + h) * w..][..w].copy_from_slice(&src[r * w..][..w]);
            }
        }
        d0[(n * d.h + h) * kv..][..kv].copy_from_slice(&g.d0);
    }
    Ok(CoreGrads {
        dq,
        dk,
        dv,
        dg,
        d_initial_state: d0,
    })
}

/// The fused recurrent forward in f32, token by token (see the module header).
pub fn forward_recurrent(core: &Core) -> Result<CoreOutput> {
    const OP: &str = "linear::cpu::forward_recurrent";
    let d = core.validate(OP)?;
    let results: Vec<_> = tasks(&d, core.cu_seqlens)
        .into_par_iter()
        .map(|(seq, h)| (seq, h, recurrent_head(core, &d, seq, h)))
        .collect();
    Ok(assemble(&d, results))
}

fn recurrent_head(
    core: &Core,
    d: &CoreDims,
    (bi, t0, t1, n): (usize, usize, usize, usize),
    h: usize,
) -> (Vec<f32>, Vec<f32>) {
    let (kd, vd) = (d.k, d.v);
    let hk = h / (d.h / d.hk);
    let mut s = initial(core, d, n, h);
    let mut out = vec![0.0f32; (t1 - t0) * vd];
    let (mut q, mut k, mut v) = (vec![0.0; kd], vec![0.0; kd], vec![0.0; vd]);
    for t in t0..t1 {
        load(&core.q, bi, t, 1, h, &mut q);
        load(&core.k, bi, t, 1, hk, &mut k);
        load(&core.v, bi, t, 1, hk, &mut v);
        let o = &mut out[(t - t0) * vd..][..vd];
        for i in 0..kd {
            let a = core.log_decay(d, bi, t, h, i).exp();
            let row = &mut s[i * vd..(i + 1) * vd];
            let qi = core.scale * q[i];
            for j in 0..vd {
                row[j] = a * row[j] + k[i] * v[j];
                o[j] += qi * row[j];
            }
        }
    }
    (out, s)
}

/// One decode step: `q [B, 1, H, K]`, `k [B, 1, Hk, K]`, `v [B, 1, Hk, V]` against `state`
/// `[B, H, K, V]` (updated in place); returns `out [B, 1, H, V]`. The core's own `initial_state`
/// and `cu_seqlens` must be `None` (the state is the argument).
pub fn step(core: &Core, state: &mut [f32]) -> Result<Vec<f32>> {
    const OP: &str = "linear::cpu::step";
    if core.initial_state.is_some() || core.cu_seqlens.is_some() {
        return Err(Error::Param {
            op: OP,
            msg: "the decode step takes its state as an argument: pass neither initial_state nor cu_seqlens in the core".into(),
        });
    }
    if core.q.shape[1] != 1 {
        return Err(Error::Shape {
            op: OP,
            tensor: "q".into(),
            got: core.q.shape.to_vec(),
            expected: "one token per sequence, [B, 1, H, K]".into(),
        });
    }
    let s0 = state.to_vec();
    let c = Core {
        initial_state: Some(&s0),
        ..*core
    };
    let r = forward_recurrent(&c)?;
    state.copy_from_slice(&r.state);
    Ok(r.out)
}

/// FLOPs of the chunked forward over sequences of lengths `lens`, per head, `h` heads: for every
/// chunk of `L` tokens, `Q K^T` (`2 L^2 K`, the whole `L x L` block is computed) + `A V`
/// (`2 L^2 V`) + `(Q ⊙ e^b) S_0` (`2 L K V`) + the state update `(K ⊙ e^{b_L - b})^T V`
/// (`2 L K V`); exponentials and element-wise scalings are not counted.
pub fn chunked_flops(lens: &[usize], h: usize, k: usize, v: usize, chunk: usize) -> f64 {
    let per_chunk = |l: f64| 2.0 * l * l * (k + v) as f64 + 4.0 * l * (k * v) as f64;
    let per_head: f64 = lens
        .iter()
        .map(|&n| {
            let full = n / chunk;
            let rest = n % chunk;
            full as f64 * per_chunk(chunk as f64) + per_chunk(rest as f64)
        })
        .sum();
    per_head * h as f64
}

/// FLOPs of the chunked backward: the forward recomputed (the chunk-start states and `A`), then per
/// chunk `A` again (`2 L^2 K`), `dV` (`2 L^2 V + 2 L K V`), `M = dO V^T` (`2 L^2 V`), `dQ` and `dK`
/// from `M` (`4 L^2 K`), `dO S_0^T`, `V dS^T` and the `dS` update (`6 L K V`).
pub fn chunked_backward_flops(lens: &[usize], h: usize, k: usize, v: usize, chunk: usize) -> f64 {
    let per_chunk =
        |l: f64| 6.0 * l * l * k as f64 + 4.0 * l * l * v as f64 + 8.0 * l * (k * v) as f64;
    let per_head: f64 = lens
        .iter()
        .map(|&n| (n / chunk) as f64 * per_chunk(chunk as f64) + per_chunk((n % chunk) as f64))
        .sum();
    chunked_flops(lens, h, k, v, chunk) + per_head * h as f64
}
