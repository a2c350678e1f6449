//! The hub: the pure hub engine ([`engine::HubState`]) behind a thin I/O layer. The
//! engine decides; this file moves bytes. It serves the control plane over HTTP (axum),
//! fetches every committed update blob from its node over the data plane (iroh-blobs,
//! hash-verified, size-bounded) and checks it decodes before the commit reaches the
//! engine, keeps the engine's state in SQLite ([`store::SqliteHubStore`]), takes the
//! outer step on blob files ([`FileOuter`]) to keep the checkpoint joiners start from,
//! pays closed rounds through the ledger, and writes the final model.
//!
//! Concurrency: one engine thread owns the engine, its store and the outer step, and
//! takes calls from the HTTP handlers over a bounded channel; it answers an input only
//! after the input's change is durable. No lock is held across a fetch, an fsync or an
//! evaluation in async code: handlers wait on a reply channel, blob fetches run on
//! tokio's blocking pool without touching the engine.

pub mod config;
pub mod dashboard;
pub mod engine;
pub mod host;
pub mod metrics;
pub mod store;
pub mod validator;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use axum::body::Bytes;
use axum::extract::{
    ConnectInfo, DefaultBodyLimit, FromRequest, Path as UrlPath, Query, Request, State,
};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use tessera_blobs::{BlobTransport, IrohBlobs, IrohOptions};
use tessera_model::{checkpoint, Preset};
use tessera_net::http_auth::now_ms;
use tessera_net::ServerAuth;
use tessera_outer::shard::{aggregate_whole, ShardInputs, ShardLayout};
use tessera_outer::{decode_for, slice, OuterState};
use tessera_protocol::limits::CONTROL_BODY_BYTES_MAX;
use tessera_protocol::wire::{
    Ack, AggregateReply, AggregateReport, CommitBody, ErrorBody, ErrorCode, FinalEval, NodeStats,
    RevealBody, RoundRecord, RunInfo, StateView, Summary, ThetaReply, ThetaReport, Verdict,
};
use tessera_protocol::{Hash32, NodeId, RunSpec};
use tessera_train::data::{Dataset, Windows, MANIFEST_FILE};
use tokio::sync::{mpsc, oneshot};

pub use config::HubConfig;
use engine::{
    Applied, Effect, HubError, HubInput, HubState, Judging, OuterStep, PendingAudit, StepOutcome,
};
use host::Host;
use store::SqliteHubStore;
use validator::Validator;

/// The hub's signing key, in its `state_dir`, created when absent.
pub const HUB_KEY_FILE: &str = "hub.key";

/// Writes `bytes` as the content-addressed, fsynced file `dir/HASH`.
fn write_blob(dir: &Path, bytes: &[u8]) -> Result<Hash32> {
    write_blob_new(dir, bytes).map(|(h, _)| h)
}

/// [`write_blob`], also saying whether the file is new (so a refusal can take back
/// only what it wrote).
fn write_blob_new(dir: &Path, bytes: &[u8]) -> Result<(Hash32, bool)> {
    let hash = Hash32::of(bytes);
    let path = dir.join(hash.to_hex());
    if path.exists() {
        return Ok((hash, false));
    }
    checkpoint::write_atomic(&path, bytes)
        .with_context(|| format!("writing blob {}", path.display()))?;
    Ok((hash, true))
}

/// Reads the stored blob `dir/HASH` and checks it still hashes to its name.
///
/// Story (hardening #10): stored blobs and checkpoints were not re-hashed when loaded,
/// so a flipped byte on disk was served silently and joiners could not fetch the hash
/// the hub advertised.
fn read_blob(dir: &Path, hash: Hash32) -> Result<Vec<u8>> {
    let path = dir.join(hash.to_hex());
    let bytes = std::fs::read(&path).with_context(|| format!("reading blob {}", path.display()))?;
    if Hash32::of(&bytes) != hash {
        bail!(
            "stored blob {} is corrupt: its content no longer hashes to its name",
            path.display()
        );
    }
    Ok(bytes)
}

/// The hub's outer step on blob files: the accepted updates are files in `dir` (the
/// commit handler stored them), each checkpoint is written there and published on the
/// hub's blob endpoint. Keeps the latest state in memory.
pub struct FileOuter {
    dir: PathBuf,
    blobs: Arc<dyn BlobTransport>,
    spec: RunSpec,
    params: usize,
    current: Option<(Hash32, OuterState)>,
    /// Under `overlap`, the state before `current` too: a round is judged from θ one
    /// step older than the one it steps.
    older: Option<(Hash32, OuterState)>,
    validator: Validator,
    /// Blobs of the last rounds' sharded aggregation (pieces, inputs, shards), served
    /// to aggregators and members until [`SHARD_ROUNDS_KEPT`] later rounds closed.
    shard_blobs: BTreeMap<u64, Vec<String>>,
}

/// Where the hub keeps the port its blob endpoint bound, when `blob_bind` names none.
const BLOB_PORT_FILE: &str = "blob_port";

/// The hub's blob endpoint, the same across restarts: its key is derived from the
/// hub's, and with `blob_bind` on port 0 it binds again the port it got at its first
/// start (kept in `state_dir`), so the address nodes read from the run info at their
/// start keeps working after a restart. A port taken meanwhile gives a new one.
fn bind_blobs(
    dep: &config::Deployment,
    key: &tessera_protocol::Identity,
    relays: &[tessera_protocol::RelayInfo],
) -> Result<IrohBlobs> {
    let port_file = dep.state_dir.join(BLOB_PORT_FILE);
    let kept = (dep.blob_bind.port() == 0)
        .then(|| {
            std::fs::read_to_string(&port_file)
                .ok()?
                .trim()
                .parse::<u16>()
                .ok()
        })
        .flatten()
        .filter(|p| *p != 0);
    let bind = |port: u16| {
        IrohBlobs::bind(IrohOptions {
            bind: SocketAddr::new(dep.blob_bind.ip(), port),
            relays: relays.to_vec(),
            secret_key: Some(key.derive_secret(HUB_BLOB_KEY_CONTEXT)),
            ..IrohOptions::loopback()
        })
    };
    let blobs = match kept.map(bind) {
        Some(Ok(b)) => b,
        Some(Err(e)) => {
            log(&format!(
                "the blob endpoint's port {} is taken ({e}); binding another",
                kept.unwrap_or(0)
            ));
            bind(0).context("starting the hub's blob endpoint")?
        }
        None => bind(dep.blob_bind.port()).context("starting the hub's blob endpoint")?,
    };
    if dep.blob_bind.port() == 0 {
        if let Some(port) = blobs.bound_sockets().first().map(|a| a.port()) {
            std::fs::write(&port_file, format!("{port}\n"))
                .with_context(|| format!("writing {}", port_file.display()))?;
        }
    }
    Ok(blobs)
}

/// Context of the hub's blob endpoint key, derived from the hub's key.
const HUB_BLOB_KEY_CONTEXT: &str = "tessera hub blob endpoint v1";

/// Each shard's (inputs, aggregated shard) hashes.
type ShardHashes = Vec<(Hash32, Hash32)>;

/// Rounds of sharded-aggregation blobs the hub keeps serving: members one round
/// behind still step from the last round's shards.
const SHARD_ROUNDS_KEPT: usize = 2;

impl FileOuter {
    /// Writes θ and velocity after a step as the new checkpoint, publishes it, and
    /// makes it current.
    fn finish_step(&mut self, state: OuterState) -> Result<StepOutcome, String> {
        let bytes = state.to_bytes();
        let checkpoint = write_blob(&self.dir, &bytes).map_err(|e| format!("{e:#}"))?;
        self.blobs.publish(&bytes).map_err(|e| e.to_string())?;
        let theta_after = Hash32(state.digest());
        let old = self.current.replace((checkpoint, state));
        if self.spec.overlap {
            self.older = old;
        }
        Ok(StepOutcome {
            theta_after,
            checkpoint,
        })
    }

    fn publish(&self, bytes: &[u8], kept: &mut Vec<String>) -> Result<Hash32, String> {
        let hex = self.blobs.publish(bytes).map_err(|e| e.to_string())?;
        let hash = Hash32::from_hex(&hex).map_err(|e| e.to_string())?;
        kept.push(hex);
        Ok(hash)
    }

