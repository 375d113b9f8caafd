//! The CPU forms of linear attention against the f64 oracle (`reference`), on seeded random inputs
//! of the awkward lengths, every decay kind, GQA, initial states, varlen, strided and bf16 inputs.
// Index loops mirror the formulas of the f64 evaluation.
#![allow(clippy::needless_range_loop)]
use super::cpu::{backward_chunked, forward_chunked, forward_recurrent, step};
use super::reference::{backward_f64, forward_f64};
use super::{Core, Decay};
use crate::tensor::{Buffer, DType, TensorView};
use crate::testing::{Rng, AWKWARD_SIZES};

/// Which decay a case uses.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Kind {
    None,
    PerHead,
    Token,
    Gate,
}

pub(crate) const KINDS: [Kind; 4] = [Kind::None, Kind::PerHead, Kind::Token, Kind::Gate];

/// How a `[B, T, H, D]` tensor sits in memory.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Layout {
    Contiguous,
    /// Stored `[B, H, T, D]`.
    HeadMajor,
    /// Stored `[B, T, H, 2 D]`, the view takes every other element.
    Spread,
}

/// A stored tensor: the buffer, its logical shape and strides.
pub(crate) struct Stored {
    pub buf: Buffer,
    pub shape: [usize; 4],
    pub strides: [usize; 4],
}

impl Stored {
    pub fn new(vals: &[f32], shape: [usize; 4], layout: Layout, dtype: DType) -> Stored {
        let [b, t, h, d] = shape;
        let (n, strides) = match layout {
            Layout::Contiguous => (b * t * h * d, [t * h * d, h * d, d, 1]),
            Layout::HeadMajor => (b * t * h * d, [h * t * d, d, t * d, 1]),
            Layout::Spread => (2 * b * t * h * d, [t * h * 2 * d, h * 2 * d, 2 * d, 2]),
        };
        let mut raw = vec![7.5f32; n];
        for ib in 0..b {
            for it in 0..t {
                for ih in 0..h {
                    for id in 0..d {
                        let o =
                            ib * strides[0] + it * strides[1] + ih * strides[2] + id * strides[3];
                        raw[o] = vals[((ib * t + it) * h + ih) * d + id];
                    }
                }
            }
        }
        Stored {
            buf: Buffer::from_f32(dtype, &raw),
            shape,
            strides,
        }
    }
    pub fn view(&self) -> TensorView<'_> {
        TensorView::strided(self.buf.as_slice(), self.shape, self.strides).unwrap()
    }
}

pub(crate) fn normals(rng: &mut Rng, n: usize, std: f64) -> Vec<f32> {
    (0..n).map(|_| (rng.normal() * std) as f32).collect()
}

/// One random core problem with owned data.
pub(crate) struct Case {
    pub q: Stored,
    pub k: Stored,
    pub v: Stored,
    pub kind: Kind,
    pub g: Vec<f32>,
    pub s0: Option<Vec<f32>>,
    pub cu: Option<Vec<i32>>,
    pub scale: f32,
}

pub(crate) struct CaseSpec {
    pub b: usize,
    pub t: usize,
    pub h: usize,
    pub hk: usize,
    pub kd: usize,
    pub vd: usize,
    pub kind: Kind,
    pub layout: Layout,
    pub dtype: DType,
    pub cu: Option<Vec<i32>>,
    pub s0: bool,
    /// Largest per-step log decay magnitude (decays are uniform in `[-gmax, -gmax / 100]`).
    pub gmax: f32,
}

impl CaseSpec {
    pub fn new(t: usize, kind: Kind) -> CaseSpec {
        CaseSpec {
            b: 1,
            t,
            h: 2,
            hk: 1,
            kd: 8,
            vd: 12,
            kind,
            layout: Layout::Contiguous,
            dtype: DType::F32,
            cu: None,
            s0: false,
            gmax: 0.3,
        }
    }
}

impl Case {
    pub fn new(s: &CaseSpec, seed: u64) -> Case {
        let mut rng = Rng::new(seed);
        let (b, t, h, hk, kd, vd) = (s.b, s.t, s.h, s.hk, s.kd, s.vd);
        let q = normals(&mut rng, b * t * h * kd, 1.0);
        let k = normals(&mut rng, b * t * hk * kd, 1.0);
        let v = normals(&mut rng, b * t * hk * vd, 1.0);
        let lo = s.gmax / 100.0;
        let mut gate = |n: usize| -> Vec<f32> {
            (0..n)
                .map(|_| -lo - (s.gmax - lo) * rng.uniform() as f32)
                .collect()
        };
        let g = match s.kind {
            Kind::None => vec![],
            Kind::PerHead => gate(h),
            Kind::Token => gate(b * t * h),
            Kind::Gate => gate(b * t * h * kd),
        };
        let seqs = s.cu.as_ref().map_or(b, |c| c.len() - 1);
        let s0 = s.s0.then(|| normals(&mut rng, seqs * h * kd * vd, 1.0));
        Case {
            q: Stored::new(&q, [b, t, h, kd], s.layout, s.dtype),
            k: Stored::new(&k, [b, t, hk, kd], s.layout, s.dtype),
            v: Stored::new(&v, [b, t, hk, vd], s.layout, s.dtype),
            kind: s.kind,
            g,
            s0,
            cu: s.cu.clone(),
            scale: 1.0 / (kd as f32).sqrt(),
        }
    }
    pub fn core(&self) -> Core<'_> {
        Core {
            q: self.q.view(),
            k: self.k.view(),
            v: self.v.view(),
            decay: match self.kind {
                Kind::None => Decay::None,
                Kind::PerHead => Decay::PerHead(&self.g),
                Kind::Token => Decay::Token(&self.g),
                Kind::Gate => Decay::Gate(&self.g),
            },
            scale: self.scale,
            initial_state: self.s0.as_deref(),
            cu_seqlens: self.cu.as_deref(),
        }
    }
}

