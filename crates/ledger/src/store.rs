//! Durable storage behind a small trait, and the [`Ledger`] that joins it to the pure
//! [`State`].
//!
//! # Crash model
//!
//! The journal is the list of committed requests, each with the `now_ms` it was
//! applied at, in commit order; transfers and balances are derived from it and stored
//! beside it for queries and cross-checks. One request is one SQLite transaction
//! (`requests` row + its `transfers` rows + the new `balances` rows), committed in WAL
//! mode with `synchronous=FULL`, so when [`Ledger::submit`] returns `Ok` the request is
//! on stable storage, and a crash at any earlier point leaves no trace of it. SQLite's
//! atomic commit is the only mechanism relied on; the media is assumed to honour
//! `fsync`. The in-memory state changes only after the store has committed, so a
//! storage error leaves memory and disk agreeing.
//!
//! On open the journal is replayed through the same pure state machine; every request
//! must re-apply cleanly and reproduce exactly the stored transfers and balances, or the
//! open fails naming the first difference. A request re-submitted after a crash (the
//! caller could not know whether it landed) is recognised by its id and returns the
//! original receipt, so nothing is ever applied twice.

use std::collections::BTreeMap;
use std::path::Path;

use rusqlite::{params, Connection, OptionalExtension};
use serde::Serialize;

use crate::account::Account;
use crate::state::{LedgerConfig, LedgerError, Planned, Receipt, Request, State, Transfer};

/// A committed request as the journal keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JournalEntry {
    pub request: Request,
    pub now_ms: u64,
}

/// Why storage failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error("ledger database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The stored data contradicts itself or was altered.
    #[error("ledger database is inconsistent: {0}")]
    Corrupt(String),
    /// `open` found no ledger, or `init` found one already.
    #[error("{0}")]
    Setup(String),
}

