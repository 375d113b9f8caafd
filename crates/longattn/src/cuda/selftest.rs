//! The GPU correctness matrix (`longattn selftest --backend cuda`): every case runs on the device
//! and is compared with the CPU path / f64 oracle; a table of [`CaseResult`]s comes back.

/// One checked case.
#[derive(Clone, Debug)]
pub struct CaseResult {
    /// Group of the case (`forward`, `decode`, ...).
    pub group: &'static str,
    pub name: String,
    pub passed: bool,
    /// Largest error relative to max |reference| (output), and the tolerance it was held to.
    pub err: f64,
    pub tol: f64,
    /// Largest absolute LSE error (0 when not applicable).
    pub lse_err: f64,
    pub detail: String,
}

impl CaseResult {
    /// A bad-input case: passed when `r` is an error whose message contains `want`.
    pub fn refused(group: &'static str, name: String, r: Result<()>, want: &str) -> CaseResult {
        let (passed, detail) = match r {
            Ok(()) => (false, "accepted".to_string()),
            Err(e) => (e.to_string().contains(want), format!("error: {e}")),
        };
        CaseResult {
            group,
            name,
            passed,
            err: 0.0,
            tol: 0.0,
            lse_err: 0.0,
            detail,
        }
    }

    /// The result of a check that returns (output error, LSE error, detail, its own verdict):
    /// passed when the verdict holds and both errors are within `tol` and [`LSE_TOLERANCE`]; an
    /// error is a failure that names it.
    pub fn checked(
        group: &'static str,
        name: String,
        r: Result<(f64, f64, String, bool)>,
        tol: f64,
    ) -> CaseResult {
        match r {
            Ok((err, lse_err, detail, ok)) => CaseResult {
                group,
                name,
                passed: ok && err <= tol && lse_err <= LSE_TOLERANCE,
                err,
                tol,
                lse_err,
                detail,
            },
            Err(e) => CaseResult {
                group,
                name,
                passed: false,
                err: f64::INFINITY,
                tol,
                lse_err: f64::INFINITY,
                detail: format!("error: {e}"),
            },
        }
    }
}

use std::fmt::Write;
use std::sync::Arc;

use super::CudaDevice;
use crate::attention::{AttnOutput, AttnParams, MaskSpec};
use crate::error::Result;
use crate::mask::{BlockSchedule, DocIds, MaskExpr, MaskShape};
use crate::reference::attention_f64;
use crate::tensor::{DType, Tensor};
use crate::testing::{compare, out_tolerance, random_tensor, Rng, LSE_TOLERANCE};

/// One forward case of the matrix.
#[derive(Clone, Debug)]
pub struct FwdCase {
    pub dtype: DType,
    pub batch: usize,
    pub sq: usize,
    pub sk: usize,
    pub hq: usize,
    pub hk: usize,
    pub d: usize,
    /// Mask expression, `blocks(T)` for a random explicit block mask of T x T tiles, or
    /// `gated(T):EXPR` for such a table gating EXPR.
    pub mask: String,
    pub softcap: Option<f32>,
    /// Equal documents per batch row (for `document`).
    pub docs: usize,
    /// Documents as runs of 16 tokens dealt round-robin (a document's keys are then not one
    /// contiguous run: the element program, or its bit table, instead of key intervals).
    pub dealt: bool,
}

impl FwdCase {
    pub(crate) fn new(dtype: DType, sq: usize, sk: usize, d: usize, mask: &str) -> FwdCase {
        FwdCase {
            dtype,
            batch: 1,
            sq,
            sk,
            hq: 4,
            hk: 2,
            d,
            mask: mask.into(),
            softcap: None,
            docs: 3,
            dealt: false,
        }
    }
    pub fn name(&self) -> String {
        format!(
            "{} B{} Sq{} Sk{} H{}/{} D{} `{}`{}{}",
            self.dtype,
            self.batch,
            self.sq,
            self.sk,
            self.hq,
            self.hk,
            self.d,
            self.mask,
            self.softcap
                .map(|c| format!(" softcap {c}"))
                .unwrap_or_default(),
            if self.dealt { " docs dealt" } else { "" }
        )
    }
}

/// The forward matrix: awkward sizes (causal and full), every mask atom and compositions, GQA /
/// MQA / MHA, head dims 32..256 (80, 96, 192 padded on Hopper), f16 and bf16, batches with
/// documents, soft-cap, Sq != Sk, decode shapes, explicit block masks. `quick` keeps a small subset (for compute-sanitizer).
pub fn forward_cases(quick: bool) -> Vec<FwdCase> {
    use DType::{BF16, F16};
    let mut v = Vec::new();
    let sizes: &[(usize, usize)] = if quick {
        &[(1, 1), (7, 7), (63, 65), (113, 203)]
    } else {
        &[
            (1, 1),
            (7, 7),
            (63, 65),
            (65, 63),
            (113, 203),
            (1, 4224),
            (1023, 1024),
            (4224, 4224),
        ]
    };
    for &(sq, sk) in sizes {
        for m in ["full", "causal"] {
            v.push(FwdCase::new(BF16, sq, sk, 128, m));
        }
    }
    // D 80, 96 and 192 run padded to 128 / 256 on Hopper's warp-specialized kernel.
    let dims: &[usize] = if quick {
        &[64, 96, 256]
    } else {
        &[32, 64, 80, 96, 128, 192, 256]
    };
    for &d in dims {
        for dt in [BF16, F16] {
            v.push(FwdCase::new(dt, 300, 300, d, "causal"));
        }
    }
    // D 256, Hopper's warp-specialized kernel with one Q stage and m64n256 P V products: awkward
    // sizes, decode rows, Sq != Sk both ways.
    let d256: &[(usize, usize, &str)] = if quick {
        &[(63, 65, "causal"), (113, 203, "full")]
    } else {
        &[
            (1, 1, "full"),
            (7, 7, "causal"),
            (63, 65, "causal"),
            (65, 63, "full"),
            (113, 203, "causal"),
            (1, 4224, "full"),
            (1023, 1024, "causal"),
            (1024, 1023, "full"),
        ]
    };
    for &(sq, sk, m) in d256 {
        v.push(FwdCase::new(BF16, sq, sk, 256, m));
    }
    let masks: &[&str] = &[
        "window(64,0)",
        "causal & window(100,20)",
        "causal & (sinks(4) | window(64,0))",
        "causal | prefix(100)",
        "chunk(64)",
        "strided(3)",
        "!causal",
        "causal & document",
        "document",
        "neighborhood(33)",
        "neighborhood(15,3)",
        "neighborhood2d(16,32,5,7)",
        "neighborhood2d(16,32,5,7,2,1)",
        "neighborhood3d(4,8,16,3,3,5)",
        "causal & (sinks(4) | window(63,0) | power(64))",
        "radial(64,32)",
        "blocks(64)",
        "blocks(32)",
        "gated(64):causal",
        "gated(48):causal & (sinks(4) | window(100,0))",
    ];
    for (n, m) in masks.iter().enumerate() {
        if quick && n % 3 != 0 {
            continue;
        }
        let mut c = FwdCase::new(BF16, 512, 512, 64, m);
        if m.contains("document") {
            c.batch = 2;
        }
        v.push(c);
    }
    // 2-D neighborhoods in patch order (the wgmma kernel on Hopper): 13 x 13 on 32 x 32 (query
    // patches 8 x 16, key patches 8 x 8), and a wide grid with a flat kernel.
    v.push(FwdCase::new(
        BF16,
        1024,
        1024,
        128,
        "neighborhood2d(32,32,13,13)",
    ));
    // A taller grid than wide with an uneven kernel, GQA 4:1: patch tiles on the
    // warp-specialized kernel (5-D TMA boxes) on Hopper.
    let mut c = FwdCase::new(BF16, 3072, 3072, 64, "neighborhood2d(64,48,7,11)");
    c.hq = 8;
    v.push(c);
    if !quick {
        let mut c = FwdCase::new(F16, 1024, 1024, 64, "neighborhood2d(8,128,3,9)");
        c.batch = 2;
        v.push(c);
        // GQA 8:1 (MQA-like), MHA, Sq != Sk with a window, soft-cap, batch 3.
        let mut c = FwdCase::new(BF16, 777, 1500, 128, "causal");
        c.hq = 8;
        c.hk = 1;
        v.push(c);
        let mut c = FwdCase::new(F16, 200, 1000, 64, "causal & window(128,0)");
        c.hq = 3;
        c.hk = 3;
        v.push(c);
        let mut c = FwdCase::new(BF16, 513, 513, 128, "causal");
        c.softcap = Some(20.0);
        v.push(c);
        let mut c = FwdCase::new(BF16, 1000, 1000, 64, "causal & document");
        c.batch = 3;
        c.docs = 5;
        v.push(c);
        // D 256 as Gemma-3 runs it (4 query heads on 1 KV head, a sliding window, f16), with
        // soft-cap, and documents in a batch.
        let mut c = FwdCase::new(F16, 777, 1500, 256, "causal & window(511,0)");
        c.hq = 4;
        c.hk = 1;
        v.push(c);
        let mut c = FwdCase::new(BF16, 513, 513, 256, "causal");
        c.softcap = Some(20.0);
        v.push(c);
        let mut c = FwdCase::new(BF16, 700, 700, 256, "causal & document");
        c.batch = 3;
        c.docs = 4;
        v.push(c);
    }
    // Documents dealt in runs of 16 (not contiguous): Partial tiles everywhere, the element
    // program (bit table on the wgmma kernel); Sq != Sk. D 32 runs the mma.sync kernel with a
    // heavy mask (its grid order once went wrong there, head > 0 only: several heads).
    for (dt, sq, sk, d, m) in [
        (BF16, 700, 700, 128, "causal & document"),
        (F16, 333, 1023, 64, "document"),
        (BF16, 65, 63, 32, "document | sinks(2)"),
    ] {
        let mut c = FwdCase::new(dt, sq, sk, d, m);
        c.batch = 2;
        c.dealt = true;
        v.push(c);
    }
    v
}

/// Runs `case` on the GPU and checks it: against the f64 oracle when the problem is small,
/// else against the CPU path (itself tested against the oracle).
pub fn check_forward(dev: &Arc<CudaDevice>, case: &FwdCase, seed: u64) -> CaseResult {
    let res = run_forward_case(dev, case, seed);
    let tol = out_tolerance(case.dtype);
    match res {
        Ok((err, lse_err, detail)) => CaseResult {
            group: "forward",
            name: case.name(),
            passed: err <= tol && lse_err <= LSE_TOLERANCE,
            err,
            tol,
            lse_err,
            detail,
        },
        Err(e) => CaseResult {
            group: "forward",
            name: case.name(),
            passed: false,
            err: f64::INFINITY,
            tol,
            lse_err: f64::INFINITY,
            detail: format!("error: {e}"),
        },
    }
}

/// Inputs of a case: q, k, v, the bound mask or the explicit block mask, the parameters.
struct Built {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bound: Option<crate::mask::BoundMask>,
    blocks: Option<(BlockSchedule, Vec<u8>, usize, usize)>,
    params: AttnParams,
}