/// max |got - want| / max(max |want|, floor) (NaN counts as inf).
pub(crate) fn rel_err(got: &[f32], want: &[f64], floor: f64) -> f64 {
    assert_eq!(got.len(), want.len(), "lengths differ");
    let scale = want.iter().fold(floor, |a, &x| a.max(x.abs())).max(1e-30);
    let mut e = 0.0f64;
    for (&g, &w) in got.iter().zip(want) {
        let d = (g as f64 - w).abs();
        e = e.max(if d.is_nan() { f64::INFINITY } else { d });
    }
    e / scale
}

/// Tolerance of the f32 chunked forms relative to max |oracle|: f32 accumulation over chunks and
/// the state (products of up to `C` terms and a state summed over thousands of tokens), never below
/// the 2e-5 floor of `testing::out_tolerance`. Measured on these tests: at most 2.9e-7 (out) and
/// 4.1e-7 (state).
pub(crate) const TOL: f64 = 2e-5;
/// Gradients: the decay gradient is a reverse cumulative sum of differences `q dq - k dk` over the
/// whole sequence, which cancel. Measured on these tests: dq/dk/dv/d_initial_state at most 4.5e-7,
/// dg 2.4e-6.
pub(crate) const GRAD_TOL: f64 = 2e-5;

fn check_forward(case: &Case, chunk: usize, label: &str) {
    let c = case.core();
    let want = forward_f64(&c).unwrap();
    let got = forward_chunked(&c, chunk).unwrap();
    let eo = rel_err(&got.out, &want.out, 0.0);
    let es = rel_err(&got.state, &want.state, 0.0);
    assert!(
        eo <= TOL && es <= TOL,
        "{label} chunk {chunk}: out error {eo:.2e}, state error {es:.2e}"
    );
}

fn check_backward(case: &Case, chunk: usize, label: &str) {
    let c = case.core();
    let d = c.validate("test").unwrap();
    let mut rng = Rng::new(99);
    let dout = normals(&mut rng, d.batch * d.t * d.h * d.v, 1.0);
    let dfin = normals(&mut rng, d.state_len(), 1.0);
    let dout64: Vec<f64> = dout.iter().map(|&x| x as f64).collect();
    let dfin64: Vec<f64> = dfin.iter().map(|&x| x as f64).collect();
    let want = backward_f64(&c, &dout64, Some(&dfin64)).unwrap();
    let got = backward_chunked(&c, &dout, Some(&dfin), chunk).unwrap();
    for (name, g, w) in [
        ("dq", &got.dq, &want.dq),
        ("dk", &got.dk, &want.dk),
        ("dv", &got.dv, &want.dv),
        (
            "d_initial_state",
            &got.d_initial_state,
            &want.d_initial_state,
        ),
    ] {
        let e = rel_err(g, w, 0.0);
        assert!(e <= GRAD_TOL, "{label} chunk {chunk}: {name} error {e:.2e}");
    }
    match (&got.dg, &want.dg) {
        (Some(g), Some(w)) => {
            let e = rel_err(g, w, 0.0);
            assert!(e <= GRAD_TOL, "{label} chunk {chunk}: dg error {e:.2e}");
        }
        (None, None) => {}
        _ => panic!("{label}: dg presence differs from the oracle"),
    }
}

/// The chunked forward at every awkward length, three chunk sizes (one not dividing the lengths),
/// every decay kind, GQA (H 2 over Hk 1) and an initial state.
#[test]
fn chunked_forward_matches_oracle() {
    for &t in AWKWARD_SIZES {
        for kind in KINDS {
            let mut s = CaseSpec::new(t, kind);
            s.s0 = t % 2 == 1;
            let case = Case::new(&s, t as u64 * 7 + kind as u64);
            for chunk in [16, 64, 48] {
                check_forward(&case, chunk, &format!("T {t} {kind:?}"));
            }
        }
    }
}

/// The chunked backward (dq, dk, dv, dg, d_initial_state with a final-state gradient) against the
/// oracle's back-propagation through the steps.
#[test]
fn chunked_backward_matches_oracle() {
    for &t in AWKWARD_SIZES {
        for kind in KINDS {
            let mut s = CaseSpec::new(t, kind);
            s.s0 = true;
            let case = Case::new(&s, t as u64 * 13 + kind as u64);
            let chunks: &[usize] = if t > 1000 { &[64] } else { &[16, 64, 48] };
            for &chunk in chunks {
                check_backward(&case, chunk, &format!("T {t} {kind:?}"));
            }
        }
    }
}

