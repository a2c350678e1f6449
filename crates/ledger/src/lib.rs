//! Tessera's token ledger: double-entry accounting of a token sale, the treasury, run
//! reward pools, per-round payouts by verified work, stake with unbonding and
//! slashing, and model revenue shared by contribution.
//!
//! The key design choice is a pure state machine ([`state::State`]) fed by a journal
//! of requests: every request has a unique id, is validated as a whole before anything
//! changes, and produces transfers that each debit one account and credit another by
//! an integer number of base units (10^9 per token). Storage ([`store`]) persists the
//! journal in SQLite, one transaction per request, and rebuilds and cross-checks the
//! state from it on open; see the crash model there. Invariants (balances add up to
//! what was issued; supply = issued − burned) are asserted after every commit.
//! This crate does not know about networks, signatures or clocks: callers pass the
//! authenticated [`state::Signer`] and the time.

pub mod account;
pub mod amount;
pub mod merkle;
pub mod split;
pub mod state;
pub mod store;

pub use account::Account;
pub use amount::{Amount, BASE_UNITS_PER_TOKEN};
pub use state::{
    LedgerConfig, LedgerError, Operation, Receipt, Request, Signer, State, Transfer, Work,
};
pub use store::{Ledger, MemoryStore, SqliteStore, Store, StoreError, SubmitError};
