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

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};

/// A node's id: its public key in hex.
pub type NodeId = String;

/// Most members a run admits; the hub's tables and the all-to-all exchange are sized for it.
pub const MEMBERS_MAX: usize = 4096;

/// The settings of a run that the coordinator needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunConfig {
    pub run_id: String,
    /// Training starts when this many nodes have joined.
    pub min_nodes: usize,
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
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    /// Waiting for `min_nodes`.
    Forming,
    Training {
        round: u64,
    },
    Finished,
}

/// A member's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub last_seen_ms: u64,
    pub missed_rounds: u32,
    /// Joined during a round: takes part from the next one.
    pub waiting: bool,
}

/// What a member commits at the end of its inner steps.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Commit {
    /// blake3 of the encoded update blob.
    pub blob_hash: String,
    pub tokens: u64,
    /// Mean inner loss, micro-nats (integers keep the state machine exact).
    pub loss_micro: u64,
    /// Hash of θ the member started the round from.
    pub theta_hash: String,
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
    Tick,
}

/// One member's verified contribution to a closed round, for the ledger.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkRecord {
    pub node: NodeId,
    pub tokens: u64,
    pub batches: Vec<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    RoundStarted {
        round: u64,
        deadline_ms: u64,
        assignment: BTreeMap<NodeId, Vec<u64>>,
    },
    RoundClosed {
        round: u64,
        accepted: BTreeMap<NodeId, Commit>,
        late: Vec<NodeId>,
        work: Vec<WorkRecord>,
    },
    MemberDropped {
        node: NodeId,
        reason: String,
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
}

/// The coordinator's whole state (serialisable, so the hub can persist it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
    pub shuffle_seed: String,
    /// Tokens each sample batch holds, for bounding claimed work.
    pub tokens_per_batch: u64,
    /// Rounds closed so far; the next round's number.
    pub closed_rounds: u64,
}

fn shuffle(mut items: Vec<NodeId>, seed: &str) -> Vec<NodeId> {
    // Fisher–Yates driven by blake3(seed ‖ i): anyone can reproduce it.
    for i in (1..items.len()).rev() {
        let h = blake3::hash(format!("{seed}:{i}").as_bytes());
        let r = u64::from_le_bytes(h.as_bytes()[..8].try_into().expect("8 bytes"));
        items.swap(i, (r % (i as u64 + 1)) as usize);
    }
    items
}

