//! Device checks of skip-softmax in the CUDA forward (group `skip` of `longattn selftest
//! --backend cuda`; the kernel step is in `cuda/kernels/attn_fwd_ws.cu`, `LA_SKIP`).
//!
//! Inputs with planted "near" and "far" keys: per (batch, KV head) a direction u with
//! |u|^2 / sqrt(D) = `amp` nats, queries q = u + noise, keys k = u + noise in the near 64-key
//! groups (every `near_every`-th, group 0 always) and k = -gamma u + noise in the others, so a
//! far key's logit sits about amp (1 + gamma) nats below a near one's.
//!
//! Two kinds of case:
//! - **mechanics** (gamma 1, amp 60: far logits ~120 nats down, their exponentials are 0 in f32):
//!   the output must equal the exact f64 oracle at the usual tolerance, and under the full
//!   mask the kernel's counters must equal the count the rule gives exactly (every kernel tile
//!   after a row block's first is tested; a far tile is dropped, a near one kept, and a
//!   consumer warpgroup whose 64 rows all lie past Sq drops everything after its first tile).
//! - **bound** (far logits a few nats down, lambda large enough to drop real mass): the
//!   approximation is held to its bound. A tile is dropped only when each of its rows' logits
//!   is below the row's running maximum, hence its final maximum m, by more than -ln lambda, so
//!   the dropped mass of a row is at most E = sum_{j: p_j < lambda} p_j / sum_j p_j with
//!   p_j = exp(s_j - m) (exact, f64). With L the row's sum and dL <= E L the dropped part,
//!   |o' - o| <= 2 max|v| dL / (L - dL) <= 2 max|v| E / (1 - E) and
//!   0 <= lse - lse' = -ln(1 - dL / L) <= -ln(1 - E),
//!   each added to the usual tolerance; the case also requires some tile to be dropped.
use std::sync::Arc;

use rayon::prelude::*;

use super::SparseSpec;
use crate::attention::{AttnParams, MaskSpec};
use crate::cuda::selftest::{CaseResult, FwdCase};
use crate::cuda::CudaDevice;
use crate::error::Result;
use crate::mask::{BoundMask, MaskExpr, MaskShape};
use crate::reference::attention_f64;
use crate::tensor::{Buffer, DType, Tensor};
use crate::testing::{compare, out_tolerance, random_tensor, Rng};

/// One skip-softmax case.
#[derive(Clone, Debug)]
pub struct SkipCase {
    /// Shape, dtype and mask (no soft-cap, no documents).
    pub base: FwdCase,
    /// Logit of a near key, |u|^2 / sqrt(D), in nats.
    pub amp: f64,
    /// Far keys are -gamma u + noise.
    pub gamma: f64,
    /// Every `near_every`-th 64-key group is near.
    pub near_every: usize,
    /// log2 lambda (lambda = F / Sk: the spec's factor is Sk 2^log2_lambda).
    pub log2_lambda: f64,
    /// Exact counts and oracle (mechanics) or the approximation bound.
    pub exact: bool,
}

impl SkipCase {
    pub fn name(&self) -> String {
        format!(
            "skip {} {} lambda 2^{}",
            if self.exact { "mechanics" } else { "bound" },
            self.base.name(),
            self.log2_lambda
        )
    }
}

/// The matrix: decode rows, Sq != Sk, awkward lengths, D 64 / 128 / 256, GQA 8:1, batch 2,
/// causal and full, f16.
pub fn skip_cases(quick: bool) -> Vec<SkipCase> {
    let base = |sq, sk, d, mask, exact| SkipCase {
        base: FwdCase::new(DType::BF16, sq, sk, d, mask),
        amp: if exact { 60.0 } else { 6.0 },
        gamma: if exact { 1.0 } else { 0.2 },
        near_every: 5,
        log2_lambda: if exact { -20.0 } else { -8.0 },
        exact,
    };
    let mut v = vec![
        base(1, 4224, 128, "full", true),
        base(7, 900, 64, "full", true),
        base(300, 700, 128, "full", true),
        base(1023, 1023, 128, "causal", true),
        base(2000, 2000, 128, "causal", false),
        base(300, 700, 256, "full", true),
    ];
    if quick {
        return v;
    }
    v.push(base(65, 1023, 64, "full", true));
    v.push(base(1023, 1023, 64, "full", true));
    let mut c = base(513, 1500, 128, "full", true);
    (c.base.batch, c.base.hq, c.base.hk) = (2, 8, 1);
    v.push(c);
    let mut c = base(700, 700, 64, "causal", true);
    c.base.dtype = DType::F16;
    v.push(c);
    v.push(base(777, 1500, 64, "full", false));
    v.push(base(1500, 3000, 128, "causal & window(1000,0)", false));
    v.push(base(1023, 1023, 256, "causal", true));
    let mut c = base(129, 2000, 256, "full", false);
    (c.base.hq, c.base.hk) = (4, 1);
    v.push(c);
    v
}

