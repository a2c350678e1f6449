//! The run coordinator: a pure state machine over rounds of DiLoCo-style training.
//!
//! Inputs are decoded, authenticated messages (`Join`, `Leave`, `Heartbeat`,
//! `Commit`) and `Tick`s, each with the time `now_ms` passed in; outputs are events the
//! driver acts on (start a round, close it with an accepted set and a work record, drop
//! a member). No I/O, no clock, no randomness of its own: the same inputs give the same
//! state on the hub, in the simulator, or anywhere else.
//!
//! Data assignment: an epoch is `batches_per_epoch` batches. Each round every member is
//! assigned `batches_per_node` batch indices; batches of members who did not deliver go
//! back to a pool that is assigned first next round, so every batch of an epoch is
//! trained and accepted exactly once. Which member gets which batches is decided by
//! shuffling the members with a seed derived from the previous round's accepted commit
//! hashes, so no node can predict its assignment before the previous round closes, and
//! every member can recompute everyone's assignment from public data.
//!
//! Cost: one input costs O(log N) in the number of members N. Silence is found through
//! an index ordered by last-seen time, and whether every assigned member has committed
//! through the set of those still pending; only starting and closing a round touch
//! every member. The indexes are derived state, rebuilt when a snapshot is loaded.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde::{Deserialize, Serialize};
pub use tessera_protocol::wire::{Commit, Phase};
pub use tessera_protocol::{Hash32, NodeId, RunSpec};

/// The settings of a run that the coordinator needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunConfig {
    pub run_id: String,
    /// Training starts when this many nodes have joined.
    pub min_nodes: usize,
    /// Most members at once (the run setting `max_nodes`).
    pub max_nodes: usize,
    /// A round closes when every member committed or at this deadline.
    pub round_deadline_ms: u64,
    /// A member silent for this long is dropped.
    pub heartbeat_timeout_ms: u64,
    /// A member that misses this many rounds in a row is dropped.
    pub missed_rounds_max: u32,
    /// Batches each member trains per round (its inner steps).
    pub batches_per_node: u64,
    pub batches_per_epoch: u64,
    /// Rounds to train; the run finishes after this many.
    pub rounds_total: u64,
    pub seed: u64,
    /// The run setting `overlap`: each round also draws the next round's batches.
    #[serde(default)]
    pub overlap: bool,
}

impl RunConfig {
    /// The coordinator's part of a run's settings.
    pub fn from_spec(spec: &RunSpec, batches_per_epoch: u64) -> RunConfig {
        RunConfig {
            run_id: spec.run_id.clone(),
            min_nodes: spec.min_nodes,
            max_nodes: spec.max_nodes.min(tessera_protocol::limits::MEMBERS_MAX),
            round_deadline_ms: spec.round_deadline_ms,
            heartbeat_timeout_ms: spec.heartbeat_timeout_ms,
            missed_rounds_max: spec.missed_rounds_max,
            batches_per_node: spec.inner_steps,
            batches_per_epoch,
            rounds_total: spec.rounds,
            seed: spec.seed,
            overlap: spec.overlap,
        }
    }
}

/// A member's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub last_seen_ms: u64,
    pub missed_rounds: u32,
    /// Joined during a round: takes part from the next one.
    pub waiting: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "input", rename_all = "snake_case")]
pub enum Input {
    Join {
        node: NodeId,
    },
    Leave {
        node: NodeId,
    },
    Heartbeat {
        node: NodeId,
    },
    Commit {
        node: NodeId,
        round: u64,
        commit: Commit,
    },
    /// Remove a member for proven cheating (a failed audit, a copy) and refuse it
    /// from then on: the same key can't join this run again.
    Eject {
        node: NodeId,
    },
    Tick,
}

/// One member's verified contribution to a closed round, for the ledger.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkRecord {
    pub node: NodeId,
    pub tokens: u64,
    pub batches: Vec<u64>,
}

