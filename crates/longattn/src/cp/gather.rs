//! All-gather of keys and values: every rank gathers the whole sequence's K and V (one
//! all-gather each) and runs each of its query chunks a against it, with the mask's cut for the
//! rectangle a x [0, n) ([`CpMask::rect`]: only the key tiles the mask schedules for a are
//! loaded). Each query row sees all its keys in one call, so no merge is needed: the call's out
//! and LSE are the row's.
//! Backward: each query chunk's gradients from the common `backward` against the whole K / V
//!   dQ_a = sum_j dS_aj K_j,   dK_j = sum_a dS_aj^T Q_a,   dV_j = sum_a P_aj^T dO_a,
//! dK / dV summed over the rank's chunks into whole-sequence buffers, then reduce-scattered: an
//! all-to-all sends each rank the rows of its chunks, summed in rank order (the same bits
//! whatever the timing). Best for GQA (small K / V) and small P; memory: the whole K / V on
//! every rank.
use super::block::{
    blocks, copy_rows, from_bytes, same_heads, to_bytes, Block, Cp, GradIn, Keys, LocalQkv, Rows,
    Run,
};
use super::plan::Plan;
use super::ring::Grads;
use super::transport::Transport;
use crate::attention::{forward, AttnParams};
use crate::backward::backward;
use crate::error::Result;
use crate::tensor::TensorView;

/// Every rank's rows of a sharded tensor (layout `l` with this rank's rows) gathered into the
/// whole sequence `[B, n, H, W]`, in sequence order, on every rank. Each rank's part is padded to
/// the plan's most rows (the all-gather takes equal parts).
fn all_gather_rows(t: &dyn Transport, plan: &Plan, x: &[f32], l: Rows) -> Result<Vec<f32>> {
    let part = l.with_rows(plan.max_rows()).values();
    let mut send = to_bytes(x);
    send.resize(4 * part, 0);
    let mut all = vec![0u8; send.len() * t.world()];
    t.all_gather(&send, &mut all)?;
    let whole = l.with_rows(plan.n);
    let mut y = vec![0f32; whole.values()];
    for (o, raw) in all.chunks(send.len()).enumerate() {
        let ol = l.with_rows(plan.rows_of(o));
        let runs: Vec<Run> = plan.runs_of(o).into_iter().map(Run::rev).collect();
        let theirs = from_bytes(&raw[..4 * ol.values()]);
        copy_rows(
            (&theirs, ol),
            (&mut y, whole),
            &runs,
            &same_heads(l.h),
            false,
        );
    }
    Ok(y)
}

/// The sum over ranks of whole-sequence buffers `y` (layout `whole`, n rows), each rank keeping
/// the rows of its chunks: an all-to-all of the rows each rank owns, summed in rank order.
fn reduce_scatter_rows(t: &dyn Transport, plan: &Plan, y: &[f32], whole: Rows) -> Result<Vec<f32>> {
    let (p, r) = (t.world(), t.rank());
    let part = whole.with_rows(plan.max_rows());
    let mut send = vec![0f32; p * part.values()];
    for (o, buf) in send.chunks_mut(part.values()).enumerate() {
        let ol = whole.with_rows(plan.rows_of(o));
        copy_rows(
            (y, whole),
            (buf, ol),
            &plan.runs_of(o),
            &same_heads(whole.h),
            false,
        );
    }
    let mut recv = vec![0u8; 4 * send.len()];
    t.all_to_all(&to_bytes(&send), &mut recv)?;
    let mine = whole.with_rows(plan.rows_of(r)).values();
    let mut out = vec![0f32; mine];
    for raw in recv.chunks(4 * part.values()) {
        for (o, v) in out.iter_mut().zip(from_bytes(&raw[..4 * mine])) {
            *o += v;
        }
    }
    Ok(out)
}

/// Whole-sequence K and V views over gathered buffers.
fn whole_kv<'a>(
    x: &LocalQkv,
    plan: &Plan,
    k: &'a [f32],
    v: &'a [f32],
) -> Result<(TensorView<'a>, TensorView<'a>)> {
    let (b, _, _, hk, d, dv) = x.dims;
    Ok((
        TensorView::contiguous(k, [b, plan.n, hk, d])?,
        TensorView::contiguous(v, [b, plan.n, hk, dv])?,
    ))
}

