//! Fused CPU backward (FlashAttention-2 style): recomputes P from Q, K and the forward's LSE,
//! never stores an Sq x Sk matrix, and walks the same [`BlockSchedule`] as the forward.
//!
//! Math (per batch row b, query head h, query i, key j of the schedule; see
//! `reference::attention_backward_f64` for the plain definition):
//!   Delta_i = dO_i . O_i
//!   P_ij = exp(s_ij - LSE_i)                     (s = scale q.k, soft-capped; masked: 0)
//!   dV_j += P_ij dO_i,  dP_ij = dO_i . v_j,  dS_ij = P_ij (dP_ij - Delta_i) scale tanh'
//!   dK_j += dS_ij q_i,  dQ_i += dS_ij k_j
//!
//! Work decomposition: per (batch, KV head) *group*, one task per key tile of the schedule (fast
//! mode) or per contiguous range of key tiles (deterministic mode). A task owns dK and dV of its
//! keys: it walks, for every query head of the group, the tile's *column* of the schedule
//! ([`BlockSchedule::columns`]; Full tiles skip the element mask, Partial tiles ask the
//! [`RowMask`], tiles not listed are never touched), in 64-key chunks x 64-query blocks, with five
//! products per pair (see [`micro`]). dQ is the only shared result:
//! - fast mode: every task adds its dQ^T contribution into one f32 buffer per (head, query block)
//!   under that block's lock; the order of the additions depends on the thread timing;
//! - deterministic mode: the key tiles of a group are split into at most [`DET_SPLITS`] ranges of
//!   equal work (fixed by the shapes and the schedule, not by the thread count); each range accumulates its own
//!   dQ buffers in key order, and the buffers are summed in range order at the end. Same products,
//!   same results bit for bit on every run; the cost is the extra buffers (allocated only for the
//!   blocks a range touches) and fewer, larger tasks.
//!
//! Q and dO are packed once per wave of groups in the product layouts (Q^T, Q pairs, dO^T, dO
//! pairs, plus LSE log2 e and Delta per row); K, V and K^T once per chunk by the task that owns it.
pub mod micro;

use super::{check_schedule, Isa};
use crate::attention::{AttnParams, Dims, MaskSpec};
use crate::backward::Grads;
use crate::error::{Error, Result};
use crate::mask::{BlockSchedule, RowMask, ScheduleColumns, TileKind};
use crate::tensor::{DType, Element, Tensor, TensorView};
use half::{bf16, f16};
use micro::{BwdMicro, ScalarBwd, ScoreArgs};
use rayon::prelude::*;
use std::sync::Mutex;

use super::micro::{FromF32, Logits, LOG2E};

/// Keys per chunk and query rows per block (one u64 of mask bits each way).
const T: usize = 64;

/// Most key-tile ranges per group in deterministic mode.
pub const DET_SPLITS: usize = 8;

/// Deterministic mode aims at this many tasks per call (ranges per group = this / groups, at
/// most [`DET_SPLITS`]): enough to balance a few threads, while every range costs a dQ buffer
/// per query block it touches (fresh memory: at 1k tokens the page faults of 8 ranges per group
/// cost a third of the call). A function of the shapes only, so results do not depend on the
/// thread count.
const DET_TASKS: usize = 32;

/// Packed Q / dO and LSE of all groups of a wave stay under about this many bytes.
const WAVE_BYTES: usize = 48 << 20;

/// The inputs of one backward call (validated by `crate::backward`).
pub struct BwdInputs<'a> {
    pub q: &'a TensorView<'a>,
    pub k: &'a TensorView<'a>,
    pub v: &'a TensorView<'a>,
    pub out: &'a TensorView<'a>,
    pub dout: &'a TensorView<'a>,
    pub lse: &'a [f32],
}

