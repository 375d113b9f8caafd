//! A small real LLM for evaluation: fixtures, the GGUF reader, the tokenizers (and the forward).
pub mod fixtures;
pub mod gguf;
pub mod tokenizer;
