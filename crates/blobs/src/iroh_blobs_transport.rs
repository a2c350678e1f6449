//! [`BlobTransport`] over iroh and iroh-blobs.
//!
//! Each transport owns a small tokio runtime, an iroh endpoint bound to the address it
//! is given, an in-memory iroh-blobs store, and a router that serves the store to
//! peers. Published and fetched blobs are held under a named tag until forgotten; the
//! store's garbage collector then frees them. Serving is paced by the upload limit
//! through iroh-blobs' throttle events (which also count the bytes served); fetching
//! is paced by the download limit.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bao_tree::io::BaoContentItem;
use iroh::endpoint::presets;
use iroh::protocol::Router;
use iroh::{Endpoint, EndpointAddr, RelayMode, SecretKey};
use iroh_blobs::get::request::{get_blob, GetBlobItem};
use iroh_blobs::provider::events::{EventMask, EventSender, ProviderMessage, ThrottleMode};
use iroh_blobs::store::mem::{MemStore, Options};
use iroh_blobs::store::GcConfig;
use iroh_blobs::{BlobsProtocol, Hash, ALPN};
use n0_future::StreamExt;

use crate::{
    check_hash, hash_of, BlobError, BlobTransport, Pacer, PeerAddr, Traffic, PEER_ADDR_BYTES_MAX,
};

/// How an [`IrohBlobs`] binds and behaves.
#[derive(Debug, Clone)]
pub struct IrohOptions {
    /// The UDP socket address to bind (`127.0.0.1:0` for loopback runs).
    pub bind: SocketAddr,
    /// The endpoint's ed25519 secret key (a node uses its identity key, so its endpoint
    /// id is its node id); random when absent.
    pub secret_key: Option<[u8; 32]>,
    /// Upload and download limit, each way, in megabits per second.
    pub bandwidth_mbps: Option<f64>,
    /// How long one attempt to fetch a blob from one peer may take.
    pub fetch_timeout: Duration,
    /// How long to wait for a peer to answer at all.
    pub connect_timeout: Duration,
    /// Head start each peer in a fetch's list gets before the next one is tried too.
    pub stagger: Duration,
}

impl IrohOptions {
    /// Loopback only, random key, no rate limit.
    pub fn loopback() -> IrohOptions {
        IrohOptions {
            bind: SocketAddr::from(([127, 0, 0, 1], 0)),
            secret_key: None,
            bandwidth_mbps: None,
            fetch_timeout: Duration::from_secs(120),
            connect_timeout: Duration::from_secs(5),
            stagger: Duration::from_millis(500),
        }
    }
}

/// The iroh-blobs data plane.
pub struct IrohBlobs {
    // Dropped in this order: the router (stops serving) before the runtime.
    router: Router,
    store: MemStore,
    endpoint: Endpoint,
    sent: Arc<AtomicU64>,
    received: AtomicU64,
    download: Option<Pacer>,
    fetch_timeout: Duration,
    connect_timeout: Duration,
    stagger: Duration,
    /// Always `Some` until dropped (then shut down without blocking).
    rt: Option<tokio::runtime::Runtime>,
}

fn tag_name(hash: &str) -> String {
    format!("tessera/{hash}")
}

fn to_iroh_hash(hash: &str) -> Result<Hash, BlobError> {
    check_hash(hash)?;
    let h = blake3::Hash::from_hex(hash).map_err(|_| BlobError::BadHash(hash.into()))?;
    Ok(Hash::from_bytes(*h.as_bytes()))
}

fn transport(e: impl std::fmt::Display) -> BlobError {
    BlobError::Transport(e.to_string())
}

/// Answers iroh-blobs' throttle requests: counts each chunk served and, with an upload
/// limit, holds it back until it fits the rate.
fn throttle_events(sent: Arc<AtomicU64>, upload: Option<Arc<Pacer>>) -> EventSender {
    let mask = EventMask {
        throttle: ThrottleMode::Intercept,
        ..EventMask::DEFAULT
    };
    let (tx, mut rx) = EventSender::channel(64, mask);
    tokio::spawn(async move {
        while let Some(msg) = rx.recv().await {
            if let ProviderMessage::Throttle(msg) = msg {
                let size = msg.inner.size;
                sent.fetch_add(size, Ordering::Relaxed);
                let delay = upload.as_ref().map(|p| p.delay(size));
                tokio::spawn(async move {
                    if let Some(d) = delay {
                        tokio::time::sleep(d).await;
                    }
                    msg.tx.send(Ok(())).await.ok();
                });
            }
        }
    });
    tx
}