/// One durable change of the coordinator between snapshots, as the hub persists it.
/// Replaying the facts after a snapshot (see [`Coordinator::replay`]) rebuilds the state
/// up to heartbeat times, which a restarted hub refreshes anyway.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "fact", rename_all = "snake_case")]
pub enum Fact {
    /// A member joined (or rejoined) with this state.
    Member { node: NodeId, member: Member },
    /// A member left or was dropped.
    Removed { node: NodeId },
    /// A member's commit for the open round was accepted.
    Committed { node: NodeId, commit: Commit },
    /// A member was ejected (see [`Input::Eject`]).
    Ejected { node: NodeId },
}

/// A deliberate bug, for showing that the simulator's checker catches a broken
/// coordinator. A test tool: nothing in a hub or node sets one. Not persisted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "fault", rename_all = "snake_case")]
pub enum Fault {
    /// From round `from_round` on, the second member in assignment order is handed the
    /// first member's first batch instead of its own.
    AssignTwice { from_round: u64 },
}

/// Why a member left the run without asking to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DropReason {
    /// No heartbeat for `heartbeat_timeout_ms`.
    Silent,
    /// Missed `missed_rounds_max` rounds in a row (a refused update is a miss).
    MissedRounds,
    /// Caught cheating by the validator (a copy at a round's close).
    Ejected,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    RoundStarted {
        round: u64,
        deadline_ms: u64,
        /// Members assigned work this round.
        members: usize,
    },
    RoundClosed {
        round: u64,
        accepted: BTreeMap<NodeId, Commit>,
        late: Vec<NodeId>,
        /// Committed, but refused by the round's [`Judge`]: not aggregated, not paid,
        /// its batches back in the pool, a missed round for its member.
        refused: Vec<NodeId>,
        work: Vec<WorkRecord>,
    },
    MemberDropped {
        node: NodeId,
        reason: DropReason,
    },
    Finished {
        rounds: u64,
    },
}

/// Why an input was refused (the state is unchanged).
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum CoordError {
    #[error("node {node} is not a member of the run")]
    NotMember { node: NodeId },
    #[error("the run is full ({max} members)")]
    Full { max: usize },
    #[error("commit for round {got}, but the current round is {current:?}")]
    WrongRound { got: u64, current: Option<u64> },
    #[error("node {node} already committed round {round}")]
    AlreadyCommitted { node: NodeId, round: u64 },
    #[error("node {node} was not assigned work in round {round}")]
    NotAssigned { node: NodeId, round: u64 },
    #[error("commit claims {claimed} tokens; the assignment holds at most {max}")]
    TooManyTokens { claimed: u64, max: u64 },
    #[error("the run has finished")]
    Finished,
    #[error("node {node} was ejected from this run for cheating and can't join it again")]
    Ejected { node: NodeId },
}

/// What a round's judge decided about its commits.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Judged {
    /// Left out of the round: not aggregated, not paid.
    pub refused: BTreeSet<NodeId>,
    /// Refused and removed from the run for good (a proven copy).
    pub ejected: BTreeSet<NodeId>,
}

/// Decides, when a round closes, which of its commits count. The coordinator stays
/// pure: whatever the judge measures (the hub decodes and scores the updates) comes
/// in through this call, and the same judge on the same commits decides the same.
pub trait Judge {
    /// `commits` are the round's commits of current members in the order they
    /// arrived, each with the batches its node was assigned.
    fn judge(&mut self, round: u64, commits: &[(NodeId, &Commit, &[u64])]) -> Judged;
}

/// The judge that refuses nothing.
pub struct AcceptAll;

impl Judge for AcceptAll {
    fn judge(&mut self, _round: u64, _commits: &[(NodeId, &Commit, &[u64])]) -> Judged {
        Judged::default()
    }
}

