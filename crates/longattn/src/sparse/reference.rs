//! Plain references of the estimators, straight from the definitions in the module header (f64,
//! every pair visited, full sorts, brute-force tile coverage). The fast estimators are tested to
//! select exactly the same tiles. Costs O(B Hq Sq Sk D): small inputs only.
use super::{candidates, dims_of, Elements, Logit, Method, SparseSpec};
use crate::attention::{AttnParams, MaskSpec};
use crate::error::Result;
use crate::mask::BlockSchedule;
use crate::tensor::TensorView;
use std::collections::{HashMap, HashSet};

/// The selection of `spec` under `mask`, computed the plain way.
pub fn select_reference(
    q: &TensorView,
    k: &TensorView,
    params: &AttnParams,
    spec: &SparseSpec,
    mask: MaskSpec,
) -> Result<BlockSchedule> {
    spec.check()?;
    params.check()?;
    let dims = dims_of(q, k)?;
    let (cand, rows) = candidates(mask, &dims, (spec.block, spec.block))?;
    if dims.sk < spec.dense_below_or(super::DENSE_BELOW) {
        return Ok(cand.into_owned()); // the dense fallback: every tile of the mask
    }
    let el = Elements { s: &cand, rows };
    let logit = Logit::new(params, dims.d);
    let t = spec.block;
    let mut out = BlockSchedule::empty(t, t, dims.sq, dims.sk, dims.batch, dims.hq)?;
    let (nq, nk) = (cand.q_tiles, cand.k_tiles);
    let group = dims.hq / dims.hk;
    let off = dims.sk as i64 - dims.sq as i64;
    for b in 0..dims.batch {
        for h in 0..dims.hq {
            let g = h / group;
            // scale q_i . k_j in f64.
            let qk = |i: usize, j: usize| -> f64 {
                (0..dims.d)
                    .map(|c| q.get(b, i, h, c) as f64 * k.get(b, j, g, c) as f64)
                    .sum()
            };
            // FlexPrefill's pattern test: the kept columns and diagonals when it picks
            // vertical-slash, None for query-aware blocks.
            let flex_vs = match spec.method {
                Method::FlexPrefill {
                    gamma,
                    tau,
                    min_budget,
                    last,
                } => flex_pattern(
                    &el,
                    &logit,
                    &qk,
                    (b, h),
                    [gamma, tau],
                    min_budget,
                    last,
                    off,
                ),
                _ => None,
            };
            // kept[qt][kt] for every tile; intersected with the candidates below.
            let kept: Vec<Vec<bool>> = match (spec.method, flex_vs) {
                (_, Some((cols, diags))) => {
                    let col_kept = |j: usize| j == 0 || cols.contains(&j);
                    let diag_kept = |o: i64| o == 0 || diags.contains(&o);
                    cover(&cand, off, &col_kept, &diag_kept)
                }
                (
                    Method::VerticalSlash {
                        v,
                        s,
                        last,
                        sink,
                        local,
                    },
                    None,
                ) => {
                    let (col, diag) = last_rows_mass(&el, &logit, &qk, b, h, last, off);
                    let cols = heaviest(col.into_iter().enumerate().collect(), v);
                    let diags = heaviest(diag.into_iter().collect(), s);
                    let (cols, diags): (HashSet<usize>, HashSet<i64>) =
                        (cols.into_iter().collect(), diags.into_iter().collect());
                    let col_kept = |j: usize| j < sink || cols.contains(&j);
                    let diag_kept = |o: i64| (0..local as i64).contains(&o) || diags.contains(&o);
                    cover(&cand, off, &col_kept, &diag_kept)
                }
                (Method::Proxy { gamma, rows, last }, None) => {
                    proxy_reference(q, k, &el, &logit, (b, h), [gamma], rows, last, off)
                }
                (method, None) => (0..nq)
                    .map(|qt| {
                        let (q0, q1) = cand.q_range(qt);
                        let c: Vec<usize> = cand
                            .row(b, h, qt)
                            .iter()
                            .map(|e| e.k_tile as usize)
                            .collect();
                        // Score of a tile: softcap of the mean over its pairs of scale q_i . k_j.
                        let score: Vec<f64> = c
                            .iter()
                            .map(|&kt| {
                                let (k0, k1) = cand.k_range(kt);
                                let sum: f64 = (q0..q1)
                                    .flat_map(|i| (k0..k1).map(move |j| (i, j)))
                                    .map(|(i, j)| qk(i, j))
                                    .sum();
                                logit.of(sum / ((q1 - q0) * (k1 - k0)) as f64)
                            })
                            .collect();
                        // Diagonal: the tile holds key p_i of some query i of the block.
                        let diag = |kt: usize| {
                            let (k0, k1) = cand.k_range(kt);
                            (q0..q1).any(|i| (k0 as i64..k1 as i64).contains(&(i as i64 + off)))
                        };
                        let sink = !matches!(method, Method::Moba { .. });
                        let forced: Vec<bool> =
                            c.iter().map(|&kt| diag(kt) || (sink && kt == 0)).collect();
                        let keep = rule(method, &score, &forced, t);
                        let mut row = vec![false; nk];
                        for (x, &kt) in c.iter().enumerate() {
                            row[kt] = keep[x];
                        }
                        row
                    })
                    .collect(),
            };
            for (qt, keep) in kept.iter().enumerate() {
                let row: Vec<_> = cand
                    .row(b, h, qt)
                    .iter()
                    .filter(|e| keep[e.k_tile as usize])
                    .copied()
                    .collect();
                out.push_row(&row)?;
            }
        }
    }
    out.finish()
}