impl Built {
    fn new(c: &FwdCase, seed: u64) -> Result<Built> {
        let q = random_tensor(c.dtype, &[c.batch, c.sq, c.hq, c.d], 1.0, seed);
        let k = random_tensor(c.dtype, &[c.batch, c.sk, c.hk, c.d], 1.0, seed + 1);
        let v = random_tensor(c.dtype, &[c.batch, c.sk, c.hk, c.d], 1.0, seed + 2);
        let params = AttnParams {
            softcap: c.softcap,
            ..Default::default()
        };
        let shape = MaskShape {
            batch: c.batch,
            sq: c.sq,
            sk: c.sk,
        };
        let ids = |n: usize| -> Vec<i32> {
            let id = |i: usize| match c.dealt {
                true => (i / 16) % c.docs,
                false => i * c.docs / n,
            };
            (0..c.batch)
                .flat_map(|_| (0..n).map(|i| id(i) as i32))
                .collect()
        };
        // `blocks(T)`: a seeded random table of T x T tiles (about half on); `gated(T):EXPR`:
        // such a table gating EXPR (`mask & gate`); else an expression.
        let (tile, text) = if let Some(t) = c
            .mask
            .strip_prefix("blocks(")
            .and_then(|r| r.strip_suffix(')'))
        {
            (Some(t), None)
        } else if let Some((t, e)) = c
            .mask
            .strip_prefix("gated(")
            .and_then(|r| r.split_once("):"))
        {
            (Some(t), Some(e))
        } else {
            (None, Some(c.mask.as_str()))
        };
        let bound = match text {
            Some(text) => {
                let expr = MaskExpr::parse(text)?;
                let docs = expr.uses_documents().then(|| DocIds {
                    q: ids(c.sq),
                    k: ids(c.sk),
                });
                Some(expr.bind(shape, docs)?)
            }
            None => None,
        };
        let blocks = match tile {
            Some(t) => {
                let t: usize = t.parse().map_err(|_| crate::Error::Param {
                    op: "selftest",
                    msg: format!("bad block size in `{}`", c.mask),
                })?;
                let (qt, kt) = (c.sq.div_ceil(t), c.sk.div_ceil(t));
                let mut rng = Rng::new(seed + 3);
                let table: Vec<u8> = (0..qt * kt).map(|_| (rng.below(2)) as u8).collect();
                let s = match &bound {
                    Some(b) => b.schedule(t, t)?.gated(&table, [1, 1, qt, kt])?,
                    None => {
                        BlockSchedule::from_block_mask(&table, [1, 1, qt, kt], t, t, c.sq, c.sk)?
                    }
                };
                Some((s, table, t, kt))
            }
            None => None,
        };
        Ok(Built {
            q,
            k,
            v,
            bound,
            blocks,
            params,
        })
    }

    fn spec(&self) -> MaskSpec<'_> {
        spec_cpu(&self.bound, &self.blocks)
    }

    fn allowed(&self, b: usize, i: usize, j: usize) -> bool {
        match (&self.bound, &self.blocks) {
            (Some(m), Some((_, table, t, kt))) => {
                m.allowed(b, i, j) && table[(i / t) * kt + j / t] != 0
            }
            (Some(m), None) => m.allowed(b, i, j),
            (None, Some((_, table, t, kt))) => table[(i / t) * kt + j / t] != 0,
            _ => false,
        }
    }
}

fn run_forward_case(dev: &Arc<CudaDevice>, c: &FwdCase, seed: u64) -> Result<(f64, f64, String)> {
    let bt = Built::new(c, seed)?;
    let (qv, kv, vv) = (bt.q.view("q")?, bt.k.view("k")?, bt.v.view("v")?);
    let got: AttnOutput = super::forward(dev, &qv, &kv, &vv, &bt.params, bt.spec())?;
    let work = c.batch * c.hq * c.sq * c.sk * c.d;
    if work <= 1 << 28 {
        let r = attention_f64(&qv, &kv, &vv, &bt.params, &|b, _, i, j| bt.allowed(b, i, j))?;
        let (e, l) = compare(&got.out, &got.lse, &r);
        Ok((e, l, "vs f64 oracle".into()))
    } else {
        let cpu = crate::forward(&qv, &kv, &vv, &bt.params, bt.spec())?;
        let (e, l) = compare_outputs(&got.out, &got.lse, &cpu.out, &cpu.lse);
        Ok((e, l, "vs CPU path".into()))
    }
}

/// The backward of `case` on the GPU (dQ, dK, dV from a random dO and the CPU forward's output
/// and LSE) against the f64 gradient oracle when small, else the CPU backward. The error is the
/// largest of the three, each relative to max(|its reference|, max |dV|).
pub fn check_backward(dev: &Arc<CudaDevice>, case: &FwdCase, seed: u64) -> CaseResult {
    let tol = crate::testing::grad_tolerance(case.dtype);
    let r = (|| -> Result<(f64, String)> {
        let bt = Built::new(case, seed)?;
        let (qv, kv, vv) = (bt.q.view("q")?, bt.k.view("k")?, bt.v.view("v")?);
        let dout = random_tensor(
            case.dtype,
            &[case.batch, case.sq, case.hq, case.d],
            1.0,
            seed + 9,
        );
        let dov = dout.view("do")?;
        let fwd = crate::forward(&qv, &kv, &vv, &bt.params, bt.spec())?;
        let ov = fwd.out.view("out")?;
        let run = |deterministic: bool| {
            super::backward::backward(
                dev,
                &qv,
                &kv,
                &vv,
                &ov,
                &fwd.lse,
                &dov,
                &bt.params,
                bt.spec(),
                &crate::BackwardParams {
                    deterministic,
                    ..Default::default()
                },
            )
        };
        let (g, g2, gf) = (run(true)?, run(true)?, run(false)?);
        let bp = crate::BackwardParams {
            deterministic: true,
            ..Default::default()
        };
        let work = case.batch * case.hq * case.sq * case.sk * case.d;
        let (want, how): ([Vec<f64>; 3], &str) = if work <= 1 << 26 {
            let r = crate::reference::attention_backward_f64(
                &qv,
                &kv,
                &vv,
                &dov,
                &bt.params,
                &|b, _, i, j| bt.allowed(b, i, j),
            )?;
            ([r.dq, r.dk, r.dv], "vs f64 gradient oracle")
        } else {
            let c = crate::backward(
                &qv,
                &kv,
                &vv,
                &ov,
                &fwd.lse,
                &dov,
                &bt.params,
                bt.spec(),
                &bp,
            )?;
            let f = |t: &Tensor| t.data.to_f32_vec().iter().map(|&x| x as f64).collect();
            ([f(&c.dq), f(&c.dk), f(&c.dv)], "vs CPU backward")
        };
        // Errors of dq, dk, dv; each mode's figure is the largest. Deterministic mode:
        // bit-identical run to run.
        let Some((ed, ef)) = grad_errors([&g, &g2, &gf], &want) else {
            return Ok((
                f64::INFINITY,
                "deterministic mode differs between two runs".into(),
            ));
        };
        let max3 = |e: [f64; 3]| e.into_iter().fold(0.0, f64::max);
        let (md, mf) = (max3(ed), max3(ef));
        let mut detail =
            format!("{how}; deterministic {md:.1e} (bit-identical twice), fast {mf:.1e}");
        if md.max(mf) > tol {
            // Which gradient is off (dq / dk / dv), for the failure report.
            let _ = write!(
                detail,
                " [dq/dk/dv: deterministic {:.1e}/{:.1e}/{:.1e}, fast {:.1e}/{:.1e}/{:.1e}]",
                ed[0], ed[1], ed[2], ef[0], ef[1], ef[2]
            );
        }
        Ok((md.max(mf), detail))
    })();
    let (err, detail) = match r {
        Ok((e, d)) => (e, d),
        Err(e) => (f64::INFINITY, format!("error: {e}")),
    };
    CaseResult {
        group: "backward",
        name: case.name(),
        passed: err <= tol,
        err,
        tol,
        lse_err: 0.0,
        detail,
    }
}

/// Errors of a backward's dq / dk / dv against `want` (each relative to max(|reference|, max
/// |dV|), [`crate::testing::compare_grad`]) for the deterministic mode (`g`, run twice: `g2`)
/// and the fast one (`gf`); None when the two deterministic runs differ in any bit.
fn grad_errors(
    [g, g2, gf]: [&crate::Grads; 3],
    want: &[Vec<f64>; 3],
) -> Option<([f64; 3], [f64; 3])> {
    let same = [(&g.dq, &g2.dq), (&g.dk, &g2.dk), (&g.dv, &g2.dv)]
        .iter()
        .all(|(a, b)| a.data.bytes() == b.data.bytes());
    let floor = want[2].iter().fold(0.0f64, |a, &x| a.max(x.abs()));
    let errs = |g: &crate::Grads| -> [f64; 3] {
        let got = [&g.dq, &g.dk, &g.dv];
        std::array::from_fn(|x| crate::testing::compare_grad(got[x], &want[x], floor))
    };
    same.then(|| (errs(g), errs(gf)))
}

/// The backward matrix: the forward's cases up to ~1100 x 1100, and head dims above 128 (where
/// each two-pass block owns half of the gradient columns) with GQA, Sq != Sk and a second half
/// narrower than the first (D 144: 80 + 64 columns).
pub fn backward_cases(quick: bool) -> Vec<FwdCase> {
    let mut v: Vec<FwdCase> = forward_cases(quick)
        .into_iter()
        .filter(|c| c.sq * c.sk <= 1100 * 1100)
        .collect();
    v.push(FwdCase::new(
        DType::BF16,
        113,
        203,
        144,
        "causal & window(64,0)",
    ));
    if !quick {
        let mut c = FwdCase::new(DType::F16, 1, 517, 192, "full");
        c.hq = 8;
        c.hk = 1;
        v.push(c);
        v.push(FwdCase::new(DType::BF16, 65, 65, 256, "neighborhood(15,3)"));
    }
    v
}

/// Masks that differ only in their constants share one compiled kernel (the constants are kernel
/// arguments, `mask/codegen.rs`): per pair, the first mask runs (compiling or loading what it
/// needs), then the second must load no new kernel variant and both must match the oracle (the
/// second runs the first's module with other constants). Forward for every pair, backward for
/// the first two.
pub fn check_mask_constants(dev: &Arc<CudaDevice>) -> Vec<CaseResult> {
    let pairs = [
        ("causal & window(128,0)", "causal & window(300,7)"),
        (
            "causal & (sinks(4) | window(64,0))",
            "causal & (sinks(17) | window(200,3))",
        ),
        ("chunk(64)", "chunk(100)"),
        ("strided(3)", "strided(5)"),
        ("radial(64,32) | power(32)", "radial(100,7) | power(48)"),
        ("neighborhood(33)", "neighborhood(15,3)"),
        // Dilated: no patch order, so no patch geometry in the variant; the bit table on Hopper.
        (
            "neighborhood2d(16,32,5,7,2,1)",
            "neighborhood2d(16,32,3,9,2,1)",
        ),
    ];
    let mut out = Vec::new();
    for (n, (a, b)) in pairs.iter().enumerate() {
        for backward in [false, true] {
            if backward && n >= 2 {
                continue;
            }
            let case = |m: &str| FwdCase::new(DType::BF16, 512, 512, 64, m);
            let run = |c: &FwdCase, seed| match backward {
                false => check_forward(dev, c, seed),
                true => check_backward(dev, c, seed),
            };
            let first = run(&case(a), 700 + n as u64);
            let before = dev.compile_records().len();
            let second = run(&case(b), 800 + n as u64);
            let new = dev.compile_records()[before..]
                .iter()
                .map(|r| r.variant.clone())
                .collect::<Vec<_>>();
            let mut detail = String::new();
            if !new.is_empty() {
                let _ = write!(detail, "new kernel variants {new:?}; ");
            }
            for (m, r) in [(a, &first), (b, &second)] {
                if !r.passed {
                    let _ = write!(detail, "`{m}` failed: err {:.2e} {}; ", r.err, r.detail);
                }
            }
            if detail.is_empty() {
                detail = "one kernel for both".into();
            }
            out.push(CaseResult {
                group: "mask consts",
                name: format!(
                    "mask constants: {} `{a}` then `{b}`",
                    if backward { "backward" } else { "forward" }
                ),
                passed: new.is_empty() && first.passed && second.passed,
                err: first.err.max(second.err),
                tol: first.tol,
                lse_err: first.lse_err.max(second.lse_err),
                detail,
            });
        }
    }
    out
}

fn spec_cpu<'a>(
    bound: &'a Option<crate::mask::BoundMask>,
    blocks: &'a Option<(BlockSchedule, Vec<u8>, usize, usize)>,
) -> MaskSpec<'a> {
    match (bound, blocks) {
        (Some(b), Some((s, ..))) => MaskSpec::Gated {
            mask: b,
            schedule: s,
        },
        (Some(b), None) => MaskSpec::Expr(b),
        (None, Some((s, ..))) => MaskSpec::Schedule {
            schedule: s,
            rows: None,
        },
        _ => MaskSpec::Full,
    }
}

