//! Ulysses: an all-to-all turns sequence shards into head groups, each rank runs the whole
//! sequence for its group through the common forward (with the whole mask), and an all-to-all
//! turns the result back into sequence shards.
//!
//! Rank j's query heads are `j Hq/P .. (j+1) Hq/P` (P must divide Hq). Query head h reads
//! key / value head h / g (g = Hq / Hk), so rank j receives the key / value heads its query heads
//! read, in the local GQA layout of one of three cases:
//! - g divides Hq/P: the heads `j Hq/(P g) ..` (Hq/(P g) of them, groups of g query heads);
//! - Hq/P divides g: the one head `j Hq/(P g)` (several ranks hold it: replicated);
//! - otherwise: one key / value head per query head (replicated, local g = 1).
//!
//! Backward: the same all-to-alls for Q, K, V, out, dO and the LSE, the common backward over the
//! whole sequence per head group, and all-to-alls back; a key / value head replicated on several
//! ranks gets the sum of their dK / dV, added in rank order.
use super::block::{copy_rows, from_bytes, to_bytes, Cp, GradIn, LocalQkv, Rows, Run};
use super::plan::Plan;
use super::ring::Grads;
use super::transport::Transport;
use crate::attention::{forward, AttnParams, MaskSpec};
use crate::backward::backward;
use crate::error::Result;
use crate::tensor::TensorView;

/// What Ulysses suggests when the heads do not divide.
const ADVICE: &str = "use the ring or all-gather";

/// Which heads go to which rank.
pub(crate) struct Heads {
    /// `q[j]`: the query heads of rank j.
    pub q: Vec<Vec<usize>>,
    /// `kv[j]`: the key / value heads rank j receives, in its local order.
    pub kv: Vec<Vec<usize>>,
}

impl Heads {
    /// The heads of the `t.world()` ranks of `t`; `scheme` and `advice` complete the error when
    /// the query heads do not divide.
    pub fn new(t: &dyn Transport, x: &LocalQkv, scheme: &str, advice: &str) -> Result<Heads> {
        let (_, _, hq, hk, ..) = x.dims;
        let p = t.world();
        if !hq.is_multiple_of(p) {
            return Err(t.err(format!(
                "{scheme}: {hq} query heads cannot be split over {p} ranks (the heads must be a multiple of the ranks; {advice})"
            )));
        }
        let (hp, g) = (hq / p, hq / hk);
        let q: Vec<Vec<usize>> = (0..p).map(|j| (j * hp..(j + 1) * hp).collect()).collect();
        let kv = (0..p)
            .map(|j| {
                if hp.is_multiple_of(g) {
                    (j * hp / g..(j + 1) * hp / g).collect()
                } else if g.is_multiple_of(hp) {
                    vec![j * hp / g]
                } else {
                    q[j].iter().map(|&h| h / g).collect()
                }
            })
            .collect();
        Ok(Heads { q, kv })
    }
}

/// How the ranks' rows make up the sequence a head group runs over: rank i holds `rows[i]` rows,
/// taken from the `n` rows of the sequence by `runs[i]` (src: the sequence's row, dst: the
/// rank's local row, as [`Plan::runs_of`]). Ulysses spreads the whole sequence by the plan; USP spreads a ring group's rows
/// over the ranks of its Ulysses group.
pub(crate) struct Spread {
    pub n: usize,
    pub rows: Vec<usize>,
    pub runs: Vec<Vec<Run>>,
}

impl Spread {
    pub fn of_plan(plan: &Plan) -> Spread {
        Spread {
            n: plan.n,
            rows: (0..plan.world).map(|r| plan.rows_of(r)).collect(),
            runs: (0..plan.world).map(|r| plan.runs_of(r)).collect(),
        }
    }
    fn max_rows(&self) -> usize {
        self.rows.iter().copied().max().unwrap_or(0)
    }
}

