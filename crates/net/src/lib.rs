//! Tessera's network adapters. Today: the ledger's HTTP API ([`ledger_api`]) that the
//! hub serves, and a client for it. Every request is signed
//! ([`tessera_protocol::auth`]); the server maps the signing key to a ledger signer
//! (the run organiser's key, or a contributor whose id is its key) and the ledger
//! decides what that signer may do.
//!
//! The key design choice is that these are thin: parsing, authentication and status
//! codes here, every rule in the pure ledger. Nothing here keeps state of its own.

pub mod http_auth;
pub mod ledger_api;

pub use ledger_api::{router as ledger_router, ClientError, LedgerClient, LedgerService};
