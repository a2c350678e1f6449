//! The hub as a pure engine: `HubState::apply(input, now_ms, outer) -> Applied`.
//!
//! The engine holds the coordinator, the closed rounds' records, the θ and checkpoint
//! hashes of the latest closed round, members' statistics and the divergence count.
//! It reads no clock, opens no file and no socket: the time comes in with each input,
//! the outer step at a round's close goes through the [`OuterStep`] trait (which the
//! real hub backs with blob files and the simulator with a shared cache), and
//! everything else the driver must do comes back as data: a [`Change`] to make durable
//! through a [`crate::store::HubStore`] before anything is answered, and [`Effect`]s
//! (pay a round, release old blobs, write the final model).
//!
//! Cost: every input costs O(log N) in the members N, apart from the input that closes a
//! round (O(N), once a round). What is persisted per input is O(1) facts; a snapshot of
//! the coordinator is written only when a round starts or closes.

use std::collections::BTreeMap;
use std::sync::Arc;

pub use tessera_coordinator::DropReason;
use tessera_coordinator::{
    CoordError, Coordinator, Event, Fact, Input, Judge, Judged, RunConfig, WorkRecord,
};
use tessera_outer::shard;
use tessera_protocol::wire::{
    AggregateReport, Commit, CommitBody, ErrorCode, FinalEval, NodeStats, PeerAddr, Phase,
    RoundRecord, ShardRecord, StateView, Summary, ThetaReport, Verdict,
};
use tessera_protocol::{AggregationMode, Hash32, NodeId, RunSpec};
use tessera_verify::VerifyConfig;

/// Closed rounds whose accepted updates a commit may not send again.
pub const RESENT_ROUNDS_CHECKED: usize = 3;
/// How long an audited node has to reveal its private state, in round deadlines, from
/// the round's close (or from a hub restart, which forgets reveals in flight), beyond
/// the rounds the run lets a member miss (see [`reveal_window_ms`]).
pub const AUDIT_REVEAL_DEADLINES: u64 = 2;

/// How long an audited node has to reveal (or to hand in its step trail): two round
/// deadlines, plus as many as the run lets a member be late before it drops it.
///
/// Story (the emulated-internet test): with the run's relay down for three rounds, a
/// node reachable only through it could not serve its revealed state, and two round
/// deadlines later the hub ejected an honest node as a cheater. Being unreachable for
/// as long as the run tolerates lateness now costs the node those rounds, not its stake.
pub fn reveal_window_ms(spec: &RunSpec) -> u64 {
    AUDIT_REVEAL_DEADLINES
        .saturating_add(u64::from(spec.missed_rounds_max))
        .saturating_mul(spec.round_deadline_ms)
}
/// The request id of the slash of an ejected node (one per node and run: exactly once).
pub fn slash_id(run_id: &str, node: &NodeId) -> String {
    format!("slash:{run_id}:{}", node.to_hex())
}

/// One commit as the validator judges it.
#[derive(Debug, Clone, PartialEq)]
pub struct Judging {
    pub node: NodeId,
    pub commit: Commit,
    pub batches: Vec<u64>,
}

/// The result of a replay audit, as stored.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditRecord {
    pub round: u64,
    pub node: NodeId,
    pub passed: bool,
    /// What was found: the relative error of the replay, or why there was none.
    pub detail: String,
}

/// An audit the hub waits on.
#[derive(Debug, Clone, PartialEq)]
pub struct PendingAudit {
    /// The checkpoint the round trained from.
    pub checkpoint: Hash32,
    pub verdict: Verdict,
    pub deadline_ms: u64,
    /// The node's state arrived and is being replayed.
    pub revealed: bool,
    /// The replay differed (how): the node must hand in its step trail.
    pub disputed: Option<String>,
    /// The step trail arrived and is being refereed.
    pub trail: bool,
}
/// The outer step at a round's close: from the checkpoint `from`, aggregate the accepted
/// updates (in the given order) and step. Implementations are deterministic: the same
/// `from` and `accepted` give the same result.
pub trait OuterStep {
    fn step(
        &mut self,
        round: u64,
        from: Hash32,
        accepted: &[(NodeId, Hash32)],
    ) -> Result<StepOutcome, String>;

    /// Judges a round's commits (in commit order) before the round closes: one verdict
    /// each, in the same order, or none at all for a validator that measures nothing
    /// (every commit accepted at full score; the default). `from` is the checkpoint the
    /// round trained from and `previous` the last round's accepted updates (a stale
    /// update copies one).
    fn judge(
        &mut self,
        _round: u64,
        _from: Hash32,
        _commits: &[Judging],
        _previous: &[(NodeId, Hash32)],
    ) -> Result<Vec<Verdict>, String> {
        Ok(Vec::new())
    }

    /// The outer step under sharded aggregation: as [`OuterStep::step`], but θ moves by
    /// the `shards` aggregated shards (`tessera_outer::shard::aggregate_shard` over the
    /// accepted updates' pieces), whose inputs and shard blobs the implementation
    /// publishes. Returns, per shard, the hashes of its inputs blob and of its shard.
    fn step_sharded(
        &mut self,
        _round: u64,
        _from: Hash32,
        _accepted: &[(NodeId, Hash32)],
        _shards: usize,
    ) -> Result<(StepOutcome, Vec<(Hash32, Hash32)>), String> {
        Err("this outer step does not implement sharded aggregation".into())
    }
}

/// The coordinator's judge at a round's close: asks the validator behind the outer
/// step and keeps its verdicts for the round's record.
struct RoundJudge<'a> {
    outer: &'a mut dyn OuterStep,
    from: Hash32,
    /// The last closed round, whose accepted updates a stale one repeats.
    previous: Option<Arc<RoundRecord>>,
    verdicts: Option<Result<Vec<Verdict>, String>>,
}

impl Judge for RoundJudge<'_> {
    fn judge(&mut self, round: u64, commits: &[(NodeId, &Commit, &[u64])]) -> Judged {
        let inputs: Vec<Judging> = commits
            .iter()
            .map(|(node, commit, batches)| Judging {
                node: *node,
                commit: (*commit).clone(),
                batches: batches.to_vec(),
            })
            .collect();
        let result = self
            .outer
            .judge(
                round,
                self.from,
                &inputs,
                self.previous.as_ref().map_or(&[][..], |r| &r.accepted),
            )
            .and_then(|v| {
                let same =
                    v.len() == inputs.len() && v.iter().zip(&inputs).all(|(v, j)| v.node == j.node);
                if same || v.is_empty() {
                    Ok(v)
                } else {
                    Err("the validator's verdicts do not match the round's commits".into())
                }
            });
        let mut judged = Judged::default();
        if let Ok(verdicts) = &result {
            for v in verdicts.iter().filter(|v| !v.accepted) {
                judged.refused.insert(v.node);
                if v.flags
                    .iter()
                    .any(|f| f.starts_with("copy") || f == "stale")
                {
                    judged.ejected.insert(v.node);
                }
            }
        }
        self.verdicts = Some(result);
        judged
    }
}

