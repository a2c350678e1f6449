//! Tessera's data plane: content-addressed blobs (update blobs, checkpoints) moved
//! peer to peer.
//!
//! Everything above this crate sees one trait, [`BlobTransport`]: publish bytes and get
//! back their blake3 hash, fetch a hash from a list of peers (verified against the hash,
//! bounded in size), forget what is no longer needed, and count the bytes moved. Two
//! implementations:
//!
//! - [`IrohBlobs`]: iroh endpoints and the iroh-blobs protocol. Every transfer is
//!   verified while it streams (BLAKE3 verified streaming), so a peer cannot feed a
//!   node anything but the bytes of the hash it asked for. The endpoint uses the
//!   `Minimal` preset: no address lookup, no port mapper, bound to the address given.
//!   Relays are used only when the run names some ([`RelayInfo`]); then a peer behind
//!   a NAT is reached through the relay first, and directly once hole punching finds
//!   a path. Loopback runs and tests name none, and nothing leaves the machine.
//! - [`RelayServer`]: a run's relay, iroh's own relay server (`iroh-relay`).
//! - [`MemoryBlobs`]: an in-process twin over a shared map, for tests of the layers
//!   above and for the contract tests that both implementations must pass.
//!
//! A peer's address ([`PeerAddr`]) is an opaque string the transport produces and
//! parses; the hub passes it around without looking inside.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

mod iroh_blobs_transport;
mod memory;
mod relay;

pub use iroh_blobs_transport::{IrohBlobs, IrohOptions};
pub use memory::{MemoryBlobs, MemoryNetwork};
pub use relay::{self_signed, RelayServer, RelayServerOptions, RelayStats, RelayTls};

pub use tessera_protocol::limits::PEER_ADDR_BYTES_MAX;

/// Where a blob can be fetched from (the wire type lives in `tessera_protocol`).
pub use tessera_protocol::PeerAddr;

/// A run's relay, as nodes are told of it, and blob traffic split by path.
pub use tessera_protocol::{PathTraffic, RelayInfo};

/// Bytes this transport has moved for blobs, both directions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Traffic {
    /// Blob bytes served to peers.
    pub sent: u64,
    /// Bytes read while fetching blobs from peers (payload and verification hashes).
    pub received: u64,
    /// Bytes on the wire by path (direct or relayed); zero for the memory twin.
    pub paths: PathTraffic,
}

/// Why a blob could not be published or fetched.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BlobError {
    #[error("`{0}` is not a blake3 hash (64 lowercase hex digits)")]
    BadHash(String),
    #[error("peer address is malformed: {0}")]
    BadAddr(String),
    #[error("no peer to fetch blob {hash} from")]
    NoPeers { hash: String },
    #[error("blob {hash} is larger than the {max} bytes allowed")]
    TooLarge { hash: String, max: u64 },
    #[error("blob {hash} could not be fetched from any of {tried} peers; last error: {last}")]
    Unavailable {
        hash: String,
        tried: usize,
        last: String,
    },
    #[error("blob transport failed: {0}")]
    Transport(String),
}

/// Publishing and fetching content-addressed blobs. Blocking: callers in async code
/// run these on a blocking thread.
pub trait BlobTransport: Send + Sync {
    /// This transport's address, for peers to fetch what it publishes.
    fn addr(&self) -> PeerAddr;

    /// Makes `bytes` fetchable by peers; returns their blake3 hash (hex).
    fn publish(&self, bytes: &[u8]) -> Result<String, BlobError>;

    /// Fetches the blob `hash` from the first of `peers` that serves it, refusing to
    /// read more than `max_bytes`. What comes back always hashes to `hash`. The blob is
    /// then also served to others, until forgotten.
    fn fetch(&self, hash: &str, peers: &[PeerAddr], max_bytes: u64) -> Result<Vec<u8>, BlobError>;

    /// Stops serving `hash` and lets its storage go.
    fn forget(&self, hash: &str);

    /// `addr` cut down to the ways of reaching it at `ip`, the address its owner
    /// connected from: only direct addresses at that IP, no relays. A server that dials
    /// an address a client names dials only this, so a client can't make it send
    /// packets to any other host. Refused when nothing is left or `addr` is malformed.
    fn reachable_at(&self, addr: &PeerAddr, ip: std::net::IpAddr) -> Result<PeerAddr, BlobError>;

    /// Blob bytes moved so far.
    fn traffic(&self) -> Traffic;

    /// Keeps a connection to `peer` open for as long as this transport lives,
    /// reconnecting when it drops. Behind a NAT, the mapping a connection opens expires
    /// after 30-120 s of silence; held open (with QUIC keep-alives), it lets `peer`
    /// dial back directly at any time, with or without a relay. A node holds its hub.
    /// The default does nothing (transports without NATs).
    fn hold(&self, peer: &PeerAddr) -> Result<(), BlobError> {
        let _ = peer;
        Ok(())
    }
}

/// Checks that `hash` is a lowercase hex blake3 hash.
pub fn check_hash(hash: &str) -> Result<(), BlobError> {
    if hash.len() == 64 && hash.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        Ok(())
    } else {
        Err(BlobError::BadHash(hash.chars().take(80).collect()))
    }
}

/// The blake3 hash of `bytes`, as the transports name blobs.
pub fn hash_of(bytes: &[u8]) -> String {
    blake3::hash(bytes).to_hex().to_string()
}

/// Paces transfers to a bit rate: each transfer reserves the next free slot on the
/// link, so concurrent transfers share the rate instead of each getting all of it.
#[derive(Debug)]
pub struct Pacer {
    bits_per_second: f64,
    next_free: Mutex<Instant>,
}

impl Pacer {
    pub fn new(megabits_per_second: f64) -> Pacer {
        Pacer {
            bits_per_second: megabits_per_second * 1e6,
            next_free: Mutex::new(Instant::now()),
        }
    }

    /// How long to wait before `bytes` (already moved or about to be) fit the rate.
    pub fn delay(&self, bytes: u64) -> Duration {
        self.delay_at(bytes, Instant::now())
    }

    fn delay_at(&self, bytes: u64, now: Instant) -> Duration {
        let mut next = self.next_free.lock().expect("pacer lock");
        let start = (*next).max(now);
        *next = start + Duration::from_secs_f64(bytes as f64 * 8.0 / self.bits_per_second);
        *next - now
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_are_checked() {
        assert!(check_hash(&hash_of(b"x")).is_ok());
        assert!(check_hash("abc").is_err());
        assert!(check_hash(&hash_of(b"x").to_uppercase()).is_err());
    }

    #[test]
    fn pacer_shares_the_rate() {
        let p = Pacer::new(8.0); // 1 MB/s
        let t0 = *p.next_free.lock().unwrap();
        assert_eq!(p.delay_at(500_000, t0), Duration::from_millis(500));
        // A second transfer at the same moment waits behind the first.
        assert_eq!(p.delay_at(500_000, t0), Duration::from_millis(1000));
        // After an idle second, the link is free again.
        let later = t0 + Duration::from_secs(2);
        assert_eq!(p.delay_at(250_000, later), Duration::from_millis(250));
    }
}