/// (max |a - b| / max |b|, max |lse_a - lse_b|), -inf LSEs must match exactly.
pub fn compare_outputs(a: &Tensor, la: &[f32], b: &Tensor, lb: &[f32]) -> (f64, f64) {
    let (x, y) = (a.data.to_f32_vec(), b.data.to_f32_vec());
    let scale = y
        .iter()
        .fold(0.0f64, |m, &v| m.max(v.abs() as f64))
        .max(1e-30);
    let e = x
        .iter()
        .zip(&y)
        .map(|(&p, &q)| {
            let d = (p as f64 - q as f64).abs();
            if d.is_nan() {
                f64::INFINITY
            } else {
                d
            }
        })
        .fold(0.0, f64::max);
    let l = la
        .iter()
        .zip(lb)
        .map(|(&p, &q)| {
            if q == f32::NEG_INFINITY || p == f32::NEG_INFINITY {
                if p == q {
                    0.0
                } else {
                    f64::INFINITY
                }
            } else {
                let d = (p as f64 - q as f64).abs();
                if d.is_nan() {
                    f64::INFINITY
                } else {
                    d
                }
            }
        })
        .fold(0.0, f64::max);
    (e / scale, l)
}

/// Bad input must give a clear error, not a crash: f32 inputs, a head dim the kernel lacks, a
/// CPU row-mask schedule.
pub fn check_errors(dev: &Arc<CudaDevice>) -> Vec<CaseResult> {
    let mut out = Vec::new();
    let mut case = |name: &str, r: Result<AttnOutput>| {
        let (passed, detail) = match r {
            Err(e) => (true, format!("error as expected: {e}")),
            Ok(_) => (false, "no error".to_string()),
        };
        out.push(CaseResult {
            group: "bad input",
            name: name.into(),
            passed,
            err: 0.0,
            tol: 0.0,
            lse_err: 0.0,
            detail,
        });
    };
    let p = AttnParams::default();
    let f = random_tensor(DType::F32, &[1, 8, 1, 64], 1.0, 1);
    let fv = f.view("q").unwrap();
    case(
        "f32 inputs",
        super::forward(dev, &fv, &fv, &fv, &p, MaskSpec::Full),
    );
    let h = random_tensor(DType::BF16, &[1, 8, 1, 72], 1.0, 2);
    let hv = h.view("q").unwrap();
    case(
        "head dim 72",
        super::forward(dev, &hv, &hv, &hv, &p, MaskSpec::Full),
    );
    let h = random_tensor(DType::BF16, &[1, 8, 1, 320], 1.0, 2);
    let hv = h.view("q").unwrap();
    case(
        "head dim 320",
        super::forward(dev, &hv, &hv, &hv, &p, MaskSpec::Full),
    );
    let b = random_tensor(DType::BF16, &[1, 70, 1, 64], 1.0, 3);
    let bv = b.view("q").unwrap();
    let bm = MaskExpr::Causal
        .bind(
            MaskShape {
                batch: 1,
                sq: 70,
                sk: 70,
            },
            None,
        )
        .unwrap();
    let s = bm.schedule(64, 64).unwrap();
    // Out of device memory: a 4 TiB output; the error names it and the device keeps working
    // (the following cases run on it).
    case(
        "out of device memory (4 TiB tensor)",
        super::DevTensor::alloc(dev, [1, 1 << 26, 256, 128], DType::BF16).map(|_| AttnOutput {
            out: f.clone(),
            lse: Vec::new(),
        }),
    );
    // A kernel source NVRTC rejects: the error carries the compiler's log.
    case(
        "kernel that fails to compile",
        super::compile::compile(
            "selftest_broken",
            "extern \"C\" __global__ void broken() { this is not C; }",
            &dev.arch(),
            &[],
        )
        .map(|_| AttnOutput {
            out: f.clone(),
            lse: Vec::new(),
        }),
    );
    case(
        "schedule with a CPU row mask",
        super::forward(
            dev,
            &bv,
            &bv,
            &bv,
            &p,
            MaskSpec::Schedule {
                schedule: &s,
                rows: Some(&bm),
            },
        ),
    );
    out
}

// ---- Linear attention (group `linear`) --------------------------------------------------------

/// One case of the linear-attention matrix: the chunked forward (and backward) or the decode
/// step on the GPU against the f64 oracle ([`crate::linear::reference`]).
#[derive(Clone, Debug)]
pub struct LinearCase {
    pub dtype: DType,
    pub batch: usize,
    /// Tokens per batch row (with `varlen`: the packed total, their sum).
    pub t: usize,
    pub h: usize,
    pub hk: usize,
    pub k: usize,
    pub v: usize,
    /// `none`, `head`, `token` (log decays in [-0.5, 0]), `token-20` (in [-20, 0]),
    /// `token-strong` (-20 on every step), `gate` (step only).
    pub decay: &'static str,
    /// An initial state (and a final-state gradient in the backward).
    pub s0: bool,
    /// Sequence lengths packed into one row (`cu_seqlens`).
    pub varlen: Option<Vec<usize>>,
    /// q / k / v / dout as strided views (rows padded by 8 elements, heads of a wider buffer).
    pub strided: bool,
    pub backward: bool,
    /// The decode step (T = 1 per sequence, the state updated in place).
    pub step: bool,
}

impl LinearCase {
    fn new(dtype: DType, t: usize, kv: (usize, usize), decay: &'static str) -> LinearCase {
        LinearCase {
            dtype,
            batch: 1,
            t,
            h: 4,
            hk: 2,
            k: kv.0,
            v: kv.1,
            decay,
            s0: false,
            varlen: None,
            strided: false,
            backward: false,
            step: false,
        }
    }
    pub fn name(&self) -> String {
        format!(
            "linear {} {} B{} T{} H{}/{} K{} V{} {}{}{}{}",
            if self.step {
                "step"
            } else if self.backward {
                "bwd"
            } else {
                "fwd"
            },
            self.dtype,
            self.batch,
            self.t,
            self.h,
            self.hk,
            self.k,
            self.v,
            self.decay,
            if self.s0 { " s0" } else { "" },
            self.varlen
                .as_ref()
                .map(|l| format!(" varlen {l:?}"))
                .unwrap_or_default(),
            if self.strided { " strided" } else { "" },
        )
    }
}

/// The linear matrix: awkward lengths (1 .. 4224, chunk edges 63 / 64 / 65), K = V = 64 and
/// 128 and mixed, every decay kind including per-step log decays of -20, GQA / MHA / MQA,
/// initial state and final-state gradient, varlen with ragged and empty sequences, bf16 and f16,
/// strided inputs, and the decode step. `quick` keeps a subset.
pub fn linear_cases(quick: bool) -> Vec<LinearCase> {
    use DType::{BF16, F16};
    let mut v = Vec::new();
    let lens: &[usize] = if quick {
        &[1, 65, 113]
    } else {
        crate::testing::AWKWARD_SIZES
    };
    for &t in lens {
        let mut c = LinearCase::new(BF16, t, (128, 128), "token");
        v.push(c.clone());
        // The oracle's backward keeps every state (T x K x V f64): up to 1023 tokens at 128.
        if t <= 1023 {
            c.backward = true;
            v.push(c);
        }
    }
    for &t in if quick {
        &[130usize][..]
    } else {
        &[64usize, 130, 4224][..]
    } {
        for bwd in [false, true] {
            let mut c = LinearCase::new(BF16, t, (64, 64), "token");
            c.backward = bwd;
            v.push(c);
        }
    }
    let mut rest = vec![
        ("none", BF16, (128, 128), 200, false, false),
        ("head", BF16, (128, 128), 200, false, false),
        ("token-20", BF16, (128, 128), 200, false, false),
        ("token-strong", BF16, (64, 64), 150, false, false),
        ("token", F16, (128, 128), 300, false, false),
        ("token", BF16, (64, 128), 150, false, false),
        ("token", BF16, (128, 64), 150, false, false),
        ("token", BF16, (128, 128), 257, true, false),
        ("head", F16, (64, 64), 129, true, true),
        ("none", BF16, (64, 64), 97, false, true),
    ];
    if quick {
        rest.truncate(4);
    }
    for (decay, dt, kv, t, s0, strided) in rest {
        for bwd in [false, true] {
            let mut c = LinearCase::new(dt, t, kv, decay);
            c.s0 = s0;
            c.strided = strided;
            c.backward = bwd;
            v.push(c);
        }
    }
    // GQA shapes: MHA and MQA, a batch of 3.
    for (h, hk, batch) in [(3, 3, 1), (8, 1, 1), (4, 2, 3)] {
        for bwd in [false, true] {
            let mut c = LinearCase::new(BF16, 100, (64, 128), "token");
            (c.h, c.hk, c.batch, c.backward) = (h, hk, batch, bwd);
            c.s0 = batch == 3;
            v.push(c);
        }
    }
    // Varlen: ragged, empty sequences, boundaries off the chunk grid, with initial states.
    for (lens, decay) in [
        (vec![0, 5, 64, 0, 130, 1], "token"),
        (vec![63, 65, 200], "token-20"),
        (vec![300, 0], "head"),
    ] {
        for bwd in [false, true] {
            let mut c = LinearCase::new(BF16, lens.iter().sum(), (128, 128), decay);
            c.varlen = Some(lens.clone());
            c.s0 = true;
            c.backward = bwd;
            v.push(c);
        }
    }
    // The per-key-dim gate (GLA), forward and backward: weak gates (the tensor-core forms),
    // strong ones (log decay down to -20 a step: the exact element-wise forms), a mix (strong in
    // every fourth key dim), at awkward lengths; f16, GQA, strided, varlen with initial states,
    // cut into segments (the chooser cuts sequences of 1023 and more at four heads).
    let glens: &[usize] = if quick {
        &[1, 65, 1023]
    } else {
        &[1, 7, 63, 65, 113, 1023, 4224]
    };
    for &t in glens {
        let mut c = LinearCase::new(BF16, t, (128, 128), "gate");
        v.push(c.clone());
        // The oracle's backward keeps every state (T x K x V f64): up to 1023 tokens at 128.
        if t <= 1023 {
            c.backward = true;
            c.s0 = true;
            v.push(c);
        }
    }
    let mut gates = vec![
        ("gate-20", BF16, (128, 128), 200, false, false),
        ("gate-mix", BF16, (64, 64), 150, true, false),
        ("gate", F16, (128, 128), 300, true, false),
        ("gate", BF16, (64, 128), 150, false, true),
        ("gate-mix", F16, (128, 64), 257, false, false),
    ];
    if quick {
        gates.truncate(3);
    }
    for (decay, dt, kv, t, s0, strided) in gates {
        for bwd in [false, true] {
            let mut c = LinearCase::new(dt, t, kv, decay);
            (c.s0, c.strided, c.backward) = (s0, strided, bwd);
            v.push(c);
        }
    }
    for bwd in [false, true] {
        let mut c = LinearCase::new(BF16, 100, (64, 128), "gate");
        (c.h, c.hk, c.batch, c.s0, c.backward) = (4, 2, 3, true, bwd);
        v.push(c);
        let mut c = LinearCase::new(BF16, 329, (128, 128), "gate-mix");
        c.varlen = Some(vec![63, 0, 65, 200, 1]);
        (c.s0, c.backward) = (true, bwd);
        v.push(c);
    }
    // The decode step: every decay kind (the gate included), GQA, both head dims.
    for (decay, kv, dt) in [
        ("none", (128, 128), BF16),
        ("head", (64, 64), BF16),
        ("token", (128, 128), F16),
        ("gate", (128, 128), BF16),
        ("gate", (64, 128), BF16),
        ("token-20", (128, 64), BF16),
    ] {
        let mut c = LinearCase::new(dt, 1, kv, decay);
        c.batch = 3;
        c.step = true;
        v.push(c);
    }
    v
}