/// The pieces context parallelism's state passing takes of the chunked forms: the final state
/// alone equals the forward's, and the initial state's gradient from the output gradient alone
/// equals the backward's without a final-state gradient (awkward lengths, every decay kind,
/// varlen with an empty sequence).
#[test]
fn final_state_and_initial_state_grad_match_the_chunked_forms() {
    use super::cpu::{final_state_chunked, initial_state_grad};
    for &t in &[1usize, 7, 63, 65, 113] {
        for kind in KINDS {
            let mut s = CaseSpec::new(t, kind);
            s.s0 = t % 2 == 1;
            if t == 113 {
                s.cu = Some(vec![0, 40, 40, 113]);
            }
            let case = Case::new(&s, t as u64 * 3 + kind as u64);
            let core = case.core();
            let d = core.validate("test").unwrap();
            let dout: Vec<f32> = {
                let mut r = Rng::new(t as u64 + 99);
                (0..d.batch * d.t * d.h * d.v)
                    .map(|_| r.normal() as f32)
                    .collect()
            };
            let f = forward_chunked(&core, 16).unwrap();
            let st = final_state_chunked(&core, 16).unwrap();
            let e = max_rel(&st, &f.state);
            assert!(e <= 1e-6, "T {t} {kind:?}: final state differs by {e}");
            let g = backward_chunked(&core, &dout, None, 16).unwrap();
            let ds = initial_state_grad(&core, &dout).unwrap();
            let e = max_rel(&ds, &g.d_initial_state);
            assert!(
                e <= 1e-4,
                "T {t} {kind:?}: initial state's gradient differs by {e}"
            );
        }
    }
}

/// Largest |a - b| relative to max(1, max |b|).
fn max_rel(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let s = b.iter().fold(1f32, |m, x| m.max(x.abs()));
    a.iter()
        .zip(b)
        .fold(0f32, |m, (x, y)| m.max((x - y).abs() / s))
}

/// Varlen: ragged and empty sequences whose boundaries fall inside chunks; states never leak.
#[test]
fn varlen_forward_and_backward() {
    let cu = vec![0i32, 5, 5, 70, 71, 140, 140, 203];
    for kind in KINDS {
        let mut s = CaseSpec::new(203, kind);
        s.cu = Some(cu.clone());
        s.s0 = true;
        s.h = 4;
        s.hk = 2;
        let case = Case::new(&s, 31 + kind as u64);
        for chunk in [16, 64] {
            check_forward(&case, chunk, &format!("varlen {kind:?}"));
            check_backward(&case, chunk, &format!("varlen {kind:?}"));
        }
    }
}

/// Strided (head-major, spread) inputs and bf16 / f16 storage: the oracle reads the same stored
/// values, so the tolerance stays that of f32 arithmetic.
#[test]
fn strided_and_half_inputs() {
    for (layout, dtype) in [
        (Layout::HeadMajor, DType::F32),
        (Layout::Spread, DType::F32),
        (Layout::Contiguous, DType::BF16),
        (Layout::HeadMajor, DType::F16),
        (Layout::Spread, DType::BF16),
    ] {
        for kind in [Kind::Token, Kind::Gate] {
            let mut s = CaseSpec::new(113, kind);
            s.b = 2;
            s.layout = layout;
            s.dtype = dtype;
            s.s0 = true;
            let case = Case::new(&s, 5);
            check_forward(&case, 32, &format!("{layout:?} {dtype}"));
            check_backward(&case, 32, &format!("{layout:?} {dtype}"));
        }
    }
}

/// Per-step log decays down to -20 (exp(-20 * 64) underflows in one chunk): finite and correct
/// outputs and gradients, no inf * 0 anywhere. With decays down to -2 some chunks take the fast
/// path (total log decay <= `FAST_SPAN`) and others the element-wise / sub-block forms.
#[test]
fn strong_decay_stays_finite() {
    for gmax in [20.0, 2.0] {
        for kind in [Kind::PerHead, Kind::Token, Kind::Gate] {
            let mut s = CaseSpec::new(200, kind);
            s.gmax = gmax;
            s.s0 = true;
            let case = Case::new(&s, 77);
            let c = case.core();
            let got = forward_chunked(&c, 64).unwrap();
            assert!(
                got.out.iter().chain(&got.state).all(|x| x.is_finite()),
                "{kind:?}: non-finite"
            );
            for chunk in [64, 48] {
                check_forward(&case, chunk, &format!("strong {gmax} {kind:?}"));
                check_backward(&case, chunk, &format!("strong {gmax} {kind:?}"));
            }
        }
    }
}