    /// A sharded round's pieces, inputs and aggregated shards, computed from the
    /// accepted updates on disk and published (kept for [`SHARD_ROUNDS_KEPT`] rounds);
    /// returns each shard's (inputs, shard) hashes and the aggregate to apply. A
    /// restarted hub calls it again for the last round: the same updates give the same
    /// blobs.
    fn publish_shards(
        &mut self,
        round: u64,
        accepted: &[(NodeId, Hash32)],
        shards: usize,
    ) -> Result<(ShardHashes, Vec<f32>), String> {
        let codec = self.spec.codec()?;
        let n = self.params;
        let blobs = accepted
            .iter()
            .map(|(_, h)| read_blob(&self.dir, *h).map_err(|e| format!("{e:#}")))
            .collect::<Result<Vec<_>, _>>()?;
        let updates = blobs
            .iter()
            .map(|b| decode_for(codec, b, n as u64).map_err(|e| e.to_string()))
            .collect::<Result<Vec<_>, _>>()?;
        let refs: Vec<&[f32]> = updates.iter().map(Vec::as_slice).collect();
        let layout = ShardLayout::new(n, shards);
        let whole = aggregate_whole(
            self.spec.shard_codec()?,
            self.spec.aggregator,
            &refs,
            &layout,
        )
        .map_err(|e| e.to_string())?;
        let mut kept = Vec::new();
        let mut out = Vec::with_capacity(layout.count());
        for (s, shard) in whole.shards.iter().enumerate() {
            let r = layout.range(s);
            let mut pieces = Vec::with_capacity(blobs.len());
            for (blob, &scale) in blobs.iter().zip(&whole.scales) {
                let piece = slice(codec, blob, n as u64, r.clone()).map_err(|e| e.to_string())?;
                pieces.push((self.publish(&piece, &mut kept)?.0, scale));
            }
            let inputs = ShardInputs {
                round,
                shard: s as u32,
                pieces,
            };
            let inputs = self.publish(&inputs.to_bytes(), &mut kept)?;
            out.push((inputs, self.publish(shard, &mut kept)?));
        }
        self.shard_blobs.insert(round, kept);
        while self.shard_blobs.len() > SHARD_ROUNDS_KEPT {
            if let Some((_, old)) = self.shard_blobs.pop_first() {
                for h in old {
                    self.blobs.forget(&h);
                }
            }
        }
        Ok((out, whole.applied))
    }

    fn state(&mut self, checkpoint: Hash32) -> Result<&OuterState, String> {
        if self.older.as_ref().map(|(h, _)| *h) == Some(checkpoint) {
            std::mem::swap(&mut self.older, &mut self.current);
        }
        if self.current.as_ref().map(|(h, _)| *h) != Some(checkpoint) {
            let bytes = read_blob(&self.dir, checkpoint).map_err(|e| format!("{e:#}"))?;
            let lr = self.spec.effective_outer_lr();
            let s = OuterState::from_bytes(&bytes, self.params, lr, self.spec.outer_momentum)?;
            let old = self.current.replace((checkpoint, s));
            if self.spec.overlap {
                self.older = old;
            }
        }
        Ok(&self.current.as_ref().expect("loaded above").1)
    }
}

impl OuterStep for FileOuter {
    fn step(
        &mut self,
        _round: u64,
        from: Hash32,
        accepted: &[(NodeId, Hash32)],
    ) -> Result<StepOutcome, String> {
        let mut state = self.state(from)?.clone();
        let blobs = accepted
            .iter()
            .map(|(_, h)| read_blob(&self.dir, *h).map_err(|e| format!("{e:#}")))
            .collect::<Result<Vec<_>, _>>()?;
        let codec = self.spec.codec()?;
        state
            .apply(codec, self.spec.aggregator, &blobs)
            .map_err(|e| e.to_string())?;
        self.finish_step(state)
    }

    /// The hub holds every accepted update (its validator scored them), so it cuts
    /// each into its shards' pieces (`tessera_outer::slice`, the same codes), publishes
    /// them with each shard's inputs and the aggregated shard it computes, and steps θ
    /// by the aggregated shards: what every member applies.
    fn step_sharded(
        &mut self,
        round: u64,
        from: Hash32,
        accepted: &[(NodeId, Hash32)],
        shards: usize,
    ) -> Result<(StepOutcome, Vec<(Hash32, Hash32)>), String> {
        let mut state = self.state(from)?.clone();
        let (out, applied) = self.publish_shards(round, accepted, shards)?;
        state.apply_aggregate(&applied);
        Ok((self.finish_step(state)?, out))
    }

    fn judge(
        &mut self,
        round: u64,
        from: Hash32,
        commits: &[Judging],
        previous: &[(NodeId, Hash32)],
    ) -> Result<Vec<Verdict>, String> {
        let codec = self.spec.codec()?;
        let params = self.params as u64;
        let load = |dir: &Path, h: Hash32| -> Result<Vec<f32>, String> {
            let bytes = read_blob(dir, h).map_err(|e| format!("{e:#}"))?;
            decode_for(codec, &bytes, params).map_err(|e| e.to_string())
        };
        let updates = commits
            .iter()
            .map(|c| load(&self.dir, c.commit.blob_hash))
            .collect::<Result<Vec<_>, _>>()?;
        // Last round's blobs are kept until this round closes (see `releasable`).
        let previous = previous
            .iter()
            .map(|(n, h)| Ok((*n, load(&self.dir, *h)?)))
            .collect::<Result<Vec<_>, String>>()?;
        let theta = self.state(from)?.theta.clone();
        self.validator
            .verdicts(round, &theta, commits, &updates, &previous)
    }
}

/// The engine and everything it drives, owned by the engine thread.
struct Core {
    config: HubConfig,
    host: Host<SqliteHubStore>,
    outer: FileOuter,
    blobs: Arc<dyn BlobTransport>,
    blob_dir: PathBuf,
    ledger: Option<Arc<tessera_net::LedgerService>>,
    info: Arc<RunInfo>,
    /// The run's data set, opened once (a private run's plaintext is only in memory).
    data: Arc<Dataset>,
    auth: Arc<ServerAuth>,
    started_ms: u64,
    calls: mpsc::Sender<Call>,
    /// Why the hub can't write now, while it can't.
    read_only: Option<String>,
    /// When writes were last probed for.
    probed_ms: u64,
    /// The dashboard's per-round history.
    history: dashboard::History,
    /// The open round and when it opened at this hub.
    open_since: Option<(u64, u64)>,
    /// Members dropped since the open round opened.
    dropped_in_round: u64,
    /// Blob bytes each node last reported moving (sent + received).
    traffic: BTreeMap<NodeId, u64>,
    /// The public reads, recomputed at most once per `PUBLIC_READ_MAX_AGE_MS`.
    summary_cache: dashboard::Cached<Summary>,
    metrics_cache: dashboard::Cached<String>,
}

/// An input that takes longer than this refreshes members' last-seen times.
const HUB_STALL_MS: u64 = 1000;
/// How often a read-only hub checks whether it can write again.
const WRITE_PROBE_EVERY_MS: u64 = 2000;
/// What a probe writes: room for a round's facts and records, if not a checkpoint
/// (a write that still fails makes the hub read-only again).
const WRITE_PROBE_BYTES: usize = 1 << 20;

/// A call from an HTTP handler to the engine thread.
enum Call {
    Input(HubInput, oneshot::Sender<Result<Option<bool>, HubError>>),
    CheckCommit(NodeId, CommitBody, oneshot::Sender<Result<(), HubError>>),
    View(NodeId, oneshot::Sender<StateView>),
    Round(u64, oneshot::Sender<Option<Arc<RoundRecord>>>),
    Audit(u64, NodeId, oneshot::Sender<Option<PendingAudit>>),
    Summary(oneshot::Sender<Summary>),
    Metrics(oneshot::Sender<String>),
    /// The run's slash requests, one per ejected node: (node hex id, request id).
    Slashes(oneshot::Sender<Vec<(String, String)>>),
}

/// How a setting is spelled in JSON and TOML.
fn serde_name<T: serde::Serialize>(t: &T) -> String {
    match serde_json::to_value(t) {
        Ok(serde_json::Value::String(s)) => s,
        Ok(other) => other.to_string(),
        Err(_) => String::new(),
    }
}

fn log(line: &str) {
    eprintln!("hub: {}", line.escape_debug());
}

/// Opens the run's data set: a prepared one from disk, or a sealed one (`sealed.json`)
/// whose keys the hub gets from the run's key server by attesting like any member; its
/// plaintext then lives only in memory. Returns the data, the bytes of the manifest
/// nodes check, and the files nodes fetch.
fn open_data(
    dep: &config::Deployment,
    spec: &RunSpec,
    key: &tessera_protocol::Identity,
) -> Result<(Dataset, Vec<u8>, Vec<String>)> {
    let sealed_path = dep.data.join(tessera_seal::SEALED_MANIFEST_FILE);
    if !sealed_path.exists() {
        if spec.tee == tessera_protocol::TeeMode::Required && !spec.key_server.is_empty() {
            bail!(
                "run setting `key_server`: {} is not a sealed data set (no {}); seal it with `tessera data seal`",
                dep.data.display(),
                tessera_seal::SEALED_MANIFEST_FILE
            );
        }
        let data = Dataset::open(&dep.data)
            .with_context(|| format!("opening data set {}", dep.data.display()))?;
        let manifest_bytes = std::fs::read(dep.data.join(MANIFEST_FILE))?;
        let files = data.files();
        return Ok((data, manifest_bytes, files));
    }
    let text = std::fs::read_to_string(&sealed_path)
        .with_context(|| format!("reading {}", sealed_path.display()))?;
    let manifest = tessera_seal::SealedManifest::parse(&text)
        .with_context(|| format!("{} is not a sealed manifest", sealed_path.display()))?;
    if spec.tee != tessera_protocol::TeeMode::Required {
        bail!(
            "{} is a sealed data set: the run must set `tee = \"required\"` and `key_server`",
            dep.data.display()
        );
    }
    let attest = dep.attest.as_deref().ok_or_else(|| {
        anyhow::anyhow!(
            "{} is sealed: the hub needs its plaintext to evaluate and audit, so it attests like a member; \
             set `attest` in the run file (`configfs` inside a TDX/SEV-SNP guest)",
            dep.data.display()
        )
    })?;
    let provider = tessera_attest::provider::from_spec(attest)?;
    log(&format!(
        "sealed data set: attesting with {} to {}",
        provider.describe(),
        spec.key_server
    ));
    let plain = tessera_keyserver::open_sealed(
        &dep.data,
        &manifest,
        &spec.key_server,
        &spec.run_id,
        key,
        provider.as_ref(),
    )
    .context("getting the sealed data set's keys")?;
    let data = Dataset::from_sealed(&manifest, plain)?;
    Ok((data, text.into_bytes(), manifest.files()))
}

