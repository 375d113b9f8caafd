//! Mask-aware placement: which rank holds which chunk of the sequence, chosen from the block
//! schedule so every rank gets the same scheduled work, for any mask.
//!
//! The sequence of n tokens is cut into N = k P chunks of near-equal length (chunk g is
//! `[floor(g n / N), floor((g + 1) n / N))`). The work of a (query chunk a, key chunk b) pair is
//! the number of (query, key) pairs inside the schedule's tiles that intersect the rectangle
//! a x b (summed over the schedule's stored batch rows and heads; a Partial tile counts whole, as
//! the kernels pay for it whole), and the work of query chunk a is its row sum:
//!   W(a) = sum_b W(a, b),   W(a, b) = sum_{scheduled tiles T} |T n (a x b)|.
//! Chunks are assigned by longest-processing-time first with a cap of k chunks per rank (every
//! rank holds k chunks): heaviest chunk first, each to the least-loaded rank that still has room
//! (ties: the lower rank), then swaps of a chunk of the heaviest rank with a lighter chunk of
//! another rank while they lower the heavier of the two. For a causal mask W(g) grows with g, so k = 2 gives zigzag (rank r
//! holds chunks r and 2P - 1 - r); a sliding window gives near-equal chunks (any placement
//! balances); packed documents balance by the work each chunk's documents carry. When the
//! contiguous placement (rank r holds chunks r k .. r k + k - 1) balances within 1% of that one
//! and its busiest rank fetches fewer key rows from the others ([`Plan::halo_rows`]), it is
//! taken instead: a sliding window's ring then fetches one neighbouring chunk per rank.
//! A rank holds its chunks in increasing order, queries, keys and values alike (the local row
//! layout of every scheme).
use crate::error::{Error, Result};
use crate::mask::BlockSchedule;

/// The placement of one sequence over P ranks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// Sequence length n (queries = keys).
    pub n: usize,
    pub world: usize,
    /// Chunk g covers tokens `bounds[g] .. bounds[g + 1]`.
    pub bounds: Vec<usize>,
    /// The rank that holds chunk g.
    pub owner: Vec<usize>,
    /// W(a, b), row-major N x N.
    pub pair_work: Vec<u64>,
}

/// Chunk boundaries of `n` tokens in `chunks` near-equal pieces.
pub fn even_bounds(n: usize, chunks: usize) -> Vec<usize> {
    (0..=chunks).map(|g| g * n / chunks).collect()
}

/// W(a, b) for the chunks `bounds` (formula in the module header), row-major.
pub fn chunk_work(s: &BlockSchedule, bounds: &[usize]) -> Vec<u64> {
    let nc = bounds.len() - 1;
    // The chunks a token range [lo, hi) meets, with the length of each intersection.
    let meet = |lo: usize, hi: usize| -> Vec<(usize, u64)> {
        let first = bounds.partition_point(|&b| b <= lo).saturating_sub(1);
        (first..nc)
            .take_while(|&g| bounds[g] < hi)
            .map(|g| (g, (hi.min(bounds[g + 1]) - lo.max(bounds[g])) as u64))
            .filter(|&(_, len)| len > 0)
            .collect()
    };
    let mut w = vec![0u64; nc * nc];
    let k_meet: Vec<Vec<(usize, u64)>> = (0..s.k_tiles)
        .map(|kt| {
            let (k0, k1) = s.k_range(kt);
            meet(k0, k1)
        })
        .collect();
    for b in 0..s.batch {
        for h in 0..s.heads {
            for qt in 0..s.q_tiles {
                let (q0, q1) = s.q_range(qt);
                let rows = meet(q0, q1);
                for e in s.row(b, h, qt) {
                    for &(a, ra) in &rows {
                        for &(g, cb) in &k_meet[e.k_tile as usize] {
                            w[a * nc + g] += ra * cb;
                        }
                    }
                }
            }
        }
    }
    w
}