/// What an outer step produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepOutcome {
    pub theta_after: Hash32,
    /// The checkpoint (θ and outer velocity) after the step.
    pub checkpoint: Hash32,
}

/// What the engine is asked to do.
#[derive(Debug, Clone, PartialEq)]
pub enum HubInput {
    Join {
        node: NodeId,
    },
    Leave {
        node: NodeId,
    },
    Heartbeat {
        node: NodeId,
        stats: Option<NodeStats>,
    },
    /// A commit whose blob the driver has fetched, verified against its hash, checked
    /// to decode at the run's size, and stored.
    Commit {
        node: NodeId,
        body: CommitBody,
    },
    /// An audited node's private state arrived with the digest its commit named; the
    /// driver replays it.
    Revealed {
        node: NodeId,
        round: u64,
    },
    /// An audit's replay differed from the update by more than the tolerance; the node
    /// is asked for its step trail before anything is decided.
    Disputed {
        node: NodeId,
        round: u64,
        detail: String,
    },
    /// A disputed node's step trail arrived; the driver referees it.
    TrailReceived {
        node: NodeId,
        round: u64,
    },
    /// Proven cheating found outside a round's judging (a commit that resends an
    /// update another member committed): ejects the node like a failed audit.
    Eject {
        node: NodeId,
        reason: String,
    },
    /// A replay audit's result. A failed audit ejects the node, forfeits its escrow
    /// and slashes its stake.
    Audited {
        node: NodeId,
        round: u64,
        passed: bool,
        detail: String,
    },
    Theta {
        node: NodeId,
        report: ThetaReport,
    },
    /// An aggregator's report of the shard it published: a shard other than the
    /// round's ejects it (the reply's `agrees` says which).
    Aggregated {
        node: NodeId,
        report: AggregateReport,
    },
    Tick,
    /// The driver evaluated the final checkpoint.
    FinalEval {
        eval: FinalEval,
        dir: String,
    },
}

/// A refusal, with the code a client acts on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct HubError {
    pub code: ErrorCode,
    pub message: String,
}

impl HubError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> HubError {
        HubError {
            code,
            message: message.into(),
        }
    }
}

impl From<CoordError> for HubError {
    fn from(e: CoordError) -> HubError {
        let code = match &e {
            CoordError::NotMember { .. } => ErrorCode::NotMember,
            CoordError::Full { .. } => ErrorCode::RunFull,
            CoordError::WrongRound { .. } => ErrorCode::WrongRound,
            CoordError::AlreadyCommitted { .. } => ErrorCode::AlreadyCommitted,
            CoordError::NotAssigned { .. } => ErrorCode::NotAssigned,
            CoordError::TooManyTokens { .. } => ErrorCode::TooManyTokens,
            CoordError::Finished => ErrorCode::Finished,
            CoordError::Ejected { .. } => ErrorCode::Ejected,
            _ => ErrorCode::BadRequest,
        };
        HubError::new(code, e.to_string())
    }
}

/// What must become durable, atomically, before the input's reply is sent.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Change {
    /// A whole coordinator snapshot; replaces the stored one and every fact before it.
    pub snapshot: Option<Coordinator>,
    /// Facts since the last snapshot, in order.
    pub facts: Vec<StoredFact>,
    pub rounds: Vec<Arc<RoundRecord>>,
    pub divergent: Option<u64>,
    /// Audit results to record.
    pub audits: Vec<AuditRecord>,
}

impl Change {
    pub fn is_empty(&self) -> bool {
        self.snapshot.is_none()
            && self.facts.is_empty()
            && self.rounds.is_empty()
            && self.divergent.is_none()
            && self.audits.is_empty()
    }
}

/// A coordinator fact plus what the hub keeps beside it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StoredFact {
    pub fact: Fact,
    /// For a commit: where its blob was published.
    pub provider: Option<PeerAddr>,
}

/// What the driver does after the change is durable.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Pay this closed round from the run's pool (idempotent by round).
    Pay(Arc<RoundRecord>),
    /// Blobs and checkpoints no node needs any more: stop serving them, delete them.
    Release(Vec<Hash32>),
    /// A member was dropped (silent, or late too often).
    Dropped { node: NodeId, reason: DropReason },
    /// The run finished: write and evaluate the final model from this checkpoint.
    Finish { checkpoint: Hash32 },
    /// A member was ejected for cheating: slash its stake (idempotent by node).
    Slash { node: NodeId, reason: String },
    /// For the log.
    Log(String),
}

/// The result of one input.
#[derive(Debug, Default)]
pub struct Applied {
    pub change: Change,
    pub effects: Vec<Effect>,
    /// For a θ report: whether it agreed.
    pub agrees: Option<bool>,
}

/// What a hub restarts from (see [`crate::store::HubStore::load`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Durable {
    pub snapshot: Coordinator,
    pub facts: Vec<StoredFact>,
    pub rounds: Vec<Arc<RoundRecord>>,
    pub divergent: u64,
    pub audits: Vec<AuditRecord>,
}

/// The hub's state.
#[derive(Debug, Clone)]
pub struct HubState {
    spec: RunSpec,
    params: u64,
    coord: Coordinator,
    /// θ and checkpoint of round 0, before any step.
    theta0: Hash32,
    checkpoint0: Hash32,
    rounds: BTreeMap<u64, Arc<RoundRecord>>,
    /// Where each blob committed in the open round was published.
    sources: BTreeMap<Hash32, PeerAddr>,
    stats: BTreeMap<NodeId, NodeStats>,
    divergent: u64,
    final_eval: Option<(FinalEval, String)>,
    verify: VerifyConfig,
    /// Audits not yet decided, by (round, node).
    pending_audits: BTreeMap<(u64, NodeId), PendingAudit>,
    audits: BTreeMap<(u64, NodeId), AuditRecord>,
    /// When recent new members joined (for `RunSpec::joins_per_minute`); not persisted.
    joins: std::collections::VecDeque<u64>,
}

