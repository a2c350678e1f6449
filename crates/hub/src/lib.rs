//! The hub: the driver around the pure coordinator. It serves the run's control
//! plane over HTTP, fetches every committed update blob from its node over the data
//! plane (iroh-blobs, hash-verified, size-bounded) and checks it decodes before the
//! commit counts, runs the same outer step as the nodes to keep the checkpoint joiners
//! start from, serves that checkpoint and the accepted blobs as a second source next to
//! their origin nodes, compares the θ hashes nodes report, and keeps everything durable
//! so `kill -9` and a restart resume the run where it was.
//!
//! Durability: after every coordinator input that changes state, the coordinator's
//! snapshot, any closed round's record and the checkpoint pointer are written in one
//! SQLite transaction (WAL, `synchronous=FULL`); the checkpoint and blob files they
//! point to are written and synced before it. A restart therefore sees each round
//! either closed with its checkpoint, or still open with the commits it had.

pub mod config;
pub mod wire;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tessera_net::http_auth::now_ms;

use anyhow::{bail, Context, Result};
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path as UrlPath, Query, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use rusqlite::{params, Connection, OptionalExtension};
use serde::Deserialize;
use tessera_blobs::{BlobTransport, IrohBlobs, IrohOptions, PeerAddr};
use tessera_coordinator::{CoordError, Coordinator, Event, Input, Phase, RunConfig};
use tessera_model::{checkpoint, Preset};
use tessera_train::data::{Dataset, Windows, MANIFEST_FILE};
use tessera_train::eval::{evaluate_windows, EvalResult};
use tessera_train::outer::decode;
use tessera_train::worker::{OuterState, RunSpec};

pub use config::HubConfig;
pub use wire::{CommitBody, NodeStats, RoundRecord, RunInfo, StateView, Summary, ThetaReport};

struct Hub {
    config: HubConfig,
    spec: RunSpec,
    coord: Coordinator,
    outer: OuterState,
    checkpoint: String,
    rounds: BTreeMap<u64, RoundRecord>,
    stats: BTreeMap<String, NodeStats>,
    divergent: u64,
    final_eval: Option<EvalResult>,
    db: Connection,
    blob_dir: PathBuf,
    /// The data plane: serves checkpoints and accepted blobs, fetches commits' blobs.
    blobs: Arc<dyn BlobTransport>,
    /// Where each blob committed in the open round came from.
    sources: BTreeMap<String, PeerAddr>,
    started_ms: u64,
    /// The data set's files, served to nodes (listed once: opening the set hashes it).
    data_files: Vec<String>,
    /// The token ledger that pays closed rounds, when the run has one.
    /// Shared with the ledger routes the hub serves under `/ledger/`.
    ledger: Option<Arc<tessera_net::LedgerService>>,
}

fn write_blob(dir: &Path, bytes: &[u8]) -> Result<String> {
    let hash = blake3::hash(bytes).to_hex().to_string();
    let path = dir.join(&hash);
    if !path.exists() {
        checkpoint::write_atomic(&path, bytes)
            .with_context(|| format!("writing blob {}", path.display()))?;
    }
    Ok(hash)
}

