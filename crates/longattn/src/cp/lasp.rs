//! Linear attention's state passing across ranks (LASP-2 style): the sequence split into
//! contiguous parts, rank r holding tokens `T_0 + .. + T_{r-1} ..` of it (any lengths >= 1), and
//! one all-gather of each part's state instead of a chain of P - 1 sends.
//!
//! The core recurrence ([`crate::linear`]) `S_t = diag(a_t) S_{t-1} + k_t^T v_t` is linear in
//! its state, so a part's final state is its initial state decayed over the part plus what the
//! part adds from zero. For rank r, per (sequence, head), with `L_r` the final state of its part
//! run from a zero state ([`final_state_chunked`]) and `lambda_r = sum_{t in part r} g_t` the
//! part's total log decay (a scalar, or a K-vector for per-key gates; `T_r g_h` for a per-head
//! decay, 0 without decay):
//!   S^(0) = S_0 (the sequence's initial state, held by rank 0; zeros without one),
//!   S^(r+1) = diag(e^{lambda_r}) S^(r) + L_r,
//! that is, the decayed prefix sum of the earlier parts' states
//!   S^(r) = diag(e^{lambda_0 + .. + lambda_{r-1}}) S_0
//!         + sum_{j < r} diag(e^{lambda_{j+1} + .. + lambda_{r-1}}) L_j.
//! Each rank computes `(L_r, lambda_r)` (rank 0 runs its whole forward from S_0 first, and its
//! `L_0` is that forward's final state, S_0 included, so the scan below starts from zero with
//! S^(1) = L_0), one all-gather brings every rank all of them, each rank runs the scan in rank
//! order (f64; every exponent <= 0) to its own initial state S^(r), then the chunked forward of
//! its part from S^(r) ([`forward_chunked`]); the scan's last state S^(P) is the sequence's
//! final state, the same bits on every rank.
//!
//! Backward ([`lasp_backward`]): part r's parameters reach the loss only through its output rows
//! and its final state S^(r+1), so its gradients are the chunked backward of its part from
//! S^(r) given `dO_r` and dS^(r+1), the gradient reaching S^(r+1). That backward's initial-state
//! gradient is linear in the gradient at its end:
//!   dS^(r) = D_r + diag(e^{lambda_r}) dS^(r+1),   D_r = scale sum_{t in part r} diag(e^{B_t}) q_t^T do_t
//! (B_t the cumulative log decay from the part's start; [`initial_state_grad`]), from
//! dS^(P) = the final state's gradient. So each rank computes D_r, one all-gather brings every
//! rank all of them, each runs this reverse scan from the last rank down (f64) to its dS^(r+1),
//! then its part's chunked backward ([`backward_chunked`]). The forward's scan is recomputed
//! first (its all-gather again) for S^(r). The gradient of the sequence's initial state is the
//! scan's dS^(0), on every rank. Single-rank `forward_chunked` / `backward_chunked` and the f64
//! recurrence (forward and BPTT backward) are the references (tests).
use super::block::{from_bytes, to_bytes};
use super::transport::Transport;
use crate::error::Result;
use crate::linear::cpu::{
    backward_chunked, final_state_chunked, forward_chunked, initial_state_grad, CoreGrads,
    CoreOutput,
};
use crate::linear::{Core, CoreDims, Decay};

/// The kind of a decay, the same on every rank.
fn decay_kind(d: &Decay) -> u64 {
    match d {
        Decay::None => 0,
        Decay::PerHead(_) => 1,
        Decay::Token(_) => 2,
        Decay::Gate(_) => 3,
    }
}

