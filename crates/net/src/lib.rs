//! Tessera's network adapters. Today: the ledger's HTTP API ([`ledger_api`]) that the
//! hub serves, and a client for it. Every request is signed
//! ([`tessera_protocol::auth`]); the server maps the signing key to a ledger signer
//! (the run organiser's key, or a contributor whose id is its key) and the ledger
//! decides what that signer may do. Every reply is signed by the server's key
//! ([`http_auth::with_signed_replies`]) and checked by the client ([`ClientAuth`]).
//!
//! The key design choice is that these are thin: parsing, authentication and status
//! codes here, every rule in the pure ledger. Nothing here keeps state of its own.

pub mod http_auth;
pub mod ledger_api;
pub mod tls;

pub use http_auth::{with_signed_replies, ClientAuth, ServerAuth};
pub use ledger_api::{router as ledger_router, ClientError, LedgerClient, LedgerService};

/// Installs ring as the process's TLS crypto provider (once; later calls do nothing).
///
/// The data plane's iroh brings rustls with ring and switches reqwest to rustls without
/// a built-in provider, so an HTTP client can only be built after a provider is
/// installed. Everything in Tessera that builds one calls this first.
pub fn install_tls_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // Err means another provider was installed first, which serves as well.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}