/// Every tile (as `[q tile][k tile]`) crossed by a kept column or a kept diagonal o = p_i - j.
fn cover(
    cand: &BlockSchedule,
    off: i64,
    col_kept: &dyn Fn(usize) -> bool,
    diag_kept: &dyn Fn(i64) -> bool,
) -> Vec<Vec<bool>> {
    (0..cand.q_tiles)
        .map(|qt| {
            (0..cand.k_tiles)
                .map(|kt| {
                    let (q0, q1) = cand.q_range(qt);
                    let (k0, k1) = cand.k_range(kt);
                    (q0..q1).any(|i| {
                        (k0..k1).any(|j| col_kept(j) || diag_kept(i as i64 + off - j as i64))
                    })
                })
                .collect()
        })
        .collect()
}

/// The pooled methods' rules on one row of candidate scores (`forced`: sink / diagonal; `tile`
/// the key tile size, for FlexPrefill's minimum budget).
fn rule(method: Method, score: &[f64], forced: &[bool], tile: usize) -> Vec<bool> {
    let n = score.len();
    let m = score.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let z: f64 = score.iter().map(|s| (s - m).exp()).sum();
    let p: Vec<f64> = score.iter().map(|s| (s - m).exp() / z).collect();
    // Candidates by score descending, ties by key tile.
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| score[b].total_cmp(&score[a]).then(a.cmp(&b)));
    let mut keep = forced.to_vec();
    // Smallest prefix of the order whose mass reaches gamma with at least `min` blocks kept in
    // the row (forced ones counted); gamma = 1: every block.
    let top_mass = |gamma: f64, min: usize, keep: &mut Vec<bool>| {
        let mut mass = 0.0;
        for &x in &order {
            let kept = keep.iter().filter(|&&k| k).count();
            if gamma < 1.0 && mass >= gamma && kept >= min {
                break;
            }
            keep[x] = true;
            mass += p[x];
        }
    };
    match method {
        Method::TopMass { gamma } => top_mass(gamma, 0, &mut keep),
        Method::FlexPrefill {
            gamma, min_budget, ..
        } => top_mass(gamma, min_budget.div_ceil(tile), &mut keep),
        Method::RelThresh { alpha } => {
            let pmax = p.iter().copied().fold(0.0, f64::max);
            for x in 0..n {
                keep[x] |= p[x] >= alpha * pmax;
            }
        }
        Method::Moba { topk } => {
            // Forced blocks first, then by score; the first topk, forced ones always.
            order.sort_by_key(|&x| !forced[x]);
            for &x in order.iter().take(topk) {
                keep[x] = true;
            }
        }
        Method::Whole => keep.fill(true),
        Method::VerticalSlash { .. } | Method::Proxy { .. } => unreachable!("not a pooled method"),
    }
    keep
}