impl Core {
    fn open(config: HubConfig, calls: mpsc::Sender<Call>) -> Result<Core> {
        let dep = &config.deployment;
        let spec = config.spec.clone();
        std::fs::create_dir_all(&dep.state_dir)
            .with_context(|| format!("creating {}", dep.state_dir.display()))?;
        let blob_dir = dep.state_dir.join("blobs");
        std::fs::create_dir_all(&blob_dir)?;
        // The hub's own key signs every reply; nodes pin it (`--hub-key`). In a private
        // run it is also the key the hub attests with for the data's keys.
        let key_path = dep.state_dir.join(HUB_KEY_FILE);
        let (key, created) = tessera_protocol::Identity::load_or_create(&key_path)
            .with_context(|| format!("the hub's key {}", key_path.display()))?;
        if created {
            log(&format!("created the hub's key {}", key_path.display()));
        }
        let (data, manifest_bytes, data_files) = open_data(dep, &spec, &key)?;
        let data = Arc::new(data);
        let model = Preset::by_name(&spec.preset)?.config_for_vocab(data.manifest.vocab_size);
        if spec.seq_len > model.max_position_embeddings {
            bail!(
                "run setting `seq_len`: {} exceeds the model's context {}",
                spec.seq_len,
                model.max_position_embeddings
            );
        }
        let params = model.params_total();
        let windows = Windows::new(&data.train, spec.seq_len);
        let batches_per_epoch = (windows.len() / spec.batch_size.max(1)) as u64;
        if batches_per_epoch == 0 {
            bail!(
                "the data set holds less than one batch of {} sequences",
                spec.batch_size
            );
        }
        let relays = dep
            .relays
            .iter()
            .map(|r| r.info())
            .collect::<Result<Vec<_>>>()?;
        let blobs: Arc<dyn BlobTransport> = Arc::new(bind_blobs(dep, &key, &relays)?);
        let info = Arc::new(RunInfo {
            protocol: tessera_protocol::wire::PROTOCOL_VERSION,
            spec: spec.clone(),
            model: model.clone(),
            data_manifest: Hash32::of(&manifest_bytes),
            data_files,
            hub_blobs: blobs.addr(),
            relays,
        });
        // θ₀ is a pure function of the run's seed.
        let theta0 = tessera_train::worker::initial_theta(&model, spec.seed);
        let state0 = OuterState::from_theta(theta0, spec.effective_outer_lr(), spec.outer_momentum);
        let checkpoint0 = write_blob(&blob_dir, &state0.to_bytes())?;
        let theta0 = Hash32(state0.digest());
        let fresh = HubState::new(spec.clone(), params, batches_per_epoch, theta0, checkpoint0);
        let identity = serde_json::to_string(&(&spec, &model, &info.data_manifest))?;
        let store = SqliteHubStore::open(&dep.state_dir.join("hub.db"))?;
        let host = Host::open(fresh, identity, store, now_ms()).map_err(|e| match e {
            host::HostError::OtherRun => anyhow::anyhow!(
                "{} holds a run with different settings; use a new state_dir",
                dep.state_dir.display()
            ),
            e => e.into(),
        })?;
        let state = &host.state;
        if state.coordinator().closed_rounds > 0 || !state.coordinator().members.is_empty() {
            log(&format!(
                "resumed run {} at round {} ({} closed)",
                spec.run_id,
                state.coordinator().closed_rounds,
                state.rounds().len()
            ));
        }
        // Serve again what nodes may still ask for: the checkpoint, the last closed
        // round's blobs (for nodes one round behind) and the open round's commits.
        let mut serve_again = vec![state.checkpoint()];
        if let Some(last) = state.rounds().values().next_back() {
            serve_again.extend(last.accepted.iter().map(|(_, h)| *h));
        }
        serve_again.extend(state.coordinator().commits.values().map(|c| c.blob_hash));
        for hash in serve_again {
            blobs.publish(&read_blob(&blob_dir, hash)?)?;
        }
        let auth = Arc::new(ServerAuth::new(key, &spec.run_id)?);
        eprintln!(
            "hub: key {} (nodes may pin it with --hub-key)",
            auth.audience().server
        );
        let ledger = match &dep.ledger {
            Some(path) => {
                let ledger = tessera_ledger::Ledger::open(tessera_ledger::SqliteStore::open(path)?)
                    .with_context(|| format!("opening ledger {}", path.display()))?;
                let organiser = match &dep.organiser {
                    Some(key) => tessera_protocol::identity::parse_public(key)?,
                    None => String::new(),
                };
                Some(Arc::new(tessera_net::LedgerService::new(
                    ledger,
                    organiser,
                    auth.clone(),
                )))
            }
            None => {
                log("no ledger: this run pays nobody and asks no stake to join");
                None
            }
        };
        let validator = Validator::new(
            spec.clone(),
            model.clone(),
            data.clone(),
            host.state.verify_config().clone(),
            dep.state_dir.join(validator::HISTORY_FILE),
        )
        .map_err(anyhow::Error::msg)?;
        let mut outer = FileOuter {
            dir: blob_dir.clone(),
            blobs: blobs.clone(),
            spec: spec.clone(),
            params: params as usize,
            current: None,
            older: None,
            validator,
            shard_blobs: BTreeMap::new(),
        };
        // A sharded last round's pieces, inputs and shards lived in the blob store the
        // crash emptied: made again from the accepted updates (the same bytes).
        if let Some(last) = host.state.rounds().values().next_back().cloned() {
            if !last.shards.is_empty() {
                let (made, _) = outer
                    .publish_shards(last.round, &last.accepted, last.shards.len())
                    .map_err(anyhow::Error::msg)?;
                let same = made
                    .iter()
                    .zip(&last.shards)
                    .all(|((i, h), rec)| *i == rec.inputs && *h == rec.hash);
                if !same {
                    bail!(
                        "round {}'s aggregated shards differ from its record when made again",
                        last.round
                    );
                }
            }
        }
        let history = dashboard::History::open(
            &config.deployment.state_dir,
            info.clone(),
            data.clone(),
            config.deployment.eval_tokens,
        )?;
        let core = Core {
            config,
            host,
            outer,
            blobs,
            blob_dir,
            ledger,
            info,
            data,
            auth,
            started_ms: now_ms(),
            calls,
            read_only: None,
            probed_ms: 0,
            history,
            open_since: None,
            dropped_in_round: 0,
            traffic: BTreeMap::new(),
            summary_cache: dashboard::Cached::new(),
            metrics_cache: dashboard::Cached::new(),
        };
        core.pay();
        let mut core = core;
        // What the engine does not keep across a restart, for the finished run's page.
        let kept = core.history.kept.clone();
        core.host.state.restore_stats(&kept.node_stats);
        if let Some((eval, dir)) = kept.final_eval.clone() {
            let _ = core
                .host
                .input(HubInput::FinalEval { eval, dir }, now_ms(), &mut core.outer);
        }
        Ok(core)
    }

    /// Whether the hub can write to its state directory now: writes and removes a
    /// [`WRITE_PROBE_BYTES`] file.
    fn probe_writes(&self) -> Result<(), String> {
        let path = self.config.deployment.state_dir.join("write-probe");
        let result = checkpoint::write_atomic(&path, &vec![0u8; WRITE_PROBE_BYTES]);
        let _ = std::fs::remove_file(&path);
        result.map_err(|e| e.to_string())
    }

    /// The refusal of a write while the hub is read-only.
    fn read_only_error(&self) -> Option<HubError> {
        self.read_only.as_ref().map(|why| {
            HubError::new(
                ErrorCode::ReadOnly,
                format!(
                    "the hub can't write to its state directory ({why}); it serves reads and \
                     takes writes again once it can"
                ),
            )
        })
    }

