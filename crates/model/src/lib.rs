//! The Tessera model series: a Llama-style decoder in libtorch (through `tch`), its
//! named presets from `nano` to `1.4t`, and checkpoints that Hugging Face
//! `transformers` loads unchanged.
//!
//! The key design choice is that one ordered, named parameter list is the model:
//! names are the Hugging Face checkpoint paths, so initialisation, checkpoint I/O,
//! optimizer state and the hash of θ all walk the same list in the same order.
//! [`config`] is pure arithmetic (all the crate is without its `tensors` feature) (parameter counts, FLOPs, memory) that the planner
//! and simulator use without touching a tensor. This crate does not train, tokenize
//! or read data: that is `tessera-train`.

#[cfg(feature = "tensors")]
pub mod checkpoint;
pub mod config;
#[cfg(feature = "tensors")]
pub mod llama;

#[cfg(feature = "tensors")]
pub use checkpoint::CheckpointError;
pub use config::{ConfigError, LlamaConfig, Preset, PRESETS};
#[cfg(feature = "tensors")]
pub use llama::Llama;