/// Dispatch: (dtype x instruction set) -> one monomorphized driver. bf16 with AMX runs every
/// product on the tile unit; every other input with AVX-512 converts to f32 at packing and uses
/// f32 FMA; without AVX-512 (or with `Isa::Scalar`/`Isa::Avx2` forced) the scalar path runs.
pub fn backward(
    inp: &BwdInputs,
    dims: &Dims,
    params: &AttnParams,
    mask: MaskSpec,
    bwd: &crate::backward::BackwardParams,
) -> Result<Grads> {
    let isa = match params.isa {
        Some(i) if !i.available() => {
            return Err(Error::Param {
                op: "attention backward",
                msg: format!("instruction set {} is not available on this CPU", i.name()),
            })
        }
        Some(i) => i,
        None => Isa::best(),
    };
    let owned;
    let (schedule, rows): (&BlockSchedule, Option<&dyn RowMask>) = match mask.as_schedule() {
        MaskSpec::Full => {
            owned = BlockSchedule::full(T, T, dims.sq, dims.sk)?;
            (&owned, None)
        }
        MaskSpec::Expr(bound) => {
            crate::attention::check_bound("attention backward", bound, dims)?;
            owned = bound.schedule(T, T)?;
            (&owned, Some(bound as &dyn RowMask))
        }
        MaskSpec::Schedule { schedule, rows } => (schedule, rows),
        MaskSpec::Gated { .. } => unreachable!("as_schedule"),
    };
    check_schedule(schedule, rows.is_some(), dims)?;
    let job = Job::new(inp, dims, params, schedule, rows, bwd);
    #[cfg(target_arch = "x86_64")]
    {
        use micro::{AmxBwd, Avx512Bwd};
        match (isa, inp.q.dtype()) {
            (Isa::Amx, DType::BF16) => return job.run::<bf16, AmxBwd>(AmxBwd),
            (Isa::Avx512 | Isa::Avx512Bf16 | Isa::Amx, _) => return job.run_dtype(Avx512Bwd),
            (Isa::Avx2 | Isa::Scalar, _) => {}
        }
    }
    let _ = isa;
    job.run_dtype(ScalarBwd)
}

/// One backward call, resolved.
struct Job<'a> {
    inp: &'a BwdInputs<'a>,
    dims: Dims,
    logits: Logits,
    sched: &'a BlockSchedule,
    cols: ScheduleColumns,
    rows: Option<&'a dyn RowMask>,
    deterministic: bool,
    /// `BackwardParams::partial_keys`: skip the probability-sum check.
    partial_keys: bool,
    /// Query blocks (first row, rows): the 64-row pieces of every schedule query tile.
    blocks: Vec<(usize, usize)>,
    /// Block indices of each schedule query tile.
    tile_blocks: Vec<(usize, usize)>,
}

/// Q, dO and the row statistics of one (head, query block) in the product layouts.
struct QBlock<P> {
    /// Q^T `[dp / KP][64][KP]` (B of St = K Q^T).
    qt: Vec<P>,
    /// Q `[64 / KP][dp][KP]` (B of dK += dSt Q).
    qp: Vec<P>,
    /// dO^T `[dvp / KP][64][KP]` (B of dPt = V dO^T).
    dot: Vec<P>,
    /// dO `[64 / KP][dvp][KP]` (B of dV += Pt dO).
    dop: Vec<P>,
    lse2: [f32; 64],
    delta: [f32; 64],
}

/// Per-thread scratch of a task.
struct Scratch<P> {
    krow: Vec<P>,
    vrow: Vec<P>,
    kt: Vec<P>,
    st: Vec<f32>,
    dpt: Vec<f32>,
    pt: Vec<P>,
    dst: Vec<P>,
    dsp: Vec<P>,
    dk: Vec<f32>,
    dv: Vec<f32>,
}

/// Raw gradient pointers shared by the tasks.
///
/// SAFETY: dK/dV rows of a key are written only by the task owning its key tile; dQ rows of a
/// (head, query block) only by the assembly task of that block; the buffers outlive the
/// parallel sections.
#[derive(Clone, Copy)]
struct OutPtr<T> {
    dq: *mut T,
    dk: *mut T,
    dv: *mut T,
}
unsafe impl<T> Send for OutPtr<T> {}
unsafe impl<T> Sync for OutPtr<T> {}

impl<T> OutPtr<T> {
    /// The pointers, read through `self` (closures then capture the whole `Sync` struct).
    fn get(self) -> (*mut T, *mut T, *mut T) {
        (self.dq, self.dk, self.dv)
    }
}