/// The fused recurrent form and the decode step against the oracle; `step` equals one token of the
/// chunked form continued from the state of the tokens before.
#[test]
fn recurrent_and_step() {
    for kind in KINDS {
        let mut s = CaseSpec::new(65, kind);
        s.b = 2;
        s.s0 = true;
        let case = Case::new(&s, 3);
        let c = case.core();
        let want = forward_f64(&c).unwrap();
        let got = forward_recurrent(&c).unwrap();
        assert!(
            rel_err(&got.out, &want.out, 0.0) <= TOL,
            "{kind:?} recurrent"
        );
        assert!(
            rel_err(&got.state, &want.state, 0.0) <= TOL,
            "{kind:?} recurrent state"
        );

        // Chunked over T tokens == chunked over T - 1 tokens, then one step.
        let (b, t, h, hk, kd, vd) = (2, 65, 2, 1, 8, 12);
        let full = forward_chunked(&c, 16).unwrap();
        let cut = |st: &Stored, heads: usize, d: usize| -> (Vec<f32>, Vec<f32>) {
            let v = st.view();
            let mut head = Vec::new();
            let mut last = Vec::new();
            for ib in 0..b {
                for it in 0..t {
                    for ih in 0..heads {
                        for id in 0..d {
                            let x = v.get(ib, it, ih, id);
                            if it < t - 1 {
                                head.push(x)
                            } else {
                                last.push(x)
                            }
                        }
                    }
                }
            }
            (head, last)
        };
        let (q0, q1) = cut(&case.q, h, kd);
        let (k0, k1) = cut(&case.k, hk, kd);
        let (v0, v1) = cut(&case.v, hk, vd);
        let split_g = |g: &[f32], per: usize| -> (Vec<f32>, Vec<f32>) {
            let mut a = Vec::new();
            let mut z = Vec::new();
            for ib in 0..b {
                for it in 0..t {
                    let row = &g[(ib * t + it) * per..][..per];
                    if it < t - 1 {
                        a.extend_from_slice(row)
                    } else {
                        z.extend_from_slice(row)
                    }
                }
            }
            (a, z)
        };
        let (g0, g1) = match kind {
            Kind::Token => split_g(&case.g, h),
            Kind::Gate => split_g(&case.g, h * kd),
            _ => (case.g.clone(), case.g.clone()),
        };
        fn dec(kind: Kind, g: &[f32]) -> Decay<'_> {
            match kind {
                Kind::None => Decay::None,
                Kind::PerHead => Decay::PerHead(g),
                Kind::Token => Decay::Token(g),
                Kind::Gate => Decay::Gate(g),
            }
        }
        let head = Core {
            q: TensorView::contiguous(&q0[..], [b, t - 1, h, kd]).unwrap(),
            k: TensorView::contiguous(&k0[..], [b, t - 1, hk, kd]).unwrap(),
            v: TensorView::contiguous(&v0[..], [b, t - 1, hk, vd]).unwrap(),
            decay: dec(kind, &g0),
            ..c
        };
        let mut state = forward_chunked(&head, 16).unwrap().state;
        let one = Core {
            q: TensorView::contiguous(&q1[..], [b, 1, h, kd]).unwrap(),
            k: TensorView::contiguous(&k1[..], [b, 1, hk, kd]).unwrap(),
            v: TensorView::contiguous(&v1[..], [b, 1, hk, vd]).unwrap(),
            decay: dec(kind, &g1),
            initial_state: None,
            ..c
        };
        let o = step(&one, &mut state).unwrap();
        let mut want_last = Vec::new();
        for ib in 0..b {
            want_last.extend(
                full.out[((ib * t + t - 1) * h) * vd..][..h * vd]
                    .iter()
                    .map(|&x| x as f64),
            );
        }
        assert!(rel_err(&o, &want_last, 0.0) <= TOL, "{kind:?}: step out");
        let fs: Vec<f64> = full.state.iter().map(|&x| x as f64).collect();
        assert!(rel_err(&state, &fs, 0.0) <= TOL, "{kind:?}: step state");
    }
}

// ---------------------------------------------------------------------------------------------
// The entry points: feature maps, normalisations, BASED's window, the spec grammar, errors.

use super::entry::{
    linear_attention, linear_attention_backward, linear_step, Backend, LinearInputs,
};
use super::spec::{DecaySpec, LinearSpec, Normalization};
use super::FeatureMap;
use crate::error::Error;

/// One pipeline problem in f64 (the independent evaluation of the same formulas).
#[derive(Clone)]
struct Pipe {
    b: usize,
    t: usize,
    h: usize,
    hk: usize,
    d: usize,
    vd: usize,
    q: Vec<f64>,
    k: Vec<f64>,
    v: Vec<f64>,
    g: Vec<f64>,
    s0: Option<Vec<f64>>,
    w: Vec<f64>,
    fh: usize,
    cu: Option<Vec<i32>>,
}

fn phi64(map: FeatureMap, x: &[f64], w: &[f64], fh: usize) -> Vec<f64> {
    let d = x.len();
    match map {
        FeatureMap::Identity => x.to_vec(),
        FeatureMap::Elu => x
            .iter()
            .map(|&a| if a > 0.0 { a + 1.0 } else { a.exp() })
            .collect(),
        FeatureMap::Taylor => {
            let mut o = vec![1.0];
            o.extend(x.iter().map(|a| a / (d as f64).powf(0.25)));
            for i in 0..d {
                for j in 0..d {
                    o.push(x[i] * x[j] / (2.0f64.sqrt() * (d as f64).sqrt()));
                }
            }
            o
        }
        FeatureMap::Hedgehog => {
            let z: Vec<f64> = (0..fh)
                .map(|j| (0..d).map(|i| x[i] * w[i * fh + j]).sum())
                .collect();
            let sm = |s: f64| -> Vec<f64> {
                let m = z.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(s * b));
                let e: Vec<f64> = z.iter().map(|&b| (s * b - m).exp()).collect();
                let t: f64 = e.iter().sum();
                e.into_iter().map(|x| x / t).collect()
            };
            let mut o = sm(1.0);
            o.extend(sm(-1.0));
            o
        }
    }
}

