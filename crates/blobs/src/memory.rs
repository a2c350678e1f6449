//! The in-process twin of the data plane: peers share one map, so the layers above
//! can be tested without sockets. Byte counts follow the same rules as the iroh
//! transport (the serving peer counts what it sends, the fetching one what it reads).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::{check_hash, hash_of, BlobError, BlobTransport, PeerAddr, Traffic};

#[derive(Default)]
struct Peer {
    blobs: HashMap<String, Arc<Vec<u8>>>,
    sent: Arc<AtomicU64>,
}

/// The shared "network" the twins publish to.
#[derive(Clone, Default)]
pub struct MemoryNetwork {
    peers: Arc<Mutex<BTreeMap<String, Peer>>>,
}

impl MemoryNetwork {
    pub fn new() -> MemoryNetwork {
        MemoryNetwork::default()
    }

    /// A peer on this network called `name`.
    pub fn peer(&self, name: &str) -> MemoryBlobs {
        let sent = Arc::new(AtomicU64::new(0));
        self.peers.lock().expect("network lock").insert(
            name.to_string(),
            Peer {
                blobs: HashMap::new(),
                sent: sent.clone(),
            },
        );
        MemoryBlobs {
            net: self.clone(),
            name: name.to_string(),
            sent,
            received: AtomicU64::new(0),
        }
    }

    /// Replaces what `peer` serves under `hash` (to test that fetchers verify).
    pub fn tamper(&self, peer: &str, hash: &str, bytes: Vec<u8>) {
        if let Some(p) = self.peers.lock().expect("network lock").get_mut(peer) {
            p.blobs.insert(hash.to_string(), Arc::new(bytes));
        }
    }
}

/// One peer of a [`MemoryNetwork`].
pub struct MemoryBlobs {
    net: MemoryNetwork,
    name: String,
    sent: Arc<AtomicU64>,
    received: AtomicU64,
}

impl BlobTransport for MemoryBlobs {
    fn addr(&self) -> PeerAddr {
        PeerAddr(format!("memory:{}", self.name))
    }

    fn publish(&self, bytes: &[u8]) -> Result<String, BlobError> {
        let hash = hash_of(bytes);
        let mut peers = self.net.peers.lock().expect("network lock");
        let me = peers.get_mut(&self.name).expect("registered peer");
        me.blobs.insert(hash.clone(), Arc::new(bytes.to_vec()));
        Ok(hash)
    }

    /// Memory peers have no IP addresses: an address names a peer of this network.
    fn reachable_at(&self, addr: &PeerAddr, _ip: std::net::IpAddr) -> Result<PeerAddr, BlobError> {
        match addr.0.strip_prefix("memory:") {
            Some(name)
                if self
                    .net
                    .peers
                    .lock()
                    .expect("network lock")
                    .contains_key(name) =>
            {
                Ok(addr.clone())
            }
            _ => Err(BlobError::BadAddr(format!(
                "`{addr}` is no peer of this network"
            ))),
        }
    }

    fn fetch(&self, hash: &str, peers: &[PeerAddr], max_bytes: u64) -> Result<Vec<u8>, BlobError> {
        check_hash(hash)?;
        if peers.is_empty() {
            return Err(BlobError::NoPeers { hash: hash.into() });
        }
        let mut last = String::new();
        for addr in peers {
            let Some(name) = addr.0.strip_prefix("memory:") else {
                return Err(BlobError::BadAddr(format!("`{addr}` is not a memory peer")));
            };
            let served = {
                let net = self.net.peers.lock().expect("network lock");
                net.get(name)
                    .map(|p| (p.blobs.get(hash).cloned(), p.sent.clone()))
            };
            let bytes = match served {
                None => {
                    last = format!("no peer `{name}`");
                    continue;
                }
                Some((None, _)) => {
                    last = format!("peer `{name}` does not have it");
                    continue;
                }
                Some((Some(bytes), sent)) => {
                    if bytes.len() as u64 > max_bytes {
                        return Err(BlobError::TooLarge {
                            hash: hash.into(),
                            max: max_bytes,
                        });
                    }
                    sent.fetch_add(bytes.len() as u64, Ordering::Relaxed);
                    self.received
                        .fetch_add(bytes.len() as u64, Ordering::Relaxed);
                    bytes
                }
            };
            if hash_of(&bytes) != hash {
                last = format!("peer `{name}` sent bytes of another hash");
                continue;
            }
            self.publish(&bytes)?;
            return Ok(bytes.to_vec());
        }
        Err(BlobError::Unavailable {
            hash: hash.into(),
            tried: peers.len(),
            last,
        })
    }

    fn forget(&self, hash: &str) {
        if let Some(me) = self
            .net
            .peers
            .lock()
            .expect("network lock")
            .get_mut(&self.name)
        {
            me.blobs.remove(hash);
        }
    }

    fn traffic(&self) -> Traffic {
        Traffic {
            sent: self.sent.load(Ordering::Relaxed),
            received: self.received.load(Ordering::Relaxed),
            ..Traffic::default()
        }
    }
}
