//! A node as a pure engine: `NodeState::next(outcome) -> Action`. The engine is told
//! what its last action produced (an [`Outcome`]) and answers what to do next; it never
//! touches the network, the clock or the model. The process loop in `lib.rs` carries
//! actions out over HTTP, iroh-blobs and the trainer; the simulator carries them out on
//! virtual time. Both run this same code.
//!
//! The policy: join; poll the hub's state; catch up to θ of the latest closed round
//! (one outer step from the round's record when one round behind, otherwise the hub's
//! checkpoint); train and commit the open round when assigned; report θ after every
//! step; rejoin when the hub says it is no longer a member; retry every failure after a
//! pause. A commit the hub refused is not retried in the same round (it would be
//! refused again); the node waits for the next round.

use tessera_protocol::wire::{ErrorCode, Phase, StateView};
use tessera_protocol::Hash32;

/// What the node does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Join,
    /// Read the hub's state view.
    Poll,
    /// Sleep, then poll.
    Wait {
        ms: u64,
    },
    /// Take the outer step of closed round `round`: read its record, fetch its
    /// accepted updates, apply them to θ of `round`.
    Step {
        round: u64,
    },
    /// Replace θ by the hub's checkpoint.
    LoadCheckpoint {
        hash: Hash32,
    },
    /// Train `batches` from θ of `round`, publish the update, commit it.
    Train {
        round: u64,
        batches: Vec<u64>,
    },
    /// Under `overlap`: train `batches` of the next round `round` from the θ held now
    /// (that of the round still open), publish the update and hold it; it is committed
    /// once `round` opens.
    TrainAhead {
        round: u64,
        batches: Vec<u64>,
    },
    /// Commit the update held for `round`.
    Commit {
        round: u64,
    },
    /// Report θ after the outer step of `round`.
    Report {
        round: u64,
        theta: Hash32,
    },
    /// The run finished.
    Done,
}

/// What the last action produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The node starts holding θ of round `round` (θ₀ at round 0).
    Started {
        round: u64,
    },
    Joined,
    View(StateView),
    /// The outer step of `round` gave θ `theta`; the round's record says `expected`.
    Stepped {
        round: u64,
        theta: Hash32,
        expected: Hash32,
    },
    /// The checkpoint holds θ of round `round`.
    Loaded {
        round: u64,
    },
    Committed {
        round: u64,
    },
    /// An update for `round` from `batches` was trained ahead and is held.
    Trained {
        round: u64,
        batches: Vec<u64>,
    },
    Reported,
    Waited,
    /// The hub refused the request with this code.
    Refused {
        code: ErrorCode,
    },
    /// The request failed without an answer (the hub restarting, a lost message, a
    /// peer that would not serve a blob); retried after a pause.
    Failed,
}

/// A node's protocol state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeState {
    joined: bool,
    /// The round whose θ the node holds, once it holds one.
    have: Option<u64>,
    /// The latest state view, until it is used up.
    view: Option<StateView>,
    /// The round the node last tried to commit (committed or refused).
    tried: Option<u64>,
    /// A θ report still to send.
    report: Option<(u64, Hash32)>,
    /// What the node last asked for, to interpret a refusal.
    last: Option<Action>,
    done: bool,
    /// The run setting `overlap`: round `r` trains from θ of round `r - 1`.
    overlap: bool,
    /// Under `overlap`: the round and batches of the update trained ahead and held.
    ahead: Option<(u64, Vec<u64>)>,
    pub poll_ms: u64,
    pub retry_ms: u64,
}

impl NodeState {
    pub fn new(poll_ms: u64, retry_ms: u64) -> NodeState {
        NodeState {
            joined: false,
            have: None,
            view: None,
            tried: None,
            report: None,
            last: None,
            done: false,
            overlap: false,
            ahead: None,
            poll_ms,
            retry_ms,
        }
    }

    /// A node of a run with `overlap`.
    pub fn overlapped(poll_ms: u64, retry_ms: u64) -> NodeState {
        NodeState {
            overlap: true,
            ..NodeState::new(poll_ms, retry_ms)
        }
    }

    /// The round whose θ the node holds.
    pub fn round_held(&self) -> Option<u64> {
        self.have
    }

    pub fn is_done(&self) -> bool {
        self.done
    }

    /// The hub no longer counts this node as a member (a heartbeat was refused): the
    /// next action joins again. Kept apart from [`NodeState::next`]'s outcome, so the
    /// outcome of the action in flight (a step already taken) is never lost.
    pub fn evicted(&mut self) {
        self.joined = false;
        self.view = None;
    }

    /// Takes in what the last action produced and decides the next one.
    pub fn next(&mut self, outcome: Outcome) -> Action {
        let action = self.decide(outcome);
        self.last = Some(action.clone());
        action
    }

