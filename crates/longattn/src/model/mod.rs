//! A small real LLM run by longattn, for evaluating attention methods on real text.
//!
//! - [`fixtures`]: the cache directory of model files and books;
//! - [`gguf`]: the GGUF reader (metadata, tensor table, dequantization);
//! - [`tokenizer`]: byte-level BPE from the GGUF vocabulary and merges;
//! - [`llm`]: config from the file's metadata, f32 weights, the forward pass, greedy decoding;
//! - [`attn`]: the per-layer attention methods (`exact` reference, mask expressions, sparse
//!   specs);
//! - [`sparse`]: dynamic sparse prefill through [`crate::sparse`], with density and recall;
//! - [`ops`]: matmul (the `gemm` crate), RMSNorm, RoPE, activations.
pub mod attn;
pub mod fixtures;
pub mod gguf;
pub mod llm;
pub mod ops;
pub mod sparse;
pub mod tokenizer;

pub use attn::{from_spec, from_spec_with, Attention, ExactAttention, LayerAttn, MaskedAttention};
pub use llm::{Arch, Captured, Config, LoadOptions, Model, WeightSource};
pub use sparse::{LayerStats, SparseAttention, SparseOptions, SparseStats};

#[cfg(test)]
mod tests;