/// The coordinator's persistent state: what a snapshot holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Snapshot {
    config: RunConfig,
    phase: Phase,
    members: BTreeMap<NodeId, Member>,
    assignment: BTreeMap<NodeId, Vec<u64>>,
    commits: BTreeMap<NodeId, Commit>,
    deadline_ms: u64,
    returned: VecDeque<u64>,
    cursor: u64,
    shuffle_seed: Hash32,
    tokens_per_batch: u64,
    closed_rounds: u64,
    #[serde(default)]
    commit_order: Vec<NodeId>,
    #[serde(default)]
    ejected: BTreeSet<NodeId>,
    #[serde(default)]
    next_assignment: BTreeMap<NodeId, Vec<u64>>,
}

/// The coordinator's whole state (serialisable, so the hub can persist it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "Snapshot", into = "Snapshot")]
pub struct Coordinator {
    pub config: RunConfig,
    pub phase: Phase,
    pub members: BTreeMap<NodeId, Member>,
    /// Batch indices of the current round per assigned member.
    pub assignment: BTreeMap<NodeId, Vec<u64>>,
    pub commits: BTreeMap<NodeId, Commit>,
    pub deadline_ms: u64,
    /// Batches returned by members who did not deliver, assigned first.
    pub returned: VecDeque<u64>,
    /// Next fresh batch index (counts across epochs: batch `b` is index `b mod batches_per_epoch`).
    pub cursor: u64,
    /// Seed for the next round's member shuffle: hash of the last accepted set.
    pub shuffle_seed: Hash32,
    /// Tokens each sample batch holds, for bounding claimed work.
    pub tokens_per_batch: u64,
    /// Rounds closed so far; the next round's number.
    pub closed_rounds: u64,
    /// The open round's committers in the order their commits arrived (copies are
    /// credited to the first).
    pub commit_order: Vec<NodeId>,
    /// Members removed for cheating; refused if they join again.
    pub ejected: BTreeSet<NodeId>,
    /// Under `overlap`: the next round's batches per member, drawn when the open round
    /// started, so members train them while this round closes. They become the next
    /// round's assignment for those still members; a departed member's go back to the
    /// pool then.
    pub next_assignment: BTreeMap<NodeId, Vec<u64>>,
    /// Derived: members ordered by last-seen time, to find the silent in O(log N).
    seen: BTreeSet<(u64, NodeId)>,
    /// Derived: assigned members of the open round that are members and have not
    /// committed; the round is complete when it is empty.
    pending: BTreeSet<NodeId>,
    /// A deliberate bug (see [`Fault`]); `None` in every real run.
    fault: Option<Fault>,
}

impl From<Snapshot> for Coordinator {
    fn from(s: Snapshot) -> Coordinator {
        let mut c = Coordinator {
            config: s.config,
            phase: s.phase,
            members: s.members,
            assignment: s.assignment,
            commits: s.commits,
            deadline_ms: s.deadline_ms,
            returned: s.returned,
            cursor: s.cursor,
            shuffle_seed: s.shuffle_seed,
            tokens_per_batch: s.tokens_per_batch,
            closed_rounds: s.closed_rounds,
            commit_order: s.commit_order,
            ejected: s.ejected,
            next_assignment: s.next_assignment,
            seen: BTreeSet::new(),
            pending: BTreeSet::new(),
            fault: None,
        };
        c.reindex();
        c
    }
}

impl From<Coordinator> for Snapshot {
    fn from(c: Coordinator) -> Snapshot {
        Snapshot {
            config: c.config,
            phase: c.phase,
            members: c.members,
            assignment: c.assignment,
            commits: c.commits,
            deadline_ms: c.deadline_ms,
            returned: c.returned,
            cursor: c.cursor,
            shuffle_seed: c.shuffle_seed,
            tokens_per_batch: c.tokens_per_batch,
            closed_rounds: c.closed_rounds,
            commit_order: c.commit_order,
            ejected: c.ejected,
            next_assignment: c.next_assignment,
        }
    }
}

