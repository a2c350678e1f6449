//! The Tessera model series: a Llama-style decoder in libtorch (through `tch`), its
//! named presets from `nano` to `1.4t`, and checkpoints that Hugging Face
//! `transformers` loads unchanged.
//!
//! The key design choice is that one ordered, named parameter list is the model:
//! names are the Hugging Face checkpoint paths, so initialisation, checkpoint I/O,
//! optimizer state and the hash of θ all walk the same list in the same order.
//! [`config`] (the crate `tessera-model-config`) is pure arithmetic (parameter counts,
//! FLOPs, memory) that the planner, the wire format and the simulator use without
//! touching a tensor. This crate does not train, tokenize
//! or read data: that is `tessera-train`.

pub mod checkpoint;
pub mod llama;

pub use checkpoint::CheckpointError;
pub use llama::Llama;
/// The configuration arithmetic, in its own crate so that crates which must not link
/// libtorch (the wire format, the simulator) can use it.
pub use tessera_model_config as config;
pub use tessera_model_config::{ConfigError, LlamaConfig, Preset, PRESETS};