    /// Applies an input through the host (which makes its change durable, or rebuilds
    /// the engine from the store), then carries out its effects.
    ///
    /// Story (hardening #9): with its disk full, the hub answered every request with
    /// 500 and retried the round close four times a second. Now a failed write that a
    /// probe confirms makes the hub read-only: writes are refused with
    /// [`ErrorCode::ReadOnly`] and a message saying why, reads and heartbeats are
    /// served, and the tick probes every [`WRITE_PROBE_EVERY_MS`] until the hub can
    /// write again. The failed input never happened (the engine is rebuilt from its
    /// store), so when writes resume the round closes once, as it would have.
    fn input(&mut self, input: HubInput) -> Result<Applied, HubError> {
        let now = now_ms();
        if self.read_only.is_some() {
            match input {
                HubInput::Heartbeat { .. } => {}
                HubInput::Tick => {
                    if now < self.probed_ms + WRITE_PROBE_EVERY_MS {
                        return Err(self.read_only_error().expect("read-only"));
                    }
                    self.probed_ms = now;
                    if let Err(why) = self.probe_writes() {
                        self.read_only = Some(why);
                        return Err(self.read_only_error().expect("read-only"));
                    }
                    log("the state directory takes writes again; resuming");
                    self.read_only = None;
                }
                _ => return Err(self.read_only_error().expect("read-only")),
            }
        }
        if let HubInput::Join { node } = &input {
            self.check_stake(node)?;
        }
        let final_eval = matches!(input, HubInput::FinalEval { .. });
        if let HubInput::FinalEval { eval, dir } = &input {
            self.history.keep_final_eval(*eval, dir);
        }
        if let HubInput::Heartbeat {
            node,
            stats: Some(stats),
        } = &input
        {
            if self.host.state.coordinator().members.contains_key(node) {
                let moved = stats.bytes_sent.saturating_add(stats.bytes_received);
                self.traffic.insert(*node, moved);
            }
            // A finished run's last statistics come after its last round closed.
            if self.host.state.is_finished() {
                let mut kept = self.host.state.stats().clone();
                kept.insert(*node, *stats);
                self.history.keep_node_stats(&kept);
            }
        }
        let applied = match self.host.input(input, now, &mut self.outer) {
            Ok(a) => {
                // A long input (a round close judges every update) held up the
                // heartbeats queued behind it: that stall is the hub's, not the members'.
                let done = now_ms();
                if done.saturating_sub(now) > HUB_STALL_MS {
                    self.host.state.refresh_members(done);
                }
                Ok(a)
            }
            Err(e) => Err(e),
        };
        let applied = match applied {
            Ok(a) => a,
            Err(Ok(e)) => {
                if e.code == ErrorCode::Internal {
                    log(&format!("{e}; the engine was rebuilt from its store"));
                    self.outer.current = None;
                    self.outer.older = None;
                    if let Err(why) = self.probe_writes() {
                        log(&format!(
                            "can't write to the state directory ({why}): read-only until it \
                             can; reads are served, writes refused"
                        ));
                        self.read_only = Some(why);
                        self.probed_ms = now;
                        return Err(self.read_only_error().expect("read-only"));
                    }
                }
                return Err(e);
            }
            Err(Err(e)) => {
                // Nothing sound is left to serve from: stop, and let a restart decide.
                log(&format!("cannot rebuild the engine: {e}; exiting"));
                std::process::exit(1);
            }
        };
        for effect in &applied.effects {
            match effect {
                Effect::Log(line) => log(line),
                Effect::Dropped { node, reason } => {
                    self.dropped_in_round += 1;
                    log(&format!("dropped {}: {reason:?}", node.short(12)))
                }
                Effect::Pay(_) | Effect::Slash { .. } => self.pay(),
                Effect::Release(hashes) => {
                    for h in hashes {
                        self.blobs.forget(&h.to_hex());
                        let _ = std::fs::remove_file(self.blob_dir.join(h.to_hex()));
                    }
                }
                Effect::Finish { checkpoint } => self.finish(*checkpoint),
            }
        }
        // What a reader waits for shows at once; commits and heartbeats (many a round
        // at scale) show within the age limit.
        let c = &applied.change;
        let shows_now = c.snapshot.is_some()
            || !c.rounds.is_empty()
            || !c.audits.is_empty()
            || c.divergent.is_some()
            || !applied.effects.is_empty()
            || final_eval
            || c.facts
                .iter()
                .any(|f| !matches!(f.fact, tessera_coordinator::Fact::Committed { .. }));
        if shows_now {
            self.summary_cache.clear();
            self.metrics_cache.clear();
        }
        self.record_history(&applied.change.rounds, now_ms());
        Ok(applied)
    }

    /// `/summary`, recomputed at most once per [`dashboard::PUBLIC_READ_MAX_AGE_MS`]
    /// (it is O(rounds × commits)); a round closing or the run finishing shows at once.
    fn summary(&mut self) -> Summary {
        let read_only = self.read_only.clone();
        let state = &self.host.state;
        self.summary_cache
            .get(now_ms(), dashboard::PUBLIC_READ_MAX_AGE_MS, || {
                let mut summary = state.summary();
                summary.read_only = read_only;
                summary
            })
    }

    /// Hands each newly closed round to the dashboard's history (θ after the last of
    /// them too, to evaluate), and notes when the next round opened.
    fn record_history(&mut self, closed: &[Arc<RoundRecord>], now: u64) {
        let dep = &self.config.deployment;
        // O(members): only when a round closed, not on every heartbeat.
        let bytes_moved = if closed.is_empty() {
            0
        } else {
            self.traffic
                .values()
                .fold(0u64, |a, b| a.saturating_add(*b))
                .max(self.history.last().map_or(0, |r| r.bytes_moved))
        };
        for rec in closed {
            let stats = self.host.state.stats();
            let losses: Vec<f64> = rec
                .accepted
                .iter()
                .filter_map(|(n, _)| stats.get(n).map(|s| s.last_loss))
                // 0 until a node has trained a step.
                .filter(|l| l.is_finite() && *l > 0.0)
                .collect();
            let row = dashboard::RoundStats {
                round: rec.round,
                started_ms: self
                    .open_since
                    .filter(|(r, _)| *r == rec.round)
                    .map(|(_, t)| t),
                closed_ms: now,
                members: self.host.state.coordinator().members.len() as u64,
                accepted: rec.accepted.len() as u64,
                late: rec.late.len() as u64,
                refused: rec.refused.len() as u64,
                dropped: std::mem::take(&mut self.dropped_in_round),
                tokens: rec.tokens,
                loss_mean: (!losses.is_empty())
                    .then(|| losses.iter().sum::<f64>() / losses.len() as f64),
                loss_min: losses.iter().copied().reduce(f64::min),
                loss_max: losses.iter().copied().reduce(f64::max),
                val_bpb: None,
                bytes_moved,
            };
            let theta = match &self.outer.current {
                Some((h, state))
                    if *h == rec.checkpoint
                        && self.history.wants_theta(rec.round, dep.eval_every) =>
                {
                    Some(state.theta.clone())
                }
                _ => None,
            };
            self.history.record(row, theta);
        }
        if !closed.is_empty() {
            self.history.keep_node_stats(self.host.state.stats());
        }
        let open = self.host.state.coordinator().round();
        if open != self.open_since.map(|(r, _)| r) {
            self.open_since = open.map(|r| (r, now));
            if open.is_some() && closed.is_empty() {
                self.dropped_in_round = 0;
            }
        }
    }

    /// A node that is not a member yet must have the run's `min_stake` staked in the
    /// hub's ledger (a hub without a ledger pays nobody and asks for no stake).
    fn check_stake(&self, node: &NodeId) -> Result<(), HubError> {
        let spec = self.host.state.spec();
        let (Some(svc), true) = (&self.ledger, spec.min_stake > 0) else {
            return Ok(());
        };
        // An ejected node is refused as ejected (it stops), not for the stake its
        // slashing took (it would ask again forever).
        let coord = self.host.state.coordinator();
        if coord.members.contains_key(node) || coord.ejected.contains(node) {
            return Ok(());
        }
        let account = tessera_ledger::Account::Stake {
            run: spec.run_id.clone(),
            contributor: node.to_hex(),
        };
        let min = u128::from(spec.min_stake) * tessera_ledger::BASE_UNITS_PER_TOKEN;
        let staked = svc
            .ledger
            .lock()
            .expect("ledger lock")
            .state()
            .balance(&account)
            .unwrap_or(0);
        if staked < min {
            return Err(HubError::new(
                ErrorCode::NoStake,
                format!(
                    "run `{}` asks {} token(s) of stake to join; {account} holds {}",
                    spec.run_id,
                    spec.min_stake,
                    tessera_ledger::Amount::checked(staked)
                        .map_or_else(|| staked.to_string(), |a| a.tokens_string())
                ),
            ));
        }
        Ok(())
    }

    fn pay(&self) {
        let Some(svc) = &self.ledger else {
            return;
        };
        let mut ledger = svc.ledger.lock().expect("ledger lock");
        let lines = engine::pay_rounds(&mut ledger, &self.host.state, now_ms());
        for line in lines {
            log(&line);
        }
    }

