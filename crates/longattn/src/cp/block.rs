//! The pieces every scheme is built of: a mask cut into rectangles ([`CpMask::rect`]), the
//! rank-local row layouts and copies between them, the LSE merge, and the agreement check the
//! ranks run before exchanging anything.
use super::plan::Plan;
use super::transport::Transport;
use crate::attention::MaskSpec;
use crate::backward::BackwardParams;
use crate::error::{Error, Result};
use crate::mask::{BlockSchedule, BoundMask, RowMask, TileEntry, TileKind};
use crate::tensor::TensorView;

/// A mask bound to the whole sequence and its block schedule (tiles of `tile` both ways), from
/// which every scheme cuts the rectangles its blocks need.
pub struct CpMask {
    pub bound: BoundMask,
    pub sched: BlockSchedule,
}

impl CpMask {
    pub fn new(bound: BoundMask, tile: usize) -> Result<CpMask> {
        let sched = bound.schedule(tile, tile)?;
        Ok(CpMask { bound, sched })
    }

    /// A fingerprint of the mask (its text, shape and tiles; ranks compare it).
    pub fn fingerprint(&self) -> u64 {
        let s = self.bound.shape();
        let text = format!(
            "{} {} {} {} {}",
            self.bound.expr(),
            s.batch,
            s.sq,
            s.sk,
            self.sched.tile_q
        );
        text.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, x| {
            (h ^ x as u64).wrapping_mul(0x100_0000_01b3)
        })
    }

    /// The mask of the block of queries `q0..q1` and keys `k0..k1`: a schedule over the block
    /// (tiles of the whole schedule's size, counted from the block's corner) and the element
    /// mask shifted to the block; `None` when no scheduled tile meets the block. A block tile is
    /// Full when every tile of the whole schedule it meets is Full, Partial when some scheduled
    /// tile meets it, absent otherwise (so Partial may be conservative, never wrong).
    pub fn rect(
        &self,
        (q0, q1): (usize, usize),
        (k0, k1): (usize, usize),
    ) -> Result<Option<Rect<'_>>> {
        let s = &self.sched;
        let (tq, tk) = (s.tile_q, s.tile_k);
        let (sq, sk) = (q1 - q0, k1 - k0);
        let mut out = BlockSchedule::empty(tq, tk, sq, sk, s.batch, s.heads)?;
        let nk = sk.div_ceil(tk);
        // Whole-schedule tiles a block tile meets, per axis: `lo / t ..= (hi - 1) / t`.
        let cover = |lo: usize, hi: usize, t: usize| (lo / t, (hi - 1) / t);
        let k_cover: Vec<usize> = (0..nk)
            .map(|v| {
                let (a, b) = cover(k0 + v * tk, (k0 + (v + 1) * tk).min(k1), tk);
                b - a + 1
            })
            .collect();
        // Per block key tile: (scheduled tiles met, Full tiles met).
        let mut hits = vec![(0usize, 0usize); nk];
        let mut any = false;
        for b in 0..s.batch {
            for h in 0..s.heads {
                for u in 0..sq.div_ceil(tq) {
                    hits.fill((0, 0));
                    let (g0, g1) = cover(q0 + u * tq, (q0 + (u + 1) * tq).min(q1), tq);
                    for g in g0..=g1 {
                        for e in s.row(b, h, g) {
                            let (e0, e1) = s.k_range(e.k_tile as usize);
                            let (lo, hi) = (e0.max(k0), e1.min(k1));
                            if lo >= hi {
                                continue;
                            }
                            for hit in &mut hits[(lo - k0) / tk..=(hi - 1 - k0) / tk] {
                                hit.0 += 1;
                                hit.1 += (e.kind == TileKind::Full) as usize;
                            }
                        }
                    }
                    let need = g1 - g0 + 1;
                    out.push_row_with(|row| {
                        for (v, &(_, full)) in hits.iter().enumerate().filter(|(_, h)| h.0 > 0) {
                            row.push(TileEntry {
                                k_tile: v as u32,
                                kind: if full == need * k_cover[v] {
                                    TileKind::Full
                                } else {
                                    TileKind::Partial
                                },
                            });
                        }
                    })?;
                    any |= hits.iter().any(|h| h.0 > 0);
                }
            }
        }
        if !any {
            return Ok(None);
        }
        Ok(Some(Rect {
            sched: out.finish()?,
            rows: Shifted {
                m: &self.bound,
                q0,
                k0,
                sk,
            },
        }))
    }
}

