//! Low-bit estimation (`lowbit`, SALE's idea on this hardware): every allowed pair's logit is
//! estimated from int8 queries and keys, and a tile is kept when one of its pairs could matter
//! next to the row's own sink and local keys.
//!
//! For one document (queries Q_d, keys K_d = [k0, k1)) of (batch row b, query head h, key head
//! g), in f32 where not said otherwise:
//! ```text
//!   mu       = mean_{j in K_d} k_j                                        [D]  (f64 sum, then f32)
//!   k'_j     = k_j - mu                                   (smoothing: a per-row shift of the logits)
//!   groups   G = the keys of K_d with equal j / 64;  sk_G = max_{j in G, c} |k'_jc| / 127
//!   kq_j     = rne(k'_j / sk_G(j)) in [-127, 127]         (0 where sk_G = 0)
//!   sq_i     = max_c |q_ic| / 127,  qq_i = rne(q_i / sq_i)
//!   e_ij     = softcap(scale (sq_i sk_G(j) sum_c qq_ic kq_jc + q_i . mu))     (f64 on the CPU)
//!   m_i      = max e_ij over the allowed reference keys of row i: the sinks j - k0 < sink and the
//!              band 0 <= p_i - j < local (p_i = i + Sk - Sq)
//!   r(qt, kt) = max over the part's rows i and the tile's allowed keys j of e_ij - m_i
//! ```
//! A candidate tile is kept when it holds an allowed reference pair (sinks and band are always
//! attended), when r(qt, kt) >= ln tau (a key whose estimated probability is at least tau times
//! that of the row's heaviest reference key), or when one of its rows has no reference key
//! (m_i = -inf: nothing to compare with, every allowed tile of the row is kept).
//!
//! The integer products are exact, so the CPU estimator and the reference ([`super::reference`])
//! agree bit for bit; the device (`cuda/kernels/sparse_lowbit.cu`) computes e_ij in f32 and
//! agrees up to tiles whose r lies within rounding of ln tau. The row test uses a maximum, not
//! SALE's sum over the tile: a sum needs an exponential per pair, the cost of the attention's own
//! softmax, where a maximum commutes with the per-group scale and the monotone soft-cap, so the
//! device takes one maximum over the int32 products per (row, key group) and converts once.
//!
//! `lowbit_mass` (element level) uses the same e_ij per row, not per tile: row i keeps its
//! reference keys, then its other allowed keys by e_ij, highest first, until the kept keys hold
//! gamma of the row's estimated softmax mass sum_j exp(e_ij) ([`mass_keep`]). Each row gets the
//! keys its own mass needs, so a head whose rows each read their own few keys keeps few, and a
//! diffuse head many: the budget follows the mass row by row. The kept keys are the row's
//! element mask ([`super::lines::RowKeys`]); the tiles they cross are Partial. CPU only.
use super::{Ctx, Doc};
use crate::tensor::TensorView;
use std::ops::Range;

/// Keys per quantization group of the key side (absolute positions j / 64).
pub const GROUP: usize = 64;

/// One document's keys of one key head in int8: `q` `[keys, D]`, the scale of every key (its
/// group's), the mean `mu` that was subtracted.
pub(crate) struct QKeys {
    pub q: Vec<i8>,
    pub scale: Vec<f32>,
    pub mu: Vec<f32>,
}

/// Round to nearest, ties to even, of x / s clamped to the int8 range (0 where s = 0).
#[inline]
fn q8(x: f32, s: f32) -> i8 {
    if s == 0.0 {
        0
    } else {
        (x / s).round_ties_even().clamp(-127.0, 127.0) as i8
    }
}