impl Pipe {
    fn new(kind: Kind, map: FeatureMap, t: usize, seed: u64) -> Pipe {
        let (b, h, hk, d, vd, fh) = (1, 2, 1, 4, 3, 3);
        let mut rng = Rng::new(seed);
        let mut nv = |n: usize, s: f64| -> Vec<f64> { (0..n).map(|_| rng.normal() * s).collect() };
        let q = nv(b * t * h * d, 1.0);
        let k = nv(b * t * hk * d, 1.0);
        let v = nv(b * t * hk * vd, 1.0);
        let w = nv(hk * d * fh, 0.7);
        let f = map.dim(d, fh);
        let mut rng = Rng::new(seed + 1);
        let g: Vec<f64> = match kind {
            Kind::Token => (0..b * t * h)
                .map(|_| -0.02 - 0.4 * rng.uniform())
                .collect(),
            Kind::Gate => (0..b * t * h * f)
                .map(|_| -0.02 - 0.4 * rng.uniform())
                .collect(),
            _ => vec![],
        };
        Pipe {
            b,
            t,
            h,
            hk,
            d,
            vd,
            q,
            k,
            v,
            g,
            s0: None,
            w,
            fh,
            cu: None,
        }
    }

    /// (out [B, T, H, V], state [seqs, H, F, V']) of `spec`, in f64, token by token.
    fn eval(&self, spec: &LinearSpec) -> (Vec<f64>, Vec<f64>) {
        let (t, h, hk, d, vd) = (self.t, self.h, self.hk, self.d, self.vd);
        let map = spec.feature;
        let f = map.dim(d, self.fh);
        let vx = if spec.norm == Normalization::Denominator {
            vd + 1
        } else {
            vd
        };
        let scale = spec.scale_for(d) as f64;
        let per_head = spec.decay.per_head(h);
        let cu: Vec<usize> = match &self.cu {
            Some(c) => c.iter().map(|&x| x as usize).collect(),
            None => (0..=self.b).map(|i| i * t).collect(),
        };
        let seqs = cu.len() - 1;
        let mut out = vec![0.0; self.b * t * h * vd];
        let mut state = vec![0.0; seqs * h * f * vx];
        for n in 0..seqs {
            for hh in 0..h {
                let kh = hh / (h / hk);
                let wh = &self.w[kh * d * self.fh..][..d * self.fh];
                let mut s = vec![0.0; f * vx];
                if let Some(s0) = &self.s0 {
                    s.copy_from_slice(&s0[(n * h + hh) * f * vx..][..f * vx]);
                }
                for row in cu[n]..cu[n + 1] {
                    let pq = phi64(map, &self.q[(row * h + hh) * d..][..d], wh, self.fh);
                    let pk = phi64(map, &self.k[(row * hk + kh) * d..][..d], wh, self.fh);
                    let mut vv = self.v[(row * hk + kh) * vd..][..vd].to_vec();
                    if vx > vd {
                        vv.push(1.0);
                    }
                    let mut o = vec![0.0; vx];
                    for i in 0..f {
                        let lg = match spec.decay {
                            DecaySpec::Token => self.g[row * h + hh],
                            DecaySpec::Gate => self.g[(row * h + hh) * f + i],
                            _ => per_head.as_ref().map_or(0.0, |p| p[hh] as f64),
                        };
                        for j in 0..vx {
                            s[i * vx + j] = lg.exp() * s[i * vx + j] + pk[i] * vv[j];
                            o[j] += scale * pq[i] * s[i * vx + j];
                        }
                    }
                    let o: Vec<f64> = match spec.norm {
                        Normalization::None => o,
                        Normalization::Denominator => o[..vd].iter().map(|x| x / o[vd]).collect(),
                        Normalization::Rms => {
                            let ms = o.iter().map(|x| x * x).sum::<f64>() / vd as f64;
                            let r = 1.0 / (ms + super::feature::RMS_EPS as f64).sqrt();
                            o.iter().map(|x| x * r).collect()
                        }
                    };
                    let dst = &mut out[(row * h + hh) * vd..][..vd];
                    dst.copy_from_slice(&o[..vd]);
                    if let Some(wn) = spec.window {
                        // Exact causal softmax over the last wn keys of this sequence.
                        let lo = cu[n].max((row + 1).saturating_sub(wn));
                        let qs = &self.q[(row * h + hh) * d..][..d];
                        let logits: Vec<f64> = (lo..=row)
                            .map(|j| {
                                let kj = &self.k[(j * hk + kh) * d..][..d];
                                qs.iter().zip(kj).map(|(a, b)| a * b).sum::<f64>()
                                    / (d as f64).sqrt()
                            })
                            .collect();
                        let m = logits.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b));
                        let e: Vec<f64> = logits.iter().map(|x| (x - m).exp()).collect();
                        let z: f64 = e.iter().sum();
                        for (jj, j) in (lo..=row).enumerate() {
                            for c in 0..vd {
                                dst[c] += e[jj] / z * self.v[(j * hk + kh) * vd + c];
                            }
                        }
                    }
                }
                state[(n * h + hh) * f * vx..][..f * vx].copy_from_slice(&s);
            }
        }
        (out, state)
    }

    fn f32s(x: &[f64]) -> Vec<f32> {
        x.iter().map(|&a| a as f32).collect()
    }
}