/// The mask of one block (from [`CpMask::rect`]).
pub struct Rect<'a> {
    sched: BlockSchedule,
    rows: Shifted<'a>,
}

impl Rect<'_> {
    pub fn spec(&self) -> MaskSpec<'_> {
        MaskSpec::Schedule {
            schedule: &self.sched,
            rows: Some(&self.rows),
        }
    }
}

/// The element mask of the block at (q0, k0): query i, key j of the block are query q0 + i,
/// key k0 + j of the sequence; keys at or past the block's `sk` are 0.
struct Shifted<'a> {
    m: &'a BoundMask,
    q0: usize,
    k0: usize,
    sk: usize,
}

impl RowMask for Shifted<'_> {
    fn row_bits(&self, b: usize, h: usize, i: usize, j0: usize, out: &mut [u64]) {
        self.m.row_bits(b, h, self.q0 + i, self.k0 + j0, out);
        for (w, word) in out.iter_mut().enumerate() {
            let base = j0 + 64 * w;
            if base >= self.sk {
                *word = 0;
            } else if self.sk - base < 64 {
                *word &= (1u64 << (self.sk - base)) - 1;
            }
        }
    }
}

/// The layout of a rank-local f32 buffer of `rows` sequence rows: `[B, rows, H, W]`, or, with
/// `heads_outer`, `[B, H, rows, W]` (the LSE: `[B, H, rows]` with W = 1).
#[derive(Clone, Copy, Debug)]
pub struct Rows {
    pub b: usize,
    pub rows: usize,
    pub h: usize,
    pub w: usize,
    pub heads_outer: bool,
}

impl Rows {
    pub fn new(b: usize, rows: usize, h: usize, w: usize) -> Rows {
        Rows {
            b,
            rows,
            h,
            w,
            heads_outer: false,
        }
    }
    pub fn lse(b: usize, h: usize, rows: usize) -> Rows {
        Rows {
            b,
            rows,
            h,
            w: 1,
            heads_outer: true,
        }
    }
    pub fn values(&self) -> usize {
        self.b * self.rows * self.h * self.w
    }
    /// The same layout with another row count.
    pub fn with_rows(self, rows: usize) -> Rows {
        Rows { rows, ..self }
    }
    #[inline]
    fn at(&self, b: usize, i: usize, h: usize) -> usize {
        if self.heads_outer {
            ((b * self.h + h) * self.rows + i) * self.w
        } else {
            ((b * self.rows + i) * self.h + h) * self.w
        }
    }
    /// Rows `r0 .. r0 + len` of `x` (`[B, rows, H, W]`) as a `[B, len, H, W]` view (no copy).
    pub fn view<'a>(&self, x: &'a [f32], r0: usize, len: usize) -> Result<TensorView<'a>> {
        let hw = self.h * self.w;
        TensorView::strided(
            &x[r0 * hw..],
            [self.b, len, self.h, self.w],
            [self.rows * hw, hw, self.w, 1],
        )
    }
}

/// A run of rows: `len` rows from row `src` of one buffer to row `dst` of another.
#[derive(Clone, Copy, Debug)]
pub struct Run {
    pub src: usize,
    pub dst: usize,
    pub len: usize,
}

impl Run {
    /// The same rows the other way.
    pub fn rev(self) -> Run {
        Run {
            src: self.dst,
            dst: self.src,
            len: self.len,
        }
    }
}