impl Hub {
    fn open(config: HubConfig) -> Result<Hub> {
        std::fs::create_dir_all(&config.state_dir)
            .with_context(|| format!("creating {}", config.state_dir.display()))?;
        let blob_dir = config.state_dir.join("blobs");
        std::fs::create_dir_all(&blob_dir)?;
        let data = Dataset::open(&config.data)
            .with_context(|| format!("opening data set {}", config.data.display()))?;
        let manifest_bytes = std::fs::read(config.data.join(MANIFEST_FILE))?;
        let mut model = Preset::by_name(&config.preset)?.config();
        model.vocab_size = data.manifest.vocab_size.div_ceil(64) * 64;
        if config.seq_len > model.max_position_embeddings {
            bail!(
                "seq_len {} exceeds the model's context {}",
                config.seq_len,
                model.max_position_embeddings
            );
        }
        let spec = RunSpec {
            run_id: config.run_id.clone(),
            model,
            data_manifest_blake3: blake3::hash(&manifest_bytes).to_hex().to_string(),
            batch_size: config.batch_size,
            seq_len: config.seq_len,
            inner_steps: config.inner_steps,
            rounds_total: config.rounds,
            lr: config.lr,
            warmup_steps: config.warmup_steps,
            grad_clip: 1.0,
            outer_lr: config.outer_lr,
            outer_momentum: config.outer_momentum,
            ef_decay: config.ef_decay,
            codec: config.codec()?,
            aggregator: config.aggregator()?,
            seed: config.seed,
        };
        let windows = Windows::new(&data.train, config.seq_len);
        let data_files = data.files();
        let db = Connection::open(config.state_dir.join("hub.db"))?;
        db.pragma_update(None, "journal_mode", "WAL")?;
        db.pragma_update(None, "synchronous", "FULL")?;
        db.execute_batch(
            "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS rounds (round INTEGER PRIMARY KEY, record TEXT NOT NULL);",
        )?;
        let saved_spec: Option<String> = db
            .query_row("SELECT value FROM meta WHERE key='spec'", [], |r| r.get(0))
            .optional()?;
        let spec_json = serde_json::to_string(&spec)?;
        let (coord, outer, checkpoint, rounds) = match saved_spec {
            Some(saved) => {
                if saved != spec_json {
                    bail!(
                        "{} holds a run with different settings; use a new state_dir",
                        config.state_dir.display()
                    );
                }
                let mut coord: Coordinator = serde_json::from_str(&db.query_row(
                    "SELECT value FROM meta WHERE key='coordinator'",
                    [],
                    |r| r.get::<_, String>(0),
                )?)?;
                let checkpoint: String =
                    db.query_row("SELECT value FROM meta WHERE key='checkpoint'", [], |r| {
                        r.get(0)
                    })?;
                let bytes = std::fs::read(blob_dir.join(&checkpoint))
                    .context("reading the checkpoint blob")?;
                let outer = OuterState::from_bytes(&spec, &bytes).map_err(anyhow::Error::msg)?;
                let mut rounds = BTreeMap::new();
                let mut stmt = db.prepare("SELECT record FROM rounds ORDER BY round")?;
                for row in stmt.query_map([], |r| r.get::<_, String>(0))? {
                    let rec: RoundRecord = serde_json::from_str(&row?)?;
                    rounds.insert(rec.round, rec);
                }
                drop(stmt);
                coord.refresh_members(now_ms());
                eprintln!(
                    "hub: resumed run {} at round {} ({} closed)",
                    spec.run_id,
                    coord.closed_rounds,
                    rounds.len()
                );
                (coord, outer, checkpoint, rounds)
            }
            None => {
                let coord = Coordinator::new(
                    RunConfig {
                        run_id: config.run_id.clone(),
                        min_nodes: config.min_nodes,
                        max_nodes: config.max_nodes,
                        round_deadline_ms: config.round_deadline_ms,
                        heartbeat_timeout_ms: config.heartbeat_timeout_ms,
                        missed_rounds_max: config.missed_rounds_max,
                        batches_per_node: config.inner_steps,
                        batches_per_epoch: (windows.len() / config.batch_size.max(1)) as u64,
                        rounds_total: config.rounds,
                        seed: config.seed,
                    },
                    spec.tokens_per_batch(),
                );
                let outer = OuterState::initial(&spec);
                let checkpoint = write_blob(&blob_dir, &outer.to_bytes())?;
                let tx = db.unchecked_transaction()?;
                tx.execute(
                    "INSERT INTO meta(key, value) VALUES ('spec', ?1)",
                    params![spec_json],
                )?;
                tx.execute(
                    "INSERT INTO meta(key, value) VALUES ('checkpoint', ?1)",
                    params![checkpoint],
                )?;
                tx.execute(
                    "INSERT INTO meta(key, value) VALUES ('coordinator', ?1)",
                    params![serde_json::to_string(&coord)?],
                )?;
                tx.commit()?;
                (coord, outer, checkpoint, BTreeMap::new())
            }
        };
        let divergent: u64 = db
            .query_row("SELECT value FROM meta WHERE key='divergent'", [], |r| {
                r.get::<_, String>(0)
            })
            .optional()?
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let ledger = match &config.ledger {
            Some(path) => {
                let ledger = tessera_ledger::Ledger::open(tessera_ledger::SqliteStore::open(path)?)
                    .with_context(|| format!("opening ledger {}", path.display()))?;
                let organiser = match &config.organiser {
                    Some(key) => tessera_protocol::identity::parse_public(key)?,
                    None => String::new(),
                };
                Some(Arc::new(tessera_net::LedgerService::new(ledger, organiser)))
            }
            None => None,
        };
        let blobs: Arc<dyn BlobTransport> = Arc::new(
            IrohBlobs::bind(IrohOptions {
                bind: config.blob_bind,
                ..IrohOptions::loopback()
            })
            .context("starting the hub's blob endpoint")?,
        );
        // Serve again what nodes may still ask for: the checkpoint, the last closed
        // round's blobs (for nodes one round behind) and the open round's commits.
        let mut serve_again = vec![checkpoint.clone()];
        if let Some(last) = rounds.values().next_back() {
            serve_again.extend(last.accepted.iter().map(|(_, h)| h.clone()));
        }
        serve_again.extend(coord.commits.values().map(|c| c.blob_hash.clone()));
        for hash in serve_again {
            let bytes = std::fs::read(blob_dir.join(&hash))
                .with_context(|| format!("reading blob {hash}"))?;
            blobs.publish(&bytes)?;
        }
        let mut hub = Hub {
            config,
            spec,
            coord,
            outer,
            checkpoint,
            rounds,
            stats: BTreeMap::new(),
            divergent,
            final_eval: None,
            db,
            blob_dir,
            blobs,
            sources: BTreeMap::new(),
            started_ms: now_ms(),
            data_files,
            ledger,
        };
        hub.pay_rounds();
        Ok(hub)
    }

