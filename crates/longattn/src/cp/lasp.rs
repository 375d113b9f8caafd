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
//! final state, the same bits on every rank. Single-rank
//! `forward_chunked` and the f64 recurrence are the references (tests).
use super::block::{from_bytes, to_bytes};
use super::transport::Transport;
use crate::error::Result;
use crate::linear::cpu::{final_state_chunked, forward_chunked, CoreOutput};
use crate::linear::{Core, Decay};

/// The kind of a decay, the same on every rank.
fn decay_kind(d: &Decay) -> u64 {
    match d {
        Decay::None => 0,
        Decay::PerHead(_) => 1,
        Decay::Token(_) => 2,
        Decay::Gate(_) => 3,
    }
}

/// Rank r's part of a linear attention over one sequence split across ranks (module header):
/// `core` holds its tokens (`q [B, T_r, H, K]`, `k`, `v`, the decay of those tokens; the
/// sequence's `initial_state` on rank 0 only, none elsewhere; no `cu_seqlens`). Returns its
/// output rows `[B, T_r, H, V]` and the sequence's final state `[B, H, K, V]` (every rank).
pub fn lasp_forward(t: &dyn Transport, core: &Core, chunk: usize) -> Result<CoreOutput> {
    const OP: &str = "cp::lasp_forward";
    let r = t.rank();
    let local = core.validate(OP).map_err(|e| e.to_string()).and_then(|d| {
        if core.cu_seqlens.is_some() {
            Err("cu_seqlens: state passing splits one sequence per batch row; packed sequences are not supported".into())
        } else if r > 0 && core.initial_state.is_some() {
            Err(format!(
                "rank {r} holds an initial state: the sequence's initial state belongs to rank 0 (the others' come from the state passing)"
            ))
        } else {
            Ok(d)
        }
    });
    let words = |d: Option<&crate::linear::CoreDims>| -> Vec<u64> {
        let d = d.copied();
        [
            d.is_some() as u64,
            d.map_or(0, |d| d.batch as u64),
            d.map_or(0, |d| d.h as u64),
            d.map_or(0, |d| d.hk as u64),
            d.map_or(0, |d| d.k as u64),
            d.map_or(0, |d| d.v as u64),
            decay_kind(&core.decay),
        ]
        .to_vec()
    };
    let mine = words(local.as_ref().ok());
    let bytes: Vec<u8> = mine.iter().flat_map(|v| v.to_le_bytes()).collect();
    let mut all = vec![0u8; bytes.len() * t.world()];
    t.all_gather(&bytes, &mut all)?;
    let d = local.map_err(|m| t.err(format!("lasp: {m}")))?;
    const NAMES: [&str; 6] = [
        "batch",
        "heads",
        "key / value heads",
        "key dim",
        "value dim",
        "decay kind (0 none, 1 per head, 2 per token, 3 gate)",
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
    let (b, h, kd, vd, tr) = (d.batch, d.h, d.k, d.v, d.t);
    // lambda_r per (batch row, head, decay width w): the part's total log decay (f64).
    let w = if matches!(core.decay, Decay::Gate(_)) {
        kd
    } else {
        1
    };
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
    // L_r: the part's final state from its initial state (S_0 on rank 0, whose forward is
    // done here as it needs nothing from the others; zero elsewhere). The all-gather of
    // (L_r, lambda_r).
    let first = match r {
        0 => Some(forward_chunked(core, chunk)?),
        _ => None,
    };
    let part = match &first {
        Some(res) => res.state.clone(),
        None => final_state_chunked(core, chunk)?,
    };
    let mut send = to_bytes(&part);
    send.extend(lambda.iter().flat_map(|x| x.to_le_bytes()));
    let mut all = vec![0u8; send.len() * t.world()];
    t.all_gather(&send, &mut all)?;
    // The scan S^(j+1) = diag(e^{lambda_j}) S^(j) + L_j in f64, S^(1) = L_0 (rank 0's final
    // state already holds S_0); this rank's initial state is S^(r).
    let n_state = b * h * kd * vd;
    let mut s = vec![0f64; n_state];
    let mut mine_init = Vec::new();
    for (j, raw) in all.chunks(send.len()).enumerate() {
        if j == r {
            mine_init = s.iter().map(|&x| x as f32).collect();
        }
        let l = from_bytes(&raw[..4 * n_state]);
        let lam: Vec<f64> = raw[4 * n_state..]
            .chunks_exact(8)
            .map(|x| f64::from_le_bytes(x.try_into().expect("8 bytes")))
            .collect();
        for bh in 0..b * h {
            for i in 0..kd {
                let a = lam[bh * w + if w == 1 { 0 } else { i }].exp();
                let row = &mut s[(bh * kd + i) * vd..][..vd];
                let add = &l[(bh * kd + i) * vd..][..vd];
                for (x, &y) in row.iter_mut().zip(add) {
                    *x = a * *x + y as f64;
                }
            }
        }
    }
    let mut res = match first {
        Some(res) => res,
        None => forward_chunked(
            &Core {
                initial_state: Some(&mine_init),
                ..*core
            },
            chunk,
        )?,
    };
    res.state = s.iter().map(|&x| x as f32).collect();
    Ok(res)
}
