//! Context parallelism: one sequence's attention split across ranks (issue: ring / zigzag,
//! all-gather, pass-Q, Ulysses and their hybrid over one mask-aware schedule).
//!
//! Built so far: the [`Transport`] every scheme speaks (point-to-point and the collectives the
//! schemes need), its in-process implementation [`ThreadTransport`], where ranks are threads
//! (what CI tests), and [`TcpTransport`] ([`launch`]), where ranks are processes joined from
//! torchrun's environment through a TCP rendezvous ([`run_process`]); on GPUs, [`nccl`]
//! (NCCL loaded at run time, a communicator of device-buffer collectives made over a host
//! transport) and [`loopback`] (P ranks as streams of one GPU: the ring pass-KV forward through
//! the CUDA kernel with device copies overlapped with compute, and its plain host reference); the
//! mask-aware placement ([`plan`]: the sequence cut into k P chunks, the work of each chunk
//! counted from the mask's block schedule, chunks assigned to ranks longest-first to equalise
//! it; causal gives zigzag); the mask cut into blocks ([`block`]: any rectangle of the schedule
//! with its shifted element mask, the LSE merge, the rank-local layouts); and the schemes, all
//! on the CPU through the common `forward` / `backward`, forward and backward, for any mask
//! expression:
//! - ring pass-KV over a plan ([`ring`]; zigzag is its causal case), blocks no query chunk needs
//!   skipped, partial results merged by their LSE;
//! - all-gather of K / V ([`gather`]): each query chunk against the whole gathered sequence with
//!   its cut of the schedule; dK / dV reduce-scattered by an all-to-all;
//! - pass-Q ([`passq`]): the keys and values stay, the query chunks that need a rank's keys
//!   travel to it and their partial (out, LSE) come back, merged by LSE at the owner;
//! - Ulysses ([`ulysses`]): all-to-all from sequence shards to head groups, the whole sequence
//!   per head group, all-to-all back; GQA key / value heads sent to (or replicated for) the
//!   ranks whose query heads use them;
//! - USP ([`usp`]): P = U x R, Ulysses inside groups of U ranks and the ring (with its plan
//!   and halo exchange) across the R groups, each group's view a [`Sub`] of the transport; the
//!   degrees chosen by the cost model ([`CostModel::choose_usp`]);
//! - tree decode ([`tree`]): the keys and values sharded across ranks (any lengths, empty
//!   shards too), each rank's partial (out, LSE) from the common forward on its shard, one
//!   all-gather of the partials and the LSE merge on every rank;
//! - linear attention's state passing ([`lasp`], LASP-2 style): each rank's part of the
//!   sequence gives its final state and total log decay, one all-gather, each rank's initial
//!   state the decayed prefix sum of the earlier parts' states, then its chunked forward.
//!
//! Every scheme takes the same local shard (the rank's chunks of the plan, in increasing order)
//! and first checks with one all-gather that every rank has the same shapes, mask and plan.
//! Every blocking call has a timeout: a rank that stalls or leaves gives a clear
//! [`Error::Comm`](crate::error::Error::Comm) on the others, never a hang. A rank whose scheme
//! fails tells its peers why ([`Transport::abort`], done by [`Scheme`]'s switch), so the rank
//! that stalled or left is named on every rank, also on those that were waiting for another.
pub mod block;
pub mod gather;
pub mod lasp;
pub mod launch;
pub mod loopback;
pub mod nccl;
pub mod passq;
pub mod plan;
pub mod ring;
pub mod scheme;
pub mod transport;
pub mod tree;
pub mod ulysses;
pub mod usp;

#[cfg(test)]
mod tests;

pub use block::{Cp, CpMask, GradIn, LocalQkv};
pub use gather::{gather_backward, gather_forward};
pub use lasp::{lasp_backward, lasp_forward};
pub use launch::{join, Job, TcpTransport};
pub use passq::{passq_backward, passq_forward};
pub use plan::{plan, Plan};
pub use ring::{
    ring_backward, ring_forward, zigzag_causal_backward, zigzag_causal_forward, zigzag_shard,
};
pub use scheme::{
    run_process, run_threads, zigzag_plan, CostModel, Estimate, Scheme, Whole, WholeOut,
};
pub use transport::{Counted, Sub, ThreadTransport, Traffic, Transport};
pub use tree::{tree_decode, tree_decode_threads, DecodeOut, DecodeShard};
pub use ulysses::{ulysses_backward, ulysses_forward};
pub use usp::{usp_backward, usp_forward, usp_plan};