/// Runs `f` on the f32 inputs of `p` (kept alive for the call).
fn with_inputs<R>(p: &Pipe, spec: &LinearSpec, f: impl FnOnce(&LinearInputs) -> R) -> R {
    let (q, k, v) = (Pipe::f32s(&p.q), Pipe::f32s(&p.k), Pipe::f32s(&p.v));
    let (g, w) = (Pipe::f32s(&p.g), Pipe::f32s(&p.w));
    let s0 = p.s0.as_ref().map(|s| Pipe::f32s(s));
    let mut inp = LinearInputs::new(
        TensorView::contiguous(&q[..], [p.b, p.t, p.h, p.d]).unwrap(),
        TensorView::contiguous(&k[..], [p.b, p.t, p.hk, p.d]).unwrap(),
        TensorView::contiguous(&v[..], [p.b, p.t, p.hk, p.vd]).unwrap(),
    );
    if spec.decay.needs_input() {
        inp.g = Some(&g);
    }
    if spec.feature == FeatureMap::Hedgehog {
        inp.hedgehog = Some(&w);
    }
    inp.initial_state = s0.as_deref();
    inp.cu_seqlens = p.cu.as_deref();
    f(&inp)
}

fn specs() -> Vec<(&'static str, Kind)> {
    vec![
        ("plain", Kind::None),
        ("elu+normalized", Kind::None),
        ("decay(gamma=0.95)+elu", Kind::PerHead),
        ("decay(gamma=0.8:0.99)+taylor+normalized", Kind::PerHead),
        ("simple_gla+norm", Kind::Token),
        ("gla(chunk=16)+elu+normalized", Kind::Gate),
        ("hedgehog+normalized", Kind::None),
        ("simple_gla+hedgehog", Kind::Token),
        ("taylor(scale=0.5)", Kind::None),
        ("based(window=5,chunk=16)", Kind::None),
        ("simple_gla+based(window=3)", Kind::Token),
    ]
}

/// Every feature map and normalisation (and BASED's window) through the entry point against the
/// f64 evaluation of the same formulas, with an initial state, and under varlen.
#[test]
fn entry_forward_matches_f64_pipeline() {
    for (text, kind) in specs() {
        let spec = LinearSpec::parse(text).unwrap();
        for (t, varlen) in [(1usize, false), (37, false), (70, true)] {
            let mut p = Pipe::new(kind, spec.feature, t, 5 + t as u64);
            let f = spec.feature.dim(p.d, p.fh);
            let vx = p.vd + (spec.norm == Normalization::Denominator) as usize;
            if varlen {
                p.cu = Some(vec![0, 20, 20, 53, 70]);
            }
            let seqs = p.cu.as_ref().map_or(p.b, |c| c.len() - 1);
            let mut rng = Rng::new(8);
            // A positive initial denominator column keeps `normalized` well defined.
            p.s0 = Some(
                (0..seqs * p.h * f * vx)
                    .map(|i| {
                        if vx > p.vd && i % vx == p.vd {
                            1.0 + rng.uniform()
                        } else {
                            0.3 * rng.normal()
                        }
                    })
                    .collect(),
            );
            let (want_out, want_state) = p.eval(&spec);
            let got =
                with_inputs(&p, &spec, |inp| linear_attention(inp, &spec, Backend::Cpu)).unwrap();
            let eo = rel_err(&got.out.data.to_f32_vec(), &want_out, 0.0);
            let es = rel_err(&got.final_state, &want_state, 0.0);
            assert!(
                eo <= 1e-5 && es <= 1e-5,
                "{text} T {t}: out {eo:.2e} state {es:.2e}"
            );
            assert_eq!(got.state_shape, [seqs, p.h, f, vx], "{text}");
        }
    }
}

/// Gradients of the whole pipeline (dq, dk, dv, dg, d_initial_state, the hedgehog weights, the
/// window part) against central finite differences of the f64 evaluation.
#[test]
fn entry_backward_matches_finite_differences() {
    for (text, kind) in specs() {
        let spec = LinearSpec::parse(text).unwrap();
        let mut p = Pipe::new(kind, spec.feature, 11, 21);
        let f = spec.feature.dim(p.d, p.fh);
        let vx = p.vd + (spec.norm == Normalization::Denominator) as usize;
        let mut rng = Rng::new(4);
        p.s0 = Some(
            (0..p.h * f * vx)
                .map(|i| {
                    if vx > p.vd && i % vx == p.vd {
                        1.0 + rng.uniform()
                    } else {
                        0.3 * rng.normal()
                    }
                })
                .collect(),
        );
        let dout: Vec<f64> = (0..p.t * p.h * p.vd).map(|_| rng.normal()).collect();
        let dfin: Vec<f64> = (0..p.h * f * vx).map(|_| rng.normal()).collect();
        let loss = |p: &Pipe| -> f64 {
            let (o, s) = p.eval(&spec);
            o.iter().zip(&dout).map(|(a, b)| a * b).sum::<f64>()
                + s.iter().zip(&dfin).map(|(a, b)| a * b).sum::<f64>()
        };
        let got = with_inputs(&p, &spec, |inp| {
            linear_attention_backward(
                inp,
                &spec,
                &Pipe::f32s(&dout),
                Some(&Pipe::f32s(&dfin)),
                Backend::Cpu,
            )
        })
        .unwrap();
        // Finite differences on the f32-rounded inputs the kernel saw.
        let round = |x: &mut Vec<f64>| x.iter_mut().for_each(|a| *a = *a as f32 as f64);
        for x in [&mut p.q, &mut p.k, &mut p.v, &mut p.g, &mut p.w] {
            round(x);
        }
        round(p.s0.as_mut().unwrap());
        type Pick = fn(&mut Pipe) -> &mut Vec<f64>;
        let mut cases: Vec<(&str, Pick, Vec<f32>)> = vec![
            ("dq", |p| &mut p.q, got.dq.data.to_f32_vec()),
            ("dk", |p| &mut p.k, got.dk.data.to_f32_vec()),
            ("dv", |p| &mut p.v, got.dv.data.to_f32_vec()),
            (
                "d_initial_state",
                |p| p.s0.as_mut().unwrap(),
                got.d_initial_state.clone(),
            ),
        ];
        if let Some(dg) = &got.dg {
            cases.push(("dg", |p| &mut p.g, dg.clone()));
        }
        assert_eq!(
            got.dg.is_some(),
            spec.decay.needs_input(),
            "{text}: dg presence"
        );
        if let Some(dw) = &got.d_hedgehog {
            cases.push(("d_hedgehog", |p| &mut p.w, dw.clone()));
        }
        for (name, pick, grad) in cases {
            let n = pick(&mut p.clone()).len();
            assert_eq!(grad.len(), n, "{text}: {name} length");
            let eps = 1e-5;
            let fd: Vec<f64> = (0..n)
                .map(|i| {
                    let mut a = p.clone();
                    pick(&mut a)[i] += eps;
                    let mut z = p.clone();
                    pick(&mut z)[i] -= eps;
                    (loss(&a) - loss(&z)) / (2.0 * eps)
                })
                .collect();
            let e = rel_err(&grad, &fd, 1e-3);
            assert!(
                e <= 1e-4,
                "{text}: {name} error {e:.2e} against finite differences"
            );
        }
    }
}