/// The keys `keys` (ascending, one document) of key head `g` in batch row `b`, smoothed and
/// quantized per group of [`GROUP`] absolute positions.
pub(crate) fn quant_keys(k: &TensorView, b: usize, g: usize, keys: &[usize]) -> QKeys {
    let dd = k.dim();
    let mut sum = vec![0.0f64; dd];
    for &j in keys {
        for (c, s) in sum.iter_mut().enumerate() {
            *s += k.get(b, j, g, c) as f64;
        }
    }
    let n = keys.len().max(1) as f64;
    let mu: Vec<f32> = sum.iter().map(|s| (s / n) as f32).collect();
    let shifted: Vec<f32> = keys
        .iter()
        .flat_map(|&j| (0..dd).map(move |c| (j, c)))
        .map(|(j, c)| k.get(b, j, g, c) - mu[c])
        .collect();
    let mut q = vec![0i8; keys.len() * dd];
    let mut scale = vec![0.0f32; keys.len()];
    let mut x0 = 0;
    while x0 < keys.len() {
        let grp = keys[x0] / GROUP;
        let x1 = x0 + keys[x0..].iter().take_while(|&&j| j / GROUP == grp).count();
        let amax = shifted[x0 * dd..x1 * dd]
            .iter()
            .fold(0.0f32, |a, &x| a.max(x.abs()));
        let s = amax / 127.0;
        for x in x0..x1 {
            scale[x] = s;
            for c in 0..dd {
                q[x * dd + c] = q8(shifted[x * dd + c], s);
            }
        }
        x0 = x1;
    }
    QKeys { q, scale, mu }
}

/// Query row i of head h in batch row b in int8 with its scale, and q_i . mu (f64).
pub(crate) fn quant_row(
    q: &TensorView,
    (b, h, i): (usize, usize, usize),
    mu: &[f32],
    out: &mut [i8],
) -> (f32, f64) {
    let s = (0..q.dim()).fold(0.0f32, |a, c| a.max(q.get(b, i, h, c).abs())) / 127.0;
    let mut qmu = 0.0;
    for (c, (o, &m)) in out.iter_mut().zip(mu).enumerate() {
        let x = q.get(b, i, h, c);
        *o = q8(x, s);
        qmu += x as f64 * m as f64;
    }
    (s, qmu)
}

/// sum_c a_c b_c over int8 vectors (exact in i32 for D <= 2^17).
#[inline]
pub(crate) fn dot8(a: &[i8], b: &[i8]) -> i32 {
    a.iter().zip(b).map(|(&x, &y)| x as i32 * y as i32).sum()
}

/// The argument of the estimated logit before scale and soft-cap: sq sk dot + q . mu.
#[inline]
pub(crate) fn est_dot(sq: f32, sk: f32, dot: i32, qmu: f64) -> f64 {
    sq as f64 * sk as f64 * dot as f64 + qmu
}

/// The int8 side of one part (rows `part` of a query tile, document `doc` of (b, h)): per row
/// its allowed keys, int8 query, scale and q . mu, and the products with the keys up to the
/// part's last allowed one, from one f32 product (exact, [`EXACT_F32_D`]) or, past that head
/// dim, from [`dot8`] pair by pair on demand.
struct PartRows {
    /// Keys 0 .. hi of the document hold every allowed pair of the part.
    hi: usize,
    nk: usize,
    dd: usize,
    allowed: Vec<bool>,
    qq: Vec<i8>,
    /// Per row: (scale, q . mu).
    sqm: Vec<(f32, f64)>,
    /// dots[r hi + x] = qq_r . kq_x (exact products only).
    dots: Vec<f32>,
}

impl PartRows {
    fn new(
        ctx: &Ctx,
        (b, h): (usize, usize),
        doc: &Doc,
        keys: &QKeys,
        part: &Range<usize>,
        kf: &[f32],
        words: &mut Vec<u64>,
    ) -> PartRows {
        let (dd, nk, n) = (ctx.dims.d, doc.k.len(), part.len());
        let mut allowed = vec![false; n * nk];
        let mut qq = vec![0i8; n * dd];
        let mut sqm = vec![(0.0f32, 0.0f64); n];
        let mut hi = 0;
        for (r, i) in part.clone().enumerate() {
            let a = &mut allowed[r * nk..][..nk];
            ctx.el.row_in((b, h, i), &doc.k, a, words);
            hi = hi.max(a.iter().rposition(|&x| x).map_or(0, |x| x + 1));
            sqm[r] = quant_row(ctx.q, (b, h, i), &keys.mu, &mut qq[r * dd..][..dd]);
        }
        let exact = !kf.is_empty();
        let mut dots = vec![0.0f32; if exact { n * hi } else { 0 }];
        if exact && hi > 0 {
            let qf: Vec<f32> = qq.iter().map(|&x| x as f32).collect();
            crate::cpu::gemm::gemm_abt(&mut dots, &qf, &kf[..hi * dd], (n, hi, dd));
        }
        PartRows {
            hi,
            nk,
            dd,
            allowed,
            qq,
            sqm,
            dots,
        }
    }