/// Largest |got - want| relative to max |want| (NaN counts as inf).
fn rel_err(got: &[f32], want: &[f64]) -> f64 {
    rel_err_floor(got, want, 0.0)
}

/// Largest |got - want| relative to max |want| or `floor` when that is larger.
fn rel_err_floor(got: &[f32], want: &[f64], floor: f64) -> f64 {
    if got.len() != want.len() {
        return f64::INFINITY;
    }
    let scale = want.iter().fold(floor, |a, &x| a.max(x.abs())).max(1e-30);
    let mut e = 0.0f64;
    for (&g, &w) in got.iter().zip(want) {
        let d = (g as f64 - w).abs();
        e = e.max(if d.is_nan() { f64::INFINITY } else { d });
    }
    e / scale
}

/// A `[B, T, H, D]` tensor in `dtype` as a view: contiguous, or (strided) the first D columns of
/// rows of D + 8 elements in a buffer with one spare head, so every stride differs from the
/// contiguous one (still 16-byte rows: the kernels read it in place).
struct LinInput {
    data: Tensor,
    shape: [usize; 4],
    strides: [usize; 4],
}

impl LinInput {
    fn new(dtype: DType, shape: [usize; 4], std: f64, seed: u64, strided: bool) -> LinInput {
        let [b, t, h, d] = shape;
        if strided {
            let (hp, dp) = (h + 1, d + 8);
            LinInput {
                data: random_tensor(dtype, &[b, t, hp, dp], std, seed),
                shape,
                strides: [t * hp * dp, hp * dp, dp, 1],
            }
        } else {
            LinInput {
                data: random_tensor(dtype, &shape, std, seed),
                shape,
                strides: [t * h * d, h * d, d, 1],
            }
        }
    }
    fn view(&self) -> crate::tensor::TensorView<'_> {
        crate::tensor::TensorView::strided(self.data.data.as_slice(), self.shape, self.strides)
            .expect("selftest view")
    }
}

/// Runs one linear case; (error, tolerance, detail).
fn run_linear_case(dev: &Arc<CudaDevice>, c: &LinearCase, seed: u64) -> Result<(f64, String)> {
    use crate::linear::{cuda as lc, reference, Core, Decay};
    let (b, t, h, hk, kd, vd) = (c.batch, c.t, c.h, c.hk, c.k, c.v);
    let q = LinInput::new(c.dtype, [b, t, h, kd], 1.0, seed, c.strided);
    let k = LinInput::new(c.dtype, [b, t, hk, kd], 1.0, seed + 1, c.strided);
    let v = LinInput::new(c.dtype, [b, t, hk, vd], 1.0, seed + 2, c.strided);
    let mut rng = Rng::new(seed + 3);
    let seqs = c.varlen.as_ref().map_or(b, |l| l.len());
    let gate = c.decay.starts_with("gate");
    let ng = match c.decay {
        "none" => 0,
        "head" => h,
        _ if gate => b * t * h * kd,
        _ => b * t * h,
    };
    let g: Vec<f32> = (0..ng)
        .map(|i| match c.decay {
            "head" => -0.3 * rng.uniform() as f32,
            "token-20" | "gate-20" => -20.0 * rng.uniform() as f32,
            "token-strong" => -20.0,
            // Strong in every fourth key dim, weak elsewhere.
            "gate-mix" if i % 4 == 0 => -20.0 * rng.uniform() as f32,
            "gate-mix" => -0.02 * rng.uniform() as f32,
            _ => -0.5 * rng.uniform() as f32,
        })
        .collect();
    let decay = match c.decay {
        "none" => Decay::None,
        "head" => Decay::PerHead(&g),
        _ if gate => Decay::Gate(&g),
        _ => Decay::Token(&g),
    };
    let state_len = seqs * h * kd * vd;
    let s0: Vec<f32> = (0..state_len).map(|_| rng.normal() as f32).collect();
    let cu: Option<Vec<i32>> = c.varlen.as_ref().map(|l| {
        let mut cu = vec![0i32];
        for &x in l {
            cu.push(cu.last().unwrap() + x as i32);
        }
        cu
    });
    let (qv, kv, vv) = (q.view(), k.view(), v.view());
    let core = Core {
        q: qv,
        k: kv,
        v: vv,
        decay,
        scale: 1.0 / (kd as f32).sqrt(),
        initial_state: (c.s0 || c.step).then_some(&s0[..]),
        cu_seqlens: cu.as_deref(),
    };
    let want = reference::forward_f64(&core)?;
    if c.step {
        let mut state = s0.clone();
        let o = lc::step_host(dev, &qv, &kv, &vv, decay, core.scale, &mut state)?;
        let (eo, es) = (
            rel_err(&o.data.to_f32_vec(), &want.out),
            rel_err(&state, &want.state),
        );
        return Ok((eo.max(es), format!("out {eo:.1e}, state {es:.1e}")));
    }
    if !c.backward {
        let (o, fin) = lc::forward_host(dev, &core)?;
        let (eo, es) = (
            rel_err(&o.data.to_f32_vec(), &want.out),
            rel_err(&fin, &want.state),
        );
        return Ok((eo.max(es), format!("out {eo:.1e}, final state {es:.1e}")));
    }
    let dout = LinInput::new(c.dtype, [b, t, h, vd], 1.0, seed + 4, c.strided);
    let dov = dout.view();
    let dout64: Vec<f64> = {
        let mut x = Vec::with_capacity(b * t * h * vd);
        for bi in 0..b {
            for ti in 0..t {
                for hi in 0..h {
                    for di in 0..vd {
                        x.push(dov.get(bi, ti, hi, di) as f64);
                    }
                }
            }
        }
        x
    };
    let dfin: Vec<f32> = (0..state_len).map(|_| rng.normal() as f32).collect();
    let dfin64: Vec<f64> = dfin.iter().map(|&x| x as f64).collect();
    let ds = c.s0.then_some(&dfin[..]);
    let wg = reference::backward_f64(&core, &dout64, c.s0.then_some(&dfin64[..]))?;
    let gg = lc::backward_host(dev, &core, &dov, ds)?;
    let mut errs = vec![
        ("dq", rel_err(&gg.dq.data.to_f32_vec(), &wg.dq)),
        ("dk", rel_err(&gg.dk.data.to_f32_vec(), &wg.dk)),
        ("dv", rel_err(&gg.dv.data.to_f32_vec(), &wg.dv)),
        ("ds0", rel_err(&gg.d_initial_state, &wg.d_initial_state)),
    ];
    // dg is a reverse cumulative sum of db = q . dq - k . dk, differences of products that are
    // each rounded at the level of the storage format: with strong decays (log decay -20 a step)
    // |dg| is much smaller than those products (at -20 on every step, ~1e-8 against products of
    // ~10, so only f32 roundoff of the products remains), and the errors of a whole sequence add
    // up. Its error is taken relative to max |dg| or 1/1024 of the largest per-token
    // sum |q . dq| + |k . dk| (oracle values), whichever is larger, and held to three times the
    // tolerance (reported divided by 3). Measured with a CPU emulation of the kernels
    // (scripts/linear_emu): 4.6 units of bf16 roundoff (3 of f16) relative to max |dg| with log
    // decays in [-20, 0], 0.5 in [-0.5, 0]; 2e-5 of the floor at -20 on every step.
    let dg_floor = {
        let mut f = 0.0f64;
        for bi in 0..b {
            for ti in 0..t {
                for hi in 0..h {
                    let kh = hi / (h / hk);
                    let (mut sq, mut sk) = (0.0f64, 0.0f64);
                    for i in 0..kd {
                        sq += (qv.get(bi, ti, hi, i) as f64
                            * wg.dq[((bi * t + ti) * h + hi) * kd + i])
                            .abs();
                        sk += (kv.get(bi, ti, kh, i) as f64
                            * wg.dk[((bi * t + ti) * hk + kh) * kd + i])
                            .abs();
                    }
                    f = f.max(sq + sk);
                }
            }
        }
        f / 1024.0
    };
    match (&gg.dg, &wg.dg) {
        (Some(a), Some(w)) => errs.push(("dg/3", rel_err_floor(a, w, dg_floor) / 3.0)),
        (None, None) => {}
        _ => errs.push(("dg present on one side only", f64::INFINITY)),
    }
    let worst = errs.iter().fold(0.0f64, |a, e| a.max(e.1));
    let detail = errs
        .iter()
        .map(|(n, e)| format!("{n} {e:.1e}"))
        .collect::<Vec<_>>()
        .join(", ");
    Ok((worst, detail))
}

/// Runs `case` on the GPU against the f64 oracle. Tolerance: six units of roundoff of the
/// storage format relative to max |reference| of each output (the kernels round P, the row-scaled
/// K / Q and the state to the storage format before their products, and the outputs).
pub fn check_linear(dev: &Arc<CudaDevice>, case: &LinearCase, seed: u64) -> CaseResult {
    let tol = 6.0 * case.dtype.eps();
    let (err, detail) = match run_linear_case(dev, case, seed) {
        Ok(x) => x,
        Err(e) => (f64::INFINITY, format!("error: {e}")),
    };
    CaseResult {
        group: "linear",
        name: case.name(),
        passed: err <= tol,
        err,
        tol,
        lse_err: 0.0,
        detail,
    }
}

/// Inputs the linear kernels refuse, each with a clear error: f32, head dim 96, the GLA gate in
/// the chunked kernels.
pub fn check_linear_errors(dev: &Arc<CudaDevice>) -> Vec<CaseResult> {
    use crate::linear::{cuda as lc, Core, Decay};
    let mut out = Vec::new();
    let mut case = |name: &str, r: Result<()>, needle: &str| {
        let (passed, detail) = match r {
            Err(e) => {
                let m = e.to_string();
                (m.contains(needle), format!("error: {m}"))
            }
            Ok(_) => (false, "no error".to_string()),
        };
        out.push(CaseResult {
            group: "linear",
            name: format!("linear error: {name}"),
            passed,
            err: 0.0,
            tol: 0.0,
            lse_err: 0.0,
            detail,
        });
    };
    let f = random_tensor(DType::F32, &[1, 8, 1, 64], 1.0, 1);
    let b96 = random_tensor(DType::BF16, &[1, 8, 1, 96], 1.0, 2);
    let b64 = random_tensor(DType::BF16, &[1, 8, 1, 64], 1.0, 3);
    let gate = vec![-0.1f32; 8 * 64];
    fn core<'a>(x: &'a Tensor, decay: Decay<'a>) -> Core<'a> {
        Core {
            q: x.view("q").unwrap(),
            k: x.view("k").unwrap(),
            v: x.view("v").unwrap(),
            decay,
            scale: 1.0,
            initial_state: None,
            cu_seqlens: None,
        }
    }
    case(
        "f32 inputs",
        lc::forward_host(dev, &core(&f, Decay::None)).map(|_| ()),
        "f32",
    );
    case(
        "head dim 96",
        lc::forward_host(dev, &core(&b96, Decay::None)).map(|_| ()),
        "96",
    );
    case(
        "gate shorter than [B, T, H, K]",
        lc::forward_host(dev, &core(&b64, Decay::Gate(&gate[..100]))).map(|_| ()),
        "g",
    );
    out
}

/// One case of the device sparse estimator (`sparse/cuda.rs`, group `sparse`).
#[derive(Clone, Debug)]
pub struct SparseCase {
    pub base: FwdCase,
    pub spec: String,
    /// Inputs with planted sinks, hub columns and diagonals ([`crate::sparse::structured_qk`])
    /// instead of plain random ones.
    pub structured: bool,
    /// Keys repeated in runs of 4 (k_j = k_{4 floor(j / 4)}): equal column masses, so the top-n
    /// cut falls inside a run of ties.
    pub tied: bool,
}