/// Sequence shards -> head groups: this rank's rows `x` (layout `l`, all heads) go out as
/// `heads[j]` to rank j; returns the whole sequence of this rank's heads (layout `l` with n rows
/// and `heads[rank].len()` heads, in sequence order). Parts are padded to the most rows a rank
/// holds.
pub(crate) fn to_heads(
    t: &dyn Transport,
    sp: &Spread,
    x: &[f32],
    l: Rows,
    heads: &[Vec<usize>],
) -> Result<Vec<f32>> {
    let (p, r) = (t.world(), t.rank());
    let nh = heads[r].len();
    let part = Rows {
        h: nh,
        ..l.with_rows(sp.max_rows())
    };
    let mut send = vec![0f32; p * part.values()];
    let all_rows = [Run {
        src: 0,
        dst: 0,
        len: l.rows,
    }];
    for (j, buf) in send.chunks_mut(part.values()).enumerate() {
        let pairs: Vec<(usize, usize)> =
            heads[j].iter().enumerate().map(|(u, &h)| (h, u)).collect();
        copy_rows(
            (x, l),
            (buf, part.with_rows(l.rows)),
            &all_rows,
            &pairs,
            false,
        );
    }
    let mut recv = vec![0u8; 4 * send.len()];
    t.all_to_all(&to_bytes(&send), &mut recv)?;
    let whole = part.with_rows(sp.n);
    let mut y = vec![0f32; whole.values()];
    let same: Vec<(usize, usize)> = (0..nh).map(|u| (u, u)).collect();
    for (i, raw) in recv.chunks(4 * part.values()).enumerate() {
        let il = part.with_rows(sp.rows[i]);
        let runs: Vec<Run> = sp.runs[i].iter().map(|u| u.rev()).collect();
        copy_rows(
            (&from_bytes(&raw[..4 * il.values()]), il),
            (&mut y, whole),
            &runs,
            &same,
            false,
        );
    }
    Ok(y)
}

/// Head groups -> sequence shards, the inverse of [`to_heads`]: `y` (layout `wl`: n rows, this
/// rank's heads) goes to each rank as its rows; returns this rank's rows with every head
/// (layout `l`), the parts of a head held by several ranks added in rank order.
pub(crate) fn to_seq(
    t: &dyn Transport,
    sp: &Spread,
    y: &[f32],
    wl: Rows,
    l: Rows,
    heads: &[Vec<usize>],
) -> Result<Vec<f32>> {
    let (p, r) = (t.world(), t.rank());
    let part = wl.with_rows(sp.max_rows());
    let mut send = vec![0f32; p * part.values()];
    let same: Vec<(usize, usize)> = (0..wl.h).map(|u| (u, u)).collect();
    for (i, buf) in send.chunks_mut(part.values()).enumerate() {
        copy_rows(
            (y, wl),
            (buf, part.with_rows(sp.rows[i])),
            &sp.runs[i],
            &same,
            false,
        );
    }
    let mut recv = vec![0u8; 4 * send.len()];
    t.all_to_all(&to_bytes(&send), &mut recv)?;
    let mine = part.with_rows(sp.rows[r]);
    let mut x = vec![0f32; l.values()];
    let all_rows = [Run {
        src: 0,
        dst: 0,
        len: l.rows,
    }];
    for (j, raw) in recv.chunks(4 * part.values()).enumerate() {
        let pairs: Vec<(usize, usize)> =
            heads[j].iter().enumerate().map(|(u, &h)| (u, h)).collect();
        copy_rows(
            (&from_bytes(&raw[..4 * mine.values()]), mine),
            (&mut x, l),
            &all_rows,
            &pairs,
            true,
        );
    }
    Ok(x)
}

/// The whole sequence of this rank's head group: (q, k, v) and their layouts.
pub(crate) struct Group {
    pub q: Vec<f32>,
    pub k: Vec<f32>,
    pub v: Vec<f32>,
    pub ql: Rows,
    pub kl: Rows,
    pub vl: Rows,
}