/// FlexPrefill's pattern test for one (b, h), from the definitions: the last `last` rows'
/// softmax (under the mask) summed per key tile and normalised (a_hat), the softmax over the
/// tiles those rows can see of the mean over the tile's pairs of their logits' argument
/// (a_bar), and d = sqrt(JSD(a_bar, a_hat)). d < tau (or rows that see nothing): `None`, the
/// query-aware pattern. Otherwise the heaviest columns until gamma of the total, at least
/// ceil(min_budget / block) of them (among those > 0), and the same for diagonals o = p_i - j.
#[allow(clippy::too_many_arguments)]
fn flex_pattern(
    el: &Elements,
    logit: &Logit,
    qk: &dyn Fn(usize, usize) -> f64,
    (b, h): (usize, usize),
    [gamma, tau]: [f64; 2],
    min_budget: usize,
    last: usize,
    off: i64,
) -> Option<(HashSet<usize>, HashSet<i64>)> {
    let s = el.s;
    let sq = s.sq;
    let (col, diag) = last_rows_mass(el, logit, qk, b, h, last, off);
    let total: f64 = col.iter().sum();
    if total == 0.0 {
        return None;
    }
    let rows = sq.saturating_sub(last)..sq;
    let mut exact = Vec::new();
    let mut pooled = Vec::new();
    for kt in 0..s.k_tiles {
        let (k0, k1) = s.k_range(kt);
        exact.push(col[k0..k1].iter().sum::<f64>() / total);
        let visible = rows
            .clone()
            .any(|i| (k0..k1).any(|j| el.allowed(b, h, i, j)));
        pooled.push(if visible {
            let pairs = rows.clone().flat_map(|i| (k0..k1).map(move |j| (i, j)));
            let n = rows.len() * (k1 - k0);
            logit.of(pairs.map(|(i, j)| qk(i, j)).sum::<f64>() / n as f64)
        } else {
            f64::NEG_INFINITY
        });
    }
    let m = pooled.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let z: f64 = pooled.iter().map(|x| (x - m).exp()).sum();
    let mut jsd = 0.0;
    for (x, &e) in pooled.iter().zip(&exact) {
        let a = (x - m).exp() / z;
        let mid = (a + e) / 2.0;
        if a > 0.0 {
            jsd += 0.5 * a * (a / mid).ln();
        }
        if e > 0.0 {
            jsd += 0.5 * e * (e / mid).ln();
        }
    }
    if jsd.max(0.0).sqrt() < tau {
        return None;
    }
    let min = min_budget.div_ceil(s.tile_k);
    let cols = heaviest_until(col.into_iter().enumerate().collect(), gamma, min);
    let diags = heaviest_until(diag.into_iter().collect(), gamma, min);
    Some((cols.into_iter().collect(), diags.into_iter().collect()))
}

/// Heaviest first among the entries > 0 (ties: smaller key first) until the taken mass reaches
/// gamma of the total and at least `min` are taken.
fn heaviest_until<K: Ord + Copy>(mut mass: Vec<(K, f64)>, gamma: f64, min: usize) -> Vec<K> {
    let total: f64 = mass.iter().map(|x| x.1).sum();
    mass.retain(|x| x.1 > 0.0);
    mass.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let (mut acc, mut out) = (0.0, Vec::new());
    for (key, x) in mass {
        if acc >= gamma * total && out.len() >= min {
            break;
        }
        out.push(key);
        acc += x;
    }
    out
}

/// Column mass c_j and diagonal mass d_o (o = p_i - j) of the softmax rows of the last `last`
/// queries under the mask.
#[allow(clippy::too_many_arguments)]
fn last_rows_mass(
    el: &Elements,
    logit: &Logit,
    qk: &dyn Fn(usize, usize) -> f64,
    b: usize,
    h: usize,
    last: usize,
    off: i64,
) -> (Vec<f64>, HashMap<i64, f64>) {
    let (sq, sk) = (el.s.sq, el.s.sk);
    let mut col = vec![0.0f64; sk];
    let mut diag: HashMap<i64, f64> = HashMap::new();
    for i in sq.saturating_sub(last)..sq {
        let s: Vec<(usize, f64)> = (0..sk)
            .filter(|&j| el.allowed(b, h, i, j))
            .map(|j| (j, logit.of(qk(i, j))))
            .collect();
        let m = s.iter().fold(f64::NEG_INFINITY, |a, x| a.max(x.1));
        let z: f64 = s.iter().map(|x| (x.1 - m).exp()).sum();
        for &(j, sj) in &s {
            let p = (sj - m).exp() / z;
            col[j] += p;
            *diag.entry(i as i64 + off - j as i64).or_insert(0.0) += p;
        }
    }
    (col, diag)
}

/// The `n` heaviest keys among those with mass > 0 (ties: smaller key first).
fn heaviest<K: Ord + Copy>(mut mass: Vec<(K, f64)>, n: usize) -> Vec<K> {
    mass.retain(|x| x.1 > 0.0);
    mass.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    mass.into_iter().take(n).map(|x| x.0).collect()
}

