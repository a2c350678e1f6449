//! Every body the hub and nodes exchange on the control plane, as JSON: requests, replies
//! and the typed error body. Every body that changes state names its run and round; the
//! signed request around it is versioned (`tessera-http-v2`, see [`crate::auth`]) and
//! bounded (`limits::CONTROL_BODY_BYTES_MAX`). The bodies as a whole are versioned by
//! [`PROTOCOL_VERSION`], which `GET /run` names first: a node reads that field alone
//! before the rest, so a hub and node of different versions refuse each other with a
//! message naming both, instead of misreading a body. Ids and hashes are [`NodeId`] and
//! [`Hash32`], which have one text form each.
//!
//! Routes (the hub's):
//!
//! | route | body | reply |
//! |---|---|---|
//! | `GET /run` | – | [`RunInfo`] |
//! | `GET /data/{file}` | – | the file's bytes |
//! | `POST /node/join`, `/node/leave` (signed) | empty | [`Ack`] |
//! | `POST /node/heartbeat` (signed) | [`NodeStats`] or empty | [`Ack`] |
//! | `POST /commit` (signed) | [`CommitBody`] | [`Ack`] |
//! | `GET /state?node=ID` | – | [`StateView`] |
//! | `GET /rounds/{round}` | – | [`RoundRecord`] |
//! | `POST /theta` (signed) | [`ThetaReport`] | [`ThetaReply`] |
//! | `POST /aggregate` (signed) | [`AggregateReport`] | [`AggregateReply`] |
//! | `GET /summary` | – | [`Summary`] |
//! | `GET /auth` | – | [`crate::auth::Audience`] |
//!
//! Every reply, refusals included, carries the hub's signature ([`crate::auth`]).
//!
//! Every refusal is an HTTP error status with an [`ErrorBody`]; clients act on its
//! [`ErrorCode`], never on its message.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tessera_model_config::LlamaConfig;

use crate::ids::{Hash32, NodeId};
use crate::spec::RunSpec;

/// Where a blob can be fetched from: produced by a blob transport's `addr()`, parsed only
/// by the transport of the same kind.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct PeerAddr(pub String);

impl std::fmt::Display for PeerAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = &self.0;
        if s.len() > 40 {
            write!(f, "{}…", &s[..s.floor_char_boundary(40)])
        } else {
            f.write_str(s)
        }
    }
}

/// The run's phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "snake_case")]
pub enum Phase {
    /// Waiting for `min_nodes`.
    Forming,
    Training {
        round: u64,
    },
    Finished,
}

/// What a member commits at the end of its inner steps.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Commit {
    /// blake3 of the encoded update blob.
    pub blob_hash: Hash32,
    pub tokens: u64,
    /// Mean inner loss, micro-nats (integers keep the state machine exact).
    pub loss_micro: u64,
    /// Hash of θ the member started the round from; must be the round's θ.
    pub theta_hash: Hash32,
    /// Digest of the member's private training state (AdamW moments and step, the
    /// error-feedback residual) it started the round from. An audited member reveals
    /// that state, and a validator replays the round from it (`POST /reveal`).
    pub state_hash: Hash32,
}

/// The version of the bodies in this module. 1 was the unversioned format before
/// replies were signed; 2 added the signed audience, `protocol` itself, the
/// `busy` and `read_only` error codes and [`Summary::read_only`]; 3 added verified
/// work: [`Commit::state_hash`], [`RoundRecord::verdicts`] and `refused`,
/// [`StateView::audit`] and `dispute`, `POST /reveal` and `POST /trail`, and the
/// `ejected`, `too_many_joins` and `no_stake` error codes; 4 added relays
/// ([`RunInfo::relays`]) and [`NodeStats::paths`]; 5 added sharded aggregation
/// ([`RoundRecord::shards`], `POST /aggregate`).
pub const PROTOCOL_VERSION: u32 = 5;

/// Reads only the protocol version of a `GET /run` reply, so a node can refuse a hub
/// of another version before parsing a body it may not understand.
pub fn protocol_of(run_info_json: &[u8]) -> Result<u32, String> {
    #[derive(Deserialize)]
    struct Probe {
        protocol: Option<u32>,
    }
    let probe: Probe =
        serde_json::from_slice(run_info_json).map_err(|e| format!("malformed run info: {e}"))?;
    // A hub from before the field existed speaks version 1.
    Ok(probe.protocol.unwrap_or(1))
}