    /// Writes the final model as a Hugging Face checkpoint and evaluates it, on a thread
    /// of its own; the result comes back as an input.
    fn finish(&self, checkpoint: Hash32) {
        let data = self.data.clone();
        let dir = self.config.deployment.state_dir.join("final");
        let path = self.blob_dir.join(checkpoint.to_hex());
        let info = self.info.clone();
        let calls = self.calls.clone();
        std::thread::spawn(move || {
            let result = (|| -> Result<FinalEval> {
                let spec = &info.spec;
                let bytes = std::fs::read(&path)?;
                let state = OuterState::from_bytes(
                    &bytes,
                    info.model.params_total() as usize,
                    spec.effective_outer_lr(),
                    spec.outer_momentum,
                )
                .map_err(anyhow::Error::msg)?;
                let model = tessera_model::Llama::new(&info.model, tch::Device::Cpu, spec.seed);
                tessera_train::diloco::load_flat(&model, &state.theta);
                checkpoint::save(&model, data.tokenizer_json.as_bytes(), &dir)?;
                let windows = data.validation_windows(spec.seq_len, 1 << 16);
                let byte_lens = tessera_train::data::token_byte_lengths(&data.tokenizer);
                let e = tessera_train::eval::evaluate_windows(&model, &windows, 8, &byte_lens);
                Ok(FinalEval {
                    loss: e.loss,
                    bpb: e.bpb,
                })
            })();
            match result {
                Ok(eval) => {
                    log(&format!(
                        "final checkpoint {} (validation {:.4} bits per byte)",
                        dir.display(),
                        eval.bpb
                    ));
                    let (tx, _rx) = oneshot::channel();
                    let input = HubInput::FinalEval {
                        eval,
                        dir: dir.display().to_string(),
                    };
                    let _ = calls.blocking_send(Call::Input(input, tx));
                }
                Err(e) => log(&format!("writing the final checkpoint failed: {e:#}")),
            }
        });
    }

    /// The Prometheus text exposition of `/metrics` (the table in docs/metrics.md):
    /// one series per metric except the `node` label, which names current members
    /// only, so its series are bounded by the run's `max_nodes`.
    fn metrics(&mut self) -> String {
        let summary = self.summary();
        let s = &self.host.state;
        let coord = s.coordinator();
        let last = self.history.last();
        let mut m = metrics::Exposition::default();
        let spec = &self.info.spec;
        m.gauge_labelled(
            "tessera_run_info",
            "The run (value 1): its id, preset, codec and aggregation.",
            &[(
                vec![
                    ("run_id", spec.run_id.clone()),
                    ("preset", spec.preset.clone()),
                    ("codec", serde_name(&spec.codec)),
                    ("aggregation", serde_name(&spec.aggregation)),
                ],
                1.0,
            )],
        );
        m.counter(
            "tessera_rounds_closed_total",
            "Rounds closed so far.",
            coord.closed_rounds as f64,
        );
        m.gauge(
            "tessera_rounds_planned",
            "Rounds the run trains.",
            spec.rounds as f64,
        );
        if let Some(r) = coord.round() {
            m.gauge(
                "tessera_round_open",
                "The round open now (absent while none is).",
                r as f64,
            );
        }
        m.gauge(
            "tessera_run_finished",
            "1 once the run has finished.",
            f64::from(u8::from(summary.finished)),
        );
        m.gauge(
            "tessera_members",
            "Current members.",
            coord.members.len() as f64,
        );
        m.gauge(
            "tessera_model_parameters",
            "Parameters of the model trained.",
            s.params() as f64,
        );
        let (mut accepted, mut late, mut refused, mut tokens) = (0u64, 0u64, 0u64, 0u64);
        for r in s.rounds().values() {
            accepted += r.accepted.len() as u64;
            late += r.late.len() as u64;
            refused += r.refused.len() as u64;
            tokens += r.tokens;
        }
        m.counter(
            "tessera_updates_accepted_total",
            "Updates accepted into a round's aggregate.",
            accepted as f64,
        );
        m.counter(
            "tessera_updates_late_total",
            "Members that missed a round's deadline.",
            late as f64,
        );
        m.counter(
            "tessera_updates_refused_total",
            "Committed updates the validator refused.",
            refused as f64,
        );
        m.counter(
            "tessera_tokens_trained_total",
            "Tokens of accepted work.",
            tokens as f64,
        );
        if let Some(r) = &last {
            if let Some(start) = r.started_ms {
                m.gauge(
                    "tessera_round_duration_seconds",
                    "How long the last closed round was open.",
                    r.closed_ms.saturating_sub(start) as f64 / 1000.0,
                );
            }
            if let Some(l) = r.loss_mean {
                m.gauge(
                    "tessera_node_loss_nats",
                    "Mean training loss the last round's accepted nodes reported, nats per token.",
                    l,
                );
            }
            m.counter(
                "tessera_blob_bytes_moved_total",
                "Blob bytes the nodes report having sent and received, all together.",
                r.bytes_moved as f64,
            );
        }
        let bpb = summary
            .final_eval
            .map(|e| e.bpb)
            .or_else(|| self.history.last_bpb());
        if let Some(b) = bpb {
            m.gauge("tessera_validation_bits_per_byte", "Validation bits per byte of θ: the last round evaluated, or the final checkpoint on the whole validation set.", b);
        }
        m.gauge("tessera_ddp_equivalent_bytes_per_node", "Bytes per node a DDP ring all-reduce of f32 gradients would have moved for the same inner steps.", summary.ddp_bytes_per_node as f64);
        m.counter(
            "tessera_theta_divergent_reports_total",
            "Member θ hashes that differed from the hub's.",
            summary.divergent_reports as f64,
        );
        let v = summary.verification.values();
        m.counter(
            "tessera_audits_passed_total",
            "Replay audits passed.",
            v.clone().map(|x| x.audits_passed).sum::<u64>() as f64,
        );
        m.counter(
            "tessera_audits_failed_total",
            "Replay audits failed.",
            v.clone().map(|x| x.audits_failed).sum::<u64>() as f64,
        );
        m.gauge(
            "tessera_audits_open",
            "Replay audits not yet decided.",
            summary.audits_open as f64,
        );
        m.counter(
            "tessera_nodes_ejected_total",
            "Nodes ejected for cheating.",
            coord.ejected.len() as f64,
        );
        m.gauge(
            "tessera_hub_read_only",
            "1 while the hub can't write to its state directory (writes refused).",
            f64::from(u8::from(self.read_only.is_some())),
        );
        m.gauge(
            "tessera_hub_uptime_seconds",
            "Seconds since the hub started.",
            now_ms().saturating_sub(self.started_ms) as f64 / 1000.0,
        );

        let ledger = self.ledger.as_ref().map(|svc| {
            let ledger = svc.ledger.lock().expect("ledger lock");
            let slashes = coord
                .ejected
                .iter()
                .map(|n| (n.to_hex(), engine::slash_id(&spec.run_id, n)));
            dashboard::ledger_view(Some(&*ledger), &spec.run_id, slashes)
        });
        let tokens_of = |t: &str| t.parse::<f64>().unwrap_or(f64::NAN);
        if let Some(l) = &ledger {
            m.gauge(
                "tessera_ledger_pool_tokens",
                "The run's reward pool.",
                tokens_of(&l.pool),
            );
            m.gauge(
                "tessera_ledger_treasury_tokens",
                "The treasury.",
                tokens_of(&l.treasury),
            );
            m.counter(
                "tessera_ledger_paid_tokens_total",
                "Tokens the run's pool paid out.",
                tokens_of(&l.paid_total),
            );
            m.counter(
                "tessera_ledger_rounds_paid_total",
                "Rounds the ledger paid.",
                l.paid.len() as f64,
            );
            m.counter(
                "tessera_ledger_slashed_tokens_total",
                "Tokens slashed from the run's stakes.",
                tokens_of(&l.slashed),
            );
        }

        // Per member: bounded by max_nodes.
        let label = |n: &NodeId| vec![("node", n.short(16))];
        let members: Vec<&NodeId> = coord.members.keys().collect();
        let per = |f: &dyn Fn(&NodeId) -> Option<f64>| -> Vec<(Vec<(&'static str, String)>, f64)> {
            members
                .iter()
                .filter_map(|n| f(n).map(|v| (label(n), v)))
                .collect()
        };
        let stat = |n: &NodeId| summary.nodes.get(n);
        m.counter_labelled(
            "tessera_node_bytes_sent_total",
            "Blob bytes a member reports having sent.",
            &per(&|n| stat(n).map(|x| x.bytes_sent as f64)),
        );
        m.counter_labelled(
            "tessera_node_bytes_received_total",
            "Blob bytes a member reports having received.",
            &per(&|n| stat(n).map(|x| x.bytes_received as f64)),
        );
        m.gauge_labelled(
            "tessera_node_utilization_ratio",
            "A member's training time over its wall time, as it reports them.",
            &per(&|n| {
                stat(n)
                    .filter(|x| x.wall_seconds > 0.0)
                    .map(|x| x.train_seconds / x.wall_seconds)
            }),
        );
        m.counter_labelled(
            "tessera_node_tokens_total",
            "Tokens of a member's accepted work.",
            &per(&|n| summary.work.get(n).map(|w| w.tokens as f64)),
        );
        m.counter_labelled(
            "tessera_node_rounds_late_total",
            "Rounds a member was late for.",
            &per(&|n| summary.work.get(n).map(|w| w.rounds_late as f64)),
        );
        m.gauge_labelled(
            "tessera_node_score_ratio",
            "A member's mean validator score (0 to 1).",
            &per(&|n| {
                summary
                    .verification
                    .get(n)
                    .map(|v| f64::from(v.score_ppm_mean) / 1e6)
            }),
        );
        if let Some(l) = &ledger {
            m.counter_labelled(
                "tessera_node_earned_tokens_total",
                "Tokens the run paid a member.",
                &per(&|n| l.earned.get(&n.to_hex()).map(|t| tokens_of(t))),
            );
        }
        m.finish()
    }

    fn serve(mut self, mut calls: mpsc::Receiver<Call>) {
        while let Some(call) = calls.blocking_recv() {
            match call {
                Call::Input(input, reply) => {
                    let _ = reply.send(self.input(input).map(|a| a.agrees));
                }
                Call::CheckCommit(node, body, reply) => {
                    let checked = match self.read_only_error() {
                        Some(e) => Err(e),
                        None => self.host.state.check_commit(&node, &body),
                    };
                    let _ = reply.send(checked);
                }
                Call::View(node, reply) => {
                    let _ = reply.send(self.host.state.view(&node));
                }
                Call::Round(r, reply) => {
                    let _ = reply.send(self.host.state.round_record(r));
                }
                Call::Audit(r, node, reply) => {
                    let _ = reply.send(self.host.state.pending_audits().get(&(r, node)).cloned());
                }
                Call::Summary(reply) => {
                    let _ = reply.send(self.summary());
                }
                Call::Metrics(reply) => {
                    let now = now_ms();
                    let max_age = dashboard::PUBLIC_READ_MAX_AGE_MS;
                    let cached = std::mem::take(&mut self.metrics_cache);
                    let mut cached = cached;
                    let text = cached.get(now, max_age, || self.metrics());
                    self.metrics_cache = cached;
                    let _ = reply.send(text);
                }
                Call::Slashes(reply) => {
                    let run = &self.info.spec.run_id;
                    let ids = self.host.state.coordinator().ejected.iter();
                    let _ = reply.send(
                        ids.map(|n| (n.to_hex(), engine::slash_id(run, n)))
                            .collect(),
                    );
                }
            }
        }
    }
}

/// A refusal as an HTTP response with an [`ErrorBody`].
pub struct ApiError(HubError);

impl From<HubError> for ApiError {
    fn from(e: HubError) -> ApiError {
        ApiError(e)
    }
}

fn api(code: ErrorCode, message: impl Into<String>) -> ApiError {
    ApiError(HubError::new(code, message))
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match self.0.code {
            ErrorCode::Unauthorized => StatusCode::UNAUTHORIZED,
            ErrorCode::NotMember | ErrorCode::Ejected | ErrorCode::NoStake => StatusCode::FORBIDDEN,
            ErrorCode::TooManyJoins => StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::NotFound => StatusCode::NOT_FOUND,
            ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            ErrorCode::Busy | ErrorCode::ReadOnly => StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::BadRequest | ErrorCode::WrongRun | ErrorCode::BlobRefused => {
                StatusCode::BAD_REQUEST
            }
            _ => StatusCode::CONFLICT,
        };
        let body = ErrorBody {
            code: self.0.code,
            message: self.0.message,
        };
        (status, Json(body)).into_response()
    }
}