/// q `[B, Sq, Hq, D]` and k `[B, Sk, Hk, D]` of `c` (see the module documentation).
fn planted_qk(c: &SkipCase, seed: u64) -> (Tensor, Tensor) {
    let d = c.base.d;
    let norm = (c.amp * (d as f64).sqrt()).sqrt();
    let dirs: Vec<Vec<f64>> = (0..c.base.batch * c.base.hk)
        .map(|bk| {
            let mut r = Rng::new(seed ^ (0x5eed + bk as u64 * 7919));
            let u: Vec<f64> = (0..d).map(|_| r.normal()).collect();
            let n = u.iter().map(|x| x * x).sum::<f64>().sqrt();
            u.iter().map(|x| x * norm / n).collect()
        })
        .collect();
    let group = c.base.hq / c.base.hk;
    let mut r = Rng::new(seed);
    let noise = 0.3;
    let mut q = vec![0f32; c.base.batch * c.base.sq * c.base.hq * d];
    for (row, x) in q.chunks_mut(d).enumerate() {
        let (b, h) = (row / (c.base.sq * c.base.hq), row % c.base.hq);
        let u = &dirs[b * c.base.hk + h / group];
        for (e, y) in x.iter_mut().enumerate() {
            *y = (u[e] + noise * r.normal()) as f32;
        }
    }
    let mut k = vec![0f32; c.base.batch * c.base.sk * c.base.hk * d];
    for (row, x) in k.chunks_mut(d).enumerate() {
        let (b, j, kh) = (
            row / (c.base.sk * c.base.hk),
            (row / c.base.hk) % c.base.sk,
            row % c.base.hk,
        );
        let u = &dirs[b * c.base.hk + kh];
        let sign = if near(c, j) { 1.0 } else { -c.gamma };
        for (e, y) in x.iter_mut().enumerate() {
            *y = (sign * u[e] + noise * r.normal()) as f32;
        }
    }
    let t = |x: Vec<f32>, s: usize, h: usize| {
        Tensor::new(
            Buffer::from_f32(c.base.dtype, &x),
            vec![c.base.batch, s, h, d],
        )
        .expect("shape")
    };
    (t(q, c.base.sq, c.base.hq), t(k, c.base.sk, c.base.hk))
}

/// The bound cases' planted q / k at any shape (`longattn bench --sparse --inputs planted`):
/// every 5th 64-key group near (logits ~6 nats), the others ~7 nats below; skip-softmax at
/// lambda 2^-8 drops about three quarters of the causal tiles.
#[allow(clippy::too_many_arguments)]
pub fn planted_near_far(
    dtype: DType,
    batch: usize,
    sq: usize,
    sk: usize,
    hq: usize,
    hk: usize,
    d: usize,
    seed: u64,
) -> (Tensor, Tensor) {
    let mut c = skip_cases(true)
        .into_iter()
        .find(|c| !c.exact)
        .expect("a bound case");
    c.base = FwdCase {
        dtype,
        batch,
        sq,
        sk,
        hq,
        hk,
        d,
        ..c.base
    };
    planted_qk(&c, seed)
}

fn near(c: &SkipCase, j: usize) -> bool {
    (j / 64).is_multiple_of(c.near_every)
}

/// The counters the kernel must report under the full mask (mechanics cases): per (batch, head,
/// query tile, consumer warpgroup) every key tile after the first is tested; a warpgroup with a
/// row below Sq drops the far tiles (no near key), one without drops them all.
fn expected_counts(c: &SkipCase, (br, bc): (usize, usize)) -> (u64, u64) {
    let nt = c.base.sk.div_ceil(bc);
    let far = (1..nt)
        .filter(|&t| !(t * bc..((t + 1) * bc).min(c.base.sk)).any(|j| near(c, j)))
        .count() as u64;
    let (mut tested, mut dropped) = (0u64, 0u64);
    for qt in 0..c.base.sq.div_ceil(br) {
        for wg in 0..br / 64 {
            tested += (nt - 1) as u64;
            let first = qt * br + wg * 64;
            dropped += if first < c.base.sq {
                far
            } else {
                (nt - 1) as u64
            };
        }
    }
    let heads = (c.base.batch * c.base.hq) as u64;
    (tested * heads, dropped * heads)
}

