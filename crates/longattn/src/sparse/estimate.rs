//! The fast CPU estimators: the one dispatch over [`Method`], parallel over (batch row, head).
//!
//! Pooled methods cost O((Sq + Sk) D) for the block means plus O(candidates x D) for the scores;
//! vertical-slash costs O(last x Sk x D) for its estimate plus O(candidates) to coarsen (prefix
//! sums over the kept columns and diagonals). Each returns, per query tile, the kept subset of
//! the candidate entries (kinds kept from the mask).
use super::{Ctx, Method};
use crate::mask::TileEntry;
use rayon::prelude::*;
use std::cmp::Ordering;

/// Kept entries of every (batch row, query head) in row order, each a list per query tile.
pub(crate) fn select_all(ctx: &Ctx, method: &Method) -> Vec<Vec<Vec<TileEntry>>> {
    let d = ctx.dims;
    if let Method::Proxy { gamma, rows, last } = *method {
        // The proxy scores once per (batch row, KV group), then each head's own budget.
        let scores: Vec<Vec<Vec<f64>>> = (0..d.batch * d.hk)
            .into_par_iter()
            .map(|r| proxy_scores(ctx, r / d.hk, r % d.hk, rows))
            .collect();
        return (0..d.batch * d.hq)
            .into_par_iter()
            .map(|r| {
                let (b, h) = (r / d.hq, r % d.hq);
                proxy_head(ctx, b, h, &scores[b * d.hk + ctx.kv_head(h)], gamma, last)
            })
            .collect();
    }
    let pooled = !matches!(method, Method::VerticalSlash { .. } | Method::Proxy { .. });
    // Block means of the keys per (batch row, key head), shared by the query heads of a group.
    let kbar: Vec<Vec<f64>> = if pooled {
        (0..d.batch * d.hk)
            .into_par_iter()
            .map(|r| pool(ctx, true, r / d.hk, r % d.hk))
            .collect()
    } else {
        Vec::new()
    };
    (0..d.batch * d.hq)
        .into_par_iter()
        .map(|r| {
            let (b, h) = (r / d.hq, r % d.hq);
            match *method {
                Method::VerticalSlash {
                    v,
                    s,
                    last,
                    sink,
                    local,
                } => vertical_slash(ctx, b, h, [v, s, last, sink, local]),
                Method::FlexPrefill {
                    gamma,
                    tau,
                    min_budget,
                    last,
                } => {
                    let kbar = &kbar[b * d.hk + ctx.kv_head(h)];
                    flexprefill(ctx, b, h, kbar, [gamma, tau], min_budget, last)
                }
                _ => pooled_head(ctx, method, b, h, &kbar[b * d.hk + ctx.kv_head(h)]),
            }
        })
        .collect()
}

/// Block means of q (head `h`) or k (key head `h`) of batch row `b`: for every tile of rows
/// [r0, r1), mean_r x_r, as `[tiles, D]`.
fn pool(ctx: &Ctx, keys: bool, b: usize, h: usize) -> Vec<f64> {
    let (x, t, n) = if keys {
        (ctx.k, ctx.cand.tile_k, ctx.dims.sk)
    } else {
        (ctx.q, ctx.cand.tile_q, ctx.dims.sq)
    };
    let dd = ctx.dims.d;
    let tiles = n.div_ceil(t);
    let mut out = vec![0.0f64; tiles * dd];
    for (tile, acc) in out.chunks_exact_mut(dd).enumerate() {
        let (r0, r1) = (tile * t, ((tile + 1) * t).min(n));
        for r in r0..r1 {
            for (c, a) in acc.iter_mut().enumerate() {
                *a += x.get(b, r, h, c) as f64;
            }
        }
        let inv = 1.0 / (r1 - r0) as f64;
        acc.iter_mut().for_each(|a| *a *= inv);
    }
    out
}

#[inline]
fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Orders indices by score descending, ties by index ascending (a total order).
fn by_score(s: &[f64]) -> impl Fn(&usize, &usize) -> Ordering + '_ {
    move |&a, &b| s[b].total_cmp(&s[a]).then(a.cmp(&b))
}