/// The decode step through the entry point equals the last token of the full forward, for a
/// normalised feature-mapped spec (the state carries the denominator column).
#[test]
fn entry_step_equals_last_token() {
    let spec = LinearSpec::parse("simple_gla+elu+normalized").unwrap();
    let p = Pipe::new(Kind::Token, spec.feature, 9, 2);
    let full = with_inputs(&p, &spec, |inp| linear_attention(inp, &spec, Backend::Cpu)).unwrap();
    let mut head = p.clone();
    head.t = 8;
    head.q.truncate(8 * p.h * p.d);
    head.k.truncate(8 * p.hk * p.d);
    head.v.truncate(8 * p.hk * p.vd);
    head.g.truncate(8 * p.h);
    let mut state = with_inputs(&head, &spec, |inp| {
        linear_attention(inp, &spec, Backend::Cpu)
    })
    .unwrap()
    .final_state;
    let mut last = p.clone();
    last.t = 1;
    last.q = p.q[8 * p.h * p.d..].to_vec();
    last.k = p.k[8 * p.hk * p.d..].to_vec();
    last.v = p.v[8 * p.hk * p.vd..].to_vec();
    last.g = p.g[8 * p.h..].to_vec();
    let o = with_inputs(&last, &spec, |inp| {
        linear_step(inp, &spec, &mut state, Backend::Cpu)
    })
    .unwrap();
    let want: Vec<f64> = full.out.data.to_f32_vec()[8 * p.h * p.vd..]
        .iter()
        .map(|&x| x as f64)
        .collect();
    assert!(rel_err(&o.data.to_f32_vec(), &want, 0.0) <= TOL);
    let fs: Vec<f64> = full.final_state.iter().map(|&x| x as f64).collect();
    assert!(rel_err(&state, &fs, 0.0) <= TOL);
}

/// The grammar: canonical forms round-trip, and every mistake names the offending part.
#[test]
fn spec_grammar() {
    let s = LinearSpec::parse(" simple_gla(chunk=32) + elu + normalized ").unwrap();
    assert_eq!(s.decay, DecaySpec::Token);
    assert_eq!(s.feature, FeatureMap::Elu);
    assert_eq!(s.norm, Normalization::Denominator);
    assert_eq!(s.chunk, 32);
    let b = LinearSpec::parse("based(window=128)").unwrap();
    assert_eq!(
        (b.feature, b.norm, b.window),
        (FeatureMap::Taylor, Normalization::Denominator, Some(128))
    );
    assert_eq!(b.scale_for(16), 1.0);
    assert_eq!(LinearSpec::parse("plain").unwrap().scale_for(16), 0.25);
    let spread = LinearSpec::parse("decay(gamma=0.9:0.999)")
        .unwrap()
        .decay
        .per_head(3)
        .unwrap();
    assert!(
        (spread[0] as f64 - 0.9f64.ln()).abs() < 1e-6
            && (spread[2] as f64 - 0.999f64.ln()).abs() < 1e-6
    );
    for text in [
        "plain",
        "decay(gamma=0.99)+taylor",
        "gla+hedgehog+norm",
        "based(window=7)",
        "simple_gla(scale=0.5)+elu",
    ] {
        let s = LinearSpec::parse(text).unwrap();
        assert_eq!(
            LinearSpec::parse(&s.to_string()).unwrap(),
            s,
            "{text} -> {s}"
        );
    }
    for (text, needle) in [
        ("", "empty"),
        ("softmax", "unknown atom `softmax`"),
        ("plain(window=3)", "unknown argument `window`"),
        ("decay", "needs gamma"),
        ("decay(gamma=1.5)", "(0, 1]"),
        ("decay(gamma=x)", "not a number"),
        ("simple_gla(chunk=0)", "chunk"),
        ("simple_gla(chunk=abc)", "chunk `abc`"),
        ("plain+gla", "two decay atoms"),
        ("elu+taylor", "two feature maps"),
        ("normalized+norm", "two normalisations"),
        ("based+normalized", "normalised already"),
        ("plain(chunk=16)+elu(chunk=32)", "`chunk` given twice"),
        ("elu(scale=inf)", "finite"),
        ("plain+", "empty atom"),
        ("elu(chunk=16", "missing `)`"),
        ("elu(16)", "not `key=value`"),
    ] {
        match LinearSpec::parse(text) {
            Err(Error::Param { msg, .. }) => assert!(msg.contains(needle), "{text}: {msg}"),
            other => panic!("{text}: expected a parameter error, got {other:?}"),
        }
    }
}