/// Bits `lo .. hi` (0 <= lo <= hi <= 64) set.
#[inline]
fn range_bits(lo: usize, hi: usize) -> u64 {
    let upto = |n: usize| if n >= 64 { u64::MAX } else { (1u64 << n) - 1 };
    upto(hi) & !upto(lo)
}

/// `out[idx(r, x)] = t[b, s0 + r, h, x]` for r < n, x < dim, converted; the rest of `out` is 0.
#[inline]
fn pack<T: Element, P: FromF32 + bytemuck::Pod + Default>(
    t: &TensorView,
    (b, h, s0, n): (usize, usize, usize, usize),
    out: &mut [P],
    idx: impl Fn(usize, usize) -> usize,
) {
    let data = t.typed::<T>().expect("dtype checked by the dispatcher");
    let (d, st) = (t.dim(), t.strides[3]);
    // Every layout maps the n x d block one-to-one into `out`: zeros are needed only where the
    // block does not cover it (rows past n, padded columns).
    if n * d != out.len() {
        out.fill(P::default());
    }
    // One row at a time: converted as a slice (a copy when P has T's bits), then placed.
    let mut row = vec![P::default(); d];
    for r in 0..n {
        let base = t.offset(b, s0 + r, h, 0);
        if st == 1 {
            P::convert_slice(&data[base..base + d], &mut row);
        } else {
            for (x, o) in row.iter_mut().enumerate() {
                *o = P::from_f32(data[base + x * st].to_f32());
            }
        }
        for (x, &v) in row.iter().enumerate() {
            out[idx(r, x)] = v;
        }
    }
}

/// Delta_i = dO_i . O_i in f32 for rows `i0 .. i0 + n` of (b, h).
fn deltas<T: Element>(
    dout: &TensorView,
    out: &TensorView,
    (b, h, i0, n): (usize, usize, usize, usize),
    delta: &mut [f32],
) {
    let (dd, od) = (
        dout.typed::<T>().expect("dtype checked by the dispatcher"),
        out.typed::<T>().expect("dtype checked by the dispatcher"),
    );
    let (dv, sd, so) = (dout.dim(), dout.strides[3], out.strides[3]);
    for (r, dl) in delta[..n].iter_mut().enumerate() {
        let (bd, bo) = (dout.offset(b, i0 + r, h, 0), out.offset(b, i0 + r, h, 0));
        *dl = (0..dv)
            .map(|x| dd[bd + x * sd].to_f32() * od[bo + x * so].to_f32())
            .sum();
    }
}

/// A work item: key tiles `kt0..kt1` of group `gi` (index in the wave), dQ into sink `sink`.
#[derive(Clone, Copy)]
struct Task {
    gi: usize,
    kt0: usize,
    kt1: usize,
    sink: usize,
    work: usize,
}

impl<'a> Job<'a> {
    fn new(
        inp: &'a BwdInputs<'a>,
        dims: &Dims,
        params: &AttnParams,
        sched: &'a BlockSchedule,
        rows: Option<&'a dyn RowMask>,
        bwd: &crate::backward::BackwardParams,
    ) -> Self {
        let mut blocks = Vec::new();
        let mut tile_blocks = Vec::new();
        for qt in 0..sched.q_tiles {
            let (q0, q1) = sched.q_range(qt);
            let first = blocks.len();
            for i0 in (q0..q1).step_by(T) {
                blocks.push((i0, T.min(q1 - i0)));
            }
            tile_blocks.push((first, blocks.len()));
        }
        Job {
            inp,
            dims: *dims,
            logits: Logits {
                scale: params.scale_for(dims.d),
                softcap: params.softcap,
            },
            sched,
            cols: sched.columns(),
            rows,
            deterministic: bwd.deterministic,
            partial_keys: bwd.partial_keys,
            blocks,
            tile_blocks,
        }
    }

    fn run_dtype<M: BwdMicro>(&self, m: M) -> Result<Grads> {
        match self.inp.q.dtype() {
            DType::F32 => self.run::<f32, M>(m),
            DType::BF16 => self.run::<bf16, M>(m),
            DType::F16 => self.run::<f16, M>(m),
        }
    }