/// `y[b, run.dst + i, hd] (+)= x[b, run.src + i, hs]` (W values each) for every batch row, run
/// and head pair `(hs, hd)`; adds when `add`, copies otherwise.
pub fn copy_rows(
    (x, xl): (&[f32], Rows),
    (y, yl): (&mut [f32], Rows),
    runs: &[Run],
    heads: &[(usize, usize)],
    add: bool,
) {
    let w = xl.w;
    for b in 0..xl.b {
        for run in runs {
            for &(hs, hd) in heads {
                for i in 0..run.len {
                    let (s, d) = (xl.at(b, run.src + i, hs), yl.at(b, run.dst + i, hd));
                    let (src, dst) = (&x[s..s + w], &mut y[d..d + w]);
                    if add {
                        dst.iter_mut().zip(src).for_each(|(a, v)| *a += v);
                    } else {
                        dst.copy_from_slice(src);
                    }
                }
            }
        }
    }
}

/// Every head mapped to itself.
pub fn same_heads(h: usize) -> Vec<(usize, usize)> {
    (0..h).map(|h| (h, h)).collect()
}

/// Merges a partial result `(o2 [B, len, H, Dv], l2 [B, H, len])` into rows `r0 .. r0 + len` of
/// `(o1, l1)` (layouts `ol`, `[B, H, rows]`): [`merge_runs`] with one run.
pub fn merge_rows(
    (o1, l1): (&mut [f32], &mut [f32]),
    (o2, l2): (&[f32], &[f32]),
    ol: Rows,
    r0: usize,
    len: usize,
) {
    let run = Run {
        src: 0,
        dst: r0,
        len,
    };
    merge_runs((o1, l1), ol, (o2, l2), ol.with_rows(len), &[run]);
}

/// Merges rows `run.src ..` of a partial result `(o2, l2)` (layouts `pl` and `[B, H, pl.rows]`)
/// into rows `run.dst ..` of `(o1, l1)` (layouts `ol`, `[B, H, ol.rows]`), per row and head:
///   lse = log(exp(lse_1) + exp(lse_2)),   out = exp(lse_1 - lse) out_1 + exp(lse_2 - lse) out_2,
/// computed with m = max(lse_1, lse_2) subtracted first; rows without keys in both parts
/// (both LSE -inf) stay empty. Merging into an empty row copies the part.
pub fn merge_runs(
    (o1, l1): (&mut [f32], &mut [f32]),
    ol: Rows,
    (o2, l2): (&[f32], &[f32]),
    pl: Rows,
    runs: &[Run],
) {
    let (ll, pll) = (
        Rows::lse(ol.b, ol.h, ol.rows),
        Rows::lse(pl.b, pl.h, pl.rows),
    );
    for b in 0..ol.b {
        for h in 0..ol.h {
            for run in runs {
                for i in 0..run.len {
                    let (li, pi) = (ll.at(b, run.dst + i, h), pll.at(b, run.src + i, h));
                    let (a, z) = (l1[li], l2[pi]);
                    let m = a.max(z);
                    if m == f32::NEG_INFINITY {
                        continue;
                    }
                    let (wa, wz) = ((a - m).exp(), (z - m).exp());
                    let s = wa + wz;
                    l1[li] = m + s.ln();
                    let (o, op) = (ol.at(b, run.dst + i, h), pl.at(b, run.src + i, h));
                    for d in 0..ol.w {
                        o1[o + d] = (wa * o1[o + d] + wz * o2[op + d]) / s;
                    }
                }
            }
        }
    }
}

pub fn to_bytes(x: &[f32]) -> Vec<u8> {
    x.iter().flat_map(|v| v.to_le_bytes()).collect()
}

pub fn from_bytes(x: &[u8]) -> Vec<f32> {
    x.chunks_exact(4)
        .map(|w| f32::from_le_bytes(w.try_into().expect("4 bytes")))
        .collect()
}

