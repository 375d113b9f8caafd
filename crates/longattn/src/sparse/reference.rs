//! Plain references of the estimators, straight from the definitions in the module header (f64,
//! every pair visited, full sorts, brute-force tile coverage). The fast estimators are tested to
//! select exactly the same tiles. Costs O(B Hq Sq Sk D) per document: small inputs only.
//!
//! Documents are taken by id (every query and every key with the id, as index sets, not as
//! ranges), the tiles a document keeps are found by brute force over its rows and keys, and a
//! query tile keeps the union over its documents.
use super::{candidates, dims_of, documents, Elements, Logit, Method, SparseSpec};
use crate::attention::{AttnParams, MaskSpec};
use crate::error::Result;
use crate::mask::BlockSchedule;
use crate::tensor::TensorView;
use std::collections::{HashMap, HashSet};

/// One document from its definition: the queries and the keys with its id (ascending).
struct DocSet {
    q: Vec<usize>,
    k: Vec<usize>,
}

/// The documents of batch row `b` by id (the per-id rule: every id of the queries, in order of
/// first appearance, with all its queries and all its keys): from the mask's document ids, or
/// one document of every query and key without them.
fn doc_sets(mask: &MaskSpec, b: usize, sq: usize, sk: usize) -> Vec<DocSet> {
    let (qid, kid): (Vec<i32>, Vec<i32>) = match mask {
        MaskSpec::Expr(bound) if bound.docs.is_some() => {
            let d = bound.docs.as_ref().unwrap();
            (
                d.q[b * sq..(b + 1) * sq].to_vec(),
                d.k[b * sk..(b + 1) * sk].to_vec(),
            )
        }
        _ => (vec![0; sq], vec![0; sk]),
    };
    let mut ids: Vec<i32> = Vec::new();
    for &x in &qid {
        if !ids.contains(&x) {
            ids.push(x);
        }
    }
    ids.into_iter()
        .map(|x| DocSet {
            q: (0..sq).filter(|&i| qid[i] == x).collect(),
            k: (0..sk).filter(|&j| kid[j] == x).collect(),
        })
        .collect()
}

/// A line pattern's rule: whether row i keeps key j (o = p_i - j): on a kept column or
/// diagonal, or (`columns`) among the keys kept for i's query tile.
type LineRule = Box<dyn Fn(usize, usize, i64) -> bool>;

/// The selection of `spec` under `mask`, computed the plain way: every document of every
/// (batch row, head) on its own (module `sparse`), the kept tiles the union over the documents,
/// intersected with the candidates.
pub fn select_reference(
    q: &TensorView,
    k: &TensorView,
    params: &AttnParams,
    spec: &SparseSpec,
    mask: MaskSpec,
) -> Result<BlockSchedule> {
    reference_impl(q, k, params, spec, mask, None, false)
}

/// [`select_reference`] and the pairs it keeps, `[B, Hq, Sq, Sk]`: those the mask allows in a
/// kept tile, and with `spec.element`, for documents estimated by a line pattern
/// (vertical-slash, FlexPrefill's vertical-slash heads), only those on a kept column or
/// diagonal (module `sparse::lines`).
pub fn select_pairs_reference(
    q: &TensorView,
    k: &TensorView,
    params: &AttnParams,
    spec: &SparseSpec,
    mask: MaskSpec,
) -> Result<(BlockSchedule, Vec<bool>)> {
    let dims = dims_of(q, k)?;
    let mut pairs = vec![false; dims.batch * dims.hq * dims.sq * dims.sk];
    let s = reference_impl(q, k, params, spec, mask, Some(&mut pairs), false)?;
    Ok((s, pairs))
}

