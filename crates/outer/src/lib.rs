//! The outer loop of DiLoCo-style training, over plain `f32`: pseudo-gradient codecs
//! with error feedback, robust aggregators, the Nesterov outer step, and the hash of θ
//! that nodes compare after every step.
//!
//! Nodes, the hub and the simulator all link this one crate, and every honest party
//! must reach the same θ bit for bit. So everything here runs on the CPU, in a fixed
//! order, with no fused multiply-adds and no threads; the only randomness (the start of
//! the low-rank power iteration) comes from a fixed seed. A change to the order of any
//! floating-point operation changes the θ hash of a run, which `state::tests` pins.
//!
//! Untrusted bytes are checked before they are trusted: [`decode`] validates the
//! header, every length, index and scale before allocating, and refuses an update with
//! a non-finite value; [`OuterState::from_bytes`] checks a checkpoint's length first.
//! Both are fuzzed (`fuzz/`, targets `update_*` and `outer_checkpoint`).
//!
//! It holds no tensors (flattening a model into θ is the trainer's job) and does no I/O:
//! callers pass bytes in and take bytes out.

pub mod aggregate;
mod bits;
pub mod codec;
pub mod hash;
pub mod nesterov;
mod rng;
pub mod shard;
pub mod state;

pub use aggregate::{aggregate, combine, update_scales, Aggregator};
pub use codec::{
    decode, decode_for, encode, slice, Codec, CodecError, CodecKind, CHUNK_MAX, RANK_MAX,
    UPDATE_ELEMENTS_MAX, VALUE_BITS_MAX,
};
pub use hash::{theta_digest, theta_hash};
pub use nesterov::Nesterov;
pub use state::OuterState;

/// A name that does not parse as a [`CodecKind`] or an [`Aggregator`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {what} `{name}`; expected {expected}")]
pub struct UnknownName {
    /// What was being named: `codec` or `aggregator`.
    pub what: &'static str,
    /// The name given.
    pub name: String,
    /// The accepted names, as a phrase (`a, b or c`).
    pub expected: &'static str,
}

#[cfg(test)]
pub(crate) mod testing {
    use crate::rng::SplitMix64;

    /// Small seeded values, about the size of one round's pseudo-gradient entries.
    pub fn noise(n: usize, seed: u64) -> Vec<f32> {
        let mut r = SplitMix64::new(seed);
        (0..n).map(|_| (r.next_f64() as f32 - 0.5) * 0.02).collect()
    }
}
