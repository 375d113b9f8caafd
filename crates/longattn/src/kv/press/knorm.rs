//! Key-norm: keeps the n entries whose keys have the smallest L2 norm (low-norm keys draw the
//! most attention); no attention scores needed. Ties keep the newer entry.
use super::top_entries;

/// `-|k_j|^2` per entry (larger = kept first).
pub fn neg_norms(len: usize, keys: &[f32], d: usize) -> Vec<f32> {
    (0..len)
        .map(|j| -keys[j * d..][..d].iter().map(|x| x * x).sum::<f32>())
        .collect()
}

/// Fast path: partial selection on the negated squared norms.
pub fn keep(len: usize, n: usize, keys: &[f32], d: usize) -> Vec<usize> {
    top_entries(0..len, &neg_norms(len, keys, d), n)
}

/// Reference: norms in f64, a full sort by (norm ascending, newer first).
pub fn keep_reference(len: usize, n: usize, keys: &[f32], d: usize) -> Vec<usize> {
    let norm = |j: usize| -> f64 {
        keys[j * d..][..d]
            .iter()
            .map(|&x| x as f64 * x as f64)
            .sum::<f64>()
    };
    let mut c: Vec<usize> = (0..len).collect();
    // The f32 sums of the fast path decide ties the f64 ones would split: compare in f32 too.
    let n32: Vec<f32> = (0..len).map(|j| norm(j) as f32).collect();
    c.sort_by(|&a, &b| n32[a].total_cmp(&n32[b]).then(b.cmp(&a)));
    c.truncate(n);
    c.sort_unstable();
    c
}
