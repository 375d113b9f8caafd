//! USP, the Ulysses x ring hybrid: P = U x R ranks as an R x U grid, rank `g U + i` being
//! member i of Ulysses group g (ranks `g U .. g U + U - 1`) and member g of ring group i (ranks
//! `i, U + i, 2 U + i, ..`).
//!
//! The placement ([`usp_plan`]) is the mask-aware plan of the sequence over the R ring groups
//! ([`plan`]), each chunk of it then cut into U near-equal pieces, piece i going to member i of
//! the group that holds the chunk; so a rank holds the i-th piece of each of its group's chunks,
//! and every scheme's local layout (the rank's chunks of the P-rank plan, in increasing order)
//! still holds. One USP call:
//! 1. Ulysses inside each group (over a [`Sub`] view of the transport): an all-to-all turns the
//!    members' pieces into head groups over the group's whole rows (the ring plan's rows of g,
//!    in its local order): member i gets query heads `i Hq/U .. (i+1) Hq/U` and the key / value
//!    heads they read (GQA as in [`ulysses`](super::ulysses): a group of g query heads inside a
//!    member, one replicated head, or one head per query head);
//! 2. the ring across the R groups (over the ring group's view, with the ring plan and its halo
//!    exchange, [`ring_forward`]): every member i of the R groups runs the same head group, so
//!    the ring group of member i is an ordinary ring over R ranks with Hq / U query heads; its
//!    partial results are merged by LSE inside the ring (per row and head),
//!
//!    lse = log(exp(lse_1) + exp(lse_2)),   out = exp(lse_1 - lse) out_1 + exp(lse_2 - lse) out_2;
//!
//! 3. an all-to-all back inside the group: out and LSE return to the members' pieces.
//!
//! Backward ([`usp_backward`]): Q, K, V, out, dO and LSE go to head groups the same way, the
//! ring's backward runs over the ring group ([`ring_backward`]: dQ stays, the fetched chunks' dK
//! / dV go home), and dQ, dK, dV come back by the all-to-all, a key / value head replicated on
//! several members getting their sum, added in member order.
//!
//! U = 1 is the ring over the plan, U = P is Ulysses (R = 1: the ring has one rank); the
//! communication per rank is the Ulysses all-to-alls over U (about (U - 1) / U^2 of the
//! group's q / k / v / out) plus the ring's halo over R of K / V for Hq / U heads.
use super::block::{Cp, CpMask, GradIn, LocalQkv, Run};
use super::plan::{plan, Plan};
use super::ring::{ring_backward, ring_forward, Grads};
use super::transport::{Sub, Transport};
use super::ulysses::{to_heads, to_seq, Group, Heads, Spread};
use crate::attention::AttnParams;
use crate::error::{Error, Result};

/// What USP suggests when the query heads do not divide by U.
const ADVICE: &str =
    "choose a Ulysses degree U that divides the query heads, or let the cost model pick";

/// The tag salts of the two views (their tags apart from each other's and the whole group's).
const ULYSSES_SALT: u32 = 1;
const RING_SALT: u32 = 2;

fn bad(msg: String) -> Error {
    Error::Param {
        op: "cp plan",
        msg: format!("usp: {msg}"),
    }
}

/// The USP placement of `mask`'s sequence over `world` = U x R ranks (module header): the
/// mask-aware plan over R = world / U ring groups with `per_rank` chunks each, every chunk cut
/// into U pieces. Errors when U does not divide the world or a chunk has fewer than U tokens.
pub fn usp_plan(mask: &CpMask, world: usize, u: usize, per_rank: usize) -> Result<Plan> {
    if u == 0 || world == 0 || !world.is_multiple_of(u) {
        return Err(bad(format!(
            "a Ulysses degree U = {u} must divide the {world} ranks (P = U x R, both >= 1)"
        )));
    }
    let ring = plan(&mask.sched, world / u, per_rank)?;
    let (mut bounds, mut owner) = (vec![0], Vec::new());
    for c in 0..ring.chunks() {
        let ((c0, _), len) = (ring.range(c), ring.len(c));
        if len < u {
            return Err(bad(format!(
                "chunk {c} of the ring plan holds {len} tokens, fewer than the U = {u} ranks of a Ulysses group (needs at least {} tokens for {per_rank} chunks per ring rank)",
                u * per_rank * (world / u)
            )));
        }
        for i in 0..u {
            bounds.push(c0 + (i + 1) * len / u);
            owner.push(ring.owner[c] * u + i);
        }
    }
    Plan::new(&mask.sched, bounds, owner, world)
}

/// The ring plan over the R groups that a USP plan ([`usp_plan`]) was cut from: every U
/// consecutive pieces of one chunk held by the members 0 .. U-1 of one group.
fn ring_of(plan: &Plan, mask: &CpMask, u: usize) -> Result<Plan> {
    let nc = plan.chunks();
    let fits = u >= 1
        && plan.world.is_multiple_of(u)
        && nc.is_multiple_of(u)
        && (0..nc / u).all(|c| {
            let o = plan.owner[c * u];
            o.is_multiple_of(u) && (0..u).all(|i| plan.owner[c * u + i] == o + i)
        });
    if !fits {
        return Err(bad(format!(
            "the plan over {} ranks is not a USP placement for U = {u} (U consecutive pieces of each chunk held by the members of one group; make it with usp_plan)",
            plan.world
        )));
    }
    let bounds = plan.bounds.iter().copied().step_by(u).collect();
    let owner = (0..nc / u).map(|c| plan.owner[c * u] / u).collect();
    Plan::new(&mask.sched, bounds, owner, plan.world / u)
}

