//! Tessera's training engine on one node: tokenized data shards, the inner AdamW
//! loop with warm-up and cosine decay, validation in bits per byte, resumable
//! checkpoints, and sampling.
//!
//! The key design choice is determinism: the data order is a pure function of the
//! seed and the sample index, the optimizer state is plain tensors we checkpoint, and
//! nothing reads a clock to decide what to compute (a minute budget is converted to a
//! step count once and saved). An interrupted run therefore resumes on the exact loss
//! trajectory, and the decentralized rounds built on this loop can recompute any
//! node's work. This crate does not talk to the network or pick what data a node gets.

pub mod adversary;
pub mod anchors;
pub mod data;
pub mod diloco;
pub mod eval;
pub mod optim;
pub mod outer;
pub mod python;
pub mod rng;
pub mod sweep;
pub mod trainer;
pub mod validate;
pub mod worker;

pub use data::{DataError, Dataset, PrepareOptions};
pub use eval::{EvalResult, SampleOptions};
pub use trainer::{Budget, Event, Summary, TrainError, TrainOptions};
