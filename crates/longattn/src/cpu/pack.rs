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
    // A whole chunk of unpadded rows read in place: one 32-bit transpose (f32 values, or bf16
    // (even, odd) dim pairs) with AVX-512 gathers.
    #[cfg(target_arch = "x86_64")]
    if keys == NC && dp == k.dim() && (!M::PAIRS || dp.is_multiple_of(2)) {
        if let Some(row0) = row_in_place::<T, M::P>(k, b, c * NC, hk) {
            let stride = k.strides[1] * std::mem::size_of::<T>();
            let units = dp * std::mem::size_of::<M::P>() / 4;
            if fast::available() && (NC - 1) * stride <= i32::MAX as usize {
                assert!(out.len() >= dp * NC);
                // SAFETY: the features were checked; rows c NC .. c NC + 63 of head hk lie in
                // the tensor (keys == NC), `stride` bytes apart, each dp = D elements of P
                // (= `units` 32-bit words) from its first dim; `out` holds units x NC words.
                unsafe {
                    fast::transpose_u32(
                        row0.as_ptr() as *const u8,
                        stride,
                        units,
                        out.as_mut_ptr() as *mut u32,
                    )
                };
                return;
            }
        }
    }
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
        #[cfg(target_arch = "x86_64")]
        let fast = fast::available();
        for j2 in 0..keys.div_ceil(2) {
            let even = row_in_place::<T, M::P>(v, b, c * NC + 2 * j2, hk).expect("checked");
            let dst = &mut out[j2 * 2 * dvp..j2 * 2 * dvp + 2 * dv];
            if 2 * j2 + 1 < keys {
                let odd = row_in_place::<T, M::P>(v, b, c * NC + 2 * j2 + 1, hk).expect("checked");
                #[cfg(target_arch = "x86_64")]
                if fast {
                    let (e, o) = (bytemuck::cast_slice(even), bytemuck::cast_slice(odd));
                    fast::interleave_u16(e, o, bytemuck::cast_slice_mut(dst));
                    continue;
                }
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

/// AVX-512 packing kernels (layout only: the packed bits are those of the plain loops above).
#[cfg(target_arch = "x86_64")]
mod fast {
    use std::arch::x86_64::*;
    use std::sync::OnceLock;

    /// AVX-512F (gathers) and AVX-512BW (16-bit permutes).
    pub(super) fn available() -> bool {
        static OK: OnceLock<bool> = OnceLock::new();
        *OK.get_or_init(|| {
            is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw")
        })
    }

    /// `out[u * NC + j] = word u of the row at src + j * stride` for u < units, j < NC = 64
    /// (32-bit words; `stride` in bytes): 16 keys of one word per gather.
    ///
    /// SAFETY: AVX-512F is available, the NC rows of `units` words are readable, `out` holds
    /// `units * NC` words, and 63 * stride fits in an i32.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn transpose_u32(src: *const u8, stride: usize, units: usize, out: *mut u32) {
        const NC: usize = super::NC;
        let s = stride as i32;
        let lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        let idx = _mm512_mullo_epi32(lanes, _mm512_set1_epi32(s));
        for j0 in (0..NC).step_by(16) {
            let base = src.add(j0 * stride);
            for u in 0..units {
                let w = _mm512_i32gather_epi32::<1>(idx, base.add(4 * u) as *const i32);
                _mm512_storeu_si512(out.add(u * NC + j0) as *mut _, w);
            }
        }
    }

    /// `dst[2 x] = even[x], dst[2 x + 1] = odd[x]` (16-bit elements; `dst` is twice as long).
    pub(super) fn interleave_u16(even: &[u16], odd: &[u16], dst: &mut [u16]) {
        assert!(even.len() == odd.len() && dst.len() == 2 * even.len());
        let n = even.len();
        let whole = n - n % 32;
        // SAFETY: `available()` was checked by the caller; every access is below `whole`
        // (inputs) or `2 whole` (output).
        unsafe { interleave_32(even.as_ptr(), odd.as_ptr(), dst.as_mut_ptr(), whole) };
        for x in whole..n {
            dst[2 * x] = even[x];
            dst[2 * x + 1] = odd[x];
        }
    }

    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn interleave_32(even: *const u16, odd: *const u16, dst: *mut u16, n: usize) {
        // Output element i of the low half takes even[i / 2] (i even) or odd[i / 2] (i odd):
        // permutex2var index i / 2 + 32 (i % 2); the high half the same from element 16.
        let mut lo = [0i16; 32];
        for (i, x) in lo.iter_mut().enumerate() {
            *x = (i / 2 + 32 * (i % 2)) as i16;
        }
        let lo = _mm512_loadu_si512(lo.as_ptr() as *const _);
        let hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
        for x in (0..n).step_by(32) {
            let e = _mm512_loadu_si512(even.add(x) as *const _);
            let o = _mm512_loadu_si512(odd.add(x) as *const _);
            _mm512_storeu_si512(
                dst.add(2 * x) as *mut _,
                _mm512_permutex2var_epi16(e, lo, o),
            );
            _mm512_storeu_si512(
                dst.add(2 * x + 32) as *mut _,
                _mm512_permutex2var_epi16(e, hi, o),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::micro::scalar::Scalar;
    use half::bf16;

    /// K^T and V chunks of a strided view (two heads interleaved, a gap after each row) against
    /// the layouts' definitions, for the pair layout (bf16 read in place: the AVX-512 transpose
    /// and interleave when available) and the f32 one, full and partial chunks.
    fn check<T: Element, M: Micro>(t: &TensorView, vals: &[f32]) {
        let (seq, d) = (t.seq(), t.dim());
        let at = |j: usize, x: usize| M::P::from_f32(vals[t.offset(0, j, 1, x)]);
        let dp = packed_dim::<M>(d);
        let dvp = packed_dv::<M>(d);
        for c in 0..seq.div_ceil(NC) {
            let mut kt = vec![M::P::default(); dp * NC];
            let mut v = vec![M::P::default(); NC * dvp];
            pack_kt::<T, M>(t, 0, 1, c, &mut kt);
            pack_v::<T, M>(t, 0, 1, c, &mut v);
            for j in 0..NC {
                for x in 0..d {
                    let want = if c * NC + j < seq {
                        at(c * NC + j, x)
                    } else {
                        M::P::default()
                    };
                    let (ki, vi) = if M::PAIRS {
                        (
                            ((x / 2) * NC + j) * 2 + x % 2,
                            (j / 2) * 2 * dvp + 2 * x + j % 2,
                        )
                    } else {
                        (x * NC + j, j * dvp + x)
                    };
                    assert!(bytemuck::bytes_of(&kt[ki]) == bytemuck::bytes_of(&want));
                    assert!(bytemuck::bytes_of(&v[vi]) == bytemuck::bytes_of(&want));
                }
            }
        }
    }

    #[test]
    fn packed_chunks_match_the_layouts() {
        let (seq, heads, d) = (150, 2, 64);
        let strides = [seq * heads * (d + 3), heads * (d + 3), d + 3, 1];
        let n = seq * heads * (d + 3);
        let b: Vec<bf16> = (0..n)
            .map(|i| bf16::from_f32((i as f32 * 0.37).sin()))
            .collect();
        let f: Vec<f32> = b.iter().map(|x| x.to_f32()).collect();
        let tf = TensorView::strided(f.as_slice(), [1, seq, heads, d], strides).unwrap();
        let tb = TensorView::strided(b.as_slice(), [1, seq, heads, d], strides).unwrap();
        check::<f32, Scalar>(&tf, &f);
        check::<bf16, Scalar>(&tb, &f);
        #[cfg(target_arch = "x86_64")]
        {
            use crate::cpu::micro::{amx::Amx, avx512::Avx512, avx512bf16::Avx512Bf16};
            check::<f32, Avx512>(&tf, &f);
            check::<bf16, Avx512Bf16>(&tb, &f);
            check::<bf16, Amx>(&tb, &f);
        }
    }
}
