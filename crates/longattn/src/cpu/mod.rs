//! Fused, tiled CPU attention forward (online softmax, O(n) extra memory).
//!
//! One dispatch place ([`forward`]) turns (dtype, instruction set) into a monomorphized driver
//! `drive::<T, M>`; `M` is a [`micro::Micro`] path (scalar, AVX2, AVX-512, AVX-512 BF16).
//!
//! Work decomposition: for each (batch row, KV head) group, K^T and V are packed once into 64-key
//! chunks; then every (query head of the group, query tile) is a task that walks its row of the
//! block schedule. Tasks run on rayon, heaviest first (causal and ragged schedules balance through
//! work stealing). When a group holds too few tasks to feed the threads (decode, small Sq), groups
//! run in parallel instead, each on one thread.
pub mod micro;
pub mod pack;

use crate::attention::{AttnOutput, AttnParams, Dims, MaskSpec};
use crate::error::{Error, Result};
use crate::mask::{BlockSchedule, RowMask, TileKind};
use crate::tensor::{DType, Element, Tensor, TensorView};
use half::{bf16, f16};
use micro::{Logits, Micro, BQ, NC};
use pack::{pack_kt, pack_q, pack_v, packed_dim, packed_dv};
use rayon::prelude::*;

/// Instruction-set paths of the CPU kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Isa {
    /// Plain loops (the reference path and the fallback).
    Scalar,
    /// AVX2 + FMA, f32 compute.
    Avx2,
    /// AVX-512F, f32 compute.
    Avx512,
    /// AVX-512 with `vdpbf16ps` for bf16 inputs (f32/f16 inputs use the AVX-512 f32 path).
    Avx512Bf16,
    /// AMX tiles for both products of bf16 inputs (f32/f16 inputs use the AVX-512 f32 path).
    Amx,
}