    /// The allowed keys of row r (document indices, ascending).
    fn keys(&self, r: usize) -> impl Iterator<Item = usize> + '_ {
        (0..self.hi).filter(move |&x| self.allowed[r * self.nk + x])
    }

    /// qq_r . kq_x.
    fn dot(&self, keys: &QKeys, r: usize, x: usize) -> i32 {
        match self.dots.is_empty() {
            false => self.dots[r * self.hi + x] as i32,
            true => dot8(
                &self.qq[r * self.dd..][..self.dd],
                &keys.q[x * self.dd..][..self.dd],
            ),
        }
    }
}

/// The keys as f32 for [`PartRows`]' exact product; empty past [`EXACT_F32_D`].
fn keys_f32(keys: &QKeys, dd: usize) -> Vec<f32> {
    match dd <= EXACT_F32_D {
        true => keys.q.iter().map(|&x| x as f32).collect(),
        false => Vec::new(),
    }
}

/// Per candidate of one part (the document's rows `part` of query tile `qt`): whether it holds
/// an allowed reference pair, and its score r (+inf when a row with allowed keys in it has no
/// reference key; -inf when no allowed pair).
pub(crate) struct TileScores {
    pub forced: Vec<bool>,
    pub score: Vec<f64>,
}

/// The scores of every candidate of every part of document `doc` of (batch row b, head h):
/// (query tile, candidate index range in its row, scores).
pub(crate) fn doc_scores(
    ctx: &Ctx,
    (b, h): (usize, usize),
    doc: &Doc,
    keys: &QKeys,
    [sink, local]: [usize; 2],
) -> Vec<(usize, Range<usize>, TileScores)> {
    let (k0, nk) = (doc.k.start, doc.k.len());
    let kf = keys_f32(keys, ctx.dims.d);
    let mut words = Vec::new();
    let mut e = vec![f64::NEG_INFINITY; nk];
    ctx.parts(doc)
        .map(|(qt, part)| {
            let xs = ctx.doc_cands(b, h, qt, doc);
            let cand = &ctx.cand.row(b, h, qt)[xs.clone()];
            let mut ts = TileScores {
                forced: vec![false; cand.len()],
                score: vec![f64::NEG_INFINITY; cand.len()],
            };
            let pr = PartRows::new(ctx, (b, h), doc, keys, &part, &kf, &mut words);
            for (r, i) in part.clone().enumerate() {
                let (sq, qmu) = pr.sqm[r];
                let p = ctx.pos(i);
                let is_ref =
                    |x: usize| x < sink || (0..local as i64).contains(&(p - (k0 + x) as i64));
                let mut m = f64::NEG_INFINITY;
                for x in pr.keys(r) {
                    e[x] = ctx
                        .logit
                        .of(est_dot(sq, keys.scale[x], pr.dot(keys, r, x), qmu));
                    if is_ref(x) {
                        m = m.max(e[x]);
                    }
                }
                for (c, t) in cand.iter().enumerate() {
                    let (c0, c1) = ctx.cand.k_range(t.k_tile as usize);
                    let (x0, x1) = (c0.max(k0) - k0, (c1.min(doc.k.end) - k0).min(pr.hi));
                    for x in (x0..x1).filter(|&x| pr.allowed[r * nk + x]) {
                        ts.forced[c] |= is_ref(x);
                        let r = match m {
                            f64::NEG_INFINITY => f64::INFINITY,
                            m => e[x] - m,
                        };
                        ts.score[c] = ts.score[c].max(r);
                    }
                }
            }
            (qt, xs, ts)
        })
        .collect()
}

/// The keep rule: forced, or r >= ln tau (`ln_tau`).
#[inline]
pub(crate) fn keeps(forced: bool, score: f64, ln_tau: f64) -> bool {
    forced || score >= ln_tau
}