    /// Applies an input, handles its events, and persists the result atomically.
    fn input(&mut self, input: Input) -> Result<Vec<Event>, HubError> {
        let before = self.coord.clone();
        let events = self.coord.apply(input, now_ms()).map_err(HubError::Coord)?;
        // Everything below either completes, or is undone: memory must never run
        // ahead of what is durable.
        let outer_before = events
            .iter()
            .any(|e| matches!(e, Event::RoundClosed { .. }))
            .then(|| (self.outer.clone(), self.checkpoint.clone()));
        let mut step = || -> Result<Vec<RoundRecord>, HubError> {
            let mut closed = Vec::new();
            for e in &events {
                match e {
                    Event::RoundClosed {
                        round,
                        accepted,
                        late,
                        work,
                    } => {
                        let mut blobs = Vec::with_capacity(accepted.len());
                        for c in accepted.values() {
                            blobs.push(
                                std::fs::read(self.blob_dir.join(&c.blob_hash))
                                    .map_err(|e| HubError::Internal(e.to_string()))?,
                            );
                        }
                        self.outer
                            .apply(&self.spec, &blobs)
                            .map_err(|e| HubError::Internal(e.to_string()))?;
                        let bytes = self.outer.to_bytes();
                        let checkpoint = write_blob(&self.blob_dir, &bytes)
                            .map_err(|e| HubError::Internal(e.to_string()))?;
                        self.blobs
                            .publish(&bytes)
                            .map_err(|e| HubError::Internal(e.to_string()))?;
                        self.checkpoint = checkpoint.clone();
                        let hub_addr = self.blobs.addr();
                        let rec = RoundRecord {
                            round: *round,
                            accepted: accepted
                                .iter()
                                .map(|(n, c)| (n.clone(), c.blob_hash.clone()))
                                .collect(),
                            sources: accepted
                                .values()
                                .map(|c| {
                                    self.sources
                                        .get(&c.blob_hash)
                                        .cloned()
                                        .unwrap_or_else(|| hub_addr.clone())
                                })
                                .collect(),
                            late: late.clone(),
                            tokens: work.iter().map(|w| w.tokens).sum(),
                            work: work.iter().map(|w| (w.node.clone(), w.tokens)).collect(),
                            theta_after: self.outer.hash(),
                            checkpoint,
                        };
                        eprintln!(
                            "hub: round {round} closed: {} accepted, {} late, θ {}",
                            rec.accepted.len(),
                            rec.late.len(),
                            &rec.theta_after[..12]
                        );
                        closed.push(rec);
                    }
                    Event::MemberDropped { node, reason } => {
                        eprintln!("hub: dropped {}: {reason}", &node[..12.min(node.len())])
                    }
                    Event::RoundStarted {
                        round, assignment, ..
                    } => eprintln!(
                        "hub: round {round} started with {} node(s)",
                        assignment.len()
                    ),
                    Event::Finished { rounds } => {
                        eprintln!("hub: run finished after {rounds} rounds")
                    }
                }
            }
            if self.coord != before || !closed.is_empty() {
                let persist = || -> rusqlite::Result<()> {
                    let tx = self.db.unchecked_transaction()?;
                    tx.execute(
                        "UPDATE meta SET value = ?1 WHERE key = 'coordinator'",
                        params![serde_json::to_string(&self.coord).expect("serialises")],
                    )?;
                    for rec in &closed {
                        tx.execute(
                            "INSERT INTO rounds(round, record) VALUES (?1, ?2)",
                            params![
                                rec.round as i64,
                                serde_json::to_string(rec).expect("serialises")
                            ],
                        )?;
                        tx.execute(
                            "UPDATE meta SET value = ?1 WHERE key = 'checkpoint'",
                            params![rec.checkpoint],
                        )?;
                    }
                    tx.commit()
                };
                persist().map_err(|e| HubError::Internal(format!("persisting hub state: {e}")))?;
            }
            Ok(closed)
        };
        let closed = match step() {
            Ok(closed) => closed,
            Err(e) => {
                self.coord = before;
                if let Some((outer, checkpoint)) = outer_before {
                    self.outer = outer;
                    self.checkpoint = checkpoint;
                }
                return Err(e);
            }
        };
        if !closed.is_empty() {
            for rec in closed {
                self.rounds.insert(rec.round, rec);
            }
            self.sources.clear();
            self.prune();
            self.pay_rounds();
        }
        if events.iter().any(|e| matches!(e, Event::Finished { .. })) {
            self.finish();
        }
        Ok(events)
    }