/// One (batch row, head) of topmass / relthresh / moba: pooled scores of the candidate tiles,
/// then the method's rule per query tile.
fn pooled_head(
    ctx: &Ctx,
    method: &Method,
    b: usize,
    h: usize,
    kbar: &[f64],
) -> Vec<Vec<TileEntry>> {
    let dd = ctx.dims.d;
    let qbar = pool(ctx, false, b, h);
    let mut scores = Vec::new();
    (0..ctx.cand.q_tiles)
        .map(|qt| {
            let cand = ctx.cand.row(b, h, qt);
            let qv = &qbar[qt * dd..][..dd];
            // s(qt, kt) = softcap(scale mean(q) . mean(k)).
            scores.clear();
            scores.extend(
                cand.iter()
                    .map(|e| ctx.logit.of(dot(qv, &kbar[e.k_tile as usize * dd..][..dd]))),
            );
            let diag = ctx.diag_tiles(qt);
            let in_diag = |kt: u32| diag.is_some_and(|(lo, hi)| lo <= kt && kt <= hi);
            let sink = !matches!(method, Method::Moba { .. });
            let mut keep: Vec<bool> = cand
                .iter()
                .map(|e| in_diag(e.k_tile) || (sink && e.k_tile == 0))
                .collect();
            match *method {
                Method::TopMass { gamma } => top_mass(&scores, gamma, 0, &mut keep),
                Method::FlexPrefill {
                    gamma, min_budget, ..
                } => {
                    let min_tiles = min_budget.div_ceil(ctx.cand.tile_k);
                    top_mass(&scores, gamma, min_tiles, &mut keep)
                }
                Method::RelThresh { alpha } => rel_thresh(&scores, alpha, &mut keep),
                Method::Moba { topk } => top_k(&scores, topk, &mut keep),
                Method::Whole => keep.fill(true),
                Method::VerticalSlash { .. } | Method::Proxy { .. } => {
                    unreachable!("not a pooled method")
                }
            }
            cand.iter()
                .zip(&keep)
                .filter(|(_, &k)| k)
                .map(|(e, _)| *e)
                .collect()
        })
        .collect()
}

/// Adds to `keep` the most probable blocks, p = softmax(s), in decreasing order until their
/// cumulative mass reaches gamma (the block that reaches it included) and at least `min_kept`
/// blocks of the row are kept (forced ones counted); gamma >= 1 keeps all (in exact arithmetic
/// only the whole row has mass 1).
fn top_mass(s: &[f64], gamma: f64, min_kept: usize, keep: &mut [bool]) {
    if gamma >= 1.0 {
        keep.fill(true);
        return;
    }
    let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let z: f64 = s.iter().map(|&x| (x - m).exp()).sum();
    let mut order: Vec<usize> = (0..s.len()).collect();
    order.sort_unstable_by(by_score(s));
    let mut kept = keep.iter().filter(|&&k| k).count();
    let mut mass = 0.0;
    for x in order {
        kept += !std::mem::replace(&mut keep[x], true) as usize;
        mass += (s[x] - m).exp() / z;
        if mass >= gamma && kept >= min_kept {
            break;
        }
    }
}

/// Adds the blocks with p >= alpha max p, i.e. s - max s >= ln alpha (one pass for the max, one
/// for the test; alpha = 0 gives ln 0 = -inf and keeps all).
fn rel_thresh(s: &[f64], alpha: f64, keep: &mut [bool]) {
    let thr = s.iter().copied().fold(f64::NEG_INFINITY, f64::max) + alpha.ln();
    for (k, &x) in keep.iter_mut().zip(s) {
        *k |= x >= thr;
    }
}

/// MoBA: the `topk` blocks first by forced (already in `keep`), then by score; forced blocks are
/// kept even past topk.
fn top_k(s: &[f64], topk: usize, keep: &mut [bool]) {
    if topk >= s.len() {
        keep.fill(true);
        return;
    }
    let forced = keep.to_vec();
    let score = by_score(s);
    let mut order: Vec<usize> = (0..s.len()).collect();
    order.select_nth_unstable_by(topk - 1, |a, b| {
        forced[*b].cmp(&forced[*a]).then(score(a, b))
    });
    for &x in &order[..topk] {
        keep[x] = true;
    }
}

/// The `n` largest entries among those > 0 (ties by index), as flags.
fn top_positive(mass: &[f64], n: usize) -> Vec<bool> {
    let mut idx: Vec<usize> = (0..mass.len()).filter(|&j| mass[j] > 0.0).collect();
    if idx.len() > n {
        if n == 0 {
            idx.clear();
        } else {
            idx.select_nth_unstable_by(n - 1, by_score(mass));
            idx.truncate(n);
        }
    }
    let mut out = vec![false; mass.len()];
    idx.into_iter().for_each(|j| out[j] = true);
    out
}

