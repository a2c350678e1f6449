//! The hub's wire types: what nodes and the hub send each other as JSON over the
//! control plane. Every body that changes state names its run and round; the signed
//! request around it is versioned (`tessera-http-v1`, see `tessera_protocol::auth`)
//! and bounded (`tessera_protocol::limits::CONTROL_BODY_BYTES_MAX`).

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use tessera_blobs::PeerAddr;
use tessera_coordinator::{Commit, Phase};
use tessera_train::eval::EvalResult;
use tessera_train::worker::RunSpec;

/// A closed round as the hub records it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundRecord {
    pub round: u64,
    /// (node, blob hash) in node-id order: the order every node aggregates in.
    pub accepted: Vec<(String, String)>,
    /// Where each accepted blob was first published (its node's blob endpoint), in
    /// the order of `accepted`; the hub serves them too.
    #[serde(default)]
    pub sources: Vec<PeerAddr>,
    pub late: Vec<String>,
    pub tokens: u64,
    /// Tokens each accepted node processed: the work record the ledger pays from.
    pub work: Vec<(String, u64)>,
    /// θ hash after this round's outer step.
    pub theta_after: String,
    pub checkpoint: String,
}

/// What a node reports with its heartbeats.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct NodeStats {
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub train_seconds: f64,
    pub wall_seconds: f64,
    pub last_loss: f64,
    pub rounds_committed: u64,
}

/// The run summary (also what `tessera demo` prints).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Summary {
    pub run_id: String,
    pub finished: bool,
    pub rounds_closed: u64,
    pub params: u64,
    pub theta_hash: String,
    pub divergent_reports: u64,
    pub nodes: BTreeMap<String, NodeStats>,
    /// Bytes per node a DDP ring all-reduce of f32 gradients would move (sent +
    /// received) for the same number of inner steps.
    pub ddp_bytes_per_node: u64,
    pub final_eval: Option<EvalResult>,
    pub final_checkpoint: Option<PathBuf>,
}

/// What `GET /run` returns.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunInfo {
    pub spec: RunSpec,
    pub data_files: Vec<String>,
    /// The hub's blob endpoint: checkpoints, and every accepted update.
    pub hub_blobs: PeerAddr,
}

/// `POST /commit` body: the commit bound to the run and round, and where the blob it
/// names can be fetched.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CommitBody {
    pub run_id: String,
    pub round: u64,
    pub commit: Commit,
    /// The committing node's blob endpoint.
    pub provider: PeerAddr,
}

/// What a node polls.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StateView {
    pub phase: Phase,
    pub round: Option<u64>,
    pub assignment: Option<Vec<u64>>,
    pub committed: bool,
    pub deadline_ms: u64,
    pub closed_rounds: u64,
    pub checkpoint: String,
    pub last_round: Option<RoundRecord>,
}

/// `POST /theta`: a node's θ hash after the outer step of `round`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ThetaReport {
    pub run_id: String,
    pub round: u64,
    pub hash: String,
}
