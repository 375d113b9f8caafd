//! Packing inputs into the micro-kernels' layouts (see `micro` for the layouts).
//!
//! Packing converts to the compute type (f32, or bf16 bits for the pair path) and reads any
//! strides, so the kernels only ever see contiguous, padded chunks.
use super::micro::{FromF32, Micro, NC};
use crate::tensor::{Element, TensorView};

/// Row length of a packed Q row / number of K^T rows: D, or D rounded up to even for pairs.
pub fn packed_dim<M: Micro>(d: usize) -> usize {
    if M::PAIRS {
        d.div_ceil(2) * 2
    } else {
        d
    }
}

/// Converts one element to the packed type of `M`.
#[inline(always)]
fn to_packed<M: Micro>(x: f32) -> M::P {
    <M::P as FromF32>::from_f32(x)
}

/// K^T of keys `c*NC .. c*NC+NC` (head `hk`, batch `b`) into `out` (`dp * NC` elements):
/// f32: `out[d][j]`; pairs: `out[d/2][j][d%2]`. Keys past `Sk` and dims past `D` are 0.
pub fn pack_kt<T: Element, M: Micro>(
    k: &TensorView,
    b: usize,
    hk: usize,
    c: usize,
    out: &mut [M::P],
) {
    let data = k.typed::<T>().expect("dtype checked by the dispatcher");
    let (sk, d) = (k.seq(), k.dim());
    let dp = packed_dim::<M>(d);
    out[..dp * NC].fill(M::P::default());
    for j in 0..NC.min(sk.saturating_sub(c * NC)) {
        let base = k.offset(b, c * NC + j, hk, 0);
        for x in 0..d {
            let val = to_packed::<M>(data[base + x * k.strides[3]].to_f32());
            let idx = if M::PAIRS {
                ((x / 2) * NC + j) * 2 + x % 2
            } else {
                x * NC + j
            };
            out[idx] = val;
        }
    }
}

/// V of keys `c*NC .. c*NC+NC` into `out` (`NC * dv` elements): f32: `out[j][x]`;
/// pairs: `out[j/2][x][j%2]`. Keys past `Sk` are 0.
pub fn pack_v<T: Element, M: Micro>(
    v: &TensorView,
    b: usize,
    hk: usize,
    c: usize,
    out: &mut [M::P],
) {
    let data = v.typed::<T>().expect("dtype checked by the dispatcher");
    let (sk, dv) = (v.seq(), v.dim());
    out[..NC * dv].fill(M::P::default());
    for j in 0..NC.min(sk.saturating_sub(c * NC)) {
        let base = v.offset(b, c * NC + j, hk, 0);
        for x in 0..dv {
            let val = to_packed::<M>(data[base + x * v.strides[3]].to_f32());
            let idx = if M::PAIRS {
                ((j / 2) * dv + x) * 2 + j % 2
            } else {
                j * dv + x
            };
            out[idx] = val;
        }
    }
}

/// Query rows `i0 .. i0+rows` of head `h` into `out[r][0..dp]` (dims past `D` are 0).
pub fn pack_q<T: Element, M: Micro>(
    q: &TensorView,
    b: usize,
    h: usize,
    i0: usize,
    rows: usize,
    out: &mut [M::P],
) {
    let data = q.typed::<T>().expect("dtype checked by the dispatcher");
    let d = q.dim();
    let dp = packed_dim::<M>(d);
    for r in 0..rows {
        let base = q.offset(b, i0 + r, h, 0);
        let row = &mut out[r * dp..(r + 1) * dp];
        for (x, o) in row.iter_mut().enumerate() {
            *o = if x < d {
                to_packed::<M>(data[base + x * q.strides[3]].to_f32())
            } else {
                M::P::default()
            };
        }
    }
}
