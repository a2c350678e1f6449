//! Tessera's protocol primitives: node identities (ed25519 key pairs whose public key,
//! in hex, is the node's id everywhere), signatures over canonical byte strings, the
//! run's settings with their shipped defaults ([`RunSpec`]), every body the hub and
//! nodes exchange ([`wire`]), and the limits every decoder checks before it allocates.
//!
//! The key design choice is that everything here is pure: callers pass the time, and
//! the only randomness is key generation from the operating system. This crate does
//! not open sockets or know HTTP; it defines what bytes get signed.

pub mod auth;
pub mod identity;
pub mod ids;
pub mod limits;
pub mod spec;
pub mod wire;

pub use identity::{Identity, IdentityError, PublicKeyHex};
pub use ids::{Hash32, IdError, NodeId};
pub use spec::{AggregationMode, RunSpec, SpecError, TeeMode};
pub use wire::{ErrorBody, ErrorCode, PathTraffic, PeerAddr, Phase, RelayInfo};