    fn decide(&mut self, outcome: Outcome) -> Action {
        match outcome {
            Outcome::Started { round } => self.have = Some(round),
            Outcome::Joined => self.joined = true,
            Outcome::View(v) => self.view = Some(v),
            Outcome::Stepped {
                round,
                theta,
                expected,
            } => {
                // A θ that differs from the hub's is reported, then replaced by the
                // hub's checkpoint.
                self.have = (theta == expected).then_some(round + 1);
                self.report = Some((round, theta));
            }
            Outcome::Loaded { round } => self.have = Some(round),
            Outcome::Committed { round } => {
                self.tried = Some(round);
                self.ahead = None;
                self.view = None;
            }
            Outcome::Trained { round, batches } => {
                self.ahead = Some((round, batches));
                // The round it was trained for may have opened meanwhile.
                self.view = None;
            }
            Outcome::Reported | Outcome::Waited => {}
            Outcome::Refused { code } => {
                match (&self.last, code) {
                    (_, ErrorCode::NotMember) => self.joined = false,
                    (Some(Action::Join), ErrorCode::Finished) => {
                        self.done = true;
                    }
                    (Some(Action::Train { round, .. } | Action::Commit { round }), _) => {
                        self.tried = Some(*round);
                        self.ahead = None;
                    }
                    // A report the hub will not take is dropped, not retried.
                    (Some(Action::Report { .. }), _) => {}
                    _ => {
                        self.view = None;
                        return Action::Wait { ms: self.retry_ms };
                    }
                }
                self.view = None;
            }
            Outcome::Failed => {
                self.view = None;
                return Action::Wait { ms: self.retry_ms };
            }
        }
        if let Some((round, theta)) = self.report.take() {
            return Action::Report { round, theta };
        }
        if self.done {
            return Action::Done;
        }
        if !self.joined {
            return Action::Join;
        }
        let Some(view) = &self.view else {
            return Action::Poll;
        };
        if self.overlap {
            return self.decide_overlapped();
        }
        let (closed, checkpoint, phase) = (view.closed_rounds, view.checkpoint, view.phase);
        if let Some(a) = self.catch_up(closed, checkpoint, phase, 1) {
            return a;
        }
        let Some(view) = &self.view else {
            return Action::Poll;
        };
        if let (Phase::Training { round }, Some(batches)) = (view.phase, &view.assignment) {
            if !view.committed && self.tried != Some(round) && self.have == Some(round) {
                return Action::Train {
                    round,
                    batches: batches.clone(),
                };
            }
        }
        self.view = None;
        Action::Wait { ms: self.poll_ms }
    }

    /// What brings θ up to `closed` closed rounds: an outer step when at most `steps`
    /// behind, else the hub's `checkpoint`; then the end, if the run finished. `None`
    /// when θ is current and the run goes on.
    fn catch_up(
        &mut self,
        closed: u64,
        checkpoint: Hash32,
        phase: Phase,
        steps: u64,
    ) -> Option<Action> {
        match self.have {
            Some(h) if h == closed => {}
            Some(h) if h < closed && closed - h <= steps => return Some(Action::Step { round: h }),
            _ => return Some(Action::LoadCheckpoint { hash: checkpoint }),
        }
        if phase == Phase::Finished {
            self.done = true;
            return Some(Action::Done);
        }
        None
    }

