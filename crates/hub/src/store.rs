//! Where the hub engine's state is kept: the [`HubStore`] trait, the SQLite store the
//! hub runs on, and an in-memory twin for the simulator and tests.
//!
//! # Crash model
//!
//! - A [`Change`] is written atomically: after [`HubStore::write`] returns `Ok`, all of
//!   it survives a crash or power loss; if it returns `Err`, or the process dies inside
//!   it, none of it is visible on the next [`HubStore::load`]. SQLite gives this with
//!   one transaction per change in WAL mode with `synchronous=FULL` (the media is
//!   assumed to honour fsync).
//! - Files a change names (update blobs, checkpoints) are written and fsynced by the
//!   driver before the change, so a stored record never points at a missing file.
//! - The driver answers an input only after its change is durable, and treats a failed
//!   write as a crash: it rebuilds the engine from the store (fail-stop), so memory never
//!   runs ahead of what is durable.
//! - What is stored: the run's identity (its settings; a store holding another run is
//!   refused), the coordinator snapshot of the last round transition and the facts after
//!   it, every closed round's record, and the divergence count. Heartbeat times are not
//!   stored: a restarted hub counts every member as seen at restart.
//!
//! The memory twin keeps the same image in memory behind a shared handle, so a
//! simulated hub can "crash" (drop its engine) and reopen it; it can be told to fail
//! writes, to exercise the fail-stop path.

use std::path::Path;
use std::sync::{Arc, Mutex};

use rusqlite::{params, Connection, OptionalExtension};
use tessera_coordinator::Coordinator;
use tessera_protocol::wire::RoundRecord;

use crate::engine::{AuditRecord, Change, Durable, StoredFact};

/// Why the store could not be read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error("hub database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("hub database holds a malformed {what}: {error}")]
    Corrupt { what: &'static str, error: String },
    #[error("hub store: injected write failure")]
    Injected,
    #[error("hub store: no run was created")]
    Missing,
    /// The database was written by a later Tessera.
    #[error("{path} has hub store format {found}; this Tessera reads format {HUB_STORE_VERSION} and older: run a release that reads it, or use a new state_dir")]
    Version { path: String, found: i64 },
}

/// The hub's durable state.
pub trait HubStore: Send {
    /// The run's identity and its durable state, or `None` for an empty store.
    fn load(&mut self) -> Result<Option<(String, Durable)>, StoreError>;
    /// Creates the run: its identity and first change, atomically.
    fn create(&mut self, identity: &str, change: &Change) -> Result<(), StoreError>;
    /// Makes a change durable, atomically.
    fn write(&mut self, change: &Change) -> Result<(), StoreError>;
}

fn corrupt(what: &'static str) -> impl Fn(serde_json::Error) -> StoreError {
    move |e| StoreError::Corrupt {
        what,
        error: e.to_string(),
    }
}

/// The hub's SQLite database (`hub.db` in the state directory).
pub struct SqliteHubStore {
    db: Connection,
}

/// The format of `hub.db` this version reads and writes, kept in SQLite's
/// `user_version`. 0 is a database from before the format was versioned; its tables
/// are those of format 1. Format 2 added the `audits` table (created on open, so an
/// older store is stamped 2). A later format is refused, never misread.
pub const HUB_STORE_VERSION: i64 = 2;

impl SqliteHubStore {
    pub fn open(path: &Path) -> Result<SqliteHubStore, StoreError> {
        let db = Connection::open(path)?;
        let found: i64 = db.pragma_query_value(None, "user_version", |r| r.get(0))?;
        if found > HUB_STORE_VERSION {
            return Err(StoreError::Version {
                path: path.display().to_string(),
                found,
            });
        }
        db.pragma_update(None, "journal_mode", "WAL")?;
        db.pragma_update(None, "synchronous", "FULL")?;
        db.execute_batch(
            "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS facts (seq INTEGER PRIMARY KEY, fact TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS rounds (round INTEGER PRIMARY KEY, record TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS audits (seq INTEGER PRIMARY KEY, audit TEXT NOT NULL);",
        )?;
        if found < HUB_STORE_VERSION {
            db.pragma_update(None, "user_version", HUB_STORE_VERSION)?;
        }
        Ok(SqliteHubStore { db })
    }