/// This rank's share of one attention: `q [B, rows, Hq, D]`, `k [B, rows, Hk, D]`,
/// `v [B, rows, Hk, Dv]` (f32, contiguous; the rows of the rank's chunks, in increasing order).
pub struct LocalQkv<'a> {
    pub q: &'a [f32],
    pub k: &'a [f32],
    pub v: &'a [f32],
    /// (B, rows, Hq, Hk, D, Dv)
    pub dims: (usize, usize, usize, usize, usize, usize),
}

impl LocalQkv<'_> {
    pub fn q_rows(&self) -> Rows {
        let (b, n, hq, _, d, _) = self.dims;
        Rows::new(b, n, hq, d)
    }
    pub fn k_rows(&self) -> Rows {
        let (b, n, _, hk, d, _) = self.dims;
        Rows::new(b, n, hk, d)
    }
    pub fn v_rows(&self) -> Rows {
        let (b, n, _, hk, _, dv) = self.dims;
        Rows::new(b, n, hk, dv)
    }
    pub fn o_rows(&self) -> Rows {
        let (b, n, hq, _, _, dv) = self.dims;
        Rows::new(b, n, hq, dv)
    }
    pub fn lse_rows(&self) -> Rows {
        let (b, n, hq, ..) = self.dims;
        Rows::lse(b, hq, n)
    }

    /// Checks the buffers against the dimensions and `rows` (what the plan gives this rank).
    pub fn check(&self, scheme: &str, rows: usize) -> Result<()> {
        let (b, n, hq, hk, d, dv) = self.dims;
        let bad = |msg: String| {
            Err(Error::Param {
                op: "context parallelism",
                msg: format!("{scheme}: {msg}"),
            })
        };
        if n != rows {
            return bad(format!(
                "this rank holds {n} rows, its chunks of the plan have {rows}"
            ));
        }
        if [b, hq, hk, d, dv].contains(&0) || hq % hk != 0 {
            return bad(format!(
                "batch {b}, heads {hq} / {hk}, dims {d} / {dv}: all >= 1 and the query heads a multiple of the key / value heads"
            ));
        }
        let (q, k, v) = (self.q.len(), self.k.len(), self.v.len());
        let want = (
            self.q_rows().values(),
            self.k_rows().values(),
            self.v_rows().values(),
        );
        if (q, k, v) != want {
            return bad(format!(
                "q / k / v hold {q} / {k} / {v} values, expected [B {b}, rows {n}, H, D] = {} / {} / {}",
                want.0, want.1, want.2
            ));
        }
        Ok(())
    }

    /// Checks this rank's inputs, then that every rank agrees on the shapes, the mask and the
    /// plan (one all-gather of a few words: a rank with other inputs is named on every rank
    /// instead of a mismatched message later).
    pub fn agree(&self, t: &dyn Transport, scheme: &str, plan: &Plan, mask: &CpMask) -> Result<()> {
        let local = if plan.world != t.world() {
            Err(t.err(format!(
                "{scheme}: the plan is for {} ranks, the group has {}",
                plan.world,
                t.world()
            )))
        } else if mask.bound.shape().sq != plan.n {
            Err(t.err(format!(
                "{scheme}: the mask is bound to {} tokens, the plan to {}",
                mask.bound.shape().sq,
                plan.n
            )))
        } else if mask.bound.shape().batch != self.dims.0 {
            Err(t.err(format!(
                "{scheme}: the mask is bound to batch {}, the inputs have {}",
                mask.bound.shape().batch,
                self.dims.0
            )))
        } else {
            self.check(scheme, plan.rows_of(t.rank()))
        };
        let (b, _, hq, hk, d, dv) = self.dims;
        let fields = [
            ("batch", b as u64),
            ("query heads", hq as u64),
            ("key / value heads", hk as u64),
            ("head dim", d as u64),
            ("value dim", dv as u64),
            ("plan", plan.fingerprint()),
            ("mask", mask.fingerprint()),
        ];
        agree(t, scheme, local, &fields)
    }
}