    /// Whether query row i of (b, h) has any allowed key (from the schedule and the row mask).
    fn row_has_key(&self, b: usize, h: usize, i: usize) -> bool {
        let qt = i / self.sched.tile_q;
        self.sched.row(b, h, qt).iter().any(|e| {
            let (k0, k1) = self.sched.k_range(e.k_tile as usize);
            match (e.kind, self.rows) {
                (TileKind::Full, _) | (TileKind::Partial, None) => k1 > k0,
                (TileKind::Partial, Some(rm)) => (k0..k1).step_by(T).any(|j0| {
                    let mut w = [0u64];
                    rm.row_bits(b, h, i, j0, &mut w);
                    w[0] & range_bits(0, T.min(k1 - j0)) != 0
                }),
            }
        })
    }

    /// Packs one (head, query block) and checks its LSE rows against the mask.
    fn pack_block<E: Element, M: BwdMicro>(
        &self,
        b: usize,
        h: usize,
        bi: usize,
    ) -> Result<QBlock<M::P>> {
        let Dims { sq, hq, d, dv, .. } = self.dims;
        let (dp, dvp, kp) = (pad::<M>(d), pad::<M>(dv), M::KP);
        let (i0, n) = self.blocks[bi];
        let inp = self.inp;
        let mut blk = QBlock {
            qt: vec![M::P::default(); dp * T],
            qp: vec![M::P::default(); T * dp],
            dot: vec![M::P::default(); dvp * T],
            dop: vec![M::P::default(); T * dvp],
            lse2: [f32::INFINITY; 64],
            delta: [0.0; 64],
        };
        let at = (b, h, i0, n);
        // B layouts: transposed [x / KP][64][KP] and row pairs [r / KP][dim][KP].
        pack::<E, M::P>(inp.q, at, &mut blk.qt, |r, x| {
            ((x / kp) * T + r) * kp + x % kp
        });
        pack::<E, M::P>(inp.q, at, &mut blk.qp, |r, x| {
            ((r / kp) * dp + x) * kp + r % kp
        });
        pack::<E, M::P>(inp.dout, at, &mut blk.dot, |r, x| {
            ((x / kp) * T + r) * kp + x % kp
        });
        pack::<E, M::P>(inp.dout, at, &mut blk.dop, |r, x| {
            ((r / kp) * dvp + x) * kp + r % kp
        });
        for r in 0..n {
            let i = i0 + r;
            let idx = (b * hq + h) * sq + i;
            let l = inp.lse[idx];
            if l.is_nan() || l == f32::INFINITY {
                return Err(Error::NonFinite {
                    tensor: "lse".into(),
                    index: idx,
                    value: l,
                });
            }
            let has_key = self.row_has_key(b, h, i);
            // With `partial_keys` a row may have no key in this call's block and still a
            // finite LSE (its keys are elsewhere): its probabilities here are all 0.
            if has_key == (l == f32::NEG_INFINITY) && (has_key || !self.partial_keys) {
                return Err(Error::Param {
                    op: "attention backward",
                    msg: format!(
                        "lse[{idx}] (batch {b}, head {h}, query {i}) is {l} but the row has {} allowed key: this LSE does not belong to these inputs and mask",
                        if has_key { "an" } else { "no" }
                    ),
                });
            }
            if has_key {
                blk.lse2[r] = l * LOG2E;
            }
        }
        // Delta = dO . O (f32; a NaN in dO propagates into the row's gradients).
        deltas::<E>(inp.dout, inp.out, at, &mut blk.delta);
        Ok(blk)
    }