/// Attention of this rank's query chunks over the whole sequence under `mask`, K / V
/// all-gathered; returns `(out [B, rows, Hq, Dv], lse [B, Hq, rows])` in the local row order.
pub fn gather_forward(cp: &Cp, x: &LocalQkv, params: &AttnParams) -> Result<(Vec<f32>, Vec<f32>)> {
    let Cp { t, plan, mask } = *cp;
    x.agree(t, "all-gather", plan, mask)?;
    let k = all_gather_rows(t, plan, x.k, x.k_rows())?;
    let v = all_gather_rows(t, plan, x.v, x.v_rows())?;
    let (kw, vw) = whole_kv(x, plan, &k, &v)?;
    let (ql, ol, ll) = (x.q_rows(), x.o_rows(), x.lse_rows());
    let mut out = vec![0f32; ol.values()];
    let mut lse = vec![f32::NEG_INFINITY; ll.values()];
    for Block { qa, la, rect, .. } in blocks(plan, mask, t.rank(), Keys::Whole)? {
        let part = forward(&ql.view(x.q, qa, la)?, &kw, &vw, params, rect.spec())?;
        // The whole row's result: copied into the chunk's rows.
        let run = [Run {
            src: 0,
            dst: qa,
            len: la,
        }];
        let heads = same_heads(ol.h);
        copy_rows(
            (&part.out.data.to_f32_vec(), ol.with_rows(la)),
            (&mut out, ol),
            &run,
            &heads,
            false,
        );
        copy_rows(
            (&part.lse, ll.with_rows(la)),
            (&mut lse, ll),
            &run,
            &heads,
            false,
        );
    }
    Ok((out, lse))
}

/// Gradients of [`gather_forward`] (module header): `g.out`, `g.lse` from it; returns
/// `(dq, dk, dv)` in the local row order (f32).
pub fn gather_backward(cp: &Cp, x: &LocalQkv, g: &GradIn, params: &AttnParams) -> Result<Grads> {
    let Cp { t, plan, mask } = *cp;
    g.agree(t, "all-gather", x, plan, mask)?;
    let k = all_gather_rows(t, plan, x.k, x.k_rows())?;
    let v = all_gather_rows(t, plan, x.v, x.v_rows())?;
    let (kw, vw) = whole_kv(x, plan, &k, &v)?;
    let (ql, ol) = (x.q_rows(), x.o_rows());
    let (kl, vl) = (x.k_rows().with_rows(plan.n), x.v_rows().with_rows(plan.n));
    let mut dq = vec![0f32; ql.values()];
    let (mut dk, mut dv) = (vec![0f32; kl.values()], vec![0f32; vl.values()]);
    for Block { qa, la, rect, .. } in blocks(plan, mask, t.rank(), Keys::Whole)? {
        let gr = backward(
            &ql.view(x.q, qa, la)?,
            &kw,
            &vw,
            &ol.view(g.out, qa, la)?,
            &g.lse_rows(x, qa, la),
            &ol.view(g.dout, qa, la)?,
            params,
            rect.spec(),
            &g.bwd,
        )?;
        let run = [Run {
            src: 0,
            dst: qa,
            len: la,
        }];
        copy_rows(
            (&gr.dq.data.to_f32_vec(), ql.with_rows(la)),
            (&mut dq, ql),
            &run,
            &same_heads(ql.h),
            false,
        );
        for (acc, part) in [
            (&mut dk, gr.dk.data.to_f32_vec()),
            (&mut dv, gr.dv.data.to_f32_vec()),
        ] {
            acc.iter_mut().zip(part).for_each(|(a, p)| *a += p);
        }
    }
    let dk = reduce_scatter_rows(t, plan, &dk, kl)?;
    let dv = reduce_scatter_rows(t, plan, &dv, vl)?;
    Ok((dq, dk, dv))
}