/// Every rank's `fields` gathered and compared, with whether each rank's own check passed.
fn agree(t: &dyn Transport, scheme: &str, local: Result<()>, fields: &[(&str, u64)]) -> Result<()> {
    let mine: Vec<u64> = std::iter::once(local.is_ok() as u64)
        .chain(fields.iter().map(|f| f.1))
        .collect();
    let bytes: Vec<u8> = mine.iter().flat_map(|v| v.to_le_bytes()).collect();
    let mut all = vec![0u8; bytes.len() * t.world()];
    t.all_gather(&bytes, &mut all)?;
    local?;
    for (r, theirs) in all.chunks(bytes.len()).enumerate() {
        let word =
            |i: usize| u64::from_le_bytes(theirs[8 * i..8 * i + 8].try_into().expect("8 bytes"));
        if word(0) == 0 {
            return Err(t.err(format!(
                "{scheme}: rank {r} refused its inputs (its own error names the problem)"
            )));
        }
        for (i, &(name, v)) in fields.iter().enumerate() {
            if word(i + 1) != v {
                return Err(t.err(format!(
                    "{scheme}: rank {r} has {name} {}, this rank {v}: every rank must pass the same shapes, mask and plan",
                    word(i + 1)
                )));
            }
        }
    }
    Ok(())
}

impl Plan {
    /// Rank r's chunks as runs from the whole sequence's rows to the rank's local rows.
    pub fn runs_of(&self, r: usize) -> Vec<Run> {
        self.chunks_of(r)
            .into_iter()
            .map(|(g, at)| Run {
                src: self.bounds[g],
                dst: at,
                len: self.len(g),
            })
            .collect()
    }

    /// The chunks of rank `owner` that meet some chunk of rank `user` under the mask, each with
    /// its row in a packed buffer of just those chunks (increasing order): with
    /// [`Side::Keys`] the key chunks of `owner` some query chunk of `user` needs (what `user`
    /// fetches of `owner`'s K / V), with [`Side::Queries`] the query chunks of `owner` that need
    /// some key chunk of `user` (what `owner` sends `user` under pass-Q).
    pub fn exchanged(&self, owner: usize, user: usize, side: Side) -> Vec<(usize, usize)> {
        let theirs = self.chunks_of(user);
        let mut row = 0;
        self.chunks_of(owner)
            .into_iter()
            .filter(|&(g, _)| {
                theirs.iter().any(|&(u, _)| match side {
                    Side::Keys => self.needs(u, g),
                    Side::Queries => self.needs(g, u),
                })
            })
            .map(|(g, _)| {
                let at = row;
                row += self.len(g);
                (g, at)
            })
            .collect()
    }

    /// Runs from rank `owner`'s local rows to the packed rows of its chunks `list` (from
    /// [`Plan::exchanged`]).
    pub fn packed_runs(&self, owner: usize, list: &[(usize, usize)]) -> Vec<Run> {
        let local = self.chunks_of(owner);
        list.iter()
            .map(|&(g, at)| Run {
                src: local
                    .iter()
                    .find(|c| c.0 == g)
                    .expect("a chunk of the owner")
                    .1,
                dst: at,
                len: self.len(g),
            })
            .collect()
    }

    /// Rows of the packed chunks `list`.
    pub fn packed_rows(&self, list: &[(usize, usize)]) -> usize {
        list.iter().map(|&(g, _)| self.len(g)).sum()
    }

    /// The most rows any rank holds (what the collectives pad every rank's part to).
    pub fn max_rows(&self) -> usize {
        (0..self.world).map(|r| self.rows_of(r)).max().unwrap_or(0)
    }

