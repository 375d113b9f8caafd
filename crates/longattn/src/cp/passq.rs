//! Pass-Q: the keys and values stay where the plan put them, the queries travel to them and the
//! partial results travel back.
//!
//! At step s = 0 .. P-1 rank r sends rank r + s the query chunks of its own that need some key
//! chunk of r + s ([`Plan::exchanged`] with [`Side::Queries`]; nothing when none does), and
//! receives from rank r - s the query chunks of r - s that need r's keys. For each received
//! query chunk a it runs the common `forward` against each of its own key chunks b that a needs
//! (the block's cut of the mask, [`CpMask::rect`]), merges those blocks by their LSE, and sends
//! the chunk's partial `(out, LSE)` back to r - s. The owner merges the partials of each of its
//! query chunks in step order (step 0: its own keys), in f32, per row and head:
//!   lse = log(exp(lse_1) + exp(lse_2)),   out = exp(lse_1 - lse) out_1 + exp(lse_2 - lse) out_2
//! ([`merge_runs`]). A rank receives P - 1 times at most its queries' partial results instead
//! of the other ranks' keys and values: the better trade when K / V are larger than Q (more key /
//! value heads or longer values than query rows carry) or when few query chunks need a rank's
//! keys.
//!
//! Backward ([`passq_backward`]): the query chunks travel with their out, LSE and dO (the whole
//! row's, from the forward); the rank holding the keys runs the common `backward` per block
//! (`partial_keys`: P = exp(S - LSE) and D = rowsum(dO o O) are the whole row's)
//!   dQ_a += dS_ab K_b,   dK_b += dS_ab^T Q_a,   dV_b += P_ab^T dO_a,
//! keeps dK / dV (they stay with the keys, summed in step order) and sends each chunk's dQ part
//! back, where the owner adds it in step order.
use super::block::{
    copy_rows, merge_rows, merge_runs, pack, same_heads, Block, Cp, CpMask, GradIn, LocalQkv, Rows,
    Run, Side,
};
use super::plan::Plan;
use super::ring::{add, recv, send, Grads};
use super::transport::Transport;
use crate::attention::{forward, AttnParams};
use crate::backward::{backward, BackwardParams};
use crate::error::Result;

/// One step's exchange of rows: this rank's packed chunks `mine` (from its local buffer `x`,
/// layout `l`) go to rank `to`; returns the packed chunks `theirs` of rank `from`. At step 0
/// (`to` = `from` = this rank) the rows are packed locally.
#[allow(clippy::too_many_arguments)]
fn swap(
    t: &dyn Transport,
    plan: &Plan,
    (to, from): (usize, usize),
    tag: u32,
    x: &[f32],
    l: Rows,
    mine: &[(usize, usize)],
    theirs: &[(usize, usize)],
) -> Result<Vec<f32>> {
    let r = t.rank();
    if to == r {
        return Ok(pack(plan, r, x, l, theirs));
    }
    send(t, to, tag, &pack(plan, r, x, l, mine))?;
    recv(t, from, tag, l.with_rows(plan.packed_rows(theirs)).values())
}

/// The LSE rows `at .. at + len` of a packed `[B, H, rows]` buffer, contiguous `[B, H, len]`.
fn lse_slice(l: &[f32], ll: Rows, at: usize, len: usize) -> Vec<f32> {
    let mut y = Vec::with_capacity(ll.b * ll.h * len);
    for bh in 0..ll.b * ll.h {
        let base = bh * ll.rows + at;
        y.extend_from_slice(&l[base..base + len]);
    }
    y
}

/// The blocks of one step at the rank holding the keys: each received query chunk a (packed
/// rows `qa .. qa + la`) with each own key chunk b it needs (local rows `kb .. kb + lb`), and the
/// mask's cut.
fn step_blocks<'m>(
    plan: &Plan,
    mask: &'m CpMask,
    rank: usize,
    queries: &[(usize, usize)],
) -> Result<Vec<Block<'m>>> {
    let mut v = Vec::new();
    for &(a, qa) in queries {
        for (b, kb) in plan.chunks_of(rank) {
            if !plan.needs(a, b) {
                continue;
            }
            if let Some(rect) = mask.rect(plan.range(a), plan.range(b))? {
                v.push(Block {
                    qa,
                    la: plan.len(a),
                    kb,
                    lb: plan.len(b),
                    rect,
                });
            }
        }
    }
    Ok(v)
}

/// Bytes the busiest rank receives over a forward: the query rows of other ranks that need its
/// keys (`q_row` bytes each) and the partial results of its own query rows (`o_row` bytes each:
/// out and LSE).
pub fn passq_bytes(plan: &Plan, q_row: u64, o_row: u64) -> u64 {
    let p = plan.world;
    (0..p)
        .map(|r| {
            (1..p)
                .map(|s| {
                    let (to, from) = ((r + s) % p, (r + p - s) % p);
                    let qin = plan.packed_rows(&plan.exchanged(from, r, Side::Queries));
                    let back = plan.packed_rows(&plan.exchanged(r, to, Side::Queries));
                    qin as u64 * q_row + back as u64 * o_row
                })
                .sum::<u64>()
        })
        .max()
        .unwrap_or(0)
}