    fn run<E: Element, M: BwdMicro>(&self, m: M) -> Result<Grads> {
        let Dims {
            batch,
            sq,
            sk,
            hq,
            hk,
            d,
            dv,
        } = self.dims;
        let (dp, dvp) = (pad::<M>(d), pad::<M>(dv));
        let group = hq / hk;
        let nb = self.blocks.len();
        let mut dq = vec![E::default(); batch * sq * hq * d];
        let mut dk = vec![E::default(); batch * sk * hk * d];
        let mut dvv = vec![E::default(); batch * sk * hk * dv];
        let ptr = OutPtr {
            dq: dq.as_mut_ptr(),
            dk: dk.as_mut_ptr(),
            dv: dvv.as_mut_ptr(),
        };
        let groups: Vec<(usize, usize)> = (0..batch)
            .flat_map(|b| (0..hk).map(move |g| (b, g)))
            .collect();
        let per_group =
            group * nb * 2 * (dp + dvp) * T * std::mem::size_of::<M::P>() + group * nb * dp * T * 4;
        let wave = (WAVE_BYTES / per_group.max(1)).clamp(1, groups.len());
        for wg in groups.chunks(wave) {
            // 1. Pack Q / dO of every (head of the wave, query block), checking the LSE.
            let heads: Vec<(usize, usize)> = wg
                .iter()
                .flat_map(|&(b, g)| (g * group..(g + 1) * group).map(move |h| (b, h)))
                .collect();
            let qblocks: Vec<QBlock<M::P>> = (0..heads.len() * nb)
                .into_par_iter()
                .map(|x| {
                    let (b, h) = heads[x / nb];
                    self.pack_block::<E, M>(b, h, x % nb)
                })
                .collect::<Result<_>>()?;
            // 2. Tasks over key tiles.
            let tasks = self.tasks(wg, group);
            let n_sinks = tasks.iter().map(|t| t.sink + 1).max().unwrap_or(0);
            let sinks: Vec<Vec<Mutex<Vec<f32>>>> = (0..n_sinks)
                .map(|_| {
                    (0..heads.len() * nb)
                        .map(|_| Mutex::new(Vec::new()))
                        .collect()
                })
                .collect();
            tasks.par_iter().with_max_len(1).for_each_init(
                || Scratch::<M::P> {
                    krow: vec![M::P::default(); T * dp],
                    vrow: vec![M::P::default(); T * dvp],
                    kt: vec![M::P::default(); dp * T],
                    st: vec![0.0; T * T],
                    dpt: vec![0.0; T * T],
                    pt: vec![M::P::default(); T * T],
                    dst: vec![M::P::default(); T * T],
                    dsp: vec![M::P::default(); T * T],
                    dk: vec![0.0; T * dp],
                    dv: vec![0.0; T * dvp],
                },
                |scr, t| {
                    let (b, g) = wg[t.gi];
                    self.task::<E, M>(&m, b, g, t, &qblocks, &sinks[t.sink], scr, ptr)
                },
            );
            // 3. dQ = sum of the sinks (in sink order), transposed back, in the input dtype; the
            // largest |sum_j P_ij - 1| over rows with keys.
            let wdev = (0..heads.len() * nb)
                .into_par_iter()
                .map(|x| {
                    let (b, h) = heads[x / nb];
                    let (i0, n) = self.blocks[x % nb];
                    let bufs: Vec<_> = sinks
                        .iter()
                        .map(|s| s[x].lock().expect("no panics"))
                        .collect();
                    let mut row = vec![0.0f32; d];
                    let mut dev = 0.0f32;
                    for r in 0..n {
                        row.fill(0.0);
                        let mut psum = 0.0f32;
                        for buf in bufs.iter().filter(|b| !b.is_empty()) {
                            for (xx, o) in row.iter_mut().enumerate() {
                                *o += buf[xx * T + r];
                            }
                            psum += buf[dp * T + r];
                        }
                        if qblocks[x].lse2[r] != f32::INFINITY {
                            dev = dev.max((psum - 1.0).abs());
                        }
                        // SAFETY: see `OutPtr`: row (b, i0 + r, h) belongs to this block.
                        unsafe {
                            let dst = std::slice::from_raw_parts_mut(
                                ptr.get().0.add(((b * sq + i0 + r) * hq + h) * d),
                                d,
                            );
                            E::from_f32_scaled(&row, 1.0, dst);
                        }
                    }
                    dev
                })
                .reduce(|| 0.0, f32::max);
            // Each row's probabilities exp(s - LSE) sum to 1 for the LSE of these inputs (up to
            // rounding: f32 sums, the bf16 path's exp2 polynomial).
            if wdev > 1e-2 && !self.partial_keys {
                return Err(Error::Param {
                    op: "attention backward",
                    msg: format!(
                        "lse does not belong to these inputs and mask: the probabilities exp(s - LSE) of a row sum to 1 {} {wdev:.3e}",
                        "+-"
                    ),
                });
            }
        }
        Ok(Grads {
            dq: Tensor::new(E::wrap(dq), vec![batch, sq, hq, d])?,
            dk: Tensor::new(E::wrap(dk), vec![batch, sk, hk, d])?,
            dv: Tensor::new(E::wrap(dvv), vec![batch, sk, hk, dv])?,
        })
    }