/// The logits s_j = scale q_i . k_j of row (b, h, i) over every key, in f64 from the rounded
/// inputs (`q`, `k` as f32 `[B, S, H, D]`).
fn row_logits(
    q: &[f32],
    k: &[f32],
    c: &SkipCase,
    scale: f64,
    (b, h, i): (usize, usize, usize),
) -> Vec<f64> {
    let (d, group) = (c.base.d, c.base.hq / c.base.hk);
    let qr = &q[((b * c.base.sq + i) * c.base.hq + h) * d..][..d];
    (0..c.base.sk)
        .map(|j| {
            let kr = &k[((b * c.base.sk + j) * c.base.hk + h / group) * d..][..d];
            scale
                * qr.iter()
                    .zip(kr)
                    .map(|(&x, &y)| x as f64 * y as f64)
                    .sum::<f64>()
        })
        .collect()
}

/// Per row (b, h, i): E = the share of the row's mass held by keys with p_j < lambda
/// (p_j = exp(s_j - m) with m the row's maximum), in f64 from the rounded inputs.
#[allow(clippy::too_many_arguments)]
fn small_mass(
    q: &[f32],
    k: &[f32],
    c: &SkipCase,
    scale: f64,
    lambda: f64,
    allowed: &(dyn Fn(usize, usize, usize) -> bool + Sync),
) -> Vec<f64> {
    (0..c.base.batch * c.base.hq * c.base.sq)
        .into_par_iter()
        .map(|r| {
            // Row index order of the LSE: [B, Hq, Sq].
            let (b, h, i) = (
                r / (c.base.hq * c.base.sq),
                (r / c.base.sq) % c.base.hq,
                r % c.base.sq,
            );
            let s: Vec<f64> = row_logits(q, k, c, scale, (b, h, i))
                .into_iter()
                .enumerate()
                .filter(|&(j, _)| allowed(b, i, j))
                .map(|(_, x)| x)
                .collect();
            let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            if m == f64::NEG_INFINITY {
                return 0.0;
            }
            let (mut all, mut small) = (0.0, 0.0);
            for &x in &s {
                let p = (x - m).exp();
                all += p;
                if p < lambda {
                    small += p;
                }
            }
            small / all
        })
        .collect()
}

/// The bound check of an approximate forward `got` against the exact `oracle` (module
/// documentation): (largest row error / its room, largest LSE move past -ln(1 - E), largest E).
fn held_to_bound(
    c: &SkipCase,
    [q, k, v]: [&Tensor; 3],
    params: &AttnParams,
    oracle: &crate::reference::RefOutput,
    got: &crate::attention::AttnOutput,
    allowed: &(dyn Fn(usize, usize, usize) -> bool + Sync),
) -> (f64, f64, f64) {
    let tol = out_tolerance(c.base.dtype);
    // The bound: per row, the usual tolerance plus what dropping mass E can move.
    let lambda = c.log2_lambda.exp2();
    let scale = params.scale_for(c.base.d) as f64;
    let e_row = small_mass(
        &q.data.to_f32_vec(),
        &k.data.to_f32_vec(),
        c,
        scale,
        lambda,
        allowed,
    );
    let vmax = v
        .data
        .to_f32_vec()
        .iter()
        .fold(0f64, |a, &x| a.max(x.abs() as f64));
    let ref_max = oracle.out.iter().fold(1e-30f64, |a, &x| a.max(x.abs()));
    let out = got.out.data.to_f32_vec();
    let (d, sq, hq) = (c.base.d, c.base.sq, c.base.hq);
    let (mut worst, mut lse_over, mut e_max) = (0f64, 0f64, 0f64);
    for (r, &e) in e_row.iter().enumerate() {
        let (b, h, i) = (r / (hq * sq), (r / sq) % hq, r % sq);
        let at = ((b * sq + i) * hq + h) * d;
        let err = (0..d)
            .map(|x| (out[at + x] as f64 - oracle.out[at + x]).abs())
            .fold(
                0f64,
                |a, x| if x.is_nan() { f64::INFINITY } else { a.max(x) },
            );
        let room = tol * ref_max + 2.0 * vmax * e / (1.0 - e).max(1e-12);
        worst = worst.max(err / room);
        let (gl, rl) = (got.lse[r] as f64, oracle.lse[r]);
        if rl != f64::NEG_INFINITY {
            let moved = (gl - rl).abs() - (-(1.0 - e).max(1e-300).ln());
            lse_over = lse_over.max(if moved.is_nan() {
                f64::INFINITY
            } else {
                moved.max(0.0)
            });
        }
        e_max = e_max.max(e);
    }
    (worst, lse_over, e_max)
}

