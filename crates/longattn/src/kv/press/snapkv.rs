//! SnapKV: the last `window` entries (the observation window) are kept; of the older entries the
//! n - window heaviest are kept by the window's attention `score[j] = sum_{q in window} P[q, j]`
//! max-pooled over the `kernel` neighbouring entries (`pooled[j] = max_{|t - j| <= kernel / 2}
//! score[t]`, t among the older entries), which keeps clusters of attended entries together.
//! With `pool=avg` the pooling is the mean over the kernel instead, zeros beyond the ends
//! (`pooled[j] = sum_{|t - j| <= kernel / 2} score[t] / kernel`).
use super::{top_entries, top_entries_reference, Pool};

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

/// Sliding mean over `kernel` (odd) neighbours, zeros beyond the ends, divided by `kernel`
/// (the window sum kept running in f64): O(len).
fn avg_pool(x: &[f32], kernel: usize) -> Vec<f32> {
    let r = kernel / 2;
    let n = x.len();
    let mut sum = 0.0f64;
    // sum = x[j - r ..= j + r] (clipped); before j = 0 it holds x[0 .. r].
    for &v in &x[..r.min(n)] {
        sum += v as f64;
    }
    (0..n)
        .map(|j| {
            if j + r < n {
                sum += x[j + r] as f64;
            }
            let out = (sum / kernel as f64) as f32;
            if j >= r {
                sum -= x[j - r] as f64;
            }
            out
        })
        .collect()
}

/// The pooled scores of the older entries (`scores` read as 0 past their end).
pub fn pooled(older: usize, scores: &[f32], kernel: usize, pool: Pool) -> Vec<f32> {
    let s: Vec<f32> = (0..older)
        .map(|j| scores.get(j).copied().unwrap_or(0.0))
        .collect();
    match pool {
        Pool::Max => max_pool(&s, kernel),
        Pool::Avg => avg_pool(&s, kernel),
    }
}

/// The older entries and how many of them are kept: (len - w, n - w), w = min(window, n, len).
pub fn split(len: usize, n: usize, window: usize) -> (usize, usize) {
    let w = window.min(n).min(len);
    (len - w, n - w)
}

/// Fast path: sliding-max pooling, partial selection.
pub fn keep(
    len: usize,
    n: usize,
    scores: &[f32],
    window: usize,
    kernel: usize,
    pool: Pool,
) -> Vec<usize> {
    let (older, m) = split(len, n, window);
    let mut k = top_entries(0..older, &pooled(older, scores, kernel, pool), m);
    k.extend(older..len);
    k
}

/// Reference: each pooled value as the maximum (or the sum / kernel, in f64) over its
/// neighbours, a full sort.
pub fn keep_reference(
    len: usize,
    n: usize,
    scores: &[f32],
    window: usize,
    kernel: usize,
    pool: Pool,
) -> Vec<usize> {
    let (older, m) = split(len, n, window);
    let r = kernel / 2;
    let s = |j: usize| scores.get(j).copied().unwrap_or(0.0);
    let pooled: Vec<f32> = (0..older)
        .map(|j| {
            let around = j.saturating_sub(r)..(j + r + 1).min(older);
            match pool {
                Pool::Max => around.map(s).fold(f32::NEG_INFINITY, f32::max),
                Pool::Avg => (around.map(|t| s(t) as f64).sum::<f64>() / kernel as f64) as f32,
            }
        })
        .collect();
    let mut k = top_entries_reference(0..older, &pooled, m);
    k.extend(older..len);
    k
}

#[cfg(test)]
mod tests {
    #[test]
    fn pooling_matches_the_direct_maximum_and_mean() {
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
                // Integer-valued inputs: the running f64 sum is exact, so the means are equal.
                let xi: Vec<f32> = x.iter().map(|v| (v * 8.0).round()).collect();
                let mean: Vec<f32> = (0..n)
                    .map(|j| {
                        let s: f64 = xi[j.saturating_sub(r)..(j + r + 1).min(n)]
                            .iter()
                            .map(|&v| v as f64)
                            .sum();
                        (s / kernel as f64) as f32
                    })
                    .collect();
                assert_eq!(super::avg_pool(&xi, kernel), mean, "n {n} kernel {kernel}");
            }
        }
    }
}