/// `GET /run`: everything a node needs to take part.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunInfo {
    /// [`PROTOCOL_VERSION`] of the hub.
    pub protocol: u32,
    pub spec: RunSpec,
    /// The model's shape (the preset with the data set's vocabulary).
    pub model: LlamaConfig,
    /// blake3 of the data set's manifest, so a node checks it trains on the right data.
    pub data_manifest: Hash32,
    /// The data set's files, served at `/data/{file}`.
    pub data_files: Vec<String>,
    /// The hub's blob endpoint: checkpoints, and every accepted update.
    pub hub_blobs: PeerAddr,
    /// The run's relays (iroh relay servers, `tessera relay`): how peers behind NATs
    /// reach each other when no direct path can be made. Empty on loopback runs.
    #[serde(default)]
    pub relays: Vec<RelayInfo>,
}

/// One relay of a run, as the hub advertises it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelayInfo {
    /// What peers dial: `https://HOST[:PORT]` (or `http://` on a test network).
    pub url: String,
    /// The relay's UDP port for QUIC address discovery (how a node behind a NAT learns
    /// its public address, which hole punching needs); none disables discovery.
    #[serde(default)]
    pub quic_port: Option<u16>,
    /// A PEM certificate to trust for this relay's TLS (a relay with a self-signed
    /// certificate, e.g. one addressed by IP); absent, the web PKI roots are used.
    #[serde(default)]
    pub cert_pem: Option<String>,
}

impl RelayInfo {
    /// Checks what a node is told before it dials anything: the URL's scheme and
    /// length, and the certificate's size.
    pub fn check(&self) -> Result<(), String> {
        if self.url.len() > crate::limits::RELAY_URL_BYTES_MAX {
            return Err(format!(
                "relay url is {} bytes, more than {}",
                self.url.len(),
                crate::limits::RELAY_URL_BYTES_MAX
            ));
        }
        let rest = self
            .url
            .strip_prefix("https://")
            .or_else(|| self.url.strip_prefix("http://"))
            .ok_or_else(|| format!("relay url `{}` is not http(s)://", self.url.escape_debug()))?;
        let host = rest.split(['/', '?', '#']).next().unwrap_or("");
        if host.is_empty()
            || host
                .chars()
                .any(|c| c.is_whitespace() || c.is_control() || c == '@')
        {
            return Err(format!(
                "relay url `{}` names no plain host",
                self.url.escape_debug()
            ));
        }
        if self.quic_port == Some(0) {
            return Err("relay quic_port 0".into());
        }
        if let Some(pem) = &self.cert_pem {
            if pem.len() > crate::limits::RELAY_CERT_PEM_BYTES_MAX {
                return Err(format!(
                    "relay certificate is {} bytes, more than {}",
                    pem.len(),
                    crate::limits::RELAY_CERT_PEM_BYTES_MAX
                ));
            }
        }
        Ok(())
    }
}

/// Blob traffic split by the path it took: direct (UDP between the peers, after hole
/// punching where there is a NAT) or through a relay. Bytes are counted on the wire
/// (QUIC packets, both blobs and their acknowledgements); a fetch counts as relayed
/// when most of its received bytes came through a relay.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PathTraffic {
    pub direct_sent: u64,
    pub direct_received: u64,
    pub relay_sent: u64,
    pub relay_received: u64,
    pub fetches_direct: u64,
    pub fetches_relayed: u64,
}

/// `POST /commit`: the commit bound to the run and round, and where its blob is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommitBody {
    pub run_id: String,
    pub round: u64,
    pub commit: Commit,
    /// The committing node's blob endpoint.
    pub provider: PeerAddr,
}

/// What a node reports with its heartbeats.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeStats {
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub train_seconds: f64,
    pub wall_seconds: f64,
    pub last_loss: f64,
    pub rounds_committed: u64,
    /// The same blob traffic split into direct and relayed paths.
    #[serde(default)]
    pub paths: PathTraffic,
}

