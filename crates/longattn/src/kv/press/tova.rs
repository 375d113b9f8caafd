//! TOVA (token omission via attention): keeps the n entries the latest query attends most,
//! `score[j] = P[T, j]` (reduced over the group's query heads; with `heads=layer` the caller
//! passes the layer's mean and the latest entry is kept whatever its score).
use super::{top_entries, top_entries_reference};

/// Fast path: partial selection (`latest`: the newest entry first, then the n - 1 others).
pub fn keep(len: usize, n: usize, scores: &[f32], latest: bool) -> Vec<usize> {
    if latest && n > 0 {
        let mut k = top_entries(0..len - 1, scores, n - 1);
        k.push(len - 1);
        return k;
    }
    top_entries(0..len, scores, n)
}

/// Reference: a full sort (`latest`: the newest entry ranked above every score).
pub fn keep_reference(len: usize, n: usize, scores: &[f32], latest: bool) -> Vec<usize> {
    if !latest {
        return top_entries_reference(0..len, scores, n);
    }
    let mut s: Vec<f32> = (0..len)
        .map(|j| scores.get(j).copied().unwrap_or(0.0))
        .collect();
    if let Some(last) = s.last_mut() {
        *last = f32::INFINITY;
    }
    top_entries_reference(0..len, &s, n)
}