impl SparseCase {
    pub fn name(&self) -> String {
        format!(
            "sparse {}{}{} {}",
            self.base.name(),
            if self.structured { " structured" } else { "" },
            if self.tied { " tied keys" } else { "" },
            self.spec
        )
    }
}

/// The device vertical-slash matrix: awkward sizes, Sq != Sk and decode shapes, causal / full /
/// window / documents, GQA, head dims 64 / 128 / 256, f16, soft-cap, short `last`, budgets of
/// nothing and of everything, planted structure.
pub fn sparse_cases(quick: bool) -> Vec<SparseCase> {
    use DType::{BF16, F16};
    let vs = "vertical_slash(v=8,s=8,last=64,sink=4,local=64,dense_below=0)";
    let mut v = Vec::new();
    let mut add = |c: FwdCase, spec: &str, structured: bool| {
        v.push(SparseCase {
            base: c,
            spec: spec.into(),
            structured,
            tied: false,
        })
    };
    let sizes: &[(usize, usize)] = if quick {
        &[(7, 7), (113, 203), (1023, 1024)]
    } else {
        &[
            (1, 1),
            (7, 7),
            (65, 63),
            (113, 113),
            (100, 1000),
            (1, 4224),
            (1023, 1023),
            (4224, 4224),
        ]
    };
    let lb = "lowbit(tau=0.05,sink=4,local=64,dense_below=0)";
    for &(sq, sk) in sizes {
        for m in ["causal", "full"] {
            add(FwdCase::new(BF16, sq, sk, 128, m), vs, false);
            add(FwdCase::new(BF16, sq, sk, 128, m), lb, false);
        }
    }
    add(FwdCase::new(BF16, 4224, 4224, 128, "causal"), vs, true);
    add(FwdCase::new(BF16, 4224, 4224, 128, "causal"), lb, true);
    if quick {
        return v;
    }
    // The low-bit estimator: head dims, f16, soft-cap, GQA / MQA, a window mask (Partial
    // tiles off the diagonal), thresholds that keep little or everything, no reference keys.
    for d in [64, 256] {
        add(FwdCase::new(BF16, 777, 777, d, "causal"), lb, true);
    }
    add(FwdCase::new(F16, 513, 700, 128, "causal"), lb, false);
    let mut c = FwdCase::new(BF16, 600, 600, 128, "causal");
    c.softcap = Some(20.0);
    add(c, lb, true);
    let mut c = FwdCase::new(BF16, 640, 640, 128, "causal");
    (c.hq, c.hk) = (8, 1);
    add(c, lb, true);
    add(
        FwdCase::new(BF16, 900, 900, 128, "causal & window(255,0)"),
        lb,
        true,
    );
    for spec in [
        "lowbit(tau=1,sink=1,local=16,dense_below=0)",
        "lowbit(tau=0.001,sink=0,local=1,dense_below=0)",
        "lowbit(tau=0.5,sink=0,local=0,dense_below=0)",
        "lowbit(tau=0.2,sink=70,local=130,dense_below=0)",
    ] {
        add(FwdCase::new(BF16, 1000, 1100, 128, "causal"), spec, true);
    }
    add(
        FwdCase::new(BF16, 2000, 2000, 128, "causal"),
        "vertical_slash(v=16,s=4,last=64,sink=1,local=128,dense_below=0)",
        true,
    );
    for d in [64, 256] {
        add(FwdCase::new(BF16, 777, 777, d, "causal"), vs, false);
    }
    add(FwdCase::new(F16, 513, 700, 128, "causal"), vs, false);
    let mut c = FwdCase::new(BF16, 600, 600, 128, "causal");
    c.softcap = Some(20.0);
    add(c, vs, false);
    add(
        FwdCase::new(BF16, 900, 900, 128, "causal & window(255,0)"),
        vs,
        false,
    );
    add(
        FwdCase::new(BF16, 700, 700, 128, "causal"),
        "vertical_slash(v=4,s=2,last=7,sink=0,local=1,dense_below=0)",
        false,
    );
    add(
        FwdCase::new(BF16, 700, 700, 128, "causal"),
        "vertical_slash(v=0,s=0,last=64,sink=0,local=0,dense_below=0)",
        false,
    );
    add(
        FwdCase::new(BF16, 700, 700, 128, "causal"),
        "vertical_slash(v=100000,s=100000,last=64,dense_below=0)",
        false,
    );
    let mut c = FwdCase::new(BF16, 640, 640, 128, "causal");
    (c.hq, c.hk) = (8, 1);
    add(c, vs, false);
    for spec in [
        "vertical_slash(v=6,s=3,last=64,sink=0,local=0,dense_below=0)",
        "vertical_slash(v=1,s=0,last=64,sink=0,local=0,dense_below=0)",
    ] {
        v.push(SparseCase {
            base: FwdCase::new(BF16, 900, 900, 128, "full"),
            spec: spec.into(),
            structured: false,
            tied: true,
        });
    }
    v
}

/// Runs one sparse case: the device's masses against the f64 estimate, its schedule against the
/// CPU keep step on those masses (exactly), its output against the f64 oracle (small) or the CPU
/// forward (large) through the same schedule.
pub fn check_sparse(dev: &Arc<CudaDevice>, case: &SparseCase, seed: u64) -> CaseResult {
    let tol = out_tolerance(case.base.dtype);
    const MASS_TOL: f64 = 1e-3;
    let r = (|| -> Result<(f64, f64, String, bool)> {
        let mut bt = Built::new(&case.base, seed)?;
        if case.structured {
            let c = &case.base;
            (bt.q, bt.k) =
                crate::sparse::structured_qk(c.dtype, c.batch, c.sq, c.sk, c.hq, c.hk, c.d, seed);
        }
        if case.tied {
            let c = &case.base;
            let x = bt.k.data.to_f32_vec();
            let row = c.hk * c.d;
            let y: Vec<f32> = (0..c.batch * c.sk)
                .flat_map(|bj| {
                    let (b, j) = (bj / c.sk, bj % c.sk);
                    let src = (b * c.sk + j - j % 4) * row;
                    x[src..src + row].to_vec()
                })
                .collect();
            bt.k.data = crate::tensor::Buffer::from_f32(c.dtype, &y);
        }
        let (qv, kv, vv) = (bt.q.view("q")?, bt.k.view("k")?, bt.v.view("v")?);
        let spec = crate::sparse::SparseSpec::parse(&case.spec)?;
        if let crate::sparse::Method::LowBit { .. } = spec.method {
            // Flags within LB_MARGIN nats of ln tau may differ (f32 logits on the device).
            const LB_MARGIN: f64 = 0.01;
            let (chk, got, sel) = crate::sparse::cuda::check_lowbit(
                dev,
                [&qv, &kv, &vv],
                &bt.params,
                &spec,
                bt.spec(),
                LB_MARGIN,
            )?;
            let (e, l, against) =
                sparse_output_check(case, [&qv, &kv, &vv], &bt.params, &got, &sel)?;
            let ok = chk.tiles_differ == 0;
            let detail = format!(
                "density {:.3}; of {} candidate tiles, flags != CPU estimator {} (must be 0), within {LB_MARGIN} of ln tau {}; output vs {against} through the device's schedule",
                chk.density, chk.candidates, chk.tiles_differ, chk.tiles_near
            );
            return Ok((e, l, detail, ok));
        }
        let (chk, got, sel) = crate::sparse::cuda::check_vertical_slash(
            dev,
            &qv,
            &kv,
            &vv,
            &bt.params,
            &spec,
            bt.spec(),
        )?;
        let (e, l, against) = sparse_output_check(case, [&qv, &kv, &vv], &bt.params, &got, &sel)?;
        let ok = chk.mass_err <= MASS_TOL && chk.rows_differ == 0;
        let detail = format!(
            "density {:.3}; mass err {:.1e} (tol {MASS_TOL:.0e}); rows != CPU keep step on the device's masses {} (must be 0), != CPU estimator in f64 {}; output vs {against} through the device's schedule",
            chk.density, chk.mass_err, chk.rows_differ, chk.rows_differ_f64
        );
        Ok((e, l, detail, ok))
    })();
    CaseResult::checked("sparse", case.name(), r, tol)
}

/// The device's output through its own schedule against the f64 oracle (small) or the CPU
/// forward (large) through the same schedule: (out error, LSE error, which).
fn sparse_output_check(
    case: &SparseCase,
    [qv, kv, vv]: [&crate::TensorView; 3],
    params: &AttnParams,
    got: &crate::attention::AttnOutput,
    sel: &crate::sparse::Selection,
) -> Result<(f64, f64, &'static str)> {
    let c = &case.base;
    let work = c.batch * c.hq * c.sq * c.sk * c.d;
    Ok(if work <= 1 << 27 {
        let el = crate::sparse::Elements {
            s: &sel.schedule,
            rows: sel.rows,
        };
        let r = attention_f64(qv, kv, vv, params, &|b, h, i, j| el.allowed(b, h, i, j))?;
        let (e, l) = compare(&got.out, &got.lse, &r);
        (e, l, "f64 oracle")
    } else {
        let cpu = crate::forward(qv, kv, vv, params, sel.mask())?;
        let (e, l) = compare_outputs(&got.out, &got.lse, &cpu.out, &cpu.lse);
        (e, l, "CPU path")
    })
}