/// Attention of this rank's query chunks over the whole sequence under `mask`, queries passed
/// to the keys (module header); returns `(out [B, rows, Hq, Dv], lse [B, Hq, rows])` in the
/// local row order.
pub fn passq_forward(cp: &Cp, x: &LocalQkv, params: &AttnParams) -> Result<(Vec<f32>, Vec<f32>)> {
    let Cp { t, plan, mask } = *cp;
    x.agree(t, "pass-Q", plan, mask)?;
    let (p, r) = (t.world(), t.rank());
    let (ql, kl, vl, ol) = (x.q_rows(), x.k_rows(), x.v_rows(), x.o_rows());
    let mut out = vec![0f32; ol.values()];
    let mut lse = vec![f32::NEG_INFINITY; x.lse_rows().values()];
    for step in 0..p {
        let (to, from) = ((r + step) % p, (r + p - step) % p);
        let mine = plan.exchanged(r, to, Side::Queries);
        let theirs = plan.exchanged(from, r, Side::Queries);
        let tag = 4 * step as u32;
        let q = swap(t, plan, (to, from), tag, x.q, ql, &mine, &theirs)?;
        // The partial results of `from`'s chunks against this rank's keys.
        let (pq, po) = (
            ql.with_rows(plan.packed_rows(&theirs)),
            ol.with_rows(plan.packed_rows(&theirs)),
        );
        let mut o = vec![0f32; po.values()];
        let mut l = vec![f32::NEG_INFINITY; x.lse_rows().with_rows(po.rows).values()];
        for Block {
            qa: at,
            la,
            kb,
            lb,
            rect,
        } in step_blocks(plan, mask, r, &theirs)?
        {
            let part = forward(
                &pq.view(&q, at, la)?,
                &kl.view(x.k, kb, lb)?,
                &vl.view(x.v, kb, lb)?,
                params,
                rect.spec(),
            )?;
            merge_rows(
                (&mut o, &mut l),
                (&part.out.data.to_f32_vec(), &part.lse),
                po,
                at,
                la,
            );
        }
        // Back to the owner; this rank's own partials come from `to`.
        let (o2, l2) = if to == r {
            (o, l)
        } else {
            send(t, from, tag + 1, &o)?;
            send(t, from, tag + 2, &l)?;
            let rows = plan.packed_rows(&mine);
            (
                recv(t, to, tag + 1, ol.with_rows(rows).values())?,
                recv(t, to, tag + 2, x.lse_rows().with_rows(rows).values())?,
            )
        };
        let got = if to == r { &theirs } else { &mine };
        let runs: Vec<Run> = plan.packed_runs(r, got).into_iter().map(Run::rev).collect();
        let pl = ol.with_rows(plan.packed_rows(got));
        merge_runs((&mut out, &mut lse), ol, (&o2, &l2), pl, &runs);
    }
    Ok((out, lse))
}

/// Gradients of [`passq_forward`] (module header): `g.out`, `g.lse` from it; returns
/// `(dq, dk, dv)` in the local row order (f32).
pub fn passq_backward(cp: &Cp, x: &LocalQkv, g: &GradIn, params: &AttnParams) -> Result<Grads> {
    let Cp { t, plan, mask } = *cp;
    g.agree(t, "pass-Q", x, plan, mask)?;
    let (p, r) = (t.world(), t.rank());
    let (ql, kl, vl, ol, ll) = (x.q_rows(), x.k_rows(), x.v_rows(), x.o_rows(), x.lse_rows());
    let part_keys = BackwardParams {
        partial_keys: true,
        ..g.bwd
    };
    let mut dq = vec![0f32; ql.values()];
    let (mut dk, mut dv) = (vec![0f32; kl.values()], vec![0f32; vl.values()]);
    for step in 0..p {
        let (to, from) = ((r + step) % p, (r + p - step) % p);
        let mine = plan.exchanged(r, to, Side::Queries);
        let theirs = plan.exchanged(from, r, Side::Queries);
        let tag = 8 * step as u32;
        let ends = (to, from);
        let q = swap(t, plan, ends, tag, x.q, ql, &mine, &theirs)?;
        let o = swap(t, plan, ends, tag + 1, g.out, ol, &mine, &theirs)?;
        let d_o = swap(t, plan, ends, tag + 2, g.dout, ol, &mine, &theirs)?;
        // The LSE's rows are heads-outer: packed through the same runs.
        let l = swap(t, plan, ends, tag + 3, g.lse, ll, &mine, &theirs)?;
        let rows = plan.packed_rows(&theirs);
        let (pq, po, pl) = (ql.with_rows(rows), ol.with_rows(rows), ll.with_rows(rows));
        let mut dq_part = vec![0f32; pq.values()];
        for Block {
            qa: at,
            la,
            kb,
            lb,
            rect,
        } in step_blocks(plan, mask, r, &theirs)?
        {
            let gr = backward(
                &pq.view(&q, at, la)?,
                &kl.view(x.k, kb, lb)?,
                &vl.view(x.v, kb, lb)?,
                &po.view(&o, at, la)?,
                &lse_slice(&l, pl, at, la),
                &po.view(&d_o, at, la)?,
                params,
                rect.spec(),
                &part_keys,
            )?;
            add(&mut dq_part, &gr.dq.data.to_f32_vec(), pq, at, la);
            add(&mut dk, &gr.dk.data.to_f32_vec(), kl, kb, lb);
            add(&mut dv, &gr.dv.data.to_f32_vec(), vl, kb, lb);
        }
        let (back, got) = if to == r {
            (dq_part, &theirs)
        } else {
            send(t, from, tag + 4, &dq_part)?;
            let rows = plan.packed_rows(&mine);
            (recv(t, to, tag + 4, ql.with_rows(rows).values())?, &mine)
        };
        let runs: Vec<Run> = plan.packed_runs(r, got).into_iter().map(Run::rev).collect();
        copy_rows(
            (&back, ql.with_rows(plan.packed_rows(got))),
            (&mut dq, ql),
            &runs,
            &same_heads(ql.h),
            true,
        );
    }
    Ok((dq, dk, dv))
}
