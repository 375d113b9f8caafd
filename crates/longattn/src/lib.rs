//! longattn: a long-context attention engine.
//!
//! The path of data is `mask expression -> block schedule -> kernel`:
//! - [`mask`] parses expressions such as `causal & (sinks(4) | window(1024,0))`, binds them to
//!   sequence lengths (and document ids), and compiles them into a [`mask::BlockSchedule`]: for each
//!   (batch, head, query tile) the key tiles that hold any allowed pair, marked Full or Partial.
//! - [`cpu`] is the fused, tiled forward kernel (online softmax) that consumes the schedule.
//! - [`backward`] is the gradient pass (dQ, dK, dV) through the same schedule.
//! - [`reference`] is the f64 oracle every fast path is tested against.
//! - [`tensor`] holds the views (`[batch, seq, heads, dim]`, any strides, f32/bf16/f16).

pub mod api;
pub mod attention;
pub mod backward;
pub mod cp;
pub mod cpu;
pub mod cuda;
pub mod error;
pub mod io;
pub mod kv;
pub mod linear;
pub mod mask;
pub mod model;
pub mod reference;
pub mod sparse;
pub mod tensor;
pub mod testing;

pub use attention::{forward, forward_with_map, AttnMap, AttnOutput, AttnParams, MaskSpec};
pub use backward::{backward, BackwardParams, Grads};
pub use error::{Error, Result};
pub use sparse::{Selection, SparseSpec};
pub use tensor::{DType, Element, Tensor, TensorView};