/// `GET /state?node=ID`: what a node polls. Constant size whatever the number of
/// members: the closed round's record is fetched once, from `/rounds/{round}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateView {
    pub phase: Phase,
    /// The asking node's batches in the open round, if it was assigned any.
    pub assignment: Option<Vec<u64>>,
    /// Whether the asking node's commit for the open round counts.
    pub committed: bool,
    pub deadline_ms: u64,
    /// Rounds closed so far: θ of round `closed_rounds` is the latest.
    pub closed_rounds: u64,
    /// The hub's checkpoint (θ and outer velocity) after the last closed round.
    pub checkpoint: Hash32,
    /// A round of the asking node's that is being audited: the node must reveal the
    /// private state it committed to for that round (`POST /reveal`).
    #[serde(default)]
    pub audit: Option<u64>,
    /// A round of the asking node's whose replay differed from its update: the node
    /// must hand in its state after every inner step (`POST /trail`) for a refereed
    /// replay of each step alone, before anything is slashed.
    #[serde(default)]
    pub dispute: Option<u64>,
    /// Under `overlap`: the asking node's batches of the next round, drawn when this
    /// one opened, to train from θ of this round while this round closes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_assignment: Option<Vec<u64>>,
}

impl StateView {
    pub fn round(&self) -> Option<u64> {
        match self.phase {
            Phase::Training { round } => Some(round),
            _ => None,
        }
    }
}

/// A closed round as the hub records it (`GET /rounds/{round}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoundRecord {
    pub round: u64,
    /// (node, blob hash) in node-id order: the order every node aggregates in.
    pub accepted: Vec<(NodeId, Hash32)>,
    /// Where each accepted blob was first published (its node's blob endpoint), in
    /// the order of `accepted`; the hub serves them too.
    pub sources: Vec<PeerAddr>,
    pub late: Vec<NodeId>,
    pub tokens: u64,
    /// Tokens each accepted node processed: the work record the ledger pays from.
    pub work: Vec<(NodeId, u64)>,
    /// θ hash before and after this round's outer step.
    pub theta_before: Hash32,
    pub theta_after: Hash32,
    /// The checkpoint blob after this round.
    pub checkpoint: Hash32,
    /// Committed but refused by the validator (see `verdicts` for why).
    #[serde(default)]
    pub refused: Vec<NodeId>,
    /// The validator's verdict on every judged commit, in commit order: the scores a
    /// round publishes per node.
    #[serde(default)]
    pub verdicts: Vec<Verdict>,
    /// Under sharded aggregation, the round's shards in parameter order (their ranges
    /// are `tessera_outer::shard::ShardLayout::new(params, shards.len())`); a member
    /// applies the aggregated shards instead of fetching every accepted update. Empty
    /// under all-to-all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shards: Vec<ShardRecord>,
}

/// One shard of a closed round under sharded aggregation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardRecord {
    /// The members that aggregate it, drawn after the close from the accepted updates
    /// (`tessera_outer::shard::assign`); each is one of `accepted`.
    pub aggregators: Vec<NodeId>,
    /// The blob of its inputs (`tessera_outer::shard::ShardInputs`: each accepted
    /// update's piece hash and scale), served by the hub.
    pub inputs: Hash32,
    /// The aggregated shard every member applies, as the hub computed it from the
    /// updates it holds; an aggregator's shard must be these bytes.
    pub hash: Hash32,
}

/// `POST /aggregate`: an aggregator's report of the shard it published.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AggregateReport {
    pub run_id: String,
    pub round: u64,
    pub shard: u32,
    /// blake3 of the aggregated shard the member computed and serves.
    pub hash: Hash32,
}

/// The reply to [`AggregateReport`]: whether the shard is the round's. A member whose
/// shard is not is ejected (the aggregation is deterministic, so a different shard is
/// a wrong one).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AggregateReply {
    pub matches: bool,
}

