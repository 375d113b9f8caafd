//! Typed errors. Every message names the operation, the tensor and the shapes involved.
use thiserror::Error;

#[derive(Debug, Error)]
pub enum Error {
    /// A tensor has the wrong rank, shape, or a shape that disagrees with another tensor.
    #[error("{op}: tensor `{tensor}` has shape {got:?}, expected {expected}")]
    Shape {
        op: &'static str,
        tensor: String,
        got: Vec<usize>,
        expected: String,
    },
    /// Tensors of one call have different dtypes, or a dtype is not supported there.
    #[error("{op}: tensor `{tensor}` has dtype {got}, expected {expected}")]
    DType {
        op: &'static str,
        tensor: String,
        got: String,
        expected: String,
    },
    /// A parameter is out of its domain (scale, softcap, tile size, threads, ...).
    #[error("{op}: invalid parameter: {msg}")]
    Param { op: &'static str, msg: String },
    /// A mask expression failed to parse: `pos` is the byte offset of the mistake.
    #[error("mask expression error at position {pos}: {msg}\n  {expr}\n  {caret}")]
    MaskParse {
        pos: usize,
        msg: String,
        expr: String,
        caret: String,
    },
    /// A parsed mask cannot be applied to these shapes (document without ids, neighborhood with
    /// Sq != Sk, grid sizes that do not multiply to the sequence length, ...).
    #[error("mask `{expr}`: {msg}")]
    MaskBind { expr: String, msg: String },
    /// An explicit block mask or schedule is malformed.
    #[error("block schedule: {0}")]
    Schedule(String),
    /// A file could not be read or is malformed (safetensors).
    #[error("{path}: {msg}")]
    File { path: String, msg: String },
    /// Input values are not finite where the caller asked for a check.
    #[error("tensor `{tensor}` holds a non-finite value ({value}) at flat index {index}")]
    NonFinite {
        tensor: String,
        index: usize,
        value: f32,
    },
    /// The CUDA backend is unavailable (no driver, no NVRTC, no device) or a CUDA call failed.
    #[error("cuda {op}: {msg}")]
    Cuda { op: &'static str, msg: String },
    /// Communication between ranks failed: a peer left, timed out, or sent what was not expected.
    #[error("rank {rank} of {world}: {msg}")]
    Comm {
        rank: usize,
        world: usize,
        msg: String,
    },
}

pub type Result<T> = std::result::Result<T, Error>;