/// Why a submission failed: the request was refused, or storage failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SubmitError {
    #[error(transparent)]
    Refused(#[from] LedgerError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Durable storage of the journal and its derived tables.
pub trait Store {
    fn config(&self) -> Result<LedgerConfig, StoreError>;
    /// The journal in commit order.
    fn journal(&self) -> Result<Vec<JournalEntry>, StoreError>;
    /// Persists one request with its transfers and the new balances, atomically.
    fn append(
        &mut self,
        entry: &JournalEntry,
        transfers: &[Transfer],
        balances: &[(Account, u128)],
    ) -> Result<(), StoreError>;
    /// Every stored transfer in order.
    fn transfers(&self) -> Result<Vec<Transfer>, StoreError>;
    /// The stored balances table.
    fn balances(&self) -> Result<BTreeMap<Account, u128>, StoreError>;
    /// The newest `limit` transfers touching `account`, newest first.
    fn history(&self, account: &Account, limit: usize) -> Result<Vec<Transfer>, StoreError>;
}

/// An in-memory store for tests and simulation.
#[derive(Debug, Default)]
pub struct MemoryStore {
    config: LedgerConfig,
    journal: Vec<JournalEntry>,
    transfers: Vec<Transfer>,
    balances: BTreeMap<Account, u128>,
}

impl MemoryStore {
    pub fn new(config: LedgerConfig) -> MemoryStore {
        MemoryStore {
            config,
            ..Default::default()
        }
    }
}

impl Store for MemoryStore {
    fn config(&self) -> Result<LedgerConfig, StoreError> {
        Ok(self.config)
    }
    fn journal(&self) -> Result<Vec<JournalEntry>, StoreError> {
        Ok(self.journal.clone())
    }
    fn append(
        &mut self,
        entry: &JournalEntry,
        transfers: &[Transfer],
        balances: &[(Account, u128)],
    ) -> Result<(), StoreError> {
        self.journal.push(entry.clone());
        self.transfers.extend_from_slice(transfers);
        self.balances.extend(balances.iter().cloned());
        Ok(())
    }
    fn transfers(&self) -> Result<Vec<Transfer>, StoreError> {
        Ok(self.transfers.clone())
    }
    fn balances(&self) -> Result<BTreeMap<Account, u128>, StoreError> {
        Ok(self.balances.clone())
    }
    fn history(&self, account: &Account, limit: usize) -> Result<Vec<Transfer>, StoreError> {
        Ok(self
            .transfers
            .iter()
            .rev()
            .filter(|t| &t.debit == account || &t.credit == account)
            .take(limit)
            .cloned()
            .collect())
    }
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS requests (
    seq INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, body TEXT NOT NULL, now_ms INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS transfers (
    seq INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, request_id TEXT NOT NULL REFERENCES requests(id),
    body TEXT NOT NULL, debit TEXT NOT NULL, credit TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS transfers_debit ON transfers(debit, seq);
CREATE INDEX IF NOT EXISTS transfers_credit ON transfers(credit, seq);
CREATE TABLE IF NOT EXISTS balances (account TEXT PRIMARY KEY, amount TEXT NOT NULL);
";
const SCHEMA_VERSION: &str = "1";

/// The SQLite store: WAL, `synchronous=FULL`, one transaction per request.
#[derive(Debug)]
pub struct SqliteStore {
    conn: Connection,
}

impl SqliteStore {
    fn connect(path: &Path) -> Result<Connection, StoreError> {
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        Ok(conn)
    }

    /// Creates a new ledger database at `path`; refuses an existing one.
    pub fn init(path: &Path, config: LedgerConfig) -> Result<SqliteStore, StoreError> {
        if path.exists() {
            return Err(StoreError::Setup(format!(
                "{} already exists; refusing to overwrite a ledger",
                path.display()
            )));
        }
        let conn = Self::connect(path)?;
        conn.execute_batch(SCHEMA)?;
        let config_json = serde_json::to_string(&config).expect("config serialises");
        conn.execute(
            "INSERT INTO meta(key, value) VALUES ('schema', ?1), ('config', ?2)",
            params![SCHEMA_VERSION, config_json],
        )?;
        Ok(SqliteStore { conn })
    }

    /// Opens an existing ledger database.
    pub fn open(path: &Path) -> Result<SqliteStore, StoreError> {
        if !path.exists() {
            return Err(StoreError::Setup(format!(
                "no ledger at {}; create one with `tessera ledger init`",
                path.display()
            )));
        }
        let conn = Self::connect(path)?;
        let version: Option<String> = conn
            .query_row("SELECT value FROM meta WHERE key = 'schema'", [], |r| {
                r.get(0)
            })
            .optional()
            .map_err(|e| {
                StoreError::Corrupt(format!("{}: not a Tessera ledger ({e})", path.display()))
            })?;
        if version.as_deref() != Some(SCHEMA_VERSION) {
            return Err(StoreError::Corrupt(format!(
                "{}: schema version {version:?}, expected {SCHEMA_VERSION}",
                path.display()
            )));
        }
        Ok(SqliteStore { conn })
    }
}

fn parse_json<T: serde::de::DeserializeOwned>(text: &str, what: &str) -> Result<T, StoreError> {
    serde_json::from_str(text).map_err(|e| StoreError::Corrupt(format!("bad {what} row: {e}")))
}

fn transfer_rows(
    conn: &Connection,
    sql: &str,
    p: impl rusqlite::Params,
) -> Result<Vec<Transfer>, StoreError> {
    let mut stmt = conn.prepare(sql)?;
    let rows = stmt.query_map(p, |r| r.get::<_, String>(0))?;
    rows.map(|r| parse_json(&r?, "transfer")).collect()
}

impl Store for SqliteStore {
    fn config(&self) -> Result<LedgerConfig, StoreError> {
        let text: String =
            self.conn
                .query_row("SELECT value FROM meta WHERE key = 'config'", [], |r| {
                    r.get(0)
                })?;
        parse_json(&text, "config")
    }

    fn journal(&self) -> Result<Vec<JournalEntry>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT body, now_ms FROM requests ORDER BY seq")?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
        rows.map(|row| {
            let (body, now) = row?;
            Ok(JournalEntry {
                request: parse_json(&body, "request")?,
                now_ms: now as u64,
            })
        })
        .collect()
    }

    fn append(
        &mut self,
        entry: &JournalEntry,
        transfers: &[Transfer],
        balances: &[(Account, u128)],
    ) -> Result<(), StoreError> {
        let tx = self.conn.transaction()?;
        let body = serde_json::to_string(&entry.request).expect("request serialises");
        tx.execute(
            "INSERT INTO requests(id, body, now_ms) VALUES (?1, ?2, ?3)",
            params![entry.request.id, body, entry.now_ms as i64],
        )?;
        {
            let mut ins = tx.prepare_cached("INSERT INTO transfers(id, request_id, body, debit, credit) VALUES (?1, ?2, ?3, ?4, ?5)")?;
            for t in transfers {
                let body = serde_json::to_string(t).expect("transfer serialises");
                ins.execute(params![
                    t.id,
                    t.request,
                    body,
                    t.debit.to_string(),
                    t.credit.to_string()
                ])?;
            }
            let mut upsert = tx.prepare_cached(
                "INSERT INTO balances(account, amount) VALUES (?1, ?2) ON CONFLICT(account) DO UPDATE SET amount = excluded.amount",
            )?;
            for (a, b) in balances {
                upsert.execute(params![a.to_string(), b.to_string()])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    fn transfers(&self) -> Result<Vec<Transfer>, StoreError> {
        transfer_rows(&self.conn, "SELECT body FROM transfers ORDER BY seq", [])
    }

    fn balances(&self) -> Result<BTreeMap<Account, u128>, StoreError> {
        let mut stmt = self.conn.prepare("SELECT account, amount FROM balances")?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
        rows.map(|row| {
            let (a, b) = row?;
            let account = a
                .parse()
                .map_err(|e| StoreError::Corrupt(format!("balances: {e}")))?;
            let amount = b.parse().map_err(|_| {
                StoreError::Corrupt(format!("balances: `{b}` of {a} is not an amount"))
            })?;
            Ok((account, amount))
        })
        .collect()
    }

    fn history(&self, account: &Account, limit: usize) -> Result<Vec<Transfer>, StoreError> {
        let name = account.to_string();
        transfer_rows(
            &self.conn,
            "SELECT body FROM transfers WHERE debit = ?1 OR credit = ?1 ORDER BY seq DESC LIMIT ?2",
            params![name, limit as i64],
        )
    }
}

/// The result of re-checking a ledger from its journal.
#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    pub requests: usize,
    pub transfers: usize,
    pub accounts: usize,
    pub issued: String,
    pub burned: String,
    pub supply: String,
    pub root: String,
    /// Empty when the ledger is consistent.
    pub problems: Vec<String>,
}

/// A ledger: the pure state in memory, kept in step with a durable store.
#[derive(Debug)]
pub struct Ledger<S: Store> {
    state: State,
    store: S,
}

/// Replays a journal into a fresh state, collecting the transfers it produces.
fn replay(
    config: LedgerConfig,
    journal: &[JournalEntry],
) -> Result<(State, Vec<Transfer>), String> {
    let mut state = State::new(config);
    let mut transfers = Vec::new();
    for e in journal {
        match state.plan(&e.request, e.now_ms) {
            Ok(Planned::New(plan)) => {
                transfers.extend(plan.receipt.transfers.iter().cloned());
                state.commit(*plan);
            }
            Ok(Planned::Replay(_)) => {
                return Err(format!("request `{}` is journaled twice", e.request.id))
            }
            Err(err) => {
                return Err(format!(
                    "request `{}` does not re-apply: {err}",
                    e.request.id
                ))
            }
        }
    }
    Ok((state, transfers))
}

impl<S: Store> Ledger<S> {
    /// Loads the ledger from `store`, replaying and cross-checking its journal.
    pub fn open(store: S) -> Result<Ledger<S>, StoreError> {
        let ledger = Ledger {
            state: State::new(store.config()?),
            store,
        };
        match ledger.check()? {
            (state, r) if r.problems.is_empty() => Ok(Ledger {
                state,
                store: ledger.store,
            }),
            (_, r) => Err(StoreError::Corrupt(r.problems.join("; "))),
        }
    }

    pub fn state(&self) -> &State {
        &self.state
    }

    pub fn store(&self) -> &S {
        &self.store
    }

    /// Validates, persists and applies a request. Re-submitting an id with the same
    /// content returns the original receipt and changes nothing.
    pub fn submit(&mut self, request: &Request, now_ms: u64) -> Result<Receipt, SubmitError> {
        match self.state.plan(request, now_ms)? {
            Planned::Replay(receipt) => Ok(receipt),
            Planned::New(plan) => {
                let entry = JournalEntry {
                    request: request.clone(),
                    now_ms,
                };
                self.store
                    .append(&entry, &plan.receipt.transfers, &plan.balances)?;
                let receipt = plan.receipt.clone();
                self.state.commit(*plan);
                Ok(receipt)
            }
        }
    }

    /// Re-checks every invariant from the journal: replays it from nothing, and
    /// compares the result with the stored transfers, the stored balances and the
    /// state in memory.
    pub fn verify(&self) -> Result<VerifyReport, StoreError> {
        Ok(self.check()?.1)
    }

    fn check(&self) -> Result<(State, VerifyReport), StoreError> {
        let journal = self.store.journal()?;
        let stored_transfers = self.store.transfers()?;
        let stored_balances = self.store.balances()?;
        let mut problems = Vec::new();
        let config = self.state.config;
        let (state, transfers) = match std::panic::catch_unwind(|| replay(config, &journal)) {
            Ok(Ok(r)) => r,
            Ok(Err(msg)) => {
                problems.push(msg);
                (State::new(self.state.config), Vec::new())
            }
            Err(_) => {
                problems.push("an invariant failed while replaying the journal".into());
                (State::new(self.state.config), Vec::new())
            }
        };
        if transfers.len() != stored_transfers.len() {
            problems.push(format!(
                "journal implies {} transfers, {} are stored",
                transfers.len(),
                stored_transfers.len()
            ));
        }
        if let Some((a, b)) = transfers
            .iter()
            .zip(&stored_transfers)
            .find(|(a, b)| a != b)
        {
            problems.push(format!(
                "stored transfer `{}` differs from the journal's `{}`",
                b.id, a.id
            ));
        }
        for (account, amount) in state.balances() {
            let stored = stored_balances.get(account).copied().unwrap_or(0);
            if stored != *amount {
                problems.push(format!(
                    "{account}: stored balance {stored}, journal implies {amount}"
                ));
            }
        }
        for (account, amount) in &stored_balances {
            if state.balance(account).is_none() && *amount != 0 {
                problems.push(format!(
                    "{account}: stored balance {amount} for an account the journal never touched"
                ));
            }
        }
        // A ledger loaded earlier must still match its journal (the file was not altered).
        if self.state.request_count() > 0 && self.state.balances() != state.balances() {
            problems.push("the ledger in memory differs from its journal".into());
        }
        let report = VerifyReport {
            requests: journal.len(),
            transfers: stored_transfers.len(),
            accounts: state.balances().len(),
            issued: state.issued().to_string(),
            burned: state.burned().to_string(),
            supply: state.supply().to_string(),
            root: state.root(),
            problems,
        };
        Ok((state, report))
    }
}