/// Blob bytes a DDP ring all-reduce of f32 gradients moves per node (sent + received)
/// for `steps` steps among `m` nodes of a model of `params` parameters.
pub fn ddp_bytes_per_node(steps: u64, m: u64, params: u64) -> u64 {
    let m = m.max(1) as f64;
    (steps as f64 * 2.0 * 2.0 * (m - 1.0) / m * 4.0 * params as f64) as u64
}

/// The ledger request that pays a closed round (one id per round, so it is paid once):
/// each accepted node's tokens × its verdict's score, and in full each node whose update
/// was refused on a measurement (norm or gain) and whose replay then matched (`cleared`:
/// its own work on its own data, left out of θ only because the round could not wait
/// for the replay), leaving out nodes ejected since (their escrow is forfeited). `None`
/// when no one is left to pay.
pub fn payout_request(
    run_id: &str,
    rec: &RoundRecord,
    ejected: &std::collections::BTreeSet<NodeId>,
    cleared: &std::collections::BTreeSet<NodeId>,
) -> Option<tessera_ledger::Request> {
    let scores: BTreeMap<NodeId, u32> =
        rec.verdicts.iter().map(|v| (v.node, v.score_ppm)).collect();
    let mut work: Vec<tessera_ledger::Work> = rec
        .work
        .iter()
        .filter(|(node, _)| !ejected.contains(node))
        .map(|(node, tokens)| tessera_ledger::Work {
            contributor: node.to_hex(),
            tokens: *tokens,
            score_ppm: scores.get(node).copied().unwrap_or(1_000_000),
        })
        .filter(|w| w.score_ppm > 0)
        .collect();
    work.extend(
        rec.verdicts
            .iter()
            .filter(|v| !v.accepted && cleared.contains(&v.node) && !ejected.contains(&v.node))
            .map(|v| tessera_ledger::Work {
                contributor: v.node.to_hex(),
                tokens: v.tokens,
                score_ppm: 1_000_000,
            }),
    );
    if work.is_empty() {
        return None;
    }
    Some(tessera_ledger::Request {
        id: format!("payout:{run_id}:{}", rec.round),
        signer: tessera_ledger::Signer::Organiser,
        op: tessera_ledger::Operation::Payout {
            run: run_id.to_string(),
            round: rec.round,
            work,
        },
    })
}

impl HubState {
    /// A new run. `batches_per_epoch` comes from the data set; `theta0` and `checkpoint0`
    /// are the hashes of θ₀ and of its checkpoint blob.
    pub fn new(
        spec: RunSpec,
        params: u64,
        batches_per_epoch: u64,
        theta0: Hash32,
        checkpoint0: Hash32,
    ) -> HubState {
        let coord = Coordinator::new(
            RunConfig::from_spec(&spec, batches_per_epoch),
            spec.tokens_per_batch(),
        );
        HubState {
            spec,
            params,
            coord,
            theta0,
            checkpoint0,
            rounds: BTreeMap::new(),
            sources: BTreeMap::new(),
            stats: BTreeMap::new(),
            divergent: 0,
            final_eval: None,
            verify: VerifyConfig::default(),
            pending_audits: BTreeMap::new(),
            audits: BTreeMap::new(),
            joins: std::collections::VecDeque::new(),
        }
    }

    /// Judges and pays with `verify` instead of the default configuration.
    pub fn with_verify(mut self, verify: VerifyConfig) -> HubState {
        self.verify = verify;
        self
    }

    pub fn verify_config(&self) -> &VerifyConfig {
        &self.verify
    }

    /// Audits the hub waits on.
    pub fn pending_audits(&self) -> &BTreeMap<(u64, NodeId), PendingAudit> {
        &self.pending_audits
    }

    /// Decided audits.
    pub fn audits(&self) -> &BTreeMap<(u64, NodeId), AuditRecord> {
        &self.audits
    }

    /// Whether a closed round's pay may leave escrow: its audit window has passed
    /// (`escrow_rounds` more rounds closed, or the run finished) and no audit that
    /// could still eject one of its nodes is open.
    pub fn releasable_pay(&self, round: u64) -> bool {
        let window_end = round.saturating_add(self.verify.escrow_rounds);
        let window_passed = self.coord.closed_rounds > window_end || self.is_finished();
        window_passed
            && !self
                .pending_audits
                .keys()
                .any(|(r, _)| *r <= window_end || self.is_finished())
    }

    /// The payout requests of every closed round whose pay has left escrow and that
    /// `unpaid` says is not paid yet, in round order.
    pub fn payouts(&self, unpaid: impl Fn(u64) -> bool) -> Vec<tessera_ledger::Request> {
        self.rounds
            .values()
            .filter(|r| unpaid(r.round) && self.releasable_pay(r.round))
            .filter_map(|r| {
                payout_request(&self.spec.run_id, r, &self.coord.ejected, &self.cleared(r))
            })
            .collect()
    }

    /// Nodes of round `rec` whose update was refused on a measurement only (norm or
    /// gain) and whose replay audit passed.
    fn cleared(&self, rec: &RoundRecord) -> std::collections::BTreeSet<NodeId> {
        let measured =
            |f: &String| f.starts_with("norm_high") || f.starts_with("norm_low") || f == "harmful";
        rec.verdicts
            .iter()
            .filter(|v| !v.accepted && !v.flags.is_empty() && v.flags.iter().all(measured))
            .filter(|v| {
                self.audits
                    .get(&(rec.round, v.node))
                    .is_some_and(|a| a.passed)
            })
            .map(|v| v.node)
            .collect()
    }

    /// The change that makes a new run durable.
    pub fn initial_change(&self) -> Change {
        Change {
            snapshot: Some(self.coord.clone()),
            ..Change::default()
        }
    }

    /// Rebuilds the state after a restart at `now_ms`: the snapshot, then the facts
    /// after it; members count as seen now, so the hub's downtime is not their silence.
    pub fn restore(mut self, durable: Durable, now_ms: u64) -> Result<HubState, String> {
        let mut coord = durable.snapshot;
        if coord.config != self.coord.config {
            return Err("the stored run has other coordinator settings".into());
        }
        for f in &durable.facts {
            coord.replay(&f.fact);
            if let (Fact::Committed { commit, .. }, Some(p)) = (&f.fact, &f.provider) {
                self.sources.insert(commit.blob_hash, p.clone());
            }
        }
        coord.refresh_members(now_ms);
        self.coord = coord;
        self.rounds = durable.rounds.into_iter().map(|r| (r.round, r)).collect();
        if self.rounds.len() as u64 != self.coord.closed_rounds {
            return Err(format!(
                "the store holds {} round records but {} closed rounds",
                self.rounds.len(),
                self.coord.closed_rounds
            ));
        }
        self.divergent = durable.divergent;
        self.audits = durable
            .audits
            .into_iter()
            .map(|a| ((a.round, a.node), a))
            .collect();
        for rec in self.rounds.values().cloned().collect::<Vec<_>>() {
            self.add_audits(&rec, now_ms);
        }
        Ok(self)
    }