/// Exclusive prefix sums of flags: `p[b] - p[a]` counts the set flags in `a..b`.
fn prefix(flags: &[bool]) -> Vec<u32> {
    let mut p = Vec::with_capacity(flags.len() + 1);
    p.push(0u32);
    for &f in flags {
        p.push(p[p.len() - 1] + f as u32);
    }
    p
}

/// What the last query rows of one (batch row, head) say about the keys, from their exact
/// softmax rows under the mask.
struct LastRows {
    /// Column mass c_j = sum_i p_ij, `[Sk]`.
    col: Vec<f64>,
    /// Diagonal mass d_o = sum_{p_i - j = o} p_ij at index o + Sq - 1, `[Sq + Sk - 1]`.
    diag: Vec<f64>,
    /// Keys allowed for at least one of the rows, `[Sk]`.
    seen: Vec<bool>,
    /// Mean of the rows' queries (all `last` of them), `[D]`.
    qmean: Vec<f64>,
}

/// Column and diagonal mass of the last `last` query rows (rows without an allowed key estimate
/// nothing).
fn last_rows(ctx: &Ctx, b: usize, h: usize, last: usize) -> LastRows {
    let (sq, sk, dd) = (ctx.dims.sq, ctx.dims.sk, ctx.dims.d);
    let g = ctx.kv_head(h);
    // Keys of this head, widened once: [Sk, D].
    let keys: Vec<f64> = (0..sk)
        .flat_map(|j| (0..dd).map(move |c| (j, c)))
        .map(|(j, c)| ctx.k.get(b, j, g, c) as f64)
        .collect();
    let mut col = vec![0.0f64; sk];
    let mut diag = vec![0.0f64; sq + sk - 1];
    let mut seen = vec![false; sk];
    let mut qmean = vec![0.0f64; dd];
    let (mut allowed, mut words) = (vec![false; sk], Vec::new());
    let mut logits = vec![0.0f64; sk];
    let mut qrow = vec![0.0f64; dd];
    let first = sq - last.min(sq);
    for i in first..sq {
        ctx.el.row(b, h, i, &mut allowed, &mut words);
        qrow.iter_mut()
            .enumerate()
            .for_each(|(c, x)| *x = ctx.q.get(b, i, h, c) as f64);
        qmean.iter_mut().zip(&qrow).for_each(|(a, x)| *a += x);
        // p_ij = exp(s_ij - m) / z over the allowed keys.
        let mut m = f64::NEG_INFINITY;
        for j in (0..sk).filter(|&j| allowed[j]) {
            logits[j] = ctx.logit.of(dot(&qrow, &keys[j * dd..][..dd]));
            m = m.max(logits[j]);
            seen[j] = true;
        }
        if m == f64::NEG_INFINITY {
            continue; // no allowed key: the row estimates nothing
        }
        let z: f64 = (0..sk)
            .filter(|&j| allowed[j])
            .map(|j| (logits[j] - m).exp())
            .sum();
        for j in (0..sk).filter(|&j| allowed[j]) {
            let p = (logits[j] - m).exp() / z;
            col[j] += p;
            diag[i + sk - 1 - j] += p;
        }
    }
    let inv = 1.0 / (sq - first) as f64;
    qmean.iter_mut().for_each(|a| *a *= inv);
    LastRows {
        col,
        diag,
        seen,
        qmean,
    }
}

/// Vertical-slash for one (batch row, head); `a` = [v, s, last, sink, local].
fn vertical_slash(ctx: &Ctx, b: usize, h: usize, a: [usize; 5]) -> Vec<Vec<TileEntry>> {
    let [v, s, last, sink, local] = a;
    let LastRows { col, diag, .. } = last_rows(ctx, b, h, last);
    vs_keep(ctx, b, h, &col, &diag, [v, s, sink, local])
}

/// Column mass `[Sk]` and diagonal mass `[Sq + Sk - 1]` of the last `last` rows of (b, h) (the
/// f64 reference of the CUDA estimator's first kernels).
pub(crate) fn last_mass(ctx: &Ctx, b: usize, h: usize, last: usize) -> (Vec<f64>, Vec<f64>) {
    let r = last_rows(ctx, b, h, last);
    (r.col, r.diag)
}