    /// Work of key tile kt in group (b, g): scheduled (query tile, head) pairs, in query blocks.
    fn tile_work(&self, b: usize, g: usize, group: usize, kt: usize) -> usize {
        (g * group..(g + 1) * group)
            .map(|h| {
                self.cols
                    .column(b, h, kt)
                    .iter()
                    .map(|c| {
                        let (f, l) = self.tile_blocks[c.q_tile as usize];
                        l - f
                    })
                    .sum::<usize>()
            })
            .sum()
    }

    /// The tasks of a wave: fast mode one per key tile with work (heaviest first); deterministic
    /// mode at most DET_SPLITS contiguous ranges of equal work per group, range r into sink r.
    fn tasks(&self, wg: &[(usize, usize)], group: usize) -> Vec<Task> {
        let kts = self.sched.k_tiles;
        let mut tasks = Vec::new();
        for (gi, &(b, g)) in wg.iter().enumerate() {
            let work: Vec<usize> = (0..kts).map(|kt| self.tile_work(b, g, group, kt)).collect();
            if !self.deterministic {
                tasks.extend((0..kts).filter(|&kt| work[kt] > 0).map(|kt| Task {
                    gi,
                    kt0: kt,
                    kt1: kt + 1,
                    sink: 0,
                    work: work[kt],
                }));
                continue;
            }
            let total: usize = work.iter().sum();
            let groups = self.dims.batch * self.dims.hk;
            let splits = (DET_TASKS / groups).clamp(1, DET_SPLITS).min(kts);
            // Range r ends at the first tile where the running work reaches total (r+1)/splits.
            let mut kt0 = 0;
            let mut acc = 0;
            for r in 0..splits {
                let goal = total * (r + 1) / splits;
                let mut kt1 = kt0;
                while kt1 < kts && (acc < goal || r + 1 == splits) {
                    acc += work[kt1];
                    kt1 += 1;
                }
                let w: usize = work[kt0..kt1].iter().sum();
                if w > 0 {
                    tasks.push(Task {
                        gi,
                        kt0,
                        kt1,
                        sink: r,
                        work: w,
                    });
                }
                kt0 = kt1;
            }
        }
        tasks.sort_by_key(|t| std::cmp::Reverse(t.work));
        tasks
    }