/// Checks this rank's part, then (one all-gather of a few words) that every rank has the same
/// shapes and decay kind, and, in a backward, whether a final-state gradient is given.
fn agree(
    t: &dyn Transport,
    op: &'static str,
    core: &Core,
    d_final: Option<Option<&[f32]>>,
) -> Result<CoreDims> {
    let r = t.rank();
    let local = core.validate(op).map_err(|e| e.to_string()).and_then(|d| {
        if core.cu_seqlens.is_some() {
            Err("cu_seqlens: state passing splits one sequence per batch row; packed sequences are not supported".into())
        } else if r > 0 && core.initial_state.is_some() {
            Err(format!(
                "rank {r} holds an initial state: the sequence's initial state belongs to rank 0 (the others' come from the state passing)"
            ))
        } else if let Some(f) = d_final.flatten().filter(|f| f.len() != d.state_len()) {
            Err(format!(
                "the final state's gradient holds {} values, expected [B {}, H {}, K {}, V {}] = {}",
                f.len(),
                d.batch,
                d.h,
                d.k,
                d.v,
                d.state_len()
            ))
        } else {
            Ok(d)
        }
    });
    let d = local.as_ref().ok();
    let mine: Vec<u64> = vec![
        d.is_some() as u64,
        d.map_or(0, |d| d.batch as u64),
        d.map_or(0, |d| d.h as u64),
        d.map_or(0, |d| d.hk as u64),
        d.map_or(0, |d| d.k as u64),
        d.map_or(0, |d| d.v as u64),
        decay_kind(&core.decay),
        d_final.is_some_and(|f| f.is_some()) as u64,
    ];
    let bytes: Vec<u8> = mine.iter().flat_map(|v| v.to_le_bytes()).collect();
    let mut all = vec![0u8; bytes.len() * t.world()];
    t.all_gather(&bytes, &mut all)?;
    let d = local.map_err(|m| t.err(format!("lasp: {m}")))?;
    const NAMES: [&str; 7] = [
        "batch",
        "heads",
        "key / value heads",
        "key dim",
        "value dim",
        "decay kind (0 none, 1 per head, 2 per token, 3 gate)",
        "a final state gradient (1 yes, 0 no)",
    ];
    for (o, theirs) in all.chunks(bytes.len()).enumerate() {
        let word = |i: usize| u64::from_le_bytes(theirs[8 * i..8 * i + 8].try_into().expect("8"));
        if word(0) == 0 {
            return Err(t.err(format!(
                "lasp: rank {o} refused its inputs (its own error names the problem)"
            )));
        }
        if let Some(i) = (1..mine.len()).find(|&i| word(i) != mine[i]) {
            return Err(t.err(format!(
                "lasp: rank {o} has {} {}, this rank {}: every rank must pass the same shapes and decay",
                NAMES[i - 1],
                word(i),
                mine[i]
            )));
        }
    }
    Ok(d)
}

/// The forward's state passing: every rank's total log decays and this rank's initial state.
struct Passing {
    /// `lambda[j]`: rank j's total log decay `[B, H, w]`.
    lambda: Vec<Vec<f64>>,
    /// Decay width w (K for gates, 1 otherwise).
    w: usize,
    /// S^(r), this rank's initial state `[B, H, K, V]`.
    init: Vec<f32>,
    /// S^(P), the sequence's final state.
    last: Vec<f32>,
    /// Rank 0's forward (run before the all-gather: it needs nothing from the others).
    first: Option<CoreOutput>,
}

/// `x[bh, i, :] <- e^{lam[bh, i or 0]} x[bh, i, :] + add[bh, i, :]` over a state `[B H, K, V]`
/// (f64), the step of both scans.
fn decay_add(x: &mut [f64], lam: &[f64], w: usize, add: &[f32], (kd, vd): (usize, usize)) {
    for (bh, lam) in lam.chunks(w).enumerate() {
        for i in 0..kd {
            let a = lam[if w == 1 { 0 } else { i }].exp();
            let at = (bh * kd + i) * vd;
            for (y, &z) in x[at..at + vd].iter_mut().zip(&add[at..at + vd]) {
                *y = a * *y + z as f64;
            }
        }
    }
}

fn f64s(x: &[u8]) -> Vec<f64> {
    x.chunks_exact(8)
        .map(|x| f64::from_le_bytes(x.try_into().expect("8 bytes")))
        .collect()
}

