//! SnapKV: the last `window` entries (the observation window) are kept; of the older entries the
//! n - window heaviest are kept by the window's attention `score[j] = sum_{q in window} P[q, j]`
//! max-pooled over the `kernel` neighbouring entries (`pooled[j] = max_{|t - j| <= kernel / 2}
//! score[t]`, t among the older entries), which keeps clusters of attended entries together.
use super::{top_entries, top_entries_reference};

/// Sliding maximum over `kernel` (odd) neighbours with a monotonic queue: O(len).
fn max_pool(x: &[f32], kernel: usize) -> Vec<f32> {
    let r = kernel / 2;
    let n = x.len();
    let mut out = vec![0.0f32; n];
    let mut q: std::collections::VecDeque<usize> = Default::default();
    // Window of j: [j - r, j + r]; push indices up to j + r, pop those below j - r.
    let mut next = 0;
    for (j, o) in out.iter_mut().enumerate() {
        while next < n && next <= j + r {
            while q.back().is_some_and(|&b| x[b] <= x[next]) {
                q.pop_back();
            }
            q.push_back(next);
            next += 1;
        }
        while q.front().is_some_and(|&f| f + r < j) {
            q.pop_front();
        }
        *o = x[*q.front().expect("j itself is in the window")];
    }
    out
}

fn split(len: usize, n: usize, window: usize) -> (usize, usize) {
    let w = window.min(n).min(len);
    (len - w, n - w)
}

/// Fast path: sliding-max pooling, partial selection.
pub fn keep(len: usize, n: usize, scores: &[f32], window: usize, kernel: usize) -> Vec<usize> {
    let (older, m) = split(len, n, window);
    let s: Vec<f32> = (0..older)
        .map(|j| scores.get(j).copied().unwrap_or(0.0))
        .collect();
    let mut k = top_entries(0..older, &max_pool(&s, kernel), m);
    k.extend(older..len);
    k
}

/// Reference: each pooled value as the maximum over its neighbours, a full sort.
pub fn keep_reference(
    len: usize,
    n: usize,
    scores: &[f32],
    window: usize,
    kernel: usize,
) -> Vec<usize> {
    let (older, m) = split(len, n, window);
    let r = kernel / 2;
    let s = |j: usize| scores.get(j).copied().unwrap_or(0.0);
    let pooled: Vec<f32> = (0..older)
        .map(|j| {
            (j.saturating_sub(r)..(j + r + 1).min(older))
                .map(s)
                .fold(f32::NEG_INFINITY, f32::max)
        })
        .collect();
    let mut k = top_entries_reference(0..older, &pooled, m);
    k.extend(older..len);
    k
}

#[cfg(test)]
mod tests {
    #[test]
    fn max_pool_matches_the_direct_maximum() {
        let mut rng = crate::testing::Rng::new(3);
        for &n in &[1usize, 7, 63, 65, 113] {
            let x: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
            for kernel in [1, 3, 5, 7, 129] {
                let r = kernel / 2;
                let want: Vec<f32> = (0..n)
                    .map(|j| {
                        x[j.saturating_sub(r)..(j + r + 1).min(n)]
                            .iter()
                            .copied()
                            .fold(f32::NEG_INFINITY, f32::max)
                    })
                    .collect();
                assert_eq!(super::max_pool(&x, kernel), want, "n {n} kernel {kernel}");
            }
        }
    }
}