/// Runs `fut` to completion on `rt`. From inside another runtime (an async caller
/// such as the hub's handlers) blocking that runtime's thread in `block_on` is not
/// allowed, so the future is driven from a short-lived thread of its own instead.
fn block_on<F: std::future::Future + Send>(rt: &tokio::runtime::Runtime, fut: F) -> F::Output
where
    F::Output: Send,
{
    if tokio::runtime::Handle::try_current().is_err() {
        rt.block_on(fut)
    } else {
        std::thread::scope(|s| {
            s.spawn(|| rt.block_on(fut))
                .join()
                .expect("blob transport thread panicked")
        })
    }
}

impl IrohBlobs {
    /// Binds an endpoint and starts serving.
    pub fn bind(opts: IrohOptions) -> Result<IrohBlobs, BlobError> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("tessera-blobs")
            .enable_all()
            .build()
            .map_err(transport)?;
        let sent = Arc::new(AtomicU64::new(0));
        let upload = opts.bandwidth_mbps.map(|m| Arc::new(Pacer::new(m)));
        let (endpoint, store, router) = block_on(&rt, async {
            // Minimal preset: a crypto provider and nothing else — no relays, no address
            // lookup; the crate is built without the port mapper.
            let mut builder = Endpoint::builder(presets::Minimal)
                .relay_mode(RelayMode::Disabled)
                .clear_ip_transports()
                .bind_addr(opts.bind)
                .map_err(transport)?;
            if let Some(key) = opts.secret_key {
                builder = builder.secret_key(SecretKey::from_bytes(&key));
            }
            let endpoint = builder.bind().await.map_err(transport)?;
            let store = MemStore::new_with_opts(Options {
                gc_config: Some(GcConfig {
                    interval: Duration::from_secs(2),
                    add_protected: None,
                }),
            });
            let events = throttle_events(sent.clone(), upload);
            let blobs = BlobsProtocol::new(&store, Some(events));
            let router = Router::builder(endpoint.clone())
                .accept(ALPN, blobs)
                .spawn();
            Ok::<_, BlobError>((endpoint, store, router))
        })?;
        Ok(IrohBlobs {
            router,
            store,
            endpoint,
            sent,
            received: AtomicU64::new(0),
            download: opts.bandwidth_mbps.map(Pacer::new),
            fetch_timeout: opts.fetch_timeout,
            connect_timeout: opts.connect_timeout,
            stagger: opts.stagger,
            rt: Some(rt),
        })
    }

    fn rt(&self) -> &tokio::runtime::Runtime {
        self.rt.as_ref().expect("runtime lives until drop")
    }

    /// The socket addresses the endpoint listens on.
    pub fn bound_sockets(&self) -> Vec<SocketAddr> {
        self.endpoint.bound_sockets()
    }

    fn endpoint_addr(&self) -> EndpointAddr {
        let mut addr = self.endpoint.addr();
        if addr.ip_addrs().next().is_none() {
            for s in self.endpoint.bound_sockets() {
                addr = addr.with_ip_addr(s);
            }
        }
        addr
    }

    /// One attempt at one peer: connect, stream the blob verified against `hash`, stop
    /// as soon as it would exceed `max_bytes`.
    async fn fetch_one(
        &self,
        hash: Hash,
        peer: EndpointAddr,
        max_bytes: u64,
    ) -> Result<(Vec<u8>, u64), BlobError> {
        let conn = tokio::time::timeout(self.connect_timeout, self.endpoint.connect(peer, ALPN))
            .await
            .map_err(|_| transport("peer did not answer"))?
            .map_err(transport)?;
        let mut items = get_blob(conn.clone(), hash);
        let mut data = Vec::new();
        let stats = loop {
            match items.next().await {
                Some(GetBlobItem::Item(BaoContentItem::Leaf(leaf))) => {
                    if leaf.offset != data.len() as u64 {
                        return Err(transport("leaves out of order"));
                    }
                    if (data.len() + leaf.data.len()) as u64 > max_bytes {
                        conn.close(0u32.into(), b"too large");
                        return Err(BlobError::TooLarge {
                            hash: hash.to_hex(),
                            max: max_bytes,
                        });
                    }
                    data.extend_from_slice(&leaf.data);
                }
                Some(GetBlobItem::Item(_)) => {}
                Some(GetBlobItem::Done(stats)) => break stats,
                Some(GetBlobItem::Error(e)) => return Err(transport(e)),
                None => return Err(transport("stream ended early")),
            }
        };
        conn.close(0u32.into(), b"done");
        Ok((data, stats.total_bytes_read()))
    }
}

/// Most direct addresses a peer address keeps when cut down to one IP.
const PEER_DIRECT_ADDRS_MAX: usize = 8;

fn parse_addr(peer: &PeerAddr) -> Result<EndpointAddr, BlobError> {
    if peer.0.len() > PEER_ADDR_BYTES_MAX {
        return Err(BlobError::BadAddr(format!(
            "{} bytes, more than {PEER_ADDR_BYTES_MAX}",
            peer.0.len()
        )));
    }
    serde_json::from_str(&peer.0).map_err(|e| BlobError::BadAddr(format!("`{peer}`: {e}")))
}