/// The forward's scan (module header): `(L_r, lambda_r)` of this rank, one all-gather, and
/// S^(j+1) = diag(e^{lambda_j}) S^(j) + L_j from zero with S^(1) = L_0 (rank 0's final state
/// already holds S_0), in f64, in rank order. With `outputs` rank 0 runs its whole forward here
/// (its final state is its `L_0`).
fn pass(
    t: &dyn Transport,
    core: &Core,
    d: &CoreDims,
    chunk: usize,
    outputs: bool,
) -> Result<Passing> {
    let r = t.rank();
    let (b, h, kd, vd, tr) = (d.batch, d.h, d.k, d.v, d.t);
    let w = if matches!(core.decay, Decay::Gate(_)) {
        kd
    } else {
        1
    };
    // lambda_r per (batch row, head, decay width): the part's total log decay (f64).
    let mut lambda = vec![0f64; b * h * w];
    for bi in 0..b {
        for hi in 0..h {
            for i in 0..w {
                lambda[(bi * h + hi) * w + i] = match core.decay {
                    Decay::None => 0.0,
                    Decay::PerHead(g) => tr as f64 * g[hi] as f64,
                    Decay::Token(g) => (0..tr).map(|x| g[(bi * tr + x) * h + hi] as f64).sum(),
                    Decay::Gate(g) => (0..tr)
                        .map(|x| g[((bi * tr + x) * h + hi) * kd + i] as f64)
                        .sum(),
                };
            }
        }
    }
    let first = match r == 0 && outputs {
        true => Some(forward_chunked(core, chunk)?),
        false => None,
    };
    let part = match &first {
        Some(res) => res.state.clone(),
        None => final_state_chunked(core, chunk)?,
    };
    let n_state = d.state_len();
    let mut send = to_bytes(&part);
    send.extend(lambda.iter().flat_map(|x| x.to_le_bytes()));
    let mut all = vec![0u8; send.len() * t.world()];
    t.all_gather(&send, &mut all)?;
    let mut s = vec![0f64; n_state];
    let (mut init, mut lambdas) = (Vec::new(), Vec::new());
    for (j, raw) in all.chunks(send.len()).enumerate() {
        if j == r {
            init = s.iter().map(|&x| x as f32).collect();
        }
        let lam = f64s(&raw[4 * n_state..]);
        decay_add(&mut s, &lam, w, &from_bytes(&raw[..4 * n_state]), (kd, vd));
        lambdas.push(lam);
    }
    Ok(Passing {
        lambda: lambdas,
        w,
        init,
        last: s.iter().map(|&x| x as f32).collect(),
        first,
    })
}

/// Rank r's part of a linear attention over one sequence split across ranks (module header):
/// `core` holds its tokens (`q [B, T_r, H, K]`, `k`, `v`, the decay of those tokens; the
/// sequence's `initial_state` on rank 0 only, none elsewhere; no `cu_seqlens`). Returns its
/// output rows `[B, T_r, H, V]` and the sequence's final state `[B, H, K, V]` (every rank).
pub fn lasp_forward(t: &dyn Transport, core: &Core, chunk: usize) -> Result<CoreOutput> {
    let d = agree(t, "cp::lasp_forward", core, None)?;
    let ps = pass(t, core, &d, chunk, true)?;
    let mut res = match ps.first {
        Some(res) => res,
        None => forward_chunked(
            &Core {
                initial_state: Some(&ps.init),
                ..*core
            },
            chunk,
        )?,
    };
    res.state = ps.last;
    Ok(res)
}

/// Gradients of [`lasp_forward`] (module header): `dout [B, T_r, H, V]` this rank's output
/// rows' gradient, `d_final_state [B, H, K, V]` the sequence's final state's (the same on every
/// rank, or none on every rank). Returns this rank's `dq`, `dk`, `dv`, `dg` (its tokens) and the
/// gradient of the sequence's initial state (every rank).
pub fn lasp_backward(
    t: &dyn Transport,
    core: &Core,
    dout: &[f32],
    d_final_state: Option<&[f32]>,
    chunk: usize,
) -> Result<CoreGrads> {
    let d = agree(t, "cp::lasp_backward", core, Some(d_final_state))?;
    let ps = pass(t, core, &d, chunk, false)?;
    let (r, p, n_state) = (t.rank(), t.world(), d.state_len());
    let mine = initial_state_grad(core, dout)?;
    let mut all = vec![0u8; 4 * n_state * p];
    t.all_gather(&to_bytes(&mine), &mut all)?;
    // dS^(j) = D_j + diag(e^{lambda_j}) dS^(j+1) from dS^(P), in f64, from the last rank down.
    let mut ds: Vec<f64> = match d_final_state {
        Some(f) => f.iter().map(|&x| x as f64).collect(),
        None => vec![0.0; n_state],
    };
    let mut end = Vec::new();
    for j in (0..p).rev() {
        if j == r {
            end = ds.iter().map(|&x| x as f32).collect();
        }
        decay_add(
            &mut ds,
            &ps.lambda[j],
            ps.w,
            &from_bytes(&all[4 * n_state * j..4 * n_state * (j + 1)]),
            (d.k, d.v),
        );
    }
    // (rank 0's S^(0) is its own initial state; the scan's zeros when it has none)
    let part = Core {
        initial_state: Some(core.initial_state.unwrap_or(&ps.init)),
        ..*core
    };
    let mut g = backward_chunked(&part, dout, Some(&end), chunk)?;
    g.d_initial_state = ds.iter().map(|&x| x as f32).collect();
    Ok(g)
}