    /// Opens the audits a closed round's verdicts ask for, unless decided already or
    /// moot (the node was ejected).
    fn add_audits(&mut self, rec: &RoundRecord, now_ms: u64) {
        let checkpoint = self.base_of(rec.round).1;
        for v in rec.verdicts.iter().filter(|v| v.audited) {
            let key = (rec.round, v.node);
            if self.audits.contains_key(&key) || self.coord.ejected.contains(&v.node) {
                continue;
            }
            self.pending_audits.insert(
                key,
                PendingAudit {
                    checkpoint,
                    verdict: v.clone(),
                    deadline_ms: now_ms.saturating_add(reveal_window_ms(&self.spec)),
                    revealed: false,
                    disputed: None,
                    trail: false,
                },
            );
        }
    }

    /// Counts every member as seen at `now_ms`: after the hub itself stalled (a long
    /// round close), so that its stall is not taken for the members' silence. Heartbeat
    /// times are not durable, so this changes nothing stored.
    pub fn refresh_members(&mut self, now_ms: u64) {
        self.coord.refresh_members(now_ms);
    }

    /// Parameters of the model trained.
    pub fn params(&self) -> u64 {
        self.params
    }

    pub fn spec(&self) -> &RunSpec {
        &self.spec
    }

    pub fn coordinator(&self) -> &Coordinator {
        &self.coord
    }

    /// Breaks the coordinator on purpose (a test tool for the simulator's checker).
    pub fn inject_fault(&mut self, fault: tessera_coordinator::Fault) {
        self.coord.inject_fault(fault);
    }

    pub fn rounds(&self) -> &BTreeMap<u64, Arc<RoundRecord>> {
        &self.rounds
    }

    pub fn round_record(&self, round: u64) -> Option<Arc<RoundRecord>> {
        self.rounds.get(&round).cloned()
    }

    /// θ after the last closed round: what the open round's commits start from,
    /// except under `overlap` ([`HubState::base_of`]).
    pub fn theta(&self) -> Hash32 {
        self.rounds
            .values()
            .next_back()
            .map_or(self.theta0, |r| r.theta_after)
    }

    /// How many closed rounds θ held when round `round`'s training started: `round`,
    /// or under `overlap` one fewer (its members trained it while the round before
    /// was judged and exchanged).
    fn base_closed(&self, round: u64) -> u64 {
        if self.spec.overlap {
            round.saturating_sub(1)
        } else {
            round
        }
    }

    /// θ and the checkpoint after `closed` closed rounds.
    fn after_closed(&self, closed: u64) -> (Hash32, Hash32) {
        match closed.checked_sub(1).and_then(|r| self.rounds.get(&r)) {
            Some(r) => (r.theta_after, r.checkpoint),
            None => (self.theta0, self.checkpoint0),
        }
    }

    /// θ and the checkpoint round `round` trains from.
    pub fn base_of(&self, round: u64) -> (Hash32, Hash32) {
        self.after_closed(self.base_closed(round))
    }

    /// The checkpoint after the last closed round.
    pub fn checkpoint(&self) -> Hash32 {
        self.rounds
            .values()
            .next_back()
            .map_or(self.checkpoint0, |r| r.checkpoint)
    }

    pub fn divergent(&self) -> u64 {
        self.divergent
    }

    pub fn is_finished(&self) -> bool {
        self.coord.phase == Phase::Finished
    }

    /// What `node` sees when it polls: constant size whatever the number of members.
    pub fn view(&self, node: &NodeId) -> StateView {
        StateView {
            phase: self.coord.phase,
            assignment: self.coord.assignment.get(node).cloned(),
            committed: self.coord.commits.contains_key(node),
            deadline_ms: self.coord.deadline_ms,
            closed_rounds: self.coord.closed_rounds,
            checkpoint: self.checkpoint(),
            audit: self
                .pending_audits
                .iter()
                .find(|((_, n), a)| n == node && !a.revealed)
                .map(|((r, _), _)| *r),
            dispute: self
                .pending_audits
                .iter()
                .find(|((_, n), a)| n == node && a.disputed.is_some() && !a.trail)
                .map(|((r, _), _)| *r),
            next_assignment: self.coord.next_assignment.get(node).cloned(),
        }
    }

    /// Checks a commit before its blob is fetched: the run, the round, membership, the
    /// assignment, the claimed tokens and θ. Nothing is fetched for a commit that would
    /// be refused anyway.
    pub fn check_commit(&self, node: &NodeId, body: &CommitBody) -> Result<(), HubError> {
        self.check_run("commit", &body.run_id)?;
        self.coord.check_commit(node, body.round, &body.commit)?;
        let theta = self.base_of(body.round).0;
        if body.commit.theta_hash != theta {
            return Err(HubError::new(
                ErrorCode::StaleTheta,
                format!(
                    "commit starts from θ {}, round {} starts from θ {}",
                    body.commit.theta_hash.short(12),
                    body.round,
                    theta.short(12)
                ),
            ));
        }
        self.check_not_resent(node, body.commit.blob_hash)?;
        Ok(())
    }

    /// Refuses an update already committed this round by another member, or accepted
    /// in one of the last [`RESENT_ROUNDS_CHECKED`] rounds: an update is credited to its
    /// first committer, and an old update sent again (a `stale` free rider) is not new
    /// work. O(members) per commit: a scan of this round's commits and the recent
    /// records. Near copies are the validator's to find (`tessera_verify`).
    fn check_not_resent(&self, node: &NodeId, blob: Hash32) -> Result<(), HubError> {
        let resent = |by: &NodeId, round: u64| {
            HubError::new(
                ErrorCode::Duplicate,
                format!(
                    "update {} was already committed by {} in round {round}; an update is \
                     credited to its first committer",
                    blob.short(12),
                    by.short(12)
                ),
            )
        };
        let round = self.coord.round().unwrap_or(self.coord.closed_rounds);
        if let Some((by, _)) = self
            .coord
            .commits
            .iter()
            .find(|(by, c)| *by != node && c.blob_hash == blob)
        {
            return Err(resent(by, round));
        }
        for rec in self.rounds.values().rev().take(RESENT_ROUNDS_CHECKED) {
            if let Some((by, _)) = rec.accepted.iter().find(|(_, h)| *h == blob) {
                return Err(resent(by, rec.round));
            }
        }
        Ok(())
    }

