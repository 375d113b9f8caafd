//! StreamingLLM: attention sinks and a sliding window. Keeps the first `sinks` entries and the
//! last `window` (the two overlap when the head holds fewer than sinks + window).

/// Fast path: the two index ranges.
pub fn keep(len: usize, sinks: usize, window: usize) -> Vec<usize> {
    let s = sinks.min(len);
    let w0 = len.saturating_sub(window).max(s);
    (0..s).chain(w0..len).collect()
}

/// Reference: the membership test of each entry.
pub fn keep_reference(len: usize, sinks: usize, window: usize) -> Vec<usize> {
    (0..len)
        .filter(|&j| j < sinks || j + window >= len)
        .collect()
}