    /// Stops serving, and deletes, the blobs and checkpoints of rounds two or more
    /// behind the last closed one: nobody needs them any more (a node further behind
    /// loads the current checkpoint). What the current state points to is kept.
    fn prune(&mut self) {
        let Some(&last) = self.rounds.keys().next_back() else {
            return;
        };
        let Some(old) = last.checked_sub(2).and_then(|r| self.rounds.get(&r)) else {
            return;
        };
        let keep: std::collections::BTreeSet<&String> = self
            .rounds
            .range(last - 1..)
            .flat_map(|(_, r)| r.accepted.iter().map(|(_, h)| h).chain([&r.checkpoint]))
            .chain([&self.checkpoint])
            .collect();
        let stale: Vec<String> = old
            .accepted
            .iter()
            .map(|(_, h)| h)
            .chain([&old.checkpoint])
            .filter(|h| !keep.contains(h))
            .cloned()
            .collect();
        for hash in stale {
            self.blobs.forget(&hash);
            let _ = std::fs::remove_file(self.blob_dir.join(&hash));
        }
    }

    /// Pays every closed round the ledger has not paid yet, from its work record.
    ///
    /// The hub's round records and the ledger are separate databases, so a crash can
    /// fall between closing a round and paying it. Payout request ids are
    /// `payout:RUN:ROUND`, so re-submitting after a restart is a no-op for rounds already
    /// paid and pays the rest: each round is paid exactly once. Until audits exist every
    /// accepted update has full score weight.
    fn pay_rounds(&mut self) {
        let Some(svc) = self.ledger.clone() else {
            return;
        };
        let mut ledger = svc.ledger.lock().expect("ledger lock");
        let run = self.config.run_id.clone();
        for rec in self.rounds.values() {
            let paid = ledger
                .state()
                .run(&run)
                .is_some_and(|r| r.paid.contains_key(&rec.round));
            if paid || rec.work.is_empty() {
                continue;
            }
            let work = rec
                .work
                .iter()
                .map(|(node, tokens)| tessera_ledger::Work {
                    contributor: node.clone(),
                    tokens: *tokens,
                    score_ppm: 1_000_000,
                })
                .collect();
            let request = tessera_ledger::Request {
                id: format!("payout:{run}:{}", rec.round),
                signer: tessera_ledger::Signer::Organiser,
                op: tessera_ledger::Operation::Payout {
                    run: run.clone(),
                    round: rec.round,
                    work,
                },
            };
            match ledger.submit(&request, now_ms()) {
                Ok(receipt) => eprintln!(
                    "hub: paid round {} ({} transfers)",
                    rec.round,
                    receipt.transfers.len()
                ),
                Err(e) => {
                    eprintln!("hub: round {} not paid: {e}", rec.round);
                    break;
                }
            }
        }
    }

