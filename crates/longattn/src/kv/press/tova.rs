//! TOVA (token omission via attention): keeps the n entries the latest query attends most,
//! `score[j] = P[T, j]` (reduced over the group's query heads).
use super::{top_entries, top_entries_reference};

/// Fast path: partial selection.
pub fn keep(len: usize, n: usize, scores: &[f32]) -> Vec<usize> {
    top_entries(0..len, scores, n)
}

/// Reference: a full sort.
pub fn keep_reference(len: usize, n: usize, scores: &[f32]) -> Vec<usize> {
    top_entries_reference(0..len, scores, n)
}