impl Group {
    pub fn new(t: &dyn Transport, sp: &Spread, x: &LocalQkv, h: &Heads) -> Result<Group> {
        let r = t.rank();
        let (nq, nk) = (h.q[r].len(), h.kv[r].len());
        let whole = |l: Rows, nh: usize| Rows {
            h: nh,
            ..l.with_rows(sp.n)
        };
        Ok(Group {
            q: to_heads(t, sp, x.q, x.q_rows(), &h.q)?,
            k: to_heads(t, sp, x.k, x.k_rows(), &h.kv)?,
            v: to_heads(t, sp, x.v, x.v_rows(), &h.kv)?,
            ql: whole(x.q_rows(), nq),
            kl: whole(x.k_rows(), nk),
            vl: whole(x.v_rows(), nk),
        })
    }
    fn views(&self) -> Result<[TensorView<'_>; 3]> {
        Ok([
            self.ql.view(&self.q, 0, self.ql.rows)?,
            self.kl.view(&self.k, 0, self.kl.rows)?,
            self.vl.view(&self.v, 0, self.vl.rows)?,
        ])
    }
}

/// Attention of this rank's rows under `mask` by head groups; returns
/// `(out [B, rows, Hq, Dv], lse [B, Hq, rows])` in the local row order.
pub fn ulysses_forward(cp: &Cp, x: &LocalQkv, params: &AttnParams) -> Result<(Vec<f32>, Vec<f32>)> {
    let Cp { t, plan, mask } = *cp;
    x.agree(t, "ulysses", plan, mask)?;
    let sp = Spread::of_plan(plan);
    let h = Heads::new(t, x, "ulysses", ADVICE)?;
    let g = Group::new(t, &sp, x, &h)?;
    let [q, k, v] = g.views()?;
    let res = forward(&q, &k, &v, params, MaskSpec::Expr(&mask.bound))?;
    let nq = g.ql.h;
    let (ol, ll) = (x.o_rows(), x.lse_rows());
    let out = to_seq(
        t,
        &sp,
        &res.out.data.to_f32_vec(),
        Rows {
            h: nq,
            ..ol.with_rows(sp.n)
        },
        ol,
        &h.q,
    )?;
    let lse = to_seq(
        t,
        &sp,
        &res.lse,
        Rows {
            h: nq,
            ..ll.with_rows(sp.n)
        },
        ll,
        &h.q,
    )?;
    Ok((out, lse))
}

/// Gradients of [`ulysses_forward`] (module header): `g.out`, `g.lse` from it; returns
/// `(dq, dk, dv)` in the local row order (f32).
pub fn ulysses_backward(cp: &Cp, x: &LocalQkv, g: &GradIn, params: &AttnParams) -> Result<Grads> {
    let Cp { t, plan, mask } = *cp;
    g.agree(t, "ulysses", x, plan, mask)?;
    let sp = Spread::of_plan(plan);
    let h = Heads::new(t, x, "ulysses", ADVICE)?;
    let grp = Group::new(t, &sp, x, &h)?;
    let [q, k, v] = grp.views()?;
    let (ol, ll) = (x.o_rows(), x.lse_rows());
    let og = Rows {
        h: grp.ql.h,
        ..ol.with_rows(sp.n)
    };
    let o = to_heads(t, &sp, g.out, ol, &h.q)?;
    let d = to_heads(t, &sp, g.dout, ol, &h.q)?;
    let l = to_heads(t, &sp, g.lse, ll, &h.q)?;
    let gr = backward(
        &q,
        &k,
        &v,
        &og.view(&o, 0, sp.n)?,
        &l,
        &og.view(&d, 0, sp.n)?,
        params,
        MaskSpec::Expr(&mask.bound),
        &g.bwd,
    )?;
    let dq = to_seq(t, &sp, &gr.dq.data.to_f32_vec(), grp.ql, x.q_rows(), &h.q)?;
    let dk = to_seq(t, &sp, &gr.dk.data.to_f32_vec(), grp.kl, x.k_rows(), &h.kv)?;
    let dv = to_seq(t, &sp, &gr.dv.data.to_f32_vec(), grp.vl, x.v_rows(), &h.kv)?;
    Ok((dq, dk, dv))
}