/// `whole`: the pairs are every allowed pair of the kept tiles, whatever the method's level (a
/// union's second method).
fn reference_impl(
    q: &TensorView,
    k: &TensorView,
    params: &AttnParams,
    spec: &SparseSpec,
    mask: MaskSpec,
    mut pairs: Option<&mut Vec<bool>>,
    whole: bool,
) -> Result<BlockSchedule> {
    if let Some(m) = spec.with {
        // A union: each part on its own, the tiles and pairs either keeps.
        spec.check()?;
        let a = SparseSpec {
            with: None,
            ..*spec
        };
        let b = SparseSpec {
            method: m,
            element: false,
            with: None,
            dense_last: 0,
            ..*spec
        };
        let mut pb = pairs.as_ref().map(|p| vec![false; p.len()]);
        let sa = reference_impl(q, k, params, &a, mask, pairs.as_deref_mut(), false)?;
        let sb = reference_impl(q, k, params, &b, mask, pb.as_mut(), true)?;
        if let (Some(p), Some(pb)) = (pairs, pb) {
            p.iter_mut().zip(pb).for_each(|(x, y)| *x |= y);
        }
        let dims = dims_of(q, k)?;
        let (cand, _) = candidates(mask, &dims, (spec.block, spec.block))?;
        let mut out =
            BlockSchedule::empty(sa.tile_q, sa.tile_k, sa.sq, sa.sk, dims.batch, dims.hq)?;
        for bb in 0..dims.batch {
            for h in 0..dims.hq {
                for qt in 0..cand.q_tiles {
                    let has = |s: &BlockSchedule, kt: u32| {
                        s.row(bb, h, qt).iter().any(|e| e.k_tile == kt)
                    };
                    let row: Vec<_> = cand
                        .row(bb, h, qt)
                        .iter()
                        .filter(|e| has(&sa, e.k_tile) || has(&sb, e.k_tile))
                        .copied()
                        .collect();
                    out.push_row(&row)?;
                }
            }
        }
        return out.finish();
    }
    spec.check()?;
    params.check()?;
    let dims = dims_of(q, k)?;
    let (cand, rows) = candidates(mask, &dims, (spec.block, spec.block))?;
    let dense_below = spec.dense_below_or(super::DENSE_BELOW);
    if dims.sk < dense_below || spec.method == Method::Whole {
        // The dense fallback / skip: every tile of the mask.
        if let Some(p) = pairs {
            let el = Elements { s: &cand, rows };
            for (x, f) in p.iter_mut().enumerate() {
                let (r, j) = (x / dims.sk, x % dims.sk);
                let (b, h, i) = (r / (dims.hq * dims.sq), r / dims.sq % dims.hq, r % dims.sq);
                *f = el.allowed(b, h, i, j);
            }
        }
        return Ok(cand.into_owned());
    }
    // The fast path's refusals (`document` not a conjunct, ids that are not runs).
    documents(&mask, &dims)?;
    let el = Elements { s: &cand, rows };
    let logit = Logit::new(params, dims.d);
    let t = spec.block;
    let mut out = BlockSchedule::empty(t, t, dims.sq, dims.sk, dims.batch, dims.hq)?;
    let (nq, nk) = (cand.q_tiles, cand.k_tiles);
    let group = dims.hq / dims.hk;
    let off = dims.sk as i64 - dims.sq as i64;
    for b in 0..dims.batch {
        let docs = doc_sets(&mask, b, dims.sq, dims.sk);
        for h in 0..dims.hq {
            let g = h / group;
            // scale q_i . k_j in f64.
            let qk = |i: usize, j: usize| -> f64 {
                (0..dims.d)
                    .map(|c| q.get(b, i, h, c) as f64 * k.get(b, j, g, c) as f64)
                    .sum()
            };
            let mut kept = vec![vec![false; nk]; nq];
            for doc in docs.iter().filter(|d| !d.k.is_empty()) {
                let (in_q, in_k) = (member(&doc.q, dims.sq), member(&doc.k, dims.sk));
                // The document's rows of query tile qt, and its keys of key tile kt.
                let q_of = |qt: usize| -> Vec<usize> {
                    let (q0, q1) = cand.q_range(qt);
                    (q0..q1).filter(|&i| in_q[i]).collect()
                };
                let k_of = |kt: usize| -> Vec<usize> {
                    let (k0, k1) = cand.k_range(kt);
                    (k0..k1).filter(|&j| in_k[j]).collect()
                };
                let first_key = doc.k[0];
                let last_rows = &doc.q[doc.q.len() - last_of(spec.method).min(doc.q.len())..];
                // Every candidate of the document's rows that meets its keys.
                let every = || -> Vec<Vec<bool>> {
                    (0..nq)
                        .map(|qt| {
                            let some = !q_of(qt).is_empty();
                            (0..nk).map(|kt| some && !k_of(kt).is_empty()).collect()
                        })
                        .collect()
                };
                let (doc_kept, line): (Vec<Vec<bool>>, Option<LineRule>) = if doc.k.len()
                    < dense_below
                {
                    (every(), None) // a short document
                } else {
                    // The pooled-score selection of `method` over this document.
                    let pooled_doc = |method| {
                        pooled(
                            &cand,
                            method,
                            (b, h),
                            &qk,
                            &logit,
                            &doc.k,
                            off,
                            (&q_of, &k_of),
                        )
                    };
                    match spec.method {
                        Method::FlexPrefill {
                            gamma,
                            tau,
                            min_budget,
                            ..
                        } => match flex_pattern(
                            &el,
                            &logit,
                            &qk,
                            (b, h),
                            [gamma, tau],
                            min_budget,
                            (last_rows, &k_of),
                            off,
                        ) {
                            Some((cols, diags)) => {
                                let line: LineRule = Box::new(move |_, j, o| {
                                    j == first_key
                                        || cols.contains(&j)
                                        || o == 0
                                        || diags.contains(&o)
                                });
                                (cover(&cand, off, (&q_of, &k_of), &line), Some(line))
                            }
                            None => (pooled_doc(spec.method), None),
                        },
                        Method::VerticalSlash {
                            v, s, sink, local, ..
                        } => {
                            let (col, diag) =
                                last_rows_mass(&el, &logit, &qk, b, h, last_rows, off);
                            let cols = heaviest(col.into_iter().enumerate().collect(), v);
                            let diags = heaviest(diag.into_iter().collect(), s);
                            let (cols, diags): (HashSet<usize>, HashSet<i64>) =
                                (cols.into_iter().collect(), diags.into_iter().collect());
                            let sinks: HashSet<usize> = doc.k.iter().take(sink).copied().collect();
                            let line: LineRule = Box::new(move |_, j, o| {
                                sinks.contains(&j)
                                    || cols.contains(&j)
                                    || (0..local as i64).contains(&o)
                                    || diags.contains(&o)
                            });
                            (cover(&cand, off, (&q_of, &k_of), &line), Some(line))
                        }
                        Method::Columns { gathered: true, .. } => {
                            return Err(crate::error::Error::Param {
                                op: "sparse reference",
                                msg: "`columns(gathered=1)`: its plain reference is sparse::columns::reference".into(),
                            })
                        }
                        Method::Columns {
                            gamma,
                            rows,
                            sink,
                            local,
                            check,
                            check_gamma,
                            gathered: false,
                            int8,
                        } => {
                            // With int8: the sampled rows' products from lowbit's int8 Q and
                            // K (the check below stays exact).
                            let keys8 = int8.then(|| super::lowbit::quant_keys(k, b, g, &doc.k));
                            let index8: HashMap<usize, usize> =
                                doc.k.iter().enumerate().map(|(x, &j)| (j, x)).collect();
                            let qk8 = |i: usize, j: usize| -> f64 {
                                let kq = keys8.as_ref().expect("int8 keys");
                                let mut qq = vec![0i8; dims.d];
                                let (sq, qmu) =
                                    super::lowbit::quant_row(q, (b, h, i), &kq.mu, &mut qq);
                                let x = index8[&j];
                                let dot = super::lowbit::dot8(&qq, &kq.q[x * dims.d..][..dims.d]);
                                super::lowbit::est_dot(sq, kq.scale[x], dot, qmu)
                            };
                            let qk_est: &dyn Fn(usize, usize) -> f64 =
                                if int8 { &qk8 } else { &qk };
                            // Per query tile: the mean softmax of the document's sampled rows
                            // there, the heaviest keys until g of its mass (at least one).
                            let tq = cand.tile_q;
                            let per_tile = |g: f64| -> Vec<HashSet<usize>> {
                                (0..nq)
                                    .map(|qt| {
                                        let part = q_of(qt);
                                        if part.is_empty() {
                                            return HashSet::new();
                                        }
                                        let (r0, r1) = (part[0], part[part.len() - 1] + 1);
                                        let mut sampled: Vec<usize> = (0..rows)
                                            .map(|r| r0 + (r + 1) * (r1 - r0) / rows)
                                            .filter(|&i| i > r0)
                                            .collect();
                                        sampled.dedup();
                                        let n = sampled.len() as f64;
                                        let mut mass = vec![0.0f64; dims.sk];
                                        for i in sampled.into_iter().map(|i| i - 1) {
                                            let (col, _) =
                                                last_rows_mass(&el, &logit, qk_est, b, h, &[i], off);
                                            for (m, c) in mass.iter_mut().zip(col) {
                                                *m += c / n;
                                            }
                                        }
                                        heaviest_until(mass.into_iter().enumerate().collect(), g, 1)
                                            .into_iter()
                                            .collect()
                                    })
                                    .collect()
                            };
                            let sinks: HashSet<usize> = doc.k.iter().take(sink).copied().collect();
                            let rule = |tiles: Vec<HashSet<usize>>| -> LineRule {
                                let sinks = sinks.clone();
                                Box::new(move |i, j, o| {
                                    sinks.contains(&j)
                                        || (0..local as i64).contains(&o)
                                        || tiles[i / tq].contains(&j)
                                })
                            };
                            // The check on the document's last part: the mean over its rows of
                            // the mass on the keys its rows keep.
                            let last = (0..nq).rev().map(&q_of).find(|r| !r.is_empty());
                            let fails = |line: &LineRule| {
                                let mut t = (0.0, 0usize);
                                for &i in last.iter().flatten().filter(|_| check > 0.0) {
                                    let (col, _) =
                                        last_rows_mass(&el, &logit, &qk, b, h, &[i], off);
                                    if col.iter().sum::<f64>() > 0.0 {
                                        t.0 += (0..dims.sk)
                                            .filter(|&j| line(i, j, i as i64 + off - j as i64))
                                            .map(|j| col[j])
                                            .sum::<f64>();
                                        t.1 += 1;
                                    }
                                }
                                t.1 > 0 && t.0 / (t.1 as f64) < check
                            };
                            // Failing: again at check_gamma (if given), every tile if that fails
                            // too.
                            let mut line = rule(per_tile(gamma));
                            if fails(&line) && check_gamma > 0.0 {
                                line = rule(per_tile(check_gamma));
                            }
                            if fails(&line) {
                                (every(), None)
                            } else {
                                (cover(&cand, off, (&q_of, &k_of), &line), Some(line))
                            }
                        }
                        Method::Proxy { gamma, rows, .. } => (
                            proxy_reference(
                                q,
                                k,
                                &el,
                                &logit,
                                (b, h),
                                [gamma],
                                rows,
                                (last_rows, &doc.k),
                                off,
                                (&q_of, &k_of),
                            ),
                            None,
                        ),
                        Method::LowBit { tau, sink, local } => (
                            lowbit_reference(
                                [q, k],
                                &el,
                                &logit,
                                (b, h, g),
                                &doc.k,
                                [sink, local],
                                tau,
                                off,
                                (&q_of, &k_of, nq, nk),
                            ),
                            None,
                        ),
                        Method::LowBitMass { gamma, sink, local } => {
                            let rows = lowbit_mass_reference(
                                [q, k],
                                &el,
                                &logit,
                                (b, h, g),
                                &doc.q,
                                &doc.k,
                                ([sink, local], gamma),
                                off,
                            );
                            let line: LineRule = Box::new(move |i, j, _| {
                                rows.get(&i).is_some_and(|r| r.contains(&j))
                            });
                            (cover(&cand, off, (&q_of, &k_of), &line), Some(line))
                        }
                        method => (pooled_doc(method), None),
                    }
                };
                // `dense_last`: the query tiles holding the document's last rows keep every
                // candidate; at element level only those rows keep every pair.
                let from = match spec.dense_last {
                    0 => usize::MAX,
                    n => doc.q[doc.q.len() - n.min(doc.q.len())],
                };
                let mut doc_kept = doc_kept;
                if spec.dense_last > 0 {
                    let all = every();
                    for qt in (0..nq).filter(|&qt| q_of(qt).iter().any(|&i| i >= from)) {
                        doc_kept[qt] = all[qt].clone();
                    }
                }
                // The document's pairs: allowed by the mask, in a kept tile, on a kept line
                // where an element-level line pattern chose them (not in the dense last rows).
                if let Some(p) = pairs.as_deref_mut() {
                    let line = line.filter(|_| spec.element_level() && !whole);
                    for &i in &doc.q {
                        let line = line.as_ref().filter(|_| i < from);
                        let row = ((b * dims.hq + h) * dims.sq + i) * dims.sk;
                        for &j in &doc.k {
                            let tile = doc_kept[i / cand.tile_q][j / cand.tile_k];
                            let on = line
                                .as_ref()
                                .is_none_or(|r| r(i, j, i as i64 + off - j as i64));
                            p[row + j] = tile && on && el.allowed(b, h, i, j);
                        }
                    }
                }
                for (row, d) in kept.iter_mut().zip(&doc_kept) {
                    for (x, &y) in row.iter_mut().zip(d) {
                        *x |= y;
                    }
                }
            }
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

/// Membership flags of a set of indices below `n`.
fn member(set: &[usize], n: usize) -> Vec<bool> {
    let mut m = vec![false; n];
    set.iter().for_each(|&x| m[x] = true);
    m
}

/// The method's `last` (1 for the methods without it).
fn last_of(method: Method) -> usize {
    match method {
        Method::VerticalSlash { last, .. }
        | Method::FlexPrefill { last, .. }
        | Method::Proxy { last, .. } => last,
        _ => 1,
    }
}

/// The document's rows of a query tile and its keys of a key tile.
type Parts<'a> = (
    &'a dyn Fn(usize) -> Vec<usize>,
    &'a dyn Fn(usize) -> Vec<usize>,
);

/// The candidate key tiles of (b, h, query tile `qt`) that hold keys of the document (`k_of`).
fn doc_candidates(
    cand: &BlockSchedule,
    (b, h, qt): (usize, usize, usize),
    k_of: &dyn Fn(usize) -> Vec<usize>,
) -> Vec<usize> {
    cand.row(b, h, qt)
        .iter()
        .map(|e| e.k_tile as usize)
        .filter(|&kt| !k_of(kt).is_empty())
        .collect()
}

/// The pooled methods on one document, `[q tile][k tile]` flags: for every query tile with rows
/// of the document, its candidates that hold keys of the document (`keys`), scored by the
/// softcap of the mean over the pairs (document rows of the tile) x (document keys of the key
/// tile) of scale q_i . k_j; forced: the key tiles holding p_i of such a row among the
/// document's keys (diagonal) and, but for moba, the tile of the document's first key.
#[allow(clippy::too_many_arguments)]
fn pooled(
    cand: &BlockSchedule,
    method: Method,
    (b, h): (usize, usize),
    qk: &dyn Fn(usize, usize) -> f64,
    logit: &Logit,
    keys: &[usize],
    off: i64,
    (q_of, k_of): Parts,
) -> Vec<Vec<bool>> {
    let nk = cand.k_tiles;
    (0..cand.q_tiles)
        .map(|qt| {
            let mut row = vec![false; nk];
            let rows = q_of(qt);
            if rows.is_empty() {
                return row;
            }
            let c = doc_candidates(cand, (b, h, qt), k_of);
            let score: Vec<f64> = c
                .iter()
                .map(|&kt| {
                    let ks = k_of(kt);
                    let sum: f64 = rows
                        .iter()
                        .flat_map(|&i| ks.iter().map(move |&j| (i, j)))
                        .map(|(i, j)| qk(i, j))
                        .sum();
                    logit.of(sum / (rows.len() * ks.len()) as f64)
                })
                .collect();
            let diag = |kt: usize| {
                let ks = k_of(kt);
                rows.iter().any(|&i| {
                    let p = i as i64 + off;
                    p >= 0 && ks.contains(&(p as usize))
                })
            };
            let sink = !matches!(method, Method::Moba { .. });
            let forced: Vec<bool> = c
                .iter()
                .map(|&kt| diag(kt) || (sink && k_of(kt).contains(&keys[0])))
                .collect();
            let keep = rule(method, &score, &forced, cand.tile_k);
            for (x, &kt) in c.iter().enumerate() {
                row[kt] = keep[x];
            }
            row
        })
        .collect()
}

/// Every tile (as `[q tile][k tile]`) with a document row i and a document key j where j is a
/// kept column or o = p_i - j a kept diagonal (`line(j, o)`).
fn cover(
    cand: &BlockSchedule,
    off: i64,
    (q_of, k_of): Parts,
    line: &dyn Fn(usize, usize, i64) -> bool,
) -> Vec<Vec<bool>> {
    (0..cand.q_tiles)
        .map(|qt| {
            let rows = q_of(qt);
            (0..cand.k_tiles)
                .map(|kt| {
                    let keys = k_of(kt);
                    rows.iter()
                        .any(|&i| keys.iter().any(|&j| line(i, j, i as i64 + off - j as i64)))
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
        Method::VerticalSlash { .. }
        | Method::Proxy { .. }
        | Method::Columns { .. }
        | Method::LowBit { .. }
        | Method::LowBitMass { .. } => {
            unreachable!("not a pooled method")
        }
    }
    keep
}

/// FlexPrefill's pattern test for one document of (b, h), from the definitions: the softmax
/// (under the mask) of its last rows `rows` summed per key tile and normalised (a_hat), the
/// softmax over the tiles those rows can see of the mean over the pairs (rows) x (document keys
/// of the tile) of their logits' argument (a_bar), and d = sqrt(JSD(a_bar, a_hat)). d < tau (or
/// rows that see nothing): `None`, the query-aware pattern. Otherwise the heaviest columns until
/// gamma of the total, at least ceil(min_budget / block) of them (among those > 0), and the
/// same for diagonals o = p_i - j.
#[allow(clippy::too_many_arguments)]
fn flex_pattern(
    el: &Elements,
    logit: &Logit,
    qk: &dyn Fn(usize, usize) -> f64,
    (b, h): (usize, usize),
    [gamma, tau]: [f64; 2],
    min_budget: usize,
    (rows, k_of): (&[usize], &dyn Fn(usize) -> Vec<usize>),
    off: i64,
) -> Option<(HashSet<usize>, HashSet<i64>)> {
    let s = el.s;
    let (col, diag) = last_rows_mass(el, logit, qk, b, h, rows, off);
    let total: f64 = col.iter().sum();
    if total == 0.0 {
        return None;
    }
    let mut exact = Vec::new();
    let mut pooled = Vec::new();
    for kt in 0..s.k_tiles {
        let keys = k_of(kt);
        exact.push(keys.iter().map(|&j| col[j]).sum::<f64>() / total);
        let visible = rows
            .iter()
            .any(|&i| keys.iter().any(|&j| el.allowed(b, h, i, j)));
        pooled.push(if visible {
            let pairs = rows.iter().flat_map(|&i| keys.iter().map(move |&j| (i, j)));
            let n = rows.len() * keys.len();
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

/// Column mass c_j and diagonal mass d_o (o = p_i - j) of the softmax rows of the queries
/// `rows` under the mask.
fn last_rows_mass(
    el: &Elements,
    logit: &Logit,
    qk: &dyn Fn(usize, usize) -> f64,
    b: usize,
    h: usize,
    rows: &[usize],
    off: i64,
) -> (Vec<f64>, HashMap<i64, f64>) {
    let sk = el.s.sk;
    let mut col = vec![0.0f64; sk];
    let mut diag: HashMap<i64, f64> = HashMap::new();
    for &i in rows {
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

/// ProxyAttn on one document from its definition (module `estimate`): the proxy query of a
/// row is the mean of its KV group's query heads; a query tile's score of a key tile is the
/// proxy softmax mass in it, averaged over the sampled rows of the tile's document rows; the
/// head keeps the tile of the document's first key and the diagonal tiles, then the best by
/// score until min(n_h, c) of its c candidates (those with document keys) are kept and their
/// score sum reaches gamma, n_h the tiles the document's last rows need for mass gamma (all
/// when they see no key). `[q tile][k tile]` flags.
#[allow(clippy::too_many_arguments)]
fn proxy_reference(
    q: &TensorView,
    k: &TensorView,
    el: &Elements,
    logit: &Logit,
    (b, h): (usize, usize),
    [gamma]: [f64; 1],
    rows: usize,
    (last_rows, keys): (&[usize], &[usize]),
    off: i64,
    (q_of, k_of): Parts,
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
    // The head's budget share from the document's last rows' exact distribution.
    let qh = |i: usize, j: usize| (0..d).map(|c| q.get(b, i, h, c) as f64 * kk(j, c)).sum();
    let (col, _) = last_rows_mass(el, logit, &qh, b, h, last_rows, off);
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
            let mut row = vec![false; cand.k_tiles];
            let part = q_of(qt);
            if part.is_empty() {
                return row;
            }
            let n = part.len();
            let mut picks: Vec<usize> = (0..rows).map(|r| (r + 1) * n / rows).collect();
            picks.retain(|&x| x > 0);
            picks.dedup();
            let mut score = vec![0.0f64; cand.k_tiles];
            for &x in &picks {
                let i = part[x - 1];
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
            let c = doc_candidates(cand, (b, h, qt), k_of);
            let m = need.min(c.len());
            let diag = |kt: usize| {
                let ks = k_of(kt);
                part.iter().any(|&i| {
                    let p = i as i64 + off;
                    p >= 0 && ks.contains(&(p as usize))
                })
            };
            for &kt in &c {
                row[kt] = k_of(kt).contains(&keys[0]) || diag(kt);
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

/// A document's rows of a query tile, or keys of a key tile (by tile index).
type TileMembers<'a> = &'a dyn Fn(usize) -> Vec<usize>;

/// The int8 estimate (`lowbit`) of one document of (b, h) from its definition (module
/// `sparse::lowbit`): every pair of every tile visited, each row's reference maximum over its
/// sinks and band, dot products in f64 from the int8 values (exact integers).
#[allow(clippy::too_many_arguments)]
fn lowbit_reference(
    [q, k]: [&TensorView; 2],
    el: &Elements,
    logit: &Logit,
    (b, h, g): (usize, usize, usize),
    doc_k: &[usize],
    [sink, local]: [usize; 2],
    tau: f64,
    off: i64,
    (q_of, k_of, nq, nk): (TileMembers, TileMembers, usize, usize),
) -> Vec<Vec<bool>> {
    use super::lowbit::{quant_keys, quant_row};
    let dd = q.dim();
    let keys = quant_keys(k, b, g, doc_k);
    let index: HashMap<usize, usize> = doc_k.iter().enumerate().map(|(x, &j)| (j, x)).collect();
    let sinks: HashSet<usize> = doc_k.iter().take(sink).copied().collect();
    let ln_tau = tau.ln();
    let mut kept = vec![vec![false; nk]; nq];
    for (qt, row) in kept.iter_mut().enumerate() {
        for &i in &q_of(qt) {
            let mut qq = vec![0i8; dd];
            let (sq, qmu) = quant_row(q, (b, h, i), &keys.mu, &mut qq);
            let e = |j: usize| {
                let x = index[&j];
                let dot: f64 = (0..dd)
                    .map(|c| qq[c] as f64 * keys.q[x * dd + c] as f64)
                    .sum();
                logit.of(sq as f64 * keys.scale[x] as f64 * dot + qmu)
            };
            let is_ref = |j: usize| {
                sinks.contains(&j) || (0..local as i64).contains(&(i as i64 + off - j as i64))
            };
            let m = doc_k
                .iter()
                .filter(|&&j| el.allowed(b, h, i, j) && is_ref(j))
                .map(|&j| e(j))
                .fold(f64::NEG_INFINITY, f64::max);
            for (kt, keep) in row.iter_mut().enumerate() {
                for j in k_of(kt).into_iter().filter(|&j| el.allowed(b, h, i, j)) {
                    let r = if m == f64::NEG_INFINITY {
                        f64::INFINITY
                    } else {
                        e(j) - m
                    };
                    *keep |= is_ref(j) || r >= ln_tau;
                }
            }
        }
    }
    kept
}

/// `lowbit_mass` on one document of (b, h) from its definition (module `sparse::lowbit`): per
/// row, the int8 estimate of every allowed key (dot products in f64 from the int8 values, exact
/// integers), the reference keys (the document's first `sink` keys and the band
/// 0 <= p_i - j < `local`) marked, and the keys the rule keeps (`mass_keep`, the rule itself).
#[allow(clippy::too_many_arguments)]
fn lowbit_mass_reference(
    [q, k]: [&TensorView; 2],
    el: &Elements,
    logit: &Logit,
    (b, h, g): (usize, usize, usize),
    doc_q: &[usize],
    doc_k: &[usize],
    ([sink, local], gamma): ([usize; 2], f64),
    off: i64,
) -> HashMap<usize, HashSet<usize>> {
    use super::lowbit::{mass_keep, quant_keys, quant_row};
    let dd = q.dim();
    let keys = quant_keys(k, b, g, doc_k);
    let mut out = HashMap::new();
    for &i in doc_q {
        let mut qq = vec![0i8; dd];
        let (sq, qmu) = quant_row(q, (b, h, i), &keys.mu, &mut qq);
        let cand: Vec<(u32, f64, bool)> = doc_k
            .iter()
            .enumerate()
            .filter(|&(_, &j)| el.allowed(b, h, i, j))
            .map(|(x, &j)| {
                let dot: f64 = (0..dd)
                    .map(|c| qq[c] as f64 * keys.q[x * dd + c] as f64)
                    .sum();
                let e = logit.of(sq as f64 * keys.scale[x] as f64 * dot + qmu);
                let is_ref = x < sink || (0..local as i64).contains(&(i as i64 + off - j as i64));
                (j as u32, e, is_ref)
            })
            .collect();
        let kept = mass_keep(&cand, gamma);
        out.insert(i, kept.into_iter().map(|j| j as usize).collect());
    }
    out
}
