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
use iroh::{Endpoint, EndpointAddr, RelayConfig, RelayMap, RelayMode, RelayUrl, SecretKey};
use iroh_blobs::get::request::{get_blob, GetBlobItem};
use iroh_blobs::provider::events::{EventMask, EventSender, ProviderMessage, ThrottleMode};
use iroh_blobs::store::mem::{MemStore, Options};
use iroh_blobs::store::GcConfig;
use iroh_blobs::{BlobsProtocol, Hash, ALPN};
use iroh_relay::tls::CaTlsConfig;
use iroh_relay::RelayQuicConfig;
use n0_future::StreamExt;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

use crate::{
    check_hash, hash_of, BlobError, BlobTransport, Pacer, PathTraffic, PeerAddr, RelayInfo,
    Traffic, PEER_ADDR_BYTES_MAX,
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
    /// The run's relays; none keeps the endpoint direct-only (loopback runs, tests).
    pub relays: Vec<RelayInfo>,
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
            relays: Vec::new(),
        }
    }
}

/// How long binding waits for the endpoint to reach a relay, so that the first
/// address it hands out already names one. A relay that is down doesn't stop the
/// endpoint: it goes on without and keeps trying.
const RELAY_WAIT: Duration = Duration::from_secs(10);

/// The relay map and the TLS roots for a run's relays: the web PKI's, plus any
/// certificate the run names for a relay of its own.
fn relay_setup(relays: &[RelayInfo]) -> Result<(RelayMap, CaTlsConfig), BlobError> {
    if relays.len() > tessera_protocol::limits::RELAYS_MAX {
        return Err(BlobError::BadAddr(format!(
            "{} relays, more than {}",
            relays.len(),
            tessera_protocol::limits::RELAYS_MAX
        )));
    }
    let map = RelayMap::empty();
    let mut extra: Vec<CertificateDer<'static>> = Vec::new();
    for r in relays {
        r.check().map_err(BlobError::BadAddr)?;
        let url: RelayUrl = r
            .url
            .parse()
            .map_err(|e| BlobError::BadAddr(format!("relay url `{}`: {e}", r.url)))?;
        let quic = r.quic_port.map(RelayQuicConfig::new);
        map.insert(url.clone(), Arc::new(RelayConfig::new(url, quic)));
        if let Some(pem) = &r.cert_pem {
            for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
                extra.push(cert.map_err(|e| {
                    BlobError::BadAddr(format!("relay {} certificate: {e}", r.url))
                })?);
            }
        }
    }
    Ok((map, CaTlsConfig::embedded().with_extra_roots(extra)))
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
    fetches_direct: AtomicU64,
    fetches_relayed: AtomicU64,
    relays: Vec<RelayUrl>,
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
        let (relay_map, roots) = relay_setup(&opts.relays)?;
        let relays: Vec<RelayUrl> = relay_map.urls();
        let (endpoint, store, router) = block_on(&rt, async {
            // Minimal preset: a crypto provider and nothing else — no address lookup
            // (peers' addresses come with their commits); the crate is built without
            // the port mapper. Relays only when the run names some.
            let relay_mode = if relays.is_empty() {
                RelayMode::Disabled
            } else {
                RelayMode::Custom(relay_map)
            };
            let mut builder = Endpoint::builder(presets::Minimal)
                .relay_mode(relay_mode)
                .ca_tls_config(roots)
                .clear_ip_transports()
                .bind_addr(opts.bind)
                .map_err(transport)?;
            if let Some(key) = opts.secret_key {
                builder = builder.secret_key(SecretKey::from_bytes(&key));
            }
            let endpoint = builder.bind().await.map_err(transport)?;
            if !relays.is_empty() {
                let _ = tokio::time::timeout(RELAY_WAIT, endpoint.online()).await;
            }
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
            fetches_direct: AtomicU64::new(0),
            fetches_relayed: AtomicU64::new(0),
            relays,
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
        // Which way the bytes came: summed over the connection's paths.
        let (mut direct, mut relayed) = (0u64, 0u64);
        for path in conn.paths().iter() {
            let rx = path.stats().udp_rx.bytes;
            if path.is_relay() {
                relayed += rx;
            } else {
                direct += rx;
            }
        }
        if relayed > direct {
            self.fetches_relayed.fetch_add(1, Ordering::Relaxed);
        } else {
            self.fetches_direct.fetch_add(1, Ordering::Relaxed);
        }
        conn.close(0u32.into(), b"done");
        Ok((data, stats.total_bytes_read()))
    }
}