impl BlobTransport for IrohBlobs {
    fn addr(&self) -> PeerAddr {
        PeerAddr(serde_json::to_string(&self.endpoint_addr()).expect("address serialises"))
    }

    fn publish(&self, bytes: &[u8]) -> Result<String, BlobError> {
        let hash = hash_of(bytes);
        let stored = block_on(self.rt(), async {
            self.store
                .add_bytes(bytes.to_vec())
                .with_named_tag(tag_name(&hash))
                .await
                .map_err(transport)
        })?;
        debug_assert_eq!(stored.hash.to_hex(), hash);
        Ok(hash)
    }

    /// Story (hardening #14): the hub dialled whatever addresses a commit named, so
    /// any member could make it send QUIC packets to any host and port.
    fn reachable_at(&self, addr: &PeerAddr, ip: std::net::IpAddr) -> Result<PeerAddr, BlobError> {
        let parsed = parse_addr(addr)?;
        let kept: Vec<std::net::SocketAddr> = parsed
            .ip_addrs()
            .filter(|a| a.ip() == ip)
            .take(PEER_DIRECT_ADDRS_MAX)
            .copied()
            .collect();
        if kept.is_empty() {
            return Err(BlobError::BadAddr(format!(
                "the endpoint lists no address at {ip}, the address its owner connects from"
            )));
        }
        let mut cut = EndpointAddr::new(parsed.id);
        for a in kept {
            cut = cut.with_ip_addr(a);
        }
        Ok(PeerAddr(
            serde_json::to_string(&cut).expect("address serialises"),
        ))
    }

    /// Peers are raced in order: the first gets a head start of `stagger`, then the
    /// next joins, and so on; the first complete, verified copy wins and the other
    /// attempts are dropped. A dead first peer therefore costs `stagger`, not a timeout.
    fn fetch(&self, hash: &str, peers: &[PeerAddr], max_bytes: u64) -> Result<Vec<u8>, BlobError> {
        let iroh_hash = to_iroh_hash(hash)?;
        if peers.is_empty() {
            return Err(BlobError::NoPeers { hash: hash.into() });
        }
        let mut addrs = Vec::with_capacity(peers.len());
        for peer in peers {
            let addr = parse_addr(peer)?;
            if addr.id == self.endpoint.id() {
                // Our own blob: read it from the store.
                if let Ok(bytes) = block_on(self.rt(), self.store.get_bytes(iroh_hash)) {
                    if bytes.len() as u64 <= max_bytes {
                        return Ok(bytes.to_vec());
                    }
                }
                continue;
            }
            addrs.push(addr);
        }
        let tried = addrs.len();
        let raced = block_on(self.rt(), async {
            let mut attempts = n0_future::FuturesUnordered::new();
            for (i, addr) in addrs.into_iter().enumerate() {
                let head_start = self.stagger * i as u32;
                attempts.push(async move {
                    tokio::time::sleep(head_start).await;
                    tokio::time::timeout(
                        self.fetch_timeout,
                        self.fetch_one(iroh_hash, addr, max_bytes),
                    )
                    .await
                    .unwrap_or_else(|_| Err(transport("timed out")))
                });
            }
            let mut last = String::from("no peer other than ourselves");
            while let Some(attempt) = attempts.next().await {
                match attempt {
                    Ok(done) => return Ok(done),
                    Err(e @ BlobError::TooLarge { .. }) => return Err(e),
                    Err(e) => last = e.to_string(),
                }
            }
            Err(BlobError::Unavailable {
                hash: hash.into(),
                tried,
                last,
            })
        });
        let (bytes, read) = raced?;
        self.received.fetch_add(read, Ordering::Relaxed);
        if let Some(p) = &self.download {
            std::thread::sleep(p.delay(read));
        }
        // Verified while streaming; checked again for defence in depth.
        if hash_of(&bytes) != hash {
            return Err(BlobError::Unavailable {
                hash: hash.into(),
                tried,
                last: "bytes of another hash".into(),
            });
        }
        self.publish(&bytes)?;
        Ok(bytes)
    }

    fn forget(&self, hash: &str) {
        let _ = block_on(self.rt(), self.store.tags().delete(tag_name(hash)));
    }

    fn traffic(&self) -> Traffic {
        Traffic {
            sent: self.sent.load(Ordering::Relaxed),
            received: self.received.load(Ordering::Relaxed),
        }
    }
}

impl Drop for IrohBlobs {
    fn drop(&mut self) {
        let router = self.router.clone();
        block_on(self.rt(), async move {
            let _ = tokio::time::timeout(Duration::from_secs(2), router.shutdown()).await;
        });
        // Dropping a runtime may not block inside another one; shut it down instead.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}