/// The validator's verdict on one commit of a round. Measurements are integers
/// (micro-units, parts per million) so records compare exactly.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Verdict {
    pub node: NodeId,
    /// Part of the aggregate and paid.
    pub accepted: bool,
    /// The pay weight in parts per million: the node earns tokens × score.
    pub score_ppm: u32,
    /// Why it was refused: `copy`, `stale`, `norm_high`, `norm_low`, `harmful`.
    pub flags: Vec<String>,
    /// The update's norm ÷ the round's median norm, in parts per million.
    pub norm_ratio_ppm: u64,
    /// Held-out loss before minus after the update alone, in micro-nats.
    pub gain_heldout_micro: i64,
    /// Gain on the node's own batches minus gain on random ones, in micro-nats.
    pub own_margin_micro: i64,
    /// Picked for a replay audit.
    pub audited: bool,
    /// The tokens the commit claimed.
    pub tokens: u64,
    /// What the node committed: its update, the private state it started from, and
    /// the batches it was assigned (what an audit replays).
    pub blob_hash: Hash32,
    pub state_hash: Hash32,
    pub batches: Vec<u64>,
}

/// `POST /trail`: a disputed node's state after each inner step of a round (blobs of
/// `StepState` bytes), with the private state it started from again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrailBody {
    pub run_id: String,
    pub round: u64,
    /// blake3 of the private state blob (as `POST /reveal`).
    pub state: Hash32,
    /// blake3 of the state blob after each inner step, in order.
    pub steps: Vec<Hash32>,
    pub provider: PeerAddr,
}

/// `POST /reveal`: an audited node's private state for a round, published as a blob.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevealBody {
    pub run_id: String,
    pub round: u64,
    /// blake3 of the state blob (not the state digest the commit named: the hub
    /// checks that the blob decodes to a state with that digest).
    pub blob_hash: Hash32,
    pub provider: PeerAddr,
}

/// `POST /theta`: a node's θ hash after the outer step of `round`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ThetaReport {
    pub run_id: String,
    pub round: u64,
    pub hash: Hash32,
}

/// The reply to a θ report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ThetaReply {
    pub agrees: bool,
}

/// The reply to a request that changed state and has nothing to say.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ack {}

/// Validation of the final checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct FinalEval {
    /// Mean cross-entropy per predicted token, in nats.
    pub loss: f64,
    pub bpb: f64,
}

/// `GET /summary`: the run at a glance (also what `tessera demo` prints).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub run_id: String,
    pub finished: bool,
    pub rounds_closed: u64,
    pub members: u64,
    pub params: u64,
    pub theta_hash: Hash32,
    pub divergent_reports: u64,
    /// Members' last heartbeat statistics.
    pub nodes: BTreeMap<NodeId, NodeStats>,
    /// Bytes per node a DDP ring all-reduce of f32 gradients would move (sent +
    /// received) for the same number of inner steps.
    pub ddp_bytes_per_node: u64,
    pub final_eval: Option<FinalEval>,
    pub final_checkpoint: Option<String>,
    /// Why the hub takes no writes now (its disk is full), when it doesn't.
    #[serde(default)]
    pub read_only: Option<String>,
    /// What the validator found of each node that ever committed.
    #[serde(default)]
    pub verification: BTreeMap<NodeId, NodeVerification>,
    /// Replay audits not yet decided (pay of their rounds waits in escrow).
    #[serde(default)]
    pub audits_open: u64,
    /// The round open now, while one is.
    #[serde(default)]
    pub open_round: Option<u64>,
    /// Every node the run knows (members, and anyone a round recorded, judged or
    /// ejected):
    /// whether it is a member now, the tokens it was credited and its rounds.
    #[serde(default)]
    pub work: BTreeMap<NodeId, NodeWork>,
}

/// A node's work over the run so far, from the closed rounds' records.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeWork {
    pub member: bool,
    /// Tokens of accepted work (what the ledger pays from).
    pub tokens: u64,
    /// Rounds whose aggregate took its update, and rounds it was late for.
    pub rounds_accepted: u64,
    pub rounds_late: u64,
}

/// A node's verified work over the run so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeVerification {
    /// Commits accepted into the aggregate and refused by the validator.
    pub accepted: u64,
    pub refused: u64,
    /// Mean score of its judged commits, parts per million.
    pub score_ppm_mean: u32,
    pub audits_passed: u64,
    pub audits_failed: u64,
    /// Removed for cheating: its unreleased pay is forfeited and its stake slashed.
    pub ejected: bool,
}