/// A case's planted q, k, random v and bound mask.
fn inputs(c: &SkipCase, seed: u64) -> Result<(Tensor, Tensor, Tensor, BoundMask)> {
    let (q, k) = planted_qk(c, seed);
    let v = random_tensor(
        c.base.dtype,
        &[c.base.batch, c.base.sk, c.base.hk, c.base.d],
        1.0,
        seed + 2,
    );
    let shape = MaskShape {
        batch: c.base.batch,
        sq: c.base.sq,
        sk: c.base.sk,
    };
    let bound = MaskExpr::parse(&c.base.mask)?.bind(shape, None)?;
    Ok((q, k, v, bound))
}

/// Runs one case; see the module documentation for what passes.
pub fn check_skip(dev: &Arc<CudaDevice>, c: &SkipCase, seed: u64) -> CaseResult {
    let tol = out_tolerance(c.base.dtype);
    let r = (|| -> Result<(f64, f64, String, bool)> {
        let (q, k, v, bound) = inputs(c, seed)?;
        let (qv, kv, vv) = (q.view("q")?, k.view("k")?, v.view("v")?);
        let factor = c.base.sk as f64 * c.log2_lambda.exp2();
        let spec = SparseSpec::parse(&format!("skip(factor={factor},dense_below=0)"))?;
        let params = AttnParams::default();
        let (mut plan, got) =
            super::cuda::run_host(dev, [&qv, &kv, &vv], &params, &spec, MaskSpec::Expr(&bound))?;
        let (tested, dropped) = plan.take_skip_stats()?.unwrap_or((0, 0));
        let allowed = |b: usize, i: usize, j: usize| bound.allowed(b, i, j);
        let oracle = attention_f64(&qv, &kv, &vv, &params, &|b, _, i, j| allowed(b, i, j))?;
        let mut detail = format!(
            "{dropped} of {tested} tiles dropped ({:.1}%)",
            100.0 * dropped as f64 / tested.max(1) as f64
        );
        if c.exact {
            let (e, l) = compare(&got.out, &got.lse, &oracle);
            let mut ok = dropped > 0;
            if c.base.mask == "full" {
                let want = expected_counts(c, plan.tiles());
                ok &= (tested, dropped) == want;
                detail += &format!(" (expected {} of {})", want.1, want.0);
            }
            return Ok((e, l, detail, ok));
        }
        let (worst, lse_over, e_max) =
            held_to_bound(c, [&q, &k, &v], &params, &oracle, &got, &allowed);
        detail += &format!(
            "; largest row share below lambda {e_max:.2e}; output error / bound {worst:.3}"
        );
        Ok((worst * tol, lse_over, detail, dropped > 0))
    })();
    CaseResult::checked("skip", c.name(), r, tol)
}

