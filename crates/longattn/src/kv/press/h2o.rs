//! H2O (heavy hitters + recent): of the n entries kept, the `floor(R n)` newest are kept as the
//! recent window (R = `recent`, 0.5 by default) and the others are the heaviest of the older
//! entries by accumulated attention `score[j] = sum_t P[t, j]` (with `score=mean` the caller
//! divides it by the queries that saw the entry first: [`super::Accum::Mean`]).
use super::{top_entries, top_entries_reference};

/// The recent window's length: `floor(recent n)`.
pub fn recent_len(n: usize, recent: f64) -> usize {
    ((n as f64 * recent).floor() as usize).min(n)
}

/// Fast path: partial selection among the older entries.
pub fn keep(len: usize, n: usize, scores: &[f32], recent: f64) -> Vec<usize> {
    let r = recent_len(n, recent);
    let mut k = top_entries(0..len - r, scores, n - r);
    k.extend(len - r..len);
    k
}

/// Reference: a full sort of the older entries.
pub fn keep_reference(len: usize, n: usize, scores: &[f32], recent: f64) -> Vec<usize> {
    let r = recent_len(n, recent);
    let mut k = top_entries_reference(0..len - r, scores, n - r);
    k.extend(len - r..len);
    k
}