    /// Rank r's rows of a whole-sequence tensor `[B, n, H, W]` (`h_w` = (H, W)).
    pub fn shard(&self, x: &[f32], b: usize, (h, w): (usize, usize), r: usize) -> Vec<f32> {
        let local = Rows::new(b, self.rows_of(r), h, w);
        let mut y = vec![0f32; local.values()];
        copy_rows(
            (x, Rows::new(b, self.n, h, w)),
            (&mut y, local),
            &self.runs_of(r),
            &same_heads(h),
            false,
        );
        y
    }
}

/// Which side of the attention a rank's chunks play in [`Plan::exchanged`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Keys,
    Queries,
}

/// Rank `owner`'s chunks `list` of its local buffer `x` (layout `l`) copied into a packed buffer
/// (layout `l` with the packed rows).
pub fn pack(plan: &Plan, owner: usize, x: &[f32], l: Rows, list: &[(usize, usize)]) -> Vec<f32> {
    let pl = l.with_rows(plan.packed_rows(list));
    let mut y = vec![0f32; pl.values()];
    copy_rows(
        (x, l),
        (&mut y, pl),
        &plan.packed_runs(owner, list),
        &same_heads(l.h),
        false,
    );
    y
}

/// Where a rank's blocks take their keys from.
#[derive(Clone, Copy)]
pub enum Keys<'a> {
    /// Some chunks, each with its first row in the buffer of keys held (a rank's local layout,
    /// or the packed chunks fetched from another rank, [`Plan::exchanged`]).
    Chunks(&'a [(usize, usize)]),
    /// The whole sequence, in sequence order.
    Whole,
}

/// One block a rank computes: its query rows `qa .. qa + la` (local), its key rows
/// `kb .. kb + lb` (in the layout of the keys it reads), and the mask's cut for it.
pub struct Block<'a> {
    pub qa: usize,
    pub la: usize,
    pub kb: usize,
    pub lb: usize,
    pub rect: Rect<'a>,
}

/// The blocks `rank` computes against `keys`: each of its query chunks a with each key chunk b
/// it needs (some scheduled tile meets a x b); key chunks no query chunk of the rank needs are
/// skipped. Against the whole sequence, one block per query chunk that has any scheduled key.
pub fn blocks<'m>(
    plan: &Plan,
    mask: &'m CpMask,
    rank: usize,
    keys: Keys,
) -> Result<Vec<Block<'m>>> {
    let mut v = Vec::new();
    for (a, qa) in plan.chunks_of(rank) {
        let theirs = match keys {
            Keys::Chunks(list) => list
                .iter()
                .filter(|&&(b, _)| plan.needs(a, b))
                .map(|&(b, kb)| (plan.range(b), kb))
                .collect(),
            Keys::Whole => vec![((0, plan.n), 0)],
        };
        for ((k0, k1), kb) in theirs {
            if let Some(rect) = mask.rect(plan.range(a), (k0, k1))? {
                v.push(Block {
                    qa,
                    la: plan.len(a),
                    kb,
                    lb: k1 - k0,
                    rect,
                });
            }
        }
    }
    Ok(v)
}

/// What a backward takes besides the inputs: the forward's `out [B, rows, Hq, Dv]` and
/// `lse [B, Hq, rows]` and the gradient `dout` of the output, in the local row order, and the
/// backward's options.
pub struct GradIn<'a> {
    pub out: &'a [f32],
    pub lse: &'a [f32],
    pub dout: &'a [f32],
    pub bwd: BackwardParams,
}

/// The setting of one context-parallel call: this rank's transport, and the plan and mask
/// (the same on every rank).
#[derive(Clone, Copy)]
pub struct Cp<'a> {
    pub t: &'a dyn Transport,
    pub plan: &'a Plan,
    pub mask: &'a CpMask,
}