/// Vertical-slash's keep step from given masses; `a` = [v, s, sink, local]: the `v` heaviest
/// columns and `s` heaviest diagonals with mass > 0 (ties by index), the columns j < sink and the
/// diagonals 0 <= o < local, coarsened to the candidate tiles.
pub(crate) fn vs_keep(
    ctx: &Ctx,
    b: usize,
    h: usize,
    col: &[f64],
    diag: &[f64],
    a: [usize; 4],
) -> Vec<Vec<TileEntry>> {
    let [v, s, sink, local] = a;
    let (sq, sk) = (ctx.dims.sq, ctx.dims.sk);
    let mut cols = top_positive(col, v);
    cols[..sink.min(sk)].fill(true);
    let mut diags = top_positive(diag, s);
    // Local band 0 <= o < local: indices Sq - 1 .. Sq - 1 + local.
    let band = (sq - 1).min(diags.len())..(sq - 1 + local).min(diags.len());
    diags[band].fill(true);
    coarsen(ctx, b, h, &cols, &diags)
}

/// The candidate tiles of (b, h) crossed by a kept column (`cols`, `[Sk]`) or a kept diagonal
/// (`diags`, index o + Sq - 1, `[Sq + Sk - 1]`).
fn coarsen(ctx: &Ctx, b: usize, h: usize, cols: &[bool], diags: &[bool]) -> Vec<Vec<TileEntry>> {
    let sq = ctx.dims.sq;
    let (cp, dp) = (prefix(cols), prefix(diags));
    let n_diag = diags.len() as i64;
    (0..ctx.cand.q_tiles)
        .map(|qt| {
            let (q0, q1) = ctx.cand.q_range(qt);
            let (p0, p1) = (ctx.pos(q0), ctx.pos(q1 - 1));
            ctx.cand
                .row(b, h, qt)
                .iter()
                .filter(|e| {
                    let (k0, k1) = ctx.cand.k_range(e.k_tile as usize);
                    // A kept column j in [k0, k1), or a kept diagonal o = p_i - j with i in the
                    // tile: o in [p0 - (k1 - 1), p1 - k0] (consecutive integers).
                    let lo = (p0 - (k1 as i64 - 1) + sq as i64 - 1).max(0);
                    let hi = (p1 - k0 as i64 + sq as i64 - 1).min(n_diag - 1);
                    cp[k1] > cp[k0] || (lo <= hi && dp[hi as usize + 1] > dp[lo as usize])
                })
                .copied()
                .collect()
        })
        .collect()
}

/// The smallest set of entries, heaviest first (ties by index) among those > 0, whose mass
/// reaches `target` and that holds at least `min` entries (or every entry > 0), as flags.
fn cumulative(mass: &[f64], target: f64, min: usize) -> Vec<bool> {
    let mut idx: Vec<usize> = (0..mass.len()).filter(|&j| mass[j] > 0.0).collect();
    idx.sort_unstable_by(by_score(mass));
    let mut out = vec![false; mass.len()];
    let mut acc = 0.0;
    for (n, j) in idx.into_iter().enumerate() {
        if acc >= target && n >= min {
            break;
        }
        out[j] = true;
        acc += mass[j];
    }
    out
}

/// Square-root Jensen-Shannon distance of two distributions (natural logarithm, 0 ln 0 = 0):
/// sqrt(JSD), JSD = 1/2 sum p ln(p / m) + 1/2 sum q ln(q / m), m = (p + q) / 2; in
/// [0, sqrt(ln 2)].
pub(crate) fn js_distance(p: &[f64], q: &[f64]) -> f64 {
    let half_kl = |a: f64, m: f64| if a > 0.0 { 0.5 * a * (a / m).ln() } else { 0.0 };
    let jsd: f64 = p
        .iter()
        .zip(q)
        .map(|(&a, &b)| {
            let m = 0.5 * (a + b);
            half_kl(a, m) + half_kl(b, m)
        })
        .sum();
    jsd.max(0.0).sqrt()
}