    /// The policy under `overlap`, where round `k` trains from θ of round `k - 1`
    /// (round 0 from θ₀): with round `k` open, commit the update trained ahead for it
    /// (or train it now, when θ of round `k - 1` is held), then take the outer step of
    /// round `k - 1`, then train round `k + 1` from θ of round `k` ahead, while round
    /// `k` closes.
    fn decide_overlapped(&mut self) -> Action {
        let Some(view) = self.view.clone() else {
            return Action::Poll;
        };
        let target = view.closed_rounds;
        let open = view.round();
        let base = |k: u64| k.saturating_sub(1);
        // What this node still owes the open round, if it can: a commit.
        if let (Some(k), Some(batches)) = (open, &view.assignment) {
            if !view.committed && self.tried != Some(k) {
                match &self.ahead {
                    Some((r, b)) if *r == k && b == batches => {
                        return Action::Commit { round: k };
                    }
                    _ if self.have == Some(base(k)) => {
                        return Action::Train {
                            round: k,
                            batches: batches.clone(),
                        };
                    }
                    _ => {}
                }
            }
        }
        // A round closes as soon as every member committed, which under overlap is
        // right after it opens: the node is then two steps behind, and takes them
        // (the hub keeps two rounds' updates), committing in between what the open
        // round trains from θ of the one before.
        if let Some(a) = self.catch_up(target, view.checkpoint, view.phase, 2) {
            return a;
        }
        if let (Some(k), Some(batches)) = (open, &view.next_assignment) {
            let held = self.ahead.as_ref().is_some_and(|(r, _)| *r == k + 1);
            if !held && self.tried != Some(k + 1) {
                return Action::TrainAhead {
                    round: k + 1,
                    batches: batches.clone(),
                };
            }
        }
        self.view = None;
        Action::Wait { ms: self.poll_ms }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(phase: Phase, closed: u64, assignment: Option<Vec<u64>>) -> StateView {
        StateView {
            phase,
            assignment,
            committed: false,
            deadline_ms: 0,
            closed_rounds: closed,
            checkpoint: Hash32::of(b"ckpt"),
            audit: None,
            dispute: None,
            next_assignment: None,
        }
    }

    #[test]
    fn a_round_trip_through_the_protocol() {
        let mut n = NodeState::new(100, 1000);
        assert_eq!(n.next(Outcome::Started { round: 0 }), Action::Join);
        assert_eq!(n.next(Outcome::Joined), Action::Poll);
        let v = view(Phase::Training { round: 0 }, 0, Some(vec![3, 4]));
        assert_eq!(
            n.next(Outcome::View(v.clone())),
            Action::Train {
                round: 0,
                batches: vec![3, 4]
            }
        );
        assert_eq!(n.next(Outcome::Committed { round: 0 }), Action::Poll);
        // Still round 0 open and committed: wait.
        let mut committed = v;
        committed.committed = true;
        assert_eq!(n.next(Outcome::View(committed)), Action::Wait { ms: 100 });
        assert_eq!(n.next(Outcome::Waited), Action::Poll);
        // Round 0 closed: step, report, then train round 1.
        let v1 = view(Phase::Training { round: 1 }, 1, Some(vec![5]));
        assert_eq!(n.next(Outcome::View(v1)), Action::Step { round: 0 });
        let t = Hash32::of(b"theta1");
        assert_eq!(
            n.next(Outcome::Stepped {
                round: 0,
                theta: t,
                expected: t
            }),
            Action::Report { round: 0, theta: t }
        );
        assert_eq!(
            n.next(Outcome::Reported),
            Action::Train {
                round: 1,
                batches: vec![5]
            }
        );
    }

    #[test]
    fn divergence_far_behind_and_eviction_are_recovered() {
        let mut n = NodeState::new(100, 1000);
        n.next(Outcome::Started { round: 0 });
        n.next(Outcome::Joined);
        // Three rounds behind: load the checkpoint.
        let v = view(Phase::Training { round: 3 }, 3, None);
        assert_eq!(
            n.next(Outcome::View(v.clone())),
            Action::LoadCheckpoint {
                hash: Hash32::of(b"ckpt")
            }
        );
        assert_eq!(
            n.next(Outcome::Loaded { round: 3 }),
            Action::Wait { ms: 100 }
        );
        // A step that disagrees with the record: report it, then load the checkpoint.
        n.next(Outcome::Waited);
        let v4 = view(Phase::Training { round: 4 }, 4, None);
        assert_eq!(n.next(Outcome::View(v4)), Action::Step { round: 3 });
        let bad = Hash32::of(b"bad");
        assert_eq!(
            n.next(Outcome::Stepped {
                round: 3,
                theta: bad,
                expected: Hash32::of(b"good")
            }),
            Action::Report {
                round: 3,
                theta: bad
            }
        );
        assert_eq!(
            n.next(Outcome::Reported),
            Action::LoadCheckpoint {
                hash: Hash32::of(b"ckpt")
            }
        );
        // Dropped by the hub: join again.
        assert_eq!(
            n.next(Outcome::Refused {
                code: ErrorCode::NotMember
            }),
            Action::Join
        );
    }

    /// Story: the simulator (10,000 nodes, seed 1) caught a node reporting a divergent θ.
    /// An eviction noticed by the heartbeat replaced the outcome of the step in flight,
    /// so the engine thought it was still a round behind while θ had moved on, and
    /// stepped the same round twice. An eviction is now its own signal.
    #[test]
    fn an_eviction_does_not_lose_the_step_in_flight() {
        let mut n = NodeState::new(100, 1000);
        n.next(Outcome::Started { round: 0 });
        n.next(Outcome::Joined);
        let v1 = view(Phase::Training { round: 1 }, 1, None);
        assert_eq!(n.next(Outcome::View(v1)), Action::Step { round: 0 });
        n.evicted();
        let t = Hash32::of(b"theta1");
        let next = n.next(Outcome::Stepped {
            round: 0,
            theta: t,
            expected: t,
        });
        assert_eq!(next, Action::Report { round: 0, theta: t });
        assert_eq!(n.round_held(), Some(1));
        assert_eq!(n.next(Outcome::Reported), Action::Join);
    }

    /// Under `overlap`: round k trains from θ of round k - 1. The node commits what it
    /// trained ahead as soon as round k opens, then steps, then trains round k + 1
    /// ahead while round k closes; when round k closed meanwhile it is two steps
    /// behind and trains round k + 1 in between them, from the θ that round needs.
    #[test]
    fn overlap_trains_the_next_round_while_this_one_closes() {
        let mut n = NodeState::overlapped(100, 1000);
        n.next(Outcome::Started { round: 0 });
        assert_eq!(n.next(Outcome::Joined), Action::Poll);
        let mut v0 = view(Phase::Training { round: 0 }, 0, Some(vec![0]));
        v0.next_assignment = Some(vec![1]);
        // Round 0 trains from θ₀ now; round 1, from θ₀ too, ahead.
        assert_eq!(
            n.next(Outcome::View(v0.clone())),
            Action::Train {
                round: 0,
                batches: vec![0]
            }
        );
        assert_eq!(n.next(Outcome::Committed { round: 0 }), Action::Poll);
        v0.committed = true;
        assert_eq!(
            n.next(Outcome::View(v0.clone())),
            Action::TrainAhead {
                round: 1,
                batches: vec![1]
            }
        );
        assert_eq!(
            n.next(Outcome::Trained {
                round: 1,
                batches: vec![1]
            }),
            Action::Poll
        );
        // Still round 0: nothing more to do.
        assert_eq!(n.next(Outcome::View(v0)), Action::Wait { ms: 100 });
        n.next(Outcome::Waited);
        // Round 1 opens: commit at once, then step round 0, then train round 2 ahead.
        let mut v1 = view(Phase::Training { round: 1 }, 1, Some(vec![1]));
        v1.next_assignment = Some(vec![2]);
        assert_eq!(
            n.next(Outcome::View(v1.clone())),
            Action::Commit { round: 1 }
        );
        assert_eq!(n.next(Outcome::Committed { round: 1 }), Action::Poll);
        v1.committed = true;
        assert_eq!(n.next(Outcome::View(v1.clone())), Action::Step { round: 0 });
        let t = Hash32::of(b"theta1");
        let stepped = Outcome::Stepped {
            round: 0,
            theta: t,
            expected: t,
        };
        assert_eq!(n.next(stepped), Action::Report { round: 0, theta: t });
        assert_eq!(
            n.next(Outcome::Reported),
            Action::TrainAhead {
                round: 2,
                batches: vec![2]
            }
        );
        // Trained ahead for other batches than round 2 got (the node was dropped and
        // joined again), and round 2 closed meanwhile: the node holds θ of round 1,
        // two steps behind. It steps once, trains round 3 from θ of round 2 (what
        // round 3 trains from), commits it, then takes the second step.
        n.next(Outcome::Trained {
            round: 2,
            batches: vec![9],
        });
        let mut v3 = view(Phase::Training { round: 3 }, 3, Some(vec![3]));
        v3.next_assignment = Some(vec![4]);
        assert_eq!(n.next(Outcome::View(v3.clone())), Action::Step { round: 1 });
        let t2 = Hash32::of(b"theta2");
        n.next(Outcome::Stepped {
            round: 1,
            theta: t2,
            expected: t2,
        });
        assert_eq!(
            n.next(Outcome::Reported),
            Action::Train {
                round: 3,
                batches: vec![3]
            }
        );
        assert_eq!(n.next(Outcome::Committed { round: 3 }), Action::Poll);
        v3.committed = true;
        assert_eq!(n.next(Outcome::View(v3)), Action::Step { round: 2 });
    }

    #[test]
    fn a_refused_commit_is_not_retried_in_its_round() {
        let mut n = NodeState::new(100, 1000);
        n.next(Outcome::Started { round: 0 });
        n.next(Outcome::Joined);
        let v = view(Phase::Training { round: 0 }, 0, Some(vec![1]));
        assert!(matches!(
            n.next(Outcome::View(v.clone())),
            Action::Train { .. }
        ));
        assert_eq!(
            n.next(Outcome::Refused {
                code: ErrorCode::StaleTheta
            }),
            Action::Poll
        );
        assert_eq!(n.next(Outcome::View(v)), Action::Wait { ms: 100 });
    }

    #[test]
    fn the_end_of_the_run_stops_the_node() {
        let mut n = NodeState::new(100, 1000);
        n.next(Outcome::Started { round: 2 });
        n.next(Outcome::Joined);
        assert_eq!(
            n.next(Outcome::View(view(Phase::Finished, 2, None))),
            Action::Done
        );
        assert!(n.is_done());
    }
}
