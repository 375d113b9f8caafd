//! LOOK-M-style merging (`SPEC+merge`): what a press evicts is folded into one residual slot per
//! (layer, KV head) instead of being dropped.
//!
//! A head cut to n entries keeps n - 1 entries chosen by the press among its entries other than
//! the slot, plus the slot. The first time a head evicts, its slot is the newest evicted entry
//! (which keeps its position: entries stay in position order, the mask reads it there). The slot
//! holds the weighted mean of everything merged into it:
//!
//!   `x_slot' = (W x_slot + sum_{e in E} w_e x_e) / (W + sum_{e in E} w_e)`,  `W' = W + sum w_e`,
//!
//! for x = K and V, E the entries evicted now, W the weight merged so far (0 for a new slot, whose
//! own entry is in E). `w_e` is the entry's score for the presses that rank by scores (the
//! attention mass it received, so heavily attended keys dominate), 1 for the others (streaming,
//! knorm, duo); when every `w_e` of E is 0 they count 1 each. Keys are merged after RoPE, as they
//! sit in the cache. With uniform weights the slot is exactly the mean of every entry ever
//! evicted from its head (the tests hold it to that, computed in f64).
use super::{keep, HeadInput, Press};

/// One head's residual slot: its entry index and the weight merged into it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Slot {
    pub entry: usize,
    pub weight: f64,
}

/// The slots of one sequence, `[layer * Hk + KV head]` (None: the head has not evicted yet).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MergeSlots {
    pub slots: Vec<Option<Slot>>,
}

impl MergeSlots {
    pub fn new(layers: usize, kv_heads: usize) -> Self {
        MergeSlots {
            slots: vec![None; layers * kv_heads],
        }
    }
}

/// The keep set of a head that the press cuts to `h.n` entries (1 <= n < len) under merging: the
/// press ranks every entry but the slot (`slot`: its entry) for n - 1 places and the slot is kept;
/// without a slot yet, the newest entry the press drops becomes it. Returns (keep, slot entry).
pub fn keep_with_slot(press: &Press, h: &HeadInput, slot: Option<usize>) -> (Vec<usize>, usize) {
    let (len, n, d) = (h.len, h.n, h.head_dim);
    debug_assert!(n >= 1 && n < len);
    let idx: Vec<usize> = (0..len).filter(|&j| Some(j) != slot).collect();
    // Scores cover a prefix of the entries (the unscored tail counts 0), so do the filtered ones.
    let sub_scores: Vec<f32> = idx
        .iter()
        .filter_map(|&j| h.scores.get(j).copied())
        .collect();
    let sub_keys: Vec<f32> = if h.keys.is_empty() {
        Vec::new()
    } else {
        idx.iter()
            .flat_map(|&j| h.keys[j * d..(j + 1) * d].iter().copied())
            .collect()
    };
    let sub = HeadInput {
        len: idx.len(),
        n: n - 1,
        scores: &sub_scores,
        keys: &sub_keys,
        head_dim: d,
    };
    let mut kept: Vec<usize> = keep(press, &sub).into_iter().map(|i| idx[i]).collect();
    let entry = match slot {
        Some(e) => e,
        None => {
            // n - 1 < len entries kept: at least one is dropped.
            let mut is_kept = vec![false; len];
            for &j in &kept {
                is_kept[j] = true;
            }
            (0..len)
                .rev()
                .find(|&j| !is_kept[j])
                .expect("one entry is dropped")
        }
    };
    kept.push(entry);
    kept.sort_unstable();
    (kept, entry)
}

/// The slot's new K `[D]` and V `[Dv]` and its weight after merging `evicted` (with `weights`)
/// into the slot at `entry` holding weight `w_old` (module formula); `k` `[len, D]`, `v` `[len,
/// Dv]` are the head's entries before compaction.
pub fn merged_values(
    (entry, w_old): (usize, f64),
    evicted: &[usize],
    weights: &[f64],
    (k, v): (&[f32], &[f32]),
    (d, dv): (usize, usize),
) -> (Vec<f32>, Vec<f32>, f64) {
    let mut w: Vec<f64> = weights.iter().map(|&x| x.max(0.0)).collect();
    if w.iter().sum::<f64>() <= 0.0 {
        w.iter_mut().for_each(|x| *x = 1.0);
    }
    let total = w_old + w.iter().sum::<f64>();
    let mean = |x: &[f32], dim: usize| -> Vec<f32> {
        (0..dim)
            .map(|c| {
                let mut acc = w_old * x[entry * dim + c] as f64;
                for (&e, &we) in evicted.iter().zip(&w) {
                    acc += we * x[e * dim + c] as f64;
                }
                (acc / total) as f32
            })
            .collect()
    };
    (mean(k, d), mean(v, dv), total)
}