/// How long a held connection waits before dialling again after it dropped.
const HOLD_RETRY: Duration = Duration::from_secs(2);

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
    /// any member could make it send QUIC packets to any host and port. Relays are
    /// kept only when they are this transport's own (the run's): a node behind a NAT
    /// lists no address at the IP it connects from until address discovery tells it
    /// its public one, and the relay is how it is reached meanwhile.
    fn reachable_at(&self, addr: &PeerAddr, ip: std::net::IpAddr) -> Result<PeerAddr, BlobError> {
        let parsed = parse_addr(addr)?;
        let kept: Vec<std::net::SocketAddr> = parsed
            .ip_addrs()
            .filter(|a| a.ip() == ip)
            .take(PEER_DIRECT_ADDRS_MAX)
            .copied()
            .collect();
        let relays: Vec<RelayUrl> = parsed
            .relay_urls()
            .filter(|u| self.relays.contains(u))
            .cloned()
            .collect();
        if kept.is_empty() && relays.is_empty() {
            return Err(BlobError::BadAddr(format!(
                "the endpoint lists no address at {ip}, the address its owner connects from, \
                 and none of the run's relays"
            )));
        }
        let mut cut = EndpointAddr::new(parsed.id);
        for a in kept {
            cut = cut.with_ip_addr(a);
        }
        for u in relays {
            cut = cut.with_relay_url(u);
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

    /// Story (the emulated-internet test): with the relay down, the hub could not
    /// reach a node behind a NAT whose mapping towards the hub had expired between
    /// rounds, failed to fetch its audit reveal, and ejected an honest node.
    fn hold(&self, peer: &PeerAddr) -> Result<(), BlobError> {
        let addr = parse_addr(peer)?;
        if addr.id == self.endpoint.id() {
            return Ok(());
        }
        let endpoint = self.endpoint.clone();
        let connect_timeout = self.connect_timeout;
        self.rt().spawn(async move {
            loop {
                let attempt =
                    tokio::time::timeout(connect_timeout, endpoint.connect(addr.clone(), ALPN))
                        .await;
                if let Ok(Ok(conn)) = attempt {
                    // iroh keeps every path of an open connection alive (pings every
                    // 5 s), which keeps the NAT mapping open too.
                    conn.closed().await;
                }
                if endpoint.is_closed() {
                    return;
                }
                tokio::time::sleep(HOLD_RETRY).await;
            }
        });
        Ok(())
    }

    fn forget(&self, hash: &str) {
        let _ = block_on(self.rt(), self.store.tags().delete(tag_name(hash)));
    }

    fn traffic(&self) -> Traffic {
        let m = &self.endpoint.metrics().socket;
        Traffic {
            sent: self.sent.load(Ordering::Relaxed),
            received: self.received.load(Ordering::Relaxed),
            paths: PathTraffic {
                direct_sent: m.send_ipv4.get() + m.send_ipv6.get(),
                direct_received: m.recv_data_ipv4.get() + m.recv_data_ipv6.get(),
                relay_sent: m.send_relay.get(),
                relay_received: m.recv_data_relay.get(),
                fetches_direct: self.fetches_direct.load(Ordering::Relaxed),
                fetches_relayed: self.fetches_relayed.load(Ordering::Relaxed),
            },
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