    fn meta(&self, key: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .db
            .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
            .optional()?)
    }

    fn write_in(tx: &rusqlite::Transaction<'_>, change: &Change) -> Result<(), StoreError> {
        let set = "INSERT INTO meta(key, value) VALUES (?1, ?2)
                   ON CONFLICT(key) DO UPDATE SET value = excluded.value";
        if let Some(snapshot) = &change.snapshot {
            let json = serde_json::to_string(snapshot).expect("a coordinator serialises");
            tx.execute(set, params!["coordinator", json])?;
            tx.execute("DELETE FROM facts", [])?;
        }
        for f in &change.facts {
            let json = serde_json::to_string(f).expect("a fact serialises");
            tx.execute("INSERT INTO facts(fact) VALUES (?1)", params![json])?;
        }
        for rec in &change.rounds {
            let json = serde_json::to_string(rec.as_ref()).expect("a record serialises");
            tx.execute(
                "INSERT INTO rounds(round, record) VALUES (?1, ?2)",
                params![rec.round as i64, json],
            )?;
        }
        if let Some(d) = change.divergent {
            tx.execute(set, params!["divergent", d.to_string()])?;
        }
        for a in &change.audits {
            let json = serde_json::to_string(a).expect("an audit serialises");
            tx.execute("INSERT INTO audits(audit) VALUES (?1)", params![json])?;
        }
        Ok(())
    }
}

impl HubStore for SqliteHubStore {
    fn load(&mut self) -> Result<Option<(String, Durable)>, StoreError> {
        let Some(identity) = self.meta("identity")? else {
            return Ok(None);
        };
        let snapshot: Coordinator =
            serde_json::from_str(&self.meta("coordinator")?.ok_or(StoreError::Missing)?)
                .map_err(corrupt("coordinator snapshot"))?;
        let mut facts = Vec::new();
        let mut stmt = self.db.prepare("SELECT fact FROM facts ORDER BY seq")?;
        for row in stmt.query_map([], |r| r.get::<_, String>(0))? {
            facts.push(serde_json::from_str::<StoredFact>(&row?).map_err(corrupt("fact"))?);
        }
        let mut rounds = Vec::new();
        let mut stmt = self
            .db
            .prepare("SELECT record FROM rounds ORDER BY round")?;
        for row in stmt.query_map([], |r| r.get::<_, String>(0))? {
            let rec: RoundRecord = serde_json::from_str(&row?).map_err(corrupt("round record"))?;
            rounds.push(Arc::new(rec));
        }
        let divergent = match self.meta("divergent")? {
            Some(v) => v
                .parse()
                .map_err(|e: std::num::ParseIntError| StoreError::Corrupt {
                    what: "divergence count",
                    error: e.to_string(),
                })?,
            None => 0,
        };
        let mut audits = Vec::new();
        let mut stmt = self.db.prepare("SELECT audit FROM audits ORDER BY seq")?;
        for row in stmt.query_map([], |r| r.get::<_, String>(0))? {
            audits.push(serde_json::from_str::<AuditRecord>(&row?).map_err(corrupt("audit"))?);
        }
        Ok(Some((
            identity,
            Durable {
                snapshot,
                facts,
                rounds,
                divergent,
                audits,
            },
        )))
    }

    fn create(&mut self, identity: &str, change: &Change) -> Result<(), StoreError> {
        let tx = self.db.transaction()?;
        tx.execute(
            "INSERT INTO meta(key, value) VALUES ('identity', ?1)",
            params![identity],
        )?;
        Self::write_in(&tx, change)?;
        tx.commit()?;
        Ok(())
    }

    fn write(&mut self, change: &Change) -> Result<(), StoreError> {
        if change.is_empty() {
            return Ok(());
        }
        let tx = self.db.transaction()?;
        Self::write_in(&tx, change)?;
        tx.commit()?;
        Ok(())
    }
}

