//! HTTPS for Tessera's servers (rustls, with the process's ring provider).
//!
//! When it is needed: every request and reply on the control plane is already signed
//! (requests by the node's key, replies by the hub's, see [`crate::http_auth`]), so
//! plain HTTP can't be forged or replayed. What signatures don't give is secrecy and
//! privacy of metadata: over plain HTTP anyone on the path sees which node commits
//! what, when, and its earnings on the ledger API. Serve HTTPS whenever the hub is
//! reached across a network you don't control (always on the internet), and behind a
//! domain name with a certificate from a public CA so nodes need no extra flag; a
//! self-signed certificate works too, with the node given its CA (`--hub-ca`).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use axum::extract::ConnectInfo;
use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tower::Service;

/// The rustls server configuration for a PEM certificate chain and private key.
pub fn server_config(cert_pem: &Path, key_pem: &Path) -> Result<rustls::ServerConfig> {
    crate::install_tls_provider();
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_pem)
        .with_context(|| format!("reading the certificate {}", cert_pem.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("parsing the certificate {}", cert_pem.display()))?;
    if certs.is_empty() {
        bail!("{} holds no PEM certificate", cert_pem.display());
    }
    let key = PrivateKeyDer::from_pem_file(key_pem)
        .with_context(|| format!("reading the private key {}", key_pem.display()))?;
    let mut config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("the certificate and key don't make a TLS configuration")?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// Serves `router` over HTTPS on `listener` until the process stops. Handlers see
/// the peer's address as axum's `ConnectInfo<SocketAddr>`, as with plain HTTP. A
/// failed handshake drops that connection only.
pub async fn serve_tls(
    listener: tokio::net::TcpListener,
    router: Router,
    config: rustls::ServerConfig,
) -> Result<()> {
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            // Out of file descriptors and the like: wait and go on serving.
            Err(_) => {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let (acceptor, router) = (acceptor.clone(), router.clone());
        tokio::spawn(async move {
            let Ok(tls) = acceptor.accept(tcp).await else {
                return;
            };
            let service = hyper::service::service_fn(move |mut req: hyper::Request<_>| {
                req.extensions_mut().insert(ConnectInfo::<SocketAddr>(peer));
                router.clone().call(req.map(axum::body::Body::new))
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tls), service)
                .await;
        });
    }
}

/// A PEM certificate to trust as a root, besides the system's, for clients of a
/// server with a self-signed certificate.
pub fn root_certificate(pem: &Path) -> Result<reqwest::Certificate> {
    let bytes = std::fs::read(pem).with_context(|| format!("reading {}", pem.display()))?;
    reqwest::Certificate::from_pem(&bytes)
        .with_context(|| format!("{} is not a PEM certificate", pem.display()))
}
