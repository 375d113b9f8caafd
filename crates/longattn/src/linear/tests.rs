//! The CPU forms of linear attention against the f64 oracle (`reference`), on seeded random inputs
//! of the awkward lengths, every decay kind, GQA, initial states, varlen, strided and bf16 inputs.
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
/// outputs and gradients, no inf * 0 anywhere.
#[test]
fn strong_decay_stays_finite() {
    for kind in [Kind::PerHead, Kind::Token, Kind::Gate] {
        let mut s = CaseSpec::new(200, kind);
        s.gmax = 20.0;
        s.s0 = true;
        let case = Case::new(&s, 77);
        let c = case.core();
        let got = forward_chunked(&c, 64).unwrap();
        assert!(
            got.out.iter().chain(&got.state).all(|x| x.is_finite()),
            "{kind:?}: non-finite"
        );
        check_forward(&case, 64, &format!("strong {kind:?}"));
        check_backward(&case, 64, &format!("strong {kind:?}"));
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