/// `lowbit_mass`'s keep rule for one row. `cand` holds (key j, estimate e_j, reference) for
/// the row's allowed keys, ascending in j. With w_j = exp(e_j - max e) and Z = sum_j w_j (in
/// ascending j), the row keeps its reference keys (sinks and band), then the others by e
/// descending (ties: lower j first) while the kept weight is below gamma Z:
/// ```text
///   kept = R ∪ { the shortest prefix of the ordered others with sum_R w + sum_prefix w >= gamma Z }
/// ```
/// (every key when gamma = 1). A key with w_j < (1 - gamma) Z / (2 n) is never reached — such
/// keys weigh under (1 - gamma) Z / 2 together, so the heavier ones pass gamma Z before them —
/// and is left out of the sort. Returns the kept keys ascending.
pub(crate) fn mass_keep(cand: &[(u32, f64, bool)], gamma: f64) -> Vec<u32> {
    if gamma >= 1.0 {
        return cand.iter().map(|c| c.0).collect();
    }
    let n = cand.len();
    let m = cand.iter().fold(f64::NEG_INFINITY, |a, c| a.max(c.1));
    let w: Vec<f64> = cand.iter().map(|c| (c.1 - m).exp()).collect();
    let z: f64 = w.iter().sum();
    let (target, floor) = (gamma * z, (1.0 - gamma) * z / (2 * n.max(1)) as f64);
    let mut keep: Vec<bool> = cand.iter().map(|c| c.2).collect();
    let mut acc: f64 = (0..n).filter(|&x| keep[x]).map(|x| w[x]).sum();
    let mut order: Vec<usize> = (0..n).filter(|&x| !keep[x] && w[x] >= floor).collect();
    order.sort_unstable_by(|&a, &b| {
        cand[b]
            .1
            .total_cmp(&cand[a].1)
            .then(cand[a].0.cmp(&cand[b].0))
    });
    for x in order {
        if acc >= target {
            break;
        }
        keep[x] = true;
        acc += w[x];
    }
    (0..n).filter(|&x| keep[x]).map(|x| cand[x].0).collect()
}

/// Head dims up to which the int8 products are exact in an f32 product: every partial sum of
/// D products of magnitude <= 127 x 127 stays below 2^24, so [`doc_rows`] forms them with one
/// f32 `gemm` per query tile (the same integers as [`dot8`], in any order of summation).
pub(crate) const EXACT_F32_D: usize = (1 << 24) / (127 * 127);