/// One rank's place in the grid: its two views, the ring plan, and how its Ulysses group's
/// members' pieces make up the group's rows.
struct Grid<'a> {
    ulysses: Sub<'a>,
    ring: Sub<'a>,
    ring_plan: Plan,
    spread: Spread,
}

impl<'a> Grid<'a> {
    fn new(t: &'a dyn Transport, plan: &Plan, mask: &CpMask, u: usize) -> Result<Grid<'a>> {
        let ring_plan = ring_of(plan, mask, u).map_err(|e| t.err(e.to_string()))?;
        let r_groups = plan.world / u;
        let (g, i) = (t.rank() / u, t.rank() % u);
        let ulysses = Sub::new(
            t,
            (g * u..(g + 1) * u).collect(),
            ULYSSES_SALT,
            "usp ulysses group",
        )?;
        let ring = Sub::new(
            t,
            (0..r_groups).map(|j| j * u + i).collect(),
            RING_SALT,
            "usp ring group",
        )?;
        // Member j's piece of chunk c sits in the group's rows at the chunk's row there plus
        // the piece's offset in the chunk.
        let group = ring_plan.chunks_of(g);
        let runs = (0..u)
            .map(|j| {
                plan.chunks_of(g * u + j)
                    .into_iter()
                    .map(|(piece, at)| {
                        let c = piece / u;
                        let row = group
                            .iter()
                            .find(|x| x.0 == c)
                            .expect("the group's chunk")
                            .1;
                        Run {
                            src: row + plan.bounds[piece] - ring_plan.bounds[c],
                            dst: at,
                            len: plan.len(piece),
                        }
                    })
                    .collect()
            })
            .collect();
        let spread = Spread {
            n: ring_plan.rows_of(g),
            rows: (0..u).map(|j| plan.rows_of(g * u + j)).collect(),
            runs,
        };
        Ok(Grid {
            ulysses,
            ring,
            ring_plan,
            spread,
        })
    }

    /// This rank's head group over its Ulysses group's rows, as the ring's local inputs.
    fn local<'g>(&self, x: &LocalQkv, grp: &'g Group) -> LocalQkv<'g> {
        let (b, _, _, _, d, dv) = x.dims;
        LocalQkv {
            q: &grp.q,
            k: &grp.k,
            v: &grp.v,
            dims: (b, self.spread.n, grp.ql.h, grp.kl.h, d, dv),
        }
    }
}

/// Attention of this rank's rows (its pieces of the USP plan `cp.plan`, [`usp_plan`] with this
/// `u`) under the mask, by Ulysses inside the group and the ring across groups; returns
/// `(out [B, rows, Hq, Dv], lse [B, Hq, rows])` in the local row order.
pub fn usp_forward(
    cp: &Cp,
    u: usize,
    x: &LocalQkv,
    params: &AttnParams,
) -> Result<(Vec<f32>, Vec<f32>)> {
    let Cp { t, plan, mask } = *cp;
    x.agree(t, "usp", plan, mask)?;
    let grid = Grid::new(t, plan, mask, u)?;
    let ut: &dyn Transport = &grid.ulysses;
    let h = Heads::new(ut, x, "usp", ADVICE)?;
    let grp = Group::new(ut, &grid.spread, x, &h)?;
    let lx = grid.local(x, &grp);
    let ring = Cp {
        t: &grid.ring,
        plan: &grid.ring_plan,
        mask,
    };
    let (o, l) = ring_forward(&ring, &lx, params)?;
    let out = to_seq(ut, &grid.spread, &o, lx.o_rows(), x.o_rows(), &h.q)?;
    let lse = to_seq(ut, &grid.spread, &l, lx.lse_rows(), x.lse_rows(), &h.q)?;
    Ok((out, lse))
}

/// Gradients of [`usp_forward`] (module header): `g.out`, `g.lse` from it; returns
/// `(dq, dk, dv)` in the local row order (f32).
pub fn usp_backward(
    cp: &Cp,
    u: usize,
    x: &LocalQkv,
    g: &GradIn,
    params: &AttnParams,
) -> Result<Grads> {
    let Cp { t, plan, mask } = *cp;
    g.agree(t, "usp", x, plan, mask)?;
    let grid = Grid::new(t, plan, mask, u)?;
    let ut: &dyn Transport = &grid.ulysses;
    let h = Heads::new(ut, x, "usp", ADVICE)?;
    let grp = Group::new(ut, &grid.spread, x, &h)?;
    let lx = grid.local(x, &grp);
    let sp = &grid.spread;
    let gi_out = to_heads(ut, sp, g.out, x.o_rows(), &h.q)?;
    let gi_dout = to_heads(ut, sp, g.dout, x.o_rows(), &h.q)?;
    let gi_lse = to_heads(ut, sp, g.lse, x.lse_rows(), &h.q)?;
    let gi = GradIn {
        out: &gi_out,
        lse: &gi_lse,
        dout: &gi_dout,
        bwd: g.bwd,
    };
    let ring = Cp {
        t: &grid.ring,
        plan: &grid.ring_plan,
        mask,
    };
    let (dq, dk, dv) = ring_backward(&ring, &lx, &gi, params)?;
    Ok((
        to_seq(ut, sp, &dq, lx.q_rows(), x.q_rows(), &h.q)?,
        to_seq(ut, sp, &dk, lx.k_rows(), x.k_rows(), &h.kv)?,
        to_seq(ut, sp, &dv, lx.v_rows(), x.v_rows(), &h.kv)?,
    ))
}