impl Isa {
    pub const ALL: [Isa; 5] = [
        Isa::Scalar,
        Isa::Avx2,
        Isa::Avx512,
        Isa::Avx512Bf16,
        Isa::Amx,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
            Isa::Avx512Bf16 => "avx512bf16",
            Isa::Amx => "amx",
        }
    }

    /// Whether this CPU can run the path.
    pub fn available(self) -> bool {
        match self {
            Isa::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => is_x86_feature_detected!("avx512f"),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Bf16 => {
                is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bf16")
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Amx => micro::amx::available(),
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// The fastest available path.
    pub fn best() -> Isa {
        *Isa::ALL
            .iter()
            .rev()
            .find(|i| i.available())
            .unwrap_or(&Isa::Scalar)
    }
}

/// Dispatch: dtype x instruction set -> one monomorphized driver.
pub fn forward(
    q: &TensorView,
    k: &TensorView,
    v: &TensorView,
    dims: &Dims,
    params: &AttnParams,
    mask: MaskSpec,
) -> Result<AttnOutput> {
    let isa = match params.isa {
        Some(i) if !i.available() => {
            return Err(Error::Param {
                op: "attention",
                msg: format!("instruction set {} is not available on this CPU", i.name()),
            })
        }
        Some(i) => i,
        None => Isa::best(),
    };
    let logits = Logits {
        scale: params.scale_for(dims.d),
        softcap: params.softcap,
    };
    // Resolve the mask into a schedule (+ element mask for Partial tiles).
    let owned;
    let (schedule, rows): (&BlockSchedule, Option<&dyn RowMask>) = match mask {
        MaskSpec::Full => {
            owned = BlockSchedule::full(BQ, NC, dims.sq, dims.sk)?;
            (&owned, None)
        }
        MaskSpec::Expr(bound) => {
            let s = bound.shape();
            if (s.batch, s.sq, s.sk) != (dims.batch, dims.sq, dims.sk) {
                return Err(Error::Param {
                    op: "attention",
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
                });
            }
            owned = bound.schedule(BQ, NC)?;
            (&owned, Some(bound as &dyn RowMask))
        }
        MaskSpec::Schedule { schedule, rows } => (schedule, rows),
    };
    check_schedule(schedule, rows.is_some(), dims)?;
    let job = Job {
        q,
        k,
        v,
        dims: *dims,
        logits,
        schedule,
        rows,
    };
    #[cfg(target_arch = "x86_64")]
    {
        use micro::{amx::Amx, avx2::Avx2, avx512::Avx512, avx512bf16::Avx512Bf16};
        match (isa, q.dtype()) {
            (Isa::Amx, DType::BF16) => return job.run::<bf16, Amx>(Amx),
            (Isa::Avx512Bf16, DType::BF16) => return job.run::<bf16, Avx512Bf16>(Avx512Bf16),
            (Isa::Avx512 | Isa::Avx512Bf16 | Isa::Amx, _) => return job.run_dtype(Avx512),
            (Isa::Avx2, _) => return job.run_dtype(Avx2),
            (Isa::Scalar, _) => {}
        }
    }
    let _ = isa;
    job.run_dtype(micro::scalar::Scalar)
}

fn check_schedule(s: &BlockSchedule, has_rows: bool, d: &Dims) -> Result<()> {
    let bad = |msg: String| Err(Error::Schedule(msg));
    if s.sq != d.sq || s.sk != d.sk {
        return bad(format!(
            "schedule is for sq {} / sk {}, the inputs have sq {} / sk {}",
            s.sq, s.sk, d.sq, d.sk
        ));
    }
    if s.batch != 1 && s.batch != d.batch {
        return bad(format!(
            "schedule has {} batch rows, inputs {}",
            s.batch, d.batch
        ));
    }
    if s.heads != 1 && s.heads != d.hq {
        return bad(format!(
            "schedule has {} heads, inputs have {} query heads",
            s.heads, d.hq
        ));
    }
    if !has_rows && s.counts().1 > 0 {
        return bad("schedule has Partial tiles but no element mask was given".into());
    }
    Ok(())
}

/// One attention call, resolved.
struct Job<'a> {
    q: &'a TensorView<'a>,
    k: &'a TensorView<'a>,
    v: &'a TensorView<'a>,
    dims: Dims,
    logits: Logits,
    schedule: &'a BlockSchedule,
    rows: Option<&'a dyn RowMask>,
}

/// Raw output pointers shared by the tasks.
///
/// SAFETY: every task writes only the output rows of its own (batch, head, query tile), which
/// no other task touches, and the buffers outlive the parallel section.
#[derive(Clone, Copy)]
struct OutPtr<T> {
    out: *mut T,
    lse: *mut f32,
}
unsafe impl<T> Send for OutPtr<T> {}
unsafe impl<T> Sync for OutPtr<T> {}

/// Per-thread scratch of one task (sized for BQ rows).
struct Scratch<P> {
    q: Vec<P>,
    s: Vec<f32>,
    p: Vec<P>,
    o: Vec<f32>,
    m: Vec<f32>,
    l: Vec<f32>,
    alpha: Vec<f32>,
    mask: Vec<u64>,
}

impl<P: Copy + Default> Scratch<P> {
    fn new(dp: usize, dvp: usize) -> Self {
        Scratch {
            q: vec![P::default(); BQ * dp],
            s: vec![0.0; BQ * NC],
            p: vec![P::default(); BQ * NC],
            o: vec![0.0; BQ * dvp],
            m: vec![0.0; BQ],
            l: vec![0.0; BQ],
            alpha: vec![0.0; BQ],
            mask: vec![0; BQ],
        }
    }
}

/// Bits `lo .. hi` (0 <= lo <= hi <= 64) set.
#[inline]
fn range_bits(lo: usize, hi: usize) -> u64 {
    let upto = |n: usize| if n >= 64 { u64::MAX } else { (1u64 << n) - 1 };
    upto(hi) & !upto(lo)
}

impl Job<'_> {
    fn run_dtype<M: Micro>(&self, m: M) -> Result<AttnOutput> {
        match self.q.dtype() {
            DType::F32 => self.run::<f32, M>(m),
            DType::BF16 => self.run::<bf16, M>(m),
            DType::F16 => self.run::<f16, M>(m),
        }
    }

    fn run<T: Element, M: Micro>(&self, micro: M) -> Result<AttnOutput> {
        let Dims {
            batch,
            sq,
            sk,
            hq,
            hk,
            d,
            dv,
        } = self.dims;
        let mut out = vec![T::default(); batch * sq * hq * dv];
        let mut lse = vec![f32::NEG_INFINITY; batch * hq * sq];
        let ptr = OutPtr {
            out: out.as_mut_ptr(),
            lse: lse.as_mut_ptr(),
        };
        let dp = packed_dim::<M>(d);
        let dvp = packed_dv::<M>(dv);
        let chunks = sk.div_ceil(NC);
        let group = hq / hk;
        let sched = self.schedule;
        let threads = rayon::current_num_threads();
        let tasks_per_group = group * sched.q_tiles * sched.tile_q.div_ceil(BQ);
        let groups: Vec<(usize, usize)> = (0..batch)
            .flat_map(|b| (0..hk).map(move |h| (b, h)))
            .collect();

        // Tasks of one group, heaviest first: (head, query tile, scheduled entries).
        let tasks_of = |b: usize, g: usize| {
            let mut t: Vec<(usize, usize, usize)> = (g * group..(g + 1) * group)
                .flat_map(|h| (0..sched.q_tiles).map(move |qt| (h, qt, sched.row(b, h, qt).len())))
                .filter(|t| t.2 > 0)
                .collect();
            t.sort_by_key(|t| std::cmp::Reverse(t.2));
            t
        };
        let pack_group = |b: usize, g: usize, kt: &mut [M::P], vp: &mut [M::P], par: bool| {
            if par {
                kt.par_chunks_mut(dp * NC)
                    .zip(vp.par_chunks_mut(NC * dvp))
                    .enumerate()
                    .for_each(|(c, (ktc, vc))| {
                        pack_kt::<T, M>(self.k, b, g, c, ktc);
                        pack_v::<T, M>(self.v, b, g, c, vc);
                    });
            } else {
                for (c, (ktc, vc)) in kt
                    .chunks_mut(dp * NC)
                    .zip(vp.chunks_mut(NC * dvp))
                    .enumerate()
                {
                    pack_kt::<T, M>(self.k, b, g, c, ktc);
                    pack_v::<T, M>(self.v, b, g, c, vc);
                }
            }
        };

        if tasks_per_group >= 4 * threads || groups.len() == 1 {
            // Many tasks per group: groups in sequence, tasks in parallel (one packed K/V alive).
            let mut kt = vec![M::P::default(); chunks * dp * NC];
            let mut vp = vec![M::P::default(); chunks * NC * dvp];
            for &(b, g) in &groups {
                pack_group(b, g, &mut kt, &mut vp, true);
                let tasks = tasks_of(b, g);
                tasks.par_iter().with_max_len(1).for_each_init(
                    || Scratch::<M::P>::new(dp, dvp),
                    |scr, &(h, qt, _)| self.tile::<T, M>(&micro, b, h, qt, &kt, &vp, scr, ptr),
                );
            }
        } else {
            // Few tasks per group (decode): groups in parallel, each sequential inside.
            groups.par_iter().with_max_len(1).for_each(|&(b, g)| {
                let mut kt = vec![M::P::default(); chunks * dp * NC];
                let mut vp = vec![M::P::default(); chunks * NC * dvp];
                pack_group(b, g, &mut kt, &mut vp, false);
                let mut scr = Scratch::<M::P>::new(dp, dvp);
                for (h, qt, _) in tasks_of(b, g) {
                    self.tile::<T, M>(&micro, b, h, qt, &kt, &vp, &mut scr, ptr);
                }
            });
        }
        Ok(AttnOutput {
            out: Tensor::new(T::wrap(out), vec![batch, sq, hq, dv])?,
            lse,
        })
    }

    /// One (batch row, query head, schedule query tile): the online-softmax loop over its key tiles.
    #[allow(clippy::too_many_arguments)]
    fn tile<T: Element, M: Micro>(
        &self,
        micro: &M,
        b: usize,
        h: usize,
        qt: usize,
        kt: &[M::P],
        vp: &[M::P],
        scr: &mut Scratch<M::P>,
        ptr: OutPtr<T>,
    ) {
        let Dims {
            sq, sk, hq, d, dv, ..
        } = self.dims;
        let sched = self.schedule;
        let (dp, dvp) = (packed_dim::<M>(d), packed_dv::<M>(dv));
        let entries = sched.row(b, h, qt);
        let (t0, t1) = sched.q_range(qt);
        micro.begin();
        for i0 in (t0..t1).step_by(BQ) {
            let rows = BQ.min(t1 - i0);
            pack_q::<T, M>(self.q, b, h, i0, rows, &mut scr.q);
            scr.m[..rows].fill(f32::NEG_INFINITY);
            scr.l[..rows].fill(0.0);
            scr.o.fill(0.0);
            for e in entries {
                let (k0, k1) = sched.k_range(e.k_tile as usize);
                for c in k0 / NC..k1.div_ceil(NC) {
                    let (lo, hi) = (
                        k0.max(c * NC) - c * NC,
                        k1.min(c * NC + NC).min(sk) - c * NC,
                    );
                    let range = range_bits(lo, hi);
                    match (e.kind, self.rows) {
                        (TileKind::Partial, Some(rm)) => {
                            for r in 0..rows {
                                let mut w = [0u64];
                                rm.row_bits(b, h, i0 + r, c * NC, &mut w);
                                scr.mask[r] = w[0] & range;
                            }
                        }
                        _ => scr.mask[..rows].fill(range),
                    }
                    micro.qk(
                        &scr.q,
                        rows,
                        dp,
                        &kt[c * dp * NC..(c + 1) * dp * NC],
                        &mut scr.s,
                    );
                    micro.softmax(
                        &scr.s,
                        rows,
                        &scr.mask,
                        &self.logits,
                        &mut scr.m,
                        &mut scr.l,
                        &mut scr.alpha,
                        &mut scr.p,
                    );
                    let keys = if M::PAIRS { (hi + 1) & !1 } else { hi };
                    micro.pv(
                        &scr.p,
                        rows,
                        keys,
                        &vp[c * NC * dvp..(c + 1) * NC * dvp],
                        dv,
                        &scr.alpha,
                        &mut scr.o,
                    );
                }
            }
            // Epilogue: out = O / l, LSE = ln 2 * (m + log2 l); empty rows (l = 0): out 0,
            // LSE -inf. A NaN l (NaN inputs) propagates to out and LSE.
            for r in 0..rows {
                let i = i0 + r;
                // SAFETY: see `OutPtr`; (b, i, h) rows are written by this task only.
                unsafe {
                    let orow = std::slice::from_raw_parts_mut(
                        ptr.out.add(((b * sq + i) * hq + h) * dv),
                        dv,
                    );
                    let l = scr.l[r];
                    if l != 0.0 {
                        let inv = 1.0 / l;
                        for (x, o) in orow.iter_mut().enumerate() {
                            *o = T::from_f32(scr.o[r * dvp + x] * inv);
                        }
                        *ptr.lse.add((b * hq + h) * sq + i) =
                            std::f32::consts::LN_2 * (scr.m[r] + l.log2());
                    } else {
                        orow.fill(T::from_f32(0.0));
                    }
                }
            }
        }
    }
}