    /// Writes the final model as a Hugging Face checkpoint and evaluates it.
    fn finish(&mut self) {
        let result = (|| -> Result<(PathBuf, EvalResult)> {
            let data = Dataset::open(&self.config.data)?;
            let model =
                tessera_model::Llama::new(&self.spec.model, tch::Device::Cpu, self.spec.seed);
            tessera_train::diloco::load_flat(&model, &self.outer.theta);
            let dir = self.config.state_dir.join("final");
            checkpoint::save(&model, data.tokenizer_json.as_bytes(), &dir)?;
            let windows = data.validation_windows(self.spec.seq_len, 1 << 16);
            let byte_lens = tessera_train::data::token_byte_lengths(&data.tokenizer);
            Ok((dir, evaluate_windows(&model, &windows, 8, &byte_lens)))
        })();
        match result {
            Ok((dir, eval)) => {
                eprintln!(
                    "hub: final checkpoint {} (validation {:.4} bits per byte)",
                    dir.display(),
                    eval.bpb
                );
                self.final_eval = Some(eval);
            }
            Err(e) => eprintln!("hub: writing the final checkpoint failed: {e:#}"),
        }
    }

    fn summary(&self) -> Summary {
        let n = self.spec.model.params_total();
        let steps = self.coord.closed_rounds * self.spec.inner_steps;
        let m = self
            .rounds
            .values()
            .map(|r| r.accepted.len())
            .max()
            .unwrap_or(1)
            .max(1) as f64;
        Summary {
            run_id: self.spec.run_id.clone(),
            finished: self.coord.phase == Phase::Finished,
            rounds_closed: self.coord.closed_rounds,
            params: n,
            theta_hash: self.outer.hash(),
            divergent_reports: self.divergent,
            nodes: self.stats.clone(),
            ddp_bytes_per_node: (steps as f64 * 2.0 * 2.0 * (m - 1.0) / m * 4.0 * n as f64) as u64,
            final_eval: self.final_eval,
            final_checkpoint: self.final_eval.map(|_| self.config.state_dir.join("final")),
        }
    }
}

/// Why a request failed, as an HTTP status.
#[derive(Debug)]
pub enum HubError {
    Auth(String),
    Bad(String),
    NotFound(String),
    Coord(CoordError),
    Internal(String),
}