/// What the handlers share: the way to the engine thread, and what never changes.
#[derive(Clone)]
struct Shared {
    calls: mpsc::Sender<Call>,
    info: Arc<RunInfo>,
    data_dir: PathBuf,
    data: Arc<Dataset>,
    blobs: Arc<dyn BlobTransport>,
    blob_dir: PathBuf,
    auth: Arc<ServerAuth>,
    /// Members whose blobs are being fetched: one update (a commit's) and one private
    /// state (a reveal's or a trail's) at a time each, so a node sending a large state
    /// for an audit can still commit meanwhile.
    fetching: Arc<std::sync::Mutex<std::collections::HashSet<(NodeId, FetchKind)>>>,
    /// Blob fetches running at once, across members.
    fetch_permits: Arc<tokio::sync::Semaphore>,
    history: dashboard::History,
    ledger: Option<Arc<tessera_net::LedgerService>>,
    /// `/api/ledger`, recomputed at most once per `PUBLIC_READ_MAX_AGE_MS`.
    ledger_cache: Arc<std::sync::Mutex<dashboard::Cached<dashboard::LedgerView>>>,
}

/// Most commit blobs the hub fetches at once; past it a commit waits up to
/// [`COMMIT_FETCH_WAIT`] for its turn, then is refused as busy. Each fetch holds a
/// blocking thread for up to the blob endpoint's fetch timeout.
const COMMIT_FETCHES_MAX: usize = 64;
const COMMIT_FETCH_WAIT: Duration = Duration::from_secs(30);

/// What a member's blob fetch is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum FetchKind {
    Update,
    State,
}

/// A member's place in [`Shared::fetching`], given back when dropped.
struct Fetching {
    set: Arc<std::sync::Mutex<std::collections::HashSet<(NodeId, FetchKind)>>>,
    slot: (NodeId, FetchKind),
}

impl Fetching {
    /// Takes `node`'s turn to have a blob fetched, or refuses while one is in flight.
    fn claim(hub: &Shared, node: NodeId, kind: FetchKind) -> Result<Fetching, ApiError> {
        let mut set = hub.fetching.lock().expect("fetching lock");
        if !set.insert((node, kind)) {
            return Err(api(
                ErrorCode::Busy,
                "a blob of this node is already being fetched; wait for its answer",
            ));
        }
        Ok(Fetching {
            set: hub.fetching.clone(),
            slot: (node, kind),
        })
    }
}

impl Drop for Fetching {
    fn drop(&mut self) {
        self.set.lock().expect("fetching lock").remove(&self.slot);
    }
}

impl Shared {
    async fn call<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Call) -> Result<T, ApiError> {
        let (tx, rx) = oneshot::channel();
        self.calls
            .send(make(tx))
            .await
            .map_err(|_| api(ErrorCode::Internal, "the hub is stopping"))?;
        rx.await
            .map_err(|_| api(ErrorCode::Internal, "the hub's engine did not answer"))
    }

    async fn input(&self, input: HubInput) -> Result<Option<bool>, ApiError> {
        Ok(self.call(|tx| Call::Input(input, tx)).await??)
    }
}

/// A signed control message: its signer (a canonical node id) and its body, checked
/// for signature, audience (this hub, this run, this start), freshness and replay.
struct Signed {
    node: NodeId,
    body: Bytes,
}

impl FromRequest<Shared> for Signed {
    type Rejection = Response;

    async fn from_request(req: Request, hub: &Shared) -> Result<Signed, Response> {
        let (parts, body) = req.into_parts();
        // A body over the limit keeps axum's own answer (413), refused while it streams.
        let body = Bytes::from_request(Request::from_parts(parts.clone(), body), hub)
            .await
            .map_err(IntoResponse::into_response)?;
        let node = hub
            .auth
            .verify(&parts.method, &parts.uri, &parts.headers, &body, now_ms())
            .map_err(|e| api(ErrorCode::Unauthorized, e.to_string()).into_response())?;
        Ok(Signed { node, body })
    }
}

impl Signed {
    fn json<T: serde::de::DeserializeOwned>(&self, what: &str) -> Result<T, ApiError> {
        serde_json::from_slice(&self.body)
            .map_err(|e| api(ErrorCode::BadRequest, format!("malformed {what}: {e}")))
    }
}

async fn run_info(State(hub): State<Shared>) -> Json<RunInfo> {
    Json(hub.info.as_ref().clone())
}

async fn data_file(
    State(hub): State<Shared>,
    UrlPath(name): UrlPath<String>,
) -> Result<Vec<u8>, ApiError> {
    // Only the data set's own files are served, never another path in its directory.
    let missing = || {
        api(
            ErrorCode::NotFound,
            format!("no data file `{}`", name.escape_debug()),
        )
    };
    if !hub.info.data_files.contains(&name) {
        return Err(missing());
    }
    tokio::fs::read(hub.data_dir.join(&name))
        .await
        .map_err(|_| missing())
}

/// Signed, bodiless membership messages (a heartbeat may carry [`NodeStats`]).
async fn membership(
    State(hub): State<Shared>,
    UrlPath(action): UrlPath<String>,
    signed: Signed,
) -> Result<Json<Ack>, ApiError> {
    let node = signed.node;
    let input = match action.as_str() {
        "join" => HubInput::Join { node },
        "leave" => HubInput::Leave { node },
        "heartbeat" => {
            let stats = if signed.body.is_empty() {
                None
            } else {
                Some(signed.json::<NodeStats>("heartbeat")?)
            };
            HubInput::Heartbeat { node, stats }
        }
        other => {
            return Err(api(
                ErrorCode::NotFound,
                format!("no action `{}`", other.escape_debug()),
            ))
        }
    };
    hub.input(input).await?;
    Ok(Json(Ack {}))
}