/// Fisher–Yates driven by blake3(seed ‖ i): anyone can reproduce it.
fn shuffle(mut items: Vec<NodeId>, seed: &Hash32) -> Vec<NodeId> {
    for i in (1..items.len()).rev() {
        let mut h = blake3::Hasher::new();
        h.update(seed.as_bytes());
        h.update(&(i as u64).to_le_bytes());
        let r = u64::from_le_bytes(h.finalize().as_bytes()[..8].try_into().expect("8 bytes"));
        items.swap(i, (r % (i as u64 + 1)) as usize);
    }
    items
}

impl Coordinator {
    pub fn new(config: RunConfig, tokens_per_batch: u64) -> Coordinator {
        let mut h = blake3::Hasher::new();
        h.update(b"tessera shuffle seed v1");
        h.update(config.run_id.as_bytes());
        h.update(&config.seed.to_le_bytes());
        let shuffle_seed = h.finalize().into();
        Coordinator {
            config,
            phase: Phase::Forming,
            members: BTreeMap::new(),
            assignment: BTreeMap::new(),
            commits: BTreeMap::new(),
            deadline_ms: 0,
            returned: VecDeque::new(),
            cursor: 0,
            shuffle_seed,
            tokens_per_batch,
            closed_rounds: 0,
            commit_order: Vec::new(),
            ejected: BTreeSet::new(),
            next_assignment: BTreeMap::new(),
            seen: BTreeSet::new(),
            pending: BTreeSet::new(),
            fault: None,
        }
    }

    /// Breaks this coordinator on purpose (a test tool; see [`Fault`]).
    pub fn inject_fault(&mut self, fault: Fault) {
        self.fault = Some(fault);
    }

    /// Rebuilds the derived indexes from the persistent fields.
    fn reindex(&mut self) {
        self.seen = self
            .members
            .iter()
            .map(|(n, m)| (m.last_seen_ms, *n))
            .collect();
        self.pending = self
            .assignment
            .keys()
            .filter(|n| self.members.contains_key(n) && !self.commits.contains_key(n))
            .copied()
            .collect();
    }

    /// Re-applies a stored fact on top of a snapshot (no round transitions happen
    /// between snapshots, so none are re-run here).
    pub fn replay(&mut self, fact: &Fact) {
        match fact {
            Fact::Member { node, member } => {
                self.remove_member(node);
                self.members.insert(*node, member.clone());
                self.seen.insert((member.last_seen_ms, *node));
                if self.assignment.contains_key(node) && !self.commits.contains_key(node) {
                    self.pending.insert(*node);
                }
            }
            Fact::Removed { node } => {
                self.remove_member(node);
            }
            Fact::Committed { node, commit } => {
                self.pending.remove(node);
                self.commits.insert(*node, commit.clone());
                self.commit_order.push(*node);
            }
            Fact::Ejected { node } => {
                self.remove_member(node);
                self.ejected.insert(*node);
            }
        }
    }

    /// Marks every member as seen at `now_ms`. A restarted hub calls this so that its
    /// own downtime does not count as the nodes' silence.
    pub fn refresh_members(&mut self, now_ms: u64) {
        for m in self.members.values_mut() {
            m.last_seen_ms = now_ms;
        }
        self.reindex();
    }

    pub fn round(&self) -> Option<u64> {
        match self.phase {
            Phase::Training { round } => Some(round),
            _ => None,
        }
    }