/// The whole group, cases numbered for their seeds.
pub fn selftest(
    dev: &Arc<CudaDevice>,
    quick: bool,
    keep: &dyn Fn(&str) -> bool,
) -> Vec<CaseResult> {
    skip_cases(quick)
        .iter()
        .enumerate()
        .filter(|(_, c)| keep(&c.name()))
        .map(|(n, c)| check_skip(dev, c, 15000 + 37 * n as u64))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The planted inputs do what the cases assume, checked on the CPU in f64 (no GPU): under
    /// the mechanics parameters every far key's logit lies more than 100 nats below the row's
    /// maximum (so its exponential is 0 in f32 and the counts are exact), near keys stay within
    /// 20 nats of it (-ln 2^-20 = 13.9 is the drop threshold: near tiles are kept); under the
    /// bound parameters some far keys fall below lambda and hold a small, nonzero share.
    #[test]
    fn planted_keys_sit_where_the_cases_need_them() {
        for exact in [true, false] {
            let c = skip_cases(true)
                .into_iter()
                .find(|c| c.exact == exact && c.base.mask == "full" || !exact && !c.exact)
                .unwrap();
            let mut c = c;
            (c.base.sq, c.base.sk) = (40, 700);
            let (q, k) = planted_qk(&c, 3);
            let (q, k) = (q.data.to_f32_vec(), k.data.to_f32_vec());
            let scale = 1.0 / (c.base.d as f64).sqrt();
            let (mut far_gap, mut near_gap) = (f64::INFINITY, 0f64);
            for h in 0..c.base.hq {
                for i in 0..c.base.sq {
                    let s = row_logits(&q, &k, &c, scale, (0, h, i));
                    let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    for (j, &x) in s.iter().enumerate() {
                        if near(&c, j) {
                            near_gap = near_gap.max(m - x);
                        } else {
                            far_gap = far_gap.min(m - x);
                        }
                    }
                }
            }
            if exact {
                assert!(far_gap > 100.0, "far keys only {far_gap} nats down");
                assert!(near_gap < 20.0, "near keys up to {near_gap} nats down");
            } else {
                let lam = c.log2_lambda.exp2();
                let e = small_mass(&q, &k, &c, scale, lam, &|_, _, _| true);
                let top = e.iter().copied().fold(0f64, f64::max);
                assert!(top > 0.0 && top < 0.05, "share below lambda {top}");
            }
        }
    }

    /// The bound holds for the CPU forward's skip-softmax on the bound cases' inputs (its groups
    /// differ from the kernel's, the rule and so the bound are the same), and it drops tiles
    /// there: the check itself is sound and not vacuous before any GPU runs it.
    #[test]
    fn cpu_skip_softmax_is_held_to_the_bound() {
        for c in skip_cases(false).into_iter().filter(|c| !c.exact) {
            let mut c = c;
            (c.base.sq, c.base.sk) = (c.base.sq.min(700), c.base.sk.min(900));
            c.base.dtype = DType::F32;
            let (q, k, v, bound) = inputs(&c, 9).unwrap();
            let (qv, kv, vv) = (
                q.view("q").unwrap(),
                k.view("k").unwrap(),
                v.view("v").unwrap(),
            );
            let exact = AttnParams::default();
            let params = AttnParams {
                skip_below: Some(c.log2_lambda.exp2() as f32),
                ..Default::default()
            };
            let allowed = |b: usize, i: usize, j: usize| bound.allowed(b, i, j);
            let oracle =
                attention_f64(&qv, &kv, &vv, &exact, &|b, _, i, j| allowed(b, i, j)).unwrap();
            crate::cpu::reset_skip_stats();
            let got = crate::forward(&qv, &kv, &vv, &params, MaskSpec::Expr(&bound)).unwrap();
            let (_, dropped) = crate::cpu::skip_stats();
            let (worst, lse_over, e_max) =
                held_to_bound(&c, [&q, &k, &v], &exact, &oracle, &got, &allowed);
            assert!(dropped > 0, "{}: nothing dropped", c.name());
            assert!(worst <= 1.0, "{}: error / bound {worst}", c.name());
            assert!(
                lse_over <= crate::testing::LSE_TOLERANCE,
                "{}: lse {lse_over}",
                c.name()
            );
            assert!(e_max > 0.0, "{}", c.name());
            // Exactness would have failed: the dropped mass moves the output past the tolerance
            // the bound adds to (or at least a visible amount).
            let (e, _) = compare(&got.out, &got.lse, &oracle);
            assert!(e > 0.0, "{}", c.name());
        }
    }

    /// The expected counters: a decode row with two consumer warpgroups of 64 rows (BR 128) tests
    /// every tile after the first in both, the empty warpgroup drops all of them.
    #[test]
    fn expected_counts_follow_the_rule() {
        let mut c = skip_cases(true)[0].clone();
        (c.base.sq, c.base.sk, c.near_every) = (1, 1000, 5);
        // 128-key tiles 0..7; 64-key groups 0, 5, 10, 15 near -> tiles 0, 2, 5, 7 near, and
        // 1, 3, 4, 6 far.
        let (t, d) = expected_counts(&c, (128, 128));
        let heads = (c.base.batch * c.base.hq) as u64;
        assert_eq!(t, 2 * 7 * heads);
        assert_eq!(d, (4 + 7) * heads);
    }
}