/// Refusals of the device estimator: methods it lacks, `last` past its bound, skip-softmax
/// on a head dim without the warp-specialized kernel, document ids (it estimates over the whole packed sequence; the CPU estimator works per
/// document).
pub fn check_sparse_errors(dev: &Arc<CudaDevice>) -> Vec<CaseResult> {
    let mut out = Vec::new();
    let mut docs = FwdCase::new(DType::BF16, 300, 300, 64, "causal & document");
    docs.batch = 2;
    for (spec, mask, want) in [
        (
            "topmass(gamma=0.9,dense_below=0)",
            "full",
            "no CUDA estimator",
        ),
        ("vertical_slash(last=100,dense_below=0)", "full", "last=100"),
        (
            "skip(factor=10,dense_below=0)",
            "d32 full",
            "warp-specialized",
        ),
        (
            "vertical_slash(dense_below=0)",
            "causal & document",
            "not per document",
        ),
        (
            "lowbit(dense_below=0)",
            "causal & document",
            "not per document",
        ),
        ("lowbit(dense_below=0,dense_last=8)", "causal", "dense_last"),
    ] {
        let r = (|| -> Result<()> {
            let mut c = docs.clone();
            c.mask = mask.trim_start_matches("d32 ").into();
            if mask.starts_with("d32 ") {
                c.d = 32;
            }
            let bt = Built::new(&c, 5)?;
            let (qv, kv, vv) = (bt.q.view("q")?, bt.k.view("k")?, bt.v.view("v")?);
            let spec = crate::sparse::SparseSpec::parse(spec)?;
            crate::sparse::cuda::forward(dev, &qv, &kv, &vv, &bt.params, &spec, bt.spec())
                .map(|_| ())
        })();
        out.push(CaseResult::refused(
            "sparse",
            format!("sparse bad input: {spec} `{mask}`"),
            r,
            want,
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every mask case of the matrix (quick and full, 512 tokens) gives, through the plans' own
    /// host step (`MaskHost`: schedule and program for the kernel's tiles), a program that
    /// compiles into the Hopper kernels it would meet: the forward of `TileCfg::choose` and the
    /// one-pass backward, fast and deterministic, at D 64 and 128, in plain tile order (the
    /// plans' patch-order and bit-table variants add defines not built here). NVRTC only, no
    /// GPU: a mask whose program a kernel cannot compile fails here instead of on the device's
    /// full selftest (as document masks did in the backward until 2026-12-06). Kernels are
    /// compiled once per distinct source and defines (mask constants are arguments, so most
    /// masks share one).
    #[test]
    fn mask_case_kernels_compile_with_nvrtc() {
        use crate::attention::Dims;
        use crate::cuda::backward::{kernel_build as bwd_build, BwdKernel, BwdSteps};
        use crate::cuda::forward::{
            kernel_build as fwd_build, MaskHost, TileCfg, FWD_SOFTMAX_DEFAULT,
        };
        if crate::cuda::compile::test_programs().is_none() {
            return;
        }
        let mut seen = std::collections::HashSet::new();
        let mut jobs = Vec::new();
        let mut masks = 0;
        for c in forward_cases(false)
            .into_iter()
            .filter(|c| c.sq == 512 && c.sk == 512)
        {
            masks += 1;
            let bt = Built::new(&c, 7).unwrap();
            for d in [64, 128] {
                let dims = Dims {
                    batch: c.batch,
                    sq: c.sq,
                    sk: c.sk,
                    hq: c.hq,
                    hk: c.hk,
                    d,
                    dv: d,
                };
                let params = AttnParams::default();
                let tile = TileCfg::choose(d, c.sk, (9, 0));
                let h = MaskHost::new(bt.spec(), tile.br, tile.bc, dims).unwrap();
                let (src, entry, tag, defines) =
                    fwd_build(&tile, c.dtype, d, &params, &h.program, FWD_SOFTMAX_DEFAULT);
                if seen.insert((src.clone(), defines.clone())) {
                    jobs.push((format!("{} fwd{tag} {entry} d{d}", c.mask), src, defines));
                }
                for det in [false, true] {
                    let kernel = BwdKernel::choose(d, (9, 0), det);
                    let BwdKernel::OnePassWgmma { br, bc, .. } = kernel else {
                        panic!("D {d}: not the one-pass kernel on Hopper");
                    };
                    let h = MaskHost::new(bt.spec(), br, bc, dims).unwrap();
                    let (src, variant, _, _, _, defines) = bwd_build(
                        kernel,
                        c.dtype,
                        d,
                        &params,
                        &h.program,
                        BwdSteps::defaults(),
                    );
                    if seen.insert((src.clone(), defines.clone())) {
                        jobs.push((format!("{} {variant}", c.mask), src, defines));
                    }
                }
            }
        }
        assert!(masks >= 20, "{masks} mask cases");
        // Two threads: NVRTC compiles distinct programs concurrently.
        let next = std::sync::atomic::AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..2 {
                s.spawn(|| loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some((name, src, defines)) = jobs.get(i) else {
                        break;
                    };
                    let file = format!("test_mask_case_{i}");
                    if let Err(e) = crate::cuda::compile::compile(&file, src, "sm_90a", defines) {
                        panic!("{name}: {e}");
                    }
                });
            }
        });
        eprintln!("{} kernels from {masks} mask cases compiled", jobs.len());
    }

    /// The matrix's mask cases are consistent on the CPU (no GPU needed): for every mask case
    /// of the quick and full matrices at 512 tokens, the CPU forward through the case's spec
    /// (`gated(T):EXPR` included) equals the f64 oracle of the case's `allowed`, so a GPU
    /// failure of one of them points at the kernels.
    #[test]
    fn mask_cases_agree_with_their_oracle_on_the_cpu() {
        let mut n = 0;
        for c in forward_cases(false)
            .into_iter()
            .filter(|c| c.sq == 512 && c.sk == 512)
        {
            let mut c = c;
            c.dtype = DType::F32;
            c.d = 32;
            let bt = Built::new(&c, 7).unwrap();
            let (qv, kv, vv) = (
                bt.q.view("q").unwrap(),
                bt.k.view("k").unwrap(),
                bt.v.view("v").unwrap(),
            );
            let got = crate::forward(&qv, &kv, &vv, &bt.params, bt.spec()).unwrap();
            let r = attention_f64(&qv, &kv, &vv, &bt.params, &|b, _, i, j| bt.allowed(b, i, j))
                .unwrap();
            let (e, l) = compare(&got.out, &got.lse, &r);
            assert!(
                e <= out_tolerance(DType::F32) && l <= LSE_TOLERANCE,
                "{}: out {e:e}, lse {l:e}",
                c.name()
            );
            n += 1;
        }
        assert!(n >= 20, "{n} mask cases");
    }
}

// ---- Pooled attention map (group `map`) ------------------------------------------------------

/// One case of the forward that also writes the block-pooled attention map ([`FwdPlan::with_map`](
/// super::FwdPlan::with_map)): a forward case, the map's block and skip-softmax's lambda.
#[derive(Clone, Debug)]
pub struct MapCase {
    pub fwd: FwdCase,
    pub block: usize,
    pub skip: Option<f32>,
}

impl MapCase {
    pub fn name(&self) -> String {
        format!(
            "map {} block {}{}",
            self.fwd.name(),
            self.block,
            self.skip
                .map(|l| format!(" skip {l:e}"))
                .unwrap_or_default()
        )
    }
}

/// Awkward sizes, decode rows and Sq != Sk; causal, full, a window, documents and an explicit
/// block mask; D 64 / 128 / 256 (the warp-specialized kernel's three tile shapes) and a padded
/// D 96; GQA 4 / 2 and 8 / 1; f16; soft-cap; blocks 64, 128 and 192 (not a tile multiple);
/// skip-softmax.
pub fn map_cases(quick: bool) -> Vec<MapCase> {
    use DType::{BF16, F16};
    let case = |dt, sq, sk, d, mask: &str, block| MapCase {
        fwd: FwdCase::new(dt, sq, sk, d, mask),
        block,
        skip: None,
    };
    let mut v = vec![
        case(BF16, 1, 1, 128, "causal", 64),
        case(BF16, 7, 7, 64, "full", 64),
        case(BF16, 63, 65, 128, "causal", 64),
        case(BF16, 113, 203, 256, "causal", 128),
        case(BF16, 1, 4224, 128, "causal", 128),
        case(F16, 100, 1000, 64, "full", 192),
        case(BF16, 1023, 1023, 128, "causal & window(255,0)", 128),
        case(BF16, 65, 4224, 96, "full", 64),
    ];
    if !quick {
        v.push(case(BF16, 4224, 4224, 128, "causal", 128));
        v.push(case(BF16, 2000, 2000, 256, "causal", 192));
        v.push(case(BF16, 700, 700, 64, "causal & document", 64));
        v.push(case(BF16, 1000, 1000, 128, "blocks(128)", 256));
        let mut g = case(BF16, 513, 777, 128, "causal", 64);
        (g.fwd.hq, g.fwd.hk) = (8, 1);
        g.fwd.batch = 2;
        v.push(g);
        let mut c = case(BF16, 300, 900, 128, "causal", 128);
        c.fwd.softcap = Some(20.0);
        v.push(c);
        let mut s = case(BF16, 2048, 2048, 128, "causal", 128);
        s.skip = Some(1e-4);
        v.push(s);
    }
    v
}

/// The GPU's output and LSE against the CPU forward, its map against the f64 oracle's pooled
/// probabilities (`reference::attention_map_f64`) when the problem is small, else against the
/// CPU forward's map (whose bf16 path rounds P to bf16, up to 2^-9 of an entry: the looser
/// tolerance there). No skip-softmax on the reference side: a skip case's dropped tiles hold
/// probabilities below lambda, so each entry may lack up to block x lambda of mass and lambda
/// of max. Map error: the largest |GPU - reference| over the entries, relative to the largest
/// reference entry, of mass and of max.
pub fn check_map(dev: &Arc<CudaDevice>, case: &MapCase, seed: u64) -> CaseResult {
    let tol = out_tolerance(case.fwd.dtype);
    let r = (|| -> Result<(f64, f64, String, bool)> {
        let bt = Built::new(&case.fwd, seed)?;
        let (qv, kv, vv) = (bt.q.view("q")?, bt.k.view("k")?, bt.v.view("v")?);
        let params = AttnParams {
            skip_below: case.skip,
            ..bt.params
        };
        let (got, gm) =
            super::forward_with_map(dev, &qv, &kv, &vv, &params, bt.spec(), case.block)?;
        let (cpu, cm) = crate::forward_with_map(&qv, &kv, &vv, &bt.params, bt.spec(), case.block)?;
        let (e, l) = compare_outputs(&got.out, &got.lse, &cpu.out, &cpu.lse);
        let shape = |m: &crate::AttnMap| (m.batch, m.heads, m.q_blocks, m.k_blocks);
        if shape(&gm) != shape(&cm) {
            return Ok((
                e,
                l,
                format!("map shape {:?} vs {:?}", shape(&gm), shape(&cm)),
                false,
            ));
        }
        let c = &case.fwd;
        let oracle = c.batch * c.hq * c.sq * c.sk * c.d <= 1 << 28;
        let (want_mass, want_max, against, map_tol) = if oracle {
            let (m, x) = crate::reference::attention_map_f64(
                &qv,
                &kv,
                &vv,
                &bt.params,
                &|b, _, i, j| bt.allowed(b, i, j),
                case.block,
            )?;
            let f = |v: Vec<f64>| v.into_iter().map(|x| x as f32).collect::<Vec<f32>>();
            (f(m), f(x), "f64 oracle", 1e-4)
        } else {
            (cm.mass.clone(), cm.max.clone(), "CPU map", 4e-3)
        };
        let slack = case.skip.map_or(0.0, |l| l as f64);
        let err = |g: &[f32], c: &[f32], allow: f64| -> f64 {
            let top = c.iter().fold(0f64, |a, &x| a.max(x as f64)).max(1e-30);
            g.iter()
                .zip(c)
                .map(|(&a, &b)| ((a as f64 - b as f64).abs() - allow).max(0.0))
                .fold(0f64, f64::max)
                / top
        };
        let em = err(&gm.mass, &want_mass, slack * case.block as f64);
        let ex = err(&gm.max, &want_max, slack);
        let total: f64 = gm.mass.iter().map(|&x| x as f64).sum();
        Ok((
            e,
            l,
            format!("vs CPU path; map vs {against}: mass err {em:.2e}, max err {ex:.2e} (tol {map_tol:e}), mass total {total:.3}"),
            em <= map_tol && ex <= map_tol,
        ))
    })();
    let tol = if case.skip.is_some() {
        tol.max(1e-2)
    } else {
        tol
    };
    CaseResult::checked("map", case.name(), r, tol)
}

/// The map group: every case, then a plan whose kernel is not the warp-specialized one (D 32)
/// and a block that is not a multiple of 64, each refused by name.
pub fn map_selftest(
    dev: &Arc<CudaDevice>,
    quick: bool,
    keep: &dyn Fn(&str) -> bool,
) -> Vec<CaseResult> {
    let mut out: Vec<CaseResult> = map_cases(quick)
        .iter()
        .enumerate()
        .filter(|(_, c)| keep(&c.name()))
        .map(|(n, c)| check_map(dev, c, 17000 + 41 * n as u64))
        .collect();
    for (d, block, want) in [(32, 64, "warp-specialized"), (128, 100, "multiple of 64")] {
        let name = format!("map bad input: D {d}, block {block}");
        if !keep(&name) {
            continue;
        }
        let r = (|| -> Result<()> {
            let c = FwdCase::new(DType::BF16, 70, 70, d, "causal");
            let bt = Built::new(&c, 3)?;
            let (qv, kv, vv) = (bt.q.view("q")?, bt.k.view("k")?, bt.v.view("v")?);
            super::forward_with_map(dev, &qv, &kv, &vv, &bt.params, bt.spec(), block).map(|_| ())
        })();
        out.push(CaseResult::refused("map", name, r, want));
    }
    out
}

/// One gathered-keys case ([`super::FwdPlan::with_gather`]): a forward case, the probability
/// of each key outside the whole tiles in the seeded selection
/// ([`crate::sparse::gather::TileKeys::synthetic`], one per query head), skip-softmax.
pub struct GatherCase {
    pub fwd: FwdCase,
    pub p: f64,
    pub skip: Option<f32>,
}

impl GatherCase {
    pub fn name(&self) -> String {
        format!(
            "gather {} keys {}{}",
            self.fwd.name(),
            self.p,
            self.skip
                .map(|l| format!(" skip {l:e}"))
                .unwrap_or_default()
        )
    }
}