    /// Applies one input at `now_ms`. A refused input changes nothing, except after an
    /// [`ErrorCode::Internal`] error (a failed outer step), after which the state is
    /// not to be used: the driver restores the engine from its store.
    pub fn apply(
        &mut self,
        input: HubInput,
        now_ms: u64,
        outer: &mut dyn OuterStep,
    ) -> Result<Applied, HubError> {
        let mut applied = Applied::default();
        let mut audit_failed = None;
        let mut failed_audit = None;
        let mut new_member = false;
        let (coord_input, fact) = match input {
            HubInput::Join { node } => {
                self.check_join(&node, now_ms)?;
                if !self.coord.members.contains_key(&node) {
                    new_member = true;
                }
                (Input::Join { node }, None)
            }
            HubInput::Revealed { node, round } => {
                let audit = self.open_audit(node, round)?;
                audit.revealed = true;
                return Ok(applied);
            }
            HubInput::Disputed {
                node,
                round,
                detail,
            } => {
                let deadline = now_ms.saturating_add(reveal_window_ms(&self.spec));
                let audit = self.open_audit(node, round)?;
                applied.effects.push(Effect::Log(format!(
                    "audit of {} in round {round}: {detail}; asking for its step trail",
                    node.short(12)
                )));
                audit.disputed = Some(detail);
                audit.trail = false;
                audit.deadline_ms = deadline;
                return Ok(applied);
            }
            HubInput::TrailReceived { node, round } => {
                let audit = self.open_audit(node, round)?;
                if audit.disputed.is_none() {
                    return Err(HubError::new(
                        ErrorCode::NotFound,
                        format!("the audit of round {round} is not disputed"),
                    ));
                }
                audit.trail = true;
                return Ok(applied);
            }
            HubInput::Eject { node, reason } => {
                if !self.coord.members.contains_key(&node) {
                    return Err(CoordError::NotMember { node }.into());
                }
                audit_failed = Some(AuditRecord {
                    round: self.coord.round().unwrap_or(self.coord.closed_rounds),
                    node,
                    passed: false,
                    detail: reason,
                });
                (Input::Eject { node }, None)
            }
            HubInput::Audited {
                node,
                round,
                passed,
                detail,
            } => {
                if !self.pending_audits.contains_key(&(round, node)) {
                    return Err(HubError::new(
                        ErrorCode::NotFound,
                        format!("no audit of {} in round {round} is open", node.short(12)),
                    ));
                }
                let rec = AuditRecord {
                    round,
                    node,
                    passed,
                    detail,
                };
                if passed {
                    self.record_audit(rec, &mut applied);
                    return Ok(applied);
                }
                // Recorded once the coordinator has taken the ejection.
                audit_failed = Some(rec.clone());
                failed_audit = Some(rec);
                (Input::Eject { node }, None)
            }
            HubInput::Leave { node } => (Input::Leave { node }, None),
            HubInput::Heartbeat { node, stats } => {
                // Statistics are kept for members only, so they are bounded by the run.
                if !self.coord.members.contains_key(&node) {
                    return Err(CoordError::NotMember { node }.into());
                }
                if let Some(s) = stats {
                    self.stats.insert(node, s);
                }
                (Input::Heartbeat { node }, None)
            }
            HubInput::Commit { node, body } => {
                self.check_commit(&node, &body)?;
                let provider = body.provider.clone();
                self.sources.insert(body.commit.blob_hash, provider.clone());
                (
                    Input::Commit {
                        node,
                        round: body.round,
                        commit: body.commit,
                    },
                    Some(provider),
                )
            }
            HubInput::Theta { node, report } => {
                return self.theta_report(node, report).map(|agrees| Applied {
                    change: Change {
                        divergent: (!agrees).then_some(self.divergent),
                        ..Change::default()
                    },
                    agrees: Some(agrees),
                    ..Applied::default()
                });
            }
            HubInput::Aggregated { node, report } => {
                if !self.coord.members.contains_key(&node) {
                    return Err(CoordError::NotMember { node }.into());
                }
                let rec = self.check_aggregate(&node, &report)?;
                let expected = rec.shards[report.shard as usize].hash;
                if report.hash == expected {
                    applied.agrees = Some(true);
                    return Ok(applied);
                }
                applied.agrees = Some(false);
                audit_failed = Some(AuditRecord {
                    round: report.round,
                    node,
                    passed: false,
                    detail: format!(
                        "published aggregated shard {} of round {} as {}, not {}",
                        report.shard,
                        report.round,
                        report.hash.short(12),
                        expected.short(12)
                    ),
                });
                (Input::Eject { node }, None)
            }
            HubInput::Tick => {
                // An audited node that never revealed its state fails its audit.
                let expired = self
                    .pending_audits
                    .iter()
                    .find(|(_, a)| {
                        (!a.revealed || (a.disputed.is_some() && !a.trail))
                            && now_ms >= a.deadline_ms
                    })
                    .map(|(k, a)| (*k, a.revealed));
                if let Some(((round, node), revealed)) = expired {
                    let detail = if revealed {
                        "its step trail was not handed in in time"
                    } else {
                        "its private state was not revealed in time"
                    };
                    return self.apply(
                        HubInput::Audited {
                            node,
                            round,
                            passed: false,
                            detail: detail.into(),
                        },
                        now_ms,
                        outer,
                    );
                }
                (Input::Tick, None)
            }
            HubInput::FinalEval { eval, dir } => {
                self.final_eval = Some((eval, dir));
                return Ok(applied);
            }
        };
        // O(1) per input: the last record is shared, its accepted list read only if a
        // round closes.
        let open = self.coord.round().unwrap_or(self.coord.closed_rounds);
        let mut judge = RoundJudge {
            from: self.base_of(open).1,
            previous: self.rounds.values().next_back().cloned(),
            outer,
            verdicts: None,
        };
        let events = self
            .coord
            .apply_judged(coord_input.clone(), now_ms, &mut judge)?;
        let verdicts = match judge.verdicts.take() {
            Some(Err(e)) => {
                return Err(HubError::new(
                    ErrorCode::Internal,
                    format!("judging the round failed: {e}"),
                ))
            }
            Some(Ok(v)) => v,
            None => Vec::new(),
        };
        let outer = judge.outer;
        if let Some(rec) = failed_audit {
            self.record_audit(rec, &mut applied);
        }
        if new_member {
            self.joins.push_back(now_ms);
        }
        if let Some(rec) = audit_failed {
            self.pending_audits.retain(|(_, n), _| *n != rec.node);
            applied.effects.push(Effect::Log(format!(
                "{} caught in round {} ({}): ejected, escrow forfeited",
                rec.node.short(12),
                rec.round,
                rec.detail
            )));
            applied.effects.push(Effect::Slash {
                node: rec.node,
                reason: rec.detail.clone(),
            });
            applied.effects.push(Effect::Pay(self.last_record()));
            if !events.iter().any(|e| {
                matches!(
                    e,
                    Event::RoundStarted { .. } | Event::RoundClosed { .. } | Event::Finished { .. }
                )
            }) {
                applied.change.facts.push(StoredFact {
                    fact: Fact::Ejected { node: rec.node },
                    provider: None,
                });
            }
        }
        let transition = events.iter().any(|e| {
            matches!(
                e,
                Event::RoundStarted { .. } | Event::RoundClosed { .. } | Event::Finished { .. }
            )
        });
        // Round closes take the outer step. If one fails, the coordinator has already
        // moved on: the error is `Internal` and the driver must rebuild the engine from
        // its store (fail-stop), where the input never happened.
        let mut closed = Vec::new();
        for e in &events {
            if let Event::RoundClosed {
                round,
                accepted,
                late,
                refused,
                work,
            } = e
            {
                let rec = self
                    .close_round(
                        *round, accepted, late, refused, &verdicts, work, outer, now_ms,
                    )
                    .map_err(|e| {
                        HubError::new(ErrorCode::Internal, format!("outer step failed: {e}"))
                    })?;
                closed.push(rec);
            }
        }
        for e in &events {
            match e {
                Event::MemberDropped { node, reason } => {
                    self.stats.remove(node);
                    if *reason == DropReason::Ejected {
                        self.pending_audits.retain(|(_, n), _| n != node);
                        applied.effects.push(Effect::Slash {
                            node: *node,
                            reason: "committed a copy of another node's update".into(),
                        });
                    }
                    applied.effects.push(Effect::Dropped {
                        node: *node,
                        reason: *reason,
                    });
                    if !transition {
                        applied.change.facts.push(StoredFact {
                            fact: Fact::Removed { node: *node },
                            provider: None,
                        });
                    }
                }
                Event::RoundStarted { round, members, .. } => applied.effects.push(Effect::Log(
                    format!("round {round} started with {members} node(s)"),
                )),
                Event::Finished { rounds } => {
                    applied
                        .effects
                        .push(Effect::Log(format!("run finished after {rounds} rounds")));
                    applied.effects.push(Effect::Finish {
                        checkpoint: self.checkpoint(),
                    });
                }
                Event::RoundClosed { round, .. } => {
                    if let Some(rec) = closed.iter().find(|r| r.round == *round) {
                        applied.effects.push(Effect::Log(format!(
                            "round {} closed: {} accepted, {} late, θ {}",
                            rec.round,
                            rec.accepted.len(),
                            rec.late.len(),
                            rec.theta_after.short(12)
                        )));
                    }
                }
            }
        }
        // Statistics are kept for members only: a node that left or was ejected (which
        // raises no `MemberDropped`) takes its statistics with it.
        if let Input::Leave { node } | Input::Eject { node } = &coord_input {
            self.stats.remove(node);
        }
        if transition {
            applied.change.snapshot = Some(self.coord.clone());
            applied.change.facts.clear();
        } else {
            match coord_input {
                Input::Join { node } => {
                    if let Some(member) = self.coord.members.get(&node) {
                        applied.change.facts.insert(
                            0,
                            StoredFact {
                                fact: Fact::Member {
                                    node,
                                    member: member.clone(),
                                },
                                provider: None,
                            },
                        );
                    }
                }
                Input::Leave { node } => applied.change.facts.insert(
                    0,
                    StoredFact {
                        fact: Fact::Removed { node },
                        provider: None,
                    },
                ),
                Input::Commit { node, commit, .. } => applied.change.facts.insert(
                    0,
                    StoredFact {
                        fact: Fact::Committed { node, commit },
                        provider: fact,
                    },
                ),
                Input::Heartbeat { .. } | Input::Tick | Input::Eject { .. } => {}
            }
        }
        for rec in closed {
            if !rec.work.is_empty() {
                applied.effects.push(Effect::Pay(rec.clone()));
            }
            // Nodes one round behind still fetch the last round's blobs; older ones
            // and the checkpoint before the last are released.
            if let Some(release) = rec.round.checked_sub(2).map(|r| self.releasable(r)) {
                if !release.is_empty() {
                    applied.effects.push(Effect::Release(release));
                }
            }
            applied.change.rounds.push(rec);
        }
        Ok(applied)
    }