impl IntoResponse for HubError {
    fn into_response(self) -> Response {
        let (status, msg) = match self {
            HubError::Auth(m) => (StatusCode::UNAUTHORIZED, m),
            HubError::Bad(m) => (StatusCode::BAD_REQUEST, m),
            HubError::NotFound(m) => (StatusCode::NOT_FOUND, m),
            HubError::Coord(e) => (StatusCode::CONFLICT, e.to_string()),
            HubError::Internal(m) => (StatusCode::INTERNAL_SERVER_ERROR, m),
        };
        (status, Json(serde_json::json!({"error": msg}))).into_response()
    }
}

type Shared = Arc<Mutex<Hub>>;

/// Signatures of control messages already accepted by this process's hub.
static REPLAYS: std::sync::LazyLock<tessera_protocol::auth::ReplayGuard> =
    std::sync::LazyLock::new(tessera_protocol::auth::ReplayGuard::new);

/// Checks a control message's signature (method, path, body, fresh timestamp) and that
/// it is not a replay; returns the signer.
fn auth(method: &Method, uri: &Uri, headers: &HeaderMap, body: &[u8]) -> Result<String, HubError> {
    tessera_net::http_auth::verify_http_once(method, uri, headers, body, now_ms(), &REPLAYS)
        .map_err(|e| HubError::Auth(e.to_string()))
}

async fn run_info(State(hub): State<Shared>) -> Json<RunInfo> {
    let hub = hub.lock().expect("hub lock");
    Json(RunInfo {
        spec: hub.spec.clone(),
        data_files: hub.data_files.clone(),
        hub_blobs: hub.blobs.addr(),
    })
}

async fn data_file(
    State(hub): State<Shared>,
    UrlPath(name): UrlPath<String>,
) -> Result<Vec<u8>, HubError> {
    let (dir, listed) = {
        let hub = hub.lock().expect("hub lock");
        (hub.config.data.clone(), hub.data_files.contains(&name))
    };
    // Only the data set's own files are served, never another path in its directory.
    if !listed {
        return Err(HubError::NotFound(format!("no data file `{name}`")));
    }
    std::fs::read(dir.join(&name)).map_err(|_| HubError::NotFound(format!("no data file `{name}`")))
}