/// Awkward sizes, a decode row and Sq != Sk; causal, full, a window (keys the window drops:
/// tested chunks), documents; D 64 / 128 / 256 and a padded D 96; f16; GQA 8 / 1 with batch 2;
/// soft-cap; skip-softmax; every key kept and none (tiles only).
pub fn gather_cases(quick: bool) -> Vec<GatherCase> {
    use DType::{BF16, F16};
    let case = |dt, sq, sk, d, mask: &str, p| GatherCase {
        fwd: FwdCase::new(dt, sq, sk, d, mask),
        p,
        skip: None,
    };
    let mut v = vec![
        case(BF16, 1, 1, 128, "causal", 0.5),
        case(BF16, 7, 7, 64, "full", 0.5),
        case(BF16, 63, 65, 128, "causal", 0.5),
        case(BF16, 113, 203, 256, "causal", 0.4),
        case(BF16, 1, 4224, 128, "causal", 0.2),
        case(F16, 100, 1000, 64, "full", 0.3),
        case(BF16, 1023, 1023, 128, "causal & window(255,0)", 0.3),
        case(BF16, 65, 4224, 96, "full", 0.1),
    ];
    if !quick {
        v.push(case(BF16, 4224, 4224, 128, "causal", 0.15));
        v.push(case(BF16, 2000, 2000, 256, "causal", 0.2));
        v.push(case(BF16, 700, 700, 64, "causal & document", 0.3));
        v.push(case(BF16, 600, 600, 128, "causal", 1.0));
        v.push(case(BF16, 600, 600, 128, "causal", 0.0));
        let mut g = case(BF16, 513, 777, 128, "causal", 0.3);
        (g.fwd.hq, g.fwd.hk) = (8, 1);
        g.fwd.batch = 2;
        v.push(g);
        let mut c = case(BF16, 300, 900, 128, "causal", 0.3);
        c.fwd.softcap = Some(20.0);
        v.push(c);
        let mut s = case(BF16, 2048, 2048, 128, "causal", 0.2);
        s.skip = Some(1e-4);
        v.push(s);
    }
    v
}

/// The GPU's gathered forward against the f64 oracle over `mask & selection` when the problem is
/// small, else against the CPU path (the selection as a row mask over the tiles it touches). The
/// detail names the kept tiles and chunks and the pairs kept.
pub fn check_gather(dev: &Arc<CudaDevice>, case: &GatherCase, seed: u64) -> CaseResult {
    use crate::sparse::gather::TileKeys;
    let tol = out_tolerance(case.fwd.dtype);
    let r = (|| -> Result<(f64, f64, String, bool)> {
        let c = &case.fwd;
        let bt = Built::new(c, seed)?;
        let (qv, kv, vv) = (bt.q.view("q")?, bt.k.view("k")?, bt.v.view("v")?);
        let (tq, tk) = super::gather_tiles(dev, c.d, c.sk, &bt.spec())?;
        let sel = TileKeys::synthetic((tq, tk), (c.sq, c.sk), (1, c.hq), case.p, seed + 7)?;
        let params = AttnParams {
            skip_below: case.skip,
            ..bt.params
        };
        let plan = super::FwdPlan::with_gather(
            dev,
            crate::attention::validate("gather", &qv, &kv, &vv)?,
            c.dtype,
            &params,
            bt.spec(),
            &sel,
        )?;
        let (tiles, chunks) = plan.gather_counts().unwrap_or_default();
        let got = super::forward::run_host(dev, &plan, &qv, &kv, &vv)?;
        let keeps =
            |b: usize, h: usize, i: usize, j: usize| bt.allowed(b, i, j) && sel.keeps(b, h, i, j);
        let (e, l, against, want) = if c.batch * c.hq * c.sq * c.sk * c.d <= 1 << 28 {
            let r = attention_f64(&qv, &kv, &vv, &bt.params, &keeps)?;
            let (e, l) = compare(&got.out, &got.lse, &r);
            (e, l, "f64 oracle", r.out)
        } else {
            let cpu = crate::sparse::gather::forward(&qv, &kv, &vv, &bt.params, bt.spec(), &sel)?;
            let (e, l) = compare_outputs(&got.out, &got.lse, &cpu.out, &cpu.lse);
            let want = cpu
                .out
                .data
                .to_f32_vec()
                .into_iter()
                .map(f64::from)
                .collect();
            (e, l, "CPU path", want)
        };
        // The worst row (b, i, h) and how many rows are off by more than the tolerance.
        let g = got.out.data.to_f32_vec();
        let top = want
            .iter()
            .fold(1e-30f64, |m: f64, &x: &f64| m.max(x.abs()));
        let (mut worst, mut bad) = ((0.0f64, 0usize), 0usize);
        for (r, (a, w)) in g.chunks(c.d).zip(want.chunks(c.d)).enumerate() {
            let d = a
                .iter()
                .zip(w)
                .map(|(&x, &y)| (x as f64 - y).abs())
                .fold(0.0, f64::max)
                / top;
            bad += (d > tol) as usize;
            if d > worst.0 {
                worst = (d, r);
            }
        }
        let (b, i, h) = (
            worst.1 / (c.sq * c.hq),
            worst.1 / c.hq % c.sq,
            worst.1 % c.hq,
        );
        Ok((
            e,
            l,
            format!(
                "vs {against}; tiles {tiles}, chunks {chunks} of {tk} keys; rows off {bad}, worst (b {b}, i {i}, h {h}) {:.1e}",
                worst.0
            ),
            true,
        ))
    })();
    let tol = if case.skip.is_some() {
        tol.max(1e-2)
    } else {
        tol
    };
    CaseResult::checked("gather", case.name(), r, tol)
}

/// The backward through a gathered selection on the GPU ([`super::BwdPlan::with_gather`]): the
/// case's seeded selection at 64 x 64 tiles (not the backward kernel's: the plan re-tiles it),
/// the forward's out and LSE from the CPU path, a random dO; dQ, dK, dV (deterministic, twice
/// bit-identical, and fast) against the f64 gradient oracle over `mask & selection` when small,
/// else the CPU's [`crate::sparse::gather::backward`]. Errors as in [`check_backward`].
pub fn check_gather_backward(dev: &Arc<CudaDevice>, case: &GatherCase, seed: u64) -> CaseResult {
    use crate::sparse::gather::TileKeys;
    let c = &case.fwd;
    let tol = crate::testing::grad_tolerance(c.dtype);
    let r = (|| -> Result<(f64, String)> {
        let bt = Built::new(c, seed)?;
        let (qv, kv, vv) = (bt.q.view("q")?, bt.k.view("k")?, bt.v.view("v")?);
        let sel = TileKeys::synthetic((64, 64), (c.sq, c.sk), (1, c.hq), case.p, seed + 7)?;
        let fwd = crate::sparse::gather::forward(&qv, &kv, &vv, &bt.params, bt.spec(), &sel)?;
        let ov = fwd.out.view("out")?;
        let dout = random_tensor(c.dtype, &[c.batch, c.sq, c.hq, c.d], 1.0, seed + 9);
        let dov = dout.view("do")?;
        let run = |deterministic: bool| {
            super::backward::backward_gathered(
                dev,
                &qv,
                &kv,
                &vv,
                &ov,
                &fwd.lse,
                &dov,
                &bt.params,
                bt.spec(),
                &sel,
                &crate::BackwardParams {
                    deterministic,
                    ..Default::default()
                },
            )
        };
        let (g, g2, gf) = (run(true)?, run(true)?, run(false)?);
        let (want, how): ([Vec<f64>; 3], &str) = if c.batch * c.hq * c.sq * c.sk * c.d <= 1 << 26 {
            let r = crate::reference::attention_backward_f64(
                &qv,
                &kv,
                &vv,
                &dov,
                &bt.params,
                &|b, h, i, j| bt.allowed(b, i, j) && sel.keeps(b, h, i, j),
            )?;
            ([r.dq, r.dk, r.dv], "vs f64 gradient oracle")
        } else {
            let cg = crate::sparse::gather::backward(
                &qv,
                &kv,
                &vv,
                &ov,
                &fwd.lse,
                &dov,
                &bt.params,
                bt.spec(),
                &sel,
                &crate::BackwardParams::default(),
            )?;
            let f = |t: &Tensor| t.data.to_f32_vec().iter().map(|&x| x as f64).collect();
            (
                [f(&cg.dq), f(&cg.dk), f(&cg.dv)],
                "vs CPU gathered backward",
            )
        };
        let Some((ed, ef)) = grad_errors([&g, &g2, &gf], &want) else {
            return Ok((
                f64::INFINITY,
                "deterministic mode differs between two runs".into(),
            ));
        };
        let max3 = |e: [f64; 3]| e.into_iter().fold(0.0, f64::max);
        Ok((
            max3(ed).max(max3(ef)),
            format!(
                "{how}; dq/dk/dv deterministic {:.1e}/{:.1e}/{:.1e} (bit-identical twice), fast {:.1e}/{:.1e}/{:.1e}",
                ed[0], ed[1], ed[2], ef[0], ef[1], ef[2]
            ),
        ))
    })();
    let (err, detail) = match r {
        Ok((e, d)) => (e, d),
        Err(e) => (f64::INFINITY, format!("error: {e}")),
    };
    CaseResult {
        group: "gather",
        name: format!("backward {}", case.name()),
        passed: err <= tol,
        err,
        tol,
        lse_err: 0.0,
        detail,
    }
}

/// The gather group: every case, then bad input refused by name: a selection at other tiles than
/// the kernel's, a head dim the warp-specialized kernel does not take (D 32), skip-softmax at D
/// 256.
pub fn gather_selftest(
    dev: &Arc<CudaDevice>,
    quick: bool,
    keep: &dyn Fn(&str) -> bool,
) -> Vec<CaseResult> {
    use crate::sparse::gather::TileKeys;
    let mut out: Vec<CaseResult> = gather_cases(quick)
        .iter()
        .enumerate()
        .filter(|(_, c)| keep(&c.name()))
        .map(|(n, c)| check_gather(dev, c, 23000 + 37 * n as u64))
        .collect();
    // The backward through the same kind of selection: the cases up to ~1100 x 1100 without
    // skip-softmax (forward only) whose head dim the CUDA backward takes.
    for (n, c) in gather_cases(quick).iter().enumerate() {
        let f = &c.fwd;
        let name = format!("backward {}", c.name());
        if f.sq * f.sk <= 1100 * 1100 && c.skip.is_none() && f.d % 16 == 0 && keep(&name) {
            out.push(check_gather_backward(dev, c, 24000 + 37 * n as u64));
        }
    }
    for (d, tiles, skip, want) in [
        (128, Some((64, 64)), None, "must be the mask schedule's"),
        (32, Some((64, 64)), None, "warp-specialized"),
        (256, None, Some(1e-3), "skip-softmax"),
    ] {
        let name = format!("gather bad input: D {d}, tiles {tiles:?}, skip {skip:?}");
        if !keep(&name) {
            continue;
        }
        let r = (|| -> Result<()> {
            let c = FwdCase::new(DType::BF16, 300, 300, d, "causal");
            let bt = Built::new(&c, 3)?;
            let (qv, kv, vv) = (bt.q.view("q")?, bt.k.view("k")?, bt.v.view("v")?);
            let t = match tiles {
                Some(t) => t,
                None => super::gather_tiles(dev, d, c.sk, &bt.spec())?,
            };
            let sel = TileKeys::synthetic(t, (c.sq, c.sk), (1, 1), 0.3, 5)?;
            let params = AttnParams {
                skip_below: skip,
                ..bt.params
            };
            super::forward_gathered(dev, &qv, &kv, &vv, &params, bt.spec(), &sel).map(|_| ())
        })();
        out.push(CaseResult::refused("gather", name, r, want));
    }
    out
}

/// One case of `columns` in the gathered form on the device ([`crate::sparse::columns`]): a
/// forward case, the spec, structured inputs (sinks, hubs, band, slashes:
/// [`crate::sparse::synthetic::structured_qk`]) or plain Gaussian ones.
pub struct ColumnsCase {
    pub fwd: FwdCase,
    pub spec: &'static str,
    pub structured: bool,
}