    #[allow(clippy::too_many_arguments)]
    fn close_round(
        &mut self,
        round: u64,
        accepted: &BTreeMap<NodeId, tessera_protocol::wire::Commit>,
        late: &[NodeId],
        refused: &[NodeId],
        verdicts: &[Verdict],
        work: &[WorkRecord],
        outer: &mut dyn OuterStep,
        now_ms: u64,
    ) -> Result<Arc<RoundRecord>, String> {
        let list: Vec<(NodeId, Hash32)> = accepted.iter().map(|(n, c)| (*n, c.blob_hash)).collect();
        let theta_before = self.theta();
        let sharded = self.spec.aggregation == AggregationMode::Sharded && !list.is_empty();
        let (outcome, shards) = if sharded {
            let per = self.spec.aggregators_per_shard as usize;
            let count = shard::shard_count(list.len(), per, self.params as usize);
            let (outcome, blobs) = outer.step_sharded(round, self.checkpoint(), &list, count)?;
            if blobs.len() != count {
                return Err(format!(
                    "the outer step made {} shards, not {count}",
                    blobs.len()
                ));
            }
            let seed = shard::assignment_seed(round, list.iter().map(|(_, h)| &h.0));
            let plan = shard::assign(seed, list.len(), count, per);
            let shards = blobs
                .into_iter()
                .zip(plan)
                .map(|((inputs, hash), members)| ShardRecord {
                    aggregators: members.into_iter().map(|m| list[m].0).collect(),
                    inputs,
                    hash,
                })
                .collect();
            (outcome, shards)
        } else {
            (outer.step(round, self.checkpoint(), &list)?, Vec::new())
        };
        let sources = list
            .iter()
            .map(|(_, h)| {
                self.sources
                    .get(h)
                    .cloned()
                    .unwrap_or(PeerAddr(String::new()))
            })
            .collect();
        self.sources.clear();
        let rec = Arc::new(RoundRecord {
            round,
            accepted: list,
            sources,
            late: late.to_vec(),
            tokens: work.iter().map(|w| w.tokens).sum(),
            work: work.iter().map(|w| (w.node, w.tokens)).collect(),
            theta_before,
            theta_after: outcome.theta_after,
            checkpoint: outcome.checkpoint,
            refused: refused.to_vec(),
            verdicts: verdicts.to_vec(),
            shards,
        });
        self.rounds.insert(round, rec.clone());
        self.add_audits(&rec, now_ms);
        Ok(rec)
    }

