//! A run's relay: iroh's own relay server (`iroh-relay`), started in-process.
//!
//! Peers behind NATs that accept no incoming connections can't be dialled directly.
//! Both sides keep a connection to the relay (HTTPS, upgraded to a WebSocket), and
//! the relay forwards their QUIC packets until hole punching finds a direct path; the
//! relay then carries nothing more for that pair. A peer whose network blocks UDP
//! entirely stays on the relay. The relay also answers QUIC address discovery (QAD)
//! on a UDP port: a node learns the public address its NAT maps it to, which is what
//! the other side of a hole punch aims at.
//!
//! The relay sees only encrypted QUIC packets and the endpoint ids they are addressed
//! to. It is open to any endpoint (iroh's `AllowAll`); each client's incoming rate can
//! be capped.

use std::net::SocketAddr;
use std::num::NonZeroU32;

use iroh_relay::server::{
    CertConfig, ClientRateLimit, Limits, QuicConfig, RelayConfig, Server, ServerConfig, TlsConfig,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::BlobError;

/// How a relay server binds and what it serves with.
#[derive(Debug, Clone)]
pub struct RelayServerOptions {
    /// Plain HTTP: captive-portal probes, and the relay itself when there is no TLS.
    pub http_bind: SocketAddr,
    /// HTTPS (the relay protocol) and its certificate chain and key, both PEM.
    pub tls: Option<RelayTls>,
    /// UDP for QUIC address discovery (needs `tls`).
    pub quic_bind: Option<SocketAddr>,
    /// Most bytes per second the relay reads from one client (none: no cap).
    pub client_rx_bytes_per_second: Option<u32>,
}

/// A relay's certificate chain and private key, PEM.
#[derive(Clone)]
pub struct RelayTls {
    pub https_bind: SocketAddr,
    pub cert_chain_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
}

impl std::fmt::Debug for RelayTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayTls")
            .field("https_bind", &self.https_bind)
            .finish_non_exhaustive()
    }
}

/// What a relay has done since it started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct RelayStats {
    /// Payload bytes the relay forwarded to clients.
    pub bytes_sent: u64,
    /// Payload bytes the relay received from clients.
    pub bytes_received: u64,
    /// Client connections accepted, and closed.
    pub accepts: u64,
    pub disconnects: u64,
    /// QUIC address discovery connections answered.
    pub qad_connections: u64,
}

/// A certificate for a relay without a domain name (a test network, or a relay
/// reached by IP): a throw-away CA, whose key is dropped at once so it can never sign
/// anything else, and a leaf for `hosts` (names or IP addresses) signed by it.
/// Returns (CA certificate PEM, leaf certificate PEM, leaf key PEM): the relay serves
/// the leaf, and the run file names the CA for nodes to trust.
pub fn self_signed(hosts: &[String]) -> Result<(String, String, String), BlobError> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    let gen = |e: rcgen::Error| relay_err("certificate", e);
    if hosts.is_empty() {
        return Err(relay_err(
            "certificate",
            "no host name or address to certify",
        ));
    }
    let ca_key = KeyPair::generate().map_err(gen)?;
    let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(gen)?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.distinguished_name
        .push(DnType::CommonName, "Tessera relay CA");
    let ca = ca.self_signed(&ca_key).map_err(gen)?;
    let key = KeyPair::generate().map_err(gen)?;
    let mut leaf = CertificateParams::new(hosts.to_vec()).map_err(gen)?;
    leaf.distinguished_name
        .push(DnType::CommonName, hosts[0].clone());
    let leaf = leaf.signed_by(&key, &ca, &ca_key).map_err(gen)?;
    Ok((ca.pem(), leaf.pem(), key.serialize_pem()))
}

/// A running relay. Dropping it stops it.
pub struct RelayServer {
    server: Option<Server>,
    rt: Option<tokio::runtime::Runtime>,
}

fn relay_err(what: &str, e: impl std::fmt::Display) -> BlobError {
    BlobError::Transport(format!("relay: {what}: {e}"))
}

/// A rustls server configuration from a PEM chain and key (TLS 1.3 included, as QUIC
/// needs).
fn tls_config(tls: &RelayTls) -> Result<rustls::ServerConfig, BlobError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&tls.cert_chain_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| relay_err("the certificate chain is not PEM", e))?;
    if certs.is_empty() {
        return Err(relay_err("the certificate chain", "holds no certificate"));
    }
    let key = PrivateKeyDer::from_pem_slice(&tls.key_pem)
        .map_err(|e| relay_err("the private key is not PEM", e))?;
    rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| relay_err("TLS versions", e))?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(|e| relay_err("the certificate and key don't make a TLS configuration", e))
}

impl RelayServer {
    /// Binds the relay's sockets and starts serving.
    pub fn spawn(opts: RelayServerOptions) -> Result<RelayServer, BlobError> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("tessera-relay")
            .enable_all()
            .build()
            .map_err(|e| relay_err("runtime", e))?;
        let mut relay = RelayConfig::new(opts.http_bind);
        let mut quic = None;
        if let Some(tls) = &opts.tls {
            let server_config = tls_config(tls)?;
            if let Some(bind) = opts.quic_bind {
                let mut q = QuicConfig::new(bind);
                q.server_config = Some(server_config.clone());
                quic = Some(q);
            }
            relay.tls = Some(TlsConfig::new(
                tls.https_bind,
                CertConfig::Manual { server_config },
            ));
        } else if opts.quic_bind.is_some() {
            return Err(relay_err(
                "quic_bind",
                "QUIC address discovery needs a TLS certificate",
            ));
        }
        if let Some(rate) = opts.client_rx_bytes_per_second {
            let rate = NonZeroU32::new(rate).ok_or_else(|| relay_err("client rate", "0"))?;
            let mut limits = Limits::default();
            limits.client_rx = Some(ClientRateLimit::new(rate));
            relay.limits = limits;
        }
        let mut config = ServerConfig::default();
        config.relay = Some(relay);
        config.quic = quic;
        let server = rt
            .block_on(Server::spawn(config))
            .map_err(|e| relay_err("starting", e))?;
        Ok(RelayServer {
            server: Some(server),
            rt: Some(rt),
        })
    }

    fn server(&self) -> &Server {
        self.server.as_ref().expect("server lives until drop")
    }

    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.server().http_addr()
    }

    pub fn https_addr(&self) -> Option<SocketAddr> {
        self.server().https_addr()
    }

    pub fn quic_addr(&self) -> Option<SocketAddr> {
        self.server().quic_addr()
    }

    pub fn stats(&self) -> RelayStats {
        let m = &self.server().metrics().server;
        RelayStats {
            bytes_sent: m.bytes_sent.get(),
            bytes_received: m.bytes_recv.get(),
            accepts: m.accepts.get(),
            disconnects: m.disconnects.get(),
            qad_connections: m.qad_connections.get(),
        }
    }
}

impl Drop for RelayServer {
    fn drop(&mut self) {
        if let (Some(server), Some(rt)) = (self.server.take(), self.rt.take()) {
            let _ = rt.block_on(async {
                tokio::time::timeout(std::time::Duration::from_secs(2), server.shutdown()).await
            });
            rt.shutdown_background();
        }
    }
}
