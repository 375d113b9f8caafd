//! A2SF (accumulative attention with a forgetting factor): keeps the n entries of largest
//! `score[j] = sum_t f^(T - t) P[t, j]` (older attention fades, so no separate recent window).
use super::{top_entries, top_entries_reference};

/// Fast path: partial selection.
pub fn keep(len: usize, n: usize, scores: &[f32]) -> Vec<usize> {
    top_entries(0..len, scores, n)
}

/// Reference: a full sort.
pub fn keep_reference(len: usize, n: usize, scores: &[f32]) -> Vec<usize> {
    top_entries_reference(0..len, scores, n)
}