    /// Blobs of round `old` that no later round or the current checkpoint names
    /// (content addressing lets one blob appear in several rounds).
    fn releasable(&self, old: u64) -> Vec<Hash32> {
        let Some(rec) = self.rounds.get(&old) else {
            return Vec::new();
        };
        // Audits still open replay from their round's checkpoint and compare with the
        // committed blob: both stay until the audit is decided (and go with the next
        // release after it).
        let keep: std::collections::BTreeSet<Hash32> = self
            .rounds
            .range(old + 1..)
            .flat_map(|(_, r)| r.accepted.iter().map(|(_, h)| *h).chain([r.checkpoint]))
            .chain([self.checkpoint0])
            .chain(
                self.pending_audits
                    .values()
                    .flat_map(|a| [a.checkpoint, a.verdict.blob_hash]),
            )
            .collect();
        let mut out: Vec<Hash32> = rec
            .accepted
            .iter()
            .map(|(_, h)| *h)
            .chain(rec.verdicts.iter().map(|v| v.blob_hash))
            .chain([rec.checkpoint])
            .filter(|h| !keep.contains(h))
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// Closes the pending audit `rec` decides: records it, releases what it alone kept
    /// past its round's release, and (passed) logs it and pays what it held back.
    fn record_audit(&mut self, rec: AuditRecord, applied: &mut Applied) {
        let (round, node) = (rec.round, rec.node);
        let Some(done) = self.pending_audits.remove(&(round, node)) else {
            return;
        };
        if round + 2 < self.coord.closed_rounds {
            let still: Vec<Hash32> = self
                .pending_audits
                .values()
                .flat_map(|a| [a.checkpoint, a.verdict.blob_hash])
                .chain([self.checkpoint0])
                .collect();
            let gone: Vec<Hash32> = [done.checkpoint, done.verdict.blob_hash]
                .into_iter()
                .filter(|h| !still.contains(h))
                .collect();
            if !gone.is_empty() {
                applied.effects.push(Effect::Release(gone));
            }
        }
        self.audits.insert((round, node), rec.clone());
        applied.change.audits.push(rec.clone());
        if rec.passed {
            applied.effects.push(Effect::Log(format!(
                "audit of {} in round {round} passed ({})",
                node.short(12),
                rec.detail
            )));
            applied.effects.push(Effect::Pay(self.last_record()));
        }
    }

    fn open_audit(&mut self, node: NodeId, round: u64) -> Result<&mut PendingAudit, HubError> {
        self.pending_audits.get_mut(&(round, node)).ok_or_else(|| {
            HubError::new(
                ErrorCode::NotFound,
                format!("no audit of {} in round {round} is open", node.short(12)),
            )
        })
    }

    /// The latest closed round's record (for [`Effect::Pay`], which pays whatever left
    /// escrow).
    fn last_record(&self) -> Arc<RoundRecord> {
        self.rounds
            .values()
            .next_back()
            .cloned()
            .unwrap_or_else(|| {
                Arc::new(RoundRecord {
                    round: 0,
                    accepted: Vec::new(),
                    sources: Vec::new(),
                    late: Vec::new(),
                    tokens: 0,
                    work: Vec::new(),
                    theta_before: self.theta0,
                    theta_after: self.theta0,
                    checkpoint: self.checkpoint0,
                    refused: Vec::new(),
                    verdicts: Vec::new(),
                    shards: Vec::new(),
                })
            })
    }

    /// The record an aggregator's report is about, once the report is checked: the
    /// run, a closed sharded round, a shard of it, and a sender drawn to aggregate it.
    fn check_aggregate(
        &self,
        node: &NodeId,
        report: &AggregateReport,
    ) -> Result<Arc<RoundRecord>, HubError> {
        self.check_run("aggregate report", &report.run_id)?;
        let rec = self.rounds.get(&report.round).ok_or_else(|| {
            HubError::new(
                ErrorCode::NotFound,
                format!("round {} has no record", report.round),
            )
        })?;
        let shard = rec.shards.get(report.shard as usize).ok_or_else(|| {
            HubError::new(
                ErrorCode::NotFound,
                format!(
                    "round {} has {} shards, not shard {}",
                    report.round,
                    rec.shards.len(),
                    report.shard
                ),
            )
        })?;
        if !shard.aggregators.contains(node) {
            return Err(HubError::new(
                ErrorCode::BadRequest,
                format!(
                    "{} does not aggregate shard {} of round {}",
                    node.short(12),
                    report.shard,
                    report.round
                ),
            ));
        }
        Ok(rec.clone())
    }

    /// A join of a node that is not a member yet counts against the run's
    /// `joins_per_minute`.
    fn check_join(&mut self, node: &NodeId, now_ms: u64) -> Result<(), HubError> {
        if self.coord.members.contains_key(node) {
            return Ok(());
        }
        if self.coord.ejected.contains(node) {
            return Err(CoordError::Ejected { node: *node }.into());
        }
        while self
            .joins
            .front()
            .is_some_and(|t| now_ms.saturating_sub(*t) >= 60_000)
        {
            self.joins.pop_front();
        }
        let max = self.spec.joins_per_minute as usize;
        if max > 0 && self.joins.len() >= max {
            return Err(HubError::new(
                ErrorCode::TooManyJoins,
                format!("{max} nodes joined in the last minute; retry later"),
            ));
        }
        Ok(())
    }

    /// A body that names another run than this hub's is refused.
    fn check_run(&self, what: &str, run_id: &str) -> Result<(), HubError> {
        if run_id == self.spec.run_id {
            return Ok(());
        }
        Err(HubError::new(
            ErrorCode::WrongRun,
            format!(
                "{what} is for run `{}`, this hub runs `{}`",
                run_id.escape_debug(),
                self.spec.run_id
            ),
        ))
    }

    fn theta_report(&mut self, node: NodeId, report: ThetaReport) -> Result<bool, HubError> {
        self.check_run("report", &report.run_id)?;
        // Only members' reports count, so outsiders cannot raise the divergence count.
        if !self.coord.members.contains_key(&node) {
            return Err(CoordError::NotMember { node }.into());
        }
        let expected = self
            .rounds
            .get(&report.round)
            .map(|r| r.theta_after)
            .ok_or_else(|| {
                HubError::new(
                    ErrorCode::NotFound,
                    format!("round {} is not closed", report.round),
                )
            })?;
        let agrees = expected == report.hash;
        if !agrees {
            self.divergent += 1;
        }
        Ok(agrees)
    }

    /// The run at a glance. O(N): for `/summary`, not for polling.
    pub fn summary(&self) -> Summary {
        let m = self
            .rounds
            .values()
            .map(|r| r.accepted.len())
            .max()
            .unwrap_or(1) as u64;
        Summary {
            run_id: self.spec.run_id.clone(),
            finished: self.is_finished(),
            rounds_closed: self.coord.closed_rounds,
            members: self.coord.members.len() as u64,
            params: self.params,
            theta_hash: self.theta(),
            divergent_reports: self.divergent,
            nodes: self.stats.clone(),
            ddp_bytes_per_node: ddp_bytes_per_node(
                self.coord.closed_rounds * self.spec.inner_steps,
                m,
                self.params,
            ),
            final_eval: self.final_eval.as_ref().map(|(e, _)| *e),
            final_checkpoint: self.final_eval.as_ref().map(|(_, d)| d.clone()),
            read_only: None,
            verification: self.verification(),
            audits_open: self.pending_audits.len() as u64,
            open_round: self.coord.round(),
            work: self.work(),
        }
    }

    /// Every known node's work (members, and every node a round recorded, judged or
    /// ejected): O(rounds × commits + members).
    fn work(&self) -> BTreeMap<NodeId, tessera_protocol::wire::NodeWork> {
        let mut out: BTreeMap<NodeId, tessera_protocol::wire::NodeWork> = BTreeMap::new();
        for r in self.rounds.values() {
            for (node, tokens) in &r.work {
                let w = out.entry(*node).or_default();
                w.tokens += tokens;
                w.rounds_accepted += 1;
            }
            for node in &r.late {
                out.entry(*node).or_default().rounds_late += 1;
            }
            for v in &r.verdicts {
                out.entry(v.node).or_default();
            }
        }
        for node in &self.coord.ejected {
            out.entry(*node).or_default();
        }
        for node in self.coord.members.keys() {
            out.entry(*node).or_default().member = true;
        }
        out
    }

    /// Each judged node's verified work: O(rounds × commits).
    fn verification(&self) -> BTreeMap<NodeId, tessera_protocol::wire::NodeVerification> {
        let mut out: BTreeMap<NodeId, tessera_protocol::wire::NodeVerification> = BTreeMap::new();
        let mut score_sum: BTreeMap<NodeId, u64> = BTreeMap::new();
        for v in self.rounds.values().flat_map(|r| &r.verdicts) {
            let e = out.entry(v.node).or_default();
            if v.accepted {
                e.accepted += 1;
            } else {
                e.refused += 1;
            }
            *score_sum.entry(v.node).or_default() += u64::from(v.score_ppm);
        }
        for (node, e) in out.iter_mut() {
            let judged = (e.accepted + e.refused).max(1);
            e.score_ppm_mean = (score_sum[node] / judged) as u32;
            e.ejected = self.coord.ejected.contains(node);
        }
        for node in &self.coord.ejected {
            out.entry(*node).or_default().ejected = true;
        }
        for ((_, node), a) in &self.audits {
            let e = out.entry(*node).or_default();
            if a.passed {
                e.audits_passed += 1;
            } else {
                e.audits_failed += 1;
            }
        }
        out
    }

    /// Takes back members' statistics a restarted hub kept (heartbeats are not
    /// durable): members only, and never over a newer heartbeat's.
    pub fn restore_stats(&mut self, kept: &BTreeMap<NodeId, NodeStats>) {
        for (node, s) in kept {
            if self.coord.members.contains_key(node) && !self.stats.contains_key(node) {
                self.stats.insert(*node, *s);
            }
        }
    }

    /// Members' statistics (bounded by the members).
    pub fn stats(&self) -> &BTreeMap<NodeId, NodeStats> {
        &self.stats
    }
}

/// Pays every closed round whose pay has left escrow ([`HubState::payouts`]) that the
/// ledger has not paid yet, and slashes every ejected node, returning a log line per
/// round paid or refused and per slash.
///
/// The hub's round records and the ledger are separate stores, so a crash can fall
/// between closing a round (or an audit) and paying it. Payout ids are
/// `payout:RUN:ROUND` and slash ids `slash:RUN:NODE`, so submitting again after a restart
/// is a no-op for what was done and does the rest: each round is paid, and each
/// ejected node slashed, exactly once. Payouts stop at the first refusal (an empty
/// pool): later rounds wait.
pub fn pay_rounds<S: tessera_ledger::Store>(
    ledger: &mut tessera_ledger::Ledger<S>,
    state: &HubState,
    now_ms: u64,
) -> Vec<String> {
    let run_id = &state.spec().run_id;
    let mut log = Vec::new();
    let paid: std::collections::BTreeSet<u64> = ledger
        .state()
        .run(run_id)
        .map(|r| r.paid.keys().copied().collect())
        .unwrap_or_default();
    for req in state.payouts(|r| !paid.contains(&r)) {
        let tessera_ledger::Operation::Payout { round, .. } = &req.op else {
            continue;
        };
        let round = *round;
        match ledger.submit(&req, now_ms) {
            Ok(receipt) => log.push(format!(
                "paid round {round} ({} transfers)",
                receipt.transfers.len()
            )),
            Err(e) => {
                log.push(format!("round {round} not paid: {e}"));
                break;
            }
        }
    }
    for node in &state.coordinator().ejected {
        let id = slash_id(run_id, node);
        let stake = tessera_ledger::Account::Stake {
            run: run_id.clone(),
            contributor: node.to_hex(),
        };
        // Done before, or nothing staked to take.
        if ledger.state().receipt(&id).is_some() || ledger.state().balance(&stake).unwrap_or(0) == 0
        {
            continue;
        }
        let req = tessera_ledger::Request {
            id,
            signer: tessera_ledger::Signer::Organiser,
            op: tessera_ledger::Operation::Slash {
                run: run_id.clone(),
                contributor: node.to_hex(),
                fraction_ppm: 1_000_000,
                reason: "ejected from the run for cheating".into(),
            },
        };
        match ledger.submit(&req, now_ms) {
            Ok(receipt) => log.push(format!(
                "slashed {} ({} transfers)",
                node.short(12),
                receipt.transfers.len()
            )),
            Err(e) => log.push(format!("slashing {} failed: {e}", node.short(12))),
        }
    }
    log
}