impl ColumnsCase {
    pub fn name(&self) -> String {
        format!(
            "columns {} {}{}",
            self.fwd.name(),
            self.spec,
            if self.structured { " structured" } else { "" }
        )
    }
}

/// Awkward sizes, Sq != Sk, a decode row, causal / full / a window (Partial tiles outside the
/// band: tested chunks), GQA with batch 2, D 64 / 96 / 128, f16, soft-cap; rows 1 / 2 / 3 / 4 / 8 / 16,
/// with and without the check and the band; Gaussian inputs at gamma 0.5 (most rows gathered).
pub fn columns_cases(quick: bool) -> Vec<ColumnsCase> {
    use DType::{BF16, F16};
    let case = |dt, sq, sk, d, mask: &str, spec, structured| ColumnsCase {
        fwd: FwdCase::new(dt, sq, sk, d, mask),
        spec,
        structured,
    };
    let std = "columns(gamma=0.97,rows=4,check=0.92,sink=4,local=64,dense_below=0)";
    let mut v = vec![
        case(BF16, 1023, 1023, 128, "causal", std, true),
        case(
            BF16,
            65,
            1000,
            64,
            "causal",
            "columns(gamma=0.9,rows=8,sink=4,local=64,dense_below=0)",
            true,
        ),
        case(BF16, 1, 4224, 128, "causal", std, true),
        case(
            BF16,
            700,
            700,
            128,
            "causal",
            "columns(gamma=0.5,rows=4,sink=4,local=64,dense_below=0)",
            false,
        ),
        case(
            F16,
            300,
            900,
            96,
            "full",
            "columns(gamma=0.6,rows=1,sink=2,local=0,dense_below=0)",
            false,
        ),
        // The int8 estimate (sparse_lowbit.cu's quantizers, cl_logits8), both mass paths.
        case(
            BF16,
            1023,
            1023,
            128,
            "causal",
            "columns(gamma=0.97,rows=4,check=0.92,sink=4,local=64,int8=1,dense_below=0)",
            true,
        ),
        case(
            BF16,
            700,
            900,
            64,
            "causal",
            "columns(gamma=0.8,rows=3,sink=2,local=32,int8=1,dense_below=0)",
            false,
        ),
    ];
    if !quick {
        v.push(case(BF16, 4224, 4224, 128, "causal", std, true));
        v.push(case(
            BF16,
            2000,
            2000,
            128,
            "causal & window(600,0)",
            "columns(gamma=0.9,rows=8,sink=4,local=64,dense_below=0)",
            true,
        ));
        v.push(case(
            BF16,
            1500,
            1500,
            64,
            "causal",
            "columns(gamma=0.97,rows=8,check=0.92,sink=4,local=64,dense_below=0)",
            true,
        ));
        let mut g = case(
            BF16,
            513,
            777,
            128,
            "causal",
            "columns(gamma=0.8,rows=4,sink=4,local=32,dense_below=0)",
            true,
        );
        (g.fwd.hq, g.fwd.hk) = (8, 1);
        g.fwd.batch = 2;
        v.push(g);
        let mut c = case(
            BF16,
            1100,
            1100,
            128,
            "causal",
            "columns(gamma=0.9,rows=2,sink=4,local=64,dense_below=0)",
            true,
        );
        c.fwd.softcap = Some(20.0);
        v.push(c);
        v.push(case(
            BF16,
            800,
            800,
            128,
            "causal",
            "columns(gamma=0.999,rows=4,check=0.999,sink=4,local=64,dense_below=0)",
            false,
        ));
        // Rows a tile's sampled rows cannot sum in registers (3: across the fragment's halves;
        // 16: both halves), the mass pass through shared memory; and past a kinds window (CL_KW
        // key tiles) at 5000 keys.
        for (sq, spec) in [
            (
                1300,
                "columns(gamma=0.9,rows=3,sink=4,local=64,dense_below=0)",
            ),
            (
                5000,
                "columns(gamma=0.9,rows=16,check=0.5,sink=4,local=64,dense_below=0)",
            ),
        ] {
            v.push(case(BF16, sq, sq, 128, "causal", spec, true));
        }
    }
    // The dense fallback (fewer keys than the device's default dense_below): every tile.
    v.push(case(
        BF16,
        900,
        900,
        128,
        "causal",
        "columns(gamma=0.9,rows=4,sink=4,local=64)",
        true,
    ));
    v
}

/// The device's selection against the plain reference ([`crate::sparse::columns::reference`]:
/// the query tiles computed whole alike, the gathered keys' Jaccard index >= 0.98, f32 against
/// f64 at the bins' edges), and the gathered forward through it against the f64 oracle over
/// `mask & selection` (small problems) or the CPU path.
pub fn check_columns(dev: &Arc<CudaDevice>, case: &ColumnsCase, seed: u64) -> CaseResult {
    use crate::sparse::columns::{reference, ColumnsArgs, ColumnsPlan};
    let tol = out_tolerance(case.fwd.dtype);
    let r = (|| -> Result<(f64, f64, String, bool)> {
        let c = &case.fwd;
        let mut bt = Built::new(c, seed)?;
        if case.structured {
            let (q, k) = crate::sparse::synthetic::structured_qk(
                c.dtype,
                c.batch,
                c.sq,
                c.sk,
                c.hq,
                c.hk,
                c.d,
                seed + 5,
            );
            (bt.q, bt.k) = (q, k);
        }
        let (qv, kv, vv) = (bt.q.view("q")?, bt.k.view("k")?, bt.v.view("v")?);
        let spec = crate::sparse::SparseSpec::parse(case.spec)?;
        let dims = crate::attention::validate("columns", &qv, &kv, &vv)?;
        let mut plan = ColumnsPlan::new(dev, dims, c.dtype, &bt.params, &spec, bt.spec())?;
        let (qd, kd, vd) = (
            super::DevTensor::upload(dev, "q", &qv)?,
            super::DevTensor::upload(dev, "k", &kv)?,
            super::DevTensor::upload(dev, "v", &vv)?,
        );
        let mut o = super::DevTensor::alloc(dev, [c.batch, c.sq, c.hq, c.d], c.dtype)?;
        let mut lse = dev.alloc_f32(c.batch * c.hq * c.sq)?;
        plan.launch_on(dev.stream(), &qd, &kd, &vd, &mut o, &mut lse)?;
        dev.synchronize()?;
        let got = crate::attention::AttnOutput {
            out: o.download(dev)?,
            lse: dev.download(&lse)?,
        };
        let sel = plan.selection()?;
        let rows = bt.bound.as_ref().map(|b| b as &dyn crate::mask::RowMask);
        let want_sel = if plan.fallback {
            // Every candidate tile whole.
            let cand = plan.candidates();
            let tiles: Vec<Vec<u32>> = (0..c.batch * c.hq * cand.q_tiles)
                .map(|r| {
                    let (b, h, qt) = (
                        r / (c.hq * cand.q_tiles),
                        r / cand.q_tiles % c.hq,
                        r % cand.q_tiles,
                    );
                    cand.row(b, h, qt).iter().map(|e| e.k_tile).collect()
                })
                .collect();
            let n = tiles.len();
            let size = (c.sq, c.sk);
            crate::sparse::gather::TileKeys::new(
                plan.tiles(),
                size,
                (c.batch, c.hq),
                tiles,
                vec![Vec::new(); n],
            )?
        } else {
            reference(
                &qv,
                &kv,
                &bt.params,
                &ColumnsArgs::of(&spec)?,
                plan.candidates(),
                rows,
            )?
        };
        // Agreement: rows whose whole tiles differ, and the keys' Jaccard index.
        let (mut rows_off, mut inter, mut union, mut keys_n, mut whole_rows) =
            (0usize, 0usize, 0usize, 0usize, 0usize);
        let mut tiles_n = 0usize;
        let q_tiles = sel.q_tiles;
        for b in 0..c.batch {
            for h in 0..c.hq {
                for qt in 0..q_tiles {
                    let (ta, tb) = (sel.tiles_of(b, h, qt), want_sel.tiles_of(b, h, qt));
                    rows_off += (ta != tb) as usize;
                    whole_rows += (sel.keys_of(b, h, qt).is_empty()) as usize;
                    let (ka, kb) = (sel.keys_of(b, h, qt), want_sel.keys_of(b, h, qt));
                    let i = ka.iter().filter(|j| kb.binary_search(j).is_ok()).count();
                    inter += i;
                    union += ka.len() + kb.len() - i;
                    keys_n += ka.len();
                    tiles_n += ta.len();
                }
            }
        }
        let jac = if union == 0 {
            1.0
        } else {
            inter as f64 / union as f64
        };
        let total_rows = c.batch * c.hq * q_tiles;
        let agree = rows_off * 50 <= total_rows && jac >= 0.98;
        let keeps =
            |b: usize, h: usize, i: usize, j: usize| bt.allowed(b, i, j) && sel.keeps(b, h, i, j);
        let (e, l, against) = if c.batch * c.hq * c.sq * c.sk * c.d <= 1 << 28 {
            let r = attention_f64(&qv, &kv, &vv, &bt.params, &keeps)?;
            let (e, l) = compare(&got.out, &got.lse, &r);
            (e, l, "f64 oracle")
        } else {
            let cpu = crate::sparse::gather::forward(&qv, &kv, &vv, &bt.params, bt.spec(), &sel)?;
            let (e, l) = compare_outputs(&got.out, &got.lse, &cpu.out, &cpu.lse);
            (e, l, "CPU path")
        };
        Ok((
            e,
            l,
            format!(
                "vs {against}; vs reference: rows off {rows_off} / {total_rows}, keys Jaccard {jac:.4}; per query tile {:.1} whole tiles and {:.0} keys ({whole_rows} rows without keys); scratch {} MB",
                tiles_n as f64 / total_rows as f64,
                keys_n as f64 / total_rows as f64,
                plan.scratch_bytes() >> 20
            ),
            agree,
        ))
    })();
    CaseResult::checked("columns", case.name(), r, tol)
}

/// The columns group: every case, then bad input refused by name (another method, `check_gamma`,
/// more than 64 rows, document masks, skip-softmax).
pub fn columns_selftest(
    dev: &Arc<CudaDevice>,
    quick: bool,
    keep: &dyn Fn(&str) -> bool,
) -> Vec<CaseResult> {
    use crate::sparse::columns::ColumnsPlan;
    let mut out: Vec<CaseResult> = columns_cases(quick)
        .iter()
        .enumerate()
        .filter(|(_, c)| keep(&c.name()))
        .map(|(n, c)| check_columns(dev, c, 29000 + 41 * n as u64))
        .collect();
    for (spec, mask, skip, want) in [
        ("topmass(gamma=0.9)", "causal", None, "is not `columns`"),
        (
            "columns(check=0.9,check_gamma=0.5)",
            "causal",
            None,
            "check_gamma",
        ),
        ("columns(rows=65)", "causal", None, "at most 64 rows"),
        ("columns(rows=4)", "causal & document", None, "document ids"),
        ("columns(rows=4)", "causal", Some(1e-3f32), "skip-softmax"),
    ] {
        let name = format!("columns bad input: {spec} `{mask}` skip {skip:?}");
        if !keep(&name) {
            continue;
        }
        let r = (|| -> Result<()> {
            let c = FwdCase::new(DType::BF16, 300, 300, 128, mask);
            let bt = Built::new(&c, 3)?;
            let (qv, kv, vv) = (bt.q.view("q")?, bt.k.view("k")?, bt.v.view("v")?);
            let spec = crate::sparse::SparseSpec::parse(spec)?;
            let params = AttnParams {
                skip_below: skip,
                ..bt.params
            };
            let dims = crate::attention::validate("columns", &qv, &kv, &vv)?;
            ColumnsPlan::new(dev, dims, c.dtype, &params, &spec, bt.spec()).map(|_| ())
        })();
        out.push(CaseResult::refused("columns", name, r, want));
    }
    out
}