impl Coordinator {
    pub fn new(config: RunConfig, tokens_per_batch: u64) -> Coordinator {
        let shuffle_seed = blake3::hash(format!("{}:{}", config.run_id, config.seed).as_bytes())
            .to_hex()
            .to_string();
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
        }
    }

    /// Marks every member as seen at `now_ms`. A restarted hub calls this so that its
    /// own downtime does not count as the nodes' silence.
    pub fn refresh_members(&mut self, now_ms: u64) {
        for m in self.members.values_mut() {
            m.last_seen_ms = now_ms;
        }
    }

    pub fn round(&self) -> Option<u64> {
        match self.phase {
            Phase::Training { round } => Some(round),
            _ => None,
        }
    }

    /// Applies one input at `now_ms`. Refused inputs change nothing.
    pub fn apply(&mut self, input: Input, now_ms: u64) -> Result<Vec<Event>, CoordError> {
        if self.phase == Phase::Finished && input != Input::Tick {
            return Err(CoordError::Finished);
        }
        let mut events = Vec::new();
        match input {
            Input::Join { node } => {
                if !self.members.contains_key(&node)
                    && self.members.len() >= self.config.max_nodes.min(MEMBERS_MAX)
                {
                    return Err(CoordError::Full {
                        max: self.config.max_nodes.min(MEMBERS_MAX),
                    });
                }
                let waiting = self.round().is_some();
                let m = self.members.entry(node).or_insert(Member {
                    last_seen_ms: now_ms,
                    missed_rounds: 0,
                    waiting,
                });
                m.last_seen_ms = now_ms;
            }
            Input::Leave { node } => {
                if self.members.remove(&node).is_none() {
                    return Err(CoordError::NotMember { node });
                }
                // Its batches return to the pool when the round closes without its commit.
            }
            Input::Heartbeat { node } => {
                self.members
                    .get_mut(&node)
                    .ok_or(CoordError::NotMember { node })?
                    .last_seen_ms = now_ms;
            }
            Input::Commit {
                node,
                round,
                commit,
            } => {
                if self.round() != Some(round) {
                    return Err(CoordError::WrongRound {
                        got: round,
                        current: self.round(),
                    });
                }
                let batches =
                    self.assignment
                        .get(&node)
                        .ok_or_else(|| CoordError::NotAssigned {
                            node: node.clone(),
                            round,
                        })?;
                if !self.members.contains_key(&node) {
                    return Err(CoordError::NotMember { node });
                }
                if self.commits.contains_key(&node) {
                    return Err(CoordError::AlreadyCommitted { node, round });
                }
                let max = batches.len() as u64 * self.tokens_per_batch;
                if commit.tokens > max {
                    return Err(CoordError::TooManyTokens {
                        claimed: commit.tokens,
                        max,
                    });
                }
                self.members.get_mut(&node).expect("checked").last_seen_ms = now_ms;
                self.commits.insert(node, commit);
            }
            Input::Tick => {}
        }
        self.advance(now_ms, &mut events);
        Ok(events)
    }

    /// Drops silent members, closes a round that is complete or past its deadline, and
    /// starts the next one when enough members are present.
    fn advance(&mut self, now_ms: u64, events: &mut Vec<Event>) {
        if self.phase == Phase::Finished {
            return;
        }
        let timeout = self.config.heartbeat_timeout_ms;
        let silent: Vec<NodeId> = self
            .members
            .iter()
            .filter(|(_, m)| now_ms.saturating_sub(m.last_seen_ms) > timeout)
            .map(|(n, _)| n.clone())
            .collect();
        for node in silent {
            self.members.remove(&node);
            events.push(Event::MemberDropped {
                node,
                reason: format!("no heartbeat for {timeout} ms"),
            });
        }
        if let Some(round) = self.round() {
            let all_in = self
                .assignment
                .keys()
                .all(|n| self.commits.contains_key(n) || !self.members.contains_key(n));
            if all_in || now_ms >= self.deadline_ms {
                self.close(round, events);
                if round + 1 >= self.config.rounds_total {
                    self.phase = Phase::Finished;
                    events.push(Event::Finished { rounds: round + 1 });
                    return;
                }
                self.phase = Phase::Forming;
            }
        }
        if self.phase == Phase::Forming {
            let active = self.members.len();
            if active >= self.config.min_nodes.max(1) {
                self.start(self.closed_rounds, now_ms, events);
            }
        }
    }

    fn close(&mut self, round: u64, events: &mut Vec<Event>) {
        let assignment = std::mem::take(&mut self.assignment);
        let commits = std::mem::take(&mut self.commits);
        let mut accepted = BTreeMap::new();
        let mut late = Vec::new();
        let mut work = Vec::new();
        for (node, batches) in assignment {
            match commits.get(&node) {
                Some(c) if self.members.contains_key(&node) => {
                    accepted.insert(node.clone(), c.clone());
                    work.push(WorkRecord {
                        node: node.clone(),
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
                        late.push(node.clone());
                        if m.missed_rounds >= self.config.missed_rounds_max {
                            self.members.remove(&node);
                            events.push(Event::MemberDropped {
                                node,
                                reason: format!("missed {} rounds", self.config.missed_rounds_max),
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
        self.shuffle_seed = h.finalize().to_hex().to_string();
        self.closed_rounds = round + 1;
        events.push(Event::RoundClosed {
            round,
            accepted,
            late,
            work,
        });
    }

    fn start(&mut self, round: u64, now_ms: u64, events: &mut Vec<Event>) {
        for m in self.members.values_mut() {
            m.waiting = false;
        }
        let order = shuffle(self.members.keys().cloned().collect(), &self.shuffle_seed);
        let mut assignment = BTreeMap::new();
        for node in order {
            let batches: Vec<u64> = (0..self.config.batches_per_node)
                .map(|_| {
                    self.returned.pop_front().unwrap_or_else(|| {
                        self.cursor += 1;
                        self.cursor - 1
                    })
                })
                .collect();
            assignment.insert(node, batches);
        }
        self.assignment = assignment.clone();
        self.deadline_ms = now_ms + self.config.round_deadline_ms;
        self.phase = Phase::Training { round };
        events.push(Event::RoundStarted {
            round,
            deadline_ms: self.deadline_ms,
            assignment,
        });
    }
}