/// A commit reaches the engine only once the hub holds its blob: checked by the engine
/// first (so nothing is fetched for a commit that would be refused), fetched from the
/// node's endpoint (verified against the hash while it streams, refused past the run's
/// update size), decoded, and stored durably.
///
/// The hub dials only the endpoint's addresses at the IP the commit came from
/// (hardening #14), fetches one blob per member at a time and at most
/// [`COMMIT_FETCHES_MAX`] at once (hardening #15).
async fn commit(
    State(hub): State<Shared>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    signed: Signed,
) -> Result<Json<Ack>, ApiError> {
    let node = signed.node;
    let mut body: CommitBody = signed.json("commit")?;
    let check = body.clone();
    if let Err(e) = hub.call(|tx| Call::CheckCommit(node, check, tx)).await? {
        // Resending an update another member committed is proof of copying.
        if e.code == ErrorCode::Duplicate {
            let _ = hub
                .input(HubInput::Eject {
                    node,
                    reason: e.message.clone(),
                })
                .await;
        }
        return Err(e.into());
    }
    body.provider = hub
        .blobs
        .reachable_at(&body.provider, peer.ip())
        .map_err(|e| {
            api(
                ErrorCode::BlobRefused,
                format!("commit's provider refused: {e}"),
            )
        })?;
    let _turn = Fetching::claim(&hub, node, FetchKind::Update)?;
    let _permit = tokio::time::timeout(COMMIT_FETCH_WAIT, hub.fetch_permits.acquire())
        .await
        .map_err(|_| {
            api(
                ErrorCode::Busy,
                format!("the hub is fetching {COMMIT_FETCHES_MAX} blobs already; retry later"),
            )
        })?
        .map_err(|_| api(ErrorCode::Internal, "the hub is stopping"))?;
    let params = hub.info.model.params_total();
    let codec = hub
        .info
        .spec
        .codec()
        .map_err(|e| api(ErrorCode::Internal, e))?;
    let max = codec.max_encoded_bytes(params as usize) as u64;
    let (blobs, dir) = (hub.blobs.clone(), hub.blob_dir.clone());
    let (hash, provider) = (body.commit.blob_hash, body.provider.clone());
    let created = tokio::task::spawn_blocking(move || -> Result<bool, ApiError> {
        let refused = |e: String| {
            api(
                ErrorCode::BlobRefused,
                format!("commit's blob refused: {e}"),
            )
        };
        let bytes = blobs
            .fetch(&hash.to_hex(), &[provider], max)
            .map_err(|e| refused(e.to_string()))?;
        if let Err(e) = decode_for(codec, &bytes, params) {
            // Hardening #6: nothing of a refused commit stays behind.
            blobs.forget(&hash.to_hex());
            return Err(refused(e.to_string()));
        }
        let (_, created) = write_blob_new(&dir, &bytes).map_err(|e| {
            blobs.forget(&hash.to_hex());
            api(
                ErrorCode::ReadOnly,
                format!("the hub can't store the blob: {e:#}"),
            )
        })?;
        Ok(created)
    })
    .await
    .map_err(|e| api(ErrorCode::Internal, e.to_string()))??;
    if let Err(e) = hub.input(HubInput::Commit { node, body }).await {
        // Refused after the fetch (the round moved on meanwhile): take back what this
        // commit stored. A blob another commit also names is left alone.
        if created {
            hub.blobs.forget(&hash.to_hex());
            let _ = std::fs::remove_file(hub.blob_dir.join(hash.to_hex()));
        }
        return Err(e);
    }
    Ok(Json(Ack {}))
}

/// An audited node's private state: checked against the digest its commit named, then
/// replayed on a thread of its own; the audit's result goes to the engine. A state that
/// does not match its digest fails the audit at once (the node committed to another).
async fn reveal(
    State(hub): State<Shared>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    signed: Signed,
) -> Result<Json<Ack>, ApiError> {
    let node = signed.node;
    let body: RevealBody = signed.json("reveal")?;
    let round = body.round;
    let audit = open_audit(&hub, "reveal", &body.run_id, round, node, false).await?;
    if audit.revealed {
        return Ok(Json(Ack {}));
    }
    let fetched = fetch_states(
        &hub,
        peer,
        node,
        &body.provider,
        vec![body.blob_hash],
        "reveal",
    )
    .await?;
    let params = hub.info.model.params_total() as usize;
    let parsed = committed_state(&fetched[0], params, &audit);
    let state = match parsed {
        Ok(s) => s,
        Err(why) => {
            hub.input(HubInput::Audited {
                node,
                round,
                passed: false,
                detail: why.clone(),
            })
            .await?;
            return Err(api(ErrorCode::BadRequest, why));
        }
    };
    hub.input(HubInput::Revealed { node, round }).await?;
    let job = replay_job(&hub, &audit, state)?;
    let calls = hub.calls.clone();
    std::thread::spawn(move || {
        // A replay that differs is not yet proof: the node's hardware may compute
        // differently. It is disputed, and refereed step by step.
        let input = match validator::replay(job) {
            Ok(detail) => HubInput::Audited {
                node,
                round,
                passed: true,
                detail,
            },
            Err(detail) => HubInput::Disputed {
                node,
                round,
                detail,
            },
        };
        let (tx, _rx) = oneshot::channel();
        let _ = calls.blocking_send(Call::Input(input, tx));
    });
    Ok(Json(Ack {}))
}

/// The audit of `node` in `round` a reveal (or, `disputed`, a trail) answers: refused
/// for another run, or when no such audit is open.
async fn open_audit(
    hub: &Shared,
    what: &str,
    run_id: &str,
    round: u64,
    node: NodeId,
    disputed: bool,
) -> Result<PendingAudit, ApiError> {
    if run_id != hub.info.spec.run_id {
        return Err(api(
            ErrorCode::WrongRun,
            format!("{what} is for run `{}`", run_id.escape_debug()),
        ));
    }
    hub.call(|tx| Call::Audit(round, node, tx))
        .await?
        .filter(|a| !disputed || a.disputed.is_some())
        .ok_or_else(|| {
            api(
                ErrorCode::NotFound,
                format!(
                    "no {}audit of this node in round {round} is open",
                    if disputed { "disputed " } else { "" }
                ),
            )
        })
}

/// Fetches the state blobs `hashes` a node names for an audit: only from its own
/// addresses at the request's IP, one fetch per node at a time, each bounded to a
/// state's exact size and dropped from the hub's store once read (nothing is kept).
async fn fetch_states(
    hub: &Shared,
    peer: SocketAddr,
    node: NodeId,
    provider: &tessera_blobs::PeerAddr,
    hashes: Vec<Hash32>,
    what: &str,
) -> Result<Vec<Vec<u8>>, ApiError> {
    let provider = hub.blobs.reachable_at(provider, peer.ip()).map_err(|e| {
        api(
            ErrorCode::BlobRefused,
            format!("{what}'s provider refused: {e}"),
        )
    })?;
    let _turn = Fetching::claim(hub, node, FetchKind::State)?;
    let max = 8 + 12 * hub.info.model.params_total();
    let blobs = hub.blobs.clone();
    tokio::task::spawn_blocking(move || {
        hashes
            .iter()
            .map(|h| {
                let bytes = blobs.fetch(&h.to_hex(), std::slice::from_ref(&provider), max);
                blobs.forget(&h.to_hex());
                bytes
            })
            .collect::<Result<Vec<_>, _>>()
    })
    .await
    .map_err(|e| api(ErrorCode::Internal, e.to_string()))?
    .map_err(|e| api(ErrorCode::BlobRefused, format!("{what} refused: {e}")))
}

/// The private state in `bytes`, if it parses strictly and is the one the audited
/// commit named.
fn committed_state(
    bytes: &[u8],
    params: usize,
    audit: &PendingAudit,
) -> Result<tessera_train::worker::PrivateState, String> {
    let s = tessera_train::worker::PrivateState::from_bytes(bytes, params)?;
    if Hash32(s.digest()) == audit.verdict.state_hash {
        Ok(s)
    } else {
        Err("the revealed state is not the one its commit named".into())
    }
}

/// What a replay of `audit` needs, with the node's revealed `state`.
fn replay_job(
    hub: &Shared,
    audit: &PendingAudit,
    state: tessera_train::worker::PrivateState,
) -> Result<validator::Replay, ApiError> {
    let read = |h: Hash32| {
        read_blob(&hub.blob_dir, h).map_err(|e| api(ErrorCode::Internal, format!("{e:#}")))
    };
    Ok(validator::Replay {
        spec: hub.info.spec.clone(),
        model: hub.info.model.clone(),
        data: hub.data.clone(),
        checkpoint: read(audit.checkpoint)?,
        submitted: read(audit.verdict.blob_hash)?,
        state,
        batches: audit.verdict.batches.clone(),
        cfg: tessera_verify::VerifyConfig::default(),
    })
}

/// A disputed node's step trail: fetched (its private state again, then its state after
/// each inner step; each bounded in size and parsed strictly), then refereed on a
/// thread of its own; the audit's result goes to the engine.
async fn trail(
    State(hub): State<Shared>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    signed: Signed,
) -> Result<Json<Ack>, ApiError> {
    let node = signed.node;
    let body: tessera_protocol::wire::TrailBody = signed.json("trail")?;
    let round = body.round;
    let audit = open_audit(&hub, "trail", &body.run_id, round, node, true).await?;
    if audit.trail {
        return Ok(Json(Ack {}));
    }
    if body.steps.len() != audit.verdict.batches.len() {
        return Err(api(
            ErrorCode::BadRequest,
            format!(
                "the trail names {} steps; the round had {}",
                body.steps.len(),
                audit.verdict.batches.len()
            ),
        ));
    }
    let hashes: Vec<Hash32> = std::iter::once(body.state)
        .chain(body.steps.iter().copied())
        .collect();
    let fetched = fetch_states(&hub, peer, node, &body.provider, hashes, "trail").await?;
    let params = hub.info.model.params_total() as usize;
    let state =
        committed_state(&fetched[0], params, &audit).map_err(|e| api(ErrorCode::BadRequest, e))?;
    let steps = fetched[1..]
        .iter()
        .map(|b| tessera_train::worker::StepState::from_bytes(b, params))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| api(ErrorCode::BadRequest, format!("a trail step: {e}")))?;
    hub.input(HubInput::TrailReceived { node, round }).await?;
    let job = validator::Referee {
        replay: replay_job(&hub, &audit, state)?,
        trail: steps,
    };
    let calls = hub.calls.clone();
    std::thread::spawn(move || {
        let (passed, detail) = match validator::referee(job) {
            Ok(d) => (true, d),
            Err(d) => (false, d),
        };
        let (tx, _rx) = oneshot::channel();
        let input = HubInput::Audited {
            node,
            round,
            passed,
            detail,
        };
        let _ = calls.blocking_send(Call::Input(input, tx));
    });
    Ok(Json(Ack {}))
}