/// Signed, bodiless membership messages.
async fn membership(
    State(hub): State<Shared>,
    UrlPath(action): UrlPath<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<serde_json::Value>, HubError> {
    let node = auth(&method, &uri, &headers, &body)?;
    let mut hub = hub.lock().expect("hub lock");
    let input = match action.as_str() {
        "join" => Input::Join { node: node.clone() },
        "leave" => Input::Leave { node: node.clone() },
        "heartbeat" => {
            if !body.is_empty() {
                let stats: NodeStats = serde_json::from_slice(&body)
                    .map_err(|e| HubError::Bad(format!("bad heartbeat body: {e}")))?;
                hub.stats.insert(node.clone(), stats);
            }
            Input::Heartbeat { node: node.clone() }
        }
        other => return Err(HubError::NotFound(format!("no action `{other}`"))),
    };
    hub.input(input)?;
    Ok(Json(
        serde_json::json!({"round": hub.coord.round(), "closed_rounds": hub.coord.closed_rounds}),
    ))
}

/// A commit counts only once the hub holds its blob: fetched from the node's endpoint
/// (verified against the hash while it streams, refused past the run's update size),
/// decoded, and stored durably. The fetch runs without the hub lock, so a slow node
/// holds up only its own commit.
async fn commit(
    State(hub): State<Shared>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<serde_json::Value>, HubError> {
    let node = auth(&method, &uri, &headers, &body)?;
    let c: CommitBody = serde_json::from_slice(&body)
        .map_err(|e| HubError::Bad(format!("malformed commit: {e}")))?;
    let (blobs, blob_dir, n, max) = {
        let hub = hub.lock().expect("hub lock");
        if c.run_id != hub.spec.run_id {
            return Err(HubError::Bad(format!(
                "commit is for run `{}`, this hub runs `{}`",
                c.run_id, hub.spec.run_id
            )));
        }
        if !hub.coord.members.contains_key(&node) {
            return Err(HubError::Auth(format!("{} is not a member", &node[..12])));
        }
        if hub.coord.round() != Some(c.round) {
            return Err(HubError::Bad(format!(
                "commit is for round {}, the open round is {:?}",
                c.round,
                hub.coord.round()
            )));
        }
        tessera_blobs::check_hash(&c.commit.blob_hash).map_err(|e| HubError::Bad(e.to_string()))?;
        let n = hub.spec.model.params_total();
        let max = hub.spec.codec.max_encoded_bytes(n as usize) as u64;
        (hub.blobs.clone(), hub.blob_dir.clone(), n, max)
    };
    let hash = c.commit.blob_hash.clone();
    let provider = c.provider.clone();
    tokio::task::spawn_blocking(move || -> Result<(), HubError> {
        let bytes = blobs
            .fetch(&hash, &[provider], max)
            .map_err(|e| HubError::Bad(format!("commit's blob refused: {e}")))?;
        decode(&bytes, n).map_err(|e| HubError::Bad(format!("commit's blob refused: {e}")))?;
        write_blob(&blob_dir, &bytes).map_err(|e| HubError::Internal(e.to_string()))?;
        Ok(())
    })
    .await
    .map_err(|e| HubError::Internal(e.to_string()))??;
    let mut hub = hub.lock().expect("hub lock");
    hub.sources.insert(c.commit.blob_hash.clone(), c.provider);
    hub.input(Input::Commit {
        node,
        round: c.round,
        commit: c.commit,
    })?;
    Ok(Json(serde_json::json!({"ok": true})))
}

#[derive(Deserialize)]
struct StateQuery {
    node: Option<String>,
}

async fn state(State(hub): State<Shared>, Query(q): Query<StateQuery>) -> Json<StateView> {
    let hub = hub.lock().expect("hub lock");
    let node = q.node.unwrap_or_default();
    Json(StateView {
        phase: hub.coord.phase.clone(),
        round: hub.coord.round(),
        assignment: hub.coord.assignment.get(&node).cloned(),
        committed: hub.coord.commits.contains_key(&node),
        deadline_ms: hub.coord.deadline_ms,
        closed_rounds: hub.coord.closed_rounds,
        checkpoint: hub.checkpoint.clone(),
        last_round: hub.rounds.values().next_back().cloned(),
    })
}

async fn round(
    State(hub): State<Shared>,
    UrlPath(r): UrlPath<u64>,
) -> Result<Json<RoundRecord>, HubError> {
    let hub = hub.lock().expect("hub lock");
    hub.rounds
        .get(&r)
        .cloned()
        .map(Json)
        .ok_or_else(|| HubError::NotFound(format!("round {r} is not closed")))
}

async fn theta(
    State(hub): State<Shared>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<serde_json::Value>, HubError> {
    let node = auth(&method, &uri, &headers, &body)?;
    let report: ThetaReport = serde_json::from_slice(&body)
        .map_err(|e| HubError::Bad(format!("malformed report: {e}")))?;
    let mut hub = hub.lock().expect("hub lock");
    if report.run_id != hub.spec.run_id {
        return Err(HubError::Bad(format!(
            "report is for run `{}`, this hub runs `{}`",
            report.run_id, hub.spec.run_id
        )));
    }
    let expected = hub
        .rounds
        .get(&report.round)
        .map(|r| r.theta_after.clone())
        .ok_or_else(|| HubError::NotFound(format!("round {} is not closed", report.round)))?;
    let agrees = expected == report.hash;
    if !agrees {
        hub.divergent += 1;
        let count = hub.divergent.to_string();
        // Kept durable so a restart does not hide a divergence.
        let _ = hub.db.execute("INSERT INTO meta(key, value) VALUES ('divergent', ?1) ON CONFLICT(key) DO UPDATE SET value = excluded.value", params![count]);
        eprintln!(
            "hub: DIVERGENCE: node {} reports θ {} after round {}, expected {}",
            &node[..12],
            report.hash,
            report.round,
            expected
        );
    }
    Ok(Json(
        serde_json::json!({"agrees": agrees, "expected": expected}),
    ))
}

async fn metrics(State(hub): State<Shared>) -> String {
    let hub = hub.lock().expect("hub lock");
    let s = hub.summary();
    let mut out = String::new();
    out.push_str("# HELP tessera_rounds_closed Rounds closed so far.\n# TYPE tessera_rounds_closed counter\n");
    out.push_str(&format!("tessera_rounds_closed {}\n", s.rounds_closed));
    out.push_str("# HELP tessera_members Current members.\n# TYPE tessera_members gauge\n");
    out.push_str(&format!("tessera_members {}\n", hub.coord.members.len()));
    out.push_str("# HELP tessera_theta_divergent_reports Node θ hashes that differed from the hub's.\n# TYPE tessera_theta_divergent_reports counter\n");
    out.push_str(&format!(
        "tessera_theta_divergent_reports {}\n",
        s.divergent_reports
    ));
    out.push_str("# HELP tessera_uptime_seconds Seconds since the hub started.\n# TYPE tessera_uptime_seconds gauge\n");
    out.push_str(&format!(
        "tessera_uptime_seconds {}\n",
        now_ms().saturating_sub(hub.started_ms) / 1000
    ));
    out.push_str("# HELP tessera_node_bytes_sent Bytes a node reports having sent.\n# TYPE tessera_node_bytes_sent counter\n");
    for (n, st) in &s.nodes {
        out.push_str(&format!(
            "tessera_node_bytes_sent{{node=\"{}\"}} {}\n",
            &n[..16],
            st.bytes_sent
        ));
    }
    out
}

async fn summary(State(hub): State<Shared>) -> Json<Summary> {
    Json(hub.lock().expect("hub lock").summary())
}

use tessera_protocol::limits::CONTROL_BODY_BYTES_MAX;

fn router(hub: Shared) -> Router {
    Router::new()
        .route("/run", get(run_info))
        .route("/data/{file}", get(data_file))
        .route("/node/{action}", post(membership))
        .route("/commit", post(commit))
        .route("/state", get(state))
        .route("/rounds/{round}", get(round))
        .route("/theta", post(theta))
        .route("/metrics", get(metrics))
        .route("/summary", get(summary))
        .layer(DefaultBodyLimit::max(CONTROL_BODY_BYTES_MAX))
        .with_state(hub)
}

/// Runs the hub until the process is stopped: serves the API and ticks the
/// coordinator four times a second.
pub async fn serve(config: HubConfig) -> Result<()> {
    let listen = config.listen.clone();
    let hub: Shared = Arc::new(Mutex::new(Hub::open(config)?));
    let router = router(hub.clone());
    let ledger_routes = hub
        .lock()
        .expect("hub lock")
        .ledger
        .clone()
        .map(tessera_net::ledger_router);
    let router = match ledger_routes {
        Some(l) => router.merge(l),
        None => router,
    };
    let ticker = hub.clone();
    tokio::spawn(async move {
        let mut interval = tokio::time::interval(std::time::Duration::from_millis(250));
        loop {
            interval.tick().await;
            let mut h = ticker.lock().expect("hub lock");
            if let Err(e) = h.input(Input::Tick) {
                if !matches!(e, HubError::Coord(CoordError::Finished)) {
                    eprintln!("hub: tick failed: {e:?}");
                }
            }
        }
    });
    let listener = tokio::net::TcpListener::bind(&listen)
        .await
        .with_context(|| format!("listening on {listen}"))?;
    eprintln!("hub: serving run on http://{}", listener.local_addr()?);
    axum::serve(listener, router).await?;
    Ok(())
}
