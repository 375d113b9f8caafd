//! Context parallelism: one sequence's attention split across ranks (issue: ring / zigzag,
//! all-gather, pass-Q, Ulysses and their hybrid over one mask-aware schedule).
//!
//! Built so far: the [`Transport`] every scheme will speak (point-to-point and the collectives
//! the schemes need) and its in-process implementation [`ThreadTransport`], where ranks are
//! threads (what CI tests; the NCCL and one-GPU loopback transports implement the same trait);
//! the first scheme, ring pass-KV with zigzag placement for a causal mask over the CPU forward
//! and backward ([`ring`]), merging partial results by their LSE.
//! Every blocking call has a timeout: a rank that stalls or leaves gives a clear
//! [`Error::Comm`](crate::error::Error::Comm) on the others, never a hang.
pub mod ring;
pub mod transport;

pub use ring::{zigzag_causal_backward, zigzag_causal_forward, zigzag_shard, LocalQkv};
pub use transport::{ThreadTransport, Transport};
