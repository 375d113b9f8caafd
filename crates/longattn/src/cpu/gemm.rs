//! One safe wrapper over the `gemm` crate for the host's products: C = A B^T with A `[m, k]` and
//! B `[n, k]` row-major (rows of queries against rows of keys, activations against a weight
//! matrix's rows), C `[m, n]` row-major.

/// `c[i n + j] = sum_x a[i k + x] b[j k + x]` for i < m, j < n (C overwritten), single-threaded
/// (the estimators and the press scores run on rayon already).
///
/// Panics when a slice is shorter than its shape (a caller's bug, not an input error).
pub fn gemm_abt(c: &mut [f32], a: &[f32], b: &[f32], shape: (usize, usize, usize)) {
    gemm_abt_par(c, a, b, shape, gemm::Parallelism::None);
}

/// [`gemm_abt`] with the `gemm` crate's parallelism (the model's matmuls: threads of the
/// current rayon pool).
pub fn gemm_abt_par(
    c: &mut [f32],
    a: &[f32],
    b: &[f32],
    (m, n, k): (usize, usize, usize),
    par: gemm::Parallelism,
) {
    assert!(
        c.len() >= m * n && a.len() >= m * k && b.len() >= n * k,
        "gemm_abt: slices shorter than [{m}, {n}] = [{m}, {k}] x [{n}, {k}]^T"
    );
    if m == 0 || n == 0 {
        return;
    }
    // SAFETY: dst is m x n row-major inside `c` (checked above); lhs is m x k row-major inside
    // `a`; rhs is B^T, k x n, read from B's row-major [n][k] storage (element (x, j) at j k + x:
    // rs = 1, cs = k) inside `b`; `c` is a unique borrow, so nothing aliases it.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            false,
            a.as_ptr(),
            1,
            k as isize,
            b.as_ptr(),
            k as isize,
            1,
            0.0,
            1.0,
            false,
            false,
            false,
            par,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::gemm_abt;
    use crate::testing::Rng;

    #[test]
    fn gemm_abt_matches_the_plain_sums() {
        let mut rng = Rng::new(11);
        for (m, n, k) in [(1, 1, 1), (7, 63, 65), (64, 113, 256), (3, 0, 5), (0, 4, 2)] {
            let a: Vec<f32> = (0..m * k).map(|_| rng.normal() as f32).collect();
            let b: Vec<f32> = (0..n * k).map(|_| rng.normal() as f32).collect();
            let mut c = vec![f32::NAN; m * n];
            gemm_abt(&mut c, &a, &b, (m, n, k));
            for i in 0..m {
                for j in 0..n {
                    let want: f64 = (0..k)
                        .map(|x| a[i * k + x] as f64 * b[j * k + x] as f64)
                        .sum();
                    let got = c[i * n + j] as f64;
                    assert!(
                        (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                        "{m} {n} {k}: {got} {want}"
                    );
                }
            }
        }
    }
}