impl GradIn<'_> {
    /// Checks the lengths against this rank's inputs, then that every rank agrees
    /// ([`LocalQkv::agree`]).
    pub fn agree(
        &self,
        t: &dyn Transport,
        scheme: &str,
        x: &LocalQkv,
        plan: &Plan,
        mask: &CpMask,
    ) -> Result<()> {
        let (no, nl) = (x.o_rows().values(), x.lse_rows().values());
        let (o, l, d) = (self.out.len(), self.lse.len(), self.dout.len());
        let checked = if o != no || d != no || l != nl {
            Err(t.err(format!(
                "{scheme} backward: out / dout / lse hold {o} / {d} / {l} values, expected {no} / {no} / {nl}"
            )))
        } else {
            Ok(())
        };
        x.agree(t, scheme, plan, mask)?;
        checked
    }

    /// The LSE rows of a query chunk (local rows `r0 .. r0 + len`), contiguous `[B, Hq, len]`
    /// as the backward takes them.
    pub fn lse_rows(&self, x: &LocalQkv, r0: usize, len: usize) -> Vec<f32> {
        let ll = x.lse_rows();
        let mut y = vec![0f32; ll.with_rows(len).values()];
        let run = Run {
            src: r0,
            dst: 0,
            len,
        };
        copy_rows(
            (self.lse, ll),
            (&mut y, ll.with_rows(len)),
            &[run],
            &same_heads(ll.h),
            false,
        );
        y
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mask::{MaskExpr, MaskShape};

    /// Every rectangle's schedule and shifted mask agree with the whole mask element by element:
    /// an absent tile has no allowed pair, a Full tile only allowed pairs.
    #[test]
    fn rectangles_agree_with_the_whole_mask() {
        let n = 37;
        for expr in [
            "causal",
            "causal & window(6,0) | sinks(3)",
            "chunk(9) & !strided(4)",
            "full",
        ] {
            let bound = MaskExpr::parse(expr)
                .unwrap()
                .bind(MaskShape::square(n), None)
                .unwrap();
            let m = CpMask::new(bound, 4).unwrap();
            for (q, k) in [
                ((0, 37), (0, 37)),
                ((5, 18), (3, 29)),
                ((30, 37), (0, 7)),
                ((9, 10), (11, 37)),
            ] {
                let rect = m.rect(q, k).unwrap();
                let allowed = |i: usize, j: usize| m.bound.allowed(0, q.0 + i, k.0 + j);
                let any = (0..q.1 - q.0).any(|i| (0..k.1 - k.0).any(|j| allowed(i, j)));
                let Some(rect) = rect else {
                    assert!(
                        !any,
                        "{expr} {q:?} {k:?}: skipped a block with allowed pairs"
                    );
                    continue;
                };
                let s = &rect.sched;
                for u in 0..s.q_tiles {
                    let (i0, i1) = s.q_range(u);
                    for v in 0..s.k_tiles {
                        let (j0, j1) = s.k_range(v);
                        let e = s.row(0, 0, u).iter().find(|e| e.k_tile as usize == v);
                        let pairs: Vec<bool> = (i0..i1)
                            .flat_map(|i| (j0..j1).map(move |j| (i, j)))
                            .map(|(i, j)| allowed(i, j))
                            .collect();
                        match e.map(|e| e.kind) {
                            None => assert!(
                                pairs.iter().all(|&a| !a),
                                "{expr} {q:?} {k:?} tile {u},{v}"
                            ),
                            Some(TileKind::Full) => {
                                assert!(pairs.iter().all(|&a| a), "{expr} tile {u},{v}")
                            }
                            Some(TileKind::Partial) => {}
                        }
                    }
                }
                for i in 0..q.1 - q.0 {
                    let mut w = [0u64];
                    rect.rows.row_bits(0, 0, i, 0, &mut w);
                    for j in 0..64 {
                        let want = j < k.1 - k.0 && allowed(i, j);
                        assert_eq!(
                            w[0] >> j & 1 == 1,
                            want,
                            "{expr} {q:?} {k:?} row {i} key {j}"
                        );
                    }
                }
            }
        }
    }
}