/// FlexPrefill for one (batch row, head): the pattern test, then query-aware blocks or
/// cumulative vertical-slash. `gt` = [gamma, tau]; `kbar` the key tile means of the head.
///
/// Pattern test, on the last `last` query rows: the exact block distribution
///   a_hat(kt) = sum_{j in kt} c_j / sum_j c_j        (c_j the rows' column mass)
/// against the pooled estimate over the key tiles S the rows can see
///   a_bar(kt) = softmax_{kt in S} softcap(scale mean_i(q_i) . mean_{j in kt}(k_j)).
/// sqrt(JSD(a_bar, a_hat)) < tau: the pooled scores track the real distribution, so every query
/// tile keeps its key tiles by pooled score (top mass gamma, at least ceil(min_budget / block)
/// tiles, sink and diagonal tiles forced). Otherwise: the heaviest columns until their mass
/// reaches gamma of the column total (at least ceil(min_budget / block) of them), the same for
/// diagonals,
/// with column 0 and diagonal 0 forced, coarsened to tiles.
fn flexprefill(
    ctx: &Ctx,
    b: usize,
    h: usize,
    kbar: &[f64],
    gt: [f64; 2],
    min_budget: usize,
    last: usize,
) -> Vec<Vec<TileEntry>> {
    let [gamma, tau] = gt;
    let (sq, dd, t) = (ctx.dims.sq, ctx.dims.d, ctx.cand.tile_k);
    let rows = last_rows(ctx, b, h, last);
    let nk = ctx.cand.k_tiles;
    let total: f64 = rows.col.iter().sum();
    let visible: Vec<bool> = (0..nk)
        .map(|kt| rows.seen[kt * t..((kt + 1) * t).min(ctx.dims.sk)].contains(&true))
        .collect();
    let dist = if total > 0.0 {
        let exact: Vec<f64> = (0..nk)
            .map(|kt| {
                rows.col[kt * t..((kt + 1) * t).min(ctx.dims.sk)]
                    .iter()
                    .sum::<f64>()
                    / total
            })
            .collect();
        let s: Vec<f64> = (0..nk)
            .map(|kt| match visible[kt] {
                true => ctx.logit.of(dot(&rows.qmean, &kbar[kt * dd..][..dd])),
                false => f64::NEG_INFINITY,
            })
            .collect();
        let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let z: f64 = s.iter().map(|&x| (x - m).exp()).sum();
        let pooled: Vec<f64> = s.iter().map(|&x| (x - m).exp() / z).collect();
        js_distance(&pooled, &exact)
    } else {
        0.0 // the rows see no key: nothing to compare, the query-aware pattern
    };
    if dist < tau {
        let method = Method::FlexPrefill {
            gamma,
            tau,
            min_budget,
            last,
        };
        return pooled_head(ctx, &method, b, h, kbar);
    }
    // The minimum in units of one tile per row: a column costs at most one tile of a row.
    let min_lines = min_budget.div_ceil(t);
    let mut cols = cumulative(&rows.col, gamma * total, min_lines);
    let diag_total: f64 = rows.diag.iter().sum();
    let mut diags = cumulative(&rows.diag, gamma * diag_total, min_lines);
    if let Some(c0) = cols.first_mut() {
        *c0 = true;
    }
    diags[sq - 1] = true;
    coarsen(ctx, b, h, &cols, &diags)
}