#[derive(Deserialize)]
struct StateQuery {
    node: Option<String>,
}

async fn state(
    State(hub): State<Shared>,
    Query(q): Query<StateQuery>,
) -> Result<Json<StateView>, ApiError> {
    let node = match q.node {
        Some(text) => {
            NodeId::from_hex(&text).map_err(|e| api(ErrorCode::BadRequest, e.to_string()))?
        }
        None => NodeId::default(),
    };
    Ok(Json(hub.call(|tx| Call::View(node, tx)).await?))
}

async fn round(
    State(hub): State<Shared>,
    UrlPath(r): UrlPath<u64>,
) -> Result<Json<RoundRecord>, ApiError> {
    hub.call(|tx| Call::Round(r, tx))
        .await?
        .map(|rec| Json(rec.as_ref().clone()))
        .ok_or_else(|| api(ErrorCode::NotFound, format!("round {r} is not closed")))
}

async fn theta(State(hub): State<Shared>, signed: Signed) -> Result<Json<ThetaReply>, ApiError> {
    let report: ThetaReport = signed.json("θ report")?;
    let node = signed.node;
    let agrees = hub.input(HubInput::Theta { node, report }).await?;
    Ok(Json(ThetaReply {
        agrees: agrees.unwrap_or(false),
    }))
}

async fn aggregate(
    State(hub): State<Shared>,
    signed: Signed,
) -> Result<Json<AggregateReply>, ApiError> {
    let report: AggregateReport = signed.json("aggregate report")?;
    let node = signed.node;
    let matches = hub.input(HubInput::Aggregated { node, report }).await?;
    Ok(Json(AggregateReply {
        matches: matches.unwrap_or(false),
    }))
}

async fn metrics(State(hub): State<Shared>) -> Result<String, ApiError> {
    hub.call(Call::Metrics).await
}

async fn summary(State(hub): State<Shared>) -> Result<Json<Summary>, ApiError> {
    Ok(Json(hub.call(Call::Summary).await?))
}

/// The dashboard page and its embedded assets.
async fn index() -> Response {
    asset_response("index.html")
}

async fn asset(UrlPath(name): UrlPath<String>) -> Response {
    asset_response(&name)
}

fn asset_response(name: &str) -> Response {
    match dashboard::asset(name) {
        Some((bytes, kind)) => (
            [
                (axum::http::header::CONTENT_TYPE, kind),
                (axum::http::header::CACHE_CONTROL, "no-cache"),
            ],
            bytes,
        )
            .into_response(),
        None => api(ErrorCode::NotFound, "no such asset").into_response(),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HistoryQuery {
    from: Option<u64>,
}

async fn history(
    State(hub): State<Shared>,
    Query(q): Query<HistoryQuery>,
) -> Json<Vec<dashboard::RoundStats>> {
    Json(hub.history.page(q.from.unwrap_or(0)))
}

async fn ledger_view(State(hub): State<Shared>) -> Result<Json<dashboard::LedgerView>, ApiError> {
    let max_age = dashboard::PUBLIC_READ_MAX_AGE_MS;
    let fresh = {
        let cache = hub.ledger_cache.lock().expect("cache lock");
        cache.fresh(now_ms(), max_age)
    };
    if let Some(view) = fresh {
        return Ok(Json(view));
    }
    let slashes = hub.call(Call::Slashes).await?;
    let run = hub.info.spec.run_id.clone();
    let ledger = hub.ledger.clone();
    let cache = hub.ledger_cache.clone();
    let view = tokio::task::spawn_blocking(move || {
        let mut cache = cache.lock().expect("cache lock");
        cache.get(now_ms(), max_age, || match &ledger {
            Some(svc) => {
                let ledger = svc.ledger.lock().expect("ledger lock");
                dashboard::ledger_view(Some(&*ledger), &run, slashes.into_iter())
            }
            None => dashboard::ledger_view::<tessera_ledger::SqliteStore>(
                None,
                &run,
                slashes.into_iter(),
            ),
        })
    })
    .await
    .map_err(|e| api(ErrorCode::Internal, e.to_string()))?;
    Ok(Json(view))
}

fn router(hub: Shared) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/assets/{name}", get(asset))
        .route("/api/history", get(history))
        .route("/api/ledger", get(ledger_view))
        .route("/run", get(run_info))
        .route("/data/{file}", get(data_file))
        .route("/node/{action}", post(membership))
        .route("/commit", post(commit))
        .route("/state", get(state))
        .route("/rounds/{round}", get(round))
        .route("/theta", post(theta))
        .route("/aggregate", post(aggregate))
        .route("/reveal", post(reveal))
        .route("/trail", post(trail))
        .route("/metrics", get(metrics))
        .route("/summary", get(summary))
        .layer(DefaultBodyLimit::max(CONTROL_BODY_BYTES_MAX))
        .with_state(hub)
}

/// Calls waiting for the engine thread; past this, handlers wait to enqueue.
const ENGINE_QUEUE_MAX: usize = 1024;

/// Runs the hub until the process is stopped: serves the API and ticks the engine four
/// times a second.
pub async fn serve(config: HubConfig) -> Result<()> {
    let listen = config.deployment.listen.clone();
    // Read before anything starts, so a bad certificate fails the start with its name.
    let tls = match (&config.deployment.tls_cert, &config.deployment.tls_key) {
        (Some(cert), Some(key)) => Some(tessera_net::tls::server_config(cert, key)?),
        _ => None,
    };
    let (tx, rx) = mpsc::channel(ENGINE_QUEUE_MAX);
    let core = {
        let tx = tx.clone();
        tokio::task::spawn_blocking(move || Core::open(config, tx)).await??
    };
    let shared = Shared {
        calls: tx.clone(),
        info: core.info.clone(),
        data_dir: core.config.deployment.data.clone(),
        data: core.data.clone(),
        blobs: core.blobs.clone(),
        blob_dir: core.blob_dir.clone(),
        auth: core.auth.clone(),
        fetching: Default::default(),
        fetch_permits: Arc::new(tokio::sync::Semaphore::new(COMMIT_FETCHES_MAX)),
        history: core.history.clone(),
        ledger: core.ledger.clone(),
        ledger_cache: Default::default(),
    };
    let ledger_routes = core.ledger.clone().map(tessera_net::ledger_router);
    std::thread::Builder::new()
        .name("hub-engine".into())
        .spawn(move || core.serve(rx))?;
    let auth = shared.auth.clone();
    let router = router(shared);
    let router = match ledger_routes {
        Some(l) => router.merge(l),
        None => router,
    };
    let router = tessera_net::with_signed_replies(router, auth);
    tokio::spawn(async move {
        let mut interval = tokio::time::interval(Duration::from_millis(250));
        loop {
            interval.tick().await;
            let (reply, done) = oneshot::channel();
            if tx.send(Call::Input(HubInput::Tick, reply)).await.is_err() {
                return;
            }
            if let Ok(Err(e)) = done.await {
                if e.code != ErrorCode::Finished && e.code != ErrorCode::ReadOnly {
                    log(&format!("tick failed: {e}"));
                }
            }
        }
    });
    let listener = tokio::net::TcpListener::bind(&listen)
        .await
        .with_context(|| format!("listening on {listen}"))?;
    if let Some(tls) = tls {
        eprintln!("hub: serving run on https://{}", listener.local_addr()?);
        return tessera_net::tls::serve_tls(listener, router, tls).await;
    }
    eprintln!("hub: serving run on http://{}", listener.local_addr()?);
    axum::serve(
        listener,
        router.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hardening #10: a stored blob whose bytes changed on disk is refused when loaded,
    /// with a message naming the file, instead of being served.
    #[test]
    fn stored_blobs_are_rehashed_when_loaded() {
        let dir = tempfile::tempdir().unwrap();
        let hash = write_blob(dir.path(), b"an update").unwrap();
        assert_eq!(read_blob(dir.path(), hash).unwrap(), b"an update");
        let path = dir.path().join(hash.to_hex());
        std::fs::write(&path, b"an updatE").unwrap();
        let e = format!("{:#}", read_blob(dir.path(), hash).unwrap_err());
        assert!(e.contains("corrupt") && e.contains(&hash.to_hex()), "{e}");
    }
}