/// ProxyAttn from its definition (module `estimate`): the proxy query of a row is the mean of
/// its KV group's query heads; a query tile's score of a key tile is the proxy softmax mass in
/// it, averaged over the sampled rows; the head keeps sink and diagonal tiles, then the best by
/// score until min(n_h, c) of its c candidates are kept and their score sum reaches gamma, n_h
/// the tiles its last rows need for mass gamma (all when they see no key). `[q tile][k tile]`
/// flags.
#[allow(clippy::too_many_arguments)]
fn proxy_reference(
    q: &TensorView,
    k: &TensorView,
    el: &Elements,
    logit: &Logit,
    (b, h): (usize, usize),
    [gamma]: [f64; 1],
    rows: usize,
    last: usize,
    off: i64,
) -> Vec<Vec<bool>> {
    let (cand, sk, d) = (el.s, el.s.sk, q.dim());
    let (hq, hk) = (q.heads(), k.heads());
    let group = hq / hk;
    let g = h / group;
    let t = cand.tile_k;
    let qbar = |i: usize, c: usize| -> f64 {
        (g * group..(g + 1) * group)
            .map(|x| q.get(b, i, x, c) as f64)
            .sum::<f64>()
            / group as f64
    };
    let kk = |j: usize, c: usize| k.get(b, j, g, c) as f64;
    // The head's budget share from its last rows' exact distribution.
    let qh = |i: usize, j: usize| (0..d).map(|c| q.get(b, i, h, c) as f64 * kk(j, c)).sum();
    let (col, _) = last_rows_mass(el, logit, &qh, b, h, last, off);
    let mut tile_mass = vec![0.0f64; cand.k_tiles];
    for j in 0..sk {
        tile_mass[j / t] += col[j];
    }
    let total: f64 = tile_mass.iter().sum();
    let mut by_mass: Vec<usize> = (0..cand.k_tiles).filter(|&x| tile_mass[x] > 0.0).collect();
    by_mass.sort_by(|&a, &b| tile_mass[b].total_cmp(&tile_mass[a]).then(a.cmp(&b)));
    let mut need = 0;
    let mut acc = 0.0;
    for &x in &by_mass {
        if acc >= gamma * total && need >= 1 {
            break;
        }
        acc += tile_mass[x];
        need += 1;
    }
    if total <= 0.0 {
        need = usize::MAX;
    }
    (0..cand.q_tiles)
        .map(|qt| {
            let (q0, q1) = cand.q_range(qt);
            let mut picks: Vec<usize> =
                (0..rows).map(|r| q0 + (r + 1) * (q1 - q0) / rows).collect();
            picks.retain(|&i| i > q0);
            picks.dedup();
            let mut score = vec![0.0f64; cand.k_tiles];
            for &i in &picks {
                let i = i - 1;
                let s: Vec<(usize, f64)> = (0..sk)
                    .filter(|&j| el.allowed(b, g * group, i, j))
                    .map(|j| (j, logit.of((0..d).map(|c| qbar(i, c) * kk(j, c)).sum())))
                    .collect();
                let m = s.iter().fold(f64::NEG_INFINITY, |a, x| a.max(x.1));
                if m == f64::NEG_INFINITY {
                    continue;
                }
                let z: f64 = s.iter().map(|x| (x.1 - m).exp()).sum();
                for &(j, sj) in &s {
                    score[j / t] += (sj - m).exp() / z;
                }
            }
            score
                .iter_mut()
                .for_each(|x| *x /= picks.len().max(1) as f64);
            let c: Vec<usize> = cand
                .row(b, h, qt)
                .iter()
                .map(|e| e.k_tile as usize)
                .collect();
            let m = need.min(c.len());
            let diag = |kt: usize| {
                let (k0, k1) = cand.k_range(kt);
                (q0..q1).any(|i| (k0 as i64..k1 as i64).contains(&(i as i64 + off)))
            };
            let mut row = vec![false; cand.k_tiles];
            for &kt in &c {
                row[kt] = kt == 0 || diag(kt);
            }
            let mut order = c.clone();
            order.sort_by(|&a, &b| score[b].total_cmp(&score[a]).then(a.cmp(&b)));
            let mut kept = c.iter().filter(|&&kt| row[kt]).count();
            let mut mass: f64 = c.iter().filter(|&&kt| row[kt]).map(|&kt| score[kt]).sum();
            for kt in order {
                if kept >= m && mass >= gamma {
                    break;
                }
                if !row[kt] {
                    row[kt] = true;
                    kept += 1;
                    mass += score[kt];
                }
            }
            row
        })
        .collect()
}