/// ProxyAttn's shared scores of KV group `g` in batch row `b`: per query tile, per key tile,
///   S(qt, kt) = mean over the sampled rows i of sum_{j in kt} pbar_ij,
///   pbar_i = softmax over the allowed keys j of logit(qbar_i . k_j),  qbar_i = mean_{h in g} q_hi,
/// with `rows` rows per query tile, i_r = q0 + floor((r + 1) (q1 - q0) / rows) - 1 (the last row
/// always among them; fewer when the tile is shorter). The element mask is the group's first
/// query head's. `[q tiles][k tiles]`.
fn proxy_scores(ctx: &Ctx, b: usize, g: usize, rows: usize) -> Vec<Vec<f64>> {
    let (sk, dd) = (ctx.dims.sk, ctx.dims.d);
    let group = ctx.dims.hq / ctx.dims.hk;
    let h0 = g * group;
    let keys: Vec<f64> = (0..sk)
        .flat_map(|j| (0..dd).map(move |c| (j, c)))
        .map(|(j, c)| ctx.k.get(b, j, g, c) as f64)
        .collect();
    let (nq, nk, t) = (ctx.cand.q_tiles, ctx.cand.k_tiles, ctx.cand.tile_k);
    let (mut allowed, mut words) = (vec![false; sk], Vec::new());
    let mut logits = vec![0.0f64; sk];
    let mut qbar = vec![0.0f64; dd];
    (0..nq)
        .map(|qt| {
            let (q0, q1) = ctx.cand.q_range(qt);
            let mut out = vec![0.0f64; nk];
            let mut sampled: Vec<usize> =
                (0..rows).map(|r| q0 + (r + 1) * (q1 - q0) / rows).collect();
            sampled.retain(|&i| i > q0);
            sampled.dedup();
            let n = sampled.len();
            for i in sampled.into_iter().map(|i| i - 1) {
                ctx.el.row(b, h0, i, &mut allowed, &mut words);
                for (c, x) in qbar.iter_mut().enumerate() {
                    *x = (h0..h0 + group)
                        .map(|h| ctx.q.get(b, i, h, c) as f64)
                        .sum::<f64>()
                        / group as f64;
                }
                let mut m = f64::NEG_INFINITY;
                for j in (0..sk).filter(|&j| allowed[j]) {
                    logits[j] = ctx.logit.of(dot(&qbar, &keys[j * dd..][..dd]));
                    m = m.max(logits[j]);
                }
                if m == f64::NEG_INFINITY {
                    continue;
                }
                let z: f64 = (0..sk)
                    .filter(|&j| allowed[j])
                    .map(|j| (logits[j] - m).exp())
                    .sum();
                for j in (0..sk).filter(|&j| allowed[j]) {
                    out[j / t] += (logits[j] - m).exp() / z;
                }
            }
            out.iter_mut().for_each(|x| *x /= n.max(1) as f64);
            out
        })
        .collect()
}

/// ProxyAttn for one (batch row, head): its own budget, then the proxy's best tiles.
///
/// Budget: the head's last `last` rows' exact block distribution a_hat (as in FlexPrefill's
/// test) needs n_h tiles, heaviest first, to reach mass gamma (every candidate when the rows
/// see no key). Kept per query tile: the sink tile and the diagonal tiles, then candidates by
/// proxy score (descending, ties by key tile) until at least min(n_h, c) of its c candidates
/// are kept and the kept tiles hold proxy mass >= gamma.
fn proxy_head(
    ctx: &Ctx,
    b: usize,
    h: usize,
    scores: &[Vec<f64>],
    gamma: f64,
    last: usize,
) -> Vec<Vec<TileEntry>> {
    let (t, sk, nk) = (ctx.cand.tile_k, ctx.dims.sk, ctx.cand.k_tiles);
    let lr = last_rows(ctx, b, h, last);
    let tile_mass: Vec<f64> = (0..nk)
        .map(|kt| lr.col[kt * t..((kt + 1) * t).min(sk)].iter().sum())
        .collect();
    let total: f64 = tile_mass.iter().sum();
    let need = match total > 0.0 {
        true => cumulative(&tile_mass, gamma * total, 1)
            .iter()
            .filter(|&&k| k)
            .count(),
        false => usize::MAX,
    };
    (0..ctx.cand.q_tiles)
        .map(|qt| {
            let cand = ctx.cand.row(b, h, qt);
            let m = need.min(cand.len());
            let diag = ctx.diag_tiles(qt);
            let mut keep: Vec<bool> = cand
                .iter()
                .map(|e| {
                    e.k_tile == 0 || diag.is_some_and(|(lo, hi)| lo <= e.k_tile && e.k_tile <= hi)
                })
                .collect();
            let s: Vec<f64> = cand.iter().map(|e| scores[qt][e.k_tile as usize]).collect();
            let mut order: Vec<usize> = (0..cand.len()).collect();
            order.sort_unstable_by(by_score(&s));
            let mut kept = keep.iter().filter(|&&k| k).count();
            let mut mass: f64 = s
                .iter()
                .zip(&keep)
                .filter(|(_, &k)| k)
                .map(|(x, _)| x)
                .sum();
            for x in order {
                if kept >= m && mass >= gamma {
                    break;
                }
                if !keep[x] {
                    keep[x] = true;
                    kept += 1;
                    mass += s[x];
                }
            }
            cand.iter()
                .zip(&keep)
                .filter(|(_, &k)| k)
                .map(|(e, _)| *e)
                .collect()
        })
        .collect()
}