/// Longest-processing-time first with at most `cap` items per bin, then pairwise swaps that
/// lower the heaviest bin: the bin of each item.
pub fn balance(work: &[u64], bins: usize, cap: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..work.len()).collect();
    // Heaviest first; equal work: the earlier chunk first (deterministic).
    order.sort_by_key(|&g| (std::cmp::Reverse(work[g]), g));
    let (mut load, mut count) = (vec![0u64; bins], vec![0usize; bins]);
    let mut owner = vec![0usize; work.len()];
    for g in order {
        let r = (0..bins)
            .filter(|&r| count[r] < cap)
            .min_by_key(|&r| (load[r], r))
            .expect("bins x cap >= items");
        owner[g] = r;
        load[r] += work[g];
        count[r] += 1;
    }
    // Refinement: swap a chunk x of the most loaded rank m with a lighter chunk y of another
    // rank o while that lowers max(L_m, L_o) below L_m (the best such swap each round; every
    // round lowers the loads' sum of squares, so this ends).
    loop {
        let m = (0..bins)
            .max_by_key(|&r| (load[r], std::cmp::Reverse(r)))
            .expect("bins >= 1");
        let mut best: Option<(u64, usize, usize)> = None;
        for x in (0..work.len()).filter(|&x| owner[x] == m) {
            for y in (0..work.len()).filter(|&y| owner[y] != m && work[y] < work[x]) {
                let o = owner[y];
                let d = work[x] - work[y];
                let peak = (load[m] - d).max(load[o] + d);
                if peak < load[m] && best.is_none_or(|b| peak < b.0) {
                    best = Some((peak, x, y));
                }
            }
        }
        let Some((_, x, y)) = best else { break };
        let (o, d) = (owner[y], work[x] - work[y]);
        (owner[x], owner[y]) = (o, m);
        load[m] -= d;
        load[o] += d;
    }
    owner
}

impl Plan {
    /// A placement of the chunks `bounds` (`owner[g]`: the rank of chunk g) and its work under
    /// the schedule `s` (queries = keys, tiles of equal size both ways).
    pub fn new(
        s: &BlockSchedule,
        bounds: Vec<usize>,
        owner: Vec<usize>,
        world: usize,
    ) -> Result<Plan> {
        let bad = |msg: String| Err(Error::Param { op: "cp plan", msg });
        if s.sq != s.sk {
            return bad(format!(
                "context parallelism shards one sequence as queries and keys alike: sq {} != sk {}",
                s.sq, s.sk
            ));
        }
        let nc = bounds.len().saturating_sub(1);
        if nc == 0
            || bounds[0] != 0
            || bounds[nc] != s.sq
            || bounds.windows(2).any(|w| w[0] >= w[1])
        {
            return bad(format!(
                "chunk bounds {bounds:?} must rise strictly from 0 to the length {}",
                s.sq
            ));
        }
        if owner.len() != nc || world == 0 || owner.iter().any(|&r| r >= world) {
            return bad(format!(
                "{} chunk owners {owner:?} for {nc} chunks over {world} ranks",
                owner.len()
            ));
        }
        if let Some(r) = (0..world).find(|r| !owner.contains(r)) {
            return bad(format!("rank {r} of {world} holds no chunk"));
        }
        Ok(Plan {
            n: s.sq,
            world,
            pair_work: chunk_work(s, &bounds),
            bounds,
            owner,
        })
    }

    pub fn chunks(&self) -> usize {
        self.owner.len()
    }
    /// Tokens of chunk g.
    pub fn range(&self, g: usize) -> (usize, usize) {
        (self.bounds[g], self.bounds[g + 1])
    }
    pub fn len(&self, g: usize) -> usize {
        self.bounds[g + 1] - self.bounds[g]
    }
    /// Rank r's chunks in increasing order, each with its first row in the rank's local layout.
    pub fn chunks_of(&self, r: usize) -> Vec<(usize, usize)> {
        let mut row = 0;
        (0..self.chunks())
            .filter(|&g| self.owner[g] == r)
            .map(|g| {
                let at = row;
                row += self.len(g);
                (g, at)
            })
            .collect()
    }
    /// Rows held by rank r.
    pub fn rows_of(&self, r: usize) -> usize {
        (0..self.chunks())
            .filter(|&g| self.owner[g] == r)
            .map(|g| self.len(g))
            .sum()
    }
    /// Whether query chunk a needs key chunk b (some scheduled tile meets a x b).
    pub fn needs(&self, a: usize, b: usize) -> bool {
        self.pair_work[a * self.chunks() + b] > 0
    }
    /// W(a) of every query chunk.
    pub fn chunk_work(&self) -> Vec<u64> {
        self.pair_work
            .chunks(self.chunks())
            .map(|row| row.iter().sum())
            .collect()
    }
    /// Scheduled work per rank.
    pub fn rank_work(&self) -> Vec<u64> {
        let mut w = vec![0u64; self.world];
        for (g, cw) in self.chunk_work().into_iter().enumerate() {
            w[self.owner[g]] += cw;
        }
        w
    }
    /// max / mean of the ranks' work (1 = perfect balance; 1 for no work at all).
    pub fn imbalance(&self) -> f64 {
        let w = self.rank_work();
        let total: u64 = w.iter().sum();
        if total == 0 {
            return 1.0;
        }
        *w.iter().max().expect("world >= 1") as f64 * self.world as f64 / total as f64
    }
    /// The most key rows any rank fetches from the others under the halo exchange (the chunks of
    /// other ranks its queries need, [`Plan::exchanged`]).
    pub fn halo_rows(&self) -> usize {
        (0..self.world)
            .map(|r| {
                (0..self.world)
                    .filter(|&o| o != r)
                    .map(|o| self.packed_rows(&self.exchanged(o, r, crate::cp::block::Side::Keys)))
                    .sum::<usize>()
            })
            .max()
            .unwrap_or(0)
    }