/// Bad inputs are errors naming the tensor (never panics): gates of the wrong shape or sign, a
/// missing or unexpected `g`, hedgehog weights of the wrong size, states of the wrong size,
/// cu_seqlens out of order, CUDA without a kernel.
#[test]
fn entry_errors() {
    let p = Pipe::new(Kind::Token, FeatureMap::Identity, 10, 1);
    let run = |spec: &str, edit: &dyn Fn(&mut LinearInputs)| -> Error {
        let spec = LinearSpec::parse(spec).unwrap();
        with_inputs(&p, &spec, |inp| {
            let mut inp = *inp;
            edit(&mut inp);
            linear_attention(&inp, &spec, Backend::Cpu).unwrap_err()
        })
    };
    // 'static data: the edits apply to inputs of any lifetime.
    static SHORT: [f32; 7] = [-0.1; 7];
    static POSITIVE: [f32; 20] = [0.1; 20];
    static STATE: [f32; 5] = [0.0; 5];
    static CU: [i32; 4] = [0, 6, 4, 10];
    static W: [f32; 7] = [0.1; 7];
    let (short, positive, state, cu, w) = (&SHORT[..], &POSITIVE[..], &STATE[..], &CU[..], &W[..]);
    type Edit = Box<dyn Fn(&mut LinearInputs)>;
    let cases: Vec<(&str, Edit, &str)> = vec![
        ("simple_gla", Box::new(|i| i.g = Some(short)), "`g`"),
        ("simple_gla", Box::new(|i| i.g = Some(positive)), "<= 0"),
        (
            "simple_gla",
            Box::new(|i| i.g = None),
            "needs the log decay `g`",
        ),
        ("plain", Box::new(|i| i.g = Some(short)), "takes none"),
        ("gla", Box::new(|_| {}), "`g`"),
        ("hedgehog", Box::new(|i| i.hedgehog = Some(w)), "hedgehog"),
        (
            "hedgehog",
            Box::new(|i| i.hedgehog = None),
            "needs its weights",
        ),
        (
            "elu",
            Box::new(|i| i.hedgehog = Some(w)),
            "feature map is elu",
        ),
        (
            "simple_gla",
            Box::new(|i| i.initial_state = Some(state)),
            "initial_state",
        ),
        (
            "simple_gla",
            Box::new(|i| i.cu_seqlens = Some(cu)),
            "non-decreasing",
        ),
    ];
    for (spec, edit, needle) in cases {
        let e = run(spec, &*edit).to_string();
        assert!(
            e.contains(needle),
            "{spec}: `{e}` does not mention {needle}"
        );
    }
    let spec = LinearSpec::parse("simple_gla").unwrap();
    let e = with_inputs(&p, &spec, |inp| {
        linear_attention(inp, &spec, Backend::Cuda(0)).unwrap_err()
    });
    assert!(matches!(e, Error::Cuda { .. }), "{e}");
    let e = with_inputs(&p, &spec, |inp| {
        linear_attention_backward(inp, &spec, &[0.0; 3], None, Backend::Cpu).unwrap_err()
    });
    assert!(e.to_string().contains("dout"), "{e}");
    let e = with_inputs(&p, &spec, |inp| {
        let mut s = vec![0.0f32; 3];
        linear_step(inp, &spec, &mut s, Backend::Cpu).unwrap_err()
    });
    assert!(
        e.to_string().contains("[B, 1, H, K]") || e.to_string().contains("state"),
        "{e}"
    );
    // Specs built by hand are checked too.
    for bad in [
        LinearSpec {
            chunk: 0,
            ..LinearSpec::default()
        },
        LinearSpec {
            window: Some(0),
            ..LinearSpec::default()
        },
        LinearSpec {
            decay: DecaySpec::Constant(1.5),
            ..LinearSpec::default()
        },
        LinearSpec {
            scale: Some(f32::NAN),
            ..LinearSpec::default()
        },
    ] {
        let e = with_inputs(&p, &bad, |inp| {
            linear_attention(inp, &bad, Backend::Cpu).unwrap_err()
        });
        assert!(matches!(e, Error::Param { .. }), "{bad:?}: {e}");
    }
    // Core-level: chunk out of range, d_final_state of the wrong size.
    let case = Case::new(&CaseSpec::new(10, Kind::Token), 1);
    let c = case.core();
    assert!(matches!(forward_chunked(&c, 0), Err(Error::Param { .. })));
    let e = backward_chunked(&c, &vec![0.0; 10 * 2 * 12], Some(&[0.0; 4]), 16).unwrap_err();
    assert!(e.to_string().contains("d_final_state"), "{e}");
}