/// What went wrong, for a client to act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ErrorCode {
    /// The signature, its time or its signer was refused, or the request was a replay.
    Unauthorized,
    /// The body did not parse or broke a rule of its own.
    BadRequest,
    /// The body names another run.
    WrongRun,
    /// The signer is not a member of the run (join first).
    NotMember,
    /// The run has as many members as it admits.
    RunFull,
    /// The body names a round other than the open one.
    WrongRound,
    /// The commit starts from another θ than the round's.
    StaleTheta,
    AlreadyCommitted,
    NotAssigned,
    /// The commit claims more tokens than its assignment holds.
    TooManyTokens,
    /// The commit's blob could not be fetched, was too large, or did not decode.
    BlobRefused,
    /// The update was already committed by another member or accepted in a recent
    /// round.
    Duplicate,
    /// The run has finished.
    Finished,
    /// The signer was ejected from the run for cheating and can't join it again.
    Ejected,
    /// Joins come faster than the run admits; retry later.
    TooManyJoins,
    /// The signer has not staked the run's minimum in the ledger.
    NoStake,
    NotFound,
    /// The hub is at a limit (concurrent blob fetches); retry later.
    Busy,
    /// The hub can't write (its disk is full); it serves reads and retries writes.
    ReadOnly,
    /// The hub failed; retry later.
    Internal,
}

/// The body of every refusal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErrorBody {
    pub code: ErrorCode,
    pub message: String,
}

#[cfg(test)]
mod tests {
    #[test]
    fn relay_info_is_checked_before_it_is_dialled() {
        let ok = |url: &str| super::RelayInfo {
            url: url.into(),
            quic_port: Some(7842),
            cert_pem: None,
        };
        assert!(ok("https://relay.example.org").check().is_ok());
        assert!(ok("http://203.0.113.11:3340/").check().is_ok());
        for bad in [
            "ftp://relay",
            "relay.example.org",
            "https://",
            "https://user@relay",
            "https://re lay",
            &format!("https://{}", "a".repeat(300)),
        ] {
            assert!(ok(bad).check().is_err(), "{bad}");
        }
        let mut zero = ok("https://r");
        zero.quic_port = Some(0);
        assert!(zero.check().is_err());
        let mut big = ok("https://r");
        big.cert_pem = Some("x".repeat(crate::limits::RELAY_CERT_PEM_BYTES_MAX + 1));
        assert!(big.check().is_err());
    }

    use super::*;

    /// A node reads the hub's protocol version before anything else in its run info;
    /// a hub from before the field existed reads as version 1.
    #[test]
    fn run_info_names_its_protocol_first() {
        assert_eq!(protocol_of(br#"{"protocol": 2, "anything": []}"#), Ok(2));
        assert_eq!(protocol_of(br#"{"spec": {}, "hub_blobs": "x"}"#), Ok(1));
        assert!(protocol_of(b"not json").is_err());
    }

    #[test]
    fn bodies_refuse_unknown_fields_and_round_trip() {
        let c = CommitBody {
            run_id: "r".into(),
            round: 3,
            commit: Commit {
                blob_hash: Hash32::of(b"blob"),
                tokens: 10,
                loss_micro: 5,
                theta_hash: Hash32::of(b"theta"),
                state_hash: Hash32::of(b"state"),
            },
            provider: PeerAddr("p".into()),
        };
        let json = serde_json::to_value(&c).unwrap();
        assert_eq!(
            serde_json::from_value::<CommitBody>(json.clone()).unwrap(),
            c
        );
        let mut extra = json;
        extra["sneaky"] = 1.into();
        assert!(serde_json::from_value::<CommitBody>(extra).is_err());
    }

    #[test]
    fn error_codes_are_snake_case_words() {
        let e = ErrorBody {
            code: ErrorCode::StaleTheta,
            message: "m".into(),
        };
        assert_eq!(
            serde_json::to_string(&e).unwrap(),
            r#"{"code":"stale_theta","message":"m"}"#
        );
    }
}