    /// One task: key tiles kt0..kt1 of group (b, g), in 64-key chunks.
    #[allow(clippy::too_many_arguments)]
    fn task<E: Element, M: BwdMicro>(
        &self,
        m: &M,
        b: usize,
        g: usize,
        t: &Task,
        qblocks: &[QBlock<M::P>],
        sink: &[Mutex<Vec<f32>>],
        scr: &mut Scratch<M::P>,
        ptr: OutPtr<E>,
    ) {
        let Dims {
            sk, hq, hk, d, dv, ..
        } = self.dims;
        let (dp, dvp) = (pad::<M>(d), pad::<M>(dv));
        let group = hq / hk;
        let nb = self.blocks.len();
        let inp = self.inp;
        let mut mask = [0u64; 64];
        m.begin();
        for kt in t.kt0..t.kt1 {
            let (k0, k1) = self.sched.k_range(kt);
            for j0 in (k0..k1).step_by(T) {
                let nk = T.min(k1 - j0);
                let at = (b, g, j0, nk);
                // A layouts: K rows [64][dp], V rows [64][dvp], K^T [dp][64].
                pack::<E, M::P>(inp.k, at, &mut scr.krow, |r, x| r * dp + x);
                pack::<E, M::P>(inp.v, at, &mut scr.vrow, |r, x| r * dvp + x);
                pack::<E, M::P>(inp.k, at, &mut scr.kt, |r, x| x * T + r);
                scr.dk.fill(0.0);
                scr.dv.fill(0.0);
                for h in g * group..(g + 1) * group {
                    let wh = t.gi * group + (h - g * group);
                    for ce in self.cols.column(b, h, kt) {
                        let (f, l) = self.tile_blocks[ce.q_tile as usize];
                        for bi in f..l {
                            let (i0, n) = self.blocks[bi];
                            // Key-major mask: bit c of mask[r] = (key j0 + r, query i0 + c).
                            let keys = range_bits(0, nk);
                            match (ce.kind, self.rows) {
                                (TileKind::Partial, Some(rm)) => {
                                    mask.fill(0);
                                    for c in 0..n {
                                        let mut w = [0u64];
                                        rm.row_bits(b, h, i0 + c, j0, &mut w);
                                        let mut w = w[0] & keys;
                                        while w != 0 {
                                            mask[w.trailing_zeros() as usize] |= 1 << c;
                                            w &= w - 1;
                                        }
                                    }
                                }
                                _ => {
                                    let qs = range_bits(0, n);
                                    for (r, mr) in mask.iter_mut().enumerate() {
                                        *mr = if r < nk { qs } else { 0 };
                                    }
                                }
                            }
                            if mask.iter().all(|&w| w == 0) {
                                continue;
                            }
                            let blk = &qblocks[wh * nb + bi];
                            // St = K Q^T, dPt = V dO^T (fresh).
                            m.mm(T, T, dp, &scr.krow, dp, &blk.qt, T, &mut scr.st, T, false);
                            m.mm(
                                T,
                                T,
                                dvp,
                                &scr.vrow,
                                dvp,
                                &blk.dot,
                                T,
                                &mut scr.dpt,
                                T,
                                false,
                            );
                            let mut psum = [0.0f32; 64];
                            let mut args = ScoreArgs {
                                st: &scr.st,
                                dpt: &scr.dpt,
                                mask: &mask,
                                lse2: &blk.lse2,
                                delta: &blk.delta,
                                logits: self.logits,
                                psum: &mut psum,
                            };
                            m.scores(&mut args, &mut scr.pt, &mut scr.dst, &mut scr.dsp);
                            // dV += Pt dO, dK += dSt Q.
                            m.mm(T, dvp, T, &scr.pt, T, &blk.dop, dvp, &mut scr.dv, dvp, true);
                            m.mm(T, dp, T, &scr.dst, T, &blk.qp, dp, &mut scr.dk, dp, true);
                            // dQ^T += K^T dS^T into this block's buffer of the task's sink.
                            let dsb = if M::KP == 1 { &scr.dst } else { &scr.dsp };
                            // The buffer: dQ^T [dp][64], then the row sums of P [64].
                            let mut buf = sink[wh * nb + bi].lock().expect("no panics");
                            if buf.is_empty() {
                                buf.resize(dp * T + T, 0.0);
                            }
                            m.mm(dp, T, T, &scr.kt, T, dsb, T, &mut buf, T, true);
                            for (s, &p) in buf[dp * T..].iter_mut().zip(&psum) {
                                *s += p;
                            }
                        }
                    }
                }
                // dK, dV of the chunk's keys, in the input dtype.
                for r in 0..nk {
                    let row = ((b * sk + j0 + r) * hk + g) * d;
                    let vrow = ((b * sk + j0 + r) * hk + g) * dv;
                    // SAFETY: see `OutPtr`: key j0 + r belongs to this task's key tile.
                    unsafe {
                        let dkr = std::slice::from_raw_parts_mut(ptr.get().1.add(row), d);
                        E::from_f32_scaled(&scr.dk[r * dp..r * dp + d], 1.0, dkr);
                        let dvr = std::slice::from_raw_parts_mut(ptr.get().2.add(vrow), dv);
                        E::from_f32_scaled(&scr.dv[r * dvp..r * dvp + dv], 1.0, dvr);
                    }
                }
            }
        }
    }
}

/// D or Dv padded to the path's alignment.
fn pad<M: BwdMicro>(x: usize) -> usize {
    x.div_ceil(M::ALIGN) * M::ALIGN
}