#[derive(Debug, Default, Clone)]
struct Image {
    identity: String,
    /// The snapshot as JSON, so the twin exercises the same encoding as SQLite.
    coordinator: String,
    facts: Vec<StoredFact>,
    rounds: Vec<Arc<RoundRecord>>,
    divergent: u64,
    audits: Vec<AuditRecord>,
}

/// The in-memory twin: the durable image behind a shared handle that outlives the
/// engine using it.
#[derive(Debug, Clone, Default)]
pub struct MemoryHubStore {
    image: Arc<Mutex<Option<Image>>>,
    /// Writes still to fail (fault injection).
    fail_writes: Arc<Mutex<u32>>,
}

impl MemoryHubStore {
    pub fn new() -> MemoryHubStore {
        MemoryHubStore::default()
    }

    /// Makes the next `n` writes fail without changing anything.
    pub fn fail_next_writes(&self, n: u32) {
        *self.fail_writes.lock().expect("store lock") = n;
    }

    fn apply(image: &mut Image, change: &Change) {
        if let Some(s) = &change.snapshot {
            image.coordinator = serde_json::to_string(s).expect("a coordinator serialises");
            image.facts.clear();
        }
        image.facts.extend(change.facts.iter().cloned());
        image.rounds.extend(change.rounds.iter().cloned());
        if let Some(d) = change.divergent {
            image.divergent = d;
        }
        image.audits.extend(change.audits.iter().cloned());
    }
}

impl HubStore for MemoryHubStore {
    fn load(&mut self) -> Result<Option<(String, Durable)>, StoreError> {
        let guard = self.image.lock().expect("store lock");
        let Some(image) = guard.as_ref() else {
            return Ok(None);
        };
        let snapshot: Coordinator =
            serde_json::from_str(&image.coordinator).map_err(corrupt("coordinator snapshot"))?;
        Ok(Some((
            image.identity.clone(),
            Durable {
                snapshot,
                facts: image.facts.clone(),
                rounds: image.rounds.clone(),
                divergent: image.divergent,
                audits: image.audits.clone(),
            },
        )))
    }

    fn create(&mut self, identity: &str, change: &Change) -> Result<(), StoreError> {
        let mut image = Image {
            identity: identity.to_string(),
            ..Image::default()
        };
        Self::apply(&mut image, change);
        *self.image.lock().expect("store lock") = Some(image);
        Ok(())
    }

    fn write(&mut self, change: &Change) -> Result<(), StoreError> {
        if change.is_empty() {
            return Ok(());
        }
        {
            let mut fail = self.fail_writes.lock().expect("store lock");
            if *fail > 0 {
                *fail -= 1;
                return Err(StoreError::Injected);
            }
        }
        let mut guard = self.image.lock().expect("store lock");
        let image = guard.as_mut().ok_or(StoreError::Missing)?;
        Self::apply(image, change);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user_version(path: &Path) -> i64 {
        Connection::open(path)
            .unwrap()
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap()
    }

    /// A database from before the format was versioned is stamped and kept; one from
    /// a later format is refused with a message naming both formats, and left as it
    /// was.
    #[test]
    fn store_formats_are_versioned() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hub.db");
        {
            let mut store = SqliteHubStore::open(&path).unwrap();
            store.create("run", &Change::default()).unwrap();
        }
        assert_eq!(user_version(&path), HUB_STORE_VERSION);
        // As an older Tessera left it.
        Connection::open(&path)
            .unwrap()
            .pragma_update(None, "user_version", 0)
            .unwrap();
        let store = SqliteHubStore::open(&path).unwrap();
        assert_eq!(store.meta("identity").unwrap().as_deref(), Some("run"));
        drop(store);
        assert_eq!(user_version(&path), HUB_STORE_VERSION);
        // As a later Tessera would leave it.
        Connection::open(&path)
            .unwrap()
            .pragma_update(None, "user_version", HUB_STORE_VERSION + 1)
            .unwrap();
        let e = SqliteHubStore::open(&path).err().unwrap().to_string();
        assert!(
            e.contains(&format!("format {}", HUB_STORE_VERSION + 1))
                && e.contains(&format!("reads format {HUB_STORE_VERSION}")),
            "{e}"
        );
        assert_eq!(user_version(&path), HUB_STORE_VERSION + 1);
    }
}