    /// A fingerprint of the placement (ranks compare it before exchanging anything).
    pub fn fingerprint(&self) -> u64 {
        // FNV-1a over n, world, the bounds and the owners.
        let words = [self.n, self.world]
            .into_iter()
            .chain(self.bounds.iter().copied())
            .chain(self.owner.iter().copied());
        words.fold(0xcbf2_9ce4_8422_2325u64, |h, x| {
            (h ^ x as u64).wrapping_mul(0x100_0000_01b3)
        })
    }
}

/// The balanced placement over `world` ranks with `per_rank` chunks each (N = per_rank x world
/// near-equal chunks) under the schedule `s`: the pure planning function (module header).
pub fn plan(s: &BlockSchedule, world: usize, per_rank: usize) -> Result<Plan> {
    let nc = world * per_rank;
    if world == 0 || per_rank == 0 || s.sq < nc {
        return Err(Error::Param {
            op: "cp plan",
            msg: format!(
                "{} tokens cannot be cut into {per_rank} chunks for each of {world} ranks (needs at least {nc} tokens, and at least one rank and one chunk each)",
                s.sq
            ),
        });
    }
    let bounds = even_bounds(s.sq, nc);
    let work: Vec<u64> = chunk_work(s, &bounds)
        .chunks(nc)
        .map(|row| row.iter().sum())
        .collect();
    let owner = balance(&work, world, per_rank);
    let balanced = Plan::new(s, bounds.clone(), owner, world)?;
    // Where keeping neighbours together balances as well (sliding windows, chunked masks), the
    // contiguous placement is taken: the ring's halo then crosses one chunk boundary per rank.
    let contiguous = Plan::new(s, bounds, (0..nc).map(|g| g / per_rank).collect(), world)?;
    if contiguous.imbalance() <= balanced.imbalance() * 1.01
        && contiguous.halo_rows() < balanced.halo_rows()
    {
        return Ok(contiguous);
    }
    Ok(balanced)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mask::{DocIds, MaskExpr, MaskShape};

    fn sched(
        expr: &str,
        batch: usize,
        n: usize,
        docs: Option<DocIds>,
        tile: usize,
    ) -> BlockSchedule {
        MaskExpr::parse(expr)
            .unwrap()
            .bind(
                MaskShape {
                    batch,
                    sq: n,
                    sk: n,
                },
                docs,
            )
            .unwrap()
            .schedule(tile, tile)
            .unwrap()
    }

    /// Packed documents of the given lengths, the same in every batch row.
    fn docs(batch: usize, lens: &[usize]) -> DocIds {
        let row: Vec<i32> = lens
            .iter()
            .enumerate()
            .flat_map(|(d, &l)| std::iter::repeat_n(d as i32, l))
            .collect();
        let all: Vec<i32> = (0..batch).flat_map(|_| row.iter().copied()).collect();
        DocIds {
            q: all.clone(),
            k: all,
        }
    }

    #[test]
    fn causal_with_two_chunks_per_rank_is_zigzag() {
        for p in 1..=8 {
            let n = 2 * p * 64;
            let pl = plan(&sched("causal", 1, n, None, 16), p, 2).unwrap();
            for r in 0..p {
                let mine: Vec<usize> = pl.chunks_of(r).iter().map(|c| c.0).collect();
                assert_eq!(mine, vec![r, 2 * p - 1 - r], "p {p}");
            }
            assert!(pl.imbalance() < 1.01, "p {p}: {}", pl.imbalance());
        }
    }

    #[test]
    fn work_counts_the_scheduled_pairs() {
        // Full mask: every pair, W(a, b) = |a| |b|, chunks of 10 / 11 tokens at n = 31, N = 3.
        let s = sched("full", 1, 31, None, 4);
        let w = chunk_work(&s, &even_bounds(31, 3));
        assert_eq!(w, vec![100, 100, 110, 100, 100, 110, 110, 110, 121]);
        // Causal with tiles of 1: exactly the allowed pairs; the total is n (n + 1) / 2.
        let s = sched("causal", 1, 29, None, 1);
        let w = chunk_work(&s, &even_bounds(29, 4));
        assert_eq!(w.iter().sum::<u64>(), 29 * 30 / 2);
        assert_eq!(w[1], 0, "chunk 0 never sees chunk 1");
        // Per batch row (documents): summed over the rows.
        let s = sched("document", 2, 12, Some(docs(2, &[5, 7])), 1);
        let w = chunk_work(&s, &even_bounds(12, 2));
        // chunk 0: rows 0-4 see keys 0-4, row 5 (document 1) keys 5-11; chunk 1: keys 5-11.
        assert_eq!(w, vec![2 * 26, 2 * 6, 2 * 6, 2 * 36]);
    }

    #[test]
    fn balance_bounds_on_causal_window_and_documents() {
        let n = 4096;
        for p in [2, 3, 4, 5, 8] {
            for (expr, d, per_rank, bound) in [
                ("causal", None, 2, 1.02),
                ("causal & window(300,0)", None, 2, 1.05),
                ("window(100,100)", None, 2, 1.05),
                ("sinks(64) | causal & window(256,0)", None, 2, 1.05),
                ("prefix(512) | causal", None, 4, 1.04),
                (
                    "causal & document",
                    Some(docs(2, &[1500, 300, 900, 1396])),
                    4,
                    1.10,
                ),
                ("document", Some(docs(1, &[2500, 100, 700, 796])), 4, 1.12),
            ] {
                let batch = d.as_ref().map_or(1, |x| x.q.len() / n);
                let s = sched(expr, batch, n, d, 64);
                let pl = plan(&s, p, per_rank).unwrap();
                let imb = pl.imbalance();
                assert!(
                    imb <= bound,
                    "{expr}, p {p}: max / mean work {imb:.3} > {bound}"
                );
                // Every chunk placed once, every rank holds per_rank chunks.
                for r in 0..p {
                    assert_eq!(pl.chunks_of(r).len(), per_rank);
                }
                // The contiguous placement is worse on causal (what balancing buys).
                if expr == "causal" && p > 1 {
                    let contiguous: Vec<usize> = (0..p * per_rank).map(|g| g / per_rank).collect();
                    let c = Plan::new(&s, pl.bounds.clone(), contiguous, p).unwrap();
                    assert!(c.imbalance() > 1.3, "{}", c.imbalance());
                }
            }
        }
    }

    /// A sliding window balances under any placement: the plan keeps neighbours together, so a
    /// rank fetches one neighbouring chunk at most; causal keeps zigzag.
    #[test]
    fn windows_keep_neighbours_together() {
        for p in [2, 3, 5, 8] {
            let s = sched("causal & window(100,0)", 1, 4096, None, 64);
            let pl = plan(&s, p, 2).unwrap();
            for r in 0..p {
                let mine: Vec<usize> = pl.chunks_of(r).iter().map(|c| c.0).collect();
                assert_eq!(mine, vec![2 * r, 2 * r + 1], "p {p}");
            }
            // Chunks aligned with the tiles (p = 2, 8): rank r > 0 fetches the chunk before its
            // first, 2r - 1, rank 0 nothing. Otherwise a tile straddling the chunk after its last
            // counts that one too (the need is known per tile): two chunks at most.
            let one = (1..p).map(|r| pl.len(2 * r - 1)).max().unwrap_or(0);
            if (4096 / (2 * p)) % 64 == 0 {
                assert_eq!(pl.halo_rows(), one, "p {p}");
            } else {
                assert!(pl.halo_rows() <= 2 * one, "p {p}: {}", pl.halo_rows());
            }
            assert!(pl.imbalance() < 1.05, "p {p}: {}", pl.imbalance());
        }
    }

    #[test]
    fn window_skips_far_chunks() {
        // Tiles of 20 align with the chunks of 100: exactly the neighbouring chunk is needed.
        let s = sched("causal & window(50,0)", 1, 800, None, 20);
        let pl = plan(&s, 4, 2).unwrap();
        for a in 0..8 {
            for b in 0..8 {
                assert_eq!(pl.needs(a, b), b == a || b + 1 == a, "a {a} b {b}");
            }
        }
    }

    #[test]
    fn bad_plans_are_refused() {
        let s = sched("causal", 1, 10, None, 4);
        let e = plan(&s, 4, 3).unwrap_err().to_string();
        assert!(
            e.contains("10 tokens cannot be cut into 3 chunks for each of 4 ranks"),
            "{e}"
        );
        assert!(plan(&s, 0, 2).is_err());
        let e = Plan::new(&s, vec![0, 5, 10], vec![0, 0], 2)
            .unwrap_err()
            .to_string();
        assert!(e.contains("rank 1 of 2 holds no chunk"), "{e}");
        let e = Plan::new(&s, vec![0, 5, 9], vec![0, 1], 2)
            .unwrap_err()
            .to_string();
        assert!(e.contains("from 0 to the length 10"), "{e}");
        let r = MaskExpr::parse("full")
            .unwrap()
            .bind(
                MaskShape {
                    batch: 1,
                    sq: 4,
                    sk: 8,
                },
                None,
            )
            .unwrap()
            .schedule(4, 4)
            .unwrap();
        let e = plan(&r, 2, 1).unwrap_err().to_string();
        assert!(e.contains("sq 4 != sk 8"), "{e}");
    }
}