    /// Assigned members of the open round that still owe a commit.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    fn touch(&mut self, node: &NodeId, now_ms: u64) {
        if let Some(m) = self.members.get_mut(node) {
            self.seen.remove(&(m.last_seen_ms, *node));
            m.last_seen_ms = now_ms;
            self.seen.insert((now_ms, *node));
        }
    }

    fn remove_member(&mut self, node: &NodeId) -> bool {
        match self.members.remove(node) {
            Some(m) => {
                self.seen.remove(&(m.last_seen_ms, *node));
                self.pending.remove(node);
                true
            }
            None => false,
        }
    }

    /// Applies one input at `now_ms`, with a judge that refuses nothing. Refused
    /// inputs change nothing.
    pub fn apply(&mut self, input: Input, now_ms: u64) -> Result<Vec<Event>, CoordError> {
        self.apply_judged(input, now_ms, &mut AcceptAll)
    }

    /// Applies one input at `now_ms`; a round that closes is judged by `judge`.
    /// Refused inputs change nothing.
    pub fn apply_judged(
        &mut self,
        input: Input,
        now_ms: u64,
        judge: &mut dyn Judge,
    ) -> Result<Vec<Event>, CoordError> {
        // A cheater is ejected even after the run's end: audits settle after it.
        if self.phase == Phase::Finished && !matches!(input, Input::Tick | Input::Eject { .. }) {
            return Err(CoordError::Finished);
        }
        let mut events = Vec::new();
        match input {
            Input::Join { node } => {
                if self.ejected.contains(&node) {
                    return Err(CoordError::Ejected { node });
                }
                let max = self.config.max_nodes;
                if !self.members.contains_key(&node) {
                    if self.members.len() >= max {
                        return Err(CoordError::Full { max });
                    }
                    let waiting = self.round().is_some();
                    self.members.insert(
                        node,
                        Member {
                            last_seen_ms: now_ms,
                            missed_rounds: 0,
                            waiting,
                        },
                    );
                    self.seen.insert((now_ms, node));
                    // A member that left and came back within a round still owes its
                    // assignment.
                    if self.assignment.contains_key(&node) && !self.commits.contains_key(&node) {
                        self.pending.insert(node);
                    }
                }
                self.touch(&node, now_ms);
            }
            Input::Leave { node } => {
                if !self.remove_member(&node) {
                    return Err(CoordError::NotMember { node });
                }
                // Its batches return to the pool when the round closes without its commit.
            }
            Input::Heartbeat { node } => {
                if !self.members.contains_key(&node) {
                    return Err(CoordError::NotMember { node });
                }
                self.touch(&node, now_ms);
            }
            Input::Commit {
                node,
                round,
                commit,
            } => {
                self.check_commit(&node, round, &commit)?;
                self.touch(&node, now_ms);
                self.pending.remove(&node);
                self.commits.insert(node, commit);
                self.commit_order.push(node);
            }
            Input::Eject { node } => {
                // Idempotent: an ejected node that already left is still refused later.
                self.remove_member(&node);
                self.ejected.insert(node);
            }
            Input::Tick => {}
        }
        self.advance(now_ms, judge, &mut events);
        Ok(events)
    }

    /// Whether a commit would be accepted now, without applying it.
    pub fn check_commit(
        &self,
        node: &NodeId,
        round: u64,
        commit: &Commit,
    ) -> Result<(), CoordError> {
        if self.phase == Phase::Finished {
            return Err(CoordError::Finished);
        }
        if self.round() != Some(round) {
            return Err(CoordError::WrongRound {
                got: round,
                current: self.round(),
            });
        }
        let batches = self
            .assignment
            .get(node)
            .ok_or(CoordError::NotAssigned { node: *node, round })?;
        if !self.members.contains_key(node) {
            return Err(CoordError::NotMember { node: *node });
        }
        if self.commits.contains_key(node) {
            return Err(CoordError::AlreadyCommitted { node: *node, round });
        }
        let max = batches.len() as u64 * self.tokens_per_batch;
        if commit.tokens > max {
            return Err(CoordError::TooManyTokens {
                claimed: commit.tokens,
                max,
            });
        }
        Ok(())
    }

    /// Drops silent members, closes a round that is complete or past its deadline, and
    /// starts the next one when enough members are present.
    fn advance(&mut self, now_ms: u64, judge: &mut dyn Judge, events: &mut Vec<Event>) {
        if self.phase == Phase::Finished {
            return;
        }
        let timeout = self.config.heartbeat_timeout_ms;
        while let Some(&(seen, node)) = self.seen.first() {
            if now_ms.saturating_sub(seen) <= timeout {
                break;
            }
            self.remove_member(&node);
            events.push(Event::MemberDropped {
                node,
                reason: DropReason::Silent,
            });
        }
        if let Some(round) = self.round() {
            if self.pending.is_empty() || now_ms >= self.deadline_ms {
                self.close(round, judge, events);
                if round + 1 >= self.config.rounds_total {
                    self.phase = Phase::Finished;
                    events.push(Event::Finished { rounds: round + 1 });
                    return;
                }
                self.phase = Phase::Forming;
                // Drawn ahead for a round that starts only when enough members are
                // back: returned, and drawn again then.
                if self.members.len() < self.config.min_nodes.max(1) {
                    self.return_next(true);
                }
            }
        }
        if self.phase == Phase::Forming && self.members.len() >= self.config.min_nodes.max(1) {
            self.start(self.closed_rounds, now_ms, events);
        }
    }

    fn close(&mut self, round: u64, judge: &mut dyn Judge, events: &mut Vec<Event>) {
        let order = std::mem::take(&mut self.commit_order);
        let judged = {
            let in_order: Vec<(NodeId, &Commit, &[u64])> = order
                .iter()
                .filter(|n| self.members.contains_key(n))
                .filter_map(|n| {
                    let c = self.commits.get(n)?;
                    let b = self.assignment.get(n)?;
                    Some((*n, c, b.as_slice()))
                })
                .collect();
            if in_order.is_empty() {
                Judged::default()
            } else {
                judge.judge(round, &in_order)
            }
        };
        let assignment = std::mem::take(&mut self.assignment);
        let commits = std::mem::take(&mut self.commits);
        self.pending.clear();
        let mut accepted = BTreeMap::new();
        let mut late = Vec::new();
        let mut refused = Vec::new();
        let mut work = Vec::new();
        for (node, batches) in assignment {
            let member = self.members.contains_key(&node);
            if member && commits.contains_key(&node) && judged.refused.contains(&node) {
                refused.push(node);
                self.returned.extend(batches);
                if judged.ejected.contains(&node) {
                    self.remove_member(&node);
                    self.ejected.insert(node);
                    events.push(Event::MemberDropped {
                        node,
                        reason: DropReason::Ejected,
                    });
                } else if let Some(m) = self.members.get_mut(&node) {
                    m.missed_rounds += 1;
                    if m.missed_rounds >= self.config.missed_rounds_max {
                        self.remove_member(&node);
                        events.push(Event::MemberDropped {
                            node,
                            reason: DropReason::MissedRounds,
                        });
                    }
                }
                continue;
            }
            match commits.get(&node) {
                Some(c) if member => {
                    accepted.insert(node, c.clone());
                    work.push(WorkRecord {
                        node,
                        tokens: c.tokens,
                        batches,
                    });
                    if let Some(m) = self.members.get_mut(&node) {
                        m.missed_rounds = 0;
                    }
                }
                _ => {
                    self.returned.extend(batches);
                    if let Some(m) = self.members.get_mut(&node) {
                        m.missed_rounds += 1;
                        late.push(node);
                        if m.missed_rounds >= self.config.missed_rounds_max {
                            self.remove_member(&node);
                            events.push(Event::MemberDropped {
                                node,
                                reason: DropReason::MissedRounds,
                            });
                        }
                    }
                }
            }
        }
        let mut h = blake3::Hasher::new();
        h.update(self.shuffle_seed.as_bytes());
        for (node, c) in &accepted {
            h.update(node.as_bytes());
            h.update(c.blob_hash.as_bytes());
        }
        self.shuffle_seed = h.finalize().into();
        self.closed_rounds = round + 1;
        events.push(Event::RoundClosed {
            round,
            accepted,
            late,
            refused,
            work,
        });
    }

    /// Batches drawn ahead go back to the pool: those of members that are gone, or
    /// (`all`) every member's.
    fn return_next(&mut self, all: bool) {
        for (node, batches) in std::mem::take(&mut self.next_assignment) {
            if !all && self.members.contains_key(&node) {
                self.next_assignment.insert(node, batches);
            } else {
                self.returned.extend(batches);
            }
        }
    }

    /// One member's batches for a round: returned ones first, then fresh ones.
    fn draw(&mut self) -> Vec<u64> {
        (0..self.config.batches_per_node)
            .map(|_| {
                self.returned.pop_front().unwrap_or_else(|| {
                    self.cursor += 1;
                    self.cursor - 1
                })
            })
            .collect()
    }

    fn start(&mut self, round: u64, now_ms: u64, events: &mut Vec<Event>) {
        for m in self.members.values_mut() {
            m.waiting = false;
        }
        let order = shuffle(self.members.keys().copied().collect(), &self.shuffle_seed);
        // Under `overlap` members keep what was drawn for them last round (and trained
        // already); a member without (new, or back) gets batches now.
        self.return_next(false);
        let mut assignment = std::mem::take(&mut self.next_assignment);
        for node in &order {
            if !assignment.contains_key(node) {
                let batches = self.draw();
                assignment.insert(*node, batches);
            }
        }
        if self.config.overlap && round + 1 < self.config.rounds_total {
            for node in &order {
                let batches = self.draw();
                self.next_assignment.insert(*node, batches);
            }
        }
        if let Some(Fault::AssignTwice { from_round }) = self.fault {
            let mut firsts = assignment.values_mut().filter(|b| !b.is_empty());
            if let (true, Some(a), Some(b)) = (round >= from_round, firsts.next(), firsts.next()) {
                b[0] = a[0];
            }
        }
        self.pending = assignment.keys().copied().collect();
        self.assignment = assignment;
        self.deadline_ms = now_ms.saturating_add(self.config.round_deadline_ms);
        self.phase = Phase::Training { round };
        events.push(Event::RoundStarted {
            round,
            deadline_ms: self.deadline_ms,
            members: self.pending.len(),
        });
    }

    /// Checks the invariants that tie the state together; O(N), for tests and the
    /// simulator's round-close checks. Returns what is broken.
    pub fn check_invariants(&self) -> Result<(), String> {
        if self.members.len() > self.config.max_nodes {
            return Err(format!(
                "{} members exceed max_nodes {}",
                self.members.len(),
                self.config.max_nodes
            ));
        }
        let seen: BTreeSet<(u64, NodeId)> = self
            .members
            .iter()
            .map(|(n, m)| (m.last_seen_ms, *n))
            .collect();
        if seen != self.seen {
            return Err("the last-seen index differs from the members".into());
        }
        let pending: BTreeSet<NodeId> = self
            .assignment
            .keys()
            .filter(|n| self.members.contains_key(n) && !self.commits.contains_key(n))
            .copied()
            .collect();
        if pending != self.pending {
            return Err("the pending set differs from the assignment".into());
        }
        if let Some(n) = self
            .commits
            .keys()
            .find(|n| !self.assignment.contains_key(n))
        {
            return Err(format!("{n} committed without an assignment"));
        }
        let ordered: BTreeSet<NodeId> = self.commit_order.iter().copied().collect();
        if ordered.len() != self.commit_order.len()
            || ordered != self.commits.keys().copied().collect()
        {
            return Err("the commit order differs from the commits".into());
        }
        if let Some(n) = self.members.keys().find(|n| self.ejected.contains(n)) {
            return Err(format!("{n} is a member and ejected"));
        }
        if self.round().is_none() && !self.assignment.is_empty() {
            return Err("an assignment outside a round".into());
        }
        if (self.round().is_none() || !self.config.overlap) && !self.next_assignment.is_empty() {
            return Err("next round's batches drawn outside an overlapped round".into());
        }
        let mut handed = BTreeSet::new();
        for b in self
            .assignment
            .values()
            .chain(self.next_assignment.values())
            .flatten()
            .chain(&self.returned)
        {
            if *b >= self.cursor || !handed.insert(*b) {
                return Err(format!("batch {b} is assigned twice or beyond the cursor"));
            }
        }
        Ok(())
    }
}