/// `lowbit_mass` over document `doc` of (batch row b, query head h): every row of every part
/// keeps its keys by [`mass_keep`] (`row(i, keys)` receives them); returns per part its query
/// tile, its candidate range and, per candidate, whether one of its rows keeps a key in it.
/// The part's int8 products come from one f32 product (exact, [`EXACT_F32_D`]) over the keys
/// up to the part's last allowed one; past that head dim, from [`dot8`] pair by pair.
pub(crate) fn doc_rows(
    ctx: &Ctx,
    (b, h): (usize, usize),
    doc: &Doc,
    keys: &QKeys,
    ([sink, local], gamma): ([usize; 2], f64),
    mut row: impl FnMut(usize, &[u32]),
) -> Vec<(usize, Range<usize>, Vec<bool>)> {
    let k0 = doc.k.start;
    let kf = keys_f32(keys, ctx.dims.d);
    let mut words = Vec::new();
    let mut cand: Vec<(u32, f64, bool)> = Vec::with_capacity(doc.k.len());
    ctx.parts(doc)
        .map(|(qt, part)| {
            let xs = ctx.doc_cands(b, h, qt, doc);
            let tiles = &ctx.cand.row(b, h, qt)[xs.clone()];
            let mut hit = vec![false; tiles.len()];
            let pr = PartRows::new(ctx, (b, h), doc, keys, &part, &kf, &mut words);
            for (r, i) in part.clone().enumerate() {
                let (sq, qmu) = pr.sqm[r];
                let p = ctx.pos(i);
                cand.clear();
                for x in pr.keys(r) {
                    let e = ctx
                        .logit
                        .of(est_dot(sq, keys.scale[x], pr.dot(keys, r, x), qmu));
                    let j = k0 + x;
                    let is_ref = x < sink || (0..local as i64).contains(&(p - j as i64));
                    cand.push((j as u32, e, is_ref));
                }
                let kept = mass_keep(&cand, gamma);
                for (c, t) in tiles.iter().enumerate() {
                    let (c0, c1) = ctx.cand.k_range(t.k_tile as usize);
                    let at = kept.partition_point(|&j| (j as usize) < c0);
                    hit[c] |= kept.get(at).is_some_and(|&j| (j as usize) < c1);
                }
                row(i, &kept);
            }
            (qt, xs, hit)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::mass_keep;
    use crate::testing::Rng;

    /// The rule without the sort's floor: every non-reference key in (e desc, j asc) order.
    fn plain(cand: &[(u32, f64, bool)], gamma: f64) -> Vec<u32> {
        let m = cand.iter().fold(f64::NEG_INFINITY, |a, c| a.max(c.1));
        let z: f64 = cand.iter().map(|c| (c.1 - m).exp()).sum();
        let mut acc: f64 = cand.iter().filter(|c| c.2).map(|c| (c.1 - m).exp()).sum();
        let mut rest: Vec<&(u32, f64, bool)> = cand.iter().filter(|c| !c.2).collect();
        rest.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let mut kept: Vec<u32> = cand.iter().filter(|c| c.2).map(|c| c.0).collect();
        for c in rest {
            if acc >= gamma * z && gamma < 1.0 {
                break;
            }
            kept.push(c.0);
            acc += (c.1 - m).exp();
        }
        kept.sort_unstable();
        kept
    }

    #[test]
    fn mass_keep_takes_the_heaviest_keys_to_gamma() {
        let ln = |x: f64| x.ln();
        // Weights 1, 8, 4, 2, 1 (Z = 16), key 14 a reference key (kept first: weight 1).
        let cand = [
            (10, ln(1.0), false),
            (11, ln(8.0), false),
            (12, ln(4.0), false),
            (13, ln(2.0), false),
            (14, ln(1.0), true),
        ];
        // gamma 0.5, target 8: 1 (reference) + 8 (key 11) = 9 >= 8 stops there.
        assert_eq!(mass_keep(&cand, 0.5), vec![11, 14]);
        // 1 + 8 + 4 = 13 = 0.8125 Z reaches 0.8; 0.85 needs key 13 too.
        assert_eq!(mass_keep(&cand, 0.8), vec![11, 12, 14]);
        assert_eq!(mass_keep(&cand, 0.85), vec![11, 12, 13, 14]);
        // 15 / 16 reaches 0.9 without key 10; 0.95 takes it; gamma = 1 keeps every key.
        assert_eq!(mass_keep(&cand, 0.9), vec![11, 12, 13, 14]);
        assert_eq!(mass_keep(&cand, 0.95), vec![10, 11, 12, 13, 14]);
        assert_eq!(mass_keep(&cand[..4], 1.0), vec![10, 11, 12, 13]);
        // Reference keys holding gamma already: nothing else; no key: none.
        assert_eq!(mass_keep(&[(3, 0.0, true), (4, -9.0, false)], 0.9), vec![3]);
        assert!(mass_keep(&[], 0.9).is_empty());
        // Ties at the boundary: keys 1 and 2 weigh alike, 1 comes first.
        assert_eq!(
            mass_keep(&[(1, 0.0, false), (2, 0.0, false), (3, -50.0, false)], 0.4),
            vec![1]
        );
    }

    /// The floor that keeps light keys out of the sort changes nothing: random rows of 1 to
    /// 4224 keys with spread and peaked logits, against the plain rule.
    #[test]
    fn mass_keep_floor_changes_nothing() {
        let mut rng = Rng::new(4242);
        for (n, spread) in [
            (1, 1.0),
            (7, 3.0),
            (63, 0.1),
            (65, 8.0),
            (1023, 4.0),
            (4224, 12.0),
        ] {
            for gamma in [0.3, 0.9, 0.95, 0.999, 1.0] {
                let cand: Vec<(u32, f64, bool)> = (0..n)
                    .map(|j| {
                        let e = spread * rng.normal();
                        (j as u32, e, rng.uniform() < 0.02)
                    })
                    .collect();
                let got = mass_keep(&cand, gamma);
                assert_eq!(
                    got,
                    plain(&cand, gamma),
                    "n {n} spread {spread} gamma {gamma}"
                );
                assert!(!got.is_empty() || n == 0);
            }
        }
    }
}
