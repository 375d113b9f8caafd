//! Packing inputs into the micro-kernels' layouts (see `micro` for the layouts).
//!
//! Packing converts to the compute type (f32, or bf16 bits for the pair paths) and reads any
//! strides, so the kernels only ever see contiguous, padded chunks. Rows whose last dimension is
//! contiguous take a slice fast path (a plain copy when no conversion is needed); any other
//! stride goes element by element.
use super::micro::{FromF32, Micro, NC};
use crate::tensor::{Element, TensorView};

/// Row length of a packed Q row / number of K^T rows: D rounded up to `M::DIM_ALIGN`.
pub fn packed_dim<M: Micro>(d: usize) -> usize {
    d.div_ceil(M::DIM_ALIGN) * M::DIM_ALIGN
}

/// Row length of packed V: Dv rounded up to `M::DV_ALIGN`.
pub fn packed_dv<M: Micro>(dv: usize) -> usize {
    dv.div_ceil(M::DV_ALIGN) * M::DV_ALIGN
}

/// `dst[x] = src[b, s, h, x]` converted to the packed type, for x < dim (dst may be longer).
#[inline]
fn row_into<T: Element, P: FromF32 + bytemuck::Pod>(
    t: &TensorView,
    b: usize,
    s: usize,
    h: usize,
    dst: &mut [P],
) {
    let data = t.typed::<T>().expect("dtype checked by the dispatcher");
    let d = t.dim();
    let base = t.offset(b, s, h, 0);
    if t.strides[3] == 1 {
        P::convert_slice(&data[base..base + d], &mut dst[..d]);
    } else {
        for (x, o) in dst[..d].iter_mut().enumerate() {
            *o = P::from_f32(data[base + x * t.strides[3]].to_f32());
        }
    }
}

/// The row `t[b, s, h, 0..dim]` as packed elements read in place: `Some` when packing is a plain
/// copy of bits (f32 -> f32, bf16 -> bf16 bits) and the row is contiguous.
#[inline]
fn row_in_place<'a, T: Element, P: FromF32 + bytemuck::Pod>(
    t: &TensorView<'a>,
    b: usize,
    s: usize,
    h: usize,
) -> Option<&'a [P]> {
    if P::COPY_FROM != Some(T::DTYPE) || t.strides[3] != 1 {
        return None;
    }
    let data = t.typed::<T>()?;
    let base = t.offset(b, s, h, 0);
    Some(bytemuck::cast_slice(&data[base..base + t.dim()]))
}

/// Per-thread row buffer for the transposing packers.
struct RowBuf<P>(Vec<P>);

/// K^T of keys `c*NC .. c*NC+NC` (head `hk`, batch `b`) into `out` (`dp * NC` elements):
/// f32: `out[d][j]`; pairs: `out[d/2][j][d%2]`. Keys past `Sk` and dims past `D` are 0.
pub fn pack_kt<T: Element, M: Micro>(
    k: &TensorView,
    b: usize,
    hk: usize,
    c: usize,
    out: &mut [M::P],
) {
    let sk = k.seq();
    let dp = packed_dim::<M>(k.dim());
    let keys = NC.min(sk.saturating_sub(c * NC));
    // Zero the padding (keys past Sk, dims past D) first; a whole chunk of unpadded rows is
    // overwritten entirely below.
    if keys < NC || dp != k.dim() {
        out[..dp * NC].fill(M::P::default());
    }
    let mut buf = RowBuf(vec![M::P::default(); dp]);
    for j in 0..keys {
        // The key row in place when no conversion is needed, else converted into `buf`.
        let row: &[M::P] = match row_in_place::<T, M::P>(k, b, c * NC + j, hk) {
            Some(r) => r,
            None => {
                row_into::<T, M::P>(k, b, c * NC + j, hk, &mut buf.0);
                &buf.0[..k.dim()]
            }
        };
        if M::PAIRS {
            // Transpose 32-bit (even, odd) dim pairs: out[x2][j] = row[x2] (an odd D leaves the
            // last pair's second half 0).
            for (x, &val) in row.iter().enumerate() {
                out[((x / 2) * NC + j) * 2 + x % 2] = val;
            }
        } else {
            for (x, &val) in row.iter().enumerate() {
                out[x * NC + j] = val;
            }
        }
    }
}

/// V of keys `c*NC .. c*NC+NC` into `out` (`NC * dvp` elements, dvp = [`packed_dv`]):
/// f32: `out[j][x]`; pairs: `out[j/2][x][j%2]`. Keys past `Sk` and dims past `Dv` are 0.
pub fn pack_v<T: Element, M: Micro>(
    v: &TensorView,
    b: usize,
    hk: usize,
    c: usize,
    out: &mut [M::P],
) {
    let sk = v.seq();
    let dvp = packed_dv::<M>(v.dim());
    let keys = NC.min(sk.saturating_sub(c * NC));
    // Zero the padding (keys past Sk, dims past Dv) first; a whole chunk of unpadded rows is
    // overwritten entirely below.
    if keys < NC || dvp != v.dim() {
        out[..NC * dvp].fill(M::P::default());
    }
    if !M::PAIRS {
        for j in 0..keys {
            row_into::<T, M::P>(v, b, c * NC + j, hk, &mut out[j * dvp..(j + 1) * dvp]);
        }
        return;
    }
    // Interleave two key rows read in place when no conversion is needed.
    if keys > 0 && row_in_place::<T, M::P>(v, b, c * NC, hk).is_some() {
        let dv = v.dim();
        for j2 in 0..keys.div_ceil(2) {
            let even = row_in_place::<T, M::P>(v, b, c * NC + 2 * j2, hk).expect("checked");
            let dst = &mut out[j2 * 2 * dvp..j2 * 2 * dvp + 2 * dv];
            if 2 * j2 + 1 < keys {
                let odd = row_in_place::<T, M::P>(v, b, c * NC + 2 * j2 + 1, hk).expect("checked");
                for ((pair, &e), &o) in dst.chunks_exact_mut(2).zip(even).zip(odd) {
                    pair[0] = e;
                    pair[1] = o;
                }
            } else {
                for (pair, &e) in dst.chunks_exact_mut(2).zip(even) {
                    pair[0] = e;
                }
            }
        }
        return;
    }
    let mut rows = RowBuf(vec![M::P::default(); 2 * dvp]);
    for j2 in 0..keys.div_ceil(2) {
        let (even, odd) = rows.0.split_at_mut(dvp);
        row_into::<T, M::P>(v, b, c * NC + 2 * j2, hk, even);
        if 2 * j2 + 1 < keys {
            row_into::<T, M::P>(v, b, c * NC + 2 * j2 + 1, hk, odd);
        } else {
            odd.fill(M::P::default());
        }
        // Interleave the two keys: out[j2][x] = (even[x], odd[x]).
        let dst = &mut out[j2 * 2 * dvp..(j2 + 1) * 2 * dvp];
        for (x, pair) in dst.chunks_exact_mut(2).enumerate() {
            pair[0] = even[x];
            pair[1] = odd[x];
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
    let (d, dp) = (q.dim(), packed_dim::<M>(q.dim()));
    for r in 0..rows {
        let row = &mut out[r * dp..(r + 1) * dp];
        row_into::<T, M::P>(q, b, i0 + r, h, row);
        row[d..].fill(M::P::default());
    }
}
