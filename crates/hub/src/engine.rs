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
use tessera_coordinator::{CoordError, Coordinator, Event, Fact, Input, RunConfig, WorkRecord};
use tessera_protocol::wire::{
    CommitBody, ErrorCode, FinalEval, NodeStats, PeerAddr, Phase, RoundRecord, StateView, Summary,
    ThetaReport,
};
use tessera_protocol::{Hash32, NodeId, RunSpec};

/// Closed rounds whose accepted updates a commit may not send again.
pub const RESENT_ROUNDS_CHECKED: usize = 3;
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
    Theta {
        node: NodeId,
        report: ThetaReport,
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
}

impl Change {
    pub fn is_empty(&self) -> bool {
        self.snapshot.is_none()
            && self.facts.is_empty()
            && self.rounds.is_empty()
            && self.divergent.is_none()
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
}

/// Blob bytes a DDP ring all-reduce of f32 gradients moves per node (sent + received)
/// for `steps` steps among `m` nodes of a model of `params` parameters.
pub fn ddp_bytes_per_node(steps: u64, m: u64, params: u64) -> u64 {
    let m = m.max(1) as f64;
    (steps as f64 * 2.0 * 2.0 * (m - 1.0) / m * 4.0 * params as f64) as u64
}

/// The ledger request that pays a closed round (one id per round, so it is paid once).
pub fn payout_request(run_id: &str, rec: &RoundRecord) -> tessera_ledger::Request {
    let work = rec
        .work
        .iter()
        .map(|(node, tokens)| tessera_ledger::Work {
            contributor: node.to_hex(),
            tokens: *tokens,
            score_ppm: 1_000_000,
        })
        .collect();
    tessera_ledger::Request {
        id: format!("payout:{run_id}:{}", rec.round),
        signer: tessera_ledger::Signer::Organiser,
        op: tessera_ledger::Operation::Payout {
            run: run_id.to_string(),
            round: rec.round,
            work,
        },
    }
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
        }
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
        Ok(self)
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

    /// θ every commit of the open round must start from.
    pub fn theta(&self) -> Hash32 {
        self.rounds
            .values()
            .next_back()
            .map_or(self.theta0, |r| r.theta_after)
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
        }
    }

    /// Checks a commit before its blob is fetched: the run, the round, membership, the
    /// assignment, the claimed tokens and θ. Nothing is fetched for a commit that would
    /// be refused anyway.
    pub fn check_commit(&self, node: &NodeId, body: &CommitBody) -> Result<(), HubError> {
        self.check_run("commit", &body.run_id)?;
        self.coord.check_commit(node, body.round, &body.commit)?;
        let theta = self.theta();
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
        let (coord_input, fact) = match input {
            HubInput::Join { node } => (Input::Join { node }, None),
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
            HubInput::Tick => (Input::Tick, None),
            HubInput::FinalEval { eval, dir } => {
                self.final_eval = Some((eval, dir));
                return Ok(applied);
            }
        };
        let events = self.coord.apply(coord_input.clone(), now_ms)?;
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
                work,
            } = e
            {
                let rec = self
                    .close_round(*round, accepted, late, work, outer)
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
        if let Input::Leave { node } = &coord_input {
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
                Input::Heartbeat { .. } | Input::Tick => {}
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

    fn close_round(
        &mut self,
        round: u64,
        accepted: &BTreeMap<NodeId, tessera_protocol::wire::Commit>,
        late: &[NodeId],
        work: &[WorkRecord],
        outer: &mut dyn OuterStep,
    ) -> Result<Arc<RoundRecord>, String> {
        let list: Vec<(NodeId, Hash32)> = accepted.iter().map(|(n, c)| (*n, c.blob_hash)).collect();
        let theta_before = self.theta();
        let outcome = outer.step(round, self.checkpoint(), &list)?;
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
        });
        self.rounds.insert(round, rec.clone());
        Ok(rec)
    }

    /// Blobs of round `old` that no later round or the current checkpoint names
    /// (content addressing lets one blob appear in several rounds).
    fn releasable(&self, old: u64) -> Vec<Hash32> {
        let Some(rec) = self.rounds.get(&old) else {
            return Vec::new();
        };
        let keep: std::collections::BTreeSet<Hash32> = self
            .rounds
            .range(old + 1..)
            .flat_map(|(_, r)| r.accepted.iter().map(|(_, h)| *h).chain([r.checkpoint]))
            .chain([self.checkpoint0])
            .collect();
        let mut out: Vec<Hash32> = rec
            .accepted
            .iter()
            .map(|(_, h)| *h)
            .chain([rec.checkpoint])
            .filter(|h| !keep.contains(h))
            .collect();
        out.sort();
        out.dedup();
        out
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
        }
    }

    /// Members' statistics (bounded by the members).
    pub fn stats(&self) -> &BTreeMap<NodeId, NodeStats> {
        &self.stats
    }
}

/// Pays every closed round in `rounds` that the ledger has not paid yet, from its work
/// record, and returns a log line per round paid or refused.
///
/// The hub's round records and the ledger are separate stores, so a crash can fall
/// between closing a round and paying it. Payout request ids are `payout:RUN:ROUND`, so
/// submitting again after a restart is a no-op for rounds already paid and pays the
/// rest: each round is paid exactly once. Until audits exist every accepted update has
/// full score weight. Stops at the first refusal (an empty pool): later rounds wait.
pub fn pay_rounds<'a, S: tessera_ledger::Store>(
    ledger: &mut tessera_ledger::Ledger<S>,
    run_id: &str,
    rounds: impl IntoIterator<Item = &'a Arc<RoundRecord>>,
    now_ms: u64,
) -> Vec<String> {
    let mut log = Vec::new();
    for rec in rounds {
        let paid = ledger
            .state()
            .run(run_id)
            .is_some_and(|r| r.paid.contains_key(&rec.round));
        if paid || rec.work.is_empty() {
            continue;
        }
        match ledger.submit(&payout_request(run_id, rec), now_ms) {
            Ok(receipt) => log.push(format!(
                "paid round {} ({} transfers)",
                rec.round,
                receipt.transfers.len()
            )),
            Err(e) => {
                log.push(format!("round {} not paid: {e}", rec.round));
                break;
            }
        }
    }
    log
}
