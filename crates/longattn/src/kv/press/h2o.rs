//! H2O (heavy hitters + recent): of the n entries kept, the floor(n / 2) newest are kept as the
//! recent window and the other n - floor(n / 2) are the heaviest of the older entries by
//! accumulated attention `score[j] = sum_t P[t, j]`.
use super::{top_entries, top_entries_reference};

/// Fast path: partial selection among the older entries.
pub fn keep(len: usize, n: usize, scores: &[f32]) -> Vec<usize> {
    let recent = n / 2;
    let mut k = top_entries(0..len - recent, scores, n - recent);
    k.extend(len - recent..len);
    k
}

/// Reference: a full sort of the older entries.
pub fn keep_reference(len: usize, n: usize, scores: &[f32]) -> Vec<usize> {
    let recent = n / 2;
    let mut k = top_entries_reference(0..len - recent, scores, n - recent);
    k.extend(len - recent..len);
    k
}
